"""Structured outputs: JSON schemas, regular expressions, Lark grammars and choices guide what
a sequence samples, in the engine and through the server with the official openai client.
A random-init tiny model would otherwise emit garbage, so every valid answer is the guide's
doing."""

from __future__ import annotations

import json
import random
from contextlib import contextmanager
from dataclasses import replace

import numpy as np
import pytest
import torch

from llmkit.runtime import guide as guide_module
from llmkit.runtime.engine import LLM, EngineConfig
from llmkit.runtime.guide import Guide, choice_guide
from llmkit.runtime.layers.sampler import BARRED, apply_masks
from llmkit.runtime.sequence import SamplingParams
from tests.serve_helpers import start_server

openai = pytest.importorskip("openai")
jsonschema = pytest.importorskip("jsonschema")

# Nested objects, arrays, enums, required fields; strings and arrays bounded so that a
# random model's answer ends well within max_tokens.
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 6},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "role": {"enum": ["king", "queen", "fool"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 4}, "maxItems": 3},
        "home": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 5}, "near": {"type": "boolean"}},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
    "required": ["name", "role", "home"],
    "additionalProperties": False,
}
MAX_TOKENS = 160


def test_masks_set_exactly_the_disallowed_tokens_to_minus_infinity():
    """The sampler reads bit i % 32 of word i // 32 (against Python's integer shifts)."""
    rng = np.random.default_rng(0)
    vocab = 77
    logits = torch.randn(3, vocab)
    masks = [rng.integers(-(2**31), 2**31, size=3, dtype=np.int64).astype(np.int32), None,
             rng.integers(-(2**31), 2**31, size=3, dtype=np.int64).astype(np.int32)]  # fmt: skip
    out = apply_masks(logits, masks)
    for row, mask in enumerate(masks):
        if mask is None:
            assert torch.equal(out[row], logits[row])
            continue
        bits = np.array([(int(mask[i // 32]) >> (i % 32)) & 1 for i in range(vocab)], bool)
        assert torch.equal(out[row] < BARRED / 2, torch.from_numpy(~bits))
        assert torch.equal(out[row][bits], logits[row][bits])
        assert torch.softmax(out[row], -1)[~bits].sum() == 0  # no probability left there


@pytest.fixture(scope="module")
def llm(tiny_dir):
    engine = LLM(tiny_dir(), EngineConfig())
    yield engine
    engine.close()


def test_guided_and_unguided_requests_share_a_batch(llm):
    """Every guided answer validates; the unguided request in the same steps gets exactly
    what it gets alone."""
    guided = SamplingParams(max_tokens=MAX_TOKENS, temperature=1.0, seed=5, n=3,
                            guide=Guide("json", json.dumps(PERSON)))  # fmt: skip
    plain = SamplingParams(max_tokens=24, temperature=0)
    alone = llm.generate(["The king"], plain)[0].outputs[0]
    outs = llm.generate(["Hello", "The king", "Once"], [guided, plain, guided])
    for out in (outs[0], outs[2]):
        for c in out.outputs:
            assert c.finish_reason == "stop", c.text
            jsonschema.validate(json.loads(c.text), PERSON)
    assert outs[1].outputs[0].token_ids == alone.token_ids


def test_regex_lark_and_choice_guides(llm):
    params = {"max_tokens": 40, "temperature": 1.0, "seed": 1}
    guides = {
        "regex": (Guide("regex", r"[0-9]{3}-(yes|no)"), r"[0-9]{3}-(yes|no)"),
        "lark": (Guide("lark", 'start: "(" NUM ("+" NUM)* ")"\nNUM: /[1-9][0-9]?/'),
                 r"\([1-9][0-9]?(\+[1-9][0-9]?)*\)"),
        "choice": (choice_guide(["red", "green", "a.b"]), r"red|green|a\.b"),
    }  # fmt: skip
    import re

    for name, (guide, pattern) in guides.items():
        for out in llm.generate(["x"] * 4, SamplingParams(guide=guide, **params)):
            text = out.outputs[0].text
            assert re.fullmatch(pattern, text), (name, text)
            assert out.outputs[0].finish_reason == "stop"


@pytest.mark.parametrize("preset", ["tiny-qwen2", "tiny-qwen3"])
def test_guides_on_a_tokenizer_loaded_through_transformers(tiny_dir, preset):
    """Qwen's tokenizer class is built by transformers (not llmkit's FastTokenizer): its
    tokenizer.json reaches the guide too, and the guided JSON answer validates."""
    llm = LLM(tiny_dir(preset), EngineConfig())
    try:
        params = SamplingParams(max_tokens=MAX_TOKENS, temperature=1.0, seed=2,
                                guide=Guide("json", json.dumps(PERSON)))  # fmt: skip
        out = llm.generate(["Hello"], params)[0].outputs[0]
    finally:
        llm.close()
    assert out.finish_reason == "stop", out.text
    jsonschema.validate(json.loads(out.text), PERSON)


@pytest.fixture(scope="module")
def server(tiny_dir, tmp_path_factory):
    srv = start_server(tiny_dir(), tmp_path_factory.mktemp("guided"))
    yield srv
    assert srv.stop() == 0


@pytest.fixture(scope="module")
def client(server):
    return server.client()


SCHEMA_FORMAT = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}
CHAT = [{"role": "user", "content": "Describe someone."}]


def test_fifty_sampled_json_schema_answers_validate(server, client):
    """Every answer validates, and tokens the schema forces were verified as drafts (the
    server runs no proposer; /metrics counts them)."""
    before = server.metrics()["llmkit_guided_forced_tokens_total"]
    rng = random.Random(0)
    for i in range(50):
        kwargs = {"max_tokens": MAX_TOKENS, "temperature": 1.0, "seed": rng.randrange(2**31)}
        if i % 2:
            out = client.chat.completions.create(
                model="ckpt", messages=CHAT, response_format=SCHEMA_FORMAT, **kwargs
            ).choices[0]
            text = out.message.content
        else:
            out = client.completions.create(
                model="ckpt", prompt="Someone:", extra_body={"response_format": SCHEMA_FORMAT},
                **kwargs,
            ).choices[0]  # fmt: skip
            text = out.text
        assert out.finish_reason == "stop", text
        jsonschema.validate(json.loads(text), PERSON)
    assert server.metrics()["llmkit_guided_forced_tokens_total"] > before + 50


def test_streamed_and_whole_answers_agree_for_n_choices(client):
    kwargs = {"model": "ckpt", "messages": CHAT, "response_format": SCHEMA_FORMAT, "n": 3,
              "max_tokens": MAX_TOKENS, "temperature": 1.0, "seed": 11}  # fmt: skip
    whole = client.chat.completions.create(**kwargs)
    streamed = [""] * 3
    for chunk in client.chat.completions.create(stream=True, **kwargs):
        for choice in chunk.choices:
            streamed[choice.index] += choice.delta.content or ""
    assert streamed == [c.message.content for c in whole.choices]
    for text in streamed:
        jsonschema.validate(json.loads(text), PERSON)


def test_json_object_and_completions_guides(client):
    out = client.chat.completions.create(
        model="ckpt", messages=CHAT, response_format={"type": "json_object"}, max_tokens=200,
        temperature=0,
    ).choices[0]  # fmt: skip
    if out.finish_reason == "stop":  # a greedy random model may nest until the budget ends
        assert isinstance(json.loads(out.message.content), dict)
    else:
        assert out.message.content.startswith("{")
    for field, value, pattern in [
        ("regex", "[a-c]{2,5}!", r"[a-c]{2,5}!"),
        ("choice", ["yes", "no"], r"yes|no"),
        ("grammar", 'start: "<" WORD ">"\nWORD: /[a-z]{1,6}/', r"<[a-z]{1,6}>"),
    ]:
        import re

        text = client.completions.create(
            model="ckpt", prompt="x", max_tokens=30, temperature=1.0, seed=2,
            extra_body={"structured_outputs": {field: value}},
        ).choices[0].text  # fmt: skip
        assert re.fullmatch(pattern, text), (field, text)


@pytest.mark.parametrize(
    ("extra", "param", "message"),
    [
        ({"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "objx"}}}},
         "response_format", "Invalid type: objx"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
         "response_format", "json_schema.schema"),
        ({"response_format": {"type": "xml"}}, "response_format", "json_object or json_schema"),
        ({"structured_outputs": {"regex": "[a-"}}, "structured_outputs", "regex"),
        ({"structured_outputs": {"grammar": "start: nothing"}}, "structured_outputs", "nothing"),
        ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "structured_outputs",
         "exactly one"),
        ({"structured_outputs": {"json": {"$ref": "#/nope"}}}, "structured_outputs", "nope"),
        ({"structured_outputs": {"regex": "a"}, "response_format": {"type": "json_object"}},
         "structured_outputs", "not both"),
    ],
)  # fmt: skip
def test_a_bad_guide_is_a_400_and_the_server_keeps_serving(server, client, extra, param, message):
    body = {"model": "ckpt", "messages": CHAT, "max_tokens": 5, **extra}
    status, _, answer = server.request("POST", "/v1/chat/completions", body)
    assert status == 400, answer
    assert answer["error"]["param"] == param and message in answer["error"]["message"], answer
    after = client.completions.create(
        model="ckpt", prompt="x", max_tokens=2, extra_body={"ignore_eos": True}
    )  # (a sampled end of sequence would stop it at 1)
    assert after.usage.completion_tokens == 2


def test_tensor_parallel_guides_as_one_rank_does(tiny_dir, llm):
    """Sampling happens on rank 0, beside the guides: tp=2 gives the tp=1 answers (greedy:
    the ranks' sums round differently, and a sampled token could tip)."""
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0,
                            guide=Guide("json", json.dumps(PERSON)))  # fmt: skip
    prompts = ["Hello", "Once upon"]
    one = [o.outputs[0].text for o in llm.generate(prompts, params)]
    tp2 = LLM(tiny_dir(), EngineConfig(tp=2))
    try:
        two = [o.outputs[0].text for o in tp2.generate(prompts, params)]
    finally:
        tp2.close()
    assert two == one
    for text in two:
        jsonschema.validate(json.loads(text), PERSON)


@pytest.mark.parametrize("proposer", ["ngram", "draft"])
def test_guided_requests_are_speculated_within_their_guide(tiny_dir, llm, proposer, monkeypatch):
    """Guided sequences' drafts, cut where the guide stops allowing them, verified under the
    guide's mask at each row, beside an unguided speculated request: the greedy guided
    answer and the unguided tokens are those of plain decoding, drafts of the guided
    sequences are accepted, and a seeded sampled guided answer validates and reproduces.
    The model as its own draft model chooses within the guide as the model does: its guided
    drafts run to full length but at the answer's end, every token accepted (unmasked, it
    would mostly choose tokens the guide does not allow). The proposer's drafts alone: no
    forced tokens (the next test), which would stand in for most of them."""
    monkeypatch.setattr(guide_module, "_forced", lambda matcher: [])
    person = Guide("json", json.dumps(PERSON))
    greedy = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, guide=person)
    sampled = SamplingParams(max_tokens=MAX_TOKENS, temperature=1.0, seed=3, guide=person)
    plain = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    prompts, params = ["Hello", "The king The king The king"], [greedy, plain]
    unspeculated = [replace(p, speculative=False) for p in params]
    expected = [o.outputs[0].token_ids for o in llm.generate(prompts, unspeculated)]
    spec = "ngram" if proposer == "ngram" else str(tiny_dir())
    config = EngineConfig(speculative=spec, speculative_max_seqs=8, draft_min_confidence=0)
    speculating = LLM(tiny_dir(), config)
    try:
        got = speculating.generate(prompts, params)
        guided_only = speculating.engine.spec_stats
        before = replace(guided_only)
        speculating.generate(["Hello"], greedy)
        guided_only = speculating.engine.spec_stats.since(before)
        twice = [speculating.generate(["Once"], sampled)[0].outputs[0] for _ in range(2)]
    finally:
        speculating.close()
    assert [o.outputs[0].token_ids for o in got] == expected
    assert guided_only.accepted > 0
    if proposer == "draft":
        assert guided_only.accepted == guided_only.proposed > 3.5 * guided_only.drafts
    assert twice[0].token_ids == twice[1].token_ids
    for text in (got[0].outputs[0].text, twice[0].text):
        jsonschema.validate(json.loads(text), PERSON)


def test_the_tokens_a_guide_forces_are_verified_as_drafts(llm):
    """Without any proposer, the tokens a guide forces (the schema's keys, quotes, braces:
    each the only one allowed) are a guided sequence's draft and all accepted: the greedy
    answer is plain decoding's, in a step fewer for about each of them; a seeded sampled
    answer validates and reproduces; `speculative: false` turns them off."""
    person = Guide("json", json.dumps(PERSON))
    greedy = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, guide=person)
    sampled = SamplingParams(max_tokens=MAX_TOKENS, temperature=1.0, seed=4, guide=person)
    engine, steps = llm.engine, [0]

    def run(params):
        before, steps[0] = replace(engine.spec_stats), 0
        outs = [llm.generate(["Hello"], params)[0].outputs[0] for _ in range(2)]
        return outs, engine.spec_stats.since(before), steps[0] // 2

    real = engine.step
    engine.step = lambda: steps.__setitem__(0, steps[0] + 1) or real()
    try:
        (plain, _), plain_stats, plain_steps = run(replace(greedy, speculative=False))
        (forced, _), stats, forced_steps = run(greedy)
        twice, _, _ = run(sampled)
    finally:
        del engine.step
    assert plain_stats.forced == 0 and stats.proposed == 0
    assert forced.token_ids == plain.token_ids
    assert stats.forced > len(plain.token_ids) // 4
    # a step a forced token, but where the answer ends with forced tokens (the step's own
    # token after them is not taken)
    assert stats.forced // 2 - 1 <= plain_steps - forced_steps <= stats.forced // 2
    assert twice[0].token_ids == twice[1].token_ids
    for text in (forced.text, twice[0].text):
        jsonschema.validate(json.loads(text), PERSON)


def test_a_long_literal_a_guide_forces_costs_a_step_one_mask(llm, monkeypatch):
    """The tokens a guide forces are computed once and then followed as the sequence takes
    them, and a step verifying them computes one mask for the sequence (after them), not
    one per row: inside a long literal both cost as much as what is left of it, so a
    request forcing one would otherwise slow every step of every request."""
    import re

    real, calls = guide_module._forced, []
    monkeypatch.setattr(guide_module, "_forced", lambda matcher: calls.append(1) or real(matcher))
    from llguidance import LLExecutor

    guides, rows, executor = llm.engine.guides, [], LLExecutor()

    class Counting:
        def unsafe_compute_mask_ptr(self, pairs, *args):
            rows.append(len(pairs))
            return executor.unsafe_compute_mask_ptr(pairs, *args)

    monkeypatch.setattr(guides, "_executor", Counting())
    literal = "the king and the queen " * 20
    params = SamplingParams(max_tokens=500, temperature=0,
                            guide=Guide("regex", re.escape(literal)))  # fmt: skip
    before = replace(llm.engine.spec_stats)
    out = llm.generate(["x"], params)[0].outputs[0]
    forced = llm.engine.spec_stats.since(before).forced
    assert out.text == literal and out.finish_reason == "stop"
    assert forced > 8 * 16  # more steps than ...
    assert len(calls) <= 2  # ... computations of the forced tokens
    assert len(rows) > 8 and max(rows) == 1


def test_a_draft_model_takes_the_tokens_a_guide_forces_as_given(tiny_dir, monkeypatch):
    """The model as its own draft model under a JSON schema: the tokens the guide forces,
    at a draft's start and after a token it drafted, go into its drafts as given (computed
    with its next step): none of its steps drafts a forced token, so it runs fewer steps
    than when it drafts them itself (forced tokens off), for plain decoding's answer, every
    token it drafted accepted."""
    from llmkit.runtime.speculative import DraftProposer

    greedy = SamplingParams(max_tokens=MAX_TOKENS, temperature=0,
                            guide=Guide("json", json.dumps(PERSON)))  # fmt: skip
    real, steps, forced_steps = DraftProposer._next_tokens, [0], [0]

    def counted(self, batch, trials):
        steps[0] += 1
        for mask in self.guides.trial_masks(trials).values():
            forced_steps[0] += int(np.unpackbits(mask.view(np.uint8)).sum() == 1)
        return real(self, batch, trials)

    def run(params=greedy):
        llm = LLM(tiny_dir(), EngineConfig(speculative=str(tiny_dir()), draft_min_confidence=0))
        try:
            steps[0] = forced_steps[0] = 0
            out = llm.generate(["Hello"], params)[0].outputs[0]
            return out.token_ids, llm.engine.spec_stats, steps[0], forced_steps[0]
        finally:
            llm.close()

    monkeypatch.setattr(DraftProposer, "_next_tokens", counted)
    plain, _, _, _ = run(replace(greedy, speculative=False))
    given, stats, given_steps, given_forced = run()
    monkeypatch.setattr(guide_module, "_forced", lambda matcher: [])
    drafted, drafted_stats, drafted_steps, drafted_forced = run()
    assert given == drafted == plain
    assert stats.forced > 0 and stats.accepted == stats.proposed > 0
    assert drafted_stats.forced == 0 and drafted_stats.accepted == drafted_stats.proposed
    assert given_forced == 0 < drafted_forced
    assert given_steps < drafted_steps


@contextmanager
def person_answer(llm):
    """PERSON's guide started for a seq_id no sequence of the engine has (released after),
    and the tokens of an answer it allows."""
    guides, tokenizer = llm.engine.guides, llm.engine.tokenizer
    text = '{"name":"ab","role":"king","home":{"city":"x"}}'
    good = [t for t in tokenizer.encode(text) if t != tokenizer.bos_token_id]
    seq_id = 10**9
    guides.start([seq_id], Guide("json", json.dumps(PERSON)))
    try:
        yield guides, seq_id, good
    finally:
        guides.release(seq_id)


def test_a_drafts_masks_are_those_after_each_of_its_tokens(llm):
    """Guides.masks for a sequence with a draft: row j is the mask after the draft's first j
    tokens (against a copy of the matcher fed one token at a time), rows after a token the
    guide does not allow allow everything, and the matcher is left where it was. The rows
    before the tokens the guide forces, set to allow each alone, equal those computed."""
    with person_answer(llm) as (guides, seq_id, good):
        assert guides.allowed(seq_id, good) == len(good)
        bad = [*good[:5], good[0], *good[6:9]]  # its first token again, where none may go
        assert guides.allowed(seq_id, bad) == 5
        masks = guides.masks([seq_id], {seq_id: bad})[seq_id]
        copy, words = guides.matchers[seq_id].deep_copy(), masks.shape[1]
        for j in range(6):
            row = np.full(words, -1, dtype=np.int32)
            copy.unsafe_compute_mask_ptr(row.ctypes.data, words * 4)
            assert np.array_equal(masks[j], row), j
            copy.consume_token(bad[j])
        assert masks.shape[0] == len(bad) + 1 and (masks[6:] == -1).all()
        assert guides.allowed(seq_id, good) == len(good)  # where it was
        # the rows before the tokens it forces are set, not computed: the same masks
        given = len(guides.forced(seq_id, len(good)))
        assert 0 < given < len(good) and good[:given] == guides.forced(seq_id, given)
        computed = guides.masks([seq_id], {seq_id: good})[seq_id]
        set_apart = guides.masks([seq_id], {seq_id: good}, {seq_id: given})[seq_id]
        assert np.array_equal(set_apart, computed)


def test_a_guide_on_trial_leaves_the_sequences_own_as_it_was(llm):
    """A draft model's tokens fed to a guide on trial (Guides.trials), up to a complete
    answer (its draft ends there) and one token it does not allow (not fed): the trial's
    masks follow them, and the sequence's own matcher gives the masks and allows the
    tokens it did before."""
    with person_answer(llm) as (guides, seq_id, good):
        before = guides.masks([seq_id])[seq_id].copy()
        trials = guides.trials([seq_id, seq_id + 1])  # the second is unguided
        assert list(trials) == [seq_id]
        trial, drafted = trials[seq_id], guides.masks([seq_id], {seq_id: good})[seq_id]
        for j, token in enumerate(good):
            assert np.array_equal(guides.trial_masks(trials)[seq_id], drafted[j]), j
            assert trial.feed(token) == (j < len(good) - 1), j  # complete after the last
        assert not trial.feed(good[0])
        assert np.array_equal(guides.masks([seq_id])[seq_id], before)
        assert guides.allowed(seq_id, good) == len(good)
