"""The live event log of runs: append with a growing id per run, read after an id, follow.

Embedded mode keeps live events in memory; every event is also written to the database at each
step boundary (`run_events`), so a stream that starts after the process restarted, or after the
run ended, replays the history from there. Scale-out mode (Redis Streams) implements the same
interface.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Protocol

TERMINAL = frozenset({"run.completed", "run.failed", "run.cancelled"})
# A paused run ends its stream too; resuming it starts a new stream segment.
END_OF_STREAM = TERMINAL | {"approval.required"}


@dataclass(frozen=True)
class Event:
    seq: int
    type: str
    data: dict[str, Any]

    @property
    def ends_stream(self) -> bool:
        return self.type in END_OF_STREAM


class EventLog(Protocol):
    async def append(self, run_id: uuid.UUID, seq: int, type: str, data: dict[str, Any]) -> Event:
        """Record event `seq` of a run (the executor numbers events) and wake its followers."""
        ...

    async def after(self, run_id: uuid.UUID, seq: int) -> list[Event] | None:
        """Events with a larger id, or None when this log doesn't hold the run's start."""
        ...

    def follow(self, run_id: uuid.UUID, after: int, *, idle: float) -> AsyncIterator[Event | None]:
        """Events after `after` as they arrive; None after `idle` seconds without one."""
        ...


@dataclass
class _RunLog:
    events: list[Event] = field(default_factory=list)
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    ended_at: float | None = None


class MemoryEventLog:
    """Per-run lists in this process. Ended runs are forgotten after `retain_seconds`; their
    history stays in the database."""

    def __init__(self, retain_seconds: float = 300.0) -> None:
        self._runs: dict[uuid.UUID, _RunLog] = {}
        self._retain = retain_seconds

    async def append(self, run_id: uuid.UUID, seq: int, type: str, data: dict[str, Any]) -> Event:
        log = self._runs.setdefault(run_id, _RunLog())
        event = Event(seq, type, data)
        log.events.append(event)
        if type in TERMINAL:
            log.ended_at = time.monotonic()
        log.changed.set()
        log.changed = asyncio.Event()
        self._forget_old()
        return event

    async def after(self, run_id: uuid.UUID, seq: int) -> list[Event] | None:
        log = self._runs.get(run_id)
        if log is None or not log.events or log.events[0].seq > seq + 1:
            return None
        return [e for e in log.events if e.seq > seq]

    async def follow(
        self, run_id: uuid.UUID, after: int, *, idle: float
    ) -> AsyncIterator[Event | None]:
        seen = after
        while True:
            log = self._runs.setdefault(run_id, _RunLog())
            fresh = [e for e in log.events if e.seq > seen]
            for event in fresh:
                seen = event.seq
                yield event
            if fresh:
                continue
            try:
                await asyncio.wait_for(log.changed.wait(), idle)
            except TimeoutError:
                yield None

    def _forget_old(self) -> None:
        now = time.monotonic()
        stale = [
            run_id
            for run_id, log in self._runs.items()
            if log.ended_at is not None and now - log.ended_at > self._retain
        ]
        for run_id in stale:
            del self._runs[run_id]
