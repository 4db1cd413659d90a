"""The search index of chunks: written by ingestion, read by search, on both backends.

Keyword (the same on SQLite and PostgreSQL)
- Terms come from `terms.py` (words, stop words dropped, Snowball English stems). `kb_terms`
  holds each knowledge base's terms with their document frequency; `chunk_terms` one posting
  per (term, chunk) with the term's frequency and the chunk's length, keyed by term first.
- Ranking is BM25 (k1=1.2, b=0.75, idf = ln(1 + (N - df + 0.5) / (df + 0.5))) with the knowledge
  base's own N and average length, exactly, with MaxScore pruning: a term adds at most
  idf * (k1 + 1) to any chunk's score, so the rarest terms' postings are read first, and once
  the k-th best score so far is at least what all the unread terms could add together, no
  chunk outside the candidates can enter the top k; the candidates that still could are scored
  on the remaining terms by key lookups. A query of common words reads little more than its
  rare words' postings, instead of every posting of every word.

Vector
- SQLite: numpy over the knowledge base's normalised matrix, cached per process and reloaded
  when the knowledge base's `index_version` moved (any process that writes bumps it).
- PostgreSQL: pgvector; a knowledge base of more than `EXACT_MAX` chunks uses the HNSW index of
  its size (iterative scan, so filters apply before the limit), smaller ones an exact scan.

Document filters arrive as a set of allowed document ids and apply before the top N is cut.
"""

from __future__ import annotations

import asyncio
import json
import math
import threading
import uuid
from collections import Counter, OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

from sqlalchemy import Table, bindparam, delete, func, select, text, update
from sqlalchemy import insert as core_insert
from sqlalchemy.ext.asyncio import AsyncSession

from heron.knowledge.models import Chunk, ChunkTerm, KeywordTerm, KnowledgeBase
from heron.knowledge.terms import query_terms, terms

if TYPE_CHECKING:
    import numpy as np

K1 = 1.2
B = 0.75
EXACT_MAX = 10_000
"""Up to this many chunks, PostgreSQL searches a knowledge base exactly (fast enough, and
perfect recall); beyond, through the HNSW index."""
INDEXED_DIMENSIONS = frozenset({384, 768, 1024, 1536})  # as created by migration 0006
ROWS_PER_STATEMENT = 5000  # ids per IN (...): under both drivers' 32,767 parameters
ANALYSE_INLINE_CHARS = 20_000  # more text than this is analysed off the event loop
READ_AT_ONCE = 4096
"""Postings of several terms are read in one statement while their document frequencies add
up to at most this (the rarest terms: cheap to read, and they decide the candidates)."""


@dataclass(frozen=True)
class NewChunk:
    position: int
    text: str
    context: str
    heading_path: list[str]
    page: int | None
    token_count: int


@dataclass(frozen=True)
class Hit:
    chunk_id: int
    score: float


def is_sqlite(session: AsyncSession) -> bool:
    return session.get_bind().dialect.name == "sqlite"


# Writing -----------------------------------------------------------------------------------------


async def write_chunks(
    session: AsyncSession,
    kb: KnowledgeBase,
    document_id: uuid.UUID,
    chunks: Sequence[NewChunk],
    embeddings: np.ndarray,
) -> None:
    """Insert chunks with their embeddings and keyword postings; update the statistics."""
    if not chunks:
        return
    sqlite = is_sqlite(session)
    texts = [f"{c.context}\n{c.text}" for c in chunks]
    if sum(map(len, texts)) > ANALYSE_INLINE_CHARS:
        analysed = await asyncio.to_thread(lambda: [terms(t) for t in texts])
    else:
        analysed = [terms(t) for t in texts]
    lengths = [sum(counts.values()) for counts in analysed]
    values = [
        {
            "workspace_id": kb.workspace_id,
            "knowledge_base_id": kb.id,
            "document_id": document_id,
            "position": c.position,
            "text": c.text,
            "context": c.context,
            "heading_path": c.heading_path,
            "page": c.page,
            "token_count": c.token_count,
            "term_count": lengths[n],
            "embedding": embeddings[n].tobytes() if sqlite else embeddings[n],
        }
        for n, c in enumerate(chunks)
    ]
    ids = list(
        (
            await session.scalars(
                core_insert(Chunk).returning(Chunk.id, sort_by_parameter_order=True), values
            )
        ).all()
    )
    df: Counter[str] = Counter()
    for counts in analysed:
        df.update(counts.keys())
    term_ids = await _add_terms(session, kb.id, df)
    postings = [
        {"term": term_ids[term], "chunk": ids[n], "tf": tf, "length": lengths[n]}
        for n, counts in enumerate(analysed)
        for term, tf in counts.items()
    ]
    if postings:
        await session.execute(_ADD_POSTINGS, postings)
    await _bump(session, kb.id, len(chunks), sum(lengths))


