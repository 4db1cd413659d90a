"""Queries of knowledge bases and documents, scoped to one workspace."""

from __future__ import annotations

import contextlib
import functools
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import ColumnElement, Select, bindparam, func, select

from heron.core.errors import NotFound
from heron.core.pagination import PageParams
from heron.db.repository import WorkspaceRepository
from heron.knowledge.models import Chunk, Document, DocumentStatus, KnowledgeBase


class KnowledgeBaseRepository(WorkspaceRepository[KnowledgeBase]):
    model = KnowledgeBase
    noun = "knowledge base"

    async def by_name(self, name: str) -> KnowledgeBase | None:
        return await self.find_by(name=name)

    async def find(self, ref: str) -> KnowledgeBase | None:
        """The knowledge base with this id, else with this name."""
        row: KnowledgeBase | None = None
        with contextlib.suppress(ValueError):
            row = await self.get(uuid.UUID(ref))
        return row or await self.by_name(ref)

    async def by_id_or_name(self, ref: str) -> KnowledgeBase:
        row = await self.find(ref)
        if row is None:
            raise NotFound(f"No knowledge base with id or name {ref!r} in this workspace.")
        return row

    async def many_or_404(self, ids: Sequence[uuid.UUID]) -> list[KnowledgeBase]:
        """The knowledge bases with these ids, in that order; 404 naming the first missing."""
        params = {"workspace_id": self.workspace_id, "ids": list(set(ids))}
        rows = {kb.id: kb for kb in await self.session.scalars(_kbs_by_ids(), params)}
        for id in ids:
            if id not in rows:
                raise NotFound(f"No {self.noun} with id {id} in this workspace.")
        return [rows[id] for id in dict.fromkeys(ids)]


class DocumentRepository(WorkspaceRepository[Document]):
    model = Document
    noun = "document"

    async def of_kb(
        self, kb_id: uuid.UUID, params: PageParams, status: DocumentStatus | None
    ) -> Sequence[Document]:
        where: list[ColumnElement[bool]] = [Document.knowledge_base_id == kb_id]
        if status is not None:
            where.append(Document.status == status)
        return await self.page(params, *where)

    async def in_kb_or_404(
        self, kb_id: uuid.UUID, document_id: uuid.UUID, *, lock: bool = False
    ) -> Document:
        """The document; `lock` holds its row until the transaction ends (PostgreSQL), so an
        ingestion's batch in flight commits before, or finds the document gone after."""
        stmt = self.select().where(Document.id == document_id, Document.knowledge_base_id == kb_id)
        row: Document | None = await self.session.scalar(stmt.with_for_update() if lock else stmt)
        if row is None:
            raise NotFound(f"No document with id {document_id} in this knowledge base.")
        return row

    async def progress(self, kb_id: uuid.UUID) -> list[tuple[DocumentStatus, int, int, int]]:
        """Per status: documents, chunks done and chunks in all."""
        rows = await self.session.execute(
            select(
                Document.status,
                func.count(),
                func.coalesce(func.sum(Document.chunks_done), 0),
                func.coalesce(func.sum(Document.chunks_total), 0),
            )
            .where(Document.workspace_id == self.workspace_id, Document.knowledge_base_id == kb_id)
            .group_by(Document.status)
        )
        return [(DocumentStatus(s), int(n), int(done), int(total)) for s, n, done, total in rows]

    async def metadata_of(self, kb_ids: Sequence[uuid.UUID]) -> list[tuple[uuid.UUID, Any]]:
        rows = await self.session.execute(
            select(Document.id, Document.meta).where(
                Document.workspace_id == self.workspace_id,
                Document.knowledge_base_id.in_(list(kb_ids)),
            )
        )
        return [(id, meta) for id, meta in rows]


class ChunkRepository:
    """Chunks of one workspace's knowledge bases (the ids come from search)."""

    def __init__(self, session: Any, workspace_id: uuid.UUID) -> None:
        self.session = session
        self.workspace_id = workspace_id

    async def with_documents(self, ids: Sequence[int]) -> dict[int, Found]:
        """What search results show of these chunks and their documents, by chunk id (the
        columns only: not a chunk's embedding, nor a text document's whole text)."""
        if not ids:
            return {}
        params = {"workspace_id": self.workspace_id, "ids": list(ids)}
        rows = await self.session.execute(_chunks_with_documents(), params)
        return {row[0]: Found(*row) for row in rows}


@dataclass(frozen=True)
class Found:
    """A chunk found by a search, with its document."""

    id: int
    text: str
    knowledge_base_id: uuid.UUID
    page: int | None
    heading_path: list[str] | None
    position: int
    document_id: uuid.UUID
    document_title: str
    document_meta: dict[str, Any] | None


# Statements every search runs, built once, on first use (building a statement costs more than
# running it; foreign keys' column types are known only once every model is imported).


@functools.cache
def _kbs_by_ids() -> Select[KnowledgeBase]:
    return select(KnowledgeBase).where(
        KnowledgeBase.workspace_id == bindparam("workspace_id"),
        KnowledgeBase.id.in_(bindparam("ids", expanding=True)),
    )


@functools.cache
def _chunks_with_documents() -> Select[Any]:
    return (
        select(
            Chunk.id,
            Chunk.text,
            Chunk.knowledge_base_id,
            Chunk.page,
            Chunk.heading_path,
            Chunk.position,
            Document.id,
            Document.title,
            Document.meta,
        )
        .join(Document, Document.id == Chunk.document_id)
        .where(
            Chunk.workspace_id == bindparam("workspace_id"),
            Chunk.id.in_(bindparam("ids", expanding=True)),
        )
    )
