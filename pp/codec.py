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
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from pipepack.kernels import Layout, reassemble
from pipepack.kernels.ops import unpack_unchecked

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


@dataclass(frozen=True)
class _Plan:
    """What encoding a dict of one signature produced, less its plain values' bytes.

    Kept per signature (keys in order, each tensor's dtype, shape, device and layout, the
    nested tensors of plain values, and the options): a dict that matches one passed every check
    the first encoding made, so a repeat hop costs the signature, its plain values and a lookup.
    """

    limits: Limits
    tp: Callable[[], TP | None]  # weakly: a TP holds its process group
    n_keys: int
    n_tensors: int
    schema_tail: bytes  # the body after its 8-byte head, up to the plain values
    flags: int  # without F_PICKLED, which depends on the values
    tp_world: int
    parts: dict[str, Part]
    picks: dict[str, tuple[tuple[int, bool], ...]]  # per device: (tensor number, sliced)


def _put_bounded(cache: dict, lock: threading.Lock, key: Any, value: Any, cap: int) -> None:
    """Stores into a local cache of at most ``cap`` entries, the oldest dropped first."""
    with lock:
        if len(cache) >= cap:
            cache.pop(next(iter(cache)))
        cache[key] = value


_PLANS: dict[tuple, _Plan] = {}
_PLANS_LOCK = threading.Lock()
_PLANS_MAX = 512


def encode(
    d: Mapping[str, Any],
    *,
    allow_pickle: bool,
    limits: Limits,
    tp: TP | None,
    all_gather_tensors: Mapping[str, bool] | None,
    wire: Mapping[str, tuple[int, torch.Tensor]] | None = None,
) -> Encoded:
    """The body and payload parts of one hop; raises on anything the receiver would refuse.

    ``wire``: per top-level tensor key, ``(wire code, the tensor whose bytes travel)``
    (:mod:`pipepack.pp.wire.hop`); the header keeps the key's own dtype and dims.
    """
    if not isinstance(d, Mapping):
        raise TypeError(f"expected a dict of tensors and plain values, got {type(d).__name__}")
    if wire:  # hops with wire codes are opt-in and rare: no plan, every check every time
        return _encode_full(d, allow_pickle, limits, tp, all_gather_tensors, wire)[0]
    agt = None if all_gather_tensors is None else tuple(all_gather_tensors.items())
    sig: list[Any] = [id(limits), id(tp), allow_pickle, agt]
    top: list[torch.Tensor] = []
    nested: list[torch.Tensor] = []
    vals: list[bytes] = []
    items = 0
    pickled = False
    Tensor = torch.Tensor
    key = None
    try:
        for k, v in d.items():
            if type(k) is not str:
                raise TypeError  # the full encoding names the key
            if isinstance(v, Tensor):
                sig.append((k, v.dtype, v.shape, v.device, v.layout))
                top.append(v)
            else:
                sig.append(k)
                n0 = len(nested)
                b, n_items, p = values.encode_value(
                    v, nested, key=k, allow_pickle=allow_pickle, max_depth=limits.max_depth
                )
                for t in nested[n0:]:
                    sig.append((t.dtype, t.shape, t.device, t.layout))
                vals.append(b)
                items += n_items
                pickled |= p
        key = tuple(sig)
        plan = _PLANS.get(key)
    except Exception:  # noqa: BLE001 - the full encoding below says what is wrong
        plan = None
    if plan is None or plan.limits is not limits or plan.tp() is not tp:
        enc, plan = _encode_full(d, allow_pickle, limits, tp, all_gather_tensors)
        if key is not None:
            _put_bounded(_PLANS, _PLANS_LOCK, key, plan, _PLANS_MAX)
        return enc
    values_b = b"".join(vals)
    if items > limits.max_items or len(values_b) > limits.max_plain_bytes:
        return _encode_full(d, allow_pickle, limits, tp, all_gather_tensors)[0]
    body = hop.body_head(plan.n_keys, plan.n_tensors, len(values_b)) + plan.schema_tail + values_b
    flags = plan.flags | (hop.F_PICKLED if pickled else 0)
    sources = _sources(top + nested if nested else top, plan.picks, tp)
    return Encoded(body, flags, plan.tp_world, plan.parts, sources)


def _sources(
    tensors: list[torch.Tensor], picks: dict[str, tuple[tuple[int, bool], ...]], tp: TP | None
) -> dict[str, list[torch.Tensor]]:
    """Per device type, the tensors to pack in wire order (a TP slice: this rank's part)."""
    sources = {}
    for dev, pk in picks.items():
        src = []
        for i, s in pk:
            t = tensors[i]
            if s:
                t = t.reshape(tp.world, -1)[tp.rank]
            src.append(t)
        sources[dev] = src
    return sources


def _encode_full(
    d: Mapping[str, Any],
    allow_pickle: bool,
    limits: Limits,
    tp: TP | None,
    all_gather_tensors: Mapping[str, bool] | None,
    wire: Mapping[str, tuple[int, torch.Tensor]] | None = None,
) -> tuple[Encoded, _Plan]:
    """Checks everything about ``d`` and encodes it; also returns the plan of its signature
    (meaningful only without ``wire``)."""
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
    picks = {}
    for dev, (index, specs, sliced) in by_dev.items():
        p = part_for(dev, tuple(index), tuple(specs), tuple(sliced), world)
        parts[dev] = p
        if dev != "meta":
            picks[dev] = tuple((p.index[j], p.sliced[j]) for j in p.wire_order)
    sources = _sources(srcs, picks, tp)
    flags = hop.F_SLICED if any_sliced else 0
    tp_world = world if any_sliced else 1
    enc = Encoded(body, flags | (hop.F_PICKLED if pickled else 0), tp_world, parts, sources)
    plan = _Plan(
        limits,
        (lambda: None) if tp is None else weakref.ref(tp),
        len(keys_b),
        n_tensors,
        body[hop.BODY_HEAD_BYTES : len(body) - len(values_b)],
        flags,
        tp_world,
        parts,
        picks,
    )
    return enc, plan


