"""Shared-memory ring (pipepack.pp.shm): bytes, order, slot lifetime, back-pressure, growth,
dead peers, cleanup of /dev/shm, and refusal of corrupt control blocks."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import time
import traceback

import numpy as np
import pytest
import torch

from pipepack.pp import shm

pytestmark = pytest.mark.skipif(not shm.available(), reason="POSIX shared memory not usable")

CANARY = 0xA5
CTX = mp.get_context("fork")


def _mine(*pids: int) -> list[str]:
    """Segments under /dev/shm created by any of ``pids``."""
    pre = tuple(f"pipepack-{p}-" for p in pids)
    return sorted(f for f in os.listdir("/dev/shm") if f.startswith(pre))


def _pattern(seq: int, n: int) -> np.ndarray:
    return ((np.arange(n, dtype=np.int64) * 131 + seq * 7919) % 251).astype(np.uint8)


def _send(tx: shm.SendRing, seq: int, n: int, timeout: float | None = 10.0) -> None:
    r = tx.reserve(n, timeout)
    assert r.payload.dtype == torch.uint8 and r.payload.shape == (n,)
    shm.copy_bytes(r.payload, torch.from_numpy(_pattern(seq, n)))
    tx.publish(r, f"{seq}:{n}".encode())


def _check(a: shm.Arrival, seq: int, n: int) -> None:
    assert a.seq == seq
    assert a.meta == f"{seq}:{n}".encode()
    assert a.payload.dtype == torch.uint8 and a.payload.dim() == 1 and a.payload.numel() == n
    np.testing.assert_array_equal(a.payload.numpy(), _pattern(seq, n))


def _child(fn, *args) -> tuple[mp.Process, mp.connection.Connection]:
    """Runs ``fn(conn, *args)`` in a forked process; the child reports through ``conn``."""
    parent, child = CTX.Pipe()

    def main() -> None:
        torch.set_num_threads(1)
        try:
            fn(child, *args)
            child.send(("done", None))
        except BaseException as e:  # noqa: BLE001 - reported to the test
            child.send(("error", f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))
        finally:
            child.close()
            os._exit(0)

    p = CTX.Process(target=main, daemon=True)
    p.start()
    child.close()
    return p, parent


def _expect(conn, tag: str, timeout: float = 30.0):
    assert conn.poll(timeout), f"child sent nothing for {timeout} s (waiting for {tag!r})"
    got, value = conn.recv()
    if got == "error":
        pytest.fail(f"child failed: {value}")
    assert got == tag, (got, value)
    return value


def _reap(p: mp.Process) -> None:
    p.join(10)
    if p.is_alive():
        p.kill()
        p.join(5)


# ------------------------------------------------------------------------------------------------


def test_available_and_host_identity_match_across_fork() -> None:
    ident = shm.host_identity()
    with open("/proc/sys/kernel/random/boot_id", "rb") as f:
        assert f.read().strip() in ident
    assert os.uname().nodename.encode() in ident

    def child(conn) -> None:
        conn.send(("ident", shm.host_identity()))

    p, conn = _child(child)
    assert _expect(conn, "ident") == ident
    _expect(conn, "done")
    _reap(p)


def test_bytes_exact_with_canaries_around_every_slot() -> None:
    slots, slot_bytes, meta_bytes = 4, 3 * 4096, 256
    rx = shm.RecvRing(slots=slots, slot_bytes=slot_bytes, meta_bytes=meta_bytes, timeout=10)
    seg, geo = rx._seg, rx._geo
    # canaries over every meta and data area before anything is written
    seg.mm[geo.meta_off : geo.total] = bytes([CANARY]) * (geo.total - geo.meta_off)
    sizes = [1, 63, 4097, slot_bytes]  # one hop per slot, all held

    def child(conn, name) -> None:
        tx = shm.SendRing(name, timeout=10)
        for i, n in enumerate(sizes):
            _send(tx, i + 1, n)
        conn.send(("sent", None))
        conn.recv()
        tx.close()

    p, conn = _child(child, rx.name)
    _expect(conn, "sent")
    arrivals = [rx.wait() for _ in sizes]
    lo, hi = seg.base + geo.data_off, seg.base + geo.total
    used = set()
    for i, (a, n) in enumerate(zip(arrivals, sizes)):
        _check(a, i + 1, n)
        ptr = a.payload.data_ptr()
        assert ptr % 64 == 0 and lo <= ptr and ptr + n <= hi  # zero-copy, inside the ring
        assert a.payload.untyped_storage().nbytes() == n  # its own storage, exactly the hop
        slot = (ptr - lo) // geo.slot_bytes
        used.add(slot)
        data = np.frombuffer(seg.mm, np.uint8, geo.slot_bytes, geo.data_off + slot * geo.slot_bytes)
        assert (data[n:] == CANARY).all(), f"slot {slot}: bytes past the {n}-byte hop changed"
        mlen = len(a.meta)
        meta = np.frombuffer(seg.mm, np.uint8, geo.meta_bytes, geo.meta_off + slot * geo.meta_bytes)
        assert bytes(meta[:mlen]) == a.meta and (meta[mlen:] == CANARY).all()
    assert used == set(range(slots))
    conn.send("go")
    _expect(conn, "done")
    _reap(p)
    rx.close()


@pytest.mark.parametrize("grow_budget", [shm.DEFAULT_GROW_BUDGET, 0])
def test_order_and_bytes_over_thousands_of_hops_with_growth(grow_budget: int) -> None:
    """grow_budget 0: at most two hops' worth of grown segments, so slots grow, are retired and
    grow again all the time while the receiver holds an old view (and the current one only with
    the default budget)."""
    hops, slot_bytes = 3000, 16 << 10
    rng = np.random.default_rng(0)
    sizes = rng.integers(0, 3 * slot_bytes, hops).tolist()
    sizes[::97] = [0] * len(sizes[::97])
    sizes[5] = 1 << 20
    rx = shm.RecvRing(
        slots=3, slot_bytes=slot_bytes, meta_bytes=64, timeout=30, grow_budget=grow_budget
    )

    def child(conn, name) -> None:
        tx = shm.SendRing(name, timeout=30)
        for i, n in enumerate(sizes):
            _send(tx, i + 1, int(n), timeout=30)
        tx.close()

    p, conn = _child(child, rx.name)
    keep = []
    for i, n in enumerate(sizes):
        a = rx.wait()
        _check(a, i + 1, int(n))
        if i % 500 == 0:
            keep.append((a.payload[: min(n, 64)].clone(), a.payload[: min(n, 64)]))
        keep = keep[-1:]  # at most one old view held across later hops
        if not grow_budget:
            del a  # holding two hops while waiting for a third could exceed the bound: blocks
    for want, view in keep:
        assert torch.equal(want, view)
    _expect(conn, "done")
    _reap(p)
    rx.close()
    assert _mine(os.getpid(), p.pid) == []


def test_slot_reused_only_after_every_view_and_storage_died() -> None:
    rx = shm.RecvRing(slots=2, slot_bytes=4096, meta_bytes=64, timeout=10)
    tx = shm.SendRing(rx.name, timeout=10)
    _send(tx, 1, 1000)
    _send(tx, 2, 2000)
    a1, a2 = rx.wait(), rx.wait()
    view = a1.payload[100:300]  # a view of hop 1
    storage = a2.payload.untyped_storage()  # only the storage of hop 2
    del a1, a2
    assert rx.held() == [1, 2]
    with pytest.raises(TimeoutError, match=r"still holds 2 of 2 slots"):
        tx.reserve(10, 0.2)
    del storage  # hop 2's slot is free now; hop 1's is not
    assert rx.held() == [1]
    for seq in range(3, 23):
        _send(tx, seq, 3000 + seq, timeout=0.5)
        _check(rx.wait(), seq, 3000 + seq)  # the arrival dies at once: its slot comes back
    np.testing.assert_array_equal(view.numpy(), _pattern(1, 1000)[100:300])
    with pytest.raises(TimeoutError, match=r"still holds 2 of 2 slots \(hop seqs \[1, 23\];"):
        _send(tx, 23, 10, timeout=0)
        _send(tx, 24, 10, timeout=0.2)
    del view
    _send(tx, 24, 10, timeout=0.5)
    _check(rx.wait(), 23, 10)
    _check(rx.wait(), 24, 10)
    # explicit release: force frees the slot though a view is alive
    _send(tx, 25, 10)
    a = rx.wait()
    keep = a.payload[:5]
    a.release(force=True)
    assert rx.held() == []
    del keep
    tx.close()
    rx.close()


def test_storage_only_survives_later_hops_with_its_own_bytes() -> None:
    rx = shm.RecvRing(slots=3, slot_bytes=8192, meta_bytes=64, timeout=10)
    tx = shm.SendRing(rx.name, timeout=10)
    _send(tx, 1, 5000)
    st = rx.wait().payload.untyped_storage()
    for seq in range(2, 40):
        _send(tx, seq, 5000)
        _check(rx.wait(), seq, 5000)
    back = torch.empty(0, dtype=torch.uint8).set_(st)
    np.testing.assert_array_equal(back.numpy(), _pattern(1, 5000))
    tx.close()
    rx.close()


def test_wait_timeouts_name_step_and_peer() -> None:
    rx = shm.RecvRing(slots=2, slot_bytes=4096, timeout=0.2)
    t0 = time.monotonic()
    with pytest.raises(TimeoutError, match=r"hop seq 1 from sender \(not attached yet\)"):
        rx.wait()
    assert time.monotonic() - t0 < 5
    tx = shm.SendRing(rx.name)
    with pytest.raises(TimeoutError, match=rf"decode step 7 from sender pid {os.getpid()}"):
        rx.wait(0.1, what="decode step 7")
    with pytest.raises(ValueError, match="timeout"):
        rx.wait(-1)
    tx.close()
    rx.close()


def test_backpressure_sender_waits_then_proceeds() -> None:
    rx = shm.RecvRing(slots=2, slot_bytes=4096, timeout=10)

    def child(conn, name) -> None:
        tx = shm.SendRing(name)
        _send(tx, 1, 10)
        _send(tx, 2, 10)
        t0 = time.monotonic()
        try:
            tx.reserve(10, 0.3)
        except TimeoutError as e:
            conn.send(("timeout", (str(e), time.monotonic() - t0)))
        t0 = time.monotonic()
        _send(tx, 3, 10, timeout=10)  # the parent frees a slot after ~0.3 s
        conn.send(("waited", time.monotonic() - t0))
        tx.close()

    p, conn = _child(child, rx.name)
    msg, took = _expect(conn, "timeout")
    assert f"receiver (pid {os.getpid()}) still holds 2 of 2 slots" in msg
    assert 0.25 <= took < 5
    a1 = rx.wait()
    a2 = rx.wait()
    time.sleep(0.3)
    del a1
    waited = _expect(conn, "waited")
    assert waited >= 0.2  # it did wait for the slot
    _check(rx.wait(), 3, 10)
    del a2
    _expect(conn, "done")
    _reap(p)
    rx.close()


def test_oversize_hop_grows_a_slot_and_leaves_no_segment() -> None:
    rx = shm.RecvRing(slots=2, slot_bytes=4096, meta_bytes=64, timeout=10)
    tx = shm.SendRing(rx.name, timeout=10)
    sizes = [(1 << 20) + 3, 100, (3 << 20) + 5, 4096, (1 << 20) + 3, 1]
    lo, hi = rx._seg.base + rx._geo.data_off, rx._seg.base + rx._geo.total
    for i, n in enumerate(sizes):
        _send(tx, i + 1, n)
        a = rx.wait()
        _check(a, i + 1, n)
        ptr = a.payload.data_ptr()
        assert ptr % 64 == 0
        # small hops stay in the inline slot, big ones in the grown one
        assert (lo <= ptr < hi) == (n <= 4096), (n, ptr - lo)
        assert _mine(os.getpid()) == []  # grown segments are unlinked once mapped
        del a
    with pytest.raises(ValueError, match="exceeds the receiver's limit"):
        rx2 = shm.RecvRing(slots=1, slot_bytes=4096, max_hop_bytes=1 << 16)
        tx2 = shm.SendRing(rx2.name)
        try:
            tx2.reserve((1 << 16) + 1, 1)
        finally:
            tx2.close()
            rx2.close()
    tx.close()
    rx.close()
    assert _mine(os.getpid()) == []


def _grown_mapped(*exclude: str) -> dict[int, int]:
    """inode -> bytes of every pipepack segment this process maps (each counted once, however
    many mappings), except the named ones."""
    out: dict[int, int] = {}
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split()
            if len(parts) < 6 or "/pipepack-" not in parts[5]:
                continue
            if any(x in parts[5] for x in exclude):
                continue
            lo, hi = (int(v, 16) for v in parts[0].split("-"))
            inode = int(parts[4])
            out[inode] = max(out.get(inode, 0), hi - lo)
    return out


def test_grown_segments_stay_within_the_memory_bound() -> None:
    """Varying big hops while the receiver keeps the previous one: what both ends map never
    exceeds max(grow_budget, 2 x the largest hop's class), and every byte arrives."""
    budget = 1 << 20
    rx = shm.RecvRing(slots=4, slot_bytes=4096, meta_bytes=64, timeout=10, grow_budget=budget)
    tx = shm.SendRing(rx.name, timeout=10)
    rng = np.random.default_rng(3)
    sizes = rng.integers(100 << 10, 512 << 10, 200).tolist()
    prev = None
    peak = 0
    for i, n in enumerate(sizes):
        _send(tx, i + 1, int(n))
        a = rx.wait()
        _check(a, i + 1, int(n))
        peak = max(peak, sum(_grown_mapped(rx.name).values()))
        assert tx._grown <= max(budget, 2 * shm._grow_size(512 << 10))
        prev = a  # held while the next hop is sent and received
    assert prev is not None
    assert peak <= budget, peak
    del a, prev
    tx.close()
    rx.close()
    assert _grown_mapped() == {}
    assert _mine(os.getpid()) == []


def test_big_hop_leaves_no_segment_behind_once_released() -> None:
    """A hop far above the budget is possible while the receiver holds it, and a smaller hop
    still goes through next to it; once released, the next reservation retires its segment and
    the receiver unmaps it at its next hop."""
    budget = 256 << 10
    rx = shm.RecvRing(slots=3, slot_bytes=4096, meta_bytes=64, timeout=10, grow_budget=budget)
    tx = shm.SendRing(rx.name, timeout=10)
    big = 4 << 20
    _send(tx, 1, big)
    a = rx.wait()
    _check(a, 1, big)
    assert sorted(_grown_mapped(rx.name).values()) == [big]
    _send(tx, 2, 100 << 10, timeout=0.5)  # next to the held 4 MiB: within 2 x 4 MiB
    b = rx.wait()
    _check(b, 2, 100 << 10)
    _check(a, 1, big)
    del a, b
    _send(tx, 3, 100 << 10, timeout=0.5)
    _check(rx.wait(), 3, 100 << 10)
    assert max(_grown_mapped(rx.name).values()) < budget  # the 4 MiB segment is gone, both ends
    assert tx._grown <= budget
    tx.close()
    rx.close()
    assert _grown_mapped() == {}
    assert _mine(os.getpid()) == []


def test_memory_bound_back_pressure_then_proceeds() -> None:
    """grow_budget 0: two 1 MiB hops may be in flight, a third waits for a release (with a
    timeout that says so) although slots are free, and goes through once one is released."""
    rx = shm.RecvRing(slots=4, slot_bytes=4096, meta_bytes=64, timeout=10, grow_budget=0)
    tx = shm.SendRing(rx.name, timeout=10)
    n = 1 << 20
    _send(tx, 1, n)
    _send(tx, 2, n)
    a1, a2 = rx.wait(), rx.wait()
    with pytest.raises(TimeoutError, match=r"still holds 2 of 4 slots.*memory bound of 2097152"):
        tx.reserve(n, 0.2)
    _send(tx, 3, 1000, timeout=0.5)  # a hop that fits a slot inline is not held back
    _check(rx.wait(), 3, 1000)
    del a1
    _send(tx, 4, n, timeout=0.5)
    _check(a2, 2, n)  # hop 4 went elsewhere than the held hop 2
    _check(rx.wait(), 4, n)
    del a2
    tx.close()
    rx.close()
    assert _mine(os.getpid()) == []


def test_memory_bound_back_pressure_across_processes() -> None:
    """The sender (a child) waits on the bound until the receiver releases a hop."""
    rx = shm.RecvRing(slots=4, slot_bytes=4096, meta_bytes=64, timeout=10, grow_budget=0)
    n = 1 << 20

    def child(conn, name) -> None:
        tx = shm.SendRing(name, timeout=10)
        for seq in (1, 2):
            _send(tx, seq, n)
        t0 = time.monotonic()
        _send(tx, 3, n, timeout=10)  # waits: the parent holds hops 1 and 2
        conn.send(("waited", time.monotonic() - t0))
        tx.close(linger=5)

    p, conn = _child(child, rx.name)
    a1, a2 = rx.wait(), rx.wait()
    time.sleep(0.3)
    del a1
    waited = _expect(conn, "waited")
    assert waited >= 0.2
    _check(rx.wait(), 3, n)
    _check(a2, 2, n)
    del a2
    _expect(conn, "done")
    _reap(p)
    rx.close()
    assert _mine(os.getpid(), p.pid) == []


def test_views_of_a_force_released_hop_outlive_its_retired_segment() -> None:
    rx = shm.RecvRing(slots=2, slot_bytes=4096, meta_bytes=64, timeout=10, grow_budget=0)
    tx = shm.SendRing(rx.name, timeout=10)
    n = 300 << 10
    _send(tx, 1, n)
    a = rx.wait()
    view = a.payload[1000:2000]
    a.release(force=True)
    del a
    for seq in range(2, 6):  # inline hops: the free grown segment is retired at once
        _send(tx, seq, 100)
        _check(rx.wait(), seq, 100)
    assert tx._grown == 0 and rx._ext == [None, None]
    np.testing.assert_array_equal(view.numpy(), _pattern(1, n)[1000:2000])
    assert len(_grown_mapped(rx.name)) == 1  # the view's mapping only
    del view
    assert _grown_mapped(rx.name) == {}
    tx.close()
    rx.close()


def _one_way(conn, name, gap_s: float, hops: int) -> None:
    tx = shm.SendRing(name, timeout=10)
    for _ in range(hops):
        time.sleep(gap_s)
        r = tx.reserve(8)
        tx.publish(r, time.perf_counter_ns().to_bytes(8, "little"))
    tx.close()


def test_a_sleeping_receiver_is_woken_at_once() -> None:
    """No spin: the receiver sleeps on the futex before every hop; the wake-up is not lost (a lost
    one costs a MAX_SLEEP_S nap)."""
    rx = shm.RecvRing(slots=2, slot_bytes=4096, timeout=10, spin_us=0)
    p, conn = _child(_one_way, rx.name, 0.03, 20)
    lat = []
    for _ in range(20):
        a = rx.wait()
        lat.append((time.perf_counter_ns() - int.from_bytes(a.meta, "little")) / 1e9)
        del a
    _expect(conn, "done")
    _reap(p)
    rx.close()
    assert sorted(lat)[len(lat) // 2] < shm.MAX_SLEEP_S / 4, lat


def test_a_sleeping_sender_is_woken_at_once() -> None:
    """No spin: a sender waiting for a slot sleeps on the futex; each release wakes it."""
    rx = shm.RecvRing(slots=1, slot_bytes=4096, timeout=10)

    def child(conn, name) -> None:
        tx = shm.SendRing(name, timeout=10, spin_us=0)
        lat = []
        for seq in range(1, 12):
            _send(tx, seq, 10)  # waits for the parent to drop hop seq - 1
            lat.append(time.perf_counter_ns())
        conn.send(("lat", lat))
        tx.close()

    p, conn = _child(child, rx.name)
    dropped = []
    for seq in range(1, 12):
        a = rx.wait()
        _check(a, seq, 10)
        time.sleep(0.03)
        dropped.append(time.perf_counter_ns())
        del a
    lat = _expect(conn, "lat")
    _expect(conn, "done")
    _reap(p)
    rx.close()
    delays = sorted((w - d) / 1e9 for w, d in zip(lat[1:], dropped[:-1]))
    assert delays[len(delays) // 2] < shm.MAX_SLEEP_S / 4, delays


def test_close_unlinks_and_views_outlive_close() -> None:
    rx = shm.RecvRing(slots=2, slot_bytes=4096)
    assert _mine(os.getpid()) == [rx.name]
    rx.close()
    assert _mine(os.getpid()) == []
    rx = shm.RecvRing(slots=2, slot_bytes=4096, timeout=5)
    tx = shm.SendRing(rx.name, timeout=5)
    assert _mine(os.getpid()) == []  # unlinked as soon as both ends mapped it
    _send(tx, 1, 3000)
    _send(tx, 2, 1 << 20)  # grown, published, never received: the closes unlink it
    a = rx.wait()
    tx.close()
    rx.close()
    _check(a, 1, 3000)  # the mapping lives as long as a view
    assert _mine(os.getpid()) == []
    with pytest.raises(RuntimeError, match="closed"):
        rx.wait(0.1)


def test_sender_close_is_reported_after_the_last_hop() -> None:
    rx = shm.RecvRing(slots=2, slot_bytes=4096, timeout=5)
    tx = shm.SendRing(rx.name)
    _send(tx, 1, 10)
    tx.close()
    _check(rx.wait(), 1, 10)
    with pytest.raises(shm.PeerGone, match="closed the ring after hop seq 1"):
        rx.wait()
    rx.close()


def test_receiver_close_is_reported_to_a_waiting_sender() -> None:
    rx = shm.RecvRing(slots=1, slot_bytes=4096)
    tx = shm.SendRing(rx.name)
    _send(tx, 1, 10)
    rx.close()
    with pytest.raises(shm.PeerGone, match=f"receiver pid {os.getpid()} closed"):
        tx.reserve(10, 5)
    tx.close()


def test_sender_killed_raises_within_timeout_and_leaves_nothing() -> None:
    rx = shm.RecvRing(slots=2, slot_bytes=4096, timeout=20)

    def child(conn, name) -> None:
        tx = shm.SendRing(name)
        _send(tx, 1, 1 << 20)  # published in a grown segment, not yet mapped by the receiver
        tx.reserve(5 << 20, 5)  # grown again, never published
        conn.send(("ready", None))
        time.sleep(60)

    p, conn = _child(child, rx.name)
    _expect(conn, "ready")
    assert len(_mine(p.pid)) == 2
    os.kill(p.pid, signal.SIGKILL)
    time.sleep(0.05)  # not reaped: the child is a zombie, which must count as gone
    _check(rx.wait(), 1, 1 << 20)  # what was published before the death still arrives
    t0 = time.monotonic()
    with pytest.raises(shm.PeerGone, match=rf"hop seq 2: sender pid {p.pid} is gone"):
        rx.wait()
    assert time.monotonic() - t0 < 5
    rx.close()
    _reap(p)
    assert _mine(os.getpid(), p.pid) == []


def test_receiver_killed_raises_in_the_sender_and_leaves_nothing() -> None:
    def child(conn) -> None:
        rx = shm.RecvRing(slots=2, slot_bytes=4096)
        conn.send(("name", rx.name))
        time.sleep(60)

    p, conn = _child(child)
    name = _expect(conn, "name")
    tx = shm.SendRing(name, timeout=20)
    _send(tx, 1, 10)
    _send(tx, 2, 2 << 20)  # grown segment the receiver will never map
    os.kill(p.pid, signal.SIGKILL)
    t0 = time.monotonic()
    with pytest.raises(
        shm.PeerGone,
        match=rf"reserving 10 bytes for hop seq 3: receiver pid "
        rf"{p.pid} is gone",
    ):
        tx.reserve(10)
    assert time.monotonic() - t0 < 5
    tx.close()
    _reap(p)
    assert _mine(os.getpid(), p.pid) == []


def test_receiver_killed_before_attach_is_swept() -> None:
    def child(conn) -> None:
        rx = shm.RecvRing(slots=2, slot_bytes=4096)
        conn.send(("name", rx.name))
        time.sleep(60)

    p, conn = _child(child)
    name = _expect(conn, "name")
    assert _mine(p.pid) == [name]
    assert name not in shm.sweep_stale()  # alive: kept
    os.kill(p.pid, signal.SIGKILL)
    _reap(p)
    assert name in shm.sweep_stale()
    assert _mine(p.pid) == []
    with pytest.raises(FileNotFoundError):
        shm.SendRing(name)


def test_second_sender_and_bad_names_refused() -> None:
    rx = shm.RecvRing(slots=1, slot_bytes=4096)
    with pytest.raises(ValueError, match="not a pipepack"):
        shm.SendRing("../etc/passwd")
    with pytest.raises(ValueError, match="not a pipepack"):
        shm.SendRing("pipepack-1-2-3")
    # a second attach before the first unlinked the name (same process, raced by hand)
    tx = shm.SendRing(rx.name)
    tx.close()
    with pytest.raises(FileNotFoundError):
        shm.SendRing(rx.name)
    rx.close()


def test_bad_arguments() -> None:
    for kw in (
        {"slots": 0},
        {"slots": 5000},
        {"slot_bytes": 0},
        {"meta_bytes": -1},
        {"slots": 2.0},
        {"grow_budget": -1},
        {"grow_budget": 1 << 50},
    ):
        with pytest.raises(ValueError):
            shm.RecvRing(**kw)
    rx = shm.RecvRing(slots=1, slot_bytes=4096, meta_bytes=16)
    tx = shm.SendRing(rx.name)
    with pytest.raises(ValueError):
        tx.reserve(-1)
    r = tx.reserve(10)
    with pytest.raises(ValueError, match="meta_bytes"):
        tx.publish(r, b"x" * 17)
    tx.cancel(r)
    with pytest.raises(ValueError, match="not an open reservation"):
        tx.publish(r, b"")
    r = tx.reserve(0)  # the cancelled slot is back; zero-byte hops work
    tx.publish(r, b"empty")
    a = rx.wait(1)
    assert a.payload.numel() == 0 and a.meta == b"empty"
    tx.close()
    rx.close()


# -- corrupt control block: every field the receiver reads is checked


def _desc(rx: shm.RecvRing, slot: int, word: int) -> int:
    return slot * (shm.DESC_BYTES // 8) + word


def _corrupt_tail_ahead(rx, seg, slot):
    seg.ctl[shm.H_TAIL] = 1 + rx.slots + 5


def _corrupt_queue(rx, seg, slot):
    seg.queue[0] = rx.slots + 3


def _corrupt_pub(rx, seg, slot):
    seg.desc[_desc(rx, slot, shm.D_PUB)] = 99


def _corrupt_nbytes_inline(rx, seg, slot):
    seg.desc[_desc(rx, slot, shm.D_NBYTES)] = rx.slot_bytes + 1


def _corrupt_nbytes_huge(rx, seg, slot):
    seg.desc[_desc(rx, slot, shm.D_NBYTES)] = (1 << 64) - 1


def _corrupt_meta_len(rx, seg, slot):
    seg.desc[_desc(rx, slot, shm.D_MLEN)] = rx.meta_bytes + 1


def _corrupt_ext_name(rx, seg, slot):
    seg.desc[_desc(rx, slot, shm.D_GEN)] = 1
    seg.desc[_desc(rx, slot, shm.D_EXT_BYTES)] = 8192
    seg.set_ext_name(slot, "../../etc/passwd")


def _corrupt_ext_too_big(rx, seg, slot):
    seg.desc[_desc(rx, slot, shm.D_GEN)] = 1
    seg.desc[_desc(rx, slot, shm.D_EXT_BYTES)] = 1 << 50


def _corrupt_ext_missing(rx, seg, slot):
    seg.desc[_desc(rx, slot, shm.D_GEN)] = 1
    seg.desc[_desc(rx, slot, shm.D_EXT_BYTES)] = 8192
    seg.set_ext_name(slot, f"pipepack-{os.getpid()}-1-1-00000000deadbeef")


def _corrupt_magic(rx, seg, slot):
    seg.ctl[shm.H_MAGIC] = 0
    seg.ctl[shm.H_TAIL] = 0  # forces the slow path, where the header is checked


@pytest.mark.parametrize(
    "corrupt, message",
    [
        (_corrupt_tail_ahead, "tail"),
        (_corrupt_queue, "queue entry names slot"),
        (_corrupt_pub, "carries seq 99"),
        (_corrupt_nbytes_inline, "payload length"),
        (_corrupt_nbytes_huge, "payload length"),
        (_corrupt_meta_len, "meta length"),
        (_corrupt_ext_name, "not a pipepack name"),
        (_corrupt_ext_too_big, "limit"),
        (_corrupt_ext_missing, "does not exist"),
        (_corrupt_magic, "header overwritten"),
    ],
)
def test_corrupt_control_block_refused(corrupt, message) -> None:
    rx = shm.RecvRing(slots=2, slot_bytes=4096, meta_bytes=32, timeout=0.3, max_hop_bytes=1 << 20)
    tx = shm.SendRing(rx.name)
    _send(tx, 1, 100)
    slot = rx._seg.queue[0]
    corrupt(rx, rx._seg, slot)
    with pytest.raises(shm.CorruptRing, match=message):
        rx.wait()
    assert rx.held() == []  # nothing handed out
    tx.close()
    rx.close()


def test_queue_entry_naming_a_held_slot_refused() -> None:
    rx = shm.RecvRing(slots=2, slot_bytes=4096, meta_bytes=32, timeout=1)
    tx = shm.SendRing(rx.name)
    _send(tx, 1, 100)
    a = rx.wait()
    _send(tx, 2, 100)
    rx._seg.queue[1] = rx._seg.queue[0]  # points hop 2 at hop 1's slot, still held
    with pytest.raises(shm.CorruptRing, match="still held by hop seq 1"):
        rx.wait()
    _check(a, 1, 100)
    tx.close()
    rx.close()


@pytest.mark.parametrize(
    "word, value, message",
    [
        ("H_SLOTS", 0, "geometry out of range"),
        ("H_SLOT_BYTES", 4095, "geometry out of range"),
        ("H_SLOTS", 3, "does not match"),
        ("H_DATA_OFF", 1 << 40, "does not match"),
        ("H_MAGIC", 1, "not a pipepack ring"),
        ("H_VERSION", 1, "not a pipepack ring"),
        ("H_GROW_BUDGET", 1 << 50, "geometry out of range"),
    ],
)
def test_sender_refuses_corrupt_geometry(word, value, message) -> None:
    rx = shm.RecvRing(slots=2, slot_bytes=4096)
    rx._seg.ctl[getattr(shm, word)] = value
    with pytest.raises(shm.CorruptRing, match=message):
        shm.SendRing(rx.name)
    rx.close()
    assert _mine(os.getpid()) == []


def _kernel_sources() -> list[torch.Tensor]:
    """Every wire dtype, with empty, 0-dim, odd-sized and non-contiguous sources (the same
    bytes in every process: a fixed seed)."""
    from pipepack.kernels import SUPPORTED_DTYPES
    from pipepack.testing import random_bytes

    g = torch.Generator().manual_seed(23)
    dtypes = sorted(SUPPORTED_DTYPES, key=str)  # every dtype a payload may carry
    out = []
    for i, dt in enumerate(dtypes):
        out.append(random_bytes((5 + i, 3 + 2 * i), dt, g))  # odd sizes
        out.append(random_bytes((7, 4 + i), dt, g).t())  # transposed
        out.append(random_bytes((2 * i + 3,), dt, g)[::2])  # step slice
    out.append(random_bytes((), torch.float32, g))  # 0-dim
    out.append(random_bytes((0, 5), torch.bfloat16, g))  # empty
    return out


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_pack_kernel_writes_into_a_ring_slot_and_unpack_reads_it(impl: str) -> None:
    """The pack kernel's output is a reserved slot of the peer's ring (another process): the
    receiver's views of the slot and unpack_into (canaries around every destination) give the
    sources' bytes exactly. ``triton`` runs the Triton kernels (the interpreter on a CPU)."""
    from pipepack import kernels as K
    from pipepack.testing import raw_bytes

    srcs = _kernel_sources()
    layout = K.plan_layout(srcs)
    rx = shm.RecvRing(slots=2, slot_bytes=1 << 16, meta_bytes=64, timeout=30)

    def child(conn, name) -> None:
        tx = shm.SendRing(name, timeout=30)
        r = tx.reserve(layout.nbytes, 30)
        K.pack(_kernel_sources(), out=r.payload, layout=layout, impl=impl)
        tx.publish(r, b"k")
        conn.send(("sent", None))
        conn.recv()
        tx.close()

    p, conn = _child(child, rx.name)
    _expect(conn, "sent", timeout=120)
    a = rx.wait(30)
    assert a.payload.numel() == layout.nbytes
    for i, (v, s) in enumerate(zip(K.unpack(a.payload, layout), srcs)):
        assert v.dtype == s.dtype and v.shape == s.shape, i
        assert torch.equal(raw_bytes(v), raw_bytes(s.contiguous())), f"view {i} differs"
    pad = 64
    bufs = [
        torch.full((s.numel() * s.element_size() + 2 * pad,), CANARY, dtype=torch.uint8)
        for s in srcs
    ]
    outs = [
        b[pad : pad + s.numel() * s.element_size()].view(s.dtype).view(s.shape)
        if s.numel()
        else torch.empty(s.shape, dtype=s.dtype)
        for b, s in zip(bufs, srcs)
    ]
    K.unpack_into(a.payload, layout, outs, impl=impl)
    for i, (b, o, s) in enumerate(zip(bufs, outs, srcs)):
        assert torch.equal(raw_bytes(o), raw_bytes(s.contiguous())), f"output {i} differs"
        assert (b[:pad] == CANARY).all() and (b[len(b) - pad :] == CANARY).all(), f"canary {i}"
    conn.send("go")
    _expect(conn, "done")
    _reap(p)
    del a
    rx.close()
