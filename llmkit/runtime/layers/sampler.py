"""Turn each sequence's logits into its next token: penalties, temperature, top-k, top-p,
min-p, per-request seeds, and top-n log probabilities of the model's own distribution; and
verify speculated tokens against the model's distribution at each of their positions."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from llmkit.runtime.sequence import SamplingParams


@dataclass(slots=True)
class Sampled:
    token_id: int
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None  # (token id, logprob), best first


class Sampler:
    def __init__(self) -> None:
        self._generators: dict[int, torch.Generator] = {}  # seq_id -> its seeded generator

    def release(self, seq_id: int) -> None:
        self._generators.pop(seq_id, None)

    def __call__(
        self,
        logits: torch.Tensor,  # [sequences, vocab] float32
        params: list[SamplingParams],
        histories: list[tuple[list[int], list[int]]],  # (prompt ids, output ids) per row
        seeds: list[tuple[int, int | None]],  # (seq_id, seed or None) per row
        masks: list | None = None,  # per row: int32 bit mask of the tokens allowed, or None
    ) -> list[Sampled]:
        logprobs = torch.log_softmax(logits, dim=-1) if _wants_logprobs(params) else None
        logits = apply_masks(logits, masks)
        logits = _apply_penalties(logits, params, histories)
        tokens = argmax(logits)
        random_rows = [i for i, p in enumerate(params) if not p.greedy]
        if random_rows:
            rows = torch.tensor(random_rows)
            chosen = self._sample(
                logits[rows], [params[i] for i in random_rows], [seeds[i] for i in random_rows]
            )
            tokens[rows] = chosen
        return _results(tokens, logprobs, params)

    def verify(
        self,
        logits: torch.Tensor,  # [sum of (len(draft) + 1) over the sequences, vocab] float32
        params: list[SamplingParams],
        histories: list[tuple[list[int], list[int]]],
        seeds: list[tuple[int, int | None]],
        drafts: list[list[int]],  # per sequence: the tokens proposed after its last one
        draft_probs: list[torch.Tensor | None] | None = None,  # per sequence [len(draft),
        # vocab]: the distribution each draft token was drawn from (None: chosen for sure)
        masks: list | None = None,  # per sequence: None, one row's mask as __call__ takes
        # them (the same for each of its rows), or one per row [len(draft) + 1, words]
    ) -> list[list[Sampled]]:
        """Each sequence's new tokens: the longest accepted prefix of its draft, then one
        token of the model's own (where the draft was rejected, or after the whole draft).

        Row j of a sequence's rows is the model's distribution after its tokens and
        draft[:j]. A sequence without a draft gets the token `__call__` would give it.
        Greedy rows accept a draft token that is the argmax. Sampled rows use
        rejection sampling: accept draft token d with probability min(1, p(d) / q(d)), else
        draw from the residual max(p - q, 0), normalized, so every token is distributed
        as p however good the draft is."""
        if not all(p.greedy and p.logprobs is None for p in params):
            logits = logits.cpu()  # sampled rows draw with CPU generators
        # else (on a GPU) only the rows' argmax leaves the device
        widths = [len(d) + 1 for d in drafts]
        row_params = [p for p, w in zip(params, widths, strict=True) for _ in range(w)]
        row_histories = [
            (prompt, output + draft[:j])
            for (prompt, output), draft in zip(histories, drafts, strict=True)
            for j in range(len(draft) + 1)
        ]
        logprobs = torch.log_softmax(logits, dim=-1) if _wants_logprobs(params) else None
        if masks:
            logits = apply_masks(logits, _row_masks(masks, widths))
        logits = _apply_penalties(logits, row_params, row_histories)
        greedy = argmax(logits).tolist()
        probs = self._verify_probs(logits, row_params)
        out, first = [], 0
        for i, (p, draft) in enumerate(zip(params, drafts, strict=True)):
            rows = range(first, first + len(draft) + 1)
            if p.greedy:
                tokens = _accept_greedy([greedy[r] for r in rows], draft)
            else:
                q = draft_probs[i] if draft_probs else None
                tokens = self._accept_sampled(probs[first : rows.stop], draft, q, seeds[i])
            lp = None if logprobs is None else logprobs[first : rows.stop]
            out.append(_token_results(tokens, lp, p))
            first = rows.stop
        return out

    def propose(self, logits: torch.Tensor, params: SamplingParams, seed) -> tuple:
        """A draft model's next token from its logits [vocab] (float32): its argmax for a
        greedy request (distribution None), else drawn from its distribution under the
        request's temperature, top-k, top-p and min-p, returned with the token."""
        if params.greedy:
            return int(argmax(logits[None])[0]), None
        probs = _filtered_probs(logits[None] / params.temperature, [params])[0]
        probs /= probs.sum()
        return _draw(probs, self._uniform(seed)), probs

    def _verify_probs(self, logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
        """Each sampled row's distribution (temperature, top-k, top-p, min-p); greedy rows'
        are left as they are (not read)."""
        rows = [i for i, p in enumerate(params) if not p.greedy]
        if not rows:
            return logits
        index = _on(logits, rows)
        temperature = _on(logits, [params[i].temperature for i in rows])[:, None]
        probs = logits.clone()
        kept = _filtered_probs(logits[index] / temperature, [params[i] for i in rows])
        probs[index] = kept / kept.sum(dim=-1, keepdim=True)  # p(d) is a probability
        return probs

    def _accept_sampled(self, probs, draft: list[int], q, seed: tuple[int, int | None]):
        """Rejection sampling over one sequence's rows `probs` [len(draft) + 1, vocab]."""
        tokens = []
        for j, d in enumerate(draft):
            p_d, q_d = float(probs[j, d]), 1.0 if q is None else float(q[j, d])
            if accepts(self._uniform(seed), p_d, q_d):
                tokens.append(d)
                continue
            if q is None:
                residual = probs[j].clone()
                residual[d] = 0
            else:
                residual = (probs[j] - q[j]).clamp_(min=0)
            if float(residual.sum()) <= 0:  # p and q equal up to rounding: p itself
                residual = probs[j]
            return [*tokens, _draw(residual, self._uniform(seed))]
        return [*tokens, _draw(probs[len(draft)], self._uniform(seed))]

    def _uniform(self, seed: tuple[int, int | None]) -> float:
        """One uniform draw in [0, 1): from the sequence's own generator when it is seeded."""
        seq_id, value = seed
        generator = None if value is None else self._generator(seq_id, value)
        return float(torch.rand(1, generator=generator, dtype=torch.float64))

    def _sample(self, logits, params: list[SamplingParams], seeds) -> torch.Tensor:
        temperature = _on(logits, [p.temperature for p in params])[:, None]
        probs = _filtered_probs(logits / temperature, params)
        # Inverse transform sampling: one uniform u per row, and the first token whose
        # cumulative probability passes u x the row's total. A seeded request draws its u from
        # a generator of its own, so its tokens do not depend on what it is batched with.
        u = torch.rand(len(params), dtype=torch.float64)
        for row, (seq_id, seed) in enumerate(seeds):
            if seed is not None:
                u[row] = torch.rand(1, generator=self._generator(seq_id, seed), dtype=u.dtype)
        cdf = probs.double().cumsum(dim=-1)
        u = u.to(cdf.device, non_blocking=True)  # drawn on the CPU whatever the device
        tokens = torch.searchsorted(cdf, u[:, None] * cdf[:, -1:], right=True)[:, 0]
        return tokens.clamp_(max=probs.shape[1] - 1)

    def _generator(self, seq_id: int, seed: int) -> torch.Generator:
        if seq_id not in self._generators:
            self._generators[seq_id] = torch.Generator().manual_seed(seed)
        return self._generators[seq_id]


def _on(like: torch.Tensor, values: list, dtype: torch.dtype | None = None) -> torch.Tensor:
    """torch.tensor(values) on `like`'s device (built on the CPU, copied once)."""
    return torch.tensor(values, dtype=dtype).to(like.device, non_blocking=True)


def accepts(u: float, p_d: float, q_d: float) -> bool:
    """Rejection sampling's test for a draft token d: u < min(1, p(d) / q(d)), u uniform."""
    return u * q_d < p_d


def argmax(logits: torch.Tensor) -> torch.Tensor:
    """Each row's first largest value's index (a NaN counts as largest), as torch's argmax
    gives it: on the CPU through numpy's, several times faster for a row of a vocabulary's
    logits; on a GPU in parts (argmax_in_parts)."""
    if logits.is_cpu:
        return torch.from_numpy(np.argmax(logits.numpy(), axis=-1))
    return argmax_in_parts(logits)


ARGMAX_PARTS = 256  # the most parts argmax_in_parts splits a row into


def argmax_in_parts(logits: torch.Tensor) -> torch.Tensor:
    """torch's argmax of each row of [rows, vocab] logits in two reductions: each of up to
    ARGMAX_PARTS equal parts' first largest value and its index, then the first part whose
    value is largest (a NaN first). torch reduces one long row in one block of a GPU, but
    many parts side by side. Rows that do not split into at least 16 equal parts of 64 or
    more take torch's argmax."""
    if logits.dim() != 2:
        return logits.argmax(dim=-1)
    rows, vocab = logits.shape
    parts = math.gcd(vocab, ARGMAX_PARTS)
    if parts < 16 or vocab // parts < 64:
        return logits.argmax(dim=-1)
    width = vocab // parts
    values, inner = logits.reshape(rows, parts, width).max(dim=-1)
    part = values.argmax(dim=-1, keepdim=True)
    return (part * width + inner.gather(1, part)).squeeze(1)


def _accept_greedy(argmax: list[int], draft: list[int]) -> list[int]:
    """The draft's tokens while each is the model's argmax, then the model's own."""
    accepted = 0
    while accepted < len(draft) and draft[accepted] == argmax[accepted]:
        accepted += 1
    return argmax[: accepted + 1]


def _draw(weights: torch.Tensor, u: float) -> int:
    """The token whose cumulative weight first passes u x the total (inverse transform)."""
    cdf = weights.double().cumsum(dim=-1)
    token = int(torch.searchsorted(cdf, torch.tensor([u * float(cdf[-1])], dtype=cdf.dtype),
                                   right=True)[0])  # fmt: skip
    return min(token, weights.shape[0] - 1)


def _wants_logprobs(params: list[SamplingParams]) -> bool:
    return any(p.logprobs is not None for p in params)


def _row_masks(masks: list, widths: list[int]) -> list:
    """Per row, the mask of verify's per-sequence `masks` (see there)."""
    rows = []
    for mask, width in zip(masks, widths, strict=True):
        if mask is not None and mask.ndim == 2:  # Guides.masks gives one per verified row
            rows += list(mask)
        else:
            rows += [mask] * width
    return rows


def apply_masks(logits: torch.Tensor, masks: list | None) -> torch.Tensor:
    """Every token a guided row may not sample (bit i % 32 of word i // 32 clear) pushed to
    BARRED, which no softmax gives any probability. (A large finite value added, because
    torch's masked_fill runs several times slower than an add on the CPU.) The log
    probabilities reported stay the model's own."""
    rows = [i for i, m in enumerate(masks or ()) if m is not None]
    if not rows:
        return logits
    words = np.stack([masks[i] for i in rows])  # [rows, words] int32, little-endian bits
    bits = np.unpackbits(words.view(np.uint8), axis=1, bitorder="little")[:, : logits.shape[1]]
    barred = torch.from_numpy(bits).float().sub_(1).to(logits.device)  # 0 allowed, -1 barred
    if len(rows) == logits.shape[0]:
        return torch.addcmul(logits, barred, _BARRED)
    logits = logits.clone()
    index = _on(logits, rows)
    logits[index] = torch.addcmul(logits[index], barred, _BARRED)
    return logits


BARRED = -1e30  # a barred token's logit (less the model's, which is negligible beside it)
_BARRED = torch.tensor(-BARRED)


def _apply_penalties(logits, params: list[SamplingParams], histories) -> torch.Tensor:
    """Repetition (prompt and output tokens, as in transformers/vLLM), frequency and
    presence (output tokens, as in the OpenAI API) penalties."""
    rows = [i for i, p in enumerate(params) if p.penalized]
    if not rows:
        return logits
    logits = logits.clone()
    vocab = logits.shape[1]
    for i in rows:
        p, (prompt, output) = params[i], histories[i]
        row = logits[i]
        if p.repetition_penalty != 1:
            seen = _on(logits, sorted(set(prompt) | set(output)), torch.long)
            values = row[seen]
            row[seen] = torch.where(
                values > 0, values / p.repetition_penalty, values * p.repetition_penalty
            )
        if output and (p.frequency_penalty or p.presence_penalty):
            counts = torch.bincount(_on(logits, output), minlength=vocab)[:vocab].float()
            row -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).float()
    return logits


