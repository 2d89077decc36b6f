"""HTTP serving throughput and latency of `llmkit serve` against the in-process engine.

Workload: the engine benchmark's (benchmarks/engine_throughput.py): `small-llama` in bfloat16,
64 requests with prompt lengths uniform in [32, 256] (random token ids, seed 0), exactly 128
output tokens each (EOS ignored), greedy, 2 threads. Each round, back to back:

1. engine: `LLM.generate` over the 64 requests in a child process (the anchor);
2. http: `llmkit serve` started as a process (time to its first /health 200 recorded), then
   all 64 requests sent at once (concurrency 64) as streaming /v1/completions from this
   process; output tokens/s over the whole batch, and per request TTFT (to the first text
   chunk), TPOT ((end - TTFT) / (tokens - 1)) and ITL (between successive chunks).

Targets: HTTP throughput >= 0.9x the engine's (median of the rounds' ratios), and start-up
to /health 200 <= 1.5x the time to read the weight files (measured here, before each server
start) + 3 s.

    python benchmarks/serve_throughput.py [--workdir DIR] [--repeats 3]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from child import run_child
from engine_throughput import ENV, THREADS, generate_workload, prepare

CONCURRENCY = 64


def child_engine(model: str, workload: dict) -> dict:
    import torch

    from llmkit.runtime.engine import LLM, EngineConfig

    torch.set_num_threads(THREADS)
    llm = LLM(model, EngineConfig())
    try:
        return generate_workload(llm, workload)
    finally:
        llm.close()


def run_engine(model: Path, workload: Path) -> dict:
    command = [sys.executable, __file__, "--child", str(model), str(workload)]
    out, _, _ = run_child(command, env=ENV, timeout=1800)
    result = json.loads(out.strip().splitlines()[-1])
    return {**result, "tokens_per_s": result["output_tokens"] / result["seconds"]}


def read_weights_s(model: Path) -> float:
    """Seconds to read every safetensors file of `model` once, in 16 MiB chunks."""
    start = time.perf_counter()
    for file in sorted(model.glob("*.safetensors")):
        with file.open("rb", buffering=0) as f:
            while f.read(16 * 2**20):
                pass
    return time.perf_counter() - start


def start_server(model: Path, port: int) -> tuple[subprocess.Popen, float]:
    """The server process and its seconds from start to the first /health 200."""
    command = [sys.executable, "-m", "llmkit", "serve", str(model), "--port", str(port)]
    command += ["--served-model-name", "bench", "--log-level", "warning"]
    start = time.perf_counter()
    proc = subprocess.Popen(command, env={**os.environ, **ENV})
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"llmkit serve exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health") as r:
                if r.status == 200:
                    return proc, time.perf_counter() - start
        except OSError:
            pass
        time.sleep(0.01)


async def one_request(client, url: str, prompt: list[int], output_len: int) -> dict:
    body = {
        "model": "bench",
        "prompt": prompt,
        "max_tokens": output_len,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    start = time.perf_counter()
    arrivals, tokens = [], 0
    async with client.stream("POST", url, json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk["choices"]:
                arrivals.append(time.perf_counter())
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    ttft = arrivals[0] - start
    return {
        "tokens": tokens,
        "ttft": ttft,
        "tpot": (arrivals[-1] - start - ttft) / max(tokens - 1, 1),
        "itl": [b - a for a, b in itertools.pairwise(arrivals)],
    }


async def http_run(port: int, workload: dict) -> dict:
    import httpx2

    url = f"http://127.0.0.1:{port}/v1/completions"
    limits = httpx2.Limits(max_connections=CONCURRENCY)
    async with httpx2.AsyncClient(limits=limits, timeout=600) as client:
        await one_request(client, url, workload["prompts"][0][:8], 4)  # warm-up
        start = time.perf_counter()
        results = await asyncio.gather(
            *(one_request(client, url, p, workload["output_len"]) for p in workload["prompts"])
        )
        seconds = time.perf_counter() - start
    tokens = sum(r["tokens"] for r in results)
    return {
        "seconds": seconds,
        "output_tokens": tokens,
        "tokens_per_s": tokens / seconds,
        **latency("ttft_ms", [r["ttft"] for r in results]),
        **latency("tpot_ms", [r["tpot"] for r in results]),
        **latency("itl_ms", [x for r in results for x in r["itl"]]),
    }


def latency(name: str, seconds: list[float]) -> dict:
    ms = sorted(x * 1e3 for x in seconds)
    p99 = ms[min(len(ms) - 1, round(0.99 * (len(ms) - 1)))]
    return {
        f"mean_{name}": statistics.fmean(ms),
        f"median_{name}": statistics.median(ms),
        f"p99_{name}": p99,
    }


def run_round(model: Path, workload_file: Path, port: int) -> dict:
    engine = run_engine(model, workload_file)
    read_s = read_weights_s(model)
    proc, startup_s = start_server(model, port)
    try:
        http = asyncio.run(http_run(port, json.loads(workload_file.read_text())))
    finally:
        proc.terminate()
        code = proc.wait(60)
    if code != 0:
        raise SystemExit(f"llmkit serve exited with {code} on SIGTERM")
    return {"engine": engine, "http": http, "read_weights_s": read_s, "startup_s": startup_s}


def report(rounds: list[dict]) -> None:
    ratios = [r["http"]["tokens_per_s"] / r["engine"]["tokens_per_s"] for r in rounds]
    bounds = [1.5 * r["read_weights_s"] + 3 for r in rounds]
    startups = [r["startup_s"] for r in rounds]
    med = statistics.median
    http = {k: med(r["http"][k] for r in rounds) for k in rounds[0]["http"]}
    print("\nmedians over", len(rounds), "rounds")
    print(f"engine in-process   {med(r['engine']['tokens_per_s'] for r in rounds):8.1f} tok/s")
    print(f"HTTP, concurrency {CONCURRENCY} {http['tokens_per_s']:8.1f} tok/s")
    for name in ("ttft_ms", "tpot_ms", "itl_ms"):
        print(
            f"  {name[:-3].upper():5} mean {http['mean_' + name]:8.1f}  median "
            f"{http['median_' + name]:8.1f}  p99 {http['p99_' + name]:8.1f} ms"
        )
    print(f"HTTP / engine: {med(ratios):.3f} (rounds {', '.join(f'{x:.3f}' for x in ratios)})")
    print("  target >= 0.9:", "met" if med(ratios) >= 0.9 else "MISSED")
    print(
        f"start-up to /health 200: {med(startups):.2f} s; bound 1.5 x read "
        f"{med(r['read_weights_s'] for r in rounds):.3f} s + 3 s = {med(bounds):.2f} s"
    )
    print("  target:", "met" if med(startups) <= med(bounds) else "MISSED")
    print(json.dumps({"rounds": rounds, "http_over_engine": ratios}))


def main() -> None:
    args = parse_args()
    if args.child:
        model, workload = args.child
        print(json.dumps(child_engine(model, json.loads(Path(workload).read_text()))))
        return
    work = Path(args.workdir or tempfile.mkdtemp(prefix="llmkit-serve-bench-"))
    model, workload = prepare(work)
    rounds = []
    for _ in range(args.repeats):
        rounds.append(run_round(model, workload, args.port))
        r = rounds[-1]
        print(
            f"round {len(rounds)}: engine {r['engine']['tokens_per_s']:.1f} tok/s, http "
            f"{r['http']['tokens_per_s']:.1f} tok/s, start-up {r['startup_s']:.2f} s",
            flush=True,
        )
    report(rounds)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", help="keep the model and workload here (reused)")
    parser.add_argument("--repeats", type=int, default=3, help="rounds of both")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    return parser.parse_args()


if __name__ == "__main__":
    main()
