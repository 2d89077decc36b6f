"""How many greedy decode steps one call runs (Engine._run_ahead): as many as fit in
--decode-call-ms at the speed a step of about as many sequences ran before, and at most
--decode-steps. A call's length is what a request arriving meanwhile waits before its
prompt is computed, and how far apart a stream's updates come; a step's length depends on
the model, its precision, the batch and the machine. So a fast step (a small or quantized
model, few sequences) runs many per call, and the engine's Python around a call (a few
hundred microseconds) costs little per token, while a slow one (a large batch) runs alone.
A batch of a size not timed yet runs one step, which is timed."""

from __future__ import annotations


class DecodePacer:
    def __init__(self, max_steps: int, call_ms: float):
        self.max_steps = max_steps
        self.call_s = call_ms / 1000  # 0: no time limit, max_steps a call
        self.step_s: dict[int, float] = {}  # seconds of a step, by the batch's size class
        self.full_s: dict[int, float] = {}  # the same, in calls of as many steps as given

    def steps(self, seqs: int) -> int:
        """Steps for a call of `seqs` sequences."""
        if self.call_s <= 0:
            return self.max_steps
        step_s = self.step_s.get(_size_class(seqs))
        if step_s is None:
            return 1
        return max(1, min(self.max_steps, int(self.call_s / max(step_s, 1e-9))))

    def record(self, seqs: int, steps: int, seconds: float) -> None:
        """A call of `seqs` sequences ran `steps` steps in `seconds` (the latest call of a
        size class sets its speed: a call slowed down once is followed by a shorter one)."""
        if steps >= self.steps(seqs):
            self.full_s[_size_class(seqs)] = seconds / steps
        self.step_s[_size_class(seqs)] = seconds / steps

    def token_s(self, seqs: int) -> float | None:
        """Seconds a step of `seqs` sequences took in the latest call that ran as many steps
        as the pacer gave, the engine's Python around it shared by them: what a token of
        plain decoding costs, where nothing cuts a call short (the latest call of any
        length where none ran that many; None: none timed)."""
        size = _size_class(seqs)
        return self.full_s.get(size, self.step_s.get(size))


def _size_class(seqs: int) -> int:
    """1, 2-3, 4-7, 8-15, ... sequences: a step's time grows with the batch, slowly while
    reading the weights sets it."""
    return seqs.bit_length()
