"""Queries of threads and messages, scoped to one workspace."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any

from sqlalchemy import delete

from heron.core.pagination import PageParams
from heron.db.repository import WorkspaceRepository
from heron.threads.models import Message, Thread


class ThreadRepository(WorkspaceRepository[Thread]):
    model = Thread
    noun = "thread"

    async def matching(self, params: PageParams, metadata: dict[str, Any]) -> Sequence[Thread]:
        # Metadata filters compare JSON values in Python: portable across SQLite and PostgreSQL,
        # and bounded by the page size times the scan below.
        if not metadata:
            return await self.page(params)
        found: list[Thread] = []
        probe = PageParams(limit=200, after=params.after)
        while len(found) <= params.limit:
            rows = await self.page(probe)
            found += [t for t in rows[:200] if all(t.meta.get(k) == v for k, v in metadata.items())]
            if len(rows) <= 200:
                break
            probe = PageParams(limit=200, after=rows[199].id)
        return found[: params.limit + 1]


class MessageRepository(WorkspaceRepository[Message]):
    model = Message
    noun = "message"

    async def of_thread(self, thread_id: uuid.UUID, params: PageParams) -> Sequence[Message]:
        return await self.page(params, Message.thread_id == thread_id)

    async def delete_of_run(self, run_id: uuid.UUID) -> None:
        await self.session.execute(
            delete(Message).where(
                Message.workspace_id == self.workspace_id, Message.run_id == run_id
            )
        )
