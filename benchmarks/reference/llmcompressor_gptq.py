"""Run llm-compressor's GPTQ W4A16 (symmetric 4-bit weights, groups or one grid per output
channel) on given calibration windows.

Runs inside llm-compressor's own venv (see benchmarks/setup_reference_venvs.sh), never
inside llmkit's. Writes compressed-tensors pack-quantized. `--actorder` is llm-compressor's
column order: `weight` (its default, named `static` too: columns by the Hessian's diagonal,
the format unchanged) or `none`. Prints one JSON line: {"seconds": ...} for oneshot + save.

    python llmcompressor_gptq.py MODEL IDS.json OUT [--group-size 128 | -1]
        [--actorder weight|none] [--dampening-frac 0.01]
"""

from __future__ import annotations

import llmcompressor_oneshot


def main() -> None:
    parser = llmcompressor_oneshot.parser()
    parser.add_argument("--group-size", type=int, default=128, help="-1: one per channel")
    parser.add_argument("--actorder", choices=["weight", "none"], default="weight")
    parser.add_argument("--dampening-frac", type=float, default=0.01)
    args = parser.parse_args()

    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from llmcompressor.modifiers.quantization import GPTQModifier

    grid = {"strategy": "channel"} if args.group_size == -1 else {"group_size": args.group_size}
    weights = QuantizationArgs(num_bits=4, type="int", symmetric=True, **grid)
    scheme = QuantizationScheme(targets=["Linear"], weights=weights)
    recipe = [
        GPTQModifier(
            config_groups={"group_0": scheme},
            ignore=["lm_head"],
            actorder=None if args.actorder == "none" else args.actorder,
            dampening_frac=args.dampening_frac,
        )
    ]
    llmcompressor_oneshot.run(args.model, args.ids, args.out, recipe)


if __name__ == "__main__":
    main()
