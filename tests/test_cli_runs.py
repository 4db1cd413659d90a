"""`heron run` and `heron chat` as a user runs them: the real command in a subprocess, talking
over HTTP to a Heron server on loopback, whose agent's model is the fake OpenAI server.

`heron chat` is driven through a pipe on its standard input: its prompts work without a
terminal, and echo the answers read, so its standard output reads as a transcript.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

from conftest import Tenant
from fakes.openai_server import FakeOpenAI, Reply, ToolCall
from heron.runs.cli import ServerSentEvent, parse_sse

API_KEY = "sk-test-cli-runs-0123456789"
# Only a guard against a hung subprocess, never an expectation about speed.
HANG_GUARD = 60.0


@pytest.fixture
async def llm() -> AsyncIterator[FakeOpenAI]:
    fake = FakeOpenAI(api_key=API_KEY, models=["small"])
    async with fake.serve() as url:
        urls[fake] = url
        yield fake
        del urls[fake]


urls: dict[FakeOpenAI, str] = {}  # where each fake model server listens


async def make_agent(
    client: httpx.AsyncClient, tenant: Tenant, fake: FakeOpenAI, **spec: Any
) -> dict[str, Any]:
    provider = await client.post(
        "/api/providers",
        json={
            "name": "fake",
            "kind": "openai-compatible",
            "base_url": urls[fake],
            "api_key": API_KEY,
        },
        headers=tenant.headers,
    )
    assert provider.status_code == 201, provider.text
    body = {"name": "helper", "model": "fake:small", "instructions": "Be brief."} | spec
    agent = await client.post("/api/agents", json=body, headers=tenant.headers)
    assert agent.status_code == 201, agent.text
    published = await client.post(
        f"/api/agents/{agent.json()['id']}/publish", headers=tenant.headers
    )
    assert published.status_code == 201, published.text
    return dict(agent.json())


async def threads_of(client: httpx.AsyncClient, tenant: Tenant) -> list[str]:
    page = (await client.get("/api/threads", headers=tenant.headers)).json()
    return [t["id"] for t in page["items"]]


async def runs_of(client: httpx.AsyncClient, tenant: Tenant, thread: str) -> list[dict[str, Any]]:
    page = (await client.get(f"/api/threads/{thread}/runs", headers=tenant.headers)).json()
    return list(page["items"])


async def wait_status(
    client: httpx.AsyncClient, tenant: Tenant, run_id: str, *wanted: str
) -> dict[str, Any]:
    run: dict[str, Any] = {}
    for _ in range(400):
        run = (await client.get(f"/api/runs/{run_id}", headers=tenant.headers)).json()
        if run["status"] in wanted:
            return run
        await asyncio.sleep(0.025)
    raise AssertionError(f"run {run_id} stayed {run['status']}")


def sent_messages(fake: FakeOpenAI, index: int) -> list[dict[str, Any]]:
    return list(fake.chat_requests[index].body["messages"])


def default_sigint() -> None:
    """In the child: Ctrl-C raises KeyboardInterrupt even when the test runner ignores SIGINT
    (an ignored signal stays ignored across exec)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@dataclass
class Process:
    """A running `heron …` whose output is read as it comes."""

    process: asyncio.subprocess.Process
    stdout: bytearray = field(default_factory=bytearray)

    async def read_until(self, marker: str, after: int = 0) -> str:
        """Standard output so far, once it holds `marker` (after position `after`)."""
        assert self.process.stdout is not None
        wanted = marker.encode()
        while self.stdout.find(wanted, after) < 0:
            chunk = await asyncio.wait_for(self.process.stdout.read(4096), HANG_GUARD)
            assert chunk, f"heron ended before printing {marker!r}: {self.stdout.decode()}"
            self.stdout += chunk
        return self.stdout.decode()

    def write(self, text: str) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(text.encode())

    def interrupt(self) -> None:
        self.process.send_signal(signal.SIGINT)

    async def finish(self) -> tuple[int, str, str]:
        if self.process.stdin is not None and not self.process.stdin.is_closing():
            self.process.stdin.close()
        assert self.process.stdout is not None
        assert self.process.stderr is not None
        rest, err = await asyncio.wait_for(
            asyncio.gather(self.process.stdout.read(), self.process.stderr.read()), HANG_GUARD
        )
        code = await self.process.wait()
        return code, (self.stdout + rest).decode(), err.decode()


