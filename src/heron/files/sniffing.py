"""What a file is, told from its bytes (never from the name or type a client claims).

A `Sniffer` watches an upload go by and keeps only its first and last bytes: the head carries
the magic numbers and the first lines of a text; the tail of a ZIP carries its central
directory, whose part names tell a .docx from an .xlsx or a .pptx. Magic-number libraries stop
at "zip" and "text"; the knowledge base needs to know which document and which text it holds.
"""

from __future__ import annotations

import codecs
import csv
import json
import re
import struct

HEAD_BYTES = 64 * 1024
TAIL_BYTES = 128 * 1024

OCTET_STREAM = "application/octet-stream"
DOCX = "application/vnd.openxmlformats-officedocument.wordprocessingml.document"
XLSX = "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet"
PPTX = "application/vnd.openxmlformats-officedocument.presentationml.presentation"

_MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"%PDF-", "application/pdf"),
    (b"\x89PNG\r\n\x1a\n", "image/png"),
    (b"\xff\xd8\xff", "image/jpeg"),
    (b"GIF87a", "image/gif"),
    (b"GIF89a", "image/gif"),
    (b"\x1f\x8b", "application/gzip"),
    (b"7z\xbc\xaf\x27\x1c", "application/x-7z-compressed"),
    (b"%!PS", "application/postscript"),
    (b"{\\rtf", "application/rtf"),
)
_OOXML_MAIN_PARTS = {
    "word/document.xml": DOCX,
    "xl/workbook.xml": XLSX,
    "ppt/presentation.xml": PPTX,
}
_OOXML_FOLDERS = {"word/": DOCX, "xl/": XLSX, "ppt/": PPTX}
# Control characters that plain text doesn't use (tab, newlines, form feed and escape it does).
_CONTROLS = re.compile(r"[\x00-\x08\x0b\x0e-\x1a\x1c-\x1f\x7f-\x9f]")


class Sniffer:
    """Feed it every chunk of a stream, then ask `content_type()`. Memory: HEAD + 2 * TAIL."""

    def __init__(self) -> None:
        self.head = bytearray()
        self._tail = bytearray()
        self.size = 0

    def feed(self, chunk: bytes) -> None:
        self.size += len(chunk)
        if len(self.head) < HEAD_BYTES:
            self.head += chunk[: HEAD_BYTES - len(self.head)]
        self._tail += chunk[-TAIL_BYTES:]
        if len(self._tail) > 2 * TAIL_BYTES:
            del self._tail[:-TAIL_BYTES]

    @property
    def tail(self) -> bytes:
        return bytes(self._tail[-TAIL_BYTES:])

    def content_type(self) -> str:
        return sniff(bytes(self.head), self.tail, self.size)


def sniff(head: bytes, tail: bytes, size: int) -> str:
    """The media type of a stream of `size` bytes that starts with `head` and ends with `tail`
    (each possibly the whole stream). Texts get `; charset=utf-8` when they are UTF-8."""
    for magic, media_type in _MAGIC:
        if head.startswith(magic):
            return media_type
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "image/webp"
    if head.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        return _zip_type(head, tail, size)
    complete = size <= len(head)
    text = _decode_utf8(head, complete)
    if text is None:
        return "text/plain" if _looks_like_legacy_text(head) else OCTET_STREAM
    if not text.strip():
        return "text/plain; charset=utf-8"
    return _text_type(text, tail, complete) + "; charset=utf-8"


# ZIP containers ---------------------------------------------------------------------------------


def _zip_type(head: bytes, tail: bytes, size: int) -> str:
    names = _central_directory_names(tail, size) or _local_header_names(head)
    if "[Content_Types].xml" in names:
        for part, media_type in _OOXML_MAIN_PARTS.items():
            if part in names:
                return media_type
        for folder, media_type in _OOXML_FOLDERS.items():
            if any(n.startswith(folder) for n in names):
                return media_type
    declared = _stored_mimetype(head)  # OpenDocument and EPUB: an uncompressed first entry
    if declared is not None:
        return declared
    return "application/zip"


def _central_directory_names(tail: bytes, size: int) -> set[str]:
    end = tail.rfind(b"PK\x05\x06")
    if end < 0 or len(tail) - end < 22:
        return set()
    entries, directory_size, directory_offset = struct.unpack_from("<HII", tail, end + 10)
    tail_start = size - len(tail)
    start = directory_offset - tail_start
    if directory_offset == 0xFFFFFFFF or start < 0 or start + directory_size > len(tail):
        return set()  # ZIP64, or a directory longer than the tail kept
    names: set[str] = set()
    position = start
    for _ in range(entries):
        if tail[position : position + 4] != b"PK\x01\x02" or position + 46 > len(tail):
            break
        name_length, extra_length, comment_length = struct.unpack_from("<HHH", tail, position + 28)
        names.add(tail[position + 46 : position + 46 + name_length].decode("utf-8", "replace"))
        position += 46 + name_length + extra_length + comment_length
    return names


