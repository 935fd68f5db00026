"""Hardening: random dicts through real links, hostile head messages, faults, bad input, guards.

What each part protects (docs: "Bad input and trust model" in README.md):

- property tests: random dicts (every payload dtype incl. bool, fp8 and complex, empty, 0-dim
  and strided tensors, plain values and tensors nested in lists/dicts) arrive bit-exact, in
  order and with their exact types through a 2-rank link, over torch.distributed and over the
  same-host ring, through the functional API and a channel;
- hostile heads: crafted and randomly mutated head messages are sent raw on the link's head
  tag. A bad frame is refused (``WireError`` naming peer and step) before any follow-on receive
  is posted; a frame that passes gets follow-on receives of exactly the sizes it announces, and
  a body refused after that is drained so the link stays in step; an accepted hop hands out
  exactly the bytes that were sent. No message is ever longer than the receive posted for it;
- faults: a peer that dies between head and payload, stalls, or goes silent raises within
  the timeout, naming the peer and the step;
- bad input: raises on the sender and puts nothing on the wire (the next good dict arrives
  intact); the rows become README.md's table (``PIPEPACK_BAD_INPUT_TABLE=path`` writes it);
- guards: each test below named after a guard fails when that guard is removed from the core.
"""

from __future__ import annotations

import collections
import dataclasses
import enum
import json
import math
import os
import random
import re
import struct
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import seed as hypothesis_seed
from hypothesis import strategies as st

from pipepack.kernels import SUPPORTED_DTYPES, Layout, pack, pack_reference
from pipepack.pp import (
    REAPER,
    Declared,
    Limits,
    TensorDictChannel,
    WireError,
    codec,
    isend_tensor_dict,
    recv_tensor_dict,
    send_tensor_dict,
)
from pipepack.pp import link as pp_link
from pipepack.pp import transport as pp_transport
from pipepack.pp.wire import DEVICE_CODES, DTYPE_CODES, Frame, align16, encode_body, encode_frame
from pipepack.pp.wire import hop as wire_hop
from pipepack.testing import check_dict, random_bytes, raw_bytes, run_ranks

TIMEOUT_S = 30.0  # gloo group timeout of the runs below
README = Path(__file__).resolve().parents[1] / "README.md"


# ---------------------------------------------------------------------------------------------
# helpers: ranks order themselves through files; each records its outcome as JSON
# ---------------------------------------------------------------------------------------------


def _touch(path: str, text: str = "") -> None:
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


def _wait_for_file(path: str, timeout: float = TIMEOUT_S) -> None:
    end = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > end:
            raise TimeoutError(f"{path} did not appear within {timeout} s")
        time.sleep(0.005)


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
# strategies: tensors of every payload dtype and awkward shape/stride, values nesting tensors
# ---------------------------------------------------------------------------------------------

_KERNEL_DTYPES = sorted(SUPPORTED_DTYPES, key=str)
_VIEWS = ("contiguous", "transposed", "stepped", "expanded", "offset", "column")


def _random_tensor(
    dtype: torch.dtype, shape: tuple[int, ...], view: str, seed: int
) -> torch.Tensor:
    """Random bytes (NaN payloads included) of ``shape``, laid out as the ``view`` kind says."""
    g = torch.Generator().manual_seed(seed)

    def raw(s: tuple[int, ...]) -> torch.Tensor:
        return random_bytes(s, dtype, g)

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
    return _random_tensor(
        dtype, shape, draw(st.sampled_from(_VIEWS)), draw(st.integers(0, 2**31 - 1))
    )


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
_LEAVES = _SCALARS | _tensors(max_ndim=2, max_side=3)  # tensors nested in plain values travel too


def _containers(inner: st.SearchStrategy) -> st.SearchStrategy:
    return (
        st.lists(inner, max_size=3)
        | st.lists(inner, max_size=3).map(tuple)
        | st.dictionaries(st.text(max_size=4) | st.integers(-5, 5), inner, max_size=3)
    )


_PLAIN = _SCALARS | _containers(_LEAVES) | _containers(_LEAVES | _containers(_LEAVES))


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
        d[k] = _random_tensor(
            torch.float32,
            (draw(st.integers(0, 3000)), 64),
            draw(st.sampled_from(_VIEWS)),
            draw(st.integers(0, 2**31 - 1)),
        )
    return d


