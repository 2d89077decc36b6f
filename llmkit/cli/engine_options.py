"""Options of every command that runs the engine (generate, serve, bench), defined once."""

from __future__ import annotations

import copy
import functools
import inspect
import typing
from collections.abc import Callable
from typing import Annotated

import typer

from llmkit.checkpoint.writer import parse_size
from llmkit.errors import LlmkitError
from llmkit.runtime.engine_config import ANY, DRAFT, NGRAM, TUNES, EngineConfig, untuned

TpOpt = Annotated[int, typer.Option("--tp", help="Tensor-parallel ranks (processes).")]
DtypeOpt = Annotated[
    str, typer.Option("--dtype", help="auto (the checkpoint's), float32, float16 or bfloat16.")
]
ThreadsOpt = Annotated[
    int | None,
    typer.Option(
        "--threads",
        help="CPU threads for the model, shared by the tp ranks (default: the cores this "
        "process may use, or OMP_NUM_THREADS).",
    ),
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
VerifyOpt = Annotated[
    bool,
    typer.Option(
        "--verify/--no-verify", help="Check weight files against their recorded checksums."
    ),
]
SpeculativeOpt = Annotated[
    str | None,
    typer.Option(
        "--speculative",
        help="Speculative decoding: 'ngram' (prompt lookup), or a draft model with the "
        "model's tokenizer (its directory or hub id).",
    ),
]
SpecRevisionOpt = Annotated[
    str | None,
    typer.Option("--speculative-revision", help="Branch, tag or commit of a hub id draft model."),
]
NumSpecTokensOpt = Annotated[
    int, typer.Option("--num-speculative-tokens", help="Tokens proposed per sequence and step.")
]
NgramMinOpt = Annotated[int, typer.Option("--ngram-min", help="Shortest n-gram to look up.")]
NgramMaxOpt = Annotated[int, typer.Option("--ngram-max", help="Longest n-gram to look up.")]
SpecMaxSeqsOpt = Annotated[
    int,
    typer.Option(
        "--speculative-max-seqs",
        help="No speculation while more sequences than this run or wait (0: never).",
    ),
]
DecodeStepsOpt = Annotated[
    int,
    typer.Option(
        "--decode-steps",
        help="Most greedy decode steps per engine step where the whole step is one C++ call "
        "(CPU) or one CUDA graph (--tp 1); 1: one.",
    ),
]
DecodeCallOpt = Annotated[
    float,
    typer.Option(
        "--decode-call-ms",
        help="Run as many of --decode-steps as fit in this many milliseconds, at the speed "
        "of earlier steps; 0: all of them.",
    ),
]
EnforceEagerOpt = Annotated[
    bool,
    typer.Option(
        "--enforce-eager",
        help="CUDA: run every decode step eagerly instead of replaying a CUDA graph.",
    ),
]
AsyncOutputOpt = Annotated[
    bool | None,
    typer.Option(
        "--async-output/--no-async-output",
        help="Start each step before detokenizing the one before, so that work overlaps the "
        "model's (default: on CUDA, off on the CPU).",
        show_default=False,
    ),
]
DraftConfidenceOpt = Annotated[
    float | None,
    typer.Option(
        "--draft-min-confidence",
        help="End a draft model's draft once the chance all its tokens are accepted is below"
        " this (0: always k tokens; default: the draft model's step time over the model's,"
        " as measured).",
    ),
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


def with_engine_options(command: Callable) -> Callable:
    """Give a command every engine option above; it receives them as one
    `engine: EngineConfig` parameter (the CLI shows them after the command's own)."""
    own = inspect.signature(command, eval_str=True)
    extra = _engine_parameters()

    @functools.wraps(command)
    def run(**kwargs):
        options = {p.name: kwargs.pop(p.name) for p in extra}
        _check_speculation_options(options)
        return command(**kwargs, engine=_engine_config(options))

    kept = [p for name, p in own.parameters.items() if name != "engine"]
    run.__signature__ = own.replace(parameters=kept + extra)
    return run


# Parameter name -> its option; each is the EngineConfig field of the same name but these.
_FIELDS = {"prefix_caching": "enable_prefix_caching"}


def _engine_parameters() -> list[inspect.Parameter]:
    from llmkit.cli.options import DeviceOpt

    options = {
        "tp": TpOpt,
        "dtype": DtypeOpt,
        "device": DeviceOpt,
        "threads": ThreadsOpt,
        "block_size": BlockSizeOpt,
        "kv_cache_memory": KvCacheMemoryOpt,
        "gpu_memory_utilization": GpuMemOpt,
        "max_num_seqs": MaxNumSeqsOpt,
        "max_num_batched_tokens": MaxBatchedTokensOpt,
        "max_model_len": MaxModelLenOpt,
        "prefix_caching": PrefixCachingOpt,
        "scheduling_policy": PolicyOpt,
        "verify": VerifyOpt,
        "speculative": SpeculativeOpt,
        "speculative_revision": SpecRevisionOpt,
        "num_speculative_tokens": NumSpecTokensOpt,
        "ngram_min": NgramMinOpt,
        "ngram_max": NgramMaxOpt,
        "speculative_max_seqs": SpecMaxSeqsOpt,
        "draft_min_confidence": DraftConfidenceOpt,
        "decode_steps": DecodeStepsOpt,
        "decode_call_ms": DecodeCallOpt,
        "enforce_eager": EnforceEagerOpt,
        "async_output": AsyncOutputOpt,
    }
    defaults = EngineConfig()
    parameters = []
    for name, option in options.items():
        default = getattr(defaults, _FIELDS.get(name, name))
        if name in TUNES:  # None where not given (`_check_speculation_options`)
            option, default = _shown_default(option, default), None
        kind = inspect.Parameter.KEYWORD_ONLY
        parameters.append(inspect.Parameter(name, kind, default=default, annotation=option))
    return parameters


def _shown_default(option, default):
    """`option` (an Annotated typer option) taking None where it is not given, with `default`
    (the value the engine then takes) in its help."""
    kind, info = typing.get_args(option)
    info = copy.copy(info)
    info.show_default = str(default) if default is not None else False
    return Annotated[kind | None, info]


def _check_speculation_options(options: dict) -> None:
    """Refuse, in one line, an option that tunes speculation given without the
    --speculative it tunes (engine_config.untuned), as a recipe's are."""
    for name in TUNES:
        if options[name] is None:  # not given
            continue
        if (wants := untuned(name, options["speculative"])) is not None:
            flag = "--" + name.replace("_", "-")
            raise LlmkitError(f"{flag} tunes speculation: it goes with {_SPECULATIVE[wants]}")


# what each of engine_config.TUNES' proposers is on the command line
_SPECULATIVE = {ANY: "--speculative ngram or a draft model", NGRAM: "--speculative ngram",
                DRAFT: "--speculative DRAFT (a draft model)"}  # fmt: skip


def _engine_config(options: dict) -> EngineConfig:
    options = {name: v for name, v in options.items() if v is not None or name not in TUNES}
    values = {_FIELDS.get(name, name): value for name, value in options.items()}
    values["kv_cache_memory"] = kv_cache_bytes(values["kv_cache_memory"])  # "2GiB" -> bytes
    return EngineConfig(**values)
