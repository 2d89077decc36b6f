"""What ptxas makes of llmkit's CUDA C++ kernels, on the CPU (NVRTC, no GPU): cuda_rtc.resources
reads its report, checked here against the cubin's own records; and no kernel a decode step
of up to 8 rows launches on Hopper, of any block shape or its pipelined twin, spills
registers to local memory (traffic beside the weights a product streams, which no output
value shows and which a GPU shows only as time)."""

from __future__ import annotations

import struct

import pytest

from llmkit.kernels import cuda_int4, cuda_int8
from tests.test_cuda_int8 import nvrtc_or_skip

HOPPER, AMPERE = (9, 0), (8, 0)
# a cubin's .nv.info attributes (format 4: a size, then the kernel's symbol and a value)
REGISTERS, FRAME = 0x2F, 0x11


def kernel_records(cubin: bytes) -> dict[tuple[str, int], int]:
    """The (kernel, attribute) values of the cubin's .nv.info section, read from its ELF
    headers, symbol table and records."""
    (sections_at,) = struct.unpack_from("<Q", cubin, 0x28)
    size, count, names = struct.unpack_from("<HHH", cubin, 0x3A)
    sections = [struct.unpack_from("<IIQQQQIIQQ", cubin, sections_at + i * size)
                for i in range(count)]  # fmt: skip

    def text(section, at: int) -> str:
        start = section[4] + at
        return cubin[start : cubin.index(b"\0", start)].decode()

    symbols = next(s for s in sections if s[1] == 2)  # SHT_SYMTAB
    symbol = [text(sections[symbols[6]], struct.unpack_from("<I", cubin, symbols[4] + 24 * i)[0])
              for i in range(symbols[5] // 24)]  # fmt: skip
    info = next(s for s in sections if text(sections[names], s[0]) == ".nv.info")
    records, at = {}, info[4]
    while at < info[4] + info[5]:
        form, attribute = cubin[at], cubin[at + 1]
        (length,) = struct.unpack_from("<H", cubin, at + 2)
        if form == 4 and length == 8:
            kernel, value = struct.unpack_from("<II", cubin, at + 4)
            records[symbol[kernel], attribute] = value
        at += 4 + (length if form == 4 else 0)
    return records


# a kernel whose array, indexed at run time, lives in a stack frame
LOCAL = """extern "C" __global__ void local(float* y, int i) {
  float a[64];
  for (int k = 0; k < 64; ++k) a[(k * i) & 63] = y[k];
  y[0] = a[i & 63];
}"""


@pytest.mark.parametrize("arch", [HOPPER, AMPERE])
def test_the_resources_are_the_ones_the_cubin_records(arch):
    """For every kernel of both sources (int4 in a pipelined block shape, its most
    registers) and one with a stack frame: the registers and stack frame the report gives
    are the cubin's own."""
    cuda_rtc = nvrtc_or_skip()
    int4 = cuda_int4.defines((8, 4, 1))
    builds = [(cuda_rtc.source(cuda_int8.SOURCE), cuda_int8.DEFINES, cuda_int8.NAMES),
              (cuda_rtc.source(cuda_int4.SOURCE), int4, cuda_int4._KERNELS.values()),
              (LOCAL, (), ["local"])]  # fmt: skip
    for text, defines, names in builds:
        made = cuda_rtc.resources(text, "kernels.cu", arch, defines)
        records = kernel_records(cuda_rtc.compile_cubin(text, "kernels.cu", arch, defines))
        assert sorted(made) == sorted(names)
        for kernel, used in made.items():
            assert used.registers == records[kernel, REGISTERS] > 0
            assert used.stack == records[kernel, FRAME]
            assert used.stack > 0 or used.spill_stores == used.spill_loads == 0
    assert made["local"].stack >= 256


@pytest.mark.parametrize("arch", [HOPPER, AMPERE])
def test_no_int8_kernel_spills(arch):
    cuda_rtc = nvrtc_or_skip()
    made = cuda_rtc.resources(cuda_rtc.source(cuda_int8.SOURCE), "cuda_int8.cu", arch,
                              cuda_int8.DEFINES)  # fmt: skip
    assert sorted(made) == sorted(cuda_int8.NAMES)
    assert all(u.stack == 0 and u.spill_stores == u.spill_loads == 0 for u in made.values())


@pytest.mark.parametrize("variant", [*cuda_int4.VARIANTS, *((*v, 1) for v in cuda_int4.VARIANTS)],
                         ids=str)  # fmt: skip
def test_no_int4_kernel_for_up_to_eight_rows_spills_on_hopper(variant):
    """Every one-tile kernel (plain, gated, with a norm or an add, either fold) of every
    block shape and of its pipelined twin, as a layer may launch it for up to 8 rows."""
    cuda_rtc = nvrtc_or_skip()
    made = cuda_rtc.resources(cuda_rtc.source(cuda_int4.SOURCE), "cuda_int4.cu", HOPPER,
                              cuda_int4.defines(variant))  # fmt: skip
    one_tile = [name for name in cuda_int4._KERNELS.values() if name.endswith("_m1")]
    assert len(one_tile) == 10 and set(one_tile) <= set(made)
    for name in one_tile:
        assert made[name].stack == 0 and made[name].spill_stores == 0, (name, made[name])


def test_a_compile_error_is_one_line_with_the_log():
    cuda_rtc = nvrtc_or_skip()
    with pytest.raises(cuda_rtc.CudaError, match=r"^broken.cu did not compile: .*error[^\n]*$"):
        cuda_rtc.resources('extern "C" __global__ void f() { undefined(); }', "broken.cu", HOPPER)
