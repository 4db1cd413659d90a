"""`heron kb …`: knowledge bases through the HTTP API — create, ingest a folder with a progress
bar, search, delete."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from heron.providers.cli import KeyOption, UrlOption, api, find, one_line, table

app = typer.Typer(
    help="Knowledge bases: ingest documents and search them (through the API).",
    no_args_is_help=True,
)
KbArg = Annotated[str, typer.Argument(help="The knowledge base's name or id.")]
BATCH = 1000  # documents per request (the API's limit)


@app.command("list")
def list_kbs(url: UrlOption = None, key: KeyOption = None) -> None:
    """List the workspace's knowledge bases."""
    with api(url, key) as client:
        kbs = client.paginate("/api/knowledge-bases")
    table(
        ["NAME", "MODEL", "CHUNKS", "ID"],
        [[k["name"], k["embedding_model"], k["chunk_count"], k["id"]] for k in kbs],
    )


@app.command("create")
def create_kb(
    name: Annotated[str, typer.Argument(help="Unique in the workspace.")],
    description: Annotated[str, typer.Option(help="What it holds.")] = "",
    model: Annotated[
        str | None,
        typer.Option(help="Embedding model: local:all-minilm-l6-v2 (default) or PROVIDER:MODEL."),
    ] = None,
    dimensions: Annotated[
        int | None, typer.Option(help="The provider model's vector size.")
    ] = None,
    chunk_size: Annotated[int | None, typer.Option(help="Tokens per chunk.")] = None,
    chunk_overlap: Annotated[int | None, typer.Option(help="Tokens of overlap.")] = None,
    url: UrlOption = None,
    key: KeyOption = None,
) -> None:
    """Create a knowledge base."""
    body: dict[str, Any] = {"name": name, "description": description}
    for field, value in (
        ("embedding_model", model),
        ("embedding_dimensions", dimensions),
        ("chunk_size", chunk_size),
        ("chunk_overlap", chunk_overlap),
    ):
        if value is not None:
            body[field] = value
    with api(url, key) as client:
        kb = client.json("POST", "/api/knowledge-bases", json=body)
    typer.echo(kb["id"])


@app.command("delete")
def delete_kb(kb: KbArg, url: UrlOption = None, key: KeyOption = None) -> None:
    """Delete a knowledge base with its documents and chunks."""
    with api(url, key) as client:
        found = find(client, "/api/knowledge-bases", "knowledge base", kb)
        client.request("DELETE", f"/api/knowledge-bases/{found['id']}")
    typer.echo(f"deleted {found['name']}")


def _files(paths: list[Path]) -> list[tuple[Path, str]]:
    """Every file under `paths` (folders walked, hidden entries skipped), with the name its
    document gets: the path relative to the folder given."""
    from heron.cli import fail

    found: list[tuple[Path, str]] = []
    for path in paths:
        if path.is_file():
            found.append((path, path.name))
        elif path.is_dir():
            for file in sorted(path.rglob("*")):
                relative = file.relative_to(path)
                if file.is_file() and not any(p.startswith(".") for p in relative.parts):
                    found.append((file, str(Path(path.name) / relative)))
        else:
            fail(f"{path}: no such file or folder", 2)
    return found


@app.command("ingest")
def ingest(
    kb: KbArg,
    paths: Annotated[list[Path], typer.Argument(help="Files and folders (walked recursively).")],
    wait: Annotated[
        bool, typer.Option(help="Show progress until every document is ready or failed.")
    ] = True,
    url: UrlOption = None,
    key: KeyOption = None,
) -> None:
    """Upload files and add them to a knowledge base; show the ingestion's progress."""
    from heron.cli import fail

    files = _files(paths)
    if not files:
        fail("no files to ingest", 2)
    with api(url, key) as client:
        found = find(client, "/api/knowledge-bases", "knowledge base", kb)
        base = f"/api/knowledge-bases/{found['id']}"
        documents: list[dict[str, Any]] = []
        with typer.progressbar(files, label="Uploading", file=sys.stderr) as bar:
            for path, name in bar:
                with path.open("rb") as content:
                    uploaded = client.json(
                        "POST", "/api/files", files={"file": (path.name, content)}
                    )
                documents.append(
                    {"file_id": uploaded["id"], "title": name, "metadata": {"path": name}}
                )
        for start in range(0, len(documents), BATCH):
            client.json(
                "POST",
                f"{base}/documents/batch",
                json={"documents": documents[start : start + BATCH]},
            )
        typer.echo(f"added {len(documents)} documents to {found['name']}", err=True)
        if not wait:
            return
        _follow(client, base)
        failed = client.paginate(f"{base}/documents", status="failed")
    for doc in failed:
        typer.echo(f"failed: {doc['title']}: {one_line(doc['error'] or '')}", err=True)
    if failed:
        fail(f"{len(failed)} of the knowledge base's documents failed")


def _follow(client: Any, base: str) -> None:
    """A progress bar of documents done; chunks embedded shown beside it."""
    progress = client.json("GET", f"{base}/progress")
    shown = 0
    with typer.progressbar(
        length=max(progress["documents_total"], 1),
        label="Ingesting",
        file=sys.stderr,
        item_show_func=lambda p: p,
    ) as bar:
        while True:
            done = progress["documents_done"]
            bar.current_item = f"{progress['chunks_done']}/{progress['chunks_total']} chunks"
            bar.update(done - shown)
            shown = done
            if not progress["in_progress"]:
                return
            time.sleep(0.5)
            progress = client.json("GET", f"{base}/progress")


@app.command("search")
def search(
    kb: KbArg,
    query: Annotated[str, typer.Argument(help="What to look for.")],
    mode: Annotated[str, typer.Option(help="hybrid, vector or keyword.")] = "hybrid",
    top_k: Annotated[int, typer.Option("--top-k", help="Results, 1 to 100.")] = 5,
    url: UrlOption = None,
    key: KeyOption = None,
) -> None:
    """Search a knowledge base; each result with its document, page and score."""
    with api(url, key) as client:
        found = find(client, "/api/knowledge-bases", "knowledge base", kb)
        answer = client.json(
            "POST",
            f"/api/knowledge-bases/{found['id']}/search",
            json={"query": query, "mode": mode, "top_k": top_k},
        )
    for n, result in enumerate(answer["results"], start=1):
        where = result["document_title"]
        if result["page"] is not None:
            where += f", page {result['page']}"
        if result["heading_path"]:
            where += " > " + " > ".join(result["heading_path"])
        typer.echo(f"{n}. {where}  (score {result['score']:.4f})")
        typer.echo("   " + one_line(result["text"])[:300])
