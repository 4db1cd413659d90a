"""One workspace never sees another's data: every workspace-owned endpoint, called with
another workspace's credentials, answers 404 and changes nothing."""

from __future__ import annotations

import httpx
from fastapi import FastAPI

from conftest import Tenant

# Endpoints that take no workspace-owned id: checked through what they list or return.
UNSCOPED = {
    ("GET", "/api/workspaces"),
    ("POST", "/api/workspaces"),
    ("GET", "/api/members"),
    ("POST", "/api/members"),
    ("GET", "/api/keys"),
    ("POST", "/api/keys"),
    ("GET", "/api/providers"),
    ("POST", "/api/providers"),
    ("GET", "/api/agents"),
    ("POST", "/api/agents"),
    ("POST", "/api/agents/import"),
    ("GET", "/api/threads"),
    ("POST", "/api/threads"),
    ("GET", "/api/files"),
    ("POST", "/api/files"),
    ("GET", "/api/knowledge-bases"),
    ("POST", "/api/knowledge-bases"),
    ("GET", "/api/usage"),
    ("GET", "/api/me"),
    ("POST", "/api/auth/login"),
    ("POST", "/api/auth/refresh"),
}


async def test_every_endpoint_hides_another_workspaces_resources(
    app: FastAPI, client: httpx.AsyncClient, alice: Tenant, bob: Tenant
) -> None:
    carol = (
        await client.post(
            "/api/members",
            json={"email": "carol@example.com", "password": "carol-pass1"},
            headers=alice.headers,
        )
    ).json()
    alice_key = (await client.post("/api/keys", json={"name": "a2"}, headers=alice.headers)).json()
    alice_provider = (
        await client.post(
            "/api/providers",
            json={"name": "alices-llm", "kind": "openai", "api_key": "sk-alice-0123456789"},
            headers=alice.headers,
        )
    ).json()
    alice_agent = (
        await client.post(
            "/api/agents",
            json={"name": "alices-agent", "model": "alices-llm:gpt-4o-mini"},
            headers=alice.headers,
        )
    ).json()
    await client.post(f"/api/agents/{alice_agent['id']}/publish", headers=alice.headers)
    alice_thread = (
        await client.post(
            "/api/threads", json={"metadata": {"owner": "alice"}}, headers=alice.headers
        )
    ).json()
    alice_run = (
        await client.post(
            f"/api/threads/{alice_thread['id']}/runs",
            json={"agent": "alices-agent", "input": "hello"},
            headers=alice.headers,
        )
    ).json()
    await client.post(f"/api/runs/{alice_run['id']}/cancel", headers=alice.headers)
    alice_file = (
        await client.post(
            "/api/files",
            files={"file": ("alice.txt", b"alice's notes\n", "text/plain")},
            headers=alice.headers,
        )
    ).json()
    alice_kb = (
        await client.post("/api/knowledge-bases", json={"name": "alices-kb"}, headers=alice.headers)
    ).json()
    alice_document = (
        await client.post(
            f"/api/knowledge-bases/{alice_kb['id']}/documents",
            json={"text": "Alice's secret recipe", "title": "recipe"},
            headers=alice.headers,
        )
    ).json()
    ids = {
        "thread_id": alice_thread["id"],
        "run_id": alice_run["id"],
        "agent_id": alice_agent["id"],
        "number": "1",
        "a": "1",
        "b": "draft",
        "workspace_id": str(alice.workspace_id),
        "user_id": carol["user_id"],
        "key_id": alice_key["id"],
        "provider_id": alice_provider["id"],
        "file_id": alice_file["id"],
        "kb_id": alice_kb["id"],
        "document_id": alice_document["id"],
    }
    bodies = {"PATCH": {"name": "stolen", "role": "viewer"}}

    bob_login = (
        await client.post(
            "/api/auth/login", json={"email": bob.email, "password": "correct horse battery"}
        )
    ).json()
    bob_session = {"Authorization": f"Bearer {bob_login['access_token']}"}

    # Every operation of the API, from the OpenAPI document (FastAPI keeps included routers
    # nested, so app.routes doesn't list them).
    api_routes = {
        (method.upper(), path)
        for path, operations in app.openapi()["paths"].items()
        if path.startswith("/api")
        for method in operations
    }
    assert len(api_routes) > 30
    walked: set[tuple[str, str]] = set()
    for method, template in sorted(api_routes - UNSCOPED):
        path = template.format(**ids)
        body = bodies.get(method)
        if template.endswith(("/runs", "/runs/wait")):
            body = {"agent": "alices-agent", "input": "steal"}
        elif template.endswith("/search"):
            body = {"query": "recipe", "knowledge_bases": [alice_kb["id"]]}
            if "{kb_id}" in template:
                del body["knowledge_bases"]
        elif template.endswith("/documents"):
            body = {"text": "stolen"}
        elif template.endswith("/documents/batch"):
            body = {"documents": [{"text": "stolen"}]}
        elif template.endswith("/resume"):
            body = {"decisions": [{"tool_call_id": "x", "approve": True}]}
        elif method == "PATCH" and "/members/" in template:
            body = {"role": "viewer"}
        elif method == "PATCH":
            body = {"name": "stolen"}  # valid for workspaces, keys and providers
        for headers in (bob.headers, bob_session):
            response = await client.request(method, path, json=body, headers=headers)
            assert response.status_code == 404, (
                method,
                path,
                response.status_code,
                response.text,
            )
            assert response.headers["content-type"] == "application/problem+json"
        # Naming Alice's workspace in the header does not help Bob's session either.
        response = await client.request(
            method,
            path,
            json=body,
            headers={**bob_session, "Heron-Workspace": ids["workspace_id"]},
        )
        assert response.status_code == 404, (method, path, response.text)
        walked.add((method, template))

    assert api_routes - UNSCOPED == walked, "an endpoint is not covered by the isolation walk"

    # Lists show Bob only his own things.
    for path in (
        "/api/workspaces",
        "/api/members",
        "/api/keys",
        "/api/providers",
        "/api/agents",
        "/api/threads",
        "/api/files",
        "/api/knowledge-bases",
        "/api/usage?group_by=agent",
    ):
        text = (await client.get(path, headers=bob.headers)).text
        assert str(alice.workspace_id) not in text
        assert carol["user_id"] not in text
        assert alice_key["id"] not in text
        assert alice_provider["id"] not in text
        assert alice_agent["id"] not in text
        assert alice_thread["id"] not in text
        assert alice_file["id"] not in text
        assert alice_kb["id"] not in text
        assert "alices-agent" not in text
        assert alice.email not in text

    # And Alice's things are untouched.
    ws = (await client.get(f"/api/workspaces/{alice.workspace_id}", headers=alice.headers)).json()
    assert ws["name"] == "Alice workspace"
    key = (await client.get(f"/api/keys/{alice_key['id']}", headers=alice.headers)).json()
    assert key["revoked_at"] is None
    assert key["name"] == "a2"
    member = (await client.get(f"/api/members/{carol['user_id']}", headers=alice.headers)).json()
    assert member["role"] == "member"
    provider = (
        await client.get(f"/api/providers/{alice_provider['id']}", headers=alice.headers)
    ).json()
    assert provider["name"] == "alices-llm"
    assert provider["models"] is None  # Bob's check reached nothing
    agent = (await client.get(f"/api/agents/{alice_agent['id']}", headers=alice.headers)).json()
    assert agent["name"] == "alices-agent"
    assert agent["latest_version"] == 1
    assert agent["archived_at"] is None
    run = (await client.get(f"/api/runs/{alice_run['id']}", headers=alice.headers)).json()
    assert run["status"] == "cancelled"
    kb_docs = await client.get(
        f"/api/knowledge-bases/{alice_kb['id']}/documents", headers=alice.headers
    )
    assert [d["title"] for d in kb_docs.json()["items"]] == ["recipe"]
    kb = (await client.get(f"/api/knowledge-bases/{alice_kb['id']}", headers=alice.headers)).json()
    assert kb["name"] == "alices-kb"
    content = await client.get(f"/api/files/{alice_file['id']}/content", headers=alice.headers)
    assert content.content == b"alice's notes\n"
    messages = await client.get(
        f"/api/threads/{alice_thread['id']}/messages", headers=alice.headers
    )
    assert messages.status_code == 200
    assert (
        await client.get("/api/me", headers={"Authorization": f"Bearer {alice_key['key']}"})
    ).status_code == 200


async def test_adding_a_user_of_another_workspace_does_not_leak_its_data(
    client: httpx.AsyncClient, alice: Tenant, bob: Tenant
) -> None:
    # Bob adds Alice's user to his workspace: she gains Bob's workspace, Bob gains nothing of hers.
    added = await client.post("/api/members", json={"email": alice.email}, headers=bob.headers)
    assert added.status_code == 201
    assert added.json()["name"] == "Alice"
    listed = (await client.get("/api/members", headers=bob.headers)).json()["items"]
    assert str(alice.workspace_id) not in str(listed)
    assert (
        await client.get(f"/api/workspaces/{alice.workspace_id}", headers=bob.headers)
    ).status_code == 404
