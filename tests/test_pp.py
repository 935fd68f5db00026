"""Multi-process tests of the PP transport (pipepack.pp) over gloo, on fork-started ranks.

Each test names the behaviour it protects (docs/design.md). Tensors are
compared bit-exactly as bytes, plain values by exact type and (for floats) exact bits. The
receiver rebuilds every expected dict from the same deterministic builder the sender used, so a
sender that overwrites its sources after ``isend`` cannot hide a missing copy.
"""

from __future__ import annotations

import collections
import dataclasses
import enum
import json
import os
import time
from collections.abc import Callable, Mapping
from typing import Any

import pytest
import torch
import torch.distributed as dist
from _checks import check_dict, check_tensor
from _dist import run_ranks

from pipepack.pp import (
    REAPER,
    Declared,
    Handle,
    PendingRecv,
    TensorDictChannel,
    irecv_tensor_dict,
    isend_tensor_dict,
    recv_tensor_dict,
    send_tensor_dict,
)

TIMEOUT_S = 60.0  # gloo group timeout per run: the CPU is shared, be generous


# ---------------------------------------------------------------------------------------------
# comparison helpers
# ---------------------------------------------------------------------------------------------


def _check_one_storage(d: Mapping[str, Any]) -> None:
    """Every tensor of one device type is a view of one buffer (zero-copy unpack)."""
    by_dev: dict[str, set[int]] = {}
    for v in d.values():
        if isinstance(v, torch.Tensor):
            by_dev.setdefault(v.device.type, set()).add(v.untyped_storage().data_ptr())
    for dev, ptrs in by_dev.items():
        assert len(ptrs) == 1, f"{dev} tensors live in {len(ptrs)} storages, expected 1"


def _wait_for_file(path: str, timeout: float = 30.0) -> None:
    t0 = time.monotonic()
    while not os.path.exists(path):
        assert time.monotonic() - t0 < timeout, f"{path} did not appear within {timeout} s"
        time.sleep(0.01)


def _touch(path: str, text: str = "") -> None:
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


# ---------------------------------------------------------------------------------------------
# the dicts engines send (deterministic builders: both ranks build the same dict)
# ---------------------------------------------------------------------------------------------


def _vllm_dict() -> dict[str, Any]:
    # vLLM's tests/distributed test dict ("a" is on CUDA there; everything is CPU here)
    return {
        "a": torch.arange(10, dtype=torch.float32),
        "b": torch.arange(20, dtype=torch.int8),
        "c": "test",
        "d": [1, 2, 3],
        "e": {"a": 1, "b": 2},
        "f": torch.tensor([], dtype=torch.float32),
    }


def _sglang_proxy_dict(num_tokens: int, seed: int) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    return {
        "hidden_states": torch.randn(num_tokens, 4096, generator=g).to(torch.bfloat16),
        "residual": torch.randn(num_tokens, 4096, generator=g).to(torch.bfloat16),
        "__msg_type__": "PPProxyTensors",
    }


def _output_dict(bs: int, seed: int) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    return {
        "next_token_ids": torch.randint(0, 32000, (bs,), generator=g, dtype=torch.int64),
        "logprobs": [None, 1, None],
        "finished": [False, True, None],
        "req_ids": ("req-0", "req-1", "req-2"),  # a tuple stays a tuple
        "lengths": [4, 5, 6],  # a list stays a list
        "is_prefill": True,  # a bool stays a bool (not 1)
        "num_steps": 1,
        "temperature": 0.7,
        "nan": float("nan"),
        "neg_zero": -0.0,
        "seed": 2**70,
        "blob": b"\x00\xffbytes",
        "dtype": torch.bfloat16,
        "shape": torch.Size([bs, 8]),
        "nested": {"a": (1, [2, (3,)]), "b": None, "c": {}},
        "empty_list": [],
        "empty_tuple": (),
        "none": None,
        "scalar": torch.tensor(7, dtype=torch.int64),  # 0-dim
        "flag": torch.tensor(True),  # 0-dim bool
        "probs": torch.rand(bs, 5, generator=g).to(torch.float16),
        "empty_2d": torch.zeros(0, 5, dtype=torch.int32),
    }


def _noncontig_dict(seed: int) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(6, 8, generator=g)
    return {
        "transposed": base.t(),
        "stepped": base[::2, 1::3],
        "expanded": torch.arange(5, dtype=torch.int32).expand(4, 5),  # stride 0
        "narrow": base[2:5, 3:],  # storage offset
        "column": base[:, 3],
        "bf16_t": base.to(torch.bfloat16).t(),
        "big_t": torch.randn(64, 300, generator=g).t(),  # 75 KiB: not inlined in the header
        "scalar_view": base[1, 2],  # 0-dim view into a larger storage
    }


