"""Runs: creation (with the double-texting policies), cancellation, approvals, usage.

The service decides; work is handed to the job queue only after the request's transaction
commits (`after_commit`), so a worker never looks for a run that isn't there yet.
"""

from __future__ import annotations

import functools
import uuid
from collections.abc import Sequence
from datetime import date, datetime
from typing import Any, Literal

from sqlalchemy import Select, Update, bindparam, func, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from heron.agents.references import check_references
from heron.agents.service import AgentRepository, VersionRepository
from heron.agents.spec import AgentSpec, render_instructions
from heron.core.auth import Principal
from heron.core.errors import Conflict, NotFound, ValidationFailed
from heron.core.ids import new_id, utcnow
from heron.core.pagination import PageParams
from heron.db.repository import WorkspaceRepository
from heron.db.session import after_commit, after_rollback
from heron.runs.dispatch import Runs
from heron.runs.models import Run, RunEvent, RunStatus, Step
from heron.runs.schemas import Approval, OnActiveRun, RunCreate
from heron.threads.models import Thread
from heron.threads.repository import MessageRepository, ThreadRepository

ACTIVE = (RunStatus.queued, RunStatus.running, RunStatus.requires_action)


class RunRepository(WorkspaceRepository[Run]):
    model = Run
    noun = "run"

    async def of_thread(self, thread_id: uuid.UUID, params: PageParams) -> Sequence[Run]:
        return await self.page(params, Run.thread_id == thread_id)

    async def active_on(self, thread_id: uuid.UUID) -> Sequence[uuid.UUID]:
        """The ids of the thread's active runs, oldest first."""
        params = {"workspace_id": self.workspace_id, "thread_id": thread_id}
        return (await self.session.scalars(_active_on(), params)).all()

    async def locked_or_404(self, run_id: uuid.UUID) -> Run:
        """The run read afresh, its row locked until the transaction ends: a cancel and the
        executor's pause of the run decide in turn (PostgreSQL; on SQLite a write transaction
        holds the one writer already)."""
        stmt = self.select().where(Run.id == run_id).with_for_update()
        run = await self.session.scalar(stmt.execution_options(populate_existing=True))
        if run is None:
            raise NotFound(f"No {self.noun} with id {run_id} in this workspace.")
        return run

    async def steps(self, run_id: uuid.UUID) -> Sequence[Step]:
        return (
            await self.session.scalars(
                select(Step)
                .where(Step.workspace_id == self.workspace_id, Step.run_id == run_id)
                .order_by(Step.index)
            )
        ).all()

    async def events_after(self, run_id: uuid.UUID, seq: int) -> Sequence[RunEvent]:
        return (
            await self.session.scalars(
                select(RunEvent)
                .where(
                    RunEvent.workspace_id == self.workspace_id,
                    RunEvent.run_id == run_id,
                    RunEvent.seq > seq,
                )
                .order_by(RunEvent.seq)
            )
        ).all()


@functools.cache
def _active_on() -> Select[uuid.UUID]:
    # Built once, on first use (foreign keys' column types are known once all models are).
    return (
        select(Run.id)
        .where(
            Run.workspace_id == bindparam("workspace_id"),
            Run.thread_id == bindparam("thread_id"),
            Run.status.in_(ACTIVE),
        )
        .order_by(Run.id)
    )


@functools.cache
def _touch_thread() -> Update:
    return (
        update(Thread)
        .where(
            Thread.id == bindparam("thread_id_"), Thread.workspace_id == bindparam("workspace_id_")
        )
        .values(updated_at=bindparam("now_"))
        .returning(Thread.id)
    )


async def create_run(
    session: AsyncSession,
    principal: Principal,
    thread_id: uuid.UUID,
    body: RunCreate,
    runs: Runs,
) -> Run:
    # The thread's row first, touched and so locked until the transaction ends (PostgreSQL;
    # SQLite's writer is one already): runs created on a thread at once decide in turn, each
    # seeing the one before as active.
    touched = await session.execute(
        _touch_thread(),
        {"workspace_id_": principal.workspace_id, "thread_id_": thread_id, "now_": utcnow()},
    )
    if touched.first() is None:
        raise NotFound(f"No thread with id {thread_id} in this workspace.")
    agents = AgentRepository(session, principal.workspace_id)
    agent = await agents.by_id_or_name(body.agent)
    version, spec = await _pinned_spec(
        session, principal.workspace_id, agent.id, agent.draft, agent.latest_version, body.version
    )
    providers = await check_references(session, principal.workspace_id, spec)
    render_instructions(spec, body.variables)  # a missing variable is a 422 now, not a failed run
    repo = RunRepository(session, principal.workspace_id)
    active = await repo.active_on(thread_id)
    if active:
        await _handle_active(session, principal, runs, active, body.on_active_run)
    text = body.input if isinstance(body.input, str) else "\n".join(p.text for p in body.input)
    run = Run(
        id=new_id(),
        workspace_id=principal.workspace_id,
        thread_id=thread_id,
        agent_id=agent.id,
        agent_version=version,
        spec=spec.model_dump(mode="json"),
        status=RunStatus.queued,
        input=[{"type": "text", "text": text}],
        variables=body.variables,
    )
    # A thread with no active run whose process executes runs itself and has a place free:
    # the run is written already claimed, and starts as this transaction commits.
    started = None if active else await runs.begin(session, run, providers)
    if started is not None:
        after_rollback(session, started.give_back)
        after_commit(session, started.start)
        return run
    repo.add(run)
    await session.flush()
    after_commit(session, lambda: runs.submit(run.id, run.workspace_id))
    return run


