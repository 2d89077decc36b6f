"""llmkit's CUDA C++ kernels (cuda_int8.cu, cuda_int4.cu) run on the CPU by the emulator of
tests/cuda_emulator.py: each module's own first-use check (the one a GPU runs before layers
use the kernels) and products on shapes of other sizes, against the same references as the
GPU tests. The int4 kernels, which pass on real GPUs, pass here too, so the emulated PTX
behaves as the hardware does; mutants of the sources that read their fragments wrongly, or
whose unrolled loops multiply stale weights, fail the checks here. The launches' traces
show that every kernel reads each weight byte once, in whole 32-byte sectors, that the L2
prefetches fetch each line of their regions once, and that a kernel loads its first
weights before it waits for the kernel before it and touches nothing else until after:
what a bandwidth-bound product launched as a programmatic dependent needs, which no output
value shows. They also show each output written once (one added to the residual stream
read and then written by one thread); the emulator stops a write past an output and a read
past a tensor (one a value check cannot see, of values the kernel drops), and mutants
missing a __syncthreads fail its race check on shared memory."""

from __future__ import annotations

import pytest
import torch

from llmkit.kernels import cuda_int4, cuda_int8
from llmkit.kernels.cuda_rtc import CudaError
from tests.cuda_emulator import (
    LOAD,
    PREFETCH,
    READ,
    STREAMING,
    WRITE,
    EmulatedModule,
    EmulationError,
    before_wait,
    compiler,
    counts,
    prefetched,
    rewrite_asm,
    sector_use,
    touches,
    warp_loads,
)
from tests.test_cuda_int4 import packed
from tests.test_cuda_int8 import products

pytestmark = pytest.mark.skipif(compiler() is None, reason="needs a C++ compiler (g++ or $CXX)")
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return tmp_path_factory.mktemp("emulated")


def int8_module(built, path=cuda_int8.SOURCE):
    return EmulatedModule(path, cuda_int8.NAMES, cuda_int8.DEFINES, built)


def int4_module(built, variant, path=cuda_int4.SOURCE):
    return EmulatedModule(path, cuda_int4._KERNELS.values(), cuda_int4.defines(variant), built)


def test_asm_statements_become_calls_with_their_operands_numbered_as_in_the_asm():
    source = 'asm volatile("ld.v4 {%0, %1}, [%2];" : "=r"(v.x), "+f"(c[0]) : "l"(p));\n'
    source += 'asm("a %0;" ::"r"(f(1, 2)));  asm volatile("w;" ::: "memory");'
    assert rewrite_asm(source) == (
        "emu::ptx(\"ld.v4 {%0, %1}, [%2];\", {emu::out<'r'>(&(v.x), false), "
        "emu::out<'f'>(&(c[0]), true), emu::in<'l'>(p)});\n"
        'emu::ptx("a %0;", {emu::in<\'r\'>(f(1, 2))});  emu::ptx("w;", {});'
    )


def test_the_int8_kernels_pass_their_first_use_check(built):
    cuda_int8._check(int8_module(built), CPU)


@pytest.mark.parametrize("n, k", [(48, 320), (32, 4096), (16, 14336)])
def test_the_int8_kernels_give_their_references(built, n, k):
    """Weight-only within bf16's rounding of the float64 product, W8A8 the exact sums' bits,
    at 5 chunks of inputs for 8 warps (some have none), at 8 chunks each and at Llama-3-8B's
    MLP width (28 each)."""
    module = int8_module(built)
    for rows in (1, 7, 9, 16) if k < 1024 else (1, 16):
        q, scale, x, xq, x_scale = products(rows, n, k, rows + n + k)
        got = cuda_int8._launch(module, "int8_gemv", x, None, q, scale).double()
        want = cuda_int8.reference(x, q, scale)
        assert float((got - want).abs().max() / want.abs().max()) < 4e-3, rows
        got = cuda_int8._launch(module, "w8a8_gemv", xq, x_scale, q, scale)
        assert torch.equal(got, cuda_int8.w8a8_reference(xq, x_scale, q, scale)), rows


