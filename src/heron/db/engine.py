"""Engines and sessions for SQLite (embedded) and PostgreSQL (scale-out)."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any, TypeVar

import aiosqlite
from sqlalchemy import Connection, Engine, create_engine, event, text
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.pool import StaticPool

T = TypeVar("T")


class Database:
    """The engines and session factories of one process.

    On SQLite, writes go through a second engine whose transactions start with
    `BEGIN IMMEDIATE`: a deferred transaction that reads and then writes fails at once with
    SQLITE_BUSY when another connection wrote in between, while an immediate one waits its turn.
    SQLite runs one write transaction at a time anyway, so the write engine has exactly one
    connection, and a writer waits for it as long as it takes (no pool timeout): writers queue
    in the event loop, in order, instead of in SQLite's busy handler, and a burst of writers
    can't run out of connections. The price: a task must never open a write session while it
    holds another (it would wait for itself). Reads use deferred transactions on a pool of
    `pool_size` connections (and as many more on demand) and run beside the writer (WAL).

    `transaction()` runs a synchronous function as one write transaction: the executor's hot
    path (a checkpoint per step), where each awaited statement of a session costs several hand-
    overs between the event loop and the driver.
    """

    def __init__(self, url: str, *, pool_size: int = 10, echo: bool = False) -> None:
        # Every model, before any statement is built: a foreign key's column type is known
        # only once the model it refers to is (the statements built once, on first use, keep
        # the types they saw).
        import heron.db.models  # noqa: F401

        self.url = make_url(url)
        self.is_sqlite = self.url.get_backend_name() == "sqlite"
        if self.is_sqlite:
            self.engine = _sqlite_engine(
                url,
                echo=echo,
                begin="BEGIN",
                pool_size=pool_size,
                max_overflow=pool_size,
                # As the write engine's below: sessions and connections end what they began,
                # so the pool's own ROLLBACK on check-in would be one more hand-over to the
                # driver's thread at the end of every read.
                pool_reset_on_return=None,
            )
            self.write_engine = _sqlite_engine(
                url,
                echo=echo,
                begin="BEGIN IMMEDIATE",
                pool_size=1,
                max_overflow=0,
                pool_timeout=None,
                # Every user of the connection ends its transaction itself (sessions and
                # connections roll back what they began): no second ROLLBACK, one more
                # hand-over to the driver's thread, on every check-in.
                pool_reset_on_return=None,
            )
        else:
            self.engine = _postgres_engine(url, echo=echo, pool_size=pool_size, pre_ping=True)
            self.write_engine = self.engine
        # `transaction()`'s engine. PostgreSQL: without the pre-ping round trip on every
        # checkout; its callers try a transaction again when the connection turns out dead.
        # Half the pool of the other: its transactions are short, and each process' share of
        # the server's connections grows by half, not double.
        self.transaction_engine = self.write_engine
        if not self.is_sqlite:
            half = max(1, pool_size // 2)
            self.transaction_engine = _postgres_engine(
                url, echo=echo, pool_size=half, pre_ping=False
            )
        self.read_sessions = async_sessionmaker(self.engine, expire_on_commit=False)
        self.write_sessions = async_sessionmaker(self.write_engine, expire_on_commit=False)

    def session(self, *, write: bool) -> AsyncSession:
        return (self.write_sessions if write else self.read_sessions)()

    async def transaction(self, work: Callable[[Connection], T]) -> T:
        """`work(connection)` in one write transaction, committed when it returns, rolled back
        when it raises. `work` is synchronous and must not touch the event loop.

        SQLite: on the write connection's own thread (aiosqlite's), in a single hand-over from
        the event loop and back, instead of several per statement; still the one writer, taken
        from the write engine's pool like any write session. PostgreSQL: on a connection of
        `transaction_engine`, its statements awaited as usual."""
        if not self.is_sqlite:
            async with self.transaction_engine.begin() as conn:
                return await conn.run_sync(work)
        async with self.write_engine.connect() as conn:
            raw = await conn.get_raw_connection()
            driver: Any = raw.driver_connection  # aiosqlite.Connection
            # aiosqlite has no public "call this on the connection's thread": `_execute` is how
            # its own methods do it (tests/test_runs_writes.py).
            result: T = await driver._execute(_sqlite_transaction, driver, work)
            return result

    async def ping(self) -> None:
        async with self.engine.connect() as conn:
            await conn.execute(text("SELECT 1"))

    async def dispose(self) -> None:
        await self.engine.dispose()
        if self.write_engine is not self.engine:
            await self.write_engine.dispose()
        if self.transaction_engine is not self.write_engine:
            await self.transaction_engine.dispose()


def _postgres_engine(url: str, *, echo: bool, pool_size: int, pre_ping: bool) -> AsyncEngine:
    return create_async_engine(
        url,
        echo=echo,
        pool_size=pool_size,
        max_overflow=pool_size,
        pool_pre_ping=pre_ping,
        pool_recycle=1800,
    )


def _sqlite_engine(url: str, *, echo: bool, begin: str, **pool: Any) -> AsyncEngine:
    # The arguments SQLAlchemy would give sqlite3.connect for this URL (file name, uri...).
    parsed = make_url(url)
    args, kwargs = parsed.get_dialect()().create_connect_args(parsed)
    connector = partial(sqlite3.connect, *args, **{**kwargs, "timeout": 30})

    async def connect() -> aiosqlite.Connection:
        connection = _OneHopConnection(connector, 64)
        connection._thread.daemon = True  # as SQLAlchemy does: a leaked one can't block exit
        return await connection

    engine = create_async_engine(url, echo=echo, async_creator=connect, **pool)

    @event.listens_for(engine.sync_engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Let SQLAlchemy's "begin" event emit BEGIN itself (pysqlite's own handling is off).
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        for pragma in (
            "PRAGMA journal_mode=WAL",
            "PRAGMA foreign_keys=ON",
            "PRAGMA busy_timeout=30000",
            "PRAGMA synchronous=NORMAL",
        ):
            cursor.execute(pragma)
        cursor.close()

    @event.listens_for(engine.sync_engine, "begin")
    def _on_begin(conn: Any) -> None:
        conn.exec_driver_sql(begin)

    return engine


class _OneHopConnection(aiosqlite.Connection):
    """An aiosqlite connection whose cursors run each statement, with the fetch of its rows,
    in one hand-over to the connection's thread. aiosqlite's own make one per call (open the
    cursor, execute, fetch, close: four round trips between the event loop and the thread
    per statement), and on a busy 2-core machine each costs tens to hundreds of microseconds.
    Results are read whole, as SQLAlchemy's default (buffered) cursors do anyway."""

    def cursor(self) -> Any:
        return _OneHopCursor(self)


