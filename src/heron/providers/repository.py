"""Queries of provider connections, scoped to one workspace."""

from __future__ import annotations

import functools
from collections.abc import Sequence

from sqlalchemy import Select, bindparam, select

from heron.db.repository import WorkspaceRepository
from heron.providers.models import Provider


class ProviderRepository(WorkspaceRepository[Provider]):
    model = Provider
    noun = "provider"

    async def by_name(self, name: str) -> Provider | None:
        return await self.find_by(name=name)

    async def by_names(self, names: set[str]) -> Sequence[Provider]:
        params = {"workspace_id": self.workspace_id, "names": sorted(names)}
        return (await self.session.scalars(by_names_statement(), params)).all()


@functools.cache
def by_names_statement() -> Select[Provider]:
    """A workspace's providers of these `names`. Built once, on first use: the column types of
    foreign keys are only known once every model is imported."""
    return select(Provider).where(
        Provider.workspace_id == bindparam("workspace_id"),
        Provider.name.in_(bindparam("names", expanding=True)),
    )
