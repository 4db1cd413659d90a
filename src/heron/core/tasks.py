"""Stopping asyncio tasks for real.

On Python 3.11, `asyncio.wait_for` swallows a cancellation that arrives in the same turn of the
loop as the result it waits for (it returns the result; fixed in 3.12). Libraries call it on hot
paths: redis-py wraps every socket write in it when a socket timeout is set. So one
`task.cancel()` is now and then lost, and the task goes on as if nothing was asked of it. In a
loop of Redis pipeline writes, cancelled at random moments, about 45% of single cancels were
lost this way; a stopping worker then waited for its runs' model streams to end. A
cancellation is therefore repeated until the task has ended.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable
from typing import Any

# How long a cancelled task may go on before it is cancelled again.
RECANCEL_SECONDS = 0.2


def _always(_: asyncio.Task[Any]) -> bool:
    return True


async def cancel_and_wait(
    tasks: Iterable[asyncio.Task[Any]],
    *,
    every: float = RECANCEL_SECONDS,
    still_wanted: Callable[[asyncio.Task[Any]], bool] = _always,
) -> None:
    """Cancel `tasks` and wait until each has ended, cancelling again every `every` seconds a
    task that goes on. `still_wanted(task)` False: the task has taken its cancellation and is
    winding down (recording how it ended, say); it is waited for, not cancelled again."""
    pending = {task for task in tasks if not task.done()}
    for task in pending:
        task.cancel()
    while pending:
        _, pending = await asyncio.wait(pending, timeout=every)
        for task in pending:
            if still_wanted(task):
                task.cancel()
