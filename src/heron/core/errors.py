"""Domain errors and their rendering as RFC 9457 Problem Details.

Every error a client sees is `application/problem+json` with a stable `type` (a URN naming the
problem), `title`, `status` and `detail`, plus the request id. Domain code raises a HeronError
subclass; HTTP code never builds error responses by hand.
"""

from __future__ import annotations

from collections.abc import Mapping
from http import HTTPStatus
from typing import Any, ClassVar

import structlog
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict
from starlette.exceptions import HTTPException as StarletteHTTPException

PROBLEM_JSON = "application/problem+json"
log = structlog.get_logger("heron.errors")


def problem_type(slug: str) -> str:
    return f"urn:heron:problem:{slug}"


class FieldError(BaseModel):
    loc: list[str | int]
    msg: str
    type: str


class Problem(BaseModel):
    """RFC 9457 Problem Details."""

    model_config = ConfigDict(extra="allow")

    type: str
    title: str
    status: int
    detail: str
    instance: str | None = None
    request_id: str | None = None
    errors: list[FieldError] | None = None


class HeronError(Exception):
    status: ClassVar[int] = 500
    slug: ClassVar[str] = "internal"
    title: ClassVar[str] = "Internal server error"

    def __init__(
        self,
        detail: str,
        *,
        headers: Mapping[str, str] | None = None,
        errors: list[FieldError] | None = None,
        **extra: Any,
    ) -> None:
        super().__init__(detail)
        self.detail = detail
        self.headers = dict(headers or {})
        self.errors = errors
        self.extra = extra


class BadRequest(HeronError):
    status, slug, title = 400, "bad-request", "Bad request"


class InvalidCursor(BadRequest):
    slug, title = "invalid-cursor", "Invalid cursor"


class Unauthorized(HeronError):
    status, slug, title = 401, "unauthorized", "Unauthorized"

    def __init__(self, detail: str, **extra: Any) -> None:
        super().__init__(detail, headers={"WWW-Authenticate": "Bearer"}, **extra)


class Forbidden(HeronError):
    status, slug, title = 403, "forbidden", "Forbidden"


class NotFound(HeronError):
    status, slug, title = 404, "not-found", "Not found"


class Conflict(HeronError):
    status, slug, title = 409, "conflict", "Conflict"


class PayloadTooLarge(HeronError):
    status, slug, title = 413, "payload-too-large", "Payload too large"


class UnsupportedMediaType(HeronError):
    status, slug, title = 415, "unsupported-media-type", "Unsupported media type"


class ValidationFailed(HeronError):
    status, slug, title = 422, "validation-error", "Validation failed"


class RateLimited(HeronError):
    status, slug, title = 429, "rate-limited", "Too many requests"


class HeadersTooLarge(HeronError):
    status, slug, title = 431, "headers-too-large", "Request header fields too large"


class ServiceUnavailable(HeronError):
    status, slug, title = 503, "unavailable", "Service unavailable"


def problem_response(
    request_id: str | None,
    *,
    status: int,
    slug: str,
    title: str,
    detail: str,
    headers: Mapping[str, str] | None = None,
    errors: list[FieldError] | None = None,
    **extra: Any,
) -> JSONResponse:
    body = Problem(
        type=problem_type(slug),
        title=title,
        status=status,
        detail=detail,
        request_id=request_id,
        errors=errors,
        **extra,
    ).model_dump(mode="json", exclude_none=True)
    all_headers = dict(headers or {})
    if request_id:
        all_headers["X-Request-ID"] = request_id
    return JSONResponse(body, status_code=status, headers=all_headers, media_type=PROBLEM_JSON)


def _request_id(request: Request) -> str | None:
    return getattr(request.state, "request_id", None)


async def _heron_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, HeronError)
    return problem_response(
        _request_id(request),
        status=exc.status,
        slug=exc.slug,
        title=exc.title,
        detail=exc.detail,
        headers=exc.headers,
        errors=exc.errors,
        **exc.extra,
    )


_HTTP_SLUGS = {
    400: "bad-request",
    401: "unauthorized",
    403: "forbidden",
    404: "not-found",
    405: "method-not-allowed",
    413: "payload-too-large",
    415: "unsupported-media-type",
}


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    status = exc.status_code
    title = HTTPStatus(status).phrase if status in HTTPStatus._value2member_map_ else "Error"
    detail = exc.detail if isinstance(exc.detail, str) else title
    if status == 404 and detail == "Not Found":
        detail = f"No route matches {request.method} {request.url.path}"
    elif status == 405:
        detail = f"{request.method} is not allowed on {request.url.path}"
    return problem_response(
        _request_id(request),
        status=status,
        slug=_HTTP_SLUGS.get(status, f"http-{status}"),
        title=title,
        detail=detail,
        headers=exc.headers,
    )


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    raw = list(exc.errors())
    if any(e.get("type") == "json_invalid" for e in raw):
        ctx = next(e.get("ctx", {}) for e in raw if e.get("type") == "json_invalid")
        return problem_response(
            _request_id(request),
            status=400,
            slug="malformed-json",
            title="Malformed JSON",
            detail=f"The request body is not valid JSON: {ctx.get('error', 'parse error')}",
        )
    errors = [
        FieldError(
            loc=[p if isinstance(p, int) else str(p) for p in e.get("loc", ())],
            msg=str(e.get("msg", "")),
            type=str(e.get("type", "")),
        )
        for e in raw
    ]
    first = errors[0] if errors else None
    where = ".".join(str(p) for p in first.loc) if first else "request"
    return problem_response(
        _request_id(request),
        status=422,
        slug="validation-error",
        title="Validation failed",
        detail=f"{where}: {first.msg}" if first else "The request is invalid",
        errors=errors,
    )


async def _unhandled(request: Request, exc: Exception) -> JSONResponse:
    request_id = _request_id(request)
    log.error("unhandled_error", exc_info=exc, path=request.url.path)
    return problem_response(
        request_id,
        status=500,
        slug="internal",
        title="Internal server error",
        detail=f"An unexpected error occurred; quote request id {request_id} when reporting it.",
    )


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(HeronError, _heron_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(Exception, _unhandled)


def problem_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` entries declaring Problem Details for the given statuses."""
    return {
        status: {
            "description": HTTPStatus(status).phrase,
            "content": {PROBLEM_JSON: {"schema": {"$ref": "#/components/schemas/Problem"}}},
        }
        for status in statuses
    }
