"""Run llm-compressor's AWQ (4-bit asymmetric groups) on given calibration windows.

Runs inside llm-compressor's own venv (see benchmarks/setup_reference_venvs.sh), never
inside llmkit's. Writes compressed-tensors (pack-quantized with zero points), llm-compressor's
only output format. Prints one JSON line: {"seconds": ...} for oneshot + save.

    python llmcompressor_awq.py MODEL IDS.json OUT [--group-size 128] [--no-duo-scaling]
"""

from __future__ import annotations

import llmcompressor_oneshot


def main() -> None:
    parser = llmcompressor_oneshot.parser()
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--no-duo-scaling", action="store_true")
    args = parser.parse_args()

    import torch
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from llmcompressor.modifiers.transform.awq import AWQModifier
    from llmcompressor.pipelines.cache import IntermediatesCache

    if not torch.cuda.is_available():
        # 0.14.0.1's AWQ pins its cached activations for faster host-to-GPU copies, which
        # fails without an accelerator; skipping the pinning changes no result.
        IntermediatesCache.pin_memory = lambda self, *args, **kwargs: None
    weights = QuantizationArgs(
        num_bits=4, type="int", symmetric=False, strategy="group", group_size=args.group_size
    )
    scheme = QuantizationScheme(targets=["Linear"], weights=weights)
    recipe = [
        AWQModifier(duo_scaling=not args.no_duo_scaling),
        QuantizationModifier(config_groups={"group_0": scheme}, ignore=["lm_head"]),
    ]
    llmcompressor_oneshot.run(args.model, args.ids, args.out, recipe)


if __name__ == "__main__":
    main()
