"""Soaks: many hops over one link, watching memory, threads and live buffers.

Two runs, both on 2 fork-started local gloo ranks (rank 0 sends, rank 1 receives):

``steady`` (the default) -- ``--hops`` hops through one ``TensorDictChannel``, ``--depth``
micro-batches in flight on both sides: the sender waits on hop i - depth's handle before
posting hop i, the receiver keeps ``depth`` receives posted and waits on the oldest. The token
count changes on every hop (it cycles through ``TOKENS``) and every ``ODD_EVERY``-th hop carries
another dtype and an extra key. The receiver checks every hop's step counter, bytes and key
order. Every ``--every`` hops each rank samples its resident memory (``/proc/self/statm``), its
thread count, the number of live ``torch.Tensor`` objects (through ``gc``), how many of them are
idle buffers in the link's pools (capped in bytes) and the send reaper's queue; the sender
first lets its sends complete, so samples compare. ::

    python bench/soak.py --hops 10000 --depth 3 --every 500 [--transport dist|shm|auto]

``varying`` -- ``--hops`` blocking hops (``send_tensor_dict`` / ``recv_tensor_dict``) of two
``[T, hidden]`` bf16 keys with T drawn from 1000..4000 on every hop (the same draws on both
ranks, so the receiver checks shapes and bytes); RSS is read after every hop and the growth per
side (peak minus the RSS before the first hop) reported. ::

    python bench/soak.py --run varying --hops 200 --hidden 4096 [--transport dist|shm|auto]

``serving`` -- a stage hop as a serving engine makes it, for ``--minutes`` (or ``--hops``
steps): rank 0 sends ``hidden_states`` and ``residual`` (``[T, hidden]`` bf16), ``positions`` and
a small dict, with T drawn every step (85% decode, 1..256 tokens; 15% prefill, 257..4096), every
tensor made fresh; rank 1 checks every byte and sends ``next_token_ids`` back, which rank 0
checks. Every ``--sample-s`` seconds each rank records its RSS, threads, open descriptors and
pipepack's files in ``/dev/shm``. ::

    python bench/soak.py --run serving --minutes 50 [--transport dist|shm|auto]

``tests/test_soak.py`` runs all three and asserts on the samples; this script prints them.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import gc
import json
import math
import os
import platform
import random
import statistics
import sys
import tempfile
import threading
import time
import warnings
from dataclasses import asdict, dataclass
from typing import Any

import torch

TOKENS = (1, 7, 16, 33, 64, 5, 128, 2, 96)  # one per hop, cycled: shapes change every step
HIDDEN = 256
ODD_EVERY = 97  # every 97th hop: another dtype and an extra key
_PAGE = os.sysconf("SC_PAGE_SIZE")


@dataclass(frozen=True)
class Sample:
    """One rank's state after ``hop`` hops."""

    rank: int
    hop: int
    rss_bytes: int
    threads: int
    live_tensors: int
    pooled_buffers: int  # of live_tensors: buffers the link's pools hold (idle or tracked)
    pooled_bytes: int  # idle bytes of the pools (each capped in bytes)
    reaper_pending: int
    elapsed_s: float

    @property
    def rss_mib(self) -> float:
        return self.rss_bytes / (1 << 20)


def hop_dict(i: int) -> dict[str, Any]:
    """Hop ``i``'s dict; both ranks build it, so the receiver can check every byte."""
    t = TOKENS[i % len(TOKENS)]
    odd = i % ODD_EVERY == ODD_EVERY - 1
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


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE


def _live_tensors() -> int:
    with warnings.catch_warnings():  # isinstance() on some module proxies warns
        warnings.simplefilter("ignore")
        return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))


def _pools(channel: Any) -> list[Any]:
    link = getattr(channel, "link", None)
    return [
        p
        for p in (getattr(link, n, None) for n in ("send_pool", "head_pool", "recv_pool"))
        if p is not None
    ]


