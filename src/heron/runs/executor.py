"""Executing runs: the agent loop of pydantic-ai, with every completed step persisted.

`execute_run` owns one run from claim to end. After each model answer and each batch of tool
results it writes, in one transaction, the new messages, the step records, the usage and the
events so far, and renews its lease; so a run whose process died continues from its last
completed step, and a completed tool call is never executed twice.

`RunExecutor` is the embedded job queue: runs execute as asyncio tasks of this process, within a
global and a per-workspace concurrency limit; a thread's runs execute one at a time, in order.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import functools
import json
import random
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any, TypeVar

import jsonschema
import structlog
from pydantic_ai import (
    Agent,
    DeferredToolRequests,
    DeferredToolResults,
    FunctionToolCallEvent,
    FunctionToolResultEvent,
    FunctionToolset,
    ModelMessage,
    ModelRequest,
    ModelResponse,
    ModelRetry,
    PartDeltaEvent,
    PartStartEvent,
    StructuredDict,
    TextPart,
    TextPartDelta,
    ToolApproved,
    ToolDenied,
    ToolFailed,
    UsageLimits,
    UserPromptPart,
)
from pydantic_ai.capabilities import Hooks
from pydantic_ai.exceptions import (
    AgentRunError,
    FallbackExceptionGroup,
    ModelAPIError,
    UsageLimitExceeded,
)
from pydantic_ai.settings import ModelSettings
from sqlalchemy import (
    Connection,
    Insert,
    Select,
    TextClause,
    Update,
    bindparam,
    delete,
    func,
    insert,
    select,
    text,
    update,
)
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session, aliased
from sqlalchemy.orm.attributes import set_committed_value

from heron.agents.spec import AgentSpec, render_instructions
from heron.core import heap
from heron.core.crypto import SecretBox
from heron.core.errors import HeronError
from heron.core.ids import new_id, utcnow
from heron.core.leases import owner_is_gone
from heron.core.tasks import cancel_and_wait
from heron.db.direct import direct_insert, direct_update
from heron.db.engine import Database, is_transient
from heron.knowledge.service import AgentKnowledge, embedder_factory
from heron.providers import service as providers
from heron.providers.connection import ProviderConnection
from heron.providers.models import Provider
from heron.providers.repository import by_names_statement
from heron.providers.runtime import HttpClients, ModelRuntime
from heron.runs import conversation
from heron.runs.events import EventLog
from heron.runs.models import Run, RunEvent, RunStatus, Step
from heron.tenancy.models import Workspace
from heron.threads.models import Message
from heron.tools.registry import ToolContext, default_registry
from heron.tools.toolset import agent_tool

log = structlog.get_logger("heron.runs")
LEASE = timedelta(seconds=30)
# A write that meets a transient database failure (busy, lost connection...) is tried again
# this many times in all, after short growing waits, before the execution gives up.
WRITE_ATTEMPTS = 8
WRITE_BACKOFF = 0.05
T = TypeVar("T")


class RunFailure(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class _Stored:
    """A message row as stored: its id, its run, and pydantic-ai's form of it."""

    id: uuid.UUID
    run_id: uuid.UUID | None
    raw: dict[str, Any]


@dataclass
class _Progress:
    """What one execution has produced and not yet written."""

    run: Run
    seq: int
    stored: list[_Stored] = field(default_factory=list)
    next_message_seq: int = 1  # the run holds its thread: nobody else adds messages meanwhile
    # pydantic-ai's messages dumped so far, by identity (the message is kept alive with its dump).
    dumps: dict[int, tuple[ModelMessage, dict[str, Any]]] = field(default_factory=dict)
    # Rows not yet written, as column values: written with one INSERT per table, and written
    # again as they are when a transaction has to be tried again.
    events: list[dict[str, Any]] = field(default_factory=list)
    steps: list[dict[str, Any]] = field(default_factory=list)
    step_index: int = 0
    # A model answer without tool calls (usually the last one) is not written by a checkpoint
    # of its own: whatever is written next carries it, the run's end at the latest, in the same
    # transaction. Until then: the conversation as of that answer, and the run values it set.
    answered: list[ModelMessage] | None = None
    values: dict[str, Any] = field(default_factory=dict)

    def step(
        self,
        kind: str,
        name: str,
        *,
        started_at: Any,
        duration_ms: float,
        tool_call_id: str | None = None,
        input_tokens: int = 0,
        output_tokens: int = 0,
        error: str | None = None,
    ) -> None:
        self.steps.append(
            {
                "workspace_id": self.run.workspace_id,
                "run_id": self.run.id,
                "index": self.step_index,
                "kind": kind,
                "name": name,
                "tool_call_id": tool_call_id,
                "started_at": started_at,
                "duration_ms": duration_ms,
                "input_tokens": input_tokens,
                "output_tokens": output_tokens,
                "error": error,
            }
        )
        self.step_index += 1


class RunContext:
    """Everything an execution needs from the process: database, event log, secrets, the HTTP
    clients to model providers. `aclose()` releases what it holds once no run executes."""

    def __init__(
        self,
        db: Database,
        events: EventLog,
        box: SecretBox,
        *,
        owner: str,
        run_timeout: float,
        per_workspace: int | None = None,
    ) -> None:
        self.db = db
        self.events = events
        self.box = box
        self.owner = owner
        self.run_timeout = run_timeout
        # Runs of one workspace executing at once across the deployment (every process's
        # claims count them in the database); more stay queued.
        self.per_workspace = per_workspace
        # Set while the process stops: cancelled tasks then leave their runs to be continued
        # (by this process' next start, or another worker once the lease lapses).
        self.stopping = False
        # Runs whose execution has left the agent loop and only records how it ended: a
        # cancellation no longer applies to them, and must not cut that record short.
        self.finishing: set[uuid.UUID] = set()
        self.http = HttpClients()
        self.leases = Leases(self)

    async def aclose(self) -> None:
        await self.leases.aclose()
        await self.http.aclose()


class Leases:
    """The leases of the runs this process executes, kept by one heartbeat for them all: one
    UPDATE every third of a lease, however many runs execute (a task per run made a third of
    all writes at 500 runs). The heartbeat runs while there are leases to keep."""

    def __init__(self, ctx: RunContext) -> None:
        self._ctx = ctx
        self._runs: set[uuid.UUID] = set()
        self._beat: asyncio.Task[None] | None = None
        self._idle = asyncio.Event()

    def hold(self, run_id: uuid.UUID) -> None:
        self._runs.add(run_id)
        self._idle.clear()
        if self._beat is None or self._beat.done():
            self._beat = asyncio.create_task(self._heartbeat(), name="run-leases")

    def release(self, run_id: uuid.UUID) -> None:
        self._runs.discard(run_id)
        if not self._runs:
            self._idle.set()  # the heartbeat ends now, not at its next beat

    async def renew(self) -> None:
        """Extend every held lease that is still this process' (a run taken over by another
        process keeps the other's)."""
        held = list(self._runs)
        if not held:
            return
        ctx = self._ctx

        def work(conn: Connection) -> None:
            until = utcnow() + LEASE
            for at in range(0, len(held), 500):
                conn.execute(
                    update(Run)
                    .where(Run.id.in_(held[at : at + 500]), Run.lease_owner == ctx.owner)
                    .values(lease_expires_at=until)
                )

        await _write(ctx, work)

    async def _heartbeat(self) -> None:
        while self._runs:
            # asyncio.timeout, not wait_for: on Python 3.11 wait_for can swallow a cancellation
            # that arrives as the wait ends, and a heartbeat that outlives its loop hangs it.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(LEASE.total_seconds() / 3):
                    await self._idle.wait()
            if not self._runs:
                return
            try:
                await self.renew()
            except (OSError, SQLAlchemyError) as exc:  # the database is away: try next time
                log.warning("lease_renewal_failed", runs=len(self._runs), error=str(exc)[:300])

    async def aclose(self) -> None:
        self._runs.clear()
        self._idle.set()
        if self._beat is not None:
            self._beat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._beat


