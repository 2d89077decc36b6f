"""The engine in its own process, so the HTTP front end never imports torch: `llmkit serve`
forks it before even parsing its arguments, and it imports torch and loads the model while
the front end imports its web stack on the other core. It also takes the engine's Python work
off the front end's GIL.

Over one pipe the front end sends ("load", model, config, log_level, loras) once, then
("add", request_id, prompt_ids, params, arrival, lora), ("abort", request_id), ("pause",
request_id), ("resume", request_id), ("lora", token, "load" | "unload", name, path) and
("stop",); the engine process answers ("ready", EngineInfo) or ("failed", message) once,
then one Step after every round of commands and model step, with its outputs as deltas
(serve/deltas.py) and the answers to "lora" commands. This
module stays torch-free; the child imports the engine after the fork.
"""

from __future__ import annotations

import atexit
import logging
import os
import signal
import sys
import time
import traceback
from dataclasses import dataclass, field, replace
from multiprocessing.connection import Connection, Pipe
from typing import NoReturn

from llmkit.errors import LlmkitError
from llmkit.memory import freeze_heap
from llmkit.runtime.engine_config import EngineConfig
from llmkit.runtime.outputs import SpecStats
from llmkit.serve.deltas import DeltaEncoder, OutputDelta

log = logging.getLogger("llmkit.serve")


@dataclass(frozen=True, slots=True)
class EngineInfo:
    """What the front end needs to know of the loaded engine."""

    max_model_len: int
    vocab_size: int
    num_blocks: int


@dataclass(frozen=True, slots=True)
class EngineStats:
    """The scheduler's and the KV cache's state after a step (for /metrics and the log)."""

    running: int = 0
    waiting: int = 0
    paused: int = 0  # sequences whose client is not reading
    used_blocks: int = 0
    num_blocks: int = 0
    preemptions: int = 0
    hit_blocks: int = 0
    touched_blocks: int = 0  # blocks that have ever held tokens
    block_bytes: int = 0  # one block's K and V on one rank
    seqs_seen: int = 0  # sequences of the "add" commands the engine process has taken so far
    proposer: str = ""  # the speculative proposer ("ngram", "draft"), "" when off
    spec: SpecStats = field(default_factory=SpecStats)  # its counts so far
    # the chance below which a draft model's draft ends now (speculative.Cutoff; None: no
    # draft model)
    draft_cutoff: float | None = None


@dataclass(slots=True)
class Step:
    outputs: list[OutputDelta]
    stats: EngineStats
    # (request_id, the error) of adds the engine refused
    rejected: list[tuple[str, Exception]] = field(default_factory=list)
    error: str | None = None  # the step failed; every request in flight was aborted
    replies: list[tuple[int, str | None]] = field(default_factory=list)  # lora: (token, error)


class EngineProcess:
    """The front end's handle on the engine process, forked at construction. The child
    imports the engine (torch) at once and then waits for `load(model, config)`, so the
    import overlaps whatever the front end does first, argument parsing included."""

    def __init__(self) -> None:
        self.conn, child = Pipe()
        pid = os.fork()
        if pid == 0:
            _child(child, self.conn)  # never returns
        self.pid = pid
        self.started = time.perf_counter()
        self.returncode: int | None = None
        child.close()  # so the front end sees EOF when the engine process dies

    def load(
        self, model: str, config: EngineConfig, log_level: str = "info", loras: tuple = ()
    ) -> None:
        """Load `model`, then the LoRA adapters `loras` ((name, path) each)."""
        self.conn.send(("load", model, config, log_level, loras))

    def wait_ready(self) -> EngineInfo:
        """Block until the engine has loaded; LlmkitError if it failed or died."""
        try:
            kind, payload = self.conn.recv()
        except (EOFError, OSError):
            raise LlmkitError(f"the engine process exited with {self.exitcode()}") from None
        if kind == "failed":
            raise LlmkitError(payload)
        return payload

    def send(self, message: tuple) -> None:
        self.conn.send(message)

    def join(self, timeout_s: float) -> None:
        """Wait up to `timeout_s` for the engine process to exit (after a "stop" it stops
        its workers), then kill it."""
        deadline = time.monotonic() + timeout_s
        while not self._reaped() and time.monotonic() < deadline:
            time.sleep(0.01)
        if self.returncode is None:
            if timeout_s > 0:
                log.warning("the engine process did not stop within %.0f s; killing it", timeout_s)
            os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
            self.returncode = -signal.SIGKILL

    def exitcode(self) -> int | None:
        self.join(1)
        return self.returncode

    def _reaped(self) -> bool:
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode is not None


_prestarted: EngineProcess | None = None


