"""Who is calling: API keys (bound to one workspace and role) and user sessions (JWT, with the
workspace chosen by the `Heron-Workspace` header). Dependencies for handlers:

- `CallerDep`: the authenticated caller, before any workspace is chosen;
- `Reader`, `Writer`, `Admin`, `Owner`: a principal in one workspace with at least that role.
"""

from __future__ import annotations

import functools
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Annotated

from fastapi import Depends, Request, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy import Select, bindparam, select, update

from heron.core.errors import BadRequest, Forbidden, NotFound, RateLimited, Unauthorized
from heron.core.ids import utcnow
from heron.core.ratelimit import RateLimiter
from heron.core.security import TokenSigner, api_key_matches, parse_api_key
from heron.db.session import DbSession, get_database, is_write_request
from heron.settings import Settings
from heron.tenancy.models import ApiKey, Membership, Role, User

WORKSPACE_HEADER = "Heron-Workspace"
_bearer = HTTPBearer(auto_error=False, description="An API key or an access token.")


@dataclass(frozen=True)
class KeyGrant:
    """What an API key grants: one role in one workspace."""

    id: uuid.UUID
    workspace_id: uuid.UUID
    role: Role


@dataclass(frozen=True)
class Caller:
    """An authenticated caller: a user (session token) or an API key acting for its creator."""

    user_id: uuid.UUID | None
    key: KeyGrant | None = None

    @property
    def api_key_id(self) -> uuid.UUID | None:
        return self.key.id if self.key else None

    @property
    def rate_key(self) -> str:
        return f"key:{self.key.id}" if self.key else f"user:{self.user_id}"


@dataclass(frozen=True)
class Principal:
    """A caller acting in one workspace with one role."""

    caller: Caller
    workspace_id: uuid.UUID
    role: Role

    @property
    def user_id(self) -> uuid.UUID | None:
        return self.caller.user_id