@pytest.mark.parametrize("variant", [*cuda_int4.VARIANTS, (8, 4, 1)], ids=str)
def test_the_int4_kernels_pass_their_first_use_checks(built, variant):
    """Every kernel of every variant the runtime chooses from (the pipelined twin too),
    with norms, residual adds and L2 prefetches."""
    cuda_int4._check(int4_module(built, variant), variant, CPU, ("", "norm", "add"),
                     prefetching=True)  # fmt: skip


def mutant(source, tmp_path, text: str, replacement: str):
    """A copy of the kernel source file `source` (under tmp_path, of the same name) whose
    one `text` is `replacement`."""
    original = source.read_text()
    assert original.count(text) == 1
    path = tmp_path / source.name
    path.write_text(original.replace(text, replacement))
    return path


@pytest.mark.parametrize("text, replacement, caught", [
    ("(wg, 0, 0x4140)", "(wg, 0, 0x4041)", "int8_gemv is off by"),  # a row's bytes 0, 1 swapped
    ("wg.x, w8.x, wg.y, w8.y", "wg.x, wg.y, w8.x, w8.y", "w8a8_gemv gives other values"),
])  # fmt: skip
def test_a_kernel_that_misreads_its_fragments_fails_its_check(built, tmp_path, text,
                                                              replacement, caught):  # fmt: skip
    path = mutant(cuda_int8.SOURCE, tmp_path, text, replacement)
    with pytest.raises(CudaError, match=caught):
        cuda_int8._check(int8_module(built, path), CPU)
    cuda_int8._check(int8_module(built), CPU)  # each library loaded runs its own kernels


# a broken unrolled loop: each pass after a warp's first multiplies the first's weights again
STALE = {0: ("if (c != begin) {", "if (false) {"), 1: ("words[u] = next[u];", ";")}


@pytest.mark.parametrize("variant", [None, *cuda_int4.VARIANTS, (8, 4, 1)], ids=str)
def test_the_first_use_checks_catch_a_stale_unrolled_loop(built, tmp_path, variant):
    """Each check's weights give every warp's unrolled loop more than one pass (cuda_int4.
    check_inputs), so kernels whose later passes multiply the first pass's weights fail it:
    the int8 kernels (variant None) and each int4 variant's, the pipelined one's too."""
    module = cuda_int8 if variant is None else cuda_int4
    pipeline = int(variant is not None and variant[2:] == (1,))
    path = mutant(module.SOURCE, tmp_path, *STALE[pipeline])
    with pytest.raises(CudaError, match="is off by"):
        if variant is None:
            cuda_int8._check(int8_module(built, path), CPU)
        else:
            cuda_int4._check(int4_module(built, variant, path), variant, CPU)


GUARDED = """
extern "C" __global__ void diverged(float* y) {
  float c[4] = {0, 0, 0, 0};
  if (threadIdx.x % 32 != 5) mma_bf16(c, 0, 0, 0, 0, 0, 0);
  y[threadIdx.x] = c[0];
}
extern "C" __global__ void stray(const uint4* w) { load_streaming(w + threadIdx.x); }
extern "C" __global__ void misaligned(const uint4* w) { *(const uint4*)((const char*)w + 4); }
extern "C" __global__ void unknown(u32* y) {
  asm("brev.b32 %0, %1;" : "=r"(*y) : "r"(*y));
}
extern "C" __global__ void scribble(u32* y) { y[threadIdx.x + 1] = 0; }
extern "C" __global__ void overread(u32* y) { y[threadIdx.x] = y[threadIdx.x + 1] + 1; }
extern "C" __global__ void unsynced(u32* y) {  // no barrier between a write and others' reads
  __shared__ u32 cell[32];
  cell[threadIdx.x] = threadIdx.x;
  y[threadIdx.x] = threadIdx.x ? cell[threadIdx.x - 1] : 0;
}
extern "C" __global__ void unwritten(u32* y) {
  __shared__ u32 cell[64];
  cell[threadIdx.x] = 1;
  __syncthreads();
  y[threadIdx.x] = cell[threadIdx.x + 32];
}
extern "C" __global__ void overwritten(u32* y) {  // no barrier between reads and a write (here
  // thread 31, the last to reach the barrier, goes on first)
  __shared__ u32 cell[32];
  cell[threadIdx.x] = 1;
  __syncthreads();
  y[threadIdx.x] = cell[(threadIdx.x + 1) % 32];
  cell[threadIdx.x] = 2;
}
extern "C" __global__ void synced(u32* y) {
  __shared__ u32 cell[32];
  cell[threadIdx.x] = blockIdx.x * 32 + threadIdx.x;
  __syncthreads();
  y[blockIdx.x * 32 + threadIdx.x] = cell[threadIdx.x ^ 1];
}
"""


