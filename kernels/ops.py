"""Public pack / unpack / reassembly ops and their pure-torch references.

Every op checks its inputs, then either runs the pure-torch path (the default for CPU tensors)
or builds one segment table and launches the Triton kernel once (the default for CUDA tensors).
``impl="triton"`` forces the kernel; on CPU tensors that needs ``TRITON_INTERPRET=1`` set before
``pipepack.kernels`` is imported (the tests do this).

Repeat calls: a table is cached per (op, layout, and each tensor's dtype, shape, strides,
address mod 16 and device); the addresses themselves go to the kernel as arguments, so fresh
buffers and fresh tensors every hop reuse it, and a hit skips the input checks (the first call
of that key made them). On CPU the torch path copies in the calling thread (numpy for large
entries), never in torch's intra-op pool.

CUDA graphs: a decode step's ``pack`` / ``unpack_into`` / ``reassemble_into`` capture and
replay. Build the plans before capturing (one call with the same tensors' shapes and strides,
e.g. on a side stream, as ``torch.cuda.graphs`` warm-up does), then capture the same calls:
the captured launch reads the tensors and buffers at their capture-time addresses, so keep
them static (the usual rule for graph inputs). A table a graph captured is never freed.
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Sequence

import numpy as np
import torch

from . import _copy
from .layout import SUPPORTED_DTYPES, Layout, plan_layout

__all__ = [
    "pack",
    "unpack",
    "unpack_into",
    "reassemble",
    "reassemble_into",
    "pack_reference",
    "unpack_into_reference",
    "reassemble_reference",
    "clear_plan_cache",
]

_PLANS = _copy.PlanCache()


def clear_plan_cache() -> None:
    """Drops cached segment tables (they hold device memory and raw pointers)."""
    _PLANS.clear()


# ----------------------------------------------------------------------------- checks


def _name(names: Sequence[str] | None, i: int) -> str:
    return f"entry {i}" if names is None else f"key {names[i]!r}"


def _common_device(
    tensors: Sequence[torch.Tensor], names: Sequence[str] | None, what: str
) -> torch.device | None:
    device = None
    first = -1
    for i, t in enumerate(tensors):
        if not isinstance(t, torch.Tensor):
            raise TypeError(
                f"{_name(names, i)}: {what} must be a torch.Tensor, got {type(t).__name__}"
            )
        if device is None:
            device, first = t.device, i
        elif t.device != device:
            raise ValueError(
                f"{_name(names, i)}: {what} is on {t.device} but "
                f"{_name(names, first)} is on {device}; one call moves one device's "
                "tensors"
            )
    return device


def _check_buffer(
    buf: torch.Tensor, nbytes: int, align: int, what: str, device: torch.device | None
) -> None:
    if not isinstance(buf, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(buf).__name__}")
    if buf.dtype != torch.uint8:
        raise TypeError(f"{what} must be torch.uint8, got {buf.dtype}")
    if buf.dim() != 1 or (buf.numel() > 1 and buf.stride(0) != 1):
        raise ValueError(
            f"{what} must be a contiguous 1-D byte tensor, got shape "
            f"{tuple(buf.shape)} stride {tuple(buf.stride())}"
        )
    if buf.numel() < nbytes:
        raise ValueError(f"{what} holds {buf.numel()} bytes but the layout needs {nbytes}")
    if buf.data_ptr() % align:
        raise ValueError(f"{what} address {buf.data_ptr():#x} is not {align}-byte aligned")
    if device is not None and buf.device != device:
        raise ValueError(f"{what} is on {buf.device} but the tensors are on {device}")


def _check_matches(
    tensors: Sequence[torch.Tensor], layout: Layout, names: Sequence[str] | None
) -> None:
    if len(tensors) != len(layout.entries):
        raise ValueError(
            f"got {len(tensors)} tensors for a layout of {len(layout.entries)} entries"
        )
    for i, (t, e) in enumerate(zip(tensors, layout.entries)):
        if t.dtype != e.dtype:
            raise TypeError(
                f"{_name(names, i)}: dtype {t.dtype} does not match the layout's {e.dtype}"
            )
        if tuple(t.shape) != e.shape:
            raise ValueError(
                f"{_name(names, i)}: shape {tuple(t.shape)} does not match the layout's {e.shape}"
            )


def _check_dtypes(tensors: Sequence[torch.Tensor], names: Sequence[str] | None) -> None:
    for i, t in enumerate(tensors):
        if t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{_name(names, i)}: unsupported dtype {t.dtype}")


def _check_outs(
    outs: Sequence[torch.Tensor], layout: Layout, names: Sequence[str] | None
) -> torch.device | None:
    if len(outs) != len(layout.entries):
        raise ValueError(
            f"got {len(outs)} destinations for a layout of {len(layout.entries)} entries"
        )
    device = _common_device(outs, names, "destination")
    for i, (o, e) in enumerate(zip(outs, layout.entries)):
        if o.dtype != e.dtype:
            raise TypeError(
                f"{_name(names, i)}: destination dtype {o.dtype} does not match {e.dtype}"
            )
        shape = tuple(o.shape)
        fits = shape == e.shape or (
            len(shape) == len(e.shape)
            and len(shape) > 0
            and shape[1:] == e.shape[1:]
            and shape[0] >= e.shape[0]
        )
        if not fits:
            raise ValueError(
                f"{_name(names, i)}: destination shape {shape} cannot hold "
                f"{e.shape} (dims after the first must match, the first may be "
                "larger)"
            )
    return device


def _pick_impl(impl: str | None, device: torch.device | None) -> str:
    if impl is None:
        return "triton" if device is not None and device.type == "cuda" else "torch"
    if impl not in ("torch", "triton"):
        raise ValueError(f"impl must be 'torch', 'triton' or None, got {impl!r}")
    if impl == "triton" and (device is None or device.type == "cpu") and not _copy.INTERPRETED:
        raise RuntimeError(
            "the Triton path on CPU tensors needs TRITON_INTERPRET=1 set before "
            "pipepack.kernels is imported"
        )
    return impl


# ----------------------------------------------------------------------------- CPU copies

# Integer dtypes of each element size: a same-size integer view reinterprets the bytes, so a copy
# through it is exact for every dtype (bool, fp8, bf16, NaN payloads) and never converts.
_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _as_numpy(t: torch.Tensor) -> np.ndarray:
    """``t``'s memory as a numpy integer array with the same strides (no copy)."""
    if t.requires_grad:
        t = t.detach()
    if t.is_complex():
        t = torch.view_as_real(t)  # a trailing dim of 2 parts; raises on a conj view
    if t.dtype not in _INT_OF_SIZE.values():
        t = t.view(_INT_OF_SIZE[t.dtype.itemsize])
    return t.numpy()


