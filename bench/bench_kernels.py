# Kernel benchmark: pipepack pack / unpack_into / reassemble against what a user writes instead.
#
# Reproduce (repo root, after `python -m pip install --no-deps --no-build-isolation -e .`):
#   python bench/bench_kernels.py             # CUDA when available (Triton path), else CPU
#   python bench/bench_kernels.py --quick     # fewer payloads and repeats, a smoke run
# Output: a markdown table on stdout, JSON in bench/results/kernels_<device-slug>.json
# (`--out PATH`, or `--out DIR` for DIR/kernels_<device-slug>.json).
"""Times pipepack's copy kernels against the torch code a user would write instead.

Every (op, payload, method) is first run once on cleared outputs and compared byte for byte with
the sources, so a wrong fast path is reported as WRONG and never timed. The floor is one
contiguous ``dst.copy_(src)`` of the payload's bytes, timed in the same run; GB/s counts payload
bytes once (not read + write).

CUDA: device time per call from CUDA events around each call, after warm-up. A GPU spin
(``torch.cuda._sleep``) is queued before each batch of calls, so the host enqueues the whole
batch before the device reaches it: the events then time the device work only, not Python.
Python's cost is the separate ``host µs`` column (the call timed without synchronising).
CPU: ``time.perf_counter`` around each call, one torch thread by default; pipepack runs its torch
path there (the Triton interpreter is for tests, not for speed).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import shlex
import socket
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from functools import partial
from pathlib import Path
from typing import Any

import torch

if "--stub-launch" in sys.argv:
    # the kernel path on CPU tensors needs the interpreter switched on before pipepack's kernels
    # are defined; the launch itself is then replaced by a no-op (see stub_launches)
    os.environ["TRITON_INTERPRET"] = "1"

from pipepack.kernels import (
    Layout,
    pack,
    plan_layout,
    reassemble,
    reassemble_into,
    unpack,
    unpack_into,
)

RESULTS_DIR = Path(__file__).resolve().parent / "results"
PIPEPACK = "pipepack"  # the method every other one is compared with
FLOOR = "copy_ (floor)"
HOST_PAYLOADS = ("mixed16", "hidden_bs1")  # where the host cost of pack gets its own table
_HOST_AHEAD_S = 1e-3  # host time enqueued per batch while the device spins
_MAX_BATCH = 64  # calls per batch, so a batch's launches fit the device's launch queue
_MAX_SLEEP_S = 50e-3
_SLEEP_CYCLES_PER_S = 2.0e9  # an upper bound on GPU clocks: a longer spin is harmless


# ----------------------------------------------------------------------------- payloads


@dataclass(frozen=True)
class Payload:
    """A tensor dict's worth of tensors; ``kind`` says how strided sources/destinations look."""

    name: str
    what: str
    specs: tuple[tuple[torch.dtype, tuple[int, ...]], ...]
    kind: str = "contiguous"  # or "transposed" (x.t() of a [n, m] tensor), "columns" ([:, m:])

    @property
    def nbytes(self) -> int:
        return sum(math.prod(s) * d.itemsize for d, s in self.specs)


def _hidden(bs: int, kind: str = "contiguous") -> Payload:
    """hidden_states + residual of a 4096-wide model: the decode/prefill PP hop."""
    prefix = {"contiguous": "hidden", "transposed": "transposed", "columns": "columns"}[kind]
    suffix = {"contiguous": "", "transposed": " src/dst .t()", "columns": " src/dst [:, 4096:]"}
    return Payload(
        f"{prefix}_bs{bs}",
        f"2x[{bs},4096] bf16{suffix[kind]}",
        ((torch.bfloat16, (bs, 4096)),) * 2,
        kind,
    )


