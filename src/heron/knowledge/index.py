"""The search index of chunks: written by ingestion, read by search, on both backends.

Keyword (the same on SQLite and PostgreSQL)
- Terms come from `terms.py` (words, stop words dropped, Snowball English stems). `kb_terms`
  holds each knowledge base's terms with their document frequency (exact at every commit).
- Postings live in `term_blocks`: packed arrays of (chunk id, tf, chunk length) per term. A
  document's write appends one small block per term; whenever a term has `FANOUT` blocks of
  one level, they merge into one block of the next level (as a log-structured merge tree), so
  a term of df postings has at most (FANOUT - 1) * log_FANOUT(df) blocks, and the total work
  of merging grows as df * log(df). Merges drop the postings of chunks deleted since.
- Search reads every query term's blocks (a few rows, decoded in place by numpy) and scores
  every posting: exact BM25 (k1=1.2, b=0.75, idf = ln(1 + (N - df + 0.5) / (df + 0.5))) with
  the knowledge base's own N and average length. Deleted chunks still in a block are skipped
  when the best chunks are looked up.

Vector
- SQLite: numpy over the knowledge base's normalised matrix, cached per process and reloaded
  when the knowledge base's `index_version` moved (any process that writes bumps it). Beyond
  `EXACT_MAX` chunks, a search first scores a reduced copy of the matrix (the vectors projected
  on the principal axes that hold `REDUCED_ENERGY` of their second moment), then rescores its
  best `candidates()` exactly: a fraction of the memory read per query.
- PostgreSQL: pgvector; a knowledge base of more than `EXACT_MAX` chunks uses the HNSW index of
  its size (iterative scan, so filters apply before the limit), smaller ones an exact scan.

Document filters arrive as a set of allowed document ids and apply before the top N is cut.
"""

from __future__ import annotations

import asyncio
import functools
import json
import math
import uuid
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sqlalchemy import Select, TextClause, bindparam, delete, select, text, update
from sqlalchemy import insert as core_insert
from sqlalchemy.ext.asyncio import AsyncSession

from heron.core.lru import SizedLRU
from heron.knowledge.models import Chunk, KeywordTerm, KnowledgeBase, TermBlock
from heron.knowledge.terms import query_terms, terms

if TYPE_CHECKING:
    import numpy as np

K1 = 1.2
B = 0.75
EXACT_MAX = 10_000
"""Up to this many chunks, PostgreSQL searches a knowledge base exactly (fast enough, and
perfect recall); beyond, through the HNSW index."""
INDEXED_DIMENSIONS = frozenset({384, 768, 1024, 1536})  # as created by migration 0006
REDUCED_ENERGY = 0.9
"""SQLite, beyond EXACT_MAX chunks: the share of the vectors' second moment the reduced copy
keeps; the reduced copy is only made when at most half the dimensions suffice."""
FANOUT = 4
"""Blocks of one term and level that merge into one block of the next level."""
POSTING = [("chunk", "<i8"), ("tf", "<i4"), ("length", "<i4")]
"""A posting as stored in `term_blocks.postings` (a numpy structured dtype, little-endian)."""
IN_BATCH = 5000  # values per IN (...) list: under both drivers' 32,767 parameters
ANALYSE_INLINE_CHARS = 20_000  # more text than this is analysed off the event loop
SCORE_INLINE_POSTINGS = 50_000  # more postings than this are scored off the event loop


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


def _ids_param(session: AsyncSession, ids: Iterable[Any]) -> tuple[str, Any]:
    """A list of ids as one bound parameter: the SQL to put after a column (a constant: only
    the parameter's name is formatted in) and the parameter's value."""
    values = list(ids)
    if is_sqlite(session):
        return "IN (SELECT value FROM json_each(:{name}))", json.dumps(values)
    return "= ANY(:{name})", values


# Writing -----------------------------------------------------------------------------------------


