"""Knowledge bases end to end: CRUD, documents from text, URLs and files ingested in the
background, progress (JSON and SSE), failures that stay with their document, workers that die,
re-ingestion, and search by keyword, vector and both, with filters, across knowledge bases."""

from __future__ import annotations

import asyncio
import json
import uuid
from datetime import timedelta
from typing import Any

import httpx
import numpy as np
import pytest
from fastapi import FastAPI
from sqlalchemy import func, select
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, PlainTextResponse
from starlette.routing import Route

import filekinds
from conftest import BACKEND, Tenant, serve
from fakes.openai_server import FakeOpenAI, Reply
from heron.core.ids import utcnow
from heron.db.engine import Database
from heron.knowledge import index
from heron.knowledge.models import Chunk, Document, DocumentStatus, KnowledgeBase, SourceKind
from heron.knowledge.service import AgentKnowledge, embedder_factory
from heron.tools.registry import ToolContext, ToolFailure, default_registry

HERONS = """# Herons

## Feeding

The grey heron stands motionless in shallow water and spears fish with its dagger-like bill.

## Nesting

Herons nest in colonies called heronries, usually high in trees near lakes.
"""
VOLCANO = "Basaltic lava from shield volcanoes flows far because its viscosity is low."
BAKING = "Sourdough bread rises thanks to wild yeast and lactobacilli in the starter."


async def create_kb(client: httpx.AsyncClient, tenant: Tenant, name: str, **fields: Any) -> Any:
    response = await client.post(
        "/api/knowledge-bases", json={"name": name, **fields}, headers=tenant.headers
    )
    assert response.status_code == 201, response.text
    return response.json()


async def add(
    client: httpx.AsyncClient, tenant: Tenant, kb_id: str, **document: Any
) -> dict[str, Any]:
    response = await client.post(
        f"/api/knowledge-bases/{kb_id}/documents", json=document, headers=tenant.headers
    )
    assert response.status_code == 202, response.text
    body: dict[str, Any] = response.json()
    return body


async def wait_idle(client: httpx.AsyncClient, tenant: Tenant, kb_id: str) -> dict[str, Any]:
    async with asyncio.timeout(120):
        while True:
            progress = (
                await client.get(f"/api/knowledge-bases/{kb_id}/progress", headers=tenant.headers)
            ).json()
            if not progress["in_progress"]:
                return dict(progress)
            await asyncio.sleep(0.1)


async def document(client: httpx.AsyncClient, tenant: Tenant, kb_id: str, doc_id: str) -> Any:
    response = await client.get(
        f"/api/knowledge-bases/{kb_id}/documents/{doc_id}", headers=tenant.headers
    )
    assert response.status_code == 200, response.text
    return response.json()


async def search(
    client: httpx.AsyncClient, tenant: Tenant, kb_id: str, query: str, **options: Any
) -> list[dict[str, Any]]:
    response = await client.post(
        f"/api/knowledge-bases/{kb_id}/search",
        json={"query": query, **options},
        headers=tenant.headers,
    )
    assert response.status_code == 200, response.text
    results: list[dict[str, Any]] = response.json()["results"]
    return results


async def chunk_count(db: Database, **where: Any) -> int:
    async with db.session(write=False) as session:
        stmt = select(func.count()).select_from(Chunk)
        for key, value in where.items():
            stmt = stmt.where(getattr(Chunk, key) == value)
        return int(await session.scalar(stmt) or 0)


async def upload(client: httpx.AsyncClient, tenant: Tenant, name: str, content: bytes) -> str:
    response = await client.post(
        "/api/files",
        files={"file": (name, content, "application/octet-stream")},
        headers=tenant.headers,
    )
    assert response.status_code == 201, response.text
    file_id: str = response.json()["id"]
    return file_id


