"""Which tensor goes to which rank, split how: the rules table `shard` and the runtime share.

A decoder Linear holds a logical weight [out, in]. Column-parallel layers split `out`, row-
parallel layers split `in`; every stored tensor of a layer (dense weight, bias, or a format's
packed/group tensors) carries those two axes on known dims (AXES), so one rule covers every
format. Sizes along a packed or grouped dim scale with the logical size, so "the slice is a
whole number of stored elements" is exactly the packing/group condition for that tensor.

Everything here works from names, shapes and config.json: a plan is made, and every
divisibility condition checked, before any tensor byte is read.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

from llmkit.arch.family import (
    COLWISE,
    DROP,
    FAMILIES,
    REPLICATE,
    ROWWISE,
    VOCAB,
    Family,
    family_for,
    padded_vocab,
)
from llmkit.arch.shapes import is_awq_gemv
from llmkit.errors import LlmkitError

DEFAULT_VOCAB_PAD = 64  # vLLM's padding unit for vocab-parallel embeddings

# tensor suffix -> (dim holding the layer's `out` axis, dim holding its `in` axis)
AXES: dict[str, tuple[int | None, int | None]] = {
    "weight": (0, 1),  # dense [out, in]; embedding [vocab, hidden]; compressed-tensors int8
    "bias": (0, None),
    "qweight": (1, 0),  # GPTQ [in*b/32, out]; AWQ [in, out/8]
    "qzeros": (1, 0),  # GPTQ [groups, out*b/32]; AWQ [groups, out/8]
    "scales": (1, 0),  # [groups, out]
    "g_idx": (None, 0),  # [in], global group ids
    "weight_packed": (0, 1),  # compressed-tensors [out, in*b/32]
    "weight_scale": (0, 1),  # [out, groups] or [out, 1]
    "weight_zero_point": (0, 1),
    "weight_g_idx": (None, 0),
    "weight_shape": (None, None),  # the full logical shape, kept as written
    "input_scale": (None, None),
}
# per-group tensors: [groups, out] (GPTQ) or [out, groups] (compressed-tensors)
GROUPED = ("scales", "qzeros", "weight_scale", "weight_zero_point")
_TP_CANDIDATES = (1, 2, 3, 4, 6, 8, 12, 16, 32, 64)


@dataclass(frozen=True, slots=True)
class Model:
    """The config.json numbers the rules need."""

    model_type: str
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    intermediate_size: int
    vocab_size: int
    tied: bool
    act_order: bool  # GPTQ desc_act: g_idx is a permutation, groups are not contiguous
    awq_gemv: bool = False  # AutoAWQ GEMV: [out, ...] tensors, groups padded: not split

    @classmethod
    def from_config(cls, config: dict) -> Model:
        family_for(config)  # refuses a model type llmkit does not know
        heads = int(config["num_attention_heads"])
        qconfig = config.get("quantization_config") or {}
        return cls(
            model_type=config["model_type"],
            num_layers=int(config["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(config.get("num_key_value_heads") or heads),
            head_dim=int(config.get("head_dim") or config["hidden_size"] // heads),
            hidden_size=int(config["hidden_size"]),
            intermediate_size=int(config["intermediate_size"]),
            vocab_size=int(config["vocab_size"]),
            tied=bool(config.get("tie_word_embeddings", False)),
            act_order=bool(qconfig.get("quant_method") == "gptq" and qconfig.get("desc_act")),
            awq_gemv=is_awq_gemv(qconfig),
        )

    @property
    def family(self) -> Family:
        return FAMILIES[self.model_type]


@dataclass(frozen=True, slots=True)
class Slice:
    """The part of a split tensor one tensor-parallel rank holds: [offset, offset+length)
    along the split dim of the (padded) tensor."""

    tp_rank: int
    offset: int
    length: int


@dataclass(frozen=True, slots=True)
class TensorPlan:
    """One tensor of the sharded layout: where it comes from and how it is cut."""

    name: str  # name in the rank files
    source: str  # name in the source checkpoint (differs only for a tied lm_head copy)
    dtype: str
    shape: tuple[int, ...]  # source shape
    pp_rank: int
    rule: str
    dim: int | None  # split dim; None when every tp rank holds the whole tensor
    padded: int  # size along `dim` after vocab padding (the source size otherwise)
    slices: tuple[Slice, ...]  # one per tp rank; replicas share offset and length
    note: str = ""

    def rank_shape(self, tp_rank: int) -> tuple[int, ...]:
        if self.dim is None:
            return self.shape
        shape = list(self.shape)
        shape[self.dim] = self.slices[tp_rank].length
        return tuple(shape)

    def holders(self) -> dict[Slice, list[int]]:
        """Each distinct slice, by offset (replicated kv heads share one) -> its tp ranks."""
        ranks: dict[int, list[int]] = {}
        first: dict[int, Slice] = {}
        for part in self.slices:
            first.setdefault(part.offset, part)
            ranks.setdefault(part.offset, []).append(part.tp_rank)
        return {first[offset]: ranks[offset] for offset in sorted(first)}

    @property
    def padding(self) -> int:
        return 0 if self.dim is None else self.padded - self.shape[self.dim]

    @property
    def is_copy(self) -> bool:
        """A tensor the source holds under another name (tied lm_head); merge skips it."""
        return self.name != self.source


@dataclass(frozen=True, slots=True)
class ShardPlan:
    tp: int
    pp: int
    vocab_pad: int
    stages: tuple[tuple[int, int], ...]  # [start, stop) layers per pp rank
    tensors: tuple[TensorPlan, ...]
    dropped: tuple[str, ...]
    rules: dict  # what was decided, for the manifest: kv heads, vocab padding, ties


def stage_layers(
    num_layers: int, pp: int, pp_layers: tuple[int, ...] | None = None
) -> tuple[tuple[int, int], ...]:
    """Contiguous [start, stop) layer ranges for `pp` stages.

    Uneven splits follow vLLM: every stage gets num_layers // pp, and the remaining layers go
    one each to the stages before the last, starting from the second-to-last (the last stage
    also runs the final norm and lm_head). `pp_layers` gives the counts explicitly.
    """
    if pp < 1:
        raise LlmkitError(f"--pp must be at least 1, got {pp}")
    if pp > num_layers:
        raise LlmkitError(f"--pp {pp} exceeds the model's {num_layers} layers")
    if pp_layers is None:
        counts = [num_layers // pp] * pp
        for i in range(2, num_layers % pp + 2):
            counts[-i] += 1
    else:
        counts = list(pp_layers)
        if len(counts) != pp or min(counts) < 1 or sum(counts) != num_layers:
            raise LlmkitError(
                f"--pp-layers {','.join(map(str, counts))} must give {pp} positive counts "
                f"summing to the model's {num_layers} layers"
            )
    starts = [sum(counts[:i]) for i in range(pp)]
    return tuple((start, start + count) for start, count in zip(starts, counts, strict=True))


def parse_pp_layers(text: str | None) -> tuple[int, ...] | None:
    """'7,8,8,7' -> (7, 8, 8, 7)."""
    if text is None:
        return None
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError:
        raise LlmkitError(f"--pp-layers {text!r} must be comma-separated layer counts") from None


@functools.cache
def split_rules(family: Family) -> tuple[tuple[str, str, str | None], ...]:
    """(module name pattern, role, heads the split must respect: "q", "kv" or None), from
    the family's table."""
    layer = re.escape(family.layers) + r"\.\d+\."
    rules = [(re.escape(family.embed), VOCAB, None), (re.escape(family.lm_head), VOCAB, None)]
    for name, role, linear in family.layer_linears():
        rules.append((layer + re.escape(name), role, linear.heads))
    for name in (*family.norms, *family.head_norms):
        rules.append((layer + re.escape(name), REPLICATE, None))
    rules.append((re.escape(family.final_norm), REPLICATE, None))
    rules += [(pattern, DROP, None) for pattern in family.dropped]
    return tuple(rules)


