"""llmkit serving on a CUDA GPU against transformers, in one run: batch-1 decode and its
memory-bandwidth utilisation, quantized decode, and throughput under concurrency.

Models (random weights, bf16): Llama-3.2-1B's shapes and Llama-3-8B's (--models picks).
From each bf16 checkpoint llmkit makes its quantized copies on the GPU (`llmkit quantize
--device cuda`: int8, w8a8, gptq and awq 4-bit g128; --methods picks), calibrated on the
built-in text (--calibration samples of 512 tokens); their seconds and peak GPU memory are
reported. Every contender runs in its own child process, one after the other:

- llmkit, every checkpoint: batch-1 decode tokens/s (prompt 128, 256 tokens, greedy, EOS
  ignored; the first token, from the prefill, not counted; the median of B1_RUNS runs in
  one engine, their range beside it, and the 4-bit ratio's range as the slowest 4-bit run
  over the fastest bf16 one and the other way round), with CUDA graphs and the
  default --decode-steps and --decode-call-ms and, for bf16, also with one step per engine
  step and eagerly (--enforce-eager); decode tokens/s of 16 sequences at once.
- llmkit bf16: output tokens/s of 64 and 256 concurrent requests (prompts of 512
  random tokens, 256 output tokens each, EOS ignored; --max-num-seqs 256).
- transformers with a static KV cache and torch.compile(mode="reduce-overhead") at batch 1
  (the gpt-fast recipe): decode tokens/s, as the difference of two generate lengths (so its
  prefill and compile are not counted).
- transformers' static batching: one `generate` of all 64 (then 256) requests.

--anchors picks the transformers runs (an empty list runs none: their rows say so).
--bf16-parts picks what the bf16 engine measures beyond batch 1 and batch BATCH: eager
(batch 1 again without graphs, and with one step per engine step), concurrency (64 and
256 concurrent requests); leaving them out makes a run that only compares batch-1 rates
fit a short device call.
--int4-env VAR=VALUE[,VAR=VALUE...] (repeatable) also runs each 4-bit copy with those
variables set, beside the run without: an A/B of a kernel setting in one run, such as
LLMKIT_FUSED_NORMS=1 (norms folded into the products) or, with it,
LLMKIT_L2_PREFETCH_MB=16 (weights after the attention prefetched into the L2).

MBU: weight bytes read per token (every tensor but the embedding table, which counts again
as a tied LM head) x batch-1 tokens/s / the bandwidth of a 1 GiB device-to-device copy
measured in the same process, counting the bytes it read and wrote (what the memory moved;
counting only the bytes copied, an H100 gives half, and decode reads "faster" than it).
Targets (8B shapes, issue 37): bf16 MBU >= 0.75; gptq-int4 batch-1 >= 2.5x bf16; batch-1
>= 1.0x the compiled transformers anchor; bf16 output at 256 concurrent >= 5,000 tok/s. At
every shape (FLOORS): gptq and awq 4-bit faster than bf16 at batch 1 and batch BATCH, int8
weight-only not slower.

Writes benchmarks/results/cuda-<date>.json with the GPU, driver, torch and Triton versions,
LLMKIT_L2_PREFETCH_MB (the 4-bit layers' L2 prefetch, 0: none) and, per model shape, `mbu`,
`int4_over_bf16` (its range in `int4_over_bf16_range`; `int4_over_bf16_with`, per
--int4-env), `throughput_256` and the anchor ratios. A run without the 8B shapes (whose
rows carry the targets) writes cuda-<shapes>-<date>.json instead, a table of its own, and
one without gptq (--methods int8,w8a8) cuda-<copies>-<date>.json.

    python benchmarks/cuda.py [--workdir DIR] [--models 1b,8b] [--methods ...]
        [--calibration N] [--anchors hf-compiled,hf-static] [--int4-env VAR=VALUE ...]
        [--bf16-parts eager,concurrency]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from child import TimedOut, llmkit_quantize, run_child
from engine_throughput import (
    cell,
    copy_bandwidth,
    decode_rate,
    generate_workload,
    median,
    weight_bytes_per_token,
)
from report import print_targets, row, save_result
from shard import LLAMA_1B, make_random

LLAMA_8B = {  # Llama-3-8B's shapes
    **LLAMA_1B,
    "hidden_size": 4096,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "intermediate_size": 14336,
    "max_position_embeddings": 8192,
    "tie_word_embeddings": False,
    "rope_theta": 500000.0,
}
SHAPES = {"1b": LLAMA_1B, "8b": LLAMA_8B}
METHODS = {
    "int8": [],
    "w8a8": [],
    "gptq": ["--group-size", "128"],
    "awq": ["--group-size", "128"],
}
B1_PROMPT, B1_TOKENS, BATCH = 128, 256, 16
# each quantized copy's decode against bf16 at batch 1 and BATCH, every shape (issue 37):
# faster (">") or not slower (">="); gptq's batch 1 at 8B shapes: at least GPTQ_8B_RATIO
FLOORS = {"gptq": ">", "awq": ">", "int8": ">="}
GPTQ_8B_RATIO = 2.5
B1_RUNS = 5  # batch-1 decode runs per engine: their median counts, their range is the spread
PROMPT, OUTPUT, CONCURRENCY = 512, 256, (64, 256)
MAX_MODEL_LEN = 1024
ANCHORS = ("hf-compiled", "hf-static")
ANCHOR_TIMEOUT = 300  # seconds; compiling an 8B model can take minutes
NOT_RUN = {"error": "not run (--anchors)"}
INT4 = ("gptq", "awq")  # the copies --int4-env runs again
BF16_PARTS = ("eager", "concurrency")  # what --bf16-parts may pick (batch always runs)


def int4_env(text: str) -> dict[str, str]:
    """--int4-env's VAR=VALUE[,VAR=VALUE...] as a dict, each VAR an LLMKIT_ variable."""
    pairs = [item.split("=", 1) for item in text.split(",")]
    if not all(len(p) == 2 and p[0].startswith("LLMKIT_") for p in pairs):
        raise argparse.ArgumentTypeError(f"{text!r}: give LLMKIT_VAR=VALUE[,LLMKIT_VAR=VALUE]")
    return dict(pairs)


