"""A llama-family decoder layer cut into the pieces GPTQ's stages need, so each stage's
inputs are computed from the previous stage's results instead of from the layer's input:

    h = x + attention(input_norm(x))     # o_proj is attention's last step
    y = h + mlp(post_norm(h))            # down_proj is mlp's last step

Running the whole layer once per stage costs ~2.2x more arithmetic (llama shapes)."""

from __future__ import annotations

import torch
from torch import nn

from llmkit.quant.arch import Arch


class _Captured(Exception):
    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor


def _capture(module: nn.Module, args: tuple) -> None:
    raise _Captured(args[0])


def input_of(last: nn.Module, block: nn.Module, *args, **kwargs) -> torch.Tensor:
    """Run `block` only until its submodule `last` is called; return `last`'s input."""
    handle = last.register_forward_pre_hook(_capture)
    try:
        block(*args, **kwargs)
    except _Captured as captured:
        return captured.tensor
    finally:
        handle.remove()
    raise RuntimeError(f"{type(block).__name__} never called {type(last).__name__}")


def attention_core(layer: nn.Module, arch: Arch, x: torch.Tensor, rope) -> torch.Tensor:
    """o_proj's input: attention over input_norm(x), before the output projection."""
    attention = layer.get_submodule(arch.attention)
    normed = layer.get_submodule(arch.input_norm)(x)
    o_proj = layer.get_submodule(arch.stages[1][0])
    return input_of(
        o_proj, attention, hidden_states=normed, position_embeddings=rope, attention_mask=None
    )


def after_attention(layer: nn.Module, arch: Arch, x: torch.Tensor, core: torch.Tensor):
    """h = x + o_proj(core)."""
    return x + layer.get_submodule(arch.stages[1][0])(core)


def mlp_core(layer: nn.Module, arch: Arch, h: torch.Tensor) -> torch.Tensor:
    """down_proj's input: act(gate(post_norm(h))) * up(post_norm(h)), the gated MLP's
    arithmetic, with at most two [tokens, intermediate] tensors alive at once (transformers'
    forward holds three)."""
    gate, up = (layer.get_submodule(name) for name in arch.stages[2])
    x = layer.get_submodule(arch.post_norm)(h)
    hidden = layer.get_submodule(arch.mlp).act_fn(gate(x))
    return hidden.mul_(up(x))


def output(layer: nn.Module, arch: Arch, h: torch.Tensor) -> torch.Tensor:
    """y = h + mlp(post_norm(h))."""
    return layer.get_submodule(arch.stages[3][0])(mlp_core(layer, arch, h)).add_(h)
