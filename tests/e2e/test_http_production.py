"""The HTTP API on a production-shaped server, end to end: a tiny target whose tokenizer has a
chat template, a bearer token, TLS (the same certificate as the gRPC port), and admission limits
of one running request and none queued. One server for the module; the test that kills its
target worker runs last.

Method: chat output is compared with the gRPC API's and Hugging Face's greedy tokens for the
prompt the template renders; the one admission slot is held by a gRPC request that stops reading
(tests/e2e/held.py) to show that HTTP and gRPC share one queue; "target down" is a SIGKILL of the
target worker (its pid from GetStats), seen before the supervisor has restarted it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import ssl

import grpc
import httpx2
import openai
import pytest
from transformers import AutoTokenizer

from specpipe import Client
from specpipe.launch.local import ServerProcess

from certificates import make_certificates
from checks import paused, wait_for, wait_idle, worker
from held import HeldRequest
from tiny import PROMPTS

TOKEN = "http-token-for-tests"
MODEL = "tiny-chat"
TEMPLATE = (
    "{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)
MESSAGES = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "def fib(n):"}]
MAX_NEW = 20
# A stream that runs for seconds: sequential mode through a draft the target mostly rejects.
LONG_STREAM = {"prompt": PROMPTS[0], "max_tokens": 480, "temperature": 0, "stream": True, "mode": "sequential"}


@pytest.fixture(scope="module")
def templated(tiny_models, tmp_path_factory):
    """The tiny target, its tokenizer given a chat template."""
    folder = tmp_path_factory.mktemp("templated") / "target"
    shutil.copytree(tiny_models["target"], folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.chat_template = TEMPLATE
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def server(templated, tiny_models, tmp_path_factory):
    folder = make_certificates(tmp_path_factory.mktemp("tls"))
    (folder / "token").write_text(TOKEN + "\n")
    server = ServerProcess(
        [
            "--target",
            str(templated),
            "--draft",
            str(tiny_models["draft"]),
            "--http-port",
            "0",
            "--served-model-name",
            MODEL,
            "--auth-token-file",
            str(folder / "token"),
            "--tls-cert",
            str(folder / "server.pem"),
            "--tls-key",
            str(folder / "server.key"),
            "--max-concurrent-requests",
            "1",
            "--max-queued-requests",
            "0",
        ]
    )
    server.ca, server.token = (folder / "ca.pem").read_bytes(), TOKEN
    yield server
    server.stop()


def tls(server) -> ssl.SSLContext:
    return ssl.create_default_context(cadata=server.ca.decode())


def client_for(server, token: str = TOKEN) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=server.http_url + "/v1",
        api_key=token,
        max_retries=0,
        timeout=60,
        http_client=httpx2.Client(verify=tls(server)),
    )


def grpc_client(server) -> Client:
    return Client(server.addr, token=TOKEN, root_certificates=server.ca, timeout=60)


def post(server, path: str, body: dict, token: str | None = TOKEN) -> httpx2.Response:
    headers = {"authorization": f"Bearer {token}"} if token else {}
    return httpx2.post(server.http_url + path, json=body, headers=headers, verify=tls(server), timeout=60)


def test_chat_completion_renders_the_tokenizer_s_template(server, templated, hf_greedy):
    prompt_ids = AutoTokenizer.from_pretrained(templated).apply_chat_template(
        MESSAGES, add_generation_prompt=True, tokenize=True
    )["input_ids"]
    expected = hf_greedy(prompt_ids, MAX_NEW)
    token_ids, text, _ = grpc_client(server).complete(prompt_ids=prompt_ids, max_new_tokens=MAX_NEW)
    assert token_ids == expected
    http = client_for(server)
    completion = http.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=MAX_NEW, temperature=0)
    choice = completion.choices[0]
    assert completion.object == "chat.completion" and completion.id.startswith("chatcmpl-")
    assert (choice.message.role, choice.message.content) == ("assistant", text)
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (len(prompt_ids), len(expected))
    assert completion.model_extra["specpipe"]["generated_tokens"] == len(expected)
    chunks = list(
        http.chat.completions.create(
            model=MODEL,
            messages=MESSAGES,
            max_completion_tokens=MAX_NEW,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    deltas = [chunk.choices[0] for chunk in chunks if chunk.choices]
    assert all(chunk.object == "chat.completion.chunk" for chunk in chunks)
    assert deltas[0].delta.role == "assistant" and "".join(d.delta.content or "" for d in deltas) == text
    assert deltas[-1].finish_reason == choice.finish_reason and chunks[-1].usage == completion.usage


def test_chat_max_tokens_default_to_what_fits_the_context(server):
    completion = client_for(server).chat.completions.create(
        model=MODEL, messages=MESSAGES, temperature=0, extra_body={"mode": "autoregressive"}
    )
    usage = completion.usage
    assert completion.choices[0].finish_reason == "stop" or usage.total_tokens == 512, usage


@pytest.mark.parametrize(
    "headers",
    [{}, {"authorization": "Bearer wrong"}, {"authorization": f"Basic {TOKEN}"}, {"x-api-key": TOKEN}],
    ids=["none", "wrong", "basic", "other-header"],
)
def test_a_missing_or_wrong_token_is_401(server, headers):
    for method, path in (
        ("POST", "/v1/completions"),
        ("POST", "/v1/chat/completions"),
        ("GET", "/v1/models"),
        ("GET", "/v1/nothing"),
    ):
        response = httpx2.request(
            method, server.http_url + path, json={"prompt": [1], "max_tokens": 1}, headers=headers, verify=tls(server)
        )
        assert response.status_code == 401, (path, response.text)
        assert response.json()["error"]["code"] == "invalid_api_key"
        assert response.headers["www-authenticate"] == "Bearer"


def test_the_token_and_tls_let_clients_in_and_health_is_open(server):
    assert [m.id for m in client_for(server).models.list()] == [MODEL]
    with pytest.raises(openai.AuthenticationError):
        client_for(server, token="wrong").models.list()
    health = httpx2.get(server.http_url + "/health", verify=tls(server))  # no token: probes need none
    assert (health.status_code, health.json()) == (200, {"status": "ok"})
    with pytest.raises(httpx2.ConnectError):  # a certificate the client does not trust
        httpx2.get(server.http_url + "/health")
    with pytest.raises(httpx2.TransportError):  # plain HTTP to a TLS port
        httpx2.get(server.http_url.replace("https://", "http://") + "/health")


def test_over_capacity_is_429_whichever_transport_holds_the_slot(server):
    """The only slot held by a gRPC request: HTTP gets 429; held by an HTTP stream: gRPC gets
    RESOURCE_EXHAUSTED. One admission queue."""
    before = grpc_client(server).stats().finished
    holder = HeldRequest(server, prompt_ids=PROMPTS[0], max_new_tokens=480, mode="autoregressive").first()
    try:
        response = post(server, "/v1/completions", {"prompt": [1], "max_tokens": 2})
        assert response.status_code == 429 and response.headers["retry-after"] == "1"
        error = response.json()["error"]
        assert error["type"] == "rate_limit_error" and "max_concurrent_requests 1" in error["message"]
        with pytest.raises(openai.RateLimitError):
            client_for(server).completions.create(model=MODEL, prompt=[1], max_tokens=2)
    finally:
        holder.cancel()
    client = grpc_client(server)
    wait_for(lambda: wait_idle(client, 0.0)[0], 2.0, "the held request to be freed")
    # Cancelled while its write waited on the stalled client: counted as such, not as a failure.
    wait_for(lambda: client.stats().finished["cancelled"] == before["cancelled"] + 1, 2.0, "the cancel counted")
    assert client.stats().finished["internal"] == before["internal"]
    with httpx2.stream(
        "POST",
        server.http_url + "/v1/completions",
        json=LONG_STREAM,
        verify=tls(server),
        timeout=60,
        headers={"authorization": f"Bearer {TOKEN}"},
    ) as stream:
        lines = stream.iter_lines()  # kept: a dropped iterator closes the response (a disconnect)
        assert next(line for line in lines if line.startswith("data: "))
        with paused(worker(client.stats(), "target").pid), pytest.raises(grpc.RpcError) as err:
            client.complete(prompt_ids=[1], max_new_tokens=2)  # the stream surely still runs
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    wait_for(lambda: wait_idle(client, 0.0)[0], 2.0, "the stream to be freed")
    assert post(server, "/v1/completions", {"prompt": [1], "max_tokens": 2}).status_code == 200


def test_target_down_ends_a_stream_with_an_error_event_then_is_503(server):
    """SIGKILL the target mid-stream: the stream's last event is an error, then [DONE]; until the
    supervisor has restarted it, /health and new requests are 503; then it serves again."""
    client = grpc_client(server)
    target_pid = next(worker.pid for worker in client.stats().workers if worker.role == "target")
    with httpx2.stream(
        "POST",
        server.http_url + "/v1/completions",
        json=LONG_STREAM,
        verify=tls(server),
        timeout=60,
        headers={"authorization": f"Bearer {TOKEN}"},
    ) as stream:
        lines = (line for line in stream.iter_lines() if line.startswith("data: "))
        next(lines)
        os.kill(target_pid, signal.SIGKILL)
        rest = list(lines)
    assert rest[-1] == "data: [DONE]"
    error = json.loads(rest[-2].removeprefix("data: "))["error"]
    assert error["type"] == "service_unavailable_error", error
    health = httpx2.get(server.http_url + "/health", verify=tls(server))
    assert (health.status_code, health.json()) == (503, {"status": "unavailable: target down"})
    response = post(server, "/v1/completions", {"prompt": [1], "max_tokens": 2})
    assert response.status_code == 503 and response.headers["retry-after"] == "1"
    assert response.json()["error"]["message"] == "the target worker is unavailable"
    wait_for(
        lambda: httpx2.get(server.http_url + "/health", verify=tls(server)).status_code == 200,
        60.0,
        "the restarted target",
    )
    assert post(server, "/v1/completions", {"prompt": [1], "max_tokens": 2}).status_code == 200