def env_label(env: dict[str, str]) -> str:
    """--int4-env's variables as given: VAR=VALUE[,VAR=VALUE...]."""
    return ",".join(f"{k}={v}" for k, v in env.items())


def prompts(count: int, length: int, seed: int) -> list[list[int]]:
    import torch

    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 32000, (count, length), generator=g).tolist()


# ---- children: each prints one JSON line --------------------------------------------------


def child_make(shape: str, out: str) -> dict:
    from llmkit.checkpoint.tokenizer import write_tokenizer

    start = time.perf_counter()
    make_random(Path(out), SHAPES[shape], device="cuda")
    write_tokenizer(Path(out), 32000, 2048)  # ids below 32000: a subset of the vocabulary
    return {"seconds": time.perf_counter() - start}


def _engine(model: str, eager: bool = False):
    from llmkit.runtime.engine import LLM, EngineConfig

    config = EngineConfig(device="cuda", dtype="bfloat16", max_model_len=MAX_MODEL_LEN,
                          max_num_seqs=max(CONCURRENCY), enforce_eager=eager)  # fmt: skip
    return LLM(model, config)


def decode(engine, count: int) -> float:
    """Decode tokens/s of `count` sequences of B1_PROMPT tokens, B1_TOKENS tokens each."""
    return decode_rate(engine, prompts(count, B1_PROMPT, seed=1), B1_TOKENS)


def throughput(llm, concurrency: int, output: int = OUTPUT) -> dict:
    """Output tokens/s of `concurrency` requests of PROMPT tokens, `output` tokens each."""
    load = {"prompts": prompts(concurrency, PROMPT, seed=2), "output_len": output}
    result = generate_workload(llm, load)
    return {**result, "tokens_per_s": result["output_tokens"] / result["seconds"]}


