"""Integer quantization of whole checkpoints: formats other tools load, and the numbers
they compute equal llmkit's own dequantized computation."""

from __future__ import annotations

import json
from dataclasses import fields

import pytest
import torch
from transformers import AutoModelForCausalLM

from llmkit.bench.model import load_model
from llmkit.checkpoint import dtypes
from llmkit.checkpoint.reader import open_checkpoint
from llmkit.errors import LlmkitError
from llmkit.quant import int8
from llmkit.quant.calibration import CalibrationSpec
from llmkit.quant.formats import gptq
from llmkit.quant.options import GPTQOptions, RTNOptions, options_for
from llmkit.quant.pipeline import quantize
from tests.test_formats import unpack_gptq_by_loops

IDS = torch.tensor([[1, 40, 41, 42, 100, 7, 300, 12, 5, 77, 90, 200]])
SMALL = CalibrationSpec(num_samples=8, seq_len=64)


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


def with_transformers_activation_rounding(model) -> None:
    """Swap llmkit's per-token activation rounding (scale max|x|/127, as vLLM) for the one
    compressed-tensors applies inside transformers (max|x|/127.5)."""
    for module in model.modules():
        if module._forward_pre_hooks:
            module._forward_pre_hooks.clear()
            module.register_forward_pre_hook(
                lambda m, args: (int8.fake_quantize_per_token(args[0], divisor=127.5),)
            )


@pytest.fixture(scope="module")
def quantized(tiny_dir, tmp_path_factory):
    """method -> checkpoint of tiny-llama quantized with it (made once)."""
    made = {}

    def get(method, preset="tiny-llama", **options):
        key = (method, preset, tuple(sorted(options.items())))
        if key not in made:
            out = tmp_path_factory.mktemp(method) / "q"
            quantize(
                tiny_dir(preset),
                out,
                method,
                options=options_for(method, **options),
                calibration=SMALL,
            )
            made[key] = out
        return made[key]

    return get


def test_int8_loads_in_transformers_with_identical_logits(quantized):
    pytest.importorskip("compressed_tensors", reason="the test extra is not installed")
    path = quantized("int8")
    config = json.loads((path / "config.json").read_text())["quantization_config"]
    assert config["format"] == "pack-quantized" and config["ignore"] == ["lm_head"]
    hf = AutoModelForCausalLM.from_pretrained(path)
    assert torch.allclose(logits(hf), logits(load_model(path)), atol=1e-5)


def test_w8a8_loads_in_transformers_with_identical_logits(quantized, tiny_dir):
    """transformers runs activations through compressed-tensors' fake quantization, which
    divides by 127.5; with that one convention aligned, the numbers are the same."""
    pytest.importorskip("compressed_tensors", reason="the test extra is not installed")
    path = quantized("w8a8")
    hf = logits(AutoModelForCausalLM.from_pretrained(path))
    ours = load_model(path)
    vllm_convention = logits(ours)  # llmkit's default divisor, 127, is vLLM kernels'
    with_transformers_activation_rounding(ours)
    assert torch.allclose(logits(ours), hf, atol=1e-5)
    # The divisors round activations differently, so the default differs from transformers
    # by quantization noise, not more: both stay near the float model.
    float_logits = logits(load_model(tiny_dir("tiny-llama")))
    for got in (vllm_convention, hf):
        assert float((got - float_logits).abs().max() / float_logits.abs().max()) < 0.05


@pytest.mark.parametrize("preset", ["tiny-qwen2", "tiny-mistral", "tiny-qwen3"])
def test_w8a8_interop_across_the_llama_family(quantized, preset):
    pytest.importorskip("compressed_tensors", reason="the test extra is not installed")
    path = quantized("w8a8", preset=preset)
    ours = load_model(path)
    with_transformers_activation_rounding(ours)
    hf = AutoModelForCausalLM.from_pretrained(path)
    assert torch.allclose(logits(ours), logits(hf), atol=1e-5)


