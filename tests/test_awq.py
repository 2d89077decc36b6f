"""AWQ: the GEMM packing against a reader written from the format's definition, scale folding,
the scale and clipping searches, and whole-checkpoint quantization."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import AutoConfig
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

from llmkit.arch.family import LLAMA
from llmkit.bench.model import load_model
from llmkit.checkpoint.reader import open_checkpoint
from llmkit.errors import LlmkitError
from llmkit.quant import awq
from llmkit.quant.calibration import CalibrationSpec
from llmkit.quant.formats import awq as awq_format
from llmkit.quant.methods.awq import _applies
from llmkit.quant.options import AWQOptions, options_for
from llmkit.quant.pipeline import quantize
from llmkit.quant.smoothquant import fold

AUTOAWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]  # AutoAWQ's pack order, restated from its definition


def unpack_awq_by_loops(words: torch.Tensor) -> torch.Tensor:
    """int32 [rows, out / 8] -> [rows, out]: nibble j of word c is output 8c + ORDER[j]."""
    rows, per_row = words.shape
    values = torch.zeros(rows, per_row * 8, dtype=torch.int64)
    for r in range(rows):
        for c in range(per_row):
            word = int(words[r, c]) & 0xFFFFFFFF
            for j in range(8):
                values[r, 8 * c + AUTOAWQ_ORDER[j]] = (word >> (4 * j)) & 0xF
    return values


@pytest.mark.parametrize("seed", [0, 1])
def test_gemm_packing_against_independent_unpacker(seed):
    gen = torch.Generator().manual_seed(seed)
    out_features, in_features, group = 24, 64, 16
    q = torch.randint(0, 16, (out_features, in_features), generator=gen, dtype=torch.uint8)
    zeros = torch.randint(0, 16, (out_features, in_features // group), generator=gen)
    scales = torch.rand(out_features, in_features // group, generator=gen) + 0.01
    packed = awq_format.pack(q, scales, zeros)
    assert packed["qweight"].shape == (in_features, out_features // 8)
    assert packed["qweight"].dtype == torch.int32
    assert packed["qzeros"].shape == (in_features // group, out_features // 8)
    assert torch.equal(unpack_awq_by_loops(packed["qweight"]), q.t().long())
    assert torch.equal(unpack_awq_by_loops(packed["qzeros"]), zeros.t().long())
    back_q, back_zeros = awq_format.unpack(packed["qweight"], packed["qzeros"])
    assert torch.equal(back_q, q.long()) and torch.equal(back_zeros, zeros.long())
    expected = (
        q.float() - zeros.float().repeat_interleave(group, 1)
    ) * scales.half().float().repeat_interleave(group, 1)
    dequantized = awq_format.dequantize(packed["qweight"], packed["qzeros"], packed["scales"])
    assert torch.equal(dequantized, expected)


def test_gemm_packing_refuses_values_it_cannot_store():
    q = torch.zeros(8, 16, dtype=torch.uint8)
    with pytest.raises(ValueError, match="outputs"):
        awq_format.pack(q[:4], torch.ones(4, 1), torch.zeros(4, 1))
    with pytest.raises(ValueError, match=r"\[0, 15\]"):
        awq_format.pack(q, torch.ones(8, 1), torch.full((8, 1), 16))


def tiny_layer(num_kv_heads: int) -> tuple[LlamaDecoderLayer, tuple]:
    config = AutoConfig.for_model(
        "llama",
        hidden_size=64,
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=num_kv_heads,
        num_hidden_layers=1,
        vocab_size=64,
    )
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    layer = LlamaDecoderLayer(config, 0).eval()
    for norm in (layer.input_layernorm, layer.post_attention_layernorm):
        norm.weight.data = torch.rand(64) + 0.5
    rope = LlamaRotaryEmbedding(config)(torch.zeros(1, 8, 1), torch.arange(8)[None])
    return layer, rope


@pytest.mark.parametrize("num_kv_heads", [4, 2])
def test_folding_scales_leaves_the_float_layer_unchanged(num_kv_heads):
    layer, rope = tiny_layer(num_kv_heads)
    x = torch.randn(2, 8, 64)
    with torch.no_grad():
        before = layer(x, position_embeddings=rope)
        folded = 0
        for group in LLAMA.awq_groups:
            if not _applies(layer, group):
                continue
            width = layer.get_submodule(group.linears[0]).in_features
            scales = torch.rand(width, generator=torch.Generator().manual_seed(width)) * 4 + 0.1
            linears = [layer.get_submodule(n) for n in group.linears]
            fold(layer.get_submodule(group.source), linears, scales)
            folded += 1
        after = layer(x, position_embeddings=rope)
    before, after = (y[0] if isinstance(y, tuple) else y for y in (before, after))
    assert folded == (4 if num_kv_heads == 4 else 3)  # v -> o only without GQA
    assert torch.allclose(before, after, atol=1e-5, rtol=1e-4)


def outlier_inputs(tokens: int, width: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, width, generator=gen)
    loud = torch.randperm(width, generator=gen)[:4]
    x[:, loud] *= 30
    return x


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_awq_beats_rtn_on_a_block_with_loud_input_channels(seed):
    x = outlier_inputs(512, 256, seed)
    linear = nn.Linear(256, 128, bias=False)
    nn.init.normal_(linear.weight, generator=torch.Generator().manual_seed(seed))
    reference = x @ linear.weight.detach().t()
    mean = awq.ChannelMean()
    mean.add(x[:256])
    mean.add(x[256:])
    settings = awq.AWQSettings(group_size=64)
    original = linear.weight.detach().clone()
    with torch.no_grad():
        search = awq.search_scales([linear], mean.mean, lambda: linear(x), reference, settings)
        rtn_error = float((x @ awq.fake_quantize(linear.weight, 64).t() - reference).pow(2).mean())
    assert torch.equal(linear.weight, original)  # restored, not left quantized
    assert search.alpha > 0
    assert search.loss < rtn_error
    assert search.loss_unscaled == pytest.approx(rtn_error)


def test_clip_search_never_worse_than_the_full_range():
    x = outlier_inputs(512, 128, 3)
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(64, 128, generator=gen)
    w[torch.rand(64, 128, generator=gen) < 0.01] *= 8  # a few outliers
    settings = awq.AWQSettings(group_size=32)
    bound = awq.search_clip(w, x, settings)
    clipped = awq.fake_quantize(awq.apply_clip(w, bound, 32), 32)

    def group_errors(approx):
        xg = x.reshape(-1, 4, 32).transpose(0, 1)
        delta = (approx - w).reshape(64, 4, 32).permute(1, 2, 0)
        return torch.bmm(xg, delta).pow(2).mean(1)  # [groups, out]

    assert (group_errors(clipped) <= group_errors(awq.fake_quantize(w, 32)) + 1e-6).all()
    assert (bound < w.abs().reshape(64, 4, 32).amax(-1)).any()  # it did clip somewhere


def test_clip_search_in_chunks_of_rows_equals_one_chunk(monkeypatch):
    """The search takes outputs a chunk at a time (CLIP_CHUNK_BYTES on the CPU, more on
    CUDA: rtn.rows_at_once); each output's bounds are those of a search over all of them."""
    x = outlier_inputs(512, 128, 4)
    w = torch.randn(40, 128, generator=torch.Generator().manual_seed(4))
    settings = awq.AWQSettings(group_size=32)
    whole = awq.search_clip(w, x, settings)
    monkeypatch.setattr(awq, "CLIP_CHUNK_BYTES", 4 * 4 * 512 * 7)  # 7 outputs: a ragged end
    assert torch.equal(awq.search_clip(w, x, settings), whole)


