"""The OpenAI wire format: request bodies checked and turned into ``GenerationRequest``s, and the replies.

One concern: what goes over HTTP. Every bad field is an ``ApiError`` whose message names the field, the value
and the fix, sent as OpenAI's error object ``{"error": {"message", "type", "param", "code"}}``.
Defaults follow OpenAI's API where it has one (temperature 1, top_p 1); ``top_k`` and
``repetition_penalty`` are extensions with generate.py's meaning.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from gptmini.common import MAX_SEED, GptMiniError
from gptmini.data.chat_template import ChatTemplate, MessageError, check_messages, render
from gptmini.data.tokenizer import EOT
from gptmini.generation.sampling import SamplingOptions

MAX_STOPS = 4  # OpenAI's limit on stop strings
# Fields OpenAI defines that this server does not implement: refused when set, rather than ignored.
UNSUPPORTED = ("logprobs", "top_logprobs", "echo", "best_of", "suffix", "logit_bias", "tools", "functions")
ROLE_ALIASES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


class ApiError(Exception):
    """A request the server cannot serve: an HTTP status and OpenAI's error object."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        kind: str = "invalid_request_error",
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


@dataclass
class Limits:
    """What a request is checked against: the model's context and tokenizer, and the server's caps."""

    enc: Any  # tiktoken.Encoding
    block_size: int
    template: ChatTemplate  # the checkpoint's own (gptmini.data.chat_template.template_of)
    default_max_tokens: int
    max_tokens_cap: int


@dataclass
class GenerationRequest:
    """One request, checked: what the engine generates and how the reply is shaped."""

    chat: bool
    prompt_ids: list[int]
    options: SamplingOptions
    stop: list[str]
    seed: int | None
    stream: bool
    include_usage: bool


# ---------------------------------------------------------------------------------------------------------
# Requests
# ---------------------------------------------------------------------------------------------------------


def parse_json(raw: bytes) -> dict:
    """The body as a JSON object, or a 400."""
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as error:
        raise ApiError(400, f"the request body is not valid JSON ({error}); send a JSON object.") from None
    if not isinstance(body, dict):
        raise ApiError(400, f"the request body must be a JSON object, not {type(body).__name__}.")
    return body


def parse_completion(body: dict, limits: Limits) -> GenerationRequest:
    """A /v1/completions body: ``prompt`` is a string, or a list of token ids (or a list holding one)."""
    return _request(body, limits, chat=False, prompt_ids=_prompt_ids(body.get("prompt", ""), limits))


def parse_chat(body: dict, limits: Limits) -> GenerationRequest:
    """A /v1/chat/completions body: ``messages`` rendered with the checkpoint's chat template (the one it was
    trained with), followed by the opening of the assistant's reply; the reply also ends at the template's
    stop strings."""
    messages = _conversation(_messages(body.get("messages")))
    ids = render(limits.template, messages, limits.enc, add_generation_prompt=True).ids
    _check_fits(ids, limits, "messages")
    request = _request(body, limits, chat=True, prompt_ids=ids)
    request.stop = [*request.stop, *limits.template.stop]
    return request


def _request(body: dict, limits: Limits, chat: bool, prompt_ids: list[int]) -> GenerationRequest:
    for name in UNSUPPORTED:
        if body.get(name) not in (None, False, 0):
            raise ApiError(400, f"'{name}' is not supported by this server; leave it out.", param=name)
    for name in ("frequency_penalty", "presence_penalty"):
        if _number(body, name, 0.0) != 0:
            raise ApiError(
                400, f"'{name}' is not supported; use repetition_penalty (e.g. 1.2) instead.", param=name
            )
    n = _whole(body, "n", 1)
    if n != 1:
        raise ApiError(400, f"'n' must be 1 (one completion per request), got {n}.", param="n")
    options = _options(
        max_new_tokens=_max_tokens(body, limits),
        temperature=_number(body, "temperature", 1.0, low=0.0, hint="0 is greedy; try 0.8"),
        top_k=_top_k(body),
        top_p=_number(body, "top_p", 1.0, low=0.0, high=1.0, low_open=True, hint="1 turns it off"),
        repetition_penalty=_number(body, "repetition_penalty", 1.0, low=0.0, low_open=True, hint="1 is off"),
    )
    seed = _whole(body, "seed", None)
    if seed is not None and not 0 <= seed <= MAX_SEED:
        raise ApiError(400, f"'seed' must be in 0..{MAX_SEED}, got {seed}.", param="seed")
    stream = _boolean(body, "stream", False)
    stream_options = _typed(body, "stream_options", dict, "an object", None) or {}
    include_usage = _boolean(stream_options, "include_usage", False, where="stream_options.")
    return GenerationRequest(chat, prompt_ids, options, _stops(body), seed, stream, include_usage)


