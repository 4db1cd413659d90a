"""Ingesting documents: content → text → chunks → embeddings → index, in the background.

`ingest_document` owns one document from claim to end and is all a worker needs (the embedded
`IngestionExecutor` here, or a Celery task given the same context). It claims the document with
a lease, reads its content (text, an uploaded file, or a URL fetched through the SSRF guard),
parses and chunks it in a thread, and embeds and writes the chunks batch by batch, renewing the
lease and the progress with each batch. Every failure ends in `failed` with a reason, for this
document only. A worker that dies leaves its lease to lapse; the document is then taken up again,
from the start, up to `max_attempts` times.

A document that was ready before (a re-ingestion) keeps its chunks searchable until the new ones
are complete: those are written, and the old ones removed, in one transaction at the end.
"""

from __future__ import annotations

import asyncio
import contextvars
import hashlib
import uuid
from collections import deque
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import structlog
from sqlalchemy import select, update
from sqlalchemy.exc import SQLAlchemyError

from heron.core import heap
from heron.core.crypto import SecretBox
from heron.core.errors import HeronError
from heron.core.ids import utcnow
from heron.core.leases import owner_id, owner_is_gone
from heron.core.netguard import FetchLimits, NetGuard, open_url
from heron.core.tasks import cancel_and_wait
from heron.db.engine import Database
from heron.knowledge import index
from heron.knowledge.models import Document, DocumentStatus, KnowledgeBase, SourceKind
from heron.knowledge.service import EmbedderFactory, embedder_factory
from heron.settings import Settings
from heron.tenancy.models import Workspace

if TYPE_CHECKING:
    import numpy as np

    from heron.files.storage import BlobStore
    from heron.jobs.queue import CeleryQueue

log = structlog.get_logger("heron.knowledge")
LEASE = timedelta(seconds=30)
TEXT_TYPE = "text/markdown"  # text documents: headings and paragraphs are respected


