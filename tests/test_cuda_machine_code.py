"""What the compilers make of llmkit's GPU kernels, on the CPU (no GPU): ptxas's report of
the CUDA C++ kernels (NVRTC), which cuda_rtc.compile_reported reads, checked here against the
cubin's own records; no such kernel a decode step of up to 8 rows launches on Hopper, of any
block shape or its pipelined twin, spills registers to local memory (traffic beside the
weights a product streams); and in the machine code (cuobjdump's, which Triton ships) of
every kernel a decode step launches as a programmatic dependent, the CUDA C++ ones and the
Triton ones as their wrappers launch them, nothing touches global memory before
griddepcontrol.wait but the loads the sources put there (a CUDA C++ product's first weights,
the decode attention's sequence length), which stay there, and no Triton one spills a
register in a loop. Neither shows in an output value: a read moved above the wait reads what
the kernel before may still be writing, and one sunk below it waits for that kernel; a GPU
shows the one rarely and the other only as time. Also: every Triton launch says whether its
multiplies and adds may fuse, which Triton's default would otherwise decide."""

from __future__ import annotations

import contextlib
import functools
import importlib
import os
import pkgutil
import re
import struct
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from unittest import mock

import pytest
import torch

from llmkit.kernels import cuda_int4, cuda_int8
from tests.test_cuda_int8 import nvrtc_or_skip
from tests.test_triton_int8 import compiled_for

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


