"""Posting and completing transfers: torch.distributed point-to-point, one small module.

Everything above speaks in uint8 buffers, global ranks and :class:`Handle`. gloo matches
messages by (peer, tag), so a link keeps three streams apart: hellos, heads and data. NCCL
ignores tags; its messages to one peer are matched in the order posted, which the link keeps.

Completion: a gloo send completes only once the peer posted the receive, and gloo reports it
only once somebody waits on it, so a per-process *reaper* thread waits on every posted send and
holds its buffers until then; :func:`flush` waits for all of them and raises a failure, and an
``atexit`` hook flushes at a normal interpreter exit (bounded; a ``fork`` child that ends with
``os._exit`` skips it). A wait with a finite timeout never passes the timeout to gloo (gloo
closes the connection when a wait times out): a helper thread does the blocking wait and the
caller waits for it, so a :class:`TimeoutError` leaves the transfer intact for a later wait.
"""

from __future__ import annotations

import atexit
import collections
import os
import sys
import threading
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

__all__ = [
    "Handle",
    "isend",
    "irecv",
    "all_gather_into",
    "is_gloo",
    "flush",
    "REAPER",
    "copy_bytes",
    "HELLO_TAG",
    "HEAD_TAG",
    "DATA_TAG",
]

HELLO_TAG = 0x5052
HEAD_TAG = 0x5053
DATA_TAG = 0x5054

_GLOO: weakref.WeakKeyDictionary[Any, bool] = weakref.WeakKeyDictionary()


def is_gloo(group: dist.ProcessGroup) -> bool:
    # torch's backend lookup costs ~20 us a call: kept per group, weakly (holding a group past
    # destroy_process_group would tear it down at interpreter exit)
    g = _GLOO.get(group)
    if g is None:
        g = _GLOO[group] = str(dist.get_backend(group)).lower() == "gloo"
    return g


def group_rank(group: dist.ProcessGroup, global_rank: int) -> int:
    return dist.get_group_rank(group, global_rank)


def isend(
    buf: torch.Tensor,
    peer: int,
    group: dist.ProcessGroup,
    tag: int,
    what: str,
    group_peer: int | None = None,
) -> Any:
    """Posts a send to global rank ``peer``; ``group_peer`` (its rank in ``group``) lets the
    call go straight to the process group (torch's isend wrapper costs ~25 us a message)."""
    try:
        if group_peer is not None:
            return group.send([buf], group_peer, tag if is_gloo(group) else 0)
        return dist.isend(buf, peer, group=group, tag=tag if is_gloo(group) else 0)
    except RuntimeError as e:
        raise RuntimeError(f"{what} could not be posted: {e}") from e


def irecv(
    buf: torch.Tensor,
    peer: int,
    group: dist.ProcessGroup,
    tag: int,
    what: str,
    group_peer: int | None = None,
) -> Any:
    try:
        if group_peer is not None:
            return group.recv([buf], group_peer, tag if is_gloo(group) else 0)
        return dist.irecv(buf, peer, group=group, tag=tag if is_gloo(group) else 0)
    except RuntimeError as e:
        raise RuntimeError(f"{what} could not be posted: {e}") from e


def all_gather_into(out: torch.Tensor, inp: torch.Tensor, group: dist.ProcessGroup) -> None:
    """One all-gather: ``out`` is ``[world, inp.numel()]``, row ``r`` gets rank ``r``'s ``inp``."""
    dist.all_gather_into_tensor(out.view(-1), inp, group=group)


def copy_bytes(dst: torch.Tensor, src: torch.Tensor) -> None:
    """Copies between contiguous uint8 CPU tensors on this thread alone.

    torch's copy runs on its intra-op pool above 32 K elements; with two ranks per two cores and
    torch's default thread count the pool's spinning workers starve gloo's I/O threads (a 1 MiB
    hop: ~4 ms instead of ~0.6 ms), so host copies on the transfer path stay single-threaded.
    """
    if dst.numel():
        np.copyto(dst.numpy(), src.numpy())


