"""Tests of the fused wire ops: ``unpack_add_rmsnorm``, ``pack_wire`` (fold, fp8), dequantising.

The kernels' promise is bit-exactness against the pure-torch references (``fused.py`` fixes
the reduction order), so every kernel result is compared on its bytes. Without CUDA the kernels
run on CPU tensors under the Triton interpreter, which does not catch out-of-bounds stores:
caller-owned outputs lie inside larger canary-filled (0xA5) tensors, packed buffers inside a
canary-filled byte range, and every byte outside what the op may write is checked.

Interpreter budget: a receive program costs ~1-2 ms per row of 8192; grids stay under ~100
programs (the launcher caps them at 64 there and lets each program loop over row blocks).
"""

from __future__ import annotations

import math

import pytest
import torch

import pipepack.kernels as K
from pipepack.kernels import fused as Fz
from pipepack.kernels import pack, plan_layout

CANARY = 0xA5
HALF = [torch.bfloat16, torch.float16]
HIDDEN_SIZES = [4096, 5120, 8192, 4099]  # the last one odd: rows not 16-byte aligned
EPS = 1e-6

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


# ----------------------------------------------------------------------------- helpers


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8).cpu()


def _assert_bits(got: torch.Tensor, want: torch.Tensor, what: str = "") -> None:
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    assert got.dtype == want.dtype, f"{what}: dtype {got.dtype} != {want.dtype}"
    g, w = _bits(got), _bits(want)
    bad = (g != w).nonzero()
    assert bad.numel() == 0, f"{what}: {bad.shape[0]} bytes differ, first at byte {bad[0].item()}"


