"""Where a batch-1 CUDA decode step's time goes: wall time per token against the time the
GPU spends in kernels, the kernels launched per token, and the kernels that take longest
(torch.profiler over one request of a 128-token prompt, its prefill included, after a
warm-up that captures the graph and makes every choice the layers measure on first use).

    python benchmarks/cuda_profile.py CHECKPOINT [CHECKPOINT ...] [--tokens 64]

Prints one JSON object per checkpoint; a diagnostic for benchmarks/cuda.py's batch-1 rows,
not a benchmark with targets of its own.

Where kernels launch as programmatic dependents (the 4-bit products, the attention and norm
kernels on compute capability 9.0), a kernel starts while the one before it finishes and
its time includes that wait: the GPU's kernel time can then add up to more than the wall
time, and a kernel's mean time says as much about its neighbours as about itself; time
kernels alone with benchmarks/cuda_int4.py.
"""

from __future__ import annotations

import argparse
import json
import time


def profile(model: str, tokens: int) -> dict:
    import torch
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    from llmkit.runtime.engine import LLM, EngineConfig
    from llmkit.runtime.sequence import SamplingParams

    config = EngineConfig(device="cuda", dtype="bfloat16", max_model_len=1024, max_num_seqs=16)
    llm = LLM(model, config)
    params = SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True)
    prompt = [list(range(3, 131))]
    llm.generate(prompt, params)  # graphs captured, choices measured
    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        torch.cuda.synchronize()
        start = time.perf_counter()
        llm.generate(prompt, params)
        torch.cuda.synchronize()
        wall = time.perf_counter() - start
    llm.close()
    kernels = {}  # name -> (calls, microseconds): entries of the GPU's own time
    for entry in prof.key_averages():
        us = getattr(entry, "self_device_time_total", 0)
        if us > 0 and entry.device_type.name == "CUDA":
            kernels[entry.key] = (entry.count, us)
    busy_us = sum(us for _, us in kernels.values())
    top = sorted(kernels.items(), key=lambda kv: -kv[1][1])[:12]
    return {
        "model": model,
        "tokens": tokens,
        "ms_per_token": 1e3 * wall / tokens,
        "gpu_busy_ms_per_token": busy_us / 1e3 / tokens,
        "kernels_per_token": sum(calls for calls, _ in kernels.values()) / tokens,
        "top": [
            {"kernel": name[:90], "calls": calls, "us_total": us, "us_mean": us / calls}
            for name, (calls, us) in top
        ],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+")
    parser.add_argument("--tokens", type=int, default=64)
    args = parser.parse_args()
    for model in args.models:
        print(json.dumps(profile(model, args.tokens)), flush=True)


if __name__ == "__main__":
    main()
