"""A tensor dict <-> one hop's header body and payload layouts. No processes, no transport.

:func:`encode` validates the dict completely (bad input fails here, before anything is sent),
numbers its tensors (top-level keys, then tensors nested in plain values), decides TP slicing
per key, and returns the body bytes and one :class:`Part` per device type: the layout the
receiver will see and the sources to pack. :func:`decode` is its inverse on the receiver, from
a validated :class:`~pipepack.pp.wire.Frame` and the body bytes; it checks that the payload
sizes the frame announced are exactly what the shapes imply.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from pipepack.kernels import Layout, reassemble, unpack

from . import transport
from .wire import hop, values
from .wire.limits import Limits, WireError

__all__ = ["Part", "Encoded", "encode", "decode", "TP"]


@dataclass(frozen=True)
class TP:
    """This side's all-gather group: its size, rank, and the device type it carries."""

    group: Any
    world: int
    rank: int
    device_type: str


@dataclass(frozen=True)
class Part:
    """One device type's share of a hop."""

    device_type: str
    index: tuple[int, ...]  # tensor numbers on this device, in order
    layout: Layout  # full tensors, in ``index`` order
    sliced: tuple[bool, ...]  # per entry of ``layout``
    wire_layout: Layout  # what travels (sliced entries first when any is sliced)
    wire_order: tuple[int, ...]  # entry of ``layout`` for each entry of ``wire_layout``


@dataclass
class Encoded:
    body: bytes
    flags: int
    tp_world: int
    parts: dict[str, Part]
    sources: dict[str, list[torch.Tensor]]  # per device type, in wire_layout order
    tokens: int | None = None


def _part(
    device_type: str,
    index: list[int],
    specs: list[tuple[torch.dtype, tuple]],
    sliced: list[bool],
    world: int,
) -> Part:
    layout = Layout.from_specs(specs)
    if any(sliced):
        wire_layout = layout.sliced(world, sliced)
        order = [i for i, s in enumerate(sliced) if s] + [i for i, s in enumerate(sliced) if not s]
    else:
        wire_layout, order = layout, list(range(len(specs)))
    return Part(device_type, tuple(index), layout, tuple(sliced), wire_layout, tuple(order))


_PART_CACHE: dict[tuple, Part] = {}
_PART_LOCK = threading.Lock()


def part_for(
    device_type: str, index: tuple[int, ...], specs: tuple, sliced: tuple, world: int
) -> Part:
    key = (device_type, index, specs, sliced, world)
    p = _PART_CACHE.get(key)
    if p is None:
        p = _part(device_type, list(index), list(specs), list(sliced), world)
        with _PART_LOCK:
            if len(_PART_CACHE) >= 512:
                _PART_CACHE.clear()
            _PART_CACHE[key] = p
    return p


def _check_tensor(t: torch.Tensor, key: str, limits: Limits) -> None:
    if t.layout != torch.strided:
        raise TypeError(
            f"key {key!r}: {t.layout} tensors cannot be packed; send a dense (strided) tensor"
        )
    if t.is_nested:
        raise TypeError(
            f"key {key!r}: nested tensors cannot be packed; send a dense (strided) tensor"
        )
    if t.dim() > limits.max_ndim:
        raise ValueError(f"key {key!r}: {t.dim()} dims, more than max_ndim={limits.max_ndim}")
    nbytes = t.numel() * t.element_size()
    if nbytes > limits.max_payload_bytes:
        raise ValueError(
            f"key {key!r}: {nbytes} bytes, more than max_payload_bytes={limits.max_payload_bytes}"
        )


