"""llmkit shard: plans, bit-exact round trips, resharding, quantized formats, refusals."""

from __future__ import annotations

import itertools
import json
import time
from functools import partial
from pathlib import Path

import pytest
import torch

from llmkit.arch.plan import make_plan, stage_layers
from llmkit.checkpoint import dtypes, sources
from llmkit.checkpoint.init import PRESETS, preset_config, random_state_dict
from llmkit.checkpoint.manifest import MANIFEST, outline, read_manifest
from llmkit.checkpoint.reader import open_checkpoint
from llmkit.checkpoint.safetensors_io import TensorSpec, read_header, read_rows
from llmkit.checkpoint.writer import write_checkpoint
from llmkit.errors import LlmkitError
from llmkit.quant.calibration import CalibrationSpec
from llmkit.quant.formats import awq, gptq
from llmkit.quant.options import options_for
from llmkit.quant.pipeline import quantize
from llmkit.shard import write
from llmkit.shard.merge import merge
from llmkit.shard.verify import verify
from llmkit.shard.write import shard
from tests.conftest import TINY_PRESETS


def write_model(out: Path, preset: str, num_layers: int, seed: int = 0) -> Path:
    """A float32 checkpoint of `preset` with `num_layers` layers (enough for pp=3)."""
    config = preset_config(PRESETS[preset]) | {"num_hidden_layers": num_layers}
    return write_state(out, random_state_dict(config, seed), config)


def write_state(out: Path, state: dict[str, torch.Tensor], config: dict) -> Path:
    specs = [
        TensorSpec(n, dtypes.from_torch(t.dtype), tuple(t.shape), lambda t=t: [t])
        for n, t in state.items()
    ]
    return write_checkpoint(out, specs, config).path


@pytest.fixture(scope="session")
def three_layer(tmp_path_factory):
    made: dict[str, Path] = {}

    def get(preset: str) -> Path:
        if preset not in made:
            made[preset] = write_model(tmp_path_factory.mktemp(preset) / "ckpt", preset, 3)
        return made[preset]

    return get


def tensors_of(path: Path) -> dict[str, torch.Tensor]:
    with open_checkpoint(path) as ck:
        return {name: ck.get_tensor(name) for name in ck.tensors}


def assert_bit_exact(a: Path, b: Path) -> None:
    x, y = tensors_of(a), tensors_of(b)
    assert sorted(x) == sorted(y)
    for name in x:
        assert x[name].dtype == y[name].dtype and x[name].shape == y[name].shape, name
        assert torch.equal(x[name].view(torch.uint8), y[name].view(torch.uint8)), name


def rank_tensor(sharded: Path, name: str, tp_rank: int) -> torch.Tensor:
    """One rank's stored copy of `name`, read from its file."""
    file = sharded / read_manifest(sharded).files[name, tp_rank]
    info = read_header(file)[0][name]
    with file.open("rb") as f:
        return read_rows(f, info, 0, info.shape[0] if info.shape else 1)


# --- plan -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("layers", "pp", "counts"),
    [(30, 4, [7, 8, 8, 7]), (5, 3, [2, 2, 1]), (12, 3, [4, 4, 4]), (7, 2, [4, 3]), (3, 3, [1] * 3)],
)
def test_uneven_stages_give_extra_layers_to_the_middle_never_the_last(layers, pp, counts):
    stages = stage_layers(layers, pp)
    assert [b - a for a, b in stages] == counts
    assert stages[0][0] == 0 and stages[-1][1] == layers
    assert all(stages[i][1] == stages[i + 1][0] for i in range(pp - 1))


def test_explicit_stage_counts_are_checked():
    assert stage_layers(30, 4, (6, 8, 8, 8)) == ((0, 6), (6, 14), (14, 22), (22, 30))
    with pytest.raises(LlmkitError, match="summing to the model's 30 layers"):
        stage_layers(30, 4, (7, 8, 8, 8))
    with pytest.raises(LlmkitError, match="exceeds the model's 2 layers"):
        stage_layers(2, 3)


