"""CUDA C++ kernels compiled at run time by NVRTC and launched through the driver API.

torch's CUDA wheels ship NVRTC (the nvidia-cuda-nvrtc package), so a kernel written in
CUDA C++ needs no compiler toolchain on the user's machine: `Module(source, names)`
compiles the source for the current device's architecture (once per process and
device) and `Module.launch` queues a kernel on torch's current stream, where
CUDA graph capture records it like any torch kernel. Compile and load a module before
capturing: loading is not allowed while a stream captures.

Compiled cubins are kept on disk (`cubin_dir`), named by everything they depend on (the
source, its name, the architecture, the macros and NVRTC's version), so a later process
loads one instead of compiling it again (a second or more per module); a kept cubin the
driver refuses is compiled again and replaced. `compile_reported` also gives what ptxas
reports of each kernel (registers, spilled bytes), which needs no GPU.

Nothing here is imported by llmkit's CPU paths.
"""

from __future__ import annotations

import ctypes
import functools
import glob
import hashlib
import os
import re
import sys
import tempfile
from pathlib import Path
from typing import NamedTuple

import torch

# cuLaunchKernelEx's launch attribute that lets a kernel start before the one before it in
# the stream has finished (programmatic dependent launch; compute capability 9.0 and newer)
PROGRAMMATIC_STREAM_SERIALIZATION = 6


class LaunchAttribute(ctypes.Structure):  # CUlaunchAttribute (cuda.h)
    _fields_ = [("id", ctypes.c_int), ("pad", ctypes.c_char * 4), ("value", ctypes.c_int * 16)]


class LaunchConfig(ctypes.Structure):  # CUlaunchConfig (cuda.h)
    _fields_ = [
        *[(f"{what}Dim{axis}", ctypes.c_uint) for what in ("grid", "block") for axis in "XYZ"],
        ("sharedMemBytes", ctypes.c_uint),
        ("hStream", ctypes.c_void_p),
        ("attrs", ctypes.POINTER(LaunchAttribute)),
        ("numAttrs", ctypes.c_uint),
    ]


COMMON = Path(__file__).with_name("cuda_common.cuh")  # the helpers the kernels share


def source(path: Path) -> str:
    """The text NVRTC compiles for the kernels of `path`: cuda_common.cuh's helpers, then
    the file, whose lines compiler messages number as its own."""
    return f'{COMMON.read_text()}#line 1 "{path.name}"\n{path.read_text()}'


class CudaError(RuntimeError):
    """NVRTC or the driver refused: a one-line reason (with the compiler's log)."""


def _library(names: list[str], pattern: str) -> ctypes.CDLL:
    """The first of `names` the loader finds, else a file matching `pattern` under a
    site-packages `nvidia/` folder (where the CUDA wheels put their libraries)."""
    for name in names:
        try:
            return ctypes.CDLL(name)
        except OSError:
            continue
    for base in sys.path:
        for path in sorted(glob.glob(os.path.join(base, "nvidia", "*", "lib", pattern))):
            return ctypes.CDLL(path)
    raise CudaError(f"none of {', '.join(names)} could be loaded")


def _nvrtc() -> ctypes.CDLL:
    major = (torch.version.cuda or "").split(".")[0]
    return _library([f"libnvrtc.so.{major}", "libnvrtc.so"], f"libnvrtc.so.{major}*")


def _driver() -> ctypes.CDLL:
    lib = _library(["libcuda.so.1", "libcuda.so"], "libcuda.so*")
    lib.cuLaunchKernel.argtypes = [ctypes.c_void_p, *[ctypes.c_uint] * 7, ctypes.c_void_p,
                                   ctypes.POINTER(ctypes.c_void_p), ctypes.c_void_p]  # fmt: skip
    lib.cuLaunchKernelEx.argtypes = [ctypes.POINTER(LaunchConfig), ctypes.c_void_p,
                                     ctypes.POINTER(ctypes.c_void_p), ctypes.c_void_p]  # fmt: skip
    lib.cuOccupancyMaxActiveBlocksPerMultiprocessor.argtypes = [
        ctypes.POINTER(ctypes.c_int),
        ctypes.c_void_p,
        ctypes.c_int,
        ctypes.c_size_t,
    ]
    return lib


