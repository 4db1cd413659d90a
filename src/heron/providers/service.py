"""The rules of provider connections: unique names per workspace, what each kind needs, and
credentials that are encrypted on the way in and only decrypted for use. Services flush but never
commit."""

from __future__ import annotations

import enum
import json
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import TypeAlias, TypeVar

from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from heron.core.crypto import SecretBox
from heron.core.errors import Conflict, FieldError, ValidationFailed
from heron.core.ids import utcnow
from heron.providers.connection import ProviderConnection
from heron.providers.models import Provider, ProviderKind
from heron.providers.repository import ProviderRepository


class Unchanged(enum.Enum):
    """A field an update leaves as it is (unlike None, which clears it)."""

    token = 0


UNCHANGED = Unchanged.token
T = TypeVar("T")
Maybe: TypeAlias = T | Unchanged


@dataclass(frozen=True)
class ProviderFields:
    """What a create or update sets; on update, fields left UNCHANGED keep their value."""

    name: Maybe[str] = UNCHANGED
    kind: Maybe[ProviderKind] = UNCHANGED
    base_url: Maybe[str | None] = UNCHANGED
    api_key: Maybe[str | None] = UNCHANGED
    extra_headers: Maybe[dict[str, str] | None] = UNCHANGED
    timeout_seconds: Maybe[float] = UNCHANGED


def mask_api_key(key: str | None) -> str | None:
    """`sk-…abcd`: enough to tell keys apart, too little to use. Short keys show nothing."""
    if key is None:
        return None
    if len(key) < 12:
        return "********"
    return f"{key[:3]}…{key[-4:]}"


def decrypt_headers(box: SecretBox, token: str | None) -> dict[str, str]:
    if token is None:
        return {}
    headers: dict[str, str] = json.loads(box.decrypt(token))
    return headers


def connection_of(row: Provider, box: SecretBox) -> ProviderConnection:
    return ProviderConnection(
        name=row.name,
        kind=row.kind,
        base_url=row.base_url,
        api_key=box.decrypt_optional(row.api_key_encrypted),
        headers=decrypt_headers(box, row.headers_encrypted),
        timeout_seconds=row.timeout_seconds,
    )


async def connections(
    session: AsyncSession, workspace_id: uuid.UUID, box: SecretBox, names: Iterable[str]
) -> list[ProviderConnection]:
    """The named providers of a workspace, decrypted, for `ModelRuntime`. Unknown names are
    left out: the runtime reports them when a model reference names one."""
    rows = await ProviderRepository(session, workspace_id).by_names(set(names))
    return [connection_of(row, box) for row in rows]


async def create_provider(
    session: AsyncSession, workspace_id: uuid.UUID, box: SecretBox, fields: ProviderFields
) -> Provider:
    repo = ProviderRepository(session, workspace_id)
    assert isinstance(fields.name, str)
    assert isinstance(fields.kind, ProviderKind)
    row = Provider(name=fields.name, kind=fields.kind, timeout_seconds=60.0)
    _apply(row, box, fields)
    await _ensure_name_free(repo, fields.name)
    repo.add(row)
    await _flush(session, fields.name)
    return row


async def update_provider(
    session: AsyncSession,
    workspace_id: uuid.UUID,
    box: SecretBox,
    provider_id: uuid.UUID,
    fields: ProviderFields,
) -> Provider:
    repo = ProviderRepository(session, workspace_id)
    row = await repo.get_or_404(provider_id)
    if isinstance(fields.name, str) and fields.name != row.name:
        await _ensure_name_free(repo, fields.name)
    endpoint_changed = any(
        not isinstance(value, Unchanged) for value in (fields.kind, fields.base_url, fields.api_key)
    )
    _apply(row, box, fields)
    if endpoint_changed:  # the list came from another endpoint or account
        row.models = None
        row.models_checked_at = None
    await _flush(session, row.name)
    return row


async def record_models(
    session: AsyncSession, workspace_id: uuid.UUID, provider_id: uuid.UUID, models: list[str]
) -> datetime:
    """Remember the models a provider listed, to validate model names against later."""
    now = utcnow()
    row = await ProviderRepository(session, workspace_id).get(provider_id)
    if row is not None:  # else deleted while it was being checked
        row.models = models
        row.models_checked_at = now
        await session.flush()
    return now


def _apply(row: Provider, box: SecretBox, fields: ProviderFields) -> None:
    if not isinstance(fields.name, Unchanged):
        row.name = fields.name
    if not isinstance(fields.kind, Unchanged):
        row.kind = fields.kind
    if not isinstance(fields.base_url, Unchanged):
        row.base_url = fields.base_url
    if not isinstance(fields.api_key, Unchanged):
        row.api_key_encrypted = box.encrypt_optional(fields.api_key)
    if not isinstance(fields.extra_headers, Unchanged):
        headers = fields.extra_headers
        row.headers_encrypted = box.encrypt(json.dumps(headers)) if headers else None
    if not isinstance(fields.timeout_seconds, Unchanged):
        row.timeout_seconds = fields.timeout_seconds
    _check_kind_needs(row)


def _check_kind_needs(row: Provider) -> None:
    if row.kind == ProviderKind.openai_compatible and not row.base_url:
        raise _invalid("base_url", "An openai-compatible provider needs a base_url.")
    if row.kind != ProviderKind.openai_compatible and row.api_key_encrypted is None:
        raise _invalid("api_key", f"A {row.kind.value} provider needs an api_key.")


def _invalid(field: str, message: str) -> ValidationFailed:
    return ValidationFailed(
        f"body.{field}: {message}",
        errors=[FieldError(loc=["body", field], msg=message, type="value_error")],
    )


def _name_taken(name: str) -> Conflict:
    return Conflict(
        f"name: a provider named {name!r} already exists in this workspace.",
        errors=[FieldError(loc=["body", "name"], msg="already exists", type="unique")],
    )


async def _ensure_name_free(repo: ProviderRepository, name: str) -> None:
    if await repo.by_name(name) is not None:
        raise _name_taken(name)


async def _flush(session: AsyncSession, name: str) -> None:
    try:
        await session.flush()
    except IntegrityError:  # a concurrent request took the name
        raise _name_taken(name) from None
