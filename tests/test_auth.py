"""API keys, user sessions, roles and membership rules."""

from __future__ import annotations

import asyncio
import uuid
from datetime import timedelta

import httpx
from sqlalchemy import select, update

from conftest import Tenant, key_for, make_tenant
from heron.core.ids import utcnow
from heron.db.engine import Database
from heron.tenancy.models import ApiKey, Role

PASSWORD = "correct horse battery"


async def login(client: httpx.AsyncClient, email: str, password: str = PASSWORD) -> httpx.Response:
    return await client.post("/api/auth/login", json={"email": email, "password": password})


async def test_key_is_shown_once_and_stored_only_as_a_hash(
    client: httpx.AsyncClient, alice: Tenant, db: Database
) -> None:
    created = await client.post("/api/keys", json={"name": "ci"}, headers=alice.headers)
    assert created.status_code == 201
    token = created.json()["key"]
    assert token.startswith("heron_")
    shown = await client.get(f"/api/keys/{created.json()['id']}", headers=alice.headers)
    assert "key" not in shown.json()
    async with db.session(write=False) as session:
        row = await session.scalar(
            select(ApiKey).where(ApiKey.id == uuid.UUID(created.json()["id"]))
        )
        assert row is not None
        assert token not in (row.key_hash, row.prefix, row.name)
        assert row.prefix in token


async def test_revoked_and_expired_keys_stop_working(
    client: httpx.AsyncClient, alice: Tenant, db: Database
) -> None:
    made = (await client.post("/api/keys", json={"name": "tmp"}, headers=alice.headers)).json()
    auth = {"Authorization": f"Bearer {made['key']}"}
    assert (await client.get("/api/me", headers=auth)).status_code == 200
    revoked = await client.post(f"/api/keys/{made['id']}/revoke", headers=alice.headers)
    assert revoked.json()["revoked_at"] is not None
    response = await client.get("/api/me", headers=auth)
    assert response.status_code == 401
    assert "revoked" in response.json()["detail"]

    soon = (utcnow() + timedelta(hours=1)).isoformat()
    made = (
        await client.post(
            "/api/keys", json={"name": "exp", "expires_at": soon}, headers=alice.headers
        )
    ).json()
    auth = {"Authorization": f"Bearer {made['key']}"}
    assert (await client.get("/api/me", headers=auth)).status_code == 200
    async with db.session(write=True) as session, session.begin():
        await session.execute(
            update(ApiKey)
            .where(ApiKey.prefix == made["prefix"])
            .values(expires_at=utcnow() - timedelta(seconds=1))
        )
    response = await client.get("/api/me", headers=auth)
    assert response.status_code == 401
    assert "expired" in response.json()["detail"]


async def test_expiry_in_the_past_or_without_zone_is_rejected(
    client: httpx.AsyncClient, alice: Tenant
) -> None:
    past = (utcnow() - timedelta(days=1)).isoformat()
    r = await client.post(
        "/api/keys", json={"name": "x", "expires_at": past}, headers=alice.headers
    )
    assert r.status_code == 422
    r = await client.post(
        "/api/keys", json={"name": "x", "expires_at": "2099-01-01T00:00:00"}, headers=alice.headers
    )
    assert r.status_code == 422


async def test_last_used_time_is_recorded(client: httpx.AsyncClient, alice: Tenant) -> None:
    made = (await client.post("/api/keys", json={"name": "u"}, headers=alice.headers)).json()
    assert made["last_used_at"] is None
    await client.get("/api/me", headers={"Authorization": f"Bearer {made['key']}"})
    seen = (await client.get(f"/api/keys/{made['id']}", headers=alice.headers)).json()
    assert seen["last_used_at"] is not None


async def test_login_gives_tokens_that_act_in_the_chosen_workspace(
    client: httpx.AsyncClient, alice: Tenant
) -> None:
    response = await login(client, alice.email)
    assert response.status_code == 200, response.text
    tokens = response.json()
    assert tokens["token_type"] == "bearer"
    assert [w["id"] for w in tokens["workspaces"]] == [str(alice.workspace_id)]
    auth = {"Authorization": f"Bearer {tokens['access_token']}"}
    me = (await client.get("/api/me", headers=auth)).json()
    assert me["workspace_id"] == str(alice.workspace_id)
    assert me["role"] == "owner"
    assert me["user"]["email"] == alice.email

    second = (await client.post("/api/workspaces", json={"name": "Second"}, headers=auth)).json()
    # With two workspaces the header must choose.
    assert (await client.get("/api/me", headers=auth)).status_code == 400
    chosen = await client.get("/api/me", headers={**auth, "Heron-Workspace": second["id"]})
    assert chosen.json()["workspace_id"] == second["id"]
    listed = (await client.get("/api/workspaces", headers=auth)).json()["items"]
    assert {w["name"] for w in listed} == {"Alice workspace", "Second"}