@dataclass
class Heron:
    """Runs `heron …` as a user would, against one server with one workspace's key."""

    base_url: str
    key: str

    async def start(self, *args: str) -> Process:
        environment = {k: v for k, v in os.environ.items() if not k.startswith("HERON_")}
        environment |= {"HERON_URL": self.base_url, "HERON_API_KEY": self.key}
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "heron",
            *args,
            env=environment,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            preexec_fn=default_sigint,
        )
        return Process(process)

    async def __call__(self, *args: str, stdin: str = "") -> tuple[int, str, str]:
        process = await self.start(*args)
        process.write(stdin)
        return await process.finish()


# The SSE reader --------------------------------------------------------------------------------


def test_sse_reader_follows_the_standard() -> None:
    lines = [
        ": keep-alive",
        "",
        "id: 1",
        "event: message.delta",
        'data: {"text":',
        'data: "hi"}',
        "",
        "retry: 5000",
        "unknown: field",
        "data:no space",
        "",
        "",  # a blank line alone dispatches nothing
        "id: 3",
        "event: message.delta",
        'data: {"text": "cut off"}',  # no blank line: the stream broke, the event is dropped
    ]
    assert list(parse_sse(lines)) == [
        ServerSentEvent("message.delta", '{"text":\n"hi"}', "1"),
        ServerSentEvent("message", "no space", "1"),  # the id carries over
    ]


# heron run -------------------------------------------------------------------------------------


async def test_run_prints_the_streamed_answer_and_continues_a_thread(
    base_url: str, client: httpx.AsyncClient, alice: Tenant, llm: FakeOpenAI
) -> None:
    await make_agent(client, alice, llm)
    heron = Heron(base_url, alice.key)
    llm.push(Reply(text="Hello there, Ada!", chunk_size=3))
    assert await heron("run", "helper", "Hi, I am Ada") == (0, "Hello there, Ada!\n", "")
    assert llm.chat_requests[0].body["stream"] is True
    [thread] = await threads_of(client, alice)

    llm.push(Reply(text="You are Ada.\n"))  # an answer ending with a newline gets no other
    code, out, err = await heron("run", "helper", "Who am I?", "--thread", thread)
    assert (code, out, err) == (0, "You are Ada.\n", "")
    assert [m["content"] for m in sent_messages(llm, 1)] == [
        "Be brief.",
        "Hi, I am Ada",
        "Hello there, Ada!",
        "Who am I?",
    ]
    assert await threads_of(client, alice) == [thread]


async def test_run_shows_tool_calls_on_stderr_as_they_happen(
    base_url: str, client: httpx.AsyncClient, alice: Tenant, llm: FakeOpenAI
) -> None:
    await make_agent(client, alice, llm, tools=["calculator"])
    llm.push(
        Reply(
            text="Let me compute.",
            tool_calls=[ToolCall("calculator", {"expression": "6*7"}, id="call_a")],
        ),
        Reply(tool_calls=[ToolCall("calculator", {"expression": "1/0"}, id="call_b")]),
        Reply(text="It is 42."),
    )
    code, out, err = await Heron(base_url, alice.key)("run", "helper", "6 times 7?")
    assert code == 0, err
    assert out == "Let me compute.\nIt is 42.\n"  # each message's text ends its line
    assert err.splitlines() == [
        '⚙ calculator {"expression": "6*7"} → 42',
        '⚙ calculator {"expression": "1/0"} → error: ' + err.split("→ error: ")[1].rstrip(),
    ]
    tool_results = [m for m in sent_messages(llm, 2) if m["role"] == "tool"]
    assert tool_results[0]["content"] == "42"
    assert tool_results[1]["content"] in err  # the error the model was told is the one shown