def child_llmkit(model: str, parts: str) -> dict:
    """Batch-1 decode, and `parts` (comma-separated): eager (batch 1 again without graphs),
    batch (BATCH sequences), concurrency (each of CONCURRENCY)."""
    from llmkit.runtime.sequence import SamplingParams

    wanted = parts.split(",")
    out = {"copy_bandwidth": copy_bandwidth("cuda", 2**29, 20)}  # 1 GiB
    llm = _engine(model)
    warm = prompts(2, 16, seed=3)
    llm.generate(warm, SamplingParams(max_tokens=8, temperature=0))
    decode(llm.engine, 1)  # every choice the layers make on first use made
    out["b1_runs"] = [decode(llm.engine, 1) for _ in range(B1_RUNS)]
    out["b1_tokens_per_s"] = median(out["b1_runs"])
    out["decode_steps"] = llm.engine.config.decode_steps
    if "eager" in wanted:  # graphs, one step per engine step: what --decode-steps adds
        config = llm.engine.config
        llm.engine.config = dataclasses.replace(config, decode_steps=1)
        out["b1_one_step_tokens_per_s"] = decode(llm.engine, 1)
        llm.engine.config = config
    if "batch" in wanted:
        decode_rate(llm.engine, prompts(BATCH, 16, seed=1), 8)  # its graph captured
        out[f"b{BATCH}_tokens_per_s"] = decode(llm.engine, BATCH)
    if "concurrency" in wanted:
        # requests are admitted a few prompts per step, so decode batches pass through
        # every bucket: a shorter run first captures them
        out["warmup"] = throughput(llm, max(CONCURRENCY), 96)
        for c in CONCURRENCY:
            out[f"c{c}"] = throughput(llm, c)
    out["graph_capture_s"] = llm.engine.executor.runner.graphs.capture_seconds
    llm.close()
    if "eager" in wanted:
        llm = _engine(model, eager=True)
        llm.generate(warm, SamplingParams(max_tokens=8, temperature=0))
        out["b1_eager_tokens_per_s"] = decode(llm.engine, 1)
        llm.close()
    return out


def child_hf_compiled(model: str) -> dict:
    """transformers, static cache, compiled by its generate (torch.compile, mode
    "reduce-overhead", full graph), batch 1."""
    import torch
    from transformers import AutoModelForCausalLM, CompileConfig

    hf = AutoModelForCausalLM.from_pretrained(model, dtype=torch.bfloat16).cuda().eval()
    hf.generation_config.eos_token_id = None
    ids = torch.tensor(prompts(1, B1_PROMPT, seed=1), device="cuda")
    compiled = CompileConfig(fullgraph=True, mode="reduce-overhead")

    def seconds(new: int) -> float:
        torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.inference_mode():
            hf.generate(input_ids=ids, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                        cache_implementation="static", compile_config=compiled)  # fmt: skip
        torch.cuda.synchronize()
        return time.perf_counter() - start

    start = time.perf_counter()
    seconds(B1_TOKENS)
    seconds(B1_TOKENS)  # compiled for both phases, graphs recorded
    compile_s = time.perf_counter() - start
    short = min(seconds(32) for _ in range(2))
    full = min(seconds(B1_TOKENS) for _ in range(2))
    return {"b1_tokens_per_s": (B1_TOKENS - 32) / (full - short), "warmup_s": compile_s}


def child_hf_static(model: str) -> dict:
    """transformers' static batching: one generate of every request at each concurrency."""
    import torch
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model, dtype=torch.bfloat16).cuda().eval()
    hf.generation_config.eos_token_id = None
    out = {}
    with torch.inference_mode():
        hf.generate(input_ids=torch.tensor(prompts(2, 16, seed=3), device="cuda"),
                    max_new_tokens=4, do_sample=False)  # fmt: skip
        for c in CONCURRENCY:
            ids = torch.tensor(prompts(c, PROMPT, seed=2), device="cuda")
            torch.cuda.synchronize()
            start = time.perf_counter()
            hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                        max_new_tokens=OUTPUT, min_new_tokens=OUTPUT, do_sample=False)  # fmt: skip
            torch.cuda.synchronize()
            seconds = time.perf_counter() - start
            out[f"c{c}"] = {"seconds": seconds, "tokens_per_s": c * OUTPUT / seconds}
            del ids
            torch.cuda.empty_cache()
    return out


