"""Host buffers reused across hops, capped in bytes, handed out again only when unreferenced.

Fresh multi-MiB buffers cost page faults on every hop, and with token counts changing every
hop a pool keyed by exact size never hits. So a request of ``n`` bytes takes the smallest idle
buffer of ``n`` to ``2n`` bytes, and a new buffer is allocated at ``n`` rounded up to one of 8
size classes per power of two (at most 12.5% over). Buffers handed out are tracked; one
becomes idle again only when nothing can read it any more (no view, no storage object, no
pending transfer: :func:`pipepack.pp._private.unshared`). Idle bytes are capped at
``max(min_idle_bytes, 2 x the largest request seen)`` (two of the largest hops), oldest dropped
first. Requests under ``SMALL`` bytes go straight to the allocator, which serves them well.
"""

from __future__ import annotations

import threading

import torch

from ._private import REUSE_OK, unshared

__all__ = ["BufferPool", "size_class", "SMALL"]

SMALL = 64 << 10
_MAX_TRACKED = 64


def size_class(n: int) -> int:
    if n <= SMALL:
        return n
    step = 1 << max((n - 1).bit_length() - 4, 4)
    return -(-n // step) * step


class BufferPool:
    def __init__(self, min_idle_bytes: int = 32 << 20) -> None:
        self._idle: list[torch.Tensor] = []
        self._out: list[torch.Tensor] = []
        self._idle_bytes = 0
        self._largest = 0
        self._min_idle = min_idle_bytes
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    @property
    def cap_bytes(self) -> int:
        return max(self._min_idle, 2 * self._largest)

    @property
    def idle_bytes(self) -> int:
        return self._idle_bytes

    def get(self, nbytes: int) -> torch.Tensor:
        """A uint8 buffer of at least ``nbytes`` bytes (its own storage, 64-byte aligned)."""
        if nbytes < SMALL or not REUSE_OK:
            return torch.empty(nbytes, dtype=torch.uint8)
        with self._lock:
            self._largest = max(self._largest, nbytes)
            self._collect()
            best = None
            for i, b in enumerate(self._idle):
                n = b.numel()
                if nbytes <= n <= 2 * nbytes and (best is None or n < self._idle[best].numel()):
                    best = i
            if best is not None:
                buf = self._idle.pop(best)
                self._idle_bytes -= buf.numel()
                self.hits += 1
            else:
                buf = None
                self.misses += 1
        if buf is None:
            buf = torch.empty(size_class(nbytes), dtype=torch.uint8)
        with self._lock:
            self._out.append(buf)
            if len(self._out) > _MAX_TRACKED:
                self._out.pop(0)  # a caller keeps many: let the allocator have that one back
        return buf

    def _collect(self) -> None:
        """Moves every handed-out buffer nothing reads any more to the idle list (lock held)."""
        still = []
        for b in self._out:
            if unshared(b):
                self._idle.append(b)
                self._idle_bytes += b.numel()
            else:
                still.append(b)
        self._out = still
        cap = self.cap_bytes
        while self._idle_bytes > cap and self._idle:
            self._idle_bytes -= self._idle.pop(0).numel()

    def trim(self) -> None:
        """Drops every idle buffer."""
        with self._lock:
            self._collect()
            self._idle.clear()
            self._idle_bytes = 0
