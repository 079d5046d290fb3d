"""Decoding helpers of the tools, written once: a model's continuation with a KV cache, and the
accepted runs of greedy speculative decoding along it.

`continue_tokens` decodes greedily (or samples at a temperature from a given generator) and can
keep the target's last hidden state of every step (the acceptance-length predictor's input).
`accepted_runs` turns a draft/target agreement mask into the number of draft tokens a block
starting at each position would get accepted. Both are exact references for offline measuring
and training; the serving path has its own batched engines and uses neither.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


@torch.inference_mode()
def continue_tokens(
    model,
    input_ids: torch.Tensor,
    num_new_tokens: int,
    generator=None,
    keep_hidden: bool = False,
    temperature: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Greedy decoding with a KV cache (sampling at `temperature` from `generator` when given).
    input_ids: [batch, prompt_len] (no padding). Returns (tokens [batch, prompt_len +
    num_new_tokens], hidden): with keep_hidden, hidden [batch, num_new_tokens, hidden_size] is
    the last-layer hidden state that chose each new token (hidden[:, i] chose tokens[:,
    prompt_len + i]); else None."""
    from transformers import DynamicCache

    def choose(logits):  # [batch, vocab] -> [batch, 1]
        if generator is None:
            return logits.argmax(-1, keepdim=True)
        return torch.multinomial(torch.softmax(logits.float() / temperature, -1), 1, generator=generator)

    # Only the last row's logits are needed; the demo build's recipe (keep_hidden=False) computes
    # them all, as it always did, so that a rebuild stays bit-for-bit.
    extra = {"output_hidden_states": True, "logits_to_keep": 1} if keep_hidden else {}
    cache = DynamicCache(config=model.config)
    out = model(input_ids=input_ids, cache=cache, use_cache=True, **extra)
    tokens, hidden = [input_ids], []
    for step in range(num_new_tokens):
        if keep_hidden:
            hidden.append(out.hidden_states[-1][:, -1])
        tokens.append(choose(out.logits[:, -1]))
        if step + 1 < num_new_tokens:
            out = model(input_ids=tokens[-1], cache=cache, use_cache=True, **extra)
    return torch.cat(tokens, dim=1), torch.stack(hidden, dim=1) if keep_hidden else None


def accepted_runs(agree: torch.Tensor, max_len: int) -> torch.Tensor:
    """agree [batch, T] bool (draft token at p equals the target's) -> [batch, T]: at s, the
    number of consecutive True from agree[s] on, capped at max_len and at the row's end. That is
    the accepted length of a greedy block of max_len draft tokens judged from position s on (a
    run shorter than max_len ends at a rejection, or at the end of the row)."""
    assert agree.dim() == 2 and max_len >= 1, "agree is [batch, T]; max_len >= 1"
    padded = F.pad(agree.long(), (0, max_len - 1))  # past the end: never agrees
    windows = padded.unfold(1, max_len, 1)  # [batch, T, max_len]
    return windows.cumprod(-1).sum(-1)
