"""Queries of provider connections, scoped to one workspace."""

from __future__ import annotations

from collections.abc import Sequence

from heron.db.repository import WorkspaceRepository
from heron.providers.models import Provider


class ProviderRepository(WorkspaceRepository[Provider]):
    model = Provider
    noun = "provider"

    async def by_name(self, name: str) -> Provider | None:
        row: Provider | None = await self.session.scalar(self.select().where(Provider.name == name))
        return row

    async def by_names(self, names: set[str]) -> Sequence[Provider]:
        return (await self.session.scalars(self.select().where(Provider.name.in_(names)))).all()
