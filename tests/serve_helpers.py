"""Start `llmkit serve` as a real process on a free loopback port, and talk to it raw."""

from __future__ import annotations

import http.client
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from llmkit.net import free_port


@dataclass
class Server:
    process: subprocess.Popen
    port: int
    log: Path

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def client(self):
        """The official OpenAI client, talking to this server (no retries)."""
        import openai

        return openai.OpenAI(base_url=self.base_url, api_key="unused", max_retries=0)

    def request(self, method: str, path: str, body=None, headers=None, raw: bytes | None = None):
        """(status, headers, parsed JSON or text) of one request."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        conn.request(
            method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})}
        )
        response = conn.getresponse()
        text = response.read().decode()
        conn.close()
        try:
            return response.status, dict(response.getheaders()), json.loads(text)
        except json.JSONDecodeError:
            return response.status, dict(response.getheaders()), text

    def metrics(self) -> dict[str, float]:
        """Every sample of /metrics, named with its labels, parsed by prometheus_client."""
        from prometheus_client.parser import text_string_to_metric_families

        _, _, text = self.request("GET", "/metrics")
        samples = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
                samples[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
        return samples

    def stop(self, timeout: float = 60) -> int:
        if self.process.poll() is None:
            self.process.terminate()
        return self.process.wait(timeout)


def start_server(model: Path, tmp: Path, *args: str, wait: bool = True) -> Server:
    port = free_port()
    log = tmp / f"serve-{port}.log"
    command = [sys.executable, "-m", "llmkit", "serve", str(model), "--port", str(port), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with log.open("w") as out:
        process = subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    server = Server(process, port, log)
    if wait:
        wait_healthy(server)
    return server


def wait_healthy(server: Server, timeout: float = 120) -> list[int]:
    """Poll /health until 200; the statuses seen on the way (None: not listening yet)."""
    seen: list[int | None] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"the server exited: {server.log.read_text()[-2000:]}")
        try:
            status = server.request("GET", "/health")[0]
        except OSError:
            status = None
        seen.append(status)
        if status == 200:
            return seen
        time.sleep(0.05)
    raise TimeoutError(f"the server did not become healthy: {server.log.read_text()[-2000:]}")