def _draw_dicts(n: int, seed: int) -> list[dict[str, Any]]:
    """``n`` dicts drawn by hypothesis (seeded), for one multi-process run."""
    out: list[dict[str, Any]] = []

    @hypothesis_seed(seed)
    @settings(
        max_examples=n,
        database=None,
        deadline=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(_tensor_dicts(big=True))
    def draw(d: dict[str, Any]) -> None:
        out.append(d)

    draw()
    return out[:n]


# ---------------------------------------------------------------------------------------------
# property: random dicts through a 2-rank link
# ---------------------------------------------------------------------------------------------

N_LINK_DICTS = 60
SMALL_HEAD = 64 << 10  # the receiver's head capacity: larger hops take several messages


def _property_body(
    rank: int, world: int, dicts: list[dict[str, Any]], api: str, transport: str
) -> None:
    if rank == 0:
        ch = TensorDictChannel(1, transport=transport, chunk_bytes=16 << 10)
        for d in dicts:  # all posted at once: a send never waits for the peer
            if api == "functional":
                isend_tensor_dict(d, 1)  # the same link as the channel's
            else:
                ch.isend(d)
        return
    ch = TensorDictChannel(0, transport=transport, slot_bytes=SMALL_HEAD, timeout=TIMEOUT_S)
    pending: collections.deque = collections.deque()
    posted = 0
    for i, want in enumerate(dicts):
        if api == "functional":
            got = recv_tensor_dict(0)
        else:
            while posted < len(dicts) and len(pending) < 3:  # 3 receives in flight
                pending.append(ch.irecv())
                posted += 1
            got = pending.popleft().wait()
        try:
            check_dict(got, want)
        except AssertionError as e:
            raise AssertionError(
                f"dict #{i} of {len(dicts)} ({api}, {transport}, now "
                f"{ch.transport}): {e}\nsent: {want!r}"
            ) from None
    if transport == "shm":
        assert ch.transport == "shm"


@pytest.mark.filterwarnings("ignore:ComplexHalf support is experimental")
@pytest.mark.parametrize(
    "api, transport",
    [("channel", "dist"), ("functional", "dist"), ("channel", "shm"), ("functional", "auto")],
)
def test_property_random_dicts_through_a_two_rank_link(api: str, transport: str) -> None:
    """60 hypothesis-drawn dicts arrive in order and bit-exact; payloads over the 64 KiB head
    capacity travel as head + 16 KiB chunks over torch.distributed."""
    dicts = _draw_dicts(N_LINK_DICTS, seed=20_260 + len(api) + len(transport))
    assert len(dicts) == N_LINK_DICTS
    run_ranks(2, _property_body, dicts, api, transport, timeout_s=TIMEOUT_S)


def _every_dtype_body(rank: int, world: int, transport: str) -> None:
    g = torch.Generator().manual_seed(5)
    d: dict[str, Any] = {}
    for dt in _KERNEL_DTYPES:
        name = str(dt).split(".")[1]
        d[name] = _random_tensor(dt, (3, 5), "transposed", 1)
        d[name + "_0d"] = _random_tensor(dt, (), "contiguous", 2)
        d[name + "_empty"] = torch.zeros((0, 4), dtype=dt)
    d["nested"] = {
        "list": [torch.randn(2, generator=g), (torch.arange(3)[::2], None)],
        "dt": torch.float8_e5m2,
        "size": torch.Size([2, 3]),
    }
    if rank == 0:
        ch = TensorDictChannel(1, transport=transport)
        ch.send(d)
        ch.send(d)
        return
    ch = TensorDictChannel(0, transport=transport, timeout=TIMEOUT_S)
    for _ in range(2):
        got = ch.recv()
        check_dict(got, d, contiguous=True)
        ptrs = {
            v.untyped_storage().data_ptr()
            for v in got.values()
            if isinstance(v, torch.Tensor) and v.numel()
        }
        assert len(ptrs) == 1, "the CPU tensors are views of one buffer"


@pytest.mark.filterwarnings("ignore:ComplexHalf support is experimental")
@pytest.mark.parametrize("transport", ["dist", "shm"])
def test_every_dtype_empty_zero_dim_strided_and_nested_in_one_hop(transport: str) -> None:
    run_ranks(2, _every_dtype_body, transport, timeout_s=TIMEOUT_S)


def _all_empty_body(rank: int, world: int, tmp: str) -> None:
    d = {"x": torch.zeros(0), "y": torch.zeros(0, 3, dtype=torch.bfloat16)}
    if rank == 0:
        ch = TensorDictChannel(1, transport="dist")
        ch.send(d)
        ch.send({"a": torch.ones(2)})
        return
    ch = TensorDictChannel(0, transport="dist", timeout=TIMEOUT_S)
    info: dict[str, Any] = {}
    for i, want in enumerate((d, {"a": torch.ones(2)})):
        try:
            check_dict(ch.recv(), want)
            info[str(i)] = "ok"
        except Exception as e:  # noqa: BLE001 - recorded for the assertion
            info[str(i)] = f"{type(e).__name__}: {e}"
    _record(tmp, rank, **info)


def test_all_empty_tensors_through_a_link(tmp_path) -> None:
    run_ranks(2, _all_empty_body, str(tmp_path), timeout_s=TIMEOUT_S)
    assert _result(tmp_path, 1) == {"0": "ok", "1": "ok"}


# ---------------------------------------------------------------------------------------------
# hostile head messages, sent raw on the link's head tag
# ---------------------------------------------------------------------------------------------

RAW_CAP = 64 << 10  # the receiver's head capacity (slot_bytes): no raw message is longer
RAW_LIMITS = Limits(
    max_payload_bytes=1 << 20,
    max_entries=16,
    max_ndim=8,
    max_plain_bytes=1 << 14,
    max_depth=8,
    max_key_bytes=64,
    max_items=256,
)
_CRAFT = Limits(max_plain_bytes=1 << 20, max_depth=64)  # the hostile sender's own limits


@dataclasses.dataclass(frozen=True)
class _Raw:
    name: str
    head: bytes  # the head message (the sender pads it to the frame's head_len when it fits)
    data: tuple[bytes, ...] = ()  # what the hop brings on the data tag: rest of body, chunks
    expect: str = "either"  # "accept", "refuse-frame", "refuse-body" or "either"
    match: str = ""


def _payload(enc: codec.Encoded) -> bytes:
    p = enc.parts.get("cpu")
    if p is None or not p.wire_layout.nbytes:
        return b""
    buf = torch.zeros(p.wire_layout.nbytes, dtype=torch.uint8)
    pack(enc.sources["cpu"], out=buf, layout=p.wire_layout)
    return buf.numpy().tobytes()


def _hop(
    body: bytes,
    payload: bytes,
    *,
    seq: int = 0,
    flags: int = 0,
    in_head: int | None = None,
    chunk: int = 4096,
    **frame: Any,
) -> tuple[bytes, tuple[bytes, ...]]:
    """A hop's head and data messages: INLINE unless ``in_head`` (body bytes in the head)."""
    if in_head is None:
        head_len = align16(64 + len(body)) + len(payload)
        f = Frame(flags | wire_hop.F_INLINE, seq, head_len, len(body), len(payload), 0, None, 1, 0)
        f = dataclasses.replace(f, **frame)
        pad = bytes(align16(64 + len(body)) - 64 - len(body))
        return encode_frame(f) + body + pad + payload, ()
    f = Frame(
        flags, seq, 64 + in_head, len(body), len(payload), chunk if payload else 0, None, 1, 0
    )
    f = dataclasses.replace(f, **frame)
    data = ([body[in_head:]] if in_head < len(body) else []) + [
        payload[s : s + chunk] for s in range(0, len(payload), chunk)
    ]
    return encode_frame(f) + body[:in_head], tuple(data)


def _dict_hop(
    d: dict[str, Any], *, pickle: bool = False, **kw: Any
) -> tuple[bytes, tuple[bytes, ...]]:
    enc = codec.encode(d, allow_pickle=pickle, limits=_CRAFT, tp=None, all_gather_tensors=None)
    return _hop(enc.body, _payload(enc), flags=enc.flags, **kw)


def _set(data: bytes, off: int, fmt: str, value: Any) -> bytes:
    b = bytearray(data)
    struct.pack_into(fmt, b, off, value)
    return bytes(b)


def _good_raw() -> dict[str, Any]:
    return {
        "h": torch.arange(24, dtype=torch.bfloat16).reshape(3, 8),
        "v": [1.5, "ab"],
        "p": torch.arange(3),
        "w": {"t": torch.ones(2, dtype=torch.int32)},
    }


def _body(
    keys: list[tuple[str, bool]],
    tensors: list[tuple[int, int, int, int]],
    dims: list[int],
    values: bytes = b"",
) -> bytes:
    return encode_body([k.encode() for k, _ in keys], [t for _, t in keys], tensors, dims, values)


F32, CPU = DTYPE_CODES[torch.float32], DEVICE_CODES["cpu"]
_TREF = struct.Struct("<BI")  # a value's nested-tensor reference: tag 15, index


def _dedicated_raw_cases() -> list[_Raw]:
    c: list[_Raw] = []

    def add(
        name: str, made: tuple[bytes, tuple[bytes, ...]] | bytes, expect: str, match: str = ""
    ) -> None:
        head, data = made if isinstance(made, tuple) else (made, ())
        c.append(_Raw(name, head, data, expect, match))

    good = _dict_hop(_good_raw())
    gh = good[0]
    add("valid INLINE hop (control)", good, "accept")
    add(
        "valid hop: body split over head and data, payload in 4 KiB chunks (control)",
        _dict_hop({**_good_raw(), "big": torch.arange(3000, dtype=torch.int32)}, in_head=20),
        "accept",
    )
    add(
        "pickled flag on a hop without pickle, allow_pickle=False here",
        (_set(gh, 6, "<H", wire_hop.F_INLINE | wire_hop.F_PICKLED), ()),
        "refuse-body",
        "pickled value but allow_pickle is False",
    )
    add(
        "sliced flag on a hop that slices nothing (control)",
        (_set(gh, 6, "<H", wire_hop.F_INLINE | wire_hop.F_SLICED), ()),
        "accept",
    )
    # refused at the frame: nothing else is posted, the link is out of step
    add("wrong magic", _set(gh, 0, "<4s", b"PPK1"), "refuse-frame", "magic")
    add("other wire version", _set(gh, 4, "<H", 3), "refuse-frame", "wire version 3")
    add("unknown flag bit", _set(gh, 6, "<H", 0x41), "refuse-frame", "unknown flags 0x41")
    add("non-zero reserved byte", _set(gh, 37, "<B", 1), "refuse-frame", "reserved")
    add("non-zero reserved tail", _set(gh, 56, "<Q", 1), "refuse-frame", "reserved")
    add("hop #1 where #0 is due", _set(gh, 8, "<Q", 1), "refuse-frame", "hop #1 where #0 was due")
    add(
        "hop #2**64-1 where #0 is due",
        _set(gh, 8, "<Q", (1 << 64) - 1),
        "refuse-frame",
        "where #0 was due",
    )
    add(
        "head_len over the receiver's capacity",
        _set(gh, 16, "<I", RAW_CAP + 16),
        "refuse-frame",
        f"head_len {RAW_CAP + 16} outside \\[64, {RAW_CAP}\\]",
    )
    add("head_len shorter than a frame", _set(gh, 16, "<I", 63), "refuse-frame", "head_len 63")
    add(
        "body over max_header_bytes",
        _dict_hop(_good_raw(), in_head=0, body_len=1 << 31),
        "refuse-frame",
        "exceeds the limit",
    )
    add(
        "CPU payload over max_payload_bytes",
        _hop(b"", b"", in_head=0, cpu_nbytes=(1 << 20) + 16, chunk_bytes=1 << 20),
        "refuse-frame",
        "cpu_nbytes 1048592 exceeds max_payload_bytes=1048576",
    )
    add(
        "device payload over max_payload_bytes",
        _hop(b"", b"", in_head=0, dev_type="cuda", dev_nbytes=(1 << 20) + 1),
        "refuse-frame",
        "dev_nbytes",
    )
    add(
        "device payload without a device type",
        _hop(b"", b"", in_head=0, dev_nbytes=16),
        "refuse-frame",
        "without a device type",
    )
    add("unknown device code", _set(gh, 36, "<B", 9), "refuse-frame", "device code 9")
    add("tp_world 0", _set(gh, 38, "<H", 0), "refuse-frame", "tp_world 0")
    add(
        "INLINE head_len that does not hold body and payload",
        _set(gh, 16, "<I", len(gh) + 16),
        "refuse-frame",
        "INLINE head_len",
    )
    add(
        "chunk_bytes under 4 KiB",
        _dict_hop(_good_raw(), in_head=0, chunk=16),
        "refuse-frame",
        "chunk_bytes 16",
    )
    add(
        "chunk_bytes without a CPU payload",
        _hop(b"\x00" * 8, b"", in_head=8, chunk_bytes=4096),
        "refuse-frame",
        "without a CPU payload",
    )
    if hasattr(wire_hop, "F_SWITCH"):
        add(
            "transport switch to a ring this end never offered",
            encode_frame(Frame(wire_hop.F_SWITCH, 0, 64, 0, 0, 0, None, 1, 0)),
            "refuse-frame",
            "transport switch",
        )
    # refused after the frame: its announced receives are posted and drained, link in step
    enc = codec.encode(
        _good_raw(), allow_pickle=False, limits=_CRAFT, tp=None, all_gather_tensors=None
    )
    body, payload = enc.body, _payload(enc)
    add(
        "CPU payload larger than the shapes need",
        _hop(body, payload + bytes(16)),
        "refuse-body",
        f"announces {len(payload) + 16} bytes of cpu payload, the shapes need {len(payload)}",
    )
    add(
        "CPU payload smaller than the shapes need",
        _hop(body, payload[:-16]),
        "refuse-body",
        "the shapes need",
    )
    add(
        "device payload for tensors that are all on the CPU",
        _hop(body, payload, dev_type="cuda", dev_nbytes=0, flags=0),
        "accept",
    )
    add(
        "unknown dtype code",
        _hop(_body([("x", True)], [(99, 1, CPU, 0)], [4]), bytes(16)),
        "refuse-body",
        "unknown dtype code 99",
    )
    add(
        "unknown device code in the tensor table",
        _hop(_body([("x", True)], [(F32, 1, 7, 0)], [4]), bytes(16)),
        "refuse-body",
        "unknown device code 7",
    )
    add(
        "negative dim",
        _hop(_body([("x", True)], [(F32, 1, CPU, 0)], [-4]), b""),
        "refuse-body",
        "negative dim",
    )
    add(
        "empty tensor whose dims overflow int64 strides",
        _hop(_body([("x", True)], [(F32, 3, CPU, 0)], [0, 1 << 62, 4]), b""),
        "refuse-body",
        "out of range",
    )
    add(
        "key over max_key_bytes",
        _dict_hop({"k" * 65: 1}),
        "refuse-body",
        "key of 65 bytes exceeds max_key_bytes=64",
    )
    add(
        "more entries than max_entries",
        _dict_hop({f"k{i}": i for i in range(17)}),
        "refuse-body",
        "17 keys and 0 tensors exceed max_entries=16",
    )
    add("ndim over max_ndim", _dict_hop({"x": torch.zeros([1] * 9)}), "refuse-body", "max_ndim=8")
    deep: Any = 1
    for _ in range(8):
        deep = [deep]
    add(
        "plain value nested deeper than max_depth",
        _dict_hop({"v": deep}),
        "refuse-body",
        "deeper than max_depth=8",
    )
    add(
        "more list items than max_items", _dict_hop({"v": [None] * 257}), "refuse-body", "max_items"
    )
    add(
        "torch.Size dims over max_items",
        _dict_hop({"v": [None] * 200, "s": torch.Size([1] * 57)}),
        "refuse-body",
        "max_items",
    )
    add(
        "torch.Size dims up to max_items (control)",
        _dict_hop({"v": [None] * 200, "s": torch.Size([1] * 56)}),
        "accept",
    )
    add(
        "plain values over max_plain_bytes",
        _dict_hop({"v": "x" * 20_000}),
        "refuse-frame",
        "exceeds the limit",
    )
    add(
        "pickled value without allow_pickle",
        _dict_hop({"v": {1, 2}}, pickle=True),
        "refuse-body",
        "pickled value but allow_pickle is False",
    )
    add(
        "pickled value without the pickled flag",
        _set(_dict_hop({"v": {1, 2}}, pickle=True)[0], 6, "<H", wire_hop.F_INLINE),
        "refuse-body",
        "allow_pickle is False",
    )
    sliced = _body([("h", True)], [(F32, 2, CPU, 1)], [4, 2])
    n = Layout.from_specs([(torch.float32, (4, 2))]).sliced(2, [True]).nbytes
    add(
        "sliced key but no all_gather_group here",
        _hop(sliced, bytes(n), tp_world=2),
        "refuse-body",
        "all-gather over 2 ranks, but this receiver has no all_gather_group",
    )
    add(
        "sliced key in a hop that says tp_world 1", _hop(sliced, bytes(32)), "refuse-body", "sliced"
    )
    v = _body([("v", False)], [], [], b"\x01")
    add(
        "trailing byte after the plain values",
        _hop(v[:4] + b"\x02" + v[5:] + b"\x01", b""),
        "refuse-body",
        "values end at",
    )
    two = _body(
        [("v", False)],
        [(F32, 1, CPU, 0), (F32, 1, CPU, 0)],
        [1, 1],
        struct.pack("<BI", 9, 2) + _TREF.pack(15, 1) + _TREF.pack(15, 0),
    )
    add(
        "nested tensors referenced out of order",
        _hop(two, bytes(32)),
        "refuse-body",
        "tensor reference 1 where 0 was due",
    )
    one = _body([("v", False)], [(F32, 1, CPU, 0)], [1], b"\x01")
    add(
        "nested tensor never referenced",
        _hop(one, bytes(16)),
        "refuse-body",
        "0 of 1 nested tensors referenced",
    )
    accel = _body(
        [("a", True), ("b", True)],
        [(F32, 1, DEVICE_CODES["cuda"], 0), (F32, 1, DEVICE_CODES["xpu"], 0)],
        [0, 0],
    )
    add(
        "tensors on two accelerator device types",
        _hop(accel, b""),
        "refuse-body",
        "more than one accelerator device type",
    )
    return c


_MUTATION_BASES: list[tuple[bytes, tuple[bytes, ...]]] = []


def _mutation_bases() -> list[tuple[bytes, tuple[bytes, ...]]]:
    if not _MUTATION_BASES:
        _MUTATION_BASES.extend(
            [
                _dict_hop(_good_raw()),
                _dict_hop({**_good_raw(), "blob": b"z" * 300}, in_head=40),  # body rest on data tag
                _dict_hop(
                    {
                        "ids": torch.arange(7, dtype=torch.int32),
                        "shape": torch.Size([2, 3]),
                        "nested": {1: [[], ()], "z": -0.0, "t": [torch.ones(2)]},
                        "x": torch.zeros(2, 5, dtype=torch.float16),
                    }
                ),
                _dict_hop(
                    {"dt": torch.float8_e4m3fn, "big": 2**70, "h": torch.ones(600)},
                    in_head=30,
                    chunk=4096,
                ),
            ]
        )
    return _MUTATION_BASES


def _mutated_raw_cases(n: int, seed: int) -> list[_Raw]:
    """1-8 byte mutations of valid heads (frame, body and inline payload) and random heads."""
    rng = random.Random(seed)
    cases = []
    for i in range(n):
        head, data = rng.choice(_mutation_bases())
        head = bytearray(head)
        kind = rng.random()
        if kind < 0.05:
            head = bytearray(rng.randbytes(rng.randrange(64, 300)))
        else:
            width = rng.choice([1, 1, 1, 2, 4, 8])
            # half the mutations hit the frame, the rest anywhere in the head
            top = 64 if rng.random() < 0.5 else len(head)
            pos = rng.randrange(max(1, top - width + 1))
            head[pos : pos + width] = rng.randbytes(width)[: len(head) - pos]
        cases.append(_Raw(f"mutation {i}", bytes(head), data))
    return cases


def _announced(head: bytes) -> list[int] | None:
    """The data-tag receive sizes a head's frame announces (read here with struct alone); None
    for a frame no receiver may follow (a CPU payload without a usable chunk size)."""
    (flags,) = struct.unpack_from("<H", head, 6)
    head_len, body_len, cpu = struct.unpack_from("<IIQ", head, 16)
    (chunk,) = struct.unpack_from("<I", head, 32)
    if flags & 1:
        return []
    if cpu and (chunk < 16 or cpu > RAW_LIMITS.max_payload_bytes):
        return None
    out = [body_len - (head_len - 64)] if body_len > head_len - 64 else []
    return out + [min(chunk, cpu - s) for s in range(0, cpu, chunk)] if cpu else out


def _wire_head(head: bytes) -> bytes:
    """The head message as sent: padded to the frame's head_len when that fits the receive."""
    (head_len,) = struct.unpack_from("<I", head, 16) if len(head) >= 20 else (0,)
    if len(head) < head_len <= RAW_CAP:
        head = head + bytes(head_len - len(head))
    assert len(head) <= RAW_CAP  # never longer than the receive posted for it (gloo aborts)
    return head


def _raw_sender(cases: list[_Raw], tmp: str) -> None:
    for i, case in enumerate(cases):
        g = dist.new_group([0, 1], backend="gloo")
        link = pp_link.get_link(g, g, 1, transport="dist")
        link.wait_hello(TIMEOUT_S)
        buf = torch.frombuffer(bytearray(_wire_head(case.head)), dtype=torch.uint8)
        dist.isend(buf, 1, group=g, tag=pp_transport.HEAD_TAG).wait()
        _wait_for_file(os.path.join(tmp, f"case{i}"))
        dist.destroy_process_group(g)


def _raw_receiver(cases: list[_Raw], tmp: str) -> None:
    real_irecv = pp_transport.irecv
    posted: list[int] = []
    stream = [b""]

    def fake_irecv(buf: torch.Tensor, peer: int, group: Any, tag: int, *a: Any) -> Any:
        if tag != pp_transport.DATA_TAG:
            return real_irecv(buf, peer, group, tag, *a)
        # recorded, and filled as a peer sending exactly the announced sizes would: the next
        # bytes of the hop's data stream, zeros once it ran out
        n = buf.numel()
        posted.append(n)
        chunk, stream[0] = stream[0][:n], stream[0][n:]
        buf.zero_()
        if chunk:
            buf[: len(chunk)] = torch.frombuffer(bytearray(chunk), dtype=torch.uint8)
        return _Done()

    pp_transport.irecv = fake_irecv
    results = []
    try:
        for i, case in enumerate(cases):
            g = dist.new_group([0, 1], backend="gloo")
            posted.clear()
            stream[0] = b"".join(case.data)
            ch = TensorDictChannel(
                0,
                group=g,
                transport="dist",
                slot_bytes=RAW_CAP,
                limits=RAW_LIMITS,
                timeout=TIMEOUT_S,
            )
            ch.link.wait_hello(TIMEOUT_S)
            outcome, error, got = "accepted", "", None
            try:
                got, handles, post = ch.irecv_posted()
                for h in handles:
                    h.wait()
            except (WireError, RuntimeError) as e:
                outcome, error = "refused", f"{type(e).__name__}: {e}"
            except Exception as e:  # noqa: BLE001 - any other type is a finding
                outcome, error = "other", f"{type(e).__name__}: {e}"
            results.append(_judge(i, case, outcome, error, got, list(posted)))
            _touch(os.path.join(tmp, f"case{i}"))
            dist.destroy_process_group(g)
    finally:
        pp_transport.irecv = real_irecv
    _touch(os.path.join(tmp, "raw.json"), json.dumps(results))


def _judge(
    i: int, case: _Raw, outcome: str, error: str, got: Any, posted: list[int]
) -> dict[str, Any]:
    where = f"case {i} ({case.name}): {outcome} {error!r}, posted {posted}"
    assert outcome != "other", f"{where}: not a WireError/RuntimeError"
    announced = _announced(case.head)
    if outcome == "refused":
        assert case.expect in ("either", "refuse-frame", "refuse-body"), where
        assert "rank 0" in error and "#0" in error, f"{where}: does not name peer and step"
        assert re.search(case.match, error), f"{where}: does not match {case.match!r}"
        at_frame = "refused:" not in error
        if case.expect != "either":
            assert at_frame == (case.expect == "refuse-frame"), f"{where}: refused at wrong step"
        if at_frame:
            assert posted == [], f"{where}: posted receives before refusing the frame"
        else:
            assert posted == announced, f"{where}: announced {announced}"
        return {
            "name": case.name,
            "outcome": "refused-frame" if at_frame else "refused-body",
            "error": error[:300],
        }
    assert case.expect in ("either", "accept"), f"{where}: a bad hop was accepted"
    assert posted == announced, f"{where}: announced {announced}"
    for n in posted:
        assert n <= max(RAW_LIMITS.max_payload_bytes, RAW_LIMITS.max_header_bytes), where
    # what arrived is exactly what was sent: the body re-encodes to the bytes on the wire and the
    # tensors hold the payload bytes at the layout's offsets
    head = _wire_head(case.head)
    data = b"".join(case.data) + bytes(sum(announced))
    (flags,) = struct.unpack_from("<H", head, 6)
    head_len, body_len, cpu_n = struct.unpack_from("<IIQ", head, 16)
    if flags & 1:
        body = head[64 : 64 + body_len]
        payload = head[align16(64 + body_len) : align16(64 + body_len) + cpu_n]
    else:
        rest = body_len - (head_len - 64)
        body = head[64:head_len] + data[:rest]
        payload = data[rest : rest + cpu_n]
    enc = codec.encode(got, allow_pickle=False, limits=_CRAFT, tp=None, all_gather_tensors=None)
    assert enc.body == body, f"{where}: the received dict re-encodes to other body bytes"
    p = enc.parts.get("cpu")
    for e, t in zip(p.wire_layout.entries if p else (), enc.sources.get("cpu", [])):
        want = torch.frombuffer(
            bytearray(payload[e.offset : e.offset + e.nbytes]) or bytearray(1), dtype=torch.uint8
        )[: e.nbytes]
        assert torch.equal(raw_bytes(t), want), f"{where}: tensor bytes differ from the sent ones"
    return {"name": case.name, "outcome": "accepted", "error": ""}


def _raw_body(rank: int, world: int, cases: list[_Raw], tmp: str) -> None:
    if rank == 0:
        _raw_sender(cases, tmp)
    else:
        _raw_receiver(cases, tmp)


def test_crafted_heads_are_refused_at_the_right_step_or_accepted_exactly(tmp_path) -> None:
    """Each crafted head: a bad frame is refused before anything else is posted (naming rank 0
    and receive #0); a bad body after exactly the announced receives; valid controls arrive with
    exactly the bytes sent. The case table lists what each one tests."""
    cases = _dedicated_raw_cases()
    run_ranks(2, _raw_body, cases, str(tmp_path), timeout_s=120)
    results = json.loads((tmp_path / "raw.json").read_text())
    assert len(results) == len(cases)
    for case, r in zip(cases, results):
        want = {
            "accept": "accepted",
            "refuse-frame": "refused-frame",
            "refuse-body": "refused-body",
        }[case.expect]
        assert r["outcome"] == want, (case.name, r)


def test_randomly_mutated_heads_are_refused_or_accepted_exactly(tmp_path) -> None:
    """160 mutated or random heads: each refused (at the frame: nothing posted; at the body: the
    announced receives posted and drained) or accepted with exactly the sent bytes."""
    cases = _mutated_raw_cases(160, seed=11)
    run_ranks(2, _raw_body, cases, str(tmp_path), timeout_s=240)
    results = json.loads((tmp_path / "raw.json").read_text())
    assert len(results) == len(cases)
    kinds = collections.Counter(r["outcome"] for r in results)
    assert kinds["refused-frame"] and kinds["refused-body"] and kinds["accepted"], kinds


def test_head_whose_body_ends_after_a_key_is_refused_naming_peer_and_step(tmp_path) -> None:
    cut = b"\x01\x00\x00\x00\x00\x00\x00\x00\x01\x00k"
    cases = [_Raw("body cut after a key", _hop(cut, b"")[0], (), "refuse-body", "truncated")]
    run_ranks(2, _raw_body, cases, str(tmp_path), timeout_s=60)


@pytest.mark.skipif(torch.cuda.is_available(), reason="about a receiver without CUDA")
def test_device_payload_announced_to_a_receiver_without_the_device(tmp_path) -> None:
    body = _body([("x", True)], [(F32, 1, DEVICE_CODES["cuda"], 0)], [4])
    head, data = _hop(body, b"", dev_type="cuda", dev_nbytes=16)
    cases = [_Raw("cuda payload to a CPU-only receiver", head, data, "refuse-frame", "cuda")]
    run_ranks(2, _raw_body, cases, str(tmp_path), timeout_s=60)


# ---------------------------------------------------------------------------------------------
# faults: the survivor raises within the timeout, naming the peer and the step
# ---------------------------------------------------------------------------------------------

CHANNEL_TIMEOUT_S = 2.0


def _fault_hop(i: int, tokens: int = 4) -> dict[str, Any]:
    g = torch.Generator().manual_seed(900 + i)
    return {
        "h": torch.randn(tokens, 64, generator=g),
        "mb": torch.tensor(i),
        "__msg_type__": "proxy",
    }


def _drop_data_messages() -> None:
    real = pp_transport.isend

    def isend(buf: torch.Tensor, peer: int, group: Any, tag: int, *a: Any) -> Any:
        if tag == pp_transport.DATA_TAG:
            return _Done()  # never sent
        return real(buf, peer, group, tag, *a)

    pp_transport.isend = isend


def _head_only_body(rank: int, world: int, mode: str, tmp: str) -> None:
    if rank == 0:
        ch = TensorDictChannel(1, transport="dist", chunk_bytes=16 << 10)
        ch.send(_fault_hop(0, tokens=1))
        ch.link.wait_hello(TIMEOUT_S)
        _drop_data_messages()
        ch.isend(_fault_hop(1, tokens=600))  # 150 KB: a head, then chunks that never go out
        _wait_for_file(os.path.join(tmp, "head1"))
        if mode == "exits":
            os._exit(0)  # after the head, before the payload
        _wait_for_file(os.path.join(tmp, "result1.json"))  # alive, silent
        os._exit(0)  # its head send is complete; the dropped chunks are nobody's to drain
    ch = TensorDictChannel(
        0,
        transport="dist",
        slot_bytes=SMALL_HEAD,
        timeout=CHANNEL_TIMEOUT_S if mode == "stalls" else TIMEOUT_S,
    )
    check_dict(ch.recv(), _fault_hop(0, tokens=1))
    _, handles, _ = ch.irecv_posted()  # hop 1's head arrived; its payload receives are posted
    assert handles, "hop 1 should need payload messages"
    _touch(os.path.join(tmp, "head1"))
    try:
        for h in handles:
            h.wait()
    except Exception as e:  # noqa: BLE001 - the expected outcome, checked by the test
        _record(tmp, rank, raised=True, type=type(e).__name__, error=str(e))
    else:
        _record(tmp, rank, raised=False)


@pytest.mark.parametrize("mode", ["exits", "stalls"])
def test_sender_dies_or_stalls_between_head_and_payload(tmp_path, mode: str) -> None:
    """The payload wait raises naming rank 0 and receive #1: a RuntimeError once the sender's
    process is gone, a TimeoutError after the channel timeout while it stays silent."""
    run_ranks(2, _head_only_body, mode, str(tmp_path), timeout_s=TIMEOUT_S)
    res = _result(tmp_path, 1)
    assert res["raised"], "the payload wait returned although the payload was never sent"
    assert "payload of receive #1 from rank 0" in res["error"], res
    assert res["type"] == ("RuntimeError" if mode == "exits" else "TimeoutError"), res


def _receiver_exits_body(rank: int, world: int, tmp: str) -> None:
    if rank == 1:
        ch = TensorDictChannel(0, transport="dist")
        check_dict(ch.recv(), _fault_hop(0))
        _wait_for_file(os.path.join(tmp, "posted"))
        os._exit(0)  # hop 1's send is still outstanding
    ch = TensorDictChannel(1, transport="dist")
    ch.send(_fault_hop(0))
    handles = ch.isend(_fault_hop(1, tokens=5000))  # 1.3 MB that nobody will receive
    _touch(os.path.join(tmp, "posted"))
    info: dict[str, Any] = {}
    try:
        for h in handles:
            h.wait()
    except Exception as e:  # noqa: BLE001 - the expected outcome, checked by the test
        info["wait_error"] = str(e)
    assert REAPER.drain(TIMEOUT_S), "the reaper did not finish the failed send"
    try:
        ch.isend(_fault_hop(2))
    except Exception as e:  # noqa: BLE001
        info["later_error"] = str(e)
    try:
        pp_transport.flush(TIMEOUT_S)
    except Exception as e:  # noqa: BLE001
        info["flush_error"] = str(e)
    _record(tmp, rank, **info)


def test_receiver_dies_with_a_send_outstanding(tmp_path) -> None:
    """The outstanding send's wait() raises naming rank 1 and send #1; the next isend re-raises
    it rather than posting into a dead peer, and flush() reports it."""
    run_ranks(2, _receiver_exits_body, str(tmp_path), timeout_s=TIMEOUT_S)
    res = _result(tmp_path, 0)
    assert "send #1 to rank 1 failed" in res.get("wait_error", ""), res
    assert "an earlier send #1 to rank 1 failed" in res.get("later_error", ""), res
    assert "send #1 to rank 1 failed" in res.get("flush_error", ""), res


def _silent_body(rank: int, world: int, mode: str, transport: str, tmp: str) -> None:
    declared = Declared.from_example(_fault_hop(0)) if mode == "declared" else None
    if rank == 0:
        ch = TensorDictChannel(1, declared=declared, transport=transport)
        ch.send(_fault_hop(0))
        ch.send(_fault_hop(1))
        _wait_for_file(os.path.join(tmp, "timed_out"))  # silent until the peer timed out
        ch.send(_fault_hop(2))
        _wait_for_file(os.path.join(tmp, "result1.json"))
        return
    ch = TensorDictChannel(0, declared=declared, transport=transport, timeout=CHANNEL_TIMEOUT_S)
    for i in range(2):
        check_dict(ch.irecv(num_tokens=4).wait(), _fault_hop(i))
    info: dict[str, Any] = {}
    pending = ch.irecv(num_tokens=4)
    try:
        pending.wait()
    except Exception as e:  # noqa: BLE001 - the expected outcome, checked by the test
        info["type"], info["error"] = type(e).__name__, str(e)
    _touch(os.path.join(tmp, "timed_out"))
    try:
        check_dict(pending.wait(timeout=TIMEOUT_S), _fault_hop(2))  # the same receive completes
        info["later"] = "ok"
    except Exception as e:  # noqa: BLE001
        info["later"] = f"{type(e).__name__}: {e}"
    _record(tmp, rank, **info)


@pytest.mark.parametrize(
    "mode, transport", [("header", "dist"), ("declared", "dist"), ("header", "shm")]
)
def test_silent_peer_times_out_naming_peer_and_step(tmp_path, mode: str, transport: str) -> None:
    """After two hops the peer stays alive and sends nothing: wait() raises a TimeoutError naming
    rank 0 and receive #2 after the channel's 2 s; once the peer sends, a later wait() of the same
    receive completes with the hop."""
    run_ranks(2, _silent_body, mode, transport, str(tmp_path), timeout_s=TIMEOUT_S)
    res = _result(tmp_path, 1)
    assert res.get("type") == "TimeoutError", res
    assert "receive #2 from rank 0" in res["error"], res
    assert res["later"] == "ok", res


def _after_death_body(rank: int, world: int, side: str, tmp: str) -> None:
    survivor = 0 if side == "send" else 1
    if rank != survivor:
        if side == "send":
            check_dict(TensorDictChannel(0, transport="dist").recv(), _fault_hop(0))
        else:
            TensorDictChannel(1, transport="dist").send(_fault_hop(0))
        os._exit(0)
    if side == "send":
        ch = TensorDictChannel(1, transport="dist", timeout=TIMEOUT_S)
        ch.send(_fault_hop(0))
    else:
        ch = TensorDictChannel(0, transport="dist", timeout=TIMEOUT_S)
        check_dict(ch.recv(), _fault_hop(0))
    # the peer is gone before the next call; wait until this end's connection says so
    time.sleep(0.5)
    try:
        if side == "send":
            ch.send(_fault_hop(1, tokens=5000))
        else:
            ch.irecv().wait()
    except Exception as e:  # noqa: BLE001
        _record(tmp, rank, error=str(e))
    else:
        _record(tmp, rank, error=None)


@pytest.mark.parametrize("side", ["send", "recv"])
def test_call_posted_after_the_peer_died_names_peer_and_step(tmp_path, side: str) -> None:
    run_ranks(2, _after_death_body, side, str(tmp_path), timeout_s=TIMEOUT_S)
    survivor = 0 if side == "send" else 1
    res = _result(tmp_path, survivor)
    assert res["error"], "the call towards a dead peer returned"
    peer = 1 - survivor
    assert f"rank {peer}" in res["error"] and "#1" in res["error"], res


# ---------------------------------------------------------------------------------------------
# guards: each test fails when the guard it names is removed from the core
# ---------------------------------------------------------------------------------------------


def _half_posted_body(rank: int, world: int, tmp: str) -> None:
    if rank == 0:
        ch = TensorDictChannel(1, transport="dist", chunk_bytes=16 << 10)
        ch.link.wait_hello(TIMEOUT_S)  # the peer's 64 KiB head capacity is known
        real = pp_transport.isend
        calls: list[int] = []

        def isend(buf: torch.Tensor, peer: int, group: Any, tag: int, *a: Any) -> Any:
            calls.append(tag)
            if len(calls) == 2:  # the hop's second message: its head is already on the wire
                raise RuntimeError("injected: the second message could not be posted")
            return real(buf, peer, group, tag, *a)

        pp_transport.isend = isend
        info: dict[str, Any] = {}
        try:
            ch.isend(_fault_hop(0, tokens=600))
        except RuntimeError as e:
            info["first"] = str(e)
        pp_transport.isend = real
        info["tags"] = calls
        try:
            ch.isend(_fault_hop(1))
        except RuntimeError as e:
            info["next"] = str(e)
        _record(tmp, rank, **info)
        _wait_for_file(os.path.join(tmp, "result1.json"))
        os._exit(0)  # hop 0's head send stays half a hop: nothing to drain
    ch = TensorDictChannel(0, transport="dist", slot_bytes=SMALL_HEAD, timeout=CHANNEL_TIMEOUT_S)
    _, handles, _ = ch.irecv_posted()  # the head of the half-posted hop arrives
    _record(tmp, rank, payload_receives=len(handles))


def test_guard_link_marked_broken_after_a_half_posted_send(tmp_path) -> None:
    """A send whose head went out but whose next message failed to post leaves the peer
    mid-hop: every later send on that link raises instead of posting out of step."""
    run_ranks(2, _half_posted_body, str(tmp_path), timeout_s=TIMEOUT_S)
    res = _result(tmp_path, 0)
    assert res["tags"][:2] == [pp_transport.HEAD_TAG, pp_transport.DATA_TAG], res
    assert "injected" in res.get("first", ""), res
    assert "out of step since a send failed half-posted" in res.get("next", ""), res
    assert "rank 1" in res["next"], res


def _unposted_body(rank: int, world: int, transport: str, tmp: str) -> None:
    if rank == 0:
        ch = TensorDictChannel(1, transport=transport)
        ch.send(_fault_hop(0))
        real = pp_transport.isend

        def isend(*a: Any) -> Any:
            raise RuntimeError("injected: nothing could be posted")

        pp_transport.isend = isend
        try:
            ch.isend(_fault_hop(1))
            raised = False
        except RuntimeError:
            raised = True
        pp_transport.isend = real
        ch.send(_fault_hop(2))
        _record(tmp, rank, raised=raised)
        return
    ch = TensorDictChannel(0, transport=transport, timeout=TIMEOUT_S)
    check_dict(ch.recv(), _fault_hop(0))
    check_dict(ch.recv(), _fault_hop(2))  # arrives as hop #1: the failed one took no number


def test_guard_send_seq_does_not_advance_when_nothing_was_posted(tmp_path) -> None:
    run_ranks(2, _unposted_body, "dist", str(tmp_path), timeout_s=TIMEOUT_S)
    assert _result(tmp_path, 0)["raised"]


def _pack_fails_body(rank: int, world: int, transport: str, where: str, tmp: str) -> None:
    if rank == 0:
        ch = TensorDictChannel(1, transport=transport)
        ch.send(_fault_hop(0))
        if transport == "shm":
            assert ch.transport == "shm"
        real = pp_link.pack, pp_link.pack_cpu_unchecked, pp_link.pack_cpu_begin

        def pack_fails(*a: Any, **kw: Any) -> Any:
            raise RuntimeError("injected pack failure")

        # every pack the link calls that can fail: the device one, the CPU one, and the first
        # half of the chunked CPU pack (the second half only moves dense bytes by address)
        pp_link.pack = pp_link.pack_cpu_unchecked = pp_link.pack_cpu_begin = pack_fails
        try:
            ch.isend(_fault_hop(1, tokens=4 if where == "head" else 600))
            raised = None
        except RuntimeError as e:
            raised = str(e)
        pp_link.pack, pp_link.pack_cpu_unchecked, pp_link.pack_cpu_begin = real
        ch.send(_fault_hop(2))
        ch.send(_fault_hop(3, tokens=600))
        _record(tmp, rank, raised=raised)
        return
    ch = TensorDictChannel(0, transport=transport, slot_bytes=SMALL_HEAD, timeout=TIMEOUT_S)
    check_dict(ch.recv(), _fault_hop(0))
    check_dict(ch.recv(), _fault_hop(2))
    check_dict(ch.recv(), _fault_hop(3, tokens=600))


@pytest.mark.parametrize(
    "transport, where", [("dist", "head"), ("dist", "chunks"), ("shm", "head")]
)
def test_pack_failure_leaves_the_link_in_step(tmp_path, transport: str, where: str) -> None:
    """The pack the link calls raises (into the head, into the chunked payload buffer, or into
    the peer's ring slot): the send raises and the next hops arrive intact, in order."""
    run_ranks(2, _pack_fails_body, transport, where, str(tmp_path), timeout_s=TIMEOUT_S)
    assert "injected pack failure" in (_result(tmp_path, 0)["raised"] or "")


def _tokens_body(rank: int, world: int, tmp: str) -> None:
    declared = Declared.from_example(_fault_hop(0))
    if rank == 0:
        ch = TensorDictChannel(1, declared=declared, transport="dist")
        ch.send(_fault_hop(0, tokens=5))
        ch.send(_fault_hop(1, tokens=4))
        return
    ch = TensorDictChannel(0, declared=declared, transport="dist", timeout=TIMEOUT_S)
    info: dict[str, Any] = {}
    try:
        ch.irecv(num_tokens=4).wait()
    except WireError as e:
        info["error"] = str(e)
    check_dict(ch.irecv(num_tokens=4).wait(), _fault_hop(1, tokens=4))
    _record(tmp, rank, **info)


def test_guard_declared_token_count_checked_on_the_receiver(tmp_path) -> None:
    """irecv(num_tokens=4) of a 5-token hop raises naming both counts; the next hop arrives."""
    run_ranks(2, _tokens_body, str(tmp_path), timeout_s=TIMEOUT_S)
    err = _result(tmp_path, 1).get("error", "")
    assert "5 tokens" in err and "posted for 4" in err and "receive #0 from rank 0" in err, err


def _declared_differently_body(rank: int, world: int, which: str, tmp: str) -> None:
    hop = {"h": torch.ones(4, 8, dtype=torch.bfloat16), "__msg_type__": "proxy"}
    theirs = {
        "trailing": {"h": torch.ones(4, 9, dtype=torch.bfloat16), "__msg_type__": "proxy"},
        "dtype": {"h": torch.ones(4, 8, dtype=torch.float16), "__msg_type__": "proxy"},
        "constant": {"h": torch.ones(4, 8, dtype=torch.bfloat16), "__msg_type__": "output"},
        "undeclared sender": hop,
    }[which]
    if rank == 0:
        declared = None if which == "undeclared sender" else Declared.from_example(hop)
        ch = TensorDictChannel(1, declared=declared, transport="dist")
        ch.send(hop)
        TensorDictChannel(1, transport="dist").send({"after": 1})  # the same link
        return
    mine = Declared.from_example(
        theirs if which != "undeclared sender" else {"h": torch.ones(4, 8), "__msg_type__": "proxy"}
    )
    ch = TensorDictChannel(0, declared=mine, transport="dist", timeout=TIMEOUT_S)
    plain = TensorDictChannel(0, transport="dist", timeout=TIMEOUT_S)  # the same link
    info: dict[str, Any] = {}
    try:
        ch.irecv(num_tokens=4).wait()
    except WireError as e:
        info["error"] = str(e)
    check_dict(plain.recv(), {"after": 1})
    _record(tmp, rank, **info)


@pytest.mark.parametrize(
    "which, both",
    [
        ("trailing", ["(4, 8)", "(None, 9)"]),
        ("dtype", ["torch.bfloat16", "torch.float16"]),
        ("constant", ["'proxy'", "'output'"]),
        ("undeclared sender", ["torch.bfloat16", "torch.float32"]),
    ],
)
def test_guard_receiver_and_sender_declaring_differently(
    tmp_path, which: str, both: list[str]
) -> None:
    """The receiver raises naming both values (the hop's and its declaration's) and the peer and
    step; the link stays in step (the next hop arrives through another channel object)."""
    run_ranks(2, _declared_differently_body, which, str(tmp_path), timeout_s=TIMEOUT_S)
    err = _result(tmp_path, 1).get("error", "")
    assert all(b in err for b in both) and "receive #0 from rank 0" in err, err


def _receiver_limits_body(rank: int, world: int, tmp: str) -> None:
    hops = [{"s": torch.Size([1] * 10)}, {"v": [None] * 10}, {"x": torch.zeros([1] * 5)}]
    if rank == 0:
        for d in hops:
            send_tensor_dict(d, 1)
            send_tensor_dict({"ok": 1}, 1)
        return
    ch = TensorDictChannel(0, limits=Limits(max_items=9, max_ndim=4), timeout=TIMEOUT_S)
    errors = []
    for _ in hops:
        try:
            ch.recv()
            errors.append("")
        except WireError as e:
            errors.append(str(e))
        check_dict(ch.recv(), {"ok": 1})
    _record(tmp, rank, errors=errors)


def test_guard_receiver_applies_its_own_limits_incl_size_dims(tmp_path) -> None:
    """A receiver with stricter Limits than its sender refuses (naming the limit, the peer and
    the step) a torch.Size of 10 dims and a 10-item list against max_items=9, and 5 dims against
    max_ndim=4; each next hop arrives."""
    run_ranks(2, _receiver_limits_body, str(tmp_path), timeout_s=TIMEOUT_S)
    errors = _result(tmp_path, 1)["errors"]
    assert "max_items" in errors[0] and "max_items" in errors[1] and "max_ndim=4" in errors[2], (
        errors
    )
    assert all("from rank 0" in e for e in errors), errors


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
    _Bad("key over `max_key_bytes` (2000 bytes)", lambda: {"k" * 2000: 1}),
    _Bad("more keys than `max_entries` (5000)", lambda: {f"k{i}": i for i in range(5000)}),
    _Bad("tensor of 17 dims (> `max_ndim`)", lambda: {"x": torch.zeros([1] * 17)}),
    _Bad("2M list items (> `max_items`)", lambda: {"l": [None] * (2 << 20)}),
    _Bad("`torch.Size` dims over `max_items`", lambda: {"s": torch.Size([1] * ((1 << 20) + 1))}),
    _Bad("value of an unsupported type (`object()`)", _bad_value(object())),
    _Bad("dataclass instance", _bad_value(_Point(1))),
    _Bad("`IntEnum` member (a subclass of int)", _bad_value(_Color.RED)),
    _Bad("`set`", _bad_value({1, 2})),
    _Bad("unencodable value inside a container", _bad_value([1, (2, {"k": object()})])),
    _Bad("tensor as a dict key inside a value", _bad_value({torch.ones(1): 1})),
    _Bad("value nested deeper than `max_depth` (32)", _bad_value(_deep(40))),
    _Bad("self-referencing list", _bad_value(_self_referencing())),
    _Bad(
        "unsupported dtype (`torch.quint8`)",
        lambda: {"q": torch.quantize_per_tensor(torch.rand(4), 0.1, 0, torch.quint8)},
    ),
    _Bad(
        "dtype the kernels do not move (`float8_e8m0fnu`)",
        lambda: {"e": torch.zeros(4, dtype=torch.float8_e8m0fnu)},
    ),
    _Bad(
        "dtype the kernels do not move (`float4_e2m1fn_x2`)",
        lambda: {"e": torch.zeros(4, dtype=torch.uint8).view(torch.float4_e2m1fn_x2)},
    ),
    _Bad("sparse tensor", lambda: {"s": torch.eye(3).to_sparse()}),
    _Bad(
        "nested tensor (`torch.nested`)",
        lambda: {"n": torch.nested.nested_tensor([torch.zeros(2), torch.zeros(3)])},
    ),
    _Bad("sparse tensor inside a list", _bad_value([torch.eye(2).to_sparse()])),
    _Bad("tensor inside a list", _bad_value([torch.ones(2), torch.arange(3)]), accepted=True),
    _Bad("tensor inside a dict value", _bad_value({"t": torch.ones(2)}), accepted=True),
    _Bad(
        "mixed devices in one dict (cpu + meta)",
        lambda: {"x": torch.arange(4), "m": torch.empty(3, 2, device="meta")},
        accepted=True,
    ),
    _Bad(
        "tensor that requires grad", lambda: {"w": torch.ones(3, requires_grad=True)}, accepted=True
    ),
]


