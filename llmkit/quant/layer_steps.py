"""A llama-family decoder layer cut into the pieces GPTQ's stages need, so each stage's
inputs are computed from the previous stage's results instead of from the layer's input:

    h = x + attention(input_norm(x))     # o_proj is attention's last step
    y = h + mlp(post_norm(h))            # down_proj is mlp's last step

Running the whole layer once per stage costs ~2.2x more arithmetic (llama shapes)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from llmkit.arch.family import Family


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


def attention_core(layer: nn.Module, arch: Family, x: torch.Tensor, rope) -> torch.Tensor:
    """o_proj's input: attention over input_norm(x), before the output projection."""
    attention = layer.get_submodule(arch.attention)
    normed = layer.get_submodule(arch.input_norm)(x)
    o_proj = layer.get_submodule(arch.stages[1][0])
    return input_of(
        o_proj, attention, hidden_states=normed, position_embeddings=rope, attention_mask=None
    )


def after_attention(layer: nn.Module, arch: Family, x: torch.Tensor, core: torch.Tensor):
    """h = x + o_proj(core)."""
    return x + layer.get_submodule(arch.stages[1][0])(core)


# Output columns of up_proj and down_proj computed at a time into a small buffer, so the
# MLP needs one [tokens, intermediate] tensor, not two (and so, in the same memory, twice the
# tokens a slice, where the products and the Hessian's run faster).
COLUMNS = 256


class MLPBuffers:
    """Workspace the MLP steps compute into, reused by every slice of a pass: the
    [tokens, intermediate] gated product and a [tokens, COLUMNS] part. Fresh tensors for
    every slice would fault in new pages each time and fragment the heap, whose freed pieces
    then stay resident until the pass ends."""

    def __init__(self, layer: nn.Module, arch: Family, tokens: int, device, dtype):
        intermediate = layer.get_submodule(arch.stages[2][0]).out_features
        self._core = torch.empty(tokens, intermediate, device=device, dtype=dtype)
        self._part = torch.empty(tokens, COLUMNS, device=device, dtype=dtype)

    @classmethod
    def for_input(cls, layer: nn.Module, arch: Family, h: torch.Tensor) -> MLPBuffers:
        """Buffers for exactly the tokens of h [..., hidden]."""
        return cls(layer, arch, h.numel() // h.shape[-1], h.device, h.dtype)

    def views(self, tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(core [tokens, intermediate], part [tokens, COLUMNS])."""
        return self._core[:tokens], self._part[:tokens]


def mlp_core(
    layer: nn.Module, arch: Family, h: torch.Tensor, buffers: MLPBuffers | None = None
) -> torch.Tensor:
    """down_proj's input: act(gate(post_norm(h))) * up(post_norm(h)), the gated MLP's
    arithmetic computed into `buffers` (transformers' forward allocates three
    [tokens, intermediate] tensors). [..., hidden] -> [..., intermediate]"""
    buffers = buffers or MLPBuffers.for_input(layer, arch, h)
    flat = h.reshape(-1, h.shape[-1])
    return _gated(layer, arch, flat, buffers).view(*h.shape[:-1], -1)


def output(
    layer: nn.Module,
    arch: Family,
    h: torch.Tensor,
    buffers: MLPBuffers | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """y = h + mlp(post_norm(h)), into `out` (h itself may be given: it is read only before
    each of its columns is written)."""
    buffers = buffers or MLPBuffers.for_input(layer, arch, h)
    flat = h.reshape(-1, h.shape[-1])
    y = torch.empty_like(flat) if out is None else out.view(flat.shape)
    core = _gated(layer, arch, flat, buffers)
    down = layer.get_submodule(arch.stages[3][0])
    for cols, block in _column_blocks(down, core, buffers.views(len(flat))[1]):
        torch.add(flat[:, cols], block, out=y[:, cols])
    return y.view(h.shape)


def _gated(layer: nn.Module, arch: Family, h: torch.Tensor, buffers: MLPBuffers) -> torch.Tensor:
    """h [tokens, hidden] -> act(gate(x)) * up(x), x = post_norm(h): [tokens, intermediate]."""
    gate, up = (layer.get_submodule(name) for name in arch.stages[2])
    x = layer.get_submodule(arch.post_norm)(h)
    core, part = buffers.views(len(x))
    _linear_into(gate, x, core)
    _activate_(layer.get_submodule(arch.mlp), core)
    for cols, block in _column_blocks(up, x, part):
        core[:, cols].mul_(block)
    return core


def _column_blocks(linear: nn.Linear, x: torch.Tensor, part: torch.Tensor):
    """linear(x) [tokens, out] a block of COLUMNS output columns at a time, each computed into
    `part` [tokens, COLUMNS] (and valid until the next): yields (columns, block)."""
    for start in range(0, linear.out_features, COLUMNS):
        cols = slice(start, min(start + COLUMNS, linear.out_features))
        block = part[:, : cols.stop - start]
        _linear_into(linear, x, block, cols)
        yield cols, block


def _linear_into(
    linear: nn.Linear, x: torch.Tensor, out: torch.Tensor, cols: slice = slice(None)
) -> None:
    """out = linear(x)[:, cols] for x [tokens, in], as F.linear computes it (mm, or addmm with
    a bias)."""
    weight = linear.weight[cols]
    if linear.bias is None:
        torch.mm(x, weight.T, out=out)
    else:
        torch.addmm(linear.bias[cols], x, weight.T, out=out)


def _activate_(mlp: nn.Module, x: torch.Tensor) -> None:
    """x = mlp.act_fn(x), in place where the activation has an in-place form."""
    if getattr(getattr(mlp, "config", None), "hidden_act", None) == "silu":
        F.silu(x, inplace=True)
    else:
        x.copy_(mlp.act_fn(x))
