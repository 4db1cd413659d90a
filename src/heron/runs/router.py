"""HTTP endpoints of threads, runs, their event streams, and usage."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Header, Query, Request, Response, status
from fastapi.responses import JSONResponse, StreamingResponse

from heron.core.auth import Reader, Writer
from heron.core.errors import BadRequest, Conflict, problem_responses
from heron.core.pagination import Page, PageQuery, make_page
from heron.core.routing import JsonRoute
from heron.db.engine import Database
from heron.db.session import DbSession, commit_now
from heron.runs import service
from heron.runs.dispatch import Runs
from heron.runs.events import TERMINAL, Event, EventLog
from heron.runs.models import Run, RunStatus
from heron.runs.schemas import ResumeRequest, RunCreate, RunOut, StepOut, UsageOut, UsageRow
from heron.runs.service import RunRepository
from heron.threads.models import Thread
from heron.threads.repository import MessageRepository, ThreadRepository
from heron.threads.schemas import MessageOut, ThreadCreate, ThreadOut

router = APIRouter(
    prefix="/api",
    route_class=JsonRoute,
    responses=problem_responses(400, 401, 403, 404, 409, 413, 415, 422, 429),
)
SSE: dict[int | str, dict[str, Any]] = {
    200: {"content": {"text/event-stream": {"schema": {"type": "string"}}}}
}


def thread_out(thread: Thread) -> ThreadOut:
    return ThreadOut(
        id=thread.id,
        metadata=thread.meta,
        created_at=thread.created_at,
        updated_at=thread.updated_at,
    )


def run_out(run: Run) -> RunOut:
    return RunOut.model_validate(run)


# Threads -------------------------------------------------------------------------------------


@router.post(
    "/threads", tags=["threads"], status_code=status.HTTP_201_CREATED, summary="Create a thread"
)
async def create_thread(
    session: DbSession, principal: Writer, body: ThreadCreate | None = None
) -> ThreadOut:
    thread = ThreadRepository(session, principal.workspace_id).add(
        Thread(meta=body.metadata if body else {})
    )
    await session.flush()
    return thread_out(thread)


@router.get("/threads", tags=["threads"], summary="List threads, optionally by metadata")
async def list_threads(
    session: DbSession,
    principal: Reader,
    page: PageQuery,
    metadata: Annotated[
        str | None,
        Query(
            max_length=4096,
            description="A JSON object; threads whose metadata has all of "
            'its keys with equal values, e.g. `{"user": "ada"}`.',
        ),
    ] = None,
) -> Page[ThreadOut]:
    wanted: dict[str, Any] = {}
    if metadata:
        try:
            wanted = json.loads(metadata)
        except ValueError:
            raise BadRequest("metadata must be a JSON object.") from None
        if not isinstance(wanted, dict):
            raise BadRequest("metadata must be a JSON object.")
    rows = await ThreadRepository(session, principal.workspace_id).matching(page, wanted)
    return make_page(list(rows), page, thread_out, lambda t: t.id)


@router.get("/threads/{thread_id}", tags=["threads"], summary="Get a thread")
async def get_thread(session: DbSession, principal: Reader, thread_id: uuid.UUID) -> ThreadOut:
    return thread_out(await ThreadRepository(session, principal.workspace_id).get_or_404(thread_id))


@router.delete(
    "/threads/{thread_id}",
    tags=["threads"],
    status_code=status.HTTP_204_NO_CONTENT,
    summary="Delete a thread with its messages and runs",
)
async def delete_thread(session: DbSession, principal: Writer, thread_id: uuid.UUID) -> None:
    repo = ThreadRepository(session, principal.workspace_id)
    thread = await repo.get_or_404(thread_id)
    if await RunRepository(session, principal.workspace_id).active_on(thread_id):
        raise Conflict("The thread has an active run; cancel it first.")
    await repo.delete(thread)


@router.get(
    "/threads/{thread_id}/messages", tags=["threads"], summary="A thread's messages, in order"
)
async def list_messages(
    session: DbSession, principal: Reader, thread_id: uuid.UUID, page: PageQuery
) -> Page[MessageOut]:
    await ThreadRepository(session, principal.workspace_id).get_or_404(thread_id)
    rows = await MessageRepository(session, principal.workspace_id).of_thread(thread_id, page)
    return make_page(list(rows), page, MessageOut.model_validate, lambda m: m.id)


# Runs ----------------------------------------------------------------------------------------


def _runs(request: Request) -> Runs:
    runs: Runs = request.app.state.runs
    return runs


@router.post(
    "/threads/{thread_id}/runs",
    tags=["runs"],
    status_code=status.HTTP_202_ACCEPTED,
    summary="Start a run of an agent on the thread",
    responses=SSE,
)
async def create_run(
    request: Request, session: DbSession, principal: Writer, thread_id: uuid.UUID, body: RunCreate
) -> Response:
    run = await service.create_run(session, principal, thread_id, body, _runs(request))
    if body.stream:
        # The stream starts after the transaction committed and the run was queued.
        return _event_stream(request, principal.workspace_id, run.id, 0, created=True)
    return JSONResponse(
        run_out(run).model_dump(mode="json"),
        status_code=202,
        headers={"Location": f"/api/runs/{run.id}"},
    )


@router.post(
    "/threads/{thread_id}/runs/wait",
    tags=["runs"],
    summary="Start a run and answer when it has ended (or needs approval)",
)
async def create_run_and_wait(
    request: Request, session: DbSession, principal: Writer, thread_id: uuid.UUID, body: RunCreate
) -> RunOut:
    if body.stream:
        raise BadRequest("`stream` is not available with /runs/wait.")
    run = await service.create_run(session, principal, thread_id, body, _runs(request))
    run_id, workspace_id = run.id, run.workspace_id
    await commit_now(session)  # the run must be queued before this request waits on it
    async for event in _events(request, workspace_id, run_id, 0, created=True):
        if event is not None and (event.type in TERMINAL or event.type == "approval.required"):
            break
    db: Database = request.app.state.db
    async with db.session(write=False) as reader:
        return run_out(await RunRepository(reader, workspace_id).get_or_404(run_id))


@router.get("/threads/{thread_id}/runs", tags=["runs"], summary="A thread's runs")
async def list_runs(
    session: DbSession, principal: Reader, thread_id: uuid.UUID, page: PageQuery
) -> Page[RunOut]:
    await ThreadRepository(session, principal.workspace_id).get_or_404(thread_id)
    rows = await RunRepository(session, principal.workspace_id).of_thread(thread_id, page)
    return make_page(list(rows), page, run_out, lambda r: r.id)


@router.get("/runs/{run_id}", tags=["runs"], summary="Get a run")
async def get_run(session: DbSession, principal: Reader, run_id: uuid.UUID) -> RunOut:
    return run_out(await RunRepository(session, principal.workspace_id).get_or_404(run_id))


@router.get("/runs/{run_id}/steps", tags=["runs"], summary="A run's model requests and tool calls")
async def list_steps(session: DbSession, principal: Reader, run_id: uuid.UUID) -> list[StepOut]:
    repo = RunRepository(session, principal.workspace_id)
    await repo.get_or_404(run_id)
    return [StepOut.model_validate(s) for s in await repo.steps(run_id)]


@router.post("/runs/{run_id}/cancel", tags=["runs"], summary="Cancel a run")
async def cancel_run(
    request: Request, session: DbSession, principal: Writer, run_id: uuid.UUID
) -> RunOut:
    return run_out(await service.cancel_run(session, principal, run_id, _runs(request)))


@router.post(
    "/runs/{run_id}/resume", tags=["runs"], summary="Approve or deny the pending tool calls"
)
async def resume_run(
    request: Request, session: DbSession, principal: Writer, run_id: uuid.UUID, body: ResumeRequest
) -> RunOut:
    return run_out(
        await service.resume_run(session, principal, run_id, body.decisions, _runs(request))
    )


@router.get(
    "/runs/{run_id}/events",
    tags=["runs"],
    summary="The run's events (SSE); resume with Last-Event-ID or ?after=",
    response_class=StreamingResponse,
    responses=SSE,
)
async def run_events(
    request: Request,
    session: DbSession,
    principal: Reader,
    run_id: uuid.UUID,
    after: Annotated[int | None, Query(ge=0, description="Send events after this id.")] = None,
    last_event_id: Annotated[str | None, Header(alias="Last-Event-ID", max_length=32)] = None,
) -> StreamingResponse:
    await RunRepository(session, principal.workspace_id).get_or_404(run_id)
    start = after or 0
    if last_event_id:
        try:
            start = max(start, int(last_event_id))
        except ValueError:
            raise BadRequest("Last-Event-ID must be an event id this API sent.") from None
    return _event_stream(request, principal.workspace_id, run_id, start)


def _event_stream(
    request: Request,
    workspace_id: uuid.UUID,
    run_id: uuid.UUID,
    after: int,
    *,
    created: bool = False,
) -> StreamingResponse:
    async def body() -> AsyncIterator[bytes]:
        async for event in _events(request, workspace_id, run_id, after, created=created):
            if event is None:
                yield b": keep-alive\n\n"
                continue
            data = json.dumps(event.data, separators=(",", ":"), default=str)
            yield f"id: {event.seq}\nevent: {event.type}\ndata: {data}\n\n".encode()

    return StreamingResponse(
        body(),
        media_type="text/event-stream",
        headers={
            "Cache-Control": "no-cache",
            "X-Accel-Buffering": "no",
            "Location": f"/api/runs/{run_id}",
        },
    )


async def _events(
    request: Request,
    workspace_id: uuid.UUID,
    run_id: uuid.UUID,
    after: int,
    *,
    created: bool = False,
) -> AsyncIterator[Event | None]:
    """History from the database, then live events, until the run ends or pauses.

    `created`: the run was created by this request, which committed it and handed it over:
    nothing of it is in the database yet that the live log (this process' own, or the shared
    one) won't have, so the stream follows the live log at once."""
    db: Database = request.app.state.db
    runs = _runs(request)
    log: EventLog = runs.events
    keepalive: float = request.app.state.settings.runs.keepalive_seconds
    if created and after == 0 and (log.shared or runs.is_local(run_id)):
        async for event in _follow(request, db, log, workspace_id, run_id, 0, keepalive):
            yield event
        return
    last = after
    async with db.session(write=False) as session:
        repo = RunRepository(session, workspace_id)
        run = await repo.get_or_404(run_id)
        status_now = run.status
        stored = await repo.events_after(run_id, after)
    for row in stored:
        last = row.seq
        yield Event(row.seq, row.type, row.data)
        if row.type in TERMINAL:
            return
    if (
        stored
        and stored[-1].type == "approval.required"
        and status_now == RunStatus.requires_action
    ):
        return
    if not (log.shared or runs.is_local(run_id)):
        # Executed by another process, whose live events this one can't see: follow what it
        # writes to the database, step by step.
        async for event in _poll(request, db, workspace_id, run_id, last, keepalive):
            yield event
        return
    async for event in _follow(request, db, log, workspace_id, run_id, last, keepalive):
        yield event