async def _emit(
    ctx: RunContext, progress: _Progress, type: str, data: dict[str, Any], *, live: bool = True
) -> None:
    progress.seq += 1
    if live:
        await ctx.events.append(progress.run.id, progress.seq, type, data)
    progress.events.append(
        {
            "workspace_id": progress.run.workspace_id,
            "run_id": progress.run.id,
            "seq": progress.seq,
            "type": type,
            "data": data,
        }
    )


async def _write(ctx: RunContext, work: Callable[[Connection], T]) -> T:
    """`work` in one write transaction (`Database.transaction`: synchronous, on SQLite in one
    hand-over to the write connection's thread), run again from the start after a transient
    failure (a busy database, a connection found dead: the executor's PostgreSQL connections
    are not pinged before use)."""
    attempt = 1
    while True:
        try:
            return await ctx.db.transaction(work)
        except (SQLAlchemyError, OSError) as exc:
            if attempt >= WRITE_ATTEMPTS or not is_transient(exc):
                raise
            log.warning("run_write_retried", attempt=attempt, error=str(exc)[:300])
            await asyncio.sleep(WRITE_BACKOFF * 2 ** (attempt - 1) * (0.5 + random.random()))  # noqa: S311 (jitter)
            attempt += 1


async def _uninterrupted(aw: Awaitable[T]) -> T:
    """Await `aw` to its end even when this task is cancelled meanwhile; the cancellation is
    raised once it has ended."""
    task = asyncio.ensure_future(aw)
    cancelled = False
    while not task.done():
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            if task.cancelled():
                raise
            cancelled = True
    result = task.result()
    if cancelled:
        raise asyncio.CancelledError
    return result


# Fields pydantic-ai fills in on a message once the request is made (a stored prompt has none
# yet): a stored row that lacks only these still holds the same message and is kept as it is.
_FILLED_IN = ("timestamp", "instructions", "run_id", "conversation_id")


def _same_message(stored: dict[str, Any], dump: dict[str, Any]) -> bool:
    if stored is dump or stored == dump:
        return True
    if stored.keys() != dump.keys():
        return False
    return all(stored[k] == v or (k in _FILLED_IN and stored[k] is None) for k, v in dump.items())


def _dumps(progress: _Progress, messages: list[ModelMessage]) -> list[dict[str, Any]]:
    """Each message's stored form. A message seen before is not dumped again, except the last
    two: the request being made and its answer are still filled in by pydantic-ai."""
    cache, fresh = progress.dumps, {}
    dumps = []
    for index, message in enumerate(messages):
        hit = cache.get(id(message))
        if hit is not None and hit[0] is message and index < len(messages) - 2:
            dump = hit[1]
        else:
            dump = conversation.dump(message)
        fresh[id(message)] = (message, dump)
        dumps.append(dump)
    progress.dumps = fresh
    return dumps


async def _checkpoint(
    ctx: RunContext,
    progress: _Progress,
    messages: list[ModelMessage] | None,
    *,
    guard: Callable[[Connection], None] | None = None,
    **run_values: Any,
) -> None:
    """Write what happened since the last checkpoint, in one transaction, and renew the lease.
    `messages` is the whole conversation as the run sees it; None leaves the stored one as is.
    `guard` runs first in the transaction; whatever it raises rolls the whole write back."""
    run = progress.run
    run_values = progress.values | run_values
    kept = progress.stored
    replaced: list[_Stored] = []
    added: list[dict[str, Any]] = []
    if messages is not None:
        # pydantic-ai repairs the history it is given (it merges adjacent requests, for one),
        # so the stored conversation is brought in line with the run's: the rows from the first
        # difference on are replaced. Usually that is just the messages added since last time.
        dumps = _dumps(progress, messages)
        first = 0
        kept = []
        while (
            first < len(dumps)
            and first < len(progress.stored)
            and _same_message(progress.stored[first].raw, dumps[first])
        ):
            # Compared against the latest dump from now on: equal at once next time.
            kept.append(
                _Stored(progress.stored[first].id, progress.stored[first].run_id, dumps[first])
            )
            first += 1
        replaced = progress.stored[first:]
        for offset, (message, raw) in enumerate(zip(messages[first:], dumps[first:], strict=True)):
            role, parts = conversation.api_view(message)
            owner = replaced[offset].run_id if offset < len(replaced) else run.id
            # The id is known now, not at flush: the next checkpoint may replace the row.
            row_id = new_id()
            added.append({"id": row_id, "run_id": owner, "role": role, "parts": parts, "raw": raw})
            kept.append(_Stored(row_id, owner, raw))
    if not (replaced or added or progress.steps or run_values):
        # Only events (a run's first `run.started`, say): they go with the next write, and a
        # takeover announces itself with event ids above anything this execution streamed.
        return
    seq = progress.next_message_seq

    rows = [
        {"workspace_id": run.workspace_id, "thread_id": run.thread_id, "seq": seq + i} | row
        for i, row in enumerate(added)
    ]
    gone = [r.id for r in replaced]

    def work(conn: Connection) -> None:
        if guard is not None:
            guard(conn)
        if gone:
            conn.execute(
                delete(Message).where(
                    Message.workspace_id == run.workspace_id, Message.id.in_(gone)
                )
            )
        if conn.dialect.name == "postgresql":
            _write_progress_postgres(conn, progress, run_values, rows)
            return
        _write_progress_sqlite(conn, progress, run_values, rows)

    # Once handed over, the transaction ends as a whole (on SQLite its thread commits it
    # whatever happens to this task): a cancellation meanwhile waits for it, so what is kept in
    # memory below matches the database (a cancelled run's final write must not insert these
    # steps and events twice).
    async def write() -> None:
        await _write(ctx, work)
        progress.stored = kept
        progress.next_message_seq = seq + len(added)
        progress.events, progress.steps, progress.values = [], [], {}
        if messages is not None:
            progress.answered = None

    await _uninterrupted(write())


