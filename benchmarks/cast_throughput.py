"""Cast throughput and peak memory of `llmkit quantize --method fp16|bf16`, against `cp`.

Builds the `small-llama` preset (float32 and bfloat16 copies) in a work directory, then, for
each cast, alternates a plain `cp -r` of the source checkpoint with `llmkit quantize` on the
same files, `sync`ing before every run so neither inherits the other's dirty pages.

Reported per cast: median seconds of `cp` and of the cast (the quantize call inside the
`llmkit quantize` process, as its --json report gives it; interpreter start-up is shown
apart), throughput in GB of source checkpoint per second, the median over back-to-back pairs
of cp seconds / cast seconds (target >= 0.5), and the process's peak RSS against 2 x largest
tensor + 300 MB (target).

    python benchmarks/cast_throughput.py [--workdir DIR] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from child import against_cp, against_cp_rows, llmkit_quantize, timed_cp
from report import save_result

from llmkit.checkpoint.reader import open_checkpoint

CASES = (("float32", "bf16"), ("bfloat16", "fp16"))
MB = 1e6


def timed_cast(src: Path, dst: Path, method: str) -> tuple[float, float, float]:
    """(seconds inside quantize, wall seconds of the whole command, peak RSS in bytes)."""
    os.sync()
    report, wall, peak = llmkit_quantize(src, dst, method)
    shutil.rmtree(dst)
    return report["seconds"], wall, peak


def measure(src: Path, work: Path, method: str, repeats: int) -> dict:
    with open_checkpoint(src) as ck:
        weight_bytes = sum(t.nbytes for t in ck.tensors.values())
        largest = max(t.nbytes for t in ck.tensors.values())
    cp_s, cast_s, wall_s, rss = [], [], [], []
    for _ in range(repeats):
        cp_s.append(timed_cp(src, work / "cp-out"))
        seconds, wall, peak = timed_cast(src, work / "cast-out", method)
        cast_s.append(seconds)
        wall_s.append(wall)
        rss.append(peak)
    sizes = (weight_bytes, largest)
    return {"method": method, **against_cp("cast", sizes, cp_s, cast_s, wall_s, rss, 0.5)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="llmkit-cast-bench-"))
    results = []
    for dtype, method in CASES:
        src = work / f"small-llama-{dtype}"
        if not (src / "config.json").is_file():
            # In a child process: a parent grown by building the model would inflate the
            # peak RSS that forked children report.
            subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "llmkit",
                    "init",
                    str(src),
                    "--preset",
                    "small-llama",
                    "--dtype",
                    dtype,
                ],
                check=True,
            )
        results.append({"source_dtype": dtype, **measure(src, work, method, args.repeats)})
    if args.json:
        print(json.dumps(results, indent=2))
        return
    print(
        f"{'cast':16} {'source':>9} {'cp GB/s':>8} {'cast GB/s':>9} {'ratio':>6} "
        f"{'cmd wall':>8} {'peak RSS':>9} {'RSS bound':>9}"
    )
    for r in results:
        print(
            f"{r['source_dtype'] + '->' + r['method']:16} {r['source_bytes'] / MB:7.0f}MB "
            f"{r['cp_gb_per_s']:8.2f} {r['cast_gb_per_s']:9.2f} {r['throughput_ratio']:6.2f} "
            f"{r['command_wall_seconds']:7.2f}s {r['peak_rss_bytes'] / MB:7.0f}MB "
            f"{r['rss_bound_bytes'] / MB:7.0f}MB"
        )
    for r in results:
        verdict = "met" if r["throughput_target_met"] and r["rss_target_met"] else "MISSED"
        print(f"{r['method']}: throughput >= 0.5x cp and peak RSS <= bound: {verdict}")
    summary = [
        line
        for r in results
        for line in against_cp_rows(f"{r['source_dtype']} -> {r['method']}", "cast", r)
    ]
    save_result(
        "cast_throughput", {"results": results}, anchor="cp -r of the same files", summary=summary
    )


if __name__ == "__main__":
    main()