def test_channel_mean_is_the_mean_absolute_value():
    x = torch.randn(3, 5, 7, dtype=torch.float64)
    mean = awq.ChannelMean()
    mean.add(x[:1])
    mean.add(x[1:])
    assert torch.allclose(mean.mean.double(), x.abs().reshape(-1, 7).mean(0), atol=1e-6)


def test_candidate_scales_are_normalized_and_follow_alpha():
    x_mean = torch.tensor([0.1, 1.0, 10.0])
    assert torch.equal(awq.candidate_scales(x_mean, None, 0.0), torch.ones(3))
    s = awq.candidate_scales(x_mean, None, 0.5)
    assert float(s.max() * s.min()) == pytest.approx(1.0)
    assert s[2] / s[0] == pytest.approx(10.0)
    w_mean = torch.tensor([0.5, 0.25, 1.0])  # duo scaling: mean|x|^α / mean|w|^(1-α)
    duo = awq.candidate_scales(x_mean, w_mean, 0.5)
    assert float(duo.max() * duo.min()) == pytest.approx(1.0)
    expected = (x_mean.sqrt() / (w_mean.sqrt() + 1e-4)).double()
    assert (duo.double() / expected).std() < 1e-6  # proportional to the formula


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-qwen2"])
def test_awq_checkpoint_is_what_the_quantized_layers_compute(tiny_dir, tmp_path, preset):
    out = tmp_path / "awq"
    report = quantize(
        tiny_dir(preset),
        out,
        "awq",
        options=AWQOptions(group_size=32),
        calibration=CalibrationSpec(num_samples=8, seq_len=64),
    )
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"] == {
        "quant_method": "awq",
        "version": "gemm",
        "bits": 4,
        "group_size": 32,
        "zero_point": True,
        "modules_to_not_convert": None,
    }
    assert report.num_converted == 14 and len(report.layer_errors) == 2
    assert all(0 < e < 0.1 for layer in report.layer_errors for e in layer["modules"].values())
    with open_checkpoint(out) as ck, open_checkpoint(tiny_dir(preset)) as src:
        q = ck.get_tensor("model.layers.0.mlp.down_proj.qweight")
        assert q.dtype == torch.int32 and q.shape == (128, 64 // 8)
        assert ck.get_tensor("model.layers.0.input_layernorm.weight").dtype == torch.float16
        assert set(ck.tensors) == {
            n.replace(".weight", f".{suffix}") if n.endswith("proj.weight") else n
            for n in src.tensors
            for suffix in (awq_format.SUFFIXES if n.endswith("proj.weight") else ("",))
        }
    ids = torch.tensor([[1, 40, 41, 42, 100, 7, 300, 12]])
    with torch.no_grad():
        quantized = load_model(out)(ids).logits
        reference = load_model(tiny_dir(preset))(ids).logits
    # 4-bit rounding costs 5-9% of the logit variance here; scales folded into the weights
    # but not out of the norms cost 17-19%.
    assert (quantized - reference).pow(2).mean() < 0.13 * reference.var()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"bits": 3}, "4-bit"),
        ({"group_size": -1}, "positive --group-size"),
        ({"awq_grid": 0}, "--awq-grid"),
        ({"quantize_lm_head": True}, "--quantize-lm-head does not apply to awq"),
        ({"sym": False}, "--sym does not apply to awq"),
    ],
)
def test_awq_refuses_what_its_format_cannot_hold(tiny_dir, tmp_path, options, message):
    with pytest.raises(LlmkitError, match=message):
        quantize(tiny_dir(), tmp_path / "out", "awq", options=options_for("awq", **options))
    assert not (tmp_path / "out").exists()


