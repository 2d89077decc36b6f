"""Async output against sync output, in one run: the engine's output tok/s with each step
started before the outputs of the step before are detokenized and built
(EngineConfig.async_output, `--async-output`), and without.

- CPU (default; 2 threads): small-llama in bfloat16 (made under --workdir once) on
  benchmarks/engine_throughput.py's workload: 64 requests, prompts of 32 to 256 random ids,
  128 tokens each, EOS ignored.
- CUDA (`--device cuda`): Llama-3.2-1B's shapes (`--shape 8b`: Llama-3-8B's), random init in
  bfloat16 with benchmarks/cuda.py's tokenizer, made under --workdir once; 256 requests of 128
  prompt tokens, 128 tokens each, EOS ignored.

Each workload runs greedy (decode steps run ahead, several a call, where the whole step is one
C++ call or one CUDA graph) and sampled (temperature 0.8, a seed per request: a step a call),
on all its requests and on its first alone: on CUDA a step hands its work to a thread and
back, which costs about the same at any batch, while what it overlaps (detokenizing and
building outputs) grows with the batch; on the CPU, where the work is done before the call
could go on, a step runs on the engine's thread either way, and only when outputs come
changes. One engine runs both modes: async output is switched between runs (the same KV
cache and CUDA graphs). After one unmeasured run of each case in each mode (a process's
first runs pay its warm-up, and on CUDA async output's first starts its thread), each
round runs every case in both modes, in an order that alternates between rounds.
Reported: each mode's output tok/s (median of the rounds, with their range) and async / sync
as the median of the rounds' own ratios. Async output is the default on CUDA, so there its
target is >= 1.0x; on the CPU, where it is off by default, the rows carry no target: they
show what it would do there.

Writes benchmarks/results/async_output-<date>.json (`-cuda-<shape>` variants for CUDA).

    python benchmarks/async_output.py [--workdir DIR] [--rounds 3] [--device cuda --shape 1b]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

from cuda import SHAPES, child_make, prompts
from engine_throughput import THREADS, cell, generate_workload, prepare
from report import print_targets, row, save_result

CUDA_REQUESTS, CUDA_PROMPT, CUDA_OUTPUT = 256, 128, 128
CUDA_KV_GIB = {"1b": 4, "8b": 12}
SAMPLED_TEMPERATURE = 0.8


def cuda_model(work: Path, shape: str) -> Path:
    """benchmarks/cuda.py's random checkpoint of `shape`, made under `work` once."""
    model = work / f"llama-{shape}"
    if not (model / "config.json").exists():
        child_make(shape, str(model))
    return model


def engine(model: Path, device: str, shape: str):
    from llmkit.runtime.engine import LLM, EngineConfig

    if device == "cpu":
        import torch

        torch.set_num_threads(THREADS)
        return LLM(model, EngineConfig())
    config = EngineConfig(device="cuda", dtype="bfloat16", max_num_seqs=CUDA_REQUESTS,
                          max_model_len=CUDA_PROMPT + CUDA_OUTPUT + 16,
                          kv_cache_memory=CUDA_KV_GIB[shape] * 2**30)  # fmt: skip
    return LLM(model, config)


def sampled(workload: dict) -> list:
    from llmkit.runtime.sequence import SamplingParams

    tokens = workload["output_len"]
    return [
        SamplingParams(max_tokens=tokens, temperature=SAMPLED_TEMPERATURE, seed=i, ignore_eos=True)
        for i in range(len(workload["prompts"]))
    ]


def run_sampled(llm, workload: dict) -> dict:
    return generate_workload(llm, workload, sampled(workload))


RUNS = {"greedy": generate_workload, "sampled": run_sampled}


def cases(workload: dict) -> dict[str, tuple]:
    """Case -> (run, its workload): each of RUNS on every request, and on the first alone."""
    count = len(workload["prompts"])
    loads = ((count, workload), (1, {**workload, "prompts": workload["prompts"][:1]}))
    return {f"{kind}, {n} request{'s' * (n > 1)}": (run, load)
            for n, load in loads for kind, run in RUNS.items()}  # fmt: skip


def one_round(llm, workload: dict, index: int) -> dict:
    """tok/s of every case in both modes, in an order that alternates with `index`."""
    modes = (False, True) if index % 2 == 0 else (True, False)
    out: dict[str, dict] = {}
    for case, (run, load) in cases(workload).items():
        out[case] = {}
        for mode in modes:
            llm.engine.async_output = mode
            result = run(llm, load)
            out[case]["async" if mode else "sync"] = result["output_tokens"] / result["seconds"]
        print(f"round {index}: {case}: sync {out[case]['sync']:.1f} tok/s, "
              f"async {out[case]['async']:.1f} tok/s", flush=True)  # fmt: skip
    return out


def summarize(rounds: list[dict], cuda: bool, label: str) -> list[dict]:
    rows = []
    for case in rounds[0]:
        ratios = [r[case]["async"] / r[case]["sync"] for r in rounds]
        ratio = statistics.median(ratios)
        rows.append(
            row(
                f"{label}, {case}: output tok/s, async output / sync",
                cell([r[case]["async"] for r in rounds], " tok/s"),
                cell([r[case]["sync"] for r in rounds], " tok/s"),
                ratio,
                f">= 1.0x (rounds {min(ratios):.3f}-{max(ratios):.3f})" if cuda else "",
                ratio >= 1.0 if cuda else None,
            )
        )
        print(f"{case}: async / sync {ratio:.3f} "
              f"(rounds {', '.join(f'{x:.3f}' for x in ratios)})")  # fmt: skip
    return rows


def main() -> None:
    args = parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="llmkit-async-output-"))
    work.mkdir(parents=True, exist_ok=True)
    cuda = args.device == "cuda"
    if cuda:
        import torch

        model = cuda_model(work, args.shape)
        workload = {
            "prompts": prompts(CUDA_REQUESTS, CUDA_PROMPT, seed=2),
            "output_len": CUDA_OUTPUT,
        }
        machine = torch.cuda.get_device_name()
        label = f"Llama-{args.shape} shapes, {CUDA_OUTPUT} tokens a request"
    else:
        import json

        model, path = prepare(work)
        workload, machine = json.loads(path.read_text()), f"{THREADS} threads"
        label = f"small-llama, {workload['output_len']} tokens a request"
    llm = engine(model, args.device, args.shape)
    try:
        for mode in (False, True):  # unmeasured: warm-up, and async output's thread
            llm.engine.async_output = mode
            for run, load in cases(workload).values():
                run(llm, load)
        rounds = [one_round(llm, workload, i) for i in range(args.rounds)]
    finally:
        llm.close()
    summary = summarize(rounds, cuda, label)
    print_targets(summary)
    fields = {"rounds": rounds, "device": args.device}
    save_result("async_output", fields, machine, anchor="the same engine with sync output",
                summary=summary, variant=f"cuda-{args.shape}" if cuda else "")  # fmt: skip


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", help="where the models are made (default: a new temp dir)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--shape", choices=tuple(SHAPES), default="1b")
    return parser.parse_args()


if __name__ == "__main__":
    sys.exit(main())
