"""A least-recently-used cache bounded by the bytes its values hold."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class SizedLRU(Generic[K, V]):
    """Values by key, the least recently used dropped first once their sizes (`size(value)`,
    in bytes) add up beyond `max_bytes`. Thread-safe: searches do their work in threads.

    `largest`: a value bigger than this share of `max_bytes` is not kept at all (it would push
    out most others). Without it, the newest value is always kept, whatever its size."""

    def __init__(
        self, max_bytes: int, size: Callable[[V], int], *, largest: float | None = None
    ) -> None:
        self.max_bytes = max_bytes
        self._size = size
        self._largest = largest
        self._entries: OrderedDict[K, tuple[V, int]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, key: K) -> V | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            self._entries.move_to_end(key)
            return entry[0]

    def put(self, key: K, value: V) -> None:
        size = int(self._size(value))
        if self._largest is not None and size > self.max_bytes * self._largest:
            return
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._bytes -= old[1]
            self._entries[key] = (value, size)
            self._bytes += size
            while self._bytes > self.max_bytes and len(self._entries) > 1:
                _, (_, dropped) = self._entries.popitem(last=False)
                self._bytes -= dropped

    def discard(self, matching: Callable[[K], bool]) -> None:
        """Drop every entry whose key `matching` accepts."""
        with self._lock:
            for key in [k for k in self._entries if matching(k)]:
                self._bytes -= self._entries.pop(key)[1]

    @property
    def nbytes(self) -> int:
        return self._bytes
