"""The blob store seam: where file contents live, by key, streamed both ways.

Two implementations, chosen by `HERON_STORAGE_URL`: a directory (the embedded default, under
HERON_HOME) and an S3-compatible bucket. Keys are built by Heron from ids only
(`<workspace id>/<file id>`); nothing a client sends ever becomes part of a path.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import uuid
from collections.abc import AsyncIterable, AsyncIterator, Iterator
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Protocol

import structlog

from heron.core.errors import ServiceUnavailable
from heron.settings import Settings

log = structlog.get_logger("heron.files.storage")

if TYPE_CHECKING:
    from obstore.store import ClientConfig, S3Config, S3Store

# Local reads and writes move this much per thread hop; S3 parts are this size (S3's minimum
# part is 5 MiB), at most two in flight: memory per upload stays around 10 MiB.
LOCAL_CHUNK = 1024 * 1024
S3_PART = 5 * 1024 * 1024
S3_CONCURRENCY = 2
_KEY = re.compile(r"^[A-Za-z0-9_-]+(/[A-Za-z0-9_-]+)*$")


class BlobNotFound(Exception):
    """No blob is stored under the key."""


class StorageUnavailable(ServiceUnavailable):
    """The blob store failed (a full disk, an unreachable or refusing bucket)."""

    slug, title = "storage-unavailable", "Storage unavailable"


class BlobStore(Protocol):
    """Stores byte streams by key. A put is atomic: a reader sees the whole blob or none, and a
    put whose source fails (or is cancelled) leaves nothing behind."""

    async def put(self, key: str, chunks: AsyncIterable[bytes]) -> None: ...

    async def get(self, key: str) -> AsyncIterator[bytes]:
        """The blob's bytes in chunks; raises BlobNotFound before the first one."""
        ...

    async def delete(self, key: str) -> None:
        """Remove the blob; nothing happens when there is none."""
        ...

    async def exists(self, key: str) -> bool: ...

    async def delete_under(self, prefix: str) -> None:
        """Remove every blob whose key starts with `prefix/` (a workspace's, say)."""
        ...

    async def close(self) -> None: ...


def blob_key(workspace_id: uuid.UUID, file_id: uuid.UUID) -> str:
    return f"{workspace_id}/{file_id}"


def _checked(key: str) -> str:
    if not _KEY.match(key):
        raise ValueError(f"not a blob key: {key!r}")
    return key


def open_blob_store(settings: Settings) -> BlobStore:
    """The blob store the settings name."""
    url = settings.storage.url
    if url is not None and url.startswith("s3://"):
        storage = settings.storage
        secret = storage.s3_secret_access_key
        return S3BlobStore(
            url,
            endpoint=storage.s3_endpoint,
            region=storage.s3_region,
            access_key_id=storage.s3_access_key_id,
            secret_access_key=secret.get_secret_value() if secret else None,
        )
    directory = settings.storage_dir
    assert directory is not None
    return LocalBlobStore(directory)


