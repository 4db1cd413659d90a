"""Agents: drafts, validation, versions, diff, rollback, export and import, CLI."""

from __future__ import annotations

import asyncio
import os
import sys
from typing import Any

import httpx
import pytest
import yaml

from conftest import Tenant
from heron.agents.spec import AgentSpec, render_instructions
from heron.core.errors import ValidationFailed

PROBLEM = "application/problem+json"


async def add_provider(client: httpx.AsyncClient, tenant: Tenant, name: str = "local") -> None:
    response = await client.post(
        "/api/providers",
        json={"name": name, "kind": "openai-compatible", "base_url": "http://127.0.0.1:9/v1"},
        headers=tenant.headers,
    )
    assert response.status_code == 201, response.text


def support_agent(**overrides: Any) -> dict[str, Any]:
    return {
        "name": "support",
        "description": "Answers questions",
        "instructions": "You help {{customer}}.\nBe brief.",
        "variables": {"customer": {"description": "who asks", "default": "a customer"}},
        "model": "local:small-model",
        "fallbacks": ["local:big-model"],
        "model_settings": {"temperature": 0.2, "max_tokens": 256},
        "tools": ["calculator", "current_time"],
        "approval": {"calculator": "always"},
        "output_schema": {
            "type": "object",
            "properties": {"answer": {"type": "string"}},
            "required": ["answer"],
        },
        "max_steps": 5,
        "tags": ["support"],
        "metadata": {"team": "care"},
    } | overrides


@pytest.fixture
async def agent(client: httpx.AsyncClient, alice: Tenant) -> dict[str, Any]:
    await add_provider(client, alice)
    response = await client.post("/api/agents", json=support_agent(), headers=alice.headers)
    assert response.status_code == 201, response.text
    return dict(response.json())


async def test_create_and_read_an_agent(
    client: httpx.AsyncClient, alice: Tenant, agent: dict[str, Any]
) -> None:
    assert agent["latest_version"] is None
    assert agent["draft"]["tools"] == ["calculator", "current_time"]
    assert agent["draft"]["approval"] == {"calculator": "always"}
    fetched = (await client.get(f"/api/agents/{agent['id']}", headers=alice.headers)).json()
    assert fetched == agent
    listed = (await client.get("/api/agents", headers=alice.headers)).json()
    assert [a["name"] for a in listed["items"]] == ["support"]
    tagged = (await client.get("/api/agents?tag=nope", headers=alice.headers)).json()
    assert tagged["items"] == []


@pytest.mark.parametrize(
    ("change", "field", "words"),
    [
        ({"model": "nowhere:gpt"}, "model", "nowhere"),
        ({"fallbacks": ["local:x", "ghost:y"]}, "fallbacks", "ghost"),
        ({"tools": ["calculator", "teleport"]}, "tools", "teleport"),
        (
            {"output_schema": {"type": "object", "properties": {"a": {"type": 12}}}},
            "output_schema",
            "JSON Schema",
        ),
        ({"instructions": "Hello {{stranger}}"}, "instructions", "stranger"),
        ({"instructions": "Hello {{broken"}, "instructions", "malformed"),
        ({"approval": {"http_fetch": "always"}}, "approval", "http_fetch"),
        ({"approval": {"calculator": "sometimes"}}, "approval", ""),
        ({"max_steps": 0}, "max_steps", ""),
        ({"model_settings": {"temperature": 9}}, "model_settings", ""),
        ({"model_settings": {"wibble": 1}}, "model_settings", ""),
        ({"colour": "blue"}, "colour", ""),
    ],
)
async def test_bad_agents_are_422_naming_the_field(
    client: httpx.AsyncClient, alice: Tenant, change: dict[str, Any], field: str, words: str
) -> None:
    await add_provider(client, alice)
    response = await client.post("/api/agents", json=support_agent(**change), headers=alice.headers)
    assert response.status_code == 422, response.text
    assert response.headers["content-type"] == PROBLEM
    body = response.json()
    assert any(field in [str(p) for p in e["loc"]] for e in body["errors"]), body
    assert words in body["detail"]
    assert (await client.get("/api/agents", headers=alice.headers)).json()["items"] == []


async def test_name_clash_is_409(
    client: httpx.AsyncClient, alice: Tenant, agent: dict[str, Any]
) -> None:
    response = await client.post("/api/agents", json=support_agent(), headers=alice.headers)
    assert response.status_code == 409
    assert "name" in response.json()["detail"]
    other = (
        await client.post("/api/agents", json=support_agent(name="other"), headers=alice.headers)
    ).json()
    renamed = await client.patch(
        f"/api/agents/{other['id']}", json={"name": "support"}, headers=alice.headers
    )
    assert renamed.status_code == 409


