"""The family table against what transformers builds for each family: every tensor has a
split rule, and every Linear, norm and fused group the table names is one transformers has."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from torch import nn

from llmkit.arch.family import COLWISE, FAMILIES, ROWWISE, family_for, padded_vocab
from llmkit.arch.plan import make_plan, module_rule
from llmkit.errors import LlmkitError
from tests.conftest import TINY_PRESETS


def hf_model(directory) -> nn.Module:
    config = transformers.AutoConfig.from_pretrained(directory)
    with torch.device("meta"):
        return transformers.AutoModelForCausalLM.from_config(config)


@pytest.mark.parametrize("preset", TINY_PRESETS)
def test_the_table_names_what_transformers_builds(tiny_dir, preset):
    config = json.loads((tiny_dir(preset) / "config.json").read_text())
    family, model = family_for(config), hf_model(tiny_dir(preset))
    layer = model.get_submodule(f"{family.layers}.0")
    hf_linears = {name for name, m in layer.named_modules() if isinstance(m, nn.Linear)}
    assert set(family.linears) == hf_linears
    for name in (*family.norms, family.attention, family.mlp):
        layer.get_submodule(name)
    for module in (family.embed, family.final_norm, family.lm_head):
        model.get_submodule(module)
    held = {name for name, _ in layer.named_modules()}
    assert all((n in held) == family.head_norms_required for n in family.head_norms)
    for name in model.state_dict():
        module_rule(family, name)  # every tensor transformers writes has a split rule


def test_fused_groups_are_column_parallel_and_in_compute_order():
    for family in FAMILIES.values():
        roles = {name: role for name, role, _ in family.layer_linears()}
        for parts in family.fused_groups().values():
            assert all(roles[p] == COLWISE for p in parts)
            assert parts in family.stages  # one GPTQ stage: they read the same input
        assert sum(role == ROWWISE for role in roles.values()) == len(family.blocks)


def test_vocab_padding_is_one_rule_for_both_layouts(tiny_dir):
    config = json.loads((tiny_dir("tiny-qwen2") / "config.json").read_text())
    config["vocab_size"] = vocab = 1000
    tensors = {"model.embed_tokens.weight": ("F32", (vocab, config["hidden_size"]))}
    own = make_plan(config, tensors, tp=2, vocab_pad=64).tensors[0]
    vllm = make_plan(config, tensors, tp=2, vocab_pad=64, pad_each_rank=False).tensors[0]
    assert own.padded == padded_vocab(vocab, 128) == 1024  # each rank's share: 64 x 8
    assert vllm.padded == padded_vocab(vocab, 64) == 1024
    config["vocab_size"] = vocab = 1070
    tensors = {"model.embed_tokens.weight": ("F32", (vocab, config["hidden_size"]))}
    assert make_plan(config, tensors, tp=2).tensors[0].padded == 1152
    assert make_plan(config, tensors, tp=2, pad_each_rank=False).tensors[0].padded == 1088


def test_an_unknown_family_is_refused_by_name():
    with pytest.raises(LlmkitError, match="not model_type 'gpt2'"):
        family_for({"model_type": "gpt2"})
