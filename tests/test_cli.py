"""The real `heron` command, run as a subprocess: first start and restart, graceful shutdown,
one-line errors for bad settings, and the keys and users commands against a live server.

Each test has its own HERON_HOME under tmp_path and its own loopback port; every process a test
starts is killed when it ends. The tests wait for things to happen (with generous time limits)
but never assert on how long they took.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import stat
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

import heron
from conftest import BACKEND, TEST_SECRET, PostgresServer

_SCRIPT = Path(sys.executable).with_name("heron")
HERON = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "heron"]
KEY = re.compile(r"heron_[0-9a-f]{12}_[A-Za-z0-9]{43}")
PROBLEM = "application/problem+json"
READY_TIMEOUT = 15.0  # upper bounds only: nothing here asserts a duration
CLI_TIMEOUT = 30.0
STOP_TIMEOUT = 15.0
PASSWORD = "correct horse battery"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def names(line: str, word: str) -> bool:
    """`word` appears in `line` as a whole name (HERON_SECRET_KEY is not in HERON_AUTH_...KEY)."""
    return re.search(rf"(?<![\w-]){re.escape(word)}(?![\w-])", line) is not None


@dataclass
class Server:
    proc: subprocess.Popen[bytes]
    port: int
    out: Path
    err: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def stdout(self) -> str:
        return self.out.read_text()

    @property
    def stderr(self) -> str:
        return self.err.read_text()

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=10, trust_env=False)

    def wait_ready(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT
        while True:
            if self.proc.poll() is not None:
                pytest.fail(
                    f"heron serve exited with {self.proc.returncode} before it was ready:\n"
                    f"{self.stdout}\n{self.stderr}"
                )
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1, trust_env=False).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"heron serve not ready after {READY_TIMEOUT} s:\n{self.stderr}")
            time.sleep(0.05)

    def stop(self) -> int:
        """SIGTERM, then the exit status."""
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=STOP_TIMEOUT)


class Heron:
    """Runs `heron` with a private HERON_HOME; kills whatever it started on close()."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp = tmp_path
        self.home = tmp_path / "home"
        self.procs: list[subprocess.Popen[bytes]] = []
        self.count = 0

    def env(self, extra: dict[str, str]) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.upper().startswith("HERON_")}
        env.update(HERON_HOME=str(self.home), HERON_SERVER_HOST="127.0.0.1", PYTHONUNBUFFERED="1")
        env.update(extra)
        return env

    def run(
        self, *args: str, stdin: str | None = None, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        # cwd=tmp_path: no stray .env file is read.
        return subprocess.run(
            [*HERON, *args],
            input=stdin,
            capture_output=True,
            text=True,
            env=self.env(env or {}),
            cwd=self.tmp,
            timeout=CLI_TIMEOUT,
            check=False,
        )

    def ok(self, *args: str, stdin: str | None = None, env: dict[str, str] | None = None) -> str:
        result = self.run(*args, stdin=stdin, env=env)
        assert result.returncode == 0, f"heron {' '.join(args)}: {result.stderr}"
        return result.stdout

    def start(self, env: dict[str, str] | None = None, *, command: str = "serve") -> Server:
        """`heron serve` (or `heron worker`) in the background, on a port of its own."""
        self.count += 1
        port = free_port()
        out = self.tmp / f"{command}-{self.count}.out"
        err = self.tmp / f"{command}-{self.count}.err"
        with out.open("wb") as o, err.open("wb") as e:
            proc = subprocess.Popen(
                [*HERON, command],
                stdin=subprocess.DEVNULL,
                stdout=o,
                stderr=e,
                env=self.env({"HERON_SERVER_PORT": str(port), **(env or {})}),
                cwd=self.tmp,
            )
        self.procs.append(proc)
        return Server(proc, port, out, err)

    def serve(self, env: dict[str, str] | None = None) -> Server:
        server = self.start(env)
        server.wait_ready()
        return server

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=STOP_TIMEOUT)


@pytest.fixture
def cli(tmp_path: Path) -> Iterator[Heron]:
    runner = Heron(tmp_path)
    try:
        yield runner
    finally:
        runner.close()


def assert_problem(response: httpx.Response, status: int) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == PROBLEM
    assert response.json()["status"] == status


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def owner_key(server: Server) -> str:
    keys = set(KEY.findall(server.stdout))
    assert len(keys) == 1, server.stdout
    return keys.pop()


# First start and restart ------------------------------------------------------------------------


