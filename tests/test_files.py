"""The file API on each blob store (a directory, and a real S3-protocol server on loopback):
streamed uploads and downloads, sniffed content types, size and quota limits that leave
nothing behind, hostile names, roles, isolation, and a server whose memory stays bounded."""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import func, select

from conftest import Leftovers, S3Server, Tenant, key_for, make_settings
from filekinds import SAMPLES, agen, random_chunks
from heron.app import create_app
from heron.core.errors import NotFound
from heron.db.engine import Database
from heron.files.models import File
from heron.files.router import content_disposition
from heron.files.storage import BlobStore
from heron.settings import Settings, StorageSettings
from heron.tenancy.models import Role

MiB = 1024 * 1024
MAX_FILE = 6 * MiB
QUOTA = 16 * MiB
BOUNDARY = "heron-test-boundary-7d1f"


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

    far_over = b"".join(random_chunks(left + MiB, seed=10))
    for response in (
        await upload(client, alice, "far-over.bin", far_over),  # refused before it is read
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


async def test_other_domains_add_and_read_files_through_the_service(
    app: FastAPI, alice: Tenant, db: Database, leftovers: Leftovers
) -> None:
    from heron.files import service

    blobs: BlobStore = app.state.blobs
    limits = service.FileLimits(max_file_bytes=MAX_FILE, workspace_quota_bytes=QUOTA)
    async with db.session(write=True) as session, session.begin():
        row = await service.add_file(
            session,
            blobs,
            limits,
            alice.workspace_id,
            agen(iter([b"# Notes\n\n", b"- fetched from a URL\n"])),
            name="notes.md",
            created_by=None,
        )
    assert row.content_type == "text/markdown; charset=utf-8"
    async with db.session(write=False) as session:
        got, chunks = await service.open_content(session, blobs, alice.workspace_id, row.id)
        assert b"".join([c async for c in chunks]) == b"# Notes\n\n- fetched from a URL\n"
        assert got.sha256 == row.sha256
        with pytest.raises(NotFound):
            await service.open_content(session, blobs, uuid.uuid4(), row.id)
    with pytest.raises(service.FileTooLarge):
        async with db.session(write=True) as session, session.begin():
            await service.add_file(
                session,
                blobs,
                limits,
                alice.workspace_id,
                agen(random_chunks(MAX_FILE + 1)),
                name="big",
                created_by=None,
            )
    assert len(leftovers()) == 1


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
