"""The job queue of the scale-out deployment: Celery on a Redis broker.

API processes only send jobs; `heron worker` processes execute them (`heron.jobs.worker`). A
job names its kind and the id of the row that holds all of its state, so a job delivered twice
or lost costs nothing: the claim in the database decides who executes, and workers sweep for
work whose job went missing.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from celery import Celery

TASK = "heron.execute"
QUEUE = "heron"
# How long Redis keeps a job a worker took but didn't acknowledge before handing it out again.
# Jobs are acknowledged when they end, and runs can be long; the database claim makes a
# redelivered job of a run that is still executing a no-op.
VISIBILITY_TIMEOUT = 6 * 3600


def celery_app(broker_url: str) -> Celery:
    from celery import Celery

    app = Celery("heron", broker=broker_url, set_as_current=False)
    app.conf.update(
        task_default_queue=QUEUE,
        task_serializer="json",
        accept_content=["json"],
        task_ignore_result=True,
        # Acknowledged when done: a job whose worker died before taking it up goes to another.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        # A worker takes a job only when it has a free slot, so busy workers don't hoard them.
        worker_prefetch_multiplier=1,
        broker_connection_retry_on_startup=True,
        broker_transport_options={"visibility_timeout": VISIBILITY_TIMEOUT},
        worker_hijack_root_logger=False,
        worker_redirect_stdouts=False,
        enable_utc=True,
    )
    return app


class CeleryQueue:
    """Sends jobs to the workers."""

    def __init__(self, broker_url: str) -> None:
        self._app = celery_app(broker_url)

    async def enqueue(self, kind: str, job_id: uuid.UUID, workspace_id: uuid.UUID) -> None:
        # kombu's client is synchronous: a thread keeps the event loop free meanwhile.
        await asyncio.to_thread(
            self._app.send_task, TASK, args=[kind, str(job_id), str(workspace_id)], queue=QUEUE
        )

    def close(self) -> None:
        self._app.close()
