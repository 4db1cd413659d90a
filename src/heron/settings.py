"""Heron's settings, read from `HERON_*` environment variables (and a `.env` file).

Settings are grouped by concern; each group reads its own prefix, so the variable for a field is
the group prefix plus the field name in upper case (`HERON_DATABASE_URL`, `HERON_SERVER_PORT`).
`docs/configuration.md` is generated from these classes (`heron config docs`) and a test keeps
it in sync.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

from pydantic import AliasChoices, Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class SettingsError(Exception):
    """An invalid setting, with the environment variable that holds it."""

    def __init__(self, variable: str, message: str) -> None:
        super().__init__(f"invalid setting {variable}: {message}")
        self.variable = variable


def _config(prefix: str) -> SettingsConfigDict:
    return SettingsConfigDict(
        env_prefix=prefix,
        env_file=".env",
        extra="ignore",
        validate_default=True,
        populate_by_name=True,
    )


class ServerSettings(BaseSettings):
    """The HTTP server started by `heron serve`."""

    model_config = _config("HERON_SERVER_")

    host: str = Field("127.0.0.1", description="Address to listen on.")
    port: Annotated[int, Field(ge=0, le=65535)] = Field(8000, description="TCP port to listen on.")
    workers: Annotated[int, Field(ge=1, le=64)] = Field(
        1, description="Number of API worker processes."
    )
    graceful_shutdown_seconds: Annotated[float, Field(gt=0, le=600)] = Field(
        30.0,
        description="On SIGTERM, how long in-flight requests may take to finish before the "
        "server closes them.",
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        "info", description="Minimum level of log records written."
    )
    log_format: Literal["json", "console"] = Field(
        "json", description="`json` for one JSON object per line, `console` for humans."
    )


class DatabaseSettings(BaseSettings):
    """The relational database."""

    model_config = _config("HERON_DATABASE_")

    url: str | None = Field(
        None,
        description="SQLAlchemy URL. Empty: SQLite at `$HERON_HOME/heron.db`. PostgreSQL: "
        "`postgresql+asyncpg://user:password@host:5432/heron` (run `heron migrate` first).",
    )
    pool_size: Annotated[int, Field(ge=1, le=1000)] = Field(
        10,
        description=(
            "Connections kept open per process (PostgreSQL); on SQLite, the readers beside the "
            "one writer."
        ),
    )
    echo: bool = Field(False, description="Log every SQL statement (debugging only).")

    @field_validator("url")
    @classmethod
    def _known_driver(cls, value: str | None) -> str | None:
        if value is None or value == "":
            return None
        scheme = value.split("://", 1)[0]
        if "://" not in value or scheme not in _DATABASE_SCHEMES:
            raise ValueError(
                "expected a URL starting with sqlite+aiosqlite:// or postgresql+asyncpg:// "
                "(postgresql:// and postgres:// are accepted too)"
            )
        return _DATABASE_SCHEMES[scheme] + "://" + value.split("://", 1)[1]


_DATABASE_SCHEMES = {
    "sqlite": "sqlite+aiosqlite",
    "sqlite+aiosqlite": "sqlite+aiosqlite",
    "postgres": "postgresql+asyncpg",
    "postgresql": "postgresql+asyncpg",
    "postgresql+asyncpg": "postgresql+asyncpg",
}


class RedisSettings(BaseSettings):
    """Redis, for the scale-out deployment: shared rate limits, queues and live events."""

    model_config = _config("HERON_REDIS_")

    url: str | None = Field(
        None,
        description="Redis URL (`redis://host:6379/0`). Empty: everything stays in process.",
    )

    @field_validator("url")
    @classmethod
    def _redis_scheme(cls, value: str | None) -> str | None:
        if not value:
            return None
        if not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("expected a URL starting with redis://, rediss:// or unix://")
        return value


class StorageSettings(BaseSettings):
    """Where uploaded files are kept, and how much of them."""

    model_config = _config("HERON_STORAGE_")

    url: str | None = Field(
        None,
        description="Blob store location. Empty: the directory `$HERON_HOME/files`; "
        "`file:///absolute/path` for another directory; `s3://bucket/prefix` for an "
        "S3-compatible bucket (see the `S3_*` settings; the standard `AWS_*` variables are "
        "read too).",
    )
    s3_endpoint: str | None = Field(
        None,
        description="S3 API endpoint (`http://127.0.0.1:9000` for MinIO). Empty: AWS S3. "
        "Requests use path-style addressing.",
    )
    s3_region: str | None = Field(
        None, description="S3 region. Empty: `AWS_REGION`/`AWS_DEFAULT_REGION`, or `us-east-1`."
    )
    s3_access_key_id: str | None = Field(
        None, description="S3 access key id. Empty: `AWS_ACCESS_KEY_ID` or instance credentials."
    )
    s3_secret_access_key: SecretStr | None = Field(
        None, description="S3 secret access key. Empty: `AWS_SECRET_ACCESS_KEY`."
    )
    max_file_bytes: Annotated[int, Field(ge=1)] = Field(
        100 * 1024 * 1024, description="Largest accepted file upload (413 above)."
    )
    workspace_quota_bytes: Annotated[int, Field(ge=1)] = Field(
        10 * 1024 * 1024 * 1024,
        description="Total size of the files one workspace may keep (413 past it).",
    )

    @field_validator("url")
    @classmethod
    def _storage_scheme(cls, value: str | None) -> str | None:
        if not value:
            return None
        if value.startswith("file:///"):
            return value
        if value.startswith("s3://"):
            bucket = value.removeprefix("s3://").split("/", 1)[0]
            if not bucket:
                raise ValueError("expected s3://bucket or s3://bucket/prefix")
            return value.rstrip("/")
        raise ValueError("expected file:///absolute/path or s3://bucket/prefix")

    @field_validator("s3_endpoint")
    @classmethod
    def _endpoint_scheme(cls, value: str | None) -> str | None:
        if not value:
            return None
        if not value.startswith(("http://", "https://")):
            raise ValueError("expected an http:// or https:// URL")
        return value.rstrip("/")


class AuthSettings(BaseSettings):
    """Authentication: API keys and user sessions."""

    model_config = _config("HERON_AUTH_")

    secret_key: SecretStr | None = Field(
        None,
        validation_alias=AliasChoices("HERON_SECRET_KEY", "HERON_AUTH_SECRET_KEY"),
        description="`HERON_SECRET_KEY`: signs session tokens and encrypts stored secrets. "
        "Empty in the embedded mode: generated on first start into `$HERON_HOME/secret.key`. "
        "Required with PostgreSQL or Redis, identical on every replica; at least 32 characters.",
    )
    access_token_seconds: Annotated[int, Field(ge=60, le=86400)] = Field(
        900, description="Lifetime of an access token from `POST /api/auth/login`."
    )
    refresh_token_seconds: Annotated[int, Field(ge=300, le=90 * 86400)] = Field(
        30 * 86400, description="Lifetime of a refresh token."
    )
    key_last_used_resolution_seconds: Annotated[int, Field(ge=0, le=86400)] = Field(
        60,
        description="An API key's `last_used_at` is written at most this often, so busy keys "
        "don't turn every read into a write.",
    )

    @field_validator("secret_key")
    @classmethod
    def _long_enough(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and len(value.get_secret_value()) < 32:
            raise ValueError("must be at least 32 characters")
        return value


class LimitsSettings(BaseSettings):
    """Request size and rate limits."""

    model_config = _config("HERON_LIMITS_")

    max_body_bytes: Annotated[int, Field(ge=1024)] = Field(
        1024 * 1024,
        description="Largest accepted request body (413 above). File uploads have their own "
        "limit, `HERON_STORAGE_MAX_FILE_BYTES`.",
    )
    max_header_bytes: Annotated[int, Field(ge=1024, le=65536)] = Field(
        16 * 1024, description="Largest accepted total size of request headers (431 above)."
    )
    api_rate_per_second: Annotated[float, Field(gt=0)] = Field(
        20.0, description="Sustained requests per second per API key or user."
    )
    api_burst: Annotated[int, Field(ge=1)] = Field(
        200, description="Requests an API key or user may make at once before being limited."
    )
    login_rate_per_minute: Annotated[float, Field(gt=0)] = Field(
        10.0, description="Sustained login attempts per minute per client address."
    )
    login_burst: Annotated[int, Field(ge=1)] = Field(
        10, description="Login attempts a client address may make at once."
    )
    trust_forwarded_for: bool = Field(
        False,
        description="Take the client address from `X-Forwarded-For` (only behind a trusted "
        "reverse proxy).",
    )


class RunsSettings(BaseSettings):
    """Executing agent runs."""

    model_config = _config("HERON_RUNS_")

    max_concurrency: Annotated[int, Field(ge=1, le=10_000)] = Field(
        256, description="Runs executing at once in one process (more wait, queued)."
    )
    per_workspace_concurrency: Annotated[int, Field(ge=1, le=10_000)] = Field(
        32, description="Runs of one workspace executing at once (more wait, queued)."
    )
    timeout_seconds: Annotated[float, Field(gt=0, le=7 * 86400)] = Field(
        3600.0, description="A run still going after this long fails with `timeout`."
    )
    keepalive_seconds: Annotated[float, Field(gt=0, le=300)] = Field(
        15.0, description="An event stream with nothing to say sends a comment this often."
    )
    queue: Literal["auto", "local", "celery"] = Field(
        "auto",
        description=(
            "Where runs execute: `local` in the API process, `celery` on `heron worker` "
            "processes (Redis broker). `auto`: `celery` with PostgreSQL and Redis, else `local`."
        ),
    )
    worker_concurrency: Annotated[int, Field(ge=1, le=1_000)] = Field(
        50, description="Runs one `heron worker` process executes at once, on one event loop."
    )


class KnowledgeSettings(BaseSettings):
    """Knowledge bases: ingestion of documents and search."""

    model_config = _config("HERON_KNOWLEDGE_")

    ingest_concurrency: Annotated[int, Field(ge=1, le=256)] = Field(
        4, description="Documents ingested at once in one process (more wait, queued)."
    )
    embed_batch_size: Annotated[int, Field(ge=1, le=4096)] = Field(
        64, description="Chunks embedded and written per batch (progress moves per batch)."
    )
    max_attempts: Annotated[int, Field(ge=1, le=100)] = Field(
        3,
        description="Ingestions of a document that may be interrupted (its worker died) "
        "before it fails.",
    )
    max_fetch_bytes: Annotated[int, Field(ge=1024)] = Field(
        64 * 1024 * 1024,
        description="A document added by URL is read up to this many bytes; the rest is cut.",
    )
    fetch_timeout_seconds: Annotated[float, Field(gt=0, le=3600)] = Field(
        120.0, description="The longest fetching a document's URL may take."
    )
    vector_cache_bytes: Annotated[int, Field(ge=0)] = Field(
        1024 * 1024 * 1024,
        description="SQLite: memory for the embedding matrices of knowledge bases kept "
        "between searches in one process (least recently used dropped first).",
    )


class Settings(BaseSettings):
    """All of Heron's settings."""

    model_config = _config("HERON_")
    groups: ClassVar[dict[str, type[BaseSettings]]] = {
        "server": ServerSettings,
        "database": DatabaseSettings,
        "redis": RedisSettings,
        "storage": StorageSettings,
        "auth": AuthSettings,
        "limits": LimitsSettings,
        "runs": RunsSettings,
        "knowledge": KnowledgeSettings,
    }

    home: Path = Field(
        Path("~/.heron"),
        description="Directory for the embedded database, generated keys and local files.",
    )
    server: ServerSettings = Field(default_factory=ServerSettings)
    database: DatabaseSettings = Field(default_factory=DatabaseSettings)
    redis: RedisSettings = Field(default_factory=RedisSettings)
    storage: StorageSettings = Field(default_factory=StorageSettings)
    auth: AuthSettings = Field(default_factory=AuthSettings)
    limits: LimitsSettings = Field(default_factory=LimitsSettings)
    runs: RunsSettings = Field(default_factory=RunsSettings)
    knowledge: KnowledgeSettings = Field(default_factory=KnowledgeSettings)

    @field_validator("home")
    @classmethod
    def _expand_home(cls, value: Path) -> Path:
        return value.expanduser().absolute()

    @property
    def database_url(self) -> str:
        return self.database.url or f"sqlite+aiosqlite:///{self.home / 'heron.db'}"

    @property
    def is_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite")

    @property
    def uses_workers(self) -> bool:
        """Whether runs and ingestion execute on `heron worker` processes (Celery)."""
        if self.runs.queue == "auto":
            return bool(self.redis.url) and not self.is_sqlite
        return self.runs.queue == "celery"

    @property
    def storage_dir(self) -> Path | None:
        """The directory of the local blob store; None when files go to S3."""
        if self.storage.url is None:
            return self.home / "files"
        if self.storage.url.startswith("file://"):
            return Path(self.storage.url.removeprefix("file://"))
        return None


