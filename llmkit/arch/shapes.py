"""Check a checkpoint's tensors against what its config.json says they are (headers only).

A config that contradicts its weights (a hidden_size edited, a file from another model) is
refused when the checkpoint is opened, with one line naming the tensor, its shape and the
shape the config implies, instead of failing later in a kernel or writing a broken copy.
The shapes come from the family table (arch/family.py); model types it does not hold, and
configs without the shape keys, are not checked.
"""

from __future__ import annotations

from collections.abc import Mapping

from llmkit.arch.family import FAMILIES, family_for, sizes
from llmkit.errors import LlmkitError

_SHAPE_KEYS = (
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "vocab_size",
)


def check_shapes(config: Mapping, shapes: Mapping[str, tuple[int, ...]], where: str) -> None:
    """Raise LlmkitError for the first tensor of `shapes` (name -> shape) that contradicts
    `config`, or that the config implies and is missing."""
    if config.get("model_type") not in FAMILIES or not all(k in config for k in _SHAPE_KEYS):
        return
    quant = config.get("quantization_config") or {}
    for name, expected in expected_shapes(config).items():
        problem = _problem(name, expected, shapes, quant)
        if problem:
            raise LlmkitError(f"{where}: {problem}; config.json and the weights disagree")


def expected_shapes(config: Mapping) -> dict[str, tuple[int, ...]]:
    """Each tensor the config implies: norms and biases as stored, Linears as [out, in]."""
    family, size = family_for(dict(config)), sizes(dict(config))
    hidden, vocab = size["hidden"], size["vocab"]
    out: dict[str, tuple[int, ...]] = {f"{family.embed}.weight": (vocab, hidden)}
    out[f"{family.final_norm}.weight"] = (hidden,)
    if not config.get("tie_word_embeddings", False):
        out[f"{family.lm_head}.weight"] = (vocab, hidden)
    linears = {
        name: (size[linear.out], size[linear.inputs]) for name, _, linear in family.layer_linears()
    }
    head_norms = family.head_norms if family.head_norms_required else ()
    for i in range(config["num_hidden_layers"]):
        p = f"{family.layers}.{i}"
        for norm in family.norms:
            out[f"{p}.{norm}.weight"] = (hidden,)
        for name, shape in linears.items():
            out[f"{p}.{name}.weight"] = shape
        for norm in head_norms:
            out[f"{p}.{norm}.weight"] = (size["head_dim"],)
    return out


def _problem(name: str, expected: tuple, shapes: Mapping, quant: Mapping) -> str | None:
    if name in shapes:
        got = tuple(shapes[name])
        return None if got == expected else _says(name, got, expected)
    prefix = name.removesuffix(".weight")
    if len(expected) == 2:
        out_features, in_features = expected
        packed = _packed_problem(prefix, out_features, in_features, shapes, quant)
        if packed is not False:
            return packed
    return f"{name} is missing (config.json implies shape {list(expected)})"


def _packed_problem(prefix: str, out_f: int, in_f: int, shapes: Mapping, quant: Mapping):
    """A quantized Linear's packed weight against [out, in]: None if it fits, a message if
    not, False if the Linear has no packed weight either."""
    bits = _bits(quant)
    per_int32 = 32 // bits
    if f"{prefix}.qweight" in shapes:
        got = tuple(shapes[f"{prefix}.qweight"])
        if is_awq_gemv(quant):  # [out, in / 8]
            want = (out_f, in_f // per_int32)
        elif quant.get("quant_method") == "awq":  # GEMM: [in, out / 8]
            want = (in_f, out_f // per_int32)
        else:  # GPTQ: [in * bits / 32, out]
            want = (in_f * bits // 32, out_f)
        return None if got == want else _says(f"{prefix}.qweight", got, want)
    if f"{prefix}.weight_packed" in shapes:  # compressed-tensors: [out, in * bits / 32]
        got = tuple(shapes[f"{prefix}.weight_packed"])
        want = (out_f, in_f // per_int32)
        return None if got == want else _says(f"{prefix}.weight_packed", got, want)
    return False


def is_awq_gemv(quant: Mapping) -> bool:
    """Whether a quantization_config is AutoAWQ's GEMV layout ([out, ...] tensors, the
    groups' scales and zeros padded) rather than its GEMM one."""
    return (
        quant.get("quant_method") == "awq" and str(quant.get("version", "gemm")).lower() == "gemv"
    )


def _bits(quant: Mapping) -> int:
    """Weight bits: GPTQ's and AWQ's `bits`, or compressed-tensors' first group's num_bits."""
    if "bits" in quant:
        return int(quant["bits"])
    for group in (quant.get("config_groups") or {}).values():
        return int(group.get("weights", {}).get("num_bits", 4))
    return 4


def _says(name: str, got: tuple, want: tuple) -> str:
    return f"{name} has shape {list(got)}, but config.json implies {list(want)}"