def site() -> Starlette:
    async def page(request: Request) -> HTMLResponse:
        return HTMLResponse(
            "<html><head><title>Glaciers</title></head><body><nav>Menu</nav>"
            "<h1>Glaciers</h1><p>Glaciers carve U-shaped valleys as they slowly grind "
            "down the bedrock.</p></body></html>"
        )

    async def missing(request: Request) -> PlainTextResponse:
        return PlainTextResponse("no", status_code=404)

    return Starlette(routes=[Route("/glaciers", page), Route("/missing", missing)])


# Knowledge bases -------------------------------------------------------------------------------


async def test_knowledge_bases_are_created_listed_changed_and_deleted(
    client: httpx.AsyncClient, alice: Tenant
) -> None:
    kb = await create_kb(client, alice, "handbook", description="Company handbook")
    assert kb["embedding_model"] == "local:all-minilm-l6-v2"
    assert kb["embedding_dimensions"] == 384
    assert (kb["chunk_size"], kb["chunk_overlap"], kb["chunk_count"]) == (512, 64, 0)
    again = await client.post(
        "/api/knowledge-bases", json={"name": "handbook"}, headers=alice.headers
    )
    assert again.status_code == 409

    for bad, field in [
        ({"name": "x", "chunk_size": 128, "chunk_overlap": 100}, "chunk_overlap"),
        ({"name": "y", "embedding_model": "nobody:text-embedding-3-small"}, "embedding_model"),
        ({"name": "z", "embedding_dimensions": 768}, "embedding_dimensions"),
    ]:
        refused = await client.post("/api/knowledge-bases", json=bad, headers=alice.headers)
        assert refused.status_code == 422, refused.text
        assert field in refused.text

    listed = (await client.get("/api/knowledge-bases", headers=alice.headers)).json()
    assert [k["name"] for k in listed["items"]] == ["handbook"]
    changed = await client.patch(
        f"/api/knowledge-bases/{kb['id']}",
        json={"name": "manual", "chunk_size": 256, "chunk_overlap": 32},
        headers=alice.headers,
    )
    assert changed.status_code == 200, changed.text
    assert (changed.json()["name"], changed.json()["chunk_size"]) == ("manual", 256)
    too_much = await client.patch(
        f"/api/knowledge-bases/{kb['id']}", json={"chunk_overlap": 200}, headers=alice.headers
    )
    assert too_much.status_code == 422

    deleted = await client.delete(f"/api/knowledge-bases/{kb['id']}", headers=alice.headers)
    assert deleted.status_code == 204
    gone = await client.get(f"/api/knowledge-bases/{kb['id']}", headers=alice.headers)
    assert gone.status_code == 404
    assert gone.headers["content-type"] == "application/problem+json"


# Ingestion and search --------------------------------------------------------------------------


