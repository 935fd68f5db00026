"""Hardening: property tests, channel-level header fuzzing, faults and a bad-input table.

What each part protects (DESIGN.md, "Semantics that must hold"):

- property tests: random dicts (every payload dtype, empty and 0-dim shapes, strided views,
  plain values nested two deep) come back bit-exact, in key order and with their exact types,
  through pack/unpack (torch path and Triton path under the interpreter), through the wire
  format without processes, and through a 2-rank channel;
- header fuzzing at the channel level: corrupt or hostile slot bytes on the header tag make
  the receiver raise a ``ValueError`` (``WireError``) naming the problem *before* it posts any
  payload receive; it never posts a receive of a size the sender did not announce and never
  allocates past its :class:`Limits`;
- faults: a sender that dies between header and payload, a receiver that dies with a send
  outstanding and a peer that goes silent all surface as an exception that names the peer and
  the step, within the configured timeout, without a hang or a process abort;
- bad input: every kind of bad input raises on the sender and puts nothing on the wire (the
  next good dict arrives intact); the test also produces the table in README.md.

The tests at the end of this file are regression tests for defects these tests found, each
with its original reproducer in the docstring.
"""

from __future__ import annotations

import collections
import dataclasses
import enum
import faulthandler
import hashlib
import json
import math
import os
import random
import re
import struct
import time
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytest
import torch
from _checks import check_dict, check_tensor, raw_bytes
from _dist import run_ranks
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import seed as hypothesis_seed
from hypothesis import strategies as st

from pipepack.kernels import (
    SUPPORTED_DTYPES,
    Layout,
    pack,
    pack_reference,
    plan_layout,
    unpack,
    unpack_into,
)
from pipepack.pp import (
    DEFAULT_CHUNK_BYTES,
    REAPER,
    Declared,
    Limits,
    TensorDictChannel,
    WireError,
    isend_tensor_dict,
    recv_tensor_dict,
    send_tensor_dict,
)
from pipepack.pp import transport as pp_transport
from pipepack.pp.wire import (
    DTYPE_CODES,
    Header,
    PlainField,
    Schema,
    TensorField,
    decode_header,
    encode_header,
    max_overflow_nbytes,
    overflow_nbytes,
)

TIMEOUT_S = 20.0  # gloo group timeout of the runs below
README = Path(__file__).resolve().parents[1] / "README.md"


# ---------------------------------------------------------------------------------------------
# helpers (the pattern of tests/test_pp.py: assert inside the ranks, record outcomes to files)
# ---------------------------------------------------------------------------------------------


def _touch(path: str, text: str = "") -> None:
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


def _wait_for_file(path: str, timeout: float = 30.0) -> None:
    t0 = time.monotonic()
    while not os.path.exists(path):
        assert time.monotonic() - t0 < timeout, f"{path} did not appear within {timeout} s"
        time.sleep(0.01)


def _record(tmp: str, rank: int, **info: Any) -> None:
    _touch(os.path.join(tmp, f"result{rank}.json"), json.dumps(info))


def _result(tmp: str | Path, rank: int) -> dict[str, Any]:
    path = Path(tmp) / f"result{rank}.json"
    assert path.exists(), f"rank {rank} recorded no result (did it abort or hang?)"
    return json.loads(path.read_text())


class _Done:
    """A transport work that is already complete: stands in for a message never posted."""

    def wait(self, timeout: Any = None) -> bool:
        return True

    def is_completed(self) -> bool:
        return True


# ---------------------------------------------------------------------------------------------
# strategies: tensors of every payload dtype and awkward shape/stride, plain values two deep
# ---------------------------------------------------------------------------------------------

_KERNEL_DTYPES = sorted(SUPPORTED_DTYPES, key=str)
_VIEWS = ("contiguous", "transposed", "stepped", "expanded", "offset", "column")


def _random_tensor(dtype: torch.dtype, shape: tuple[int, ...], view: str, seed: int
                   ) -> torch.Tensor:
    """Random bytes (NaN payloads included) of ``shape``, laid out as the ``view`` kind says."""
    g = torch.Generator().manual_seed(seed)

    def raw(s: tuple[int, ...]) -> torch.Tensor:
        b = torch.randint(0, 256, (math.prod(s) * dtype.itemsize,), dtype=torch.uint8,
                          generator=g)
        if dtype == torch.bool:
            b &= 1
        return b.view(dtype).reshape(s)

    nd = len(shape)
    if view == "transposed" and nd >= 2:
        return raw(shape[:-2] + (shape[-1], shape[-2])).transpose(-1, -2)
    if view == "stepped" and nd >= 1:
        return raw((2 * shape[0] + 1,) + shape[1:])[1::2]
    if view == "expanded" and nd >= 1:
        return raw((1,) + shape[1:]).expand(shape)  # stride 0 in dim 0
    if view == "offset":
        return raw((math.prod(shape) + 3,))[3:].view(shape)  # storage offset
    if view == "column":
        return raw(shape + (3,))[..., 1]  # a strided slice of a larger tensor (0-dim too)
    return raw(shape)


@st.composite
def _tensors(draw: Any, max_ndim: int = 3, max_side: int = 5) -> torch.Tensor:
    dtype = draw(st.sampled_from(_KERNEL_DTYPES))
    shape = tuple(draw(st.lists(st.integers(0, max_side), max_size=max_ndim)))
    return _random_tensor(dtype, shape, draw(st.sampled_from(_VIEWS)),
                          draw(st.integers(0, 2**31 - 1)))


_WIRE_DTYPES = sorted(DTYPE_CODES, key=str)
_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)  # int64 and big ints
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=8)
    | st.binary(max_size=8)
    | st.sampled_from(_WIRE_DTYPES)
    | st.lists(st.integers(0, 2**40), max_size=3).map(torch.Size)
)


def _containers(inner: st.SearchStrategy) -> st.SearchStrategy:
    return (
        st.lists(inner, max_size=3)
        | st.lists(inner, max_size=3).map(tuple)
        | st.dictionaries(st.text(max_size=4) | st.integers(-5, 5), inner, max_size=3)
    )


_PLAIN = _SCALARS | _containers(_SCALARS) | _containers(_SCALARS | _containers(_SCALARS))


@st.composite
def _tensor_dicts(draw: Any, big: bool = False) -> dict[str, Any]:
    """A dict of tensors and plain values; with ``big``, sometimes a payload of up to 750 KB."""
    keys = draw(st.lists(st.text(max_size=6), unique=True, max_size=6))
    d: dict[str, Any] = {}
    for k in keys:
        d[k] = draw(_tensors()) if draw(st.booleans()) else draw(_PLAIN)
    if big and draw(st.integers(0, 3)) == 0:
        k = "big"
        while k in d:
            k += "_"
        d[k] = _random_tensor(torch.float32, (draw(st.integers(0, 3000)), 64),
                              draw(st.sampled_from(_VIEWS)), draw(st.integers(0, 2**31 - 1)))
    return d


