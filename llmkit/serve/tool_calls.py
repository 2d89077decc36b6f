"""Tool calls in a chat model's output, found as the output grows (pure Python).

Each model family writes its calls its own way; a parser splits the text into the message's
content and its calls, and can be asked again and again as a stream advances: the content and
each call's arguments only ever grow, so a stream sends each piece once. A call's arguments
are the JSON text the model wrote (not re-serialized), so a client joining the streamed
fragments gets exactly the arguments of the whole response.

    hermes       <tool_call>{"name": ..., "arguments": {...}}</tool_call> ... (Qwen, Hermes,
                 llmkit's presets), after any content
    llama3_json  {"name": ..., "parameters": {...}}; {...} (Llama 3.1-3.3), the whole output,
                 optionally after <|python_tag|>
    mistral      [TOOL_CALLS][{"name": ..., "arguments": {...}}, ...], after any content
    json_list    [{"name": ..., "arguments": {...}}, ...]: what `tool_choice: required` makes
                 every model write (guided)
    a named function (`tool_choice` naming one): the whole output is its arguments (guided)

An output that starts a call and does not finish it (cut by max_tokens, or not JSON) is, once
it ends, all content: nothing is reported as a call that is not one.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass

# The start of a call object whose name comes first and whose arguments are an object: its
# arguments can be streamed as they are written. Other layouts are read once complete.
_HEAD = re.compile(
    r'\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"(?:arguments|parameters)"\s*:\s*(?=\{)'
)
_SCALAR = re.compile(r"-?[0-9][0-9.eE+-]*|true|false|null")
_STRUCTURE = re.compile(r'[{}\[\]"]')
_STRING_BODY = re.compile(r'(?:[^"\\]|\\.)*')
_SPACE = re.compile(r"\s*")


@dataclass(slots=True)
class Call:
    name: str | None  # None until the model has written it
    arguments: str  # the arguments' JSON text so far
    done: bool = False


@dataclass(slots=True)
class Split:
    content: str
    calls: list[Call]


class NotACall(ValueError):
    """Text in a call's place that is not one."""


class JsonEnds:
    """Where JSON values end in a text that only grows: each value is scanned once, however
    often it is asked about (a stream asks after every token)."""

    def __init__(self) -> None:
        self._scans: dict[int, tuple[int, int]] = {}  # start -> (position reached, depth there)

    def end(self, text: str, start: int) -> int | None:
        """The index just past the JSON value starting at text[start] (not whitespace), or
        None while the text holds only part of it. Whether it is valid JSON is not checked."""
        if text[start] not in '{["':
            match = _SCALAR.match(text, start)
            if match is None:
                raise NotACall(f"not JSON at {text[start : start + 20]!r}")
            return match.end() if match.end() < len(text) else None
        pos, depth = self._scans.get(start, (start, 0))
        if depth == 0 and pos > start:
            return pos  # found before
        while (found := _STRUCTURE.search(text, pos)) is not None:
            pos = found.start()
            if text[pos] == '"':
                close = _STRING_BODY.match(text, pos + 1).end()
                if close >= len(text) or text[close] != '"':
                    break  # an open string: read it again once more text has come
                pos = close + 1
            else:
                depth += 1 if text[pos] in "{[" else -1
                pos += 1
            if depth == 0:
                self._scans[start] = (pos, 0)
                return pos
        else:
            pos = len(text)
        self._scans[start] = (pos, depth)
        return None


def _space(text: str, pos: int) -> int:
    return _SPACE.match(text, pos).end()


