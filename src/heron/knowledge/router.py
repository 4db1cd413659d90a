"""HTTP endpoints of knowledge bases: CRUD, documents, ingestion progress (JSON and SSE), search."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, status
from fastapi.responses import StreamingResponse

from heron.core.auth import Reader, Writer
from heron.core.errors import problem_responses
from heron.core.pagination import Page, PageQuery, make_page
from heron.core.routing import JsonRoute
from heron.db.engine import Database
from heron.db.session import READS_ONLY, DbSession
from heron.knowledge import service
from heron.knowledge.models import Document, DocumentStatus, KnowledgeBase
from heron.knowledge.repository import DocumentRepository, KnowledgeBaseRepository
from heron.knowledge.schemas import (
    DocumentBatch,
    DocumentCreate,
    DocumentList,
    DocumentOut,
    KnowledgeBaseCreate,
    KnowledgeBaseOut,
    KnowledgeBaseUpdate,
    MultiSearchRequest,
    Progress,
    SearchRequest,
    SearchResponse,
)

router = APIRouter(
    prefix="/api/knowledge-bases",
    tags=["knowledge"],
    route_class=JsonRoute,
    responses=problem_responses(400, 401, 403, 404, 409, 413, 415, 422, 429),
)
SSE: dict[int | str, dict[str, Any]] = {
    200: {"content": {"text/event-stream": {"schema": {"type": "string"}}}}
}
POLL_SECONDS = 0.5


def _submit(request: Request) -> service.Submit:
    submit: service.Submit = request.app.state.ingestion.submit
    return submit


def _embedders(request: Request) -> service.EmbedderFactory:
    factory: service.EmbedderFactory = request.app.state.ingestion.ctx.embedder_for
    return factory


def kb_out(kb: KnowledgeBase) -> KnowledgeBaseOut:
    return KnowledgeBaseOut.model_validate(kb)


def document_out(doc: Document) -> DocumentOut:
    return DocumentOut.model_validate(doc)


# Knowledge bases ---------------------------------------------------------------------------------


@router.post("", status_code=status.HTTP_201_CREATED, summary="Create a knowledge base")
async def create_knowledge_base(
    session: DbSession, principal: Writer, body: KnowledgeBaseCreate
) -> KnowledgeBaseOut:
    return kb_out(await service.create_kb(session, principal.workspace_id, body))


@router.get("", summary="List knowledge bases")
async def list_knowledge_bases(
    session: DbSession, principal: Reader, page: PageQuery
) -> Page[KnowledgeBaseOut]:
    rows = await KnowledgeBaseRepository(session, principal.workspace_id).page(page)
    return make_page(list(rows), page, kb_out, lambda kb: kb.id)


@router.get("/{kb_id}", summary="Get a knowledge base")
async def get_knowledge_base(
    session: DbSession, principal: Reader, kb_id: uuid.UUID
) -> KnowledgeBaseOut:
    return kb_out(await KnowledgeBaseRepository(session, principal.workspace_id).get_or_404(kb_id))


@router.patch("/{kb_id}", summary="Rename a knowledge base or change its chunking")
async def update_knowledge_base(
    session: DbSession, principal: Writer, kb_id: uuid.UUID, body: KnowledgeBaseUpdate
) -> KnowledgeBaseOut:
    return kb_out(await service.update_kb(session, principal.workspace_id, kb_id, body))


@router.delete(
    "/{kb_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    summary="Delete a knowledge base with its documents and chunks",
)
async def delete_knowledge_base(session: DbSession, principal: Writer, kb_id: uuid.UUID) -> None:
    await service.delete_kb(session, principal.workspace_id, kb_id)


# Documents ---------------------------------------------------------------------------------------


@router.post(
    "/{kb_id}/documents",
    status_code=status.HTTP_202_ACCEPTED,
    summary="Add a document (a file, a URL or text); it is ingested in the background",
)
async def add_document(
    request: Request, session: DbSession, principal: Writer, kb_id: uuid.UUID, body: DocumentCreate
) -> DocumentOut:
    rows = await service.add_documents(
        session, principal.workspace_id, kb_id, [body], _submit(request)
    )
    return document_out(rows[0])


@router.post(
    "/{kb_id}/documents/batch",
    status_code=status.HTTP_202_ACCEPTED,
    summary="Add up to 1000 documents at once (a folder's files)",
)
async def add_documents(
    request: Request, session: DbSession, principal: Writer, kb_id: uuid.UUID, body: DocumentBatch
) -> DocumentList:
    rows = await service.add_documents(
        session, principal.workspace_id, kb_id, body.documents, _submit(request), batch=True
    )
    return DocumentList(items=[document_out(row) for row in rows])


@router.get("/{kb_id}/documents", summary="A knowledge base's documents, with their status")
async def list_documents(
    session: DbSession,
    principal: Reader,
    kb_id: uuid.UUID,
    page: PageQuery,
    status: Annotated[DocumentStatus | None, Query(description="Only documents in it.")] = None,
) -> Page[DocumentOut]:
    await KnowledgeBaseRepository(session, principal.workspace_id).get_or_404(kb_id)
    rows = await DocumentRepository(session, principal.workspace_id).of_kb(kb_id, page, status)
    return make_page(list(rows), page, document_out, lambda d: d.id)


@router.get("/{kb_id}/documents/{document_id}", summary="Get a document")
async def get_document(
    session: DbSession, principal: Reader, kb_id: uuid.UUID, document_id: uuid.UUID
) -> DocumentOut:
    await KnowledgeBaseRepository(session, principal.workspace_id).get_or_404(kb_id)
    repo = DocumentRepository(session, principal.workspace_id)
    return document_out(await repo.in_kb_or_404(kb_id, document_id))


@router.delete(
    "/{kb_id}/documents/{document_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    summary="Delete a document and its chunks",
)
async def delete_document(
    session: DbSession, principal: Writer, kb_id: uuid.UUID, document_id: uuid.UUID
) -> None:
    await service.delete_document(session, principal.workspace_id, kb_id, document_id)


@router.post(
    "/{kb_id}/documents/{document_id}/reingest",
    status_code=status.HTTP_202_ACCEPTED,
    summary="Ingest a document again (its chunks are replaced when the new ones are ready)",
)
async def reingest_document(
    request: Request,
    session: DbSession,
    principal: Writer,
    kb_id: uuid.UUID,
    document_id: uuid.UUID,
) -> DocumentOut:
    doc = await service.reingest(
        session, principal.workspace_id, kb_id, document_id, _submit(request)
    )
    return document_out(doc)


# Progress ----------------------------------------------------------------------------------------


@router.get("/{kb_id}/progress", summary="Ingestion progress: documents and chunks done")
async def get_progress(session: DbSession, principal: Reader, kb_id: uuid.UUID) -> Progress:
    return await service.progress(session, principal.workspace_id, kb_id)


@router.get(
    "/{kb_id}/progress/events",
    summary="Ingestion progress as server-sent events, one `progress` event per change",
    response_class=StreamingResponse,
    responses=SSE,
)
async def progress_events(
    request: Request,
    session: DbSession,
    principal: Reader,
    kb_id: uuid.UUID,
    follow: Annotated[
        bool,
        Query(
            description="Keep the stream open when nothing is being ingested (false: end "
            "once every document is ready or failed)."
        ),
    ] = True,
) -> StreamingResponse:
    first = await service.progress(session, principal.workspace_id, kb_id)
    db: Database = request.app.state.db
    keepalive: float = request.app.state.settings.runs.keepalive_seconds
    workspace_id = principal.workspace_id

    async def body() -> AsyncIterator[bytes]:
        current, seq, quiet = first, 1, 0.0
        yield _event(seq, current)
        while follow or current.in_progress:
            await asyncio.sleep(POLL_SECONDS)
            async with db.session(write=False) as reader:
                latest = await service.progress(reader, workspace_id, kb_id)
            if latest != current:
                current, seq, quiet = latest, seq + 1, 0.0
                yield _event(seq, current)
                continue
            quiet += POLL_SECONDS
            if quiet >= keepalive:
                quiet = 0.0
                if await request.is_disconnected():
                    return
                yield b": keep-alive\n\n"

    return StreamingResponse(
        body(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


def _event(seq: int, progress: Progress) -> bytes:
    return f"id: {seq}\nevent: progress\ndata: {progress.model_dump_json()}\n\n".encode()


# Search ------------------------------------------------------------------------------------------


async def _search(
    request: Request,
    session: DbSession,
    workspace_id: uuid.UUID,
    kb_ids: list[uuid.UUID],
    body: SearchRequest,
) -> SearchResponse:
    # A search only reads, and its request's transaction is a read one (READS_ONLY): on
    # SQLite it never takes the single writer, whatever runs meanwhile.
    kbs = await KnowledgeBaseRepository(session, workspace_id).many_or_404(kb_ids)
    results = await service.search(session, workspace_id, kbs, body, _embedders(request))
    return SearchResponse(results=results, mode=body.mode)


@router.post("/search", summary="Search several knowledge bases at once", dependencies=[READS_ONLY])
async def search_many(
    request: Request, session: DbSession, principal: Reader, body: MultiSearchRequest
) -> SearchResponse:
    query = SearchRequest.model_validate(body.model_dump(exclude={"knowledge_bases"}))
    return await _search(request, session, principal.workspace_id, body.knowledge_bases, query)


@router.post(
    "/{kb_id}/search",
    summary="Search a knowledge base: hybrid, vector or keyword",
    dependencies=[READS_ONLY],
)
async def search_one(
    request: Request, session: DbSession, principal: Reader, kb_id: uuid.UUID, body: SearchRequest
) -> SearchResponse:
    return await _search(request, session, principal.workspace_id, [kb_id], body)
