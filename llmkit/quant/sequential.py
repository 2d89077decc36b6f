"""Run a model one decoder layer at a time over calibration data, quantizing as it goes.

Layer i is materialized on the compute device from lazy checkpoint reads, handed to a
quantizer together with a way to run it over the calibration activations (kept on the CPU),
run once more *after* quantization so that layer i+1 sees what the quantized model computes
(as the GPTQ and AWQ reference implementations do), and released. Only one decoder layer's
weights are ever on the compute device; every other layer lives on the meta device.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from llmkit.checkpoint import dtypes
from llmkit.checkpoint.reader import Checkpoint
from llmkit.errors import LlmkitError
from llmkit.quant.arch import Arch, num_layers

TOKENS_PER_BATCH = 4096


class _StopForward(Exception):
    """Raised by a hook once the modules of interest have seen their inputs."""


def _stop(module: nn.Module, args: tuple, output: object) -> None:
    raise _StopForward


@dataclass
class LayerRun:
    """One decoder layer and the calibration activations that feed it (CPU, in batches)."""

    layer: nn.Module
    inputs: list[torch.Tensor]  # each [batch, seq, hidden]
    position_embeddings: tuple[torch.Tensor, torch.Tensor]
    device: torch.device
    dtype: torch.dtype

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.layer(x.to(self.device, self.dtype), position_embeddings=self.position_embeddings)
        return y[0] if isinstance(y, tuple) else y

    @torch.no_grad()
    def run(self, stop_after: nn.Module | None = None) -> None:
        """Forward every batch for the hooks on the layer's modules; with `stop_after`, each
        batch stops once that module has run (later modules would compute for nothing)."""
        handle = stop_after.register_forward_hook(_stop) if stop_after is not None else None
        try:
            for x in self.inputs:
                with contextlib.suppress(_StopForward):
                    self._forward(x)
        finally:
            if handle is not None:
                handle.remove()

    @torch.no_grad()
    def advance(self) -> list[torch.Tensor]:
        """Replace each input batch by the layer's output for it (one copy held at a time)."""
        for i, x in enumerate(self.inputs):
            self.inputs[i] = self._forward(x).to("cpu")
        return self.inputs


# Quantize one layer in place (it must then compute as the quantized model will) and return
# the tensors to write for it, named relative to the layer (e.g. "self_attn.q_proj.weight").
LayerQuantizer = Callable[[int, LayerRun], dict[str, torch.Tensor]]


def build_skeleton(config: dict) -> nn.Module:
    """The transformers model for `config` on the meta device (no memory), SDPA attention
    (causal without a mask, which is what calibration windows need)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    clean = {k: v for k, v in config.items() if k != "quantization_config"}
    hf_config = AutoConfig.for_model(**clean)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(hf_config, attn_implementation="sdpa")


def materialize(module: nn.Module, ck: Checkpoint, prefix: str, device, dtype) -> nn.Module:
    """Give a meta-device module real weights read from the checkpoint."""
    module.to_empty(device=device)
    for name, tensor in module.state_dict().items():
        source = f"{prefix}.{name}"
        if source not in ck.tensors:
            raise LlmkitError(f"checkpoint lacks {source!r}, which the model needs")
        tensor.copy_(ck.get_tensor(source).to(dtype))
    return module


def release(module: nn.Module) -> None:
    module.to("meta")


def embed_inputs(model: nn.Module, ck: Checkpoint, arch: Arch, ids: torch.Tensor, device, dtype):
    """Embeddings of the calibration ids, in CPU batches of about TOKENS_PER_BATCH tokens."""
    embed = materialize(model.get_submodule(arch.embed), ck, arch.embed, device, dtype)
    batch = max(1, TOKENS_PER_BATCH // ids.shape[1])
    with torch.no_grad():
        hidden = [embed(chunk.to(device)).to("cpu") for chunk in ids.split(batch)]
    release(embed)
    return hidden


def rotary_embeddings(model: nn.Module, arch: Arch, seq_len: int, device, dtype):
    """(cos, sin) for positions 0..seq_len-1, built on the device (the skeleton's are meta)."""
    meta_rotary = model.get_submodule(arch.rotary)
    rotary = type(meta_rotary)(model.config).to(device)
    positions = torch.arange(seq_len, device=device)[None, :]
    probe = torch.zeros(1, seq_len, 1, device=device, dtype=dtype)
    with torch.no_grad():
        return rotary(probe, positions)


def run_layers(
    ck: Checkpoint,
    arch: Arch,
    ids: torch.Tensor,
    quantize_layer: LayerQuantizer,
    device: torch.device,
    dtype: torch.dtype = torch.float32,
    on_layer: Callable[[int, int], None] | None = None,
) -> Iterator[tuple[int, dict[str, torch.Tensor]]]:
    """Yield (layer index, tensors to write) for every decoder layer, in order."""
    model = build_skeleton(ck.config)
    hidden = embed_inputs(model, ck, arch, ids, device, dtype)
    position_embeddings = rotary_embeddings(model, arch, ids.shape[1], device, dtype)
    total = num_layers(ck.config)
    for index in range(total):
        prefix = f"{arch.layers}.{index}"
        layer = materialize(model.get_submodule(prefix), ck, prefix, device, dtype)
        run = LayerRun(layer, hidden, position_embeddings, device, dtype)
        tensors = quantize_layer(index, run)
        hidden = run.advance()
        release(layer)
        if on_layer is not None:
            on_layer(index + 1, total)
        yield index, tensors


def storage_dtype(ck: Checkpoint, name: str) -> torch.dtype:
    """The dtype a tensor had in the source checkpoint (what it is written back as)."""
    return dtypes.to_torch(ck.tensors[name].dtype)
