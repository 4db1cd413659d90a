"""Request and response bodies of runs, steps, approvals and usage."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import Field, StringConstraints

from heron.core.schemas import RequestModel, ResponseModel
from heron.runs.models import RunStatus
from heron.threads.schemas import TextPart

OnActiveRun = Literal["reject", "enqueue", "interrupt", "rollback"]


class RunCreate(RequestModel):
    agent: Annotated[str, StringConstraints(min_length=1, max_length=100)] = Field(
        description="The agent's id or name."
    )
    version: Annotated[int, Field(ge=1)] | Literal["draft"] | None = Field(
        None, description="A published version number, or `draft`; default the latest published."
    )
    input: (
        Annotated[str, StringConstraints(max_length=1_000_000, strip_whitespace=False)]
        | Annotated[list[TextPart], Field(min_length=1, max_length=64)]
    ) = Field(description="The user's message: text, or a list of parts.")
    variables: Annotated[
        dict[
            Annotated[str, StringConstraints(max_length=64)],
            Annotated[str, StringConstraints(max_length=100_000, strip_whitespace=False)],
        ],
        Field(max_length=64),
    ] = Field(default_factory=dict)
    stream: bool = Field(False, description="Answer with the run's event stream (SSE).")
    on_active_run: OnActiveRun = Field(
        "reject",
        description="When the thread has an active run: `reject` (409), `enqueue` after it, "
        "`interrupt` it, or `rollback` it (cancel and remove its messages).",
    )


class Approval(RequestModel):
    tool_call_id: Annotated[str, StringConstraints(min_length=1, max_length=128)]
    approve: bool
    reason: Annotated[str, StringConstraints(max_length=2000)] = Field(
        "", description="Told to the model when the call is denied."
    )
    arguments: dict[str, Any] | None = Field(
        None, description="Approve with these arguments instead of the model's."
    )


class ResumeRequest(RequestModel):
    decisions: Annotated[list[Approval], Field(min_length=1, max_length=64)]


class PendingCall(ResponseModel):
    tool_call_id: str
    name: str
    arguments: Any


class RunOut(ResponseModel):
    id: uuid.UUID
    thread_id: uuid.UUID
    agent_id: uuid.UUID
    agent_version: int | None
    status: RunStatus
    output: Any | None
    error_code: str | None
    error_message: str | None
    pending_approvals: list[PendingCall] | None
    input_tokens: int
    output_tokens: int
    model: str | None
    created_at: datetime
    started_at: datetime | None
    ended_at: datetime | None


class StepOut(ResponseModel):
    index: int
    kind: str
    name: str
    tool_call_id: str | None
    started_at: datetime
    duration_ms: float
    input_tokens: int
    output_tokens: int
    error: str | None


class UsageRow(ResponseModel):
    key: str
    runs: int
    steps: int
    input_tokens: int
    output_tokens: int


class UsageOut(ResponseModel):
    group_by: Literal["day", "agent", "model"]
    rows: list[UsageRow]