def _overflow_dict(seed: int) -> dict[str, Any]:
    # plain values larger than the header slot: the header needs its overflow message
    g = torch.Generator().manual_seed(seed)
    return {
        "ids": torch.randint(0, 100, (3,), generator=g),
        "token_lists": [list(range(i, i + 50)) for i in range(200)],
        "msg": "x" * 20000,
    }


def _engine_dicts() -> list[dict[str, Any]]:
    return [
        _vllm_dict(),
        _sglang_proxy_dict(1, 1),  # 16 KiB: small enough to travel inline in the header
        _sglang_proxy_dict(7, 2),  # 112 KiB: a payload message
        _output_dict(3, 3),
        _noncontig_dict(4),
        _overflow_dict(5),
        _vllm_dict(),  # same schema again: header refers to the cached schema
    ]


def _engine_dicts_body(rank: int, world: int, api: str) -> None:
    if rank == 0:
        if api == "blocking":
            for d in _engine_dicts():
                assert send_tensor_dict(d) is None
        else:
            handles = []
            for d in _engine_dicts():
                hs = isend_tensor_dict(d)
                assert isinstance(hs, list) and all(isinstance(h, Handle) for h in hs)
                handles += hs
            for h in handles:  # waiting on send handles is allowed (the reaper waits too)
                h.wait()
                assert h.is_completed()
        return
    wants = _engine_dicts()
    if api == "blocking":
        for want in wants:
            got = recv_tensor_dict()
            check_dict(got, want, contiguous=True)
            _check_one_storage(got)
    else:
        # several hops in flight: post every receive before waiting on any
        posted = [irecv_tensor_dict() for _ in wants]
        for (got, handles, post), want in zip(posted, wants):
            for h in handles:
                h.wait()
                assert h.is_completed()
            assert post == [], "no all_gather_group: nothing to post-process"
            check_dict(got, want, contiguous=True)
            _check_one_storage(got)


@pytest.mark.parametrize("api", ["blocking", "async"])
def test_engine_dicts_round_trip_exactly(api: str) -> None:
    """vLLM / sglang / output / non-contiguous dicts arrive bit-exact, in key order and type."""
    run_ranks(2, _engine_dicts_body, api, timeout_s=TIMEOUT_S)


# ---------------------------------------------------------------------------------------------
# zero-copy: one buffer per device type
# ---------------------------------------------------------------------------------------------


def _storage_dicts() -> list[dict[str, Any]]:
    g = torch.Generator().manual_seed(7)
    return [
        # inline in the header
        {"a": torch.randn(4, 4, generator=g), "b": torch.arange(3), "c": torch.tensor(1.5)},
        # one payload message
        {
            "h": torch.randn(64, 128, generator=g),
            "i": torch.arange(100, dtype=torch.int32),
            "m": torch.ones(7, dtype=torch.bool),
            "e": torch.zeros(0),
            "s": "x",
        },
        # a payload above the chunk size: several messages into one buffer
        {
            "big": torch.randn(1200, 1024, generator=g),
            "small": torch.arange(5),
            "bf": torch.randn(3, 3, generator=g).to(torch.bfloat16),
        },
    ]


def _storage_body(rank: int, world: int) -> None:
    if rank == 0:
        for d in _storage_dicts():
            send_tensor_dict(d)
        return
    for want in _storage_dicts():
        got = recv_tensor_dict()
        check_dict(got, want, contiguous=True)
        _check_one_storage(got)
        tensors = [v for v in got.values() if isinstance(v, torch.Tensor)]
        nonempty = [t for t in tensors if t.numel()]
        ptrs = [t.data_ptr() for t in nonempty]
        assert len(set(ptrs)) == len(ptrs), "views overlap"
        storage = tensors[0].untyped_storage()
        lo, hi = storage.data_ptr(), storage.data_ptr() + storage.nbytes()
        for t in nonempty:
            assert lo <= t.data_ptr() and t.data_ptr() + t.nbytes <= hi
            assert t.data_ptr() % 16 == 0, "payload offsets are 16-byte aligned"


def test_received_tensors_are_views_of_one_payload_buffer() -> None:
    """Inline, single-message and chunked payloads all unpack as views of one storage."""
    run_ranks(2, _storage_body, timeout_s=TIMEOUT_S)


# ---------------------------------------------------------------------------------------------
# a 3-stage ring with the default dst/src
# ---------------------------------------------------------------------------------------------


