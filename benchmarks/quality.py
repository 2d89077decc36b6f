"""Quality of every llmkit method on a genuinely trained model, beside llm-compressor's W8A8.

Model: ../shared/models/stories260K (and its MLP padded to 176 for the GPTQ-packed rtn-w4,
whose int32 words need inputs in multiples of 8; the same function to 4e-6). Text:
../shared/data/tinyshakespeare.txt, first 60% for calibration, last 20% for evaluation,
all of it in 512-token windows. Reference: the float32 model.

In the same run, llm-compressor 0.14.0.1 (its own venv: benchmarks/setup_reference_venvs.sh)
quantizes W8A8 twice on the same calibration windows: SmoothQuant 0.5 then per-channel int8
weights by GPTQ, and by round-to-nearest; lm_head kept. llmkit does the same (its default
w8a8, and `--no-w8a8-gptq`); its evaluator scores every checkpoint. Targets, for each
rounding: llmkit's KLD and quantization wall time <= llm-compressor's (each tool timed
in-process from calibration through writing; interpreter and import time excluded for
both). Each llm-compressor file's KLD as `bench quality` reads it matches
benchmarks/reference/independent_reading.py's to 1e-5.

    python benchmarks/quality.py [--shared ../shared] [--num-samples 128] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from gptq import LLMCOMPRESSOR, llmcompressor_run
from report import (
    independent_readings,
    print_targets,
    reading_rows,
    row,
    save_result,
    split_text,
)

from llmkit.bench.quality import evaluate_quality
from llmkit.checkpoint.reader import open_checkpoint
from llmkit.quant.calibration import CalibrationSpec, calibration_ids
from llmkit.quant.options import options_for
from llmkit.quant.pipeline import quantize

ROOT = Path(__file__).resolve().parent.parent


def llmkit_runs(shared: Path, work: Path, calibration: CalibrationSpec) -> dict[str, dict]:
    model = shared / "models" / "stories260K"
    padded = shared / "models" / "stories260K-pad176"
    runs = {
        "fp16": (model, "fp16", options_for("fp16")),
        "bf16": (model, "bf16", options_for("bf16")),
        "int8": (model, "int8", options_for("int8")),
        "w8a8": (model, "w8a8", options_for("w8a8", smooth_alpha=0.5)),
        "w8a8-nearest": (model, "w8a8", options_for("w8a8", smooth_alpha=0.5, w8a8_gptq=False)),
        "rtn-w4-g16": (padded, "rtn", options_for("rtn", bits=4, group_size=16)),
    }
    results = {}
    for name, (src, method, options) in runs.items():
        out = work / name
        report = quantize(
            src, out, method, options=options, calibration=calibration, device="cpu", overwrite=True
        )
        results[name] = {"path": out, "seconds": report.seconds}
    return results


# llm-compressor's W8A8 runs: SmoothQuant then the weights rounded to nearest, or by GPTQ.
REFERENCES = {"llm-compressor w8a8": [], "llm-compressor w8a8 gptq": ["--gptq"]}
# Each llmkit w8a8 run and the reference rounding its weights the same way.
SAME_METHOD = {"w8a8": "llm-compressor w8a8 gptq", "w8a8-nearest": "llm-compressor w8a8"}


def llmcompressor_runs(model: Path, work: Path, calibration: CalibrationSpec) -> dict:
    if not LLMCOMPRESSOR.exists():
        print(
            f"llm-compressor venv missing ({LLMCOMPRESSOR}); run "
            "benchmarks/setup_reference_venvs.sh. Skipping its column."
        )
        return {}
    from transformers import AutoTokenizer

    ids = calibration_ids(AutoTokenizer.from_pretrained(model), calibration)
    ids_path = work / "calibration_ids.json"
    ids_path.write_text(json.dumps(ids.tolist()))
    runs = {}
    for name, flags in REFERENCES.items():
        out = work / name.replace(" ", "-")
        runs[name] = llmcompressor_run("llmcompressor_w8a8.py", model, out, ids_path, flags)
    return runs


def size_of(path: Path) -> int:
    with open_checkpoint(path) as ck:
        return sum(t.nbytes for t in ck.tensors.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared", type=Path, default=ROOT.parent / "shared")
    parser.add_argument("--num-samples", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="llmkit-quality-"))
    work.mkdir(parents=True, exist_ok=True)
    model = args.shared / "models" / "stories260K"
    calib, evaluation = split_text(args.shared / "data" / "tinyshakespeare.txt", work)
    calibration = CalibrationSpec(
        dataset=str(calib), num_samples=args.num_samples, seq_len=args.seq_len
    )
    runs = llmkit_runs(args.shared, work, calibration)
    runs |= llmcompressor_runs(model, work, calibration)
    rows = evaluate_quality(
        model,
        [r["path"] for r in runs.values()],
        CalibrationSpec(dataset=str(evaluation), seq_len=args.seq_len),
    )
    print_table(model, rows, runs)
    scores = {
        name: {
            "perplexity": scored.perplexity,
            "kld_mean": scored.kld_mean,
            "kld_p99": scored.kld_p99,
            "top1_agreement": scored.top1_agreement,
            "seconds": runs[name]["seconds"],
        }
        for name, scored in zip(runs, rows[1:], strict=True)
    }
    fields = {"reference_perplexity": rows[0].perplexity, "tokens": rows[0].num_tokens}
    fields["scores"] = scores
    kld = {name: score["kld_mean"] for name, score in scores.items()}
    paths = {name: runs[name]["path"] for name in REFERENCES if name in runs}
    readings = independent_readings(model, evaluation, kld, paths, work, args.seq_len)
    fields["readings"] = readings
    anchor = (
        "llm-compressor 0.14.0.1 (W8A8 SmoothQuant 0.5, weights by round-to-nearest and by GPTQ)"
    )
    summary = summarize(fields) + reading_rows(fields["readings"])
    print_targets(summary)
    save_result("quality", fields, anchor=anchor, summary=summary)


def summarize(fields: dict) -> list[dict]:
    """RESULTS.md's rows: each method's KLD and perplexity; each w8a8 run's KLD and time
    against llm-compressor's run that rounds the weights the same way (lower is better, so
    the targets are ratios of at most 1)."""
    scores, rows = fields["scores"], []
    for name, score in scores.items():
        if name in REFERENCES:
            continue
        ours = f"KLD {score['kld_mean']:.5f}, ppl {score['perplexity']:.3f}"
        ref = SAME_METHOD.get(name)
        if ref not in scores:
            rows.append(row(f"{name}, KLD against fp32 (no anchor)", ours, "", None))
            continue
        theirs = scores[ref]
        kld, took = (score[k] / theirs[k] for k in ("kld_mean", "seconds"))
        anchor = f"KLD {theirs['kld_mean']:.5f}, ppl {theirs['perplexity']:.3f}"
        rows.append(row(
            f"{name} KLD against {ref} (lower is better)", ours, anchor, kld, "≤ 1.0×", kld <= 1
        ))  # fmt: skip
        rows.append(row(
            f"{name} quantization time against {ref} (lower is better)",
            f"{score['seconds']:.2f} s", f"{theirs['seconds']:.2f} s", took, "≤ 1.0×", took <= 1,
        ))  # fmt: skip
    return rows


def print_table(model: Path, rows, runs: dict[str, dict]) -> None:
    names = ["fp32 (reference)", *runs]
    print(
        f"{'method':22} {'perplexity':>10} {'KLD mean':>10} {'KLD p99':>9} {'top-1':>7} "
        f"{'size':>9} {'quant s':>8}"
    )
    for name, scored in zip(names, rows, strict=True):
        run = runs.get(name, {"path": model, "seconds": 0.0})
        print(
            f"{name:22} {scored.perplexity:10.4f} {scored.kld_mean:10.6f} {scored.kld_p99:9.5f} "
            f"{scored.top1_agreement:7.2%} {size_of(run['path']) / 1e3:7.1f}KB "
            f"{run['seconds']:8.2f}"
        )
    print(f"({rows[0].num_tokens} evaluated tokens)")


if __name__ == "__main__":
    main()
