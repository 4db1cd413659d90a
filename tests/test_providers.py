"""Provider connections: CRUD with credentials that are encrypted at rest and never shown, a
check that really calls the provider (a fake OpenAI server on loopback) and says what went wrong,
and models built from connections that retry transient failures and fall back to other
providers only when the provider, not the request, failed."""

from __future__ import annotations

import asyncio
import json
import socket
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from pydantic_ai import Agent
from pydantic_ai.exceptions import ModelHTTPError, ModelRequestRejectedError
from sqlalchemy import text

from conftest import TEST_SECRET, Tenant, key_for
from fakes.openai_server import FakeOpenAI, Reply, ToolCall
from heron.core.crypto import SecretBox
from heron.db.engine import Database
from heron.providers import service
from heron.providers.runtime import (
    ModelRef,
    ModelRuntime,
    RetryPolicy,
    UnknownModelReference,
)
from heron.tenancy.models import Role

PROBLEM = "application/problem+json"
API_KEY = "sk-test-secret-0123456789abcd"
FAST = RetryPolicy(attempts=3, initial_wait=0.001, max_wait=0.002, jitter=0.001)


@pytest.fixture
async def fake() -> AsyncIterator[tuple[FakeOpenAI, str]]:
    server = FakeOpenAI(api_key=API_KEY, models=["gpt-test", "gpt-test-mini"])
    async with server.serve() as url:
        yield server, url


@pytest.fixture
async def backup() -> AsyncIterator[tuple[FakeOpenAI, str]]:
    server = FakeOpenAI(models=["backup-model"])
    async with server.serve() as url:
        yield server, url


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1"  # nothing listens there any more


async def add_provider(client: httpx.AsyncClient, tenant: Tenant, **fields: Any) -> dict[str, Any]:
    response = await client.post("/api/providers", json=fields, headers=tenant.headers)
    assert response.status_code == 201, response.text
    body: dict[str, Any] = response.json()
    return body


async def check(
    client: httpx.AsyncClient, tenant: Tenant, provider_id: str, model: str | None = None
) -> dict[str, Any]:
    response = await client.post(
        f"/api/providers/{provider_id}/check",
        json={"model": model} if model else None,
        headers=tenant.headers,
    )
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


# CRUD -----------------------------------------------------------------------------------------


async def test_provider_crud_shows_a_masked_key_and_never_the_secrets(
    client: httpx.AsyncClient, alice: Tenant
) -> None:
    created = await add_provider(
        client,
        alice,
        name="local-ollama",
        kind="openai-compatible",
        base_url="http://localhost:11434/v1/",
        api_key=API_KEY,
        extra_headers={"X-Team": "team-secret-value"},
        timeout_seconds=12.5,
    )
    assert created["name"] == "local-ollama"
    assert created["kind"] == "openai-compatible"
    assert created["base_url"] == "http://localhost:11434/v1"
    assert created["api_key_masked"] == "sk-…abcd"
    assert created["extra_header_names"] == ["X-Team"]
    assert created["timeout_seconds"] == 12.5
    assert created["models"] is None
    for response_text in (
        (await client.get("/api/providers", headers=alice.headers)).text,
        (await client.get(f"/api/providers/{created['id']}", headers=alice.headers)).text,
    ):
        assert API_KEY not in response_text
        assert "team-secret-value" not in response_text
        assert created["id"] in response_text

    page = (await client.get("/api/providers", headers=alice.headers)).json()
    assert set(page) == {"items", "next_cursor"}
    assert [p["name"] for p in page["items"]] == ["local-ollama"]

    patched = await client.patch(
        f"/api/providers/{created['id']}",
        json={"name": "ollama", "api_key": "short", "extra_headers": None},
        headers=alice.headers,
    )
    assert patched.status_code == 200, patched.text
    assert patched.json()["name"] == "ollama"
    assert patched.json()["api_key_masked"] == "********"  # too short to show any of it
    assert patched.json()["extra_header_names"] == []
    assert patched.json()["base_url"] == "http://localhost:11434/v1"  # untouched

    cleared = await client.patch(
        f"/api/providers/{created['id']}", json={"api_key": None}, headers=alice.headers
    )
    assert cleared.json()["api_key_masked"] is None  # openai-compatible may go without a key

    deleted = await client.delete(f"/api/providers/{created['id']}", headers=alice.headers)
    assert deleted.status_code == 204
    gone = await client.get(f"/api/providers/{created['id']}", headers=alice.headers)
    assert gone.status_code == 404
    assert gone.headers["content-type"] == PROBLEM


