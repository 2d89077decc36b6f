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

from llmkit.runtime.layers.penalties import Penalties
from llmkit.runtime.sequence import SamplingParams


@dataclass(slots=True)
class Sampled:
    token_id: int
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None  # (token id, logprob), best first


class Sampler:
    def __init__(self) -> None:
        self.penalties = Penalties()  # keeps penalized sequences' tokens between steps

    def __call__(
        self,
        logits: torch.Tensor,  # [sequences, vocab] float32
        params: list[SamplingParams],
        histories: list[tuple[list[int], list[int]]],  # (prompt ids, output ids) per row
        seeds: list[int | None],  # per row: its sequence's seed, or None
        masks: list | None = None,  # per row: int32 bit mask of the tokens allowed, or None
        seq_ids: list | None = None,  # per row: its sequence's id, for Penalties to keep
    ) -> list[Sampled]:
        logprobs = torch.log_softmax(logits, dim=-1) if _wants_logprobs(params) else None
        logits = apply_masks(logits, masks)
        logits = self.penalties.apply(logits, params, histories, seq_ids)
        tokens = argmax(logits)
        random_rows = [i for i, p in enumerate(params) if not p.greedy]
        if random_rows:
            rows = _rows(logits, random_rows)
            keys = [None if seeds[i] is None else (seeds[i], _position(histories[i]))
                    for i in random_rows]  # fmt: skip
            tokens[rows] = _sample(logits[rows], [params[i] for i in random_rows], keys)
        asked = _Logprobs(logprobs, params, [tokens])
        ids, *read = fetch(tokens, *asked.tensors)
        asked.read(read)
        return [asked.entry(row, token) for row, token in enumerate(ids)]

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
        seq_ids: list | None = None,  # per sequence: its id, for Penalties to keep
    ) -> list[list[Sampled]]:
        """Each sequence's new tokens: the longest accepted prefix of its draft, then one
        token of the model's own (where the draft was rejected, or after the whole draft).

        Row j of a sequence's rows is the model's distribution after its tokens and
        draft[:j]. A sequence without a draft gets the token `__call__` would give it.
        Greedy rows accept a draft token that is the argmax; a seeded sampled sequence's
        rows one that is the token `__call__` draws there (the module's docstring). Other
        sampled rows use rejection sampling: accept draft token d with probability
        min(1, p(d) / q(d)), else draw from the residual max(p - q, 0), normalized, so
        every token is distributed as p however good the draft is. All of it is computed
        where the logits are, for every row at once; one read brings the rows' tokens,
        tests and log probabilities to the host (`fetch`)."""
        widths = [len(d) + 1 for d in drafts]

        def by_row(values: list) -> list:  # a value per sequence -> one per row
            return [v for v, w in zip(values, widths, strict=True) for _ in range(w)]

        row_params, row_histories = by_row(params), by_row(histories)
        extras = [draft[:j] for draft in drafts for j in range(len(draft) + 1)]  # before a row
        positions = [_position(h) + len(e) for h, e in zip(row_histories, extras, strict=True)]
        logprobs = torch.log_softmax(logits, dim=-1) if _wants_logprobs(params) else None
        if masks:
            logits = apply_masks(logits, _row_masks(masks, widths))
        logits = self.penalties.apply(logits, row_params, row_histories,
                                      seq_ids and by_row(seq_ids), extras)  # fmt: skip
        starts = [0, *itertools.accumulate(widths)]
        sampled = [i for i, p in enumerate(params) if not p.greedy]
        seeded = [i for i in sampled if seeds[i] is not None]
        rejecting = [i for i in sampled if seeds[i] is None]  # through rejection sampling
        chosen = argmax(logits)  # each row's token where it is certain: greedy, or seeded
        if seeded:
            chosen = self._seeded_rows(chosen, logits, row_params, positions, seeds, seeded,
                                       starts)  # fmt: skip
        rejected_rows = [r for i in rejecting for r in range(starts[i], starts[i + 1])]
        taken = torch.zeros(0, dtype=torch.bool, device=chosen.device)
        if rejecting:
            draft_rows = [[*drafts[i], 0] for i in rejecting]  # the row after a draft: none
            q = [draft_probs[i] if draft_probs else None for i in rejecting]
            index = _on(logits, rejected_rows)
            rows_params = [row_params[r] for r in rejected_rows]
            chosen[index], taken = _rejection(logits[index], rows_params, draft_rows, q)
        candidates = []  # per row, where log probabilities are asked: its draft token, its own
        if logprobs is not None:
            candidates = [_on(chosen, [t for draft in drafts for t in (*draft, 0)]), chosen]
        asked = _Logprobs(logprobs, row_params, candidates)
        chosen, taken, *read = fetch(chosen, taken, *asked.tensors)
        asked.read(read)
        return _verified(chosen, dict(zip(rejected_rows, taken, strict=True)), drafts, asked)

    def _seeded_rows(self, chosen, logits, row_params, positions, seeds, seeded, starts):
        """`chosen` with the rows of the `seeded` sequences (sequence i's from starts[i]) set
        to the token each draws at its position (row r's: positions[r]), as `__call__`
        draws it there."""
        rows = [(r, seeds[i]) for i in seeded for r in range(starts[i], starts[i + 1])]
        keys = [(seed, positions[r]) for r, seed in rows]
        index = _on(logits, [r for r, _ in rows])
        chosen[index] = _sample(logits[index], [row_params[r] for r, _ in rows], keys)
        return chosen

    def propose(self, logits: torch.Tensor, params: list[SamplingParams], keys: list) -> tuple:
        """A draft model's next token at each row of its logits [rows, vocab] (float32): its
        argmax for a greedy request, else drawn from its distribution under the request's
        temperature, top-k, top-p and min-p (a seeded one's with the model's uniforms at its
        key (seed, position), as `__call__` draws there; None: unseeded). Returns the tokens
        and the draft model's probability for each (under that distribution; for greedy,
        under its softmax), both where the logits are, for one read (`fetch`); and per row
        the distribution its token was drawn from, [vocab] where the logits are, where the
        rejection test takes it (None where the draft token is verified as the token the
        request takes there: greedy, seeded)."""
        tokens = torch.empty(len(params), dtype=torch.long, device=logits.device)
        confidence = torch.empty(len(params), dtype=torch.float32, device=logits.device)
        greedy = [i for i, p in enumerate(params) if p.greedy]
        drawn = [i for i, p in enumerate(params) if not p.greedy]
        q = [None] * len(params)
        if greedy:
            index = _rows(logits, greedy)
            picked = logits[index]
            tokens[index] = chosen = argmax(picked).to(logits.device)
            confidence[index] = torch.softmax(picked, -1).gather(1, chosen[:, None])[:, 0]
        if drawn:
            index = _rows(logits, drawn)
            probs = _filtered(logits[index], [params[i] for i in drawn])
            tokens[index] = chosen = _draw_rows(probs, [keys[i] for i in drawn])
            probs = probs / probs.sum(dim=-1, keepdim=True)
            confidence[index] = probs.gather(1, chosen[:, None])[:, 0]
            for row, i in zip(probs, drawn, strict=True):
                q[i] = row if keys[i] is None else None
        return tokens, confidence, q