def _decl_dict(i: int, tokens: int = 4) -> dict[str, Any]:
    g = torch.Generator().manual_seed(300 + i)
    return {
        "h": torch.randn(tokens, 8, generator=g).to(torch.bfloat16),
        "pos": torch.arange(tokens) + i,
        "__msg_type__": "proxy",
    }


_DROP = object()


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


_DECLARED_BAD = [
    _Bad("declared: dtype differs", _decl_bad(h=lambda: torch.zeros(4, 8, dtype=torch.float16))),
    _Bad(
        "declared: trailing dim differs",
        _decl_bad(h=lambda: torch.zeros(4, 9, dtype=torch.bfloat16)),
    ),
    _Bad("declared: ndim differs", _decl_bad(h=lambda: torch.zeros(4, 8, 1, dtype=torch.bfloat16))),
    _Bad("declared: token counts disagree between keys", _decl_bad(pos=lambda: torch.arange(5))),
    _Bad("declared: token count above `max_tokens` (8)", lambda: _decl_dict(0, tokens=9)),
    _Bad(
        "declared: device differs (meta)",
        _decl_bad(h=lambda: torch.zeros(4, 8, dtype=torch.bfloat16, device="meta")),
    ),
    _Bad("declared: constant differs", _decl_bad(__msg_type__="other")),
    _Bad("declared: plain value where a tensor is declared", _decl_bad(h=7)),
    _Bad(
        "declared: tensor where a constant is declared",
        _decl_bad(__msg_type__=lambda: torch.zeros(1)),
    ),
    _Bad("declared: key missing", _decl_bad(pos=_DROP)),
    _Bad("declared: extra key", lambda: {**_decl_dict(0), "extra": 1}),
    _Bad("declared: keys reordered", lambda: dict(reversed(list(_decl_dict(0).items())))),
]