async def test_text_url_and_file_documents_ingest_and_are_found_three_ways(
    client: httpx.AsyncClient, alice: Tenant, db: Database
) -> None:
    await client.patch(
        f"/api/workspaces/{alice.workspace_id}",
        json={"allow_private_network": True},
        headers=alice.headers,
    )
    kb = await create_kb(client, alice, "nature")
    async with serve(site()) as base:  # type: ignore[arg-type]
        herons = await add(client, alice, kb["id"], text=HERONS, title="Herons", metadata={"n": 1})
        assert herons["status"] == "queued"
        glaciers = await add(client, alice, kb["id"], url=f"{base}/glaciers")
        pdf_id = await upload(client, alice, "volcano.pdf", filekinds.pdf(VOLCANO))
        volcano = await add(client, alice, kb["id"], file_id=pdf_id)
        progress = await wait_idle(client, alice, kb["id"])

    assert progress["documents_total"] == progress["documents_done"] == 3
    assert progress["by_status"]["ready"] == 3
    assert progress["chunks_done"] == progress["chunks_total"] > 0
    for doc in (herons, glaciers, volcano):
        got = await document(client, alice, kb["id"], doc["id"])
        assert got["status"] == "ready", got
        assert got["chunks_done"] == got["chunks_total"] > 0
        assert got["content_sha256"]
        assert got["indexed_at"]
    assert (await document(client, alice, kb["id"], volcano["id"]))["title"] == "volcano.pdf"
    assert (await document(client, alice, kb["id"], glaciers["id"]))["source"] == "url"

    for mode in ("keyword", "vector", "hybrid"):
        found = await search(client, alice, kb["id"], "how do herons catch fish", mode=mode)
        top = found[0]
        assert top["document_id"] == herons["id"], (mode, found)
        assert "spears fish" in top["text"]
        assert top["heading_path"] == ["Herons", "Feeding"]
        assert top["document_title"] == "Herons"
        assert top["knowledge_base_id"] == kb["id"]
        assert top["metadata"] == {"n": 1}
        ice = await search(client, alice, kb["id"], "glaciers carving valleys", mode=mode)
        assert ice[0]["document_id"] == glaciers["id"], (mode, ice)
        lava = await search(client, alice, kb["id"], "lava viscosity of volcanoes", mode=mode)
        assert lava[0]["document_id"] == volcano["id"], (mode, lava)
        assert lava[0]["page"] == 1

    limited = await search(client, alice, kb["id"], "herons", top_k=1)
    assert len(limited) == 1
    listed = (
        await client.get(f"/api/knowledge-bases/{kb['id']}/documents", headers=alice.headers)
    ).json()
    assert {d["id"] for d in listed["items"]} == {herons["id"], glaciers["id"], volcano["id"]}
    kb_now = (await client.get(f"/api/knowledge-bases/{kb['id']}", headers=alice.headers)).json()
    assert kb_now["chunk_count"] == await chunk_count(db, knowledge_base_id=uuid.UUID(kb["id"]))


async def test_failing_documents_fail_with_a_reason_and_never_block_the_others(
    client: httpx.AsyncClient, alice: Tenant
) -> None:
    kb = await create_kb(client, alice, "mixed")
    corrupt = await upload(client, alice, "broken.pdf", b"%PDF-1.7\n" + b"\x00garbage" * 200)
    async with serve(site()) as base:  # type: ignore[arg-type]
        batch = await client.post(
            f"/api/knowledge-bases/{kb['id']}/documents/batch",
            json={
                "documents": [
                    {"file_id": corrupt},
                    {"url": f"{base}/glaciers"},  # loopback: this workspace doesn't allow it
                    {"text": BAKING, "title": "Bread"},
                    {"url": "http://127.0.0.1:1/nothing-listens"},
                ]
            },
            headers=alice.headers,
        )
        assert batch.status_code == 202, batch.text
        docs = batch.json()["items"]
        progress = await wait_idle(client, alice, kb["id"])
    assert progress["by_status"]["failed"] == 3
    assert progress["by_status"]["ready"] == 1
    states = [await document(client, alice, kb["id"], d["id"]) for d in docs]
    assert [s["status"] for s in states] == ["failed", "failed", "ready", "failed"]
    assert states[0]["error"], states[0]
    assert states[1]["error"] == "refused: 127.0.0.1 is a loopback address"
    assert states[3]["error"].startswith("refused:")
    failed = (
        await client.get(
            f"/api/knowledge-bases/{kb['id']}/documents?status=failed", headers=alice.headers
        )
    ).json()
    assert len(failed["items"]) == 3
    found = await search(client, alice, kb["id"], "sourdough starter yeast")
    assert [r["document_title"] for r in found] == ["Bread"]

    unknown = await client.post(
        f"/api/knowledge-bases/{kb['id']}/documents",
        json={"file_id": str(uuid.uuid4())},
        headers=alice.headers,
    )
    assert unknown.status_code == 422
    two_sources = await client.post(
        f"/api/knowledge-bases/{kb['id']}/documents",
        json={"text": "a", "url": "https://example.com/"},
        headers=alice.headers,
    )
    assert two_sources.status_code == 422