# torch runs an elementwise op (copy_ included) inline below this many elements and splits it
# over its intra-op thread pool above (at::internal::GRAIN_SIZE): small entries keep copy_,
# whose dispatch costs ~1 µs against ~8 µs for two numpy views and copyto.
_SERIAL_NUMEL = 32768


def _cpu_copy(dst: torch.Tensor, src: torch.Tensor) -> None:
    """``dst.copy_(src)`` for CPU tensors of one dtype and shape, in the calling thread only.

    torch's copy_ splits a large copy over its intra-op thread pool; in a process that shares
    a small machine with a peer rank and gloo's I/O threads, those workers spin against them
    (a 1 MiB hop took ~4 ms with the default threads against ~0.6 ms with one). numpy copies
    through the same strides in this thread. The rare tensor numpy cannot view (a lazy
    conjugate or negative view) is copied by torch.
    """
    if dst.numel() < _SERIAL_NUMEL:
        dst.copy_(src)
        return
    try:
        d, s = _as_numpy(dst), _as_numpy(src)
    except (RuntimeError, TypeError, ValueError):
        dst.copy_(src)
        return
    np.copyto(d, s, casting="no")


# A byte copy by address. ctypes' own memmove releases the GIL around every call: right for a
# large copy, but for a small one the release and re-acquire cost more than the copy and can
# hand the interpreter to another thread mid-hop; the PYFUNCTYPE twin keeps the GIL.
_MEMMOVE_NOGIL = ctypes.memmove
_MEMMOVE_GIL = ctypes.PYFUNCTYPE(
    ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t
)(ctypes.cast(ctypes.memmove, ctypes.c_void_p).value)
_GIL_COPY_MAX = 1 << 18


def memmove_small(dst: int, src, n: int) -> None:
    """Copies ``n`` bytes to address ``dst`` from an address or a bytes-like object, keeping the
    GIL when the copy is small (see above)."""
    (_MEMMOVE_GIL if n <= _GIL_COPY_MAX else _MEMMOVE_NOGIL)(dst, src, n)


def pack_cpu_unchecked(tensors: Sequence[torch.Tensor], layout: Layout, out: torch.Tensor) -> None:
    """:func:`pack` of CPU tensors into a CPU buffer, for callers that made ``layout`` from
    exactly these tensors' dtypes and shapes and own ``out`` (contiguous uint8, at least
    ``layout.nbytes``): nothing is checked again. A dense source is one ``memmove`` of its
    bytes on this thread; strided, conjugate or negative views go through :func:`_cpu_copy`.
    One loop, every test inline: on a hop of many small tensors the calls are the cost.
    """
    base = out.data_ptr()
    rest = None
    for i, (t, (off, n)) in enumerate(zip(tensors, _spans(layout))):
        if not n:
            continue
        if t.is_contiguous() and not t.is_conj() and not t.is_neg():
            (_MEMMOVE_GIL if n <= _GIL_COPY_MAX else _MEMMOVE_NOGIL)(base + off, t.data_ptr(), n)
        elif rest is None:
            rest = [i]
        else:
            rest.append(i)
    if rest:
        views = unpack(out, layout)
        for i in rest:
            _cpu_copy(views[i], tensors[i])


