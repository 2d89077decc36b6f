"""Checkpoint reading and writing: round trips, sharding, atomicity, corrupt input."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors.torch import load_file

from llmkit.checkpoint import dtypes
from llmkit.checkpoint.reader import open_checkpoint
from llmkit.checkpoint.safetensors_io import TensorSpec, read_header
from llmkit.checkpoint.writer import parse_size, plan_shards, write_checkpoint
from llmkit.errors import LlmkitError


def sample_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "f32": torch.randn(64, 33, generator=g),
        "f16": torch.randn(17, 5, generator=g).half(),
        "bf16": torch.randn(40, 8, generator=g).bfloat16(),
        "f64": torch.randn(3, generator=g).double(),
        "i32": torch.randint(-(2**31), 2**31 - 1, (50, 4), dtype=torch.int32, generator=g),
        "i8": torch.randint(-128, 127, (31,), dtype=torch.int8, generator=g),
        "u8": torch.randint(0, 255, (9, 3), dtype=torch.uint8, generator=g),
        "bool": torch.tensor([True, False, True]),
        "scalar": torch.tensor(2.5),
        "empty": torch.empty(0, 4),
        "big": torch.randn(300, 16, generator=g),
    }


def specs_of(tensors: dict[str, torch.Tensor]) -> list[TensorSpec]:
    return [
        TensorSpec(name, dtypes.from_torch(t.dtype), tuple(t.shape), lambda t=t: [t])
        for name, t in tensors.items()
    ]


def read_all_reference(directory) -> dict[str, torch.Tensor]:
    """Read every shard with the safetensors package itself (an independent reader)."""
    state: dict[str, torch.Tensor] = {}
    for file in sorted(directory.glob("*.safetensors")):
        state.update(load_file(file))
    return state


@pytest.mark.parametrize("max_shard_size", ["1GB", "4KB", 1])
def test_sharded_round_trip_is_bit_exact(tmp_path, max_shard_size):
    tensors = sample_tensors()
    out = tmp_path / "out"
    written = write_checkpoint(
        out, specs_of(tensors), {"model_type": "x"}, max_shard_size=max_shard_size
    )
    reference = read_all_reference(out)
    with open_checkpoint(out) as ck:
        for name, t in tensors.items():
            for got in (ck.get_tensor(name), reference[name]):
                assert got.dtype == t.dtype and got.shape == t.shape
                assert torch.equal(got.view(-1).view(torch.uint8), t.reshape(-1).view(torch.uint8))
    assert written.total_bytes == sum(t.numel() * t.element_size() for t in tensors.values())
    if len(written.shards) > 1:
        index = json.loads((out / "model.safetensors.index.json").read_text())
        assert set(index["weight_map"]) == set(tensors)
        assert index["metadata"]["total_size"] == written.total_bytes
        for name, file in index["weight_map"].items():
            assert name in load_file(out / file)


def test_shards_respect_max_size(tmp_path):
    tensors = sample_tensors()
    max_bytes = 4000
    written = write_checkpoint(tmp_path / "o", specs_of(tensors), {}, max_shard_size=max_bytes)
    assert len(written.shards) > 2
    for name in written.shards:
        infos, metadata = read_header(tmp_path / "o" / name)
        assert metadata == {"format": "pt"}
        payload = sum(i.nbytes for i in infos.values())
        assert payload <= max_bytes or len(infos) == 1


def test_plan_shards_keeps_order_and_isolates_large_tensors():
    specs = [TensorSpec(str(i), "U8", (n,), list) for i, n in enumerate([3, 3, 10, 2, 2])]
    plan = plan_shards(specs, 6)
    assert [[s.name for s in shard] for shard in plan] == [["0", "1"], ["2"], ["3", "4"]]


def test_row_chunks_reassemble_the_tensor(tmp_path):
    tensors = sample_tensors()
    write_checkpoint(tmp_path / "o", specs_of(tensors), {})
    with open_checkpoint(tmp_path / "o") as ck:
        chunks = list(ck.iter_row_chunks("big", max_bytes=1000))
        assert len(chunks) > 1
        assert all(c.numel() * c.element_size() <= 1000 for c in chunks)
        assert torch.equal(torch.cat(chunks), tensors["big"])


def _row_bytes(t: torch.Tensor, start: int, stop: int) -> bytes:
    rows = t.reshape(1) if t.dim() == 0 else t
    return rows[max(0, start) : stop].contiguous().view(torch.uint8).numpy().tobytes()


def test_mapped_rows_equal_the_reference_bytes_and_are_read_only(tmp_path):
    tensors = sample_tensors()
    write_checkpoint(tmp_path / "o", specs_of(tensors), {})
    reference = read_all_reference(tmp_path / "o")
    with open_checkpoint(tmp_path / "o") as ck:
        for name, t in reference.items():
            rows = t.shape[0] if t.dim() else 1
            for start, stop in [(0, rows), (1, rows), (rows // 3, rows - 1), (-2, 2), (rows, 9**9)]:
                data = ck.map_row_bytes(name, start, stop)
                assert data.tobytes() == _row_bytes(t, start, stop), (name, start, stop)
                assert data.shape[1] == ck.tensors[name].row_bytes
                assert data.size == 0 or not data.flags.writeable


def test_mapped_rows_past_a_truncated_file_are_a_clear_error(tmp_path):
    write_checkpoint(tmp_path / "o", specs_of({"big": sample_tensors()["big"]}), {})
    (file,) = (tmp_path / "o").glob("*.safetensors")
    with open_checkpoint(tmp_path / "o") as ck:
        with file.open("r+b") as f:
            f.truncate(file.stat().st_size - 100)
        assert ck.map_row_bytes("big", 0, 10).size == 10 * 64
        with pytest.raises(LlmkitError, match="ended early"):
            ck.map_row_bytes("big", 290, 300)


@pytest.mark.parametrize(
    ("text", "expected"),
    [("5GB", 5 * 10**9), ("500MB", 5 * 10**8), ("2GiB", 2 * 2**30), ("1.5kb", 1500), ("123", 123)],
)
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "5XB", "-1GB", "0", "GB"])
def test_parse_size_rejects_nonsense(text):
    with pytest.raises(LlmkitError):
        parse_size(text)


def failing_specs(fail_after: int) -> list[TensorSpec]:
    """Specs whose data raises once `fail_after` tensors have been produced."""
    produced = []

    def chunks(i: int):
        if len(produced) >= fail_after:
            raise RuntimeError("disk on fire")
        produced.append(i)
        return [torch.full((256,), float(i))]

    return [TensorSpec(f"t{i}", "F32", (256,), lambda i=i: chunks(i)) for i in range(6)]


def test_interrupted_write_leaves_nothing(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="disk on fire"):
        # Small shards so that complete files exist when the failure hits.
        write_checkpoint(out, failing_specs(fail_after=4), {}, max_shard_size=2048)
    assert list(tmp_path.iterdir()) == []


def test_keyboard_interrupt_leaves_nothing(tmp_path):
    def interrupted():
        raise KeyboardInterrupt

    specs = [
        TensorSpec("a", "F32", (1,), lambda: [torch.zeros(1)]),
        TensorSpec("b", "F32", (1,), interrupted),
    ]
    with pytest.raises(KeyboardInterrupt):
        write_checkpoint(tmp_path / "out", specs, {})
    assert list(tmp_path.iterdir()) == []


def test_refuses_non_empty_output_before_any_work(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(LlmkitError, match="--overwrite"):
        write_checkpoint(out, failing_specs(fail_after=0), {})
    assert (out / "keep.txt").read_text() == "precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_empty_output_directory_is_used(tmp_path):
    (tmp_path / "out").mkdir()
    write_checkpoint(tmp_path / "out", specs_of({"a": torch.ones(2)}), {})
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_overwrite_replaces_only_on_success(tmp_path):
    out = tmp_path / "out"
    write_checkpoint(out, specs_of({"old": torch.ones(2)}), {"v": 1})
    with pytest.raises(RuntimeError):
        write_checkpoint(out, failing_specs(fail_after=2), {"v": 2}, overwrite=True)
    assert json.loads((out / "config.json").read_text()) == {"v": 1}
    write_checkpoint(out, specs_of({"new": torch.zeros(3)}), {"v": 3}, overwrite=True)
    assert json.loads((out / "config.json").read_text()) == {"v": 3}
    assert set(load_file(out / "model.safetensors")) == {"new"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_output_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(LlmkitError, match="not a directory"):
        write_checkpoint(tmp_path / "f", [], {}, overwrite=True)


def write_raw(path, header: bytes, payload: bytes = b"") -> None:
    path.write_bytes(struct.pack("<Q", len(header)) + header + payload)


CORRUPTIONS = {
    "too short": lambda p: p.write_bytes(b"\x01\x02"),
    "header longer than file": lambda p: p.write_bytes(struct.pack("<Q", 10**6) + b"{}"),
    "not json": lambda p: write_raw(p, b"{not json"),
    "not an object": lambda p: write_raw(p, b"[1, 2]"),
    "missing field": lambda p: write_raw(p, b'{"a": {"dtype": "F32"}}'),
    "unknown dtype": lambda p: write_raw(
        p, b'{"a": {"dtype": "F99", "shape": [1], "data_offsets": [0, 4]}}', b"\0" * 4
    ),
    "size mismatch": lambda p: write_raw(
        p, b'{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}', b"\0" * 4
    ),
    "truncated data": lambda p: write_raw(
        p, b'{"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}', b"\0" * 8
    ),
    "hole": lambda p: write_raw(
        p, b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}', b"\0" * 8
    ),
}


@pytest.mark.parametrize("kind", sorted(CORRUPTIONS))
def test_corrupt_header_is_one_line_error(cli, tmp_path, kind):
    (tmp_path / "config.json").write_text("{}")
    CORRUPTIONS[kind](tmp_path / "model.safetensors")
    with pytest.raises(LlmkitError):
        open_checkpoint(tmp_path)
    for args in (("inspect", tmp_path), ("quantize", tmp_path, tmp_path / "o", "--method", "fp16")):
        result = cli(*args)
        assert result.code == 1
        assert result.err.startswith("error: ") and len(result.err.strip().splitlines()) == 1
        assert "model.safetensors" in result.err
    assert not (tmp_path / "o").exists()


def test_bad_config_json_is_one_line_error(cli, tmp_path):
    (tmp_path / "config.json").write_text("{oops")
    result = cli("inspect", tmp_path)
    assert result.code == 1 and "not valid JSON" in result.err


def test_index_pointing_to_missing_shard(tmp_path):
    write_checkpoint(tmp_path / "o", specs_of(sample_tensors()), {}, max_shard_size=2000)
    next((tmp_path / "o").glob("model-00002-*.safetensors")).unlink()
    with pytest.raises(LlmkitError, match="missing"):
        open_checkpoint(tmp_path / "o")


def test_bin_checkpoint_is_read(tmp_path):
    tensors = {k: v for k, v in sample_tensors().items() if k != "empty"}
    (tmp_path / "config.json").write_text("{}")
    torch.save(tensors, tmp_path / "pytorch_model.bin")
    with open_checkpoint(tmp_path) as ck:
        assert ck.format == "bin"
        assert set(ck.tensors) == set(tensors)
        for name, t in tensors.items():
            assert torch.equal(ck.get_tensor(name), t)
            assert ck.tensors[name].dtype == dtypes.from_torch(t.dtype)


def test_sharded_bin_checkpoint_with_index(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    torch.save({"a": torch.ones(2)}, tmp_path / "pytorch_model-00001-of-00002.bin")
    torch.save({"b": torch.zeros(3)}, tmp_path / "pytorch_model-00002-of-00002.bin")
    index = {
        "weight_map": {
            "a": "pytorch_model-00001-of-00002.bin",
            "b": "pytorch_model-00002-of-00002.bin",
        }
    }
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    with open_checkpoint(tmp_path) as ck:
        assert torch.equal(ck.get_tensor("b"), torch.zeros(3))


class NotATensor:
    pass


def test_bin_with_pickled_code_is_refused(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    torch.save({"a": NotATensor()}, tmp_path / "pytorch_model.bin")
    with pytest.raises(LlmkitError, match="weights-only"):
        open_checkpoint(tmp_path)


class FailingFile:
    """A file whose writes fail after the first, like a disk that fills up."""

    def __init__(self):
        self.num_writes = 0

    def write(self, data) -> int:
        self.num_writes += 1
        if self.num_writes > 1:
            raise OSError(28, "No space left on device")
        return len(data)


def test_background_writer_surfaces_write_errors():
    from llmkit.checkpoint.safetensors_io import BackgroundWriter

    f = FailingFile()
    with pytest.raises(OSError, match="No space"), BackgroundWriter(f.write) as writer:
        for _ in range(50):
            writer.write(memoryview(b"x" * 10))
    assert f.num_writes == 2  # nothing is written after the failure
