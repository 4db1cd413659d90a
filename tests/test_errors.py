"""Every error is RFC 9457 Problem Details; bad input never becomes a 500 or loses data."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from fastapi import FastAPI

from conftest import Tenant, make_settings, serve
from heron.app import create_app

PROBLEM = "application/problem+json"


def assert_problem(response: httpx.Response, status: int, slug: str) -> dict[str, object]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == PROBLEM
    body = response.json()
    assert body["type"] == f"urn:heron:problem:{slug}"
    assert body["status"] == status
    assert body["title"]
    assert body["detail"]
    assert body["request_id"] == response.headers["x-request-id"]
    return body  # type: ignore[no-any-return]


async def test_unknown_route_is_a_problem(client: httpx.AsyncClient) -> None:
    body = assert_problem(await client.get("/api/nothing-here"), 404, "not-found")
    assert "/api/nothing-here" in str(body["detail"])


async def test_wrong_method_is_405(client: httpx.AsyncClient, alice: Tenant) -> None:
    response = await client.put("/api/workspaces", headers=alice.headers)
    assert_problem(response, 405, "method-not-allowed")
    assert "GET" in response.headers["allow"]


async def test_missing_and_bad_credentials_are_401(client: httpx.AsyncClient) -> None:
    response = await client.get("/api/workspaces")
    assert_problem(response, 401, "unauthorized")
    assert response.headers["www-authenticate"] == "Bearer"
    for header in ("Bearer heron_0123456789ab_wrong", "Bearer not-a-key", "Basic abc", "Bearer"):
        r = await client.get("/api/workspaces", headers={"Authorization": header})
        assert_problem(r, 401, "unauthorized")


async def test_malformed_json_is_400(client: httpx.AsyncClient, alice: Tenant) -> None:
    for payload in (b"{bad", b"", b"\xff\xfe", b'{"name": "x",}'):
        response = await client.post(
            "/api/keys",
            content=payload,
            headers={**alice.headers, "content-type": "application/json"},
        )
        assert response.status_code in (400, 422), response.text
        assert response.headers["content-type"] == PROBLEM


async def test_wrong_types_name_the_field(client: httpx.AsyncClient, alice: Tenant) -> None:
    response = await client.post(
        "/api/keys", json={"name": 5, "role": "king"}, headers=alice.headers
    )
    body = assert_problem(response, 422, "validation-error")
    locations = {tuple(e["loc"]) for e in body["errors"]}  # type: ignore[attr-defined]
    assert ("body", "name") in locations
    assert ("body", "role") in locations


async def test_unknown_fields_are_rejected(client: httpx.AsyncClient, alice: Tenant) -> None:
    response = await client.post(
        "/api/keys", json={"name": "ci", "scopes": ["all"]}, headers=alice.headers
    )
    body = assert_problem(response, 422, "validation-error")
    assert "scopes" in str(body["detail"])
    listed = await client.get("/api/keys", headers=alice.headers)
    assert [k["name"] for k in listed.json()["items"]] == ["Alice owner key"]


async def test_non_json_body_is_415(client: httpx.AsyncClient, alice: Tenant) -> None:
    response = await client.post(
        "/api/keys", content=b"name=ci", headers={**alice.headers, "content-type": "text/plain"}
    )
    assert_problem(response, 415, "unsupported-media-type")


async def test_oversized_body_is_413_declared_or_streamed(
    client: httpx.AsyncClient, alice: Tenant
) -> None:
    big = b'{"name": "' + b"x" * (2 * 1024 * 1024) + b'"}'
    declared = await client.post(
        "/api/keys", content=big, headers={**alice.headers, "content-type": "application/json"}
    )
    assert_problem(declared, 413, "payload-too-large")

    async def chunks():  # no Content-Length: the limit is found while reading
        for i in range(0, len(big), 65536):
            yield big[i : i + 65536]

    streamed = await client.post(
        "/api/keys", content=chunks(), headers={**alice.headers, "content-type": "application/json"}
    )
    assert_problem(streamed, 413, "payload-too-large")
    listed = await client.get("/api/keys", headers=alice.headers)
    assert len(listed.json()["items"]) == 1


async def test_oversized_headers_are_431(client: httpx.AsyncClient, alice: Tenant) -> None:
    response = await client.get(
        "/api/workspaces", headers={**alice.headers, "X-Filler": "y" * 20_000}
    )
    assert_problem(response, 431, "headers-too-large")


@pytest.mark.parametrize("cursor", ["%%%", "abc", "MTpub3RhdXVpZA", "A" * 64])
async def test_bad_cursor_is_400(client: httpx.AsyncClient, alice: Tenant, cursor: str) -> None:
    response = await client.get("/api/keys", params={"cursor": cursor}, headers=alice.headers)
    assert_problem(response, 400, "invalid-cursor")


async def test_bad_ids_and_limits_are_422(client: httpx.AsyncClient, alice: Tenant) -> None:
    assert_problem(
        await client.get("/api/keys/not-a-uuid", headers=alice.headers), 422, "validation-error"
    )
    assert_problem(
        await client.get("/api/keys?limit=0", headers=alice.headers), 422, "validation-error"
    )
    assert_problem(
        await client.get("/api/keys?limit=1000", headers=alice.headers), 422, "validation-error"
    )


async def test_unhandled_error_is_500_without_a_stack_trace(settings) -> None:  # type: ignore[no-untyped-def]
    app: FastAPI = create_app(settings)

    async def explode() -> None:
        raise RuntimeError("secret internals /etc/passwd")

    app.add_api_route("/boom", explode)
    async with serve(app) as url, httpx.AsyncClient(base_url=url) as client:
        response = await client.get("/boom", headers={"X-Request-ID": "trace-me-123"})
    body = assert_problem(response, 500, "internal")
    assert body["request_id"] == "trace-me-123"
    assert "secret internals" not in response.text
    assert "Traceback" not in response.text


async def test_request_id_is_taken_or_generated(client: httpx.AsyncClient) -> None:
    given = await client.get("/healthz", headers={"X-Request-ID": "abc-123"})
    assert given.headers["x-request-id"] == "abc-123"
    made = await client.get("/healthz")
    assert len(made.headers["x-request-id"]) == 32
    hostile = await client.get("/healthz", headers={"X-Request-ID": "bad id\twith spaces"})
    assert hostile.headers["x-request-id"] != "bad id\twith spaces"


async def test_body_limit_is_configurable(tmp_path, database_url) -> None:  # type: ignore[no-untyped-def]
    app = create_app(make_settings(tmp_path, database_url, max_body_bytes=2048))
    async with serve(app) as url, httpx.AsyncClient(base_url=url) as client:
        response = await client.post(
            "/api/auth/login", json={"email": "a@b.c", "password": "p" * 3000}
        )
    assert_problem(response, 413, "payload-too-large")


async def test_concurrent_bad_requests_leave_the_server_healthy(
    client: httpx.AsyncClient, alice: Tenant
) -> None:
    bad = [
        client.post(
            "/api/keys", content=b"{", headers={**alice.headers, "content-type": "application/json"}
        )
        for _ in range(30)
    ]
    good = [
        client.post("/api/keys", json={"name": f"k{i}"}, headers=alice.headers) for i in range(10)
    ]
    results = await asyncio.gather(*bad, *good)
    assert all(r.status_code == 400 for r in results[:30])
    assert all(r.status_code == 201 for r in results[30:]), [r.text for r in results[30:]]
    listed = await client.get("/api/keys?limit=100", headers=alice.headers)
    assert len(listed.json()["items"]) == 11
