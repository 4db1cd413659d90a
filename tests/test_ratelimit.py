"""Token buckets per API key and per client address on login; shared through Redis."""

from __future__ import annotations

import httpx
import pytest

from conftest import BACKEND, Tenant, make_settings, make_tenant, serve
from heron.app import create_app
from heron.core.ratelimit import MemoryRateLimiter, RedisRateLimiter
from heron.db.engine import Database


async def test_api_key_bucket_answers_429_with_headers(tmp_path, database_url, scale_out) -> None:  # type: ignore[no-untyped-def]
    app = create_app(
        make_settings(tmp_path, database_url, scale_out, api_burst=5, api_rate_per_second=0.5)
    )
    async with serve(app) as url, httpx.AsyncClient(base_url=url) as client:
        alice = await make_tenant(app.state.db, "Alice", password=None)
        bob = await make_tenant(app.state.db, "Bob", password=None)
        statuses = []
        for _ in range(7):
            r = await client.get("/api/me", headers=alice.headers)
            statuses.append(r.status_code)
        assert statuses == [200] * 5 + [429] * 2
        assert r.headers["content-type"] == "application/problem+json"
        assert int(r.headers["retry-after"]) >= 1
        assert r.headers["ratelimit-policy"] == '"api";q=5;w=10'
        assert r.headers["ratelimit"].startswith('"api";r=0;')
        # Another key has its own bucket.
        ok = await client.get("/api/me", headers=bob.headers)
        assert ok.status_code == 200
        assert ok.headers["ratelimit"].startswith('"api";r=4;')


async def test_login_is_limited_per_client_address(tmp_path, database_url, scale_out) -> None:  # type: ignore[no-untyped-def]
    app = create_app(make_settings(tmp_path, database_url, scale_out, login_burst=3))
    async with serve(app) as url, httpx.AsyncClient(base_url=url) as client:
        body = {"email": "x@example.com", "password": "wrong-password"}
        statuses = [(await client.post("/api/auth/login", json=body)).status_code for _ in range(5)]
        assert statuses == [401, 401, 401, 429, 429]


@pytest.mark.skipif(BACKEND != "postgres", reason="limits shared across replicas need Redis")
async def test_limits_hold_across_api_replicas(tmp_path, database_url, redis_url) -> None:  # type: ignore[no-untyped-def]
    settings = make_settings(
        tmp_path, database_url, redis_url, api_burst=6, api_rate_per_second=0.1
    )
    one, two = create_app(settings), create_app(settings)
    async with (
        serve(one) as url_one,
        serve(two, with_worker=False) as url_two,
        httpx.AsyncClient() as client,
    ):
        alice = await make_tenant(one.state.db, "Alice", password=None)
        statuses = []
        for i in range(8):
            url = url_one if i % 2 == 0 else url_two
            statuses.append((await client.get(f"{url}/api/me", headers=alice.headers)).status_code)
        assert statuses == [200] * 6 + [429] * 2


async def test_memory_bucket_refills_and_stays_bounded() -> None:
    limiter = MemoryRateLimiter(max_buckets=3)
    first = await limiter.hit("a", rate=1000.0, burst=1)
    assert first.allowed
    for key in "bcde":
        await limiter.hit(key, rate=1.0, burst=1)
    assert len(limiter._buckets) == 3


async def test_redis_bucket_matches_memory_semantics(redis_url: str) -> None:
    from redis.asyncio import Redis

    client = Redis.from_url(redis_url)
    limiter = RedisRateLimiter(client)
    decisions = [await limiter.hit("k", rate=0.01, burst=3) for _ in range(4)]
    assert [d.allowed for d in decisions] == [True, True, True, False]
    assert [d.remaining for d in decisions] == [2, 1, 0, 0]
    assert decisions[-1].retry_after > 0
    await client.aclose()


async def test_tenant_helper_runs_without_passwords(db: Database) -> None:
    tenant: Tenant = await make_tenant(db, "Quick", password=None)
    assert tenant.key.startswith("heron_")
