"""The document pipeline of knowledge bases: parsing real files of every supported format, bad
input, token-aware chunking, and embeddings (the local ONNX model and an OpenAI-compatible
server on loopback)."""

from __future__ import annotations

import asyncio
import io
import itertools
import json
import math
import random
import tracemalloc
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest

from fakes.openai_server import FakeOpenAI, Reply, embedding_vector
from heron.knowledge.chunking import Chunk, chunk
from heron.knowledge.embeddings import (
    EmbeddingError,
    EmbeddingRetry,
    LocalEmbedder,
    OpenAIEmbedder,
    local_embedder,
)
from heron.knowledge.parsing import (
    CSV,
    DOCX,
    HTML,
    JSON,
    MARKDOWN,
    PDF,
    PPTX,
    TEXT,
    XLSX,
    ParsedDocument,
    ParsedPage,
    ParseError,
    ParseLimits,
    parse,
)
from heron.knowledge.tokens import minilm_token_counter

MiB = 1024 * 1024

# Files built for real ----------------------------------------------------------------------------


def make_pdf(pages: list[str]) -> bytes:
    """A minimal valid PDF, one page per string (lines split on newlines), Helvetica text."""

    def escape(line: str) -> str:
        return line.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)")

    count = len(pages)
    kids = " ".join(f"{4 + 2 * i} 0 R" for i in range(count))
    objects: dict[int, bytes] = {
        1: b"<< /Type /Catalog /Pages 2 0 R >>",
        2: f"<< /Type /Pages /Kids [{kids}] /Count {count} >>".encode(),
        3: b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
    }
    for i, text in enumerate(pages):
        lines = " ".join(f"({escape(line)}) Tj T*" for line in text.split("\n") if line)
        stream = f"BT /F1 12 Tf 72 720 Td 14 TL {lines} ET" if lines else ""
        objects[4 + 2 * i] = (
            "<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] "
            f"/Resources << /Font << /F1 3 0 R >> >> /Contents {5 + 2 * i} 0 R >>"
        ).encode()
        objects[5 + 2 * i] = f"<< /Length {len(stream)} >>\nstream\n{stream}\nendstream".encode()
    out = bytearray(b"%PDF-1.4\n")
    offsets = {}
    for number in sorted(objects):
        offsets[number] = len(out)
        out += f"{number} 0 obj\n".encode() + objects[number] + b"\nendobj\n"
    xref = len(out)
    size = max(objects) + 1
    out += f"xref\n0 {size}\n0000000000 65535 f \n".encode()
    out += b"".join(f"{offsets[n]:010d} 00000 n \n".encode() for n in range(1, size))
    out += f"trailer\n<< /Size {size} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n".encode()
    return bytes(out)


def encrypt_pdf(data: bytes, *, user_password: str, owner_password: str) -> bytes:
    from pypdf import PdfReader, PdfWriter

    writer = PdfWriter(clone_from=PdfReader(io.BytesIO(data)))
    writer.encrypt(user_password=user_password, owner_password=owner_password, algorithm="AES-128")
    out = io.BytesIO()
    writer.write(out)
    return out.getvalue()


def make_docx() -> bytes:
    import docx

    document = docx.Document()
    document.add_heading("Employee handbook", level=1)
    document.add_paragraph("Welcome to the Heron company handbook.")
    document.add_heading("Holidays", level=2)
    document.add_paragraph("Every employee gets twenty-five days of paid leave.")
    table = document.add_table(rows=2, cols=2)
    table.cell(0, 0).text, table.cell(0, 1).text = "Team", "Office"
    table.cell(1, 0).text, table.cell(1, 1).text = "Platform", "Lisbon"
    document.add_picture(io.BytesIO(tiny_png()))
    out = io.BytesIO()
    document.save(out)
    return out.getvalue()


def tiny_png() -> bytes:
    def part(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data).to_bytes(4, "big")
        return len(data).to_bytes(4, "big") + kind + data + crc

    header = (1).to_bytes(4, "big") * 2 + bytes([8, 2, 0, 0, 0])
    return (
        b"\x89PNG\r\n\x1a\n"
        + part(b"IHDR", header)
        + part(b"IDAT", zlib.compress(b"\x00\xff\x00\x00"))
        + part(b"IEND", b"")
    )


def make_pptx(slides: list[tuple[str, str]]) -> bytes:
    import pptx

    presentation = pptx.Presentation()
    for title, body in slides:
        slide = presentation.slides.add_slide(presentation.slide_layouts[1])
        slide.shapes.title.text = title
        slide.placeholders[1].text = body
    out = io.BytesIO()
    presentation.save(out)
    return out.getvalue()