async def test_a_url_on_a_private_network_is_fetched_when_the_workspace_allows_it(
    client: httpx.AsyncClient, alice: Tenant
) -> None:
    kb = await create_kb(client, alice, "web")
    await client.patch(
        f"/api/workspaces/{alice.workspace_id}",
        json={"allow_private_network": True},
        headers=alice.headers,
    )
    async with serve(site()) as base:  # type: ignore[arg-type]
        ok = await add(client, alice, kb["id"], url=f"{base}/glaciers")
        missing = await add(client, alice, kb["id"], url=f"{base}/missing")
        await wait_idle(client, alice, kb["id"])
    assert (await document(client, alice, kb["id"], ok["id"]))["status"] == "ready"
    failed = await document(client, alice, kb["id"], missing["id"])
    assert failed["status"] == "failed"
    assert failed["error"] == f"{base}/missing answered HTTP 404 Not Found"


async def test_progress_streams_as_events_until_everything_is_done(
    client: httpx.AsyncClient, alice: Tenant
) -> None:
    kb = await create_kb(client, alice, "streamed", chunk_size=64, chunk_overlap=8)
    long_text = "\n\n".join(f"Paragraph {i} about topic number {i}. " * 8 for i in range(60))
    await add(client, alice, kb["id"], text=long_text, title="Long")
    await add(client, alice, kb["id"], text=BAKING, title="Bread")
    events: list[dict[str, Any]] = []
    async with client.stream(
        "GET",
        f"/api/knowledge-bases/{kb['id']}/progress/events?follow=false",
        headers=alice.headers,
    ) as stream:
        assert stream.headers["content-type"].startswith("text/event-stream")
        async for line in stream.aiter_lines():
            if line.startswith("data: "):
                events.append(json.loads(line[6:]))
    assert len(events) >= 2
    assert events[0]["in_progress"]
    last = events[-1]
    assert not last["in_progress"]
    assert last["documents_done"] == last["documents_total"] == 2
    assert last["chunks_done"] == last["chunks_total"] > 10
    done = [e["chunks_done"] for e in events]
    assert done == sorted(done) or BACKEND == "postgres"  # retried batches may go back


# Deletion and re-ingestion ---------------------------------------------------------------------


async def test_deleting_documents_and_knowledge_bases_removes_their_chunks(
    client: httpx.AsyncClient, alice: Tenant, db: Database
) -> None:
    kb = await create_kb(client, alice, "transient")
    herons = await add(client, alice, kb["id"], text=HERONS, title="Herons")
    bread = await add(client, alice, kb["id"], text=BAKING, title="Bread")
    await wait_idle(client, alice, kb["id"])
    assert await search(client, alice, kb["id"], "heronries in trees", mode="keyword")
    deleted = await client.delete(
        f"/api/knowledge-bases/{kb['id']}/documents/{herons['id']}", headers=alice.headers
    )
    assert deleted.status_code == 204
    assert await chunk_count(db, document_id=uuid.UUID(herons["id"])) == 0
    for mode in ("keyword", "vector", "hybrid"):
        found = await search(client, alice, kb["id"], "heronries in trees", mode=mode)
        assert all(r["document_id"] == bread["id"] for r in found), mode
    kb_now = (await client.get(f"/api/knowledge-bases/{kb['id']}", headers=alice.headers)).json()
    assert kb_now["chunk_count"] == await chunk_count(db, document_id=uuid.UUID(bread["id"]))

    assert (
        await client.delete(f"/api/knowledge-bases/{kb['id']}", headers=alice.headers)
    ).status_code == 204
    assert await chunk_count(db, knowledge_base_id=uuid.UUID(kb["id"])) == 0
    async with db.session(write=False) as session:
        from sqlalchemy import text

        terms_left = await session.scalar(
            text("SELECT count(*) FROM kb_terms WHERE knowledge_base_id = :kb"),
            {"kb": uuid.UUID(kb["id"]).hex if BACKEND == "sqlite" else uuid.UUID(kb["id"])},
        )
        orphans = await session.scalar(
            text("SELECT count(*) FROM term_blocks WHERE term_id NOT IN (SELECT id FROM kb_terms)")
        )
    assert terms_left == 0
    assert orphans == 0


