"""llmkit on a CUDA GPU: GPTQ quantization and offline generation, with their anchors.

GPTQ (4 bits, group 128, the built-in calibration text, 128 windows of 512 tokens): the
`small-llama` preset (float32) on the GPU and on this machine's CPU (all its cores), and a
random bfloat16 checkpoint of Llama-3.2-1B's shapes (1.24 B parameters, as in
benchmarks/shard.py) on the GPU. Printed: llmkit's own time, the command's wall time, peak
RSS, peak GPU memory (torch's allocator) and the mean per-layer reconstruction error.

Generation (the workload of benchmarks/engine_throughput.py: 64 requests, prompts of 32-256
random tokens, exactly 128 output tokens each, greedy), each contender in its own process:
llmkit `LLM.generate` on the 1B checkpoint in bf16 and on its GPTQ int4 output, and
transformers `generate` in static batches of 16 on the bf16 checkpoint. Also llmkit's batch-1
decode tokens/s and memory-bandwidth utilisation against a device-to-device copy measured in
the same process.

    python benchmarks/cuda.py [--workdir DIR] [--skip-cpu]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from child import llmkit_quantize, run_child
from engine_throughput import (
    batch1_decode,
    copy_bandwidth,
    generate_workload,
    make_workload,
    static_batches,
    weight_bytes_per_token,
)
from report import row, save_result
from shard import LLAMA_1B, make_random_1b

CALIBRATION = ["--dataset", "builtin", "--num-samples", "128", "--seq-len", "512"]


def prepare(work: Path) -> dict[str, Path]:
    """small-llama (float32) and the 1B-shaped bf16 checkpoint with a trained tokenizer."""
    models = {"small-llama": work / "small-llama", "llama-1b": work / "llama-1b"}
    if not (models["small-llama"] / "config.json").is_file():
        command = [sys.executable, "-m", "llmkit", "init", str(models["small-llama"])]
        subprocess.run([*command, "--preset", "small-llama"], check=True)
    if not (models["llama-1b"] / "config.json").is_file():
        subprocess.run([sys.executable, __file__, "--child", "make-1b", str(work)], check=True)
    return models


def gptq_run(src: Path, out: Path, device: str) -> dict:
    report, wall, rss = llmkit_quantize(
        src, out, "gptq", *CALIBRATION, "--device", device, "--overwrite"
    )
    errors = [e for layer in report["layer_errors"] for e in layer["modules"].values()]
    return {
        "seconds": report["seconds"],
        "wall_s": wall,
        "peak_rss_mb": rss / 1e6,
        "peak_gpu_mb": report["peak_device_bytes"] / 1e6,
        "mean_layer_error": statistics.fmean(errors),
    }


# ---- children: each prints one JSON line --------------------------------------------------


def child_make_1b(work: str) -> dict:
    from llmkit.checkpoint.tokenizer import write_tokenizer

    out = Path(work) / "llama-1b"
    make_random_1b(out)
    write_tokenizer(out, 32000, 2048)  # ids below 32000: a subset of the 1B vocabulary
    return {"made": str(out), "vocab": LLAMA_1B["vocab_size"]}


def child_llmkit(model: str, workload: str) -> dict:
    from llmkit.runtime.engine import LLM, EngineConfig

    llm = LLM(model, EngineConfig(device="cuda", dtype="bfloat16", max_model_len=2048))
    result = generate_workload(llm, json.loads(Path(workload).read_text()))
    batch1 = batch1_decode(llm.engine, 128, 128)
    return {**result, **batch1, "copy_bandwidth": copy_bandwidth("cuda", 2**29, 20)}  # 1 GiB


def child_hf_static(model: str, workload: str) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model, dtype=torch.bfloat16).cuda().eval()
    load = json.loads(Path(workload).read_text())
    return static_batches(hf, load, sync=torch.cuda.synchronize)


CHILDREN = {"make-1b": child_make_1b, "llmkit": child_llmkit, "hf-static": child_hf_static}


# ---- parent -------------------------------------------------------------------------------


def generation_run(tool: str, model: Path, workload: Path) -> dict:
    out, wall, rss = run_child(
        [sys.executable, __file__, "--child", tool, str(model), str(workload)]
    )
    result = json.loads(out.splitlines()[-1])
    tokens_per_s = result["output_tokens"] / result["seconds"]
    return {**result, "tokens_per_s": tokens_per_s, "wall_s": wall, "peak_rss_mb": rss / 1e6}


def gptq_runs(models: dict[str, Path], work: Path, skip_cpu: bool) -> dict[str, dict]:
    """Each GPTQ run, printed as it finishes; returned by name."""
    results = {}
    print("\nGPTQ 4-bit g128, 128 x 512 calibration tokens")
    print(f"{'run':<28}{'llmkit s':>10}{'wall s':>9}{'RSS MB':>9}{'GPU MB':>9}{'mean err':>10}")
    runs = [("small-llama", "cuda"), ("small-llama", "cpu"), ("llama-1b", "cuda")]
    for model, device in runs:
        if device == "cpu" and skip_cpu:
            continue
        r = gptq_run(models[model], work / f"{model}-gptq-{device}", device)
        name = f"{model}, {device}" + (" (all cores)" if device == "cpu" else "")
        results[name] = r
        print(
            f"{name:<28}{r['seconds']:>10.1f}{r['wall_s']:>9.1f}{r['peak_rss_mb']:>9.0f}"
            f"{r['peak_gpu_mb']:>9.0f}{r['mean_layer_error']:>10.5f}",
            flush=True,
        )
    return results


def print_generation(runs: dict[str, dict], weight_bytes: dict[str, int]) -> None:
    print("\nGeneration: 64 requests, prompts 32-256, 128 output tokens each, greedy")
    print(f"{'run':<28}{'output tok/s':>14}{'seconds':>9}{'batch-1 tok/s':>15}{'MBU':>7}")
    for name, r in runs.items():
        batch1 = r.get("batch1_tokens_per_s")
        mbu = batch1 * weight_bytes[name] / r["copy_bandwidth"] if batch1 else None
        print(
            f"{name:<28}{r['tokens_per_s']:>14.1f}{r['seconds']:>9.2f}"
            + (f"{batch1:>15.1f}{mbu:>7.0%}" if batch1 else "")
        )
    hf = runs["hf-static bf16"]["tokens_per_s"]
    for name in ("llmkit bf16", "llmkit gptq int4"):
        print(f"{name} / hf-static bf16: {runs[name]['tokens_per_s'] / hf:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", help="keep the checkpoints here (default: a temp dir)")
    parser.add_argument("--skip-cpu", action="store_true", help="no CPU GPTQ run of small-llama")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(CHILDREN[args.child[0]](*args.child[1:])), flush=True)
        return
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/cuda.py needs a CUDA device; torch sees none")
    print(f"gpu: {torch.cuda.get_device_name()}; torch {torch.__version__}", flush=True)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="llmkit-cuda-bench-"))
    models = prepare(work)
    gptq = gptq_runs(models, work, args.skip_cpu)
    workload = work / "workload.json"
    make_workload(workload)
    checkpoints = {
        "llmkit bf16": ("llmkit", models["llama-1b"]),
        "llmkit gptq int4": ("llmkit", work / "llama-1b-gptq-cuda"),
        "hf-static bf16": ("hf-static", models["llama-1b"]),
    }
    generation = {}
    for name, (tool, model) in checkpoints.items():
        generation[name] = generation_run(tool, model, workload)
        print(name, json.dumps(generation[name]), flush=True)
    sizes = {name: weight_bytes_per_token(model) for name, (_, model) in checkpoints.items()}
    print_generation(generation, sizes)
    fields = {"gpu": torch.cuda.get_device_name(), "gptq": gptq, "generation": generation}
    fields["weight_bytes_per_token"] = sizes
    anchor = "transformers' static batches on the same GPU"
    save_result("cuda", fields, fields["gpu"], anchor=anchor, summary=summarize(fields))


def summarize(fields: dict) -> list[dict]:
    """RESULTS.md's rows: each GPTQ run, generation against transformers, batch-1 MBU."""
    rows = [
        row(
            f"GPTQ 4-bit g128, {name} (seconds; peak GPU memory)",
            f"{r['seconds']:.1f} s; {r['peak_gpu_mb']:.0f} MB",
            "",
            None,
        )
        for name, r in fields["gptq"].items()
    ]
    generation, sizes = fields["generation"], fields["weight_bytes_per_token"]
    hf = generation["hf-static bf16"]["tokens_per_s"]
    for name in ("llmkit bf16", "llmkit gptq int4"):
        r = generation[name]
        rows.append(row(
            f"64 requests x 128 tokens, {name}, output tok/s (anchor: transformers bf16)",
            f"{r['tokens_per_s']:.1f} tok/s", f"{hf:.1f} tok/s", r["tokens_per_s"] / hf,
        ))  # fmt: skip
        if "batch1_tokens_per_s" not in r:
            continue
        mbu = r["batch1_tokens_per_s"] * sizes[name] / r["copy_bandwidth"]
        rows.append(row(
            f"batch-1 decode, {name}; MBU against a device-to-device copy",
            f"{r['batch1_tokens_per_s']:.1f} tok/s, MBU {mbu:.0%}", "", None,
        ))  # fmt: skip
    return rows


if __name__ == "__main__":
    main()
