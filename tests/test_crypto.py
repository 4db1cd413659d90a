"""Secrets at rest: the SecretBox, and `heron secrets rotate` re-encrypting every stored secret
with a new key while providers keep working (run as the real command, on both backends)."""

from __future__ import annotations

import asyncio
import os
import stat
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI
from pydantic import SecretStr
from sqlalchemy import text

from conftest import BACKEND, TEST_SECRET, Tenant, make_settings, serve
from fakes.openai_server import FakeOpenAI, Reply
from heron.app import create_app
from heron.core.crypto import SecretBox, SecretUndecryptable
from heron.core.security import TokenSigner
from heron.db.engine import Database
from heron.settings import AuthSettings, Settings

API_KEY = "sk-rotate-me-0123456789wxyz"
NEW_SECRET = "the-new-secret-key-" + "n" * 32


def test_secret_box_round_trips_and_never_repeats_a_ciphertext() -> None:
    box = SecretBox(TEST_SECRET)
    first, second = box.encrypt("sk-abc"), box.encrypt("sk-abc")
    assert first != second
    assert "sk-abc" not in first
    assert box.decrypt(first) == box.decrypt(second) == "sk-abc"
    assert box.decrypt_optional(None) is None
    assert SecretBox(TEST_SECRET).decrypt(first) == "sk-abc"  # derived, not random


def test_a_wrong_key_is_a_clear_error() -> None:
    token = SecretBox(TEST_SECRET).encrypt("sk-abc")
    with pytest.raises(SecretUndecryptable, match="heron secrets rotate") as caught:
        SecretBox(NEW_SECRET).decrypt(token)
    assert caught.value.status == 500
    with pytest.raises(SecretUndecryptable):
        SecretBox(TEST_SECRET).decrypt("not a token")


def test_the_encryption_key_is_not_the_token_signing_key() -> None:
    # Both derive from HERON_SECRET_KEY, each for its own purpose.
    signer = TokenSigner(TEST_SECRET, access_seconds=60, refresh_seconds=600)
    assert signer._key != SecretBox(TEST_SECRET)._fernet._signing_key
    assert signer._key != SecretBox(TEST_SECRET)._fernet._encryption_key


@pytest.fixture
async def fake() -> AsyncIterator[str]:
    server = FakeOpenAI(api_key=API_KEY, models=["gpt-test"])
    server.default = Reply(text="still works")
    async with server.serve() as url:
        yield url


