"""A tensor-dict channel to one peer: one header and one payload per device type per hop.

Sender: validate and encode everything first (bad input fails before a byte is sent), pack
each device type's tensors into one buffer (one kernel launch on CUDA), post the header and the
payload sends back to back, and hand the sends to a background reaper, so ``isend`` never waits
for the peer and the caller may overwrite its tensors as soon as it returns.

Receiver: receive the fixed-size header slot, validate it, allocate one buffer per device type
of exactly the announced size, post its receives, and hand out zero-copy views. With a
:class:`Declared` schema there is no header at all: the payload receive is posted at once and a
16-byte fingerprint at the front of the payload is checked against what was declared.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import itertools
import struct
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from pipepack.kernels import (
    SUPPORTED_DTYPES,
    Entry,
    Layout,
    pack,
    reassemble,
    unpack,
    unpack_into,
)

from . import transport, wire
from .transport import REAPER, Handle

__all__ = ["TensorDictChannel", "Declared", "PendingRecv", "DEFAULT_SLOT_BYTES",
           "DEFAULT_CHUNK_BYTES"]

DEFAULT_SLOT_BYTES = 16 * 1024 + 1024
# gloo moves a large payload faster as several messages in flight than as one (DESIGN.md;
# here 4 MiB: 3.4 ms as one message, 2.3 ms as 2 x 2 MiB; 64 MiB: 32 ms in 4 MiB chunks,
# 27 ms in 2 MiB ones): CPU payloads above this size are packed and sent in chunks of it,
# the copy of one chunk overlapping the send of the ones before it.
DEFAULT_CHUNK_BYTES = 2 << 20
_FP_MAGIC = 0x4B505050  # "PPPK"
_FP = struct.Struct("<IIII")  # magic, schema hash, tokens, seq  (16 bytes)


def _default_group(group: dist.ProcessGroup | None) -> dist.ProcessGroup:
    return dist.group.WORLD if group is None else group


def _plain_ok(key: Any) -> str:
    if not isinstance(key, str):
        raise TypeError(f"tensor dict keys must be str, got {key!r} ({type(key).__name__})")
    return key


@dataclass(frozen=True)
class _Part:
    """What one device type contributes to a hop."""

    device_type: str
    keys: tuple[str, ...]
    layout: Layout  # full tensors, in key order
    sliced: tuple[bool, ...]  # per key: TP-sliced on the wire
    wire_layout: Layout  # what travels: Layout.sliced(W, flags) when any is sliced
    wire_names: tuple[str, ...]  # keys in wire_layout order (sliced first)


@dataclass(frozen=True)
class Declared:
    """A schema fixed for the run, so a hop needs no header message at all.

    ``fields`` maps each key, in order, to either a ``(dtype, shape, device_type)`` triple whose
    shape may hold ``None`` in dim 0 (the token count, given per call) or a constant plain value
    (``__msg_type__`` and the like, checked on send and restored on receive).
    """

    fields: tuple[tuple[str, Any], ...]

    @staticmethod
    def from_example(example: Mapping[str, Any], *, dynamic: Sequence[str] | None = None
                     ) -> Declared:
        """Declares ``example``'s keys, dtypes, devices and trailing dims.

        Dim 0 of the tensors named in ``dynamic`` (default: every tensor with a dim) is the
        per-call token count; plain values are constants.
        """
        fields = []
        for k, v in example.items():
            _plain_ok(k)
            if isinstance(v, torch.Tensor):
                dyn = v.dim() > 0 and (dynamic is None or k in dynamic)
                shape = ((None,) + tuple(v.shape[1:])) if dyn else tuple(v.shape)
                fields.append((k, (v.dtype, shape, v.device.type)))
            else:
                fields.append((k, v))
        return Declared(tuple(fields))

    def is_tensor(self, spec: Any) -> bool:
        return (isinstance(spec, tuple) and len(spec) == 3 and isinstance(spec[0], torch.dtype))


class PendingRecv:
    """A posted receive. ``wait()`` returns the tensor dict.

    The dict's tensors are zero-copy views of one buffer per device type, owned by this
    receive: they stay valid until the caller drops them (nothing reuses the buffer).
    """

    def __init__(self, resolve: Callable[[float | None], tuple[dict, list[Handle], list]],
                 future: concurrent.futures.Future | None = None,
                 after: Callable[[dict], None] | None = None) -> None:
        self._resolve = resolve
        self._future = future
        self._after = after
        self._result: dict | None = None
        self._posted: tuple[dict, list[Handle], list] | None = None

    def _posted_now(self, timeout: float | None) -> tuple[dict, list[Handle], list]:
        if self._posted is None:
            if self._future is not None:
                self._posted = self._future.result(timeout)
            else:
                self._posted = self._resolve(timeout)
        return self._posted

    def wait(self, timeout: float | None = None) -> dict:
        if self._result is None:
            d, handles, post = self._posted_now(timeout)
            for h in handles:
                h.wait(timeout)
            for fn in post:
                fn()
            if self._after is not None:
                self._after(d)
            self._result = d
        return self._result

    def wait_into(self, outs: Mapping[str, torch.Tensor], timeout: float | None = None) -> dict:
        """Waits, then copies the tensors named in ``outs`` into those caller-owned buffers.

        The received tensors are views of one buffer per device type, so this is one
        ``pipepack.kernels.unpack_into`` launch per buffer, straight from the receive buffer:
        static CUDA-graph inputs take the payload with one copy. A destination may be larger
        in dim 0 (the hop lands in ``outs[k][:n]``). The returned dict holds ``outs``' tensors
        (or their ``[:n]`` views) for those keys.
        """
        d = self.wait(timeout)
        groups: dict[tuple[torch.device, int], list[str]] = {}
        for k in outs:
            t = d.get(k)
            if not isinstance(t, torch.Tensor):
                raise KeyError(f"key {k!r}: not a tensor of the received dict")
            groups.setdefault((t.device, t.untyped_storage().data_ptr()), []).append(k)
        for (device, _), keys in groups.items():
            storage = d[keys[0]].untyped_storage()
            buf = torch.empty(0, dtype=torch.uint8, device=device).set_(storage)
            entries = tuple(
                Entry(d[k].dtype, tuple(d[k].shape), d[k].storage_offset() * d[k].element_size(),
                      d[k].numel() * d[k].element_size()) for k in keys)
            unpack_into(buf, Layout(entries, buf.numel()), [outs[k] for k in keys], names=keys)
        for k in outs:
            v, t = outs[k], d[k]
            d[k] = v if tuple(v.shape) == tuple(t.shape) else v[: t.shape[0]]
        return d

    def is_completed(self) -> bool:
        if self._result is not None:
            return True
        if self._future is not None and not self._future.done():
            return False
        d, handles, _ = self._posted_now(None)  # posted already: no wait here
        return all(h.is_completed() for h in handles)


def _byte_view(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bytes as a flat uint8 tensor (a copy only when it is not dense)."""
    flat = t.reshape(-1)
    if flat.numel() and flat.stride(0) != 1:  # e.g. a one-element view with a large stride
        flat = torch.empty(flat.shape, dtype=flat.dtype, device=flat.device).copy_(flat)
    return flat.view(torch.uint8)