_SMALL_LIMITS = Limits(max_plain_bytes=1024, max_depth=4)
_LIMITS_BAD = [
    _Bad("value over `max_plain_bytes` (`Limits(max_plain_bytes=1024)`)", _bad_value("x" * 2000)),
    _Bad(
        "plain values together over `max_plain_bytes` (1024)",
        lambda: {"a": "x" * 600, "b": "y" * 600},
    ),
    _Bad("value nested deeper than `max_depth` (`Limits(max_depth=4)`)", _bad_value(_deep(5))),
]

_PHASES = [
    ("functional", _GENERIC_BAD),
    ("channel", _GENERIC_BAD),
    ("declared channel", _DECLARED_BAD),
    ("channel with small Limits", _LIMITS_BAD),
]


def _bad_input_body(rank: int, world: int, tmp: str) -> None:
    declared = Declared.from_example(_decl_dict(0), max_tokens=8)
    if rank == 0:
        rows = []
        for api, cases in _PHASES:
            if api == "functional":
                send = lambda d: isend_tensor_dict(d, 1)  # noqa: E731
            else:
                ch = TensorDictChannel(
                    1,
                    declared=declared if api == "declared channel" else None,
                    limits=_SMALL_LIMITS if api == "channel with small Limits" else Limits(),
                )
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
                    rows.append(
                        {"what": case.what, "api": api, "type": type(e).__name__, "message": str(e)}
                    )
                else:
                    assert case.accepted, f"{api}: {case.what} was sent without an error"
                    rows.append({"what": case.what, "api": api, "type": "accepted", "message": ""})
                send(good(i))  # must arrive intact: the failure put nothing on the wire
        _touch(os.path.join(tmp, "rows.json"), json.dumps(rows))
        return
    for api, cases in _PHASES:
        if api == "functional":
            recv = lambda: recv_tensor_dict(0)  # noqa: E731
        else:
            ch = TensorDictChannel(
                0, declared=declared if api == "declared channel" else None, timeout=TIMEOUT_S
            )
            recv = lambda: ch.irecv(num_tokens=4 if ch.declared else None).wait()  # noqa: E731, B023
        good = _decl_dict if api == "declared channel" else _good
        check_dict(recv(), good(0))
        for i, case in enumerate(cases, start=1):
            if case.accepted:
                want = case.build()
                got = recv()
                check_dict(got, want)
                assert not any(
                    isinstance(v, torch.Tensor) and v.requires_grad for v in got.values()
                )
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


