"""The executor's writes: `Database.transaction` (on SQLite, one hand-over to the write
connection's thread per transaction) and a checkpoint that a cancellation can't cut in two."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import Connection, delete, insert, select
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

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


async def test_direct_statements_store_exactly_what_core_stores(db: Database) -> None:
    """The checkpoint's statements on SQLite skip Core (heron.db.direct): a row they insert or
    update is stored byte for byte as Core stores it (UUIDs, UTC timestamps, JSON under a
    column named apart from its key, Python defaults and `onupdate`), and read back the same."""
    if not db.is_sqlite:
        pytest.skip("direct statements are written for SQLite's DBAPI")
    from sqlalchemy import text, update

    from heron.db.direct import direct_insert, direct_update
    from heron.threads.models import Thread

    workspace, by_core, direct, defaulted = (uuid.uuid4() for _ in range(4))
    when = datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)
    meta = {"k": ["ü", 1, None, 2.5], "nested": {"ok": True}}

    def row(thread_id: uuid.UUID) -> dict[str, object]:
        return {
            "id": thread_id,
            "workspace_id": workspace,
            "metadata": meta,  # the column's name and key; `meta` is the ORM attribute
            "created_at": when,
            "updated_at": when,
        }

    def stored(conn: Connection, thread_id: uuid.UUID) -> dict[str, object]:
        query = text("SELECT * FROM threads WHERE id = :id")
        found = dict(conn.execute(query, {"id": thread_id.hex}).mappings().one())
        assert found.pop("id") == thread_id.hex
        return found

    def work(conn: Connection) -> list[dict[str, object]]:
        conn.execute(insert(Workspace).values(id=workspace, name="direct"))
        conn.execute(insert(Thread), [row(by_core)])
        statement = direct_insert(Thread, conn.dialect)
        statement.execute(conn, [row(direct), {"id": defaulted, "workspace_id": workspace}])
        inserted = [stored(conn, by_core), stored(conn, direct)]
        conn.execute(
            update(Thread).where(Thread.id == by_core, Thread.workspace_id == workspace),
            {"metadata": {"x": [1]}},
        )
        changed = direct_update(Thread, conn.dialect, ("metadata",), ("id", "workspace_id"))
        values = {"metadata": {"x": [1]}, "id": direct, "workspace_id": workspace}
        assert changed.execute(conn, values) == 1
        with pytest.raises(KeyError):
            changed.execute(conn, {"metadata": {}, "id": direct})  # no workspace: refused
        return [*inserted, stored(conn, by_core), stored(conn, direct)]

    core_inserted, direct_inserted, core_updated, direct_updated = await db.transaction(work)
    assert direct_inserted == core_inserted
    # `updated_at` took its onupdate on both (microseconds apart): the rest is the same.
    assert direct_updated.pop("updated_at") != direct_inserted["updated_at"]
    assert core_updated.pop("updated_at") != core_inserted["updated_at"]
    assert direct_updated == core_updated
    async with db.session(write=False) as session:
        threads = {t.id: t for t in await session.scalars(select(Thread))}
    assert threads[direct].meta == {"x": [1]}
    assert threads[direct].created_at == when
    assert threads[direct].updated_at > when
    assert threads[defaulted].meta == {}  # the Python default
    assert threads[defaulted].created_at.tzinfo is not None

    # A key that is no attribute is refused, as Core refuses it.
    with pytest.raises(KeyError, match="not a column"):
        direct_insert(Thread, db.engine.dialect).parameters([{"meta": {}}])

    # A server-side default would never apply to a statement naming every column.
    class Served(DeclarativeBase):
        pass

    class Counter(Served):
        __tablename__ = "counters"
        id: Mapped[int] = mapped_column(primary_key=True)
        n: Mapped[int] = mapped_column(server_default=text("1"))

    with pytest.raises(ValueError, match="server-side default"):
        direct_insert(Counter, db.engine.dialect)


async def test_a_pooled_read_connection_never_keeps_an_old_snapshot(db: Database) -> None:
    """Read connections go back to the pool without the pool's own ROLLBACK (on SQLite): every
    session and connection ends the transaction it began, so the next read on the same
    connection sees the latest commit, after a session, a bare connection or a failed read."""
    workspace = uuid.uuid4()
    await db.transaction(
        lambda conn: conn.execute(insert(Workspace).values(id=workspace, name="a"))
    )

    def rename(name: str) -> Callable[[Connection], object]:
        return lambda conn: conn.execute(
            Workspace.__table__.update().where(Workspace.id == workspace).values(name=name)
        )

    async def read() -> str | None:
        async with db.session(write=False) as session:
            return await session.scalar(select(Workspace.name).where(Workspace.id == workspace))

    assert await read() == "a"
    await db.transaction(rename("b"))
    assert await read() == "b"
    async with db.engine.connect() as conn:  # a bare connection's read, never committed
        assert (await conn.execute(select(Workspace.name))).first() is not None
    await db.transaction(rename("c"))
    assert await read() == "c"

    async def failing_read() -> None:
        async with db.session(write=False) as session:
            await session.scalar(select(Workspace.name))
            raise ValueError("the read fails midway")

    with pytest.raises(ValueError, match="fails"):
        await failing_read()
    await db.transaction(rename("d"))
    # Every pooled connection, the ones used above among them, sees the last name.
    names = await asyncio.gather(*(read() for _ in range(12)))
    assert set(names) == {"d"}


async def test_a_disposed_database_leaves_no_connection_to_reset(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The synchronous connection `transaction()` keeps beside SQLite's writer is dropped with
    it: once the database is disposed and collected, nothing rolls back on a closed database
    (SQLAlchemy logged that as an error from a garbage collector's finalizer)."""
    import gc

    db = Database(f"sqlite+aiosqlite:///{tmp_path / 'disposed.db'}")
    await db.transaction(lambda conn: conn.exec_driver_sql("CREATE TABLE t (a INTEGER)"))
    await db.transaction(lambda conn: conn.exec_driver_sql("INSERT INTO t VALUES (1)"))
    await db.dispose()
    del db
    with caplog.at_level(logging.ERROR, logger="sqlalchemy.pool"):
        gc.collect()
    assert not [r for r in caplog.records if r.name.startswith("sqlalchemy")]
