"""A fake OpenAI API that speaks the real wire format, served for real on a loopback port.

Clients under test (the OpenAI SDK through pydantic-ai, Heron's connection check) talk to it over
HTTP exactly as they would to api.openai.com or Ollama, so the whole stack is exercised: SDK,
transport, retries, SSE parsing.

    fake = FakeOpenAI(api_key="sk-test-1234567890", models=["gpt-test"])
    fake.push(Reply(text="Hello!"))                          # answers the next chat completion
    fake.push(Reply.failure(503), Reply(text="after a retry"))
    async with fake.serve() as base_url:                     # "http://127.0.0.1:PORT/v1"
        ...
    assert len(fake.chat_requests) == 2
    assert fake.chat_requests[0].body["messages"][-1]["content"] == "Hi"

Endpoints:

- `GET /v1/models`: `{"object": "list", "data": [{"id": ..., "object": "model", ...}]}`.
  `fake.models_failure = Reply.failure(...)` makes it fail instead.
- `POST /v1/chat/completions`: answers the next scripted `Reply` (from `push()`), or what
  `fake.handler(request)` returns, or else `fake.default` (the text "ok"). Non-streaming answers
  are one `chat.completion` object; with `"stream": true` the answer is server-sent events,
  `data: {chat.completion.chunk}` lines ending with `data: [DONE]`: the role first, then text in
  `chunk_size` pieces, tool calls as deltas carrying their `index` (the first delta of a call
  has its `id`, `type` and function `name`, the arguments follow split across chunks), then the
  `finish_reason`, and a last chunk with `usage` and no choices when the request asked for
  `stream_options.include_usage`.

- `POST /v1/embeddings`: `{"object": "list", "data": [{"object": "embedding", "index": i,
  "embedding": [...]}], "model", "usage"}`, one vector per input, `embedding_vector(text, n)`:
  deterministic, not normalised, `n` = the request's `dimensions` or `fake.embedding_dimensions`.
  `fake.push_embeddings(Reply.failure(...))` fails the next embedding requests instead.

Failures: with `api_key` set, a request without `Authorization: Bearer <api_key>` gets OpenAI's
401 `invalid_api_key` error; a chat completion for a model not in `models` gets its 404
`model_not_found` (unless `strict_models=False`); `Reply.failure(status, ...)` answers any status
with an OpenAI-style error body (and `Retry-After` when given). `Reply.first_byte_delay` waits
before the response starts and `Reply.chunk_delay` between stream chunks; `Reply.abort_after`
drops the connection after that many stream chunks, as a crashing upstream would.

Every request is recorded in `fake.requests` (method, path, headers, parsed JSON body) before it
is answered, including rejected ones; a stream records whether it was sent in full (`completed`)
or the client went away first (`disconnected`).
"""

from __future__ import annotations

import asyncio
import hashlib
import inspect
import itertools
import json
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from conftest import serve

_ids = itertools.count(1)


@dataclass
class ToolCall:
    """A function call the model makes; `arguments` is a JSON string or an object to dump."""

    name: str
    arguments: str | dict[str, Any] = "{}"
    id: str = field(default_factory=lambda: f"call_{next(_ids):06d}")

    @property
    def arguments_json(self) -> str:
        return self.arguments if isinstance(self.arguments, str) else json.dumps(self.arguments)


@dataclass
class Reply:
    """One scripted answer to a chat completion (or, as `models_failure`, to the model list)."""

    text: str | None = None
    tool_calls: list[ToolCall] = field(default_factory=list)
    finish_reason: str | None = None  # default: "tool_calls" with tool calls, else "stop"
    model: str | None = None  # the model the answer claims; default: the one requested
    prompt_tokens: int = 11
    completion_tokens: int = 7
    # Streaming shape and timing.
    chunk_size: int = 4  # characters of text or arguments per chunk
    chunk_delay: float = 0.0  # seconds between chunks
    first_byte_delay: float = 0.0  # seconds before the response starts
    abort_after: int | None = None  # drop the connection after this many chunks
    # A failure instead of an answer.
    status: int = 200
    error: dict[str, Any] | None = None
    headers: dict[str, str] = field(default_factory=dict)

    @classmethod
    def failure(
        cls,
        status: int,
        message: str | None = None,
        *,
        type: str = "server_error",
        code: str | None = None,
        retry_after: float | None = None,
        first_byte_delay: float = 0.0,
    ) -> Reply:
        """An OpenAI-style error response: `{"error": {"message", "type", "param", "code"}}`."""
        headers = {"Retry-After": f"{retry_after:g}"} if retry_after is not None else {}
        return cls(
            status=status,
            error={
                "message": message or f"The fake server failed with {status}.",
                "type": type,
                "param": None,
                "code": code,
            },
            headers=headers,
            first_byte_delay=first_byte_delay,
        )

    @property
    def usage(self) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
        }

    def finish(self) -> str:
        return self.finish_reason or ("tool_calls" if self.tool_calls else "stop")


