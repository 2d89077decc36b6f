"""LoRA adapters on a loaded base model, many at once, applied batched.

An adapter is a PEFT directory (adapter_config.json + adapter_model.safetensors): for some
Linears W of the base, two low-rank factors A [r, in] and B [out, r]; with the adapter the
Linear computes x W^T + (x A^T) B^T * alpha / r. The base weights are never touched, so any
base format (dense, int8, 4-bit) takes adapters, and requests of different adapters (and of
none) share one batch.

At load, when the engine serves adapters, each adaptable Linear is wrapped in a `LoraLinear`
(merged q/k/v and gate/up keep one wrapper, each part's factors placed at its outputs). A
step's sequences are ordered so that each adapter's tokens are contiguous runs; the runner
sets those runs (`LoraContext.segments`) before the forward, and each wrapper adds, per run,
one low-rank product on that run's rows: as many small products per Linear as the step has
runs of adapters, however many requests they hold (the segmented product of vLLM's Punica
kernels, here as a few torch matmuls; on the CPU the factors are kept in float32, whose
small products are far faster there than 16-bit ones).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

from llmkit.errors import LlmkitError
from llmkit.kernels import cpu

# PEFT writes the base model's module names under this prefix.
PEFT_PREFIX = "base_model.model."
ADAPTABLE = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(slots=True)
class LoraContext:
    """What every LoraLinear of a model reads in a step: (adapter id, first row, end row) of
    each run of tokens of one adapter (base-model tokens have no run)."""

    segments: list[tuple[int, int, int]] = field(default_factory=list)


class Factors(NamedTuple):
    """One adapter's factors of one LoraLinear, its parts' concatenated: a_t [in, r] (each
    part's A^T side by side) and b_t [r, out] (each part's B^T in its own rank rows and
    output columns, zero elsewhere), the scale folded in; blocks [parts, 4] int64: each
    part's (first output, end output, first rank row, end rank row)."""

    a_t: torch.Tensor
    b_t: torch.Tensor
    blocks: torch.Tensor


class LoraLinear(nn.Module):
    """A base Linear (any format) plus the low-rank products of the adapters loaded."""

    def __init__(self, base: nn.Module, parts: list[tuple[str, int]], in_features: int, context):
        """parts: (module name, outputs) of each Linear merged in `base`, in output order."""
        super().__init__()
        self.base, self.context = base, context
        self.parts, self.in_features = parts, in_features
        self.adapters: dict[int, Factors] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        runs = [(self.adapters[i], start, stop) for i, start, stop in self.context.segments
                if i in self.adapters]  # fmt: skip
        if not runs:
            return y
        ops = cpu.for_tensors(y, x)
        if ops is not None and runs[0][0].a_t.is_cpu:  # one C++ call for all the runs
            ops.lora_add(
                y,
                x.contiguous(),
                [f.a_t for f, _, _ in runs],
                [f.b_t for f, _, _ in runs],
                [f.blocks for f, _, _ in runs],
                [bound for _, start, stop in runs for bound in (start, stop)],
            )
            return y
        first, end = runs[0][1], runs[-1][2]  # the rows from the first run to the last
        wide = x[first:end].to(runs[0][0].a_t.dtype)  # the factors' dtype
        delta = torch.zeros(end - first, y.shape[-1], dtype=wide.dtype, device=y.device)
        for (a_t, b_t, _), start, stop in runs:  # a_t: [in, r], b_t: [r, out]
            rows = slice(start - first, stop - first)
            torch.mm(wide[rows] @ a_t, b_t, out=delta[rows])
        y[first:end] += delta.to(y.dtype)  # a mixed-dtype add is far slower on the CPU
        return y

    def kernel_call(self):
        """The base's, for steps without adapters (the decoder layer then runs fused)."""
        call = getattr(self.base, "kernel_call", None)
        return None if call is None else call()

    def install(self, lora_id: int, factors: dict[str, tuple[torch.Tensor, torch.Tensor]]):
        """Add adapter `lora_id`'s factors of the parts it adapts (name -> (A, B))."""
        if not any(name in factors for name, _ in self.parts):
            return
        a_parts, b_blocks, blocks, offset, rank = [], [], [], 0, 0
        total = sum(size for _, size in self.parts)
        for name, size in self.parts:
            if name in factors:
                a, b = factors[name]
                block = torch.zeros(total, a.shape[0], dtype=b.dtype, device=b.device)
                block[offset : offset + size] = b
                a_parts.append(a)
                b_blocks.append(block)
                blocks.append((offset, offset + size, rank, rank + a.shape[0]))
                rank += a.shape[0]
            offset += size
        a, b = torch.cat(a_parts), torch.cat(b_blocks, dim=1)
        self.adapters[lora_id] = Factors(
            a.t().contiguous(), b.t().contiguous(), torch.tensor(blocks)
        )

    def remove(self, lora_id: int) -> None:
        self.adapters.pop(lora_id, None)


