"""Triton kernels of the fused wire ops (see ``fused.py`` for the contract and the references).

Two kernels:

- ``_recv_norm_kernel``: reads ``hidden`` (and ``residual``) rows straight from the packed
  buffer (bf16 / fp16 / fp32, or fp8 e4m3fn codes with one fp32 scale per row), adds them, and
  writes the new residual and, with ``NORM``, the RMS-normalised, weighted output. One program
  handles ``ROWS`` rows at a time and strides over row blocks, so the grid may be smaller than
  the row count (the interpreter runs use that; a GPU launch has one program per row block).
- ``_pack_wire_kernel``: one launch that fills a whole wire buffer from a table of segments:
  plain copies, the residual fold (``hidden + residual`` rounded to the model dtype) and the
  fp8 row quantisation (optionally of the folded sum).

Every floating-point step is spelled out so that the pure-torch references produce the same
bits: IEEE division and square root (``div_rn`` / ``sqrt_rn``, not the approximate defaults),
the sum of squares as an explicit pairwise tree over the row zero-padded to ``BLOCK`` (level by
level ``s[2i] + s[2i+1]``), launches with ``enable_fp_fusion=False`` (no multiply-add
contraction), and the fp8 e4m3fn encoding and decoding done on integer bits (round to nearest
even), which needs no hardware fp8 support (sm_80 has none).
"""

from __future__ import annotations

import triton
import triton.language as tl

# dtype codes shared with the host side
DT_BF16 = 0
DT_FP16 = 1
DT_FP32 = 2

# wire-kernel segment modes
MODE_VEC = 0  # contiguous copy, 16-byte aligned body: int32 words
MODE_BYTES = 1  # contiguous copy, any alignment: bytes
MODE_FOLD = 2  # dst[t, :] = round(a[t, :] + b[t, :]) for a [T, H] pair
MODE_QUANT = 3  # dst[t, :] = e4m3(x[t, :] / s[t]), s[t] = amax / 448 (x = a or round(a + b))

# table row: mode, dtype code, n (words / bytes / rows), a addr, dst offset, b addr, H,
#            a row stride, b row stride, a col stride, b col stride, scale dst offset, flags
ROW = 13
FLAG_FOLD = 1  # QUANT: add b first
FLAG_CONTIG = 2  # FOLD / QUANT: both sources are contiguous rows (stride H, 1)

FP8_MAX = 448.0


# ----------------------------------------------------------------------------- helpers


@triton.jit
def _tree_sum(s, ROWS: tl.constexpr, BLOCK: tl.constexpr, LOG2: tl.constexpr):
    """Row sums of an fp32 [ROWS, BLOCK] tile as a pairwise tree: s[2i] + s[2i + 1] per level."""
    for i in tl.static_range(LOG2):
        s = tl.reshape(s, [ROWS, BLOCK >> (i + 1), 2])
        a, b = tl.split(s)
        s = a + b
    return tl.reshape(s, [ROWS])


@triton.jit
def _fp8_decode(code):
    """fp32 value of e4m3fn codes (uint8): exact; the NaN codes (0x7F/0xFF) are never written."""
    c = code.to(tl.int32)
    sign = (c >> 7) & 1
    e = (c >> 3) & 15
    m = c & 7
    normal = ((e + 120) << 23) | (m << 20)
    mag = tl.where(e == 0, m.to(tl.float32) * 0.001953125, normal.to(tl.float32, bitcast=True))
    return tl.where(sign == 1, -mag, mag)


@triton.jit
def _fp8_encode(v):
    """e4m3fn codes (uint8) of fp32 values already clamped to [-448, 448], round to nearest even."""
    bits = v.to(tl.int32, bitcast=True)
    sign = (bits >> 31) & 1
    mag_bits = bits & 0x7FFFFFFF
    mag = mag_bits.to(tl.float32, bitcast=True)
    # below 2**-6 (the smallest normal) the code is the value in units of 2**-9 (subnormals);
    # the code 8 that a carry reaches is 2**-6, the first normal: the encodings line up
    sub = (mag * 512.0 + 8388608.0) - 8388608.0  # round half to even via the fp32 ulp at 2**23
    sub_code = sub.to(tl.int32)
    # normal: keep 3 of the 23 mantissa bits, round half to even, rebias 127 -> 7
    rnd = mag_bits + 0x7FFFF + ((mag_bits >> 20) & 1)
    norm_code = (rnd >> 20) - 960
    code = tl.where(mag < 0.015625, sub_code, norm_code)
    return (code | (sign << 7)).to(tl.uint8)


@triton.jit
def _to_dtype(x, DT: tl.constexpr):
    """fp32 -> the model dtype, round to nearest even (bf16 on the bits: see _bf16_rne)."""
    if DT == 0:
        return _bf16_rne(x)
    elif DT == 1:
        return x.to(tl.float16)
    else:
        return x


