"""Provider connections of a workspace. Credentials are stored only as SecretBox tokens."""

from __future__ import annotations

import enum
from datetime import datetime

from sqlalchemy import JSON, Enum, Float, String, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from heron.core.crypto import encrypted_column_info
from heron.db.base import WorkspaceOwned


class ProviderKind(enum.StrEnum):
    """The API a provider connection speaks."""

    openai = "openai"
    anthropic = "anthropic"
    google = "google"
    groq = "groq"
    mistral = "mistral"
    openrouter = "openrouter"
    openai_compatible = "openai-compatible"


_kind_type = Enum(
    ProviderKind,
    name="provider_kind",
    native_enum=False,
    length=32,
    validate_strings=True,
    values_callable=lambda kinds: [k.value for k in kinds],
)


class Provider(WorkspaceOwned):
    __tablename__ = "providers"
    __table_args__ = (UniqueConstraint("workspace_id", "name"),)

    name: Mapped[str] = mapped_column(String(64))
    kind: Mapped[ProviderKind] = mapped_column(_kind_type)
    # None: the kind's public endpoint (openai-compatible always has one).
    base_url: Mapped[str | None] = mapped_column(String(2048))
    api_key_encrypted: Mapped[str | None] = mapped_column(Text, info=encrypted_column_info())
    # A JSON object of header names to values, encrypted as a whole.
    headers_encrypted: Mapped[str | None] = mapped_column(Text, info=encrypted_column_info())
    timeout_seconds: Mapped[float] = mapped_column(Float, default=60.0)
    # The model ids the provider listed the last time it was asked (None: never asked).
    models: Mapped[list[str] | None] = mapped_column(JSON)
    models_checked_at: Mapped[datetime | None]
