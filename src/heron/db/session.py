"""The request owns the transaction: one session per request, committed when the handler
returns and before the response is sent, rolled back on any error."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.ext.asyncio import AsyncSession

from heron.db.engine import Database

_READ_METHODS = {"GET", "HEAD", "OPTIONS"}


def get_database(request: Request) -> Database:
    db: Database = request.app.state.db
    return db


def is_write_request(request: Request) -> bool:
    return request.method not in _READ_METHODS


async def get_session(request: Request) -> AsyncIterator[AsyncSession]:
    session = get_database(request).session(write=is_write_request(request))
    try:
        yield session
        await session.commit()
    except BaseException:
        await session.rollback()
        raise
    finally:
        await session.close()


# scope="function": the commit happens before the response goes out, so a failed commit is
# reported as an error instead of a success that was never saved.
DbSession = Annotated[AsyncSession, Depends(get_session, scope="function")]