# Event ids of an execution that takes over a run start at the next multiple of this: events
# the lost execution streamed but never persisted had ids below it, so a client resuming with
# any id it saw gets every event of the new execution exactly once (`run.started` carries the
# attempt, telling it to drop the partial output it had).
EPOCH = 1_000_000


def _write_progress_sqlite(
    conn: Connection,
    progress: _Progress,
    run_values: dict[str, Any],
    messages: list[dict[str, Any]],
) -> None:
    """The new messages, steps and events since the last checkpoint, the run's new values and a
    renewed lease: statements run straight on the DBAPI cursor (heron.db.direct), the same rows
    as Core would write for a fraction of its cost per statement."""
    run = progress.run
    dialect = conn.dialect
    for model, rows in ((Message, messages), (Step, progress.steps), (RunEvent, progress.events)):
        direct_insert(model, dialect).execute(conn, rows)
    values = _progress_values(progress, run_values, utcnow())
    update = direct_update(Run, dialect, tuple(values), ("id", "workspace_id"))
    update.execute(conn, values | {"id": run.id, "workspace_id": run.workspace_id})


def _write_progress_postgres(
    conn: Connection,
    progress: _Progress,
    run_values: dict[str, Any],
    messages: list[dict[str, Any]],
) -> None:
    """What `_write_progress_sqlite` writes (messages, steps, events, the run) in one
    statement, so one round trip to the server: the rows go as JSON arrays, each expanded by
    `json_populate_recordset` in a data-modifying CTE of the run's UPDATE (three to four fewer
    round trips per checkpoint, each a step's worth of latency on a remote server)."""
    run = progress.run
    now = utcnow()
    tables = {
        Message.__tablename__: messages,
        Step.__tablename__: progress.steps,
        RunEvent.__tablename__: progress.events,
    }
    present = tuple(name for name, rows in tables.items() if rows)
    values = _progress_values(progress, run_values, now)
    params = _run_params(run, values)
    for name in present:
        records = [
            {"id": new_id(), "created_at": now, "updated_at": now} | row for row in tables[name]
        ]
        params[name] = json.dumps(records, default=_json_value, separators=(",", ":"))
    conn.execute(_checkpoint_statement(present, tuple(values)), params)


def _json_value(value: Any) -> Any:
    if isinstance(value, (uuid.UUID, enum.Enum)):
        return str(value.value if isinstance(value, enum.Enum) else value)
    if isinstance(value, datetime):
        return value.isoformat()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


@functools.lru_cache(maxsize=256)
def _checkpoint_statement(tables: tuple[str, ...], columns: tuple[str, ...]) -> TextClause:
    """PostgreSQL: INSERTs of `tables`' rows (each from a JSON array parameter named after the
    table) as CTEs of the UPDATE of the run's `columns`. Only the models' own table and column
    names are spliced in (an unknown one raises KeyError below), never input."""
    metadata = Run.metadata.tables
    ctes = []
    for at, name in enumerate(tables):
        names = ", ".join(f'"{column.name}"' for column in metadata[name].columns)
        ctes.append(
            f"i{at} AS (INSERT INTO {name} ({names}) SELECT {names} "  # noqa: S608
            f"FROM json_populate_recordset(NULL::{name}, CAST(:{name} AS json)))"
        )
    sets = ", ".join(f'"{column}" = :new_{column}' for column in columns)
    sql = f"UPDATE runs SET {sets} WHERE id = :run_id_ AND workspace_id = :workspace_id_"  # noqa: S608
    if ctes:
        sql = "WITH " + ", ".join(ctes) + " " + sql
    run = Run.__table__.c
    return text(sql).bindparams(
        bindparam("run_id_", type_=run.id.type),
        bindparam("workspace_id_", type_=run.workspace_id.type),
        *(bindparam(f"new_{column}", type_=run[column].type) for column in columns),
    )


def _progress_values(
    progress: _Progress, run_values: dict[str, Any], now: datetime
) -> dict[str, Any]:
    """What a checkpoint sets on the run: its last event, a renewed lease, `run_values`."""
    return {"last_event_seq": progress.seq, "lease_expires_at": now + LEASE, **run_values}


def _run_params(run: Run, values: dict[str, Any]) -> dict[str, Any]:
    """The parameters of `_update_run(tuple(values))` (or `_checkpoint_statement`'s UPDATE)."""
    params = {f"new_{column}": value for column, value in values.items()}
    return params | {"run_id_": run.id, "workspace_id_": run.workspace_id}


@functools.cache
def _insert_of(model: type[Any]) -> Insert:
    return insert(model)


@functools.lru_cache(maxsize=256)
def _update_run(columns: tuple[str, ...]) -> Update:
    """UPDATE of one run's `columns` (a handful of combinations occur), by bound parameters:
    built once per combination, as the checkpoint's other statements (building a statement and
    its cache key costs more than executing it, and a run writes a checkpoint per step)."""
    return (
        update(Run)
        .where(Run.id == bindparam("run_id_"), Run.workspace_id == bindparam("workspace_id_"))
        .values({column: bindparam(f"new_{column}") for column in columns})
    )


@dataclass(frozen=True)
class _Said:
    """A message of the thread as the execution reads it."""

    id: uuid.UUID
    run_id: uuid.UUID | None
    seq: int
    raw: dict[str, Any]


@dataclass
class _Claimed:
    """A claimed run, with what its execution reads first, all from the claim's transaction."""

    run: Run
    taken_over: bool  # from an execution that stopped mid-way
    history: list[_Said]
    allow_private_network: bool
    providers: list[Provider]
    steps_done: int


def _provider_names(spec: dict[str, Any]) -> set[str]:
    refs = [spec.get("model", ""), *(spec.get("fallbacks") or [])]
    return {str(ref).split(":", 1)[0] for ref in refs}


async def _claim(ctx: RunContext, run_id: uuid.UUID) -> _Claimed | None:
    """Take a queued run (or one whose lease lapsed) for this process, and read the
    conversation so far, the workspace and the provider connections it needs: one
    transaction."""

    def work(conn: Connection) -> _Claimed | None:
        with Session(bind=conn, expire_on_commit=False) as session:
            claimed = _claim_in(session, ctx, run_id)
            session.expunge_all()
            return claimed

    return await _write(ctx, work)


