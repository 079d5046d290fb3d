"""Streaming detokenisation and stop strings for one request.

Text is released only when it is final: a multi-byte character split across tokens decodes to
U+FFFD until its last byte arrives, so text ending in U+FFFD is held back (the approach of TGI's
and vLLM's incremental detokenizers); text that could be the start of a stop string is held back
until it cannot. This module knows nothing about models or sockets.
"""

from __future__ import annotations

REPLACEMENT_CHAR = "\ufffd"


class TextStream:
    """Incremental: each push decodes only a short window (the tokens since the last released
    text, with the few before them for context: TGI's and vLLM's prefix/read offsets), so a long
    generation costs O(tokens) in all, not O(tokens^2)."""

    def __init__(self, tokenizer, prompt_ids: list[int], stop: list[str]):
        self.tokenizer, self.stop = tokenizer, stop
        # Decode with a little of the prompt in front, so the first token's leading space or
        # merge is right; nothing of the prompt is ever emitted.
        self.ids = list(prompt_ids[-4:])
        self.prefix_offset = 0               # window start: context only, already turned into text
        self.read_offset = len(self.ids)     # tokens before this are in `text`
        self.text = ""              # the generated text decoded so far (whole characters)
        self.emitted = 0            # characters of it already sent
        self.stopped = False

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def _advance(self, final: bool) -> None:
        """Move the whole characters among the unread tokens into `text`."""
        if self.read_offset == len(self.ids):
            return
        prefix = self._decode(self.ids[self.prefix_offset:self.read_offset])
        window = self._decode(self.ids[self.prefix_offset:])
        if window.endswith(REPLACEMENT_CHAR) and not final:
            return                  # a character's last byte is still to come: wait for it
        if not window.startswith(prefix):   # (a tokenizer whose context changed the prefix)
            window = prefix + self._decode(self.ids[self.read_offset:])
        self.text += window[len(prefix):]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)

    def push(self, token_ids: list[int], final: bool = False) -> str:
        """Add tokens; return the new text that is safe to send. After a stop string, nothing
        more is returned and `stopped` is True. `final`: flush what was held back."""
        if self.stopped:
            return ""
        self.ids.extend(token_ids)
        self._advance(final)
        text = self.text
        for stop in self.stop:
            at = text.find(stop, max(0, self.emitted - len(stop) + 1))
            if at != -1:
                self.stopped = True
                text = text[:at]
                break
        if not final and not self.stopped:
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
