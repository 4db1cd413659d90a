"""Queries of tenancy: members and keys are scoped to one workspace; workspaces are reached
only through the caller's memberships (or its key)."""

from __future__ import annotations

import uuid
from collections.abc import Sequence

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from heron.core.pagination import PageParams, paginate_query
from heron.db.repository import WorkspaceRepository
from heron.tenancy.models import ApiKey, Membership, Role, User, Workspace


class MembershipRepository(WorkspaceRepository[Membership]):
    model = Membership
    noun = "member"

    async def for_user(self, user_id: uuid.UUID) -> Membership | None:
        row: Membership | None = await self.session.scalar(
            self.select().where(Membership.user_id == user_id)
        )
        return row

    async def page_with_users(self, params: PageParams) -> Sequence[tuple[Membership, User]]:
        stmt = paginate_query(
            select(Membership, User)
            .join(User, User.id == Membership.user_id)
            .where(Membership.workspace_id == self.workspace_id),
            Membership.id,
            params,
        )
        return [(m, u) for m, u in (await self.session.execute(stmt)).all()]

    async def count_owners(self) -> int:
        return await self.count(Membership.role == Role.owner)


class ApiKeyRepository(WorkspaceRepository[ApiKey]):
    model = ApiKey
    noun = "API key"


class WorkspaceReader:
    """Workspaces visible to a user through memberships."""

    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def page_for_user(
        self, user_id: uuid.UUID, params: PageParams
    ) -> Sequence[tuple[Workspace, Role]]:
        stmt = paginate_query(
            select(Workspace, Membership.role)
            .join(Membership, Membership.workspace_id == Workspace.id)
            .where(Membership.user_id == user_id),
            Workspace.id,
            params,
        )
        return [(w, r) for w, r in (await self.session.execute(stmt)).all()]

    async def any_exists(self) -> bool:
        return bool(await self.session.scalar(select(func.count()).select_from(Workspace)))


class UserRepository:
    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def by_email(self, email: str) -> User | None:
        user: User | None = await self.session.scalar(
            select(User).where(User.email == normalize_email(email))
        )
        return user


def normalize_email(email: str) -> str:
    return email.strip().lower()
