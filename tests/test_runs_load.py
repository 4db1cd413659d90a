"""Runs under load: many at once in one process, each executed once, none lost."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import SecretStr
from sqlalchemy import select

from conftest import TEST_SECRET, make_settings, make_tenant, serve
from fakes.openai_server import FakeOpenAI, Reply, ToolCall
from test_runs import make_agent, new_thread, read_sse, wait_status

RUNS = 60


@pytest.fixture
async def slow_llm() -> AsyncIterator[tuple[FakeOpenAI, str]]:
    """Every answer takes a while: runs overlap, and so do their writes."""
    fake = FakeOpenAI(api_key="sk-test-runs-0123456789", models=["small", "big"])

    def answer(request: Any) -> Reply:
        asked = request.body["messages"]
        if asked[-1]["role"] == "tool":
            return Reply(text="Done: " + "x" * 40, chunk_size=2, chunk_delay=0.01)
        return Reply(
            tool_calls=[ToolCall("calculator", {"expression": "6*7"})], first_byte_delay=0.2
        )

    fake.handler = answer
    async with fake.serve() as url:
        yield fake, url


async def test_many_concurrent_runs_all_complete_each_executed_once(
    tmp_path: Path, database_url: str, scale_out: str | None, slow_llm: tuple[FakeOpenAI, str]
) -> None:
    from heron.app import create_app
    from heron.settings import (
        AuthSettings,
        DatabaseSettings,
        RedisSettings,
        RunsSettings,
        load_settings,
    )

    _, url = slow_llm
    settings = load_settings(
        home=tmp_path,
        database=DatabaseSettings(url=database_url, pool_size=2),
        redis=RedisSettings(url=scale_out),
        auth=AuthSettings(secret_key=SecretStr(TEST_SECRET)),
        runs=RunsSettings(max_concurrency=RUNS, per_workspace_concurrency=RUNS),
    )
    app = create_app(settings)
    limits = httpx.Limits(max_connections=RUNS + 10, max_keepalive_connections=RUNS + 10)
    async with (
        serve(app) as base,
        httpx.AsyncClient(base_url=base, timeout=120, limits=limits) as client,
    ):
        alice = await make_tenant(app.state.db, "Alice", password=None)
        await make_agent(client, alice, url, tools=["calculator"])
        threads = [await new_thread(client, alice) for _ in range(RUNS)]

        async def one(thread: str) -> list[dict[str, Any]]:
            async with client.stream(
                "POST",
                f"/api/threads/{thread}/runs",
                json={"agent": "helper", "input": "6*7?", "stream": True},
                headers=alice.headers,
            ) as response:
                assert response.status_code == 200
                return await read_sse(response)

        streams = await asyncio.gather(*(one(t) for t in threads))
        for events in streams:
            kinds = [e["event"] for e in events]
            assert kinds[-1] == "run.completed", kinds
            started = [e["data"] for e in events if e["event"] == "run.started"]
            assert started == [
                {"run_id": started[0]["run_id"], "attempt": 1, "resumed_after_interruption": False}
            ]
            assert kinds.count("tool_call.completed") == 1
        # Nothing was left for a second execution: each run's events are its only ones.
        await asyncio.sleep(0.1)
        for events in streams:
            run_id = events[0]["data"]["run_id"]
            async with client.stream(
                "GET", f"/api/runs/{run_id}/events", headers=alice.headers
            ) as response:
                stored = await read_sse(response)
            assert [e["id"] for e in stored] == list(range(1, len(stored) + 1))
            assert [e["event"] for e in stored] == [e["event"] for e in events]


async def test_one_renewal_extends_the_leases_of_every_run_of_the_process(
    client: httpx.AsyncClient, alice: Any, app: Any, slow_llm: tuple[FakeOpenAI, str]
) -> None:
    if app.state.settings.uses_workers:
        pytest.skip("runs execute on the worker here, whose leases are kept by the same class")
    from sqlalchemy import select, update

    from heron.runs.models import Run

    fake, url = slow_llm

    def slow(request: Any) -> Reply:
        return Reply(text="slowly " * 20, chunk_size=2, chunk_delay=0.05)

    fake.handler = slow
    await make_agent(client, alice, url)
    ids = []
    for _ in range(3):
        thread = await new_thread(client, alice)
        run = await client.post(
            f"/api/threads/{thread}/runs",
            json={"agent": "helper", "input": "Hi"},
            headers=alice.headers,
        )
        ids.append(run.json()["id"])
    db = app.state.db
    ctx = app.state.runs.ctx
    await asyncio.sleep(0.5)  # all three execute
    import uuid

    run_ids = [uuid.UUID(i) for i in ids]
    async with db.session(write=True) as session, session.begin():
        # One lease lapsed meanwhile and another process took that run.
        await session.execute(
            update(Run).where(Run.id == run_ids[2]).values(lease_owner="elsewhere:1")
        )
    async with db.session(write=False) as session:
        before = dict((await session.execute(select(Run.id, Run.lease_expires_at))).all())
    await ctx.leases.renew()
    async with db.session(write=False) as session:
        after = dict((await session.execute(select(Run.id, Run.lease_expires_at))).all())
    assert after[run_ids[0]] > before[run_ids[0]]
    assert after[run_ids[1]] > before[run_ids[1]]
    assert after[run_ids[2]] == before[run_ids[2]]  # not this process' lease any more


async def test_a_workspace_runs_at_most_its_cap_at_once_the_rest_queue(
    tmp_path: Path, database_url: str, scale_out: str | None
) -> None:
    """The per-workspace cap holds for the whole deployment (the claim counts in the database,
    so it holds across workers too); excess runs queue and all complete; another workspace is
    not held up by it."""
    from sqlalchemy import select

    from heron.app import create_app
    from heron.runs.models import Run
    from heron.settings import (
        AuthSettings,
        DatabaseSettings,
        RedisSettings,
        RunsSettings,
        load_settings,
    )

    fake = FakeOpenAI(api_key="sk-test-runs-0123456789", models=["small"])
    fake.handler = lambda request: Reply(text="step " * 10, chunk_size=1, chunk_delay=0.05)
    settings = load_settings(
        home=tmp_path,
        database=DatabaseSettings(url=database_url, pool_size=5),
        redis=RedisSettings(url=scale_out),
        auth=AuthSettings(secret_key=SecretStr(TEST_SECRET)),
        runs=RunsSettings(per_workspace_concurrency=2),
    )
    app = create_app(settings)
    async with (
        fake.serve() as url,
        serve(app) as base,
        httpx.AsyncClient(base_url=base, timeout=60) as client,
    ):
        alice = await make_tenant(app.state.db, "Alice", password=None)
        bob = await make_tenant(app.state.db, "Bob", password=None)
        await make_agent(client, alice, url)
        await make_agent(client, bob, url)
        runs = []
        for _ in range(5):
            thread = await new_thread(client, alice)
            created = await client.post(
                f"/api/threads/{thread}/runs",
                json={"agent": "helper", "input": "go"},
                headers=alice.headers,
            )
            runs.append(created.json()["id"])
        bob_thread = await new_thread(client, bob)
        bob_run = (
            await client.post(
                f"/api/threads/{bob_thread}/runs",
                json={"agent": "helper", "input": "go"},
                headers=bob.headers,
            )
        ).json()["id"]

        most = 0
        bob_ran_while_alice_waited = False
        for _ in range(1200):
            # One read of every status at once (requests one by one would see runs that
            # ended and runs that started in between as running together).
            async with app.state.db.session(write=False) as session:
                rows = dict((await session.execute(select(Run.id, Run.status))).all())
            statuses = [rows[uuid.UUID(r)].value for r in runs]
            bob_status = rows[uuid.UUID(bob_run)].value
            most = max(most, statuses.count("running"))
            if bob_status in ("running", "completed") and "queued" in statuses:
                bob_ran_while_alice_waited = True
            if all(s == "completed" for s in statuses) and bob_status == "completed":
                break
            await asyncio.sleep(0.02)
        assert statuses == ["completed"] * 5, statuses
        assert most == 2  # the cap was reached, never passed
        assert bob_ran_while_alice_waited


async def test_a_worker_executes_as_many_runs_at_once_as_its_concurrency_asks(
    tmp_path: Path, database_url: str, scale_out: str | None, slow_llm: tuple[FakeOpenAI, str]
) -> None:
    """`heron worker --concurrency 3` executes three runs at once, whatever
    HERON_RUNS_WORKER_CONCURRENCY says."""
    if scale_out is None:
        pytest.skip("workers belong to the scale-out configuration")
    import datetime as dt

    from heron.app import create_app
    from heron.jobs.worker import running_worker
    from heron.settings import (
        AuthSettings,
        DatabaseSettings,
        RedisSettings,
        RunsSettings,
        load_settings,
    )

    fake, url = slow_llm
    fake.handler = lambda request: Reply(text="slowly " * 10, chunk_size=2, chunk_delay=0.05)
    settings = load_settings(
        home=tmp_path,
        database=DatabaseSettings(url=database_url, pool_size=5),
        redis=RedisSettings(url=scale_out),
        auth=AuthSettings(secret_key=SecretStr(TEST_SECRET)),
        runs=RunsSettings(worker_concurrency=1, per_workspace_concurrency=10),
    )
    app = create_app(settings)
    context = running_worker(settings, concurrency=3)
    await asyncio.to_thread(context.__enter__)
    try:
        async with (
            serve(app, with_worker=False) as base,
            httpx.AsyncClient(base_url=base, timeout=60) as client,
        ):
            alice = await make_tenant(app.state.db, "Alice", password=None)
            await make_agent(client, alice, url)
            threads = [await new_thread(client, alice) for _ in range(3)]
            answers = await asyncio.gather(
                *(
                    client.post(
                        f"/api/threads/{thread}/runs/wait",
                        json={"agent": "helper", "input": "Hi"},
                        headers=alice.headers,
                    )
                    for thread in threads
                )
            )
    finally:
        await asyncio.to_thread(context.__exit__, None, None, None)
    runs = [answer.json() for answer in answers]
    assert [run["status"] for run in runs] == ["completed"] * 3
    started = [dt.datetime.fromisoformat(run["started_at"]) for run in runs]
    ended = [dt.datetime.fromisoformat(run["ended_at"]) for run in runs]
    assert max(started) < min(ended)  # each began before any ended: all three at once


async def test_a_new_run_starts_in_its_creating_transaction_when_a_place_is_free(
    tmp_path: Path, database_url: str
) -> None:
    """Embedded, a run on an idle thread is written already claimed (202 says `running`) and
    executes as its request commits; with every place of the process taken it is queued, and
    starts when a place frees. A place held for a run whose transaction rolls back is given
    back. (The in-process executor, on either database: workers claim every run from the job
    queue.)"""
    from heron.app import create_app
    from heron.providers.models import Provider
    from heron.runs.models import Run, RunStatus
    from heron.settings import RunsSettings

    fake = FakeOpenAI(api_key="sk-test-runs-0123456789", models=["small"])
    fake.handler = lambda request: Reply(text="step " * 10, chunk_size=1, chunk_delay=0.03)
    one_place = RunsSettings(max_concurrency=1, per_workspace_concurrency=5)
    app = create_app(make_settings(tmp_path, database_url, runs=one_place))
    async with (
        fake.serve() as url,
        serve(app) as base,
        httpx.AsyncClient(base_url=base, timeout=60) as client,
    ):
        alice = await make_tenant(app.state.db, "Alice", password=None)
        await make_agent(client, alice, url)
        first, second, third = [await new_thread(client, alice) for _ in range(3)]

        async def create(thread: str) -> dict[str, Any]:
            response = await client.post(
                f"/api/threads/{thread}/runs",
                json={"agent": "helper", "input": "go"},
                headers=alice.headers,
            )
            assert response.status_code == 202, response.text
            return dict(response.json())

        running = await create(first)
        assert running["status"] == "running"
        assert running["started_at"] is not None
        queued = await create(second)  # the process' one place is taken
        assert queued["status"] == "queued"
        for run in (running, queued):
            ended = await wait_status(client, alice, run["id"], "completed", "failed")
            assert ended["status"] == "completed", ended
        events = (await client.get(f"/api/runs/{running['id']}/events", headers=alice.headers)).text
        assert events.index("event: run.queued") < events.index("event: run.started")
        messages = (
            await client.get(f"/api/threads/{first}/messages", headers=alice.headers)
        ).json()["items"]
        assert [m["role"] for m in messages] == ["user", "assistant"]
        assert messages[0]["run_id"] == running["id"]

        # A place held by a transaction that rolls back comes back: the next run starts at once.
        runs = app.state.runs
        db = app.state.db
        async with db.session(write=True) as session:
            template = await session.get(Run, uuid.UUID(running["id"]))
            assert template is not None
            providers = list(await session.scalars(select(Provider)))
            held = await runs.begin(
                session,
                Run(
                    id=uuid.uuid4(),
                    workspace_id=template.workspace_id,
                    thread_id=uuid.UUID(third),
                    agent_id=template.agent_id,
                    agent_version=template.agent_version,
                    spec=template.spec,
                    status=RunStatus.queued,
                    input=template.input,
                    variables={},
                ),
                providers,
            )
            assert held is not None
            await session.rollback()
        held.give_back()
        held.give_back()  # once only
        again = await create(third)
        assert again["status"] == "running"
        ended = await wait_status(client, alice, again["id"], "completed", "failed")
        assert ended["status"] == "completed"
