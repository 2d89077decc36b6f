"""AWQ: llmkit beside GPTQModel 7.6.0 and llm-compressor 0.14.0.1 on the same calibration windows.

Quality: stories260K widened by benchmarks/widen.py (KV heads repeated to one per query head,
MLP zero-padded to 192: the same function, because GPTQModel's AWQ needs every output
dimension in multiples of 64), 4-bit asymmetric groups of 16, calibration and evaluation on
tinyshakespeare as in benchmarks/quality.py, scored against the float32 stories260K. Runs:
llmkit awq (default: duo scaling; and without it), llmkit rtn at the same grid, GPTQModel awq (in
float16, the only dtype its CPU AWQ kernel takes), llm-compressor awq (float32; it writes
compressed-tensors, which llmkit's evaluator reads too). Each tool otherwise with its defaults.
Targets: llmkit KLD <= the better reference's; strictly better than llmkit rtn. Each
reference file's KLD as `bench quality` reads it matches
benchmarks/reference/independent_reading.py's to 1e-5.

Speed and memory: the small-llama preset (float32), built-in text, group 128, all three tools.
Target: llmkit's quantization wall time <= 0.5x the faster reference's. Printed beside: peak
RSS, and llmkit's peak above its starting RSS against 3x one decoder layer + activations.

    python benchmarks/awq.py [--shared ../shared] [--num-samples 128] [--skip-small]
        [--reference-limit SECONDS]
"""

from __future__ import annotations

import sys
from pathlib import Path

import report
from child import TimedOut, run_child
from gptq import (
    GPTQMODEL,
    LLMCOMPRESSOR,
    ROOT,
    calibration_windows,
    gptqmodel_run,
    llmcompressor_run,
    llmkit_run,
    small_llama,
)

AWQ_SCRIPT = "llmcompressor_awq.py"


def quality_runs(shared: Path, work: Path, num_samples: int) -> dict[str, dict]:
    calib, _ = report.split_text(shared / "data" / "tinyshakespeare.txt", work)
    model = work / "stories260K-wide"
    widen = [sys.executable, str(ROOT / "benchmarks" / "widen.py"), "--intermediate", "192"]
    run_child([*widen, str(shared / "models" / "stories260K"), str(model)])  # parent stays small
    group = ["--group-size", "16"]
    runs = {
        "llmkit awq": llmkit_run(model, work / "llmkit-awq", "awq", group, str(calib), num_samples),
        "llmkit awq, no duo scaling": llmkit_run(
            model,
            work / "llmkit-awq-noduo",
            "awq",
            [*group, "--no-awq-duo-scaling"],
            str(calib),
            num_samples,
        ),
        "llmkit rtn": llmkit_run(
            model, work / "llmkit-rtn", "rtn", [*group, "--asym"], str(calib), num_samples
        ),
    }
    ids = calibration_windows(model, str(calib), num_samples, work / "stories-ids.json")
    runs["gptqmodel awq"] = gptqmodel_run(model, work / "gptqmodel-awq", ids, 16, "awq")
    runs["llm-compressor awq"] = llmcompressor_run(
        AWQ_SCRIPT, model, work / "llmcompressor-awq", ids, group
    )
    return runs


def speed_runs(work: Path, num_samples: int, limit: float | None) -> dict[str, dict]:
    """llmkit, then each reference stopped after `limit` seconds if it has not finished
    (on two cores they can take hours; a lower bound on their time settles the target)."""
    model, ids = small_llama(work, num_samples)
    return {
        "llmkit awq": llmkit_run(model, work / "small-llmkit", "awq", [], "builtin", num_samples),
        "gptqmodel awq": stoppable(
            lambda: gptqmodel_run(model, work / "small-gptqmodel", ids, 128, "awq", limit)
        ),
        "llm-compressor awq": stoppable(
            lambda: llmcompressor_run(
                AWQ_SCRIPT, model, work / "small-llmcompressor", ids, ["--group-size", "128"], limit
            )
        ),
    }


def stoppable(run) -> dict:
    try:
        return run()
    except TimedOut as stopped:
        return {"stopped_after": stopped.seconds}


def print_targets(shared: Path, work: Path, quality: dict, speed: dict, num_samples: int):
    kld = report.print_quality(shared, work, quality, "stories260K-wide, 4-bit g16")
    references = ["gptqmodel awq", "llm-compressor awq"]
    paths = {name: quality[name]["path"] for name in references}
    reference = shared / "models" / "stories260K"
    readings = report.independent_readings(reference, work / "evaluation.txt", kld, paths, work)
    fields: dict = {"kld": kld, "readings": readings}
    if speed:
        report.print_speed(speed, "small-llama, 4-bit g128")
        fastest = min(references, key=lambda name: report.seconds_at_least(speed[name]))
        faster = speed[fastest]
        ratio = speed["llmkit awq"]["seconds"] / report.seconds_at_least(faster)
        bound = "<" if "stopped_after" in faster else "="  # a stopped reference needs longer
        verdict = "met" if ratio <= 0.5 else "MISSED"
        print(f"time: llmkit / faster reference {bound} {ratio:.3f} -> {verdict}")
        memory = report.print_memory(work / "small-llama", speed["llmkit awq"], num_samples)
        fields["time"] = {
            "llmkit_s": speed["llmkit awq"]["seconds"],
            "anchor_s": report.seconds_at_least(faster),
            "stopped": "stopped_after" in faster,
            "ratio": ratio,
            "against": fastest,
        }
        fields["memory"] = memory
    summary = report.quantizer_rows(fields, "llmkit awq", references, "llmkit rtn")
    summary += report.reading_rows(readings)
    report.print_targets(summary)
    anchor = "GPTQModel 7.6.0 and llm-compressor 0.14.0.1"
    report.save_result("awq", fields, anchor=anchor, summary=summary)


def main() -> None:
    parser = report.parser(__doc__.splitlines()[0], ROOT.parent / "shared")
    parser.add_argument(
        "--reference-limit",
        type=float,
        default=None,
        help="stop a reference's small-llama run after this many seconds (reported as > it)",
    )
    args = parser.parse_args()
    for venv, name in ((GPTQMODEL, "gptqmodel"), (LLMCOMPRESSOR, "llmcompressor")):
        if not venv.exists():
            raise SystemExit(f"{venv} missing: bash benchmarks/setup_reference_venvs.sh {name}")
    work = report.workdir(args, "llmkit-awq-")
    quality = quality_runs(args.shared, work, args.num_samples)
    speed = {} if args.skip_small else speed_runs(work, args.num_samples, args.reference_limit)
    print_targets(args.shared, work, quality, speed, args.num_samples)


if __name__ == "__main__":
    main()
