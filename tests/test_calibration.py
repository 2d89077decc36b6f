"""Calibration text: sources, windows, seeds, and a clear refusal when text runs short."""

from __future__ import annotations

import json

import pytest
from transformers import AutoTokenizer

from llmkit.errors import LlmkitError
from llmkit.quant.calibration import (
    CalibrationSpec,
    calibration_ids,
    load_texts,
    token_stream,
    windows,
)


@pytest.fixture(scope="module")
def tokenizer(tiny_dir):
    return AutoTokenizer.from_pretrained(tiny_dir("tiny-llama"))


def test_windows_are_bos_prefixed_and_consecutive():
    stream = list(range(10, 40))
    got = windows(stream, seq_len=8, bos_id=1)
    assert got == [[1, *range(10 + 7 * i, 17 + 7 * i)] for i in range(4)]


def test_builtin_samples_are_seeded(tokenizer):
    spec = CalibrationSpec(num_samples=8, seq_len=64)
    a, b = calibration_ids(tokenizer, spec), calibration_ids(tokenizer, spec)
    assert a.shape == (8, 64) and bool((a[:, 0] == tokenizer.bos_token_id).all())
    assert a.equal(b)
    assert not a.equal(
        calibration_ids(tokenizer, CalibrationSpec(num_samples=8, seq_len=64, seed=5))
    )
    assert len({tuple(row.tolist()) for row in a}) == 8  # no window drawn twice


def test_too_short_text_is_refused_with_the_count_that_fits(tokenizer, tmp_path):
    text = tmp_path / "short.txt"
    text.write_text("Ada found a small cat near the river. " * 30)
    fits = len(
        windows(
            tokenizer(text.read_text(), add_special_tokens=False)["input_ids"]
            + [tokenizer.eos_token_id],
            64,
            tokenizer.bos_token_id,
        )
    )
    spec = CalibrationSpec(dataset=str(text), num_samples=fits + 1, seq_len=64)
    with pytest.raises(LlmkitError, match=rf"{fits} samples of 64 tokens, but {fits + 1}"):
        calibration_ids(tokenizer, spec)
    ids = calibration_ids(
        tokenizer, CalibrationSpec(dataset=str(text), num_samples=fits, seq_len=64)
    )
    assert ids.shape == (fits, 64)


def test_jsonl_texts_and_messages(tmp_path, tokenizer):
    path = tmp_path / "data.jsonl"
    records = [
        {"text": "first text"},
        {"messages": [{"role": "user", "content": "hi"}]},
        {"text": "third"},
    ]
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n\n")
    texts = load_texts(CalibrationSpec(dataset=str(path)))
    assert texts == ["first text", [{"role": "user", "content": "hi"}], "third"]
    path.write_text('{"body": "x"}\n')
    with pytest.raises(LlmkitError, match=r"data.jsonl:1 has no 'text'"):
        load_texts(CalibrationSpec(dataset=str(path)))
    path.write_text("{broken\n")
    with pytest.raises(LlmkitError, match="not valid JSON"):
        load_texts(CalibrationSpec(dataset=str(path)))


def test_parquet_texts(tmp_path):
    import datasets

    path = tmp_path / "data.parquet"
    datasets.Dataset.from_dict({"content": ["one", "two"]}).to_parquet(str(path))
    assert load_texts(CalibrationSpec(dataset=str(path), text_column="content")) == ["one", "two"]
    with pytest.raises(LlmkitError, match="no column 'text'"):
        load_texts(CalibrationSpec(dataset=str(path)))


def test_chat_template_wraps_text(tokenizer):
    plain = token_stream(tokenizer, ["Ada found a cat."])
    chat = token_stream(tokenizer, ["Ada found a cat."], chat_template=True)
    user = tokenizer.convert_tokens_to_ids("<|user|>")
    assert chat[0] == user and user not in plain
    assert plain[:-1] == tokenizer("Ada found a cat.", add_special_tokens=False)["input_ids"]
    assert plain[-1] == tokenizer.eos_token_id


def test_unknown_file_type_is_refused(tmp_path):
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(LlmkitError, match=r"\.txt, \.jsonl or \.parquet"):
        load_texts(CalibrationSpec(dataset=str(tmp_path / "x.csv")))


def test_unreachable_hub_dataset_is_one_line_error():
    from tests.conftest import run_python

    code = (
        "from llmkit.quant.calibration import CalibrationSpec, load_texts\n"
        "from llmkit.errors import LlmkitError\n"
        "try:\n    load_texts(CalibrationSpec(dataset='some-org/no-such-dataset'))\n"
        "except LlmkitError as e:\n    print(e)\n"
    )
    proc = run_python(code, env={"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("cannot load calibration dataset 'some-org/no-such-dataset'")
