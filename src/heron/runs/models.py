"""Runs of an agent on a thread, their steps, and the events streamed from them."""

from __future__ import annotations

import enum
import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import JSON, Enum, ForeignKey, Index, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from heron.db.base import WorkspaceOwned


class RunStatus(enum.StrEnum):
    queued = "queued"
    running = "running"
    requires_action = "requires_action"
    completed = "completed"
    failed = "failed"
    cancelled = "cancelled"

    @property
    def is_active(self) -> bool:
        return self in (RunStatus.queued, RunStatus.running, RunStatus.requires_action)

    @property
    def is_final(self) -> bool:
        return not self.is_active


_status_type = Enum(RunStatus, name="run_status", native_enum=False, length=24)


class Run(WorkspaceOwned):
    __tablename__ = "runs"
    __table_args__ = (
        Index("ix_runs_thread_created", "thread_id", "created_at"),
        Index("ix_runs_status_lease", "status", "lease_expires_at"),
    )

    thread_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("threads.id", ondelete="CASCADE"))
    agent_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("agents.id", ondelete="RESTRICT"))
    agent_version: Mapped[int | None]  # None: the draft, as it was when the run was created
    spec: Mapped[dict[str, Any]] = mapped_column(JSON)  # the pinned agent definition
    status: Mapped[RunStatus] = mapped_column(_status_type, default=RunStatus.queued)
    input: Mapped[list[dict[str, Any]]] = mapped_column(JSON)
    variables: Mapped[dict[str, str]] = mapped_column(JSON, default=dict)
    output: Mapped[Any | None] = mapped_column(JSON)
    error_code: Mapped[str | None] = mapped_column(String(64))
    error_message: Mapped[str | None] = mapped_column(Text)
    pending_approvals: Mapped[list[dict[str, Any]] | None] = mapped_column(JSON)
    input_tokens: Mapped[int] = mapped_column(Integer, default=0)
    output_tokens: Mapped[int] = mapped_column(Integer, default=0)
    model: Mapped[str | None] = mapped_column(String(300))  # the model that answered last
    cancel_requested_at: Mapped[datetime | None]
    started_at: Mapped[datetime | None]
    ended_at: Mapped[datetime | None]
    # Which process executes the run, until when; a lapsed lease lets another take it over.
    lease_owner: Mapped[str | None] = mapped_column(String(128))
    lease_expires_at: Mapped[datetime | None]
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_event_seq: Mapped[int] = mapped_column(Integer, default=0)


class Step(WorkspaceOwned):
    """One model request or one tool call of a run."""

    __tablename__ = "run_steps"
    __table_args__ = (UniqueConstraint("run_id", "index"),)

    run_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"))
    index: Mapped[int] = mapped_column(Integer)
    kind: Mapped[str] = mapped_column(String(16))  # model | tool
    name: Mapped[str] = mapped_column(String(300))  # the model that answered, or the tool
    tool_call_id: Mapped[str | None] = mapped_column(String(128))
    started_at: Mapped[datetime]
    duration_ms: Mapped[float] = mapped_column(default=0.0)
    input_tokens: Mapped[int] = mapped_column(Integer, default=0)
    output_tokens: Mapped[int] = mapped_column(Integer, default=0)
    error: Mapped[str | None] = mapped_column(Text)


class RunEvent(WorkspaceOwned):
    """The persisted event log of a run: streams resume from it by event id."""

    __tablename__ = "run_events"
    __table_args__ = (UniqueConstraint("run_id", "seq"),)

    run_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"))
    seq: Mapped[int] = mapped_column(Integer)
    type: Mapped[str] = mapped_column(String(32))
    data: Mapped[dict[str, Any]] = mapped_column(JSON)