def _typed(body: dict, name: str, kind: type | tuple, what: str, default: Any, where: str = "") -> Any:
    """``body[name]`` if it has the type (null or absent: ``default``), else a 400 naming the field."""
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) and kind is not bool:
        ok = False  # JSON true is no number
    else:
        ok = isinstance(value, kind)
    if not ok:
        shown = json.dumps(value)[:60]
        raise ApiError(400, f"'{where}{name}' must be {what}, got {shown}.", param=f"{where}{name}")
    return value


def _number(
    body: dict,
    name: str,
    default: float,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    hint: str = "",
) -> float:
    value = float(_typed(body, name, (int, float), "a number", default))
    below = low is not None and (value <= low if low_open else value < low)
    if not math.isfinite(value) or below or (high is not None and value > high):
        bound = f"{'>' if low_open else '>='} {low:g}" if low is not None else "finite"
        bounds = bound + (f" and <= {high:g}" if high is not None else "")
        raise ApiError(
            400, f"'{name}' must be {bounds}, got {value:g}{'; ' + hint if hint else ''}.", param=name
        )
    return value


def _whole(body: dict, name: str, default: int | None) -> int | None:
    return _typed(body, name, int, "a whole number", default)


def _boolean(body: dict, name: str, default: bool, where: str = "") -> bool:
    return _typed(body, name, bool, "true or false", default, where)


def _max_tokens(body: dict, limits: Limits) -> int:
    """``max_completion_tokens`` (the newer name) or ``max_tokens``: 1 .. the server's cap."""
    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    value = _whole(body, name, limits.default_max_tokens)
    if value < 1:
        raise ApiError(400, f"'{name}' must be at least 1, got {value}.", param=name)
    if value > limits.max_tokens_cap:
        raise ApiError(
            400,
            f"'{name}' is {value}, above this server's cap of {limits.max_tokens_cap} (max_tokens_cap); "
            "ask for fewer tokens.",
            param=name,
        )
    return value


def _top_k(body: dict) -> int | None:
    value = _whole(body, "top_k", None)
    if value is None or value in (0, -1):  # 0 and -1 are how several clients say "no top-k"
        return None
    if value < 1:
        raise ApiError(400, f"'top_k' must be >= 1 (or 0 for no limit), got {value}.", param="top_k")
    return value


def _stops(body: dict) -> list[str]:
    value = body.get("stop")
    stops = [value] if isinstance(value, str) else value
    if stops is None:
        return []
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise ApiError(400, "'stop' must be a string or a list of strings.", param="stop")
    if len(stops) > MAX_STOPS:
        raise ApiError(
            400, f"'stop' holds {len(stops)} strings; at most {MAX_STOPS} are allowed.", param="stop"
        )
    return [s for s in stops if s]


def _prompt_ids(prompt: Any, limits: Limits) -> list[int]:
    """The prompt's token ids, encoded as generate.py encodes its prompt (an empty one is <|endoftext|>)."""
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one prompt
    if isinstance(prompt, str):
        ids = limits.enc.encode(prompt, allowed_special="all")
    elif isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        bad = [t for t in prompt if not 0 <= t < limits.enc.n_vocab]
        if bad:
            raise ApiError(
                400, f"'prompt' holds token id {bad[0]}, outside 0..{limits.enc.n_vocab - 1}.", param="prompt"
            )
        ids = list(prompt)
    else:
        raise ApiError(
            400,
            "'prompt' must be a string or a list of token ids (one prompt per request; send several "
            "requests at once instead, the server batches them).",
            param="prompt",
        )
    if not ids:
        ids = [limits.enc.encode_single_token(EOT)]  # generate.py's rule: start a new document
    _check_fits(ids, limits, "prompt")
    return ids