async def _follow(
    request: Request,
    db: Database,
    log: EventLog,
    workspace_id: uuid.UUID,
    run_id: uuid.UUID,
    last: int,
    keepalive: float,
) -> AsyncIterator[Event | None]:
    """Live events after `last`, until the run ends or pauses."""
    async for event in log.follow(run_id, last, idle=keepalive):
        if event is None:
            if await request.is_disconnected():
                return
            ended = await _ended_meanwhile(db, workspace_id, run_id, last)
            if ended is not None:
                for missed in ended:
                    yield missed
                return
            yield None
            continue
        last = event.seq
        yield event
        if event.type in TERMINAL or event.type == "approval.required":
            return


POLL_SECONDS = 0.25


async def _poll(
    request: Request,
    db: Database,
    workspace_id: uuid.UUID,
    run_id: uuid.UUID,
    last: int,
    keepalive: float,
) -> AsyncIterator[Event | None]:
    quiet = 0.0
    while True:
        async with db.session(write=False) as session:
            repo = RunRepository(session, workspace_id)
            rows = await repo.events_after(run_id, last)
            status_now = (await repo.get_or_404(run_id)).status
        for row in rows:
            last = row.seq
            yield Event(row.seq, row.type, row.data)
            if row.type in TERMINAL or (
                row.type == "approval.required" and status_now == RunStatus.requires_action
            ):
                return
        if status_now.is_final and not rows:
            return
        quiet = 0.0 if rows else quiet + POLL_SECONDS
        if quiet >= keepalive:
            quiet = 0.0
            if await request.is_disconnected():
                return
            yield None
        await asyncio.sleep(POLL_SECONDS)