def _ring_body(rank: int, world: int) -> None:
    prev = (rank - 1) % world
    for hop in range(6):
        t = hop + 1
        isend_tensor_dict(
            {
                "src": rank,
                "hop": hop,
                "x": torch.full((t, 8), float(rank * 100 + hop)),
                "ids": torch.arange(t) + rank,
            }
        )
        got = recv_tensor_dict()
        check_dict(
            got,
            {
                "src": prev,
                "hop": hop,
                "x": torch.full((t, 8), float(prev * 100 + hop)),
                "ids": torch.arange(t) + prev,
            },
            contiguous=True,
        )
    # a pipeline: stage 0 injects micro-batches, stages 1 and 2 each add (rank + 1) and forward,
    # and the ring brings them back to stage 0
    n_mb = 4
    if rank == 0:
        # isend: a blocking send completes only once the peer took the hop, and the ring's last
        # stage sends back to this rank before it receives
        for mb in range(n_mb):
            isend_tensor_dict({"mb": mb, "h": torch.full((mb + 2, 16), float(mb))})
        for mb in range(n_mb):
            got = recv_tensor_dict()
            check_dict(
                got, {"mb": mb, "h": torch.full((mb + 2, 16), float(mb + 2 + 3))}, contiguous=True
            )
    else:
        for _ in range(n_mb):
            got = recv_tensor_dict()
            send_tensor_dict({"mb": got["mb"], "h": got["h"] + (rank + 1)})


def test_three_stage_ring_default_peers() -> None:
    """Default dst/src are next/previous in the ring; hops pass through a 3-stage pipeline."""
    run_ranks(3, _ring_body, timeout_s=TIMEOUT_S)


# ---------------------------------------------------------------------------------------------
# 200 hops, changing shapes and schemas, sources overwritten right after isend
# ---------------------------------------------------------------------------------------------

N_HOPS = 200


