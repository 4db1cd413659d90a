"""`heron run` and `heron chat`: run an agent from a script, or talk with it in a terminal.

Both talk to a running server through the API, like `heron agents`. A run is started with
`stream: true` and its server-sent events are shown as they arrive: the answer's text, tool calls
and their results. When the stream breaks, it is picked up again from
`GET /api/runs/{id}/events` with `Last-Event-ID`, so nothing is shown twice.
"""

from __future__ import annotations

import json
import shlex
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, suppress
from typing import TYPE_CHECKING, Annotated, Any, NamedTuple, NoReturn, TextIO

import typer

from heron.providers.cli import KeyOption, UrlOption, api, find, one_line

if TYPE_CHECKING:
    import httpx

    from heron.client import HeronClient

# Exit statuses of `heron run`, from the run's end.
EXIT_FAILED = 1
EXIT_REQUIRES_ACTION = 3
EXIT_CANCELLED = 130  # as a shell reports a command stopped by Ctrl-C (128 + SIGINT)

# A run's stream ends with one of these: the run ended, or it waits for approvals.
END_EVENTS = frozenset({"run.completed", "run.failed", "run.cancelled", "approval.required"})
ACTIVE = ("queued", "running", "requires_action")
FINAL = ("completed", "failed", "cancelled")

# Reconnecting a broken event stream: attempts in a row without receiving an event, and the
# longest wait between two of them (the waits double from a quarter of a second).
RECONNECT_ATTEMPTS = 10
RECONNECT_MAX_WAIT = 5.0

RESULT_WIDTH = 200  # characters of a tool's result shown on its line

ThreadOption = Annotated[
    str | None,
    typer.Option("--thread", help="Continue this thread (an id) instead of starting one."),
]
VarOption = Annotated[
    list[str] | None,
    typer.Option(
        "--var", metavar="NAME=VALUE", help="A value for the instructions' {{NAME}} (repeatable)."
    ),
]
VersionOption = Annotated[
    str | None,
    typer.Option(
        "--version", help="The agent version to run: a number or `draft` (default: the latest)."
    ),
]


# Server-sent events ----------------------------------------------------------------------------


class ServerSentEvent(NamedTuple):
    event: str
    data: str
    id: str | None


def parse_sse(lines: Iterable[str]) -> Iterator[ServerSentEvent]:
    """The events of a `text/event-stream`, from its lines (as the HTML standard parses them).

    `data` lines are joined with newlines; comments (`: keep-alive`), `retry` and unknown fields
    are ignored; an event is dispatched at the blank line that ends it, so one cut off by the end
    of the stream is dropped; the last `id` seen carries over to later events.
    """
    last_id: str | None = None
    kind = ""
    data: list[str] = []
    for line in lines:
        if not line:
            if data:
                yield ServerSentEvent(kind or "message", "\n".join(data), last_id)
            kind, data = "", []
            continue
        if line.startswith(":"):
            continue
        name, colon, value = line.partition(":")
        if colon and value.startswith(" "):
            value = value[1:]
        if name == "data":
            data.append(value)
        elif name == "event":
            kind = value
        elif name == "id" and "\0" not in value:
            last_id = value


class Event(NamedTuple):
    """One of a run's events (docs/api.md, "Threads and runs")."""

    id: int
    type: str
    data: dict[str, Any]


def _event(sse: ServerSentEvent) -> Event:
    from heron.client import ApiError

    try:
        data = json.loads(sse.data)
        event_id = int(sse.id or "")
    except ValueError:
        raise ApiError(
            "the server's event stream is not Heron's; check HERON_URL or --url"
        ) from None
    return Event(event_id, sse.event, data if isinstance(data, dict) else {"value": data})


class _Transient(Exception):
    """An answer worth asking again for (the server restarting, a proxy in between, 429)."""


@contextmanager
def _open_stream(
    client: HeronClient, method: str, path: str, options: dict[str, Any]
) -> Iterator[httpx.Response]:
    from heron.client import ApiError, _describe

    # HeronClient has no streaming call of its own yet: its HTTP client does the request.
    with client._http.stream(method, path, **options) as response:
        if response.is_error:
            response.read()
            message = _describe(response)
            if response.status_code == 429 or response.status_code >= 500:
                raise _Transient(message)
            raise ApiError(message)
        yield response