async def test_run_of_a_failing_model_exits_1_with_one_error_line(
    base_url: str, client: httpx.AsyncClient, alice: Tenant, llm: FakeOpenAI
) -> None:
    await make_agent(client, alice, llm)
    llm.default = Reply.failure(401, "Incorrect API key provided: sk-***nope.", code="x")
    code, out, err = await Heron(base_url, alice.key)("run", "helper", "hi")
    assert code == 1
    assert out == ""
    assert err.startswith("error: model_unavailable: ")
    assert "Incorrect API key provided: sk-***nope." in err
    assert err.count("\n") == 1
    [thread] = await threads_of(client, alice)
    [run] = await runs_of(client, alice, thread)
    assert run["status"] == "failed"


async def test_run_waiting_for_approval_exits_3_then_chat_decides(
    base_url: str, client: httpx.AsyncClient, alice: Tenant, llm: FakeOpenAI
) -> None:
    await make_agent(client, alice, llm, tools=["calculator"], approval={"calculator": "always"})
    heron = Heron(base_url, alice.key)
    llm.push(Reply(tool_calls=[ToolCall("calculator", {"expression": "6*7"}, id="call_ok")]))
    code, out, err = await heron("run", "helper", "6*7?")
    assert code == 3, err
    assert out == ""
    [thread] = await threads_of(client, alice)
    [run] = await runs_of(client, alice, thread)
    assert run["status"] == "requires_action"
    assert err.splitlines() == [
        f"run {run['id']} waits for approval of:",
        '  calculator {"expression": "6*7"}  (call call_ok)',
        f"decide in a terminal with: heron chat helper --thread {thread}",
        f"or POST /api/runs/{run['id']}/resume with the decisions",
    ]

    # What the message says to do: the chat picks up the paused run and asks.
    llm.push(Reply(text="It is 42."))
    code, out, err = await heron("chat", "helper", "--thread", thread, stdin="y\n/exit\n")
    assert code == 0, err
    assert out.splitlines()[1:] == [
        f"(run {run['id']} on this thread waits for approval)",
        'Allow calculator {"expression": "6*7"}? [y/N/e(dit)] y',
        '⚙ calculator {"expression": "6*7"} → 42',
        "helper> It is 42.",
        "you> /exit",
    ]
    assert (await wait_status(client, alice, run["id"], "completed"))["output"] == "It is 42."


async def test_run_json_prints_the_completed_run(
    base_url: str, client: httpx.AsyncClient, alice: Tenant, llm: FakeOpenAI
) -> None:
    await make_agent(client, alice, llm)
    llm.push(Reply(text="Hello!"))
    code, out, err = await Heron(base_url, alice.key)("run", "helper", "hi", "--json")
    assert (code, err) == (0, "")
    run = json.loads(out)
    assert run["status"] == "completed"
    assert run["output"] == "Hello!"
    assert (run["input_tokens"], run["output_tokens"]) == (11, 7)
    [thread] = await threads_of(client, alice)
    assert run["thread_id"] == thread
    stored = (await client.get(f"/api/runs/{run['id']}", headers=alice.headers)).json()
    assert run == stored