def _mixed16(world: int) -> Payload:
    """16 small tensors of mixed dtypes, 1-4 KiB each; some sizes are not multiples of 16 B."""
    dtypes = (
        torch.bfloat16,
        torch.float32,
        torch.int64,
        torch.int32,
        torch.float16,
        torch.uint8,
        torch.bool,
        torch.int8,
    )
    specs = []
    for i in range(16):
        dtype = dtypes[i % len(dtypes)]
        target = 1024 + (i * 197) % 3072
        numel = max(world, target // dtype.itemsize // world * world)
        shape = (numel,) if i % 2 == 0 else (world, numel // world)
        specs.append((dtype, shape))
    return Payload("mixed16", "16 mixed dtypes, 1-4 KiB each", tuple(specs))


def _many128(world: int) -> Payload:
    """128 tensors of 0.5-64 KiB (bf16 and fp32): a dict with one entry per layer or request."""
    specs = []
    for i in range(128):
        dtype = torch.bfloat16 if i % 2 == 0 else torch.float32
        numel = world * (32 + (i * 389) % 2048)
        specs.append((dtype, (numel,)))
    return Payload("many128", "128 tensors, 0.5-64 KiB, bf16/fp32", tuple(specs))


def payloads(*, quick: bool, world: int) -> list[Payload]:
    full = [
        *(_hidden(bs) for bs in (1, 8, 64, 256, 4096)),
        _mixed16(world),
        _many128(world),
        Payload(
            "big_128MiB",
            "2x[8192,4096] bf16 (128 MiB)",
            ((torch.bfloat16, (8192, 4096)),) * 2,
        ),
        _hidden(8, "columns"),
        _hidden(256, "columns"),
        _hidden(256, "transposed"),
        _hidden(4096, "transposed"),
    ]
    if not quick:
        return full
    keep = {"hidden_bs1", "hidden_bs256", "mixed16", "many128", "columns_bs8", "transposed_bs256"}
    return [p for p in full if p.name in keep]


def _random(dtype: torch.dtype, shape: Sequence[int], device: torch.device) -> torch.Tensor:
    if dtype.is_floating_point:
        return torch.randn(shape, device=device).to(dtype)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, device=device).bool()
    info = torch.iinfo(dtype)
    lo, hi = max(info.min, -1000), min(info.max, 1000) + 1
    return torch.randint(lo, hi, shape, dtype=dtype, device=device)


def _make(
    kind: str, dtype: torch.dtype, shape: tuple[int, ...], device: torch.device, *, fill: bool
) -> torch.Tensor:
    """A tensor of ``shape``: contiguous, or a transposed / column-sliced view of a larger one."""
    if kind == "contiguous" or len(shape) != 2:
        base_shape = shape
    elif kind == "transposed":
        base_shape = (shape[1], shape[0])
    elif kind == "columns":
        base_shape = (shape[0], 2 * shape[1])
    else:
        raise ValueError(f"unknown payload kind {kind!r}")
    if fill:
        base = _random(dtype, base_shape, device)
    else:
        base = torch.empty(base_shape, dtype=dtype, device=device)
    if kind == "transposed" and len(shape) == 2:
        return base.t()
    if kind == "columns" and len(shape) == 2:
        return base[:, shape[1] :]
    return base


def _bytes(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bytes, 1-D (a copy when ``t`` is strided): what bit-exact checks compare."""
    return t.reshape(-1).view(torch.uint8)


# ----------------------------------------------------------------------------- cases


@dataclass(frozen=True)
class Case:
    """One timed callable; ``check`` runs it once on cleared outputs: None when bit-exact."""

    op: str
    method: str
    run: Callable[[], object]
    check: Callable[[], str | None]


@dataclass(frozen=True)
class Prepared:
    payload: Payload
    layout: Layout
    srcs: list[torch.Tensor]
    expected: list[torch.Tensor]  # every source's bytes, contiguous
    device: torch.device
    world: int


def _compare(got: Sequence[torch.Tensor], expected: Sequence[torch.Tensor]) -> str | None:
    if len(got) != len(expected):
        return f"{len(got)} outputs for {len(expected)} entries"
    for i, (g, e) in enumerate(zip(got, expected)):
        g = _bytes(g)
        if g.numel() != e.numel():
            return f"entry {i}: {g.numel()} bytes, expected {e.numel()}"
        if not torch.equal(g, e):
            bad = int((g != e).sum())
            return f"entry {i}: {bad} of {e.numel()} bytes differ"
    return None


def _check_buffer_entries(
    run: Callable[[], torch.Tensor],
    buf: torch.Tensor,
    offsets: Sequence[tuple[int, int]],
    expected: Sequence[torch.Tensor],
) -> str | None:
    """Entries must hold the sources' bytes; in ``buf`` itself, padding must stay untouched."""
    buf.zero_()
    out = run()
    wrong = _compare([out[o : o + n] for o, n in offsets], expected)
    if wrong is not None or out.data_ptr() != buf.data_ptr():
        return wrong
    for o, n in offsets:
        out[o : o + n].zero_()
    return "wrote into the padding between entries" if bool(buf.any()) else None


def _root(t: torch.Tensor) -> torch.Tensor:
    return t if t._base is None else t._base


def _check_outs(
    run: Callable[[], object], outs: Sequence[torch.Tensor], expected: Sequence[torch.Tensor]
) -> str | None:
    """Destinations must hold the sources' bytes, and nothing else of their storage may change
    (the other half of a column slice, the padding of a buffer the views share)."""
    roots = list({id(r): r for r in map(_root, outs)}.values())  # contiguous by construction
    for r in roots:
        r.zero_()
    run()
    wrong = _compare(outs, expected)
    if wrong is not None:
        return wrong
    for o in outs:
        o.zero_()
    if any(bool(_bytes(r).any()) for r in roots):
        return "wrote outside its destinations"
    return None


def _copy_pairs(dsts: Sequence[torch.Tensor], srcs: Sequence[torch.Tensor]) -> None:
    for d, s in zip(dsts, srcs):
        d.copy_(s)


def _returning(fn: Callable[[], object], value: torch.Tensor) -> torch.Tensor:
    fn()
    return value


def _byte_views_if_contiguous(
    dsts: Sequence[torch.Tensor], srcs: Sequence[torch.Tensor]
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """What a careful user hands ``_foreach_copy_``: one dtype (uint8) keeps its fast path."""
    if all(t.is_contiguous() for t in (*dsts, *srcs)):
        return [_bytes(t) for t in dsts], [_bytes(t) for t in srcs]
    return list(dsts), list(srcs)


def floor_case(p: Prepared) -> Case:
    src = torch.cat(p.expected) if p.expected else torch.empty(0, dtype=torch.uint8)
    dst = torch.empty_like(src)
    run = partial(dst.copy_, src)
    return Case("copy", FLOOR, run, partial(_check_outs, run, [dst], [src]))


def pack_cases(p: Prepared) -> list[Case]:
    layout, srcs = p.layout, p.srcs
    buf = torch.empty(layout.nbytes, dtype=torch.uint8, device=p.device)
    views = unpack(buf, layout)
    packed = [(e.offset, e.nbytes) for e in layout.entries]
    dense, pos = [], 0
    for e in layout.entries:
        dense.append((pos, e.nbytes))
        pos += e.nbytes
    fe_dst, fe_src = _byte_views_if_contiguous(views, srcs)

    def cat() -> torch.Tensor:
        return torch.cat([_bytes(t) for t in srcs])

    runs = {
        PIPEPACK: (partial(pack, srcs, out=buf, layout=layout), packed),
        "pipepack (alloc)": (partial(pack, srcs), packed),
        "torch.cat": (cat, dense),
        "_foreach_copy_": (
            partial(_returning, partial(torch._foreach_copy_, fe_dst, fe_src), buf),
            packed,
        ),
        "copy_ loop": (partial(_returning, partial(_copy_pairs, views, srcs), buf), packed),
    }
    return [
        Case(
            "pack",
            method,
            run,
            partial(_check_buffer_entries, run, buf, offsets, p.expected),
        )
        for method, (run, offsets) in runs.items()
    ]


def unpack_into_cases(p: Prepared) -> list[Case]:
    layout = p.layout
    buf = torch.zeros(layout.nbytes, dtype=torch.uint8, device=p.device)
    _copy_pairs(unpack(buf, layout), p.srcs)
    views = unpack(buf, layout)
    outs = [_make(p.payload.kind, e.dtype, e.shape, p.device, fill=False) for e in layout.entries]
    fe_dst, fe_src = _byte_views_if_contiguous(outs, views)
    runs = {
        PIPEPACK: partial(unpack_into, buf, layout, outs),
        "_foreach_copy_": partial(torch._foreach_copy_, fe_dst, fe_src),
        "copy_ loop": partial(_copy_pairs, outs, views),
    }
    return [
        Case("unpack_into", method, run, partial(_check_outs, run, outs, p.expected))
        for method, run in runs.items()
    ]


def _gathered(p: Prepared) -> torch.Tensor:
    """What one all-gather of every rank's sliced part leaves: ``[W, slice_bytes]``."""
    w = p.world
    part = p.layout.sliced(w)
    gathered = torch.zeros(w, p.layout.sliced_nbytes(w), dtype=torch.uint8, device=p.device)
    for pe, full in zip(part.entries, p.expected):
        gathered[:, pe.offset : pe.offset + pe.nbytes].copy_(full.view(w, -1))
    return gathered


def _cat_rows(pairs: Sequence[tuple[list[torch.Tensor], torch.Tensor]]) -> None:
    for rows, out in pairs:
        torch.cat(rows, out=out)


def reassemble_cases(p: Prepared) -> list[Case]:
    w, layout = p.world, p.layout
    if any(e.numel % w for e in layout.entries):
        return []
    gathered = _gathered(p)
    part = layout.sliced(w)
    slices = [gathered[:, pe.offset : pe.offset + pe.nbytes] for pe in part.entries]
    if p.payload.kind != "contiguous":
        # into strided destinations: each rank's slice is a block of rows of the full tensor
        outs = [
            _make(p.payload.kind, e.dtype, e.shape, p.device, fill=False) for e in layout.entries
        ]
        dst_blocks = [o.view(w, -1, *o.shape[1:]) for o in outs]
        src_blocks = [
            s.view(e.dtype).view(w, -1, *e.shape[1:]) for s, e in zip(slices, layout.entries)
        ]
        runs = {
            PIPEPACK: partial(reassemble_into, gathered, layout, outs),
            "copy_ loop": partial(_copy_pairs, dst_blocks, src_blocks),
        }
        return [
            Case("reassemble", method, run, partial(_check_outs, run, outs, p.expected))
            for method, run in runs.items()
        ]

    out = torch.empty(layout.nbytes, dtype=torch.uint8, device=p.device)
    views = unpack(out, layout)
    dst_rows = [_bytes(v).view(w, -1) for v in views]  # row r = rank r's slice of the tensor
    # FSDP2's copy-out: one split_with_sizes_copy over dim 1; padding goes to a scratch tensor
    sizes: list[int] = []
    split_outs: list[torch.Tensor] = []
    pos = 0
    for pe, d in zip(part.entries, dst_rows):
        if pe.offset > pos:
            sizes.append(pe.offset - pos)
            split_outs.append(gathered.new_empty(w, pe.offset - pos))
        sizes.append(pe.nbytes)
        split_outs.append(d)
        pos = pe.offset + pe.nbytes
    if gathered.shape[1] > pos:
        sizes.append(gathered.shape[1] - pos)
        split_outs.append(gathered.new_empty(w, gathered.shape[1] - pos))
    cat_pairs = [(list(s.unbind(0)), _bytes(v)) for s, v in zip(slices, views)]
    runs = {
        PIPEPACK: partial(reassemble, gathered, layout, out=out),
        "split_with_sizes_copy": partial(
            torch.split_with_sizes_copy, gathered, sizes, dim=1, out=split_outs
        ),
        "cat per tensor": partial(_cat_rows, cat_pairs),
        "copy_ loop": partial(_copy_pairs, dst_rows, slices),
    }
    return [
        Case("reassemble", method, run, partial(_check_outs, run, views, p.expected))
        for method, run in runs.items()
    ]


CASE_BUILDERS: dict[str, Callable[[Prepared], list[Case]]] = {
    "pack": pack_cases,
    "unpack_into": unpack_into_cases,
    "reassemble": reassemble_cases,
}


def prepare(payload: Payload, device: torch.device, world: int) -> Prepared:
    srcs = [_make(payload.kind, d, s, device, fill=True) for d, s in payload.specs]
    return Prepared(
        payload=payload,
        layout=plan_layout(srcs),
        srcs=srcs,
        expected=[_bytes(t).clone() for t in srcs],
        device=device,
        world=world,
    )


# ----------------------------------------------------------------------------- timing


@dataclass(frozen=True)
class Samples:
    times_us: tuple[float, ...]
    host_us: float  # Python's time per call, not synchronised


@dataclass(frozen=True)
class DeviceClock:
    """What the event timer needs from the device; ``fake_clock`` runs the same logic on CPU."""

    new_event: Callable[[], Any]
    synchronize: Callable[[], None]
    sleep: Callable[[float], None]  # keep the device busy for about this many seconds


def cuda_clock() -> DeviceClock:
    def sleep(seconds: float) -> None:
        torch.cuda._sleep(int(seconds * _SLEEP_CYCLES_PER_S))

    return DeviceClock(partial(torch.cuda.Event, enable_timing=True), torch.cuda.synchronize, sleep)


class _FakeEvent:
    def __init__(self) -> None:
        self.t = 0.0

    def record(self) -> None:
        self.t = time.perf_counter()

    def elapsed_time(self, end: _FakeEvent) -> float:
        return (end.t - self.t) * 1e3  # ms, like torch.cuda.Event


def fake_clock() -> DeviceClock:
    return DeviceClock(_FakeEvent, lambda: None, lambda seconds: None)


def time_cpu(
    fn: Callable[[], object], *, warmup: int, budget_s: float, min_reps: int, max_reps: int
) -> Samples:
    for _ in range(warmup):
        fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < max_reps and (
        len(times) < min_reps or time.perf_counter() - start < budget_s
    ):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e6)
    return Samples(tuple(times), statistics.median(times))  # on CPU host time is the time


def time_device(
    fn: Callable[[], object],
    *,
    clock: DeviceClock,
    warmup: int,
    reps: int,
    host_reps: int,
    budget_s: float,
) -> Samples:
    fn()
    clock.synchronize()
    t0 = time.perf_counter()
    for _ in range(warmup):
        fn()
    clock.synchronize()
    # a pathologically slow method gets fewer repeats, never fewer than a few
    per_call_s = (time.perf_counter() - t0) / max(warmup, 1)
    reps = max(5, min(reps, int(budget_s / max(per_call_s, 1e-9))))
    host_reps = max(3, min(host_reps, int(budget_s / 2 / max(per_call_s, 1e-9))))
    t0 = time.perf_counter()
    for _ in range(host_reps):
        fn()
    host_s = (time.perf_counter() - t0) / host_reps
    clock.synchronize()
    # small batches: the launch queue must hold a whole batch while the device spins
    batch = max(1, min(reps, _MAX_BATCH, int(_HOST_AHEAD_S / max(host_s, 1e-7))))
    times: list[float] = []
    while len(times) < reps:
        n = min(batch, reps - len(times))
        events = [(clock.new_event(), clock.new_event()) for _ in range(n)]
        clock.sleep(min(_MAX_SLEEP_S, 1.5 * host_s * n + 50e-6))
        for start, end in events:
            start.record()
            fn()
            end.record()
        clock.synchronize()
        times.extend(start.elapsed_time(end) * 1e3 for start, end in events)
    return Samples(tuple(times), host_s * 1e6)


def host_cost(
    fn: Callable[[], object], *, clock: DeviceClock | None, calls: int
) -> tuple[float, float | None]:
    """(host µs, stream µs) per call over ``calls`` back-to-back calls with no sync between.

    The stream time (events around the whole loop) is what the device timeline sees when
    nothing else is queued: the larger of the host and the device cost.
    """
    fn()
    if clock is None:
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        return (time.perf_counter() - t0) / calls * 1e6, None
    clock.synchronize()
    start, end = clock.new_event(), clock.new_event()
    start.record()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    host_us = (time.perf_counter() - t0) / calls * 1e6
    end.record()
    clock.synchronize()
    return host_us, start.elapsed_time(end) * 1e3 / calls


def _quantile(sorted_xs: Sequence[float], q: float) -> float:
    pos = q * (len(sorted_xs) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(sorted_xs) - 1)
    return sorted_xs[lo] + (sorted_xs[hi] - sorted_xs[lo]) * (pos - lo)


# ----------------------------------------------------------------------------- results


@dataclass(frozen=True)
class Result:
    op: str
    payload: str
    method: str
    bytes: int
    median_us: float
    p20_us: float
    p80_us: float
    gbps: float
    ratio_to_copy: float  # median / the floor's median; 1.0 is a plain copy
    host_us: float
    reps: int
    record: str = field(default="timing")


@dataclass(frozen=True)
class HostResult:
    op: str
    payload: str
    method: str
    bytes: int
    host_us: float
    stream_us: float | None
    device_us: float | None
    calls: int
    record: str = field(default="host")
    host_min_us: float | None = None  # the fastest of several rounds (--stub-launch)


@dataclass(frozen=True)
class Failure:
    op: str
    payload: str
    method: str
    error: str
    record: str = field(default="error")


def make_result(case: Case, payload: Payload, samples: Samples, floor_us: float | None) -> Result:
    xs = sorted(samples.times_us)
    median = _quantile(xs, 0.5)
    nbytes = payload.nbytes
    return Result(
        op=case.op,
        payload=payload.name,
        method=case.method,
        bytes=nbytes,
        median_us=median,
        p20_us=_quantile(xs, 0.2),
        p80_us=_quantile(xs, 0.8),
        gbps=nbytes / (median * 1e-6) / 1e9 if median > 0 else math.nan,
        ratio_to_copy=median / floor_us if floor_us else math.nan,
        host_us=samples.host_us,
        reps=len(xs),
    )


def _fmt(x: float | None, digits: int = 1) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if abs(x) >= 1000:
        return f"{x:,.0f}"
    return f"{x:.{digits}f}"


def _fmt_bytes(n: int) -> str:
    for unit, size in (("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


TABLE_HEADER = (
    "| op | payload | method | bytes | median µs | p20 µs | p80 µs | GB/s | × copy | host µs |\n"
    "|---|---|---|--:|--:|--:|--:|--:|--:|--:|"
)


def table_row(r: Result | Failure) -> str:
    if isinstance(r, Failure):
        return f"| {r.op} | {r.payload} | {r.method} | | {r.error[:60]} | | | | | |"
    return (
        f"| {r.op} | {r.payload} | {r.method} | {_fmt_bytes(r.bytes)} | {_fmt(r.median_us)} "
        f"| {_fmt(r.p20_us)} | {_fmt(r.p80_us)} | {_fmt(r.gbps)} | {_fmt(r.ratio_to_copy, 2)} "
        f"| {_fmt(r.host_us)} |"
    )


def host_table(rows: Sequence[HostResult]) -> str:
    lines = [
        "| payload | method | host µs/call | stream µs/call | device µs (median) |",
        "|---|---|--:|--:|--:|",
    ]
    lines += [
        f"| {h.payload} | {h.method} | {_fmt(h.host_us)} | {_fmt(h.stream_us)} "
        f"| {_fmt(h.device_us)} |"
        for h in rows
    ]
    return "\n".join(lines)


def summary_table(results: Sequence[Result], payload_list: Sequence[Payload]) -> str:
    """Per (op, payload): pipepack against the fastest alternative and against the copy floor.

    ``alt / pipepack`` above 1 means pipepack is faster; ``% of copy BW`` is the floor's time
    over pipepack's.
    """
    lines = [
        "| op | payload | pipepack µs | best alternative | alt µs | alt / pipepack "
        "| % of copy BW | host µs pipepack / alt |",
        "|---|---|--:|---|--:|--:|--:|--:|",
    ]
    by_key: dict[tuple[str, str], list[Result]] = {}
    for r in results:
        by_key.setdefault((r.op, r.payload), []).append(r)
    for op in CASE_BUILDERS:
        for p in payload_list:
            rs = by_key.get((op, p.name), [])
            if not rs:
                continue
            mine = next((r for r in rs if r.method == PIPEPACK), None)
            alts = [r for r in rs if not r.method.startswith(PIPEPACK)]
            best = min(alts, key=lambda r: r.median_us) if alts else None
            cells = [op, p.name, _fmt(mine.median_us) if mine else "FAILED"]
            cells += [best.method, _fmt(best.median_us)] if best else ["-", "-"]
            if mine and best:
                cells.append(_fmt(best.median_us / mine.median_us, 2))
            else:
                cells.append("-")
            if mine and mine.ratio_to_copy > 0:
                cells.append(f"{100.0 / mine.ratio_to_copy:.0f}%")
            else:
                cells.append("-")
            host_mine = _fmt(mine.host_us) if mine else "-"
            cells.append(f"{host_mine} / {_fmt(best.host_us) if best else '-'}")
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- meta / output


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu {platform.processor() or platform.machine()}"


def device_slug(device: torch.device) -> str:
    return re.sub(r"[^a-z0-9]+", "-", device_name(device).lower()).strip("-")


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=10,
        )
        return out.stdout.strip() or None
    except Exception:
        return None


def meta_record(device: torch.device, args: argparse.Namespace, impl: str) -> dict[str, Any]:
    try:
        import triton

        triton_version = triton.__version__
    except Exception:
        triton_version = None
    return {
        "record": "meta",
        "host": socket.gethostname(),
        "device": device_name(device),
        "device_slug": device_slug(device),
        "torch": torch.__version__,
        "triton": triton_version,
        "python": platform.python_version(),
        "cuda": torch.version.cuda,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join(["python", *sys.argv]),
        "git_commit": _git_commit(),
        "pipepack_impl": impl,
        "timer": args.timer,
        "world": args.world,
        "torch_threads": torch.get_num_threads(),
        "procs": args.procs,
        "quick": args.quick,
        "bytes_counted": "payload bytes once (not read + write)",
    }


def write_json(path: Path, meta: dict[str, Any], records: Sequence[Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with tmp.open("w") as f:
        json.dump([meta, *(asdict(r) for r in records)], f, indent=1)
        f.write("\n")
    os.replace(tmp, path)


def out_path(arg: str | None, device: torch.device) -> Path:
    name = f"kernels_{device_slug(device)}.json"
    if arg is None:
        return RESULTS_DIR / name
    path = Path(arg)
    return path / name if path.is_dir() else path


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


_SEEN_ERRORS: set[str] = set()


def _error(prefix: str, exc: BaseException) -> str:
    """The one-line error; the traceback goes to stderr once per distinct message."""
    msg = f"{prefix}{type(exc).__name__}: {exc}".splitlines()[0]
    if msg not in _SEEN_ERRORS:
        _SEEN_ERRORS.add(msg)
        traceback.print_exc()
    return msg


def run_payload(
    payload: Payload,
    *,
    device: torch.device,
    args: argparse.Namespace,
    ops: Sequence[str],
    timer: Callable[[Callable[[], object]], Samples],
    clock: DeviceClock | None,
    host_calls: int,
    results: list[Result],
    hosts: list[HostResult],
    failures: list[Failure],
) -> None:
    """Checks, then times, every case of one payload; appends to the three lists."""

    def fail(op: str, method: str, error: str) -> None:
        failures.append(Failure(op, payload.name, method, error))
        print(table_row(failures[-1]), flush=True)

    try:
        prepared = prepare(payload, device, args.world)
        cases = [floor_case(prepared)]
        for op in ops:
            cases += CASE_BUILDERS[op](prepared)
    except Exception as exc:
        fail("prepare", "-", _error("ERROR ", exc))
        return
    floor_us: float | None = None
    for case in cases:
        try:
            wrong = case.check()
        except Exception as exc:
            fail(case.op, case.method, _error("ERROR ", exc))
            continue
        if wrong is not None:
            fail(case.op, case.method, f"WRONG {wrong}")
            continue
        try:
            result = make_result(case, payload, timer(case.run), floor_us)
        except Exception as exc:
            fail(case.op, case.method, _error("ERROR while timing ", exc))
            continue
        if case.op == "copy":
            floor_us = result.median_us
            result = replace(result, ratio_to_copy=1.0)
        results.append(result)
        print(table_row(result), flush=True)
        if case.op == "pack" and payload.name in HOST_PAYLOADS:
            try:
                host_us, stream_us = host_cost(case.run, clock=clock, calls=host_calls)
            except Exception as exc:
                fail("pack.host", case.method, _error("ERROR ", exc))
                continue
            device_us = result.median_us if clock is not None else None
            hosts.append(
                HostResult(
                    "pack",
                    payload.name,
                    case.method,
                    payload.nbytes,
                    host_us,
                    stream_us,
                    device_us,
                    host_calls,
                )
            )


# ----------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer payloads and repeats")
    ap.add_argument("--device", choices=("cuda", "cpu"), default=None, help="default: cuda if any")
    ap.add_argument("--out", default=None, help="JSON path, or a directory for the default name")
    ap.add_argument(
        "--threads",
        default=None,
        help="torch intra-op threads: a number, or 'default' to leave torch's own setting "
        "(what a user who never sets OMP_NUM_THREADS gets). Default on CPU: 1, as OpenMP "
        "spin-waits on a shared 2-core box make multi-thread timings noise; untouched on CUDA",
    )
    ap.add_argument(
        "--stub-launch",
        action="store_true",
        help="host cost only, on CPU: pipepack's kernel path (impl='triton') with the kernel "
        "launch replaced by a no-op, so the records are the Python an op costs before the "
        "launcher (checks, plan lookup, arguments); outputs are not checked (nothing is copied)",
    )
    ap.add_argument(
        "--procs",
        type=int,
        default=1,
        help="run this many copies of the benchmark at once (the others' output is dropped), "
        "as two pipeline ranks share one host; the records come from this process",
    )
    ap.add_argument("--world", type=int, default=8, help="TP world size of the reassemble case")
    ap.add_argument("--payloads", default=None, help="comma-separated payload names (default all)")
    ap.add_argument("--ops", default=None, help="comma-separated: pack,unpack_into,reassemble")
    ap.add_argument(
        "--timer",
        choices=("auto", "cpu", "events", "fake-events"),
        default="auto",
        help="auto: events on CUDA, cpu otherwise; fake-events runs the event timer's logic "
        "on CPU (a check of the CUDA code path, not a measurement)",
    )
    return ap.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        log("--device cuda but no CUDA device")
        return 2
    if args.timer == "auto":
        args.timer = "events" if device.type == "cuda" else "cpu"
    if args.timer == "events" and device.type != "cuda":
        log("--timer events needs CUDA; use fake-events to run its logic on CPU")
        return 2
    impl = "triton" if device.type == "cuda" else "torch"
    if device.type == "cuda" and os.environ.get("TRITON_INTERPRET") == "1":
        log("warning: TRITON_INTERPRET=1 is set: the Triton path runs in the interpreter")

    if args.threads is None and device.type == "cpu":
        args.threads = "1"
    if args.threads not in (None, "default"):
        torch.set_num_threads(int(args.threads))
    peers = _start_peers(argv, args.procs)
    torch.manual_seed(0)
    if device.type == "cuda":
        torch.cuda.manual_seed(0)

    clock: DeviceClock | None
    if args.timer == "cpu":
        clock = None
        reps = (3, 10, 0.05) if args.quick else (3, 30, 0.1)  # min, max, budget s
        # no extra warm-up: the correctness run just before is one
        timer = partial(time_cpu, warmup=0, min_reps=reps[0], max_reps=reps[1], budget_s=reps[2])
        host_calls = 50 if args.quick else 200
    else:
        clock = cuda_clock() if args.timer == "events" else fake_clock()
        warmup, nreps, host_reps = (5, 30, 20) if args.quick else (20, 200, 100)
        if device.type == "cpu":  # fake events on CPU tensors: keep it short
            warmup, nreps, host_reps = (1, 5, 3) if args.quick else (1, 10, 5)
        timer = partial(
            time_device,
            clock=clock,
            warmup=warmup,
            reps=nreps,
            host_reps=host_reps,
            budget_s=0.5 if args.quick else 1.5,
        )
        host_calls = 2000 if device.type == "cuda" and not args.quick else 100

    if args.stub_launch:
        if device.type != "cpu":
            log("--stub-launch measures the host path on CPU tensors; drop --device cuda")
            return 2
        impl = "triton (launch stubbed)"
    payload_list = payloads(quick=args.quick, world=args.world)
    if args.payloads:
        wanted = args.payloads.split(",")
        known = {p.name: p for p in payloads(quick=False, world=args.world)}
        if set(wanted) - set(known):
            log(f"unknown payloads {sorted(set(wanted) - set(known))}; known: {list(known)}")
            return 2
        payload_list = [known[name] for name in wanted]
    ops = args.ops.split(",") if args.ops else list(CASE_BUILDERS)
    unknown = set(ops) - set(CASE_BUILDERS)
    if unknown:
        log(f"unknown ops {sorted(unknown)}; known: {list(CASE_BUILDERS)}")
        return 2

    path = out_path(args.out, device)
    meta = meta_record(device, args, impl)
    log(
        f"pipepack kernels benchmark on {meta['device']}: torch {meta['torch']}, "
        f"triton {meta['triton']}, cuda {meta['cuda']}, pipepack impl {impl}, "
        f"timer {args.timer}"
    )
    if args.stub_launch:
        meta["stub_launch"] = True
        return run_stubbed(payload_list, device, args, ops, path, meta)
    results: list[Result] = []
    failures: list[Failure] = []
    hosts: list[HostResult] = []
    t_start = time.perf_counter()
    print(
        f"## pipepack kernels: {meta['device']} (torch {meta['torch']}, triton {meta['triton']}, "
        f"cuda {meta['cuda']}, python {meta['python']}; pipepack impl {impl})\n"
    )
    print("| payload | what | bytes |\n|---|---|--:|")
    for p in payload_list:
        print(f"| {p.name} | {p.what} | {_fmt_bytes(p.nbytes)} |")
    print()
    print(TABLE_HEADER, flush=True)
    for payload in payload_list:
        t_payload = time.perf_counter()
        run_payload(
            payload,
            device=device,
            args=args,
            ops=ops,
            timer=timer,
            clock=clock,
            host_calls=host_calls,
            results=results,
            hosts=hosts,
            failures=failures,
        )
        write_json(path, meta, [*results, *hosts, *failures])
        log(f"  {payload.name}: {time.perf_counter() - t_payload:.1f} s")

    print("\n### Host cost per call: pack (Python call not synchronised; stream = events around")
    print("### the back-to-back loop; device = the event median above)\n")
    print(host_table(hosts))
    print("\n### Summary: pipepack against the fastest alternative and the copy floor\n")
    print(summary_table(results, payload_list))
    if failures:
        print(
            f"\n{len(failures)} FAILED: "
            + "; ".join(f"{f.op}/{f.payload}/{f.method}: {f.error[:80]}" for f in failures)
        )
    write_json(path, meta, [*results, *hosts, *failures])
    log(f"wrote {path} ({time.perf_counter() - t_start:.1f} s)")
    for peer in peers:
        peer.terminate()
        peer.wait()
    return 1 if failures else 0


STUB_PAYLOADS = ("hidden_bs1", "mixed16")
STUB_ROUNDS = 9


def stub_launches() -> int:
    """Replaces the copy kernel's launch with a no-op; returns how many launches it saw."""
    from pipepack.kernels import _copy

    seen = [0]

    class _Stub:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                seen[0] += 1

            return launch

    _copy._copy_segments_kernel = _Stub()
    return seen


def run_stubbed(
    payload_list: Sequence[Payload],
    device: torch.device,
    args: argparse.Namespace,
    ops: Sequence[str],
    path: Path,
    meta: dict[str, Any],
) -> int:
    """Host µs per call of pipepack's kernel path with the launch stubbed (see --stub-launch).

    Every call is one real plan lookup (or build) and one stubbed launch; a call that does not
    reach the launch is reported, since it would time something else."""
    global pack, unpack_into, reassemble, reassemble_into
    pack = partial(pack, impl="triton")
    unpack_into = partial(unpack_into, impl="triton")
    reassemble = partial(reassemble, impl="triton")
    reassemble_into = partial(reassemble_into, impl="triton")
    seen = stub_launches()
    wanted = [p for p in payload_list if args.payloads or p.name in STUB_PAYLOADS]
    calls = 200 if args.quick else 2000
    hosts: list[HostResult] = []
    failures: list[Failure] = []
    print(
        "| op | payload | method | host µs/call (median of rounds) | fastest round |\n"
        "|---|---|---|--:|--:|"
    )
    for payload in wanted:
        prepared = prepare(payload, device, args.world)
        for op in ops:
            for case in CASE_BUILDERS[op](prepared):
                if not case.method.startswith(PIPEPACK):
                    continue
                before = seen[0]
                case.run()
                if seen[0] != before + 1:
                    failures.append(Failure(op, payload.name, case.method, "no launch reached"))
                    continue
                # rounds: on a shared box one round can land on a busy core
                rounds = sorted(
                    host_cost(case.run, clock=None, calls=calls // STUB_ROUNDS)[0]
                    for _ in range(STUB_ROUNDS)
                )
                host_us = statistics.median(rounds)
                hosts.append(
                    HostResult(
                        op,
                        payload.name,
                        case.method,
                        payload.nbytes,
                        host_us,
                        None,
                        None,
                        calls,
                        host_min_us=rounds[0],
                    )
                )
                print(
                    f"| {op} | {payload.name} | {case.method} | {_fmt(host_us, 2)} "
                    f"| {_fmt(rounds[0], 2)} |",
                    flush=True,
                )
    write_json(path, meta, [*hosts, *failures])
    log(f"wrote {path}")
    return 1 if failures else 0


def _start_peers(argv: Sequence[str] | None, procs: int) -> list[subprocess.Popen]:
    """``procs - 1`` copies of this benchmark, started now, output dropped: the load another
    rank puts on the same host. They loop until this process is done with its own run."""
    if procs <= 1:
        return []
    argv = list(sys.argv[1:] if argv is None else argv)
    scratch = Path(os.environ.get("TMPDIR", "/tmp")) / f"bench_kernels_peer_{os.getpid()}"
    cmd = [
        sys.executable,
        "-c",
        "import runpy, sys\n"
        "args = sys.argv[1:]\n"
        "while True:\n"
        "    sys.argv = list(args)\n"
        "    try:\n"
        "        runpy.run_path(sys.argv[0], run_name='__main__')\n"
        "    except SystemExit:\n"
        "        pass\n",
        str(Path(__file__).resolve()),
        *argv,
        "--procs",
        "1",
        "--out",
        str(scratch),
    ]
    return [
        subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(procs - 1)
    ]


if __name__ == "__main__":
    sys.exit(main())
