"""The OpenAI-compatible HTTP API end to end: a real `specpipe serve --http-port 0` (coordinator
plus two worker processes over tiny models), the official `openai` client and raw HTTP (httpx2,
the library that client is built on). One server serves the whole module, its gRPC port too.

Method: HTTP output is compared with the gRPC API's for the same request (the same servicer
behind both) and with Hugging Face's greedy tokens; the server's counters (GetStats over gRPC)
show that both transports share one set, and that a client gone mid-request left nothing live.
The tokenizer here has no chat template: chat requests must be refused, saying so. Chat with a
template, auth, TLS, 429 and 503 are in test_http_production.py.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json

import httpx2
import openai
import pytest
from transformers import AutoTokenizer

from specpipe import Client
from specpipe.proto.specpipe.v1 import specpipe_pb2

from checks import paused, wait_for, wait_idle, worker
from tiny import PROMPTS

MAX_NEW = 24
LONG = {"prompt": PROMPTS[0], "max_tokens": 480, "temperature": 0, "mode": "sequential"}  # seconds of work
STATS_FIELDS = set(specpipe_pb2.RequestStats.DESCRIPTOR.fields_by_name)


@pytest.fixture(scope="module")
def server(serve):
    return serve("draft", "--http-port", "0")


@pytest.fixture(scope="module")
def model(tiny_models) -> str:
    return str(tiny_models["target"])  # the served name: --target as given


@pytest.fixture(scope="module")
def tokenizer(tiny_models):
    return AutoTokenizer.from_pretrained(tiny_models["target"])


def client_for(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.http_url + "/v1", api_key="unused", max_retries=0, timeout=60)


def post(server, path: str, body, **kwargs) -> httpx2.Response:
    content = body if isinstance(body, str) else json.dumps(body)
    return httpx2.post(
        server.http_url + path, content=content, headers={"content-type": "application/json"}, timeout=60, **kwargs
    )


@pytest.mark.parametrize("mode", ["sequential", "specbranch"])
def test_greedy_completion_equals_grpc_and_hf(server, model, tokenizer, hf_greedy, mode):
    grpc_client, http = Client(server.addr), client_for(server)
    for prompt_ids in PROMPTS[:3]:
        expected = hf_greedy(prompt_ids, MAX_NEW)
        token_ids, text, _ = grpc_client.complete(prompt_ids=prompt_ids, max_new_tokens=MAX_NEW, mode=mode)
        assert token_ids == expected
        completion = http.completions.create(
            model=model, prompt=prompt_ids, max_tokens=MAX_NEW, temperature=0, extra_body={"mode": mode}
        )
        choice, usage = completion.choices[0], completion.usage
        assert choice.text == text == tokenizer.decode(expected, skip_special_tokens=True)
        assert (usage.prompt_tokens, usage.completion_tokens) == (len(prompt_ids), len(expected))
        assert usage.total_tokens == len(prompt_ids) + len(expected)
        assert choice.finish_reason == ("stop" if expected[-1] == tokenizer.eos_token_id else "length")
        stats = completion.model_extra["specpipe"]
        assert set(stats) == STATS_FIELDS and stats["mode"] == mode and stats["generated_tokens"] == len(expected)
        assert stats["verifications"] > 0 and stats["draft_tokens"] > 0
        assert isinstance(stats["branch_rank_tried"], list)  # (repeated fields: JSON lists)


def test_streamed_completion_is_the_same_text_in_chunks(server, model, hf_greedy):
    http = client_for(server)
    params = dict(model=model, prompt=PROMPTS[2], max_tokens=MAX_NEW, temperature=0)
    whole = http.completions.create(**params).choices[0].text
    chunks = list(http.completions.create(**params, stream=True, stream_options={"include_usage": True}))
    texts = [chunk.choices[0] for chunk in chunks if chunk.choices]
    assert "".join(choice.text for choice in texts) == whole and len(texts) > 1
    assert [choice.finish_reason for choice in texts][:-1] == [None] * (len(texts) - 1)
    assert texts[-1].finish_reason in ("length", "stop")
    assert chunks[-2].model_extra["specpipe"]["generated_tokens"] == len(hf_greedy(PROMPTS[2], MAX_NEW))
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(hf_greedy(PROMPTS[2], MAX_NEW))
    assert len({chunk.id for chunk in chunks}) == 1 and chunks[0].id.startswith("cmpl-")


def test_text_prompt_counts_its_tokens(server, model, tokenizer):
    prompt = "def fib(n):"
    completion = client_for(server).completions.create(
        model=model, prompt=prompt, max_tokens=8, temperature=0, stop=["\x00never"]
    )
    assert completion.usage.prompt_tokens == len(tokenizer(prompt)["input_ids"])
    _, text, _ = Client(server.addr).complete(prompt, max_new_tokens=8, stop=["\x00never"])
    assert completion.choices[0].text == text


def test_seed_is_honoured(server, model):
    """A seeded sampled request gives the same text twice, the same as gRPC with that seed, and
    another seed gives another text."""
    http, grpc_client = client_for(server), Client(server.addr)
    params = dict(
        model=model, prompt=PROMPTS[2], max_tokens=MAX_NEW, temperature=1.0, extra_body={"mode": "sequential"}
    )
    first = http.completions.create(seed=7, **params).choices[0].text
    assert http.completions.create(seed=7, **params).choices[0].text == first
    _, grpc_text, _ = grpc_client.complete(
        prompt_ids=PROMPTS[2], max_new_tokens=MAX_NEW, temperature=1.0, seed=7, mode="sequential"
    )
    assert grpc_text == first
    assert any(http.completions.create(seed=seed, **params).choices[0].text != first for seed in (8, 9, 10))


def test_server_sent_events_framing(server):
    body = {"prompt": PROMPTS[1], "max_tokens": 12, "temperature": 0, "stream": True}
    with httpx2.stream("POST", server.http_url + "/v1/completions", json=body, timeout=60) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        raw = response.read().decode()
    events = raw.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]", raw[-200:]
    chunks = [json.loads(event.removeprefix("data: ")) for event in events[:-2]]
    assert all(event.startswith("data: ") and "\n" not in event for event in events[:-1])
    assert all(chunk["object"] == "text_completion" for chunk in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] in ("length", "stop") and "specpipe" in chunks[-1]


ERRORS = [
    ({"prompt": [1], "n": 2}, 400, "n", "not supported by specpipe: n"),
    ({"prompt": [1], "logprobs": 2, "best_of": 3}, 400, "best_of", "best_of, logprobs"),
    ({"prompt": [1], "echo": True}, 400, "echo", "not supported by specpipe: echo"),
    ({"prompt": [1], "bogus": 1}, 400, "bogus", "Unrecognized request argument supplied: bogus"),
    ({"prompt": [1], "max_tokens": 100000}, 400, "max_tokens", "max_tokens = 100000 exceeds the server's cap"),
    ({"prompt": [1, 99999]}, 400, "prompt", "prompt[1] = 99999 is outside the vocabulary"),
    ({"prompt": [1] * 500, "max_tokens": 20}, 400, "prompt", "exceeds the model context of 512"),
    ({"prompt": [1], "temperature": -1}, 400, "temperature", "temperature must be a finite number >= 0"),
    ({"prompt": [1], "top_p": 1.5}, 400, "top_p", "top_p must be in [0, 1]"),
    ({"prompt": [1], "stop": [""]}, 400, "stop", "stop[0] must be 1 to 256 characters"),
    ({"prompt": [1], "stream": True, "max_tokens": 0}, 400, "max_tokens", "max_tokens must be an integer"),
    ({"prompt": [1], "model": "gpt-4"}, 404, "model", "The model `gpt-4` does not exist"),
    ("{not json", 400, None, "the request body is not valid JSON"),
    ("[1, 2]", 400, None, "the request body must be a JSON object"),
]


@pytest.mark.parametrize("body, status, param, message", ERRORS)
def test_refusals_are_openai_error_objects_naming_the_field(server, body, status, param, message):
    response = post(server, "/v1/completions", body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["param"] == param and message in error["message"], error
    assert error["type"] == {400: "invalid_request_error", 404: "not_found_error"}[status]


def test_refusals_are_counted_with_grpc_s(server):
    """One set of counters: an HTTP refusal (by the HTTP layer, or by the servicer's checks) counts
    in GetStats' `finished` as a gRPC one does."""
    grpc_client = Client(server.addr)
    before = grpc_client.stats().finished["invalid_argument"]
    assert post(server, "/v1/completions", {"prompt": [1], "n": 3}).status_code == 400
    assert post(server, "/v1/completions", {"prompt": [1], "top_p": 2}).status_code == 400
    assert grpc_client.stats().finished["invalid_argument"] == before + 2


def test_chat_without_a_chat_template_is_refused_saying_so(server, model):
    with pytest.raises(openai.BadRequestError) as err:
        client_for(server).chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}])
    error = err.value.body
    assert error["param"] == "messages" and "no chat template" in error["message"]
    assert "--chat-template FILE" in error["message"]


