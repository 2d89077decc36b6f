"""benchmarks/widen.py computes the same function with wider matrices: the benchmarks that
stand a trained model's outputs at a larger model's step cost (speculative.py) rely on it."""

from __future__ import annotations

import json

import pytest
import torch

from tests.bench_helpers import benchmark

IDS = [[1, 7, 42, 99, 3, 250, 17, 8, 64, 5]]


def logits(path) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    with torch.no_grad():
        return model(torch.tensor(IDS)).logits


@pytest.mark.parametrize("hidden_factor", [1, 4])
def test_a_widened_checkpoint_gives_the_logits_of_its_source(tiny_dir, tmp_path, hidden_factor):
    """KV heads repeated to one a query head, the MLP padded to twice its width, and with a
    hidden factor the hidden state padded to that many times its size: transformers'
    forward of the copy gives the source's logits."""
    src = tiny_dir("tiny-llama")
    config = json.loads((src / "config.json").read_text())
    inter = 2 * config["intermediate_size"]
    wide = benchmark("widen").widen(src, tmp_path / "wide", inter, hidden_factor)
    widened = json.loads((wide / "config.json").read_text())
    assert widened["hidden_size"] == hidden_factor * config["hidden_size"]
    assert widened["intermediate_size"] == inter
    assert widened["num_key_value_heads"] == config["num_attention_heads"]
    want = logits(src)
    assert torch.allclose(logits(wide), want, atol=1e-5 * float(want.abs().max()), rtol=0)