def test_w8a8_close_to_float_and_int8_scales_in_storage_dtype(quantized, tiny_dir):
    path = quantized("w8a8")
    reference = logits(load_model(tiny_dir("tiny-llama")))
    got = logits(load_model(path))
    assert float((got - reference).abs().max() / reference.abs().max()) < 0.05
    with open_checkpoint(path) as ck:
        assert ck.tensors["model.layers.0.self_attn.q_proj.weight"].dtype == "I8"
        assert ck.tensors["model.layers.0.self_attn.q_proj.weight_scale"].dtype == "F32"
        assert ck.tensors["model.layers.0.self_attn.q_proj.weight_scale"].shape == (64, 1)
        assert ck.tensors["lm_head.weight"].dtype == "F32"


def test_w8a8_smoothing_is_folded_into_the_norms(quantized, tiny_dir):
    with open_checkpoint(tiny_dir("tiny-llama")) as src, open_checkpoint(quantized("w8a8")) as q:
        name = "model.layers.0.input_layernorm.weight"
        assert not torch.allclose(src.get_tensor(name), q.get_tensor(name))


def test_w8a8_gptq_weighs_errors_by_the_smoothed_inputs(tiny_dir, tmp_path, monkeypatch):
    """Smoothing moves s from a stage's inputs into its weights (x / s, w s), so each row's
    w H wᵀ, its output's energy on the calibration inputs, must not change: GPTQ must get
    the Hessian of the smoothed inputs. In layer 0 (whose inputs do not depend on earlier
    quantization) every stage's energies equal those of a run whose scales are all 1, but
    up_proj's rows, which smoothing down_proj's inputs divides (their outputs are x / s)."""
    from llmkit.quant.methods import w8a8 as method

    real, energies = method.gptq_algorithm.quantize, []

    def recording(weight, hessian, settings, name="", **kwargs):
        result = real(weight, hessian, settings, name=name, **kwargs)
        if name.startswith("model.layers.0."):
            energies[-1][name] = result.row_energy
        return result

    monkeypatch.setattr(method.gptq_algorithm, "quantize", recording)
    for unit in (False, True):
        if unit:
            monkeypatch.setattr(method, "smooth_scales", lambda amax, *_: torch.ones_like(amax))
        energies.append({})
        out = tmp_path / f"unit-{unit}"
        quantize(tiny_dir("tiny-llama"), out, "w8a8", options=options_for("w8a8"),
                 calibration=SMALL)  # fmt: skip
    smoothed, unit = energies
    assert len(smoothed) == 4 and smoothed.keys() == unit.keys()
    for name in smoothed:
        half = len(smoothed[name]) // 2  # gate_proj's rows, then up_proj's
        rows = slice(None, half if "up_proj" in name else None)
        assert torch.allclose(smoothed[name][rows], unit[name][rows], rtol=1e-3), name


