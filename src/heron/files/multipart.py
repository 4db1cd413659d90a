"""Reading the one file of a multipart/form-data request as its bytes arrive.

Starlette's form parser spools every file to a temporary file before the handler runs; this one
feeds the raw request body to python-multipart's streaming parser and hands the file's bytes
on as they are parsed, so an upload is never held whole in memory or on local disk.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Literal

from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request

from heron.core.errors import BadRequest, UnsupportedMediaType

if TYPE_CHECKING:
    from python_multipart.multipart import MultipartCallbacks

# Form fields other than the file are ignored, up to this much.
MAX_OTHER_BYTES = 64 * 1024

Event = tuple[Literal["part", "data", "end", "done"], object]


class UploadIncomplete(BadRequest):
    slug, title = "upload-incomplete", "Upload incomplete"


class MultipartUpload:
    """`await open()` reads up to the file part and returns its file name; `chunks()` then
    yields its bytes and ends only once the whole form has arrived well-formed (it raises
    otherwise, so a truncated upload is never taken for a complete one)."""

    def __init__(self, request: Request, field: str = "file") -> None:
        media_type, options = parse_options_header(request.headers.get("content-type", ""))
        if media_type != b"multipart/form-data":
            raise UnsupportedMediaType(
                f"Send the file as multipart/form-data with a `{field}` part."
            )
        boundary = options.get(b"boundary")
        if not boundary:
            raise BadRequest("The multipart/form-data content type has no boundary.")
        self.request = request
        self.field = field
        self.body_done = False
        self._pending: list[Event] = []
        self._header_field = bytearray()
        self._header_value = bytearray()
        self._headers: dict[str, bytes] = {}
        callbacks: MultipartCallbacks = {
            "on_part_begin": self._on_part_begin,
            "on_header_field": lambda data, start, end: self._header_field.extend(data[start:end]),
            "on_header_value": lambda data, start, end: self._header_value.extend(data[start:end]),
            "on_header_end": self._on_header_end,
            "on_headers_finished": lambda: self._pending.append(("part", dict(self._headers))),
            "on_part_data": lambda data, start, end: self._pending.append(
                ("data", data[start:end])
            ),
            "on_part_end": lambda: self._pending.append(("end", None)),
            "on_end": lambda: self._pending.append(("done", None)),
        }
        try:
            self._parser = MultipartParser(boundary, callbacks)
        except FormParserError as exc:
            raise BadRequest(f"The multipart boundary is not valid: {exc}") from None
        self._events = self._parse()

    def _on_part_begin(self) -> None:
        self._headers = {}

    def _on_header_end(self) -> None:
        self._headers[self._header_field.decode("latin-1").lower()] = bytes(self._header_value)
        self._header_field.clear()
        self._header_value.clear()

    async def _body(self) -> AsyncIterator[bytes]:
        while not self.body_done:
            message = await self.request.receive()
            if message["type"] == "http.disconnect":
                self.body_done = True
                raise UploadIncomplete("The client closed the connection during the upload.")
            self.body_done = not message.get("more_body", False)
            body: bytes = message.get("body", b"")
            if body:
                yield body

    async def _parse(self) -> AsyncIterator[Event]:
        async for body in self._body():
            try:
                self._parser.write(body)
            except FormParserError as exc:
                raise BadRequest(f"The multipart/form-data body is malformed: {exc}") from None
            pending, self._pending = self._pending, []
            for event in pending:
                yield event

    def _file_name(self, headers: object) -> str | None:
        """The file name when `headers` open this form's file part."""
        assert isinstance(headers, dict)
        _, options = parse_options_header(headers.get("content-disposition", b""))
        if options.get(b"name", b"").decode("latin-1") != self.field:
            return None
        raw = options.get(b"filename")
        if raw is None:
            raise BadRequest(f"The `{self.field}` part must be a file (it has no filename).")
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return raw.decode("latin-1")

    async def open(self) -> str:
        other = 0
        async for kind, value in self._events:
            if kind == "part":
                name = self._file_name(value)
                if name is not None:
                    return name
            elif kind == "data":
                assert isinstance(value, bytes)
                other += len(value)
                if other > MAX_OTHER_BYTES:
                    raise BadRequest(
                        f"The form's other fields exceed {MAX_OTHER_BYTES} bytes; send only "
                        f"the `{self.field}` part."
                    )
        raise BadRequest(f"The form has no `{self.field}` part.")

    async def chunks(self) -> AsyncIterator[bytes]:
        async for kind, value in self._events:
            if kind == "end":
                break
            if kind == "data":
                assert isinstance(value, bytes)
                yield value
        else:
            raise UploadIncomplete("The upload ended in the middle of the file.")
        done = False
        async for kind, value in self._events:
            if kind == "part" and self._file_name(value) is not None:
                raise BadRequest(f"Send one `{self.field}` per request.")
            done = done or kind == "done"
        if not done:
            raise UploadIncomplete("The upload ended before the form's closing boundary.")

    async def drain(self, max_bytes: int) -> None:
        """Read and drop what is left of the body (up to `max_bytes`), so that a client that
        sends its whole body before reading the answer gets to read the error."""
        drained = 0
        while not self.body_done and drained <= max_bytes:
            try:
                message = await self.request.receive()
            except StarletteHTTPException:  # past the route's size limit: stop reading
                return
            if message["type"] == "http.disconnect":
                return
            drained += len(message.get("body", b""))
            self.body_done = not message.get("more_body", False)
