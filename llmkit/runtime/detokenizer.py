"""Incremental detokenization and stop strings (pure Python; any tokenizer with `decode`).

Text is decoded over a short window of recent tokens: byte-level tokenizers can split one
character over several tokens, so new text is only released once it decodes cleanly."""

from __future__ import annotations


class Detokenizer:
    def __init__(
        self,
        tokenizer,
        prompt_token_ids: list[int],
        stop: tuple[str, ...] = (),
        skip_special_tokens: bool = True,
    ):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids = list(prompt_token_ids[-6:])  # a little context for the first tokens
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        self.text = ""
        self.stop = stop
        self.taken = 0  # generated tokens added so far

    def add_up_to(self, output_token_ids: list[int], end: int) -> bool:
        """Add the generated tokens `output_token_ids[taken:end]` (a sequence's, as it grows);
        True at a stop string, after which none is added."""
        for token_id in output_token_ids[self.taken : end]:
            self.taken += 1
            if self.add(token_id):
                return True
        return False

    def add(self, token_id: int) -> bool:
        """Append a generated token; True when the text now contains a stop string (the
        text is then cut before it)."""
        self.ids.append(token_id)
        skip = self.skip_special_tokens
        decode = self.tokenizer.decode
        before = decode(self.ids[self.prefix_offset : self.read_offset], skip_special_tokens=skip)
        after = decode(self.ids[self.prefix_offset :], skip_special_tokens=skip)
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return False  # an incomplete character: wait for the next token
        new = after[len(before) :]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        start = max(0, len(self.text) - max((len(s) for s in self.stop), default=0))
        self.text += new
        return self._cut_at_stop(start)

    def _cut_at_stop(self, start: int) -> bool:
        hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
        if not hits:
            return False
        self.text = self.text[: min(hits)]
        return True