def module_rule(family: Family, name: str) -> tuple[str, str | None]:
    """(role, heads) of the module a tensor belongs to."""
    module = name.rsplit(".", 1)[0]
    for pattern, role, heads in split_rules(family):
        if re.fullmatch(pattern, module):
            return role, heads
    raise LlmkitError(f"llmkit shard has no split rule for tensor {name!r}")


def make_plan(
    config: dict,
    tensors: dict[str, tuple[str, tuple[int, ...]]],
    tp: int = 1,
    pp: int = 1,
    pp_layers: tuple[int, ...] | None = None,
    vocab_pad: int = DEFAULT_VOCAB_PAD,
    pad_each_rank: bool = True,
) -> ShardPlan:
    """Plan a tp x pp layout for `tensors` (name -> (dtype code, shape)); raises on the first
    condition that cannot hold, naming the tensor, the numbers and the tp values that work.

    The vocabulary is padded with zero rows so that each rank's share is a multiple of
    `vocab_pad` (llmkit's layout), or, with `pad_each_rank` off, so that the whole is (vLLM's:
    the padded vocabulary must then divide by tp)."""
    if tp < 1:
        raise LlmkitError(f"--tp must be at least 1, got {tp}")
    if vocab_pad < 1:
        raise LlmkitError(f"--vocab-pad must be at least 1, got {vocab_pad}")
    model = Model.from_config(config)
    check_tp(model, tp)
    stages = stage_layers(model.num_layers, pp, pp_layers)
    vocab_multiple = vocab_pad * tp if pad_each_rank else vocab_pad
    plans, dropped = [], []
    indexed = {n.rsplit(".", 1)[0] for n in tensors if n.endswith(".weight_g_idx")}
    for name, (dtype, shape) in tensors.items():
        role = module_rule(model.family, name)[0]
        if role == DROP:
            dropped.append(name)
            continue
        stage = _stage_of(name, stages, model)
        act_order = model.act_order or name.rsplit(".", 1)[0] in indexed
        plans.append(
            _tensor_plan(name, name, dtype, shape, stage, model, tp, vocab_multiple, act_order)
        )
    embed, head = f"{model.family.embed}.weight", f"{model.family.lm_head}.weight"
    if model.tied and head not in tensors and embed in tensors and pp > 1:
        note = f"tied: copy of {embed} for the last stage"
        dtype, shape = tensors[embed]
        copy = _tensor_plan(
            head, embed, dtype, shape, pp - 1, model, tp, vocab_multiple, False, note
        )
        plans.append(copy)
    return ShardPlan(tp, pp, vocab_pad, stages, tuple(plans), tuple(dropped), _rules(model, tp))