def _filtered_probs(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Softmax with top-k, top-p and min-p applied; only the rows that set one are sorted."""
    probs = logits.softmax(dim=-1)
    rows = [i for i, p in enumerate(params) if p.top_k > 0 or p.top_p < 1 or p.min_p > 0]
    if rows:
        index = _on(logits, rows)
        probs[index] = _filtered_rows(logits[index], [params[i] for i in rows])
    return probs


def _filtered_rows(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    vocab = logits.shape[1]
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    top_k = _on(logits, [min(p.top_k, vocab) if p.top_k > 0 else vocab for p in params])[:, None]
    ranks = torch.arange(vocab, device=logits.device)[None, :]
    sorted_logits = sorted_logits.masked_fill(ranks >= top_k, -torch.inf)
    probs = sorted_logits.softmax(dim=-1)
    top_p = _on(logits, [p.top_p for p in params])[:, None]
    # keep a token while the mass before it is below top_p (the first is always kept)
    before = probs.cumsum(dim=-1) - probs
    min_p = _on(logits, [p.min_p for p in params])[:, None]
    drop = (before >= top_p) | (probs < min_p * probs[:, :1])
    probs = probs.masked_fill(drop, 0)
    return torch.zeros_like(probs).scatter_(1, order, probs)


def _results(tokens: torch.Tensor, logprobs, params: list[SamplingParams]) -> list[Sampled]:
    ids = tokens.tolist()
    if logprobs is None:
        return [Sampled(t) for t in ids]
    out = []
    for i, (token, p) in enumerate(zip(ids, params, strict=True)):
        if p.logprobs is None:
            out.append(Sampled(token))
            continue
        values, top = logprobs[i].topk(p.logprobs)  # logprobs=0: the chosen token only
        pairs = list(zip(top.tolist(), values.tolist(), strict=True))
        out.append(Sampled(token, float(logprobs[i, token]), pairs))
    return out


def _token_results(tokens: list[int], logprobs, p: SamplingParams) -> list[Sampled]:
    """Sampled entries of one sequence's consecutive rows (logprobs: theirs, or None)."""
    if logprobs is None or p.logprobs is None:
        return [Sampled(t) for t in tokens]
    return _results(torch.tensor(tokens), logprobs, [p] * len(tokens))


def score(logits: torch.Tensor, token_ids: list[int], top_n: int) -> list[Sampled]:
    """Log probabilities of given tokens (one per row of `logits`), with each row's top n:
    how prompt tokens are scored for echo."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    chosen = logprobs.gather(1, _on(logprobs, token_ids)[:, None])[:, 0].tolist()
    values, top = logprobs.topk(top_n, dim=-1)
    return [
        Sampled(t, lp, list(zip(ids, vs, strict=True)))
        for t, lp, ids, vs in zip(token_ids, chosen, top.tolist(), values.tolist(), strict=True)
    ]
