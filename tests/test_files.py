"""Files: the blob store seam on both stores (a directory and a real S3-protocol server on
loopback), and the file API on top of each: streamed uploads and downloads, sniffed content
types, size and quota limits that leave nothing behind, hostile names, roles and isolation."""

from __future__ import annotations

import hashlib
import json
import random
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import func, select

import filekinds
from conftest import TEST_SECRET, S3Server, Tenant, key_for, make_settings
from heron.app import create_app
from heron.db.engine import Database
from heron.files.models import File
from heron.files.router import content_disposition
from heron.files.service import display_name
from heron.files.sniffing import DOCX, HEAD_BYTES, PPTX, XLSX, Sniffer
from heron.files.storage import BlobNotFound, BlobStore, LocalBlobStore, S3BlobStore
from heron.settings import Settings, StorageSettings
from heron.tenancy.models import Role

MiB = 1024 * 1024
MAX_FILE = 6 * MiB
QUOTA = 16 * MiB
BOUNDARY = "heron-test-boundary-7d1f"


# Stores -----------------------------------------------------------------------------------------


@pytest.fixture(params=["local", "s3"])
def store_kind(request: pytest.FixtureRequest) -> str:
    kind: str = request.param
    return kind


@pytest.fixture
def s3_bucket(store_kind: str, request: pytest.FixtureRequest) -> str | None:
    if store_kind != "s3":
        return None
    server: S3Server = request.getfixturevalue("s3_server")
    return server.create_bucket()


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


class Leftovers:
    """Everything a store holds, to check that a failure left nothing behind."""

    def __init__(self, store_kind: str, root: Path, server: S3Server | None, bucket: str | None):
        self.store_kind, self.root, self.server, self.bucket = store_kind, root, server, bucket

    def __call__(self) -> list[str]:
        if self.store_kind == "local":
            if not self.root.exists():
                return []
            return sorted(
                str(p.relative_to(self.root)) for p in self.root.rglob("*") if p.is_file()
            )
        assert self.server is not None
        assert self.bucket is not None
        unfinished = self.server.unfinished_uploads(self.bucket)
        return sorted(self.server.keys(self.bucket)) + [f"upload:{u}" for u in unfinished]


@pytest.fixture
def leftovers(
    store_kind: str, s3_bucket: str | None, tmp_path: Path, request: pytest.FixtureRequest
) -> Leftovers:
    server = request.getfixturevalue("s3_server") if store_kind == "s3" else None
    return Leftovers(store_kind, tmp_path / "blobs", server, s3_bucket)


def random_chunks(total: int, chunk: int = 256 * 1024, seed: int = 3) -> Iterator[bytes]:
    rng = random.Random(seed)
    sent = 0
    while sent < total:
        size = min(chunk, total - sent)
        yield rng.randbytes(size)
        sent += size


async def agen(chunks: Iterator[bytes]) -> AsyncIterator[bytes]:
    for chunk in chunks:
        yield chunk


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


@pytest.mark.parametrize(
    "key", ["../escape", "/etc/passwd", "a/../../b", "a/./b", "a//b", "a\\b", ""]
)
async def test_store_refuses_keys_that_are_not_plain_ids(blobs: BlobStore, key: str) -> None:
    with pytest.raises(ValueError, match="not a blob key"):
        await blobs.put(key, agen(iter([b"x"])))


# Sniffing ---------------------------------------------------------------------------------------


def sniffed(data: bytes, chunk: int = 1000) -> str:
    sniffer = Sniffer()
    for i in range(0, len(data), chunk):
        sniffer.feed(data[i : i + chunk])
    return sniffer.content_type()


