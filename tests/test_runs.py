"""Threads and runs in the embedded mode: streaming, approvals, cancellation, recovery, usage.

The model is the wire-format fake OpenAI server on loopback, reached through a real provider
connection, so the whole client path (SDK, retries, streaming) runs.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from conftest import Tenant
from fakes.openai_server import FakeOpenAI, Reply, ToolCall


@pytest.fixture
async def llm() -> AsyncIterator[tuple[FakeOpenAI, str]]:
    fake = FakeOpenAI(api_key="sk-test-runs-0123456789", models=["small", "big"])
    async with fake.serve() as url:
        yield fake, url


async def make_agent(
    client: httpx.AsyncClient, tenant: Tenant, llm_url: str, **spec: Any
) -> dict[str, Any]:
    provider = await client.post(
        "/api/providers",
        json={
            "name": "fake",
            "kind": "openai-compatible",
            "base_url": llm_url,
            "api_key": "sk-test-runs-0123456789",
        },
        headers=tenant.headers,
    )
    assert provider.status_code == 201, provider.text
    body = {"name": "helper", "model": "fake:small", "instructions": "Be brief."} | spec
    agent = await client.post("/api/agents", json=body, headers=tenant.headers)
    assert agent.status_code == 201, agent.text
    published = await client.post(
        f"/api/agents/{agent.json()['id']}/publish", headers=tenant.headers
    )
    assert published.status_code == 201
    return dict(agent.json())


async def new_thread(client: httpx.AsyncClient, tenant: Tenant, **metadata: Any) -> str:
    response = await client.post(
        "/api/threads", json={"metadata": metadata}, headers=tenant.headers
    )
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


async def read_sse(response: httpx.Response) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = []
    current: dict[str, Any] = {}
    async for line in response.aiter_lines():
        if line.startswith("id: "):
            current["id"] = int(line[4:])
        elif line.startswith("event: "):
            current["event"] = line[7:]
        elif line.startswith("data: "):
            current["data"] = json.loads(line[6:])
        elif line == "" and current:
            events.append(current)
            current = {}
    return events


async def first_delta(client: httpx.AsyncClient, tenant: Tenant, run_id: str) -> None:
    """Return once the run has streamed some of its answer."""
    async with client.stream("GET", f"/api/runs/{run_id}/events", headers=tenant.headers) as s:
        async for line in s.aiter_lines():
            if line == "event: message.delta":
                return
    raise AssertionError(f"run {run_id} ended without streaming any text")


async def wait_status(
    client: httpx.AsyncClient, tenant: Tenant, run_id: str, *wanted: str
) -> dict[str, Any]:
    for _ in range(400):
        run = (await client.get(f"/api/runs/{run_id}", headers=tenant.headers)).json()
        if run["status"] in wanted:
            return dict(run)
        await asyncio.sleep(0.025)
    raise AssertionError(f"run {run_id} stayed {run['status']}")


async def test_streamed_run_answers_with_tokens_and_persists_the_conversation(
    client: httpx.AsyncClient, alice: Tenant, llm: tuple[FakeOpenAI, str]
) -> None:
    fake, url = llm
    await make_agent(client, alice, url)
    thread = await new_thread(client, alice)
    fake.push(Reply(text="Hello there, Ada!", chunk_size=3))
    async with client.stream(
        "POST",
        f"/api/threads/{thread}/runs",
        json={"agent": "helper", "input": "Hi, I am Ada", "stream": True},
        headers=alice.headers,
    ) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["location"].startswith("/api/runs/")
        events = await read_sse(response)
    kinds = [e["event"] for e in events]
    assert kinds[:2] == ["run.queued", "run.started"]
    assert kinds[-1] == "run.completed"
    assert [e["id"] for e in events] == list(range(1, len(events) + 1))
    deltas = "".join(e["data"]["text"] for e in events if e["event"] == "message.delta")
    assert deltas == "Hello there, Ada!"
    assert sum(k == "message.delta" for k in kinds) > 1
    completed = events[-1]["data"]
    assert completed["output"] == "Hello there, Ada!"
    assert completed["usage"] == {"input_tokens": 11, "output_tokens": 7}

    messages = (await client.get(f"/api/threads/{thread}/messages", headers=alice.headers)).json()[
        "items"
    ]
    assert [(m["role"], m["parts"][0]["text"]) for m in messages] == [
        ("user", "Hi, I am Ada"),
        ("assistant", "Hello there, Ada!"),
    ]
    sent = fake.chat_requests[0].body
    assert sent["messages"][0] == {"role": "system", "content": "Be brief."}
    assert sent["stream"] is True


async def test_tools_run_and_steps_are_recorded(
    client: httpx.AsyncClient, alice: Tenant, llm: tuple[FakeOpenAI, str]
) -> None:
    fake, url = llm
    await make_agent(client, alice, url, tools=["calculator"])
    thread = await new_thread(client, alice)
    fake.push(
        Reply(tool_calls=[ToolCall("calculator", {"expression": "6*7"}, id="call_a")]),
        Reply(text="It is 42."),
    )
    run = (
        await client.post(
            f"/api/threads/{thread}/runs/wait",
            json={"agent": "helper", "input": "6 times 7?"},
            headers=alice.headers,
        )
    ).json()
    assert run["status"] == "completed", run
    assert run["output"] == "It is 42."
    assert run["input_tokens"] == 22
    steps = (await client.get(f"/api/runs/{run['id']}/steps", headers=alice.headers)).json()
    assert [(s["kind"], s["name"]) for s in steps] == [
        ("model", "fake:small"),
        ("tool", "calculator"),
        ("model", "fake:small"),
    ]
    tool_result = fake.chat_requests[1].body["messages"][-1]
    assert tool_result["role"] == "tool"
    assert "42" in tool_result["content"]
    messages = (await client.get(f"/api/threads/{thread}/messages", headers=alice.headers)).json()[
        "items"
    ]
    assert [m["role"] for m in messages] == ["user", "assistant", "tool", "assistant"]
    assert messages[1]["parts"][0] == {
        "type": "tool_call",
        "id": "call_a",
        "name": "calculator",
        "arguments": {"expression": "6*7"},
    }


async def test_an_agent_without_tools_continues_a_thread_with_tool_calls(
    client: httpx.AsyncClient, alice: Tenant, llm: tuple[FakeOpenAI, str]
) -> None:
    """An agent without tools runs with no toolset at all; the tool calls earlier in its
    thread still reach the model, and a call it makes up anyway goes back to it as an
    unknown tool, as with an empty toolset."""
    fake, url = llm
    await make_agent(client, alice, url, tools=["calculator"])
    chat = await client.post(
        "/api/agents",
        json={"name": "chat", "model": "fake:small", "instructions": "Chat."},
        headers=alice.headers,
    )
    assert chat.status_code == 201, chat.text
    thread = await new_thread(client, alice)
    fake.push(
        Reply(tool_calls=[ToolCall("calculator", {"expression": "6*7"}, id="call_a")]),
        Reply(text="It is 42."),
        Reply(tool_calls=[ToolCall("calculator", {"expression": "1+1"}, id="call_b")]),
        Reply(text="Twice that is 84."),
    )
    for agent, text in (("helper", "6 times 7?"), ("chat", "And twice that?")):
        run = (
            await client.post(
                f"/api/threads/{thread}/runs/wait",
                json={"agent": agent, "version": "draft", "input": text},
                headers=alice.headers,
            )
        ).json()
        assert run["status"] == "completed", run
    assert run["output"] == "Twice that is 84."
    made_up, answered = fake.chat_requests[2:]
    assert "tools" not in made_up.body
    assert [m["role"] for m in made_up.body["messages"]] == [
        "system",
        "user",
        "assistant",
        "tool",
        "assistant",
        "user",
    ]
    unknown = answered.body["messages"][-1]
    assert unknown["role"] == "tool"
    assert unknown["tool_call_id"] == "call_b"
    assert "Unknown tool name" in unknown["content"]


async def test_approval_pauses_then_approve_with_edited_arguments_and_deny(
    client: httpx.AsyncClient, alice: Tenant, llm: tuple[FakeOpenAI, str]
) -> None:
    fake, url = llm
    await make_agent(
        client, alice, url, tools=["calculator", "current_time"], approval={"calculator": "always"}
    )
    thread = await new_thread(client, alice)
    fake.push(
        Reply(
            tool_calls=[
                ToolCall("calculator", {"expression": "1+1"}, id="call_calc"),
                ToolCall("current_time", {"timezone": "UTC"}, id="call_time"),
            ]
        ),
        Reply(text="done"),
    )
    run = (
        await client.post(
            f"/api/threads/{thread}/runs/wait",
            json={"agent": "helper", "input": "go"},
            headers=alice.headers,
        )
    ).json()
    assert run["status"] == "requires_action"
    assert run["pending_approvals"] == [
        {"tool_call_id": "call_calc", "name": "calculator", "arguments": {"expression": "1+1"}}
    ]
    assert len(fake.chat_requests) == 1  # paused: nothing more asked of the model

    bad = await client.post(
        f"/api/runs/{run['id']}/resume",
        json={"decisions": [{"tool_call_id": "nope", "approve": True}]},
        headers=alice.headers,
    )
    assert bad.status_code == 422
    assert "call_calc" in bad.json()["detail"]

    resumed = await client.post(
        f"/api/runs/{run['id']}/resume",
        json={
            "decisions": [
                {"tool_call_id": "call_calc", "approve": True, "arguments": {"expression": "2+40"}}
            ]
        },
        headers=alice.headers,
    )
    assert resumed.status_code == 200, resumed.text
    final = await wait_status(client, alice, run["id"], "completed", "failed")
    assert final["status"] == "completed", final
    events = await read_sse(
        await client.get(f"/api/runs/{run['id']}/events?after=0", headers=alice.headers)
    )
    started = [e["data"] for e in events if e["event"] == "tool_call.started"]
    # The paused call starts once, when approved, with the arguments it really ran with.
    assert [(c["id"], c["arguments"]) for c in started] == [
        ("call_time", {"timezone": "UTC"}),
        ("call_calc", {"expression": "2+40"}),
    ]
    results = [m for m in fake.chat_requests[1].body["messages"] if m["role"] == "tool"]
    assert {r["tool_call_id"]: r["content"] for r in results}["call_calc"] == "42"

    # A denial reaches the model as the tool's result.
    fake.push(
        Reply(tool_calls=[ToolCall("calculator", {"expression": "9*9"}, id="call_no")]),
        Reply(text="ok"),
    )
    run = (
        await client.post(
            f"/api/threads/{thread}/runs/wait",
            json={"agent": "helper", "input": "again"},
            headers=alice.headers,
        )
    ).json()
    await client.post(
        f"/api/runs/{run['id']}/resume",
        json={"decisions": [{"tool_call_id": "call_no", "approve": False, "reason": "not today"}]},
        headers=alice.headers,
    )
    await wait_status(client, alice, run["id"], "completed")
    denied = [
        m for m in fake.chat_requests[-1].body["messages"] if m.get("tool_call_id") == "call_no"
    ]
    assert denied[0]["content"] == "not today"
    again = await client.post(
        f"/api/runs/{run['id']}/resume",
        json={"decisions": [{"tool_call_id": "call_no", "approve": True}]},
        headers=alice.headers,
    )
    assert again.status_code == 409


async def test_cancel_stops_a_streaming_model_within_a_second(
    client: httpx.AsyncClient, alice: Tenant, llm: tuple[FakeOpenAI, str]
) -> None:
    fake, url = llm
    await make_agent(client, alice, url)
    thread = await new_thread(client, alice)
    fake.push(Reply(text="word " * 400, chunk_size=5, chunk_delay=0.05))
    run = (
        await client.post(
            f"/api/threads/{thread}/runs",
            json={"agent": "helper", "input": "talk"},
            headers=alice.headers,
        )
    ).json()
    await first_delta(client, alice, run["id"])
    cancelled = await client.post(f"/api/runs/{run['id']}/cancel", headers=alice.headers)
    assert cancelled.status_code == 200
    final = await wait_status(client, alice, run["id"], "cancelled", "completed", "failed")
    assert final["status"] == "cancelled"
    for _ in range(40):  # the upstream stream is closed, not left running
        if fake.chat_requests[0].disconnected:
            break
        await asyncio.sleep(0.025)
    assert fake.chat_requests[0].disconnected
    assert not fake.chat_requests[0].completed
    events = (await client.get(f"/api/runs/{run['id']}/events", headers=alice.headers)).text
    assert "event: run.cancelled" in events
    assert "event: run.completed" not in events


async def test_cancel_of_a_queued_or_paused_run_is_immediate(
    client: httpx.AsyncClient, alice: Tenant, llm: tuple[FakeOpenAI, str]
) -> None:
    fake, url = llm
    await make_agent(client, alice, url, tools=["calculator"], approval={"calculator": "always"})
    thread = await new_thread(client, alice)
    fake.push(Reply(tool_calls=[ToolCall("calculator", {"expression": "1"}, id="c1")]))
    run = (
        await client.post(
            f"/api/threads/{thread}/runs/wait",
            json={"agent": "helper", "input": "x"},
            headers=alice.headers,
        )
    ).json()
    assert run["status"] == "requires_action"
    cancelled = (await client.post(f"/api/runs/{run['id']}/cancel", headers=alice.headers)).json()
    assert cancelled["status"] == "cancelled"


async def test_runs_created_on_a_thread_at_once_decide_in_turn(
    client: httpx.AsyncClient, alice: Tenant, llm: tuple[FakeOpenAI, str]
) -> None:
    """Eight runs asked for on one idle thread at the same moment: one starts, the others see
    it active and get 409 (the thread's row is taken first, so none of them misses another)."""
    fake, url = llm
    await make_agent(client, alice, url)
    thread = await new_thread(client, alice)
    fake.handler = lambda request: Reply(text="slow " * 100, chunk_size=5, chunk_delay=0.05)

    async def ask(n: int) -> httpx.Response:
        return await client.post(
            f"/api/threads/{thread}/runs",
            json={"agent": "helper", "input": f"message {n}"},
            headers=alice.headers,
        )

    answers = await asyncio.gather(*(ask(n) for n in range(8)))
    codes = sorted(a.status_code for a in answers)
    assert codes == [202] + [409] * 7, [a.text for a in answers]
    runs = (await client.get(f"/api/threads/{thread}/runs", headers=alice.headers)).json()
    assert len(runs["items"]) == 1
    (started,) = [a.json() for a in answers if a.status_code == 202]
    await client.post(f"/api/runs/{started['id']}/cancel", headers=alice.headers)
    ended = await wait_status(client, alice, started["id"], "cancelled", "completed")
    assert ended["status"] in ("cancelled", "completed")


async def test_double_texting_policies(
    client: httpx.AsyncClient, alice: Tenant, llm: tuple[FakeOpenAI, str]
) -> None:
    fake, url = llm
    await make_agent(client, alice, url)
    thread = await new_thread(client, alice)
    fake.push(Reply(text="slow " * 200, chunk_size=5, chunk_delay=0.05), Reply(text="second"))
    first = (
        await client.post(
            f"/api/threads/{thread}/runs",
            json={"agent": "helper", "input": "one"},
            headers=alice.headers,
        )
    ).json()
    rejected = await client.post(
        f"/api/threads/{thread}/runs",
        json={"agent": "helper", "input": "two"},
        headers=alice.headers,
    )
    assert rejected.status_code == 409
    assert first["id"] in rejected.json()["detail"]

    queued = (
        await client.post(
            f"/api/threads/{thread}/runs",
            json={"agent": "helper", "input": "two", "on_active_run": "enqueue"},
            headers=alice.headers,
        )
    ).json()
    assert queued["status"] == "queued"
    interrupting = await client.post(
        f"/api/threads/{thread}/runs",
        json={"agent": "helper", "input": "three", "on_active_run": "rollback"},
        headers=alice.headers,
    )
    assert interrupting.status_code == 202
    third = interrupting.json()
    final = await wait_status(client, alice, third["id"], "completed", "failed")
    assert final["status"] == "completed"
    # rollback removed the interrupted runs and their messages
    assert (await client.get(f"/api/runs/{first['id']}", headers=alice.headers)).status_code == 404
    assert (await client.get(f"/api/runs/{queued['id']}", headers=alice.headers)).status_code == 404
    texts = [
        m["parts"][0]["text"]
        for m in (
            await client.get(f"/api/threads/{thread}/messages", headers=alice.headers)
        ).json()["items"]
    ]
    assert texts == ["three", "second"]


async def test_enqueued_run_starts_after_the_active_one(
    client: httpx.AsyncClient, alice: Tenant, llm: tuple[FakeOpenAI, str]
) -> None:
    fake, url = llm
    await make_agent(client, alice, url)
    thread = await new_thread(client, alice)
    fake.push(Reply(text="first answer", chunk_delay=0.02), Reply(text="second answer"))
    first = (
        await client.post(
            f"/api/threads/{thread}/runs",
            json={"agent": "helper", "input": "1"},
            headers=alice.headers,
        )
    ).json()
    second = (
        await client.post(
            f"/api/threads/{thread}/runs",
            json={"agent": "helper", "input": "2", "on_active_run": "enqueue"},
            headers=alice.headers,
        )
    ).json()
    done = await wait_status(client, alice, second["id"], "completed", "failed")
    assert done["output"] == "second answer"
    assert (await client.get(f"/api/runs/{first['id']}", headers=alice.headers)).json()[
        "status"
    ] == "completed"
    # the second run saw the first exchange as history
    assert [m["content"] for m in fake.chat_requests[1].body["messages"][1:]] == [
        "1",
        "first answer",
        "2",
    ]


async def test_interrupt_cancels_the_active_run_and_keeps_its_messages(
    client: httpx.AsyncClient, alice: Tenant, llm: tuple[FakeOpenAI, str]
) -> None:
    fake, url = llm
    await make_agent(client, alice, url)
    thread = await new_thread(client, alice)
    fake.push(Reply(text="slow " * 200, chunk_size=5, chunk_delay=0.05), Reply(text="new"))
    first = (
        await client.post(
            f"/api/threads/{thread}/runs",
            json={"agent": "helper", "input": "one"},
            headers=alice.headers,
        )
    ).json()
    await asyncio.sleep(0.2)
    second = (
        await client.post(
            f"/api/threads/{thread}/runs",
            json={"agent": "helper", "input": "two", "on_active_run": "interrupt"},
            headers=alice.headers,
        )
    ).json()
    await wait_status(client, alice, second["id"], "completed")
    assert (await client.get(f"/api/runs/{first['id']}", headers=alice.headers)).json()[
        "status"
    ] == "cancelled"


async def test_failures_carry_a_code_and_a_message(
    client: httpx.AsyncClient, alice: Tenant, llm: tuple[FakeOpenAI, str]
) -> None:
    fake, url = llm
    await make_agent(client, alice, url, tools=["calculator"], max_steps=1)
    thread = await new_thread(client, alice)
    fake.push(
        Reply(tool_calls=[ToolCall("calculator", {"expression": "1"})]),
        Reply(tool_calls=[ToolCall("calculator", {"expression": "2"})]),
    )
    run = (
        await client.post(
            f"/api/threads/{thread}/runs/wait",
            json={"agent": "helper", "input": "loop"},
            headers=alice.headers,
        )
    ).json()
    assert (run["status"], run["error_code"]) == ("failed", "max_steps")
    assert "1 tool-call round" in run["error_message"]

    fake.push(*[Reply.failure(401)] * 3)
    thread = await new_thread(client, alice)
    run = (
        await client.post(
            f"/api/threads/{thread}/runs/wait",
            json={"agent": "helper", "input": "hi"},
            headers=alice.headers,
        )
    ).json()
    assert run["status"] == "failed"
    assert run["error_code"] == "model_unavailable"
    assert run["error_message"]


async def test_missing_variable_is_a_422_naming_it(
    client: httpx.AsyncClient, alice: Tenant, llm: tuple[FakeOpenAI, str]
) -> None:
    _, url = llm
    await make_agent(client, alice, url, instructions="Help {{user}}", variables={"user": {}})
    thread = await new_thread(client, alice)
    response = await client.post(
        f"/api/threads/{thread}/runs",
        json={"agent": "helper", "input": "hi"},
        headers=alice.headers,
    )
    assert response.status_code == 422
    assert "user" in response.json()["detail"]
    ok = await client.post(
        f"/api/threads/{thread}/runs",
        json={"agent": "helper", "input": "hi", "variables": {"user": "Ada"}},
        headers=alice.headers,
    )
    assert ok.status_code == 202


async def test_reconnecting_stream_gets_every_later_event_exactly_once(
    client: httpx.AsyncClient, alice: Tenant, llm: tuple[FakeOpenAI, str]
) -> None:
    fake, url = llm
    await make_agent(client, alice, url)
    thread = await new_thread(client, alice)
    fake.push(Reply(text="abcdefghijklmnopqrstuvwxyz" * 3, chunk_size=2, chunk_delay=0.01))
    run = (
        await client.post(
            f"/api/threads/{thread}/runs",
            json={"agent": "helper", "input": "abc"},
            headers=alice.headers,
        )
    ).json()
    seen: list[int] = []
    async with client.stream(
        "GET", f"/api/runs/{run['id']}/events", headers=alice.headers
    ) as stream:
        async for line in stream.aiter_lines():
            if line.startswith("id: "):
                seen.append(int(line[4:]))
            if len(seen) == 6:
                break
    async with client.stream(
        "GET",
        f"/api/runs/{run['id']}/events",
        headers={**alice.headers, "Last-Event-ID": str(seen[-1])},
    ) as stream:
        rest = await read_sse(stream)
    ids = seen + [e["id"] for e in rest]
    assert ids == list(range(1, len(ids) + 1))
    assert rest[-1]["event"] == "run.completed"
    # After the end: the whole history, then the end.
    late = await read_sse(
        await client.get(f"/api/runs/{run['id']}/events?after=0", headers=alice.headers)
    )
    assert [e["id"] for e in late] == ids
    assert (
        "".join(e["data"]["text"] for e in late if e["event"] == "message.delta")
        == "abcdefghijklmnopqrstuvwxyz" * 3
    )


async def test_fallback_model_answers_and_the_step_says_which(
    client: httpx.AsyncClient, alice: Tenant, llm: tuple[FakeOpenAI, str]
) -> None:
    fake, url = llm
    await make_agent(client, alice, url, model="fake:small", fallbacks=["fake:big"])
    fake.handler = lambda request: (
        Reply.failure(503) if request.model == "small" else Reply(text="big here")
    )
    thread = await new_thread(client, alice)
    run = (
        await client.post(
            f"/api/threads/{thread}/runs/wait",
            json={"agent": "helper", "input": "hi"},
            headers=alice.headers,
        )
    ).json()
    assert run["status"] == "completed", run
    assert run["model"] == "fake:big"
    steps = (await client.get(f"/api/runs/{run['id']}/steps", headers=alice.headers)).json()
    assert steps[0]["name"] == "fake:big"


async def test_usage_groups_tokens(
    client: httpx.AsyncClient, alice: Tenant, llm: tuple[FakeOpenAI, str]
) -> None:
    _, url = llm
    await make_agent(client, alice, url)
    for _ in range(2):
        thread = await new_thread(client, alice)
        await client.post(
            f"/api/threads/{thread}/runs/wait",
            json={"agent": "helper", "input": "hi"},
            headers=alice.headers,
        )
    by_agent = (await client.get("/api/usage?group_by=agent", headers=alice.headers)).json()
    assert by_agent["rows"] == [
        {"key": "helper", "runs": 2, "steps": 2, "input_tokens": 22, "output_tokens": 14}
    ]
    by_model = (await client.get("/api/usage?group_by=model", headers=alice.headers)).json()
    assert by_model["rows"][0]["key"] == "fake:small"
    by_day = (await client.get("/api/usage?group_by=day", headers=alice.headers)).json()
    assert len(by_day["rows"]) == 1
    assert len(by_day["rows"][0]["key"]) == 10
    none = (
        await client.get("/api/usage?from=2000-01-01&to=2000-01-02", headers=alice.headers)
    ).json()
    assert none["rows"] == []


async def test_threads_filter_by_metadata_and_delete(
    client: httpx.AsyncClient, alice: Tenant
) -> None:
    a = await new_thread(client, alice, user="ada", topic="x")
    await new_thread(client, alice, user="bob")
    found = (
        await client.get(
            "/api/threads", params={"metadata": json.dumps({"user": "ada"})}, headers=alice.headers
        )
    ).json()["items"]
    assert [t["id"] for t in found] == [a]
    bad = await client.get("/api/threads", params={"metadata": "[1"}, headers=alice.headers)
    assert bad.status_code == 400
    assert (await client.delete(f"/api/threads/{a}", headers=alice.headers)).status_code == 204
    assert (await client.get(f"/api/threads/{a}", headers=alice.headers)).status_code == 404


async def test_a_run_continues_after_a_restart_without_repeating_a_tool(
    tmp_path: Any, database_url: str, scale_out: str | None, llm: tuple[FakeOpenAI, str]
) -> None:
    from conftest import make_settings, make_tenant, serve
    from heron.app import create_app

    fake, url = llm
    settings = make_settings(tmp_path, database_url, scale_out)
    first = create_app(settings)
    fake.push(
        Reply(tool_calls=[ToolCall("calculator", {"expression": "6*7"}, id="call_once")]),
        # Far longer than any stop of the process can take (a loaded CI machine took 20 s):
        # the execution is always stopped in the middle of this answer.
        Reply(text="never finished " * 2000, chunk_size=4, chunk_delay=0.05),
        Reply(text="The answer is 42."),
    )
    seen: list[dict[str, Any]] = []
    async with serve(first) as base, httpx.AsyncClient(base_url=base, timeout=30) as client:
        alice = await make_tenant(first.state.db, "Alice", password=None)
        await make_agent(client, alice, url, tools=["calculator"])
        thread = await new_thread(client, alice)
        run = (
            await client.post(
                f"/api/threads/{thread}/runs",
                json={"agent": "helper", "input": "6*7?"},
                headers=alice.headers,
            )
        ).json()
        async with client.stream(
            "GET", f"/api/runs/{run['id']}/events", headers=alice.headers
        ) as stream:
            current: dict[str, Any] = {}
            deltas_after_tool = 0
            async for line in stream.aiter_lines():
                if line.startswith("id: "):
                    current = {"id": int(line[4:])}
                elif line.startswith("event: "):
                    current["event"] = line[7:]
                    seen.append(current)
                    if current["event"] == "message.delta" and any(
                        e["event"] == "tool_call.completed" for e in seen
                    ):
                        deltas_after_tool += 1
                        if deltas_after_tool == 3:
                            break
    # The process stopped mid-stream: the run is left running, for the next start to continue.
    async with _open(settings) as db:
        from heron.runs.models import Run as RunRow

        async with db.session(write=False) as session:
            row = await session.get(RunRow, uuid.UUID(run["id"]))
            assert row is not None
            assert row.status.value == "running"

    second = create_app(settings)
    async with serve(second) as base, httpx.AsyncClient(base_url=base, timeout=30) as client:
        final = await wait_status(client, alice, run["id"], "completed", "failed")
        assert final["status"] == "completed", final
        assert final["output"] == "The answer is 42."
        steps = (await client.get(f"/api/runs/{run['id']}/steps", headers=alice.headers)).json()
        assert [s["kind"] for s in steps].count("tool") == 1  # the tool ran once
        tool_messages = [
            m
            for m in (
                await client.get(f"/api/threads/{thread}/messages", headers=alice.headers)
            ).json()["items"]
            if m["role"] == "tool"
        ]
        assert len(tool_messages) == 1
        # Resuming from the last id this client saw gives every later event once, in order.
        async with client.stream(
            "GET",
            f"/api/runs/{run['id']}/events",
            headers={**alice.headers, "Last-Event-ID": str(seen[-1]["id"])},
        ) as stream:
            rest = await read_sse(stream)
        ids = [e["id"] for e in rest]
        assert ids == sorted(set(ids))
        assert ids[0] > seen[-1]["id"]
        assert rest[0]["event"] == "run.started", (seen[-3:], rest[:3])  # what was kept, if not
        assert rest[0]["data"]["resumed_after_interruption"] is True
        assert rest[-1]["event"] == "run.completed"
        assert not [e for e in rest if e["event"].startswith("tool_call.")]  # not run again
        text = "".join(e["data"]["text"] for e in rest if e["event"] == "message.delta")
        assert text == "The answer is 42."
    # The model was asked three times: the tool call, the interrupted answer, the answer.
    assert len(fake.chat_requests) == 3
    assert fake.chat_requests[2].body["messages"][-1]["role"] == "tool"


async def test_a_stop_cuts_every_streaming_run_short_and_leaves_it_to_continue(
    tmp_path: Any, database_url: str, scale_out: str | None, llm: tuple[FakeOpenAI, str]
) -> None:
    """The process (or worker) stops while runs stream: every model stream is cut at once,
    not waited out, however the cancellation lands (one that a library swallows is repeated:
    with Redis, many single cancels were lost)."""
    from conftest import make_settings, make_tenant, serve
    from heron.app import create_app

    fake, url = llm
    settings = make_settings(tmp_path, database_url, scale_out)
    app = create_app(settings)
    count = 10
    # Each answer streams for about a minute, an event every 5 ms.
    fake.push(*[Reply(text="word " * 12_000, chunk_size=5, chunk_delay=0.005)] * count)
    async with serve(app) as base, httpx.AsyncClient(base_url=base, timeout=30) as client:
        alice = await make_tenant(app.state.db, "Alice", password=None)
        await make_agent(client, alice, url)
        runs = []
        for _ in range(count):
            thread = await new_thread(client, alice)
            created = await client.post(
                f"/api/threads/{thread}/runs",
                json={"agent": "helper", "input": "talk"},
                headers=alice.headers,
            )
            runs.append(created.json()["id"])
        for run_id in runs:  # every run is streaming its answer
            await first_delta(client, alice, run_id)
    requests = fake.chat_requests
    assert len(requests) == count
    for _ in range(40):
        if all(r.disconnected for r in requests):
            break
        await asyncio.sleep(0.025)
    assert [(r.disconnected, r.completed) for r in requests] == [(True, False)] * count
    async with _open(settings) as db:
        from heron.runs.models import Run as RunRow

        async with db.session(write=False) as session:
            for run_id in runs:
                row = await session.get(RunRow, uuid.UUID(run_id))
                assert row is not None
                assert row.status.value == "running"  # for the next start to continue


def _open(settings: Any) -> Any:
    from contextlib import asynccontextmanager

    from heron.db.engine import Database

    @asynccontextmanager
    async def opened() -> Any:
        db = Database(settings.database_url)
        try:
            yield db
        finally:
            await db.dispose()

    return opened()


async def test_another_api_process_streams_a_run_step_by_step(
    tmp_path: Any, database_url: str, scale_out: str | None, llm: tuple[FakeOpenAI, str]
) -> None:
    from conftest import make_settings, make_tenant, serve
    from heron.app import create_app

    fake, url = llm
    settings = make_settings(tmp_path, database_url, scale_out)
    one, two = create_app(settings), create_app(settings)
    fake.push(
        Reply(
            tool_calls=[ToolCall("calculator", {"expression": "2+2"}, id="c")], first_byte_delay=0.3
        ),
        Reply(text="It is four.", first_byte_delay=0.3),
    )
    async with (
        serve(one) as url_one,
        serve(two, with_worker=False) as url_two,
        httpx.AsyncClient(timeout=30) as client,
    ):
        alice = await make_tenant(one.state.db, "Alice", password=None)
        async with httpx.AsyncClient(base_url=url_one, timeout=30) as c1:
            await make_agent(c1, alice, url, tools=["calculator"])
            thread = await new_thread(c1, alice)
            run = (
                await c1.post(
                    f"/api/threads/{thread}/runs",
                    json={"agent": "helper", "input": "2+2"},
                    headers=alice.headers,
                )
            ).json()
        async with client.stream(
            "GET", f"{url_two}/api/runs/{run['id']}/events", headers=alice.headers
        ) as s:
            events = await read_sse(s)
    kinds = [e["event"] for e in events]
    assert kinds[0] == "run.queued"
    assert "tool_call.completed" in kinds
    assert kinds[-1] == "run.completed"
    assert [e["id"] for e in events] == list(range(1, len(events) + 1))
    assert events[-1]["data"]["output"] == "It is four."


async def test_a_cancel_committed_while_a_run_pauses_wins(
    app: Any, client: httpx.AsyncClient, alice: Tenant, llm: tuple[FakeOpenAI, str]
) -> None:
    """The API's cancel and the executor's pause lock the run's row in turn: a pause that
    comes while a cancel's transaction is open waits for it, sees the cancel, writes nothing;
    the execution then ends the run cancelled (a paused run never keeps a taken cancel)."""
    from sqlalchemy import select

    from heron.core.ids import utcnow
    from heron.runs.events import MemoryEventLog
    from heron.runs.executor import RunContext, _CancelledMeanwhile, _finish, _Progress
    from heron.runs.models import Run as RunRow
    from heron.runs.models import RunEvent, RunStatus
    from heron.runs.service import RunRepository

    _, url = llm
    agent = await make_agent(client, alice, url, tools=["calculator"])
    thread = await new_thread(client, alice)
    db = app.state.db
    ctx = RunContext(db, MemoryEventLog(), app.state.secret_box, owner="test", run_timeout=60)
    async with db.session(write=True) as session, session.begin():
        run = RunRow(
            workspace_id=alice.workspace_id,
            thread_id=uuid.UUID(thread),
            agent_id=uuid.UUID(agent["id"]),
            spec={},
            input=[],
            status=RunStatus.running,
            attempts=1,
        )
        session.add(run)
    progress = _Progress(run=run, seq=0)
    pending = {"tool_call_id": "c1", "name": "calculator", "arguments": {"expression": "1+1"}}

    async with db.session(write=True) as session, session.begin():
        row = await RunRepository(session, alice.workspace_id).locked_or_404(run.id)
        assert row.status == RunStatus.running
        row.cancel_requested_at = utcnow()
        await session.flush()
        pausing = asyncio.create_task(
            _finish(
                ctx,
                progress,
                [],
                RunStatus.requires_action,
                "approval.required",
                {"pending_approvals": [pending]},
            )
        )
        await asyncio.sleep(0.3)  # the pause is under way, waiting for the row
    with pytest.raises(_CancelledMeanwhile):
        await pausing
    await _finish(ctx, progress, [], RunStatus.cancelled, "run.cancelled", {})

    async with db.session(write=False) as session:
        stored = await session.get(RunRow, run.id)
        assert stored is not None
        assert (stored.status, stored.pending_approvals) == (RunStatus.cancelled, None)
        events = (
            await session.execute(
                select(RunEvent.seq, RunEvent.type).where(RunEvent.run_id == run.id)
            )
        ).all()
        assert [tuple(e) for e in events] == [(1, "run.cancelled")]


async def test_failed_and_cancelled_runs_keep_the_earlier_conversation(
    client: httpx.AsyncClient, alice: Tenant, llm: tuple[FakeOpenAI, str]
) -> None:
    fake, url = llm
    await make_agent(client, alice, url)
    thread = await new_thread(client, alice)
    fake.push(Reply(text="first answer"))
    await client.post(
        f"/api/threads/{thread}/runs/wait",
        json={"agent": "helper", "input": "one"},
        headers=alice.headers,
    )
    fake.push(Reply.failure(400))  # refused: neither retried nor passed to a fallback
    failed = (
        await client.post(
            f"/api/threads/{thread}/runs/wait",
            json={"agent": "helper", "input": "two"},
            headers=alice.headers,
        )
    ).json()
    assert failed["status"] == "failed"
    fake.push(Reply(text="slow " * 300, chunk_delay=0.05))
    run = (
        await client.post(
            f"/api/threads/{thread}/runs",
            json={"agent": "helper", "input": "three"},
            headers=alice.headers,
        )
    ).json()
    await asyncio.sleep(0.3)
    await client.post(f"/api/runs/{run['id']}/cancel", headers=alice.headers)
    await wait_status(client, alice, run["id"], "cancelled")
    messages = (await client.get(f"/api/threads/{thread}/messages", headers=alice.headers)).json()
    # (pydantic-ai joins the failed run's unanswered prompt and the next one into one request)
    texts = [p["text"] for m in messages["items"] for p in m["parts"]]
    assert texts == ["one", "first answer", "two", "three"]


async def test_deleting_an_agent_with_runs_archives_it(
    client: httpx.AsyncClient, alice: Tenant, llm: tuple[FakeOpenAI, str]
) -> None:
    _, url = llm
    agent = await make_agent(client, alice, url)
    thread = await new_thread(client, alice)
    run = (
        await client.post(
            f"/api/threads/{thread}/runs/wait",
            json={"agent": "helper", "input": "hi"},
            headers=alice.headers,
        )
    ).json()
    assert (
        await client.delete(f"/api/agents/{agent['id']}", headers=alice.headers)
    ).status_code == 204
    kept = (await client.get(f"/api/agents/{agent['id']}", headers=alice.headers)).json()
    assert kept["archived_at"] is not None
    assert (await client.get(f"/api/runs/{run['id']}", headers=alice.headers)).json()[
        "agent_id"
    ] == agent["id"]
    assert (await client.get("/api/agents", headers=alice.headers)).json()["items"] == []


async def test_a_cancel_sent_to_another_api_process_stops_the_run(
    tmp_path: Any, database_url: str, scale_out: str | None, llm: tuple[FakeOpenAI, str]
) -> None:
    from conftest import make_settings, make_tenant, serve
    from heron.app import create_app

    fake, url = llm
    settings = make_settings(tmp_path, database_url, scale_out)
    one, two = create_app(settings), create_app(settings)
    fake.push(Reply(text="word " * 400, chunk_size=5, chunk_delay=0.05))
    async with serve(one) as url_one, serve(two, with_worker=False) as url_two:
        alice = await make_tenant(one.state.db, "Alice", password=None)
        async with httpx.AsyncClient(base_url=url_one, timeout=30) as c1:
            await make_agent(c1, alice, url)
            thread = await new_thread(c1, alice)
            run = (
                await c1.post(
                    f"/api/threads/{thread}/runs",
                    json={"agent": "helper", "input": "go"},
                    headers=alice.headers,
                )
            ).json()
            await first_delta(c1, alice, run["id"])
        async with httpx.AsyncClient(base_url=url_two, timeout=30) as c2:
            assert (
                await c2.post(f"/api/runs/{run['id']}/cancel", headers=alice.headers)
            ).status_code == 200
            final = await wait_status(c2, alice, run["id"], "cancelled", "completed", "failed")
    assert final["status"] == "cancelled"
    assert not fake.chat_requests[0].completed


async def test_the_first_finished_run_settles_the_heap_once(
    client: httpx.AsyncClient,
    alice: Tenant,
    llm: tuple[FakeOpenAI, str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Once the process has finished its first run, the libraries a run needs are loaded: the
    heap is collected and frozen then (heron.core.heap), so full collections stop rescanning
    them; later runs leave it alone."""
    import gc

    from heron.core import heap

    frozen: list[int] = []
    monkeypatch.setattr(heap, "_settled", set())
    monkeypatch.setattr(gc, "freeze", lambda: frozen.append(1))
    fake, url = llm
    await make_agent(client, alice, url)
    for answer in ("One.", "Two."):
        thread = await new_thread(client, alice)
        fake.push(Reply(text=answer))
        run = (
            await client.post(
                f"/api/threads/{thread}/runs/wait",
                json={"agent": "helper", "input": "Count."},
                headers=alice.headers,
            )
        ).json()
        assert run["output"] == answer
    for _ in range(100):  # the executor settles just after announcing the end
        if frozen:
            break
        await asyncio.sleep(0.05)
    assert frozen == [1]


def test_settling_freezes_what_is_alive_once_per_kind(monkeypatch: pytest.MonkeyPatch) -> None:
    import gc

    from heron.core import heap

    monkeypatch.setattr(heap, "_settled", set())
    kept = [[n] for n in range(10)]  # alive, tracked by the collector: frozen with the rest
    assert heap.settle("test")
    assert gc.get_freeze_count() >= len(kept)
    assert not heap.settle("test")
    assert heap.settle("another kind")


async def test_a_run_failing_after_an_answer_keeps_that_answer(
    client: httpx.AsyncClient, alice: Tenant, llm: tuple[FakeOpenAI, str]
) -> None:
    """An answer without tool calls is written with whatever is written next, not by a write
    of its own: here a structured-output agent keeps answering plain text until pydantic-ai
    gives up. Every answer is in the thread, the last one written by the run's failure, and
    each has its step and its `message.completed` event."""
    fake, url = llm
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    await make_agent(client, alice, url, output_schema=schema)
    thread = await new_thread(client, alice)
    fake.push(*(Reply(text=f"Plain words, try {n}.") for n in range(1, 6)))
    run = (
        await client.post(
            f"/api/threads/{thread}/runs/wait",
            json={"agent": "helper", "input": "Give me n."},
            headers=alice.headers,
        )
    ).json()
    assert run["status"] == "failed", run
    asked = len(fake.chat_requests)
    assert asked >= 2
    messages = (await client.get(f"/api/threads/{thread}/messages", headers=alice.headers)).json()
    said = [
        part["text"]
        for m in messages["items"]
        if m["role"] == "assistant"
        for part in m["parts"]
        if part["type"] == "text"
    ]
    assert said == [f"Plain words, try {n}." for n in range(1, asked + 1)]
    assert messages["items"][-1]["role"] == "assistant"  # the last answer, not lost
    steps = (await client.get(f"/api/runs/{run['id']}/steps", headers=alice.headers)).json()
    assert [s["kind"] for s in steps] == ["model"] * asked
    stored = (await client.get(f"/api/runs/{run['id']}", headers=alice.headers)).json()
    assert stored["model"] is not None
    assert stored["output_tokens"] > 0
    async with client.stream(
        "GET", f"/api/runs/{run['id']}/events", headers=alice.headers
    ) as response:
        events = await read_sse(response)
    kinds = [e["event"] for e in events]
    assert kinds.count("message.completed") == asked
    assert kinds[-1] == "run.failed"
