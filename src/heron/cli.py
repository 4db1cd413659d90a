"""The `heron` command. Heavy modules are imported inside commands so `heron --help` is instant."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import uuid
from collections.abc import Awaitable, Callable
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, NoReturn, TypeVar

import typer

from heron import __version__
from heron.agents.cli import app as agents_app
from heron.knowledge.cli import app as kb_app
from heron.providers.cli import app as providers_app
from heron.runs.cli import chat as chat_command
from heron.runs.cli import run as run_command

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncSession

    from heron.settings import Settings
    from heron.tenancy.models import Role

T = TypeVar("T")

app = typer.Typer(
    name="heron",
    help="Heron: a self-hosted platform for AI agents.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
users_app = typer.Typer(help="Manage user accounts.", no_args_is_help=True)
keys_app = typer.Typer(help="Manage API keys.", no_args_is_help=True)
config_app = typer.Typer(help="Inspect the configuration.", no_args_is_help=True)
secrets_app = typer.Typer(
    help="Manage the secret key and the secrets it encrypts.", no_args_is_help=True
)
app.add_typer(users_app, name="users")
app.add_typer(keys_app, name="keys")
app.add_typer(config_app, name="config")
app.add_typer(secrets_app, name="secrets")
app.add_typer(agents_app, name="agents")
app.add_typer(providers_app, name="providers")
app.add_typer(kb_app, name="kb")
app.command("run")(run_command)
app.command("chat")(chat_command)


class CliError(Exception):
    """A failure the user can act on: printed as one line, exit status `code`."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


def fail(message: str, code: int = 1) -> NoReturn:
    raise CliError(message, code)


def _settings(**server: object) -> Settings:
    from pydantic import ValidationError

    from heron.settings import ServerSettings, SettingsError, load_settings

    try:
        settings = load_settings()
        overrides = {k: v for k, v in server.items() if v is not None}
        if overrides:
            merged = settings.server.model_dump() | overrides
            settings.server = ServerSettings.model_validate(merged)
        return settings
    except SettingsError as exc:
        fail(str(exc), 2)
    except ValidationError as exc:  # a command-line option out of range (`--port 99999`)
        error = exc.errors()[0]
        option = str(error["loc"][0]) if error["loc"] else "option"
        fail(f"invalid option --{option}: {error['msg']}", 2)


def _prepare_database(settings: Settings) -> None:
    """Embedded: create HERON_HOME and migrate. PostgreSQL: refuse an outdated schema."""
    from heron.app import SchemaOutdated, check_schema
    from heron.db import migrate

    if settings.is_sqlite:
        settings.home.mkdir(parents=True, exist_ok=True, mode=0o700)
        migrate.upgrade(settings.database_url)
        return
    try:
        asyncio.run(check_schema(settings.database_url))
    except SchemaOutdated as exc:
        fail(str(exc))
    except OSError as exc:
        fail(f"cannot reach the database: {exc}")


def _with_session(settings: Settings, work: Callable[[AsyncSession], Awaitable[T]]) -> T:
    """Run `work` in one write transaction, committed if it returns."""
    from heron.core.errors import HeronError
    from heron.db.engine import Database

    async def run() -> T:
        db = Database(settings.database_url)
        try:
            async with db.session(write=True) as session, session.begin():
                return await work(session)
        finally:
            await db.dispose()

    try:
        return asyncio.run(run())
    except HeronError as exc:
        fail(exc.detail)


@app.command()
def version() -> None:
    """Print Heron's version."""
    typer.echo(__version__)


