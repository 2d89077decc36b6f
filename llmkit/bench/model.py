"""Build a transformers model computing exactly what a (possibly quantized) checkpoint
encodes: dequantized weights, and per-token int8 inputs where the format asks for them."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from llmkit.checkpoint.reader import open_checkpoint
from llmkit.errors import LlmkitError
from llmkit.quant.formats.loader import dequantized_state
from llmkit.quant.methods.dense import per_token_int8_hook
from llmkit.quant.sequential import build_skeleton


def load_model(path: str | Path, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The model of checkpoint `path` in `dtype`, on the CPU, in eval mode."""
    with open_checkpoint(path) as ck:
        state, act_quant = dequantized_state(ck)
        model = build_skeleton(ck.config)
    state = {name: t.to(dtype) for name, t in state.items()}
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    tied = {"lm_head.weight"} if model.config.tie_word_embeddings else set()
    if set(missing) - tied or unexpected:
        raise LlmkitError(
            f"{path} does not match its config: missing {sorted(set(missing) - tied)[:3]}, "
            f"unexpected {sorted(unexpected)[:3]}"
        )
    model.tie_weights()
    _restore_buffers(model)
    for name in act_quant:
        model.get_submodule(name).register_forward_pre_hook(per_token_int8_hook)
    return model.eval()


def _restore_buffers(model: nn.Module) -> None:
    """Non-persistent buffers (rotary frequencies) are not in checkpoints: rebuild them."""
    for name, module in model.named_modules():
        if any(b.is_meta for b in module.buffers(recurse=False)):
            rebuilt = type(module)(model.config) if hasattr(module, "rope_type") else None
            if rebuilt is None:
                raise LlmkitError(f"cannot rebuild buffers of {name}")
            for buffer_name, buffer in rebuilt.named_buffers(recurse=False):
                setattr(module, buffer_name, buffer)
