"""The OpenAI API's shapes (DESIGN §7, HTTP): request bodies of `/v1/completions` and
`/v1/chat/completions` in, a `GenerateRequest` out; `GenerateResponse`s in, OpenAI's completion,
chat completion and chunk objects out; a refusal in, an OpenAI error object out.

Every field a body may carry is named here. The ones specpipe implements become GenerateRequest
fields and are then validated by the servicer, exactly as over gRPC (`SpecPipeServicer.plan`);
its messages name GenerateRequest fields, so `api_error` renames them to the ones the client
sent (`max_new_tokens` -> `max_tokens`, ...) and puts the field in `error.param`. Fields OpenAI
defines that specpipe does not implement (`n`, `logprobs`, `tools`, ...) are accepted only at the
value that changes nothing (`n = 1`) and otherwise refused with 400 naming them; unknown fields are
refused too: nothing a client asks for is silently ignored.

This module knows nothing of sockets, the event loop or models: it renders chat messages with the
tokenizer's chat template, but tokenising the result is the caller's (coordinator/http.py).
"""

from __future__ import annotations

import re
import time
import uuid
from dataclasses import dataclass, field

import jinja2

from specpipe.coordinator.servicer import Refused
from specpipe.modes import MODE_NAMES, Mode
from specpipe.proto.specpipe.v1 import specpipe_pb2

# OpenAI's default max_tokens for /v1/completions; chat's default is "as many as fit" (max_tokens_for).
DEFAULT_COMPLETION_TOKENS = 16
# OpenAI's default temperature (sampling), not gRPC's 0: clients written for OpenAI rely on it.
DEFAULT_TEMPERATURE = 1.0
# Field ranges the protobuf types hold (uint32, uint64, int32); the servicer checks the tighter ones.
UINT32_MAX, UINT64_MAX, INT32_MAX = 2**32 - 1, 2**64 - 1, 2**31 - 1
# vLLM's spelling of "top_k off"; specpipe's is 0.
TOP_K_OFF = -1

COMMON_FIELDS = {
    "model",
    "max_tokens",
    "temperature",
    "top_p",
    "seed",
    "stop",
    "stream",
    "stream_options",
    "user",
    "mode",
    "top_k",
    "drafter_invariant",
}
COMPLETION_FIELDS = COMMON_FIELDS | {"prompt"}
CHAT_FIELDS = COMMON_FIELDS | {"messages", "max_completion_tokens"}
# OpenAI fields specpipe does not implement, with the values that change nothing (None always does).
UNSUPPORTED_COMMON = {"n": (1,), "presence_penalty": (0, 0.0), "frequency_penalty": (0, 0.0), "logit_bias": ({},)}
UNSUPPORTED_COMPLETION = {**UNSUPPORTED_COMMON, "best_of": (1,), "echo": (False,), "logprobs": (), "suffix": ()}
UNSUPPORTED_CHAT = {
    **UNSUPPORTED_COMMON,
    "logprobs": (False,),
    "top_logprobs": (0,),
    "tools": ([],),
    "tool_choice": ("none",),
    "functions": ([],),
    "function_call": ("none",),
    "parallel_tool_calls": (True, False),
    "response_format": ({"type": "text"},),
}
MESSAGE_FIELDS = {"role", "content", "name"}
# GenerateRequest fields under the names an OpenAI client uses (the others keep theirs).
COMPLETION_NAMES = {"max_new_tokens": "max_tokens", "prompt_ids": "prompt"}
CHAT_NAMES = {"max_new_tokens": "max_tokens", "prompt_ids": "messages", "prompt": "messages"}
GENERATE_FIELDS = set(specpipe_pb2.GenerateRequest.DESCRIPTOR.fields_by_name)
# gRPC finish reasons as OpenAI spells them: the end-of-sequence token is a natural "stop".
FINISH_REASONS = {"length": "length", "stop": "stop", "eos": "stop"}
# A refusal's canonical status -> the HTTP status an OpenAI client expects.
HTTP_STATUS = {
    "INVALID_ARGUMENT": 400,
    "ALREADY_EXISTS": 409,
    "RESOURCE_EXHAUSTED": 429,
    "UNAVAILABLE": 503,
    "INTERNAL": 500,
}
# ...and back, to count an HTTP refusal under the name the metrics use (a 413 is a bad request too).
STATUS_NAMES = {400: "INVALID_ARGUMENT", 404: "NOT_FOUND", 413: "INVALID_ARGUMENT"}
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    409: "conflict_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "service_unavailable_error",
}


