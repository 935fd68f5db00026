"""A channel's wire options in torch: the sender's fold / fp8 pack, the receiver's restore.

Sender (:class:`WireSend`): the keys a :class:`~pipepack.pp.wire.options.Wire` names go through
one :func:`pipepack.kernels.pack_wire` call (the fold's add and the fp8 quantiser run in that
pack, one launch on CUDA) into a buffer of the channel's own; :func:`pipepack.pp.codec.encode`
then takes, per key, its wire code and the view of that buffer that travels, and the link packs
the hop as always.

Receiver (:class:`WireRecv`): the decoder hands it the hop's wire codes before it hands out
anything (it refuses what its ``accept`` does not take, and the link drains the refused hop);
the keys arrive as the bytes that travelled, and :func:`restore` turns them back into the
sender's tensors: fp8 rows dequantised to their dtype (:func:`pipepack.kernels.dequantize_fp8`),
the folded residual as a tensor of ``-0.0`` (``x + -0.0`` is ``x`` for every ``x``, so a
receiver that adds the pair itself gets the sum bit for bit). ``PendingRecv.wait_add_rmsnorm``
instead feeds the travelled bytes straight to :func:`pipepack.kernels.unpack_add_rmsnorm`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from pipepack.kernels import (
    Entry,
    Layout,
    dequantize_fp8,
    pack,
    pack_wire,
    plan_layout,
    plan_wire,
)

from .pool import BufferPool
from .wire import hop
from .wire.hop import align16
from .wire.options import Wire

__all__ = ["WireSend", "WireRecv", "restore", "fp8_parts", "norm_operands", "MODEL_DTYPES"]

MODEL_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_FP8 = torch.float8_e4m3fn
FP8_CODES = (hop.WIRE_FP8, hop.WIRE_FOLD_SUM_FP8)
FOLD_SUMS = (hop.WIRE_FOLD_SUM, hop.WIRE_FOLD_SUM_FP8)


class WireSend:
    """A sender's :class:`Wire`, applied to each dict it sends."""

    def __init__(self, wire: Wire) -> None:
        if not isinstance(wire, Wire):
            raise TypeError(f"wire must be a pipepack.pp.Wire, got {type(wire).__name__}")
        wire.check_sender()
        self.wire = wire
        keys = list(wire.fold or ())
        keys += [k for k in wire.fp8 if k not in keys]
        self.keys = tuple(keys)
        self.fold = (0, 1) if wire.fold is not None else None
        self.fp8 = tuple(self.keys.index(k) for k in wire.fp8)
        self.codes = wire.codes()
        # host buffers the wire bytes are packed into; one is busy until the link packed it
        self.pool = BufferPool(max_ratio=float("inf"), cap_factor=1)

    def _tensors(self, d: Mapping[str, Any]) -> list[torch.Tensor]:
        if not isinstance(d, Mapping):
            raise TypeError(f"expected a dict of tensors and plain values, got {type(d).__name__}")
        out = []
        for k in self.keys:
            if k not in d:
                raise ValueError(
                    f"key {k!r}: named in this channel's {self.wire.describe()} but not in "
                    f"the dict (keys {list(d)})"
                )
            t = d[k]
            if not isinstance(t, torch.Tensor):
                raise TypeError(
                    f"key {k!r}: {self.wire.describe()} needs a tensor there, got "
                    f"{type(t).__name__}"
                )
            if t.layout != torch.strided or t.is_nested:
                raise TypeError(f"key {k!r}: {t.layout} tensors cannot be folded or quantised")
            if t.dim() != 2 or t.dtype not in MODEL_DTYPES:
                raise ValueError(
                    f"key {k!r}: {t.dtype} {tuple(t.shape)}; folding and fp8 take [T, H] "
                    "bf16, fp16 or fp32 tensors"
                )
            if t.device.type == "meta":
                raise ValueError(f"key {k!r}: a meta tensor has no values to fold or quantise")
            out.append(t)
        for k, t in zip(self.keys[1:], out[1:]):
            if t.device != out[0].device:
                raise ValueError(
                    f"key {k!r} is on {t.device} but key {self.keys[0]!r} on {out[0].device}: "
                    "the keys of a channel's wire options share one device"
                )
        if self.fold is not None:
            h, r = out[0], out[1]
            if h.dtype != r.dtype or h.shape != r.shape:
                raise ValueError(
                    f"fold {self.wire.fold!r}: {h.dtype} {tuple(h.shape)} and {r.dtype} "
                    f"{tuple(r.shape)} differ in dtype or shape"
                )
        return out

    def prepare(self, d: Mapping[str, Any]) -> dict[str, tuple[int, torch.Tensor]]:
        """``{key: (wire code, the tensor whose bytes travel)}`` for :func:`codec.encode`."""
        tensors = self._tensors(d)
        plan = plan_wire([(t.dtype, t.shape) for t in tensors], fold=self.fold, fp8=self.fp8)
        n = plan.layout.nbytes
        device = tensors[0].device
        if device.type == "cpu":
            base = self.pool.get(n)
        else:
            base = torch.empty(n, dtype=torch.uint8, device=device)
        buf, wl = pack_wire(tensors, fold=self.fold, fp8=self.fp8, out=base, names=self.keys)
        out: dict[str, tuple[int, torch.Tensor]] = {}
        entries = wl.layout.entries
        for i, k in enumerate(self.keys):
            code = self.codes[k]
            t = tensors[i]
            e = wl.entries[i]
            if e is None:  # the folded residual: nothing travels
                out[k] = (code, torch.empty(0, dtype=t.dtype, device=device))
            elif wl.fp8[i]:
                c, s = entries[e], entries[e + 1]
                if s.offset > c.offset + c.nbytes:  # padding travels: zero, not stale bytes
                    buf[c.offset + c.nbytes : s.offset].zero_()
                out[k] = (code, buf[c.offset : s.offset + s.nbytes])
            else:  # the fold sum, in the dtype and shape of the hidden key
                s = entries[e]
                out[k] = (code, buf[s.offset : s.offset + s.nbytes].view(t.dtype).view(t.shape))
        return out