def _hop_dict(i: int) -> dict[str, Any]:
    g = torch.Generator().manual_seed(10_000 + i)
    t = 1 + (i * 37) % 97
    if i % 50 == 25:
        t = 4500  # 4.6 MB of "hidden": above the chunk size (DEFAULT_CHUNK_BYTES)
    d: dict[str, Any] = {
        "step": i,
        "hidden": torch.randn(t, 256, generator=g),
        "positions": torch.randint(0, 1 << 20, (t,), generator=g),
        "mask": torch.rand(t, generator=g) > 0.5,
        "res_t": torch.randn(16, t, generator=g).to(torch.bfloat16).t(),  # non-contiguous
        "temp": torch.tensor(float(i) / 3.0),
        "meta": (i, "m", [None, i % 2 == 0]),
        "lst": [i, None],
    }
    if i % 2 == 0:
        # a key appears: a new schema. 70 distinct extras, > the 64-schema cache, and reused
        # once evicted, so the sender's mirror of the receiver's schema cache is exercised.
        k = (i // 2) % 70
        name = f"extra{k}"
        val: Any = (torch.arange(k % 5, dtype=torch.int32) + i) if k % 2 else [k, "v"]
        if k % 3 == 0:
            d = {name: val, **d}
        else:
            d[name] = val
    return d


def _overwrite(d: dict[str, Any], i: int) -> None:
    for v in d.values():
        if isinstance(v, torch.Tensor):
            if v.is_floating_point() and i % 2:
                v.normal_()
            else:
                v.fill_(-1)
        elif isinstance(v, list):
            v.clear()
            v.append("overwritten")


def _hops_body(rank: int, world: int, tmp: str) -> None:
    if rank == 0:
        for i in range(N_HOPS):
            d = _hop_dict(i)
            isend_tensor_dict(d)
            _overwrite(d, i)  # the pack copy must already have been taken
        # every hop was posted before the receiver posted a single receive: isend never
        # waits for the peer
        _touch(os.path.join(tmp, "all_sent"))
        return
    _wait_for_file(os.path.join(tmp, "all_sent"), timeout=TIMEOUT_S)
    kept = {}
    for i in range(N_HOPS):
        got = recv_tensor_dict()
        assert got["step"] == i, f"hop {got['step']} arrived in place of {i} (FIFO broken)"
        check_dict(got, _hop_dict(i), contiguous=True)
        _check_one_storage(got)
        if i in (0, 1, 25, 100, 175):
            kept[i] = got
    # earlier hops' views stay valid: later receives never reuse their buffers
    for i, got in kept.items():
        check_dict(got, _hop_dict(i), contiguous=True)


def test_200_hops_changing_shapes_fifo_and_sources_overwritten(tmp_path) -> None:
    """FIFO over 200 hops with varying T and schemas; isend copies before returning."""
    run_ranks(2, _hops_body, str(tmp_path), timeout_s=TIMEOUT_S)


# ---------------------------------------------------------------------------------------------
# TensorDictChannel: 3 micro-batches in flight, header path and declared path
# ---------------------------------------------------------------------------------------------

_MB_TOKENS = ([5, 1, 17], [3, 9, 2])


def _mb_dict(mb: int, num_tokens: int, sent_at: float = 0.0) -> dict[str, Any]:
    g = torch.Generator().manual_seed(500 + mb)
    return {
        "hidden_states": torch.randn(num_tokens, 64, generator=g).to(torch.bfloat16),
        "residual": torch.randn(64, num_tokens, generator=g).to(torch.bfloat16).t(),
        "positions": torch.arange(num_tokens) + mb,
        "mb": torch.tensor(mb),  # the FIFO counter (0-dim: static in a declaration)
        "sent_at": torch.tensor(sent_at, dtype=torch.float64),
        "__msg_type__": "proxy",
    }


def _declared() -> Declared:
    return Declared.from_example(_mb_dict(0, 4))


def _inflight_body(rank: int, world: int, mode: str, tmp: str) -> None:
    declared = _declared() if mode == "declared" else None
    if rank == 0:
        ch = TensorDictChannel(1, declared=declared)
        mb = 0
        for rnd, tokens in enumerate(_MB_TOKENS):
            # the receiver's irecv() calls returned before this rank sends anything: if they
            # waited for the peer, this wait would never end
            _wait_for_file(os.path.join(tmp, f"posted{rnd}"), timeout=TIMEOUT_S)
            for t in tokens:
                ch.isend(_mb_dict(mb, t, sent_at=time.monotonic()))
                mb += 1
        return
    ch = TensorDictChannel(0, declared=declared)
    mb0 = 0
    for rnd, tokens in enumerate(_MB_TOKENS):
        pending = [ch.irecv(num_tokens=t if declared else None) for t in tokens]
        posted_at = time.monotonic()
        assert all(isinstance(p, PendingRecv) for p in pending)
        assert not any(p.is_completed() for p in pending), "completed before the peer sent"
        _touch(os.path.join(tmp, f"posted{rnd}"), "1")
        order = range(len(tokens)) if rnd == 0 else reversed(range(len(tokens)))
        for j in order:  # round 0 waits in order, round 1 in reverse: FIFO either way
            got = pending[j].wait()
            want = _mb_dict(mb0 + j, tokens[j])
            sent_at = got["sent_at"].item()
            assert posted_at < sent_at, "irecv() returned only after the peer sent"
            want["sent_at"] = torch.tensor(sent_at, dtype=torch.float64)
            check_dict(got, want, contiguous=True)
            _check_one_storage(got)
            assert pending[j].is_completed()
            assert pending[j].wait() is got
        mb0 += len(tokens)
    ch.close()


@pytest.mark.parametrize("mode", ["header", "declared"])
def test_channel_three_microbatches_in_flight(mode: str, tmp_path) -> None:
    """irecv() returns before the peer sent; 3 posted receives complete in FIFO order."""
    run_ranks(2, _inflight_body, mode, str(tmp_path), timeout_s=TIMEOUT_S)


# ---------------------------------------------------------------------------------------------
# pp2 x tp2: TP-sliced hops rebuilt with one all-gather
# ---------------------------------------------------------------------------------------------

W_TP = 2


def _poisoned(true: torch.Tensor, tp_rank: int) -> torch.Tensor:
    """``true`` with every slice but this TP rank's own (``reshape(W, -1)[tp_rank]``) set to -7.

    The receiver can only rebuild ``true`` from these if each sender rank really sent its own
    slice and the receivers all-gathered them.
    """
    p = true.clone()
    flat = p.view(W_TP, -1)
    for r in range(W_TP):
        if r != tp_rank:
            flat[r].fill_(-7)
    return p


def _tp_hops(tp_rank: int, *, sender: bool) -> list[tuple[dict[str, Any], dict[str, bool], bool]]:
    """(dict, all_gather_tensors, expect a postprocess) per hop.

    With ``sender`` the sliceable keys are poisoned for ``tp_rank``; otherwise they hold the true
    values and the per-rank keys hold what sender TP rank ``tp_rank`` sent.
    """
    g = torch.Generator().manual_seed(77)
    hidden = torch.randn(6, 64, generator=g)
    residual = torch.randn(6, 64, generator=g).to(torch.bfloat16)
    big = torch.randn(128, 256, generator=g)
    big_t = torch.randn(256, 48, generator=g).t().contiguous()  # logical values
    own = torch.full((4,), 10.0 * tp_rank + 1)  # differs per TP rank; numel divides by 2
    own2 = torch.arange(64, dtype=torch.float32) * (tp_rank + 1)

    def p(t: torch.Tensor) -> torch.Tensor:
        return _poisoned(t, tp_rank) if sender else t

    hop0 = {
        "hidden_states": p(hidden),
        "residual": p(residual),
        "own": own,
        "odd": torch.arange(3),  # numel 3: not divisible by 2, travels whole
        "scalar": torch.tensor(2.5),  # numel 1: whole
        "empty": torch.zeros(0, 4),
        "__msg_type__": "proxy",
        "step": 0,
    }
    big_src = p(big_t)
    if sender:
        big_src = big_src.t().contiguous().t()  # a non-contiguous source, same logical values
    hop1 = {  # above the inline limit: a real payload message
        "hidden_states": p(big),
        "hidden_t": big_src,
        "ids": p(torch.arange(128)),
        "own": own2,
        "step": 1,
    }
    hop2 = {  # nothing sliced: no all-gather, no postprocess
        "odd": torch.arange(5),
        "own": own,
        "step": 2,
    }
    return [
        (hop0, {"own": False}, True),
        (hop1, {"own": False}, True),
        (hop2, {"own": False}, False),
    ]


def _pp_tp_body(rank: int, world: int) -> None:
    groups = [dist.new_group([0, 1]), dist.new_group([2, 3])]  # every rank, same order
    stage, tp_rank = divmod(rank, W_TP)
    tp = groups[stage]
    assert dist.get_rank(tp) == tp_rank
    if stage == 0:
        for d, agt, _ in _tp_hops(tp_rank, sender=True):
            send_tensor_dict(
                d, rank + W_TP, group=dist.group.WORLD, all_gather_group=tp, all_gather_tensors=agt
            )
        return
    for want, _, expect_post in _tp_hops(tp_rank, sender=False):
        got, handles, post = irecv_tensor_dict(
            rank - W_TP, group=dist.group.WORLD, all_gather_group=tp
        )
        for h in handles:
            h.wait()
        assert bool(post) == expect_post, f"step {want['step']}: postprocess {post}"
        for fn in post:
            fn()
        check_dict(got, want, contiguous=True)
        _check_one_storage(got)


def test_pp2_tp2_all_gather_rebuilds_sliced_keys() -> None:
    """Sliced keys come back whole via the TP all-gather; False and odd-numel keys travel whole."""
    run_ranks(4, _pp_tp_body, timeout_s=TIMEOUT_S)


# ---------------------------------------------------------------------------------------------
# bad input fails on the sender, before anything is sent
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Point:
    x: int
    label: str


class _Color(enum.IntEnum):
    RED = 1


def _evil_payload(path: str) -> None:
    _touch(path, "unpickled")


class _Evil:
    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Callable[[str], None], tuple[str]]:
        return _evil_payload, (self.path,)