# a kernel whose array, indexed at run time, lives in a stack frame, written in a loop
LOCAL = """extern "C" __global__ void local(float* y, int i, int n) {
  float a[64];
  for (int k = 0; k < n; ++k) a[(k * i) & 63] = y[k];
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


def local_in_loops(instructions: list[str]) -> list[str]:
    """The local-memory accesses (spilled registers, or arrays in a stack frame) inside a
    loop of one function's code: between a backward branch and its target (cuobjdump lists
    every instruction, 16 bytes each from address 0)."""
    branch = re.compile(r"0x([0-9a-f]+)$")
    targets = {n: int(to.group(1), 16) // 16 for n, i in enumerate(instructions)
               if opcode(i).startswith("BRA") and (to := branch.search(i))}  # fmt: skip
    loops = [range(target, n + 1) for n, target in targets.items() if target < n]
    local = [n for n, i in enumerate(instructions) if opcode(i).startswith(("LDL", "STL"))]
    return [instructions[n] for n in local if any(n in loop for loop in loops)]


def test_the_loop_check_sees_a_stack_array_written_in_a_loop_and_read_after_it(tmp_path):
    (instructions,) = machine_code(built(LOCAL, HOPPER, ())[0], tmp_path).values()
    inside = [opcode(i) for i in local_in_loops(instructions)]
    assert "STL" in inside and "LDL" not in inside
    assert "LDL" in [opcode(i) for i in instructions]


# (source, macros, weight loads before the wait: int8 UNROLL chunks of rows g and g + 8)
BUILDS = [pytest.param("int8", cuda_int8.DEFINES, 2 * cuda_int8.UNROLL, id="int8"),
          *(pytest.param("int4", cuda_int4.defines(v), v[1], id=f"int4-{v}")
            for v in SHAPES)]  # fmt: skip


def before_the_wait(instructions: list[str]) -> list[str]:
    """The opcodes of the memory accesses a kernel that waits once (griddepcontrol.wait:
    ACQBULK, or the call of the function that is it) makes before it waits; there must be
    some after it."""
    assert sum(opcode(i) == "ACQBULK" for i in instructions) == 1
    wait = next(n for n, i in enumerate(instructions)
                if opcode(i).startswith(("ACQBULK", "CALL")))  # fmt: skip
    memory = [n for n, i in enumerate(instructions)
              if re.match(r"(LDG|LDGSTS|STG|LD|ST|ATOMG|ATOM|RED)\b", opcode(i))]  # fmt: skip
    assert any(n > wait for n in memory)
    return [opcode(instructions[n]) for n in memory if n < wait]


@pytest.mark.parametrize("source, defines, first", BUILDS)
def test_each_kernel_loads_its_first_weights_before_it_waits_in_its_machine_code(
    tmp_path, source, defines, first
):
    """Before griddepcontrol.wait each kernel for Hopper issues its first chunks' weight
    loads (ld.global.nc.L1::no_allocate: LDG ... NA) and touches no other global memory:
    its inputs may still be being written by the kernel before it."""
    code = machine_code(built(source, HOPPER, defines)[0], tmp_path)
    assert sorted(code) == names(source)
    for kernel, instructions in code.items():
        memory = before_the_wait(instructions)
        assert len(memory) == first, (kernel, memory)
        assert all(m.startswith("LDG.") and ".NA." in m for m in memory), (kernel, memory)


def decode_step_calls() -> dict[str, Callable[[], object]]:
    """A call of a wrapper of the decode step's Triton kernels for each kind of launch they
    make, on CPU tensors of Llama-3 8B's shapes (bf16, hidden 4096, 32 query heads of 128
    over 8 KV heads, MLP 14336; heads of 64 where the name says so)."""
    from llmkit.kernels import triton_attention as ta
    from llmkit.kernels import triton_elementwise as te
    from llmkit.kernels import triton_int8 as ti

    bf = torch.bfloat16
    x, w = torch.randn(4, 4096, dtype=bf), torch.ones(4096, dtype=bf)
    q8 = torch.ones(4096, 4096, dtype=torch.int8)
    xq, x_scale = torch.ones(4, 4096, dtype=torch.int8), torch.ones(4)

    def cache(dim):
        return torch.zeros(64, 8, 16, dim, dtype=bf)

    def write(dim, rotary):
        k = torch.randn(4, 8, dim, dtype=bf)
        q = torch.randn(4, 32, dim, dtype=bf)
        cos_sin = (torch.ones(4, dim), torch.zeros(4, dim)) if rotary else None
        return ta.write_kv(cache(dim), cache(dim), k, k, torch.arange(4), q, cos_sin)

    def decode(dim, seqs, blocks):  # one long context splits, 64 short ones do not
        q = torch.randn(seqs, 32, dim, dtype=bf)
        tables = torch.zeros(seqs, blocks, dtype=torch.int32)
        lens = torch.full((seqs,), 16 * blocks - 3, dtype=torch.int32)
        return ta.paged_decode(torch.empty_like(q), q, cache(dim), cache(dim), tables, lens, 0.1)

    return {
        "rms_norm": lambda: te.rms_norm(x, w, 1e-5),
        "add_rms_norm": lambda: te.add_rms_norm(x.clone(), x, w, 1e-5),
        "silu_mul": lambda: te.silu_mul(torch.ones(4, 2 * 14336, dtype=bf)),
        "int8_linear": lambda: ti.int8_linear(x, q8, torch.ones(4096)),
        "quantize_rows": lambda: ti.quantize_rows(x),
        "w8a8_linear": lambda: ti.w8a8_linear(xq, x_scale, q8, torch.ones(4096), bf),
        "write_kv": lambda: write(128, rotary=False),
        "write_kv-rotary": lambda: write(128, rotary=True),
        "write_kv-rotary-64": lambda: write(64, rotary=True),
        "paged_decode-split": lambda: decode(128, 1, 64),
        "paged_decode": lambda: decode(128, 64, 4),
        "paged_decode-split-64": lambda: decode(64, 1, 64),
    }


@functools.cache
def triton_kernels() -> frozenset:
    """The Triton functions of llmkit.kernels (not triton_launch.py's, which its kernels call)."""
    from triton.runtime.jit import JITFunction

    import llmkit.kernels

    found = set()
    for module in pkgutil.iter_modules(llmkit.kernels.__path__):
        if module.name.startswith("triton_") and module.name != "triton_launch":
            made = importlib.import_module(f"llmkit.kernels.{module.name}")
            found |= {v for v in vars(made).values() if isinstance(v, JITFunction)
                      and v.fn.__module__ == made.__name__}  # fmt: skip
    return frozenset(found)


def programmatic_kernels() -> frozenset:
    """The Triton kernels of llmkit.kernels that take a PDL switch."""
    return frozenset(k for k in triton_kernels() if "PDL" in k.arg_names)


def launched_kernels() -> frozenset:
    """The Triton functions of llmkit.kernels that no other one calls: those launched."""
    kernels = triton_kernels()
    called = {k for k in kernels for other in kernels - {k} if f"{k.__name__}(" in other.src}
    return kernels - called


def recorded_launches(call: Callable[[], object]) -> list[tuple]:
    """The (kernel, arguments, keywords) of each Triton launch `call` makes, as it makes them
    on a GPU that launches programmatic dependents, recorded instead of run."""
    from llmkit.kernels import triton_launch

    made: list[tuple] = []

    def recorder(kernel):
        return lambda *args, grid, warmup=False, **keywords: made.append((kernel, args, keywords))

    def options(t):
        return {**triton_launch.launch_options(t), "PDL": True, "launch_pdl": True}

    kernels = triton_kernels()
    with contextlib.ExitStack() as stack:
        for kernel in kernels:
            stack.enter_context(mock.patch.object(kernel, "run", recorder(kernel)))
        for module in {sys.modules[kernel.fn.__module__] for kernel in kernels}:
            if hasattr(module, "launch_options"):
                stack.enter_context(mock.patch.object(module, "launch_options", options))
        call()
    return made


TRITON_TYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32",
                torch.int64: "i64", torch.int32: "i32", torch.int8: "i8"}  # fmt: skip


