"""Train a byte-level BPE tokenizer offline and write it in the files transformers reads."""

from __future__ import annotations

import json
from pathlib import Path

from llmkit.checkpoint import corpus

# `<|endoftext|>` separates documents; Qwen2's tokenizer class also expects to find it.
SPECIAL_TOKENS = [
    "<pad>",
    "<s>",
    "</s>",
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
    "<|endoftext|>",
]
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
# Role markers are single special tokens; each turn ends with the EOS token. Tools are listed
# in a first system turn and calls written as Hermes and Qwen write them (<tool_call>{...}).
CHAT_TEMPLATE = (
    '{% if tools %}<|system|>\nTo call a function, write <tool_call>{"name": NAME, '
    '"arguments": ARGUMENTS}</tool_call>. The functions and their arguments:\n'
    "{% for tool in tools %}{{ tool['function']['name'] }}: "
    "{{ tool['function']['parameters'] | tojson }}\n{% endfor %}</s>\n{% endif %}"
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] or '' }}"
    "{% for call in message['tool_calls'] or [] %}<tool_call>{{ {'name': call['function']"
    "['name'], 'arguments': call['function']['arguments']} | tojson }}</tool_call>{% endfor %}"
    "</s>\n{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def train_bpe(vocab_size: int, num_paragraphs: int = 4000) -> object:
    """A byte-level BPE (`tokenizers.Tokenizer`) trained on the built-in corpus; adds BOS."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # Invented words give BPE enough distinct strings to fill large vocabularies.
    words = corpus.made_up_words(vocab_size)
    lines = corpus.paragraphs(num_paragraphs) + [
        " ".join(words[i : i + 16]) for i in range(0, len(words), 16)
    ]
    tok.train_from_iterator(lines, trainer)
    tok.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", BOS_ID)]
            ),
        ]
    )
    return tok


def write_tokenizer(directory: Path, vocab_size: int, max_length: int) -> int:
    """Write tokenizer.json and tokenizer_config.json; returns the trained vocabulary size."""
    tok = train_bpe(vocab_size)
    tok.save(str(directory / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "pad_token": "<pad>",
        "model_max_length": max_length,
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return tok.get_vocab_size()
