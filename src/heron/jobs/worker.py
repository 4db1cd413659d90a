"""`heron worker`: a Celery worker that executes many runs (and ingests documents) at once on
one asyncio event loop.

Celery's thread pool takes jobs from Redis, one per slot; each slot hands its run to the
`RunExecutor` on the worker's event loop (a thread of its own) and waits until the run ends or
pauses. So a worker executes `HERON_RUNS_WORKER_CONCURRENCY` runs at once, and a busy worker
takes no more jobs than it has slots.

A worker also keeps the deployment durable: it sweeps for runs whose executing worker died
(lease lapsed) or whose job went missing, and it stops runs when a cancellation arrives over
Redis.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import uuid
from collections.abc import Coroutine, Iterator
from typing import TYPE_CHECKING, Any, TypeVar

import structlog
from redis.asyncio import Redis
from redis.exceptions import RedisError

from heron.core.crypto import SecretBox
from heron.core.leases import owner_id
from heron.core.redisclient import redis_client
from heron.core.tasks import cancel_and_wait
from heron.db.engine import Database
from heron.files.storage import BlobStore, open_blob_store
from heron.jobs.queue import QUEUE, TASK, celery_app
from heron.knowledge import index as knowledge_index
from heron.knowledge.ingestion import IngestionContext, IngestionExecutor
from heron.runs.dispatch import CANCEL_CHANNEL
from heron.runs.events import RedisEventLog
from heron.runs.executor import LEASE, RunContext, RunExecutor
from heron.settings import Settings

if TYPE_CHECKING:
    from celery import Celery

log = structlog.get_logger("heron.worker")
T = TypeVar("T")


class UnknownJob(Exception):
    pass


class WorkerRuntime:
    """The asyncio side of a worker process: database, Redis, the run executor."""

    def __init__(self, settings: Settings, *, concurrency: int | None = None) -> None:
        if not settings.redis.url:
            raise ValueError("a worker needs HERON_REDIS_URL")
        self.settings = settings
        # As many runs execute at once as Celery has slots to hand them over.
        self.concurrency = concurrency or settings.runs.worker_concurrency
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="heron-worker-loop", daemon=True
        )
        self._runs: RunExecutor | None = None
        self._ingestion: IngestionExecutor | None = None
        self._blobs: BlobStore | None = None
        self._listener: asyncio.Task[None] | None = None
        self._db: Database | None = None
        self._redis: Redis | None = None
        self._stopping = threading.Event()
        self._stop_lock = threading.Lock()

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def start(self) -> None:
        from heron.app import check_schema, resolve_secret_key

        self._thread.start()
        self._call(check_schema(self.settings.database_url))
        self._call(self._open(SecretBox(resolve_secret_key(self.settings))))

    async def _open(self, box: SecretBox) -> None:
        settings = self.settings
        assert settings.redis.url
        self._db = Database(
            settings.database_url,
            pool_size=settings.database.pool_size,
            echo=settings.database.echo,
        )
        self._redis = redis_client(settings.redis.url)
        ctx = RunContext(
            self._db,
            RedisEventLog(self._redis),
            box,
            owner=owner_id(),
            run_timeout=settings.runs.timeout_seconds,
            per_workspace=settings.runs.per_workspace_concurrency,
        )
        self._runs = RunExecutor(
            ctx,
            max_concurrency=self.concurrency,
            # The per-workspace cap is the claim's, counted in the database across all
            # workers; a second, per-process count here would only duplicate it.
            per_workspace=self.concurrency,
        )
        self._blobs = open_blob_store(settings)
        knowledge_index.matrices.max_bytes = settings.knowledge.vector_cache_bytes
        self._ingestion = IngestionExecutor(
            IngestionContext.create(self._db, settings, box, self._blobs),
            max_concurrency=settings.knowledge.ingest_concurrency,
        )
        self._listener = asyncio.create_task(self._listen_for_cancels(), name="cancel-listener")
        recovered = await self._runs.recover(stale_only=True)
        self._runs.start(queued_grace=LEASE)
        self._ingestion.start(queued_grace=LEASE)
        log.info("worker_started", owner=ctx.owner, runs_recovered=recovered)

    def execute(self, kind: str, job_id: str, workspace_id: str) -> None:
        """A job, from one of Celery's threads: returns when this worker is done with it."""
        if kind not in ("run", "ingest"):
            raise UnknownJob(f"no job of kind {kind!r}")
        if self._stopping.is_set():
            return  # acknowledged; the sweep of a running worker finds the run or document
        executor = self._runs if kind == "run" else self._ingestion
        assert executor is not None
        self._call(executor.execute(uuid.UUID(job_id), uuid.UUID(workspace_id)))

    async def _listen_for_cancels(self) -> None:
        assert self._redis is not None
        while True:
            try:
                async with self._redis.pubsub() as pubsub:
                    await pubsub.subscribe(CANCEL_CHANNEL)
                    async for message in pubsub.listen():
                        if message.get("type") != "message" or self._runs is None:
                            continue
                        with contextlib.suppress(ValueError):
                            self._runs.cancel(uuid.UUID(message["data"].decode()))
            except (OSError, RedisError) as exc:
                # Cancellations still arrive through the database meanwhile (a slower path).
                log.warning("cancel_listener_failed", error=str(exc))
                await asyncio.sleep(1)

    def stop(self) -> None:
        """Leave the runs in progress to other workers (from their last completed step)."""
        with self._stop_lock:
            if self._stopping.is_set() or not self._thread.is_alive():
                return
            self._stopping.set()
            self._call(self._close())
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)

    async def _close(self) -> None:
        if self._listener is not None:
            await cancel_and_wait([self._listener])
        if self._ingestion is not None:
            await self._ingestion.close()
        if self._runs is not None:
            await self._runs.close()
        if self._blobs is not None:
            await self._blobs.close()
        if self._redis is not None:
            await self._redis.aclose()
        if self._db is not None:
            await self._db.dispose()


