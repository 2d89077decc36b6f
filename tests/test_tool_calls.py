"""Tool calling: each family's way of writing calls read back (whole and as a stream grows),
and `tools` / `tool_choice` through the server with the official openai client. A random-init
tiny model calls no tool of its own accord, so forced calls (required, a named function) are
the guide's doing, and the auto path is driven by a structured-outputs regex that makes the
model write a call as the preset's template asks."""

from __future__ import annotations

import dataclasses
import json
import random
from types import SimpleNamespace

import pytest

from llmkit.checkpoint.fast_tokenizer import load_tokenizer
from llmkit.runtime.detokenizer import Detokenizer
from llmkit.runtime.engine import LLM, EngineConfig
from llmkit.runtime.sequence import SamplingParams
from llmkit.serve import tool_calls as tc
from llmkit.serve.handlers import _call_parser
from llmkit.serve.protocol import ApiError, ChatCompletionRequest
from tests.serve_helpers import start_server

openai = pytest.importorskip("openai")
jsonschema = pytest.importorskip("jsonschema")

ARGS_1 = '{"city": "Paris \\"x\\" {", "days": [1, 2]}'
OUTPUTS = [  # (parser, model output, content, [(name, arguments)])
    (tc.Hermes(), f'Let me look.<tool_call>\n{{"name": "weather", "arguments": {ARGS_1}}}\n'
     '</tool_call>\n<tool_call>{"arguments": {"a": 1}, "name": "f2"}</tool_call>',
     "Let me look.", [("weather", ARGS_1), ("f2", '{"a": 1}')]),
    (tc.Hermes(), "no call here <tool", "no call here <tool", []),
    (tc.Hermes(), 'cut <tool_call>{"name": "x", "arguments": {"a": </tool_call>',
     'cut <tool_call>{"name": "x", "arguments": {"a": </tool_call>', []),
    (tc.Llama3Json(), '{"name": "f", "parameters": {"x": 1}}; {"name": "g", "parameters": {}}',
     "", [("f", '{"x": 1}'), ("g", "{}")]),
    (tc.Llama3Json(), '<|python_tag|>{"name": "f", "parameters": {"x": "a;b"}}', "",
     [("f", '{"x": "a;b"}')]),
    (tc.Llama3Json(), '{"answer": 42}', '{"answer": 42}', []),
    (tc.Llama3Json(), "Hello there", "Hello there", []),
    (tc.Mistral(), 'ok [TOOL_CALLS] [{"name": "f", "arguments": {"q": "}]"}}, '
     '{"name": "g", "arguments": "{\\"z\\": 2}"}]', "ok ",
     [("f", '{"q": "}]"}'), ("g", '{"z": 2}')]),
    (tc.JsonList(), '[{"name":"f","arguments":{"a":[1,{"b":2}]}}]', "",
     [("f", '{"a":[1,{"b":2}]}')]),
    (tc.JsonList(), '[{"name":"f","arguments":{"a":[1,', '[{"name":"f","arguments":{"a":[1,',
     []),
    (tc.Named("f"), '{"a":1}', "", [("f", '{"a":1}')]),
]  # fmt: skip


def _streamed(parser, text: str) -> tuple[str, list[tuple[str, str]]]:
    """What a client reassembles from a stream that grows one character at a time."""
    stream, content, calls = tc.CallStream(parser), "", {}
    for n in range(1, len(text) + 1):
        piece, deltas = stream.advance(text[:n], n == len(text))
        content += piece
        for d in deltas:
            call = calls.setdefault(d["index"], ["", ""])
            call[0] += d["function"].get("name", "")
            call[1] += d["function"].get("arguments", "")
    return content, [tuple(calls[i]) for i in sorted(calls)]


@pytest.mark.parametrize(("parser", "text", "content", "calls"), OUTPUTS)
def test_outputs_read_whole_and_streamed_alike(parser, text, content, calls):
    found = tc.split(parser, text, final=True)
    assert (found.content, [(c.name, c.arguments) for c in found.calls]) == (content, calls)
    for _, arguments in calls:
        json.loads(arguments)
    if calls:  # a stream that ends in no call has sent the text as content after all
        assert _streamed(parser, text) == (content, calls)
    else:
        assert _streamed(parser, text)[0] == content


def test_parser_named_by_the_chat_template(tiny_dir):
    assert tc.parser_for_template("{{ '<tool_call>' }}") == "hermes"
    assert tc.parser_for_template("{{ '[TOOL_CALLS]' }}") == "mistral"
    assert tc.parser_for_template("{{- '<|python_tag|>' }}") == "llama3_json"
    assert tc.parser_for_template("{{ messages }}") is None
    assert tc.parser_for_template(load_tokenizer(tiny_dir())) == "hermes"  # the presets'