class _ClaimStatements:
    """The claim's statements, built once, on first use (building a statement costs more than
    running it; foreign keys' column types are known only once every model is imported)."""

    def __init__(self) -> None:
        earlier = aliased(Run)
        self.claim = (
            select(
                Run,
                select(earlier.id)
                .where(
                    earlier.thread_id == Run.thread_id,
                    earlier.id < Run.id,
                    earlier.status.in_(
                        [RunStatus.queued, RunStatus.running, RunStatus.requires_action]
                    ),
                )
                .exists(),
            )
            .where(Run.id == bindparam("run_id"))
            .with_for_update(of=Run)
        )
        self.insert_prompt = insert(Message).values(
            seq=select(func.coalesce(func.max(Message.seq), 0) + 1)
            .where(
                Message.workspace_id == bindparam("of_workspace"),
                Message.thread_id == bindparam("of_thread"),
            )
            .scalar_subquery()
        )
        self.history = (
            select(Message.id, Message.run_id, Message.seq, Message.raw)
            .where(
                Message.workspace_id == bindparam("workspace_id"),
                Message.thread_id == bindparam("thread_id"),
            )
            .order_by(Message.seq)
        )
        self.workspace_flags = select(Workspace.allow_private_network).where(
            Workspace.id == bindparam("workspace_id")
        )
        # The workspace's flag and how many of its runs are running, its row locked
        # (PostgreSQL) so that claims in several processes can't both take its last place.
        running_in_workspace = (
            select(func.count())
            .select_from(Run)
            .where(
                Run.workspace_id == bindparam("workspace_id"),
                Run.status == RunStatus.running,
                Run.id != bindparam("run_id"),
            )
            .scalar_subquery()
        )
        self.lock_workspace = (
            select(Workspace.allow_private_network, running_in_workspace)
            .where(Workspace.id == bindparam("workspace_id"))
            .with_for_update(of=Workspace)
        )
        self.steps_done = (
            select(func.count())
            .select_from(Step)
            .where(
                Step.workspace_id == bindparam("workspace_id"), Step.run_id == bindparam("run_id")
            )
        )


@functools.cache
def _claim_statements() -> _ClaimStatements:
    return _ClaimStatements()


def _prompt_params(run: Run) -> dict[str, Any]:
    """The parameters of `insert_prompt`: the run's user message, as the next of its thread."""
    prompt = ModelRequest(parts=[UserPromptPart(content=run.input[0]["text"])])
    role, parts = conversation.api_view(prompt)
    return {
        "id": new_id(),
        "workspace_id": run.workspace_id,
        "thread_id": run.thread_id,
        "run_id": run.id,
        "role": role,
        "parts": parts,
        "raw": conversation.dump(prompt),
        "of_workspace": run.workspace_id,
        "of_thread": run.thread_id,
    }


