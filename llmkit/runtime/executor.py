"""Runs the model on every tensor-parallel rank: rank 0 in this process, ranks 1..tp-1 in
worker processes. Each step the driver broadcasts the step's inputs, packed into one int64
tensor (its length, then itself: nothing pickled); all ranks compute, the row-parallel layers
all-reduce, and the logits come back to rank 0 (gloo on CPU, nccl on CUDA).
"""

from __future__ import annotations

import multiprocessing
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist

from llmkit.devices import bind, indexed
from llmkit.errors import LlmkitError
from llmkit.memory import freeze_heap
from llmkit.net import free_port
from llmkit.runtime.distributed import Group
from llmkit.runtime.model_runner import (
    ModelRunner,
    StepInputs,
    StepOutput,
    prepare,
    prepare_steps,
)
from llmkit.runtime.scheduler import Batch

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
MAX_THREADS = 4096


@dataclass(frozen=True, slots=True)
class RunnerSpec:
    """What every rank needs to build its ModelRunner (sent to worker processes)."""

    model_path: str
    tp: int
    dtype: str  # a key of DTYPES
    device: str
    num_blocks: int
    block_size: int
    max_loras: int = 0
    graph_seqs: int = 0  # > 0: CUDA graphs for decode steps of up to that many tokens
    max_blocks: int = 0  # the widest block table a context needs

    def rank_device(self, rank: int) -> torch.device:
        """The device rank `rank` runs on: with --tp on CUDA, GPU `rank`."""
        device = torch.device(self.device)
        if device.type == "cuda" and self.tp > 1:
            device = torch.device("cuda", rank)
        return device

    def build(self, rank: int) -> ModelRunner:
        return ModelRunner(
            self.model_path,
            Group(rank, self.tp),
            DTYPES[self.dtype],
            self.rank_device(rank),
            self.num_blocks,
            self.block_size,
            max_loras=self.max_loras,
            graph_seqs=self.graph_seqs,
            max_blocks=self.max_blocks,
        )