async def test_refresh_token_gives_new_tokens_and_is_not_an_access_token(
    client: httpx.AsyncClient, alice: Tenant
) -> None:
    tokens = (await login(client, alice.email)).json()
    refreshed = await client.post(
        "/api/auth/refresh", json={"refresh_token": tokens["refresh_token"]}
    )
    assert refreshed.status_code == 200
    assert (
        await client.get("/api/me", headers={"Authorization": f"Bearer {tokens['refresh_token']}"})
    ).status_code == 401
    bad = await client.post("/api/auth/refresh", json={"refresh_token": tokens["access_token"]})
    assert bad.status_code == 401


async def test_wrong_password_and_unknown_user_look_the_same(
    client: httpx.AsyncClient, alice: Tenant
) -> None:
    wrong = await login(client, alice.email, "not the password")
    unknown = await login(client, "nobody@example.com", "not the password")
    assert wrong.status_code == unknown.status_code == 401
    assert wrong.json()["detail"] == unknown.json()["detail"]


async def test_tampered_and_foreign_tokens_are_rejected(
    client: httpx.AsyncClient, alice: Tenant
) -> None:
    import jwt

    tokens = (await login(client, alice.email)).json()
    header, payload, signature = tokens["access_token"].split(".")
    tampered = f"{header}.{payload}.{signature[:-2]}AA"
    forged = jwt.encode(
        {"sub": str(alice.user_id), "typ": "access", "exp": 9999999999, "iss": "heron"},
        "another-secret-that-is-long-enough-for-hs256",
        algorithm="HS256",
    )
    none_alg = jwt.encode(
        {"sub": str(alice.user_id), "typ": "access", "iss": "heron"}, None, algorithm="none"
    )
    for token in (tampered, forged, none_alg):
        r = await client.get("/api/me", headers={"Authorization": f"Bearer {token}"})
        assert r.status_code == 401


async def test_viewer_reads_but_cannot_write(
    client: httpx.AsyncClient, alice: Tenant, db: Database
) -> None:
    viewer = {"Authorization": f"Bearer {await key_for(db, alice, Role.viewer)}"}
    assert (await client.get("/api/members", headers=viewer)).status_code == 200
    for method, path, body in (
        ("POST", "/api/keys", {"name": "x"}),
        ("POST", "/api/members", {"email": "z@example.com", "password": "12345678"}),
        ("PATCH", f"/api/workspaces/{alice.workspace_id}", {"name": "renamed"}),
        ("DELETE", f"/api/workspaces/{alice.workspace_id}", None),
    ):
        r = await client.request(method, path, json=body, headers=viewer)
        assert r.status_code == 403, (method, path, r.text)
        assert r.headers["content-type"] == "application/problem+json"
    ws = (await client.get(f"/api/workspaces/{alice.workspace_id}", headers=alice.headers)).json()
    assert ws["name"] == "Alice workspace"


async def test_only_owners_and_admins_manage_members_and_keys(
    client: httpx.AsyncClient, alice: Tenant, db: Database
) -> None:
    member = {"Authorization": f"Bearer {await key_for(db, alice, Role.member)}"}
    assert (await client.get("/api/keys", headers=member)).status_code == 403
    assert (await client.post("/api/keys", json={"name": "x"}, headers=member)).status_code == 403
    r = await client.post(
        "/api/members", json={"email": "m@example.com", "password": "12345678"}, headers=member
    )
    assert r.status_code == 403

    admin = {"Authorization": f"Bearer {await key_for(db, alice, Role.admin)}"}
    assert (await client.post("/api/keys", json={"name": "ok"}, headers=admin)).status_code == 201
    # An admin cannot mint a key more powerful than itself, nor make owners.
    r = await client.post("/api/keys", json={"name": "x", "role": "owner"}, headers=admin)
    assert r.status_code == 403
    r = await client.post(
        "/api/members",
        json={"email": "o@example.com", "role": "owner", "password": "12345678"},
        headers=admin,
    )
    assert r.status_code == 403
    r = await client.patch(f"/api/members/{alice.user_id}", json={"role": "member"}, headers=admin)
    assert r.status_code == 403


