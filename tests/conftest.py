"""Shared fixtures: tiny checkpoints built once per session, and an in-process CLI runner."""

from __future__ import annotations

import gc
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import pytest

from llmkit.checkpoint import init
from llmkit.checkpoint.init import Preset, init_checkpoint
from llmkit.cli.app import main

TINY_PRESETS = ("tiny-llama", "tiny-qwen2", "tiny-mistral", "tiny-qwen3")
# shapes tests need beside the presets `llmkit init` offers: tiny-llama with heads of 8
# values, as stories260K has (the CPU kernels' narrowest head_dim)
TEST_PRESETS = {
    "tiny-llama-head-dim-8": Preset("llama", "LlamaForCausalLM", 64, 2, 8, 4, 128, 512, 512),
}


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory):
    """A function preset (one of init.PRESETS or TEST_PRESETS) -> path of a float32
    checkpoint of it (seed 0), made once."""
    made: dict[str, Path] = {}

    def get(preset: str = "tiny-llama") -> Path:
        if preset not in made:
            out = tmp_path_factory.mktemp(preset) / "ckpt"
            with mock.patch.dict(init.PRESETS, TEST_PRESETS):
                made[preset] = init_checkpoint(out, preset).path
        return made[preset]

    return get


@dataclass
class CliResult:
    code: int
    out: str
    err: str


@pytest.fixture
def cli(capsys: pytest.CaptureFixture):
    """Run `llmkit ARGS...` in-process; returns exit code and captured output."""

    def run(*args: object) -> CliResult:
        capsys.readouterr()
        try:
            main([str(a) for a in args])
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        finally:
            gc.unfreeze()  # commands that freeze their process's heap froze the tests' too
        captured = capsys.readouterr()
        return CliResult(code, captured.out, captured.err)

    return run


def run_python(code: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run a fresh interpreter (for import-time checks and environment-dependent paths)."""
    import os

    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=120,
    )
