"""`llmkit bench offline` and `llmkit bench compare` end to end on tiny checkpoints."""

from __future__ import annotations

import json

import pytest

from llmkit.bench.asserts import THRESHOLD_MISSED


def test_offline_measures_every_case(tiny_dir, cli, tmp_path):
    out = tmp_path / "offline.json"
    args = ["bench", "offline", tiny_dir(), "--batch-sizes", "1,4", "--input-len", "8,24",
            "--output-len", "6", "-o", out]  # fmt: skip
    assert cli(*args, "--assert", "output_throughput>0").code == 0
    report = json.loads(out.read_text())
    assert [(c["batch_size"], c["input_len"]) for c in report["cases"]] == [
        (1, 8), (1, 24), (4, 8), (4, 24),
    ]  # fmt: skip
    for c in report["cases"]:
        assert c["output_throughput"] * c["seconds"] == pytest.approx(c["batch_size"] * 6)
        assert c["mean_ttft_ms"] > 0 and c["mean_tpot_ms"] > 0 and c["decode_throughput"] > 0
    assert report["load_s"] > 0 and report["peak_rss_mb"] > 0
    missed = cli(*args, "--assert", "load_s<=0")
    assert missed.code == THRESHOLD_MISSED and "load_s" in missed.err
    assert cli(*args, "--assert", "kld<=1").code == 1  # not a metric of this command


def test_offline_reports_speculation_and_a_draft_models_cutoff(tiny_dir, cli, tmp_path):
    """The model as its own draft: each case's draft counts, and the draft cutoff (measured:
    its step time over the model's), in the JSON and the printed line."""
    model, out = tiny_dir(), tmp_path / "offline.json"
    result = cli("bench", "offline", model, "--batch-sizes", "1", "--input-len", "8",
                 "--output-len", "12", "--speculative", model, "-o", out)  # fmt: skip
    assert result.code == 0, result.err
    (case,) = json.loads(out.read_text())["cases"]
    assert case["speculative"] == "draft" and case["spec_proposed_tokens"] > 0
    assert 0 < case["spec_draft_cutoff"] <= 1
    rates = case["spec_acceptance_by_position"]
    assert rates and all(0 <= rate <= 1 for rate in rates) and "(by position: " in result.out
    assert f"drafts end below a chance of {case['spec_draft_cutoff']:.2f}" in result.out


def test_decode_phase_counts_the_tokens_after_every_request_has_its_first(monkeypatch):
    from types import SimpleNamespace

    from llmkit.bench import offline

    clock = iter([1.0, 2.0, 3.0, 5.0, 9.0])
    monkeypatch.setattr(offline.time, "perf_counter", lambda: next(clock))
    phase = offline.DecodePhase(3)

    def out(request_id: str, tokens: int):  # a request's output after a step
        return SimpleNamespace(
            request_id=request_id, outputs=[SimpleNamespace(token_ids=[0] * tokens)]
        )

    phase.step([out("a", 1)])  # a's first token
    phase.step([out("a", 2), out("b", 1)])  # b's first token; a decodes beside the prefills
    assert phase.throughput() == 0.0
    phase.step([out("a", 3), out("b", 2), out("c", 1)])  # c's first: the decode phase starts
    phase.step([out("a", 4), out("b", 3), out("c", 2)])
    phase.step([out("b", 6), out("c", 3)])  # a has finished; b verified a draft (+3)
    assert phase.throughput() == 7 / (9.0 - 3.0)


def test_compare_puts_checkpoints_side_by_side(tiny_dir, cli, tmp_path):
    reference = tiny_dir()
    int8 = tmp_path / "int8"
    assert cli("quantize", reference, int8, "--method", "int8").code == 0
    out, png = tmp_path / "compare.json", tmp_path / "compare.png"
    extra = ["--plot", png] if _has_matplotlib() else []
    result = cli("bench", "compare", reference, int8, "--concurrency", "4", "--input-len", "8",
                 "--output-len", "4", "--num-windows", "4", "--seq-len", "64", "-o", out,
                 "--assert", "top1_agreement>=0.5", *extra)  # fmt: skip
    assert result.code == 0, result.err
    rows = json.loads(out.read_text())["rows"]
    assert [r["name"] for r in rows] == [str(reference), str(int8)]
    assert rows[0]["kld_mean"] == 0 and rows[0]["top1_agreement"] == 1
    assert rows[1]["kld_mean"] > 0
    sizes = [sum(f.stat().st_size for f in p.glob("*.safetensors")) for p in (reference, int8)]
    assert [r["size_bytes"] for r in rows] == sizes and sizes[1] < sizes[0]
    assert all(r["decode_tokens_per_s"] > 0 and r["output_throughput"] > 0 for r in rows)
    if extra:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _has_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def test_the_cli_and_the_recipe_share_their_defaults():
    import inspect

    from llmkit.bench.compare import CompareSpec
    from llmkit.bench.offline import OfflineSpec
    from llmkit.cli import bench_offline
    from llmkit.recipe import schema

    offline, compare = OfflineSpec(), CompareSpec()
    cli = inspect.signature(bench_offline.offline).parameters
    assert [cli[n].default for n in ("batch_sizes", "input_len", "output_len")] == [
        ",".join(map(str, v))
        for v in (offline.batch_sizes, offline.input_lens, offline.output_lens)
    ]
    step = schema.Offline()
    assert (step.batch_sizes, step.input_len, step.output_len) == (
        list(offline.batch_sizes),
        list(offline.input_lens),
        list(offline.output_lens),
    )
    cli = inspect.signature(bench_offline.compare).parameters
    step = schema.Compare(checkpoints=["a", "b"])
    for name in ("concurrency", "input_len", "output_len", "num_windows", "seq_len"):
        assert cli[name].default == getattr(step, name)
    assert [getattr(compare, n) for n in ("concurrency", "input_len", "output_len")] == [
        step.concurrency,
        step.input_len,
        step.output_len,
    ]
    from llmkit.cli import bench as bench_cli
    from llmkit.cli import shard as shard_cli

    cli = inspect.signature(bench_cli.quality).parameters
    step = schema.Quality(candidates=["a"])
    assert (cli["num_windows"].default, cli["seq_len"].default) == (step.num_windows, step.seq_len)
    cli = inspect.signature(shard_cli.shard).parameters
    assert cli["vocab_pad"].default == schema.Shard().vocab_pad


def test_a_spec_that_cannot_run_is_refused_before_anything_loads():
    from llmkit.bench.compare import CompareSpec
    from llmkit.bench.offline import OfflineSpec
    from llmkit.errors import LlmkitError

    with pytest.raises(LlmkitError, match="at least 1"):
        OfflineSpec(batch_sizes=(0,)).cases()
    with pytest.raises(LlmkitError, match="output-len >= 2"):
        CompareSpec(output_len=1).offline()
