"""How the API hands runs over to whatever executes them.

Embedded, the `RunExecutor` of the API process itself does (it has the same methods). With
workers, `WorkerRuns` sends each run to the job queue, signals cancellations through Redis, and
reads live events from the shared event log.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol

from redis.asyncio import Redis
from sqlalchemy.ext.asyncio import AsyncSession

from heron.jobs.queue import CeleryQueue
from heron.providers.models import Provider
from heron.runs.events import EventLog
from heron.runs.models import Run

if TYPE_CHECKING:
    from heron.runs.executor import Started

# Workers listen here for runs to stop; the payload is the run id.
CANCEL_CHANNEL = "heron:run-cancel"


class Runs(Protocol):
    @property
    def events(self) -> EventLog: ...

    def submit(self, run_id: uuid.UUID, workspace_id: uuid.UUID) -> object:
        """Hand a committed, queued run over to be executed (may return an awaitable)."""
        ...

    async def begin(
        self, session: AsyncSession, run: Run, providers: Sequence[Provider]
    ) -> Started | None:
        """Write a new run already claimed by this process, in `session`'s transaction, when
        this process executes runs and has a place free; None: queue it and `submit` it."""
        ...

    def cancel(self, run_id: uuid.UUID) -> object:
        """Stop a running run; its executor records the cancellation."""
        ...

    async def announce(
        self, run_id: uuid.UUID, seq: int, type: str, data: dict[str, Any]
    ) -> None: ...

    def is_local(self, run_id: uuid.UUID) -> bool:
        """Whether this process executes the run."""
        ...


class WorkerRuns:
    """Runs executed by `heron worker` processes."""

    def __init__(self, queue: CeleryQueue, redis: Redis, events: EventLog) -> None:
        self._queue = queue
        self._redis = redis
        self._events = events

    @property
    def events(self) -> EventLog:
        return self._events

    async def submit(self, run_id: uuid.UUID, workspace_id: uuid.UUID) -> None:
        await self._queue.enqueue("run", run_id, workspace_id)

    async def begin(
        self, session: AsyncSession, run: Run, providers: Sequence[Provider]
    ) -> Started | None:
        return None  # workers claim every run from the job queue

    async def cancel(self, run_id: uuid.UUID) -> None:
        # Every worker hears it; the one executing the run stops it. (Workers also look for
        # cancellations in the database, should this message be missed.)
        await self._redis.publish(CANCEL_CHANNEL, str(run_id))

    async def announce(self, run_id: uuid.UUID, seq: int, type: str, data: dict[str, Any]) -> None:
        await self._events.append(run_id, seq, type, data)

    def is_local(self, run_id: uuid.UUID) -> bool:
        return False
