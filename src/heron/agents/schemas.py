"""Request and response bodies of agents and their versions."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Any

from pydantic import Field, StringConstraints

from heron.agents.spec import AgentSpec
from heron.core.schemas import RequestModel, ResponseModel

AgentName = Annotated[
    str,
    StringConstraints(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9][A-Za-z0-9 ._-]*$"),
    Field(description="Unique in the workspace; letters, digits, space, `.`, `_`, `-`."),
]


class AgentCreate(AgentSpec):
    """An agent's name and its first draft."""

    name: AgentName


class AgentUpdate(RequestModel):
    """Changes to the draft: only the fields given change."""

    name: AgentName | None = None
    description: str | None = None
    instructions: str | None = None
    variables: dict[str, Any] | None = None
    model: str | None = None
    fallbacks: list[str] | None = None
    model_settings: dict[str, Any] | None = Field(
        None, description="Merged into the current settings key by key; `null` clears a key."
    )
    tools: list[str] | None = None
    approval: dict[str, str] | None = None
    output_schema: dict[str, Any] | None = None
    max_steps: int | None = None
    tags: list[str] | None = None
    metadata: dict[str, Any] | None = None


class AgentOut(ResponseModel):
    id: uuid.UUID
    name: str
    draft: AgentSpec
    latest_version: int | None = Field(description="The newest published version, if any.")
    archived_at: datetime | None
    created_at: datetime
    updated_at: datetime


class PublishRequest(RequestModel):
    note: Annotated[str, StringConstraints(max_length=2000)] = ""


class VersionOut(ResponseModel):
    number: int
    note: str
    spec: AgentSpec
    created_by: uuid.UUID | None
    created_at: datetime


class Change(ResponseModel):
    field: str
    before: Any = Field(alias="from", serialization_alias="from")
    after: Any = Field(alias="to", serialization_alias="to")


class VersionDiff(ResponseModel):
    agent_id: uuid.UUID
    from_version: str
    to_version: str
    changes: list[Change]


class ImportResult(ResponseModel):
    agent: AgentOut
    created: bool
    changed: bool = Field(description="The draft differs from what it was before the import.")
    published_version: int | None
