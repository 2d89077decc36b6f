"""Throughput and peak memory of `llmkit shard --tp 4 --pp 2`, against `cp` of the same bytes.

Checkpoints: the `small-llama` preset (float32, ~0.5 GB) and, unless --skip-1b, a bfloat16
random checkpoint with Llama-3.2-1B's shapes (~2.5 GB, tied embeddings, written once in a
child process). For each, alternates a plain `cp -r` of the source directory with
`llmkit shard` on it, `sync`ing before every run so neither inherits the other's dirty
pages; each shard output is checked with `llmkit shard verify --source` once.

Reported: median seconds of `cp` and of the shard (inside the `llmkit shard` process, as its
--json report gives it; the whole command's wall time, interpreter start-up included, is shown
apart), GB of source per second, the median over pairs of cp seconds / shard seconds (each
pair runs back to back, alternating which goes first; target >= 0.7), and the process's peak
RSS against 2 x largest tensor + 300 MB (target). Writing is disk-bound here and the machine
is shared, so single runs of either vary by 2-5x; use several repeats.

    python benchmarks/shard.py [--workdir DIR] [--repeats 5] [--skip-1b]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from child import against_cp, against_cp_rows, run_child, timed_cp
from report import save_result

from llmkit.checkpoint.reader import open_checkpoint

MB = 1e6
LLAMA_1B = {  # Llama-3.2-1B's shapes
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 2048,
    "num_hidden_layers": 16,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 64,
    "intermediate_size": 8192,
    "vocab_size": 128256,
    "max_position_embeddings": 131072,
    "tie_word_embeddings": True,
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "hidden_act": "silu",
    "torch_dtype": "bfloat16",
}


def make_random_1b(out: Path) -> None:
    make_random(out, LLAMA_1B)


def make_random(out: Path, config: dict, device: str = "cpu") -> None:
    """Write random bfloat16 weights of a llama config's shapes, chunk by chunk (memory ~ 1
    chunk), drawn on `device` (a GPU draws billions of them far faster)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from llmkit.checkpoint.safetensors_io import TensorSpec
    from llmkit.checkpoint.writer import write_checkpoint

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config))
    generator = torch.Generator(device).manual_seed(0)

    def chunks(shape: tuple[int, ...]):
        rows = max(1, 2**24 // max(1, int(torch.tensor(shape[1:]).prod())))
        for start in range(0, shape[0], rows):
            piece = (min(rows, shape[0] - start), *shape[1:])
            drawn = torch.randn(piece, generator=generator, device=device)
            yield (0.02 * drawn).to(torch.bfloat16).cpu()

    tied = config.get("tie_word_embeddings", False)
    specs = [
        TensorSpec(name, "BF16", tuple(p.shape), lambda s=tuple(p.shape): chunks(s))
        for name, p in model.state_dict().items()
        if not (tied and name == "lm_head.weight")
    ]
    write_checkpoint(out, specs, config)


def prepare(work: Path, skip_1b: bool) -> dict[str, Path]:
    """Build the checkpoints in child processes (a parent grown by building them would inflate
    the peak RSS that forked children report)."""
    sources = {"small-llama float32": work / "small-llama"}
    if not (sources["small-llama float32"] / "config.json").is_file():
        command = [sys.executable, "-m", "llmkit", "init", str(work / "small-llama")]
        subprocess.run([*command, "--preset", "small-llama"], check=True)
    if not skip_1b:
        sources["llama-1b-shapes bfloat16"] = work / "llama-1b"
        if not (work / "llama-1b" / "config.json").is_file():
            subprocess.run(
                [sys.executable, __file__, "--make-1b", str(work / "llama-1b")], check=True
            )
    return sources


def timed_shard(src: Path, dst: Path) -> tuple[float, float, int]:
    """(seconds inside shard, wall seconds of the command, peak RSS bytes)."""
    import os

    os.sync()
    command = [sys.executable, "-m", "llmkit", "shard", str(src), str(dst)]
    stdout, wall, peak = run_child([*command, "--tp", "4", "--pp", "2", "--json"])
    return json.loads(stdout)["seconds"], wall, peak


def measure(src: Path, out: Path, repeats: int) -> dict:
    with open_checkpoint(src) as ck:
        weight_bytes = sum(t.nbytes for t in ck.tensors.values())
        largest = max(t.nbytes for t in ck.tensors.values())
    cp_s, shard_s, wall_s, rss = [], [], [], []
    for i in range(repeats):
        if i % 2:  # alternate which of the pair goes first
            cp_s.append(timed_cp(src, out / "cp-out"))
        seconds, wall, peak = timed_shard(src, out / "shard-out")
        if i == 0:
            command = [sys.executable, "-m", "llmkit", "shard", "verify"]
            run_child([*command, str(out / "shard-out"), "--source", str(src)])
        shutil.rmtree(out / "shard-out")
        if i % 2 == 0:
            cp_s.append(timed_cp(src, out / "cp-out"))
        shard_s.append(seconds)
        wall_s.append(wall)
        rss.append(peak)
    return against_cp("shard", (weight_bytes, largest), cp_s, shard_s, wall_s, rss, 0.7)


def report(results: dict[str, dict]) -> None:
    print(
        f"{'tp=4 pp=2':26} {'source':>8} {'cp GB/s':>8} {'shard GB/s':>10} {'ratio':>6} "
        f"{'cmd wall':>8} {'wall ratio':>10} {'peak RSS':>9} {'RSS bound':>9}"
    )
    for name, r in results.items():
        print(
            f"{name:26} {r['source_bytes'] / MB:6.0f}MB {r['cp_gb_per_s']:8.2f} "
            f"{r['shard_gb_per_s']:10.2f} {r['throughput_ratio']:6.2f} "
            f"{r['command_wall_seconds']:7.2f}s {r['wall_ratio']:10.2f} "
            f"{r['peak_rss_bytes'] / MB:7.0f}MB {r['rss_bound_bytes'] / MB:7.0f}MB"
        )
    for name, r in results.items():
        verdict = "met" if r["throughput_target_met"] and r["rss_target_met"] else "MISSED"
        print(f"{name}: throughput >= 0.7x cp and peak RSS <= bound: {verdict}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--skip-1b", action="store_true", help="small-llama only")
    parser.add_argument(
        "--out-dir", type=Path, default=None, help="where cp and shard write (default: workdir)"
    )
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--make-1b", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.make_1b:
        make_random_1b(args.make_1b)
        return
    work = args.workdir or Path(tempfile.mkdtemp(prefix="llmkit-shard-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    sources = prepare(work, args.skip_1b)
    out = args.out_dir or work
    out.mkdir(parents=True, exist_ok=True)
    results = {name: measure(src, out, args.repeats) for name, src in sources.items()}
    if args.json:
        print(json.dumps(results, indent=2))
        return
    report(results)
    summary = [
        r for name, result in results.items() for r in against_cp_rows(name, "shard", result)
    ]
    save_result("shard", {"results": results}, anchor="cp -r of the same files", summary=summary)


if __name__ == "__main__":
    main()