_TABLE_CACHE: dict[str, str] = {}


def _bad_input_table(tmp: Path) -> str:
    if "table" not in _TABLE_CACHE:
        run_ranks(2, _bad_input_body, str(tmp), timeout_s=120)
        rows = json.loads((tmp / "rows.json").read_text())
        assert len(rows) == sum(len(cases) for _, cases in _PHASES)
        for r in rows:
            if r["type"] != "accepted":
                assert r["type"] in ("TypeError", "ValueError"), r
        _TABLE_CACHE["table"] = _table(rows)
        out = os.environ.get("PIPEPACK_BAD_INPUT_TABLE")
        if out:
            Path(out).write_text(_TABLE_CACHE["table"] + "\n")
    return _TABLE_CACHE["table"]


def test_bad_input_raises_on_the_sender_and_nothing_reaches_the_wire(tmp_path) -> None:
    """Every kind of bad input raises TypeError/ValueError on the sender; after each, a good
    dict sent through the same API arrives intact (a failed send that had put a head on the wire
    or consumed a sequence number would corrupt or break it). Rows marked accepted arrive."""
    table = _bad_input_table(tmp_path)
    assert table.count("\n") >= len(_GENERIC_BAD) + len(_DECLARED_BAD) + len(_LIMITS_BAD) + 1