def triton_cubin(kernel, args: tuple, keywords: dict) -> bytes:
    """The kernel compiled by Triton for Hopper, specialized on the launch's arguments much
    as Triton's launcher does: constexprs by value, and pointers aligned to 16 bytes and
    ints divisible by 16 marked as such."""
    types, constexprs, aligned = {}, {}, []
    for i, param in enumerate(kernel.params):
        value = args[i] if i < len(args) else keywords[param.name]
        if param.is_constexpr:
            constexprs[param.name] = value
            continue
        if isinstance(value, torch.Tensor):
            types[param.name] = "*" + TRITON_TYPES[value.dtype]
            multiple = value.data_ptr() % 16 == 0
        elif isinstance(value, int):
            types[param.name] = "i32" if -(2**31) <= value < 2**31 else "i64"
            multiple = value % 16 == 0 and not param.do_not_specialize
        else:
            types[param.name], multiple = "fp32", False
        if multiple:
            aligned.append(param.name)
    options = {k: v for k, v in keywords.items() if k not in kernel.arg_names}
    return compiled_for(kernel, types, constexprs, 90, options, tuple(aligned)).asm["cubin"]


def compiled_triton_or_skip() -> None:
    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("Triton's interpreter compiles nothing")


def test_every_programmatic_triton_kernel_is_among_the_launches_checked():
    compiled_triton_or_skip()
    launched = {kernel for call in decode_step_calls().values()
                for kernel, _, _ in recorded_launches(call)}  # fmt: skip
    assert launched == programmatic_kernels() and len(launched) == 6


def other_triton_calls() -> dict[str, Callable[[], object]]:
    """A call of each wrapper of llmkit's other Triton kernels, on CPU tensors."""
    from llmkit.kernels import triton_attention as ta
    from llmkit.kernels import triton_gptq, triton_sampling

    bf, i32, f64 = torch.bfloat16, torch.int32, torch.float64
    q, cache = torch.randn(8, 32, 128, dtype=bf), torch.zeros(64, 8, 16, 128, dtype=bf)
    one, table = torch.ones(1, dtype=i32), torch.zeros(1, 4, dtype=i32)
    tiles = tuple(torch.tensor(t, dtype=i32) for t in ta.prefill_tiles([8]))
    prefill = (torch.empty_like(q), q, cache, cache, table, tiles, 0 * one, 8 * one, 0 * one)
    w, codes = torch.randn(64, 128), torch.empty(64, 128, dtype=torch.uint8)
    sweep = (w, codes, torch.empty_like(w), torch.eye(128), torch.ones(64), torch.zeros(64))
    cdf, u = torch.rand(4, 33, dtype=f64), torch.rand(4, 5, dtype=f64)
    return {
        "paged_prefill": lambda: ta.paged_prefill(*prefill, 0.1),
        "gptq_columns": lambda: triton_gptq.gptq_columns(*sweep, 0, 128, 15),
        "descend": lambda: triton_sampling.descend(cdf, u),
    }


# kernels whose multiplies and adds must round apart, as the torch ops they stand for
UNFUSED = ("_gptq_columns_kernel", "_descend_kernel")


def test_every_triton_launch_says_whether_its_multiplies_and_adds_fuse():
    """So that no kernel's code or values change with Triton's default, which Triton 3.10
    turns off (3.9 warns where a launch leaves it unset): fused in the kernels the GPUs
    measured, apart where a kernel rounds as torch's ops do."""
    compiled_triton_or_skip()
    calls = {**decode_step_calls(), **other_triton_calls()}
    launches = [launch for call in calls.values() for launch in recorded_launches(call)]
    assert {kernel for kernel, _, _ in launches} == launched_kernels()
    assert len(launched_kernels()) == 9
    for kernel, _, keywords in launches:
        assert keywords.get("enable_fp_fusion") is (kernel.__name__ not in UNFUSED), kernel.__name__


# the names of decode_step_calls' calls
TRITON_CALLS = ("rms_norm", "add_rms_norm", "silu_mul", "int8_linear", "quantize_rows",
                "w8a8_linear", "write_kv", "write_kv-rotary", "write_kv-rotary-64",
                "paged_decode-split", "paged_decode", "paged_decode-split-64")  # fmt: skip
# a kernel's switch, and the word in a call's name that says it is on
SWITCHES = {"ADD": "add", "INTEGER": "w8a8", "ROTATE": "rotary", "SPLIT": "split"}


@pytest.mark.parametrize("name", TRITON_CALLS)
def test_each_triton_kernel_touches_memory_only_after_it_waits_in_its_machine_code(tmp_path, name):
    """Launched as a programmatic dependent, each of a decode step's Triton kernels for
    Hopper waits before it reads or writes global memory, save the decode attention, which
    first loads its sequence's length (which the host wrote before the step) and only then
    waits. None touches local memory in a loop (a register spilled there costs traffic
    each time round)."""
    compiled_triton_or_skip()
    calls = decode_step_calls()
    assert sorted(calls) == sorted(TRITON_CALLS)
    launches = recorded_launches(calls[name])
    assert launches
    for kernel, args, keywords in launches:
        assert keywords["PDL"] and keywords["launch_pdl"]
        assert all(keywords[k] == (word in name) for k, word in SWITCHES.items() if k in keywords)
        cubin = triton_cubin(kernel, args, keywords)
        ((symbol, instructions),) = machine_code(cubin, tmp_path).items()
        assert local_in_loops(instructions) == [], symbol
        memory = before_the_wait(instructions)
        assert memory == (["LDG.E"] if name.startswith("paged_decode") else []), memory
