"""`heron providers` and `heron agents` as a user runs them: the real command in a subprocess,
talking over HTTP to a Heron server on loopback, which talks to a fake OpenAI server.

The flow of issue 3 end to end: register a provider (its key through standard input), see
`check` tell the truth when the provider is up, down or rejects the key, then import an agent
with tools and fallbacks, publish, change, diff, roll back, export and import it elsewhere.
"""

from __future__ import annotations

import asyncio
import os
import socket
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from conftest import Tenant, key_for
from fakes.openai_server import FakeOpenAI
from heron.agents.spec import AgentSpec
from heron.db.engine import Database
from heron.tenancy.models import Role

API_KEY = "sk-test-secret-0123456789abcd"
WRONG_KEY = "sk-wrong-key-9876543210zyxw"

AGENT_YAML = """\
heron: agent/v1
name: support
description: Answers questions
variables:
  customer: {description: who asks, default: a customer}
instructions: |
  You help {{customer}}.
  Be brief.
model: local:gpt-test
fallbacks: [local:gpt-test-mini]
model_settings: {temperature: 0.2}
tools: [calculator, current_time]
approval: {calculator: always}
max_steps: 5
"""


@dataclass
class Heron:
    """Runs `heron …` as a user would, against one server with one workspace's key."""

    base_url: str
    key: str
    outputs: list[str] = field(default_factory=list)  # everything any command printed

    async def __call__(
        self, *args: str, stdin: str | None = None, env: dict[str, str] | None = None
    ) -> tuple[int, str, str]:
        environment = {k: v for k, v in os.environ.items() if not k.startswith("HERON_")}
        environment |= {"HERON_URL": self.base_url, "HERON_API_KEY": self.key, **(env or {})}
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "heron",
            *args,
            env=environment,
            stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await process.communicate(stdin.encode() if stdin is not None else None)
        self.outputs += [out.decode(), err.decode()]
        assert process.returncode is not None
        return process.returncode, out.decode(), err.decode()

    async def ok(self, *args: str, stdin: str | None = None, **env: str) -> str:
        code, out, err = await self(*args, stdin=stdin, env=env)
        assert code == 0, f"heron {' '.join(args)} exited with {code}: {err}"
        return out

    async def fails(self, *args: str, code: int = 1, stdin: str | None = None) -> str:
        """Run a command that must fail; return its one `error:` line (without the prefix)."""
        status, out, err = await self(*args, stdin=stdin)
        assert status == code, f"heron {' '.join(args)} exited with {status}: {out}{err}"
        assert err.startswith("error: "), err
        assert err.count("\n") == 1, err
        return err.removeprefix("error: ").rstrip("\n")


@pytest.fixture
async def fake() -> AsyncIterator[tuple[FakeOpenAI, str]]:
    server = FakeOpenAI(api_key=API_KEY, models=["gpt-test", "gpt-test-mini"])
    async with server.serve() as url:
        yield server, url


def spec_of(document: str) -> dict[str, Any]:
    """An agent document's name and spec, defaults filled in, to compare two documents."""
    fields = yaml.safe_load(document)
    name = fields.pop("name")
    del fields["heron"]
    return {"name": name, **AgentSpec.model_validate(fields).model_dump()}


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1"  # nothing listens there any more


