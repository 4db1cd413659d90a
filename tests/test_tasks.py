"""`cancel_and_wait`: a cancellation that a library swallows is repeated until the task ends."""

from __future__ import annotations

import asyncio
import random
import uuid

from redis.asyncio import Redis

from heron.core.redisclient import redis_client
from heron.core.tasks import cancel_and_wait
from heron.runs.events import RedisEventLog


async def _deaf_once(ran_on: list[str]) -> None:
    """Takes its first cancellation as Python 3.11's `asyncio.wait_for` can: as if it never came."""
    try:
        await asyncio.sleep(30)
    except asyncio.CancelledError:
        ran_on.append("swallowed")
    ran_on.append("went on")
    await asyncio.sleep(30)
    ran_on.append("never")


async def test_a_swallowed_cancellation_is_repeated_until_the_task_ends() -> None:
    ran_on: list[str] = []
    plain = asyncio.create_task(_deaf_once(ran_on))
    await asyncio.sleep(0)
    plain.cancel()
    await asyncio.sleep(0.3)
    assert not plain.done()  # one cancel was not enough

    ran_on.clear()
    task = asyncio.create_task(_deaf_once(ran_on))
    await asyncio.sleep(0)
    await cancel_and_wait([task], every=0.05)
    assert task.cancelled()
    assert ran_on == ["swallowed", "went on"]
    await cancel_and_wait([plain], every=0.05)


async def test_a_task_winding_down_is_waited_for_not_cancelled_again() -> None:
    recorded: list[str] = []
    winding_down = False

    async def records_its_end() -> None:
        nonlocal winding_down
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            winding_down = True
            await asyncio.sleep(0.2)  # writing how it ended: a second cancel would cut it
            recorded.append("end recorded")
            raise

    task = asyncio.create_task(records_its_end())
    await asyncio.sleep(0)
    await cancel_and_wait([task], every=0.02, still_wanted=lambda _: not winding_down)
    assert recorded == ["end recorded"]
    assert task.cancelled()


async def test_tasks_writing_to_redis_all_stop(redis_url: str) -> None:
    """Tasks that do nothing but write to Redis, through Heron's clients, all stop when
    cancelled. (With redis-py's default socket timeout, each write goes through Python 3.11's
    `asyncio.wait_for`, which swallowed every one of 50 cancels in 10 s on a loaded machine:
    `test_heron_redis_clients_write_without_wait_for` checks what avoids it.)"""
    redis = redis_client(redis_url)
    log = RedisEventLog(redis)

    async def writes() -> None:
        run_id, seq = uuid.uuid4(), 0
        while True:
            seq += 1
            await log.append(run_id, seq, "message.delta", {"text": "x"})

    try:
        for _ in range(5):
            tasks = [asyncio.create_task(writes()) for _ in range(10)]
            await asyncio.sleep(random.uniform(0, 0.02))
            async with asyncio.timeout(10):  # a lost cancel fails here, not hangs
                await cancel_and_wait(tasks)
            assert all(task.done() for task in tasks)
    finally:
        await redis.aclose()


async def test_heron_redis_clients_write_without_wait_for(redis_url: str) -> None:
    """What makes Heron's clients safe to cancel: no socket timeout, so redis-py awaits its
    writes directly instead of through `asyncio.wait_for`; a stuck write is bounded by the
    caller (`RedisEventLog.append`), a connection attempt by the connect timeout."""
    client = redis_client(redis_url)
    default = Redis.from_url(redis_url)
    try:
        await client.ping()
        await default.ping()
        ours = client.connection_pool.connection_kwargs
        assert ours["socket_timeout"] is None
        assert ours["socket_connect_timeout"] == 5.0
        async with client.client() as single:
            await single.ping()
            assert single.connection is not None
            assert not single.connection.socket_timeout
        async with default.client() as single:
            await single.ping()
            assert single.connection is not None
            assert single.connection.socket_timeout  # redis-py's default: through wait_for
    finally:
        await client.aclose()
        await default.aclose()
