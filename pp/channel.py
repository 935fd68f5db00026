"""A tensor-dict channel to one peer: per-object options over the process's one link to it.

Sender: validate and encode everything first (bad input fails before a byte is sent), pack
each device type's tensors into one buffer (one kernel launch on CUDA), post the hop's messages
back to back and hand them to the reaper, so ``isend`` never waits for the peer and the caller
may overwrite its tensors once it returns. Receiver: ``irecv()`` posts the head receive at once
and returns; ``wait()`` reads the head, posts the payload receives and hands out zero-copy
views of one buffer per device type. Every hop describes itself (:mod:`pipepack.pp.wire.hop`);
a :class:`Declared` schema is checked on both ends, never assumed.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.distributed as dist

from pipepack.kernels import Entry, Layout, unpack_add_rmsnorm, unpack_into

from . import codec, transport, wirepack
from .declared import Declared
from .link import (
    DEFAULT_CHUNK_BYTES,
    DEFAULT_HEAD_BYTES,
    TRANSPORTS,
    Link,
    RecvOptions,
    get_link,
)
from .transport import Handle
from .wire import hop
from .wire.limits import DEFAULT_LIMITS, Limits, WireError
from .wire.options import Wire

__all__ = [
    "TensorDictChannel",
    "Declared",
    "PendingRecv",
    "Wire",
    "DEFAULT_SLOT_BYTES",
    "DEFAULT_CHUNK_BYTES",
    "tp_of",
    "resolve_groups",
]

DEFAULT_SLOT_BYTES = DEFAULT_HEAD_BYTES


def resolve_groups(
    group: dist.ProcessGroup | None, cpu_group: dist.ProcessGroup | None
) -> tuple[dist.ProcessGroup, dist.ProcessGroup]:
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            "torch.distributed is not initialised: pipepack has no peer to send "
            "to or receive from (call init_process_group first)"
        )
    group = dist.group.WORLD if group is None else group
    if cpu_group is None:
        if not transport.is_gloo(group):
            raise ValueError(
                "cpu_group (a gloo group) is required when group is not gloo: it "
                "carries the header and CPU tensors"
            )
        cpu_group = group
    return group, cpu_group


_TP: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def tp_of(all_gather_group: dist.ProcessGroup | None) -> codec.TP | None:
    """This rank's view of an all-gather group (kept per group: asked on every call)."""
    if all_gather_group is None:
        return None
    hit = _TP.get(all_gather_group)
    if hit is not None:
        return hit[0]
    w = dist.get_world_size(all_gather_group)
    tp = None
    if w > 1:
        dev = "cpu" if transport.is_gloo(all_gather_group) else "cuda"
        tp = codec.TP(all_gather_group, w, dist.get_rank(all_gather_group), dev)
    _TP[all_gather_group] = (tp,)
    return tp