def _run_statement(
    conn: sqlite3.Connection, sql: str, parameters: Any, many: bool
) -> tuple[list[Any], Any, int, int | None]:
    cursor = conn.cursor()
    try:
        if many:
            cursor.executemany(sql, parameters)
        else:
            cursor.execute(sql, () if parameters is None else parameters)
        description = cursor.description
        rows = cursor.fetchall() if description else []
        return rows, description, cursor.rowcount, cursor.lastrowid
    finally:
        cursor.close()


class _OneHopCursor:
    """The part of aiosqlite's cursor SQLAlchemy uses; rows are kept here once fetched."""

    def __init__(self, conn: _OneHopConnection) -> None:
        self._conn = conn
        self._rows: list[Any] = []
        self.description: Any = None
        self.rowcount = -1
        self.lastrowid: int | None = None
        self.arraysize = 1

    async def __aenter__(self) -> _OneHopCursor:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _run(self, sql: str, parameters: Any, many: bool) -> _OneHopCursor:
        conn = self._conn
        on_thread: Any = conn._execute  # aiosqlite's "call this on the connection's thread"
        self._rows, self.description, self.rowcount, self.lastrowid = await on_thread(
            _run_statement, conn._conn, sql, parameters, many
        )
        return self

    async def execute(self, sql: str, parameters: Any = None) -> _OneHopCursor:
        return await self._run(sql, parameters, False)

    async def executemany(self, sql: str, parameters: Any) -> _OneHopCursor:
        return await self._run(sql, parameters, True)

    async def fetchone(self) -> Any:
        return self._rows.pop(0) if self._rows else None

    async def fetchmany(self, size: int | None = None) -> Sequence[Any]:
        count = self.arraysize if size is None else size
        rows, self._rows = self._rows[:count], self._rows[count:]
        return rows

    async def fetchall(self) -> Sequence[Any]:
        rows, self._rows = self._rows, []
        return rows

    async def close(self) -> None:
        self._rows = []


def _sqlite_transaction(driver: Any, work: Callable[[Connection], T]) -> T:
    """On the thread of the aiosqlite connection `driver`: `work` in a BEGIN IMMEDIATE
    transaction, through a synchronous engine over the same sqlite3 connection (made once per
    connection, kept on it, with its one connection: connecting costs a third of a small
    transaction)."""
    conn: Connection | None = getattr(driver, "heron_sync_connection", None)
    if conn is None or conn.closed:
        dbapi = driver._conn  # the sqlite3 connection, used on its own thread only
        # StaticPool: the engine's one connection is the driver's, never closed by it.
        # No reset on return: the transaction below always ends itself, and the connection is
        # never checked in but dropped with the driver's (a reset then would ROLLBACK on a
        # closed database, logged from a garbage collector's finalizer).
        engine: Engine = create_engine(
            "sqlite://", creator=lambda: dbapi, poolclass=StaticPool, pool_reset_on_return=None
        )
        conn = driver.heron_sync_connection = engine.connect()
    try:
        conn.exec_driver_sql("BEGIN IMMEDIATE")
        result = work(conn)
        conn.commit()
    except BaseException:
        conn.rollback()
        raise
    return result


# SQLSTATEs worth a second try of the whole transaction: serialization failure, deadlock, the
# server going away or not taking connections yet.
_TRANSIENT_SQLSTATES = ("40001", "40P01", "08", "57P01", "57P02", "57P03", "53300")


def is_transient(exc: BaseException) -> bool:
    """Whether running the same transaction again may succeed: SQLite busy or locked, a
    PostgreSQL serialization failure or deadlock, a lost connection, no pooled connection free
    in time."""
    if isinstance(exc, (sa_exc.TimeoutError, OSError)):
        return True
    if isinstance(exc, sa_exc.DBAPIError):
        if exc.connection_invalidated:
            return True
        state = getattr(exc.orig, "sqlstate", None) or getattr(exc.orig, "pgcode", None)
        if isinstance(state, str) and state.startswith(_TRANSIENT_SQLSTATES):
            return True
        if isinstance(exc, sa_exc.OperationalError):
            text = str(exc.orig).lower()
            return "database is locked" in text or "database is busy" in text
    return False