async def write_chunks(
    session: AsyncSession,
    kb: KnowledgeBase,
    document_id: uuid.UUID,
    chunks: Sequence[NewChunk],
    embeddings: np.ndarray,
) -> None:
    """Insert chunks with their embeddings and keyword postings; update the statistics."""
    import numpy as np

    if not chunks:
        return
    sqlite = is_sqlite(session)
    analysed = await _analyse([f"{c.context}\n{c.text}" for c in chunks])
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
    postings: defaultdict[str, list[tuple[int, int, int]]] = defaultdict(list)
    for n, counts in enumerate(analysed):
        for term, tf in counts.items():
            postings[term].append((ids[n], tf, lengths[n]))
    added = await _add_terms(session, kb.id, {t: len(p) for t, p in postings.items()})
    await session.execute(
        _ADD_BLOCK,
        [
            {
                "term": added[term][0],
                "level": 0,
                "count": len(rows),
                "postings": np.array(rows, dtype=POSTING).tobytes(),
            }
            for term, rows in postings.items()
        ],
    )
    await _merge(session, added.values())
    await _bump(session, kb.id, len(chunks), sum(lengths))


async def _analyse(texts: list[str]) -> list[Counter[str]]:
    if sum(map(len, texts)) > ANALYSE_INLINE_CHARS:
        return await asyncio.to_thread(lambda: [terms(t) for t in texts])
    return [terms(t) for t in texts]


_ADD_TERMS = {
    # SQLite needs the WHERE to tell the upsert's ON CONFLICT from a join's ON.
    "sqlite": "INSERT INTO kb_terms (knowledge_base_id, term, df, appends) "
    "SELECT :kb, key, value, 1 FROM json_each(:df) WHERE true "
    "ON CONFLICT (knowledge_base_id, term) DO UPDATE "
    "SET df = df + excluded.df, appends = appends + 1 "
    "RETURNING term, id, appends",
    "postgresql": "INSERT INTO kb_terms (knowledge_base_id, term, df, appends) "
    "SELECT :kb, t, d, 1 FROM unnest(CAST(:terms AS text[]), CAST(:dfs AS int[])) AS u(t, d) "
    "ON CONFLICT (knowledge_base_id, term) DO UPDATE "
    "SET df = kb_terms.df + excluded.df, appends = kb_terms.appends + 1 "
    "RETURNING term, id, appends",
}
_ADD_BLOCK = text(
    "INSERT INTO term_blocks (term_id, level, count, postings) "
    "VALUES (:term, :level, :count, :postings)"
)


async def _add_terms(
    session: AsyncSession, kb_id: uuid.UUID, df: dict[str, int]
) -> dict[str, tuple[int, int]]:
    """Add `df` to the knowledge base's document frequencies (new terms are created) and count
    a block appended to each; each term's id and appends. In term order, so concurrent writers
    lock shared terms in the same order (the row locks also keep two writers from merging one
    term's blocks at once)."""
    ordered = sorted(df)
    params: dict[str, Any]
    if is_sqlite(session):
        params = {"kb": kb_id.hex, "df": json.dumps({t: df[t] for t in ordered})}
        sql = _ADD_TERMS["sqlite"]
    else:
        params = {"kb": kb_id, "terms": ordered, "dfs": [df[t] for t in ordered]}
        sql = _ADD_TERMS["postgresql"]
    return {term: (id, appends) for term, id, appends in await session.execute(text(sql), params)}


_TAKE_BLOCKS = {
    "sqlite": "DELETE FROM term_blocks WHERE term_id IN (SELECT key FROM json_each(:carries)) "
    "AND level <= (SELECT value FROM json_each(:carries) WHERE key = term_id) "
    "RETURNING term_id, postings",
    "postgresql": "DELETE FROM term_blocks b "
    "USING unnest(CAST(:terms AS bigint[]), CAST(:levels AS int[])) AS c(term, level) "
    "WHERE b.term_id = c.term AND b.level <= c.level RETURNING b.term_id, b.postings",
}


