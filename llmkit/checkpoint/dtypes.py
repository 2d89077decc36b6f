"""Safetensors dtype codes, their sizes, and their torch counterparts (torch imported lazily)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

# code -> (bytes per element, torch attribute name)
_DTYPES: dict[str, tuple[int, str]] = {
    "F64": (8, "float64"),
    "F32": (4, "float32"),
    "F16": (2, "float16"),
    "BF16": (2, "bfloat16"),
    "F8_E4M3": (1, "float8_e4m3fn"),
    "F8_E5M2": (1, "float8_e5m2"),
    "I64": (8, "int64"),
    "I32": (4, "int32"),
    "I16": (2, "int16"),
    "I8": (1, "int8"),
    "U64": (8, "uint64"),
    "U32": (4, "uint32"),
    "U16": (2, "uint16"),
    "U8": (1, "uint8"),
    "BOOL": (1, "bool"),
}
FLOAT_CODES = frozenset({"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"})
# Names people type (`--dtype float16`, config.json's `torch_dtype`) -> code.
NAME_TO_CODE = {name: code for code, (_, name) in _DTYPES.items()} | {"half": "F16", "float": "F32"}


def is_known(code: str) -> bool:
    return code in _DTYPES


def itemsize(code: str) -> int:
    return _DTYPES[code][0]


def to_torch(code: str) -> torch.dtype:
    import torch

    return getattr(torch, _DTYPES[code][1])


def from_torch(dtype: torch.dtype) -> str:
    name = str(dtype).removeprefix("torch.")
    return NAME_TO_CODE[name]


def torch_name(code: str) -> str:
    """The name transformers writes in config.json (`float16`, `bfloat16`, ...)."""
    return _DTYPES[code][1]
