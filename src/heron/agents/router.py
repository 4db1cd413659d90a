"""HTTP endpoints of agents: CRUD of the draft, versions, diffs, rollback, export and import."""

from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import APIRouter, Query, Request, Response, status

from heron.agents import service
from heron.agents.models import Agent, AgentVersion
from heron.agents.schemas import (
    AgentCreate,
    AgentOut,
    AgentUpdate,
    Change,
    ImportResult,
    PublishRequest,
    VersionDiff,
    VersionOut,
)
from heron.agents.service import AgentRepository, VersionRepository
from heron.agents.spec import AgentSpec
from heron.core.auth import Reader, Writer
from heron.core.errors import UnsupportedMediaType, problem_responses
from heron.core.pagination import Page, PageQuery, make_page
from heron.core.routing import JsonRoute
from heron.db.session import DbSession

router = APIRouter(
    prefix="/api/agents",
    tags=["agents"],
    route_class=JsonRoute,
    responses=problem_responses(400, 401, 403, 404, 409, 413, 415, 422, 429),
)

YAML_TYPES = ("application/yaml", "application/x-yaml", "text/yaml", "text/x-yaml")


def agent_out(agent: Agent) -> AgentOut:
    return AgentOut(
        id=agent.id,
        name=agent.name,
        draft=AgentSpec.model_validate(agent.draft),
        latest_version=agent.latest_version or None,
        archived_at=agent.archived_at,
        created_at=agent.created_at,
        updated_at=agent.updated_at,
    )


def version_out(version: AgentVersion) -> VersionOut:
    return VersionOut(
        number=version.number,
        note=version.note,
        spec=AgentSpec.model_validate(version.spec),
        created_by=version.created_by,
        created_at=version.created_at,
    )


@router.post("", status_code=status.HTTP_201_CREATED, summary="Create an agent (its draft)")
async def create_agent(session: DbSession, principal: Writer, body: AgentCreate) -> AgentOut:
    spec = AgentSpec.model_validate(body.model_dump(exclude={"name"}))
    return agent_out(await service.create_agent(session, principal, body.name, spec))


@router.get("", summary="List agents")
async def list_agents(
    session: DbSession,
    principal: Reader,
    page: PageQuery,
    include_archived: Annotated[bool, Query(description="Include archived agents.")] = False,
    tag: Annotated[
        str | None, Query(max_length=64, description="Only agents with this tag.")
    ] = None,
) -> Page[AgentOut]:
    rows = await AgentRepository(session, principal.workspace_id).listing(
        page, include_archived=include_archived, tag=tag
    )
    return make_page(list(rows), page, agent_out, lambda a: a.id)


@router.post(
    "/import",
    summary="Create or update an agent from an exported YAML document",
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/yaml": {"schema": {"type": "string"}}},
        }
    },
)
async def import_agent(
    request: Request,
    session: DbSession,
    principal: Writer,
    publish: Annotated[bool, Query(description="Publish when the draft changed.")] = False,
    note: Annotated[str, Query(max_length=2000, description="Note of the published version.")] = "",
) -> ImportResult:
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media not in YAML_TYPES:
        raise UnsupportedMediaType(
            f"Send the agent document as application/yaml, not {media or 'nothing'}."
        )
    raw = await request.body()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise UnsupportedMediaType("The document must be UTF-8 text.") from None
    result = await service.import_agent(
        session, principal, text, publish_note=note if publish else None
    )
    return ImportResult(
        agent=agent_out(result.agent),
        created=result.created,
        changed=result.changed,
        published_version=result.published.number if result.published else None,
    )


@router.get("/{agent_id}", summary="Get an agent")
async def get_agent(session: DbSession, principal: Reader, agent_id: uuid.UUID) -> AgentOut:
    return agent_out(await AgentRepository(session, principal.workspace_id).get_or_404(agent_id))


