"""A `heron serve` killed with SIGKILL mid-run: the next start continues the run from its last
completed step, and no completed tool call runs again."""

from __future__ import annotations

import asyncio
import json
import os
import signal
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from conftest import TEST_SECRET
from fakes.openai_server import FakeOpenAI, Reply, ToolCall
from test_cli import Heron, Server


@pytest.fixture
def heron(tmp_path: Path) -> Iterator[Heron]:
    runner = Heron(tmp_path)
    try:
        yield runner
    finally:
        runner.close()


@pytest.fixture
async def llm() -> AsyncIterator[tuple[FakeOpenAI, str]]:
    fake = FakeOpenAI(api_key="sk-crash-test-0123456789", models=["small"])
    async with fake.serve() as url:
        yield fake, url


async def started(heron: Heron, env: dict[str, str]) -> tuple[Server, httpx.AsyncClient]:
    """Start `heron serve` without blocking the event loop the fake model server runs on."""
    server = heron.start(env)
    client = httpx.AsyncClient(base_url=server.url, timeout=30, trust_env=False)
    for _ in range(600):
        assert server.proc.poll() is None, server.stderr
        try:
            if (await client.get("/healthz")).status_code == 200:
                return server, client
        except httpx.TransportError:
            pass
        await asyncio.sleep(0.05)
    raise AssertionError(f"heron serve did not become ready:\n{server.stderr}")


async def test_sigkill_mid_run_then_restart_completes_it_once(
    heron: Heron, llm: tuple[FakeOpenAI, str], database_url: str, scale_out: str | None
) -> None:
    if scale_out is not None:
        pytest.skip("the embedded mode's crash; the scale-out one is the test below")
    fake, llm_url = llm
    env = {"HERON_DATABASE_URL": database_url, "HERON_LIMITS_API_BURST": "100000"}
    if not database_url.startswith("sqlite"):
        env |= {"HERON_SECRET_KEY": TEST_SECRET, "HERON_REDIS_URL": scale_out or ""}
    fake.push(
        Reply(tool_calls=[ToolCall("calculator", {"expression": "6*7"}, id="call_once")]),
        Reply(text="this answer never finishes " * 50, chunk_size=4, chunk_delay=0.05),
        Reply(text="The answer is 42."),
    )
    server, client = await started(heron, env)
    key = (heron.home / "initial-api-key").read_text().strip()
    auth = {"Authorization": f"Bearer {key}"}
    await client.post(
        "/api/providers",
        json={
            "name": "fake",
            "kind": "openai-compatible",
            "base_url": llm_url,
            "api_key": "sk-crash-test-0123456789",
        },
        headers=auth,
    )
    created = await client.post(
        "/api/agents",
        json={"name": "calc", "model": "fake:small", "tools": ["calculator"]},
        headers=auth,
    )
    assert created.status_code == 201, created.text
    await client.post(f"/api/agents/{created.json()['id']}/publish", headers=auth)
    thread = (await client.post("/api/threads", headers=auth)).json()["id"]
    run = (
        await client.post(
            f"/api/threads/{thread}/runs", json={"agent": "calc", "input": "6*7?"}, headers=auth
        )
    ).json()

    last_seen = 0
    after_tool = 0
    async with client.stream("GET", f"/api/runs/{run['id']}/events", headers=auth) as stream:
        tool_done = False
        async for line in stream.aiter_lines():
            if line.startswith("id: "):
                last_seen = int(line[4:])
            elif line == "event: tool_call.completed":
                tool_done = True
            elif line == "event: message.delta" and tool_done:
                after_tool += 1
                if after_tool == 3:
                    break
    os.kill(server.proc.pid, signal.SIGKILL)
    server.proc.wait(timeout=10)
    await client.aclose()

    server, client = await started(heron, env)
    try:
        final: dict[str, Any] = {}
        for _ in range(400):
            final = (await client.get(f"/api/runs/{run['id']}", headers=auth)).json()
            if final["status"] in ("completed", "failed"):
                break
            await asyncio.sleep(0.05)
        assert final["status"] == "completed", final
        assert final["output"] == "The answer is 42."

        async with client.stream(
            "GET",
            f"/api/runs/{run['id']}/events",
            headers={**auth, "Last-Event-ID": str(last_seen)},
        ) as stream:
            rest = [
                json.loads(line[6:]) | {"_line": line}
                for line in [text async for text in stream.aiter_lines()]
                if line.startswith("data: ")
            ]
        texts = "".join(e.get("text", "") for e in rest)
        assert texts == "The answer is 42."
        assert not [e for e in rest if e.get("name") == "calculator"]  # the tool did not run again
        steps = (await client.get(f"/api/runs/{run['id']}/steps", headers=auth)).json()
        assert [s["kind"] for s in steps].count("tool") == 1
        assert len(fake.chat_requests) == 3
        assert fake.chat_requests[2].body["messages"][-1]["role"] == "tool"
    finally:
        await client.aclose()


