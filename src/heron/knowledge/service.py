"""Knowledge bases: their lifecycle, documents queued for ingestion, progress, and search.

The service decides; documents are handed to the ingestion queue only after the request's
transaction commits (`after_commit`). Services flush, never commit.
"""

from __future__ import annotations

import asyncio
import inspect
import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from pydantic import JsonValue
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from heron.core.crypto import SecretBox
from heron.core.errors import Conflict, FieldError, HeronError, ValidationFailed
from heron.core.ids import utcnow
from heron.core.netguard import NetGuard
from heron.core.tasks import cancel_and_wait
from heron.db.engine import Database
from heron.db.session import after_commit
from heron.knowledge import index
from heron.knowledge.models import (
    LOCAL_DIMENSIONS,
    LOCAL_MODEL,
    Document,
    DocumentStatus,
    KnowledgeBase,
    SourceKind,
)
from heron.knowledge.repository import ChunkRepository, DocumentRepository, KnowledgeBaseRepository
from heron.knowledge.schemas import (
    DocumentCreate,
    KnowledgeBaseCreate,
    KnowledgeBaseUpdate,
    Progress,
    SearchRequest,
    SearchResult,
)
from heron.providers.models import ProviderKind
from heron.providers.repository import ProviderRepository

if TYPE_CHECKING:
    import numpy as np

    from heron.knowledge.embeddings import Embedder

RRF_K = 60
EMBEDDING_PROVIDER_KINDS = frozenset({ProviderKind.openai, ProviderKind.openai_compatible})


class Submit(Protocol):
    def __call__(self, document_id: uuid.UUID, workspace_id: uuid.UUID) -> object: ...


class EmbeddingUnavailable(Conflict):
    slug, title = "embedding-unavailable", "Embedding model unavailable"


# Embedders ---------------------------------------------------------------------------------------


EmbedderFactory = Callable[[AsyncSession, KnowledgeBase], Awaitable["Embedder"]]


def embedder_factory(box: SecretBox) -> EmbedderFactory:
    """How a knowledge base's embedder is made: the local model (one per process), or an
    OpenAI-compatible provider connection of the workspace, decrypted with `box`."""

    async def embedder_for(session: AsyncSession, kb: KnowledgeBase) -> Embedder:
        from heron.knowledge.embeddings import OpenAIEmbedder, local_embedder

        if kb.embedding_model == LOCAL_MODEL:
            return local_embedder()
        from heron.providers.service import connection_of

        provider_name, model = kb.embedding_model.split(":", 1)
        row = await ProviderRepository(session, kb.workspace_id).by_name(provider_name)
        if row is None:
            raise EmbeddingUnavailable(
                f"The embedding provider {provider_name!r} of knowledge base {kb.name!r} "
                "no longer exists in this workspace."
            )
        connection = connection_of(row, box)
        return OpenAIEmbedder(
            base_url=connection.endpoint,
            api_key=connection.api_key,
            model=model,
            dimensions=kb.embedding_dimensions,
            headers=connection.headers,
            timeout=connection.timeout_seconds,
        )

    return embedder_for


# Knowledge bases ---------------------------------------------------------------------------------


def _invalid(field: str, message: str, type: str) -> ValidationFailed:
    return ValidationFailed(
        f"{field}: {message}", errors=[FieldError(loc=["body", field], msg=message, type=type)]
    )


async def _embedding_of(
    session: AsyncSession, workspace_id: uuid.UUID, body: KnowledgeBaseCreate
) -> tuple[str, int]:
    model, dims = body.embedding_model, body.embedding_dimensions
    provider_name, _, _ = model.partition(":")
    if provider_name == "local":
        if model != LOCAL_MODEL:
            raise _invalid(
                "embedding_model", f"the local model is {LOCAL_MODEL!r}", "unknown_model"
            )
        if dims not in (None, LOCAL_DIMENSIONS):
            raise _invalid(
                "embedding_dimensions",
                f"{LOCAL_MODEL} has {LOCAL_DIMENSIONS} dimensions",
                "wrong_dimensions",
            )
        return model, LOCAL_DIMENSIONS
    provider = await ProviderRepository(session, workspace_id).by_name(provider_name)
    if provider is None:
        raise _invalid(
            "embedding_model",
            f"no provider named {provider_name!r} in this workspace",
            "unknown_provider",
        )
    if provider.kind not in EMBEDDING_PROVIDER_KINDS:
        raise _invalid(
            "embedding_model",
            f"provider {provider_name!r} is {provider.kind.value}; embeddings need an "
            "openai or openai-compatible provider",
            "unsupported_provider",
        )
    if dims is None:
        raise _invalid(
            "embedding_dimensions",
            "required with a provider's embedding model",
            "missing",
        )
    return model, dims


