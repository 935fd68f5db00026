"""PP stage-hop benchmark: pipepack against per-tensor send/recv, side by side.

Reproduce (CPU, gloo, 2 local ranks started by this script; ~1-2 min):
    python bench/bench_p2p.py --out bench/results/p2p_cpu_gloo.json
Quick look (< 30 s):
    python bench/bench_p2p.py --quick
NCCL on GPUs (one process per GPU):
    torchrun --nproc_per_node=2 bench/bench_p2p.py --backend nccl

Every mode moves the same tensor dict from rank 0 to rank 1 and back (ping-pong); one hop is
half the round trip. Modes, each written after what the system it names does:
  serial            metadata pickled and sent over the CPU group as two messages (size, bytes),
                    then one blocking send per tensor; the receiver waits on each receive before
                    posting the next (sglang before #19582, vLLM's send_tensor_dict).
  per_tensor_async  same metadata, then every receive posted at once, then the waits (sglang
                    #19582 / vLLM async PP).
  batched           shapes known ahead: one batch_isend_irecv of per-tensor ops, no metadata
                    (PyTorch pipelining / Megatron).
  packed            pipepack's blocking functional API, as engines call it: send_tensor_dict,
                    then recv_tensor_dict (one self-describing hop; one message when it fits
                    the receiver's head capacity).
  packed_static     pipepack's TensorDictChannel with a declared layout, receive posted ahead.
  floor             one raw message of the same total bytes, size known ahead.
  packed_shm, packed_static_shm
                    the same two pipepack modes over the same-host transport (the peer's
                    shared-memory ring) instead of torch.distributed: what the default
                    transport ("auto") picks when both ranks are on one host. ``packed`` pins
                    transport="dist", the path of ranks on different hosts.
  sglang, vllm      the engines' own GroupCoordinator transport, written from what they send
                    (pipepack.testing.baselines): sglang's async send + blocking receive, vLLM's
                    blocking pair.
  sglang_pipepack, vllm_pipepack
                    the same engine calls on the same coordinator with pipepack's one-line
                    adapter installed (pipepack.integrations), over torch.distributed.
Wire options (not in the default run; ``--modes packed packed_ch packed_fold ...``), each a
TensorDictChannel over torch.distributed: blocking send, and the receive posted and read on the
caller's thread when its turn comes (as recv_tensor_dict does: no hand-off to the channel's
progress thread, so the modes differ from ``packed`` only in the API and the option); the
activations are randn values (the fp8 quantiser and the norm see real numbers):
  packed_ch         no option: what the options are layered on
  packed_fold       Wire(fold=(hidden_states, residual)), received with wait() (the sum, and a
                    -0.0 residual)
  packed_fp8        Wire(fp8=(hidden_states, residual)), wait() dequantises
  packed_fold_fp8   fold + the sum as fp8, wait()
  packed_norm       no option, received with wait_add_rmsnorm (the next layer's add + norm)
  packed_fold_norm  fold, wait_add_rmsnorm (no add on the receiver)
  packed_fold_fp8_norm
                    fold + fp8, wait_add_rmsnorm (dequantised inside the op)
``wire_bytes`` in the JSON is what one hop puts on the wire (frame, header, payloads).
The tp2 scenario runs pp2 x tp2 on 4 ranks: each sender sends its TP slice, the receivers
all-gather; baselines all-gather per tensor as vLLM does, pipepack once for all keys.
"""

from __future__ import annotations

import argparse
import datetime
import io
import json
import os
import pickle
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist

from pipepack.testing import baselines as engine_baselines
from pipepack.testing import random_bytes

