"""Documents to Markdown text: PDF, DOCX, PPTX, XLSX, HTML, Markdown, plain text, CSV and JSON.

`parse()` is synchronous and CPU-bound (run it in a thread or a process). It takes untrusted bytes
and either returns text or raises `ParseError` with a reason a user can act on; it never hangs on
or exhausts memory over a hostile file, because every format is read within `ParseLimits`:

- PDF (pypdf): one `ParsedPage` per page, numbered from 1. Encrypted files open only if they
  need no password; a page whose text can't be extracted is left empty with a warning.
- DOCX and PPTX (markitdown): Office files are ZIP archives, so the archive is checked before
  any parser sees it (entry count, total uncompressed size, compression ratio of each large
  entry), and every entry is decompressed once to prove its declared size is true. PPTX gives
  one page per slide, numbered from 1.
- XLSX (python-calamine, Rust): each sheet becomes `## <sheet name>` and a Markdown table, read
  row by row and cut at the text limit. (markitdown's route through pandas and HTML took 52 s and
  1 GB of memory for a 500,000-cell sheet that calamine reads in under a second.)
- HTML (markitdown), CSV (a Markdown table), JSON (pretty-printed when it parses), Markdown,
  plain text and any other `text/*` type: decoded from UTF-8, a byte-order mark, or the
  detected legacy encoding, read incrementally so a 50 MB file costs no more than the limit.

Text past `ParseLimits.max_chars` is cut at a line break and the document is marked `truncated`.
"""

from __future__ import annotations

import codecs
import csv
import io
import json
import re
import struct
import xml.parsers.expat
import zipfile
import zlib
from collections.abc import Iterable
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, ClassVar

from heron.core.errors import HeronError

MiB = 1024 * 1024

PDF = "application/pdf"
DOCX = "application/vnd.openxmlformats-officedocument.wordprocessingml.document"
PPTX = "application/vnd.openxmlformats-officedocument.presentationml.presentation"
XLSX = "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet"
HTML = "text/html"
MARKDOWN = "text/markdown"
TEXT = "text/plain"
CSV = "text/csv"
JSON = "application/json"

SUPPORTED_CONTENT_TYPES = frozenset({PDF, DOCX, PPTX, XLSX, HTML, MARKDOWN, TEXT, CSV, JSON})
_ALIASES = {
    "application/x-pdf": PDF,
    "application/xhtml+xml": HTML,
    "text/x-markdown": MARKDOWN,
    "application/csv": CSV,
    "text/json": JSON,
}


@dataclass(frozen=True)
class ParseLimits:
    """How much of a document is read. Past `max_chars` text is cut; past the others the
    document is refused, except `max_pdf_pages` and `max_markup_bytes`, which also cut."""

    # Text kept per document, in characters (about 1,000 pages of prose).
    max_chars: int = 5_000_000
    # PDF and Office files larger than this are refused.
    max_file_bytes: int = 256 * MiB
    # PDF pages read; later pages are cut.
    max_pdf_pages: int = 5_000
    # HTML read, in bytes; the rest is cut (markup is several times its text).
    max_markup_bytes: int = 16 * MiB
    # ZIP archives (DOCX, PPTX, XLSX): entries, total uncompressed bytes, and the largest
    # uncompressed/compressed ratio allowed for an entry of more than `ratio_floor_bytes`.
    max_archive_entries: int = 10_000
    max_archive_bytes: int = 512 * MiB
    max_compression_ratio: float = 200.0
    ratio_floor_bytes: int = 1 * MiB


@dataclass
class ParsedPage:
    text: str  # Markdown
    page: int | None  # 1-based PDF page or PPTX slide; None for formats without pages


@dataclass
class ParsedDocument:
    pages: list[ParsedPage]
    truncated: bool = False  # text past ParseLimits.max_chars (or the page limit) was cut
    warnings: list[str] = field(default_factory=list)  # e.g. a PDF page whose text was lost

    @property
    def text(self) -> str:
        return "\n\n".join(page.text for page in self.pages)


class ParseError(HeronError):
    """The document can't be read; the message says why, for the user."""

    status: ClassVar[int] = 422
    slug: ClassVar[str] = "unreadable-document"
    title: ClassVar[str] = "Unreadable document"


def normalize_content_type(content_type: str) -> str:
    """`Text/HTML; charset=utf-8` → `text/html`, with a few common aliases mapped."""
    base = content_type.split(";", 1)[0].strip().lower()
    return _ALIASES.get(base, base)