def _heads_fit(model: Model, tp: int) -> bool:
    kv = model.num_kv_heads
    return model.num_heads % tp == 0 and (kv % tp == 0 or tp % kv == 0)


def check_tp(model: Model, tp: int) -> None:
    if _heads_fit(model, tp):
        return
    kv = model.num_kv_heads
    problem = (
        f"tp={tp} does not divide num_attention_heads={model.num_heads}"
        if model.num_heads % tp
        else f"num_key_value_heads={kv} can be neither split over tp={tp} nor replicated "
        f"(needs kv % tp == 0 or tp % kv == 0)"
    )
    raise LlmkitError(f"{problem}; tp values that work: {_working(lambda t: _heads_fit(model, t))}")


def _stage_of(name: str, stages: tuple[tuple[int, int], ...], model: Model) -> int:
    match = re.match(re.escape(model.family.layers) + r"\.(\d+)\.", name)
    if match is None:
        return 0 if name.startswith(model.family.embed) else len(stages) - 1
    layer = int(match.group(1))
    if layer >= model.num_layers:
        raise LlmkitError(f"tensor {name!r} names layer {layer}; the config has {model.num_layers}")
    return next(i for i, (start, stop) in enumerate(stages) if start <= layer < stop)


def _tensor_plan(
    name: str,
    source: str,
    dtype: str,
    shape: tuple[int, ...],
    pp_rank: int,
    model: Model,
    tp: int,
    vocab_multiple: int,
    act_order: bool,
    note: str = "",
) -> TensorPlan:
    """act_order: the tensor's Linear holds its inputs' groups in any order (a g_idx
    permutation), so a row-parallel rank needs every group's scales and zeros."""
    role, heads = module_rule(model.family, source)
    dim, parts, padded, why = _split(
        source, shape, role, heads, model, tp, vocab_multiple, act_order
    )
    if dim is None:
        slices = ()
    else:
        length = padded // parts
        slices = tuple(Slice(r, (r * parts // tp) * length, length) for r in range(tp))
    note = "; ".join(n for n in (note, why) if n)
    return TensorPlan(name, source, dtype, tuple(shape), pp_rank, role, dim, padded, slices, note)


def _split(
    name: str,
    shape: tuple[int, ...],
    role: str,
    heads: str | None,
    model: Model,
    tp: int,
    vocab_multiple: int,
    act_order: bool,
) -> tuple[int | None, int, int, str]:
    """(dim, distinct parts, padded size along dim, note) for one tensor, checked at `tp`."""
    suffix = name.rsplit(".", 1)[1]
    if role == REPLICATE or (tp == 1 and role != VOCAB):
        return None, 1, 0, ""
    if suffix not in AXES:
        raise LlmkitError(f"llmkit shard does not know the tensor kind {suffix!r} of {name!r}")
    if model.awq_gemv and suffix in ("qweight", "qzeros", "scales"):
        raise LlmkitError(
            f"{name}: AWQ GEMV checkpoints run and reshard at --tp 1 only (their scales and "
            "zeros pad the groups)"
        )
    out_dim, in_dim = AXES[suffix]
    dim = in_dim if role == ROWWISE else out_dim
    if dim is None:
        return None, 1, 0, "bias: applied once, after the sum" if suffix == "bias" else ""
    if role == ROWWISE and suffix in GROUPED and act_order:
        return None, 1, 0, "act-order: full scales/zeros on every rank, g_idx global"
    if role == ROWWISE and shape[dim] == 1:
        return None, 1, 0, "one group spans all inputs"
    if role == VOCAB:
        return _vocab_split(name, shape, dim, model.vocab_size, tp, vocab_multiple)
    parts = _parts(heads, model, tp)
    _check_divisible(name, shape, dim, role, heads, model, tp)
    note = f"kv heads replicated {tp // parts}x" if parts < tp else ""
    return dim, parts, shape[dim], note


def heads_per_rank(num_heads: int, num_kv_heads: int, tp: int) -> tuple[int, int]:
    """(query heads, kv heads) each of `tp` ranks holds: kv heads are split, or one each
    when they are replicated (tp a multiple of them)."""
    return num_heads // tp, num_kv_heads // tp if num_kv_heads % tp == 0 else 1


def _parts(heads: str | None, model: Model, tp: int) -> int:
    """Distinct slices: tp, or the number of kv heads when they are replicated."""
    return model.num_kv_heads if heads == "kv" and model.num_kv_heads < tp else tp


def _check_divisible(
    name: str,
    shape: tuple[int, ...],
    dim: int,
    role: str,
    heads: str | None,
    model: Model,
    tp: int,
) -> None:
    def fits(t: int) -> bool:
        return _heads_fit(model, t) and shape[dim] % _parts(heads, model, t) == 0

    if fits(tp):
        return
    parts = _parts(heads, model, tp)
    axis = "outputs" if role == COLWISE else "inputs"
    raise LlmkitError(
        f"cannot split {name} {list(shape)} along dim {dim} ({axis}) into {parts}: "
        f"{shape[dim]} is not a multiple of {parts}, so a rank would hold a partial "
        f"group or packed word; tp values that work: {_working(fits)}"
    )


def _vocab_split(
    name: str, shape: tuple[int, ...], dim: int, vocab: int, tp: int, multiple: int
) -> tuple[int, int, int, str]:
    padded_to = padded_vocab(vocab, multiple)
    if shape[dim] * padded_to % vocab:
        raise LlmkitError(
            f"cannot pad {name} {list(shape)} from vocab {vocab} to {padded_to}: dim {dim} "
            f"does not scale with the vocab; try another --vocab-pad"
        )
    padded = shape[dim] * padded_to // vocab
    if padded % tp:
        raise LlmkitError(f"cannot split {name}: padded size {padded} is not a multiple of {tp}")
    note = f"vocab padded {vocab} -> {padded_to} with zero rows" if padded_to > vocab else ""
    return dim, tp, padded, note


def _working(fits) -> str:
    good = [t for t in _TP_CANDIDATES if fits(t)]
    return ", ".join(map(str, good)) if good else "none"


def _rules(model: Model, tp: int) -> dict:
    kv = model.num_kv_heads
    return {
        "column_parallel": "q/k/v, gate, up: outputs split, each tensor separately",
        "row_parallel": "o, down: inputs split; bias replicated, applied once after the sum",
        "vocab_parallel": "embed_tokens, lm_head: vocab rows padded with zeros, then split",
        "kv_heads": f"split {kv // tp} per rank" if kv % tp == 0 else f"replicated {tp // kv}x",
        "tied_embeddings": model.tied,
        "act_order": model.act_order,
    }
