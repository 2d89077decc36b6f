"""benchmarks/gpu_checks.sh, run in a copy of its folder with a stand-in for python that says
it sees a GPU and records what it is asked to run (the script's own logic: steps, refusals,
the budget, logs and result files; the GPU steps themselves run on a GPU machine only)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_checks.sh"

FAKE_PYTHON = """#!/usr/bin/env bash
if [ "$1" = -c ]; then exit "${FAKE_NO_GPU:-0}"; fi
echo "$*" >> "$FAKE_CALLS"
echo "${PYTHONPATH:-}" >> "$FAKE_CALLS.paths"
case "$*" in
*"pip install"*) exit "${FAKE_PIP_RC:-0}" ;;
*speculative.py*) echo '{}' > benchmarks/results/speculative-cuda-c1-x.json ;;
*cuda.py*) echo "cuda run"; exit "${FAKE_CUDA_RC:-0}" ;;
esac
"""


def _checkout(tmp_path: Path) -> Path:
    root = tmp_path / "checkout"
    (root / "benchmarks" / "results").mkdir(parents=True)
    shutil.copy(SCRIPT, root / "benchmarks" / "gpu_checks.sh")
    (root / "benchmarks" / "RESULTS.md").write_text("# results\n")
    (root / "benchmarks" / "results" / "old.json").write_text("{}")
    fake = tmp_path / "python"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(0o755)
    return root


def _run(tmp_path: Path, *steps: str, kit: bool = False, **env: str) -> subprocess.CompletedProcess:
    root = _checkout(tmp_path)
    if kit:  # what benchmarks/gpu_kit.sh packs: wheels and the shared models
        (root / "gpu-kit" / "wheels").mkdir(parents=True)
        (root / "gpu-kit" / "wheels" / "a-1.0-py3-none-any.whl").write_text("")
        (root / "gpu-kit" / "shared").mkdir()
    variables = {
        **os.environ,
        "PYTHON": str(tmp_path / "python"),
        "FAKE_CALLS": str(tmp_path / "calls"),
        "LOGS": "logs",
        "WORKDIR": str(tmp_path / "work"),
        **env,
    }
    return subprocess.run(
        ["bash", str(root / "benchmarks" / "gpu_checks.sh"), *steps],
        env=variables,
        capture_output=True,
        text=True,
        timeout=60,
    )


def _calls(tmp_path: Path, what: str = "calls") -> list[str]:
    path = tmp_path / what
    return path.read_text().splitlines() if path.exists() else []


def test_every_step_runs_in_order_with_its_log_and_results(tmp_path):
    done = _run(tmp_path, SHARED="/data/my shared")
    assert done.returncode == 0, done.stdout + done.stderr
    calls = _calls(tmp_path)  # the arguments each call gave python
    assert [c.split()[:2] for c in calls] == [
        ["-m", "pytest"],
        ["benchmarks/cuda.py", "--workdir"],
        ["benchmarks/speculative.py", "--device"],
        ["benchmarks/cuda.py", "--workdir"],
    ]
    assert calls[0].endswith("-k cuda and not emulated tests")  # the emulator's: CI runs them
    assert "--methods gptq,awq" in calls[1] and "--anchors hf-compiled" in calls[1]
    assert calls[3].endswith("--models 1b --methods  --anchors  --bf16-parts eager")
    assert " --rounds 5 " in calls[2] and calls[2].endswith("--shared /data/my shared")
    logs = tmp_path / "checkout" / "logs"
    assert (logs / "cuda.log").read_text() == "cuda run\n"
    # the result a step wrote, named by its step; results from before the run stay behind
    assert sorted(p.name for p in logs.glob("*.json")) == ["speculative-speculative-cuda-c1-x.json"]
    assert (logs / "RESULTS.md").read_text() == "# results\n"


def test_tests_methods_anchors_and_rounds_come_from_the_environment(tmp_path):
    done = _run(tmp_path, "tests", "cuda", "speculative", METHODS="int8,w8a8", ANCHORS="",
                ROUNDS="3", TESTS="cuda_int8 or triton_int8")  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    tests, cuda, speculative = _calls(tmp_path)
    assert tests.endswith("-k cuda_int8 or triton_int8 tests")
    assert "--methods int8,w8a8 " in cuda and cuda.endswith("--anchors ")
    assert " --rounds 3 " in speculative


def test_the_speculative_all_step_runs_every_concurrency(tmp_path):
    done = _run(tmp_path, "speculative", "speculative-all", ROUNDS="3")
    assert done.returncode == 0, done.stdout + done.stderr
    one, every = _calls(tmp_path)
    assert "--concurrency-1-only" in one and "--concurrency-1-only" not in every
    assert every.startswith("benchmarks/speculative.py --device cuda --rounds 3 --workdir ")


def test_the_int8_kernels_step_writes_its_rows_beside_the_logs(tmp_path):
    done = _run(tmp_path, "int8-kernels")
    assert done.returncode == 0, done.stdout + done.stderr
    assert _calls(tmp_path) == [
        "benchmarks/cuda_int8.py --rows 1,8,16,64 --out logs/int8-kernels.json"
    ]


def test_the_profile_step_takes_the_8b_checkpoints_a_cuda_step_left(tmp_path):
    cuda = tmp_path / "work" / "cuda"
    for name in ("llama-8b", "llama-8b-awq", "llama-8b-gptq", "llama-1b"):
        (cuda / name).mkdir(parents=True)
        (cuda / name / "config.json").write_text("{}")
    (cuda / "llama-8b-int8").mkdir()  # a copy that was never written
    done = _run(tmp_path, "profile")
    assert done.returncode == 0, done.stdout + done.stderr
    assert _calls(tmp_path) == [
        f"benchmarks/cuda_profile.py {cuda}/llama-8b {cuda}/llama-8b-awq {cuda}/llama-8b-gptq"
    ]


def test_a_failing_step_fails_the_run_and_the_rest_still_run(tmp_path):
    done = _run(tmp_path, "cuda", "speculative", FAKE_CUDA_RC="3")
    assert done.returncode == 1
    assert "== cuda: exit 3" in done.stdout and len(_calls(tmp_path)) == 2


def test_steps_past_the_budget_are_not_run(tmp_path):
    done = _run(tmp_path, "tests", BUDGET="20")
    # the budget counts from the script's start: a busy host may have spent some of it
    left = re.fullmatch(r"== tests: not run, (\d+)s of the budget left\n", done.stdout)
    assert done.returncode == 1 and left and int(left[1]) <= 20, done.stdout
    assert _calls(tmp_path) == []


def test_an_unknown_step_or_no_gpu_is_one_line_and_exit_2(tmp_path):
    done = _run(tmp_path, "tests", "bench")
    assert (done.returncode, done.stderr.splitlines()) == (
        2,
        [
            "gpu_checks.sh: no step 'bench' (steps: tests, cuda, speculative, speculative-all, "
            "bf16-1b, int8-kernels, profile)"
        ],
    )
    done = _run(tmp_path / "b", FAKE_NO_GPU="1")
    assert (done.returncode, done.stderr.splitlines()) == (
        2,
        ["gpu_checks.sh: torch sees no CUDA device"],
    )
    assert _calls(tmp_path) == [] and _calls(tmp_path / "b") == []


def test_the_kit_s_wheels_install_first_and_every_step_imports_them(tmp_path):
    done = _run(tmp_path, "tests", "speculative", kit=True)
    assert done.returncode == 0, done.stdout + done.stderr
    pip, tests, speculative = _calls(tmp_path)
    work, root = tmp_path / "work", tmp_path / "checkout"
    assert pip.startswith("-m pip install -q --no-index --no-deps")
    assert pip.endswith(f"--target {work}/site gpu-kit/wheels/a-1.0-py3-none-any.whl")
    assert tests.startswith("-m pytest")
    # the checkout and the wheels on the steps' path; SHARED from the kit
    assert _calls(tmp_path, "calls.paths")[1:] == [f"{root}:{work}/site"] * 2
    assert speculative.endswith(f"--shared {root}/gpu-kit/shared")
    # what comes back from a device call: the steps' logs and results, RESULTS.md
    assert sorted(p.name for p in (root / "logs").iterdir()) == [
        "RESULTS.md",
        "speculative-speculative-cuda-c1-x.json",
        "speculative.log",
        "tests.log",
    ]


def test_without_the_kit_nothing_is_installed_and_the_path_is_left_alone(tmp_path):
    done = _run(tmp_path, "speculative", PYTHONPATH="")
    assert done.returncode == 0, done.stdout + done.stderr
    (call,) = _calls(tmp_path)
    assert "--shared" not in call and _calls(tmp_path, "calls.paths") == [""]


def test_wheels_that_do_not_install_stop_the_run_in_one_line(tmp_path):
    done = _run(tmp_path, kit=True, FAKE_PIP_RC="1")
    assert (done.returncode, done.stderr.splitlines()) == (
        2,
        ["gpu_checks.sh: gpu-kit/wheels did not install (see logs/kit.log)"],
    )
    assert len(_calls(tmp_path)) == 1 and (tmp_path / "checkout" / "logs" / "kit.log").exists()