def guarded_module(built, tmp_path):
    path = tmp_path / "guarded.cu"
    path.write_text(GUARDED)
    names = ["diverged", "stray", "misaligned", "unknown", "scribble", "overread", "unsynced",
             "unwritten", "overwritten", "synced"]  # fmt: skip
    return EmulatedModule(path, names, (), built)


@pytest.mark.parametrize("kernel, error", [
    ("diverged", "threads wait at a barrier or warp-wide instruction that others never reach"),
    ("stray", "reads outside the launch's tensors"),
    ("misaligned", "a 16-byte load at an address that is not 16-byte aligned"),
    ("unknown", "does not know the instruction brev.b32"),
    ("scribble", "a write outside the launch's tensors"),
    ("overread", "a read outside the launch's tensors"),
    ("unsynced", "thread 1 of block 0 reads shared memory thread 0 wrote since the last "
                 "__syncthreads"),
    ("unwritten", "a read of shared memory no thread of its block wrote"),
    ("overwritten", "thread 0 of block 0 writes shared memory thread 31 read since the last "
                    "__syncthreads"),
])  # fmt: skip
def test_the_emulator_refuses_what_a_gpu_would_not_run_as_written(built, tmp_path, kernel,
                                                                  error):  # fmt: skip
    """Lanes that leave a warp-wide mma, a load past a tensor's end or at an address a GPU
    faults at, an instruction it does not emulate, a read or write past a tensor's end
    (stopped before it is made), a race on shared memory or a read of shared memory the
    block never wrote: each an error, not a value."""
    module = guarded_module(built, tmp_path)
    buffer = torch.zeros(33, dtype=torch.int32 if kernel != "diverged" else torch.float32)
    y = buffer[:32]  # (stray: 32 lanes read 512 bytes of y's 128; scribble writes buffer[32],
    # overread reads it)
    with pytest.raises(EmulationError, match=error):
        module.launch(kernel, 1, 32, y)
    assert int(buffer[32]) == 0


def test_shared_memory_ordered_by_a_barrier_passes_the_race_check(built, tmp_path):
    """Each block's threads write shared memory, pass a __syncthreads and read each other's:
    no error, in the second block as in the first."""
    y = torch.zeros(64, dtype=torch.int32)
    guarded_module(built, tmp_path).launch("synced", 2, 32, y)
    assert y.tolist() == [i ^ 1 for i in range(64)]


# the barriers that order a block's shared memory: before warp 0 adds up the warps' sums
# (int8 and int4), and before the warps add up the norm's sums of squares (int4)
BARRIERS = {
    "sums": ("  __syncthreads();\n  if (warp != 0) return;", "  if (warp != 0) return;"),
    "squares": ("  __syncthreads();\n  float total = 0.f;", "  float total = 0.f;"),
}


@pytest.mark.parametrize("source, barrier", [("int8", "sums"), ("int4", "sums"),
                                             ("int4", "squares")])  # fmt: skip