@pytest.mark.parametrize("stream", [True, False], ids=["streamed", "whole"])
def test_a_client_that_disconnects_frees_the_request(server, stream):
    """Mid-stream (the client closes after two events) or mid-request (a non-streamed call whose
    client gives up): the request ends cancelled, and GetStats shows 0 live requests and branches
    within a second. The target is paused while the client leaves, so the request cannot have
    finished first (a fast machine generates LONG in under half a second)."""
    grpc_client = Client(server.addr)
    before = grpc_client.stats().finished

    def cancelled() -> bool:
        return grpc_client.stats().finished["cancelled"] == before["cancelled"] + 1

    with httpx2.Client(timeout=30) as http, contextlib.ExitStack() as target:
        if stream:
            with http.stream("POST", server.http_url + "/v1/completions", json={**LONG, "stream": True}) as response:
                events = (line for line in response.iter_lines() if line.startswith("data: "))
                next(events), next(events)
                target.enter_context(paused(worker(grpc_client.stats(), "target").pid))
        else:
            target.enter_context(paused(worker(grpc_client.stats(), "target").pid))
            with pytest.raises(httpx2.ReadTimeout):
                http.post(server.http_url + "/v1/completions", json=LONG, timeout=0.3)
        wait_for(cancelled, 1.0, "the request to be cancelled")  # the client has gone; the target still paused
    idle, stats = wait_idle(grpc_client, timeout=1.0)
    assert idle, stats
    assert stats.finished["length"] == before["length"] and stats.finished["eos"] == before["eos"]


