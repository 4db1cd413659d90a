"""Real files of the kinds Heron tells apart, built in memory (a PDF with a valid xref table,
OOXML packages with the parts Office writes, a PNG with correct CRCs, texts), with the content
type each must be given; and random content generated on the fly."""

from __future__ import annotations

import io
import json
import random
import struct
import zipfile
import zlib
from collections.abc import AsyncIterator, Iterator

from heron.files.sniffing import DOCX, PPTX, XLSX


def pdf(text: str = "Hello, Heron") -> bytes:
    stream = f"BT /F1 24 Tf 20 100 Td ({text}) Tj ET".encode()
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 300 200] /Contents 4 0 R "
        b"/Resources << /Font << /F1 5 0 R >> >> >>",
        b"<< /Length %d >>\nstream\n" % len(stream) + stream + b"\nendstream",
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
    ]
    out = bytearray(b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n")
    offsets = []
    for number, body in enumerate(objects, 1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % number + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % offset for offset in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (
        len(objects) + 1,
        xref,
    )
    return bytes(out)


_RELS = (
    '<?xml version="1.0" encoding="UTF-8" standalone="yes"?>'
    '<Relationships xmlns="http://schemas.openxmlformats.org/package/2006/relationships">'
    '<Relationship Id="rId1" '
    'Type="http://schemas.openxmlformats.org/officeDocument/2006/relationships/officeDocument" '
    'Target="{target}"/></Relationships>'
)


def _content_types(overrides: dict[str, str]) -> str:
    parts = "".join(
        f'<Override PartName="/{name}" ContentType="{kind}"/>' for name, kind in overrides.items()
    )
    return (
        '<?xml version="1.0" encoding="UTF-8" standalone="yes"?>'
        '<Types xmlns="http://schemas.openxmlformats.org/package/2006/content-types">'
        '<Default Extension="rels" '
        'ContentType="application/vnd.openxmlformats-package.relationships+xml"/>'
        '<Default Extension="xml" ContentType="application/xml"/>'
        '<Default Extension="png" ContentType="image/png"/>'
        f"{parts}</Types>"
    )


def _package(parts: dict[str, str | bytes], stored: dict[str, bytes] | None = None) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as package:
        for name, content in parts.items():
            package.writestr(name, content)
        for name, content in (stored or {}).items():
            package.writestr(name, content, compress_type=zipfile.ZIP_STORED)
    return buffer.getvalue()


def docx(text: str = "Hello from a document", media_bytes: int = 0) -> bytes:
    main = "application/vnd.openxmlformats-officedocument.wordprocessingml.document.main+xml"
    document = (
        '<?xml version="1.0" encoding="UTF-8" standalone="yes"?>'
        '<w:document xmlns:w="http://schemas.openxmlformats.org/wordprocessingml/2006/main">'
        f"<w:body><w:p><w:r><w:t>{text}</w:t></w:r></w:p></w:body></w:document>"
    )
    media = (
        {"word/media/image1.png": random.Random(1).randbytes(media_bytes)} if media_bytes else {}
    )
    return _package(
        {
            "[Content_Types].xml": _content_types({"word/document.xml": main}),
            "_rels/.rels": _RELS.format(target="word/document.xml"),
            "word/document.xml": document,
        },
        media,
    )


def xlsx(rows: list[list[str]] | None = None) -> bytes:
    rows = rows or [["name", "age"], ["alice", "30"]]
    sheet_kind = "application/vnd.openxmlformats-officedocument.spreadsheetml.worksheet+xml"
    book_kind = "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet.main+xml"
    cells = "".join(
        f'<row r="{r}">'
        + "".join(
            f'<c r="{chr(65 + c)}{r}" t="inlineStr"><is><t>{value}</t></is></c>'
            for c, value in enumerate(row)
        )
        + "</row>"
        for r, row in enumerate(rows, 1)
    )
    ns = "http://schemas.openxmlformats.org/spreadsheetml/2006/main"
    rel_ns = "http://schemas.openxmlformats.org/officeDocument/2006/relationships"
    return _package(
        {
            "[Content_Types].xml": _content_types(
                {"xl/workbook.xml": book_kind, "xl/worksheets/sheet1.xml": sheet_kind}
            ),
            "_rels/.rels": _RELS.format(target="xl/workbook.xml"),
            "xl/workbook.xml": f'<workbook xmlns="{ns}" xmlns:r="{rel_ns}"><sheets>'
            '<sheet name="Sheet1" sheetId="1" r:id="rId1"/></sheets></workbook>',
            "xl/_rels/workbook.xml.rels": '<Relationships xmlns="http://schemas.openxmlformats'
            '.org/package/2006/relationships"><Relationship Id="rId1" Type="http://schemas.'
            'openxmlformats.org/officeDocument/2006/relationships/worksheet" '
            'Target="worksheets/sheet1.xml"/></Relationships>',
            "xl/worksheets/sheet1.xml": f'<worksheet xmlns="{ns}"><sheetData>{cells}'
            "</sheetData></worksheet>",
        }
    )


def pptx() -> bytes:
    kind = "application/vnd.openxmlformats-officedocument.presentationml.presentation.main+xml"
    return _package(
        {
            "[Content_Types].xml": _content_types({"ppt/presentation.xml": kind}),
            "_rels/.rels": _RELS.format(target="ppt/presentation.xml"),
            "ppt/presentation.xml": '<p:presentation xmlns:p="http://schemas.openxmlformats.org'
            '/presentationml/2006/main"/>',
        }
    )


def plain_zip() -> bytes:
    return _package({"notes.txt": "just a zip", "data/values.json": json.dumps([1, 2])})


def png(width: int = 2, height: int = 2) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    raw = b"".join(b"\x00" + b"\xff\x00\x00" * width for _ in range(height))
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(raw))
        + chunk(b"IEND", b"")
    )