SAMPLES: dict[str, tuple[bytes, str]] = {
    "pdf": (filekinds.pdf(), "application/pdf"),
    "docx": (filekinds.docx(), DOCX),
    "xlsx": (filekinds.xlsx(), XLSX),
    "pptx": (filekinds.pptx(), PPTX),
    "zip": (filekinds.plain_zip(), "application/zip"),
    "png": (filekinds.png(), "image/png"),
    "gif": (filekinds.GIF, "image/gif"),
    "jpeg": (filekinds.JPEG_HEAD + b"\x00" * 100, "image/jpeg"),
    "utf8": ("Grüße aus Köln — 世界\nline two\n".encode(), "text/plain; charset=utf-8"),
    "utf8-bom": ("\ufeffhello\n".encode(), "text/plain; charset=utf-8"),
    "markdown": (
        b"# Title\n\nSome text with a [link](https://example.com).\n\n- one\n- two\n",
        "text/markdown; charset=utf-8",
    ),
    "csv": (b'name,age,city\nalice,30,Paris\nbob,41,"Rio, BR"\n', "text/csv; charset=utf-8"),
    "tsv": (b"name\tage\nalice\t30\n", "text/tab-separated-values; charset=utf-8"),
    "json": (json.dumps({"a": [1, 2], "b": "é"}).encode(), "application/json; charset=utf-8"),
    "html": (
        b"<!DOCTYPE html><html><body><script>alert(1)</script></body></html>",
        "text/html; charset=utf-8",
    ),
    "latin-1": ("café au lait, crème brûlée\n".encode("latin-1"), "text/plain"),
    "garbage": (filekinds.garbage(), "application/octet-stream"),
    "empty": (b"", "text/plain; charset=utf-8"),
}


@pytest.mark.parametrize("kind", SAMPLES)
def test_sniffer_tells_kinds_apart_by_their_bytes(kind: str) -> None:
    data, expected = SAMPLES[kind]
    assert sniffed(data) == expected
    assert sniffed(data, chunk=1) == expected


def test_sniffer_reads_a_large_docx_from_its_central_directory() -> None:
    data = filekinds.docx(media_bytes=3 * HEAD_BYTES)  # its parts are not all in the head
    assert len(data) > 3 * HEAD_BYTES
    assert sniffed(data, chunk=65536) == DOCX


def test_sniffer_does_not_hold_a_character_cut_at_the_head_against_the_text() -> None:
    text = ("a" * (HEAD_BYTES - 1) + "é" + "more text\n" * 1000).encode()
    assert text[HEAD_BYTES - 1 : HEAD_BYTES + 1] == "é".encode()
    assert sniffed(text, chunk=4096) == "text/plain; charset=utf-8"
    big_markdown = ("## Section\n\nParagraph text.\n\n" * 20_000).encode()
    assert sniffed(big_markdown, chunk=65536) == "text/markdown; charset=utf-8"
    big_json = ("[" + ",".join(['{"n": 1}'] * 50_000) + "]").encode()
    assert sniffed(big_json, chunk=65536) == "application/json; charset=utf-8"


def test_sniffer_keeps_bounded_memory() -> None:
    sniffer = Sniffer()
    for chunk in random_chunks(20 * MiB, chunk=64 * 1024):
        sniffer.feed(chunk)
        assert len(sniffer.head) <= HEAD_BYTES
        assert len(sniffer._tail) <= 3 * 128 * 1024
    assert sniffer.size == 20 * MiB


# Names ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "shown"),
    [
        ("../../etc/passwd", "passwd"),
        ("C:\\Users\\me\\report.pdf", "report.pdf"),
        ("invoice\u202egpj.exe", "invoicegpj.exe"),
        ("a\x00b\r\n.txt", "ab .txt"),
        ("zero\u200bwidth.md", "zerowidth.md"),
        ("..", "unnamed"),
        ("", "unnamed"),
        ("/", "unnamed"),
        ("résumé 2024.pdf", "résumé 2024.pdf"),
    ],
)
def test_display_names_keep_only_what_is_safe_to_show(raw: str, shown: str) -> None:
    assert display_name(raw) == shown


def test_long_names_are_cut_keeping_their_extension() -> None:
    name = display_name("x" * 1000 + ".pdf")
    assert len(name) == 255
    assert name.endswith("xxx.pdf")


def test_content_disposition_encodes_the_name_exactly() -> None:
    header = content_disposition('résumé "final"; 100%.pdf')
    assert header.startswith('attachment; filename="r_sum_ _final__ 100_.pdf"; ')
    assert header.endswith("filename*=UTF-8''" + quote('résumé "final"; 100%.pdf', safe=""))


# The API ----------------------------------------------------------------------------------------


@pytest.fixture
def storage_settings(
    store_kind: str, s3_bucket: str | None, tmp_path: Path, request: pytest.FixtureRequest
) -> StorageSettings:
    limits = {"max_file_bytes": MAX_FILE, "workspace_quota_bytes": QUOTA}
    if store_kind == "local":
        return StorageSettings(url=f"file://{tmp_path / 'blobs'}", **limits)  # type: ignore[arg-type]
    server: S3Server = request.getfixturevalue("s3_server")
    return StorageSettings(
        url=f"s3://{s3_bucket}/some/prefix",
        s3_endpoint=server.endpoint,
        s3_region="us-east-1",
        s3_access_key_id="heron-test",
        s3_secret_access_key="heron-test-secret",  # type: ignore[arg-type]
        **limits,  # type: ignore[arg-type]
    )


