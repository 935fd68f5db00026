"""One Triton kernel that copies many byte segments in a single launch.

Every public op (pack, unpack_into, reassemble) is a list of *segments*: copy ``n`` words from
one strided view to another. A segment side maps a logical word index ``i`` (plus a start
offset) to an address through up to four (size, stride) dims, outermost first. The launcher
writes all segments into one int64 table on the device and launches a 1-D grid over the real
blocks; the first ``grid`` entries of the table map each program to ``(segment, block)``.

Two copy modes:
- ``_VEC``: both sides contiguous and 16-byte aligned, length a multiple of 16 bytes: int32
  words with 16-byte alignment hints, so full blocks compile to ``ld/st.global.v4``.
- ``_STRIDED``: anything else, one word of 1/2/4/8 bytes per element, addresses from the dims.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

_VEC = 0
_STRIDED = 1
_NDIM = 4
# Row: mode, word_log2, n_words, src_ptr, dst_ptr, src_start, dst_start,
#      src sizes[4], src strides[4], dst sizes[4], dst strides[4], relative flags.
_ROW = 24
# Block sizes and warps: read once at import; the environment overrides exist for tuning
# sweeps (bench/gpu_check.sh), the defaults are what the tests and benchmarks use.
# Chosen by the sweep on an H200 (bench/NOTES.md): 32 KiB per contiguous program reaches
# 97% of a device copy at 128 MiB (16 KiB: 86%); 512 strided words per program beat 1024 by
# 18% on a transposed source, and 2048+ spill registers (20x slower).
VEC_BLOCK = int(os.environ.get("PIPEPACK_VEC_BLOCK", 8192))  # int32 words per program: 32 KiB
STRIDED_BLOCK = int(os.environ.get("PIPEPACK_STRIDED_BLOCK", 512))  # words per program
NUM_WARPS = int(os.environ.get("PIPEPACK_NUM_WARPS", 4))
_INT32_MAX = 2**31 - 1


@triton.jit
def _copy_strided(
    row_ptr,
    blk,
    n,
    src_addr,
    dst_addr,
    WORD: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # logical word indices of this block; both sides decompose them with their own dims
    i = blk * BLOCK + tl.arange(0, BLOCK)
    mask = i < n
    si = (i + tl.load(row_ptr + 5)).to(tl.int32)
    di = (i + tl.load(row_ptr + 6)).to(tl.int32)

    s1 = tl.load(row_ptr + 8).to(tl.int32)
    s2 = tl.load(row_ptr + 9).to(tl.int32)
    s3 = tl.load(row_ptr + 10).to(tl.int32)
    c3 = si % s3
    t = si // s3
    c2 = t % s2
    t = t // s2
    c1 = t % s1
    c0 = t // s1
    src_off = (
        c0.to(tl.int64) * tl.load(row_ptr + 11)
        + c1.to(tl.int64) * tl.load(row_ptr + 12)
        + c2.to(tl.int64) * tl.load(row_ptr + 13)
        + c3.to(tl.int64) * tl.load(row_ptr + 14)
    )

    d1 = tl.load(row_ptr + 16).to(tl.int32)
    d2 = tl.load(row_ptr + 17).to(tl.int32)
    d3 = tl.load(row_ptr + 18).to(tl.int32)
    e3 = di % d3
    t = di // d3
    e2 = t % d2
    t = t // d2
    e1 = t % d1
    e0 = t // d1
    dst_off = (
        e0.to(tl.int64) * tl.load(row_ptr + 19)
        + e1.to(tl.int64) * tl.load(row_ptr + 20)
        + e2.to(tl.int64) * tl.load(row_ptr + 21)
        + e3.to(tl.int64) * tl.load(row_ptr + 22)
    )

    src = src_addr.to(tl.pointer_type(WORD))
    dst = dst_addr.to(tl.pointer_type(WORD))
    v = tl.load(src + src_off, mask=mask)
    tl.store(dst + dst_off, v, mask=mask)


@triton.jit
def _copy_segments_kernel(
    table_ptr,  # int64: [grid] (segment << 32 | block) codes, then [segments, ROW] rows
    base_addr,  # int64 address that rows flagged relative add to their pointers
    ROW: tl.constexpr,
    VEC_BLOCK: tl.constexpr,
    STRIDED_BLOCK: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    code = tl.load(table_ptr + pid)
    seg = code >> 32
    blk = code & 0xFFFFFFFF
    row_ptr = table_ptr + tl.num_programs(0).to(tl.int64) + seg * ROW

    mode = tl.load(row_ptr)
    n = tl.load(row_ptr + 2)
    rel = tl.load(row_ptr + 23)  # bit 0: src relative to base_addr, bit 1: dst relative
    src_addr = tl.load(row_ptr + 3) + (rel & 1) * base_addr
    dst_addr = tl.load(row_ptr + 4) + ((rel >> 1) & 1) * base_addr
    if mode == 0:
        src = tl.multiple_of(src_addr.to(tl.pointer_type(tl.int32)), 16)
        dst = tl.multiple_of(dst_addr.to(tl.pointer_type(tl.int32)), 16)
        n = tl.multiple_of(n, 4)
        offs = blk * VEC_BLOCK + tl.arange(0, VEC_BLOCK)
        if (blk + 1) * VEC_BLOCK <= n:
            tl.store(dst + offs, tl.load(src + offs))
        else:
            mask = offs < n
            tl.store(dst + offs, tl.load(src + offs, mask=mask), mask=mask)
    else:
        word_log2 = tl.load(row_ptr + 1)
        if word_log2 == 0:
            _copy_strided(row_ptr, blk, n, src_addr, dst_addr, tl.int8, STRIDED_BLOCK)
        elif word_log2 == 1:
            _copy_strided(row_ptr, blk, n, src_addr, dst_addr, tl.int16, STRIDED_BLOCK)
        elif word_log2 == 2:
            _copy_strided(row_ptr, blk, n, src_addr, dst_addr, tl.int32, STRIDED_BLOCK)
        else:
            _copy_strided(row_ptr, blk, n, src_addr, dst_addr, tl.int64, STRIDED_BLOCK)


# ----------------------------------------------------------------------------- host side

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


@dataclass(frozen=True)
class View:
    """One side of a copy: logical element ``i`` lives at ``ptr + offset(i + start) * elem_size``.

    ``sizes``/``strides`` are in elements, outermost first, like ``Tensor.stride()``.
    """

    ptr: int
    sizes: tuple[int, ...]
    strides: tuple[int, ...]
    start: int = 0
    # ``ptr`` is an offset from the launch's base address (a buffer that may move between
    # calls, so the table can be reused); the base is 16-byte aligned, so alignment choices
    # made on the offset hold for the address
    relative: bool = False

    @staticmethod
    def of(t: torch.Tensor) -> View:
        return View(t.data_ptr(), tuple(t.shape), tuple(t.stride()))

    @staticmethod
    def flat(ptr: int, start: int = 0, *, relative: bool = False) -> View:
        """A contiguous run of elements starting at ``ptr``."""
        return View(ptr, (1 << 62,), (1,), start, relative)


def _byte_dims(v: View, esize: int) -> tuple[list[int], list[int]]:
    """The view's dims in bytes (an inner dim for the element's bytes), coalesced."""
    sizes = list(v.sizes) + [esize]
    strides = [s * esize for s in v.strides] + [1]
    out_sizes: list[int] = []
    out_strides: list[int] = []
    for size, stride in zip(sizes, strides):
        if size == 1:
            continue
        if out_sizes and out_strides[-1] == size * stride:
            out_sizes[-1] *= size
            out_strides[-1] = stride
        else:
            out_sizes.append(size)
            out_strides.append(stride)
    if not out_sizes:
        return [1], [1]
    return out_sizes, out_strides


def _word_ok(
    ptr: int, start: int, nbytes: int, sizes: list[int], strides: list[int], w: int
) -> bool:
    """Whether ``w``-byte words can carry bytes ``[start, start + nbytes)`` of one side.

    Each word must be whole: the piece's own start and length are multiples of ``w`` (not
    just the view's: a reassembly piece starts and ends mid-row), the innermost byte dim is
    contiguous and a multiple of ``w`` long (no word straddles two rows), and the address and
    every outer stride are multiples of ``w`` (every word is aligned).
    """
    if ptr % w or start % w or nbytes % w:
        return False
    if w == 1:
        return True
    if strides[-1] != 1 or sizes[-1] % w:
        return False
    return all(s % w == 0 for s in strides[:-1])


def segment_rows(src: View, dst: View, n: int, esize: int) -> list[list[int]] | None:
    """Table rows copying logical elements ``[0, n)`` from ``src`` to ``dst``.

    Returns None when a side needs more than four dims or the strided index would not fit in
    int32; the caller then copies that tensor contiguously first.
    """
    if n == 0:
        return []
    rows = _segment_rows(src, dst, n, esize)
    if rows is not None and (src.relative or dst.relative):
        for r in rows:
            r[23] = int(src.relative) | int(dst.relative) << 1
    return rows


def _segment_rows(src: View, dst: View, n: int, esize: int) -> list[list[int]] | None:
    nbytes = n * esize
    s_sizes, s_strides = _byte_dims(src, esize)
    d_sizes, d_strides = _byte_dims(dst, esize)
    s_start, d_start = src.start * esize, dst.start * esize
    s_contig = len(s_sizes) == 1 and s_strides[0] == 1
    d_contig = len(d_sizes) == 1 and d_strides[0] == 1

    if s_contig and d_contig:
        sp, dp = src.ptr + s_start, dst.ptr + d_start
        rows = []
        body = 0
        if sp % 16 == 0 and dp % 16 == 0:
            body = nbytes // 16 * 16
            if body:
                rows.append(_row(_VEC, 2, body // 4, sp, dp, 0, 0, [1], [1], [1], [1]))
        tail = nbytes - body
        if tail:
            sp, dp = sp + body, dp + body
            w = 8
            while (sp | dp | tail) % w:
                w //= 2
            nw = tail // w
            if nw > _INT32_MAX:
                return None
            rows.append(_row(_STRIDED, w.bit_length() - 1, nw, sp, dp, 0, 0, [nw], [1], [nw], [1]))
        return rows

    w = 8
    while not (
        _word_ok(src.ptr, s_start, nbytes, s_sizes, s_strides, w)
        and _word_ok(dst.ptr, d_start, nbytes, d_sizes, d_strides, w)
    ):
        w //= 2
    s_sizes, s_strides = _to_words(s_sizes, s_strides, w)
    d_sizes, d_strides = _to_words(d_sizes, d_strides, w)
    n_words = nbytes // w
    if len(s_sizes) > _NDIM or len(d_sizes) > _NDIM:
        return None
    if max(s_start, d_start) // w + n_words > _INT32_MAX:
        return None
    return [
        _row(
            _STRIDED,
            w.bit_length() - 1,
            n_words,
            src.ptr,
            dst.ptr,
            s_start // w,
            d_start // w,
            s_sizes,
            s_strides,
            d_sizes,
            d_strides,
        )
    ]


def _to_words(sizes: list[int], strides: list[int], w: int) -> tuple[list[int], list[int]]:
    if w > 1:
        sizes = sizes[:-1] + [sizes[-1] // w]
        strides = [s // w for s in strides[:-1]] + [1]
    kept = [(z, s) for z, s in zip(sizes, strides) if z != 1] or [(1, 1)]
    return [z for z, _ in kept], [s for _, s in kept]


def _row(
    mode, word_log2, n_words, sp, dp, s_start, d_start, s_sizes, s_strides, d_sizes, d_strides
) -> list[int]:
    pad = _NDIM - len(s_sizes)
    s_sizes = [1] * pad + list(s_sizes)
    s_strides = [0] * pad + list(s_strides)
    pad = _NDIM - len(d_sizes)
    d_sizes = [1] * pad + [min(x, _INT32_MAX) for x in d_sizes]
    d_strides = [0] * pad + list(d_strides)
    s_sizes = [min(x, _INT32_MAX) for x in s_sizes]
    return [
        mode,
        word_log2,
        n_words,
        sp,
        dp,
        s_start,
        d_start,
        *s_sizes,
        *s_strides,
        *d_sizes,
        *d_strides,
        0,
    ]


def _blocks(row: list[int]) -> int:
    block = VEC_BLOCK if row[0] == _VEC else STRIDED_BLOCK
    return -(-row[2] // block)


@dataclass
class Plan:
    """A segment table ready to launch: build once, launch many times (static buffers)."""

    table: torch.Tensor | None
    grid: int
    # Rare fallbacks for views of more than four non-mergeable dims: sources gathered with
    # torch first (kept alive here until the launch), destinations staged and copied after.
    keep: tuple[torch.Tensor, ...] = ()
    after: tuple[tuple[torch.Tensor, torch.Tensor], ...] = ()

    def launch(self, base_addr: int = 0) -> None:
        if self.grid:
            _copy_segments_kernel[(self.grid,)](
                self.table,
                base_addr,
                ROW=_ROW,
                VEC_BLOCK=VEC_BLOCK,
                STRIDED_BLOCK=STRIDED_BLOCK,
                num_warps=NUM_WARPS,
            )
        for dst, staged in self.after:
            dst.copy_(staged)


def build_plan(rows: Sequence[list[int]], device: torch.device, *, keep=(), after=()) -> Plan:
    """Writes the block map and the rows into one int64 table on ``device`` (one H2D copy)."""
    if not rows:
        return Plan(None, 0, tuple(keep), tuple(after))
    codes: list[int] = []
    for seg, row in enumerate(rows):
        nb = _blocks(row)
        base = seg << 32
        codes.extend(range(base, base + nb))
    grid = len(codes)
    flat = codes
    for row in rows:
        flat.extend(row)
    table = torch.tensor(flat, dtype=torch.int64)
    if device.type != "cpu":
        table = table.to(device, non_blocking=True)
    return Plan(table, grid, tuple(keep), tuple(after))


class PlanCache:
    """A small LRU of plans keyed by everything that decides the table (layout, pointers, strides).

    Static destinations (CUDA-graph inputs) and reused buffers hit it every step, so their host
    cost is a dict lookup plus the launch.
    """

    def __init__(self, capacity: int = 256) -> None:
        self.capacity = capacity
        self._plans: OrderedDict[tuple, Plan] = OrderedDict()

    def get(self, key: tuple) -> Plan | None:
        plan = self._plans.get(key)
        if plan is not None:
            self._plans.move_to_end(key)
        return plan

    def put(self, key: tuple, plan: Plan) -> None:
        self._plans[key] = plan
        if len(self._plans) > self.capacity:
            self._plans.popitem(last=False)

    def clear(self) -> None:
        self._plans.clear()