def _good(i: int) -> dict[str, Any]:
    return {"x": torch.arange(4) + i, "bad": i, "big": torch.full((40, 200), float(i))}


def _bad_input_body(rank: int, world: int) -> None:
    if rank == 0:
        bad_cases: list[tuple[dict[Any, Any], type[Exception], str]] = [
            (
                {"x": torch.arange(4), "bad": object(), "big": torch.zeros(40, 200)},
                TypeError,
                r"'bad'",
            ),
            (
                {"x": torch.arange(4), "bad": _Point(1, "a"), "big": torch.zeros(40, 200)},
                TypeError,
                r"'bad'",
            ),
            ({"x": torch.arange(4), "bad": [1, (2, {"k": object()})]}, TypeError, r"'bad'"),
            ({"x": torch.arange(4), "nested": [torch.ones(2), object()]}, TypeError, r"'nested'"),
            ({"x": torch.arange(4), "enum": _Color.RED}, TypeError, r"'enum'"),
            ({"x": torch.arange(4), 3: "non-str key"}, TypeError, r"str"),
        ]
        send_tensor_dict(_good(0))
        for i, (bad, exc, match) in enumerate(bad_cases, start=1):
            with pytest.raises(exc, match=match):
                isend_tensor_dict(bad)
            # the same schema as the failed dict (bad value replaced): still decodable, so the
            # failed attempt cached nothing and put nothing on the wire
            send_tensor_dict(_good(i))
        return
    for i in range(7):
        check_dict(recv_tensor_dict(), _good(i), contiguous=True)


def test_unencodable_value_fails_on_sender_before_sending() -> None:
    """A value that needs pickle raises TypeError naming its key; nothing reaches the wire."""
    run_ranks(2, _bad_input_body, timeout_s=TIMEOUT_S)


def _pickle_body(rank: int, world: int, tmp: str) -> None:
    evil_marker = os.path.join(tmp, "evil_ran")
    if rank == 0:
        send_tensor_dict(
            {
                "x": torch.arange(3),
                "obj": _Point(3, "p"),
                "enum": _Color.RED,
                "od": collections.OrderedDict(a=1),
            },
            allow_pickle=True,
        )
        # a pickled value to a receiver that did not opt in (a fresh channel pair, so both ends'
        # channel state starts in step; no tensors, so nothing follows the refused header)
        TensorDictChannel(1, allow_pickle=True).isend({"obj": _Evil(evil_marker)})
        return
    got = recv_tensor_dict(allow_pickle=True)
    check_tensor(got["x"], torch.arange(3), "x")
    assert type(got["obj"]) is _Point and got["obj"] == _Point(3, "p")
    assert type(got["enum"]) is _Color and got["enum"] is _Color.RED
    assert type(got["od"]) is collections.OrderedDict and got["od"] == {"a": 1}
    with pytest.raises(ValueError, match="pickle"):
        TensorDictChannel(0).recv()
    assert not os.path.exists(evil_marker), "a peer's pickle ran without allow_pickle"