def _sample(rank: int, hop: int, t0: float, channel: Any = None) -> Sample:
    from pipepack.pp import REAPER

    rss = rss_bytes()  # before gc.get_objects() allocates its list
    gc.collect()  # tensors of dropped hops still waiting in reference cycles are not leaks
    pools = _pools(channel)
    return Sample(
        rank,
        hop,
        rss,
        threading.active_count(),
        _live_tensors(),
        sum(len(p._idle) + len(p._out) for p in pools),
        sum(p.idle_bytes for p in pools),
        REAPER.pending(),
        time.monotonic() - t0,
    )


def _same(got: Any, want: Any) -> bool:
    if isinstance(want, torch.Tensor):
        return (
            isinstance(got, torch.Tensor)
            and got.dtype == want.dtype
            and got.shape == want.shape
            and torch.equal(got.reshape(-1).view(torch.uint8), want.reshape(-1).view(torch.uint8))
        )
    return type(got) is type(want) and got == want


def soak_rank(
    rank: int, world: int, hops: int, depth: int, every: int, out_dir: str, transport: str = "auto"
) -> None:
    """One rank of the steady soak (rank 0 sends, rank 1 receives); writes its samples."""
    from pipepack.pp import REAPER, TensorDictChannel

    del world
    samples: list[Sample] = []
    t0 = time.monotonic()
    samples.append(_sample(rank, 0, t0))
    if rank == 0:
        ch = TensorDictChannel(1, transport=transport)
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
        ch = TensorDictChannel(0, transport=transport)
        pending: collections.deque = collections.deque()
        posted = 0
        for i in range(hops):
            # never post across a sampling point, so that samples are taken with nothing in flight
            limit = min(hops, (i // every + 1) * every)
            while posted < limit and len(pending) < depth:
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
                assert not pending
                samples.append(_sample(rank, i + 1, t0, ch))
        REAPER.drain(60)
        samples.append(_sample(rank, -1, t0, ch))
    with open(os.path.join(out_dir, f"soak{rank}.json"), "w") as f:
        json.dump({"transport": ch.transport, "samples": [asdict(s) for s in samples]}, f)


def varying_tokens(hops: int, seed: int, lo: int = 1000, hi: int = 4000) -> list[int]:
    rng = random.Random(seed)
    return [rng.randint(lo, hi) for _ in range(hops)]


def _varying_dict(i: int, tokens: int, hidden: int) -> dict[str, torch.Tensor]:
    h = torch.empty(tokens, hidden, dtype=torch.bfloat16)
    h.view(torch.int16).fill_(i)  # cheap, and distinct per hop
    r = torch.empty(tokens, hidden, dtype=torch.bfloat16)
    r.view(torch.int16).fill_(-i)
    return {"hidden_states": h, "residual": r}


def varying_rank(
    rank: int, world: int, hops: int, hidden: int, seed: int, out_dir: str, transport: str = "auto"
) -> None:
    """One rank of the varying-token run; writes the RSS after every hop."""
    from pipepack.pp import TensorDictChannel, flush, recv_tensor_dict, send_tensor_dict

    del world
    tokens = varying_tokens(hops, seed)
    peer = 1 - rank
    ch = TensorDictChannel(peer, transport=transport)  # fixes the link's transport
    rss = [rss_bytes()]
    t0 = time.monotonic()
    for i, t in enumerate(tokens):
        if rank == 0:
            send_tensor_dict(_varying_dict(i, t, hidden), peer)
        else:
            got = recv_tensor_dict(peer)
            h, r = got["hidden_states"], got["residual"]
            if tuple(h.shape) != (t, hidden) or tuple(r.shape) != (t, hidden):
                raise AssertionError(
                    f"hop {i}: shapes {h.shape} {r.shape}, expected ({t}, {hidden})"
                )
            for x, v in ((h, i), (r, -i)):  # first, middle and last element of each key
                flat = x.view(torch.int16).reshape(-1)
                idx = torch.tensor([0, flat.numel() // 2, flat.numel() - 1])
                if not bool((flat[idx] == torch.tensor(v, dtype=torch.int16)).all()):
                    raise AssertionError(f"hop {i}: wrong bytes")
            del got, h, r, x, flat
        rss.append(rss_bytes())
    flush(60)
    pools = _pools(ch)
    with open(os.path.join(out_dir, f"varying{rank}.json"), "w") as f:
        json.dump(
            {
                "rank": rank,
                "transport": ch.transport,
                "tokens": tokens,
                "hidden": hidden,
                "rss": rss,
                "seconds": time.monotonic() - t0,
                "pool_cap_bytes": [p.cap_bytes for p in pools],
                "pool_idle_bytes": [p.idle_bytes for p in pools],
                "pool_hits": [p.hits for p in pools],
                "pool_misses": [p.misses for p in pools],
            },
            f,
        )


def draw_tokens(rng: random.Random) -> int:
    """A serving step's token count: mostly decode batches, now and then a prefill."""
    return rng.randint(1, 256) if rng.random() < 0.85 else rng.randint(257, 4096)


def _serving_dict(i: int, tokens: int, hidden: int, stop: bool) -> dict[str, Any]:
    v = float(i % 251)  # exact in bf16
    return {
        "hidden_states": torch.full((tokens, hidden), v, dtype=torch.bfloat16),
        "residual": torch.full((tokens, hidden), -v, dtype=torch.bfloat16),
        "positions": torch.arange(i, i + tokens),
        "meta": {"step": i, "tokens": tokens, "stop": stop},
    }


def _shm_files() -> int:
    try:
        return sum(1 for n in os.listdir("/dev/shm") if n.startswith("pipepack"))
    except OSError:
        return -1


def serving_rank(
    rank: int,
    world: int,
    hops: int,
    seconds: float,
    hidden: int,
    sample_s: float,
    seed: int,
    out_dir: str,
    transport: str = "auto",
) -> None:
    """One rank of the serving run (see the module doc); rank 0 decides when it ends and says so
    in the hop, so both ranks run the same steps."""
    from pipepack.pp import TensorDictChannel, flush, recv_tensor_dict, send_tensor_dict

    del world
    peer = 1 - rank
    ch = TensorDictChannel(peer, transport=transport)  # fixes the link's transport
    rng = random.Random(seed)
    t0 = time.monotonic()
    samples = []
    last = -math.inf
    i = 0
    while True:
        t = draw_tokens(rng)
        if rank == 0:
            stop = i + 1 >= hops or time.monotonic() - t0 >= seconds
            send_tensor_dict(_serving_dict(i, t, hidden, stop), peer)
            back = recv_tensor_dict(peer)
            want = torch.arange(min(t, 256)) + i
            if back.get("step") != i or not torch.equal(back["next_token_ids"], want):
                raise AssertionError(f"step {i}: wrong reply {back!r}")
            del back
        else:
            got = recv_tensor_dict(peer)
            meta = got["meta"]
            if meta["step"] != i or meta["tokens"] != t:
                raise AssertionError(f"step {meta['step']} ({meta['tokens']}) where {i} was due")
            v = float(i % 251)
            h, r, pos = got["hidden_states"], got["residual"], got["positions"]
            if h.shape != (t, hidden) or r.shape != (t, hidden):
                raise AssertionError(f"step {i}: shapes {h.shape} {r.shape}")
            if not (bool((h == v).all()) and bool((r == -v).all())):
                raise AssertionError(f"step {i}: wrong activation bytes")
            if not torch.equal(pos, torch.arange(i, i + t)):
                raise AssertionError(f"step {i}: wrong positions")
            stop = meta["stop"]
            del got, h, r, pos
            send_tensor_dict({"next_token_ids": torch.arange(min(t, 256)) + i, "step": i}, peer)
        i += 1
        now = time.monotonic()
        if stop or now - last >= sample_s:
            last = now
            samples.append(
                {
                    "step": i,
                    "t_s": now - t0,
                    "rss_bytes": rss_bytes(),
                    "threads": threading.active_count(),
                    "fds": len(os.listdir("/proc/self/fd")),
                    "shm_files": _shm_files(),
                }
            )
        if stop:
            break
    flush(60)
    with open(os.path.join(out_dir, f"serving{rank}.json"), "w") as f:
        json.dump({"rank": rank, "transport": ch.transport, "steps": i, "samples": samples}, f)


def serving_summary(record: dict[str, Any]) -> dict[str, Any]:
    """RSS of one side after the first fifth of the run (its warm-up), then the median and the
    peak of each half of the rest; the threads and descriptors seen."""
    s = record["samples"]
    mib = [x["rss_bytes"] / 2**20 for x in s]
    rest = mib[len(mib) // 5 :] or mib
    a, b = rest[: len(rest) // 2] or rest, rest[len(rest) // 2 :]
    return {
        "steps": record["steps"],
        "rss_first_mib": round(mib[0], 1),
        "median_mib": [round(statistics.median(a), 1), round(statistics.median(b), 1)],
        "peak_mib": [round(max(a), 1), round(max(b), 1)],
        "threads": sorted({x["threads"] for x in s}),
        "fds": sorted({x["fds"] for x in s}),
        "shm_files": sorted({x["shm_files"] for x in s}),
    }


def run_serving(
    seconds: float,
    hops: int = 1 << 62,
    hidden: int = 4096,
    sample_s: float = 30.0,
    seed: int = 0,
    transport: str = "auto",
) -> dict[int, dict[str, Any]]:
    with tempfile.TemporaryDirectory() as out:
        _launch(
            serving_rank,
            (hops, seconds, hidden, sample_s, seed, out, transport),
            seconds + 300.0,
        )
        return {r: json.load(open(os.path.join(out, f"serving{r}.json"))) for r in range(2)}


def _launch(fn: Any, args: tuple, timeout_s: float) -> None:
    from pipepack.testing import run_ranks

    run_ranks(2, fn, *args, timeout_s=timeout_s)


def run(
    hops: int, depth: int, every: int, transport: str = "auto", timeout_s: float = 120.0
) -> dict[int, list[Sample]]:
    """Runs the steady soak on two fork-started local ranks; returns each rank's samples."""
    with tempfile.TemporaryDirectory() as out:
        _launch(soak_rank, (hops, depth, every, out, transport), timeout_s)
        return {r: load(os.path.join(out, f"soak{r}.json")) for r in range(2)}


def run_varying(
    hops: int, hidden: int, seed: int = 0, transport: str = "auto", timeout_s: float = 300.0
) -> dict[int, dict[str, Any]]:
    with tempfile.TemporaryDirectory() as out:
        _launch(varying_rank, (hops, hidden, seed, out, transport), timeout_s)
        return {r: json.load(open(os.path.join(out, f"varying{r}.json"))) for r in range(2)}


def load(path: str) -> list[Sample]:
    with open(path) as f:
        return [Sample(**s) for s in json.load(f)["samples"]]


def growth_mib(record: dict[str, Any]) -> float:
    """RSS growth of one side of the varying run: the peak minus the RSS before the first hop."""
    rss = record["rss"]
    return (max(rss) - rss[0]) / (1 << 20)


def table(samples: dict[int, list[Sample]]) -> str:
    lines = [
        "|   hop | s (rank 0) | RSS MiB r0 | RSS MiB r1 | threads r0/r1 | live tensors r0/r1 "
        "| pooled r0/r1 | pooled MiB r0/r1 | reaper pending r0 |",
        "|------:|-----------:|-----------:|-----------:|--------------:|------------------:"
        "|-------------:|-----------------:|------------------:|",
    ]
    for a, b in zip(samples[0], samples[1]):
        hop = "end" if a.hop < 0 else str(a.hop)
        lines.append(
            f"| {hop:>5} | {a.elapsed_s:10.1f} | {a.rss_mib:10.2f} | {b.rss_mib:10.2f} "
            f"| {a.threads:>6} / {b.threads:<5} | {a.live_tensors:>8} / "
            f"{b.live_tensors:<7} | {a.pooled_buffers:>5} / {b.pooled_buffers:<5} "
            f"| {a.pooled_bytes / 2**20:7.1f} / {b.pooled_bytes / 2**20:<7.1f} "
            f"| {a.reaper_pending:>17} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run", choices=("steady", "varying", "serving"), default="steady")
    p.add_argument("--hops", type=int, default=None, help="default: 10000 (steady), 200 (varying)")
    p.add_argument("--depth", type=int, default=3, help="micro-batches in flight (steady)")
    p.add_argument("--every", type=int, default=500, help="sample every N hops (steady)")
    p.add_argument("--hidden", type=int, default=4096, help="hidden size (varying, serving)")
    p.add_argument("--minutes", type=float, default=10.0, help="length of the serving run")
    p.add_argument("--sample-s", type=float, default=30.0, help="sampling period (serving)")
    p.add_argument("--seed", type=int, default=0, help="token-count draws (varying)")
    p.add_argument("--transport", choices=("auto", "dist", "shm"), default="auto")
    p.add_argument("--out", help="write every sample (and versions) to this JSON file")
    args = p.parse_args(argv)
    t0 = time.monotonic()
    meta = {
        "torch": torch.__version__,
        "machine": platform.machine(),
        "cores": os.cpu_count(),
        "transport": args.transport,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
    }
    if args.run == "steady":
        hops = args.hops or 10_000
        samples = run(hops, args.depth, args.every, args.transport, timeout_s=max(120.0, hops / 50))
        wall = time.monotonic() - t0
        print(
            f"# soak: {hops} hops, {args.depth} in flight, {args.transport}, torch "
            f"{torch.__version__}, {platform.machine()}, {os.cpu_count()} cores, {wall:.1f} s "
            f"({wall / hops * 1e6:.0f} us/hop)"
        )
        print(table(samples))
        record = {
            **meta,
            "hops": hops,
            "depth": args.depth,
            "samples": {r: [asdict(s) for s in v] for r, v in samples.items()},
        }
    elif args.run == "serving":
        res = run_serving(
            args.minutes * 60,
            args.hops or 1 << 62,
            args.hidden,
            args.sample_s,
            args.seed,
            args.transport,
        )
        wall = time.monotonic() - t0
        print(
            f"# serving: {res[0]['steps']} steps of [T, {args.hidden}] bf16 x 2 + ids back, "
            f"{args.transport} (now {res[0]['transport']}), {wall:.0f} s"
        )
        summary = {r: serving_summary(res[r]) for r in (0, 1)}
        for r in (0, 1):
            print(("sender", "receiver")[r], summary[r])
        record = {**meta, "hidden": args.hidden, "summary": summary, "results": res}
    else:
        hops = args.hops or 200
        res = run_varying(hops, args.hidden, args.seed, args.transport)
        wall = time.monotonic() - t0
        print(
            f"# varying tokens: {hops} hops of 2 x [1000..4000, {args.hidden}] bf16, "
            f"{args.transport} (now {res[0]['transport']}), {wall:.1f} s"
        )
        for r in (0, 1):
            side = "sender" if r == 0 else "receiver"
            print(
                f"{side}: RSS {res[r]['rss'][0] / 2**20:.0f} MiB before, peak "
                f"{max(res[r]['rss']) / 2**20:.0f} MiB, growth {growth_mib(res[r]):.0f} MiB; "
                f"pool caps {[c >> 20 for c in res[r]['pool_cap_bytes']]} MiB, hits "
                f"{res[r]['pool_hits']}, misses {res[r]['pool_misses']}"
            )
        record = {**meta, "hops": hops, "hidden": args.hidden, "results": res}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(record, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