async def test_providers_add_check_list_models_and_remove(
    base_url: str, alice: Tenant, fake: tuple[FakeOpenAI, str]
) -> None:
    server, fake_url = fake
    heron = Heron(base_url, alice.key)

    out = await heron.ok(
        "providers", "add", "local", "--kind", "openai-compatible", "--base-url", fake_url,
        "--api-key-stdin", "--header", "X-Team: care", "--timeout", "5",
        stdin=API_KEY + "\n",
    )  # fmt: skip
    assert "added local (openai-compatible" in out
    assert "sk-…abcd" in out

    # Up: the check lists the models with the key that came through standard input.
    out = await heron.ok("providers", "check", "local")
    assert out.startswith("ok in ")
    assert out.rstrip().endswith(": 2 models")
    assert server.requests[-1].headers["authorization"] == f"Bearer {API_KEY}"
    assert server.requests[-1].headers["x-team"] == "care"
    out = await heron.ok("providers", "check", "local", "--model", "gpt-test")
    assert "2 models, gpt-test answered" in out
    assert server.chat_requests[-1].model == "gpt-test"
    error = await heron.fails("providers", "check", "local", "--model", "gpt-nope")
    assert error.startswith("unknown_model (")
    assert await heron.ok("providers", "models", "local") == "gpt-test\ngpt-test-mini\n"

    # Down: nothing listens on the port.
    down = await heron.ok(
        "providers", "add", "down", "--kind", "openai-compatible", "--base-url", closed_port_url()
    )
    down_id = down.split()[-1]
    error = await heron.fails("providers", "check", down_id)  # by id as well as by name
    assert error.startswith("unreachable ("), error
    error = await heron.fails("providers", "models", "down")
    assert error.startswith("unreachable: ")
    assert error.endswith("(it never listed its models)")

    # Rejecting the key (given in the environment this time): the provider's own message.
    await heron.ok(
        "providers", "add", "wrong", "--kind", "openai-compatible", "--base-url", fake_url,
        HERON_PROVIDER_API_KEY=WRONG_KEY,
    )  # fmt: skip
    error = await heron.fails("providers", "check", "wrong")
    assert error.startswith("bad_credentials (HTTP 401, "), error
    assert "Incorrect API key provided: sk-***zyxw." in error
    assert server.requests[-1].headers["authorization"] == f"Bearer {WRONG_KEY}"

    listing = (await heron.ok("providers", "list")).splitlines()
    assert listing[0].split() == ["NAME", "KIND", "BASE", "URL", "KEY", "MODELS", "ID"]
    rows = {line.split()[0]: line.split() for line in listing[1:]}
    assert set(rows) == {"local", "down", "wrong"}
    assert rows["local"][1:5] == ["openai-compatible", fake_url, "sk-…abcd", "2"]
    assert rows["down"][3:5] == ["-", "-"]  # no key; never listed its models
    assert rows["down"][5] == down_id

    assert await heron.ok("providers", "remove", "down") == f"removed down ({down_id})\n"
    assert "down" not in await heron.ok("providers", "list")
    assert await heron.fails("providers", "check", "down") == "no provider with id or name 'down'"

    for output in heron.outputs:
        assert API_KEY not in output
        assert WRONG_KEY not in output


async def test_agent_flow_publish_change_diff_roll_back_export_and_import_elsewhere(
    base_url: str, alice: Tenant, bob: Tenant, fake: tuple[FakeOpenAI, str], tmp_path: Path
) -> None:
    _, fake_url = fake
    heron = Heron(base_url, alice.key)
    await heron.ok(
        "providers", "add", "local", "--kind", "openai-compatible", "--base-url", fake_url,
        "--api-key-stdin", stdin=API_KEY,
    )  # fmt: skip
    await heron.ok("providers", "check", "local")  # the models are now known to validate against

    source = tmp_path / "support.yaml"
    source.write_text(AGENT_YAML)
    assert await heron.ok("agents", "import", str(source)) == f"{source}: support created\n"
    shown = await heron.ok("agents", "show", "support")
    assert "# not published yet" in shown
    draft = yaml.safe_load(shown)  # the comment lines keep it valid YAML
    assert draft["tools"] == ["calculator", "current_time"]
    assert draft["fallbacks"] == ["local:gpt-test-mini"]

    assert await heron.ok("agents", "publish", "support", "--note", "first") == (
        "published support version 1\n"
    )

    # Change: edit the file and import it again.
    source.write_text(
        AGENT_YAML.replace("temperature: 0.2", "temperature: 0.7").replace(
            "fallbacks: [local:gpt-test-mini]", "fallbacks: []"
        )
    )
    assert await heron.ok("agents", "import", str(source)) == f"{source}: support updated\n"
    shown = await heron.ok("agents", "show", "support")
    assert "# latest version: 1, published " in shown
    assert ": first\n" in shown
    assert "# draft: changed since version 1 (fallbacks, model_settings.temperature)" in shown
    diff = await heron.ok("agents", "diff", "support", "1", "draft")
    assert diff.splitlines() == [
        'fallbacks: ["local:gpt-test-mini"] → []',
        "model_settings.temperature: 0.2 → 0.7",
    ]
    assert await heron.ok("agents", "publish", "support", "--note", "warmer") == (
        "published support version 2\n"
    )
    assert "# draft: same as version 2" in await heron.ok("agents", "show", "support")

    # Roll back: restore version 1 into the draft, publish it as version 3.
    restored = await heron.ok("agents", "restore", "support", "1")
    assert restored.startswith("restored version 1 into the draft of support")
    assert await heron.ok("agents", "diff", "support", "1", "draft") == (
        "no changes between version 1 and the draft\n"
    )
    assert await heron.ok("agents", "publish", "support", "--note", "roll back") == (
        "published support version 3\n"
    )
    assert await heron.ok("agents", "diff", "support", "1", "3") == (
        "no changes between version 1 and version 3\n"
    )
    assert (await heron.ok("agents", "diff", "support", "2", "3")).splitlines() == [
        'fallbacks: [] → ["local:gpt-test-mini"]',
        "model_settings.temperature: 0.7 → 0.2",
    ]
    versions = (await heron.ok("agents", "versions", "support")).splitlines()
    assert versions[0].split() == ["VERSION", "PUBLISHED", "NOTE"]
    assert [(v.split()[0], v.split(None, 4)[4]) for v in versions[1:]] == [
        ("1", "first"),
        ("2", "warmer"),
        ("3", "roll back"),
    ]

    # Export, and import into Bob's workspace, which has a provider of the same name.
    exported = tmp_path / "exported.yaml"
    await heron.ok("agents", "export", "support", "--version", "3", "-o", str(exported))
    bob_heron = Heron(base_url, bob.key)
    await bob_heron.ok(
        "providers", "add", "local", "--kind", "openai-compatible", "--base-url", fake_url,
        HERON_PROVIDER_API_KEY=API_KEY,
    )  # fmt: skip
    assert await bob_heron.ok("agents", "import", str(exported), "--publish") == (
        f"{exported}: support created, version 1\n"
    )
    assert await bob_heron.ok("agents", "export", "support", "--version", "1") == (
        await heron.ok("agents", "export", "support", "--version", "1")
    )
    assert spec_of(exported.read_text()) == spec_of(AGENT_YAML)  # version 3 is version 1
    assert "support" in await bob_heron.ok("agents", "list")

    # Archive hides it from the list; delete removes it.
    assert await heron.ok("agents", "archive", "support") == "archived support\n"
    assert "support" not in await heron.ok("agents", "list")
    assert "# archived " in await heron.ok("agents", "show", "support")
    assert await heron.ok("agents", "delete", "support") == (
        "deleted support (3 published versions)\n"
    )
    assert await heron.fails("agents", "show", "support") == "no agent with id or name 'support'"
    assert "support" in await bob_heron.ok("agents", "list")  # Bob's copy is his own

    for output in heron.outputs + bob_heron.outputs:
        assert API_KEY not in output