async def create_kb(
    session: AsyncSession, workspace_id: uuid.UUID, body: KnowledgeBaseCreate
) -> KnowledgeBase:
    repo = KnowledgeBaseRepository(session, workspace_id)
    if await repo.by_name(body.name) is not None:
        raise _name_taken(body.name)
    model, dims = await _embedding_of(session, workspace_id, body)
    kb = repo.add(
        KnowledgeBase(
            name=body.name,
            description=body.description,
            embedding_model=model,
            embedding_dimensions=dims,
            chunk_size=body.chunk_size,
            chunk_overlap=body.chunk_overlap,
            index_version=0,
            chunk_count=0,
            term_total=0,
        )
    )
    await _flush(session, body.name)
    return kb


async def update_kb(
    session: AsyncSession, workspace_id: uuid.UUID, kb_id: uuid.UUID, body: KnowledgeBaseUpdate
) -> KnowledgeBase:
    repo = KnowledgeBaseRepository(session, workspace_id)
    kb = await repo.get_or_404(kb_id)
    if body.name is not None and body.name != kb.name:
        if await repo.by_name(body.name) is not None:
            raise _name_taken(body.name)
        kb.name = body.name
    if body.description is not None:
        kb.description = body.description
    size = body.chunk_size if body.chunk_size is not None else kb.chunk_size
    overlap = body.chunk_overlap if body.chunk_overlap is not None else kb.chunk_overlap
    if overlap > size // 2:
        raise _invalid("chunk_overlap", "must be at most half of chunk_size", "value_error")
    kb.chunk_size, kb.chunk_overlap = size, overlap
    kb.updated_at = utcnow()
    await _flush(session, kb.name)
    return kb


async def delete_kb(session: AsyncSession, workspace_id: uuid.UUID, kb_id: uuid.UUID) -> None:
    """Delete the knowledge base; its documents, chunks, terms and postings go with it (foreign
    keys cascade)."""
    repo = KnowledgeBaseRepository(session, workspace_id)
    kb = await repo.get_or_404(kb_id)
    await repo.delete(kb)
    after_commit(session, lambda: index.forget_matrices(kb_id))


def _name_taken(name: str) -> Conflict:
    return Conflict(f"A knowledge base named {name!r} already exists in this workspace.")


async def _flush(session: AsyncSession, name: str) -> None:
    try:
        await session.flush()
    except IntegrityError:  # a concurrent request took the name
        raise _name_taken(name) from None


# Documents ---------------------------------------------------------------------------------------


async def add_documents(
    session: AsyncSession,
    workspace_id: uuid.UUID,
    kb_id: uuid.UUID,
    items: Sequence[DocumentCreate],
    submit: Submit,
    *,
    batch: bool = False,
) -> list[Document]:
    """Record the documents, queued; they are submitted for ingestion once committed."""
    kb = await KnowledgeBaseRepository(session, workspace_id).get_or_404(kb_id)
    repo = DocumentRepository(session, workspace_id)
    rows: list[Document] = []
    for n, item in enumerate(items):
        title = item.title or ""
        if item.source == SourceKind.file:
            assert item.file_id is not None
            title = title or await _file_name(session, workspace_id, item.file_id, n, batch)
        elif item.source == SourceKind.url:
            assert item.url is not None
            # Only what needs no network now (scheme, credentials, host syntax); the address
            # is checked when the ingestion fetches it, with the workspace's policy then.
            NetGuard(allow_private_network=True).check_url(item.url)
            title = title or item.url
        rows.append(
            repo.add(
                Document(
                    knowledge_base_id=kb.id,
                    source=item.source,
                    file_id=item.file_id,
                    url=item.url,
                    text=item.text,
                    title=title,
                    meta=item.metadata,
                    status=DocumentStatus.queued,
                    truncated=False,
                    chunks_done=0,
                    chunks_total=0,
                    attempts=0,
                )
            )
        )
    await session.flush()
    ids = [row.id for row in rows]

    async def submit_all() -> None:
        for document_id in ids:
            handed = submit(document_id, workspace_id)  # to a queue: may be awaitable
            if inspect.isawaitable(handed):
                await handed

    after_commit(session, submit_all)
    return rows


async def _file_name(
    session: AsyncSession, workspace_id: uuid.UUID, file_id: uuid.UUID, n: int, batch: bool
) -> str:
    from heron.files.repository import FileRepository

    row = await FileRepository(session, workspace_id).get(file_id)
    if row is None:
        loc: list[str | int] = ["body", "documents", n, "file_id"] if batch else ["body", "file_id"]
        message = f"no file with id {file_id} in this workspace"
        raise ValidationFailed(
            f"file_id: {message}", errors=[FieldError(loc=loc, msg=message, type="unknown_file")]
        )
    return row.name