def _verified(chosen: list[int], tested: dict[int, bool], drafts: list[list[int]], asked):
    """Each sequence's Sampled entries: its draft's tokens up to the first one rejected
    (`tested`: the rejection tests of the rows of sequences verified by them; the others'
    draft tokens stand where they are the token `chosen` at their row), then the token
    `chosen` at the row after them."""
    out, first = [], 0
    for draft in drafts:
        own = chosen[first : first + len(draft) + 1]
        if first in tested:
            kept = next((j for j in range(len(draft)) if not tested[first + j]), len(draft))
            tokens = [*draft[:kept], own[kept]]
        else:
            tokens = _accept_greedy(own, draft)
        last = len(tokens) - 1  # the model's own token; the draft's before it
        out.append([asked.entry(first + j, t, int(j == last)) for j, t in enumerate(tokens)])
        first += len(draft) + 1
    return out


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
        index = _rows(weights, fresh)
        tokens[index] = _inverse_cdf(weights[index], torch.rand(len(fresh), dtype=torch.float64))
    if seeded:
        index = _rows(weights, seeded)
        tokens[index] = _split_draw(weights[index], [keys[i] for i in seeded])
    return tokens


CDF_PART = 1024  # tokens per part of a row in `_inverse_cdf`


def _inverse_cdf(weights: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Each row's first token whose cumulative weight passes its u (float64, drawn on the
    CPU whatever the device) x the row's total, in two levels: the row's parts of CDF_PART
    tokens summed (float32 sums, added up in float64), the part where it passes found, and
    the token within that part by its float64 cumulative weights. A float64 cumsum of whole
    rows costs several times more, the CPU's widening of every weight most of it."""
    rows, vocab = weights.shape
    width = min(vocab, CDF_PART)
    whole = vocab // width * width
    sums = weights[:, :whole].reshape(rows, -1, width).sum(dim=-1)
    if whole < vocab:
        sums = torch.cat([sums, weights[:, whole:].sum(dim=-1, keepdim=True)], dim=1)
    cdf = sums.double().cumsum(dim=-1)
    target = u.to(cdf.device, non_blocking=True)[:, None] * cdf[:, -1:]
    part = torch.searchsorted(cdf, target, right=True).clamp_(max=cdf.shape[1] - 1)
    before = torch.where(part > 0, cdf.gather(1, (part - 1).clamp_(min=0)), 0.0)
    columns = part * width + torch.arange(width, device=weights.device)
    inside = weights.gather(1, columns.clamp(max=vocab - 1)).double()
    inside = torch.where(columns < vocab, inside, 0.0)
    within = before + inside.cumsum(dim=-1)
    found = torch.searchsorted(within, target, right=True)
    # past the part's end only by rounding (its sum and its cumsum differ): its last token
    # of any weight
    last = torch.where(inside > 0, torch.arange(width, device=weights.device), 0).amax(dim=-1)
    found = torch.where(found < width, found, last[:, None])
    return columns.gather(1, found)[:, 0]


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
    if weights.is_cpu:  # row by row, a sum a halving: no cumulative weights of whole rows
        exact = weights.dtype in (torch.float32, torch.float64)
        table = (weights if exact else weights.float()).numpy()
        return torch.tensor([_descend(table[r], u[r]) for r in range(rows)], dtype=torch.long)
    from llmkit.kernels.triton_sampling import descend  # a GPU's: one launch for all rows

    cdf = torch.nn.functional.pad(weights.double().cumsum(dim=-1), (1, 0))
    return descend(cdf, _on(cdf, u, torch.float64))  # u drawn on the CPU