async def test_a_duplicate_name_is_a_409_naming_the_field(
    client: httpx.AsyncClient, alice: Tenant, bob: Tenant
) -> None:
    fields = {"name": "main", "kind": "openai", "api_key": API_KEY}
    await add_provider(client, alice, **fields)
    other = await add_provider(client, alice, **{**fields, "name": "other"})
    await add_provider(client, bob, **fields)  # names are unique per workspace only

    again = await client.post("/api/providers", json=fields, headers=alice.headers)
    renamed = await client.patch(
        f"/api/providers/{other['id']}", json={"name": "main"}, headers=alice.headers
    )
    for response in (again, renamed):
        assert response.status_code == 409, response.text
        assert response.headers["content-type"] == PROBLEM
        body = response.json()
        assert body["type"] == "urn:heron:problem:conflict"
        assert "name" in body["detail"]
        assert body["errors"][0]["loc"] == ["body", "name"]


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"kind": "azure"}, "kind"),
        ({"base_url": "ftp://example.com/v1"}, "base_url"),
        ({"base_url": "not a url"}, "base_url"),
        ({"base_url": "https://user:pw@example.com/v1"}, "base_url"),
        ({"kind": "openai-compatible", "api_key": None}, "base_url"),
        ({"kind": "anthropic", "api_key": None}, "api_key"),
        ({"name": "a:b"}, "name"),
        ({"timeout_seconds": 0}, "timeout_seconds"),
        ({"extra_headers": {"Bad Name": "1"}}, "extra_headers"),
        ({"extra_headers": {"Authorization": "Bearer x"}}, "extra_headers"),
        ({"colour": "blue"}, "colour"),
    ],
)
async def test_invalid_providers_are_422_naming_the_field(
    client: httpx.AsyncClient, alice: Tenant, change: dict[str, Any], field: str
) -> None:
    fields = {"name": "x", "kind": "openai", "api_key": API_KEY, **change}
    response = await client.post("/api/providers", json=fields, headers=alice.headers)
    assert response.status_code == 422, response.text
    body = response.json()
    assert body["type"] == "urn:heron:problem:validation-error"
    assert body["errors"][0]["loc"] == ["body", field]


async def test_changing_the_kind_rechecks_what_it_needs(
    client: httpx.AsyncClient, alice: Tenant
) -> None:
    created = await add_provider(
        client, alice, name="p", kind="openai-compatible", base_url="http://127.0.0.1:9/v1"
    )
    response = await client.patch(
        f"/api/providers/{created['id']}", json={"kind": "groq"}, headers=alice.headers
    )
    assert response.status_code == 422
    assert response.json()["errors"][0]["loc"] == ["body", "api_key"]


async def test_viewers_read_providers_but_only_admins_change_or_check_them(
    client: httpx.AsyncClient, db: Database, alice: Tenant
) -> None:
    created = await add_provider(client, alice, name="p", kind="openai", api_key=API_KEY)
    for role in (Role.viewer, Role.member):
        headers = {"Authorization": f"Bearer {await key_for(db, alice, role)}"}
        assert (await client.get("/api/providers", headers=headers)).status_code == 200
        path = f"/api/providers/{created['id']}"
        assert (await client.get(path, headers=headers)).status_code == 200
        for method, url, body in (
            ("POST", "/api/providers", {"name": "q", "kind": "openai", "api_key": API_KEY}),
            ("PATCH", path, {"name": "q"}),
            ("DELETE", path, None),
            ("POST", f"{path}/check", None),
        ):
            response = await client.request(method, url, json=body, headers=headers)
            assert response.status_code == 403, (role, method, url, response.text)


# Encryption at rest ---------------------------------------------------------------------------


