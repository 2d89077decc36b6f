"""Sampler rules against direct computations, and request-level options through the engine."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from llmkit.runtime.engine import LLM, EngineConfig
from llmkit.runtime.layers import sampler as sampler_module
from llmkit.runtime.layers.penalties import Penalties
from llmkit.runtime.layers.sampler import (
    Sampler,
    _filtered_probs,
    _inverse_cdf,
    argmax,
    fetch,
)
from llmkit.runtime.sequence import SamplingParams
from tests.runtime_helpers import DEVICES, NEEDS_CUDA, interpreted, random_prompts


def sample(logits, params, seeds=None, histories=None):
    n = logits.shape[0]
    seeds = seeds or [None] * n
    histories = histories or [([1], [])] * n
    return Sampler()(
        logits, [params] * n if isinstance(params, SamplingParams) else params, histories, seeds
    )


def test_filters_that_leave_one_token_equal_greedy():
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(0))
    best = logits.argmax(-1).tolist()
    for params in (SamplingParams(top_k=1), SamplingParams(top_p=1e-6), SamplingParams(min_p=1)):
        assert [s.token_id for s in sample(logits, params)] == best


def test_top_k_draws_only_from_the_k_best():
    logits = torch.zeros(1, 10).index_fill_(1, torch.tensor([3, 7]), 1.0).repeat(400, 1)
    tokens = {s.token_id for s in sample(logits, SamplingParams(top_k=2))}
    assert tokens == {3, 7}


def test_draws_follow_the_softmax():
    logits = torch.tensor([[0.0, 1.0, 2.0]]).repeat(6000, 1)
    tokens = torch.tensor([s.token_id for s in sample(logits, SamplingParams(temperature=1))])
    freq = torch.bincount(tokens, minlength=3).float() / 6000
    assert torch.allclose(freq, torch.softmax(logits[0], -1), atol=0.02)


@pytest.mark.parametrize("vocab", [50, 4096, 3000])  # one part, whole parts, a part's tail
def test_the_inverse_transform_in_parts_takes_the_tokens_of_a_whole_rows_cumsum(vocab):
    g = torch.Generator().manual_seed(vocab)
    weights = torch.softmax(torch.randn(64, vocab, generator=g) * 4, -1)
    weights[weights < 1e-5] = 0  # runs of tokens no draw may take
    u = torch.rand(64, dtype=torch.float64, generator=g)
    cdf = weights.double().cumsum(-1)
    expected = torch.searchsorted(cdf, u[:, None] * cdf[:, -1:], right=True)[:, 0]
    assert _inverse_cdf(weights, u).tolist() == expected.tolist()


def test_the_inverse_transform_never_takes_a_token_without_weight():
    """Every part's last 100 tokens without weight, u the largest double below 1 (where a
    part's float32 sum and its float64 cumsum disagree by rounding, either way): the token
    drawn always has weight."""
    g = torch.Generator().manual_seed(9)
    weights = torch.rand(512, 3000, generator=g)
    for start in range(0, 3000, 1024):
        weights[:, start + 924 : start + 1024] = 0
    weights[:, 2900:] = 0
    drawn = _inverse_cdf(weights, torch.full((512,), 1 - 2**-53, dtype=torch.float64))
    assert bool((weights.gather(1, drawn[:, None]) > 0).all())
    assert _inverse_cdf(weights[:1], torch.zeros(1, dtype=torch.float64)).tolist() == [0]


def test_the_split_draws_descent_never_takes_a_token_without_weight():
    """Peaked rows (weights over many orders of magnitude, so float64 sums round) whose
    last tokens have no weight, every uniform the largest double below 1 (where a range's
    sum less its lower half's leaves the upper half a rounding's weight it does not have):
    the token drawn always has weight; at uniforms of 0, the first."""
    from llmkit.runtime.layers.sampler import _descend

    g = torch.Generator().manual_seed(10)
    for width in (300, 1001, 4096):
        weights = torch.softmax(torch.randn(100, width, generator=g) * 8, -1)
        weights[:, width * 5 // 8 :] = 0
        for row in weights.numpy():
            assert row[_descend(row, [1 - 2**-53] * 12)] > 0
            assert _descend(row, [0.0] * 12) == 0


def test_seeded_draws_and_filtered_rows_beside_unfiltered_ones_follow_their_distributions():
    """Each row its own seed; rows with top-p beside rows without: every row draws from its
    own distribution (the renormalized nucleus, or the whole softmax)."""
    logits = torch.tensor([[0.0, 1.0, 2.0, -1.0]]).repeat(8000, 1)
    nucleus = SamplingParams(temperature=1, top_p=0.8, seed=1)
    plain = SamplingParams(temperature=1, seed=1)
    params = [nucleus if i % 2 else plain for i in range(8000)]
    seeds = [1000 + i for i in range(8000)]
    tokens = torch.tensor([s.token_id for s in sample(logits, params, seeds)])
    softmax = torch.softmax(logits[0], -1)
    kept = torch.zeros(4).index_fill_(0, torch.tensor([1, 2]), 1) * softmax  # 0.64 + 0.24 > 0.8
    for rows, expected in ((tokens[0::2], softmax), (tokens[1::2], kept / kept.sum())):
        freq = torch.bincount(rows, minlength=4).float() / len(rows)
        assert torch.allclose(freq, expected, atol=0.025), (freq, expected)


def test_a_seeded_request_draws_the_same_tokens_whatever_it_is_batched_with():
    """A seeded row's token is a function of its seed, its position and its distribution:
    alone or beside others, in any row; at another position, with another uniform."""
    logits = torch.randn(4, 100, generator=torch.Generator().manual_seed(1))
    params = SamplingParams(temperature=1.5, seed=123)

    def token(rows, seeds, history=([1], [])):
        return Sampler()(rows, [params] * len(rows), [history] * len(rows), seeds)

    alone = token(logits[:1], [123])[0].token_id
    batched = token(logits[[1, 0, 2]], [None, 123, 5])
    assert batched[1].token_id == alone
    at = [token(logits[:1], [123], ([1], [2] * n))[0].token_id for n in range(40)]
    assert len(set(at)) > 5  # 40 positions, 40 draws of a 100-token distribution


def test_a_seeded_rows_uniforms_depend_on_its_seed_and_position_alone():
    """uniforms_at: the same for the same seed and position, another for another; over
    20,000 (seed, position) pairs (one seed at many positions, many seeds at one), each
    level's uniform is uniform (a chi-square test over 20 bins), not correlated with the
    next position's at that level, nor with the next level's."""
    from llmkit.runtime.layers.sampler import uniforms_at
    from tests.test_speculative import chi_square_p_value

    assert uniforms_at(7, 3, 4) == uniforms_at(7, 3, 4)
    assert uniforms_at(7, 3, 4) != uniforms_at(7, 4, 4) != uniforms_at(8, 3, 4)

    def uncorrelated(a: torch.Tensor, b: torch.Tensor) -> bool:
        return abs(float(torch.corrcoef(torch.stack([a, b]))[0, 1])) < 0.05

    for draws in ([uniforms_at(7, p, 3) for p in range(20_000)],
                  [uniforms_at(s, 5, 3) for s in range(20_000)]):  # fmt: skip
        u = torch.tensor(draws, dtype=torch.float64)
        for level in range(3):
            counts = torch.bincount((u[:, level] * 20).long(), minlength=20).double()
            assert chi_square_p_value(counts, torch.full((20,), 0.05)) > 1e-3
            assert uncorrelated(u[:-1, level], u[1:, level])
        assert uncorrelated(u[:, 0], u[:, 1])


def test_a_split_draw_follows_the_weights_and_couples_close_ones():
    """Each row's token is a draw from its weights (a chi-square test over 20,000 keyed
    draws of a 37-token distribution, an odd width); a second distribution close to the
    first, drawn with the same keys, takes the same token more often than it would from one
    uniform through the cumulative weights (computed exactly), and far more often than
    independent draws."""
    from llmkit.runtime.layers.sampler import _split_draw
    from tests.test_speculative import chi_square_p_value

    g = torch.Generator().manual_seed(4)
    p = torch.softmax(torch.randn(37, generator=g) * 2, -1).double()
    q = torch.softmax(p.log() + 0.3 * torch.randn(37, generator=g, dtype=torch.float64), -1)
    keys = [(11, n) for n in range(20_000)]
    drawn = _split_draw(torch.stack([p] * len(keys)), keys)
    assert chi_square_p_value(torch.bincount(drawn, minlength=37).double(), p) > 1e-3
    same = float((_split_draw(torch.stack([q] * len(keys)), keys) == drawn).double().mean())
    cp, cq = p.cumsum(0), q.cumsum(0)
    one_uniform = float((torch.minimum(cp, cq) - torch.maximum(cp - p, cq - q)).clamp(min=0).sum())
    independent = float((p * q).sum())
    assert same > one_uniform + 0.05 and same > independent + 0.2, (same, one_uniform)


def split_draws(device: str) -> list[list[int]]:
    """The tokens the split draw takes on `device` (from cumulative weights) and, beside
    them, the CPU's scalar descent's (_descend, from the weights, summed a halving at a
    time), over peaked and flat rows of an odd width."""
    from llmkit.kernels.triton_sampling import descend
    from llmkit.runtime.layers.sampler import _descend, uniforms_at

    g = torch.Generator().manual_seed(5)
    scale = torch.rand(64, 1, generator=g) * 8
    weights = torch.softmax(torch.randn(64, 1001, generator=g) * scale, -1)
    cdf = torch.nn.functional.pad(weights.double().cumsum(dim=-1), (1, 0))
    u = torch.tensor([uniforms_at(3, n, 10) for n in range(64)], dtype=torch.float64)
    scalar = [_descend(weights[r].numpy(), u[r].tolist()) for r in range(64)]
    return [descend(cdf.to(device), u.to(device)).tolist(), scalar]


def test_the_split_draws_kernel_interpreted_takes_the_tokens_of_the_scalar_descent():
    """A GPU descends every row in one Triton launch (kernels/triton_sampling.py), the CPU
    row by row: the same tokens, here through Triton's interpreter."""
    kernel, scalar = interpreted(
        "import json\n"
        "from tests.test_runtime_sampling import split_draws\n"
        "print(json.dumps(split_draws('cpu')))\n"
    )
    assert kernel == scalar