def _ulps(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Distance in units in the last place of the (16-bit) model dtype, element by element."""
    width = {2: torch.int16, 4: torch.int32}[a.element_size()]
    ia = a.contiguous().view(width).to(torch.int64)
    ib = b.contiguous().view(width).to(torch.int64)
    top = 1 << (8 * a.element_size() - 1)
    # map sign-magnitude bit patterns onto a monotone integer line
    ia = torch.where(ia < 0, -(ia + top), ia)
    ib = torch.where(ib < 0, -(ib + top), ib)
    return (ia - ib).abs()


def _activations(T: int, H: int, dtype: torch.dtype, seed: int) -> tuple[torch.Tensor, ...]:
    """hidden, residual and weight shaped like a decoder's: a residual stream several times
    larger than the layer output, a few outlier channels, a weight around 1."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(T, H, generator=g)
    residual = 4 * torch.randn(T, H, generator=g)
    residual[:, :: max(1, H // 7)] *= 30
    weight = 0.5 + torch.rand(H, generator=g) * 1.5
    return hidden.to(dtype), residual.to(dtype), weight.to(dtype)


def _canary_dest(T: int, H: int, dtype: torch.dtype, *, extra_rows: int = 1, pad: int = 8):
    """A [T + extra_rows, H] strided view (rows of H + 2 * pad) of a canary-filled base."""
    n = (T + extra_rows + 2) * (H + 2 * pad) * dtype.itemsize
    base = torch.full((n,), CANARY, dtype=torch.uint8).view(dtype).view(T + extra_rows + 2, -1)
    return base, base[1 : 1 + T + extra_rows, pad : pad + H]


def _check_canary_dest(base: torch.Tensor, view: torch.Tensor, T: int, want: torch.Tensor) -> None:
    """``view[:T]`` holds ``want``; every other byte of ``base`` is still canary."""
    _assert_bits(view[:T], want, "destination rows")
    mask = torch.ones_like(base, dtype=torch.bool)
    rows0 = (view.data_ptr() - base.data_ptr()) // base.element_size() // base.shape[1]
    col0 = (view.data_ptr() - base.data_ptr()) // base.element_size() % base.shape[1]
    mask[rows0 : rows0 + T, col0 : col0 + view.shape[1]] = False
    rest = base.view(torch.uint8).view(*base.shape, base.element_size())[mask]
    assert bool((rest == CANARY).all()), "a canary byte outside the destination rows changed"


def _hop(tensors) -> tuple[torch.Tensor, K.Layout]:
    return pack(tensors), plan_layout(tensors)


def _run_both(buf, layout, hidden, residual, weight, order, **kw):
    got = Fz.unpack_add_rmsnorm(
        buf, layout, hidden, residual, weight, EPS, order=order, impl="triton", **kw
    )
    want = Fz.unpack_add_rmsnorm_reference(buf, layout, hidden, residual, weight, EPS, order=order)
    return got, want


# ----------------------------------------------------------------------------- references


@pytest.mark.parametrize("dtype", HALF)
def test_both_orders_store_the_same_residual_bits(dtype):
    """The fold's premise: vLLM (add in the model dtype) and flashinfer (add in fp32, round)
    give the same residual; includes sums that round, ties, huge magnitude gaps, cancellation."""
    h, r, w = _activations(64, 512, dtype, 1)
    info = torch.finfo(dtype)
    edge = torch.tensor(
        [info.max, -info.max, info.tiny, info.eps, 1.0, -1.0, 3.0, 2.0**-20, 1e4, -1e4],
        dtype=dtype,
    )
    h[0, : edge.numel()] = edge
    r[0, : edge.numel()] = edge.flip(0) * 0.5
    h[1, :] = r[1, :].neg()
    _, res_v = Fz.add_rmsnorm_reference(h, r, w, EPS, order="vllm")
    _, res_f = Fz.add_rmsnorm_reference(h, r, w, EPS, order="flashinfer")
    _assert_bits(res_v, res_f, "residual")


@pytest.mark.parametrize("dtype", HALF)
def test_the_two_orders_differ_in_the_output(dtype):
    """``order`` is not ignored: on these activations the two orders disagree in some element."""
    h, r, w = _activations(32, 1024, dtype, 2)
    out_v, _ = Fz.add_rmsnorm_reference(h, r, w, EPS, order="vllm")
    out_f, _ = Fz.add_rmsnorm_reference(h, r, w, EPS, order="flashinfer")
    assert int((_ulps(out_v, out_f) > 0).sum()) > 0


@pytest.mark.parametrize("dtype", HALF)
def test_vllm_order_against_the_reference_model_rmsnorm(dtype):
    """Against ``pp.refmodel.RMSNorm`` (torch's own summation order, weight one): the residual
    is bit-exact and the output within one ulp of the model dtype on every element."""
    from pipepack.pp.refmodel import RMSNorm

    h, r, _ = _activations(48, 4096, dtype, 3)
    w = torch.ones(4096, dtype=dtype)
    norm = RMSNorm(torch.nn.Parameter(w, requires_grad=False), EPS)
    want_out, want_res = norm(h, r)
    out, res = Fz.add_rmsnorm_reference(h, r, w, EPS, order="vllm")
    _assert_bits(res, want_res, "residual")
    assert int(_ulps(out, want_out).max()) <= 1


def test_reference_rstd_is_correctly_rounded():
    """The reference's ``rstd`` is the IEEE fp32 sequence the kernel runs: checked against the
    same sequence in fp64 with one rounding per step."""
    x = torch.rand(300, 77) * 5
    total = Fz._tree_rowsum(x * x)
    var = total / 77
    s = (var + EPS).double().sqrt().float()
    want = (1 / s.double()).float()
    _assert_bits(Fz._rstd(x, EPS), want, "rstd")


# ----------------------------------------------------------------------------- receive kernel


@pytest.mark.parametrize("order", Fz.ORDERS)
@pytest.mark.parametrize("H", HIDDEN_SIZES)
@pytest.mark.parametrize("dtype", HALF)
def test_kernel_bit_exact_every_hidden_size(dtype, H, order):
    T = 3
    h, r, w = _activations(T, H, dtype, H)
    extra = torch.arange(5, dtype=torch.int32)  # another entry in front: offsets are not 0
    buf, layout = _hop([extra, r, h])
    before = buf.clone()
    (out, res), (want_out, want_res) = _run_both(buf, layout, 2, 1, w, order)
    _assert_bits(res, want_res, "residual")
    _assert_bits(out, want_out, "out")
    _assert_bits(buf, before, "the received buffer")


@pytest.mark.parametrize("T", [1, 7, 64, 257])
def test_kernel_bit_exact_token_counts(T):
    dtype = torch.bfloat16 if T % 2 else torch.float16
    h, r, w = _activations(T, 640, dtype, T)
    buf, layout = _hop([h, r])
    for order in Fz.ORDERS:
        (out, res), (want_out, want_res) = _run_both(buf, layout, 0, 1, w, order)
        _assert_bits(res, want_res, f"residual {order}")
        _assert_bits(out, want_out, f"out {order}")


def test_kernel_bit_exact_4096_tokens():
    h, r, w = _activations(4096, 4096, torch.bfloat16, 9)
    buf, layout = _hop([h, r])
    (out, res), (want_out, want_res) = _run_both(buf, layout, 0, 1, w, "vllm")
    _assert_bits(res, want_res, "residual")
    _assert_bits(out, want_out, "out")


@pytest.mark.parametrize("T", [1, 4096])
@pytest.mark.parametrize("H", HIDDEN_SIZES)
def test_torch_path_is_the_reference(T, H):
    """The default CPU path returns the reference's bits into the caller's destinations."""
    h, r, w = _activations(T, H, torch.bfloat16, T + H)
    buf, layout = _hop([h, r])
    want_out, want_res = Fz.add_rmsnorm_reference(h, r, w, EPS, order="flashinfer")
    out, res = Fz.unpack_add_rmsnorm(buf, layout, 0, 1, w, EPS, order="flashinfer")
    _assert_bits(res, want_res, "residual")
    _assert_bits(out, want_out, "out")


def test_kernel_fp32():
    h, r, w = _activations(5, 4096, torch.float32, 4)
    buf, layout = _hop([h, r])
    for order in Fz.ORDERS:
        (out, res), (want_out, want_res) = _run_both(buf, layout, 0, 1, w, order)
        _assert_bits(res, want_res, "residual")
        _assert_bits(out, want_out, "out")


@pytest.mark.parametrize("order", Fz.ORDERS)
def test_kernel_without_residual(order):
    h, _, w = _activations(9, 1000, torch.bfloat16, 5)
    buf, layout = _hop([h])
    (out, res), (want_out, want_res) = _run_both(buf, layout, 0, None, w, order)
    _assert_bits(res, h, "residual is the received sum")
    _assert_bits(want_res, h, "reference residual")
    _assert_bits(out, want_out, "out")


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("order", Fz.ORDERS)
def test_caller_destinations_strided_and_larger(impl, order):
    """Static buffers larger in dim 0, rows padded: rows [:T] written, every other byte canary."""
    T, H, dtype = 6, 768, torch.float16
    h, r, w = _activations(T, H, dtype, 6)
    buf, layout = _hop([h, r])
    ob, ov = _canary_dest(T, H, dtype, extra_rows=3)
    rb, rv = _canary_dest(T, H, dtype, extra_rows=1, pad=24)
    out, res = Fz.unpack_add_rmsnorm(
        buf, layout, 0, 1, w, EPS, order=order, out=ov, residual_out=rv, impl=impl
    )
    want_out, want_res = Fz.add_rmsnorm_reference(h, r, w, EPS, order=order)
    assert out.data_ptr() == ov.data_ptr() and out.shape == (T, H)
    assert res.data_ptr() == rv.data_ptr() and res.shape == (T, H)
    _check_canary_dest(ob, ov, T, want_out)
    _check_canary_dest(rb, rv, T, want_res)


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_one_destination_given(impl):
    T, H, dtype = 4, 256, torch.bfloat16
    h, r, w = _activations(T, H, dtype, 7)
    buf, layout = _hop([h, r])
    want_out, want_res = Fz.add_rmsnorm_reference(h, r, w, EPS)
    ob, ov = _canary_dest(T, H, dtype)
    out, res = Fz.unpack_add_rmsnorm(buf, layout, 0, 1, w, EPS, out=ov, impl=impl)
    _check_canary_dest(ob, ov, T, want_out)
    _assert_bits(res, want_res, "fresh residual")
    rb, rv = _canary_dest(T, H, dtype)
    out, res = Fz.unpack_add_rmsnorm(buf, layout, 0, 1, w, EPS, residual_out=rv, impl=impl)
    _check_canary_dest(rb, rv, T, want_res)
    _assert_bits(out, want_out, "fresh out")


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_residual_written_in_place_into_the_buffer(impl):
    T, H, dtype = 5, 512, torch.bfloat16
    h, r, w = _activations(T, H, dtype, 8)
    buf, layout = _hop([h, r])
    want_out, want_res = Fz.add_rmsnorm_reference(h, r, w, EPS)
    slot = K.unpack(buf, layout)[1]
    out, res = Fz.unpack_add_rmsnorm(buf, layout, 0, 1, w, EPS, residual_out=slot, impl=impl)
    _assert_bits(slot, want_res, "residual slot")
    _assert_bits(out, want_out, "out")
    _assert_bits(K.unpack(buf, layout)[0], h, "hidden slot untouched")


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_zero_tokens_writes_nothing(impl):
    H, dtype = 64, torch.bfloat16
    h = torch.empty(0, H, dtype=dtype)
    buf, layout = _hop([h, h.clone()])
    ob, ov = _canary_dest(0, H, dtype, extra_rows=2)
    w = torch.ones(H, dtype=dtype)
    out, res = Fz.unpack_add_rmsnorm(buf, layout, 0, 1, w, EPS, out=ov, impl=impl)
    assert out.shape == (0, H) and res.shape == (0, H)
    _check_canary_dest(ob, ov, 0, ov[:0])


def test_vllm_order_is_the_refmodel_layer_op_with_unit_weight():
    """What the reference model's first norm computes from the received pair, fused: the
    residual bit-exact, the output within one ulp (torch's summation order differs)."""
    from pipepack.pp.refmodel import RMSNorm

    h, r, _ = _activations(16, 2048, torch.bfloat16, 10)
    w = torch.ones(2048, dtype=torch.bfloat16)
    buf, layout = _hop([h, r])
    out, res = Fz.unpack_add_rmsnorm(buf, layout, 0, 1, w, EPS, impl="triton")
    want_out, want_res = RMSNorm(torch.nn.Parameter(w, requires_grad=False), EPS)(h, r)
    _assert_bits(res, want_res, "residual")
    assert int(_ulps(out, want_out).max()) <= 1


# ----------------------------------------------------------------------------- fold


def _extras():
    """Other tensors of a hop: odd byte counts, a strided one, an empty one, a 0-dim one."""
    base = torch.arange(60, dtype=torch.float64).view(6, 10)
    return [
        torch.tensor([3, 1, 4, 1, 5], dtype=torch.int32),
        base[:, ::3],
        torch.empty(0, 4, dtype=torch.float16),
        torch.tensor(2.5),
        torch.randint(0, 255, (37,), dtype=torch.uint8),
        torch.randn(1000, dtype=torch.float32),
    ]


def _canary_out(nbytes: int) -> tuple[torch.Tensor, torch.Tensor]:
    big = torch.full((nbytes + 96,), CANARY, dtype=torch.uint8)
    return big, big[32 : 32 + nbytes]


def _check_wire(big, buf, wire, want_entries) -> None:
    """Each entry holds the wanted bytes; padding and everything around ``buf`` stays canary."""
    touched = torch.zeros(big.numel(), dtype=torch.bool)
    start = buf.data_ptr() - big.data_ptr()
    for k, (e, want) in enumerate(zip(wire.layout.entries, want_entries)):
        _assert_bits(buf[e.offset : e.offset + e.nbytes], _bits(want), f"entry {k}")
        touched[start + e.offset : start + e.offset + e.nbytes] = True
    assert bool((big[~touched] == CANARY).all()), "a byte outside the entries changed"


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_fold_is_unfused_add_then_pack(impl, dtype):
    h, r, _ = _activations(33, 4096, dtype, 11)
    tensors = [*_extras()[:2], h, r, *_extras()[2:]]
    wire = Fz.plan_wire([(t.dtype, t.shape) for t in tensors], fold=(2, 3))
    big, out = _canary_out(wire.layout.nbytes)
    buf, got_wire = Fz.pack_wire(tensors, fold=(2, 3), out=out, impl=impl)
    assert got_wire == wire
    assert wire.entries == (0, 1, 2, None, 3, 4, 5, 6)
    want = [t for i, t in enumerate(tensors) if i != 3]
    want[2] = h + r
    _check_wire(big, buf, wire, want)
    ref, _ = Fz.pack_wire_reference(tensors, fold=(2, 3))
    for e in wire.layout.entries:
        _assert_bits(buf[e.offset : e.offset + e.nbytes], ref[e.offset : e.offset + e.nbytes])
    assert wire.layout.nbytes < plan_layout(tensors).nbytes - h.numel() * h.element_size() + 64


@pytest.mark.parametrize("kind", ["columns", "misaligned", "transposed"])
def test_fold_strided_and_misaligned_sources(kind):
    T, H = 12, 96
    g = torch.Generator().manual_seed(12)
    if kind == "columns":
        h = torch.randn(T, 3 * H, generator=g).bfloat16()[:, H : 2 * H]
        r = torch.randn(T, 2 * H, generator=g).bfloat16()[:, :H]
    elif kind == "misaligned":
        h = torch.randn(T * H + 1, generator=g).bfloat16()[1:].view(T, H)
        r = torch.randn(T * H, generator=g).bfloat16().view(T, H)
    else:
        h = torch.randn(H, T, generator=g).bfloat16().t()
        r = torch.randn(T, H, generator=g).bfloat16()
    wire = Fz.plan_wire([(h.dtype, h.shape)] * 2, fold=(1, 0))
    big, out = _canary_out(wire.layout.nbytes)
    buf, _ = Fz.pack_wire([r, h], fold=(1, 0), out=out, impl="triton")
    _check_wire(big, buf, wire, [h + r])


@pytest.mark.parametrize("order", Fz.ORDERS)
@pytest.mark.parametrize("dtype", HALF)
def test_folded_hop_gives_the_unfused_residual(order, dtype):
    """Send folded, receive with residual=None: the residual bits of the unfused op in both
    orders; the vLLM output bit-exact too. The flashinfer output normalises the rounded sum, not
    the fp32 one: half an ulp of the model dtype on the input, which the rounding of the output
    turns into at most two ulps (one when no power of two lies in between)."""
    h, r, w = _activations(10, 4096, dtype, 13)
    buf, wire = Fz.pack_wire([h, r], fold=(0, 1), impl="triton")
    out, res = Fz.unpack_add_rmsnorm(
        buf, wire.layout, wire.entries[0], None, w, EPS, order=order, impl="triton"
    )
    want_out, want_res = Fz.add_rmsnorm_reference(h, r, w, EPS, order=order)
    _assert_bits(res, want_res, "residual")
    if order == "vllm":
        _assert_bits(out, want_out, "out")
    else:
        assert int(_ulps(out, want_out).max()) <= 2


def test_plan_cache_follows_new_contents_and_buffers():
    h, r, _ = _activations(4, 256, torch.bfloat16, 14)
    x = torch.arange(10, dtype=torch.int64)
    for step in range(3):
        h.add_(1)
        x.mul_(3)
        buf, wire = Fz.pack_wire([h, x, r], fold=(0, 2), impl="triton")
        got = K.unpack(buf, wire.layout)
        _assert_bits(got[0], h + r, f"step {step} fold")
        _assert_bits(got[1], x, f"step {step} copy")


# ----------------------------------------------------------------------------- fp8


def test_fp8_encoder_every_code_and_every_tie():
    """A row whose amax is 448 has scale 1, so the kernel encodes the values as they are: every
    e4m3fn value, every midpoint between neighbours (ties to even) and points just around them."""
    codes = torch.arange(256, dtype=torch.uint8)
    codes = codes[(codes & 0x7F) != 0x7F]  # not the NaNs
    vals = codes.view(torch.float8_e4m3fn).float()
    pos = vals[vals >= 0].unique().sort().values
    mids = (pos[1:] + pos[:-1]) / 2
    near = torch.cat([mids * (1 + 2.0**-20), mids * (1 - 2.0**-20)])
    row = torch.cat([torch.tensor([448.0]), vals, mids, -mids, near, -near, torch.tensor([-0.0])])
    x = row[None, :]
    buf, wire = Fz.pack_wire([x], fp8=(0,), impl="triton")
    q, s = K.unpack(buf, wire.layout)
    assert float(s[0]) == 1.0
    want = x.clamp(-448, 448).to(torch.float8_e4m3fn)
    _assert_bits(q, want, "codes")


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_fp8_pack_matches_reference(impl, dtype):
    h, r, _ = _activations(7, 1000, dtype, 15)
    h[3] = 0  # an all-zero row: scale 1, codes 0
    h[4, :10] = -0.0
    h[5] = h[5] * 1e-3  # small values: subnormal codes
    extra = torch.randn(3, 5)
    tensors = [extra, h, r]
    wire = Fz.plan_wire([(t.dtype, t.shape) for t in tensors], fp8=(1, 2))
    big, out = _canary_out(wire.layout.nbytes)
    buf, got = Fz.pack_wire(tensors, fp8=(1, 2), out=out, impl=impl)
    assert got == wire and wire.entries == (0, 1, 3)
    qh, sh = Fz.quantize_fp8_reference(h)
    qr, sr = Fz.quantize_fp8_reference(r)
    assert float(sh[3]) == 1.0 and bool((qh[3].view(torch.uint8) == 0).all())
    _check_wire(big, buf, wire, [extra, qh, sh, qr, sr])


@pytest.mark.parametrize("dtype", HALF)
def test_fp8_with_fold_quantises_the_folded_sum(dtype):
    h, r, _ = _activations(6, 2048, dtype, 16)
    buf, wire = Fz.pack_wire([h, r], fold=(0, 1), fp8=(0,), impl="triton")
    q, s = Fz.quantize_fp8_reference(h + r)
    _assert_bits(K.unpack(buf, wire.layout)[0], q, "codes")
    _assert_bits(K.unpack(buf, wire.layout)[1], s, "scales")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_dequantize_matches_reference_and_error_bound(dtype):
    """Dequantised values are the reference's bits; each lies within e4m3's half-ulp of the
    original (2**-4 relative, 2**-10 of the scale near zero) plus one rounding to the dtype."""
    h, _, _ = _activations(9, 1536, dtype, 17)
    buf, wire = Fz.pack_wire([h], fp8=(0,), impl="triton")
    ob, ov = _canary_dest(9, 1536, dtype, extra_rows=2)
    got = Fz.dequantize_fp8(buf, wire.layout, 0, dtype, out=ov, impl="triton")
    q, s = K.unpack(buf, wire.layout)
    want = Fz.dequantize_fp8_reference(q, s, dtype)
    _check_canary_dest(ob, ov, 9, want)
    assert got.data_ptr() == ov.data_ptr()
    x = h.float()
    bound = torch.maximum(x.abs() * 2.0**-4, s[:, None] * 2.0**-10)
    bound = bound + got.float().abs() * torch.finfo(dtype).eps
    assert bool(((got.float() - x).abs() <= bound).all())


@pytest.mark.parametrize("order", Fz.ORDERS)
@pytest.mark.parametrize("which", ["hidden", "both", "folded"])
def test_fused_dequant_add_rmsnorm(order, which):
    """fp8 entries go through the fused op with the bits of dequantise-then-op."""
    dtype = torch.bfloat16
    h, r, w = _activations(5, 4096, dtype, 18)
    if which == "folded":
        buf, wire = Fz.pack_wire([h, r], fold=(0, 1), fp8=(0,), impl="triton")
        hi, ri = wire.entries[0], None
    else:
        buf, wire = Fz.pack_wire([h, r], fp8=(0, 1) if which == "both" else (0,), impl="triton")
        hi, ri = wire.entries[0], wire.entries[1]
    (out, res), (want_out, want_res) = _run_both(buf, wire.layout, hi, ri, w, order)
    _assert_bits(res, want_res, "residual")
    _assert_bits(out, want_out, "out")
    deq = Fz.dequantize_fp8_reference(*K.unpack(buf, wire.layout)[hi : hi + 2], dtype)
    rr = None if ri is None else K.unpack(buf, wire.layout)[ri]
    if rr is not None and rr.dtype == torch.float8_e4m3fn:
        rr = Fz.dequantize_fp8_reference(rr, K.unpack(buf, wire.layout)[ri + 1], dtype)
    manual_out, manual_res = Fz.add_rmsnorm_reference(deq, rr, w, EPS, order=order)
    _assert_bits(want_res, manual_res, "reference residual")
    _assert_bits(want_out, manual_out, "reference out")


def test_plan_wire_is_what_pack_wire_uses():
    specs = [(torch.int64, (3,)), (torch.bfloat16, (8, 64)), (torch.bfloat16, (8, 64))]
    wire = Fz.plan_wire(specs, fold=(1, 2), fp8=(1,))
    assert wire.entries == (0, 1, None)
    assert [(e.dtype, e.shape) for e in wire.layout.entries] == [
        (torch.int64, (3,)),
        (torch.float8_e4m3fn, (8, 64)),
        (torch.float32, (8,)),
    ]
    assert wire.fp8 == (False, True, False) and wire.fold == (1, 2)
    tensors = [torch.arange(3), torch.ones(8, 64).bfloat16(), torch.ones(8, 64).bfloat16()]
    _, got = Fz.pack_wire(tensors, fold=(1, -1), fp8=(-2,))
    assert got == wire


# ----------------------------------------------------------------------------- errors


def _good():
    h, r, w = _activations(4, 64, torch.bfloat16, 19)
    buf, layout = _hop([h, r, torch.arange(4, dtype=torch.int32)])
    return buf, layout, w


def _call(**kw):
    buf, layout, w = _good()
    args = dict(buffer=buf, layout=layout, hidden=0, residual=1, weight=w, eps=EPS)
    args.update(kw)
    return Fz.unpack_add_rmsnorm(**args)


RECV_ERRORS = [
    (dict(order="gemma"), ValueError, "order must be one of"),
    (dict(impl="cuda"), ValueError, "impl must be"),
    (dict(buffer=[1, 2]), TypeError, "buffer must be a torch.Tensor"),
    (dict(buffer=torch.zeros(10000, dtype=torch.int8)), TypeError, "buffer must be torch.uint8"),
    (dict(buffer=torch.zeros(10, dtype=torch.uint8)), ValueError, "layout needs"),
    (dict(buffer=torch.zeros(20000, dtype=torch.uint8)[1:]), ValueError, "not 16-byte aligned"),
    (dict(buffer=torch.zeros(2, 10000, dtype=torch.uint8)), ValueError, "contiguous 1-D"),
    (dict(layout="x"), TypeError, "layout must be a pipepack Layout"),
    (dict(hidden=3), IndexError, "hidden index 3 is out of range"),
    (dict(hidden=1.0), TypeError, "hidden index must be an int"),
    (dict(residual=0), ValueError, "same entry"),
    (dict(residual=2), ValueError, r"residual entry 2 must be \[T, H\]"),
    (dict(weight=torch.ones(64)), TypeError, "hidden entry 0 is torch.bfloat16 but the weight"),
    (dict(weight=torch.ones(64, dtype=torch.int32)), TypeError, "not a model dtype"),
    (dict(weight=torch.ones(65, dtype=torch.bfloat16)), ValueError, "does not match hidden size"),
    (dict(weight=None), TypeError, "weight must be a torch.Tensor"),
    (dict(eps=-1.0), ValueError, "eps must be a finite number"),
    (dict(eps=float("nan")), ValueError, "eps must be a finite number"),
    (dict(eps="1e-6"), ValueError, "eps must be a finite number"),
    (dict(out=torch.empty(4, 64)), TypeError, "out dtype torch.float32 does not match"),
    (dict(out=torch.empty(3, 64, dtype=torch.bfloat16)), ValueError, r"cannot hold \[4, 64\]"),
    (dict(out=torch.empty(4, 65, dtype=torch.bfloat16)), ValueError, "dim 1 must be 64"),
    (dict(residual_out=torch.empty(4, 64, 1, dtype=torch.bfloat16)), ValueError, "cannot hold"),
    (dict(residual_out="x"), TypeError, "residual_out must be a torch.Tensor"),
]


@pytest.mark.parametrize("kw,exc,match", RECV_ERRORS, ids=[m for _, _, m in RECV_ERRORS])
def test_receive_errors(kw, exc, match):
    with pytest.raises(exc, match=match):
        _call(**kw)


def test_receive_error_overlapping_destinations():
    d = torch.empty(8, 64, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="out and residual_out overlap"):
        _call(out=d[:4], residual_out=d[2:6])
    _call(out=d[:4], residual_out=d[4:])  # adjacent, not overlapping: fine


def test_receive_error_mismatched_operands():
    a = torch.ones(4, 64, dtype=torch.bfloat16)
    buf, layout = _hop([a, torch.ones(5, 64, dtype=torch.bfloat16), a.half()])
    w = torch.ones(64, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=r"hidden entry 0 is \[4, 64\] but residual entry 1"):
        Fz.unpack_add_rmsnorm(buf, layout, 0, 1, w, EPS)
    with pytest.raises(TypeError, match="residual entry 2 is torch.float16 but the weight"):
        Fz.unpack_add_rmsnorm(buf, layout, 0, 2, w, EPS)
    buf, layout = _hop([a.int(), a])
    with pytest.raises(TypeError, match="hidden entry 0 has dtype torch.int32"):
        Fz.unpack_add_rmsnorm(buf, layout, 0, 1, w, EPS)
    buf, layout = _hop([torch.ones(4, 0, dtype=torch.bfloat16)])
    with pytest.raises(ValueError, match="hidden size 0"):
        Fz.unpack_add_rmsnorm(buf, layout, 0, None, torch.ones(0, dtype=torch.bfloat16), EPS)


def test_receive_error_fp8_without_scales():
    q = torch.zeros(4, 64, dtype=torch.float8_e4m3fn)
    w = torch.ones(64, dtype=torch.bfloat16)
    buf, layout = _hop([q])
    with pytest.raises(ValueError, match="no fp32 row-scale entry follows it"):
        Fz.unpack_add_rmsnorm(buf, layout, 0, None, w, EPS)
    buf, layout = _hop([q, torch.ones(5)])
    with pytest.raises(ValueError, match=r"entry 1 must be its fp32 \[4\] row scales"):
        Fz.unpack_add_rmsnorm(buf, layout, 0, None, w, EPS)
    buf, layout = _hop([torch.ones(4, 64, dtype=torch.bfloat16)])
    with pytest.raises(TypeError, match="not float8_e4m3fn codes"):
        Fz.dequantize_fp8(buf, layout, 0, torch.bfloat16)
    buf, layout = _hop([q, torch.ones(4)])
    with pytest.raises(TypeError, match="not a model dtype"):
        Fz.dequantize_fp8(buf, layout, 0, torch.int8)


def test_receive_error_hidden_too_wide_for_the_kernel():
    H = Fz.MAX_TRITON_HIDDEN + 16
    a = torch.ones(1, H, dtype=torch.bfloat16)
    buf, layout = _hop([a, a])
    w = torch.ones(H, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="exceeds the kernel's one-tile limit"):
        Fz.unpack_add_rmsnorm(buf, layout, 0, 1, w, EPS, impl="triton")
    out, res = Fz.unpack_add_rmsnorm(buf, layout, 0, 1, w, EPS)  # torch path: any width
    _assert_bits(res, a + a, "residual")


PACK_ERRORS = [
    (dict(fold=(0,)), TypeError, r"fold must be a \(hidden, residual\) pair"),
    (dict(fold=(0, 0)), ValueError, "fold hidden and residual are the same entry"),
    (dict(fold=(0, 5)), IndexError, "fold residual index 5 is out of range"),
    (dict(fold=(0, 2)), ValueError, r"fold residual must be \[T, H\]|differ in dtype or shape"),
    (dict(fold=(0, 3)), TypeError, "the fold residual must be bf16, fp16 or fp32"),
    (dict(fold=(0, 4)), ValueError, "differ in dtype or shape"),
    (dict(fold=(0, 1), fp8=(1,)), ValueError, "is the folded residual, it is not sent"),
    (dict(fp8=0), TypeError, "fp8 must be a sequence"),
    (dict(fp8=(0, 0)), ValueError, "fp8 lists an entry twice"),
    (dict(fp8=(3,)), TypeError, "fp8 quantises bf16, fp16 or fp32 rows"),
    (dict(fp8=(2,)), ValueError, r"fp8 quantises \[T, H\] rows"),
    (dict(fp8=("a",)), TypeError, "fp8 index must be an int"),
    (dict(out=torch.zeros(8, dtype=torch.uint8)), ValueError, "out: buffer holds 8 bytes"),
    (dict(impl="gpu"), ValueError, "impl must be"),
]


@pytest.mark.parametrize("kw,exc,match", PACK_ERRORS, ids=[m for _, _, m in PACK_ERRORS])
def test_pack_errors(kw, exc, match):
    a = torch.ones(4, 64, dtype=torch.bfloat16)
    tensors = [a, a.clone(), torch.ones(256, dtype=torch.bfloat16), a.int(), a.half()]
    with pytest.raises(exc, match=match):
        Fz.pack_wire(tensors, **kw)


def test_pack_errors_inputs():
    with pytest.raises(TypeError, match="key 'b': expected a torch.Tensor, got list"):
        Fz.pack_wire([torch.ones(2), [1]], names=["a", "b"])
    with pytest.raises(TypeError, match="entry 0: unsupported dtype"):
        Fz.pack_wire([torch.zeros(2, dtype=torch.float8_e8m0fnu)])
    with pytest.raises(ValueError, match="entry 1: tensor is on meta but entry 0 is on cpu"):
        Fz.pack_wire([torch.ones(2), torch.ones(2, device="meta")])


def test_interpreter_needed_for_triton_on_cpu(monkeypatch):
    monkeypatch.setattr(Fz, "INTERPRETED", False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        _call(impl="triton")


def test_names_exported():
    for name in (
        "unpack_add_rmsnorm",
        "pack_wire",
        "plan_wire",
        "dequantize_fp8",
        "add_rmsnorm_reference",
        "unpack_add_rmsnorm_reference",
        "pack_wire_reference",
        "quantize_fp8_reference",
        "dequantize_fp8_reference",
        "WireLayout",
    ):
        assert getattr(K, name) is getattr(Fz, name)
        assert name in K.__all__
    assert math.isclose(Fz.FP8_MAX, 448.0)


# ----------------------------------------------------------------------------- compiled (CUDA)


@pytest.mark.gpu
@pytest.mark.parametrize("order", Fz.ORDERS)
@pytest.mark.parametrize("H", HIDDEN_SIZES)
@pytest.mark.parametrize("dtype", HALF)
def test_compiled_kernel_bit_exact_on_cuda(dtype, H, order):
    """The compiled kernels against the references run with torch on the same GPU."""
    for T in (1, 64, 4096 if H == 4096 else 300):
        h, r, w = (t.cuda() for t in _activations(T, H, dtype, T + H))
        buf, layout = _hop([h, r])
        ob, ov = (t.cuda() for t in _canary_dest(T, H, dtype, extra_rows=2))
        out, res = Fz.unpack_add_rmsnorm(buf, layout, 0, 1, w, EPS, order=order, out=ov)
        want_out, want_res = Fz.unpack_add_rmsnorm_reference(buf, layout, 0, 1, w, EPS, order=order)
        _assert_bits(res, want_res, f"T={T} residual")
        _check_canary_dest(ob.cpu(), ov.cpu(), T, want_out.cpu())
        fbuf, wire = Fz.pack_wire([h, r], fold=(0, 1), fp8=(0,) if order == "vllm" else ())
        ref, _ = Fz.pack_wire_reference([h, r], fold=(0, 1), fp8=(0,) if order == "vllm" else ())
        for e in wire.layout.entries:
            _assert_bits(
                fbuf[e.offset : e.offset + e.nbytes],
                ref[e.offset : e.offset + e.nbytes],
                f"T={T} wire entry",
            )
        got = Fz.unpack_add_rmsnorm(fbuf, wire.layout, 0, None, w, EPS, order=order)
        want = Fz.unpack_add_rmsnorm_reference(fbuf, wire.layout, 0, None, w, EPS, order=order)
        _assert_bits(got[0], want[0], f"T={T} folded out")
        _assert_bits(got[1], want[1], f"T={T} folded residual")
