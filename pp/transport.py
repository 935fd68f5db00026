"""The one piece that moves bytes between ranks: torch.distributed point-to-point today.

Everything above it (wire format, channel, functional API) speaks in uint8 buffers, peers given
as global ranks, and :class:`Handle`. A same-host transport (shared memory, CUDA IPC) replaces
this module's four functions without touching the rest.
"""

from __future__ import annotations

import datetime
import queue
import threading
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["Handle", "isend", "irecv", "all_gather_into", "backend_of", "HEADER_TAG",
           "PAYLOAD_TAG"]

# gloo matches messages by (peer, tag): headers and payloads never take each other's receive.
HEADER_TAG = 0x5050
PAYLOAD_TAG = 0x5051


def backend_of(group: dist.ProcessGroup | None) -> str:
    return str(dist.get_backend(group)).lower()


_GLOO: weakref.WeakKeyDictionary[Any, bool] = weakref.WeakKeyDictionary()


def _tag(group: dist.ProcessGroup | None, tag: int) -> int:
    # NCCL ignores tags; gloo uses them to keep header and payload streams apart. Asking
    # torch for the backend costs ~20 us a call here, so the answer is kept per group, weakly:
    # holding a group alive past destroy_process_group would tear it down at interpreter exit
    key = dist.group.WORLD if group is None else group
    gloo = _GLOO.get(key)
    if gloo is None:
        gloo = _GLOO[key] = backend_of(group) == "gloo"
    return tag if gloo else 0


def isend(buf: torch.Tensor, peer: int, group: dist.ProcessGroup | None, tag: int, *,
          what: str = "") -> Any:
    """Posts a send of ``buf`` to global rank ``peer``; returns the backend's work object.

    ``what`` names the step in the error when posting itself fails (a peer already gone).
    """
    try:
        return dist.isend(buf, peer, group=group, tag=_tag(group, tag))
    except RuntimeError as e:
        raise RuntimeError(f"{what or f'send to rank {peer}'} could not be posted: {e}") from e


def irecv(buf: torch.Tensor, peer: int, group: dist.ProcessGroup | None, tag: int, *,
          what: str = "") -> Any:
    """Posts a receive into ``buf`` (its exact size) from global rank ``peer``."""
    try:
        return dist.irecv(buf, peer, group=group, tag=_tag(group, tag))
    except RuntimeError as e:
        raise RuntimeError(f"{what or f'receive from rank {peer}'} could not be posted: {e}") \
            from e


def all_gather_into(out: torch.Tensor, inp: torch.Tensor, group: dist.ProcessGroup) -> None:
    """One all-gather: ``out`` is ``[world, inp.numel()]``, row ``r`` gets rank ``r``'s ``inp``."""
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(out.view(-1), inp, group=group)


class Handle:
    """One posted transfer (possibly several messages).

    ``wait()`` blocks until the bytes have moved (gloo) or orders the current CUDA stream after
    them (NCCL), like ``torch.distributed.Work.wait``; it raises if the transfer failed, naming
    the peer and the step. Buffers the transfer reads or writes are kept alive by the handle.
    """

    def __init__(self, works: Sequence[Any], keep: Sequence[Any] = (), *, what: str = "",
                 timeout: float | None = None) -> None:
        self._works = list(works)
        self._keep = list(keep)
        self._what = what
        self._timeout = timeout
        self._done = threading.Event()
        self._error: BaseException | None = None
        self._lock = threading.Lock()

    def wait(self, timeout: float | None = None) -> None:
        timeout = self._timeout if timeout is None else timeout
        if not self._done.is_set():
            # one thread waits on the works (the reaper or the caller); another caller waits
            # for it, still bounded by its own timeout
            if not self._lock.acquire(timeout=-1 if timeout is None else timeout):
                raise TimeoutError(f"{self._what} did not complete within {timeout} s")
            try:
                if not self._done.is_set():
                    try:
                        for w in self._works:
                            if timeout is None:
                                w.wait()
                            else:
                                w.wait(datetime.timedelta(seconds=timeout))
                    except BaseException as e:  # noqa: BLE001 - re-raised with context below
                        self._error = e
                    self._done.set()
                    # the backend's work objects hold their process group: let them go now
                    self._works = []
            finally:
                self._lock.release()
        if self._error is not None:
            raise RuntimeError(f"{self._what} failed: {self._error}") from self._error

    def is_completed(self) -> bool:
        if self._done.is_set():
            return self._error is None
        return all(w.is_completed() for w in self._works)

    @property
    def error(self) -> BaseException | None:
        return self._error

    @property
    def buffers(self) -> list[Any]:
        """What the transfer reads or writes (valid until :meth:`release`)."""
        return self._keep

    def release(self) -> None:
        """Drops the buffers (only after the transfer is done)."""
        self._keep.clear()


class SendReaper:
    """Waits on posted sends in the background so callers never have to.

    gloo reports a send complete only once someone waits on it, and its buffers must outlive
    the transfer; the reaper holds both until then and records failures, which the next send
    to the same peer re-raises. One daemon thread per process, started on first use.
    """

    def __init__(self) -> None:
        self._queue: queue.Queue[tuple[Handle, Callable[[Handle], None] | None]] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._pending = 0
        self._idle = threading.Condition(self._lock)

    def add(self, handle: Handle, on_done: Callable[[Handle], None] | None = None) -> None:
        with self._lock:
            self._pending += 1
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="pipepack-send-reaper",
                                                daemon=True)
                self._thread.start()
        self._queue.put((handle, on_done))

    def _run(self) -> None:
        while True:
            handle, on_done = self._queue.get()
            try:
                handle.wait()
            except BaseException:  # noqa: BLE001 - kept on the handle, re-raised by its owner
                pass
            if on_done is not None:
                on_done(handle)
            handle.release()
            # hold nothing while idle: the last references to a channel (and through it a
            # process group) must not live on in a daemon thread until interpreter exit
            del handle, on_done
            with self._lock:
                self._pending -= 1
                if self._pending == 0:
                    self._idle.notify_all()

    def pending(self) -> int:
        with self._lock:
            return self._pending

    def drain(self, timeout: float | None = None) -> bool:
        """Blocks until every posted send completed (or failed); False on timeout."""
        with self._lock:
            return self._idle.wait_for(lambda: self._pending == 0, timeout)


REAPER = SendReaper()
