"""A checkpoint's tokenizer, loaded without importing transformers where that is exact.

Importing transformers is most of a server's start-up on a small model. When a
checkpoint's tokenizer is one that AutoTokenizer would build as the plain fast tokenizer
straight from tokenizer.json, with nothing in tokenizer_config.json that changes it (Llama,
Mistral and llmkit's presets), `FastTokenizer` serves the calls llmkit makes (encode, decode,
special ids, length) through the `tokenizers` library itself, which is what transformers calls
underneath. Chat templates are rendered by transformers' own tokenizer, built on the first
chat call. Every other tokenizer comes from AutoTokenizer.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

# Model types whose tokenizer AutoTokenizer builds as the plain fast tokenizer when the
# checkpoint names that class (Llama 3 and llmkit's presets do; Qwen's become Qwen2Tokenizer).
_PLAIN_FAST_MODEL_TYPES = ("llama", "mistral")
_PLAIN_FAST_CLASSES = ("PreTrainedTokenizerFast", "TokenizersBackend")
# The named special tokens, in the order transformers lists them in `all_special_ids`.
_SPECIAL_NAMES = (
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
)
# tokenizer_config.json keys that make transformers rebuild or patch the backend tokenizer.
_CHANGES_BACKEND = ("add_bos_token", "add_eos_token", "split_special_tokens", "auto_map")
# Beyond this vocabulary size transformers may patch a Mistral tokenizer's pre-tokenizer.
_MISTRAL_PATCH_VOCAB = 100_000


def encode_prompt(tokenizer, text: str, add_special_tokens: bool = True) -> list[int]:
    """A prompt's ids: `text` with the tokenizer's BOS and the like, but no second BOS when
    the text itself starts with BOS (as clients that write it, like lm-evaluation-harness,
    mean it)."""
    ids = tokenizer.encode(text, add_special_tokens=add_special_tokens)
    bos = getattr(tokenizer, "bos_token_id", None)
    if add_special_tokens and bos is not None and ids[:2] == [bos, bos]:
        return ids[1:]
    return ids


def load_tokenizer(path: str | Path):
    """The tokenizer in `path`, or None when it has no tokenizer files."""
    directory = Path(path).expanduser()
    if not any((directory / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
        return None
    config = _read_json(directory / "tokenizer_config.json")
    model_type = _read_json(directory / "config.json").get("model_type")
    if (directory / "tokenizer.json").is_file() and _plain_fast_config(config, model_type):
        from tokenizers import Tokenizer

        backend = Tokenizer.from_file(str(directory / "tokenizer.json"))
        if _backend_as_is(backend, model_type) and _specials_present(backend, config):
            return FastTokenizer(directory, backend, config)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(directory)


class FastTokenizer:
    """transformers' plain fast tokenizer for one checkpoint, through `tokenizers` alone."""

    def __init__(self, directory: Path, backend, config: dict):
        self.directory = directory
        self.backend = backend  # without truncation or padding (`_backend_as_is`)
        self.all_special_tokens = _special_tokens(config)
        self.all_special_ids = [backend.token_to_id(t) for t in self.all_special_tokens]
        for name in _SPECIAL_NAMES:
            token = config.get(name)
            setattr(self, name, token)
            setattr(self, f"{name}_id", None if token is None else backend.token_to_id(token))
        self._transformers = None
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def get_vocab(self) -> dict[str, int]:
        return self.backend.get_vocab(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        ids = [ids] if isinstance(ids, int) else list(ids)
        return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)

    def convert_ids_to_tokens(self, ids):
        if isinstance(ids, int):
            return self.backend.id_to_token(ids)
        return [self.backend.id_to_token(i) for i in ids]

    @property
    def chat_template(self) -> str | list | None:
        """The checkpoint's chat template, as transformers reads it (or None)."""
        jinja = self.directory / "chat_template.jinja"
        if jinja.is_file():
            return jinja.read_text()
        return _read_json(self.directory / "tokenizer_config.json").get("chat_template")

    def apply_chat_template(self, conversation, **kwargs):
        """transformers' `apply_chat_template`, on its own tokenizer for these files."""
        return self.transformers().apply_chat_template(conversation, **kwargs)

    def transformers(self):
        """The tokenizer AutoTokenizer builds from these files (loaded once, on first use)."""
        with self._lock:
            if self._transformers is None:
                from transformers import PreTrainedTokenizerFast

                self._transformers = PreTrainedTokenizerFast.from_pretrained(self.directory)
            return self._transformers


def _plain_fast_config(config: dict, model_type: str | None) -> bool:
    """The checkpoint names the plain fast tokenizer, for a model type AutoTokenizer builds it
    for, with no setting that makes transformers rebuild or patch it."""
    return (
        config.get("tokenizer_class") in _PLAIN_FAST_CLASSES
        and model_type in _PLAIN_FAST_MODEL_TYPES
        and not any(key in config for key in _CHANGES_BACKEND)
        and not isinstance(config.get("extra_special_tokens"), dict)  # named model-specific ones
        and (config.get("clean_up_tokenization_spaces") is False or _transformers_major() >= 5)
    )


def _transformers_major() -> int:
    """transformers' major version, read without importing it (5 and later never clean up
    BPE output, whatever `clean_up_tokenization_spaces` says)."""
    from importlib.metadata import version

    return int(version("transformers").split(".")[0])


def _backend_as_is(backend, model_type: str | None) -> bool:
    """No settings transformers would override or patch: truncation, padding, a missing
    post-processor, clean-up of non-BPE output, the Mistral pre-tokenizer fix."""
    large_mistral = (
        model_type == "mistral"
        and backend.get_vocab_size(with_added_tokens=False) > _MISTRAL_PATCH_VOCAB
    )
    return (
        backend.truncation is None
        and backend.padding is None
        and backend.post_processor is not None
        and type(backend.model).__name__ == "BPE"
        and not large_mistral
    )


def _specials_present(backend, config: dict) -> bool:
    """Every special token the config names is already a special added token of
    tokenizer.json, with the same settings (transformers would add or update it otherwise)."""
    added = {t.content: (i, t) for i, t in backend.get_added_tokens_decoder().items()}
    for token in _named_specials(config):
        if not isinstance(token, str) or token not in added or not added[token][1].special:
            return False
    for token_id, entry in (config.get("added_tokens_decoder") or {}).items():
        same = added.get(entry.get("content"))
        if same is None or int(token_id) != same[0]:
            return False
        if any(entry.get(k) != getattr(same[1], k, None) for k in entry if k != "__type"):
            return False
    return True


def _special_tokens(config: dict) -> list[str]:
    """The config's special tokens without repeats, in transformers' order (all strings:
    `_specials_present` has checked)."""
    return list(dict.fromkeys(_named_specials(config)))


def _named_specials(config: dict) -> list:
    """The named special tokens (bos, eos, ...), then the extra ones, as the config has them."""
    named = [config[n] for n in _SPECIAL_NAMES if config.get(n) is not None]
    extra = config.get("extra_special_tokens", config.get("additional_special_tokens")) or []
    return named + list(extra)


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}
