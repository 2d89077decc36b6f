"""The layer-by-layer runner: same activations as transformers, one layer in memory."""

from __future__ import annotations

import functools

import pytest
import torch
from transformers import AutoModelForCausalLM

from llmkit.arch.family import family_for
from llmkit.checkpoint.reader import open_checkpoint
from llmkit.quant import sequential
from llmkit.quant.calibration import CalibrationSpec
from llmkit.quant.options import options_for
from llmkit.quant.pipeline import quantize
from llmkit.quant.smoothquant import fold
from tests.conftest import TINY_PRESETS


def real_layer(path, index: int, seq_len: int = 8):
    """(arch, decoder layer `index` with its checkpoint weights, rotary cos/sin)."""
    with open_checkpoint(path) as ck:
        arch = family_for(ck.config)
        model = sequential.build_skeleton(ck.config)
        prefix = f"model.layers.{index}"
        layer = sequential.materialize(
            model.get_submodule(prefix), ck, prefix, "cpu", torch.float32
        )
        rope = sequential.rotary_embeddings(model, arch, seq_len, "cpu", torch.float32)
    return arch, layer, rope


IDS = torch.tensor([[1, 40, 41, 42, 100, 7, 300, 12], [1, 9, 8, 7, 6, 5, 4, 3]])


@pytest.mark.parametrize("preset", TINY_PRESETS)
def test_layer_inputs_equal_transformers_hidden_states(tiny_dir, preset):
    path = tiny_dir(preset)
    with torch.no_grad():
        hf = AutoModelForCausalLM.from_pretrained(path)(IDS, output_hidden_states=True)
    seen, runs = [], []

    def record(index, run):  # a quantizer that changes nothing
        seen.append(torch.cat(run.inputs))
        runs.append(run)
        return {}

    with open_checkpoint(path) as ck:
        layers = sequential.run_layers(
            sequential.build_skeleton(ck.config),
            ck,
            family_for(ck.config),
            IDS,
            record,
            torch.device("cpu"),
        )
        assert [index for index, _ in layers] == [0, 1]
    for index, inputs in enumerate(seen):
        assert torch.allclose(inputs, hf.hidden_states[index], atol=1e-5)
    # The last layer's outputs feed nothing: its inputs are left as they were.
    assert [run.last for run in runs] == [False, True]
    assert torch.equal(torch.cat(runs[-1].inputs), seen[-1])


