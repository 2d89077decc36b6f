"""benchmarks/cuda_profile.py's logic that needs no GPU: the kinds its kernels fall in, the
per-token figures, and its flow (one process a checkpoint and mode) on the CPU."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from llmkit.kernels import cuda_int4, cuda_int8
from tests.bench_helpers import BENCHMARKS, benchmark

KERNELS = Path(__file__).resolve().parent.parent / "llmkit" / "kernels"
# each Triton kernel a model's step may launch (all but quantization's), by the kind it is
TRITON_KINDS = {
    "_decode_kernel": "attention",
    "_prefill_kernel": "attention",
    "_write_kv_kernel": "K/V write",
    "_norm_kernel": "norms",
    "_silu_mul_kernel": "silu * up",
    "_int8_kernel": "int8 products",
    "_quantize_kernel": "int8 products",
    "_descend_kernel": "reductions (argmax, sampling)",
}


def test_every_kernel_llmkit_launches_in_a_step_falls_in_its_kind():
    profile = benchmark("cuda_profile")
    launched = set()
    for source in KERNELS.glob("triton_*.py"):
        if source.name != "triton_gptq.py":  # GPTQ's column sweep runs while quantizing
            launched |= set(re.findall(r"@triton\.jit.*\ndef (\w+_kernel)\(", source.read_text()))
    assert launched == set(TRITON_KINDS)  # a new kernel needs a kind here and in KINDS
    for name, kind in TRITON_KINDS.items():
        assert profile.kind_of(f"{name}_0d1d2d") == kind
    for name in cuda_int4._KERNELS.values():
        assert profile.kind_of(name) == "4-bit products", name
    for name in cuda_int8.NAMES:
        assert profile.kind_of(name) == "int8 products", name
    assert profile.kind_of("void gemv2T_kernel_val<int, int, __nv_bfloat16>") == "cuBLAS products"
    assert profile.kind_of("Memcpy HtoD (Pageable -> Device)") == "copies and elementwise"
    assert profile.kind_of("something else") == profile.OTHER


def test_the_figures_are_per_token_and_the_kinds_add_up_to_the_busy_time():
    profile = benchmark("cuda_profile")
    kernels = {"_decode_kernel": (64, 640.0), "int4_gemv_fold4_m1": (256, 12800.0),
               "int4_silu_fold4_m1": (64, 3200.0), "mystery": (32, 32.0)}  # fmt: skip
    out = profile.summarize(kernels, tokens=32, wall_s=0.02)
    assert out["ms_per_token"] == pytest.approx(0.625)
    assert out["busy_ms_per_token"] == pytest.approx(16672.0 / 1e3 / 32)
    assert out["kernels_per_token"] == pytest.approx(416 / 32)
    kinds = out["kinds"]
    assert list(kinds) == ["4-bit products", "attention", profile.OTHER]  # longest first
    assert kinds["4-bit products"] == {"us_per_token": 500.0, "calls_per_token": 10.0}
    assert sum(k["us_per_token"] for k in kinds.values()) == pytest.approx(16672.0 / 32)
    assert out["top"][0]["kernel"] == "int4_gemv_fold4_m1" and out["top"][0]["us_mean"] == 50.0


def test_each_checkpoint_and_mode_is_profiled_in_a_process_of_its_own(tiny_dir):
    """The flow on the CPU (its ops in place of kernels): a line per mode, counting the
    tokens decoded after the first."""
    script = BENCHMARKS / "cuda_profile.py"
    args = ["--device", "cpu", "--tokens", "8", "--pdl", "on,off", str(tiny_dir("tiny-llama"))]
    done = subprocess.run([sys.executable, script, *args], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    assert [line["pdl"] for line in lines] == ["on", "off"]
    assert all(line["tokens"] == 7 and line["ms_per_token"] > 0 for line in lines)


@pytest.mark.parametrize("args", [["--pdl", "sideways"], ["--tokens", "1"]])
def test_a_bad_option_is_one_error(args):
    script = BENCHMARKS / "cuda_profile.py"
    done = subprocess.run([sys.executable, script, *args, "ckpt"], capture_output=True, text=True)
    assert done.returncode == 2 and "error:" in done.stderr and "Traceback" not in done.stderr