@router.patch("/{agent_id}", summary="Change an agent's draft")
async def update_agent(
    session: DbSession, principal: Writer, agent_id: uuid.UUID, body: AgentUpdate
) -> AgentOut:
    changes = body.model_dump(exclude_unset=True)
    return agent_out(await service.update_agent(session, principal, agent_id, changes))


@router.delete(
    "/{agent_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    summary="Delete an agent (one that has runs is archived instead)",
)
async def delete_agent(session: DbSession, principal: Writer, agent_id: uuid.UUID) -> None:
    await service.delete_or_archive(session, principal, agent_id)


@router.post("/{agent_id}/archive", summary="Archive an agent (hidden from lists, kept)")
async def archive_agent(session: DbSession, principal: Writer, agent_id: uuid.UUID) -> AgentOut:
    return agent_out(await service.set_archived(session, principal, agent_id, True))


@router.post("/{agent_id}/unarchive", summary="Bring an archived agent back")
async def unarchive_agent(session: DbSession, principal: Writer, agent_id: uuid.UUID) -> AgentOut:
    return agent_out(await service.set_archived(session, principal, agent_id, False))


@router.post(
    "/{agent_id}/publish",
    status_code=status.HTTP_201_CREATED,
    summary="Freeze the draft as the next version",
)
async def publish_agent(
    session: DbSession, principal: Writer, agent_id: uuid.UUID, body: PublishRequest | None = None
) -> VersionOut:
    note = body.note if body else ""
    return version_out(await service.publish(session, principal, agent_id, note))


@router.get("/{agent_id}/versions", summary="List an agent's published versions")
async def list_versions(
    session: DbSession, principal: Reader, agent_id: uuid.UUID, page: PageQuery
) -> Page[VersionOut]:
    await AgentRepository(session, principal.workspace_id).get_or_404(agent_id)
    rows = await VersionRepository(session, principal.workspace_id).of_agent(agent_id, page)
    return make_page(list(rows), page, version_out, lambda v: v.id)


@router.get("/{agent_id}/versions/{number}", summary="Get one published version")
async def get_version(
    session: DbSession, principal: Reader, agent_id: uuid.UUID, number: int
) -> VersionOut:
    await AgentRepository(session, principal.workspace_id).get_or_404(agent_id)
    return version_out(
        await VersionRepository(session, principal.workspace_id).number(agent_id, number)
    )


@router.get(
    "/{agent_id}/versions/{a}/diff/{b}",
    summary="What changed from version a to version b (numbers or `draft`)",
)
async def diff_versions(
    session: DbSession, principal: Reader, agent_id: uuid.UUID, a: str, b: str
) -> VersionDiff:
    changes = await service.diff(
        session,
        principal.workspace_id,
        agent_id,
        service.parse_version_ref(a),
        service.parse_version_ref(b),
    )
    return VersionDiff(
        agent_id=agent_id,
        from_version=a,
        to_version=b,
        changes=[Change.model_validate(c) for c in changes],
    )


@router.post(
    "/{agent_id}/versions/{number}/restore",
    summary="Copy a published version into the draft (rollback: restore, then publish)",
)
async def restore_version(
    session: DbSession, principal: Writer, agent_id: uuid.UUID, number: int
) -> AgentOut:
    return agent_out(await service.restore(session, principal, agent_id, number))


@router.get(
    "/{agent_id}/export",
    summary="The agent as a self-contained YAML document (no secrets)",
    response_class=Response,
    responses={200: {"content": {"application/yaml": {"schema": {"type": "string"}}}}},
)
async def export_agent(
    session: DbSession,
    principal: Reader,
    agent_id: uuid.UUID,
    version: Annotated[str, Query(description="A version number, or `draft`.")] = "draft",
) -> Response:
    agent = await AgentRepository(session, principal.workspace_id).get_or_404(agent_id)
    spec = await service.spec_at(
        session, principal.workspace_id, agent, service.parse_version_ref(version)
    )
    return Response(
        service.export_yaml(agent.name, spec),
        media_type="application/yaml",
        headers={"Content-Disposition": f'attachment; filename="{agent.id}.yaml"'},
    )