async def run_rotate(settings: Settings, database_url: str) -> tuple[int, str, str]:
    """`heron secrets rotate` as the operator runs it: embedded on SQLite (key file), scale-out
    on PostgreSQL (HERON_SECRET_KEY, the new key on standard input)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HERON_")}
    env["HERON_HOME"] = str(settings.home)
    args = [sys.executable, "-m", "heron", "secrets", "rotate"]
    stdin = b""
    if BACKEND == "sqlite":
        # The test database is where the embedded mode looks for it: $HERON_HOME/heron.db.
        assert database_url == f"sqlite+aiosqlite:///{settings.home / 'heron.db'}"
        (settings.home / "secret.key").write_text(TEST_SECRET + "\n")
    else:
        env["HERON_DATABASE_URL"] = database_url
        env["HERON_SECRET_KEY"] = TEST_SECRET
        args.append("--new-key-stdin")
        stdin = (NEW_SECRET + "\n").encode()
    proc = await asyncio.create_subprocess_exec(
        *args,
        env=env,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(stdin), timeout=60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_rotation_reencrypts_every_secret_and_providers_keep_working(
    app: FastAPI,
    client: httpx.AsyncClient,
    db: Database,
    settings: Settings,
    database_url: str,
    alice: Tenant,
    fake: str,
) -> None:
    created = await client.post(
        "/api/providers",
        json={
            "name": "p",
            "kind": "openai-compatible",
            "base_url": fake,
            "api_key": API_KEY,
            "extra_headers": {"X-Org": "org-secret"},
        },
        headers=alice.headers,
    )
    assert created.status_code == 201, created.text
    await client.post(
        "/api/providers",
        json={"name": "keyless", "kind": "openai-compatible", "base_url": fake},
        headers=alice.headers,
    )
    async with db.session(write=False) as session:
        before = (await session.execute(text("SELECT api_key_encrypted FROM providers"))).all()

    code, out, err = await run_rotate(settings, database_url)
    assert code == 0, err
    assert "Re-encrypted 2 stored secrets" in out  # one key and one set of headers
    assert "log in again" in out

    if BACKEND == "sqlite":
        key_file = settings.home / "secret.key"
        new_secret = key_file.read_text().strip()
        assert new_secret != TEST_SECRET
        assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
        assert not (settings.home / "secret.key.new").exists()
    else:
        new_secret = NEW_SECRET
        assert "HERON_SECRET_KEY" in out

    async with db.session(write=False) as session:
        rows = (
            await session.execute(
                text("SELECT api_key_encrypted, headers_encrypted FROM providers")
            )
        ).all()
    tokens = [value for row in rows for value in row if value is not None]
    assert len(tokens) == 2
    assert not {t for (t,) in before} & set(tokens)
    for token in tokens:
        with pytest.raises(SecretUndecryptable):
            SecretBox(TEST_SECRET).decrypt(token)
    assert API_KEY in {SecretBox(new_secret).decrypt(t) for t in tokens}

    # A server started with the new key reads the secrets and reaches the provider with them.
    new_settings = make_settings(settings.home, database_url, settings.redis.url)
    new_settings.auth = AuthSettings(secret_key=SecretStr(new_secret))
    async with serve(create_app(new_settings)) as url, httpx.AsyncClient(base_url=url) as new:
        provider_id = created.json()["id"]
        shown = await new.get(f"/api/providers/{provider_id}", headers=alice.headers)
        assert shown.json()["api_key_masked"] == "sk-…wxyz"
        assert shown.json()["extra_header_names"] == ["X-Org"]
        checked = await new.post(
            f"/api/providers/{provider_id}/check",
            json={"model": "gpt-test"},
            headers=alice.headers,
        )
        assert checked.json()["ok"] is True, checked.text

    # The server still holding the old key says clearly what is wrong.
    stale = await client.get(f"/api/providers/{created.json()['id']}", headers=alice.headers)
    assert stale.status_code == 500
    assert stale.json()["type"] == "urn:heron:problem:secret-undecryptable"


async def test_rotation_with_a_key_that_does_not_open_the_secrets_changes_nothing(
    client: httpx.AsyncClient,
    db: Database,
    settings: Settings,
    database_url: str,
    alice: Tenant,
    tmp_path: Path,
) -> None:
    response = await client.post(
        "/api/providers",
        json={"name": "p", "kind": "openai", "api_key": API_KEY},
        headers=alice.headers,
    )
    assert response.status_code == 201
    async with db.session(write=True) as session, session.begin():
        # A row written under some other key, as after a HERON_SECRET_KEY changed by hand.
        foreign = SecretBox("another-installation-key-" + "z" * 32).encrypt("sk-x")
        await session.execute(text("UPDATE providers SET headers_encrypted = :t"), {"t": foreign})
        before = (await session.execute(text("SELECT api_key_encrypted FROM providers"))).all()

    code, _, err = await run_rotate(settings, database_url)
    assert code == 1
    assert err.startswith("error: ")
    assert "cannot be decrypted" in err
    async with db.session(write=False) as session:
        after = (await session.execute(text("SELECT api_key_encrypted FROM providers"))).all()
    assert after == before
    if BACKEND == "sqlite":
        assert (settings.home / "secret.key").read_text().strip() == TEST_SECRET
        assert not (settings.home / "secret.key.new").exists()
