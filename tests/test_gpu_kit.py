"""benchmarks/gpu_kit.sh, run in a copy of its folder with a stand-in for python whose pip
download records its arguments and leaves a wheel (the script's own logic: what it asks pip
for, what it copies from SHARED, its refusal; the real download needs the package registry)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_kit.sh"

FAKE_PYTHON = """#!/usr/bin/env bash
echo "$*" > "$FAKE_CALL"
while [ $# -gt 0 ]; do [ "$1" = -d ] && touch "$2/x-1-py3-none-any.whl"; shift; done
"""


def _run(tmp_path: Path, shared: Path) -> subprocess.CompletedProcess:
    root = tmp_path / "checkout"
    (root / "benchmarks").mkdir(parents=True)
    shutil.copy(SCRIPT, root / "benchmarks" / "gpu_kit.sh")
    fake = tmp_path / "python"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(0o755)
    variables = {
        **os.environ,
        "PYTHON": str(fake),
        "FAKE_CALL": str(tmp_path / "call"),
        "SHARED": str(shared),
    }
    return subprocess.run(
        ["bash", str(root / "benchmarks" / "gpu_kit.sh")],
        env=variables,
        capture_output=True,
        text=True,
        timeout=60,
    )


def _shared(tmp_path: Path) -> Path:
    shared = tmp_path / "my shared"
    for model in ("stories260K", "stories260K-pad176"):
        (shared / "models" / model).mkdir(parents=True)
        (shared / "models" / model / "config.json").write_text(model)
    (shared / "data").mkdir()
    (shared / "data" / "tinyshakespeare.txt").write_text("ROMEO:")
    return shared


def test_the_kit_holds_the_downloaded_wheels_and_the_shared_files(tmp_path):
    done = _run(tmp_path, _shared(tmp_path))
    assert done.returncode == 0, done.stdout + done.stderr
    args = (tmp_path / "call").read_text().split()
    assert args[:3] == ["-m", "pip", "download"]
    assert {"--no-deps", "--only-binary=:all:", "manylinux_2_17_x86_64"} <= set(args)
    assert args[args.index("--python-version") + 1] == "3.12"
    packages = [a for a in args if "==" in a]  # every package at one version
    assert "fastapi==0.165.0" in packages and any(p.startswith("llguidance==") for p in packages)
    kit = tmp_path / "checkout" / "gpu-kit"
    assert [p.name for p in (kit / "wheels").iterdir()] == ["x-1-py3-none-any.whl"]
    shared = kit / "shared"
    assert (shared / "models" / "stories260K-pad176" / "config.json").read_text() == (
        "stories260K-pad176"
    )
    assert (shared / "data" / "tinyshakespeare.txt").read_text() == "ROMEO:"
    assert done.stdout.startswith("gpu_kit.sh: 1 wheels and stories260K in gpu-kit")


def test_a_shared_folder_without_the_models_is_one_line_and_exit_2(tmp_path):
    shared = _shared(tmp_path)
    shutil.rmtree(shared / "models" / "stories260K-pad176")
    done = _run(tmp_path, shared)
    assert (done.returncode, done.stderr.splitlines()) == (
        2,
        [
            f"gpu_kit.sh: no {shared}/models/stories260K-pad176 (set SHARED to the folder"
            " with models/ and data/)"
        ],
    )
    assert not (tmp_path / "call").exists()
    assert not (tmp_path / "checkout" / "gpu-kit").exists()
