"""The request owns the transaction: one session per request, committed when the handler
returns and before the response is sent, rolled back on any error."""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Callable
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.ext.asyncio import AsyncSession

from heron.db.engine import Database

_READ_METHODS = {"GET", "HEAD", "OPTIONS"}


def get_database(request: Request) -> Database:
    db: Database = request.app.state.db
    return db


def is_write_request(request: Request) -> bool:
    return request.method not in _READ_METHODS and not getattr(request.state, "reads_only", False)


def reads_only(request: Request) -> None:
    """A route dependency (`dependencies=[READS_ONLY]`, resolved before the route's own): the
    request only reads, whatever its method (a search is a POST), so its transaction is a read
    one; on SQLite it then doesn't take the single writer."""
    request.state.reads_only = True


READS_ONLY = Depends(reads_only)


def after_commit(session: AsyncSession, callback: Callable[[], object]) -> None:
    """Run `callback` once the request's transaction has committed (never on a rollback): how
    work is handed to a queue without a worker ever looking for rows that aren't there."""
    session.info.setdefault("after_commit", []).append(callback)


def after_rollback(session: AsyncSession, callback: Callable[[], object]) -> None:
    """Run `callback` (synchronous) if the request's transaction rolls back instead: how what
    was held for work that will not happen is given back."""
    session.info.setdefault("after_rollback", []).append(callback)


async def commit_now(session: AsyncSession) -> None:
    """Commit before the request ends (a handler that must wait on the work it queued), and
    hand the work over."""
    await session.commit()
    session.info.pop("after_rollback", None)
    for callback in session.info.pop("after_commit", []):
        result = callback()
        if inspect.isawaitable(result):
            await result


async def get_session(request: Request) -> AsyncIterator[AsyncSession]:
    session = get_database(request).session(write=is_write_request(request))
    try:
        yield session
        await session.commit()
    except BaseException:
        undo = session.info.pop("after_rollback", [])
        try:
            await session.rollback()
        finally:
            for callback in undo:
                callback()
        raise
    finally:
        callbacks = session.info.pop("after_commit", [])
        session.info.pop("after_rollback", None)
        await session.close()
    for callback in callbacks:
        result = callback()
        if inspect.isawaitable(result):
            await result


# scope="function": the commit happens before the response goes out, so a failed commit is
# reported as an error instead of a success that was never saved.
DbSession = Annotated[AsyncSession, Depends(get_session, scope="function")]
