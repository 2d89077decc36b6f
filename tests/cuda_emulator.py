"""llmkit's CUDA C++ kernels run on the CPU, for tests where no GPU is: a kernel source (with
cuda_common.cuh's helpers, as cuda_rtc.source gives NVRTC) is compiled by the host's C++
compiler with tests/cuda_emulator.h in front, which emulates the CUDA built-ins and the PTX
instructions the kernels use (each `asm` statement becomes a call that interprets its
instruction), instrumented so that each of its reads and writes is a call to the emulator,
and linked with the emulator (the same header, not instrumented). `EmulatedModule` launches
the kernels as cuda_rtc.Module does, so a kernel module's own first-use check can run on it,
and keeps each launch's trace of 16-byte loads, L2 prefetches, waits for the kernels before
(griddepcontrol.wait) and the kernel's other reads and writes of its tensors, from which
`warp_loads`, `sector_use`, `counts`, `touches`, `prefetched` and `before_wait` tell how the
kernel uses the memory bandwidth and in what order it reads and writes. A write anywhere
but in the launch's tensors, the thread's stack and shared memory is refused before it is
made, as is a read anywhere else but in the library's own image (its constants and the
built-ins), and a race on shared memory (cuda_emulator.h's check_shared) stops the launch."""

from __future__ import annotations

import ctypes
import hashlib
import os
import re
import shutil
import subprocess
from pathlib import Path

import torch

from llmkit.kernels import cuda_rtc

HEADER = Path(__file__).with_name("cuda_emulator.h")
COMPILER = os.environ.get("CXX", "g++")
# a trace entry's kind (cuda_emulator.h's Access): a 16-byte load, a streaming one
# (ld.global.nc), an L2 prefetch, a griddepcontrol.wait, any other read, a write
LOAD, STREAMING, PREFETCH, WAIT, READ, WRITE = 0, 1, 2, 3, 4, 5
SECTOR, LINE = 32, 128  # bytes the L2 moves at once, and a cache line's
# every symbol but emu_launch and emu_trace bound within a library: two libraries loaded at
# once (another source's kernels of the same names) each run their own
FLAGS = ["-std=c++17", "-O1", "-fPIC", "-w", "-fvisibility=hidden"]
# every read and write of the kernel's code a call to cuda_emulator.h's __tsan_* functions
# (ThreadSanitizer's instrumentation, which reports both the read and the write of a `+=`)
TRACED = ["-fsanitize=thread"]


class EmulationError(RuntimeError):
    """A launch the emulator refused: an unknown instruction, a misaligned or stray load, a
    stray read or write, a race on shared memory, lanes that diverged at a warp-wide
    instruction."""


def compiler() -> str | None:
    """The C++ compiler the emulation needs, or None where there is none."""
    return shutil.which(COMPILER)


def _closing(text: str, at: int) -> int:
    """The index of the parenthesis closing the one at `at` (string literals skipped)."""
    depth, i = 0, at
    while i < len(text):
        if text[i] == '"':
            i = _string_end(text, i)
        elif text[i] == "(":
            depth += 1
        elif text[i] == ")":
            depth -= 1
            if depth == 0:
                return i
        i += 1
    raise ValueError(f"unbalanced parentheses after {text[at : at + 40]!r}")


def _string_end(text: str, at: int) -> int:
    i = at + 1
    while text[i] != '"':
        i += 2 if text[i] == "\\" else 1
    return i


def _split(text: str, sep: str) -> list[str]:
    """`text` split at `sep` outside string literals and parentheses."""
    parts, depth, start, i = [], 0, 0, 0
    while i < len(text):
        c = text[i]
        if c == '"':
            i = _string_end(text, i)
        elif c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
        elif c == sep and depth == 0:
            parts.append(text[start:i])
            start = i + 1
        i += 1
    return [*parts, text[start:]]


OPERAND = re.compile(r'\s*"([=+]?)([a-z])"\s*\((.*)\)\s*', re.S)


def _operand(text: str, output: bool) -> str:
    match = OPERAND.fullmatch(text)
    if not match:
        raise ValueError(f"not an asm operand: {text!r}")
    modifier, kind, expr = match.groups()
    if output:
        return f"emu::out<'{kind}'>(&({expr}), {'true' if modifier == '+' else 'false'})"
    return f"emu::in<'{kind}'>({expr})"


