"""In-process engine benchmarks (`llmkit bench offline`) and the checkpoint comparison built
on them (`llmkit bench compare`)."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from llmkit.bench.stats import summary
from llmkit.errors import LlmkitError
from llmkit.memory import peak_device_memory, peak_rss
from llmkit.runtime.engine_config import EngineConfig

ADAPTER = "adapter"  # the name a benchmarked adapter is loaded under


@dataclass(frozen=True, slots=True)
class Case:
    batch_size: int
    input_len: int
    output_len: int


@dataclass(frozen=True, slots=True)
class OfflineSpec:
    """What a `bench offline` run measures. Its defaults are the only ones: `llmkit bench
    offline`, a recipe's `bench: offline` step and `bench compare` read them from here."""

    batch_sizes: tuple[int, ...] = (1, 16)
    input_lens: tuple[int, ...] = (128,)
    output_lens: tuple[int, ...] = (128,)
    seed: int = 0  # random prompt token ids
    lora: str | None = None  # a PEFT adapter directory every request runs with

    def cases(self) -> list[Case]:
        sizes = [*self.batch_sizes, *self.input_lens, *self.output_lens]
        if min(sizes, default=0) < 1:
            raise LlmkitError("batch sizes and lengths must be at least 1")
        product = itertools.product(self.batch_sizes, self.input_lens, self.output_lens)
        return [Case(*c) for c in product]


def run_offline(
    model: str,
    config: EngineConfig,
    spec: OfflineSpec,
    on_case: Callable[[dict], None] | None = None,
) -> dict:
    """Load once (timed), then run each case of `spec`: all its requests at once, greedy,
    exactly output_len tokens each. Peak memory is the process's (and CUDA's) high-water
    mark."""
    from llmkit.runtime.engine import LLM

    todo = spec.cases()
    config = with_adapter(config, spec.lora)
    start = time.perf_counter()
    llm = LLM(model, config)
    rows = []
    try:
        if spec.lora is not None:
            llm.engine.add_lora(ADAPTER, spec.lora)
        load_s = time.perf_counter() - start
        for case in todo:
            rows.append(_measure(llm, case, spec.seed, None if spec.lora is None else ADAPTER))
            if on_case is not None:
                on_case(rows[-1])
    finally:
        llm.close()
    return {
        "model": model,
        **({} if spec.lora is None else {"lora": spec.lora}),
        "load_s": load_s,
        "kv_cache_tokens": llm.engine.num_kv_tokens,
        **_peak_memory(),
        "cases": rows,
    }


def with_adapter(config: EngineConfig, lora: str | None) -> EngineConfig:
    """`config` with room for the adapter `lora` (its own rank), if one is given."""
    from llmkit.runtime.lora import adapter_rank

    if lora is None:
        return config
    rank = max(config.max_lora_rank, adapter_rank(lora))
    return replace(config, max_loras=max(config.max_loras, 1), max_lora_rank=rank)


def _measure(llm, case: Case, seed: int, lora: str | None) -> dict:
    import torch

    from llmkit.runtime.sequence import SamplingParams

    vocab = llm.engine.model_config.vocab_size
    g = torch.Generator().manual_seed(seed)
    prompts = torch.randint(3, vocab, (case.batch_size, case.input_len), generator=g).tolist()
    if case.input_len + case.output_len > llm.engine.max_model_len:
        raise LlmkitError(
            f"input {case.input_len} + output {case.output_len} tokens pass the context "
            f"({llm.engine.max_model_len})"
        )
    params = SamplingParams(max_tokens=case.output_len, temperature=0, ignore_eos=True)
    llm.generate(prompts[:1], SamplingParams(max_tokens=2, temperature=0), loras=lora)  # warm-up
    phase = DecodePhase(case.batch_size)
    spec = replace(llm.engine.spec_stats)  # the counts before this case
    start = time.perf_counter()
    outs = llm.generate(prompts, params, on_step=phase.step, loras=lora)
    seconds = time.perf_counter() - start
    output = sum(len(o.outputs[0].token_ids) for o in outs)
    ttfts = [o.times.first_token - o.times.arrival for o in outs]
    tpots = [
        (o.times.finished - o.times.first_token) / (case.output_len - 1)
        for o in outs
        if case.output_len > 1
    ]
    return {
        "batch_size": case.batch_size,
        "input_len": case.input_len,
        "output_len": case.output_len,
        "seconds": seconds,
        "output_throughput": output / seconds,
        "total_token_throughput": (output + case.batch_size * case.input_len) / seconds,
        "decode_throughput": phase.throughput(),
        **summary("ttft_ms", ttfts, 1e3),
        **summary("tpot_ms", tpots, 1e3),
        **_speculation(llm.engine, spec),
    }