def _descend(weights: np.ndarray, u: list[float]) -> int:
    """The token `_split_draw` draws for one row of `weights` (not normalized),
    `u` a uniform per halving: the range's weight and its lower half's summed in float64,
    the upper half's weight their difference (none where that is not above 0). Where
    rounding left the upper half a weight it does not have, its last token of any weight
    below (the lower half's: it has them all)."""
    lo, hi = 0, len(weights)
    total = weights.sum(dtype=np.float64)
    for level_u in u:
        if hi - lo <= 1:
            break
        mid = (lo + hi) // 2
        lower = weights[lo:mid].sum(dtype=np.float64)
        if level_u * total < lower or total - lower <= 0:
            hi, total = mid, lower
        else:
            lo, total = mid, total - lower
    if weights[lo] > 0:
        return lo
    return int(np.flatnonzero(weights[:lo])[-1])


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


def _rows(like: torch.Tensor, rows: list[int]) -> torch.Tensor | slice:
    """An index of `rows` of `like`: all of them as a slice (indexing with it copies
    nothing), else as a tensor on its device."""
    if len(rows) == len(like) and rows == list(range(len(like))):
        return slice(None)
    return _on(like, rows)


def _on(like: torch.Tensor, values: list, dtype: torch.dtype | None = None) -> torch.Tensor:
    """torch.tensor(values) on `like`'s device (built on the CPU, copied once)."""
    return torch.tensor(values, dtype=dtype).to(like.device, non_blocking=True)


