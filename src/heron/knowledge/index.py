"""The search index of chunks: written by ingestion, read by search, on both backends.

SQLite
- keyword: the FTS5 table `chunks_fts` (contentless, kept by triggers on `chunks`), ranked by
  FTS5's `bm25()` over the title/headings and the text. The query's words are OR-ed, English
  stop words dropped; the porter stemmer applies to both sides. FTS5 keeps its statistics
  (document count, lengths, document frequencies) for the whole table, not per knowledge base.
- vector: numpy over the knowledge base's normalised matrix, cached per process and reloaded
  when the knowledge base's `index_version` moved (any process that writes bumps it).

PostgreSQL
- keyword: BM25 computed in SQL from the postings table `chunk_terms` (k1=1.2, b=0.75,
  idf = ln(1 + (N - df + 0.5) / (df + 0.5))), with N and the average length per knowledge base.
  Terms are the lexemes of `to_tsvector('english', ...)` (lower case, stop words out, Snowball
  stemmer) for documents and queries alike.
- vector: pgvector; a knowledge base of more than `EXACT_MAX` chunks uses the HNSW index of its
  size (iterative scan, so filters apply before the limit), smaller ones an exact scan.

Document filters arrive as a set of allowed document ids and apply before the top N is cut.
"""

from __future__ import annotations

import asyncio
import json
import re
import threading
import uuid
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sqlalchemy import delete, func, insert, select, text, update
from sqlalchemy.ext.asyncio import AsyncSession

from heron.knowledge.models import Chunk, KnowledgeBase

if TYPE_CHECKING:
    import numpy as np

K1 = 1.2
B = 0.75
EXACT_MAX = 10_000
"""Up to this many chunks, PostgreSQL searches a knowledge base exactly (fast enough, and
perfect recall); beyond, through the HNSW index."""
INDEXED_DIMENSIONS = frozenset({384, 768, 1024, 1536})  # as created by migration 0006

# English stop words dropped from keyword queries on SQLite (PostgreSQL's analyzer has its own).
STOP_WORDS = frozenset(
    """
    a about above after again against all am an and any are as at be because been before
    being below between both but by can could did do does doing down during each few for
    from further had has have having he her here hers herself him himself his how i if in
    into is it its itself just me more most my myself no nor not now of off on once only or
    other our ours ourselves out over own same she should so some such than that the their
    theirs them themselves then there these they this those through to too under until up
    very was we were what when where which while who whom why will with would you your
    yours yourself yourselves
    """.split()  # noqa: SIM905
)
_WORD = re.compile(r"\w+", re.UNICODE)


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
    """Insert chunks with their embeddings and index entries; update the statistics."""
    if not chunks:
        return
    sqlite = is_sqlite(session)
    lengths = [0] * len(chunks)
    postings: list[tuple[int, str, int]] = []  # (chunk index, term, tf)
    if not sqlite:
        rows = await session.execute(
            text(
                "SELECT x.i, u.lexeme, array_length(u.positions, 1) "
                "FROM unnest(CAST(:texts AS text[])) WITH ORDINALITY AS x(t, i), "
                "unnest(to_tsvector('english', x.t)) AS u"
            ),
            {"texts": [f"{c.context}\n{c.text}" for c in chunks]},
        )
        for i, term, tf in rows:
            postings.append((i - 1, term, tf))
            lengths[i - 1] += tf
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
                insert(Chunk).returning(Chunk.id, sort_by_parameter_order=True), values
            )
        ).all()
    )
    if postings:
        await session.execute(
            text(
                "INSERT INTO chunk_terms (knowledge_base_id, term, chunk_id, tf, length) "
                "SELECT :kb, * FROM unnest(CAST(:terms AS text[]), CAST(:ids AS bigint[]), "
                "CAST(:tfs AS int[]), CAST(:lengths AS int[]))"
            ),
            {
                "kb": kb.id,
                "terms": [t for _, t, _ in postings],
                "ids": [ids[i] for i, _, _ in postings],
                "tfs": [tf for _, _, tf in postings],
                "lengths": [lengths[i] for i, _, _ in postings],
            },
        )
    await _bump(session, kb.id, len(chunks), sum(lengths))