def driver_version() -> int:
    """The CUDA version the driver supports, as 1000 major + 10 minor (12030: 12.3)."""
    lib = _driver()
    version = ctypes.c_int()
    _check_driver(lib, lib.cuDriverGetVersion(ctypes.byref(version)), "cuDriverGetVersion")
    return version.value


@functools.cache
def programmatic(device: torch.device) -> bool:
    """Whether kernels on CUDA `device` may launch as programmatic dependents: a GPU of
    compute capability 9.0 or newer and a driver of CUDA 12.3 or newer (which records
    such launches in CUDA graphs)."""
    try:
        version = driver_version()
    except (OSError, RuntimeError):
        return False
    return torch.cuda.get_device_capability(device) >= (9, 0) and version >= 12030


def _check_driver(lib: ctypes.CDLL, status: int, what: str) -> None:
    if status:
        name = ctypes.c_char_p()
        lib.cuGetErrorName(status, ctypes.byref(name))
        raise CudaError(f"{what}: {(name.value or b'?').decode()} ({status})")


def compile_cubin(source: str, name: str, arch: tuple[int, int], defines=()) -> bytes:
    """`source` compiled by NVRTC into a cubin for compute capability `arch`, with the
    macros `defines` ("NAME=VALUE") set."""
    return _compile(source, name, arch, defines)[0]


def _compile(source: str, name: str, arch: tuple[int, int], defines, extra=()) -> tuple:
    """(compile_cubin's cubin, NVRTC's log), with the options `extra` added."""
    lib = _nvrtc()
    program = ctypes.c_void_p()
    status = lib.nvrtcCreateProgram(ctypes.byref(program), source.encode(), name.encode(),
                                    0, None, None)  # fmt: skip
    if status:
        raise CudaError(f"nvrtcCreateProgram: status {status}")
    options = [f"--gpu-architecture=sm_{arch[0]}{arch[1]}".encode(), b"-default-device",
               b"--std=c++17", *[f"-D{d}".encode() for d in defines],
               *[o.encode() for o in extra]]  # fmt: skip
    try:
        status = lib.nvrtcCompileProgram(
            program, len(options), (ctypes.c_char_p * len(options))(*options)
        )
        size = ctypes.c_size_t()
        lib.nvrtcGetProgramLogSize(program, ctypes.byref(size))
        log = ctypes.create_string_buffer(size.value)
        lib.nvrtcGetProgramLog(program, log)
        log = log.value.decode(errors="replace")
        if status:
            raise CudaError(f"{name} did not compile: " + "; ".join(log.split("\n")).strip("; "))
        lib.nvrtcGetCUBINSize(program, ctypes.byref(size))
        cubin = ctypes.create_string_buffer(size.value)
        lib.nvrtcGetCUBIN(program, cubin)
        return cubin.raw, log
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(program))


class Resources(NamedTuple):
    """What ptxas gives one kernel, a thread: registers, its stack frame in bytes, and the
    bytes its code spills to that local memory and loads back (each instruction counted
    once, however often it runs)."""

    registers: int
    stack: int
    spill_stores: int
    spill_loads: int


_PROPERTIES = re.compile(
    r"Function properties for (\w+)\n.*?(\d+) bytes stack frame, (\d+) bytes spill stores, "
    r"(\d+) bytes spill loads\n.*?Used (\d+) registers"
)