def encode(
    d: Mapping[str, Any],
    *,
    allow_pickle: bool,
    limits: Limits,
    tp: TP | None,
    all_gather_tensors: Mapping[str, bool] | None,
    wire: Mapping[str, tuple[int, torch.Tensor]] | None = None,
) -> Encoded:
    """``wire``: per top-level tensor key, ``(wire code, the tensor whose bytes travel)``
    (:mod:`pipepack.pp.wire.hop`); the header keeps the key's own dtype and dims."""
    if not isinstance(d, Mapping):
        raise TypeError(f"expected a dict of tensors and plain values, got {type(d).__name__}")
    keys_b: list[bytes] = []
    kinds: list[bool] = []
    top: list[torch.Tensor] = []
    top_keys: list[str] = []
    nested: list[torch.Tensor] = []
    nested_keys: list[str] = []
    vals: list[bytes] = []
    items = 0
    pickled = False
    for k, v in d.items():
        if type(k) is not str:
            raise TypeError(f"tensor dict keys must be str, got {k!r} ({type(k).__name__})")
        try:
            kb = k.encode("utf-8")
        except UnicodeEncodeError as e:
            raise ValueError(f"key {k!r}: not valid utf-8 ({e.reason})") from None
        if len(kb) > limits.max_key_bytes:
            raise ValueError(f"key {k[:40]!r}...: longer than max_key_bytes={limits.max_key_bytes}")
        keys_b.append(kb)
        if isinstance(v, torch.Tensor):
            _check_tensor(v, k, limits)
            kinds.append(True)
            top.append(v)
            top_keys.append(k)
        else:
            kinds.append(False)
            n0 = len(nested)
            b, n_items, p = values.encode_value(
                v, nested, key=k, allow_pickle=allow_pickle, max_depth=limits.max_depth
            )
            for t in nested[n0:]:
                _check_tensor(t, k, limits)
                nested_keys.append(k)
            vals.append(b)
            items += n_items
            pickled |= p
    n_tensors = len(top) + len(nested)
    if len(keys_b) + n_tensors > limits.max_entries:
        raise ValueError(
            f"{len(keys_b)} keys and {n_tensors} tensors exceed max_entries={limits.max_entries}"
        )
    if items > limits.max_items:
        raise ValueError(
            f"plain values hold {items} container items, more than max_items={limits.max_items}"
        )
    values_b = b"".join(vals)
    if len(values_b) > limits.max_plain_bytes:
        raise ValueError(
            f"plain values encode to {len(values_b)} bytes, more than "
            f"max_plain_bytes={limits.max_plain_bytes}"
        )
    tensors = top + nested
    names = top_keys + nested_keys
    codes = [0] * len(tensors)
    srcs = tensors
    if wire:
        srcs = list(tensors)
        for i, k in enumerate(top_keys):
            if k in wire:
                codes[i], srcs[i] = wire[k]
    world = tp.world if tp is not None else 1
    descs = []
    dims: list[int] = []
    by_dev: dict[str, tuple[list[int], list, list[bool]]] = {}
    any_sliced = False
    for i, (t, k) in enumerate(zip(tensors, names)):
        dev = t.device.type
        s = (
            i < len(top)
            and world > 1
            and dev == tp.device_type
            and t.numel() % world == 0
            and codes[i] in hop.SLICEABLE_WIRE
            and (all_gather_tensors is None or all_gather_tensors.get(k, True))
        )
        any_sliced |= s
        descs.append(hop.tensor_desc_code(t, s, k, codes[i]))
        dims.extend(t.shape)
        e = by_dev.setdefault(dev, ([], [], []))
        e[0].append(i)
        e[1].append((srcs[i].dtype, tuple(srcs[i].shape)))
        e[2].append(s)
    accel = [dv for dv in by_dev if dv not in ("cpu", "meta")]
    if len(accel) > 1:
        raise ValueError(
            f"tensors on {sorted(accel)}: one hop carries at most one accelerator "
            "device type besides cpu"
        )
    if accel:
        devs = {t.device for t in tensors if t.device.type == accel[0]}
        if len(devs) > 1:
            raise ValueError(
                f"tensors on {sorted(map(str, devs))}: one hop's {accel[0]} tensors "
                "must share one device"
            )
    body = hop.encode_body(keys_b, kinds, descs, dims, values_b)
    parts = {}
    sources = {}
    for dev, (index, specs, sliced) in by_dev.items():
        p = part_for(dev, tuple(index), tuple(specs), tuple(sliced), world)
        parts[dev] = p
        if dev == "meta":
            continue
        src = []
        for j in p.wire_order:
            t = srcs[p.index[j]]
            if p.sliced[j]:
                t = t.reshape(world, -1)[tp.rank]
            src.append(t)
        sources[dev] = src
    flags = (hop.F_PICKLED if pickled else 0) | (hop.F_SLICED if any_sliced else 0)
    return Encoded(body, flags, world if any_sliced else 1, parts, sources)