def test_readme_bad_input_table_is_current(tmp_path) -> None:
    """README.md's table lists what the code raises (regenerate with
    PIPEPACK_BAD_INPUT_TABLE=table.md python -m pytest tests/test_hardening.py -k bad_input)."""
    table = _bad_input_table(tmp_path)
    readme = README.read_text()
    missing = [line for line in table.splitlines()[2:] if line not in readme]
    assert not missing, (
        "README.md's bad-input table is out of date; the rows that changed:\n"
        + "\n".join(missing)
        + "\n\nthe whole table:\n"
        + table
    )


def _bad_dst_body(rank: int, world: int, tmp: str) -> None:
    dist.barrier()  # both ranks are up before rank 0 finishes
    if rank == 1:
        _wait_for_file(os.path.join(tmp, "result0.json"))
        return
    errors = {}
    for which, dst in (("outside", world), ("self", rank), ("negative", -1), ("str", "1")):
        try:
            isend_tensor_dict({"x": torch.arange(3)}, dst)
            errors[which] = None
        except ValueError as e:
            errors[which] = str(e)
    _record(tmp, rank, **errors)


def test_dst_outside_the_group_or_self_is_refused(tmp_path) -> None:
    run_ranks(2, _bad_dst_body, str(tmp_path), timeout_s=TIMEOUT_S)
    res = _result(tmp_path, 0)
    assert all(e and "dst" in e and "2 ranks" in e for e in res.values()), res