def accepts(u: torch.Tensor, p_d: torch.Tensor, q_d: torch.Tensor) -> torch.Tensor:
    """Rejection sampling's test for draft tokens d, row by row: u < min(1, p(d) / q(d)),
    u uniform."""
    return u * q_d < p_d


def _rejection(logits, params: list[SamplingParams], drafts: list[list[int]], q: list):
    """Rejection sampling over the rows of sequences (`drafts`: each one's draft tokens
    and a 0 for its row after them; `q`: each one's draft distributions [len(draft) - 1,
    vocab], or None where each token was chosen for sure) at once: each row's test of its
    draft token, and the token it takes where it fails (drawn from the residual
    max(p - q, 0); at a row after a draft, from p). Where a test passes, that draw is not
    read: the uniforms are independent, so the token a sequence takes at its first failed
    test is distributed as if drawn there alone."""
    kept = _filtered(logits, params)
    p = kept / kept.sum(dim=-1, keepdim=True)  # p(d) is a probability
    d = _on(p, [t for draft in drafts for t in draft])[:, None]
    residual, q_d = p.clone(), torch.ones(len(p), dtype=torch.float64, device=p.device)
    certain_rows, first = [], 0
    for draft, probs in zip(drafts, q, strict=True):
        rows = slice(first, first + len(draft) - 1)
        if probs is None:  # q is 1 at the draft token
            certain_rows += range(rows.start, rows.stop)
        else:
            drafted = probs[: len(draft) - 1].to(p.device, p.dtype, non_blocking=True)
            residual[rows] = (p[rows] - drafted).clamp_(min=0)
            q_d[rows] = drafted.gather(1, d[rows])[:, 0].double()
        first += len(draft)
    if certain_rows:
        index = _on(p, certain_rows)  # (a scalar set through tensor indices waits for its copy)
        residual[index] = residual[index].scatter_(1, d[index], 0.0)
    u = torch.rand(len(p), dtype=torch.float64).to(p.device, non_blocking=True)
    taken = accepts(u, p.gather(1, d)[:, 0].double(), q_d)
    residual = torch.where(residual.sum(dim=-1, keepdim=True) > 0, residual, p)  # p = q: p
    return _inverse_cdf(residual, torch.rand(len(p), dtype=torch.float64)), taken


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
    barred = torch.from_numpy(bits).float().sub_(1)  # 0 allowed, -1 barred
    barred = barred.to(logits.device, non_blocking=True)
    if len(rows) == logits.shape[0]:
        return torch.addcmul(logits, barred, _BARRED)
    logits = logits.clone()
    index = _on(logits, rows)
    logits[index] = torch.addcmul(logits[index], barred, _BARRED)
    return logits


BARRED = -1e30  # a barred token's logit (less the model's, which is negligible beside it)
_BARRED = torch.tensor(-BARRED)


