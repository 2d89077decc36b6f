"""The CPU C++ kernels (cpu_ops.cpp: attention and element-wise; cpu_gemm.cpp: matrix
products against quantized and half-precision weights; cpu_layer.cpp: a decoder layer of a
decode step in one call; cpu_lora.cpp: LoRA adapters' products; cpu_vec.h: AVX2 helpers they
share), built once per machine with the local compiler by torch's extension loader and cached
(~/.cache/torch_extensions, or $TORCH_EXTENSIONS_DIR) under a name keyed by the sources, the
flags, torch, Python and the CPU's features, so a later start loads the library directly (no
extension loader, no ninja run).

`ops()` is None, with one warning, when they cannot be built (no compiler, no ninja) or when
LLMKIT_CPU_KERNELS=0; callers then use their torch path.

They are compiled for this CPU (-march=native): its widest vectors, VNNI and AVX512-BF16
where it has them. LLMKIT_CPU_ARCH names another target for the compiler's -march (e.g.
`haswell`, for AVX2 only): a build to copy to older hosts, or to measure the AVX2 kernels on
a CPU that has AVX-512.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import logging
import os
import platform
import re
import sys
import warnings
from pathlib import Path

import torch

log = logging.getLogger("llmkit.kernels")
SOURCES = tuple(
    Path(__file__).with_name(name)
    for name in ("cpu_ops.cpp", "cpu_gemm.cpp", "cpu_layer.cpp", "cpu_lora.cpp")
)
HEADERS = (Path(__file__).with_name("cpu_vec.h"),)  # included by the sources
DTYPES = (torch.float32, torch.bfloat16)  # the activation dtypes the kernels take
HEAD_DIM_MULTIPLE = 8  # the attention kernels take head dims that are multiples of this
# no FMA contraction: the element-wise kernels round as the torch ops they replace
CFLAGS = ("-O3", "-ffp-contract=off", "-fopenmp")
LDFLAGS = ("-fopenmp",)
ARCH = re.compile(r"[a-z0-9][a-z0-9_.+-]{0,63}")  # what LLMKIT_CPU_ARCH may name


@functools.cache
def ops():
    """torch.ops.llmkit_cpu once the kernels are built and loaded, else None."""
    if os.environ.get("LLMKIT_CPU_KERNELS", "1") == "0":
        return None
    try:
        _load_or_build()
    except Exception as e:  # no compiler, a failed build: the torch paths still work
        warnings.warn(
            f"llmkit's CPU kernels are unavailable ({_reason(e)}); using torch paths", stacklevel=2
        )
        return None
    return torch.ops.llmkit_cpu


def for_tensors(*tensors: torch.Tensor):
    """ops() when the tensors are all CPU tensors of one dtype in DTYPES, else None. Called
    for every kernel of every step: kept to attribute reads."""
    dtype = tensors[0].dtype
    if dtype not in DTYPES:
        return None
    for t in tensors:
        if not t.is_cpu or t.dtype is not dtype:
            return None
    return ops()


def _load_or_build() -> None:
    name = f"llmkit_cpu_{_build_key()}"
    directory = _extensions_root() / name
    library, ready = directory / f"{name}.so", directory / "ready"  # ready: built and loaded

    def built() -> bool:
        return ready.exists() and library.exists()

    if not built():
        directory.mkdir(parents=True, exist_ok=True)
        with _build_lock(directory):
            if not built():  # (else another process built it while this one waited)
                _build(name, directory, ready)  # torch's loader loads what it builds
                return
    torch.ops.load_library(str(library))


@contextlib.contextmanager
def _build_lock(directory: Path):
    """One build at a time per library, held as a lock the system frees when its process
    ends; so torch's own lock file, when one is there, was left by a build killed part-way
    (torch's loader would wait on it forever) and is removed."""
    with open(directory / "build.flock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        (directory / "lock").unlink(missing_ok=True)
        yield


def _build(name: str, directory: Path, ready: Path) -> None:
    from torch.utils.cpp_extension import load

    log.info("loading llmkit's CPU kernels (compiled the first time, ~20 s)")
    load(
        name=name,
        sources=[str(source) for source in SOURCES],
        extra_cflags=cflags(),  # a new list: the loader appends to the lists it is given
        extra_ldflags=list(LDFLAGS),
        build_directory=str(directory),
        is_python_module=False,
        verbose=False,
    )
    pending = directory / f"ready.{os.getpid()}"
    pending.write_text(f"{name}\n")
    pending.replace(ready)


def cflags() -> list[str]:
    """The compiler's flags: CFLAGS and the -march that LLMKIT_CPU_ARCH names (native when
    unset)."""
    arch = os.environ.get("LLMKIT_CPU_ARCH", "native")
    if not ARCH.fullmatch(arch):
        raise ValueError(f"LLMKIT_CPU_ARCH={arch!r} is not a -march target such as haswell")
    return [*CFLAGS, f"-march={arch}"]


def _build_key() -> str:
    """What the compiled library depends on: the sources, the flags, torch, Python, and
    (for -march=native) the CPU's instruction-set features."""
    digest = hashlib.sha256()
    for source in (*SOURCES, *HEADERS):
        digest.update(source.read_bytes())
    for part in (*cflags(), *LDFLAGS, torch.__version__, sys.version, _cpu_features()):
        digest.update(b"\0" + part.encode())
    return digest.hexdigest()[:16]


def _cpu_features() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        flags = ""
    return f"{platform.machine()} {flags.strip()}"


def _extensions_root() -> Path:
    """Where torch's extension loader keeps its builds."""
    if root := os.environ.get("TORCH_EXTENSIONS_DIR"):
        return Path(root)
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "torch_extensions"


def _reason(error: Exception) -> str:
    """The line of a build failure that says what went wrong (the compiler's error if any)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    errors = [line for line in lines if "error" in line.lower()]
    return (errors or lines or [type(error).__name__])[-1][:300]
