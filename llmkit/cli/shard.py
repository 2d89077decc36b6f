"""`llmkit shard`: reshard for tensor/pipeline parallelism; `shard merge` and `shard verify`."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Annotated

import typer

from llmkit.arch.plan import DEFAULT_VOCAB_PAD, make_plan, parse_pp_layers
from llmkit.checkpoint.writer import DEFAULT_MAX_SHARD_SIZE
from llmkit.cli.options import (
    JsonOpt,
    MaxShardSizeOpt,
    OutArg,
    OverwriteOpt,
    RevisionOpt,
    SourceArg,
    default,
)
from llmkit.cli.output import byte_progress, human_bytes, print_error, print_json, stdout
from llmkit.errors import LlmkitError

ShardedArg = Annotated[
    Path, typer.Argument(help="A directory written by llmkit shard.", show_default=False)
]


def shard(
    src: SourceArg,
    out: OutArg,
    tp: Annotated[int, typer.Option("--tp", help="Tensor-parallel ranks.")] = default(
        make_plan, "tp"
    ),
    pp: Annotated[int, typer.Option("--pp", help="Pipeline-parallel stages.")] = default(
        make_plan, "pp"
    ),
    pp_layers: Annotated[
        str | None,
        typer.Option(
            "--pp-layers",
            help="Layers per stage, e.g. 7,8,8,7 (default: even, extras to the middle stages).",
        ),
    ] = None,
    vocab_pad: Annotated[
        int, typer.Option("--vocab-pad", help="Pad the vocab to a multiple of this x tp.")
    ] = DEFAULT_VOCAB_PAD,
    max_shard_size: MaxShardSizeOpt = DEFAULT_MAX_SHARD_SIZE,
    overwrite: OverwriteOpt = False,
    revision: RevisionOpt = None,
    layout: Annotated[
        str,
        typer.Option(
            "--layout",
            help="llmkit (rank files + llmkit-shards.json), or vllm (vLLM's sharded_state "
            "files: fused q/k/v and gate/up, full precision, TP only).",
        ),
    ] = "llmkit",
    json_out: JsonOpt = False,
) -> None:
    """Split SRC (a checkpoint, or an earlier shard output) into one safetensors file per
    (tp rank, pp stage) plus llmkit-shards.json. See also: llmkit shard merge | verify."""
    from llmkit.shard.write import shard as run_shard  # numpy: not at `llmkit --help`

    if layout == "vllm":
        _vllm_layout(src, out, tp, pp, pp_layers, revision, max_shard_size, overwrite, json_out)
        return
    if layout != "llmkit":
        raise LlmkitError(f"--layout {layout!r}: choose llmkit or vllm")

    with byte_progress(f"shard tp={tp} pp={pp}", quiet=json_out) as progress:
        report = run_shard(
            src,
            out,
            tp,
            pp,
            parse_pp_layers(pp_layers),
            vocab_pad,
            max_shard_size,
            overwrite,
            revision,
            progress,
        )
    if json_out:
        print_json(report.to_dict())
        return
    stages = ", ".join(f"{a}-{b - 1}" for a, b in report.stages)
    stdout.print(
        f"wrote {report.output}: tp={report.tp} pp={report.pp} (layers {stages}), "
        f"{report.num_files} files, {human_bytes(report.bytes_in)} -> "
        f"{human_bytes(report.bytes_out)}, kv heads {report.rules['kv_heads']}, "
        f"{report.seconds:.1f}s, peak RSS {human_bytes(report.peak_rss_bytes)}"
    )


def _vllm_layout(src, out, tp, pp, pp_layers, revision, max_shard_size, overwrite, json_out):
    from llmkit.checkpoint.reader import local_dir
    from llmkit.shard.vllm_layout import write_vllm_layout

    if pp != 1 or pp_layers:
        raise LlmkitError("--layout vllm is for tensor parallelism only: drop --pp/--pp-layers")
    with byte_progress(f"vllm layout tp={tp}", quiet=json_out) as progress:
        report = write_vllm_layout(
            local_dir(src, revision), out, tp, max_shard_size, overwrite, progress
        )
    if json_out:
        print_json(asdict(report))
        return
    stdout.print(
        f"wrote {report.output}: vLLM sharded_state for tp={report.tp}, {report.num_files} "
        f"files, {human_bytes(report.bytes_out)}, {report.seconds:.1f}s; load it with "
        f'LLM("{report.output}", load_format="sharded_state", tensor_parallel_size={report.tp})'
    )


def merge(
    sharded: ShardedArg,
    out: OutArg,
    max_shard_size: MaxShardSizeOpt = DEFAULT_MAX_SHARD_SIZE,
    overwrite: OverwriteOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """Restore the plain Hugging Face checkpoint a shard directory was cut from."""
    from llmkit.shard.merge import merge as run_merge

    with byte_progress("merge", quiet=json_out) as progress:
        written = run_merge(sharded, out, max_shard_size, overwrite, progress)
    if json_out:
        print_json({"output": str(written.path), "num_tensors": written.num_tensors,
                    "bytes": written.total_bytes, "files": list(written.shards)})  # fmt: skip
        return
    stdout.print(
        f"wrote {written.path}: {written.num_tensors} tensors, "
        f"{human_bytes(written.total_bytes)} in {len(written.shards)} file(s)"
    )


def verify(
    sharded: ShardedArg,
    source: Annotated[
        str | None,
        typer.Option("--source", help="Also check bit-exact equality with this checkpoint."),
    ] = None,
    json_out: JsonOpt = False,
) -> None:
    """Check a shard directory: every file and tensor present, every slice's hash, and with
    --source, every tensor bit-exact with the source. Exit 1 on any problem."""
    from llmkit.shard.verify import verify as run_verify

    report = run_verify(sharded, source)
    if json_out:
        print_json(report.to_dict())
    else:
        for problem in report.problems:
            print_error(problem)
    if not report.ok:
        raise LlmkitError(f"{report.path}: {len(report.problems)} problem(s) found")
    if not json_out:
        against = f", bit-exact with {report.source}" if report.source else ""
        stdout.print(
            f"ok: {report.path} (tp={report.tp} pp={report.pp}): {report.num_tensors} tensors in "
            f"{report.num_files} files, {human_bytes(report.bytes_checked)} hashed{against}"
        )
