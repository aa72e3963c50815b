"""The request bodies ``align serve`` accepts: OpenAI's, plus a per-request preference α.

Parsing is in two stages, both ending in a :class:`RequestError` (a 4xx with an OpenAI-style
JSON error body) for a bad request: the body must be a JSON object of the right field types
(pydantic), then its values must make sense for the served model (:func:`to_generation`: α on
the objectives' simplex, a prompt that fits the context, ``max_tokens`` ≥ 1, ...).

Extensions to OpenAI's fields (vLLM spells the last two the same way):

* ``preference``: α as ``{"objective": weight, ...}``, ``[w1, w2, ...]`` in the objectives'
  order, or ``"objective=w,..."``; the server's ``--preference`` when absent;
* ``ignore_eos``: decode past the end-of-sequence token (to ``max_tokens`` or a stop string);
* ``return_token_ids``: each choice also lists the ids of the tokens it generated.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from align.preference import Preference

MAX_STOP_STRINGS = 4


class RequestError(Exception):
    """A request refused: ``status`` and an OpenAI-style error (message, param, code), and
    the response's extra ``headers`` (``Retry-After`` of a 429, ...)."""

    def __init__(
        self,
        message: str,
        *,
        status: int = 400,
        param: str | None = None,
        code: str | None = None,
        kind: str = "invalid_request_error",
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.message, self.status, self.param, self.code, self.kind = (
            message,
            status,
            param,
            code,
            kind,
        )
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.kind,
                "param": self.param,
                "code": self.code,
            }
        }


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class _Body(BaseModel):
    # Fields of OpenAI's API that change nothing here (user, metadata, store, ...) are ignored.
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    # align's extensions
    preference: dict[str, float] | list[float] | str | None = None
    ignore_eos: bool = False
    return_token_ids: bool = False


class _TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[_TextPart] | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(_Body):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: list[Any] | None = None


class CompletionRequest(_Body):
    prompt: str | list[str]
    logprobs: int | None = None
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None


def parse_body(raw: bytes, schema: type[_Body]) -> _Body:
    """The request of ``raw`` (bytes of a JSON object), or a :class:`RequestError` saying
    what is wrong with it."""
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise RequestError(f"the request body is not valid JSON: {error}") from None
    if not isinstance(data, dict):
        raise RequestError(
            f"the request body must be a JSON object, got {type(data).__name__}"
        ) from None
    try:
        return schema.model_validate(data)
    except ValidationError as error:
        problems = []
        for item in error.errors():
            where = ".".join(str(p) for p in item["loc"]) or "body"
            problems.append(f"{where}: {item['msg']}")
        first = error.errors()[0]["loc"]
        raise RequestError(
            "invalid request: " + "; ".join(problems), param=str(first[0]) if first else None
        ) from None


@dataclass
class Generation:
    """What the scheduler needs to answer one request."""

    prompt_ids: list[int]
    preference: Preference
    max_tokens: int
    temperature: float = 0.0
    top_p: float | None = None
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False


def to_generation(request: _Body, served: Any, prompt_ids: list[int]) -> Generation:
    """Check a parsed request against the served model: a :class:`Generation`, or a
    :class:`RequestError` naming the bad field and value."""
    if request.model is not None and request.model != served.name:
        raise RequestError(
            f"the model {request.model!r} does not exist; this server serves {served.name!r}",
            status=404,
            param="model",
            code="model_not_found",
        )
    _refuse_unsupported(request)
    try:
        preference = (
            served.default_preference
            if request.preference is None
            else Preference.coerce(request.preference, served.objectives)
        )
    except ValueError as error:
        raise RequestError(
            f"bad preference: {error}. The served objectives are {list(served.objectives)}",
            param="preference",
        ) from None
    if preference.is_batched:
        raise RequestError(
            f"the preference must be one α for objectives {list(served.objectives)}, "
            f"got a batch of {len(preference)}",
            param="preference",
        )
    context = served.max_context
    if not prompt_ids:
        raise RequestError("the prompt is empty", param="prompt")
    if len(prompt_ids) >= context:
        raise RequestError(
            f"the prompt has {len(prompt_ids)} tokens; this model's context is {context} tokens, "
            "and the prompt must leave room for at least one new token",
            param="messages" if hasattr(request, "messages") else "prompt",
            code="context_length_exceeded",
        )
    room = context - len(prompt_ids)
    limits = [("max_tokens", request.max_tokens)]
    if isinstance(request, ChatCompletionRequest):  # the newer name comes first
        limits.insert(0, ("max_completion_tokens", request.max_completion_tokens))
    for label, given in limits:
        if given is not None and given < 1:
            raise RequestError(f"{label} must be >= 1, got {given}", param=label)
    name, max_tokens = next(((n, v) for n, v in limits if v is not None), ("max_tokens", None))
    if max_tokens is None:
        max_tokens = min(served.default_max_tokens, room)
    elif max_tokens > room:
        raise RequestError(
            f"this model's context is {context} tokens; the prompt has {len(prompt_ids)}, so "
            f"{name} can be at most {room}, got {max_tokens}",
            param=name,
            code="context_length_exceeded",
        )
    temperature = 1.0 if request.temperature is None else request.temperature
    if not 0 <= temperature <= 2:
        raise RequestError(f"temperature must be in [0, 2], got {temperature}", param="temperature")
    top_p = request.top_p
    if top_p is not None and not 0 < top_p <= 1:
        raise RequestError(f"top_p must be in (0, 1], got {top_p}", param="top_p")
    stop = [request.stop] if isinstance(request.stop, str) else list(request.stop or [])
    if len(stop) > MAX_STOP_STRINGS or any(not s for s in stop):
        raise RequestError(
            f"stop takes up to {MAX_STOP_STRINGS} non-empty strings, got {stop!r}", param="stop"
        )
    return Generation(
        prompt_ids=list(prompt_ids),
        preference=preference,
        max_tokens=int(max_tokens),
        temperature=float(temperature),
        top_p=None if top_p is None or top_p == 1 else float(top_p),
        seed=request.seed,
        stop=stop,
        ignore_eos=request.ignore_eos,
    )


def _refuse_unsupported(request: _Body) -> None:
    """Settings this server cannot honour are an error, not silently ignored."""
    if request.n != 1:
        raise RequestError(f"n must be 1 (one choice per request), got {request.n}", param="n")
    for name in ("presence_penalty", "frequency_penalty"):
        value = getattr(request, name)
        if value not in (None, 0, 0.0):
            raise RequestError(f"{name} is not supported, got {value}", param=name)
    if request.logit_bias:
        raise RequestError("logit_bias is not supported", param="logit_bias")
    if getattr(request, "logprobs", None) or getattr(request, "top_logprobs", None):
        raise RequestError("logprobs are not supported", param="logprobs")
    if getattr(request, "tools", None):
        raise RequestError("tools are not supported", param="tools")
    if getattr(request, "echo", False):
        raise RequestError("echo is not supported", param="echo")
    if (getattr(request, "best_of", None) or 1) != 1:
        raise RequestError("best_of must be 1", param="best_of")
    if getattr(request, "suffix", None):
        raise RequestError("suffix is not supported", param="suffix")
