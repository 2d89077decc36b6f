"""Quality of quantized checkpoints against a reference, the way llama.cpp judges them:
perplexity over fixed BOS-prefixed windows, mean KL divergence per token from the
reference's next-token distribution, and how often both pick the same top-1 token."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from llmkit.errors import LlmkitError
from llmkit.quant.calibration import CalibrationSpec, load_texts, token_stream, windows

if TYPE_CHECKING:
    import torch

WINDOWS_PER_BATCH = 4
EVAL_SEED = 1  # the builtin text with another seed than calibration's: held-out text


@dataclass(frozen=True, slots=True)
class QualityRow:
    """One checkpoint's numbers; the reference's own row has kld 0 and top1 1."""

    name: str
    perplexity: float
    kld_mean: float
    kld_p99: float
    top1_agreement: float
    num_tokens: int
    backend: str  # "runtime" (exact), "runtime kernels: ..." (as served), or "transformers"
    error: str | None = None  # why the checkpoint could not be scored (the numbers: NaN)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class _Totals:
    nll: float = 0.0
    agree: int = 0
    klds: list = field(default_factory=list)


def eval_windows(reference: str | Path, data: CalibrationSpec, num_windows: int) -> torch.Tensor:
    """[windows, seq_len] consecutive windows of the text, tokenized by the reference's
    tokenizer; `num_windows` 0 takes them all."""
    import torch
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(reference)
    available = windows(
        token_stream(tokenizer, load_texts(data)), data.seq_len, tokenizer.bos_token_id
    )
    if not available:
        raise LlmkitError(f"the evaluation text is shorter than one window of {data.seq_len}")
    chosen = available[:num_windows] if num_windows else available
    return torch.tensor(chosen, dtype=torch.long)


def evaluate_quality(
    reference: str | Path,
    candidates: list[str | Path],
    data: CalibrationSpec = CalibrationSpec(seq_len=512),
    num_windows: int = 0,
    on_window=None,
    engine_kernels: bool = False,
) -> list[QualityRow]:
    """Rows for the reference and each candidate, all computed in float32 on the CPU. A
    candidate that cannot be read or scored gets a row with its `error` (and NaN numbers);
    the others are scored all the same. `engine_kernels`: the candidates as served, through
    the serving kernels (named in each row's backend), instead of exactly dequantized."""
    import torch

    ids = eval_windows(reference, data, num_windows)
    # The reference runs again beside each candidate rather than keeping its log-probs
    # ([tokens, vocab] per window) or every candidate at once: memory stays at two models.
    ref_model = scorer(reference, data.seq_len)  # exact: the reference is the reference
    with torch.no_grad():
        rows = [_score(str(reference), ref_model, ref_model, ids, on_window)]
        for path in candidates:
            try:  # one unreadable candidate must not cost the others their scores
                model = scorer(path, data.seq_len, exact=not engine_kernels)
                _check_vocab(ref_model, model, path)
            except LlmkitError as e:
                rows.append(_unreadable(str(path), str(e)))
                continue
            rows.append(_score(str(path), ref_model, model, ids, on_window))
    return rows


def _unreadable(name: str, error: str) -> QualityRow:
    nan = float("nan")
    return QualityRow(name, nan, nan, nan, nan, 0, "", error)


def scorer(path: str | Path, seq_len: int, exact: bool = True):
    """`.logprobs(ids [windows, seq_len])`, `.vocab_size` and `.backend`: llmkit's runtime
    scorer for the architectures it runs (`exact`: weight-only formats exactly dequantized;
    else through the serving kernels), else transformers' model code over the dequantized
    weights."""
    from llmkit.runtime.scoring import WindowScorer

    try:
        model = WindowScorer(str(path), WINDOWS_PER_BATCH, seq_len, exact=exact)
    except LlmkitError:
        return _TransformersScorer(path)
    if not exact:
        model.backend = f"runtime kernels: {', '.join(model.kernels())}"
    return model


class _TransformersScorer:
    backend = "transformers"

    def __init__(self, path: str | Path):
        from llmkit.bench.model import load_model

        self.model = load_model(path)
        self.vocab_size = self.model.config.vocab_size

    def logprobs(self, ids: torch.Tensor) -> torch.Tensor:
        import torch

        return torch.log_softmax(self.model(ids).logits.double(), dim=-1)


def _check_vocab(ref_model, model, path) -> None:
    if ref_model.vocab_size != model.vocab_size:
        raise LlmkitError(
            f"{path} has a vocabulary of {model.vocab_size}, the reference {ref_model.vocab_size}"
        )


def _score(name: str, ref_model, model, ids: torch.Tensor, on_window) -> QualityRow:
    import torch

    totals = _Totals()
    for start in range(0, len(ids), WINDOWS_PER_BATCH):
        batch = ids[start : start + WINDOWS_PER_BATCH]
        # Positions 0..L-2 predict tokens 1..L-1 (nothing predicts the BOS).
        ref_logp = ref_model.logprobs(batch)[:, :-1]
        logp = ref_logp if model is ref_model else model.logprobs(batch)[:, :-1]
        targets = batch[:, 1:]
        totals.nll -= float(logp.gather(-1, targets[..., None]).sum())
        totals.agree += int((logp.argmax(-1) == ref_logp.argmax(-1)).sum())
        totals.klds.append((ref_logp.exp() * (ref_logp - logp)).sum(-1).flatten())
        if on_window is not None:
            on_window(min(start + WINDOWS_PER_BATCH, len(ids)), len(ids))
    klds = torch.cat(totals.klds)
    count = klds.numel()
    return QualityRow(
        name=name,
        perplexity=math.exp(totals.nll / count),
        kld_mean=float(klds.mean()),
        kld_p99=float(torch.quantile(klds.float(), 0.99)),
        top1_agreement=totals.agree / count,
        num_tokens=count,
        backend=model.backend,
    )