def test_a_kernel_missing_a_barrier_fails_the_race_check(built, tmp_path, source, barrier):
    """Mutants without one of the kernels' __syncthreads: threads read shared memory other
    threads write before the barrier would have ordered them, which the emulator stops,
    naming the access. (Their values come out wrong here too, but only through the order
    the emulator runs threads in, which a GPU need not share; the race check does not
    depend on it.)"""
    if source == "int8":
        module = int8_module(built, mutant(cuda_int8.SOURCE, tmp_path, *BARRIERS[barrier]))
        q, scale, x, _, _ = products(1, 32, 1024, 6)
        with pytest.raises(EmulationError, match="shared memory"):
            cuda_int8._launch(module, "int8_gemv", x, None, q, scale)
        return
    module = int4_module(built, (8, 4), mutant(cuda_int4.SOURCE, tmp_path, *BARRIERS[barrier]))
    tiles, words = packed(32, 1024, 6, CPU)
    norm = (torch.ones(1024, dtype=torch.bfloat16), 1e-5)
    with pytest.raises(EmulationError, match="shared memory"):
        cuda_int4._matmul(module, 8, torch.randn(1, 1024).bfloat16(), tiles, words, 128, False,
                          norm)  # fmt: skip


def assert_weights_read_once_in_whole_sectors(module, weight: torch.Tensor):
    """The last launch of `module` read every 16 bytes of `weight` exactly once, and
    nothing else, with streaming loads of 32 lanes a warp that use every sector they touch."""
    trace = module.trace()
    assert counts(trace, STREAMING, weight).unique().tolist() == [1]
    assert int((trace[:, 3] == STREAMING).sum()) * 16 == weight.numel() * weight.element_size()
    instructions = warp_loads(trace, STREAMING)
    assert {len(i) for i in instructions} == {32}
    assert min(sector_use(i) for i in instructions) == 1.0


TRAFFIC = """
extern "C" __global__ void early(u32* y) {
  y[threadIdx.x] += 1;
  wait_for_inputs();
  y[threadIdx.x ^ 1] += 1;
}
extern "C" __global__ void coalesced(const uint4* w) { load_streaming(w + threadIdx.x); }
extern "C" __global__ void swapped(const uint4* w) { load_streaming(w + (threadIdx.x ^ 1)); }
extern "C" __global__ void halves(const uint4* w) { load_streaming(w + 2 * threadIdx.x); }
extern "C" __global__ void twice(const uint4* w) {
  load_streaming(w + threadIdx.x);
  load_streaming(w + threadIdx.x);
}
"""


def traffic_module(built, tmp_path):
    path = tmp_path / "traffic.cu"
    path.write_text(TRAFFIC)
    return EmulatedModule(path, ["coalesced", "swapped", "halves", "twice", "early"], (), built)


def test_the_traffic_checks_tell_whole_sectors_from_wasted_ones(built, tmp_path):
    """On kernels written for it: a warp's 32 lanes reading 512 contiguous bytes (in any
    order of lanes) use their 16 sectors whole; lanes 32 bytes apart use half of each
    sector; a second read of the same bytes is counted."""
    module = traffic_module(built, tmp_path)
    w = torch.zeros(64, 4, dtype=torch.int32)  # 1024 bytes
    for kernel, use, times in [("coalesced", 1.0, [1, 0]), ("swapped", 1.0, [1, 0]),
                                ("halves", 0.5, [1, 0]), ("twice", 1.0, [2, 0])]:  # fmt: skip
        module.launch(kernel, 1, 32, w)
        trace = module.trace()
        instructions = warp_loads(trace, STREAMING)
        assert [sector_use(i) for i in instructions] == [use] * len(instructions), kernel
        assert counts(trace, STREAMING, w)[[0, 63]].tolist() == times, kernel


def test_the_order_checks_see_each_read_and_write_and_its_thread(built, tmp_path):
    """On a kernel written for it, whose threads each add 1 to their element of y before they
    wait and to their neighbour's after: one read and one write of each thread's before the
    wait, and each element read and written by two threads, as made (here thread 4 runs to
    its end before thread 5 starts: nothing makes it wait)."""
    module = traffic_module(built, tmp_path)
    y = torch.zeros(32, dtype=torch.int32)
    module.launch("early", 1, 32, y)
    trace = module.trace()
    assert y.tolist() == [2] * 32
    assert [set(before_wait(trace, kind).values()) for kind in (READ, WRITE)] == [{1}, {1}]
    made = touches(trace, y)
    assert made[5] == [(0, 4, READ), (0, 4, WRITE), (0, 5, READ), (0, 5, WRITE)]
    assert trace[trace[:, 3] == WRITE, 4].unique().tolist() == [4]


