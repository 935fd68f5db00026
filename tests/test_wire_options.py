"""Wire options through the channel: the fold and the fp8 wire (``Wire``), end to end.

What is protected: (1) a folded hop gives the receiver the residual bits the unfused add gives,
in both orders, and the vLLM-order output bit for bit; (2) fp8 keys arrive as exactly the
reference quantiser's codes and scales, dequantised (or normalised) bit-exactly as the kernel
references say; (3) the header's tensor table says which wire code each key used, the decoder
is strict about it, and a receiver that did not accept an option refuses the hop naming the key
and both sides' options, while the next hop still arrives intact; (4) the functional API never
sends such hops and refuses them unless told; (5) TP slicing, the same-host ring and blocking /
chunked sends all carry them. Multi-process tests run on fork-started gloo ranks; the kernel
paths run both as pure torch and as Triton kernels (under the interpreter without CUDA).
Caller-owned destinations lie inside canary-filled tensors.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from _checks import check_tensor, raw_bytes
from _dist import run_ranks

import pipepack.kernels as K
from pipepack.kernels import fused as Fz
from pipepack.pp import (
    Declared,
    TensorDictChannel,
    Wire,
    WireError,
    codec,
    irecv_tensor_dict,
    recv_tensor_dict,
    send_tensor_dict,
    shm,
    wirepack,
)
from pipepack.pp.wire import hop
from pipepack.pp.wire.dtypes import DTYPE_CODES
from pipepack.pp.wire.hop import (
    DEVICE_CODES,
    F_INLINE,
    Frame,
    TensorDesc,
    align16,
    decode_frame,
    decode_schema,
    encode_body,
    encode_frame,
)
from pipepack.pp.wire.limits import DEFAULT_LIMITS

TIMEOUT_S = 60.0
EPS = 1e-6
H = 4096
FOLD = Wire(fold=("hidden_states", "residual"))
FP8 = Wire(fp8=("hidden_states", "residual"))
FOLD_FP8 = Wire(fold=("hidden_states", "residual"), fp8=("hidden_states",))
CANARY = 0xA5


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


def _acts(T: int, dtype: torch.dtype, seed: int, hidden: int = H) -> dict:
    """A stage boundary: hidden states, a larger residual stream with a few outlier channels,
    token positions and a constant; every rank builds the same from the seed."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(T, hidden, generator=g)
    r = 4 * torch.randn(T, hidden, generator=g)
    if hidden >= 7:
        r[:, :: hidden // 7] *= 30
    return {
        "hidden_states": h.to(dtype),
        "residual": r.to(dtype),
        "positions": torch.arange(T),
        "__msg_type__": "proxy",
    }


def _weight(dtype: torch.dtype, seed: int, hidden: int = H) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 + seed)
    return (0.5 + torch.rand(hidden, generator=g) * 1.5).to(dtype)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return raw_bytes(t)


