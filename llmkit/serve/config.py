"""How to serve (torch-free, so the CLI can read its defaults at `llmkit --help`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from llmkit.runtime.engine_config import EngineConfig


@dataclass(frozen=True, slots=True)
class ServeConfig:
    """Everything `llmkit serve` takes; every default of the server lives here."""

    model: str
    engine: EngineConfig = field(default_factory=EngineConfig)
    host: str = "127.0.0.1"  # loopback: reachable from this machine only
    port: int = 8000
    served_model_name: str | None = None  # None: the model argument as given
    api_key: str | None = None  # required as "Authorization: Bearer KEY" on /v1 when set
    max_queued_requests: int | None = None  # None: no limit
    max_request_bytes: int = 8 * 2**20
    shutdown_timeout_s: float = 30.0
    stats_interval_s: float = 10.0

    @property
    def model_name(self) -> str:
        return self.served_model_name or self.model