class ApiError(Exception):
    """An HTTP error with an OpenAI error object: `param` names the field at fault, if one is."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.param, self.code = status, param, code

    def body(self) -> dict:
        return {
            "error": {
                "message": str(self),
                "type": ERROR_TYPES.get(self.status, "server_error"),
                "param": self.param,
                "code": self.code,
            }
        }


def bad(message: str, param: str | None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param, code)


@dataclass
class Call:
    """One parsed request: the GenerateRequest to run and how to answer it."""

    chat: bool
    request: specpipe_pb2.GenerateRequest  # chat: prompt_ids are the caller's to fill (render_chat)
    model: str
    stream: bool = False
    include_usage: bool = False  # stream_options.include_usage: a last chunk with usage
    max_tokens_given: bool = True
    messages: list = field(default_factory=list)
    names: dict = field(default_factory=dict)  # GenerateRequest field -> the client's name for it
    created: int = field(default_factory=lambda: int(time.time()))


# -- requests --------------------------------------------------------------------------------------
def parse_completion(body: dict, served_model: str) -> Call:
    _check_fields(body, COMPLETION_FIELDS, UNSUPPORTED_COMPLETION)
    call = _parse_common(body, served_model, chat=False, id_prefix="cmpl-")
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one prompt is that prompt
    if isinstance(prompt, str) and prompt:
        call.request.prompt = prompt
    elif isinstance(prompt, list) and prompt and all(_is_int(token) for token in prompt):
        for index, token in enumerate(prompt):
            if not -INT32_MAX <= token <= INT32_MAX:
                raise bad(f"prompt[{index}] = {token} is outside the vocabulary", "prompt")
        call.request.prompt_ids.extend(prompt)
    elif isinstance(prompt, list) and len(prompt) > 1 and all(isinstance(p, (str, list)) for p in prompt):
        raise bad(
            f"prompt is a batch of {len(prompt)} prompts: not supported, send one request per prompt",
            "prompt",
            "unsupported_parameter",
        )
    else:
        raise bad("prompt is required: a non-empty string or a non-empty list of token ids", "prompt")
    call.request.max_new_tokens = _integer(body, "max_tokens", DEFAULT_COMPLETION_TOKENS, 1, UINT32_MAX)
    return call


def parse_chat(body: dict, served_model: str) -> Call:
    _check_fields(body, CHAT_FIELDS, UNSUPPORTED_CHAT)
    call = _parse_common(body, served_model, chat=True, id_prefix="chatcmpl-")
    call.messages = _messages(body.get("messages"))
    if body.get("max_tokens") is not None and body.get("max_completion_tokens") is not None:
        raise bad("give max_tokens or max_completion_tokens, not both", "max_completion_tokens")
    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    call.names = {**CHAT_NAMES, "max_new_tokens": name}
    call.max_tokens_given = body.get(name) is not None
    if call.max_tokens_given:
        call.request.max_new_tokens = _integer(body, name, None, 1, UINT32_MAX)
    return call


def _parse_common(body: dict, served_model: str, chat: bool, id_prefix: str) -> Call:
    model = body.get("model")
    if model is not None and model != served_model:
        raise ApiError(
            404, f"The model `{model}` does not exist: this server serves `{served_model}`", "model", "model_not_found"
        )
    request = specpipe_pb2.GenerateRequest(
        request_id=id_prefix + uuid.uuid4().hex,
        temperature=_number(body, "temperature", DEFAULT_TEMPERATURE),
        top_p=_number(body, "top_p", 1.0),
        top_k=max(0, _integer(body, "top_k", 0, TOP_K_OFF, UINT32_MAX)),
        stop=_stop(body.get("stop")),
        mode=_mode(body.get("mode")),
        drafter_invariant=_boolean(body, "drafter_invariant", False),
    )
    seed = _integer(body, "seed", None, 0, UINT64_MAX)
    if seed is not None:
        request.seed = seed
    if body.get("user") is not None and not isinstance(body["user"], str):
        raise bad("user must be a string", "user")
    stream = _boolean(body, "stream", False)
    options = body.get("stream_options")
    if options is not None and not stream:
        raise bad("stream_options is only allowed with stream: true", "stream_options")
    if options is not None and (not isinstance(options, dict) or set(options) - {"include_usage"}):
        raise bad("stream_options may only hold include_usage", "stream_options")
    return Call(
        chat=chat,
        request=request,
        model=served_model,
        stream=stream,
        include_usage=_boolean(options or {}, "include_usage", False),
        names=CHAT_NAMES if chat else COMPLETION_NAMES,
    )


def _check_fields(body: dict, known: set[str], unsupported: dict[str, tuple]) -> None:
    unknown = [name for name in body if name not in known and name not in unsupported]
    if unknown:
        raise bad(f"Unrecognized request argument supplied: {', '.join(unknown)}", unknown[0], "unknown_parameter")
    refused = [
        name
        for name, noops in unsupported.items()
        if body.get(name) is not None and not any(_same(body[name], noop) for noop in noops)
    ]
    if refused:
        accepted = "; ".join(f"{name}: {' or '.join(map(repr, unsupported[name])) or 'null'}" for name in refused)
        raise bad(
            f"not supported by specpipe: {', '.join(refused)} (accepted only at the value that changes "
            f"nothing: {accepted})",
            refused[0],
            "unsupported_parameter",
        )


def _same(value, noop) -> bool:
    """Equal and of the same JSON type (so that `false` is not taken for `0`)."""
    return type(value) is type(noop) and value == noop


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _integer(body: dict, name: str, default, low: int, high: int):
    value = body.get(name)
    if value is None:
        return default
    if not _is_int(value) or not low <= value <= high:
        raise bad(f"{name} must be an integer in [{low}, {high}], got {value!r}", name)
    return value


def _number(body: dict, name: str, default: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise bad(f"{name} must be a number, got {value!r}", name)
    return value


def _boolean(body: dict, name: str, default: bool) -> bool:
    value = body.get(name, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise bad(f"{name} must be true or false, got {value!r}", name)
    return value


def _stop(stop) -> list[str]:
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise bad("stop must be a string or a list of strings", "stop")
    return stops


def _mode(mode) -> int:
    if mode is None:
        return specpipe_pb2.MODE_UNSPECIFIED
    if mode not in MODE_NAMES:
        raise bad(f"mode must be one of {', '.join(MODE_NAMES)}, got {mode!r}", "mode")
    return Mode(mode).proto


def _messages(messages) -> list[dict]:
    """Chat messages as a template takes them: role and content strings (text parts joined)."""
    if not isinstance(messages, list) or not messages:
        raise bad("messages is required: a non-empty list of {role, content} objects", "messages")
    rendered = []
    for index, message in enumerate(messages):
        where = f"messages[{index}]"
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise bad(f"{where} must be an object with a string role", "messages")
        extra = [key for key in message if key not in MESSAGE_FIELDS and message[key] is not None]
        if extra:
            raise bad(
                f"{where}.{extra[0]} is not supported (only role, content and name are)",
                "messages",
                "unsupported_parameter",
            )
        rendered.append(
            {key: message[key] for key in MESSAGE_FIELDS if message.get(key) is not None}
            | {"content": _content(message.get("content"), where)}
        )
    return rendered


def _content(content, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = [
            part.get("text") if isinstance(part, dict) and part.get("type") == "text" else None for part in content
        ]
        if all(isinstance(text, str) for text in texts):
            return "\n".join(texts)  # vLLM's joining of text parts
    raise bad(
        f"{where}.content must be a string or a list of text parts ({{type: text, text}}): other parts "
        "(images, audio, ...) are not supported",
        "messages",
    )


def render_chat(call: Call, tokenizer, template: str | None) -> str:
    """The messages as the prompt text the model expects, ending where the assistant's turn starts.
    `template`: the server's --chat-template, else the tokenizer's own."""
    if not template and not getattr(tokenizer, "chat_template", None):
        raise bad(
            "this model's tokenizer has no chat template, so /v1/chat/completions cannot render "
            "messages: start the server with --chat-template FILE, or use /v1/completions",
            "messages",
        )
    try:
        # chat_template=None: the tokenizer's own (transformers picks among named ones).
        return tokenizer.apply_chat_template(
            call.messages, chat_template=template or None, add_generation_prompt=True, tokenize=False
        )
    except jinja2.TemplateError as err:
        raise bad(f"the chat template cannot render these messages: {err}", "messages") from None


def max_tokens_for(prompt_tokens: int, context_length: int, cap: int) -> int:
    """Chat's default max_tokens: as many as fit the context, up to the server's cap (at least 1,
    so that a prompt that fills the context is refused by the servicer, naming it)."""
    return max(1, min(cap, context_length - prompt_tokens))


def api_error(err: Refused, call: Call) -> ApiError:
    """A servicer refusal as an HTTP error, its GenerateRequest field names turned into the client's."""
    names = call.names
    message = re.sub(r"\b(" + "|".join(names) + r")\b", lambda m: names[m.group(1)], str(err))
    leading = re.match(r"[a-z_]+", str(err))
    param = None
    if err.status == "INVALID_ARGUMENT" and leading and leading.group() in GENERATE_FIELDS:
        param = names.get(leading.group(), leading.group())
    return ApiError(HTTP_STATUS.get(err.status, 500), message, param)


