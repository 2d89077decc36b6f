"""The OpenAI request bodies the server accepts, checked into the engine's SamplingParams.

Fields the engine cannot honour (logit_bias, suffix, best_of > n) are refused with 400
rather than silently ignored; fields that change nothing (user, metadata, store, ...) are
accepted and ignored, as OpenAI's own clients send them.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from llmkit.runtime.guide import Guide, choice_guide
from llmkit.runtime.sequence import SamplingParams

# Bounds on what one request may ask for: each keeps the work a request can cause (and what
# the engine's tensors and seeded generators can hold) finite, whatever a client sends.
INT32_MAX = 2**31 - 1
SEED_MIN, SEED_MAX = -(2**63), 2**63 - 1  # a 64-bit seed, as vLLM and OpenAI take
MAX_STOP_STRINGS = 16  # OpenAI takes 4
MAX_STOP_CHARS = 256  # each; the stream holds back this many characters at most
MAX_STOP_TOKEN_IDS = 64
MAX_CHOICES = 256  # structured_outputs.choice
MAX_TOOLS = 128  # OpenAI's limit
MAX_TOOL_CALLS = 128  # in one assistant message of the history
FUNCTION_NAME = r"^[A-Za-z0-9_.:-]{1,64}$"  # OpenAI's, and the ':' and '.' vLLM takes
# Strict types (no "5" for 5, no true for 1) and no NaN or infinity, as OpenAI's API.
STRICT = ConfigDict(extra="ignore", strict=True, allow_inf_nan=False)


class ApiError(Exception):
    """An error answered in OpenAI's shape: {"error": {message, type, param, code}}."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type = status, message, type
        self.param, self.code, self.headers = param, code, headers

    def body(self) -> dict:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


