"""`heron kb` as a user runs it: a folder of mixed documents uploaded and ingested with a progress
bar, then searched, through a Heron server on loopback."""

from __future__ import annotations

from pathlib import Path

import filekinds
from conftest import Tenant
from test_cli_api import Heron


async def test_a_folder_is_ingested_with_progress_and_searched(
    base_url: str, alice: Tenant, tmp_path: Path
) -> None:
    heron = Heron(base_url, alice.key)
    folder = tmp_path / "handbook"
    (folder / "travel").mkdir(parents=True)
    (folder / "travel" / "expenses.md").write_text(
        "# Expenses\n\n## Trains\n\nSecond-class rail tickets are refunded within 30 days.\n"
    )
    (folder / "security.pdf").write_bytes(filekinds.pdf("Badges must be worn at all times"))
    (folder / "onboarding.docx").write_bytes(filekinds.docx("New staff meet their mentor"))
    (folder / "broken.pdf").write_bytes(b"%PDF-1.7\n" + b"\x00not a pdf" * 100)
    (folder / ".hidden").write_text("skipped")

    kb_id = (await heron.ok("kb", "create", "handbook")).strip()
    code, _, err = await heron("kb", "ingest", "handbook", str(folder))
    assert code == 1, err
    assert "added 4 documents to handbook" in err
    assert "Ingesting" in err
    assert "failed: handbook/broken.pdf:" in err
    assert err.rstrip().endswith("error: 1 of the knowledge base's documents failed")

    listed = await heron.ok("kb", "list")
    assert "handbook" in listed
    assert kb_id in listed
    found = await heron.ok("kb", "search", "handbook", "refund for train tickets", "--top-k", "1")
    assert found.startswith("1. handbook/travel/expenses.md > Expenses > Trains")
    assert "Second-class rail tickets" in found
    badge = await heron.ok("kb", "search", "handbook", "badges", "--mode", "keyword")
    assert "handbook/security.pdf, page 1" in badge
    assert "mentor" in await heron.ok("kb", "search", "handbook", "mentor for new staff")
    assert "no knowledge base with id or name 'nope'" in await heron.fails(
        "kb", "search", "nope", "x"
    )
    assert (await heron.ok("kb", "delete", "handbook")).strip() == "deleted handbook"
