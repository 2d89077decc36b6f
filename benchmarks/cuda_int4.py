"""4-bit products on CUDA at Llama-3-8B's linear shapes: every option TritonInt4Linear
chooses between, torch's tinygemm kernel and the bf16 weight through cuBLAS, per number
of rows, each timed as the layers time their options (kernels/cuda.py `fastest`: cold L2,
median of 10). Random weights, group size 128.

    python benchmarks/cuda_int4.py [--rows 1,2,4,16]

Prints one JSON line per shape and rows: milliseconds and GB/s of weight bytes read; a
diagnostic for benchmarks/cuda.py's gptq rows, not a benchmark with targets of its own.
"""

from __future__ import annotations

import argparse
import json

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}
GROUP = 128


def main() -> None:
    import torch

    from llmkit.quant.formats.weights import GroupedWeight
    from llmkit.runtime.layers.linear import Int4Linear, TritonInt4Linear

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="1,2,4,16")
    args = parser.parse_args()
    device = torch.device("cuda")
    for name, (outputs, inputs) in SHAPES.items():
        groups = inputs // GROUP
        w = GroupedWeight(
            torch.randint(0, 16, (outputs, inputs), dtype=torch.uint8, device=device),
            (torch.rand(outputs, groups, device=device) * 0.01 + 0.001).half().float(),
            torch.randint(0, 16, (outputs, groups), device=device).float(),
            torch.arange(inputs, device=device) // GROUP,
            4,
        )
        triton_layer = TritonInt4Linear.build(w, None, device)
        tinygemm = Int4Linear.build(w, None, torch.bfloat16, device)
        dense = torch.randn(outputs, inputs, dtype=torch.bfloat16, device=device)
        int4_bytes = inputs * outputs // 2 + 2 * groups * outputs * triton_layer.scales.itemsize
        for rows in map(int, args.rows.split(",")):
            found = timed(triton_layer, tinygemm, dense, rows, int4_bytes)
            print(json.dumps({"shape": name, "rows": rows, **found}), flush=True)


def timed(triton_layer, tinygemm, dense, rows: int, int4_bytes: int) -> dict:
    """Milliseconds and GB/s of weight bytes of every way to compute `rows` rows."""
    import functools

    import torch
    import torch.nn.functional as F

    from llmkit.kernels import cuda

    x = torch.randn(rows, dense.shape[1], dtype=torch.bfloat16, device=dense.device)
    options = triton_layer.options(rows)
    runs = [functools.partial(triton_layer.product, x, o) for o in options]
    runs += [functools.partial(tinygemm, x), functools.partial(F.linear, x, dense)]
    _, ms = cuda.fastest(runs)
    names = [*options, "tinygemm", "bf16-cublas"]
    sizes = [int4_bytes] * (len(names) - 1) + [dense.numel() * 2]
    gbps = {n: b / (t * 1e6) for n, b, t in zip(names, sizes, ms, strict=True)}
    return {"ms": dict(zip(names, ms, strict=True)), "GB/s": gbps}


if __name__ == "__main__":
    main()