async def test_run_passes_variables_and_the_version(
    base_url: str, client: httpx.AsyncClient, alice: Tenant, llm: FakeOpenAI
) -> None:
    agent = await make_agent(
        client,
        alice,
        llm,
        instructions="You help {{customer}} in {{city}}.",
        variables={"customer": {}, "city": {"default": "Paris"}},
    )
    heron = Heron(base_url, alice.key)
    code, _, err = await heron("run", "helper", "hi", "--var", "customer=Ada = Lovelace")
    assert code == 0, err
    assert sent_messages(llm, 0)[0]["content"] == "You help Ada = Lovelace in Paris."

    changed = await client.patch(
        f"/api/agents/{agent['id']}",
        json={"instructions": "Draft for {{customer}}."},
        headers=alice.headers,
    )
    assert changed.status_code == 200, changed.text
    code, _, err = await heron("run", "helper", "hi", "--var", "customer=Bo", "--version", "draft")
    assert code == 0, err
    assert sent_messages(llm, 1)[0]["content"] == "Draft for Bo."
    code, _, err = await heron(
        "run", "helper", "hi", "--var", "customer=Cy", "--var", "city=Oslo", "--version", "1"
    )
    assert code == 0, err
    assert sent_messages(llm, 2)[0]["content"] == "You help Cy in Oslo."

    # Refused by the server: its reason, and no empty thread left behind.
    before = await threads_of(client, alice)
    code, out, err = await heron("run", "helper", "hi")
    assert (code, out) == (1, "")
    assert err.startswith("error: ")
    assert "customer" in err
    assert err.count("\n") == 1
    assert await threads_of(client, alice) == before
    # Wrong before anything is sent: status 2.
    code, _, err = await heron("run", "helper", "hi", "--var", "customer")
    assert (code, err) == (2, "error: --var takes NAME=VALUE, not 'customer'\n")
    code, _, err = await heron("run", "helper", "hi", "--version", "latest")
    assert code == 2
    assert err == "error: --version must be a version number (1, 2, …) or `draft`, not 'latest'\n"
    assert len(llm.chat_requests) == 3


async def test_run_prints_a_structured_answer_as_json(
    base_url: str, client: httpx.AsyncClient, alice: Tenant, llm: FakeOpenAI
) -> None:
    schema = {
        "type": "object",
        "properties": {"answer": {"type": "integer"}},
        "required": ["answer"],
    }
    await make_agent(client, alice, llm, output_schema=schema)
    llm.push(Reply(tool_calls=[ToolCall("final_result", {"answer": 42})]))
    code, out, err = await Heron(base_url, alice.key)("run", "helper", "6*7?")
    assert (code, err) == (0, "")
    assert json.loads(out) == {"answer": 42}
    assert out.count("\n") == 1


async def test_ctrl_c_cancels_the_run_and_exits_130(
    base_url: str, client: httpx.AsyncClient, alice: Tenant, llm: FakeOpenAI
) -> None:
    await make_agent(client, alice, llm)
    llm.push(Reply(text="word " * 400, chunk_size=5, chunk_delay=0.05))
    process = await Heron(base_url, alice.key).start("run", "helper", "talk")
    await process.read_until("word word")
    process.interrupt()
    code, out, err = await process.finish()
    assert code == 130
    [thread] = await threads_of(client, alice)
    [run] = await runs_of(client, alice, thread)
    assert run["status"] == "cancelled"  # stopped before the command ended
    assert err == f"interrupted: run {run['id']} cancelled\n"
    assert out.startswith("word word")
    assert not llm.chat_requests[0].completed


class DroppingProxy:
    """A TCP proxy to Heron that breaks the first connection on which the server sends an
    event: message.delta` line, right after that line: the event arrives cut off."""

    MARKER = b"event: message.delta\n"

    def __init__(self, port: int) -> None:
        self.port = port
        self.dropped = False
        self.requests = bytearray()  # everything clients sent

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upstream_reader, upstream_writer = await asyncio.open_connection("127.0.0.1", self.port)

        async def pipe(
            source: asyncio.StreamReader,
            sink: asyncio.StreamWriter,
            inspect: Callable[[bytearray, bytes], int | None],
        ) -> None:
            seen = bytearray()
            while data := await source.read(65536):
                cut = inspect(seen, data)
                sink.write(data if cut is None else data[:cut])
                await sink.drain()
                seen += data
                if cut is not None:
                    break

        def upstream(seen: bytearray, data: bytes) -> int | None:
            if self.dropped:
                return None
            found = (seen + data).find(self.MARKER)
            if found < 0:
                return None
            self.dropped = True
            return found + len(self.MARKER) - len(seen)

        def downstream(seen: bytearray, data: bytes) -> None:
            self.requests.extend(data)

        tasks = [
            asyncio.create_task(pipe(reader, upstream_writer, downstream)),
            asyncio.create_task(pipe(upstream_reader, writer, upstream)),
        ]
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for task in tasks:
            task.cancel()
        for w in (writer, upstream_writer):
            w.close()
            with contextlib.suppress(OSError):
                await w.wait_closed()


