"""What both llm-compressor reference scripts share: load the model, run `oneshot` with a
recipe on given calibration windows, save compressed, time it. Runs inside llm-compressor's
own venv (see benchmarks/setup_reference_venvs.sh), never inside llmkit's."""

from __future__ import annotations

import argparse
import json
import time


def parser() -> argparse.ArgumentParser:
    """The arguments every reference script takes: MODEL IDS.json OUT."""
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("ids", help="JSON list of token-id windows (all the same length)")
    parser.add_argument("out")
    return parser


def run(model_path: str, ids_path: str, out: str, recipe: list) -> None:
    """Prints one JSON line: {"seconds": ...} for oneshot + save, the span llmkit's own
    timing covers (calibrate, quantize, write)."""
    import torch
    from datasets import Dataset
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with open(ids_path) as f:
        windows = json.load(f)
    dataset = Dataset.from_dict(
        {"input_ids": windows, "attention_mask": [[1] * len(w) for w in windows]}
    )
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    start = time.perf_counter()
    oneshot(
        model=model,
        dataset=dataset,
        recipe=recipe,
        num_calibration_samples=len(windows),
        max_seq_length=len(windows[0]),
    )
    model.save_pretrained(out, save_compressed=True)
    tokenizer.save_pretrained(out)
    print(json.dumps({"seconds": time.perf_counter() - start}))
