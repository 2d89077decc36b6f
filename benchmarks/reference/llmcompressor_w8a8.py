"""Run llm-compressor's W8A8 (SmoothQuant + per-channel int8, the weights rounded to nearest
or by GPTQ) on given calibration windows.

Runs inside llm-compressor's own venv (see benchmarks/setup_reference_venvs.sh), never
inside llmkit's. Prints one JSON line: {"seconds": ...} for oneshot + save.

    python llmcompressor_w8a8.py MODEL IDS.json OUT --alpha 0.5 [--gptq]
"""

from __future__ import annotations

import llmcompressor_oneshot


def main() -> None:
    parser = llmcompressor_oneshot.parser()
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--gptq", action="store_true", help="GPTQ the weights after smoothing")
    args = parser.parse_args()

    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier
    from llmcompressor.modifiers.transform.smoothquant import SmoothQuantModifier

    weights = GPTQModifier if args.gptq else QuantizationModifier
    recipe = [
        SmoothQuantModifier(smoothing_strength=args.alpha),
        weights(targets="Linear", scheme="W8A8", ignore=["lm_head"]),
    ]
    llmcompressor_oneshot.run(args.model, args.ids, args.out, recipe)


if __name__ == "__main__":
    main()
