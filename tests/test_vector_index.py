"""SQLite's vector search (numpy): exact up to EXACT_MAX rows; beyond, a reduced copy of the
matrix picks candidates that are rescored exactly. Checked against brute force."""

from __future__ import annotations

import uuid

import numpy as np
import pytest

from heron.knowledge.index import EXACT_MAX, Hit, matrix_of, nearest


def _normalised(rows: np.ndarray) -> np.ndarray:
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


class _Corpus:
    """Vectors like a sentence model's: topics in a few dominant directions, texts spread
    around their topic, and queries about those topics."""

    def __init__(self, rng: np.random.Generator, dims: int = 384, rank: int = 48) -> None:
        self.rng = rng
        self.dims = dims
        self.basis = rng.normal(size=(rank, dims))
        self.topics = rng.normal(size=(200, rank)) * np.linspace(3.0, 0.5, rank)
        self.scale = np.linspace(1.5, 0.25, rank)

    def vectors(self, n: int) -> np.ndarray:
        rng = self.rng
        chosen = self.topics[rng.integers(0, len(self.topics), n)]
        points = (chosen + rng.normal(size=(n, len(self.scale))) * self.scale) @ self.basis
        return _normalised(points + 0.5 * rng.normal(size=(n, self.dims)))


def _exact(
    vectors: np.ndarray,
    ids: np.ndarray,
    documents: list[uuid.UUID],
    query: np.ndarray,
    limit: int,
    allowed: set[uuid.UUID] | None = None,
) -> list[int]:
    scores = vectors @ query
    order = [
        i for i in np.argsort(-scores, kind="stable") if allowed is None or documents[i] in allowed
    ]
    return [int(ids[i]) for i in order[:limit]]


def _search_space(n: int, vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray, list[uuid.UUID]]:
    ids = np.arange(1, n + 1, dtype=np.int64) * 3
    documents = [uuid.UUID(int=i // 7 + 1) for i in range(n)]  # 7 chunks per document
    return vectors, ids, documents


@pytest.mark.parametrize("limit", [1, 10, 50])
def test_beyond_exact_max_the_reduced_search_finds_what_brute_force_finds(limit: int) -> None:
    corpus = _Corpus(np.random.default_rng(7))
    vectors, ids, documents = _search_space(EXACT_MAX + 2_000, corpus.vectors(EXACT_MAX + 2_000))
    matrix = matrix_of(1, ids, documents, vectors)
    assert matrix.reduced is not None
    assert matrix.projection is not None
    assert matrix.projection.shape[1] <= vectors.shape[1] // 2  # memory read per query saved
    for query in corpus.vectors(40):
        hits = nearest(matrix, query, limit, None)
        assert [h.chunk_id for h in hits] == _exact(vectors, ids, documents, query, limit)
        # The scores are exact ones, not the reduced copy's.
        by_id = dict(zip(ids.tolist(), (vectors @ query).tolist(), strict=True))
        assert all(h.score == pytest.approx(by_id[h.chunk_id], abs=1e-5) for h in hits)


def test_filters_apply_before_the_candidates_are_cut() -> None:
    corpus = _Corpus(np.random.default_rng(11))
    vectors, ids, documents = _search_space(EXACT_MAX + 1_500, corpus.vectors(EXACT_MAX + 1_500))
    matrix = matrix_of(1, ids, documents, vectors)
    assert matrix.reduced is not None
    allowed = {documents[i] for i in range(0, len(documents), 97)}  # a few documents only
    for query in corpus.vectors(20):
        hits = nearest(matrix, query, 10, allowed)
        assert [h.chunk_id for h in hits] == _exact(vectors, ids, documents, query, 10, allowed)
    assert nearest(matrix, vectors[0], 10, {uuid.uuid4()}) == []


def test_without_a_few_dominant_directions_the_search_stays_exact() -> None:
    rng = np.random.default_rng(3)
    flat = _normalised(rng.normal(size=(EXACT_MAX + 500, 64)))  # energy spread evenly
    vectors, ids, documents = _search_space(len(flat), flat)
    matrix = matrix_of(1, ids, documents, vectors)
    assert matrix.reduced is None  # reducing would need more than half the dimensions
    query = _normalised(rng.normal(size=(1, 64)))[0]
    assert [h.chunk_id for h in nearest(matrix, query, 5, None)] == _exact(
        vectors, ids, documents, query, 5
    )


def test_up_to_exact_max_rows_every_row_is_scored() -> None:
    vectors, ids, documents = _search_space(2_000, _Corpus(np.random.default_rng(5)).vectors(2_000))
    matrix = matrix_of(1, ids, documents, vectors)
    assert matrix.reduced is None
    query = vectors[17]
    hits = nearest(matrix, query, 3, None)
    assert hits[0] == Hit(int(ids[17]), pytest.approx(1.0, abs=1e-5))
    assert [h.chunk_id for h in hits] == _exact(vectors, ids, documents, query, 3)