@dataclass
class RecordedRequest:
    method: str
    path: str
    headers: dict[str, str]
    body: Any
    raw: bytes = b""  # the body as sent
    completed: bool = False  # a stream: every chunk was sent
    disconnected: bool = False  # a stream: the client went away before the end

    @property
    def model(self) -> str | None:
        return self.body.get("model") if isinstance(self.body, dict) else None

    @property
    def stream(self) -> bool:
        return isinstance(self.body, dict) and bool(self.body.get("stream"))


Handler = Callable[[RecordedRequest], "Reply | Awaitable[Reply]"]


class FakeOpenAI:
    def __init__(
        self,
        *,
        api_key: str | None = None,
        models: list[str] | None = None,
        strict_models: bool = True,
    ) -> None:
        self.api_key = api_key
        self.models = list(models) if models is not None else ["gpt-test"]
        self.strict_models = strict_models
        self.replies: deque[Reply] = deque()
        self.handler: Handler | None = None
        self.default = Reply(text="ok")
        self.models_failure: Reply | None = None
        self.embedding_dimensions = 8
        self.embedding_failures: deque[Reply] = deque()
        self.requests: list[RecordedRequest] = []
        self.app = self._make_app()

    def push(self, *replies: Reply) -> None:
        """Answer the next chat completions with these, in order."""
        self.replies.extend(replies)

    def push_embeddings(self, *failures: Reply) -> None:
        """Answer the next embedding requests with these failures, in order."""
        self.embedding_failures.extend(failures)

    @property
    def chat_requests(self) -> list[RecordedRequest]:
        return [r for r in self.requests if r.path.endswith("/v1/chat/completions")]

    @property
    def embedding_requests(self) -> list[RecordedRequest]:
        return [r for r in self.requests if r.path == "/v1/embeddings"]

    @asynccontextmanager
    async def serve(self) -> AsyncIterator[str]:
        """Run on a loopback port; yield the base URL clients use (ending in `/v1`)."""
        async with serve(self.app) as url:
            yield f"{url}/v1"

    # The app ---------------------------------------------------------------------------------

    def _make_app(self) -> FastAPI:
        app = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)
        app.add_api_route("/v1/models", self._models, methods=["GET"])
        app.add_api_route("/v1/chat/completions", self._chat, methods=["POST"])
        # Groq's SDK posts its OpenAI-compatible chat completions under `/openai`.
        app.add_api_route("/openai/v1/chat/completions", self._chat, methods=["POST"])
        app.add_api_route("/v1/embeddings", self._embeddings, methods=["POST"])
        return app

    async def _record(self, request: Request) -> RecordedRequest:
        raw = await request.body()
        try:
            body: Any = json.loads(raw) if raw else None
        except ValueError:
            body = raw.decode(errors="replace")
        recorded = RecordedRequest(
            method=request.method,
            path=request.url.path,
            headers={k.lower(): v for k, v in request.headers.items()},
            body=body,
            raw=raw,
        )
        self.requests.append(recorded)
        return recorded

    def _unauthorized(self, recorded: RecordedRequest) -> Response | None:
        if self.api_key is None:
            return None
        given = recorded.headers.get("authorization", "")
        if given == f"Bearer {self.api_key}":
            return None
        shown = given.removeprefix("Bearer ")
        shown = f"{shown[:3]}***{shown[-4:]}" if len(shown) > 8 else "***"
        return _error(
            Reply.failure(
                401,
                f"Incorrect API key provided: {shown}. You can find your API key at "
                "https://platform.openai.com/account/api-keys.",
                type="invalid_request_error",
                code="invalid_api_key",
            )
        )

    async def _models(self, request: Request) -> Response:
        recorded = await self._record(request)
        if (denied := self._unauthorized(recorded)) is not None:
            return denied
        if self.models_failure is not None:
            await asyncio.sleep(self.models_failure.first_byte_delay)
            return _error(self.models_failure)
        return JSONResponse(
            {
                "object": "list",
                "data": [
                    {"id": m, "object": "model", "created": 1700000000, "owned_by": "fake"}
                    for m in self.models
                ],
            }
        )

    async def _chat(self, request: Request) -> Response:
        recorded = await self._record(request)
        if (denied := self._unauthorized(recorded)) is not None:
            return denied
        model = recorded.model or ""
        if self.strict_models and model not in self.models:
            return _error(
                Reply.failure(
                    404,
                    f"The model `{model}` does not exist or you do not have access to it.",
                    type="invalid_request_error",
                    code="model_not_found",
                )
            )
        reply = await self._next_reply(recorded)
        await asyncio.sleep(reply.first_byte_delay)
        if reply.status >= 400:
            return _error(reply)
        if recorded.stream:
            options = recorded.body.get("stream_options") or {}
            chunks = _stream_chunks(reply, model, include_usage=bool(options.get("include_usage")))
            return StreamingResponse(
                _sse(chunks, reply, recorded),
                media_type="text/event-stream",
                headers=reply.headers,
            )
        return JSONResponse(_completion(reply, model), headers=reply.headers)

    async def _embeddings(self, request: Request) -> Response:
        recorded = await self._record(request)
        if (denied := self._unauthorized(recorded)) is not None:
            return denied
        model = recorded.model or ""
        if self.strict_models and model not in self.models:
            return _error(
                Reply.failure(
                    404,
                    f"The model `{model}` does not exist or you do not have access to it.",
                    type="invalid_request_error",
                    code="model_not_found",
                )
            )
        if self.embedding_failures:
            failure = self.embedding_failures.popleft()
            await asyncio.sleep(failure.first_byte_delay)
            return _error(failure)
        inputs = recorded.body.get("input")
        texts = [inputs] if isinstance(inputs, str) else list(inputs or [])
        size = int(recorded.body.get("dimensions") or self.embedding_dimensions)
        return JSONResponse(
            {
                "object": "list",
                "data": [
                    {"object": "embedding", "index": i, "embedding": embedding_vector(text, size)}
                    for i, text in enumerate(texts)
                ],
                "model": model,
                "usage": {"prompt_tokens": len(texts), "total_tokens": len(texts)},
            }
        )

    async def _next_reply(self, recorded: RecordedRequest) -> Reply:
        if self.replies:
            return self.replies.popleft()
        if self.handler is not None:
            reply = self.handler(recorded)
            return await reply if inspect.isawaitable(reply) else reply
        return self.default


