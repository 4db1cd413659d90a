"""INSERTs and UPDATEs written once as SQL and run straight on the DBAPI cursor: the run
executor's checkpoint on SQLite, a handful of small statements per step of every run.

Through SQLAlchemy Core each such statement costs about 0.1 ms of Python (the compiled cache's
key, the execution context, parameter processing, the result) for a few microseconds of work
in SQLite; a checkpoint of four of them spent more time there than in SQLite's own commit. The
statements here are built from the tables' own metadata, and their values go through the same
conversions Core applies: each column's bind processor for the dialect (`dialect_impl`, the
one SQLAlchemy uses, so a UUID, a UTC timestamp or a JSON value is stored exactly as Core stores
it), and its Python `default` or `onupdate` where a row leaves it out. A column with a server-
side default is refused when the statement is built: the SQL names every column, so the server
would never apply it.

They run inside a transaction their caller opened on the same connection (`Database.transaction`),
and only where the caller knows the dialect (`?` parameters: sqlite3's paramstyle).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Column, Connection, inspect
from sqlalchemy.engine import Dialect

_Processor = Callable[[Any], Any] | None
_Default = Callable[[], Any] | None


@dataclass(frozen=True)
class _Bound:
    key: str
    processor: _Processor
    default: _Default

    def value(self, row: Mapping[str, Any]) -> Any:
        if self.key in row:
            value = row[self.key]
        elif self.default is not None:
            value = self.default()
        else:
            value = None
        return value if self.processor is None else self.processor(value)


def _bound(key: str, column: Column[Any], dialect: Dialect, default: Any) -> _Bound:
    if column.server_default is not None or column.server_onupdate is not None:
        raise ValueError(f"{column} has a server-side default: not for a direct statement")
    processor = column.type.dialect_impl(dialect).bind_processor(dialect)
    if default is None:
        return _Bound(key, processor, None)
    if default.is_callable:
        call = default.arg  # SQLAlchemy's wrapper takes the execution context; none is used
        return _Bound(key, processor, lambda: call(None))
    if default.is_scalar:
        scalar = default.arg
        return _Bound(key, processor, lambda: scalar)
    raise ValueError(f"{column}'s default is not a Python value: not for a direct statement")


@dataclass(frozen=True)
class DirectInsert:
    """INSERT of whole rows of a model's table: every column, each row a mapping by column key
    (as `insert(Model)` executed on a Connection takes them; a key that is not one is refused
    here, where Core would drop it)."""

    sql: str
    columns: tuple[_Bound, ...]
    keys: frozenset[str]

    def parameters(self, rows: Iterable[Mapping[str, Any]]) -> list[tuple[Any, ...]]:
        columns, keys = self.columns, self.keys
        parameters = []
        for row in rows:
            if not keys.issuperset(row):
                raise KeyError(f"not a column: {', '.join(sorted(set(row) - keys))}")
            parameters.append(tuple(column.value(row) for column in columns))
        return parameters

    def execute(self, conn: Connection, rows: Sequence[Mapping[str, Any]]) -> None:
        if rows:
            _cursor(conn).executemany(self.sql, self.parameters(rows))


@dataclass(frozen=True)
class DirectUpdate:
    """UPDATE of some columns (and of those with an `onupdate`) of the rows whose `where`
    columns equal the given values; `execute` takes both by column key."""

    sql: str
    columns: tuple[_Bound, ...]
    where: tuple[str, ...]

    def execute(self, conn: Connection, values: Mapping[str, Any]) -> int:
        missing = [key for key in self.where if key not in values]
        if missing:
            raise KeyError(f"no value for the condition on {', '.join(missing)}")
        cursor = _cursor(conn)
        cursor.execute(self.sql, tuple(column.value(values) for column in self.columns))
        count: int = cursor.rowcount
        return count


def _cursor(conn: Connection) -> Any:
    # The DBAPI connection of the transaction `conn` is in (SQLAlchemy's own, public).
    return conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]


def _columns(model: type[Any]) -> list[tuple[str, Column[Any]]]:
    """The columns of a mapped class' table, each with its key in the table (its name unless
    the table says otherwise): rows are keyed as `insert(Model)` on a Connection keys them."""
    return [(c.key, c) for c in inspect(model).local_table.columns]


@functools.lru_cache(maxsize=64)
def direct_insert(model: type[Any], dialect: Dialect) -> DirectInsert:
    quote = dialect.identifier_preparer.quote
    columns = _columns(model)
    names = ", ".join(quote(column.name) for _, column in columns)
    marks = ", ".join("?" for _ in columns)
    table = quote(inspect(model).local_table.name)
    sql = f"INSERT INTO {table} ({names}) VALUES ({marks})"  # noqa: S608 (metadata)
    bound = tuple(_bound(key, c, dialect, c.default) for key, c in columns)
    return DirectInsert(sql, bound, frozenset(key for key, _ in columns))


@functools.lru_cache(maxsize=256)
def direct_update(
    model: type[Any], dialect: Dialect, columns: tuple[str, ...], where: tuple[str, ...]
) -> DirectUpdate:
    """UPDATE of `columns` of the rows whose `where` columns equal the values given (columns by
    their key in the table)."""
    if set(columns) & set(where):
        raise ValueError("a column both set and in the condition: not for a direct statement")
    quote = dialect.identifier_preparer.quote
    by_key = dict(_columns(model))
    setting: list[tuple[str, Column[Any], Any]] = [(key, by_key[key], None) for key in columns]
    # Columns with an `onupdate` the caller did not set take it, as Core's UPDATE does.
    setting += [
        (key, c, c.onupdate) for key, c in by_key.items() if c.onupdate and key not in columns
    ]
    conditions = [(key, by_key[key], None) for key in where]
    sets = ", ".join(f"{quote(c.name)} = ?" for _, c, _ in setting)
    matches = " AND ".join(f"{quote(c.name)} = ?" for _, c, _ in conditions)
    table = quote(inspect(model).local_table.name)
    sql = f"UPDATE {table} SET {sets} WHERE {matches}"  # noqa: S608 (metadata)
    bound = tuple(_bound(key, c, dialect, default) for key, c, default in setting + conditions)
    return DirectUpdate(sql, bound, where)
