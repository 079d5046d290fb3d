"""A GenerateRequest checked field by field and turned into a RequestPlan (`plan_request`), for
every transport (gRPC, and the OpenAI-compatible API through the same GenerateRequest): a bad field
is an InvalidRequest naming it (INVALID_ARGUMENT / 400), before any work is queued.
"""

from __future__ import annotations

import math
import secrets
import uuid
from dataclasses import dataclass

import numpy as np

from specpipe.coordinator.policy import PolicyConfig
from specpipe.coordinator.scheduler import RequestPlan
from specpipe.coordinator.text import PromptEncoder, PromptTooLong
from specpipe.modes import Mode
from specpipe.proto.specpipe.v1 import specpipe_pb2
from specpipe.sampling import SamplingParams

# Limits on the small fields: generous for real use, small enough that a request cannot make
# the coordinator do unbounded work.
MAX_REQUEST_ID_CHARS = 256
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 256
# The smallest temperature that samples: below it, logits / temperature overflows float32 for
# logits that real models produce and the distribution turns to NaN (seen with 1e-38). vLLM's
# sampling epsilon, rounded to float32 as the field arrives (so that 1e-5 itself passes); 0 is greedy.
MIN_TEMPERATURE = float(np.float32(1e-5))


class InvalidRequest(ValueError):
    """A request field is wrong; the message names it."""


@dataclass(frozen=True)
class ServingLimits:
    vocab_size: int
    context_length: int
    max_new_tokens_cap: int
    default_mode: str
    policy: PolicyConfig


async def plan_request(
    request: specpipe_pb2.GenerateRequest, limits: ServingLimits, encoder: PromptEncoder
) -> tuple[RequestPlan, list[str]]:
    """Validate a request against the server's `limits` (cheap checks first: a prompt is bounded
    before `encoder` tokenises it): its RequestPlan and its stop strings, or InvalidRequest naming
    the field."""
    if len(request.request_id) > MAX_REQUEST_ID_CHARS:
        raise InvalidRequest(f"request_id is longer than {MAX_REQUEST_ID_CHARS} characters")
    if bool(request.prompt) == bool(request.prompt_ids):
        raise InvalidRequest("exactly one of prompt / prompt_ids must be set")
    if len(request.prompt_ids) > limits.context_length:
        raise InvalidRequest(
            f"prompt_ids has {len(request.prompt_ids)} tokens: more than the model context of {limits.context_length}"
        )
    if request.prompt:
        try:
            prompt_ids = await encoder.encode(request.prompt)
        except PromptTooLong as err:
            raise InvalidRequest(str(err)) from None
        if not prompt_ids:
            raise InvalidRequest("prompt tokenizes to no tokens")
    else:
        prompt_ids = list(request.prompt_ids)
        for index, token_id in enumerate(prompt_ids):
            if not 0 <= token_id < limits.vocab_size:
                raise InvalidRequest(
                    f"prompt_ids[{index}] = {token_id} is outside the vocabulary [0, {limits.vocab_size})"
                )
    if request.max_new_tokens == 0:
        raise InvalidRequest("max_new_tokens is required and must be >= 1")
    if request.max_new_tokens > limits.max_new_tokens_cap:
        raise InvalidRequest(
            f"max_new_tokens = {request.max_new_tokens} exceeds the server's cap of {limits.max_new_tokens_cap}"
        )
    if len(prompt_ids) + request.max_new_tokens > limits.context_length:
        raise InvalidRequest(
            f"prompt ({len(prompt_ids)} tokens) plus max_new_tokens "
            f"({request.max_new_tokens}) exceeds the model context of "
            f"{limits.context_length} tokens"
        )
    if not math.isfinite(request.temperature) or request.temperature < 0:
        raise InvalidRequest(f"temperature must be a finite number >= 0, got {request.temperature}")
    if 0 < request.temperature < MIN_TEMPERATURE:
        raise InvalidRequest(
            f"temperature must be 0 (greedy) or at least {MIN_TEMPERATURE:g}, got {request.temperature:g}"
        )
    if not math.isfinite(request.top_p) or not 0 <= request.top_p <= 1:
        raise InvalidRequest(f"top_p must be in [0, 1], got {request.top_p}")
    if len(request.stop) > MAX_STOP_STRINGS:
        raise InvalidRequest(f"stop has {len(request.stop)} strings, at most {MAX_STOP_STRINGS} allowed")
    for index, stop in enumerate(request.stop):
        if not stop or len(stop) > MAX_STOP_CHARS:
            raise InvalidRequest(f"stop[{index}] must be 1 to {MAX_STOP_CHARS} characters")
    try:
        mode = Mode.from_proto(request.mode) or Mode(limits.default_mode)
    except ValueError:
        raise InvalidRequest(f"mode = {request.mode} is not a known Mode") from None
    top_p = request.top_p if 0 < request.top_p < 1 else 1.0
    plan = RequestPlan(
        request_id=request.request_id or uuid.uuid4().hex,
        prompt_ids=prompt_ids,
        max_new_tokens=request.max_new_tokens,
        sampling=SamplingParams(
            temperature=request.temperature,
            top_k=request.top_k,
            top_p=top_p,
            drafter_invariant=request.drafter_invariant,
        ),
        seed=request.seed if request.HasField("seed") else secrets.randbits(63),
        mode=mode,
        policy=limits.policy,
        seeded=request.HasField("seed"),
        noise_vocab=limits.vocab_size,
    )
    return plan, list(request.stop)