@pytest.fixture
def settings(
    tmp_path: Path, database_url: str, scale_out: str | None, storage_settings: StorageSettings
) -> Settings:
    return make_settings(tmp_path, database_url, scale_out, storage=storage_settings)


@pytest.fixture
def app(settings: Settings) -> FastAPI:
    return create_app(settings)


def form(name: bytes | str, content: bytes, claimed: str = "image/png") -> bytes:
    raw_name = name.encode() if isinstance(name, str) else name
    return (
        f"--{BOUNDARY}\r\n".encode()
        + b'Content-Disposition: form-data; name="file"; filename="'
        + raw_name
        + b'"\r\n'
        + f"Content-Type: {claimed}\r\n\r\n".encode()
        + content
        + f"\r\n--{BOUNDARY}--\r\n".encode()
    )


FORM_TYPE = {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}


async def upload(
    client: httpx.AsyncClient, tenant: Tenant, name: str, content: bytes, claimed: str = "image/png"
) -> httpx.Response:
    return await client.post(
        "/api/files", files={"file": (name, content, claimed)}, headers=tenant.headers
    )


async def file_rows(db: Database) -> int:
    async with db.session(write=False) as session:
        return int(await session.scalar(select(func.count()).select_from(File)) or 0)


async def test_upload_and_download_round_trip_a_multi_megabyte_file(
    client: httpx.AsyncClient, alice: Tenant, leftovers: Leftovers
) -> None:
    content = b"".join(random_chunks(5 * MiB + 321))  # more than one S3 part

    async def streamed() -> AsyncIterator[bytes]:  # sent in pieces, no Content-Length
        body = form("data.bin", content, claimed="application/pdf")
        for i in range(0, len(body), 100_000):
            yield body[i : i + 100_000]

    created = await client.post(
        "/api/files", content=streamed(), headers={**alice.headers, **FORM_TYPE}
    )
    assert created.status_code == 201, created.text
    meta = created.json()
    assert meta["name"] == "data.bin"
    assert meta["size"] == len(content)
    assert meta["sha256"] == hashlib.sha256(content).hexdigest()
    assert meta["content_type"] == "application/octet-stream"  # not the claimed PDF
    assert meta["created_by"] == str(alice.user_id)
    uuid.UUID(meta["id"])

    got = await client.get(f"/api/files/{meta['id']}", headers=alice.headers)
    assert got.json() == meta
    digest = hashlib.sha256()
    async with client.stream(
        "GET", f"/api/files/{meta['id']}/content", headers=alice.headers
    ) as response:
        assert response.status_code == 200
        assert response.headers["content-type"] == "application/octet-stream"
        assert response.headers["content-length"] == str(len(content))
        assert response.headers["x-content-type-options"] == "nosniff"
        assert response.headers["content-disposition"] == (
            "attachment; filename=\"data.bin\"; filename*=UTF-8''data.bin"
        )
        async for chunk in response.aiter_bytes():
            digest.update(chunk)
    assert digest.hexdigest() == meta["sha256"]
    # The blob is keyed by ids, nothing else.
    assert [Path(p).name for p in leftovers() if not p.startswith("upload:")] == [meta["id"]]


async def test_content_type_is_sniffed_and_never_taken_from_the_client(
    client: httpx.AsyncClient, alice: Tenant
) -> None:
    for kind in (
        "pdf",
        "docx",
        "xlsx",
        "pptx",
        "png",
        "utf8",
        "markdown",
        "csv",
        "json",
        "html",
        "garbage",
    ):
        data, expected = SAMPLES[kind]
        created = await upload(client, alice, f"sample.{kind}", data, claimed="image/png")
        assert created.status_code == 201, created.text
        assert created.json()["content_type"] == expected, kind
        response = await client.get(
            f"/api/files/{created.json()['id']}/content", headers=alice.headers
        )
        assert response.content == data
        assert response.headers["content-type"] == expected
    # An HTML upload is never rendered as a page of ours.
    assert response.headers["content-disposition"].startswith("attachment;")
    assert "sandbox" in response.headers["content-security-policy"]