def make_xlsx() -> bytes:
    import openpyxl

    workbook = openpyxl.Workbook()
    prices = workbook.active
    prices.title = "Prices"
    prices.append(["Fruit", "Price", "Note"])
    prices.append(["Apple", 1.5, "crisp | red"])
    prices.append(["Pear", 2, None])
    stock = workbook.create_sheet("Stock")
    stock.append(["Warehouse", "Units"])
    stock.append(["Porto", 1200])
    out = io.BytesIO()
    workbook.save(out)
    return out.getvalue()


def deflated_zip_entry(data: bytes, name: str, payload_chunks: list[bytes]) -> bytes:
    """A copy of the ZIP `data` with entry `name` (added or replaced) holding the chunks."""
    out = io.BytesIO()
    with (
        zipfile.ZipFile(io.BytesIO(data)) as source,
        zipfile.ZipFile(out, "w", compression=zipfile.ZIP_DEFLATED) as target,
    ):
        for entry in source.infolist():
            if entry.filename != name:
                target.writestr(entry.filename, source.read(entry))
        with target.open(name, "w") as stream:
            for piece in payload_chunks:
                stream.write(piece)
    return out.getvalue()


# Parsing: every format -----------------------------------------------------------------------


def test_pdf_text_comes_back_page_by_page_with_page_numbers() -> None:
    data = make_pdf(["Alpha page one text", "Bravo page two text\nsecond line", "Charlie three"])

    doc = parse(data, PDF)

    assert [p.page for p in doc.pages] == [1, 2, 3]
    assert "Alpha page one text" in doc.pages[0].text
    assert "Bravo page two text" in doc.pages[1].text
    assert "second line" in doc.pages[1].text
    assert "Charlie three" in doc.pages[2].text
    assert "Bravo" not in doc.pages[0].text
    assert doc.truncated is False


def test_pdf_is_read_from_a_path_too(tmp_path: Path) -> None:
    path = tmp_path / "report.pdf"
    path.write_bytes(make_pdf(["From disk"]))

    assert parse(path, PDF).pages[0].text == "From disk"


def test_pdf_with_only_an_owner_password_opens() -> None:
    data = encrypt_pdf(make_pdf(["Open to read"]), user_password="", owner_password="owner-only")

    assert parse(data, PDF).pages[0].text == "Open to read"


def test_docx_headings_paragraphs_and_tables_come_back_as_markdown() -> None:
    text = parse(make_docx(), DOCX).text

    assert "# Employee handbook" in text
    assert "## Holidays" in text
    assert "twenty-five days of paid leave" in text
    assert "Platform" in text
    assert "Lisbon" in text
    assert "base64" not in text  # an embedded image leaves no data URI behind


def test_pptx_gives_one_page_per_slide() -> None:
    data = make_pptx([("Quarterly results", "Revenue grew"), ("Next steps", "Hire engineers")])

    doc = parse(data, PPTX)

    assert [p.page for p in doc.pages] == [1, 2]
    assert "# Quarterly results" in doc.pages[0].text
    assert "Revenue grew" in doc.pages[0].text
    assert "Hire engineers" in doc.pages[1].text
    assert "Slide number" not in doc.text


def test_xlsx_sheets_become_headed_markdown_tables() -> None:
    doc = parse(make_xlsx(), XLSX)

    assert [p.page for p in doc.pages] == [None]
    assert doc.text == (
        "## Prices\n\n"
        "| Fruit | Price | Note |\n| --- | --- | --- |\n"
        "| Apple | 1.5 | crisp \\| red |\n| Pear | 2 |  |\n\n"
        "## Stock\n\n"
        "| Warehouse | Units |\n| --- | --- |\n| Porto | 1200 |"
    )


def test_html_becomes_markdown_without_its_markup() -> None:
    html = (
        b"<html><head><title>Docs</title><script>var x = 1;</script></head><body>"
        b"<h1>Install</h1><p>Run <code>pip install heron</code> &amp; enjoy.</p>"
        b"<ul><li>fast</li><li>small</li></ul></body></html>"
    )

    text = parse(html, "text/html; charset=utf-8").text

    assert "# Install" in text
    assert "pip install heron" in text
    assert "& enjoy" in text
    assert "* fast" in text or "- fast" in text
    assert "<p>" not in text
    assert "var x" not in text


def test_markdown_and_plain_text_come_back_as_they_are() -> None:
    markdown = "# Title\n\nSome *text*.\n\n## Part\n\nMore."
    assert parse(markdown.encode(), MARKDOWN).text == markdown
    assert parse(b"just words\r\nand lines\n", TEXT).text == "just words\nand lines"