@NEEDS_CUDA
def test_the_split_draws_kernel_on_cuda_takes_the_tokens_of_the_scalar_descent():
    kernel, scalar = split_draws("cuda")
    assert kernel == scalar


@pytest.mark.parametrize("device", DEVICES)
def test_the_nucleus_without_a_sort_keeps_what_a_sorted_row_keeps(device):
    """_nucleus over peaked, flat and mixed rows of odd widths, top_p from 0.05 to 0.999:
    each row keeps the tokens the float64 definition keeps (sorted, the mass before a token
    below top_p), their probabilities unchanged. Tied probabilities at the edge are kept
    together; a token whose mass before it is top_p exactly is not; a row whose mass falls
    short of top_p (by rounding) keeps every token."""
    from llmkit.runtime.layers.sampler import _nucleus

    g = torch.Generator().manual_seed(11)
    for width in (7, 1001, 32000):
        scale = torch.tensor([0.1, 0.5, 2.0, 8.0] * 4)[:, None]
        logits = torch.randn(16, width, generator=g) * scale
        logits[::5, : width // 3] -= 30  # a third of some rows next to nothing
        top_p = [0.05, 0.3, 0.5, 0.8, 0.9, 0.95, 0.99, 0.999] * 2
        probs = torch.softmax(logits, -1)
        got = _nucleus(probs.to(device), top_p).cpu()
        for i, p in enumerate(top_p):
            expected = filtered_reference(logits[i], SamplingParams(top_p=p)) > 0
            assert torch.equal(got[i] > 0, expected), (width, i)
            assert torch.equal(got[i][expected], probs[i][expected])
    edges = torch.tensor([[0.4, 0.2, 0.2, 0.2], [0.4, 0.2, 0.2, 0.2], [0.3, 0.3, 0.2, 0.1],
                          [0.5, 0.375, 0.125, 0.0]])  # fmt: skip
    got = _nucleus(edges.to(device), [0.5, 0.3, 0.95, 0.875]).cpu()
    assert (got > 0).tolist() == [[True] * 4, [True, False, False, False], [True] * 4,
                                  [True, True, False, False]]  # fmt: skip


def test_penalties_match_their_definitions():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0]])
    params = SamplingParams(repetition_penalty=2.0, frequency_penalty=0.5, presence_penalty=0.25)
    got = Penalties().apply(logits, [params], [([0], [1, 1, 2])])
    # repetition on ids seen anywhere (0, 1, 2); frequency x count and presence on outputs
    expected = torch.tensor([[1.0, -2.0 - 1.0 - 0.25, 0.25 - 0.5 - 0.25, 3.0]])
    assert torch.allclose(got, expected)