@app.command()
def serve(
    host: Annotated[str | None, typer.Option(help="Address to listen on.")] = None,
    port: Annotated[int | None, typer.Option(help="TCP port to listen on.")] = None,
    workers: Annotated[int | None, typer.Option(help="API worker processes.")] = None,
) -> None:
    """Start the API server (migrating the embedded database first)."""
    from heron.core.logging import configure_logging

    settings = _settings(host=host, port=port, workers=workers)
    configure_logging(settings.server.log_level, settings.server.log_format)

    from heron.app import create_app, resolve_secret_key
    from heron.settings import SettingsError

    try:  # before touching the database: a missing key is a settings error, reported first
        resolve_secret_key(settings)
    except SettingsError as exc:
        fail(str(exc), 2)
    _prepare_database(settings)
    _announce_bootstrap(settings)

    import uvicorn

    server = settings.server
    options: dict[str, object] = {
        "host": server.host,
        "port": server.port,
        "log_config": None,
        "access_log": False,
        "server_header": False,
        "timeout_graceful_shutdown": server.graceful_shutdown_seconds,
    }
    typer.echo(f"Heron {__version__} listening on http://{server.host}:{server.port}", err=True)
    # After a graceful shutdown uvicorn re-raises the SIGTERM it caught, which would end the
    # process as "killed by SIGTERM" (status 143); a clean stop on request exits with 0.
    signal.signal(signal.SIGTERM, _exit_cleanly)
    if server.workers == 1:
        uvicorn.run(create_app(settings), **options)  # type: ignore[arg-type]
        return
    metrics_dir = settings.home / "run" / "metrics"
    metrics_dir.mkdir(parents=True, exist_ok=True)
    for stale in metrics_dir.glob("*.db"):
        stale.unlink()
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir)
    uvicorn.run(
        "heron.app:create_app",
        factory=True,
        workers=server.workers,
        **options,  # type: ignore[arg-type]
    )


@app.command()
def worker(
    concurrency: Annotated[
        int | None, typer.Option(help="Runs executed at once (HERON_RUNS_WORKER_CONCURRENCY).")
    ] = None,
) -> None:
    """Execute runs for the API replicas (scale-out: needs HERON_REDIS_URL)."""
    from heron.core.logging import configure_logging

    settings = _settings()
    configure_logging(settings.server.log_level, settings.server.log_format)
    if not settings.redis.url:
        fail("HERON_REDIS_URL: a worker takes its jobs from Redis; set it", 2)
    if not settings.uses_workers:
        fail(
            "HERON_RUNS_QUEUE: the API executes runs itself with this configuration "
            "(SQLite, or HERON_RUNS_QUEUE=local); set HERON_RUNS_QUEUE=celery to use workers",
            2,
        )
    if concurrency is not None and not 1 <= concurrency <= 1000:
        fail("--concurrency: expected 1 to 1000", 2)

    from heron.app import SchemaOutdated, resolve_secret_key
    from heron.jobs.worker import run_worker
    from heron.settings import SettingsError

    try:
        resolve_secret_key(settings)
    except SettingsError as exc:
        fail(str(exc), 2)
    typer.echo(f"Heron {__version__} worker: executing runs from {settings.redis.url}", err=True)
    try:
        run_worker(settings, concurrency=concurrency)
    except SchemaOutdated as exc:
        fail(str(exc), 1)


def _exit_cleanly(signum: int, frame: object) -> None:
    raise SystemExit(0)


def _announce_bootstrap(settings: Settings) -> None:
    from heron.tenancy.service import bootstrap

    created = _with_session(settings, bootstrap)
    if created is None:
        return
    path = settings.home / "initial-api-key"
    settings.home.mkdir(parents=True, exist_ok=True, mode=0o700)
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(created.api_key + "\n")
    base = f"http://{settings.server.host}:{settings.server.port}"
    typer.echo(
        f"\nCreated workspace {created.workspace.name!r} ({created.workspace.id}) and its owner "
        f"{created.owner.email}.\n"
        f"Owner API key, shown once (also saved, mode 0600, to {path}):\n\n"
        f"    {created.api_key}\n\n"
        f'Try: curl -H "Authorization: Bearer {created.api_key}" {base}/api/workspaces\n'
        f"To log in with a password: heron users set-password {created.owner.email}\n"
    )


@app.command()
def migrate() -> None:
    """Bring the database schema up to date (explicit step for PostgreSQL)."""
    from heron.db import migrate as migrations

    settings = _settings()
    if settings.is_sqlite:
        settings.home.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        migrations.upgrade(settings.database_url)
    except OSError as exc:
        fail(f"cannot reach the database: {exc}")
    typer.echo(f"database schema is at {migrations.head_revision()}")


def _read_password(password_stdin: bool, confirm: bool = True) -> str:
    if password_stdin:
        password = sys.stdin.readline().rstrip("\n")
    else:
        password = typer.prompt("Password", hide_input=True, confirmation_prompt=confirm)
    if len(password) < 8:
        fail("the password must be at least 8 characters", 2)
    return password