class LocalBlobStore:
    """Blobs as files in a directory: written to a temporary file beside the target, flushed to
    disk, then renamed into place, so a crash never leaves a partial blob under a real key."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def path_of(self, key: str) -> Path:
        return self.root / _checked(key)

    async def put(self, key: str, chunks: AsyncIterable[bytes]) -> None:
        target = self.path_of(key)
        await asyncio.to_thread(target.parent.mkdir, parents=True, exist_ok=True)
        temporary = target.with_name(f".{target.name}.{uuid.uuid4().hex}.part")
        file = await asyncio.to_thread(open, temporary, "xb")
        try:
            buffer = bytearray()
            async for chunk in chunks:
                buffer += chunk
                if len(buffer) >= LOCAL_CHUNK:
                    await asyncio.to_thread(file.write, bytes(buffer))
                    buffer.clear()
            if buffer:
                await asyncio.to_thread(file.write, bytes(buffer))
            await asyncio.to_thread(_sync_and_close, file)
            await asyncio.to_thread(os.replace, temporary, target)
            await asyncio.to_thread(_sync_directory, target.parent)
        except BaseException as exc:
            # Synchronous on purpose: this also runs when the task is being cancelled.
            file.close()
            with contextlib.suppress(FileNotFoundError):
                temporary.unlink()
            if isinstance(exc, OSError):
                raise StorageUnavailable(f"Writing the file failed: {exc.strerror}.") from exc
            raise

    async def get(self, key: str) -> AsyncIterator[bytes]:
        try:
            file = await asyncio.to_thread(open, self.path_of(key), "rb")
        except FileNotFoundError:
            raise BlobNotFound(key) from None
        return _read_file(file)

    async def delete(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            await asyncio.to_thread(self.path_of(key).unlink)

    async def exists(self, key: str) -> bool:
        return await asyncio.to_thread(self.path_of(key).is_file)

    async def delete_under(self, prefix: str) -> None:
        await asyncio.to_thread(shutil.rmtree, self.path_of(prefix), ignore_errors=True)

    async def close(self) -> None:
        return None


def _sync_and_close(file: IO[bytes]) -> None:
    file.flush()
    os.fsync(file.fileno())
    file.close()


def _sync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


async def _read_file(file: IO[bytes]) -> AsyncIterator[bytes]:
    try:
        while chunk := await asyncio.to_thread(file.read, LOCAL_CHUNK):
            yield chunk
    finally:
        file.close()


class S3BlobStore:
    """Blobs as objects of an S3-compatible bucket, through obstore. Uploads are multipart in
    `S3_PART` pieces, so memory stays bounded whatever the size; a failed upload is aborted."""

    def __init__(
        self,
        url: str,
        *,
        endpoint: str | None = None,
        region: str | None = None,
        access_key_id: str | None = None,
        secret_access_key: str | None = None,
    ) -> None:
        from obstore.store import S3Store

        bucket, _, prefix = url.removeprefix("s3://").partition("/")
        config: S3Config = {}
        if endpoint:
            config["endpoint"] = endpoint
        if region:
            config["region"] = region
        if access_key_id:
            config["access_key_id"] = access_key_id
        if secret_access_key:
            config["secret_access_key"] = secret_access_key
        client_options: ClientConfig | None = (
            {"allow_http": True} if endpoint and endpoint.startswith("http:") else None
        )
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.store: S3Store = S3Store(
            bucket, prefix=self.prefix or None, config=config, client_options=client_options
        )

    async def put(self, key: str, chunks: AsyncIterable[bytes]) -> None:
        import obstore

        # An error raised by `chunks` comes out as itself, after the upload was aborted.
        with _s3_errors(not_found_is_missing=False):
            await obstore.put_async(
                self.store,
                _checked(key),
                chunks,
                chunk_size=S3_PART,
                max_concurrency=S3_CONCURRENCY,
            )

    async def get(self, key: str) -> AsyncIterator[bytes]:
        import obstore
        from obstore.exceptions import NotFoundError

        try:
            with _s3_errors():
                result = await obstore.get_async(self.store, _checked(key))
        except (NotFoundError, FileNotFoundError):
            raise BlobNotFound(key) from None
        return _read_stream(result.stream(min_chunk_size=LOCAL_CHUNK))

    async def delete(self, key: str) -> None:
        import obstore
        from obstore.exceptions import NotFoundError

        with _s3_errors(), contextlib.suppress(NotFoundError, FileNotFoundError):
            await obstore.delete_async(self.store, _checked(key))

    async def exists(self, key: str) -> bool:
        import obstore
        from obstore.exceptions import NotFoundError

        try:
            with _s3_errors():
                await obstore.head_async(self.store, _checked(key))
        except (NotFoundError, FileNotFoundError):
            return False
        return True

    async def delete_under(self, prefix: str) -> None:
        import obstore

        with _s3_errors(not_found_is_missing=False):
            stream = obstore.list(self.store, prefix=_checked(prefix), chunk_size=1000)
            async for batch in stream:
                await obstore.delete_async(self.store, [meta["path"] for meta in batch])

    async def close(self) -> None:
        return None


@contextlib.contextmanager
def _s3_errors(*, not_found_is_missing: bool = True) -> Iterator[None]:
    """obstore's failures as StorageUnavailable; a 404 stays NotFoundError where it means a
    missing object (where it can only mean a missing bucket, it is a failure too)."""
    from obstore.exceptions import BaseError, NotFoundError

    try:
        yield
    except (NotFoundError, FileNotFoundError) as exc:
        if not_found_is_missing:
            raise
        log.error("blob_store_failed", error=str(exc))
        raise StorageUnavailable("The file storage failed; the server log says why.") from exc
    except BaseError as exc:
        log.error("blob_store_failed", error=str(exc))
        raise StorageUnavailable("The file storage failed; the server log says why.") from exc


async def _read_stream(stream: AsyncIterable[Any]) -> AsyncIterator[bytes]:
    async for chunk in stream:
        yield bytes(chunk)
