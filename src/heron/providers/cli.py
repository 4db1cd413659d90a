"""`heron providers …`: connect a workspace to model APIs and check them, through the HTTP API.

Also home to what every command that talks to a running server shares (`api`, the `--url` and
`--key` options, `find`, `table`, `when`, `one_line`), so `heron agents` and the API commands
to come behave alike: results on standard output, any failure as one `error: …` line on
standard error with exit status 1 (2 for arguments that are wrong before anything is sent).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Annotated, Any

import typer

if TYPE_CHECKING:
    from heron.client import HeronClient

app = typer.Typer(
    help="Add, check and remove model provider connections (through the API).",
    no_args_is_help=True,
)

UrlOption = Annotated[str | None, typer.Option("--url", help="Heron's URL (default $HERON_URL).")]
KeyOption = Annotated[
    str | None, typer.Option("--key", help="Heron API key (default $HERON_API_KEY).")
]
ProviderArg = Annotated[str, typer.Argument(help="The provider's name or id.")]

PROVIDER_KEY_ENV = "HERON_PROVIDER_API_KEY"


def one_line(text: str) -> str:
    """Messages from servers and providers may span lines; an `error:` line must not."""
    return " ".join(text.split())


@contextmanager
def api(url: str | None, key: str | None) -> Iterator[HeronClient]:
    """A client of the running server; any failed call inside the block ends the command."""
    import json

    import httpx

    from heron.cli import fail
    from heron.client import ApiError, HeronClient

    try:
        with HeronClient(url, key) as client:
            yield client
    except ApiError as exc:
        fail(one_line(str(exc)))
    except httpx.InvalidURL as exc:
        fail(f"invalid Heron URL: {exc}", 2)
    except json.JSONDecodeError:
        fail("the server did not answer like Heron (not JSON); check HERON_URL or --url")


def when(timestamp: str) -> str:
    """An API timestamp (ISO 8601) as people read it, in UTC to the second."""
    from datetime import UTC, datetime

    moment = datetime.fromisoformat(timestamp).astimezone(UTC)
    return f"{moment:%Y-%m-%d %H:%M:%S} UTC"


def find(client: HeronClient, collection: str, what: str, ref: str, **params: Any) -> Any:
    """The item of `collection` (an API path) whose id or name is `ref`."""
    from heron.cli import fail

    for item in client.paginate(collection, **params):
        if ref in (item["id"], item["name"]):
            return item
    fail(f"no {what} with id or name {ref!r}")


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    """Print aligned columns; the last one is not padded."""
    cells = [[str(c) for c in row] for row in [headers, *rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers) - 1)]
    for row in cells:
        padded = [cell.ljust(width) for cell, width in zip(row, widths, strict=False)]
        typer.echo("  ".join([*padded, row[-1]]).rstrip())


def _headers(values: list[str]) -> dict[str, str]:
    from heron.cli import fail

    headers: dict[str, str] = {}
    for value in values:
        name, colon, header_value = value.partition(":")
        if not colon or not name.strip():
            fail(f"--header takes 'Name: value', not {value!r}", 2)
        headers[name.strip()] = header_value.strip()
    return headers


def _api_key(from_stdin: bool) -> str | None:
    """The provider's key: never a command-line argument, where `ps` and shell history see it."""
    from heron.cli import fail

    if from_stdin:
        key = sys.stdin.readline().strip()
        if not key:
            fail("--api-key-stdin: standard input holds no key", 2)
        return key
    return os.environ.get(PROVIDER_KEY_ENV) or None


@app.command("list")
def list_providers(url: UrlOption = None, key: KeyOption = None) -> None:
    """List the workspace's provider connections (credentials are never shown)."""
    with api(url, key) as client:
        providers = client.paginate("/api/providers")
    table(
        ["NAME", "KIND", "BASE URL", "KEY", "MODELS", "ID"],
        [
            [
                p["name"],
                p["kind"],
                p["base_url"] or "-",
                p["api_key_masked"] or "-",
                "-" if p["models"] is None else len(p["models"]),
                p["id"],
            ]
            for p in providers
        ],
    )