class IngestFailure(Exception):
    """The document cannot be ingested; `reason` is for its owner to read."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class LeaseLost(Exception):
    """The document was deleted, or another worker took it over: stop without a trace."""


@dataclass
class IngestionContext:
    """What ingesting a document needs from the process."""

    db: Database
    settings: Settings
    blobs: BlobStore
    embedder_for: EmbedderFactory
    owner: str = field(default_factory=owner_id)
    stopping: bool = False

    @classmethod
    def create(
        cls, db: Database, settings: Settings, box: SecretBox, blobs: BlobStore
    ) -> IngestionContext:
        return cls(db=db, settings=settings, blobs=blobs, embedder_for=embedder_factory(box))


@dataclass
class _Content:
    data: bytes
    content_type: str
    truncated: bool = False


async def ingest_document(ctx: IngestionContext, document_id: uuid.UUID) -> DocumentStatus | None:
    """Ingest one document until it is ready or failed; None when it is not this worker's to
    take (already done, held by a live worker, or deleted)."""
    claimed = await _claim(ctx, document_id)
    if claimed is None:
        return None
    doc, kb = claimed
    bound = log.bind(document_id=str(doc.id), knowledge_base_id=str(kb.id))
    heartbeat = asyncio.create_task(_heartbeat(ctx, doc.id), name=f"ingest-lease-{doc.id}")
    try:
        chunks = await _ingest(ctx, doc, kb)
    except IngestFailure as failure:
        bound.info("document_failed", reason=failure.reason)
        await _fail(ctx, doc, failure.reason)
        return DocumentStatus.failed
    except LeaseLost:
        bound.info("document_lease_lost")
        return None
    finally:
        await cancel_and_wait([heartbeat])
    bound.info("document_ready", chunks=chunks, attempt=doc.attempts)
    heap.settle("ingestion")  # the first time only: parsers and the embedder are loaded now
    return DocumentStatus.ready


async def _claim(
    ctx: IngestionContext, document_id: uuid.UUID
) -> tuple[Document, KnowledgeBase] | None:
    now = utcnow()
    async with ctx.db.session(write=True) as session, session.begin():
        doc = await session.scalar(
            select(Document).where(Document.id == document_id).with_for_update()
        )
        if doc is None:
            return None
        interrupted = doc.status in (DocumentStatus.parsing, DocumentStatus.embedding)
        lapsed = (
            doc.lease_expires_at is None
            or doc.lease_expires_at < now
            or doc.lease_owner == ctx.owner
            or owner_is_gone(doc.lease_owner)
        )
        if not (doc.status == DocumentStatus.queued or (interrupted and lapsed)):
            return None
        if interrupted and doc.attempts >= ctx.settings.knowledge.max_attempts:
            await _record_failure(
                session,
                doc,
                f"ingestion was interrupted {doc.attempts} times (its worker stopped); giving up",
            )
            log.warning("document_given_up", document_id=str(doc.id), attempts=doc.attempts)
            return None
        kb = await session.scalar(
            select(KnowledgeBase).where(
                KnowledgeBase.id == doc.knowledge_base_id,
                KnowledgeBase.workspace_id == doc.workspace_id,
            )
        )
        if kb is None:
            return None
        doc.status = DocumentStatus.parsing
        doc.attempts += 1
        doc.error = None
        doc.chunks_done = 0
        doc.lease_owner = ctx.owner
        doc.lease_expires_at = now + LEASE
        doc.updated_at = now
        await session.flush()
        session.expunge(doc)
        session.expunge(kb)
        return doc, kb


async def _heartbeat(ctx: IngestionContext, document_id: uuid.UUID) -> None:
    """Keep the lease while parsing or embedding takes long."""
    while True:
        await asyncio.sleep(LEASE.total_seconds() / 3)
        try:
            async with ctx.db.session(write=True) as session, session.begin():
                await session.execute(
                    update(Document)
                    .where(Document.id == document_id, Document.lease_owner == ctx.owner)
                    .values(lease_expires_at=utcnow() + LEASE)
                )
        except (OSError, SQLAlchemyError) as exc:
            log.warning("ingest_heartbeat_failed", error=str(exc))


async def _ingest(ctx: IngestionContext, doc: Document, kb: KnowledgeBase) -> int:
    from heron.knowledge.chunking import chunk
    from heron.knowledge.parsing import ParseError, parse

    content = await _content(ctx, doc)
    digest = hashlib.sha256(content.data).hexdigest()
    try:
        parsed = await asyncio.to_thread(parse, content.data, content.content_type)
    except ParseError as exc:
        raise IngestFailure(exc.detail) from None
    pieces = await asyncio.to_thread(chunk, parsed, size=kb.chunk_size, overlap=kb.chunk_overlap)
    if not pieces:
        raise IngestFailure("the document has no text")
    truncated = content.truncated or parsed.truncated
    rows = [
        index.NewChunk(
            position=piece.position,
            text=piece.text.replace("\x00", ""),  # PostgreSQL's text can't hold NUL
            context="\n".join(x for x in (doc.title, *piece.heading_path) if x).replace("\x00", ""),
            heading_path=list(piece.heading_path),
            page=piece.page,
            token_count=piece.token_count,
        )
        for piece in pieces
    ]
    # The title is embedded with each chunk (as BEIR embeds title and text): it often names
    # what the passage is about. A URL standing in for a missing title is left out.
    title = doc.title if doc.title and doc.title != doc.url else ""
    texts = [f"{title}\n\n{p.embedding_text()}" if title else p.embedding_text() for p in pieces]
    replacing = doc.indexed_at is not None
    async with ctx.db.session(write=True) as session, session.begin():
        await _hold(session, ctx, doc, status=DocumentStatus.embedding, chunks_total=len(rows))
        await session.execute(
            update(Document)
            .where(Document.id == doc.id)
            .values(
                content_sha256=digest,
                content_type=content.content_type,
                truncated=truncated,
            )
        )
        if not replacing:  # what an interrupted attempt wrote
            await index.remove_chunks(session, kb.id, doc.id)
    try:
        embedder = await _embedder(ctx, kb)
    except HeronError as exc:
        raise IngestFailure(exc.detail) from None

    async def embed(batch: list[str]) -> np.ndarray:
        try:
            vectors: np.ndarray = await embedder.embed(batch)
        except HeronError as exc:
            raise IngestFailure(f"embedding failed: {exc.detail}") from None
        if vectors.shape != (len(batch), kb.embedding_dimensions):
            raise IngestFailure(
                f"the embedding model returned vectors of shape {vectors.shape}, expected "
                f"{kb.embedding_dimensions} dimensions"
            )
        return vectors

    size = ctx.settings.knowledge.embed_batch_size
    starts = list(range(0, len(rows), size))
    staged: list[tuple[list[index.NewChunk], np.ndarray]] = []
    # The next batch embeds while this one is written.
    pending = asyncio.create_task(embed(texts[:size]))
    try:
        for n, start in enumerate(starts):
            vectors = await pending
            if n + 1 < len(starts):
                following = starts[n + 1]
                pending = asyncio.create_task(embed(texts[following : following + size]))
            batch = rows[start : start + size]
            last = n + 1 == len(starts)
            done = start + len(batch)
            async with ctx.db.session(write=True) as session, session.begin():
                # The lease first: a document deleted (or taken over) meanwhile stops here,
                # before any chunk is written for it.
                if last:
                    await _hold(session, ctx, doc, status=DocumentStatus.ready, chunks_done=done)
                else:
                    await _hold(session, ctx, doc, chunks_done=done)
                if replacing:
                    staged.append((batch, vectors))
                    if last:
                        await index.remove_chunks(session, kb.id, doc.id)
                        for staged_rows, staged_vectors in staged:
                            await index.write_chunks(
                                session, kb, doc.id, staged_rows, staged_vectors
                            )
                else:
                    await index.write_chunks(session, kb, doc.id, batch, vectors)
    finally:
        if not pending.done():
            pending.cancel()
    return len(rows)


async def _embedder(ctx: IngestionContext, kb: KnowledgeBase) -> Any:
    async with ctx.db.session(write=False) as session:
        return await ctx.embedder_for(session, kb)


async def _hold(session: Any, ctx: IngestionContext, doc: Document, **values: Any) -> None:
    """Write progress while this worker still holds the document; LeaseLost otherwise."""
    now = utcnow()
    values = {"lease_expires_at": now + LEASE, "updated_at": now, **values}
    if values.get("status") == DocumentStatus.ready:
        values |= {"lease_owner": None, "lease_expires_at": None, "indexed_at": now}
    result = await session.execute(
        update(Document)
        .where(Document.id == doc.id, Document.lease_owner == ctx.owner)
        .values(**values)
        .returning(Document.id)
    )
    if result.first() is None:
        raise LeaseLost()


async def _content(ctx: IngestionContext, doc: Document) -> _Content:
    if doc.source == SourceKind.text:
        return _Content((doc.text or "").encode(), TEXT_TYPE)
    if doc.source == SourceKind.url:
        return await _fetch(ctx, doc)
    return await _read_file(ctx, doc)


async def _read_file(ctx: IngestionContext, doc: Document) -> _Content:
    from heron.files.service import open_content

    if doc.file_id is None:
        raise IngestFailure("the document's file was deleted")
    async with ctx.db.session(write=False) as session:
        try:
            row, chunks = await open_content(session, ctx.blobs, doc.workspace_id, doc.file_id)
        except HeronError as exc:
            raise IngestFailure(f"the file cannot be read: {exc.detail}") from None
    data = b"".join([piece async for piece in chunks])
    return _Content(data, row.content_type)


async def _fetch(ctx: IngestionContext, doc: Document) -> _Content:
    assert doc.url is not None
    async with ctx.db.session(write=False) as session:
        allow_private = bool(
            await session.scalar(
                select(Workspace.allow_private_network).where(Workspace.id == doc.workspace_id)
            )
        )
    settings = ctx.settings.knowledge
    limits = FetchLimits(
        max_bytes=settings.max_fetch_bytes, timeout_seconds=settings.fetch_timeout_seconds
    )
    try:
        async with open_url(
            doc.url, guard=NetGuard(allow_private_network=allow_private), limits=limits
        ) as fetched:
            if fetched.status_code >= 400:
                phrase = fetched.response.reason_phrase
                raise IngestFailure(f"{fetched.url} answered HTTP {fetched.status_code} {phrase}")
            content_type = fetched.content_type or "application/octet-stream"
            data = await fetched.read()
            truncated = fetched.truncated
    except HeronError as exc:  # UrlRefused, FetchFailed
        raise IngestFailure(exc.detail) from None
    if fetched.charset and content_type.startswith("text/"):
        content_type = f"{content_type}; charset={fetched.charset}"
    return _Content(data, content_type, truncated)


async def _fail(ctx: IngestionContext, doc: Document, reason: str) -> None:
    async with ctx.db.session(write=True) as session, session.begin():
        row = await session.scalar(
            select(Document).where(Document.id == doc.id, Document.lease_owner == ctx.owner)
        )
        if row is not None:
            await _record_failure(session, row, reason)


async def _record_failure(session: Any, doc: Document, reason: str) -> None:
    """A first ingestion leaves nothing searchable; a failed re-ingestion keeps the chunks
    of the last one that succeeded."""
    if doc.indexed_at is None:
        await index.remove_chunks(session, doc.knowledge_base_id, doc.id)
        doc.chunks_done = 0
    doc.status = DocumentStatus.failed
    doc.error = reason[:2000]
    doc.lease_owner = None
    doc.lease_expires_at = None
    doc.updated_at = utcnow()


async def mark_failed(ctx: IngestionContext, document_id: uuid.UUID, reason: str) -> None:
    """Fail a document whose ingestion crashed in this worker."""
    async with ctx.db.session(write=True) as session, session.begin():
        row = await session.scalar(
            select(Document).where(Document.id == document_id, Document.lease_owner == ctx.owner)
        )
        if row is not None and row.status.in_progress:
            await _record_failure(session, row, reason)


class IngestionExecutor:
    """The embedded ingestion queue: documents ingest as tasks of this process, at most
    `max_concurrency` at once, in the order they were submitted."""

    def __init__(self, ctx: IngestionContext, *, max_concurrency: int) -> None:
        self.ctx = ctx
        self._max = max_concurrency
        self._waiting: deque[uuid.UUID] = deque()
        self._queued: set[uuid.UUID] = set()
        self._running: dict[uuid.UUID, asyncio.Task[Any]] = {}
        self._closed = False
        self._sweeper: asyncio.Task[None] | None = None
        self._waiters: dict[uuid.UUID, list[asyncio.Future[None]]] = {}
        self._queued_grace: timedelta | None = None

    def submit(self, document_id: uuid.UUID, workspace_id: uuid.UUID) -> None:
        if self._closed or self.is_local(document_id):
            return
        self._waiting.append(document_id)
        self._queued.add(document_id)
        self._pump()

    async def execute(self, document_id: uuid.UUID, workspace_id: uuid.UUID) -> None:
        """Submit the document and wait until this process is done with it: how a worker's
        job slot holds an ingestion."""
        if self._closed:
            return
        done = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(document_id, []).append(done)
        self.submit(document_id, workspace_id)
        if not self.is_local(document_id):
            self._release(document_id)
        await done

    def _release(self, document_id: uuid.UUID) -> None:
        for waiter in self._waiters.pop(document_id, []):
            if not waiter.done():
                waiter.set_result(None)

    def is_local(self, document_id: uuid.UUID) -> bool:
        """Whether this process ingests the document (or will, once a slot frees)."""
        return document_id in self._running or document_id in self._queued

    def _pump(self) -> None:
        while self._waiting and len(self._running) < self._max:
            document_id = self._waiting.popleft()
            self._queued.discard(document_id)
            # A context of its own: not the submitting request's (its request id, in logs).
            task = asyncio.create_task(
                self._execute(document_id),
                name=f"ingest-{document_id}",
                context=contextvars.Context(),
            )
            self._running[document_id] = task

    async def _execute(self, document_id: uuid.UUID) -> None:
        try:
            await ingest_document(self.ctx, document_id)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug: this document fails, the queue goes on
            log.exception("ingestion_crashed", document_id=str(document_id))
            try:
                await mark_failed(
                    self.ctx, document_id, f"internal error while ingesting ({type(exc).__name__})"
                )
            except (OSError, SQLAlchemyError):
                log.warning("ingestion_crash_not_recorded", document_id=str(document_id))
        finally:
            self._running.pop(document_id, None)
            self._release(document_id)
            if not self._closed:
                self._pump()

    def start(self, sweep_seconds: float = 2.0, *, queued_grace: timedelta | None = None) -> None:
        """Look every `sweep_seconds` for documents nobody ingests: queued ones, and those
        whose worker's lease lapsed. `queued_grace`: leave queued documents alone until they
        have waited this long (workers: the job queue delivers them)."""
        self._queued_grace = queued_grace
        self._sweeper = asyncio.create_task(self._sweep(sweep_seconds), name="ingest-sweeper")

    async def _sweep(self, every: float) -> None:
        while not self._closed:
            await asyncio.sleep(every)
            try:
                await self.recover()
            except (OSError, SQLAlchemyError) as exc:
                log.warning("ingest_sweep_failed", error=str(exc))

    async def recover(self) -> int:
        """Take up documents that were queued or being ingested when the process stopped."""
        now = utcnow()
        stmt = (
            select(
                Document.id,
                Document.workspace_id,
                Document.status,
                Document.lease_owner,
                Document.lease_expires_at,
                Document.updated_at,
            )
            .where(
                Document.status.in_(
                    [DocumentStatus.queued, DocumentStatus.parsing, DocumentStatus.embedding]
                )
            )
            .order_by(Document.id)
        )
        async with self.ctx.db.session(write=False) as session:
            rows = (await session.execute(stmt)).all()
        taken = 0
        grace = self._queued_grace
        for document_id, workspace_id, status, owner, expires, updated in rows:
            if self.is_local(document_id):
                continue
            lapsed = expires is None or expires < now or owner_is_gone(owner)
            if status != DocumentStatus.queued and not lapsed:
                continue
            if status == DocumentStatus.queued and grace is not None and updated > now - grace:
                continue
            self.submit(document_id, workspace_id)
            taken += 1
        return taken

    async def close(self) -> None:
        """Stop: documents being ingested are left to the next start (or another worker)."""
        self._closed = True
        self.ctx.stopping = True
        if self._sweeper is not None:
            self._sweeper.cancel()
        await cancel_and_wait(list(self._running.values()))
        for document_id in list(self._waiters):
            self._release(document_id)


class WorkerIngestion:
    """Ingestion on `heron worker` processes: the API side sends each document to the job
    queue. (`ctx` stays for what the API does itself: embedding search queries.)"""

    def __init__(self, ctx: IngestionContext, queue: CeleryQueue) -> None:
        self.ctx = ctx
        self._queue = queue

    async def submit(self, document_id: uuid.UUID, workspace_id: uuid.UUID) -> None:
        await self._queue.enqueue("ingest", document_id, workspace_id)

    def is_local(self, document_id: uuid.UUID) -> bool:
        return False


__all__ = ["IngestionContext", "IngestionExecutor", "WorkerIngestion", "ingest_document"]
