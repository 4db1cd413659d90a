"""A `heron serve` process takes a 200 MiB upload and gives it back with its peak memory
barely moving: behaviour (bounded memory), not speed. On each blob store."""

from __future__ import annotations

import hashlib
import random
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from conftest import TEST_SECRET, S3Server
from test_files import BOUNDARY, FORM_TYPE

MiB = 1024 * 1024


@pytest.fixture
def s3_settings(
    store_kind: str, s3_bucket: str | None, request: pytest.FixtureRequest
) -> dict[str, str]:
    if store_kind != "s3":
        return {}
    server: S3Server = request.getfixturevalue("s3_server")
    return {
        "HERON_STORAGE_URL": f"s3://{s3_bucket}/big",
        "HERON_STORAGE_S3_ENDPOINT": server.endpoint,
        "HERON_STORAGE_S3_REGION": "us-east-1",
        "HERON_STORAGE_S3_ACCESS_KEY_ID": "heron-test",
        "HERON_STORAGE_S3_SECRET_ACCESS_KEY": "heron-test-secret",
    }


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
    s3_settings: dict[str, str],
) -> None:
    from test_cli import Heron
    from test_crash import started

    env = {
        "HERON_DATABASE_URL": database_url,
        "HERON_STORAGE_MAX_FILE_BYTES": str(BIG),
        "HERON_STORAGE_WORKSPACE_QUOTA_BYTES": str(2 * BIG),
        "HERON_LIMITS_API_BURST": "100000",
    }
    env |= s3_settings
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