async def test_credentials_are_unreadable_in_the_raw_database(
    client: httpx.AsyncClient, db: Database, alice: Tenant
) -> None:
    await add_provider(
        client,
        alice,
        name="enc",
        kind="openai",
        api_key=API_KEY,
        extra_headers={"OpenAI-Organization": "org-very-secret"},
    )
    async with db.session(write=False) as session:
        rows = (await session.execute(text("SELECT * FROM providers"))).mappings().all()
    raw = repr([dict(r) for r in rows])
    assert API_KEY not in raw
    assert API_KEY[-12:] not in raw
    assert "org-very-secret" not in raw
    box = SecretBox(TEST_SECRET)
    assert box.decrypt(rows[0]["api_key_encrypted"]) == API_KEY


# The check ------------------------------------------------------------------------------------


async def test_check_lists_models_runs_the_model_and_remembers_the_list(
    client: httpx.AsyncClient, alice: Tenant, fake: tuple[FakeOpenAI, str]
) -> None:
    server, url = fake
    created = await add_provider(
        client,
        alice,
        name="fake",
        kind="openai-compatible",
        base_url=url,
        api_key=API_KEY,
        extra_headers={"X-Tenant": "alice"},
    )
    result = await check(client, alice, created["id"], model="gpt-test")
    assert result["ok"] is True, result
    assert result["error"] is None
    assert result["models"] == ["gpt-test", "gpt-test-mini"]
    assert isinstance(result["latency_ms"], int)
    assert result["latency_ms"] >= 0

    listing, completion = server.requests
    assert listing.path == "/v1/models"
    assert completion.path == "/v1/chat/completions"
    assert completion.body["model"] == "gpt-test"
    assert 1 in (completion.body.get("max_tokens"), completion.body.get("max_completion_tokens"))
    for request in server.requests:
        assert request.headers["authorization"] == f"Bearer {API_KEY}"
        assert request.headers["x-tenant"] == "alice"

    stored = (await client.get(f"/api/providers/{created['id']}", headers=alice.headers)).json()
    assert stored["models"] == ["gpt-test", "gpt-test-mini"]
    assert stored["models_checked_at"] is not None


async def test_check_reports_bad_credentials_with_the_providers_reason(
    client: httpx.AsyncClient, alice: Tenant, fake: tuple[FakeOpenAI, str]
) -> None:
    _, url = fake
    created = await add_provider(
        client, alice, name="fake", kind="openai", base_url=url, api_key="sk-wrong-key-000000"
    )
    result = await check(client, alice, created["id"])
    assert result["ok"] is False
    assert result["error"]["code"] == "bad_credentials"
    assert result["error"]["status"] == 401
    assert "Incorrect API key provided" in result["error"]["message"]
    assert "sk-wrong-key-000000" not in result["error"]["message"]


async def test_check_reports_an_unreachable_provider(
    client: httpx.AsyncClient, alice: Tenant
) -> None:
    created = await add_provider(
        client, alice, name="nobody", kind="openai-compatible", base_url=closed_port_url()
    )
    result = await check(client, alice, created["id"], model="anything")
    assert result["ok"] is False
    assert result["error"]["code"] == "unreachable"
    assert result["error"]["status"] is None
    assert result["models"] == []


async def test_check_reports_rate_limiting(
    client: httpx.AsyncClient, alice: Tenant, fake: tuple[FakeOpenAI, str]
) -> None:
    server, url = fake
    server.models_failure = Reply.failure(
        429,
        "Rate limit reached for requests per min. Please try again in 20s.",
        type="requests",
        code="rate_limit_exceeded",
        retry_after=20,
    )
    created = await add_provider(
        client, alice, name="fake", kind="openai-compatible", base_url=url, api_key=API_KEY
    )
    result = await check(client, alice, created["id"])
    assert result["error"]["code"] == "rate_limited"
    assert result["error"]["status"] == 429
    assert "Rate limit reached" in result["error"]["message"]
    assert "retry after 20" in result["error"]["message"]


async def test_check_reports_a_model_the_provider_does_not_know(
    client: httpx.AsyncClient, alice: Tenant, fake: tuple[FakeOpenAI, str]
) -> None:
    server, url = fake
    created = await add_provider(
        client, alice, name="fake", kind="openai-compatible", base_url=url, api_key=API_KEY
    )
    result = await check(client, alice, created["id"], model="gpt-nonexistent")
    assert result["ok"] is False
    assert result["error"]["code"] == "unknown_model"
    assert "gpt-nonexistent" in result["error"]["message"]
    assert result["models"] == ["gpt-test", "gpt-test-mini"]
    assert server.chat_requests == []  # not worth a completion

    # Listed, but the completion says 404: unknown too, with the provider's words.
    server.push(
        Reply.failure(
            404,
            "The model `gpt-test` has been retired.",
            type="invalid_request_error",
            code="model_not_found",
        )
    )
    result = await check(client, alice, created["id"], model="gpt-test")
    assert result["error"] == {
        "code": "unknown_model",
        "message": "The model `gpt-test` has been retired.",
        "status": 404,
    }


