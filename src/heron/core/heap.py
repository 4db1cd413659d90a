"""Keeping the garbage collector's full collections short in a long-running process.

CPython's full (generation 2) collection scans every tracked object. Once a process has done
its first run, almost all of them are for good: the modules of pydantic-ai, the SDKs,
SQLAlchemy, FastAPI, their schemas and caches, some 300,000 objects in `heron serve`. Each full
collection scanned them all again: 150 to 280 ms with the event loop stopped, a few times a
minute under load (in a burst of 200 streaming runs, a sixth of the process' CPU time, and the
stall behind the benchmarks' p99).

`settle(kind)` collects once and moves what is alive into the permanent generation
(`gc.freeze()`), the first time the process has finished a piece of work of that kind, when the
libraries that work needs are loaded (they are imported where used, so not at start-up).
Collections then scan only what came after. What is frozen is never collected: that is only
what survived a full collection after the first piece of work, the libraries and the process'
lasting state.
"""

from __future__ import annotations

import gc
import threading

import structlog

log = structlog.get_logger("heron.heap")

_settled: set[str] = set()
_lock = threading.Lock()


def settle(kind: str) -> bool:
    """Collect and freeze the heap the first time this process finishes work of `kind` (a run,
    an ingestion job). True if it did now."""
    with _lock:
        if kind in _settled:
            return False
        _settled.add(kind)
    collected = gc.collect()
    gc.freeze()
    log.debug("heap_settled", kind=kind, collected=collected, frozen=gc.get_freeze_count())
    return True
