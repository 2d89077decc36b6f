"""`llmkit run`: validation with file/line/key, end-to-end runs, skipping, thresholds and
failures."""

from __future__ import annotations

import json
import textwrap

import pytest

from llmkit.errors import LlmkitError
from llmkit.recipe.schema import load_recipe

RECIPE = """\
name: test
source:
  init: tiny-llama
outputs: {out}
steps:
  - id: int8
    quantize: {{method: int8}}
  - id: rtn
    quantize:
      method: rtn
      options: {{bits: 4, group_size: 32}}
  - id: tp2
    shard: {{from: int8, tp: 2}}
  - id: quality
    bench:
      quality: {{reference: source, candidates: [int8, rtn], num_windows: 4, seq_len: 64}}
      assert: ["kld_mean<={kld}"]
  - id: load
    bench:
      serve: {{model: int8, num_prompts: 6, input_len: 8, output_len: 4}}
      assert: ["failed<=0"]
"""


def write(tmp_path, text: str, name: str = "r.yaml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def test_a_recipe_runs_then_skips_what_is_unchanged(cli, tmp_path):
    out = tmp_path / "out"
    recipe = write(tmp_path, RECIPE.format(out=out, kld=1.0))
    first = cli("run", recipe, "--json")
    assert first.code == 0, first.err
    report = json.loads(first.out)
    assert [s["status"] for s in report["steps"]] == ["done"] * 6
    assert (out / "tp2" / "llmkit-shards.json").is_file() and (
        out / "rtn" / "config.json"
    ).is_file()
    quality = json.loads((out / "quality.json").read_text())
    assert [r["name"] for r in quality["rows"]] == ["source", "int8", "rtn"]
    served = json.loads((out / "load.json").read_text())
    assert served["completed"] == 6 and served["total_output_tokens"] == 24
    assert json.loads((out / "run.json").read_text())["status"] == "passed"

    again = json.loads(cli("run", recipe, "--json").out)
    assert [s["status"] for s in again["steps"]] == ["skipped (unchanged)"] * 6
    changed = cli("run", recipe, "--json", "--set", "steps.rtn.quantize.options.group_size=64")
    statuses = {s["id"]: s["status"] for s in json.loads(changed.out)["steps"]}
    assert statuses == {"source": "skipped (unchanged)", "int8": "skipped (unchanged)",
                        "rtn": "done", "tp2": "skipped (unchanged)", "quality": "done",
                        "load": "skipped (unchanged)"}  # fmt: skip
    forced = json.loads(cli("run", recipe, "--json", "--force").out)
    assert [s["status"] for s in forced["steps"]] == ["done"] * 6


def test_a_missed_threshold_exits_3_naming_the_metric(cli, tmp_path):
    recipe = write(tmp_path, RECIPE.format(out=tmp_path / "out", kld=0.0))
    result = cli("run", recipe, "--set", "steps.load.bench.serve.num_prompts=2")
    assert result.code == 3
    assert "threshold missed in step quality: int8: kld_mean" in result.err
    report = json.loads((tmp_path / "out" / "run.json").read_text())
    assert report["status"] == "threshold missed"
    assert report["steps"][-1]["status"] == "done"  # later steps still ran


def test_a_failed_step_keeps_earlier_outputs_and_is_named(cli, tmp_path):
    out = tmp_path / "out"
    recipe = write(tmp_path, RECIPE.format(out=out, kld=1.0))
    # groups of 128 do not divide tiny-llama's 64 inputs: the rtn step fails
    result = cli("run", recipe, "--set", "steps.rtn.quantize.options.group_size=128")
    assert result.code == 1 and "step rtn failed" in result.err
    report = json.loads((out / "run.json").read_text())
    assert report["failed_step"] == "rtn" and report["status"] == "failed"
    assert [s["status"] for s in report["steps"]] == ["done", "done", "failed", "not run",
                                                      "not run", "not run"]  # fmt: skip
    assert (out / "int8" / "config.json").is_file() and not (out / "rtn").exists()


def test_benches_speculate_with_ngram_or_an_earlier_checkpoint_as_draft(cli, tmp_path, monkeypatch):
    """An offline bench with an earlier step's checkpoint as the draft model reports its
    counts; a served one starts `llmkit serve` with the options, which it takes."""
    import llmkit.serve.launch

    commands, real = [], llmkit.serve.launch.launched

    def launched(command, port):
        commands.append(command)
        return real(command, port)

    monkeypatch.setattr(llmkit.serve.launch, "launched", launched)
    out = tmp_path / "out"
    recipe = write(tmp_path, f"""\
        name: spec
        source: {{init: tiny-llama}}
        outputs: {out}
        steps:
          - id: int8
            quantize: {{method: int8}}
          - id: offline
            bench:
              offline: {{batch_sizes: [1], input_len: [8], output_len: [12], speculative: int8,
                        draft_min_confidence: 0}}
          - id: served
            bench:
              serve: {{model: source, num_prompts: 2, input_len: 8, output_len: 4,
                       speculative: ngram, num_speculative_tokens: 3, ngram_min: 2,
                       ngram_max: 3, speculative_max_seqs: 8}}
              assert: ['failed<=0']
        """)  # fmt: skip
    done = cli("run", recipe, "--json")
    assert done.code == 0, done.err
    (case,) = json.loads((out / "offline.json").read_text())["cases"]
    assert case["speculative"] == "draft" and case["spec_proposed_tokens"] > 0
    assert json.loads((out / "served.json").read_text())["completed"] == 2
    (command,) = commands
    flags = dict(zip(command[-10::2], command[-9::2], strict=True))
    assert flags == {"--speculative": "ngram", "--ngram-max": "3", "--ngram-min": "2",
                     "--num-speculative-tokens": "3", "--speculative-max-seqs": "8"}  # fmt: skip


BAD = {
    "unknown key": ("steps:\n  - id: a\n    quantize: {method: int8, colour: red}\n", 3,
                    "steps.0.quantize.colour"),
    "wrong type": ("steps:\n  - id: a\n    shard:\n      tp: two\n", 4, "steps.0.shard.tp"),
    "unknown method": ("steps:\n  - id: a\n    quantize: {method: int3}\n", 3,
                       "steps.0.quantize.method"),
    "two kinds": ("steps:\n  - id: a\n    quantize: {method: int8}\n    shard: {tp: 2}\n", 2,
                  "steps.0"),
    "tp and heads": ("steps:\n  - id: a\n    shard: {tp: 3}\n", 3, "steps.0.shard.tp"),
    "bad reference": ("steps:\n  - id: a\n    shard: {from: nothing, tp: 2}\n", 3,
                      "steps.0.shard.from"),
    "duplicate id": ("steps:\n  - id: a\n    quantize: {method: int8}\n  - id: a\n"
                     "    quantize: {method: fp16}\n", 4, "steps.1.id"),
    "quantize a quantized": ("steps:\n  - id: a\n    quantize: {method: int8}\n  - id: b\n"
                             "    quantize: {method: gptq, from: a}\n", 5, "steps.1.quantize.from"),
    "bad assert": ("steps:\n  - id: a\n    bench:\n      offline: {}\n      assert: ['fast']\n",
                   5, "steps.0.bench.assert"),
    "calibration option": ("steps:\n  - id: a\n    quantize:\n      method: gptq\n"
                           "      calibration: {num_samples: many}\n", 5,
                           "steps.0.quantize.calibration.num_samples"),
    "option of another method": ("steps:\n  - id: a\n    quantize:\n      method: gptq\n"
                                 "      options: {smooth_alpha: 0.5}\n", 5,
                                 "steps.0.quantize.options.smooth_alpha"),
    "option type": ("steps:\n  - id: a\n    quantize:\n      method: rtn\n"
                    "      options: {bits: four}\n", 5, "steps.0.quantize.options.bits"),
    "option range": ("steps:\n  - id: a\n    quantize:\n      method: w8a8\n"
                     "      options: {smooth_alpha: 2}\n", 5, "steps.0.quantize.options"),
    "no adapter": ("steps:\n  - id: a\n    bench:\n      offline: {lora: /no/such/dir}\n",
                   4, "steps.0.bench.offline.lora"),
    "adapter with url": ("steps:\n  - id: a\n    bench:\n      serve:\n"
                         "        url: http://x\n        lora: /tmp\n", 4, "steps.0.bench.serve"),
    "draft from nowhere": ("steps:\n  - id: a\n    bench:\n      offline:\n"
                           "        speculative: b\n", 5, "steps.0.bench.offline.speculative"),
    "sharded draft": ("steps:\n  - id: a\n    shard: {tp: 2}\n  - id: b\n    bench:\n"
                      "      offline: {speculative: a}\n", 6, "steps.1.bench.offline.speculative"),
    "speculative with url": ("steps:\n  - id: a\n    bench:\n      serve:\n"
                             "        url: http://x\n        speculative: ngram\n", 4,
                             "steps.0.bench.serve"),
    "empty speculative": ("steps:\n  - id: a\n    bench:\n      offline:\n"
                          "        speculative: ''\n", 5, "steps.0.bench.offline.speculative"),
    "draft tokens alone": ("steps:\n  - id: a\n    bench:\n      offline:\n"
                           "        num_speculative_tokens: 2\n", 4, "steps.0.bench.offline"),
    "draft tokens range": ("steps:\n  - id: a\n    bench:\n      offline:\n"
                           "        speculative: ngram\n        num_speculative_tokens: 17\n",
                           6, "steps.0.bench.offline.num_speculative_tokens"),
    "engine option alone": ("steps:\n  - id: a\n    bench:\n      offline:\n"
                            "        speculative_max_seqs: 2\n", 4, "steps.0.bench.offline"),
    "ngram option with a draft": ("steps:\n  - id: a\n    bench:\n      offline:\n"
                                  "        speculative: source\n        ngram_max: 2\n", 4,
                                  "steps.0.bench.offline"),
    "draft option with ngram": ("steps:\n  - id: a\n    bench:\n      offline:\n"
                                "        speculative: ngram\n        draft_min_confidence: 0.5\n",
                                4, "steps.0.bench.offline"),
    "ngram above the default": ("steps:\n  - id: a\n    bench:\n      offline:\n"
                                "        speculative: ngram\n        ngram_min: 5\n", 4,
                                "steps.0.bench.offline"),
    "ngram range": ("steps:\n  - id: a\n    bench:\n      offline:\n"
                    "        speculative: ngram\n        ngram_max: 17\n", 6,
                    "steps.0.bench.offline.ngram_max"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(BAD))
def test_every_validation_error_names_file_line_and_key(tmp_path, case):
    steps, line, key = BAD[case]
    path = write(tmp_path, "name: bad\nsource:\n  init: tiny-llama\noutputs: o\n" + steps)
    with pytest.raises(LlmkitError) as info:
        load_recipe(path)
    assert str(info.value).startswith(f"{path}:{line + 4}: {key}: "), str(info.value)


def test_source_and_syntax_errors_are_located(tmp_path):
    steps = "steps:\n  - id: a\n    quantize: {method: int8}\n"
    unknown = write(tmp_path, "name: x\nsource:\n  init: huge-llama\noutputs: o\n" + steps)
    with pytest.raises(LlmkitError, match=r"r.yaml:3: source.init: no preset 'huge-llama'"):
        load_recipe(unknown)
    broken = write(tmp_path, "name: x\nsteps:\n  - id: [\n", "b.yaml")
    with pytest.raises(LlmkitError, match=r"b.yaml:\d+: not valid YAML"):
        load_recipe(broken)
    with pytest.raises(LlmkitError, match=r"--set 'steps': write it as key\.path=value"):
        load_recipe(unknown, ["steps"])