async def test_check_reports_provider_errors_and_timeouts(
    client: httpx.AsyncClient, alice: Tenant, fake: tuple[FakeOpenAI, str]
) -> None:
    server, url = fake
    created = await add_provider(
        client,
        alice,
        name="fake",
        kind="openai-compatible",
        base_url=url,
        api_key=API_KEY,
        timeout_seconds=0.2,
    )
    server.models_failure = Reply.failure(500, "The server had an error processing your request.")
    result = await check(client, alice, created["id"])
    assert result["error"] == {
        "code": "provider_error",
        "message": "The server had an error processing your request.",
        "status": 500,
    }

    server.models_failure = None
    server.push(Reply(text="late", first_byte_delay=1.0))
    result = await check(client, alice, created["id"], model="gpt-test")
    assert result["error"]["code"] == "timeout", result

    server.models_failure = Reply(first_byte_delay=1.0)
    result = await check(client, alice, created["id"])
    assert result["error"]["code"] == "timeout", result


async def test_model_list_is_live_and_falls_back_to_the_last_one_seen(
    client: httpx.AsyncClient, db: Database, alice: Tenant, fake: tuple[FakeOpenAI, str]
) -> None:
    server, url = fake
    created = await add_provider(
        client, alice, name="fake", kind="openai-compatible", base_url=url, api_key=API_KEY
    )
    viewer = {"Authorization": f"Bearer {await key_for(db, alice, Role.viewer)}"}
    path = f"/api/providers/{created['id']}/models"
    live = (await client.get(path, headers=viewer)).json()
    assert live["live"] is True
    assert live["models"] == ["gpt-test", "gpt-test-mini"]
    assert live["error"] is None
    assert live["checked_at"] is not None

    server.models = ["gpt-test"]
    server.models_failure = Reply.failure(503, "Service temporarily unavailable")
    cached = (await client.get(path, headers=viewer)).json()
    assert cached["live"] is False
    assert cached["models"] == ["gpt-test", "gpt-test-mini"]  # as it was last seen
    assert cached["checked_at"] == live["checked_at"]
    assert cached["error"]["code"] == "provider_error"
    assert cached["error"]["status"] == 503


# Models built from connections ----------------------------------------------------------------


async def runtime_for(db: Database, tenant: Tenant, *names: str, **kwargs: Any) -> ModelRuntime:
    async with db.session(write=False) as session:
        connections = await service.connections(
            session, tenant.workspace_id, SecretBox(TEST_SECRET), names
        )
    return ModelRuntime(connections, **kwargs)


async def test_an_agent_answers_through_a_stored_connection(
    client: httpx.AsyncClient, db: Database, alice: Tenant, fake: tuple[FakeOpenAI, str]
) -> None:
    server, url = fake
    await add_provider(
        client,
        alice,
        name="local-llm",
        kind="openai-compatible",
        base_url=url,
        api_key=API_KEY,
        extra_headers={"X-Tenant": "alice"},
    )
    server.models.append("qwen3:8b")
    server.push(Reply(text="Hello from the fake provider."))
    async with await runtime_for(db, alice, "local-llm") as runtime:
        result = await Agent(runtime.model("local-llm:qwen3:8b")).run("Say hello")
    assert result.output == "Hello from the fake provider."
    assert result.response.model_name == "qwen3:8b"
    (request,) = server.chat_requests
    assert request.body["model"] == "qwen3:8b"  # split on the first colon only
    assert request.body["messages"][-1] == {"role": "user", "content": "Say hello"}
    assert request.headers["authorization"] == f"Bearer {API_KEY}"
    assert request.headers["x-tenant"] == "alice"


