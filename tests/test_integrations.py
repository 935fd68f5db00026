"""The sglang and vLLM adapters (pipepack.integrations), driven with the engines' call sequences.

A stand-in GroupCoordinator (``ranks``, ``world_size``, ``rank_in_group``, ``device_group``,
``cpu_group``) is built from real gloo groups; its own methods are the engine-shaped per-tensor
transport of ``pipepack.testing.baselines``, which the adapters replace on one instance. Every
received dict is compared bit-exactly with what the engine's transport delivers, computed from
its rules (:func:`_engine_delivery`) out of the dicts every sender TP rank built: the same call
sequence also runs un-patched, so the reference is checked against that transport too.

Layouts: ``pp2`` (2 ranks), ``pp2xtp2`` (4 ranks: PP groups {0,2} and {1,3}, attention-TP
groups {0,1} and {2,3} passed as ``all_gather_group``), ``pp4`` (a ring of 4 PP ranks). Global
rank = stage * tp + tp_rank.
"""

from __future__ import annotations

import fractions
from collections.abc import Mapping
from typing import Any

import pytest
import torch
import torch.distributed as dist

from pipepack.integrations import sglang as pp_sglang
from pipepack.integrations import vllm as pp_vllm
from pipepack.testing import baselines, check_dict, run_ranks

TIMEOUT_S = 60.0
H = 64  # hidden size: T * H divides by the TP size for every T
LAYOUTS = {"pp2": (2, 1), "pp2xtp2": (2, 2), "pp4": (4, 1)}  # name -> (pp, tp)


ENGINE = baselines


# ---------------------------------------------------------------------------------------------
# stand-in GroupCoordinators: the engines' attributes, their own per-tensor transport
# ---------------------------------------------------------------------------------------------


# the engine-shaped stand-ins, with the engines' own per-tensor transport
_Coordinator = baselines.Coordinator
_SglangGroup = baselines.SglangCoordinator
_VllmGroup = baselines.VllmCoordinator


def _groups(rank: int, pp: int, tp: int, cls: type) -> tuple[Any, _Coordinator]:
    """This rank's PP coordinator (``cls``) and attention-TP coordinator (1 rank when tp=1).

    Each group is a device group and a separate CPU group, created on every rank in one order.
    """
    pp_lists = [[s * tp + j for s in range(pp)] for j in range(tp)]
    tp_lists = [[s * tp + j for j in range(tp)] for s in range(pp)]
    mine: dict[str, Any] = {}
    for name, lists, kind in (("pp", pp_lists, cls), ("tp", tp_lists, _Coordinator)):
        for ranks in lists:
            dev, cpu = dist.new_group(ranks), dist.new_group(ranks)
            if rank in ranks:
                mine[name] = kind(dev, cpu, ranks=ranks)
    return mine["pp"], mine["tp"]


def _adapter(engine: str):
    return pp_sglang if engine == "sglang" else pp_vllm


# ---------------------------------------------------------------------------------------------
# the dicts (deterministic: a receiver rebuilds what each sender TP rank sent)
# ---------------------------------------------------------------------------------------------


def _gen(*key: int) -> torch.Generator:
    seed = 0
    for k in key:
        seed = seed * 1_000_003 + k + 1
    return torch.Generator().manual_seed(seed % (2**63))


def _tokens(step: int) -> int:
    return [5, 1, 64, 3, 130, 16, 2, 33][step % 8]


def _proxy(step: int, stage: int, tp_rank: int) -> dict[str, Any]:
    """sglang's PP proxy dict; the values differ per TP rank (the slicing rule shows)."""
    g = _gen(1, step, stage, tp_rank)
    T = _tokens(step + stage)
    return {
        "hidden_states": torch.randn(T, H, generator=g).to(torch.bfloat16),
        "residual": torch.randn(T, H, generator=g).to(torch.bfloat16),
        "__msg_type__": "proxy",
    }


def _output(step: int, stage: int, tp_rank: int) -> dict[str, Any]:
    """sglang's output dict; logprob keys every other step, some as lists of per-request
    tensors (empty ones included)."""
    g = _gen(2, step, stage, tp_rank)
    bs = [3, 8, 1, 6, 16, 2][step % 6]
    d: dict[str, Any] = {
        "next_token_ids": torch.randint(0, 32000, (bs,), generator=g, dtype=torch.int32),
    }
    if step % 2 == 0:
        lens = [(7 * i + step) % 5 for i in range(bs)]
        d["next_token_logprobs"] = -torch.rand(bs, generator=g)
        d["input_token_logprobs_val"] = [-torch.rand(n, generator=g) for n in lens]
        d["output_top_logprobs_val"] = [-torch.rand(2, generator=g) for _ in range(bs)]
        d["output_top_logprobs_idx"] = [
            torch.randint(0, 32000, (2,), generator=g) for _ in range(bs)
        ]
    d["__msg_type__"] = "output"
    return d


