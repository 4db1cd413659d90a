"""Response bodies of files (uploads are multipart/form-data, read by the router)."""

from __future__ import annotations

import uuid
from datetime import datetime

from pydantic import Field

from heron.core.schemas import ResponseModel


class FileOut(ResponseModel):
    id: uuid.UUID
    name: str = Field(description="The uploaded file's name, cleaned for display.")
    size: int = Field(description="Bytes.")
    content_type: str = Field(
        description="Sniffed from the content, never taken from the client "
        "(`application/octet-stream` when unknown)."
    )
    sha256: str = Field(description="SHA-256 of the content, lowercase hex.")
    created_at: datetime
    created_by: uuid.UUID | None = Field(
        description="The user who uploaded it (null for operator keys or a deleted user)."
    )