class RunEvents:
    """A run's events, each exactly once, across broken connections.

    `start` starts a run and yields its events until it ends or pauses for approval; `follow`
    yields the events after the last one seen, until the run ends or pauses again (after a
    `resume`). The run's id is known once the server answered the start.
    """

    def __init__(
        self, client: HeronClient, note: Callable[[str], None], run_id: str | None = None
    ) -> None:
        self.client = client
        self.run_id = run_id
        self.last_id = 0
        self._note = note  # tells the user about a broken connection

    def start(self, thread_id: str, body: dict[str, Any]) -> Iterator[Event]:
        return self._events(
            "POST", f"/api/threads/{thread_id}/runs", {"json": {**body, "stream": True}}
        )

    def follow(self) -> Iterator[Event]:
        return self._events(*self._resume_request())

    def _resume_request(self) -> tuple[str, str, dict[str, Any]]:
        headers = {"Last-Event-ID": str(self.last_id)} if self.last_id else {}
        return "GET", f"/api/runs/{self.run_id}/events", {"headers": headers}

    def _events(self, method: str, path: str, options: dict[str, Any]) -> Iterator[Event]:
        import httpx

        from heron.client import ApiError

        failures = 0
        while True:
            try:
                with _open_stream(self.client, method, path, options) as response:
                    if self.run_id is None:
                        self.run_id = response.headers.get("location", "").rpartition("/")[2]
                        if not self.run_id:
                            raise ApiError("the server did not say which run it started")
                    for sse in parse_sse(response.iter_lines()):
                        event = _event(sse)
                        if event.id <= self.last_id:
                            continue  # seen before the connection broke
                        self.last_id = event.id
                        failures = 0
                        yield event
                        if event.type in END_EVENTS:
                            return
                problem = "the event stream ended before the run did"
            except httpx.TransportError as exc:
                problem = one_line(str(exc)) or type(exc).__name__
                if self.run_id is None:  # no answer to the start: nothing to reconnect to
                    if isinstance(exc, httpx.ConnectError):
                        raise ApiError(
                            f"cannot reach Heron at {self.client.url}: {problem}"
                        ) from None
                    raise ApiError(
                        f"the connection to Heron at {self.client.url} broke before it answered: "
                        f"{problem}"
                    ) from None
            except _Transient as exc:
                if self.run_id is None:
                    raise ApiError(str(exc)) from None
                problem = str(exc)
            failures += 1
            if failures > RECONNECT_ATTEMPTS:
                raise ApiError(
                    f"lost the events of run {self.run_id} ({problem}); the run may go on: "
                    f"GET /api/runs/{self.run_id}"
                )
            if failures == 1:
                self._note(f"({problem}; reconnecting to run {self.run_id})")
            time.sleep(min(0.25 * 2 ** (failures - 1), RECONNECT_MAX_WAIT))
            method, path, options = self._resume_request()


# Showing a run ---------------------------------------------------------------------------------


def _json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


def _short(value: Any) -> str:
    text = one_line(value if isinstance(value, str) else _json(value))
    return text if len(text) <= RESULT_WIDTH else text[: RESULT_WIDTH - 1] + "…"


def describe_call(name: str, arguments: Any) -> str:
    return f"{name} {_json(arguments)}"


