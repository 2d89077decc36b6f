"""`llmkit shard --layout vllm`: vLLM's sharded-state files, unfused and reassembled by an
independent reader, give back the source tensors exactly."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from llmkit.errors import LlmkitError
from llmkit.shard.vllm_layout import write_vllm_layout
from tests.conftest import TINY_PRESETS


def rank_tensors(out, tp: int) -> list[dict[str, torch.Tensor]]:
    ranks = []
    for r in range(tp):
        files = sorted(out.glob(f"model-rank-{r}-part-*.safetensors"))
        assert files, f"no files for rank {r}"
        tensors = {}
        for f in files:
            tensors.update(load_file(f))
        ranks.append(tensors)
    return ranks


def unfuse(ranks, config: dict, tp: int) -> dict[str, torch.Tensor]:
    """The full HF tensors from vLLM's per-rank fused ones (written here from the layout's
    definition: q/k/v rows per rank, kv heads replicated when tp exceeds them)."""
    heads, kv = config["num_attention_heads"], config.get("num_key_value_heads")
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    q_rows, kv_rows = heads // tp * head_dim, max(kv // tp, 1) * head_dim
    full: dict[str, list] = {}
    for r, tensors in enumerate(ranks):
        for name, t in tensors.items():
            if ".qkv_proj." in name:
                parts = t.split([q_rows, kv_rows, kv_rows])
                for proj, part in zip(("q_proj", "k_proj", "v_proj"), parts, strict=True):
                    if proj != "q_proj" and kv < tp and r % (tp // kv):
                        continue  # a replica of the previous rank's kv head
                    full.setdefault(name.replace("qkv_proj", proj), []).append((0, part))
            elif ".gate_up_proj." in name:
                gate, up = t.chunk(2)
                full.setdefault(name.replace("gate_up_proj", "gate_proj"), []).append((0, gate))
                full.setdefault(name.replace("gate_up_proj", "up_proj"), []).append((0, up))
            elif name.endswith(("o_proj.weight", "down_proj.weight")):
                full.setdefault(name, []).append((1, t))
            elif name in ("lm_head.weight", "model.embed_tokens.weight"):
                full.setdefault(name, []).append((0, t))
            elif r == 0:
                full[name] = [(None, t)]
    return {
        n: parts[0][1] if parts[0][0] is None else torch.cat([p for _, p in parts], parts[0][0])
        for n, parts in full.items()
    }


@pytest.mark.parametrize("preset", TINY_PRESETS)
@pytest.mark.parametrize("tp", [1, 2, 4])
def test_vllm_layout_reassembles_to_the_source(tiny_dir, tmp_path, preset, tp):
    src = tiny_dir(preset)
    config = json.loads((src / "config.json").read_text())
    out = tmp_path / "v"
    write_vllm_layout(src, out, tp, "5GB")
    source = load_file(next(src.glob("*.safetensors")))
    got = unfuse(rank_tensors(out, tp), config, tp)
    vocab = config["vocab_size"]
    padded = -(-vocab // 64) * 64
    for name in ("lm_head.weight", "model.embed_tokens.weight"):
        if name in got:
            assert got[name].shape[0] == padded and not got[name][vocab:].any()
            got[name] = got[name][:vocab]
    scales = [n for n in got if n.endswith(("_k_scale", "_v_scale", "_q_scale", "_prob_scale"))]
    assert len(scales) == 4 * config["num_hidden_layers"]
    assert all(got.pop(n).item() == 1.0 for n in scales)
    if config.get("tie_word_embeddings"):  # vLLM keeps the shared tensor as lm_head only
        assert "model.embed_tokens.weight" not in got
        got["model.embed_tokens.weight"] = got.pop("lm_head.weight")
    assert set(got) == set(source)
    for name, tensor in source.items():
        assert torch.equal(got[name], tensor), name
    assert (out / "tokenizer.json").is_file() and (out / "config.json").is_file()


def test_vllm_layout_refuses_what_vllm_could_not_load(tiny_dir, tmp_path, cli):
    with pytest.raises(LlmkitError, match="does not divide num_attention_heads"):
        write_vllm_layout(tiny_dir(), tmp_path / "a", 3, "5GB")
    quantized = tmp_path / "q"
    assert cli("quantize", tiny_dir(), quantized, "--method", "int8").code == 0
    with pytest.raises(LlmkitError, match="full-precision"):
        write_vllm_layout(quantized, tmp_path / "b", 2, "5GB")
    result = cli("shard", tiny_dir(), tmp_path / "c", "--tp", "2", "--pp", "2", "--layout", "vllm")
    assert result.code == 1 and "tensor parallelism only" in result.err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_vllm_layout_files_are_split_past_the_size_limit(tiny_dir, tmp_path):
    out = tmp_path / "v"
    write_vllm_layout(tiny_dir(), out, 2, "100KB")
    parts = sorted(p.name for p in out.glob("model-rank-0-part-*.safetensors"))
    assert len(parts) > 1 and parts[0] == "model-rank-0-part-0.safetensors"
    with safe_open(out / parts[0], "pt") as f:
        assert f.metadata() == {"format": "pt"}