class PendingRecv:
    """A posted receive. ``wait()`` returns the tensor dict.

    The dict's tensors are zero-copy views of one buffer per device type; the buffer is used
    again only once nothing (view, storage object, handle) refers to it. Keys the sender sent
    folded or as fp8 (``Wire``) come back as the sender's tensors: see :meth:`wait`.
    """

    def __init__(self, link: Link, inc: Any, wire: wirepack.WireRecv | None = None) -> None:
        self._link = link
        self._inc = inc
        self._wire = wire
        self._raw: dict | None = None
        self._result: dict | None = None
        self._handles: list[Handle] | None = None
        self._post: list[Callable[[], None]] | None = None

    @property
    def seq(self) -> int:
        return self._inc.seq

    @property
    def wire(self) -> Wire:
        """The wire options the hop was sent with (known once it arrived; plain before)."""
        return Wire.of_hop(self._wired)

    @property
    def _wired(self) -> tuple:
        return self._wire.wired if self._wire is not None else ()

    def posted(
        self, timeout: float | None = None
    ) -> tuple[dict, list[Handle], list[Callable[[], None]]]:
        """Reads the head and posts the payload receives: vLLM's ``(dict, handles, post)``.

        Keys with a wire code are restored by the last postprocess call."""
        d, handles, post = self._link.advance(self._inc, timeout)
        wired = self._wired
        if wired:
            post = [*post, lambda d=d, wired=wired: wirepack.restore(d, wired)]
        return d, handles, post

    def _wait_raw(self, timeout: float | None) -> dict:
        """The hop as it travelled: keys with a wire code hold the bytes that travelled."""
        if self._raw is None:
            d, handles, post = self._link.advance(self._inc, timeout)
            for h in handles:
                h.wait(timeout)
            if self._post is None:
                self._post = list(post)
            while self._post:
                self._post[0]()
                self._post.pop(0)
            self._raw = d
        return self._raw

    def wait(self, timeout: float | None = None) -> dict:
        """The received dict. A key sent as fp8 comes back dequantised to its own dtype (a
        fresh tensor); a fold's hidden key holds ``hidden + residual`` and its residual key a
        tensor of ``-0.0``, so ``hidden + residual`` on this side is that sum bit for bit."""
        if self._result is None:
            d = self._wait_raw(timeout)
            if self._wired:
                d = dict(d)
                wirepack.restore(d, self._wired)
            self._result = d
        return self._result

    def wait_into(self, outs: Mapping[str, torch.Tensor], timeout: float | None = None) -> dict:
        """Waits, then copies the tensors named in ``outs`` into those caller-owned buffers.

        One :func:`pipepack.kernels.unpack_into` per receive buffer, straight from it: static
        CUDA-graph inputs take the payload with one copy. A destination may be larger in dim 0
        (the hop lands in ``outs[k][:n]``). The returned dict holds ``outs``' tensors (or their
        ``[:n]`` views) for those keys. A key sent as fp8 is dequantised straight into its
        destination; a folded residual's destination rows are set to ``-0.0``.
        """
        if self._result is not None:
            d, wired = dict(self._result), {}
        else:
            raw = self._wait_raw(timeout)
            wired = dict(self._wired)
            d = dict(raw)
            wirepack.restore(d, self._wired, skip=frozenset(k for k in outs if k in wired))
        groups: dict[tuple[torch.device, int], list[str]] = {}
        for k in outs:
            t = d.get(k)
            if not isinstance(t, torch.Tensor):
                raise KeyError(f"key {k!r}: not a tensor of the received dict")
            if k in wired and wired[k].wire != hop.WIRE_FOLD_SUM:
                continue  # a fold sum travels in its own dtype: copied like any tensor
            groups.setdefault((t.device, t.untyped_storage().data_ptr()), []).append(k)
        for (device, _), keys in groups.items():
            storage = d[keys[0]].untyped_storage()
            buf = torch.empty(0, dtype=torch.uint8, device=device).set_(storage)
            entries = tuple(
                Entry(
                    d[k].dtype,
                    tuple(d[k].shape),
                    d[k].storage_offset() * d[k].element_size(),
                    d[k].numel() * d[k].element_size(),
                )
                for k in keys
            )
            unpack_into(buf, Layout(entries, buf.numel()), [outs[k] for k in keys], names=keys)
        for k in outs:
            v = outs[k]
            desc = wired.get(k)
            if desc is None or desc.wire == hop.WIRE_FOLD_SUM:
                t = d[k]
                d[k] = v if tuple(v.shape) == tuple(t.shape) else v[: t.shape[0]]
                continue
            T, H = desc.shape
            if (
                not isinstance(v, torch.Tensor)
                or v.dtype != desc.dtype
                or v.dim() != 2
                or v.shape[1] != H
                or v.shape[0] < T
                or v.device != d[k].device
            ):
                raise ValueError(
                    f"key {k!r}: destination {getattr(v, 'dtype', type(v).__name__)} "
                    f"{tuple(getattr(v, 'shape', ()))} cannot hold the hop's {desc.dtype} "
                    f"[{T}, {H}] on {d[k].device}"
                )
            if desc.wire in wirepack.FP8_CODES:
                d[k] = wirepack.dequantize(d[k], desc, out=v)
            else:  # the folded residual
                d[k] = wirepack.fill_neg_zero(v[:T])
        self._result = d
        return d

    def wait_add_rmsnorm(
        self,
        weight: torch.Tensor,
        eps: float,
        *,
        order: str = "vllm",
        hidden: str = "hidden_states",
        residual: str = "residual",
        out: torch.Tensor | None = None,
        residual_out: torch.Tensor | None = None,
        timeout: float | None = None,
    ) -> dict:
        """Waits, then runs the next stage's first op on the hop's own bytes.

        ``residual = hidden + residual; hidden = rmsnorm(residual) * weight`` in one
        :func:`pipepack.kernels.unpack_add_rmsnorm` launch that reads both tensors straight
        from the receive buffer (``order`` "vllm" or "flashinfer", as that op documents). The
        returned dict holds the normalised output under ``hidden`` and the new residual under
        ``residual``: what the first decoder layer's input norm would have produced, so that
        layer must skip its own. ``out`` / ``residual_out`` may be caller-owned (e.g. CUDA-graph
        static) buffers, larger in dim 0. TP-sliced hops are reassembled first.

        A hop sent with ``fold=(hidden, residual)`` carries the sum already: the op skips the
        add and the new residual is the sum the sender computed, the same bits as the unfused
        add in either order. fp8 keys are dequantised inside the same launch.
        """
        if self._result is not None:
            raw, wired = self._result, {}
        else:
            raw, wired = self._wait_raw(timeout), dict(self._wired)
        h, r = raw.get(hidden), raw.get(residual)
        hd, rd = wired.get(hidden), wired.get(residual)
        hc = hd.wire if hd is not None else 0
        rc = rd.wire if rd is not None else 0
        folded = [k for k, t in wired.items() if t.wire == hop.WIRE_FOLDED]
        if hc == hop.WIRE_FOLDED or rc in wirepack.FOLD_SUMS:
            raise ValueError(
                f"the hop was sent with {Wire.of_hop(self._wired).describe()}: pass its fold's "
                f"keys as hidden= and residual=, not {hidden!r} and {residual!r}"
            )
        fold = hc in wirepack.FOLD_SUMS
        if fold and rc != hop.WIRE_FOLDED:
            raise ValueError(
                f"key {hidden!r} carries the fold sum with key {folded[0]!r}, not {residual!r}"
            )
        for k, t, desc in ((hidden, h, hd), (residual, r, rd)):
            if not isinstance(t, torch.Tensor) or (desc is None and t.dim() != 2):
                raise KeyError(f"key {k!r}: wait_add_rmsnorm needs a [T, H] tensor there")
            if desc is not None and desc.dtype != getattr(weight, "dtype", None):
                raise TypeError(
                    f"key {k!r} is {desc.dtype} but the weight is "
                    f"{getattr(weight, 'dtype', type(weight).__name__)}: the op runs in one "
                    "model dtype"
                )

        def operand(t, code, desc):
            if code in wirepack.FP8_CODES:
                return list(wirepack.fp8_parts(t, desc.shape))
            return [t]

        # read in place from the receive buffer (copied together first if they lie apart)
        ops = [operand(h, hc, hd), None if fold else operand(r, rc, rd)]
        buf, layout, (hi, ri) = wirepack.norm_operands(ops)
        o, ro = unpack_add_rmsnorm(
            buf,
            layout,
            hi,
            ri,
            weight,
            eps,
            order=order,
            out=out,
            residual_out=residual_out,
        )
        d = dict(raw) if wired else raw
        if wired:
            wirepack.restore(d, self._wired, skip=frozenset((hidden, residual)))
        d[hidden], d[residual] = o, ro
        self._result = d
        return d

    def is_completed(self) -> bool:
        if self._result is not None or self._raw is not None:
            return True
        inc = self._inc
        if not inc.advanced:
            return False
        if inc.error is not None:
            return True
        return all(h.is_completed() for h in inc.result[1])


