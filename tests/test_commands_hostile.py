"""Commands a careless user can point at their own data: nothing they own is destroyed, and a
checkpoint or recipe that contradicts itself is one `error:` line, not a traceback."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest


def _tree(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in path.rglob("*") if p.is_file()}


@pytest.fixture
def src(tiny_dir, tmp_path) -> Path:
    """A copy of the tiny checkpoint at tmp/par/src (each test may damage its own)."""
    path = tmp_path / "par" / "src"
    shutil.copytree(tiny_dir(), path)
    return path


@pytest.mark.parametrize(
    "command",
    [
        ["quantize", "{src}", "{src}", "--method", "fp16"],
        ["quantize", "{src}", "{par}", "--method", "fp16"],  # the output contains the source
        ["quantize", "{src}", "{par}", "--method", "int8"],
        ["shard", "{src}", "{par}", "--tp", "2"],
        ["shard", "{src}", "{src}", "--tp", "2"],
        ["quantize", "{src}", "{src}/sub", "--method", "fp16"],  # replacing a part of it
    ],
    ids=["same", "parent", "parent-int8", "shard-parent", "shard-same", "inside"],
)
def test_overwrite_never_removes_the_source(cli, src, command):
    (src / "sub").mkdir()
    (src / "sub" / "notes.txt").write_text("mine")
    before = _tree(src)
    args = [a.format(src=src, par=src.parent) for a in command]
    result = cli(*args, "--overwrite")
    assert result.code == 1 and "the source" in result.err, result.err
    assert _tree(src) == before


def test_shard_merge_into_its_own_directory_is_refused(cli, src, tmp_path):
    assert cli("shard", src, tmp_path / "sh", "--tp", "2").code == 0
    before = _tree(tmp_path / "sh")
    result = cli("shard", "merge", tmp_path / "sh", tmp_path, "--overwrite")
    assert result.code == 1 and "contains the source" in result.err
    assert _tree(tmp_path / "sh") == before


def _edit_config(path: Path, **changes) -> None:
    config = json.loads((path / "config.json").read_text())
    config.update(changes)
    (path / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize(
    "command",
    [
        ["quantize", "{src}", "{out}", "--method", "fp16"],
        ["quantize", "{src}", "{out}", "--method", "int8"],
        ["quantize", "{src}", "{out}", "--method", "rtn", "--group-size", "32"],
        ["shard", "{src}", "{out}", "--tp", "2"],
        ["inspect", "{src}"],
    ],
    ids=["fp16", "int8", "rtn", "shard", "inspect"],
)
def test_a_config_that_contradicts_the_tensors_is_one_error_line(cli, src, tmp_path, command):
    _edit_config(src, hidden_size=96)
    out = tmp_path / "out"
    result = cli(*[a.format(src=src, out=out) for a in command])
    assert result.code == 1 and not out.exists()
    assert "model.embed_tokens.weight has shape [512, 64], but config.json implies [512, 96]" in (
        result.err
    )


def test_the_engine_refuses_a_contradicting_config(src):
    from llmkit.errors import LlmkitError
    from llmkit.runtime.engine import Engine

    _edit_config(src, num_key_value_heads=4)
    with pytest.raises(LlmkitError, match=r"k_proj\.weight has shape \[32, 64\].*\[64, 64\]"):
        Engine(src)


@pytest.mark.parametrize("method", ["gptq", "awq", "int8", "w8a8"])
def test_quantized_checkpoints_agree_with_their_configs_and_a_missing_tensor_is_named(
    cli, src, tmp_path, method
):
    from safetensors.torch import load_file, save_file

    out = tmp_path / method
    options = ["--group-size", "32"] if method in ("gptq", "awq") else []
    calib = ["--num-samples", "4", "--seq-len", "32"] if method != "int8" else []
    assert cli("quantize", src, out, "--method", method, *options, *calib).code == 0
    assert cli("inspect", out).code == 0  # opened, so checked, without complaint
    file = out / "model.safetensors"
    tensors = load_file(file)
    name = next(n for n in tensors if n.startswith("model.layers.1.mlp.down_proj.")
                and n.split(".")[-1] in ("weight", "qweight", "weight_packed"))  # fmt: skip
    del tensors[name]
    save_file(tensors, file, metadata={"format": "pt"})
    result = cli("inspect", out)
    assert result.code == 1 and "model.layers.1.mlp.down_proj.weight is missing" in result.err


def test_expected_shapes_are_what_transformers_builds(tiny_dir):
    import torch
    import transformers

    from llmkit.arch.shapes import expected_shapes

    for preset in ("tiny-llama", "tiny-qwen2", "tiny-qwen3"):
        config = json.loads((tiny_dir(preset) / "config.json").read_text())
        hf = transformers.AutoConfig.from_pretrained(tiny_dir(preset))
        with torch.device("meta"):
            model = transformers.AutoModelForCausalLM.from_config(hf)
        built = {n: tuple(p.shape) for n, p in model.state_dict().items()}
        expected = expected_shapes(config)
        assert {n: built[n] for n in expected} == expected


@pytest.mark.parametrize(
    "text,says",
    [
        ("a: &a [x, x, x, x, x, x, x, x, x, x]\n"
         + "".join(f"{c}: &{c} [{', '.join([f'*{p}'] * 10)}]\n"
                   for p, c in zip("abcdef", "bcdefg", strict=True)),
         "expands to over"),
        ("name: &n [*n]\n", "contains itself"),
        ("name: x\nsource: {init: tiny-llama}\noutputs: out\nsteps:\n"
         "  - id: ..\n    quantize: {method: fp16}\n", "may not be . or .."),
    ],
    ids=["alias-bomb", "recursive-alias", "dot-dot-id"],
)  # fmt: skip
def test_hostile_recipes_are_one_error_line_naming_the_line(cli, tmp_path, text, says):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(text)
    start = time.monotonic()
    result = cli("run", recipe)
    assert result.code == 1 and says in result.err and f"{recipe}:" in result.err
    assert time.monotonic() - start < 10


def test_sigterm_during_quantize_leaves_no_temporary_directory(src, tmp_path):
    out = tmp_path / "q"
    options = ["--method", "gptq", "--group-size", "32", "--num-samples", "256", "--seq-len", "256"]
    command = [sys.executable, "-m", "llmkit", "quantize", str(src), str(out), *options]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob(".q.llmkit-tmp-*")) and time.monotonic() < deadline:
        assert proc.poll() is None, proc.stderr.read()
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGTERM)
    assert proc.wait(60) == 128 + signal.SIGTERM
    assert sorted(p.name for p in tmp_path.iterdir()) == ["par"]


def test_corrupted_weights_are_refused_at_load_and_by_inspect_verify(cli, src, tmp_path):
    from llmkit.errors import LlmkitError
    from llmkit.runtime.engine import Engine, EngineConfig

    out = tmp_path / "q"
    assert cli("quantize", src, out, "--method", "rtn", "--group-size", "32").code == 0
    assert cli("inspect", out, "--verify").code == 0
    weights = out / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 4] = b"7777"  # inside a qweight
    weights.write_bytes(bytes(data))
    result = cli("inspect", out, "--verify")
    assert result.code == 1 and "does not match its recorded checksum" in result.err
    with pytest.raises(LlmkitError, match=r"model\.safetensors does not match"):
        Engine(out)
    Engine(out, EngineConfig(verify=False)).close()  # --no-verify: loaded as it is


def test_a_mount_point_is_written_into_in_place(cli, src, tmp_path, monkeypatch):
    volume = tmp_path / "volume"
    volume.mkdir()
    (volume / "old.txt").write_text("replaced once the new output is complete")
    inode = volume.stat().st_ino
    real = os.path.ismount
    monkeypatch.setattr(os.path, "ismount", lambda p: Path(p) == volume or real(p))
    assert cli("quantize", src, volume, "--method", "fp16", "--overwrite").code == 0
    assert volume.stat().st_ino == inode  # the same directory, never renamed
    names = sorted(p.name for p in volume.iterdir())
    assert ".llmkit-complete" in names and "old.txt" not in names
    assert not any(n.startswith(".llmkit-tmp") for n in names)
    assert cli("inspect", volume, "--verify").code == 0
