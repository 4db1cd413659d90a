"""The rules of files: size and quota limits enforced while the bytes stream, content types
sniffed from the bytes, names kept for display only, and no blob without its row.

An upload is three steps, so that the caller can end its transaction while the bytes stream
(on SQLite a write transaction holds the database's only write lock):

1. `space_left` reads how much the workspace may still store;
2. `store_content` streams the bytes into the blob store, hashing, sniffing and counting
   them, and fails (leaving nothing) past the limit it is given;
3. `record_file` re-checks the quota under a lock on the workspace and adds the row; if that
   fails the blob is deleted.

`add_file` does the three in one for other domains, which read a file's bytes with
`open_content`. Services flush but never commit.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
import uuid
from collections.abc import AsyncIterable, AsyncIterator, Sequence
from dataclasses import dataclass

import structlog
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from heron.core.errors import NotFound, PayloadTooLarge
from heron.core.ids import new_id
from heron.core.pagination import PageParams
from heron.db.session import after_commit
from heron.files.models import NAME_MAX, File
from heron.files.repository import FileRepository
from heron.files.sniffing import Sniffer
from heron.files.storage import BlobNotFound, BlobStore, blob_key
from heron.settings import Settings
from heron.tenancy.models import Workspace

log = structlog.get_logger("heron.files")


class FileTooLarge(PayloadTooLarge):
    slug, title = "file-too-large", "File too large"


class QuotaExceeded(PayloadTooLarge):
    slug, title = "storage-quota-exceeded", "Storage quota exceeded"


@dataclass(frozen=True)
class FileLimits:
    max_file_bytes: int
    workspace_quota_bytes: int

    @classmethod
    def from_settings(cls, settings: Settings) -> FileLimits:
        return cls(settings.storage.max_file_bytes, settings.storage.workspace_quota_bytes)


@dataclass(frozen=True)
class StoredContent:
    """Bytes now in the blob store under `key`, not yet recorded as a file."""

    workspace_id: uuid.UUID
    file_id: uuid.UUID
    key: str
    size: int
    sha256: str
    content_type: str


# Names ------------------------------------------------------------------------------------------

_UNSAFE_CATEGORIES = {"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"}
_SUFFIX = re.compile(r"\.[A-Za-z0-9]{1,16}$")


def display_name(raw: str) -> str:
    """A client's file name made safe to show and to send back in a header: the last path
    component only, without control, format (bidirectional overrides, zero-width) or
    unassigned characters, at most NAME_MAX characters with its extension kept."""
    text = unicodedata.normalize("NFC", raw)
    text = "".join(" " if c.isspace() else c for c in text)
    text = "".join(c for c in text if unicodedata.category(c) not in _UNSAFE_CATEGORIES)
    text = re.split(r"[/\\]", text)[-1].strip()
    text = re.sub(r" {2,}", " ", text)
    if not text.strip("."):
        return "unnamed"
    if len(text) > NAME_MAX:
        suffix = _SUFFIX.search(text)
        keep = suffix.group(0) if suffix else ""
        text = text[: NAME_MAX - len(keep)].rstrip() + keep
    return text


# Uploading --------------------------------------------------------------------------------------


async def space_left(session: AsyncSession, workspace_id: uuid.UUID, limits: FileLimits) -> int:
    """Bytes the workspace may still store (0 when it is at or past its quota)."""
    used = await FileRepository(session, workspace_id).total_size()
    return max(0, limits.workspace_quota_bytes - used)


def check_declared_size(declared: int, limits: FileLimits, space: int) -> None:
    """Refuse at once an upload whose content can only be larger than allowed; `declared` is
    at least the content's size (a request's Content-Length less its form overhead)."""
    if declared > limits.max_file_bytes:
        raise _file_too_large(limits)
    if declared > space:
        raise _over_quota(limits, space)


async def store_content(
    blobs: BlobStore,
    workspace_id: uuid.UUID,
    chunks: AsyncIterable[bytes],
    limits: FileLimits,
    space: int,
) -> StoredContent:
    """Stream `chunks` into the blob store, at most min(max file size, `space`) bytes. Raises
    FileTooLarge or QuotaExceeded past that, after the store has discarded what it got."""
    file_id = new_id()
    key = blob_key(workspace_id, file_id)
    limit = min(limits.max_file_bytes, space)
    digest = hashlib.sha256()
    sniffer = Sniffer()

    async def counted() -> AsyncIterator[bytes]:
        async for chunk in chunks:
            sniffer.feed(chunk)
            if sniffer.size > limit:
                if limit == limits.max_file_bytes:
                    raise _file_too_large(limits)
                raise _over_quota(limits, space)
            digest.update(chunk)
            yield chunk

    await blobs.put(key, counted())
    return StoredContent(
        workspace_id=workspace_id,
        file_id=file_id,
        key=key,
        size=sniffer.size,
        sha256=digest.hexdigest(),
        content_type=sniffer.content_type(),
    )


async def record_file(
    session: AsyncSession,
    blobs: BlobStore,
    limits: FileLimits,
    stored: StoredContent,
    *,
    name: str,
    created_by: uuid.UUID | None,
) -> File:
    """Add the row of stored content, within the quota; the blob is deleted if this fails."""
    try:
        # Uploads to one workspace finish one at a time, so two can't both fit the last space
        # (FOR UPDATE on PostgreSQL; SQLite's write transactions are serialized already).
        await session.execute(
            select(Workspace.id).where(Workspace.id == stored.workspace_id).with_for_update()
        )
        space = await space_left(session, stored.workspace_id, limits)
        if stored.size > space:
            raise _over_quota(limits, space)
        row = FileRepository(session, stored.workspace_id).add(
            File(
                id=stored.file_id,
                name=display_name(name),
                size=stored.size,
                content_type=stored.content_type,
                sha256=stored.sha256,
                created_by=created_by,
            )
        )
        await session.flush()
    except BaseException:
        await discard(blobs, stored)
        raise
    return row


async def add_file(
    session: AsyncSession,
    blobs: BlobStore,
    limits: FileLimits,
    workspace_id: uuid.UUID,
    chunks: AsyncIterable[bytes],
    *,
    name: str,
    created_by: uuid.UUID | None,
) -> File:
    """The three steps in one, for callers other than the upload endpoint (content fetched
    from a URL, text given inline). The session's transaction stays open while the bytes
    stream: on SQLite, where that holds the write lock, keep such content small."""
    space = await space_left(session, workspace_id, limits)
    stored = await store_content(blobs, workspace_id, chunks, limits, space)
    return await record_file(session, blobs, limits, stored, name=name, created_by=created_by)


async def discard(blobs: BlobStore, stored: StoredContent) -> None:
    """Delete stored content whose row will not exist (the row's transaction failed)."""
    await blobs.delete(stored.key)


def _file_too_large(limits: FileLimits) -> FileTooLarge:
    return FileTooLarge(
        f"The file exceeds the limit of {limits.max_file_bytes} bytes per file.",
        limit=limits.max_file_bytes,
    )


def _over_quota(limits: FileLimits, space: int) -> QuotaExceeded:
    return QuotaExceeded(
        f"The workspace's files may take {limits.workspace_quota_bytes} bytes in all; "
        f"{space} are left.",
        quota=limits.workspace_quota_bytes,
        available=space,
    )


# Reading and deleting ---------------------------------------------------------------------------


async def list_files(
    session: AsyncSession, workspace_id: uuid.UUID, params: PageParams
) -> Sequence[File]:
    return await FileRepository(session, workspace_id).page(params)


async def get_file(session: AsyncSession, workspace_id: uuid.UUID, file_id: uuid.UUID) -> File:
    """The file's row; NotFound when the workspace has no such file."""
    return await FileRepository(session, workspace_id).get_or_404(file_id)


async def open_content(
    session: AsyncSession, blobs: BlobStore, workspace_id: uuid.UUID, file_id: uuid.UUID
) -> tuple[File, AsyncIterator[bytes]]:
    """The file's row and its bytes, in chunks of about 1 MiB; NotFound when the workspace
    has no such file (or its content is gone from the store)."""
    row = await get_file(session, workspace_id, file_id)
    try:
        chunks = await blobs.get(blob_key(workspace_id, file_id))
    except BlobNotFound:
        log.error("file_content_missing", file_id=str(file_id), workspace_id=str(workspace_id))
        raise NotFound(f"The content of file {file_id} is missing from storage.") from None
    return row, chunks


async def delete_file(
    session: AsyncSession, blobs: BlobStore, workspace_id: uuid.UUID, file_id: uuid.UUID
) -> None:
    """Delete the row now and the blob once the transaction commits (a rollback keeps both)."""
    repo = FileRepository(session, workspace_id)
    row = await repo.get_or_404(file_id)
    await repo.delete(row)
    key = blob_key(workspace_id, file_id)
    after_commit(session, lambda: blobs.delete(key))


def delete_workspace_files(
    session: AsyncSession, blobs: BlobStore, workspace_id: uuid.UUID
) -> None:
    """Once the transaction deleting a workspace commits (its file rows go by cascade), delete
    its blobs too."""
    after_commit(session, lambda: blobs.delete_under(str(workspace_id)))