@triton.jit
def _bf16_rne(x):
    """fp32 -> bf16, round to nearest even, NaN kept NaN: the same bits as ``cvt.rn.bf16.f32``
    and torch, written on the bits because the interpreter's own cast truncates."""
    bits = x.to(tl.int32, bitcast=True)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    nan = (bits & 0x7FFFFFFF) > 0x7F800000
    hi = tl.where(nan, (bits >> 16) | 0x40, rounded)
    return hi.to(tl.int16).to(tl.bfloat16, bitcast=True)


@triton.jit
def _f32(x):
    """A loaded model-dtype value as fp32, exactly (bf16 widened on the bits, like the
    hardware; fp16 / fp32 by the cast)."""
    if x.dtype == tl.bfloat16:
        return (x.to(tl.int16, bitcast=True).to(tl.int32) << 16).to(tl.float32, bitcast=True)
    else:
        return x.to(tl.float32)


# ----------------------------------------------------------------------------- receive


@triton.jit
def _recv_norm_kernel(
    h_ptr,  # hidden rows [T, H] (model dtype, or uint8 e4m3fn codes when H_FP8)
    hs_ptr,  # fp32 [T] hidden row scales (H_FP8), else unused
    r_ptr,  # residual rows [T, H] (HAS_RES), model dtype or codes (R_FP8)
    rs_ptr,  # fp32 [T] residual row scales (R_FP8)
    w_ptr,  # weight [H], model dtype (NORM)
    out_ptr,  # normalised output, model dtype, element (t, c) at t * out_rs + c * out_cs
    res_ptr,  # new residual, model dtype, element (t, c) at t * res_rs + c * res_cs
    T,
    eps,
    out_rs,
    out_cs,
    res_rs,
    res_cs,
    H: tl.constexpr,
    BLOCK: tl.constexpr,  # next power of two >= H
    LOG2: tl.constexpr,  # log2(BLOCK)
    ROWS: tl.constexpr,
    DT: tl.constexpr,  # model dtype code
    HAS_RES: tl.constexpr,
    H_FP8: tl.constexpr,
    R_FP8: tl.constexpr,
    NORM: tl.constexpr,
    ORDER: tl.constexpr,  # 0: vLLM, 1: flashinfer
):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    cols = tl.arange(0, BLOCK)
    cmask = cols < H
    n_blocks = tl.cdiv(T, ROWS)
    if NORM:
        w = _f32(tl.load(w_ptr + cols, mask=cmask, other=0.0))
    for rb in range(pid, n_blocks, nprog):
        rows = tl.arange(0, ROWS).to(tl.int64) + rb * ROWS
        rmask = rows < T
        mask = rmask[:, None] & cmask[None, :]
        offs = rows[:, None] * H + cols[None, :]
        if H_FP8:
            hs = tl.load(hs_ptr + rows, mask=rmask, other=1.0)
            # dequantised to the model dtype first: the same bits as dequantise, then the op
            h = _to_dtype(_fp8_decode(tl.load(h_ptr + offs, mask=mask, other=0)) * hs[:, None], DT)
            h = _f32(h)
        else:
            h = _f32(tl.load(h_ptr + offs, mask=mask, other=0.0))
        if HAS_RES:
            if R_FP8:
                rs = tl.load(rs_ptr + rows, mask=rmask, other=1.0)
                r = _fp8_decode(tl.load(r_ptr + offs, mask=mask, other=0)) * rs[:, None]
                r = _f32(_to_dtype(r, DT))
            else:
                r = _f32(tl.load(r_ptr + offs, mask=mask, other=0.0))
            x = h + r  # fp32 sum of two model-dtype values
        else:
            x = h
        xr = _to_dtype(x, DT)  # the new residual, rounded once
        tl.store(
            res_ptr + rows[:, None] * res_rs + cols[None, :] * res_cs,
            xr,
            mask=mask,
        )
        if NORM:
            if ORDER == 0:
                x = _f32(xr)  # vLLM: statistics from the rounded sum
            total = _tree_sum(x * x, ROWS, BLOCK, LOG2)
            var = tl.math.div_rn(total, H * 1.0)
            rstd = tl.math.div_rn(1.0, tl.sqrt_rn(var + eps))
            y = x * rstd[:, None]
            if ORDER == 0:
                # vLLM: normalised value rounded to the model dtype, then weight in that dtype
                y = _f32(_to_dtype(y, DT)) * w[None, :]
            else:
                # flashinfer: weight in fp32, one final rounding
                y = y * w[None, :]
            tl.store(
                out_ptr + rows[:, None] * out_rs + cols[None, :] * out_cs,
                _to_dtype(y, DT),
                mask=mask,
            )


# ----------------------------------------------------------------------------- send


