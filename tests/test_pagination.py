"""One cursor-pagination shape for every list."""

from __future__ import annotations

import httpx

from conftest import Tenant


async def test_paging_through_keys_sees_each_once_in_creation_order(
    client: httpx.AsyncClient, alice: Tenant
) -> None:
    for i in range(24):
        await client.post("/api/keys", json={"name": f"k{i:02}"}, headers=alice.headers)
    seen: list[str] = []
    cursor = None
    pages = 0
    while True:
        params = {"limit": 10} | ({"cursor": cursor} if cursor else {})
        page = (await client.get("/api/keys", params=params, headers=alice.headers)).json()
        assert set(page) == {"items", "next_cursor"}
        seen += [k["name"] for k in page["items"]]
        pages += 1
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert pages == 3
    assert seen == ["Alice owner key"] + [f"k{i:02}" for i in range(24)]


async def test_exact_page_has_no_next_cursor(client: httpx.AsyncClient, alice: Tenant) -> None:
    page = (await client.get("/api/keys", params={"limit": 1}, headers=alice.headers)).json()
    assert len(page["items"]) == 1
    assert page["next_cursor"] is None


async def test_every_list_endpoint_uses_the_same_shape(
    client: httpx.AsyncClient, alice: Tenant
) -> None:
    for path in ("/api/workspaces", "/api/members", "/api/keys"):
        page = (await client.get(path, params={"limit": 1}, headers=alice.headers)).json()
        assert set(page) == {"items", "next_cursor"}, path
