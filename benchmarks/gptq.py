"""GPTQ: llmkit beside GPTQModel 7.6.0 and llm-compressor 0.14.0.1 with the same settings and
calibration windows.

Quality: ../shared/models/stories260K-pad176 (stories260K with the MLP padded to 176, the
same function to 4e-6, because GPTQ packs inputs in multiples of 8), tinyshakespeare's first
60% for calibration and last 20% for evaluation, as in benchmarks/quality.py; scored against
the float32 stories260K. llmkit gptq, GPTQModel gptq, llm-compressor gptq (W4A16) and llmkit
rtn at the same settings (4 bits, group 16, symmetric, damp 0.01), each tool with its
defaults otherwise: llmkit without act-order and with its clip search (each group's range
searched; GPTQModel's equivalent, `mse`, is off by default, so llmkit without it is shown
too), GPTQModel with its group-aware order, llm-compressor with its `weight` column order.
The same for one grid per output channel, without and with act-order (llm-compressor's
`weight` order is act-order there). Targets: llmkit's KLD <= the best reference's in each
setting, and strictly better than llmkit rtn. Every reference file's KLD as `bench quality`
reads it must match benchmarks/reference/independent_reading.py's to 1e-5.

Speed and memory: the small-llama preset (float32, made on the fly), built-in text, group 128.
Target: llmkit's quantization wall time <= 0.5x GPTQModel's. The tools run --rounds times
each, alternating; the ratio compares each tool's fastest run (the one least slowed by the
rest of this shared machine), and every round's own ratio is printed beside it. Printed
too: each process's peak RSS, and llmkit's largest peak above its starting RSS against 3x
one decoder layer's float weights + the calibration activations.

Every tool runs as a child process on the same token windows and times itself in-process
(llmkit: tokenizing, calibrating, quantizing, writing; GPTQModel: loading, quantizing,
saving; llm-compressor: calibrating, quantizing, saving); whole-command wall times are shown
beside. The parent stays small until every child
has run, since a child's peak RSS counts its parent's size at fork.

    python benchmarks/gptq.py [--shared ../shared] [--num-samples 128] [--rounds 2]
        [--skip-small]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import report
from child import llmkit_quantize, run_child

ROOT = Path(__file__).resolve().parent.parent
GPTQMODEL = ROOT / ".refvenvs" / "gptqmodel" / "bin" / "python"
LLMCOMPRESSOR = ROOT / ".refvenvs" / "llmcompressor" / "bin" / "python"
IDS_SCRIPT = """
import json, sys
from transformers import AutoTokenizer
from llmkit.quant.calibration import CalibrationSpec, calibration_ids
model, dataset, num, out = sys.argv[1:5]
spec = CalibrationSpec(dataset=dataset, num_samples=int(num), seq_len=512)
ids = calibration_ids(AutoTokenizer.from_pretrained(model), spec)
open(out, "w").write(json.dumps(ids.tolist()))
"""


def llmkit_run(
    src: Path, out: Path, method: str, options: list[str], dataset: str, num_samples: int
) -> dict:
    calibration = ["--dataset", dataset, "--num-samples", str(num_samples), "--seq-len", "512"]
    result, wall, peak = llmkit_quantize(
        src, out, method, *options, *calibration, "--device", "cpu", "--overwrite"
    )
    return {
        "path": out,
        "seconds": result["seconds"],
        "wall": wall,
        "peak_rss": peak,
        "start_rss": result["start_rss_bytes"],
    }


def gptqmodel_run(
    src: Path, out: Path, ids: Path, group_size: int, method="gptq", timeout=None, flags=()
) -> dict:
    script = ROOT / "benchmarks" / "reference" / "gptqmodel_quantize.py"
    command = [
        str(GPTQMODEL),
        str(script),
        str(src),
        str(ids),
        str(out),
        "--group-size",
        str(group_size),
        "--method",
        method,
        *flags,
    ]
    # GPTQModel writes a log folder into its working directory: keep it in the work dir.
    env = {"GPTQMODEL_CPU_WORKERS": "2"}
    stdout, wall, peak = run_child(command, env=env, cwd=out.parent, timeout=timeout)
    seconds = json.loads(stdout.strip().splitlines()[-1])["seconds"]
    return {"path": out, "seconds": seconds, "wall": wall, "peak_rss": peak}


def llmcompressor_run(
    script: str, src: Path, out: Path, ids: Path, flags: list[str], timeout=None
) -> dict:
    """benchmarks/reference/SCRIPT (llm-compressor, in its venv) on the windows in `ids`."""
    command = [str(LLMCOMPRESSOR), str(ROOT / "benchmarks" / "reference" / script)]
    command += [str(src), str(ids), str(out), *flags]
    stdout, wall, peak = run_child(command, timeout=timeout)
    seconds = json.loads(stdout.strip().splitlines()[-1])["seconds"]
    return {"path": out, "seconds": seconds, "wall": wall, "peak_rss": peak}


def calibration_windows(model: Path, dataset: str, num_samples: int, out: Path) -> Path:
    run_child([sys.executable, "-c", IDS_SCRIPT, str(model), dataset, str(num_samples), str(out)])
    return out


def quality_runs(shared: Path, work: Path, num_samples: int) -> dict[str, dict]:
    calib, _ = report.split_text(shared / "data" / "tinyshakespeare.txt", work)
    model = shared / "models" / "stories260K-pad176"
    options = ["--bits", "4", "--group-size", "16"]
    runs = {
        "llmkit gptq": llmkit_run(
            model, work / "llmkit-gptq", "gptq", options, str(calib), num_samples
        ),
        "llmkit gptq, no clip search": llmkit_run(
            model,
            work / "llmkit-gptq-noclip",
            "gptq",
            [*options, "--no-clip-search"],
            str(calib),
            num_samples,
        ),
        "llmkit rtn": llmkit_run(
            model, work / "llmkit-rtn", "rtn", options, str(calib), num_samples
        ),
    }
    ids = calibration_windows(model, str(calib), num_samples, work / "stories-ids.json")
    runs["gptqmodel gptq"] = gptqmodel_run(model, work / "gptqmodel-gptq", ids, 16)
    runs["llm-compressor gptq"] = llmcompressor_run(
        LLMCOMPRESSOR_GPTQ, model, work / "llmcompressor-gptq", ids, ["--group-size", "16"]
    )
    for config, flags in CHANNEL_CONFIGS.items():
        slug = config.replace(" ", "-")
        runs[f"{config}: llmkit gptq"] = llmkit_run(
            model, work / f"llmkit-{slug}", "gptq", ["--bits", "4", "--group-size", "-1",
            *flags["llmkit"]], str(calib), num_samples,
        )  # fmt: skip
        runs[f"{config}: gptqmodel gptq"] = gptqmodel_run(
            model, work / f"gptqmodel-{slug}", ids, -1, flags=flags["gptqmodel"]
        )
        runs[f"{config}: llm-compressor gptq"] = llmcompressor_run(
            LLMCOMPRESSOR_GPTQ, model, work / f"llmcompressor-{slug}", ids,
            ["--group-size", "-1", *flags["llm-compressor"]],
        )  # fmt: skip
    return runs


LLMCOMPRESSOR_GPTQ = "llmcompressor_gptq.py"
REFERENCES = ["gptqmodel gptq", "llm-compressor gptq"]
# The other 4-bit GPTQ settings compared: one grid per output channel, without and with
# act-order, and each tool's flags for them.
CHANNEL_CONFIGS = {
    "per-channel": {"llmkit": [], "gptqmodel": [], "llm-compressor": ["--actorder", "none"]},
    "per-channel act-order": {
        "llmkit": ["--desc-act"],
        "gptqmodel": ["--desc-act"],
        "llm-compressor": ["--actorder", "weight"],
    },
}


def channel_rows(kld: dict[str, float]) -> list[dict]:
    """RESULTS.md's rows for CHANNEL_CONFIGS: llmkit's KLD against each reference's."""
    rows = []
    for config in CHANNEL_CONFIGS:
        rows += report.reference_rows(kld, "llmkit gptq", REFERENCES, config)
    return rows


