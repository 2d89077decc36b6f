"""What the benchmarks share: the calibration/evaluation split of a text, the tables the
quantization benchmarks print (quality of each run, speed, memory), and the JSON result
file each benchmark writes."""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from datetime import date
from pathlib import Path

MB = 1e6


def split_text(text_path: Path, work: Path) -> tuple[Path, Path]:
    """The first 60% of the text for calibration, the last 20% for evaluation (held out)."""
    text = text_path.read_text(encoding="utf-8")
    calib, evaluation = work / "calibration.txt", work / "evaluation.txt"
    calib.write_text(text[: int(len(text) * 0.6)], encoding="utf-8")
    evaluation.write_text(text[int(len(text) * 0.8) :], encoding="utf-8")
    return calib, evaluation


def print_quality(shared: Path, work: Path, runs: dict[str, dict], title: str) -> dict:
    """Score every run against the float32 stories260K on work/evaluation.txt; print one row
    per run and return {run name: KLD mean}."""
    from llmkit.bench.quality import evaluate_quality
    from llmkit.quant.calibration import CalibrationSpec

    reference = shared / "models" / "stories260K"
    data = CalibrationSpec(dataset=str(work / "evaluation.txt"), seq_len=512)
    rows = evaluate_quality(reference, [r["path"] for r in runs.values()], data)
    print(
        f"{title:28} {'perplexity':>10} {'KLD mean':>10} {'KLD p99':>9} "
        f"{'top-1':>7} {'quant s':>8} {'cmd s':>7} {'peak RSS':>9}"
    )
    print(f"{'fp32 (reference)':28} {rows[0].perplexity:10.4f} {0:10.6f} {0:9.5f} {1:7.2%}")
    for (name, run), row in zip(runs.items(), rows[1:], strict=True):
        print(
            f"{name:28} {row.perplexity:10.4f} {row.kld_mean:10.6f} {row.kld_p99:9.5f} "
            f"{row.top1_agreement:7.2%} {run['seconds']:8.2f} {run['wall']:7.2f} "
            f"{run['peak_rss'] / MB:7.0f}MB"
        )
    return {name: row.kld_mean for name, row in zip(runs, rows[1:], strict=True)}


def print_speed(runs: dict[str, dict], title: str) -> None:
    """One row per run; a run stopped at its time limit shows "> limit"."""
    print(f"\n{title:28} {'quant s':>8} {'cmd s':>7} {'peak RSS':>9}")
    for name, run in runs.items():
        if "stopped_after" in run:
            print(f"{name:28} {'> ' + format(run['stopped_after'], '.0f'):>8} (stopped)")
            continue
        print(f"{name:28} {run['seconds']:8.2f} {run['wall']:7.2f} {run['peak_rss'] / MB:7.0f}MB")


# The largest |KLD difference| between bench quality's and the independent reading's scores.
READING_TOLERANCE = 1e-5


def independent_readings(
    reference: Path,
    evaluation: Path,
    kld: dict[str, float],
    paths: dict[str, Path],
    work: Path,
    seq_len: int = 512,
) -> dict[str, dict]:
    """Each checkpoint in `paths` read and scored by benchmarks/reference/independent_reading.py
    (no llmkit code reads its weights) on the same token windows, beside `kld`, the KLD
    `bench quality` gave it: {name: {"llmkit": ..., "independent": ...}}, printed too."""
    from child import run_child

    from llmkit.bench.quality import eval_windows
    from llmkit.quant.calibration import CalibrationSpec

    if not paths:
        return {}
    ids = work / "evaluation-ids.json"
    windows = eval_windows(reference, CalibrationSpec(dataset=str(evaluation), seq_len=seq_len), 0)
    ids.write_text(json.dumps(windows.tolist()))
    script = Path(__file__).parent / "reference" / "independent_reading.py"
    command = [sys.executable, str(script), str(reference), str(ids), *map(str, paths.values())]
    out, _, _ = run_child(command)
    theirs = json.loads(out.strip().splitlines()[-1])
    readings = {}
    print(f"\n{'bench quality vs independent':28} {'llmkit':>10} {'independent':>11} {'diff':>9}")
    for name, path in paths.items():
        ours, independent = kld[name], theirs[str(path)]
        readings[name] = {"llmkit": ours, "independent": independent}
        print(f"{name:28} {ours:10.6f} {independent:11.6f} {ours - independent:9.1e}")
    return readings