class TensorDictChannel:
    """Sends and receives tensor dicts to and from one peer, in order (FIFO), many in flight.

    ``peer`` is a rank within ``group`` (default: the world). ``cpu_group`` (gloo) carries the
    head messages and CPU tensors; it defaults to ``group`` when that is a gloo group. CUDA
    tensors go over ``group``. With ``all_gather_group`` of size W > 1, every top-level tensor
    the group can carry whose numel divides by W (and that ``all_gather_tensors`` does not map
    to False) travels as its rank slice ``t.reshape(W, -1)[rank]`` and is rebuilt on the
    receiver with one all-gather and one reassembly launch.

    Any number of channel objects (and the functional API) may talk to the same peer from any
    number of threads: they share the process's one link to it. ``transport``: "auto" (the
    default unless the ``PIPEPACK_TRANSPORT`` environment variable says otherwise) switches the
    link to a shared-memory ring once setup shows both ends on one host, "dist" keeps
    torch.distributed,
    "shm" requires the ring (setup then waits for the peer, and raises when it cannot work).
    CUDA payloads always travel on ``group``. ``slot_bytes`` is the capacity
    of this end's head receives (the peer learns it once at setup: a hop whose header and CPU
    payload fit is one message); ``chunk_bytes`` the size of the CPU payload messages of larger
    hops (announced in each hop); neither needs to match the peer. ``timeout`` bounds every wait
    (default: the process group's timeout).

    ``wire`` (:class:`Wire`, sends): keys to send folded (``fold=(hidden, residual)``: their sum,
    half the bytes, exact) or as fp8 rows (``fp8=(key, ...)``: lossy), computed in the pack.
    ``accept_wire`` (:class:`Wire`, receives): what this end takes; a hop using anything else is
    refused naming the key and both sides' options (the link stays in step). Neither is on by
    default. With an ``all_gather_group`` a fold's sum is TP-sliced like any key; fp8 keys and
    the folded residual always travel whole.
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
        slot_bytes: int | None = None,
        chunk_bytes: int | None = DEFAULT_CHUNK_BYTES,
        allow_pickle: bool = False,
        limits: Limits = DEFAULT_LIMITS,
        timeout: float | None = None,
        transport: str | None = None,
        wire: Wire | None = None,
        accept_wire: Wire | None = None,
    ) -> None:
        for name, w in (("wire", wire), ("accept_wire", accept_wire)):
            if w is not None and not isinstance(w, Wire):
                raise TypeError(f"{name} must be a pipepack.pp.Wire, got {type(w).__name__}")
        if transport == "cuda_ipc":
            raise NotImplementedError(
                "transport='cuda_ipc' (device memory shared between two "
                "processes) is not built yet; 'auto' uses the same-host "
                "ring for CPU payloads and the device group for CUDA ones"
            )
        if transport is not None and transport not in TRANSPORTS:
            raise ValueError(f"transport must be one of {TRANSPORTS}, got {transport!r}")
        self.group, self.cpu_group = resolve_groups(group, cpu_group)
        world, me = dist.get_world_size(self.group), dist.get_rank(self.group)
        if type(peer) is not int or not 0 <= peer < world or peer == me:
            raise ValueError(
                f"peer (dst/src) {peer!r} is not another rank of the group: it has "
                f"{world} ranks and this is rank {me}"
            )
        if chunk_bytes is not None and (chunk_bytes <= 0 or chunk_bytes % 16):
            raise ValueError(f"chunk_bytes must be a positive multiple of 16, got {chunk_bytes}")
        self.peer = peer
        self.link = get_link(
            self.group,
            self.cpu_group,
            peer,
            head_bytes=slot_bytes,
            timeout=timeout,
            transport=transport,
        )
        self.peer_global = self.link.peer_global
        self.all_gather_group = all_gather_group
        self.all_gather_tensors = dict(all_gather_tensors or {})
        self.declared = declared
        self.chunk_bytes = chunk_bytes
        self.allow_pickle = allow_pickle
        self.limits = limits
        self.timeout = timeout
        self._tp = tp_of(all_gather_group)
        self.wire = wire if wire else None
        self.accept_wire = accept_wire if accept_wire else None
        self._wire_send = wirepack.WireSend(wire) if wire else None

    # ------------------------------------------------------------------ send

    def _encode(self, tensor_dict: Mapping[str, Any]) -> codec.Encoded:
        if self.declared is not None:
            if not isinstance(tensor_dict, Mapping):
                raise TypeError(
                    f"expected a dict of tensors and plain values, got {type(tensor_dict).__name__}"
                )
            self.declared.check(tensor_dict)
        return codec.encode(
            tensor_dict,
            allow_pickle=self.allow_pickle,
            limits=self.limits,
            tp=self._tp,
            all_gather_tensors=self.all_gather_tensors,
            wire=None if self._wire_send is None else self._wire_send.prepare(tensor_dict),
        )

    def isend(self, tensor_dict: Mapping[str, Any]) -> list[Handle]:
        """Posts the hop and returns at once; the handle completes once the peer took it."""
        enc = self._encode(tensor_dict)
        return [self.link.send(enc, chunk_bytes=self.chunk_bytes, timeout=self.timeout)]

    def send(self, tensor_dict: Mapping[str, Any], timeout: float | None = None) -> None:
        """Blocking send: returns once the transport has taken the bytes; raises on failure."""
        enc = self._encode(tensor_dict)
        self.link.send_blocking(
            enc, chunk_bytes=self.chunk_bytes, timeout=self.timeout if timeout is None else timeout
        )

    @property
    def transport(self) -> str:
        """What carries this peer's hops now: "dist", "shm", or "pending" (before setup)."""
        return self.link.send_mode if self.link.send_mode != "pending" else self.link.recv_mode

    def drain(self, timeout: float | None = None) -> None:
        """Waits for every send posted to this peer so far; raises a failure."""
        self.link.drain(timeout)

    # ------------------------------------------------------------------ receive

    def _options(self, num_tokens: int | None) -> RecvOptions:
        check = None
        if self.declared is not None:
            declared = self.declared

            def check(items: list, declared=declared, num_tokens=num_tokens) -> None:
                tokens = declared.check_items(items, side="the peer's hop: ")
                if num_tokens is not None and tokens != num_tokens:
                    raise WireError(
                        f"the peer's hop has {tokens} tokens, this receive was "
                        f"posted for {num_tokens}"
                    )

        return RecvOptions(
            allow_pickle=self.allow_pickle,
            limits=self.limits,
            tp=self._tp,
            check=check,
            timeout=self.timeout,
            accept_wire=wirepack.WireRecv(self.accept_wire or Wire()),
        )

    def irecv(self, num_tokens: int | None = None) -> PendingRecv:
        """Posts the next receive and returns at once; ``wait()`` on the result gives the dict.

        ``num_tokens`` (declared channels): the leading size this end expects; a hop with
        another count raises, naming both.
        """
        if num_tokens is not None and (type(num_tokens) is not int or num_tokens < 0):
            raise ValueError(f"num_tokens must be a non-negative int, got {num_tokens!r}")
        opts = self._options(num_tokens)
        return PendingRecv(self.link, self.link.post_async(opts), opts.accept_wire)

    def recv(self, num_tokens: int | None = None, timeout: float | None = None) -> dict:
        """Receives the next hop on this thread (no hand-off to the link's progress thread:
        the caller is waiting anyway)."""
        if num_tokens is not None and (type(num_tokens) is not int or num_tokens < 0):
            raise ValueError(f"num_tokens must be a non-negative int, got {num_tokens!r}")
        opts = self._options(num_tokens)
        return PendingRecv(self.link, self.link.post(opts), opts.accept_wire).wait(timeout)

    def irecv_posted(self) -> tuple[dict, list[Handle], list[Callable[[], None]]]:
        """Reads the next head (blocking) and posts the payload receives: vLLM's async shape."""
        opts = self._options(None)
        return PendingRecv(self.link, self.link.post(opts), opts.accept_wire).posted()

    def close(self) -> None:
        """Nothing to release: the link is shared and lives as long as its process group."""