def _use_counter() -> Callable[[torch.Tensor], int] | None:
    """How many tensors share a buffer's storage, if this torch can tell reliably.

    Checked once: a view must add exactly one to the count and dropping it take it back;
    otherwise receive buffers are simply never reused.
    """
    count = getattr(torch._C, "_storage_Use_Count", None)
    if count is None:
        return None
    try:
        def uses(t: torch.Tensor) -> int:
            return count(t.untyped_storage()._cdata)
        t = torch.empty(16, dtype=torch.uint8)
        c0 = uses(t)
        v = t[1:]
        c1 = uses(t)
        del v
        return uses if c1 == c0 + 1 and uses(t) == c0 else None
    except Exception:  # noqa: BLE001 - any surprise: no reuse
        return None


_USES = _use_counter()
_UNSHARED = None if _USES is None else _USES(torch.empty(16, dtype=torch.uint8))


class _RecvPool:
    """CPU receive buffers, reused once nothing outside the pool holds their storage.

    The received tensors are views of their buffer, owned by the caller for as long as it
    likes; a buffer is only handed out again when no view, handle or pending receive refers
    to it any more. Fresh multi-MiB buffers cost page faults on every hop (a 1 MiB hop spent
    ~0.4 ms faulting its receive buffer in), which this avoids in steady state.
    """

    def __init__(self, per_size: int = 4) -> None:
        self._bufs: dict[int, list[torch.Tensor]] = {}
        self._per_size = per_size

    def get(self, nbytes: int) -> torch.Tensor:
        if _USES is None or nbytes < 65536:  # small: the allocator is as good
            return torch.empty(nbytes, dtype=torch.uint8)
        bufs = self._bufs.setdefault(nbytes, [])
        for buf in bufs:
            if _USES(buf) == _UNSHARED:
                return buf
        buf = torch.empty(nbytes, dtype=torch.uint8)
        bufs.append(buf)
        if len(bufs) > self._per_size:
            bufs.pop(0)  # forget the oldest (its views, if any, keep it alive)
        if len(self._bufs) > 16:
            self._bufs.pop(next(iter(self._bufs)))
        return buf


class _SendPool:
    """CPU send buffers handed back once their send completed, reused by size.

    A fresh multi-MiB buffer costs page faults on every hop (glibc maps large allocations
    anew each time); a buffer is only reused after the reaper saw its send complete, so a hop
    in flight is never overwritten. Bounded in count per size and in total bytes.
    """

    def __init__(self, per_size: int = 4, max_bytes: int = 512 << 20) -> None:
        self._free: dict[int, list[torch.Tensor]] = {}
        self._bytes = 0
        self._per_size = per_size
        self._max_bytes = max_bytes
        self._lock = threading.Lock()

    def get(self, nbytes: int) -> torch.Tensor:
        with self._lock:
            free = self._free.get(nbytes)
            if free:
                self._bytes -= nbytes
                return free.pop()
        return torch.empty(nbytes, dtype=torch.uint8)

    def put(self, buf: torch.Tensor) -> None:
        n = buf.numel()
        if buf.storage_offset() or buf.untyped_storage().nbytes() != n:
            return  # only whole buffers this pool handed out
        with self._lock:
            free = self._free.setdefault(n, [])
            if len(free) >= self._per_size:
                return
            while self._bytes + n > self._max_bytes and self._free:
                size, bufs = next(iter(self._free.items()))
                if bufs:
                    bufs.pop()
                    self._bytes -= size
                if not bufs:
                    del self._free[size]
                if size == n:
                    free = self._free.setdefault(n, [])
            if self._bytes + n > self._max_bytes:
                return
            free.append(buf)
            self._bytes += n