def _claim_values(ctx: RunContext, run: Run, now: datetime, *, taken_over: bool) -> dict[str, Any]:
    """What claiming `run` for this process sets on it."""
    return {
        "status": RunStatus.running,
        "started_at": run.started_at or now,
        "lease_owner": ctx.owner,
        "lease_expires_at": now + LEASE,
        "attempts": run.attempts + 1,
        "last_event_seq": (
            (run.last_event_seq // EPOCH + 1) * EPOCH if taken_over else run.last_event_seq
        ),
    }


def _claim_in(session: Session, ctx: RunContext, run_id: uuid.UUID) -> _Claimed | None:
    now = utcnow()
    sql = _claim_statements()
    found = session.execute(sql.claim, {"run_id": run_id}).first()
    if found is None:
        return None
    run, waits_for_earlier = found
    claimable = run.status == RunStatus.queued or (
        run.status == RunStatus.running
        and (
            run.lease_expires_at is None
            or run.lease_expires_at < now
            or run.lease_owner == ctx.owner
            or owner_is_gone(run.lease_owner)
        )
    )
    if not claimable:
        return None
    if waits_for_earlier:
        return None  # a thread's runs go one at a time, in order
    scope = {"workspace_id": run.workspace_id, "run_id": run.id}
    allow_private_network: bool | None = None
    if run.status == RunStatus.queued and ctx.per_workspace is not None:
        flags = session.execute(sql.lock_workspace, scope).one()
        allow_private_network = flags[0]
        if int(flags[1] or 0) >= ctx.per_workspace:
            return None  # stays queued; a run of the workspace that ends wakes it
    if allow_private_network is None:
        allow_private_network = session.scalar(sql.workspace_flags, scope)
    if run.attempts == 0:
        # The user's message joins the thread when the run starts, not when it was
        # queued: an enqueued run's message follows the answer to the run before it.
        session.execute(sql.insert_prompt, _prompt_params(run))
    taken_over = run.status == RunStatus.running
    claim = _claim_values(ctx, run, now, taken_over=taken_over)
    session.execute(_update_run(tuple(claim)), _run_params(run, claim))
    for column, value in claim.items():
        set_committed_value(run, column, value)  # as written: nothing left for a flush
    history = [
        _Said(*row)
        for row in session.execute(
            sql.history, {"workspace_id": run.workspace_id, "thread_id": run.thread_id}
        )
    ]
    names = sorted(_provider_names(run.spec))
    providers = session.scalars(
        by_names_statement(), {"workspace_id": run.workspace_id, "names": names}
    ).all()
    fresh = run.attempts == 1 and run.last_event_seq == 0  # nothing of it written yet
    steps_done = 0 if fresh else int(session.scalar(sql.steps_done, scope) or 0)
    return _Claimed(
        run=run,
        taken_over=taken_over,
        history=history,
        allow_private_network=bool(allow_private_network),
        providers=list(providers),
        steps_done=steps_done,
    )


async def claim_new(
    session: AsyncSession, ctx: RunContext, run: Run, providers: Sequence[Provider]
) -> _Claimed | None:
    """Write a new run already claimed by this process, with its user message, in the
    transaction of the request that creates it, and read what its execution needs first: the
    run starts as that request commits, without a claim of its own (a transaction, and most
    of a queued run's time to first token). `run` is the new run, not yet in any session; it
    gets the values written. `providers`: the connections its spec names, as the request read
    them. None when the workspace has no place free for another run: the caller queues it.

    For a thread with no active run only: a thread's runs go one at a time, in order."""
    sql = _claim_statements()
    now = utcnow()
    scope = {"workspace_id": run.workspace_id, "run_id": run.id}
    if ctx.per_workspace is None:
        allow_private_network = await session.scalar(sql.workspace_flags, scope)
    else:
        flags = (await session.execute(sql.lock_workspace, scope)).one()
        allow_private_network = flags[0]
        if int(flags[1] or 0) >= ctx.per_workspace:
            return None
    # Every column, with the defaults a flush would give the values left unset, then claimed.
    values = {column.key: getattr(run, column.key) for column in Run.__table__.columns}
    values |= {"input_tokens": 0, "output_tokens": 0, "attempts": 0, "last_event_seq": 0}
    values |= {"created_at": now, "updated_at": now}
    for column, value in values.items():
        setattr(run, column, value)
    claim = _claim_values(ctx, run, now, taken_over=False)
    await session.execute(_insert_of(Run), values | claim)
    for column, value in claim.items():
        setattr(run, column, value)
    await session.execute(sql.insert_prompt, _prompt_params(run))
    history = [
        _Said(*row)
        for row in await session.execute(
            sql.history, {"workspace_id": run.workspace_id, "thread_id": run.thread_id}
        )
    ]
    return _Claimed(
        run=run,
        taken_over=False,
        history=history,
        allow_private_network=bool(allow_private_network),
        providers=list(providers),
        steps_done=0,
    )


async def execute_run(
    ctx: RunContext, run_id: uuid.UUID, claimed: _Claimed | None = None
) -> RunStatus | None:
    """Execute a run until it ends or pauses. Returns its status, or None if not claimable.
    `claimed`: the run as `claim_new` claimed it (otherwise the execution claims it first)."""
    claimed = claimed or await _claim(ctx, run_id)
    if claimed is None:
        return None
    run = claimed.run
    progress = _Progress(run=run, seq=run.last_event_seq, step_index=claimed.steps_done)
    try:
        status = await _run_to_end(ctx, progress, claimed)
    finally:
        ctx.finishing.discard(run.id)
    heap.settle("run")  # the first time only: the libraries a run needs are loaded now
    return status


async def _run_to_end(ctx: RunContext, progress: _Progress, claimed: _Claimed) -> RunStatus:
    run = progress.run
    bound = structlog.get_logger("heron.runs").bind(run_id=str(run.id))
    messages: list[ModelMessage] = []
    ctx.leases.hold(run.id)
    try:
        try:
            if run.attempts == 1 and run.last_event_seq == 0:  # nothing of it written yet
                await _emit(ctx, progress, "run.queued", {"run_id": str(run.id)})
            await _emit(
                ctx,
                progress,
                "run.started",
                {
                    "run_id": str(run.id),
                    "attempt": run.attempts,
                    "resumed_after_interruption": claimed.taken_over,
                },
            )
            async with asyncio.timeout(ctx.run_timeout):
                status, values, messages = await _loop(ctx, progress, claimed)
        finally:
            # Whatever happens from here on, the execution records how the run ended.
            ctx.finishing.add(run.id)
    except asyncio.CancelledError:
        if ctx.stopping:
            raise
        await _finish(ctx, progress, messages, RunStatus.cancelled, "run.cancelled", {})
        return RunStatus.cancelled
    except TimeoutError:
        await _fail(
            ctx, progress, messages, "timeout", f"The run took longer than {ctx.run_timeout:g} s."
        )
        return RunStatus.failed
    except RunFailure as failure:
        await _fail(ctx, progress, messages, failure.code, failure.message)
        return RunStatus.failed
    finally:
        ctx.leases.release(run.id)
    event = "run.completed" if status == RunStatus.completed else "approval.required"
    try:
        await _finish(ctx, progress, messages, status, event, values)
    except _CancelledMeanwhile:
        # A cancel was committed while the run was pausing: the cancel wins.
        status = RunStatus.cancelled
        await _finish(ctx, progress, [], status, "run.cancelled", {})
    bound.info("run_ended", status=status.value)
    return status


class _CancelledMeanwhile(Exception):
    """The run's cancellation was committed before its pause could be."""


@functools.cache
def _cancel_requested_statement() -> Select[datetime | None]:
    # FOR UPDATE: the API's cancel locks the row too (PostgreSQL; SQLite has one writer at a
    # time anyway), so a cancel and a pause decide in turn and one sees the other's outcome.
    return (
        select(Run.cancel_requested_at)
        .where(Run.id == bindparam("run_id_"), Run.workspace_id == bindparam("workspace_id_"))
        .with_for_update()
    )


def _not_cancelled(run: Run) -> Callable[[Connection], None]:
    """A check, first in the transaction that pauses the run, that no cancel came meanwhile: a
    paused run must not keep a cancel that its API request said was taken."""

    def check(conn: Connection) -> None:
        params = {"run_id_": run.id, "workspace_id_": run.workspace_id}
        if conn.execute(_cancel_requested_statement(), params).scalar() is not None:
            raise _CancelledMeanwhile

    return check


async def _fail(
    ctx: RunContext, progress: _Progress, messages: list[ModelMessage], code: str, message: str
) -> None:
    await _finish(
        ctx,
        progress,
        messages,
        RunStatus.failed,
        "run.failed",
        {"error_code": code, "error_message": message},
    )


async def _finish(
    ctx: RunContext,
    progress: _Progress,
    messages: list[ModelMessage],
    status: RunStatus,
    event: str,
    values: dict[str, Any],
) -> None:
    run = progress.run
    data: dict[str, Any] = {"run_id": str(run.id), "status": status.value}
    if status == RunStatus.completed:
        data |= {"output": values.get("output"), "usage": _usage(values, run)}
    elif status == RunStatus.requires_action:
        data |= {"pending": values.get("pending_approvals")}
    elif status == RunStatus.failed:
        data |= {"error_code": values["error_code"], "error_message": values["error_message"]}
    # A run that ends early keeps what its completed steps wrote (an answer not written yet
    # among them), nothing of the step it was in; one that completes or pauses writes the
    # conversation as it ends.
    if status in (RunStatus.completed, RunStatus.requires_action):
        complete: list[ModelMessage] | None = messages
    else:
        complete = progress.answered
    # The final state is committed before anyone hears of it, so a client that reads the run
    # after the event sees the state the event announced. Shielded: a cancelled run still
    # records its end.
    await _emit(ctx, progress, event, data, live=False)
    seq = progress.seq
    ended = {"ended_at": utcnow()} if status.is_final else {}
    guard = _not_cancelled(run) if status == RunStatus.requires_action else None
    try:
        await asyncio.shield(
            _checkpoint(
                ctx,
                progress,
                complete,
                guard=guard,
                status=status,
                lease_owner=None,
                lease_expires_at=None,
                **ended,
                **values,
            )
        )
    except _CancelledMeanwhile:
        progress.events.pop()  # nothing was written: the announcement goes too
        progress.seq -= 1
        raise
    await ctx.events.append(run.id, seq, event, data)


def _usage(values: dict[str, Any], run: Run) -> dict[str, int]:
    return {
        "input_tokens": values.get("input_tokens", run.input_tokens),
        "output_tokens": values.get("output_tokens", run.output_tokens),
    }


def _load(
    ctx: RunContext, progress: _Progress, claimed: _Claimed
) -> tuple[list[ModelMessage], list[ProviderConnection]]:
    """The conversation so far and the provider connections, from what the claim read."""
    rows = claimed.history
    progress.stored = [_Stored(m.id, m.run_id, m.raw) for m in rows]
    progress.next_message_seq = max((m.seq for m in rows), default=0) + 1
    connections = [providers.connection_of(row, ctx.box) for row in claimed.providers]
    return conversation.load([m.raw for m in rows]), connections


async def _loop(
    ctx: RunContext, progress: _Progress, claimed: _Claimed
) -> tuple[RunStatus, dict[str, Any], list[ModelMessage]]:
    run = progress.run
    spec = AgentSpec.model_validate(run.spec)
    history, connections = _load(ctx, progress, claimed)
    deferred = _decisions(run)
    approvals = _Approvals(
        tools=frozenset(name for name, policy in spec.approval.items() if policy == "always"),
        decided={p["tool_call_id"]: p for p in run.pending_approvals or [] if "approve" in p},
    )
    if deferred is None:
        history, deferred = conversation.prepare_resume(history)
    instructions = render_instructions(spec, run.variables)
    tool_ctx = ToolContext.for_workspace(
        run.workspace_id, allow_private_network=claimed.allow_private_network
    )
    if spec.knowledge_bases:
        knowledge = AgentKnowledge(
            ctx.db, embedder_factory(ctx.box), run.workspace_id, spec.knowledge_bases
        )
        tool_ctx = replace(tool_ctx, knowledge=knowledge)
    registry = default_registry()
    tools = []
    for name in spec.tools:
        tool = agent_tool(registry.get(name), tool_ctx)
        tool.requires_approval = spec.approval.get(name) == "always"
        tools.append(tool)
    output_type: list[Any] = [
        StructuredDict(spec.output_schema) if spec.output_schema else str,
        DeferredToolRequests,
    ]
    # An agent without tools (and nothing to resume) gets no toolset and no hook for tool
    # errors: pydantic-ai prepares both at every step, empty or not (about 0.3 ms of a chat
    # run's time to first token).
    has_tools = bool(tools) or deferred is not None
    agent: Agent[None, Any] = Agent(
        output_type=output_type,
        toolsets=[FunctionToolset(tools)] if has_tools else [],
        capabilities=[Hooks(tool_execute_error=_tool_error_to_result)] if has_tools else [],
    )
    if spec.output_schema:
        schema = spec.output_schema

        @agent.output_validator
        def _matches_schema(output: Any) -> Any:
            if isinstance(output, dict):
                try:
                    jsonschema.validate(output, schema)
                except jsonschema.ValidationError as exc:
                    raise ModelRetry(
                        f"The answer does not match the schema: {exc.message}"
                    ) from None
            return output

    settings = ModelSettings(**spec.model_settings.model_dump(exclude_none=True))  # type: ignore[typeddict-item]
    rounds = 0
    input_tokens, output_tokens = run.input_tokens, run.output_tokens
    tool_started: dict[str, float] = {}
    messages: list[ModelMessage] = list(history)
    async with ModelRuntime(connections, clients=ctx.http) as runtime:
        try:
            model = runtime.fallback_model(spec.model, spec.fallbacks, fallbacks_field="fallbacks")
        except HeronError as exc:
            raise RunFailure("model_unavailable", exc.detail) from None
        try:
            async with agent.iter(
                None,
                model=model,
                message_history=history,
                instructions=instructions,
                model_settings=settings,
                deferred_tool_results=deferred,
                usage_limits=UsageLimits(request_limit=None),
            ) as agent_run:
                async for node in agent_run:
                    if Agent.is_model_request_node(node):
                        # The request carries the results of the tool calls just made: they are
                        # written before the model is asked again, so a crash from here on
                        # never runs those tools twice.
                        messages = [*agent_run.all_messages(), node.request]
                        await _checkpoint(ctx, progress, messages)
                        started = time.perf_counter()
                        begun = utcnow()
                        await _emit(
                            ctx,
                            progress,
                            "step.started",
                            {"kind": "model", "index": progress.step_index},
                        )
                        async with node.stream(agent_run.ctx) as stream:
                            async for event in stream:
                                text = _text_delta(event)
                                if text:
                                    await _emit(ctx, progress, "message.delta", {"text": text})
                        messages = list(agent_run.all_messages())
                        response = messages[-1]
                        assert isinstance(response, ModelResponse)
                        answered = runtime.answered_by(response)
                        model_name = (
                            str(answered) if answered else (response.model_name or spec.model)
                        )
                        input_tokens += response.usage.input_tokens
                        output_tokens += response.usage.output_tokens
                        progress.step(
                            "model",
                            model_name,
                            started_at=begun,
                            duration_ms=(time.perf_counter() - started) * 1000,
                            input_tokens=response.usage.input_tokens,
                            output_tokens=response.usage.output_tokens,
                        )
                        _, parts = conversation.api_view(response)
                        await _emit(
                            ctx,
                            progress,
                            "message.completed",
                            {"role": "assistant", "parts": parts, "model": model_name},
                        )
                        answer: dict[str, Any] = {
                            "input_tokens": input_tokens,
                            "output_tokens": output_tokens,
                            "model": model_name,
                        }
                        if response.tool_calls:
                            # Written before any of its tools runs: a crash from here on
                            # never asks the model again for calls that may have run.
                            await _checkpoint(ctx, progress, messages, **answer)
                        else:
                            # No tool runs on it: the next write carries it (the run's end,
                            # or the request a failed output check makes), one less per run.
                            progress.answered, progress.values = messages, answer
                    elif Agent.is_call_tools_node(node):
                        if node.model_response.tool_calls:
                            if rounds >= spec.max_steps:
                                raise RunFailure(
                                    "max_steps",
                                    f"The agent reached its limit of {spec.max_steps} "
                                    "tool-call rounds.",
                                )
                            rounds += 1
                        async with node.stream(agent_run.ctx) as events:
                            async for event in events:
                                await _tool_event(ctx, progress, event, tool_started, approvals)
                    elif Agent.is_end_node(node):
                        messages = list(agent_run.all_messages())
        except UsageLimitExceeded as exc:
            raise RunFailure("limit_exceeded", str(exc)) from None
        except (ModelAPIError, FallbackExceptionGroup) as exc:
            raise RunFailure("model_unavailable", _describe(exc)) from None
        except AgentRunError as exc:
            raise RunFailure("model_error", _describe(exc)) from None
        output = agent_run.result.output if agent_run.result else None
    values: dict[str, Any] = {"input_tokens": input_tokens, "output_tokens": output_tokens}
    if isinstance(output, DeferredToolRequests):
        pending = [
            {"tool_call_id": c.tool_call_id, "name": c.tool_name, "arguments": c.args_as_dict()}
            for c in output.approvals
        ]
        return RunStatus.requires_action, values | {"pending_approvals": pending}, messages
    return RunStatus.completed, values | {"output": output, "pending_approvals": None}, messages


def _text_delta(event: Any) -> str | None:
    if isinstance(event, PartStartEvent) and isinstance(event.part, TextPart):
        return event.part.content or None
    if isinstance(event, PartDeltaEvent) and isinstance(event.delta, TextPartDelta):
        return event.delta.content_delta or None
    return None


@dataclass(frozen=True)
class _Approvals:
    """Which tools need a human, and what the humans decided for this resumption."""

    tools: frozenset[str]
    decided: dict[str, dict[str, Any]]


async def _tool_event(
    ctx: RunContext,
    progress: _Progress,
    event: Any,
    started: dict[str, float],
    approvals: _Approvals,
) -> None:
    if isinstance(event, FunctionToolCallEvent):
        decision = approvals.decided.get(event.tool_call_id)
        if event.part.tool_name in approvals.tools and decision is None:
            return  # not started: it waits for a human (`approval.required` says so)
        if decision is not None and not decision.get("approve"):
            return  # denied: it never runs; its result says so
        started[event.tool_call_id] = time.perf_counter()
        override = decision.get("override_arguments") if decision else None
        await _emit(
            ctx,
            progress,
            "tool_call.started",
            {
                "id": event.tool_call_id,
                "name": event.part.tool_name,
                "arguments": override if override is not None else event.part.args_as_dict(),
            },
        )
    elif isinstance(event, FunctionToolResultEvent):
        part = event.part
        began = started.pop(event.tool_call_id, time.perf_counter())
        failed = getattr(part, "outcome", "success") not in ("success", None)
        content = (
            part.model_response_str() if hasattr(part, "model_response_str") else str(part.content)
        )
        progress.step(
            "tool",
            part.tool_name or "",
            tool_call_id=event.tool_call_id,
            started_at=utcnow(),
            duration_ms=(time.perf_counter() - began) * 1000,
            error=content if failed else None,
        )
        key = "error" if failed else "result"
        data: dict[str, Any] = {"id": event.tool_call_id, "name": part.tool_name, key: content}
        if not failed and isinstance(part.content, dict):
            data["data"] = part.content  # structured results (search_knowledge's citations)
        await _emit(ctx, progress, "tool_call.completed", data)


async def _tool_error_to_result(
    ctx: Any, *, call: Any, tool_def: Any, args: Any, error: Exception
) -> Any:
    raise ToolFailed(f"{type(error).__name__}: {error}")


def _decisions(run: Run) -> DeferredToolResults | None:
    """Approval decisions given with `resume`, as pydantic-ai takes them."""
    decided = [p for p in run.pending_approvals or [] if "approve" in p]
    if not decided:
        return None
    approvals: dict[str, bool | ToolApproved | ToolDenied] = {}
    for p in decided:
        if not p["approve"]:
            approvals[p["tool_call_id"]] = ToolDenied(
                p.get("reason") or "A human denied this call."
            )
        elif p.get("override_arguments") is not None:
            approvals[p["tool_call_id"]] = ToolApproved(override_args=p["override_arguments"])
        else:
            approvals[p["tool_call_id"]] = True
    return DeferredToolResults(approvals=approvals)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, BaseExceptionGroup):  # every model of a fallback chain failed
        return "; ".join(_describe(e) for e in exc.exceptions)[:1000]
    return (str(exc) or type(exc).__name__)[:1000]