async def reingest(
    session: AsyncSession,
    workspace_id: uuid.UUID,
    kb_id: uuid.UUID,
    document_id: uuid.UUID,
    submit: Submit,
) -> Document:
    """Queue the document again; its current chunks stay searchable until the new ones
    replace them, in one transaction."""
    await KnowledgeBaseRepository(session, workspace_id).get_or_404(kb_id)
    doc = await DocumentRepository(session, workspace_id).in_kb_or_404(kb_id, document_id)
    if doc.status.in_progress:
        raise Conflict("The document is being ingested; re-ingest it once it is ready or failed.")
    doc.status = DocumentStatus.queued
    doc.error = None
    doc.attempts = 0
    doc.chunks_done = 0
    doc.lease_owner = None
    doc.lease_expires_at = None
    doc.updated_at = utcnow()
    await session.flush()
    after_commit(session, lambda: submit(document_id, workspace_id))
    return doc


async def delete_document(
    session: AsyncSession, workspace_id: uuid.UUID, kb_id: uuid.UUID, document_id: uuid.UUID
) -> None:
    kb = await KnowledgeBaseRepository(session, workspace_id).get_or_404(kb_id)
    repo = DocumentRepository(session, workspace_id)
    doc = await repo.in_kb_or_404(kb_id, document_id, lock=True)
    await index.remove_chunks(session, kb.id, doc.id)
    await repo.delete(doc)


async def progress(session: AsyncSession, workspace_id: uuid.UUID, kb_id: uuid.UUID) -> Progress:
    await KnowledgeBaseRepository(session, workspace_id).get_or_404(kb_id)
    rows = await DocumentRepository(session, workspace_id).progress(kb_id)
    by_status = dict.fromkeys(DocumentStatus, 0)
    for status, count, _, _ in rows:
        by_status[status] = count
    return Progress(
        knowledge_base_id=kb_id,
        documents_total=sum(by_status.values()),
        documents_done=by_status[DocumentStatus.ready] + by_status[DocumentStatus.failed],
        chunks_total=sum(total for *_, total in rows),
        chunks_done=sum(done for _, _, done, _ in rows),
        by_status=by_status,
        in_progress=any(by_status[s] for s in DocumentStatus if s.in_progress),
    )


# Search ------------------------------------------------------------------------------------------


def metadata_matches(metadata: dict[str, Any], filters: dict[str, Any]) -> bool:
    """Every key of `filters` matches: the document's value equals the wanted one (or one of
    a list of wanted ones); a document value that is a list matches when an element does."""
    for key, wanted in filters.items():
        allowed = wanted if isinstance(wanted, list) else [wanted]
        value = metadata.get(key)
        values = value if isinstance(value, list) else [value]
        if not any(_same(v, a) for v in values for a in allowed):
            return False
    return True


def _same(a: Any, b: Any) -> bool:
    # JSON's true is not 1: bools only equal bools.
    return bool(a == b and isinstance(a, bool) == isinstance(b, bool))


async def search(
    session: AsyncSession,
    workspace_id: uuid.UUID,
    kbs: Sequence[KnowledgeBase],
    request: SearchRequest,
    embedder_for: EmbedderFactory,
) -> list[SearchResult]:
    allowed: set[uuid.UUID] | None = None
    if request.filters:
        documents = await DocumentRepository(session, workspace_id).metadata_of(
            [kb.id for kb in kbs]
        )
        allowed = {id for id, meta in documents if metadata_matches(meta or {}, request.filters)}
    depth = request.top_k if request.mode != "hybrid" else max(50, request.top_k * 5)
    keyword: list[index.Hit] = []
    vector: list[index.Hit] = []
    queries: list[tuple[list[KnowledgeBase], asyncio.Task[np.ndarray]]] = []
    if request.mode in ("hybrid", "vector"):
        # The query embeds (in the model's thread) while the keyword search runs.
        queries = await _embed_query(session, kbs, request.query, embedder_for)

    async def vector_part(on: AsyncSession) -> list[index.Hit]:
        hits: list[index.Hit] = []
        for group, embedding in queries:
            hits += await index.vector_search(on, group, await embedding, depth, allowed)
        return hits

    try:
        if request.mode == "keyword":
            keyword = await index.keyword_search(session, kbs, request.query, depth, allowed)
        elif request.mode == "vector":
            vector = await vector_part(session)
        else:
            # The vector part goes on as soon as the query is embedded, beside the keyword
            # part, on a read session of its own (a session runs one statement at a time).
            async with AsyncSession(session.bind, expire_on_commit=False) as other:
                beside = asyncio.create_task(vector_part(other))
                try:
                    keyword = await index.keyword_search(
                        session, kbs, request.query, depth, allowed
                    )
                    vector = await beside
                finally:
                    if not beside.done():
                        await cancel_and_wait([beside])
    finally:
        for _, embedding in queries:
            embedding.cancel()
    vector = sorted(vector, key=lambda h: h.score, reverse=True)[:depth]
    if request.mode == "keyword":
        ranked = [(h.chunk_id, h.score) for h in keyword]
    elif request.mode == "vector":
        ranked = [(h.chunk_id, h.score) for h in vector]
    else:
        ranked = reciprocal_rank_fusion([keyword, vector])
    ranked = ranked[: request.top_k]
    found = await ChunkRepository(session, workspace_id).with_documents([id for id, _ in ranked])
    results = []
    for chunk_id, score in ranked:
        if chunk_id not in found:
            continue  # removed between the index lookup and now
        chunk = found[chunk_id]
        results.append(
            SearchResult(
                chunk_id=chunk.id,
                text=chunk.text,
                score=score,
                knowledge_base_id=chunk.knowledge_base_id,
                document_id=chunk.document_id,
                document_title=chunk.document_title,
                page=chunk.page,
                heading_path=list(chunk.heading_path or []),
                position=chunk.position,
                metadata=chunk.document_meta or {},
            )
        )
    return results