class TensorDictChannel:
    """Sends and receives tensor dicts to and from one peer, in order (FIFO), many in flight.

    ``peer`` is a rank within ``group`` (default: the world). ``cpu_group`` (gloo) carries the
    header and CPU tensors; it defaults to ``group`` when that is a gloo group. CUDA tensors go
    over ``group``. With ``all_gather_group`` of size W > 1, every tensor the group can carry
    whose numel divides by W (and that ``all_gather_tensors`` does not map to False) travels as
    its rank slice ``t.reshape(W, -1)[rank]`` and is rebuilt on the receiver with one all-gather
    and one reassembly launch. Both ends of a channel must use the same ``slot_bytes``,
    ``chunk_bytes`` and ``declared``.

    ``irecv()`` returns at once: with ``declared`` the payload receive is already posted; without
    it a progress thread receives the header and posts the payload receive while the caller
    computes.
    """

    def __init__(
        self,
        peer: int,
        *,
        group: dist.ProcessGroup | None = None,
        cpu_group: dist.ProcessGroup | None = None,
        all_gather_group: dist.ProcessGroup | None = None,
        all_gather_tensors: Mapping[str, bool] | None = None,
        declared: Declared | None = None,
        slot_bytes: int = DEFAULT_SLOT_BYTES,
        chunk_bytes: int | None = DEFAULT_CHUNK_BYTES,
        allow_pickle: bool = False,
        limits: wire.Limits = wire.DEFAULT_LIMITS,
        timeout: float | None = None,
    ) -> None:
        self.group = _default_group(group)
        if cpu_group is None:
            if transport.backend_of(self.group) != "gloo":
                raise ValueError("cpu_group (a gloo group) is required when group is not gloo: "
                                 "it carries the header and CPU tensors")
            cpu_group = self.group
        self.cpu_group = cpu_group
        world, me = dist.get_world_size(self.group), dist.get_rank(self.group)
        if not isinstance(peer, int) or not 0 <= peer < world or peer == me:
            raise ValueError(f"peer (dst/src) {peer!r} is not another rank of the group: it has "
                             f"{world} ranks and this is rank {me}")
        self.peer = peer
        self.peer_global = dist.get_global_rank(self.group, peer)
        self.cpu_peer_global = self.peer_global
        self.all_gather_group = all_gather_group
        self.all_gather_tensors = dict(all_gather_tensors or {})
        self.declared = declared
        self.slot_bytes = slot_bytes
        if chunk_bytes is not None and (chunk_bytes <= 0 or chunk_bytes % 16):
            raise ValueError(f"chunk_bytes must be a positive multiple of 16, got {chunk_bytes}")
        self.chunk_bytes = chunk_bytes
        self.allow_pickle = allow_pickle
        self.limits = limits
        self.timeout = timeout
        self._send_seq = 0  # advances only once a hop is fully posted
        self._send_broken: BaseException | None = None
        self._recv_seq = itertools.count()
        self._sent_schemas: dict[int, wire.Schema] = {}
        self._recv_schemas: dict[int, wire.Schema] = {}
        self._schema_of: dict[tuple, wire.Schema] = {}
        self._send_failure: Handle | None = None
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._lock = threading.Lock()
        self._pending_checks: list[tuple[torch.Tensor, Any, int, int]] = []
        W = 1 if all_gather_group is None else dist.get_world_size(all_gather_group)
        self._tp_world = W
        self._tp_rank = 0 if all_gather_group is None else dist.get_rank(all_gather_group)
        self._tp_device = None
        if W > 1:
            self._tp_device = "cpu" if transport.backend_of(all_gather_group) == "gloo" else "cuda"
        self._declared_schemas: dict[tuple, wire.Schema] = {}
        self._declared_headers: dict[int, wire.Header] = {}
        # the fingerprint covers everything declared: keys, dtypes, devices, fixed dims, constants
        self._declared_digest = 0 if declared is None else int.from_bytes(
            hashlib.blake2b(repr(declared.fields).encode(), digest_size=4).digest(), "little")
        self._recv_broken: BaseException | None = None
        self._parts_cache: dict[tuple, list[_Part]] = {}
        self._pool = _SendPool()
        self._recv_pool = _RecvPool()
        self.inline_cap = DEFAULT_CHUNK_BYTES if chunk_bytes is None else chunk_bytes
        self._send_head = 0  # inline payload room of the next head message, both directions
        self._recv_head = 0
        self._recv_last = 0  # the last hop's CPU payload bytes (receive side)

    # ------------------------------------------------------------------ send

    def isend(self, tensor_dict: Mapping[str, Any]) -> list[Handle]:
        """Posts the hop and returns at once; the handles complete when the peer received it.

        Everything that can be wrong with the dict is found before the first message is
        posted, and the channel's state (sequence number, schemas the peer holds, head size)
        only advances once every message of the hop is posted, so a refused dict leaves the
        channel in step with its peer.
        """
        self._raise_send_failure()
        if not isinstance(tensor_dict, Mapping):
            raise TypeError(f"expected a dict of tensors and plain values, got "
                            f"{type(tensor_dict).__name__}")
        if len(tensor_dict) > self.limits.max_entries:
            raise ValueError(f"the dict has {len(tensor_dict)} keys, more than the peer accepts "
                             f"(max_entries={self.limits.max_entries})")
        tensors: dict[str, torch.Tensor] = {}
        values: list[Any] = []
        for k, v in tensor_dict.items():
            _plain_ok(k)
            if len(k.encode("utf-8", "surrogatepass")) > self.limits.max_key_bytes:
                raise ValueError(f"key {k[:40]!r}...: longer than max_key_bytes="
                                 f"{self.limits.max_key_bytes}")
            if isinstance(v, torch.Tensor):
                self._check_tensor(k, v)
                tensors[k] = v
            else:
                values.append(v)
        if self.declared is not None:
            tokens = self._check_declared(tensor_dict)
            declared_header = self._declared_header(tokens)
            schema, shapes = declared_header.schema, declared_header.shapes
        else:
            sliced_keys = frozenset(k for k, t in tensors.items()
                                    if self._is_sliced(k, t.device.type, t.numel()))
            schema = self._schema(tensor_dict, sliced_keys)
            shapes = tuple(tuple(tensors[f.key].shape) for f in schema.tensor_fields())
        parts = self._parts(schema, shapes)
        payloads = []
        for part in parts:
            srcs = [self._wire_tensor(tensors[k], f) for k, f in zip(part.keys, part.sliced)]
            payloads.append((part, self._wire_order(srcs, part.sliced)))
        seq = self._send_seq
        what = f"send #{seq} to rank {self.peer_global}"
        works: list[Any] = []
        keep: list[Any] = []
        try:
            if self.declared is not None:
                self._post_declared_hop(payloads, schema, tokens, seq, what, works, keep)
            else:
                sid = schema.schema_id()
                need_schema = sid not in self._sent_schemas
                self._post_header_hop(payloads, parts, schema, shapes, values, need_schema, seq,
                                      what, works, keep)
                if need_schema:
                    wire.cache_schema(self._sent_schemas, schema)
                cpu = next((p for p in parts if p.device_type == "cpu"), None)
                self._send_head = self._next_head(cpu.wire_layout.nbytes if cpu else 0)
        except BaseException as e:
            if works:  # part of the hop is on the wire: the peer is out of step for good
                self._send_broken = e
            raise
        self._send_seq = seq + 1
        return [self._track(Handle(works, keep, what=what, timeout=self.timeout))]

    def _check_tensor(self, key: str, t: torch.Tensor) -> None:
        if t.layout != torch.strided or t.is_nested:
            raise TypeError(f"key {key!r}: {'nested' if t.is_nested else t.layout} tensors "
                            "cannot be packed; send a dense (strided) tensor")
        if t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"key {key!r}: unsupported dtype {t.dtype}")
        if t.dim() > self.limits.max_ndim:
            raise ValueError(f"key {key!r}: ndim {t.dim()} is more than the peer accepts "
                             f"(max_ndim={self.limits.max_ndim})")

    def _post_declared_hop(self, payloads, schema, tokens, seq, what, works, keep) -> None:
        """No header: a 16-byte fingerprint leads each device type's payload."""
        fp = self._fingerprint(schema, tokens, seq)
        for part, srcs in payloads:
            total = len(fp) + part.wire_layout.nbytes
            buf = self._buffer(srcs, part.device_type, total)
            buf[: len(fp)].copy_(torch.frombuffer(bytearray(fp), dtype=torch.uint8),
                                 non_blocking=True)
            grp = self.cpu_group if part.device_type == "cpu" else self.group
            msgs = [(s_, e_, transport.PAYLOAD_TAG)
                    for s_, e_ in self._chunks(0, total, part.device_type)]
            keep.append(buf)
            self._pack_and_post(srcs, part, buf, len(fp), msgs, grp, works, what)

    def _post_header_hop(self, payloads, parts, schema, shapes, values, need_schema, seq, what,
                         works, keep) -> None:
        """Header path: encode (may raise: nothing sent yet), pack, post head + the rest."""
        header = wire.Header(
            schema_id=schema.schema_id(), schema=schema if need_schema else None,
            shapes=shapes, values=tuple(values),
            payload_nbytes={p.device_type: p.wire_layout.nbytes for p in parts}, seq=seq,
        )
        slot, overflow = wire.encode_header(header, slot_bytes=self.slot_bytes,
                                            allow_pickle=self.allow_pickle, limits=self.limits)
        S, h = self.slot_bytes, self._send_head
        cpu = next(((part, srcs) for part, srcs in payloads if part.device_type == "cpu"), None)
        P = cpu[0].wire_layout.nbytes if cpu else 0
        head = self._pool.get(S + max(h, P))
        head[:S].copy_(torch.frombuffer(bytearray(slot), dtype=torch.uint8))
        if P < h:
            head[S + P : S + h].zero_()
        keep.append(head)
        msgs: list[tuple[Any, Any, int]] = [(0, S + h, transport.HEADER_TAG)]
        if overflow is not None:
            ov = torch.frombuffer(bytearray(overflow), dtype=torch.uint8)
            keep.append(ov)
            msgs.append((ov, None, transport.HEADER_TAG))
        msgs += [(s_, e_, transport.PAYLOAD_TAG) for s_, e_ in self._chunks(S + h, S + P, "cpu")]
        self._pack_and_post(cpu[1] if cpu else [], cpu[0] if cpu else None, head, S, msgs,
                            self.cpu_group, works, what)
        for part, srcs in payloads:
            if part.device_type == "cpu" or part.wire_layout.nbytes == 0:
                continue
            buf = self._buffer(srcs, part.device_type, part.wire_layout.nbytes)
            keep.append(buf)
            self._pack_and_post(srcs, part, buf, 0, [(0, buf.numel(), transport.PAYLOAD_TAG)],
                                self.group, works, what)

    def _next_head(self, cpu_payload_nbytes: int) -> int:
        """Inline room of the next head message: this hop's CPU payload size, capped.

        Both ends derive it from the hop they just exchanged, so the receiver can post a head
        receive of the exact size; in steady state (same shapes) a CPU hop is one message.
        """
        return min(-(-cpu_payload_nbytes // 16) * 16, self.inline_cap)

    def send(self, tensor_dict: Mapping[str, Any]) -> None:
        """Like :meth:`isend`; returns without waiting for the peer either (the reaper does)."""
        self.isend(tensor_dict)

    def _track(self, handle: Handle) -> Handle:
        def done(h: Handle) -> None:
            if h.error is not None:
                self._send_failure = h
                return
            for buf in h.buffers:  # sent: the CPU buffers can take a later hop
                if isinstance(buf, torch.Tensor) and buf.device.type == "cpu":
                    self._pool.put(buf)
        REAPER.add(handle, done)
        return handle

    def _raise_send_failure(self) -> None:
        failed = self._send_failure
        if failed is not None:
            raise RuntimeError(f"an earlier {failed._what} failed: {failed.error}") \
                from failed.error
        if self._send_broken is not None:
            raise RuntimeError(f"the channel to rank {self.peer_global} is out of step since a "
                               f"send failed half-way ({self._send_broken!r})") \
                from self._send_broken

    def _is_sliced(self, key: str, device_type: str, numel: int) -> bool:
        """The TP rule: sliced when the all-gather group can carry it and numel divides by W."""
        return (self._tp_world > 1 and device_type == self._tp_device and numel > 0
                and numel % self._tp_world == 0 and self.all_gather_tensors.get(key, True))

    def _schema(self, tensor_dict: Mapping[str, Any], sliced: frozenset[str]) -> wire.Schema:
        key = tuple(
            (k, v.dtype, v.dim(), v.device.type, k in sliced) if isinstance(v, torch.Tensor)
            else (k,)
            for k, v in tensor_dict.items()
        )
        schema = self._schema_of.get(key)
        if schema is None:
            schema = wire.Schema.from_dict(tensor_dict, sliced=sliced)
            if len(self._schema_of) > 256:
                self._schema_of.clear()
            self._schema_of[key] = schema
        return schema

    def _parts(self, schema: wire.Schema, shapes: Sequence[tuple[int, ...]]) -> list[_Part]:
        """One part per device type, memoised per (schema, shapes): decode repeats shapes."""
        key = (schema.schema_id(), tuple(shapes))
        parts = self._parts_cache.get(key)
        if parts is None:
            parts = self._plan_parts(schema, shapes)
            if len(self._parts_cache) >= 256:
                self._parts_cache.pop(next(iter(self._parts_cache)))
            self._parts_cache[key] = parts
        return parts

    def _plan_parts(self, schema: wire.Schema, shapes: Sequence[tuple[int, ...]]
                    ) -> list[_Part]:
        by_dev: dict[str, list[tuple[wire.TensorField, tuple[int, ...]]]] = {}
        for f, shape in zip(schema.tensor_fields(), shapes):
            by_dev.setdefault(f.device_type, []).append((f, shape))
        parts = []
        for dev, items in by_dev.items():
            layout = Layout.from_specs([(f.dtype, shape) for f, shape in items])
            flags = tuple(f.sliced for f, _ in items)
            wire_layout = layout.sliced(self._tp_world, flags) if any(flags) else layout
            keys = tuple(f.key for f, _ in items)
            names = keys if not any(flags) else (
                tuple(k for k, f in zip(keys, flags) if f)
                + tuple(k for k, f in zip(keys, flags) if not f))
            parts.append(_Part(dev, keys, layout, flags, wire_layout, names))
        return parts

    def _wire_tensor(self, t: torch.Tensor, sliced: bool) -> torch.Tensor:
        if not sliced:
            return t
        return t.reshape(self._tp_world, -1)[self._tp_rank]

    @staticmethod
    def _wire_order(srcs: list[torch.Tensor], flags: tuple[bool, ...]) -> list[torch.Tensor]:
        if not any(flags):
            return srcs
        return [t for t, f in zip(srcs, flags) if f] + [t for t, f in zip(srcs, flags) if not f]

    def _chunks(self, start: int, end: int, device_type: str) -> list[tuple[int, int]]:
        """The payload messages covering bytes [start, end) of a buffer (none when empty)."""
        c = self.chunk_bytes if device_type == "cpu" else None
        if end <= start:
            return []
        if c is None:
            return [(start, end)]
        return [(s, min(s + c, end)) for s in range(start, end, c)]

    def _buffer(self, srcs: list[torch.Tensor], device_type: str, nbytes: int) -> torch.Tensor:
        device = srcs[0].device if srcs else torch.device(device_type)
        if device.type == "cpu":
            return self._pool.get(nbytes)
        # CUDA: the caching allocator reuses memory in stream order already
        return torch.empty(nbytes, dtype=torch.uint8, device=device)

    def _pack_and_post(self, srcs: list[torch.Tensor], part: _Part | None, buf: torch.Tensor,
                       p: int, msgs: list[tuple[Any, Any, int]], grp: Any, works: list[Any],
                       what: str) -> None:
        """Packs ``srcs`` into ``buf[p:]`` and posts one send per message, in order.

        A message is ``(start, end, tag)`` over ``buf`` or ``(tensor, None, tag)``. With one
        message holding payload bytes the pack is one call (one launch on CUDA); with several
        (a large CPU payload) each message's bytes are copied just before it is posted, so the
        copy of one chunk overlaps the send of the ones before it. Posted works are appended
        to ``works`` as they go, so a caller can tell whether anything reached the wire.
        """
        layout = part.wire_layout if part is not None else None
        n = layout.nbytes if layout is not None else 0
        with_payload = [m for m in msgs if m[1] is not None and m[0] < p + n and m[1] > p]
        progressive = len(with_payload) > 1
        if n and not progressive:
            pack(srcs, out=buf[p : p + n], layout=layout, names=part.wire_names)
        flat = []
        if progressive:  # every source checked and flattened before the first send
            for t, e, name in zip(srcs, layout.entries, part.wire_names):
                if t.dtype != e.dtype or tuple(t.shape) != e.shape:
                    raise ValueError(f"key {name!r}: tensor does not match its layout entry")
                flat.append(_byte_view(t) if e.nbytes else None)
        for start, end, tag in msgs:
            if end is None:
                works.append(transport.isend(start, self.peer_global, grp, tag, what=what))
                continue
            if progressive:
                for j, e in enumerate(layout.entries):
                    lo = max(start, p + e.offset)
                    hi = min(end, p + e.offset + e.nbytes)
                    if hi > lo:
                        buf[lo:hi].copy_(flat[j][lo - p - e.offset : hi - p - e.offset])
            works.append(transport.isend(buf[start:end], self.peer_global, grp, tag, what=what))

    # ------------------------------------------------------------------ declared (no header)

    def _check_declared(self, tensor_dict: Mapping[str, Any]) -> int:
        """Checks a dict against the declaration (naming the key); returns its token count."""
        fields = self.declared.fields
        if len(tensor_dict) != len(fields) or any(
                k != f[0] for k, f in zip(tensor_dict, fields)):
            raise ValueError(f"keys {list(tensor_dict)} do not match the declared keys "
                             f"{[k for k, _ in fields]}")
        tokens = None
        for k, spec in fields:
            v = tensor_dict[k]
            if type(spec) is tuple and len(spec) == 3 and isinstance(spec[0], torch.dtype):
                dtype, shape, dev = spec
                if not isinstance(v, torch.Tensor):
                    raise TypeError(f"key {k!r}: declared a tensor, got {type(v).__name__}")
                vshape = v.shape
                if v.dtype != dtype or v.device.type != dev or len(vshape) != len(shape):
                    raise ValueError(f"key {k!r}: {v.dtype} {tuple(vshape)} on {v.device.type} "
                                     f"does not match the declared {dtype} {shape} on {dev}")
                for i, (a, b) in enumerate(zip(vshape, shape)):
                    if b is None:
                        if tokens is None:
                            tokens = a
                        elif a != tokens:
                            raise ValueError(f"key {k!r}: dim {i} is {a} but another key has "
                                             f"{tokens} tokens")
                    elif a != b:
                        raise ValueError(f"key {k!r}: shape {tuple(vshape)} does not match the "
                                         f"declared {shape}")
            elif not (type(v) is type(spec) and v == spec):
                raise ValueError(f"key {k!r}: value {v!r} differs from the declared constant "
                                 f"{spec!r}")
        return 0 if tokens is None else tokens

    def _declared_header(self, tokens: int) -> wire.Header:
        """The header both ends derive from the declaration and the token count (memoised)."""
        header = self._declared_headers.get(tokens)
        if header is None:
            header = self._plan_declared_header(tokens)
            if len(self._declared_headers) >= 256:
                self._declared_headers.pop(next(iter(self._declared_headers)))
            self._declared_headers[tokens] = header
        return header

    def _plan_declared_header(self, tokens: int) -> wire.Header:
        fields, shapes, values = [], [], []
        for k, spec in self.declared.fields:
            if self.declared.is_tensor(spec):
                dtype, shape, dev = spec
                shape = tuple(tokens if s is None else s for s in shape)
                numel = 1
                for s_ in shape:
                    numel *= s_
                fields.append(wire.TensorField(k, dtype, len(shape), dev,
                                               self._is_sliced(k, dev, numel)))
                shapes.append(shape)
            else:
                fields.append(wire.PlainField(k))
                values.append(spec)
        schema = self._declared_schemas.get(tuple(fields))
        if schema is None:
            schema = wire.Schema(tuple(fields))
            if len(self._declared_schemas) > 64:
                self._declared_schemas.clear()
            self._declared_schemas[tuple(fields)] = schema
        parts = self._parts(schema, shapes)
        return wire.Header(schema.schema_id(), schema, tuple(shapes), tuple(values),
                           {p.device_type: p.wire_layout.nbytes for p in parts})

    def _fingerprint(self, schema: wire.Schema, tokens: int, seq: int) -> bytes:
        digest = (schema.schema_id() ^ self._declared_digest) & 0xFFFFFFFF
        return _FP.pack(_FP_MAGIC, digest, tokens & 0xFFFFFFFF, seq & 0xFFFFFFFF)

    def _post_declared(self, tokens: int | None) -> tuple[dict, list[Handle], list]:
        if tokens is None or tokens < 0:
            raise ValueError("a declared channel's irecv needs num_tokens (the leading size)")
        self._check_broken()
        header = self._declared_header(tokens)
        seq = next(self._recv_seq)
        want = self._fingerprint(header.schema, tokens, seq)
        return self._post_from_header(header, seq, fingerprint=want)

    def _check_fingerprint(self, got: bytes, want: bytes, seq: int) -> None:
        if got != want:
            g = _FP.unpack(got)
            w = _FP.unpack(want)
            raise ValueError(
                f"declared layout mismatch on receive #{seq} from rank {self.peer_global}: the "
                f"payload carries (magic {g[0]:#x}, schema {g[1]:#x}, tokens {g[2]}, seq {g[3]}) "
                f"but this side expected (magic {w[0]:#x}, schema {w[1]:#x}, tokens {w[2]}, "
                f"seq {w[3]}); both ends must declare the same schema and token count")

    def _run_pending_checks(self, block: bool) -> None:
        keep = []
        for host, ev, want, seq in self._pending_checks:
            if block:
                ev.synchronize()
            if ev.query():
                self._check_fingerprint(host.numpy().tobytes(), want, seq)
            else:
                keep.append((host, ev, want, seq))
        self._pending_checks = keep

    def verify(self) -> None:
        """Blocks until every declared CUDA payload's fingerprint has been checked."""
        self._run_pending_checks(block=True)

    # ------------------------------------------------------------------ receive

    def irecv(self, num_tokens: int | None = None) -> PendingRecv:
        """Posts the next receive and returns at once; ``wait()`` on the result gives the dict."""
        if self._pending_checks:
            self._run_pending_checks(block=False)
        if self.declared is not None:
            posted = self._post_declared(num_tokens)
            return PendingRecv(lambda _t: posted)
        if self._executor is None:
            self._executor = concurrent.futures.ThreadPoolExecutor(
                max_workers=1, thread_name_prefix=f"pipepack-recv-{self.peer_global}")
        return PendingRecv(lambda _t: None, self._executor.submit(self.irecv_posted))

    def recv(self, num_tokens: int | None = None) -> dict:
        return self.irecv(num_tokens).wait()

    def irecv_posted(self) -> tuple[dict, list[Handle], list[Callable[[], None]]]:
        """Receives the header (blocking) and posts the payload receives: vLLM's async shape."""
        if self.declared is not None:
            raise RuntimeError("irecv_posted is the header path; this channel is declared")
        self._check_broken()
        seq = next(self._recv_seq)
        try:
            header, head = self._recv_header(seq)
            return self._post_from_header(header, seq, head=head)
        except BaseException as e:
            self._recv_broken = e
            raise

    def _check_broken(self) -> None:
        """A failed receive leaves the rest of its hop on the wire: every later one must fail."""
        if self._recv_broken is not None:
            raise RuntimeError(f"the channel from rank {self.peer_global} is out of step since a "
                               f"receive failed ({self._recv_broken!r}); recreate the process "
                               "group to recover") from self._recv_broken

    def _recv_header(self, seq: int) -> tuple[wire.Header, torch.Tensor]:
        """Receives the head message (header slot + inline CPU payload) and any overflow."""
        where = f"receive #{seq} from rank {self.peer_global}"
        S = self.slot_bytes
        # room for the whole CPU payload of a hop like the last one, so the part that did not
        # fit in the head message lands right behind it: no copy in steady state
        head = self._recv_pool.get(S + max(self._recv_head, self._recv_last))
        self._wait(transport.irecv(head[: S + self._recv_head], self.peer_global,
                                   self.cpu_group, transport.HEADER_TAG,
                                   what=f"header of {where}"), f"header of {where}")
        raw = head[:S].numpy().tobytes()
        header, ov_len = wire.decode_header(raw, slot_bytes=S, limits=self.limits,
                                            allow_pickle=self.allow_pickle,
                                            schema_cache=self._recv_schemas)
        if header is None:
            ov = torch.empty(ov_len, dtype=torch.uint8)
            self._wait(transport.irecv(ov, self.peer_global, self.cpu_group,
                                       transport.HEADER_TAG, what=f"header overflow of {where}"),
                       f"header overflow of {where}")
            header, _ = wire.decode_header(raw, ov.numpy().tobytes(), slot_bytes=S,
                                           limits=self.limits, allow_pickle=self.allow_pickle,
                                           schema_cache=self._recv_schemas)
        return header, head

    def _wait(self, work: Any, what: str) -> None:
        Handle([work], what=what, timeout=self.timeout).wait()

    def _post_from_header(self, header: wire.Header, seq: int, *, fingerprint: bytes = b"",
                          head: torch.Tensor | None = None
                          ) -> tuple[dict, list[Handle], list[Callable[[], None]]]:
        """Checks the header against its own shapes, allocates and posts the payload receives.

        ``head`` is the received head message (header path): the CPU payload's first bytes
        are in it. ``fingerprint`` (declared path) leads each payload and is checked on wait.
        """
        schema = header.schema
        for f in schema.tensor_fields():
            if f.sliced and (self._tp_world <= 1 or f.device_type != self._tp_device):
                raise ValueError(f"key {f.key!r}: the sender sliced it for an all-gather but this "
                                 "receiver has no matching all_gather_group")
        for f, shape in zip(schema.tensor_fields(), header.shapes):
            span = f.dtype.itemsize
            for d in shape:
                span *= max(d, 1)
            if span > self.limits.max_payload_bytes:  # also bounds strides of empty tensors
                raise ValueError(f"receive #{seq} from rank {self.peer_global}: key {f.key!r} "
                                 f"has shape {shape}, out of range for max_payload_bytes="
                                 f"{self.limits.max_payload_bytes}")
        parts = self._parts(schema, header.shapes)
        announced = dict(header.payload_nbytes)
        for p in parts:
            n = announced.pop(p.device_type, None)
            if n != p.wire_layout.nbytes:
                raise ValueError(f"receive #{seq} from rank {self.peer_global}: the header "
                                 f"announces {n} bytes for the {p.device_type} payload, its "
                                 f"shapes need {p.wire_layout.nbytes}")
            if n > self.limits.max_payload_bytes:
                raise ValueError(f"{p.device_type} payload of {n} bytes exceeds the limit "
                                 f"{self.limits.max_payload_bytes}")
        if announced:
            raise ValueError(f"header announces payloads {sorted(announced)} with no tensors")
        if head is not None:
            cpu_bytes = next((p.wire_layout.nbytes for p in parts if p.device_type == "cpu"), 0)
            h, self._recv_head = self._recv_head, self._next_head(cpu_bytes)
            self._recv_last = -(-cpu_bytes // 16) * 16
        views: dict[str, torch.Tensor] = {}
        handles: list[Handle] = []
        post: list[Callable[[], None]] = []
        out: dict[str, Any] = {}
        prefixes = []
        fp = len(fingerprint)
        for p in parts:
            n = p.wire_layout.nbytes
            if head is not None and p.device_type == "cpu":
                S = self.slot_bytes
                if n <= h:  # all of it came inline: views of the head buffer
                    buf = head[S : S + n]
                else:
                    if S + n <= head.numel():  # the rest lands behind the head
                        buf = head[S : S + n]
                    else:  # a larger hop than the last: one copy of the inline part
                        buf = self._recv_pool.get(n)
                        buf[:h].copy_(head[S : S + h])
                    works = [transport.irecv(buf[s - S : e - S], self.peer_global,
                                             self.cpu_group, transport.PAYLOAD_TAG,
                                             what=f"payload of receive #{seq} from rank "
                                                  f"{self.peer_global}")
                             for s, e in self._chunks(S + h, S + n, "cpu")]
                    handles.append(Handle(works, [buf], timeout=self.timeout,
                                          what=f"payload of receive #{seq} from rank "
                                               f"{self.peer_global}"))
            else:
                buf, hd = self._post_payload_recv(p.device_type, fp + n, seq)
                if hd is not None:
                    handles.append(hd)
                if fp:
                    prefixes.append(buf[:fp])
                    buf = buf[fp:]
            views.update(zip(p.wire_names, unpack(buf, p.wire_layout)))
            if any(p.sliced):
                post.append(self._reassembler(out, p, buf))
        if fp:
            post.insert(0, lambda: self._verify(prefixes, fingerprint, seq))
        values = iter(header.values)
        for f in schema.fields:
            out[f.key] = views[f.key] if isinstance(f, wire.TensorField) else next(values)
        return out, handles, post

    def _post_payload_recv(self, device_type: str, nbytes: int, seq: int
                           ) -> tuple[torch.Tensor, Handle | None]:
        if device_type == "cpu":
            buf = self._recv_pool.get(nbytes)
            grp = self.cpu_group
        else:
            dev = torch.device(device_type, torch.cuda.current_device()) \
                if device_type == "cuda" else torch.device(device_type)
            buf = torch.empty(nbytes, dtype=torch.uint8, device=dev)
            grp = self.group
        works = [transport.irecv(buf[s:e], self.peer_global, grp, transport.PAYLOAD_TAG,
                                 what=f"payload of receive #{seq} from rank {self.peer_global}")
                 for s, e in self._chunks(0, nbytes, device_type)]
        if not works:
            return buf, None
        return buf, Handle(works, [buf], timeout=self.timeout,
                           what=f"payload of receive #{seq} from rank {self.peer_global}")

    def _verify(self, prefixes: list[torch.Tensor], want: bytes, seq: int) -> None:
        """Checks each payload's fingerprint: at once for CPU, deferred (no sync) for CUDA."""
        for fp in prefixes:
            if fp.device.type == "cpu":
                self._check_fingerprint(fp.numpy().tobytes(), want, seq)
            else:
                host = torch.empty(len(want), dtype=torch.uint8, pin_memory=True)
                host.copy_(fp, non_blocking=True)
                ev = torch.cuda.Event()
                ev.record()
                self._pending_checks.append((host, ev, want, seq))
        self._run_pending_checks(block=False)

    def _reassembler(self, out: dict, p: _Part, part_buf: torch.Tensor) -> Callable[[], None]:
        def run() -> None:
            W = self._tp_world
            n = p.layout.sliced_nbytes(W, p.sliced)
            gathered = torch.empty((W, n), dtype=torch.uint8, device=part_buf.device)
            transport.all_gather_into(gathered, part_buf[:n], self.all_gather_group)
            full = reassemble(gathered, p.layout, sliced=p.sliced, part=part_buf)
            out.update(zip(p.keys, full))
        return run

    def close(self) -> None:
        """Stops the progress thread (pending receives finish first)."""
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None