def _same_bits(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    check_tensor(got, want, what)


def _ulps(a: torch.Tensor, b: torch.Tensor) -> int:
    width = {2: torch.int16, 4: torch.int32}[a.element_size()]
    ia = a.contiguous().view(width).to(torch.int64)
    ib = b.contiguous().view(width).to(torch.int64)
    top = 1 << (8 * a.element_size() - 1)
    ia = torch.where(ia < 0, -(ia + top), ia)
    ib = torch.where(ib < 0, -(ib + top), ib)
    return int((ia - ib).abs().max()) if a.numel() else 0


def _canary_dest(T: int, hidden: int, dtype: torch.dtype, extra: int = 3, pad: int = 8):
    """A [T + extra, hidden] view with padded rows inside a canary-filled base."""
    rows, cols = T + extra + 2, hidden + 2 * pad
    base = torch.full((rows * cols * dtype.itemsize,), CANARY, dtype=torch.uint8)
    return base, base.view(dtype).view(rows, cols)[1 : 1 + T + extra, pad : pad + hidden]


def _check_canary(base: torch.Tensor, view: torch.Tensor, T: int, want: torch.Tensor, what: str):
    """``view[:T]`` holds ``want``; every other byte of ``base`` is still canary."""
    _same_bits(view[:T], want, what)
    mask = torch.ones(base.numel(), dtype=torch.bool)
    es = view.element_size()
    start = (view.data_ptr() - base.data_ptr()) // es
    for i in range(T):
        a = (start + i * view.stride(0)) * es
        mask[a : a + view.shape[1] * es] = False
    assert bool((base[mask] == CANARY).all()), f"{what}: a byte outside rows [:{T}] changed"


def _use_impl(impl: str) -> None:
    """In a rank process: every fused op the channel calls runs on ``impl`` (Triton runs on CPU
    tensors under the interpreter, which conftest switched on before the kernels were defined)."""
    if impl == "triton":
        assert Fz.INTERPRETED or torch.cuda.is_available()
        orig = Fz._pick_impl
        Fz._pick_impl = lambda i, device: orig("triton" if i is None else i, device)


def _fp8_roundtrip(x: torch.Tensor) -> torch.Tensor:
    q, s = Fz.quantize_fp8_reference(x)
    return Fz.dequantize_fp8_reference(q, s, x.dtype)


def _norm_ref(h, r, w, order):
    """The unfused op on the sender's tensors (r None: the add happened already)."""
    return Fz.add_rmsnorm_reference(h, r, w, EPS, order=order)


# ---------------------------------------------------------------------------------------------
# in one process: the header, the codec, the options
# ---------------------------------------------------------------------------------------------

F32, BF16, I64 = DTYPE_CODES[torch.float32], DTYPE_CODES[torch.bfloat16], DTYPE_CODES[torch.int64]
CPU = DEVICE_CODES["cpu"]


def _body(keys, tensors, dims, values=b""):
    return encode_body([k.encode() for k, _ in keys], [t for _, t in keys], tensors, dims, values)


def test_tensor_table_carries_each_keys_wire_code() -> None:
    """The flags byte of a tensor: bit 0 TP slice, bits 1-4 its wire code (hop.py's diagram)."""
    b = _body(
        [("h", True), ("r", True), ("x", True)],
        [(BF16, 2, CPU, 1 | 4 << 1), (BF16, 2, CPU, 2 << 1), (BF16, 2, CPU, 3 << 1)],
        [5, 64, 5, 64, 2, 64],
    )
    assert b[8 + 3 * 4 :][:12] == bytes([BF16, 2, CPU, 9, BF16, 2, CPU, 4, BF16, 2, CPU, 6])
    with pytest.raises(WireError, match="fold sum as fp8 and cannot be a TP slice"):
        decode_schema(b, limits=DEFAULT_LIMITS)
    b = _body(
        [("h", True), ("r", True), ("x", True)],
        [(BF16, 2, CPU, 1 | 1 << 1), (BF16, 2, CPU, 2 << 1), (BF16, 2, CPU, 3 << 1)],
        [5, 64, 5, 64, 2, 64],
    )
    s = decode_schema(b, limits=DEFAULT_LIMITS)
    assert [t.wire for t in s.tensors] == [1, 2, 3]
    assert s.tensors[0] == TensorDesc(torch.bfloat16, (5, 64), "cpu", True, hop.WIRE_FOLD_SUM)
    assert [t.wire_spec for t in s.tensors] == [
        (torch.bfloat16, (5, 64)),
        (torch.bfloat16, (0,)),
        (torch.uint8, (align16(2 * 64) + 4 * 2,)),
    ]
    assert hop.tensor_desc_code(torch.zeros(2, 3), True, "k", hop.WIRE_FOLD_SUM) == (F32, 2, CPU, 3)


@pytest.mark.parametrize(
    "table, dims, match",
    [
        ([(BF16, 2, CPU, 5 << 1)], [2, 8], "unknown wire code 5"),
        ([(BF16, 2, CPU, 15 << 1)], [2, 8], "unknown wire code 15"),
        ([(BF16, 2, CPU, 0x20)], [2, 8], "bad flags 0x20"),
        ([(BF16, 2, CPU, 0x80 | 3 << 1)], [2, 8], "bad flags 0x86"),
        ([(I64, 2, CPU, 3 << 1)], [2, 8], "cannot travel as fp8"),
        ([(BF16, 1, CPU, 3 << 1)], [16], "cannot travel as fp8"),
        ([(BF16, 3, CPU, 1 << 1)], [2, 8, 1], "cannot travel as fold sum"),
        ([(BF16, 2, DEVICE_CODES["meta"], 3 << 1)], [2, 8], "on meta"),
        ([(BF16, 2, CPU, 1 | 3 << 1)], [2, 8], "fp8 and cannot be a TP slice"),
        ([(BF16, 2, CPU, 1 | 2 << 1)], [2, 8], "folded and cannot be a TP slice"),
        ([(BF16, 2, CPU, 1 << 1)], [2, 8], "has 1 and 0"),  # a sum without its residual
        ([(BF16, 2, CPU, 2 << 1)], [2, 8], "has 0 and 1"),
        ([(BF16, 2, CPU, 1 << 1), (BF16, 2, CPU, 2 << 1)], [2, 8, 3, 8], "same dtype, dims"),
        ([(BF16, 2, CPU, 1 << 1), (F32, 2, CPU, 2 << 1)], [2, 8, 2, 8], "same dtype, dims"),
        ([(BF16, 2, CPU, 1 << 1), (BF16, 2, CPU, 4 << 1)], [2, 8, 2, 8], "has 2 and 0"),
    ],
)
def test_wire_code_refusals(table, dims, match) -> None:
    keys = [(f"k{i}", True) for i in range(len(table))]
    with pytest.raises(WireError, match=match):
        decode_schema(_body(keys, table, dims), limits=DEFAULT_LIMITS)


def test_nested_tensors_never_carry_a_wire_code() -> None:
    body = _body([("x", False)], [(BF16, 2, CPU, 3 << 1)], [2, 8], b"\x0f" + bytes(4))
    with pytest.raises(WireError, match="tensor 0 has bad flags 0x6"):
        decode_schema(body, limits=DEFAULT_LIMITS)


def test_fp8_bytes_are_bounded_by_the_limits() -> None:
    """An fp8 key's bytes (codes, padding, scales) exceed its own dtype's span for narrow rows;
    the bound is on what travels."""
    from pipepack.pp.wire.limits import Limits

    body = _body([("a", True)], [(BF16, 2, CPU, 3 << 1)], [100, 1])
    need = align16(100) + 400
    assert decode_schema(body, limits=Limits(max_payload_bytes=need)).tensors[0].wire == 3
    with pytest.raises(WireError, match="out of range"):
        decode_schema(body, limits=Limits(max_payload_bytes=need - 1))


def _hop(d: dict, wire: Wire | None, accept, tp=None, canary_pool: bool = False):
    """What a link does to ``d`` minus the transport (one INLINE head); returns the decoded
    dict, the receive-side holder and the payload bytes."""
    ws = wirepack.WireSend(wire) if wire else None
    if ws is not None and canary_pool:
        get = ws.pool.get
        ws.pool.get = lambda n: get(n).fill_(CANARY)
    enc = codec.encode(
        d,
        allow_pickle=False,
        limits=DEFAULT_LIMITS,
        tp=tp,
        all_gather_tensors=None,
        wire=ws.prepare(d) if ws else None,
    )
    p = enc.parts["cpu"]
    buf = torch.full((p.wire_layout.nbytes,), CANARY, dtype=torch.uint8)
    K.pack(enc.sources["cpu"], out=buf, layout=p.wire_layout)
    head = align16(64 + len(enc.body)) + buf.numel()
    raw = encode_frame(
        Frame(enc.flags | F_INLINE, 0, head, len(enc.body), buf.numel(), 0, None, 1, 0)
    )
    f = decode_frame(raw, capacity=1 << 30, limits=DEFAULT_LIMITS)
    dec = codec.header_parts(f, enc.body, DEFAULT_LIMITS)
    rec = wirepack.WireRecv(accept) if accept is not None else None
    out, post = codec.decode(
        f,
        enc.body,
        dec,
        {"cpu": buf},
        allow_pickle=False,
        limits=DEFAULT_LIMITS,
        tp=None,
        accept_wire=rec,
    )
    assert post == []
    return out, rec, buf, enc


@pytest.mark.parametrize("T", [9, 0])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_codec_round_trip_of_every_option(dtype, T) -> None:
    d = _acts(T, dtype, 1, hidden=200)
    h, r = d["hidden_states"], d["residual"]
    plain_n = _hop(d, None, None)[2].numel()
    for wire, want_h, want_r in [
        (FOLD, h + r, None),
        (FP8, _fp8_roundtrip(h), _fp8_roundtrip(r)),
        (FOLD_FP8, _fp8_roundtrip(h + r), None),
    ]:
        out, rec, buf, _ = _hop(d, wire, wire, canary_pool=True)
        assert Wire.of_hop(rec.wired) == wire
        got = dict(out)
        wirepack.restore(got, rec.wired)
        assert list(got) == list(d)
        _same_bits(got["hidden_states"], want_h, f"{wire} hidden")
        if want_r is None:  # the folded residual: -0.0, so hidden + residual is the sum
            _same_bits(got["residual"], torch.full_like(r, -0.0), f"{wire} residual")
            _same_bits(got["hidden_states"] + got["residual"], want_h, f"{wire} sum")
        else:
            _same_bits(got["residual"], want_r, f"{wire} residual")
        _same_bits(got["positions"], d["positions"], "positions")
        assert got["__msg_type__"] == "proxy"
        # the bytes that travel: the fold halves the activations, fp8 takes 1 + 4/H per element
        act = h.numel() * h.element_size()
        fp8_n = align16(align16(h.numel()) + 4 * h.shape[0])
        want_n = {
            FOLD: plain_n - align16(act),
            FP8: plain_n - 2 * align16(act) + 2 * fp8_n,
            FOLD_FP8: plain_n - 2 * align16(act) + fp8_n,
        }[wire]
        assert buf.numel() == want_n
        for k, desc in rec.wired:  # fp8 padding travels as zeros, never stale buffer bytes
            if desc.wire in wirepack.FP8_CODES:
                blob = out[k]
                pad = blob[h.numel() : align16(h.numel())]
                assert bool((pad == 0).all()), f"{k}: padding bytes {pad.tolist()}"


def test_codec_refuses_coded_hops_without_accept_wire() -> None:
    d = _acts(3, torch.bfloat16, 2, hidden=64)
    with pytest.raises(WireError, match=r"key 'hidden_states' travelled as fold sum .*plain"):
        _hop(d, FOLD, None)
    with pytest.raises(
        WireError,
        match=r"key 'hidden_states' travelled as fp8: the sender's wire options are "
        r"Wire\(fp8=\('hidden_states', 'residual'\)\), this receiver accepts "
        r"Wire\(fold=\('hidden_states', 'residual'\)\)",
    ):
        _hop(d, FP8, FOLD)
    with pytest.raises(WireError, match="fold sum as fp8: .* accepts Wire.fp8=..hidden_states"):
        _hop(d, FOLD_FP8, Wire(fp8=("hidden_states",)))
    with pytest.raises(WireError, match="travelled as fold sum: .* accepts plain tensors only"):
        _hop(d, FOLD, Wire())
    with pytest.raises(
        WireError, match=r"fold sum as fp8: .* accepts Wire\(fold=\('hidden_states'"
    ):
        _hop(d, FOLD_FP8, FOLD)  # the fold is accepted, its fp8 is not
    # a receiver that accepts more than the sender uses takes the hop
    out, rec, _, _ = _hop(d, FOLD, FOLD_FP8)
    assert Wire.of_hop(rec.wired) == FOLD
    out, rec, _, _ = _hop(d, None, FOLD_FP8)
    assert rec.wired == ()


def test_tp_slicing_of_wire_keys() -> None:
    """With an all-gather group the fold sum is sliced like a plain key; the folded residual
    and fp8 keys travel whole."""
    tp = codec.TP(None, 2, 1, "cpu")
    d = _acts(4, torch.bfloat16, 3, hidden=64)
    for wire, sliced in [(FOLD, (True, False, True)), (FOLD_FP8, (False, False, True))]:
        ws = wirepack.WireSend(wire)
        enc = codec.encode(
            d,
            allow_pickle=False,
            limits=DEFAULT_LIMITS,
            tp=tp,
            all_gather_tensors=None,
            wire=ws.prepare(d),
        )
        assert enc.parts["cpu"].sliced == sliced
        s = decode_schema(enc.body, limits=DEFAULT_LIMITS)
        assert [t.sliced for t in s.tensors] == list(sliced)
        if wire is FOLD:  # rank 1's slice of the sum (sliced entries first)
            src = enc.sources["cpu"][0]
            _same_bits(src, (d["hidden_states"] + d["residual"]).reshape(2, -1)[1], "slice")


@pytest.mark.parametrize(
    "kw, exc, match",
    [
        (dict(fold=("a",)), TypeError, "pair of keys"),
        (dict(fold=("a", 1)), TypeError, "pair of keys"),
        (dict(fold=("a", "a")), ValueError, "twice"),
        (dict(fp8="a"), TypeError, "sequence of keys"),
        (dict(fp8=(1,)), TypeError, "must be str"),
        (dict(fp8=("a", "a")), ValueError, "twice"),
    ],
)
def test_wire_option_errors(kw, exc, match) -> None:
    with pytest.raises(exc, match=match):
        Wire(**kw)


def test_a_sender_cannot_quantise_the_folded_residual() -> None:
    both = Wire(fold=("a", "b"), fp8=("a", "b"))  # as a receiver's acceptance: fine
    assert both.accepts("b", hop.WIRE_FP8) and both.accepts("b", hop.WIRE_FOLDED)
    with pytest.raises(ValueError, match="'b' is the folded residual, it does not travel"):
        wirepack.WireSend(both)


@pytest.mark.parametrize(
    "d, exc, match",
    [
        ({"hidden_states": torch.zeros(2, 8)}, ValueError, "'residual': named in"),
        ({"hidden_states": torch.zeros(2, 8), "residual": 3}, TypeError, "needs a tensor"),
        (
            {"hidden_states": torch.zeros(2, 8), "residual": torch.zeros(2, 8, dtype=torch.int32)},
            ValueError,
            "'residual': torch.int32",
        ),
        ({"hidden_states": torch.zeros(8), "residual": torch.zeros(8)}, ValueError, "\\[T, H\\]"),
        (
            {"hidden_states": torch.zeros(2, 8), "residual": torch.zeros(3, 8)},
            ValueError,
            "differ in dtype or shape",
        ),
        (
            {"hidden_states": torch.zeros(2, 8), "residual": torch.zeros(2, 8).half()},
            ValueError,
            "differ in dtype or shape",
        ),
        (
            {"hidden_states": torch.zeros(2, 8, device="meta"), "residual": torch.zeros(2, 8)},
            ValueError,
            "meta",
        ),
        ([torch.zeros(2, 8)], TypeError, "expected a dict"),
    ],
)
def test_sender_refuses_before_anything_is_packed(d, exc, match) -> None:
    with pytest.raises(exc, match=match):
        wirepack.WireSend(FOLD).prepare(d)


# ---------------------------------------------------------------------------------------------
# two processes over gloo
# ---------------------------------------------------------------------------------------------

# (token count, dtype) of the hops: decode sizes, an odd width is not needed (H fixed)
_FOLD_HOPS = [(8, torch.bfloat16), (3, torch.float16), (64, torch.bfloat16), (5, torch.float32)]


def _fold_body(rank: int, world: int, impl: str, transport: str) -> None:
    _use_impl(impl)
    plain = TensorDictChannel(1 - rank, transport=transport)
    folded = TensorDictChannel(1 - rank, wire=FOLD, accept_wire=FOLD, transport=transport)
    try:
        _fold_hops(rank, impl, plain, folded)
    finally:  # a sender gone before its ring hops were mapped takes grown slots with it
        dist.barrier()


def _fold_hops(rank: int, impl: str, plain: TensorDictChannel, folded: TensorDictChannel) -> None:
    hops = list(_FOLD_HOPS)
    if impl == "torch":  # above the head capacity: chunked CPU payload, blocking send from sources
        hops.append((300, torch.bfloat16))
    if rank == 0:
        for i, (T, dtype) in enumerate(hops):
            d = _acts(T, dtype, i)
            for _order in Fz.ORDERS:
                plain.isend(d)
                folded.isend(d)
            folded.send(d)  # for wait()
            folded.isend(d)  # for wait_into
            if T <= 64:
                folded.send(d)  # posted ahead through irecv_posted (vLLM's async shape)
            d["hidden_states"].fill_(7)  # sources may be overwritten once the sends returned
            d["residual"].fill_(7)
        return
    for i, (T, dtype) in enumerate(hops):
        d = _acts(T, dtype, i)
        h, r = d["hidden_states"], d["residual"]
        w = _weight(dtype, i)
        for order in Fz.ORDERS:
            ref = plain.irecv().wait_add_rmsnorm(w, EPS, order=order)
            want_out, want_res = ref["hidden_states"], ref["residual"]
            _same_bits(want_res, h + r, f"T={T} plain residual")
            pending = folded.irecv()
            got = pending.wait_add_rmsnorm(w, EPS, order=order)
            assert pending.wire == FOLD
            assert list(got) == list(d)
            # the fold gives the residual the unfused op stores, in both orders, bit for bit
            _same_bits(got["residual"], want_res, f"T={T} {dtype} {order}: residual")
            if order == "vllm" or dtype == torch.float32:
                _same_bits(got["hidden_states"], want_out, f"T={T} {dtype} {order}: out")
            else:  # normalised from the rounded sum, not the fp32 one: within two ulps
                assert _ulps(got["hidden_states"], want_out) <= 2
                _same_bits(
                    got["hidden_states"], _norm_ref(h + r, None, w, order)[0], "flashinfer out"
                )
            _same_bits(got["positions"], d["positions"], "positions")
        pending = folded.irecv()
        got = pending.wait()
        _same_bits(got["hidden_states"], h + r, f"T={T}: wait() sum")
        _same_bits(got["residual"], torch.full_like(r, -0.0), f"T={T}: wait() residual")
        _same_bits(got["hidden_states"] + got["residual"], h + r, f"T={T}: sum + residual")
        # the op after wait(): the sum and its -0.0 residual lie apart, and still add exactly
        normed = pending.wait_add_rmsnorm(w, EPS)
        _same_bits(normed["residual"], h + r, f"T={T}: residual after wait()")
        want_out = _norm_ref(h + r, None, w, "vllm")[0]
        _same_bits(normed["hidden_states"], want_out, f"T={T}: out after wait()")
        # wait_into: caller-owned, larger, strided destinations
        hb, hv = _canary_dest(T, H, dtype)
        rb, rv = _canary_dest(T, H, dtype, extra=1, pad=24)
        got = folded.irecv().wait_into({"hidden_states": hv, "residual": rv})
        _check_canary(hb, hv, T, h + r, f"T={T} wait_into sum")
        _check_canary(rb, rv, T, torch.full_like(r, -0.0), f"T={T} wait_into residual")
        assert got["hidden_states"].data_ptr() == hv.data_ptr() and got["residual"].shape == (T, H)
        if T <= 64:
            got, handles, post = folded.irecv_posted()
            for hd in handles:
                hd.wait()
            for fn in post:
                fn()
            _same_bits(got["hidden_states"], h + r, "irecv_posted sum")
            _same_bits(got["residual"], torch.full_like(r, -0.0), "irecv_posted residual")


IMPL_TRANSPORTS = (
    [("torch", "dist"), ("triton", "shm")]
    if shm.available()
    else [
        ("torch", "dist"),
        ("triton", "dist"),
    ]
)


@pytest.mark.parametrize("impl, transport", IMPL_TRANSPORTS)
def test_fold_through_the_channel_is_the_unfused_residual(impl: str, transport: str) -> None:
    """Folded hops of decode sizes (and one chunked one) in bf16 / fp16 / fp32: the receiver's
    wait_add_rmsnorm stores the residual the unfused op stores and, in vLLM's order, the same
    output; wait(), wait_into() and irecv_posted() hand out the sum and a -0.0 residual."""
    run_ranks(2, _fold_body, impl, transport, timeout_s=TIMEOUT_S)


_FP8_HOPS = [(8, torch.bfloat16, FP8), (3, torch.float16, FOLD_FP8), (17, torch.float32, FP8)]


def _fp8_body(rank: int, world: int, impl: str, transport: str) -> None:
    _use_impl(impl)
    chans = {
        w: TensorDictChannel(
            1 - rank,
            wire=w,
            accept_wire=FOLD_FP8 if w is FOLD_FP8 else FP8,
            transport=transport,
        )
        for w in (FP8, FOLD_FP8)
    }
    try:
        _fp8_hops(rank, impl, chans)
    finally:
        dist.barrier()


def _fp8_hops(rank: int, impl: str, chans: dict) -> None:
    hops = list(_FP8_HOPS)
    if impl == "torch":
        hops.append((400, torch.bfloat16, FP8))  # 3.2 MiB of activations, 0.8 MiB as fp8
    if rank == 0:
        for i, (T, dtype, wire) in enumerate(hops):
            d = _acts(T, dtype, 50 + i)
            for _ in range(4):
                chans[wire].send(d)
        return
    for i, (T, dtype, wire) in enumerate(hops):
        d = _acts(T, dtype, 50 + i)
        h, r = d["hidden_states"], d["residual"]
        ch = chans[wire]
        w = _weight(dtype, 50 + i)
        ref_buf, ref_wire = Fz.pack_wire_reference(
            [h, r], fold=(0, 1) if wire.fold else None, fp8=(0,) if wire.fold else (0, 1)
        )
        fold = wire.fold is not None
        want_h = _fp8_roundtrip(h + r if fold else h)
        want_r = torch.full_like(r, -0.0) if fold else _fp8_roundtrip(r)
        got = ch.recv()
        _same_bits(got["hidden_states"], want_h, f"T={T} {dtype} hidden")
        _same_bits(got["residual"], want_r, f"T={T} {dtype} residual")
        _same_bits(got["positions"], d["positions"], "positions")
        # the loss stays within e4m3's bound: 2**-4 of an element, 2**-10 of the row amax
        x = (h + r if fold else h).float()
        bound = torch.maximum(x.abs() * 2.0**-4, x.abs().amax(1, keepdim=True) * 2.0**-10)
        bound = bound + x.abs() * 2.0**-7  # the final rounding to bf16 / fp16
        assert bool(((got["hidden_states"].float() - x).abs() <= bound).all())
        hi = ref_wire.entries[0]
        ri = None if fold else ref_wire.entries[1]
        for order in Fz.ORDERS:  # dequantised inside the op: the kernel reference's bits
            got = ch.irecv().wait_add_rmsnorm(w, EPS, order=order)
            want_out, want_res = Fz.unpack_add_rmsnorm_reference(
                ref_buf, ref_wire.layout, hi, ri, w, EPS, order=order
            )
            _same_bits(got["hidden_states"], want_out, f"T={T} {dtype} {order} out")
            _same_bits(got["residual"], want_res, f"T={T} {dtype} {order} residual")
            if fold:  # the new residual is the dequantised sum itself
                _same_bits(got["residual"], want_h, f"T={T} residual is the sum")
        hb, hv = _canary_dest(T, H, dtype)
        rb, rv = _canary_dest(T, H, dtype, extra=2)
        got = ch.irecv().wait_into({"hidden_states": hv, "residual": rv})
        _check_canary(hb, hv, T, want_h, f"T={T} wait_into hidden")
        _check_canary(rb, rv, T, want_r, f"T={T} wait_into residual")


@pytest.mark.parametrize(
    "impl, transport",
    [(i, "shm" if t == "dist" else "dist") for i, t in IMPL_TRANSPORTS]
    if shm.available()
    else IMPL_TRANSPORTS,
)
def test_fp8_through_the_channel(impl: str, transport: str) -> None:
    """fp8 hops (both keys, and the folded sum): wait() gives the reference quantiser's values
    dequantised bit for bit and within e4m3's error bound, wait_add_rmsnorm the kernel
    reference's bits, wait_into writes only the destination rows."""
    run_ranks(2, _fp8_body, impl, transport, timeout_s=TIMEOUT_S)


def _refusal_body(rank: int, world: int, transport: str) -> None:
    kw = dict(transport=transport)
    big = 300  # 2.4 MiB of bf16 per key: over the head capacity, so the hop is chunked on gloo
    if rank == 0:
        plain = TensorDictChannel(1, **kw)
        fold = TensorDictChannel(1, wire=FOLD, **kw)
        fp8 = TensorDictChannel(1, wire=FP8, **kw)
        fold.isend(_acts(big, torch.bfloat16, 1))  # 1: refused, no accept_wire
        plain.isend(_acts(5, torch.bfloat16, 2))  # 2: intact
        fp8.isend(_acts(big, torch.bfloat16, 3))  # 3: refused, fold accepted only
        fold.isend(_acts(6, torch.bfloat16, 4))  # 4: taken
        fold.send(_acts(big, torch.bfloat16, 5))  # 5: refused by the functional API
        send_tensor_dict(_acts(7, torch.bfloat16, 6))  # 6: intact
        fp8.send(_acts(8, torch.bfloat16, 7))  # 7: functional, told to accept fp8
        fold.isend(_acts(big, torch.bfloat16, 8))  # 8: functional async shape, told
        fold.isend(_acts(9, torch.bfloat16, 9))  # 9: a declared receiver
        dist.barrier()
        return
    plain = TensorDictChannel(0, **kw)
    takes_fold = TensorDictChannel(0, accept_wire=FOLD, **kw)
    with pytest.raises(
        WireError,
        match=r"receive #0 from rank 0 refused: key 'hidden_states' travelled as fold sum: the "
        r"sender's wire options are Wire\(fold=\('hidden_states', 'residual'\)\), this "
        r"receiver accepts plain tensors only",
    ):
        plain.recv()
    d = _acts(5, torch.bfloat16, 2)
    got = plain.recv()
    for k in ("hidden_states", "residual", "positions"):
        _same_bits(got[k], d[k], f"hop 2 {k}")
    with pytest.raises(
        WireError,
        match=r"key 'hidden_states' travelled as fp8: the sender's wire options are "
        r"Wire\(fp8=\('hidden_states', 'residual'\)\), this receiver accepts "
        r"Wire\(fold=\('hidden_states', 'residual'\)\)",
    ):
        takes_fold.irecv().wait()
    d = _acts(6, torch.bfloat16, 4)
    got = takes_fold.recv()
    _same_bits(got["hidden_states"], d["hidden_states"] + d["residual"], "hop 4 sum")
    with pytest.raises(WireError, match=r"fold sum .*this receiver takes plain tensors only"):
        recv_tensor_dict()
    d = _acts(7, torch.bfloat16, 6)
    got = recv_tensor_dict()
    for k in ("hidden_states", "residual", "positions"):
        _same_bits(got[k], d[k], f"hop 6 {k}")
    d = _acts(8, torch.bfloat16, 7)
    got = recv_tensor_dict(accept_wire=FP8)
    _same_bits(got["hidden_states"], _fp8_roundtrip(d["hidden_states"]), "hop 7 hidden")
    _same_bits(got["residual"], _fp8_roundtrip(d["residual"]), "hop 7 residual")
    d = _acts(big, torch.bfloat16, 8)
    got, handles, post = irecv_tensor_dict(accept_wire=FOLD_FP8)
    for h in handles:
        h.wait()
    for fn in post:
        fn()
    _same_bits(got["hidden_states"], d["hidden_states"] + d["residual"], "hop 8 sum")
    _same_bits(got["residual"], torch.full_like(d["residual"], -0.0), "hop 8 residual")
    d = _acts(9, torch.bfloat16, 9)
    declared = TensorDictChannel(
        0, declared=Declared.from_example(_acts(1, torch.bfloat16, 0)), accept_wire=FOLD, **kw
    )
    got = declared.irecv(num_tokens=9).wait_add_rmsnorm(_weight(torch.bfloat16, 9), EPS)
    _same_bits(got["residual"], d["hidden_states"] + d["residual"], "hop 9 residual")
    dist.barrier()


@pytest.mark.parametrize("transport", ["dist", "shm"] if shm.available() else ["dist"])
def test_a_refused_wire_option_keeps_the_link_in_step(transport: str) -> None:
    """Hops whose wire options the receiver did not accept are refused, naming the key and
    both sides' options, through a channel and through the functional API (which accepts them
    only when told); every hop after a refused one (chunked on gloo) arrives intact."""
    run_ranks(2, _refusal_body, transport, timeout_s=TIMEOUT_S)


def _tp_body(rank: int, world: int) -> None:
    groups = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    stage, tp_rank = divmod(rank, 2)
    tp = groups[stage]
    wires = [FOLD, FOLD_FP8, FP8]
    accept = Wire(fold=("hidden_states", "residual"), fp8=("hidden_states", "residual"))
    hops = [(8, torch.bfloat16), (5, torch.float16), (64, torch.bfloat16)]
    if stage == 0:
        chans = [
            TensorDictChannel(rank + 2, all_gather_group=tp, wire=w, transport="dist")
            for w in wires
        ]
        for i, (T, dtype) in enumerate(hops):
            for ch in chans:
                ch.isend(_acts(T, dtype, 70 + i))  # for wait_add_rmsnorm
                ch.isend(_acts(T, dtype, 70 + i))  # for wait
        dist.barrier()
        return
    ch = TensorDictChannel(rank - 2, all_gather_group=tp, accept_wire=accept, transport="dist")
    for i, (T, dtype) in enumerate(hops):
        d = _acts(T, dtype, 70 + i)
        h, r = d["hidden_states"], d["residual"]
        w = _weight(dtype, 70 + i)
        for wire in wires:
            fold = wire.fold is not None
            sent_h = h + r if fold else h
            if wire.fp8:
                sent_h = _fp8_roundtrip(sent_h)
            sent_r = None if fold else (_fp8_roundtrip(r) if wire.fp8 else r)
            got = ch.irecv(num_tokens=None).wait_add_rmsnorm(w, EPS)
            want_out, want_res = _norm_ref(sent_h, sent_r, w, "vllm")
            _same_bits(got["hidden_states"], want_out, f"tp {wire} T={T} out")
            _same_bits(got["residual"], want_res, f"tp {wire} T={T} residual")
            _same_bits(got["positions"], d["positions"], "positions")
            got = ch.recv()
            _same_bits(got["hidden_states"], sent_h, f"tp {wire} T={T} hidden")
            want_r = torch.full_like(r, -0.0) if sent_r is None else sent_r
            _same_bits(got["residual"], want_r, f"tp {wire} T={T} residual")
    dist.barrier()


def test_pp2_tp2_fold_sum_is_sliced_and_gathered() -> None:
    """pp2 x tp2: each TP rank sends its slice of the fold sum and the receivers all-gather it;
    fp8 keys and the folded residual travel whole. Results are the unfused op's bits."""
    run_ranks(4, _tp_body, timeout_s=TIMEOUT_S)
