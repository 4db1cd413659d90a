"""HTTP endpoints of workspaces, members and API keys."""

from __future__ import annotations

import uuid

from fastapi import APIRouter, Request, status

from heron.core.auth import Admin, CallerDep, Reader, role_in_workspace
from heron.core.errors import Forbidden, problem_responses
from heron.core.pagination import Page, PageQuery, make_page
from heron.core.routing import JsonRoute
from heron.db.session import DbSession
from heron.files.service import delete_workspace_files
from heron.tenancy import service
from heron.tenancy.models import ApiKey, Membership, Role, User, Workspace
from heron.tenancy.repository import ApiKeyRepository, MembershipRepository, WorkspaceReader
from heron.tenancy.schemas import (
    ApiKeyCreate,
    ApiKeyCreated,
    ApiKeyOut,
    ApiKeyUpdate,
    MemberCreate,
    MemberOut,
    MemberUpdate,
    WorkspaceCreate,
    WorkspaceOut,
    WorkspaceUpdate,
)

router = APIRouter(
    prefix="/api",
    route_class=JsonRoute,
    responses=problem_responses(400, 401, 403, 404, 409, 413, 415, 422, 429),
)


def _workspace_out(workspace: Workspace, role: Role) -> WorkspaceOut:
    return WorkspaceOut(
        id=workspace.id,
        name=workspace.name,
        role=role,
        allow_private_network=workspace.allow_private_network,
        created_at=workspace.created_at,
        updated_at=workspace.updated_at,
    )


def _member_out(membership: Membership, user: User) -> MemberOut:
    return MemberOut(
        user_id=user.id,
        email=user.email,
        name=user.name,
        role=membership.role,
        created_at=membership.created_at,
    )


# Workspaces -----------------------------------------------------------------------------------


@router.get("/workspaces", tags=["workspaces"], summary="List the caller's workspaces")
async def list_workspaces(
    session: DbSession, caller: CallerDep, page: PageQuery
) -> Page[WorkspaceOut]:
    if caller.key is not None:
        workspace = await service.get_workspace(session, caller.key.workspace_id)
        after = page.after
        items = [] if after is not None and workspace.id <= after else [workspace]
        return Page(items=[_workspace_out(w, caller.key.role) for w in items], next_cursor=None)
    assert caller.user_id is not None
    rows = await WorkspaceReader(session).page_for_user(caller.user_id, page)
    return make_page(list(rows), page, lambda r: _workspace_out(*r), lambda r: r[0].id)


@router.post(
    "/workspaces",
    tags=["workspaces"],
    status_code=status.HTTP_201_CREATED,
    summary="Create a workspace owned by the caller",
)
async def create_workspace(
    session: DbSession, caller: CallerDep, body: WorkspaceCreate
) -> WorkspaceOut:
    if caller.user_id is None or (caller.key is not None and caller.key.role != Role.owner):
        raise Forbidden("Only a user, or an owner key acting for its user, can create workspaces.")
    workspace = await service.create_workspace(session, caller.user_id, body.name)
    return _workspace_out(workspace, Role.owner)


@router.get("/workspaces/{workspace_id}", tags=["workspaces"], summary="Get a workspace")
async def get_workspace(
    session: DbSession, caller: CallerDep, workspace_id: uuid.UUID
) -> WorkspaceOut:
    role = await role_in_workspace(session, caller, workspace_id)
    return _workspace_out(await service.get_workspace(session, workspace_id), role)


@router.patch(
    "/workspaces/{workspace_id}",
    tags=["workspaces"],
    summary="Rename a workspace or change its settings",
)
async def update_workspace(
    session: DbSession, caller: CallerDep, workspace_id: uuid.UUID, body: WorkspaceUpdate
) -> WorkspaceOut:
    role = await role_in_workspace(session, caller, workspace_id)
    if not role.at_least(Role.admin):
        raise Forbidden("Renaming a workspace needs the admin role or higher.")
    workspace = await service.get_workspace(session, workspace_id)
    if body.name is not None:
        workspace.name = body.name
    if body.allow_private_network is not None:
        workspace.allow_private_network = body.allow_private_network
    await session.flush()
    return _workspace_out(workspace, role)


@router.delete(
    "/workspaces/{workspace_id}",
    tags=["workspaces"],
    status_code=status.HTTP_204_NO_CONTENT,
    summary="Delete a workspace and everything in it",
)
async def delete_workspace(
    request: Request, session: DbSession, caller: CallerDep, workspace_id: uuid.UUID
) -> None:
    role = await role_in_workspace(session, caller, workspace_id)
    if role != Role.owner:
        raise Forbidden("Deleting a workspace needs the owner role.")
    await session.delete(await service.get_workspace(session, workspace_id))
    delete_workspace_files(session, request.app.state.blobs, workspace_id)


