"""Host buffers reused across hops, capped in bytes, handed out again only when unreferenced.

Fresh multi-MiB buffers cost page faults on every hop, and with token counts changing every
hop a pool keyed by exact size never hits. So a request of ``n`` bytes takes the smallest idle
buffer of ``n`` to ``2n`` bytes (any that fits, for internal send buffers), and a new buffer is
allocated at ``n`` rounded up to one of 8 size classes per power of two (at most 12.5% over).
Buffers handed out are tracked; one becomes idle again only when nothing can read it any more
(no view, no storage object, no pending transfer: :func:`pipepack.pp._private.unshared`). Idle
bytes are capped at ``max(min_idle_bytes, cap_factor x the largest request seen)`` (two of the
largest hops for receive buffers, one for send buffers), oldest dropped first. Requests under
``SMALL`` bytes go straight to the allocator.

A buffer of :data:`MAPPED` bytes or more is a private anonymous mapping of its own rather than
a malloc block: a pool trimming buffers of changing sizes left holes in glibc's heap that it
did not give back (a receiver's RSS crept up by hundreds of MiB over a few hundred bursts of
20 MiB hops), while a freed mapping returns its pages at once. Private, so a fork child writing
one never changes the parent's bytes.
"""

from __future__ import annotations

import collections
import mmap
import threading

import torch

from ._private import REUSE_OK, unshared

__all__ = ["BufferPool", "size_class", "SMALL", "MAPPED"]

SMALL = 64 << 10
_MAX_TRACKED = 64
_SCAN = 8  # handed-out buffers checked per request that found nothing idle
MAPPED = 1 << 20  # buffers of this size or more are mappings of their own (see above)


def _alloc(n: int) -> torch.Tensor:
    """A new buffer of ``n`` bytes (64-byte aligned either way)."""
    if n >= MAPPED:
        return torch.frombuffer(mmap.mmap(-1, n, flags=mmap.MAP_PRIVATE), dtype=torch.uint8)
    return torch.empty(n, dtype=torch.uint8)


def size_class(n: int) -> int:
    if n <= SMALL:
        return n
    step = 1 << max((n - 1).bit_length() - 4, 4)
    return -(-n // step) * step


class BufferPool:
    def __init__(
        self, min_idle_bytes: int = 32 << 20, max_ratio: float = 2.0, cap_factor: int = 2
    ) -> None:
        """``max_ratio``: the largest buffer a request may take, in multiples of its size (2 for
        buffers whose views are handed out, so they pin at most twice their bytes; internal
        send buffers may take any that fits). ``cap_factor``: idle bytes are capped at this many
        of the largest request (at least ``min_idle_bytes``)."""
        self._idle: list[torch.Tensor] = []
        self._out: collections.deque[torch.Tensor] = collections.deque()
        self._idle_bytes = 0
        self._largest = 0
        self._min_idle = min_idle_bytes
        self._max_ratio = max_ratio
        self._cap_factor = cap_factor
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    @property
    def cap_bytes(self) -> int:
        return max(self._min_idle, self._cap_factor * self._largest)

    @property
    def idle_bytes(self) -> int:
        return self._idle_bytes

    def get(self, nbytes: int) -> torch.Tensor:
        """A uint8 buffer of at least ``nbytes`` bytes (its own storage, 64-byte aligned)."""
        if nbytes < SMALL or not REUSE_OK:
            return torch.empty(nbytes, dtype=torch.uint8)
        with self._lock:
            self._largest = max(self._largest, nbytes)
            buf = self._take(nbytes)
            if buf is None:
                self._collect(_SCAN)
                buf = self._take(nbytes)
            if buf is None:
                self.misses += 1
            else:
                self.hits += 1
        if buf is None:
            buf = _alloc(size_class(nbytes))
        with self._lock:
            self._out.append(buf)
            if len(self._out) > _MAX_TRACKED:
                self._out.popleft()  # a caller keeps many: let the allocator have that one back
        return buf

    def put(self, buf: torch.Tensor) -> None:
        """Hands a buffer back early (its transfer is done); idle once nothing reads it."""
        if buf.numel() < SMALL or not REUSE_OK:
            return
        with self._lock:
            for i, b in enumerate(self._out):
                if b is buf:
                    del self._out[i]
                    break
            else:
                return  # not ours, or already forgotten
            if unshared(buf):
                self._idle.append(buf)
                self._idle_bytes += buf.numel()
                self._trim_to_cap()
            else:
                self._out.append(buf)

    def _take(self, nbytes: int) -> torch.Tensor | None:
        best = None
        for i, b in enumerate(self._idle):
            n = b.numel()
            if nbytes <= n <= self._max_ratio * nbytes and (
                best is None or n < self._idle[best].numel()
            ):
                best = i
        if best is None:
            return None
        buf = self._idle.pop(best)
        self._idle_bytes -= buf.numel()
        return buf

    def _collect(self, limit: int | None = None) -> None:
        """Moves handed-out buffers nothing reads any more to the idle list (lock held):
        the oldest ``limit`` of them (all when None); busy ones go to the back."""
        n = len(self._out) if limit is None else min(limit, len(self._out))
        for _ in range(n):
            b = self._out.popleft()
            if unshared(b):
                self._idle.append(b)
                self._idle_bytes += b.numel()
            else:
                self._out.append(b)
        self._trim_to_cap()

    def _trim_to_cap(self) -> None:
        cap = self.cap_bytes
        while self._idle_bytes > cap and self._idle:
            self._idle_bytes -= self._idle.pop(0).numel()

    def trim(self) -> None:
        """Drops every idle buffer."""
        with self._lock:
            self._collect()
            self._idle.clear()
            self._idle_bytes = 0
