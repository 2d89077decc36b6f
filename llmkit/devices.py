"""The one place where `--device auto|cpu|cuda[:N]` becomes a torch device."""

from __future__ import annotations

import torch

from llmkit.errors import LlmkitError


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise LlmkitError(f"unknown device {name!r}; use auto, cpu or cuda[:N]") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise LlmkitError("--device cuda was asked for, but torch sees no CUDA device")
    if device.type not in ("cpu", "cuda"):
        raise LlmkitError(f"device {name!r} is not supported; use auto, cpu or cuda[:N]")
    if device.type == "cuda" and device.index is not None:
        count = torch.cuda.device_count()
        if device.index >= count:
            raise LlmkitError(f"--device {name}: torch sees {count} CUDA device(s), "
                              f"cuda:0 to cuda:{count - 1}")  # fmt: skip
    return device


def indexed(device: torch.device) -> torch.device:
    """`device` with its index: `cuda` alone is the calling thread's current CUDA device."""
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def bind(device: torch.device) -> None:
    """Make `device` (cuda:N) the calling thread's current CUDA device (nothing on the CPU,
    nor for `cuda` alone): Triton and llmkit's own CUDA kernels launch on the current
    device, and NCCL's object collectives use it, so every thread that runs a model on
    cuda:N needs N current."""
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)