@pytest.mark.parametrize("n, k", [(48, 320), (32, 4096)])
def test_the_int8_kernels_read_each_weight_byte_once_in_whole_sectors(built, n, k):
    """Both products, one tile of rows and two, where some warps have no chunk of the
    inputs and where each has several."""
    module = int8_module(built)
    for rows in (1, 16):
        q, scale, x, xq, x_scale = products(rows, n, k, rows + n + k)
        cuda_int8._launch(module, "int8_gemv", x, None, q, scale)
        assert_weights_read_once_in_whole_sectors(module, q)
        cuda_int8._launch(module, "w8a8_gemv", xq, x_scale, q, scale)
        assert_weights_read_once_in_whole_sectors(module, q)


@pytest.mark.parametrize("variant", [*cuda_int4.VARIANTS, (8, 4, 1)], ids=str)
def test_the_int4_kernels_read_weights_once_and_prefetch_each_line_once(built, variant):
    """Plain, two-tile, gated and normed products of every variant read their weights once
    in whole sectors; a normed one prefetching two regions, one starting inside a cache
    line, fetches each line of each once, and no other."""
    module = int4_module(built, variant)
    tiles, words = packed(64, 4096, 0, CPU)
    # the second region starts 80 bytes into a line, its 2900 bytes end in a 24th line
    big, small = torch.zeros(100_000, dtype=torch.uint8), torch.zeros(3200, dtype=torch.uint8)
    skip = (80 - small.data_ptr()) % 128
    regions = [big, small[skip : skip + 2900]]
    norm = (torch.ones(4096, dtype=torch.bfloat16), 1e-5)
    for rows, gated, normed in ((1, False, False), (16, False, False), (3, True, False),
                                (1, False, True)):  # fmt: skip
        x = torch.randn(rows, 4096).bfloat16()
        prefetch = cuda_int4.prefetch_regions(regions, 2**20) if normed else None
        cuda_int4._matmul(module, variant[0], x, tiles, words, 128, gated,
                          norm if normed else None, prefetch=prefetch)  # fmt: skip
        assert_weights_read_once_in_whole_sectors(module, tiles)
    trace = module.trace()
    lines = [prefetched(trace, r.data_ptr(), r.numel()) for r in regions]
    assert [line.unique().tolist() for line in lines] == [[1], [1]]
    assert int((trace[:, 3] == PREFETCH).sum()) == sum(len(line) for line in lines)


@pytest.mark.parametrize("variant", [None, (8, 4)], ids=str)
def test_a_kernel_loading_its_first_weights_again_fails_the_traffic_check(built, tmp_path,
                                                                         variant):  # fmt: skip
    """A mutant whose loop loads the chunks it loaded before waiting for its inputs again
    computes the same values (its first-use check passes) but reads those weights twice."""
    source = cuda_int8.SOURCE if variant is None else cuda_int4.SOURCE
    path = mutant(source, tmp_path, "if (c != begin) {", "if (true) {")
    if variant is None:
        module = int8_module(built, path)
        cuda_int8._check(module, CPU)
        q, scale, x, _, _ = products(1, 32, 4096, 1)
        cuda_int8._launch(module, "int8_gemv", x, None, q, scale)
        weight = q
    else:
        module = int4_module(built, variant, path)
        cuda_int4._check(module, variant, CPU)
        weight, words = packed(32, 4096, 1, CPU)
        x = torch.randn(1, 4096).bfloat16()
        cuda_int4._matmul(module, variant[0], x, weight, words, 128, False)
    with pytest.raises(AssertionError):
        assert_weights_read_once_in_whole_sectors(module, weight)
    assert counts(module.trace(), STREAMING, weight).max() == 2