async def test_publish_edit_diff_restore(
    client: httpx.AsyncClient, alice: Tenant, agent: dict[str, Any]
) -> None:
    base = f"/api/agents/{agent['id']}"
    v1 = await client.post(f"{base}/publish", json={"note": "first"}, headers=alice.headers)
    assert v1.status_code == 201
    assert v1.json()["number"] == 1
    assert v1.json()["note"] == "first"

    edited = await client.patch(
        base,
        json={
            "instructions": "You help {{customer}} politely.",
            "model_settings": {"temperature": 0.9},
        },
        headers=alice.headers,
    )
    assert edited.status_code == 200, edited.text
    assert edited.json()["draft"]["model_settings"]["temperature"] == 0.9
    # The published version did not move.
    frozen = (await client.get(f"{base}/versions/1", headers=alice.headers)).json()
    assert frozen["spec"]["instructions"] == "You help {{customer}}.\nBe brief."

    v2 = (await client.post(f"{base}/publish", headers=alice.headers)).json()
    assert v2["number"] == 2
    changes = (await client.get(f"{base}/versions/1/diff/2", headers=alice.headers)).json()[
        "changes"
    ]
    assert {c["field"] for c in changes} == {"instructions", "model_settings.temperature"}
    temperature = next(c for c in changes if c["field"] == "model_settings.temperature")
    assert (temperature["from"], temperature["to"]) == (0.2, 0.9)
    assert (await client.get(f"{base}/versions/2/diff/draft", headers=alice.headers)).json()[
        "changes"
    ] == []

    restored = await client.post(f"{base}/versions/1/restore", headers=alice.headers)
    assert restored.json()["draft"] == frozen["spec"]
    v3 = (
        await client.post(f"{base}/publish", json={"note": "rollback"}, headers=alice.headers)
    ).json()
    assert v3["spec"] == frozen["spec"]
    versions = (await client.get(f"{base}/versions", headers=alice.headers)).json()["items"]
    assert [v["number"] for v in versions] == [1, 2, 3]
    assert (await client.get(f"{base}/versions/9", headers=alice.headers)).status_code == 404
    assert (await client.get(f"{base}/versions/1/diff/x", headers=alice.headers)).status_code == 400


async def test_concurrent_publishes_get_consecutive_numbers(
    client: httpx.AsyncClient, alice: Tenant, agent: dict[str, Any]
) -> None:
    responses = await asyncio.gather(
        *(
            client.post(f"/api/agents/{agent['id']}/publish", headers=alice.headers)
            for _ in range(6)
        )
    )
    numbers = sorted(r.json()["number"] for r in responses if r.status_code == 201)
    assert all(r.status_code in (201, 409) for r in responses)
    assert numbers == list(range(1, len(numbers) + 1))
    assert len(numbers) >= 1


async def test_export_then_import_into_another_workspace(
    client: httpx.AsyncClient, alice: Tenant, bob: Tenant, agent: dict[str, Any]
) -> None:
    exported = await client.get(f"/api/agents/{agent['id']}/export", headers=alice.headers)
    assert exported.headers["content-type"].startswith("application/yaml")
    document = yaml.safe_load(exported.text)
    assert document["heron"] == "agent/v1"
    assert document["name"] == "support"
    assert "instructions: |" in exported.text  # multi-line text stays readable in git
    assert "api_key" not in exported.text

    # Bob's workspace has no provider named "local" yet: the import says so and creates nothing.
    missing = await client.post(
        "/api/agents/import",
        content=exported.content,
        headers={**bob.headers, "content-type": "application/yaml"},
    )
    assert missing.status_code == 422
    assert "local" in missing.json()["detail"]

    await add_provider(client, bob)
    first = await client.post(
        "/api/agents/import?publish=true&note=deploy",
        content=exported.content,
        headers={**bob.headers, "content-type": "application/yaml"},
    )
    assert first.status_code == 200, first.text
    result = first.json()
    assert (result["created"], result["changed"], result["published_version"]) == (True, True, 1)
    assert result["agent"]["draft"] == agent["draft"]

    again = (
        await client.post(
            "/api/agents/import?publish=true",
            content=exported.content,
            headers={**bob.headers, "content-type": "application/yaml"},
        )
    ).json()
    assert (again["created"], again["changed"], again["published_version"]) == (False, False, 1)

    document["max_steps"] = 9
    changed = (
        await client.post(
            "/api/agents/import?publish=true",
            content=yaml.safe_dump(document),
            headers={**bob.headers, "content-type": "application/yaml"},
        )
    ).json()
    assert (changed["changed"], changed["published_version"]) == (True, 2)


