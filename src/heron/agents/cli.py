"""`heron agents …`: keep agents in git and deploy them from CI, through the HTTP API.

An agent is created or changed by importing its YAML (`export` → edit → `import`); publishing
freezes the draft as a numbered version, and a rollback is `restore N` then `publish`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from heron.providers.cli import KeyOption, UrlOption, api, find, one_line, table, when

if TYPE_CHECKING:
    from heron.client import HeronClient

app = typer.Typer(
    help="Import, publish, diff and roll back agents (through the API).", no_args_is_help=True
)

AgentArg = Annotated[str, typer.Argument(help="The agent's name or id.")]


def _find(client: HeronClient, ref: str) -> dict[str, Any]:
    return dict(find(client, "/api/agents", "agent", ref, include_archived=True))


def _version(value: str, what: str, allow_draft: bool = True) -> str:
    """A version reference as the API takes it, checked before anything is sent."""
    from heron.cli import fail

    if allow_draft and value == "draft":
        return value
    if not value.isdigit() or int(value) < 1:
        expected = "a version number (1, 2, …) or `draft`" if allow_draft else "a version number"
        fail(f"{what} must be {expected}, not {value!r}", 2)
    return str(int(value))


def _label(ref: str) -> str:
    return "the draft" if ref == "draft" else f"version {ref}"


def _value(value: Any) -> str:
    """A field's value on one line: JSON, so strings, lists and null are told apart."""
    return json.dumps(value, ensure_ascii=False)


@app.command("list")
def list_agents(url: UrlOption = None, key: KeyOption = None) -> None:
    """List the workspace's agents (not the archived ones)."""
    with api(url, key) as client:
        agents = client.paginate("/api/agents")
    table(
        ["NAME", "VERSION", "MODEL", "ID"],
        [[a["name"], a["latest_version"] or "draft", a["draft"]["model"], a["id"]] for a in agents],
    )


@app.command("show")
def show_agent(agent: AgentArg, url: UrlOption = None, key: KeyOption = None) -> None:
    """Print the draft as YAML, after comment lines about the latest version.

    The output is valid YAML: it can be saved, edited and imported.
    """
    with api(url, key) as client:
        found = _find(client, agent)
        base = f"/api/agents/{found['id']}"
        text = client.request("GET", f"{base}/export", params={"version": "draft"}).text
        latest = found["latest_version"]
        lines = [f"# {found['name']} ({found['id']})"]
        if found["archived_at"]:
            lines.append(f"# archived {when(found['archived_at'])}")
        if latest is None:
            lines.append("# not published yet")
        else:
            version = client.json("GET", f"{base}/versions/{latest}")
            note = f": {one_line(version['note'])}" if version["note"] else ""
            lines.append(
                f"# latest version: {latest}, published {when(version['created_at'])}{note}"
            )
            changes = client.json("GET", f"{base}/versions/{latest}/diff/draft")["changes"]
            fields = ", ".join(c["field"] for c in changes)
            lines.append(
                f"# draft: changed since version {latest} ({fields})"
                if changes
                else f"# draft: same as version {latest}"
            )
    typer.echo("\n".join(lines))
    typer.echo(text, nl=False)


