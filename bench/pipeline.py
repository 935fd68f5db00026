"""A forward-only PP (x TP) pipeline of the reference transformer, checked against one process.

Reproduce (CPU, gloo; without torchrun the script forks its own stages * tp local ranks):
    python bench/pipeline.py --stages 2
    python bench/pipeline.py --stages 4 --transport per_tensor
    python bench/pipeline.py --stages 2 --tp 2 --dtype bf16 --transport pipepack_static
Under torchrun (one process per rank, world = stages * tp; --stages defaults to world / tp):
    torchrun --nproc_per_node=2 bench/pipeline.py
    torchrun --nproc_per_node=4 bench/pipeline.py --stages 2 --tp 2 --backend nccl   # 4 GPUs
The 2- and 4-stage comparison table: python bench/bench_pipeline.py

Stage s, TP rank r is global rank ``s * tp + r``; it receives from rank ``(s - 1) * tp + r`` and
sends to ``(s + 1) * tp + r``. TP ranks hold replicated weights and compute the same thing; on
the wire each sends its TP slice and the receivers rebuild the full tensors with an all-gather.
Transports:
  pipepack          TensorDictChannel over torch.distributed (one self-describing hop)
  pipepack_static   TensorDictChannel with a Declared layout (checked on both ends; the token
                    counts are known to every rank) and wait_into static input buffers
                    (CUDA-graph style), over torch.distributed
  pipepack_shm      TensorDictChannel over the same-host shared-memory ring (CPU, gloo only)
  pipepack_fold     TensorDictChannel with Wire(fold=("hidden_states", "residual")): the sender
                    sends hidden + residual as one tensor, the receiver's wait() hands out the
                    sum and a -0.0 residual, and the unchanged first layer adds them (the same
                    bits as adding the pair), over torch.distributed
  per_tensor        the vLLM-style baseline: pickled metadata in two messages on the CPU group,
                    then one send per tensor (TP: one all-gather per tensor on the receiver)
Every rank builds the same micro-batches (varying token counts); the last stage rebuilds the
whole model in its own process, runs it stage module by stage module on the same inputs, and
prints MATCH only if every micro-batch's logits are bit-equal. The exit status is 1 on MISMATCH.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_p2p  # noqa: E402  (the per-tensor baseline lives there)

from pipepack.pp import Declared, StageDriver, TensorDictChannel, Wire, flush  # noqa: E402
from pipepack.pp.refmodel import (  # noqa: E402
    ModelConfig,
    boundary_example,
    build_stage,
    reference_forward,
    sample_tokens,
)

TRANSPORTS = ["pipepack", "pipepack_static", "pipepack_shm", "pipepack_fold", "per_tensor"]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def microbatch_sizes(n: int, tokens: int) -> list[int]:
    """``n`` token counts between ``tokens // 2`` and ``tokens``: every rank derives the same."""
    lo = max(1, tokens // 2)
    return [lo + (7 * k + 3) % (tokens - lo + 1) for k in range(n)]


# ----------------------------------------------------------------------------- the baseline


class _Sent:
    """Handle of a per-tensor send: the sources stay alive until the sends completed."""

    def __init__(self, works: list[Any], keep: list[torch.Tensor]) -> None:
        self._works, self._keep = works, keep

    def wait(self) -> None:
        for w in self._works:
            w.wait()
        self._works, self._keep = [], []


class _Lazy:
    """A per-tensor receive: nothing is posted before ``wait()`` (the metadata comes first)."""

    def __init__(self, recv) -> None:
        self._recv = recv

    def wait(self) -> dict:
        return self._recv()

    def wait_into(self, outs) -> dict:
        raise NotImplementedError("the per-tensor baseline has no static-buffer path")


class PerTensorChannel:
    """vLLM's ``send_tensor_dict`` / async ``irecv_tensor_dict`` shape, on bench_p2p's code.

    Send: pickled metadata as two blocking messages (size, bytes) on the CPU group, then one
    isend per tensor (its TP slice when sliceable). Receive: the metadata, then one irecv per
    tensor, then (TP) one all-gather per tensor.
    """

    declared = None

    def __init__(self, peer: int, ctx: bench_p2p.Ctx) -> None:
        self.peer, self.ctx = peer, ctx
        self._sent: list[_Sent] = []

    def isend(self, d: dict) -> list[_Sent]:
        bench_p2p._send_metadata(self.ctx, d, self.peer)
        srcs = [
            self.ctx.slice_of(t).contiguous() for _, t in bench_p2p.tensor_items(d) if t.numel()
        ]
        works = [dist.isend(t, self.peer, group=self.ctx.grp(t)) for t in srcs]
        h = _Sent(works, srcs)
        self._sent.append(h)
        return [h]

    def irecv(self, num_tokens: int | None = None) -> _Lazy:
        return _Lazy(lambda: bench_p2p.async_recv(self.ctx, self.peer, None))

    def drain(self) -> None:
        for h in self._sent:
            h.wait()
        self._sent.clear()


# ----------------------------------------------------------------------------- one rank


def setup_groups(stages: int, tp: int, backend: str):
    """(device, group, cpu_group, tp_group) of this rank; every rank creates every group."""
    device = torch.device("cpu")
    if backend == "nccl":
        local = int(os.environ.get("LOCAL_RANK", dist.get_rank()))
        torch.cuda.set_device(local % torch.cuda.device_count())
        device = torch.device("cuda", torch.cuda.current_device())
    world = dist.get_world_size()
    if str(dist.get_backend()).lower() == backend:
        group = dist.group.WORLD
    else:
        group = dist.new_group(list(range(world)), backend=backend)
    cpu_group = group if backend == "gloo" else dist.new_group(list(range(world)), backend="gloo")
    tp_group = None
    for s in range(stages):
        g = dist.new_group([s * tp + r for r in range(tp)], backend=backend) if tp > 1 else None
        if s == dist.get_rank() // tp:
            tp_group = g
    return device, group, cpu_group, tp_group


def pipeline_rank(args: argparse.Namespace, transports: Sequence[str] | None = None) -> list[dict]:
    """Runs the pipeline on this rank, once per transport per repeat.

    With several ``transports`` (the benchmark) their runs alternate within each repeat, so a
    noisy machine slows them alike. The last stage's TP rank 0 returns one record per transport
    (the other ranks return ``[]``); every rank learns the bit-equality verdict.
    """
    transports = list(transports or [args.transport])
    rank, world = dist.get_rank(), dist.get_world_size()
    stages, tp = args.stages, args.tp
    if stages * tp != world:
        raise SystemExit(f"--stages {stages} x --tp {tp} needs {stages * tp} ranks, got {world}")
    stage, tp_rank = divmod(rank, tp)
    device, group, cpu_group, tp_group = setup_groups(stages, tp, args.backend)
    config = ModelConfig(
        vocab=args.vocab,
        hidden=args.hidden,
        heads=args.heads,
        layers=args.layers,
        dtype=DTYPES[args.dtype],
    )
    sizes = microbatch_sizes(args.microbatches, args.tokens)
    tokens = sample_tokens(config, sizes, seed=args.seed)
    module = build_stage(config, stage, stages, device)
    example = boundary_example(config, device)

    # the ring needs a group of its own: one (group, peer) has one link and one transport
    shm_group = dist.new_group(backend="gloo") if "pipepack_shm" in transports else None

    def channel(peer: int, transport: str):
        if transport == "per_tensor":
            return PerTensorChannel(peer, bench_p2p.Ctx(group, cpu_group, device, tp_group))
        if transport == "pipepack_shm":
            if device.type != "cpu":
                raise SystemExit("pipepack_shm carries CPU payloads; use the gloo backend")
            return TensorDictChannel(
                peer,
                group=shm_group,
                cpu_group=shm_group,
                all_gather_group=tp_group,
                transport="shm",
            )
        declared = Declared.from_example(example) if transport == "pipepack_static" else None
        wire = Wire(fold=("hidden_states", "residual")) if transport == "pipepack_fold" else None
        return TensorDictChannel(
            peer,
            group=group,
            cpu_group=cpu_group,
            all_gather_group=tp_group,
            declared=declared,
            transport="dist",
            wire=wire,
            accept_wire=wire,
        )

    drivers = {}
    for transport in transports:
        recv_ch = channel(rank - tp, transport) if stage > 0 else None
        send_ch = channel(rank + tp, transport) if stage < stages - 1 else None
        static = None
        if transport == "pipepack_static" and recv_ch is not None:
            static = {
                k: torch.empty((max(sizes),) + tuple(v.shape[1:]), dtype=v.dtype, device=device)
                for k, v in example.items()
            }
        drivers[transport] = StageDriver(
            module,
            recv_channel=recv_ch,
            send_channel=send_ch,
            depth=args.depth,
            num_tokens=sizes,
            static_inputs=static,
        )
    inputs = [{"input_ids": t.to(device)} for t in tokens]
    last = stage == stages - 1
    ref = reference_forward(config, tokens, num_stages=stages, device=device) if last else None
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    times: dict[str, list[float]] = {t: [] for t in transports}
    ok = True
    for i in range(args.warmup + args.repeats):
        for transport, driver in drivers.items():
            dist.barrier(group=cpu_group)
            t0 = time.perf_counter()
            if stage == 0:
                outs = driver.run(inputs)
            else:
                outs = driver.run(num_microbatches=len(sizes))
            sync()
            dt = time.perf_counter() - t0
            if last:
                ok &= all(_same_bytes(o["logits"], r) for o, r in zip(outs, ref, strict=True))
            if i >= args.warmup:
                times[transport].append(dt)
            flush()  # nothing of this transport left on the wire before the next one
            if isinstance(driver.send_channel, PerTensorChannel):
                driver.send_channel.drain()
    for driver in drivers.values():
        for ch in (driver.recv_channel, driver.send_channel):
            if isinstance(ch, TensorDictChannel):
                ch.close()
    flag = torch.tensor([1 if ok else 0], dtype=torch.int32)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=cpu_group)  # every rank learns the verdict
    match = bool(flag.item())
    if not (last and tp_rank == 0):
        return [{"match": match}]
    records = []
    for transport, ts in times.items():
        med = statistics.median(ts)
        q = statistics.quantiles(ts, n=5) if len(ts) >= 5 else [min(ts)] * 3 + [max(ts)]
        rec = {
            "stages": stages,
            "tp": tp,
            "transport": transport,
            "dtype": args.dtype,
            "depth": args.depth,
            "microbatches": len(sizes),
            "tokens": sum(sizes),
            "hidden": args.hidden,
            "layers": args.layers,
            "backend": args.backend,
            "repeats": len(ts),
            "median_s": med,
            "mb_per_s": len(sizes) / med,
            "tokens_per_s": sum(sizes) / med,
            "mb_per_s_p20": len(sizes) / q[3],
            "mb_per_s_p80": len(sizes) / q[0],
            "match": match,
        }
        print(
            f"pp{stages} tp{tp} {transport:>15} {args.dtype} depth {args.depth}: "
            f"{rec['mb_per_s']:9.1f} micro-batches/s  {rec['tokens_per_s']:10.0f} tokens/s  "
            f"{'MATCH' if match else 'MISMATCH'} (vs one process, bit-exact, "
            f"{len(sizes)} micro-batches x {args.repeats + args.warmup} runs)",
            flush=True,
        )
        records.append(rec)
    return records


