"""4-bit products on CUDA at Llama-3-8B's linear shapes (group 128), per activation rows:
llmkit's decode kernel (kernels/cuda_int4.py, up to 16 rows), torch's tinygemm
(`_weight_int4pack_mm`) and the bf16 weight through cuBLAS, each as the median time of a
call inside a CUDA graph of 24 calls that cycle through copies of the weight larger than the
L2 together (so every call reads its weight from memory, as a decode step does), and what
that is in GB/s of the weight's bytes; at 1 and 16 rows also each of the kernel's block
shapes (VARIANTS; "llmkit" is the one the layer chose; "p": loading a lane's next chunks
before it multiplies the last, which a layer takes where it times faster:
cuda_int4.timed_variants). For gate_up also silu(gate) * up: the gated kernel's one launch
against the product and then the Triton activation. For up to FUSED_ROWS rows also one
decoder layer's four products with its two norms and residual adds: inside the products
(Int4Linear.normed, add_to; the layers are built with LLMKIT_FUSED_NORMS=1 for this)
against the Triton norms between them, as the layer runs either way (the attention left
out), and the fused layer with a stand-in for its attention, its
q/k/v product prefetching 0-48 MB of the weights after it into the L2
(LLMKIT_L2_PREFETCH_MB). llmkit's kernel is launched as in a decode step, as a programmatic
dependent of the call before it (on sm_90: its blocks start while that call finishes), which
tinygemm and cuBLAS are not. Also llmkit's chosen kernel on the same weight every call
(`llmkit_l2_ms`: from the L2 where the weight fits there, 50 MB on the H100), the least a
product could take were its weight prefetched into the L2 while a kernel before it leaves
memory idle. Also checks the kernel's outputs against tinygemm's. A diagnostic for
benchmarks/cuda.py's gptq rows, without targets.

    python benchmarks/cuda_int4.py [--rows 1,2,4,8,16]
"""

from __future__ import annotations

import argparse
import json
import math
import os

import torch

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}
GROUP = 128
CALLS = 24
# (warps, chunks in flight[, 1: the next chunks load while the last multiply])
VARIANTS = ((8, 4), (8, 2), (8, 8), (4, 4), (16, 4), (8, 4, 1), (8, 2, 1), (4, 4, 1))
EVICT_BYTES = 200 * 2**20  # weights cycled through: several times the H100's 50 MB L2
ATTENTION_CYCLES = 20_000  # a sleep of about a layer's attention at 8B on the H100 (11 us)
PREFETCH_MB = (0, 8, 16, 32, 48)  # of o_proj's and then gate_up's weights


def graph_ms(calls: list) -> float:
    """Median milliseconds of one call, over 5 replays of a graph of all `calls`."""
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        for call in calls[:2]:
            call()  # allocations made before capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    times = []
    for _ in range(5):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        stop.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(stop) / len(calls))
    return sorted(times)[2]


