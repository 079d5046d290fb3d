"""Property test against one live server: whatever a client sends, the call ends cleanly.

Method: hypothesis builds GenerateRequest protos directly (so that anything the wire allows is
possible: unknown enum values, negative and huge token ids, NaN, infinities and subnormals in the
floats, 0 and 2^32 - 1 in the counts, empty, long and unicode strings, both or neither of prompt /
prompt_ids) and sends each with a per-call deadline. Every call must end with a well-formed stream
(finish_reason on the last message only) or with INVALID_ARGUMENT / RESOURCE_EXHAUSTED and a
message; never INTERNAL or UNKNOWN, never the deadline (a hang). Afterwards the server still
serves, and nothing is left on the workers.
"""

from __future__ import annotations

import os

import grpc
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from specpipe import Client
from specpipe.proto.specpipe.v1 import specpipe_pb2

from checks import wait_idle

# The tiny tokenizer's vocabulary is ~300 ids; ids around it probe the bound.
VOCAB_PROBE = 320
CALL_TIMEOUT_S = 30.0
UINT32_MAX, INT32_MIN, INT32_MAX, UINT64_MAX = 2**32 - 1, -(2**31), 2**31 - 1, 2**64 - 1


def mostly(valid, garbage, one_in: int = 8):
    """`garbage` one time in `one_in`, else `valid`: most requests then have one or two bad
    fields (each refusal must name its field) and a third get through to generation."""
    return st.integers(0, one_in - 1).flatmap(lambda draw: garbage if draw == 0 else valid)


floats32 = st.floats(width=32)  # every float32, NaN and infinities included
edge_floats = st.sampled_from([1e-45, 1e-38, 1e-7, 3.4e38, -0.0, -1e-45, float("nan"), float("inf"), -float("inf")])
texts = st.text(min_size=1, max_size=40)
long_texts = st.text(min_size=257, max_size=300)
prompt_fields = mostly(
    st.one_of(
        texts.map(lambda text: dict(prompt=text)),
        st.lists(st.integers(0, 299), min_size=1, max_size=40).map(lambda ids: dict(prompt_ids=ids)),
    ),
    st.one_of(
        st.just({}),
        st.just(dict(prompt="x", prompt_ids=[1])),
        st.just(dict(prompt_ids=[1] * 505)),
        st.sampled_from(["", " ", "\x00", "数学 ✓"]).map(lambda text: dict(prompt=text)),
        st.lists(st.integers(INT32_MIN, INT32_MAX), min_size=1, max_size=5).map(lambda ids: dict(prompt_ids=ids)),
    ),
    one_in=6,
)

requests = st.builds(
    dict,
    request_id=mostly(st.one_of(st.just(""), st.text(max_size=20)), long_texts),
    prompt=prompt_fields,
    max_new_tokens=mostly(st.integers(1, 40), st.sampled_from([0, 4096, 4097, 100000, UINT32_MAX])),
    temperature=mostly(st.sampled_from([0.0, 0.0, 0.5, 1.0, 1.5]), st.one_of(edge_floats, floats32)),
    top_k=mostly(st.one_of(st.just(0), st.integers(0, 400)), st.integers(0, UINT32_MAX)),
    top_p=mostly(st.sampled_from([0.0, 1.0, 0.5, 0.95]), st.one_of(edge_floats, floats32)),
    seed=st.one_of(st.none(), st.integers(0, UINT64_MAX)),
    stop=mostly(
        st.lists(st.text(min_size=1, max_size=8), max_size=3),
        st.one_of(
            st.lists(st.one_of(st.just(""), long_texts), min_size=1, max_size=2),
            st.lists(st.just("x"), min_size=17, max_size=20),
        ),
    ),
    mode=mostly(st.integers(0, 4), st.integers(INT32_MIN, INT32_MAX)),
)


def build(fields: dict) -> specpipe_pb2.GenerateRequest:
    seed = fields.pop("seed")
    fields.update(fields.pop("prompt"))
    request = specpipe_pb2.GenerateRequest(**fields)
    if seed is not None:
        request.seed = seed
    return request


@settings(
    max_examples=int(os.environ.get("SPECPIPE_FUZZ_EXAMPLES", 100)),
    deadline=None,
    database=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(fields=requests)
def test_any_request_ends_cleanly(serve, fields):
    client = Client(serve("draft").addr)
    request = build(dict(fields))
    responses = []
    try:
        for response in client.stub.Generate(request, timeout=CALL_TIMEOUT_S):
            responses.append(response)
    except grpc.RpcError as err:
        assert err.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED), (
            f"{err.code()}: {err.details()} for {request}"
        )
        assert err.details(), f"{err.code()} without a message for {request}"
        assert not responses, f"an error after {len(responses)} streamed messages for {request}"
        event(f"{err.code().name}: {err.details().split(' ')[0]}")
        return
    assert responses, f"an empty stream for {request}"
    assert all(not r.finish_reason for r in responses[:-1])
    last = responses[-1]
    event(f"served: {last.finish_reason}")
    assert last.finish_reason in ("length", "stop", "eos"), f"finish_reason {last.finish_reason!r}"
    generated = sum(len(r.token_ids) for r in responses)
    assert generated == last.stats.generated_tokens <= request.max_new_tokens
    assert all(0 <= t < VOCAB_PROBE for r in responses for t in r.token_ids)


def test_server_serves_after_the_fuzzing(serve):
    """Runs after the property test (file order): still answers, nothing leaked."""
    client = Client(serve("draft").addr)
    token_ids, _, last = client.complete(prompt_ids=[1, 2, 3], max_new_tokens=8, timeout=CALL_TIMEOUT_S)
    assert last.finish_reason in ("length", "eos") and token_ids
    idle, stats = wait_idle(client, timeout=2.0)
    assert idle, stats


def test_a_temperature_too_small_to_sample_is_refused(serve):
    """1e-38 overflows logits / temperature to inf (the distribution would be NaN): refused with
    the field named; 1e-5 (the smallest allowed) samples."""
    client = Client(serve("draft").addr)
    try:
        client.complete(prompt_ids=[1, 2], max_new_tokens=2, temperature=1e-38)
        raise AssertionError("a temperature of 1e-38 was accepted")
    except grpc.RpcError as err:
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "temperature must be 0" in err.details()
    assert client.complete(prompt_ids=[1, 2], max_new_tokens=2, temperature=1e-5, seed=3)[2].finish_reason
