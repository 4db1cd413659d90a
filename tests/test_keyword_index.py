"""The keyword index against a brute-force BM25 on random corpora: MaxScore's pruning must give
exactly the top k that scoring every chunk gives, with each knowledge base's own statistics,
after deletions, and under document filters."""

from __future__ import annotations

import math
import random
import uuid
from collections import Counter

import numpy as np
import pytest
from fastapi import FastAPI

from conftest import Tenant
from heron.db.engine import Database
from heron.knowledge import index
from heron.knowledge.models import Document, DocumentStatus, KnowledgeBase, SourceKind
from heron.knowledge.terms import query_terms, terms

# Distinct stems (no stop words, nothing the stemmer merges), Zipf-distributed when drawn.
VOCABULARY = [f"w{n}x{chr(97 + n % 26)}" for n in range(400)]
ZIPF = np.array([1 / (rank + 1) for rank in range(len(VOCABULARY))])
ZIPF /= ZIPF.sum()


def random_text(rng: random.Random, words: int) -> str:
    picks = np.random.default_rng(rng.randrange(2**32)).choice(len(VOCABULARY), words, p=ZIPF)
    return " ".join(VOCABULARY[i] for i in picks)


def brute_force(
    chunks: dict[int, tuple[uuid.UUID, Counter[str]]],
    query: str,
    allowed: set[uuid.UUID] | None = None,
) -> dict[int, float]:
    """BM25 of every chunk that has a query term, from the knowledge base's own statistics."""
    n = len(chunks)
    avgdl = max(sum(sum(c.values()) for _, c in chunks.values()) / n, 1.0)
    df = Counter(t for _, counts in chunks.values() for t in counts)
    scores: dict[int, float] = {}
    for chunk_id, (document, counts) in chunks.items():
        if allowed is not None and document not in allowed:
            continue
        length = sum(counts.values())
        score = 0.0
        for term in query_terms(query):
            tf = counts.get(term, 0)
            if tf:
                idf = math.log(1 + (n - df[term] + 0.5) / (df[term] + 0.5))
                score += (
                    idf
                    * tf
                    * (index.K1 + 1)
                    / (tf + index.K1 * (1 - index.B + index.B * length / avgdl))
                )
        if score > 0:
            scores[chunk_id] = score
    return scores


def check(found: list[index.Hit], expected: dict[int, float], limit: int) -> None:
    best = sorted(expected.values(), reverse=True)[:limit]
    assert len(found) == len(best)
    assert [h.score for h in found] == pytest.approx(best, rel=1e-9)
    for hit in found:  # the chunks themselves (ties may come in any order)
        assert hit.score == pytest.approx(expected[hit.chunk_id], rel=1e-9)


async def new_kb(db: Database, tenant: Tenant, name: str) -> KnowledgeBase:
    async with db.session(write=True) as session, session.begin():
        kb = KnowledgeBase(
            workspace_id=tenant.workspace_id,
            name=name,
            description="",
            embedding_model="local",
            embedding_dimensions=4,
            chunk_size=512,
            chunk_overlap=64,
        )
        session.add(kb)
    return kb


async def add_document(
    db: Database, kb: KnowledgeBase, texts: list[str]
) -> tuple[uuid.UUID, dict[int, Counter[str]]]:
    async with db.session(write=True) as session, session.begin():
        document = Document(
            workspace_id=kb.workspace_id,
            knowledge_base_id=kb.id,
            source=SourceKind.text,
            text="\n".join(texts),
            title="",
            meta={},
            status=DocumentStatus.ready,
            truncated=False,
        )
        session.add(document)
        await session.flush()
        row = await session.get(KnowledgeBase, kb.id)
        assert row is not None
        new = [index.NewChunk(i, text, "", [], None, 0) for i, text in enumerate(texts)]
        await index.write_chunks(
            session, row, document.id, new, np.ones((len(texts), 4), dtype=np.float32) / 2
        )
    async with db.session(write=False) as session:
        from sqlalchemy import select

        from heron.knowledge.models import Chunk

        ids = (
            await session.scalars(
                select(Chunk.id).where(Chunk.document_id == document.id).order_by(Chunk.position)
            )
        ).all()
    return document.id, {chunk_id: terms(f"\n{t}") for chunk_id, t in zip(ids, texts, strict=True)}


async def search(
    db: Database,
    kbs: list[KnowledgeBase],
    query: str,
    limit: int,
    allowed: set[uuid.UUID] | None = None,
) -> list[index.Hit]:
    async with db.session(write=False) as session:
        from sqlalchemy import select

        fresh = list(
            (
                await session.scalars(
                    select(KnowledgeBase).where(KnowledgeBase.id.in_([kb.id for kb in kbs]))
                )
            ).all()
        )
        return await index.keyword_search(session, fresh, query, limit, allowed)


@pytest.mark.parametrize("read_at_once", [1, 64, index.READ_AT_ONCE])
async def test_pruned_bm25_is_exactly_brute_force_bm25(
    app: FastAPI, db: Database, alice: Tenant, read_at_once: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    # 1 reads a term at a time (most pruning, most candidate completions); the default reads
    # most of these small posting lists at once.
    monkeypatch.setattr(index, "READ_AT_ONCE", read_at_once)
    rng = random.Random(read_at_once)
    kb = await new_kb(db, alice, f"random-{read_at_once}")
    other = await new_kb(db, alice, f"other-{read_at_once}")
    chunks: dict[int, tuple[uuid.UUID, Counter[str]]] = {}
    documents: list[uuid.UUID] = []
    for _ in range(60):
        texts = [random_text(rng, rng.randint(3, 80)) for _ in range(rng.randint(1, 6))]
        document, analysed = await add_document(db, kb, texts)
        documents.append(document)
        chunks.update({c: (document, counts) for c, counts in analysed.items()})
    # Another knowledge base with the same words in other proportions: its statistics must not
    # leak into the first one's scores.
    for _ in range(10):
        await add_document(db, other, [" ".join(VOCABULARY[:5] * 20)])

    queries = [
        " ".join(
            rng.choice(VOCABULARY[: rng.choice([10, 50, 400])]) for _ in range(rng.randint(1, 8))
        )
        for _ in range(25)
    ] + [" ".join(VOCABULARY[:6]), f"{VOCABULARY[0]} {VOCABULARY[399]}", "the of and"]
    for query in queries:
        for limit in (1, 10, 50):
            check(await search(db, [kb], query, limit), brute_force(chunks, query), limit)

    # Deleting documents lowers document frequencies and lengths; terms only they had go.
    async with db.session(write=True) as session, session.begin():
        for document in documents[::3]:
            await index.remove_chunks(session, kb.id, document)
    chunks = {c: (d, counts) for c, (d, counts) in chunks.items() if d not in documents[::3]}
    for query in queries[:10]:
        check(await search(db, [kb], query, 10), brute_force(chunks, query), 10)

    # Filters apply before the top k is cut.
    allowed = set(documents[1::4]) - set(documents[::3])
    for query in queries[:10]:
        check(await search(db, [kb], query, 10, allowed), brute_force(chunks, query, allowed), 10)