_PROP = settings(max_examples=40, deadline=None, derandomize=True, database=None,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# ---------------------------------------------------------------------------------------------
# property: pack / unpack / unpack_into (torch path, and Triton under the interpreter)
# ---------------------------------------------------------------------------------------------

_CANARY = 0xA5


def _destination(t: torch.Tensor, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(destination, storage to inspect) for ``unpack_into``, pre-filled with canary bytes."""
    shape = tuple(t.shape)
    if kind == "larger_dim0" and shape:
        storage = torch.full(((shape[0] + 2) * math.prod(shape[1:]) * t.dtype.itemsize,),
                             _CANARY, dtype=torch.uint8)
        return storage.view(t.dtype).view((shape[0] + 2,) + shape[1:]), storage
    if kind == "transposed" and len(shape) >= 2:
        storage = torch.full((math.prod(shape) * t.dtype.itemsize,), _CANARY, dtype=torch.uint8)
        base = storage.view(t.dtype).view(shape[:-2] + (shape[-1], shape[-2]))
        return base.transpose(-1, -2), storage
    storage = torch.full((math.prod(shape) * t.dtype.itemsize,), _CANARY, dtype=torch.uint8)
    return storage.view(t.dtype).view(shape), storage


@pytest.mark.filterwarnings("ignore:ComplexHalf support is experimental")
@pytest.mark.parametrize("impl", ["torch", "triton"])
@_PROP
@given(tensors=st.lists(_tensors(), max_size=6),
       dest_kind=st.sampled_from(["fresh", "larger_dim0", "transposed"]))
def test_property_pack_unpack_unpack_into_bit_exact(impl: str, tensors: list[torch.Tensor],
                                                   dest_kind: str) -> None:
    """Random dtypes, shapes (empty, 0-dim) and strided views pack and unpack bit-exactly.

    ``pack`` writes each entry's bytes and nothing else of ``out`` (padding and a tail canary
    stay), ``unpack`` gives contiguous zero-copy views, ``unpack_into`` fills strided or
    larger-in-dim-0 destinations and leaves their other bytes alone.
    """
    layout = plan_layout(tensors)
    out = torch.full((layout.nbytes + 64,), _CANARY, dtype=torch.uint8)
    buf = pack(tensors, out=out[: layout.nbytes], layout=layout, impl=impl)
    assert buf.numel() == layout.nbytes
    if layout.nbytes:
        assert buf.data_ptr() == out.data_ptr(), "pack did not write into out"
    written = torch.zeros(out.numel(), dtype=torch.bool)
    for i, (t, e) in enumerate(zip(tensors, layout.entries)):
        written[e.offset : e.offset + e.nbytes] = True
        assert torch.equal(out[e.offset : e.offset + e.nbytes], raw_bytes(t)), f"entry {i} bytes"
    assert bool((out[~written] == _CANARY).all()), "pack wrote outside its entries"
    views = unpack(buf, layout)
    for i, (t, v) in enumerate(zip(tensors, views)):
        check_tensor(v, t, f"entry {i}")
        assert v.is_contiguous()
        assert v.untyped_storage().data_ptr() == out.untyped_storage().data_ptr(), "not a view"
    dests = [_destination(t, dest_kind) for t in tensors]
    unpack_into(buf, layout, [d for d, _ in dests], impl=impl)
    for i, (t, (d, storage)) in enumerate(zip(tensors, dests)):
        n = t.shape[0] if t.dim() else None
        got = d if n is None or d.shape[0] == n else d[:n]
        check_tensor(got, t, f"destination {i}")
        if got is not d:  # rows past n are untouched (compared as stored bytes)
            row = math.prod(t.shape[1:]) * t.element_size()
            assert bool((storage[n * row :] == _CANARY).all()), f"destination {i}: past row {n}"


# ---------------------------------------------------------------------------------------------
# property: one hop without processes (schema + header + pack, decode + unpack)
# ---------------------------------------------------------------------------------------------


def _local_hop(d: Mapping[str, Any], impl: str, slot_bytes: int) -> dict[str, Any]:
    """What a channel does to ``d`` minus the transport: the receiver sees only bytes."""
    schema = Schema.from_dict(d)
    tensors = [v for v in d.values() if isinstance(v, torch.Tensor)]
    values = tuple(v for v in d.values() if not isinstance(v, torch.Tensor))
    layout = plan_layout(tensors)
    payload = pack(tensors, layout=layout, impl=impl).clone()
    header = Header(schema.schema_id(), schema, tuple(tuple(t.shape) for t in tensors), values,
                    {"cpu": layout.nbytes} if tensors else {})
    slot, overflow = encode_header(header, slot_bytes=slot_bytes)
    cache: dict[int, Schema] = {}
    got, n = decode_header(slot, slot_bytes=slot_bytes, schema_cache=cache)
    if got is None:
        assert overflow is not None and n == len(overflow)
        got, _ = decode_header(slot, overflow, slot_bytes=slot_bytes, schema_cache=cache)
    assert got.payload_nbytes == header.payload_nbytes
    fields = got.schema.tensor_fields()
    layout2 = Layout.from_specs([(f.dtype, s) for f, s in zip(fields, got.shapes)])
    assert layout2 == layout, "the receiver's layout differs from the sender's"
    views = dict(zip([f.key for f in fields], unpack(payload, layout2)))
    values_it = iter(got.values)
    return {f.key: views[f.key] if isinstance(f, TensorField) else next(values_it)
            for f in got.schema.fields}


@pytest.mark.parametrize("impl", ["torch", "triton"])
@_PROP
@given(d=_tensor_dicts(), slot_bytes=st.sampled_from([64, 256, 17408]))
def test_property_dict_round_trips_through_wire_format_and_kernels(
        impl: str, d: dict[str, Any], slot_bytes: int) -> None:
    """A random dict survives header encode/decode plus pack/unpack: keys, order, bytes, types."""
    check_dict(_local_hop(d, impl, slot_bytes), d)


# ---------------------------------------------------------------------------------------------
# property: random dicts through a 2-rank channel (one run_ranks call per configuration)
# ---------------------------------------------------------------------------------------------

N_CHANNEL_DICTS = 90  # > the 64-entry schema cache: schemas are evicted and sent again


def _draw_dicts(n: int, seed: int) -> list[dict[str, Any]]:
    """``n`` dicts drawn by hypothesis (seeded), for one multi-process run."""
    out: list[dict[str, Any]] = []

    @hypothesis_seed(seed)
    @settings(max_examples=n, database=None, deadline=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(_tensor_dicts(big=True))
    def draw(d: dict[str, Any]) -> None:
        out.append(d)

    draw()
    return out[:n]


def _sidestep_known_defect(d: dict[str, Any]) -> dict[str, Any]:
    """Copies the tensors that trip the pinned progressive-pack defect into standard strides.

    A non-empty tensor that counts as contiguous but whose last stride is not 1 (a one-element
    strided view such as ``x[:, -1]`` of a (1, n) tensor) fails in the channel's chunked pack;
    ``test_one_element_strided_view_in_a_multi_message_payload`` pins that defect.
    """
    out = {}
    for k, v in d.items():
        if isinstance(v, torch.Tensor) and v.numel():
            try:
                v.contiguous().reshape(-1).view(torch.uint8)
            except RuntimeError:
                v = v.clone(memory_format=torch.contiguous_format)
        out[k] = v
    return out


def _channel_property_body(rank: int, world: int, dicts: list[dict[str, Any]],
                           chunk_bytes: int) -> None:
    if rank == 0:
        ch = TensorDictChannel(1, chunk_bytes=chunk_bytes)
        for d in dicts:  # all posted at once: isend never waits for the peer
            ch.isend(d)
        return
    ch = TensorDictChannel(0, chunk_bytes=chunk_bytes, timeout=TIMEOUT_S)
    pending: collections.deque = collections.deque()
    posted = 0
    for i, want in enumerate(dicts):
        while posted < len(dicts) and len(pending) < 3:  # 3 receives in flight
            pending.append(ch.irecv())
            posted += 1
        got = pending.popleft().wait()
        try:
            check_dict(got, want)
        except AssertionError as e:
            raise AssertionError(f"dict #{i} of {len(dicts)}: {e}\nsent: {want!r}") from None
    ch.close()


@pytest.mark.parametrize("chunk_bytes", [DEFAULT_CHUNK_BYTES, 4096])
def test_property_random_dicts_through_a_two_rank_channel(chunk_bytes: int) -> None:
    """90 hypothesis-drawn dicts, then the first 10 again, arrive in order and bit-exact.

    ``chunk_bytes=4096`` sends every payload above 4 KiB as several messages (packed
    progressively) and caps the inline room of the head message at 4 KiB.
    """
    dicts = [_sidestep_known_defect(d)
             for d in _draw_dicts(N_CHANNEL_DICTS, seed=20_240 + chunk_bytes)]
    assert len(dicts) == N_CHANNEL_DICTS
    dicts += dicts[:10]  # their schemas were evicted from the receiver's cache: sent again
    run_ranks(2, _channel_property_body, dicts, chunk_bytes, timeout_s=TIMEOUT_S)


# ---------------------------------------------------------------------------------------------
# header fuzzing at the channel level
# ---------------------------------------------------------------------------------------------

FUZZ_SLOT = 256
FUZZ_LIMITS = Limits(max_payload_bytes=1 << 20, max_entries=64, max_ndim=8,
                     max_plain_bytes=1 << 14, max_depth=8, max_key_bytes=64, max_items=4096)
_CRAFT_LIMITS = Limits(max_plain_bytes=1 << 20, max_depth=64)  # the hostile sender's own
_PREFIX_FMT = struct.Struct("<4sBBHIIQQQQ")


@dataclasses.dataclass(frozen=True)
class _FuzzCase:
    name: str
    slot: bytes  # exactly FUZZ_SLOT bytes, sent on the header tag
    overflow: bytes | None  # sent next iff the receiver will post an overflow receive
    expect: str  # "refuse", "accept" or "either"
    match: str = ""  # regex the refusal must match


def _fuzz_case(name: str, slot: bytes, base_overflow: bytes | None, expect: str,
               match: str = "") -> _FuzzCase:
    """Sends an overflow exactly when the receiver's own validation will ask for one."""
    assert len(slot) == FUZZ_SLOT
    try:
        n = overflow_nbytes(slot, slot_bytes=FUZZ_SLOT, limits=FUZZ_LIMITS)
    except WireError:
        n = 0
    overflow = (base_overflow or b"")[:n].ljust(n, b"\0") if n else None
    return _FuzzCase(name, slot, overflow, expect, match)


_S1 = Schema((TensorField("h", torch.bfloat16, 2, "cpu"), PlainField("v"),
              TensorField("p", torch.int64, 1, "cpu"), PlainField("w")))
_S1_SHAPES = ((3, 8), (3,))
_S1_VALUES: tuple[Any, ...] = (5, [1.5, "ab", (None, True)])


def _nbytes(schema: Schema, shapes: tuple[tuple[int, ...], ...]) -> int:
    return Layout.from_specs([(f.dtype, s) for f, s in zip(schema.tensor_fields(), shapes)]).nbytes


def _slot(schema: Schema = _S1, shapes: tuple = _S1_SHAPES, values: tuple = _S1_VALUES,
          payload: dict[str, int] | None = None, *, with_schema: bool = True,
          pickle: bool = False) -> tuple[bytearray, bytes | None]:
    if payload is None:
        payload = {"cpu": _nbytes(schema, shapes)} if schema.tensor_fields() else {}
    h = Header(schema.schema_id(), schema if with_schema else None, shapes, values, payload)
    slot, overflow = encode_header(h, slot_bytes=FUZZ_SLOT, allow_pickle=pickle,
                                   limits=_CRAFT_LIMITS)
    return bytearray(slot), overflow


def _set(slot: bytearray, offset: int, fmt: str, value: Any) -> bytearray:
    struct.pack_into(fmt, slot, offset, value)
    return slot


def _rehash(slot: bytearray) -> bytearray:
    """Makes the schema id match edited schema bytes, as a hostile peer would."""
    (n,) = struct.unpack_from("<I", slot, 48)
    sid = int.from_bytes(hashlib.blake2b(bytes(slot[52 : 52 + n]), digest_size=8).digest(),
                         "little")
    return _set(slot, 24, "<Q", sid)


def _replace(slot: bytearray, old: bytes, new: bytes) -> bytearray:
    i = bytes(slot).index(old)
    slot[i : i + len(old)] = new
    return slot


def _dedicated_fuzz_cases() -> list[_FuzzCase]:
    cap = FUZZ_SLOT - 48
    c: list[_FuzzCase] = []

    def add(name: str, made: tuple[bytearray, bytes | None] | bytearray, expect: str,
            match: str = "", overflow: bytes | None = None) -> None:
        if isinstance(made, tuple):
            slot, overflow = made
        else:
            slot = made
        c.append(_fuzz_case(name, bytes(slot), overflow, expect, match))

    s1_n = _nbytes(_S1, _S1_SHAPES)
    add("valid header (control)", _slot(), "accept")
    add("payload size larger than the shapes need", _slot(payload={"cpu": 1000}), "refuse",
        rf"announces 1000 bytes for the cpu payload, its shapes need {s1_n}")
    add("payload size smaller than the shapes need", _slot(payload={"cpu": 16}), "refuse",
        r"announces 16 bytes for the cpu payload")
    add("no payload announced for the tensors", _slot(payload={}), "refuse",
        r"announces None bytes for the cpu payload")
    add("payload for a device type without tensors",
        _slot(payload={"cpu": s1_n, "meta": 16}), "refuse", r"payloads \['meta'\] with no")
    add("announced payload over max_payload_bytes", _slot(payload={"cpu": 1 << 40}), "refuse",
        r"cpu payload of 1099511627776 bytes, more than max_payload_bytes=1048576")
    big = ((1 << 20, 8), (3,))
    add("tensor shape over max_payload_bytes",
        _slot(shapes=big, payload={"cpu": _nbytes(_S1, big)}), "refuse",
        r"key 'h' shape \(1048576, 8\) is 16777216 bytes, more than max_payload_bytes")
    add("unknown schema id (schema never sent)", _slot(with_schema=False), "refuse",
        r"unknown schema id")
    add("schema bytes that do not hash to the schema id",
        _replace(_slot()[0], b"\x01\x00h", b"\x01\x00i"), "refuse", r"schema bytes hash to")
    add("wrong magic", _replace(_slot()[0], b"PPK1", b"XXXX"), "refuse", r"bad header magic")
    add("other wire version", _set(_slot()[0], 4, "<B", 2), "refuse", r"header version 2")
    add("unknown flag bits", _set(_slot()[0], 5, "<B", 0x81), "refuse", r"unknown flags 0x81")
    add("non-zero reserved field", _set(_slot()[0], 6, "<H", 7), "refuse", r"reserved field")
    add("peer's slot size differs", _set(_slot()[0], 8, "<I", 512), "refuse",
        r"peer uses slot_bytes=512")
    add("body length past the slot", _set(_slot()[0], 12, "<I", 1000), "refuse",
        r"body length 1000 exceeds")
    huge = _slot()[0]
    huge[5] |= 2  # the overflow flag
    _set(huge, 12, "<I", cap)
    add("huge overflow length (2**40)", _set(huge, 40, "<Q", 1 << 40), "refuse",
        r"overflow of 1099511627776 bytes, more than the limits allow")
    add("overflow length without the overflow flag", _set(_slot()[0], 40, "<Q", 100), "refuse",
        r"overflow length 100 without the overflow flag")
    tail = _slot()[0]
    tail[-1] = 1
    add("non-zero padding after the body", tail, "refuse", r"non-zero bytes after its body")
    marker = 0x0123456789
    neg = _slot(shapes=((3, marker), (3,)), payload={"cpu": 0})[0]
    add("negative dim", _replace(neg, struct.pack("<q", marker), struct.pack("<q", -5)),
        "refuse", r"key 'h' has a negative dim")
    add("unknown dtype code (schema rehashed)",
        _rehash(_replace(_slot()[0], b"\x01\x00h\x0b", b"\x01\x00h\x63")), "refuse",
        r"unknown dtype code 99")
    add("invalid device type name (schema rehashed)",
        _rehash(_replace(_slot()[0], b"\x03cpu", b"\x03c-u")), "refuse",
        r"invalid device type 'c-u'")
    deep = Schema((TensorField("d", torch.uint8, 9, "cpu"),))
    add("ndim over max_ndim", _slot(deep, ((1,) * 9,), ()), "refuse",
        r"ndim 9, more than max_ndim=8")
    add("key over max_key_bytes", _slot(Schema((PlainField("k" * 100),)), (), (1,)), "refuse",
        r"key of 100 bytes, more than max_key_bytes=64")
    wide = Schema(tuple(PlainField(f"k{i}") for i in range(65)))
    add("more fields than max_entries", _slot(wide, (), (None,) * 65), "refuse",
        r"65 fields, more than max_entries=64")
    add("plain values over max_plain_bytes", _slot(values=(5, "x" * 20_000)), "refuse",
        r"more than max_plain_bytes=16384")
    nested: Any = 1
    for _ in range(10):
        nested = [nested]
    add("plain value nested deeper than max_depth", _slot(values=(5, nested)), "refuse",
        r"deeper than max_depth=8")
    add("more container items than max_items", _slot(values=(5, [None] * 5000)), "refuse",
        r"more container items than max_items")
    add("pickled value without allow_pickle", _slot(values=(5, {1, 2}), pickle=True), "refuse",
        r"pickled value but allow_pickle is False")
    sliced = Schema((TensorField("h", torch.float32, 2, "cpu", True),))
    add("sliced key but no all_gather_group", _slot(sliced, ((4, 8),), ()), "refuse",
        r"key 'h': the sender sliced it for an all-gather")
    trailing = _slot()[0]
    (body_len,) = struct.unpack_from("<I", trailing, 12)
    add("trailing byte after the plain values", _set(_set(trailing, 12, "<I", body_len + 1),
                                                     48 + body_len, "<B", 1), "refuse",
        r"1 trailing bytes")
    add("truncated body", _set(_slot()[0], 12, "<I", body_len - 3), "refuse",
        r"truncated or malformed|runs past|non-zero bytes")
    return c


def _mutated_fuzz_cases(n: int, seed: int) -> list[_FuzzCase]:
    """Random bytes, random bodies behind a valid prefix, and 1-8 byte mutations of valid slots.

    Base slots use shapes of rank <= 2 without zero dims (the stride-overflow case of an empty
    tensor has its own regression test below).
    """
    rng = random.Random(seed)
    bases = [
        _slot(),
        _slot(values=(5, {"k": b"x" * 300})),  # needs an overflow message
        _slot(Schema((TensorField("ids", torch.int32, 1, "cpu"), PlainField("shape"),
                      PlainField("nested"), TensorField("x", torch.float16, 2, "cpu"))),
              ((7,), (2, 5)), (torch.Size([2, 3]), {1: [[], ()], "z": -0.0})),
        _slot(values=(torch.float8_e4m3fn, ("ab", 2**70))),
    ]
    cases = []
    for i in range(n):
        slot, overflow = rng.choice(bases)
        slot = bytearray(slot)
        kind = rng.random()
        if kind < 0.08:
            slot = bytearray(rng.randbytes(FUZZ_SLOT))
        elif kind < 0.16:
            body = rng.randbytes(rng.randrange(FUZZ_SLOT - 48 + 1))
            slot[48:] = body.ljust(FUZZ_SLOT - 48, b"\0")
            _set(slot, 12, "<I", len(body))
        else:
            (body_len,) = struct.unpack_from("<I", slot, 12)
            width = rng.choice([1, 1, 2, 4, 8])
            if overflow is not None and rng.random() < 0.3:  # mutate the overflow instead
                ov = bytearray(overflow)
                pos = rng.randrange(max(1, len(ov) - width + 1))
                ov[pos : pos + width] = rng.randbytes(width)[: len(ov) - pos]
                cases.append(_fuzz_case(f"mutation {i} (overflow)", bytes(slot), bytes(ov),
                                        "either"))
                continue
            pos = rng.randrange(min(FUZZ_SLOT, 48 + body_len + 8) - width + 1)
            slot[pos : pos + width] = rng.randbytes(width)
        cases.append(_fuzz_case(f"mutation {i}", bytes(slot), overflow, "either"))
    return cases


def _fuzz_body(rank: int, world: int, cases: list[_FuzzCase], tmp: str) -> None:
    if rank == 0:
        works = []
        for case in cases:
            for msg in (case.slot, case.overflow):
                if msg is not None:
                    buf = torch.frombuffer(bytearray(msg), dtype=torch.uint8)
                    works.append((pp_transport.isend(buf, 1, None, pp_transport.HEADER_TAG),
                                  buf))
        for w, _ in works:
            w.wait()
        return
    posted: list[tuple[int, int, str, torch.Tensor]] = []
    real_irecv = pp_transport.irecv

    def recording_irecv(buf: torch.Tensor, peer: int, group: Any, tag: int, **kw: Any) -> Any:
        posted.append((tag, buf.numel(), buf.device.type, buf))
        if tag == pp_transport.PAYLOAD_TAG:
            return _Done()  # recorded, never posted: the fuzzing sender sends no payloads
        return real_irecv(buf, peer, group, tag, **kw)

    pp_transport.irecv = recording_irecv
    results = []
    for i, case in enumerate(cases):
        posted.clear()
        ch = TensorDictChannel(0, slot_bytes=FUZZ_SLOT, limits=FUZZ_LIMITS, timeout=TIMEOUT_S)
        outcome, error = "accepted", ""
        try:
            ch.irecv_posted()
        except ValueError as e:  # WireError is a ValueError
            outcome, error = "refused", f"{type(e).__name__}: {e}"
        except Exception as e:  # noqa: BLE001 - any other type is a finding, recorded below
            outcome, error = "other", f"{type(e).__name__}: {e}"
        heads = [(n, buf) for tag, n, _, buf in posted if tag == pp_transport.HEADER_TAG]
        payloads = [(n, dev) for tag, n, dev, _ in posted if tag == pp_transport.PAYLOAD_TAG]
        where = f"case {i} ({case.name}): {outcome} {error!r}"
        assert outcome != "other", f"{where}: not a ValueError/WireError"
        want_heads = [FUZZ_SLOT] + ([len(case.overflow)] if case.overflow is not None else [])
        assert [n for n, _ in heads] == want_heads, f"{where}: header receives {heads}"
        assert want_heads[-1] <= max(FUZZ_SLOT, max_overflow_nbytes(FUZZ_LIMITS)), where
        assert bytes(heads[0][1].numpy()) == case.slot, f"{where}: out of step with the sender"
        if outcome == "refused":
            assert case.expect != "accept", where
            assert not payloads, f"{where}: posted payload receives {payloads} before refusing"
            assert re.search(case.match, error), f"{where}: does not match {case.match!r}"
        else:
            assert case.expect != "refuse", f"{where}: a corrupt header was accepted"
            header, _ = decode_header(case.slot, case.overflow, slot_bytes=FUZZ_SLOT,
                                      limits=FUZZ_LIMITS, schema_cache={})
            per_dev: dict[str, int] = {}
            for n, dev in payloads:
                per_dev[dev] = per_dev.get(dev, 0) + n
                assert n <= FUZZ_LIMITS.max_payload_bytes, f"{where}: receive of {n} bytes"
            announced = {d: n for d, n in header.payload_nbytes.items() if n}
            assert per_dev == announced, f"{where}: posted {per_dev}, announced {announced}"
        results.append({"name": case.name, "outcome": outcome, "error": error[:200]})
    _touch(os.path.join(tmp, "fuzz.json"), json.dumps(results))


def test_channel_refuses_corrupt_headers_before_posting_any_payload_receive(tmp_path) -> None:
    """Hostile slot bytes on the header tag: each named defect raises a ValueError naming it.

    The receiver posts exactly one slot receive (plus an overflow receive only when the
    slot's overflow length passed validation) and no payload receive before it refuses; the
    valid control header is accepted and posts a payload receive of exactly the announced size.
    """
    cases = _dedicated_fuzz_cases()
    run_ranks(2, _fuzz_body, cases, str(tmp_path), timeout_s=TIMEOUT_S)
    results = json.loads((tmp_path / "fuzz.json").read_text())
    assert len(results) == len(cases)
    assert results[0]["outcome"] == "accepted"
    assert all(r["outcome"] == "refused" for r in results[1:]), results


def test_channel_survives_random_and_mutated_headers(tmp_path) -> None:
    """400 random or mutated slots: each is refused (ValueError, no payload receive posted)
    or accepted with payload receives of exactly the sizes the slot announced, within limits."""
    cases = _mutated_fuzz_cases(400, seed=7)
    run_ranks(2, _fuzz_body, cases, str(tmp_path), timeout_s=TIMEOUT_S)
    results = json.loads((tmp_path / "fuzz.json").read_text())
    assert len(results) == len(cases)
    refused = sum(r["outcome"] == "refused" for r in results)
    assert refused > len(cases) // 2, "the mutations hardly ever broke a header"
    assert refused < len(cases), "no mutation was harmless (seq / fingerprint bytes)"


# ---------------------------------------------------------------------------------------------
# faults: the survivor raises within the timeout, naming the peer and the step
# ---------------------------------------------------------------------------------------------

CHANNEL_TIMEOUT_S = 2.0


def _fault_hop(i: int, tokens: int = 4) -> dict[str, Any]:
    g = torch.Generator().manual_seed(900 + i)
    # "mb" is a 0-dim tensor, not a plain value: a declaration would make it a constant
    return {"h": torch.randn(tokens, 64, generator=g), "mb": torch.tensor(i),
            "__msg_type__": "proxy"}


def _header_only_body(rank: int, world: int, mode: str, tmp: str) -> None:
    if rank == 0:
        ch = TensorDictChannel(1)
        ch.isend(_fault_hop(0, tokens=1))  # 256 payload bytes: hop 1 inlines only 256
        real_isend = pp_transport.isend

        def drop_payload(buf: torch.Tensor, peer: int, group: Any, tag: int, **kw: Any) -> Any:
            if tag == pp_transport.PAYLOAD_TAG:
                return _Done()
            return real_isend(buf, peer, group, tag, **kw)

        pp_transport.isend = drop_payload
        ch.isend(_fault_hop(1, tokens=300))  # its header goes out, its 77 KB payload never
        _wait_for_file(os.path.join(tmp, "header1"), timeout=TIMEOUT_S)
        if mode == "exits":
            os._exit(0)  # after the header, before the payload
        _wait_for_file(os.path.join(tmp, "result1.json"), timeout=TIMEOUT_S)  # alive, silent
        return
    ch = TensorDictChannel(0, timeout=CHANNEL_TIMEOUT_S if mode == "stalls" else TIMEOUT_S)
    check_dict(ch.recv(), _fault_hop(0, tokens=1))
    _, handles, _ = ch.irecv_posted()  # hop 1's header arrived; its payload receive is posted
    assert handles, "hop 1 should need a payload message"
    _touch(os.path.join(tmp, "header1"))
    t0 = time.monotonic()
    try:
        for h in handles:
            h.wait()
    except Exception as e:  # noqa: BLE001 - the expected outcome, checked by the test
        _record(tmp, rank, raised=True, error=str(e), elapsed=time.monotonic() - t0)
    else:
        _record(tmp, rank, raised=False, elapsed=time.monotonic() - t0)


@pytest.mark.parametrize("mode", ["exits", "stalls"])
def test_sender_dies_or_stalls_between_header_and_payload(tmp_path, mode: str) -> None:
    """The payload wait raises, naming rank 0 and receive #1: at once when the sender's process
    exits, after the channel timeout (2 s) when it stays alive without sending."""
    run_ranks(2, _header_only_body, mode, str(tmp_path), timeout_s=TIMEOUT_S)
    res = _result(tmp_path, 1)
    assert res["raised"], "the payload wait returned although the payload was never sent"
    assert "payload of receive #1 from rank 0" in res["error"], res
    limit = 5.0 if mode == "exits" else CHANNEL_TIMEOUT_S + 3.0
    assert res["elapsed"] < limit, res
    if mode == "stalls":
        assert res["elapsed"] >= 0.9 * CHANNEL_TIMEOUT_S, res


def _receiver_exits_body(rank: int, world: int, tmp: str) -> None:
    if rank == 1:
        ch = TensorDictChannel(0)
        check_dict(ch.recv(), _fault_hop(0))
        _wait_for_file(os.path.join(tmp, "posted"), timeout=TIMEOUT_S)
        time.sleep(0.2)
        os._exit(0)  # hop 1's send is still outstanding
    ch = TensorDictChannel(1)
    ch.isend(_fault_hop(0))
    handles = ch.isend(_fault_hop(1, tokens=5000))  # 1.3 MB that nobody will receive
    _touch(os.path.join(tmp, "posted"))
    t0 = time.monotonic()
    info: dict[str, Any] = {}
    try:
        for h in handles:
            h.wait()
    except Exception as e:  # noqa: BLE001 - the expected outcome, checked by the test
        info["wait_error"] = str(e)
    info["wait_elapsed"] = time.monotonic() - t0
    assert REAPER.drain(TIMEOUT_S), "the reaper did not finish the failed send"
    try:
        ch.isend(_fault_hop(2))
    except Exception as e:  # noqa: BLE001
        info["later_error"] = str(e)
    _record(tmp, rank, **info)


def test_receiver_dies_with_a_send_outstanding(tmp_path) -> None:
    """The outstanding send's wait() raises naming rank 1 and send #1; the next isend re-raises
    it rather than posting into a dead peer."""
    run_ranks(2, _receiver_exits_body, str(tmp_path), timeout_s=TIMEOUT_S)
    res = _result(tmp_path, 0)
    assert "send #1 to rank 1 failed" in res.get("wait_error", ""), res
    assert res["wait_elapsed"] < TIMEOUT_S / 2, res
    assert "an earlier send #1 to rank 1 failed" in res.get("later_error", ""), res


def _silent_after_two_body(rank: int, world: int, mode: str, tmp: str) -> None:
    declared = Declared.from_example(_fault_hop(0)) if mode == "declared" else None
    if rank == 0:
        ch = TensorDictChannel(1, declared=declared)
        ch.isend(_fault_hop(0))
        ch.isend(_fault_hop(1))
        _wait_for_file(os.path.join(tmp, "result1.json"), timeout=TIMEOUT_S)  # then silence
        return
    ch = TensorDictChannel(0, declared=declared, timeout=CHANNEL_TIMEOUT_S)
    for i in range(2):
        check_dict(ch.irecv(num_tokens=4).wait(), _fault_hop(i))
    info: dict[str, Any] = {}
    t0 = time.monotonic()
    try:
        ch.irecv(num_tokens=4).wait()
    except Exception as e:  # noqa: BLE001 - the expected outcome, checked by the test
        info["error"] = str(e)
    info["elapsed"] = time.monotonic() - t0
    try:
        ch.irecv(num_tokens=4).wait(timeout=CHANNEL_TIMEOUT_S)
    except Exception as e:  # noqa: BLE001
        info["next_error"] = str(e)
    info["next_elapsed"] = time.monotonic() - t0 - info["elapsed"]
    ch.close()
    _record(tmp, rank, **info)


@pytest.mark.parametrize("mode", ["header", "declared"])
def test_silent_peer_times_out_naming_peer_and_step(tmp_path, mode: str) -> None:
    """After two hops the peer stays alive but sends nothing: TensorDictChannel(timeout=2)
    raises within 2-5 s, naming rank 0 and receive #2; the next receive fails too, at once."""
    run_ranks(2, _silent_after_two_body, mode, str(tmp_path), timeout_s=TIMEOUT_S)
    res = _result(tmp_path, 1)
    what = "header" if mode == "header" else "payload"
    assert f"{what} of receive #2 from rank 0 failed" in res.get("error", ""), res
    assert 0.9 * CHANNEL_TIMEOUT_S <= res["elapsed"] < CHANNEL_TIMEOUT_S + 3, res
    assert "next_error" in res, "a receive after the failure returned"
    assert res["next_elapsed"] < 1.0, res
    if mode == "header":  # a failed header receive marks the channel broken
        assert "the channel from rank 0 is out of step" in res["next_error"], res


# ---------------------------------------------------------------------------------------------
# bad input: raises on the sender, nothing reaches the wire; the README table
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Point:
    x: int


class _Color(enum.IntEnum):
    RED = 1


def _self_referencing() -> list[Any]:
    v: list[Any] = [1]
    v.append(v)
    return v


def _deep(n: int) -> Any:
    v: Any = 1
    for _ in range(n):
        v = [v]
    return v


def _good(i: int) -> dict[str, Any]:
    return {"x": torch.arange(4) + i, "bad": i, "big": torch.full((40, 200), float(i))}


def _bad_value(v: Any) -> Callable[[], dict[str, Any]]:
    # the same keys as _good: a failed send that cached its schema would show on the next hop
    return lambda: {"x": torch.arange(4), "bad": v, "big": torch.zeros(40, 200)}


@dataclasses.dataclass(frozen=True)
class _Bad:
    what: str
    build: Callable[[], Any]
    accepted: bool = False  # not an error after all: the dict arrives and is checked


_GENERIC_BAD = [
    _Bad("not a Mapping (a list of tensors)", lambda: [torch.arange(3)]),
    _Bad("non-str key", lambda: {"x": torch.arange(3), 3: "v"}),
    _Bad("key not encodable as UTF-8 (lone surrogate)", lambda: {"\ud800": 1}),
    _Bad("key of more than 65535 UTF-8 bytes", lambda: {"k" * 65536: 1}),
    _Bad("value of an unsupported type (`object()`)", _bad_value(object())),
    _Bad("dataclass instance", _bad_value(_Point(1))),
    _Bad("`IntEnum` member (a subclass of int)", _bad_value(_Color.RED)),
    _Bad("`set`", _bad_value({1, 2})),
    _Bad("unencodable value inside a container", _bad_value([1, (2, {"k": object()})])),
    _Bad("tensor inside a list", _bad_value([torch.ones(2)])),
    _Bad("tensor inside a dict value", _bad_value({"t": torch.ones(2)})),
    _Bad("value nested deeper than `max_depth` (32)", _bad_value(_deep(40))),
    _Bad("self-referencing list", _bad_value(_self_referencing())),
    _Bad("unsupported dtype (`torch.quint8`)",
         lambda: {"q": torch.quantize_per_tensor(torch.rand(4), 0.1, 0, torch.quint8)}),
    _Bad("dtype with a wire code but no kernel support (`float8_e8m0fnu`)",
         lambda: {"e": torch.zeros(4, dtype=torch.float8_e8m0fnu)}),
    _Bad("nested tensor (`torch.nested`)",
         lambda: {"n": torch.nested.nested_tensor([torch.zeros(2), torch.zeros(3)])}),
    _Bad("mixed devices in one dict (cpu + meta)",
         lambda: {"x": torch.arange(4), "m": torch.empty(3, 2, device="meta")}, accepted=True),
    _Bad("tensor that requires grad", lambda: {"w": torch.ones(3, requires_grad=True)},
         accepted=True),
]


def _decl_dict(i: int, tokens: int = 4) -> dict[str, Any]:
    g = torch.Generator().manual_seed(300 + i)
    return {"h": torch.randn(tokens, 8, generator=g).to(torch.bfloat16),
            "pos": torch.arange(tokens) + i, "__msg_type__": "proxy"}


def _decl_bad(**change: Any) -> Callable[[], dict[str, Any]]:
    def build() -> dict[str, Any]:
        d = _decl_dict(0)
        for k, v in change.items():
            if v is _DROP:
                del d[k]
            else:
                d[k] = v() if callable(v) else v
        return d
    return build


_DROP = object()
_DECLARED_BAD = [
    _Bad("declared: dtype differs", _decl_bad(h=lambda: torch.zeros(4, 8, dtype=torch.float16))),
    _Bad("declared: trailing dim differs",
         _decl_bad(h=lambda: torch.zeros(4, 9, dtype=torch.bfloat16))),
    _Bad("declared: ndim differs",
         _decl_bad(h=lambda: torch.zeros(4, 8, 1, dtype=torch.bfloat16))),
    _Bad("declared: token counts disagree between keys", _decl_bad(pos=lambda: torch.arange(5))),
    _Bad("declared: device differs (meta)",
         _decl_bad(h=lambda: torch.zeros(4, 8, dtype=torch.bfloat16, device="meta"))),
    _Bad("declared: constant differs", _decl_bad(__msg_type__="other")),
    _Bad("declared: plain value where a tensor is declared", _decl_bad(h=7)),
    _Bad("declared: tensor where a constant is declared",
         _decl_bad(__msg_type__=lambda: torch.zeros(1))),
    _Bad("declared: key missing", _decl_bad(pos=_DROP)),
    _Bad("declared: extra key", lambda: {**_decl_dict(0), "extra": 1}),
    _Bad("declared: keys reordered", lambda: dict(reversed(list(_decl_dict(0).items())))),
]

_SMALL_LIMITS = Limits(max_plain_bytes=1024, max_depth=4)
_LIMITS_BAD = [
    _Bad("value over `max_plain_bytes` (`Limits(max_plain_bytes=1024)`)",
         _bad_value("x" * 2000)),
    _Bad("plain values together over `max_plain_bytes` (1024)",
         lambda: {"a": "x" * 600, "b": "y" * 600}),
    _Bad("value nested deeper than `max_depth` (`Limits(max_depth=4)`)", _bad_value(_deep(5))),
]

_PHASES = [("functional", _GENERIC_BAD), ("channel", _GENERIC_BAD),
           ("declared channel", _DECLARED_BAD), ("channel with small Limits", _LIMITS_BAD)]


def _bad_input_body(rank: int, world: int, tmp: str) -> None:
    declared = Declared.from_example(_decl_dict(0))
    if rank == 0:
        rows = []
        for api, cases in _PHASES:
            if api == "functional":
                send = lambda d: isend_tensor_dict(d, 1)  # noqa: E731
            else:
                ch = TensorDictChannel(
                    1, declared=declared if api == "declared channel" else None,
                    limits=_SMALL_LIMITS if api == "channel with small Limits" else Limits())
                send = ch.isend
            good = _decl_dict if api == "declared channel" else _good
            send(good(0))
            for i, case in enumerate(cases, start=1):
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # torch.nested's prototype warning
                    bad = case.build()
                try:
                    send(bad)
                except Exception as e:  # noqa: BLE001 - recorded for the table
                    assert not case.accepted, f"{api}: {case.what}: {e!r}"
                    rows.append({"what": case.what, "api": api, "type": type(e).__name__,
                                 "message": str(e)})
                else:
                    assert case.accepted, f"{api}: {case.what} was sent without an error"
                    rows.append({"what": case.what, "api": api, "type": "accepted",
                                 "message": ""})
                send(good(i))  # must arrive intact: the failure put nothing on the wire
        _touch(os.path.join(tmp, "rows.json"), json.dumps(rows))
        return
    for api, cases in _PHASES:
        if api == "functional":
            recv = lambda: recv_tensor_dict(0)  # noqa: E731
        else:
            ch = TensorDictChannel(0, declared=declared if api == "declared channel" else None,
                                   timeout=TIMEOUT_S)
            recv = lambda: ch.irecv(num_tokens=4).wait()  # noqa: E731, B023
        good = _decl_dict if api == "declared channel" else _good
        check_dict(recv(), good(0))
        for i, case in enumerate(cases, start=1):
            if case.accepted:
                want = case.build()
                got = recv()
                check_dict(got, want)
                assert not any(isinstance(v, torch.Tensor) and v.requires_grad
                               for v in got.values())
            try:
                check_dict(recv(), good(i))
            except Exception as e:
                raise AssertionError(f"{api}: the good dict after {case.what!r}: {e}") from e


def _table_cell(text: str, width: int = 110) -> str:
    text = re.sub(r"0x[0-9a-f]{6,}", "0x…", text.splitlines()[0] if text else "")
    text = text.replace("|", "\\|")
    return text if len(text) <= width else text[: width - 1] + "…"


def _table(rows: list[dict[str, str]]) -> str:
    merged: dict[tuple[str, str, str], list[str]] = {}
    for r in rows:
        key = (r["what"], r["type"], _table_cell(r["message"]))
        merged.setdefault(key, []).append(r["api"])
    lines = ["| bad input | API | raises | message (prefix) |", "|---|---|---|---|"]
    for (what, typ, msg), apis in merged.items():
        raises = "— (accepted)" if typ == "accepted" else f"`{typ}`"
        lines.append(f"| {what} | {' + '.join(apis)} | {raises} | {msg} |")
    return "\n".join(lines)


def test_bad_input_table(tmp_path) -> None:
    """Every kind of bad input raises on the sender and nothing reaches the wire.

    After each failure a good dict is sent through the same API; it must arrive intact (a
    failed send that put a header on the wire, cached a schema or advanced the head size would
    corrupt or break it). The rows become the table in README.md ("Bad input and trust
    model"); set PIPEPACK_BAD_INPUT_TABLE=path to write the table to a file.
    """
    run_ranks(2, _bad_input_body, str(tmp_path), timeout_s=TIMEOUT_S)
    rows = json.loads((tmp_path / "rows.json").read_text())
    assert len(rows) == sum(len(cases) for _, cases in _PHASES)
    for r in rows:
        if r["type"] != "accepted":
            assert r["type"] in ("TypeError", "ValueError", "RuntimeError"), r
    table = _table(rows)
    out = os.environ.get("PIPEPACK_BAD_INPUT_TABLE")
    if out:
        Path(out).write_text(table + "\n")
    readme = README.read_text()
    missing = [line for line in table.splitlines()[2:] if line not in readme]
    assert not missing, ("README.md's bad-input table is out of date; the rows that changed:\n"
                         + "\n".join(missing) + "\n\nthe whole table:\n" + table)


# ---------------------------------------------------------------------------------------------
# known defects (each fails today; strict: a fix turns it into an XPASS that must be unmarked)
# ---------------------------------------------------------------------------------------------


def _pack_failure_body(rank: int, world: int, mode: str, tmp: str) -> None:
    if mode == "declared":
        declared = Declared.from_example(_decl_dict(0))
        good: Callable[[int], dict[str, Any]] = _decl_dict
        bad = _decl_dict(1)
        bad["h"] = bad["h"].to_sparse()  # the declared dtype and shape; pack() cannot read it
    else:
        declared = None
        good = lambda i: {"x": torch.arange(4) + i}  # noqa: E731 - 32 payload bytes
        # a new schema and a 4 KB payload: state the failed send must not leave behind
        bad = {"x": torch.arange(4), "s": torch.eye(3).to_sparse(), "y": torch.zeros(1000)}
    if rank == 0:
        ch = TensorDictChannel(1, declared=declared)
        ch.isend(good(0))
        try:
            ch.isend(bad)
        except Exception as e:  # noqa: BLE001 - the bad send must raise; what follows matters
            _touch(os.path.join(tmp, "raised"), repr(e))
        ch.isend(good(2))
        _wait_for_file(os.path.join(tmp, "result1.json"), timeout=5)
        return
    # header path: gloo aborts this process (the defect); keep pytest's faulthandler from
    # dumping the forked rank's stack into the test output
    faulthandler.disable()
    ch = TensorDictChannel(0, declared=declared, timeout=5)
    info: dict[str, Any] = {}
    try:
        check_dict(ch.irecv(num_tokens=4).wait(), good(0))
        check_dict(ch.irecv(num_tokens=4).wait(), good(2))
        info["ok"] = True
    except Exception as e:  # noqa: BLE001
        info["error"] = repr(e)
    _record(tmp, rank, **info)


@pytest.mark.parametrize("mode", ["header", "declared"])
def test_pack_failure_leaves_the_channel_in_step(tmp_path, mode: str) -> None:
    """Reproducer: ch.isend(good0); ch.isend({..., "x": t.to_sparse()}) raises RuntimeError
    from copy_(); ch.isend(good2) -> the receiver aborts (header) or refuses it (declared)."""
    run_ranks(2, _pack_failure_body, mode, str(tmp_path), timeout_s=TIMEOUT_S)
    assert (tmp_path / "raised").exists(), "the sparse tensor was sent without an error"
    res = _result(tmp_path, 1)
    assert res.get("ok"), res


_PEER_REFUSES = {
    "ndim 17 (> max_ndim=16)": lambda: {"x": torch.zeros([1] * 17)},
    "key of 2000 bytes (> max_key_bytes=1024)": lambda: {"k" * 2000: 1},
    "5000 keys (> max_entries=4096)": lambda: {f"k{i}": i for i in range(5000)},
    "2M list items (> max_items=2**20)": lambda: {"l": [None] * (2 << 20)},
}


def _peer_refuses_body(rank: int, world: int, case: str, tmp: str) -> None:
    if rank == 0:
        ch = TensorDictChannel(1)
        try:
            ch.isend(_PEER_REFUSES[case]())
        except ValueError as e:
            _touch(os.path.join(tmp, "raised"), repr(e))
        ch.isend(_good(0))
        _wait_for_file(os.path.join(tmp, "result1.json"), timeout=TIMEOUT_S)
        return
    ch = TensorDictChannel(0, timeout=5)
    try:
        check_dict(ch.recv(), _good(0))
    except Exception as e:  # noqa: BLE001
        _record(tmp, rank, error=repr(e))
    else:
        _record(tmp, rank, ok=True)


@pytest.mark.parametrize("case", list(_PEER_REFUSES))
def test_sender_refuses_what_a_peer_with_the_same_limits_refuses(tmp_path, case: str) -> None:
    """Reproducer: TensorDictChannel(1).isend({"x": torch.zeros([1] * 17)}) returns; the
    peer's recv() raises WireError "schema: key 'x' has ndim 17, more than max_ndim=16"."""
    run_ranks(2, _peer_refuses_body, case, str(tmp_path), timeout_s=TIMEOUT_S)
    assert (tmp_path / "raised").exists(), "the sender did not refuse it"
    assert _result(tmp_path, 1).get("ok"), _result(tmp_path, 1)


def _bad_dst_body(rank: int, world: int, which: str, tmp: str) -> None:
    if rank == 1:
        _wait_for_file(os.path.join(tmp, "result0.json"), timeout=TIMEOUT_S)
        return
    dst = {"outside": world, "self": rank}[which]
    t0 = time.monotonic()
    try:
        isend_tensor_dict({"x": torch.arange(3)}, dst)
    except Exception as e:  # noqa: BLE001
        _record(tmp, rank, type=type(e).__name__, error=str(e), elapsed=time.monotonic() - t0)
    else:
        _record(tmp, rank, type=None, elapsed=time.monotonic() - t0)


@pytest.mark.parametrize("which", ["outside", "self"])
def test_dst_outside_the_group_or_self_is_refused_at_once(tmp_path, which: str) -> None:
    """Reproducer (2 ranks): isend_tensor_dict({"x": torch.arange(3)}, 2) blocks for the group
    timeout, then RuntimeError: Wait timeout."""
    run_ranks(2, _bad_dst_body, which, str(tmp_path), timeout_s=4)
    res = _result(tmp_path, 0)
    assert res["type"] == "ValueError" and "dst" in res["error"], res
    assert res["elapsed"] < 1.0, res


def _unsupported_tensor_body(rank: int, world: int, case: str, tmp: str) -> None:
    if rank == 1:
        _wait_for_file(os.path.join(tmp, "result0.json"), timeout=TIMEOUT_S)
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.nested's prototype warning
        if case == "nested":
            t = torch.nested.nested_tensor([torch.zeros(2), torch.zeros(3)])
        else:
            t = torch.zeros(4, dtype=torch.uint8).view(getattr(torch, case))
    try:
        TensorDictChannel(1).isend({"the_key": t})
    except Exception as e:  # noqa: BLE001
        _record(tmp, rank, type=type(e).__name__, error=str(e))
    else:
        _record(tmp, rank, type=None)


@pytest.mark.parametrize("case", ["float8_e8m0fnu", "float4_e2m1fn_x2", "nested"])
def test_unsupported_tensor_error_names_the_key(tmp_path, case: str) -> None:
    """Reproducer: TensorDictChannel(1).isend({"the_key": torch.zeros(4,
    dtype=torch.float8_e8m0fnu)}) -> TypeError('entry 0: unsupported dtype ...')."""
    run_ranks(2, _unsupported_tensor_body, case, str(tmp_path), timeout_s=TIMEOUT_S)
    res = _result(tmp_path, 0)
    assert res["type"] in ("TypeError", "ValueError"), res
    assert "the_key" in res["error"], res


def _after_death_body(rank: int, world: int, side: str, tmp: str) -> None:
    survivor = 0 if side == "send" else 1
    if rank != survivor:
        if side == "send":
            check_dict(TensorDictChannel(0).recv(), _fault_hop(0))
        else:
            TensorDictChannel(1).isend(_fault_hop(0))
            REAPER.drain(TIMEOUT_S)
        os._exit(0)
    if side == "send":
        ch = TensorDictChannel(1)
        ch.isend(_fault_hop(0))
        REAPER.drain(TIMEOUT_S)
    else:
        ch = TensorDictChannel(0, timeout=5)
        check_dict(ch.recv(), _fault_hop(0))
    time.sleep(0.5)  # the peer is gone before the next call
    try:
        if side == "send":
            for h in ch.isend(_fault_hop(1)):
                h.wait()
        else:
            ch.irecv().wait()
    except Exception as e:  # noqa: BLE001
        _record(tmp, rank, error=str(e))
    else:
        _record(tmp, rank, error=None)


@pytest.mark.parametrize("side", ["send", "recv"])
def test_call_posted_after_the_peer_died_names_peer_and_step(tmp_path, side: str) -> None:
    """Reproducer: peer exits after hop 0; ch.isend(hop1) -> RuntimeError('[.../pair.cc:553]
    Connection closed by peer [127.0.0.1]:PORT ...') without 'rank 1' or 'send #1'."""
    run_ranks(2, _after_death_body, side, str(tmp_path), timeout_s=TIMEOUT_S)
    survivor = 0 if side == "send" else 1
    res = _result(tmp_path, survivor)
    assert res["error"], "the call towards a dead peer returned"
    peer = 1 - survivor
    assert f"rank {peer}" in res["error"] and "#1" in res["error"], res


def test_pack_reference_accepts_an_empty_strided_tensor() -> None:
    """Reproducer: pipepack.kernels.pack_reference([torch.zeros(1, dtype=torch.bfloat16)[1::2]])
    raises RuntimeError."""
    t = torch.zeros(1, dtype=torch.bfloat16)[1::2]
    assert t.shape == (0,) and t.stride() == (2,)
    assert torch.equal(pack_reference([t]), pack([t], impl="torch"))


def _strided_scalar_body(rank: int, world: int, tmp: str) -> None:
    logits = torch.arange(32, dtype=torch.float32).reshape(1, 32)
    hops = [{"a": torch.zeros(1)}, {"h": torch.zeros(100), "last": logits[:, -1]}]
    if rank == 0:
        for d in hops:
            try:
                send_tensor_dict(d, 1)
            except Exception as e:  # noqa: BLE001
                _record(tmp, rank, error=repr(e))
                return
        _record(tmp, rank, error=None)
        return
    ch = TensorDictChannel(0, timeout=5)
    try:
        for d in hops:
            check_dict(ch.recv(), d)
    except Exception as e:  # noqa: BLE001 - the sender's record says why
        _record(tmp, rank, error=repr(e))
    else:
        _record(tmp, rank, error=None)


def test_one_element_strided_view_in_a_multi_message_payload(tmp_path) -> None:
    """Reproducer: send_tensor_dict({"a": torch.zeros(1)}); send_tensor_dict({"h":
    torch.zeros(100), "last": torch.randn(1, 32000)[:, -1]}) -> RuntimeError 'self.stride(-1)
    must be 1 to view Float as Byte'."""
    run_ranks(2, _strided_scalar_body, str(tmp_path), timeout_s=TIMEOUT_S)
    assert _result(tmp_path, 0)["error"] is None, _result(tmp_path, 0)
    assert _result(tmp_path, 1)["error"] is None, _result(tmp_path, 1)


def _stride_overflow_body(rank: int, world: int, tmp: str) -> None:
    schema = Schema((TensorField("h", torch.float32, 3, "cpu"),))
    slot, _ = encode_header(Header(schema.schema_id(), schema, ((0, 1 << 62, 4),), (),
                                   {"cpu": 0}), slot_bytes=FUZZ_SLOT)
    _fuzz_body(rank, world, [_FuzzCase("empty tensor whose strides overflow int64", slot, None,
                                       "refuse", r"shape|stride|overflow")], tmp)


def test_shape_whose_strides_overflow_is_a_wire_error(tmp_path) -> None:
    """Reproducer: a header with TensorField('h', float32, 3) and shapes ((0, 2**62, 4),),
    payload {'cpu': 0} -> TensorDictChannel.irecv_posted() raises TypeError."""
    run_ranks(2, _stride_overflow_body, str(tmp_path), timeout_s=TIMEOUT_S)