def _call(text: str, pos: int, ends: JsonEnds) -> tuple[Call, int | None]:
    """The call object at text[pos] so far, and where it ends (None: not yet)."""
    if pos >= len(text):
        return Call(None, ""), None
    if text[pos] != "{":
        raise NotACall("a tool call is a JSON object")
    whole = ends.end(text, pos)
    head = _HEAD.match(text, pos)
    if head is not None:
        name = json.loads(f'"{head.group(1)}"')
        end = ends.end(text, head.end())
        arguments = text[head.end() : end]
        if whole is not None and end is not None:
            _check_call(text[pos:whole])
        return Call(name, arguments, whole is not None and end is not None), whole
    if whole is None:
        return Call(None, ""), None
    name, arguments = _check_call(text[pos:whole])
    if not isinstance(arguments, str):
        arguments = json.dumps(arguments, ensure_ascii=False)
    return Call(name, arguments, True), whole


def _check_call(text: str) -> tuple[str, object]:
    """(name, arguments) of a complete call object, or NotACall."""
    try:
        value = json.loads(text)
    except ValueError:
        raise NotACall("a tool call that is not JSON") from None
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        raise NotACall("a tool call names no function")
    arguments = value.get("arguments", value.get("parameters", {}))
    if isinstance(arguments, str):
        try:
            json.loads(arguments)
        except ValueError:
            raise NotACall("tool call arguments that are not JSON") from None
    return value["name"], arguments


def _list(text: str, pos: int, ends: JsonEnds) -> list[Call]:
    """The calls of a JSON list of call objects starting at text[pos] (after whitespace)."""
    pos = _space(text, pos)
    if pos >= len(text):
        return []
    if text[pos] != "[":
        raise NotACall("tool calls are a JSON list")
    calls: list[Call] = []
    pos = _space(text, pos + 1)
    while pos < len(text) and text[pos] != "]":
        if calls:
            if text[pos] != ",":
                raise NotACall("tool calls are separated by commas")
            pos = _space(text, pos + 1)
        call, end = _call(text, pos, ends)
        calls.append(call)
        if end is None:
            break
        pos = _space(text, end)
    return calls


def _held(text: str, marker: str) -> str:
    """`text` less any end of it that could be the start of `marker`."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-n:]):
            return text[:-n]
    return text


class Hermes:
    """<tool_call>{...}</tool_call>, one block per call, after any content."""

    START, END = "<tool_call>", "</tool_call>"
    keeps_special_tokens = False  # its markers are plain text (or non-special added tokens)

    def calls(self, text: str, final: bool, ends: JsonEnds) -> Split:
        first = text.find(self.START)
        if first < 0:
            return Split(text if final else _held(text, self.START), [])
        calls: list[Call] = []
        pos = first
        while text.startswith(self.START, pos):
            call, end = _call(text, _space(text, pos + len(self.START)), ends)
            calls.append(call)
            if end is None:
                break
            pos = _space(text, end)
            if not text.startswith(self.END, pos):
                break
            pos = _space(text, pos + len(self.END))
        return Split(text[:first], calls)


class Llama3Json:
    """The whole output is call objects separated by ';', maybe after <|python_tag|>."""

    TAG = "<|python_tag|>"
    keeps_special_tokens = True  # <|python_tag|> is a special token

    def calls(self, text: str, final: bool, ends: JsonEnds) -> Split:
        body = text.lstrip()
        pos = len(text) - len(body)
        if body.startswith(self.TAG):
            pos += len(self.TAG)
        elif not final and self.TAG.startswith(body):
            return Split("", [])  # nothing yet, or the tag's first characters
        elif not body.startswith("{"):
            return Split(text, [])
        calls: list[Call] = []
        while True:
            call, end = _call(text, _space(text, pos), ends)
            calls.append(call)
            if end is None:
                break
            pos = _space(text, end)
            if not text.startswith(";", pos):
                break
            pos += 1
        return Split("", calls)


class Mistral:
    """[TOOL_CALLS] then a JSON list of call objects, after any content."""

    START = "[TOOL_CALLS]"
    keeps_special_tokens = True  # [TOOL_CALLS] is a control token

    def calls(self, text: str, final: bool, ends: JsonEnds) -> Split:
        first = text.find(self.START)
        if first < 0:
            return Split(text if final else _held(text, self.START), [])
        return Split(text[:first], _list(text, first + len(self.START), ends))


class JsonList:
    """The whole output is a JSON list of call objects (tool_choice: required)."""

    keeps_special_tokens = False

    def calls(self, text: str, final: bool, ends: JsonEnds) -> Split:
        return Split("", _list(text, 0, ends))


class Named:
    """The whole output is one named function's arguments (tool_choice naming it)."""

    keeps_special_tokens = False

    def __init__(self, name: str):
        self.name = name

    def calls(self, text: str, final: bool, ends: JsonEnds) -> Split:
        if final:
            try:
                json.loads(text)
            except ValueError:
                raise NotACall("arguments that are not JSON") from None
        return Split("", [Call(self.name, text, final)])