def rewrite_asm(source: str) -> str:
    """`source` with each `asm [volatile] ("text" : outputs : inputs [: clobbers])` statement
    a call emu::ptx("text", {outputs..., inputs...}), the operands numbered as in the asm."""
    out, i = [], 0
    start = re.compile(r"\basm\b(\s+volatile)?\s*\(")
    while match := start.search(source, i):
        end = _closing(source, match.end() - 1)
        sections = [*_split(source[match.end() : end], ":"), "", ""]
        operands = [_operand(o, True) for o in _split(sections[1], ",") if o.strip()]
        operands += [_operand(o, False) for o in _split(sections[2], ",") if o.strip()]
        call = f"emu::ptx({sections[0].strip()}, {{{', '.join(operands)}}})"
        out += [source[i : match.start()], call]
        i = end + 1
    return "".join(out) + source[i:]


VECTOR_LOAD = re.compile(r"\*\(const uint4\*\)(\w+|\((?:[^()]|\([^()]*\))*\))")


def rewrite_vector_loads(source: str) -> str:
    """`source` with each 16-byte load `*(const uint4*)p` a checked `emu::load16(p)`."""
    return VECTOR_LOAD.sub(r"emu::load16(\1)", source)


def _compile(arguments: list, what: str) -> None:
    made = subprocess.run([COMPILER, *map(str, arguments)], capture_output=True, text=True)
    if made.returncode:
        log = made.stderr[-4000:]
        raise EmulationError(f"{what} did not compile for the emulator: {log}")


def _key(*parts: str) -> str:
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]


def _runtime(directory: Path) -> Path:
    """The emulator's object file (cuda_emulator.h with EMU_RUNTIME), not instrumented, in
    `directory`."""
    made = directory / f"emulator-{_key(HEADER.read_text(), *FLAGS)}.o"
    if not made.exists():
        _compile([*FLAGS, "-DEMU_RUNTIME", "-x", "c++", "-c", HEADER, "-o", made], HEADER.name)
    return made


def build(path: Path, names, defines, directory: Path) -> Path:
    """The shared library of `path`'s kernels `names` compiled with `defines` ("NAME=VALUE")
    for the emulator, in `directory` (kept there under a name of everything it is made of):
    the kernels' code instrumented (TRACED), linked with the emulator's."""
    text = rewrite_vector_loads(rewrite_asm(cuda_rtc.source(path)))
    text += "".join(f"\nEMU_KERNEL({name})" for name in names) + "\n"
    flags = [*FLAGS, *TRACED, *[f"-D{d}" for d in defines]]
    stem = f"{path.stem}-{_key(HEADER.read_text(), text, *flags)}"
    library = directory / f"{stem}.so"
    if not library.exists():
        directory.mkdir(parents=True, exist_ok=True)
        source = directory / f"{stem}.cpp"
        source.write_text(text)
        _compile([*flags, "-include", HEADER, "-c", source, "-o", source.with_suffix(".o")],
                 path.name)  # fmt: skip
        _compile(["-shared", source.with_suffix(".o"), _runtime(directory), "-o", library],
                 path.name)  # fmt: skip
    return library