def reciprocal_rank_fusion(lists: Sequence[Sequence[index.Hit]]) -> list[tuple[int, float]]:
    scores: dict[int, float] = {}
    for hits in lists:
        for rank, hit in enumerate(hits, start=1):
            scores[hit.chunk_id] = scores.get(hit.chunk_id, 0.0) + 1.0 / (RRF_K + rank)
    return sorted(scores.items(), key=lambda item: item[1], reverse=True)


async def _embed_query(
    session: AsyncSession,
    kbs: Sequence[KnowledgeBase],
    query: str,
    embedder_for: EmbedderFactory,
) -> list[tuple[list[KnowledgeBase], asyncio.Task[np.ndarray]]]:
    """The query's embedding, started once per embedding model of the knowledge bases."""
    groups: dict[tuple[str, int], list[KnowledgeBase]] = {}
    for kb in kbs:
        if kb.chunk_count > 0:
            groups.setdefault((kb.embedding_model, kb.embedding_dimensions), []).append(kb)
    started = []
    for group in groups.values():
        embedder = await embedder_for(session, group[0])
        started.append((group, asyncio.create_task(embedder.embed_query(query))))
    return started


# Agents ------------------------------------------------------------------------------------------


class AgentKnowledge:
    """The knowledge bases one agent run may search (`ToolContext.knowledge`): the references
    of its spec, resolved in its workspace when it searches (a renamed or deleted knowledge base
    is reported to the model, not to the run)."""

    def __init__(
        self,
        db: Database,
        embedder_for: EmbedderFactory,
        workspace_id: uuid.UUID,
        refs: Sequence[str],
    ) -> None:
        self.db = db
        self.embedder_for = embedder_for
        self.workspace_id = workspace_id
        self.refs = list(refs)

    async def search(
        self, query: str, *, top_k: int, knowledge_base: str | None
    ) -> list[dict[str, JsonValue]]:
        from heron.tools.registry import ToolFailure

        async with self.db.session(write=False) as session:
            repo = KnowledgeBaseRepository(session, self.workspace_id)
            kbs = [kb for kb in [await repo.find(ref) for ref in self.refs] if kb is not None]
            if knowledge_base is not None:
                kbs = [kb for kb in kbs if knowledge_base in (kb.name, str(kb.id))]
                if not kbs:
                    raise ToolFailure(
                        f"no knowledge base named {knowledge_base!r} is available; available: "
                        + ", ".join(repr(ref) for ref in self.refs)
                    )
            if not kbs:
                raise ToolFailure("none of this agent's knowledge bases exists any more")
            names = {kb.id: kb.name for kb in kbs}
            try:
                found = await search(
                    session,
                    self.workspace_id,
                    kbs,
                    SearchRequest(query=query, top_k=top_k, mode="hybrid"),
                    self.embedder_for,
                )
            except HeronError as exc:
                raise ToolFailure(f"the search failed: {exc.detail}") from None
        return [
            {
                "text": r.text,
                "score": round(r.score, 6),
                "citation": {
                    "knowledge_base": names[r.knowledge_base_id],
                    "knowledge_base_id": str(r.knowledge_base_id),
                    "document_id": str(r.document_id),
                    "document_title": r.document_title,
                    "chunk_id": r.chunk_id,
                    "page": r.page,
                    "heading_path": list(r.heading_path),
                },
            }
            for r in found
        ]