_ADD_TERMS = {
    # SQLite needs the WHERE to tell the upsert's ON CONFLICT from a join's ON.
    "sqlite": "INSERT INTO kb_terms (knowledge_base_id, term, df) "
    "SELECT :kb, key, value FROM json_each(:df) WHERE true "
    "ON CONFLICT (knowledge_base_id, term) DO UPDATE SET df = df + excluded.df "
    "RETURNING term, id",
    "postgresql": "INSERT INTO kb_terms (knowledge_base_id, term, df) "
    "SELECT :kb, t, d FROM unnest(CAST(:terms AS text[]), CAST(:dfs AS int[])) AS u(t, d) "
    "ON CONFLICT (knowledge_base_id, term) DO UPDATE SET df = kb_terms.df + excluded.df "
    "RETURNING term, id",
}
_ADD_POSTINGS = text(
    "INSERT INTO chunk_terms (term_id, chunk_id, tf, length) VALUES (:term, :chunk, :tf, :length)"
)


async def _add_terms(session: AsyncSession, kb_id: uuid.UUID, df: Counter[str]) -> dict[str, int]:
    """Add `df` to the knowledge base's document frequencies (new terms are created); the ids
    of those terms. In term order, so concurrent writers lock shared terms in the same order."""
    ordered = sorted(df)
    params: dict[str, Any]
    if is_sqlite(session):
        params = {"kb": kb_id.hex, "df": json.dumps({t: df[t] for t in ordered})}
        sql = _ADD_TERMS["sqlite"]
    else:
        params = {"kb": kb_id, "terms": ordered, "dfs": [df[t] for t in ordered]}
        sql = _ADD_TERMS["postgresql"]
    return {term: id for term, id in await session.execute(text(sql), params)}


async def remove_chunks(session: AsyncSession, kb_id: uuid.UUID, document_id: uuid.UUID) -> int:
    """Remove a document's chunks and their postings; update the statistics."""
    count, total = (
        await session.execute(
            select(func.count(), func.coalesce(func.sum(Chunk.term_count), 0)).where(
                Chunk.knowledge_base_id == kb_id, Chunk.document_id == document_id
            )
        )
    ).one()
    if not count:
        return 0
    chunk_ids = select(Chunk.id).where(
        Chunk.knowledge_base_id == kb_id, Chunk.document_id == document_id
    )
    # Each term's document frequency drops by the number of these chunks that contain it.
    dropped = (
        await session.execute(
            select(ChunkTerm.term_id, func.count())
            .where(ChunkTerm.chunk_id.in_(chunk_ids))
            .group_by(ChunkTerm.term_id)
            .order_by(ChunkTerm.term_id)
        )
    ).all()
    await session.execute(delete(ChunkTerm).where(ChunkTerm.chunk_id.in_(chunk_ids)))
    if dropped:
        terms_table = cast(Table, KeywordTerm.__table__)
        await session.execute(
            update(terms_table)
            .where(terms_table.c.id == bindparam("term_key"))
            .values(df=terms_table.c.df - bindparam("dropped")),
            [{"term_key": term, "dropped": n} for term, n in dropped],
        )
        gone = [term for term, _ in dropped]
        for at in range(0, len(gone), ROWS_PER_STATEMENT):
            await session.execute(
                delete(KeywordTerm).where(
                    KeywordTerm.id.in_(gone[at : at + ROWS_PER_STATEMENT]), KeywordTerm.df <= 0
                )
            )
    await session.execute(
        delete(Chunk).where(Chunk.knowledge_base_id == kb_id, Chunk.document_id == document_id)
    )
    await _bump(session, kb_id, -int(count), -int(total))
    return int(count)


async def _bump(session: AsyncSession, kb_id: uuid.UUID, chunks: int, terms: int) -> None:
    await session.execute(
        update(KnowledgeBase)
        .where(KnowledgeBase.id == kb_id)
        .values(
            chunk_count=KnowledgeBase.chunk_count + chunks,
            term_total=KnowledgeBase.term_total + terms,
            index_version=KnowledgeBase.index_version + 1,
        )
    )


