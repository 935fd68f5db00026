"""The wire to one peer, both directions: setup, ordering, and the hop's messages.

One :class:`Link` per (process group, peer) in a process, shared by every channel object and
the functional API, so all hops to a peer go through one sequence whatever thread or option
sent them.

**Setup.** On first use in either direction both ends exchange a *hello* (fixed 4 KiB capacity
on its own tag): protocol version, process id, host identity and the capacity of the head
receives this end posts. Nothing else is assumed to be configured alike on both ends.

**Send.** A hop is encoded and packed outside any lock (bad input fails before anything is
posted); under the send lock it gets its sequence number and its messages are posted back to
back, so hops from several threads never interleave. If the whole hop fits the peer's head
capacity it is one message. The reaper completes the sends; the caller may reuse its tensors
as soon as ``send`` returns.

**Receive.** A receive posts the head at once, at this end's capacity (a shorter head is fine on
gloo). Heads are read strictly in posting order under the advance lock: the frame alone says
what follows, every size in it is checked against the limits, the follow-on receives are posted
in order, then the body is decoded. A hop refused after its frame was read (pickle not allowed,
no matching all-gather group, declared mismatch) is still received in full and dropped, so the
link stays in step; only a bad frame or a failed transfer leaves it out of step for good.
"""

from __future__ import annotations

import atexit
import collections
import ctypes
import hashlib
import math
import os
import socket
import struct
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from pipepack.kernels import pack
from pipepack.kernels.ops import memmove_small as _memmove
from pipepack.kernels.ops import (
    pack_cpu_begin,
    pack_cpu_finish,
    pack_cpu_unchecked,
    unpack_unchecked,
)

from . import codec, transport
from .pool import BufferPool
from .transport import DATA_TAG, HEAD_TAG, HELLO_TAG, REAPER, Handle, group_rank
from .wire import hop
from .wire.hop import FRAME_BYTES, align16
from .wire.limits import Limits, WireError

__all__ = [
    "Link",
    "get_link",
    "reset_links",
    "DEFAULT_HEAD_BYTES",
    "DEFAULT_CHUNK_BYTES",
    "host_identity",
]

DEFAULT_HEAD_BYTES = (2 << 20) + (64 << 10)
"""Capacity of each head receive: a hop with up to ~2 MiB of CPU payload is one message."""
DEFAULT_CHUNK_BYTES = 2 << 20
"""gloo moves large payloads faster as several messages in flight (4 MiB: 3.4 ms as one
message, 2.3 ms as 2 x 2 MiB on the development machine)."""
MIN_HEAD_BYTES = 64 << 10
"""Every end posts head receives of at least this many bytes."""
HELLO_BYTES = 4096
_HELLO = struct.Struct("<4sHHIIQ32sH")  # ... host id, ring name length; the name follows
_HELLO_MAGIC = b"PPKH"
_COPY_OUT_RATIO = 4  # a received hop never pins a head buffer more than 4x its own size
_SHM_COPY_OUT = 256 << 10  # smaller shared-memory hops are copied out: they never hold a slot
#: the receive ring of a same-host link: up to RING_SLOTS hops in flight, each slot RING_SLOT_BYTES
#: inline or a grown segment of its own (pp/shm.py, "Slots that grow" and "Memory bound")
RING_SLOTS = 4
RING_SLOT_BYTES = 1 << 20
# the handle of every hop published straight into the peer's ring with no device payload: such a
# hop is complete when the send returns, so they share one completed handle
_PLACED = Handle([], what="a hop published in the peer's ring")
_RING_CALLER_READS = 2  # unread receives on the ring that the caller reads itself (post_async)
TRANSPORTS = ("auto", "dist", "shm")


def host_identity() -> bytes:
    """32 bytes that are equal for two processes on the same host and boot."""
    try:
        with open("/proc/sys/kernel/random/boot_id", "rb") as f:
            boot = f.read().strip()
    except OSError:
        boot = b""
    return hashlib.sha256(socket.gethostname().encode() + b"\0" + boot).digest()


class _Incoming:
    """One posted head receive and what became of it."""

    __slots__ = (
        "seq",
        "buf",
        "handle",
        "opts",
        "advanced",
        "handed",
        "result",
        "error",
        "pre",
        "__weakref__",
    )

    def __init__(self, seq: int, buf: torch.Tensor, handle: Handle, opts: Any) -> None:
        self.seq = seq
        self.buf = buf
        self.handle = handle
        self.opts = opts
        self.advanced = False
        self.handed = False  # given to the progress thread (the ring's receives posted far ahead)
        self.result: tuple[dict, list[Handle], list[Callable[[], None]]] | None = None
        self.error: BaseException | None = None
        self.pre: _Prepared | None = None


class _Staged:
    """A hop packed on the sending end while the peer's ring had no room: the transfer work its
    handle waits on, done once the backlog thread placed it in the ring."""

    __slots__ = ("payload", "nbytes", "what", "timeout", "_event", "_error")

    def __init__(
        self, payload: torch.Tensor, nbytes: int, what: str, timeout: float | None
    ) -> None:
        self.payload = payload
        self.nbytes = nbytes
        self.what = what
        self.timeout = timeout
        self._event = threading.Event()
        self._error: BaseException | None = None

    def finish(self, error: BaseException | None) -> None:
        self._error = error
        self._event.set()

    def wait(self, timeout: float | None = None) -> bool:
        self._event.wait()
        if self._error is not None:
            raise RuntimeError(f"{self.what} failed: {self._error}") from self._error
        return True


class _Prepared:
    """What a posted receive made ready for a hop shaped like the link's previous one: the
    buffer its CPU payload will lie in and the views of the payload's layout over it, built
    before the hop arrives (the receiver is idle then) and handed out only if the hop matches.

    ``kind``: ``"copy"`` — ``cpu`` is a buffer of exactly ``n_cpu`` bytes the payload is copied
    into (``whole`` None); ``"head"`` — ``cpu`` is the payload's place, from byte ``off``, in the
    posted head buffer ``whole``; ``"ring"`` — ``whole`` takes a copy of the whole ring hop
    and ``cpu`` is the payload's place in it."""

    __slots__ = ("kind", "whole", "cpu", "off", "n_cpu", "layout", "views")

    def __init__(
        self,
        kind: str,
        whole: torch.Tensor | None,
        cpu: torch.Tensor,
        off: int,
        n_cpu: int,
        layout: Any,
    ) -> None:
        self.kind = kind
        self.whole = whole
        self.cpu = cpu
        self.off = off
        self.n_cpu = n_cpu
        self.layout = layout
        self.views = unpack_unchecked(cpu, layout)

    def fits(self, kind: str, whole: torch.Tensor | None, off: int, n_cpu: int) -> bool:
        """Whether a hop read as ``kind`` into ``whole`` (None for a copy) at ``off`` lands where
        this was made for (its layout is checked once decoded)."""
        return (
            self.kind == kind
            and self.whole is whole
            and self.n_cpu == n_cpu
            and (whole is None or self.off == off)
        )


