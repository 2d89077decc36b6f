"""What ptxas makes of llmkit's CUDA C++ kernels, on the CPU (NVRTC, no GPU): its report,
which cuda_rtc.compile_reported reads, checked here against the cubin's own records; no
kernel a decode step of up to 8 rows launches on Hopper, of any block shape or its
pipelined twin, spills registers to local memory (traffic beside the weights a product
streams); and in every kernel's machine code (cuobjdump's, which Triton ships) the first
weights' loads come before griddepcontrol.wait and nothing else touches memory there, as
the sources have it. Neither shows in an output value; a GPU shows both only as time."""

from __future__ import annotations

import functools
import re
import struct
import subprocess
from pathlib import Path

import pytest

from llmkit.kernels import cuda_int4, cuda_int8
from tests.test_cuda_int8 import nvrtc_or_skip

# every int4 block shape and its pipelined twin
SHAPES = [*cuda_int4.VARIANTS, *((*v, 1) for v in cuda_int4.VARIANTS)]

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


@functools.cache
def built(source: str, arch: tuple[int, int], defines: tuple) -> tuple[bytes, dict]:
    """(the cubin, its kernels' Resources) of "int8", "int4" or another kernel source's
    text."""
    cuda_rtc = nvrtc_or_skip()
    paths = {"int8": cuda_int8.SOURCE, "int4": cuda_int4.SOURCE}
    text = cuda_rtc.source(paths[source]) if source in paths else source
    return cuda_rtc.compile_reported(text, "kernels.cu", arch, defines)


def names(source: str) -> list[str]:
    return sorted(cuda_int8.NAMES if source == "int8" else cuda_int4._KERNELS.values())


@pytest.mark.parametrize("arch", [HOPPER, AMPERE])
def test_the_resources_are_the_ones_the_cubin_records(arch):
    """For every kernel of both sources (int4 in a pipelined block shape, its most
    registers) and one with a stack frame: the registers and stack frame the report gives
    are the cubin's own."""
    builds = [("int8", cuda_int8.DEFINES, names("int8")),
              ("int4", cuda_int4.defines((8, 4, 1)), names("int4")),
              (LOCAL, (), ["local"])]  # fmt: skip
    for source, defines, kernels in builds:
        cubin, made = built(source, arch, defines)
        records = kernel_records(cubin)
        assert sorted(made) == kernels
        for kernel, used in made.items():
            assert used.registers == records[kernel, REGISTERS] > 0
            assert used.stack == records[kernel, FRAME]
            assert used.stack > 0 or used.spill_stores == used.spill_loads == 0
    assert made["local"].stack >= 256


@pytest.mark.parametrize("arch", [HOPPER, AMPERE])
def test_no_int8_kernel_spills(arch):
    made = built("int8", arch, cuda_int8.DEFINES)[1]
    assert sorted(made) == names("int8")
    assert all(u.stack == 0 and u.spill_stores == u.spill_loads == 0 for u in made.values())


@pytest.mark.parametrize("variant", SHAPES, ids=str)
def test_no_int4_kernel_for_up_to_eight_rows_spills_on_hopper(variant):
    """Every one-tile kernel (plain, gated, with a norm or an add, either fold) of every
    block shape and of its pipelined twin, as a layer may launch it for up to 8 rows."""
    made = built("int4", HOPPER, cuda_int4.defines(variant))[1]
    one_tile = [name for name in names("int4") if name.endswith("_m1")]
    assert len(one_tile) == 10 and set(one_tile) <= set(made)
    for name in one_tile:
        assert made[name].stack == 0 and made[name].spill_stores == 0, (name, made[name])


def test_a_compile_error_is_one_line_with_the_log():
    cuda_rtc = nvrtc_or_skip()
    with pytest.raises(cuda_rtc.CudaError, match=r"^broken.cu did not compile: .*error[^\n]*$"):
        cuda_rtc.compile_reported('extern "C" __global__ void f() { undefined(); }', "broken.cu",
                                  HOPPER)  # fmt: skip


def cuobjdump_or_skip() -> Path:
    triton = pytest.importorskip("triton")
    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not path.is_file():
        pytest.skip("needs the cuobjdump Triton's NVIDIA backend ships")
    return path


def machine_code(cubin: bytes, tmp_path: Path) -> dict[str, list[str]]:
    """Each kernel's instructions (its own, then those of the functions it calls), in the
    order cuobjdump lists them: opcode and operands, a predicate first where it has one."""
    cuobjdump = cuobjdump_or_skip()
    path = tmp_path / "kernels.cubin"
    path.write_bytes(cubin)
    listing = subprocess.run([cuobjdump, "-sass", path], capture_output=True, text=True,
                             check=True).stdout  # fmt: skip
    made: dict[str, list[str]] = {}
    for line in listing.splitlines():
        if kernel := re.match(r"\s+Function : (\S+)", line):
            made[kernel.group(1)] = instructions = []
        elif instruction := re.match(r"\s+/\*[0-9a-f]{4,}\*/\s+(.*?) ;", line):
            instructions.append(instruction.group(1))
    return made


def opcode(instruction: str) -> str:
    return instruction.split()[1 if instruction.startswith("@") else 0]


# (source, macros, weight loads before the wait: int8 UNROLL chunks of rows g and g + 8)
BUILDS = [pytest.param("int8", cuda_int8.DEFINES, 2 * cuda_int8.UNROLL, id="int8"),
          *(pytest.param("int4", cuda_int4.defines(v), v[1], id=f"int4-{v}")
            for v in SHAPES)]  # fmt: skip


@pytest.mark.parametrize("source, defines, first", BUILDS)
def test_each_kernel_loads_its_first_weights_before_it_waits_in_its_machine_code(
    tmp_path, source, defines, first
):
    """Before griddepcontrol.wait (ACQBULK, or the call of the function that is it) each
    kernel for Hopper issues its first chunks' weight loads (ld.global.nc.L1::no_allocate:
    LDG ... NA) and touches no other global memory: its inputs may still be being written
    by the kernel before it."""
    code = machine_code(built(source, HOPPER, defines)[0], tmp_path)
    assert sorted(code) == names(source)
    for kernel, instructions in code.items():
        assert sum(opcode(i) == "ACQBULK" for i in instructions) == 1, kernel
        wait = next(
            n for n, i in enumerate(instructions) if opcode(i).startswith(("ACQBULK", "CALL"))
        )
        memory = [opcode(i) for i in instructions[:wait]
                  if re.match(r"(LDG|LDGSTS|STG|LD|ST|ATOMG|ATOM|RED)\b", opcode(i))]  # fmt: skip
        assert len(memory) == first, (kernel, memory)
        assert all(m.startswith("LDG.") and ".NA." in m for m in memory), (kernel, memory)