class Printer:
    """Shows a run's events as they arrive: the answer's text on `text` (None: not shown), each
    model message's text ending with a newline, and tool calls on `notes`, one line each:
    `⚙ calculator {"expression": "6*7"} → 42`."""

    def __init__(self, text: TextIO | None, notes: TextIO, prefix: str = "") -> None:
        self.text = text
        self.notes = notes
        self.prefix = prefix  # before each message's text (`support> ` in `heron chat`)
        self._in_text = False  # the current message's text is being written
        self._line_start = True  # the last character written to `text` ended a line
        self._message_text = False  # the current model message has text
        self._open_call: str | None = None  # a tool call shown without its result yet
        self._calls: dict[str, str] = {}

    def show(self, events: Iterable[Event]) -> Event:
        """Show the events; return the last one (which ends the stream)."""
        last: Event | None = None
        for event in events:
            self.event(event)
            last = event
        assert last is not None, "a run's stream ends with an event that says how"
        return last

    def event(self, event: Event) -> None:
        data = event.data
        if event.type == "run.started" and data.get("resumed_after_interruption"):
            self._end_text()
            self.note(
                "(Heron stopped while running this; the run continues from its last completed "
                "step, so the answer may repeat some text shown above)"
            )
        elif event.type == "step.started":
            self._message_text = False
        elif event.type == "message.delta":
            self._write(str(data.get("text", "")))
        elif event.type == "message.completed":
            self._end_text()
        elif event.type == "tool_call.started":
            self.close()
            call_id = str(data.get("id"))
            self._calls[call_id] = describe_call(str(data.get("name")), data.get("arguments"))
            self.notes.write(f"⚙ {self._calls[call_id]}")
            self.notes.flush()
            self._open_call = call_id
        elif event.type == "tool_call.completed":
            self._tool_result(data)
        elif event.type == "approval.required":
            # Calls waiting for a human don't start; remember them for when they do (or are
            # denied, which reports only a result).
            for call in data.get("pending") or []:
                call_id = str(call.get("tool_call_id"))
                self._calls[call_id] = describe_call(str(call.get("name")), call.get("arguments"))
        elif event.type == "run.completed":
            self.close()
            output = data.get("output")
            if not self._message_text and output is not None:
                # A structured answer (an output schema) comes whole, not as text deltas.
                self._write(output if isinstance(output, str) else _json(output))
        if event.type in END_EVENTS:
            self.close()

    def _tool_result(self, data: dict[str, Any]) -> None:
        call_id = str(data.get("id"))
        if "error" in data:
            outcome = f"error: {_short(data['error'])}"
        else:
            outcome = _short(data.get("result"))
        if self._open_call == call_id:
            self.notes.write(f" → {outcome}\n")
            self._open_call = None
        else:  # other calls were shown since this one started (or it started out of sight)
            self.close()
            call = self._calls.get(call_id, str(data.get("name")))
            self.notes.write(f"⚙ {call} → {outcome}\n")
        self.notes.flush()

    def _write(self, text: str) -> None:
        if self.text is None or not text:
            return
        self._close_call()
        if not self._in_text:
            self.text.write(self.prefix)
            self._in_text = True
        self.text.write(text)
        self.text.flush()
        self._line_start = text.endswith("\n")
        self._message_text = True

    def _end_text(self) -> None:
        if self.text is not None and self._in_text and not self._line_start:
            self.text.write("\n")
            self.text.flush()
            self._line_start = True
        self._in_text = False

    def _close_call(self) -> None:
        if self._open_call is not None:
            self.notes.write("\n")
            self.notes.flush()
            self._open_call = None

    def close(self) -> None:
        """End any line left open, before something else is written."""
        self._end_text()
        self._close_call()

    def note(self, line: str) -> None:
        """A line on `notes`; the answer's text is left as it is when it goes elsewhere."""
        if self.notes is self.text:
            self._end_text()
        self._close_call()
        self.notes.write(line + "\n")
        self.notes.flush()


# Shared by both commands -----------------------------------------------------------------------


def _run_body(agent: str, variables: list[str] | None, version: str | None) -> dict[str, Any]:
    """The run's body without its input, checked before anything is sent."""
    from heron.cli import fail

    body: dict[str, Any] = {"agent": agent}
    values: dict[str, str] = {}
    for item in variables or []:
        name, equals, value = item.partition("=")
        if not equals or not name:
            fail(f"--var takes NAME=VALUE, not {item!r}", 2)
        values[name] = value
    if values:
        body["variables"] = values
    if version is not None:
        if version == "draft":
            body["version"] = version
        elif version.isdigit() and int(version) >= 1:
            body["version"] = int(version)
        else:
            fail(f"--version must be a version number (1, 2, …) or `draft`, not {version!r}", 2)
    return body


def _error_line(message: str) -> None:
    sys.stdout.flush()
    typer.echo(f"error: {one_line(message)}", err=True)


def _cancel(client: HeronClient, run_id: str) -> dict[str, Any] | None:
    """Ask Heron to cancel the run; its state after the request, or None if that failed."""
    from heron.client import ApiError

    try:
        return dict(client.json("POST", f"/api/runs/{run_id}/cancel"))
    except ApiError as exc:
        _error_line(f"could not cancel run {run_id}: {exc}")
        return None