def test_csv_becomes_a_markdown_table() -> None:
    data = b'city,population\nLisbon,545000\n"Porto, north",232000\n'

    assert parse(data, CSV).text == (
        "| city | population |\n| --- | --- |\n| Lisbon | 545000 |\n| Porto, north | 232000 |"
    )


def test_json_is_pretty_printed_so_it_has_lines_to_cut_at() -> None:
    data = json.dumps({"name": "heron", "tags": ["agents", "rag"], "ünïcode": True}).encode()

    text = parse(data, "application/json").text

    assert json.loads(text) == json.loads(data)
    assert '\n  "name": "heron"' in text
    assert "ünïcode" in text


def test_invalid_json_is_kept_as_text() -> None:
    assert parse(b'{"unterminated": ', JSON).text == '{"unterminated":'


# Parsing: bad input --------------------------------------------------------------------------


@pytest.mark.parametrize("content_type", [PDF, DOCX, PPTX, XLSX, HTML, MARKDOWN, TEXT, CSV, JSON])
def test_an_empty_file_fails_with_a_reason(content_type: str) -> None:
    with pytest.raises(ParseError, match="empty"):
        parse(b"", content_type)


def test_whitespace_only_text_fails_as_containing_no_text() -> None:
    with pytest.raises(ParseError, match="no text"):
        parse(b" \n\n\t ", TEXT)


