"""`llmkit bench quality`: perplexity, KLD and top-1 agreement against independent math."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from llmkit.bench.quality import eval_windows, evaluate_quality
from llmkit.quant.calibration import CalibrationSpec
from llmkit.quant.pipeline import quantize

DATA = CalibrationSpec(seq_len=32, seed=1)


@pytest.fixture(scope="module")
def int8_copy(tiny_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("int8") / "q"
    quantize(tiny_dir("tiny-llama"), out, "int8")
    return out


def test_metrics_against_transformers(tiny_dir, int8_copy):
    pytest.importorskip("compressed_tensors", reason="the test extra is not installed")
    ref_path = tiny_dir("tiny-llama")
    rows = evaluate_quality(ref_path, [int8_copy], DATA, num_windows=6)
    ids = eval_windows(ref_path, DATA, 6)
    assert ids.shape == (6, 32)
    ref_model = AutoModelForCausalLM.from_pretrained(ref_path)
    cand_model = AutoModelForCausalLM.from_pretrained(int8_copy)
    with torch.no_grad():
        losses = [float(ref_model(w[None], labels=w[None]).loss) for w in ids]
        ref_logp = F.log_softmax(ref_model(ids).logits[:, :-1].double(), -1)
        cand_logp = F.log_softmax(cand_model(ids).logits[:, :-1].double(), -1)
    reference, candidate = rows
    assert reference.num_tokens == candidate.num_tokens == 6 * 31
    assert reference.perplexity == pytest.approx(math.exp(sum(losses) / len(losses)), rel=1e-5)
    assert reference.kld_mean == 0 and reference.top1_agreement == 1
    kld = F.kl_div(cand_logp, ref_logp, log_target=True, reduction="none").sum(-1)
    assert candidate.kld_mean == pytest.approx(float(kld.mean()), rel=1e-4, abs=1e-9)
    assert candidate.kld_p99 == pytest.approx(float(torch.quantile(kld.flatten(), 0.99)), rel=1e-3)
    agree = (cand_logp.argmax(-1) == ref_logp.argmax(-1)).double().mean()
    assert candidate.top1_agreement == pytest.approx(float(agree))
    assert candidate.kld_mean > 0


def test_cli_bench_quality_json(cli, tiny_dir, int8_copy):
    result = cli(
        "bench",
        "quality",
        tiny_dir("tiny-llama"),
        int8_copy,
        "--seq-len",
        "32",
        "--num-windows",
        "3",
        "--json",
    )
    assert result.code == 0, result.err
    report = json.loads(result.out)
    assert report["seq_len"] == 32 and len(report["rows"]) == 2
    for row in report["rows"]:
        assert set(row) == {
            "name",
            "perplexity",
            "kld_mean",
            "kld_p99",
            "top1_agreement",
            "num_tokens",
            "backend",
            "error",
        }
        assert row["backend"] == "runtime"  # llama: scored on llmkit's own kernels
    assert report["rows"][1]["name"] == str(int8_copy)


def test_architectures_the_runtime_does_not_run_are_scored_through_transformers(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    from llmkit.bench.quality import scorer

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=96, n_embd=32, n_layer=2, n_head=2, n_positions=64)
    model = GPT2LMHeadModel(config).eval()
    model.save_pretrained(tmp_path)
    ids = torch.randint(0, 96, (2, 10))
    got = scorer(tmp_path, 10)
    assert got.backend == "transformers" and got.vocab_size == 96
    with torch.no_grad():
        want = torch.log_softmax(model(ids).logits.double(), dim=-1)
        assert torch.allclose(got.logprobs(ids), want, atol=1e-5)


def test_cli_bench_quality_thresholds_apply_to_the_candidates(cli, tiny_dir, int8_copy, tmp_path):
    out = tmp_path / "q.json"
    args = ["bench", "quality", tiny_dir("tiny-llama"), int8_copy, "--seq-len", "32",
            "--num-windows", "3", "-o", out]  # fmt: skip
    kld = json.loads(cli(*args, "--json").out)["rows"][1]["kld_mean"]
    assert cli(*args, "--assert", f"kld_mean<={kld * 1.01}").code == 0
    missed = cli(*args, "--assert", f"kld_mean<={kld * 0.99}", "--assert", "top1_agreement>=0")
    assert missed.code == 3 and f"{int8_copy}: kld_mean" in missed.err
    assert json.loads(out.read_text())["asserts"]["missed"] == [
        missed.err.split(": ", 2)[2].strip()
    ]


def test_cli_bench_quality_rejects_other_vocabularies(cli, tiny_dir):
    result = cli(
        "bench",
        "quality",
        tiny_dir("tiny-llama"),
        tiny_dir("tiny-mistral"),
        "--seq-len",
        "32",
        "--num-windows",
        "1",
    )
    assert result.code == 1 and "vocabulary of 500" in result.err


def test_an_unreadable_candidate_is_reported_after_the_others_are_scored(
    cli, tiny_dir, int8_copy, tmp_path
):
    """A candidate whose tensors contradict their layout (a scale per pair of inputs where
    the format has one per output) is one error line naming the tensor and the layout; the
    readable candidates before and after it are scored, and the exit code is not 0."""
    import shutil

    from safetensors.torch import load_file, save_file

    broken = tmp_path / "broken"
    shutil.copytree(int8_copy, broken)
    (weights,) = broken.glob("*.safetensors")
    tensors = load_file(weights)
    name = "model.layers.0.mlp.down_proj.weight_scale"
    tensors[name] = tensors[name].reshape(-1)[:7].clone()  # 7 scales for 64 outputs
    save_file(tensors, weights, metadata={"format": "pt"})
    (broken / "llmkit-checksums.json").unlink(missing_ok=True)
    args = ["--seq-len", "32", "--num-windows", "2", "--json"]
    result = cli("bench", "quality", tiny_dir("tiny-llama"), int8_copy, broken, int8_copy, *args)
    assert result.code == 1
    errors = [line for line in result.err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "model.layers.0.mlp.down_proj" in errors[0], result.err
    assert "compressed-tensors" in errors[0]
    rows = json.loads(result.out)["rows"]
    assert [r["error"] is None for r in rows] == [True, True, False, True]
    assert rows[1]["kld_mean"] == rows[3]["kld_mean"] >= 0


def test_engine_kernels_score_as_served_and_name_the_kernels(cli, tiny_dir, int8_copy):
    args = ["--seq-len", "32", "--num-windows", "2", "--json"]
    exact = json.loads(cli("bench", "quality", tiny_dir("tiny-llama"), int8_copy, *args).out)
    served = cli("bench", "quality", tiny_dir("tiny-llama"), int8_copy, "--engine-kernels", *args)
    rows = json.loads(served.out)["rows"]
    assert exact["rows"][1]["backend"] == rows[0]["backend"] == "runtime"  # the reference: exact
    assert rows[1]["backend"].startswith("runtime kernels: ") and "Int8Linear" in rows[1]["backend"]
    # 2 windows of 32 tokens run through the int8 kernel, whose int8 activations show
    assert rows[1]["kld_mean"] > 0 and rows[1]["kld_mean"] != exact["rows"][1]["kld_mean"]