def _intermediate(step: int, tp_rank: int) -> dict[str, Any]:
    """vLLM's intermediate tensors plus what else its send_tensor_dict carries."""
    g = _gen(3, step, tp_rank)
    T = _tokens(step)
    return {
        "hidden_states": torch.randn(T, H, generator=g).to(torch.bfloat16),
        "residual": torch.randn(T, H, generator=g),
        "positions": torch.arange(T) + 100 * step + tp_rank,  # odd T: numel not divisible
        "scale": torch.tensor(0.5 * step + tp_rank),  # numel 1: whole
        "empty": torch.zeros(0, H),
        "step": step,
        "tag": "intermediate",
    }


def _agt(step: int) -> dict[str, bool] | None:
    return [None, {"residual": False}, {"hidden_states": False, "positions": True}][step % 3]


# ---------------------------------------------------------------------------------------------
# the reference: what the engine's own transport delivers
# ---------------------------------------------------------------------------------------------


def _engine_delivery(
    sent: list[Mapping[str, Any]],
    tp_rank: int,
    world: int,
    all_gather_tensors: Mapping[str, bool] | None = None,
) -> dict[str, Any]:
    """The dict TP rank ``tp_rank`` of the receiving stage gets; ``sent[r]``: the dict sender
    TP rank r sent (each receiver's peer is the sender of the same TP rank).

    The metadata (keys, shapes, plain values, nested values) is the peer's. A top-level
    non-empty tensor whose numel divides by ``world`` (> 1), unless ``all_gather_tensors`` maps
    it to False, is sent as ``t.reshape(world, -1)[r]`` by each sender rank r and all-gathered:
    row r of the result comes from sender rank r. Every other value is the peer's own.
    """
    out: dict[str, Any] = {}
    for k, v in sent[tp_rank].items():
        if (
            isinstance(v, torch.Tensor)
            and world > 1
            and v.numel() > 0
            and v.numel() % world == 0
            and (all_gather_tensors or {}).get(k, True)
        ):
            rows = [sent[r][k].reshape(world, -1)[r] for r in range(world)]
            out[k] = torch.stack(rows).reshape(v.shape)
        else:
            out[k] = v
    return out


def _flat(d: Mapping[str, Any]) -> dict[str, Any]:
    """Nested lists/tuples/dicts spelled out as top-level paths, so check_dict compares every
    tensor inside them bit-exactly too (containers compare by type, length and keys)."""
    out: dict[str, Any] = {}

    def walk(path: str, v: Any) -> None:
        if isinstance(v, (list, tuple)):
            out[path] = (type(v).__name__, len(v))
            for i, x in enumerate(v):
                walk(f"{path}[{i}]", x)
        elif isinstance(v, dict):
            out[path] = ("dict", [repr(k) for k in v])
            for k, x in v.items():
                walk(f"{path}[{k!r}]", x)
        else:
            out[path] = v

    for k, v in d.items():
        walk(k, v)
    return out


def _check(
    got: Any,
    sent: list[Mapping[str, Any]],
    tp: _Coordinator,
    all_gather_tensors: Mapping[str, bool] | None = None,
) -> None:
    want = _engine_delivery(sent, tp.rank_in_group, tp.world_size, all_gather_tensors)
    assert isinstance(got, dict), f"received {type(got).__name__}"
    check_dict(_flat(got), _flat(want))


def _scribble(d: Mapping[str, Any]) -> None:
    """Overwrites every tensor of a sent dict (nested ones too): the hop must not care."""

    def walk(v: Any) -> None:
        if isinstance(v, torch.Tensor):
            v.reshape(-1).view(torch.uint8).fill_(0xA5)
        elif isinstance(v, (list, tuple)):
            for x in v:
                walk(x)
        elif isinstance(v, dict):
            for x in v.values():
                walk(x)

    for v in d.values():
        walk(v)


