"""Token-bucket rate limits: in process (embedded) or in Redis (shared by all API replicas)."""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Protocol

from redis.asyncio import Redis


@dataclass(frozen=True)
class Decision:
    allowed: bool
    burst: int
    remaining: int
    retry_after: float  # seconds until one token is available (0 when allowed)
    full_after: float  # seconds until the bucket is full again

    def headers(self, policy: str, rate: float) -> dict[str, str]:
        window = max(1, math.ceil(self.burst / rate))
        headers = {
            "RateLimit-Policy": f'"{policy}";q={self.burst};w={window}',
            "RateLimit": f'"{policy}";r={self.remaining};t={math.ceil(self.full_after)}',
        }
        if not self.allowed:
            headers["Retry-After"] = str(max(1, math.ceil(self.retry_after)))
        return headers


def _decide(tokens: float, allowed: bool, rate: float, burst: int) -> Decision:
    return Decision(
        allowed=allowed,
        burst=burst,
        remaining=max(0, math.floor(tokens)),
        retry_after=0.0 if allowed else (1 - tokens) / rate,
        full_after=(burst - tokens) / rate,
    )


class RateLimiter(Protocol):
    async def hit(self, key: str, rate: float, burst: int) -> Decision:
        """Take one token from bucket `key` (refilled at `rate` per second, holding `burst`)."""
        ...

    async def close(self) -> None: ...


class MemoryRateLimiter:
    """Buckets in a bounded LRU map, so a flood of distinct clients cannot exhaust memory."""

    def __init__(self, max_buckets: int = 100_000) -> None:
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()
        self._max = max_buckets

    async def hit(self, key: str, rate: float, burst: int) -> Decision:
        now = time.monotonic()
        tokens, last = self._buckets.pop(key, (float(burst), now))
        tokens = min(float(burst), tokens + (now - last) * rate)
        allowed = tokens >= 1
        if allowed:
            tokens -= 1
        self._buckets[key] = (tokens, now)
        if len(self._buckets) > self._max:
            self._buckets.popitem(last=False)
        return _decide(tokens, allowed, rate, burst)

    async def close(self) -> None:
        self._buckets.clear()


# The bucket lives in one hash; Redis' own clock is used so replicas with skewed clocks agree.
_BUCKET_SCRIPT = """
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local state = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
local tokens = tonumber(state[1])
local ts = tonumber(state[2])
if tokens == nil then
  tokens = burst
  ts = now
end
tokens = math.min(burst, tokens + math.max(0, now - ts) * rate)
local allowed = 0
if tokens >= 1 then
  tokens = tokens - 1
  allowed = 1
end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'ts', tostring(now))
redis.call('PEXPIRE', KEYS[1], math.ceil(burst / rate * 1000) + 1000)
return {allowed, tostring(tokens)}
"""


class RedisRateLimiter:
    def __init__(self, redis: Redis, namespace: str = "heron:ratelimit") -> None:
        self._redis = redis
        self._script = redis.register_script(_BUCKET_SCRIPT)
        self._namespace = namespace

    async def hit(self, key: str, rate: float, burst: int) -> Decision:
        allowed, tokens = await self._script(
            keys=[f"{self._namespace}:{key}"], args=[repr(rate), burst]
        )
        return _decide(float(tokens), bool(int(allowed)), rate, burst)

    async def close(self) -> None:
        pass  # the Redis client belongs to the app