async def _merge(session: AsyncSession, terms: Iterable[tuple[int, int]]) -> None:
    """After a term's a-th append, its blocks of levels 0..L merge into one block of level
    L + 1, L the highest level with a % FANOUT^(L+1) == 0 (a base-FANOUT counter's carry).
    Merges into level 2 and up drop the postings of chunks that are gone."""
    import numpy as np

    carries: dict[int, int] = {}
    for term_id, appends in terms:
        level = -1
        while appends % FANOUT ** (level + 2) == 0:
            level += 1
        if level >= 0:
            carries[term_id] = level
    if not carries:
        return
    ordered = sorted(carries)
    for at in range(0, len(ordered), IN_BATCH):
        batch = {term: carries[term] for term in ordered[at : at + IN_BATCH]}
        params: dict[str, Any]
        if is_sqlite(session):
            params = {"carries": json.dumps(batch)}
            sql = _TAKE_BLOCKS["sqlite"]
        else:
            params = {"terms": list(batch), "levels": list(batch.values())}
            sql = _TAKE_BLOCKS["postgresql"]
        grouped: defaultdict[int, list[np.ndarray]] = defaultdict(list)
        for term, data in await session.execute(text(sql), params):
            grouped[term].append(np.frombuffer(data, dtype=POSTING))
        merged = {term: np.concatenate(parts) for term, parts in grouped.items()}
        purged = [term for term in merged if batch[term] >= 1]
        live = None
        if purged:
            chunks = np.unique(np.concatenate([merged[term]["chunk"] for term in purged]))
            live = await _live(session, chunks)
        rows = []
        for term, postings in merged.items():
            kept = postings
            if live is not None and batch[term] >= 1:
                kept = postings[np.isin(postings["chunk"], live)]
            if len(kept):
                rows.append(
                    {
                        "term": term,
                        "level": batch[term] + 1,
                        "count": len(kept),
                        "postings": np.sort(kept, order="chunk").tobytes(),
                    }
                )
        if rows:
            await session.execute(_ADD_BLOCK, rows)


async def _live(session: AsyncSession, chunk_ids: np.ndarray) -> np.ndarray:
    """Those of `chunk_ids` (sorted, unique) whose chunks exist."""
    import numpy as np

    found: list[int] = []
    ids = chunk_ids.tolist()
    # On the session's connection, past the ORM: a search runs this once or twice, and the
    # ORM's handling of a statement costs more than SQLite's running it.
    conn = await session.connection()
    for at in range(0, len(ids), 50_000):
        fragment, values = _ids_param(session, ids[at : at + 50_000])
        rows = await conn.execute(_live_statement(fragment), {"ids": values})
        found += [row[0] for row in rows]
    return np.asarray(sorted(found), dtype=np.int64)


@functools.lru_cache(maxsize=4)
def _live_statement(fragment: str) -> TextClause:
    return text("SELECT id FROM chunks WHERE id " + fragment.format(name="ids"))  # noqa: S608


async def remove_chunks(session: AsyncSession, kb_id: uuid.UUID, document_id: uuid.UUID) -> int:
    """Remove a document's chunks; update the statistics. Their terms' document frequencies
    drop (the chunks are analysed again); their postings go when their blocks next merge, or
    with their terms when no chunk has them any more."""
    rows = (
        await session.execute(
            select(Chunk.context, Chunk.text, Chunk.term_count).where(
                Chunk.knowledge_base_id == kb_id, Chunk.document_id == document_id
            )
        )
    ).all()
    if not rows:
        return 0
    analysed = await _analyse([f"{context}\n{body}" for context, body, _ in rows])
    dropped: Counter[str] = Counter()
    for counts in analysed:
        dropped.update(counts.keys())
    if dropped:
        if is_sqlite(session):
            fragment = "SELECT :kb AS kb, key AS term, value AS n FROM json_each(:df)"
            params: dict[str, Any] = {
                "kb": kb_id.hex,
                "df": json.dumps(dict(sorted(dropped.items()))),
            }
        else:
            fragment = (
                "SELECT CAST(:kb AS uuid) AS kb, t AS term, d AS n "
                "FROM unnest(CAST(:terms AS text[]), CAST(:dfs AS int[])) AS u(t, d)"
            )
            ordered = sorted(dropped)
            params = {"kb": kb_id, "terms": ordered, "dfs": [dropped[t] for t in ordered]}
        await session.execute(
            text(
                "UPDATE kb_terms SET df = df - d.n FROM (" + fragment + ") AS d "  # noqa: S608
                "WHERE kb_terms.knowledge_base_id = d.kb AND kb_terms.term = d.term"
            ),
            params,
        )
        # A term no chunk has any more goes, its blocks with it.
        await session.execute(
            delete(KeywordTerm).where(
                KeywordTerm.knowledge_base_id == kb_id,
                KeywordTerm.term.in_(list(dropped)),
                KeywordTerm.df <= 0,
            )
        )
    await session.execute(
        delete(Chunk).where(Chunk.knowledge_base_id == kb_id, Chunk.document_id == document_id)
    )
    await _bump(session, kb_id, -len(rows), -sum(int(n) for _, _, n in rows))
    return len(rows)


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


