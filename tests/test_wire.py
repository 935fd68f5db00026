"""The wire format (pipepack.pp.wire) and the dict codec (pipepack.pp.codec), without processes.

Three parts, each with round trips, one test per refusal, and fuzzing against a reference:

- the 64-byte frame (``hop.encode_frame`` / ``hop.decode_frame``);
- the header body's schema (``hop.encode_body`` / ``hop.decode_schema``);
- the plain-value codec (``values.encode_value`` / ``values.decode_value``);

then ``codec`` (a dict to body + layouts and back), which ties them together.

The fuzz tests check what an *accepted* input decodes to, not only that nothing but a
``WireError`` escapes: each decoder is compared with a small reference parser written here from
the byte diagrams in ``pp/wire/hop.py`` and ``pp/wire/values.py``. A mutated frame, body or value
must be refused exactly when the reference refuses it, and when accepted decode to what the
reference reads from the same bytes (and, where the encoding is canonical, re-encode to them).
"""

from __future__ import annotations

import enum
import fractions
import math
import os
import struct
from typing import Any

import pytest
import torch
from _checks import decode_encoded
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipepack.kernels import Layout
from pipepack.pp import codec
from pipepack.pp.wire import (
    DEFAULT_LIMITS,
    DEVICE_CODES,
    DTYPE_CODES,
    F_INLINE,
    F_PICKLED,
    F_SLICED,
    FRAME_BYTES,
    MAGIC,
    VERSION,
    Frame,
    Limits,
    TensorDesc,
    WireError,
    align16,
    decode_frame,
    decode_schema,
    decode_value,
    dtype_of_code,
    encode_body,
    encode_frame,
    encode_value,
    hop,
)
from pipepack.pp.wire import values as wv
from pipepack.testing import check_dict, check_plain

