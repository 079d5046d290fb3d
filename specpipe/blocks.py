"""The rule for a block that starts behind the committed end, shared by the target (which verifies
what is left of it) and the coordinator (which knows which of its blocks will be answered stale).

After a rejection no prepared block foresaw, the target may decode by itself while the draft
redrafts (worker.proto, Decode.until_block). The block the draft then sends starts where the
committed tokens ended when it was cut, behind the target's end by the tokens decoded meanwhile. Its
first tokens are then either the decoded ones (the draft guessed them: only the rest is left to
verify) or not (the block drafted a sequence that is not the target's: it is stale). Pure: tokens
in, tokens out.
"""

from __future__ import annotations

from collections.abc import Sequence


def left_to_verify(start: int, draft: Sequence[int], committed: Sequence[int]) -> list[int] | None:
    """The draft tokens of a block extending `committed[:start]` that are still to verify given
    the `committed` tokens: all of them when it starts at the committed end (or past it: the
    caller's concern); the rest when the tokens committed past `start` are the block's own first
    ones; None when they differ, or when nothing of the block is left (the block is stale)."""
    covered = len(committed) - start
    if covered <= 0:
        return list(draft)
    if covered >= len(draft) or list(draft[:covered]) != list(committed[start:]):
        return None
    return list(draft[covered:])
