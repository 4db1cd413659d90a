"""The keyword index against a brute-force BM25 on random corpora: the postings merged into
blocks must give exactly the top k that scoring every chunk from its text gives, with each
knowledge base's own statistics, after deletions and more writes, and under filters."""

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


async def check_blocks(
    db: Database, kb: KnowledgeBase, chunks: dict[int, tuple[uuid.UUID, Counter[str]]]
) -> int:
    """Every live posting is in exactly one block, with its tf and length; each term has fewer
    than FANOUT blocks of a level (merges happened); document frequencies are exact. Returns
    how many postings of deleted chunks the blocks still hold."""
    from sqlalchemy import select

    from heron.knowledge.models import KeywordTerm, TermBlock

    async with db.session(write=False) as session:
        rows = (
            await session.execute(
                select(KeywordTerm.term, KeywordTerm.df, TermBlock.level, TermBlock.postings)
                .join(TermBlock, TermBlock.term_id == KeywordTerm.id)
                .where(KeywordTerm.knowledge_base_id == kb.id)
            )
        ).all()
    levels: Counter[tuple[str, int]] = Counter()
    stored: set[tuple[str, int, int, int]] = set()
    dead = 0
    df: dict[str, int] = {}
    for term, frequency, level, data in rows:
        levels[(term, level)] += 1
        df[term] = frequency
        for chunk, tf, length in np.frombuffer(data, dtype=index.POSTING).tolist():
            if chunk in chunks:  # postings of deleted chunks may wait for their merge
                assert (term, chunk, tf, length) not in stored
                stored.add((term, chunk, tf, length))
            else:
                dead += 1
    expected = {
        (term, chunk, tf, sum(counts.values()))
        for chunk, (_, counts) in chunks.items()
        for term, tf in counts.items()
    }
    assert stored == expected
    assert max(levels.values()) < index.FANOUT
    assert df == Counter(t for _, counts in chunks.values() for t in counts)
    return dead


@pytest.mark.parametrize("fanout", [2, 4])
async def test_bm25_from_merged_blocks_is_exactly_brute_force_bm25(
    app: FastAPI, db: Database, alice: Tenant, fanout: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(index, "FANOUT", fanout)
    rng = random.Random(fanout)
    kb = await new_kb(db, alice, f"random-{fanout}")
    other = await new_kb(db, alice, f"other-{fanout}")
    chunks: dict[int, tuple[uuid.UUID, Counter[str]]] = {}
    documents: list[uuid.UUID] = []

    async def add_random(count: int) -> None:
        for _ in range(count):
            texts = [random_text(rng, rng.randint(3, 80)) for _ in range(rng.randint(1, 6))]
            document, analysed = await add_document(db, kb, texts)
            documents.append(document)
            chunks.update({c: (document, counts) for c, counts in analysed.items()})

    await add_random(60)
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
    await check_blocks(db, kb, chunks)

    # Deleting documents lowers document frequencies and lengths at once; their postings are
    # skipped until merges drop them.
    gone = set(documents[::3])
    async with db.session(write=True) as session, session.begin():
        for document in gone:
            await index.remove_chunks(session, kb.id, document)
    chunks = {c: (d, counts) for c, (d, counts) in chunks.items() if d not in gone}
    for query in queries[:10]:
        check(await search(db, [kb], query, 10), brute_force(chunks, query), 10)
    # Again with the knowledge base's matrix loaded (SQLite): liveness is read from its ids.
    async with db.session(write=False) as session:
        fresh = await session.get(KnowledgeBase, kb.id)
        assert fresh is not None
        await index.vector_search(session, [fresh], np.ones(4, dtype=np.float32) / 2, 5, None)
    for query in queries[:10]:
        check(await search(db, [kb], query, 10), brute_force(chunks, query), 10)
    dead = await check_blocks(db, kb, chunks)
    assert dead > 0
    await add_random(30)
    for query in queries[:10]:
        check(await search(db, [kb], query, 10), brute_force(chunks, query), 10)
    assert await check_blocks(db, kb, chunks) < dead  # merges dropped some

    # Filters apply before the top k is cut.
    allowed = set(documents[1::4]) - gone
    for query in queries[:10]:
        check(await search(db, [kb], query, 10, allowed), brute_force(chunks, query, allowed), 10)


def test_the_postings_cache_keeps_the_recently_used_within_its_bytes() -> None:
    cache = index.posting_cache(max_bytes=4 * 1600)
    kb = uuid.uuid4()

    def postings(n: int) -> tuple[np.ndarray, np.ndarray]:
        return np.zeros(n, dtype=np.int64), np.zeros(n)  # 16 bytes a posting

    for term in "abcd":
        cache.put(("db", kb, 1, term), postings(100))
    assert cache.get(("db", kb, 1, "a")) is not None  # now the most recently used
    cache.put(("db", kb, 1, "e"), postings(100))
    assert cache.get(("db", kb, 1, "b")) is None  # the least recently used went
    assert all(cache.get(("db", kb, 1, t)) is not None for t in "acde")
    assert cache.get(("db", kb, 2, "a")) is None  # another version of the index: not this entry
    cache.put(("db", kb, 1, "huge"), postings(200))  # over a quarter of the cache: not kept
    assert cache.get(("db", kb, 1, "huge")) is None
    assert all(cache.get(("db", kb, 1, t)) is not None for t in "acde")


def test_a_sized_cache_without_a_largest_share_keeps_the_newest_and_forgets_by_key() -> None:
    """As the vector matrices are held: the newest always stays, even alone over the budget;
    older ones go, least recently used first; a deleted knowledge base's entries go at once."""
    from heron.core.lru import SizedLRU

    cache: SizedLRU[tuple[str, str], bytes] = SizedLRU(10, len)
    cache.put(("db", "a"), b"12345")
    cache.put(("db", "b"), b"1234")
    assert cache.get(("db", "a")) == b"12345"  # now the most recently used
    cache.put(("db", "c"), b"12")
    assert cache.get(("db", "b")) is None
    assert cache.nbytes == 7
    cache.put(("db", "huge"), b"x" * 50)  # over the budget on its own: kept, alone
    assert cache.get(("db", "huge")) is not None
    assert cache.get(("db", "a")) is None
    assert cache.nbytes == 50
    cache.put(("db", "c"), b"12")
    cache.discard(lambda key: key[1] == "huge")
    assert cache.get(("db", "huge")) is None
    assert cache.get(("db", "c")) == b"12"
    assert cache.nbytes == 2