F_SWITCH = getattr(hop, "F_SWITCH", None)  # the shared-memory ring's switch frame, where built
CAP = 1 << 16  # the receiver's head capacity in the frame tests
_FUZZ = settings(
    max_examples=int(os.environ.get("PIPEPACK_FUZZ_EXAMPLES", "300")),
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def _same(a: Any, b: Any) -> bool:
    """Equal and of the same type all the way down; floats by their bits; tensors by identity."""
    if isinstance(b, torch.Tensor):
        return a is b
    if type(a) is not type(b):
        return False
    if type(a) is float:
        return struct.pack("<d", a) == struct.pack("<d", b)
    if type(a) in (list, tuple, torch.Size):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if type(a) is dict:
        return len(a) == len(b) and all(
            _same(ka, kb) and _same(a[ka], b[kb]) for ka, kb in zip(a, b)
        )
    return a == b


# =============================================================================================
# frame
# =============================================================================================

_FRAME = struct.Struct("<4sHHQIIQIBBHQQQ")
_FIELD = {
    "magic": (0, "<4s"),
    "version": (4, "<H"),
    "flags": (6, "<H"),
    "seq": (8, "<Q"),
    "head_len": (16, "<I"),
    "body_len": (20, "<I"),
    "cpu_nbytes": (24, "<Q"),
    "chunk_bytes": (32, "<I"),
    "dev": (36, "<B"),
    "r0": (37, "<B"),
    "tp_world": (38, "<H"),
    "dev_nbytes": (40, "<Q"),
    "r1": (48, "<Q"),
    "r2": (56, "<Q"),
}


def _inline_frame(body_len: int = 40, cpu: int = 96, **kw: Any) -> Frame:
    f = dict(
        flags=F_INLINE,
        seq=3,
        head_len=align16(64 + body_len) + cpu,
        body_len=body_len,
        cpu_nbytes=cpu,
        chunk_bytes=0,
        dev_type=None,
        tp_world=1,
        dev_nbytes=0,
    )
    f.update(kw)
    return Frame(**f)


def _chunked_frame(**kw: Any) -> Frame:
    f = dict(
        flags=0,
        seq=9,
        head_len=64 + 100,
        body_len=300,
        cpu_nbytes=10_000,
        chunk_bytes=4096,
        dev_type="cuda",
        tp_world=2,
        dev_nbytes=512,
    )
    f.update(kw)
    return Frame(**f)


def _patch(data: bytes, field: str, value: Any) -> bytes:
    off, fmt = _FIELD[field]
    b = bytearray(data)
    struct.pack_into(fmt, b, off, value)
    return bytes(b)


def _ref_frame(data: bytes, capacity: int, limits: Limits) -> tuple | None:
    """The frame rules of hop.py's docstring, written out again: the fields, or None (refused)."""
    if len(data) < 64:
        return None
    (magic, version, flags, seq, head_len, body_len, cpu, chunk, dev, r0, tp, dev_n, r1, r2) = (
        _FRAME.unpack_from(data)
    )
    names = {1: "cuda", 3: "xpu", 4: "hpu", 5: "mps"}
    known = 7 | (F_SWITCH or 0)
    ok = (
        magic == b"PPK2"
        and version == 2
        and flags & ~known == 0
        and r0 == r1 == r2 == 0
        and 64 <= head_len <= capacity
        and body_len <= limits.max_header_bytes
        and cpu <= limits.max_payload_bytes
        and dev_n <= limits.max_payload_bytes
        and (dev in names if dev else dev_n == 0)
        and tp >= 1
    )
    if not ok:
        return None
    if F_SWITCH and flags & F_SWITCH:  # a bare frame: nothing else set
        if (flags, head_len, body_len, cpu, chunk, dev, dev_n, tp) != (
            F_SWITCH,
            64,
            0,
            0,
            0,
            0,
            0,
            1,
        ):
            return None
    elif flags & 1:
        if head_len != (64 + body_len + 15) // 16 * 16 + cpu or chunk:
            return None
    else:
        if head_len - 64 > body_len:
            return None
        if cpu and (chunk < 4096 or chunk % 16 or math.ceil(cpu / chunk) > 1 << 20):
            return None
        if not cpu and chunk:
            return None
    return (flags, seq, head_len, body_len, cpu, chunk, names.get(dev), tp, dev_n)


def _fields(f: Frame) -> tuple:
    return (
        f.flags,
        f.seq,
        f.head_len,
        f.body_len,
        f.cpu_nbytes,
        f.chunk_bytes,
        f.dev_type,
        f.tp_world,
        f.dev_nbytes,
    )


@st.composite
def _valid_frames(draw: Any) -> Frame:
    inline = draw(st.booleans())
    body_len = draw(st.integers(0, 5000))
    flags = draw(st.sampled_from([0, F_PICKLED, F_SLICED, F_PICKLED | F_SLICED]))
    dev = draw(st.sampled_from([None, "cuda", "xpu", "hpu", "mps"]))
    dev_n = draw(st.integers(0, DEFAULT_LIMITS.max_payload_bytes)) if dev else 0
    seq = draw(st.integers(0, (1 << 64) - 1))
    tp = draw(st.integers(1, 0xFFFF))
    if inline:
        cpu = draw(st.integers(0, 4096))
        head = align16(64 + body_len) + cpu
        return Frame(flags | F_INLINE, seq, head, body_len, cpu, 0, dev, tp, dev_n)
    head = 64 + draw(st.integers(0, body_len))
    cpu = draw(st.integers(0, DEFAULT_LIMITS.max_payload_bytes))
    chunk = 0
    if cpu:
        lo = max(4096, -(-cpu // (1 << 20)))
        chunk = align16(draw(st.integers(lo, 1 << 31)))
    return Frame(flags, seq, head, body_len, cpu, chunk, dev, tp, dev_n)


@_FUZZ
@given(_valid_frames())
def test_frame_round_trips_every_field(f: Frame) -> None:
    data = encode_frame(f)
    assert len(data) == FRAME_BYTES == 64 and data[:4] == MAGIC
    got = decode_frame(data + b"trailing bytes are the body", capacity=CAP, limits=DEFAULT_LIMITS)
    assert got == f
    assert _ref_frame(data, CAP, DEFAULT_LIMITS) == _fields(f)


def test_frame_byte_layout_matches_the_diagram() -> None:
    f = Frame(F_SLICED, 0x0102030405060708, 0x200, 0x1F0, 0x1234, 0x1000, "xpu", 4, 0x77)
    data = encode_frame(f)
    assert data[0:4] == b"PPK2" and data[4:6] == b"\x02\x00" and data[6:8] == b"\x04\x00"
    assert data[8:16] == bytes([8, 7, 6, 5, 4, 3, 2, 1])
    assert data[16:20] == b"\x00\x02\x00\x00" and data[20:24] == b"\xf0\x01\x00\x00"
    assert data[24:32] == struct.pack("<Q", 0x1234) and data[32:36] == b"\x00\x10\x00\x00"
    assert data[36] == DEVICE_CODES["xpu"] == 3 and data[37] == 0
    assert data[38:40] == b"\x04\x00" and data[40:48] == struct.pack("<Q", 0x77)
    assert data[48:] == bytes(16)
    assert VERSION == 2 and (F_INLINE, F_PICKLED, F_SLICED) == (1, 2, 4)


def test_frame_derived_positions() -> None:
    f = _inline_frame(body_len=40, cpu=96)
    assert f.inline and f.body_in_head == 40 and f.cpu_offset == 112 and f.cpu_chunks() == []
    g = _chunked_frame()
    assert not g.inline and g.body_in_head == 100
    assert g.cpu_chunks() == [(0, 4096), (4096, 8192), (8192, 10_000)]
    assert _chunked_frame(cpu_nbytes=8192).cpu_chunks() == [(0, 4096), (4096, 8192)]
    assert _chunked_frame(cpu_nbytes=0, chunk_bytes=0).cpu_chunks() == []
    assert _inline_frame(body_len=48, cpu=0).cpu_offset == 112
    assert _inline_frame(body_len=49, cpu=0).cpu_offset == 128


_INLINE = encode_frame(_inline_frame())
_CHUNKED = encode_frame(_chunked_frame())
_LIM = DEFAULT_LIMITS


@pytest.mark.parametrize(
    "data, match",
    [
        (_INLINE[:63], "frame: 63 bytes"),
        (_patch(_INLINE, "magic", b"PPK1"), "magic"),
        (_patch(_INLINE, "version", 1), "wire version 1"),
        (_patch(_INLINE, "version", 3), "wire version 3"),
        (_patch(_INLINE, "flags", F_INLINE | 0x10), "unknown flags 0x11"),
        (_patch(_INLINE, "flags", F_INLINE | 0x8000), "unknown flags"),
        (_patch(_INLINE, "r0", 1), "reserved"),
        (_patch(_INLINE, "r1", 1), "reserved"),
        (_patch(_INLINE, "r2", 1 << 63), "reserved"),
        (_patch(_CHUNKED, "head_len", 63), "head_len 63 outside"),
        (_patch(_CHUNKED, "head_len", 0), "head_len 0 outside"),
        (_patch(_CHUNKED, "head_len", CAP + 1), f"head_len {CAP + 1} outside .*{CAP}"),
        (_patch(_CHUNKED, "body_len", _LIM.max_header_bytes + 1), "exceeds the limit"),
        (_patch(_CHUNKED, "cpu_nbytes", _LIM.max_payload_bytes + 1), "cpu_nbytes .* exceeds"),
        (_patch(_CHUNKED, "dev_nbytes", _LIM.max_payload_bytes + 1), "dev_nbytes .* exceeds"),
        (_patch(_CHUNKED, "dev", 2), "unknown accelerator device code 2"),  # meta
        (_patch(_CHUNKED, "dev", 6), "unknown accelerator device code 6"),
        (_patch(_CHUNKED, "dev", 255), "device code 255"),
        (_patch(_CHUNKED, "dev", 0), "512 device payload bytes without a device type"),
        (_patch(_CHUNKED, "tp_world", 0), "tp_world 0"),
        (_patch(_INLINE, "head_len", 64 + 48 + 96 + 16), "INLINE head_len"),
        (_patch(_INLINE, "head_len", 64 + 48 + 95), "INLINE head_len"),
        (_patch(_INLINE, "chunk_bytes", 4096), "INLINE head_len"),
        (_patch(_INLINE, "cpu_nbytes", 97), "INLINE head_len"),
        (_patch(_CHUNKED, "head_len", 64 + 301), "longer than frame \\+ body"),
        (_patch(_CHUNKED, "chunk_bytes", 4080), "chunk_bytes 4080"),
        (_patch(_CHUNKED, "chunk_bytes", 4104), "chunk_bytes 4104"),
        (_patch(_CHUNKED, "chunk_bytes", 0), "chunk_bytes 0"),
        (
            _patch(_patch(_CHUNKED, "cpu_nbytes", (1 << 20) * 4096 + 1), "chunk_bytes", 4096),
            "chunk_bytes 4096 for a payload",
        ),
        (_patch(_patch(_CHUNKED, "cpu_nbytes", 0), "chunk_bytes", 16), "without a CPU payload"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_frame_refusals(data: bytes, match: str) -> None:
    with pytest.raises(WireError, match=match) as e:
        decode_frame(data, capacity=CAP, limits=DEFAULT_LIMITS)
    assert str(e.value).startswith("frame: ")  # the link prefixes peer and step
    assert _ref_frame(data, CAP, DEFAULT_LIMITS) is None


@pytest.mark.parametrize(
    "data",
    [
        _patch(_CHUNKED, "head_len", 64),  # the smallest head
        _patch(_patch(_CHUNKED, "head_len", CAP), "body_len", CAP),  # the head fills the capacity
        _patch(_CHUNKED, "head_len", 64 + 300),  # the whole body in the head
        _patch(_CHUNKED, "body_len", _LIM.max_header_bytes),
        _patch(_patch(_CHUNKED, "cpu_nbytes", _LIM.max_payload_bytes), "chunk_bytes", 1 << 16),
        _patch(_CHUNKED, "dev_nbytes", _LIM.max_payload_bytes),
        _patch(
            _patch(_CHUNKED, "cpu_nbytes", (1 << 20) * 4096), "chunk_bytes", 4096
        ),  # 2**20 chunks
        _patch(_CHUNKED, "chunk_bytes", 1 << 31),  # one chunk larger than the payload
        _patch(_patch(_CHUNKED, "dev", 0), "dev_nbytes", 0),
        _patch(_patch(_CHUNKED, "cpu_nbytes", 0), "chunk_bytes", 0),
        _patch(_CHUNKED, "tp_world", 1),
        _patch(_INLINE, "flags", F_INLINE | F_PICKLED | F_SLICED),
        _patch(_patch(_INLINE, "cpu_nbytes", 0), "head_len", 64 + 48),
        _patch(_CHUNKED, "seq", (1 << 64) - 1),
    ]
    + [_patch(_CHUNKED, "dev", c) for c in (1, 3, 4, 5)],
)
def test_frame_limits_are_inclusive(data: bytes) -> None:
    f = decode_frame(data, capacity=CAP, limits=DEFAULT_LIMITS)
    assert _fields(f) == _ref_frame(data, CAP, DEFAULT_LIMITS)
    assert encode_frame(f) == data[:64]


def test_frame_checks_the_receivers_own_limits() -> None:
    lim = Limits(max_payload_bytes=9_999)
    with pytest.raises(WireError, match="cpu_nbytes 10000 exceeds max_payload_bytes=9999"):
        decode_frame(_CHUNKED, capacity=CAP, limits=lim)
    small = Limits(max_entries=0, max_key_bytes=0, max_ndim=0, max_plain_bytes=299 - 64)
    assert small.max_header_bytes == 299
    with pytest.raises(WireError, match="header body of 300 bytes exceeds the limit 299"):
        decode_frame(
            _patch(_CHUNKED, "dev_nbytes", 0),
            capacity=CAP,
            limits=Limits(
                max_payload_bytes=1 << 20,
                max_entries=0,
                max_key_bytes=0,
                max_ndim=0,
                max_plain_bytes=299 - 64,
            ),
        )
    with pytest.raises(WireError, match="outside \\[64, 163\\]"):
        decode_frame(_CHUNKED, capacity=100 + 63, limits=DEFAULT_LIMITS)
    assert decode_frame(_CHUNKED, capacity=164, limits=DEFAULT_LIMITS).head_len == 164


_FRAME_BASES = [
    _INLINE,
    _CHUNKED,
    encode_frame(_chunked_frame(cpu_nbytes=0, chunk_bytes=0, dev_type=None, dev_nbytes=0)),
]
if F_SWITCH:
    _FRAME_BASES.append(encode_frame(Frame(F_SWITCH, 5, 64, 0, 0, 0, None, 1, 0)))


@pytest.mark.skipif(F_SWITCH is None, reason="this build has no switch frame")
@pytest.mark.parametrize(
    "field, value",
    [
        ("flags", 9),
        ("flags", 8 | 2),
        ("head_len", 80),
        ("body_len", 1),
        ("cpu_nbytes", 16),
        ("chunk_bytes", 4096),
        ("dev", 1),
        ("tp_world", 2),
    ],
)
def test_switch_frame_carries_nothing_else(field: str, value: int) -> None:
    bare = encode_frame(Frame(F_SWITCH, 5, 64, 0, 0, 0, None, 1, 0))
    f = decode_frame(bare, capacity=CAP, limits=DEFAULT_LIMITS)
    assert f.flags == F_SWITCH and f.seq == 5
    bad = _patch(bare, field, value)
    with pytest.raises(WireError):
        decode_frame(bad, capacity=CAP, limits=DEFAULT_LIMITS)
    assert _ref_frame(bad, CAP, DEFAULT_LIMITS) is None


@_FUZZ
@given(
    st.sampled_from(range(len(_FRAME_BASES))),
    st.integers(0, 63),
    st.sampled_from([1, 1, 2, 4, 8]),
    st.integers(0, (1 << 64) - 1),
    st.sampled_from([CAP, 164, 1 << 32]),
)
def test_fuzz_mutated_frames_decode_exactly_as_the_reference(
    base: int, pos: int, width: int, value: int, cap: int
) -> None:
    data = bytearray(_FRAME_BASES[base])
    pos = min(pos, 64 - width)
    data[pos : pos + width] = (value & ((1 << (8 * width)) - 1)).to_bytes(width, "little")
    data = bytes(data)
    want = _ref_frame(data, cap, DEFAULT_LIMITS)
    try:
        got = decode_frame(data, capacity=cap, limits=DEFAULT_LIMITS)
    except WireError:
        assert want is None, f"refused a frame the rules accept: {want}"
        return
    assert want is not None, f"accepted a frame the rules refuse: {got}"
    assert _fields(got) == want
    assert encode_frame(got) == data  # every frame field is canonical


# =============================================================================================
# header body: keys, kinds, tensor table, dims
# =============================================================================================


def _body(
    keys: list[tuple[str | bytes, bool]],
    tensors: list[tuple[int, int, int, int]],
    dims: list[int],
    values: bytes = b"",
) -> bytes:
    kb = [k.encode() if isinstance(k, str) else k for k, _ in keys]
    return encode_body(kb, [t for _, t in keys], tensors, dims, values)


F32, BF16, I64 = DTYPE_CODES[torch.float32], DTYPE_CODES[torch.bfloat16], DTYPE_CODES[torch.int64]
CPU, CUDA = DEVICE_CODES["cpu"], DEVICE_CODES["cuda"]


def test_body_byte_layout_matches_the_diagram() -> None:
    b = _body([("h", True), ("v", False)], [(BF16, 2, CUDA, 1), (F32, 0, CPU, 0)], [7, 64], b"\x01")
    assert b == (
        b"\x02\x00\x02\x00\x01\x00\x00\x00"
        + b"\x01\x00h\x01"
        + b"\x01\x00v\x00"
        + bytes([BF16, 2, CUDA, 1, F32, 0, CPU, 0])
        + struct.pack("<2q", 7, 64)
        + b"\x01"
    )
    s = decode_schema(b, limits=DEFAULT_LIMITS)
    assert s.keys == ("h", "v") and s.is_tensor == (True, False)
    assert s.tensors == (
        TensorDesc(torch.bfloat16, (7, 64), "cuda", True),
        TensorDesc(torch.float32, (), "cpu", False),
    )
    assert s.values_at == len(b) - 1 and s.values_len == 1


def test_every_dtype_code_round_trips_and_codes_are_stable() -> None:
    # append-only table: a renumbered code would make peers of two builds disagree
    pinned = {
        torch.bool: 1,
        torch.uint8: 2,
        torch.int8: 3,
        torch.int16: 4,
        torch.int32: 5,
        torch.int64: 6,
        torch.float16: 10,
        torch.bfloat16: 11,
        torch.float32: 12,
        torch.float64: 13,
        torch.complex64: 15,
        torch.complex128: 16,
        torch.float8_e4m3fn: 17,
        torch.float8_e5m2: 18,
    }
    for dt, code in pinned.items():
        assert DTYPE_CODES[dt] == code and dtype_of_code(code) is dt
    assert len(set(DTYPE_CODES.values())) == len(DTYPE_CODES)
    assert dtype_of_code(0) is None and dtype_of_code(21) is None and dtype_of_code(255) is None
    tens = [(code, 1, CPU, 0) for code in DTYPE_CODES.values()]
    keys = [(f"t{i}", True) for i in range(len(tens))]
    s = decode_schema(_body(keys, tens, [3] * len(tens)), limits=DEFAULT_LIMITS)
    assert [t.dtype for t in s.tensors] == list(DTYPE_CODES)


def test_every_device_code_round_trips() -> None:
    for name, code in DEVICE_CODES.items():
        s = decode_schema(_body([("x", True)], [(F32, 1, code, 0)], [2]), limits=DEFAULT_LIMITS)
        assert s.tensors[0].device_type == name


def test_body_accepts_utf8_keys_and_nested_tensor_entries() -> None:
    b = _body(
        [("héllo ☃", True), ("", False)],
        [(F32, 1, CPU, 1), (I64, 2, CPU, 0)],
        [4, 2, 3],
        b"\x0f\x00\x00\x00\x00",
    )
    s = decode_schema(b, limits=DEFAULT_LIMITS)
    assert s.keys == ("héllo ☃", "") and len(s.tensors) == 2
    assert s.tensors[1] == TensorDesc(torch.int64, (2, 3), "cpu", False)


def test_sizes_at_the_limits_are_accepted() -> None:
    lim = Limits(max_entries=4, max_key_bytes=4, max_ndim=2, max_payload_bytes=4 * 6)
    b = _body([("kkkk", True), ("k", True)], [(F32, 2, CPU, 0), (F32, 0, CPU, 0)], [2, 3])
    s = decode_schema(b, limits=lim)
    assert s.keys == ("kkkk", "k") and s.tensors[0].shape == (2, 3)


def _tensor_body(dims: list[int], code: int = F32, ndim: int | None = None) -> bytes:
    return _body([("x", True)], [(code, len(dims) if ndim is None else ndim, CPU, 0)], dims)


@pytest.mark.parametrize(
    "body, limits, match",
    [
        (b"", _LIM, "truncated"),
        (b"\x01\x00\x00\x00\x00\x00\x00", _LIM, "truncated"),
        (_body([("a", False)] * 2, [], []), _LIM, "duplicate keys"),
        (_body([(b"\xff\xfe", False)], [], []), _LIM, "not valid utf-8"),
        (_body([("k" * 5, False)], [], []), Limits(max_key_bytes=4), "key of 5 bytes"),
        (
            _body([(f"k{i}", False) for i in range(3)], [], []),
            Limits(max_entries=2),
            "3 keys and 0 tensors exceed max_entries=2",
        ),
        (
            _body([("k", True)], [(F32, 1, CPU, 0)] * 2, [1, 1]),
            Limits(max_entries=2),
            "1 keys and 2 tensors",
        ),
        (_body([("k", True)], [(F32, 3, CPU, 0)], [1, 1, 1]), Limits(max_ndim=2), "max_ndim=2"),
        (
            _body([("a", True), ("b", True)], [(F32, 1, CPU, 0)], [1]),
            _LIM,
            "2 tensor keys but a tensor table of 1",
        ),
        (_tensor_body([2], code=0), _LIM, "unknown dtype code 0"),
        (_tensor_body([2], code=99), _LIM, "unknown dtype code 99"),
        (_body([("x", True)], [(F32, 1, 6, 0)], [2]), _LIM, "unknown device code 6"),
        (_body([("x", True)], [(F32, 1, CPU, 0x20)], [2]), _LIM, "bad flags 0x20"),
        (_body([("x", True)], [(F32, 1, CPU, 0x81)], [2]), _LIM, "bad flags 0x81"),
        (_body([("x", True)], [(F32, 1, CPU, 2)], [2]), _LIM, "cannot travel as fold sum"),
        (_body([("x", True)], [(F32, 2, CPU, 5 << 1)], [2, 2]), _LIM, "unknown wire code 5"),
        (
            _body([("x", False)], [(F32, 1, CPU, 1)], [2], b"\x0f" + bytes(4)),
            _LIM,
            "tensor 0 has bad flags 0x1",
        ),  # only top-level tensors may be sliced
        (_tensor_body([-1]), _LIM, "negative dim"),
        (_tensor_body([3, -(1 << 63)]), _LIM, "negative dim"),
        (_tensor_body([1 << 20, 1 << 20]), Limits(max_payload_bytes=(4 << 40) - 1), "out of range"),
        (_tensor_body([0, 1 << 40]), Limits(max_payload_bytes=1 << 40), "out of range"),  # empty
        (_tensor_body([1 << 62, 1 << 62, 0]), _LIM, "out of range"),  # empty, strides overflow
        (_tensor_body([2, 3], ndim=3), _LIM, "truncated"),
        (_tensor_body([2, 3])[:-1], _LIM, "truncated"),
        (_tensor_body([2]) + b"\x00", _LIM, "body of .* bytes, its fields need"),
        (_body([("v", False)], [], [], b"\x01")[:-1], _LIM, "its fields need"),
        (_body([("k", False)], [], [])[:10], _LIM, "truncated"),  # key bytes cut
        (b"\x01\x00\x00\x00\x00\x00\x00\x00\x01\x00k\x02", _LIM, "unknown kind 2"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_body_refusals(body: bytes, limits: Limits, match: str) -> None:
    with pytest.raises(WireError, match=match) as e:
        decode_schema(body, limits=limits)
    assert str(e.value).startswith("header: ")
    assert _ref_schema(body, limits) is None


def test_dim_span_bound_is_exact() -> None:
    lim = Limits(max_payload_bytes=4 * 1000)
    assert decode_schema(_tensor_body([10, 100]), limits=lim).tensors[0].shape == (10, 100)
    assert decode_schema(_tensor_body([0, 1000]), limits=lim).tensors[0].shape == (0, 1000)
    with pytest.raises(WireError, match="out of range"):
        decode_schema(_tensor_body([10, 100, 1]), limits=Limits(max_payload_bytes=3999))
    with pytest.raises(WireError, match="out of range"):
        decode_schema(_tensor_body([0, 1001]), limits=lim)
    # each tensor is bounded on its own; the payload total is bounded by the frame
    two = _body([("a", True), ("b", True)], [(F32, 1, CPU, 0)] * 2, [1000, 1000])
    assert len(decode_schema(two, limits=lim).tensors) == 2


def _ref_schema(body: bytes, limits: Limits) -> tuple | None:
    """The body rules of hop.py's docstring, written out again: the fields, or None."""
    try:
        n_keys, n_tensors, values_len = struct.unpack_from("<HHI", body, 0)
        if n_keys + n_tensors > limits.max_entries:
            return None
        pos, keys, kinds = 8, [], []
        for _ in range(n_keys):
            (n,) = struct.unpack_from("<H", body, pos)
            if n > limits.max_key_bytes or pos + 2 + n + 1 > len(body):
                return None
            keys.append(body[pos + 2 : pos + 2 + n].decode("utf-8"))
            if body[pos + 2 + n] not in (0, 1):
                return None
            kinds.append(body[pos + 2 + n] == 1)
            pos += n + 3
        table = [struct.unpack_from("<BBBB", body, pos + 4 * i) for i in range(n_tensors)]
        pos += 4 * n_tensors
        shapes = []
        for _code, ndim, _dev, _flags in table:
            if ndim > limits.max_ndim:
                return None
            shapes.append(struct.unpack_from(f"<{ndim}q", body, pos))
            pos += 8 * ndim
    except (struct.error, UnicodeDecodeError):
        return None
    n_top = sum(kinds)
    if len(set(keys)) != n_keys or n_top > n_tensors or pos + values_len != len(body):
        return None
    devs = {v: k for k, v in DEVICE_CODES.items()}
    tensors = []
    for i, ((code, _, dev, flags), shape) in enumerate(zip(table, shapes)):
        dt = dtype_of_code(code)
        if dt is None or dev not in devs or flags >= 0x20 or (flags and i >= n_top):
            return None
        sliced, wire = bool(flags & 1), flags >> 1
        if wire > 4:
            return None
        if wire and (
            dt not in (torch.bfloat16, torch.float16, torch.float32)
            or len(shape) != 2
            or devs[dev] == "meta"
            or (sliced and wire not in (0, 1))
        ):
            return None
        if any(d < 0 for d in shape):
            return None
        span = dt.itemsize * math.prod(max(d, 1) for d in shape)
        if wire in (3, 4):  # codes, padding to 16, fp32 row scales
            span = max(span, -(-shape[0] * shape[1] // 16) * 16 + 4 * shape[0])
        if span > limits.max_payload_bytes:
            return None
        tensors.append(TensorDesc(dt, tuple(shape), devs[dev], sliced, wire))
    sums = [(t.dtype, t.shape, t.device_type) for t in tensors if t.wire in (1, 4)]
    folded = [(t.dtype, t.shape, t.device_type) for t in tensors if t.wire == 2]
    if (sums or folded) and (len(sums), len(folded)) != (1, 1) or sums != folded:
        return None
    return tuple(keys), tuple(kinds), tuple(tensors), pos, values_len


def _schema_fields(s: hop.Schema) -> tuple:
    return s.keys, s.is_tensor, s.tensors, s.values_at, s.values_len


def _reencode_body(s: hop.Schema, body: bytes) -> bytes:
    descs = [
        (DTYPE_CODES[t.dtype], len(t.shape), DEVICE_CODES[t.device_type], t.sliced | t.wire << 1)
        for t in s.tensors
    ]
    dims = [d for t in s.tensors for d in t.shape]
    return encode_body([k.encode() for k in s.keys], s.is_tensor, descs, dims, body[s.values_at :])


_FUZZ_LIM = Limits(
    max_payload_bytes=1 << 20,
    max_entries=8,
    max_ndim=4,
    max_key_bytes=8,
    max_items=64,
    max_depth=6,
    max_plain_bytes=1 << 12,
)
_BODY_BASES = [
    _body(
        [("h", True), ("v", False), ("p", True)],
        [(BF16, 2, CPU, 1), (I64, 1, CUDA, 0), (F32, 0, CPU, 0)],
        [3, 8, 5],
        b"\x0f\x00\x00\x00\x00",
    ),
    _body([("ké", True)], [(DTYPE_CODES[torch.bool], 3, CPU, 0)], [0, 7, 1]),
    _body([("a", False), ("bb", False)], [], [], b"\x01\x03"),
    _body(  # wire codes: a sliced fold sum, its folded residual, an fp8 key
        [("h", True), ("r", True), ("q", True)],
        [(BF16, 2, CPU, 1 | 1 << 1), (BF16, 2, CPU, 2 << 1), (F32, 2, CPU, 3 << 1)],
        [3, 8, 3, 8, 2, 8],
    ),
]


@_FUZZ
@given(
    st.sampled_from(range(len(_BODY_BASES))),
    st.integers(0, 200),
    st.sampled_from([1, 1, 1, 2, 8]),
    st.integers(0, (1 << 64) - 1),
    st.sampled_from(["overwrite", "insert", "delete"]),
)
def test_fuzz_mutated_bodies_decode_exactly_as_the_reference(
    base: int, pos: int, width: int, value: int, how: str
) -> None:
    data = bytearray(_BODY_BASES[base])
    pos %= len(data) + 1
    new = (value & ((1 << (8 * width)) - 1)).to_bytes(width, "little")
    if how == "overwrite":
        data[pos : pos + width] = new[: max(0, len(data) - pos)]
    elif how == "insert":
        data[pos:pos] = new
    else:
        del data[pos : pos + width]
    data = bytes(data)
    want = _ref_schema(data, _FUZZ_LIM)
    try:
        got = decode_schema(data, limits=_FUZZ_LIM)
    except WireError:
        assert want is None, f"refused a body the rules accept: {want}"
        return
    assert want is not None, f"accepted a body the rules refuse: {got}"
    assert _schema_fields(got) == want
    assert _reencode_body(got, data) == data


@_FUZZ
@given(st.sampled_from(range(len(_BODY_BASES))), st.integers(0, 200))
def test_fuzz_cut_bodies_decode_exactly_as_the_reference(base: int, cut: int) -> None:
    for data in (_BODY_BASES[base][: cut % len(_BODY_BASES[base])],):
        want = _ref_schema(data, _FUZZ_LIM)
        try:
            got = decode_schema(data, limits=_FUZZ_LIM)
        except WireError:
            assert want is None
            continue
        assert want is not None and _schema_fields(got) == want


@_FUZZ
@given(st.binary(max_size=120))
def test_fuzz_random_bodies_decode_exactly_as_the_reference(data: bytes) -> None:
    want = _ref_schema(data, _FUZZ_LIM)
    try:
        got = decode_schema(data, limits=_FUZZ_LIM)
    except WireError:
        assert want is None
        return
    assert want is not None and _schema_fields(got) == want


# =============================================================================================
# plain values
# =============================================================================================


def _enc(
    v: Any, *, allow_pickle: bool = False, max_depth: int = 32, tensors: list | None = None
) -> tuple[bytes, int, bool]:
    return encode_value(
        v,
        [] if tensors is None else tensors,
        key="k",
        allow_pickle=allow_pickle,
        max_depth=max_depth,
    )


def _dec(
    b: bytes,
    *,
    items: int = 1 << 20,
    max_depth: int = 32,
    allow_pickle: bool = False,
    tensors: list | None = None,
    first: int = 0,
) -> tuple[Any, int, int, int]:
    ts = tensors or []
    return decode_value(
        b,
        0,
        items=items,
        max_depth=max_depth,
        allow_pickle=allow_pickle,
        tensor=lambda i: ts[i],
        first_tensor=first,
    )


def _rt(v: Any, allow_pickle: bool = False) -> Any:
    """Round trip; also checks the encoder's and decoder's item counts and tensor numbering."""
    tensors: list[torch.Tensor] = []
    b, items, _ = _enc(v, allow_pickle=allow_pickle, tensors=tensors)
    out, end, left, nxt = _dec(b, allow_pickle=allow_pickle, tensors=tensors)
    assert end == len(b) and nxt == len(tensors) and left == (1 << 20) - items
    return out


PLAIN_VALUES = [
    None,
    True,
    False,
    0,
    1,
    -1,
    2**63 - 1,
    -(2**63),
    2**63,
    -(2**63) - 1,
    2**200 + 12345,
    -(2**521),
    255,
    -256,
    1.5,
    -0.0,
    float("inf"),
    float("-inf"),
    5e-324,
    "",
    "héllo ☃ 𝄞 \x00",
    "\ud800",
    b"",
    b"\x00\xff" * 10,
    [],
    (),
    {},
    [[]],
    ((),),
    [1, (2, [3, {"k": (4,)}]), {5: None}],
    {1: "a", (1, 2): [None], "s": {}, None: False, 2.5: b"x", False: 0, b"b": ()},
    torch.float32,
    torch.bfloat16,
    torch.float8_e4m3fn,
    torch.bool,
    torch.Size([2, 3, 4]),
    torch.Size([]),
    torch.Size([0, 2**62]),
    [torch.Size([0]), torch.int8],
    [None, 1, 2.5, 2**64, "s", True],
    (None, -1, -2.5),
]


@pytest.mark.parametrize("value", PLAIN_VALUES, ids=lambda v: type(v).__name__)
def test_every_plain_type_round_trips_with_its_exact_type(value: Any) -> None:
    out = _rt(value)
    assert _same(out, value), (out, value)
    assert _ref_value(_enc(value)[0], 0, _RefBudget(1 << 20, 32, 0))[1] >= 0


def test_float_bits_are_exact_nan_payloads_and_negative_zero() -> None:
    for bits in (
        0x7FF8_0000_0000_0123,
        0xFFF8_0000_0000_0001,
        0x7FF0_0000_0000_0001,
        0x8000_0000_0000_0000,
        1,
    ):
        x = struct.unpack("<d", struct.pack("<Q", bits))[0]
        for v in (x, [x], {"k": (x,)}):
            out = _rt(v)
            got = out if type(out) is float else (out[0] if type(out) is list else out["k"][0])
            assert struct.pack("<d", got) == struct.pack("<Q", bits)


def test_value_byte_layout_matches_the_diagram() -> None:
    assert _enc(None)[0] == b"\x01" and _enc(False)[0] == b"\x02" and _enc(True)[0] == b"\x03"
    assert _enc(-2)[0] == b"\x04" + struct.pack("<q", -2)
    assert _enc(2**63)[0] == b"\x05\x09\x00\x00\x00" + (2**63).to_bytes(9, "little", signed=True)
    assert _enc(-(2**63) - 1)[0][:5] == b"\x05\x09\x00\x00\x00"
    assert _enc(1.5)[0] == b"\x06" + struct.pack("<d", 1.5)
    assert _enc("é")[0] == b"\x07\x02\x00\x00\x00\xc3\xa9"
    assert _enc(bytearray(b"ab"))[0] == b"\x08\x02\x00\x00\x00ab"
    assert _enc([None, 7])[0] == b"\x09\x02\x00\x00\x00\x01\x04" + struct.pack("<q", 7)
    assert _enc((True,))[0] == b"\x0a\x01\x00\x00\x00\x03"
    assert _enc({None: 1.0})[0] == b"\x0b\x01\x00\x00\x00\x01\x06" + struct.pack("<d", 1.0)
    assert _enc(torch.float32)[0] == bytes([12, DTYPE_CODES[torch.float32]])
    assert _enc(torch.Size([3, 4]))[0] == b"\x0d\x02\x00\x00\x00" + struct.pack("<2q", 3, 4)
    t = torch.zeros(1)
    ts: list[torch.Tensor] = [torch.ones(1)]
    assert _enc([t], tensors=ts)[0] == b"\x09\x01\x00\x00\x00\x0f\x01\x00\x00\x00"
    assert ts[1] is t


def test_item_counts_of_the_encoder() -> None:
    assert _enc([1, 2, 3])[1] == 3 and _enc({1: 2})[1] == 2 and _enc([[1], (2, 3)])[1] == 5
    assert _enc(torch.Size([1, 2, 3]))[1] == 3  # Size dims count toward max_items
    assert _enc([torch.Size([1, 2])])[1] == 3 and _enc("abc")[1] == 0 and _enc(7)[1] == 0


def test_torch_size_dims_count_toward_max_items_on_both_ends() -> None:
    b = _enc(torch.Size([1] * 10))[0]
    assert _dec(b, items=10)[0] == torch.Size([1] * 10) and _dec(b, items=10)[2] == 0
    with pytest.raises(WireError, match="max_items"):
        _dec(b, items=9)
    with pytest.raises(ValueError, match="10 container items, more than max_items=9"):
        codec.encode(
            {"s": torch.Size([1] * 10)},
            allow_pickle=False,
            limits=Limits(max_items=9),
            tp=None,
            all_gather_tensors=None,
        )
    codec.encode(
        {"s": torch.Size([1] * 10)},
        allow_pickle=False,
        limits=Limits(max_items=10),
        tp=None,
        all_gather_tensors=None,
    )


def test_decoder_counts_items_across_containers() -> None:
    b = _enc([[None] * 3, {1: 2}, (None,)])[0]  # 3 + 3 + 2 + 1 = 9
    assert _dec(b, items=9)[2] == 0
    with pytest.raises(WireError, match="max_items"):
        _dec(b, items=8)
    assert _dec(_enc([None] * 1000)[0], items=1000)[0] == [None] * 1000
    with pytest.raises(WireError, match="max_items"):
        _dec(_enc([None] * 1000)[0], items=999)


def test_nested_tensors_are_numbered_in_order() -> None:
    ts: list[torch.Tensor] = []
    a, b, c = torch.zeros(1), torch.ones(2), torch.arange(3)
    data, _, _ = _enc({"x": [a, (b,)], "y": c}, tensors=ts)
    assert ts[0] is a and ts[1] is b and ts[2] is c
    got = [torch.full((1,), 7), torch.full((1,), 8), torch.full((1,), 9)]
    out, _, _, nxt = _dec(data, tensors=got)
    assert out["x"][0] is got[0] and out["x"][1][0] is got[1] and out["y"] is got[2]
    assert nxt == 3
    # numbering continues from first_tensor (a second plain key of the same hop)
    ts2 = [b, c]
    data2 = _enc([a], tensors=ts2)[0]
    assert data2 == b"\x09\x01\x00\x00\x00\x0f\x02\x00\x00\x00" and ts2[2] is a
    out, _, _, nxt = decode_value(
        data2, 0, items=10, max_depth=4, allow_pickle=False, tensor=lambda i: got[i], first_tensor=2
    )
    assert out == [got[2]] and out[0] is got[2] and nxt == 3


@pytest.mark.parametrize(
    "refs, first, match",
    [
        ([1, 0], 0, "tensor reference 1 where 0 was due"),
        ([0, 0], 0, "tensor reference 0 where 1 was due"),  # a tensor referenced twice
        ([0], 1, "tensor reference 0 where 1 was due"),
        ([2], 0, "where 0 was due"),
    ],
)
def test_nested_tensor_references_in_order_exactly_once(
    refs: list[int], first: int, match: str
) -> None:
    data = struct.pack("<BI", 9, len(refs)) + b"".join(struct.pack("<BI", 15, r) for r in refs)
    with pytest.raises(WireError, match=match):
        _dec(data, tensors=[torch.zeros(1)] * 4, first=first)


def test_tensor_reference_past_the_table_is_a_wire_error() -> None:
    with pytest.raises(WireError):
        _dec(struct.pack("<BI", 15, 0), tensors=[])  # the hop has no nested tensor


class _Bar:
    """Not encodable without pickle."""


class _Color(enum.IntEnum):
    RED = 1


_EXECUTED: list[str] = []


def _record_execution(what: str) -> str:
    _EXECUTED.append(what)
    return what


class _Boom:
    def __reduce__(self) -> tuple:
        return (_record_execution, ("unpickled",))


@pytest.mark.parametrize(
    "value, name",
    [
        (_Bar(), "_Bar"),
        (_Color.RED, "_Color"),
        ({1, 2}, "set"),
        (fractions.Fraction(1, 3), "Fraction"),
        (object(), "object"),
        (torch.qint8, "dtype"),
    ],
)
def test_unencodable_values_name_key_and_type(value: Any, name: str) -> None:
    with pytest.raises(TypeError, match=rf"key 'k'.*{name}.*allow_pickle=True"):
        _enc(value)


def test_unencodable_nested_value_names_the_path() -> None:
    with pytest.raises(TypeError, match=r"key 'k'.*\(at k\[1\]\['x'\]\[0\]\)"):
        _enc([1, {"x": (_Bar(),)}])


def test_tensor_as_dict_key_and_top_level_tensor_are_refused() -> None:
    with pytest.raises(TypeError, match="torch.Tensor used as a dict key"):
        _enc({torch.zeros(1): 1})
    with pytest.raises(wv.EncodeFailure):
        wv._Enc([], False, 32).enc(torch.zeros(1), 0)


def test_pickle_round_trips_when_allowed() -> None:
    v = [fractions.Fraction(1, 3), {"e": _Color.RED}]
    b, _, pickled = _enc(v, allow_pickle=True)
    assert pickled and not _enc([1, 2], allow_pickle=True)[2]
    out = _dec(b, allow_pickle=True)[0]
    assert out == v and type(out[1]["e"]) is _Color


def test_pickle_is_refused_and_never_executed_without_opt_in() -> None:
    _EXECUTED.clear()
    b, _, pickled = _enc([_Boom()], allow_pickle=True)
    assert pickled
    with pytest.raises(WireError, match="pickled value but allow_pickle is False"):
        _dec(b)
    assert _EXECUTED == []
    assert _dec(b, allow_pickle=True)[0] == ["unpickled"]  # the payload is live when allowed
    assert _EXECUTED == ["unpickled"]
    with pytest.raises(WireError, match="failed to unpickle"):
        _dec(b"\x0e\x03\x00\x00\x00abc", allow_pickle=True)


def test_pickle_failure_on_the_sender_names_the_key() -> None:
    with pytest.raises(TypeError, match="key 'k'.*failed to pickle"):
        _enc(lambda: 1, allow_pickle=True)


def test_depth_limit_on_both_ends() -> None:
    def deep(n: int) -> Any:
        v: Any = 1
        for _ in range(n):
            v = [v]
        return v

    assert _same(_rt(deep(31)), deep(31))
    with pytest.raises(ValueError, match=r"key 'k'.*max_depth=32"):
        _enc(deep(32))
    with pytest.raises(ValueError, match="max_depth=4"):
        _enc({"a": deep(3)}, max_depth=4)
    _enc(deep(3), max_depth=4)
    data = b"\x09\x01\x00\x00\x00" * 4 + b"\x01"
    assert _same(_dec(data, max_depth=5)[0], [[[[None]]]])
    with pytest.raises(WireError, match="deeper than max_depth=4"):
        _dec(data, max_depth=4)
    with pytest.raises(WireError, match="deeper than max_depth=4"):
        _dec(b"\x0b\x01\x00\x00\x00" * 4 + b"\x01\x01", max_depth=4)
    with pytest.raises(WireError):  # hostile nesting far past Python's recursion limit
        _dec(b"\x09\x01\x00\x00\x00" * 100_000 + b"\x01", max_depth=1 << 30)


def test_self_referencing_list_is_refused() -> None:
    loop: list = []
    loop.append(loop)
    with pytest.raises(ValueError, match="key 'k'"):
        _enc(loop)


@pytest.mark.parametrize(
    "data, match",
    [
        (b"", "truncated"),
        (b"\x00", "unknown tag 0"),
        (b"\x10", "unknown tag 16"),
        (b"\xff", "unknown tag 255"),
        (b"\x04\x01\x02", "truncated"),
        (b"\x06\x00", "truncated"),
        (b"\x07\x05\x00\x00\x00ab", "runs past the end"),
        (b"\x08\x01\x00\x00\x00", "runs past the end"),
        (b"\x05\x02\x00\x00\x00\x01", "runs past the end"),
        (b"\x07\x02\x00\x00", "truncated"),
        (b"\x07\x02\x00\x00\x00\xc3\x28", "not valid utf-8"),
        (b"\x0c\xfe", "unknown dtype code 254"),
        (b"\x0c", "truncated"),
        (b"\x0d\x02\x00\x00\x00" + bytes(15), "cannot fit"),
        (b"\x09\xff\xff\xff\xff", "cannot fit"),  # 2**32-1 items announced in 5 bytes
        (b"\x0b\x02\x00\x00\x00\x01\x01\x01", "cannot fit"),  # a dict's items are pairs
        (b"\x09\x02\x00\x00\x00\x04\x00", "truncated"),
        (b"\x0b\x02\x00\x00\x00\x04" + bytes(8) + b"\x01\x04" + bytes(8) + b"\x02", "duplicate"),
        (b"\x0b\x02\x00\x00\x00\x03\x01\x04" + struct.pack("<q", 1) + b"\x02", "duplicate"),
        (b"\x0b\x01\x00\x00\x00\x09\x00\x00\x00\x00\x01", "unhashable"),
        (b"\x0e\x01\x00\x00\x00\x80", "allow_pickle is False"),
    ],
    ids=repr,
)
def test_decode_value_refusals(data: bytes, match: str) -> None:
    with pytest.raises(WireError, match=match) as e:
        _dec(data)
    assert str(e.value).startswith(("value: ", "the peer sent a pickled value"))
    assert _ref_value(data, 0, _RefBudget(1 << 20, 32, 0))[1] < 0


@pytest.mark.parametrize(
    "data, message",
    [
        (b"\x07\x05\x00\x00\x00ab", "value: length 5 at offset 0 runs past the end"),
        (
            b"\x09\x02\x00\x00\x00\x01\x08\x09\x00\x00\x00",
            "value: length 9 at offset 6 runs past the end",
        ),
        (
            b"\x09\x01\x00\x00\x00\x07\x01\x00\x00\x00\xff",
            "value: str at offset 5 is not valid utf-8",
        ),
        (b"\x01\x63", "value: unknown tag 99 at offset 1"),
    ],
)
def test_decode_value_messages_name_the_offset(data: bytes, message: str) -> None:
    with pytest.raises(WireError) as e:
        pos = 1 if data[:2] == b"\x01\x63" else 0
        decode_value(
            data,
            pos,
            items=64,
            max_depth=8,
            allow_pickle=False,
            tensor=lambda i: None,
            first_tensor=0,
        )
    assert str(e.value) == message


def test_frame_is_immutable() -> None:
    import dataclasses

    f = _inline_frame()
    with pytest.raises(dataclasses.FrozenInstanceError):
        f.seq = 4  # type: ignore[misc]
    assert hash(f) == hash(_inline_frame())


def test_decode_value_reports_where_it_ended() -> None:
    b = _enc("ab")[0] + _enc(7)[0]
    v, end, _, _ = _dec(b)
    assert v == "ab" and end == 7
    v2, end2, _, _ = decode_value(
        b, end, items=0, max_depth=1, allow_pickle=False, tensor=lambda i: None, first_tensor=0
    )
    assert v2 == 7 and end2 == len(b)


# ---- reference value decoder (values.py's docstring, written out again) ---------------------


class _RefBudget:
    def __init__(self, items: int, max_depth: int, next_tensor: int) -> None:
        self.items, self.max_depth, self.next_tensor = items, max_depth, next_tensor


_REF_TENSORS = [torch.full((1,), float(i)) for i in range(64)]
_BAD = object()


def _ref_value(b: bytes, pos: int, budget: _RefBudget, depth: int = 1) -> tuple[Any, int]:
    """``(value, end)``; ``(None, -1)`` when refused (pickle always refused here)."""
    if pos >= len(b):
        return None, -1
    tag, pos = b[pos], pos + 1

    def need(n: int) -> bool:
        return pos + n <= len(b)

    if tag in (1, 2, 3):
        return (None, False, True)[tag - 1], pos
    if tag in (4, 6):
        if not need(8):
            return None, -1
        return struct.unpack_from("<q" if tag == 4 else "<d", b, pos)[0], pos + 8
    if tag in (5, 7, 8, 9, 10, 11, 13, 15):
        if not need(4):
            return None, -1
        (n,) = struct.unpack_from("<I", b, pos)
        pos += 4
        if tag in (5, 7, 8):
            if not need(n):
                return None, -1
            raw = b[pos : pos + n]
            if tag == 5:
                v = int.from_bytes(raw, "little", signed=True)
                if -(1 << 63) <= v < (1 << 63) or n != (v.bit_length() + 8) // 8:
                    return None, -1  # one encoding per value: int64 when it fits, minimal
                return v, pos + n
            if tag == 8:
                return raw, pos + n
            try:
                return raw.decode("utf-8", "surrogatepass"), pos + n
            except UnicodeDecodeError:
                return None, -1
        if tag == 15:
            if n != budget.next_tensor or n >= len(_REF_TENSORS):
                return None, -1
            budget.next_tensor += 1
            return _REF_TENSORS[n], pos
        if tag == 13:
            budget.items -= n
            if budget.items < 0 or not need(8 * n):
                return None, -1
            return torch.Size(struct.unpack_from(f"<{n}q", b, pos)), pos + 8 * n
        if depth >= budget.max_depth:
            return None, -1
        budget.items -= 2 * n if tag == 11 else n
        if budget.items < 0:
            return None, -1
        items = []
        for _ in range(2 * n if tag == 11 else n):
            v, pos = _ref_value(b, pos, budget, depth + 1)
            if pos < 0:
                return None, -1
            items.append(v)
        if tag == 11:
            d: dict = {}
            for k, v in zip(items[::2], items[1::2]):
                try:
                    d[k] = v
                except TypeError:
                    return None, -1
            if len(d) != n:
                return None, -1
            return d, pos
        return (items if tag == 9 else tuple(items)), pos
    if tag == 12:
        if not need(1) or dtype_of_code(b[pos]) is None:
            return None, -1
        return dtype_of_code(b[pos]), pos + 1
    return None, -1  # 14 (pickle, refused here) and unknown tags


def _is_canonical(v: Any) -> bool:
    """Values the encoder writes back in the same bytes."""
    if type(v) is int:
        return True
    if type(v) in (list, tuple):
        return all(_is_canonical(x) for x in v)
    if type(v) is dict:
        return all(
            not isinstance(k, torch.Tensor) and _is_canonical(k) and _is_canonical(x)
            for k, x in v.items()
        )
    return True


_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=True)
    | st.text(max_size=6)
    | st.binary(max_size=6)
    | st.sampled_from(sorted(DTYPE_CODES, key=str))
    | st.lists(st.integers(0, 2**40), max_size=3).map(torch.Size)
)
_PLAIN = st.recursive(
    _SCALARS,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.lists(inner, max_size=4).map(tuple)
        | st.dictionaries(st.integers(-3, 3) | st.text(max_size=3), inner, max_size=3)
    ),
    max_leaves=10,
)


@_FUZZ
@given(_PLAIN)
def test_property_any_plain_value_round_trips_exactly(value: Any) -> None:
    assert _same(_rt(value), value)


@_FUZZ
@given(
    _PLAIN,
    st.integers(0, 1 << 12),
    st.sampled_from([1, 1, 2, 4]),
    st.integers(0, (1 << 32) - 1),
    st.sampled_from(["overwrite", "insert", "delete", "cut"]),
)
def test_fuzz_mutated_values_decode_exactly_as_the_reference(
    value: Any, pos: int, width: int, byte: int, how: str
) -> None:
    data = bytearray(_enc([value, torch.zeros(1), value], tensors=[])[0])
    pos %= len(data)
    new = (byte & ((1 << (8 * width)) - 1)).to_bytes(width, "little")
    if how == "overwrite":
        data[pos : pos + width] = new
    elif how == "insert":
        data[pos:pos] = new
    elif how == "delete":
        del data[pos : pos + width]
    else:
        del data[pos:]
    data = bytes(data)
    budget = _RefBudget(_FUZZ_LIM.max_items, _FUZZ_LIM.max_depth, 0)
    want, want_end = _ref_value(data, 0, budget)
    try:
        got, end, left, nxt = decode_value(
            data,
            0,
            items=_FUZZ_LIM.max_items,
            max_depth=_FUZZ_LIM.max_depth,
            allow_pickle=False,
            tensor=lambda i: _REF_TENSORS[i],
            first_tensor=0,
        )
    except WireError:
        assert want_end < 0, f"refused a value the rules accept: {want!r}"
        return
    assert want_end >= 0, f"accepted a value the rules refuse: {got!r}"
    assert end == want_end and _same(got, want) and left == budget.items
    assert nxt == budget.next_tensor
    if _is_canonical(got):
        ts: list[torch.Tensor] = []
        assert _enc(got, tensors=ts, max_depth=64)[0] == data[:end]
        assert all(a is b for a, b in zip(ts, _REF_TENSORS))


@_FUZZ
@given(st.binary(max_size=64))
def test_fuzz_random_values_decode_exactly_as_the_reference(data: bytes) -> None:
    budget = _RefBudget(64, 6, 0)
    want, want_end = _ref_value(data, 0, budget)
    try:
        got, end, _, _ = decode_value(
            data,
            0,
            items=64,
            max_depth=6,
            allow_pickle=False,
            tensor=lambda i: _REF_TENSORS[i],
            first_tensor=0,
        )
    except WireError:
        assert want_end < 0
        return
    assert want_end >= 0 and end == want_end and _same(got, want)


# =============================================================================================
# codec: a dict <-> body + payload layouts, and one hop without processes
# =============================================================================================


def local_hop(
    d: dict[str, Any],
    *,
    limits: Limits = DEFAULT_LIMITS,
    allow_pickle: bool = False,
    recv_limits: Limits | None = None,
    recv_pickle: bool | None = None,
    capacity: int = 1 << 20,
) -> dict[str, Any]:
    """What a link does to ``d`` minus the transport: the receiver sees only the bytes."""
    enc = codec.encode(
        d, allow_pickle=allow_pickle, limits=limits, tp=None, all_gather_tensors=None
    )
    return decode_encoded(
        enc,
        limits=recv_limits or limits,
        allow_pickle=allow_pickle if recv_pickle is None else recv_pickle,
        capacity=capacity,
    )


def test_local_hop_engine_dict() -> None:
    d = {
        "hidden_states": torch.randn(7, 64).to(torch.bfloat16),
        "residual": torch.randn(7, 64),
        "positions": torch.arange(7),
        "__msg_type__": "proxy",
        "step": 3,
        "logprobs": [torch.randn(2), torch.randn(3)],
        "meta": {"ids": (1, 2), "t": torch.ones(1)},
        "z": torch.zeros(()),
        "e": torch.zeros(0, 5),
    }
    out = local_hop(d)
    check_dict(out, d)
    bufs = {
        t.untyped_storage().data_ptr()
        for t in [out["hidden_states"], out["residual"], out["logprobs"][1], out["meta"]["t"]]
    }
    assert len(bufs) == 1, "every CPU tensor is a view of one payload buffer"


def test_codec_numbers_top_level_tensors_first_then_nested() -> None:
    a, b, c = torch.zeros(1), torch.ones(2), torch.arange(3)
    enc = codec.encode(
        {"v": [a], "t": b, "w": {"x": c}},
        allow_pickle=False,
        limits=DEFAULT_LIMITS,
        tp=None,
        all_gather_tensors=None,
    )
    assert [s.shape for s in enc.sources["cpu"]] == [(2,), (1,), (3,)]
    s = decode_schema(enc.body, limits=DEFAULT_LIMITS)
    assert s.keys == ("v", "t", "w") and s.is_tensor == (False, True, False)
    assert [t.shape for t in s.tensors] == [(2,), (1,), (3,)]


@pytest.mark.parametrize(
    "d, match",
    [
        ({"v": 1, "s": "x"}, None),
        ({"v": 1}, "values end at"),
    ],
)
def test_codec_checks_every_value_byte_and_nested_tensor_is_used(
    d: dict, match: str | None
) -> None:
    enc = codec.encode(
        {"v": 1, "s": "x"},
        allow_pickle=False,
        limits=DEFAULT_LIMITS,
        tp=None,
        all_gather_tensors=None,
    )
    body = enc.body
    if match:  # announce the key "s" as a second plain key no more: its value bytes trail
        s = decode_schema(body, limits=DEFAULT_LIMITS)
        body = _body([("v", False)], [], [], body[s.values_at :])
    f = Frame(F_INLINE, 0, align16(64 + len(body)), len(body), 0, 0, None, 1, 0)
    dec = codec.header_parts(f, body, DEFAULT_LIMITS)
    if match is None:
        out, _ = codec.decode(f, body, dec, {}, allow_pickle=False, limits=DEFAULT_LIMITS, tp=None)
        assert out == {"v": 1, "s": "x"}
        return
    with pytest.raises(WireError, match=match):
        codec.decode(f, body, dec, {}, allow_pickle=False, limits=DEFAULT_LIMITS, tp=None)


def test_codec_refuses_a_nested_tensor_never_referenced() -> None:
    body = _body([("v", False)], [(F32, 1, CPU, 0)], [2], _enc(None)[0])
    f = Frame(F_INLINE, 0, align16(64 + len(body)) + 16, len(body), 16, 0, None, 1, 0)
    dec = codec.header_parts(f, body, DEFAULT_LIMITS)
    with pytest.raises(WireError, match="0 of 1 nested tensors referenced"):
        codec.decode(
            f,
            body,
            dec,
            {"cpu": torch.zeros(16, dtype=torch.uint8)},
            allow_pickle=False,
            limits=DEFAULT_LIMITS,
            tp=None,
        )


def _frame_for(body: bytes, cpu: int, dev: str | None = None, dev_n: int = 0, tp: int = 1) -> Frame:
    return Frame(F_INLINE, 0, align16(64 + len(body)) + cpu, len(body), cpu, 0, dev, tp, dev_n)


def test_frame_payload_sizes_must_equal_what_the_shapes_need() -> None:
    body = _body([("x", True)], [(F32, 1, CPU, 0)], [5])  # 20 bytes, 32 with alignment
    need = Layout.from_specs([(torch.float32, (5,))]).nbytes
    assert codec.header_parts(_frame_for(body, need), body, DEFAULT_LIMITS)
    for n in (0, need - 16, need + 16):
        with pytest.raises(
            WireError, match=f"announces {n} bytes of cpu payload, the shapes need {need}"
        ):
            codec.header_parts(_frame_for(body, n), body, DEFAULT_LIMITS)
    with pytest.raises(WireError, match="announces 64 bytes of cuda payload, the shapes need 0"):
        codec.header_parts(_frame_for(body, need, "cuda", 64), body, DEFAULT_LIMITS)


def test_one_accelerator_device_type_per_hop_on_both_ends() -> None:
    body = _body(
        [("a", True), ("b", True)], [(F32, 1, CUDA, 0), (F32, 1, DEVICE_CODES["xpu"], 0)], [4, 4]
    )
    with pytest.raises(WireError, match="more than one accelerator device type"):
        codec.header_parts(_frame_for(body, 0, "cuda", 16), body, DEFAULT_LIMITS)
    with pytest.raises(WireError, match="the shapes need 16 bytes of cuda"):
        codec.header_parts(
            _frame_for(body, 0, "xpu", 16),
            _body([("a", True)], [(F32, 1, CUDA, 0)], [4]),
            DEFAULT_LIMITS,
        )
    ok = _body(
        [("a", True), ("m", True)], [(F32, 1, CUDA, 0), (F32, 1, DEVICE_CODES["meta"], 0)], [4, 4]
    )
    dec = codec.header_parts(_frame_for(ok, 0, "cuda", 16), ok, DEFAULT_LIMITS)
    assert set(dec.parts) == {"cuda", "meta"}


def test_sliced_tensors_need_a_divisible_numel_and_a_tp_world() -> None:
    body = _body([("h", True)], [(F32, 2, CPU, 1)], [3, 2])  # 6 elements
    for tp in (2, 3, 6):
        n = Layout.from_specs([(torch.float32, (3, 2))]).sliced(tp, [True]).nbytes
        codec.header_parts(_frame_for(body, n, tp=tp), body, DEFAULT_LIMITS)
    for tp in (1, 4):
        with pytest.raises(WireError, match="do not divide|sliced"):
            codec.header_parts(_frame_for(body, 24, tp=tp), body, DEFAULT_LIMITS)


def test_receiver_without_all_gather_group_refuses_a_sliced_hop() -> None:
    body = _body([("h", True)], [(F32, 2, CPU, 1)], [4, 2])
    n = Layout.from_specs([(torch.float32, (4, 2))]).sliced(2, [True]).nbytes
    f = _frame_for(body, n, tp=2)
    dec = codec.header_parts(f, body, DEFAULT_LIMITS)
    with pytest.raises(
        WireError, match="all-gather over 2 ranks, but this receiver has no all_gather_group"
    ):
        codec.decode(
            f,
            body,
            dec,
            {"cpu": torch.zeros(n, dtype=torch.uint8)},
            allow_pickle=False,
            limits=DEFAULT_LIMITS,
            tp=None,
        )


def test_pickled_flag_refused_without_opt_in() -> None:
    d = {"f": fractions.Fraction(1, 3)}
    assert local_hop(d, allow_pickle=True) == d
    with pytest.raises(WireError, match="pickled value but allow_pickle is False"):
        local_hop(d, allow_pickle=True, recv_pickle=False)


def test_receiver_applies_its_own_limits_to_the_body() -> None:
    d = {"x": torch.zeros(1, 1, 1), "k" * 9: 1}
    with pytest.raises(WireError, match="max_ndim=2"):
        local_hop(d, recv_limits=Limits(max_ndim=2))
    with pytest.raises(WireError, match="max_key_bytes=8"):
        local_hop(d, recv_limits=Limits(max_key_bytes=8))


def test_receiver_limits_hold_after_the_same_schema_passed_under_other_limits() -> None:
    d = {"x": torch.zeros(1, 1, 1), "y": 2}
    local_hop(d)  # a channel with the default limits receives this schema first
    with pytest.raises(WireError, match="max_ndim=2"):
        local_hop(d, recv_limits=Limits(max_ndim=2))


def test_a_hop_whose_tensors_are_all_empty() -> None:
    d = {"x": torch.zeros(0), "y": torch.zeros(0, 3, dtype=torch.bfloat16), "v": 1}
    enc = codec.encode(
        d, allow_pickle=False, limits=DEFAULT_LIMITS, tp=None, all_gather_tensors=None
    )
    assert enc.parts["cpu"].wire_layout.nbytes == 0
    f = _frame_for(enc.body, 0)
    dec = codec.header_parts(f, enc.body, DEFAULT_LIMITS)
    out, _ = codec.decode(
        f, enc.body, dec, {}, allow_pickle=False, limits=DEFAULT_LIMITS, tp=None
    )  # the buffers a link hands over for a 0-byte payload
    check_dict(out, d)


def test_body_cut_right_after_a_key_is_a_wire_error() -> None:
    with pytest.raises(WireError, match="truncated"):
        decode_schema(b"\x01\x00\x00\x00\x00\x00\x00\x00\x01\x00k", limits=DEFAULT_LIMITS)


@_FUZZ
@given(st.dictionaries(st.text(max_size=5), _PLAIN, max_size=4), st.data())
def test_property_local_hop_round_trips_plain_and_tensor_dicts(d: dict, data: Any) -> None:
    for k in list(d)[: data.draw(st.integers(0, len(d)))]:
        dt = data.draw(st.sampled_from(sorted(DTYPE_CODES, key=str)))
        shape = tuple(data.draw(st.lists(st.integers(1, 4), max_size=3)))
        n = math.prod(shape) * dt.itemsize
        d[k] = torch.randint(0, 256, (n,), dtype=torch.uint8).view(dt).reshape(shape)
    out = local_hop(d)
    assert list(out) == list(d)
    for k in d:
        check_plain(out[k], d[k], repr(k))