def assert_overlapped_safely(module, threads: int, first: int):
    """In the last launch of `module`, each of its `threads` threads made `first` streaming
    loads (its first weights) before its griddepcontrol.wait, and no other access of the
    launch's tensors: no other load, read or write."""
    trace = module.trace()
    weights = before_wait(trace, STREAMING)
    assert len(weights) == threads and set(weights.values()) == {first}
    for kind in (LOAD, READ, WRITE, PREFETCH):
        assert set(before_wait(trace, kind).values()) == {0}, kind


# the norm's reads of the activations (the residual stream) moved before the wait
NORM = ("  if (KIND == NORM) inv[0] = inverse_rms(x, rows, g < rows ? g : 0, K, begin << 6, "
        "end << 6, eps);\n")  # fmt: skip
EARLY = ("  wait_for_inputs();\n  float inv[MT] = {};\n" + NORM,
         "  float inv[MT] = {};\n" + NORM + "  wait_for_inputs();\n")  # fmt: skip


@pytest.mark.parametrize("variant", [None, *cuda_int4.VARIANTS, (8, 4, 1), "early"], ids=str)
def test_first_weights_load_before_the_wait_and_activations_after(built, tmp_path, variant):
    """Launched as a programmatic dependent, a kernel runs beside the kernel before it until
    griddepcontrol.wait: each thread loads its first chunks' weights, which no kernel
    writes, before it (2 UNROLL 16-byte words int8, UNROLL int4), and reads or writes
    nothing else, activations and outputs above all (which the kernels around it write and
    read), until after it. On a GPU an early read of them gives stale values now and then;
    here a mutant whose norm reads them first (`early`) fails, though its first-use check
    passes."""
    if variant is None:
        module = int8_module(built)
        q, scale, x, xq, x_scale = products(3, 32, 4096, 5)
        threads = 2 * 32 * cuda_int8.WARPS  # 2 blocks of 16 outputs
        cuda_int8._launch(module, "int8_gemv", x, None, q, scale)
        assert_overlapped_safely(module, threads, 2 * cuda_int8.UNROLL)
        cuda_int8._launch(module, "w8a8_gemv", xq, x_scale, q, scale)
        assert_overlapped_safely(module, threads, 2 * cuda_int8.UNROLL)
        return
    early = variant == "early"
    variant = (8, 4) if early else variant
    path = mutant(cuda_int4.SOURCE, tmp_path, *EARLY) if early else cuda_int4.SOURCE
    module = int4_module(built, variant, path)
    tiles, words = packed(32, 4096, 2, CPU)
    norm = (torch.ones(4096, dtype=torch.bfloat16), 1e-5)
    for normed in (False, True):
        x = torch.randn(3, 4096).bfloat16()
        cuda_int4._matmul(module, variant[0], x, tiles, words, 128, False,
                          norm if normed else None)  # fmt: skip
        if early and normed:
            with pytest.raises(AssertionError):
                assert_overlapped_safely(module, 2 * 32 * variant[0], variant[1])
        else:
            assert_overlapped_safely(module, 2 * 32 * variant[0], variant[1])
    if early:
        cuda_int4._check(module, variant, CPU, ("norm",))  # its values are right


def assert_written_once(trace: torch.Tensor, y: torch.Tensor):
    """In `trace`, every element of the bf16 `y` was written exactly once, and nothing else
    was written."""
    writes = trace[trace[:, 3] == WRITE]
    assert writes[:, 4].unique().tolist() == [2] and len(writes) == y.numel()
    assert counts(trace, WRITE, y, 2).unique().tolist() == [1]


