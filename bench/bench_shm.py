"""Two-process ping-pong of a raw hop through the shared-memory ring (pipepack.pp.shm).

A raw hop: the sender reserves a slot, copies the bytes into it on one thread
(``pipepack.pp.transport.copy_bytes``, the stand-in for the pack), publishes; the receiver waits
and gets a zero-copy view, then drops it. Each process owns the RecvRing of the direction it
receives. Reported per size: median / p10 / p90 of one hop (half a round trip), GB/s of the
hop, the single-thread memcpy bandwidth of the same size measured in the same run, their ratio,
and CPU time per hop of both processes.

Also: a spin-budget sweep at 128 KiB (latency and CPU per hop), the one-way latency of a hop that
arrives after the receiver went to sleep (a hop every few ms), and the CPU a receiver burns while
nothing arrives.

    python bench/bench_shm.py [--quick] [--out results.json]

``--hops-only`` runs just the ping-pong of the ring's own per-hop cost (512 B, 40 KiB, 128 KiB;
``--repeat`` runs of ``--iters`` hops each, the median of the runs' medians reported)::

    python bench/bench_shm.py --hops-only --repeat 5 --iters 3000
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import statistics
import sys
import time

import numpy as np
import torch

from pipepack.pp import shm
from pipepack.pp.transport import copy_bytes

CTX = mp.get_context("fork")
KiB, MiB = 1 << 10, 1 << 20


def _cpu() -> float:
    return time.process_time()


def _peer(conn, n: int, iters: int, spin_us: float) -> None:
    """The echoing side: receives a hop, sends one of the same size back."""
    torch.set_num_threads(1)
    rx = shm.RecvRing(slots=4, timeout=60, spin_us=spin_us)
    conn.send(rx.name)
    tx = shm.SendRing(conn.recv(), timeout=60, spin_us=spin_us)
    src = torch.full((n,), 7, dtype=torch.uint8)
    c0 = _cpu()
    for _ in range(iters):
        a = rx.wait()
        del a
        r = tx.reserve(n)
        copy_bytes(r.payload, src)
        tx.publish(r, b"")
        del r
    conn.send(_cpu() - c0)
    conn.recv()
    tx.close()
    rx.close()


def pingpong(n: int, iters: int, warmup: int, spin_us: float) -> dict:
    parent, child = CTX.Pipe()
    total = iters + warmup
    p = CTX.Process(target=lambda: (_peer(child, n, total, spin_us), os._exit(0)), daemon=True)
    p.start()
    rx = shm.RecvRing(slots=4, timeout=60, spin_us=spin_us)
    tx = shm.SendRing(parent.recv(), timeout=60, spin_us=spin_us)
    parent.send(rx.name)
    src = torch.full((n,), 3, dtype=torch.uint8)
    rtt = []
    c0 = 0.0
    for i in range(total):
        if i == warmup:
            c0 = _cpu()
        t0 = time.perf_counter_ns()
        r = tx.reserve(n)
        copy_bytes(r.payload, src)
        tx.publish(r, b"")
        del r
        a = rx.wait()
        t1 = time.perf_counter_ns()
        del a
        rtt.append(t1 - t0)
    cpu_me = _cpu() - c0
    cpu_peer = parent.recv()  # includes its warmup hops: scaled below
    parent.send("bye")
    p.join(30)
    tx.close()
    rx.close()
    hop = sorted(x / 2e3 for x in rtt[warmup:])  # microseconds per hop
    med = statistics.median(hop)
    return {
        "bytes": n,
        "iters": iters,
        "spin_us": spin_us,
        "hop_us_median": med,
        "hop_us_p10": hop[len(hop) // 10],
        "hop_us_p90": hop[len(hop) * 9 // 10],
        "hop_GBps": n / (med * 1e-6) / 1e9 if n else None,
        # each round trip is two hops; CPU of both processes over those two hops
        "cpu_us_per_hop_both_procs": (cpu_me + cpu_peer * iters / total) / (2 * iters) * 1e6,
    }


def memcpy_bw(n: int, reps: int) -> dict:
    """Single-thread copy of n bytes between two private, pre-touched buffers."""
    a = np.full(n, 1, np.uint8)
    b = np.zeros(n, np.uint8)
    np.copyto(b, a)
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter_ns()
        np.copyto(b, a)
        ts.append(time.perf_counter_ns() - t0)
    med = statistics.median(ts) / 1e3
    return {"bytes": n, "memcpy_us_median": med, "memcpy_GBps": n / (med * 1e-6) / 1e9}


def _sleepy_receiver(conn, gap_s: float, hops: int, spin_us: float) -> None:
    torch.set_num_threads(1)
    rx = shm.RecvRing(slots=4, slot_bytes=1 * MiB, timeout=60, spin_us=spin_us)
    conn.send(rx.name)
    lat = []
    for _ in range(hops):
        a = rx.wait()
        t = time.perf_counter_ns()
        lat.append((t - int.from_bytes(a.meta, "little")) / 1e3)
        del a
    conn.send(lat)
    rx.close()


def after_sleep(n: int, gap_s: float, hops: int, spin_us: float) -> dict:
    """One-way latency (perf_counter is CLOCK_MONOTONIC, shared by both processes) of a hop that
    arrives ``gap_s`` after the previous one: the receiver is asleep on the futex by then."""
    parent, child = CTX.Pipe()
    p = CTX.Process(
        target=lambda: (_sleepy_receiver(child, gap_s, hops, spin_us), os._exit(0)), daemon=True
    )
    p.start()
    tx = shm.SendRing(parent.recv(), timeout=60, spin_us=spin_us)
    src = np.full(n, 5, np.uint8)
    for _ in range(hops):
        time.sleep(gap_s)
        r = tx.reserve(n)
        np.copyto(r.payload.numpy(), src)
        tx.publish(r, time.perf_counter_ns().to_bytes(8, "little"))
        del r
    lat = sorted(parent.recv()[5:])
    p.join(30)
    tx.close()
    return {
        "bytes": n,
        "gap_ms": gap_s * 1e3,
        "spin_us": spin_us,
        "one_way_us_median": statistics.median(lat),
        "one_way_us_p90": lat[len(lat) * 9 // 10],
    }


def idle_cpu(seconds: float, spin_us: float) -> dict:
    """CPU share of a receiver waiting ``seconds`` for a hop that never comes (sender attached)."""
    rx = shm.RecvRing(slots=2, slot_bytes=4096, spin_us=spin_us)
    tx = shm.SendRing(rx.name)
    c0, t0 = _cpu(), time.perf_counter()
    try:
        rx.wait(seconds)
    except TimeoutError:
        pass
    share = (_cpu() - c0) / (time.perf_counter() - t0)
    tx.close()
    rx.close()
    return {"spin_us": spin_us, "seconds": seconds, "cpu_share": share}


def env() -> dict:
    cpu = "?"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "numpy": np.__version__,
        "machine": platform.machine(),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        "copy": "transport.copy_bytes (numpy.copyto, one thread)",
        "default_spin_us": shm.DEFAULT_SPIN_US,
        "max_sleep_s": shm.MAX_SLEEP_S,
        "loadavg": os.getloadavg(),
        "spin_yield": os.environ.get("PIPEPACK_SHM_SPIN_YIELD", "1"),
    }


def hops_only(repeat: int, iters: int, path: str | None) -> None:
    """The ring's own per-hop cost: ``repeat`` ping-pong runs per size, interleaved."""
    sizes = (512, 40 * KiB, 128 * KiB)
    runs: dict[int, list[dict]] = {n: [] for n in sizes}
    for _ in range(repeat):
        for n in sizes:
            runs[n].append(
                pingpong(n, iters, warmup=max(iters // 10, 3), spin_us=shm.DEFAULT_SPIN_US)
            )
    out = {"env": env(), "iters": iters, "repeat": repeat, "hops": []}
    for n in sizes:
        meds = sorted(h["hop_us_median"] for h in runs[n])
        cpu = statistics.median(h["cpu_us_per_hop_both_procs"] for h in runs[n])
        out["hops"].append({"bytes": n, "hop_us_medians": meds, "cpu_us_per_hop": cpu})
        print(
            f"{n:>7} B  hop {statistics.median(meds):6.1f} us median of {repeat} run medians "
            f"(runs {', '.join(f'{m:.1f}' for m in meds)})  cpu/hop both procs {cpu:.1f} us",
            flush=True,
        )
    print(json.dumps(out["env"]))
    if path:
        with open(path, "w") as f:
            json.dump(out, f, indent=1)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="fewer iterations")
    ap.add_argument("--out", help="write the JSON record here too")
    ap.add_argument("--hops-only", action="store_true", help="only the small-hop ping-pong")
    ap.add_argument("--repeat", type=int, default=5, help="runs per size (--hops-only)")
    ap.add_argument("--iters", type=int, default=3000, help="hops per run (--hops-only)")
    args = ap.parse_args()
    if args.hops_only:
        hops_only(args.repeat, args.iters, args.out)
        return
    q = 0.2 if args.quick else 1.0
    out: dict = {"env": env(), "hops": [], "spin_sweep": [], "after_sleep": [], "idle": []}
    sizes = [(16 * KiB, 3000), (128 * KiB, 3000), (1 * MiB, 1000), (64 * MiB, 40)]
    for n, iters in sizes:
        it = max(int(iters * q), 10)
        h = pingpong(n, it, warmup=max(it // 10, 3), spin_us=shm.DEFAULT_SPIN_US)
        m = memcpy_bw(n, max(it, 20))
        h.update(m)
        h["ratio_to_memcpy"] = h["hop_GBps"] / m["memcpy_GBps"]
        out["hops"].append(h)
        print(
            f"{n / KiB:>8.0f} KiB  hop {h['hop_us_median']:9.1f} us (p10 {h['hop_us_p10']:.1f}"
            f", p90 {h['hop_us_p90']:.1f})  {h['hop_GBps']:6.2f} GB/s  memcpy "
            f"{m['memcpy_us_median']:9.1f} us {m['memcpy_GBps']:6.2f} GB/s  ratio "
            f"{h['ratio_to_memcpy']:.2f}  cpu/hop {h['cpu_us_per_hop_both_procs']:.1f} us",
            flush=True,
        )
    for spin in (0.0, 10.0, 30.0, 100.0, 300.0):
        h = pingpong(128 * KiB, max(int(2000 * q), 10), warmup=50, spin_us=spin)
        out["spin_sweep"].append(h)
        print(
            f"spin {spin:5.0f} us: 128 KiB hop {h['hop_us_median']:7.1f} us (p90 "
            f"{h['hop_us_p90']:.1f})  cpu/hop both procs {h['cpu_us_per_hop_both_procs']:.1f} us",
            flush=True,
        )
    for gap in (0.002, 0.02):
        s = after_sleep(128 * KiB, gap, max(int(300 * q), 20), shm.DEFAULT_SPIN_US)
        out["after_sleep"].append(s)
        print(
            f"hop every {gap * 1e3:.0f} ms: one-way {s['one_way_us_median']:.1f} us (p90 "
            f"{s['one_way_us_p90']:.1f})",
            flush=True,
        )
    for spin in (shm.DEFAULT_SPIN_US,):
        r = idle_cpu(2.0 * q if q < 1 else 2.0, spin)
        out["idle"].append(r)
        print(
            f"idle receiver (spin {spin:.0f} us): {100 * r['cpu_share']:.2f}% of a core", flush=True
        )
    print(json.dumps(out["env"]))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
