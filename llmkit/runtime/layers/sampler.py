"""Turn each sequence's logits into its next token: penalties, temperature, top-k, top-p,
min-p, per-request seeds, and top-n log probabilities of the model's own distribution; and
verify speculated tokens against the model's distribution at each of their positions.

A seeded request's sampled token is drawn in halves (`_split_draw`), a uniform per
halving, and its uniforms at a position are a function of its seed and that position alone
(`uniforms_at`), so its token there depends on nothing but the distribution: not on what
the request is batched with, nor on whether it speculates. Its drafts are verified by that
rule: a draft token is taken where it is the token the request draws there, as greedy
drafts are taken where they are the argmax; so it gives the tokens of plain decoding, and a
draft model draws its tokens with the same uniforms (coupled to the model's draws). An
unseeded one's drafts go through rejection sampling, which accepts the most draft tokens a
lossless rule can."""

from __future__ import annotations

import itertools
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
    def __call__(
        self,
        logits: torch.Tensor,  # [sequences, vocab] float32
        params: list[SamplingParams],
        histories: list[tuple[list[int], list[int]]],  # (prompt ids, output ids) per row
        seeds: list[int | None],  # per row: its sequence's seed, or None
        masks: list | None = None,  # per row: int32 bit mask of the tokens allowed, or None
    ) -> list[Sampled]:
        logprobs = torch.log_softmax(logits, dim=-1) if _wants_logprobs(params) else None
        logits = apply_masks(logits, masks)
        logits = _apply_penalties(logits, params, histories)
        tokens = argmax(logits)
        random_rows = [i for i, p in enumerate(params) if not p.greedy]
        if random_rows:
            rows = torch.tensor(random_rows)
            keys = [None if seeds[i] is None else (seeds[i], _position(histories[i]))
                    for i in random_rows]  # fmt: skip
            tokens[rows] = _sample(logits[rows], [params[i] for i in random_rows], keys)
        return _results(tokens, logprobs, params)

    def verify(
        self,
        logits: torch.Tensor,  # [sum of (len(draft) + 1) over the sequences, vocab] float32
        params: list[SamplingParams],
        histories: list[tuple[list[int], list[int]]],
        seeds: list[int | None],  # per sequence: its seed, or None
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
        Greedy rows accept a draft token that is the argmax; a seeded sampled sequence's
        rows one that is the token `__call__` draws there (the module's docstring). Other
        sampled rows use rejection sampling: accept draft token d with probability
        min(1, p(d) / q(d)), else draw from the residual max(p - q, 0), normalized, so
        every token is distributed as p however good the draft is."""
        if not all(p.greedy and p.logprobs is None for p in params):
            logits = logits.cpu()  # sampled rows are drawn on the CPU
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
        starts = [0, *itertools.accumulate(widths)]
        sampled = [i for i, p in enumerate(params) if not p.greedy]
        seeded = [i for i in sampled if seeds[i] is not None]
        rejecting = [i for i in sampled if seeds[i] is None]  # through rejection sampling
        chosen = argmax(logits)  # each row's token where it is certain: greedy, or seeded
        if seeded:
            chosen = self._seeded_rows(chosen, logits, row_params, row_histories, seeds, seeded,
                                       starts)  # fmt: skip
        chosen = chosen.tolist()
        rejected_rows = [r for i in rejecting for r in range(starts[i], starts[i + 1])]
        probs = self._verify_probs(logits, row_params, rejected_rows)
        out, first = [], 0
        for i, (p, draft) in enumerate(zip(params, drafts, strict=True)):
            rows = range(first, first + len(draft) + 1)
            if i in rejecting:
                q = draft_probs[i] if draft_probs else None
                tokens = self._accept_sampled(probs[first : rows.stop], draft, q)
            else:
                tokens = _accept_greedy([chosen[r] for r in rows], draft)
            lp = None if logprobs is None else logprobs[first : rows.stop]
            out.append(_token_results(tokens, lp, p))
            first = rows.stop
        return out

    def _seeded_rows(self, chosen, logits, row_params, row_histories, seeds, seeded, starts):
        """`chosen` with the rows of the `seeded` sequences (sequence i's from starts[i]) set
        to the token each draws at its position, as `__call__` draws it there."""
        rows = [(r, seeds[i]) for i in seeded for r in range(starts[i], starts[i + 1])]
        keys = [(seed, _position(row_histories[r])) for r, seed in rows]
        index = torch.tensor([r for r, _ in rows])
        drawn = _sample(logits[index.to(logits.device)], [row_params[r] for r, _ in rows], keys)
        chosen[index] = drawn.to(chosen.device)
        return chosen

    def propose(
        self, logits: torch.Tensor, params: SamplingParams, seed: int | None, position: int
    ) -> tuple:
        """A draft model's next token from its logits [vocab] (float32): its argmax for a
        greedy request, else drawn from its distribution under the request's temperature,
        top-k, top-p and min-p (a seeded one's with the model's uniforms at `position`);
        that distribution, where the rejection test takes it (None where the draft token
        is verified as the token the request takes there: greedy, seeded); and the draft
        model's probability for the token."""
        if params.greedy:
            token = int(argmax(logits[None])[0])
            return token, None, float(torch.softmax(logits, dim=-1)[token])
        probs = _filtered(logits[None], [params])
        token = int(_draw_rows(probs, [None if seed is None else (seed, position)])[0])
        probs = probs[0] / probs[0].sum()
        return token, (None if seed is not None else probs), float(probs[token])

    def _verify_probs(self, logits: torch.Tensor, params: list[SamplingParams], rows: list[int]):
        """The distribution (temperature, top-k, top-p, min-p) of each of `rows`, the rows
        rejection sampling reads; the others are left as they are (not read)."""
        if not rows:
            return logits
        index = _on(logits, rows)
        probs = logits.clone()
        kept = _filtered(logits[index], [params[i] for i in rows])
        probs[index] = kept / kept.sum(dim=-1, keepdim=True)  # p(d) is a probability
        return probs

    def _accept_sampled(self, probs, draft: list[int], q):
        """Rejection sampling over one sequence's rows `probs` [len(draft) + 1, vocab]."""
        tokens = []
        for j, d in enumerate(draft):
            p_d, q_d = float(probs[j, d]), 1.0 if q is None else float(q[j, d])
            if accepts(_uniform(), p_d, q_d):
                tokens.append(d)
                continue
            if q is None:
                residual = probs[j].clone()
                residual[d] = 0
            else:
                residual = (probs[j] - q[j]).clamp_(min=0)
            if float(residual.sum()) <= 0:  # p and q equal up to rounding: p itself
                residual = probs[j]
            return [*tokens, _draw(residual)]
        return [*tokens, _draw(probs[len(draft)])]


def _sample(logits, params: list[SamplingParams], keys: list) -> torch.Tensor:
    """Each row's token under its request's temperature, top-k, top-p and min-p, drawn as
    `_draw_rows` draws it for its key (`keys`: (seed, position), or None)."""
    return _draw_rows(_filtered(logits, params), keys)


def _filtered(logits, params: list[SamplingParams]) -> torch.Tensor:
    """Each row's distribution under its request's temperature, top-k, top-p and min-p
    (not normalized)."""
    temperature = _on(logits, [p.temperature for p in params])[:, None]
    return _filtered_probs(logits / temperature, params)


def _draw_rows(weights: torch.Tensor, keys: list) -> torch.Tensor:
    """A token per row of `weights` [rows, vocab] (not normalized): a seeded row's (its key
    (seed, position)) drawn in halves with its uniforms there (`_split_draw`), for the
    coupling of a draft model's draws to the model's; an unseeded one's (None) by inverse
    transform with one fresh uniform (`_inverse_cdf`), which needs no more."""
    tokens = torch.empty(len(keys), dtype=torch.long, device=weights.device)
    fresh = [i for i, key in enumerate(keys) if key is None]
    seeded = [i for i, key in enumerate(keys) if key is not None]
    if fresh:
        index = _on(weights, fresh)
        tokens[index] = _inverse_cdf(weights[index], torch.rand(len(fresh), dtype=torch.float64))
    if seeded:
        index = _on(weights, seeded)
        tokens[index] = _split_draw(weights[index], [keys[i] for i in seeded])
    return tokens


def _inverse_cdf(weights: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Each row's first token whose cumulative weight passes its u (float64, drawn on the
    CPU whatever the device) x the row's total."""
    cdf = weights.double().cumsum(dim=-1)
    u_t = u.to(cdf.device, non_blocking=True)
    tokens = torch.searchsorted(cdf, u_t[:, None] * cdf[:, -1:], right=True)[:, 0]
    return tokens.clamp_(max=weights.shape[1] - 1)


def _split_draw(weights: torch.Tensor, keys: list[tuple[int, int]]) -> torch.Tensor:
    """A token per row of `weights` [rows, vocab] (not normalized), drawn in halves: the
    row's range of tokens split at its middle, the lower half taken where the level's
    uniform is below that half's share of the range's weight, the upper one else, down to
    one token: a draw from the row's weights, with its key's uniforms (`keys`: (seed,
    position), `uniforms_at`). Two rows with the same uniforms take the same token
    wherever their weights split alike on its way, whatever they are elsewhere: a draft
    model drawing with the model's uniforms draws the model's token more often than one
    uniform through the cumulative weights would."""
    rows, vocab = weights.shape
    levels = max(1, (vocab - 1).bit_length())
    u = [uniforms_at(*key, levels) for key in keys]
    cdf = torch.nn.functional.pad(weights.double().cumsum(dim=-1), (1, 0))
    if cdf.is_cpu:  # a few scalar steps a row, where tensor operations would cost more
        table = cdf.numpy()
        return torch.tensor([_descend(table[r], u[r]) for r in range(rows)], dtype=torch.long)
    from llmkit.kernels.triton_sampling import descend  # a GPU's: one launch for all rows

    return descend(cdf, _on(cdf, u, torch.float64))  # u drawn on the CPU


def _descend(cdf: np.ndarray, u: list[float]) -> int:
    """The token `_split_draw` draws for one row: `cdf` its cumulative weights after a 0,
    `u` a uniform per halving."""
    lo, hi = 0, len(cdf) - 1
    for level_u in u:
        if hi - lo <= 1:
            break
        mid = (lo + hi) // 2
        base = cdf[lo]
        if level_u * (cdf[hi] - base) < cdf[mid] - base:
            hi = mid
        else:
            lo = mid
    return lo


def _position(history: tuple[list[int], list[int]]) -> int:
    """The position of the token a row samples: the count of tokens before it."""
    prompt, output = history
    return len(prompt) + len(output)


def uniforms_at(seed: int, position: int, n: int) -> list[float]:
    """A seeded request's n uniforms in [0, 1) for its token at `position` (the count of
    tokens before it): Philox keyed by the seed, from the position's own stretch of its
    counter (2^64 draws apart), a function of the two alone."""
    philox = np.random.Philox(counter=position << 64, key=seed)
    return np.random.Generator(philox).random(n).tolist()


def _uniform() -> float:
    """An unseeded uniform in [0, 1) (torch's global generator)."""
    return float(torch.rand(1, dtype=torch.float64))


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


def _draw(weights: torch.Tensor) -> int:
    """A token drawn from `weights` [vocab] (not normalized), with a fresh uniform."""
    return int(_draw_rows(weights[None], [None])[0])


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