def reading_rows(readings: dict[str, dict]) -> list[dict]:
    """RESULTS.md's rows for `independent_readings`: each checkpoint's KLD as `bench quality`
    read it against the independent reading's, within READING_TOLERANCE."""
    rows = []
    for name, r in readings.items():
        diff = abs(r["llmkit"] - r["independent"])
        rows.append(row(
            f"KLD of {name}'s file, bench quality against an independent reading",
            f"{r['llmkit']:.7f}", f"{r['independent']:.7f}", None,
            f"|difference| ≤ {READING_TOLERANCE:g}", diff <= READING_TOLERANCE,
        ))  # fmt: skip
    return rows


def seconds_at_least(run: dict) -> float:
    """A run's time, or for one stopped at its limit the time it ran (a lower bound)."""
    return run.get("stopped_after", run.get("seconds"))


def print_memory(model: Path, run: dict, num_samples: int, seq_len: int = 512) -> dict:
    """llmkit's peak above its starting RSS against 3x one decoder layer's weights + the
    float32 calibration activations; returns both, in bytes."""
    from llmkit.checkpoint.reader import open_checkpoint

    with open_checkpoint(model) as ck:
        layer = sum(t.nbytes for n, t in ck.tensors.items() if n.startswith("model.layers.0."))
        hidden = ck.config["hidden_size"]
    activations = num_samples * seq_len * hidden * 4
    used = run["peak_rss"] - run["start_rss"]
    bound = 3 * layer + activations
    print(
        f"llmkit memory above its start: {used / MB:.0f}MB vs 3 x layer ({layer / MB:.0f}MB) + "
        f"activations ({activations / MB:.0f}MB) = {bound / MB:.0f}MB -> "
        f"{'met' if used <= bound else 'MISSED'}"
    )
    return {"used": used, "bound": bound}


def quantizer_rows(fields: dict, ours: str, references: list[str], rtn: str) -> list[dict]:
    """RESULTS.md's rows for a quantizer benchmark (gptq.py, awq.py): KLD against each
    reference and against llmkit's RTN at the same settings, every other llmkit variant
    beside the better reference, then time and memory when the speed part ran. KLD and time:
    lower is better, so their targets are ratios of at most 1 (time: 0.5)."""
    kld = fields["kld"]
    best = min(references, key=lambda name: kld[name])
    rows = reference_rows(kld, ours, references)
    rows.append(row(
        f"KLD, {ours} against {rtn} (lower is better)", f"{kld[ours]:.5f}", f"{kld[rtn]:.5f}",
        kld[ours] / kld[rtn], "< 1.0×", kld[ours] < kld[rtn],
    ))  # fmt: skip
    for name in kld:
        if name.startswith("llmkit") and name not in (ours, rtn):
            rows.append(row(
                f"KLD, {name} against {best}", f"{kld[name]:.5f}", f"{kld[best]:.5f}",
                kld[name] / kld[best],
            ))  # fmt: skip
    if "time" in fields:
        time = fields["time"]
        theirs = f"{time['anchor_s']:.1f} s" + (" (stopped there)" if time["stopped"] else "")
        rows.append(row(
            f"time on small-llama, 4-bit g128, against {time['against']} (lower is better; "
            "fastest run of each)",
            f"{time['llmkit_s']:.1f} s", theirs, time["ratio"], "≤ 0.5×", time["ratio"] <= 0.5,
        ))  # fmt: skip
        memory = fields["memory"]
        rows.append(row(
            "peak memory above the start, against 3 × a layer + the activations",
            f"{memory['used'] / MB:.0f} MB", f"bound {memory['bound'] / MB:.0f} MB", None,
            "≤ bound", memory["used"] <= memory["bound"],
        ))  # fmt: skip
    return rows


def reference_rows(
    kld: dict[str, float], ours: str, references: list[str], setting: str = ""
) -> list[dict]:
    """KLD of run `ours` against each reference run's, the target (at most 1x) on the best
    reference. With a `setting`, the runs are named "SETTING: NAME" in `kld`."""
    key = (lambda name: f"{setting}: {name}") if setting else (lambda name: name)
    label = f"4-bit {setting}, " if setting else ""
    best = min(references, key=lambda name: kld[key(name)])
    mine, rows = kld[key(ours)], []
    for name in references:
        target, theirs = name == best, kld[key(name)]
        rows.append(row(
            f"KLD, {label}{ours} against {name} (lower is better)", f"{mine:.5f}",
            f"{theirs:.5f}", mine / theirs, "≤ 1.0×" if target else "",
            mine <= theirs if target else None,
        ))  # fmt: skip
    return rows