# ------------------------------------------------------------------------------ receive


@dataclass(frozen=True)
class _Decoded:
    schema: hop.Schema
    parts: dict[str, Part]
    wired: tuple[tuple[str, hop.TensorDesc], ...] = ()  # top-level keys with a wire code


_SCHEMA_MEMO: dict[tuple[int, Limits, bytes], _Decoded] = {}
_MEMO_LOCK = threading.Lock()


def _schema_of(body: bytes, limits: Limits, tp_world: int) -> _Decoded:
    values_len = int.from_bytes(body[4:8], "little") if len(body) >= 8 else 0
    # keyed by the limits too: a schema accepted under loose limits is checked again
    key = (tp_world, limits, body[: len(body) - values_len] if values_len <= len(body) else body)
    hit = _SCHEMA_MEMO.get(key)
    if hit is not None:
        return hit
    schema = hop.decode_schema(body, limits=limits)
    by_dev: dict[str, tuple[list[int], list, list[bool]]] = {}
    for i, t in enumerate(schema.tensors):
        e = by_dev.setdefault(t.device_type, ([], [], []))
        e[0].append(i)
        e[1].append(t.wire_spec)
        e[2].append(t.sliced)
    parts = {}
    for dev, (index, specs, sliced) in by_dev.items():
        if any(sliced):
            for i, s in zip(index, sliced):
                numel = 1
                for x in schema.tensors[i].shape:
                    numel *= x
                if s and (tp_world <= 1 or numel % tp_world):
                    raise WireError(
                        f"header: tensor {i} is sliced but its {numel} elements do "
                        f"not divide by the sender's all-gather size {tp_world}"
                    )
        parts[dev] = part_for(dev, tuple(index), tuple(specs), tuple(sliced), tp_world)
    top = [k for k, is_t in zip(schema.keys, schema.is_tensor) if is_t]
    wired = tuple((k, t) for k, t in zip(top, schema.tensors) if t.wire)
    dec = _Decoded(schema, parts, wired)
    with _MEMO_LOCK:
        if len(_SCHEMA_MEMO) >= 256:
            _SCHEMA_MEMO.pop(next(iter(_SCHEMA_MEMO)))
        _SCHEMA_MEMO[key] = dec
    return dec


def header_parts(frame: hop.Frame, body: bytes, limits: Limits) -> _Decoded:
    """Decodes the schema of a body and checks the frame's payload sizes against it."""
    dec = _schema_of(body, limits, frame.tp_world)
    cpu = dec.parts.get("cpu")
    n = cpu.wire_layout.nbytes if cpu is not None else 0
    if n != frame.cpu_nbytes:
        raise WireError(
            f"the frame announces {frame.cpu_nbytes} bytes of cpu payload, the shapes need {n}"
        )
    accel = [p for d, p in dec.parts.items() if d not in ("cpu", "meta")]
    if len(accel) > 1:
        raise WireError("header: more than one accelerator device type")
    dn = accel[0].wire_layout.nbytes if accel else 0
    dt = accel[0].device_type if accel else None
    if dn != frame.dev_nbytes or (dn and dt != frame.dev_type):
        raise WireError(
            f"the frame announces {frame.dev_nbytes} bytes of {frame.dev_type} "
            f"payload, the shapes need {dn} bytes of {dt}"
        )
    return dec


