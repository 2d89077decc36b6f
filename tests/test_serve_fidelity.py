"""What clients that count tokens themselves rely on: token texts read in context (they
concatenate to the text, offsets index it) for a byte-level BPE and a sentencepiece-style
tokenizer, echo alike for text and token-id prompts, `add_special_tokens`, /tokenize and
/detokenize, and --chat-template for a checkpoint without one."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from types import SimpleNamespace

import pytest

from llmkit.checkpoint import corpus
from llmkit.checkpoint.fast_tokenizer import FastTokenizer, encode_prompt, load_tokenizer
from llmkit.checkpoint.tokenizer import CHAT_TEMPLATE, SPECIAL_TOKENS
from llmkit.runtime.detokenizer import Detokenizer
from llmkit.serve.responses import TokenText
from tests.serve_helpers import start_server

openai = pytest.importorskip("openai")

TEXTS = ["Once upon a time, the king said", "  two  spaces and naïve café — 日本語", "a\nb\n\nc"]


def metaspace_checkpoint(src, out):
    """`src` with a sentencepiece-style tokenizer (Llama 2's layout: "▁" marks a word's
    space, dropped again at the start of decoded text), trained here, and no chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    shutil.copytree(src, out)
    vocab = json.loads((src / "config.json").read_text())["vocab_size"]
    tok = Tokenizer(models.BPE(unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    trainer = trainers.BpeTrainer(
        vocab_size=vocab, special_tokens=SPECIAL_TOKENS, show_progress=False
    )
    tok.train_from_iterator(corpus.paragraphs(400) + TEXTS, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    tok.save(str(out / "tokenizer.json"))
    config = json.loads((out / "tokenizer_config.json").read_text())
    del config["chat_template"]
    (out / "tokenizer_config.json").write_text(json.dumps(config))
    return out


@pytest.fixture(scope="module")
def sentencepiece(tiny_dir, tmp_path_factory):
    return metaspace_checkpoint(tiny_dir(), tmp_path_factory.mktemp("sp") / "ckpt")


@pytest.fixture(scope="module", params=["byte-level", "sentencepiece"])
def tokenizer(request, tiny_dir, sentencepiece):
    path = tiny_dir() if request.param == "byte-level" else sentencepiece
    tok = load_tokenizer(path)
    assert isinstance(tok, FastTokenizer)  # the path the server takes
    return tok


def test_token_texts_concatenate_to_the_text(tokenizer):
    names = TokenText(tokenizer)
    for text in TEXTS:
        ids = tokenizer.encode(text)
        pieces, _ = names.pieces([], ids)
        assert pieces[0] == "" and ids[0] == 1  # BOS reads as nothing
        assert "".join(pieces) == tokenizer.decode(ids, skip_special_tokens=True)


def test_text_that_starts_with_bos_gets_no_second_one(tokenizer):
    bos = tokenizer.bos_token_id
    written = encode_prompt(tokenizer, tokenizer.bos_token + "Once upon")
    assert written[0] == bos != written[1]
    assert encode_prompt(tokenizer, "Once upon") == tokenizer.encode("Once upon")
    assert encode_prompt(tokenizer, "Once upon", add_special_tokens=False)[0] != bos


def test_generated_token_texts_are_the_engines_text(tokenizer):
    """Read after a prompt, the tokens' texts join to what the engine's detokenizer makes of
    them (an independent incremental decoder), whichever tokens follow which."""
    import random

    names = TokenText(tokenizer)
    rng = random.Random(0)
    prompt = tokenizer.encode(TEXTS[0])
    for _ in range(20):
        generated = [rng.randrange(3, len(tokenizer)) for _ in range(12)]
        detok = Detokenizer(tokenizer, prompt)
        for token_id in generated:
            detok.add(token_id)
        pieces, others = names.pieces(prompt, generated, [[t] for t in generated])
        assert others == [[p] for p in pieces]  # an alternative reads as the token would
        assert "".join(pieces) == detok.text


def test_a_sentencepiece_word_keeps_its_space(sentencepiece):
    tok = load_tokenizer(sentencepiece)
    ids = tok.encode("Once upon a time, the king said")
    words = [i for i in range(2, len(ids)) if tok.convert_ids_to_tokens(ids[i]).startswith("▁")]
    assert words
    names = TokenText(tok)
    for i in words:
        word = tok.convert_ids_to_tokens(ids[i])[1:]
        assert tok.decode(ids[i : i + 1]) == word  # alone, the decoder drops the space
        assert names.pieces(ids[:i], ids[i : i + 1])[0] == [" " + word]


@pytest.fixture(scope="module")
def server(sentencepiece, tmp_path_factory):
    srv = start_server(
        sentencepiece, tmp_path_factory.mktemp("serve"), "--chat-template", CHAT_TEMPLATE
    )
    yield srv
    assert srv.stop() == 0


@pytest.fixture(scope="module")
def client(server):
    return server.client()


def _check_offsets(lp, text: str) -> None:
    assert "".join(lp.tokens) == text
    for token, offset in zip(lp.tokens, lp.text_offset, strict=True):
        assert text[offset : offset + len(token)] == token


def test_echoed_tokens_concatenate_to_the_text_and_offsets_index_it(client, sentencepiece):
    tok = load_tokenizer(sentencepiece)
    prompt = "Once upon a time, the king said"
    args = {"model": "ckpt", "max_tokens": 6, "temperature": 0, "logprobs": 3, "echo": True}
    by_text = client.completions.create(prompt=prompt, **args).choices[0]
    assert by_text.text.startswith(prompt)
    _check_offsets(by_text.logprobs, by_text.text)
    lp = by_text.logprobs
    for i in range(len(lp.tokens) - 6, len(lp.tokens)):  # greedy: its token is the likeliest
        assert lp.top_logprobs[i][lp.tokens[i]] == pytest.approx(lp.token_logprobs[i])
    by_ids = client.completions.create(prompt=tok.encode(prompt), **args).choices[0]
    assert by_ids.text == by_text.text  # no "<s>" in front of an echoed token-id prompt
    assert by_ids.logprobs.tokens == by_text.logprobs.tokens
    assert by_ids.logprobs.text_offset == by_text.logprobs.text_offset
    streamed = client.completions.create(prompt=prompt, stream=True, **args)
    tokens, offsets, text = [], [], ""
    for chunk in streamed:
        choice = chunk.choices[0]
        text += choice.text
        if choice.logprobs:
            tokens += choice.logprobs.tokens
            offsets += choice.logprobs.text_offset
    assert (text, tokens, offsets) == (
        by_text.text,
        by_text.logprobs.tokens,
        by_text.logprobs.text_offset,
    )


def test_generated_offsets_without_echo_index_the_completion(client):
    out = client.completions.create(
        model="ckpt", prompt="The king", max_tokens=8, temperature=0, logprobs=1
    ).choices[0]
    _check_offsets(out.logprobs, out.text)


def test_add_special_tokens_false_sends_the_text_alone(client, sentencepiece):
    tok = load_tokenizer(sentencepiece)
    prompt = "Once upon a time"
    common = {"model": "ckpt", "max_tokens": 1, "temperature": 0}
    with_bos = client.completions.create(prompt=prompt, **common)
    alone = client.completions.create(
        prompt=prompt, extra_body={"add_special_tokens": False}, **common
    )
    assert with_bos.usage.prompt_tokens == len(tok.encode(prompt))
    assert alone.usage.prompt_tokens == len(tok.encode(prompt, add_special_tokens=False))
    assert alone.usage.prompt_tokens == with_bos.usage.prompt_tokens - 1


def test_chat_template_given_on_the_command_line(client, sentencepiece):
    tok = load_tokenizer(sentencepiece)
    messages = [{"role": "user", "content": "hello there"}]
    out = client.chat.completions.create(
        model="ckpt", messages=messages, max_tokens=3, temperature=0, logprobs=True
    )
    rendered = "<|user|>\nhello there</s>\n<|assistant|>\n"
    assert out.usage.prompt_tokens == len(tok.encode(rendered, add_special_tokens=False))
    content = out.choices[0].logprobs.content
    assert "".join(t.token for t in content) == out.choices[0].message.content
    assert all(bytes(t.bytes).decode() == t.token for t in content)


def test_tokenize_and_detokenize(server, sentencepiece):
    tok = load_tokenizer(sentencepiece)
    status, _, body = server.request("POST", "/tokenize", {"prompt": "Once upon a time"})
    assert status == 200 and body["tokens"] == tok.encode("Once upon a time")
    assert body["count"] == len(body["tokens"]) and body["token_strs"] is None
    _, _, names = server.request(
        "POST", "/tokenize", {"prompt": "Once upon", "add_special_tokens": False,
                              "return_token_strs": True}
    )  # fmt: skip
    assert names["token_strs"] == tok.convert_ids_to_tokens(names["tokens"])
    assert names["token_strs"][0].startswith("▁")
    _, _, chat = server.request(
        "POST", "/tokenize", {"messages": [{"role": "user", "content": "hi"}]}
    )
    assert chat["tokens"] == tok.encode("<|user|>\nhi</s>\n<|assistant|>\n", False)
    status, _, text = server.request("POST", "/detokenize", {"tokens": body["tokens"]})
    assert status == 200 and text == {"prompt": tok.decode(body["tokens"])}
    for path, bad, param in [
        ("/tokenize", {"prompt": "x", "messages": [{"role": "user", "content": "x"}]}, "prompt"),
        ("/tokenize", {"prompt": 5}, "prompt"),
        ("/detokenize", {"tokens": [10**6]}, "tokens"),
        ("/detokenize", {"tokens": [-1]}, "tokens"),
        ("/detokenize", {"tokens": "abc"}, "tokens"),
    ]:
        status, _, error = server.request("POST", path, bad)
        assert status == 400 and error["error"]["param"] == param, (path, bad, error)


@pytest.mark.parametrize(
    ("value", "message"),
    [("no-such-template.jinja", "is no file and no Jinja template"),
     ("{% if %}", "--chat-template: line 1:")],
)  # fmt: skip
def test_a_bad_chat_template_is_one_line_before_anything_starts(tiny_dir, value, message):
    result = subprocess.run(
        [sys.executable, "-m", "llmkit", "serve", str(tiny_dir()), "--chat-template", value],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1 and message in result.stderr
    assert result.stderr.strip().count("\n") == 0, result.stderr


def test_a_tokenizer_transformers_builds_serves(sentencepiece, tmp_path):
    """A tokenizer llmkit does not run through `tokenizers` alone (here: a setting that makes
    transformers patch it) is loaded through AutoTokenizer, and the server starts with it."""
    model = tmp_path / "ckpt"
    shutil.copytree(sentencepiece, model)
    config_path = model / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "add_bos_token": True}))
    assert not isinstance(load_tokenizer(model), FastTokenizer)
    (tmp_path / "serve").mkdir()
    srv = start_server(model, tmp_path / "serve")
    try:
        body = {"prompt": "Once upon a time", "max_tokens": 2, "logprobs": 1, "echo": True}
        status, _, answer = srv.request("POST", "/v1/completions", body)
        assert status == 200, answer
        _check_offsets(
            SimpleNamespace(**answer["choices"][0]["logprobs"]), answer["choices"][0]["text"]
        )
    finally:
        assert srv.stop() == 0


def test_a_prompt_that_starts_with_bos_gets_no_second_one(server, sentencepiece):
    """As lm-evaluation-harness sends text prompts: BOS written into the text."""
    tok = load_tokenizer(sentencepiece)
    _, _, plain = server.request("POST", "/tokenize", {"prompt": "Once upon"})
    _, _, written = server.request("POST", "/tokenize", {"prompt": tok.bos_token + "Once upon"})
    assert plain["tokens"][0] == tok.bos_token_id
    assert written["tokens"][0] == tok.bos_token_id != written["tokens"][1]
    body = {"prompt": tok.bos_token + "Once upon", "max_tokens": 1, "echo": True, "logprobs": 0}
    _, _, answer = server.request("POST", "/v1/completions", body)
    assert answer["usage"]["prompt_tokens"] == len(written["tokens"])