SCENARIOS = [
    "decode_bs1",
    "decode_bs8",
    "decode_bs64",
    "decode_bs256",
    "prefill_4k",
    "many_small",
    "output",
    "tp2",
]
EXTRA_SCENARIOS = ["prefill_2k"]  # not in the default run
MODES = [
    "serial",
    "per_tensor_async",
    "batched",
    "packed",
    "packed_static",
    "floor",
    "packed_shm",
    "packed_static_shm",
    *engine_baselines.MODES,
]
# per wire mode: (the sender's and receiver's Wire options as (fold, fp8 keys), receive with
# wait_add_rmsnorm); not in the default run
_HR = ("hidden_states", "residual")
WIRE_MODES = {
    "packed_ch": (None, (), False),
    "packed_fold": (_HR, (), False),
    "packed_fp8": (None, _HR, False),
    "packed_fold_fp8": (_HR, ("hidden_states",), False),
    "packed_norm": (None, (), True),
    "packed_fold_norm": (_HR, (), True),
    "packed_fold_fp8_norm": (_HR, ("hidden_states",), True),
}
EPS = 1e-6
PIPEPACK_MODES = {
    "packed": "dist",
    "packed_static": "dist",
    "packed_shm": "shm",
    "packed_static_shm": "shm",
    "sglang_pipepack": "dist",
    "vllm_pipepack": "dist",
    **{m: "dist" for m in WIRE_MODES},
}
HIDDEN = 4096
# torch >= 2.12 renames all_gather_into_tensor; both exist in between
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


# ----------------------------------------------------------------------------- payloads


