"""`llmkit bench compare`: which copy of a model to deploy. Each checkpoint is measured in
its own process on llmkit's engine (load time, peak memory, batch-1 decode, throughput at a
fixed concurrency), sized on disk, and scored against the first (perplexity, KL divergence,
top-1 agreement)."""

from __future__ import annotations

from collections.abc import Callable

from llmkit.bench.offline import offline_in_child, size_on_disk
from llmkit.quant.calibration import CalibrationSpec


def compare(
    checkpoints: list[str],
    concurrency: int,
    input_len: int,
    output_len: int,
    data: CalibrationSpec,
    num_windows: int,
    engine_args: list[str],
    on_step: Callable[[str], None] | None = None,
) -> list[dict]:
    """One row per checkpoint, the first being the reference."""
    from llmkit.bench.quality import evaluate_quality

    rows = []
    for path in checkpoints:
        if on_step is not None:
            on_step(f"engine: {path}")
        args = ["--batch-sizes", f"1,{concurrency}", "--input-len", str(input_len)]
        result = offline_in_child(path, [*args, "--output-len", str(output_len), *engine_args])
        single, many = result["cases"]
        rows.append(
            {
                "name": path,
                "size_bytes": size_on_disk(path),
                "load_s": result["load_s"],
                "peak_rss_mb": result["peak_rss_mb"],
                "decode_tokens_per_s": 1e3 / single["mean_tpot_ms"],
                "concurrency": concurrency,
                "output_throughput": many["output_throughput"],
                "mean_ttft_ms": many["mean_ttft_ms"],
            }
        )
    if on_step is not None:
        on_step("quality against the first")
    quality = evaluate_quality(checkpoints[0], checkpoints[1:], data, num_windows)
    for row, q in zip(rows, quality, strict=True):
        row.update(
            perplexity=q.perplexity,
            kld_mean=q.kld_mean,
            kld_p99=q.kld_p99,
            top1_agreement=q.top1_agreement,
        )
    return rows
