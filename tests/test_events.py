"""The Redis event log: the live streams of many runs at once."""

from __future__ import annotations

import asyncio
import contextlib
import uuid

from redis.asyncio import Redis

from heron.runs.events import Event, RedisEventLog


async def test_redis_event_log_streams_more_runs_at_once_than_the_clients_pool_holds(
    redis_url: str,
) -> None:
    client = Redis.from_url(redis_url, max_connections=2)
    log = RedisEventLog(client)
    runs = [uuid.uuid4() for _ in range(6)]

    async def first_event(run_id: uuid.UUID) -> Event:
        async with contextlib.aclosing(log.follow(run_id, 0, idle=10)) as events:
            async for event in events:
                if event is not None:
                    return event
        raise AssertionError("the stream ended")

    try:
        followers = [asyncio.create_task(first_event(run_id)) for run_id in runs]
        await asyncio.sleep(0.5)  # every follower is waiting in its blocking read
        for run_id in runs:
            await log.append(run_id, 1, "run.started", {"run_id": str(run_id)})
        events = await asyncio.wait_for(asyncio.gather(*followers), 30)
        assert [e.data["run_id"] for e in events] == [str(run_id) for run_id in runs]
        assert await client.ping()  # the shared client still has its connections
    finally:
        await client.aclose()