def compile_reported(source: str, name: str, arch: tuple[int, int], defines=()) -> tuple:
    """(compile_cubin's cubin, each of its kernels' Resources by name, as ptxas reports them),
    without a GPU. A kernel that spills moves registers through local memory: traffic beside
    the weights a product streams."""
    cubin, log = _compile(source, name, arch, defines, ["--ptxas-options=-v"])
    found = _PROPERTIES.findall(log)
    return cubin, {kernel: Resources(*map(int, (registers, stack, stores, loads)))
                   for kernel, stack, stores, loads, registers in found}  # fmt: skip


def cubin_dir() -> Path:
    """Where compiled cubins are kept: $LLMKIT_CACHE_DIR/cubin, else llmkit/cubin under
    $XDG_CACHE_HOME or ~/.cache."""
    root = os.environ.get("LLMKIT_CACHE_DIR")
    if not root:
        root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "llmkit"
    return Path(root) / "cubin"


def nvrtc_version() -> tuple[int, int]:
    lib = _nvrtc()
    major, minor = ctypes.c_int(), ctypes.c_int()
    if lib.nvrtcVersion(ctypes.byref(major), ctypes.byref(minor)):
        raise CudaError("nvrtcVersion failed")
    return major.value, minor.value


def cached_cubin(source: str, name: str, arch: tuple[int, int], defines=(),
                 fresh: bool = False) -> tuple[bytes, bool]:  # fmt: skip
    """(the cubin compile_cubin makes of these, whether it was read from cubin_dir rather
    than compiled now); `fresh`: compiled whatever is kept. A cubin compiled is kept (written
    whole or not at all; where the directory cannot be written, or NVRTC does not say its
    version, not kept)."""
    try:
        version = nvrtc_version()
    except (OSError, CudaError, AttributeError):
        return compile_cubin(source, name, arch, defines), False
    key = hashlib.sha256()
    for piece in (source, name, repr(tuple(arch)), repr(tuple(defines)), repr(version)):
        key.update(piece.encode() + b"\0")
    path = cubin_dir() / f"{key.hexdigest()[:32]}.cubin"
    if not fresh:
        try:
            return path.read_bytes(), True
        except OSError:
            pass
    cubin = compile_cubin(source, name, arch, defines)
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd, part = tempfile.mkstemp(dir=path.parent, suffix=".part")
    except OSError:
        return cubin, False
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(cubin)
        os.replace(part, path)
    except OSError:
        Path(part).unlink(missing_ok=True)
    return cubin, False


def load_module(lib, source: str, name: str, arch: tuple[int, int], defines=()):
    """The driver's module of `source` compiled for `arch` (cached_cubin's; a kept cubin
    the driver refuses is compiled again, once)."""
    module = ctypes.c_void_p()
    cubin, kept = cached_cubin(source, name, arch, defines)
    status = lib.cuModuleLoadData(ctypes.byref(module), cubin)
    if status and kept:
        cubin, _ = cached_cubin(source, name, arch, defines, fresh=True)
        status = lib.cuModuleLoadData(ctypes.byref(module), cubin)
    _check_driver(lib, status, f"loading {name}")
    return module