async def test_a_document_deleted_while_it_ingests_leaves_nothing_behind(
    client: httpx.AsyncClient, alice: Tenant, db: Database
) -> None:
    kb = await create_kb(client, alice, "hasty", chunk_size=64, chunk_overlap=8)
    long_text = "\n\n".join(f"Section {i} on the migration of cranes. " * 6 for i in range(80))
    doomed = await add(client, alice, kb["id"], text=long_text, title="Cranes")
    kept = await add(client, alice, kb["id"], text=BAKING, title="Bread")
    async with asyncio.timeout(60):
        while (await document(client, alice, kb["id"], doomed["id"]))["chunks_done"] == 0:
            await asyncio.sleep(0.02)
    deleted = await client.delete(
        f"/api/knowledge-bases/{kb['id']}/documents/{doomed['id']}", headers=alice.headers
    )
    assert deleted.status_code == 204
    await wait_idle(client, alice, kb["id"])
    await asyncio.sleep(0.5)  # a batch in flight when the document went finds it gone
    assert await chunk_count(db, document_id=uuid.UUID(doomed["id"])) == 0
    assert (await document(client, alice, kb["id"], kept["id"]))["status"] == "ready"
    kb_now = (await client.get(f"/api/knowledge-bases/{kb['id']}", headers=alice.headers)).json()
    assert kb_now["chunk_count"] == await chunk_count(db, knowledge_base_id=uuid.UUID(kb["id"]))
    assert await search(client, alice, kb["id"], "migration of cranes", mode="keyword") == []


async def test_reingesting_replaces_a_documents_chunks(
    client: httpx.AsyncClient, alice: Tenant, db: Database
) -> None:
    kb = await create_kb(client, alice, "again")
    herons = await add(client, alice, kb["id"], text=HERONS, title="Herons")
    await wait_idle(client, alice, kb["id"])
    before = await search(client, alice, kb["id"], "grey heron fishing", mode="keyword")
    count = await chunk_count(db, document_id=uuid.UUID(herons["id"]))

    queued = await client.post(
        f"/api/knowledge-bases/{kb['id']}/documents/{herons['id']}/reingest",
        headers=alice.headers,
    )
    assert queued.status_code == 202, queued.text
    await wait_idle(client, alice, kb["id"])
    after_doc = await document(client, alice, kb["id"], herons["id"])
    assert after_doc["status"] == "ready"
    assert await chunk_count(db, document_id=uuid.UUID(herons["id"])) == count
    after = await search(client, alice, kb["id"], "grey heron fishing", mode="keyword")
    assert after[0]["text"] == before[0]["text"]
    assert after[0]["chunk_id"] != before[0]["chunk_id"]
    kb_now = (await client.get(f"/api/knowledge-bases/{kb['id']}", headers=alice.headers)).json()
    assert kb_now["chunk_count"] == count


async def test_a_document_whose_worker_died_is_taken_up_again(
    client: httpx.AsyncClient, alice: Tenant, db: Database
) -> None:
    kb = await create_kb(client, alice, "resilient")
    kb_id = uuid.UUID(kb["id"])
    lapsed = utcnow() - timedelta(seconds=5)
    async with db.session(write=True) as session, session.begin():
        kb_row = await session.get(KnowledgeBase, kb_id)
        assert kb_row is not None
        stuck, hopeless = (
            Document(
                workspace_id=alice.workspace_id,
                knowledge_base_id=kb_id,
                source=SourceKind.text,
                text=HERONS,
                title=title,
                meta={},
                status=status,
                truncated=False,
                chunks_done=1,
                chunks_total=3,
                attempts=attempts,
                lease_owner="another-host:4242",
                lease_expires_at=lapsed,
            )
            for title, status, attempts in (
                ("stuck", DocumentStatus.embedding, 1),
                ("hopeless", DocumentStatus.parsing, 3),
            )
        )
        session.add_all([stuck, hopeless])
        await session.flush()
        # What the dead worker had written of the stuck document.
        partial = index.NewChunk(0, "half-written", "", [], None, 2)
        vector = np.ones((1, 384), dtype=np.float32) / np.sqrt(384)
        await index.write_chunks(session, kb_row, stuck.id, [partial], vector)
        stuck_id, hopeless_id = str(stuck.id), str(hopeless.id)

    await asyncio.sleep(0.2)
    await wait_idle(client, alice, kb["id"])  # the sweeper takes them up within seconds
    taken = await document(client, alice, kb["id"], stuck_id)
    assert taken["status"] == "ready", taken
    assert taken["attempts"] == 2
    found = await search(client, alice, kb["id"], "half-written", mode="keyword")
    assert found == []
    assert await chunk_count(db, document_id=uuid.UUID(stuck_id)) == taken["chunks_total"]
    given_up = await document(client, alice, kb["id"], hopeless_id)
    assert given_up["status"] == "failed"
    assert "interrupted 3 times" in given_up["error"]


