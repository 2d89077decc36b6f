"""`--assert "metric>=value"` thresholds that fail a benchmark run (exit 3) for CI."""

from __future__ import annotations

import operator
import re
from dataclasses import dataclass

from llmkit.errors import LlmkitError

THRESHOLD_MISSED = 3  # the exit code of a run whose --assert failed

_OPS = {">=": operator.ge, "<=": operator.le, ">": operator.gt, "<": operator.lt, "==": operator.eq}
_PATTERN = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*)\s*(>=|<=|==|>|<)\s*(\S+)\s*$")


@dataclass(frozen=True, slots=True)
class Threshold:
    metric: str
    op: str
    value: float

    def __str__(self) -> str:
        return f"{self.metric}{self.op}{self.value:g}"

    def check(self, result: dict, where: str = "") -> str | None:
        """None when `result` meets it, else the line saying how it missed."""
        got = result.get(self.metric)
        if got is None or not _OPS[self.op](got, self.value):
            shown = "missing" if got is None else f"{got:g}"
            return f"{where}{self.metric} = {shown}, wanted {self.op} {self.value:g}"
        return None


def parse(texts: list[str]) -> list[Threshold]:
    thresholds = []
    for text in texts:
        match = _PATTERN.match(text)
        if not match:
            raise LlmkitError(f"--assert {text!r}: write it as metric>=value (or <=, >, <, ==)")
        try:
            value = float(match[3])
        except ValueError:
            raise LlmkitError(f"--assert {text!r}: {match[3]!r} is not a number") from None
        thresholds.append(Threshold(match[1], match[2], value))
    return thresholds


def check_known(thresholds: list[Threshold], metrics: set[str]) -> None:
    """Refuse (before anything runs) a threshold on a metric the command does not report."""
    for t in thresholds:
        if t.metric not in metrics:
            raise LlmkitError(
                f"--assert {t}: no metric {t.metric!r}; this command reports "
                + ", ".join(sorted(metrics))
            )


def misses(thresholds: list[Threshold], results: list[tuple[str, dict]]) -> list[str]:
    """Every (label, result) checked against every threshold; the misses, each named."""
    lines = []
    for label, result in results:
        for t in thresholds:
            line = t.check(result, f"{label}: " if label else "")
            if line:
                lines.append(line)
    return lines