def test_allow_pickle_round_trips_custom_objects_and_is_refused_by_default(tmp_path) -> None:
    """allow_pickle on both ends carries custom objects; a default receiver never unpickles."""
    run_ranks(2, _pickle_body, str(tmp_path), timeout_s=TIMEOUT_S)


def _refused_then_next_body(rank: int, world: int, tmp: str) -> None:
    n = 10_000  # 40 KB: the tensor bytes travel after the header, as their own message
    if rank == 0:
        ch = TensorDictChannel(1, allow_pickle=True)
        ch.isend({"t": torch.zeros(n), "obj": _Point(1, "refused")})
        ch.isend({"t": torch.ones(n), "other": 1})  # a new schema: its header is self-contained
        _wait_for_file(os.path.join(tmp, "result1.json"), timeout=TIMEOUT_S)
        os._exit(0)  # hop 1's payload may never be received: do not drain the send reaper
    ch = TensorDictChannel(0)
    with pytest.raises(ValueError, match="pickle"):
        ch.recv()
    try:
        got = ch.irecv().wait(timeout=10)
    except Exception as e:  # noqa: BLE001 - refusing the broken channel is fine
        _record(tmp, rank, outcome="raised", error=repr(e))
        return
    _record(tmp, rank, outcome="returned")
    check_dict(got, {"t": torch.ones(n), "other": 1}, contiguous=True)


def test_receive_error_does_not_corrupt_the_next_receive(tmp_path) -> None:
    """After a refused header, the next receive raises or returns that hop's own bytes."""
    run_ranks(2, _refused_then_next_body, str(tmp_path), timeout_s=TIMEOUT_S)
    assert _result(tmp_path, 1)["outcome"] in ("raised", "returned")


# ---------------------------------------------------------------------------------------------
# declared layouts are validated, never trusted blindly
# ---------------------------------------------------------------------------------------------


def _mismatch_example(num_tokens: int, variant: str) -> dict[str, Any]:
    g = torch.Generator().manual_seed(9)
    h = torch.randn(num_tokens, 4, 16, generator=g).to(torch.bfloat16)
    d = {"h": h, "pos": torch.arange(num_tokens), "__msg_type__": "proxy"}
    if variant == "dtype":  # same byte size, different dtype
        d["h"] = h.to(torch.float16)
    elif variant == "constant":
        d["__msg_type__"] = "other"
    elif variant == "static_dims":  # same numel and ndim, different trailing dims
        d["h"] = h.reshape(num_tokens, 16, 4)
    return d


def _declared_mismatch_body(rank: int, world: int, variant: str) -> None:
    if rank == 0:
        ch = TensorDictChannel(1, declared=Declared.from_example(_mismatch_example(1, variant)))
        ch.isend(_mismatch_example(6, variant))  # valid against the sender's own declaration
        return
    ch = TensorDictChannel(0, declared=Declared.from_example(_mismatch_example(1, "receiver")))
    with pytest.raises(ValueError, match="declared"):
        ch.irecv(num_tokens=6).wait()


@pytest.mark.parametrize(
    "variant",
    [
        "dtype",
        "constant",
        "static_dims",
    ],
)
def test_declared_schema_mismatch_raises_on_receive(variant: str) -> None:
    """Peers that declared different schemas: the receiver's wait() raises, naming it."""
    run_ranks(2, _declared_mismatch_body, variant, timeout_s=TIMEOUT_S)


def _declared_send_check_body(rank: int, world: int) -> None:
    declared = _declared()
    if rank == 0:
        ch = TensorDictChannel(1, declared=declared)
        good = _mb_dict(0, 5)
        bad_cases = []
        d = dict(good, residual=good["residual"].to(torch.float16))
        bad_cases.append((d, "residual"))  # dtype
        d = dict(good, hidden_states=torch.zeros(5, 65, dtype=torch.bfloat16))
        bad_cases.append((d, "hidden_states"))  # trailing dim
        d = dict(good, positions=torch.arange(6))
        bad_cases.append((d, "positions"))  # token count differs between keys
        d = dict(good, __msg_type__="other")
        bad_cases.append((d, "__msg_type__"))  # constant
        d = dict(good, mb=torch.tensor([0]))
        bad_cases.append((d, "mb"))  # ndim
        for d, key in bad_cases:
            with pytest.raises(ValueError, match=repr(key)):
                ch.isend(d)
        with pytest.raises(ValueError, match="keys"):
            ch.isend({k: v for k, v in good.items() if k != "positions"})
        ch.isend(good)
        ch.isend(_mb_dict(1, 2))
        return
    ch = TensorDictChannel(0, declared=declared)
    # the fingerprint carries a sequence number: a failed send that consumed one would fail
    # here too
    check_dict(ch.irecv(num_tokens=5).wait(), _mb_dict(0, 5), contiguous=True)
    check_dict(ch.irecv(num_tokens=2).wait(), _mb_dict(1, 2), contiguous=True)