async def remove_chunks(session: AsyncSession, kb_id: uuid.UUID, document_id: uuid.UUID) -> int:
    """Remove a document's chunks and their index entries; update the statistics."""
    count, terms = (
        await session.execute(
            select(func.count(), func.coalesce(func.sum(Chunk.term_count), 0)).where(
                Chunk.knowledge_base_id == kb_id, Chunk.document_id == document_id
            )
        )
    ).one()
    if count:
        await session.execute(
            delete(Chunk).where(Chunk.knowledge_base_id == kb_id, Chunk.document_id == document_id)
        )
        await _bump(session, kb_id, -int(count), -int(terms))
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


def query_words(query: str) -> list[str]:
    seen: dict[str, None] = {}
    for word in _WORD.findall(query.lower()):
        if word not in STOP_WORDS:
            seen.setdefault(word, None)
    return list(seen)


def kb_token(kb_id: uuid.UUID) -> str:
    return f"k{kb_id.hex}{kb_id.hex}"


async def keyword_search(
    session: AsyncSession,
    kbs: Sequence[KnowledgeBase],
    query: str,
    limit: int,
    allowed: set[uuid.UUID] | None,
) -> list[Hit]:
    if allowed is not None and not allowed:
        return []
    if is_sqlite(session):
        return await _fts_search(session, kbs, query, limit, allowed)
    return await _bm25_search(session, kbs, query, limit, allowed)


async def _fts_search(
    session: AsyncSession,
    kbs: Sequence[KnowledgeBase],
    query: str,
    limit: int,
    allowed: set[uuid.UUID] | None,
) -> list[Hit]:
    words = query_words(query)
    if not words:
        return []
    scope = " OR ".join(f'"{kb_token(kb.id)}"' for kb in kbs)
    terms = " OR ".join(f'"{w}"' for w in words)
    match = f"kb : ({scope}) AND {{context text}} : ({terms})"
    sql = "SELECT rowid, rank FROM chunks_fts WHERE chunks_fts MATCH :match"
    params: dict[str, Any] = {"match": match, "limit": limit}
    if allowed is not None:
        sql += (
            " AND rowid IN (SELECT id FROM chunks WHERE document_id IN "
            "(SELECT value FROM json_each(:docs)))"
        )
        params["docs"] = json.dumps([d.hex for d in allowed])
    sql += " ORDER BY rank LIMIT :limit"
    rows = await session.execute(text(sql), params)
    return [Hit(int(rowid), -float(rank)) for rowid, rank in rows]


_BM25_SQL = """
WITH q AS (SELECT lexeme AS term FROM unnest(to_tsvector('english', :query))),
stats AS (
    SELECT * FROM unnest(CAST(:kbs AS uuid[]), CAST(:ns AS float8[]), CAST(:avgdls AS float8[]))
        AS s(kb, n, avgdl)
),
p AS (
    SELECT ct.knowledge_base_id AS kb, ct.term, ct.chunk_id, ct.tf, ct.length
    FROM chunk_terms ct JOIN q ON q.term = ct.term
    WHERE ct.knowledge_base_id = ANY(CAST(:kbs AS uuid[]))
),
df AS (SELECT kb, term, count(*) AS df FROM p GROUP BY kb, term)
SELECT p.chunk_id,
    sum(ln(1 + (s.n - df.df + 0.5) / (df.df + 0.5))
        * p.tf * (:k1 + 1) / (p.tf + :k1 * (1 - :b + :b * p.length / s.avgdl))) AS score
FROM p JOIN df ON df.kb = p.kb AND df.term = p.term JOIN stats s ON s.kb = p.kb
{filter}
GROUP BY p.chunk_id
ORDER BY score DESC
LIMIT :limit
"""


async def _bm25_search(
    session: AsyncSession,
    kbs: Sequence[KnowledgeBase],
    query: str,
    limit: int,
    allowed: set[uuid.UUID] | None,
) -> list[Hit]:
    live = [kb for kb in kbs if kb.chunk_count > 0]
    if not live:
        return []
    params: dict[str, Any] = {
        "query": query,
        "kbs": [kb.id for kb in live],
        "ns": [float(kb.chunk_count) for kb in live],
        "avgdls": [max(kb.term_total / kb.chunk_count, 1.0) for kb in live],
        "k1": K1,
        "b": B,
        "limit": limit,
    }
    where = ""
    if allowed is not None:
        where = (
            "WHERE p.chunk_id IN (SELECT id FROM chunks "
            "WHERE document_id = ANY(CAST(:docs AS uuid[])))"
        )
        params["docs"] = list(allowed)
    rows = await session.execute(text(_BM25_SQL.format(filter=where)), params)
    return [Hit(int(chunk_id), float(score)) for chunk_id, score in rows]


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