class RecvOptions:
    """What the receiving call decides about its hop."""

    __slots__ = ("allow_pickle", "limits", "tp", "check", "timeout", "accept_wire")

    def __init__(
        self,
        *,
        allow_pickle: bool,
        limits: Limits,
        tp: codec.TP | None,
        check: Callable[[list], None] | None,
        timeout: float | None,
        accept_wire: Callable[[tuple], None] | None = None,
    ) -> None:
        self.allow_pickle = allow_pickle
        self.limits = limits
        self.tp = tp
        self.check = check
        self.timeout = timeout
        self.accept_wire = accept_wire


class Link:
    def __init__(
        self,
        group: dist.ProcessGroup,
        cpu_group: dist.ProcessGroup,
        peer: int,
        *,
        head_bytes: int = DEFAULT_HEAD_BYTES,
        timeout: float | None = None,
        transport: str = "auto",
    ) -> None:
        if transport not in TRANSPORTS:
            raise ValueError(f"transport must be one of {TRANSPORTS}, got {transport!r}")
        if head_bytes < MIN_HEAD_BYTES or head_bytes % 16 or head_bytes >= 1 << 32:
            raise ValueError(
                f"slot_bytes (head capacity) must be a multiple of 16 in "
                f"[{MIN_HEAD_BYTES}, 4 GiB), got {head_bytes}"
            )
        self._group = weakref.ref(group)
        self._cpu_group = weakref.ref(cpu_group)
        self.cpu_is_device_group = cpu_group is group
        self.peer = peer
        self.peer_global = dist.get_global_rank(group, peer)
        self.me = dist.get_rank(group)
        # the peer's rank in each group, for posting straight to the process group
        self._gpeer = peer if hasattr(group, "send") else None
        self._cpeer = (
            group_rank(cpu_group, self.peer_global) if hasattr(cpu_group, "send") else None
        )
        self.head_bytes = head_bytes
        self.timeout = timeout
        self.transport = transport
        # same-host transport: this end's receive ring (offered in the hello), the peer's
        self._ring = None
        self._send_ring = None
        self._peer_ring_name: str | None = None
        self.send_mode = "dist" if transport == "dist" else "pending"
        self.recv_mode = "dist" if transport == "dist" else "pending"
        self.peer_head_bytes: int | None = None
        self.hello_error: BaseException | None = None
        self._hello_started = False
        self.peer_pid: int | None = None
        self.same_host: bool | None = None
        self._hello_lock = threading.Lock()
        # send side
        self._send_lock = threading.Lock()
        self._send_seq = 0
        self._send_broken: BaseException | None = None
        self._send_failed: Handle | None = None
        self._sent: collections.deque[Handle] = collections.deque()
        self._backlog: collections.deque[_Staged] = collections.deque()  # hops awaiting ring room
        self._backlog_thread: threading.Thread | None = None
        # send buffers never reach the caller: any idle one that fits will do, and one of the
        # largest hops idle is enough for a blocking sender
        self.send_pool = BufferPool(max_ratio=float("inf"), cap_factor=1)
        # receive side
        self._post_lock = threading.Lock()
        self._advance_lock = threading.Lock()
        self._recv_posted = 0
        self._queue: collections.deque[_Incoming] = collections.deque()
        self._recv_broken: BaseException | None = None
        self._progress: collections.deque[_Incoming] = collections.deque()
        self._progress_cv = threading.Condition()
        self._progress_thread: threading.Thread | None = None
        self.head_pool = BufferPool()
        self.recv_pool = BufferPool()
        # the previous hop read, so that a hop like it is not parsed again and its buffer and
        # views are made while the receiver waits (all written under the advance lock)
        self._rx_frame: tuple | None = None  # (frame bytes 16:, bytes :8, limits, capacity, Frame)
        self._rx_header: tuple | None = None  # (Frame, body, decoded header)
        self._rx_last: tuple | None = None  # (kind, payload offset, cpu bytes, hop bytes, layout)
        self._free_heads: list[torch.Tensor] = []  # read gloo heads nothing else refers to
        # a head buffer a blocking send keeps for the next hop of its size: (bytes, buffer, head)
        self._spares: list[tuple[int, torch.Tensor, torch.Tensor]] = []

    # ------------------------------------------------------------------ groups, setup

    @property
    def group(self) -> dist.ProcessGroup:
        g = self._group()
        if g is None:
            raise RuntimeError(
                f"the process group of the link to rank {self.peer_global} was destroyed"
            )
        return g

    @property
    def cpu_group(self) -> dist.ProcessGroup:
        g = self._cpu_group()
        if g is None:
            raise RuntimeError(
                f"the cpu group of the link to rank {self.peer_global} was destroyed"
            )
        return g

    @property
    def name(self) -> str:
        return f"rank {self.peer_global}"

    def hello(self) -> None:
        """Starts the one-time exchange with the peer, without waiting for it.

        Both ends post their hello at their first use of the link; a thread completes it. Until
        the peer's hello arrives this end sends as if the peer's head capacity were the minimum
        every end posts (:data:`MIN_HEAD_BYTES`), so no send ever waits for the peer's setup.
        """
        if self._hello_started:
            return
        with self._hello_lock:
            if self._hello_started:
                return
            ring_name = b""
            if self.transport != "dist":
                ring_name = self._open_ring()
            mine = (
                _HELLO.pack(
                    _HELLO_MAGIC,
                    hop.VERSION,
                    0,
                    self.head_bytes,
                    os.getpid(),
                    0,
                    host_identity(),
                    len(ring_name),
                )
                + ring_name
            )
            out = torch.zeros(len(mine), dtype=torch.uint8)
            out.numpy()[:] = np.frombuffer(mine, np.uint8)
            got = torch.zeros(HELLO_BYTES, dtype=torch.uint8)
            what = f"channel setup with {self.name}"
            works = [
                transport.isend(out, self.peer_global, self.cpu_group, HELLO_TAG, what),
                transport.irecv(got, self.peer_global, self.cpu_group, HELLO_TAG, what),
            ]
            handle = Handle(works, [out, got], what=what)
            # counted with the pending sends: flush() and the exit hook wait for it too, so no
            # thread is inside a transfer when the process group is destroyed
            REAPER.add(handle)
            threading.Thread(
                target=self._finish_hello, args=(handle, got), name="pipepack-hello", daemon=True
            ).start()
            self._hello_started = True

    def _finish_hello(self, handle: Handle, got: torch.Tensor) -> None:
        try:
            handle.wait(None)
        except BaseException as e:  # noqa: BLE001 - the peer is gone; its transfers will say so
            self.hello_error = e
            return
        raw = got.numpy().tobytes()
        magic, version, _, cap, pid, _, host, name_len = _HELLO.unpack_from(raw)
        name = raw[_HELLO.size : _HELLO.size + name_len] if name_len <= 256 else b""
        if (
            magic != _HELLO_MAGIC
            or version != hop.VERSION
            or not (MIN_HEAD_BYTES <= cap < 1 << 32 and cap % 16 == 0)
        ):
            self.hello_error = WireError(
                f"channel setup with {self.name}: the peer sent {magic!r} version {version} with "
                f"a head capacity of {cap}; this side speaks {_HELLO_MAGIC!r} version "
                f"{hop.VERSION}"
            )
            return
        self.peer_pid = pid
        self.same_host = host == host_identity()
        if self.same_host and name and self.transport != "dist":
            try:
                self._peer_ring_name = name.decode("ascii")
            except UnicodeDecodeError:
                self._peer_ring_name = None
        if self.transport != "dist" and not (self.same_host and self._ring is not None):
            # the peer will never switch to this end's ring: post heads ahead from now on
            self.recv_mode = "dist"
        self.peer_head_bytes = cap

    def _open_ring(self) -> bytes:
        from . import shm

        if not shm.available():
            if self.transport == "shm":
                raise RuntimeError(
                    "transport='shm' needs POSIX shared memory, which is not usable here"
                )
            self.recv_mode = "dist"
            return b""
        try:
            self._ring = shm.RecvRing(
                slots=RING_SLOTS,
                slot_bytes=RING_SLOT_BYTES,
                meta_bytes=0,
                max_hop_bytes=self.head_limit_shm,
            )
        except OSError as e:  # e.g. a small /dev/shm in a container
            if self.transport == "shm":
                raise RuntimeError(f"transport='shm': creating the receive ring failed: {e}") from e
            self.recv_mode = "dist"
            return b""
        _RINGS.add(self._ring)
        return self._ring.name.encode("ascii")

    head_limit_shm = 1 << 36

    def wait_hello(self, timeout: float | None = None) -> None:
        """Blocks until the peer's hello arrived (for callers that need its facts)."""
        self.hello()
        end = None if timeout is None else time.monotonic() + timeout
        while self.peer_head_bytes is None and self.hello_error is None:
            if end is not None and time.monotonic() > end:
                raise TimeoutError(
                    f"{self.name} did not answer the channel setup within {timeout} s"
                )
            time.sleep(0.001)
        if self.hello_error is not None:
            raise RuntimeError(f"channel setup with {self.name} failed: {self.hello_error}")

    # ------------------------------------------------------------------ send

    def send_blocking(
        self, enc: codec.Encoded, *, chunk_bytes: int | None, timeout: float | None = None
    ) -> None:
        """Sends one hop and returns once the transport has taken it (raises if it failed)."""
        # the caller gets control back only once the hop is sent, so large contiguous sources
        # may travel straight from where they lie (no packed copy)
        head: list = []
        h = self.send(
            enc,
            chunk_bytes=chunk_bytes,
            timeout=timeout,
            from_sources=True,
            reap=False,
            head_out=head,
        )
        try:
            h.wait(timeout)  # on this thread: a hand-off to the reaper costs two thread wakeups
        except BaseException:
            if not h.done:  # still posted (a timeout, an interrupt): flush() and exit complete it
                REAPER.add(h)
            raise
        # the peer received the hop, so it has posted its hello: finish the setup now rather
        # than leave a transfer in flight for an exit or destroy_process_group() right after
        self.wait_hello(timeout if timeout is not None else self.timeout)
        # the hop's head buffer is free again (its send completed): kept for the next hop of
        # its size, so that send packs at once, without a trip through the pool
        if head and not self._spares:
            self._spares.append(head[0])

    def _spare(self, n: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The head buffer a blocking send took for the next hop, if that hop has ``n`` bytes
        (a list pop: two threads never take the same one)."""
        try:
            m, base, head = self._spares.pop()
        except IndexError:
            return None
        return (base, head) if m == n else None

    def send(
        self,
        enc: codec.Encoded,
        *,
        chunk_bytes: int | None,
        timeout: float | None = None,
        from_sources: bool = False,
        reap: bool = True,
        head_out: list | None = None,
    ) -> Handle:
        """Packs and posts one hop; returns once every message is posted.

        ``from_sources``: the caller will not touch its tensors until the hop completed (a
        blocking send), so a CPU payload that goes in chunks is sent from the tensors
        themselves where a chunk lies inside one contiguous tensor; only the chunks that
        straddle tensors (and their padding) are staged. ``reap=False``: the caller waits on
        the returned handle itself (and hands it to the reaper if it stops waiting early).
        ``head_out``: a hop sent in one gloo message appends ``(bytes, buffer, head)`` of its
        head buffer, which the pool then does not take back (the caller keeps it for a later
        hop once this one completed, or drops it).
        """
        if not self._hello_started:
            self.hello()
        if self._send_failed is not None:
            h = self._send_failed
            raise RuntimeError(f"an earlier {h.what} failed: {h.error}") from h.error
        body = enc.body
        body_len = len(body)
        cpu = enc.parts.get("cpu")
        cpu_n = cpu.wire_layout.nbytes if cpu is not None else 0
        inline_len = align16(FRAME_BYTES + body_len) + cpu_n
        if self.send_mode != "dist":
            if self.transport == "shm":
                self.wait_hello(self.timeout)
            if self.peer_head_bytes is not None and self.send_mode == "pending":
                self._decide_send_mode()
            if self.send_mode == "shm":
                return self._send_shm(enc, body, cpu, cpu_n, inline_len, timeout)
        cap = self.peer_head_bytes or MIN_HEAD_BYTES
        keep: list[torch.Tensor] = []
        rest = None
        cpu_buf = None
        chunk_msgs = None
        head_base = cpu_base = None
        chunk = 0
        if inline_len <= cap:
            spare = self._spare(inline_len)
            if spare is None:
                head_base = self.send_pool.get(inline_len)
                head = head_base[:inline_len]
            else:
                head_base, head = spare
            head_ptr = head.data_ptr()
            _memmove(head_ptr + FRAME_BYTES, body, body_len)
            if cpu_n:
                pack_cpu_unchecked(enc.sources["cpu"], cpu.wire_layout, head[inline_len - cpu_n :])
            flags = enc.flags | hop.F_INLINE
        else:
            in_head = min(body_len, cap - FRAME_BYTES)
            head = torch.empty(FRAME_BYTES + in_head, dtype=torch.uint8)
            head_ptr = head.data_ptr()
            _memmove(head_ptr + FRAME_BYTES, body, in_head)
            if in_head < body_len:
                rest = torch.frombuffer(bytearray(body[in_head:]), dtype=torch.uint8)
                keep.append(rest)
            if cpu_n:
                chunk = chunk_bytes if chunk_bytes else cpu_n
                chunk = max(align16(chunk), hop.MIN_CHUNK_BYTES)
                srcs = enc.sources["cpu"]
                if from_sources and all(t.is_contiguous() for t in srcs):
                    chunk_msgs = _chunks_from_sources(srcs, cpu.wire_layout, chunk)
                    keep.extend(chunk_msgs)
                else:
                    # the copies that can fail run now; the dense ones are copied chunk by
                    # chunk once the head is posted, each chunk sent as soon as it is written
                    cpu_base = self.send_pool.get(cpu_n)
                    cpu_buf = cpu_base[:cpu_n]
                    dense = pack_cpu_begin(srcs, cpu.wire_layout, cpu_buf)
                    keep.append(cpu_buf)
            flags = enc.flags
        keep.append(head)
        dev_buf = dev_type = None
        dev_n = 0
        if len(enc.parts) > (cpu is not None):
            dev_buf, dev_type = self._pack_device_payload(enc)
            if dev_buf is not None:
                dev_n = dev_buf.numel()
                keep.append(dev_buf)
        head_len = head.numel()
        with self._send_lock:
            # another thread may have switched to the peer's ring since this one chose this
            # path: hops after the switch are read only from the ring, so this one (no seq yet,
            # nothing posted) goes there too
            rerouted = self.send_mode == "shm"
            if not rerouted:
                if self._send_broken is not None:
                    self._refuse_send("half-posted")
                seq = self._send_seq
                what = f"send #{seq} to {self.name}"
                _memmove(
                    head_ptr,
                    hop.pack_frame(
                        flags, seq, head_len, body_len, cpu_n, chunk, dev_type, enc.tp_world, dev_n
                    ),
                    FRAME_BYTES,
                )
                works: list[Any] = []
                try:
                    cg = self.cpu_group
                    peer, cpeer = self.peer_global, self._cpeer
                    works.append(transport.isend(head, peer, cg, HEAD_TAG, what, cpeer))
                    if rest is not None:
                        works.append(transport.isend(rest, peer, cg, DATA_TAG, what, cpeer))
                    if chunk_msgs:
                        for m in chunk_msgs:
                            works.append(transport.isend(m, peer, cg, DATA_TAG, what, cpeer))
                    elif cpu_buf is not None:

                        def ready(s: int, e: int) -> None:
                            works.append(
                                transport.isend(cpu_buf[s:e], peer, cg, DATA_TAG, what, cpeer)
                            )

                        pack_cpu_finish(
                            srcs, cpu.wire_layout, cpu_buf, dense, chunk=chunk, ready=ready
                        )
                    if dev_n:
                        works.append(
                            transport.isend(dev_buf, peer, self.group, 0, what, self._gpeer)
                        )
                except BaseException as e:
                    if works:  # part of the hop is on the wire: the peer is out of step
                        self._send_broken = e
                    raise
                self._send_seq += 1
                if head_out is not None and inline_len <= cap:
                    head_out.append((inline_len, head_base, head))
                    head_base = None
                pooled = [b for b in (head_base, cpu_base) if b is not None]
                handle = Handle(
                    works,
                    keep,
                    what=what,
                    timeout=timeout,
                    on_done=lambda h, pooled=pooled: self._on_sent(h, pooled),
                )
                sent = self._sent  # pruned under the lock: two threads never pop the same front
                sent.append(handle)
                while sent and sent[0].done:
                    sent.popleft()
        if rerouted:
            for b in (head_base, cpu_base):
                if b is not None:
                    self.send_pool.put(b)
            return self._send_shm(enc, body, cpu, cpu_n, inline_len, timeout)
        if reap:
            REAPER.add(handle)
        return handle

    def _decide_send_mode(self) -> None:
        """Once the peer's hello is in: switch to its shared-memory ring if it offered one on
        this host; the switch is announced in-band by a frame with ``F_SWITCH`` on gloo."""
        from . import shm

        with self._send_lock:
            if self.send_mode != "pending":
                return
            if self._peer_ring_name is None:
                if self.transport == "shm":
                    why = (
                        "is on this host but offered no shared-memory ring (its transport is "
                        "'dist', or shared memory is not usable there)"
                        if self.same_host
                        else "is not on this host"
                    )
                    raise RuntimeError(f"transport='shm': {self.name} {why}")
                self.send_mode = "dist"
                return
            try:
                ring = shm.SendRing(self._peer_ring_name, timeout=self.timeout)
            except Exception as e:  # noqa: BLE001 - no ring: stay on torch.distributed
                if self.transport == "shm":
                    raise RuntimeError(
                        f"transport='shm': attaching {self.name}'s ring failed: {e}"
                    ) from e
                self.send_mode = "dist"
                return
            seq = self._send_seq
            what = f"transport switch before send #{seq} to {self.name}"
            head = torch.zeros(FRAME_BYTES, dtype=torch.uint8)
            head.numpy()[:] = np.frombuffer(
                hop.encode_frame(hop.Frame(hop.F_SWITCH, seq, FRAME_BYTES, 0, 0, 0, None, 1, 0)),
                np.uint8,
            )
            work = transport.isend(head, self.peer_global, self.cpu_group, HEAD_TAG, what)
            REAPER.add(Handle([work], [head], what=what, timeout=self.timeout))
            self._send_ring = ring
            _RINGS.add(ring)
            self.send_mode = "shm"

    def _send_shm(
        self,
        enc: codec.Encoded,
        body: bytes,
        cpu: Any,
        cpu_n: int,
        inline_len: int,
        timeout: float | None,
    ) -> Handle:
        """One hop as one slot of the peer's ring, packed straight into it; when no slot is free
        (the receiver holds them all), packed into a buffer of this end that a thread moves
        into the ring once there is room, so a posted send never waits for the receiver."""
        dev_buf = dev_type = None
        if len(enc.parts) > (cpu is not None):
            dev_buf, dev_type = self._pack_device_payload(enc)
        dev_n = 0 if dev_buf is None else dev_buf.numel()
        keep = [] if dev_buf is None else [dev_buf]
        body_len = len(body)
        with self._send_lock:
            seq = self._send_seq
            what = f"send #{seq} to {self.name}"
            if self._send_broken is not None:
                self._refuse_send("waiting for ring room")
            # hops waiting for room go first: a hop is placed directly only after all of them
            r = None
            if not self._backlog:
                r = self._send_ring.reserve(inline_len, what=what, wait=False)
            if r is None:
                buf_base = self.send_pool.get(inline_len)
                r = _Staged(
                    buf_base[:inline_len],
                    inline_len,
                    what,
                    timeout if timeout is not None else self.timeout,
                )
            try:
                slot = r.payload
                ptr = slot.data_ptr()
                _memmove(
                    ptr,
                    hop.pack_frame(
                        enc.flags | hop.F_INLINE,
                        seq,
                        inline_len,
                        body_len,
                        cpu_n,
                        0,
                        dev_type,
                        enc.tp_world,
                        dev_n,
                    ),
                    FRAME_BYTES,
                )
                _memmove(ptr + FRAME_BYTES, body, body_len)
                if cpu_n:
                    pack_cpu_unchecked(
                        enc.sources["cpu"], cpu.wire_layout, slot[inline_len - cpu_n :]
                    )
                del slot
            except BaseException:
                if not isinstance(r, _Staged):
                    self._send_ring.cancel(r)
                raise
            works = []
            pooled = None
            if isinstance(r, _Staged):
                works.append(r)
                keep.append(r.payload)
                pooled = [buf_base]
                self._backlog.append(r)
                if self._backlog_thread is None:
                    self._backlog_thread = threading.Thread(
                        target=self._run_backlog,
                        name=f"pipepack-ring-send-{self.peer_global}",
                        daemon=True,
                    )
                    self._backlog_thread.start()
            else:
                self._send_ring.publish(r)
            if dev_n:
                works.append(
                    transport.isend(dev_buf, self.peer_global, self.group, 0, what, self._gpeer)
                )
            self._send_seq += 1
            if not works:  # published, and nothing else to move: complete already
                return _PLACED
            handle = Handle(
                works,
                keep,
                what=what,
                timeout=timeout,
                on_done=lambda h, pooled=pooled: self._on_sent(h, pooled),
            )
            self._sent.append(handle)
        REAPER.add(handle)
        return handle

    def _refuse_send(self, how: str) -> None:
        e = self._send_broken
        raise RuntimeError(
            f"the link to {self.name} is out of step since a send failed {how} ({e!r}); "
            "recreate the process group to recover"
        ) from e

    def _run_backlog(self) -> None:
        """Moves staged hops into the peer's ring in order, each once there is room."""
        ring = self._send_ring
        while True:
            item = self._backlog[0]  # only this thread removes items, and it stops when none
            err = None
            try:
                r = ring.reserve(
                    item.nbytes,
                    _RING_DEFAULT_TIMEOUT if item.timeout is None else item.timeout,
                    what=item.what,
                )
                try:
                    _memmove(r.payload.data_ptr(), item.payload.data_ptr(), item.nbytes)
                except BaseException:
                    ring.cancel(r)
                    raise
                ring.publish(r)
            except BaseException as e:  # noqa: BLE001 - the hop's handle raises it
                err = e
            with self._send_lock:
                self._backlog.popleft()
                failed = [item]
                if err is not None:  # the later hops cannot pass this one: they fail too
                    self._send_broken = self._send_broken or err
                    failed.extend(self._backlog)
                    self._backlog.clear()
                for it in failed:
                    it.finish(err)
                if not self._backlog:
                    self._backlog_thread = None
                    return

    def _pack_device_payload(self, enc: codec.Encoded) -> tuple[torch.Tensor | None, str | None]:
        """The accelerator payload packed into one device buffer (and its device type)."""
        for d, p in enc.parts.items():
            if d in ("cpu", "meta"):
                continue
            if self.cpu_is_device_group:
                raise ValueError(
                    f"{d} tensors need a device group (NCCL) beside the gloo "
                    "cpu_group; this channel has only a gloo group"
                )
            src = enc.sources[d]
            buf = torch.empty(p.wire_layout.nbytes, dtype=torch.uint8, device=src[0].device)
            if buf.numel():
                pack(src, out=buf, layout=p.wire_layout)
            return buf, d
        return None, None

    def _on_sent(self, h: Handle, pooled: list | None = None) -> None:
        if h.error is not None and self._send_failed is None:
            self._send_failed = h
        while pooled:
            self.send_pool.put(pooled.pop())

    def drain(self, timeout: float | None = None) -> None:
        """Waits for every send posted on this link so far; raises a failure."""
        for h in list(self._sent):
            h.wait(timeout)

    # ------------------------------------------------------------------ receive

    def _check_recv_broken(self) -> None:
        if self._recv_broken is not None:
            raise RuntimeError(
                f"the link from {self.name} is out of step since a receive failed "
                f"({self._recv_broken}); recreate the process group to "
                "recover"
            ) from self._recv_broken

    def post(self, opts: RecvOptions) -> _Incoming:
        """Posts the next head receive and returns at once."""
        if not self._hello_started:
            self.hello()
        with self._post_lock:
            if self._recv_broken is not None:
                self._check_recv_broken()
            seq = self._recv_posted
            self._recv_posted += 1
            inc = _Incoming(seq, None, None, opts)
            # post now once nothing can switch the peer away from gloo, but never ahead of an
            # earlier receive still unposted (heads match posted receives in posting order;
            # the posted ones are a prefix of the queue, so the last one says it for all)
            q = self._queue
            if self.recv_mode == "dist" and (not q or q[-1].handle is not None):
                self._post_head(inc)
            elif self.recv_mode == "shm":
                self._prepare(inc)
            q.append(inc)
        return inc

    def _recv_buffer(self, n: int) -> torch.Tensor:
        """A receive-pool buffer of exactly ``n`` bytes (sliced only when the pool's is larger)."""
        buf = self.recv_pool.get(n)
        return buf if buf.numel() == n else buf[:n]

    def _prepare(self, inc: _Incoming) -> None:
        """Makes ready the buffer and views for a hop like the previous one (see _Prepared)."""
        last = self._rx_last
        if last is None:
            return
        kind, off, n_cpu, n_whole, layout = last
        if kind == "copy" and self.recv_mode == "dist":
            inc.pre = _Prepared(kind, None, self._recv_buffer(n_cpu), 0, n_cpu, layout)
        elif kind == "head" and inc.buf is not None:
            inc.pre = _Prepared(kind, inc.buf, inc.buf[off : off + n_cpu], off, n_cpu, layout)
        elif kind == "ring" and self.recv_mode == "shm":
            whole = self._recv_buffer(n_whole)
            inc.pre = _Prepared(kind, whole, whole[off : off + n_cpu], off, n_cpu, layout)

    def _post_head(self, inc: _Incoming) -> None:
        # a view, not the pooled tensor itself: it counts as a reader of the buffer until the
        # head is read, so the pool cannot hand the buffer out again between the receive's
        # completion and the read (the pool sees tensors and views, not Python references)
        try:
            inc.buf = self._free_heads.pop()
        except IndexError:
            inc.buf = self.head_pool.get(self.head_bytes)[: self.head_bytes]
        what = f"head of receive #{inc.seq} from {self.name}"
        work = transport.irecv(
            inc.buf,
            self.peer_global,
            self.cpu_group,
            HEAD_TAG,
            what,
            self._cpeer,
        )
        inc.handle = Handle([work], [], what=what, timeout=inc.opts.timeout)
        self._prepare(inc)

    def post_async(self, opts: RecvOptions) -> _Incoming:
        """Posts the next head receive and has a thread read it as soon as it arrives, so the
        hop's payload receives are posted (and its bytes move) while the caller computes."""
        inc = self.post(opts)
        if self.recv_mode == "shm":
            # On the ring the sender's copy already put the bytes in place: the caller reads the
            # next hops itself at wait(), which spares the two thread switches of a hand-off. Only
            # when more receives are posted than that do they all go to the progress thread, so
            # hops nobody reads yet never fill the ring and stall the sender.
            with self._post_lock:
                unread = [i for i in list(self._queue) if not i.advanced]
                if len(unread) <= _RING_CALLER_READS:
                    return inc
                ahead = [i for i in unread if not i.handed]
                for i in ahead:
                    i.handed = True
        else:
            ahead = [inc]
            inc.handed = True
        with self._progress_cv:
            # weakly: a receive its caller already completed must not be kept (with its views,
            # and so its buffer or ring slot) by a progress thread that is behind
            self._progress.extend(weakref.ref(i) for i in ahead)
            if self._progress_thread is None or not self._progress_thread.is_alive():
                self._progress_thread = threading.Thread(
                    target=self._run_progress, name=f"pipepack-recv-{self.peer_global}", daemon=True
                )
                self._progress_thread.start()
            self._progress_cv.notify()
        return inc

    def _run_progress(self) -> None:
        while True:
            with self._progress_cv:
                while not self._progress:
                    if not self._progress_cv.wait(timeout=5.0) and not self._progress:
                        self._progress_thread = None
                        return
                inc = self._progress.popleft()()
            if inc is None or inc.advanced:
                continue
            try:
                self.advance(inc, None)
            except BaseException:  # noqa: BLE001 - kept on the incoming; its waiter raises it
                pass
            del inc

    def advance(
        self, inc: _Incoming, timeout: float | None = None
    ) -> tuple[dict, list[Handle], list[Callable[[], None]]]:
        """Reads heads in order up to ``inc``'s and posts their follow-on receives (on the
        caller's thread, or on the progress thread ahead of any caller)."""
        t = inc.opts.timeout if timeout is None else timeout
        deadline = None if t is None else time.monotonic() + t
        if not inc.advanced:
            if not self._advance_lock.acquire(timeout=-1 if t is None else t):
                raise TimeoutError(
                    f"receive #{inc.seq} from {self.name} did not complete within "
                    f"{t} s (still posted: a later wait() can complete it)"
                )
            try:
                while not inc.advanced:
                    self._check_recv_broken()
                    front = self._queue[0]
                    left = None if deadline is None else max(0.0, deadline - time.monotonic())
                    arrival = None
                    if self.recv_mode == "shm":
                        arrival = self._ring.wait(
                            _RING_DEFAULT_TIMEOUT if left is None else left,
                            what=f"receive #{front.seq} from {self.name}",
                        )
                    else:
                        if front.handle is None:
                            with self._post_lock:
                                if front.handle is None:
                                    self._post_head(front)
                        front.handle.wait(left)
                        raw = ctypes.string_at(front.buf.data_ptr(), FRAME_BYTES)
                        if raw[6] == hop.F_SWITCH and not raw[7]:
                            self._switch(front, raw)
                            front.handle = None
                            front.buf = None
                            continue
                    self._queue.popleft()
                    try:
                        if arrival is not None:
                            self._read_arrival(front, arrival)
                        else:
                            self._read(front, raw)
                    except BaseException as e:  # noqa: BLE001 - a transfer failed: out of step
                        front.error = e
                        self._recv_broken = e
                    front.advanced = True
            except BaseException as e:
                if not isinstance(e, TimeoutError):
                    self._recv_broken = self._recv_broken or e
                raise
            finally:
                self._advance_lock.release()
        if inc.error is not None:
            raise inc.error
        return inc.result

    def _switch(self, inc: _Incoming, raw: bytes) -> None:
        """A frame with F_SWITCH: the peer sends hop ``seq`` and later through this end's ring."""
        frame = hop.decode_frame(raw, capacity=self.head_bytes, limits=inc.opts.limits)
        if frame.seq != inc.seq or self._ring is None:
            raise WireError(
                f"receive #{inc.seq} from {self.name}: a transport switch at hop "
                f"#{frame.seq} (ring offered: {self._ring is not None})"
            )
        self.recv_mode = "shm"

    def _frame_of(self, raw: bytes, capacity: int, limits: Limits) -> tuple[hop.Frame, int]:
        """``(frame, sequence number)`` of a head: a frame whose bytes but for the sequence
        number equal the previous hop's (with the same capacity and limits) is not parsed and
        checked again; the Frame returned is then that hop's, so its ``seq`` is not this one's."""
        m = self._rx_frame
        if (
            m is not None
            and m[0] == raw[16:]
            and m[1] == raw[:8]
            and m[2] is limits
            and m[3] == capacity
        ):
            return m[4], int.from_bytes(raw[8:16], "little")
        frame = hop.decode_frame(raw, capacity=capacity, limits=limits)
        self._rx_frame = (raw[16:], raw[:8], limits, capacity, frame)
        return frame, frame.seq

    def _read_arrival(self, inc: _Incoming, arrival: Any) -> None:
        """A hop in a slot of this end's ring: laid out exactly like an INLINE head."""
        slot = arrival.payload
        arrival.release()
        n = slot.numel()
        head = slot
        raw = ctypes.string_at(slot.data_ptr(), FRAME_BYTES) if n >= FRAME_BYTES else b""
        frame, seq = self._frame_of(raw, max(n, FRAME_BYTES), inc.opts.limits)
        if not frame.inline or frame.head_len != n:
            raise WireError(
                f"receive #{inc.seq} from {self.name}: a ring slot of {n} bytes "
                f"holds a frame of {frame.head_len}"
            )
        # a hop stays in its slot (its views handed out) only while that leaves the sender room
        # for one more hop of any size, however long the caller keeps what it holds (activations
        # kept for a backward pass, hops read ahead of anyone waiting for them): with this hop,
        # at most two slots held, and their grown segments within half the ring's budget (the
        # sender's bound is max(budget, 2 x the largest hop), so any next hop fits beside them).
        # The previous hop, still referenced while the next receive runs (`d = recv()` in a
        # loop), so stays zero-copy up to hops of a quarter of the budget (32 MiB by default)
        small = frame.cpu_nbytes <= _SHM_COPY_OUT
        copied = bool(frame.cpu_nbytes) and small
        if frame.cpu_nbytes and not small:
            n_held, grown = self._ring.held_grown()
            copied = n_held > 2 or (n_held == 2 and 2 * grown > self._ring.grow_budget)
        if copied:
            pre = inc.pre
            if pre is not None and pre.kind == "ring" and pre.whole.numel() == n:
                copy = pre.whole
            else:
                copy = self._recv_buffer(n)
            _memmove(copy.data_ptr(), slot.data_ptr(), n)
            head = copy
        del slot
        inc.buf = head
        self._read(inc, frame=frame, seq=seq, copy_out=False, ring_copy=copied and small)

    def _read(
        self,
        inc: _Incoming,
        raw: bytes | None = None,
        frame: hop.Frame | None = None,
        seq: int | None = None,
        copy_out: bool = True,
        ring_copy: bool = False,
    ) -> None:
        """Reads the head in ``inc.buf`` (its ``frame`` and sequence number ``seq`` when the
        caller parsed them already), posts the hop's follow-on receives and decodes it.
        ``ring_copy``: ``inc.buf`` is a copy of a whole small ring hop."""
        got = seq
        seq = inc.seq
        opts = inc.opts
        head = inc.buf
        head_ptr = head.data_ptr()
        posted_head = frame is None  # a gloo head receive (not a ring slot or a copy of one)
        if frame is None:
            try:
                frame, got = self._frame_of(
                    raw if raw is not None else ctypes.string_at(head_ptr, FRAME_BYTES),
                    self.head_bytes,
                    opts.limits,
                )
            except WireError as e:
                raise WireError(f"receive #{seq} from {self.name}: {e}") from None
        elif got is None:
            got = frame.seq
        if got != seq:
            raise WireError(
                f"receive #{seq} from {self.name}: the peer sent hop #{got} where #{seq} "
                "was due (a hop was lost or doubled)"
            )
        # post every follow-on receive from the frame alone, in order
        works = []
        keep = []
        rest = None
        buffers: dict[str, torch.Tensor] = {}
        if not frame.inline or frame.dev_nbytes or frame.body_len > frame.body_in_head:
            what = f"payload of receive #{seq} from {self.name}"
            cg = self.cpu_group
            if frame.body_len > frame.body_in_head:
                rest = torch.empty(frame.body_len - frame.body_in_head, dtype=torch.uint8)
                rest_work = transport.irecv(rest, self.peer_global, cg, DATA_TAG, what, self._cpeer)
            if frame.cpu_nbytes and not frame.inline:
                cpu = self._recv_buffer(frame.cpu_nbytes)
                for s, e in frame.cpu_chunks():
                    works.append(
                        transport.irecv(cpu[s:e], self.peer_global, cg, DATA_TAG, what, self._cpeer)
                    )
                keep.append(cpu)
                buffers["cpu"] = cpu
            if frame.dev_nbytes:
                if not _has_device(frame.dev_type):
                    raise WireError(
                        f"receive #{seq} from {self.name}: the peer sent a {frame.dev_type} "
                        f"payload of {frame.dev_nbytes} bytes, and this process has no "
                        f"{frame.dev_type} device to receive it"
                    )
                dev = torch.device(frame.dev_type, _current_index(frame.dev_type))
                dbuf = torch.empty(frame.dev_nbytes, dtype=torch.uint8, device=dev)
                works.append(
                    transport.irecv(dbuf, self.peer_global, self.group, 0, what, self._gpeer)
                )
                keep.append(dbuf)
                buffers[frame.dev_type] = dbuf
        n_cpu = frame.cpu_nbytes
        pre, inc.pre = inc.pre, None
        kind = None
        if n_cpu and frame.inline:
            off = frame.cpu_offset
            copied = copy_out and n_cpu * _COPY_OUT_RATIO < self.head_bytes
            kind = "copy" if copied else "ring" if ring_copy else "head"
            if pre is not None and pre.fits(kind, None if copied else head, off, n_cpu):
                cpu = pre.cpu
            else:
                pre = None
                cpu = self._recv_buffer(n_cpu) if copied else head[off : off + n_cpu]
            if copied:
                _memmove(cpu.data_ptr(), head_ptr + off, n_cpu)
            buffers["cpu"] = cpu
        else:
            pre = None
        payload = (
            Handle(
                works,
                keep,
                what=f"payload of receive #{seq} from {self.name}",
                timeout=opts.timeout,
            )
            if works
            else None
        )
        body = ctypes.string_at(head_ptr + FRAME_BYTES, frame.body_in_head)
        if rest is not None:
            Handle(
                [rest_work],
                [rest],
                what=f"header of receive #{seq} from {self.name}",
                timeout=opts.timeout,
            ).wait()
            body += ctypes.string_at(rest.data_ptr(), rest.numel())
        if posted_head and kind != "head" and len(self._free_heads) < 2:
            # no view of this head is handed out: the next head receive may take it at once
            self._free_heads.append(head)
        del head, inc.buf  # views of the head (inline payload) keep it; nothing else does
        try:
            hm = self._rx_header
            if hm is not None and hm[0] is frame and hm[1] == body:
                dec = hm[2]  # the same frame and header bytes as the previous hop
            else:
                dec = codec.header_parts(frame, body, opts.limits)
                self._rx_header = (frame, body, dec)
            layout = dec.parts["cpu"].wire_layout if kind is not None and dec.direct else None
            out, post = codec.decode(
                frame,
                body,
                dec,
                buffers,
                allow_pickle=opts.allow_pickle,
                limits=opts.limits,
                tp=opts.tp,
                accept_wire=opts.accept_wire,
                views=pre.views if pre is not None and pre.layout is layout else None,
            )
            # what the next receive prepares for: a hop like this one
            self._rx_last = (
                None if layout is None else (kind, frame.cpu_offset, n_cpu, frame.head_len, layout)
            )
            if opts.check is not None:
                opts.check(codec.items_of(dec.schema, out))
        except (WireError, ValueError, TypeError) as e:
            if payload is not None:  # receive the rest of the hop anyway: the link stays in step
                _DROPPED.add(payload)
            where = f"receive #{seq} from {self.name}"
            inc.error = (
                type(e)(f"{where} refused: {e}")
                if isinstance(e, WireError)
                else WireError(f"{where} refused: {e}")
            )
            return
        inc.result = (out, [payload] if payload is not None else [], post)


def _chunks_from_sources(srcs: list, layout: Any, chunk: int) -> list[torch.Tensor]:
    """The CPU payload's chunk messages, cut from the (contiguous) source tensors themselves.

    Chunk ``[s, e)`` of the packed byte stream goes as a byte view of its tensor when it lies
    inside one tensor's bytes; otherwise (it straddles tensors or alignment padding) its bytes
    are staged in a small buffer of their own, padding zeroed, exactly as pack() lays them out.
    """
    spans = []
    for t, e in zip(srcs, layout.entries):
        if e.nbytes:
            flat = t.detach().reshape(-1)
            if flat.stride(0) != 1:  # e.g. one element with a large stride: clone keeps it
                flat = torch.empty(flat.shape, dtype=flat.dtype).copy_(flat)
            spans.append((e.offset, e.offset + e.nbytes, flat.view(torch.uint8)))
    msgs = []
    total = layout.nbytes
    i = 0
    for s in range(0, total, chunk):
        e = min(s + chunk, total)
        while i < len(spans) and spans[i][1] <= s:
            i += 1
        if i < len(spans) and spans[i][0] <= s and e <= spans[i][1]:
            lo = spans[i][0]
            msgs.append(spans[i][2][s - lo : e - lo])
            continue
        stage = torch.zeros(e - s, dtype=torch.uint8)
        j = i
        while j < len(spans) and spans[j][0] < e:
            lo, hi, b = spans[j]
            a, z = max(lo, s), min(hi, e)
            if z > a:
                transport.copy_bytes(stage[a - s : z - s], b[a - lo : z - lo])
            j += 1
        msgs.append(stage)
    return msgs


def _has_device(device_type: str) -> bool:
    mod = getattr(torch, device_type, None)
    try:
        return bool(mod is not None and mod.is_available())
    except Exception:  # noqa: BLE001 - a backend that cannot even say
        return False


def _current_index(device_type: str) -> int | None:
    mod = getattr(torch, device_type, None)
    try:
        return mod.current_device() if mod is not None else None
    except Exception:  # noqa: BLE001 - a backend without a current-device notion
        return None


class _Dropped:
    """Completes the receives of refused hops in the background and forgets them."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pending: list[Handle] = []

    def add(self, h: Handle) -> None:
        if h.done:
            return
        threading.Thread(target=self._finish, args=(h,), name="pipepack-drop", daemon=True).start()

    @staticmethod
    def _finish(h: Handle) -> None:
        try:
            h.wait(None)
        except BaseException:  # noqa: BLE001 - a refused hop: nobody waits for its bytes
            pass


_DROPPED = _Dropped()

_LINKS: weakref.WeakKeyDictionary[dist.ProcessGroup, dict[int, Link]] = weakref.WeakKeyDictionary()
_LINKS_LOCK = threading.Lock()


def get_link(
    group: dist.ProcessGroup,
    cpu_group: dist.ProcessGroup,
    peer: int,
    *,
    head_bytes: int | None = None,
    timeout: float | None = None,
    transport: str | None = None,
) -> Link:
    """The one link of this process to ``peer`` (a rank of ``group``)."""
    with _LINKS_LOCK:
        per = _LINKS.get(group)
        if per is None:
            per = _LINKS[group] = {}
        link = per.get(peer)
        if link is None:
            link = per[peer] = Link(
                group,
                cpu_group,
                peer,
                head_bytes=head_bytes or DEFAULT_HEAD_BYTES,
                timeout=timeout,
                transport=transport or DEFAULT_TRANSPORT,
            )
            return link
    if transport is not None and transport != link.transport:
        raise ValueError(
            f"the link to rank {link.peer_global} already uses transport "
            f"{link.transport!r}, not {transport!r}; one (group, peer) has one wire"
        )
    if link._cpu_group() is not cpu_group:
        raise ValueError(
            f"the link to rank {link.peer_global} of this group already uses another "
            "cpu_group; one (group, peer) has one wire"
        )
    if head_bytes is not None and head_bytes != link.head_bytes:
        raise ValueError(
            f"the link to rank {link.peer_global} already posts heads of "
            f"{link.head_bytes} bytes (slot_bytes), not {head_bytes}"
        )
    return link


def reset_links() -> None:
    """Forgets every link (call after re-creating process groups)."""
    with _LINKS_LOCK:
        _LINKS.clear()


DEFAULT_TRANSPORT = os.environ.get("PIPEPACK_TRANSPORT", "auto")
# a ring wait without a channel timeout is bounded like torch.distributed's default one
_RING_DEFAULT_TIMEOUT = dist.default_pg_timeout.total_seconds()
# held strongly until exit: a link dies with its process group (destroy_process_group), but
# hops its send ring already published must still reach the peer (close(linger=...) at exit)
_RINGS: set = set()


def _close_rings() -> None:
    from . import shm

    # atexit runs this before transport's flush (registered earlier): hops still waiting for
    # room in a ring (the backlog) must be placed before the rings close
    transport._flush_at_exit()
    for ring in list(_RINGS):
        try:
            if isinstance(ring, shm.SendRing):  # hops already published must reach the peer
                ring.close(linger=transport.EXIT_FLUSH_TIMEOUT)
            else:
                ring.close()
        except Exception:  # noqa: BLE001 - exiting anyway
            pass


atexit.register(_close_rings)


def _linger_send_rings(timeout: float | None) -> None:
    """At flush(): until the peers have mapped the segments of every hop published to their
    rings (the receiver unlinks a grown segment as it maps it, so a sender that flushes and
    then ends with ``os._exit`` or a crash loses nothing it published)."""
    from . import shm

    for ring in list(_RINGS):
        if isinstance(ring, shm.SendRing):
            try:
                ring._linger(math.inf if timeout is None else timeout)
            except Exception:  # noqa: BLE001 - a closed ring or a gone peer: nothing to wait for
                pass


transport.add_flush_hook(_linger_send_rings)