# Keyword search ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Term:
    id: int
    df: int
    idf: float

    @property
    def bound(self) -> float:
        """The most this term adds to any chunk's score (tf/(tf + ...) < 1)."""
        return self.idf * (K1 + 1)


@dataclass(frozen=True)
class _Postings:
    term_ids: np.ndarray
    chunk_ids: np.ndarray
    tfs: np.ndarray
    lengths: np.ndarray


async def keyword_search(
    session: AsyncSession,
    kbs: Sequence[KnowledgeBase],
    query: str,
    limit: int,
    allowed: set[uuid.UUID] | None,
) -> list[Hit]:
    """The `limit` best chunks of `kbs` by BM25, each knowledge base with its own statistics."""
    if allowed is not None and not allowed:
        return []
    words = query_terms(query)
    if not words or limit <= 0:
        return []
    hits: list[Hit] = []
    for kb in kbs:
        if kb.chunk_count > 0:
            hits += await _bm25(session, kb, words, limit, allowed)
    hits.sort(key=lambda h: h.score, reverse=True)
    return hits[:limit]


async def _bm25(
    session: AsyncSession,
    kb: KnowledgeBase,
    words: list[str],
    limit: int,
    allowed: set[uuid.UUID] | None,
) -> list[Hit]:
    import numpy as np

    n = kb.chunk_count
    avgdl = max(kb.term_total / n, 1.0)
    found = await session.execute(
        select(KeywordTerm.id, KeywordTerm.df).where(
            KeywordTerm.knowledge_base_id == kb.id,
            KeywordTerm.term.in_(words),
            KeywordTerm.df > 0,
        )
    )
    pending = sorted(
        (_Term(id, df, math.log(1 + (n - df + 0.5) / (df + 0.5))) for id, df in found),
        key=lambda t: t.df,
    )
    idf = {t.id: t.idf for t in pending}
    read: list[_Postings] = []
    while pending:
        # The rarest unread terms: together cheap to read, and they decide who can win.
        take = 1
        budget = pending[0].df
        while take < len(pending) and budget + pending[take].df <= READ_AT_ONCE:
            budget += pending[take].df
            take += 1
        batch, pending = pending[:take], pending[take:]
        read.append(await _postings(session, [t.id for t in batch], None, allowed))
        ids, scores = _scores(read, idf, avgdl)
        rest = sum(t.bound for t in pending)
        if len(ids) >= limit and float(np.partition(scores, -limit)[-limit]) >= rest:
            break  # a chunk with none of the terms read scores at most `rest`
    ids, scores = _scores(read, idf, avgdl)
    if len(ids) == 0:
        return []
    if pending:
        # Candidates that the unread terms could still lift into the top k get their exact
        # scores; the others can't reach the k-th best even with every unread term.
        rest = sum(t.bound for t in pending)
        kth = float(np.partition(scores, -limit)[-limit]) if len(ids) >= limit else 0.0
        contenders = ids[scores + rest > kth]
        if len(contenders):
            read.append(
                await _postings(session, [t.id for t in pending], contenders.tolist(), None)
            )
            ids, scores = _scores(read, idf, avgdl)
    k = min(limit, len(ids))
    best = np.argpartition(-scores, k - 1)[:k]
    best = best[np.argsort(-scores[best], kind="stable")]
    return [Hit(int(ids[i]), float(scores[i])) for i in best]


def _scores(
    read: list[_Postings], idf: dict[int, float], avgdl: float
) -> tuple[np.ndarray, np.ndarray]:
    """Chunk ids and their BM25 sums over the postings read so far."""
    import numpy as np

    if not read:
        return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.float64)
    term_ids = np.concatenate([p.term_ids for p in read])
    chunk_ids = np.concatenate([p.chunk_ids for p in read])
    tfs = np.concatenate([p.tfs for p in read]).astype(np.float64)
    lengths = np.concatenate([p.lengths for p in read]).astype(np.float64)
    weights = np.fromiter(
        (idf[t] for t in term_ids.tolist()), dtype=np.float64, count=len(term_ids)
    )
    parts = weights * tfs * (K1 + 1) / (tfs + K1 * (1 - B + B * lengths / avgdl))
    ids, inverse = np.unique(chunk_ids, return_inverse=True)
    return ids, np.bincount(inverse, weights=parts, minlength=len(ids))