def test_concurrent_http_and_grpc_clients(server, model, hf_greedy):
    """Four HTTP and four gRPC clients at once on one server: each gets its greedy output, and
    all eight are counted in one set of counters."""
    grpc_client, http = Client(server.addr), client_for(server)
    modes = ["autoregressive", "sequential", "pipelined", "specbranch"]
    reference = {i: grpc_client.complete(prompt_ids=PROMPTS[i], max_new_tokens=MAX_NEW)[1] for i in range(4)}
    finished_before = sum(grpc_client.stats().finished.values())

    def run(job):
        transport, i = job
        if transport == "grpc":
            token_ids, text, _ = grpc_client.complete(prompt_ids=PROMPTS[i], max_new_tokens=MAX_NEW, mode=modes[i])
            return len(token_ids), text
        completion = http.completions.create(
            model=model, prompt=PROMPTS[i], max_tokens=MAX_NEW, temperature=0, extra_body={"mode": modes[i]}
        )
        return completion.usage.completion_tokens, completion.choices[0].text

    jobs = [(transport, i) for i in range(4) for transport in ("http", "grpc")]
    with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
        results = list(pool.map(run, jobs))
    for (transport, i), (count, text) in zip(jobs, results):
        assert (count, text) == (len(hf_greedy(PROMPTS[i], MAX_NEW)), reference[i]), (transport, i)
    assert sum(grpc_client.stats().finished.values()) == finished_before + len(jobs)


def test_models_health_and_unknown_routes(server, model):
    assert [m.id for m in client_for(server).models.list()] == [model]
    listed = httpx2.get(server.http_url + "/v1/models").json()["data"][0]
    assert listed["max_model_len"] == 512 and listed["owned_by"] == "specpipe"
    health = httpx2.get(server.http_url + "/health")
    assert (health.status_code, health.json()) == (200, {"status": "ok"})
    for method, path, status in (("GET", "/v1/nothing", 404), ("GET", "/v1/completions", 405)):
        response = httpx2.request(method, server.http_url + path)
        assert response.status_code == status and response.json()["error"]["message"]