def filtered_reference(row: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """top-k, top-p and min-p of one row by their definitions, in float64."""
    values, order = row.double().sort(descending=True)
    if p.top_k:
        values[p.top_k :] = -torch.inf
    probs = values.softmax(-1)
    before = probs.cumsum(-1) - probs
    probs[(before >= p.top_p) | (probs < p.min_p * probs[0])] = 0
    return torch.zeros_like(probs).scatter_(0, order, probs)


@pytest.mark.parametrize("device", DEVICES)
def test_top_k_top_p_and_min_p_keep_each_rows_definition(device):
    """Peaked and flat rows of 2,000 tokens: nuclei inside the CPU's first candidates and
    past them (those rows sorted whole), a top-k wider than the candidates, min-p alone
    and with both (its cut relative to the top-k tokens' largest probability)."""
    g = torch.Generator().manual_seed(8)
    peaked, flat = torch.randn(2000, generator=g) * 4, torch.randn(2000, generator=g) * 0.3
    cases = [(peaked, SamplingParams(top_p=0.9)), (flat, SamplingParams(top_p=0.95)),
             (flat, SamplingParams(top_k=300)), (peaked, SamplingParams(top_k=5, top_p=0.5)),
             (flat, SamplingParams(min_p=0.5)), (peaked, SamplingParams(min_p=0.05)),
             (flat, SamplingParams(top_k=280, top_p=0.8, min_p=0.2))]  # fmt: skip
    logits = torch.stack([row for row, _ in cases])
    got = _filtered_probs(logits.to(device), [p for _, p in cases]).cpu()
    for i, (row, p) in enumerate(cases):
        expected = filtered_reference(row, p)
        assert torch.equal(got[i] > 0, expected > 0), (i, int((got[i] > 0).sum()))
        assert torch.allclose(got[i].double(), expected, atol=1e-6), i


def penalized_reference(row: torch.Tensor, p: SamplingParams, prompt, output) -> list[float]:
    """A row's logits penalized for (prompt, output) by the definitions, in float64."""
    expected = row.double().tolist()
    for t in set(prompt) | set(output):
        v, r = expected[t], p.repetition_penalty
        expected[t] = v / r if v > 0 else v * r
    for t in set(output):
        expected[t] -= p.frequency_penalty * output.count(t) + p.presence_penalty
    return expected


def test_penalties_of_a_batch_match_each_rows_definition():
    """Rows with and without each penalty, histories with repeats, beside unpenalized
    rows: each row as its definition gives it, computed alone in float64."""
    rng = random.Random(3)
    logits = torch.randn(12, 40, generator=torch.Generator().manual_seed(3))
    params, histories = [], []
    for _ in range(12):
        params.append(SamplingParams(repetition_penalty=rng.choice([1.0, 1.3, 0.8]),
                                     frequency_penalty=rng.choice([0.0, 0.5, -0.4]),
                                     presence_penalty=rng.choice([0.0, 0.25])))  # fmt: skip
        histories.append(([rng.randrange(40) for _ in range(rng.randrange(6))],
                          [rng.randrange(40) for _ in range(rng.randrange(9))]))  # fmt: skip
    got = Penalties().apply(logits, params, histories)
    for row, (p, (prompt, output)) in enumerate(zip(params, histories, strict=True)):
        expected = penalized_reference(logits[row], p, prompt, output)
        assert got[row].double().tolist() == pytest.approx(expected, abs=1e-5), row


def test_penalties_kept_between_steps_follow_each_sequences_whole_history():
    """One Penalties over 60 steps of three sequences whose outputs grow (by a token, or
    by several: a verified draft), one missing every fifth step and then 20 in a row (its
    tokens dropped, read whole when it comes back), one whose output list is replaced
    (read afresh), rows with draft tokens after their history: every row as the
    definitions give it for its whole history."""
    rng = random.Random(4)
    p = SamplingParams(repetition_penalty=1.3, frequency_penalty=0.5, presence_penalty=0.25)
    penalties = Penalties()
    seqs = {i: ([rng.randrange(50) for _ in range(rng.randrange(1, 8))], []) for i in range(3)}
    for step in range(60):
        if step == 30:  # other tokens, as many, the same last one
            old = seqs[1][1]
            seqs[1] = (seqs[1][0], [(t + 1) % 50 for t in old[:-1]] + old[-1:])
        for _, output in seqs.values():
            output += [rng.randrange(50) for _ in range(rng.choice([1, 1, 3]))]
        ids = [i for i in seqs if not (i == 2 and (step % 5 == 0 or 20 <= step < 40))]
        extras = [[rng.randrange(50) for _ in range(rng.randrange(3))] for _ in ids]
        logits = torch.randn(len(ids), 50, generator=torch.Generator().manual_seed(step))
        histories = [seqs[i] for i in ids]
        got = penalties.apply(logits, [p] * len(ids), histories, ids, extras)
        if step == 39:  # its tokens were dropped: the kept ones stay few
            assert sorted(penalties.kept) == [0, 1]
        for row, ((prompt, output), extra) in enumerate(zip(histories, extras, strict=True)):
            expected = penalized_reference(logits[row], p, prompt, output + extra)
            assert got[row].double().tolist() == pytest.approx(expected, abs=1e-5), (step, row)


def test_logprobs_of_rows_asking_for_different_counts():
    """Rows asking for 0, 2 or 5 top log probabilities, or none, greedy and sampled, in one
    batch: each row's own, of the token it took."""
    logits = torch.randn(8, 30, generator=torch.Generator().manual_seed(4))
    counts = [None, 0, 2, 5, 2, None, 5, 0]
    params = [SamplingParams(temperature=0 if i % 2 else 1, logprobs=n)
              for i, n in enumerate(counts)]  # fmt: skip
    out = sample(logits, params)
    reference = torch.log_softmax(logits, -1)
    for row, (s, n) in enumerate(zip(out, counts, strict=True)):
        if n is None:
            assert s.logprob is None and s.top_logprobs is None
            continue
        values, ids = reference[row].topk(n)
        assert [t for t, _ in s.top_logprobs] == ids.tolist()
        assert [v for _, v in s.top_logprobs] == values.tolist()
        assert s.logprob == float(reference[row, s.token_id])


def test_fetch_reads_ids_values_and_flags_exactly():
    ids = torch.tensor([0, 2**52 + 1, 128_255])
    values = torch.tensor([[-0.1, -3.25e-7], [-17.5, float("-inf")]])
    flags = torch.tensor([True, False])
    got = fetch(ids, values, flags, torch.zeros(2, 0, dtype=torch.long))
    assert got == [ids.tolist(), values.tolist(), [True, False], [[], []]]
    assert all(type(t) is int for t in got[0]) and type(got[2][0]) is bool


def mixed_batch(device):
    """A plain step's, a verifying step's and a draft model's step's (`Sampler.propose`)
    arguments on `device`: every sampling option, log probabilities, a guide's mask,
    seeds, drafts of a draft model and of a lookup."""
    g = torch.Generator().manual_seed(5)
    vocab = 64
    params = [
        SamplingParams(temperature=0, logprobs=3, repetition_penalty=1.2),
        SamplingParams(temperature=0.8, top_k=10, top_p=0.9, seed=7),
        SamplingParams(temperature=1.0, min_p=0.05, frequency_penalty=0.5, logprobs=1),
        SamplingParams(temperature=1.0, presence_penalty=0.3, top_p=0.8),
    ]
    histories = [([1, 2, 3], [4, 4]), ([5], [6]), ([7, 8], [9, 9, 9]), ([2], [])]
    seeds = [None, 11, None, None]
    mask = np.array([-1, 0x0000FFFF], dtype=np.int32)  # ids 0-47 allowed
    masks = [None, None, mask, None]
    drafts = [[3, 4], [5], [6, 7, 8], [1]]  # the last a lookup's: no q
    q = torch.softmax(torch.randn(3, vocab, generator=g), -1).to(device)
    rows = sum(len(d) + 1 for d in drafts)
    verify = (torch.randn(rows, vocab, generator=g).to(device), params, histories, seeds, drafts,
              [None, None, q, None], masks)  # fmt: skip
    plain = (torch.randn(4, vocab, generator=g).to(device), params, histories, seeds, masks)
    keys = [None if s is None else (s, 7) for s in seeds]
    return plain, verify, (torch.randn(4, vocab, generator=g).to(device), params, keys)


@NEEDS_CUDA
def test_sampling_and_verifying_on_cuda_synchronize_only_to_read_the_results(monkeypatch):
    """Every option of a step, plain and verifying drafts, and a draft model's step with
    its drafts' distributions stacked as DraftProposer stacks them: no host-device
    synchronization on the way (torch's sync debug mode raises on one), one read at the
    end of each (`fetch`); the greedy and seeded tokens and the log probabilities are the
    CPU's."""
    from llmkit.runtime.speculative import _Drafting

    reads = []

    def read_once(*tensors):
        reads.append(len(tensors))
        torch.cuda.set_sync_debug_mode("default")
        try:
            return fetch(*tensors)
        finally:
            torch.cuda.set_sync_debug_mode("error")

    def drafted(sampler, logits, params, keys):
        tokens, confidence, q = sampler.propose(logits, params, keys)
        drafting = _Drafting(len(params), [], [])
        for token, chance, row in zip(*sampler_module.fetch(tokens, confidence), q, strict=True):
            drafting.add(token, row, chance)
        drafting.draft()
        return [sampler_module.Sampled(t) for t in drafting.tokens]

    results = {}
    for device in ("cpu", "cuda"):
        plain, verify, draft = mixed_batch(device)
        torch.manual_seed(0)
        if device == "cuda":
            Sampler()(*plain)  # Triton compiles the split draw's kernel first
            monkeypatch.setattr(sampler_module, "fetch", read_once)
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
        try:
            results[device] = (Sampler()(*plain), Sampler().verify(*verify),
                               drafted(Sampler(), *draft))  # fmt: skip
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert len(reads) == 3
    for cpu_rows, gpu_rows in zip(results["cpu"], results["cuda"], strict=True):
        for a, b in zip(cpu_rows[:2], gpu_rows[:2], strict=True):  # greedy, seeded
            assert _same_entries(a, b)


def _same_entries(a, b) -> bool:
    a, b = (x if isinstance(x, list) else [x] for x in (a, b))
    return [s.token_id for s in a] == [s.token_id for s in b] and all(
        (x.logprob is None) == (y.logprob is None)
        and (x.logprob is None or abs(x.logprob - y.logprob) < 1e-4)
        for x, y in zip(a, b, strict=True)
    )


def test_logprobs_are_the_models_own_distribution():
    logits = torch.randn(2, 30, generator=torch.Generator().manual_seed(2))
    out = sample(logits, SamplingParams(temperature=0, logprobs=3, repetition_penalty=1.5))
    reference = torch.log_softmax(logits, -1)
    for row, s in enumerate(out):
        values, ids = reference[row].topk(3)
        assert [t for t, _ in s.top_logprobs] == ids.tolist()
        assert [v for _, v in s.top_logprobs] == pytest.approx(values.tolist())
        assert s.logprob == pytest.approx(float(reference[row, s.token_id]))


def test_bad_sampling_values_are_refused():
    for bad in ({"top_p": 0}, {"temperature": -1}, {"max_tokens": 0}, {"n": 0}):
        with pytest.raises(ValueError):
            SamplingParams(**bad)


@pytest.fixture(scope="module")
def llm(tiny_dir):
    return LLM(tiny_dir(), EngineConfig())


def test_stop_strings_cut_the_text_and_finish(llm):
    prompt = "The king said"
    plain = llm.generate([prompt], SamplingParams(max_tokens=20, temperature=0, ignore_eos=True))
    text = plain[0].outputs[0].text
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    out = llm.generate(
        [prompt], SamplingParams(max_tokens=20, temperature=0, ignore_eos=True, stop=(stop,))
    )[0].outputs[0]
    assert out.finish_reason == "stop" and stop not in out.text
    assert text.startswith(out.text) and len(out.token_ids) < 20


def test_stop_token_ids_finish_with_that_token(llm):
    plain = llm.generate(
        [[1, 40, 41]], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    )[0].outputs[0]
    stop_id = plain.token_ids[3]
    out = llm.generate(
        [[1, 40, 41]],
        SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, stop_token_ids=(stop_id,)),
    )[0].outputs[0]
    assert out.token_ids == plain.token_ids[: plain.token_ids.index(stop_id) + 1]
    assert out.finish_reason == "stop"


