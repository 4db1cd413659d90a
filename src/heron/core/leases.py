"""Who holds a lease on a run or a document: a process, named by its host and pid."""

from __future__ import annotations

import os
import socket


def owner_id() -> str:
    """This process, as a lease names its holder."""
    return f"{socket.gethostname()}:{os.getpid()}"


def owner_is_gone(owner: str | None) -> bool:
    """A lease held by a process of this machine that no longer exists (it was killed): its run
    or document is taken over at once instead of when the lease lapses."""
    if not owner or ":" not in owner:
        return False
    host, _, pid = owner.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False