async def test_a_broken_stream_is_resumed_without_printing_anything_twice(
    base_url: str, client: httpx.AsyncClient, alice: Tenant, llm: FakeOpenAI
) -> None:
    await make_agent(client, alice, llm, tools=["calculator"])
    answer = "abcdefghijklmnopqrstuvwxyz" * 3
    llm.push(
        Reply(tool_calls=[ToolCall("calculator", {"expression": "2+2"}, id="call_x")]),
        Reply(text=answer, chunk_size=2, chunk_delay=0.01),
    )
    proxy = DroppingProxy(int(base_url.rsplit(":", 1)[1]))
    server = await asyncio.start_server(proxy.handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        code, out, err = await Heron(f"http://127.0.0.1:{port}", alice.key)("run", "helper", "abc?")
    finally:
        server.close()
        await server.wait_closed()
    assert proxy.dropped
    assert code == 0, err
    assert out == answer + "\n"
    lines = err.splitlines()
    assert lines[0] == '⚙ calculator {"expression": "2+2"} → 4'
    assert lines[1].startswith("(")
    assert lines[1].endswith("; reconnecting to run " + lines[1].rsplit(" ", 1)[1])
    assert len(lines) == 2
    resumed = [
        line
        for line in proxy.requests.decode().splitlines()
        if line.lower().startswith("last-event-id:")
    ]
    assert len(resumed) == 1
    assert int(resumed[0].split(":")[1]) > 0


# heron chat ------------------------------------------------------------------------------------


async def test_chat_two_turns_on_one_thread(
    base_url: str, client: httpx.AsyncClient, alice: Tenant, llm: FakeOpenAI
) -> None:
    await make_agent(client, alice, llm)
    llm.push(Reply(text="Hello, Ada!", chunk_size=2), Reply(text="You are Ada."))
    code, out, err = await Heron(base_url, alice.key)(
        "chat", "helper", stdin="Hi, I am Ada\n\nWho am I?\n/exit\nnot sent\n"
    )
    assert (code, err) == (0, "")
    [thread] = await threads_of(client, alice)
    assert out.splitlines() == [
        f"thread {thread}; come back to it with: heron chat helper --thread {thread}",
        "you> Hi, I am Ada",
        "helper> Hello, Ada!",
        "you> ",
        "you> Who am I?",
        "helper> You are Ada.",
        "you> /exit",
    ]
    assert [m["content"] for m in sent_messages(llm, 1)] == [
        "Be brief.",
        "Hi, I am Ada",
        "Hello, Ada!",
        "Who am I?",
    ]
    assert len(llm.chat_requests) == 2

    # The end of the input (Ctrl-D) leaves as well; the thread goes on.
    llm.push(Reply(text="Still Ada."))
    code, out, _ = await Heron(base_url, alice.key)(
        "chat", "helper", "--thread", thread, stdin="And now?\n"
    )
    assert code == 0
    assert out.splitlines()[1:] == ["you> And now?", "helper> Still Ada.", "you> "]
    assert sent_messages(llm, 2)[-2:] == [
        {"role": "assistant", "content": "You are Ada."},
        {"role": "user", "content": "And now?"},
    ]


async def test_chat_asks_for_approvals_allow_deny_and_edit(
    base_url: str, client: httpx.AsyncClient, alice: Tenant, llm: FakeOpenAI
) -> None:
    await make_agent(client, alice, llm, tools=["calculator"], approval={"calculator": "always"})
    llm.push(
        Reply(tool_calls=[ToolCall("calculator", {"expression": "6*7"}, id="call_yes")]),
        Reply(text="It is 42."),
        Reply(tool_calls=[ToolCall("calculator", {"expression": "9*9"}, id="call_no")]),
        Reply(text="Fine."),
        Reply(tool_calls=[ToolCall("calculator", {"expression": "1+1"}, id="call_edit")]),
        Reply(text="Edited."),
    )
    stdin = "\n".join(
        [
            "6*7?",
            "y",
            "9*9?",
            "maybe",  # not an answer: asked again
            "n",
            "not today",
            "1+1?",
            "e",
            "[1]",  # not an object: asked again
            '{"expression": "2+40"}',
            "/exit",
        ]
    )
    code, out, err = await Heron(base_url, alice.key)("chat", "helper", stdin=stdin + "\n")
    assert (code, err) == (0, "")
    transcript = out.splitlines()[1:]
    assert transcript == [
        "you> 6*7?",
        'Allow calculator {"expression": "6*7"}? [y/N/e(dit)] y',
        '⚙ calculator {"expression": "6*7"} → 42',
        "helper> It is 42.",
        "you> 9*9?",
        'Allow calculator {"expression": "9*9"}? [y/N/e(dit)] maybe',
        "Answer y (allow), n (deny) or e (edit the arguments, then allow).",
        'Allow calculator {"expression": "9*9"}? [y/N/e(dit)] n',
        "Reason (optional, told to the model): not today",
        '⚙ calculator {"expression": "9*9"} → error: not today',  # the denial, as the model sees it
        "helper> Fine.",
        "you> 1+1?",
        'Allow calculator {"expression": "1+1"}? [y/N/e(dit)] e',
        "Arguments as a JSON object (empty: back): [1]",
        'The arguments must be a JSON object, like {"expression": "6*7"}.',
        'Arguments as a JSON object (empty: back): {"expression": "2+40"}',
        '⚙ calculator {"expression": "2+40"} → 42',  # started with the edited arguments
        "helper> Edited.",
        "you> /exit",
    ]

    def tool_result(index: int, call_id: str) -> str:
        [result] = [m for m in sent_messages(llm, index) if m.get("tool_call_id") == call_id]
        return str(result["content"])

    assert tool_result(1, "call_yes") == "42"
    assert tool_result(3, "call_no") == "not today"
    assert tool_result(5, "call_edit") == "42"
    assert len(llm.chat_requests) == 6


async def test_chat_ctrl_c_cancels_the_run_and_returns_to_the_prompt(
    base_url: str, client: httpx.AsyncClient, alice: Tenant, llm: FakeOpenAI
) -> None:
    await make_agent(client, alice, llm)
    llm.push(Reply(text="word " * 400, chunk_size=5, chunk_delay=0.05), Reply(text="Second."))
    process = await Heron(base_url, alice.key).start("chat", "helper")
    process.write("talk\n")
    await process.read_until("helper> word word")
    process.interrupt()
    transcript = await process.read_until("you> ", after=len(process.stdout))
    [thread] = await threads_of(client, alice)
    [run] = await runs_of(client, alice, thread)
    assert run["status"] == "cancelled"  # stopped before the prompt came back
    assert transcript.endswith(f"\n(interrupted: run {run['id']} cancelled)\nyou> ")
    process.write("again\n")
    await process.read_until("helper> Second.\n")
    process.write("/exit\n")
    code, out, err = await process.finish()
    assert (code, err) == (0, "")
    assert out.endswith("you> again\nhelper> Second.\nyou> /exit\n")
    assert sent_messages(llm, 1)[-1] == {"role": "user", "content": "again"}
