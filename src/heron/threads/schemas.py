"""Request and response bodies of threads and messages."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import Field, StringConstraints

from heron.core.schemas import RequestModel, ResponseModel

MetadataValue = str | int | float | bool | None


class ThreadCreate(RequestModel):
    metadata: Annotated[
        dict[Annotated[str, StringConstraints(max_length=64)], MetadataValue], Field(max_length=64)
    ] = Field(default_factory=dict)


class ThreadOut(ResponseModel):
    id: uuid.UUID
    metadata: dict[str, Any]
    created_at: datetime
    updated_at: datetime


class TextPart(RequestModel):
    type: Literal["text"] = "text"
    text: Annotated[str, StringConstraints(max_length=1_000_000, strip_whitespace=False)]


class MessageOut(ResponseModel):
    id: uuid.UUID
    thread_id: uuid.UUID
    run_id: uuid.UUID | None
    role: str
    parts: list[dict[str, Any]] = Field(
        description="`text`, `tool_call` (id, name, arguments) and `tool_result` (id, name, "
        "content, is_error) parts."
    )
    created_at: datetime