@app.command("add")
def add_provider(
    name: Annotated[
        str,
        typer.Argument(help="Unique in the workspace; agents refer to its models as NAME:model."),
    ],
    kind: Annotated[
        str,
        typer.Option(
            help="openai, anthropic, google, groq, mistral, openrouter or openai-compatible."
        ),
    ],
    base_url: Annotated[
        str | None,
        typer.Option(help="The API's address, e.g. http://localhost:11434/v1 for Ollama."),
    ] = None,
    api_key_stdin: Annotated[
        bool,
        typer.Option(
            "--api-key-stdin",
            help=f"Read the provider's API key from standard input (default ${PROVIDER_KEY_ENV}).",
        ),
    ] = False,
    header: Annotated[
        list[str] | None,
        typer.Option("--header", help="'Name: value' sent with every request (repeatable)."),
    ] = None,
    timeout: Annotated[
        float | None, typer.Option(help="Seconds one request to the provider may take.")
    ] = None,
    url: UrlOption = None,
    key: KeyOption = None,
) -> None:
    """Add a provider connection; its key and headers are stored encrypted."""
    from heron.cli import fail

    body: dict[str, Any] = {"name": name, "kind": kind, "extra_headers": _headers(header or [])}
    if timeout is not None:
        if not 0 < timeout <= 600:
            fail("--timeout must be more than 0 and at most 600 seconds", 2)
        body["timeout_seconds"] = timeout
    if base_url is not None:
        body["base_url"] = base_url
    if (api_key := _api_key(api_key_stdin)) is not None:
        body["api_key"] = api_key
    with api(url, key) as client:
        created = client.json("POST", "/api/providers", json=body)
    where = f" at {created['base_url']}" if created["base_url"] else ""
    secret = f", key {created['api_key_masked']}" if created["api_key_masked"] else ", no key"
    typer.echo(f"added {created['name']} ({created['kind']}{where}{secret}) {created['id']}")


@app.command("check")
def check_provider(
    provider: ProviderArg,
    model: Annotated[str | None, typer.Option(help="Also ask this model for one token.")] = None,
    url: UrlOption = None,
    key: KeyOption = None,
) -> None:
    """Call the provider now; exit status 1 when it doesn't work, with its own reason."""
    from heron.cli import fail

    with api(url, key) as client:
        found = find(client, "/api/providers", "provider", provider)
        result = client.json(
            "POST",
            f"/api/providers/{found['id']}/check",
            json={"model": model} if model else None,
        )
    error = result["error"]
    if result["ok"] and error is None:
        answered = f", {model} answered" if model else ""
        typer.echo(f"ok in {result['latency_ms']} ms: {len(result['models'])} models{answered}")
        return
    status = f"HTTP {error['status']}, " if error and error.get("status") else ""
    code = error["code"] if error else "failed"
    message = one_line(error["message"]) if error else "the check failed"
    fail(f"{code} ({status}{result['latency_ms']} ms): {message}")


@app.command("models")
def list_models(provider: ProviderArg, url: UrlOption = None, key: KeyOption = None) -> None:
    """List the provider's models, asking it now (exit status 1 if it can't be reached)."""
    from heron.cli import fail

    with api(url, key) as client:
        found = find(client, "/api/providers", "provider", provider)
        listing = client.json("GET", f"/api/providers/{found['id']}/models")
    for model in listing["models"]:
        typer.echo(model)
    if listing["live"]:
        if not listing["models"]:
            typer.echo(f"{found['name']} lists no models", err=True)
        return
    error = listing["error"] or {"code": "failed", "message": "the provider did not answer"}
    known = (
        f"the list above is from {when(listing['checked_at'])}"
        if listing["checked_at"]
        else "it never listed its models"
    )
    fail(f"{error['code']}: {one_line(error['message'])} ({known})")


@app.command("remove")
def remove_provider(provider: ProviderArg, url: UrlOption = None, key: KeyOption = None) -> None:
    """Delete a provider connection and its stored credentials."""
    with api(url, key) as client:
        found = find(client, "/api/providers", "provider", provider)
        client.request("DELETE", f"/api/providers/{found['id']}")
    typer.echo(f"removed {found['name']} ({found['id']})")