async def _ended_meanwhile(
    db: Database, workspace_id: uuid.UUID, run_id: uuid.UUID, last: int
) -> list[Event] | None:
    """The rest of the history when the run ended or paused where this process didn't see it."""
    async with db.session(write=False) as session:
        repo = RunRepository(session, workspace_id)
        run = await repo.get_or_404(run_id)
        if run.status in (RunStatus.queued, RunStatus.running):
            return None
        return [Event(r.seq, r.type, r.data) for r in await repo.events_after(run_id, last)]


# Usage ---------------------------------------------------------------------------------------


@router.get("/usage", tags=["usage"], summary="Tokens used, by day, agent or model")
async def get_usage(
    session: DbSession,
    principal: Reader,
    group_by: Literal["day", "agent", "model"] = "day",
    start: Annotated[datetime | None, Query(alias="from", description="Inclusive, UTC.")] = None,
    end: Annotated[datetime | None, Query(alias="to", description="Exclusive, UTC.")] = None,
) -> UsageOut:
    start, end = (_utc(t) for t in (start, end))
    rows = await service.usage(session, principal.workspace_id, group_by, start, end)
    return UsageOut(group_by=group_by, rows=[UsageRow.model_validate(r) for r in rows])


def _utc(moment: datetime | None) -> datetime | None:
    if moment is None or moment.tzinfo is not None:
        return moment
    return moment.replace(tzinfo=UTC)  # a time without a zone is taken as UTC