async def _postings(
    session: AsyncSession,
    term_ids: list[int],
    chunk_ids: list[int] | None,
    allowed: set[uuid.UUID] | None,
) -> _Postings:
    """The postings of `term_ids` (only of `chunk_ids`, or of chunks of `allowed` documents),
    as arrays: one aggregated row per term, decoded in C rather than row by row."""
    import numpy as np

    sqlite = is_sqlite(session)
    params: dict[str, Any] = {}
    if sqlite:
        params["terms"] = json.dumps(term_ids)
        where = "p.term_id IN (SELECT value FROM json_each(:terms))"
        aggregate = "json_group_array({})"
    else:
        params["terms"] = term_ids
        where = "p.term_id = ANY(CAST(:terms AS bigint[]))"
        aggregate = "array_agg({})"
    joined = ""
    if chunk_ids is not None:
        if sqlite:
            where += " AND p.chunk_id IN (SELECT value FROM json_each(:chunks))"
            params["chunks"] = json.dumps(chunk_ids)
        else:
            where += " AND p.chunk_id = ANY(CAST(:chunks AS bigint[]))"
            params["chunks"] = chunk_ids
    if allowed is not None:
        joined = " JOIN chunks c ON c.id = p.chunk_id"
        if sqlite:
            where += " AND c.document_id IN (SELECT value FROM json_each(:docs))"
            params["docs"] = json.dumps([d.hex for d in allowed])
        else:
            where += " AND c.document_id = ANY(CAST(:docs AS uuid[]))"
            params["docs"] = list(allowed)
    columns = ", ".join(aggregate.format(f"p.{c}") for c in ("chunk_id", "tf", "length"))
    # Only constants are spliced in; the values are bound.
    sql = f"SELECT p.term_id, count(*), {columns} FROM chunk_terms p{joined} WHERE {where} GROUP BY p.term_id"  # noqa: S608, E501
    rows = (await session.execute(text(sql), params)).all()
    parts: list[list[np.ndarray]] = [[], [], [], []]
    for term_id, count, *arrays in rows:
        parts[0].append(np.full(count, term_id, dtype=np.int64))
        for at, values in enumerate(arrays, start=1):
            parts[at].append(np.asarray(json.loads(values) if sqlite else values, dtype=np.int64))
    if not rows:
        empty = np.empty(0, dtype=np.int64)
        return _Postings(empty, empty, empty, empty)
    return _Postings(*(np.concatenate(p) for p in parts))


# Vector search -----------------------------------------------------------------------------------


async def vector_search(
    session: AsyncSession,
    kbs: Sequence[KnowledgeBase],
    query: np.ndarray,
    limit: int,
    allowed: set[uuid.UUID] | None,
) -> list[Hit]:
    """Chunks of `kbs` by cosine similarity to `query` (normalised). The knowledge bases share
    one embedding model (the caller groups them)."""
    if allowed is not None and not allowed:
        return []
    hits: list[Hit] = []
    for kb in kbs:
        if is_sqlite(session):
            hits += await _numpy_search(session, kb, query, limit, allowed)
        else:
            hits += await _pgvector_search(session, kb, query, limit, allowed)
    hits.sort(key=lambda h: h.score, reverse=True)
    return hits[:limit]


async def _pgvector_search(
    session: AsyncSession,
    kb: KnowledgeBase,
    query: np.ndarray,
    limit: int,
    allowed: set[uuid.UUID] | None,
) -> list[Hit]:
    if kb.chunk_count == 0:
        return []
    dims = kb.embedding_dimensions
    params: dict[str, Any] = {"kb": kb.id, "q": _vector_literal(query), "limit": limit}
    where = "knowledge_base_id = :kb"
    if allowed is not None:
        where += " AND document_id = ANY(CAST(:docs AS uuid[]))"
        params["docs"] = list(allowed)
    if kb.chunk_count > EXACT_MAX and dims in INDEXED_DIMENSIONS:
        # The knowledge base's rows are found in the HNSW index of its size; iterative scan
        # goes on past other knowledge bases' (and filtered-out) rows until `limit` are found.
        await session.execute(
            text(
                "SELECT set_config('hnsw.ef_search', :ef, true), "
                "set_config('hnsw.iterative_scan', 'relaxed_order', true)"
            ),
            {"ef": str(min(max(2 * limit, 100), 1000))},
        )
        distance = f"(embedding::vector({dims})) <=> CAST(:q AS vector({dims}))"
        where += f" AND vector_dims(embedding) = {dims}"
    else:
        distance = "embedding <=> CAST(:q AS vector)"  # no index matches: an exact scan
    # Only constants and bound parameters are spliced in.
    sql = f"SELECT id, {distance} AS distance FROM chunks WHERE {where} ORDER BY distance LIMIT :limit"  # noqa: S608, E501
    rows = await session.execute(text(sql), params)
    # relaxed_order may return neighbours slightly out of order: sorted here.
    return sorted((Hit(int(i), 1.0 - float(d)) for i, d in rows), key=lambda h: -h.score)


