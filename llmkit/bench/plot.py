"""PNG charts of benchmark results (matplotlib is optional: `pip install matplotlib`)."""

from __future__ import annotations

from pathlib import Path

from llmkit.errors import LlmkitError


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise LlmkitError("PNG charts need matplotlib: pip install matplotlib") from None
    return plt


def plot_sweep(results: list[dict], path: Path) -> None:
    """Latency (mean and p99 TTFT, mean TPOT) against output throughput, one point per rate."""
    plt = _pyplot()
    x = [r["output_throughput"] for r in results]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for key, label in (("mean_ttft_ms", "mean TTFT"), ("p99_ttft_ms", "p99 TTFT")):
        ax1.plot(x, [r[key] for r in results], marker="o", label=label)
    ax2.plot(x, [r["mean_tpot_ms"] for r in results], marker="o", label="mean TPOT")
    ax2.plot(x, [r["p99_tpot_ms"] for r in results], marker="o", label="p99 TPOT")
    for r, xi, yi in zip(results, x, [r["mean_ttft_ms"] for r in results], strict=True):
        ax1.annotate(f"rate {r['request_rate']}", (xi, yi), fontsize=7)
    for ax, name in ((ax1, "time to first token (ms)"), (ax2, "time per output token (ms)")):
        ax.set_xlabel("output throughput (tokens/s)")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"{results[0]['model_id']}: latency against throughput")
    _save(fig, plt, path)


def plot_compare(rows: list[dict], path: Path) -> None:
    """Bars of each checkpoint's size, decode speed, throughput and quality."""
    plt = _pyplot()
    panels = [
        ("size_bytes", "size on disk (bytes)"),
        ("decode_tokens_per_s", "batch-1 decode (tokens/s)"),
        ("output_throughput", "throughput (output tokens/s)"),
        ("kld_mean", "KL divergence from the first"),
    ]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 4))
    names = [r["name"] for r in rows]
    for ax, (key, title) in zip(axes, panels, strict=True):
        ax.bar(names, [r.get(key) or 0 for r in rows])
        ax.set_title(title, fontsize=9)
        ax.tick_params(axis="x", labelrotation=30, labelsize=7)
    _save(fig, plt, path)


def _save(fig, plt, path: Path) -> None:
    from llmkit.checkpoint.atomic import atomic_output_file

    fig.tight_layout()
    with atomic_output_file(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
