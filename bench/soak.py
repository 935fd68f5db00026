"""Soak: many hops through one TensorDictChannel, watching memory, threads and live buffers.

Reproduce (CPU, gloo, 2 local ranks started by this script; 15-30 s on 2 cores):
    python bench/soak.py --hops 10000 --depth 3 --every 500
Longer run, JSON of every sample:
    python bench/soak.py --hops 100000 --depth 3 --every 5000 --out soak.json

Rank 0 sends, rank 1 receives, ``depth`` micro-batches in flight on both sides: the sender
waits on hop i - depth's send handle before posting hop i, the receiver keeps ``depth``
receives posted and waits on the oldest. The token count changes on every hop (it cycles
through ``TOKENS``) and every ``SCHEMA_EVERY``-th hop carries another dtype and an extra key,
so headers with a new schema, the schema caches and the send-buffer pool all churn. The
receiver checks every hop's step counter, its bytes and key order.

Every ``--every`` hops each rank samples its resident memory (``/proc/self/statm``), its
thread count, the number of live ``torch.Tensor`` objects (found through ``gc``), how many of
them are free send buffers kept by the channel's pool (bounded: a few per buffer size) and the
send reaper's queue; the sender first lets its sends in flight complete, so samples compare.
``tests/test_soak.py`` runs this same soak and asserts that the curve is flat after
warm-up; this script prints the curve as a table.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import gc
import json
import os
import platform
import sys
import tempfile
import threading
import time
import warnings
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.distributed as dist

TOKENS = (1, 7, 16, 33, 64, 5, 128, 2, 96)  # one per hop, cycled: shapes change every step
HIDDEN = 256
SCHEMA_EVERY = 97  # every 97th hop: another dtype and an extra key (a new schema)
_PAGE = os.sysconf("SC_PAGE_SIZE")


@dataclass(frozen=True)
class Sample:
    """One rank's state after ``hop`` hops."""

    rank: int
    hop: int
    rss_bytes: int
    threads: int
    live_tensors: int
    pooled_buffers: int  # of live_tensors: free send buffers the channel keeps for reuse
    reaper_pending: int
    elapsed_s: float

    @property
    def rss_mib(self) -> float:
        return self.rss_bytes / (1 << 20)


def hop_dict(i: int) -> dict[str, Any]:
    """Hop ``i``'s dict; both ranks build it, so the receiver can check every byte."""
    t = TOKENS[i % len(TOKENS)]
    odd = i % SCHEMA_EVERY == SCHEMA_EVERY - 1
    dtype = torch.float16 if odd else torch.bfloat16
    d: dict[str, Any] = {
        "step": i,
        "hidden_states": torch.full((t, HIDDEN), float(i % 2048), dtype=dtype),
        "positions": torch.arange(i, i + t),
        "mb": i % 3,
        "__msg_type__": "proxy",
    }
    if odd:
        d["extra"] = torch.full((3,), i, dtype=torch.int32)
    return d


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE


def _live_tensors() -> int:
    with warnings.catch_warnings():  # isinstance() on some module proxies warns
        warnings.simplefilter("ignore")
        return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))


def _pooled(channel: Any) -> int:
    """Free send buffers the channel's pool holds (bounded: a few per buffer size)."""
    free = getattr(getattr(channel, "_pool", None), "_free", {})
    return sum(len(bufs) for bufs in free.values())


def _sample(rank: int, hop: int, t0: float, channel: Any = None) -> Sample:
    from pipepack.pp import REAPER

    rss = _rss_bytes()  # before gc.get_objects() allocates its list
    return Sample(rank, hop, rss, threading.active_count(), _live_tensors(), _pooled(channel),
                  REAPER.pending(), time.monotonic() - t0)


def _same(got: Any, want: Any) -> bool:
    if isinstance(want, torch.Tensor):
        return (isinstance(got, torch.Tensor) and got.dtype == want.dtype
                and got.shape == want.shape
                and torch.equal(got.reshape(-1).view(torch.uint8),
                                want.reshape(-1).view(torch.uint8)))
    return type(got) is type(want) and got == want