def _local_header_names(head: bytes) -> set[str]:
    names: set[str] = set()
    position = 0
    while head[position : position + 4] == b"PK\x03\x04" and position + 30 <= len(head):
        flags, _, _, _, _, compressed, _, name_length, extra_length = struct.unpack_from(
            "<HHHHIIIHH", head, position + 6
        )
        names.add(head[position + 30 : position + 30 + name_length].decode("utf-8", "replace"))
        if flags & 0x08:  # sizes follow the data: the next header can't be found from here
            break
        position += 30 + name_length + extra_length + compressed
    return names


def _stored_mimetype(head: bytes) -> str | None:
    if len(head) < 30 or head[:4] != b"PK\x03\x04":
        return None
    method, compressed, name_length, extra_length = (
        struct.unpack_from("<H", head, 8)[0],
        struct.unpack_from("<I", head, 18)[0],
        *struct.unpack_from("<HH", head, 26),
    )
    if head[30 : 30 + name_length] != b"mimetype" or method != 0 or compressed > 100:
        return None
    start = 30 + name_length + extra_length
    value = head[start : start + compressed].decode("ascii", "replace")
    if re.fullmatch(r"application/[a-z0-9.+-]+", value):
        return value
    return None


# Texts ------------------------------------------------------------------------------------------


def _decode_utf8(head: bytes, complete: bool) -> str | None:
    """The head as text, or None when it is not UTF-8 text. A character cut at the end of a
    partial head is dropped, not held against the file."""
    decoder = codecs.getincrementaldecoder("utf-8-sig")()
    try:
        text = decoder.decode(head, final=complete)
    except UnicodeDecodeError:
        return None
    controls = len(_CONTROLS.findall(text))
    if "\x00" in text or controls > len(text) // 100:
        return None
    return text


def _looks_like_legacy_text(head: bytes) -> bool:
    """A text in a legacy 8-bit encoding (Latin-1, Windows-1252…): no NUL, almost no control
    bytes, mostly printable ASCII."""
    if not head or b"\x00" in head:
        return False
    controls = sum(1 for b in head if b < 0x20 and b not in (9, 10, 12, 13, 27))
    ascii_printable = sum(1 for b in head if 0x20 <= b < 0x7F or b in (9, 10, 13))
    return controls == 0 and ascii_printable >= 0.7 * len(head)


_HTML_START = re.compile(r"^(<!--.*?-->\s*)*<(!doctype\s+html|html[\s>]|head[\s>]|body[\s>])", re.S)
_HTML_ANYWHERE = re.compile(r"<(html|head|body)[\s>]")
_MARKDOWN_STRONG = re.compile(r"^(#{1,6}\s+\S|```|~~~)", re.M)
_MARKDOWN_SIGNALS = (
    re.compile(r"^\s{0,3}[-*+]\s+\S", re.M),  # bullet list
    re.compile(r"^\s{0,3}\d{1,3}[.)]\s+\S", re.M),  # numbered list
    re.compile(r"\[[^\]\n]+\]\([^)\s]+\)"),  # link
    re.compile(r"^\s{0,3}>\s", re.M),  # quote
    re.compile(r"(\*\*|__)\S[^\n]*?\S\1"),  # bold
    re.compile(r"^\|.*\|\s*$\n^\|?\s*:?-{3,}", re.M),  # table
    re.compile(r"^(=+|-+)\s*$", re.M),  # setext heading underline
)


def _text_type(text: str, tail: bytes, complete: bool) -> str:
    start = text.lstrip()
    lowered = start[:2048].lower()
    if _HTML_START.match(lowered) or (lowered.startswith("<") and _HTML_ANYWHERE.search(lowered)):
        return "text/html"
    if start.startswith("<?xml"):
        return "application/xml"
    if start[:1] in ("{", "[") and _is_json(text, tail, complete):
        return "application/json"
    lines = text.splitlines()
    if not complete:
        lines = lines[:-1]  # the last line may be cut
    delimiter = _csv_delimiter(lines[:100])
    if delimiter is not None:
        return "text/tab-separated-values" if delimiter == "\t" else "text/csv"
    if _MARKDOWN_STRONG.search(text) or sum(bool(p.search(text)) for p in _MARKDOWN_SIGNALS) >= 2:
        return "text/markdown"
    return "text/plain"


def _is_json(text: str, tail: bytes, complete: bool) -> bool:
    if complete:
        try:
            json.loads(text)
        except ValueError:
            return False
        return True
    # Too large to parse here: an object or array that is closed at the end.
    closing = tail.rstrip()[-1:]
    return closing == {"{": b"}", "[": b"]"}[text.lstrip()[0]]


def _csv_delimiter(lines: list[str]) -> str | None:
    """The delimiter when every line has the same number (at least 2) of fields with it."""
    rows = [line for line in lines if line.strip()]
    if len(rows) < 2:
        return None
    for delimiter in (",", ";", "\t"):
        if not all(delimiter in row for row in rows):
            continue
        try:
            widths = {len(fields) for fields in csv.reader(rows, delimiter=delimiter)}
        except csv.Error:
            continue
        if len(widths) == 1 and widths.pop() >= 2:
            return delimiter
    return None