async def test_a_file_over_the_size_limit_is_413_and_leaves_nothing(
    client: httpx.AsyncClient, alice: Tenant, db: Database, leftovers: Leftovers
) -> None:
    too_big = form("big.bin", b"".join(random_chunks(MAX_FILE + 1)))

    async def streamed() -> AsyncIterator[bytes]:  # no Content-Length: found while streaming
        for i in range(0, len(too_big), 65536):
            yield too_big[i : i + 65536]

    response = await client.post(
        "/api/files", content=streamed(), headers={**alice.headers, **FORM_TYPE}
    )
    assert response.status_code == 413, response.text
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["type"] == "urn:heron:problem:file-too-large"
    assert response.json()["limit"] == MAX_FILE

    declared = await client.post(
        "/api/files", content=too_big, headers={**alice.headers, **FORM_TYPE}
    )
    assert declared.status_code == 413

    assert await file_rows(db) == 0
    assert leftovers() == []
    listed = await client.get("/api/files", headers=alice.headers)
    assert listed.json() == {"items": [], "next_cursor": None}
    # A file of exactly the limit is fine.
    exact = await upload(client, alice, "exact.bin", b"".join(random_chunks(MAX_FILE)))
    assert exact.status_code == 201, exact.text


async def test_the_workspace_quota_is_413_and_leaves_nothing(
    client: httpx.AsyncClient, alice: Tenant, bob: Tenant, db: Database, leftovers: Leftovers
) -> None:
    kept = []
    for seed in (1, 2):
        created = await upload(
            client, alice, f"f{seed}.bin", b"".join(random_chunks(MAX_FILE, seed=seed))
        )
        assert created.status_code == 201, created.text
        kept.append(created.json()["id"])
    left = QUOTA - 2 * MAX_FILE
    over = b"".join(random_chunks(left + 1, seed=9))

    async def streamed() -> AsyncIterator[bytes]:
        body = form("over.bin", over)
        for i in range(0, len(body), 65536):
            yield body[i : i + 65536]

    for response in (
        await upload(client, alice, "over.bin", over),  # declared
        await client.post("/api/files", content=streamed(), headers={**alice.headers, **FORM_TYPE}),
    ):
        assert response.status_code == 413, response.text
        problem = response.json()
        assert problem["type"] == "urn:heron:problem:storage-quota-exceeded"
        assert problem["available"] == left
    assert await file_rows(db) == 2
    assert len([p for p in leftovers() if not p.startswith("upload:")]) == 2
    assert not [p for p in leftovers() if p.startswith("upload:")]

    # Another workspace has its own quota; and deleting frees space.
    assert (await upload(client, bob, "bob.bin", over)).status_code == 201
    assert (await client.delete(f"/api/files/{kept[0]}", headers=alice.headers)).status_code == 204
    assert (await upload(client, alice, "over.bin", over)).status_code == 201


async def test_hostile_names_are_kept_for_display_and_never_touch_a_path(
    client: httpx.AsyncClient, alice: Tenant, tmp_path: Path, leftovers: Leftovers
) -> None:
    names = {
        b"../../etc/passwd": "passwd",
        b"..\\..\\windows\\win.ini": "win.ini",
        b"nul\x00byte.txt": "nulbyte.txt",
        "evil\u202etxt.exe".encode(): "eviltxt.exe",
        b"y" * 2000 + b".pdf": "y" * 251 + ".pdf",
        "résumé.pdf".encode(): "résumé.pdf",
        b"..": "unnamed",
    }
    ids = []
    for raw, shown in names.items():
        response = await client.post(
            "/api/files", content=form(raw, b"hello\n"), headers={**alice.headers, **FORM_TYPE}
        )
        assert response.status_code == 201, (raw, response.text)
        assert response.json()["name"] == shown
        ids.append(response.json()["id"])
        download = await client.get(
            f"/api/files/{response.json()['id']}/content", headers=alice.headers
        )
        assert download.headers["content-disposition"] == content_disposition(shown)
        assert download.content == b"hello\n"
    stored = leftovers()
    assert sorted(Path(p).name for p in stored) == sorted(ids)
    assert {Path(p).parent.name for p in stored} == {str(alice.workspace_id)}
    assert not list(tmp_path.rglob("passwd"))
    assert not list(tmp_path.rglob("win.ini"))