def _role(value: str) -> Role:
    from heron.tenancy.models import Role

    try:
        return Role(value)
    except ValueError:
        fail(f"unknown role {value!r}; choose one of {', '.join(r.value for r in Role)}", 2)


def _uuid(value: str, what: str) -> uuid.UUID:
    try:
        return uuid.UUID(value)
    except ValueError:
        fail(f"{what} must be an id like 0190a0e2-…, not {value!r}", 2)


async def _pick_workspace(session: AsyncSession, workspace: str | None) -> uuid.UUID:
    from sqlalchemy import select

    from heron.tenancy.models import Workspace

    if workspace:
        chosen = _uuid(workspace, "--workspace")
        if await session.get(Workspace, chosen) is None:
            fail(f"no workspace with id {chosen}")
        return chosen
    ids = (await session.scalars(select(Workspace.id).order_by(Workspace.id).limit(2))).all()
    if len(ids) != 1:
        fail("choose a workspace with --workspace" if ids else "there is no workspace yet", 2)
    return ids[0]


@users_app.command("create")
def users_create(
    email: Annotated[str, typer.Option(help="The user's email, used to log in.")],
    name: Annotated[str, typer.Option(help="Display name.")] = "",
    workspace: Annotated[
        str | None, typer.Option(help="Add the user to this workspace id.")
    ] = None,
    role: Annotated[str, typer.Option(help="Role in the workspace.")] = "member",
    password_stdin: Annotated[
        bool, typer.Option("--password-stdin", help="Read the password from standard input.")
    ] = False,
) -> None:
    """Create a user account (and optionally add it to a workspace)."""
    settings = _settings()
    chosen_role = _role(role)
    password = _read_password(password_stdin)
    _prepare_database(settings)

    from heron.tenancy.models import Membership
    from heron.tenancy.repository import MembershipRepository
    from heron.tenancy.service import create_user

    async def work(session: AsyncSession) -> str:
        user = await create_user(session, email, password, name)
        if workspace:
            workspace_id = await _pick_workspace(session, workspace)
            MembershipRepository(session, workspace_id).add(
                Membership(user_id=user.id, role=chosen_role)
            )
        return f"created user {user.email} ({user.id})"

    typer.echo(_with_session(settings, work))


@users_app.command("set-password")
def users_set_password(
    email: Annotated[str, typer.Argument(help="The user's email.")],
    password_stdin: Annotated[
        bool, typer.Option("--password-stdin", help="Read the password from standard input.")
    ] = False,
) -> None:
    """Set a user's password."""
    settings = _settings()
    password = _read_password(password_stdin)
    _prepare_database(settings)

    from heron.tenancy.service import set_password

    async def work(session: AsyncSession) -> str:
        user = await set_password(session, email, password)
        return f"password set for {user.email}"

    typer.echo(_with_session(settings, work))


@keys_app.command("create")
def keys_create(
    name: Annotated[str, typer.Option(help="What the key is for.")],
    role: Annotated[str, typer.Option(help="owner, admin, member or viewer.")] = "member",
    workspace: Annotated[
        str | None, typer.Option(help="Workspace id (needed when there are several).")
    ] = None,
    expires_in_days: Annotated[
        int | None, typer.Option(min=1, help="Days until the key stops working.")
    ] = None,
) -> None:
    """Create an API key and print it (it is shown only once)."""
    settings = _settings()
    chosen_role = _role(role)
    _prepare_database(settings)

    from heron.core.ids import utcnow
    from heron.tenancy.models import Role
    from heron.tenancy.service import create_api_key

    async def work(session: AsyncSession) -> str:
        workspace_id = await _pick_workspace(session, workspace)
        expires = utcnow() + timedelta(days=expires_in_days) if expires_in_days else None
        _, token = await create_api_key(
            session,
            workspace_id,
            name=name,
            role=chosen_role,
            created_by=None,
            grantor_role=Role.owner,
            expires_at=expires,
        )
        return token

    typer.echo(_with_session(settings, work))