class Handle:
    """One posted transfer (possibly several messages).

    ``wait(timeout=None)`` blocks until the bytes have moved (gloo) or orders the current CUDA
    stream after them (NCCL), and raises ``RuntimeError`` naming the peer and the step if the
    transfer failed. With a timeout (or the channel's), a ``TimeoutError`` naming peer and step
    leaves the transfer posted, and a later ``wait()`` still completes it. The buffers the
    transfer reads or writes stay alive until it is done.
    """

    __slots__ = (
        "_works",
        "_keep",
        "what",
        "_timeout",
        "_done",
        "_error",
        "_lock",
        "_on_done",
        "_event",
    )

    def __init__(
        self,
        works: Sequence[Any],
        keep: Sequence[Any] = (),
        *,
        what: str,
        timeout: float | None = None,
        on_done: Callable[[Handle], None] | None = None,
    ) -> None:
        self._works = list(works)
        self._keep = list(keep)
        self.what = what
        self._timeout = timeout
        self._done = False
        self._error: BaseException | None = None
        self._lock = threading.Lock()  # held by the one thread that waits on the works
        self._on_done = on_done
        self._event: threading.Event | None = None  # made only for a wait with a timeout
        if not self._works:
            self._finish(None)

    def _finish(self, error: BaseException | None) -> None:
        self._error = error
        self._works = []  # the backend's work objects hold their process group
        self._keep = []
        self._done = True
        with _EVENT_LOCK:
            ev = self._event
        if ev is not None:
            ev.set()
        cb, self._on_done = self._on_done, None
        if cb is not None:
            cb(self)

    def _wait_works(self) -> None:
        with self._lock:
            if self._done:
                return
            err = None
            try:
                for w in self._works:
                    w.wait()
            except BaseException as e:  # noqa: BLE001 - kept and re-raised with context
                err = e
            self._finish(err)

    def wait(self, timeout: float | None = None) -> None:
        t = self._timeout if timeout is None else timeout
        if not self._done:
            if t is None:
                self._wait_works()
            else:
                with _EVENT_LOCK:
                    ev = self._event
                    start = ev is None
                    if start:
                        ev = self._event = threading.Event()
                if start:  # a helper thread waits on the works (never gloo with a timeout)
                    threading.Thread(
                        target=self._wait_works, name="pipepack-wait", daemon=True
                    ).start()
                if self._done:
                    ev.set()
                if not ev.wait(t):
                    raise TimeoutError(
                        f"{self.what} did not complete within {t} s (still "
                        "posted: a later wait() can complete it)"
                    )
        if self._error is not None:
            raise RuntimeError(f"{self.what} failed: {self._error}") from self._error

    def is_completed(self) -> bool:
        """True once the transfer is known to have completed (False while unknown, and after a
        failure)."""
        return self._done and self._error is None

    @property
    def error(self) -> BaseException | None:
        return self._error

    @property
    def done(self) -> bool:
        return self._done


_EVENT_LOCK = threading.Lock()


class _Reaper:
    """Waits on posted sends in the background so callers never have to (one daemon thread)."""

    def __init__(self) -> None:
        self._queue: collections.deque[Handle] = collections.deque()
        self._cv = threading.Condition()
        self._pending = 0
        self._failures: list[Handle] = []
        self._thread: threading.Thread | None = None
        self._pid = os.getpid()

    def add(self, handle: Handle) -> None:
        with self._cv:
            if self._thread is None or not self._thread.is_alive() or self._pid != os.getpid():
                self._pid = os.getpid()  # a forked child inherits no thread
                self._queue.clear()
                self._pending = 0
                self._thread = threading.Thread(
                    target=self._run, name="pipepack-send-reaper", daemon=True
                )
                self._thread.start()
            self._pending += 1
            self._queue.append(handle)
            self._cv.notify_all()

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._queue:
                    self._cv.wait()
                handle = self._queue.popleft()
            try:
                handle.wait(None)
            except BaseException:  # noqa: BLE001 - recorded below, raised by flush / next send
                pass
            with self._cv:
                if handle.error is not None:
                    self._failures.append(handle)
                self._pending -= 1
                self._cv.notify_all()
            del handle  # hold nothing while idle

    def pending(self) -> int:
        with self._cv:
            return self._pending

    def flush(self, timeout: float | None = None) -> None:
        with self._cv:
            if not self._cv.wait_for(lambda: self._pending == 0, timeout):
                raise TimeoutError(
                    f"{self._pending} pipepack send(s) still pending after {timeout} s"
                )
            failures, self._failures = self._failures, []
        if failures:
            h = failures[0]
            more = f" (and {len(failures) - 1} more)" if len(failures) > 1 else ""
            raise RuntimeError(f"{h.what} failed{more}: {h.error}") from h.error

    def drain(self, timeout: float | None = None) -> bool:
        """Waits for pending sends without raising their failures; False on timeout."""
        with self._cv:
            return self._cv.wait_for(lambda: self._pending == 0, timeout)


REAPER = _Reaper()


_FLUSH_HOOKS: list[Callable[[float | None], None]] = []


def add_flush_hook(fn: Callable[[float | None], None]) -> None:
    """``fn(timeout)`` runs at every :func:`flush` after the pending sends completed (the
    same-host transport waits there until the peer holds every hop it published)."""
    _FLUSH_HOOKS.append(fn)


def flush(timeout: float | None = None) -> None:
    """Waits for every pending send of this process; raises the first one that failed.

    ``TimeoutError`` when sends are still pending after ``timeout`` seconds.
    """
    REAPER.flush(timeout)
    for fn in _FLUSH_HOOKS:
        fn(timeout)


EXIT_FLUSH_TIMEOUT = float(os.environ.get("PIPEPACK_EXIT_FLUSH_TIMEOUT", "60"))


_EXIT_FLUSHED = [False]


def _flush_at_exit() -> None:
    """Once per exit (the same-host transport calls it before closing its rings)."""
    if _EXIT_FLUSHED[0] or REAPER.pending() == 0 or REAPER._pid != os.getpid():
        return
    _EXIT_FLUSHED[0] = True
    try:
        REAPER.flush(EXIT_FLUSH_TIMEOUT)
    except BaseException as e:  # noqa: BLE001 - exit goes on; say what was lost
        print(f"pipepack: at exit, pending sends did not all complete: {e}", file=sys.stderr)


atexit.register(_flush_at_exit)
