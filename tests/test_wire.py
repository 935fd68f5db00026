"""Tests of the header wire format (pipepack.pp.wire): pure bytes in, bytes out, no processes.

Each test names the behaviour it protects. The fuzz tests feed random and mutated bytes to every
decoder: a peer's bytes may only ever produce a WireError or a header within the limits.
"""

from __future__ import annotations

import enum
import fractions
import hashlib
import math
import struct

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipepack.pp.wire import (
    DTYPE_CODES,
    MAGIC,
    PREFIX_BYTES,
    SCHEMA_CACHE_SIZE,
    Header,
    Limits,
    PlainField,
    Schema,
    TensorField,
    WireError,
    cache_schema,
    decode_header,
    decode_schema,
    decode_value,
    encode_header,
    encode_schema,
    encode_value,
    max_overflow_nbytes,
    overflow_nbytes,
)

SLOT = 4096


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


def _same(a: object, b: object) -> bool:
    """Equal *and* of the same type all the way down; floats compared by their bits."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        return struct.pack("<d", a) == struct.pack("<d", b)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return list(a) == list(b) and all(
            _same(ka, kb) and _same(a[ka], b[kb]) for ka, kb in zip(a, b)
        )
    return a == b


def _roundtrip(v: object, **kw: object) -> object:
    return decode_value(encode_value(v, **kw), **kw)


def _schema() -> Schema:
    return Schema(
        (
            TensorField("hidden_states", torch.bfloat16, 2, "cuda", True),
            TensorField("residual", torch.bfloat16, 2, "cuda", False),
            PlainField("step"),
            TensorField("positions", torch.int64, 1, "cpu", False),
            PlainField("meta"),
        )
    )


def _header(schema: Schema, *, send_schema: bool = True, **kw: object) -> Header:
    args: dict[str, object] = dict(
        schema_id=schema.schema_id(),
        schema=schema if send_schema else None,
        shapes=((7, 64), (7, 64), (7,)),
        values=(3, {"a": [1, 2.5, None], "b": ("x", b"\x00")}),
        payload_nbytes={"cuda": 1792, "cpu": 64},
        seq=11,
        fingerprint=0xDEADBEEF,
    )
    args.update(kw)
    return Header(**args)  # type: ignore[arg-type]


def _assert_within(h: Header, limits: Limits) -> None:
    """What a decoded header may promise the transport: nothing beyond the limits."""
    schema = h.schema
    assert schema is not None
    tfields = schema.tensor_fields()
    assert len(schema.fields) <= limits.max_entries
    assert len(h.shapes) == len(tfields)
    assert len(h.values) == len(schema.plain_fields())
    for f, s in zip(tfields, h.shapes):
        assert len(s) == f.ndim <= limits.max_ndim
        assert all(d >= 0 for d in s)
        assert math.prod(s) * f.dtype.itemsize <= limits.max_payload_bytes
    for n in h.payload_nbytes.values():
        assert 0 <= n <= limits.max_payload_bytes
    assert len(h.payload_nbytes) <= 8
    assert all(k.isascii() and k.isidentifier() and len(k) <= 16 for k in h.payload_nbytes)
    assert h.inline is None or len(h.inline) <= limits.max_plain_bytes


# ---------------------------------------------------------------------------------------------
# plain values
# ---------------------------------------------------------------------------------------------

PLAIN_VALUES = [
    None,
    True,
    False,
    0,
    -1,
    2**63 - 1,
    -(2**63),
    2**63,
    -(2**63) - 1,
    2**200 + 12345,
    -(2**521),
    1.5,
    float("inf"),
    float("-inf"),
    "",
    "héllo ☃ 𝄞 \x00",
    "\ud800",  # a lone surrogate is a valid Python str
    b"",
    b"\x00\xff" * 10,
    [],
    (),
    {},
    [[]],
    ((),),
    [1, (2, [3, {"k": (4,)}]), {5: None}],
    {1: "a", (1, 2): [None], "s": {}, None: False, 2.5: b"x", False: 0},
    torch.float32,
    torch.bfloat16,
    torch.float8_e4m3fn,
    torch.Size([2, 3, 4]),
    torch.Size([]),
    [torch.Size([0]), torch.int8],
]


@pytest.mark.parametrize("value", PLAIN_VALUES, ids=lambda v: type(v).__name__)
def test_every_plain_type_round_trips_with_its_exact_type(value: object) -> None:
    assert _same(_roundtrip(value), value)


def test_tuple_stays_tuple_and_list_stays_list() -> None:
    v = [(1, 2), [3, 4], ((5,), [6])]
    out = _roundtrip(v)
    assert type(out) is list
    assert type(out[0]) is tuple and type(out[1]) is list
    assert type(out[2][0]) is tuple and type(out[2][1]) is list


def test_bool_stays_bool_not_int() -> None:
    out = _roundtrip([True, 1, False, 0])
    assert [type(x) for x in out] == [bool, int, bool, int]


def test_torch_size_comes_back_as_torch_size() -> None:
    out = _roundtrip(torch.Size([3, 0, 5]))
    assert type(out) is torch.Size and out == torch.Size([3, 0, 5])


def test_float_bits_are_exact_nan_payload_and_negative_zero() -> None:
    nan_payload = struct.unpack("<d", struct.pack("<Q", 0x7FF8_0000_0000_0123))[0]
    neg_nan = struct.unpack("<d", struct.pack("<Q", 0xFFF8_0000_0000_0001))[0]
    for x in (nan_payload, neg_nan, -0.0, 0.0, 5e-324, float("inf")):
        out = _roundtrip(x)
        assert struct.pack("<d", out) == struct.pack("<d", x)


def test_dict_insertion_order_and_int_keys_kept() -> None:
    d = {3: "c", 1: "a", 2: "b", -7: [1]}
    out = _roundtrip(d)
    assert list(out) == [3, 1, 2, -7] and _same(out, d)


def test_vllm_test_dict_plain_values_round_trip() -> None:
    for v in ("test", [1, 2, 3], {"a": 1, "b": 2}):
        assert _same(_roundtrip(v), v)


def test_bytearray_comes_back_as_bytes() -> None:
    out = _roundtrip(bytearray(b"ab\x00"))
    assert type(out) is bytes and out == b"ab\x00"


class Bar:
    """Not encodable without pickle."""


class Color(enum.IntEnum):
    RED = 1


def test_unencodable_value_raises_type_error_naming_key_and_type() -> None:
    with pytest.raises(TypeError, match=r"key 'foo'.*Bar.*allow_pickle=True"):
        encode_value(Bar(), key="foo")


def test_unencodable_nested_value_names_key_and_path() -> None:
    with pytest.raises(TypeError, match=r"key 'foo'.*foo\[1\]\['x'\]"):
        encode_value([1, {"x": Bar()}], key="foo")


def test_nested_tensor_is_rejected_naming_key() -> None:
    with pytest.raises(TypeError, match=r"key 'acts'.*torch.Tensor.*top-level"):
        encode_value([torch.zeros(2)], key="acts")
    with pytest.raises(TypeError, match=r"key 'acts'.*not a plain value"):
        encode_value(torch.zeros(2), key="acts")


def test_subclass_is_not_silently_converted_to_base_type() -> None:
    with pytest.raises(TypeError, match="Color"):
        encode_value(Color.RED, key="c")


def test_pickle_opt_in_round_trips_on_both_sides() -> None:
    v = [fractions.Fraction(1, 3), {"e": Color.RED}]
    out = _roundtrip(v, allow_pickle=True)
    assert out == v and type(out[1]["e"]) is Color


def test_peer_sent_pickle_is_refused_without_opt_in() -> None:
    data = encode_value([fractions.Fraction(1, 3)], allow_pickle=True)
    with pytest.raises(WireError, match="pickled value but allow_pickle is False"):
        decode_value(data)


def test_encode_rejects_too_deep_nesting_naming_key() -> None:
    deep: list = []
    for _ in range(40):
        deep = [deep]
    with pytest.raises(ValueError, match=r"key 'd'.*max_depth"):
        encode_value(deep, key="d")
    ok: list = []
    for _ in range(31):
        ok = [ok]
    assert _same(_roundtrip(ok), ok)


def test_encode_rejects_self_referencing_list() -> None:
    loop: list = []
    loop.append(loop)
    with pytest.raises(ValueError, match="key 'l'"):
        encode_value(loop, key="l")


def test_decode_rejects_too_deep_nesting() -> None:
    data = b"\x09\x01\x00\x00\x00" * 40 + b"\x01"  # 40 nested one-item lists around None
    with pytest.raises(WireError, match="max_depth"):
        decode_value(data)
    assert decode_value(data, limits=Limits(max_depth=40)) is not None


def test_decode_rejects_hostile_recursion_without_recursion_error() -> None:
    data = b"\x09\x01\x00\x00\x00" * 100_000 + b"\x01"
    with pytest.raises(WireError):
        decode_value(data)


def test_encode_and_decode_enforce_max_plain_bytes() -> None:
    lim = Limits(max_plain_bytes=100)
    with pytest.raises(ValueError, match=r"key 'big'.*max_plain_bytes"):
        encode_value(b"x" * 200, key="big", limits=lim)
    data = encode_value(b"x" * 200)
    with pytest.raises(WireError, match="max_plain_bytes"):
        decode_value(data, limits=lim)


def test_decode_enforces_max_items() -> None:
    data = encode_value([None] * 1000)
    assert len(decode_value(data)) == 1000
    with pytest.raises(WireError, match="max_items"):
        decode_value(data, limits=Limits(max_items=999))


def test_decode_refuses_a_count_larger_than_the_bytes() -> None:
    # a list announcing 2**32-1 items in 5 bytes must fail at once, without allocating
    with pytest.raises(WireError, match="cannot fit"):
        decode_value(b"\x09\xff\xff\xff\xff")


@pytest.mark.parametrize(
    "data, match",
    [
        (b"", "truncated"),
        (b"\x00", "unknown tag"),
        (b"\x63", "unknown tag"),
        (b"\x04\x01\x02", "truncated"),
        (b"\x07\x05\x00\x00\x00ab", "runs past the end"),
        (b"\x07\x02\x00\x00\x00\xc3\x28", "utf-8"),
        (b"\x0c\xfe", "dtype code"),
        (b"\x01\x01", "trailing"),
        (b"\x0b\x02\x00\x00\x00\x04" + bytes(8) + b"\x01\x04" + bytes(8) + b"\x02", "duplicate"),
        (b"\x0b\x01\x00\x00\x00\x09\x00\x00\x00\x00\x01", "unhashable"),
    ],
)
def test_decode_value_rejects_malformed_bytes(data: bytes, match: str) -> None:
    with pytest.raises(WireError, match=match):
        decode_value(data)


# ---------------------------------------------------------------------------------------------
# schema
# ---------------------------------------------------------------------------------------------


def test_schema_round_trips_and_its_encoding_is_canonical() -> None:
    s = _schema()
    b = encode_schema(s)
    s2 = decode_schema(b)
    assert s2 == s and encode_schema(s2) == b and s2.schema_id() == s.schema_id()
    assert [f.key for f in s2.tensor_fields()] == ["hidden_states", "residual", "positions"]
    assert s2.tensor_fields()[0].sliced is True and s2.tensor_fields()[1].sliced is False


def test_schema_id_is_the_pinned_blake2b_of_the_encoding() -> None:
    # pinned: a change here changes the wire format, and peers of two builds stop agreeing
    s = _schema()
    expect = int.from_bytes(hashlib.blake2b(encode_schema(s), digest_size=8).digest(), "little")
    assert s.schema_id() == expect
    assert encode_schema(Schema((PlainField("a"),))).hex() == "0100000000010061"
    assert Schema((PlainField("a"),)).schema_id() == int.from_bytes(
        hashlib.blake2b(bytes.fromhex("0100000000010061"), digest_size=8).digest(), "little"
    )


def test_schema_id_depends_on_every_field_property() -> None:
    base = TensorField("x", torch.float32, 2, "cpu", False)
    variants = [
        base,
        TensorField("y", torch.float32, 2, "cpu", False),
        TensorField("x", torch.float16, 2, "cpu", False),
        TensorField("x", torch.float32, 3, "cpu", False),
        TensorField("x", torch.float32, 2, "cuda", False),
        TensorField("x", torch.float32, 2, "cpu", True),
        PlainField("x"),
    ]
    ids = {Schema((v,)).schema_id() for v in variants}
    assert len(ids) == len(variants)


def test_every_dtype_in_the_code_table_round_trips() -> None:
    fields = tuple(TensorField(f"t{i}", dt, 1, "cpu", False) for i, dt in enumerate(DTYPE_CODES))
    s = Schema(fields)
    assert [f.dtype for f in decode_schema(encode_schema(s)).fields] == list(DTYPE_CODES)
    assert len(set(DTYPE_CODES.values())) == len(DTYPE_CODES)
    for dt in (torch.float8_e4m3fn, torch.float8_e5m2, torch.bfloat16, torch.uint64):
        assert dt in DTYPE_CODES


def test_schema_from_dict_keeps_order_dtype_device_and_sliced() -> None:
    d = {"a": torch.zeros(2, 3), "n": 5, "b": torch.zeros((), dtype=torch.int8)}
    s = Schema.from_dict(d, sliced=["a"])
    assert s.fields == (
        TensorField("a", torch.float32, 2, "cpu", True),
        PlainField("n"),
        TensorField("b", torch.int8, 0, "cpu", False),
    )


def test_schema_construction_rejects_bad_fields() -> None:
    with pytest.raises(ValueError, match="twice"):
        Schema((PlainField("a"), PlainField("a")))
    with pytest.raises(ValueError, match="device type"):
        TensorField("a", torch.float32, 1, "cu-da", False)
    with pytest.raises(TypeError, match="dtype"):
        TensorField("a", torch.qint8, 1, "cpu", False)
    with pytest.raises(TypeError, match="str"):
        PlainField(3)  # type: ignore[arg-type]


def _field_bytes(key: bytes, code: int, ndim: int, flags: int, dev: bytes) -> bytes:
    return (
        struct.pack("<BH", 1, len(key))
        + key
        + struct.pack("<BBBB", code, ndim, flags, len(dev))
        + dev
    )


@pytest.mark.parametrize(
    "data, match",
    [
        (b"\x01\x00\x00\x00" + _field_bytes(b"k", 250, 1, 0, b"cpu"), "unknown dtype code"),
        (b"\x01\x00\x00\x00" + _field_bytes(b"k", 12, 17, 0, b"cpu"), "max_ndim"),
        (b"\x01\x00\x00\x00" + _field_bytes(b"k", 12, 1, 2, b"cpu"), "flags"),
        (b"\x01\x00\x00\x00" + _field_bytes(b"k", 12, 1, 0, b"c;u"), "device type"),
        (b"\x01\x00\x00\x00" + _field_bytes(b"k", 12, 1, 0, b""), "device type"),
        (b"\x02\x00\x00\x00" + b"\x00\x01\x00k" * 2, "twice"),
        (b"\x01\x00\x00\x00\x05\x01\x00k", "unknown kind"),
        (b"\x01\x00\x00\x00\x00\x01\x00\xff", "utf-8"),
        (b"\x01\x00\x00\x00\x00\x01\x00kZ", "trailing"),
        (b"\x02\x00\x00\x00\x00\x01\x00k", "cannot fit|truncated"),
        (b"\xff\xff\xff\xff", "max_entries"),
    ],
)
def test_decode_schema_rejects_malformed_bytes(data: bytes, match: str) -> None:
    with pytest.raises(WireError, match=match):
        decode_schema(data)


def test_decode_schema_enforces_max_entries_and_key_bytes() -> None:
    s = Schema(tuple(PlainField(f"k{i}") for i in range(10)))
    with pytest.raises(WireError, match="max_entries"):
        decode_schema(encode_schema(s), Limits(max_entries=9))
    s = Schema((PlainField("k" * 20),))
    with pytest.raises(WireError, match="max_key_bytes"):
        decode_schema(encode_schema(s), Limits(max_key_bytes=19))


# ---------------------------------------------------------------------------------------------
# header
# ---------------------------------------------------------------------------------------------


def test_header_round_trip_with_schema_fills_the_cache() -> None:
    s = _schema()
    h = _header(s)
    slot, overflow = encode_header(h, slot_bytes=SLOT)
    assert len(slot) == SLOT and overflow is None and slot[:4] == MAGIC
    cache: dict[int, Schema] = {}
    out, n = decode_header(slot, slot_bytes=SLOT, schema_cache=cache)
    assert n == 0 and out == h
    assert _same(out.values, h.values) and out.shapes == h.shapes
    assert cache == {s.schema_id(): s}


def test_header_without_schema_uses_the_cached_one() -> None:
    s = _schema()
    cache: dict[int, Schema] = {}
    decode_header(
        encode_header(_header(s), slot_bytes=SLOT)[0], slot_bytes=SLOT, schema_cache=cache
    )
    h = _header(s, send_schema=False, seq=12, shapes=((0, 64), (0, 64), (0,)))
    slot, overflow = encode_header(h, slot_bytes=SLOT)
    assert overflow is None
    out, _ = decode_header(slot, slot_bytes=SLOT, schema_cache=cache)
    assert out.schema == s and out.seq == 12 and out.shapes == ((0, 64), (0, 64), (0,))
    assert out.payload_nbytes == h.payload_nbytes and _same(out.values, h.values)


def test_header_without_schema_is_smaller_than_with_it() -> None:
    s = _schema()
    with_s = encode_header(_header(s), slot_bytes=SLOT)[0].rstrip(b"\x00")
    without = encode_header(_header(s, send_schema=False), slot_bytes=SLOT)[0].rstrip(b"\x00")
    assert len(without) < len(with_s) - len(encode_schema(s))


def test_unknown_schema_id_is_a_wire_error() -> None:
    s = _schema()
    slot, _ = encode_header(_header(s, send_schema=False), slot_bytes=SLOT)
    with pytest.raises(WireError, match="unknown schema id"):
        decode_header(slot, slot_bytes=SLOT, schema_cache={})
    with pytest.raises(WireError, match="unknown schema id"):
        decode_header(slot, slot_bytes=SLOT, schema_cache=None)


def test_schema_bytes_that_do_not_match_the_id_are_refused() -> None:
    s = _schema()
    slot = bytearray(encode_header(_header(s), slot_bytes=SLOT)[0])
    i = slot.index(b"residual")
    slot[i] = ord("R")
    cache: dict[int, Schema] = {}
    with pytest.raises(WireError, match="hash"):
        decode_header(bytes(slot), slot_bytes=SLOT, schema_cache=cache)
    assert cache == {}


def test_cache_is_not_updated_by_a_header_that_fails_to_decode() -> None:
    s = _schema()
    slot = bytearray(encode_header(_header(s), slot_bytes=SLOT)[0])
    slot[PREFIX_BYTES + 4 + len(encode_schema(s))] = 0xFF  # first shape dim turns negative
    slot[PREFIX_BYTES + 4 + len(encode_schema(s)) + 7] = 0xFF
    cache: dict[int, Schema] = {}
    with pytest.raises(WireError, match="negative"):
        decode_header(bytes(slot), slot_bytes=SLOT, schema_cache=cache)
    assert cache == {}


def test_schema_cache_is_bounded_and_evicts_the_oldest() -> None:
    cache: dict[int, Schema] = {}
    schemas = [Schema((PlainField(f"k{i}"),)) for i in range(SCHEMA_CACHE_SIZE + 10)]
    for sch in schemas:
        h = Header(sch.schema_id(), sch, (), (0,), {})
        decode_header(encode_header(h, slot_bytes=256)[0], slot_bytes=256, schema_cache=cache)
    assert len(cache) == SCHEMA_CACHE_SIZE
    assert list(cache.values()) == schemas[10:]
    # a sender mirroring with cache_schema agrees with the receiver
    mirror: dict[int, Schema] = {}
    for sch in schemas:
        cache_schema(mirror, sch)
    assert list(mirror) == list(cache)


def test_overflow_path_announces_the_exact_length() -> None:
    s = _schema()
    big = {"blob": b"z" * 10_000, "text": "é" * 300}
    h = _header(s, values=(1, big), inline=b"\x01\x02" * 50)
    slot, overflow = encode_header(h, slot_bytes=SLOT)
    assert len(slot) == SLOT and overflow is not None
    assert overflow_nbytes(slot, slot_bytes=SLOT) == len(overflow)
    cache: dict[int, Schema] = {}
    first, n = decode_header(slot, slot_bytes=SLOT, schema_cache=cache)
    assert first is None and n == len(overflow) and cache == {}
    out, n2 = decode_header(slot, overflow, slot_bytes=SLOT, schema_cache=cache)
    assert n2 == n and out == h and out.inline == h.inline


def test_no_overflow_means_overflow_nbytes_zero() -> None:
    slot, overflow = encode_header(_header(_schema()), slot_bytes=SLOT)
    assert overflow is None and overflow_nbytes(slot, slot_bytes=SLOT) == 0


def test_truncated_or_extended_overflow_is_refused() -> None:
    h = _header(_schema(), values=(1, "x" * 5000))
    slot, overflow = encode_header(h, slot_bytes=SLOT)
    assert overflow is not None
    for bad in (overflow[:-1], overflow + b"\x00", b""):
        with pytest.raises(WireError, match="overflow"):
            decode_header(slot, bad, slot_bytes=SLOT)


def test_announced_overflow_over_the_limits_is_refused_before_receiving_it() -> None:
    slot, overflow = encode_header(_header(_schema(), values=(1, "x" * 9000)), slot_bytes=SLOT)
    assert overflow is not None and len(overflow) > 5000
    bad = bytearray(slot)
    bad[40:48] = struct.pack("<Q", max_overflow_nbytes() + 1)
    with pytest.raises(WireError, match="more than the limits allow"):
        overflow_nbytes(bytes(bad), slot_bytes=SLOT)
    with pytest.raises(WireError, match="more than the limits allow"):
        decode_header(bytes(bad), slot_bytes=SLOT)
    # the receiver's own limits shrink the bound
    lim = Limits(max_plain_bytes=1000, max_entries=4, max_key_bytes=16)
    with pytest.raises(WireError, match="more than the limits allow"):
        overflow_nbytes(slot, slot_bytes=SLOT, limits=lim)


def test_overflow_given_when_none_announced_is_refused() -> None:
    slot, _ = encode_header(_header(_schema()), slot_bytes=SLOT)
    with pytest.raises(WireError, match="announces none"):
        decode_header(slot, b"xx", slot_bytes=SLOT)


def test_inline_bytes_travel_in_the_slot() -> None:
    h = _header(_schema(), inline=bytes(range(200)))
    slot, overflow = encode_header(h, slot_bytes=SLOT)
    assert overflow is None
    out, _ = decode_header(slot, slot_bytes=SLOT, schema_cache={})
    assert out.inline == bytes(range(200))
    out0, _ = decode_header(
        encode_header(_header(_schema(), inline=b""), slot_bytes=SLOT)[0],
        slot_bytes=SLOT,
        schema_cache={},
    )
    assert out0.inline == b""


def test_slot_accepts_bytearray_memoryview_and_uint8_tensor() -> None:
    slot, _ = encode_header(_header(_schema()), slot_bytes=SLOT)
    t = torch.frombuffer(bytearray(slot), dtype=torch.uint8)
    for buf in (bytearray(slot), memoryview(slot), t):
        out, _ = decode_header(buf, slot_bytes=SLOT, schema_cache={})
        assert out.seq == 11


def test_slot_size_mismatch_between_peers_is_reported() -> None:
    slot, _ = encode_header(_header(_schema()), slot_bytes=SLOT)
    with pytest.raises(WireError, match="expected exactly"):
        decode_header(slot[:-1], slot_bytes=SLOT)
    slot2, _ = encode_header(_header(_schema()), slot_bytes=8192)
    with pytest.raises(WireError, match="slot_bytes=8192"):
        decode_header(slot2[:SLOT], slot_bytes=SLOT)


@pytest.mark.parametrize(
    "offset, value, match",
    [
        (0, b"XXXX", "magic"),
        (4, b"\x02", "version"),
        (5, b"\x80", "flags"),
        (6, b"\x01\x00", "reserved"),
        (12, b"\xff\xff\x00\x00", "body length"),
        (40, b"\x01\x00\x00\x00\x00\x00\x00\x00", "overflow"),
        (SLOT - 1, b"\x01", "non-zero"),
    ],
)
def test_corrupt_prefix_fields_are_refused(offset: int, value: bytes, match: str) -> None:
    slot = bytearray(encode_header(_header(_schema()), slot_bytes=SLOT)[0])
    slot[offset : offset + len(value)] = value
    with pytest.raises(WireError, match=match):
        decode_header(bytes(slot), slot_bytes=SLOT, schema_cache={})


def test_payload_size_over_the_limit_is_refused() -> None:
    s = _schema()
    slot, _ = encode_header(_header(s, payload_nbytes={"cuda": 1 << 40}), slot_bytes=SLOT)
    with pytest.raises(WireError, match="max_payload_bytes"):
        decode_header(slot, slot_bytes=SLOT, schema_cache={})
    out, _ = decode_header(
        slot, slot_bytes=SLOT, schema_cache={}, limits=Limits(max_payload_bytes=1 << 41)
    )
    assert out.payload_nbytes["cuda"] == 1 << 40


def test_inline_over_max_plain_bytes_is_refused_by_the_receiver() -> None:
    slot, _ = encode_header(_header(_schema(), inline=b"i" * 200), slot_bytes=SLOT)
    with pytest.raises(WireError, match="inline payload of 200 bytes"):
        decode_header(slot, slot_bytes=SLOT, schema_cache={}, limits=Limits(max_plain_bytes=100))


def test_invalid_payload_device_type_name_is_refused() -> None:
    s = _schema()
    slot = bytearray(encode_header(_header(s, send_schema=False), slot_bytes=SLOT)[0])
    i = slot.index(b"cuda", PREFIX_BYTES)
    slot[i + 1] = ord("/")
    with pytest.raises(WireError, match="invalid payload device type 'c/da'"):
        decode_header(bytes(slot), slot_bytes=SLOT, schema_cache={s.schema_id(): s})


def test_tensor_shape_over_the_limit_is_refused_naming_key() -> None:
    s = _schema()
    h = _header(s, shapes=((1 << 40, 1 << 20), (7, 64), (7,)))
    slot, _ = encode_header(h, slot_bytes=SLOT)
    with pytest.raises(WireError, match="hidden_states.*max_payload_bytes"):
        decode_header(slot, slot_bytes=SLOT, schema_cache={})
    # many tensors each under the limit, together over it
    h = _header(s, shapes=((1 << 33, 1), (1 << 33, 1), (7,)))
    slot, _ = encode_header(h, slot_bytes=SLOT)
    with pytest.raises(WireError, match="cuda tensors total"):
        decode_header(
            slot, slot_bytes=SLOT, schema_cache={}, limits=Limits(max_payload_bytes=1 << 34)
        )


def test_too_many_entries_is_refused_by_the_receiver() -> None:
    s = Schema(tuple(PlainField(f"k{i}") for i in range(50)))
    h = Header(s.schema_id(), s, (), tuple(range(50)), {})
    slot, _ = encode_header(h, slot_bytes=SLOT)
    assert decode_header(slot, slot_bytes=SLOT)[0].values == tuple(range(50))
    with pytest.raises(WireError, match="max_entries"):
        decode_header(slot, slot_bytes=SLOT, limits=Limits(max_entries=49))


def test_too_deep_plain_value_in_header_fails_on_both_sides() -> None:
    s = Schema((PlainField("deep"),))
    deep: list = []
    for _ in range(10):
        deep = [deep]
    with pytest.raises(ValueError, match="key 'deep'.*max_depth"):
        encode_header(
            Header(s.schema_id(), s, (), (deep,), {}), slot_bytes=SLOT, limits=Limits(max_depth=5)
        )
    slot, _ = encode_header(Header(s.schema_id(), s, (), (deep,), {}), slot_bytes=SLOT)
    with pytest.raises(WireError, match="key 'deep'.*max_depth"):
        decode_header(slot, slot_bytes=SLOT, limits=Limits(max_depth=5))


def test_header_values_need_pickle_opt_in_on_both_sides() -> None:
    s = Schema((PlainField("obj"),))
    h = Header(s.schema_id(), s, (), (fractions.Fraction(2, 3),), {})
    with pytest.raises(TypeError, match="key 'obj'.*allow_pickle"):
        encode_header(h, slot_bytes=SLOT)
    slot, _ = encode_header(h, slot_bytes=SLOT, allow_pickle=True)
    with pytest.raises(WireError, match="allow_pickle is False"):
        decode_header(slot, slot_bytes=SLOT)
    out, _ = decode_header(slot, slot_bytes=SLOT, allow_pickle=True)
    assert out.values == (fractions.Fraction(2, 3),)


def test_encode_header_validates_input_before_sending() -> None:
    s = _schema()
    with pytest.raises(ValueError, match="'residual'.*rank"):
        encode_header(_header(s, shapes=((7, 64), (7,), (7,))), slot_bytes=SLOT)
    with pytest.raises(ValueError, match="'positions'.*non-negative"):
        encode_header(_header(s, shapes=((7, 64), (7, 64), (-1,))), slot_bytes=SLOT)
    # without the schema in the header, the local schema still names the key
    with pytest.raises(ValueError, match="'residual'.*rank"):
        encode_header(_header(s, send_schema=False, shapes=((7, 64), (7,), (7,))), slot_bytes=SLOT)
    with pytest.raises(ValueError, match="2 shapes.*3 tensor keys"):
        encode_header(_header(s, shapes=((7, 64), (7, 64))), slot_bytes=SLOT)
    with pytest.raises(ValueError, match="plain keys"):
        encode_header(_header(s, values=(1,)), slot_bytes=SLOT)
    with pytest.raises(ValueError, match="does not match"):
        encode_header(_header(s, schema_id=1), slot_bytes=SLOT)
    with pytest.raises(ValueError, match="slot_bytes"):
        encode_header(_header(s), slot_bytes=16)
    with pytest.raises(ValueError, match="seq"):
        encode_header(_header(s, seq=-1), slot_bytes=SLOT)
    with pytest.raises(ValueError, match="device type"):
        encode_header(_header(s, payload_nbytes={"cu da": 1}), slot_bytes=SLOT)
    with pytest.raises(ValueError, match="payload_nbytes"):
        encode_header(_header(s, payload_nbytes={"cpu": -1}), slot_bytes=SLOT)
    with pytest.raises(ValueError, match="at most 8"):
        encode_header(_header(s, payload_nbytes={f"d{i}": 1 for i in range(9)}), slot_bytes=SLOT)


def test_max_overflow_bound_covers_the_largest_legal_body() -> None:
    lim = Limits(max_entries=4, max_ndim=2, max_plain_bytes=1000, max_key_bytes=8)
    s = Schema((TensorField("k" * 8, torch.float32, 2, "a" * 16, True), PlainField("p" * 8)))
    h = Header(
        s.schema_id(),
        s,
        ((1, 1),),
        (b"x" * 990,),
        {f"d{i}": 1 for i in range(8)},
        inline=b"i" * 1000,
    )
    slot, overflow = encode_header(h, slot_bytes=64, limits=lim)
    assert overflow is not None and len(overflow) <= max_overflow_nbytes(lim)
    assert decode_header(slot, overflow, slot_bytes=64, limits=lim)[0] == h


# ---------------------------------------------------------------------------------------------
# fuzzing: a peer's bytes produce a WireError or a header within the limits, nothing else
# ---------------------------------------------------------------------------------------------

FUZZ_SLOT = 256
FUZZ_LIMITS = Limits(
    max_payload_bytes=1 << 20,
    max_entries=64,
    max_ndim=8,
    max_plain_bytes=1 << 16,
    max_depth=8,
    max_items=4096,
)
_FUZZ_SCHEMA = Schema(
    (
        TensorField("h", torch.bfloat16, 2, "cuda", True),
        PlainField("v"),
        TensorField("p", torch.int64, 1, "cpu", False),
        PlainField("w"),
    )
)
_FUZZ_CASES = [
    encode_header(
        Header(
            _FUZZ_SCHEMA.schema_id(),
            _FUZZ_SCHEMA,
            ((3, 8), (3,)),
            (5, [1.5, "ab", (None, True)]),
            {"cuda": 64, "cpu": 32},
            inline=b"\x07" * 5,
            seq=3,
            fingerprint=9,
        ),
        slot_bytes=FUZZ_SLOT,
    ),
    encode_header(
        Header(
            _FUZZ_SCHEMA.schema_id(), None, ((0, 8), (1,)), ({"k": b"x" * 300}, 2**70), {"cpu": 0}
        ),
        slot_bytes=FUZZ_SLOT,
    ),
    encode_header(
        Header(
            _FUZZ_SCHEMA.schema_id(),
            _FUZZ_SCHEMA,
            ((1, 1), (2,)),
            (torch.Size([2, 3]), {1: [[[]]], (2,): {"z": -0.0}}),
            {},
        ),
        slot_bytes=FUZZ_SLOT,
    ),
]
assert _FUZZ_CASES[0][1] is None and _FUZZ_CASES[1][1] is not None

_FUZZ = settings(
    max_examples=200, deadline=500, suppress_health_check=[HealthCheck.too_slow], derandomize=True
)
_FUZZ_MANY = settings(_FUZZ, max_examples=600)  # header decoding is cheap: search harder


def _decode_any(slot: bytes, overflow: bytes | None) -> None:
    cache = {_FUZZ_SCHEMA.schema_id(): _FUZZ_SCHEMA}
    try:
        n = overflow_nbytes(slot, slot_bytes=FUZZ_SLOT, limits=FUZZ_LIMITS)
        assert 0 <= n <= max_overflow_nbytes(FUZZ_LIMITS)
        h, n2 = decode_header(
            slot, overflow, slot_bytes=FUZZ_SLOT, limits=FUZZ_LIMITS, schema_cache=cache
        )
    except WireError:
        return
    assert n2 == n
    if h is not None:
        _assert_within(h, FUZZ_LIMITS)
    assert len(cache) <= SCHEMA_CACHE_SIZE


@_FUZZ_MANY
@given(st.binary(min_size=0, max_size=FUZZ_SLOT + 8))
def test_fuzz_random_slots_only_raise_wire_error(data: bytes) -> None:
    _decode_any(data, None)
    # the same bytes behind a valid-looking prefix reach the body parser
    slot = (bytearray(_FUZZ_CASES[0][0][:PREFIX_BYTES]) + data).ljust(FUZZ_SLOT, b"\0")
    slot[12:16] = struct.pack("<I", min(len(data), FUZZ_SLOT - PREFIX_BYTES))
    _decode_any(bytes(slot[:FUZZ_SLOT]), None)


@_FUZZ_MANY
@given(
    st.sampled_from(range(len(_FUZZ_CASES))),
    st.booleans(),
    st.integers(min_value=0, max_value=1 << 20),
    st.sampled_from([1, 2, 4, 8]),
    st.integers(min_value=0, max_value=(1 << 64) - 1),
)
def test_fuzz_mutated_headers_only_raise_wire_error_or_stay_within_limits(
    case: int, in_overflow: bool, where: int, width: int, value: int
) -> None:
    slot, overflow = _FUZZ_CASES[case]
    target = bytearray(overflow if in_overflow and overflow else slot)
    pos = where % max(1, len(target) - width + 1)
    target[pos : pos + width] = (value & ((1 << (8 * width)) - 1)).to_bytes(width, "little")
    if in_overflow and overflow:
        _decode_any(slot, bytes(target))
    else:
        _decode_any(bytes(target), overflow)


def test_every_single_byte_mutation_of_valid_headers_is_caught_or_bounded() -> None:
    # exhaustive over every used byte of every case: cheap, and no position is left to chance
    for slot, overflow in _FUZZ_CASES:
        used = len(slot.rstrip(b"\0")) + 1
        for in_overflow, target in ((False, slot), (True, overflow or b"")):
            for pos in range(min(used, len(target)) if not in_overflow else len(target)):
                for new in {0x00, 0xFF, target[pos] ^ 0x01, target[pos] ^ 0x80}:
                    b = bytearray(target)
                    b[pos] = new
                    if in_overflow:
                        _decode_any(slot, bytes(b))
                    else:
                        _decode_any(bytes(b), overflow)


@_FUZZ
@given(st.sampled_from(range(len(_FUZZ_CASES))), st.integers(min_value=0, max_value=1 << 16))
def test_fuzz_truncated_overflow_only_raises_wire_error(case: int, cut: int) -> None:
    slot, overflow = _FUZZ_CASES[case]
    if overflow is None:
        overflow = b""
    _decode_any(slot, overflow[: cut % (len(overflow) + 1)])


@_FUZZ
@given(st.binary(max_size=300))
def test_fuzz_random_bytes_to_value_and_schema_decoders(data: bytes) -> None:
    for fn in (
        lambda: decode_value(data, limits=FUZZ_LIMITS),
        lambda: decode_value(data, allow_pickle=False),
        lambda: decode_schema(data, FUZZ_LIMITS),
    ):
        try:
            fn()
        except WireError:
            pass


_PLAIN = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=True)
    | st.text(max_size=20)
    | st.binary(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.lists(inner, max_size=4).map(tuple)
        | st.dictionaries(st.integers() | st.text(max_size=5), inner, max_size=4)
    ),
    max_leaves=12,
)


@_FUZZ
@given(_PLAIN)
def test_property_any_plain_value_round_trips_exactly(value: object) -> None:
    assert _same(_roundtrip(value), value)


@_FUZZ
@given(_PLAIN, st.integers(min_value=0, max_value=4096), st.integers(min_value=0, max_value=255))
def test_fuzz_mutated_values_only_raise_wire_error(value: object, where: int, byte: int) -> None:
    data = bytearray(encode_value(value))
    data[where % len(data)] = byte
    try:
        decode_value(bytes(data), limits=FUZZ_LIMITS)
    except WireError:
        pass