def _check_works(works: Any, transport: str, async_send: bool) -> None:
    assert isinstance(works, list), f"send returned {type(works).__name__}, not a list"
    if not async_send:
        assert works == [], f"a blocking send returns [], got {works!r}"
        return
    for w in works:
        assert callable(w.work.wait), "a work has .work.wait()"
        assert hasattr(w, "payload")
        if transport == "pipepack":
            assert w.payload is None, "the adapter holds nothing of the caller's"


# ---------------------------------------------------------------------------------------------
# sglang: the scheduler's PP loop
# ---------------------------------------------------------------------------------------------


def _sglang_loop(
    rank: int,
    world: int,
    layout: str,
    transport: str,
    async_send: bool,
    allow_pickle: bool,
    steps: int,
) -> None:
    """Per step: the proxy dict goes down the pipeline (blocking receive, async send, at most
    one in flight), then the output dicts go round the PP ring, even PP ranks sending first
    and odd ones receiving first (at most one output send in flight). Both with
    ``all_gather_group`` = the attention-TP coordinator."""
    pp_size, tp_size = LAYOUTS[layout]
    pp, tp = _groups(rank, pp_size, tp_size, _SglangGroup)
    if transport == "pipepack":
        pp_sglang.install(pp, allow_pickle=allow_pickle)
    r, P, j = pp.rank_in_group, pp.world_size, tp.rank_in_group
    prev = (r - 1) % P
    proxy_works: list = []
    output_works: list = []

    def send(d: dict[str, Any], works: list) -> list:
        for w in works:  # the previous send of this kind
            w.work.wait()
        new = pp.send_tensor_dict(tensor_dict=d, all_gather_group=tp, async_send=async_send)
        _check_works(new, transport, async_send)
        if transport == "pipepack":
            _scribble(d)  # sources reusable as soon as the send returns
        return new

    for s in range(steps):
        if r > 0:
            got = pp.recv_tensor_dict(all_gather_group=tp)
            _check(got, [_proxy(s, prev, t) for t in range(tp.world_size)], tp)
        if r < P - 1:
            proxy_works = send(_proxy(s, r, j), proxy_works)
        want = [_output(s, prev, t) for t in range(tp.world_size)]
        if r % 2 == 0:
            output_works = send(_output(s, r, j), output_works)
            got = pp.recv_tensor_dict(all_gather_group=tp)
        else:
            got = pp.recv_tensor_dict(all_gather_group=tp)
            output_works = send(_output(s, r, j), output_works)
        _check(got, want, tp)
    for w in proxy_works + output_works:
        w.work.wait()


_SGLANG_CASES = [
    # layout, transport, async_send, allow_pickle
    ("pp2", "engine", True, False),
    ("pp2", "pipepack", True, False),
    ("pp2", "pipepack", False, False),
    ("pp2", "pipepack", True, True),
    ("pp2xtp2", "engine", True, False),
    ("pp2xtp2", "pipepack", True, False),
    ("pp2xtp2", "pipepack", False, True),
    ("pp4", "pipepack", False, False),
]


@pytest.mark.parametrize(
    "layout,transport,async_send,allow_pickle",
    _SGLANG_CASES,
    ids=[
        f"{lay}-{tr}-{'async' if a else 'blocking'}{'-pickle' if p else ''}"
        for lay, tr, a, p in _SGLANG_CASES
    ],
)
def test_sglang_scheduler_loop_delivers_what_the_engine_would(
    layout: str, transport: str, async_send: bool, allow_pickle: bool
) -> None:
    """Proxy and output dicts (lists of per-request logprob tensors, changing token counts and
    batch sizes, ``__msg_type__``) arrive bit-exact as sglang's transport delivers them."""
    pp_size, tp_size = LAYOUTS[layout]
    run_ranks(
        pp_size * tp_size,
        _sglang_loop,
        layout,
        transport,
        async_send,
        allow_pickle,
        6,
        timeout_s=TIMEOUT_S,
    )


# ---------------------------------------------------------------------------------------------
# vLLM: PP intermediate tensors, blocking and async
# ---------------------------------------------------------------------------------------------


