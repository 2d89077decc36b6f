"""`llmkit init`: presets load in transformers, tokenizers work, seeds are reproducible."""

from __future__ import annotations

import hashlib

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from llmkit.checkpoint.init import PRESETS, count_parameters, init_checkpoint
from llmkit.checkpoint.reader import open_checkpoint
from llmkit.errors import LlmkitError
from tests.conftest import TINY_PRESETS


def file_hashes(directory) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in directory.iterdir()}


@pytest.mark.parametrize("preset", TINY_PRESETS)
def test_preset_loads_in_transformers_without_missing_weights(tiny_dir, preset):
    model, info = AutoModelForCausalLM.from_pretrained(tiny_dir(preset), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    shape = PRESETS[preset]
    assert model.config.num_key_value_heads < model.config.num_attention_heads  # GQA
    assert model.config.hidden_size == shape.hidden_size
    assert model.config.vocab_size == shape.vocab_size
    logits = model(torch.tensor([[1, 50, 60, 70]])).logits
    assert logits.shape == (1, 4, shape.vocab_size) and torch.isfinite(logits).all()


@pytest.mark.parametrize("preset", TINY_PRESETS)
def test_tokenizer_round_trip_and_chat_template(tiny_dir, preset):
    tok = AutoTokenizer.from_pretrained(tiny_dir(preset))
    text = "Ada found 12 small cats near the river. Ünïcode too!"
    ids = tok(text)["input_ids"]
    assert ids[0] == tok.bos_token_id
    assert tok.decode(ids, skip_special_tokens=True) == text
    assert len(tok) == PRESETS[preset].vocab_size
    chat = tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False
    )
    assert chat == "<|user|>\nhi</s>\n<|assistant|>\n"


def test_qwen2_has_qkv_bias_and_tied_embeddings(tiny_dir):
    with open_checkpoint(tiny_dir("tiny-qwen2")) as ck:
        assert "lm_head.weight" not in ck.tensors
        bias = ck.get_tensor("model.layers.0.self_attn.q_proj.bias")
        assert bias.abs().sum() > 0  # varied, so a dropped bias changes outputs
    model = AutoModelForCausalLM.from_pretrained(tiny_dir("tiny-qwen2"))
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_norms_are_not_all_ones(tiny_dir):
    with open_checkpoint(tiny_dir("tiny-llama")) as ck:
        norm = ck.get_tensor("model.layers.0.input_layernorm.weight")
    assert not torch.allclose(norm, torch.ones_like(norm))


def test_same_seed_same_bytes_other_seed_other_weights(tmp_path, tiny_dir):
    again = init_checkpoint(tmp_path / "again", "tiny-llama", seed=0).path
    assert file_hashes(again) == file_hashes(tiny_dir("tiny-llama"))
    other = init_checkpoint(tmp_path / "other", "tiny-llama", seed=1).path
    assert file_hashes(other)["model.safetensors"] != file_hashes(again)["model.safetensors"]
    assert file_hashes(other)["tokenizer.json"] == file_hashes(again)["tokenizer.json"]


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_init_dtype(tmp_path, dtype):
    path = init_checkpoint(tmp_path / "m", "tiny-mistral", dtype=dtype).path
    model = AutoModelForCausalLM.from_pretrained(path)
    assert str(model.dtype) == f"torch.{dtype}"


def test_small_llama_parameter_count():
    shape = PRESETS["small-llama"]
    h, i, v, n = (
        shape.hidden_size,
        shape.intermediate_size,
        shape.vocab_size,
        shape.num_hidden_layers,
    )
    kv = h // shape.num_attention_heads * shape.num_key_value_heads
    per_layer = 2 * h * h + 2 * h * kv + 3 * h * i + 2 * h
    assert count_parameters("small-llama") == n * per_layer + 2 * v * h + h


def test_unknown_preset_and_dtype_are_refused(tmp_path):
    with pytest.raises(LlmkitError, match="unknown preset"):
        init_checkpoint(tmp_path / "a", "huge-llama")
    with pytest.raises(LlmkitError, match="unknown dtype"):
        init_checkpoint(tmp_path / "b", "tiny-llama", dtype="int8")
    assert list(tmp_path.iterdir()) == []