def parse(
    data: bytes | Path, content_type: str, *, limits: ParseLimits = ParseLimits()
) -> ParsedDocument:
    """Extract a document's text as Markdown; raise `ParseError` saying why it can't be."""
    kind = normalize_content_type(content_type)
    reader = _READERS.get(kind)
    if reader is None and kind.startswith("text/"):
        reader = _read_plain  # source code, logs, reStructuredText...: text all the same
    if reader is None:
        raise ParseError(f"Unsupported file type {kind or '(none)'}.")
    charset = _charset_param(content_type)
    with ExitStack() as stack:
        if isinstance(data, Path):
            try:
                stream: IO[bytes] = stack.enter_context(data.open("rb"))
            except OSError as exc:
                raise ParseError(f"The file can't be opened: {exc.strerror}.") from exc
        else:
            stream = io.BytesIO(data)
        size = stream.seek(0, io.SEEK_END)
        stream.seek(0)
        if size == 0:
            raise ParseError("The file is empty.")
        document = reader(stream, size, charset, limits)
    if not any(page.text.strip() for page in document.pages):
        raise ParseError(_nothing_found(kind))
    return document


def _nothing_found(kind: str) -> str:
    if kind == PDF:
        return "The PDF has no extractable text (a scanned PDF needs OCR, which isn't supported)."
    return "The document contains no text."


# Text ------------------------------------------------------------------------------------------

_BOMS = (
    (codecs.BOM_UTF32_LE, "utf-32-le"),
    (codecs.BOM_UTF32_BE, "utf-32-be"),
    (codecs.BOM_UTF8, "utf-8"),
    (codecs.BOM_UTF16_LE, "utf-16-le"),
    (codecs.BOM_UTF16_BE, "utf-16-be"),
)
_BLOCK = 1 * MiB  # bytes decoded at a time
_SAMPLE = 256 * 1024  # bytes the encoding is guessed from


def _detect_encoding(sample: bytes, declared: str | None) -> tuple[str, int]:
    """The encoding to decode with and the length of the byte-order mark to skip."""
    for bom, encoding in _BOMS:
        if sample.startswith(bom):
            return encoding, len(bom)
    if declared:
        try:
            return codecs.lookup(declared).name, 0
        except LookupError:
            pass  # an unknown charset label: guess as if there were none
    try:
        codecs.getincrementaldecoder("utf-8")().decode(sample, final=False)
    except UnicodeDecodeError:
        pass
    else:
        return "utf-8", 0
    from charset_normalizer import from_bytes

    matches = from_bytes(sample)
    best = matches.best()
    if best is None:
        return "cp1252", 0
    # Short Western European text fits several single-byte code pages equally well; Windows-1252
    # (which browsers also use for "Latin-1") is by far the most common of them.
    tied = {m.encoding for m in matches if m.chaos == best.chaos and m.coherence == best.coherence}
    return ("cp1252" if "cp1252" in tied else best.encoding), 0


def _read_text(
    stream: IO[bytes], charset: str | None, max_chars: int, max_bytes: int | None = None
) -> tuple[str, bool]:
    """Decode at most `max_chars` characters (and `max_bytes` bytes); True if anything was left."""
    sample = stream.read(_SAMPLE)
    encoding, skip = _detect_encoding(sample, charset)
    decoder = codecs.getincrementaldecoder(encoding)(errors="replace")
    parts: list[str] = []
    chars = 0
    read = len(sample)
    block = sample[skip:]
    while True:
        text = decoder.decode(block, final=not block)
        parts.append(text)
        chars += len(text)
        if not block or chars > max_chars or (max_bytes is not None and read >= max_bytes):
            break
        block = stream.read(_BLOCK if max_bytes is None else min(_BLOCK, max_bytes - read))
        read += len(block)
    more = bool(block) and bool(stream.read(1))
    text, cut = _cut("".join(parts).replace("\r\n", "\n"), max_chars)
    return text, cut or more


def _cut(text: str, limit: int) -> tuple[str, bool]:
    """Text within `limit` characters, ending at a line break when one is near; True if cut."""
    if len(text) <= limit:
        return text, False
    at = text.rfind("\n", max(0, limit - 10_000), limit)
    return text[: at if at > 0 else limit], True


