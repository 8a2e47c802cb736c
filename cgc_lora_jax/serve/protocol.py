"""OpenAI's request and response shapes: parsing with errors that name the field, and the JSON
the routes send back.

A bad request is a `RequestError` (HTTP 400 unless said otherwise) whose body is OpenAI's

    {"error": {"message": "...", "type": "invalid_request_error", "param": "max_tokens", "code": null}}

Parameters: model, prompt | messages, max_tokens (chat: max_completion_tokens too), temperature
(>= 0; 0 = greedy), top_p (0, 1], top_k (>= 0, or -1 = no limit), stop (a string or up to 4),
seed, n (1 only), stream, stream_options.include_usage, and vLLM's ignore_eos. Parameters this
server does not implement (logprobs, echo, best_of, suffix, penalties, logit_bias, tools) are a
400 when set to anything but their default, rather than silently ignored; other unknown fields
are ignored, as OpenAI's own server does.

    parsed = parse_completion(json.loads(body), vocab_size=65024)
    completion_body(gen, "cmpl-1")       # the response of a finished non-streamed request
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from cgc_lora_jax.serve.generation import Finished, RequestError, SamplingParams

MAX_STOP_STRINGS = 4  # OpenAI's limit
DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's max_tokens default for /v1/completions
_UNSUPPORTED = {  # parameter -> the values that mean "not used"
    "logprobs": (None, False, 0), "top_logprobs": (None, 0), "echo": (None, False), "best_of": (None, 1),
    "suffix": (None, ""), "presence_penalty": (None, 0), "frequency_penalty": (None, 0),
    "logit_bias": (None, {}), "tools": (None, []), "functions": (None, []),
}
_ROLES = ("system", "developer", "user", "assistant", "tool")


@dataclasses.dataclass(frozen=True)
class ParsedRequest:
    model: str
    prompt: Any  # completions: str | list[int]; chat: [{"role", "content": str}]
    max_tokens: int | None  # None: the rest of the context (chat) after the prompt
    params: SamplingParams  # max_tokens filled in by `with_max_tokens` once the prompt is known
    stream: bool
    include_usage: bool


def error_body(message: str, kind: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def error_type(status: int) -> str:
    return {401: "authentication_error", 404: "invalid_request_error", 429: "rate_limit_error"}.get(
        status, "invalid_request_error" if status < 500 else "server_error")


def _bad(param: str, why: str) -> RequestError:
    return RequestError(f"{param}: {why}", 400, None, param)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _int(body: dict, name: str, default, minimum: int | None = None):
    value = body.get(name)
    if value is None:
        return default
    if not _is_int(value):
        raise _bad(name, f"expected an integer, got {type(value).__name__} {value!r}")
    if minimum is not None and value < minimum:
        raise _bad(name, f"{value} is less than the minimum of {minimum}")
    return value


def _number(body: dict, name: str, default: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _bad(name, f"expected a number, got {type(value).__name__} {value!r}")
    return float(value)


def _bool(body: dict, name: str, default: bool = False) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise _bad(name, f"expected true or false, got {type(value).__name__} {value!r}")
    return value


def _common(body: Any, max_tokens_names: tuple[str, ...]) -> dict:
    if not isinstance(body, dict):
        raise RequestError(f"the request body must be a JSON object, got {type(body).__name__}")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _bad("model", "a model id (string) is required; GET /v1/models lists them")
    for name, defaults in _UNSUPPORTED.items():
        if name in body and body[name] not in defaults:
            raise _bad(name, "not supported by this server")
    if _int(body, "n", 1) != 1:
        raise _bad("n", "only n=1 is supported (one answer per request)")
    temperature = _number(body, "temperature", 1.0)
    if temperature < 0:
        raise _bad("temperature", f"{temperature} is less than the minimum of 0")
    top_p = _number(body, "top_p", 1.0)
    if not 0 < top_p <= 1:
        raise _bad("top_p", f"{top_p} is outside (0, 1]")
    top_k = _int(body, "top_k", 0, minimum=-1)
    stop = body.get("stop")
    stop = () if stop is None else (stop,) if isinstance(stop, str) else stop
    if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) and s for s in stop):
        raise _bad("stop", "expected a non-empty string or a list of non-empty strings")
    if len(stop) > MAX_STOP_STRINGS:
        raise _bad("stop", f"at most {MAX_STOP_STRINGS} stop strings, got {len(stop)}")
    max_tokens = None
    for name in max_tokens_names:
        max_tokens = _int(body, name, max_tokens, minimum=1)
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise _bad("stream_options", "expected an object")
    params = SamplingParams(max_tokens=max_tokens or 1, temperature=temperature, top_p=top_p,
                            top_k=max(top_k, 0), stop=tuple(stop), seed=_int(body, "seed", None),
                            ignore_eos=_bool(body, "ignore_eos"))
    return dict(model=model, max_tokens=max_tokens, params=params, stream=_bool(body, "stream"),
                include_usage=_bool(options or {}, "include_usage"))


def parse_completion(body: Any, vocab_size: int) -> ParsedRequest:
    """POST /v1/completions; the prompt is a non-empty string or token ids (one prompt)."""
    common = _common(body, ("max_tokens",))
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        if not prompt:
            raise _bad("prompt", "the prompt is empty")
    elif isinstance(prompt, list) and prompt and all(_is_int(t) for t in prompt):
        bad = [t for t in prompt if not 0 <= t < vocab_size]
        if bad:
            raise _bad("prompt", f"token ids {bad[:5]} are outside the vocabulary [0, {vocab_size})")
    elif isinstance(prompt, list) and len(prompt) > 1 and all(isinstance(p, (str, list)) for p in prompt):
        raise _bad("prompt", f"one prompt per request (got {len(prompt)}); send one request each")
    else:
        what = "empty" if prompt in (None, [], [[]]) else f"a {type(prompt).__name__}"
        raise _bad("prompt", f"expected a non-empty string or a list of token ids, got {what}")
    common["max_tokens"] = common["max_tokens"] or DEFAULT_COMPLETION_TOKENS
    return ParsedRequest(prompt=prompt, **common)


def _message_text(content, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for i, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise _bad(f"{where}.content[{i}]", 'only text parts {"type": "text", "text": "..."} are supported')
            texts.append(part["text"])
        return "".join(texts)
    raise _bad(f"{where}.content", f"expected a string or a list of text parts, got {type(content).__name__}")


def parse_chat(body: Any) -> ParsedRequest:
    """POST /v1/chat/completions; messages [{"role", "content"}], at least one with text."""
    common = _common(body, ("max_tokens", "max_completion_tokens"))
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _bad("messages", "expected a non-empty list of messages")
    parsed = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise _bad(where, f"expected an object, got {type(message).__name__}")
        if message.get("role") not in _ROLES:
            raise _bad(f"{where}.role", f"expected one of {', '.join(_ROLES)}, got {message.get('role')!r}")
        parsed.append({"role": message["role"], "content": _message_text(message.get("content"), where)})
    if not any(m["content"] for m in parsed):
        raise _bad("messages", "the messages hold no text: the prompt is empty")
    return ParsedRequest(prompt=parsed, **common)


def usage(finished: Finished) -> dict:
    return {"prompt_tokens": finished.prompt_tokens, "completion_tokens": finished.completion_tokens,
            "total_tokens": finished.prompt_tokens + finished.completion_tokens}


def completion_body(request_id: str, created: int, model: str, text: str, finished: Finished | None,
                    chunk: bool = False) -> dict:
    """A text_completion (or, with chunk, one streamed piece; finished None while it runs)."""
    choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finished and finished.reason}
    body = {"id": request_id, "object": "text_completion", "created": created, "model": model, "choices": [choice]}
    if not chunk and finished is not None:
        body["usage"] = usage(finished)
    return body


def chat_body(request_id: str, created: int, model: str, text: str | None, finished: Finished | None,
              chunk: bool = False, role: bool = False) -> dict:
    """A chat.completion, or one chat.completion.chunk (delta: the role first, then text)."""
    if chunk:
        delta = {"role": "assistant"} if role else ({"content": text} if text else {})
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finished and finished.reason}
        return {"id": request_id, "object": "chat.completion.chunk", "created": created, "model": model,
                "choices": [choice]}
    choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
              "finish_reason": finished.reason}
    return {"id": request_id, "object": "chat.completion", "created": created, "model": model,
            "choices": [choice], "usage": usage(finished)}
