"""SmoothQuant: move activation outliers into the weights with an exact per-channel rescale.

For a source (RMSNorm or Linear) feeding Linears W_k, dividing the source's output channel j
by s_j and multiplying column j of every W_k by s_j leaves the float computation unchanged;
with s_j = max|X_j|^α / max_k max|W_k[:, j]|^(1-α) the activations become easier to quantize.
"""

from __future__ import annotations

import torch
from torch import nn

MIN_SCALE = 1e-5


class InputAbsMax:
    """Forward pre-hook: running max of |x| per input channel of a module."""

    def __init__(self, module: nn.Module):
        self.amax: torch.Tensor | None = None
        self._handle = module.register_forward_pre_hook(self._hook)

    def _hook(self, module: nn.Module, args: tuple) -> None:
        x = args[0].detach()  # kept on x's device: no copy to the host (and wait) per batch
        current = x.reshape(-1, x.shape[-1]).abs().amax(dim=0).float()
        self.amax = current if self.amax is None else torch.maximum(self.amax, current)

    def remove(self) -> torch.Tensor:
        self._handle.remove()
        if self.amax is None:
            raise RuntimeError("the module never ran; no activation statistics")
        return self.amax


def smooth_scales(act_amax: torch.Tensor, weights: list[torch.Tensor], alpha: float):
    """s [in] for activations with per-channel max `act_amax` feeding `weights` ([out, in])."""
    w_amax = torch.cat([w.detach().float() for w in weights]).abs().amax(dim=0)
    act_term = act_amax.float().clamp(min=MIN_SCALE).pow(alpha)
    scales = act_term / w_amax.clamp(min=MIN_SCALE).pow(1 - alpha)
    return scales.clamp(min=MIN_SCALE)


@torch.no_grad()
def fold(source: nn.Module, linears: list[nn.Linear], scales: torch.Tensor) -> None:
    """Divide the source's output channels by `scales`, multiply the Linears' inputs by them."""
    s = scales.to(source.weight.device)
    if isinstance(source, nn.Linear):
        source.weight.div_(s[:, None].to(source.weight.dtype))
        if source.bias is not None:
            source.bias.div_(s.to(source.bias.dtype))
    else:  # an RMSNorm: y = weight * normalized(x)
        source.weight.div_(s.to(source.weight.dtype))
    for linear in linears:
        linear.weight.mul_(s[None, :].to(linear.weight.dtype))