def test_auto_without_a_parser_is_refused():
    body = ChatCompletionRequest.model_validate(
        {"messages": [{"role": "user", "content": "x"}], "tools": [WEATHER]}
    )
    with pytest.raises(ApiError, match="--tool-call-parser"):
        _call_parser(SimpleNamespace(tool_parser=None), body)
    assert isinstance(_call_parser(SimpleNamespace(tool_parser="mistral"), body), tc.Mistral)


def test_special_tokens_kept_in_the_text_on_request_but_never_the_ending_one(tiny_dir):
    tok = load_tokenizer(tiny_dir())
    word = tok.encode("hello", add_special_tokens=False)
    ids = [*word, tok.backend.token_to_id("<|user|>"), *word]
    for skip, expected in [(True, "hellohello"), (False, "hello<|user|>hello")]:
        detok = Detokenizer(tok, [1], skip_special_tokens=skip)
        for t in ids:
            detok.add(t)
        assert detok.text == expected
    llm = LLM(tiny_dir(), EngineConfig())
    try:
        params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
        plain = llm.generate(["Once"], params)[0].outputs[0]
        stop = plain.token_ids[3]
        first = plain.token_ids.index(stop)
        params = dataclasses.replace(params, stop_token_ids=(stop,), skip_special_tokens=False)
        out = llm.generate(["Once"], params)[0].outputs[0]
    finally:
        llm.close()
    assert out.token_ids == plain.token_ids[: first + 1]
    assert out.text == tok.decode(plain.token_ids[:first])  # the ending token's text is not


# Small schemas: the tiny preset's context is 512 tokens and the template lists the tools.
WEATHER = {
    "type": "function",
    "function": {
        "name": "weather",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 6},
                "unit": {"enum": ["c", "f"]},
            },
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
ALARM = {
    "type": "function",
    "function": {
        "name": "alarm",
        "parameters": {
            "type": "object",
            "properties": {"hour": {"type": "integer", "minimum": 0, "maximum": 23}},
            "required": ["hour"],
            "additionalProperties": False,
        },
    },
}
TOOLS = [WEATHER, ALARM]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
CHAT = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def server(tiny_dir, tmp_path_factory):
    srv = start_server(tiny_dir(), tmp_path_factory.mktemp("tools"))
    yield srv
    assert srv.stop() == 0


@pytest.fixture(scope="module")
def client(server):
    return server.client()


def _valid(call) -> None:
    assert call.type == "function" and call.id
    jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


def test_required_always_calls_a_tool_with_valid_arguments(client):
    rng = random.Random(0)
    for i in range(20):
        out = client.chat.completions.create(
            model="ckpt", messages=CHAT, tools=TOOLS, tool_choice="required",
            temperature=1.0, seed=rng.randrange(2**31), parallel_tool_calls=i % 4 == 0,
        ).choices[0]  # fmt: skip
        assert out.finish_reason == "tool_calls", out.message
        assert out.message.content is None and out.message.tool_calls
        if i % 4:
            assert len(out.message.tool_calls) == 1
        for call in out.message.tool_calls:
            _valid(call)


def test_a_named_function_is_called(client):
    choice = {"type": "function", "function": {"name": "alarm"}}
    for seed in range(5):
        out = client.chat.completions.create(
            model="ckpt", messages=CHAT, tools=TOOLS, tool_choice=choice, max_tokens=100,
            temperature=1.0, seed=seed,
        ).choices[0]  # fmt: skip
        assert out.finish_reason == "stop"
        (call,) = out.message.tool_calls
        assert call.function.name == "alarm"
        _valid(call)


def _reassembled(chunks) -> dict[int, tuple[str, list]]:
    """Per choice: (content, [(id, name, arguments)]) as a client joins the deltas."""
    got: dict[int, tuple[list, dict]] = {}
    for chunk in chunks:
        for choice in chunk.choices:
            content, calls = got.setdefault(choice.index, ([], {}))
            content.append(choice.delta.content or "")
            for d in choice.delta.tool_calls or ():
                call = calls.setdefault(d.index, [d.id, "", ""])
                call[1] += d.function.name or ""
                call[2] += d.function.arguments or ""
    return {i: ("".join(c), [tuple(calls[k]) for k in sorted(calls)])
            for i, (c, calls) in got.items()}  # fmt: skip


# The auto path: the preset's template asks for <tool_call>{...}</tool_call>; a regex makes
# the random model write text, then one call (n choices, so some cities differ).
AUTO_CALL = (r'Checking\.<tool_call>\{"name": "weather", "arguments": \{"city": '
             r'"(Paris|Rome|Oslo)", "unit": "(c|f)"\}\}</tool_call>')  # fmt: skip