async def test_failures_are_one_error_line_with_status_1_or_2_for_bad_arguments(
    base_url: str, db: Database, alice: Tenant, tmp_path: Path
) -> None:
    heron = Heron(base_url, alice.key)
    for command in ("show", "publish", "versions", "archive", "delete"):
        assert await heron.fails("agents", command, "ghost") == "no agent with id or name 'ghost'"
    assert await heron.fails("agents", "diff", "ghost", "1", "2") == (
        "no agent with id or name 'ghost'"
    )
    for command in ("check", "models", "remove"):
        assert await heron.fails("providers", command, "ghost") == (
            "no provider with id or name 'ghost'"
        )

    # What the server refuses: its Problem Details, on one line.
    await heron.ok(
        "providers", "add", "local", "--kind", "openai-compatible", "--base-url",
        closed_port_url(),
    )  # fmt: skip
    error = await heron.fails("providers", "add", "local", "--kind", "openai-compatible",
                              "--base-url", "http://127.0.0.1:9/v1")  # fmt: skip
    assert "409" in error
    assert "local" in error
    error = await heron.fails("providers", "add", "other", "--kind", "openai-ish")
    assert "422" in error
    assert "kind" in error
    source = tmp_path / "a.yaml"
    source.write_text(AGENT_YAML.replace("model: local:gpt-test", "model: nowhere:gpt-test"))
    error = await heron.fails("agents", "import", str(source))
    assert "422" in error
    assert "nowhere" in error
    source.write_text(AGENT_YAML)
    await heron.ok("agents", "import", str(source))
    error = await heron.fails("agents", "restore", "support", "4")
    assert "404" in error
    viewer = Heron(base_url, await key_for(db, alice, Role.viewer))
    error = await viewer.fails("agents", "publish", "support")
    assert "403" in error
    error = await Heron(base_url, "heron_000000000000_nope").fails("providers", "list")
    assert "401" in error
    closed = closed_port_url().removesuffix("/v1")
    error = await Heron(closed, alice.key).fails("agents", "list")
    assert error.startswith(f"cannot reach Heron at {closed}")

    # Arguments wrong before anything is sent: status 2.
    assert await heron.fails("agents", "diff", "support", "1", "latest", code=2) == (
        "B must be a version number (1, 2, …) or `draft`, not 'latest'"
    )
    assert await heron.fails("agents", "restore", "support", "draft", code=2) == (
        "N must be a version number, not 'draft'"
    )
    assert await heron.fails("agents", "export", "support", "--version", "0", code=2)
    assert await heron.fails(
        "providers", "add", "x", "--kind", "openai", "--header", "no colon", code=2
    ) == ("--header takes 'Name: value', not 'no colon'")
    assert await heron.fails(
        "providers", "add", "x", "--kind", "openai", "--api-key-stdin", stdin="\n", code=2
    ) == ("--api-key-stdin: standard input holds no key")
    assert await heron.fails(
        "providers", "add", "x", "--kind", "openai", "--timeout", "0", code=2
    ) == ("--timeout must be more than 0 and at most 600 seconds")
    assert "x" not in (await heron.ok("providers", "list")).split()