def test_cli_awq_reports_errors_and_alphas(cli, tiny_dir, tmp_path):
    args = ["quantize", tiny_dir("tiny-qwen3"), tmp_path / "o", "--method", "awq"]
    options = ["--group-size", "32", "--num-samples", "4", "--seq-len", "64", "--awq-grid", "5"]
    result = cli(*args, *options, "--no-awq-duo-scaling", "--json")
    assert result.code == 0, result.err
    report = json.loads(result.out)
    entry = report["layer_errors"][1]
    assert len(entry["modules"]) == 7 and all(0 < e < 0.2 for e in entry["modules"].values())
    assert set(entry["alphas"]) <= {
        "self_attn.q_proj/self_attn.k_proj/self_attn.v_proj",
        "mlp.gate_proj/mlp.up_proj",
        "mlp.down_proj",
    }
    assert all(a in (0, 0.2, 0.4, 0.6, 0.8) for a in entry["alphas"].values())
    refused = cli(*args[:2], tmp_path / "p", "--method", "awq", "--bits", "8")
    assert refused.code == 1 and "awq" in refused.err and not (tmp_path / "p").exists()


def as_gemv(gemm: Path, out: Path) -> None:
    """The AWQ GEMM checkpoint `gemm` rewritten in AutoAWQ's GEMV layout under `out`."""
    from safetensors.torch import load_file, save_file

    from tests.test_formats import awq_gemv_fixture

    shutil.copytree(gemm, out)
    (out / "llmkit-checksums.json").unlink(missing_ok=True)
    tensors = load_file(out / "model.safetensors")
    for name in [n for n in tensors if n.endswith(".qweight")]:
        module = name.removesuffix(".qweight")
        q, zeros = awq_format.unpack(tensors[name], tensors[f"{module}.qzeros"])
        scales = tensors[f"{module}.scales"].t()
        group = q.shape[1] // scales.shape[1]
        for suffix, t in awq_gemv_fixture(q, scales, zeros, group).items():
            tensors[f"{module}.{suffix}"] = t
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((out / "config.json").read_text())
    config["quantization_config"]["version"] = "gemv"
    (out / "config.json").write_text(json.dumps(config))


def test_an_awq_gemv_checkpoint_runs_as_its_gemm_twin(tiny_dir, tmp_path, cli):
    """The same weights in GEMV: the same tokens and log probabilities; resharding it along
    its padded groups is refused in one line."""
    from llmkit.runtime.engine import LLM, EngineConfig
    from llmkit.runtime.sequence import SamplingParams

    gemm, gemv = tmp_path / "gemm", tmp_path / "gemv"
    calibration = CalibrationSpec(num_samples=8, seq_len=64)
    quantize(tiny_dir("tiny-llama"), gemm, "awq", options=AWQOptions(group_size=32),
             calibration=calibration)  # fmt: skip
    as_gemv(gemm, gemv)
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, logprobs=2)
    runs = []
    for path in (gemm, gemv):
        llm = LLM(path, EngineConfig(device="cpu", dtype="float32"))
        try:
            outs = llm.generate([[1, 40, 41, 42, 100, 7]], params)
        finally:
            llm.close()
        runs.append([(c.token_ids, c.logprobs) for o in outs for c in o.outputs])
    assert runs[0] == runs[1]
    result = cli("shard", gemv, tmp_path / "shards", "--tp", "2")
    assert result.code != 0 and "AWQ GEMV checkpoints run and reshard at --tp 1" in result.err
    assert len(result.err.strip().splitlines()) == 1