def make_payload(scenario: str, device: torch.device, seed: int = 0) -> dict:
    """The tensor dict of a scenario; the same seed gives the same bytes on every rank."""
    g = torch.Generator().manual_seed(seed)

    def rnd(shape, dtype):
        return random_bytes(tuple(shape), dtype, g).to(device)

    if scenario.startswith("decode_bs") or scenario == "tp2":
        bs = 64 if scenario == "tp2" else int(scenario[len("decode_bs") :])
        return {
            "hidden_states": rnd((bs, HIDDEN), torch.bfloat16),
            "residual": rnd((bs, HIDDEN), torch.bfloat16),
            "__msg_type__": "proxy",
        }
    if scenario in ("prefill_4k", "prefill_2k"):
        n = 4096 if scenario == "prefill_4k" else 2048
        return {
            "hidden_states": rnd((n, HIDDEN), torch.bfloat16),
            "residual": rnd((n, HIDDEN), torch.bfloat16),
        }
    if scenario == "many_small":
        dtypes = [
            torch.float32,
            torch.bfloat16,
            torch.int64,
            torch.int32,
            torch.float16,
            torch.uint8,
            torch.int8,
            torch.bool,
        ]
        d = {}
        for i in range(16):
            dt = dtypes[i % len(dtypes)]
            nbytes = 1024 + (i * 197) % 3072
            d[f"t{i}"] = rnd((nbytes // dt.itemsize,), dt)
        d["__msg_type__"] = "proxy"
        return d
    if scenario == "output":
        bs = 64
        return {
            "next_token_ids": rnd((bs,), torch.int64),
            "logprobs": [None] * bs,
            "finished": [None if i % 3 else i for i in range(bs)],
        }
    raise ValueError(f"unknown scenario {scenario!r}")


def tensor_items(d: dict) -> list[tuple[str, torch.Tensor]]:
    return [(k, v) for k, v in d.items() if isinstance(v, torch.Tensor)]


def payload_bytes(d: dict) -> int:
    return sum(v.numel() * v.element_size() for _, v in tensor_items(d))


# ----------------------------------------------------------------------------- baselines


@dataclass(frozen=True)
class _Meta:
    device: str
    dtype: torch.dtype
    shape: tuple[int, ...]


class Ctx:
    """Groups and peers of one benchmark rank."""

    def __init__(self, group, cpu_group, device, tp_group=None, shm_group=None):
        self.group = group
        self.cpu_group = cpu_group
        self.shm_group = shm_group
        self.device = device
        self.tp_group = tp_group
        self.tp_world = 1 if tp_group is None else dist.get_world_size(tp_group)
        self.tp_rank = 0 if tp_group is None else dist.get_rank(tp_group)

    def grp(self, t: torch.Tensor):
        return self.cpu_group if t.device.type == "cpu" else self.group

    def sliced(self, t: torch.Tensor) -> bool:
        return self.tp_world > 1 and t.numel() % self.tp_world == 0 and t.numel() > 0

    def slice_of(self, t: torch.Tensor) -> torch.Tensor:
        return t.reshape(self.tp_world, -1)[self.tp_rank] if self.sliced(t) else t

    def gather(self, part: torch.Tensor, meta: _Meta) -> torch.Tensor:
        """vLLM's receive-side all-gather, one collective per tensor."""
        full = torch.empty((self.tp_world, part.numel()), dtype=part.dtype, device=part.device)
        _all_gather(full.view(-1), part, group=self.tp_group)
        return full.view(meta.shape)


def _send_metadata(ctx: Ctx, d: dict, dst: int) -> None:
    meta = [
        (k, _Meta(v.device.type, v.dtype, tuple(v.shape)) if isinstance(v, torch.Tensor) else v)
        for k, v in d.items()
    ]
    buf = io.BytesIO()
    pickle.dump(meta, buf)
    data = torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8)
    dist.send(torch.tensor([data.numel()], dtype=torch.int64), dst, group=ctx.cpu_group)
    dist.send(data, dst, group=ctx.cpu_group)


def _recv_metadata(ctx: Ctx, src: int) -> list:
    size = torch.empty(1, dtype=torch.int64)
    dist.recv(size, src, group=ctx.cpu_group)
    data = torch.empty(int(size.item()), dtype=torch.uint8)
    dist.recv(data, src, group=ctx.cpu_group)
    return pickle.loads(data.numpy().tobytes())


def _alloc(ctx: Ctx, meta: _Meta) -> torch.Tensor:
    dev = ctx.device if meta.device != "cpu" else torch.device("cpu")
    n = 1
    for s in meta.shape:
        n *= s
    if ctx.tp_world > 1 and n % ctx.tp_world == 0 and n > 0:
        return torch.empty(n // ctx.tp_world, dtype=meta.dtype, device=dev)
    return torch.empty(meta.shape, dtype=meta.dtype, device=dev)


def _finish(ctx: Ctx, meta: list, recvd: dict) -> dict:
    out = {}
    for k, m in meta:
        if isinstance(m, _Meta):
            t = recvd[k]
            out[k] = ctx.gather(t, m) if tuple(t.shape) != m.shape else t
        else:
            out[k] = m
    return out


def serial_send(ctx: Ctx, d: dict, dst: int) -> None:
    _send_metadata(ctx, d, dst)
    for _, t in tensor_items(d):
        if t.numel():
            dist.send(ctx.slice_of(t).contiguous(), dst, group=ctx.grp(t))


def serial_recv(ctx: Ctx, src: int, like: dict) -> dict:
    meta = _recv_metadata(ctx, src)
    recvd = {}
    for k, m in meta:
        if isinstance(m, _Meta):
            t = _alloc(ctx, m)
            if t.numel():
                dist.recv(t, src, group=ctx.cpu_group if m.device == "cpu" else ctx.group)
            recvd[k] = t
    return _finish(ctx, meta, recvd)


def async_send(ctx: Ctx, d: dict, dst: int) -> None:
    _send_metadata(ctx, d, dst)
    works = [
        dist.isend(ctx.slice_of(t).contiguous(), dst, group=ctx.grp(t))
        for _, t in tensor_items(d)
        if t.numel()
    ]
    for w in works:
        w.wait()


def async_recv(ctx: Ctx, src: int, like: dict) -> dict:
    meta = _recv_metadata(ctx, src)
    recvd, works = {}, []
    for k, m in meta:
        if isinstance(m, _Meta):
            t = _alloc(ctx, m)
            if t.numel():
                works.append(
                    dist.irecv(t, src, group=ctx.cpu_group if m.device == "cpu" else ctx.group)
                )
            recvd[k] = t
    for w in works:
        w.wait()
    return _finish(ctx, meta, recvd)


def batched_send(ctx: Ctx, d: dict, dst: int) -> None:
    ops = [
        dist.P2POp(dist.isend, ctx.slice_of(t).contiguous(), dst, group=ctx.grp(t))
        for _, t in tensor_items(d)
        if t.numel()
    ]
    for w in dist.batch_isend_irecv(ops):
        w.wait()


def batched_recv(ctx: Ctx, src: int, like: dict) -> dict:
    metas = [(k, _Meta(v.device.type, v.dtype, tuple(v.shape))) for k, v in tensor_items(like)]
    recvd = {k: _alloc(ctx, m) for k, m in metas}
    ops = [
        dist.P2POp(
            dist.irecv, recvd[k], src, group=ctx.cpu_group if m.device == "cpu" else ctx.group
        )
        for k, m in metas
        if recvd[k].numel()
    ]
    for w in dist.batch_isend_irecv(ops):
        w.wait()
    return _finish(ctx, metas, recvd)


def floor_pair(ctx: Ctx, like: dict):
    """One raw message of the payload's bytes (its TP slice with tp), plus one all-gather."""
    nbytes = sum(ctx.slice_of(t).numel() * t.element_size() for _, t in tensor_items(like))
    dev = next((t.device for _, t in tensor_items(like)), torch.device("cpu"))
    grp = ctx.cpu_group if dev.type == "cpu" else ctx.group
    sbuf = torch.zeros(nbytes, dtype=torch.uint8, device=dev)
    rbuf = torch.empty(nbytes, dtype=torch.uint8, device=dev)
    gathered = torch.empty(ctx.tp_world * nbytes, dtype=torch.uint8, device=dev)

    def send(d, dst):
        dist.send(sbuf, dst, group=grp)

    def recv(src, like_):
        dist.recv(rbuf, src, group=grp)
        if ctx.tp_world > 1:
            _all_gather(gathered, rbuf, group=ctx.tp_group)
        return None

    return send, recv


def pipepack_pair(ctx: Ctx, peer: int, static: bool, like: dict, transport: str = "dist"):
    from pipepack.pp import Declared, TensorDictChannel

    if transport == "shm":  # a group of its own: one (group, peer) has one link, one transport
        ctx = Ctx(ctx.shm_group, ctx.shm_group, ctx.device, ctx.tp_group, ctx.shm_group)

    # the token count is dim 0 of the tensors that share the first one's dim 0 (hidden states,
    # residual, token ids); payloads of unrelated sizes are declared whole
    lead = {t.shape[0] for _, t in tensor_items(like) if t.dim()}
    dynamic = None if len(lead) == 1 else ()
    declared = Declared.from_example(like, dynamic=dynamic) if static else None
    ch = TensorDictChannel(
        peer,
        group=ctx.group,
        cpu_group=ctx.cpu_group,
        all_gather_group=ctx.tp_group,
        declared=declared,
        transport=transport,
    )
    tokens = next(iter(lead)) if len(lead) == 1 else 0

    if not static:
        from pipepack.pp import recv_tensor_dict, send_tensor_dict

        kw = dict(group=ctx.group, cpu_group=ctx.cpu_group, all_gather_group=ctx.tp_group)

        def send(d, dst):
            send_tensor_dict(d, dst, **kw)

        def recv(src, like_):
            return recv_tensor_dict(src, **kw)

        return send, recv

    def send(d, dst):
        ch.isend(d)

    def recv(src, like_):
        return ch.irecv(tokens).wait()

    return send, recv


# ----------------------------------------------------------------------------- timing


@dataclass(frozen=True)
class Result:
    scenario: str
    mode: str
    bytes: int
    median_us: float
    p20_us: float
    p80_us: float
    gbps: float
    iters: int
    transport: str = "dist"
    wire_bytes: int | None = None  # one hop on the wire (pipepack modes): frame, header, payloads


def _same_bytes(a: dict, b: dict) -> bool:
    if list(a.keys()) != list(b.keys()):
        return False
    for k, v in a.items():
        w = b[k]
        if isinstance(v, torch.Tensor):
            if not isinstance(w, torch.Tensor) or v.dtype != w.dtype or v.shape != w.shape:
                return False
            if not torch.equal(
                v.reshape(-1).view(torch.uint8).cpu(), w.reshape(-1).view(torch.uint8).cpu()
            ):
                return False
        elif v != w or type(v) is not type(w):
            return False
    return True


def _pairs(ctx: Ctx, mode: str, peer: int, like: dict):
    if mode in engine_baselines.MODES:  # a GroupCoordinator's calls, with/without the adapter
        s, r, ctx.close = engine_baselines.pair(
            mode, group=ctx.group, cpu_group=ctx.cpu_group, tp_group=ctx.tp_group
        )
        return (lambda _c, d, dst: s(d, dst)), (lambda _c, src, lk: r(src))
    if mode == "serial":
        return serial_send, serial_recv
    if mode == "per_tensor_async":
        return async_send, async_recv
    if mode == "batched":
        return batched_send, batched_recv
    if mode == "floor":
        s, r = floor_pair(ctx, like)
        return (lambda _c, d, dst: s(d, dst)), (lambda _c, src, lk: r(src, lk))
    if mode in WIRE_MODES:
        s, r = wire_pair(ctx, peer, mode)
        return (lambda _c, d, dst: s(d, dst)), (lambda _c, src, lk: r(src, lk))
    s, r = pipepack_pair(ctx, peer, mode.startswith("packed_static"), like, PIPEPACK_MODES[mode])
    return (lambda _c, d, dst: s(d, dst)), (lambda _c, src, lk: r(src, lk))


def _wire_options(mode: str):
    from pipepack.pp import Wire

    fold, fp8, norm = WIRE_MODES[mode]
    wire = Wire(fold=fold, fp8=fp8)
    return (wire if wire else None), norm


def _norm_weight(device) -> torch.Tensor:
    g = torch.Generator().manual_seed(5)
    return (0.5 + 1.5 * torch.rand(HIDDEN, generator=g)).to(torch.bfloat16).to(device)


def wire_pair(ctx: Ctx, peer: int, mode: str):
    """A TensorDictChannel with the mode's wire options on both ends (both directions)."""
    from pipepack.pp import PendingRecv, TensorDictChannel

    wire, norm = _wire_options(mode)
    ch = TensorDictChannel(
        peer, group=ctx.group, cpu_group=ctx.cpu_group, wire=wire, accept_wire=wire
    )
    weight = _norm_weight(ctx.device)

    def send(d, dst):
        ch.send(d)

    def recv(src, like_):
        # a PendingRecv read on this thread (irecv() would hand the head to a progress thread)
        opts = ch._options(None)
        p = PendingRecv(ch.link, ch.link.post(opts), opts.accept_wire)
        return p.wait_add_rmsnorm(weight, EPS) if norm else p.wait()

    return send, recv


def activations(d: dict, seed: int = 0) -> dict:
    """``d`` with hidden_states / residual replaced by decoder-like values of the same shape and
    dtype (randn, a residual four times larger): the fp8 quantiser and the norm see numbers."""
    g = torch.Generator().manual_seed(seed)
    out = dict(d)
    for k, scale in (("hidden_states", 1.0), ("residual", 4.0)):
        t = d[k]
        out[k] = (scale * torch.randn(t.shape, generator=g)).to(t.dtype).to(t.device)
    return out


def wire_bytes(mode: str, d: dict) -> int:
    """Bytes one hop of ``d`` puts on the wire in a pipepack mode (frame, header, payloads)."""
    from pipepack.pp import codec, wirepack
    from pipepack.pp.wire.hop import FRAME_BYTES
    from pipepack.pp.wire.limits import DEFAULT_LIMITS

    wire = _wire_options(mode)[0] if mode in WIRE_MODES else None
    enc = codec.encode(
        d,
        allow_pickle=False,
        limits=DEFAULT_LIMITS,
        tp=None,
        all_gather_tensors=None,
        wire=wirepack.WireSend(wire).prepare(d) if wire else None,
    )
    return FRAME_BYTES + len(enc.body) + sum(p.wire_layout.nbytes for p in enc.parts.values())


def run_mode(
    ctx: Ctx,
    scenario: str,
    mode: str,
    leader: bool,
    peer: int,
    iters: int,
    warmup: int,
    pooled: list[float] | None = None,
) -> Result | None:
    """Ping-pong ``iters`` times; the leader returns the per-hop timings (over ``pooled``, the
    times of earlier rounds of this mode, to which this round's are added)."""
    d = make_payload(scenario, ctx.device)
    if mode in WIRE_MODES:
        d = activations(d)
    send, recv = _pairs(ctx, mode, peer, d)
    sync = (lambda: torch.cuda.synchronize()) if ctx.device.type == "cuda" else (lambda: None)
    # correctness once, before any timing: the follower checks what it received
    if leader:
        send(ctx, d, peer)
        recv(ctx, peer, d)
    else:
        got = recv(ctx, peer, d)
        if mode != "floor" and not _same_bytes(_expected(d, mode), got):
            raise AssertionError(f"{scenario}/{mode}: received bytes differ from what was sent")
        send(ctx, d, peer)
    times = []
    for i in range(warmup + iters):
        if leader:
            sync()
            t0 = time.perf_counter()
            send(ctx, d, peer)
            got = recv(ctx, peer, d)
            sync()
            if i >= warmup:
                times.append((time.perf_counter() - t0) / 2 * 1e6)
        else:
            got = recv(ctx, peer, d)
            sync()
            send(ctx, d, peer)
    if mode in engine_baselines.MODES:
        ctx.close()
    if mode in PIPEPACK_MODES:
        from pipepack.pp import flush

        flush()
    if not leader:
        return None
    if pooled is not None:
        pooled.extend(times)
        times = list(pooled)
    times.sort()
    med = statistics.median(times)
    q = statistics.quantiles(times, n=5) if len(times) >= 5 else [times[0]] * 4
    nbytes = payload_bytes(d)
    return Result(
        scenario,
        mode,
        nbytes,
        med,
        q[0],
        q[3],
        nbytes / med / 1e3,
        len(times),
        PIPEPACK_MODES.get(mode, "dist"),
        wire_bytes(mode, d) if mode in PIPEPACK_MODES and ctx.tp_world == 1 else None,
    )


def _expected(d: dict, mode: str) -> dict:
    if mode == "batched":  # shapes known ahead, plain values are not sent
        return dict(tensor_items(d))
    if mode in WIRE_MODES:
        return _wire_expected(d, mode)
    return d


def _wire_expected(d: dict, mode: str) -> dict:
    """What the receiver of a wire mode hands out, from the kernels' references."""
    from pipepack.kernels import fused

    fold, fp8, norm = WIRE_MODES[mode]
    h, r = d["hidden_states"].cpu(), d["residual"].cpu()

    def rt(x):
        return fused.dequantize_fp8_reference(*fused.quantize_fp8_reference(x), x.dtype)

    h = h + r if fold else h
    r = None if fold else r
    h = rt(h) if "hidden_states" in fp8 else h
    r = rt(r) if r is not None and "residual" in fp8 else r
    out = dict(d)
    if norm:
        w = _norm_weight(torch.device("cpu"))
        out["hidden_states"], out["residual"] = fused.add_rmsnorm_reference(h, r, w, EPS)
    else:
        out["hidden_states"] = h
        out["residual"] = torch.full_like(h, -0.0) if r is None else r
    return out


# ----------------------------------------------------------------------------- driver


def _iters(scenario: str, quick: bool, backend: str) -> tuple[int, int]:
    big = scenario.startswith("prefill")
    if quick:
        return (3, 1) if big else (20, 3)
    if backend == "nccl":
        return (50, 5) if big else (500, 50)
    return (12, 2) if big else (150, 15)


def bench_rank(rank: int, world: int, args, results_path: str | None) -> list[Result]:
    backend = args.backend
    device = torch.device("cpu")
    if backend == "nccl":
        local = int(os.environ.get("LOCAL_RANK", rank))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    group = dist.group.WORLD
    cpu_group = group if backend == "gloo" else dist.new_group(backend="gloo")
    shm_group = dist.new_group(backend="gloo")
    _pin_transports(group, cpu_group, shm_group, rank, world)
    results = []
    scenarios = [s for s in args.scenarios if s != "tp2"]
    if world == 2:
        ctx = Ctx(group, cpu_group, device, shm_group=shm_group)
        rounds = max(1, args.rounds)
        for sc in scenarios:
            iters, warmup = _iters(sc, args.quick, backend)
            per_round = max(1, -(-iters // rounds))
            pooled: dict[str, list[float]] = {m: [] for m in args.modes}
            last: dict[str, Result] = {}
            for _ in range(rounds):  # modes take turns, so a load change hits them alike
                for mode in args.modes:
                    dist.barrier(group=cpu_group)
                    r = run_mode(
                        ctx, sc, mode, rank == 0, 1 - rank, per_round, warmup, pooled[mode]
                    )
                    if r:
                        last[mode] = r
            for mode, r in last.items():
                results.append(r)
                print(f"  {sc:>13} {mode:>16} {r.median_us:10.1f} us", flush=True)
    if world == 4 and "tp2" in args.scenarios:
        tp_groups = [
            dist.new_group([0, 1], backend=backend),
            dist.new_group([2, 3], backend=backend),
        ]
        ctx = Ctx(group, cpu_group, device, tp_group=tp_groups[rank // 2], shm_group=shm_group)
        iters, warmup = _iters("tp2", args.quick, backend)
        peer = (rank + 2) % 4
        for mode in args.modes:
            dist.barrier(group=cpu_group)
            r = run_mode(ctx, "tp2", mode, rank < 2, peer, iters, warmup)
            if r and rank == 0:
                results.append(r)
                print(f"  {'tp2':>13} {mode:>16} {r.median_us:10.1f} us", flush=True)
    if rank == 0 and results_path:
        with open(results_path, "w") as f:
            json.dump([asdict(r) for r in results], f)
    return results


def _pin_transports(group, cpu_group, shm_group, rank: int, world: int) -> None:
    """The world group's links stay on torch.distributed, the extra group's use the ring, so
    every row measures the transport its mode names."""
    from pipepack.pp import shm
    from pipepack.pp.link import get_link

    for peer in range(world):
        if peer != rank:
            get_link(group, cpu_group, peer, transport="dist")
            if shm.available():
                get_link(shm_group, shm_group, peer, transport="shm")


def _spawned(rank: int, world: int, init_file: str, args, results_path: str) -> None:
    if args.one_thread:  # as torchrun does (OMP_NUM_THREADS=1); default: the user's settings
        torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=300),
    )
    try:
        bench_rank(rank, world, args, results_path)
    finally:
        dist.destroy_process_group()


def _spawn(world: int, args) -> list[Result]:
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "results.json")
        mp.start_processes(
            _spawned,
            args=(world, os.path.join(tmp, "init"), args, path),
            nprocs=world,
            start_method="fork",
        )
        if not os.path.exists(path):
            return []
        with open(path) as f:
            return [Result(**r) for r in json.load(f)]


def meta_record(args) -> dict:
    import triton

    try:
        import pipepack  # noqa: F401
    except ImportError:
        pass
    m = {
        "meta": True,
        "host": platform.node(),
        "cores": os.cpu_count(),
        "machine": platform.machine(),
        "backend": args.backend,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
        "intra_op_threads": 1 if getattr(args, "one_thread", False) else torch.get_num_threads(),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
    }
    if args.backend == "nccl" and torch.cuda.is_available():
        m["device"] = torch.cuda.get_device_name()
        m["cuda"] = torch.version.cuda
        m["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
    else:
        m["device"] = "cpu"
    return m


def table(results: list[Result]) -> str:
    by = {(r.scenario, r.mode): r for r in results}
    lines = [
        "| scenario | mode | bytes | median µs | p20 | p80 | GB/s | × floor | "
        "speedup vs serial | vs per_tensor_async |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        fl = by.get((r.scenario, "floor"))
        se = by.get((r.scenario, "serial"))
        pa = by.get((r.scenario, "per_tensor_async"))
        ratio = f"{r.median_us / fl.median_us:.2f}" if fl else "-"
        s1 = f"{se.median_us / r.median_us:.2f}×" if se else "-"
        s2 = f"{pa.median_us / r.median_us:.2f}×" if pa else "-"
        lines.append(
            f"| {r.scenario} | {r.mode} | {r.bytes} | {r.median_us:.1f} | "
            f"{r.p20_us:.1f} | {r.p80_us:.1f} | {r.gbps:.3f} | {ratio} | {s1} | {s2} |"
        )
    return "\n".join(lines)


def wire_table(results: list[Result]) -> str:
    """The wire-option rows against plain ``packed`` of the same run."""
    by = {(r.scenario, r.mode): r for r in results}
    lines = [
        "| scenario | mode | wire bytes | median µs | p20 | p80 | vs packed (time) | "
        "bytes vs packed |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        if r.mode != "packed" and r.mode not in WIRE_MODES:
            continue
        b = by.get((r.scenario, "packed"))
        t = f"{r.median_us / b.median_us:.2f}×" if b else "-"
        n = f"{r.wire_bytes / b.wire_bytes:.2f}" if b and r.wire_bytes and b.wire_bytes else "-"
        lines.append(
            f"| {r.scenario} | {r.mode} | {r.wire_bytes} | {r.median_us:.1f} | "
            f"{r.p20_us:.1f} | {r.p80_us:.1f} | {t} | {n} |"
        )
    return "\n".join(lines)


def plot(results: list[Result], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for mode in MODES:
        pts = sorted(
            (r.bytes, r.median_us) for r in results if r.mode == mode and r.scenario != "tp2"
        )
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=mode)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("payload bytes")
    ax.set_ylabel("µs per hop (median)")
    ax.legend()
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--backend", choices=["gloo", "nccl"], default="gloo")
    p.add_argument("--quick", action="store_true", help="few iterations (< 30 s)")
    p.add_argument(
        "--one-thread",
        action="store_true",
        help="torch.set_num_threads(1) in each rank (as torchrun's OMP_NUM_THREADS=1);"
        " default: torch's own thread settings, as users run",
    )
    p.add_argument("--scenarios", nargs="+", default=SCENARIOS, choices=SCENARIOS + EXTRA_SCENARIOS)
    p.add_argument("--modes", nargs="+", default=MODES, choices=MODES + list(WIRE_MODES))
    p.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="split each scenario's iterations into this many rounds in which the modes take "
        "turns (2-rank scenarios); the timings of all rounds are pooled",
    )
    p.add_argument("--out", help="write JSON records here")
    p.add_argument("--plot", help="draw latency vs payload size (needs matplotlib)")
    args = p.parse_args(argv)
    if args.quick and args.scenarios == SCENARIOS:
        args.scenarios = [
            "decode_bs1",
            "decode_bs8",
            "decode_bs64",
            "prefill_4k",
            "many_small",
            "output",
            "tp2",
        ]

    t0 = time.time()
    if "RANK" in os.environ:  # under torchrun
        dist.init_process_group(args.backend)
        rank, world = dist.get_rank(), dist.get_world_size()
        results = bench_rank(rank, world, args, None)
        dist.destroy_process_group()
        if rank != 0:
            return 0
    else:
        if args.backend != "gloo":
            p.error("--backend nccl runs under torchrun (one process per GPU)")
        results = []
        if any(s != "tp2" for s in args.scenarios):
            results += _spawn(2, args)
        if "tp2" in args.scenarios:
            results += _spawn(4, args)
    meta = meta_record(args)
    print(
        f"\n{meta['device']} / {meta['backend']} / torch {meta['torch']} / triton "
        f"{meta['triton']} / {meta['cores']} cores / {meta['date']} "
        f"({time.time() - t0:.0f} s)\n"
    )
    print(table(results))
    if any(r.mode in WIRE_MODES for r in results):
        print()
        print(wire_table(results))
    if args.out:
        with open(args.out, "w") as f:
            json.dump([meta] + [asdict(r) for r in results], f, indent=1)
    if args.plot:
        plot(results, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