# The wire format -------------------------------------------------------------------------------


def embedding_vector(text: str, dimensions: int) -> list[float]:
    """The fake's embedding of `text`: a deterministic, non-normalised vector in [-1, 3)."""
    digest = hashlib.sha256(text.encode()).digest()
    while len(digest) < dimensions:
        digest += hashlib.sha256(digest).digest()
    return [digest[i] / 64 - 1 for i in range(dimensions)]


def _error(reply: Reply) -> JSONResponse:
    return JSONResponse({"error": reply.error}, status_code=reply.status, headers=reply.headers)


def _completion(reply: Reply, requested_model: str) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": reply.text, "refusal": None}
    if reply.tool_calls:
        message["tool_calls"] = [
            {
                "id": call.id,
                "type": "function",
                "function": {"name": call.name, "arguments": call.arguments_json},
            }
            for call in reply.tool_calls
        ]
    return {
        "id": f"chatcmpl-{next(_ids):06d}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": reply.model or requested_model,
        "choices": [
            {"index": 0, "message": message, "finish_reason": reply.finish(), "logprobs": None}
        ],
        "usage": reply.usage,
        "system_fingerprint": "fp_fake",
    }


def _pieces(text: str, size: int) -> list[str]:
    return [text[i : i + size] for i in range(0, len(text), max(size, 1))] or [""]


def _stream_chunks(reply: Reply, requested_model: str, *, include_usage: bool) -> list[Any]:
    completion_id = f"chatcmpl-{next(_ids):06d}"
    created = int(time.time())
    model = reply.model or requested_model

    def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {
            "id": completion_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "system_fingerprint": "fp_fake",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}],
        }
        if include_usage:
            body["usage"] = None
        return body

    chunks: list[Any] = [chunk({"role": "assistant", "content": ""})]
    if reply.text:
        chunks += [chunk({"content": piece}) for piece in _pieces(reply.text, reply.chunk_size)]
    for index, call in enumerate(reply.tool_calls):
        chunks.append(
            chunk(
                {
                    "tool_calls": [
                        {
                            "index": index,
                            "id": call.id,
                            "type": "function",
                            "function": {"name": call.name, "arguments": ""},
                        }
                    ]
                }
            )
        )
        chunks += [
            chunk({"tool_calls": [{"index": index, "function": {"arguments": piece}}]})
            for piece in _pieces(call.arguments_json, reply.chunk_size)
        ]
    chunks.append(chunk({}, reply.finish()))
    if include_usage:
        chunks.append(
            {
                "id": completion_id,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "system_fingerprint": "fp_fake",
                "choices": [],
                "usage": reply.usage,
            }
        )
    chunks.append("[DONE]")
    return chunks


class _Aborted(Exception):
    """Raised inside a stream to drop the connection mid-response."""


async def _sse(chunks: list[Any], reply: Reply, recorded: RecordedRequest) -> AsyncIterator[bytes]:
    try:
        for sent, item in enumerate(chunks):
            if reply.abort_after is not None and sent >= reply.abort_after:
                raise _Aborted(f"aborted after {sent} chunks")
            if sent and reply.chunk_delay:
                await asyncio.sleep(reply.chunk_delay)
            data = item if isinstance(item, str) else json.dumps(item)
            yield f"data: {data}\n\n".encode()
        recorded.completed = True
    except (asyncio.CancelledError, GeneratorExit):
        recorded.disconnected = True
        raise