GIF = (
    b"GIF89a\x01\x00\x01\x00\x80\x00\x00\x00\x00\x00\xff\xff\xff!\xf9\x04\x01\x00\x00\x00\x00"
    b",\x00\x00\x00\x00\x01\x00\x01\x00\x00\x02\x02D\x01\x00;"
)
JPEG_HEAD = b"\xff\xd8\xff\xe0\x00\x10JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00"


def garbage(size: int = 4096, seed: int = 7) -> bytes:
    return b"\x00\x01" + random.Random(seed).randbytes(size - 2)


def random_chunks(total: int, chunk: int = 256 * 1024, seed: int = 3) -> Iterator[bytes]:
    rng = random.Random(seed)
    sent = 0
    while sent < total:
        size = min(chunk, total - sent)
        yield rng.randbytes(size)
        sent += size


async def agen(chunks: Iterator[bytes]) -> AsyncIterator[bytes]:
    for chunk in chunks:
        yield chunk


# Each kind's bytes and the content type sniffed from them.
SAMPLES: dict[str, tuple[bytes, str]] = {
    "pdf": (pdf(), "application/pdf"),
    "docx": (docx(), DOCX),
    "xlsx": (xlsx(), XLSX),
    "pptx": (pptx(), PPTX),
    "zip": (plain_zip(), "application/zip"),
    "png": (png(), "image/png"),
    "gif": (GIF, "image/gif"),
    "jpeg": (JPEG_HEAD + b"\x00" * 100, "image/jpeg"),
    "utf8": ("Grüße aus Köln — 世界\nline two\n".encode(), "text/plain; charset=utf-8"),
    "utf8-bom": ("\ufeffhello\n".encode(), "text/plain; charset=utf-8"),
    "markdown": (
        b"# Title\n\nSome text with a [link](https://example.com).\n\n- one\n- two\n",
        "text/markdown; charset=utf-8",
    ),
    "csv": (b'name,age,city\nalice,30,Paris\nbob,41,"Rio, BR"\n', "text/csv; charset=utf-8"),
    "tsv": (b"name\tage\nalice\t30\n", "text/tab-separated-values; charset=utf-8"),
    "json": (json.dumps({"a": [1, 2], "b": "é"}).encode(), "application/json; charset=utf-8"),
    "html": (
        b"<!DOCTYPE html><html><body><script>alert(1)</script></body></html>",
        "text/html; charset=utf-8",
    ),
    "latin-1": ("café au lait, crème brûlée\n".encode("latin-1"), "text/plain"),
    "garbage": (garbage(), "application/octet-stream"),
    "empty": (b"", "text/plain; charset=utf-8"),
}
