"""Asking a provider, for real, whether a connection works: list its models with the connection's
credentials and, when a model is named, have that model produce one token.

Failures are sorted into a few codes a person can act on (wrong key, wrong address, too slow, rate
limited, no such model, the provider's own fault), each with the provider's own reason when it sent
one. Nothing here knows about HTTP requests to Heron or the database.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import httpx
from pydantic_ai.direct import model_request
from pydantic_ai.exceptions import (
    ModelAPIError,
    ModelAuthenticationError,
    ModelConnectionError,
    ModelHTTPError,
    ModelNotFoundError,
    ModelRateLimitError,
    ModelRequestTimeout,
    ModelTimeoutError,
    UnexpectedModelBehavior,
    UserError,
)
from pydantic_ai.messages import ModelRequest
from pydantic_ai.settings import ModelSettings

from heron.providers.connection import ProviderConnection
from heron.providers.models import ProviderKind
from heron.providers.runtime import NO_RETRY, ModelRef, ModelRuntime

ErrorCode = Literal[
    "bad_credentials", "unreachable", "timeout", "rate_limited", "unknown_model", "provider_error"
]
ANTHROPIC_VERSION = "2023-06-01"
_MAX_PAGES = 20
_REASON_LIMIT = 500


@dataclass(frozen=True)
class CheckError:
    code: ErrorCode
    message: str
    status: int | None = None


@dataclass(frozen=True)
class CheckOutcome:
    ok: bool
    latency_ms: int
    models: list[str] = field(default_factory=list)
    error: CheckError | None = None
    listed: bool = False  # whether `models` is a fresh list from the provider


class ProviderFailure(Exception):
    def __init__(self, error: CheckError) -> None:
        super().__init__(error.message)
        self.error = error


async def list_models(connection: ProviderConnection) -> list[str]:
    """The ids of the models the provider offers, sorted. Raises ProviderFailure."""
    # The URL comes from a workspace admin and may well be private (Ollama on localhost, a vLLM
    # box on the LAN): reaching such addresses is what openai-compatible connections are for, so
    # there is deliberately no private-address filter here.
    async with httpx.AsyncClient(
        timeout=connection.timeout_seconds,
        headers=connection.headers,
        follow_redirects=False,
    ) as client:
        lister = _LISTERS[connection.kind]
        try:
            models = await lister(client, connection)
        except httpx.TimeoutException:
            raise ProviderFailure(
                CheckError(
                    "timeout",
                    f"{connection.endpoint} did not answer within "
                    f"{connection.timeout_seconds:g} s.",
                )
            ) from None
        except httpx.TransportError as exc:
            raise ProviderFailure(
                CheckError("unreachable", f"Cannot reach {connection.endpoint}: {_describe(exc)}")
            ) from None
    return sorted(set(models))


async def check_connection(connection: ProviderConnection, model: str | None) -> CheckOutcome:
    """List the models and, when `model` is given, ask that model for one token."""
    start = time.perf_counter()

    def elapsed() -> int:
        return round((time.perf_counter() - start) * 1000)

    try:
        models = await list_models(connection)
    except ProviderFailure as failure:
        return CheckOutcome(ok=False, latency_ms=elapsed(), error=failure.error)
    if model is not None:
        if model not in models:
            error = CheckError(
                "unknown_model", f"{connection.name} does not list a model named {model!r}."
            )
            return CheckOutcome(False, elapsed(), models, error, listed=True)
        try:
            await _one_token(connection, model)
        except (ModelAPIError, UnexpectedModelBehavior, UserError) as exc:
            error = classify_model_error(exc)
            return CheckOutcome(False, elapsed(), models, error, listed=True)
    return CheckOutcome(ok=True, latency_ms=elapsed(), models=models, listed=True)


async def _one_token(connection: ProviderConnection, model: str) -> None:
    # No retries: the check reports what the provider says on the first try.
    async with ModelRuntime([connection], retry=NO_RETRY) as runtime:
        await model_request(
            runtime.model(ModelRef(connection.name, model)),
            [ModelRequest.user_text_prompt("Reply with the single word OK.")],
            model_settings=ModelSettings(max_tokens=1),
        )


def classify_model_error(exc: ModelAPIError | UnexpectedModelBehavior | UserError) -> CheckError:
    """The check error for a failure pydantic-ai reported while calling a model."""
    if isinstance(exc, ModelHTTPError):
        reason = reason_from_body(exc.body) or f"HTTP {exc.status_code}"
        return CheckError(_code_for_status(exc.status_code), reason, exc.status_code)
    if isinstance(exc, ModelTimeoutError | ModelRequestTimeout):
        return CheckError("timeout", str(exc))
    if isinstance(exc, ModelConnectionError):
        return CheckError("unreachable", str(exc))
    if isinstance(exc, ModelAuthenticationError):
        return CheckError("bad_credentials", str(exc))
    if isinstance(exc, ModelRateLimitError):
        return CheckError("rate_limited", str(exc))
    if isinstance(exc, ModelNotFoundError):
        return CheckError("unknown_model", str(exc))
    return CheckError("provider_error", str(exc))


def reason_from_body(body: object) -> str | None:
    """The human-readable reason in a provider's error body, whatever its dialect:
    OpenAI and Groq `{"error": {"message"}}`, Anthropic `{"type": "error", "error": {...}}`,
    Google `{"error": {"message", "status"}}`, Mistral `{"message"}` or `{"detail"}`."""
    if isinstance(body, dict):
        for key in ("error", "message", "detail"):
            value = body.get(key)
            if isinstance(value, str) and value:
                return value[:_REASON_LIMIT]
            if isinstance(value, dict | list):
                found = reason_from_body(value)
                if found:
                    return found
    if isinstance(body, list):
        for item in body:
            found = reason_from_body(item)
            if found:
                return found
        return None
    if isinstance(body, dict):
        return None
    return str(body)[:_REASON_LIMIT] if body else None


# Listing ------------------------------------------------------------------------------------


def _code_for_status(status: int) -> ErrorCode:
    if status in (401, 403):
        return "bad_credentials"
    if status == 429:
        return "rate_limited"
    if status == 404:
        return "unknown_model"
    return "provider_error"


async def _get(client: httpx.AsyncClient, url: str, **kwargs: Any) -> Any:
    response = await client.get(url, **kwargs)
    if response.status_code >= 400:
        raise ProviderFailure(_listing_error(response))
    try:
        return response.json()
    except ValueError:
        raise ProviderFailure(
            CheckError(
                "provider_error",
                f"{url} answered {response.status_code} with something that is not JSON; "
                "is the base URL right?",
                response.status_code,
            )
        ) from None


def _listing_error(response: httpx.Response) -> CheckError:
    status = response.status_code
    try:
        reason = reason_from_body(response.json())
    except ValueError:
        reason = response.text.strip()[:_REASON_LIMIT] or None
    reason = reason or f"HTTP {status} {response.reason_phrase}".strip()
    if status == 404:
        # The model list itself is missing: the address is wrong, not a model name.
        return CheckError(
            "provider_error",
            f"{response.request.url.copy_with(query=None)} was not found ({reason}); "
            "check the base URL.",
            status,
        )
    if status == 429 and (retry_after := response.headers.get("retry-after")):
        reason = f"{reason} (retry after {retry_after} s)"
    return CheckError(_code_for_status(status), reason, status)


def _bearer(connection: ProviderConnection) -> dict[str, str]:
    return {"Authorization": f"Bearer {connection.api_key}"} if connection.api_key else {}


def _ids(payload: Any, key: str = "data", id_field: str = "id") -> list[str]:
    items = payload.get(key) if isinstance(payload, dict) else None
    if not isinstance(items, list):
        raise ProviderFailure(
            CheckError(
                "provider_error", f"The model list has no `{key}` array; is the base URL right?"
            )
        )
    return [str(item[id_field]) for item in items if isinstance(item, dict) and id_field in item]


async def _list_openai_style(
    client: httpx.AsyncClient, connection: ProviderConnection
) -> list[str]:
    prefix = {ProviderKind.groq: "/openai/v1", ProviderKind.mistral: "/v1"}.get(connection.kind, "")
    payload = await _get(
        client, f"{connection.endpoint}{prefix}/models", headers=_bearer(connection)
    )
    return _ids(payload)


async def _list_anthropic(client: httpx.AsyncClient, connection: ProviderConnection) -> list[str]:
    headers = {"x-api-key": connection.api_key or "", "anthropic-version": ANTHROPIC_VERSION}
    models: list[str] = []
    params: dict[str, str | int] = {"limit": 1000}
    for _ in range(_MAX_PAGES):
        payload = await _get(
            client, f"{connection.endpoint}/v1/models", headers=headers, params=params
        )
        models += _ids(payload)
        if not payload.get("has_more") or not payload.get("last_id"):
            break
        params = {"limit": 1000, "after_id": payload["last_id"]}
    return models


async def _list_google(client: httpx.AsyncClient, connection: ProviderConnection) -> list[str]:
    # The key goes in the x-goog-api-key header rather than `?key=`: a URL ends up in logs and
    # error messages, a header does not.
    headers = {"x-goog-api-key": connection.api_key or ""}
    models: list[str] = []
    params: dict[str, str | int] = {"pageSize": 1000}
    for _ in range(_MAX_PAGES):
        payload = await _get(
            client, f"{connection.endpoint}/v1beta/models", headers=headers, params=params
        )
        models += [name.removeprefix("models/") for name in _ids(payload, "models", "name")]
        token = payload.get("nextPageToken")
        if not token:
            break
        params = {"pageSize": 1000, "pageToken": token}
    return models


_LISTERS: dict[
    ProviderKind,
    Callable[[httpx.AsyncClient, ProviderConnection], Awaitable[list[str]]],
] = {
    ProviderKind.openai: _list_openai_style,
    ProviderKind.openrouter: _list_openai_style,
    ProviderKind.openai_compatible: _list_openai_style,
    ProviderKind.groq: _list_openai_style,
    ProviderKind.mistral: _list_openai_style,
    ProviderKind.anthropic: _list_anthropic,
    ProviderKind.google: _list_google,
}


def _describe(exc: httpx.TransportError) -> str:
    text = str(exc)
    return text if text else type(exc).__name__