@functools.cache
def _blocks_of_terms() -> Select[str, int, bytes]:
    """The posting blocks of a knowledge base's terms: built once, on first use (every keyword
    search runs it; building a statement costs more than running it)."""
    return (
        select(KeywordTerm.term, KeywordTerm.df, TermBlock.postings)
        .join(TermBlock, TermBlock.term_id == KeywordTerm.id)
        .where(
            KeywordTerm.knowledge_base_id == bindparam("kb"),
            KeywordTerm.term.in_(bindparam("words", expanding=True)),
            KeywordTerm.df > 0,
        )
    )


async def _bm25(
    session: AsyncSession,
    kb: KnowledgeBase,
    words: list[str],
    limit: int,
    allowed: set[uuid.UUID] | None,
) -> list[Hit]:
    import numpy as np

    found = await _postings_of(session, kb, words)
    if not found:
        return []

    def score() -> tuple[np.ndarray, np.ndarray]:
        if len(found) == 1:
            chunks, contribution = found[0]
        else:
            chunks = np.concatenate([chunks for chunks, _ in found])
            contribution = np.concatenate([contribution for _, contribution in found])
        low, high = int(chunks.min()), int(chunks.max())
        if high - low < 4 * len(chunks) + 1_000_000:
            # Dense sums over the id range (a knowledge base's ids are mostly contiguous);
            # every posting adds a positive amount (idf > 0).
            sums = np.bincount(chunks - low, weights=contribution)
            ids = np.flatnonzero(sums) + low
            return ids, sums[ids - low]
        ids, inverse = np.unique(chunks, return_inverse=True)
        return ids, np.bincount(inverse, weights=contribution)

    size = sum(len(chunks) for chunks, _ in found)
    ids, scores = score() if size < SCORE_INLINE_POSTINGS else await asyncio.to_thread(score)
    if allowed is not None:
        keep = await _chunks_of(session, kb.id, allowed)
        mask = np.isin(ids, keep)
        ids, scores = ids[mask], scores[mask]
    hits: list[Hit] = []
    seen = 0
    # SQLite: the knowledge base's matrix, when this process holds it at this version, has
    # every chunk id (sorted): liveness needs no query.
    matrix = _held_matrix(_matrix_key(session, kb), kb.index_version)
    while len(hits) < limit and seen < len(ids):
        # The next best ones, skipping chunks deleted since their postings were written.
        want = min(seen + max(2 * (limit - len(hits)), 16), len(ids))
        best = np.argpartition(-scores, want - 1)[:want] if want < len(ids) else np.arange(want)
        best = best[np.argsort(-scores[best], kind="stable")][seen:]
        seen = want
        if matrix is not None:
            live = set(_among(matrix.ids, ids[best]).tolist())
        else:
            live = set((await _live(session, np.sort(ids[best]))).tolist())
        hits += [Hit(int(ids[i]), float(scores[i])) for i in best if int(ids[i]) in live]
    return hits[:limit]


_TermKey = tuple[str, uuid.UUID, int, str]  # database, knowledge base, index version, term
_Scored = tuple["np.ndarray", "np.ndarray"]  # chunk ids, BM25 contributions


def posting_cache(max_bytes: int) -> SizedLRU[_TermKey, _Scored]:
    """Terms' postings (all their blocks, decoded) as this process last read them, least
    recently used dropped first beyond `max_bytes`: each as its chunk ids and their BM25
    contributions. An entry is the term's at one `index_version` of its knowledge base, which
    every write to the index moves (in the transaction that writes), as it does the statistics
    the contributions are computed from (N, df, average length): a search that reads the
    version its entries were read at gets what the database holds, so scores stay exact.
    Common terms have the longest lists and recur in most queries: they are read from the
    database, and scored, once per version. A term over a quarter of the cache is not kept."""
    return SizedLRU(max_bytes, _scored_bytes, largest=0.25)