def _vllm_loop(rank: int, world: int, layout: str, transport: str, mode: str, steps: int) -> None:
    """Stage 0 sends vLLM's intermediate tensors to stage 1 with ``all_gather_group`` = TP and
    a per-step ``all_gather_tensors``. ``sync``: send_tensor_dict / recv_tensor_dict.
    ``async``: isend_tensor_dict, handles waited two hops later; irecv_tensor_dict posted one
    hop ahead of the waits and postprocess calls."""
    pp_size, tp_size = LAYOUTS[layout]
    pp, tp = _groups(rank, pp_size, tp_size, _VllmGroup)
    if transport == "pipepack":
        pp_vllm.install(pp)
    j, W = tp.rank_in_group, tp.world_size
    if pp.rank_in_group == 0:
        in_flight: list[list] = []
        for s in range(steps):
            d = _intermediate(s, j)
            if mode == "sync":
                ret = pp.send_tensor_dict(d, all_gather_group=tp, all_gather_tensors=_agt(s))
                assert ret is None, f"send_tensor_dict returned {ret!r}"
            else:
                if len(in_flight) == 2:
                    for h in in_flight.pop(0):
                        h.wait()
                handles = pp.isend_tensor_dict(d, all_gather_group=tp, all_gather_tensors=_agt(s))
                assert isinstance(handles, list)
                in_flight.append(handles)
            if transport == "pipepack":
                _scribble(d)
        for hs in in_flight:
            for h in hs:
                h.wait()
        return
    if mode == "sync":
        for s in range(steps):
            got = pp.recv_tensor_dict(all_gather_group=tp, all_gather_tensors=_agt(s))
            _check(got, [_intermediate(s, t) for t in range(W)], tp, _agt(s))
        return
    posted: list = []
    for s in range(steps + 1):
        if s < steps:
            ret = pp.irecv_tensor_dict(all_gather_group=tp, all_gather_tensors=_agt(s))
            assert isinstance(ret, tuple) and len(ret) == 3
            posted.append((s, ret))
        if len(posted) == 2 or (s == steps and posted):
            k, (got, handles, post) = posted.pop(0)
            for h in handles:
                h.wait()
            for fn in post:
                fn()
            _check(got, [_intermediate(k, t) for t in range(W)], tp, _agt(k))


_VLLM_CASES = [
    ("pp2", "engine", "async"),
    ("pp2", "pipepack", "sync"),
    ("pp2", "pipepack", "async"),
    ("pp2xtp2", "engine", "sync"),
    ("pp2xtp2", "engine", "async"),
    ("pp2xtp2", "pipepack", "sync"),
    ("pp2xtp2", "pipepack", "async"),
]


@pytest.mark.parametrize(
    "layout,transport,mode", _VLLM_CASES, ids=[f"{lay}-{tr}-{m}" for lay, tr, m in _VLLM_CASES]
)
def test_vllm_pp_hops_deliver_what_the_engine_would(layout: str, transport: str, mode: str) -> None:
    """vLLM's sync and async pairs, with all_gather_tensors, arrive bit-exact."""
    pp_size, tp_size = LAYOUTS[layout]
    run_ranks(pp_size * tp_size, _vllm_loop, layout, transport, mode, 7, timeout_s=TIMEOUT_S)


# ---------------------------------------------------------------------------------------------
# install / uninstall
# ---------------------------------------------------------------------------------------------


def _lone(cls: type) -> _Coordinator:
    return cls(None, None, ranks=[0], rank=0)


@pytest.mark.parametrize("engine", ["sglang", "vllm"])
def test_install_patches_one_instance_and_uninstall_restores_it(engine: str) -> None:
    cls = _SglangGroup if engine == "sglang" else _VllmGroup
    adapter = _adapter(engine)
    names = ["send_tensor_dict", "recv_tensor_dict"]
    if engine == "vllm":
        names += ["isend_tensor_dict", "irecv_tensor_dict"]
    g, other = _lone(cls), _lone(cls)

    def theirs(*args, **kwargs):  # an instance attribute someone set before
        return "theirs"

    g.recv_tensor_dict = theirs
    before = dict(vars(g))
    class_methods = {n: cls.__dict__[n] for n in names}

    assert adapter.install(g) is g
    for n in names:
        assert getattr(g, n).__func__.__module__ == adapter.__name__, n
        assert cls.__dict__[n] is class_methods[n], f"{n}: the class was patched"
        assert getattr(other, n).__func__ is class_methods[n], f"{n}: another instance changed"
    patched = {n: getattr(g, n) for n in names}
    adapter.install(g)  # same options again: nothing changes
    assert all(getattr(g, n) is patched[n] for n in names)
    with pytest.raises(RuntimeError, match="already installed"):
        adapter.install(g, allow_pickle=True)
    with pytest.raises(RuntimeError, match="already installed"):
        _adapter("vllm" if engine == "sglang" else "sglang").install(g)

    assert adapter.uninstall(g) is g
    assert vars(g) == before
    assert g.recv_tensor_dict is theirs
    assert g.send_tensor_dict.__func__ is class_methods["send_tensor_dict"]
    with pytest.raises(ValueError, match="not installed"):
        adapter.uninstall(g)