def test_declared_send_rejects_dict_not_matching_its_declaration() -> None:
    """A dict that breaks the sender's own declaration raises ValueError naming the key."""
    run_ranks(2, _declared_send_check_body, timeout_s=TIMEOUT_S)


# ---------------------------------------------------------------------------------------------
# a dead or silent peer surfaces as an exception, never a hang
# ---------------------------------------------------------------------------------------------

DEAD_TIMEOUT_S = 10.0  # the gloo group timeout in these runs


def _record(tmp: str, rank: int, **info: Any) -> None:
    _touch(os.path.join(tmp, f"result{rank}.json"), json.dumps(info))


def _result(tmp_path, rank: int) -> dict[str, Any]:
    path = tmp_path / f"result{rank}.json"
    assert path.exists(), f"rank {rank} recorded no result"
    return json.loads(path.read_text())


def _dead_sender_body(rank: int, world: int, when: str, tmp: str) -> None:
    if rank == 0:
        if when == "after_one_hop":
            send_tensor_dict({"x": torch.arange(4)})
            REAPER.drain(DEAD_TIMEOUT_S)
        time.sleep(0.2)
        os._exit(0)  # dies without sending the hop the receiver waits for
    if when == "after_one_hop":
        check_dict(recv_tensor_dict(), {"x": torch.arange(4)}, contiguous=True)
    t0 = time.monotonic()
    try:
        recv_tensor_dict()
    except Exception as e:  # noqa: BLE001 - any exception is the expected outcome
        _record(tmp, rank, raised=True, error=repr(e), elapsed=time.monotonic() - t0)
    else:
        _record(tmp, rank, raised=False, elapsed=time.monotonic() - t0)


@pytest.mark.parametrize("when", ["at_start", "after_one_hop"])
def test_receiver_raises_when_sender_process_exits(tmp_path, when: str) -> None:
    """A receive from a peer that died raises within the group timeout instead of hanging."""
    t0 = time.monotonic()
    run_ranks(2, _dead_sender_body, when, str(tmp_path), timeout_s=DEAD_TIMEOUT_S)
    res = _result(tmp_path, 1)
    assert res["raised"], "the receive from a dead peer returned"
    assert res["elapsed"] < DEAD_TIMEOUT_S, res
    assert time.monotonic() - t0 < DEAD_TIMEOUT_S + 10


def _dead_receiver_body(rank: int, world: int, tmp: str) -> None:
    if rank == 1:
        check_dict(recv_tensor_dict(), {"x": torch.arange(4)}, contiguous=True)
        os._exit(0)
    send_tensor_dict({"x": torch.arange(4)})
    t0 = time.monotonic()
    try:
        while time.monotonic() - t0 < 2 * DEAD_TIMEOUT_S:
            isend_tensor_dict({"x": torch.zeros(50_000)})
            time.sleep(0.01)
    except Exception as e:  # noqa: BLE001 - any exception is the expected outcome
        _record(tmp, rank, raised=True, error=repr(e), elapsed=time.monotonic() - t0)
    else:
        _record(tmp, rank, raised=False, elapsed=time.monotonic() - t0)


def test_sender_raises_when_receiver_process_exits(tmp_path) -> None:
    """Sends to a dead peer fail (on isend, or re-raised by the next one) rather than pile up."""
    run_ranks(2, _dead_receiver_body, str(tmp_path), timeout_s=DEAD_TIMEOUT_S)
    res = _result(tmp_path, 0)
    assert res["raised"], "isend kept succeeding towards a dead peer"
    assert res["elapsed"] < DEAD_TIMEOUT_S, res


CHANNEL_TIMEOUT_S = 1.0
SLOW_GROUP_TIMEOUT_S = 30.0


def _silent_peer_body(rank: int, world: int, mode: str, tmp: str) -> None:
    declared = _declared() if mode == "declared" else None
    if rank == 0:
        # alive, but never sends; waits until the receiver gave up
        _wait_for_file(os.path.join(tmp, "result1.json"), timeout=SLOW_GROUP_TIMEOUT_S)
        return
    ch = TensorDictChannel(0, declared=declared, timeout=CHANNEL_TIMEOUT_S)
    t0 = time.monotonic()
    pending = ch.irecv(num_tokens=4 if declared else None)
    try:
        pending.wait()
    except Exception as e:  # noqa: BLE001 - any exception is the expected outcome
        _record(tmp, rank, raised=True, error=repr(e), elapsed=time.monotonic() - t0)
    else:
        _record(tmp, rank, raised=False, elapsed=time.monotonic() - t0)
    ch.close()


@pytest.mark.parametrize("mode", ["header", "declared"])
def test_channel_timeout_bounds_the_wait(tmp_path, mode: str) -> None:
    """TensorDictChannel(timeout=1) gives up after ~1 s although the group timeout is 30 s."""
    t0 = time.monotonic()
    run_ranks(2, _silent_peer_body, mode, str(tmp_path), timeout_s=SLOW_GROUP_TIMEOUT_S)
    res = _result(tmp_path, 1)
    assert res["raised"], "wait() returned without a message"
    assert CHANNEL_TIMEOUT_S * 0.9 <= res["elapsed"] < CHANNEL_TIMEOUT_S + 4, res
    assert time.monotonic() - t0 < SLOW_GROUP_TIMEOUT_S