class EmulatedModule:
    """cuda_rtc.Module's launches, of `path`'s kernels `names` built with `defines`, run by the
    emulator on CPU tensors."""

    def __init__(self, path: Path, names, defines, directory: Path):
        self._lib = ctypes.CDLL(str(build(path, names, defines, directory)))
        self._lib.emu_launch.restype = ctypes.c_char_p
        self._lib.emu_launch.argtypes = [ctypes.c_char_p, ctypes.c_uint, ctypes.c_uint,
                                         ctypes.c_void_p, ctypes.c_void_p,
                                         ctypes.c_int]  # fmt: skip
        self._lib.emu_trace.restype = ctypes.c_size_t
        self._lib.emu_trace.argtypes = [ctypes.POINTER(ctypes.POINTER(ctypes.c_uint64))]

    def launch(self, kernel: str, grid: int, block: int, *args, dependent: bool = False):
        pointers = cuda_rtc.parameters(args)
        tensors = [t for t in args if isinstance(t, torch.Tensor)]
        ranges = torch.tensor([[t.data_ptr(), t.numel() * t.element_size()] for t in tensors],
                              dtype=torch.int64)  # fmt: skip
        error = self._lib.emu_launch(kernel.encode(), grid, block, pointers, ranges.data_ptr(),
                                     len(tensors))  # fmt: skip
        if error is not None:
            raise EmulationError(f"{kernel}: {error.decode()}")

    def trace(self) -> torch.Tensor:
        """The last launch's accesses to its tensors and its waits: int64 [accesses, 5] of
        (address, block, thread, kind, bytes), each thread's in the order it issued them."""
        entries = ctypes.POINTER(ctypes.c_uint64)()
        count = self._lib.emu_trace(ctypes.byref(entries))
        if not count:
            return torch.empty(0, 5, dtype=torch.int64)
        words = ctypes.cast(entries, ctypes.POINTER(ctypes.c_int64 * (5 * count))).contents
        return torch.frombuffer(bytearray(words), dtype=torch.int64).view(count, 5)


def warp_loads(trace: torch.Tensor, kind: int) -> list[list[int]]:
    """The loads of `kind` in `trace` as a GPU issues them: each lane's i-th with the i-th
    of the other lanes of its warp, one instruction; the addresses each reads."""
    issued: dict[tuple, int] = {}
    instructions: dict[tuple, list[int]] = {}
    for address, block, thread, k, _ in trace.tolist():
        if k != kind:
            continue
        i = issued[block, thread] = issued.get((block, thread), -1) + 1
        instructions.setdefault((block, thread // 32, i), []).append(address)
    return list(instructions.values())


def sector_use(instruction: list[int]) -> float:
    """The share of the 32-byte sectors a warp's 16-byte loads touch that they read (each
    load aligned, as the emulator requires: inside one sector)."""
    return 16 * len(set(instruction)) / (SECTOR * len({a // SECTOR for a in instruction}))


def counts(trace: torch.Tensor, kind: int, tensor: torch.Tensor, unit: int = 16) -> torch.Tensor:
    """How often the accesses of `kind` in `trace` start in each `unit` bytes of `tensor`
    (`unit`: 16 for 16-byte loads, the element size for reads and writes)."""
    begin, size = tensor.data_ptr(), tensor.numel() * tensor.element_size()
    addresses = trace[trace[:, 3] == kind, 0]
    inside = addresses[(addresses >= begin) & (addresses < begin + size)]
    return torch.bincount((inside - begin) // unit, minlength=size // unit)


def touches(trace: torch.Tensor, tensor: torch.Tensor) -> dict[int, list[tuple[int, int, int]]]:
    """The reads and writes of each element of `tensor` (by its offset) in `trace`, in the
    order they were made: (block, thread, kind) each."""
    begin, size = tensor.data_ptr(), tensor.numel() * tensor.element_size()
    made: dict[int, list[tuple[int, int, int]]] = {}
    for address, block, thread, kind, _ in trace.tolist():
        if kind in (READ, WRITE) and begin <= address < begin + size:
            element = (address - begin) // tensor.element_size()
            made.setdefault(element, []).append((block, thread, kind))
    return made


def prefetched(trace: torch.Tensor, address: int, size: int) -> torch.Tensor:
    """How often the prefetches of `trace` fetch each 128-byte line of the memory
    [address, address + size)."""
    first = address // LINE
    lines = trace[trace[:, 3] == PREFETCH, 0] // LINE - first
    count = (address + size - 1) // LINE - first + 1
    return torch.bincount(lines[(lines >= 0) & (lines < count)], minlength=count)


def before_wait(trace: torch.Tensor, kind: int) -> dict[tuple[int, int], int]:
    """How many accesses of `kind` each thread (block, thread) of `trace` made before its
    first griddepcontrol.wait; threads that never wait are not in it."""
    made: dict[tuple[int, int], int] = {}
    before: dict[tuple[int, int], int] = {}
    for _, block, thread, k, _ in trace.tolist():
        if k == WAIT:
            before.setdefault((block, thread), made.get((block, thread), 0))
        elif k == kind:
            made[block, thread] = made.get((block, thread), 0) + 1
    return before