async def test_members_lifecycle_and_the_last_owner_stays(
    client: httpx.AsyncClient, alice: Tenant, db: Database
) -> None:
    added = await client.post(
        "/api/members",
        json={
            "email": "Carol@Example.com",
            "name": "Carol",
            "password": "carol-password",
            "role": "admin",
        },
        headers=alice.headers,
    )
    assert added.status_code == 201, added.text
    carol = added.json()
    assert carol["email"] == "carol@example.com"
    dup = await client.post(
        "/api/members", json={"email": "carol@example.com"}, headers=alice.headers
    )
    assert dup.status_code == 409
    missing = await client.post(
        "/api/members", json={"email": "who@example.com"}, headers=alice.headers
    )
    assert missing.status_code == 422

    tokens = (await login(client, "carol@example.com", "carol-password")).json()
    assert tokens["workspaces"][0]["role"] == "admin"

    r = await client.patch(
        f"/api/members/{alice.user_id}", json={"role": "admin"}, headers=alice.headers
    )
    assert r.status_code == 409  # Alice is the only owner
    assert (
        await client.delete(f"/api/members/{alice.user_id}", headers=alice.headers)
    ).status_code == 409
    r = await client.patch(
        f"/api/members/{carol['user_id']}", json={"role": "owner"}, headers=alice.headers
    )
    assert r.json()["role"] == "owner"
    r = await client.patch(
        f"/api/members/{alice.user_id}", json={"role": "viewer"}, headers=alice.headers
    )
    assert r.status_code == 200
    listed = (await client.get("/api/members", headers=alice.headers)).json()["items"]
    assert {m["email"]: m["role"] for m in listed} == {
        alice.email: "viewer",
        "carol@example.com": "owner",
    }
    assert (
        await client.delete(f"/api/members/{carol['user_id']}", headers=alice.headers)
    ).status_code == 403


async def test_workspace_create_rename_delete(client: httpx.AsyncClient, alice: Tenant) -> None:
    made = await client.post("/api/workspaces", json={"name": "Lab"}, headers=alice.headers)
    assert made.status_code == 201
    workspace = made.json()
    assert workspace["role"] == "owner"
    tokens = (await login(client, alice.email)).json()
    auth = {"Authorization": f"Bearer {tokens['access_token']}", "Heron-Workspace": workspace["id"]}
    renamed = await client.patch(
        f"/api/workspaces/{workspace['id']}", json={"name": "Lab 2"}, headers=auth
    )
    assert renamed.json()["name"] == "Lab 2"
    key = (await client.post("/api/keys", json={"name": "lab"}, headers=auth)).json()["key"]
    assert (
        await client.delete(f"/api/workspaces/{workspace['id']}", headers=auth)
    ).status_code == 204
    assert (await client.get(f"/api/workspaces/{workspace['id']}", headers=auth)).status_code == 404
    # Its keys went with it.
    assert (
        await client.get("/api/me", headers={"Authorization": f"Bearer {key}"})
    ).status_code == 401


async def test_concurrent_writes_on_one_workspace_all_land(
    client: httpx.AsyncClient, alice: Tenant
) -> None:
    responses = await asyncio.gather(
        *(
            client.post("/api/keys", json={"name": f"k{i}"}, headers=alice.headers)
            for i in range(40)
        ),
        *(client.get("/api/keys", headers=alice.headers) for _ in range(40)),
    )
    assert all(r.status_code in (200, 201) for r in responses), {r.status_code for r in responses}
    listed = (await client.get("/api/keys?limit=100", headers=alice.headers)).json()["items"]
    assert len(listed) == 41


async def test_a_second_tenant_is_made_independently(db: Database) -> None:
    a, b = await make_tenant(db, "One"), await make_tenant(db, "Two")
    assert a.workspace_id != b.workspace_id


async def test_a_key_acts_with_at_most_its_creators_current_role(
    client: httpx.AsyncClient, alice: Tenant
) -> None:
    await client.post(
        "/api/members",
        json={"email": "dan@example.com", "password": "dan-password", "role": "admin"},
        headers=alice.headers,
    )
    dan_id = (await client.get("/api/members", headers=alice.headers)).json()["items"][1]["user_id"]
    tokens = (await login(client, "dan@example.com", "dan-password")).json()
    dan = {"Authorization": f"Bearer {tokens['access_token']}"}
    made = await client.post("/api/keys", json={"name": "dan's", "role": "admin"}, headers=dan)
    dan_key = {"Authorization": f"Bearer {made.json()['key']}"}
    assert (await client.get("/api/me", headers=dan_key)).json()["role"] == "admin"

    await client.patch(f"/api/members/{dan_id}", json={"role": "viewer"}, headers=alice.headers)
    assert (await client.get("/api/me", headers=dan_key)).json()["role"] == "viewer"
    assert (await client.post("/api/keys", json={"name": "x"}, headers=dan_key)).status_code == 403

    await client.delete(f"/api/members/{dan_id}", headers=alice.headers)
    assert (await client.get("/api/me", headers=dan_key)).status_code == 401