def test_first_start_prints_the_owner_key_once_and_restart_keeps_data(cli: Heron) -> None:
    server = cli.serve()
    key = owner_key(server)
    key_file = cli.home / "initial-api-key"
    assert key_file.read_text() == key + "\n"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(cli.home.stat().st_mode) == 0o700
    assert stat.S_IMODE((cli.home / "secret.key").stat().st_mode) == 0o600

    with server.client() as http:
        response = http.get("/api/workspaces", headers=bearer(key))
        assert response.status_code == 200, response.text
        [workspace] = response.json()["items"]
        assert workspace["name"] == "Default"
        assert workspace["role"] == "owner"
        assert_problem(http.get("/api/workspaces"), 401)
    assert server.stop() == 0

    again = cli.serve()
    assert KEY.search(again.stdout) is None, again.stdout
    assert key_file.read_text() == key + "\n"
    with again.client() as http:
        response = http.get("/api/workspaces", headers=bearer(key))
        assert response.status_code == 200, response.text
        assert [w["id"] for w in response.json()["items"]] == [workspace["id"]]
    assert again.stop() == 0


# Graceful shutdown ------------------------------------------------------------------------------


def _read_until(sock: socket.socket, marker: bytes | None) -> bytes:
    """Until `marker` has arrived, or with None until the server closes the connection."""
    data = b""
    while marker is None or marker not in data:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


def _wait_refusing(port: int) -> None:
    """Until the port refuses new connections: the server has begun shutting down."""
    deadline = time.monotonic() + STOP_TIMEOUT
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
        except ConnectionRefusedError:
            return
        time.sleep(0.02)
    pytest.fail("the server still accepts connections after SIGTERM")


def test_sigterm_lets_a_request_in_flight_finish(cli: Heron) -> None:
    server = cli.serve()
    body = json.dumps({"email": "nobody@example.com", "password": "wrong password"}).encode()
    head = (
        "POST /api/auth/login HTTP/1.1\r\n"
        f"Host: 127.0.0.1:{server.port}\r\n"
        "Content-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n"
        # The server answers "100 Continue" when the application starts reading the body:
        # proof that the request is in flight before the signal is sent.
        "Expect: 100-continue\r\n"
        "\r\n"
    ).encode()
    half = len(body) // 2
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(head)
        assert _read_until(sock, b"\r\n\r\n").startswith(b"HTTP/1.1 100 ")
        sock.sendall(body[:half])
        server.proc.send_signal(signal.SIGTERM)
        _wait_refusing(server.port)
        assert server.proc.poll() is None, "the server exited with a request in flight"
        sock.sendall(body[half:])
        raw = _read_until(sock, None)

    head_bytes, _, payload = raw.partition(b"\r\n\r\n")
    status_line, *header_lines = head_bytes.decode("latin-1").split("\r\n")
    assert status_line.startswith("HTTP/1.1 401 "), raw
    headers = {k.strip().lower(): v.strip() for k, v in (h.split(":", 1) for h in header_lines)}
    assert headers["content-type"] == PROBLEM
    assert len(payload) == int(headers["content-length"])
    problem = json.loads(payload)
    assert problem["status"] == 401
    assert problem["type"] == "urn:heron:problem:unauthorized"
    assert server.proc.wait(timeout=STOP_TIMEOUT) == 0, server.stderr


# Bad settings and arguments ---------------------------------------------------------------------


