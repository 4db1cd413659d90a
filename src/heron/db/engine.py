"""Engines and sessions for SQLite (embedded) and PostgreSQL (scale-out)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import event, text
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)


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
    """

    def __init__(self, url: str, *, pool_size: int = 10, echo: bool = False) -> None:
        self.url = make_url(url)
        self.is_sqlite = self.url.get_backend_name() == "sqlite"
        if self.is_sqlite:
            self.engine = _sqlite_engine(
                url, echo=echo, begin="BEGIN", pool_size=pool_size, max_overflow=pool_size
            )
            self.write_engine = _sqlite_engine(
                url,
                echo=echo,
                begin="BEGIN IMMEDIATE",
                pool_size=1,
                max_overflow=0,
                pool_timeout=None,
            )
        else:
            self.engine = create_async_engine(
                url,
                echo=echo,
                pool_size=pool_size,
                max_overflow=pool_size,
                pool_pre_ping=True,
                pool_recycle=1800,
            )
            self.write_engine = self.engine
        self.read_sessions = async_sessionmaker(self.engine, expire_on_commit=False)
        self.write_sessions = async_sessionmaker(self.write_engine, expire_on_commit=False)

    def session(self, *, write: bool) -> AsyncSession:
        return (self.write_sessions if write else self.read_sessions)()

    async def ping(self) -> None:
        async with self.engine.connect() as conn:
            await conn.execute(text("SELECT 1"))

    async def dispose(self) -> None:
        await self.engine.dispose()
        if self.write_engine is not self.engine:
            await self.write_engine.dispose()


def _sqlite_engine(url: str, *, echo: bool, begin: str, **pool: Any) -> AsyncEngine:
    engine = create_async_engine(url, echo=echo, connect_args={"timeout": 30}, **pool)

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