@pytest.mark.parametrize("variant", [None, *cuda_int4.VARIANTS, (8, 4, 1)], ids=str)
def test_each_output_is_written_once_and_added_to_by_the_thread_that_reads_it(built, variant):
    """The int8 products (both, one tile of rows and two) and every int4 variant's plain,
    two-tile, gated and normed ones write each output once and nothing else; an int4 product
    added to the residual stream reads each of its elements once and then writes it, both
    by one thread, so no other thread's write can come between."""
    if variant is None:
        module = int8_module(built)
        for rows in (3, 16):
            q, scale, x, xq, x_scale = products(rows, 32, 1024, rows)
            y = cuda_int8._launch(module, "int8_gemv", x, None, q, scale)
            assert_written_once(module.trace(), y)
            y = cuda_int8._launch(module, "w8a8_gemv", xq, x_scale, q, scale)
            assert_written_once(module.trace(), y)
        return
    module = int4_module(built, variant)
    tiles, words = packed(32, 1024, 3, CPU)
    norm = (torch.ones(1024, dtype=torch.bfloat16), 1e-5)
    for rows, gated, normed in ((1, False, False), (16, False, False), (3, True, False),
                                (3, False, True)):  # fmt: skip
        y = cuda_int4._matmul(module, variant[0], torch.randn(rows, 1024).bfloat16(), tiles,
                              words, 128, gated, norm if normed else None)  # fmt: skip
        assert_written_once(module.trace(), y)
    residual = torch.randn(3, 32).bfloat16()
    cuda_int4._matmul(module, variant[0], torch.randn(3, 1024).bfloat16(), tiles, words, 128,
                      False, into=residual)  # fmt: skip
    trace = module.trace()
    assert_written_once(trace, residual)
    made = touches(trace, residual)
    assert len(made) == residual.numel()
    for (block, thread, kind), second in made.values():
        assert (kind, second) == (READ, (block, thread, WRITE))


@pytest.mark.parametrize("added", [False, True], ids=["plain", "added"])
def test_a_kernel_past_its_output_is_stopped_before_it_writes(built, tmp_path, added):
    """A mutant whose bound on a tile's second row is off by one (`m + 1 <= rows`) writes a
    row past its [3, N] output, and added to the residual stream first reads it: the
    emulator refuses the write, or the read before it, so the memory after the residual
    stream stays as it was."""
    path = mutant(cuda_int4.SOURCE, tmp_path, "if (m + 1 < rows)", "if (m + 1 <= rows)")
    module = int4_module(built, (8, 4), path)
    tiles, words = packed(32, 1024, 4, CPU)
    buffer = torch.zeros(4, 32, dtype=torch.bfloat16)
    error = "a read outside" if added else "a write outside"
    with pytest.raises(EmulationError, match=error):
        cuda_int4._matmul(module, 8, torch.randn(3, 1024).bfloat16(), tiles, words, 128,
                          False, into=buffer[:3] if added else None)  # fmt: skip
    if added:
        assert not buffer[3].any()


# a W8A8 product that reads its rows' activation scales before it skips the rows past its
# input's (in a tile of 8), its outputs right
HOISTED = ("      if (m >= rows) continue;\n"
           "      const float sum = W8A8 ? (float)v[i] * x_scale[m] : (float)v[i];\n",
           "      const float sum = W8A8 ? (float)v[i] * x_scale[m] : (float)v[i];\n"
           "      if (m >= rows) continue;\n")  # fmt: skip


def test_a_kernel_reading_past_a_tensor_is_stopped(built, tmp_path):
    """A mutant W8A8 product reading activation scales of rows its input does not have is
    refused, though it drops what it read: on a GPU such a read sees garbage, or faults where
    a page ends. The weight-only product of the same source, which reads no such scale,
    still gives its reference."""
    module = int8_module(built, mutant(cuda_int8.SOURCE, tmp_path, *HOISTED))
    q, scale, x, xq, x_scale = products(3, 32, 1024, 3)
    with pytest.raises(EmulationError, match="a read outside the launch's tensors"):
        cuda_int8._launch(module, "w8a8_gemv", xq, x_scale, q, scale)
    got = cuda_int8._launch(module, "int8_gemv", x, None, q, scale).double()
    want = cuda_int8.reference(x, q, scale)
    assert float((got - want).abs().max() / want.abs().max()) < 1e-2