@pytest.mark.parametrize("engine", ["sglang", "vllm"])
def test_install_refuses_what_is_not_a_group_coordinator(engine: str) -> None:
    class Half:
        ranks = [0]
        world_size = 1

    half = Half()
    with pytest.raises(TypeError, match="has no rank_in_group, device_group, cpu_group"):
        _adapter(engine).install(half)
    assert vars(half) == {}, "a refused install leaves the object as it was"
    g = _lone(_SglangGroup if engine == "sglang" else _VllmGroup)
    before = dict(vars(g))
    with pytest.raises(TypeError, match="allow_pickle must be a bool"):
        _adapter(engine).install(g, allow_pickle="yes")
    assert vars(g) == before


def test_world_size_one_short_circuits_as_the_engines_do() -> None:
    """No process group needed: sglang's send returns the dict, its receive None; vLLM's
    send returns the dict, isend [], recv None, irecv (None, [], [])."""
    assert not dist.is_initialized()
    d = {"hidden_states": torch.ones(2, 4), "__msg_type__": "proxy"}
    sg = pp_sglang.install(_lone(_SglangGroup))
    assert sg.send_tensor_dict(d) is d
    assert sg.send_tensor_dict(d, async_send=True) is d
    assert sg.recv_tensor_dict() is None
    vl = pp_vllm.install(_lone(_VllmGroup))
    assert vl.send_tensor_dict(d) is d
    assert vl.isend_tensor_dict(d) == []
    assert vl.recv_tensor_dict() is None
    assert vl.irecv_tensor_dict() == (None, [], [])


def _uninstall_body(rank: int, world: int) -> None:
    pp, tp = _groups(rank, 2, 1, _SglangGroup)
    for s, transport in enumerate(["pipepack", "engine", "pipepack"]):
        if transport == "pipepack":
            pp_sglang.install(pp)
        if rank == 0:
            works = pp.send_tensor_dict(_proxy(s, 0, 0), async_send=True)
            _check_works(works, transport, True)
            for w in works:
                w.work.wait()
        else:
            _check(pp.recv_tensor_dict(), [_proxy(s, 0, 0)], tp)
        if transport == "pipepack":
            pp_sglang.uninstall(pp)
            assert pp.send_tensor_dict.__func__ is _SglangGroup.send_tensor_dict


def test_uninstalled_group_talks_through_the_engine_transport_again() -> None:
    run_ranks(2, _uninstall_body, timeout_s=TIMEOUT_S)


# ---------------------------------------------------------------------------------------------
# bad arguments fail clearly, before anything is sent; pickle only when installed with it
# ---------------------------------------------------------------------------------------------


def _good(i: int) -> dict[str, Any]:
    return {"x": torch.arange(6) + i, "i": i, "__msg_type__": "proxy"}


def _bad_args_body(rank: int, world: int) -> None:
    sg, tp = _groups(rank, 2, 1, _SglangGroup)
    vl = _VllmGroup(sg.device_group, sg.cpu_group, ranks=sg.ranks)
    pp_sglang.install(sg)
    pp_vllm.install(vl)
    x = torch.arange(6)
    if rank == 0:
        cases = [
            (lambda: sg.send_tensor_dict(_good(0), dst=2), ValueError, r"dst=2 .*within"),
            (lambda: sg.send_tensor_dict(_good(0), dst=0), ValueError, r"dst=0"),
            (lambda: sg.send_tensor_dict(_good(0), dst=-1), ValueError, r"dst=-1"),
            (
                lambda: sg.send_tensor_dict(_good(0), all_gather_group=tp.device_group),
                TypeError,
                r"all_gather_group must be a GroupCoordinator",
            ),
            (lambda: sg.send_tensor_dict([x], async_send=True), TypeError, r"dict"),
            (
                lambda: sg.send_tensor_dict({"x": x, "bad": fractions.Fraction(1, 3)}),
                TypeError,
                r"'bad'.*allow_pickle",
            ),
            (lambda: sg.send_tensor_dict(_good(0), async_op=True), TypeError, r"async_op"),
            (
                lambda: vl.send_tensor_dict(_good(0), all_gather_tensors=["x"]),
                TypeError,
                r"all_gather_tensors",
            ),
            (lambda: vl.isend_tensor_dict(_good(0), dst=1.0), ValueError, r"dst=1.0"),
            (lambda: vl.recv_tensor_dict(src=0), ValueError, r"src=0"),
        ]
        for i, (call, exc, match) in enumerate(cases):
            with pytest.raises(exc, match=match):
                call()
            if i % 3 == 0:  # nothing of the failed call is on the wire
                sg.send_tensor_dict(_good(i))
        vl.send_tensor_dict(_good(99))
        return
    with pytest.raises(ValueError, match=r"src=1"):
        sg.recv_tensor_dict(src=1)
    for i in [0, 3, 6, 9]:
        check_dict(sg.recv_tensor_dict(), _good(i))
    check_dict(vl.recv_tensor_dict(), _good(99))


