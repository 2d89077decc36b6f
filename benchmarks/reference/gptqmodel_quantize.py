"""Quantize with GPTQModel (GPTQ or AWQ) on given calibration windows.

Runs inside the gptqmodel venv (benchmarks/setup_reference_venvs.sh gptqmodel), never inside
llmkit's; set GPTQMODEL_CPU_WORKERS=2 on a 2-core machine. Prints one JSON line:
{"seconds": ...} covering load, quantize and save (the span llmkit's own timing covers from
calibration to the written checkpoint, plus reading the model).

    python gptqmodel_quantize.py MODEL IDS.json OUT [--method gptq|awq] [--bits 4]
        [--group-size 128] [--desc-act] [--asym] [--damp-percent 0.01] [--dtype ...]
"""

from __future__ import annotations

import argparse
import json
import time


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("ids", help="JSON list of token-id windows")
    parser.add_argument("out")
    parser.add_argument("--method", choices=["gptq", "awq"], default="gptq")
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--desc-act", action="store_true")
    parser.add_argument("--asym", action="store_true")
    parser.add_argument("--damp-percent", type=float, default=0.01)
    parser.add_argument(
        "--dtype",
        choices=["float32", "float16", "bfloat16"],
        default=None,
        help="compute dtype (default: float32 for gptq; float16 for awq, whose CPU kernel "
        "takes nothing else)",
    )
    args = parser.parse_args()

    import torch
    from gptqmodel import BACKEND, GPTQModel, QuantizeConfig

    with open(args.ids) as f:
        windows = json.load(f)
    calibration = [
        {"input_ids": torch.tensor([w]), "attention_mask": torch.ones(1, len(w), dtype=torch.long)}
        for w in windows
    ]
    options = {"bits": args.bits, "group_size": args.group_size, "sym": not args.asym}
    if args.method == "gptq":
        options |= {"desc_act": args.desc_act, "damp_percent": args.damp_percent}
        if args.group_size == -1:  # group-aware ordering (its default) needs groups
            options["act_group_aware"] = False
    else:
        options |= {"quant_method": "awq", "format": "gemm"}
    start = time.perf_counter()
    dtype = args.dtype or ("float32" if args.method == "gptq" else "float16")
    model = GPTQModel.load(args.model, QuantizeConfig(**options), dtype=getattr(torch, dtype))
    # On CPU, AWQ needs its torch kernel named explicitly (the default looks for CUDA).
    backend = BACKEND.AWQ_TORCH if args.method == "awq" else BACKEND.AUTO
    model.quantize(calibration, batch_size=1, backend=backend)
    model.save(args.out)
    print(json.dumps({"seconds": time.perf_counter() - start}))


if __name__ == "__main__":
    main()
