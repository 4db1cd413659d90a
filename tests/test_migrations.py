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


async def test_upgrading_to_the_shared_keyword_index_reindexes_existing_chunks(
    database_url: str,
) -> None:
    """0007 replaced SQLite's FTS5 table and PostgreSQL's lexeme postings with `kb_terms` and
    `term_blocks`: chunks written before it are found by keyword after it, and back again."""
    import numpy as np
    from alembic import command
    from sqlalchemy import func, select

    from conftest import make_tenant
    from heron.db.engine import Database
    from heron.knowledge import index
    from heron.knowledge.models import (
        Chunk,
        Document,
        DocumentStatus,
        KnowledgeBase,
        SourceKind,
        TermBlock,
    )
    from heron.knowledge.terms import terms

    texts = ["Herons nest in heronries high in trees.", "Sourdough rises with wild yeast."]
    await asyncio.to_thread(command.downgrade, migrate.alembic_config(database_url), "0006")
    db = Database(database_url)
    try:
        tenant = await make_tenant(db, "Old")
        async with db.session(write=True) as session, session.begin():
            kb = KnowledgeBase(
                workspace_id=tenant.workspace_id,
                name="old",
                description="",
                embedding_model="local",
                embedding_dimensions=4,
                chunk_size=512,
                chunk_overlap=64,
                chunk_count=len(texts),
            )
            session.add(kb)
            await session.flush()
            document = Document(
                workspace_id=kb.workspace_id,
                knowledge_base_id=kb.id,
                source=SourceKind.text,
                text="\n".join(texts),
                title="Notes",
                meta={},
                status=DocumentStatus.ready,
                truncated=False,
            )
            session.add(document)
            await session.flush()
            vector = np.full(4, 0.5, dtype=np.float32)
            session.add_all(
                Chunk(
                    workspace_id=kb.workspace_id,
                    knowledge_base_id=kb.id,
                    document_id=document.id,
                    position=i,
                    text=t,
                    context="Notes",
                    heading_path=[],
                    page=None,
                    token_count=8,
                    embedding=vector.tobytes() if db.is_sqlite else vector,
                )
                for i, t in enumerate(texts)
            )
    finally:
        await db.dispose()

    for _ in range(2):  # up, then down and up again (the downgrade rebuilds 0006's index)
        await asyncio.to_thread(migrate.upgrade, database_url)
        db = Database(database_url)
        try:
            async with db.session(write=False) as session:
                kb_row = await session.get(KnowledgeBase, kb.id)
                assert kb_row is not None
                analysed = [terms(f"Notes\n{t}") for t in texts]
                assert kb_row.term_total == sum(sum(c.values()) for c in analysed)
                postings = await session.scalar(select(func.sum(TermBlock.count)))
                assert postings == sum(len(c) for c in analysed)
                found = await index.keyword_search(session, [kb_row], "heronry", 5, None)
                chunk = await session.get(Chunk, found[0].chunk_id)
                assert len(found) == 1
                assert chunk is not None
                assert chunk.position == 0
        finally:
            await db.dispose()
        await asyncio.to_thread(command.downgrade, migrate.alembic_config(database_url), "0006")
