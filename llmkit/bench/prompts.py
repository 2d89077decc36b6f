"""Benchmark requests: random token prompts, a ShareGPT file, or a JSONL file of prompts."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from llmkit.errors import LlmkitError


@dataclass(frozen=True, slots=True)
class BenchRequest:
    prompt: str | list[int]  # text, or token ids (completions endpoint only)
    output_len: int


def parse_range(text: str, name: str) -> tuple[int, int]:
    """'128' -> (128, 128); '64-256' -> (64, 256)."""
    low, _, high = text.partition("-")
    try:
        lo, hi = int(low), int(high or low)
    except ValueError:
        raise LlmkitError(
            f"{name} {text!r}: give a length like 128 or a range like 64-256"
        ) from None
    if not 1 <= lo <= hi:
        raise LlmkitError(f"{name} {text!r}: lengths must be >= 1 and low <= high")
    return lo, hi


def load_requests(
    dataset: str,
    num_prompts: int,
    input_len: tuple[int, int],
    output_len: tuple[int, int],
    seed: int,
    tokenizer=None,
    random_vocab: int = 256,
) -> list[BenchRequest]:
    if num_prompts < 1:
        raise LlmkitError("--num-prompts must be at least 1")
    rng = random.Random(seed)
    if dataset == "random":
        return _random(num_prompts, input_len, output_len, rng, tokenizer, random_vocab)
    path = Path(dataset)
    if not path.is_file():
        raise LlmkitError(f"--dataset {dataset}: not 'random' and no such file")
    if path.suffix == ".jsonl":
        requests = _jsonl(path, output_len, rng)
    else:
        requests = _sharegpt(path, output_len, rng, tokenizer)
    if not requests:
        raise LlmkitError(f"--dataset {dataset}: no usable prompts in it")
    rng.shuffle(requests)
    return [requests[i % len(requests)] for i in range(num_prompts)]


def _random(num, input_len, output_len, rng, tokenizer, vocab) -> list[BenchRequest]:
    """Random token ids; decoded to text when there is a tokenizer (the server re-tokenizes,
    so the prompt lengths it reports can differ a little)."""
    if tokenizer is not None:
        special = set(tokenizer.all_special_ids)
        pool = [i for i in range(len(tokenizer)) if i not in special]
    else:
        pool = list(range(1, vocab))
    requests = []
    for _ in range(num):
        ids = [rng.choice(pool) for _ in range(rng.randint(*input_len))]
        prompt = tokenizer.decode(ids) if tokenizer is not None else ids
        requests.append(BenchRequest(prompt, rng.randint(*output_len)))
    return requests


def _jsonl(path: Path, output_len, rng) -> list[BenchRequest]:
    requests = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            data = json.loads(line)
            prompt = data["prompt"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise LlmkitError(
                f"{path}:{number}: each line needs a JSON object with 'prompt'"
            ) from None
        out = data.get("max_tokens") or data.get("output_len") or rng.randint(*output_len)
        requests.append(BenchRequest(prompt, int(out)))
    return requests


def _sharegpt(path: Path, output_len, rng, tokenizer) -> list[BenchRequest]:
    """The first human turn of each conversation; its output length is the reply's token
    count when a tokenizer is given, else drawn from --output-len."""
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise LlmkitError(f"{path}: not JSON ({e.msg}); a ShareGPT file is a JSON list") from None
    requests = []
    for item in data if isinstance(data, list) else []:
        turns = item.get("conversations") if isinstance(item, dict) else None
        if not isinstance(turns, list) or len(turns) < 2:
            continue
        prompt, reply = turns[0].get("value"), turns[1].get("value")
        if not isinstance(prompt, str) or not isinstance(reply, str) or not prompt:
            continue
        out = len(tokenizer.encode(reply)) if tokenizer is not None else rng.randint(*output_len)
        requests.append(BenchRequest(prompt, max(out, 1)))
    return requests