def _charset_param(content_type: str) -> str | None:
    match = re.search(r";\s*charset\s*=\s*\"?([\w.:-]+)", content_type, re.IGNORECASE)
    return match.group(1) if match else None


def _single(text: str, truncated: bool) -> ParsedDocument:
    return ParsedDocument(pages=[ParsedPage(text=text.strip(), page=None)], truncated=truncated)


def _read_plain(
    stream: IO[bytes], size: int, charset: str | None, limits: ParseLimits
) -> ParsedDocument:
    return _single(*_read_text(stream, charset, limits.max_chars))


def _read_json(
    stream: IO[bytes], size: int, charset: str | None, limits: ParseLimits
) -> ParsedDocument:
    text, truncated = _read_text(stream, charset, limits.max_chars)
    if not truncated:
        try:
            value = json.loads(text)
        except ValueError:
            pass  # not valid JSON: index it as the text it is
        else:
            # One-line JSON has no line breaks to cut chunks at; indented JSON has.
            text, truncated = _cut(
                json.dumps(value, indent=2, ensure_ascii=False), limits.max_chars
            )
    return _single(text, truncated)


def _read_csv(
    stream: IO[bytes], size: int, charset: str | None, limits: ParseLimits
) -> ParsedDocument:
    text, truncated = _read_text(stream, charset, limits.max_chars)
    lines = text.splitlines()
    if truncated and lines:
        lines.pop()  # the last row may have been cut mid-way
    try:
        dialect: type[csv.Dialect] | csv.Dialect = csv.Sniffer().sniff(text[:65536], ",;\t|")
    except csv.Error:
        dialect = csv.excel
    rows = csv.reader(lines, dialect)
    table, cut = _markdown_table(rows, limits.max_chars)
    return _single(table, truncated or cut)


def _read_html(
    stream: IO[bytes], size: int, charset: str | None, limits: ParseLimits
) -> ParsedDocument:
    from markitdown.converters import HtmlConverter

    html, truncated = _read_text(stream, charset, limits.max_chars, limits.max_markup_bytes)
    try:
        markdown = HtmlConverter().convert_string(html).markdown
    except (ValueError, AssertionError, RecursionError) as exc:
        raise ParseError(f"The HTML can't be read ({type(exc).__name__}).") from exc
    text, cut = _cut(markdown, limits.max_chars)
    return _single(text, truncated or cut)


# Tables (CSV, XLSX) ----------------------------------------------------------------------------


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return " ".join(str(value).split()).replace("|", "\\|")


def _markdown_table(rows: Iterable[Iterable[Any]], max_chars: int) -> tuple[str, bool]:
    """Rows as a Markdown table, the first non-empty row as its header; True if cut."""
    lines: list[str] = []
    chars = 0
    width = 0
    for row in rows:
        cells = [_cell(value) for value in row]
        while cells and not cells[-1]:
            cells.pop()
        if not cells:
            continue
        if not lines:
            width = len(cells)
            header = f"| {' | '.join(cells)} |"
            lines += [header, "|" + " --- |" * width]
            chars += len(header) + 4 + 5 * width
            continue
        cells += [""] * (width - len(cells))
        line = f"| {' | '.join(cells)} |"
        chars += len(line) + 1
        if chars > max_chars:
            return "\n".join(lines), True
        lines.append(line)
    return "\n".join(lines), False


# Office files (ZIP archives) -------------------------------------------------------------------


# Office files saved with a password, and .doc/.xls/.ppt files, are OLE compound files.
_OLE_MAGIC = b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1"


