"""Shared pieces of the runtime tests: reference generations and the runtime's raw logits."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from llmkit.runtime.scoring import WindowScorer

# CUDA variants skip where torch sees no CUDA device (as on CI); `pytest -k cuda` runs them
# on a GPU machine.
NEEDS_CUDA = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device; torch sees none"
)
DEVICES = ("cpu", pytest.param("cuda", marks=NEEDS_CUDA))


def hf_model(path, dtype=torch.float32):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    model.generation_config.eos_token_id = None  # run every request to its max_tokens
    return model


@torch.inference_mode()
def hf_greedy(model, prompt: list[int], max_tokens: int) -> list[int]:
    out = model.generate(
        torch.tensor([prompt]), max_new_tokens=max_tokens, do_sample=False, pad_token_id=0
    )
    return out[0, len(prompt) :].tolist()


def runtime_logits(path, ids: list[int], device: str = "cpu", exact: bool = False) -> torch.Tensor:
    """The runtime's float32 logits [tokens, vocab] for a whole prompt in one prefill on
    `device`, returned on the CPU: through the serving kernels, or with `exact` as quality
    measurements take them (weight-only formats dequantized)."""
    scorer = WindowScorer(str(path), 1, len(ids), device, exact)
    return scorer(torch.tensor([ids]))[0].cpu()


def random_prompts(num: int, low: int, high: int, seed: int = 0, vocab: int = 500):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(low, high, (num,), generator=g).tolist()
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]


def interpreted(code: str):
    """What the last line `code` prints, as JSON, from a child process that runs Triton's
    kernels on the CPU through its interpreter (chosen when Triton compiles, so before any
    test module could set it). Skips where the installed Triton cannot."""
    return interpreted_each([code])[0]


def interpreted_split(code: str, parts: int = 2) -> list:
    """interpreted() of `code`, whose last line prints a JSON list with an item per case of
    the cases it takes as `{part}` (written after their list's name: CASES{part}), in
    `parts` children side by side, each given every parts-th case: -> the items in the
    cases' order."""
    found = interpreted_each([code.replace("{part}", f"[{i}::{parts}]") for i in range(parts)])
    items = [None] * sum(map(len, found))
    for i, part in enumerate(found):
        items[i::parts] = part
    return items


def interpreted_each(codes: list[str]) -> list:
    """interpreted() of each code, the children running side by side: the interpreter keeps
    one core busy, so a test whose cases split into parts takes a part's time on each core."""
    # older interpreters cannot loop over a kernel's runtime arguments (range(start, stop))
    pytest.importorskip("triton", minversion="3.8", reason="needs Triton >= 3.8 (`test` extra)")
    env = {**os.environ, "TRITON_INTERPRET": "1", "LLMKIT_CPU_KERNELS": "0"}
    if len(codes) > 1:  # the children's torch threads share the cores, none spinning idle
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // len(codes)))
    root = Path(__file__).resolve().parent.parent
    with contextlib.ExitStack() as files:
        logs = [[files.enter_context(tempfile.TemporaryFile("w+")) for _ in (0, 1)] for _ in codes]
        children = []
        for code, (out, err) in zip(codes, logs, strict=True):
            command = [sys.executable, "-c", code]
            children.append(subprocess.Popen(command, cwd=root, env=env, stdout=out, stderr=err))
        for child in children:
            child.wait()
        for log in (log for pair in logs for log in pair):
            log.seek(0)
        for child, (_, err) in zip(children, logs, strict=True):
            assert child.returncode == 0, err.read()[-3000:]
        return [json.loads(out.read().splitlines()[-1]) for out, _ in logs]
