"""Options of every command that runs the engine (generate, serve, bench), defined once."""

from __future__ import annotations

from typing import Annotated

import typer

from llmkit.checkpoint.writer import parse_size
from llmkit.errors import LlmkitError

TpOpt = Annotated[int, typer.Option("--tp", help="Tensor-parallel ranks (processes).")]
DtypeOpt = Annotated[
    str, typer.Option("--dtype", help="auto (the checkpoint's), float32, float16 or bfloat16.")
]
BlockSizeOpt = Annotated[int, typer.Option("--block-size", help="Tokens per KV-cache block.")]
KvCacheMemoryOpt = Annotated[
    str | None,
    typer.Option(
        "--kv-cache-memory",
        help="KV cache size, e.g. 2GiB (default: enough for max-num-seqs full contexts, "
        "at most 4 GiB on CPU; from --gpu-memory-utilization on CUDA).",
    ),
]
GpuMemOpt = Annotated[
    float,
    typer.Option("--gpu-memory-utilization", help="Fraction of GPU memory for weights + KV."),
]
MaxNumSeqsOpt = Annotated[int, typer.Option("--max-num-seqs", help="Most sequences per step.")]
MaxBatchedTokensOpt = Annotated[
    int, typer.Option("--max-num-batched-tokens", help="Token budget of one step.")
]
MaxModelLenOpt = Annotated[
    int | None, typer.Option("--max-model-len", help="Context length (default: the model's).")
]
PrefixCachingOpt = Annotated[
    bool, typer.Option("--prefix-caching/--no-prefix-caching", help="Share cached prefixes.")
]
PolicyOpt = Annotated[
    str, typer.Option("--scheduling-policy", help="fcfs, or priority (lower runs first).")
]


def kv_cache_bytes(text: str | None) -> int | None:
    if text is None:
        return None
    try:
        return parse_size(text)
    except LlmkitError:
        raise LlmkitError(f"--kv-cache-memory {text!r} must be a size like 2GiB or 512MB") from None