# ------------------------------------------------------------------------------ receive


@dataclass(frozen=True)
class _Decoded:
    schema: hop.Schema
    parts: dict[str, Part]
    limits: Limits
    # per part: the tensor number of each wire entry, in wire order
    scatter: dict[str, tuple[int, ...]]
    # the views come out in tensor order from one part (no slicing, one device type)
    direct: bool
    top_keys: tuple[str, ...]  # keys of the top-level tensors, in tensor order
    plain: bool  # some key holds a plain value
    wired: tuple[tuple[str, hop.TensorDesc], ...] = ()  # top-level keys with a wire code


_SCHEMA_MEMO: dict[tuple[int, int, bytes], _Decoded] = {}
_MEMO_LOCK = threading.Lock()


def _schema_of(body: bytes, limits: Limits, tp_world: int) -> _Decoded:
    values_len = int.from_bytes(body[4:8], "little") if len(body) >= 8 else 0
    # keyed by the limits too: a schema accepted under loose limits is checked again
    key = (
        tp_world,
        id(limits),
        body[: len(body) - values_len] if values_len <= len(body) else body,
    )
    hit = _SCHEMA_MEMO.get(key)
    if hit is not None and hit.limits is limits:
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
    scatter = {dev: tuple(p.index[j] for j in p.wire_order) for dev, p in parts.items()}
    n = len(schema.tensors)
    direct = (
        len(parts) == 1
        and "meta" not in parts
        and not any(any(p.sliced) for p in parts.values())
        and all(sc == tuple(range(n)) for sc in scatter.values())
    )
    top_keys = tuple(k for k, t in zip(schema.keys, schema.is_tensor) if t)
    wired = tuple((k, t) for k, t in zip(top_keys, schema.tensors) if t.wire)
    dec = _Decoded(
        schema,
        parts,
        limits,
        scatter,
        direct,
        top_keys,
        len(top_keys) != len(schema.keys),
        wired,
    )
    _put_bounded(_SCHEMA_MEMO, _MEMO_LOCK, key, dec, 256)
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
    views: list[torch.Tensor] | None = None,
) -> tuple[dict[str, Any], list[Callable[[], None]]]:
    """The received dict (views of ``buffers``) and the postprocess calls (TP reassembly).

    ``buffers`` hold exactly the payload bytes :func:`header_parts` checked against the frame.
    ``views``: when the hop has one CPU-only part laid out in tensor order (``dec.direct``),
    the views of its layout over ``buffers["cpu"]``, made ahead by the caller (else None).
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
    post: list[Callable[[], None]] = []
    if dec.direct:
        ((dev, p),) = dec.parts.items()
        if views is None:
            buf = buffers.get(dev)
            if buf is None:
                buf = _no_payload(dev, p)
            views = unpack_unchecked(buf, p.wire_layout)
    else:
        views = [None] * len(schema.tensors)
        for dev, p in dec.parts.items():
            if dev == "meta":
                for j, i in enumerate(p.index):
                    e = p.layout.entries[j]
                    views[i] = torch.empty(e.shape, dtype=e.dtype, device="meta")
                continue
            buf = buffers.get(dev)
            if buf is None:
                buf = _no_payload(dev, p)
            for i, v in zip(dec.scatter[dev], unpack_unchecked(buf, p.wire_layout)):
                views[i] = v
            if any(p.sliced):
                if tp.device_type != dev:
                    raise WireError(
                        f"the sender sliced {dev} tensors, this receiver's all-gather "
                        f"group carries {tp.device_type}"
                    )
                post.append(_reassembler(views, p, buf, tp))
    if not dec.plain:
        if schema.values_len or len(dec.top_keys) != len(schema.tensors):
            raise WireError(
                f"header: {schema.values_len} bytes of values and "
                f"{len(schema.tensors) - len(dec.top_keys)} nested tensors, but no plain key"
            )
        out = dict(zip(dec.top_keys, views))
    else:
        out = {}
        vb = body
        pos = schema.values_at
        items = limits.max_items
        n_top = len(dec.top_keys)
        next_t = 0
        ti = 0
        for k, is_t in zip(schema.keys, schema.is_tensor):
            if is_t:
                out[k] = views[ti]
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
    if post:
        top = dec.top_keys

        def finish(views=views, out=out, top=top) -> None:
            for i, k in enumerate(top):
                out[k] = views[i]

        post.append(finish)
    return out, post


def _no_payload(dev: str, p: Part) -> torch.Tensor:
    """The buffer of a device type none of whose bytes travelled (every tensor is empty)."""
    if p.wire_layout.nbytes:
        raise WireError(f"no {dev} payload for {p.wire_layout.nbytes} bytes of tensors")
    return torch.empty(0, dtype=torch.uint8, device=_empty_device(dev))


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