def _check_fits(ids: list[int], limits: Limits, param: str) -> None:
    if len(ids) > limits.block_size:
        raise ApiError(
            400,
            f"the prompt is {len(ids)} tokens, longer than this model's context of {limits.block_size} "
            "tokens; shorten it.",
            param=param,
            code="context_length_exceeded",
        )


def _messages(messages: Any) -> list[tuple[str, str]]:
    """``[(role, text), ...]``: system/developer, user and assistant turns with text content."""
    if not isinstance(messages, list) or not messages:
        raise ApiError(
            400, "'messages' must be a non-empty list of {role, content} objects.", param="messages"
        )
    turns = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise ApiError(400, f"'{where}' must be an object with role and content.", param=where)
        role = message.get("role")
        if role not in ROLE_ALIASES:
            raise ApiError(
                400,
                f"'{where}.role' is {json.dumps(role)}; use system, user or assistant.",
                param=f"{where}.role",
            )
        turns.append((ROLE_ALIASES[role], _content(message.get("content"), f"{where}.content")))
    return turns


def _conversation(messages: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """The turns checked as training checks them (a system message only first), else a 400 naming the one."""
    try:
        return check_messages(messages, where="'messages'")
    except MessageError as error:
        param = "messages" if error.index is None else f"messages[{error.index}]"
        raise ApiError(400, str(error), param=param) from None


def _content(content: Any, where: str) -> str:
    """A message's text: a string, or a list of ``{"type": "text", "text": ...}`` parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if (
                not isinstance(part, dict)
                or part.get("type") != "text"
                or not isinstance(part.get("text"), str)
            ):
                raise ApiError(
                    400, f"'{where}' may hold only text parts ({{type: text, text}}).", param=where
                )
            texts.append(part["text"])
        return "".join(texts)
    raise ApiError(400, f"'{where}' must be a string, got {json.dumps(content)[:60]}.", param=where)


def _options(**values: Any) -> SamplingOptions:
    """generate.py's SamplingOptions (its own checks are the backstop: the fields were checked above)."""
    try:
        return SamplingOptions(**values)
    except GptMiniError as error:
        raise ApiError(400, str(error)) from None


# ---------------------------------------------------------------------------------------------------------
# Replies
# ---------------------------------------------------------------------------------------------------------


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def reply(request_id: str, created: int, model: str, chat: bool, text: str, finish: str, used: dict) -> dict:
    """A whole (non-streaming) reply."""
    if chat:
        choice = {"index": 0, "message": {"role": "assistant", "content": text}}
    else:
        choice = {"index": 0, "text": text}
    choice.update(logprobs=None, finish_reason=finish)
    kind = "chat.completion" if chat else "text_completion"
    return {
        "id": request_id,
        "object": kind,
        "created": created,
        "model": model,
        "choices": [choice],
        "usage": used,
    }


def chunk(
    request_id: str,
    created: int,
    model: str,
    chat: bool,
    text: str | None,
    finish: str | None = None,
    used: dict | None = None,
    first: bool = False,
) -> dict:
    """One streamed piece; the last one carries ``finish_reason`` and ``usage``."""
    if chat:
        delta: dict = {} if text is None else {"content": text}
        if first:
            delta = {"role": "assistant", **delta}
        choice = {"index": 0, "delta": delta}
    else:
        choice = {"index": 0, "text": text or ""}
    choice.update(logprobs=None, finish_reason=finish)
    kind = "chat.completion.chunk" if chat else "text_completion"
    piece = {"id": request_id, "object": kind, "created": created, "model": model, "choices": [choice]}
    if used is not None:
        piece["usage"] = used
    return piece


def usage_chunk(request_id: str, created: int, model: str, chat: bool, used: dict) -> dict:
    """The extra last chunk of ``stream_options: {include_usage: true}``: no choices, only usage."""
    kind = "chat.completion.chunk" if chat else "text_completion"
    return {
        "id": request_id,
        "object": kind,
        "created": created,
        "model": model,
        "choices": [],
        "usage": used,
    }
