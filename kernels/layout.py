"""Where each tensor's bytes lie in one packed payload buffer."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = ["Entry", "Layout", "plan_layout", "SUPPORTED_DTYPES"]

# Every dtype a payload may carry. Anything else is rejected by name before any copy.
SUPPORTED_DTYPES: frozenset[torch.dtype] = frozenset(
    d
    for d in (
        torch.bool,
        torch.uint8,
        torch.int8,
        torch.int16,
        torch.int32,
        torch.int64,
        getattr(torch, "uint16", None),
        getattr(torch, "uint32", None),
        getattr(torch, "uint64", None),
        torch.float16,
        torch.bfloat16,
        torch.float32,
        torch.float64,
        torch.complex32 if hasattr(torch, "complex32") else None,
        torch.complex64,
        torch.complex128,
        getattr(torch, "float8_e4m3fn", None),
        getattr(torch, "float8_e5m2", None),
        getattr(torch, "float8_e4m3fnuz", None),
        getattr(torch, "float8_e5m2fnuz", None),
    )
    if d is not None
)


def _align_up(n: int, align: int) -> int:
    return (n + align - 1) // align * align


@dataclass(frozen=True)
class Entry:
    """One tensor of a payload: its bytes are ``buffer[offset : offset + nbytes]``."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int
    nbytes: int

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


@dataclass(frozen=True)
class Layout:
    """Offsets of every tensor in one buffer of ``nbytes`` bytes.

    Frozen and hashable, so it can key caches (segment tables, schemas) and travel as a
    declared static layout. Every offset and ``nbytes`` are multiples of ``align``.
    """

    entries: tuple[Entry, ...]
    nbytes: int
    align: int = 16

    def __hash__(self) -> int:
        # layouts key every plan cache lookup: hash the entries once, not on every call
        h = self.__dict__.get("_hash")
        if h is None:
            h = hash((self.entries, self.nbytes, self.align))
            object.__setattr__(self, "_hash", h)
        return h

    def __len__(self) -> int:
        return len(self.entries)

    @classmethod
    def from_specs(
        cls, specs: Sequence[tuple[torch.dtype, Sequence[int]]], *, align: int = 16
    ) -> Layout:
        """Plans a layout from ``(dtype, shape)`` pairs, without tensors at hand."""
        if align < 16 or align & (align - 1):
            raise ValueError(f"align must be a power of two >= 16, got {align}")
        entries = []
        offset = 0
        for i, (dtype, shape) in enumerate(specs):
            if dtype not in SUPPORTED_DTYPES:
                raise TypeError(f"entry {i}: unsupported dtype {dtype}")
            shape = tuple(int(s) for s in shape)
            if any(s < 0 for s in shape):
                raise ValueError(f"entry {i}: negative size in shape {shape}")
            numel = 1
            for s in shape:
                numel *= s
            nbytes = numel * dtype.itemsize
            entries.append(Entry(dtype, shape, offset, nbytes))
            offset = _align_up(offset + nbytes, align)
        return cls(tuple(entries), offset, align)

    def sliced(self, world_size: int, sliced: Sequence[bool] | None = None) -> Layout:
        """Layout of one rank's part of a TP-sliced payload.

        Entry ``i`` with ``sliced[i]`` becomes its rank slice ``t.reshape(W, -1)[rank]``
        (1-D, numel / W elements). Sliced entries come first, in order, then the unsliced ones
        whole, so the sliced bytes form one prefix that a single all-gather can carry;
        ``sliced_nbytes(...)`` is that prefix's size.
        """
        return _sliced(self, world_size, self._slice_flags(world_size, sliced))[0]

    def sliced_nbytes(self, world_size: int, sliced: Sequence[bool] | None = None) -> int:
        """Bytes of the sliced prefix of :meth:`sliced`: what one rank puts into the all-gather."""
        return _sliced(self, world_size, self._slice_flags(world_size, sliced))[1]

    def _slice_flags(self, world_size: int, sliced: Sequence[bool] | None) -> tuple[bool, ...]:
        if world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {world_size}")
        flags = (True,) * len(self.entries) if sliced is None else tuple(bool(f) for f in sliced)
        if len(flags) != len(self.entries):
            raise ValueError(f"sliced has {len(flags)} flags for {len(self.entries)} entries")
        for i, (e, f) in enumerate(zip(self.entries, flags)):
            if f and e.numel % world_size:
                raise ValueError(
                    f"entry {i}: numel {e.numel} is not divisible by world size {world_size}"
                )
        return flags


@functools.lru_cache(maxsize=1024)
def _sliced(layout: Layout, world_size: int, flags: tuple[bool, ...]) -> tuple[Layout, int]:
    """(part layout, sliced prefix bytes), memoised: TP receivers ask every step."""
    sl = [(e.dtype, (e.numel // world_size,)) for e, f in zip(layout.entries, flags) if f]
    whole = [(e.dtype, e.shape) for e, f in zip(layout.entries, flags) if not f]
    part = Layout.from_specs(sl + whole, align=layout.align)
    prefix = Layout.from_specs(sl, align=layout.align).nbytes
    return part, prefix


def plan_layout(tensors: Sequence[torch.Tensor], *, align: int = 16) -> Layout:
    """Plans one buffer for ``tensors``: each one's bytes at an ``align``-aligned offset.

    ``align`` (a power of two, at least 16) makes every slice viewable as its dtype and lets the
    copy kernels move 16-byte words.
    """
    for i, t in enumerate(tensors):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"entry {i}: expected a torch.Tensor, got {type(t).__name__}")
    return Layout.from_specs([(t.dtype, t.shape) for t in tensors], align=align)