async def test_streamed_tool_calls_come_through_the_wire_format(
    client: httpx.AsyncClient, db: Database, alice: Tenant, fake: tuple[FakeOpenAI, str]
) -> None:
    server, url = fake
    await add_provider(
        client, alice, name="p", kind="openai-compatible", base_url=url, api_key=API_KEY
    )
    server.push(
        Reply(tool_calls=[ToolCall("get_weather", {"city": "Paris"})], chunk_size=3),
        Reply(text="Sunny in Paris.", chunk_size=2, completion_tokens=5),
    )
    async with await runtime_for(db, alice, "p") as runtime:
        agent = Agent(runtime.model("p:gpt-test"))
        seen: list[str] = []

        @agent.tool_plain
        def get_weather(city: str) -> str:
            seen.append(city)
            return f"sunny in {city}"

        async with agent.run_stream("Weather in Paris?") as stream:
            output = await stream.get_output()
        usage = stream.usage
    assert output == "Sunny in Paris."
    assert seen == ["Paris"]
    first, second = server.chat_requests
    assert first.stream
    assert first.completed
    assert first.body["stream_options"] == {"include_usage": True}
    tool_result = second.body["messages"][-1]
    assert tool_result["role"] == "tool"
    assert tool_result["content"] == "sunny in Paris"
    assert usage.output_tokens == 7 + 5


async def test_a_single_503_is_retried_and_then_succeeds(
    client: httpx.AsyncClient, db: Database, alice: Tenant, fake: tuple[FakeOpenAI, str]
) -> None:
    server, url = fake
    await add_provider(
        client, alice, name="p", kind="openai-compatible", base_url=url, api_key=API_KEY
    )
    server.push(Reply.failure(503, "Overloaded, try again"), Reply(text="second time lucky"))
    async with await runtime_for(db, alice, "p", retry=FAST) as runtime:
        result = await Agent(runtime.model("p:gpt-test")).run("hi")
    assert result.output == "second time lucky"
    assert len(server.chat_requests) == 2


async def test_retries_wait_as_long_as_retry_after_says(
    client: httpx.AsyncClient, db: Database, alice: Tenant, fake: tuple[FakeOpenAI, str]
) -> None:
    server, url = fake
    await add_provider(
        client, alice, name="p", kind="openai-compatible", base_url=url, api_key=API_KEY
    )
    waits: list[float] = []

    async def sleep(seconds: float) -> None:
        waits.append(seconds)  # observed, not slept

    server.push(Reply.failure(429, "Slow down", retry_after=7), Reply(text="ok then"))
    policy = RetryPolicy(attempts=3, initial_wait=0.001, max_wait=0.002, sleep=sleep)
    async with await runtime_for(db, alice, "p", retry=policy) as runtime:
        result = await Agent(runtime.model("p:gpt-test")).run("hi")
    assert result.output == "ok then"
    assert waits == [7.0]


async def test_falls_back_to_another_provider_when_the_primary_keeps_failing(
    client: httpx.AsyncClient,
    db: Database,
    alice: Tenant,
    fake: tuple[FakeOpenAI, str],
    backup: tuple[FakeOpenAI, str],
) -> None:
    primary, primary_url = fake
    secondary, secondary_url = backup
    await add_provider(
        client, alice, name="main", kind="openai", base_url=primary_url, api_key=API_KEY
    )
    await add_provider(
        client, alice, name="spare", kind="openai-compatible", base_url=secondary_url
    )
    primary.handler = lambda request: Reply.failure(500, "The server had an error.")
    secondary.push(Reply(text="the spare answered"))
    async with await runtime_for(db, alice, "main", "spare", retry=FAST) as runtime:
        model = runtime.fallback_model("main:gpt-test", ["spare:backup-model"])
        result = await Agent(model).run("hi")
        answered = runtime.answered_by(result.response)
    assert result.output == "the spare answered"
    assert result.response.model_name == "backup-model"
    assert answered == ModelRef("spare", "backup-model")
    assert len(primary.chat_requests) == FAST.attempts  # retried, then given up on
    assert len(secondary.chat_requests) == 1


