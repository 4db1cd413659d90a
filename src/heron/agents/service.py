"""Agents: drafts, published versions, diffs, rollbacks, and YAML export/import.

Edits change the draft; `publish` freezes it as version N. Services flush but never commit.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import yaml
from pydantic import ValidationError
from sqlalchemy import ColumnElement, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from heron.agents.models import Agent, AgentVersion
from heron.agents.references import check_references
from heron.agents.spec import AgentSpec, diff_specs
from heron.core.auth import Principal
from heron.core.errors import BadRequest, Conflict, FieldError, NotFound, ValidationFailed
from heron.core.ids import utcnow
from heron.core.pagination import PageParams
from heron.db.repository import WorkspaceRepository

EXPORT_FORMAT = "agent/v1"
VersionRef = int | Literal["draft"]


class AgentRepository(WorkspaceRepository[Agent]):
    model = Agent
    noun = "agent"

    async def by_name(self, name: str) -> Agent | None:
        return await self.find_by(name=name)

    async def by_id_or_name(self, ref: str) -> Agent:
        """An agent named by its id or its name (as runs and the CLI do)."""
        agent: Agent | None = None
        with contextlib.suppress(ValueError):
            agent = await self.get(uuid.UUID(ref))
        agent = agent or await self.by_name(ref)
        if agent is None:
            raise NotFound(f"No agent with id or name {ref!r} in this workspace.")
        return agent

    async def listing(
        self, params: PageParams, *, include_archived: bool, tag: str | None
    ) -> Sequence[Agent]:
        where: list[ColumnElement[bool]] = []
        if not include_archived:
            where.append(Agent.archived_at.is_(None))
        rows = await self.page(params, *where)
        # Tags live in the JSON draft; filter here rather than with backend-specific JSON SQL.
        return [a for a in rows if tag is None or tag in a.draft.get("tags", [])]


class VersionRepository(WorkspaceRepository[AgentVersion]):
    model = AgentVersion
    noun = "agent version"

    async def number(self, agent_id: uuid.UUID, number: int) -> AgentVersion:
        version = await self.find_by(agent_id=agent_id, number=number)
        if version is None:
            raise NotFound(f"Agent {agent_id} has no version {number}.")
        return version

    async def of_agent(self, agent_id: uuid.UUID, params: PageParams) -> Sequence[AgentVersion]:
        return await self.page(params, AgentVersion.agent_id == agent_id)


def validate_spec(data: dict[str, Any], prefix: tuple[str | int, ...] = ("body",)) -> AgentSpec:
    """A spec from untrusted data, or a 422 whose errors name each bad field."""
    try:
        return AgentSpec.model_validate(data)
    except ValidationError as exc:
        errors = [
            FieldError(
                loc=[*prefix, *(p if isinstance(p, int) else str(p) for p in e["loc"])],
                msg=e["msg"],
                type=e["type"],
            )
            for e in exc.errors()
        ]
        first = errors[0]
        raise ValidationFailed(
            f"{'.'.join(str(p) for p in first.loc)}: {first.msg}", errors=errors
        ) from None


async def create_agent(
    session: AsyncSession, principal: Principal, name: str, spec: AgentSpec
) -> Agent:
    await check_references(session, principal.workspace_id, spec)
    agents = AgentRepository(session, principal.workspace_id)
    if await agents.by_name(name) is not None:
        raise Conflict(f"name: an agent named {name!r} already exists in this workspace.")
    agent = agents.add(Agent(name=name, draft=spec.model_dump(mode="json"), latest_version=0))
    await _flush_unique_name(session, name)
    return agent


async def update_agent(
    session: AsyncSession, principal: Principal, agent_id: uuid.UUID, changes: dict[str, Any]
) -> Agent:
    agents = AgentRepository(session, principal.workspace_id)
    agent = await agents.get_or_404(agent_id)
    name = changes.pop("name", None)
    if isinstance(changes.get("model_settings"), dict):
        # Settings merge key by key (null clears one); other fields are replaced whole.
        changes["model_settings"] = {
            **agent.draft.get("model_settings", {}),
            **changes["model_settings"],
        }
    if changes:
        spec = validate_spec({**agent.draft, **changes})
        await check_references(session, principal.workspace_id, spec)
        agent.draft = spec.model_dump(mode="json")
    if name is not None and name != agent.name:
        if await agents.by_name(name) is not None:
            raise Conflict(f"name: an agent named {name!r} already exists in this workspace.")
        agent.name = name
    agent.updated_at = utcnow()
    await _flush_unique_name(session, agent.name)
    return agent


async def _flush_unique_name(session: AsyncSession, name: str) -> None:
    try:
        await session.flush()
    except IntegrityError:  # a concurrent request took the name
        raise Conflict(f"name: an agent named {name!r} already exists in this workspace.") from None


async def publish(
    session: AsyncSession, principal: Principal, agent_id: uuid.UUID, note: str
) -> AgentVersion:
    agents = AgentRepository(session, principal.workspace_id)
    # Lock the agent row (PostgreSQL) so concurrent publishes get consecutive numbers.
    agent = await session.scalar(agents.select().where(Agent.id == agent_id).with_for_update())
    if agent is None:
        raise NotFound(f"No agent with id {agent_id} in this workspace.")
    spec = validate_spec(agent.draft, ("draft",))
    await check_references(session, principal.workspace_id, spec)
    agent.latest_version += 1
    version = VersionRepository(session, principal.workspace_id).add(
        AgentVersion(
            agent_id=agent.id,
            number=agent.latest_version,
            note=note,
            spec=spec.model_dump(mode="json"),
            created_by=principal.user_id,
        )
    )
    try:
        await session.flush()
    except IntegrityError:
        raise Conflict("Another publish of this agent happened at the same time; retry.") from None
    return version


def parse_version_ref(value: str) -> VersionRef:
    if value == "draft":
        return "draft"
    try:
        number = int(value)
    except ValueError:
        raise BadRequest(f"A version is a number or `draft`, not {value!r}.") from None
    if number < 1:
        raise BadRequest("Version numbers start at 1.")
    return number


async def spec_at(
    session: AsyncSession, workspace_id: uuid.UUID, agent: Agent, ref: VersionRef
) -> dict[str, Any]:
    if ref == "draft":
        return agent.draft
    version = await VersionRepository(session, workspace_id).number(agent.id, ref)
    return version.spec


async def diff(
    session: AsyncSession,
    workspace_id: uuid.UUID,
    agent_id: uuid.UUID,
    a: VersionRef,
    b: VersionRef,
) -> list[dict[str, Any]]:
    agent = await AgentRepository(session, workspace_id).get_or_404(agent_id)
    return diff_specs(
        await spec_at(session, workspace_id, agent, a),
        await spec_at(session, workspace_id, agent, b),
    )


async def restore(
    session: AsyncSession, principal: Principal, agent_id: uuid.UUID, number: int
) -> Agent:
    agent = await AgentRepository(session, principal.workspace_id).get_or_404(agent_id)
    version = await VersionRepository(session, principal.workspace_id).number(agent.id, number)
    agent.draft = dict(version.spec)
    agent.updated_at = utcnow()
    await session.flush()
    return agent


async def set_archived(
    session: AsyncSession, principal: Principal, agent_id: uuid.UUID, archived: bool
) -> Agent:
    agent = await AgentRepository(session, principal.workspace_id).get_or_404(agent_id)
    if archived and agent.archived_at is None:
        agent.archived_at = utcnow()
    elif not archived:
        agent.archived_at = None
    await session.flush()
    return agent


async def delete_or_archive(
    session: AsyncSession, principal: Principal, agent_id: uuid.UUID
) -> None:
    """Delete the agent, or archive it when runs refer to it: their history keeps its
    meaning (which agent, which version) and stays readable."""
    from heron.runs.models import Run

    agents = AgentRepository(session, principal.workspace_id)
    agent = await agents.get_or_404(agent_id)
    has_runs = await session.scalar(
        select(Run.id)
        .where(Run.workspace_id == principal.workspace_id, Run.agent_id == agent.id)
        .limit(1)
    )
    if has_runs is None:
        await agents.delete(agent)
    elif agent.archived_at is None:
        agent.archived_at = utcnow()
    await session.flush()


# Export and import -----------------------------------------------------------------------------


class _LiteralDumper(yaml.SafeDumper):
    """Multi-line strings (instructions) as `|` blocks, so exports diff well in git."""


def _str_representer(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_LiteralDumper.add_representer(str, _str_representer)


def export_yaml(name: str, spec: dict[str, Any]) -> str:
    document = {"heron": EXPORT_FORMAT, "name": name, **spec}
    return yaml.dump(document, Dumper=_LiteralDumper, sort_keys=False, allow_unicode=True)


def parse_import(text: str) -> tuple[str, dict[str, Any]]:
    """The name and spec of an export document; 400/422 for anything else."""
    try:
        # Anchors and aliases are refused: a few lines of them can expand to gigabytes.
        if any(
            isinstance(event, yaml.AliasEvent) for event in yaml.parse(text, Loader=yaml.SafeLoader)
        ):
            raise BadRequest("YAML aliases (*name) are not accepted in agent documents.")
        document = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise BadRequest(f"The document is not valid YAML{where}.") from None
    if not isinstance(document, dict):
        raise BadRequest("The document must be a mapping with `heron: agent/v1` and a `name`.")
    if document.get("heron") != EXPORT_FORMAT:
        raise ValidationFailed(
            f"heron: expected `{EXPORT_FORMAT}`, found {document.get('heron')!r}.",
            errors=[FieldError(loc=["heron"], msg=f"must be {EXPORT_FORMAT}", type="value_error")],
        )
    document.pop("heron")
    name = document.pop("name", None)
    if not isinstance(name, str) or not name.strip():
        raise ValidationFailed(
            "name: required.", errors=[FieldError(loc=["name"], msg="required", type="missing")]
        )
    return name.strip(), document


@dataclass(frozen=True)
class Imported:
    agent: Agent
    created: bool
    changed: bool
    published: AgentVersion | None


async def import_agent(
    session: AsyncSession, principal: Principal, text: str, *, publish_note: str | None
) -> Imported:
    """Create the agent or update its draft; optionally publish when the draft changed since
    the latest version (so redeploying the same file creates no new version)."""
    name, data = parse_import(text)
    spec = validate_spec(data, ())
    agents = AgentRepository(session, principal.workspace_id)
    agent = await agents.by_name(name)
    created = agent is None
    if agent is None:
        agent = await create_agent(session, principal, name, spec)
        changed = True
    else:
        await check_references(session, principal.workspace_id, spec)
        new_draft = spec.model_dump(mode="json")
        changed = new_draft != agent.draft
        if changed:
            agent.draft = new_draft
            agent.updated_at = utcnow()
        agent.archived_at = None
        await session.flush()
    published: AgentVersion | None = None
    if publish_note is not None:
        versions = VersionRepository(session, principal.workspace_id)
        latest = (
            await versions.number(agent.id, agent.latest_version) if agent.latest_version else None
        )
        if latest is None or latest.spec != agent.draft:
            published = await publish(session, principal, agent.id, publish_note)
        else:
            published = latest
    return Imported(agent=agent, created=created, changed=changed, published=published)
