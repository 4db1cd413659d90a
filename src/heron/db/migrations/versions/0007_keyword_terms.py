"""keyword index: per-knowledge-base terms and postings on both backends (replaces SQLite's FTS5)

The keyword index becomes the same on SQLite and PostgreSQL: `kb_terms` (a knowledge base's
terms with their document frequency) and `chunk_terms` (postings keyed by term id, then chunk
id), with terms from `heron.knowledge.terms`. Existing chunks are re-analysed here.

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-22 05:40:00
"""

from collections import Counter
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
        "chunk_terms",
        sa.Column("term_id", ID, nullable=False),
        sa.Column("chunk_id", ID, nullable=False),
        sa.Column("tf", sa.Integer(), nullable=False),
        sa.Column("length", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(
            ["chunk_id"],
            ["chunks.id"],
            name=op.f("fk_chunk_terms_chunk_id_chunks"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["term_id"],
            ["kb_terms.id"],
            name=op.f("fk_chunk_terms_term_id_kb_terms"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("term_id", "chunk_id", name=op.f("pk_chunk_terms")),
        sqlite_with_rowid=False,
    )
    with op.batch_alter_table("chunk_terms", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_chunk_terms_chunk_id"), ["chunk_id"], unique=False)
    _reindex()


def _reindex() -> None:
    """Analyse every existing chunk again: postings, document frequencies, lengths."""
    from heron.knowledge.terms import terms

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
    )
    chunk_terms = sa.table(
        "chunk_terms",
        sa.column("term_id", ID),
        sa.column("chunk_id", ID),
        sa.column("tf", sa.Integer()),
        sa.column("length", sa.Integer()),
    )
    for (kb_id,) in bind.execute(sa.select(kbs.c.id)).all():
        ids: dict[str, int] = {}
        df: Counter[str] = Counter()
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
            analysed = [(chunk_id, terms(f"{context}\n{body}")) for chunk_id, context, body in rows]
            new = sorted({t for _, counts in analysed for t in counts} - ids.keys())
            for at in range(0, len(new), BATCH):
                bind.execute(
                    sa.insert(kb_terms),
                    [
                        {"knowledge_base_id": kb_id, "term": t, "df": 0}
                        for t in new[at : at + BATCH]
                    ],
                )
            if new:
                ids.update(
                    bind.execute(
                        sa.select(kb_terms.c.term, kb_terms.c.id).where(
                            kb_terms.c.knowledge_base_id == kb_id, kb_terms.c.term.in_(new)
                        )
                    )
                    .tuples()
                    .all()
                )
            postings = []
            for chunk_id, counts in analysed:
                length = sum(counts.values())
                total += length
                df.update(counts.keys())
                bind.execute(
                    sa.update(chunks).where(chunks.c.id == chunk_id).values(term_count=length)
                )
                postings += [
                    {"term_id": ids[t], "chunk_id": chunk_id, "tf": tf, "length": length}
                    for t, tf in counts.items()
                ]
            if postings:
                bind.execute(sa.insert(chunk_terms), postings)
        for term, count in df.items():
            bind.execute(sa.update(kb_terms).where(kb_terms.c.id == ids[term]).values(df=count))
        bind.execute(sa.update(kbs).where(kbs.c.id == kb_id).values(term_total=total))


def downgrade() -> None:
    with op.batch_alter_table("chunk_terms", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_chunk_terms_chunk_id"))
    op.drop_table("chunk_terms")
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