async def test_a_bad_request_does_not_fall_back(
    client: httpx.AsyncClient,
    db: Database,
    alice: Tenant,
    fake: tuple[FakeOpenAI, str],
    backup: tuple[FakeOpenAI, str],
) -> None:
    primary, primary_url = fake
    secondary, secondary_url = backup
    await add_provider(
        client, alice, name="main", kind="openai", base_url=primary_url, api_key=API_KEY
    )
    await add_provider(
        client, alice, name="spare", kind="openai-compatible", base_url=secondary_url
    )
    primary.push(Reply.failure(400, "Invalid 'messages': empty.", type="invalid_request_error"))
    async with await runtime_for(db, alice, "main", "spare", retry=FAST) as runtime:
        model = runtime.fallback_model("main:gpt-test", ["spare:backup-model"])
        with pytest.raises(ModelRequestRejectedError) as caught:
            await Agent(model).run("hi")
    assert isinstance(caught.value, ModelHTTPError)
    assert caught.value.status_code == 400
    assert len(primary.chat_requests) == 1  # not retried either
    assert secondary.chat_requests == []


async def test_model_references_name_the_field_they_came_from(db: Database, alice: Tenant) -> None:
    async with await runtime_for(db, alice) as runtime:
        with pytest.raises(UnknownModelReference) as caught:
            runtime.fallback_model("nowhere:gpt", field="body.model")
        assert caught.value.errors is not None
        assert caught.value.errors[0].loc == ["body", "model"]
        assert "nowhere" in caught.value.detail
        with pytest.raises(UnknownModelReference) as caught:
            runtime.model("no-colon-here", field="body.fallback_models.1")
        assert caught.value.errors is not None
        assert caught.value.errors[0].loc == ["body", "fallback_models", 1]
    assert ModelRef.parse("local-ollama:qwen3:8b") == ModelRef("local-ollama", "qwen3:8b")
    assert str(ModelRef("a", "b:c")) == "a:b:c"


async def test_another_workspaces_provider_is_not_found(
    client: httpx.AsyncClient, alice: Tenant, bob: Tenant
) -> None:
    created = await add_provider(client, alice, name="p", kind="openai", api_key=API_KEY)
    missing = f"/api/providers/{uuid.uuid4()}"
    for path in (f"/api/providers/{created['id']}", missing):
        response = await client.get(path, headers=bob.headers)
        assert response.status_code == 404
    listed = (await client.get("/api/providers", headers=bob.headers)).json()
    assert listed["items"] == []


# The fake server itself (issue 4's run tests lean on it) -------------------------------------


