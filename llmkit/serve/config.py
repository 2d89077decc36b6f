"""How to serve (torch-free, so the CLI can read its defaults at `llmkit --help`)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from llmkit.errors import LlmkitError
from llmkit.runtime.engine_config import EngineConfig
from llmkit.serve.tool_calls import PARSERS

DEFAULT_MAX_LORAS = 4  # --max-loras when adapters are served and it is not given
LORA_NAME = re.compile(r"[A-Za-z0-9_.:/-]{1,128}")


@dataclass(frozen=True, slots=True)
class ServeConfig:
    """Everything `llmkit serve` takes; every default of the server lives here."""

    model: str
    engine: EngineConfig = field(default_factory=EngineConfig)
    host: str = "127.0.0.1"  # loopback: reachable from this machine only
    port: int = 8000
    served_model_name: str | None = None  # None: the model directory's name
    model_aliases: tuple[str, ...] = ()  # other names requests may give it (MODEL as typed)
    api_key: str | None = None  # required as "Authorization: Bearer KEY" on /v1 when set
    chat_template: str | None = None  # Jinja text used instead of the checkpoint's template
    tool_call_parser: str | None = None  # a key of tool_calls.PARSERS; None: from the template
    loras: tuple[tuple[str, str], ...] = ()  # LoRA adapters loaded at start: (name, path)
    lora_dir: str | None = None  # adapters loaded at run time must lie under it (when set)
    # Sequences (n counts) waiting before 429; None: as many as the KV cache has blocks.
    max_queued_requests: int | None = None
    max_request_bytes: int = 8 * 2**20
    max_prompts_per_request: int = 256
    max_prompt_bytes: int | None = None  # None: what the context and the tokenizer allow
    # n x (max_tokens [+ the echoed prompt]) x (1 + logprobs) of one request: its answer's size
    max_response_entries: int = 2**18
    request_timeout_s: float = 30.0  # to send a request's headers, and then its body
    stream_stall_timeout_s: float = 60.0  # a stream whose client reads nothing this long ends
    max_connections: int = 1024  # open at once; beyond it a new one gets 503 and is closed
    shutdown_timeout_s: float = 30.0
    stats_interval_s: float = 10.0

    def __post_init__(self) -> None:
        checks = [
            (0 < self.port < 65536, f"--port {self.port} is not a TCP port (1-65535)"),
            (self.max_request_bytes > 0, "--max-request-size must be positive"),
            (self.max_prompts_per_request > 0, "--max-prompts-per-request must be positive"),
            (self.max_prompt_bytes is None or self.max_prompt_bytes > 0,
             "--max-prompt-bytes must be positive"),
            (self.max_response_entries > 0, "--max-response-entries must be positive"),
            (self.max_queued_requests is None or self.max_queued_requests > 0,
             "--max-queued-requests must be positive"),
            (self.request_timeout_s > 0, "--request-timeout must be positive"),
            (self.stream_stall_timeout_s > 0, "--stream-stall-timeout must be positive"),
            (self.max_connections > 0, "--max-connections must be positive"),
            (self.shutdown_timeout_s >= 0, "--shutdown-timeout must not be negative"),
            (self.tool_call_parser in (None, *PARSERS),
             f"--tool-call-parser {self.tool_call_parser!r}: choose one of "
             f"{', '.join(PARSERS)}"),
        ]  # fmt: skip
        for ok, message in checks:
            if not ok:
                raise LlmkitError(message)
        names = [name for name, _ in self.loras]
        for name in names:
            check_lora_name(name, self.model_name)
        if len(set(names)) < len(names):
            raise LlmkitError("two --lora adapters have the same name")
        if len(names) > self.engine.max_loras:
            raise LlmkitError(f"{len(names)} --lora adapters are more than --max-loras "
                              f"{self.engine.max_loras}")  # fmt: skip

    @property
    def model_name(self) -> str:
        """What clients call the model: --served-model-name, else the directory's name (a
        server does not show its file system)."""
        return self.served_model_name or Path(self.model).absolute().name


def read_chat_template(value: str) -> str:
    """--chat-template: a file's text, or the template itself; a Jinja syntax error is
    refused here, not on every chat request."""
    path = Path(value).expanduser()
    if path.is_file():
        text = path.read_text()
    elif "{{" in value or "{%" in value:
        text = value
    else:
        raise LlmkitError(f"--chat-template {value!r} is no file and no Jinja template")
    import jinja2

    try:
        jinja2.Environment().parse(text)
    except jinja2.TemplateSyntaxError as e:
        raise LlmkitError(f"--chat-template: line {e.lineno}: {e.message}") from None
    return text


def check_lora_name(name: str, model_name: str) -> None:
    """A name requests can give as `model`: not the base model's, and plain."""
    if not LORA_NAME.fullmatch(name):
        raise LlmkitError(f"LoRA adapter name {name!r}: use 1-128 of A-Z a-z 0-9 _ . : / -")
    if name == model_name:
        raise LlmkitError(f"LoRA adapter name {name!r} is the base model's name")