def _vector_literal(vector: np.ndarray) -> str:
    return "[" + ",".join(f"{float(x):.7g}" for x in vector) + "]"


@dataclass
class _Matrix:
    version: int
    ids: np.ndarray  # (n,) int64 chunk ids
    documents: np.ndarray  # (n,) int32 codes into `document_codes`
    document_codes: dict[uuid.UUID, int]
    vectors: np.ndarray  # (n, dims) float32, rows L2-normalised

    @property
    def nbytes(self) -> int:
        return int(self.vectors.nbytes + self.ids.nbytes + self.documents.nbytes)


class MatrixCache:
    """Knowledge bases' embedding matrices held by this process (SQLite), least recently used
    dropped first beyond `max_bytes`. Entries are checked against the knowledge base's
    `index_version` on every search, so writes by any process are seen."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._entries: OrderedDict[tuple[str, uuid.UUID], _Matrix] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple[str, uuid.UUID], version: int) -> _Matrix | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None or entry.version != version:
                return None
            self._entries.move_to_end(key)
            return entry

    def put(self, key: tuple[str, uuid.UUID], matrix: _Matrix) -> None:
        with self._lock:
            self._entries[key] = matrix
            self._entries.move_to_end(key)
            total = sum(e.nbytes for e in self._entries.values())
            while total > self.max_bytes and len(self._entries) > 1:
                _, dropped = self._entries.popitem(last=False)
                total -= dropped.nbytes

    def forget(self, kb_id: uuid.UUID) -> None:
        with self._lock:
            for key in [k for k in self._entries if k[1] == kb_id]:
                del self._entries[key]


matrices = MatrixCache(max_bytes=1024 * 1024 * 1024)


async def _load_matrix(session: AsyncSession, kb: KnowledgeBase) -> _Matrix:
    import numpy as np

    key = (str(session.get_bind().engine.url), kb.id)
    cached = matrices.get(key, kb.index_version)
    if cached is not None:
        return cached
    rows = (
        await session.execute(
            select(Chunk.id, Chunk.document_id, Chunk.embedding)
            .where(Chunk.knowledge_base_id == kb.id)
            .order_by(Chunk.id)
        )
    ).all()

    def build() -> _Matrix:
        codes: dict[uuid.UUID, int] = {}
        documents = np.fromiter(
            (codes.setdefault(d, len(codes)) for _, d, _ in rows), dtype=np.int32, count=len(rows)
        )
        dims = kb.embedding_dimensions
        vectors = np.frombuffer(b"".join(e for _, _, e in rows), dtype=np.float32)
        return _Matrix(
            version=kb.index_version,
            ids=np.fromiter((i for i, _, _ in rows), dtype=np.int64, count=len(rows)),
            documents=documents,
            document_codes=codes,
            vectors=vectors.reshape(len(rows), dims),
        )

    matrix = await asyncio.to_thread(build)
    matrices.put(key, matrix)
    return matrix


async def _numpy_search(
    session: AsyncSession,
    kb: KnowledgeBase,
    query: np.ndarray,
    limit: int,
    allowed: set[uuid.UUID] | None,
) -> list[Hit]:
    import numpy as np

    if kb.chunk_count == 0:
        return []
    matrix = await _load_matrix(session, kb)

    def top() -> list[Hit]:
        if len(matrix.ids) == 0:
            return []
        scores = matrix.vectors @ query.astype(np.float32)
        if allowed is not None:
            codes = [matrix.document_codes[d] for d in allowed if d in matrix.document_codes]
            keep = np.isin(matrix.documents, np.asarray(codes, dtype=np.int32))
            scores = np.where(keep, scores, -np.inf)
            available = int(keep.sum())
        else:
            available = len(scores)
        k = min(limit, available)
        if k == 0:
            return []
        best = np.argpartition(-scores, k - 1)[:k]
        best = best[np.argsort(-scores[best])]
        return [Hit(int(matrix.ids[i]), float(scores[i])) for i in best]

    return await asyncio.to_thread(top)
