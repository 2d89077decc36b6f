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
    return device