@pytest.mark.parametrize(
    "extra",
    [{"tool_choice": "required"},
     {"tool_choice": {"type": "function", "function": {"name": "weather"}}},
     {"tool_choice": "auto", "extra_body": {"structured_outputs": {"regex": AUTO_CALL}}}],
)  # fmt: skip
def test_a_streamed_call_reassembled_equals_the_whole_one(client, extra):
    kwargs = {"model": "ckpt", "messages": CHAT, "tools": TOOLS, "n": 3,
              "temperature": 1.0, "seed": 7, **extra}  # fmt: skip
    whole = client.chat.completions.create(**kwargs)
    chunks = list(client.chat.completions.create(stream=True, **kwargs))
    streamed = _reassembled(chunks)
    reasons = {c.index: c.finish_reason for k in chunks for c in k.choices if c.finish_reason}
    for c in whole.choices:
        content, calls = streamed[c.index]
        assert content == (c.message.content or "")
        assert [(n, a) for _, n, a in calls] == [
            (t.function.name, t.function.arguments) for t in c.message.tool_calls
        ]
        assert all(call_id for call_id, _, _ in calls)
        assert reasons[c.index] == c.finish_reason
        for call in c.message.tool_calls:
            _valid(call)
    if extra["tool_choice"] == "auto":
        assert {c.message.content for c in whole.choices} == {"Checking."}
        assert {c.finish_reason for c in whole.choices} == {"tool_calls"}


def test_auto_without_a_call_is_plain_content_and_none_reads_no_calls(client):
    for choice in ("auto", "none"):
        out = client.chat.completions.create(
            model="ckpt", messages=CHAT, tools=TOOLS, tool_choice=choice, max_tokens=8,
            temperature=0,
        ).choices[0]  # fmt: skip
        assert out.message.tool_calls is None and out.finish_reason == "length"
        assert out.message.content


def test_history_with_calls_and_tool_results_renders_through_the_template(server, tiny_dir):
    call = {
        "id": "call_1",
        "type": "function",
        "function": {"name": "weather", "arguments": '{"city": "Oslo", "unit": "c"}'},
    }
    messages = [*CHAT, {"role": "assistant", "content": None, "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "call_1", "content": "-3"}]  # fmt: skip
    status, _, got = server.request("POST", "/tokenize", {"messages": messages, "tools": TOOLS})
    assert status == 200, got
    template_call = {
        **call,
        "function": {**call["function"], "arguments": {"city": "Oslo", "unit": "c"}},
    }
    reference = [*CHAT, {"role": "assistant", "content": "", "tool_calls": [template_call]},
                 {"role": "tool", "tool_call_id": "call_1", "content": "-3"}]  # fmt: skip
    tok = load_tokenizer(tiny_dir()).transformers()
    text = tok.apply_chat_template(reference, tools=TOOLS, tokenize=False,
                                   add_generation_prompt=True)  # fmt: skip
    assert '<tool_call>{"name": "weather", "arguments": {"city": "Oslo"' in text
    assert "<|tool|>\n-3</s>" in text and "alarm: {" in text.split("<|user|>")[0]
    assert got["tokens"] == tok.encode(text, add_special_tokens=False)
    status, _, answer = server.request(
        "POST", "/v1/chat/completions", {"messages": messages, "tools": TOOLS, "max_tokens": 3}
    )
    assert status == 200, answer
    assert answer["usage"]["prompt_tokens"] == got["count"]


def _tool(name: str, parameters: dict | None = None) -> dict:
    return {"type": "function", "function": {"name": name, "parameters": parameters or {}}}


@pytest.mark.parametrize(
    ("extra", "param", "message"),
    [
        ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
         "tool_choice", "not among the tools"),
        ({"tool_choice": "required"}, "tool_choice", "needs tools"),
        ({"tools": [WEATHER, WEATHER]}, "tools", "same name"),
        ({"tools": [_tool("has space")]}, "tools", "pattern"),
        ({"tools": [{"type": "retrieval", "function": WEATHER["function"]}]}, "tools", "function"),
        ({"tools": [_tool("f", {"type": "objx"})], "tool_choice": "required"}, "tools", "objx"),
        ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}},
         "tool_choice", "drop response_format"),
        ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice", ""),
        ({"tools": [_tool(f"f{i}") for i in range(129)]}, "tools", "128"),
    ],
)  # fmt: skip
def test_bad_tools_are_a_400_and_the_server_keeps_serving(server, client, extra, param, message):
    body = {"model": "ckpt", "messages": CHAT, "max_tokens": 5, **extra}
    status, _, answer = server.request("POST", "/v1/chat/completions", body)
    assert status == 400, answer
    assert answer["error"]["param"] == param and message in answer["error"]["message"], answer
    after = client.chat.completions.create(
        model="ckpt", messages=CHAT, max_tokens=2, extra_body={"ignore_eos": True}
    )  # (a sampled end of sequence would stop it at 1)
    assert after.usage.completion_tokens == 2