class Executor:
    def __init__(self, spec: RunnerSpec):
        self.spec = spec
        self.device = indexed(spec.rank_device(0))  # this process's rank's (threads bind it)
        bind(self.device)
        self.workers: list[multiprocessing.Process] = []
        # where broadcast tensors live: nccl takes CUDA tensors only
        self._wire = (
            torch.device("cuda", 0) if spec.device.startswith("cuda") else torch.device("cpu")
        )
        if spec.tp > 1:
            self._start_workers()
        error = None
        try:
            self.runner = spec.build(0)
        except Exception as e:  # every rank reports before anyone raises, so none hangs
            error = f"{type(e).__name__}: {e}"
        self._check_ranks(error)

    def step(
        self,
        batch: Batch,
        masks: Callable[[], dict] | None = None,
        launched: threading.Event | None = None,
    ) -> StepOutput:
        """The engine's one call per step: the scheduled batch in; each sampled token and
        the prompt tokens scored out. `masks()`, read once the logits are computed, gives
        guided sequences the tokens they may sample (seq_id -> bit mask). `launched` is set
        once the model's work is launched (CUDA) or done (CPU); sampling, after it, still
        reads the sequences, which must not change until the call returns. Changes no
        scheduling state: the K/V it writes are written again, the same, if the batch runs
        again."""
        if batch.steps > 1:  # runs_steps() said yes: one rank
            inputs = prepare_steps(batch, self.spec.block_size)
            return self.runner.greedy_steps(inputs, batch.seqs, launched)
        inputs, sampled, spans = prepare(batch, self.spec.block_size)
        if self.spec.tp > 1:
            _send(inputs, self._wire)
        logits = self.runner.execute(inputs)
        if launched is not None:
            launched.set()
        return self.runner.finish(logits, sampled, spans, masks() if masks else None)

    def runs_steps(self) -> bool:
        """Whether a Batch may ask for several greedy decode steps (Batch.steps): one rank,
        whose whole decode step is one C++ call or one CUDA graph."""
        return self.spec.tp == 1 and self.runner.runs_steps()

    def add_lora(self, lora_id: int, path: str, max_rank: int) -> None:
        """Load a LoRA adapter (tp 1: EngineConfig refuses adapters with more ranks)."""
        self.runner.add_lora(lora_id, path, max_rank)

    def remove_lora(self, lora_id: int) -> None:
        self.runner.remove_lora(lora_id)

    def close(self) -> None:
        """Stop the workers and let go of this rank's weights and KV cache: on CUDA the
        memory goes back to the driver, so an engine started after this one (in this process
        or another) can size its cache by what is free."""
        if self.workers:
            try:
                _send(None, self._wire)  # the workers' signal to return
            except RuntimeError:  # a worker is gone already (killed from outside)
                self._stop_workers(kill=True)
            else:
                self._stop_workers(kill=False)
        runner, self.runner = self.runner, None
        if runner is not None and runner.device.type == "cuda":
            del runner
            torch.cuda.empty_cache()

    def _stop_workers(self, kill: bool) -> None:
        for worker in self.workers:
            if kill:
                worker.terminate()
            worker.join(timeout=None if kill else 30)
        if dist.is_initialized():
            dist.destroy_process_group()
        self.workers = []

    def _start_workers(self) -> None:
        port = free_port()
        threads = max(1, torch.get_num_threads() // self.spec.tp)
        ctx = multiprocessing.get_context("spawn")
        for rank in range(1, self.spec.tp):
            worker = ctx.Process(
                target=_worker_main, args=(self.spec, rank, port, threads), daemon=True
            )
            worker.start()
            self.workers.append(worker)
        torch.set_num_threads(threads)
        _init_group(self.spec, 0, port)

    def _check_ranks(self, error: str | None) -> None:
        errors = [error]
        if self.spec.tp > 1:
            errors = [None] * self.spec.tp
            dist.all_gather_object(errors, error)
        failed = [f"rank {r}: {e}" for r, e in enumerate(errors) if e]
        if failed:  # the ranks that loaded wait for a step that will not come: stop them
            self._stop_workers(kill=True)
            raise LlmkitError("loading the model failed on " + "; ".join(failed))


def _init_group(spec: RunnerSpec, rank: int, port: int) -> None:
    backend = "nccl" if spec.device.startswith("cuda") else "gloo"
    dist.init_process_group(
        backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=spec.tp
    )


def _worker_main(spec: RunnerSpec, rank: int, port: int, threads: int) -> None:
    # The driver decides when workers stop: a Ctrl-C or SIGTERM sent to the whole process
    # group (a terminal, systemd) must not kill them under a driver that is still draining.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    torch.set_num_threads(threads)
    bind(spec.rank_device(rank))
    _init_group(spec, rank, port)
    runner, error = None, None
    try:
        runner = spec.build(rank)
    except Exception as e:
        error = f"{type(e).__name__}: {e}"
    dist.all_gather_object([None] * spec.tp, error)
    if runner is None:
        return
    freeze_heap()  # this process holds its rank for good: out of the collector's full passes
    while (inputs := _receive(runner.device)) is not None:
        runner.execute(inputs)
    dist.destroy_process_group()


def _send(inputs: StepInputs | None, device: torch.device) -> None:
    """Rank 0: a step's inputs to the other ranks (None: the signal to stop). The tensors
    travel on `device` (nccl broadcasts CUDA tensors only)."""
    packed = None if inputs is None else inputs.pack().to(device)
    dist.broadcast(torch.tensor([-1 if packed is None else len(packed)], device=device), src=0)
    if packed is not None:
        dist.broadcast(packed, src=0)


def _receive(device: torch.device) -> StepInputs | None:
    """Ranks 1..tp-1: the next step's inputs from rank 0, or None when it says stop."""
    size = torch.zeros(1, dtype=torch.long, device=device)
    dist.broadcast(size, src=0)
    if int(size) < 0:
        return None
    packed = torch.empty(int(size), dtype=torch.long, device=device)
    dist.broadcast(packed, src=0)
    return StepInputs.unpack(packed.cpu())


def set_threads(threads: int | None) -> None:
    """The CPU threads this process's operations use (None: leave torch's own choice)."""
    if threads is None:
        return
    if not 1 <= threads <= MAX_THREADS:
        raise LlmkitError(f"--threads must be between 1 and {MAX_THREADS}, not {threads}")
    torch.set_num_threads(threads)


def cuda_memory(device: torch.device) -> tuple[int, int]:
    """(free, total) bytes of a CUDA device; what torch's allocator holds but no tensor
    uses counts as free."""
    free, total = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device), total
