"""GPTQ and AWQ interop with GPTQModel 7.6.0 in its own venv: it loads llmkit's checkpoints
with the weights llmkit computes with, and llmkit reads the checkpoints GPTQModel writes."""

from __future__ import annotations

import json
import os
import select
import subprocess
from pathlib import Path

import pytest
import torch

from llmkit.bench.model import load_model
from llmkit.quant.calibration import CalibrationSpec
from llmkit.quant.options import AWQOptions, GPTQOptions
from llmkit.quant.pipeline import quantize
from tests.bench_helpers import benchmark

ROOT = Path(__file__).resolve().parent.parent
GPTQMODEL = ROOT / ".refvenvs" / "gptqmodel" / "bin" / "python"
IDS = [[1, 40, 41, 42, 100, 7, 300, 12, 5, 77, 90, 200]]

pytestmark = pytest.mark.skipif(
    not GPTQMODEL.exists(),
    reason="the gptqmodel 7.6.0 venv is not set up: bash benchmarks/setup_reference_venvs.sh "
    "gptqmodel (.ci/run does this)",
)


class Worker:
    """tests/interop/gptqmodel_worker.py in GPTQModel's venv: calling it runs a script there
    as `python SCRIPT ARGS...` in `cwd` (which receives the log folder GPTQModel writes)."""

    def __init__(self, log: Path):
        self.log = log
        env = {**os.environ, "GPTQMODEL_CPU_WORKERS": "2"}
        command = [GPTQMODEL, ROOT / "tests" / "interop" / "gptqmodel_worker.py"]
        with log.open("w") as stderr:
            self.proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         stderr=stderr, text=True, env=env)  # fmt: skip

    def __call__(self, cwd: Path, *args: object) -> None:
        request = {"cwd": str(cwd), "argv": [str(a) for a in args]}
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        answered = select.select([self.proc.stdout], [], [], 600)[0]
        line = self.proc.stdout.readline() if answered else ""
        if not line:
            self.proc.kill()
        assert line, f"GPTQModel's worker {'died' if answered else 'took 600 s'}: " + self.tail()
        error = json.loads(line)["error"]
        assert error is None, self.tail() + "\n" + error

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]

    def close(self) -> None:
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()


@pytest.fixture(scope="module")
def gptqmodel(tmp_path_factory):
    """One worker for the module: it imports GPTQModel once, while the first test quantizes."""
    worker = Worker(tmp_path_factory.mktemp("gptqmodel") / "worker.log")
    yield worker
    worker.close()


def gptqmodel_view(run: Worker, checkpoint: Path, tmp_path: Path, backend: str = "torch") -> dict:
    """What GPTQModel computes with for `checkpoint`: dequantized weights and fp16 logits."""
    ids, out = tmp_path / "ids.json", tmp_path / "dump.pt"
    ids.write_text(json.dumps(IDS))
    run(tmp_path, ROOT / "tests" / "interop" / "gptqmodel_dump.py", checkpoint, ids, out, backend)
    return torch.load(out)


def assert_same_weights(checkpoint: Path, theirs: dict) -> None:
    ours = load_model(checkpoint).state_dict()
    assert len(theirs["weights"]) == 14
    for name, weight in theirs["weights"].items():
        # GPTQModel dequantizes in fp16: scale * (q - zero), rounded once.
        assert torch.equal(ours[f"{name}.weight"].half().float(), weight), name


@pytest.mark.parametrize(("bits", "desc_act"), [(4, True), (3, False)])
def test_gptqmodel_loads_llmkit_checkpoints(gptqmodel, tiny_dir, tmp_path, bits, desc_act):
    out = tmp_path / "q"
    quantize(
        tiny_dir("tiny-llama"),
        out,
        "gptq",
        options=GPTQOptions(bits=bits, group_size=32, desc_act=desc_act),
        calibration=CalibrationSpec(num_samples=8, seq_len=64),
    )
    theirs = gptqmodel_view(gptqmodel, out, tmp_path)
    assert_same_weights(out, theirs)
    with torch.no_grad():
        ours = load_model(out, dtype=torch.float16)(torch.tensor(IDS)).logits.float()
    assert torch.allclose(ours, theirs["logits"], atol=1e-2)


def quantize_with_gptqmodel(run: Worker, model: Path, tmp_path: Path, *options: str) -> Path:
    ids = tmp_path / "calibration.json"
    ids.write_text(json.dumps([[1, *range(10 + i, 73 + i)] for i in range(8)]))
    out = tmp_path / "by-gptqmodel"
    script = ROOT / "benchmarks" / "reference" / "gptqmodel_quantize.py"
    run(tmp_path, script, model, ids, out, "--group-size", "32", *options)
    return out


def test_llmkit_reads_gptqmodel_checkpoints(gptqmodel, tiny_dir, tmp_path):
    out = quantize_with_gptqmodel(gptqmodel, tiny_dir("tiny-llama"), tmp_path, "--desc-act")
    assert json.loads((out / "config.json").read_text())["quantization_config"]["desc_act"]
    assert_same_weights(out, gptqmodel_view(gptqmodel, out, tmp_path))


def test_gptqmodel_loads_llmkit_awq_checkpoints(gptqmodel, tiny_dir, tmp_path):
    out = tmp_path / "q"
    quantize(
        tiny_dir("tiny-llama"),
        out,
        "awq",
        options=AWQOptions(group_size=32),
        calibration=CalibrationSpec(num_samples=8, seq_len=64),
    )
    theirs = gptqmodel_view(gptqmodel, out, tmp_path, "awq_torch")
    assert_same_weights(out, theirs)
    with torch.no_grad():
        ours = load_model(out, dtype=torch.float16)(torch.tensor(IDS)).logits.float()
    assert torch.allclose(ours, theirs["logits"], atol=1e-2)


def widen():
    """benchmarks/widen.py's `widen`: GPTQModel's AWQ needs outputs in multiples of 64."""
    return benchmark("widen").widen


def test_llmkit_reads_gptqmodel_awq_checkpoints(gptqmodel, tiny_dir, tmp_path):
    wide = widen()(tiny_dir("tiny-llama"), tmp_path / "wide")
    out = quantize_with_gptqmodel(gptqmodel, wide, tmp_path, "--method", "awq")
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "awq" and config["version"] == "gemm"
    assert_same_weights(out, gptqmodel_view(gptqmodel, out, tmp_path, "awq_torch"))
