"""`heron agents …`: keep agents in git and deploy them from CI, through the HTTP API."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

if TYPE_CHECKING:
    from heron.client import HeronClient

app = typer.Typer(help="List, export and import agents (through the API).", no_args_is_help=True)

UrlOption = Annotated[str | None, typer.Option("--url", help="Heron's URL (default $HERON_URL).")]
KeyOption = Annotated[str | None, typer.Option("--key", help="API key (default $HERON_API_KEY).")]


def _client(url: str | None, key: str | None) -> HeronClient:
    from heron.cli import fail
    from heron.client import ApiError, HeronClient

    try:
        return HeronClient(url, key)
    except ApiError as exc:
        fail(str(exc))


def _call(client: HeronClient, method: str, path: str, **kwargs: Any) -> Any:
    from heron.cli import fail
    from heron.client import ApiError

    try:
        return client.request(method, path, **kwargs)
    except ApiError as exc:
        fail(str(exc))


def _find(client: HeronClient, ref: str) -> dict[str, Any]:
    from heron.cli import fail
    from heron.client import ApiError

    try:
        agents = client.paginate("/api/agents", include_archived=True)
    except ApiError as exc:
        fail(str(exc))
    for agent in agents:
        if ref in (agent["id"], agent["name"]):
            return dict(agent)
    fail(f"no agent with id or name {ref!r}")


@app.command("list")
def list_agents(url: UrlOption = None, key: KeyOption = None) -> None:
    """List the workspace's agents."""
    from heron.cli import fail
    from heron.client import ApiError

    with _client(url, key) as client:
        try:
            agents = client.paginate("/api/agents")
        except ApiError as exc:
            fail(str(exc))
    typer.echo(f"{'NAME':24}  {'VERSION':7}  {'MODEL':32}  ID")
    for agent in agents:
        version = agent["latest_version"] or "draft"
        typer.echo(
            f"{agent['name']:24}  {version!s:7}  {agent['draft']['model']:32}  {agent['id']}"
        )


@app.command("export")
def export_agent(
    agent: Annotated[str, typer.Argument(help="The agent's name or id.")],
    version: Annotated[str, typer.Option(help="A version number or `draft`.")] = "draft",
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Write to this file.")
    ] = None,
    url: UrlOption = None,
    key: KeyOption = None,
) -> None:
    """Print an agent as YAML (or write it to a file)."""
    with _client(url, key) as client:
        found = _find(client, agent)
        text = _call(
            client, "GET", f"/api/agents/{found['id']}/export", params={"version": version}
        ).text
    if output:
        output.write_text(text)
        typer.echo(f"wrote {found['name']} to {output}", err=True)
    else:
        typer.echo(text, nl=False)


@app.command("import")
def import_agents(
    files: Annotated[
        list[Path], typer.Argument(help="Agent YAML files.", exists=True, dir_okay=False)
    ],
    publish: Annotated[bool, typer.Option(help="Publish each agent whose draft changed.")] = False,
    note: Annotated[str, typer.Option(help="Note of the published versions.")] = "",
    url: UrlOption = None,
    key: KeyOption = None,
) -> None:
    """Create or update agents from YAML files (as exported)."""
    with _client(url, key) as client:
        for path in files:
            result = _call(
                client,
                "POST",
                "/api/agents/import",
                content=path.read_bytes(),
                params={"publish": publish, "note": note},
                headers={"Content-Type": "application/yaml"},
            ).json()
            what = (
                "created"
                if result["created"]
                else ("updated" if result["changed"] else "unchanged")
            )
            published = result["published_version"]
            suffix = f", version {published}" if published else ""
            typer.echo(f"{path}: {result['agent']['name']} {what}{suffix}")
