"""Start-up time of `heron serve`: from launching the process until GET /healthz answers 200.

Measures, over N runs each (interleaved, so a change in machine load hits all of them alike):
- a first start on a fresh, empty HERON_HOME (migrations, bootstrap, secret key generation);
- a warm restart on the home the first start left behind;
- a baseline: a bare `uvicorn` serving a minimal FastAPI app with one /healthz route.

Prints the figures and writes the "## Start-up" section of docs/benchmarks.md (only that
section; the file is created if missing).

    python bench/startup.py [--runs 7] [--no-write]
"""

from __future__ import annotations

import argparse
import datetime as dt
import http.client
import math
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path

from report import DOC, nproc, write_section

ROOT = Path(__file__).resolve().parent.parent
HEADING = "## Start-up"
TARGET_SECONDS = 3.0
READY_TIMEOUT = 60.0
POLL_INTERVAL = 0.01
BIN = Path(sys.executable).parent

BASELINE_APP = textwrap.dedent(
    """\
    from fastapi import FastAPI

    app = FastAPI()


    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}
    """
)


def _script(name: str) -> list[str]:
    """The console script installed next to this Python, or `python -m name`."""
    path = BIN / name
    return [str(path)] if path.exists() else [sys.executable, "-m", name]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def healthy(port: int) -> bool:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
    try:
        conn.request("GET", "/healthz")
        return conn.getresponse().status == 200
    except OSError:
        return False
    finally:
        conn.close()


def time_to_ready(args: list[str], env: dict[str, str], cwd: Path, port: int) -> float:
    """Seconds from spawning `args` until GET /healthz on `port` answers 200; then stop it."""
    log = cwd / "server.log"
    with log.open("ab") as out:
        start = time.perf_counter()
        proc = subprocess.Popen(
            args, stdin=subprocess.DEVNULL, stdout=out, stderr=out, env=env, cwd=cwd
        )
    try:
        while not healthy(port):
            if proc.poll() is not None:
                raise RuntimeError(
                    f"{' '.join(args)} exited with {proc.returncode}:\n{log.read_text()}"
                )
            if time.perf_counter() - start > READY_TIMEOUT:
                raise RuntimeError(f"{' '.join(args)} not ready after {READY_TIMEOUT} s")
            time.sleep(POLL_INTERVAL)
        elapsed = time.perf_counter() - start
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
        return elapsed
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("HERON_")}
    env.update(extra)
    return env


def heron_pair(scratch: Path) -> tuple[float, float]:
    """(first start on a fresh home, warm restart on the same home)."""
    home = Path(tempfile.mkdtemp(prefix="home-", dir=scratch))
    shutil.rmtree(home)  # `heron serve` creates it, as on a new machine
    times = []
    for _ in range(2):
        port = free_port()
        env = clean_env(
            HERON_HOME=str(home), HERON_SERVER_HOST="127.0.0.1", HERON_SERVER_PORT=str(port)
        )
        times.append(time_to_ready([*_script("heron"), "serve"], env, scratch, port))
    shutil.rmtree(home, ignore_errors=True)
    return times[0], times[1]


def baseline(scratch: Path) -> float:
    port = free_port()
    args = [
        *_script("uvicorn"),
        "app:app",
        "--app-dir",
        str(scratch),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--log-level",
        "warning",
    ]
    return time_to_ready(args, clean_env(), scratch, port)


def p90(values: list[float]) -> float:
    """Nearest-rank 90th percentile (with 7 runs: the slowest)."""
    ordered = sorted(values)
    return ordered[math.ceil(0.9 * len(ordered)) - 1]


@dataclass
class Series:
    label: str
    values: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.values)

    @property
    def p90(self) -> float:
        return p90(self.values)


def versions() -> str:
    from importlib.metadata import version

    return ", ".join(f"{name} {version(name)}" for name in ("heron", "fastapi", "uvicorn"))


def render(runs: int, fresh: Series, warm: Series, base: Series, load: float) -> str:
    def row(series: Series) -> str:
        ratio = series.median / base.median
        return (
            f"| {series.label} | {series.median:.2f} s | {series.p90:.2f} s | "
            f"{min(series.values):.2f} s | {ratio:.1f}x |"
        )

    worst = max(fresh.p90, warm.p90)
    verdict = "met" if worst < TARGET_SECONDS else "**not met**"
    return "\n".join(
        [
            HEADING,
            "",
            "Time from launching the process until `GET /healthz` first answers 200 (polled "
            f"every {POLL_INTERVAL * 1000:.0f} ms), embedded mode (SQLite), {runs} runs of each, "
            "interleaved, after one untimed warm-up round. p90 is the nearest-rank 90th "
            "percentile (for fewer than 10 runs: the slowest run). "
            "Regenerate with `python bench/startup.py`.",
            "",
            "| Start | Median | p90 | Fastest | Median vs. baseline |",
            "| --- | ---: | ---: | ---: | ---: |",
            row(fresh),
            row(warm),
            row(base),
            "",
            f"Target: ready in under {TARGET_SECONDS:.0f} s on a 2-core machine — {verdict} "
            f"(slowest p90: {worst:.2f} s).",
            "",
            f"- Machine: `nproc` {nproc()}, {platform.machine()}, {platform.system()} "
            f"{platform.release()}; 1-minute load average at start: {load:.2f}",
            f"- Python {platform.python_version()}; {versions()}",
            f"- Date: {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC",
            "",
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--runs", type=int, default=7, help="runs of each measurement")
    parser.add_argument("--no-write", action="store_true", help="don't update the docs")
    options = parser.parse_args()

    fresh = Series("`heron serve`, fresh HERON_HOME (migrate, bootstrap)")
    warm = Series("`heron serve`, warm restart")
    base = Series("bare `uvicorn` + FastAPI, one `/healthz` route (baseline)")
    load = os.getloadavg()[0]
    scratch = Path(tempfile.mkdtemp(prefix="heron-bench-"))
    try:
        (scratch / "app.py").write_text(BASELINE_APP)
        heron_pair(scratch)  # warm-up: byte-code caches, page cache
        baseline(scratch)
        for i in range(options.runs):
            first, again = heron_pair(scratch)
            fresh.values.append(first)
            warm.values.append(again)
            base.values.append(baseline(scratch))
            print(
                f"run {i + 1}/{options.runs}: fresh {first:.2f} s, warm {again:.2f} s, "
                f"baseline {base.values[-1]:.2f} s",
                file=sys.stderr,
            )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    section = render(options.runs, fresh, warm, base, load)
    print(section)
    if not options.no_write:
        write_section(HEADING, section)
        print(f"updated {DOC.relative_to(ROOT)}", file=sys.stderr)


if __name__ == "__main__":
    main()