def synthetic(num_heads=4, num_kv_heads=2, intermediate=128, extra=None):
    """A config and its (dtype, shape) table for one llama layer: plans need nothing else."""
    head_dim, hidden = 16, num_heads * 16
    config = {
        "model_type": "llama",
        "num_hidden_layers": 1,
        "num_attention_heads": num_heads,
        "num_key_value_heads": num_kv_heads,
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "vocab_size": 512,
    }
    p = "model.layers.0."
    shapes = {
        "model.embed_tokens.weight": [512, hidden],
        p + "self_attn.q_proj.weight": [hidden, hidden],
        p + "self_attn.k_proj.weight": [num_kv_heads * head_dim, hidden],
        p + "self_attn.v_proj.weight": [num_kv_heads * head_dim, hidden],
        p + "self_attn.o_proj.weight": [hidden, hidden],
        p + "mlp.gate_proj.weight": [intermediate, hidden],
        p + "mlp.up_proj.weight": [intermediate, hidden],
        p + "mlp.down_proj.weight": [hidden, intermediate],
        p + "input_layernorm.weight": [hidden],
        "model.norm.weight": [hidden],
        "lm_head.weight": [512, hidden],
    } | (extra or {})
    return config, {name: ("F16", tuple(shape)) for name, shape in shapes.items()}


def test_kv_heads_are_replicated_when_tp_exceeds_them():
    config, tensors = synthetic(num_heads=8, num_kv_heads=2)
    plan = {p.name: p for p in make_plan(config, tensors, tp=8).tensors}
    k = plan["model.layers.0.self_attn.k_proj.weight"]
    assert [s.offset for s in k.slices] == [0, 0, 0, 0, 16, 16, 16, 16]
    assert {s.length for s in k.slices} == {16} and "replicated 4x" in k.note
    q = plan["model.layers.0.self_attn.q_proj.weight"]
    assert [s.offset for s in q.slices] == [16 * r for r in range(8)]


@pytest.mark.parametrize(
    ("heads", "kv", "tp", "message"),
    [
        (4, 2, 3, "tp=3 does not divide num_attention_heads=4; tp values that work: 1, 2, 4"),
        (12, 4, 6, "num_key_value_heads=4 can be neither split over tp=6 nor replicated"),
    ],
)
def test_head_refusals_name_the_numbers_and_what_works(heads, kv, tp, message):
    config, tensors = synthetic(num_heads=heads, num_kv_heads=kv)
    with pytest.raises(LlmkitError, match=message.replace("(", r"\(")) as e:
        make_plan(config, tensors, tp=tp)
    assert "tp values that work" in str(e.value)


def test_packed_and_grouped_splits_are_refused_with_the_tensor_named():
    p = "model.layers.0.mlp."
    config, tensors = synthetic(intermediate=40)
    tensors |= {  # GPTQ 4-bit, groups of 16: qzeros hold 8 outputs per int32
        p + "gate_proj.qzeros": ("I32", (4, 5)),
        p + "down_proj.scales": ("F16", (5, 64)),
    }
    with pytest.raises(LlmkitError) as e:
        make_plan(config, tensors, tp=2)
    assert "gate_proj.qzeros [4, 5] along dim 1 (outputs) into 2" in str(e.value)
    assert "tp values that work: 1" in str(e.value)
    del tensors[p + "gate_proj.qzeros"]
    with pytest.raises(LlmkitError, match=r"down_proj.scales \[5, 64\] along dim 0 \(inputs\)"):
        make_plan(config, tensors, tp=2)


def test_unknown_architectures_and_tensors_are_refused():
    config, tensors = synthetic()
    with pytest.raises(LlmkitError, match="not model_type 'gpt2'"):
        make_plan(config | {"model_type": "gpt2"}, tensors, tp=2)
    with pytest.raises(
        LlmkitError, match=r"no split rule for tensor 'model\.layers\.0\.mlp\.gate\.w'"
    ):
        make_plan(config, tensors | {"model.layers.0.mlp.gate.w": ("F16", (4,))}, tp=2)


def test_vocab_is_padded_to_a_multiple_of_pad_times_tp():
    config, tensors = synthetic()
    config["vocab_size"] = 500
    tensors["model.embed_tokens.weight"] = tensors["lm_head.weight"] = ("F16", (500, 64))
    embed = next(p for p in make_plan(config, tensors, tp=2).tensors if "embed" in p.name)
    assert (embed.padded, embed.padding, embed.slices[1].offset) == (512, 12, 256)
    embed = next(
        p for p in make_plan(config, tensors, tp=4, vocab_pad=100).tensors if "embed" in p.name
    )
    assert embed.padded == 800


