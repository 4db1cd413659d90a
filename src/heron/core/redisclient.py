"""Heron's Redis clients, configured so that a cancelled task really stops.

redis-py's default socket timeout (5 s) makes every command's write go through
`asyncio.wait_for`, which on Python 3.11 returns the write's result instead of raising when a
cancellation arrives in the same turn of the loop. A task that does little else than write to
Redis (a run streaming its events) can then swallow every cancel it is sent, one after the
other: seen here with 50 cancels in 10 s on a loaded 2-core machine. Without a socket timeout
the writes are awaited directly and a cancellation always lands. Commands are bounded instead
where they are made, with `asyncio.timeout` (correct on 3.11), and a connection attempt by
`socket_connect_timeout`; keepalives find a connection whose peer vanished.
"""

from __future__ import annotations

from redis.asyncio import Redis

CONNECT_TIMEOUT = 5.0


def redis_client(url: str) -> Redis:
    return Redis.from_url(
        url,
        socket_timeout=None,
        socket_connect_timeout=CONNECT_TIMEOUT,
        socket_keepalive=True,
        health_check_interval=30,
    )