class Module:
    """The kernels `names` (extern "C") of `source`, compiled with the macros `defines` and
    loaded for `device`."""

    def __init__(self, source: str, name: str, names: list[str], device: torch.device,
                 defines=()):  # fmt: skip
        self.device = device
        with torch.cuda.device(device):
            torch.empty(1, device=device)  # the device's context current on this thread
            arch = torch.cuda.get_device_capability(device)
            self._lib = _driver()
            module = load_module(self._lib, source, name, arch, defines)
        self._module = module  # held: unloading it would free the kernels
        # whether a launch asked to be dependent is one (else a plain launch)
        self.programmatic = programmatic(device)
        self._kernels = {}
        for kernel in names:
            func = ctypes.c_void_p()
            status = self._lib.cuModuleGetFunction(ctypes.byref(func), module, kernel.encode())
            _check_driver(self._lib, status, f"{name}: kernel {kernel}")
            self._kernels[kernel] = func

    def blocks_per_sm(self, kernel: str, block: int) -> int:
        """How many blocks of `block` threads of `kernel` one SM runs at once (the driver's
        count, from the registers and shared memory the compiled kernel uses)."""
        count = ctypes.c_int()
        status = self._lib.cuOccupancyMaxActiveBlocksPerMultiprocessor(
            ctypes.byref(count), self._kernels[kernel], block, 0
        )
        _check_driver(self._lib, status, f"occupancy of {kernel}")
        return count.value

    def launch(self, kernel: str, grid: int, block: int, *args, dependent: bool = False):
        """`kernel` on `grid` blocks of `block` threads, on the current stream; `args` are
        tensors (passed as their data pointers; None as a null pointer), Python ints (as
        32-bit ints) and floats (as 32-bit floats). `dependent` (where `programmatic`): as a
        programmatic dependent launch, which may start before the kernel before it has
        finished; the kernel must wait (griddepcontrol.wait) before it reads what that
        kernel writes or writes anything."""
        pointers = parameters(args)
        stream = torch.cuda.current_stream(self.device).cuda_stream
        if dependent and self.programmatic:
            attribute = LaunchAttribute(id=PROGRAMMATIC_STREAM_SERIALIZATION)
            attribute.value[0] = 1
            config = LaunchConfig(grid, 1, 1, block, 1, 1, 0, stream, ctypes.pointer(attribute), 1)
            status = self._lib.cuLaunchKernelEx(config, self._kernels[kernel], pointers, None)
        else:
            status = self._lib.cuLaunchKernel(
                self._kernels[kernel], grid, 1, 1, block, 1, 1, 0, stream, pointers, None
            )
        _check_driver(self._lib, status, f"launching {kernel}")


_CHECKED: dict[tuple, Module | Exception] = {}  # (path, defines, device) -> module or failure


def checked_kernels(path: Path, names, defines, device: torch.device, check) -> Module:
    """The kernels `names` of `path` (with cuda_common.cuh's helpers, `source`) compiled
    with `defines` and loaded for CUDA `device` (with no index: the current device), once
    `check(module, device)` passed: it raises CudaError where a kernel computes something
    else, and where it does so with programmatic launches, they are turned off and it runs
    again (a driver may refuse them). Made once per path, defines and device and kept, as
    is a failure (CudaError, or OSError where NVRTC or the driver cannot be loaded), which
    every later call raises again: a model's every layer asks, and would otherwise compile
    again for each."""
    index = torch.cuda.current_device() if device.index is None else device.index
    device = torch.device("cuda", index)
    key = (path, tuple(defines), device)
    if key not in _CHECKED:
        try:
            _CHECKED[key] = _checked(Module(source(path), path.name, list(names), device,
                                            list(defines)), check)  # fmt: skip
        except (OSError, RuntimeError) as e:
            _CHECKED[key] = e
    if isinstance(_CHECKED[key], Exception):
        raise _CHECKED[key]
    return _CHECKED[key]


def _checked(module: Module, check) -> Module:
    try:
        check(module, module.device)
    except CudaError:
        if not module.programmatic:
            raise
        module.programmatic = False
        check(module, module.device)
    return module


def parameters(args) -> ctypes.Array:
    """cuLaunchKernel's kernelParams for `args` (as Module.launch takes them): an array of
    pointers to each value, which it holds (as `values`)."""
    values = [_argument(a) for a in args]
    pointers = (ctypes.c_void_p * len(values))(
        *[ctypes.cast(ctypes.byref(v), ctypes.c_void_p) for v in values]
    )
    pointers.values = values
    return pointers


def _argument(value):
    """A kernel argument as the kernel reads it: a tensor's data pointer (None: a null
    pointer), a 32-bit int or a 32-bit float."""
    if value is None:
        return ctypes.c_void_p(None)
    if isinstance(value, torch.Tensor):
        return ctypes.c_void_p(value.data_ptr())
    if isinstance(value, float):
        return ctypes.c_float(value)
    return ctypes.c_int(value)
