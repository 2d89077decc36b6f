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


@dataclass(frozen=True, slots=True)
class QualityRow:
    """One checkpoint's numbers; the reference's own row has kld 0 and top1 1."""

    name: str
    perplexity: float
    kld_mean: float
    kld_p99: float
    top1_agreement: float
    num_tokens: int

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
) -> list[QualityRow]:
    """Rows for the reference and each candidate, all computed in float32 on the CPU."""
    import torch

    from llmkit.bench.model import load_model

    ids = eval_windows(reference, data, num_windows)
    # The reference runs again beside each candidate rather than keeping its log-probs
    # ([tokens, vocab] per window) or every candidate at once: memory stays at two models.
    ref_model = load_model(reference)
    rows = []
    with torch.no_grad():
        for path in [reference, *candidates]:
            model = ref_model if path == reference else load_model(path)
            _check_vocab(ref_model, model, path)
            rows.append(_score(str(path), ref_model, model, ids, on_window))
    return rows


def _check_vocab(ref_model, model, path) -> None:
    ref_vocab, vocab = ref_model.config.vocab_size, model.config.vocab_size
    if ref_vocab != vocab:
        raise LlmkitError(f"{path} has a vocabulary of {vocab}, the reference {ref_vocab}")


def _score(name: str, ref_model, model, ids: torch.Tensor, on_window) -> QualityRow:
    import torch

    totals = _Totals()
    for start in range(0, len(ids), WINDOWS_PER_BATCH):
        batch = ids[start : start + WINDOWS_PER_BATCH]
        # Positions 0..L-2 predict tokens 1..L-1 (nothing predicts the BOS).
        ref_logp = torch.log_softmax(ref_model(batch).logits[:, :-1].double(), dim=-1)
        logp = (
            ref_logp
            if model is ref_model
            else torch.log_softmax(model(batch).logits[:, :-1].double(), dim=-1)
        )
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
    )