def _check_archive(stream: IO[bytes], size: int, limits: ParseLimits, kind: str) -> None:
    """Refuse a ZIP that would decompress to too much, before any parser opens it.

    Checked on the central directory first (cheap), then by decompressing every entry once into
    nothing: Python's zipfile stops at an entry's declared size and fails its CRC check if the
    data was longer, so a lying directory can't slip a bomb past the first check.
    """
    if size > limits.max_file_bytes:
        raise ParseError(
            f"The {kind} file is {size // MiB} MiB; "
            f"the limit is {limits.max_file_bytes // MiB} MiB."
        )
    if stream.read(8) == _OLE_MAGIC:
        raise ParseError(
            f"The {kind} file is password-protected or in the old binary Office format; "
            f"save it as a {kind} file without a password."
        )
    stream.seek(0)
    try:
        with zipfile.ZipFile(stream) as archive:
            entries = archive.infolist()
            if len(entries) > limits.max_archive_entries:
                raise ParseError(
                    f"The {kind} file holds {len(entries):,} parts; the limit is "
                    f"{limits.max_archive_entries:,} (a decompression bomb?)."
                )
            total = sum(entry.file_size for entry in entries)
            if total > limits.max_archive_bytes:
                raise ParseError(
                    f"The {kind} file would decompress to {total // MiB:,} MiB; the limit is "
                    f"{limits.max_archive_bytes // MiB:,} MiB (a decompression bomb?)."
                )
            for entry in entries:
                ratio = entry.file_size / max(entry.compress_size, 1)
                if (
                    entry.file_size > limits.ratio_floor_bytes
                    and ratio > limits.max_compression_ratio
                ):
                    raise ParseError(
                        f"The {kind} file's part {entry.filename!r} is compressed "
                        f"{ratio:,.0f} to 1; "
                        f"the limit is {limits.max_compression_ratio:,.0f} (a decompression bomb?)."
                    )
            for entry in entries:
                with archive.open(entry) as member:
                    while member.read(_BLOCK):
                        pass
    except (
        zipfile.BadZipFile,
        zipfile.LargeZipFile,
        zlib.error,
        EOFError,
        OSError,
        ValueError,
    ) as exc:
        raise ParseError(f"The {kind} file is damaged or isn't a {kind} file ({exc}).") from exc
    except NotImplementedError as exc:  # an unsupported compression method or encryption
        raise ParseError(f"The {kind} file can't be read: {exc}.") from exc
    finally:
        stream.seek(0)


# Failures of the Office parsers on malformed content (lxml and python-pptx add their own).
_OFFICE_FAILURES: tuple[type[BaseException], ...] = (
    KeyError,  # a part the format requires is missing
    OSError,  # mammoth: "Could not find main document part"
    ValueError,
    IndexError,
    TypeError,
    AttributeError,
    AssertionError,
    UnicodeError,
    RecursionError,
    struct.error,
    zipfile.BadZipFile,
    zlib.error,
    xml.parsers.expat.ExpatError,
)


_DATA_URI_IMAGE = re.compile(r"!\[([^\]\n]*)\]\(data:[^)\s]*\)")


def _markitdown(stream: IO[bytes], converter: Any, kind: str, extension: str) -> str:
    from lxml.etree import LxmlError  # type: ignore[import-untyped]
    from markitdown import StreamInfo

    failures = (*_OFFICE_FAILURES, LxmlError)
    if kind == "PPTX":
        from pptx.exc import PythonPptxError

        failures = (*failures, PythonPptxError)
    try:
        result = converter.convert(stream, StreamInfo(extension=extension))
    except failures as exc:
        raise ParseError(f"The {kind} file is damaged ({type(exc).__name__}: {exc}).") from exc
    markdown: str = result.markdown
    # Embedded images arrive as `![alt](data:image/png;base64...)`: only the alt text says anything.
    return _DATA_URI_IMAGE.sub(lambda m: m.group(1), markdown)


def _read_docx(
    stream: IO[bytes], size: int, charset: str | None, limits: ParseLimits
) -> ParsedDocument:
    from markitdown.converters import DocxConverter

    class TextOnlyDocxConverter(DocxConverter):
        # By default every image is inlined as a base64 data URI, only to be dropped later:
        # 40 MB of pictures cost 400 MB of memory. An empty fragment skips reading them.
        def _image_to_html(self, *args: Any, **kwargs: Any) -> str:
            return "<span></span>"

    _check_archive(stream, size, limits, "DOCX")
    converter = TextOnlyDocxConverter()  # type: ignore[no-untyped-call]
    text, truncated = _cut(_markitdown(stream, converter, "DOCX", ".docx"), limits.max_chars)
    return _single(text, truncated)


_SLIDE = re.compile(r"<!-- Slide number: (\d+) -->\n?")


def _read_pptx(
    stream: IO[bytes], size: int, charset: str | None, limits: ParseLimits
) -> ParsedDocument:
    from markitdown.converters import PptxConverter

    _check_archive(stream, size, limits, "PPTX")
    converter = PptxConverter()  # type: ignore[no-untyped-call]
    markdown = _markitdown(stream, converter, "PPTX", ".pptx")
    # markitdown marks where each slide starts; those marks become page numbers.
    parts = _SLIDE.split(markdown)
    pages = [ParsedPage(text=parts[0].strip(), page=None)] if parts[0].strip() else []
    pages += [
        ParsedPage(text=text.strip(), page=int(number))
        for number, text in zip(parts[1::2], parts[2::2], strict=True)
    ]
    return _limit_pages(pages, limits.max_chars)


