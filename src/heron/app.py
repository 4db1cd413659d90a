"""The FastAPI application: routers, middleware, error handlers and the resources of a process."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import structlog
from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from redis.asyncio import Redis

from heron import __version__
from heron.agents.router import router as agents_router
from heron.auth.router import router as auth_router
from heron.core.crypto import SecretBox
from heron.core.errors import PROBLEM_JSON, FieldError, Problem, install_error_handlers
from heron.core.leases import owner_id
from heron.core.logging import configure_logging
from heron.core.middleware import RequestContextMiddleware, SizeLimitMiddleware
from heron.core.ratelimit import MemoryRateLimiter, RateLimiter, RedisRateLimiter
from heron.core.redisclient import redis_client
from heron.core.security import TokenSigner, load_or_create_secret_key
from heron.db import migrate
from heron.db.engine import Database
from heron.files.router import router as files_router
from heron.files.router import upload_route_limit
from heron.files.storage import BlobStore, open_blob_store
from heron.jobs.queue import CeleryQueue
from heron.knowledge import index as knowledge_index
from heron.knowledge.ingestion import IngestionContext, IngestionExecutor, WorkerIngestion
from heron.knowledge.router import router as knowledge_router
from heron.ops.router import router as ops_router
from heron.providers.router import router as providers_router
from heron.runs.dispatch import WorkerRuns
from heron.runs.events import EventLog, MemoryEventLog, RedisEventLog
from heron.runs.executor import RunContext, RunExecutor
from heron.runs.router import router as runs_router
from heron.settings import Settings, SettingsError, load_settings
from heron.tenancy.router import router as tenancy_router

log = structlog.get_logger("heron.app")


class SchemaOutdated(Exception):
    """The database schema is not the one this version of Heron needs."""


def resolve_secret_key(settings: Settings) -> str:
    if settings.auth.secret_key is not None:
        return settings.auth.secret_key.get_secret_value()
    if not settings.is_sqlite or settings.redis.url:
        raise SettingsError(
            "HERON_SECRET_KEY",
            "required with PostgreSQL or Redis (use the same value on every replica; "
            "generate one with `python -c 'import secrets; print(secrets.token_urlsafe(48))'`)",
        )
    return load_or_create_secret_key(settings.home)


async def check_schema(url: str) -> None:
    current = await migrate.current_revision(url)
    head = migrate.head_revision()
    if current != head:
        raise SchemaOutdated(
            f"the database schema is at {current or 'nothing'} but this Heron needs {head}; "
            "run `heron migrate`"
        )


def create_app(settings: Settings | None = None) -> FastAPI:
    if settings is None:  # started by uvicorn as a factory: a worker process of its own
        settings = load_settings()
        configure_logging(settings.server.log_level, settings.server.log_format)
    secret_key = resolve_secret_key(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await check_schema(settings.database_url)
        db = Database(
            settings.database_url,
            pool_size=settings.database.pool_size,
            echo=settings.database.echo,
        )
        redis: Redis | None = redis_client(settings.redis.url) if settings.redis.url else None
        limiter: RateLimiter = RedisRateLimiter(redis) if redis else MemoryRateLimiter()
        blobs: BlobStore = open_blob_store(settings)
        app.state.db = db
        app.state.blobs = blobs
        app.state.redis = redis
        app.state.rate_limiter = limiter
        events: EventLog = RedisEventLog(redis) if redis else MemoryEventLog()
        executor: RunExecutor | None = None
        queue: CeleryQueue | None = None
        if settings.uses_workers:
            assert redis is not None
            assert settings.redis.url
            queue = CeleryQueue(settings.redis.url)
            app.state.runs = WorkerRuns(queue, redis, events)
            recovered = 0
        else:
            executor = RunExecutor(
                RunContext(
                    db,
                    events,
                    app.state.secret_box,
                    owner=owner_id(),
                    run_timeout=settings.runs.timeout_seconds,
                    per_workspace=settings.runs.per_workspace_concurrency,
                ),
                max_concurrency=settings.runs.max_concurrency,
                per_workspace=settings.runs.per_workspace_concurrency,
            )
            app.state.runs = executor
            recovered = await executor.recover()
            executor.start()
        knowledge_index.matrices.max_bytes = settings.knowledge.vector_cache_bytes
        ingestion_ctx = IngestionContext.create(db, settings, app.state.secret_box, blobs)
        ingestion: IngestionExecutor | None = None
        if queue is not None:  # ingestion goes to the workers too
            app.state.ingestion = WorkerIngestion(ingestion_ctx, queue)
        else:
            ingestion = IngestionExecutor(
                ingestion_ctx, max_concurrency=settings.knowledge.ingest_concurrency
            )
            app.state.ingestion = ingestion
            await ingestion.recover()
            ingestion.start()
        log.info(
            "started",
            database=db.url.get_backend_name(),
            redis=redis is not None,
            runs="workers" if settings.uses_workers else "in process",
            runs_recovered=recovered,
        )
        try:
            yield
        finally:
            if ingestion is not None:
                await ingestion.close()
            if executor is not None:
                await executor.close()
            if queue is not None:
                queue.close()
            await blobs.close()
            await limiter.close()
            if redis is not None:
                await redis.aclose()
            await db.dispose()

    app = FastAPI(
        title="Heron",
        version=__version__,
        description="A self-hosted platform for AI agents.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.token_signer = TokenSigner(
        secret_key,
        access_seconds=settings.auth.access_token_seconds,
        refresh_seconds=settings.auth.refresh_token_seconds,
    )
    app.state.secret_box = SecretBox(secret_key)
    install_error_handlers(app)
    app.add_middleware(
        SizeLimitMiddleware,
        max_body_bytes=settings.limits.max_body_bytes,
        max_header_bytes=settings.limits.max_header_bytes,
        route_limits={("POST", "/api/files"): upload_route_limit(settings.storage.max_file_bytes)},
    )
    app.add_middleware(RequestContextMiddleware)
    app.include_router(ops_router)
    app.include_router(auth_router)
    app.include_router(tenancy_router)
    app.include_router(providers_router)
    app.include_router(agents_router)
    app.include_router(runs_router)
    app.include_router(knowledge_router)
    app.include_router(files_router)

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = _openapi(app)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app


def _openapi(app: FastAPI) -> dict[str, Any]:
    """FastAPI's schema, with every error response declared as Problem Details."""
    schema = get_openapi(
        title=app.title, version=app.version, description=app.description, routes=app.routes
    )
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    components.pop("HTTPValidationError", None)
    components.pop("ValidationError", None)
    for model in (FieldError, Problem):
        definition = model.model_json_schema(ref_template="#/components/schemas/{model}")
        definition.pop("$defs", None)
        components[model.__name__] = definition
    problem = {"content": {PROBLEM_JSON: {"schema": {"$ref": "#/components/schemas/Problem"}}}}
    for path in schema.get("paths", {}).values():
        for operation in path.values():
            responses = operation.setdefault("responses", {})
            if "422" in responses:
                responses["422"] = {"description": "Validation failed", **problem}
            responses["500"] = {"description": "Internal server error", **problem}
    return schema