@pytest.mark.parametrize(
    ("body", "status"),
    [
        (b"a: &x [1]\nb: *x\n", 400),
        (b"- just\n- a list\n", 400),
        (b"heron: agent/v9\nname: x\nmodel: local:m\n", 422),
        (b"heron: agent/v1\nmodel: local:m\n", 422),
        (b"heron: agent/v1\nname: x\nmodel: [unclosed\n", 400),
        (b"heron: agent/v1\nname: x\nmodel: local:m\nbogus: 1\n", 422),
        (b"\xff\xfe\x00", 415),
    ],
)
async def test_bad_import_documents(
    client: httpx.AsyncClient, alice: Tenant, body: bytes, status: int
) -> None:
    await add_provider(client, alice)
    response = await client.post(
        "/api/agents/import",
        content=body,
        headers={**alice.headers, "content-type": "application/yaml"},
    )
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == PROBLEM
    assert (await client.get("/api/agents", headers=alice.headers)).json()["items"] == []


async def test_import_needs_yaml(client: httpx.AsyncClient, alice: Tenant) -> None:
    response = await client.post("/api/agents/import", json={"name": "x"}, headers=alice.headers)
    assert response.status_code == 415


async def test_archive_hides_and_delete_removes(
    client: httpx.AsyncClient, alice: Tenant, agent: dict[str, Any]
) -> None:
    base = f"/api/agents/{agent['id']}"
    assert (await client.post(f"{base}/archive", headers=alice.headers)).json()["archived_at"]
    assert (await client.get("/api/agents", headers=alice.headers)).json()["items"] == []
    everything = (
        await client.get("/api/agents?include_archived=true", headers=alice.headers)
    ).json()
    assert len(everything["items"]) == 1
    assert (await client.post(f"{base}/unarchive", headers=alice.headers)).json()[
        "archived_at"
    ] is None
    await client.post(f"{base}/publish", headers=alice.headers)
    assert (await client.delete(base, headers=alice.headers)).status_code == 204
    assert (await client.get(base, headers=alice.headers)).status_code == 404


async def test_viewers_cannot_change_agents(
    client: httpx.AsyncClient, alice: Tenant, agent: dict[str, Any], db: Any
) -> None:
    from conftest import key_for
    from heron.tenancy.models import Role

    viewer = {"Authorization": f"Bearer {await key_for(db, alice, Role.viewer)}"}
    assert (await client.get(f"/api/agents/{agent['id']}", headers=viewer)).status_code == 200
    assert (
        await client.patch(f"/api/agents/{agent['id']}", json={"max_steps": 3}, headers=viewer)
    ).status_code == 403
    assert (
        await client.post(f"/api/agents/{agent['id']}/publish", headers=viewer)
    ).status_code == 403


def test_instructions_render_and_name_missing_variables() -> None:
    spec = AgentSpec.model_validate(
        {
            "model": "p:m",
            "instructions": "Hi {{name}} from {{ city }}",
            "variables": {"name": {}, "city": {"default": "Oslo"}},
        }
    )
    assert render_instructions(spec, {"name": "Ada"}) == "Hi Ada from Oslo"
    with pytest.raises(ValidationFailed, match="name"):
        render_instructions(spec, {})


async def _heron(*args: str, env: dict[str, str]) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "heron",
        *args,
        env={**os.environ, **env},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await process.communicate()
    return process.returncode or 0, out.decode(), err.decode()


async def test_cli_lists_exports_and_imports_through_the_api(
    client: httpx.AsyncClient,
    base_url: str,
    alice: Tenant,
    bob: Tenant,
    agent: dict[str, Any],
    tmp_path: Any,
) -> None:
    env_a = {"HERON_URL": base_url, "HERON_API_KEY": alice.key}
    code, out, err = await _heron("agents", "list", env=env_a)
    assert code == 0, err
    assert "support" in out
    target = tmp_path / "support.yaml"
    code, _, err = await _heron("agents", "export", "support", "-o", str(target), env=env_a)
    assert code == 0, err
    assert yaml.safe_load(target.read_text())["name"] == "support"

    await add_provider(client, bob)
    env_b = {"HERON_URL": base_url, "HERON_API_KEY": bob.key}
    code, out, err = await _heron(
        "agents", "import", str(target), "--publish", "--note", "ci", env=env_b
    )
    assert code == 0, err
    assert "support created, version 1" in out
    code, out, _ = await _heron("agents", "import", str(target), "--publish", env=env_b)
    assert "unchanged, version 1" in out

    code, _, err = await _heron("agents", "export", "ghost", env=env_b)
    assert code == 1
    assert err.strip() == "error: no agent with id or name 'ghost'"
    code, _, err = await _heron(
        "agents", "list", env={"HERON_URL": base_url, "HERON_API_KEY": "heron_000000000000_nope"}
    )
    assert code == 1
    assert err.count("\n") == 1
    assert "401" in err