def test_a_corrupt_pdf_fails_with_a_reason() -> None:
    good = make_pdf(["Some text"])
    for bad in (b"%PDF-1.7\nthis is not really a pdf", good[: len(good) // 2], b"\x00" * 100):
        with pytest.raises(ParseError, match="PDF"):
            parse(bad, PDF)


def test_an_encrypted_pdf_fails_saying_it_needs_a_password() -> None:
    data = encrypt_pdf(make_pdf(["Secret"]), user_password="secret", owner_password="owner")

    with pytest.raises(ParseError, match="encrypted"):
        parse(data, PDF)


def test_a_pdf_without_a_text_layer_fails_saying_so() -> None:
    with pytest.raises(ParseError, match="no extractable text"):
        parse(make_pdf(["", ""]), PDF)


def test_an_unsupported_type_fails_with_a_reason() -> None:
    with pytest.raises(ParseError, match="Unsupported file type image/png"):
        parse(b"\x89PNG\r\n\x1a\n", "image/png")


def test_other_text_types_are_read_as_plain_text() -> None:
    assert parse(b"def main():\n    pass\n", "text/x-python").text == "def main():\n    pass"


@pytest.mark.parametrize(("content_type", "kind"), [(DOCX, "DOCX"), (PPTX, "PPTX"), (XLSX, "XLSX")])
def test_an_office_file_that_is_not_a_zip_fails_with_a_reason(content_type: str, kind: str) -> None:
    with pytest.raises(ParseError, match=f"{kind} file is damaged"):
        parse(b"PK\x03\x04 not really a zip archive", content_type)


def test_a_password_protected_office_file_fails_saying_so() -> None:
    # Office encrypts a protected DOCX/XLSX into an OLE compound file instead of a ZIP.
    ole = b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1" + bytes(4088)
    for content_type in (DOCX, XLSX, PPTX):
        with pytest.raises(ParseError, match="password-protected"):
            parse(ole, content_type)


def test_a_docx_missing_its_document_fails_with_a_reason() -> None:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as archive:
        archive.writestr("[Content_Types].xml", "<Types/>")
    with pytest.raises(ParseError, match="DOCX file is damaged"):
        parse(out.getvalue(), DOCX)


def mangled(good: bytes, rng: random.Random) -> bytes:
    """`good` cut short, or with bytes overwritten, or (a ZIP) with one part's XML damaged."""
    data = bytearray(good)
    how = rng.randrange(3)
    if how == 0:
        return bytes(data[: rng.randrange(1, len(data))])
    if how == 1 or not good.startswith(b"PK"):
        for _ in range(rng.randint(1, 20)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        return bytes(data)
    out = io.BytesIO()
    with (
        zipfile.ZipFile(io.BytesIO(good)) as source,
        zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as target,
    ):
        victim = rng.choice(source.namelist())
        for name in source.namelist():
            part = bytearray(source.read(name))
            if name == victim and part:
                for _ in range(rng.randint(1, 10)):
                    part[rng.randrange(len(part))] = rng.choice(b'<>/"=& x\x00\xff')
            target.writestr(name, bytes(part))
    return out.getvalue()


def test_damaged_files_parse_or_fail_with_a_reason_never_otherwise() -> None:
    rng = random.Random(20261122)
    samples = {
        PDF: make_pdf(["Alpha page one", "Bravo page two"]),
        DOCX: make_docx(),
        PPTX: make_pptx([("Title", "Body"), ("Second", "More")]),
        XLSX: make_xlsx(),
        HTML: b"<html><body><h1>x</h1><table><tr><td>a</td></tr></table></body></html>",
        CSV: b"a,b\n1,2\n",
        JSON: b'{"a": [1, 2]}',
    }
    reasons: list[str] = []
    for content_type, good in samples.items():
        for _ in range(25):
            try:
                parse(mangled(good, rng), content_type)
            except ParseError as exc:  # anything else fails the test
                reasons.append(str(exc))
    assert reasons
    assert all(reasons)


def test_a_zip_bomb_inside_a_docx_is_refused_before_it_is_decompressed() -> None:
    zeros = b"\x00" * MiB
    bomb = deflated_zip_entry(make_docx(), "word/media/image1.bin", [zeros] * 50)
    assert len(bomb) < MiB

    with pytest.raises(ParseError, match="decompression bomb"):
        parse(bomb, DOCX)


def test_a_zip_bomb_inside_an_xlsx_is_refused() -> None:
    row = b'<row r="1"><c r="A1" t="inlineStr"><is><t>boom</t></is></c></row>'
    head = (
        b'<worksheet xmlns="http://schemas.openxmlformats.org/spreadsheetml/2006/main"><sheetData>'
    )
    bomb = deflated_zip_entry(
        make_xlsx(),
        "xl/worksheets/sheet1.xml",
        [head] + [row * 16_000] * 60 + [b"</sheetData></worksheet>"],
    )

    with pytest.raises(ParseError, match="decompression bomb"):
        parse(bomb, XLSX)


def test_an_office_file_decompressing_past_the_total_limit_is_refused() -> None:
    noise = np.random.default_rng(7).bytes(2 * MiB)  # incompressible: no ratio to catch
    data = deflated_zip_entry(make_docx(), "word/media/noise.bin", [noise])

    with pytest.raises(ParseError, match="would decompress to"):
        parse(data, DOCX, limits=ParseLimits(max_archive_bytes=1 * MiB))
    assert "Employee handbook" in parse(data, DOCX).text


def test_a_zip_whose_directory_understates_an_entry_size_is_refused() -> None:
    name = "word/media/liar.bin"
    data = bytearray(deflated_zip_entry(make_docx(), name, [b"\x00" * (4 * MiB)]))
    with zipfile.ZipFile(io.BytesIO(bytes(data))) as archive:
        local = archive.getinfo(name).header_offset
    central = data.index(b"PK\x01\x02")
    while data[central + 46 : central + 46 + len(name)] != name.encode():
        central = data.index(b"PK\x01\x02", central + 4)
    # Declare 1,000 bytes (local header and central directory), which passes every limit;
    # the data still inflates to 4 MiB.
    data[local + 22 : local + 26] = data[central + 24 : central + 28] = (1000).to_bytes(4, "little")
    with zipfile.ZipFile(io.BytesIO(bytes(data))) as archive:
        assert archive.getinfo(name).file_size == 1000

    with pytest.raises(ParseError, match="damaged"):
        parse(bytes(data), DOCX)


def test_a_50_mb_text_file_is_cut_at_the_limit_in_bounded_memory(tmp_path: Path) -> None:
    path = tmp_path / "big.txt"
    line = "The quick brown fox jumps over the lazy dog, again and again and again.\n"
    with path.open("w") as f:
        for _ in range(50 * MiB // len(line) + 1):
            f.write(line)
    assert path.stat().st_size >= 50 * MiB
    limits = ParseLimits()

    tracemalloc.start()
    try:
        doc = parse(path, TEXT, limits=limits)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    assert doc.truncated is True
    assert limits.max_chars - len(line) < len(doc.text) <= limits.max_chars
    assert doc.text.endswith("again.")  # cut at a line break
    assert peak < 8 * limits.max_chars  # a few copies of the kept text, never the whole file


def test_text_past_the_limit_is_cut_for_every_format() -> None:
    limits = ParseLimits(max_chars=2_000)
    words = "\n".join(f"Line {i} of a long document." for i in range(500))

    text_doc = parse(words.encode(), TEXT, limits=limits)
    pdf_doc = parse(make_pdf([words[:3000], "page two", "page three"]), PDF, limits=limits)
    csv_doc = parse(("a,b\n" + "x,y\n" * 2000).encode(), CSV, limits=limits)

    for doc in (text_doc, pdf_doc, csv_doc):
        assert doc.truncated is True
        assert sum(len(p.text) for p in doc.pages) <= limits.max_chars
    assert [p.page for p in pdf_doc.pages] == [1]


def test_latin_1_text_is_decoded_without_mojibake() -> None:
    text = "Café crème brûlée, naïve façade. Über große Straßen läuft ein Bär."

    assert parse(text.encode("latin-1"), TEXT).text == text
    assert parse(text.encode("latin-1"), CSV).text == (
        "| Café crème brûlée | naïve façade. Über große Straßen läuft ein Bär. |\n| --- | --- |"
    )


def test_other_encodings_are_detected_or_declared() -> None:
    russian = "Съешь же ещё этих мягких французских булок, да выпей чаю."
    assert parse(russian.encode("cp1251"), TEXT).text == russian
    assert parse("Grüße aus Köln".encode("utf-16"), TEXT).text == "Grüße aus Köln"
    assert parse("Ça va".encode("utf-8-sig"), TEXT).text == "Ça va"
    assert parse("Grüße".encode("iso-8859-15"), "text/plain; charset=ISO-8859-15").text == "Grüße"


def test_binary_noise_as_text_never_crashes() -> None:
    noise = np.random.default_rng(1).bytes(100_000)

    doc = parse(noise, TEXT)

    assert isinstance(doc.text, str)


# Chunking ------------------------------------------------------------------------------------


def long_markdown() -> str:
    steps = " ".join(
        f"Step {i} of the installation copies file number {i} into the target directory."
        for i in range(120)
    )
    usage = "\n\n".join(
        f"Usage paragraph {i}: the command reads its settings and prints a short report."
        for i in range(30)
    )
    return (
        "# Guide\n\nThis guide explains the product.\n\n"
        f"## Install\n\n{steps}\n\n"
        f"## Use\n\n{usage}\n\n"
        "```\n# a comment in code, not a heading\n```\n\n"
        "# Appendix\n\nContact support."
    )


def covered(page_text: str, chunks: list[Chunk]) -> bool:
    mask = [False] * len(page_text)
    for c in chunks:
        for i in range(c.start, c.end):
            mask[i] = True
    return all(hit or ch.isspace() for hit, ch in zip(mask, page_text, strict=True))


def test_chunks_fit_the_size_in_model_tokens_and_cover_every_character() -> None:
    text = long_markdown()
    doc = ParsedDocument(pages=[ParsedPage(text=text, page=None)])
    counter = minilm_token_counter()

    chunks = chunk(doc, size=128, overlap=16)

    assert len(chunks) > 5
    assert [c.position for c in chunks] == list(range(len(chunks)))
    for c in chunks:
        assert text[c.start : c.end] == c.text
        assert c.text == c.text.strip()
        assert c.token_count == counter.count(c.text)
        assert c.token_count <= 128
    assert covered(text, chunks)


def test_chunks_keep_their_heading_path() -> None:
    doc = ParsedDocument(pages=[ParsedPage(text=long_markdown(), page=None)])

    chunks = chunk(doc, size=128, overlap=16)

    paths = {tuple(c.heading_path) for c in chunks}
    assert paths == {("Guide",), ("Guide", "Install"), ("Guide", "Use"), ("Appendix",)}
    install = [c for c in chunks if c.heading_path == ["Guide", "Install"]]
    assert install[0].text.startswith("## Install")
    assert all("Step" in c.text for c in install)
    code = next(c for c in chunks if "a comment in code" in c.text)
    assert code.heading_path == ["Guide", "Use"]  # a `#` inside a code block is no heading
    assert chunks[-1].embedding_text() == "Appendix\n\n# Appendix\n\nContact support."
    assert install[1].embedding_text().startswith("Guide > Install\n\nStep")


def test_a_heading_directly_above_a_subheading_does_not_stand_alone() -> None:
    doc = ParsedDocument(
        pages=[ParsedPage(text="# Manual\n\n## Start\n\nPress the button.", page=None)]
    )

    chunks = chunk(doc)

    assert [(c.heading_path, c.text) for c in chunks] == [
        (["Manual", "Start"], "# Manual\n\n## Start\n\nPress the button.")
    ]


def test_consecutive_chunks_of_a_long_section_overlap_from_a_word_start() -> None:
    doc = ParsedDocument(pages=[ParsedPage(text=long_markdown(), page=None)])

    chunks = [c for c in chunk(doc, size=128, overlap=24) if c.heading_path == ["Guide", "Install"]]

    assert len(chunks) >= 3
    counter = minilm_token_counter()
    for before, after in itertools.pairwise(chunks):
        assert after.start < before.end  # the next chunk repeats the end of the one before
        shared = doc.pages[0].text[after.start : before.end]
        assert 0 < counter.count(shared) <= 24
        assert doc.pages[0].text[after.start - 1].isspace()


def test_paragraphs_are_kept_whole_when_they_fit() -> None:
    doc = ParsedDocument(pages=[ParsedPage(text=long_markdown(), page=None)])

    chunks = [c for c in chunk(doc, size=100, overlap=0) if c.heading_path == ["Guide", "Use"]]

    for c in chunks:
        body = c.text.removeprefix("## Use").strip()
        assert body.startswith("Usage paragraph") or body.startswith("```")
        assert body.endswith(("report.", "```"))


def test_chunks_never_cross_a_page_and_keep_its_number() -> None:
    pages = [
        ParsedPage(text=" ".join(f"Page one sentence {i}." for i in range(80)), page=1),
        ParsedPage(text="", page=2),
        ParsedPage(text="Page three is short.", page=3),
    ]

    chunks = chunk(ParsedDocument(pages=pages), size=64, overlap=8)

    assert {c.page for c in chunks} == {1, 3}
    assert all("Page three" not in c.text for c in chunks if c.page == 1)
    assert [c.text for c in chunks if c.page == 3] == ["Page three is short."]
    assert covered(pages[0].text, [c for c in chunks if c.page == 1])


def test_text_without_spaces_is_cut_between_tokens() -> None:
    blob = json.dumps({f"key{i}": [i, i * 2, "value"] for i in range(400)}, separators=(",", ":"))
    doc = ParsedDocument(pages=[ParsedPage(text=blob, page=None)])
    counter = minilm_token_counter()

    chunks = chunk(doc, size=64, overlap=8)

    assert len(chunks) > 10
    assert all(counter.count(c.text) <= 64 for c in chunks)
    assert covered(blob, chunks)


def test_a_giant_word_is_cut_by_characters() -> None:
    # The tokenizer counts any word of more than 100 characters as one unknown token.
    blob = "QUJD" * 50_000
    doc = ParsedDocument(pages=[ParsedPage(text=f"Attachment:\n{blob}\nEnd.", page=None)])

    chunks = chunk(doc, size=64, overlap=8)

    assert max(len(c.text) for c in chunks) <= 64 * 16
    assert covered(doc.pages[0].text, chunks)
    assert chunks[-1].text.endswith("End.")


def test_chunking_checks_its_settings() -> None:
    doc = ParsedDocument(pages=[ParsedPage(text="text", page=None)])
    with pytest.raises(ValueError, match="overlap"):
        chunk(doc, size=64, overlap=40)
    with pytest.raises(ValueError, match="size"):
        chunk(doc, size=4, overlap=0)


def test_a_parsed_pdf_is_chunked_page_by_page() -> None:
    doc = parse(make_pdf(["First page words.", "Second page words."]), PDF)

    chunks = chunk(doc)

    assert [(c.page, c.text) for c in chunks] == [
        (1, "First page words."),
        (2, "Second page words."),
    ]


# Local embeddings ----------------------------------------------------------------------------

# sentence-transformers' all-MiniLM-L6-v2 (float32 weights, as published) embeds "This is an
# example sentence" with these first components, and gives these cosine similarities.
REFERENCE_FIRST_COMPONENTS = [0.0676569, 0.06349588, 0.04871317, 0.07930496, 0.03744803]
REFERENCE_SIMILARITIES = {
    ("The weather is lovely today.", "It's so sunny outside!"): 0.666,
    ("A man is eating food.", "A man is eating a piece of bread."): 0.755,
    ("The weather is lovely today.", "He drove to the stadium."): 0.105,
}


@pytest.fixture(scope="module")
def embedder() -> LocalEmbedder:
    return local_embedder()


async def test_local_embeddings_are_unit_float32_rows_of_384(embedder: LocalEmbedder) -> None:
    vectors = await embedder.embed(["one text", "another, longer text to embed", ""])

    assert vectors.shape == (3, 384)
    assert vectors.dtype == np.float32
    assert (await embedder.embed([])).shape == (0, 384)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert embedder.name == "all-MiniLM-L6-v2"
    assert embedder.dimensions == 384


async def test_local_embeddings_match_the_published_model(embedder: LocalEmbedder) -> None:
    """The int8 model stays within about 0.005 of the float32 original."""
    vector = await embedder.embed_query("This is an example sentence")

    assert vector.shape == (384,)
    assert np.allclose(vector[:5], REFERENCE_FIRST_COMPONENTS, atol=0.005)
    for (a, b), expected in REFERENCE_SIMILARITIES.items():
        va, vb = await embedder.embed([a, b])
        assert float(va @ vb) == pytest.approx(expected, abs=0.02)


async def test_paraphrases_are_closer_than_unrelated_texts(embedder: LocalEmbedder) -> None:
    texts = [
        "How do I reset my password?",
        "What are the steps to change a forgotten password?",
        "The recipe needs two cups of flour and an egg.",
    ]
    q, paraphrase, unrelated = await embedder.embed(texts)

    assert float(q @ paraphrase) > 0.6
    assert float(q @ unrelated) < 0.2


async def test_batches_keep_the_order_of_the_texts(embedder: LocalEmbedder) -> None:
    texts = [("word " * (n * 7 % 40 + 1)).strip() + f" number {n}" for n in range(70)]
    small = LocalEmbedder(batch_size=8)

    together = await small.embed(texts)
    alone = np.stack([await embedder.embed_query(t) for t in texts[:5]])

    assert np.allclose(together[:5], alone, atol=1e-4)
    assert np.allclose(together, await embedder.embed(texts), atol=1e-4)


async def test_a_query_does_not_wait_for_an_ingestion_batch(embedder: LocalEmbedder) -> None:
    # Long texts: the batch takes seconds on the embedder's batch thread; the query, on its
    # own session and thread, answers while the batch still runs.
    texts = [" ".join(f"w{n}x{i}" for i in range(200)) for n in range(48)]
    batch = asyncio.create_task(embedder.embed(texts))
    await asyncio.sleep(0.05)  # the batch has started
    vector = await embedder.embed_query("where do herons nest")
    assert not batch.done()
    assert vector.shape == (384,)
    assert (await batch).shape == (48, 384)


async def test_long_texts_are_truncated_to_256_tokens(embedder: LocalEmbedder) -> None:
    words = [f"w{i}" for i in range(600)]
    counter = minilm_token_counter()
    head = " ".join(words[:300])
    while counter.count(head) > 254:  # 256 with the [CLS] and [SEP] tokens
        head = head.rsplit(" ", 1)[0]

    long_vector, head_vector = await embedder.embed([" ".join(words), head])

    assert float(long_vector @ head_vector) > 0.999


async def test_embedding_runs_off_the_event_loop(embedder: LocalEmbedder) -> None:
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0)
            ticks += 1

    task = asyncio.create_task(ticker())
    await embedder.embed(["a sentence to embed, of some length"] * 64)
    task.cancel()

    assert ticks > 0


def test_the_local_embedder_is_one_per_process() -> None:
    assert local_embedder() is local_embedder()


def test_a_forked_worker_loads_its_own_local_embedder(embedder: LocalEmbedder) -> None:
    import multiprocessing

    embedder.load()
    with multiprocessing.get_context("fork").Pool(1) as pool:
        child_is_parent, shape = pool.apply(_embed_in_child, (id(embedder),))

    assert child_is_parent is False
    assert shape == (1, 384)


def _embed_in_child(parent_id: int) -> tuple[bool, tuple[int, ...]]:
    embedder = local_embedder()
    return id(embedder) == parent_id, embedder.embed_sync(["from a worker"]).shape


def test_a_missing_model_file_fails_with_a_reason(tmp_path: Path) -> None:
    with pytest.raises(EmbeddingError, match="model file is missing"):
        LocalEmbedder(model_path=tmp_path / "absent.onnx").embed_sync(["x"])


# OpenAI-compatible embeddings ----------------------------------------------------------------


def expected(text: str, dimensions: int) -> np.ndarray:
    vector = np.array(embedding_vector(text, dimensions), dtype=np.float32)
    return vector / np.linalg.norm(vector)


class Sleeps:
    def __init__(self) -> None:
        self.waits: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.waits.append(seconds)


async def test_openai_embeddings_are_batched_ordered_and_normalised() -> None:
    fake = FakeOpenAI(api_key="sk-test-embeddings", models=["text-embedding-test"])
    texts = [f"text number {i}" for i in range(5)]
    async with fake.serve() as base_url:
        embedder = OpenAIEmbedder(
            base_url=base_url,
            api_key="sk-test-embeddings",
            model="text-embedding-test",
            dimensions=8,
            batch_size=2,
        )
        vectors = await embedder.embed(texts)
        query = await embedder.embed_query("the query")

    assert vectors.shape == (5, 8)
    assert vectors.dtype == np.float32
    assert np.allclose(vectors, np.stack([expected(t, 8) for t in texts]), atol=1e-6)
    assert np.allclose(query, expected("the query", 8), atol=1e-6)
    assert [r.body["input"] for r in fake.embedding_requests] == [
        texts[0:2],
        texts[2:4],
        texts[4:5],
        ["the query"],
    ]
    first = fake.embedding_requests[0]
    assert first.headers["authorization"] == "Bearer sk-test-embeddings"
    assert first.body["model"] == "text-embedding-test"
    assert "dimensions" not in first.body
    assert embedder.name == "text-embedding-test"


async def test_openai_embeddings_can_ask_for_fewer_dimensions() -> None:
    fake = FakeOpenAI(models=["text-embedding-3-small"])
    async with fake.serve() as base_url:
        embedder = OpenAIEmbedder(
            base_url=base_url,
            api_key=None,
            model="text-embedding-3-small",
            dimensions=16,
            send_dimensions=True,
        )
        vectors = await embedder.embed(["a"])

    assert vectors.shape == (1, 16)
    assert fake.embedding_requests[0].body["dimensions"] == 16
    assert "authorization" not in fake.embedding_requests[0].headers


async def test_openai_embeddings_retry_rate_limits_and_server_errors() -> None:
    fake = FakeOpenAI(models=["emb"])
    fake.push_embeddings(Reply.failure(429, "Slow down", retry_after=3), Reply.failure(503))
    sleeps = Sleeps()
    async with fake.serve() as base_url:
        embedder = OpenAIEmbedder(
            base_url=base_url,
            api_key="k",
            model="emb",
            dimensions=8,
            retry=EmbeddingRetry(sleep=sleeps),
        )
        vectors = await embedder.embed(["retried"])

    assert np.allclose(vectors[0], expected("retried", 8), atol=1e-6)
    assert len(fake.embedding_requests) == 3
    assert sleeps.waits[0] == 3  # Retry-After honoured
    assert 0 < sleeps.waits[1] <= 1.0  # then exponential backoff


async def test_openai_embeddings_give_up_after_the_last_attempt() -> None:
    fake = FakeOpenAI(models=["emb"])
    fake.push_embeddings(*[Reply.failure(500, "Upstream exploded")] * 3)
    async with fake.serve() as base_url:
        embedder = OpenAIEmbedder(
            base_url=base_url,
            api_key="k",
            model="emb",
            dimensions=8,
            retry=EmbeddingRetry(attempts=3, sleep=Sleeps()),
        )
        with pytest.raises(EmbeddingError, match="answered 500: Upstream exploded"):
            await embedder.embed(["x"])

    assert len(fake.embedding_requests) == 3


async def test_openai_embeddings_do_not_retry_a_refused_request() -> None:
    fake = FakeOpenAI(api_key="right-key", models=["emb"])
    async with fake.serve() as base_url:
        embedder = OpenAIEmbedder(
            base_url=base_url, api_key="wrong-key", model="emb", dimensions=8,
            retry=EmbeddingRetry(sleep=Sleeps()),
        )  # fmt: skip
        with pytest.raises(EmbeddingError, match="answered 401: Incorrect API key"):
            await embedder.embed(["x"])

    assert len(fake.embedding_requests) == 1


async def test_openai_embeddings_of_the_wrong_size_are_refused() -> None:
    fake = FakeOpenAI(models=["emb"])
    async with fake.serve() as base_url:
        embedder = OpenAIEmbedder(base_url=base_url, api_key=None, model="emb", dimensions=384)
        with pytest.raises(EmbeddingError, match="384 dimensions were expected"):
            await embedder.embed(["x"])


async def test_an_unreachable_embedding_provider_fails_with_a_reason() -> None:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    embedder = OpenAIEmbedder(
        base_url=f"http://127.0.0.1:{port}/v1", api_key=None, model="emb", dimensions=8,
        retry=EmbeddingRetry(attempts=2, sleep=Sleeps()),
    )  # fmt: skip

    with pytest.raises(EmbeddingError, match="can't be reached"):
        await embedder.embed(["x"])


async def test_no_texts_need_no_request() -> None:
    embedder = OpenAIEmbedder(
        base_url="http://127.0.0.1:9/v1", api_key=None, model="m", dimensions=4
    )

    vectors = await embedder.embed([])

    assert vectors.shape == (0, 4)
    assert not math.isnan(float(vectors.sum()))
