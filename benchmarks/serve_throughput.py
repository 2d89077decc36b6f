"""HTTP serving throughput and latency of `llmkit serve` against the in-process engine.

Workload: the engine benchmark's (benchmarks/engine_throughput.py): `small-llama` in bfloat16,
64 requests with prompt lengths uniform in [32, 256] (random token ids, seed 0), exactly 128
output tokens each (EOS ignored), greedy, 2 threads. Each round, back to back:

1. engine: `LLM.generate` over the 64 requests in a child process (the anchor);
2. http: `llmkit serve` started as a process (time to its first /health 200 recorded), then
   all 64 requests sent at once (concurrency 64) as streaming /v1/completions from this
   process by `llmkit bench serve`'s load generator: output tokens/s over the whole batch,
   and per request TTFT (to the first text chunk), TPOT ((end - TTFT) / (tokens - 1)) and
   ITL (between successive chunks).

Targets: HTTP throughput >= 0.9x the engine's (median of the rounds' ratios), and start-up
to /health 200 <= 1.5x the time to read the weight files (measured here, before each server
start) + 3 s.

    python benchmarks/serve_throughput.py [--workdir DIR] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from child import run_child
from engine_throughput import ENV, THREADS, generate_workload, prepare
from report import row, save_result

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


def http_run(url: str, workload: dict) -> dict:
    """The workload through `llmkit bench serve`'s load generator: all requests at once,
    streaming; after one short warm-up request."""
    from llmkit.bench.load import LoadSpec, run_load
    from llmkit.bench.prompts import BenchRequest

    spec = LoadSpec(url, model="bench", ignore_eos=True)
    run_load(spec, [BenchRequest(workload["prompts"][0][:8], 4)])
    requests = [BenchRequest(p, workload["output_len"]) for p in workload["prompts"]]
    result = run_load(spec, requests)
    if result["failed"]:
        raise SystemExit(f"{result['failed']} requests failed: {result['errors'][:3]}")
    return result


def run_round(model: Path, workload_file: Path, port: int) -> dict:
    from llmkit.serve.launch import launched, llmkit_serve_command

    engine = run_engine(model, workload_file)
    read_s = read_weights_s(model)
    command = [*llmkit_serve_command(model, port), "--served-model-name", "bench"]
    with launched(command, port, ENV) as server:
        http = http_run(server.url, json.loads(workload_file.read_text()))
    return {"engine": engine, "http": http, "read_weights_s": read_s, "startup_s": server.startup_s}


def report(rounds: list[dict]) -> None:
    ratios = [r["http"]["output_throughput"] / r["engine"]["tokens_per_s"] for r in rounds]
    bounds = [1.5 * r["read_weights_s"] + 3 for r in rounds]
    startups = [r["startup_s"] for r in rounds]
    med = statistics.median
    keys = ["output_throughput"] + [
        f"{s}_{m}_ms" for m in ("ttft", "tpot", "itl") for s in ("mean", "median", "p99")
    ]
    http = {k: med(r["http"][k] for r in rounds) for k in keys}
    print("\nmedians over", len(rounds), "rounds")
    print(f"engine in-process   {med(r['engine']['tokens_per_s'] for r in rounds):8.1f} tok/s")
    print(f"HTTP, concurrency {CONCURRENCY} {http['output_throughput']:8.1f} tok/s")
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
    fields = {"http_over_engine": ratios, "http_medians": http, "rounds": rounds}
    anchor = "the same engine in-process (LLM.generate)"
    save_result(
        "serve_throughput", fields, f"{THREADS} threads", anchor=anchor, summary=summarize(fields)
    )


def summarize(fields: dict) -> list[dict]:
    """RESULTS.md's rows: HTTP throughput against the engine, latencies, start-up."""
    rounds, ratios, http = fields["rounds"], fields["http_over_engine"], fields["http_medians"]
    med = statistics.median
    engine = [r["engine"]["tokens_per_s"] for r in rounds]
    served = [r["http"]["output_throughput"] for r in rounds]
    startups = [r["startup_s"] for r in rounds]
    bound = med(1.5 * r["read_weights_s"] + 3 for r in rounds)
    latency = ", ".join(
        f"{name.upper()} {http[f'median_{name}_ms']:.0f} / {http[f'p99_{name}_ms']:.0f}"
        for name in ("ttft", "tpot", "itl")
    )
    return [
        row(
            f"64 streaming requests at once, output tok/s (ratio: median of the {len(rounds)} "
            f"rounds', {min(ratios):.2f}-{max(ratios):.2f})",
            f"{med(served):.1f} tok/s",
            f"{med(engine):.1f} tok/s",
            med(ratios),
            "≥ 0.9×",
            med(ratios) >= 0.9,
        ),
        row("latency over HTTP, median / p99 ms", latency, "", None),
        row(
            "start-up to /health 200, against 1.5 × reading the weights + 3 s",
            f"{med(startups):.2f} s",
            f"bound {bound:.2f} s",
            None,
            "≤ bound",
            med(startups) <= bound,
        ),
    ]


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
            f"{r['http']['output_throughput']:.1f} tok/s, start-up {r['startup_s']:.2f} s",
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