@pytest.mark.parametrize("stop", [signal.SIGKILL, signal.SIGTERM], ids=["sigkill", "sigterm"])
async def test_scale_out_worker_killed_mid_run_another_worker_completes_it(
    heron: Heron,
    llm: tuple[FakeOpenAI, str],
    database_url: str,
    scale_out: str | None,
    stop: signal.Signals,
) -> None:
    """Two API replicas and two workers on PostgreSQL and Redis. A run created through one
    replica and streamed through the other executes on a worker, which is killed with SIGKILL
    (or stopped with SIGTERM) mid-answer: the other worker completes it, and the one stream
    sees every event once, the tool runs once, and the thread holds each message once."""
    if scale_out is None:
        pytest.skip("needs HERON_TEST_BACKEND=postgres (PostgreSQL and Redis)")
    fake, llm_url = llm
    env = {
        "HERON_DATABASE_URL": database_url,
        "HERON_REDIS_URL": scale_out,
        "HERON_SECRET_KEY": TEST_SECRET,
        "HERON_LIMITS_API_BURST": "100000",
    }
    fake.push(
        Reply(tool_calls=[ToolCall("calculator", {"expression": "6*7"}, id="call_once")]),
        Reply(text="this answer never finishes " * 50, chunk_size=4, chunk_delay=0.05),
        Reply(text="The answer is 42."),
    )
    _, client_a = await started(heron, env)
    _, client_b = await started(heron, env)
    workers = {w.proc.pid: w for w in (heron.start(env, command="worker") for _ in range(2))}
    try:
        key = (heron.home / "initial-api-key").read_text().strip()
        auth = {"Authorization": f"Bearer {key}"}
        await client_a.post(
            "/api/providers",
            json={
                "name": "fake",
                "kind": "openai-compatible",
                "base_url": llm_url,
                "api_key": "sk-crash-test-0123456789",
            },
            headers=auth,
        )
        created = await client_a.post(
            "/api/agents",
            json={"name": "calc", "model": "fake:small", "tools": ["calculator"]},
            headers=auth,
        )
        assert created.status_code == 201, created.text
        await client_a.post(f"/api/agents/{created.json()['id']}/publish", headers=auth)
        thread = (await client_a.post("/api/threads", headers=auth)).json()["id"]
        run = (
            await client_a.post(
                f"/api/threads/{thread}/runs",
                json={"agent": "calc", "input": "6*7?"},
                headers=auth,
            )
        ).json()

        events: list[tuple[int, str, dict[str, Any]]] = []
        killed: int | None = None
        after_tool = 0
        async with client_b.stream("GET", f"/api/runs/{run['id']}/events", headers=auth) as stream:
            current: list[Any] = []
            async for line in stream.aiter_lines():
                if line.startswith("id: "):
                    current = [int(line[4:])]
                elif line.startswith("event: "):
                    current.append(line[7:])
                elif line.startswith("data: "):
                    events.append((current[0], current[1], json.loads(line[6:])))
                    kind = current[1]
                    if (
                        kind == "message.delta"
                        and killed is None
                        and any(e[1] == "tool_call.completed" for e in events)
                    ):
                        after_tool += 1
                        if after_tool == 3:
                            killed = await _lease_holder(database_url, run["id"], workers)
                            os.kill(killed, stop)
                            code = workers[killed].proc.wait(timeout=30)
                            # SIGTERM: a warm shutdown that hands the run over at once.
                            assert code == (0 if stop == signal.SIGTERM else -stop), code
                    if kind in ("run.completed", "run.failed", "run.cancelled"):
                        break
        assert killed is not None
        ids = [e[0] for e in events]
        assert ids == sorted(set(ids)), "an event came twice or out of order"
        assert events[-1][1] == "run.completed", events[-1]
        assert events[-1][2]["output"] == "The answer is 42."
        restarts = [e for e in events if e[1] == "run.started"]
        assert [r[2]["resumed_after_interruption"] for r in restarts] == [False, True]
        resumed_at = events.index(restarts[1])
        after_resume = "".join(e[2].get("text", "") for e in events[resumed_at:])
        assert after_resume == "The answer is 42."
        assert [e[2]["name"] for e in events if e[1] == "tool_call.completed"] == ["calculator"]

        final = (await client_a.get(f"/api/runs/{run['id']}", headers=auth)).json()
        assert final["status"] == "completed"
        steps = (await client_a.get(f"/api/runs/{run['id']}/steps", headers=auth)).json()
        assert [s["kind"] for s in steps] == ["model", "tool", "model"]
        assert len(fake.chat_requests) == 3  # the answer cut short, asked again; nothing else
        assert fake.chat_requests[2].body["messages"][-1]["role"] == "tool"
        messages = (
            await client_a.get(f"/api/threads/{thread}/messages?limit=100", headers=auth)
        ).json()["items"]
        assert [m["role"] for m in messages] == ["user", "assistant", "tool", "assistant"]

        # The stream's history is the same through the other replica, after the end.
        async with client_a.stream("GET", f"/api/runs/{run['id']}/events", headers=auth) as stream:
            replay = [
                int(line[4:]) async for line in stream.aiter_lines() if line.startswith("id: ")
            ]
        assert replay == sorted(set(replay))
        assert replay[-1] == ids[-1]
    finally:
        for client in (client_a, client_b):
            await client.aclose()


async def _lease_holder(database_url: str, run_id: str, workers: dict[int, Any]) -> int:
    """The pid of the worker executing the run, from its lease as the database holds it."""
    import uuid

    from heron.db.engine import Database
    from heron.runs.models import Run

    db = Database(database_url)
    try:
        async with db.session(write=False) as session:
            owner = await session.scalar(select(Run.lease_owner).where(Run.id == uuid.UUID(run_id)))
    finally:
        await db.dispose()
    assert owner is not None
    pid = int(owner.rpartition(":")[2])
    assert pid in workers, f"the run executes in {owner}, not on a worker"
    return pid