def _cancel_active(client: HeronClient, thread_id: str) -> list[str]:
    """Cancel the thread's active runs (when interrupted before the server said which run it
    started); their ids."""
    from heron.client import ApiError

    try:
        runs = client.paginate(f"/api/threads/{thread_id}/runs")
    except ApiError as exc:
        _error_line(f"could not find the run to cancel: {exc}")
        return []
    active = [run["id"] for run in runs if run["status"] in ACTIVE]
    return [run_id for run_id in active if _cancel(client, run_id) is not None]


def _stop_run(client: HeronClient, events: RunEvents, own_thread: str | None) -> str:
    """Cancel the run being followed and wait until it has stopped, so that the thread takes a
    new run; what happened, as a few words. When the server hadn't said which run it started,
    the active runs of `own_thread` (a thread this command made) are cancelled instead."""
    from heron.client import ApiError

    if events.run_id is None:
        if own_thread is None:
            return "Heron had not yet said which run it started; nothing was cancelled"
        cancelled = _cancel_active(client, own_thread)
        return f"cancelled run {', '.join(cancelled)}" if cancelled else "no run to cancel"
    run = _cancel(client, events.run_id)
    try:
        while run is not None and run["status"] not in FINAL:
            if run["status"] != "requires_action":
                for _ in events.follow():  # quietly, until it ends (or pauses, meanwhile)
                    pass
                run = dict(client.json("GET", f"/api/runs/{events.run_id}"))
            if run["status"] == "requires_action":  # paused: cancelled at once
                run = _cancel(client, events.run_id)
    except ApiError as exc:
        return f"could not follow run {events.run_id} to its end: {one_line(str(exc))}"
    if run is None:
        return f"run {events.run_id} may still be running"
    status = str(run["status"])
    return f"run {events.run_id} " + ("cancelled" if status == "cancelled" else f"had {status}")


def _pending_lines(pending: list[dict[str, Any]]) -> list[str]:
    return [
        f"  {describe_call(call['name'], call.get('arguments'))}  (call {call['tool_call_id']})"
        for call in pending
    ]


def _chat_command(agent: str, thread_id: str) -> str:
    return f"heron chat {shlex.quote(agent)} --thread {thread_id}"


# heron run -------------------------------------------------------------------------------------


def run(
    agent: Annotated[str, typer.Argument(help="The agent's name or id.")],
    message: Annotated[str, typer.Argument(help="The user's message.")],
    thread: ThreadOption = None,
    var: VarOption = None,
    version: VersionOption = None,
    json_output: Annotated[
        bool,
        typer.Option("--json", help="Print the run, as JSON, when it ends (instead of its text)."),
    ] = False,
    url: UrlOption = None,
    key: KeyOption = None,
) -> None:
    """Run an agent once and print its answer as it streams (for scripts).

    The answer's text goes to standard output, each message ending with a newline; tool calls
    go to standard error as they happen. The exit status says how the run ended: 0 completed,
    1 failed (with `error: CODE: MESSAGE`), 3 waiting for approval of tool calls (listed, with
    how to decide), 130 cancelled (Ctrl-C cancels the run).
    """
    from heron.client import ApiError

    body = _run_body(agent, var, version) | {"input": message}
    with api(url, key) as client:
        printer = Printer(None if json_output else sys.stdout, sys.stderr)
        events = RunEvents(client, printer.note)
        thread_id, created = thread, False
        try:
            if thread_id is None:
                thread_id = str(client.json("POST", "/api/threads", json={})["id"])
                created = True
            try:
                end = printer.show(events.start(thread_id, body))
            except ApiError:
                if created and events.run_id is None:  # refused: leave no empty thread behind
                    with suppress(ApiError):
                        client.request("DELETE", f"/api/threads/{thread_id}")
                raise
            final = client.json("GET", f"/api/runs/{events.run_id}") if json_output else None
        except KeyboardInterrupt:
            printer.close()
            _interrupted(client, events, thread_id if created else None)
    if final is not None:
        typer.echo(json.dumps(final, indent=2, ensure_ascii=False))
    _exit_as(end, agent, thread_id)