def load_settings(**overrides: Any) -> Settings:
    """Read every group from the environment; raise SettingsError naming the first bad variable.

    `overrides` replace whole groups (tests pass e.g. `database=DatabaseSettings(url=...)`).
    """
    groups: dict[str, Any] = {}
    for name, cls in Settings.groups.items():
        if name in overrides:
            groups[name] = overrides.pop(name)
            continue
        try:
            groups[name] = cls()
        except ValidationError as exc:
            raise _settings_error(cls, exc) from None
    try:
        settings = Settings(**groups, **overrides)
    except ValidationError as exc:
        raise _settings_error(Settings, exc) from None
    if settings.runs.queue == "celery" and not settings.redis.url:
        raise SettingsError("HERON_RUNS_QUEUE", "`celery` needs HERON_REDIS_URL (its broker)")
    return settings


def _settings_error(cls: type[BaseSettings], exc: ValidationError) -> SettingsError:
    error = exc.errors()[0]
    field = str(error["loc"][0]) if error["loc"] else ""
    return SettingsError(env_name(cls, field), error["msg"])


def env_name(cls: type[BaseSettings], field: str) -> str:
    if field.upper().startswith("HERON_"):  # errors report aliased fields by their alias
        return field.upper()
    info = cls.model_fields.get(field)
    if info is not None and isinstance(info.validation_alias, AliasChoices):
        return str(info.validation_alias.choices[0])
    return f"{cls.model_config.get('env_prefix', '')}{field}".upper()


def render_configuration_docs() -> str:
    """The text of docs/configuration.md."""
    lines = [
        "# Configuration",
        "",
        "Heron reads its settings from environment variables (a `.env` file in the working",
        "directory is read too). Invalid values stop `heron` at start with one line naming",
        "the variable. This file is generated by `heron config docs`; a test keeps it in sync.",
        "",
        "| Variable | Default | Description |",
        "| --- | --- | --- |",
    ]

    def row(cls: type[BaseSettings], field: str) -> str:
        info = cls.model_fields[field]
        default = info.get_default(call_default_factory=False)
        shown = "—" if default is None else f"`{default}`"
        return f"| `{env_name(cls, field)}` | {shown} | {info.description or ''} |"

    lines.append(row(Settings, "home"))
    for name, cls in Settings.groups.items():
        lines += ["", f"## {name.capitalize()}", "", str(cls.__doc__ or "").strip(), ""]
        lines += ["| Variable | Default | Description |", "| --- | --- | --- |"]
        lines += [row(cls, field) for field in cls.model_fields]
    return "\n".join(lines) + "\n"
