"""Run llm-compressor's W8A8 (SmoothQuant + per-channel int8) on given calibration windows.

Runs inside llm-compressor's own venv (see benchmarks/setup_reference_venvs.sh), never
inside llmkit's. Prints one JSON line: {"seconds": ...} for oneshot + save, the same span
llmkit's own timing covers (calibrate, quantize, write).

    python llmcompressor_w8a8.py MODEL IDS.json OUT --alpha 0.5
"""

from __future__ import annotations

import argparse
import json
import time


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("ids", help="JSON list of token-id windows (all the same length)")
    parser.add_argument("out")
    parser.add_argument("--alpha", type=float, default=0.5)
    args = parser.parse_args()

    import torch
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from llmcompressor.modifiers.transform.smoothquant import SmoothQuantModifier
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with open(args.ids) as f:
        windows = json.load(f)
    dataset = Dataset.from_dict(
        {"input_ids": windows, "attention_mask": [[1] * len(w) for w in windows]}
    )
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    recipe = [
        SmoothQuantModifier(smoothing_strength=args.alpha),
        QuantizationModifier(targets="Linear", scheme="W8A8", ignore=["lm_head"]),
    ]
    start = time.perf_counter()
    oneshot(
        model=model,
        dataset=dataset,
        recipe=recipe,
        num_calibration_samples=len(windows),
        max_seq_length=len(windows[0]),
    )
    model.save_pretrained(args.out, save_compressed=True)
    tokenizer.save_pretrained(args.out)
    print(json.dumps({"seconds": time.perf_counter() - start}))


if __name__ == "__main__":
    main()