def soak_rank(rank: int, world: int, hops: int, depth: int, every: int, out_dir: str) -> None:
    """One rank of the soak (rank 0 sends, rank 1 receives); writes its samples as JSON."""
    from pipepack.pp import REAPER, TensorDictChannel

    del world
    samples: list[Sample] = []
    t0 = time.monotonic()
    samples.append(_sample(rank, 0, t0))
    if rank == 0:
        ch = TensorDictChannel(1)
        in_flight: collections.deque = collections.deque()
        for i in range(hops):
            if len(in_flight) >= depth:
                for h in in_flight.popleft():
                    h.wait()
            in_flight.append(ch.isend(hop_dict(i)))
            if (i + 1) % every == 0:
                # sample at a quiet point (no send in flight, the reaper idle), so the counts
                # compare across samples; one such pause every `every` hops
                while in_flight:
                    for h in in_flight.popleft():
                        h.wait()
                REAPER.drain(60)
                samples.append(_sample(rank, i + 1, t0, ch))
        while in_flight:
            for h in in_flight.popleft():
                h.wait()
        REAPER.drain(60)
        samples.append(_sample(rank, -1, t0, ch))  # after the drain: hop -1, the final state
    else:
        ch = TensorDictChannel(0)
        pending: collections.deque = collections.deque()
        posted = 0
        for i in range(hops):
            while posted < hops and len(pending) < depth:
                pending.append(ch.irecv())
                posted += 1
            got = pending.popleft().wait()
            want = hop_dict(i)
            if got.get("step") != i:
                raise AssertionError(f"hop {got.get('step')!r} arrived in place of {i}")
            if list(got) != list(want) or not all(_same(got[k], want[k]) for k in want):
                raise AssertionError(f"hop {i}: the received dict differs from the one sent")
            del got, want
            if (i + 1) % every == 0:
                samples.append(_sample(rank, i + 1, t0))
        ch.close()
        REAPER.drain(60)
        samples.append(_sample(rank, -1, t0, ch))
    with open(os.path.join(out_dir, f"soak{rank}.json"), "w") as f:
        json.dump([asdict(s) for s in samples], f)


def _entry(rank: int, world: int, init_file: str, args: tuple, timeout_s: float) -> None:
    torch.set_num_threads(1)  # as torchrun does (OMP_NUM_THREADS=1) for several local ranks
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=timeout_s))
    try:
        soak_rank(rank, world, *args)
    finally:
        dist.destroy_process_group()


def run(hops: int, depth: int, every: int, timeout_s: float = 120.0) -> dict[int, list[Sample]]:
    """Runs the soak on two fork-started local ranks; returns each rank's samples."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(_entry, args=(2, os.path.join(tmp, "init"),
                                         (hops, depth, every, tmp), timeout_s),
                           nprocs=2, start_method="fork")
        return {r: load(os.path.join(tmp, f"soak{r}.json")) for r in range(2)}


def load(path: str) -> list[Sample]:
    with open(path) as f:
        return [Sample(**s) for s in json.load(f)]


def table(samples: dict[int, list[Sample]]) -> str:
    lines = ["|   hop | s (rank 0) | RSS MiB r0 | RSS MiB r1 | threads r0/r1 | live tensors r0/r1 "
             "| of which pooled r0 | reaper pending r0 |",
             "|------:|-----------:|-----------:|-----------:|--------------:|------------------:"
             "|-------------------:|------------------:|"]
    for a, b in zip(samples[0], samples[1]):
        hop = "end" if a.hop < 0 else str(a.hop)
        lines.append(f"| {hop:>5} | {a.elapsed_s:10.1f} | {a.rss_mib:10.2f} | {b.rss_mib:10.2f} "
                     f"| {a.threads:>6} / {b.threads:<5} | {a.live_tensors:>8} / "
                     f"{b.live_tensors:<7} | {a.pooled_buffers:>18} | {a.reaper_pending:>17} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--hops", type=int, default=10_000)
    p.add_argument("--depth", type=int, default=3, help="micro-batches in flight")
    p.add_argument("--every", type=int, default=500, help="sample every N hops")
    p.add_argument("--out", help="write every sample (and versions) to this JSON file")
    args = p.parse_args(argv)
    t0 = time.monotonic()
    samples = run(args.hops, args.depth, args.every, timeout_s=max(120.0, args.hops / 50))
    wall = time.monotonic() - t0
    print(f"# soak: {args.hops} hops, {args.depth} in flight, torch {torch.__version__}, "
          f"{platform.machine()}, {os.cpu_count()} cores, {wall:.1f} s "
          f"({wall / args.hops * 1e6:.0f} us/hop)")
    print(table(samples))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"hops": args.hops, "depth": args.depth, "torch": torch.__version__,
                       "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
                       "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
                       "samples": {r: [asdict(s) for s in v] for r, v in samples.items()}},
                      f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
