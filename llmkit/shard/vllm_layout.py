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

from llmkit.arch.plan import Model, check_tp
from llmkit.arch.rank_tensors import CheckpointRank
from llmkit.checkpoint.atomic import atomic_output_dir
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
FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


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
        ranks = [CheckpointRank(ck, tp, r) for r in range(tp)]
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
    padded = _padded_vocab(model.vocab_size)
    if padded % tp:
        raise LlmkitError(
            f"vLLM pads the vocabulary ({model.vocab_size}) to {padded}, which tp={tp} does not "
            "divide"
        )
    return model


def _padded_vocab(vocab: int) -> int:
    return -(-vocab // VOCAB_PAD) * VOCAB_PAD


def _rank_specs(rank: CheckpointRank, model: Model, tensors: dict) -> list[TensorSpec]:
    specs = []
    names = set(tensors)
    for i in range(model.num_layers):
        prefix = f"model.layers.{i}."
        layer = sorted(n for n in names if n.startswith(prefix))
        specs += _layer_specs(rank, prefix, layer)
        specs += [_scalar(f"{prefix}self_attn.attn.{s}") for s in ATTN_SCALES]
    specs.append(_spec(rank, "model.norm.weight"))
    vocab_rows = _vocab_rows(model.vocab_size, rank.tp, rank.tp_rank)
    head = "model.embed_tokens.weight" if model.tied else "lm_head.weight"
    specs.append(_vocab_spec(rank, head, "lm_head.weight", vocab_rows))
    if not model.tied:  # tied: vLLM keeps the shared tensor under its smaller name only
        specs.append(_vocab_spec(rank, "model.embed_tokens.weight", None, vocab_rows))
    return specs


def _layer_specs(rank: CheckpointRank, prefix: str, layer: list[str]) -> list[TensorSpec]:
    """A layer's tensors under vLLM's names, fused ones concatenated along the output dim."""
    specs, fused_done = [], set()
    for name in layer:
        module, suffix = name[len(prefix) :].rsplit(".", 1)
        group = next(
            ((f, parts) for f, parts in FUSED.items() if module.split(".")[-1] in parts), None
        )
        if group is None:
            specs.append(_spec(rank, name))
            continue
        fused, parts = group
        parent = module.rsplit(".", 1)[0]
        target = f"{prefix}{parent}.{fused}.{suffix}"
        if target in fused_done:
            continue
        fused_done.add(target)
        sources = [f"{prefix}{parent}.{p}.{suffix}" for p in parts]
        specs.append(_concat_spec(rank, target, sources))
    return specs


def _spec(rank: CheckpointRank, name: str) -> TensorSpec:
    plan = rank.plans[name]
    return TensorSpec(name, plan.dtype, plan.rank_shape(rank.tp_rank), lambda: [rank.get(name)])


def _concat_spec(rank: CheckpointRank, target: str, sources: list[str]) -> TensorSpec:
    plans = [rank.plans[s] for s in sources]
    shapes = [p.rank_shape(rank.tp_rank) for p in plans]
    shape = (sum(s[0] for s in shapes), *shapes[0][1:])
    return TensorSpec(target, plans[0].dtype, shape, lambda: [rank.get(s) for s in sources])


def _vocab_rows(vocab: int, tp: int, tp_rank: int) -> tuple[int, int]:
    """[start, stop) of the padded vocabulary this rank holds, as vLLM splits it."""
    per_rank = _padded_vocab(vocab) // tp
    return tp_rank * per_rank, (tp_rank + 1) * per_rank


def _vocab_spec(rank: CheckpointRank, source: str, name: str | None, rows) -> TensorSpec:
    """Rows [start, stop) of a vocabulary tensor, zeros past the real vocabulary."""
    ck = rank.ck
    info = ck.tensors[source]
    start, stop = rows

    def chunks():
        real = ck.read_rows(source, min(start, info.shape[0]), min(stop, info.shape[0]))
        missing = (stop - start) - real.shape[0]
        yield torch.cat([real, real.new_zeros(missing, *real.shape[1:])]) if missing else real

    return TensorSpec(name or source, info.dtype, (stop - start, *info.shape[1:]), chunks)


def _scalar(name: str) -> TensorSpec:
    return TensorSpec(name, "F32", (), lambda: [torch.tensor(1.0, dtype=torch.float32)])
