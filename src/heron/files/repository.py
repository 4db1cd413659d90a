"""Queries of files, scoped to one workspace."""

from __future__ import annotations

from sqlalchemy import func, select

from heron.db.repository import WorkspaceRepository
from heron.files.models import File


class FileRepository(WorkspaceRepository[File]):
    model = File
    noun = "file"

    async def total_size(self) -> int:
        """Bytes stored by the workspace's files."""
        stmt = select(func.coalesce(func.sum(File.size), 0)).where(
            File.workspace_id == self.workspace_id
        )
        return int(await self.session.scalar(stmt) or 0)
