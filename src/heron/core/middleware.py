"""ASGI middleware at the edge of every request: request ids, access logs and metrics, and the
size limits on headers and bodies. Pure ASGI, so streaming responses pass through untouched."""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Mapping
from typing import Any

import structlog
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from heron.core.errors import HeadersTooLarge, HeronError, PayloadTooLarge, problem_response
from heron.ops.metrics import HTTP_LATENCY, HTTP_REQUESTS

access_log = structlog.get_logger("heron.http")
_VALID_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
_QUIET_PATHS = {"/healthz", "/readyz", "/metrics"}


class RequestContextMiddleware:
    """Gives each request an id (taken from a well-formed `X-Request-ID` or generated),
    returns it, binds it to every log line, and records the access log and metrics."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = _incoming_request_id(scope) or uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        structlog.contextvars.bind_contextvars(request_id=request_id)
        status = 500
        started = time.perf_counter()

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = [h for h in message.get("headers", []) if h[0] != b"x-request-id"]
                headers.append((b"x-request-id", request_id.encode()))
                message["headers"] = headers
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            elapsed = time.perf_counter() - started
            route = scope.get("route")
            template = getattr(route, "path", None) or "<unmatched>"
            method = scope["method"]
            HTTP_REQUESTS.labels(method, template, str(status)).inc()
            HTTP_LATENCY.labels(method, template).observe(elapsed)
            log = access_log.debug if scope["path"] in _QUIET_PATHS else access_log.info
            log(
                "request",
                method=method,
                path=scope["path"],
                route=template,
                status=status,
                duration_ms=round(elapsed * 1000, 2),
                client=(scope.get("client") or ("-",))[0],
            )
            structlog.contextvars.unbind_contextvars("request_id")


def _incoming_request_id(scope: Scope) -> str | None:
    for name, value in scope["headers"]:
        if name == b"x-request-id":
            text = value.decode("latin-1")
            return text if _VALID_REQUEST_ID.match(text) else None
    return None


class SizeLimitMiddleware:
    """431 when the request headers exceed `max_header_bytes`; 413 when the body exceeds
    `max_body_bytes`, whether declared by Content-Length or discovered while streaming.

    `route_limits` gives a few exact (method, path) pairs a limit of their own, such as file
    uploads, which are far larger than any JSON body and are streamed by their handler."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        max_body_bytes: int,
        max_header_bytes: int,
        route_limits: Mapping[tuple[str, str], int] | None = None,
    ) -> None:
        self.app = app
        self.max_body = max_body_bytes
        self.max_headers = max_header_bytes
        self.route_limits = dict(route_limits or {})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        header_bytes = sum(len(k) + len(v) + 4 for k, v in scope["headers"])
        if header_bytes > self.max_headers:
            await _reject(
                scope,
                send,
                HeadersTooLarge(
                    f"The request headers take {header_bytes} bytes; the limit is "
                    f"{self.max_headers}."
                ),
            )
            return
        limit = self.route_limits.get((scope["method"], scope["path"]), self.max_body)
        declared = _content_length(scope)
        if declared is not None and declared > limit:
            await _reject(scope, send, _too_large(limit), close=True)
            return
        received = 0

        async def receive_limited() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    # FastAPI lets HTTPException out of body parsing; the error handler turns
                    # it into Problem Details.
                    raise StarletteHTTPException(413, _too_large(limit).detail)
            return message

        await self.app(scope, receive_limited, send)


def _too_large(limit: int) -> PayloadTooLarge:
    return PayloadTooLarge(f"The request body exceeds the limit of {limit} bytes.")


def _content_length(scope: Scope) -> int | None:
    for name, value in scope["headers"]:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


async def _reject(scope: Scope, send: Send, error: HeronError, *, close: bool = False) -> None:
    state: dict[str, Any] = scope.get("state", {})
    headers = {"Connection": "close"} if close else {}
    response = problem_response(
        state.get("request_id"),
        status=error.status,
        slug=error.slug,
        title=error.title,
        detail=error.detail,
        headers=headers,
    )

    async def no_body() -> Message:
        return {"type": "http.disconnect"}

    await response(scope, no_body, send)
