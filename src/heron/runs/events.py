"""The live event log of runs: append with a growing id per run, read after an id, follow.

Embedded mode keeps live events in memory; every event is also written to the database at each
step boundary (`run_events`), so a stream that starts after the process restarted, or after the
run ended, replays the history from there. Scale-out mode (Redis Streams) implements the same
interface.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from redis.asyncio import ConnectionPool, Redis
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

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
    # Whether every process of the deployment sees the same log (Redis), or only this one.
    shared: bool

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

    shared = False

    def __init__(self, retain_seconds: float = 300.0) -> None:
        self._runs: dict[uuid.UUID, _RunLog] = {}
        self._retain = retain_seconds
        # When ended runs are looked for next: once a second at most, not at every event (a
        # scan of every run held, each time, cost O(runs) per event with hundreds running).
        self._next_forget = 0.0

    async def append(self, run_id: uuid.UUID, seq: int, type: str, data: dict[str, Any]) -> Event:
        log = self._runs.setdefault(run_id, _RunLog())
        event = Event(seq, type, data)
        log.events.append(event)
        if type in TERMINAL:
            log.ended_at = time.monotonic()
        log.changed.set()
        log.changed = asyncio.Event()
        if time.monotonic() >= self._next_forget:
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
        held: _RunLog | None = None
        read = 0  # how many of `held.events` this follower has looked at
        while True:
            log = self._runs.setdefault(run_id, _RunLog())
            if log is not held:  # first time, or the run was forgotten and started again
                held, read = log, 0
            # Only what was appended since the last look: not the whole list at every event.
            fresh = [e for e in log.events[read:] if e.seq > seen]
            read = len(log.events)
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
        self._next_forget = now + min(1.0, self._retain)
        stale = [
            run_id
            for run_id, log in self._runs.items()
            if log.ended_at is not None and now - log.ended_at > self._retain
        ]
        for run_id in stale:
            del self._runs[run_id]


BLOCK_SECONDS = 2.0
# How long an append may take before it fails (Redis away or stuck).
WRITE_TIMEOUT = 5.0


class RedisEventLog:
    """One Redis Stream per run, whose entry ids are the events' own ids (`0-<seq>`): any API
    replica reads any run's events after an id, and follows them with a blocking XREAD.

    Streams expire a while after their last event (their history stays in the database) and
    are capped in length, so an endless run can't fill Redis.
    """

    shared = True

    def __init__(
        self,
        redis: Redis,
        *,
        retain_seconds: int = 3600,
        max_events: int = 200_000,
        prefix: str = "heron:run-events:",
    ) -> None:
        self._redis = redis
        self._retain = retain_seconds
        self._max = max_events
        self._prefix = prefix

    def _key(self, run_id: uuid.UUID) -> str:
        return f"{self._prefix}{run_id}"

    async def append(self, run_id: uuid.UUID, seq: int, type: str, data: dict[str, Any]) -> Event:
        key = self._key(run_id)
        payload = json.dumps(data, separators=(",", ":"), default=str)
        try:
            # Bounded here: Heron's clients have no socket timeout (`heron.core.redisclient`).
            async with asyncio.timeout(WRITE_TIMEOUT), self._redis.pipeline(False) as pipe:
                pipe.xadd(
                    key,
                    {"t": type, "d": payload},
                    id=f"0-{seq}",
                    maxlen=self._max,
                    approximate=True,
                )
                pipe.expire(key, self._retain)
                results = await pipe.execute(raise_on_error=False)
        except TimeoutError:
            raise RedisTimeoutError(f"Redis took no event in {WRITE_TIMEOUT:g} s.") from None
        error = results[0]
        # An id at or below the stream's last one: the event is there already (a retried
        # append); anything else is a real failure.
        if isinstance(error, ResponseError) and "equal or smaller" not in str(error):
            raise error
        return Event(seq, type, data)

    async def after(self, run_id: uuid.UUID, seq: int) -> list[Event] | None:
        key = self._key(run_id)
        first: Any = await self._redis.xrange(key, "-", "+", count=1)
        if not first or _seq(first[0][0]) > seq + 1:
            return None
        entries: Any = await self._redis.xrange(key, f"(0-{seq}", "+")
        return [_event(entry) for entry in entries]

    async def follow(
        self, run_id: uuid.UUID, after: int, *, idle: float
    ) -> AsyncIterator[Event | None]:
        key = self._key(run_id)
        last = f"0-{after}"
        block = min(idle, BLOCK_SECONDS)
        quiet = 0.0
        # A blocking read holds its connection while it waits, for as long as the stream
        # lasts: each follower reads on a connection of its own, so live streams can't use up
        # the shared client's pool (redis-py caps it at 100, then raises) and starve its other
        # users. A stream costs one connection to Redis meanwhile.
        shared = self._redis.connection_pool
        reader = Redis(
            connection_pool=ConnectionPool(
                connection_class=shared.connection_class,
                max_connections=1,
                **shared.connection_kwargs,
            )
        )
        try:
            while True:
                answer: Any = await reader.xread({key: last}, count=500, block=int(block * 1000))
                if not answer:
                    quiet += block
                    if quiet >= idle:
                        quiet = 0.0
                        yield None
                    continue
                quiet = 0.0
                for entry in answer[0][1]:
                    last = entry[0]
                    yield _event(entry)
        finally:
            await reader.aclose(close_connection_pool=True)


def _seq(entry_id: bytes | str) -> int:
    text = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    return int(text.partition("-")[2])


def _event(entry: Any) -> Event:
    entry_id, fields = entry
    values = {(k.decode() if isinstance(k, bytes) else k): v for k, v in fields.items()}
    kind = values["t"]
    return Event(
        _seq(entry_id), kind.decode() if isinstance(kind, bytes) else kind, json.loads(values["d"])
    )