@keys_app.command("list")
def keys_list(
    workspace: Annotated[
        str | None, typer.Option(help="Workspace id (needed when there are several).")
    ] = None,
) -> None:
    """List a workspace's API keys."""
    settings = _settings()
    _prepare_database(settings)

    from heron.tenancy.models import ApiKey
    from heron.tenancy.repository import ApiKeyRepository

    async def work(session: AsyncSession) -> list[ApiKey]:
        workspace_id = await _pick_workspace(session, workspace)
        repo = ApiKeyRepository(session, workspace_id)
        return list((await session.scalars(repo.select().order_by(ApiKey.id))).all())

    rows = _with_session(settings, work)
    typer.echo(f"{'ID':36}  {'PREFIX':12}  {'ROLE':6}  {'STATE':8}  NAME")
    for key in rows:
        state = "revoked" if key.revoked_at else "active"
        typer.echo(f"{key.id!s:36}  {key.prefix:12}  {key.role.value:6}  {state:8}  {key.name}")


@keys_app.command("revoke")
def keys_revoke(key_id: Annotated[str, typer.Argument(help="The key's id.")]) -> None:
    """Revoke an API key: it stops working at once."""
    settings = _settings()
    chosen = _uuid(key_id, "KEY_ID")
    _prepare_database(settings)

    from heron.tenancy.models import ApiKey
    from heron.tenancy.service import revoke_api_key

    async def work(session: AsyncSession) -> str:
        key = await session.get(ApiKey, chosen)
        if key is None:
            fail(f"no API key with id {chosen}")
        await revoke_api_key(session, key.workspace_id, key.id)
        return f"revoked {key.name} ({key.prefix})"

    typer.echo(_with_session(settings, work))


@secrets_app.command("rotate")
def secrets_rotate(
    new_key_stdin: Annotated[
        bool,
        typer.Option(
            "--new-key-stdin",
            help="Read the new key from standard input (otherwise a new one is generated).",
        ),
    ] = False,
) -> None:
    """Re-encrypt every stored secret with a new secret key, in one transaction.

    Stop Heron first: a running server keeps using the old key until it restarts. Session tokens
    are signed with a key derived from the same secret, so every user has to log in again;
    API keys keep working.
    """
    settings = _settings()
    _prepare_database(settings)

    import secrets as random_secrets

    from heron.app import resolve_secret_key
    from heron.core.crypto import SecretBox, reencrypt_all
    from heron.db.models import Base
    from heron.settings import SettingsError

    try:
        current = resolve_secret_key(settings)
    except SettingsError as exc:
        fail(str(exc), 2)
    if new_key_stdin:
        new = sys.stdin.readline().strip()
        if len(new) < 32:
            fail("the new key must be at least 32 characters", 2)
    else:
        new = random_secrets.token_urlsafe(48)
    if new == current:
        fail("the new key is the current key", 2)

    async def work(session: AsyncSession) -> int:
        return await reencrypt_all(session, Base.metadata, SecretBox(current), SecretBox(new))

    consequences = (
        "Session tokens signed with the old key no longer work: users log in again. "
        "API keys are not affected."
    )
    if settings.auth.secret_key is None:  # embedded: the key lives in $HERON_HOME/secret.key
        path = settings.home / "secret.key"
        staged = path.with_name("secret.key.new")
        # The new key is on disk before any secret is encrypted with it, so a crash in between
        # can't leave secrets that no key opens.
        staged.unlink(missing_ok=True)
        fd = os.open(staged, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(new + "\n")
        try:
            count = _with_session(settings, work)
        except BaseException:
            staged.unlink(missing_ok=True)
            raise
        os.replace(staged, path)
        typer.echo(
            f"Re-encrypted {count} stored secrets; the new key is in {path}.\n"
            f"Restart Heron to use it. {consequences}"
        )
        return
    if not new_key_stdin:
        # Shown before the secrets are rewritten, so the key can't be lost if this process dies.
        typer.echo(f"New secret key (set it as HERON_SECRET_KEY):\n\n    {new}\n")
    count = _with_session(settings, work)
    typer.echo(
        f"Re-encrypted {count} stored secrets with the new key. Set HERON_SECRET_KEY to it on "
        f"every replica and restart them all; until then they can't read stored secrets. "
        f"{consequences}"
    )


@config_app.command("docs")
def config_docs(
    output: Annotated[Path | None, typer.Option(help="Write to this file.")] = None,
) -> None:
    """Print the configuration reference (docs/configuration.md)."""
    from heron.settings import render_configuration_docs

    text = render_configuration_docs()
    if output:
        output.write_text(text)
    else:
        typer.echo(text, nl=False)


def main() -> None:
    try:
        app()
    except CliError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise SystemExit(exc.code) from None