# -- responses -------------------------------------------------------------------------------------
def stats_object(stats: specpipe_pb2.RequestStats) -> dict:
    """The request's speculation stats under the gRPC RequestStats names (mode as the `mode` field
    takes it)."""
    values = {
        field.name: list(getattr(stats, field.name)) if field.is_repeated else getattr(stats, field.name)
        for field in stats.DESCRIPTOR.fields
    }
    mode = Mode.from_proto(stats.mode)
    values["mode"] = mode.value if mode else ""
    return values


def usage_object(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def _envelope(call: Call, kind: str, choice: dict) -> dict:
    return {
        "id": call.request.request_id,
        "object": kind,
        "created": call.created,
        "model": call.model,
        "choices": [choice],
    }


def response_object(call: Call, responses: list, prompt_tokens: int) -> dict:
    """The whole answer of a request that was not streamed."""
    last = responses[-1]
    text = "".join(response.text for response in responses)
    choice = {"index": 0, "logprobs": None, "finish_reason": FINISH_REASONS[last.finish_reason]}
    if call.chat:
        choice["message"] = {"role": "assistant", "content": text}
    else:
        choice["text"] = text
    body = _envelope(call, "chat.completion" if call.chat else "text_completion", choice)
    body["usage"] = usage_object(prompt_tokens, last.stats.generated_tokens)
    body["specpipe"] = stats_object(last.stats)
    return body


def chunk_objects(call: Call, response: specpipe_pb2.GenerateResponse, first: bool) -> list[dict]:
    """The chunks to stream for one GenerateResponse: none for an empty one mid-stream; the last
    carries finish_reason and the `specpipe` stats."""
    finish = FINISH_REASONS.get(response.finish_reason)
    if not response.text and not finish and not (first and call.chat):
        return []
    choice = {"index": 0, "logprobs": None, "finish_reason": finish}
    if call.chat:
        choice["delta"] = ({"role": "assistant"} if first else {}) | {"content": response.text}
    else:
        choice["text"] = response.text
    chunk = _envelope(call, "chat.completion.chunk" if call.chat else "text_completion", choice)
    if finish:
        chunk["specpipe"] = stats_object(response.stats)
    return [chunk]


def usage_chunk(call: Call, prompt_tokens: int, last: specpipe_pb2.GenerateResponse) -> dict:
    """stream_options.include_usage: a last chunk with no choices and the usage (OpenAI's shape)."""
    chunk = _envelope(call, "chat.completion.chunk" if call.chat else "text_completion", {})
    chunk["choices"] = []
    chunk["usage"] = usage_object(prompt_tokens, last.stats.generated_tokens)
    return chunk