async def test_another_workspace_sees_none_of_the_files(
    client: httpx.AsyncClient, alice: Tenant, bob: Tenant
) -> None:
    created = (await upload(client, alice, "secret.txt", b"alice's secret\n")).json()
    for method, path in (
        ("GET", f"/api/files/{created['id']}"),
        ("GET", f"/api/files/{created['id']}/content"),
        ("DELETE", f"/api/files/{created['id']}"),
    ):
        response = await client.request(method, path, headers=bob.headers)
        assert response.status_code == 404, (method, path)
    assert (await client.get("/api/files", headers=bob.headers)).json()["items"] == []
    response = await client.get(f"/api/files/{created['id']}/content", headers=alice.headers)
    assert response.content == b"alice's secret\n"


async def test_delete_removes_the_row_and_the_blob(
    client: httpx.AsyncClient, alice: Tenant, db: Database, leftovers: Leftovers
) -> None:
    created = (await upload(client, alice, "doomed.txt", b"bye\n")).json()
    assert len(leftovers()) == 1
    assert (
        await client.delete(f"/api/files/{created['id']}", headers=alice.headers)
    ).status_code == 204
    assert leftovers() == []
    assert await file_rows(db) == 0
    assert (
        await client.get(f"/api/files/{created['id']}", headers=alice.headers)
    ).status_code == 404
    again = await client.delete(f"/api/files/{created['id']}", headers=alice.headers)
    assert again.status_code == 404


async def test_deleting_a_workspace_deletes_its_files_content(
    client: httpx.AsyncClient, alice: Tenant, bob: Tenant, db: Database, leftovers: Leftovers
) -> None:
    for tenant in (alice, alice, bob):
        assert (await upload(client, tenant, "x.txt", b"x\n")).status_code == 201
    assert len(leftovers()) == 3
    deleted = await client.delete(f"/api/workspaces/{alice.workspace_id}", headers=alice.headers)
    assert deleted.status_code == 204
    assert [Path(p).parent.name for p in leftovers()] == [str(bob.workspace_id)]
    assert await file_rows(db) == 1


async def test_viewers_read_files_and_members_upload_and_delete(
    client: httpx.AsyncClient, alice: Tenant, db: Database
) -> None:
    viewer = {"Authorization": f"Bearer {await key_for(db, alice, Role.viewer)}"}
    member = {"Authorization": f"Bearer {await key_for(db, alice, Role.member)}"}
    files = {"file": ("a.txt", b"a\n", "text/plain")}
    refused = await client.post("/api/files", files=files, headers=viewer)
    assert refused.status_code == 403
    created = await client.post("/api/files", files=files, headers=member)
    assert created.status_code == 201
    file_id = created.json()["id"]
    assert (await client.get(f"/api/files/{file_id}", headers=viewer)).status_code == 200
    assert (await client.get(f"/api/files/{file_id}/content", headers=viewer)).content == b"a\n"
    assert (await client.delete(f"/api/files/{file_id}", headers=viewer)).status_code == 403
    assert (await client.delete(f"/api/files/{file_id}", headers=member)).status_code == 204


async def test_malformed_uploads_are_refused_and_leave_nothing(
    client: httpx.AsyncClient, alice: Tenant, db: Database, leftovers: Leftovers
) -> None:
    whole = form("cut.bin", b"x" * 300_000)
    cases = [
        (whole[:-40], {**FORM_TYPE}, 400, "upload-incomplete"),  # no closing boundary
        (whole, {"Content-Type": "application/octet-stream"}, 415, "unsupported-media-type"),
        (whole, {"Content-Type": "multipart/form-data"}, 400, "bad-request"),  # no boundary
        (
            f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="other"\r\n\r\nx\r\n'
            f"--{BOUNDARY}--\r\n".encode(),
            FORM_TYPE,
            400,
            "bad-request",
        ),
        (  # two files in one form
            whole[: -len(f"--{BOUNDARY}--\r\n")] + whole,
            FORM_TYPE,
            400,
            "bad-request",
        ),
    ]
    for body, headers, status, slug in cases:
        response = await client.post(
            "/api/files", content=body, headers={**alice.headers, **headers}
        )
        assert response.status_code == status, response.text
        assert response.json()["type"] == f"urn:heron:problem:{slug}"
    assert await file_rows(db) == 0
    assert leftovers() == []