@pytest.mark.parametrize("method", ["w8a8", "gptq"])
def test_only_one_decoder_layer_is_ever_materialized(tiny_dir, tmp_path, monkeypatch, method):
    live: dict[int, str] = {}  # id(module) -> prefix, for decoder layers holding real weights
    peak = 0
    materialize, release = sequential.materialize, sequential.release

    def counting_materialize(module, ck, prefix, device, dtype, deferred=()):
        nonlocal peak
        if prefix.startswith("model.layers."):
            live[id(module)] = prefix
            peak = max(peak, len(live))
        return materialize(module, ck, prefix, device, dtype, deferred)

    def counting_release(module):
        release(module)
        assert all(p.is_meta for p in module.parameters())
        live.pop(id(module), None)

    monkeypatch.setattr(sequential, "materialize", counting_materialize)
    monkeypatch.setattr(sequential, "release", counting_release)
    quantize(
        tiny_dir("tiny-llama"),
        tmp_path / "o",
        method,
        options=options_for(method, **({"group_size": 32} if method == "gptq" else {})),
        calibration=CalibrationSpec(num_samples=4, seq_len=32),
    )
    assert peak == 1
    assert not live


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-qwen2", "tiny-qwen3"])
def test_smoothing_folds_leave_a_decoder_layers_output_unchanged(tiny_dir, preset):
    """Every fold in the architecture table, with random scales, on a real decoder layer."""
    arch, layer, rope = real_layer(tiny_dir(preset), 1)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 8, 64, generator=g)
    with torch.no_grad():
        before = layer(x, position_embeddings=rope)
        for group in arch.smoothable:
            linears = [layer.get_submodule(name) for name in group.linears]
            scales = torch.rand(linears[0].in_features, generator=g) * 4 + 0.25
            fold(layer.get_submodule(group.source), linears, scales)
        after = layer(x, position_embeddings=rope)
    assert torch.allclose(after, before, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("preset", TINY_PRESETS)
def test_layer_steps_rebuild_the_layer_forward(tiny_dir, preset):
    from llmkit.quant import layer_steps as steps

    arch, layer, rope = real_layer(tiny_dir(preset), 0)
    x = torch.randn(2, 8, 64, generator=torch.Generator().manual_seed(0))
    seen = {}
    down = layer.get_submodule("mlp.down_proj")
    down.register_forward_pre_hook(lambda m, args: seen.setdefault("down", args[0]))
    with torch.no_grad():
        expected = layer(x, position_embeddings=rope)
        core = steps.attention_core(layer, arch, x, rope)
        h = steps.after_attention(layer, arch, x, core)
        assert torch.equal(steps.output(layer, arch, h), expected)
        assert torch.equal(steps.mlp_core(layer, arch, h), seen["down"])


def test_layer_steps_with_biases_another_activation_and_shared_buffers(tiny_dir, monkeypatch):
    """The MLP steps' other paths: Linears with biases (addmm), an activation without an
    in-place form (copied back), buffers sized for more tokens than a slice holds, up and down
    computed a few output columns at a time (the last block narrower), and the output written
    over its own input."""
    import copy

    from transformers.activations import ACT2FN

    from llmkit.quant import layer_steps as steps

    # Blocks narrower than the BLAS's vector width may take another of its kernels, which sums
    # in another order: the same arithmetic, not the same bits.
    monkeypatch.setattr(steps, "COLUMNS", 24)  # divides neither 64 (hidden) nor 128 (MLP)

    arch, layer, rope = real_layer(tiny_dir("tiny-llama"), 0)
    g = torch.Generator().manual_seed(1)
    mlp = layer.get_submodule(arch.mlp)
    mlp.config = copy.copy(mlp.config)
    mlp.config.hidden_act, mlp.act_fn = "gelu", ACT2FN["gelu"]
    for name in arch.stages[2] + arch.stages[3]:
        linear = layer.get_submodule(name)
        linear.bias = torch.nn.Parameter(torch.randn(linear.out_features, generator=g) * 0.1)
    x = torch.randn(1, 8, 64, generator=g)
    seen = {}
    down = layer.get_submodule("mlp.down_proj")
    down.register_forward_pre_hook(lambda m, args: seen.setdefault("down", args[0]))
    buffers = steps.MLPBuffers(layer, arch, 32, "cpu", torch.float32)
    with torch.no_grad():
        expected = layer(x, position_embeddings=rope)
        core = steps.attention_core(layer, arch, x, rope)
        h = steps.after_attention(layer, arch, x, core)[0]  # [tokens, hidden], as passes slice
        close = functools.partial(torch.testing.assert_close, rtol=1e-6, atol=1e-6)
        close(steps.output(layer, arch, h, buffers), expected[0])
        close(steps.mlp_core(layer, arch, h, buffers), seen["down"][0])
        steps.output(layer, arch, h, buffers, out=h)
        close(h, expected[0])


@pytest.mark.parametrize("true_sequential", [True, False])
def test_gptq_stage_hessians_match_full_layer_forwards(tiny_dir, monkeypatch, true_sequential):
    """Each stage's Hessian is the one a full forward of the layer gives at that point: with
    true-sequential, the earlier stages already quantized; without, the float layer."""
    import copy
    import dataclasses

    from llmkit.quant import gptq
    from llmkit.quant.methods import gptq as methods

    hessians, results, originals = [], [], []
    quantize_weight, quantize_layer = gptq.quantize, methods.GPTQLayer.__call__
    monkeypatch.setattr(methods, "MLP_TOKENS", 7)  # the MLP stages run ragged slices of tokens

    def recording_quantize(weight, hessian, *args, **kwargs):
        if true_sequential and len(hessians) == 3:  # down_proj: only its own weights held
            layer = originals[0][2].layer
            others = arch.stages[0] + arch.stages[1] + arch.stages[2]
            assert all(layer.get_submodule(n).weight.is_meta for n in others)
            assert not layer.get_submodule("mlp.down_proj").weight.is_meta
        hessians.append(hessian.clone())
        # Stages factorized in place can rebuild their Hessian for a retry: the same matrix.
        again = kwargs.get("again")
        assert (again is not None) == true_sequential
        if again is not None:
            assert torch.equal(again(), hessians[-1])
        results.append(quantize_weight(weight, hessian, *args, **kwargs))
        return results[-1]

    def recording_layer(self, index, run):
        if index == 0:  # the float layer, with the weights the quantizer reads later too
            original = dataclasses.replace(run, layer=copy.deepcopy(run.layer))
            original.load(self.deferred)
            originals.append((original.layer, torch.cat(run.inputs).clone(), run))
        return quantize_layer(self, index, run)

    monkeypatch.setattr(gptq, "quantize", recording_quantize)
    monkeypatch.setattr(methods.GPTQLayer, "__call__", recording_layer)
    with open_checkpoint(tiny_dir("tiny-llama")) as ck:
        arch = family_for(ck.config)
        quantizer = methods.GPTQLayer(
            arch,
            gptq.GPTQSettings(group_size=32),
            true_sequential,
            {name: torch.float32 for name in ck.tensors},
            [],
            lambda message: None,
        )
        ids = torch.randint(3, 500, (4, 16), generator=torch.Generator().manual_seed(0))
        layers = sequential.run_layers(
            sequential.build_skeleton(ck.config), ck, arch, ids, quantizer, torch.device("cpu")
        )
        next(iter(layers))
    layer, x, run = originals[0]
    for k, stage in enumerate(arch.stages):
        expected = gptq.Hessian(layer.get_submodule(stage[0]).in_features, torch.device("cpu"))
        handle = layer.get_submodule(stage[0]).register_forward_pre_hook(
            lambda m, args, h=expected: h.add(args[0])
        )
        with torch.no_grad():
            layer(x, position_embeddings=run.position_embeddings)
        handle.remove()
        assert torch.allclose(hessians[k], expected.matrix, rtol=1e-4, atol=1e-6), stage
        if true_sequential:  # the next stage sees this one quantized
            dequantized, start = results[k].dequantize(), 0
            for name in stage:
                linear = layer.get_submodule(name)
                linear.weight.data = dequantized[start : start + linear.out_features]
                start += linear.out_features


def test_gptq_layers_feed_on_what_the_quantized_model_computes(tiny_dir, tmp_path, monkeypatch):
    """Layer i+1's calibration inputs are layer i's outputs with its quantized weights: the
    hidden states transformers computes from the written checkpoint."""
    from llmkit.bench.model import load_model
    from llmkit.quant.methods import gptq as methods

    seen = []
    quantize_layer = methods.GPTQLayer.__call__

    def recording(self, index, run):
        seen.append(torch.cat(run.inputs).clone())
        return quantize_layer(self, index, run)

    monkeypatch.setattr(methods.GPTQLayer, "__call__", recording)
    ids_spec = CalibrationSpec(num_samples=4, seq_len=32)
    quantize(
        tiny_dir("tiny-qwen2"),
        tmp_path / "q",
        "gptq",
        options=options_for("gptq", group_size=32),
        calibration=ids_spec,
    )
    from transformers import AutoTokenizer

    from llmkit.quant.calibration import calibration_ids

    ids = calibration_ids(AutoTokenizer.from_pretrained(tiny_dir("tiny-qwen2")), ids_spec)
    with torch.no_grad():
        hidden = load_model(tmp_path / "q")(ids, output_hidden_states=True).hidden_states
    # Norms, biases and embeddings are stored in fp16 (the GPTQ convention), which moves hidden
    # states by ~7e-4 of their scale; computing with unquantized weights would move them by
    # the 4-bit quantization error, ~1e-2.
    for ours, theirs in zip(seen, hidden, strict=False):
        assert (ours - theirs).abs().max() <= 1e-3 * theirs.abs().max()