# ---------------------------------------------------------------------------------------------
# world_size == 1
# ---------------------------------------------------------------------------------------------


def _check_alone(group: dist.ProcessGroup | None) -> None:
    d = {"x": torch.arange(3), "s": "v"}
    assert send_tensor_dict(d, group=group) is d
    assert recv_tensor_dict(group=group) is None
    assert isend_tensor_dict(d, group=group) == []
    assert irecv_tensor_dict(group=group) == (None, [], [])


def _alone_body(rank: int, world: int) -> None:
    if world == 1:
        _check_alone(None)
        _check_alone(dist.group.WORLD)
    singles = [dist.new_group([r]) for r in range(world)]  # every rank, same order
    _check_alone(singles[rank])


@pytest.mark.parametrize("world", [1, 2])
def test_world_size_one_short_circuits(world: int) -> None:
    """A 1-rank group (the world, or a subgroup) sends nothing: vLLM's / sglang's return values."""
    run_ranks(world, _alone_body, timeout_s=TIMEOUT_S)


def test_no_process_group_raises() -> None:
    """Without an initialised process group every call raises: a dropped hop is data loss."""
    assert not dist.is_initialized()
    d = {"x": torch.arange(3)}
    for call in (
        lambda: send_tensor_dict(d),
        lambda: isend_tensor_dict(d),
        lambda: recv_tensor_dict(),
        lambda: irecv_tensor_dict(),
        lambda: TensorDictChannel(1),
    ):
        with pytest.raises(RuntimeError, match="not initialised"):
            call()


# ---------------------------------------------------------------------------------------------
# delivery into caller-owned (static) buffers
# ---------------------------------------------------------------------------------------------


def _wait_into_body(rank: int, world: int, declared: bool) -> None:
    example = {"h": torch.zeros(4, 8, dtype=torch.bfloat16), "r": torch.zeros(4, 8), "m": "x"}
    ch = TensorDictChannel(1 - rank, declared=Declared.from_example(example) if declared else None)
    h = torch.arange(24.0).reshape(3, 8).to(torch.bfloat16)
    r = torch.randn(3, 8)
    if rank == 0:
        ch.isend({"h": h, "r": r, "m": "x"})
        return
    static_h = torch.full((16, 8), -7.0, dtype=torch.bfloat16)  # sized for the largest batch
    static_r = torch.full((16, 8), -7.0)
    pending = ch.irecv(3) if declared else ch.irecv()
    got = pending.wait_into({"h": static_h, "r": static_r})
    assert torch.equal(static_h[:3].view(torch.int16), h.view(torch.int16))
    assert torch.equal(static_r[:3].view(torch.int32), r.view(torch.int32))
    assert (static_h[3:] == -7).all() and (static_r[3:] == -7).all()  # rows after n untouched
    assert got["h"].data_ptr() == static_h.data_ptr() and got["h"].shape == (3, 8)
    assert got["m"] == "x"


@pytest.mark.parametrize("declared", [False, True], ids=["header", "declared"])
def test_wait_into_lands_in_static_buffers(declared: bool) -> None:
    """PendingRecv.wait_into copies the hop into larger static buffers, rows after n kept."""
    run_ranks(2, _wait_into_body, declared, timeout_s=TIMEOUT_S)


def _recv_reuse_body(rank: int, world: int, declared: bool) -> None:
    def hop(i: int) -> dict[str, Any]:
        return {"h": torch.full((64, 1024), float(i)), "kind": "proxy"}  # 256 KiB: pooled

    ch = TensorDictChannel(1 - rank, declared=Declared.from_example(hop(0)) if declared else None)
    n = 12
    if rank == 0:
        for i in range(n):
            ch.isend(hop(i))
        return
    kept, seen = {}, set()
    reused = 0
    for i in range(n):
        d = ch.irecv(64).wait() if declared else ch.irecv().wait()
        ptr = d["h"].untyped_storage().data_ptr()
        reused += ptr in seen
        seen.add(ptr)
        if i % 2 == 0:
            kept[i] = d  # the caller keeps these: their buffers must never be reused
    for i, d in kept.items():
        check_dict(d, hop(i), contiguous=True)
    assert reused > 0, "no receive buffer was ever reused"


@pytest.mark.parametrize("declared", [False, True], ids=["header", "declared"])
def test_receive_buffers_are_reused_only_when_the_caller_let_go(declared: bool) -> None:
    """Receive buffers come back for later hops, but never while a received dict holds them."""
    run_ranks(2, _recv_reuse_body, declared, timeout_s=TIMEOUT_S)