class WireRecv:
    """One receive's wire options: checked by the decoder, then kept for :func:`restore`."""

    __slots__ = ("accept", "wired")

    def __init__(self, accept: Wire) -> None:
        self.accept = accept
        self.wired: tuple[tuple[str, hop.TensorDesc], ...] = ()

    def __call__(self, wired: tuple[tuple[str, hop.TensorDesc], ...]) -> None:
        self.accept.check(wired)
        self.wired = wired


def fp8_parts(blob: torch.Tensor, shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``[T, H]`` float8_e4m3fn codes and ``[T]`` fp32 row scales of an fp8 key's bytes."""
    T, H = shape
    if blob.data_ptr() % 16:  # never seen (payload entries are 16-byte aligned); stay safe
        blob = blob.clone()
    codes = blob[: T * H].view(_FP8).view(T, H)
    at = align16(T * H)
    scales = blob[at : at + 4 * T].view(torch.float32)
    return codes, scales


def _fp8_layout(blob: torch.Tensor, shape: tuple[int, ...]) -> tuple[torch.Tensor, Layout]:
    T, H = shape
    if blob.data_ptr() % 16:
        blob = blob.clone()
    at = align16(T * H)
    entries = (Entry(_FP8, (T, H), 0, T * H), Entry(torch.float32, (T,), at, 4 * T))
    return blob, Layout(entries, blob.numel())


def dequantize(
    blob: torch.Tensor, desc: hop.TensorDesc, out: torch.Tensor | None = None
) -> torch.Tensor:
    """An fp8 key's bytes back in its own dtype (into ``out``'s first rows when given)."""
    buf, layout = _fp8_layout(blob, desc.shape)
    return dequantize_fp8(buf, layout, 0, desc.dtype, out=out)


_SIGN = {2: (torch.int16, -(1 << 15)), 4: (torch.int32, -(1 << 31))}


def fill_neg_zero(t: torch.Tensor) -> torch.Tensor:
    """Sets every element of ``t`` (bf16 / fp16 / fp32) to ``-0.0``; on CPU in this thread (a
    torch fill of a large tensor goes to its intra-op pool)."""
    if t.device.type != "cpu":
        return t.fill_(-0.0)
    idt, bits = _SIGN[t.element_size()]
    if t.numel():
        t.view(idt).numpy().fill(bits)
    return t


def restored(raw: torch.Tensor, desc: hop.TensorDesc) -> torch.Tensor:
    """What the sender's tensor of a key with a wire code was (fp8 keys: dequantised)."""
    if desc.wire in FP8_CODES:
        return dequantize(raw, desc)
    if desc.wire == hop.WIRE_FOLDED:
        return fill_neg_zero(torch.empty(desc.shape, dtype=desc.dtype, device=raw.device))
    return raw


def restore(
    d: dict[str, Any], wired: Sequence[tuple[str, hop.TensorDesc]], skip: frozenset = frozenset()
) -> None:
    """Replaces, in ``d``, each key with a wire code (but those in ``skip``) by :func:`restored`."""
    for k, desc in wired:
        if k not in skip:
            d[k] = restored(d[k], desc)


def norm_operands(
    ops: Sequence[Sequence[torch.Tensor] | None],
) -> tuple[torch.Tensor, Layout, list[int | None]]:
    """One byte buffer and layout holding every operand (a ``[T, H]`` tensor, or fp8 codes then
    their row scales), and the entry index of each: the hop's own buffer when they all lie in
    it, else a packed copy."""
    flat = [t for op in ops if op is not None for t in op]
    first: list[int | None] = []
    n = 0
    for op in ops:
        first.append(None if op is None else n)
        n += 0 if op is None else len(op)
    storages = {t.untyped_storage().data_ptr() for t in flat}
    contiguous = all(t.is_contiguous() for t in flat)
    if len(storages) == 1 and contiguous:
        storage = flat[0].untyped_storage()
        buf = torch.empty(0, dtype=torch.uint8, device=flat[0].device).set_(storage)
        entries = tuple(
            Entry(
                t.dtype,
                tuple(t.shape),
                t.storage_offset() * t.element_size(),
                t.numel() * t.element_size(),
            )
            for t in flat
        )
        layout = Layout(entries, buf.numel())
        if buf.data_ptr() % 16 == 0 and all(e.offset % 16 == 0 for e in entries):
            return buf, layout, first
    layout = plan_layout(flat)
    return pack(flat, layout=layout), layout, first
