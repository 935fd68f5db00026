"""One Triton kernel that copies many byte segments in a single launch.

Every public op (pack, unpack_into, reassemble) is a list of *segments*: copy ``n`` words from
one strided view to another. A segment side maps a logical word index ``i`` (plus a start
offset) to an address through up to four (size, stride) dims, outermost first. The launcher
writes all segments into one int64 table on the device and launches a 1-D grid over the real
blocks; the first ``grid`` entries of the table map each program to ``(segment, block)``.

Three copy modes:
- ``_VEC``: both sides contiguous and 16-byte aligned, length a multiple of 16 bytes: int32
  words with 16-byte alignment hints, so full blocks compile to ``ld/st.global.v4``.
- ``_STRIDED``: anything else, one word of 1/2/4/8 bytes per element, addresses from the dims.
- ``_TILED``: a (batched) transpose, one side contiguous along rows and the other along
  columns: a program loads a tile along the source's order and stores it along the
  destination's (the compiler moves it through shared memory), so both sides move 16-byte
  vectors; full tiles unmasked, partial ones masked.

Addresses in a row are offsets from one of the launch's *slots*: slot 0 is absolute, slot 1 is
``base_addr``, slots 2.. are ``p0``, ``p1``, ... Every slot base is 16-byte aligned, so word
and vector choices made on an offset hold for the address; what changes per call (the packed
buffer, the tensors' data pointers) goes as kernel arguments and the table is reused.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import triton
import triton.language as tl

_VEC = 0
_STRIDED = 1
_TILED = 2
_NDIM = 4
# Row: mode, word_log2, n_words, src_off, dst_off, src_start, dst_start,
#      src sizes[4], src strides[4], dst sizes[4], dst strides[4], slots (src | dst << 8).
# A tiled row reuses fields 5..13: R, C, B, SR, SB, DC, DB, tiles along C, tiles per batch.
_ROW = 24
# Pointer arguments the kernel takes (slots 2 .. 2 + N_PTR - 1); later tensors go absolute.
N_PTR = 16
SLOT_ABS = 0
SLOT_BASE = 1
SLOT_P0 = 2
# Block sizes and warps: read once at import; the environment overrides exist for tuning
# sweeps (bench/gpu_check.sh), the defaults are what the tests and benchmarks use.
# Chosen by the sweep on an H200 (bench/NOTES.md): 32 KiB per contiguous program reaches
# 97% of a device copy at 128 MiB (16 KiB: 86%); 512 strided words per program beat 1024 by
# 18% on a transposed source, and 2048+ spill registers (20x slower).
VEC_BLOCK = int(os.environ.get("PIPEPACK_VEC_BLOCK", 8192))  # int32 words per program: 32 KiB
STRIDED_BLOCK = int(os.environ.get("PIPEPACK_STRIDED_BLOCK", 512))  # words per program
TILE = int(os.environ.get("PIPEPACK_TILE", 64))  # tile side for 1/2/4-byte words (8: half)
NUM_WARPS = int(os.environ.get("PIPEPACK_NUM_WARPS", 4))
_INT32_MAX = 2**31 - 1

# compile-time constants of the kernel (globals, so the kernel's arguments are all integers
# and a compiled kernel can be launched directly, with the same argument list on every
# Triton version)
_C_ROW = tl.constexpr(_ROW)
_C_VEC_BLOCK = tl.constexpr(VEC_BLOCK)
_C_STRIDED_BLOCK = tl.constexpr(STRIDED_BLOCK)
_C_TILE = tl.constexpr(TILE)
_C_TILE8 = tl.constexpr(max(TILE // 2, 16))


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
def _copy_tiled(
    row_ptr,
    blk,
    src_addr,
    dst_addr,
    WORD: tl.constexpr,
    VEC: tl.constexpr,  # words per 16 bytes: every stride and base is a multiple of it
    TR: tl.constexpr,
    TC: tl.constexpr,
):
    # dst[b, c, r] = src[b, r, c]: src rows (stride SR) are contiguous along c, dst columns
    # (stride DC) contiguous along r
    R = tl.load(row_ptr + 5)
    C = tl.load(row_ptr + 6)
    SR = tl.multiple_of(tl.load(row_ptr + 8), VEC)
    SB = tl.multiple_of(tl.load(row_ptr + 9), VEC)
    DC = tl.multiple_of(tl.load(row_ptr + 10), VEC)
    DB = tl.multiple_of(tl.load(row_ptr + 11), VEC)
    tiles_c = tl.load(row_ptr + 12)
    tiles_b = tl.load(row_ptr + 13)
    b = blk // tiles_b
    rest = blk - b * tiles_b
    tr = rest // tiles_c
    tc = rest - tr * tiles_c
    rows = tr * TR + tl.arange(0, TR)
    cols = tc * TC + tl.arange(0, TC)
    src = tl.multiple_of(src_addr.to(tl.pointer_type(WORD)), 16) + b * SB
    dst = tl.multiple_of(dst_addr.to(tl.pointer_type(WORD)), 16) + b * DB
    src_offs = rows[:, None] * SR + cols[None, :]
    dst_offs = cols[None, :] * DC + rows[:, None]
    full = ((tr + 1) * TR <= R) & ((tc + 1) * TC <= C)
    if full:
        tl.store(dst + dst_offs, tl.load(src + src_offs))
    else:
        mask = (rows[:, None] < R) & (cols[None, :] < C)
        tl.store(dst + dst_offs, tl.load(src + src_offs, mask=mask), mask=mask)


@triton.jit
def _slot_addr(
    slot, base_addr, p0, p1, p2, p3, p4, p5, p6, p7, p8, p9, p10, p11, p12, p13, p14, p15
):
    a = tl.where(slot == 1, base_addr, 0)
    a = tl.where(slot == 2, p0, a)
    a = tl.where(slot == 3, p1, a)
    a = tl.where(slot == 4, p2, a)
    a = tl.where(slot == 5, p3, a)
    a = tl.where(slot == 6, p4, a)
    a = tl.where(slot == 7, p5, a)
    a = tl.where(slot == 8, p6, a)
    a = tl.where(slot == 9, p7, a)
    a = tl.where(slot == 10, p8, a)
    a = tl.where(slot == 11, p9, a)
    a = tl.where(slot == 12, p10, a)
    a = tl.where(slot == 13, p11, a)
    a = tl.where(slot == 14, p12, a)
    a = tl.where(slot == 15, p13, a)
    a = tl.where(slot == 16, p14, a)
    a = tl.where(slot == 17, p15, a)
    return a


_ARG_NAMES = ["table_addr", "base_addr"] + [f"p{i}" for i in range(N_PTR)]


@triton.jit(do_not_specialize=_ARG_NAMES)
def _copy_segments_kernel(
    table_addr,  # int64 address of [grid] (segment << 32 | block) codes, then [segments, ROW]
    base_addr,  # slot 1: the packed buffer of pack / unpack_into
    p0,
    p1,
    p2,
    p3,
    p4,
    p5,
    p6,
    p7,
    p8,
    p9,
    p10,
    p11,
    p12,
    p13,
    p14,
    p15,  # slots 2..17
):
    table_ptr = tl.multiple_of(table_addr.to(tl.pointer_type(tl.int64)), 16)
    pid = tl.program_id(0).to(tl.int64)
    code = tl.load(table_ptr + pid)
    seg = code >> 32
    blk = code & 0xFFFFFFFF
    row_ptr = table_ptr + tl.num_programs(0).to(tl.int64) + seg * _C_ROW

    mode = tl.load(row_ptr)
    n = tl.load(row_ptr + 2)
    slots = tl.load(row_ptr + 23)
    src_addr = tl.load(row_ptr + 3) + _slot_addr(
        slots & 0xFF,
        base_addr,
        p0,
        p1,
        p2,
        p3,
        p4,
        p5,
        p6,
        p7,
        p8,
        p9,
        p10,
        p11,
        p12,
        p13,
        p14,
        p15,
    )
    dst_addr = tl.load(row_ptr + 4) + _slot_addr(
        (slots >> 8) & 0xFF,
        base_addr,
        p0,
        p1,
        p2,
        p3,
        p4,
        p5,
        p6,
        p7,
        p8,
        p9,
        p10,
        p11,
        p12,
        p13,
        p14,
        p15,
    )
    word_log2 = tl.load(row_ptr + 1)
    if mode == 0:
        src = tl.multiple_of(src_addr.to(tl.pointer_type(tl.int32)), 16)
        dst = tl.multiple_of(dst_addr.to(tl.pointer_type(tl.int32)), 16)
        n = tl.multiple_of(n, 4)
        offs = blk * _C_VEC_BLOCK + tl.arange(0, _C_VEC_BLOCK)
        if (blk + 1) * _C_VEC_BLOCK <= n:
            tl.store(dst + offs, tl.load(src + offs))
        else:
            mask = offs < n
            tl.store(dst + offs, tl.load(src + offs, mask=mask), mask=mask)
    elif mode == 1:
        if word_log2 == 0:
            _copy_strided(row_ptr, blk, n, src_addr, dst_addr, tl.int8, _C_STRIDED_BLOCK)
        elif word_log2 == 1:
            _copy_strided(row_ptr, blk, n, src_addr, dst_addr, tl.int16, _C_STRIDED_BLOCK)
        elif word_log2 == 2:
            _copy_strided(row_ptr, blk, n, src_addr, dst_addr, tl.int32, _C_STRIDED_BLOCK)
        else:
            _copy_strided(row_ptr, blk, n, src_addr, dst_addr, tl.int64, _C_STRIDED_BLOCK)
    else:
        if word_log2 == 0:
            _copy_tiled(row_ptr, blk, src_addr, dst_addr, tl.int8, 16, _C_TILE, _C_TILE)
        elif word_log2 == 1:
            _copy_tiled(row_ptr, blk, src_addr, dst_addr, tl.int16, 8, _C_TILE, _C_TILE)
        elif word_log2 == 2:
            _copy_tiled(row_ptr, blk, src_addr, dst_addr, tl.int32, 4, _C_TILE, _C_TILE)
        else:
            _copy_tiled(row_ptr, blk, src_addr, dst_addr, tl.int64, 2, _C_TILE8, _C_TILE8)


# ----------------------------------------------------------------------------- host side

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


@dataclass(frozen=True)
class View:
    """One side of a copy: logical element ``i`` lives at
    ``slot base + ptr + offset(i + start) * elem_size``.

    ``sizes``/``strides`` are in elements, outermost first, like ``Tensor.stride()``. ``slot``
    says which launch argument ``ptr`` is relative to (``SLOT_ABS``: none, ``ptr`` is the
    address); every slot base is 16-byte aligned, so alignment choices made on ``ptr`` hold
    for the address.
    """

    ptr: int
    sizes: tuple[int, ...]
    strides: tuple[int, ...]
    start: int = 0
    slot: int = SLOT_ABS

    @staticmethod
    def of(t: torch.Tensor, slot: int = SLOT_ABS) -> View:
        """``t``'s view; relative to a slot, its pointer is the address's offset from the
        16-byte aligned base the launch passes (``aligned_base``)."""
        ptr = t.data_ptr()
        return View(ptr & 15 if slot else ptr, tuple(t.shape), tuple(t.stride()), 0, slot)

    @staticmethod
    def flat(ptr: int, start: int = 0, *, slot: int = SLOT_ABS) -> View:
        """A contiguous run of elements starting at ``ptr``."""
        return View(ptr, (1 << 62,), (1,), start, slot)


def aligned_base(ptr: int) -> int:
    """The slot base a launch passes for a tensor at ``ptr`` (see ``View.of``)."""
    return ptr & ~15


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
    if rows is not None:
        slots = src.slot | dst.slot << 8
        for r in rows:
            r[23] = slots
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


def _tile_sides(word_bytes: int) -> tuple[int, int]:
    side = TILE if word_bytes < 8 else max(TILE // 2, 16)
    return side, side


def tile_row(
    src: View,
    dst: View,
    shape: Sequence[int],
    src_strides: Sequence[int],
    dst_strides: Sequence[int],
    esize: int,
) -> list[int] | None:
    """One tiled row copying a whole tensor of ``shape`` from ``src`` laid out with
    ``src_strides`` to ``dst`` laid out with ``dst_strides`` (elements), or None when the tiled
    path does not apply.

    It applies to a (batched) transpose: after merging what both sides can merge, at most
    three dims remain, and of the last two one side is contiguous along one and the other
    side along the other. Every base address, row stride and batch stride must be a multiple
    of 16 bytes (the tiles move 16-byte vectors), and the tensor must span at least one tile
    in both tiled dims (smaller transposes are the strided path's).
    """
    if esize not in (1, 2, 4, 8) or src.start or dst.start:
        return None
    dims = [(z, s, d) for z, s, d in zip(shape, src_strides, dst_strides) if z != 1]
    merged: list[list[int]] = []
    for z, s, d in dims:
        if merged and merged[-1][1] == z * s and merged[-1][2] == z * d:
            merged[-1][0] *= z
            merged[-1][1], merged[-1][2] = s, d
        else:
            merged.append([z, s, d])
    if len(merged) not in (2, 3):
        return None
    batch = merged[0] if len(merged) == 3 else [1, 0, 0]
    (z0, s0, d0), (z1, s1, d1) = merged[-2], merged[-1]
    if s1 == 1 and d0 == 1:  # source rows along dim -2, destination columns along it
        r, c, sr, dc = z0, z1, s0, d1
    elif s0 == 1 and d1 == 1:  # the other orientation: swap the roles of the two dims
        r, c, sr, dc = z1, z0, s1, d0
    else:
        return None
    b, sb, db = batch
    tr, tc = _tile_sides(esize)
    if r < tr or c < tc:
        return None
    vec = 16 // esize
    if (src.ptr | dst.ptr) % 16 or sr % vec or dc % vec or sb % vec or db % vec:
        return None
    tiles_c = -(-c // tc)
    tiles_b = -(-r // tr) * tiles_c
    blocks = b * tiles_b
    if blocks > _INT32_MAX or max(r * sr, c * dc) + max(sb, db) * b > 1 << 62:
        return None
    row = [0] * _ROW
    row[0:5] = [_TILED, esize.bit_length() - 1, blocks, src.ptr, dst.ptr]
    row[5:14] = [r, c, b, sr, sb, dc, db, tiles_c, tiles_b]
    row[23] = src.slot | dst.slot << 8
    return row


def contiguous_strides(shape: Sequence[int]) -> tuple[int, ...]:
    strides = []
    step = 1
    for size in reversed(shape):
        strides.append(step)
        step *= max(size, 1)
    return tuple(reversed(strides))


def _blocks(row: list[int]) -> int:
    if row[0] == _TILED:
        return row[2]
    block = VEC_BLOCK if row[0] == _VEC else STRIDED_BLOCK
    return -(-row[2] // block)


# ----------------------------------------------------------------------------- launching


def _launch_hooks_set() -> bool:
    """Whether a Triton launch hook (a profiler such as proton) wants to see every launch."""
    knobs = getattr(triton, "knobs", None)
    runtime = getattr(knobs, "runtime", None)
    if runtime is not None:
        return bool(
            getattr(runtime, "launch_enter_hook", None)
            or getattr(runtime, "launch_exit_hook", None)
        )
    ck = getattr(getattr(triton, "compiler", None), "CompiledKernel", None)
    return bool(getattr(ck, "launch_enter_hook", None) or getattr(ck, "launch_exit_hook", None))


class _Direct:
    """The compiled kernel of one device, launched without Triton's JIT dispatch.

    The JIT's first launch on a device compiles (or loads) the kernel and returns it; after
    that every launch calls its launcher with the same arguments the JIT would pass (all the
    kernel's arguments are integers, none constexpr, no specialisation), skipping the binder,
    the cache key and the knobs.
    """

    def __init__(self, compiled) -> None:
        self.run = compiled.run
        self.function = compiled.function
        self.metadata = compiled.packed_metadata

    def __call__(self, grid: int, stream: int, args: Sequence[int]) -> None:
        self.run(grid, 1, 1, stream, self.function, self.metadata, None, None, None, *args)


_DIRECT: dict[int, _Direct] = {}
_DIRECT_LOCK = threading.Lock()


def _jit_launch(grid: int, args: Sequence[int]):
    return _copy_segments_kernel[(grid,)](*args, num_warps=NUM_WARPS)


# The Triton interpreter swaps triton.language's functions while it runs a kernel: two
# interpreted launches at once (two threads) corrupt each other, so they take turns.
_INTERPRETER_LOCK = threading.Lock()


def launch(grid: int, args: Sequence[int], device: torch.device) -> None:
    """One launch of the copy kernel on ``device``'s current stream (the JIT on CPU)."""
    if device.type != "cuda":
        with _INTERPRETER_LOCK:
            _jit_launch(grid, args)
        return
    index = device.index if device.index is not None else torch._C._cuda_getDevice()
    if torch._C._cuda_getDevice() != index:
        with torch.cuda.device(index):
            launch(grid, args, torch.device("cuda", index))
        return
    direct = _DIRECT.get(index)
    if direct is None:
        compiled = _jit_launch(grid, args)
        if compiled is not None and not _launch_hooks_set():
            with _DIRECT_LOCK:
                _DIRECT.setdefault(index, _Direct(compiled))
        return
    direct(grid, torch._C._cuda_getCurrentRawStream(index), args)


def _capturing() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


@dataclass(eq=False)
class Plan:
    """A segment table ready to launch: build once, launch many times.

    ``args`` of a launch are the slot bases (``base_addr``, then ``p0``..): what changes per
    call. On CUDA the table must outlive every launch that reads it, on any stream: a plan
    remembers the streams it was launched on, and when the cache drops it, it is retired with
    an event on each and freed once they completed. A plan launched while a CUDA graph was
    being captured is read by every replay, so it is never freed.
    """

    table: torch.Tensor | None
    grid: int
    device: torch.device
    # Rare fallbacks for views of more than four non-mergeable dims: sources gathered with
    # torch first (kept alive here until the launch), destinations staged and copied after.
    keep: tuple[torch.Tensor, ...] = ()
    after: tuple[tuple[torch.Tensor, torch.Tensor], ...] = ()
    host: torch.Tensor | None = None  # the pinned staging copy of the table
    meta: object = None  # what the op needs on a hit (the layout of pack without one)
    streams: set = field(default_factory=set)
    captured: bool = False
    table_addr: int = 0
    ready: object = None  # CUDA event after the table's upload
    ready_stream: int = 0  # the stream the upload was enqueued on

    def launch(self, slots: Sequence[int] = ()) -> None:
        """Launches with ``slots`` = (base_addr, p0, p1, ...) (missing ones are 0)."""
        if self.grid:
            args = [self.table_addr, *slots]
            args += [0] * (len(_ARG_NAMES) - len(args))
            if self.device.type == "cuda":
                stream = torch._C._cuda_getCurrentRawStream(self.device.index)
                if stream not in self.streams:
                    self._first_launch_on(stream)
                if torch._C._cuda_isCurrentStreamCapturing():
                    self.captured = True
            launch(self.grid, args, self.device)
        for dst, staged in self.after:
            dst.copy_(staged)

    def _first_launch_on(self, stream: int) -> None:
        """A stream this plan was not launched on yet waits for the table's upload (enqueued
        on the stream that built it)."""
        if self.ready is not None and stream != self.ready_stream:
            torch.cuda.ExternalStream(stream, device=self.device).wait_event(self.ready)
        self.streams.add(stream)

    def retire(self) -> list:
        """Events after every launch of this plan so far (an empty list: nothing pending)."""
        if self.table is None or self.device.type != "cuda" or not self.streams:
            return []
        events = []
        for raw in self.streams:
            stream = torch.cuda.ExternalStream(raw, device=self.device)
            ev = torch.cuda.Event()
            ev.record(stream)
            events.append(ev)
        return events


def build_plan(
    rows: Sequence[list[int]], device: torch.device, *, keep=(), after=(), meta=None
) -> Plan:
    """Writes the block map and the rows into one int64 table on ``device``: built in pinned
    host memory when CUDA is present, one asynchronous copy to the device."""
    if not rows:
        return Plan(None, 0, device, tuple(keep), tuple(after), meta=meta)
    codes: list[int] = []
    for seg, row in enumerate(rows):
        nb = _blocks(row)
        base = seg << 32
        codes.extend(range(base, base + nb))
    grid = len(codes)
    flat = codes
    for row in rows:
        flat.extend(row)
    host = ready = None
    ready_stream = 0
    if device.type == "cuda":
        host = torch.empty(len(flat), dtype=torch.int64, pin_memory=True)
        host.numpy()[:] = flat
        table = torch.empty(len(flat), dtype=torch.int64, device=device)
        with torch.cuda.device(device):
            table.copy_(host, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record()
            ready_stream = torch._C._cuda_getCurrentRawStream(table.device.index)
    else:
        table = torch.tensor(flat, dtype=torch.int64)
    return Plan(
        table,
        grid,
        device,
        tuple(keep),
        tuple(after),
        host=host,
        meta=meta,
        table_addr=table.data_ptr(),
        ready=ready,
        ready_stream=ready_stream,
    )


class PlanCache:
    """A small, thread-safe LRU of plans keyed by everything that decides the table.

    A repeat call with tensors of the same dtypes, shapes, strides and address alignment hits
    it, whatever their addresses (those go as launch arguments), so its host cost is one key,
    one dict lookup and the launch. A dropped plan's table is freed only once every launch that
    reads it has run (``Plan.retire``).
    """

    def __init__(self, capacity: int = 256) -> None:
        self.capacity = capacity
        self._plans: OrderedDict[tuple, Plan] = OrderedDict()
        self._retired: list[tuple[Plan, list]] = []
        self._held: list[Plan] = []  # captured by a CUDA graph: alive for good
        self.lock = threading.RLock()

    def get(self, key: tuple) -> Plan | None:
        with self.lock:
            plan = self._plans.get(key)
            if plan is not None:
                self._plans.move_to_end(key)
            return plan

    def put(self, key: tuple, plan: Plan) -> Plan:
        """Caches ``plan`` and returns the plan to launch: the one already cached under
        ``key`` when another thread got there first (``plan`` was never launched then)."""
        with self.lock:
            have = self._plans.get(key)
            if have is not None:
                self._plans.move_to_end(key)
                return have
            self._plans[key] = plan
            while len(self._plans) > self.capacity:
                self._drop(self._plans.popitem(last=False)[1])
            self._sweep()
            return plan

    def clear(self) -> None:
        with self.lock:
            while self._plans:
                self._drop(self._plans.popitem(last=False)[1])
            self._sweep()

    def __len__(self) -> int:
        return len(self._plans)

    @property
    def pending(self) -> int:
        """Dropped plans whose tables still wait for their launches to complete."""
        return len(self._retired)

    def _drop(self, plan: Plan) -> None:
        if plan.captured or (plan.streams and _capturing()):
            self._held.append(plan)
            return
        events = plan.retire()
        if events:
            self._retired.append((plan, events))

    def _sweep(self) -> None:
        self._retired = [(p, evs) for p, evs in self._retired if not all(e.query() for e in evs)]