async def test_the_fake_server_streams_the_openai_chunk_format() -> None:
    server = FakeOpenAI(models=["m"])
    server.push(
        Reply(
            text="Hi there",
            tool_calls=[ToolCall("lookup", {"q": "heron"}, id="call_1")],
            chunk_size=3,
        )
    )
    async with server.serve() as url, httpx.AsyncClient() as http:
        request = {
            "model": "m",
            "messages": [{"role": "user", "content": "x"}],
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        async with http.stream("POST", f"{url}/chat/completions", json=request) as response:
            assert response.headers["content-type"].startswith("text/event-stream")
            lines = [line async for line in response.aiter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
    assert "".join(d.get("content") or "" for d in deltas) == "Hi there"
    calls = [call for d in deltas for call in d.get("tool_calls", [])]
    assert calls[0] == {
        "index": 0,
        "id": "call_1",
        "type": "function",
        "function": {"name": "lookup", "arguments": ""},
    }
    assert all(call["index"] == 0 and "id" not in call for call in calls[1:])
    assert len(calls) > 2  # the arguments come in pieces
    assert json.loads("".join(c["function"]["arguments"] for c in calls)) == {"q": "heron"}
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "tool_calls"
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"] == {"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18}
    assert server.chat_requests[0].completed


async def test_the_fake_server_can_drop_a_stream_and_notices_a_client_leaving() -> None:
    server = FakeOpenAI(models=["m"])
    server.push(
        Reply(text="a" * 40, chunk_size=1, abort_after=3),
        Reply(text="b" * 40, chunk_size=1, chunk_delay=0.05),
    )
    body = {"model": "m", "messages": [], "stream": True}
    async with server.serve() as url, httpx.AsyncClient() as http:
        async with http.stream("POST", f"{url}/chat/completions", json=body) as response:
            with pytest.raises(httpx.RemoteProtocolError):
                await response.aread()  # the connection drops mid-body
        async with http.stream("POST", f"{url}/chat/completions", json=body) as response:
            async for line in response.aiter_lines():
                if line:
                    break  # leave after the first chunk
        leaving = server.chat_requests[1]
        for _ in range(500):  # an upper bound, not a measurement
            if leaving.disconnected:
                break
            await asyncio.sleep(0.01)
    assert not server.chat_requests[0].completed
    assert leaving.disconnected
    assert not leaving.completed


async def test_runs_share_a_built_model_until_its_connection_changes(
    fake: tuple[FakeOpenAI, str],
) -> None:
    """Runtimes over one process' clients reuse the model a connection built; a rotated key or
    another base URL builds a new one, and requests carry the new credentials."""
    from heron.providers.connection import ProviderConnection
    from heron.providers.models import ProviderKind
    from heron.providers.runtime import HttpClients, ModelRuntime

    server, url = fake
    clients = HttpClients()
    old = ProviderConnection(
        name="llm", kind=ProviderKind.openai_compatible, base_url=url, api_key="sk-old-0123456789"
    )
    new = ProviderConnection(
        name="llm", kind=ProviderKind.openai_compatible, base_url=url, api_key=API_KEY
    )
    try:
        first = ModelRuntime([old], clients=clients).model("llm:gpt-test")
        assert ModelRuntime([old], clients=clients).model("llm:gpt-test") is first
        assert ModelRuntime([old], clients=clients).model("llm:other") is not first
        rotated = ModelRuntime([new], clients=clients).model("llm:gpt-test")
        assert rotated is not first
        server.push(Reply(text="Hello."))
        assert (await Agent(rotated).run("Hi")).output == "Hello."
        assert server.chat_requests[-1].headers["authorization"] == f"Bearer {API_KEY}"
        with pytest.raises(ModelHTTPError):
            await Agent(first).run("Hi")  # the old key is refused
    finally:
        await clients.aclose()


def _fake_connection(kind: str, url: str) -> Any:
    """A connection of `kind` to the fake server (Groq's SDK adds `/openai/v1` itself)."""
    from heron.providers.connection import ProviderConnection
    from heron.providers.models import ProviderKind

    base_url = url.removesuffix("/v1") if kind == "groq" else url
    return ProviderConnection(
        name="llm", kind=ProviderKind(kind), base_url=base_url, api_key=API_KEY
    )


def _stock_model(kind: str, url: str) -> Any:
    """pydantic-ai's model for `kind` on the fake server, with the SDK's own client."""
    if kind == "groq":
        from groq import AsyncGroq
        from pydantic_ai.models.groq import GroqModel
        from pydantic_ai.providers.groq import GroqProvider

        root = url.removesuffix("/v1")  # Groq's SDK adds `/openai/v1`
        client = AsyncGroq(base_url=root, api_key=API_KEY, http_client=httpx.AsyncClient())
        return GroqModel("gpt-test", provider=GroqProvider(groq_client=client))
    from openai import AsyncOpenAI
    from pydantic_ai.models.openai import OpenAIChatModel
    from pydantic_ai.providers.openai_compatible import OpenAICompatibleProvider

    provider = OpenAICompatibleProvider(
        "llm", openai_client=AsyncOpenAI(base_url=url, api_key=API_KEY)
    )
    return OpenAIChatModel("gpt-test", provider=provider)


@pytest.mark.parametrize("kind", ["openai-compatible", "groq"])
async def test_models_send_the_conversation_as_is_past_the_sdk_transform(
    kind: str, fake: tuple[FakeOpenAI, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A model Heron builds for an OpenAI-style or Groq connection hands a request's messages
    and tools to the SDK past its request transform (a walk of the whole body that changes
    nothing for chat completions and costs a quarter of a tool loop's CPU), and the bytes sent
    are the same as the stock SDK client's, streamed or not, for every kind of message."""
    import groq.resources.chat.completions as groq_sdk
    import openai.resources.chat.completions.completions as openai_sdk
    from pydantic_ai.messages import (
        ImageUrl,
        ModelRequest,
        ModelResponse,
        TextPart,
        ToolCallPart,
        ToolReturnPart,
        UserPromptPart,
    )

    from heron.providers.runtime import HttpClients

    sdk: Any = groq_sdk if kind == "groq" else openai_sdk
    transformed: list[Any] = []
    transform = sdk.async_maybe_transform

    async def spy(data: Any, expected_type: Any) -> Any:
        transformed.append(data)
        return await transform(data, expected_type)

    monkeypatch.setattr(sdk, "async_maybe_transform", spy)

    def calculator(expression: str) -> str:
        """Evaluate an arithmetic expression."""
        return "4"

    history = [
        ModelRequest(
            parts=[
                UserPromptPart(["What is in it, ünïcode?", ImageUrl("https://example.com/a.png")])
            ]
        ),
        ModelResponse(
            parts=[
                TextPart("Let me count."),
                ToolCallPart("calculator", {"expression": "2 + 2"}, tool_call_id="call_1"),
            ]
        ),
        ModelRequest(parts=[ToolReturnPart("calculator", {"value": 4}, tool_call_id="call_1")]),
        ModelResponse(parts=[ToolCallPart("calculator", '{"expression": "2 +"}', "call_2")]),
        ModelRequest(
            parts=[
                ToolReturnPart("calculator", "Incomplete expression.", "call_2", outcome="retried")
            ]
        ),
        ModelResponse(parts=[TextPart("It shows 4.")]),
    ]
    server, url = fake
    connection = _fake_connection(kind, url)
    clients = HttpClients()
    try:
        heron_model = ModelRuntime([connection], clients=clients).model("llm:gpt-test")
        for model in (heron_model, _stock_model(kind, url)):
            agent = Agent(model, instructions="Be exact.", tools=[calculator])
            server.push(Reply(text="Four."), Reply(text="Four.", chunk_size=2))
            assert (await agent.run("And now?", message_history=history)).output == "Four."
            async with agent.run_stream("And now?", message_history=history) as streamed:
                assert await streamed.get_output() == "Four."
    finally:
        await clients.aclose()

    assert len(server.chat_requests) == 4
    heron_sent, stock_sent = server.chat_requests[:2], server.chat_requests[2:]
    for ours, theirs in zip(heron_sent, stock_sent, strict=True):
        assert ours.raw == theirs.raw
        assert len(ours.body["messages"]) == 8
        assert len(ours.body["tools"]) == 1
    # Heron's requests gave the transform empty placeholders; the stock client, everything.
    assert [len(t["messages"]) for t in transformed] == [0, 0, 8, 8]
    assert [len(t["tools"]) for t in transformed] == [0, 0, 1, 1]


@pytest.mark.parametrize("kind", ["openai-compatible", "groq", "anthropic"])
async def test_requests_go_through_the_sdk_client_itself_which_never_retries(
    kind: str, fake: tuple[FakeOpenAI, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The SDK clients of Heron's models have their own retries off (the HTTP transport
    retries), so pydantic-ai sends every request through the client itself: given a
    `max_retries` setting it would copy the client for each request (and the copy looks up the
    platform again on a worker thread)."""
    from anthropic import AsyncAnthropic
    from groq import AsyncGroq
    from openai import AsyncOpenAI
    from pydantic_ai.models._sdk_retries import with_max_retries

    from heron.providers.runtime import NO_RETRY, HttpClients

    copies: list[str] = []
    for sdk in (AsyncOpenAI, AsyncGroq, AsyncAnthropic):
        original = sdk.copy

        def counted(self: Any, *args: Any, __original: Any = original, **kwargs: Any) -> Any:
            copies.append(type(self).__name__)
            return __original(self, *args, **kwargs)

        monkeypatch.setattr(sdk, "copy", counted)
    server, url = fake
    connection = _fake_connection(kind, url)
    clients = HttpClients()
    try:
        model: Any = ModelRuntime([connection], clients=clients, retry=NO_RETRY).model(
            "llm:gpt-test"
        )
        assert model.client.max_retries == 0
        assert with_max_retries(model.client, model.settings or {}) is model.client
        if kind != "anthropic":  # the fake speaks the OpenAI wire format only
            server.push(Reply.failure(500, "Something broke."), Reply(text="Fine now."))
            with pytest.raises(ModelHTTPError):
                await Agent(model).run("Hi")
            assert len(server.chat_requests) == 1  # the SDK did not try again
            assert (await Agent(model).run("Hi")).output == "Fine now."
            server.push(Reply(text="Streamed.", chunk_size=3))
            async with Agent(model).run_stream("Hi") as streamed:
                assert await streamed.get_output() == "Streamed."
    finally:
        await clients.aclose()
    assert copies == []
