"""Same-host transport core: a ring of shared-memory slots owned by the receiving process.

One :class:`RecvRing` per (peer link, direction) lives in the *receiving* process; the sending
process attaches to it by name with :class:`SendRing`, reserves a slot, writes the hop straight
into it (the pack is the only copy) and publishes it. The receiver gets a zero-copy ``uint8`` view
of the slot; the slot goes back to the sender once nothing in the receiving process can read it.

Interface::

    host_identity() -> bytes            # equal on both ends <=> this ring can work between them
    available() -> bool                 # POSIX shared memory (/dev/shm) usable here
    sweep_stale() -> list[str]          # unlinks pipepack-<pid>-* segments whose process is gone

    rx = RecvRing(slots=4, slot_bytes=4 << 20, meta_bytes=64 << 10, timeout=None,
                  grow_budget=DEFAULT_GROW_BUDGET)
    rx.name                             # what the sender needs (travels in the channel handshake)
    a = rx.wait(timeout)                # -> Arrival(seq, meta, payload); in order
    a.release(force=False)              # optional; the slot frees itself when the views die
    rx.close()

    tx = SendRing(rx.name, timeout=None)
    r = tx.reserve(nbytes, timeout)     # -> Reservation(payload); back-pressure when full or
                                        #    past the memory bound
    ... write r.payload (e.g. copy_bytes, or the pack kernel with out=r.payload) ...
    tx.publish(r, meta)                 # makes the hop visible; r.payload must not be written after
    tx.cancel(r)                        # gives an unpublished slot back
    tx.close()

Timeouts: ``None`` in ``wait``/``reserve`` means the ring's own ``timeout``; when that is ``None``
too the call waits without a deadline (a dead or departed peer still raises). ``math.inf`` waits
without a deadline whatever the ring's default is.

Errors: :class:`TimeoutError` names the ring, the step (hop seq / reservation) and the peer pid;
:class:`PeerGone` (a ``RuntimeError``) when the peer process is gone (pid no longer alive, or
reused by another process) or closed its end; :class:`CorruptRing` (a ``RuntimeError``) when a
field read from the control block disagrees with the ring's geometry or limits.

Layout of the main segment (all counters little-endian u64, offsets from its start)::

    [0, 256)        header: magic, version, geometry, pids + start times, states, tail, acks,
                    grow budget, count of grown segments retired
    [256, ...)      publish queue: slot index of hop seq s at entry (s - 1) % slots
    [desc_off, ...) one 128-byte descriptor per slot: pub_seq, ack_seq, payload/meta lengths,
                    generation + size + name of the slot's grown segment (size 0 = inline)
    [meta_off, ...) one meta area per slot (meta_bytes rounded up to 64)
    [data_off, ...) one data area per slot (slot_bytes rounded up to the page), page aligned

Protocol. A slot ``i`` is free for the sender when ``ack_seq[i] == pub_seq[i]``. The sender writes
the payload (through :attr:`Reservation.payload`), the meta bytes, the lengths and the queue entry,
then, under the control block's spinlock, ``pub_seq[i] = seq`` and ``tail = seq``. The receiver
polls ``tail``; once it passes ``seq`` it takes and drops the same spinlock and only then reads
the queue entry, the descriptor, the meta and (through the views it hands out) the payload. When
the last view of a hop dies (a weakref callback on the buffer object the view's storage holds),
the receiver writes ``ack_seq[i] = seq`` under the spinlock and bumps ``acks``; the sender polls
that, takes and drops the spinlock (once for all the slots freed since its last lock/unlock),
and only then writes the slot (or its descriptor) again. The receiver likewise takes the lock
once for every hop published before it: hops up to the tail it read before its last lock/unlock
are read without another one.

Memory ordering. The spinlock is glibc's ``pthread_spin_trylock``/``pthread_spin_unlock`` on a
word of the shared block (an atomic exchange and a release store): a lock/unlock pair on each
side around the publishing store and before reading gives the writer's earlier stores (payload,
meta, lengths) a happens-before edge to the reader's later loads on any architecture, not only on
x86's TSO (where plain stores through a mapping are already seen in program order). The
counters are aligned 8-byte words written and read by single loads/stores (not torn on x86-64 /
aarch64). Without the glibc symbols the module falls back to TSO alone and :func:`available`
says False off x86-64.

Waiting. A waiter spins on the counter for ``spin_us`` (default :data:`DEFAULT_SPIN_US`): plain
reads of the word in batches of 8, a clock read and a ``sched_yield`` between batches (a peer
that shares the core gets it at once). Then it sleeps in ``futex(FUTEX_WAIT)`` on the counter's
low 32 bits. It announces a sleep in a wait flag, takes and drops the spinlock and re-reads the
counter; the peer reads that flag inside the same lock section as its store to the counter and
calls ``FUTEX_WAKE`` only when it is set, so one of the two sees the other. Each sleep is capped
at :data:`MAX_SLEEP_S`, so the peer's liveness is checked at least that often.

Slots that grow. A hop larger than every free slot takes a free slot and gives it a segment of
its own (``pipepack-<sender pid>-...``, sized up to the next 1/8-step of a power of two: the
hop's *class*), named in the slot's descriptor with a new generation number. The receiver maps it
when it first meets that generation (size checked against :attr:`RecvRing.max_hop_bytes` and the
file's real size) and unlinks it at once; the slot keeps the grown segment for later hops (no
new mapping per hop). Small hops take the smallest free slot that fits, so they do not pin grown
segments.

Memory bound. The grown segments of a ring hold at most ``max(grow_budget, 2 * M)`` bytes
together, ``M`` the largest of: the class of the hop being reserved, and the segments of hops in
flight (published and not yet released by the receiver, or reserved and not yet published).
``reserve`` enforces it before it writes anything: it retires free grown segments, largest
first, while the total is above the bound (a retired slot is an inline slot again), and a hop
that needs a new segment which would still not fit waits for the receiver to release a hop
(back-pressure, the same timeout and error as a full ring). So the receiver can always hold one
hop of any size while the sender writes the next, a burst of big hops leaves at most
``grow_budget`` bytes of segments behind once they are released and the next hop is reserved,
and the resident memory the ring adds to either end is the main segment plus that bound (plus,
on the receiving end, segments that views released with ``force=True`` still read). Retiring
sets the descriptor's size to 0 with a new generation and bumps the header's retire count; the
receiver, at its next hop, unmaps every segment it maps whose generation is no longer the
descriptor's. The default budget (:data:`DEFAULT_GROW_BUDGET`, 128 MiB) lets two 64 MiB hops be
in flight at once, or four of up to 32 MiB.

Cleanup. The main segment is unlinked by the sender as soon as it has mapped it (both ends
mapped), a grown segment by the receiver as soon as it has mapped it; the memory lives on as long
as a mapping does. Names carry the creator's pid, process start time and pid namespace, so a
crashed process's segments are recognised and unlinked by :func:`sweep_stale` (run by every new
``RecvRing``, by ``close()``, and when a peer is found dead). ``close()`` never unmaps memory a
view can still read: the mapping goes away with the last view.

A hop's per-call cost is Python: ``reserve`` reuses the payload tensor of the slot's previous
reservation when the size is the same, and no call formats a message unless it raises.

Copies into and out of a slot should stay on one thread (torch's intra-op pool fights the peer for
the cores on a small host): :func:`copy_bytes` does that with ``numpy.copyto``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import math
import mmap
import os
import platform
import re
import secrets
import socket
import stat
import sys
import threading
import time
import weakref
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .transport import copy_bytes

__all__ = [
    "host_identity",
    "available",
    "sweep_stale",
    "copy_bytes",
    "RecvRing",
    "SendRing",
    "Arrival",
    "Reservation",
    "PeerGone",
    "CorruptRing",
    "DEFAULT_SPIN_US",
    "DEFAULT_GROW_BUDGET",
    "MAX_SLEEP_S",
]

SHM_DIR = "/dev/shm"
PREFIX = "pipepack-"
MAGIC = int.from_bytes(b"PPSHMRG1", "little")
VERSION = 2
PAGE = mmap.PAGESIZE
ALIGN = 64
NAME_BYTES = 64
DESC_BYTES = 128
HEADER_BYTES = 256
MAX_SLOTS = 1024
MAX_META_BYTES = 16 << 20
DEFAULT_MAX_HOP_BYTES = 1 << 36
#: bytes a ring's grown segments may hold together beyond two hops' worth ("Memory bound")
DEFAULT_GROW_BUDGET = 128 << 20

#: spin this long on a counter before sleeping (see bench/NOTES.md, shm section)
DEFAULT_SPIN_US = 100.0
#: longest single sleep of a waiter; also the period of the peer liveness check while asleep
MAX_SLEEP_S = 0.02
_LIVENESS_PERIOD_S = 0.05
_SPIN_YIELD = os.environ.get("PIPEPACK_SHM_SPIN_YIELD", "1") != "0"

# header words (u64 index)
(
    H_MAGIC,
    H_VERSION,
    H_SLOTS,
    H_SLOT_BYTES,
    H_META_BYTES,
    H_QUEUE_OFF,
    H_DESC_OFF,
    H_META_OFF,
    H_DATA_OFF,
    H_TOTAL,
    H_MAX_HOP,
    H_RECV_PID,
    H_RECV_START,
    H_RECV_STATE,
    H_SEND_PID,
    H_SEND_START,
    H_SEND_STATE,
    H_TAIL,
    H_HEAD,
    H_ACKS,
    H_LOCK,
    H_RWAIT,
    H_SWAIT,
    H_GROW_BUDGET,
    H_RETIRED,
) = range(25)
# descriptor words (u64 index within a descriptor); the name occupies bytes [64, 128)
D_PUB, D_ACK, D_NBYTES, D_MLEN, D_GEN, D_EXT_BYTES = range(6)
D_NAME_OFF = 64

OPEN, CLOSED = 1, 2  # *_STATE values; 0 = never attached

# pipepack-<pid>-<process start time, hex>-<pid namespace inode, hex>-<random hex>
_NAME_RE = re.compile(
    r"^pipepack-([0-9]{1,10})-([0-9a-f]{1,16})-([0-9a-f]{1,16})-([0-9a-f]{8,32})$"
)


class PeerGone(RuntimeError):
    """The peer process is gone (dead, pid reused) or closed its end of the ring."""


class CorruptRing(RuntimeError):
    """A field of the shared control block disagrees with the ring's geometry or limits."""