class _Defaulted(BaseModel):
    """A body in which null for a field with a default means that default, as OpenAI's API
    and vLLM take it: clients send null for a parameter left unset (OpenAI's Python client
    for `temperature=None`). A required field's null is still refused."""

    model_config = STRICT

    @model_validator(mode="before")
    @classmethod
    def _nulls_as_defaults(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        fields = cls.model_fields
        return {
            key: value
            for key, value in data.items()
            if value is not None or key not in fields or fields[key].is_required()
        }


class StreamOptions(_Defaulted):
    include_usage: bool = False


class StructuredOutputs(BaseModel):
    """vLLM's `structured_outputs`: exactly one of a JSON schema, a regular expression the
    whole output matches, a Lark grammar, or a list of the outputs allowed."""

    model_config = ConfigDict(strict=True, allow_inf_nan=False, extra="forbid")

    json_schema: dict[str, Any] | None = Field(default=None, alias="json")
    regex: str | None = Field(default=None, min_length=1)
    grammar: str | None = Field(default=None, min_length=1)
    choice: list[Annotated[str, Field(min_length=1)]] | None = Field(
        default=None, min_length=1, max_length=MAX_CHOICES
    )

    def guide(self) -> Guide:
        kinds = ("json_schema", "regex", "grammar", "choice")
        given = [k for k in kinds if getattr(self, k) is not None]
        if len(given) != 1:
            raise ApiError(400, "structured_outputs takes exactly one of json, regex, grammar "
                           "and choice", param="structured_outputs")  # fmt: skip
        if self.json_schema is not None:
            return Guide("json", json.dumps(self.json_schema))
        if self.regex is not None:
            return Guide("regex", self.regex)
        if self.grammar is not None:
            return Guide("lark", self.grammar)
        return choice_guide(self.choice)


def _response_format_guide(response_format: dict[str, Any]) -> Guide | None:
    """OpenAI's response_format: text (no guide), json_object, or json_schema."""
    kind = response_format.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return Guide("json", json.dumps({"type": "object"}))
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise ApiError(400, "response_format json_schema needs json_schema.schema, an "
                           "object", param="response_format")  # fmt: skip
        return Guide("json", json.dumps(schema))
    raise ApiError(400, "response_format type must be text, json_object or json_schema",
                   param="response_format")  # fmt: skip


class _Sampling(_Defaulted):
    """Fields both endpoints share."""

    model: str | None = Field(default=None, max_length=1024)
    max_tokens: int | None = Field(default=None, ge=1, le=INT32_MAX)
    temperature: float = Field(default=1.0, ge=0, le=2)
    top_p: float = Field(default=1.0, gt=0, le=1)
    top_k: int = Field(default=0, ge=-1, le=INT32_MAX)  # 0 or -1: off; past the vocabulary: off
    min_p: float = Field(default=0.0, ge=0, le=1)
    n: int = Field(default=1, ge=1, le=128)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = Field(default=None, max_length=MAX_STOP_STRINGS)
    stop_token_ids: list[Annotated[int, Field(ge=0, le=INT32_MAX)]] | None = Field(
        default=None, max_length=MAX_STOP_TOKEN_IDS
    )
    seed: int | None = Field(default=None, ge=SEED_MIN, le=SEED_MAX)
    presence_penalty: float = Field(default=0.0, ge=-2, le=2)
    frequency_penalty: float = Field(default=0.0, ge=-2, le=2)
    repetition_penalty: float = Field(default=1.0, gt=0, le=100)
    ignore_eos: bool = False
    skip_special_tokens: bool = True  # vLLM's: special tokens (not EOS) left in the text
    speculative: bool = True  # false: never speculate this request (when the server does)
    priority: int = Field(default=0, ge=-INT32_MAX, le=INT32_MAX)
    logit_bias: dict[str, float] | None = None
    response_format: dict[str, Any] | None = None
    structured_outputs: StructuredOutputs | None = None

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def guide(self) -> Guide | None:
        """What the output must match (response_format or structured_outputs), if anything."""
        by_format = _response_format_guide(self.response_format) if self.response_format else None
        if by_format is not None and self.structured_outputs is not None:
            raise ApiError(400, "give response_format or structured_outputs, not both",
                           param="structured_outputs")  # fmt: skip
        return self.structured_outputs.guide() if self.structured_outputs else by_format

    def params(self, max_tokens: int, logprobs: int | None, prompt_logprobs: int | None = None):
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or ())
        if any(not s for s in stop):
            raise ApiError(400, "stop strings must not be empty", param="stop")
        if any(len(s) > MAX_STOP_CHARS for s in stop):
            message = f"stop strings are at most {MAX_STOP_CHARS} characters"
            raise ApiError(400, message, param="stop")
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=max(self.top_k, 0),
            min_p=self.min_p,
            repetition_penalty=self.repetition_penalty,
            frequency_penalty=self.frequency_penalty,
            presence_penalty=self.presence_penalty,
            seed=self.seed,
            stop=tuple(stop),
            stop_token_ids=tuple(self.stop_token_ids or ()),
            ignore_eos=self.ignore_eos,
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
            n=self.n,
            priority=self.priority,
            guide=self.guide(),
            skip_special_tokens=self.skip_special_tokens,
            speculative=self.speculative,
        )

    def refuse_unsupported(self) -> None:
        if self.logit_bias:
            raise ApiError(400, "logit_bias is not supported", param="logit_bias")


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = Field(default=None, ge=0, le=20)
    echo: bool = False
    add_special_tokens: bool = True  # vLLM's: BOS (and the like) before a text prompt
    suffix: str | None = None
    best_of: int | None = Field(default=None, ge=1, le=128)

    def prompts(self) -> list[str | list[int]]:
        """One or several prompts, each text or token ids."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if not p:
            raise ApiError(400, "prompt must not be empty", param="prompt")
        if all(isinstance(x, int) for x in p):
            return [list(p)]
        if all(isinstance(x, str) for x in p) or all(isinstance(x, list) for x in p):
            return list(p)
        raise ApiError(400, "prompt mixes text and token ids", param="prompt")

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        if self.suffix:
            raise ApiError(400, "suffix is not supported", param="suffix")
        if self.best_of is not None and self.best_of != self.n:
            raise ApiError(400, "best_of other than n is not supported", param="best_of")


class FunctionCall(BaseModel):
    model_config = STRICT

    name: str = Field(pattern=FUNCTION_NAME)
    arguments: str  # JSON text, as the model wrote it


class ToolCall(BaseModel):
    """A call an assistant message of the history made."""

    model_config = STRICT

    id: str | None = Field(default=None, max_length=256)
    type: Literal["function"] = "function"
    function: FunctionCall

    def for_template(self) -> dict:
        """As chat templates read it: arguments a mapping where they are a JSON object (the
        templates of Llama 3, Qwen and Mistral write them with `tojson`)."""
        try:
            arguments = json.loads(self.function.arguments)
        except ValueError:
            arguments = self.function.arguments
        function = {"name": self.function.name, "arguments": arguments}
        return {"id": self.id, "type": "function", "function": function}


class ChatMessage(BaseModel):
    model_config = STRICT

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = Field(default=None, max_length=256)
    tool_calls: list[ToolCall] | None = Field(default=None, max_length=MAX_TOOL_CALLS)
    tool_call_id: str | None = Field(default=None, max_length=256)

    def for_template(self) -> dict:
        """The message as chat templates read it."""
        message: dict[str, Any] = {"role": self.role, "content": self.text()}
        if self.tool_calls:
            message["tool_calls"] = [call.for_template() for call in self.tool_calls]
        for key in ("name", "tool_call_id"):
            if getattr(self, key) is not None:
                message[key] = getattr(self, key)
        return message

    def text(self) -> str:
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        if any(part.get("type") != "text" for part in self.content):
            raise ApiError(400, "only text content parts are supported", param="messages")
        return "".join(str(part.get("text", "")) for part in self.content)


class FunctionDefinition(BaseModel):
    model_config = STRICT

    name: str = Field(pattern=FUNCTION_NAME)
    description: str | None = Field(default=None, max_length=2**16)
    parameters: dict[str, Any] | None = None  # a JSON schema; none: no arguments
    strict: bool | None = None  # every call is made to fit its schema in any case


class Tool(BaseModel):
    model_config = STRICT

    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(BaseModel):
    model_config = STRICT

    name: str = Field(pattern=FUNCTION_NAME)


class NamedToolChoice(BaseModel):
    model_config = STRICT

    type: Literal["function"]
    function: NamedFunction


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    add_generation_prompt: bool = True
    add_special_tokens: bool = False  # vLLM's: the template writes BOS itself
    tools: list[Tool] | None = Field(default=None, max_length=MAX_TOOLS)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True

    def tool_mode(self) -> str | None:
        """none (tools shown, no calls read), auto, required, or the function's name."""
        if not self.tools:
            if self.tool_choice not in (None, "none"):
                raise ApiError(400, "tool_choice needs tools", param="tool_choice")
            return None
        choice = self.tool_choice or "auto"
        if isinstance(choice, NamedToolChoice):
            if choice.function.name not in {t.function.name for t in self.tools}:
                raise ApiError(400, f"tool_choice names {choice.function.name!r}, which is not "
                               "among the tools", param="tool_choice")  # fmt: skip
            return choice.function.name
        return choice

    def guide(self) -> Guide | None:
        mode = self.tool_mode()
        if mode in (None, "none", "auto"):
            return super().guide()
        if self.response_format or self.structured_outputs:
            raise ApiError(400, "tool_choice required or a named function guides the output "
                           "itself: drop response_format and structured_outputs",
                           param="tool_choice")  # fmt: skip
        return tool_guide(self.tools, mode, self.parallel_tool_calls)

    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def num_logprobs(self) -> int | None:
        if self.top_logprobs is not None and not self.logprobs:
            raise ApiError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        return (self.top_logprobs or 0) if self.logprobs else None

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        if self.tools and len({t.function.name for t in self.tools}) < len(self.tools):
            raise ApiError(400, "two tools have the same name", param="tools")