def test_n_completions_share_the_prompt_and_differ(llm):
    prompt = random_prompts(1, 40, 41, seed=9)[0]
    before = llm.engine.block_manager.num_hit_blocks
    out = llm.generate([prompt], SamplingParams(n=3, max_tokens=12, temperature=1.0, seed=4))[0]
    assert [c.index for c in out.outputs] == [0, 1, 2]
    assert len({tuple(c.token_ids) for c in out.outputs}) == 3
    assert llm.engine.block_manager.num_hit_blocks - before == 2 * 2  # siblings reuse 2 blocks
    again = llm.generate([prompt], SamplingParams(n=3, max_tokens=12, temperature=1.0, seed=4))[0]
    assert [c.token_ids for c in again.outputs] == [c.token_ids for c in out.outputs]


@pytest.mark.parametrize("chunk", [2048, 7])
def test_prompt_logprobs_score_each_prompt_token_as_transformers_does(tiny_dir, chunk):
    from tests.runtime_helpers import hf_model

    path = tiny_dir()
    prompt = random_prompts(1, 30, 31, seed=5)[0]
    with torch.inference_mode():
        reference = torch.log_softmax(hf_model(path)(torch.tensor([prompt])).logits[0], -1)
    llm = LLM(path, EngineConfig(max_num_batched_tokens=chunk, max_num_seqs=4))
    try:
        params = SamplingParams(max_tokens=2, temperature=0, prompt_logprobs=2)
        # a second identical request: its prompt is scored again, not taken from the cache
        outs = llm.generate([prompt, prompt], params)
    finally:
        llm.close()
    for out in outs:
        scored = out.prompt_logprobs
        assert scored[0] is None and len(scored) == len(prompt)
        for pos in range(1, len(prompt)):
            entry, expected = scored[pos], reference[pos - 1]
            assert entry["token_id"] == prompt[pos]
            assert entry["logprob"] == pytest.approx(float(expected[prompt[pos]]), abs=1e-4)
            assert [t for t, _ in entry["top"]] == expected.topk(2).indices.tolist()


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=NEEDS_CUDA)])
@pytest.mark.parametrize("vocab", [128256, 32000, 4096, 50257])
def test_argmax_in_parts_is_torchs_argmax(vocab, device):
    """The GPU's two-reduction argmax (also on the CPU): a tie within a part and across
    parts, NaNs (the first one wins) and a row of -inf give torch's index; vocabularies that
    do not split into parts of 64 or more (4096, 50257) take torch's argmax itself."""
    from llmkit.runtime.layers.sampler import argmax_in_parts

    g = torch.Generator().manual_seed(vocab)
    logits = torch.randn(7, vocab, generator=g)
    logits[1, [vocab - 1, 5, vocab // 2]] = 9.0  # the same largest in three parts
    logits[2, [vocab // 3, 11]] = float("nan")
    logits[3] = float("-inf")
    logits[4] = torch.randint(0, 3, (vocab,), generator=g).float()  # ties everywhere
    logits[5, [600, 601]] = 50.0  # a tie inside one part
    logits = logits.to(device)
    assert torch.equal(argmax_in_parts(logits), logits.argmax(dim=-1))
    assert argmax_in_parts(logits).tolist()[1:4] == [5, 11, 0]


def test_argmax_is_torchs_first_largest_with_nan_largest():
    g = torch.Generator().manual_seed(0)
    logits = torch.randint(0, 4, (6, 50), generator=g).float()  # many ties per row
    logits[2, 7] = float("nan")
    logits[3] = float("-inf")
    logits[4, [3, 9]] = float("nan")
    assert torch.equal(argmax(logits), logits.argmax(dim=-1))
    assert torch.equal(argmax(logits[:, ::2]), logits[:, ::2].argmax(dim=-1))  # strided