CHILDREN = {"make": child_make, "llmkit": child_llmkit, "hf-compiled": child_hf_compiled,
            "hf-static": child_hf_static}  # fmt: skip


# ---- parent -------------------------------------------------------------------------------


def child(*args: str, timeout: float | None = None, env: dict | None = None) -> dict:
    command = [sys.executable, __file__, "--child", *args]
    out, wall, _ = run_child(command, env=env, timeout=timeout)
    result = json.loads(out.splitlines()[-1])
    print(" ".join(args[:1] + tuple(Path(a).name for a in args[1:2])), json.dumps(result),
          f"({wall:.0f} s)", flush=True)  # fmt: skip
    return result


def optional(*args: str, timeout: float | None = None, env: dict | None = None) -> dict:
    """A child whose failure (or running past `timeout` seconds) is recorded, and its rows
    left out, not fatal."""
    try:
        return child(*args, timeout=timeout, env=env)
    except (SystemExit, TimedOut) as e:
        print(f"{args[0]} failed: {str(e)[-1500:]}", flush=True)
        return {"error": str(e)[-1500:]}


def quantized(src: Path, method: str, calibration: int) -> tuple[Path, dict]:
    out = src.parent / f"{src.name}-{method}"
    options = [*METHODS[method], "--device", "cuda", "--overwrite"]
    if method in ("gptq", "awq", "w8a8"):
        options += ["--dataset", "builtin", "--num-samples", str(calibration), "--seq-len", "512"]
    report, wall, _ = llmkit_quantize(src, out, method, *options)
    made = {"seconds": report["seconds"], "wall_s": wall,
            "peak_gpu_mb": report["peak_device_bytes"] / 1e6}  # fmt: skip
    print(f"quantize {src.name} {method}", json.dumps(made), flush=True)
    return out, made


def run_shape(shape: str, work: Path, args: argparse.Namespace) -> dict:
    bf16 = work / f"llama-{shape}"
    if not (bf16 / "config.json").is_file():
        child("make", shape, str(bf16))
    runs = {"bf16": child("llmkit", str(bf16), ",".join(["batch", *args.bf16_parts]))}
    anchors = {name: optional(name, str(bf16), timeout=ANCHOR_TIMEOUT) for name in args.anchors}
    made = {}
    for method in args.methods:
        path, made[method] = quantized(bf16, method, args.calibration)
        runs[method] = optional("llmkit", str(path), "batch")
        runs[method]["weight_bytes_per_token"] = weight_bytes_per_token(path)
        for env in args.int4_env if method in INT4 else ():
            run = optional("llmkit", str(path), "batch", env=env)
            runs[f"{method} with {env_label(env)}"] = {**run, "method": method, "env": env}
    runs["bf16"]["weight_bytes_per_token"] = weight_bytes_per_token(bf16)
    return {"quantize": made, "llmkit": runs, "anchors": anchors, **ratios(runs, anchors)}


def ratios(runs: dict, anchors: dict) -> dict:
    bf16 = runs["bf16"]
    # a copy reads and writes each byte: what the memory moved is twice the bytes copied
    mbu = bf16["b1_tokens_per_s"] * bf16["weight_bytes_per_token"] / (2 * bf16["copy_bandwidth"])
    out = {"mbu": mbu}
    if "c256" in bf16:
        out["throughput_256"] = bf16["c256"]["tokens_per_s"]
    compiled, static = (anchors.get(name, NOT_RUN) for name in ANCHORS)
    if "error" not in compiled:
        out["b1_over_hf_compiled"] = bf16["b1_tokens_per_s"] / compiled["b1_tokens_per_s"]
    for c in CONCURRENCY:
        if "error" not in static and f"c{c}" in bf16:
            hf = static[f"c{c}"]["tokens_per_s"]
            out[f"c{c}_over_hf_static"] = bf16[f"c{c}"]["tokens_per_s"] / hf

    def over_bf16(run: dict) -> float:
        return run["b1_tokens_per_s"] / bf16["b1_tokens_per_s"]

    if "error" not in runs.get("gptq", NOT_RUN):
        out["int4_over_bf16"] = over_bf16(runs["gptq"])
        out["int4_over_bf16_range"] = ratio_range(runs["gptq"], bf16)
    with_env = {env_label(run["env"]): over_bf16(run) for run in runs.values()
                if run.get("method") == "gptq" and "error" not in run}  # fmt: skip
    if with_env:  # --int4-env's runs, by their variables
        out["int4_over_bf16_with"] = with_env
    return out


