"""llmkit's CUDA C++ kernels (cuda_int8.cu, cuda_int4.cu) run on the CPU by the emulator of
tests/cuda_emulator.py: each module's own first-use check (the one a GPU runs before layers
use the kernels) and products on shapes of other sizes, against the same references as the
GPU tests. The int4 kernels, which pass on real GPUs, pass here too, so the emulated PTX
behaves as the hardware does; mutants of the sources that read their fragments wrongly, or
whose unrolled loops multiply stale weights, fail the checks here."""

from __future__ import annotations

import pytest
import torch

from llmkit.kernels import cuda_int4, cuda_int8
from llmkit.kernels.cuda_rtc import CudaError
from tests.cuda_emulator import EmulatedModule, EmulationError, compiler, rewrite_asm
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
"""


@pytest.mark.parametrize("kernel, error", [
    ("diverged", "threads wait at a barrier or warp-wide instruction that others never reach"),
    ("stray", "reads outside the launch's tensors"),
    ("misaligned", "a 16-byte load at an address that is not 16-byte aligned"),
    ("unknown", "does not know the instruction brev.b32"),
])  # fmt: skip
def test_the_emulator_refuses_what_a_gpu_would_not_run_as_written(built, tmp_path, kernel,
                                                                  error):  # fmt: skip
    """Lanes that leave a warp-wide mma, a load past a tensor's end or at an address a GPU
    faults at, an instruction it does not emulate: each an error, not a value."""
    path = tmp_path / "guarded.cu"
    path.write_text(GUARDED)
    module = EmulatedModule(path, ["diverged", "stray", "misaligned", "unknown"], (), built)
    y = torch.zeros(32, dtype=torch.int32 if kernel != "diverged" else torch.float32)
    with pytest.raises(EmulationError, match=error):
        module.launch(kernel, 1, 32, y)  # (stray: 32 lanes read 512 bytes of y's 128)
