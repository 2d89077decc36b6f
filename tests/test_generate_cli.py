"""`llmkit generate`: JSONL in, JSONL out in input order, clear errors for bad lines."""

from __future__ import annotations

import json

import pytest

from llmkit.runtime.engine import LLM, EngineConfig
from llmkit.runtime.generate import parse_requests
from llmkit.runtime.sequence import SamplingParams


def test_generate_writes_one_line_per_prompt_in_input_order(cli, tiny_dir, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    lines = [
        {"prompt": "The king", "max_tokens": 6, "temperature": 0, "ignore_eos": True},
        {
            "prompt_token_ids": [1, 40, 41, 42],
            "max_completion_tokens": 3,
            "temperature": 0,
            "ignore_eos": True,
        },
        {"prompt": "Once upon", "max_tokens": 4, "temperature": 0.8, "seed": 1, "stop": ["zz"]},
    ]
    prompts.write_text("".join(json.dumps(x) + "\n" for x in lines))
    out = tmp_path / "out.jsonl"
    result = cli("generate", tiny_dir(), "--prompts", prompts, "--output", out, "--json")
    assert result.code == 0, result.err
    report = json.loads(result.out)
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["index"] for r in records] == [0, 1, 2]
    assert len(records[0]["token_ids"]) == 6 and len(records[1]["token_ids"]) == 3
    assert records[1]["num_prompt_tokens"] == 4
    assert report["num_requests"] == 3
    assert report["num_generated_tokens"] == sum(len(r["token_ids"]) for r in records)
    # the same requests through the library give the same greedy tokens
    llm = LLM(tiny_dir(), EngineConfig())
    params = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)
    assert (
        llm.generate([[1, 40, 41, 42]], params)[0].outputs[0].token_ids == records[1]["token_ids"]
    )


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("not json", "<t>:1: not valid JSON"),
        ('{"prompt": "a", "tempreture": 1}', "<t>:1: unknown field 'tempreture'"),
        ('{"max_tokens": 3}', "exactly one of 'prompt' and 'prompt_token_ids'"),
        ('{"prompt": "a", "top_p": 2}', "<t>:1: top_p must be in (0, 1]"),
        ('{"prompt_token_ids": ["a"]}', "must be a list of integers"),
    ],
)
def test_bad_lines_are_named(line, message):
    from llmkit.errors import LlmkitError

    with pytest.raises(LlmkitError, match=message.replace("(", r"\(").replace("]", r"\]")):
        parse_requests([line], "<t>")


def test_a_too_long_prompt_fails_cleanly_and_writes_nothing(cli, tiny_dir, tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt_token_ids": [5] * 600}) + "\n")
    out = tmp_path / "out.jsonl"
    result = cli("generate", tiny_dir(), "--prompts", prompts, "-o", out)
    assert result.code == 1 and "prompt 0: the prompt has 600 tokens" in result.err
    assert not out.exists()


def test_threads_sets_the_cpu_threads_and_is_bounded(cli, tiny_dir, tmp_path):
    import torch

    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "The king", "max_tokens": 2}) + "\n")
    before = torch.get_num_threads()
    try:
        result = cli("generate", tiny_dir(), "--prompts", prompts, "-o", tmp_path / "o.jsonl",
                     "--threads", "1", "--device", "cpu")  # fmt: skip
        assert result.code == 0, result.err
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    result = cli("generate", tiny_dir(), "--prompts", prompts, "--threads", "0")
    assert result.code != 0 and "--threads must be between 1 and" in result.err
    assert len(result.err.strip().splitlines()) == 1
    assert torch.get_num_threads() == before


def test_generate_freezes_the_heap_before_its_engine_runs(cli, tiny_dir, tmp_path, monkeypatch):
    """The collector's full passes skip what was alive before the engine ran (llmkit/memory.py
    freeze_heap): `generate` freezes once, before the model loads."""
    import llmkit.cli.generate as command
    from llmkit.runtime import engine

    events = []
    monkeypatch.setattr(command, "freeze_heap", lambda: events.append("freeze"))
    real = engine.LLM.__init__

    def load(self, *args, **kwargs):
        events.append("load")
        real(self, *args, **kwargs)

    monkeypatch.setattr(engine.LLM, "__init__", load)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt_token_ids": [1, 2], "max_tokens": 2}) + "\n")
    result = cli("generate", tiny_dir(), "--prompts", prompts, "--output", tmp_path / "o.jsonl")
    assert result.code == 0, result.err
    assert events == ["freeze", "load"]


@pytest.mark.parametrize(
    "args, says",
    [
        (["--num-speculative-tokens", "3"], "--num-speculative-tokens tunes speculation: it goes "
                                            "with --speculative ngram or a draft model"),
        (["--speculative-max-seqs", "8"], "--speculative-max-seqs tunes"),
        (["--ngram-min", "2"], "--ngram-min tunes speculation: it goes with --speculative ngram"),
        (["--draft-min-confidence", "0.5"], "--draft-min-confidence tunes speculation: it goes "
                                            "with --speculative DRAFT (a draft model)"),
        (["--speculative", "DRAFT", "--ngram-max", "2"], "--ngram-max tunes speculation: it goes "
                                                         "with --speculative ngram"),
        (["--speculative", "ngram", "--draft-min-confidence", "0.5"], "--draft-min-confidence "
         "tunes speculation: it goes with --speculative DRAFT (a draft model)"),
    ],
)  # fmt: skip
def test_a_speculation_option_without_what_it_tunes_is_one_error_line(
    cli, tiny_dir, tmp_path, args, says
):
    """As a recipe's are (engine_config.untuned), instead of being ignored."""
    model = tiny_dir()
    args = [model if a == "DRAFT" else a for a in args]
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "The king", "max_tokens": 2}) + "\n")
    result = cli("generate", model, "--prompts", prompts, *args)
    assert result.code == 1 and says in result.err
    assert len(result.err.strip().splitlines()) == 1 and not result.out


def test_speculation_options_reach_the_engine_given_or_not():
    """Not given: EngineConfig's defaults (which --help shows); given with what they tune:
    their values."""
    import typer
    from typer.testing import CliRunner

    from llmkit.cli.engine_options import with_engine_options

    seen = []

    def command(engine: EngineConfig) -> None:
        seen.append(engine)

    app = typer.Typer()
    app.command()(with_engine_options(command))
    runner = CliRunner()
    assert runner.invoke(app, []).exit_code == 0
    assert seen.pop() == EngineConfig()
    given = ["--speculative", "ngram", "--num-speculative-tokens", "2", "--ngram-min", "2",
             "--ngram-max", "3", "--speculative-max-seqs", "0"]  # fmt: skip
    assert runner.invoke(app, given).exit_code == 0
    assert seen.pop() == EngineConfig(speculative="ngram", num_speculative_tokens=2,
                                      ngram_min=2, ngram_max=3, speculative_max_seqs=0)  # fmt: skip
    assert "[default: (4)]" in runner.invoke(app, ["--help"], terminal_width=200).output
