"""Knowledge bases, their documents, and the chunks that search finds.

Chunks have an integer id, and keyword terms an integer id per knowledge base: the keyword
postings (`term_blocks`) hold chunk ids under term ids, far smaller than UUIDs.

Index structures that are not ORM tables (created by migration 0006, see `index.py`):
PostgreSQL's partial HNSW indexes `ix_chunks_embedding_<dims>` on `embedding::vector(dims)`.
"""

from __future__ import annotations

import enum
import uuid
from datetime import datetime
from typing import Any

from pgvector.sqlalchemy import Vector
from sqlalchemy import (
    JSON,
    BigInteger,
    Enum,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import Mapped, mapped_column

from heron.db.base import Base, WorkspaceOwned

LOCAL_MODEL = "local:all-minilm-l6-v2"
LOCAL_DIMENSIONS = 384


class SourceKind(enum.StrEnum):
    file = "file"
    url = "url"
    text = "text"


class DocumentStatus(enum.StrEnum):
    queued = "queued"
    parsing = "parsing"
    embedding = "embedding"
    ready = "ready"
    failed = "failed"

    @property
    def in_progress(self) -> bool:
        return self in (DocumentStatus.queued, DocumentStatus.parsing, DocumentStatus.embedding)


class KnowledgeBase(WorkspaceOwned):
    __tablename__ = "knowledge_bases"
    __table_args__ = (UniqueConstraint("workspace_id", "name"),)

    name: Mapped[str] = mapped_column(String(100))
    description: Mapped[str] = mapped_column(Text, default="")
    # "local:all-minilm-l6-v2", or "<provider>:<model>" naming a provider of the workspace.
    embedding_model: Mapped[str] = mapped_column(String(300), default=LOCAL_MODEL)
    embedding_dimensions: Mapped[int] = mapped_column(Integer, default=LOCAL_DIMENSIONS)
    chunk_size: Mapped[int] = mapped_column(Integer, default=512)
    chunk_overlap: Mapped[int] = mapped_column(Integer, default=64)
    # Bumped by every change of the index (chunks written or removed): processes keep caches
    # of a knowledge base's vectors and drop them when the version moved.
    index_version: Mapped[int] = mapped_column(BigInteger, default=0)
    # BM25 statistics kept with the index: live chunks, and the sum of their lengths in terms.
    chunk_count: Mapped[int] = mapped_column(BigInteger, default=0)
    term_total: Mapped[int] = mapped_column(BigInteger, default=0)


_source_type = Enum(SourceKind, name="document_source", native_enum=False, length=8)
_status_type = Enum(DocumentStatus, name="document_status", native_enum=False, length=16)


class Document(WorkspaceOwned):
    __tablename__ = "documents"
    __table_args__ = (
        Index("ix_documents_kb_status", "knowledge_base_id", "status"),
        Index("ix_documents_status_lease", "status", "lease_expires_at"),
    )

    knowledge_base_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("knowledge_bases.id", ondelete="CASCADE")
    )
    source: Mapped[SourceKind] = mapped_column(_source_type)
    file_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("files.id", ondelete="SET NULL"), index=True
    )
    url: Mapped[str | None] = mapped_column(Text)
    text: Mapped[str | None] = mapped_column(Text)  # the content of a `text` document
    title: Mapped[str] = mapped_column(String(500), default="")
    meta: Mapped[dict[str, Any]] = mapped_column("metadata", JSON, default=dict)
    content_type: Mapped[str | None] = mapped_column(String(200))
    content_sha256: Mapped[str | None] = mapped_column(String(64))
    status: Mapped[DocumentStatus] = mapped_column(_status_type, default=DocumentStatus.queued)
    error: Mapped[str | None] = mapped_column(Text)
    truncated: Mapped[bool] = mapped_column(default=False)  # cut at a documented limit
    chunks_done: Mapped[int] = mapped_column(Integer, default=0)
    chunks_total: Mapped[int] = mapped_column(Integer, default=0)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    lease_owner: Mapped[str | None] = mapped_column(String(128))
    lease_expires_at: Mapped[datetime | None]
    # Set once its chunks were complete: a re-ingestion then replaces them in one transaction
    # at its end, and search keeps finding the old ones meanwhile.
    indexed_at: Mapped[datetime | None]


class Chunk(Base):
    """A piece of a document, as embedded and indexed. Reached only through its knowledge base
    (looked up by a WorkspaceRepository first); `workspace_id` is kept for defence in depth."""

    __tablename__ = "chunks"
    __table_args__ = (
        Index("ix_chunks_document_position", "document_id", "position"),
        {"sqlite_autoincrement": True},  # ids are never reused: citations keep meaning one chunk
    )

    # INTEGER PRIMARY KEY on SQLite: the rowid itself.
    id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
    )
    workspace_id: Mapped[uuid.UUID]
    knowledge_base_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("knowledge_bases.id", ondelete="CASCADE"), index=True
    )
    document_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("documents.id", ondelete="CASCADE"))
    position: Mapped[int] = mapped_column(Integer)
    text: Mapped[str] = mapped_column(Text)
    # The document title and heading path, indexed with the text (keyword search finds a
    # chunk by its section's name).
    context: Mapped[str] = mapped_column(Text, default="")
    heading_path: Mapped[list[str]] = mapped_column(JSON, default=list)
    page: Mapped[int | None] = mapped_column(Integer)
    token_count: Mapped[int] = mapped_column(Integer, default=0)
    term_count: Mapped[int] = mapped_column(Integer, default=0)  # BM25 length: sum of its tfs
    # float32, L2-normalised: a BLOB on SQLite, pgvector's `vector` (any dimension) on PG.
    embedding: Mapped[Any] = mapped_column(LargeBinary().with_variant(Vector(), "postgresql"))


class KeywordTerm(Base):
    """A term of a knowledge base's keyword index (see `terms.py`), with its document frequency:
    the number of the knowledge base's chunks that contain it (BM25's df)."""

    __tablename__ = "kb_terms"
    __table_args__ = (UniqueConstraint("knowledge_base_id", "term"),)

    id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
    )
    knowledge_base_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("knowledge_bases.id", ondelete="CASCADE")
    )
    term: Mapped[str] = mapped_column(Text)
    df: Mapped[int] = mapped_column(Integer)
    # Blocks appended to the term's postings so far: its digits in base `index.FANOUT` are how
    # many blocks each level holds, so a write knows which levels to merge without looking.
    appends: Mapped[int] = mapped_column(BigInteger, default=0)


class TermBlock(Base):
    """A block of one term's postings: (chunk id, term frequency, chunk length) records packed
    as `index.POSTING` (16 bytes each), sorted by chunk id. A document's write adds one small
    block per term; blocks of a term merge `index.FANOUT` at a time into one of the next level,
    so a term has a few blocks per level and its postings are read in a few rows. Postings of
    deleted chunks stay until their block merges (search skips them)."""

    __tablename__ = "term_blocks"
    __table_args__ = (Index("ix_term_blocks_term_level", "term_id", "level"),)

    id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
    )
    term_id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer, "sqlite"),
        ForeignKey("kb_terms.id", ondelete="CASCADE"),
    )
    level: Mapped[int] = mapped_column(Integer)
    count: Mapped[int] = mapped_column(Integer)
    postings: Mapped[bytes] = mapped_column(LargeBinary)
