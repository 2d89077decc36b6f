"""A numpy array that grows at its end, its storage doubled as it fills: appending a value or
a run of values costs amortized constant time per value, and `view` is the values so far
without a copy."""

from __future__ import annotations

import numpy as np


class Growing:
    def __init__(self, values: np.ndarray) -> None:
        self.values, self.size = np.resize(values, max(16, 2 * len(values))), len(values)

    def __len__(self) -> int:
        return self.size

    def append(self, value) -> None:
        if self.size == len(self.values):
            self.values = np.resize(self.values, 2 * self.size)
        self.values[self.size] = value
        self.size += 1

    def extend(self, values) -> None:
        end = self.size + len(values)
        if end > len(self.values):
            self.values = np.resize(self.values, max(end, 2 * len(self.values)))
        self.values[self.size : end] = values
        self.size = end

    def view(self) -> np.ndarray:
        """The values so far (valid until the next append or extend)."""
        return self.values[: self.size]