def _speculation(engine, before) -> dict:
    """This case's speculative decoding counts (nothing when speculation is off)."""
    if engine.proposer is None:
        return {}
    spec, cutoff = engine.spec_stats.since(before), engine.draft_cutoff()
    return {
        "speculative": engine.proposer.name,
        "spec_proposed_tokens": spec.proposed,
        "spec_accepted_tokens": spec.accepted,
        "spec_acceptance_rate": spec.acceptance_rate,
        "spec_mean_accepted_length": spec.mean_accepted_length,
        "spec_acceptance_by_position": spec.acceptance_by_position,
        **({} if cutoff is None else {"spec_draft_cutoff": cutoff}),
    }


class DecodePhase:
    """Output tokens per second once every request has its first token: the steps that only
    decode the whole batch (prefills of later requests no longer run beside them), what
    llama-batched-bench reports as generation speed. 0.0 when no step comes after that."""

    def __init__(self, requests: int):
        self.waiting = requests  # requests without their first token
        self.counts: dict[str, int] = {}  # request id -> its tokens so far (n = 1)
        self.start = self.end = 0.0
        self.tokens = 0

    def step(self, outs: list) -> None:
        now, prefilling = time.perf_counter(), self.waiting > 0
        new = 0  # a step adds one token per request, or several (speculation, --decode-steps)
        for o in outs:
            count = len(o.outputs[0].token_ids)
            new += count - self.counts.get(o.request_id, 0)
            if o.request_id not in self.counts:
                self.waiting -= 1
            self.counts[o.request_id] = count
        if prefilling:
            self.start = now
        else:
            self.tokens += new
            self.end = now

    def throughput(self) -> float:
        return self.tokens / (self.end - self.start) if self.tokens else 0.0


def _peak_memory() -> dict:
    peak = {"peak_rss_mb": peak_rss() / 2**20}
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        peak["peak_cuda_mb"] = peak_device_memory(torch.device("cuda")) / 2**20
    return peak


def offline_in_child(model: str, spec: OfflineSpec, engine: EngineConfig) -> dict:
    """`run_offline` of `spec` in a process of its own (a clean load time and peak memory
    for each checkpoint); its result."""
    payload = {"model": model, "spec": asdict(spec), "engine": asdict(engine)}
    command = [sys.executable, "-m", "llmkit.bench.offline"]
    done = subprocess.run(command, input=json.dumps(payload), capture_output=True, text=True)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise LlmkitError(f"benchmarking {model} failed: {last}")
    return json.loads(done.stdout)


def _child() -> int:
    """The process `offline_in_child` starts: its payload on stdin, the result on stdout."""
    payload = json.loads(sys.stdin.read())
    spec = OfflineSpec(
        **{k: tuple(v) if isinstance(v, list) else v for k, v in payload["spec"].items()}
    )
    try:
        result = run_offline(payload["model"], EngineConfig(**payload["engine"]), spec)
    except LlmkitError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(json.dumps(result))
    return 0


def size_on_disk(path: str) -> int:
    """Bytes of a checkpoint's weight files."""
    root = Path(path)
    files = [f for p in ("*.safetensors", "*.bin", "*.pt") for f in root.glob(p)]
    return sum(f.stat().st_size for f in files)


if __name__ == "__main__":
    sys.exit(_child())