def _interrupted(client: HeronClient, events: RunEvents, own_thread: str | None) -> NoReturn:
    """Ctrl-C: cancel the run, wait until it has stopped, say so, exit with status 130."""
    try:
        typer.echo(f"interrupted: {_stop_run(client, events, own_thread)}", err=True)
    except KeyboardInterrupt:  # a second Ctrl-C: stop waiting
        typer.echo(f"interrupted: stopped waiting for run {events.run_id} to stop", err=True)
    raise typer.Exit(EXIT_CANCELLED)


def _exit_as(end: Event, agent: str, thread_id: str) -> None:
    from heron.cli import fail

    data = end.data
    run_id = data.get("run_id", "?")
    if end.type == "run.completed":
        return
    if end.type == "run.failed":
        fail(f"{data.get('error_code')}: {one_line(str(data.get('error_message')))}", EXIT_FAILED)
    if end.type == "approval.required":
        lines = [
            f"run {run_id} waits for approval of:",
            *_pending_lines(data.get("pending") or []),
            f"decide in a terminal with: {_chat_command(agent, thread_id)}",
            f"or POST /api/runs/{run_id}/resume with the decisions",
        ]
        typer.echo("\n".join(lines), err=True)
        raise typer.Exit(EXIT_REQUIRES_ACTION)
    typer.echo(f"run {run_id} was cancelled", err=True)
    raise typer.Exit(EXIT_CANCELLED)


# heron chat ------------------------------------------------------------------------------------


class _Leave(Exception):
    """The user left while a decision was asked (end of input)."""