SERVE = ["serve"]
# id: (environment, arguments, standard input, the name the error line must give)
BAD_SETTINGS: dict[str, tuple[dict[str, str], list[str], str | None, str]] = {
    "port-not-a-number": ({"HERON_SERVER_PORT": "notaport"}, SERVE, None, "HERON_SERVER_PORT"),
    "port-out-of-range": ({"HERON_SERVER_PORT": "70000"}, SERVE, None, "HERON_SERVER_PORT"),
    "no-workers": ({"HERON_SERVER_WORKERS": "0"}, SERVE, None, "HERON_SERVER_WORKERS"),
    "mysql": ({"HERON_DATABASE_URL": "mysql://x"}, SERVE, None, "HERON_DATABASE_URL"),
    "redis-url": ({"HERON_REDIS_URL": "http://x"}, SERVE, None, "HERON_REDIS_URL"),
    "tiny-body-limit": (
        {"HERON_LIMITS_MAX_BODY_BYTES": "1"},
        SERVE,
        None,
        "HERON_LIMITS_MAX_BODY_BYTES",
    ),
    "short-secret-key": ({"HERON_SECRET_KEY": "too-short"}, SERVE, None, "HERON_SECRET_KEY"),
    "keys-list-mysql": (
        {"HERON_DATABASE_URL": "mysql://x"},
        ["keys", "list"],
        None,
        "HERON_DATABASE_URL",
    ),
    "option-port-range": ({}, ["serve", "--port", "99999"], None, "--port"),
    "worker-without-redis": ({}, ["worker"], None, "HERON_REDIS_URL"),
    "worker-on-sqlite": (
        {"HERON_REDIS_URL": "redis://127.0.0.1:6379/15"},
        ["worker"],
        None,
        "HERON_RUNS_QUEUE",
    ),
    "celery-queue-without-redis": ({"HERON_RUNS_QUEUE": "celery"}, SERVE, None, "HERON_RUNS_QUEUE"),
    "worker-concurrency": (
        {"HERON_REDIS_URL": "redis://127.0.0.1:6379/15", "HERON_RUNS_QUEUE": "celery"},
        ["worker", "--concurrency", "0"],
        None,
        "--concurrency",
    ),
    "unknown-role": ({}, ["keys", "create", "--name", "x", "--role", "king"], None, "'king'"),
    "short-password": (
        {},
        ["users", "create", "--email", "u@example.com", "--password-stdin"],
        "short\n",
        "password",
    ),
}


@pytest.mark.parametrize(
    ("env", "args", "stdin", "name"), list(BAD_SETTINGS.values()), ids=list(BAD_SETTINGS)
)
def test_bad_settings_exit_2_with_one_line(
    cli: Heron, env: dict[str, str], args: list[str], stdin: str | None, name: str
) -> None:
    result = cli.run(*args, stdin=stdin, env=env)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    assert names(lines[0], name), lines[0]
    assert result.stdout == ""
    assert not cli.home.exists()  # nothing was created before the error


def test_unknown_option_is_a_usage_error(cli: Heron) -> None:
    result = cli.run("serve", "--bogus")
    assert result.returncode == 2
    assert "--bogus" in result.stderr
    assert "Traceback" not in result.stderr
    assert not cli.home.exists()


def test_version(cli: Heron) -> None:
    assert cli.ok("version") == f"{heron.__version__}\n"


# Keys and users ---------------------------------------------------------------------------------


def _key_rows(listing: str) -> dict[str, list[str]]:
    """`heron keys list` output: name -> [id, prefix, role, state]."""
    header, *rows = listing.splitlines()
    assert header.split() == ["ID", "PREFIX", "ROLE", "STATE", "NAME"]
    return {cols[4]: cols[:4] for cols in (row.split(None, 4) for row in rows)}


def test_keys_create_gives_a_key_with_that_role(cli: Heron) -> None:
    server = cli.serve()
    owner = owner_key(server)
    viewer = cli.ok("keys", "create", "--name", "ci", "--role", "viewer").strip()
    assert KEY.fullmatch(viewer), viewer

    with server.client() as http:
        me = http.get("/api/me", headers=bearer(viewer))
        assert me.status_code == 200, me.text
        assert me.json()["role"] == "viewer"
        denied = http.post(
            "/api/keys", headers=bearer(viewer), json={"name": "x", "role": "viewer"}
        )
        assert_problem(denied, 403)

        rows = _key_rows(cli.ok("keys", "list"))
        key_id, prefix, role, state = rows["ci"]
        assert (prefix, role, state) == (viewer.split("_")[1], "viewer", "active")
        assert rows["bootstrap"][2:] == ["owner", "active"]
        listed = http.get("/api/keys", headers=bearer(owner)).json()["items"]
        assert {k["name"]: k["id"] for k in listed}["ci"] == key_id
    assert server.stop() == 0


def test_keys_revoke_stops_a_key_at_once(cli: Heron) -> None:
    server = cli.serve()
    owner = owner_key(server)
    with server.client() as http:
        created = http.post(
            "/api/keys", headers=bearer(owner), json={"name": "ci", "role": "viewer"}
        )
        assert created.status_code == 201, created.text
        viewer, key_id = created.json()["key"], created.json()["id"]
        assert http.get("/api/me", headers=bearer(viewer)).status_code == 200

        assert cli.ok("keys", "revoke", key_id).startswith("revoked ci ")
        assert_problem(http.get("/api/me", headers=bearer(viewer)), 401)
        assert http.get("/api/me", headers=bearer(owner)).status_code == 200
        [revoked] = [
            k
            for k in http.get("/api/keys", headers=bearer(owner)).json()["items"]
            if k["id"] == key_id
        ]
        assert revoked["revoked_at"] is not None
    assert server.stop() == 0