async def get_caller(
    request: Request,
    response: Response,
    session: DbSession,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Caller:
    if credentials is None or credentials.scheme.lower() != "bearer":
        raise Unauthorized("Send an API key or access token as `Authorization: Bearer <token>`.")
    token = credentials.credentials
    settings: Settings = request.app.state.settings
    prefix = parse_api_key(token)
    if prefix is not None:
        caller = await _caller_from_key(request, session, prefix, token, settings)
    else:
        signer: TokenSigner = request.app.state.token_signer
        claims = signer.verify(token, "access")
        if claims is None:
            raise Unauthorized("The token is invalid or has expired.")
        user = await session.get(User, claims.user_id)
        if user is None or not user.is_active:
            raise Unauthorized("The token's user no longer exists or is disabled.")
        caller = Caller(user_id=user.id)
    await enforce_rate_limit(
        request,
        response,
        caller.rate_key,
        rate=settings.limits.api_rate_per_second,
        burst=settings.limits.api_burst,
        policy="api",
    )
    return caller


_KeyRow = Select[
    uuid.UUID,  # id
    str,  # key_hash
    uuid.UUID,  # workspace_id
    Role,  # role
    uuid.UUID | None,  # created_by
    datetime | None,  # revoked_at
    datetime | None,  # expires_at
    datetime | None,  # last_used_at
    Role,  # creator_role
]


@functools.cache
def _key_and_creator_role() -> _KeyRow:
    """Built once, on first use (every request with an API key runs it). Columns, not an ORM
    object: loading one costs more than the query."""
    return (
        select(
            ApiKey.id,
            ApiKey.key_hash,
            ApiKey.workspace_id,
            ApiKey.role,
            ApiKey.created_by,
            ApiKey.revoked_at,
            ApiKey.expires_at,
            ApiKey.last_used_at,
            Membership.role.label("creator_role"),
        )
        .outerjoin(
            Membership,
            (Membership.workspace_id == ApiKey.workspace_id)
            & (Membership.user_id == ApiKey.created_by),
        )
        .where(ApiKey.prefix == bindparam("prefix"))
    )


async def _caller_from_key(
    request: Request, session: DbSession, prefix: str, token: str, settings: Settings
) -> Caller:
    # A key acts for its creator: with at most the creator's current role, and not at all once
    # the creator has left the workspace. Keys made by an operator (CLI) have no creator.
    key = (await session.execute(_key_and_creator_role(), {"prefix": prefix})).first()
    if key is None or not api_key_matches(key.key_hash, token):
        raise Unauthorized("The API key is not valid.")
    creator_role: Role | None = key.creator_role
    role: Role = key.role
    if key.created_by is not None:
        if creator_role is None:
            raise Unauthorized("The API key's creator is no longer a member of its workspace.")
        role = min(role, creator_role, key=lambda r: r.rank)
    now = utcnow()
    if key.revoked_at is not None:
        raise Unauthorized("The API key has been revoked.")
    if key.expires_at is not None and key.expires_at <= now:
        raise Unauthorized("The API key has expired.")
    resolution = timedelta(seconds=settings.auth.key_last_used_resolution_seconds)
    if key.last_used_at is None or now - key.last_used_at >= resolution:
        touch = update(ApiKey).where(ApiKey.id == key.id).values(last_used_at=now)
        if is_write_request(request):
            await session.execute(touch)
        else:
            # A read request keeps its read-only transaction; the write gets its own, short one.
            async with get_database(request).session(write=True) as writer, writer.begin():
                await writer.execute(touch)
    return Caller(user_id=key.created_by, key=KeyGrant(key.id, key.workspace_id, role))


async def enforce_rate_limit(
    request: Request, response: Response, key: str, *, rate: float, burst: int, policy: str
) -> None:
    limiter: RateLimiter = request.app.state.rate_limiter
    decision = await limiter.hit(f"{policy}:{key}", rate, burst)
    headers = decision.headers(policy, rate)
    if not decision.allowed:
        raise RateLimited(
            f"Rate limit exceeded; retry in {headers['Retry-After']} s.", headers=headers
        )
    response.headers.update(headers)


CallerDep = Annotated[Caller, Depends(get_caller)]


async def role_in_workspace(session: DbSession, caller: Caller, workspace_id: uuid.UUID) -> Role:
    """The caller's role in a workspace; NotFound when the caller can't see it at all."""
    if caller.key is not None:
        if caller.key.workspace_id != workspace_id:
            raise NotFound(f"No workspace with id {workspace_id}.")
        return caller.key.role
    role = await session.scalar(
        select(Membership.role).where(
            Membership.workspace_id == workspace_id, Membership.user_id == caller.user_id
        )
    )
    if role is None:
        raise NotFound(f"No workspace with id {workspace_id}.")
    return role


async def get_principal(request: Request, session: DbSession, caller: CallerDep) -> Principal:
    if caller.key is not None:
        return Principal(caller, caller.key.workspace_id, caller.key.role)
    chosen = request.headers.get(WORKSPACE_HEADER)
    if chosen:
        try:
            workspace_id = uuid.UUID(chosen)
        except ValueError:
            raise BadRequest(f"The {WORKSPACE_HEADER} header must be a workspace id.") from None
        return Principal(
            caller, workspace_id, await role_in_workspace(session, caller, workspace_id)
        )
    rows = (
        await session.execute(
            select(Membership.workspace_id, Membership.role)
            .where(Membership.user_id == caller.user_id)
            .limit(2)
        )
    ).all()
    if len(rows) != 1:
        raise BadRequest(
            f"Choose a workspace with the {WORKSPACE_HEADER} header"
            + (" (you belong to several)." if rows else " (you belong to none).")
        )
    return Principal(caller, rows[0][0], rows[0][1])


def require(minimum: Role) -> object:
    async def dependency(principal: Annotated[Principal, Depends(get_principal)]) -> Principal:
        if not principal.role.at_least(minimum):
            raise Forbidden(
                f"This needs the {minimum.value} role or higher; you are {principal.role.value}."
            )
        return principal

    return Depends(dependency)


Reader = Annotated[Principal, require(Role.viewer)]
Writer = Annotated[Principal, require(Role.member)]
Admin = Annotated[Principal, require(Role.admin)]
Owner = Annotated[Principal, require(Role.owner)]
