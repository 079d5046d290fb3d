"""The OpenAI shapes on their own (coordinator/openai_api.py), in-process and fast: which fields a
body may carry and what they become in a GenerateRequest, what is refused and how it is named,
how a servicer refusal is renamed for an OpenAI client, chat template rendering (the tokenizer's
own, a --chat-template override, none), and the response and chunk objects. The same paths run
end to end over HTTP in tests/e2e/test_http*.py."""

from __future__ import annotations

import pytest

from specpipe.coordinator import openai_api
from specpipe.coordinator.openai_api import ApiError, api_error, chunk_objects, parse_chat, parse_completion
from specpipe.coordinator.servicer import Refused
from specpipe.proto.specpipe.v1 import specpipe_pb2

from tiny import build_tokenizer

MODEL = "tiny"
TEMPLATE = (
    "{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)
USER = [{"role": "user", "content": "hi"}]


def refused(parse, body: dict) -> ApiError:
    with pytest.raises(ApiError) as err:
        parse(body, MODEL)
    return err.value


def test_completion_fields_become_a_generate_request():
    call = parse_completion(
        {
            "model": MODEL,
            "prompt": "def f",
            "max_tokens": 7,
            "temperature": 0,
            "top_p": 0.5,
            "seed": 3,
            "stop": "\n",
            "mode": "sequential",
            "top_k": -1,
            "user": "me",
            "n": 1,
            "logprobs": None,
            "echo": False,
            "presence_penalty": 0.0,
            "drafter_invariant": True,
        },
        MODEL,
    )
    request = call.request
    assert request.drafter_invariant
    assert (request.prompt, request.max_new_tokens, request.temperature, request.top_p) == ("def f", 7, 0.0, 0.5)
    assert (request.seed, list(request.stop), request.top_k) == (3, ["\n"], 0)
    assert request.mode == specpipe_pb2.MODE_SEQUENTIAL and request.request_id.startswith("cmpl-")
    assert not call.stream and not call.chat


def test_completion_defaults_are_openai_s():
    request = parse_completion({"prompt": [1, 2]}, MODEL).request
    assert list(request.prompt_ids) == [1, 2] and not request.prompt
    assert request.max_new_tokens == openai_api.DEFAULT_COMPLETION_TOKENS == 16
    assert request.temperature == 1.0 and not request.HasField("seed") and not request.drafter_invariant
    assert request.mode == specpipe_pb2.MODE_UNSPECIFIED


@pytest.mark.parametrize("prompt", ["x", [3, 4], ["x"], [[3, 4]]])
def test_prompt_shapes_of_one_prompt(prompt):
    request = parse_completion({"prompt": prompt}, MODEL).request
    assert request.prompt == "x" or list(request.prompt_ids) == [3, 4]


@pytest.mark.parametrize(
    "body, param, message",
    [
        ({"prompt": ["a", "b"]}, "prompt", "a batch of 2 prompts"),
        ({"prompt": ""}, "prompt", "prompt is required"),
        ({"prompt": []}, "prompt", "prompt is required"),
        ({"prompt": [1, "a"]}, "prompt", "prompt is required"),
        ({"prompt": [1, 2**40]}, "prompt", "prompt[1] = 1099511627776 is outside the vocabulary"),
        ({}, "prompt", "prompt is required"),
        ({"prompt": "x", "max_tokens": "5"}, "max_tokens", "max_tokens must be an integer"),
        ({"prompt": "x", "max_tokens": 0}, "max_tokens", "max_tokens must be an integer in [1, "),
        ({"prompt": "x", "temperature": "hot"}, "temperature", "temperature must be a number"),
        ({"prompt": "x", "temperature": True}, "temperature", "temperature must be a number"),
        ({"prompt": "x", "seed": -1}, "seed", "seed must be an integer in [0, "),
        ({"prompt": "x", "stop": 5}, "stop", "stop must be a string or a list of strings"),
        ({"prompt": "x", "stream": "yes"}, "stream", "stream must be true or false"),
        ({"prompt": "x", "stream_options": {"include_usage": True}}, "stream_options", "only allowed with stream"),
        ({"prompt": "x", "stream": True, "stream_options": {"x": 1}}, "stream_options", "may only hold include_usage"),
        ({"prompt": "x", "mode": "fast"}, "mode", "mode must be one of autoregressive, sequential"),
        ({"prompt": "x", "foo": 1, "bar": 2}, "foo", "Unrecognized request argument supplied: foo, bar"),
    ],
)
def test_bad_fields_are_refused_naming_them(body, param, message):
    err = refused(parse_completion, body)
    assert (err.status, err.param) == (400, param) and message in str(err)
    assert err.body()["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    "parse, body, names",
    [
        (parse_completion, {"prompt": "x", "n": 2}, ["n"]),
        (parse_completion, {"prompt": "x", "logprobs": 0}, ["logprobs"]),
        (parse_completion, {"prompt": "x", "best_of": 3, "echo": True, "suffix": "y"}, ["best_of", "echo", "suffix"]),
        (parse_completion, {"prompt": "x", "presence_penalty": 0.5}, ["presence_penalty"]),
        (parse_completion, {"prompt": "x", "frequency_penalty": False}, ["frequency_penalty"]),  # false is not 0
        (parse_completion, {"prompt": "x", "logit_bias": {"5": 10}}, ["logit_bias"]),
        (parse_chat, {"messages": USER, "tools": [{"type": "function"}]}, ["tools"]),
        (parse_chat, {"messages": USER, "logprobs": True, "top_logprobs": 2}, ["logprobs", "top_logprobs"]),
        (parse_chat, {"messages": USER, "response_format": {"type": "json_object"}}, ["response_format"]),
    ],
)
def test_unsupported_parameters_are_refused_unless_they_change_nothing(parse, body, names):
    err = refused(parse, body)
    assert (err.status, err.param, err.code) == (400, names[0], "unsupported_parameter")
    assert all(name in str(err) for name in names)


def test_unsupported_parameters_at_their_no_op_values_are_accepted():
    parse_completion(
        {
            "prompt": "x",
            "n": 1,
            "best_of": 1,
            "echo": False,
            "logprobs": None,
            "suffix": None,
            "presence_penalty": 0,
            "frequency_penalty": 0.0,
            "logit_bias": {},
        },
        MODEL,
    )
    parse_chat(
        {
            "messages": USER,
            "n": 1,
            "logprobs": False,
            "tools": [],
            "tool_choice": "none",
            "parallel_tool_calls": True,
            "response_format": {"type": "text"},
        },
        MODEL,
    )


def test_an_unknown_model_is_404():
    err = refused(parse_completion, {"model": "gpt-4", "prompt": "x"})
    assert (err.status, err.param, err.code) == (404, "model", "model_not_found")


def test_chat_fields_and_messages():
    call = parse_chat(
        {
            "messages": [
                {"role": "system", "content": "be brief"},
                {
                    "role": "user",
                    "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
                    "name": "x",
                    "tool_calls": None,
                },
            ],
            "max_completion_tokens": 9,
            "stream": True,
            "stream_options": {"include_usage": True},
        },
        MODEL,
    )
    assert call.chat and call.stream and call.include_usage and call.request.request_id.startswith("chatcmpl-")
    assert call.request.max_new_tokens == 9 and call.names["max_new_tokens"] == "max_completion_tokens"
    assert call.messages[1] == {"role": "user", "content": "a\nb", "name": "x"}
    assert not parse_chat({"messages": USER}, MODEL).max_tokens_given


@pytest.mark.parametrize(
    "messages, message",
    [
        ([], "messages is required"),
        ("hi", "messages is required"),
        ([{"content": "hi"}], "messages[0] must be an object with a string role"),
        ([{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}], "messages[0].content must be"),
        ([{"role": "assistant", "content": "", "tool_calls": [{}]}], "messages[0].tool_calls is not supported"),
    ],
)
def test_bad_messages_are_refused(messages, message):
    err = refused(parse_chat, {"messages": messages})
    assert (err.status, err.param) == (400, "messages") and message in str(err)


def test_max_tokens_and_max_completion_tokens_together_are_refused():
    err = refused(parse_chat, {"messages": USER, "max_tokens": 3, "max_completion_tokens": 3})
    assert err.param == "max_completion_tokens"


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return build_tokenizer(tmp_path_factory.mktemp("tokenizer"))


def test_chat_renders_with_the_tokenizer_template_or_the_override_or_says_there_is_none(tokenizer):
    call = parse_chat({"messages": USER}, MODEL)
    assert tokenizer.chat_template is None
    err = pytest.raises(ApiError, openai_api.render_chat, call, tokenizer, "").value
    assert (err.status, err.param) == (400, "messages") and "no chat template" in str(err)
    assert "--chat-template FILE" in str(err)
    assert openai_api.render_chat(call, tokenizer, TEMPLATE) == "<user>hi\n<assistant>"
    tokenizer.chat_template = "{% for m in messages %}[{{ m.content }}]{% endfor %}"
    try:
        assert openai_api.render_chat(call, tokenizer, "") == "[hi]"
        assert openai_api.render_chat(call, tokenizer, TEMPLATE) == "<user>hi\n<assistant>"  # the flag wins
        tokenizer.chat_template = "{{ raise_exception('roles must alternate') }}"
        err = pytest.raises(ApiError, openai_api.render_chat, call, tokenizer, "").value
        assert err.param == "messages" and "roles must alternate" in str(err)
    finally:
        tokenizer.chat_template = None


def test_chat_default_max_tokens_fill_the_context_up_to_the_cap():
    assert openai_api.max_tokens_for(100, 512, 4096) == 412
    assert openai_api.max_tokens_for(100, 512, 50) == 50
    assert openai_api.max_tokens_for(600, 512, 50) == 1  # the servicer refuses it, naming the context


@pytest.mark.parametrize(
    "chat, status, message, http, param, renamed",
    [
        (
            False,
            "INVALID_ARGUMENT",
            "max_new_tokens = 100000 exceeds the server's cap of 4096",
            400,
            "max_tokens",
            "max_tokens = 100000 exceeds the server's cap of 4096",
        ),
        (
            False,
            "INVALID_ARGUMENT",
            "prompt_ids[1] = 99999 is outside the vocabulary [0, 300)",
            400,
            "prompt",
            "prompt[1] = 99999 is outside the vocabulary [0, 300)",
        ),
        (
            False,
            "INVALID_ARGUMENT",
            "top_p must be in [0, 1], got 1.5",
            400,
            "top_p",
            "top_p must be in [0, 1], got 1.5",
        ),
        (
            True,
            "INVALID_ARGUMENT",
            "prompt (5 tokens) plus max_new_tokens (600) exceeds the model context of 512 tokens",
            400,
            "messages",
            "messages (5 tokens) plus max_tokens (600) exceeds the model context of 512 tokens",
        ),
        (False, "RESOURCE_EXHAUSTED", "the server is at capacity", 429, None, "the server is at capacity"),
        (False, "UNAVAILABLE", "the target worker is unavailable", 503, None, "the target worker is unavailable"),
        (
            False,
            "INTERNAL",
            "internal error (KeyError) in request x",
            500,
            None,
            "internal error (KeyError) in request x",
        ),
    ],
)
def test_servicer_refusals_are_renamed_for_openai_clients(chat, status, message, http, param, renamed):
    call = parse_chat({"messages": USER}, MODEL) if chat else parse_completion({"prompt": "x"}, MODEL)
    err = api_error(Refused(status, message), call)
    assert (err.status, err.param, str(err)) == (http, param, renamed)


def last_response(finish_reason: str, text: str = "!") -> specpipe_pb2.GenerateResponse:
    return specpipe_pb2.GenerateResponse(
        token_ids=[5],
        text=text,
        finish_reason=finish_reason,
        stats=specpipe_pb2.RequestStats(generated_tokens=3, accepted_tokens=2, mode=specpipe_pb2.MODE_SPECBRANCH),
    )


def test_response_objects_carry_usage_and_the_grpc_stats_names():
    call = parse_completion({"prompt": "x"}, MODEL)
    body = openai_api.response_object(call, [specpipe_pb2.GenerateResponse(text="ab"), last_response("eos")], 4)
    assert body["object"] == "text_completion" and body["choices"][0]["text"] == "ab!"
    assert body["choices"][0]["finish_reason"] == "stop"  # the end-of-sequence token is a stop
    assert body["usage"] == {"prompt_tokens": 4, "completion_tokens": 3, "total_tokens": 7}
    assert set(body["specpipe"]) == set(specpipe_pb2.RequestStats.DESCRIPTOR.fields_by_name)
    assert body["specpipe"]["mode"] == "specbranch" and body["specpipe"]["accepted_tokens"] == 2
    chat = openai_api.response_object(parse_chat({"messages": USER}, MODEL), [last_response("length")], 4)
    assert chat["object"] == "chat.completion" and chat["choices"][0]["message"] == {
        "role": "assistant",
        "content": "!",
    }


def test_chunks():
    chat = parse_chat({"messages": USER}, MODEL)
    first = chunk_objects(chat, specpipe_pb2.GenerateResponse(text=""), first=True)
    assert first[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert first[0]["object"] == "chat.completion.chunk"
    assert chunk_objects(chat, specpipe_pb2.GenerateResponse(text=""), first=False) == []  # nothing to say
    last = chunk_objects(chat, last_response("stop"), first=False)[0]
    assert last["choices"][0] == {"index": 0, "logprobs": None, "finish_reason": "stop", "delta": {"content": "!"}}
    assert last["specpipe"]["generated_tokens"] == 3
    usage = openai_api.usage_chunk(chat, 4, last_response("stop"))
    assert usage["choices"] == [] and usage["usage"]["total_tokens"] == 7