def worker_app(runtime: WorkerRuntime) -> Celery:
    """The Celery application of a worker, its one task bound to `runtime`."""
    assert runtime.settings.redis.url
    app = celery_app(runtime.settings.redis.url)

    @app.task(name=TASK, shared=False)  # type: ignore[untyped-decorator]
    def execute(kind: str, job_id: str, workspace_id: str) -> None:
        runtime.execute(kind, job_id, workspace_id)

    return app


@contextlib.contextmanager
def running_worker(settings: Settings, *, concurrency: int | None = None) -> Iterator[Any]:
    """A whole worker in threads of this process, consuming from Redis: for tests and
    embedding. Yields Celery's worker controller."""
    from celery.contrib.testing.worker import start_worker

    runtime = WorkerRuntime(settings, concurrency=concurrency)
    runtime.start()
    app = worker_app(runtime)
    try:
        with start_worker(
            app,
            pool="threads",
            concurrency=runtime.concurrency,
            perform_ping_check=False,
            loglevel="WARNING",
            queues=[QUEUE],
            shutdown_timeout=30,
        ) as controller:
            try:
                yield controller
            finally:
                runtime.stop()  # first: the slots waiting on runs are let go
    finally:
        runtime.stop()


def run_worker(settings: Settings, *, concurrency: int | None = None) -> None:
    """`heron worker`: until SIGTERM or SIGINT (a warm shutdown: runs in progress are left to
    other workers, from their last completed step)."""
    from celery.signals import worker_shutting_down

    runtime = WorkerRuntime(settings, concurrency=concurrency)
    runtime.start()
    app = worker_app(runtime)

    def _stop_runs(**_: Any) -> None:
        # Before Celery waits for its slots: they are released when their runs let go.
        threading.Thread(target=runtime.stop, name="heron-worker-stop", daemon=True).start()

    worker_shutting_down.connect(_stop_runs, weak=False)
    try:
        app.Worker(
            pool="threads",
            concurrency=runtime.concurrency,
            queues=[QUEUE],
            loglevel=settings.server.log_level.upper(),
            without_gossip=True,
            without_mingle=True,
            quiet=True,
        ).start()
    finally:
        runtime.stop()
