"""llmkit's CUDA 4-bit kernel for decode steps (kernels/cuda_int4.py): its weight layout
against an unpacker written from PTX's mma.m16n8k16 A-fragment table (on the CPU), and the
kernel against the float64 product of the same rounded operands (on a GPU)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from llmkit.errors import LlmkitError
from llmkit.kernels import cuda_int4
from llmkit.quant.calibration import CalibrationSpec
from llmkit.quant.options import options_for
from llmkit.quant.pipeline import quantize
from llmkit.runtime.engine import Engine, EngineConfig
from llmkit.runtime.layers.linear import Int4Linear
from tests.runtime_helpers import NEEDS_CUDA, random_prompts
from tests.test_runtime_engine import run_staggered
from tests.test_runtime_quantized import random_grouped


def unpack(tiles: torch.Tensor) -> torch.Tensor:
    """q [N, K] from the packed words, one nibble at a time. PTX's table for a .bf16 A
    fragment: lane l (group g = l // 4, t = l % 4) holds a0..a7, a_i at row g + 8 for
    i in (2, 3, 6, 7), else row g, and at the k that its B fragment's value i % 2 of
    register i // 4 has: 2t + (i % 2), plus 8 for i >= 4. Register r = i // 2 holds a_i
    in its half i % 2, at bits 4r + 16 (i % 2) of the lane's word. The kernel feeds lane t
    of the chunk's tile j the inputs 32 (j // 2) + 8t + 4 (j % 2) + 0..3 in that k order."""
    n_tiles, chunks = tiles.shape[:2]
    q = torch.zeros(n_tiles * 16, chunks * 64, dtype=torch.int64)
    words = tiles.to(torch.int64) & 0xFFFFFFFF
    for lane in range(32):
        g, t = divmod(lane, 4)
        for i in range(8):
            row = g + (8 if i in (2, 3, 6, 7) else 0)
            nibble = (words[:, :, lane, :] >> (4 * (i // 2) + 16 * (i % 2))) & 0xF
            for j in range(4):
                col = 32 * (j // 2) + 8 * t + 4 * (j % 2) + i % 2 + (2 if i >= 4 else 0)
                rows = torch.arange(n_tiles) * 16 + row
                cols = torch.arange(chunks) * 64 + col
                q[rows[:, None], cols[None, :]] = nibble[:, :, j]
    return q


def test_the_packed_words_hold_each_lanes_fragment():
    q = torch.randint(0, 16, (48, 192), generator=torch.Generator().manual_seed(0))
    tiles = cuda_int4.pack(q)
    assert tiles.shape == (3, 3, 32, 4) and tiles.dtype == torch.int32
    assert torch.equal(unpack(tiles), q)


@pytest.mark.parametrize("n", [16, 48, 28672])
def test_the_gated_order_pairs_each_gate_row_with_its_up_row(n):
    """Lane g of a block holds rows g and g + 8 of its 16: in the gated order, those must be
    gate row j and up row j of the block's gated output j = 8 block + g."""
    order = cuda_int4.gated_order(n).tolist()
    assert sorted(order) == list(range(n))
    for j in range(n // 2):
        block, g = divmod(j, 8)
        assert (order[16 * block + g], order[16 * block + 8 + g]) == (j, n // 2 + j)


def test_scales_pack_as_fp16_pairs_and_refuse_what_fp16_would_change():
    scales = torch.tensor([[0.5, 0.013], [2.0, 1e-3]])
    zeros = torch.tensor([[8.0, 0.0], [15.0, 3.0]])
    words = cuda_int4.pack_scales(scales, zeros)
    assert words.shape == (2, 2)  # [groups, outputs]
    low = (words & 0xFFFF).to(torch.int16).view(torch.float16).float()
    high = ((words >> 16) & 0xFFFF).to(torch.int16).view(torch.float16).float()
    assert torch.equal(low, scales.half().float().t())
    assert torch.equal(high, zeros.t())
    assert cuda_int4.pack_scales(torch.tensor([[1e-6]]), torch.tensor([[8.0]])) is None
    assert cuda_int4.pack_scales(torch.tensor([[0.5]]), torch.tensor([[7.3]])) is None


def test_the_cpu_builds_no_decode_copy():
    module = Int4Linear.build(random_grouped(64, 128, 32, False), None, torch.float32,
                              torch.device("cpu"))  # fmt: skip
    assert module is not None and module.decode_tiles is None


def _expected_and_packed(w, inputs: torch.Tensor, gated: bool) -> tuple:
    """(the float64 product of `inputs` and w, or silu(gate) * up of it, on the CPU; w's
    tiles and scales on CUDA, its rows in gated_order where `gated`)."""
    # the kernel's fp16 scales; each dequantized value (11 by 4 bits) is exact in float32
    rounded = dataclasses.replace(w, scales=w.scales.half().float())
    expected = inputs @ rounded.dequantize().double().t()
    if gated:
        gate, up = expected.chunk(2, dim=-1)
        expected = torch.nn.functional.silu(gate) * up
        order = cuda_int4.gated_order(w.q.shape[0])
        w = dataclasses.replace(w, q=w.q[order], scales=w.scales[order], zeros=w.zeros[order])
    tiles = cuda_int4.pack(w.q.to("cuda", torch.uint8))
    return expected, tiles, cuda_int4.pack_scales(w.scales, w.zeros).cuda()


@NEEDS_CUDA
@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("rows", [1, 2, 3, 8, 9, 16])
@pytest.mark.parametrize(
    ("n", "k", "group"), [(48, 192, 32), (64, 1024, 128), (32, 384, 96), (32, 4224, 128)]
)
def test_the_cuda_kernel_equals_the_float64_product(rows, n, k, group, gated):
    """The product, or silu(gate) * up of it as a [gate; up] pair packed in gated_order; the
    last weight's 66 chunks of 64 inputs give each of 8 warps the UNROLL (4) chunks its main
    loop takes at once, twice, as a model's layers do (the others, fewer than 4)."""
    w = random_grouped(n, k, group, act_order=False, seed=rows)
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(rows)).bfloat16()
    expected, tiles, words = _expected_and_packed(w, x.double(), gated)
    got = cuda_int4.matmul(x.cuda(), tiles, words, group, gated=gated).double().cpu()
    # bf16 outputs: each within half a bf16 step of its value, sums in float32 before that
    # (and silu's fast exponential, a few float32 steps off)
    assert torch.allclose(got, expected, rtol=2**-8, atol=1e-4 * float(expected.abs().max()))


@NEEDS_CUDA
@pytest.mark.parametrize("kind", ["norm", "gated norm", "add"])
@pytest.mark.parametrize("rows", [1, 3, 8])
@pytest.mark.parametrize(("n", "k", "group"), [(48, 192, 32), (64, 1024, 128)])
def test_a_product_with_a_norm_or_an_add_equals_the_float64_one(rows, n, k, group, kind):
    """A norm before the product (of the residual stream's rows normed, rounded as the norm
    kernels round: the rows times their 1 / rms in float32 to bf16, times the weight to bf16),
    or silu(gate) * up of it; or the product added to the residual stream in place."""
    g = torch.Generator().manual_seed(rows + n)
    w = random_grouped(n, k, group, act_order=False, seed=rows)
    x = (torch.randn(rows, k, generator=g) * 3).bfloat16()
    weight = (torch.rand(k, generator=g) + 0.5).bfloat16()
    inputs = x.double()
    if kind != "add":
        h = x.float()
        normed = (h / torch.sqrt(h.square().mean(-1, keepdim=True) + 1e-6)).bfloat16()
        inputs = (normed.float() * weight.float()).bfloat16().double()
    expected, tiles, words = _expected_and_packed(w, inputs, kind == "gated norm")
    if kind == "add":
        residual = torch.randn(rows, n, generator=g).bfloat16()
        into = residual.cuda()
        got = cuda_int4.matmul(x.cuda(), tiles, words, group, into=into)
        assert got is into
        # the product rounded to bf16 (as the plain layer's output), then the sum: within
        # half a bf16 step of each (float32 sums before the first)
        want = expected + residual.double()
        bound = 2**-8 * (expected.abs() + want.abs()) + 1e-5 * float(want.abs().max())
        assert ((got.double().cpu() - want).abs() <= bound).all()
        return
    norm = (weight.cuda(), 1e-6)
    got = cuda_int4.matmul(x.cuda(), tiles, words, group, gated=kind != "norm", norm=norm)
    # a normed input a float32 step off its reference may round to the next bf16 value
    atol = 1e-3 * float(expected.abs().max())
    assert torch.allclose(got.double().cpu(), expected, rtol=2**-7, atol=atol)


@NEEDS_CUDA
@pytest.mark.parametrize("kind", ["plain", "norm", "gated norm"])
def test_a_product_that_prefetches_gives_the_bits_of_one_that_does_not(kind):
    """Prefetching regions into the L2 (a layer's next weights, several, larger than the
    product's own and of every size) changes no output bit."""
    w = random_grouped(64, 1024, 128, act_order=False, seed=4)
    x = torch.randn(3, 1024).bfloat16().cuda()
    _, tiles, words = _expected_and_packed(w, x.double().cpu(), kind == "gated norm")
    others = [torch.randn(n, device="cuda") for n in (5, 1000, 3 * 2**20 + 7)]
    regions = cuda_int4.prefetch_regions([tiles, *others], 2**30)
    norm = None if kind == "plain" else (torch.rand(1024).bfloat16().cuda() + 0.5, 1e-6)
    gated = kind == "gated norm"
    plain = cuda_int4.matmul(x, tiles, words, 128, gated=gated, norm=norm)
    prefetched = cuda_int4.matmul(x, tiles, words, 128, gated=gated, norm=norm, prefetch=regions)
    assert torch.equal(plain, prefetched)


def packed(n: int, k: int, seed: int, device="cuda"):
    """A random 4-bit weight [n, k] (groups of 128) as the kernels take it: (tiles, scales)."""
    w = random_grouped(n, k, 128, act_order=False, seed=seed)
    q = w.q.to(device, torch.uint8)
    return cuda_int4.pack(q), cuda_int4.pack_scales(w.scales, w.zeros).to(device)


@NEEDS_CUDA
def test_a_dependent_launch_reads_what_the_product_before_it_wrote():
    """Each product may start while the one before it runs (a programmatic dependent launch;
    the first lets its dependents start at once): the second of two chained products must
    still read the first's output, not what that memory held before. The inputs alternate,
    so a stale read gives the other input's result; eagerly and replayed from a graph."""
    first, second = (*packed(8192, 1024, 0), 128), (*packed(64, 8192, 1), 128)
    inputs = [torch.randn(2, 1024, generator=torch.Generator().manual_seed(i)).bfloat16().cuda()
              for i in range(2)]  # fmt: skip

    def chained(x):
        return cuda_int4.matmul(cuda_int4.matmul(x, *first), *second)

    expected = []
    for x in inputs:
        middle = cuda_int4.matmul(x, *first)
        torch.cuda.synchronize()
        expected.append(cuda_int4.matmul(middle, *second))
    torch.cuda.synchronize()
    eager = [chained(inputs[i % 2]) for i in range(40)]
    static = inputs[0].clone()
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        chained(static)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = chained(static)
    replayed = []
    for i in range(40):
        static.copy_(inputs[i % 2])
        graph.replay()
        replayed.append(out.clone())
    for i, (a, b) in enumerate(zip(eager, replayed, strict=True)):
        assert torch.equal(a, expected[i % 2]) and torch.equal(b, expected[i % 2]), i


@NEEDS_CUDA
@pytest.mark.parametrize("act_order", [False, True])
def test_cuda_decode_rows_take_llmkits_kernel_and_prefills_tinygemm(act_order):
    w = random_grouped(64, 1024, 128, act_order)
    module = Int4Linear.build(w, None, torch.bfloat16, torch.device("cuda"))
    assert module.decode_tiles is not None and not module.gated
    assert len(module.variants) == 2 and set(module.variants) <= set(cuda_int4.VARIANTS)
    x = torch.randn(20, 1024, generator=torch.Generator().manual_seed(2)).bfloat16()
    expected = x.float() @ w.dequantize().t()
    for rows in (1, 4, 8, 12, 16, 20):  # 20: more than the kernel takes, so tinygemm's
        got = module(x[:rows].cuda()).float().cpu()
        error = float((got - expected[:rows]).abs().max() / expected[:rows].abs().max())
        assert error < 5e-3, (rows, error)


@NEEDS_CUDA
@pytest.mark.parametrize("act_order", [False, True])
def test_a_gated_cuda_pair_gives_silu_gate_times_up_in_one_launch(act_order):
    w = random_grouped(64, 1024, 128, act_order, seed=4)
    module = Int4Linear.build(w, None, torch.bfloat16, torch.device("cuda"), gated=True)
    assert module.gated
    x = torch.randn(20, 1024, generator=torch.Generator().manual_seed(2)).bfloat16()
    gate, up = (x.float() @ w.dequantize().t()).chunk(2, dim=-1)
    expected = torch.nn.functional.silu(gate) * up
    for rows in (1, 5, 16):
        got = module.silu_mul(x[:rows].cuda()).float().cpu()
        error = float((got - expected[:rows]).abs().max() / expected[:rows].abs().max())
        assert error < 5e-3, (rows, error)
    assert module.silu_mul(x.cuda()) is None  # 20 rows: tinygemm's product, then silu * up
    plain = module(x[:3].cuda()).float().cpu()  # the product itself, in its own order
    full = x[:3].float() @ w.dequantize().t()
    assert float((plain - full).abs().max() / full.abs().max()) < 5e-3


@NEEDS_CUDA
def test_int4_decode_with_cuda_graphs_equals_eager_mode(tiny_dir, tmp_path):
    """A GPTQ checkpoint decoding batches of 1 to 12 sequences (llmkit's kernel, one or two
    tiles of 8 rows): the graphs' tokens (rows padded to a bucket) equal eager mode's.
    float32 activations, as the graphs test of test_cuda.py: in bf16 the two modes' attention
    splits its sums differently, and a near tie can go the other way."""
    out = tmp_path / "gptq"
    calibration = CalibrationSpec(num_samples=8, seq_len=64)
    options = options_for("gptq", group_size=32)
    quantize(tiny_dir("tiny-llama"), out, "gptq", options=options, calibration=calibration,
             device="cuda")  # fmt: skip
    prompts = random_prompts(12, 3, 60, seed=5)
    runs = {}
    for eager in (False, True):
        config = EngineConfig(device="cuda", dtype="float32", enforce_eager=eager)
        engine = Engine(out, config)
        try:
            mlp = engine.executor.runner.model.layers[0].mlp
            assert mlp.down.decode_tiles is not None and mlp.gate_up.gated
            runs[eager] = run_staggered(engine, prompts)
        finally:
            engine.close()
    assert runs[False] == runs[True]


def test_the_variant_is_the_one_whose_blocks_take_fewest_waves(monkeypatch):
    """132 SMs holding, for up to 8 rows (and more), 2 (2) blocks of the default variant's
    kernel, 3 (2) of (8, 2)'s and 4 (3) of (4, 4)'s, as ptxas's register counts for sm_90
    give: 384 blocks take 2, 1 or 1 waves (2, 2 or 1), 256 take 1 whichever (the default
    then), 1792 take 7, 5 or 4 (7, 7 or 5); a variant that does not load is never chosen."""
    from llmkit.kernels.cuda_rtc import CudaError

    per_sm = {((8, 4), False): 2, ((8, 2), False): 3, ((4, 4), False): 4,
              ((8, 4), True): 2, ((8, 2), True): 2, ((4, 4), True): 3}  # fmt: skip

    class Module:
        def __init__(self, variant):
            self.variant = variant

        def blocks_per_sm(self, kernel, block):
            assert block == 32 * self.variant[0] and kernel.endswith(("_m1", "_m2"))
            return per_sm[self.variant, kernel.endswith("_m2")]

    class Properties:
        multi_processor_count = 132

    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: Properties)
    monkeypatch.setattr(cuda_int4, "kernels", lambda device, variant: Module(variant))
    device = torch.device("cuda", 0)
    assert cuda_int4.variants_for(384 * 16, 128, False, device) == ((8, 2), (4, 4))
    assert cuda_int4.variants_for(256 * 16, 128, True, device) == ((8, 4), (8, 4))
    assert cuda_int4.variants_for(1792 * 16, 32, False, device) == ((4, 4), (4, 4))

    def refuse(device, variant):
        if variant != (8, 4):
            raise CudaError("no")
        return Module(variant)

    monkeypatch.setattr(cuda_int4, "kernels", refuse)
    assert cuda_int4.variants_for(384 * 16, 128, False, device) == ((8, 4), (8, 4))


def test_a_pipelined_twin_is_chosen_where_it_is_timed_faster_once_per_shape(monkeypatch):
    """Each variant against its twin with PIPELINE, timed once per weight shape, variant and
    rows: the twin where it takes under PIPELINED_GAIN of the time, else the variant, and
    the variant where the twin does not load."""
    from llmkit.kernels.cuda_rtc import CudaError

    speed = {(8, 4): 1.0, (8, 4, 1): 0.9, (8, 2): 1.0, (8, 2, 1): 0.99, (4, 4): 1.0}
    timed = []

    def kernels(device, variant):
        if variant not in speed:
            raise CudaError("no twin")

    def times(variants, args, gated):
        timed.append((variants, args[0].shape[0], gated))
        return {v: speed[v] for v in variants}

    monkeypatch.setattr(cuda_int4, "kernels", kernels)
    monkeypatch.setattr(cuda_int4, "_times", times)
    monkeypatch.setattr(cuda_int4, "_FASTER", {})
    tiles, scales = torch.zeros(4, 2, 32, 4, dtype=torch.int32), torch.zeros(1, 64)
    for _ in range(2):
        chosen = cuda_int4.timed_variants(tiles, scales, 128, False, ((8, 4), (8, 2)))
        assert chosen == ((8, 4, 1), (8, 2))  # 0.99 is within the noise
    assert timed == [(((8, 4), (8, 4, 1)), 1, False), (((8, 2), (8, 2, 1)), 16, False)]
    assert cuda_int4.timed_variants(tiles, scales, 128, True, ((4, 4), (4, 4))) == ((4, 4),) * 2
    assert len(timed) == 2  # (4, 4)'s twin does not load: nothing timed
    wider = torch.zeros(8, 2, 32, 4, dtype=torch.int32)
    cuda_int4.timed_variants(wider, scales, 128, False, ((8, 4), (8, 2)))
    assert len(timed) == 4  # another shape: timed again

    def fail(variants, args, gated):
        raise RuntimeError("no timer")

    monkeypatch.setattr(cuda_int4, "_times", fail)
    with pytest.warns(UserWarning, match="could not time"):
        chosen = cuda_int4.timed_variants(wider, scales, 32, False, ((8, 4), (8, 2)))
    assert chosen == ((8, 4), (8, 2))  # untimed: the variants as chosen


@NEEDS_CUDA
@pytest.mark.parametrize("gated", [False, True])
def test_a_pipelined_twin_gives_the_bits_of_its_variant(gated):
    """PIPELINE changes only when a lane loads its weights: every product, norm and add of
    a twin equals its variant's bit for bit, whichever the timing chooses. 66 chunks of 64
    inputs: every variant's warps load ahead at least once (a warp needs twice its UNROLL
    chunks), as a model's layers do."""
    n, k, group = 64, 4224, 128
    w = random_grouped(n, k, group, act_order=False, seed=3)
    _, tiles, words = _expected_and_packed(w, torch.zeros(1, k, dtype=torch.float64), gated)
    g = torch.Generator().manual_seed(3)
    for variant in cuda_int4.VARIANTS:
        chosen = cuda_int4.timed_variants(tiles, words, group, gated, (variant, variant))
        assert all(c in (variant, (*variant, 1)) for c in chosen)
        for rows in (1, 8, 16):
            x = torch.randn(rows, k, generator=g).bfloat16().cuda()
            base, twin = (cuda_int4.matmul(x, tiles, words, group, v, gated)
                          for v in (variant, (*variant, 1)))  # fmt: skip
            assert torch.equal(base, twin), (variant, rows)
        if not gated:
            norm = (torch.rand(k, generator=g).bfloat16().cuda() + 0.5, 1e-5)
            x = torch.randn(8, k, generator=g).bfloat16().cuda()
            normed = [cuda_int4.matmul(x, tiles, words, group, v, norm=norm)
                      for v in (variant, (*variant, 1))]  # fmt: skip
            assert torch.equal(*normed), variant
            into = [x[:, :n].contiguous() for _ in range(2)]
            for v, y in zip((variant, (*variant, 1)), into, strict=True):
                cuda_int4.matmul(x, tiles, words, group, v, into=y)
            assert torch.equal(*into), variant


@pytest.mark.parametrize("served", [False, True])
def test_the_loader_asks_for_the_gated_layout_for_gate_up_only(tiny_dir, monkeypatch, served):
    """Only the MLP's merged gate/up may be built gated, and not where LoRA adapters are
    served (a wrapper adds to gate and up before the activation)."""
    from llmkit.checkpoint.rank_tensors import open_rank
    from llmkit.runtime import loader
    from llmkit.runtime.distributed import Group
    from llmkit.runtime.lora import LoraContext

    asked = []
    real = loader.convert_for_runtime

    def convert(weight, bias, dtype, device, exact=False, gated=False):
        asked.append((tuple(weight.weight.shape), gated))
        return real(weight, bias, dtype, device, exact, gated)

    monkeypatch.setattr(loader, "convert_for_runtime", convert)
    loras = LoraContext() if served else None
    src = open_rank(tiny_dir("tiny-llama"))
    loader.load_model(src, Group(), torch.float32, torch.device("cpu"), loras=loras)
    gated = {shape for shape, flag in asked if flag}
    assert gated == (set() if served else {(256, 64)})  # gate and up: 2 x 128 by 64


def test_a_kernel_that_cannot_load_is_tried_once(monkeypatch):
    """Every 4-bit (int8) layer of a model asks for the kernels: a failed compile is kept,
    not repeated per layer (its error raised again for each)."""
    from llmkit.kernels import cuda_int8, cuda_rtc

    tries = []

    def refuse(*args, **kwargs):
        tries.append(args)
        raise cuda_rtc.CudaError("no NVRTC here")

    monkeypatch.setattr(cuda_rtc, "Module", refuse)
    monkeypatch.setattr(cuda_rtc, "_CHECKED", {})
    for _ in range(3):
        for kernels in (cuda_int4.kernels, cuda_int8.kernels):
            with pytest.raises(cuda_rtc.CudaError, match="no NVRTC"):
                kernels(torch.device("cuda", 0))
    assert [name for _, name, *_ in tries] == ["cuda_int4.cu", "cuda_int8.cu"]


def test_compiled_cubins_are_kept_by_what_they_depend_on(monkeypatch, tmp_path):
    """A cubin compiled once is read back by the next process that asks for the same
    source, name, architecture, macros and NVRTC version, and compiled anew for any other;
    where the cache cannot be written, each is compiled and nothing is left behind."""
    from llmkit.kernels import cuda_rtc

    compiled, version = [], [(13, 0)]

    def compile_cubin(source, name, arch, defines=()):
        compiled.append((source, defines))
        return f"{source} {name} {arch} {defines} {version[0]}".encode()

    monkeypatch.setattr(cuda_rtc, "compile_cubin", compile_cubin)
    monkeypatch.setattr(cuda_rtc, "nvrtc_version", lambda: version[0])
    monkeypatch.setenv("LLMKIT_CACHE_DIR", str(tmp_path / "cache"))
    first = cuda_rtc.cached_cubin("src", "k.cu", (9, 0), ["A=1"])
    assert first[1] is False and cuda_rtc.cached_cubin("src", "k.cu", (9, 0), ["A=1"]) == (
        first[0],
        True,
    )
    assert len(compiled) == 1
    kept = list((tmp_path / "cache" / "cubin").iterdir())
    assert len(kept) == 1 and kept[0].read_bytes() == first[0]  # no partial file left
    for args in [("src", "k.cu", (9, 0), ["A=2"]), ("other", "k.cu", (9, 0), ["A=1"]),
                 ("src", "k.cu", (8, 0), ["A=1"])]:  # fmt: skip
        assert cuda_rtc.cached_cubin(*args)[1] is False
    version[0] = (13, 1)
    assert cuda_rtc.cached_cubin("src", "k.cu", (9, 0), ["A=1"])[1] is False
    assert len(compiled) == 5
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("LLMKIT_CACHE_DIR", str(tmp_path / "file"))  # a file, not a folder
    for _ in range(2):
        assert cuda_rtc.cached_cubin("src", "k.cu", (9, 0), ["A=1"])[1] is False
    assert len(compiled) == 7

    def unknown():
        raise cuda_rtc.CudaError("nvrtcVersion failed")

    monkeypatch.setattr(cuda_rtc, "nvrtc_version", unknown)  # nothing kept, nothing read
    monkeypatch.setenv("LLMKIT_CACHE_DIR", str(tmp_path / "cache"))
    assert cuda_rtc.cached_cubin("src", "k.cu", (9, 0), ["A=1"])[1] is False
    assert len(compiled) == 8


def test_a_kept_cubin_the_driver_refuses_is_compiled_again(monkeypatch, tmp_path):
    """A damaged cubin in the cache: the driver refuses it, so it is compiled again, loaded
    and kept in its place; a fresh one the driver refuses too is a CudaError."""
    from llmkit.kernels import cuda_rtc

    compiled = []

    def compile_cubin(source, name, arch, defines=()):
        compiled.append(source)
        return b"bad" if source == "refused" else b"good"

    loaded = []

    class Driver:
        def cuModuleLoadData(self, module, cubin):
            loaded.append(cubin)
            return 0 if cubin == b"good" else 200  # CUDA_ERROR_INVALID_IMAGE

        def cuGetErrorName(self, status, name):
            return 0

    monkeypatch.setattr(cuda_rtc, "compile_cubin", compile_cubin)
    monkeypatch.setattr(cuda_rtc, "nvrtc_version", lambda: (13, 0))
    monkeypatch.setenv("LLMKIT_CACHE_DIR", str(tmp_path))
    cuda_rtc.load_module(Driver(), "src", "k.cu", (9, 0))
    [kept] = (tmp_path / "cubin").iterdir()
    kept.write_bytes(b"damaged")
    cuda_rtc.load_module(Driver(), "src", "k.cu", (9, 0))
    assert loaded == [b"good", b"damaged", b"good"] and kept.read_bytes() == b"good"
    assert compiled == ["src", "src"]
    with pytest.raises(cuda_rtc.CudaError, match=r"loading k\.cu"):
        cuda_rtc.load_module(Driver(), "refused", "k.cu", (9, 0))


@pytest.mark.parametrize("programmatic", [False, True])
def test_a_dependent_launch_carries_the_programmatic_attribute(monkeypatch, programmatic):
    """cuda_rtc.Module.launch with dependent=True goes through cuLaunchKernelEx with one
    programmatic-serialization attribute where the device takes it, else cuLaunchKernel;
    the structures have cuda.h's layout (CUlaunchAttribute 72 bytes, its value at 8;
    CUlaunchConfig 56, the stream at 32); a tensor argument is passed as its data pointer,
    None as a null pointer, an int as a 32-bit int, a float as a 32-bit float. A fake
    driver records what it was given."""
    import ctypes

    from llmkit.kernels import cuda_rtc

    assert ctypes.sizeof(cuda_rtc.LaunchAttribute) == 72
    assert cuda_rtc.LaunchAttribute.value.offset == 8
    assert ctypes.sizeof(cuda_rtc.LaunchConfig) == 56
    assert (cuda_rtc.LaunchConfig.hStream.offset, cuda_rtc.LaunchConfig.numAttrs.offset) == (32, 48)
    calls, arguments = [], []

    def record(params):
        kinds = (ctypes.c_void_p, ctypes.c_int, ctypes.c_float, ctypes.c_void_p)
        arguments.append([ctypes.cast(params[i], ctypes.POINTER(kind)).contents.value
                          for i, kind in enumerate(kinds)])  # fmt: skip

    class Driver:
        def cuLaunchKernelEx(self, config, func, params, extra):
            attrs = [config.attrs[i] for i in range(config.numAttrs)]
            calls.append(("ex", config.gridDimX, config.blockDimX, config.hStream, func,
                          [(a.id, a.value[0]) for a in attrs]))  # fmt: skip
            record(params)
            return 0

        def cuLaunchKernel(self, func, gx, gy, gz, bx, by, bz, shared, stream, params, extra):
            calls.append(("plain", gx, bx, stream, func))
            record(params)
            return 0

    class Stream:
        cuda_stream = 77

    monkeypatch.setattr(torch.cuda, "current_stream", lambda device: Stream)
    module = cuda_rtc.Module.__new__(cuda_rtc.Module)
    module.device, module._lib, module._kernels = "cuda:0", Driver(), {"k": 5}
    module.programmatic = programmatic
    x = torch.zeros(4)
    module.launch("k", 12, 256, x, 3, 0.25, None, dependent=True)
    module.launch("k", 12, 256, x, 3, 0.25, None)
    if programmatic:
        assert calls[0] == ("ex", 12, 256, 77, 5, [(6, 1)])
    else:
        assert calls[0] == ("plain", 12, 256, 77, 5)
    assert calls[1] == ("plain", 12, 256, 77, 5)
    assert arguments == [[x.data_ptr(), 3, 0.25, None]] * 2


@pytest.mark.parametrize(
    ("capability", "driver", "expected"),
    [((9, 0), 12030, True), ((10, 0), 13000, True), ((8, 9), 13000, False),
     ((9, 0), 12020, False), ((9, 0), None, False)],
)  # fmt: skip
def test_programmatic_launches_need_hopper_and_a_cuda_12_3_driver(
    monkeypatch, capability, driver, expected
):
    """cuda_rtc's one answer for every kernel: compute capability 9.0+ and a driver that
    records programmatic launches in graphs (12.3+; None: no driver library)."""
    from llmkit.kernels import cuda_rtc

    def version():
        if driver is None:
            raise cuda_rtc.CudaError("none of libcuda.so.1, libcuda.so could be loaded")
        return driver

    monkeypatch.setattr(cuda_rtc, "driver_version", version)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device: capability)
    cuda_rtc.programmatic.cache_clear()
    try:
        assert cuda_rtc.programmatic(torch.device("cuda", 0)) is expected
    finally:
        cuda_rtc.programmatic.cache_clear()


class TorchFused(torch.nn.Module):
    """A Linear offering Int4Linear's entry points for a norm inside the product after it and
    a residual add inside the product before it, computed by torch: DecoderLayer's flow with
    its norms inside the products, on the CPU."""

    fuses, gated = True, False

    def __init__(self, inner: torch.nn.Module, calls: list[str]):
        super().__init__()
        self.inner, self.calls = inner, calls

    def forward(self, x):
        return self.inner(x)

    def normed(self, residual, norm, prefetch=None):
        assert residual.shape[0] <= cuda_int4.FUSED_ROWS
        self.calls.append("normed")
        if prefetch is not None:
            self.calls.append(prefetch)
        return self.inner(norm(residual))

    def add_to(self, x, residual):
        self.calls.append("add")
        residual.add_(self.inner(x))


def _generate(path, fusing: str) -> tuple[list, list[str]]:
    """(every sequence's tokens and log probabilities, the fused calls) of a bf16 engine
    on the CPU whose layers `fusing` ("none", "all", "first", "last") have TorchFused
    products."""
    from llmkit.runtime.engine import LLM
    from llmkit.runtime.sequence import SamplingParams

    prompts = random_prompts(12, 2, 12, seed=9)  # prefills of up to 8 tokens fuse, too
    params = [SamplingParams(max_tokens=3 + i % 7, temperature=0, ignore_eos=True, logprobs=2)
              for i in range(12)]  # fmt: skip
    llm = LLM(path, EngineConfig(device="cpu", dtype="bfloat16"))
    calls: list[str] = []
    try:
        layers = llm.engine.executor.runner.model.layers
        assert len(layers) >= 2 and not any(layer.fuses for layer in layers)
        chosen = {"none": [], "all": layers, "first": layers[:1], "last": layers[-1:]}[fusing]
        for layer in layers:
            layer.fused = None  # the Python layers (not the C++ one) in every run
        for i, layer in enumerate(chosen):
            attn, mlp = layer.attn, layer.mlp
            attn.qkv, attn.o_proj = TorchFused(attn.qkv, calls), TorchFused(attn.o_proj, calls)
            mlp.gate_up, mlp.down = TorchFused(mlp.gate_up, calls), TorchFused(mlp.down, calls)
            layer.fuses, layer.prefetch = True, f"regions {i}"
        outs = llm.generate(prompts, params)
    finally:
        llm.close()
    return [(c.token_ids, c.logprobs) for o in outs for c in o.outputs], calls


@pytest.mark.parametrize("fusing", ["all", "first", "last"])
def test_a_layer_with_its_norms_inside_its_products_computes_the_plain_layer(tiny_dir, fusing):
    """DecoderLayer.fuses: for up to FUSED_ROWS rows, a layer hands its norms and residual
    adds to its products and returns None for its output (added to the residual already),
    which the next layer, fused or not, and the final norm take. With products that compute
    what the plain layer computes, the tokens and log probabilities are the plain layer's,
    bit for bit, whichever layers fuse; steps of more rows run the plain layers."""
    got, calls = _generate(tiny_dir("tiny-llama"), fusing)
    assert calls and calls.count("normed") == calls.count("add")
    # each fused layer's q/k/v product (not its gate/up) takes the layer's prefetch, in order
    regions = [c for c in calls if c.startswith("regions")]
    assert len(regions) == calls.count("normed") // 2
    assert regions == sorted(set(regions)) * (len(regions) // len(set(regions)))
    assert got == _generate(tiny_dir("tiny-llama"), "none")[0]


@NEEDS_CUDA
def test_a_bf16_gptq_model_on_cuda_runs_its_norms_inside_its_products(
    tiny_dir, tmp_path, monkeypatch
):
    """With LLMKIT_FUSED_NORMS=1 every layer of a bf16 GPTQ model on CUDA fuses
    (Int4Linear.fuses), without it none does; the fused layers' logits for a prompt of at
    most FUSED_ROWS tokens are those of the same layers with their norms in launches of
    their own, up to the float32 order of the squares."""
    monkeypatch.delenv("LLMKIT_FUSED_NORMS", raising=False)
    assert not any(layer.fuses for layer in _bf16_gptq_runner(tiny_dir, tmp_path).model.layers)
    monkeypatch.setenv("LLMKIT_FUSED_NORMS", "1")
    runner = _bf16_gptq_runner(tiny_dir, tmp_path)
    layers = runner.model.layers
    assert all(layer.fuses for layer in layers)
    ids = random_prompts(1, cuda_int4.FUSED_ROWS, cuda_int4.FUSED_ROWS + 1, seed=2)
    fused = runner.window_logits(ids).float().cpu()
    for layer in layers:
        layer.fuses = False
    plain = runner.window_logits(ids).float().cpu()
    assert float((fused - plain).abs().max() / plain.abs().max()) < 2e-2


@NEEDS_CUDA
def test_layers_that_prefetch_give_the_logits_of_layers_that_do_not(
    tiny_dir, tmp_path, monkeypatch
):
    """With LLMKIT_L2_PREFETCH_MB, each fused layer's q/k/v product prefetches the weights
    after its attention (more megabytes than they hold: all of them); the logits keep
    every bit."""
    monkeypatch.setenv("LLMKIT_FUSED_NORMS", "1")
    ids = random_prompts(1, cuda_int4.FUSED_ROWS, cuda_int4.FUSED_ROWS + 1, seed=2)
    logits = {}
    for megabytes in ("0", "64"):
        monkeypatch.setenv("LLMKIT_L2_PREFETCH_MB", megabytes)
        runner = _bf16_gptq_runner(tiny_dir, tmp_path)
        prefetching = [layer.prefetch is not None for layer in runner.model.layers]
        assert prefetching == [megabytes != "0"] * len(prefetching)
        logits[megabytes] = runner.window_logits(ids).cpu()
    assert torch.equal(logits["0"], logits["64"])


def _bf16_gptq_runner(tiny_dir, tmp_path):
    """A bf16 ModelRunner on CUDA of tiny-llama quantized by GPTQ there (made once)."""
    from llmkit.runtime.distributed import Group
    from llmkit.runtime.model_runner import ModelRunner

    out = tmp_path / "gptq"
    if not (out / "config.json").is_file():
        calibration = CalibrationSpec(num_samples=8, seq_len=64)
        quantize(tiny_dir("tiny-llama"), out, "gptq", options=options_for("gptq", group_size=32),
                 calibration=calibration, device="cuda")  # fmt: skip
    return ModelRunner(str(out), Group(), torch.bfloat16, torch.device("cuda"), 8, 16)


def test_each_product_launches_its_kernel_with_the_arguments_in_the_sources_order():
    """The kernel a product takes (by group, rows, gated, norm or add), every one of them
    instantiated in the source, and the arguments every kernel takes in its order: x, the
    weight, the scales, y, rows, N, K, the group size, the norm's weight and epsilon;
    then the prefetch regions and their count (none: a null pointer and 0). Norms and
    adds take up to FUSED_ROWS rows and add only to a bf16 [rows, N] tensor."""
    import re

    source = cuda_int4.SOURCE.read_text()
    lines = re.findall(r"^KERNEL\((\w+), (\d), (\d),", source, re.M)
    made = {f"int4_{name}_fold{fold}_m{mt}" for name, fold, mt in lines}
    assert made == set(cuda_int4._KERNELS.values())
    launched = []

    class Module:
        def launch(self, kernel, grid, block, *args, dependent):
            launched.append((kernel, grid, block, args, dependent))

    tiles = torch.zeros(3, 4, 32, 4, dtype=torch.int32)  # N = 48, K = 256
    scales = torch.zeros(8, 48, dtype=torch.int32)
    x, weight = torch.zeros(2, 256, dtype=torch.bfloat16), torch.ones(256, dtype=torch.bfloat16)
    into = torch.zeros(2, 48, dtype=torch.bfloat16)
    out = cuda_int4._matmul(Module(), 8, x, tiles, scales, 32, False, norm=(weight, 1e-5))
    assert out.shape == (2, 48)
    kernel, grid, block, args, dependent = launched[-1]
    assert (kernel, grid, block, dependent) == ("int4_gemv_norm_fold2_m1", 3, 256, True)
    assert args[0] is x and args[1] is tiles and args[2] is scales and args[3] is out
    assert args[4:8] == (2, 48, 256, 32) and args[8] is weight and args[9] == 1e-5
    assert args[10] is None and args[11] == 0  # no prefetch
    regions = cuda_int4.prefetch_regions([tiles, scales], 2**20)
    cuda_int4._matmul(Module(), 8, x, tiles, scales, 32, False, prefetch=regions)
    assert launched[-1][3][10] is regions and launched[-1][3][11] == 2
    assert cuda_int4._matmul(Module(), 4, x, tiles, scales, 128, False, into=into) is into
    assert launched[-1][0] == "int4_gemv_add_fold4_m1" and launched[-1][2] == 128
    gated = cuda_int4._matmul(Module(), 8, x, tiles, scales, 64, True, (weight, 1e-5))
    assert gated.shape == (2, 24) and launched[-1][0] == "int4_silu_norm_fold4_m1"
    nine = torch.zeros(9, 256, dtype=torch.bfloat16)
    cuda_int4._matmul(Module(), 8, nine, tiles, scales, 32, False)
    kernel, _, _, args, _ = launched[-1]
    assert kernel == "int4_gemv_fold2_m2" and args[8] is nine and args[9] == 0.0
    with pytest.raises(ValueError, match="at most 8 rows"):
        cuda_int4._matmul(Module(), 8, nine, tiles, scales, 32, False, norm=(weight, 1e-5))
    with pytest.raises(ValueError, match=r"bf16 \[2, 48\]"):
        cuda_int4._matmul(Module(), 8, x, tiles, scales, 32, False, into=into.float())


def test_prefetch_regions_are_the_first_bytes_of_the_weights_in_order(monkeypatch):
    """A layer's prefetch (cuda_int4.prefetch_regions): the first LLMKIT_L2_PREFETCH_MB
    megabytes of its weights, in order, as (address, bytes) pairs; none at 0, unset or
    where the budget is spent; a value that is not megabytes from 0 to 1024 is refused."""
    a, b, c = torch.zeros(1000, dtype=torch.int32), torch.zeros(10), torch.zeros(5, 5)
    regions = cuda_int4.prefetch_regions([a, b, c], 4000 + 24)
    assert regions.dtype == torch.int64
    assert regions.tolist() == [[a.data_ptr(), 4000], [b.data_ptr(), 24]]
    assert cuda_int4.prefetch_regions([a, b, c], 10**6)[:, 1].tolist() == [4000, 40, 100]
    assert cuda_int4.prefetch_regions([a], 0) is None
    with pytest.raises(ValueError, match="contiguous"):
        cuda_int4.prefetch_regions([c.t()], 10)
    monkeypatch.delenv("LLMKIT_L2_PREFETCH_MB", raising=False)
    assert cuda_int4.l2_prefetch_bytes() == 0
    monkeypatch.setenv("LLMKIT_L2_PREFETCH_MB", "24.5")
    assert cuda_int4.l2_prefetch_bytes() == int(24.5 * 2**20)
    for bad in ("lots", "-1", "nan", "2000"):
        monkeypatch.setenv("LLMKIT_L2_PREFETCH_MB", bad)
        with pytest.raises(LlmkitError, match="LLMKIT_L2_PREFETCH_MB"):
            cuda_int4.l2_prefetch_bytes()


def test_layers_fold_their_norms_only_where_asked(monkeypatch):
    """cuda_int4.fused_norms: LLMKIT_FUSED_NORMS=1 folds, unset or 0 does not, anything
    else is refused in one line."""
    monkeypatch.delenv("LLMKIT_FUSED_NORMS", raising=False)
    assert cuda_int4.fused_norms() is False
    for text, expected in (("0", False), ("1", True)):
        monkeypatch.setenv("LLMKIT_FUSED_NORMS", text)
        assert cuda_int4.fused_norms() is expected
    for bad in ("yes", "true", "2", ""):
        monkeypatch.setenv("LLMKIT_FUSED_NORMS", bad)
        with pytest.raises(LlmkitError, match="LLMKIT_FUSED_NORMS"):
            cuda_int4.fused_norms()


def warp_chunks(warps: int, count: int) -> list[int]:
    """The chunks of 64 inputs each warp of a block takes of `count`, as cuda_int4.cu and
    cuda_int8.cu split a block's inputs: warp w those from w count / warps up to (w + 1)
    count / warps."""
    return [(w + 1) * count // warps - w * count // warps for w in range(warps)]


@pytest.mark.parametrize("variant", (*cuda_int4.VARIANTS, (8, 4, 1)))
def test_the_first_use_check_runs_every_warps_unrolled_loop(variant):
    """The check before layers use a variant's kernels multiplies weights whose every warp
    runs its unrolled loop more than once and its tail loop (as 8B's layers do), so a
    kernel whose unrolled loop multiplied the wrong weights after its first pass is caught
    there (test_cuda_emulated runs the check on such a kernel)."""
    warps, unroll = variant[:2]
    inputs = cuda_int4.check_inputs(variant)
    assert inputs % 128 == 0
    assert set(warp_chunks(warps, inputs // 64)) == {2 * unroll + 1}
