"""The OpenAI wire format: request bodies, error bodies and response shapes.

Pure data and validation; `app.py` holds the routes and talks to the engine.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

# Below this temperature sampling is numerically greedy (logits / T overflow); vLLM uses the same cut.
GREEDY_TEMPERATURE = 1e-5
COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions


# -- errors ------------------------------------------------------------------------------------------
class APIError(Exception):
    """An error answered with OpenAI's body: {"error": {"message", "type", "param", "code"}}."""

    def __init__(
        self, status: int, message: str, *, param: str | None = None, code: str | None = None,
        type: str = "invalid_request_error",
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class EngineGone(Exception):
    """The engine died while a request was waiting for it."""


def engine_unavailable(reason: str) -> APIError:
    return APIError(503, f"the engine is not serving: {reason}", type="server_error", code="engine_unavailable")


def first_line(error: BaseException | None) -> str:
    """Transport errors (gloo) run over many lines; users get the first."""
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


# -- request bodies -----------------------------------------------------------------------------------
class StreamOptions(BaseModel):
    include_usage: bool = False


class RequestBody(BaseModel):
    """Fields shared by /v1/completions and /v1/chat/completions; unknown fields are ignored."""

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    model: str
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = Field(default=None, description="extension: 0 or -1 turns it off")
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=0, lt=2**63)
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = Field(default=False, description="extension: keep generating past end-of-sequence")
    n: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None

    def unsupported(self) -> Iterator[tuple[str, str]]:
        """(param, why) for each field set to something the engine cannot do."""
        if self.n not in (None, 1):
            yield "n", "n > 1 is not supported (one choice per request); send n requests instead"
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                yield name, f"{name} is not supported; leave it at 0"
        if self.logit_bias:
            yield "logit_bias", "logit_bias is not supported; leave it out"
        if self.stream_options is not None and not self.stream:
            yield "stream_options", "stream_options is only allowed with stream: true"

    def requested_max_tokens(self) -> tuple[int | None, str]:
        """The output limit asked for, and the field that asked."""
        return self.max_tokens, "max_tokens"


class CompletionRequest(RequestBody):
    prompt: str | list[int] | list[str] | list[list[int]]
    best_of: int | None = None
    echo: bool = False
    logprobs: int | None = None
    suffix: str | None = None

    def unsupported(self) -> Iterator[tuple[str, str]]:
        yield from super().unsupported()
        if self.best_of not in (None, 1):
            yield "best_of", "best_of > 1 is not supported; leave it out"
        if self.echo:
            yield "echo", "echo is not supported; prepend the prompt yourself"
        if self.logprobs is not None:
            yield "logprobs", "logprobs are not supported; leave them out"
        if self.suffix:
            yield "suffix", "suffix (insertion) is not supported; leave it out"


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ChatCompletionRequest(RequestBody):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    response_format: dict[str, Any] | None = None

    def unsupported(self) -> Iterator[tuple[str, str]]:
        yield from super().unsupported()
        if self.logprobs or self.top_logprobs:
            yield "logprobs", "logprobs are not supported; leave them out"
        if self.tools:
            yield "tools", "tools (function calling) are not supported; leave them out"
        if self.tool_choice not in (None, "none"):
            yield "tool_choice", "tool_choice is not supported; leave it out"
        if self.response_format and self.response_format.get("type", "text") != "text":
            yield "response_format", "only response_format {\"type\": \"text\"} is supported"

    def requested_max_tokens(self) -> tuple[int | None, str]:
        if self.max_completion_tokens is not None:
            return self.max_completion_tokens, "max_completion_tokens"
        return self.max_tokens, "max_tokens"


def usage_body(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict:
    """OpenAI's usage object; cached_tokens: prompt tokens read from the prefix cache."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


# Characters that str.splitlines() ends a line at and JSON leaves unescaped: clients that read a
# stream with it (httpx's aiter_lines) would cut an event in two, so they are sent escaped.
_LINE_BREAKING = str.maketrans({"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})


def sse(payload: dict | str) -> str:
    """One server-sent event: `data: <JSON>`, on a single line for every line splitter."""
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"), ensure_ascii=False)
    return f"data: {data.translate(_LINE_BREAKING)}\n\n"


# -- response shapes -----------------------------------------------------------------------------------
class Render:
    """Builds one endpoint's response bodies (full and streamed) for one request."""

    prefix = ""
    object_full = ""
    object_chunk = ""

    def __init__(self, model: str) -> None:
        self.id = f"{self.prefix}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model = model

    def _envelope(self, obj: str, choices: list, **extra) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": choices, **extra}

    def full(self, text: str, finish_reason: str | None, usage: dict) -> dict:
        return self._envelope(self.object_full, [self.full_choice(text, finish_reason)], usage=usage)

    def chunk(self, text: str, finish_reason: str | None, usage: bool) -> dict:
        extra = {"usage": None} if usage else {}
        return self._envelope(self.object_chunk, [self.chunk_choice(text, finish_reason)], **extra)

    def usage_chunk(self, usage: dict) -> dict:
        return self._envelope(self.object_chunk, [], usage=usage)

    def opening_chunks(self, usage: bool) -> list[dict]:
        return []

    def full_choice(self, text: str, finish_reason: str | None) -> dict:
        raise NotImplementedError

    def chunk_choice(self, text: str, finish_reason: str | None) -> dict:
        raise NotImplementedError


class CompletionRender(Render):
    prefix, object_full, object_chunk = "cmpl", "text_completion", "text_completion"

    def full_choice(self, text, finish_reason):
        return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}

    chunk_choice = full_choice


class ChatRender(Render):
    prefix, object_full, object_chunk = "chatcmpl", "chat.completion", "chat.completion.chunk"

    def full_choice(self, text, finish_reason):
        message = {"role": "assistant", "content": text}
        return {"index": 0, "message": message, "logprobs": None, "finish_reason": finish_reason}

    def chunk_choice(self, text, finish_reason):
        delta = {"content": text} if text else {}
        return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}

    def opening_chunks(self, usage):
        chunk = self.chunk("", None, usage)
        chunk["choices"][0]["delta"] = {"role": "assistant", "content": ""}
        return [chunk]


def validation_message(errors: list[dict]) -> tuple[str, str | None]:
    """One line from pydantic's errors, and the offending top-level parameter."""
    first = errors[0]
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    if first.get("type") == "json_invalid":
        return f"the request body is not valid JSON ({first.get('ctx', {}).get('error', 'parse error')})", None
    where = ".".join(loc)
    more = f" (and {len(errors) - 1} more problems)" if len(errors) > 1 else ""
    if not where:
        return f"the request body is invalid: {first.get('msg')}{more}", None
    return f"{where}: {first.get('msg')}{more}", loc[0]