def tool_guide(tools: list[Tool], mode: str, parallel: bool) -> Guide:
    """The guide of a forced call: a named function's arguments, or (required) a JSON list of
    {"name", "arguments"} objects, one of the tools each."""
    schemas = {t.function.name: t.function.parameters or {"type": "object"} for t in tools}
    if mode != "required":
        return Guide("json", json.dumps(schemas[mode]))
    calls = [
        {
            "type": "object",
            "properties": {"name": {"const": name}, "arguments": schema},
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for name, schema in schemas.items()
    ]
    listed = {"type": "array", "items": {"anyOf": calls}, "minItems": 1}
    return Guide("json", json.dumps(listed | ({} if parallel else {"maxItems": 1})))


class TokenizeRequest(BaseModel):
    """vLLM's /tokenize: a text prompt, or chat messages rendered by the template."""

    model_config = STRICT

    model: str | None = Field(default=None, max_length=1024)
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(default=None, min_length=1)
    tools: list[Tool] | None = Field(default=None, max_length=MAX_TOOLS)  # shown to the template
    add_special_tokens: bool | None = None  # default: true for a prompt, false for messages
    add_generation_prompt: bool = True
    return_token_strs: bool = False

    def refuse_unsupported(self) -> None:
        if (self.prompt is None) == (self.messages is None):
            raise ApiError(400, "give exactly one of prompt and messages", param="prompt")


class DetokenizeRequest(BaseModel):
    """vLLM's /detokenize."""

    model_config = STRICT

    model: str | None = Field(default=None, max_length=1024)
    tokens: list[Annotated[int, Field(ge=0, le=INT32_MAX)]] = Field(max_length=2**20)

    def refuse_unsupported(self) -> None:
        pass


class LoadLoraRequest(BaseModel):
    """vLLM's /v1/load_lora_adapter."""

    model_config = STRICT

    lora_name: str = Field(min_length=1, max_length=128)
    lora_path: str = Field(min_length=1, max_length=4096)

    def refuse_unsupported(self) -> None:
        pass


class UnloadLoraRequest(BaseModel):
    """vLLM's /v1/unload_lora_adapter."""

    model_config = STRICT

    lora_name: str = Field(min_length=1, max_length=128)

    def refuse_unsupported(self) -> None:
        pass


MAX_JSON_DEPTH = 32  # a request body's nesting; OpenAI's deepest (tool schemas) is far less


def decode_json(raw: bytes) -> Any:
    """A request body decoded, or a 400: not JSON, NaN or Infinity, nested past
    MAX_JSON_DEPTH, or a string with a lone surrogate (no text can hold one)."""

    def no_constant(name: str):
        raise ValueError(f"{name} is not valid JSON")

    try:
        data = json.loads(raw, parse_constant=no_constant)
    except RecursionError:
        raise ApiError(400, f"the request body is nested more than {MAX_JSON_DEPTH} deep") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise ApiError(400, f"the request body is not valid JSON: {e}") from None
    _check_json(data, 0)
    return data


def _check_json(value: Any, depth: int) -> None:
    if depth > MAX_JSON_DEPTH:
        raise ApiError(400, f"the request body is nested more than {MAX_JSON_DEPTH} deep")
    if isinstance(value, str):
        try:
            value.encode()
        except UnicodeEncodeError:
            raise ApiError(400, "the request body has a string with a lone surrogate "
                           "(\\ud800-\\udfff not in a pair)") from None  # fmt: skip
    elif isinstance(value, list):
        for item in value:
            _check_json(item, depth + 1)
    elif isinstance(value, dict):
        for key, item in value.items():
            _check_json(key, depth + 1)
            _check_json(item, depth + 1)


def parse(model: type[BaseModel], data: Any) -> Any:
    """Validate a decoded JSON body; the first problem becomes a 400 naming its field."""
    if not isinstance(data, dict):
        raise ApiError(400, "the request body must be a JSON object")
    try:
        request = model.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(x) for x in first["loc"])
        param = str(first["loc"][0]) if first["loc"] else None
        raise ApiError(400, f"{where}: {first['msg']}", param=param) from None
    request.refuse_unsupported()
    return request
