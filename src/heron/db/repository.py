"""The base of every repository of workspace-owned rows.

A WorkspaceRepository is bound to one workspace id and every statement it builds carries
`workspace_id = :id`, so another workspace's row is simply not found (404, never 403).
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any, ClassVar, Generic, TypeVar

from sqlalchemy import ColumnElement, Select, bindparam, func, select
from sqlalchemy.ext.asyncio import AsyncSession

from heron.core.errors import NotFound
from heron.core.pagination import PageParams, paginate_query
from heron.db.base import WorkspaceOwned

M = TypeVar("M", bound=WorkspaceOwned)


class WorkspaceRepository(Generic[M]):
    model: ClassVar[type[Any]]
    noun: ClassVar[str] = "resource"

    def __init__(self, session: AsyncSession, workspace_id: uuid.UUID) -> None:
        self.session = session
        self.workspace_id = workspace_id

    def select(self) -> Select[M]:
        return select(self.model).where(self.model.workspace_id == self.workspace_id)

    async def get(self, id: uuid.UUID) -> M | None:
        row: M | None = await self.session.scalar(
            _where_equal(self.model, ("id",)), {"workspace_id": self.workspace_id, "eq_id": id}
        )
        return row

    async def find_by(self, **equal: Any) -> M | None:
        """The row whose columns equal these values (the first one, if several do)."""
        params = {f"eq_{column}": value for column, value in equal.items()}
        row: M | None = await self.session.scalar(
            _where_equal(self.model, tuple(equal)), {"workspace_id": self.workspace_id, **params}
        )
        return row

    async def get_or_404(self, id: uuid.UUID) -> M:
        row = await self.get(id)
        if row is None:
            raise NotFound(f"No {self.noun} with id {id} in this workspace.")
        return row

    async def page(self, params: PageParams, *where: ColumnElement[bool]) -> Sequence[M]:
        stmt = paginate_query(self.select().where(*where), self.model.id, params)
        return (await self.session.scalars(stmt)).all()

    async def count(self, *where: ColumnElement[bool]) -> int:
        stmt = (
            select(func.count())
            .select_from(self.model)
            .where(self.model.workspace_id == self.workspace_id, *where)
        )
        return int(await self.session.scalar(stmt) or 0)

    def add(self, row: M) -> M:
        row.workspace_id = self.workspace_id
        self.session.add(row)
        return row

    async def delete(self, row: M) -> None:
        assert row.workspace_id == self.workspace_id
        await self.session.delete(row)


# The statements of `get` and `find_by`, by model and columns, each built once: building a
# statement, with its cache key, costs several times more than running it, on the paths every
# request takes. (Built on first use, not at import: foreign keys' column types are known only
# once every model is.)
_STATEMENTS: dict[tuple[type[Any], tuple[str, ...]], Select[Any]] = {}


def _where_equal(model: type[Any], columns: tuple[str, ...]) -> Select[Any]:
    statement = _STATEMENTS.get((model, columns))
    if statement is None:
        statement = select(model).where(
            model.workspace_id == bindparam("workspace_id"),
            *(getattr(model, column) == bindparam(f"eq_{column}") for column in columns),
        )
        _STATEMENTS[(model, columns)] = statement
    return statement
