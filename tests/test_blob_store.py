"""The blob store seam: the same tests against both stores, a directory and a real
S3-protocol server (moto) on loopback."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from conftest import Leftovers, S3Server
from filekinds import agen, random_chunks
from heron.files.storage import (
    BlobNotFound,
    BlobStore,
    LocalBlobStore,
    S3BlobStore,
    StorageUnavailable,
)

MiB = 1024 * 1024


@pytest.fixture
def blobs(
    store_kind: str, s3_bucket: str | None, tmp_path: Path, request: pytest.FixtureRequest
) -> BlobStore:
    if store_kind == "local":
        return LocalBlobStore(tmp_path / "blobs")
    server: S3Server = request.getfixturevalue("s3_server")
    return S3BlobStore(
        f"s3://{s3_bucket}/some/prefix",
        endpoint=server.endpoint,
        region="us-east-1",
        access_key_id="heron-test",
        secret_access_key="heron-test-secret",
    )


async def read_all(blobs: BlobStore, key: str) -> bytes:
    return b"".join([chunk async for chunk in await blobs.get(key)])


class SourceFailed(Exception):
    pass


async def test_store_round_trips_a_multi_part_stream(blobs: BlobStore) -> None:
    expected = b"".join(random_chunks(12 * MiB + 123))  # more than two S3 parts
    await blobs.put("ws/one", agen(random_chunks(12 * MiB + 123)))
    assert await blobs.exists("ws/one")
    assert (
        hashlib.sha256(await read_all(blobs, "ws/one")).digest()
        == hashlib.sha256(expected).digest()
    )
    await blobs.put("ws/one", agen(iter([b"replaced"])))
    assert await read_all(blobs, "ws/one") == b"replaced"
    await blobs.put("ws/empty", agen(iter([])))
    assert await read_all(blobs, "ws/empty") == b""


async def test_store_keeps_nothing_of_a_put_whose_source_fails(
    blobs: BlobStore, leftovers: Leftovers
) -> None:
    async def failing() -> AsyncIterator[bytes]:
        for chunk in random_chunks(11 * MiB):
            yield chunk
        raise SourceFailed("the client went away")

    with pytest.raises(SourceFailed):
        await blobs.put("ws/broken", failing())
    assert not await blobs.exists("ws/broken")
    assert leftovers() == []


async def test_store_answers_missing_blobs_before_streaming(blobs: BlobStore) -> None:
    with pytest.raises(BlobNotFound):
        await blobs.get("ws/never")
    assert not await blobs.exists("ws/never")
    await blobs.delete("ws/never")  # deleting what isn't there is fine
    await blobs.put("ws/gone", agen(iter([b"x"])))
    await blobs.delete("ws/gone")
    assert not await blobs.exists("ws/gone")
    with pytest.raises(BlobNotFound):
        await blobs.get("ws/gone")


async def test_store_deletes_everything_under_a_prefix_and_nothing_else(
    blobs: BlobStore,
) -> None:
    for key in ("ws1/a", "ws1/b", "ws10/c", "ws2/d"):
        await blobs.put(key, agen(iter([key.encode()])))
    await blobs.delete_under("ws1")
    assert [await blobs.exists(k) for k in ("ws1/a", "ws1/b", "ws10/c", "ws2/d")] == [
        False,
        False,
        True,
        True,
    ]
    await blobs.delete_under("ws-none")  # nothing there: fine


async def test_an_unusable_bucket_is_a_storage_error_not_a_crash(s3_server: S3Server) -> None:
    blobs = S3BlobStore(
        "s3://no-such-bucket-here/x",
        endpoint=s3_server.endpoint,
        region="us-east-1",
        access_key_id="heron-test",
        secret_access_key="heron-test-secret",
    )
    with pytest.raises(StorageUnavailable):
        await blobs.put("ws/a", agen(iter([b"x"])))
    with pytest.raises(StorageUnavailable):
        await blobs.delete_under("ws")


@pytest.mark.parametrize(
    "key", ["../escape", "/etc/passwd", "a/../../b", "a/./b", "a//b", "a\\b", ""]
)
async def test_store_refuses_keys_that_are_not_plain_ids(blobs: BlobStore, key: str) -> None:
    with pytest.raises(ValueError, match="not a blob key"):
        await blobs.put(key, agen(iter([b"x"])))
