"""A tensor-parallel forward pass emulated on CPU from the shards equals the unsharded one.

Each rank computes with its own tensors only: vocab-parallel embedding (ids outside the
rank's rows give zeros, summed over ranks), column-parallel q/k/v and gate/up on the rank's
heads and columns, row-parallel o/down partial products summed over ranks (the all-reduce),
vocab-parallel lm_head logits concatenated and the padding cut.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from llmkit.checkpoint.manifest import read_manifest
from llmkit.checkpoint.safetensors_io import read_header, read_rows
from llmkit.shard.write import shard


def rank_state(sharded: Path, tp_rank: int) -> dict[str, torch.Tensor]:
    state = {}
    for file in sorted(sharded.glob(f"rank-{tp_rank}-0*.safetensors")):
        with file.open("rb") as f:
            for name, info in read_header(file)[0].items():
                state[name] = read_rows(f, info, 0, info.shape[0] if info.shape else 1)
    return state


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def linear(x: torch.Tensor, w: dict, name: str) -> torch.Tensor:
    return F.linear(x, w[f"{name}.weight"], w.get(f"{name}.bias"))


def embed(ids: torch.Tensor, table: torch.Tensor, offset: int) -> torch.Tensor:
    local = ids - offset
    inside = (local >= 0) & (local < table.shape[0])
    return table[local.clamp(0, table.shape[0] - 1)] * inside[:, None]


def attention(h, w, prefix, config, cos, sin):
    """One rank's attention partial product: [T, hidden] (before the sum over ranks)."""
    d = (
        config.head_dim
        if getattr(config, "head_dim", None)
        else config.hidden_size // config.num_attention_heads
    )
    q = linear(h, w, prefix + "q_proj").view(h.shape[0], -1, d)
    k = linear(h, w, prefix + "k_proj").view(h.shape[0], -1, d)
    v = linear(h, w, prefix + "v_proj").view(h.shape[0], -1, d)
    if prefix + "q_norm.weight" in w:  # Qwen3
        q = rms_norm(q, w[prefix + "q_norm.weight"], config.rms_norm_eps)
        k = rms_norm(k, w[prefix + "k_norm.weight"], config.rms_norm_eps)
    q, k = apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos, sin)
    v = v.transpose(0, 1)[None]
    repeat = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # [1, heads, T, d]
    out = out[0].transpose(0, 1).reshape(h.shape[0], -1)
    return F.linear(out, w[prefix + "o_proj.weight"])


def tp_forward(sharded: Path, model, ids: torch.Tensor) -> torch.Tensor:
    config = model.config
    manifest = read_manifest(sharded)
    ranks = [rank_state(sharded, r) for r in range(manifest.tp)]
    plans = manifest.plans
    eps = config.rms_norm_eps
    offsets = [s.offset for s in plans["model.embed_tokens.weight"].slices]
    x = sum(
        embed(ids, w["model.embed_tokens.weight"], o) for w, o in zip(ranks, offsets, strict=True)
    )
    cos, sin = model.model.rotary_emb(x[None], torch.arange(len(ids))[None])
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        h = rms_norm(x, ranks[0][p + "input_layernorm.weight"], eps)
        x = x + sum(attention(h, w, p + "self_attn.", config, cos, sin) for w in ranks)
        if p + "self_attn.o_proj.bias" in ranks[0]:
            x = x + ranks[0][p + "self_attn.o_proj.bias"]  # once, after the sum
        h = rms_norm(x, ranks[0][p + "post_attention_layernorm.weight"], eps)
        m = p + "mlp."
        x = x + sum(
            F.linear(
                F.silu(linear(h, w, m + "gate_proj")) * linear(h, w, m + "up_proj"),
                w[m + "down_proj.weight"],
            )
            for w in ranks
        )
    x = rms_norm(x, ranks[0]["model.norm.weight"], eps)
    head = "lm_head.weight" if "lm_head.weight" in ranks[0] else "model.embed_tokens.weight"
    logits = torch.cat([F.linear(x, w[head]) for w in ranks], dim=-1)
    return logits[:, : config.vocab_size]


@pytest.mark.parametrize(
    ("preset", "tp"),
    [
        ("tiny-llama", 2),
        ("tiny-llama", 4),
        ("tiny-qwen2", 2),
        ("tiny-qwen3", 2),
        ("tiny-mistral", 2),
    ],
)
def test_tp_forward_from_shards_equals_the_unsharded_forward(preset, tp, tiny_dir, tmp_path):
    src = tiny_dir(preset)
    shard(src, tmp_path / "s", tp=tp)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    ids = torch.randint(
        0, model.config.vocab_size, (24,), generator=torch.Generator().manual_seed(0)
    )
    with torch.no_grad():
        expected = model(ids[None]).logits[0]
        actual = tp_forward(tmp_path / "s", model, ids)
    assert actual.shape == expected.shape
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4)
