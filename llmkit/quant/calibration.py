"""Calibration text -> token windows: from a local file or a `datasets` hub dataset.

Windows are cut from the concatenated token stream of all texts (documents joined by EOS),
each `seq_len` long and starting with BOS, non-overlapping, chosen with a seeded shuffle.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmkit.errors import LlmkitError

if TYPE_CHECKING:
    import torch

BUILTIN = "builtin"


@dataclass(frozen=True, slots=True)
class CalibrationSpec:
    """Where calibration text comes from and how much of it to use."""

    dataset: str = BUILTIN  # "builtin", a .txt/.jsonl/.parquet path, or a hub dataset id
    config: str | None = None
    split: str = "train"
    text_column: str = "text"
    num_samples: int = 128
    seq_len: int = 512
    seed: int = 0
    chat_template: bool = False


def load_texts(spec: CalibrationSpec) -> list[Any]:
    """The texts (or chat message lists) of the dataset, in order."""
    if spec.dataset == BUILTIN:
        from llmkit.checkpoint import corpus

        return corpus.paragraphs(4000, seed=spec.seed + 12345)
    path = Path(spec.dataset).expanduser()
    if path.suffix == ".txt" and path.is_file():
        return [path.read_text(encoding="utf-8")]
    if path.suffix == ".jsonl" and path.is_file():
        return _jsonl_texts(path, spec.text_column)
    if path.suffix == ".parquet" and path.is_file():
        return _datasets_texts("parquet", spec, data_files=str(path))
    if path.exists():
        raise LlmkitError(f"calibration file {path} must be .txt, .jsonl or .parquet")
    return _datasets_texts(spec.dataset, spec)


def _jsonl_texts(path: Path, column: str) -> list[Any]:
    texts = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise LlmkitError(f"{path}:{number} is not valid JSON ({e})") from None
        value = record.get(column, record.get("messages")) if isinstance(record, dict) else None
        if value is None:
            raise LlmkitError(f"{path}:{number} has no {column!r} (or 'messages') field")
        texts.append(value)
    return texts


def _datasets_texts(name: str, spec: CalibrationSpec, **kwargs: Any) -> list[Any]:
    import datasets

    try:
        data = datasets.load_dataset(name, spec.config, split=spec.split, **kwargs)
    except Exception as e:  # network, missing dataset, bad config: all say the same to a user
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise LlmkitError(f"cannot load calibration dataset {name!r}: {reason}") from None
    if spec.text_column not in data.column_names:
        raise LlmkitError(
            f"dataset {name!r} has no column {spec.text_column!r}; "
            f"columns: {', '.join(data.column_names)} (use --text-column)"
        )
    return list(data[spec.text_column])


def token_stream(tokenizer: Any, texts: list[Any], chat_template: bool = False) -> list[int]:
    """All texts tokenized without special tokens, documents separated by EOS."""
    ids: list[int] = []
    for text in texts:
        if chat_template or not isinstance(text, str):
            messages = text if isinstance(text, list) else [{"role": "user", "content": text}]
            text = tokenizer.apply_chat_template(messages, tokenize=False)
        ids.extend(tokenizer.encode(text, add_special_tokens=False))
        if tokenizer.eos_token_id is not None:
            ids.append(tokenizer.eos_token_id)
    return ids


def windows(stream: list[int], seq_len: int, bos_id: int | None) -> list[list[int]]:
    """Consecutive non-overlapping windows of `seq_len` tokens, each BOS-prefixed."""
    body = seq_len - (bos_id is not None)
    prefix = [bos_id] if bos_id is not None else []
    return [prefix + stream[i : i + body] for i in range(0, len(stream) - body + 1, body)]


def calibration_ids(tokenizer: Any, spec: CalibrationSpec) -> torch.Tensor:
    """[num_samples, seq_len] token ids drawn from the dataset; refuses text that is too short."""
    import torch

    if spec.num_samples < 1 or spec.seq_len < 2:
        raise LlmkitError("--num-samples must be >= 1 and --seq-len >= 2")
    stream = token_stream(tokenizer, load_texts(spec), spec.chat_template)
    available = windows(stream, spec.seq_len, tokenizer.bos_token_id)
    if len(available) < spec.num_samples:
        raise LlmkitError(
            f"calibration text holds {len(stream)} tokens: {len(available)} samples of "
            f"{spec.seq_len} tokens, but {spec.num_samples} were asked for; lower --num-samples "
            f"or --seq-len, or give more text"
        )
    chosen = random.Random(spec.seed).sample(range(len(available)), spec.num_samples)
    return torch.tensor([available[i] for i in sorted(chosen)], dtype=torch.long)