# Members --------------------------------------------------------------------------------------


@router.get("/members", tags=["members"], summary="List the members of the current workspace")
async def list_members(session: DbSession, principal: Reader, page: PageQuery) -> Page[MemberOut]:
    rows = await MembershipRepository(session, principal.workspace_id).page_with_users(page)
    return make_page(list(rows), page, lambda r: _member_out(*r), lambda r: r[0].id)


@router.post(
    "/members",
    tags=["members"],
    status_code=status.HTTP_201_CREATED,
    summary="Add a user to the current workspace",
)
async def add_member(session: DbSession, principal: Admin, body: MemberCreate) -> MemberOut:
    membership, user = await service.add_member(
        session, principal, body.email, body.role, name=body.name, password=body.password
    )
    return _member_out(membership, user)


@router.get("/members/{user_id}", tags=["members"], summary="Get a member")
async def get_member(session: DbSession, principal: Reader, user_id: uuid.UUID) -> MemberOut:
    return _member_out(*await service.get_member(session, principal, user_id))


@router.patch("/members/{user_id}", tags=["members"], summary="Change a member's role")
async def update_member(
    session: DbSession, principal: Admin, user_id: uuid.UUID, body: MemberUpdate
) -> MemberOut:
    return _member_out(*await service.change_member_role(session, principal, user_id, body.role))


@router.delete(
    "/members/{user_id}",
    tags=["members"],
    status_code=status.HTTP_204_NO_CONTENT,
    summary="Remove a member",
)
async def remove_member(session: DbSession, principal: Admin, user_id: uuid.UUID) -> None:
    await service.remove_member(session, principal, user_id)


# API keys -------------------------------------------------------------------------------------


@router.get("/keys", tags=["keys"], summary="List the API keys of the current workspace")
async def list_keys(session: DbSession, principal: Admin, page: PageQuery) -> Page[ApiKeyOut]:
    rows = await ApiKeyRepository(session, principal.workspace_id).page(page)
    return make_page(list(rows), page, ApiKeyOut.model_validate, lambda k: k.id)


@router.post(
    "/keys",
    tags=["keys"],
    status_code=status.HTTP_201_CREATED,
    summary="Create an API key (the key is shown only in this response)",
)
async def create_key(session: DbSession, principal: Admin, body: ApiKeyCreate) -> ApiKeyCreated:
    key, token = await service.create_api_key(
        session,
        principal.workspace_id,
        name=body.name,
        role=body.role,
        created_by=principal.user_id,
        grantor_role=principal.role,
        expires_at=body.expires_at,
    )
    return ApiKeyCreated(**ApiKeyOut.model_validate(key).model_dump(), key=token)


async def _key(session: DbSession, workspace_id: uuid.UUID, key_id: uuid.UUID) -> ApiKey:
    return await ApiKeyRepository(session, workspace_id).get_or_404(key_id)


@router.get("/keys/{key_id}", tags=["keys"], summary="Get an API key")
async def get_key(session: DbSession, principal: Admin, key_id: uuid.UUID) -> ApiKeyOut:
    return ApiKeyOut.model_validate(await _key(session, principal.workspace_id, key_id))


@router.patch("/keys/{key_id}", tags=["keys"], summary="Rename an API key")
async def update_key(
    session: DbSession, principal: Admin, key_id: uuid.UUID, body: ApiKeyUpdate
) -> ApiKeyOut:
    key = await _key(session, principal.workspace_id, key_id)
    key.name = body.name
    await session.flush()
    return ApiKeyOut.model_validate(key)


@router.post("/keys/{key_id}/revoke", tags=["keys"], summary="Revoke an API key")
async def revoke_key(session: DbSession, principal: Admin, key_id: uuid.UUID) -> ApiKeyOut:
    return ApiKeyOut.model_validate(
        await service.revoke_api_key(session, principal.workspace_id, key_id)
    )


@router.delete(
    "/keys/{key_id}",
    tags=["keys"],
    status_code=status.HTTP_204_NO_CONTENT,
    summary="Delete an API key",
)
async def delete_key(session: DbSession, principal: Admin, key_id: uuid.UUID) -> None:
    repo = ApiKeyRepository(session, principal.workspace_id)
    await repo.delete(await repo.get_or_404(key_id))