# --- round trips on real files ----------------------------------------------------------


def layouts():
    return [(tp, pp) for tp in (1, 2, 4) for pp in (1, 2, 3)]


@pytest.mark.parametrize("preset", TINY_PRESETS)
def test_merge_of_shard_is_bit_exact_for_every_layout(preset, three_layer, tmp_path):
    src = three_layer(preset)
    for tp, pp in layouts():
        out = tmp_path / f"tp{tp}-pp{pp}"
        report = shard(src, out, tp=tp, pp=pp)
        assert report.num_files == tp * pp
        assert verify(out, source=src).problems == []
        merge(out, tmp_path / f"merged-{tp}-{pp}")
        assert_bit_exact(src, tmp_path / f"merged-{tp}-{pp}")


def test_manifest_describes_ranks_stages_and_every_slice(three_layer, tmp_path):
    src = three_layer("tiny-mistral")  # vocab 500: padded at every tp
    shard(src, tmp_path / "s", tp=2, pp=3)
    data = json.loads((tmp_path / "s" / MANIFEST).read_text())
    assert [s["layers"] for s in data["stages"]] == [[0, 1], [1, 2], [2, 3]]
    assert [(r["rank"], r["tp_rank"], r["pp_rank"]) for r in data["ranks"]][:3] == [
        (0, 0, 0),
        (1, 1, 0),
        (2, 0, 1),
    ]
    embed = data["tensors"]["model.embed_tokens.weight"]
    assert (embed["dim"], embed["padded"], embed["padding"], embed["pp_rank"]) == (0, 512, 12, 0)
    assert [(s["offset"], s["length"]) for s in embed["slices"]] == [(0, 256), (256, 256)]
    assert data["tensors"]["lm_head.weight"]["pp_rank"] == 2
    assert data["tensors"]["model.layers.1.self_attn.o_proj.weight"]["dim"] == 1
    assert data["source"]["files"]["model.safetensors"]["bytes"] > 0
    assert (tmp_path / "s" / "config.json").is_file()
    padding = rank_tensor(tmp_path / "s", "model.embed_tokens.weight", 1)[-12:]
    assert not padding.any()


def test_resharding_a_sharded_checkpoint_equals_sharding_the_original(three_layer, tmp_path):
    src = three_layer("tiny-qwen2")
    shard(src, tmp_path / "a", tp=2, pp=2)
    for tp, pp in [(4, 1), (1, 3), (2, 2)]:
        shard(src, tmp_path / f"direct-{tp}{pp}", tp=tp, pp=pp)
        shard(tmp_path / "a", tmp_path / f"re-{tp}{pp}", tp=tp, pp=pp)
        direct = sorted((tmp_path / f"direct-{tp}{pp}").glob("rank-*.safetensors"))
        for file in direct:
            assert file.read_bytes() == (tmp_path / f"re-{tp}{pp}" / file.name).read_bytes()
        assert verify(tmp_path / f"re-{tp}{pp}", source=src).problems == []