def parser(description: str, shared: Path) -> argparse.ArgumentParser:
    """The options the GPTQ and AWQ benchmarks share."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--shared", type=Path, default=shared)
    parser.add_argument("--num-samples", type=int, default=128)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--skip-small", action="store_true", help="quality part only")
    return parser


def workdir(args: argparse.Namespace, prefix: str) -> Path:
    work = args.workdir or Path(tempfile.mkdtemp(prefix=prefix))
    work.mkdir(parents=True, exist_ok=True)
    return work


def save_result(
    benchmark: str,
    fields: dict,
    machine: str = "",
    *,
    anchor: str,
    summary: list[dict],
    variant: str = "",
) -> Path:
    """Write benchmarks/results/<benchmark>-<date>.json: the benchmark's name, date, commit,
    machine (the CPU, then `machine`), the command that ran it, the anchor it is measured
    against, its `summary` rows (see `row`) and then its own `fields`; then regenerate
    benchmarks/RESULTS.md from the newest result of every benchmark. A `variant` (a run that
    measures something else, such as another instruction set) is kept beside the plain
    run's result, as <benchmark>-<variant>-<date>.json, with a table of its own."""
    from results_md import RESULTS, write_results_md

    cpu = f"{platform.machine()}, {cpu_model()}"
    result = {
        "benchmark": benchmark,
        "date": date.today().isoformat(),
        "commit": commit(),
        "machine": f"{cpu}, {machine}" if machine else cpu,
        "command": " ".join(["python", f"benchmarks/{benchmark}.py", *sys.argv[1:]]),
        "anchor": anchor,
        **({"variant": variant} if variant else {}),
        "summary": summary,
        **fields,
    }
    RESULTS.mkdir(exist_ok=True)
    stem = f"{benchmark}-{variant}" if variant else benchmark
    path = RESULTS / f"{stem}-{result['date']}.json"
    path.write_text(json.dumps(result, indent=1))
    print(f"wrote {path}")
    print(f"wrote {write_results_md()}")
    return path


def commit() -> str:
    """The commit whose code ran: $LLMKIT_COMMIT where set (a copy of the tree whose git
    metadata may be stale, such as one sent to a GPU machine), else HEAD, marked "-dirty"
    when tracked files differ from it."""
    if os.environ.get("LLMKIT_COMMIT"):
        return os.environ["LLMKIT_COMMIT"]

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], capture_output=True, text=True).stdout.strip()

    dirty = git("status", "--porcelain", "--untracked-files=no")
    return git("rev-parse", "--short", "HEAD") + ("-dirty" if dirty else "")


def print_median_ratio(label: str, ratios: list[float], target: float) -> None:
    """The median of the rounds' ratios, each round's, and whether it meets `target` (>=)."""
    med = statistics.median(ratios)
    print(f"{label}: {med:.3f} (rounds {', '.join(f'{x:.3f}' for x in ratios)})")
    print(f"  target >= {target}:", "met" if med >= target else "MISSED")


def row(
    measured: str,
    llmkit: str,
    anchor: str,
    ratio: float | None,
    target: str = "",
    met: bool | None = None,
) -> dict:
    """One line of a benchmark's table in RESULTS.md: what was measured, llmkit's number and
    the anchor's (as text, with units and spread), llmkit / anchor, the target and whether
    it was met (None: no target)."""
    return {
        "measured": measured,
        "llmkit": llmkit,
        "anchor": anchor,
        "ratio": ratio,
        "target": target,
        "met": met,
    }


def print_targets(rows: list[dict]) -> None:
    """One line per row that has a target: what, llmkit / anchor and whether it was met."""
    for line in rows:
        if line["target"]:
            ratio = "" if line["ratio"] is None else f" = {line['ratio']:.3f}x"
            verdict = "met" if line["met"] else "MISSED"
            print(f"{line['measured']}: {line['llmkit']} / {line['anchor']}{ratio} -> {verdict}")


# /proc/cpuinfo flags that change which of llmkit's CPU kernels run, and their names
VECTOR_FLAGS = {"avx512f": "AVX-512", "avx512_vnni": "VNNI", "avx512_bf16": "AVX512-BF16",
                "amx_tile": "AMX"}  # fmt: skip


def cpu_model() -> str:
    """The CPU's model name, as /proc/cpuinfo gives it, and its widest vectors (one model
    name covers hosts with and without AVX-512)."""
    name, flags = "unknown CPU", set()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            name = line.split(":", 1)[1].strip()
        elif line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
    vectors = [label for flag, label in VECTOR_FLAGS.items() if flag in flags]
    if not vectors:
        vectors = ["AVX2"] if "avx2" in flags else []
    return f"{name} ({', '.join(vectors)})" if vectors else name