def _scored_bytes(entry: _Scored) -> int:
    return int(entry[0].nbytes + entry[1].nbytes)


postings_cache = posting_cache(max_bytes=256 * 1024 * 1024)


async def _postings_of(session: AsyncSession, kb: KnowledgeBase, words: list[str]) -> list[_Scored]:
    """(chunk ids, BM25 contributions) of each of `words` that the knowledge base has, from
    `postings_cache` or else from its blocks (then kept there)."""
    import numpy as np

    url = str(session.get_bind().engine.url)
    found: dict[str, _Scored] = {}
    missing = []
    for word in dict.fromkeys(words):
        cached = postings_cache.get((url, kb.id, kb.index_version, word))
        if cached is not None:
            found[word] = cached
        else:
            missing.append(word)
    if missing:
        params = {"kb": kb.id, "words": missing}
        rows = (await session.execute(_blocks_of_terms(), params)).all()
        blocks: defaultdict[str, list[bytes]] = defaultdict(list)
        dfs: dict[str, int] = {}
        for term, df, data in rows:
            blocks[term].append(data)
            dfs[term] = df
        n = kb.chunk_count
        avgdl = max(kb.term_total / n, 1.0) if n else 1.0
        for term, datas in blocks.items():
            parts = [np.frombuffer(data, dtype=POSTING) for data in datas]
            postings = np.concatenate(parts) if len(parts) > 1 else parts[0]
            df = dfs[term]
            idf = math.log(1 + (n - df + 0.5) / (df + 0.5))
            tf = postings["tf"].astype(np.float64)
            length = postings["length"].astype(np.float64)
            contribution = idf * tf * (K1 + 1) / (tf + K1 * (1 - B + B * length / avgdl))
            entry = (np.ascontiguousarray(postings["chunk"]), contribution)
            postings_cache.put((url, kb.id, kb.index_version, term), entry)
            found[term] = entry
    return [found[w] for w in dict.fromkeys(words) if w in found]


