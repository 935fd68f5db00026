"""The host buffer pool: size classes, reuse only when nothing can read a buffer, the idle cap,
and large buffers as private mappings of their own (their pages go back when they are freed,
and a fork child writing one never changes the parent's)."""

from __future__ import annotations

import gc
import multiprocessing as mp
import os

import pytest

from pipepack.pp._private import REUSE_OK
from pipepack.pp.pool import MAPPED, SMALL, BufferPool, size_class

pytestmark = pytest.mark.skipif(not REUSE_OK, reason="buffer reuse is off on this torch build")


def _rss_anon() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) << 10
    raise RuntimeError("no RssAnon in /proc/self/status")


@pytest.mark.parametrize("n", [SMALL, SMALL + 1, 100_000, 3 << 20, (5 << 20) + 17])
def test_size_classes_are_at_most_an_eighth_over(n: int) -> None:
    c = size_class(n)
    assert n <= c <= n + n // 8 + 16
    assert size_class(c) == c


def test_small_requests_go_straight_to_the_allocator() -> None:
    p = BufferPool()
    a = p.get(SMALL - 1)
    assert a.numel() == SMALL - 1
    p.put(a)
    assert p.idle_bytes == 0 and p.hits == 0 and p.misses == 0


def test_a_buffer_is_reused_only_when_nothing_can_read_it() -> None:
    """As the link uses it: the caller keeps views of a buffer, never the buffer itself."""
    p = BufferPool()
    n = 1 << 20
    a = p.get(n)
    va, a_ptr = a[:n], a.data_ptr()
    p.put(a)
    del a
    b = p.get(n)
    vb = b[:n]
    assert b.data_ptr() != a_ptr, "handed out while a view of it was alive"
    del b, va
    c = p.get(n)
    assert c.data_ptr() == a_ptr, "a buffer nobody reads was not reused"
    kept = c[:n].untyped_storage()  # a caller that kept only the storage object
    del c
    d = p.get(n)
    assert d.data_ptr() not in (a_ptr, vb.data_ptr()), "handed out its storage still kept"
    del kept


def test_a_request_takes_an_idle_buffer_of_at_most_twice_its_size() -> None:
    p = BufferPool()
    big = p.get(8 << 20)
    p.put(big)
    small = p.get(3 << 20)
    assert small.data_ptr() != big.data_ptr()  # 8 MiB > 2 x 3 MiB: not taken
    half = p.get(5 << 20)
    assert half.data_ptr() == big.data_ptr()


def test_idle_bytes_are_capped() -> None:
    p = BufferPool(min_idle_bytes=4 << 20, cap_factor=2)
    bufs = [p.get(2 << 20) for _ in range(6)]
    for b in bufs:
        p.put(b)
    assert p.idle_bytes <= p.cap_bytes == max(4 << 20, 2 * (2 << 20))


def test_large_buffers_give_their_pages_back_when_freed() -> None:
    p = BufferPool(min_idle_bytes=0, cap_factor=0)
    n = 64 << 20
    gc.collect()
    before = _rss_anon()
    b = p.get(n)
    b.fill_(1)
    assert _rss_anon() - before >= n * 9 // 10
    del b
    p.trim()
    gc.collect()
    assert _rss_anon() - before < n // 10, "a freed 64 MiB buffer still holds its pages"


def test_a_fork_child_writing_a_large_buffer_leaves_the_parents_bytes() -> None:
    p = BufferPool()
    b = p.get(MAPPED)
    b.fill_(7)
    ctx = mp.get_context("fork")
    # numpy in the child: torch's intra-op pool is not usable after a fork
    child = ctx.Process(target=lambda: (b.numpy().fill(9), os._exit(0)))
    child.start()
    child.join(30)
    assert child.exitcode == 0
    assert bool((b == 7).all()), "a fork child's write reached the parent's buffer"
