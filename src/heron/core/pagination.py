"""One pagination shape for every list: `?limit=&cursor=` in, `{items, next_cursor}` out.

Cursors are opaque to clients: the id of the last row seen (ids are UUIDv7, so they sort by
creation time), base64url-encoded with a version tag so the format can change later.
"""

from __future__ import annotations

import base64
import binascii
import uuid
from typing import Annotated, Any, Generic, TypeVar

from fastapi import Depends, Query
from pydantic import BaseModel
from sqlalchemy import Select

from heron.core.errors import InvalidCursor

T = TypeVar("T")
MAX_LIMIT = 100


class Page(BaseModel, Generic[T]):
    items: list[T]
    next_cursor: str | None


class PageParams(BaseModel):
    limit: int
    after: uuid.UUID | None


def encode_cursor(last_id: uuid.UUID) -> str:
    return base64.urlsafe_b64encode(b"1:" + last_id.bytes).decode().rstrip("=")


def decode_cursor(cursor: str) -> uuid.UUID:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
    except (binascii.Error, ValueError):
        raise InvalidCursor("The cursor is not one this API returned.") from None
    if len(raw) != 18 or not raw.startswith(b"1:"):
        raise InvalidCursor("The cursor is not one this API returned.")
    return uuid.UUID(bytes=raw[2:])


def page_params(
    limit: Annotated[int, Query(ge=1, le=MAX_LIMIT, description="Items per page.")] = 20,
    cursor: Annotated[
        str | None,
        Query(max_length=64, description="`next_cursor` from the previous page."),
    ] = None,
) -> PageParams:
    return PageParams(limit=limit, after=decode_cursor(cursor) if cursor else None)


PageQuery = Annotated[PageParams, Depends(page_params)]


SelectT = TypeVar("SelectT", bound=Select[*tuple[Any, ...]])


def paginate_query(stmt: SelectT, id_column: Any, params: PageParams) -> SelectT:
    """Order by id and fetch one row more than asked, to know whether a next page exists."""
    if params.after is not None:
        stmt = stmt.where(id_column > params.after)
    return stmt.order_by(id_column).limit(params.limit + 1)


def make_page(rows: list[Any], params: PageParams, item: Any, id_of: Any) -> Page[Any]:
    has_more = len(rows) > params.limit
    rows = rows[: params.limit]
    return Page(
        items=[item(r) for r in rows],
        next_cursor=encode_cursor(id_of(rows[-1])) if has_more and rows else None,
    )