@dataclass(frozen=True, slots=True)
class AdapterFiles:
    """A PEFT LoRA adapter as read from disk: (A, B) per base module name, scale folded."""

    path: str
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]]


def read_adapter(path: str | Path, max_rank: int) -> AdapterFiles:
    """The adapter in `path`, or LlmkitError with one line saying what does not fit."""
    directory = Path(path).expanduser()
    config = _read_config(directory)
    tensors = _read_tensors(directory)
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    rank = 0
    for key, a in tensors.items():
        if not key.endswith(".lora_A.weight"):
            continue
        module = key.removesuffix(".lora_A.weight").removeprefix(PEFT_PREFIX)
        b = tensors.get(key.replace(".lora_A.", ".lora_B."))
        if module.rsplit(".", 1)[-1] not in ADAPTABLE:
            raise LlmkitError(
                f"{directory}: adapts {module}; llmkit adapts only {', '.join(ADAPTABLE)}"
            )
        if b is None or a.dim() != 2 or b.dim() != 2 or b.shape[1] != a.shape[0]:
            raise LlmkitError(f"{directory}: {module} has no matching lora_A and lora_B")
        if config.get("fan_in_fan_out"):
            a, b = b.t(), a.t()
        r = a.shape[0]
        scale = config["lora_alpha"] / (math.sqrt(r) if config.get("use_rslora") else r)
        factors[module] = (a.float(), b.float() * scale)
        rank = max(rank, r)
    if not factors:
        raise LlmkitError(f"{directory}: adapter_model.safetensors holds no LoRA weights")
    if rank > max_rank:
        raise LlmkitError(f"{directory}: rank {rank} is over --max-lora-rank {max_rank}")
    return AdapterFiles(str(directory), factors)


def adapter_rank(path: str | Path) -> int:
    """The largest rank in the PEFT adapter in `path`, read from its file's header alone (0
    when there is none to read: loading it then says what is wrong)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(Path(path).expanduser() / "adapter_model.safetensors", "pt") as f:
            names = [k for k in f.keys() if k.endswith(".lora_A.weight")]  # noqa: SIM118
            shapes = [f.get_slice(k).get_shape() for k in names]
    except (SafetensorError, OSError):
        return 0
    return max((min(s) for s in shapes if len(s) == 2), default=0)  # A: [r, in] or [in, r]


def _read_config(directory: Path) -> dict:
    try:
        config = json.loads((directory / "adapter_config.json").read_text())
    except FileNotFoundError:
        raise LlmkitError(f"{directory}: no adapter_config.json (not a PEFT adapter)") from None
    except (ValueError, OSError) as e:
        raise LlmkitError(f"{directory}/adapter_config.json: {e}") from None
    if not isinstance(config, dict) or config.get("peft_type", "LORA") != "LORA":
        raise LlmkitError(
            f"{directory}: not a LoRA adapter (peft_type {config.get('peft_type')!r})"
        )
    unsupported = [
        k for k in ("use_dora", "modules_to_save", "rank_pattern", "alpha_pattern") if config.get(k)
    ]
    if config.get("bias", "none") != "none":
        unsupported.append(f"bias {config['bias']!r}")
    if unsupported:
        raise LlmkitError(
            f"{directory}: llmkit does not run adapters with {', '.join(unsupported)}"
        )
    if not isinstance(config.get("lora_alpha"), int | float) or config["lora_alpha"] <= 0:
        raise LlmkitError(f"{directory}/adapter_config.json: lora_alpha must be a positive number")
    return config


def _read_tensors(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = directory / "adapter_model.safetensors"
    if not path.is_file():
        raise LlmkitError(f"{directory}: no adapter_model.safetensors")
    try:
        return load_file(path)
    except (SafetensorError, OSError) as e:
        raise LlmkitError(f"{path}: {e}") from None


def install(modules: dict[str, LoraLinear], lora_id: int, adapter: AdapterFiles, dtype, device):
    """Put `adapter`'s factors into the model's LoraLinears (`modules`: by each part's base
    module name); LlmkitError, installing nothing, when a module or a shape does not fit."""
    by_wrapper: dict[int, dict] = {}
    for name, (a, b) in adapter.factors.items():
        wrapper = modules.get(name)
        if wrapper is None:
            raise LlmkitError(f"{adapter.path}: the base model has no {name}")
        size = dict(wrapper.parts)[name]
        if (b.shape[0], a.shape[1]) != (size, wrapper.in_features):
            raise LlmkitError(
                f"{adapter.path}: {name} is [{b.shape[0]}, {a.shape[1]}], the base model's "
                f"is [{size}, {wrapper.in_features}]"
            )
        by_wrapper.setdefault(id(wrapper), {})[name] = (a.to(device, dtype), b.to(device, dtype))
    for wrapper in {id(w): w for w in modules.values()}.values():
        wrapper.install(lora_id, by_wrapper.get(id(wrapper), {}))
