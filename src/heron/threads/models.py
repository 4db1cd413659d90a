"""Threads: conversations with their messages, in order."""

from __future__ import annotations

import uuid
from typing import Any

from sqlalchemy import JSON, ForeignKey, Index, Integer, String
from sqlalchemy.orm import Mapped, mapped_column

from heron.db.base import WorkspaceOwned


class Thread(WorkspaceOwned):
    __tablename__ = "threads"

    # `metadata` is taken by SQLAlchemy's declarative base; the column keeps the API's name.
    meta: Mapped[dict[str, Any]] = mapped_column("metadata", JSON, default=dict)


class Message(WorkspaceOwned):
    """One message of a thread. `parts` is what the API shows (text, tool calls, tool results);
    `raw` is pydantic-ai's own form of the message, replayed as history to the model."""

    __tablename__ = "messages"
    __table_args__ = (Index("ix_messages_thread_seq", "thread_id", "seq", unique=True),)

    thread_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("threads.id", ondelete="CASCADE"))
    run_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("runs.id", ondelete="CASCADE"), index=True
    )
    seq: Mapped[int] = mapped_column(Integer)
    role: Mapped[str] = mapped_column(String(16))  # user | assistant | tool
    parts: Mapped[list[dict[str, Any]]] = mapped_column(JSON)
    raw: Mapped[dict[str, Any]] = mapped_column(JSON)
