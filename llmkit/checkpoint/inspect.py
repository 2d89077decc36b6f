"""Summarise a checkpoint from its headers and JSON files alone (no tensor data is read)."""

from __future__ import annotations

import json
import re
from collections import defaultdict
from pathlib import Path

from llmkit.checkpoint import dtypes
from llmkit.checkpoint.reader import Checkpoint
from llmkit.checkpoint.safetensors_io import TensorInfo

CONFIG_KEYS = (
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "intermediate_size",
    "vocab_size",
    "max_position_embeddings",
    "tie_word_embeddings",
    "rope_theta",
    "torch_dtype",
)
# Packed integer tensors holding several low-bit weights per element.
_PACKED_SUFFIXES = (".qweight", ".weight_packed")
# Quantization side tensors: stored, but not parameters of the model.
_AUX_SUFFIXES = (
    ".qzeros",
    ".scales",
    ".g_idx",
    ".weight_scale",
    ".weight_zero_point",
    ".weight_g_idx",
    ".input_scale",
    ".weight_shape",
)


def inspect_checkpoint(ck: Checkpoint) -> dict:
    """A JSON-ready summary: architecture, sizes, dtypes, shards, quantization, modules."""
    tensors = list(ck.tensors.values())
    bits = quant_bits(ck.quantization_config)
    return {
        "path": str(ck.path),
        "format": ck.format,
        "architecture": (ck.config.get("architectures") or [None])[0],
        "model_type": ck.config.get("model_type"),
        "config": {k: ck.config[k] for k in CONFIG_KEYS if k in ck.config},
        "num_parameters": sum(_parameters(t, bits) for t in tensors),
        "num_tensors": len(tensors),
        "dtypes": _dtype_summary(tensors),
        "size_on_disk": sum(p.stat().st_size for p in ck.path.iterdir() if p.is_file()),
        "shards": _shard_summary(ck, tensors),
        "quantization": ck.quantization_config,
        "tokenizer": _tokenizer_summary(ck.path),
        "modules": _module_summary(tensors, bits),
    }


def quant_bits(qconfig: dict | None) -> int | None:
    """Weight bits of a GPTQ/AWQ or compressed-tensors quantization_config, if any."""
    if not qconfig:
        return None
    if "bits" in qconfig:
        return int(qconfig["bits"])
    for group in (qconfig.get("config_groups") or {}).values():
        weights = group.get("weights") or {}
        if "num_bits" in weights:
            return int(weights["num_bits"])
    return None


def _parameters(info: TensorInfo, bits: int | None) -> int:
    if info.name.endswith(_AUX_SUFFIXES):
        return 0
    if info.name.endswith(_PACKED_SUFFIXES) and bits:
        return info.numel * (8 * dtypes.itemsize(info.dtype) // bits)
    return info.numel


def _dtype_summary(tensors: list[TensorInfo]) -> dict[str, dict[str, int]]:
    summary: dict[str, dict[str, int]] = defaultdict(lambda: {"num_tensors": 0, "bytes": 0})
    for t in tensors:
        entry = summary[dtypes.torch_name(t.dtype)]
        entry["num_tensors"] += 1
        entry["bytes"] += t.nbytes
    return dict(summary)


def _shard_summary(ck: Checkpoint, tensors: list[TensorInfo]) -> list[dict]:
    counts: dict[Path, int] = defaultdict(int)
    for t in tensors:
        counts[t.file] += 1
    return [
        {"file": f.name, "bytes": f.stat().st_size, "num_tensors": counts[f]}
        for f in ck.weight_files
    ]


def _tokenizer_summary(path: Path) -> dict:
    files = [n for n in ("tokenizer.json", "tokenizer.model", "vocab.json") if (path / n).is_file()]
    config = _json_or_empty(path / "tokenizer_config.json")
    vocab_size = None
    if (path / "tokenizer.json").is_file():
        tok = _json_or_empty(path / "tokenizer.json")
        vocab = (tok.get("model") or {}).get("vocab") or {}
        added = {t["id"] for t in tok.get("added_tokens", []) if isinstance(t, dict) and "id" in t}
        vocab_size = len(set(vocab.values()) | added) if isinstance(vocab, dict) else len(vocab)
    return {
        "files": files,
        "class": config.get("tokenizer_class"),
        "vocab_size": vocab_size,
        "chat_template": bool(config.get("chat_template"))
        or (path / "chat_template.jinja").is_file(),
    }


def _json_or_empty(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def module_pattern(name: str) -> tuple[str, str]:
    """`model.layers.3.mlp.up_proj.weight` -> (`model.layers.*.mlp.up_proj`, `weight`)."""
    module, _, tensor = re.sub(r"\.\d+(?=\.|$)", ".*", name).rpartition(".")
    return module, tensor


def _module_summary(tensors: list[TensorInfo], bits: int | None) -> list[dict]:
    groups: dict[str, list[TensorInfo]] = defaultdict(list)
    for t in tensors:
        groups[module_pattern(t.name)[0]].append(t)
    summary = []
    for module, members in sorted(groups.items()):
        shapes: dict[str, set] = defaultdict(set)
        for t in members:
            shapes[module_pattern(t.name)[1]].add(t.shape)
        summary.append(
            {
                "module": module,
                "count": len(members) // len(shapes),
                "tensors": {name: sorted(s) for name, s in shapes.items()},
                "dtypes": sorted({dtypes.torch_name(t.dtype) for t in members}),
                "num_parameters": sum(_parameters(t, bits) for t in members),
            }
        )
    return summary
