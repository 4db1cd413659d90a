"""Logins: email and password in, short-lived access and refresh tokens out."""

from __future__ import annotations

import asyncio
from typing import Annotated

from fastapi import APIRouter, Depends, Request, Response
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from heron.auth.schemas import LoginRequest, RefreshRequest, TokenPair, WorkspaceRole
from heron.core.auth import Principal, enforce_rate_limit, get_principal
from heron.core.errors import Unauthorized, problem_responses
from heron.core.routing import JsonRoute
from heron.core.security import TokenSigner
from heron.db.session import DbSession
from heron.settings import Settings
from heron.tenancy import service
from heron.tenancy.models import Membership, User, Workspace
from heron.tenancy.schemas import CallerOut, UserOut

router = APIRouter(
    prefix="/api",
    tags=["auth"],
    route_class=JsonRoute,
    responses=problem_responses(400, 401, 413, 415, 422, 429),
)


def client_address(request: Request, settings: Settings) -> str:
    if settings.limits.trust_forwarded_for:
        forwarded = request.headers.get("x-forwarded-for")
        if forwarded:
            return forwarded.split(",")[0].strip()
    return request.client.host if request.client else "unknown"


async def _login_rate_limit(request: Request, response: Response) -> None:
    settings: Settings = request.app.state.settings
    await enforce_rate_limit(
        request,
        response,
        client_address(request, settings),
        rate=settings.limits.login_rate_per_minute / 60,
        burst=settings.limits.login_burst,
        policy="login",
    )


async def _token_pair(request: Request, session: AsyncSession, user: User) -> TokenPair:
    signer: TokenSigner = request.app.state.token_signer
    settings: Settings = request.app.state.settings
    access, _ = signer.issue(user.id, "access")
    refresh, _ = signer.issue(user.id, "refresh")
    rows = await session.execute(
        select(Workspace, Membership.role)
        .join(Membership, Membership.workspace_id == Workspace.id)
        .where(Membership.user_id == user.id)
        .order_by(Workspace.id)
    )
    return TokenPair(
        access_token=access,
        expires_in=settings.auth.access_token_seconds,
        refresh_token=refresh,
        refresh_expires_in=settings.auth.refresh_token_seconds,
        user=UserOut.model_validate(user),
        workspaces=[WorkspaceRole(id=w.id, name=w.name, role=r) for w, r in rows.all()],
    )


@router.post(
    "/auth/login",
    summary="Log in with email and password",
    dependencies=[Depends(_login_rate_limit)],
)
async def login(request: Request, session: DbSession, body: LoginRequest) -> TokenPair:
    user = await service.authenticate_user(session, body.email, body.password)
    if user is None:
        raise Unauthorized("Wrong email or password.")
    return await _token_pair(request, session, user)


@router.post(
    "/auth/refresh",
    summary="Exchange a refresh token for new tokens",
    dependencies=[Depends(_login_rate_limit)],
)
async def refresh(request: Request, session: DbSession, body: RefreshRequest) -> TokenPair:
    signer: TokenSigner = request.app.state.token_signer
    claims = await asyncio.to_thread(signer.verify, body.refresh_token, "refresh")
    if claims is None:
        raise Unauthorized("The refresh token is invalid or has expired.")
    user = await session.get(User, claims.user_id)
    if user is None or not user.is_active:
        raise Unauthorized("The refresh token's user no longer exists or is disabled.")
    return await _token_pair(request, session, user)


@router.get("/me", summary="Who the caller is and in which workspace it acts")
async def me(
    session: DbSession, principal: Annotated[Principal, Depends(get_principal)]
) -> CallerOut:
    user = await session.get(User, principal.user_id) if principal.user_id else None
    return CallerOut(
        user=UserOut.model_validate(user) if user else None,
        workspace_id=principal.workspace_id,
        role=principal.role,
        api_key_id=principal.caller.api_key_id,
    )
