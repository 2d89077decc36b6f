"""Summary statistics of benchmark samples (pure Python)."""

from __future__ import annotations

import math
import statistics


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0-100) by linear interpolation between closest ranks, as
    numpy.percentile computes it by default; nan for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def summary(name: str, values: list[float], scale: float = 1.0) -> dict[str, float | None]:
    """mean / median / std / p90 / p99 of `values` x `scale` under keys like mean_{name};
    None (JSON null) for each when there are no values."""
    if not values:
        return {f"{k}_{name}": None for k in ("mean", "median", "std", "p90", "p99")}
    values = [v * scale for v in values]
    return {
        f"mean_{name}": statistics.fmean(values),
        f"median_{name}": statistics.median(values),
        f"std_{name}": statistics.pstdev(values),
        f"p90_{name}": percentile(values, 90),
        f"p99_{name}": percentile(values, 99),
    }