def _same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (
        a.dtype == b.dtype
        and a.shape == b.shape
        and torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))
    )


# ----------------------------------------------------------------------------- launching


def _forked(rank: int, world: int, init_file: str, args, transports, out_dir: str) -> None:
    torch.set_num_threads(1)  # as torchrun does (OMP_NUM_THREADS=1) for several local ranks
    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=300),
    )
    try:
        records = pipeline_rank(args, transports)
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(records, f)
    finally:
        flush(timeout=60)
        dist.destroy_process_group()


def run_local(args: argparse.Namespace, transports: Sequence[str] | None = None) -> list[dict]:
    """Forks ``stages * tp`` local gloo ranks; returns the reporting rank's records."""
    import torch.multiprocessing as mp

    world = args.stages * args.tp
    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(
            _forked,
            args=(world, os.path.join(tmp, "init"), args, transports, tmp),
            nprocs=world,
            start_method="fork",
        )
        with open(os.path.join(tmp, f"rank{world - args.tp}.json")) as f:
            return json.load(f)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--stages",
        type=int,
        default=None,
        help="PP stages (default: world / tp under torchrun, else 2)",
    )
    p.add_argument("--tp", type=int, choices=[1, 2], default=1)
    p.add_argument("--microbatches", type=int, default=32)
    p.add_argument(
        "--tokens",
        type=int,
        default=32,
        help="largest micro-batch; sizes vary between tokens/2 and tokens",
    )
    p.add_argument("--depth", type=int, default=2, help="micro-batches in flight per stage")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--backend", choices=["gloo", "nccl"], default="gloo")
    p.add_argument("--transport", choices=TRANSPORTS, default="pipepack")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--vocab", type=int, default=512)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5, help="timed runs (median reported)")
    p.add_argument("--warmup", type=int, default=1)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    if "RANK" in os.environ:  # under torchrun
        dist.init_process_group(args.backend, timeout=datetime.timedelta(seconds=300))
        if args.stages is None:
            args.stages = dist.get_world_size() // args.tp
        try:
            records = pipeline_rank(args)
        finally:
            flush(timeout=60)
            dist.destroy_process_group()
        return 0 if all(r["match"] for r in records) else 1
    if args.backend != "gloo":
        p.error("--backend nccl runs under torchrun (one process per GPU)")
    if args.stages is None:
        args.stages = 2
    records = run_local(args)
    return 0 if all(r["match"] for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