def _read_xlsx(
    stream: IO[bytes], size: int, charset: str | None, limits: ParseLimits
) -> ParsedDocument:
    from python_calamine import CalamineError, CalamineWorkbook, PasswordError

    _check_archive(stream, size, limits, "XLSX")
    failures: tuple[type[BaseException], ...] = (CalamineError, *_OFFICE_FAILURES)
    sections: list[str] = []
    budget = limits.max_chars
    truncated = False
    try:
        workbook = CalamineWorkbook.from_filelike(stream)
        for name in workbook.sheet_names:
            sheet = workbook.get_sheet_by_name(name)
            heading = f"## {name}"
            table, truncated = _markdown_table(sheet.iter_rows(), budget - len(heading) - 2)
            if table:
                sections.append(f"{heading}\n\n{table}")
                budget -= len(sections[-1]) + 2
            if truncated or budget <= 0:
                truncated = True
                break
    except PasswordError as exc:
        raise ParseError("The XLSX file is password-protected.") from exc
    except failures as exc:
        raise ParseError(f"The XLSX file is damaged ({type(exc).__name__}: {exc}).") from exc
    return _single("\n\n".join(sections), truncated)


def _limit_pages(pages: list[ParsedPage], max_chars: int) -> ParsedDocument:
    kept: list[ParsedPage] = []
    budget = max_chars
    for page in pages:
        text, cut = _cut(page.text, budget)
        kept.append(ParsedPage(text=text, page=page.page))
        budget -= len(text)
        if cut or budget <= 0:
            return ParsedDocument(pages=kept, truncated=cut or len(kept) < len(pages))
    return ParsedDocument(pages=kept)


# PDF -------------------------------------------------------------------------------------------


def _read_pdf(
    stream: IO[bytes], size: int, charset: str | None, limits: ParseLimits
) -> ParsedDocument:
    from pypdf import PdfReader
    from pypdf.errors import FileNotDecryptedError, PyPdfError

    if size > limits.max_file_bytes:
        raise ParseError(
            f"The PDF is {size // MiB} MiB; the limit is {limits.max_file_bytes // MiB} MiB."
        )
    failures = (PyPdfError, ValueError, KeyError, IndexError, TypeError, AttributeError,
                AssertionError, RecursionError, struct.error, zlib.error, OSError)  # fmt: skip
    try:
        reader = PdfReader(stream)
        if reader.is_encrypted and not reader.decrypt(""):
            raise ParseError("The PDF is encrypted and needs a password.")
        count = len(reader.pages)
    except FileNotDecryptedError as exc:
        raise ParseError("The PDF is encrypted and needs a password.") from exc
    except NotImplementedError as exc:  # e.g. an encryption algorithm pypdf doesn't support
        raise ParseError(f"The PDF can't be opened: {exc}.") from exc
    except failures as exc:
        raise ParseError(f"The PDF is damaged ({type(exc).__name__}: {exc}).") from exc

    pages: list[ParsedPage] = []
    warnings: list[str] = []
    budget = limits.max_chars
    truncated = count > limits.max_pdf_pages
    for number in range(1, min(count, limits.max_pdf_pages) + 1):
        try:
            text = reader.pages[number - 1].extract_text()
        except (*failures, NotImplementedError) as exc:
            warnings.append(f"Page {number}: the text could not be extracted ({exc}).")
            text = ""
        text, cut = _cut(_tidy(text), budget)
        pages.append(ParsedPage(text=text, page=number))
        budget -= len(text)
        if cut or budget <= 0:
            truncated = cut or number < count
            break
    return ParsedDocument(pages=pages, truncated=truncated, warnings=warnings)


def _tidy(text: str) -> str:
    """PDF text without the NULs and trailing spaces extraction leaves behind."""
    text = text.replace("\x00", "")
    return "\n".join(line.rstrip() for line in text.splitlines()).strip()


_READERS = {
    PDF: _read_pdf,
    DOCX: _read_docx,
    PPTX: _read_pptx,
    XLSX: _read_xlsx,
    HTML: _read_html,
    MARKDOWN: _read_plain,
    TEXT: _read_plain,
    CSV: _read_csv,
    JSON: _read_json,
}
