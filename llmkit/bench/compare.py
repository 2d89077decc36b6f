"""`llmkit bench compare`: which copy of a model to deploy. Each checkpoint is measured in
its own process on llmkit's engine (load time, peak memory, batch-1 decode, throughput at a
fixed concurrency), sized on disk, and scored against the first (perplexity, KL divergence,
top-1 agreement)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from llmkit.bench.offline import OfflineSpec, offline_in_child, size_on_disk
from llmkit.errors import LlmkitError
from llmkit.quant.calibration import CalibrationSpec
from llmkit.runtime.engine_config import EngineConfig


@dataclass(frozen=True, slots=True)
class CompareSpec:
    """What `bench compare` measures beside quality; the only place of its defaults
    (`llmkit bench compare` and a recipe's `bench: compare` step read them here)."""

    concurrency: int = 16  # requests at once for the throughput column
    input_len: int = 128
    output_len: int = 128  # at least 2: decode speed needs a second token
    num_windows: int = 32  # quality windows (0: all the text gives)

    def offline(self) -> OfflineSpec:
        """Batch 1 (decode speed) and `concurrency` (throughput)."""
        if self.output_len < 2 or self.concurrency < 1:
            raise LlmkitError("bench compare needs --output-len >= 2 and --concurrency >= 1")
        return OfflineSpec((1, self.concurrency), (self.input_len,), (self.output_len,))


def compare(
    checkpoints: list[str],
    spec: CompareSpec,
    data: CalibrationSpec,
    engine: EngineConfig,
    on_step: Callable[[str], None] | None = None,
) -> list[dict]:
    """One row per checkpoint, the first being the reference."""
    from llmkit.bench.quality import evaluate_quality

    offline = spec.offline()
    rows = []
    for path in checkpoints:
        if on_step is not None:
            on_step(f"engine: {path}")
        result = offline_in_child(path, offline, engine)
        single, many = result["cases"]
        rows.append(
            {
                "name": path,
                "size_bytes": size_on_disk(path),
                "load_s": result["load_s"],
                "peak_rss_mb": result["peak_rss_mb"],
                "decode_tokens_per_s": 1e3 / single["mean_tpot_ms"],
                "concurrency": spec.concurrency,
                "output_throughput": many["output_throughput"],
                "mean_ttft_ms": many["mean_ttft_ms"],
            }
        )
    if on_step is not None:
        on_step("quality against the first")
    quality = evaluate_quality(checkpoints[0], checkpoints[1:], data, spec.num_windows)
    for row, q in zip(rows, quality, strict=True):
        row.update(
            perplexity=q.perplexity,
            kld_mean=q.kld_mean,
            kld_p99=q.kld_p99,
            top1_agreement=q.top1_agreement,
        )
    return rows
