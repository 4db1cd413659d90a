"""keyword index: per-knowledge-base terms and postings on both backends (replaces SQLite's FTS5)

The keyword index becomes the same on SQLite and PostgreSQL: `kb_terms` (a knowledge base's
terms with their document frequency) and `term_blocks` (each term's postings, packed), with
terms from `heron.knowledge.terms`. Existing chunks are re-analysed here.

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-22 05:40:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
BATCH = 2000


def upgrade() -> None:
    sqlite = op.get_bind().dialect.name == "sqlite"
    if sqlite:
        for trigger in ("insert", "delete", "update"):
            op.execute(f"DROP TRIGGER IF EXISTS chunks_fts_{trigger}")
        op.execute("DROP TABLE IF EXISTS chunks_fts")
    with op.batch_alter_table("chunk_terms", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_chunk_terms_chunk_id"))
    op.drop_table("chunk_terms")

    op.create_table(
        "kb_terms",
        sa.Column("id", ID, autoincrement=True, nullable=False),
        sa.Column("knowledge_base_id", sa.Uuid(), nullable=False),
        sa.Column("term", sa.Text(), nullable=False),
        sa.Column("df", sa.Integer(), nullable=False),
        sa.Column("appends", sa.BigInteger(), nullable=False),
        sa.ForeignKeyConstraint(
            ["knowledge_base_id"],
            ["knowledge_bases.id"],
            name=op.f("fk_kb_terms_knowledge_base_id_knowledge_bases"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_kb_terms")),
        sa.UniqueConstraint(
            "knowledge_base_id", "term", name=op.f("uq_kb_terms_knowledge_base_id_term")
        ),
    )
    op.create_table(
        "term_blocks",
        sa.Column("id", ID, autoincrement=True, nullable=False),
        sa.Column("term_id", ID, nullable=False),
        sa.Column("level", sa.Integer(), nullable=False),
        sa.Column("count", sa.Integer(), nullable=False),
        sa.Column("postings", sa.LargeBinary(), nullable=False),
        sa.ForeignKeyConstraint(
            ["term_id"],
            ["kb_terms.id"],
            name=op.f("fk_term_blocks_term_id_kb_terms"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_term_blocks")),
    )
    with op.batch_alter_table("term_blocks", schema=None) as batch_op:
        batch_op.create_index("ix_term_blocks_term_level", ["term_id", "level"], unique=False)
    _reindex()


def _reindex() -> None:
    """Analyse every existing chunk again: one block of postings per term, document
    frequencies, lengths."""
    import math

    import numpy as np

    from heron.knowledge.index import FANOUT, POSTING
    from heron.knowledge.terms import terms

    def level_of(size: int) -> int:
        """The level a block of this size reaches by merging."""
        return int(math.log(size, FANOUT))

    bind = op.get_bind()
    kbs = sa.table("knowledge_bases", sa.column("id", sa.Uuid()), sa.column("term_total", ID))
    chunks = sa.table(
        "chunks",
        sa.column("id", ID),
        sa.column("knowledge_base_id", sa.Uuid()),
        sa.column("context", sa.Text()),
        sa.column("text", sa.Text()),
        sa.column("term_count", sa.Integer()),
    )
    kb_terms = sa.table(
        "kb_terms",
        sa.column("id", ID),
        sa.column("knowledge_base_id", sa.Uuid()),
        sa.column("term", sa.Text()),
        sa.column("df", sa.Integer()),
        sa.column("appends", sa.BigInteger()),
    )
    term_blocks = sa.table(
        "term_blocks",
        sa.column("term_id", ID),
        sa.column("level", sa.Integer()),
        sa.column("count", sa.Integer()),
        sa.column("postings", sa.LargeBinary()),
    )
    for (kb_id,) in bind.execute(sa.select(kbs.c.id)).all():
        postings: dict[str, list[tuple[int, int, int]]] = {}
        total = 0
        after = 0
        while True:
            rows = bind.execute(
                sa.select(chunks.c.id, chunks.c.context, chunks.c.text)
                .where(chunks.c.knowledge_base_id == kb_id, chunks.c.id > after)
                .order_by(chunks.c.id)
                .limit(BATCH)
            ).all()
            if not rows:
                break
            after = rows[-1][0]
            lengths = []
            for chunk_id, context, body in rows:
                counts = terms(f"{context}\n{body}")
                length = sum(counts.values())
                total += length
                lengths.append({"chunk": chunk_id, "length": length})
                for term, tf in counts.items():
                    postings.setdefault(term, []).append((chunk_id, tf, length))
            bind.execute(
                sa.update(chunks)
                .where(chunks.c.id == sa.bindparam("chunk"))
                .values(term_count=sa.bindparam("length")),
                lengths,
            )
        ordered = sorted(postings)
        for at in range(0, len(ordered), BATCH):
            bind.execute(
                sa.insert(kb_terms),
                [
                    {
                        "knowledge_base_id": kb_id,
                        "term": t,
                        "df": len(postings[t]),
                        # As if the one block had been merged up to its level.
                        "appends": FANOUT ** level_of(len(postings[t])),
                    }
                    for t in ordered[at : at + BATCH]
                ],
            )
        found = bind.execute(
            sa.select(kb_terms.c.term, kb_terms.c.id).where(kb_terms.c.knowledge_base_id == kb_id)
        )
        ids = {term: id for term, id in found}
        for at in range(0, len(ordered), BATCH):
            bind.execute(
                sa.insert(term_blocks),
                [
                    {
                        "term_id": ids[t],
                        "level": level_of(len(postings[t])),
                        "count": len(postings[t]),
                        "postings": np.array(postings[t], dtype=POSTING).tobytes(),
                    }
                    for t in ordered[at : at + BATCH]
                ],
            )
        bind.execute(sa.update(kbs).where(kbs.c.id == kb_id).values(term_total=total))


def downgrade() -> None:
    with op.batch_alter_table("term_blocks", schema=None) as batch_op:
        batch_op.drop_index("ix_term_blocks_term_level")
    op.drop_table("term_blocks")
    op.drop_table("kb_terms")
    # 0006's structures, rebuilt from the chunks.
    op.create_table(
        "chunk_terms",
        sa.Column("knowledge_base_id", sa.Uuid(), nullable=False),
        sa.Column("term", sa.Text(), nullable=False),
        sa.Column("chunk_id", ID, nullable=False),
        sa.Column("tf", sa.Integer(), nullable=False),
        sa.Column("length", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(
            ["chunk_id"],
            ["chunks.id"],
            name=op.f("fk_chunk_terms_chunk_id_chunks"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint(
            "knowledge_base_id", "term", "chunk_id", name=op.f("pk_chunk_terms")
        ),
    )
    with op.batch_alter_table("chunk_terms", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_chunk_terms_chunk_id"), ["chunk_id"], unique=False)
    if op.get_bind().dialect.name == "sqlite":
        op.execute(
            "CREATE VIRTUAL TABLE chunks_fts USING fts5(context, text, kb, content='', "
            "tokenize='porter unicode61 remove_diacritics 2')"
        )
        op.execute(
            "INSERT INTO chunks_fts(chunks_fts, rank) VALUES ('rank', 'bm25(1.0, 1.0, 0.0)')"
        )
        kb = "'k' || {0}.knowledge_base_id || {0}.knowledge_base_id"
        insert = f"INSERT INTO chunks_fts(rowid, context, text, kb) VALUES (new.id, new.context, new.text, {kb.format('new')});"  # noqa: E501, S608
        remove = f"INSERT INTO chunks_fts(chunks_fts, rowid, context, text, kb) VALUES ('delete', old.id, old.context, old.text, {kb.format('old')});"  # noqa: E501, S608
        op.execute(f"CREATE TRIGGER chunks_fts_insert AFTER INSERT ON chunks BEGIN {insert} END")
        op.execute(f"CREATE TRIGGER chunks_fts_delete AFTER DELETE ON chunks BEGIN {remove} END")
        op.execute(
            "CREATE TRIGGER chunks_fts_update AFTER UPDATE OF context, text, knowledge_base_id "
            f"ON chunks BEGIN {remove} {insert} END"
        )
        op.execute(
            "INSERT INTO chunks_fts(rowid, context, text, kb) SELECT id, context, text, "
            "'k' || knowledge_base_id || knowledge_base_id FROM chunks"
        )
        op.execute("UPDATE chunks SET term_count = 0")
        op.execute("UPDATE knowledge_bases SET term_total = 0")
    else:
        op.execute(
            "INSERT INTO chunk_terms (knowledge_base_id, term, chunk_id, tf, length) "
            "SELECT c.knowledge_base_id, u.lexeme, c.id, array_length(u.positions, 1), 0 "
            "FROM chunks c, unnest(to_tsvector('english', c.context || chr(10) || c.text)) u"
        )
        op.execute(
            "UPDATE chunks c SET term_count = coalesce((SELECT sum(tf) FROM chunk_terms t "
            "WHERE t.chunk_id = c.id), 0)"
        )
        op.execute(
            "UPDATE chunk_terms t SET length = c.term_count FROM chunks c WHERE c.id = t.chunk_id"
        )
        op.execute(
            "UPDATE knowledge_bases k SET term_total = coalesce((SELECT sum(term_count) "
            "FROM chunks c WHERE c.knowledge_base_id = k.id), 0)"
        )