@app.command("export")
def export_agent(
    agent: AgentArg,
    version: Annotated[str, typer.Option(help="A version number or `draft`.")] = "draft",
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Write to this file.")
    ] = None,
    url: UrlOption = None,
    key: KeyOption = None,
) -> None:
    """Print an agent as YAML (or write it to a file)."""
    ref = _version(version, "--version")
    with api(url, key) as client:
        found = _find(client, agent)
        text = client.request(
            "GET", f"/api/agents/{found['id']}/export", params={"version": ref}
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
    """Create agents, or replace their drafts, from YAML files (as exported)."""
    with api(url, key) as client:
        for path in files:
            result = client.json(
                "POST",
                "/api/agents/import",
                content=path.read_bytes(),
                params={"publish": publish, "note": note},
                headers={"Content-Type": "application/yaml"},
            )
            what = (
                "created"
                if result["created"]
                else ("updated" if result["changed"] else "unchanged")
            )
            published = result["published_version"]
            suffix = f", version {published}" if published else ""
            typer.echo(f"{path}: {result['agent']['name']} {what}{suffix}")


@app.command("publish")
def publish_agent(
    agent: AgentArg,
    note: Annotated[str, typer.Option(help="What changed, kept with the version.")] = "",
    url: UrlOption = None,
    key: KeyOption = None,
) -> None:
    """Freeze the draft as the next numbered version."""
    with api(url, key) as client:
        found = _find(client, agent)
        version = client.json("POST", f"/api/agents/{found['id']}/publish", json={"note": note})
    typer.echo(f"published {found['name']} version {version['number']}")


@app.command("versions")
def list_versions(agent: AgentArg, url: UrlOption = None, key: KeyOption = None) -> None:
    """List an agent's published versions."""
    with api(url, key) as client:
        found = _find(client, agent)
        versions = client.paginate(f"/api/agents/{found['id']}/versions")
    if not versions:
        typer.echo(f"{found['name']} has no published version", err=True)
        return
    table(
        ["VERSION", "PUBLISHED", "NOTE"],
        [[v["number"], when(v["created_at"]), one_line(v["note"])] for v in versions],
    )


@app.command("diff")
def diff_versions(
    agent: AgentArg,
    a: Annotated[str, typer.Argument(help="A version number or `draft`.")],
    b: Annotated[str, typer.Argument(help="A version number or `draft`.")],
    url: UrlOption = None,
    key: KeyOption = None,
) -> None:
    """Print what changed from A to B, one `field: old → new` line per field."""
    ref_a, ref_b = _version(a, "A"), _version(b, "B")
    with api(url, key) as client:
        found = _find(client, agent)
        diff = client.json("GET", f"/api/agents/{found['id']}/versions/{ref_a}/diff/{ref_b}")
    if not diff["changes"]:
        typer.echo(f"no changes between {_label(ref_a)} and {_label(ref_b)}")
    for change in diff["changes"]:
        typer.echo(f"{change['field']}: {_value(change['from'])} → {_value(change['to'])}")


@app.command("restore")
def restore_version(
    agent: AgentArg,
    version: Annotated[str, typer.Argument(metavar="N", help="The version to copy.")],
    url: UrlOption = None,
    key: KeyOption = None,
) -> None:
    """Copy version N into the draft (then `publish` to roll back)."""
    number = _version(version, "N", allow_draft=False)
    with api(url, key) as client:
        found = _find(client, agent)
        client.request("POST", f"/api/agents/{found['id']}/versions/{number}/restore")
    import shlex

    typer.echo(
        f"restored version {number} into the draft of {found['name']}; to roll back, "
        f"publish it: heron agents publish {shlex.quote(found['name'])}"
    )


@app.command("archive")
def archive_agent(agent: AgentArg, url: UrlOption = None, key: KeyOption = None) -> None:
    """Hide an agent from lists, keeping it and its versions."""
    with api(url, key) as client:
        found = _find(client, agent)
        client.request("POST", f"/api/agents/{found['id']}/archive")
    typer.echo(f"archived {found['name']}")


@app.command("unarchive")
def unarchive_agent(agent: AgentArg, url: UrlOption = None, key: KeyOption = None) -> None:
    """Bring an archived agent back into lists."""
    with api(url, key) as client:
        found = _find(client, agent)
        client.request("POST", f"/api/agents/{found['id']}/unarchive")
    typer.echo(f"unarchived {found['name']}")


@app.command("delete")
def delete_agent(agent: AgentArg, url: UrlOption = None, key: KeyOption = None) -> None:
    """Delete an agent and all its versions, for good."""
    with api(url, key) as client:
        found = _find(client, agent)
        client.request("DELETE", f"/api/agents/{found['id']}")
    typer.echo(f"deleted {found['name']} ({found['latest_version'] or 0} published versions)")