def _among(known: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Those of `ids` that are in `known` (sorted)."""
    import numpy as np

    if len(known) == 0:
        return ids[:0]
    at = np.minimum(np.searchsorted(known, ids), len(known) - 1)
    found: np.ndarray = ids[known[at] == ids]
    return found


async def _chunks_of(
    session: AsyncSession, kb_id: uuid.UUID, documents: set[uuid.UUID]
) -> np.ndarray:
    import numpy as np

    ids = (
        await session.scalars(
            select(Chunk.id).where(
                Chunk.knowledge_base_id == kb_id, Chunk.document_id.in_(list(documents))
            )
        )
    ).all()
    return np.asarray(ids, dtype=np.int64)


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
    # Beyond EXACT_MAX rows: `vectors @ projection`, (n, r) float32, and the (dims, r) basis.
    reduced: np.ndarray | None = None
    projection: np.ndarray | None = None

    @property
    def nbytes(self) -> int:
        extra = 0 if self.reduced is None else self.reduced.nbytes
        return int(self.vectors.nbytes + self.ids.nbytes + self.documents.nbytes + extra)


# Knowledge bases' embedding matrices held by this process (SQLite), least recently used
# dropped first beyond `max_bytes` (the newest kept whatever its size), by (database, knowledge
# base). An entry is checked against the knowledge base's `index_version` on every search
# (`_held_matrix`), so writes by any process are seen.
matrices: SizedLRU[tuple[str, uuid.UUID], _Matrix] = SizedLRU(
    1024 * 1024 * 1024, lambda matrix: matrix.nbytes
)


def _held_matrix(key: tuple[str, uuid.UUID], version: int) -> _Matrix | None:
    matrix = matrices.get(key)
    return matrix if matrix is not None and matrix.version == version else None


def forget_matrices(kb_id: uuid.UUID) -> None:
    """Drop what this process holds of a deleted knowledge base's vectors."""
    matrices.discard(lambda key: key[1] == kb_id)


async def _load_matrix(session: AsyncSession, kb: KnowledgeBase) -> _Matrix:
    import numpy as np

    key = _matrix_key(session, kb)
    cached = _held_matrix(key, kb.index_version)
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
        vectors = np.frombuffer(b"".join(e for _, _, e in rows), dtype=np.float32)
        return matrix_of(
            kb.index_version,
            np.fromiter((i for i, _, _ in rows), dtype=np.int64, count=len(rows)),
            [d for _, d, _ in rows],
            vectors.reshape(len(rows), kb.embedding_dimensions),
        )

    matrix = await asyncio.to_thread(build)
    matrices.put(key, matrix)
    return matrix


def _matrix_key(session: AsyncSession, kb: KnowledgeBase) -> tuple[str, uuid.UUID]:
    return (str(session.get_bind().engine.url), kb.id)


def matrix_of(
    version: int, ids: np.ndarray, documents: Sequence[uuid.UUID], vectors: np.ndarray
) -> _Matrix:
    """A knowledge base's matrix as searched (rows L2-normalised), with its reduced copy
    beyond EXACT_MAX rows."""
    import numpy as np

    codes: dict[uuid.UUID, int] = {}
    coded = np.fromiter(
        (codes.setdefault(d, len(codes)) for d in documents), dtype=np.int32, count=len(ids)
    )
    projection = _principal_axes(vectors) if len(ids) > EXACT_MAX else None
    return _Matrix(
        version=version,
        ids=ids,
        documents=coded,
        document_codes=codes,
        vectors=vectors,
        reduced=None if projection is None else np.ascontiguousarray(vectors @ projection),
        projection=projection,
    )


def nearest(
    matrix: _Matrix, query: np.ndarray, limit: int, allowed: set[uuid.UUID] | None
) -> list[Hit]:
    """The `limit` rows of `matrix` nearest to `query` (of `allowed` documents only, when
    given): exact, or with a reduced copy, its best `candidates()` rescored exactly."""
    import numpy as np

    if len(matrix.ids) == 0:
        return []
    vector = query.astype(np.float32)
    if matrix.reduced is not None and matrix.projection is not None:
        scores = matrix.reduced @ (vector @ matrix.projection)  # approximate
    else:
        scores = matrix.vectors @ vector
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
    rows = np.arange(len(scores))
    if matrix.reduced is not None:
        # The best candidates by the reduced scores, rescored exactly.
        c = min(candidates(limit, len(scores)), available)
        rows = np.argpartition(-scores, c - 1)[:c]
        scores = matrix.vectors[rows] @ vector
    best = np.argpartition(-scores, k - 1)[:k]
    best = best[np.argsort(-scores[best])]
    return [Hit(int(matrix.ids[rows[i]]), float(scores[i])) for i in best]


def candidates(limit: int, rows: int) -> int:
    """How many rows of the reduced scores are rescored exactly: 2% of the matrix, at least
    2,000 and 40 per result wanted (the rescoring reads a few MB; recall over 300 SciFact
    queries on 100k chunks was 1.0 at 10 and at 50 results with half of this)."""
    return min(rows, max(2000, 40 * limit, rows // 50))


def _principal_axes(vectors: np.ndarray) -> np.ndarray | None:
    """The fewest principal axes (of the second moment: dot products are what is preserved)
    holding REDUCED_ENERGY of it, as a (dims, r) basis; None when that takes more than half
    the dimensions (no memory to save). From a sample of at most 20,000 rows, fixed by seed,
    so every process computes the same basis."""
    import numpy as np

    rng = np.random.default_rng(0)
    sample = vectors if len(vectors) <= 20_000 else vectors[rng.choice(len(vectors), 20_000)]
    moment = (sample.T @ sample).astype(np.float64)
    values, axes = np.linalg.eigh(moment)  # ascending
    values, axes = values[::-1], axes[:, ::-1]
    share = np.cumsum(values) / max(float(values.sum()), 1e-12)
    r = int(np.searchsorted(share, REDUCED_ENERGY) + 1)
    if r > vectors.shape[1] // 2:
        return None
    basis: np.ndarray = np.ascontiguousarray(axes[:, :r], dtype=np.float32)
    return basis


async def _numpy_search(
    session: AsyncSession,
    kb: KnowledgeBase,
    query: np.ndarray,
    limit: int,
    allowed: set[uuid.UUID] | None,
) -> list[Hit]:

    if kb.chunk_count == 0:
        return []
    matrix = await _load_matrix(session, kb)

    return await asyncio.to_thread(nearest, matrix, query, limit, allowed)
