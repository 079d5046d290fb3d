"""Streaming detokenisation and stop strings for one request.

Text is released only when it is final: a multi-byte character split across tokens decodes to
U+FFFD until its last byte arrives, so text ending in U+FFFD is held back (the approach of TGI's
and vLLM's incremental detokenizers); text that could be the start of a stop string is held back
until it cannot. This module knows nothing about models or sockets.
"""

from __future__ import annotations

REPLACEMENT_CHAR = "\ufffd"


class TextStream:
    def __init__(self, tokenizer, prompt_ids: list[int], stop: list[str]):
        self.tokenizer, self.stop = tokenizer, stop
        # Decode with a little of the prompt in front, so the first token's leading space or
        # merge is right; everything before `prefix_len` is never emitted.
        self.ids = list(prompt_ids[-4:])
        self.prefix_len = len(self.ids)
        self.prefix_text = self._decode(self.ids)
        self.emitted = 0            # characters of the generated text already sent
        self.stopped = False

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def push(self, token_ids: list[int], final: bool = False) -> str:
        """Add tokens; return the new text that is safe to send. After a stop string, nothing
        more is returned and `stopped` is True. `final`: flush what was held back."""
        if self.stopped:
            return ""
        self.ids.extend(token_ids)
        full = self._decode(self.ids)
        text = full[len(self.prefix_text):] if full.startswith(self.prefix_text) else \
            self._decode(self.ids[self.prefix_len:])
        for stop in self.stop:
            at = text.find(stop, max(0, self.emitted - len(stop) + 1))
            if at != -1:
                self.stopped = True
                text = text[:at]
                break
        if not final and not self.stopped:
            if text.endswith(REPLACEMENT_CHAR):
                text = text.rstrip(REPLACEMENT_CHAR)
            text = text[:len(text) - self._held_for_stop(text)]
        new = text[self.emitted:]
        self.emitted = max(self.emitted, len(text))
        return new

    def _held_for_stop(self, text: str) -> int:
        """Length of the longest suffix of `text` that is a proper prefix of a stop string."""
        held = 0
        for stop in self.stop:
            for size in range(min(len(stop) - 1, len(text)), held, -1):
                if text.endswith(stop[:size]):
                    held = size
                    break
        return held