class Chat:
    """One terminal conversation on one thread."""

    def __init__(
        self,
        client: HeronClient,
        agent_name: str,
        thread_id: str,
        body: dict[str, Any],
        interactive: bool,  # standard input is a terminal (otherwise answers are echoed)
    ) -> None:
        self.client = client
        self.agent_name = agent_name
        self.thread_id = thread_id
        self.body = body
        self.interactive = interactive
        self.printer = Printer(sys.stdout, sys.stdout, prefix=f"{agent_name}> ")

    def main(self, attach: bool) -> None:
        self._say(
            f"thread {self.thread_id}; come back to it with: "
            f"{_chat_command(self.agent_name, self.thread_id)}"
        )
        if self.interactive:
            self._say("Ctrl-C stops an answer; Ctrl-D or /exit leaves.")
        try:
            if attach:
                self._attach()
            while True:
                try:
                    line = self._ask("you> ")
                except KeyboardInterrupt:
                    self._say("")
                    continue
                text = line.strip()
                if text in ("/exit", "/quit"):
                    return
                if text:
                    self._turn(text)
        except (EOFError, _Leave):
            self._say("")

    def _say(self, line: str) -> None:
        self.printer.note(line)

    def _ask(self, prompt: str) -> str:
        self.printer.close()
        line = input(prompt)
        if not self.interactive:  # piped: show the answer, so the transcript reads well
            sys.stdout.write(line + "\n")
            sys.stdout.flush()
        return line

    def _attach(self) -> None:
        """With --thread: follow the thread's active runs first (deciding on their approvals)."""
        from heron.client import ApiError

        runs = self.client.paginate(f"/api/threads/{self.thread_id}/runs")
        for run in runs:
            if run["status"] not in ACTIVE:
                continue
            state = (
                "waits for approval"
                if run["status"] == "requires_action"
                else "is " + run["status"]
            )
            self._say(f"(run {run['id']} on this thread {state})")
            events = RunEvents(self.client, self.printer.note, run_id=run["id"])
            try:
                self._converse(events, events.follow())
            except KeyboardInterrupt:
                self._stop(events)
            except ApiError as exc:
                self.printer.close()
                _error_line(str(exc))

    def _turn(self, text: str) -> None:
        from heron.client import ApiError

        events = RunEvents(self.client, self.printer.note)
        try:
            self._converse(events, events.start(self.thread_id, {**self.body, "input": text}))
        except KeyboardInterrupt:
            self._stop(events)
        except ApiError as exc:
            self.printer.close()
            _error_line(str(exc))

    def _converse(self, events: RunEvents, stream: Iterator[Event]) -> None:
        """Show the run until it ends, asking for approvals whenever it pauses for them."""
        while True:
            end = self.printer.show(stream)
            if end.type != "approval.required":
                self._report(end)
                return
            decisions = self._decide(end.data.get("pending") or [], str(events.run_id))
            self.client.json(
                "POST", f"/api/runs/{events.run_id}/resume", json={"decisions": decisions}
            )
            stream = events.follow()

    def _report(self, end: Event) -> None:
        self.printer.close()
        if end.type == "run.failed":
            _error_line(f"{end.data.get('error_code')}: {end.data.get('error_message')}")
        elif end.type == "run.cancelled":
            self._say("(the run was cancelled)")

    def _decide(self, pending: list[dict[str, Any]], run_id: str) -> list[dict[str, Any]]:
        decisions: list[dict[str, Any]] = []
        try:
            for call in pending:
                decisions.append(self._decide_one(call))
        except EOFError:
            self._say("")
            self._say(
                f"run {run_id} waits for approval; decide later with: "
                f"{_chat_command(self.agent_name, self.thread_id)}"
            )
            raise _Leave from None
        return decisions

    def _decide_one(self, call: dict[str, Any]) -> dict[str, Any]:
        call_id = call["tool_call_id"]
        question = f"Allow {describe_call(call['name'], call.get('arguments'))}? [y/N/e(dit)] "
        while True:
            answer = self._ask(question).strip().lower()
            if answer in ("y", "yes"):
                return {"tool_call_id": call_id, "approve": True}
            if answer in ("", "n", "no"):
                reason = self._ask("Reason (optional, told to the model): ").strip()
                return {"tool_call_id": call_id, "approve": False, "reason": reason}
            if answer in ("e", "edit"):
                arguments = self._edit()
                if arguments is not None:
                    return {"tool_call_id": call_id, "approve": True, "arguments": arguments}
                continue
            self._say("Answer y (allow), n (deny) or e (edit the arguments, then allow).")

    def _edit(self) -> dict[str, Any] | None:
        """Arguments typed as a JSON object; None (an empty line) goes back to the question."""
        while True:
            line = self._ask("Arguments as a JSON object (empty: back): ").strip()
            if not line:
                return None
            try:
                arguments = json.loads(line)
            except ValueError as exc:
                self._say(f"Not JSON: {exc}.")
                continue
            if isinstance(arguments, dict):
                return arguments
            self._say('The arguments must be a JSON object, like {"expression": "6*7"}.')

    def _stop(self, events: RunEvents) -> None:
        """Ctrl-C during a run: cancel it and wait until it has stopped (a second Ctrl-C stops
        waiting), so that the next message can start a run on the thread."""
        self.printer.close()
        try:
            self._say(f"(interrupted: {_stop_run(self.client, events, self.thread_id)})")
        except KeyboardInterrupt:
            self._say(f"(stopped waiting; run {events.run_id} may still be running)")


def chat(
    agent: Annotated[str, typer.Argument(help="The agent's name or id.")],
    thread: ThreadOption = None,
    var: VarOption = None,
    version: VersionOption = None,
    url: UrlOption = None,
    key: KeyOption = None,
) -> None:
    """Talk with an agent in the terminal, on one thread.

    Answers stream as they arrive and tool calls show as they happen. A tool call that needs
    approval asks `Allow …? \\[y/N/e(dit)]`: y runs it, n (or Enter) denies it with an optional
    reason for the model, e runs it with arguments you type. Ctrl-C stops an answer (the run is
    cancelled); Ctrl-D or /exit leaves. Reads piped standard input as well as a terminal.
    """
    body = _run_body(agent, var, version)
    interactive = sys.stdin.isatty()
    if interactive:
        with suppress(ImportError):
            import readline  # noqa: F401 (line editing and history for input())
    with api(url, key) as client:
        found = find(client, "/api/agents", "agent", agent, include_archived=True)
        body["agent"] = found["id"]
        if thread is None:
            thread_id = str(client.json("POST", "/api/threads", json={})["id"])
        else:
            thread_id = str(client.json("GET", f"/api/threads/{thread}")["id"])
        Chat(client, found["name"], thread_id, body, interactive).main(attach=thread is not None)