def weights(n: int, k: int, copies: int, dense_copies: int, gated: bool = False) -> list:
    """`copies` 4-bit layers of random weights as the runtime builds them on the GPU (both
    layouts; `gated`: as a [gate; up] pair), the first `dense_copies` with their bf16
    weight as `dense`."""
    from llmkit.quant.formats.weights import GroupedWeight
    from llmkit.runtime.layers.linear import Int4Linear

    out = []
    for seed in range(copies):
        g = torch.Generator("cuda").manual_seed(seed)
        q = torch.randint(0, 16, (n, k), generator=g, device="cuda")
        scales = torch.rand(n, k // GROUP, generator=g, device="cuda") * 0.01 + 0.005
        groups = torch.arange(k, device="cuda") // GROUP
        w = GroupedWeight(q, scales, torch.full_like(scales, 8.0), groups, 4)
        out.append(Int4Linear.build(w, None, torch.bfloat16, torch.device("cuda"), gated))
        if seed < dense_copies:
            out[-1].dense = w.dequantize().bfloat16()
    return out


def tiled(layer) -> tuple:
    return layer.decode_tiles, layer.decode_scales, layer.decode_group


def measure(name: str, n: int, k: int, rows_list: list[int]) -> list[dict]:
    from llmkit.kernels import cuda_int4

    int4_bytes = n * k // 2 + 4 * n * (k // GROUP)
    copies = max(2, math.ceil(EVICT_BYTES / int4_bytes))
    dense_copies = max(2, math.ceil(EVICT_BYTES / (2 * n * k)))
    ws = weights(n, k, copies, dense_copies)
    gated_layers = weights(n, k, copies, 0, gated=True) if name == "gate_up" else []
    results = []
    for rows in rows_list:
        x = torch.randn(rows, k, device="cuda").bfloat16()
        chosen = ws[0].variants[rows > 8]  # the layer's choice (cuda_int4.variants_for)
        ours = [lambda w=w, x=x, v=chosen: cuda_int4.matmul(x, *tiled(w), v) for w in ws]
        tiny = [lambda w=w, x=x: w._mm(x, w.packed, w.group_size, w.scales_zeros) for w in ws]
        dense = [lambda w=w, x=x: x @ w.dense.t() for w in ws[:dense_copies]]
        row = {"shape": name, "n": n, "k": k, "rows": rows}
        if rows <= cuda_int4.MAX_ROWS:
            row["llmkit_variant"] = list(chosen)
        row["tinygemm_ms"] = graph_ms([tiny[i % len(tiny)] for i in range(CALLS)])
        row["bf16_ms"] = graph_ms([dense[i % len(dense)] for i in range(CALLS)])
        if rows <= cuda_int4.MAX_ROWS:
            got, want = ours[0]().float(), tiny[0]().float()
            row["max_diff_vs_tinygemm"] = float((got - want).abs().max() / want.abs().max())
            row["llmkit_ms"] = graph_ms([ours[i % len(ours)] for i in range(CALLS)])
            row["llmkit_gb_s"] = int4_bytes / row["llmkit_ms"] / 1e6
            # the same weight every call: read from the L2 where it fits there
            row["llmkit_l2_ms"] = graph_ms([ours[0]] * CALLS)
            for variant in VARIANTS if rows in (1, cuda_int4.MAX_ROWS) else ():
                pipelined = "p" if variant[2:] == (1,) else ""
                key = f"llmkit_{variant[0]}w_{variant[1]}u{pipelined}_ms"
                try:
                    cuda_int4.kernels(x.device, variant)  # compiled and checked
                except RuntimeError as e:  # a variant that fails its check: said, not timed
                    row[key] = f"unavailable: {e}"
                    continue
                calls = [lambda w=w, x=x, v=variant: cuda_int4.matmul(x, *tiled(w), v) for w in ws]
                row[key] = graph_ms([calls[i % len(calls)] for i in range(CALLS)])
            if name == "gate_up":
                row.update(gated_ms(ours, gated_layers, x))
        row["tinygemm_gb_s"] = int4_bytes / row["tinygemm_ms"] / 1e6
        row["bf16_gb_s"] = 2 * n * k / row["bf16_ms"] / 1e6
        print(json.dumps(row), flush=True)
        results.append(row)
    return results


def gated_ms(products: list, gated_layers: list, x) -> dict:
    """silu(gate) * up: the gated kernel's launch, and the product's then the activation's."""
    from llmkit.kernels import triton_elementwise

    fused = [lambda w=w: w.silu_mul(x) for w in gated_layers]
    apart = [lambda p=p: triton_elementwise.silu_mul(p()) for p in products]
    return {
        "llmkit_silu_fused_ms": graph_ms([fused[i % len(fused)] for i in range(CALLS)]),
        "llmkit_then_silu_ms": graph_ms([apart[i % len(apart)] for i in range(CALLS)]),
    }


def layer_ms(rows: int) -> dict:
    """One decoder layer's products at these shapes, its norms and residual adds inside
    them, and apart: the Triton add-and-norm before qkv and before gate_up (adding the
    previous layer's and the attention's outputs), as DecoderLayer runs either way. Then
    the fused layer with a stand-in for its attention (a sleep of ATTENTION_CYCLES, memory
    idle) between qkv and o_proj, qkv prefetching the first PREFETCH_MB megabytes of
    o_proj's and gate_up's weights into the L2 (DecoderLayer.prefetch), 0 for none."""
    from llmkit.kernels import triton_elementwise as te
    from llmkit.runtime.layers.norm import RMSNorm
    from llmkit.runtime.models.llama import after_attention

    copies = 3  # 3 layers of 4-bit weights: several times the L2
    qkv, o, down = (weights(*SHAPES[name], copies, 0) for name in ("qkv", "o", "down"))
    gate_up = weights(*SHAPES["gate_up"], copies, 0, gated=True)
    hidden = SHAPES["o"][0]
    norm = RMSNorm(torch.rand(hidden, device="cuda").bfloat16() + 0.5, 1e-5)
    residual = torch.randn(rows, hidden, device="cuda").bfloat16()
    attention = torch.randn(rows, hidden, device="cuda").bfloat16()  # the attention's output
    before = torch.randn(rows, hidden, device="cuda").bfloat16()  # the previous layer's

    def fused(i: int, prefetch=None, attend: bool = False) -> None:
        qkv[i].normed(residual, norm, prefetch)  # (its output would go to the attention)
        if attend:
            torch.cuda._sleep(ATTENTION_CYCLES)
        o[i].add_to(attention, residual)
        down[i].add_to(gate_up[i].normed(residual, norm), residual)

    def apart(i: int) -> None:
        qkv[i](te.add_rms_norm(residual, before, norm.weight, norm.eps))
        h = te.add_rms_norm(residual, o[i](attention), norm.weight, norm.eps)
        down[i](gate_up[i].silu_mul(h))

    if not all(layer.fuses for layer in qkv + o + down + gate_up):
        return {"layer_fused_ms": "unavailable: the kernels with norms or adds failed their check"}
    out = {
        "layer_fused_ms": graph_ms([lambda i=i: fused(i % copies) for i in range(CALLS)]),
        "layer_apart_ms": graph_ms([lambda i=i: apart(i % copies) for i in range(CALLS)]),
        "attention_stand_in_ms": graph_ms([lambda: torch.cuda._sleep(ATTENTION_CYCLES)] * CALLS),
    }
    for megabytes in PREFETCH_MB:
        regions = [after_attention(o[i], gate_up[i], megabytes * 2**20) for i in range(copies)]
        calls = [lambda i=i, r=regions: fused(i % copies, r[i % copies], True)
                 for i in range(CALLS)]  # fmt: skip
        out[f"layer_with_attention_prefetch_{megabytes}mb_ms"] = graph_ms(calls)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="1,2,4,8,16")
    parser.add_argument("--out", help="also write the rows here as JSON")
    args = parser.parse_args()
    from llmkit.kernels import cuda_int4

    rows = [int(r) for r in args.rows.split(",")]
    os.environ["LLMKIT_FUSED_NORMS"] = "1"  # the layer rows time both ways
    print(json.dumps({"gpu": torch.cuda.get_device_name()}), flush=True)
    results = [r for name, (n, k) in SHAPES.items() for r in measure(name, n, k, rows)]
    for r in rows:
        if r <= cuda_int4.FUSED_ROWS:
            results.append({"shape": "layer", "rows": r, **layer_ms(r)})
            print(json.dumps(results[-1]), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
