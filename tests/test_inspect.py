"""`llmkit inspect`: the JSON schema, and numbers checked against transformers."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from llmkit.checkpoint import dtypes
from llmkit.checkpoint.safetensors_io import TensorSpec
from llmkit.checkpoint.writer import write_checkpoint
from tests.conftest import TINY_PRESETS

SCHEMA = {
    "path": str,
    "format": str,
    "architecture": str,
    "model_type": str,
    "config": dict,
    "num_parameters": int,
    "num_tensors": int,
    "dtypes": dict,
    "size_on_disk": int,
    "shards": list,
    "quantization": (dict, type(None)),
    "tokenizer": dict,
    "modules": list,
}


@pytest.mark.parametrize("preset", TINY_PRESETS)
def test_inspect_json_schema_and_values(cli, tiny_dir, preset):
    path = tiny_dir(preset)
    result = cli("inspect", path, "--json")
    assert result.code == 0, result.err
    report = json.loads(result.out)
    assert set(report) == set(SCHEMA)
    for key, kind in SCHEMA.items():
        assert isinstance(report[key], kind), key
    model = AutoModelForCausalLM.from_pretrained(path)
    assert report["num_parameters"] == sum(p.numel() for p in model.parameters())
    assert report["architecture"] == model.config.architectures[0]
    assert report["tokenizer"]["vocab_size"] == len(AutoTokenizer.from_pretrained(path))
    assert report["tokenizer"]["chat_template"] is True
    assert report["dtypes"] == {
        "float32": {"num_tensors": report["num_tensors"], "bytes": 4 * report["num_parameters"]}
    }
    assert sum(s["num_tensors"] for s in report["shards"]) == report["num_tensors"]
    for module in report["modules"]:
        assert set(module) == {"module", "count", "tensors", "dtypes", "num_parameters"}
    layers = {m["module"]: m for m in report["modules"]}
    q = layers["model.layers.*.self_attn.q_proj"]
    assert q["count"] == model.config.num_hidden_layers
    assert q["tensors"]["weight"] == [[model.config.hidden_size, model.config.hidden_size]]


def test_inspect_human_output(cli, tiny_dir):
    result = cli("inspect", tiny_dir("tiny-qwen2"))
    assert result.code == 0
    assert "Qwen2ForCausalLM" in result.out
    assert "model.layers.*.self_attn.q_proj" in result.out


def test_packed_quantized_weights_count_as_parameters(cli, tmp_path):
    # A GPTQ-style layer: 4-bit weights packed 8 per int32, plus side tensors.
    tensors = {
        "layer.qweight": torch.zeros(8, 64, dtype=torch.int32),
        "layer.qzeros": torch.zeros(1, 8, dtype=torch.int32),
        "layer.scales": torch.zeros(1, 64, dtype=torch.float16),
        "layer.g_idx": torch.zeros(64, dtype=torch.int32),
    }
    specs = [
        TensorSpec(n, dtypes.from_torch(t.dtype), tuple(t.shape), lambda t=t: [t])
        for n, t in tensors.items()
    ]
    config = {"quantization_config": {"quant_method": "gptq", "bits": 4, "group_size": 64}}
    write_checkpoint(tmp_path / "q", specs, config)
    report = json.loads(cli("inspect", tmp_path / "q", "--json").out)
    assert report["num_parameters"] == 64 * 64
    assert report["quantization"]["quant_method"] == "gptq"
