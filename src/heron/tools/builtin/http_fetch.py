"""`http_fetch`: read a web page or text document as Markdown or text.

All network policy (which addresses, ports and redirects are allowed, size cap, timeout) is
`heron.core.netguard`'s; this module decides what is readable and how it is shown to the model:
HTML becomes Markdown without scripts, styles and navigation; text, JSON and XML are returned
as they are; anything else (images, PDFs, archives, binaries) is refused. Long content is
returned a window at a time (`start_index`, `max_length`), like the MCP reference fetch server.
"""

from __future__ import annotations

import asyncio
import codecs
import re
from typing import Annotated, Literal

from pydantic import Field

from heron.core.netguard import MAX_URL_LENGTH, FetchFailed, UrlRefused, open_url
from heron.tools.registry import (
    Tool,
    ToolArguments,
    ToolContext,
    ToolFailure,
    ToolInputError,
    ToolRegistry,
)

Kind = Literal["html", "text"]

ACCEPT = (
    "text/html,application/xhtml+xml,text/markdown;q=0.9,text/plain;q=0.9,"
    "application/json;q=0.9,application/xml;q=0.8,text/*;q=0.8"
)
_TEXT_APPLICATION_TYPES = frozenset(
    {
        "application/json",
        "application/xml",
        "application/javascript",
        "application/x-javascript",
        "application/ecmascript",
        "application/yaml",
        "application/x-yaml",
        "application/toml",
        "application/x-ndjson",
        "application/graphql",
        "application/sql",
    }
)
# Elements that are never the content of a page.
_NOISE = (
    "head",
    "script",
    "style",
    "noscript",
    "template",
    "iframe",
    "object",
    "embed",
    "svg",
    "canvas",
    "nav",
    "aside",
    "footer",
    "form",
    "button",
)


class HttpFetchArgs(ToolArguments):
    url: Annotated[
        str,
        Field(
            max_length=MAX_URL_LENGTH,
            description="The http:// or https:// URL to fetch.",
        ),
    ]
    max_length: Annotated[
        int,
        Field(ge=100, le=100_000, description="The most characters of content to return."),
    ] = 20_000
    start_index: Annotated[
        int,
        Field(
            ge=0,
            description="Character offset to start from: to read on where a previous call on "
            "the same URL was truncated.",
        ),
    ] = 0
    raw: Annotated[
        bool, Field(description="Return HTML as it is instead of converting it to Markdown.")
    ] = False


def content_kind(media_type: str | None) -> Kind | None:
    """How a media type is read: as HTML, as text, or (None) not at all."""
    if media_type is None:
        return None
    if media_type in ("text/html", "application/xhtml+xml"):
        return "html"
    main, _, sub = media_type.partition("/")
    if main == "text" or media_type in _TEXT_APPLICATION_TYPES:
        return "text"
    if main == "application" and sub.endswith(("+json", "+xml")):
        return "text"
    return None


def _sniff(body: bytes) -> Kind | None:
    """The kind of a body served without a Content-Type: text if it has no NUL bytes."""
    head = body[:4096]
    if b"\x00" in head:
        return None
    start = head.lstrip().lower()
    return "html" if start.startswith((b"<!doctype html", b"<html")) else "text"


def _decode(body: bytes, charset: str | None) -> str:
    try:
        encoding = codecs.lookup(charset or "utf-8").name
    except LookupError:
        encoding = "utf-8"
    return body.decode(encoding, errors="replace")


def html_to_markdown(body: bytes, charset: str | None) -> tuple[str | None, str]:
    """The page's title and its content as Markdown (CPU work: run it in a thread)."""
    from bs4 import BeautifulSoup
    from markdownify import MarkdownConverter

    soup = BeautifulSoup(body, "html.parser", from_encoding=charset)
    title = soup.title.get_text(" ", strip=True) if soup.title else None
    for element in soup.find_all(_NOISE):
        element.decompose()
    for element in soup.select('[role="navigation"], [hidden]'):
        element.decompose()
    for image in soup.find_all("img", src=re.compile(r"^\s*data:", re.I)):
        image.replace_with(str(image.get("alt") or ""))  # inline data would only cost tokens
    for link in soup.find_all("a", href=re.compile(r"^\s*javascript:", re.I)):
        link.unwrap()
    converter = MarkdownConverter(
        heading_style="ATX", bullets="-", escape_underscores=False, escape_asterisks=False
    )
    markdown = re.sub(r"\n{3,}", "\n\n", converter.convert_soup(soup)).strip()
    return title or None, markdown


def _size(n: int) -> str:
    for unit, scale in (("MiB", 1024 * 1024), ("KiB", 1024)):
        if n >= scale:
            return f"{n / scale:g} {unit}"
    return f"{n} bytes"


async def http_fetch(ctx: ToolContext, args: HttpFetchArgs) -> str:
    try:
        async with open_url(
            args.url, guard=ctx.network, limits=ctx.fetch_limits, headers={"Accept": ACCEPT}
        ) as fetched:
            if fetched.status_code >= 400:
                phrase = fetched.response.reason_phrase
                raise ToolFailure(f"{fetched.url} answered HTTP {fetched.status_code} {phrase}")
            media_type = fetched.content_type
            kind = content_kind(media_type)
            if kind is None and media_type is not None:
                raise ToolFailure(
                    f"refused: {fetched.url} is {media_type}, not text; http_fetch reads "
                    "HTML, plain text, JSON and XML"
                )
            body = await fetched.read()
    except (UrlRefused, FetchFailed) as exc:
        raise ToolFailure(exc.detail) from exc
    if kind is None:
        kind = _sniff(body)
        if kind is None:
            raise ToolFailure(f"refused: {fetched.url} has no Content-Type and looks binary")

    title = None
    if kind == "html" and not args.raw:
        title, text = await asyncio.to_thread(html_to_markdown, body, fetched.charset)
    else:
        text = _decode(body, fetched.charset)

    if args.start_index and args.start_index >= len(text):
        raise ToolInputError(
            f"start_index {args.start_index} is past the end of the content "
            f"({len(text)} characters)"
        )
    end = args.start_index + args.max_length
    window = text[args.start_index : end]
    lines = [f"URL: {fetched.url}", f"Content-Type: {media_type or 'unknown'}"]
    if title:
        lines.append(f"Title: {title}")
    lines += ["", window if window.strip() else "(no text content)"]
    if end < len(text):
        lines += [
            "",
            f"[Content truncated: {len(text)} characters in all. Call http_fetch again with "
            f"start_index={end} to read on.]",
        ]
    if fetched.truncated:
        cap = _size(ctx.fetch_limits.max_bytes)
        lines += ["", f"[The response is larger than {cap}; only its first {cap} were read.]"]
    return "\n".join(lines)


http_fetch_tool = Tool(
    name="http_fetch",
    description=(
        "Fetch a web page or document by URL (HTTP GET) and return its content: HTML as "
        "Markdown, plain text, JSON and XML as they are. Images, PDFs and other binary files "
        "are refused. Long content comes back in windows: when the answer says it was "
        "truncated, call again with the start_index it gives. Addresses on private networks "
        "are refused unless the workspace allows them."
    ),
    arguments=HttpFetchArgs,
    function=http_fetch,
)


def register_tools(registry: ToolRegistry) -> None:
    registry.register(http_fetch_tool)