async def test_files_list_in_pages(client: httpx.AsyncClient, alice: Tenant) -> None:
    ids = [(await upload(client, alice, f"{i}.txt", b"%d\n" % i)).json()["id"] for i in range(5)]
    seen = []
    cursor = None
    while True:
        params = {"limit": "2"} | ({"cursor": cursor} if cursor else {})
        page = (await client.get("/api/files", params=params, headers=alice.headers)).json()
        seen += [item["id"] for item in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == ids


async def test_other_request_bodies_keep_their_small_limit(
    client: httpx.AsyncClient, alice: Tenant
) -> None:
    big = b'{"name": "' + b"x" * (2 * MiB) + b'"}'
    response = await client.post(
        "/api/keys", content=big, headers={**alice.headers, "content-type": "application/json"}
    )
    assert response.status_code == 413
    assert response.json()["type"] == "urn:heron:problem:payload-too-large"


# Bounded memory ---------------------------------------------------------------------------------

BIG = 200 * MiB
# The server's peak resident memory may grow by less than this while 200 MiB go through it.
MEMORY_BOUND = 50 * MiB


def memory(pid: int, field: str) -> int:
    """`VmRSS` (resident now) or `VmHWM` (peak resident since the last reset), in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no {field} in /proc/{pid}/status")


def reset_peak(pid: int) -> int:
    """Start measuring the peak afresh (Linux: write 5 to clear_refs); the resident size now."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")
    return memory(pid, "VmRSS")


@pytest.mark.slow
async def test_a_200_mib_upload_and_download_keep_the_servers_memory_bounded(
    tmp_path: Path,
    database_url: str,
    scale_out: str | None,
    storage_settings: StorageSettings,
) -> None:
    from test_cli import Heron
    from test_crash import started

    env = {
        "HERON_DATABASE_URL": database_url,
        "HERON_STORAGE_MAX_FILE_BYTES": str(BIG),
        "HERON_STORAGE_WORKSPACE_QUOTA_BYTES": str(2 * BIG),
        "HERON_LIMITS_API_BURST": "100000",
    }
    if storage_settings.url and storage_settings.url.startswith("s3://"):
        env |= {
            "HERON_STORAGE_URL": storage_settings.url,
            "HERON_STORAGE_S3_ENDPOINT": storage_settings.s3_endpoint or "",
            "HERON_STORAGE_S3_REGION": "us-east-1",
            "HERON_STORAGE_S3_ACCESS_KEY_ID": "heron-test",
            "HERON_STORAGE_S3_SECRET_ACCESS_KEY": "heron-test-secret",
        }
    if not database_url.startswith("sqlite"):
        env |= {"HERON_SECRET_KEY": TEST_SECRET, "HERON_REDIS_URL": scale_out or ""}
    heron = Heron(tmp_path)
    try:
        server, client = await started(heron, env)
        client.timeout = httpx.Timeout(300)
        auth = {"Authorization": f"Bearer {(heron.home / 'initial-api-key').read_text().strip()}"}
        warm = await client.post(
            "/api/files", files={"file": ("warm.txt", b"warm\n", "text/plain")}, headers=auth
        )
        assert warm.status_code == 201, warm.text
        await client.get(f"/api/files/{warm.json()['id']}/content", headers=auth)
        pid = server.proc.pid
        before = reset_peak(pid)

        block = random.Random(11).randbytes(MiB)
        sent = hashlib.sha256()

        async def body() -> AsyncIterator[bytes]:  # generated on the fly, never whole
            yield (
                f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; '
                'filename="big.bin"\r\nContent-Type: application/octet-stream\r\n\r\n'
            ).encode()
            for i in range(BIG // MiB):
                chunk = i.to_bytes(8, "big") + block[8:]
                sent.update(chunk)
                yield chunk
            yield f"\r\n--{BOUNDARY}--\r\n".encode()

        created = await client.post("/api/files", content=body(), headers={**auth, **FORM_TYPE})
        assert created.status_code == 201, created.text
        assert created.json()["size"] == BIG
        assert created.json()["sha256"] == sent.hexdigest()
        upload_growth = memory(pid, "VmHWM") - before
        before = reset_peak(pid)

        received = hashlib.sha256()
        async with client.stream(
            "GET", f"/api/files/{created.json()['id']}/content", headers=auth
        ) as response:
            assert response.status_code == 200
            async for chunk in response.aiter_raw():
                received.update(chunk)
        assert received.hexdigest() == sent.hexdigest()
        download_growth = memory(pid, "VmHWM") - before
        await client.aclose()

        growth = (upload_growth, download_growth)
        assert max(growth) < MEMORY_BOUND, f"peak RSS grew by {[g // MiB for g in growth]} MiB"
    finally:
        heron.close()
