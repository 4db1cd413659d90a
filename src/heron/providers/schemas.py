"""Request and response bodies of provider connections. Credentials go in, never out."""

from __future__ import annotations

import re
import uuid
from datetime import datetime
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import AfterValidator, Field, SecretStr, StringConstraints

from heron.core.schemas import RequestModel, ResponseModel
from heron.providers.models import ProviderKind

# No ':' in a name: a model reference is `provider-name:model-name`, split on the first colon.
ProviderName = Annotated[
    str,
    StringConstraints(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$"),
    Field(description="Unique in the workspace; agents name models as `<name>:<model>`."),
]

_HEADER_NAME = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]{1,128}$")
_RESERVED_HEADERS = {"authorization", "x-api-key", "x-goog-api-key", "host", "content-length"}


def _check_base_url(value: str) -> str:
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("must be an http:// or https:// URL with a host")
    if parts.username or parts.password:
        raise ValueError("must not carry credentials; use api_key or extra_headers")
    if parts.query or parts.fragment:
        raise ValueError("must not have a query or fragment")
    return value.rstrip("/")


def _check_headers(value: dict[str, str]) -> dict[str, str]:
    if len(value) > 32:
        raise ValueError("at most 32 headers")
    for name, header_value in value.items():
        if not _HEADER_NAME.match(name):
            raise ValueError(f"{name!r} is not a valid header name")
        if name.lower() in _RESERVED_HEADERS:
            raise ValueError(f"{name} is set by Heron; use api_key for credentials")
        if any(c in header_value for c in "\r\n\0") or len(header_value) > 8192:
            raise ValueError(f"the value of {name} must be one line of at most 8192 characters")
    return value


BaseUrl = Annotated[
    str,
    StringConstraints(min_length=1, max_length=2048),
    AfterValidator(_check_base_url),
    Field(
        description="Where the API is. Required for `openai-compatible` (e.g. "
        "`http://localhost:11434/v1` for Ollama); otherwise overrides the kind's public endpoint."
    ),
]
ApiKey = Annotated[
    SecretStr,
    Field(
        min_length=1,
        max_length=4096,
        description="Stored encrypted, never returned. Optional for `openai-compatible`.",
    ),
]
ExtraHeaders = Annotated[
    dict[str, str],
    AfterValidator(_check_headers),
    Field(description="Sent with every request to the provider. Stored encrypted."),
]
Timeout = Annotated[
    float, Field(gt=0, le=600, description="Seconds one request to the provider may take.")
]


class ProviderCreate(RequestModel):
    name: ProviderName
    kind: ProviderKind
    base_url: BaseUrl | None = None
    api_key: ApiKey | None = None
    extra_headers: ExtraHeaders = Field(default_factory=dict)
    timeout_seconds: Timeout = 60.0


class ProviderUpdate(RequestModel):
    """Only the fields given change; `null` clears `base_url`, `api_key` or `extra_headers`."""

    name: ProviderName | None = None
    kind: ProviderKind | None = None
    base_url: BaseUrl | None = None
    api_key: ApiKey | None = None
    extra_headers: ExtraHeaders | None = None
    timeout_seconds: Timeout | None = None


class ProviderOut(ResponseModel):
    id: uuid.UUID
    name: str
    kind: ProviderKind
    base_url: str | None
    api_key_masked: str | None = Field(
        description="The key's first 3 and last 4 characters (`sk-…abcd`); null without a key."
    )
    extra_header_names: list[str]
    timeout_seconds: float
    models: list[str] | None = Field(
        description="The models the provider listed when last asked; null if never asked."
    )
    models_checked_at: datetime | None
    created_at: datetime
    updated_at: datetime


class ProviderCheck(RequestModel):
    model: Annotated[str, StringConstraints(min_length=1, max_length=256)] | None = Field(
        None, description="Also send this model a one-token completion."
    )


CheckErrorCode = Literal[
    "bad_credentials", "unreachable", "timeout", "rate_limited", "unknown_model", "provider_error"
]


class CheckError(ResponseModel):
    code: CheckErrorCode
    message: str = Field(
        description="What went wrong, with the provider's own reason if it gave one."
    )
    status: int | None = Field(None, description="The provider's HTTP status, if it answered.")


class CheckResult(ResponseModel):
    ok: bool
    latency_ms: int = Field(description="How long the check's requests to the provider took.")
    models: list[str]
    error: CheckError | None


class ModelList(ResponseModel):
    models: list[str]
    live: bool = Field(
        description="True: the provider answered just now. False: it could not be reached and "
        "`models` is the list it gave at `checked_at` (empty if it never answered)."
    )
    checked_at: datetime | None
    error: CheckError | None = Field(description="Why the live listing failed, when it did.")
