"""Migrations run on both backends and match the ORM models."""

from __future__ import annotations

import asyncio

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Connection
from sqlalchemy.ext.asyncio import create_async_engine

from heron.app import SchemaOutdated, check_schema
from heron.db import migrate
from heron.db.models import Base


def _diff(url: str) -> list[object]:
    async def run() -> list[object]:
        engine = create_async_engine(url)
        try:
            async with engine.connect() as conn:

                def compare(sync: Connection) -> list[object]:
                    context = MigrationContext.configure(
                        sync, opts={"include_name": migrate.include_name}
                    )
                    return list(compare_metadata(context, Base.metadata))

                return await conn.run_sync(compare)
        finally:
            await engine.dispose()

    return asyncio.run(run())


def test_migrated_schema_matches_the_models(database_url: str) -> None:
    assert _diff(database_url) == []


def test_downgrade_to_nothing_and_back(database_url: str) -> None:
    migrate.upgrade(database_url, "head")
    from alembic import command

    command.downgrade(migrate.alembic_config(database_url), "base")
    assert asyncio.run(migrate.current_revision(database_url)) is None
    with pytest.raises(SchemaOutdated, match="heron migrate"):
        asyncio.run(check_schema(database_url))
    migrate.upgrade(database_url, "head")
    assert asyncio.run(migrate.current_revision(database_url)) == migrate.head_revision()
    assert _diff(database_url) == []


async def test_sqlite_runs_in_wal_mode_with_foreign_keys(database_url: str) -> None:
    from sqlalchemy import text

    from heron.db.engine import Database

    if not database_url.startswith("sqlite"):
        pytest.skip("SQLite only")
    db = Database(database_url)
    try:
        async with db.session(write=False) as session:
            assert (await session.scalar(text("PRAGMA journal_mode"))) == "wal"
            assert (await session.scalar(text("PRAGMA foreign_keys"))) == 1
    finally:
        await db.dispose()