def decode(
    frame: hop.Frame,
    body: bytes,
    dec: _Decoded,
    buffers: Mapping[str, torch.Tensor],
    *,
    allow_pickle: bool,
    limits: Limits,
    tp: TP | None,
    accept_wire: Callable[[tuple], None] | None = None,
) -> tuple[dict[str, Any], list[Callable[[], None]]]:
    """The received dict (views of ``buffers``) and the postprocess calls (TP reassembly).

    A key with a wire code is handed out as the bytes that travelled, and only when
    ``accept_wire`` takes ``dec.wired`` (it raises otherwise); without it such a hop is refused.
    """
    schema = dec.schema
    if frame.flags & hop.F_PICKLED and not allow_pickle:
        raise WireError("the peer sent a pickled value but allow_pickle is False here")
    if dec.wired:
        if accept_wire is None:
            k, t = dec.wired[0]
            raise WireError(
                f"key {k!r} travelled as {hop.WIRE_NAMES[t.wire]} (the sender's wire option); "
                "this receiver takes plain tensors only (no accept_wire)"
            )
        accept_wire(dec.wired)
    if frame.tp_world > 1:
        if tp is None or tp.world != frame.tp_world:
            have = "no all_gather_group" if tp is None else f"an all_gather_group of {tp.world}"
            raise WireError(
                f"the sender sliced tensors for an all-gather over {frame.tp_world} "
                f"ranks, but this receiver has {have}"
            )
    views: list[Any] = [None] * len(schema.tensors)
    post: list[Callable[[], None]] = []
    for dev, p in dec.parts.items():
        if dev == "meta":
            for j, i in enumerate(p.index):
                e = p.layout.entries[j]
                views[i] = torch.empty(e.shape, dtype=e.dtype, device="meta")
            continue
        buf = buffers.get(dev)
        if buf is None:  # every tensor on this device is empty: no bytes travelled
            if p.wire_layout.nbytes:
                raise WireError(f"no {dev} payload for {p.wire_layout.nbytes} bytes of tensors")
            buf = torch.empty(0, dtype=torch.uint8, device=_empty_device(dev))
        wire_views = unpack(buf, p.wire_layout)
        for w, j in enumerate(p.wire_order):
            views[p.index[j]] = wire_views[w]
        if any(p.sliced):
            if tp.device_type != dev:
                raise WireError(
                    f"the sender sliced {dev} tensors, this receiver's all-gather "
                    f"group carries {tp.device_type}"
                )
            post.append(_reassembler(views, p, buf, tp))
    out: dict[str, Any] = {}
    vb = body
    pos = schema.values_at
    items = limits.max_items
    n_top = sum(schema.is_tensor)
    next_t = 0
    ti = 0
    for k, is_t in zip(schema.keys, schema.is_tensor):
        if is_t:
            out[k] = ti
            ti += 1
        else:
            out[k], pos, items, next_t = values.decode_value(
                vb,
                pos,
                items=items,
                max_depth=limits.max_depth,
                allow_pickle=allow_pickle,
                tensor=lambda i: views[n_top + i],
                first_tensor=next_t,
            )
    if pos != len(vb) or n_top + next_t != len(schema.tensors):
        raise WireError(
            f"header: values end at {pos} of {len(vb)} bytes, with {next_t} of "
            f"{len(schema.tensors) - n_top} nested tensors referenced"
        )
    for k, is_t in zip(schema.keys, schema.is_tensor):
        if is_t:
            out[k] = views[out[k]]
    if post:
        top = [k for k, t in zip(schema.keys, schema.is_tensor) if t]

        def finish(views=views, out=out, top=top) -> None:
            for i, k in enumerate(top):
                out[k] = views[i]

        post.append(finish)
    return out, post


def _empty_device(dev: str) -> str:
    mod = getattr(torch, dev, None)
    if dev != "cpu" and not (mod is not None and mod.is_available()):
        raise WireError(f"the peer sent empty {dev} tensors and this process has no {dev} device")
    return dev


def _reassembler(views: list, p: Part, buf: torch.Tensor, tp: TP) -> Callable[[], None]:
    def run() -> None:
        n = p.layout.sliced_nbytes(tp.world, p.sliced)
        gathered = torch.empty((tp.world, n), dtype=torch.uint8, device=buf.device)
        transport.all_gather_into(gathered, buf[:n], tp.group)
        full = reassemble(gathered, p.layout, sliced=p.sliced, part=buf)
        for j, t in enumerate(full):
            views[p.index[j]] = t

    return run


def items_of(schema: hop.Schema, out: Mapping[str, Any]) -> list[tuple[str, tuple | None, Any]]:
    """``(key, (dtype, full shape, device type) or None, plain value)`` of a decoded hop."""
    items = []
    ti = 0
    for k, is_t in zip(schema.keys, schema.is_tensor):
        if is_t:
            t = schema.tensors[ti]
            ti += 1
            items.append((k, (t.dtype, t.shape, t.device_type), None))
        else:
            items.append((k, None, out[k]))
    return items
