"""Where a batch-1 CUDA decode step's time goes: wall time per token against the time the
GPU spends in kernels, the kernels launched per token, that time by kind of kernel
(products, attention, norms, ...) and the kernels that take longest. torch.profiler records
one request decoded as benchmarks/cuda.py's batch-1 rows decode it (its prompt length,
tokens and engine settings, but for async output, off here: a step's work is then done when
the step returns, so the profile, started once the first token is out, holds the kernels of
every later token and no earlier one), after a warm-up that captures the graphs and makes
every choice the layers measure on first use.

    python benchmarks/cuda_profile.py CHECKPOINT [CHECKPOINT ...] [--tokens 256] [--pdl on,off]

Each checkpoint is profiled in a process of its own per `--pdl` mode, which prints one JSON
object. A diagnostic for benchmarks/cuda.py's batch-1 rows, not a benchmark with targets.

`--pdl on` profiles the engine as it runs: where kernels launch as programmatic dependents
(compute capability 9.0), a kernel starts while the one before it finishes and its time
includes that wait, so the kernels' times can add up to more than the wall time and a
kernel's time says as much about its neighbours as about itself. `--pdl off` launches every
kernel plainly (cuda_rtc.programmatic patched to say no before anything compiles): each
kernel's time is then its own, and the wall time against `on`'s is what the dependent
launches save. (`--device cpu` runs the same flow on the CPU, its ops in place of kernels:
a check of the script, not a profile of anything CUDA runs: its ops fall in no kind.)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

from cuda import B1_PROMPT, B1_TOKENS, CONCURRENCY, MAX_MODEL_LEN

# kinds of kernels, by substrings of their names (lower case), the first kind that matches
KINDS = (
    ("attention", ("_decode_kernel", "_prefill_kernel")),
    ("K/V write", ("_write_kv",)),
    ("4-bit products", ("int4_",)),
    ("int8 products", ("int8_gemv", "w8a8_gemv", "_int8_kernel", "_quantize_kernel")),
    ("cuBLAS products", ("gemm", "gemv", "nvjet", "xmma", "cutlass")),
    ("norms", ("_norm_kernel",)),
    ("silu * up", ("_silu_mul",)),
    ("reductions (argmax, sampling)", ("reduce", "argmax", "_descend_kernel")),
    ("copies and elementwise", ("elementwise", "memcpy", "memset", "copy", "fill", "index",
                                "gather", "cat")),
)  # fmt: skip
OTHER = "other"


def kind_of(kernel: str) -> str:
    """The KINDS entry a kernel's name belongs to (OTHER where none)."""
    name = kernel.lower()
    return next((kind for kind, parts in KINDS if any(p in name for p in parts)), OTHER)


def summarize(kernels: dict[str, tuple[int, float]], tokens: int, wall_s: float) -> dict:
    """kernels: name -> (calls, microseconds of the device's own time) over `tokens` decoded
    tokens that took `wall_s` -> the per-token figures."""
    busy_us = sum(us for _, us in kernels.values())
    kinds: dict[str, list[float]] = {}
    for name, (calls, us) in kernels.items():
        entry = kinds.setdefault(kind_of(name), [0.0, 0.0])
        entry[0] += calls / tokens
        entry[1] += us / tokens
    top = sorted(kernels.items(), key=lambda kv: -kv[1][1])[:12]
    return {
        "tokens": tokens,
        "ms_per_token": 1e3 * wall_s / tokens,
        "busy_ms_per_token": busy_us / 1e3 / tokens,
        "kernels_per_token": sum(calls for calls, _ in kernels.values()) / tokens,
        "kinds": {
            kind: {"us_per_token": us, "calls_per_token": calls}
            for kind, (calls, us) in sorted(kinds.items(), key=lambda kv: -kv[1][1])
        },
        "top": [
            {"kernel": name[:90], "calls": calls, "us_total": us, "us_mean": us / calls}
            for name, (calls, us) in top
        ],
    }


def profile(model: str, tokens: int, device: str) -> dict:
    """The decode of `tokens` tokens after a B1_PROMPT-token prompt, profiled from the step
    that gave its first token on; summarize's figures for the tokens decoded since."""
    import torch
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    from llmkit.runtime.engine import LLM, EngineConfig
    from llmkit.runtime.sequence import SamplingParams

    cuda = device == "cuda"
    config = EngineConfig(device=device, dtype="bfloat16" if cuda else "auto",
                          max_model_len=MAX_MODEL_LEN if cuda else None,
                          max_num_seqs=max(CONCURRENCY), async_output=False)  # fmt: skip
    llm = LLM(model, config)
    params = SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True)
    prompt = [list(range(3, 3 + B1_PROMPT))]
    llm.generate(prompt, params)  # graphs captured, choices measured
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    prof = torch_profile(activities=activities)
    window = {}  # tokens and time when the profile started, and when it stopped

    def sync():
        if cuda:
            torch.cuda.synchronize()

    def on_step(outs) -> None:
        made = len(outs[0].outputs[0].token_ids) if outs else 0
        if made and "start" not in window:
            sync()
            prof.start()
            window["start"] = (made, time.perf_counter())
        if outs and outs[0].finished and "start" in window:
            sync()
            window["end"] = (made, time.perf_counter())
            prof.stop()

    llm.generate(prompt, params, on_step=on_step)
    llm.close()
    (first, start), (last, end) = window["start"], window["end"]
    kernels = {}  # name -> (calls, microseconds): entries of the device's own time
    for entry in prof.key_averages():
        us = getattr(entry, "self_device_time_total", 0) if cuda else entry.self_cpu_time_total
        if us > 0 and (entry.device_type.name == "CUDA") == cuda:
            kernels[entry.key] = (entry.count, us)
    return {"model": model, **summarize(kernels, last - first, end - start)}


def plain_launches() -> None:
    """Every kernel launched plainly, not as a programmatic dependent: before any kernel
    module is imported or compiled, so all of them take it."""
    from llmkit.kernels import cuda_rtc

    cuda_rtc.programmatic = lambda device: False


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+")
    parser.add_argument("--tokens", type=int, default=B1_TOKENS)
    parser.add_argument("--pdl", default="on,off", help="on, off, or both (on,off)")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.tokens < 8:
        parser.error("--tokens takes 8 or more: the profile starts after the first")
    args.modes = args.pdl.split(",")
    if any(m not in ("on", "off") for m in args.modes):
        parser.error(f"--pdl takes on, off or on,off, not {args.pdl!r}")
    return args


def main() -> None:
    args = parse_args()
    if args.child:  # one model, one mode
        if args.modes == ["off"]:
            plain_launches()
        result = profile(args.models[0], args.tokens, args.device)
        print(json.dumps({**result, "pdl": args.modes[0]}), flush=True)
        return
    failed = 0
    for model in args.models:
        for mode in args.modes:
            child = [sys.executable, __file__, "--child", "--pdl", mode, "--tokens",
                     str(args.tokens), "--device", args.device, model]  # fmt: skip
            failed |= subprocess.run(child).returncode != 0
    sys.exit(failed)


if __name__ == "__main__":
    main()