def test_replicated_kv_heads_hold_the_same_rows(three_layer, tmp_path):
    src = three_layer("tiny-llama")  # 4 heads, 2 kv heads of 16
    shard(src, tmp_path / "s", tp=4)
    full = tensors_of(src)["model.layers.0.self_attn.k_proj.weight"]
    ranks = [
        rank_tensor(tmp_path / "s", "model.layers.0.self_attn.k_proj.weight", r) for r in range(4)
    ]
    for r in range(4):
        assert torch.equal(ranks[r], full[16 * (r // 2) : 16 * (r // 2 + 1)])


def test_tied_embeddings_get_an_lm_head_on_the_last_stage_only(three_layer, tmp_path):
    src = three_layer("tiny-qwen2")  # tied
    shard(src, tmp_path / "pp2", tp=2, pp=2)
    manifest = read_manifest(tmp_path / "pp2")
    head = manifest.plans["lm_head.weight"]
    assert head.source == "model.embed_tokens.weight" and head.pp_rank == 1 and head.is_copy
    embed = tensors_of(src)["model.embed_tokens.weight"]
    assert torch.equal(rank_tensor(tmp_path / "pp2", "lm_head.weight", 1), embed[256:])
    # hashed once with the embedding's slice, and that hash is the lm_head's bytes' own
    assert manifest.hashes["lm_head.weight", 1] == manifest.hashes["model.embed_tokens.weight", 1]
    assert verify(tmp_path / "pp2", source=src).problems == []
    shard(src, tmp_path / "pp1", tp=2)
    assert "lm_head.weight" not in read_manifest(tmp_path / "pp1").plans
    merge(tmp_path / "pp2", tmp_path / "merged")
    assert "lm_head.weight" not in tensors_of(tmp_path / "merged")


# --- quantized checkpoints --------------------------------------------------------------


@pytest.fixture(scope="module")
def quantized(tiny_dir, tmp_path_factory):
    base = tmp_path_factory.mktemp("quantized")
    calibration = CalibrationSpec(num_samples=4, seq_len=32)
    made = {}
    for name, method, options in [
        ("gptq", "gptq", options_for("gptq", group_size=32)),
        ("gptq-act", "gptq", options_for("gptq", group_size=32, desc_act=True)),
        ("awq", "awq", options_for("awq", group_size=32)),
        ("w8a8", "w8a8", options_for("w8a8")),  # compressed-tensors int-quantized
        ("int8", "int8", options_for("int8")),  # compressed-tensors pack-quantized
    ]:
        quantize(
            tiny_dir("tiny-llama"), base / name, method, options=options, calibration=calibration
        )
        made[name] = base / name
    return made


def dequantized_rank(sharded: Path, module: str, tp_rank: int, fmt: str) -> torch.Tensor:
    parts = {
        s: rank_tensor(sharded, f"{module}.{s}", tp_rank)
        for s in (gptq.SUFFIXES if fmt != "awq" else awq.SUFFIXES)
    }
    if fmt == "awq":
        return awq.dequantize(parts["qweight"], parts["qzeros"], parts["scales"])
    plan = read_manifest(sharded).plans[f"{module}.scales"]
    # g_idx holds global group ids; a rank whose groups were split counts from its first one
    first_group = plan.slices[tp_rank].offset if plan.dim == 0 else 0
    return gptq.dequantize(
        parts["qweight"], parts["qzeros"], parts["scales"], parts["g_idx"] - first_group, 4
    )


@pytest.mark.parametrize("fmt", ["gptq", "gptq-act", "awq"])
def test_quantized_shards_dequantize_to_slices_of_the_full_weight(quantized, fmt, tmp_path):
    src = quantized[fmt]
    shard(src, tmp_path / "s", tp=2)
    assert verify(tmp_path / "s", source=src).problems == []
    merge(tmp_path / "s", tmp_path / "m")
    assert_bit_exact(src, tmp_path / "m")
    full = tensors_of(src)
    for module, dim in [("self_attn.q_proj", 0), ("self_attn.o_proj", 1), ("mlp.down_proj", 1)]:
        name = f"model.layers.1.{module}"
        if fmt == "awq":
            weight = awq.dequantize(*(full[f"{name}.{s}"] for s in awq.SUFFIXES))
        else:
            weight = gptq.dequantize(*(full[f"{name}.{s}"] for s in gptq.SUFFIXES), 4)
        pieces = [dequantized_rank(tmp_path / "s", name, r, fmt) for r in range(2)]
        assert torch.equal(torch.cat(pieces, dim=dim), weight), name


@pytest.mark.parametrize("fmt", ["w8a8", "int8"])
def test_compressed_tensors_shards_merge_bit_exact(quantized, fmt, tmp_path):
    shard(quantized[fmt], tmp_path / "s", tp=2, pp=2)
    assert verify(tmp_path / "s", source=quantized[fmt]).problems == []
    merge(tmp_path / "s", tmp_path / "m")
    assert_bit_exact(quantized[fmt], tmp_path / "m")
    scale = read_manifest(tmp_path / "s").plans["model.layers.1.mlp.down_proj.weight_scale"]
    assert scale.dim is None  # one scale per output channel: whole on every row-parallel rank


def test_act_order_keeps_full_scales_on_row_parallel_ranks(quantized, tmp_path):
    shard(quantized["gptq-act"], tmp_path / "s", tp=2)
    plans = read_manifest(tmp_path / "s").plans
    scales = plans["model.layers.0.mlp.down_proj.scales"]
    assert scales.dim is None and "act-order" in scales.note
    assert plans["model.layers.0.mlp.down_proj.g_idx"].dim == 0


def test_group_size_refusal_comes_before_any_output(quantized, tmp_path):
    with pytest.raises(LlmkitError, match=r"along dim 0 \(inputs\).*tp values that work: 1, 2$"):
        shard(quantized["gptq"], tmp_path / "s", tp=4)  # o_proj: 16 inputs per rank, groups of 32
    assert not (tmp_path / "s").exists()


# --- refusals, atomicity, verification, CLI ---------------------------------------------


def test_refusals_come_before_reading_any_tensor(tiny_dir, tmp_path, monkeypatch):
    def no_reads(*args):
        raise AssertionError("read a tensor before refusing")

    monkeypatch.setattr(sources.CheckpointSource, "read_rows", no_reads)
    src = tiny_dir("tiny-llama")
    for kwargs, message in [
        ({"tp": 3}, "does not divide num_attention_heads"),
        ({"tp": 2, "pp": 3}, "exceeds the model's 2 layers"),
        ({"tp": 1, "pp": 2, "pp_layers": (2, 1)}, "--pp-layers 2,1"),
        ({"tp": 2, "vocab_pad": 0}, "--vocab-pad must be at least 1"),
        ({"tp": 0}, "--tp must be at least 1"),
    ]:
        with pytest.raises(LlmkitError, match=message):
            shard(src, tmp_path / "out", **kwargs)
        assert not (tmp_path / "out").exists()


def test_a_failed_write_leaves_the_old_output_untouched(tiny_dir, tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("old")

    def broken(*args):
        raise OSError("disk full")

    monkeypatch.setattr(sources.CheckpointSource, "read_rows", broken)
    with pytest.raises(OSError, match="disk full"):
        shard(tiny_dir("tiny-llama"), out, tp=2, overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert (out / "keep.txt").read_text() == "old"
    with pytest.raises(LlmkitError, match="not empty"):
        shard(tiny_dir("tiny-llama"), out, tp=2)


def test_pieces_written_out_of_order_by_uneven_workers_stay_bit_exact(
    three_layer, tmp_path, monkeypatch
):
    """Writes cut into odd-sized calls and slowed unevenly, so that the workers overtake each
    other: a stream's pieces must still be hashed in order, and a worker's gather buffer
    reused only once its piece is written."""
    write_once = write._pwrite_all

    def uneven(fd, view, offset):
        time.sleep(0.001 * (offset % 3))
        write_once(fd, view, offset)

    monkeypatch.setattr(write, "_WRITE_BYTES", 1000)
    # chunks of a few rows, so that gathered chunks follow each other
    monkeypatch.setattr(write, "row_chunks", partial(write.row_chunks, max_bytes=3000))
    monkeypatch.setattr(write, "_pwrite_all", uneven)
    src = three_layer("tiny-qwen2")
    shard(src, tmp_path / "out", tp=4, pp=1)
    merge(tmp_path / "out", tmp_path / "merged")
    assert_bit_exact(src, tmp_path / "merged")
    assert verify(tmp_path / "out", source=src).problems == []


@pytest.mark.parametrize("failing_call", [1, 40])
def test_a_failing_writer_stops_the_shard_with_its_error_and_no_output(
    three_layer, tmp_path, monkeypatch, failing_call
):
    """A thread whose write fails stops the others, one waiting for a hashing turn that will
    not come included: the error comes out, not a wait."""
    write_once, calls = write._pwrite_all, itertools.count(1)

    def full(fd, view, offset):
        if next(calls) == failing_call:
            raise OSError("No space left on device")
        write_once(fd, view, offset)

    monkeypatch.setattr(write, "row_chunks", partial(write.row_chunks, max_bytes=3000))
    monkeypatch.setattr(write, "_pwrite_all", full)
    with pytest.raises(OSError, match="No space"):
        shard(three_layer("tiny-qwen2"), tmp_path / "out", tp=4, pp=1)
    assert not (tmp_path / "out").exists()


def test_the_manifest_outline_is_the_same_json_with_one_line_per_entry(tiny_dir, tmp_path):
    shard(tiny_dir("tiny-llama"), tmp_path / "s", tp=2, pp=2)
    text = (tmp_path / "s" / MANIFEST).read_text()
    data = json.loads(text)
    assert text.count("\n") == 2 + len(data) + sum(
        len(v) + 1 for v in data.values() if isinstance(v, dict | list) and v
    )
    odd = {"a": [], "b": {}, "c": [{"x": 'q"\n\u00e9', "y": [1.5, None]}], "d": {"e": {"f": []}}}
    assert json.loads(outline(odd, levels=2)) == odd


def test_verify_finds_corruption_missing_files_and_a_different_source(tiny_dir, tmp_path):
    src = tiny_dir("tiny-llama")
    shard(src, tmp_path / "s", tp=2)
    other = write_model(tmp_path / "other", "tiny-llama", 2, seed=1)
    problems = verify(tmp_path / "s", source=other).problems
    assert any("source file model.safetensors" in p for p in problems)
    assert any("differ from the source" in p for p in problems)
    file = tmp_path / "s" / "rank-1-0.safetensors"
    data = bytearray(file.read_bytes())
    data[-3] ^= 0xFF
    file.write_bytes(bytes(data))
    problems = verify(tmp_path / "s").problems
    assert len(problems) == 1 and "on tp rank 1 (rank-1-0.safetensors)" in problems[0]
    file.unlink()
    assert verify(tmp_path / "s").problems == ["rank-1-0.safetensors: missing"]


def test_cli_shard_merge_and_verify(cli, tiny_dir, tmp_path):
    src = tiny_dir("tiny-qwen3")
    result = cli("shard", src, tmp_path / "s", "--tp", "2", "--json")
    assert result.code == 0, result.err
    report = json.loads(result.out)
    assert (report["tp"], report["pp"], report["num_files"]) == (2, 1, 2)
    result = cli("shard", "verify", tmp_path / "s", "--source", src)
    assert result.code == 0 and "bit-exact" in result.out
    result = cli("shard", "merge", tmp_path / "s", tmp_path / "m")
    assert result.code == 0, result.err
    assert_bit_exact(src, tmp_path / "m")
    result = cli("shard", src, tmp_path / "bad", "--tp", "3")
    assert result.code == 1 and "tp values that work: 1, 2, 4" in result.err
    (tmp_path / "s" / "rank-0-0.safetensors").unlink()
    result = cli("shard", "verify", tmp_path / "s", "--json")
    assert result.code == 1 and json.loads(result.out)["ok"] is False


def test_ranks_split_into_several_files_past_the_size_limit(three_layer, tmp_path):
    src = three_layer("tiny-llama")
    report = shard(src, tmp_path / "s", tp=2, pp=2, max_shard_size="60KB")
    manifest = read_manifest(tmp_path / "s")
    files = manifest.data["ranks"][0]["files"]
    assert len(files) > 1 and files[0] == f"rank-0-0-00001-of-{len(files):05d}.safetensors"
    assert report.num_files == sum(len(r["files"]) for r in manifest.data["ranks"])
    assert verify(tmp_path / "s", source=src).problems == []
    merge(tmp_path / "s", tmp_path / "m")
    assert_bit_exact(src, tmp_path / "m")


def test_pytorch_bin_checkpoints_shard_too(tiny_dir, tmp_path):
    src = tmp_path / "bin"
    src.mkdir()
    state = tensors_of(tiny_dir("tiny-llama"))
    torch.save(state, src / "pytorch_model.bin")
    (src / "config.json").write_text((tiny_dir("tiny-llama") / "config.json").read_text())
    shard(src, tmp_path / "s", tp=2)
    data = json.loads((tmp_path / "s" / MANIFEST).read_text())
    assert list(data["source"]["files"]) == ["pytorch_model.bin"]
    assert verify(tmp_path / "s", source=src).problems == []
    merge(tmp_path / "s", tmp_path / "m")
    assert_bit_exact(src, tmp_path / "m")


def test_rotary_buffers_are_dropped_and_stay_dropped_through_resharding(tiny_dir, tmp_path):
    state = tensors_of(tiny_dir("tiny-llama"))
    buffer = "model.layers.0.self_attn.rotary_emb.inv_freq"
    state[buffer] = torch.arange(8, dtype=torch.float32)
    config = json.loads((tiny_dir("tiny-llama") / "config.json").read_text())
    specs = [
        TensorSpec(n, dtypes.from_torch(t.dtype), tuple(t.shape), lambda t=t: [t])
        for n, t in state.items()
    ]
    src = write_checkpoint(tmp_path / "src", specs, config).path
    shard(src, tmp_path / "a", tp=2)
    shard(tmp_path / "a", tmp_path / "b", tp=1, pp=2)
    for out in ("a", "b"):
        manifest = read_manifest(tmp_path / out)
        assert manifest.data["dropped"] == [buffer] and buffer not in manifest.plans
        assert verify(tmp_path / out, source=src).problems == []


def ct_act_order_checkpoint(out: Path) -> Path:
    """tiny-llama with its layers' Linears in compressed-tensors pack-quantized: 4-bit,
    asymmetric, groups of 16 in act-order (each input's group in a shuffled weight_g_idx)."""
    from llmkit.quant.formats import compressed_tensors as ct

    config = preset_config(PRESETS["tiny-llama"])
    state = random_state_dict(config, 0)
    g = torch.Generator().manual_seed(1)
    for name in [n for n in state if ".layers." in n and n.endswith("_proj.weight")]:
        rows, cols = state.pop(name).shape
        module, groups = name.removesuffix(".weight"), cols // 16
        q = torch.randint(-8, 8, (rows, cols), dtype=torch.int8, generator=g)
        zero = torch.randint(-4, 4, (rows, groups), dtype=torch.int8, generator=g)
        state[f"{module}.weight_packed"] = ct.pack_int32(q, 4)
        state[f"{module}.weight_shape"] = torch.tensor([rows, cols])
        state[f"{module}.weight_scale"] = (torch.rand(rows, groups, generator=g) + 0.05).half()
        state[f"{module}.weight_zero_point"] = ct.pack_int32(zero.t(), 4).t().contiguous()
        order = torch.randperm(cols, generator=g)
        state[f"{module}.weight_g_idx"] = (torch.arange(cols) // 16)[order].to(torch.int32)
    weights = {"num_bits": 4, "type": "int", "symmetric": False, "strategy": "group",
               "group_size": 16, "actorder": "group"}  # fmt: skip
    config["quantization_config"] = {
        "quant_method": "compressed-tensors",
        "format": "pack-quantized",
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights}},
        "ignore": ["lm_head"],
    }
    return write_state(out, state, config)


def test_act_order_compressed_tensors_ranks_read_as_slices_of_the_full_weight(tmp_path):
    """weight_g_idx holds groups from all over the inputs: a row-parallel rank keeps every
    group's scale and zero point, read as it is and through a shard of its own."""
    from llmkit.checkpoint.rank_tensors import CheckpointRank, ShardRank
    from llmkit.quant.formats.readers import LinearReader

    src = ct_act_order_checkpoint(tmp_path / "ct")
    shard(src, tmp_path / "s", tp=2)
    assert verify(tmp_path / "s", source=src).problems == []
    sharded = sources.open_source(tmp_path / "s")
    with open_checkpoint(src) as ck:
        qconfig = ck.config["quantization_config"]
        whole = LinearReader(CheckpointRank(ck, 1, 0), qconfig)
        for module, dim in [("self_attn.o_proj", 1), ("mlp.down_proj", 1), ("mlp.up_proj", 0)]:
            name = f"model.layers.1.{module}"
            full = whole.read(name).dequantize()
            for ranks in ([CheckpointRank(ck, 2, r) for r in range(2)],
                          [ShardRank(sharded, 2, r) for r in range(2)]):  # fmt: skip
                pieces = [LinearReader(rank, qconfig).read(name).dequantize() for rank in ranks]
                assert torch.equal(torch.cat(pieces, dim=dim), full), name