async def _pinned_spec(
    session: AsyncSession,
    workspace_id: uuid.UUID,
    agent_id: uuid.UUID,
    draft: dict[str, Any],
    latest: int,
    wanted: int | Literal["draft"] | None,
) -> tuple[int | None, AgentSpec]:
    if wanted == "draft":
        return None, AgentSpec.model_validate(draft)
    number = wanted or latest
    if not number:
        raise ValidationFailed(
            "version: the agent has no published version; publish it or run the `draft`."
        )
    version = await VersionRepository(session, workspace_id).number(agent_id, number)
    return number, AgentSpec.model_validate(version.spec)


async def _handle_active(
    session: AsyncSession,
    principal: Principal,
    runs: Runs,
    active: Sequence[uuid.UUID],
    policy: OnActiveRun,
) -> None:
    if policy == "reject":
        raise Conflict(
            f"The thread has an active run ({active[0]}); wait, cancel it, or pass "
            "on_active_run=enqueue|interrupt|rollback."
        )
    if policy == "enqueue":
        return
    for run_id in active:
        run = await cancel_run(session, principal, run_id, runs)
        if policy == "rollback":
            await MessageRepository(session, principal.workspace_id).delete_of_run(run.id)
            await session.delete(run)
    await session.flush()


async def cancel_run(
    session: AsyncSession, principal: Principal, run_id: uuid.UUID, runs: Runs
) -> Run:
    run = await RunRepository(session, principal.workspace_id).locked_or_404(run_id)
    if run.status.is_final:
        return run
    run.cancel_requested_at = utcnow()
    if run.status == RunStatus.running:
        # The executing task records the cancellation itself, once its work has stopped.
        after_commit(session, lambda: runs.cancel(run.id))
        return run
    run.status = RunStatus.cancelled
    run.ended_at = utcnow()
    run.last_event_seq += 1
    session.add(
        RunEvent(
            workspace_id=run.workspace_id,
            run_id=run.id,
            seq=run.last_event_seq,
            type="run.cancelled",
            data={"run_id": str(run.id), "status": "cancelled"},
        )
    )
    seq = run.last_event_seq
    after_commit(
        session,
        lambda: runs.announce(
            run.id, seq, "run.cancelled", {"run_id": str(run.id), "status": "cancelled"}
        ),
    )
    await session.flush()
    return run


async def resume_run(
    session: AsyncSession,
    principal: Principal,
    run_id: uuid.UUID,
    decisions: list[Approval],
    runs: Runs,
) -> Run:
    run = await RunRepository(session, principal.workspace_id).get_or_404(run_id)
    if run.status != RunStatus.requires_action:
        raise Conflict(
            f"The run is {run.status.value}; only a run that requires action can resume."
        )
    pending = {p["tool_call_id"]: p for p in run.pending_approvals or []}
    given = {d.tool_call_id: d for d in decisions}
    unknown = sorted(set(given) - set(pending))
    missing = sorted(set(pending) - set(given))
    if unknown or missing:
        raise ValidationFailed(
            "decisions: "
            + "; ".join(
                [f"not pending: {', '.join(unknown)}"] * bool(unknown)
                + [f"no decision for: {', '.join(missing)}"] * bool(missing)
            )
        )
    run.pending_approvals = [
        {
            **pending[call_id],
            "approve": d.approve,
            "reason": d.reason,
            "override_arguments": d.arguments,
        }
        for call_id, d in given.items()
    ]
    run.status = RunStatus.queued
    await session.flush()
    after_commit(session, lambda: runs.submit(run.id, run.workspace_id))
    return run


async def usage(
    session: AsyncSession,
    workspace_id: uuid.UUID,
    group_by: Literal["day", "agent", "model"],
    start: datetime | None,
    end: datetime | None,
) -> list[dict[str, Any]]:
    from heron.agents.models import Agent

    key: Any
    if group_by == "day":
        dialect = session.bind.dialect.name if session.bind is not None else "sqlite"
        utc = func.timezone("UTC", Step.started_at) if dialect == "postgresql" else Step.started_at
        key = func.date(utc)
    elif group_by == "model":
        key = Step.name
    else:
        key = Agent.name
    stmt = (
        select(
            key.label("key"),
            func.count(func.distinct(Step.run_id)),
            func.count(Step.id),
            func.coalesce(func.sum(Step.input_tokens), 0),
            func.coalesce(func.sum(Step.output_tokens), 0),
        )
        .join(Run, Run.id == Step.run_id)
        .join(Agent, Agent.id == Run.agent_id)
        .where(Step.workspace_id == workspace_id, Step.kind == "model")
        .group_by(key)
        .order_by(key)
    )
    if start is not None:
        stmt = stmt.where(Step.started_at >= start)
    if end is not None:
        stmt = stmt.where(Step.started_at < end)
    rows = (await session.execute(stmt)).all()
    return [
        {
            "key": k.isoformat() if isinstance(k, date) else str(k),
            "runs": int(r),
            "steps": int(s),
            "input_tokens": int(i),
            "output_tokens": int(o),
        }
        for k, r, s, i, o in rows
    ]


async def get_thread_or_404(
    session: AsyncSession, workspace_id: uuid.UUID, thread_id: uuid.UUID
) -> Thread:
    return await ThreadRepository(session, workspace_id).get_or_404(thread_id)


__all__ = ["NotFound", "RunRepository", "cancel_run", "create_run", "resume_run", "usage"]