def test_rtn_writes_gptq_v1(quantized, tiny_dir):
    path = quantized("rtn", bits=4, group_size=32)
    config = json.loads((path / "config.json").read_text())
    assert config["quantization_config"] == json.loads((path / "quantize_config.json").read_text())
    assert config["quantization_config"]["checkpoint_format"] == "gptq"
    assert config["torch_dtype"] == "float16"
    with open_checkpoint(path) as ck, open_checkpoint(tiny_dir("tiny-llama")) as src:
        prefix = "model.layers.1.mlp.down_proj."
        parts = {s: ck.get_tensor(prefix + s) for s in gptq.SUFFIXES}
        assert parts["qweight"].shape == (128 // 8, 64) and parts["scales"].shape == (4, 64)
        q, zeros = unpack_gptq_by_loops(parts["qweight"], parts["qzeros"], 4)
        weight = src.get_tensor(prefix + "weight")
    scales = parts["scales"].float().t().repeat_interleave(32, dim=1)
    dequantized = scales * (q.float() - zeros.float().repeat_interleave(32, dim=1))
    assert float((dequantized - weight).abs().max()) <= float(scales.max()) * 1.01
    state = load_model(path).state_dict()
    assert torch.allclose(state[prefix + "weight"], dequantized, atol=1e-6)


def test_lm_head_quantized_and_untied(quantized):
    pytest.importorskip("compressed_tensors", reason="the test extra is not installed")
    path = quantized("int8", preset="tiny-qwen2", quantize_lm_head=True)
    config = json.loads((path / "config.json").read_text())
    assert config["tie_word_embeddings"] is False and config["quantization_config"]["ignore"] == []
    with open_checkpoint(path) as ck:
        assert "lm_head.weight_packed" in ck.tensors
    hf = AutoModelForCausalLM.from_pretrained(path)
    assert torch.allclose(logits(hf), logits(load_model(path)), atol=1e-5)


def test_output_holds_no_spill_files(quantized):
    path = quantized("w8a8")
    assert sorted(p.name for p in path.iterdir()) == [
        "config.json",
        "generation_config.json",
        "llmkit-checksums.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ]


def test_bad_group_size_fails_before_writing(tiny_dir, tmp_path):
    with pytest.raises(LlmkitError, match="--group-size 48 does not divide its inputs"):
        quantize(tiny_dir("tiny-llama"), tmp_path / "o", "rtn", options=RTNOptions(group_size=48))
    assert list(tmp_path.iterdir()) == []


def test_failure_mid_calibration_leaves_nothing(tiny_dir, tmp_path):
    def fail_at_second_layer(done, total):
        if done == 2:
            raise RuntimeError("stop")

    with pytest.raises(RuntimeError, match="stop"):
        quantize(
            tiny_dir("tiny-llama"),
            tmp_path / "o",
            "w8a8",
            calibration=SMALL,
            on_layer=fail_at_second_layer,
        )
    assert list(tmp_path.iterdir()) == []


def test_unsupported_architecture_is_refused(tmp_path, tiny_dir):
    import shutil

    src = tmp_path / "gpt2ish"
    shutil.copytree(tiny_dir("tiny-llama"), src)
    config = json.loads((src / "config.json").read_text()) | {"model_type": "gpt2"}
    (src / "config.json").write_text(json.dumps(config))
    with pytest.raises(LlmkitError, match="not model_type 'gpt2'"):
        quantize(src, tmp_path / "o", "int8")


def test_cli_quantize_w8a8_with_a_text_file(cli, tiny_dir, tmp_path):
    text = tmp_path / "calib.txt"
    text.write_text("Ada found a small cat near the river, and Ben painted the boat. " * 200)

    def w8a8(out, num_samples, *more):
        args = ["quantize", tiny_dir("tiny-llama"), out, "--method", "w8a8", "--dataset", text]
        return cli(*args, "--num-samples", num_samples, "--seq-len", "64", *more)

    result = w8a8(tmp_path / "o", 4, "--json")
    assert result.code == 0, result.err
    report = json.loads(result.out)
    assert report["calibration_samples"] == 4 and report["num_layers"] == 2
    assert report["num_converted"] == 14
    result = w8a8(tmp_path / "o2", 5000)
    assert result.code == 1 and "lower --num-samples" in result.err
    assert not (tmp_path / "o2").exists()


def test_cli_quantize_gptq_reports_layer_errors(cli, tiny_dir, tmp_path):
    result = cli(
        "quantize",
        tiny_dir("tiny-qwen2"),
        tmp_path / "o",
        "--method",
        "gptq",
        "--group-size",
        "32",
        "--desc-act",
        "--num-samples",
        "4",
        "--seq-len",
        "64",
        "--json",
    )
    assert result.code == 0, result.err
    report = json.loads(result.out)
    assert [entry["layer"] for entry in report["layer_errors"]] == [0, 1]
    modules = report["layer_errors"][1]["modules"]
    assert len(modules) == 7 and all(0 < e < 0.1 for e in modules.values())
    config = json.loads((tmp_path / "o" / "config.json").read_text())["quantization_config"]
    assert config["desc_act"] is True and config["true_sequential"] is True
    with open_checkpoint(tmp_path / "o") as ck:
        assert ck.tensors["model.layers.0.self_attn.q_proj.bias"].dtype == "F16"  # qkv bias kept
    model = load_model(tmp_path / "o")
    assert torch.isfinite(logits(model)).all()


def test_gptq_refuses_bits_it_cannot_pack(tiny_dir, tmp_path):
    with pytest.raises(LlmkitError, match="--bits 5"):
        quantize(tiny_dir("tiny-llama"), tmp_path / "o", "gptq", options=GPTQOptions(bits=5))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("method", ["gptq", "awq", "rtn"])
def test_group_sizes_that_do_not_divide_the_inputs_are_refused_before_any_work(
    tiny_dir, tmp_path, method
):
    # tiny-llama's Linears have 64 or 128 inputs; groups of 128 do not divide q_proj's 64
    with pytest.raises(LlmkitError, match=r"q_proj.weight has 64 inputs.*fit: 32, 64"):
        quantize(tiny_dir("tiny-llama"), tmp_path / "o", method)
    assert list(tmp_path.iterdir()) == []


def test_gptq_v2_zero_points_are_read(quantized, tmp_path):
    """GPTQModel's v2 format stores zero points as they are (v1 stores zero - 1)."""
    import shutil

    from llmkit.checkpoint.safetensors_io import TensorSpec
    from llmkit.checkpoint.writer import write_checkpoint
    from llmkit.quant.formats import bitpack

    v1 = quantized("rtn", bits=4, group_size=32)
    with open_checkpoint(v1) as ck:
        tensors = {name: ck.get_tensor(name) for name in ck.tensors}
        config = dict(ck.config)
    for name in [n for n in tensors if n.endswith(".qzeros")]:
        zeros = bitpack.unpack(tensors[name].t(), 4, tensors[name].shape[1] * 8) + 1
        tensors[name] = bitpack.pack(zeros, 4).t().contiguous()
    config["quantization_config"] = config["quantization_config"] | {"checkpoint_format": "gptq_v2"}
    specs = [
        TensorSpec(n, dtypes.from_torch(t.dtype), tuple(t.shape), lambda t=t: [t])
        for n, t in tensors.items()
    ]
    v2 = write_checkpoint(tmp_path / "v2", specs, config).path
    shutil.copy(v1 / "tokenizer.json", v2)
    ours, theirs = load_model(v1).state_dict(), load_model(v2).state_dict()
    assert all(torch.equal(ours[name], theirs[name]) for name in ours)


def test_cli_gptq_options_reach_the_quantizer(cli, tiny_dir, tmp_path):
    """Every gptq option given on the command line ends up in the written config."""
    result = cli(
        "quantize",
        tiny_dir("tiny-llama"),
        tmp_path / "o",
        "--method",
        "gptq",
        "--bits",
        "8",
        "--group-size",
        "64",
        "--asym",
        "--no-act-group-aware",
        "--no-clip-search",
        "--static-groups",
        "--damp-percent",
        "0.05",
        "--no-true-sequential",
        "--num-samples",
        "2",
        "--seq-len",
        "32",
    )
    assert result.code == 0, result.err
    config = json.loads((tmp_path / "o" / "config.json").read_text())["quantization_config"]
    assert (
        config
        | {
            "bits": 8,
            "group_size": 64,
            "sym": False,
            "act_group_aware": False,
            "clip_search": False,
            "static_groups": True,
            "damp_percent": 0.05,
            "true_sequential": False,
            "desc_act": False,
        }
        == config
    )


def test_every_gptq_option_reaches_the_algorithm(tiny_dir, tmp_path, monkeypatch):
    """Each GPTQOptions field arrives in the settings its sweep runs with."""
    from llmkit.quant.gptq import GPTQSettings
    from llmkit.quant.methods import gptq as gptq_method

    seen = []
    make_layer = gptq_method.GPTQLayer

    def recording(arch, settings, *rest):
        seen.append(settings)
        return make_layer(arch, settings, *rest)

    monkeypatch.setattr(gptq_method, "GPTQLayer", recording)
    options = GPTQOptions(
        bits=8,
        group_size=64,
        sym=False,
        act_group_aware=False,
        clip_search=False,
        static_groups=True,
        damp_percent=0.05,
    )
    quantize(
        tiny_dir("tiny-llama"),
        tmp_path / "o",
        "gptq",
        options=options,
        calibration=CalibrationSpec(num_samples=2, seq_len=32),
    )
    (settings,) = seen
    for field in fields(GPTQSettings):
        if hasattr(options, field.name):
            assert getattr(settings, field.name) == getattr(options, field.name), field.name
    assert settings.act_group_aware is False and settings.clip_search is False


QUANTIZED = (".qweight", ".qzeros", ".scales", ".g_idx")


def _float32_copy(src, out) -> None:
    """The checkpoint `src` with every tensor widened to float32 (the same values)."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(src, out)
    for path in out.glob("*.safetensors"):
        save_file({k: t.float() for k, t in load_file(path).items()}, path)
    config = json.loads((out / "config.json").read_text())
    config["torch_dtype"] = config["dtype"] = "float32"
    (out / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_bf16_checkpoint_quantizes_as_its_float32_widening(tiny_dir, tmp_path, method):
    """Calibration computes in float32 whatever the checkpoint's dtype: a bfloat16 model gives
    the quantized tensors of the float32 model holding the same values."""
    bf16 = quantize(tiny_dir(), tmp_path / "bf16", "bf16").output
    _float32_copy(tmp_path / "bf16", tmp_path / "f32")
    calibration = CalibrationSpec(num_samples=4, seq_len=64)
    outputs = {}
    for name, src in (("bf16", bf16), ("f32", tmp_path / "f32")):
        out = tmp_path / f"{name}-{method}"
        quantize(
            src, out, method, options=options_for(method, group_size=32), calibration=calibration
        )
        with open_checkpoint(out) as ck:
            outputs[name] = {n: ck.get_tensor(n) for n in ck.tensors if n.endswith(QUANTIZED)}
    assert outputs["bf16"].keys() == outputs["f32"].keys() and outputs["bf16"]
    for name, tensor in outputs["bf16"].items():
        assert torch.equal(tensor, outputs["f32"][name]), name


def test_one_method_table_for_the_cli_the_recipes_and_the_algorithms():
    import dataclasses
    import typing

    from llmkit.cli.quantize import MethodName
    from llmkit.quant.awq import AWQSettings
    from llmkit.quant.gptq import GPTQSettings
    from llmkit.quant.options import METHODS, AWQOptions, GPTQOptions
    from llmkit.recipe.schema import Quantize

    assert typing.get_args(MethodName) == tuple(METHODS)
    assert typing.get_args(Quantize.model_fields["method"].annotation) == tuple(METHODS)
    for settings, options in ((GPTQSettings(), GPTQOptions()), (AWQSettings(), AWQOptions())):
        shared = {f.name for f in dataclasses.fields(settings)} & {
            f.name for f in dataclasses.fields(options)
        }
        assert shared and all(getattr(settings, n) == getattr(options, n) for n in shared)


def test_each_integer_method_is_a_module_with_what_the_pipeline_calls():
    from llmkit.quant.methods import implementation
    from llmkit.quant.options import INTEGER_METHODS, METHODS

    for name in INTEGER_METHODS:
        module = implementation(name)
        assert module.__name__ == f"llmkit.quant.methods.{name}"
        assert callable(module.quantization_config)
        needed = "layer_quantizer" if METHODS[name].calibrated else "pack"
        assert callable(getattr(module, needed, None)), f"{name} has no {needed}"
    with pytest.raises(ValueError):
        implementation("fp16")  # a cast has no integer module


def test_quantize_flags_are_the_options_of_the_methods(cli, tiny_dir, tmp_path):
    """One flag per option any method takes, from the options dataclasses; a flag the chosen
    method does not take is refused in one line before any output exists, and a flag not
    given leaves the method's own default."""
    import typer.main

    from llmkit.cli.app import app
    from llmkit.quant.options import METHODS, flag

    command = typer.main.get_command(app).commands["quantize"]
    flags = {name for param in command.params for name in param.opts}
    for m in METHODS.values():
        assert {flag(f.name) for f in fields(m.options)} <= flags, m.name
    args = ["quantize", tiny_dir(), tmp_path / "o"]
    refused = cli(*args, "--method", "gptq", "--smooth-alpha", "0.5")
    assert refused.code == 1 and not (tmp_path / "o").exists()
    assert refused.err.strip().count("\n") == 0, refused.err
    assert "--smooth-alpha does not apply to gptq (it takes --bits, --group-size" in refused.err
    done = cli(*args, "--method", "rtn", "--asym", "--group-size", "32", "--json")
    assert done.code == 0, done.err
    config = json.loads((tmp_path / "o" / "config.json").read_text())["quantization_config"]
    assert (config["sym"], config["group_size"], config["bits"]) == (False, 32, RTNOptions().bits)