def small_llama(work: Path, num_samples: int) -> tuple[Path, Path]:
    """The small-llama preset in `work` (made once) and its built-in calibration windows."""
    model = work / "small-llama"
    if not (model / "config.json").is_file():
        run_child([sys.executable, "-m", "llmkit", "init", str(model), "--preset", "small-llama"])
    return model, calibration_windows(model, "builtin", num_samples, work / "small-ids.json")


def speed_runs(work: Path, num_samples: int, rounds: int) -> dict[str, list[dict]]:
    """Each tool `rounds` times, alternating (llmkit, GPTQModel, llmkit, ...), so that a load
    from the rest of the machine that comes and goes falls on both."""
    model, ids = small_llama(work, num_samples)
    runs: dict[str, list[dict]] = {"llmkit gptq": [], "gptqmodel gptq": []}
    for _ in range(rounds):
        ours = llmkit_run(model, work / "small-llmkit", "gptq", [], "builtin", num_samples)
        runs["llmkit gptq"].append(ours)
        runs["gptqmodel gptq"].append(gptqmodel_run(model, work / "small-gptqmodel", ids, 128))
    return runs


def print_targets(shared: Path, work: Path, quality: dict, speed: dict, num_samples: int):
    kld = report.print_quality(shared, work, quality, "stories260K, 4-bit g16")
    paths = {name: run["path"] for name, run in quality.items() if "llmkit" not in name}
    reference = shared / "models" / "stories260K"
    readings = report.independent_readings(reference, work / "evaluation.txt", kld, paths, work)
    fields: dict = {"kld": kld, "readings": readings}
    if speed:
        rows = {
            f"{name}, round {i}": run
            for name, runs in speed.items()
            for i, run in enumerate(runs, 1)
        }
        report.print_speed(rows, "small-llama, 4-bit g128")
        ours, theirs = speed["llmkit gptq"], speed["gptqmodel gptq"]
        each = [a["seconds"] / b["seconds"] for a, b in zip(ours, theirs, strict=True)]
        fastest = min(a["seconds"] for a in ours), min(b["seconds"] for b in theirs)
        ratio = fastest[0] / fastest[1]
        print(f"time: llmkit/gptqmodel per round: {', '.join(f'{r:.2f}' for r in each)}")
        print(
            f"time: llmkit/gptqmodel, fastest run of each = {ratio:.2f} -> "
            f"{'met' if ratio <= 0.5 else 'MISSED'}"
        )
        largest = max(ours, key=lambda run: run["peak_rss"] - run["start_rss"])
        memory = report.print_memory(work / "small-llama", largest, num_samples)
        fields["time"] = {
            "llmkit_s": fastest[0], "anchor_s": fastest[1], "stopped": False, "ratio": ratio,
            "per_round": each, "against": "gptqmodel gptq",
        }  # fmt: skip
        fields["memory"] = memory
    summary = report.quantizer_rows(fields, "llmkit gptq", REFERENCES, "llmkit rtn")
    summary += channel_rows(kld) + report.reading_rows(readings)
    report.print_targets(summary)
    anchor = "GPTQModel 7.6.0 and llm-compressor 0.14.0.1"
    report.save_result("gptq", fields, anchor=anchor, summary=summary)


def main() -> None:
    parser = report.parser(__doc__.splitlines()[0], ROOT.parent / "shared")
    parser.add_argument("--rounds", type=int, default=2, help="runs of each tool, alternating")
    args = parser.parse_args()
    for venv, name in ((GPTQMODEL, "gptqmodel"), (LLMCOMPRESSOR, "llmcompressor")):
        if not venv.exists():
            raise SystemExit(f"{venv} missing: bash benchmarks/setup_reference_venvs.sh {name}")
    work = report.workdir(args, "llmkit-gptq-")
    quality = quality_runs(args.shared, work, args.num_samples)
    speed = {} if args.skip_small else speed_runs(work, args.num_samples, args.rounds)
    print_targets(args.shared, work, quality, speed, args.num_samples)


if __name__ == "__main__":
    main()