# ------------------------------------------------------------------------------------------------
# process identity, liveness, names


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state letter, start time in clock ticks) of ``pid``, or None when there is no such pid."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    except OSError:
        return ("?", 0)
    rest = data[data.rindex(b")") + 2 :].split()
    return rest[0].decode(), int(rest[19])


def _start_time(pid: int) -> int:
    st = _proc_stat(pid)
    return st[1] if st else 0


def _pid_ns() -> int:
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return 0


def _alive(pid: int, start: int) -> bool:
    """True while ``pid`` is a live (not zombie) process started at ``start`` (0: any start)."""
    if pid <= 0:
        return False
    st = _proc_stat(pid)
    if st is None:
        if os.path.isdir("/proc/self"):
            return False
        try:  # no /proc: signal 0 tells existence only
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    state, t0 = st
    if state in ("Z", "X", "x"):
        return False
    return not (start and t0 and t0 != start)


_ME: tuple[int, int, int] | None = None


def _me() -> tuple[int, int, int]:
    global _ME
    pid = os.getpid()
    if _ME is None or _ME[0] != pid:  # recomputed after fork
        _ME = (pid, _start_time(pid), _pid_ns())
    return _ME


def _new_name() -> str:
    pid, start, ns = _me()
    return f"{PREFIX}{pid}-{start:x}-{ns:x}-{secrets.token_hex(8)}"


def _path(name: str) -> str:
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise ValueError(f"not a pipepack shared-memory segment name: {name!r}")
    return os.path.join(SHM_DIR, name)


def _unlink(name: str) -> None:
    try:
        os.unlink(_path(name))
    except FileNotFoundError:
        pass


def sweep_stale() -> list[str]:
    """Unlinks ``pipepack-<pid>-*`` segments of this pid namespace whose creator is gone.

    A segment is stale when its pid is not a live process or is a process with another start
    time (pid reused). Returns the names unlinked.
    """
    gone: list[str] = []
    _, _, my_ns = _me()
    try:
        entries = os.listdir(SHM_DIR)
    except OSError:
        return gone
    dead: dict[tuple[int, int], bool] = {}
    uid = os.getuid()
    for e in entries:
        m = _NAME_RE.match(e)
        if not m or int(m.group(3), 16) != my_ns:
            continue
        key = (int(m.group(1)), int(m.group(2), 16))
        if key not in dead:
            dead[key] = not _alive(*key)
        if dead[key]:
            try:
                if os.stat(os.path.join(SHM_DIR, e), follow_symlinks=False).st_uid != uid:
                    continue
                os.unlink(os.path.join(SHM_DIR, e))
                gone.append(e)
            except OSError:
                pass
    return gone


def host_identity() -> bytes:
    """Bytes equal in two processes exactly when this ring can work between them.

    Host name, kernel boot id, pid namespace (liveness checks compare pids) and the identity of
    the /dev/shm file system instance (same mount => same segments).
    """
    parts = [socket.gethostname().encode()]
    try:
        with open("/proc/sys/kernel/random/boot_id", "rb") as f:
            parts.append(f.read().strip())
    except OSError:
        parts.append(b"?")
    try:
        parts.append(os.readlink("/proc/self/ns/pid").encode())
    except OSError:
        parts.append(b"?")
    try:
        st = os.stat(SHM_DIR)
        parts.append(f"shm:{st.st_dev}:{st.st_ino}".encode())
    except OSError:
        parts.append(b"shm:?")
    return b"|".join(parts)


# ------------------------------------------------------------------------------------------------
# libc: spinlock (ordering) and futex (sleeping)


def _load_libc():
    for cand in (None, ctypes.util.find_library("c"), ctypes.util.find_library("pthread")):
        try:
            lib = ctypes.CDLL(cand, use_errno=True)
            lib.pthread_spin_trylock  # noqa: B018 - presence check
            return lib
        except (OSError, AttributeError):
            continue
    return None


_LIBC = _load_libc()
if _LIBC is not None:
    _TRYLOCK = _LIBC.pthread_spin_trylock
    _TRYLOCK.argtypes = [ctypes.c_void_p]
    _TRYLOCK.restype = ctypes.c_int
    _UNLOCK = _LIBC.pthread_spin_unlock
    _UNLOCK.argtypes = [ctypes.c_void_p]
    _UNLOCK.restype = ctypes.c_int
    _SPIN_INIT = _LIBC.pthread_spin_init  # the free value is per-architecture (1 on x86)
    _SPIN_INIT.argtypes = [ctypes.c_void_p, ctypes.c_int]
    _SPIN_INIT.restype = ctypes.c_int
else:  # pragma: no cover - glibc everywhere this runs
    _TRYLOCK = _UNLOCK = _SPIN_INIT = None
_PTHREAD_PROCESS_SHARED = 1