def _login(http: httpx.Client, email: str, password: str) -> httpx.Response:
    return http.post("/api/auth/login", json={"email": email, "password": password})


def test_users_create_adds_a_member_who_can_log_in(cli: Heron) -> None:
    server = cli.serve()
    with server.client() as http:
        [workspace] = http.get("/api/workspaces", headers=bearer(owner_key(server))).json()["items"]
        ws = workspace["id"]
        cli.ok(
            "users",
            "create",
            "--email",
            "u@example.com",
            "--password-stdin",
            "--workspace",
            ws,
            "--role",
            "admin",
            stdin=PASSWORD + "\n",
        )
        assert_problem(_login(http, "u@example.com", PASSWORD + "!"), 401)
        login = _login(http, "u@example.com", PASSWORD)
        assert login.status_code == 200, login.text
        me = http.get(
            "/api/me", headers={**bearer(login.json()["access_token"]), "Heron-Workspace": ws}
        )
        assert me.status_code == 200, me.text
        assert me.json()["role"] == "admin"
        assert me.json()["workspace_id"] == ws
        assert me.json()["user"]["email"] == "u@example.com"
    assert server.stop() == 0


def test_users_set_password_lets_the_bootstrap_owner_log_in(cli: Heron) -> None:
    server = cli.serve()
    with server.client() as http:
        [workspace] = http.get("/api/workspaces", headers=bearer(owner_key(server))).json()["items"]
        assert_problem(_login(http, "owner@heron.localhost", PASSWORD), 401)  # no password yet
        cli.ok(
            "users",
            "set-password",
            "owner@heron.localhost",
            "--password-stdin",
            stdin=PASSWORD + "\n",
        )
        login = _login(http, "owner@heron.localhost", PASSWORD)
        assert login.status_code == 200, login.text
        me = http.get("/api/me", headers=bearer(login.json()["access_token"]))
        assert me.status_code == 200, me.text
        assert me.json()["role"] == "owner"
        assert me.json()["workspace_id"] == workspace["id"]
    assert server.stop() == 0


# PostgreSQL -------------------------------------------------------------------------------------

needs_postgres = pytest.mark.skipif(
    BACKEND != "postgres", reason="needs HERON_TEST_BACKEND=postgres"
)


@pytest.fixture
def empty_database(request: pytest.FixtureRequest) -> Iterator[str]:
    pg: PostgresServer = request.getfixturevalue("postgres")
    name = f"cli_{uuid.uuid4().hex[:16]}"
    pg.admin(f"CREATE DATABASE {name}")
    try:
        yield pg.url(name)
    finally:
        pg.admin(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@needs_postgres
def test_postgres_needs_an_explicit_migrate(cli: Heron, empty_database: str) -> None:
    from heron.db.migrate import head_revision

    env = {"HERON_DATABASE_URL": empty_database, "HERON_SECRET_KEY": TEST_SECRET}
    refused = cli.run("serve", env=env)
    assert refused.returncode != 0
    lines = refused.stderr.splitlines()
    assert len(lines) == 1, refused.stderr
    assert lines[0].startswith("error: ")
    assert "heron migrate" in lines[0]
    assert KEY.search(refused.stdout) is None

    assert cli.ok("migrate", env=env) == f"database schema is at {head_revision()}\n"

    server = cli.serve(env)
    key = owner_key(server)
    with server.client() as http:
        response = http.get("/api/workspaces", headers=bearer(key))
        assert response.status_code == 200, response.text
        assert [w["name"] for w in response.json()["items"]] == ["Default"]
    assert server.stop() == 0


@needs_postgres
def test_postgres_requires_a_secret_key(cli: Heron, empty_database: str) -> None:
    env = {"HERON_DATABASE_URL": empty_database}
    cli.ok("migrate", env=env)
    refused = cli.run("serve", env=env)
    assert refused.returncode == 2, refused.stderr
    lines = refused.stderr.splitlines()
    assert len(lines) == 1, refused.stderr
    assert lines[0].startswith("error: ")
    assert names(lines[0], "HERON_SECRET_KEY"), lines[0]

    # The refused start did not bootstrap: the owner key is shown by the first good start.
    server = cli.serve({**env, "HERON_SECRET_KEY": TEST_SECRET})
    key = owner_key(server)
    with server.client() as http:
        assert http.get("/api/workspaces", headers=bearer(key)).status_code == 200
    assert server.stop() == 0
