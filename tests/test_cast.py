"""`llmkit quantize --method fp16|bf16`: streaming casts that transformers loads."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from llmkit.checkpoint import dtypes
from llmkit.checkpoint.reader import open_checkpoint
from llmkit.checkpoint.safetensors_io import TensorSpec
from llmkit.checkpoint.writer import write_checkpoint
from llmkit.errors import LlmkitError
from llmkit.quant.fp16 import cast
from llmkit.quant.pipeline import quantize

PROMPT = torch.tensor([[1, 40, 41, 42, 100, 7, 300, 12, 5, 77, 90, 200]])


def logits_of(path, dtype=None) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    with torch.no_grad():
        return model(PROMPT).logits.float()


@pytest.mark.parametrize(("method", "dtype"), [("fp16", torch.float16), ("bf16", torch.bfloat16)])
@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-qwen2"])
def test_cast_logits_match_original(tiny_dir, tmp_path, preset, method, dtype):
    reference = logits_of(tiny_dir(preset))
    out = tmp_path / method
    quantize(tiny_dir(preset), out, method)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.dtype == dtype
    with torch.no_grad():
        got = model(PROMPT).logits.float()
    # Errors in units of the format's epsilon, relative to the logits' scale: computing in
    # half precision costs a few eps through two layers; weight rounding alone, less.
    eps = torch.finfo(dtype).eps * reference.abs().max()
    assert (got - reference).abs().max() <= 5 * eps
    upcast = logits_of(out, dtype=torch.float32)
    assert (upcast - reference).abs().max() <= 3 * eps
    assert (got.argmax(-1) == reference.argmax(-1)).float().mean() >= 0.9


def test_cast_writes_dtype_and_copies_tokenizer(tiny_dir, tmp_path):
    src = tiny_dir("tiny-llama")
    report = quantize(src, tmp_path / "o", "bf16")
    config = json.loads((tmp_path / "o" / "config.json").read_text())
    assert config["torch_dtype"] == config["dtype"] == "bfloat16"
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (tmp_path / "o" / name).read_bytes() == (src / name).read_bytes()
    assert report.bytes_out * 2 == report.bytes_in
    with open_checkpoint(src) as a, open_checkpoint(tmp_path / "o") as b:
        for name in a.tensors:
            assert torch.equal(b.get_tensor(name), a.get_tensor(name).bfloat16())


def write_model_with(tmp_path, tensors: dict[str, torch.Tensor]):
    specs = [
        TensorSpec(n, dtypes.from_torch(t.dtype), tuple(t.shape), lambda t=t: [t])
        for n, t in tensors.items()
    ]
    return write_checkpoint(tmp_path / "src", specs, {"model_type": "llama"}).path


def test_fp16_overflow_is_refused_naming_the_tensor(tmp_path):
    big = torch.ones(4, 4)
    big[2, 3] = 1e5
    src = write_model_with(tmp_path, {"fine": torch.ones(3), "layer.big": big})
    with pytest.raises(LlmkitError, match=r"'layer\.big'.*--clamp"):
        quantize(src, tmp_path / "o", "fp16")
    assert not (tmp_path / "o").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_clamp_saturates_and_reports(tmp_path):
    big = torch.tensor([1.0, -7e4, 1e5, 65504.0, float("inf")])
    src = write_model_with(tmp_path, {"big": big})
    report = quantize(src, tmp_path / "o", "fp16", clamp=True)
    assert report.clamped == {"big": 2}
    with open_checkpoint(tmp_path / "o") as ck:
        got = ck.get_tensor("big")
    expected = torch.tensor([1.0, -65504.0, 65504.0, 65504.0, float("inf")], dtype=torch.float16)
    assert torch.equal(got, expected)


def test_bf16_keeps_large_values(tmp_path):
    src = write_model_with(tmp_path, {"big": torch.tensor([1e5, -3e38])})
    quantize(src, tmp_path / "o", "bf16")
    with open_checkpoint(tmp_path / "o") as ck:
        assert torch.isfinite(ck.get_tensor("big")).all()


def test_integer_tensors_pass_through(tmp_path):
    ints = torch.arange(-50, 50, dtype=torch.int32).reshape(10, 10)
    src = write_model_with(tmp_path, {"ids": ints, "w": torch.randn(3, 3, dtype=torch.float64)})
    report = quantize(src, tmp_path / "o", "fp16")
    assert report.num_converted == 1
    with open_checkpoint(tmp_path / "o") as ck:
        assert torch.equal(ck.get_tensor("ids"), ints)
        assert ck.get_tensor("w").dtype == torch.float16


def test_cast_detects_overflow_hidden_behind_nan():
    x = torch.tensor([float("nan"), 1e6, 1.0])
    result, over = cast(x, torch.float16)
    assert over == 1 and torch.isinf(result[1])


def test_quantized_source_and_same_output_are_refused(tiny_dir, tmp_path):
    src = tiny_dir("tiny-llama")
    with pytest.raises(LlmkitError, match="is the source"):
        quantize(src, src, "fp16", overwrite=True)
    q = write_model_with(tmp_path, {"w": torch.ones(2)})
    config = json.loads((q / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (q / "config.json").write_text(json.dumps(config))
    with pytest.raises(LlmkitError, match="already quantized"):
        quantize(q, tmp_path / "o", "bf16")


def test_cli_quantize_json_and_sharding(cli, tiny_dir, tmp_path):
    result = cli(
        "quantize",
        tiny_dir("tiny-llama"),
        tmp_path / "o",
        "--method",
        "fp16",
        "--max-shard-size",
        "100KB",
        "--json",
    )
    assert result.code == 0, result.err
    report = json.loads(result.out)
    assert report["method"] == "fp16" and len(report["shards"]) > 1
    assert (tmp_path / "o" / "model.safetensors.index.json").is_file()
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "o")
    assert model.dtype == torch.float16


def test_cli_refuses_existing_output_then_overwrites(cli, tiny_dir, tmp_path):
    assert cli("quantize", tiny_dir("tiny-llama"), tmp_path / "o", "--method", "fp16").code == 0
    result = cli("quantize", tiny_dir("tiny-llama"), tmp_path / "o", "--method", "bf16")
    assert result.code == 1 and "--overwrite" in result.err
    result = cli(
        "quantize", tiny_dir("tiny-llama"), tmp_path / "o", "--method", "bf16", "--overwrite"
    )
    assert result.code == 0
    assert json.loads((tmp_path / "o" / "config.json").read_text())["dtype"] == "bfloat16"