# ---------------------------------------------------------------------------------------------
# regressions
# ---------------------------------------------------------------------------------------------


def test_pack_reference_accepts_an_empty_strided_tensor() -> None:
    """Reproducer: pipepack.kernels.pack_reference([torch.zeros(1, dtype=torch.bfloat16)[1::2]])
    raised RuntimeError."""
    t = torch.zeros(1, dtype=torch.bfloat16)[1::2]
    assert t.shape == (0,) and t.stride() == (2,)
    assert torch.equal(pack_reference([t]), pack([t], impl="torch"))


def _strided_scalar_body(rank: int, world: int, transport: str) -> None:
    logits = torch.arange(32, dtype=torch.float32).reshape(1, 32)
    hops = [{"a": torch.zeros(1)}, {"h": torch.zeros(30_000), "last": logits[:, -1]}]
    if rank == 0:
        ch = TensorDictChannel(1, transport=transport, chunk_bytes=16 << 10)
        for d in hops:
            ch.send(d)
        return
    ch = TensorDictChannel(0, transport=transport, slot_bytes=SMALL_HEAD, timeout=TIMEOUT_S)
    for d in hops:
        check_dict(ch.recv(), d)


@pytest.mark.parametrize("transport", ["dist", "shm"])
def test_one_element_strided_view_in_a_multi_message_payload(transport: str) -> None:
    """Reproducer: a hop of {"h": 120 KB, "last": torch.randn(1, 32000)[:, -1]} raised
    'self.stride(-1) must be 1 to view Float as Byte' in the chunked pack."""
    run_ranks(2, _strided_scalar_body, transport, timeout_s=TIMEOUT_S)
