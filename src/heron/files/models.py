"""Uploaded files: the metadata row; the bytes live in the blob store under the row's ids."""

from __future__ import annotations

import uuid

from sqlalchemy import BigInteger, ForeignKey, String
from sqlalchemy.orm import Mapped, mapped_column

from heron.db.base import WorkspaceOwned

NAME_MAX = 255


class File(WorkspaceOwned):
    __tablename__ = "files"

    # The client's file name, cleaned for display; never used to build a path.
    name: Mapped[str] = mapped_column(String(NAME_MAX))
    size: Mapped[int] = mapped_column(BigInteger)
    # Sniffed from the bytes, e.g. `application/pdf` or `text/markdown; charset=utf-8`.
    content_type: Mapped[str] = mapped_column(String(255))
    sha256: Mapped[str] = mapped_column(String(64))
    created_by: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("users.id", ondelete="SET NULL")
    )
