"""Content types told from the bytes, display names, and the download's file name header."""

from __future__ import annotations

from urllib.parse import quote

import pytest

import filekinds
from filekinds import SAMPLES, random_chunks
from heron.files.router import content_disposition
from heron.files.service import display_name
from heron.files.sniffing import DOCX, HEAD_BYTES, Sniffer

MiB = 1024 * 1024


# Sniffing ---------------------------------------------------------------------------------------


def sniffed(data: bytes, chunk: int = 1000) -> str:
    sniffer = Sniffer()
    for i in range(0, len(data), chunk):
        sniffer.feed(data[i : i + chunk])
    return sniffer.content_type()


@pytest.mark.parametrize("kind", SAMPLES)
def test_sniffer_tells_kinds_apart_by_their_bytes(kind: str) -> None:
    data, expected = SAMPLES[kind]
    assert sniffed(data) == expected
    assert sniffed(data, chunk=1) == expected


def test_sniffer_reads_a_large_docx_from_its_central_directory() -> None:
    data = filekinds.docx(media_bytes=3 * HEAD_BYTES)  # its parts are not all in the head
    assert len(data) > 3 * HEAD_BYTES
    assert sniffed(data, chunk=65536) == DOCX


def test_sniffer_does_not_hold_a_character_cut_at_the_head_against_the_text() -> None:
    text = ("a" * (HEAD_BYTES - 1) + "é" + "more text\n" * 1000).encode()
    assert text[HEAD_BYTES - 1 : HEAD_BYTES + 1] == "é".encode()
    assert sniffed(text, chunk=4096) == "text/plain; charset=utf-8"
    big_markdown = ("## Section\n\nParagraph text.\n\n" * 20_000).encode()
    assert sniffed(big_markdown, chunk=65536) == "text/markdown; charset=utf-8"
    big_json = ("[" + ",".join(['{"n": 1}'] * 50_000) + "]").encode()
    assert sniffed(big_json, chunk=65536) == "application/json; charset=utf-8"


def test_sniffer_keeps_bounded_memory() -> None:
    sniffer = Sniffer()
    for chunk in random_chunks(20 * MiB, chunk=64 * 1024):
        sniffer.feed(chunk)
        assert len(sniffer.head) <= HEAD_BYTES
        assert len(sniffer._tail) <= 3 * 128 * 1024
    assert sniffer.size == 20 * MiB


# Names ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "shown"),
    [
        ("../../etc/passwd", "passwd"),
        ("C:\\Users\\me\\report.pdf", "report.pdf"),
        ("invoice\u202egpj.exe", "invoicegpj.exe"),
        ("a\x00b\r\n.txt", "ab .txt"),
        ("zero\u200bwidth.md", "zerowidth.md"),
        ("..", "unnamed"),
        ("", "unnamed"),
        ("/", "unnamed"),
        ("résumé 2024.pdf", "résumé 2024.pdf"),
    ],
)
def test_display_names_keep_only_what_is_safe_to_show(raw: str, shown: str) -> None:
    assert display_name(raw) == shown


def test_long_names_are_cut_keeping_their_extension() -> None:
    name = display_name("x" * 1000 + ".pdf")
    assert len(name) == 255
    assert name.endswith("xxx.pdf")


def test_content_disposition_encodes_the_name_exactly() -> None:
    header = content_disposition('résumé "final"; 100%.pdf')
    assert header.startswith('attachment; filename="r_sum_ _final__ 100_.pdf"; ')
    assert header.endswith("filename*=UTF-8''" + quote('résumé "final"; 100%.pdf', safe=""))