_SYS_FUTEX = {"x86_64": 202, "amd64": 202, "aarch64": 98, "arm64": 98}.get(
    platform.machine().lower()
)
_FUTEX_WAIT, _FUTEX_WAKE = 0, 1  # shared (not PRIVATE): the word lives in a shared mapping
_SYSCALL = None
if _LIBC is not None and _SYS_FUTEX is not None and sys.platform.startswith("linux"):
    _SYSCALL = _LIBC.syscall
    _SYSCALL.restype = ctypes.c_long


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


def _futex_wait(addr: int, expected: int, seconds: float) -> None:
    if _SYSCALL is None:
        time.sleep(min(seconds, 0.001))
        return
    ts = _Timespec(int(seconds), int((seconds - int(seconds)) * 1e9))
    _SYSCALL(
        ctypes.c_long(_SYS_FUTEX),
        ctypes.c_void_p(addr),
        ctypes.c_int(_FUTEX_WAIT),
        ctypes.c_uint32(expected & 0xFFFFFFFF),
        ctypes.byref(ts),
        None,
        ctypes.c_int(0),
    )


def _futex_wake(addr: int) -> None:
    if _SYSCALL is not None:
        _SYSCALL(
            ctypes.c_long(_SYS_FUTEX),
            ctypes.c_void_p(addr),
            ctypes.c_int(_FUTEX_WAKE),
            ctypes.c_int(0x7FFFFFFF),
            None,
            None,
            ctypes.c_int(0),
        )


_AVAILABLE: bool | None = None


def available() -> bool:
    """True when POSIX shared memory works here: /dev/shm can hold, map and unlink a segment,
    the platform is little-endian, and publish ordering is guaranteed (glibc's spinlock, or x86's
    TSO)."""
    global _AVAILABLE
    if _AVAILABLE is None:
        ok = sys.platform.startswith("linux") and sys.byteorder == "little"
        ok = ok and (_TRYLOCK is not None or platform.machine().lower() in ("x86_64", "amd64"))
        if ok:
            name = _new_name()
            try:
                mm = _create(name, PAGE)
                mm[:8] = b"pipepack"
                ok = mm[:8] == b"pipepack"
                mm.close()
            except (OSError, ValueError):
                ok = False
            finally:
                try:
                    _unlink(name)
                except OSError:
                    pass
        _AVAILABLE = ok
    return _AVAILABLE


# ------------------------------------------------------------------------------------------------
# segments


def _create(name: str, size: int) -> mmap.mmap:
    path = _path(name)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        os.ftruncate(fd, size)
        try:
            # reserve the pages now: a full tmpfs fails here with ENOSPC, not later with SIGBUS
            os.posix_fallocate(fd, 0, size)
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                raise OSError(
                    e.errno,
                    f"cannot reserve {size} bytes in {SHM_DIR} for {name} "
                    f"({os.strerror(e.errno)}); is {SHM_DIR} too small?",
                ) from e
        return mmap.mmap(fd, size)
    except BaseException:
        _unlink(name)
        raise
    finally:
        os.close(fd)