PARSERS = {"hermes": Hermes, "llama3_json": Llama3Json, "mistral": Mistral}


def parser_for_template(template_or_tokenizer) -> str | None:
    """The parser a chat template's own instructions call for (a tokenizer's: any of its
    templates), or None when it names none."""
    template = template_or_tokenizer
    if not isinstance(template, str):
        template = getattr(template, "chat_template", None)
        if isinstance(template, dict):  # transformers: {name: template}
            template = "\n".join(template.values())
        elif isinstance(template, list):  # tokenizer_config.json: [{name, template}]
            template = "\n".join(str(t.get("template", "")) for t in template)
    if not template:
        return None
    if Hermes.START in template:
        return "hermes"
    if Mistral.START in template:
        return "mistral"
    if Llama3Json.TAG in template or '"parameters"' in template:
        return "llama3_json"
    return None


def split(parser, text: str, final: bool, ends: JsonEnds | None = None) -> Split:
    """`text` as content and calls. Once the output has ended (`final`), every call is
    complete, or there are none and the whole text is content."""
    try:
        found = parser.calls(text, final, ends or JsonEnds())
    except NotACall:
        return Split(text, [])
    if final and not all(c.done and c.name is not None for c in found.calls):
        return Split(text, [])
    return found


def _call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def message(parser, text: str) -> tuple[str | None, list[dict]]:
    """A finished output as an assistant message's (content, tool_calls)."""
    found = split(parser, text, final=True)
    calls = [
        {"id": _call_id(), "type": "function",
         "function": {"name": c.name, "arguments": c.arguments}}
        for c in found.calls
    ]  # fmt: skip
    return (found.content or None) if calls else found.content, calls


def finish_reason(parser, reason: str | None, made_calls: bool) -> str | None:
    """OpenAI's: tool_calls when the model ended by calling tools of its own accord; a call
    to a function the request named ends with stop."""
    if made_calls and reason == "stop" and not isinstance(parser, Named):
        return "tool_calls"
    return reason


class CallStream:
    """What a stream has sent of one choice's content and calls: each chunk carries the
    content written since, and for each call its id, type and name once, then the arguments
    written since (`delta.tool_calls`, as OpenAI streams them)."""

    def __init__(self, parser):
        self.parser = parser
        self.ends = JsonEnds()
        self.content_sent = 0
        self.calls_sent: list[list] = []  # [id, characters of arguments sent] per call

    def advance(self, text: str, final: bool) -> tuple[str, list[dict]]:
        """(content, delta.tool_calls) to send now that the output reads `text`."""
        found = split(self.parser, text, final, self.ends)
        content = found.content[self.content_sent :]
        self.content_sent = max(self.content_sent, len(found.content))
        deltas = []
        for i, call in enumerate(found.calls):
            if call.name is None:
                break
            delta: dict = {"index": i}
            function: dict = {}
            if i == len(self.calls_sent):
                self.calls_sent.append([_call_id(), 0])
                delta |= {"id": self.calls_sent[i][0], "type": "function"}
                function["name"] = call.name
            arguments = call.arguments[self.calls_sent[i][1] :]
            if arguments or function:
                function["arguments"] = arguments
                self.calls_sent[i][1] = len(call.arguments)
                deltas.append(delta | {"function": function})
        return content, deltas