@triton.jit
def _wire_rows(
    row_ptr,
    blk,
    base_addr,
    DT: tl.constexpr,
    ELEM: tl.constexpr,
    FBLOCK: tl.constexpr,
    QBLOCK: tl.constexpr,
):
    """FOLD and QUANT segments of one model dtype (``ELEM`` is its pointer element type)."""
    mode = tl.load(row_ptr)
    a_addr = tl.load(row_ptr + 3)
    dst_addr = tl.load(row_ptr + 4) + base_addr
    b_addr = tl.load(row_ptr + 5)
    H = tl.load(row_ptr + 6)
    a_rs = tl.load(row_ptr + 7)
    b_rs = tl.load(row_ptr + 8)
    a_cs = tl.load(row_ptr + 9)
    b_cs = tl.load(row_ptr + 10)
    flags = tl.load(row_ptr + 12)
    a = a_addr.to(tl.pointer_type(ELEM))
    b = b_addr.to(tl.pointer_type(ELEM))
    if mode == 2:
        n = tl.load(row_ptr + 2) * H  # elements of the [T, H] pair
        dst = tl.multiple_of(dst_addr.to(tl.pointer_type(ELEM)), 16)
        i = blk * FBLOCK + tl.arange(0, FBLOCK)
        if (flags & 2) != 0:
            # contiguous rows, 16-byte aligned (the host checked): vector loads/stores
            a = tl.multiple_of(a, 16)
            b = tl.multiple_of(b, 16)
            if (blk + 1) * FBLOCK <= n:
                s = _f32(tl.load(a + i)) + _f32(tl.load(b + i))
                tl.store(dst + i, _to_dtype(s, DT))
            else:
                m = i < n
                s = _f32(tl.load(a + i, mask=m)) + _f32(tl.load(b + i, mask=m))
                tl.store(dst + i, _to_dtype(s, DT), mask=m)
        else:
            m = i < n
            t = i // H
            c = i % H
            va = _f32(tl.load(a + t * a_rs + c * a_cs, mask=m))
            vb = _f32(tl.load(b + t * b_rs + c * b_cs, mask=m))
            tl.store(dst + i, _to_dtype(va + vb, DT), mask=m)
    else:
        t = blk.to(tl.int64)  # one row per program
        c = tl.arange(0, QBLOCK).to(tl.int64)
        m = c < H
        x = _f32(tl.load(a + t * a_rs + c * a_cs, mask=m, other=0.0))
        if (flags & 1) != 0:
            x = x + _f32(tl.load(b + t * b_rs + c * b_cs, mask=m, other=0.0))
            x = _f32(_to_dtype(x, DT))  # the folded sum as the receiver's residual
        amax = tl.max(tl.abs(x), axis=0)
        scale = tl.math.div_rn(amax, 448.0)
        scale = tl.where(scale > 0.0, scale, 1.0)  # an all-zero (or tiny) row: scale 1
        q = tl.minimum(tl.maximum(tl.math.div_rn(x, scale), -448.0), 448.0)
        qdst = dst_addr.to(tl.pointer_type(tl.uint8))
        tl.store(qdst + t * H + c, _fp8_encode(q), mask=m)
        sdst = (tl.load(row_ptr + 11) + base_addr).to(tl.pointer_type(tl.float32))
        tl.store(sdst + t, scale)


@triton.jit
def _pack_wire_kernel(
    table_ptr,  # int64: [grid] (segment << 32 | block) codes, then [segments, ROW] rows
    base_addr,  # address of the wire buffer; dst fields are offsets from it
    ROW_LEN: tl.constexpr,
    VBLOCK: tl.constexpr,  # int32 words per VEC program
    BBLOCK: tl.constexpr,  # bytes per BYTES program
    FBLOCK: tl.constexpr,  # elements per FOLD program
    QBLOCK: tl.constexpr,  # power of two >= the widest quantised row
):
    pid = tl.program_id(0).to(tl.int64)
    code = tl.load(table_ptr + pid)
    seg = code >> 32
    blk = code & 0xFFFFFFFF
    row_ptr = table_ptr + tl.num_programs(0).to(tl.int64) + seg * ROW_LEN
    mode = tl.load(row_ptr)
    if mode == 0:
        n = tl.multiple_of(tl.load(row_ptr + 2), 4)
        src = tl.multiple_of(tl.load(row_ptr + 3).to(tl.pointer_type(tl.int32)), 16)
        dst = tl.multiple_of((tl.load(row_ptr + 4) + base_addr).to(tl.pointer_type(tl.int32)), 16)
        i = blk * VBLOCK + tl.arange(0, VBLOCK)
        if (blk + 1) * VBLOCK <= n:
            tl.store(dst + i, tl.load(src + i))
        else:
            m = i < n
            tl.store(dst + i, tl.load(src + i, mask=m), mask=m)
    elif mode == 1:
        n = tl.load(row_ptr + 2)
        bsrc = tl.load(row_ptr + 3).to(tl.pointer_type(tl.uint8))
        bdst = (tl.load(row_ptr + 4) + base_addr).to(tl.pointer_type(tl.uint8))
        i = blk * BBLOCK + tl.arange(0, BBLOCK)
        m = i < n
        tl.store(bdst + i, tl.load(bsrc + i, mask=m), mask=m)
    else:
        dt = tl.load(row_ptr + 1)
        if dt == 0:
            _wire_rows(row_ptr, blk, base_addr, 0, tl.bfloat16, FBLOCK, QBLOCK)
        elif dt == 1:
            _wire_rows(row_ptr, blk, base_addr, 1, tl.float16, FBLOCK, QBLOCK)
        else:
            _wire_rows(row_ptr, blk, base_addr, 2, tl.float32, FBLOCK, QBLOCK)