def test_bad_arguments_fail_clearly_before_sending() -> None:
    run_ranks(2, _bad_args_body, timeout_s=TIMEOUT_S)


def _pickle_body(rank: int, world: int) -> None:
    pp, tp = _groups(rank, 2, 1, _SglangGroup)
    pp_sglang.install(pp, allow_pickle=True)
    d = {"x": torch.arange(3), "frac": fractions.Fraction(2, 7), "__msg_type__": "output"}
    if rank == 0:
        pp.send_tensor_dict(d)
    else:
        got = pp.recv_tensor_dict()
        check_dict(
            {k: v for k, v in got.items() if k != "frac"},
            {k: v for k, v in d.items() if k != "frac"},
        )
        assert type(got["frac"]) is fractions.Fraction and got["frac"] == d["frac"]


def test_allow_pickle_install_carries_objects() -> None:
    """install(allow_pickle=True) on both ends moves what only pickle can (refused without)."""
    run_ranks(2, _pickle_body, timeout_s=TIMEOUT_S)


# ---------------------------------------------------------------------------------------------
# the benchmark hook: pipepack.testing.baselines.pair, as bench_p2p's ping-pong calls it
# ---------------------------------------------------------------------------------------------


def _pair_body(rank: int, world: int, mode: str) -> None:
    """Ping-pong over the world group as the benchmark does; with 4 ranks, ranks r and r+2
    are peers and {0,1}, {2,3} the TP groups."""
    tp_groups = [dist.new_group([0, 1]), dist.new_group([2, 3])] if world == 4 else None
    tp_group = tp_groups[rank // 2] if tp_groups else None
    W, j = (2, rank % 2) if tp_groups else (1, 0)
    peer = (rank + world // 2) % world
    send, recv, close = ENGINE.pair(mode, group=dist.group.WORLD, tp_group=tp_group)
    leader = rank < world // 2
    for s in range(5):
        d = _proxy(s, 0 if leader else 1, j)
        if leader:
            send(d, peer)
            got = recv(peer)
            sent = [_proxy(s, 1, t) for t in range(W)]
        else:
            got = recv(peer)
            sent = [_proxy(s, 0, t) for t in range(W)]
            send(d, peer)
        want = _engine_delivery(sent, j, W)
        check_dict(got, want)
    close()


@pytest.mark.parametrize("world", [2, 4], ids=["pp2", "pp2xtp2"])
@pytest.mark.parametrize("mode", ["sglang", "sglang_pipepack", "vllm", "vllm_pipepack"])
def test_benchmark_pairs_deliver_what_the_engine_would(mode: str, world: int) -> None:
    """Each of the benchmark's engine modes moves the hop exactly (checked before it is timed
    there too)."""
    assert mode in ENGINE.MODES
    run_ranks(world, _pair_body, mode, timeout_s=TIMEOUT_S)


def _dead_peer_body(rank: int, world: int) -> None:
    pp, tp = _groups(rank, 2, 1, _SglangGroup)
    pp_sglang.install(pp)
    if rank == 0:
        pp.send_tensor_dict(_proxy(0, 0, 0))
        return  # and the process exits
    _check(pp.recv_tensor_dict(), [_proxy(0, 0, 0)], tp)
    with pytest.raises(RuntimeError, match=r"receive #1 from rank 0\b"):
        pp.recv_tensor_dict()


def test_a_dead_peer_raises_naming_peer_and_step() -> None:
    """Through the adapter, a peer that went away is an exception naming it and the hop."""
    run_ranks(2, _dead_peer_body, timeout_s=10)
