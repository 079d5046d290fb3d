"""Text in and out of the coordinator: bounded, off-loop tokenisation of prompts (`PromptEncoder`)
and streaming detokenisation with stop strings for one request (`TextStream`).

Prompts: nothing a request carries may stall the coordinator's event loop (it also reads the
workers' heartbeats). A prompt longer than any that could fit the model's context is refused
before it is tokenised, by a bound derived from the tokenizer (no token decodes to more than
`max_token_chars` characters, so a prompt of n characters has at least n / max_token_chars
tokens); a long prompt that may fit is tokenised on a thread of its own.

Text is released only when it is final: a multi-byte character split across tokens decodes to
U+FFFD until its last byte arrives, so text ending in U+FFFD is held back (the approach of TGI's
and vLLM's incremental detokenizers); text that could be the start of a stop string is held back
until it cannot. This module knows nothing about models or sockets.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

REPLACEMENT_CHAR = "\ufffd"
# Prompts up to this many characters are tokenised on the event loop (well under a millisecond);
# longer ones on the encoder's thread.
INLINE_TOKENIZE_CHARS = 4096
# Slack on the character bound: a normaliser may drop characters (control characters, accents),
# so a prompt is refused only when it could not fit even with half of it dropped.
PROMPT_CHARS_SLACK = 2


class PromptTooLong(ValueError):
    """The prompt cannot fit the model's context; the message names the field and the bound."""


class PromptEncoder:
    """Tokenises prompts for one tokenizer without blocking the event loop. One thread, so the
    tokenizer (not safe for concurrent calls that set truncation) is never used by two at once."""

    def __init__(self, tokenizer, context_length: int):
        self.tokenizer, self.context_length = tokenizer, context_length
        self.max_chars = context_length * max_token_chars(tokenizer) * PROMPT_CHARS_SLACK
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokenize")

    def check_length(self, text: str, field: str = "prompt") -> None:
        if len(text) > self.max_chars:
            raise PromptTooLong(
                f"{field} has {len(text)} characters: more than the {self.max_chars} that could "
                f"fit the model context of {self.context_length} tokens"
            )

    async def encode(self, text: str, field: str = "prompt", special_tokens: bool = True) -> list[int]:
        """`special_tokens`: let the tokenizer add its own (BOS, ...); False for text a chat
        template rendered, which already holds them."""
        self.check_length(text, field)
        if len(text) <= INLINE_TOKENIZE_CHARS:
            return self._encode(text, special_tokens)
        return await asyncio.get_running_loop().run_in_executor(self._thread, self._encode, text, special_tokens)

    def _encode(self, text: str, special_tokens: bool) -> list[int]:
        return self.tokenizer(text, add_special_tokens=special_tokens)["input_ids"]

    def close(self) -> None:
        self._thread.shutdown(wait=False, cancel_futures=True)


def max_token_chars(tokenizer) -> int:
    """An upper bound on the characters one token stands for: the longest token string in the
    vocabulary (byte-level BPE spells each byte as one character, so this bounds decoded characters
    too; SentencePiece spells characters). At least 1."""
    return max([1, *(len(token) for token in tokenizer.get_vocab())])


class TextStream:
    """Incremental: each push decodes only a short window (the tokens since the last released
    text, with the few before them for context: TGI's and vLLM's prefix/read offsets), so a long
    generation costs O(tokens) in all, not O(tokens^2)."""

    def __init__(self, tokenizer, prompt_ids: list[int], stop: list[str]):
        self.tokenizer, self.stop = tokenizer, stop
        # Decode with a little of the prompt in front, so the first token's leading space or
        # merge is right; nothing of the prompt is ever emitted.
        self.ids = list(prompt_ids[-4:])
        self.prefix_offset = 0  # window start: context only, already turned into text
        self.read_offset = len(self.ids)  # tokens before this are in `text`
        self.text = ""  # the generated text decoded so far (whole characters)
        self.emitted = 0  # characters of it already sent
        self.stopped = False

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def _advance(self, final: bool) -> None:
        """Move the whole characters among the unread tokens into `text`."""
        if self.read_offset == len(self.ids):
            return
        prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
        window = self._decode(self.ids[self.prefix_offset :])
        if window.endswith(REPLACEMENT_CHAR) and not final:
            return  # a character's last byte is still to come: wait for it
        if not window.startswith(prefix):  # (a tokenizer whose context changed the prefix)
            window = prefix + self._decode(self.ids[self.read_offset :])
        self.text += window[len(prefix) :]
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
            text = text[: len(text) - self._held_for_stop(text)]
        new = text[self.emitted :]
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