def ratio_range(run: dict, bf16: dict) -> list[float]:
    """[slowest run / fastest bf16 run, fastest run / slowest bf16 run] at batch 1."""
    mine, base = run["b1_runs"], bf16["b1_runs"]
    return [min(mine) / max(base), max(mine) / min(base)]


def summarize(shapes: dict) -> list[dict]:
    rows = []
    for shape, r in shapes.items():
        tag = f"Llama-3 {shape.upper()} shapes"
        bf16, hf = r["llmkit"]["bf16"], r["anchors"]
        met = shape == "8b"
        base = cell(bf16["b1_runs"], " tok/s")  # batch-1 median (the runs' range)
        modes = f"up to {bf16['decode_steps']} steps a call" if "decode_steps" in bf16 else ""
        if "b1_one_step_tokens_per_s" in bf16:
            modes += f"; 1 step: {bf16['b1_one_step_tokens_per_s']:.1f}"
        if "b1_eager_tokens_per_s" in bf16:
            modes += f"; eager: {bf16['b1_eager_tokens_per_s']:.1f}"
        rows.append(row(
            f"{tag}: bf16 batch-1 decode, MBU against a device-to-device copy",
            f"{base}, {modes}; MBU {r['mbu']:.2f}", "", None,
            ">= 0.75 MBU" if met else "", r["mbu"] >= 0.75 if met else None,
        ))  # fmt: skip
        if "b1_over_hf_compiled" in r:
            ratio = r["b1_over_hf_compiled"]
            rows.append(row(
                f"{tag}: bf16 batch-1 decode against transformers static cache + torch.compile",
                base,
                f"{hf['hf-compiled']['b1_tokens_per_s']:.1f} tok/s",
                ratio, ">= 1.0x" if met else "", ratio >= 1.0 if met else None,
            ))  # fmt: skip
        for name, run in r["llmkit"].items():
            if name == "bf16" or "error" in run:
                continue
            ratio = run["b1_tokens_per_s"] / bf16["b1_tokens_per_s"]
            low, high = ratio_range(run, bf16)
            batch = run[f"b{BATCH}_tokens_per_s"] / bf16[f"b{BATCH}_tokens_per_s"]
            target, held = floor_target(name, met, ratio, batch)
            rows.append(row(
                f"{tag}: {name} batch-1 decode against llmkit bf16 (ratio's range "
                f"{low:.2f}-{high:.2f}x; batch {BATCH} after the runs: {batch:.2f}x)",
                f"{cell(run['b1_runs'], ' tok/s')}; {run[f'b{BATCH}_tokens_per_s']:.0f} tok/s",
                f"{base}; {bf16[f'b{BATCH}_tokens_per_s']:.0f} tok/s",
                ratio, target, held,
            ))  # fmt: skip
        for c in CONCURRENCY if "c256" in bf16 else ():  # --bf16-parts without concurrency: none
            mine = bf16[f"c{c}"]["tokens_per_s"]
            target = met and c == 256
            static = hf.get("hf-static", NOT_RUN)
            static_tok_s = static.get(f"c{c}", {}).get("tokens_per_s")
            rows.append(row(
                f"{tag}: bf16 output tok/s, {c} concurrent (prompt {PROMPT}, {OUTPUT} out), "
                "against transformers' static batch",
                f"{mine:.0f} tok/s",
                f"{static_tok_s:.0f} tok/s" if static_tok_s else static.get("error", "failed"),
                r.get(f"c{c}_over_hf_static"), ">= 5000 tok/s" if target else "",
                mine >= 5000 if target else None,
            ))  # fmt: skip
    return rows