def _filtered_probs(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Softmax with top-k and top-p applied (only the rows that set one are ordered), and
    min-p: a token below min_p x the largest probability dropped, which is a logit below
    the largest + log(min_p), whatever the normalization top-k gave the row."""
    probs = logits.softmax(dim=-1)
    rows = [i for i, p in enumerate(params) if p.top_k > 0 or p.top_p < 1]
    if rows:
        index = _rows(logits, rows)
        probs[index] = _filtered_rows(probs[index], [params[i] for i in rows])
    rows = [i for i, p in enumerate(params) if p.min_p > 0]
    if rows:
        index = _rows(logits, rows)
        row_logits = logits[index]
        log_min_p = _on(logits, [math.log(params[i].min_p) for i in rows])[:, None]
        floor = row_logits.amax(dim=-1, keepdim=True) + log_min_p
        probs[index] = probs[index].masked_fill(row_logits < floor, 0)
    return probs


TOP_CANDIDATES = 256  # the best tokens of a row that top-k and top-p look at first


def _filtered_rows(probs: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Each row of `probs` (a softmax) over its top-k tokens (all where top_k is 0),
    renormalized, without the tokens past its nucleus (kept while the mass before them is
    below top_p; the first always); not renormalized again. Each row's best TOP_CANDIDATES
    tokens (or top_k, where more) are found first, several times cheaper than sorting a
    vocabulary: enough for a row with a top-k. A row with only a top-p has its nucleus
    found over the whole row (`_whole_nucleus`) on a GPU, where telling whether it reaches
    past them would wait for it; on the CPU only where it does (at once where that many
    tokens hold less than top_p even at the row's largest probability)."""
    vocab = probs.shape[1]
    top_k = [min(p.top_k, vocab) if p.top_k > 0 else vocab for p in params]
    width = min(vocab, max([TOP_CANDIDATES] + [k for k in top_k if k < vocab]))
    whole = [k == vocab for k in top_k]  # the rows whose nucleus is found over them whole
    if probs.is_cpu and width < vocab:
        most = (probs.amax(dim=-1) * width).tolist()
        whole = [w and m < p.top_p for w, m, p in zip(whole, most, params, strict=True)]
    rows = [i for i, w in enumerate(whole) if not w]
    if not rows:
        return _whole_nucleus(probs, params)
    index = _rows(probs, rows)
    best = probs[index].topk(width, dim=-1)
    part, reaching = _kept(*best, [top_k[i] for i in rows], [params[i] for i in rows], vocab)
    if probs.is_cpu:  # a row with a top-k never reaches past them
        for j in reaching.nonzero()[:, 0].tolist():
            whole[rows[j]] = True
    if not any(whole):
        return part
    kept = torch.zeros_like(probs)
    kept[index] = part
    rows = [i for i, w in enumerate(whole) if w]
    index = _rows(probs, rows)
    kept[index] = _whole_nucleus(probs[index], [params[i] for i in rows])
    return kept


def _whole_nucleus(probs: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """`probs` without each row's tokens past its nucleus, looking at every token: on the
    CPU by a radix select (`_nucleus`), several times cheaper there than a sort; on a GPU
    by a sort, which there takes less time than the select's launches (measured on an
    H200 at 128,256 ids, 1 to 256 rows)."""
    if probs.is_cpu:
        return _nucleus(probs, [p.top_p for p in params])
    vocab = probs.shape[1]
    return _kept(*probs.sort(dim=-1, descending=True), [vocab] * len(params), params, vocab)[0]


NUCLEUS_BITS = (11, 11, 10)  # a float32's bits, highest first, `_nucleus` takes a pass each


def _nucleus(probs: torch.Tensor, top_p: list[float]) -> torch.Tensor:
    """`probs` (rows of a softmax, float32) without each row's tokens past its nucleus: a
    token is kept where the mass of the tokens more likely than it is below top_p (tied
    tokens alike), as a sorted row's cumulative mass keeps them, without a sort. A radix
    select: a non-negative float32 orders as its bits, so each pass sums the row's mass
    (float64) by the value of its next NUCLEUS_BITS bits, among the tokens whose higher
    bits are those found so far (the others go to an extra bin), and takes the largest
    value where the mass at or above it reaches top_p; the bits found make the least
    probability kept. A few passes over the row, on any device, with no read."""
    rows = len(probs)
    keys = probs.contiguous().view(torch.int32)
    weights = probs.double().flatten()
    goal = _on(probs, top_p, torch.float64)[:, None]
    above = torch.zeros(rows, 1, dtype=torch.float64, device=probs.device)  # found's mass
    found = torch.zeros(rows, 1, dtype=torch.int32, device=probs.device)
    low = 32
    for bits in NUCLEUS_BITS:
        low -= bits
        size = 1 << bits
        digits = (keys >> low) & (size - 1)
        if low + bits < 32:
            digits.masked_fill_((keys >> (low + bits)) != (found >> (low + bits)), size)
        bins = torch.arange(0, rows * (size + 1), size + 1, dtype=torch.int32,
                            device=probs.device)[:, None]  # fmt: skip
        masses = torch.zeros(rows * (size + 1), dtype=torch.float64, device=probs.device)
        masses = masses.index_add_(0, (digits + bins).flatten(), weights).view(rows, -1)
        masses = masses[:, :size]
        at_or_above = masses.flip(-1).cumsum(-1).flip(-1) + above
        # the largest value reaching top_p (0 where none does: a sum short of it by rounding)
        digit = ((at_or_above >= goal).sum(-1, keepdim=True) - 1).clamp_(min=0)
        above = at_or_above.gather(1, digit) - masses.gather(1, digit)
        found |= digit.to(torch.int32) << low
    return probs.masked_fill(keys < found, 0)


def _kept(probs, order, top_k: list[int], params: list[SamplingParams], vocab: int):
    """`_filtered_rows` of the rows whose best tokens, best first, have probabilities
    `probs` and ids `order`, and whether each row's nucleus may reach past these."""
    width = probs.shape[1]
    top_k_t = _on(probs, top_k)[:, None]
    if min(top_k) < vocab:
        ranks = torch.arange(width, device=probs.device)[None, :]
        probs = probs.masked_fill(ranks >= top_k_t, 0)
        probs = torch.where(top_k_t < vocab, probs / probs.sum(dim=-1, keepdim=True), probs)
    top_p = _on(probs, [p.top_p for p in params])[:, None]
    cumulative = probs.cumsum(dim=-1)
    kept = torch.zeros(len(probs), vocab, dtype=probs.dtype, device=probs.device)
    kept.scatter_(1, order, probs.masked_fill(cumulative - probs >= top_p, 0))
    # the next token's mass before it is all the candidates'
    return kept, ~((top_k_t <= width) | (cumulative[:, -1:] >= top_p))[:, 0]


class _Logprobs:
    """The log probabilities of the rows whose requests ask for them, read with the step's
    tokens: per such row, that of each candidate token (a tensor of a token per row, the
    columns), and its top n (n the most any row asks)."""

    def __init__(self, logprobs, params: list[SamplingParams], candidates: list[torch.Tensor]):
        self.params = params
        self.asking = [] if logprobs is None else [
            i for i, p in enumerate(params) if p.logprobs is not None
        ]  # fmt: skip
        self.tensors: list[torch.Tensor] = []
        if self.asking:
            index = _rows(logprobs, self.asking)
            rows = logprobs[index]
            values, top = rows.topk(max(params[i].logprobs for i in self.asking), dim=-1)
            chosen = [rows.gather(1, c[index][:, None])[:, 0] for c in candidates]
            self.tensors = [*chosen, values, top]
        self.slots = {row: k for k, row in enumerate(self.asking)}

    def read(self, lists: list[list]) -> None:
        """Take `tensors`' values, as `fetch` read them."""
        if lists:
            *self.chosen, self.values, self.top = lists

    def entry(self, row: int, token: int, column: int = 0) -> Sampled:
        """Row `row`'s Sampled, where it took `token`, candidate `column`'s token there."""
        k = self.slots.get(row)
        if k is None:
            return Sampled(token)
        n = self.params[row].logprobs  # 0: the chosen token only
        pairs = list(zip(self.top[k][:n], self.values[k][:n], strict=True))
        return Sampled(token, self.chosen[column][k], pairs)


def fetch(*tensors: torch.Tensor) -> list[list]:
    """The tensors' values as (nested) lists, from one copy off their device, the one read
    of a step's results (float64 holds every token id and float32 value exactly)."""
    flat = torch.cat([t.reshape(-1).double() for t in tensors]).tolist() if tensors else []
    out, at = [], 0
    for t in tensors:
        values = flat[at : at + t.numel()]
        at += t.numel()
        if t.dtype == torch.bool:
            values = [v != 0 for v in values]
        elif not t.is_floating_point():
            values = [int(v) for v in values]
        if t.dim() == 2:
            width = t.shape[1]
            values = [values[r * width : (r + 1) * width] for r in range(t.shape[0])]
        out.append(values)
    return out


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
