"""The rules of tenancy: who may grant which role, the last owner stays, keys are shown once.
Services flush (so constraint errors surface here) but never commit."""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from heron.core.auth import Principal
from heron.core.errors import Conflict, Forbidden, NotFound, ValidationFailed
from heron.core.ids import utcnow
from heron.core.security import generate_api_key, hash_password, verify_password
from heron.tenancy.models import ApiKey, Membership, Role, User, Workspace
from heron.tenancy.repository import (
    ApiKeyRepository,
    MembershipRepository,
    UserRepository,
    WorkspaceReader,
    normalize_email,
)


async def create_user(
    session: AsyncSession, email: str, password: str | None, name: str = ""
) -> User:
    email = normalize_email(email)
    if await UserRepository(session).by_email(email) is not None:
        raise Conflict(f"A user with email {email} already exists.")
    password_hash = await asyncio.to_thread(hash_password, password) if password else None
    user = User(email=email, name=name, password_hash=password_hash)
    session.add(user)
    try:
        await session.flush()
    except IntegrityError:  # a concurrent request created the same email
        raise Conflict(f"A user with email {email} already exists.") from None
    return user


async def set_password(session: AsyncSession, email: str, password: str) -> User:
    user = await UserRepository(session).by_email(email)
    if user is None:
        raise NotFound(f"No user with email {normalize_email(email)}.")
    user.password_hash = await asyncio.to_thread(hash_password, password)
    await session.flush()
    return user


async def authenticate_user(session: AsyncSession, email: str, password: str) -> User | None:
    user = await UserRepository(session).by_email(email)
    ok = await asyncio.to_thread(verify_password, user.password_hash if user else None, password)
    if user is None or not ok or not user.is_active:
        return None
    return user


async def create_workspace(session: AsyncSession, owner_id: uuid.UUID, name: str) -> Workspace:
    workspace = Workspace(name=name)
    session.add(workspace)
    await session.flush()
    MembershipRepository(session, workspace.id).add(Membership(user_id=owner_id, role=Role.owner))
    await session.flush()
    return workspace


async def get_workspace(session: AsyncSession, workspace_id: uuid.UUID) -> Workspace:
    workspace = await session.get(Workspace, workspace_id)
    if workspace is None:
        raise NotFound(f"No workspace with id {workspace_id}.")
    return workspace


async def add_member(
    session: AsyncSession,
    principal: Principal,
    email: str,
    role: Role,
    *,
    name: str = "",
    password: str | None = None,
) -> tuple[Membership, User]:
    _check_may_grant(principal, role)
    user = await UserRepository(session).by_email(email)
    if user is None:
        if password is None:
            raise ValidationFailed(
                f"No user has the email {normalize_email(email)}; give a password to create "
                "the account."
            )
        user = await create_user(session, email, password, name)
    members = MembershipRepository(session, principal.workspace_id)
    if await members.for_user(user.id) is not None:
        raise Conflict(f"{user.email} is already a member of this workspace.")
    membership = members.add(Membership(user_id=user.id, role=role))
    await session.flush()
    return membership, user


async def get_member(
    session: AsyncSession, principal: Principal, user_id: uuid.UUID
) -> tuple[Membership, User]:
    membership = await MembershipRepository(session, principal.workspace_id).for_user(user_id)
    if membership is None:
        raise NotFound(f"No member with user id {user_id} in this workspace.")
    user = await session.get(User, user_id)
    assert user is not None
    return membership, user


async def change_member_role(
    session: AsyncSession, principal: Principal, user_id: uuid.UUID, role: Role
) -> tuple[Membership, User]:
    membership, user = await get_member(session, principal, user_id)
    if Role.owner in (membership.role, role):
        _check_may_grant(principal, Role.owner)
    else:
        _check_may_grant(principal, role)
    if membership.role == Role.owner and role != Role.owner:
        await _keep_an_owner(session, principal.workspace_id)
    membership.role = role
    await session.flush()
    return membership, user


async def remove_member(session: AsyncSession, principal: Principal, user_id: uuid.UUID) -> None:
    membership, _ = await get_member(session, principal, user_id)
    if membership.role == Role.owner:
        _check_may_grant(principal, Role.owner)
        await _keep_an_owner(session, principal.workspace_id)
    await MembershipRepository(session, principal.workspace_id).delete(membership)
    await session.flush()


async def _keep_an_owner(session: AsyncSession, workspace_id: uuid.UUID) -> None:
    if await MembershipRepository(session, workspace_id).count_owners() <= 1:
        raise Conflict("A workspace must keep at least one owner.")


def _check_may_grant(principal: Principal, role: Role) -> None:
    if not principal.role.at_least(role):
        raise Forbidden(f"A {principal.role.value} cannot grant the {role.value} role.")


async def create_api_key(
    session: AsyncSession,
    workspace_id: uuid.UUID,
    *,
    name: str,
    role: Role,
    created_by: uuid.UUID | None,
    grantor_role: Role,
    expires_at: datetime | None = None,
) -> tuple[ApiKey, str]:
    if not grantor_role.at_least(role):
        raise Forbidden(f"A {grantor_role.value} cannot create a key with the {role.value} role.")
    if expires_at is not None:
        if expires_at.tzinfo is None:
            raise ValidationFailed("expires_at must include a time zone (e.g. a trailing Z).")
        if expires_at <= utcnow():
            raise ValidationFailed("expires_at must be in the future.")
    new = generate_api_key()
    key = ApiKeyRepository(session, workspace_id).add(
        ApiKey(
            name=name,
            prefix=new.prefix,
            key_hash=new.key_hash,
            role=role,
            created_by=created_by,
            expires_at=expires_at,
        )
    )
    await session.flush()
    return key, new.token


async def revoke_api_key(
    session: AsyncSession, workspace_id: uuid.UUID, key_id: uuid.UUID
) -> ApiKey:
    key = await ApiKeyRepository(session, workspace_id).get_or_404(key_id)
    if key.revoked_at is None:
        key.revoked_at = utcnow()
        await session.flush()
    return key


@dataclass(frozen=True)
class Bootstrap:
    workspace: Workspace
    owner: User
    api_key: str


BOOTSTRAP_OWNER_EMAIL = "owner@heron.localhost"


async def bootstrap(session: AsyncSession) -> Bootstrap | None:
    """On an empty database: a default workspace, its owner and an owner API key."""
    if session.bind is not None and session.bind.dialect.name == "postgresql":
        # Replicas starting together: only one of them bootstraps.
        await session.execute(text("SELECT pg_advisory_xact_lock(7243321)"))
    if await WorkspaceReader(session).any_exists():
        return None
    owner = await session.scalar(select(User).where(User.email == BOOTSTRAP_OWNER_EMAIL))
    if owner is None:
        owner = await create_user(session, BOOTSTRAP_OWNER_EMAIL, None, "Owner")
    workspace = await create_workspace(session, owner.id, "Default")
    _, token = await create_api_key(
        session,
        workspace.id,
        name="bootstrap",
        role=Role.owner,
        created_by=owner.id,
        grantor_role=Role.owner,
    )
    return Bootstrap(workspace=workspace, owner=owner, api_key=token)