def prestart(argv: list[str]) -> None:
    """Fork the engine process now if `argv` (the CLI's arguments) runs `llmkit serve`:
    `import torch` is most of a server's start, and it need not wait for the CLI."""
    global _prestarted
    command = next((arg for arg in argv if not arg.startswith("-")), None)
    if command == "serve" and not {"--help", "-h"} & set(argv):
        _prestarted = EngineProcess()
        atexit.register(_prestarted.join, 0)  # never taken (bad arguments): killed


def engine_process() -> EngineProcess:
    """The process `prestart` forked, or a new one."""
    global _prestarted
    process, _prestarted = _prestarted, None
    return process or EngineProcess()


def _child(conn: Connection, parent_end: Connection) -> NoReturn:
    code = 1
    try:
        _main(conn, parent_end)
        code = 0
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _main(conn: Connection, parent_end: Connection) -> None:
    # The front end decides when the engine stops: a Ctrl-C or SIGTERM sent to the whole
    # process group (a terminal, systemd) must not kill it under a server still draining.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    parent_end.close()  # our copy of the front end's end: EOF must mean the front end is gone
    from llmkit.runtime.engine import Engine  # imports torch: the slow part

    try:
        _, model, config, log_level, loras = conn.recv()
    except EOFError:
        return  # the front end stopped before asking for a model
    from llmkit.serve.logs import log_to_stderr

    log_to_stderr(log_level)  # forked before the front end set its logging up
    try:
        engine = Engine(model, config)
    except Exception as e:
        conn.send(("failed", str(e) or type(e).__name__))
        return
    for name, path in loras:
        try:
            engine.add_lora(name, path)
        except LlmkitError as e:
            conn.send(("failed", f"--lora {name}: {e}"))
            engine.close()
            return
    freeze_heap()  # the loaded engine: out of the collector's full passes
    vocab = engine.model_config.vocab_size
    info = EngineInfo(engine.max_model_len, vocab, engine.block_manager.num_blocks)
    conn.send(("ready", info))
    try:
        _Loop(engine, conn).run()
    except (EOFError, BrokenPipeError, ConnectionResetError):
        pass  # the front end is gone
    finally:
        engine.close()


class _Loop:
    def __init__(self, engine, conn: Connection):
        self.engine = engine
        self.conn = conn
        self.seqs = 0
        self.stopping = False
        self.deltas = DeltaEncoder()

    def run(self) -> None:
        while not self.stopping:
            if not self.engine.has_unfinished():
                self.conn.poll(None)  # idle: sleep until the front end says something
            step = Step([], EngineStats())
            while not self.stopping and self.conn.poll():
                self._command(self.conn.recv(), step)
            if self.stopping:
                break
            if self.engine.has_unfinished():
                self._step(step)
            step.stats = self._stats()
            self.conn.send(step)

    def _command(self, message: tuple, step: Step) -> None:
        kind = message[0]
        if kind == "add":
            _, request_id, ids, params, arrival, lora = message
            self.seqs += params.n
            try:
                self.engine.add_request(request_id, None, ids, params, arrival, lora)
            except (LlmkitError, ValueError) as e:
                step.rejected.append((request_id, e))
        elif kind == "abort":
            self.engine.abort(message[1])
            self.deltas.forget(message[1])
        elif kind == "pause":
            self.engine.pause(message[1])
        elif kind == "resume":
            self.engine.resume(message[1])
        elif kind == "lora":
            _, token, action, name, path = message
            try:
                if action == "load":
                    self.engine.add_lora(name, path)
                else:
                    self.engine.remove_lora(name)
                step.replies.append((token, None))
            except LlmkitError as e:
                step.replies.append((token, str(e)))
        elif kind == "stop":
            self.stopping = True

    def _step(self, step: Step) -> None:
        try:
            step.outputs = [self.deltas.encode(out) for out in self.engine.step()]
        except Exception as e:  # one bad step fails the requests in flight, not the server
            log.exception("engine step failed")
            for request_id in list(self.engine.requests):
                self.engine.abort(request_id)
                self.deltas.forget(request_id)
            step.error = f"the engine failed: {e}"

    def _stats(self) -> EngineStats:
        scheduler, blocks = self.engine.scheduler, self.engine.block_manager
        return EngineStats(
            running=len(scheduler.running),
            waiting=len(scheduler.waiting),
            paused=len(scheduler.paused),
            used_blocks=blocks.num_used_blocks,
            num_blocks=blocks.num_blocks,
            preemptions=scheduler.num_preemptions,
            hit_blocks=blocks.num_hit_blocks,
            touched_blocks=blocks.num_touched_blocks,
            block_bytes=self.engine.kv_block_bytes,
            seqs_seen=self.seqs,
            proposer=self.engine.proposer.name if self.engine.proposer else "",
            spec=replace(self.engine.spec_stats),
            draft_cutoff=self.engine.draft_cutoff(),
        )
