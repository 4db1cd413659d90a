"""Request and response bodies of knowledge bases, documents, progress and search."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import Field, StringConstraints, model_validator

from heron.core.netguard import MAX_URL_LENGTH
from heron.core.schemas import RequestModel, ResponseModel
from heron.knowledge.models import LOCAL_MODEL, DocumentStatus, SourceKind

KnowledgeBaseName = Annotated[
    str,
    StringConstraints(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9][A-Za-z0-9 ._-]*$"),
    Field(description="Unique in the workspace; letters, digits, space, `.`, `_`, `-`."),
]
MetadataValue = str | int | float | bool | None | list[str | int | float | bool | None]
Metadata = Annotated[
    dict[Annotated[str, StringConstraints(min_length=1, max_length=64)], MetadataValue],
    Field(max_length=64, description="Up to 64 keys; values are scalars or lists of scalars."),
]
ChunkSize = Annotated[int, Field(ge=64, le=8192, description="Tokens per chunk, at most.")]
ChunkOverlap = Annotated[
    int, Field(ge=0, le=2048, description="Tokens repeated from the end of the previous chunk.")
]


class KnowledgeBaseCreate(RequestModel):
    name: KnowledgeBaseName
    description: Annotated[str, StringConstraints(max_length=2000)] = ""
    embedding_model: Annotated[
        str,
        StringConstraints(min_length=3, max_length=300, pattern=r"^[^:\s]+:\S+$"),
        Field(
            description=f"`{LOCAL_MODEL}` (the default: offline, 384 dimensions) or "
            "`<provider>:<model>` naming an OpenAI-compatible provider of the workspace. "
            "Fixed once the knowledge base exists."
        ),
    ] = LOCAL_MODEL
    embedding_dimensions: Annotated[
        int | None,
        Field(
            ge=1,
            le=16000,
            description="The provider model's output size (required with a provider model).",
        ),
    ] = None
    chunk_size: ChunkSize = 512
    chunk_overlap: ChunkOverlap = 64

    @model_validator(mode="after")
    def _overlap_below_size(self) -> KnowledgeBaseCreate:
        if self.chunk_overlap > self.chunk_size // 2:
            raise ValueError("chunk_overlap must be at most half of chunk_size")
        return self


class KnowledgeBaseUpdate(RequestModel):
    """Only the fields given change. New chunking settings apply to documents ingested (or
    re-ingested) afterwards."""

    name: KnowledgeBaseName | None = None
    description: Annotated[str, StringConstraints(max_length=2000)] | None = None
    chunk_size: ChunkSize | None = None
    chunk_overlap: ChunkOverlap | None = None


class KnowledgeBaseOut(ResponseModel):
    id: uuid.UUID
    name: str
    description: str
    embedding_model: str
    embedding_dimensions: int
    chunk_size: int
    chunk_overlap: int
    chunk_count: int = Field(description="Chunks searchable now.")
    created_at: datetime
    updated_at: datetime


class DocumentCreate(RequestModel):
    """Exactly one source: `file_id` (an uploaded file), `url` (fetched by the ingestion, as
    `http_fetch` would: private addresses only if the workspace allows them), or `text`."""

    file_id: uuid.UUID | None = None
    url: Annotated[str, StringConstraints(min_length=1, max_length=MAX_URL_LENGTH)] | None = None
    text: Annotated[str, StringConstraints(min_length=1, strip_whitespace=False)] | None = None
    title: Annotated[str, StringConstraints(max_length=500)] | None = None
    metadata: Metadata = Field(default_factory=dict)

    @model_validator(mode="after")
    def _one_source(self) -> DocumentCreate:
        given = [name for name in ("file_id", "url", "text") if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of file_id, url and text")
        return self

    @property
    def source(self) -> SourceKind:
        if self.file_id is not None:
            return SourceKind.file
        return SourceKind.url if self.url is not None else SourceKind.text


class DocumentBatch(RequestModel):
    documents: Annotated[list[DocumentCreate], Field(min_length=1, max_length=1000)]


class DocumentOut(ResponseModel):
    id: uuid.UUID
    knowledge_base_id: uuid.UUID
    source: SourceKind
    file_id: uuid.UUID | None
    url: str | None
    title: str
    metadata: dict[str, Any] = Field(validation_alias="meta")
    status: DocumentStatus
    error: str | None = Field(description="Why the document failed.")
    truncated: bool = Field(description="The content was cut at a size limit.")
    content_type: str | None
    content_sha256: str | None
    chunks_done: int
    chunks_total: int
    attempts: int
    indexed_at: datetime | None
    created_at: datetime
    updated_at: datetime


class DocumentList(ResponseModel):
    items: list[DocumentOut]


class Progress(ResponseModel):
    knowledge_base_id: uuid.UUID
    documents_total: int
    documents_done: int = Field(description="Ready or failed.")
    chunks_total: int
    chunks_done: int
    by_status: dict[DocumentStatus, int]
    in_progress: bool = Field(description="Some document is queued, parsing or embedding.")


SearchMode = Literal["hybrid", "vector", "keyword"]
FilterValue = str | int | float | bool | None
Filters = Annotated[
    dict[
        Annotated[str, StringConstraints(min_length=1, max_length=64)],
        FilterValue | Annotated[list[FilterValue], Field(min_length=1, max_length=100)],
    ],
    Field(
        max_length=16,
        description="Document metadata that results must have: `{key: value}` for equality, "
        "`{key: [v1, v2]}` for any of them; all keys must match. A document whose value is a "
        "list matches when any element does.",
    ),
]


class SearchRequest(RequestModel):
    query: Annotated[str, StringConstraints(min_length=1, max_length=4000)]
    top_k: Annotated[int, Field(ge=1, le=100)] = 10
    mode: SearchMode = "hybrid"
    filters: Filters = Field(default_factory=dict)


class MultiSearchRequest(SearchRequest):
    knowledge_bases: Annotated[
        list[uuid.UUID], Field(min_length=1, max_length=20, description="Knowledge base ids.")
    ]


class SearchResult(ResponseModel):
    chunk_id: int
    text: str
    score: float = Field(
        description="Cosine similarity (vector), BM25 (keyword) or fused rank score (hybrid)."
    )
    knowledge_base_id: uuid.UUID
    document_id: uuid.UUID
    document_title: str
    page: int | None
    heading_path: list[str]
    position: int
    metadata: dict[str, Any] = Field(description="The document's metadata.")


class SearchResponse(ResponseModel):
    results: list[SearchResult]
    mode: SearchMode
