"""vLLM's sharded-state layout (`LLM(..., load_format="sharded_state")`): for each
tensor-parallel rank, the state dict vLLM's Llama-family model holds on that rank, in
`model-rank-{rank}-part-{part}.safetensors` files.

On top of llmkit's own split rules (arch/plan.py) vLLM fuses q/k/v into `qkv_proj` and
gate/up into `gate_up_proj` (each rank: its q rows, then its k rows, then its v rows),
pads the vocabulary to a multiple of 64 before splitting it, keeps a tied embedding only as
`lm_head.weight`, and holds four float32 attention scales per layer (1.0 unquantized).
Full-precision checkpoints, TP only.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from llmkit.arch.family import Family, padded_vocab
from llmkit.arch.plan import Model, check_tp, make_plan
from llmkit.checkpoint.atomic import atomic_output_dir
from llmkit.checkpoint.rank_tensors import CheckpointRank
from llmkit.checkpoint.reader import open_checkpoint
from llmkit.checkpoint.safetensors_io import TensorSpec, file_layout, write_file
from llmkit.checkpoint.writer import (
    ProgressFn,
    copy_aux_files,
    parse_size,
    plan_shards,
    write_json,
)
from llmkit.errors import LlmkitError

PATTERN = "model-rank-{rank}-part-{part}.safetensors"
VOCAB_PAD = 64  # vLLM's pad_vocab_size default
ATTN_SCALES = ("_k_scale", "_v_scale", "_q_scale", "_prob_scale")


@dataclass(frozen=True, slots=True)
class VllmLayoutReport:
    output: str
    tp: int
    num_files: int
    bytes_out: int
    seconds: float


def write_vllm_layout(
    src: str | Path,
    out: str | Path,
    tp: int,
    max_shard_size: str | int,
    overwrite: bool = False,
    progress: ProgressFn | None = None,
) -> VllmLayoutReport:
    started = time.perf_counter()
    max_bytes = parse_size(max_shard_size)
    with open_checkpoint(src) as ck:
        model = _check(ck.config, tp)
        metas = {name: (info.dtype, info.shape) for name, info in ck.tensors.items()}
        plan = make_plan(ck.config, metas, tp=tp, vocab_pad=VOCAB_PAD, pad_each_rank=False)
        ranks = [CheckpointRank(ck, tp, r, plan) for r in range(tp)]
        specs = [_rank_specs(rank, model, ck.tensors) for rank in ranks]
        total = sum(s.nbytes for rank in specs for s in rank)
        done = [0]

        def on_bytes(n: int) -> None:
            done[0] += n
            if progress is not None:
                progress(done[0], total)

        files = 0
        with atomic_output_dir(Path(out), overwrite, (ck.path,)) as tmp:
            for rank, rank_specs in enumerate(specs):
                for part, shard in enumerate(plan_shards(rank_specs, max_bytes)):
                    name = PATTERN.format(rank=rank, part=part)
                    write_file(tmp / name, file_layout(shard), {"format": "pt"}, on_bytes)
                    files += 1
            copy_aux_files(ck.path, tmp)
            write_json(tmp / "config.json", ck.config)
    return VllmLayoutReport(
        str(Path(out).absolute()), tp, files, total, time.perf_counter() - started
    )


def _check(config: dict, tp: int) -> Model:
    if config.get("quantization_config"):
        raise LlmkitError(
            "--layout vllm writes full-precision checkpoints; shard the unquantized model, or "
            "use the llmkit layout for quantized ones"
        )
    model = Model.from_config(config)
    check_tp(model, tp)
    padded = padded_vocab(model.vocab_size, VOCAB_PAD)
    if padded % tp:
        raise LlmkitError(
            f"vLLM pads the vocabulary ({model.vocab_size}) to {padded}, which tp={tp} does not "
            "divide"
        )
    return model


def _rank_specs(rank: CheckpointRank, model: Model, tensors: dict) -> list[TensorSpec]:
    family = model.family
    specs = []
    names = set(tensors)
    for i in range(model.num_layers):
        prefix = f"{family.layers}.{i}."
        layer = sorted(n for n in names if n.startswith(prefix))
        specs += _layer_specs(rank, family, prefix, layer)
        specs += [_scalar(f"{prefix}{family.attention}.attn.{s}") for s in ATTN_SCALES]
    specs.append(_spec(rank, f"{family.final_norm}.weight"))
    embed, head = f"{family.embed}.weight", f"{family.lm_head}.weight"
    specs.append(_spec(rank, embed if model.tied else head, head))
    if not model.tied:  # tied: vLLM keeps the shared tensor under its smaller name only
        specs.append(_spec(rank, embed))
    return specs


def _layer_specs(
    rank: CheckpointRank, family: Family, prefix: str, layer: list[str]
) -> list[TensorSpec]:
    """A layer's tensors under vLLM's names, fused ones concatenated along the output dim."""
    groups = family.fused_groups()
    part_of = {part: fused for fused, parts in groups.items() for part in parts}
    specs, fused_done = [], set()
    for name in layer:
        module, suffix = name[len(prefix) :].rsplit(".", 1)
        if module not in part_of:
            specs.append(_spec(rank, name))
            continue
        target = f"{prefix}{part_of[module]}.{suffix}"
        if target in fused_done:
            continue
        fused_done.add(target)
        parts = groups[part_of[module]]
        specs.append(_concat_spec(rank, target, [f"{prefix}{p}.{suffix}" for p in parts]))
    return specs


def _spec(rank: CheckpointRank, source: str, name: str | None = None) -> TensorSpec:
    """`source` as this rank holds it (vocabulary rows padded with zeros), named `name`."""
    plan = rank.plans[source]
    shape = plan.rank_shape(rank.tp_rank)
    return TensorSpec(name or source, plan.dtype, shape, lambda: [rank.get(source)])


def _concat_spec(rank: CheckpointRank, target: str, sources: list[str]) -> TensorSpec:
    plans = [rank.plans[s] for s in sources]
    shapes = [p.rank_shape(rank.tp_rank) for p in plans]
    shape = (sum(s[0] for s in shapes), *shapes[0][1:])
    return TensorSpec(target, plans[0].dtype, shape, lambda: [rank.get(s) for s in sources])


def _scalar(name: str) -> TensorSpec:
    return TensorSpec(name, "F32", (), lambda: [torch.tensor(1.0, dtype=torch.float32)])