class Started:
    """A place this process holds for a run that a request's transaction is creating already
    claimed (`RunExecutor.begin`): once that transaction commits, `start()` executes the run;
    if it rolls back, `give_back()` frees the place. Either ends the hold; later calls do
    nothing."""

    def __init__(self, executor: RunExecutor, workspace_id: uuid.UUID) -> None:
        self._executor: RunExecutor | None = executor
        self.workspace_id = workspace_id
        self.claimed: _Claimed | None = None

    def start(self) -> None:
        executor = self._end()
        if executor is not None:
            executor._start(self)

    def give_back(self) -> None:
        executor = self._end()
        if executor is not None and not executor._closed:
            executor._pump()  # a queued run may take the place

    def _end(self) -> RunExecutor | None:
        executor, self._executor = self._executor, None
        if executor is not None:
            executor._unreserve(self.workspace_id)
        return executor


class RunExecutor:
    """The embedded job queue: runs as tasks of this process, bounded globally and per
    workspace."""

    def __init__(self, ctx: RunContext, *, max_concurrency: int, per_workspace: int) -> None:
        self.ctx = ctx
        self._max = max_concurrency
        self._per_workspace = per_workspace
        self._waiting: deque[tuple[uuid.UUID, uuid.UUID]] = deque()
        self._running: dict[uuid.UUID, tuple[uuid.UUID, asyncio.Task[Any]]] = {}
        self._closed = False
        self._sweeper: asyncio.Task[None] | None = None
        self._watcher: asyncio.Task[None] | None = None
        self._waiters: dict[uuid.UUID, list[asyncio.Future[None]]] = {}
        self._cancelling: dict[uuid.UUID, asyncio.Task[None]] = {}
        self._queued_grace: timedelta | None = None
        # Places held for runs being created by a request (`begin`), by workspace.
        self._reserved: dict[uuid.UUID, int] = {}

    @property
    def events(self) -> EventLog:
        return self.ctx.events

    async def begin(
        self, session: AsyncSession, run: Run, providers: Sequence[Provider]
    ) -> Started | None:
        """Claim a new run for this process in the transaction that creates it (`claim_new`),
        when a place is free here and in its workspace and no run waits before it. The caller
        starts it once that transaction has committed, or gives the place back; None: the run
        is to be queued as usual."""
        workspace_id = run.workspace_id
        if self._closed or self._waiting or self._in_use() >= self._max:
            return None
        if self._busy().get(workspace_id, 0) >= self._per_workspace:
            return None
        self._reserved[workspace_id] = self._reserved.get(workspace_id, 0) + 1
        started = Started(self, workspace_id)
        try:
            claimed = await claim_new(session, self.ctx, run, providers)
        except BaseException:
            started.give_back()
            raise
        if claimed is None:
            started.give_back()
            return None
        started.claimed = claimed
        return started

    def _in_use(self) -> int:
        return len(self._running) + sum(self._reserved.values())

    def _busy(self) -> dict[uuid.UUID, int]:
        """Runs executing or about to, by workspace."""
        busy = dict(self._reserved)
        for workspace_id, _ in self._running.values():
            busy[workspace_id] = busy.get(workspace_id, 0) + 1
        return busy

    def submit(self, run_id: uuid.UUID, workspace_id: uuid.UUID) -> None:
        if self._closed or run_id in self._running or (run_id, workspace_id) in self._waiting:
            return
        self._waiting.append((run_id, workspace_id))
        self._pump()

    async def execute(self, run_id: uuid.UUID, workspace_id: uuid.UUID) -> None:
        """Submit the run and wait until this process is done with it (it ended, paused, was
        not claimable, or the process is stopping): how a worker's job slot holds a run."""
        if self._closed:
            return
        done = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(run_id, []).append(done)
        self.submit(run_id, workspace_id)
        if not self.is_local(run_id):  # refused (closing): nothing will resolve the waiter
            self._release(run_id)
        await done

    def _release(self, run_id: uuid.UUID) -> None:
        for waiter in self._waiters.pop(run_id, []):
            if not waiter.done():
                waiter.set_result(None)

    async def announce(self, run_id: uuid.UUID, seq: int, type: str, data: dict[str, Any]) -> None:
        """Publish an event recorded outside an execution (a cancelled queued run) live."""
        await self.ctx.events.append(run_id, seq, type, data)

    def is_local(self, run_id: uuid.UUID) -> bool:
        """Whether this process executes the run (or will, once a slot frees)."""
        return run_id in self._running or any(r == run_id for r, _ in self._waiting)

    def cancel(self, run_id: uuid.UUID) -> bool:
        """Stop a run executing here: its task is cancelled, again and again until it has
        taken the cancellation (one cancel can be lost: `heron.core.tasks`); then it records
        the end, which no later cancel interrupts."""
        entry = self._running.get(run_id)
        if entry is None:
            return False
        if run_id not in self.ctx.finishing and run_id not in self._cancelling:
            self._cancelling[run_id] = asyncio.create_task(
                self._cancel(run_id, entry[1]), name=f"cancel-{run_id}"
            )
        return True

    async def _cancel(self, run_id: uuid.UUID, task: asyncio.Task[Any]) -> None:
        try:
            await cancel_and_wait([task], still_wanted=lambda _: run_id not in self.ctx.finishing)
        finally:
            self._cancelling.pop(run_id, None)

    def _pump(self) -> None:
        busy = self._busy()
        in_use = self._in_use()
        kept: deque[tuple[uuid.UUID, uuid.UUID]] = deque()
        while self._waiting and in_use < self._max:
            run_id, workspace_id = self._waiting.popleft()
            if busy.get(workspace_id, 0) >= self._per_workspace:
                kept.append((run_id, workspace_id))
                continue
            busy[workspace_id] = busy.get(workspace_id, 0) + 1
            in_use += 1
            task = asyncio.create_task(self._execute(run_id), name=f"run-{run_id}")
            self._running[run_id] = (workspace_id, task)
        self._waiting.extendleft(reversed(kept))

    def _start(self, started: Started) -> None:
        """The transaction that claimed `started`'s run committed: it executes now."""
        claimed = started.claimed
        assert claimed is not None
        run_id = claimed.run.id
        if self._closed:
            return  # stopping: the next start continues it, as any run this process held
        task = asyncio.create_task(self._execute(run_id, claimed), name=f"run-{run_id}")
        self._running[run_id] = (started.workspace_id, task)

    def _unreserve(self, workspace_id: uuid.UUID) -> None:
        left = self._reserved.get(workspace_id, 0) - 1
        if left > 0:
            self._reserved[workspace_id] = left
        else:
            self._reserved.pop(workspace_id, None)

    async def _execute(self, run_id: uuid.UUID, claimed: _Claimed | None = None) -> None:
        try:
            status = await execute_run(self.ctx, run_id, claimed)
            if status is not None and status != RunStatus.running:
                await self._wake_next(run_id, thread=status.is_final)
        except Exception:
            log.exception("run_crashed", run_id=str(run_id))
        finally:
            self._running.pop(run_id, None)
            self._release(run_id)
            if not self._closed:
                self._pump()

    async def _wake_next(self, run_id: uuid.UUID, *, thread: bool) -> None:
        """A run ended or paused: the next queued run of its thread (when it ended) and the
        oldest queued run of its workspace may go now."""
        async with self.ctx.db.session(write=False) as session:
            run = await session.get(Run, run_id)
            if run is None:
                return
            waiting = select(Run.id, Run.workspace_id).where(Run.status == RunStatus.queued)
            candidates = [
                waiting.where(Run.workspace_id == run.workspace_id).order_by(Run.id).limit(1)
            ]
            if thread:
                candidates.append(
                    waiting.where(Run.thread_id == run.thread_id).order_by(Run.id).limit(1)
                )
            for query in candidates:
                found = (await session.execute(query)).first()
                if found is not None:
                    self.submit(found[0], found[1])

    def start(self, sweep_seconds: float = 2.0, *, queued_grace: timedelta | None = None) -> None:
        """Begin looking, every `sweep_seconds`, for runs nobody is executing: queued ones and
        running ones whose executor's lease lapsed (its process died).

        `queued_grace`: leave queued runs alone until they have waited this long (workers: the
        job queue delivers them; the sweep only catches a job that was lost)."""
        self._queued_grace = queued_grace
        self._sweeper = asyncio.create_task(self._sweep(sweep_seconds), name="run-sweeper")
        self._watcher = asyncio.create_task(self._watch_cancels(), name="cancel-watcher")

    async def _watch_cancels(self, every: float = 0.5) -> None:
        """Stop local runs whose cancellation was asked of another process (a cancel request
        lands on any API worker; the run executes on one)."""
        while not self._closed:
            await asyncio.sleep(every)
            local = list(self._running)
            if not local:
                continue
            try:
                async with self.ctx.db.session(write=False) as session:
                    wanted = (
                        await session.scalars(
                            select(Run.id).where(
                                Run.id.in_(local), Run.cancel_requested_at.is_not(None)
                            )
                        )
                    ).all()
            except (OSError, SQLAlchemyError) as exc:
                log.warning("cancel_watch_failed", error=str(exc))
                continue
            for run_id in wanted:
                self.cancel(run_id)

    async def _sweep(self, every: float) -> None:
        while not self._closed:
            await asyncio.sleep(every)
            try:
                await self.recover(stale_only=True)
            except (OSError, SQLAlchemyError) as exc:  # the database is away: try again later
                log.warning("run_sweep_failed", error=str(exc))

    async def recover(self, *, stale_only: bool = False) -> int:
        """Take up runs that were queued or running when the process stopped."""
        now = utcnow()
        stmt = select(
            Run.id,
            Run.workspace_id,
            Run.status,
            Run.lease_owner,
            Run.lease_expires_at,
            Run.updated_at,
        )
        stmt = stmt.where(Run.status.in_([RunStatus.queued, RunStatus.running])).order_by(Run.id)
        async with self.ctx.db.session(write=False) as session:
            rows = (await session.execute(stmt)).all()
        taken = 0
        grace = self._queued_grace
        for run_id, workspace_id, status, owner, expires, updated in rows:
            if self.is_local(run_id):
                continue
            lapsed = expires is None or expires < now or owner_is_gone(owner)
            if status == RunStatus.running and stale_only and not lapsed:
                continue
            if status == RunStatus.queued and grace is not None and updated > now - grace:
                continue
            self.submit(run_id, workspace_id)
            taken += 1
        return taken

    async def close(self) -> None:
        """Stop: cancel local runs' tasks without recording a cancellation, so the next start
        continues them from their last completed step."""
        self._closed = True
        self.ctx.stopping = True
        for helper in (self._sweeper, self._watcher):
            if helper is not None:
                helper.cancel()
        runs = {task: run_id for run_id, (_, task) in self._running.items()}
        await cancel_and_wait(runs, still_wanted=lambda task: runs[task] not in self.ctx.finishing)
        await asyncio.gather(*self._cancelling.values(), return_exceptions=True)
        for run_id in list(self._waiters):
            self._release(run_id)
        await self.ctx.aclose()  # the lease heartbeat stops: release after it, not before
        if runs:
            await self._release_leases()

    async def _release_leases(self) -> None:
        """Let the runs this process stopped be taken over at once, not when the lease lapses."""
        try:
            async with self.ctx.db.session(write=True) as session, session.begin():
                await session.execute(
                    update(Run)
                    .where(Run.lease_owner == self.ctx.owner, Run.status == RunStatus.running)
                    .values(lease_expires_at=utcnow())
                )
        except (OSError, SQLAlchemyError) as exc:  # they will be taken over when leases lapse
            log.warning("lease_release_failed", error=str(exc))


__all__ = ["RunContext", "RunExecutor", "Started", "claim_new", "execute_run"]