def _open(name: str) -> tuple[mmap.mmap, int]:
    """Maps an existing segment read-write; returns the mapping and the file's size."""
    fd = os.open(_path(name), os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size <= 0:
            raise CorruptRing(f"{name} is not a shared-memory segment of nonzero size")
        return mmap.mmap(fd, st.st_size), st.st_size
    finally:
        os.close(fd)


def _up(n: int, a: int) -> int:
    return (n + a - 1) // a * a


def _grow_size(n: int) -> int:
    """n rounded up to the next of 8 steps per power of two, then to a page."""
    if n <= PAGE:
        return PAGE
    step = 1 << max(n.bit_length() - 4, 0)
    return _up(_up(n, step), PAGE)


@dataclass(frozen=True)
class _Geometry:
    slots: int
    slot_bytes: int  # data area per slot, a multiple of PAGE
    meta_bytes: int  # meta area per slot, a multiple of ALIGN
    queue_off: int
    desc_off: int
    meta_off: int
    data_off: int
    total: int

    @staticmethod
    def of(slots: int, slot_bytes: int, meta_bytes: int) -> _Geometry:
        slot_r = _up(max(slot_bytes, 1), PAGE)
        meta_r = _up(max(meta_bytes, 1), ALIGN)
        queue_off = HEADER_BYTES
        desc_off = _up(queue_off + 8 * slots, ALIGN)
        meta_off = desc_off + DESC_BYTES * slots
        data_off = _up(meta_off + meta_r * slots, PAGE)
        return _Geometry(
            slots,
            slot_r,
            meta_r,
            queue_off,
            desc_off,
            meta_off,
            data_off,
            data_off + slot_r * slots,
        )


class _Seg:
    """A mapping of the main segment with word views and the raw addresses of the lock/futex."""

    def __init__(self, mm: mmap.mmap, geo: _Geometry | None = None) -> None:
        self.mm = mm
        self.view = memoryview(mm)  # the whole segment; slices of it back the slot tensors
        self.ctl = self.view[:HEADER_BYTES].cast("Q")
        self._anchor = ctypes.c_char.from_buffer(mm)  # pins the mapping for the raw addresses
        self.base = ctypes.addressof(self._anchor)
        self.lock_addr = self.base + 8 * H_LOCK
        self.lock = ctypes.c_void_p(self.lock_addr)  # the spinlock calls' argument, built once
        self.geo = geo
        self.queue = self.desc = None
        if geo is not None:
            self.set_geo(geo)

    def set_geo(self, geo: _Geometry) -> None:
        self.geo = geo
        self.queue = self.view[geo.queue_off : geo.queue_off + 8 * geo.slots].cast("Q")
        self.desc = self.view[geo.desc_off : geo.meta_off].cast("Q")

    def d(self, slot: int, word: int) -> int:
        return self.desc[slot * _DW + word]

    def set_d(self, slot: int, word: int, value: int) -> None:
        self.desc[slot * _DW + word] = value

    def ext_name(self, slot: int) -> bytes:
        off = self.geo.desc_off + slot * DESC_BYTES + D_NAME_OFF
        return bytes(self.mm[off : off + NAME_BYTES]).rstrip(b"\0")

    def set_ext_name(self, slot: int, name: str) -> None:
        off = self.geo.desc_off + slot * DESC_BYTES + D_NAME_OFF
        raw = name.encode()
        self.mm[off : off + NAME_BYTES] = raw + b"\0" * (NAME_BYTES - len(raw))

    def _contended(self, seconds: float) -> bool:
        """Spins for the lock after a failed try: True once held, False after ``seconds`` (a
        holder that died inside its few-store critical section)."""
        lock = self.lock
        deadline = time.monotonic() + seconds
        n = 0
        while _TRYLOCK(lock) != 0:
            n += 1
            if n & 255 == 0:
                if time.monotonic() > deadline:
                    return False
                os.sched_yield()
        return True

    def fence(self, seconds: float = 1.0) -> bool:
        """Takes and drops the shared spinlock (see the module doc); False when it stays held
        for ``seconds``."""
        if _TRYLOCK is None:
            return True
        lock = self.lock
        if _TRYLOCK(lock) != 0 and not self._contended(seconds):
            return False
        _UNLOCK(lock)
        return True

    def store2(
        self, va: memoryview, ia: int, xa: int, vb: memoryview, ib: int, xb: int, flag: int
    ) -> int:
        """Under the spinlock: ``va[ia] = xa``, then ``vb[ib] = xb``, then reads the peer's wait
        flag ``ctl[flag]`` and returns it (-1: the lock stayed held for a second).

        Reading the flag inside the critical section is what makes a wake-up never lost: the
        peer announces its sleep (flag store) before its own lock/unlock and re-reads the word
        after it, so either its section comes first (this read sees the flag) or this one does
        (its re-read sees the stores)."""
        if _TRYLOCK is None:
            va[ia] = xa
            vb[ib] = xb
            return self.ctl[flag]
        lock = self.lock
        if _TRYLOCK(lock) != 0 and not self._contended(1.0):
            return -1
        try:
            va[ia] = xa
            vb[ib] = xb
            return self.ctl[flag]
        finally:
            _UNLOCK(lock)

    def locked_store(self, pairs: list[tuple[memoryview, int, int]], deadline: float) -> bool:
        """Stores ``(view, index, value)`` in order while holding the spinlock."""
        if _TRYLOCK is None:
            for view, i, v in pairs:
                view[i] = v
            return True
        lock = self.lock
        if _TRYLOCK(lock) != 0 and not self._contended(max(deadline - time.monotonic(), 0.0)):
            return False
        try:
            for view, i, v in pairs:
                view[i] = v
        finally:
            _UNLOCK(lock)
        return True

    def close(self) -> None:
        for v in (self.queue, self.desc, self.ctl, self.view):
            if v is not None:
                v.release()
        self.queue = self.desc = None
        self._anchor = None
        try:
            self.mm.close()
        except BufferError:
            pass  # views of a slot are alive: the mapping goes with the last of them


_DW = DESC_BYTES // 8  # u64 words per descriptor
# reads of the awaited word between two clock reads (and yields): few, so that a peer sharing
# this core gets it soon (bench/NOTES.md, shm section)
_SPIN_READS = range(8)


def _wait_change(
    seg: _Seg,
    word: int,
    seen: int,
    wait_word: int,
    deadline: float | None,
    spin_s: float,
    check,
) -> bool:
    """Waits until ``ctl[word] != seen``: spins for ``spin_s`` (batches of plain reads of the
    word, a clock read and, unless disabled, a ``sched_yield`` between batches), then sleeps on
    the word's futex, announcing itself in ``wait_word``, at most :data:`MAX_SLEEP_S` per sleep.
    Once past the spin, ``check()`` (which may raise) runs every ``_LIVENESS_PERIOD_S``.
    False at ``deadline`` (monotonic seconds; None = never) with the word unchanged."""
    ctl = seg.ctl
    now = time.monotonic
    t = now()
    if spin_s > 0:
        end = t + spin_s
        while True:
            for _ in _SPIN_READS:
                if ctl[word] != seen:
                    return True
            t = now()
            if t >= end:
                break
            if _SPIN_YIELD:
                os.sched_yield()  # lets the peer run here when the cores are oversubscribed
    next_check = t + _LIVENESS_PERIOD_S  # the first check after one period: a hop is due soon
    addr = seg.base + 8 * word
    while True:
        if t >= next_check:
            check()
            next_check = t + _LIVENESS_PERIOD_S
        if deadline is not None and t >= deadline:
            return ctl[word] != seen
        ctl[wait_word] = 1
        seg.fence(1.0)  # the flag store before the re-read (see _Seg.store2)
        if ctl[word] != seen:
            ctl[wait_word] = 0
            return True
        nap = MAX_SLEEP_S if deadline is None else max(min(MAX_SLEEP_S, deadline - t), 0.0)
        _futex_wait(addr, seen, nap)
        ctl[wait_word] = 0
        if ctl[word] != seen:
            return True
        t = now()


def _deadline(timeout: float | None) -> float | None:
    if timeout is None or math.isinf(timeout):
        return None
    if timeout < 0 or math.isnan(timeout):
        raise ValueError(f"timeout must be >= 0, got {timeout!r}")
    return time.monotonic() + timeout


def _check_timeout(timeout: float | None) -> None:
    if timeout is not None and not timeout >= 0:  # negative or NaN
        raise ValueError(f"timeout must be >= 0, got {timeout!r}")


# ------------------------------------------------------------------------------------------------
# receiving end


class Arrival:
    """One received hop: ``seq``, the sender's ``meta`` bytes and ``payload``, a zero-copy uint8
    view of exactly the hop's bytes in its slot (64-byte aligned, with its own storage).

    The slot returns to the sender when no tensor, storage or view derived from ``payload`` is
    alive any more. :meth:`release` drops this object's reference (freeing the slot if it was the
    last); ``release(force=True)`` frees the slot even while views are alive, for callers that
    know they will not read them again (they would then see a later hop's bytes).
    """

    __slots__ = ("seq", "meta", "payload", "_ring", "_slot")

    def __init__(
        self, seq: int, meta: bytes, payload: torch.Tensor, ring: RecvRing, slot: int
    ) -> None:
        self.seq = seq
        self.meta = meta
        self.payload = payload
        self._ring = ring
        self._slot = slot

    def release(self, force: bool = False) -> None:
        self.payload = None
        ring, self._ring = self._ring, None
        if force and ring is not None:
            ring._free(self._slot, self.seq)

    def __repr__(self) -> str:
        n = None if self.payload is None else self.payload.numel()
        return f"Arrival(seq={self.seq}, meta={len(self.meta)} bytes, payload={n} bytes)"


class _Mapped:
    """A grown segment mapped on one end: generation, size, mapping, a view of all of it, and
    (sending end) its name until the receiver has mapped and unlinked it."""

    __slots__ = ("gen", "cap", "mm", "view", "name")

    def __init__(self, gen: int, cap: int, mm: mmap.mmap, name: str = "") -> None:
        self.gen = gen
        self.cap = cap
        self.mm = mm
        self.view = memoryview(mm)
        self.name = name

    def close(self) -> None:
        """Unmaps now, or with the last view of it still alive."""
        self.view.release()
        try:
            self.mm.close()
        except BufferError:
            pass


class RecvRing:
    """The receiving end: creates the shared segment and hands out hops in order.

    ``slots`` slots of ``slot_bytes`` (rounded up to a page) plus a ``meta_bytes`` area each;
    ``max_hop_bytes`` bounds what a grown slot may be (a corrupt control block cannot make the
    receiver map more); ``grow_budget`` is the bytes the ring's grown segments may hold together
    (see "Memory bound" in the module doc). ``spin_us`` is the busy-wait before sleeping.
    """

    def __init__(
        self,
        *,
        slots: int = 4,
        slot_bytes: int = 4 << 20,
        meta_bytes: int = 64 << 10,
        timeout: float | None = None,
        max_hop_bytes: int = DEFAULT_MAX_HOP_BYTES,
        grow_budget: int = DEFAULT_GROW_BUDGET,
        spin_us: float = DEFAULT_SPIN_US,
    ) -> None:
        for k, v, lo, hi in (
            ("slots", slots, 1, MAX_SLOTS),
            ("slot_bytes", slot_bytes, 1, 1 << 40),
            ("meta_bytes", meta_bytes, 0, MAX_META_BYTES),
            ("max_hop_bytes", max_hop_bytes, 0, 1 << 48),
            ("grow_budget", grow_budget, 0, 1 << 48),
        ):
            if type(v) is not int or not lo <= v <= hi:
                raise ValueError(f"RecvRing {k} must be an int in [{lo}, {hi}], got {v!r}")
        if timeout is not None:
            _deadline(timeout)
        sweep_stale()
        self.slots = slots
        self.timeout = timeout
        self.max_hop_bytes = max_hop_bytes
        self.grow_budget = grow_budget
        self.meta_bytes = meta_bytes
        self.spin_s = max(float(spin_us), 0.0) * 1e-6
        self._geo = geo = _Geometry.of(slots, slot_bytes, meta_bytes)
        self.slot_bytes = geo.slot_bytes
        self.name = _new_name()
        self._seg = seg = _Seg(_create(self.name, geo.total), geo)
        pid, start, _ = _me()
        ctl = seg.ctl
        for w, v in (
            (H_VERSION, VERSION),
            (H_SLOTS, slots),
            (H_SLOT_BYTES, geo.slot_bytes),
            (H_META_BYTES, meta_bytes),
            (H_QUEUE_OFF, geo.queue_off),
            (H_DESC_OFF, geo.desc_off),
            (H_META_OFF, geo.meta_off),
            (H_DATA_OFF, geo.data_off),
            (H_TOTAL, geo.total),
            (H_MAX_HOP, max_hop_bytes),
            (H_GROW_BUDGET, grow_budget),
            (H_RECV_PID, pid),
            (H_RECV_START, start),
            (H_RECV_STATE, OPEN),
        ):
            ctl[w] = v
        if _SPIN_INIT is not None and _SPIN_INIT(seg.lock_addr, _PTHREAD_PROCESS_SHARED) != 0:
            seg.close()
            _unlink(self.name)
            raise OSError(f"pthread_spin_init failed on shm ring {self.name}")
        ctl[H_MAGIC] = MAGIC
        self._next = 1
        self._held: dict[int, tuple[int, weakref.ref]] = {}
        self._ext: list[_Mapped | None] = [None] * slots
        self._retired = 0  # the sender's retire count as last acted on
        self._lock = threading.Lock()
        self._held_lock = threading.RLock()  # weakref callbacks may run inside wait()
        self._closed = False
        self._sender: tuple[int, int] | None = None
        self._ackn = 0
        self._me = weakref.ref(self)
        self._acks_addr = seg.base + 8 * H_ACKS
        self._fenced = 0  # a tail read before this end's last lock/unlock: hops up to it are safe
        self._deferred: list[tuple[int, int]] = []  # acks whose store found the lock held

    # -- peer state

    def _who(self) -> str:
        s = self._sender
        return f"sender pid {s[0]}" if s else "sender (not attached yet)"

    def _peer(self) -> tuple[int, int] | None:
        ctl = self._seg.ctl
        if self._sender is None and ctl[H_SEND_STATE] != 0:
            pid, start = ctl[H_SEND_PID], ctl[H_SEND_START]
            if not 0 < pid < 1 << 32:
                raise CorruptRing(f"shm ring {self.name}: sender pid field {pid} out of range")
            self._sender = (pid, start)
        return self._sender

    def _check(self, seq: int, what: str) -> None:
        ctl = self._seg.ctl
        if ctl[H_MAGIC] != MAGIC or ctl[H_SLOTS] != self.slots:
            raise CorruptRing(
                f"shm ring {self.name}: control block header overwritten "
                f"(magic/geometry) while {what}"
            )
        peer = self._peer()
        if peer is None:
            return
        if ctl[H_TAIL] >= seq:
            return
        if ctl[H_SEND_STATE] == CLOSED:
            raise PeerGone(
                f"shm ring {self.name}: {what}: sender pid {peer[0]} closed the ring "
                f"after hop seq {ctl[H_TAIL]}"
            )
        if not _alive(*peer):
            sweep_stale()
            raise PeerGone(
                f"shm ring {self.name}: {what}: sender pid {peer[0]} is gone "
                f"(process exited or was killed) after publishing hop seq "
                f"{ctl[H_TAIL]}"
            )

    # -- receiving

    def wait(self, timeout: float | None = None, *, what: str | None = None) -> Arrival:
        """The next hop in order. ``what`` names the step in errors (default ``hop seq N``)."""
        t = self.timeout if timeout is None else timeout
        if t is not None and not t >= 0:
            _check_timeout(t)
        with self._lock:
            if self._closed:
                raise RuntimeError(f"shm ring {self.name} is closed")
            if self._deferred:
                self._flush_deferred()
            seq = self._next
            if seq <= self._fenced:  # published before this end's last fence: readable now
                return self._take(seq, what)
            seg = self._seg
            ctl = seg.ctl
            seen = ctl[H_TAIL]
            if seen < seq:  # the tail is at seq - 1: any move of it publishes seq
                step = what or f"hop seq {seq}"
                if not _wait_change(
                    seg,
                    H_TAIL,
                    seen,
                    H_RWAIT,
                    _deadline(t),
                    self.spin_s,
                    lambda: self._check(seq, f"waiting for {step}"),
                ):
                    self._check(seq, f"waiting for {step}")
                    raise TimeoutError(
                        f"shm ring {self.name}: waiting for {step} from {self._who()} "
                        f"timed out after {t} s (last published seq {ctl[H_TAIL]}, "
                        f"this end holds {len(self._held)} of {self.slots} slots)"
                    )
            tail = ctl[H_TAIL]
            if not seg.fence(1.0):
                step = what or f"hop seq {seq}"
                peer = self._peer()
                if peer is not None and not _alive(*peer):
                    sweep_stale()
                    raise PeerGone(
                        f"shm ring {self.name}: reading {step}: sender pid {peer[0]} "
                        f"is gone (died holding the ring's spinlock)"
                    )
                raise CorruptRing(
                    f"shm ring {self.name}: spinlock held for over 1 s while "
                    f"reading {step} ({self._who()})"
                )
            self._fenced = tail if seq <= tail < seq + self.slots else 0  # else _take refuses it
            return self._take(seq, what)

    def _bad(self, seq: int, what: str | None, msg: str) -> CorruptRing:
        return CorruptRing(
            f"shm ring {self.name}: corrupt control block reading {what or f'hop seq {seq}'} "
            f"from {self._who()}: {msg}"
        )

    def _take(self, seq: int, what: str | None) -> Arrival:
        seg = self._seg
        ctl, desc, slots = seg.ctl, seg.desc, self.slots
        if self._sender is None:
            self._peer()
        tail = ctl[H_TAIL]
        if not seq <= tail < seq + slots:
            raise self._bad(seq, what, f"tail {tail} outside [{seq}, {seq - 1 + slots}]")
        slot = seg.queue[(seq - 1) % slots]
        if slot >= slots:
            raise self._bad(seq, what, f"queue entry names slot {slot} of {slots}")
        held = self._held
        if slot in held:
            raise self._bad(
                seq,
                what,
                f"queue entry names slot {slot}, still held by hop seq {held[slot][0]} on this end",
            )
        b = slot * _DW
        pub = desc[b + D_PUB]
        if pub != seq:
            raise self._bad(seq, what, f"slot {slot} carries seq {pub}")
        nbytes, mlen, ext = desc[b + D_NBYTES], desc[b + D_MLEN], desc[b + D_EXT_BYTES]
        if mlen > self.meta_bytes:
            raise self._bad(seq, what, f"meta length {mlen} > meta_bytes {self.meta_bytes}")
        if ctl[H_RETIRED] != self._retired:
            self._drop_retired()
        if ext == 0:
            if self._ext[slot] is not None:
                self._drop_ext(slot)
            view, cap = seg.view, self.slot_bytes
            off = self._geo.data_off + slot * cap
        else:
            m = self._ext_map(slot, desc[b + D_GEN], ext, seq, what)
            view, cap, off = m.view, m.cap, 0
        if nbytes > cap:
            raise self._bad(seq, what, f"payload length {nbytes} > slot {slot}'s {cap} bytes")
        moff = self._geo.meta_off + slot * self._geo.meta_bytes
        meta = seg.mm[moff : moff + mlen] if mlen else b""
        if nbytes == 0:
            payload = torch.empty(0, dtype=torch.uint8)
            self._next = seq + 1
            ctl[H_HEAD] = seq
            with self._held_lock:
                self._ack(slot, seq)
        else:
            mv = view[off : off + nbytes]
            payload = torch.frombuffer(mv, dtype=torch.uint8)
            me = self._me
            with self._held_lock:
                held[slot] = (seq, weakref.ref(mv, lambda _r, s=slot, q=seq: _on_dead(me, s, q)))
            del mv
            self._next = seq + 1
            ctl[H_HEAD] = seq
        return Arrival(seq, meta, payload, self, slot)

    def _ext_map(self, slot: int, gen: int, want: int, seq: int, what: str | None) -> _Mapped:
        have = self._ext[slot]
        if have is not None:
            if have.gen == gen:
                return have
            if gen < have.gen:
                raise self._bad(
                    seq, what, f"slot {slot}'s generation went back from {have.gen} to {gen}"
                )
        if not 0 < want <= _grow_size(self.max_hop_bytes):
            raise self._bad(
                seq, what, f"slot {slot} grown to {want} bytes, limit {self.max_hop_bytes}"
            )
        raw = self._seg.ext_name(slot)
        try:
            name = raw.decode("ascii")
            _path(name)
        except (UnicodeDecodeError, ValueError):
            raise self._bad(
                seq, what, f"slot {slot} names segment {raw!r}, not a pipepack name"
            ) from None
        peer = self._sender
        m = _NAME_RE.match(name)
        if peer is None or int(m.group(1)) != peer[0]:
            raise self._bad(
                seq, what, f"slot {slot}'s segment {name} was not created by the attached sender"
            )
        try:
            mm, size = _open(name)
        except FileNotFoundError:
            raise self._bad(seq, what, f"slot {slot}'s segment {name} does not exist") from None
        if size != want:
            mm.close()
            raise self._bad(
                seq, what, f"slot {slot}'s segment {name} has {size} bytes, descriptor says {want}"
            )
        _unlink(name)  # both ends have it mapped now
        self._drop_ext(slot)
        new = self._ext[slot] = _Mapped(gen, want, mm)
        return new

    def _drop_ext(self, slot: int) -> None:
        m, self._ext[slot] = self._ext[slot], None
        if m is not None:
            m.close()

    def _drop_retired(self) -> None:
        """The sender retired grown segments: unmap the ones this end still maps (a segment
        a live view reads goes with the last such view)."""
        seg = self._seg
        self._retired = seg.ctl[H_RETIRED]
        for slot, m in enumerate(self._ext):
            if m is not None and slot not in self._held and seg.desc[slot * _DW + D_GEN] != m.gen:
                self._drop_ext(slot)

    def _ack(self, slot: int, seq: int) -> None:
        """Gives hop ``seq``'s slot back to the sender; the caller holds ``_held_lock``.

        When the spinlock stays held for a second the ack is kept for the next ``wait()`` (a
        view's last reference can die inside this thread's own lock section, from a garbage
        collection there: spinning would never succeed, dropping the ack would lose the slot)."""
        if self._closed:
            return
        seg = self._seg
        n = self._ackn + 1
        waiting = seg.store2(seg.desc, slot * _DW + D_ACK, seq, seg.ctl, H_ACKS, n, H_SWAIT)
        if waiting < 0:
            self._deferred.append((slot, seq))
            return
        self._ackn = n
        if waiting:
            _futex_wake(self._acks_addr)

    def _flush_deferred(self) -> None:
        with self._held_lock:
            pending, self._deferred = self._deferred, []
            for slot, seq in pending:
                self._ack(slot, seq)

    def _free(self, slot: int, seq: int) -> None:
        with self._held_lock:
            held = self._held.get(slot)
            if held is not None and held[0] == seq:
                del self._held[slot]
                self._ack(slot, seq)

    def held(self) -> list[int]:
        """Seqs of the hops whose slots this end still holds (views alive)."""
        return sorted(s for s, _ in list(self._held.values()))

    def held_grown(self) -> tuple[int, int]:
        """``(slots held, bytes of grown segments among them)``: what this end's views keep out
        of the sender's reach (the grown bytes count against the ring's memory bound)."""
        desc = self._seg.desc
        slots = list(self._held)
        return len(slots), sum(desc[s * _DW + D_EXT_BYTES] for s in slots)

    def close(self) -> None:
        """Marks the ring closed and unlinks what it can; mappings stay until the last view."""
        with self._lock:
            if self._closed:
                return
            seg = self._seg
            try:
                seg.ctl[H_RECV_STATE] = CLOSED
                _futex_wake(self._acks_addr)
            except ValueError:
                pass
            self._closed = True
            _unlink(self.name)
            # grown segments published but never mapped here
            if seg.desc is not None and self._sender is not None:
                for slot in range(self.slots):
                    have = self._ext[slot]
                    if seg.d(slot, D_EXT_BYTES) and (
                        have is None or have.gen != seg.d(slot, D_GEN)
                    ):
                        try:
                            name = seg.ext_name(slot).decode("ascii")
                            m = _NAME_RE.match(name)
                            if m and int(m.group(1)) == self._sender[0]:
                                _unlink(name)
                        except (UnicodeDecodeError, ValueError):
                            pass
            self._held.clear()
            for slot in range(self.slots):
                self._drop_ext(slot)
            seg.close()
            sweep_stale()

    def __enter__(self) -> RecvRing:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            if not self._closed:
                self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass


def _on_dead(ring_ref: weakref.ref, slot: int, seq: int) -> None:
    ring = ring_ref()
    if ring is None:
        return
    try:
        ring._free(slot, seq)
    except Exception:  # noqa: BLE001 - runs inside a deallocation; never raise there
        pass


# ------------------------------------------------------------------------------------------------
# sending end


class Reservation:
    """A slot reserved for one hop: write exactly ``payload`` (uint8, ``nbytes`` long), then
    :meth:`SendRing.publish` it. ``seq`` is set by ``publish``."""

    __slots__ = ("payload", "nbytes", "seq", "_slot", "_ring", "_state")

    def __init__(self, payload: torch.Tensor, nbytes: int, slot: int, ring: SendRing) -> None:
        self.payload = payload
        self.nbytes = nbytes
        self.seq = 0
        self._slot = slot
        self._ring = ring
        self._state = "reserved"

    def __repr__(self) -> str:
        return f"Reservation({self.nbytes} bytes, slot {self._slot}, {self._state})"


class SendRing:
    """The sending end, attached to the receiver's ring by ``name``."""

    def __init__(
        self, name: str, *, timeout: float | None = None, spin_us: float = DEFAULT_SPIN_US
    ) -> None:
        if timeout is not None:
            _deadline(timeout)
        self.name = name
        self.timeout = timeout
        self.spin_s = max(float(spin_us), 0.0) * 1e-6
        mm, size = _open(name)
        seg = _Seg(mm)
        try:
            geo = self._validate(seg.ctl, size)
            seg.set_geo(geo)
            ctl = seg.ctl
            self.recv_pid, self._recv_start = ctl[H_RECV_PID], ctl[H_RECV_START]
            if ctl[H_RECV_STATE] != OPEN or not _alive(self.recv_pid, self._recv_start):
                raise PeerGone(f"shm ring {name}: receiver pid {self.recv_pid} is gone or closed")
            pid, start, _ = _me()
            if not seg.fence(1.0):
                raise CorruptRing(f"shm ring {name}: spinlock stuck while attaching")
            if ctl[H_SEND_STATE] != 0:
                raise RuntimeError(f"shm ring {name} already has a sender (pid {ctl[H_SEND_PID]})")
            seg.locked_store(
                [(ctl, H_SEND_PID, pid), (ctl, H_SEND_START, start), (ctl, H_SEND_STATE, OPEN)],
                time.monotonic() + 1.0,
            )
        except BaseException:
            seg.close()
            raise
        _unlink(name)  # both ends have it mapped
        self._seg = seg
        self._geo = geo
        self.slots = geo.slots
        self.slot_bytes = geo.slot_bytes
        self.meta_bytes = ctl[H_META_BYTES]
        self.max_hop_bytes = ctl[H_MAX_HOP]
        self.grow_budget = ctl[H_GROW_BUDGET]
        self._next = 1
        self._free = list(range(geo.slots))  # acknowledged and not reserved
        self._inflight: dict[int, int] = {}  # slot -> hop seq published there, not yet acked
        self._reserved: set[int] = set()
        self._caps = [geo.slot_bytes] * geo.slots  # bytes a hop may have in each slot
        self._ext: list[_Mapped | None] = [None] * geo.slots  # grown segments
        self._grown = 0  # their bytes together
        self._gen = [0] * geo.slots
        self._retired = 0
        self._fresh = [False] * geo.slots  # freed (ack seen) since this end's last lock/unlock
        # per slot: (n, the payload tensor of its last n-byte reservation), reused for n again
        self._pay: list[tuple[int, torch.Tensor] | None] = [None] * geo.slots
        self._lock = threading.Lock()
        self._closed = False
        self._last_check = time.monotonic()
        self._tail_addr = seg.base + 8 * H_TAIL

    @staticmethod
    def _validate(ctl: memoryview, size: int) -> _Geometry:
        name_ok = ctl[H_MAGIC] == MAGIC and ctl[H_VERSION] == VERSION
        if not name_ok:
            raise CorruptRing("shm segment is not a pipepack ring of this version")
        slots, slot_b, meta_b = ctl[H_SLOTS], ctl[H_SLOT_BYTES], ctl[H_META_BYTES]
        if not (
            1 <= slots <= MAX_SLOTS
            and 0 < slot_b <= 1 << 40
            and slot_b % PAGE == 0
            and meta_b <= MAX_META_BYTES
            and ctl[H_GROW_BUDGET] <= 1 << 48
        ):
            raise CorruptRing(
                f"shm ring geometry out of range: slots={slots} slot_bytes={slot_b} "
                f"meta_bytes={meta_b} grow_budget={ctl[H_GROW_BUDGET]}"
            )
        geo = _Geometry.of(slots, slot_b, meta_b)
        got = (ctl[H_QUEUE_OFF], ctl[H_DESC_OFF], ctl[H_META_OFF], ctl[H_DATA_OFF], ctl[H_TOTAL])
        want = (geo.queue_off, geo.desc_off, geo.meta_off, geo.data_off, geo.total)
        if got != want or size != geo.total:
            raise CorruptRing(
                f"shm ring layout {got} (file {size} bytes) does not match its geometry {want}"
            )
        return geo

    # -- peer state

    def _check(self, what: str) -> None:
        ctl = self._seg.ctl
        if ctl[H_RECV_STATE] == CLOSED:
            raise PeerGone(
                f"shm ring {self.name}: {what}: receiver pid {self.recv_pid} closed the ring"
            )
        self._last_check = time.monotonic()
        if not _alive(self.recv_pid, self._recv_start):
            self._unlink_pending()
            sweep_stale()
            raise PeerGone(
                f"shm ring {self.name}: {what}: receiver pid {self.recv_pid} is gone "
                f"(process exited or was killed)"
            )

    # -- slots and grown segments

    def _refresh(self) -> None:
        """Moves the slots whose hops the receiver acknowledged to the free list."""
        inflight = self._inflight
        if not inflight:
            return
        desc = self._seg.desc
        for s, q in list(inflight.items()):
            if desc[s * _DW + D_ACK] == q:
                del inflight[s]
                self._free.append(s)
                self._fresh[s] = True
                m = self._ext[s]
                if m is not None:
                    m.name = ""  # the receiver took a hop in it: mapped and unlinked there

    def _cls(self, n: int) -> int:
        """Bytes of the segment a slot grows to for an ``n``-byte hop."""
        return min(_grow_size(n), max(_grow_size(self.max_hop_bytes), n))

    def _bound(self, n: int) -> tuple[int, int]:
        """(segment class of an ``n``-byte hop or 0 when it fits a slot inline, the bytes all
        grown segments may hold while reserving it: see "Memory bound" in the module doc)."""
        c = self._cls(n) if n > self.slot_bytes else 0
        m = c
        free, caps, ext = self._free, self._caps, self._ext
        for s in range(self.slots):
            if ext[s] is not None and caps[s] > m and s not in free:
                m = caps[s]
        return c, max(self.grow_budget, 2 * m)

    def _plan(self, n: int) -> tuple[int, Sequence[int], int] | None:
        """Where an ``n``-byte hop goes: (slot, grown segments to retire first, bytes of the new
        segment the slot gets or 0); None while it must wait for the receiver."""
        free, caps = self._free, self._caps
        if not free:
            return None
        if self._grown <= self.grow_budget:  # within the budget: nothing to retire
            best, bc = -1, 0
            for s in free:
                c = caps[s]
                if c >= n and (best < 0 or c < bc):
                    best, bc = s, c
            if best >= 0:
                return best, (), 0
        ext = self._ext
        c, bound = self._bound(n)
        fits = [s for s in free if caps[s] >= n and (ext[s] is None or caps[s] <= bound)]
        total = self._grown
        retire: list[int] = []
        if fits:
            slot, new = min(fits, key=caps.__getitem__), 0
        else:  # the largest free slot gets a segment of the hop's class (or goes back inline)
            slot, new = max(free, key=caps.__getitem__), c
            if ext[slot] is not None:
                retire.append(slot)
                total -= caps[slot]
            total += new
        for s in sorted(free, key=caps.__getitem__, reverse=True):
            if total <= bound:
                break
            if s != slot and ext[s] is not None:
                retire.append(s)
                total -= caps[s]
        if new and total > bound:
            return None
        return slot, retire, new

    def _retire(self, slot: int) -> None:
        """The slot (free) drops its grown segment and is an inline slot again."""
        m = self._ext[slot]
        seg = self._seg
        gen = self._gen[slot] + 1
        seg.set_d(slot, D_EXT_BYTES, 0)
        seg.set_ext_name(slot, "")
        seg.set_d(slot, D_GEN, gen)
        self._gen[slot] = gen
        self._ext[slot] = None
        self._pay[slot] = None
        self._caps[slot] = self.slot_bytes
        self._grown -= m.cap
        self._retired += 1
        seg.ctl[H_RETIRED] = self._retired
        if m.name:  # never reached the receiver
            _unlink(m.name)
        m.close()

    def _grow(self, slot: int, cap: int) -> None:
        """The slot (free, inline) gets a segment of ``cap`` bytes of its own."""
        name = _new_name()
        mm = _create(name, cap)
        gen = self._gen[slot] + 1
        seg = self._seg
        seg.set_d(slot, D_EXT_BYTES, cap)
        seg.set_ext_name(slot, name)
        seg.set_d(slot, D_GEN, gen)
        self._gen[slot] = gen
        self._ext[slot] = _Mapped(gen, cap, mm, name)
        self._pay[slot] = None
        self._caps[slot] = cap
        self._grown += cap

    def _step(self, n: int, what: str | None) -> str:
        return what or f"reserving {n} bytes for hop seq {self._next}"

    def reserve(
        self,
        payload_nbytes: int,
        timeout: float | None = None,
        *,
        what: str | None = None,
        wait: bool = True,
    ) -> Reservation | None:
        """Waits (bounded) for a free slot that fits ``payload_nbytes``; a slot grows when none
        does, within the ring's memory bound. Raises TimeoutError naming how many slots the
        receiver still holds. ``wait=False``: returns None at once instead of waiting."""
        n = payload_nbytes
        if type(n) is not int or n < 0:
            raise ValueError(f"payload_nbytes must be a non-negative int, got {n!r}")
        if n > self.max_hop_bytes:
            raise ValueError(
                f"shm ring {self.name}: a hop of {n} bytes exceeds the receiver's "
                f"limit of {self.max_hop_bytes} bytes"
            )
        t = self.timeout if timeout is None else timeout
        if t is not None and not t >= 0:
            _check_timeout(t)
        with self._lock:
            if self._closed:
                raise RuntimeError(f"shm ring {self.name} is closed (sender side)")
            if (
                self._seg.ctl[H_RECV_STATE] == CLOSED
                or time.monotonic() - self._last_check >= _LIVENESS_PERIOD_S
            ):
                self._check(self._step(n, what))
            if self._inflight:
                self._refresh()
            plan = self._plan(n)
            if plan is None and not wait:
                if not self._seg.fence(1.0):
                    step = self._step(n, what)
                    self._check(step)
                    raise CorruptRing(f"shm ring {self.name}: spinlock held for over 1 s ({step})")
                self._refresh()
                plan = self._plan(n)
                if plan is None:
                    return None
            if plan is None:
                plan = self._wait_plan(n, t, what)
            slot, retire, new = plan
            seg = self._seg
            fresh = self._fresh
            if fresh[slot] or (retire and any(fresh[s] for s in retire)):
                # the receiver's acks seen so far happen before this end's writes to the slots
                if not seg.fence(1.0):
                    step = self._step(n, what)
                    self._check(step)
                    raise CorruptRing(f"shm ring {self.name}: spinlock held for over 1 s ({step})")
                self._fresh = [False] * self.slots
            for s in retire:
                self._retire(s)
            if new:
                self._grow(slot, new)
            pay = self._pay[slot]
            if pay is not None and pay[0] == n:  # the same bytes as the slot's last hop
                payload = pay[1]
            else:
                m = self._ext[slot]
                if n == 0:
                    payload = torch.empty(0, dtype=torch.uint8)
                elif m is None:
                    off = self._geo.data_off + slot * self.slot_bytes
                    payload = torch.frombuffer(seg.view[off : off + n], dtype=torch.uint8)
                else:
                    payload = torch.frombuffer(m.view[:n], dtype=torch.uint8)
                self._pay[slot] = (n, payload)
            self._free.remove(slot)
            self._reserved.add(slot)
            return Reservation(payload, n, slot, self)

    def _wait_plan(
        self, n: int, t: float | None, what: str | None
    ) -> tuple[int, Sequence[int], int]:
        """Waits for the receiver's acknowledgements until the hop has a place (see _plan)."""
        step = self._step(n, what)
        deadline = _deadline(t)
        seg = self._seg
        ctl = seg.ctl
        while True:
            seen = ctl[H_ACKS]
            if not seg.fence(1.0):
                self._check(step)
                raise CorruptRing(f"shm ring {self.name}: spinlock held for over 1 s ({step})")
            self._refresh()  # every acknowledgement up to `seen` is visible after the fence
            plan = self._plan(n)
            if plan is not None:
                return plan
            if not _wait_change(
                seg, H_ACKS, seen, H_SWAIT, deadline, self.spin_s, lambda: self._check(step)
            ):
                self._check(step)
                if ctl[H_ACKS] != seen:
                    continue
                held = sorted(self._inflight.values())
                msg = (
                    f"shm ring {self.name}: {step} timed out after {t} s: the receiver (pid "
                    f"{self.recv_pid}) still holds {len(held)} of {self.slots} slots (hop seqs "
                    f"{held}; it has taken up to hop seq {ctl[H_HEAD]}), "
                    f"{len(self._reserved)} reserved unpublished on this end"
                )
                if self._free:
                    c, bound = self._bound(n)
                    busy = sum(
                        m.cap
                        for s, m in enumerate(self._ext)
                        if m is not None and s not in self._free
                    )
                    msg += (
                        f"; a free slot would need a segment of {c} bytes, which next to the "
                        f"{busy} bytes of grown segments in flight exceeds the ring's memory "
                        f"bound of {bound} bytes (grow_budget {self.grow_budget})"
                    )
                raise TimeoutError(msg)

    def publish(self, r: Reservation, meta: bytes = b"") -> None:
        """Makes the hop visible: meta, lengths and queue entry, then seq (see module doc)."""
        if type(meta) is not bytes:
            meta = bytes(meta)
        with self._lock:
            if r._ring is not self or r._state != "reserved":
                raise ValueError(f"{r!r} is not an open reservation of this ring")
            mlen = len(meta)
            if mlen > self.meta_bytes:
                raise ValueError(
                    f"meta of {mlen} bytes exceeds the ring's meta_bytes {self.meta_bytes}"
                )
            seg, slot, seq = self._seg, r._slot, self._next
            if (
                seg.ctl[H_RECV_STATE] == CLOSED
                or time.monotonic() - self._last_check >= _LIVENESS_PERIOD_S
            ):
                self._check(f"publishing hop seq {seq}")
            if mlen:
                moff = self._geo.meta_off + slot * self._geo.meta_bytes
                seg.mm[moff : moff + mlen] = meta
            desc, b = seg.desc, slot * _DW
            desc[b + D_NBYTES] = r.nbytes
            desc[b + D_MLEN] = mlen
            seg.queue[(seq - 1) % self.slots] = slot
            waiting = seg.store2(desc, b + D_PUB, seq, seg.ctl, H_TAIL, seq, H_RWAIT)
            if waiting < 0:
                step = f"publishing hop seq {seq}"
                self._check(step)
                raise CorruptRing(f"shm ring {self.name}: spinlock held for over 1 s ({step})")
            self._inflight[slot] = seq
            self._reserved.discard(slot)
            self._next = seq + 1
            r.seq = seq
            r._state = "published"
            if waiting:
                _futex_wake(self._tail_addr)

    def cancel(self, r: Reservation) -> None:
        """Gives back a reserved, unpublished slot."""
        with self._lock:
            if r._ring is self and r._state == "reserved":
                self._reserved.discard(r._slot)
                self._free.append(r._slot)
                r._state = "cancelled"
                r.payload = None

    def _unlink_pending(self) -> None:
        for m in self._ext:
            if m is not None and m.name:
                _unlink(m.name)

    def _linger(self, seconds: float) -> None:
        """Waits (bounded) until the receiver has mapped every grown segment of a published hop:
        it unlinks each one as it maps it, so a sender that closes right after its last publish
        does not take that hop with it."""
        deadline = time.monotonic() + seconds
        peer = (self.recv_pid, self._recv_start)
        while time.monotonic() < deadline and _alive(*peer):
            pending = [
                m.name
                for s, m in enumerate(self._ext)
                if m is not None
                and m.name
                and s in self._inflight
                and os.path.exists(_path(m.name))
            ]
            if not pending:
                return
            time.sleep(0.002)

    def close(self, linger: float = 0.0) -> None:
        """Closes this end. ``linger``: seconds to wait for the receiver to map the grown
        segments of hops already published (the link passes its exit-flush bound)."""
        if linger > 0 and not self._closed:
            try:
                self._linger(linger)
            except Exception:  # noqa: BLE001 - closing anyway
                pass
        with self._lock:
            if self._closed:
                return
            self._closed = True
            seg = self._seg
            try:
                seg.ctl[H_SEND_STATE] = CLOSED
                seg.fence(0.1)
                _futex_wake(self._tail_addr)
            except ValueError:
                pass
            self._unlink_pending()
            self._pay = [None] * self.slots
            for m in self._ext:
                if m is not None:
                    m.close()
            self._ext = [None] * self.slots
            seg.close()
            sweep_stale()

    def __enter__(self) -> SendRing:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            if not self._closed:
                self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass
