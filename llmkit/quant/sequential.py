"""Run a model one decoder layer at a time over calibration data, quantizing as it goes.

Layer i is materialized on the compute device from lazy checkpoint reads, handed to a
quantizer together with a way to run it over the calibration activations (kept on the CPU),
run once more *after* quantization so that layer i+1 sees what the quantized model computes
(as the GPTQ and AWQ reference implementations do), and released. Only one decoder layer's
weights are ever on the compute device; every other layer lives on the meta device.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from llmkit.arch.family import Family, num_layers
from llmkit.checkpoint.reader import Checkpoint
from llmkit.errors import LlmkitError
from llmkit.memory import return_freed_memory

# Tokens a layer runs at once: its MLP intermediates ([tokens, intermediate] x ~4) are
# transient memory on top of the calibration activations, so keep them modest.
TOKENS_PER_BATCH = 512
READ_BYTES = 2**20  # checkpoint reads at a time: small buffers, reused


@dataclass
class LayerRun:
    """One decoder layer and the calibration activations that feed it (CPU, in batches)."""

    layer: nn.Module
    inputs: list[torch.Tensor]  # each [batch, seq, hidden]
    position_embeddings: tuple[torch.Tensor, torch.Tensor]
    device: torch.device
    dtype: torch.dtype
    checkpoint: Checkpoint  # where the layer's weights are read from, under `prefix`
    prefix: str
    last: bool = False  # the model's last decoder layer: its outputs feed no other layer
    advanced: bool = False  # set once the quantizer has computed the layer's outputs itself

    def load(self, names: tuple[str, ...]) -> None:
        """Read these Linears' weights from the checkpoint, for those whose weights are on
        the meta device (left there by `deferred`, or let go of by `unload`)."""
        for name in names:
            module = self.layer.get_submodule(name)
            if not module.weight.is_meta:
                continue
            module.to_empty(device=self.device)
            _read_weights(module, self.checkpoint, f"{self.prefix}.{name}", self.dtype)
        return_freed_memory()  # the reads' buffers

    def unload(self, names: tuple[str, ...]) -> None:
        """Let go of these Linears' weights (the layer no longer runs them; biases stay, to be
        written with the layer)."""
        for name in names:
            linear = self.layer.get_submodule(name)
            linear.weight = nn.Parameter(linear.weight.to("meta"), requires_grad=False)
        return_freed_memory()

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.layer(x, position_embeddings=self.position_embeddings)
        return y[0] if isinstance(y, tuple) else y

    @torch.no_grad()
    def run(self) -> None:
        """Forward every batch (hooks on the layer's modules see all of them)."""
        self.each(self._forward)

    @torch.no_grad()
    def each(self, visit: Callable[[torch.Tensor], object], tokens: int | None = None) -> None:
        """Call `visit(batch on the device)` for every input batch, or for every slice of
        `tokens` tokens ([tokens, hidden]) when a per-token step needs no whole windows."""
        for x in self._parts(tokens):
            visit(x.to(self.device, self.dtype))
        return_freed_memory()

    @torch.no_grad()
    def update(
        self, step: Callable[[torch.Tensor], torch.Tensor], tokens: int | None = None
    ) -> None:
        """Overwrite each input batch (or slice of `tokens` tokens, as in `each`) in place
        with `step(it on the device)`."""
        for x in self._parts(tokens):
            x.copy_(step(x.to(self.device, self.dtype)))
        return_freed_memory()

    def advance(
        self, step: Callable[[torch.Tensor], torch.Tensor] | None = None, tokens: int | None = None
    ) -> None:
        """Overwrite the inputs with the layer's outputs: the whole layer's forward, or
        `step` (per token when `tokens` is given) when the inputs already hold part of the
        way there. The last layer's outputs are not computed: nothing reads them."""
        if not self.last:
            self.update(self._forward if step is None else step, tokens)
        self.advanced = True

    def _parts(self, tokens: int | None) -> Iterator[torch.Tensor]:
        """The input batches, or views of `tokens` tokens of them."""
        for x in self.inputs:
            yield from [x] if tokens is None else x.view(-1, x.shape[-1]).split(tokens)


# Quantize one layer in place (it must then compute as the quantized model will) and return
# the tensors to write for it, named relative to the layer (e.g. "self_attn.q_proj.weight").
# A quantizer may name submodules in a `deferred` attribute: the layer is materialized
# without their weights, which the quantizer reads with LayerRun.load when it needs them.
LayerQuantizer = Callable[[int, LayerRun], dict[str, torch.Tensor]]


def build_skeleton(config: dict, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The transformers model for `config` on the meta device (no memory), SDPA attention
    (causal without a mask, which is what calibration windows need), its tensors in `dtype`
    whatever the checkpoint's (transformers would take the config's `torch_dtype`)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    clean = {k: v for k, v in config.items() if k != "quantization_config"}
    hf_config = AutoConfig.for_model(**clean)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config, attn_implementation="sdpa")
    return model.to(dtype)


def materialize(
    module: nn.Module, ck: Checkpoint, prefix: str, device, dtype, deferred: tuple[str, ...] = ()
) -> nn.Module:
    """Give a meta-device module real weights read from the checkpoint, but for the
    submodules named in `deferred`, which stay on the meta device."""
    for name, submodule in module.named_modules():
        if not any(name == d or name.startswith(d + ".") for d in deferred):
            submodule.to_empty(device=device, recurse=False)
    _read_weights(module, ck, prefix, dtype)
    return module


def _read_weights(module: nn.Module, ck: Checkpoint, prefix: str, dtype) -> None:
    """Fill a module's materialized tensors (those not on the meta device) from `ck`, a
    block of rows at a time (no whole-tensor read buffer beside the weights)."""
    for name, tensor in module.state_dict().items():
        if tensor.is_meta:
            continue
        source = f"{prefix}.{name}"
        if source not in ck.tensors:
            raise LlmkitError(f"checkpoint lacks {source!r}, which the model needs")
        rows = tensor.view(-1, *tensor.shape[1:]) if tensor.dim() else tensor.view(1)
        start = 0
        for block in ck.iter_row_chunks(source, READ_BYTES):
            rows[start : start + len(block)].copy_(block.to(dtype))
            start += len(block)


def release(module: nn.Module) -> None:
    module.to("meta")
    return_freed_memory()


def embed_inputs(ck: Checkpoint, arch: Family, ids: torch.Tensor, dtype) -> list[torch.Tensor]:
    """Embeddings of the calibration ids: batches of about TOKENS_PER_BATCH tokens, views of
    one tensor that every layer then overwrites in place (no per-layer allocations).

    The table is read in row blocks and gathered from, never held whole: for a large
    vocabulary it is several decoder layers' worth of memory.
    """
    name = f"{arch.embed}.weight"
    hidden = torch.empty(*ids.shape, ck.tensors[name].shape[1], dtype=dtype)
    flat_ids, flat = ids.reshape(-1), hidden.view(-1, hidden.shape[-1])
    start = 0
    for block in ck.iter_row_chunks(name, READ_BYTES):
        inside = ((flat_ids >= start) & (flat_ids < start + len(block))).nonzero().squeeze(1)
        for positions in inside.split(TOKENS_PER_BATCH):  # gathered rows: a batch at a time
            flat[positions] = block[flat_ids[positions] - start].to(dtype)
        start += len(block)
    return list(hidden.split(max(1, TOKENS_PER_BATCH // ids.shape[1])))


def rotary_embeddings(model: nn.Module, arch: Family, seq_len: int, device, dtype):
    """(cos, sin) for positions 0..seq_len-1, built on the device (the skeleton's are meta)."""
    meta_rotary = model.get_submodule(arch.rotary)
    rotary = type(meta_rotary)(model.config).to(device)
    positions = torch.arange(seq_len, device=device)[None, :]
    probe = torch.zeros(1, seq_len, 1, device=device, dtype=dtype)
    with torch.no_grad():
        return rotary(probe, positions)


def run_layers(
    model: nn.Module,
    ck: Checkpoint,
    arch: Family,
    ids: torch.Tensor,
    quantize_layer: LayerQuantizer,
    device: torch.device,
    dtype: torch.dtype = torch.float32,
    on_layer: Callable[[int, int], None] | None = None,
) -> Iterator[tuple[int, dict[str, torch.Tensor]]]:
    """Yield (layer index, tensors to write) for every decoder layer, in order.
    `model` is `build_skeleton(ck.config)`."""
    if int(ids.max()) >= ck.tensors[f"{arch.embed}.weight"].shape[0]:
        raise LlmkitError("calibration token ids exceed the model's vocabulary")
    hidden = embed_inputs(ck, arch, ids, dtype)
    position_embeddings = rotary_embeddings(model, arch, ids.shape[1], device, dtype)
    total = num_layers(ck.config)
    deferred = getattr(quantize_layer, "deferred", ())
    for index in range(total):
        prefix = f"{arch.layers}.{index}"
        layer = materialize(model.get_submodule(prefix), ck, prefix, device, dtype, deferred)
        last = index == total - 1
        run = LayerRun(layer, hidden, position_embeddings, device, dtype, ck, prefix, last)
        tensors = quantize_layer(index, run)
        if not run.advanced:  # then `hidden` holds this layer's outputs: the next one's inputs
            run.advance()
        release(layer)
        if on_layer is not None:
            on_layer(index + 1, total)
        yield index, tensors
        del tensors  # written: not held while the next layer is quantized
