"""The checkpoint tokenizer llmkit loads behaves as the one AutoTokenizer builds, whichever
class it is; the plain fast case loads without importing transformers."""

from __future__ import annotations

import json
import shutil

import pytest
from transformers import AutoTokenizer

from llmkit.checkpoint.fast_tokenizer import FastTokenizer, load_tokenizer
from tests.conftest import TINY_PRESETS, run_python

TEXTS = [
    "The king's horse, 42 times: ünïcödé!\n  spaced",
    "",
    " leading and trailing spaces ",
    "<s>special</s> tokens <|user|> as text<pad>",
    "tabs\tand\r\nnewlines\n\n\nemoji 🙂 and 漢字",
]
CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "hi <s> there"},
    {"role": "assistant", "content": "hello"},
    {"role": "user", "content": "again"},
]


def assert_same(ours, auto) -> None:
    """Every call llmkit makes answers as transformers' tokenizer does."""
    for text in TEXTS:
        for special in (True, False):
            assert ours.encode(text, add_special_tokens=special) == auto.encode(
                text, add_special_tokens=special
            ), (text, special)
        ids = auto.encode(text)
        for skip in (True, False):
            assert ours.decode(ids, skip_special_tokens=skip) == auto.decode(
                ids, skip_special_tokens=skip
            )
    for token_id in range(len(auto)):
        assert ours.decode([token_id]) == auto.decode([token_id]), token_id
        assert ours.decode([token_id], skip_special_tokens=True) == auto.decode(
            [token_id], skip_special_tokens=True
        )
    assert len(ours) == len(auto)
    assert ours.all_special_ids == auto.all_special_ids
    assert ours.all_special_tokens == auto.all_special_tokens
    for name in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id"):
        assert getattr(ours, name) == getattr(auto, name), name
    for generation_prompt in (True, False):
        kwargs = {"tokenize": False, "add_generation_prompt": generation_prompt}
        assert ours.apply_chat_template(CHAT, **kwargs) == auto.apply_chat_template(CHAT, **kwargs)


@pytest.mark.parametrize("preset", TINY_PRESETS)
def test_each_preset_tokenizes_as_autotokenizer(tiny_dir, preset):
    path = tiny_dir(preset)
    ours, auto = load_tokenizer(path), AutoTokenizer.from_pretrained(path)
    plain = preset in ("tiny-llama", "tiny-mistral")  # Qwen's class is Qwen2Tokenizer
    assert isinstance(ours, FastTokenizer) == plain
    if not plain:
        assert type(ours) is type(auto)
    assert_same(ours, auto)


def edited(tmp_path, tiny_dir, tokenizer_config=None, tokenizer_json=None):
    """tiny-llama with its tokenizer files changed by the given functions."""
    path = tmp_path / "edited"
    shutil.copytree(tiny_dir("tiny-llama"), path)
    for name, edit in (
        ("tokenizer_config.json", tokenizer_config),
        ("tokenizer.json", tokenizer_json),
    ):
        if edit is not None:
            data = json.loads((path / name).read_text())
            edit(data)
            (path / name).write_text(json.dumps(data))
    return path


def _add_bos_eos(config):
    config.update(add_bos_token=True, add_eos_token=True)


def _new_special(config):
    config["additional_special_tokens"] = [
        "<|tool|>"
    ]  # not in tokenizer.json: transformers adds it


def _truncation(tokenizer_json):
    tokenizer_json["truncation"] = {
        "direction": "Right",
        "max_length": 4,
        "strategy": "LongestFirst",
        "stride": 0,
    }


def _eos_unmarked(tokenizer_json):
    _unmark(tokenizer_json, "</s>")


def _user_unmarked(tokenizer_json):
    _unmark(tokenizer_json, "<|user|>")


def _unmark(tokenizer_json, content):
    for token in tokenizer_json["added_tokens"]:
        if token["content"] == content:
            token["special"] = False


def _extra_known(config):
    config["additional_special_tokens"] = ["<|user|>", "<|assistant|>"]


@pytest.mark.parametrize(
    "config_edit, json_edit, plain",
    [
        (_add_bos_eos, None, False),
        (_new_special, None, False),
        (None, _truncation, False),
        (None, _eos_unmarked, False),
        (None, _user_unmarked, True),  # not a special token the config names: nothing changes
        (_extra_known, None, True),
    ],
    ids=[
        "add-bos-eos",
        "special-not-in-vocab",
        "truncation",
        "eos-unmarked",
        "user-unmarked",
        "extra-known",
    ],
)
def test_files_transformers_would_change_go_through_autotokenizer(
    tmp_path, tiny_dir, config_edit, json_edit, plain
):
    path = edited(tmp_path, tiny_dir, config_edit, json_edit)
    ours, auto = load_tokenizer(path), AutoTokenizer.from_pretrained(path)
    assert isinstance(ours, FastTokenizer) == plain
    assert_same(ours, auto)


def test_no_tokenizer_files_give_none(tmp_path):
    assert load_tokenizer(tmp_path) is None


def test_the_plain_tokenizer_loads_without_transformers_until_a_chat_template(tiny_dir):
    code = f"""
import sys
from llmkit.checkpoint.fast_tokenizer import load_tokenizer
tok = load_tokenizer({str(tiny_dir("tiny-llama"))!r})
assert tok.decode(tok.encode("hello there"), skip_special_tokens=True) == "hello there"
print("transformers" in sys.modules)
tok.apply_chat_template([{{"role": "user", "content": "hi"}}], tokenize=False)
print("transformers" in sys.modules)
"""
    result = run_python(code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["False", "True"]