def floor_target(name: str, eight_b: bool, ratio: float, batch: float):
    """(the target's text, whether it holds) for a quantized copy's decode against bf16:
    `ratio` at batch 1, `batch` at batch BATCH (FLOORS; ("", None) for a method without)."""
    if name not in FLOORS:
        return "", None
    sign = FLOORS[name]
    floors = [(1, sign, 1.0), (BATCH, sign, 1.0)]
    if name == "gptq" and eight_b:
        floors[0] = (1, ">=", GPTQ_8B_RATIO)
    text = "; ".join(f"batch {b} {op} {floor}x" for b, op, floor in floors)
    values = (ratio, batch)
    held = all(v > f if op == ">" else v >= f
               for v, (_, op, f) in zip(values, floors, strict=True))  # fmt: skip
    return text, held


def versions() -> dict:
    import torch
    import triton

    smi = ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]
    driver = subprocess.run(smi, capture_output=True, text=True).stdout.strip()
    return {"gpu": torch.cuda.get_device_name(), "driver": driver, "torch": torch.__version__,
            "triton": triton.__version__,
            "l2_prefetch_mb": os.environ.get("LLMKIT_L2_PREFETCH_MB", "0")}  # fmt: skip


def result_variant(shapes: list[str], methods: list[str]) -> list[str]:
    """What names a run's table of its own: the 8B shapes with a gptq copy carry the
    targets (the plain table); a run without the 8B shapes is named by its shapes, one
    without gptq (--methods, such as a device call's int8,w8a8) by its copies, so that a
    day's runs of other copies keep their own files beside it."""
    return [*([] if "8b" in shapes else shapes), *([] if "gptq" in methods else methods)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", help="keep the checkpoints here (default: a temp dir)")
    parser.add_argument("--models", default="1b,8b", help="shapes to run: 1b, 8b")
    parser.add_argument("--methods", default=",".join(METHODS), help="quantized copies")
    parser.add_argument("--calibration", type=int, default=32, help="calibration samples")
    parser.add_argument("--anchors", default=",".join(ANCHORS), help="transformers runs")
    parser.add_argument(
        "--int4-env",
        type=int4_env,
        action="append",
        default=[],
        metavar="VAR=VALUE[,VAR=VALUE]",
        help="also run the 4-bit copies with these variables set (repeatable)",
    )
    parser.add_argument(
        "--bf16-parts",
        default=",".join(BF16_PARTS),
        help="what the bf16 engine measures beyond batch 1 and 16: eager, concurrency",
    )
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(CHILDREN[args.child[0]](*args.child[1:])), flush=True)
        return
    args.methods = [m for m in args.methods.split(",") if m]
    args.anchors = [a for a in args.anchors.split(",") if a]
    if unknown := set(args.anchors) - set(ANCHORS):
        parser.error(f"--anchors: unknown {', '.join(sorted(unknown))} (known: {ANCHORS})")
    args.bf16_parts = [p for p in args.bf16_parts.split(",") if p]
    if unknown := set(args.bf16_parts) - set(BF16_PARTS):
        parser.error(f"--bf16-parts: unknown {', '.join(sorted(unknown))} (known: {BF16_PARTS})")
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/cuda.py needs a CUDA device; torch sees none")
    fields = versions()
    print(json.dumps(fields), flush=True)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="llmkit-cuda-bench-"))
    shapes = {s: run_shape(s, work, args) for s in args.models.split(",")}
    fields["shapes"] = shapes
    summary = summarize(shapes)
    print_targets(summary)
    anchor = "transformers on the same GPU: static cache + torch.compile at batch 1, static batches"
    if not args.anchors:
        anchor = "llmkit bf16 on the same GPU (transformers not run: --anchors)"
    machine = ", ".join([fields["gpu"], f"driver {fields['driver']}",
                         f"torch {fields['torch']}", f"triton {fields['triton']}"])  # fmt: skip
    if float(fields["l2_prefetch_mb"]):
        machine += f", LLMKIT_L2_PREFETCH_MB={fields['l2_prefetch_mb']}"
    variant = "-".join(result_variant(list(shapes), args.methods))
    save_result("cuda", fields, machine, anchor=anchor, summary=summary, variant=variant)


if __name__ == "__main__":
    main()
