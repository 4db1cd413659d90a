"""The executor's writes: `Database.transaction` (on SQLite, one hand-over to the write
connection's thread per transaction) and a checkpoint that a cancellation can't cut in two."""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import Callable

import pytest
from sqlalchemy import Connection, delete, insert, select

from heron.db.engine import Database
from heron.runs.executor import _uninterrupted
from heron.tenancy.models import Workspace


async def _names(db: Database, ids: list[uuid.UUID]) -> list[str]:
    async with db.session(write=False) as session:
        rows = await session.scalars(
            select(Workspace.name).where(Workspace.id.in_(ids)).order_by(Workspace.name)
        )
        return list(rows)


async def test_a_transaction_commits_what_it_wrote_and_rolls_back_all_of_a_failed_one(
    db: Database,
) -> None:
    kept, lost = uuid.uuid4(), uuid.uuid4()

    def write(conn: Connection) -> int:
        conn.execute(insert(Workspace).values(id=kept, name="kept"))
        return len(conn.execute(select(Workspace.id).where(Workspace.id == kept)).all())

    assert await db.transaction(write) == 1  # its own write is visible inside it

    def fail(conn: Connection) -> None:
        conn.execute(insert(Workspace).values(id=lost, name="lost"))
        conn.execute(delete(Workspace).where(Workspace.id == kept))
        raise RuntimeError("the transaction fails after writing")

    with pytest.raises(RuntimeError):
        await db.transaction(fail)
    assert await _names(db, [kept, lost]) == ["kept"]

    # The write connection is free again: a session writes, then another transaction.
    async with db.session(write=True) as session, session.begin():
        await session.execute(delete(Workspace).where(Workspace.id == kept))
    assert await db.transaction(lambda conn: conn.execute(select(Workspace.id)).all()) is not None
    assert await _names(db, [kept, lost]) == []


async def test_transactions_and_write_sessions_take_turns_on_the_one_writer(db: Database) -> None:
    ids = [uuid.uuid4() for _ in range(20)]

    def write(workspace_id: uuid.UUID) -> Callable[[Connection], None]:
        def work(conn: Connection) -> None:
            conn.execute(insert(Workspace).values(id=workspace_id, name=f"w-{workspace_id}"))

        return work

    async def by_session(workspace_id: uuid.UUID) -> None:
        async with db.session(write=True) as session, session.begin():
            session.add(Workspace(id=workspace_id, name=f"w-{workspace_id}"))

    await asyncio.gather(
        *(db.transaction(write(i)) if n % 2 else by_session(i) for n, i in enumerate(ids))
    )
    assert len(await _names(db, ids)) == len(ids)


async def test_a_write_cancelled_while_it_runs_ends_first_then_the_task_stops(
    db: Database,
) -> None:
    workspace_id = uuid.uuid4()
    inside = threading.Event()
    recorded: list[str] = []

    def slow(conn: Connection) -> None:
        conn.execute(insert(Workspace).values(id=workspace_id, name="slow"))
        inside.set()
        time.sleep(0.3)  # still writing when the task is cancelled

    async def checkpoint() -> None:
        async def write() -> None:
            await db.transaction(slow)
            recorded.append("written")  # what the executor keeps in memory after a write

        await _uninterrupted(write())
        recorded.append("went on")  # never: the cancellation is raised once the write ended

    task = asyncio.create_task(checkpoint())
    while not inside.is_set():
        await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert recorded == ["written"]
    assert await _names(db, [workspace_id]) == ["slow"]
