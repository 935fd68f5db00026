"""What the transport core promises under real use: threads, differently configured peers,
exit, memory, timeouts, nested tensors, and transfer under compute. Every multi-process test
runs over each transport this machine has (torch.distributed gloo, and the same-host ring)."""

from __future__ import annotations

import collections
import gc
import os
import random
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import pipepack.pp.link as link_mod
from pipepack.kernels import SUPPORTED_DTYPES
from pipepack.pp import (
    Declared,
    TensorDictChannel,
    WireError,
    flush,
    irecv_tensor_dict,
    isend_tensor_dict,
    recv_tensor_dict,
    send_tensor_dict,
)
from pipepack.pp import shm as shm_mod
from pipepack.testing import check_dict, random_bytes, run_ranks

TIMEOUT_S = 60.0
ROOT = Path(__file__).resolve().parents[1]
TRANSPORTS = ["dist"] + (["shm", "auto"] if shm_mod.available() else [])


def _use(transport: str) -> None:
    """Per process (ranks are fork children): links made from now on use ``transport``."""
    link_mod.DEFAULT_TRANSPORT = transport


def _link(peer: int):
    return link_mod.get_link(dist.group.WORLD, dist.group.WORLD, peer)


def _hop(tag: int, k: int, rows: int, cols: int = 4096) -> dict:
    g = torch.Generator().manual_seed(tag * 100_003 + k)
    return {
        "tag": tag,
        "k": k,
        "h": torch.randn(rows, cols, generator=g).to(torch.bfloat16),
        "r": torch.randint(-(2**31), 2**31 - 1, (rows, cols // 2), generator=g, dtype=torch.int32),
    }


# ---------------------------------------------------------------------------------------------
# threads
# ---------------------------------------------------------------------------------------------


def _threads_body(
    rank: int,
    world: int,
    transport: str,
    rows: int,
    cols: int = 4096,
    n_threads: int = 3,
    n_hops: int = 6,
    mixed: bool = False,
) -> None:
    """``n_threads`` threads of rank 0 send ``n_hops`` hops each to rank 1 (``mixed``: blocking
    and posted sends alternating), which checks every hop's bytes and each thread's order."""
    _use(transport)
    if rank == 0:
        errors = []

        def sender(tag: int) -> None:
            try:
                for k in range(n_hops):
                    send = send_tensor_dict if mixed and (k + tag) % 2 else isend_tensor_dict
                    send(_hop(tag, k, rows + tag, cols))
            except BaseException as e:  # noqa: BLE001 - re-raised below
                errors.append(e)

        ts = [threading.Thread(target=sender, args=(t,)) for t in range(n_threads)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        assert not errors, errors
        flush(TIMEOUT_S)
        return
    seen: dict[int, int] = {t: 0 for t in range(n_threads)}
    for _ in range(n_threads * n_hops):
        got = recv_tensor_dict()
        tag, k = got["tag"], got["k"]
        assert k == seen[tag], f"thread {tag}: hop {k} arrived where {seen[tag]} was due"
        seen[tag] += 1
        check_dict(got, _hop(tag, k, rows + tag, cols))
    # forced to the ring, the sender waits for the hello and every hop comes through the ring;
    # on "auto" the posted sends may all go out before the hello (a late peer, a loaded box)
    if transport == "shm":
        assert _link(0).recv_mode == "shm"


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("rows", [100, 300], ids=["1.6MiB", "4.8MiB"])
def test_threads_sending_to_one_peer_never_interleave(transport: str, rows: int) -> None:
    """Three threads of one rank send to the same peer at once: every hop arrives whole and
    bit-exact, and each thread's hops stay in its order."""
    run_ranks(2, _threads_body, transport, rows, timeout_s=TIMEOUT_S)


@pytest.mark.skipif(not shm_mod.available(), reason="no POSIX shared memory here")
@pytest.mark.parametrize("attempt", range(8))
def test_threads_sending_while_auto_switches_to_the_ring(attempt: int) -> None:
    """With the default transport the first hops go over torch.distributed until the peer's
    hello offers its ring, then the link switches. Four threads sending small hops across that
    switch, blocking and posted sends from the link's first hop: each thread's hops stay in
    order and exact (a hop that chose torch.distributed just before another thread switched
    must not land behind the switch)."""
    run_ranks(2, _threads_body, "auto", 2, 64, 4, 25, True, timeout_s=TIMEOUT_S)


def _duplex_body(rank: int, world: int, transport: str) -> None:
    _use(transport)
    n = 12
    peer = 1 - rank
    errors: list[BaseException] = []

    def sender() -> None:
        try:
            for k in range(n):
                isend_tensor_dict(_hop(rank, k, 3 + 7 * k, 64), dst=peer)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    def receiver() -> None:
        try:
            for k in range(n):
                check_dict(recv_tensor_dict(src=peer), _hop(peer, k, 3 + 7 * k, 64))
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    ts = [threading.Thread(target=sender), threading.Thread(target=receiver)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert not errors, errors
    flush(TIMEOUT_S)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_one_thread_sends_while_another_receives(transport: str) -> None:
    """Both ranks send and receive on the same link from two threads, a new shape every hop."""
    run_ranks(2, _duplex_body, transport, timeout_s=TIMEOUT_S)


_MIXED_DTYPES = sorted(SUPPORTED_DTYPES, key=str)


def _mixed_hop(tid: int, seq: int) -> dict:
    """A hop that names its sender thread and number, with content drawn from both: decode-like
    (bf16 / fp16 / fp32 hidden and residual, some strided), many small tensors of every dtype
    (empty, 0-dim, transposed or stepped views), or one 2-8 MiB tensor; sometimes tensors nested
    in plain values."""
    r = random.Random(tid * 1_000_003 + seq)
    g = torch.Generator().manual_seed(r.randrange(1 << 30))
    d: dict = {"id": torch.tensor([tid, seq])}
    kind = r.random()
    if kind < 0.45:
        rows, cols = r.choice([1, 8, 64, r.randrange(1, 200)]), r.choice([256, 1024])
        dt = r.choice([torch.bfloat16, torch.float16, torch.float32])
        d["hidden_states"] = random_bytes((rows, cols), dt, g)
        d["residual"] = random_bytes((cols, rows), dt, g).t()
    elif kind < 0.85:
        for i in range(r.randrange(1, 20)):
            shape = tuple(r.randrange(0, 6) for _ in range(r.randrange(0, 4)))
            t = random_bytes(
                (2 * shape[0] + 1, *shape[1:]) if shape else (), r.choice(_MIXED_DTYPES), g
            )
            d[f"t{i}"] = t[1::2] if shape else t
    else:
        d["big"] = random_bytes((r.choice([1, 2, 4]) << 20,), torch.float16, g)
    if r.random() < 0.3:
        d["meta"] = {"step": seq, "xs": [random_bytes((3,), torch.float32, g), None, 1.5]}
    return d


def _mixed_body(rank: int, world: int, transport: str, senders: int, receivers: int, n: int):
    _use(transport)
    peer = 1 - rank
    errors: list[str] = []
    seen: dict[int, list[int]] = collections.defaultdict(list)
    lock = threading.Lock()
    quota = [senders * n // receivers + (i < senders * n % receivers) for i in range(receivers)]

    def sender(tid: int) -> None:
        r = random.Random(rank * 100 + tid)
        posted: list = []
        try:
            for seq in range(n):
                d = _mixed_hop(rank * 10 + tid, seq)
                if r.random() < 0.5:
                    posted.extend(isend_tensor_dict(d, dst=peer))
                else:
                    send_tensor_dict(d, dst=peer)
            for h in posted:
                h.wait(TIMEOUT_S)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(f"sender {tid}: {e!r}")

    def receiver(rid: int) -> None:
        r = random.Random(rank * 100 + 50 + rid)
        kept: list = []
        try:
            for _ in range(quota[rid]):
                if r.random() < 0.5:
                    d, handles, post = irecv_tensor_dict(src=peer)
                    for h in handles:
                        h.wait()
                    for fn in post:
                        fn()
                else:
                    d = recv_tensor_dict(src=peer)
                tid, seq = d["id"].tolist()
                check_dict(d, _mixed_hop(tid, seq))
                with lock:
                    seen[tid].append(seq)
                if r.random() < 0.3:  # some are kept a while (their buffers stay in use)
                    kept.append(d)
                    if len(kept) > 5:
                        kept.pop(r.randrange(len(kept)))
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(f"receiver {rid}: {e!r}")

    threads = [threading.Thread(target=sender, args=(i,)) for i in range(senders)]
    threads += [threading.Thread(target=receiver, args=(i,)) for i in range(receivers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert sorted(seen) == [peer * 10 + i for i in range(senders)]
    for tid, seqs in seen.items():
        # one receiving thread sees each sender thread's hops in its order; with several, which
        # thread records a hop first is up to the scheduler, but none is lost or doubled
        assert (seqs if receivers == 1 else sorted(seqs)) == list(range(n)), (tid, seqs)
    flush(TIMEOUT_S)


@pytest.mark.filterwarnings("ignore:ComplexHalf support is experimental")
@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("receivers", [1, 2])
def test_threads_both_ways_mixed_calls_random_hops(transport: str, receivers: int) -> None:
    """Each rank runs three sender threads and one or two receiver threads against the other
    at once, each call blocking or posted at random, hops of random dtypes, views and sizes
    (bytes to 8 MiB), some kept: every hop arrives once and exact, and with one receiving
    thread each sender thread's hops arrive in its order."""
    run_ranks(2, _mixed_body, transport, 3, receivers, 60, timeout_s=TIMEOUT_S)


def _channel_mixed_body(rank: int, world: int, transport: str, senders: int, n: int) -> None:
    _use(transport)
    if rank == 0:
        ch = TensorDictChannel(1, transport=transport)
        errors: list[str] = []

        def sender(tid: int) -> None:
            r = random.Random(tid)
            try:
                for seq in range(n):
                    d = _mixed_hop(tid, seq)
                    if r.random() < 0.6:
                        ch.isend(d)
                    else:
                        ch.send(d)
            except BaseException as e:  # noqa: BLE001 - reported below
                errors.append(f"sender {tid}: {e!r}")

        threads = [threading.Thread(target=sender, args=(i,)) for i in range(senders)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors
        ch.drain(TIMEOUT_S)
        return
    ch = TensorDictChannel(0, transport=transport, timeout=TIMEOUT_S)
    r = random.Random(7)
    seen: dict[int, list[int]] = collections.defaultdict(list)
    posted: collections.deque = collections.deque()
    left = senders * n
    while left:
        while len(posted) < min(left, r.randrange(1, 5)):
            posted.append(ch.irecv())
        pending = posted.popleft()
        while True:  # a short wait raises TimeoutError and leaves the receive posted
            try:
                d = pending.wait(timeout=r.choice([0.0005, 0.005, 0.05, None]))
                break
            except TimeoutError as e:
                assert "rank 0" in str(e), str(e)
        left -= 1
        tid, seq = d["id"].tolist()
        check_dict(d, _mixed_hop(tid, seq))
        seen[tid].append(seq)
    assert dict(seen) == {t: list(range(n)) for t in range(senders)}, seen


@pytest.mark.filterwarnings("ignore:ComplexHalf support is experimental")
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_channel_threads_with_receives_posted_ahead_and_short_waits(transport: str) -> None:
    """Three threads send on one channel, blocking or posted at random; the receiver keeps one
    to four receives posted and waits on each with timeouts from 0.5 ms to none, waiting again
    after every TimeoutError: each hop arrives exact, each thread's in its order."""
    run_ranks(2, _channel_mixed_body, transport, 3, 40, timeout_s=TIMEOUT_S)


# ---------------------------------------------------------------------------------------------
# peers configured differently
# ---------------------------------------------------------------------------------------------

_D = {
    "h": torch.zeros(4, 64, dtype=torch.bfloat16),
    "r": torch.zeros(4, 64),
    "__msg_type__": "proxy",
}


def _mismatch_body(rank: int, world: int, transport: str, case: str) -> None:
    _use(transport)
    rows = 8192  # 3 MiB: larger than either end's head capacity on gloo
    good = {
        "h": torch.randn(rows, 64).to(torch.bfloat16),
        "r": torch.randn(rows, 64),
        "__msg_type__": "proxy",
    }
    if rank == 0:
        kw = dict(
            {"slot_bytes": {"slot_bytes": 64 << 10}, "chunk": {"chunk_bytes": None}}.get(case, {})
        )
        if case in ("declared_both", "tokens"):
            kw["declared"] = Declared.from_example(_D)
        if case == "hidden":
            kw["declared"] = Declared.from_example(
                {
                    "h": torch.zeros(4, 32, dtype=torch.bfloat16),
                    "r": torch.zeros(4, 64),
                    "__msg_type__": "proxy",
                }
            )
        ch = TensorDictChannel(1, **kw)
        if case == "hidden":
            bad = {
                "h": torch.randn(rows, 32).to(torch.bfloat16),
                "r": torch.randn(rows, 64),
                "__msg_type__": "proxy",
            }
            ch.isend(bad)
        else:
            ch.isend(good)
        # must arrive intact after a refused hop
        TensorDictChannel(1).isend({"next": torch.arange(5)})
        flush(TIMEOUT_S)
        return
    kw = {"slot_bytes": {"slot_bytes": 256 << 10}, "chunk": {"chunk_bytes": 1 << 20}}.get(case, {})
    if case in ("declared_receiver_only", "declared_both", "tokens", "hidden"):
        kw["declared"] = Declared.from_example(_D)
    ch = TensorDictChannel(0, **kw)
    if case == "tokens":
        with pytest.raises(WireError, match=r"8192 tokens.*posted for 100"):
            ch.recv(num_tokens=100)
        ch2 = TensorDictChannel(0)
        check_dict(ch2.recv(), {"next": torch.arange(5)})
        return
    if case == "hidden":
        with pytest.raises(WireError, match=r"\(8192, 32\).*declared.*\(None, 64\)"):
            ch.recv(num_tokens=rows)
        check_dict(TensorDictChannel(0).recv(), {"next": torch.arange(5)})
        return
    check_dict(ch.recv(num_tokens=rows if ch.declared else None), good)
    check_dict(TensorDictChannel(0).recv(), {"next": torch.arange(5)})


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize(
    "case", ["slot_bytes", "chunk", "declared_receiver_only", "declared_both", "tokens", "hidden"]
)
def test_peers_configured_differently(transport: str, case: str) -> None:
    """Head capacity, chunk size, a declaration on one side only, a token count or a hidden size
    that disagrees: the hop either arrives exactly or raises on the receiver naming both values;
    the next hop arrives intact; no process aborts."""
    run_ranks(2, _mismatch_body, transport, case, timeout_s=TIMEOUT_S)


def _transport_mismatch_body(rank: int, world: int, mine: str, theirs: str) -> None:
    _use(mine if rank == 0 else theirs)
    hops = [{"h": torch.randn(8 * (k + 1), 512).to(torch.bfloat16), "k": k} for k in range(6)]
    if "shm" in (mine, theirs) and "dist" in (mine, theirs):  # no common transport
        if rank == 0 and mine == "shm" or rank == 1 and theirs == "shm":
            with pytest.raises(RuntimeError, match="on this host but offered no shared-memory"):
                send_tensor_dict(hops[0], 1 - rank)
                recv_tensor_dict(1 - rank)
            return
        with pytest.raises(RuntimeError):  # the peer gave up: raises, never hangs or aborts
            recv_tensor_dict(1 - rank)
            send_tensor_dict(hops[0], 1 - rank)
        return
    if rank == 0:
        for h in hops:
            send_tensor_dict(h, 1)
        check_dict(recv_tensor_dict(1), hops[-1])
    else:
        for h in hops:
            check_dict(recv_tensor_dict(0), h)
        send_tensor_dict(hops[-1], 0)
    # a send decides the transport once the peer's hello is in (a thread reads it): until then
    # hops go as gloo messages, so a loaded box can finish the hops above still undecided.
    # With the hello in, one more round trip makes each end's send decide.
    link = _link(1 - rank)
    link.wait_hello(TIMEOUT_S)
    if rank == 0:
        send_tensor_dict(hops[0], 1)
        check_dict(recv_tensor_dict(1), hops[1])
    else:
        check_dict(recv_tensor_dict(0), hops[0])
        send_tensor_dict(hops[1], 0)
    flush(TIMEOUT_S)
    used = link.send_mode
    assert used == ("dist" if "dist" in (mine, theirs) else "shm"), used


@pytest.mark.skipif("shm" not in TRANSPORTS, reason="no POSIX shared memory here")
@pytest.mark.parametrize(
    "mine, theirs",
    [("dist", "auto"), ("auto", "dist"), ("shm", "auto"), ("auto", "shm"), ("shm", "dist")],
)
def test_peers_configured_with_different_transports(mine: str, theirs: str) -> None:
    """One end forces a transport, the other takes the default (or forces another): the hops
    travel on what both can use, exact; with nothing in common ('shm' against 'dist') the end
    that forced the ring raises why, and its peer raises too instead of waiting forever."""
    run_ranks(2, _transport_mismatch_body, mine, theirs, timeout_s=TIMEOUT_S)


def test_declared_sender_refuses_more_tokens_than_declared() -> None:
    """max_tokens bounds what a declared sender sends, before anything is posted."""
    decl = Declared.from_example(_D, max_tokens=16)
    assert (
        decl.check(
            {
                "h": torch.zeros(16, 64, dtype=torch.bfloat16),
                "r": torch.zeros(16, 64),
                "__msg_type__": "proxy",
            }
        )
        == 16
    )
    with pytest.raises(ValueError, match="17 tokens exceed the declared max_tokens=16"):
        decl.check(
            {
                "h": torch.zeros(17, 64, dtype=torch.bfloat16),
                "r": torch.zeros(17, 64),
                "__msg_type__": "proxy",
            }
        )


def _pickle_alternating_body(rank: int, world: int, transport: str) -> None:
    _use(transport)
    if rank == 0:
        for k in range(6):
            d = {"k": k, "x": torch.arange(k + 1)}
            if k % 2:
                d["o"] = collections.OrderedDict(v=k)  # a dict subclass: needs pickle
                isend_tensor_dict(d, allow_pickle=True)
            else:
                isend_tensor_dict(d)
        flush(TIMEOUT_S)
        return
    for k in range(6):
        got = recv_tensor_dict(allow_pickle=bool(k % 2) or k == 4)
        assert got["k"] == k and torch.equal(got["x"], torch.arange(k + 1))
        if k % 2:
            assert type(got["o"]) is collections.OrderedDict and got["o"]["v"] == k


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_allow_pickle_alternating_on_one_wire(transport: str) -> None:
    """allow_pickle differing from call to call never creates a second stream of state."""
    run_ranks(2, _pickle_alternating_body, transport, timeout_s=TIMEOUT_S)


def _pickle_refused_body(rank: int, world: int, transport: str) -> None:
    _use(transport)
    if rank == 0:
        isend_tensor_dict({"o": {1, 2}, "x": torch.ones(70_000)}, allow_pickle=True)
        isend_tensor_dict({"after": torch.arange(3)})
        flush(TIMEOUT_S)
        return
    with pytest.raises(WireError, match="pickle"):
        recv_tensor_dict()
    check_dict(recv_tensor_dict(), {"after": torch.arange(3)})


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_pickled_hop_refused_then_next_intact(transport: str) -> None:
    """A pickled hop to a receiver that did not opt in raises there; the next hop is intact."""
    run_ranks(2, _pickle_refused_body, transport, timeout_s=TIMEOUT_S)


# ---------------------------------------------------------------------------------------------
# nested tensors, timeouts, small dicts after big ones
# ---------------------------------------------------------------------------------------------


def _nested() -> dict:
    g = torch.Generator().manual_seed(7)
    return {
        "next_token_ids": torch.arange(4, dtype=torch.int32),
        "output_token_logprobs_val": [
            torch.randn(3, generator=g),
            torch.randn(0, generator=g),
            torch.randn(5, generator=g).double(),
        ],
        "output_top_logprobs": [None, {"ids": torch.arange(2), "p": (1.5, torch.ones(2, 2))}],
        "flags": (True, 3, "s", b"b"),
        "__msg_type__": "output",
    }


def _nested_body(rank: int, world: int, transport: str) -> None:
    _use(transport)
    if rank == 0:
        send_tensor_dict(_nested())
        ch = TensorDictChannel(1)
        ch.isend(_nested())
        ch.drain(TIMEOUT_S)
        return
    check_dict(recv_tensor_dict(), _nested())
    got = TensorDictChannel(0).recv()
    check_dict(got, _nested())
    ptrs = {
        t.untyped_storage().data_ptr()
        for t in (got["next_token_ids"], *got["output_token_logprobs_val"])
    }
    assert len(ptrs) == 1, "nested tensors are views of the one payload buffer"


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_tensors_nested_in_plain_values_travel_without_pickle(transport: str) -> None:
    """sglang's output dict: lists/dicts of per-request tensors, exact, no pickle."""
    run_ranks(2, _nested_body, transport, timeout_s=TIMEOUT_S)


def _timeout_body(rank: int, world: int, transport: str, tmp: str) -> None:
    _use(transport)
    flag = os.path.join(tmp, "timed_out")
    if rank == 0:
        while not os.path.exists(flag):
            time.sleep(0.01)
        send_tensor_dict({"late": torch.arange(4)})
        return
    ch = TensorDictChannel(0)
    p = ch.irecv()
    with pytest.raises(TimeoutError, match=r"receive #0 from rank 0"):
        p.wait(timeout=0.2)
    Path(flag).touch()
    check_dict(p.wait(), {"late": torch.arange(4)})


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_wait_timeout_names_peer_and_step_and_a_later_wait_completes(
    transport: str, tmp_path
) -> None:
    run_ranks(2, _timeout_body, transport, str(tmp_path), timeout_s=TIMEOUT_S)


def _small_after_big_body(rank: int, world: int, transport: str) -> None:
    _use(transport)
    big = {"h": torch.randn(2048, 4096).to(torch.bfloat16)}
    small = {"next_token_ids": torch.arange(8, dtype=torch.int32)}
    if rank == 0:
        for _ in range(3):
            send_tensor_dict(big)
            send_tensor_dict(small)
        return
    for _ in range(3):
        got_big = recv_tensor_dict()
        got = recv_tensor_dict()
        check_dict(got, small)
        held = got["next_token_ids"].untyped_storage().nbytes()
        assert held <= 64 << 10, f"a 32-byte hop pins {held} bytes"
        del got_big


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_small_dict_after_a_prefill_does_not_pin_a_big_buffer(transport: str) -> None:
    run_ranks(2, _small_after_big_body, transport, timeout_s=TIMEOUT_S)


def _storage_kept_body(rank: int, world: int, transport: str) -> None:
    _use(transport)
    n = 6

    def d(k):
        return {"h": torch.full((300, 1024), float(k))}

    if rank == 0:
        if transport == "shm":
            send_tensor_dict({"warm": 1})
            _link(1).wait_hello(TIMEOUT_S)
        for k in range(n):
            send_tensor_dict(d(k))
        return
    if transport == "shm":  # let the sender switch to the ring first, so hop 0 lies in a slot
        check_dict(recv_tensor_dict(), {"warm": 1})
    h = recv_tensor_dict()["h"]
    kept, off = h.untyped_storage(), h.storage_offset()
    del h
    gc.collect()
    for _ in range(n - 1):
        recv_tensor_dict()
    back = torch.empty(0).set_(kept, off, (300, 1024), (1024, 1))
    assert torch.equal(back, torch.zeros(300, 1024)), "a kept storage was overwritten"


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_kept_storage_object_is_never_reused(transport: str) -> None:
    """Keeping only ``untyped_storage()`` of a received tensor keeps its bytes."""
    run_ranks(2, _storage_kept_body, transport, timeout_s=TIMEOUT_S)


# ---------------------------------------------------------------------------------------------
# memory over a varying token count
# ---------------------------------------------------------------------------------------------


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _memory_body(rank: int, world: int, transport: str, hops: int, hidden: int, out: str) -> None:
    _use(transport)
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(1000, 4001, (hops,), generator=g).tolist()
    warm = 10
    base = None
    # the sender's tensors are views of one buffer made up front: fresh tensors every hop would
    # add what glibc's heap keeps of them (8-40 MiB here from run to run, the caller's memory,
    # bench/NOTES.md item 27), and this test is about the memory pipepack holds
    src = torch.ones(2 * max(tokens) * hidden, dtype=torch.bfloat16) if rank == 0 else None
    for i, t in enumerate(tokens):
        if i == warm:
            gc.collect()
            base = _rss()
        if rank == 0:
            n = t * hidden
            send_tensor_dict({"h": src[:n].view(t, hidden), "r": src[n : 2 * n].view(t, hidden)})
        else:
            got = recv_tensor_dict()
            assert got["h"].shape == (t, hidden)
            del got
    gc.collect()
    grow = _rss() - base
    with open(os.path.join(out, f"rss{rank}"), "w") as f:
        f.write(str(grow))


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_memory_stays_bounded_over_changing_token_counts(transport: str, tmp_path) -> None:
    """60 hops of 1000..4000 tokens x 1024 (bf16, 2 keys, 4-16 MiB): RSS after warm-up grows by
    less than 3 of the largest hops per side over gloo; over the same-host ring, by less than
    the ring's slots x the largest hop (the sender runs up to that many hops ahead of the
    receiver, and each slot keeps its grown segment) plus one hop (the 200-hop, 4096-hidden run
    is in the soak). Keeping every hop would add about 500 MiB."""
    run_ranks(2, _memory_body, transport, 60, 1024, str(tmp_path), timeout_s=120)
    largest = 4000 * 1024 * 2 * 2
    cls = shm_mod._grow_size(largest)
    ring = link_mod.RING_SLOTS * cls + largest
    bound = 3 * largest if transport == "dist" else max(3 * largest, ring)
    for r in range(2):
        grow = int((tmp_path / f"rss{r}").read_text())
        assert grow < bound, f"rank {r}: RSS grew {grow / 2**20:.0f} MiB (bound {bound >> 20})"


# ---------------------------------------------------------------------------------------------
# transfer under compute, asserted by order (no wall clock)
# ---------------------------------------------------------------------------------------------


def _overlap_body(rank: int, world: int, transport: str, tmp: str) -> None:
    _use(transport)
    sent = os.path.join(tmp, "sent_complete")
    if rank == 0:
        ch = TensorDictChannel(1)
        hs = ch.isend({"x": torch.full((4096, 4096), 3.0)})  # 64 MiB: chunked on gloo
        for h in hs:
            h.wait(TIMEOUT_S)
        Path(sent).touch()  # the peer has every byte, while it is still "computing"
        return
    ch = TensorDictChannel(0)
    p = ch.irecv()
    # "compute" until the sender saw its send complete: only possible if the payload moves
    # while this thread is not inside any pipepack call
    deadline = time.monotonic() + TIMEOUT_S
    while not os.path.exists(sent):
        assert time.monotonic() < deadline, "the payload did not move during compute"
        time.sleep(0.005)
    got = p.wait()
    assert torch.equal(got["x"][::1024, ::1024], torch.full((4, 4), 3.0))


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_payload_moves_while_the_receiver_computes(transport: str, tmp_path) -> None:
    run_ranks(2, _overlap_body, transport, str(tmp_path), timeout_s=TIMEOUT_S)


# ---------------------------------------------------------------------------------------------
# exit: nothing sent is lost (real subprocesses: they exit normally and run atexit)
# ---------------------------------------------------------------------------------------------

_EXIT_SCRIPT = textwrap.dedent("""
    import os, sys, time, datetime, torch, torch.distributed as dist
    import pipepack.pp.link as link_mod
    from pipepack.pp import flush, isend_tensor_dict, recv_tensor_dict, send_tensor_dict
    rank, init, how, transport = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
    link_mod.DEFAULT_TRANSPORT = transport
    dist.init_process_group("gloo", init_method="file://" + init, rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=60))
    d = {"x": torch.arange(300_000, dtype=torch.int64), "s": "last"}
    if rank == 0:
        if how == "blocking_then_destroy":
            send_tensor_dict(d)
            dist.destroy_process_group()
        elif how == "flush_then_os_exit":  # no atexit hooks: flush() is what the docs ask for
            isend_tensor_dict(d)
            flush()
            os._exit(0)
        elif how == "isend_burst_then_exit":  # more than the ring's 4 slots, none received yet
            for _ in range(10):
                isend_tensor_dict(d)
        elif how == "threads_isend_then_exit":  # three threads post, the main thread exits
            import threading

            ts = [
                threading.Thread(target=lambda: [isend_tensor_dict(d) for _ in range(4)])
                for _ in range(3)
            ]
            for t in ts:
                t.start()
            for t in ts:
                t.join()
        else:  # isend, then a normal interpreter exit: the atexit hook flushes
            isend_tensor_dict(d)
            isend_tensor_dict(d)
        sys.exit(0)
    if how == "flush_then_os_exit":
        # a 2.4 MB hop travels in a grown segment the sender made; if the sender could be gone
        # before this side maps it, any process's sweep of dead processes' segments (every new
        # ring runs one) would take the hop with it
        time.sleep(1.0)
        from pipepack.pp import shm

        shm.sweep_stale()
    if how == "isend_burst_then_exit":
        time.sleep(1.0)  # the sender is at its exit by now, its later hops still on its side
    n = {"isend_then_exit": 2, "isend_burst_then_exit": 10, "threads_isend_then_exit": 12}
    for _ in range(n.get(how, 1)):
        got = recv_tensor_dict()
        assert got["s"] == "last" and torch.equal(got["x"], d["x"]), "wrong bytes"
        if how == "isend_burst_then_exit":
            # a slow reader: every hop published so far is taken while later ones still wait
            # on the sender's side for room, which is when a sender at exit must not close
            time.sleep(0.05)
    print("RECEIVED")
""")


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize(
    "how",
    [
        "blocking_then_destroy",
        "isend_then_exit",
        "isend_burst_then_exit",
        "threads_isend_then_exit",
        "flush_then_os_exit",
    ],
)
def test_nothing_is_lost_when_the_sender_exits_right_after(
    how: str, transport: str, tmp_path
) -> None:
    script = tmp_path / "exit_script.py"
    script.write_text(_EXIT_SCRIPT)
    init = str(tmp_path / "init")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(r), init, how, transport],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            cwd=ROOT,
        )
        for r in range(2)
    ]
    outs = [p.communicate(timeout=120) for p in procs]
    assert procs[1].returncode == 0 and "RECEIVED" in outs[1][0], outs[1][1][-3000:]
    assert procs[0].returncode == 0, outs[0][1][-3000:]


# ---------------------------------------------------------------------------------------------
# the same-host ring: a peer killed mid-stream
# ---------------------------------------------------------------------------------------------

_KILL_SCRIPT = textwrap.dedent("""
    import os, signal, sys, time, datetime, torch, torch.distributed as dist
    import pipepack.pp.link as link_mod
    from pipepack.pp import recv_tensor_dict, send_tensor_dict
    rank, init = int(sys.argv[1]), sys.argv[2]
    link_mod.DEFAULT_TRANSPORT = "shm"
    dist.init_process_group("gloo", init_method="file://" + init, rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=60))
    peer = 1 - rank
    for k in range(5):
        if rank == 0:
            send_tensor_dict({"k": k, "x": torch.full((64, 1024), float(k))})
            recv_tensor_dict()
        else:
            recv_tensor_dict()
            send_tensor_dict({"k": k})
    link = link_mod.get_link(dist.group.WORLD, dist.group.WORLD, peer)
    print("MODES", link.send_mode, link.recv_mode, flush=True)
    if rank == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    t0 = time.monotonic()
    try:
        recv_tensor_dict()
    except Exception as e:
        print("RAISED", round(time.monotonic() - t0, 1), str(e)[:300].replace("\\n", " "))
        os._exit(0)
    print("NO ERROR")
""")


@pytest.mark.skipif("shm" not in TRANSPORTS, reason="no POSIX shared memory here")
def test_ring_peer_killed_raises_and_leaves_nothing_in_dev_shm(tmp_path) -> None:
    """A peer SIGKILLed mid-stream: the waiting side raises naming the peer well within the
    group timeout, and no pipepack segment of either process is left under /dev/shm."""
    script = tmp_path / "kill_script.py"
    script.write_text(_KILL_SCRIPT)
    init = str(tmp_path / "init")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(r), init],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            cwd=ROOT,
        )
        for r in range(2)
    ]
    outs = [p.communicate(timeout=120) for p in procs]
    assert "MODES shm shm" in outs[0][0], outs[0]
    assert procs[1].returncode == -9
    assert "RAISED" in outs[0][0], outs[0]
    line = next(x for x in outs[0][0].splitlines() if x.startswith("RAISED"))
    assert float(line.split()[1]) < 30, line
    assert "receive #5 from rank 1" in line, line
    left = [
        n
        for n in os.listdir("/dev/shm")
        if n.startswith("pipepack-") and any(f"-{p.pid}-" in n for p in procs)
    ]
    assert not left, left


def test_unbuilt_or_unknown_transport_is_refused_clearly() -> None:
    with pytest.raises(NotImplementedError, match="cuda_ipc"):
        TensorDictChannel(1, transport="cuda_ipc")
    with pytest.raises(ValueError, match="transport must be one of"):
        TensorDictChannel(1, transport="tcp")


def _send_timeout_body(rank: int, world: int, tmp: str) -> None:
    _use("dist")
    flag = os.path.join(tmp, "go")
    big = {"x": torch.ones(3 << 20)}  # 12 MiB: the send completes only once the peer receives
    if rank == 0:
        (h,) = isend_tensor_dict(big)
        # the reaper thread is already waiting on this send; a timed wait must still time out
        with pytest.raises(TimeoutError, match=r"send #0 to rank 1"):
            h.wait(timeout=0.3)
        Path(flag).touch()
        h.wait()
        return
    while not os.path.exists(flag):
        time.sleep(0.01)
    check_dict(recv_tensor_dict(), big)


def test_send_wait_with_timeout_while_the_reaper_waits(tmp_path) -> None:
    """handle.wait(timeout) on a send the reaper is already waiting on honours the timeout (the
    peer only receives after this side timed out: without the timeout it would never return)."""
    run_ranks(2, _send_timeout_body, str(tmp_path), timeout_s=TIMEOUT_S)


def _lagging_progress_body(rank: int, world: int) -> None:
    _use("shm")
    n, rows = 8, 192  # 1.5 MiB hops: zero-copy ring slots, 4 slots in the ring
    if rank == 0:
        ch = TensorDictChannel(1, timeout=20)
        send_tensor_dict({"k": 0})
        _link(1).wait_hello(20)
        for k in range(1, n):
            ch.isend({"k": k, "x": torch.full((rows, 1024), float(k), dtype=torch.float64)})
        ch.drain(20)
        return
    link = _link(0)
    # a progress thread that never gets to its queue (a busy machine, at worst): what it queued
    # must not keep completed receives, and with them their ring slots, alive
    link._run_progress = lambda: None
    ch = TensorDictChannel(0, timeout=20)
    recv_tensor_dict()  # let the sender switch to the ring first (hop 0 on gloo)
    for k in range(1, n):
        got = ch.irecv().wait()
        assert got["k"] == k and float(got["x"][0, 0]) == k
        del got


def test_a_lagging_progress_thread_does_not_hold_ring_slots() -> None:
    run_ranks(2, _lagging_progress_body, timeout_s=TIMEOUT_S)


def _posted_ahead_body(rank: int, world: int, transport: str, rows: int) -> None:
    _use(transport)
    n = 12  # more receives posted ahead than the ring has slots (4)

    def hop(k: int) -> dict:
        return {"k": k, "x": torch.full((rows, 64), float(k))}

    if rank == 0:
        send_tensor_dict({"k": -1})  # the link's first hop (and its switch to the ring, if any)
        for k in range(n):
            send_tensor_dict(hop(k))
        dist.barrier()
        return
    ch = TensorDictChannel(0, timeout=TIMEOUT_S)
    assert ch.recv()["k"] == -1
    pending = [ch.irecv() for _ in range(n)]
    # the sender's blocking sends must complete before this side waits on any receive: the
    # posted receives take the hops as they come (gloo: the posted heads and the progress
    # thread; the ring: the progress thread, which copies each hop out of its slot)
    dist.barrier()
    for k, p in enumerate(pending):
        check_dict(p.wait(), hop(k))


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("rows", [1, 4096], ids=["256B", "1MiB"])
def test_receives_posted_ahead_take_hops_before_anyone_waits(transport: str, rows: int) -> None:
    """A receiver posts 12 receives, then meets the sender at a barrier the sender reaches only
    after its 12 blocking sends, then waits on them: nothing may stall on the ring's 4 slots,
    small hops or large (zero-copy) ones."""
    run_ranks(2, _posted_ahead_body, transport, rows, timeout_s=TIMEOUT_S)


def _straddle_dicts() -> list[dict]:
    g = torch.Generator().manual_seed(11)
    out = []
    for k in range(4):
        d = {
            "a": torch.randint(0, 255, (12345 + k,), generator=g, dtype=torch.uint8),
            "empty": torch.zeros(0, 7),
            "b": torch.randn(301, 97 + k, generator=g).to(torch.bfloat16),
            "c": torch.randint(-9, 9, (7, 3001), generator=g, dtype=torch.int64),
            "flag": torch.rand(4099, generator=g) > 0.5,
            "s": "x" * k,
        }
        if k == 3:  # a strided source: the whole payload is packed instead
            d["t"] = torch.randn(200, 300, generator=g).t()
        out.append(d)
    return out


def _straddle_body(rank: int, world: int) -> None:
    _use("dist")
    if rank == 0:
        ch = TensorDictChannel(1, chunk_bytes=4096)
        for d in _straddle_dicts():
            ch.send(d)  # blocking: chunks cut from the tensors themselves where they can be
        return
    ch = TensorDictChannel(0, slot_bytes=64 << 10)  # so the ~300 KiB hops go in chunks
    for d in _straddle_dicts():
        check_dict(ch.recv(), d)


def test_blocking_send_chunks_from_the_sources_exactly() -> None:
    """A blocking send of a chunked CPU payload sends each chunk from its tensor where it lies
    inside one, and stages the chunks that straddle tensors or padding: bit-exact either way."""
    run_ranks(2, _straddle_body, timeout_s=TIMEOUT_S)


# ---------------------------------------------------------------------------------------------
# hops like the previous one: the receive prepared ahead, the frame and header not parsed again
# ---------------------------------------------------------------------------------------------


def _alike_dicts(rows: int) -> list[dict]:
    """Hops that differ from the one before in one thing each: bytes only, dtype of the same
    size, dims swapped, a key renamed, a plain value (same length, then another), the payload
    size. Each is prepared for as a copy of the previous one's shape; the mismatches must be
    noticed, and every hop must still read exactly."""
    g = torch.Generator().manual_seed(rows)

    def t(shape, dtype=torch.bfloat16):
        return random_bytes(shape, dtype, g)

    return [
        {"h": t((rows, 64))},
        {"h": t((rows, 64))},
        {"h": t((rows, 64))},
        {"h": t((rows, 64), torch.float16)},
        {"h": t((64, rows))},
        {"g": t((rows, 64))},
        {"h": t((rows, 64))},
        {"h": t((rows, 64)), "s": "x"},
        {"h": t((rows, 64)), "s": "y"},
        {"h": t((rows, 64)), "s": "y"},
        {"h": t((rows, 64), torch.int16), "s": "y"},
        {"h": t((rows + 1, 64))},
        {"h": t((rows + 1, 64))},
        {"h": t((rows + 1, 32)), "i": t((rows + 1, 16), torch.int32)},
        {"h": t((rows + 1, 32)), "i": t((rows + 1, 16), torch.int32)},
        {"h": t((rows + 1, 64))},
    ]


def _alike_body(rank: int, world: int, transport: str, rows: int) -> None:
    _use(transport)
    hops = _alike_dicts(rows)
    if rank == 0:
        send_tensor_dict({"warm": 1})  # the link's first hop (and its switch to the ring, if any)
        for d in hops:
            send_tensor_dict(d)
        return
    assert recv_tensor_dict() == {"warm": 1}
    # every dict is kept until the end: a buffer made ready for one receive must never be one
    # a dict still held reads from
    got = [recv_tensor_dict() for _ in hops]
    for i, (g, d) in enumerate(zip(got, hops)):
        check_dict(g, d)
        assert not any(
            a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
            for a in g.values()
            if isinstance(a, torch.Tensor)
            for j, other in enumerate(got)
            if j != i
            for b in other.values()
            if isinstance(b, torch.Tensor)
        ), f"hop {i} shares a buffer with another hop still held"


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("rows", [3, 4096], ids=["small", "1MiB"])
def test_hops_like_the_previous_one_arrive_exactly(transport: str, rows: int) -> None:
    """The receive of a hop shaped like the previous one is made ready before it arrives, and
    its frame and header are not parsed again: each hop here differs from the one before in one
    way (or none), and all of them, kept alive together, hold exactly what was sent."""
    run_ranks(2, _alike_body, transport, rows, timeout_s=TIMEOUT_S)


def _keep_all_body(rank: int, world: int, transport: str, rows: int) -> None:
    _use(transport)
    n = 10 if rows < 4096 else 6  # more hops than the ring has slots (4)

    def hop(k: int) -> dict:
        return {"k": k, "x": torch.full((rows, 1024), float(k))}

    if rank == 0:
        send_tensor_dict({"k": -1})
        for k in range(n):
            send_tensor_dict(hop(k))
        return
    assert recv_tensor_dict() == {"k": -1}
    kept = [recv_tensor_dict() for _ in range(n)]  # e.g. activations kept for a backward pass
    for k, d in enumerate(kept):
        check_dict(d, hop(k))


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("rows", [256, 1536, 10240], ids=["1MiB", "6MiB", "40MiB"])
def test_a_receiver_keeping_every_hop_never_stalls_the_sender(transport: str, rows: int) -> None:
    """A stage that keeps every received dict alive (a training stage keeps its inputs for the
    backward pass): on the ring a hop is handed out in its slot only while what the receiver
    holds leaves the sender room for any next hop (two slots, their grown segments within half
    the ring's budget: 40 MiB hops are copied out from the second on), so kept hops never use
    up the ring and the sender never waits for them."""
    run_ranks(2, _keep_all_body, transport, rows, timeout_s=TIMEOUT_S)


def _burst_body(rank: int, world: int, transport: str, rows: int) -> None:
    _use(transport)
    peer = 1 - rank
    n = 12  # more hops than the ring has slots (4), posted by both ends before either receives

    def hop(src: int, k: int) -> dict:
        return {"src": src, "k": k, "x": torch.full((rows, 256), float(100 * src + k))}

    # a first exchange, so that the link runs on its final transport (auto: the ring)
    isend_tensor_dict(hop(rank, -1), peer)
    check_dict(recv_tensor_dict(peer), hop(peer, -1))
    flush()
    handles = [h for k in range(n) for h in isend_tensor_dict(hop(rank, k), peer)]
    for k in range(n):
        check_dict(recv_tensor_dict(peer), hop(peer, k))
    for h in handles:
        h.wait()
    flush()


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("rows", [4, 2048], ids=["4KiB", "2MiB"])
def test_both_ends_post_more_sends_than_the_ring_holds_before_receiving(
    transport: str, rows: int
) -> None:
    """Both ends post 12 sends to each other before either receives (gloo takes that): a posted
    send never waits for the receiver, so on the ring the hops that find no free slot wait on
    the sending end and move into the ring as the receiver frees slots, in order."""
    run_ranks(2, _burst_body, transport, rows, timeout_s=TIMEOUT_S)