@functools.lru_cache(maxsize=1024)
def _spans(layout: Layout) -> tuple[tuple[int, int], ...]:
    """``(offset, nbytes)`` of every entry."""
    return tuple((e.offset, e.nbytes) for e in layout.entries)


def _dense(t: torch.Tensor) -> bool:
    return t.is_contiguous() and not t.is_conj() and not t.is_neg()


def pack_cpu_begin(tensors: Sequence[torch.Tensor], layout: Layout, out: torch.Tensor) -> list[int]:
    """The first half of :func:`pack_cpu_unchecked`: copies the entries that cannot go by
    address (the only copies that can fail) and returns the numbers of the dense ones."""
    dense = []
    rest = None
    for i, (t, e) in enumerate(zip(tensors, layout.entries)):
        if not e.nbytes:
            continue
        if _dense(t):
            dense.append(i)
        else:
            if rest is None:
                rest = []
            rest.append(i)
    if rest:
        views = unpack(out, layout)
        for i in rest:
            _cpu_copy(views[i], tensors[i])
    return dense


def pack_cpu_finish(
    tensors: Sequence[torch.Tensor],
    layout: Layout,
    out: torch.Tensor,
    dense: Sequence[int],
    *,
    chunk: int = 0,
    ready=None,
) -> None:
    """The second half: ``memmove`` of the dense entries (``dense`` from
    :func:`pack_cpu_begin`).

    With ``ready``, they are copied in pieces cut at multiples of ``chunk`` bytes, and
    ``ready(start, end)`` is called for each chunk of ``out`` in order, as soon as every byte
    before its end is written, so a caller can send one chunk while the next is copied.
    """
    base = out.data_ptr()
    if ready is None:
        for i in dense:
            e = layout.entries[i]
            memmove_small(base + e.offset, tensors[i].data_ptr(), e.nbytes)
        return
    if chunk <= 0:
        raise ValueError(f"chunk must be positive, got {chunk}")
    total = layout.nbytes
    sent = 0  # chunks [0, sent) were handed to ready
    is_dense = set(dense)
    for i, e in enumerate(layout.entries):
        if i in is_dense:
            src = tensors[i].data_ptr()
            s, end = e.offset, e.offset + e.nbytes
            while s < end:
                piece = min(end, (s // chunk + 1) * chunk)
                _MEMMOVE_NOGIL(base + s, src + (s - e.offset), piece - s)
                s = piece
                while sent + chunk <= s:
                    ready(sent, sent + chunk)
                    sent += chunk
        else:  # copied by pack_cpu_begin (or empty)
            done = e.offset + e.nbytes
            while sent + chunk <= done:
                ready(sent, sent + chunk)
                sent += chunk
    while sent < total:
        ready(sent, min(sent + chunk, total))
        sent += chunk


def _device_copy(dst: torch.Tensor, src: torch.Tensor) -> None:
    dst.copy_(src)


def _copier(device: torch.device):
    """The torch path's per-entry copy for ``device``: single-threaded on CPU, else ``copy_``."""
    return _cpu_copy if device.type == "cpu" else _device_copy


# ----------------------------------------------------------------------------- fast path

# What a cached plan was built for: per tensor (dtype, shape, strides, address mod 16, device
# index). A repeat call whose tensors match it passed every check the first call made, so the
# hit path checks nothing else about them; their addresses go to the kernel as arguments.


def _specs(
    tensors: Sequence[torch.Tensor], n_rel: int = _copy.N_PTR
) -> tuple[tuple, list[int]] | None:
    """(spec key, data pointers), or None when an item is not a tensor (the checks say so).

    The first ``n_rel`` tensors are addressed through pointer arguments; the addresses of the
    rest are in the table, so they are part of the key."""
    specs = []
    ptrs = []
    try:
        for t in tensors:
            p = t.data_ptr()
            ptrs.append(p)
            specs.append((t.dtype, t.shape, t.stride(), p & 15, t.get_device()))
    except (AttributeError, TypeError, RuntimeError):
        return None
    # past the kernel's pointer arguments, addresses are in the table: they key the plan
    return (*specs, *ptrs[n_rel:]), ptrs


def _slot_args(first: int, ptrs: Sequence[int]) -> list[int]:
    return [first, *(p & ~15 for p in ptrs[: _copy.N_PTR])]


def _slot_of(i: int) -> int:
    return _copy.SLOT_P0 + i if i < _copy.N_PTR else _copy.SLOT_ABS


def _side(t: torch.Tensor, i: int) -> _copy.View:
    """Tensor ``i`` of a call as a copy side: relative to its pointer argument when it has one."""
    return _copy.View.of(t, _slot_of(i))


def _buffer_ok(buf, nbytes: int, align: int, device_index: int) -> bool:
    """The hit path's check of a byte buffer (any failure takes the checked path)."""
    return (
        isinstance(buf, torch.Tensor)
        and buf.dtype == torch.uint8
        and buf.dim() == 1
        and buf.numel() >= nbytes
        and (buf.numel() <= 1 or buf.stride(0) == 1)
        and buf.data_ptr() % align == 0
        and buf.get_device() == device_index
    )


def _kernel_default(impl: str | None, tensors: Sequence[torch.Tensor]) -> bool:
    """Whether the call may take the cached-plan path: the Triton kernel is asked for, or is the
    default because the first tensor is on CUDA (the checked path verifies the rest)."""
    if impl == "triton":
        return True
    return impl is None and bool(tensors) and getattr(tensors[0], "is_cuda", False)


@functools.lru_cache(maxsize=1024)
def _layout_of(specs: tuple[tuple[torch.dtype, torch.Size], ...]) -> Layout:
    return Layout.from_specs(specs)


# ----------------------------------------------------------------------------- pack


def pack(
    tensors: Sequence[torch.Tensor],
    *,
    out: torch.Tensor | None = None,
    layout: Layout | None = None,
    impl: str | None = None,
    names: Sequence[str] | None = None,
) -> torch.Tensor:
    """Copies every tensor into one 1-D uint8 buffer of ``layout.nbytes`` bytes.

    On CUDA this is one kernel launch for all tensors; strided sources (transposed, step slices,
    stride-0 expands) are gathered by the kernel, with no ``.contiguous()`` copy first. The
    copy is enqueued on the current stream and nothing synchronises the device. Bytes between
    entries (alignment padding) are left as they were in ``out``.

    ``out``, when given, must be a contiguous uint8 tensor of at least ``layout.nbytes`` bytes,
    ``layout.align``-aligned; the returned tensor is its first ``layout.nbytes`` bytes.
    ``names`` label the entries in error messages (pass the dict keys). Without ``layout``,
    the layout of a repeat call's dtypes and shapes comes from a cache, not a new plan.
    """
    tensors = list(tensors)
    if _kernel_default(impl, tensors):
        got = _specs(tensors)
        if got is not None:
            specs, ptrs = got
            plan = _PLANS.get(("pack", layout, specs))
            if plan is not None:
                lay, device = plan.meta
                if out is None:
                    out = torch.empty(lay.nbytes, dtype=torch.uint8, device=device)
                elif not _buffer_ok(out, lay.nbytes, lay.align, specs[0][4]):
                    return _pack_checked(tensors, out, layout, impl, names)
                plan.launch(_slot_args(out.data_ptr(), ptrs))
                return out if out.numel() == lay.nbytes else out[: lay.nbytes]
    return _pack_checked(tensors, out, layout, impl, names)


def _pack_checked(tensors, out, layout, impl, names) -> torch.Tensor:
    device = _common_device(tensors, names, "tensor")
    _check_dtypes(tensors, names)
    given = layout
    if layout is None:
        layout = _layout_of(tuple((t.dtype, t.shape) for t in tensors))
    else:
        _check_matches(tensors, layout, names)
    if out is None:
        out = torch.empty(
            layout.nbytes, dtype=torch.uint8, device=device if device is not None else "cpu"
        )
    else:
        _check_buffer(out, layout.nbytes, layout.align, "out", device)
    out = out[: layout.nbytes]
    if _pick_impl(impl, device or out.device) == "torch":
        # one same-dtype copy per entry: exact bits (a fused _foreach_copy_ on CUDA goes
        # through float and rewrites NaN payloads of fp16/bf16/fp8)
        copy = _copier(out.device)
        for v, t in zip(unpack(out, layout), tensors):
            if v.numel():
                copy(v, t)
        return out
    specs, ptrs = _specs(tensors)
    # the output side is relative to out's address (slot 1), each source to its own pointer
    # argument: new buffers and new tensors every hop still hit
    plan = _plan(
        ("pack", given, specs),
        out.device,
        lambda: [
            (
                t,
                _side(t, i),
                _copy.View.flat(e.offset, slot=_copy.SLOT_BASE),
                e,
                False,
            )
            for i, (t, e) in enumerate(zip(tensors, layout.entries))
        ],
        (layout, out.device),
    )
    plan.launch(_slot_args(out.data_ptr(), ptrs))
    return out


def pack_reference(tensors: Sequence[torch.Tensor], layout: Layout | None = None) -> torch.Tensor:
    """What :func:`pack` computes, the obvious way: ``torch.cat`` of byte views, padded."""
    tensors = list(tensors)
    layout = layout or plan_layout(tensors)
    device = tensors[0].device if tensors else "cpu"
    parts = []
    pos = 0
    for t, e in zip(tensors, layout.entries):
        if e.offset > pos:
            parts.append(torch.zeros(e.offset - pos, dtype=torch.uint8, device=device))
        if t.numel():
            parts.append(t.contiguous().reshape(-1).view(torch.uint8))
        pos = e.offset + e.nbytes
    if layout.nbytes > pos:
        parts.append(torch.zeros(layout.nbytes - pos, dtype=torch.uint8, device=device))
    if not parts:
        return torch.empty(0, dtype=torch.uint8, device=device)
    return torch.cat(parts)


# ----------------------------------------------------------------------------- unpack


def unpack(buffer: torch.Tensor, layout: Layout) -> list[torch.Tensor]:
    """Zero-copy views of ``buffer``, one per entry, with the entry's dtype and shape.

    The views share ``buffer``'s storage: they stay valid as long as nobody writes the buffer
    again (a receive into the same buffer overwrites them).
    """
    _check_buffer(buffer, layout.nbytes, 1, "buffer", None)
    if buffer.data_ptr() % layout.align:
        raise ValueError(
            f"buffer address {buffer.data_ptr():#x} is not {layout.align}-byte "
            "aligned, so its slices cannot be viewed as their dtypes"
        )
    return unpack_unchecked(buffer, layout)


def unpack_unchecked(buffer: torch.Tensor, layout: Layout) -> list[torch.Tensor]:
    """:func:`unpack` for callers that sized ``buffer`` from ``layout`` themselves (a receive
    buffer of exactly the announced bytes): the same views, without the checks.

    One ``as_strided`` per entry over one typed view per dtype: a third of the cost of slice +
    view + view, which matters on the receive path of every hop."""
    dtypes, specs = _view_plan(layout)
    byte_off = buffer.storage_offset()
    if buffer.numel() != layout.nbytes:
        buffer = buffer[: layout.nbytes]
    bases = []
    for dtype in dtypes:
        size = dtype.itemsize
        if byte_off % size:  # a storage offset no typed view can start at
            return [
                buffer[e.offset : e.offset + e.nbytes].view(e.dtype).view(e.shape)
                for e in layout.entries
            ]
        bases.append((buffer.view(dtype), byte_off // size))
    out = []
    for i, shape, strides, offset in specs:
        base, first = bases[i]
        out.append(base.as_strided(shape, strides, first + offset))
    return out


@functools.lru_cache(maxsize=1024)
def _view_plan(layout: Layout) -> tuple[tuple, tuple]:
    """(distinct dtypes, per entry (dtype number, shape, strides, offset in elements))."""
    dtypes: list[torch.dtype] = []
    specs = []
    for dtype, shape, strides, offset in _view_specs(layout):
        if dtype not in dtypes:
            dtypes.append(dtype)
        specs.append((dtypes.index(dtype), shape, strides, offset))
    return tuple(dtypes), tuple(specs)


@functools.lru_cache(maxsize=1024)
def _view_specs(layout: Layout) -> tuple[tuple[torch.dtype, tuple, tuple, int], ...]:
    specs = []
    for e in layout.entries:
        strides = []
        step = 1
        for size in reversed(e.shape):
            strides.append(step)
            step *= max(size, 1)
        specs.append((e.dtype, e.shape, tuple(reversed(strides)), e.offset // e.dtype.itemsize))
    return tuple(specs)


def unpack_into(
    buffer: torch.Tensor,
    layout: Layout,
    outs: Sequence[torch.Tensor],
    *,
    impl: str | None = None,
    names: Sequence[str] | None = None,
) -> None:
    """Copies every entry of ``buffer`` into caller-owned ``outs`` in one launch (on CUDA).

    Destinations may be strided (e.g. CUDA-graph static inputs, a column slice of a larger
    tensor). A destination may be larger than its entry in dim 0 only: the entry then lands in
    ``outs[i][:n]`` (``n`` = the entry's leading size) and the rows after it are left untouched,
    so a static buffer sized for the largest batch can take every smaller one; the caller keeps
    track of ``n`` (it is ``layout.entries[i].shape[0]``). Other dims and the dtype must match.
    """
    outs = list(outs)
    if _kernel_default(impl, outs):
        got = _specs(outs)
        if got is not None:
            specs, ptrs = got
            plan = _PLANS.get(("unpack", layout, specs))
            if plan is not None and _buffer_ok(buffer, layout.nbytes, layout.align, specs[0][4]):
                plan.launch(_slot_args(buffer.data_ptr(), ptrs))
                return
    device = _check_outs(outs, layout, names)
    _check_buffer(buffer, layout.nbytes, layout.align, "buffer", device)
    views = [
        o if tuple(o.shape) == e.shape else o[: e.shape[0]] for o, e in zip(outs, layout.entries)
    ]
    if _pick_impl(impl, buffer.device) == "torch":
        copy = _copier(buffer.device)
        for v, src in zip(views, unpack(buffer, layout)):
            if v.numel():
                copy(v, src)
        return
    specs, ptrs = _specs(outs)
    plan = _plan(
        ("unpack", layout, specs),
        buffer.device,
        lambda: [
            (v, _copy.View.flat(e.offset, slot=_copy.SLOT_BASE), _side(v, i), e, True)
            for i, (v, e) in enumerate(zip(views, layout.entries))
        ],
    )
    plan.launch(_slot_args(buffer.data_ptr(), ptrs))


def unpack_into_reference(
    buffer: torch.Tensor, layout: Layout, outs: Sequence[torch.Tensor]
) -> None:
    """What :func:`unpack_into` computes, one ``copy_`` per entry."""
    for o, e in zip(outs, layout.entries):
        src = buffer[e.offset : e.offset + e.nbytes].view(e.dtype).view(e.shape)
        (o if tuple(o.shape) == e.shape else o[: e.shape[0]]).copy_(src)


# ----------------------------------------------------------------------------- reassembly


def _check_gathered(
    gathered: torch.Tensor,
    layout: Layout,
    sliced: Sequence[bool] | None,
    part: torch.Tensor | None,
    device: torch.device | None,
) -> tuple[int, tuple[bool, ...], Layout]:
    if (
        not isinstance(gathered, torch.Tensor)
        or gathered.dtype != torch.uint8
        or gathered.dim() != 2
    ):
        raise TypeError("gathered must be a [world, slice_bytes] torch.uint8 tensor")
    world = gathered.shape[0]
    flags = layout._slice_flags(world, sliced)
    part_layout = layout.sliced(world, flags)
    need = layout.sliced_nbytes(world, flags)
    if gathered.shape[1] != need:
        raise ValueError(
            f"gathered rows hold {gathered.shape[1]} bytes but the sliced entries "
            f"need {need} per rank"
        )
    if not gathered.is_contiguous() or gathered.data_ptr() % layout.align:
        raise ValueError(f"gathered must be contiguous and {layout.align}-byte aligned")
    if device is not None and gathered.device != device:
        raise ValueError(f"gathered is on {gathered.device} but the destinations are on {device}")
    if not all(flags):
        if part is None:
            raise ValueError(
                "some entries are not sliced: pass part=, this rank's part buffer "
                "that holds them whole"
            )
        _check_buffer(part, part_layout.nbytes, layout.align, "part", gathered.device)
    return world, flags, part_layout


def reassemble(
    gathered: torch.Tensor,
    layout: Layout,
    *,
    sliced: Sequence[bool] | None = None,
    part: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    impl: str | None = None,
) -> list[torch.Tensor]:
    """Rebuilds full tensors after one all-gather of TP-sliced payloads, in one launch.

    Each rank ``r`` of a group of ``W`` held ``t.reshape(W, -1)[r]`` of every sliced entry, packed
    by ``layout.sliced(W, sliced)``; ``gathered[r]`` is rank ``r``'s sliced prefix (so
    ``gathered`` is ``[W, layout.sliced_nbytes(W, sliced)]``). Entries with ``sliced[i] = False``
    were sent whole and are read from this rank's own ``part`` buffer. Returns zero-copy views of
    one new buffer laid out by ``layout`` (or of ``out``).
    """
    if _kernel_default(impl, [gathered]):
        key = _reassembly_key("reassemble", gathered, layout, sliced, part, ())
        plan = _PLANS.get(key) if key is not None else None
        if plan is not None and _reassembly_ok(plan, gathered, part):
            if out is None:
                out = torch.empty(layout.nbytes, dtype=torch.uint8, device=gathered.device)
            if _buffer_ok(out, layout.nbytes, layout.align, gathered.get_device()):
                out = out if out.numel() == layout.nbytes else out[: layout.nbytes]
                plan.launch(_reassembly_args(gathered, part, [out.data_ptr()]))
                return unpack(out, layout)
    world, flags, part_layout = _check_gathered(gathered, layout, sliced, part, None)
    if out is None:
        out = torch.empty(layout.nbytes, dtype=torch.uint8, device=gathered.device)
    else:
        _check_buffer(out, layout.nbytes, layout.align, "out", gathered.device)
    out = out[: layout.nbytes]
    views = unpack(out, layout)
    if _pick_impl(impl, gathered.device) == "torch":
        _reassemble_torch(gathered, layout, flags, part, part_layout, views)
        return views
    dsts = [_copy.View.flat(e.offset, slot=_copy.SLOT_P0 + 1) for e in layout.entries]
    key = _reassembly_key("reassemble", gathered, layout, sliced, part, ())
    plan = _PLANS.get(key)
    if plan is None:
        plan = _reassembly_plan(gathered, layout, flags, part, part_layout, views, dsts)
        if not plan.after:
            plan = _PLANS.put(key, plan)
    plan.launch(_reassembly_args(gathered, part, [out.data_ptr()]))
    return views


def reassemble_into(
    gathered: torch.Tensor,
    layout: Layout,
    outs: Sequence[torch.Tensor],
    *,
    sliced: Sequence[bool] | None = None,
    part: torch.Tensor | None = None,
    impl: str | None = None,
) -> None:
    """Like :func:`reassemble`, but into caller-owned (possibly strided) destinations.

    Destinations follow :func:`unpack_into`'s rules (a larger dim 0 takes ``outs[i][:n]``).
    """
    outs = list(outs)
    if _kernel_default(impl, [gathered]):
        got = _specs(outs, _copy.N_PTR - 1)
        key = (
            _reassembly_key("reassemble_into", gathered, layout, sliced, part, got[0])
            if got is not None
            else None
        )
        plan = _PLANS.get(key) if key is not None else None
        if plan is not None and _reassembly_ok(plan, gathered, part):
            plan.launch(_reassembly_args(gathered, part, got[1]))
            return
    device = _check_outs(outs, layout, None)
    world, flags, part_layout = _check_gathered(gathered, layout, sliced, part, device)
    views = [
        o if tuple(o.shape) == e.shape else o[: e.shape[0]] for o, e in zip(outs, layout.entries)
    ]
    if _pick_impl(impl, gathered.device) == "torch":
        _reassemble_torch(gathered, layout, flags, part, part_layout, views)
        return
    specs, ptrs = _specs(outs, _copy.N_PTR - 1)
    # slot 1: gathered, slot 2: part, slots 3..: the destinations
    dsts = [_copy.View.of(v, _slot_of(i + 1)) for i, v in enumerate(views)]
    key = _reassembly_key("reassemble_into", gathered, layout, sliced, part, specs)
    plan = _PLANS.get(key)
    if plan is None:
        plan = _reassembly_plan(gathered, layout, flags, part, part_layout, views, dsts)
        if not plan.after:
            plan = _PLANS.put(key, plan)
    plan.launch(_reassembly_args(gathered, part, ptrs))


def _reassembly_key(op, gathered, layout, sliced, part, specs) -> tuple | None:
    """Everything a reassembly table depends on besides the buffers' (aligned) addresses."""
    try:
        shape = gathered.shape
        device = gathered.get_device()
    except AttributeError:
        return None
    flags = None if sliced is None else tuple(bool(f) for f in sliced)
    return (op, layout, flags, shape, part is None, device, specs)


def _reassembly_ok(plan: _copy.Plan, gathered, part) -> bool:
    """The hit path's checks of the buffers whose addresses change per call."""
    align, part_nbytes = plan.meta
    return (
        gathered.dtype == torch.uint8
        and gathered.dim() == 2
        and gathered.is_contiguous()
        and gathered.data_ptr() % align == 0
        and (part is None or _buffer_ok(part, part_nbytes, align, gathered.get_device()))
    )


def _reassembly_args(gathered, part, ptrs: Sequence[int]) -> list[int]:
    return [
        gathered.data_ptr(),
        0 if part is None else part.data_ptr(),
        *(p & ~15 for p in ptrs[: _copy.N_PTR - 1]),
    ]


def _reassembly_plan(gathered, layout, flags, part, part_layout, views, dsts) -> _copy.Plan:
    """W pieces per sliced entry (rank r's slice lands at logical offset r * numel / W), one
    piece per whole entry (from this rank's part). Sources are relative to slot 1 (gathered)
    and slot 2 (part), destinations to their own slots (``dsts``)."""
    world, row_bytes = gathered.shape
    n_sliced = sum(flags)
    part_entries = iter(part_layout.entries[:n_sliced])
    whole_entries = iter(part_layout.entries[n_sliced:])
    rows: list[list[int]] = []
    keep: list[torch.Tensor] = []
    after: list[tuple[torch.Tensor, torch.Tensor]] = []
    for e, f, dst, v in zip(layout.entries, flags, dsts, views):
        pe = next(part_entries) if f else next(whole_entries)
        if e.numel == 0:
            continue
        esize = e.dtype.itemsize
        if f:
            pieces = [
                (
                    _copy.SLOT_BASE,
                    r * row_bytes + pe.offset,
                    r * (e.numel // world),
                    e.numel // world,
                )
                for r in range(world)
            ]
        else:
            pieces = [(_copy.SLOT_P0, pe.offset, 0, e.numel)]
        entry_rows = []
        for slot, off, start, n in pieces:
            if n == e.numel and len(dst.sizes) == len(e.shape):  # a whole tensor: maybe tiled
                tiled = _copy.tile_row(
                    _copy.View.flat(off, slot=slot),
                    dst,
                    e.shape,
                    _copy.contiguous_strides(e.shape),
                    dst.strides,
                    esize,
                )
                if tiled is not None:
                    entry_rows.append(tiled)
                    continue
            r = _copy.segment_rows(
                _copy.View.flat(off, slot=slot),
                _copy.View(dst.ptr, dst.sizes, dst.strides, start, dst.slot),
                n,
                esize,
            )
            if r is None:
                break
            entry_rows.extend(r)
        else:
            rows.extend(entry_rows)
            continue
        # destination the kernel cannot address: stage contiguously, copy after the launch
        staged = torch.empty(e.shape, dtype=e.dtype, device=gathered.device)
        keep.append(staged)
        after.append((v, staged))
        for slot, off, start, n in pieces:
            rows.extend(
                _copy.segment_rows(
                    _copy.View.flat(off, slot=slot),
                    _copy.View.flat(staged.data_ptr(), start),
                    n,
                    esize,
                )
            )
    return _copy.build_plan(
        rows, gathered.device, keep=keep, after=after, meta=(layout.align, part_layout.nbytes)
    )


def _reassemble_torch(gathered, layout, flags, part, part_layout, views) -> None:
    """One typed ``[W, n/W]`` block copy per sliced entry, one copy per whole entry."""
    world = gathered.shape[0]
    copy = _copier(gathered.device)
    n_sliced = sum(flags)
    sliced_entries = iter(part_layout.entries[:n_sliced])
    whole_entries = iter(part_layout.entries[n_sliced:])
    for e, f, v in zip(layout.entries, flags, views):
        pe = next(sliced_entries) if f else next(whole_entries)
        if not e.numel:
            continue
        if f:
            src = gathered[:, pe.offset : pe.offset + pe.nbytes].view(e.dtype)
            if v.is_contiguous():
                copy(v.view(world, -1), src)
            else:  # rank slices end mid-row of a strided destination: stage them in order
                staged = torch.empty(e.shape, dtype=e.dtype, device=v.device)
                copy(staged.view(world, -1), src)
                copy(v, staged)
        else:
            copy(v, part[pe.offset : pe.offset + pe.nbytes].view(e.dtype).view(e.shape))


def reassemble_reference(
    gathered: torch.Tensor,
    layout: Layout,
    *,
    sliced: Sequence[bool] | None = None,
    part: torch.Tensor | None = None,
) -> list[torch.Tensor]:
    """What :func:`reassemble` computes: ``torch.cat`` of every rank's slice, per entry."""
    world = gathered.shape[0]
    flags = layout._slice_flags(world, sliced)
    part_layout = layout.sliced(world, flags)
    n_sliced = sum(flags)
    out = []
    k_s, k_w = 0, n_sliced
    for e, f in zip(layout.entries, flags):
        if f:
            pe = part_layout.entries[k_s]
            k_s += 1
            rows = gathered[:, pe.offset : pe.offset + pe.nbytes].reshape(-1)
            out.append(rows.view(e.dtype).view(e.shape).clone())
        else:
            pe = part_layout.entries[k_w]
            k_w += 1
            out.append(part[pe.offset : pe.offset + pe.nbytes].view(e.dtype).view(e.shape).clone())
    return out


# ----------------------------------------------------------------------------- planning


def _plan(key: tuple, device: torch.device, pieces_fn, meta=None) -> _copy.Plan:
    """The cached segment table for ``key``, built from ``pieces_fn()`` on a miss.

    ``pieces_fn`` yields ``(tensor, src view, dst view, entry, is_dst)`` where ``tensor`` is the
    caller's strided side (the source for pack, the destination for unpack_into). A whole
    transposed tensor takes the tiled path. A tensor the kernel cannot address (more than four
    non-mergeable dims) is gathered or staged with torch: correct, one extra copy, and such
    plans are not cached.
    """
    plan = _PLANS.get(key)
    if plan is not None:
        return plan
    rows: list[list[int]] = []
    keep: list[torch.Tensor] = []
    after: list[tuple[torch.Tensor, torch.Tensor]] = []
    for t, src, dst, e, is_dst in pieces_fn():
        if e.numel == 0:
            continue
        esize = e.dtype.itemsize
        dense = _copy.contiguous_strides(e.shape)
        tiled = _copy.tile_row(
            src,
            dst,
            e.shape,
            dense if is_dst else t.stride(),
            t.stride() if is_dst else dense,
            esize,
        )
        if tiled is not None:
            rows.append(tiled)
            continue
        r = _copy.segment_rows(src, dst, e.numel, esize)
        if r is None:
            staged = torch.empty(e.shape, dtype=e.dtype, device=device)
            if is_dst:
                after.append((t, staged))
                dst = _copy.View.of(staged)
            else:
                staged.copy_(t)
                src = _copy.View.of(staged)
            keep.append(staged)
            r = _copy.segment_rows(src, dst, e.numel, esize)
        rows.extend(r)
    plan = _copy.build_plan(rows, device, keep=keep, after=after, meta=meta)
    if not keep:
        plan = _PLANS.put(key, plan)
    return plan