# Filters and several knowledge bases -----------------------------------------------------------


@pytest.mark.parametrize("vector_path", ["exact", "hnsw"])
async def test_filters_apply_before_the_top_results_are_cut(
    client: httpx.AsyncClient, alice: Tenant, vector_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    if vector_path == "hnsw":
        if BACKEND != "postgres":
            pytest.skip("PostgreSQL's HNSW index")
        monkeypatch.setattr(index, "EXACT_MAX", 0)  # every knowledge base searched by index
    kb = await create_kb(client, alice, "filtered")
    docs = {}
    for i in range(12):
        docs[i] = await add(
            client,
            alice,
            kb["id"],
            text=f"Note {i}: herons and egrets wade in marshes looking for fish.",
            title=f"note-{i}",
            metadata={"lang": "fr" if i == 11 else "en", "tags": ["birds", f"t{i % 3}"]},
        )
    await add(client, alice, kb["id"], text=VOLCANO, title="lava", metadata={"lang": "fr"})
    await wait_idle(client, alice, kb["id"])
    for mode in ("keyword", "vector", "hybrid"):
        french = await search(
            client, alice, kb["id"], "herons wading", mode=mode, top_k=2, filters={"lang": "fr"}
        )
        assert french[0]["document_id"] == docs[11]["id"], (mode, french)
        assert {r["metadata"]["lang"] for r in french} == {"fr"}
        tagged = await search(
            client,
            alice,
            kb["id"],
            "herons",
            mode=mode,
            top_k=20,
            filters={"tags": ["t1"], "lang": ["en", "de"]},
        )
        assert {r["document_title"] for r in tagged} == {"note-1", "note-4", "note-7", "note-10"}
        nothing = await search(client, alice, kb["id"], "herons", mode=mode, filters={"x": 1})
        assert nothing == []


async def test_one_search_covers_several_knowledge_bases(
    client: httpx.AsyncClient, alice: Tenant, bob: Tenant
) -> None:
    birds = await create_kb(client, alice, "birds")
    food = await create_kb(client, alice, "food")
    await add(client, alice, birds["id"], text=HERONS, title="Herons")
    await add(client, alice, food["id"], text=BAKING, title="Bread")
    await wait_idle(client, alice, birds["id"])
    await wait_idle(client, alice, food["id"])
    for mode in ("keyword", "vector", "hybrid"):
        response = await client.post(
            "/api/knowledge-bases/search",
            json={
                "query": "sourdough bread",
                "knowledge_bases": [birds["id"], food["id"]],
                "mode": mode,
            },
            headers=alice.headers,
        )
        assert response.status_code == 200, response.text
        results = response.json()["results"]
        assert results[0]["knowledge_base_id"] == food["id"]
        assert {r["knowledge_base_id"] for r in results} <= {birds["id"], food["id"]}
    # Each knowledge base only finds its own chunks.
    only_birds = await search(client, alice, birds["id"], "sourdough bread", mode="keyword")
    assert only_birds == []
    # Another workspace's knowledge base is not found, even among its own.
    bobs = await create_kb(client, bob, "bobs")
    refused = await client.post(
        "/api/knowledge-bases/search",
        json={"query": "bread", "knowledge_bases": [bobs["id"], food["id"]]},
        headers=bob.headers,
    )
    assert refused.status_code == 404


async def test_searches_answer_while_a_write_transaction_holds_the_database(
    client: httpx.AsyncClient, alice: Tenant, db: Database
) -> None:
    # A search is a POST that only reads: it never waits for SQLite's single writer, which a
    # run's checkpoint or an ingestion batch may hold.
    kb = await create_kb(client, alice, "while-writing")
    await add(client, alice, kb["id"], text=HERONS, title="Herons")
    await wait_idle(client, alice, kb["id"])
    async with db.session(write=True) as writer, writer.begin():
        await writer.execute(select(func.count()).select_from(Chunk))  # the writer is taken
        async with asyncio.timeout(30):
            for mode in ("keyword", "vector", "hybrid"):
                found = await search(client, alice, kb["id"], "where do herons nest", mode=mode)
                assert found, mode
            many = await client.post(
                "/api/knowledge-bases/search",
                json={"query": "heronries", "knowledge_bases": [kb["id"]]},
                headers=alice.headers,
            )
            assert many.status_code == 200, many.text
            assert many.json()["results"]


@pytest.mark.parametrize("mode", ["keyword", "vector", "hybrid"])
async def test_an_empty_knowledge_base_finds_nothing(
    client: httpx.AsyncClient, alice: Tenant, mode: str
) -> None:
    kb = await create_kb(client, alice, f"empty-{mode}")
    assert await search(client, alice, kb["id"], "anything at all", mode=mode) == []


# Agents ----------------------------------------------------------------------------------------


async def test_an_agent_that_lists_knowledge_bases_gets_the_search_tool(
    client: httpx.AsyncClient, alice: Tenant
) -> None:
    await create_kb(client, alice, "handbook")
    provider = await client.post(
        "/api/providers",
        json={"name": "llm", "kind": "openai-compatible", "base_url": "http://127.0.0.1:9/v1"},
        headers=alice.headers,
    )
    assert provider.status_code == 201, provider.text
    agent = await client.post(
        "/api/agents",
        json={"name": "helper", "model": "llm:m", "knowledge_bases": ["handbook"]},
        headers=alice.headers,
    )
    assert agent.status_code == 201, agent.text
    assert agent.json()["draft"]["tools"] == ["search_knowledge"]
    assert agent.json()["draft"]["knowledge_bases"] == ["handbook"]
    unknown = await client.post(
        "/api/agents",
        json={"name": "lost", "model": "llm:m", "knowledge_bases": ["nowhere"]},
        headers=alice.headers,
    )
    assert unknown.status_code == 422
    assert unknown.json()["errors"][0]["loc"] == ["body", "knowledge_bases", 0]


async def test_search_knowledge_answers_passages_with_their_citations(
    app: FastAPI, client: httpx.AsyncClient, alice: Tenant, bob: Tenant, db: Database
) -> None:
    nature = await create_kb(client, alice, "nature")
    food = await create_kb(client, alice, "food")
    herons = await add(client, alice, nature["id"], text=HERONS, title="Herons")
    bread = await add(client, alice, food["id"], text=BAKING, title="Bread")
    await wait_idle(client, alice, nature["id"])
    await wait_idle(client, alice, food["id"])
    tool = default_registry().get("search_knowledge")
    embedders = embedder_factory(app.state.secret_box)

    def context(workspace_id: uuid.UUID, refs: list[str]) -> ToolContext:
        knowledge = AgentKnowledge(db, embedders, workspace_id, refs)
        return ToolContext(workspace_id=workspace_id, knowledge=knowledge)

    ctx = context(alice.workspace_id, ["nature", food["id"]])
    answer = await tool.call(ctx, {"query": "where do herons nest?", "top_k": 2})
    assert isinstance(answer, dict)
    first = answer["results"][0]  # type: ignore[index]
    assert "heronries" in first["text"]
    assert first["citation"] == {
        "knowledge_base": "nature",
        "knowledge_base_id": nature["id"],
        "document_id": herons["id"],
        "document_title": "Herons",
        "chunk_id": first["citation"]["chunk_id"],
        "page": None,
        "heading_path": ["Herons", "Nesting"],
    }
    only_food = await tool.call(ctx, {"query": "herons nesting", "knowledge_base": "food"})
    assert {r["citation"]["document_id"] for r in only_food["results"]} <= {bread["id"]}  # type: ignore[index]
    with pytest.raises(ToolFailure, match="no knowledge base named 'secret'"):
        await tool.call(ctx, {"query": "x", "knowledge_base": "secret"})
    # Another workspace naming Alice's knowledge bases finds none of them.
    with pytest.raises(ToolFailure, match="none of this agent's knowledge bases exists"):
        await tool.call(context(bob.workspace_id, [nature["id"], "food"]), {"query": "herons"})
    with pytest.raises(ToolFailure, match="no knowledge bases"):
        await tool.call(ToolContext(workspace_id=alice.workspace_id), {"query": "herons"})


async def test_a_knowledge_base_can_embed_with_a_providers_model(
    client: httpx.AsyncClient, alice: Tenant
) -> None:
    fake = FakeOpenAI(api_key="sk-embed-0123456789", models=["embedder"])
    async with fake.serve() as url:
        provider = await client.post(
            "/api/providers",
            json={
                "name": "gateway",
                "kind": "openai-compatible",
                "base_url": url,
                "api_key": "sk-embed-0123456789",
            },
            headers=alice.headers,
        )
        assert provider.status_code == 201, provider.text
        missing_size = await client.post(
            "/api/knowledge-bases",
            json={"name": "remote", "embedding_model": "gateway:embedder"},
            headers=alice.headers,
        )
        assert missing_size.status_code == 422
        kb = await create_kb(
            client, alice, "remote", embedding_model="gateway:embedder", embedding_dimensions=8
        )
        assert kb["embedding_dimensions"] == 8
        bread = await add(client, alice, kb["id"], text=BAKING, title="Bread")
        await wait_idle(client, alice, kb["id"])
        fake.push_embeddings(Reply.failure(400, "input too long", type="invalid_request_error"))
        refused = await add(client, alice, kb["id"], text=VOLCANO, title="Lava")
        await wait_idle(client, alice, kb["id"])

        assert (await document(client, alice, kb["id"], bread["id"]))["status"] == "ready"
        failed = await document(client, alice, kb["id"], refused["id"])
        assert failed["status"] == "failed"
        assert "input too long" in failed["error"]
        # The fake's embeddings hash the text: only the same text (the title, then the chunk)
        # is its nearest neighbour.
        found = await search(client, alice, kb["id"], f"Bread\n\n{BAKING}", mode="vector")
        assert found[0]["document_id"] == bread["id"]
        assert found[0]["score"] == pytest.approx(1.0, abs=1e-5)
        assert fake.embedding_requests[-1].body["model"] == "embedder"

    await client.delete(f"/api/providers/{provider.json()['id']}", headers=alice.headers)
    orphaned = await client.post(
        f"/api/knowledge-bases/{kb['id']}/search",
        json={"query": "bread", "mode": "vector"},
        headers=alice.headers,
    )
    assert orphaned.status_code == 409
    assert "gateway" in orphaned.json()["detail"]


async def test_the_first_ingested_document_settles_the_heap_once(
    client: httpx.AsyncClient, alice: Tenant, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Parsers and the embedder are loaded once a document is ready: the heap is collected
    and frozen then (heron.core.heap), once, not for every document."""
    import gc

    from heron.core import heap

    frozen: list[int] = []
    monkeypatch.setattr(heap, "_settled", set())
    monkeypatch.setattr(gc, "freeze", lambda: frozen.append(1))
    kb = await create_kb(client, alice, "settled")
    for n in range(3):
        await add(client, alice, kb["id"], text=f"{HERONS}\n\nCopy {n}.", title=f"Herons {n}")
    progress = await wait_idle(client, alice, kb["id"])
    assert progress["by_status"]["ready"] == 3
    assert frozen == [1]
