"""Compute fused into the wire path: the receiver's first op, the sender's fold, an fp8 wire.

Every decoder layer of vLLM and sglang starts with ``residual = hidden + residual;
x = rmsnorm(residual) * weight``. A pipeline hop carries exactly that pair, so:

- :func:`unpack_add_rmsnorm` reads both straight from the packed buffer in one kernel and
  writes the new residual and the normalised output: the activations are touched once.
- :func:`pack_wire` with ``fold=(hidden, residual)`` sends ``hidden + residual`` (rounded to the
  model dtype) in the hidden entry's slot and drops the residual entry: half the activation
  bytes. The receiver then calls :func:`unpack_add_rmsnorm` with ``residual=None``.
- :func:`pack_wire` with ``fp8=(i, ...)`` quantises those [T, H] entries to float8_e4m3fn with
  one fp32 scale per row; :func:`dequantize_fp8` (or :func:`unpack_add_rmsnorm` directly)
  restores the model dtype. Lossy, opt-in only (see :func:`pack_wire`).

Numerics, the same on every path (pure torch, the interpreter, the compiled kernel):

- Two orders of the fused add + RMSNorm (``order=``), as docs/design.md section 9 lists them.
  ``"vllm"``: the add rounds to the model dtype (that is the new residual), the variance is
  accumulated in fp32 from the rounded sum, the normalised value is rounded to the model dtype
  and then multiplied by the weight in the model dtype. ``"flashinfer"`` (sglang): the add in
  fp32, the rounded sum stored as the residual, the variance from the fp32 sum, the weight
  multiplied in fp32, one final rounding.
- The reduction order is fixed, not left to the hardware: the fp32 sum of squares of a row is
  a pairwise tree over the row zero-padded to the next power of two (level by level
  ``s[2i] + s[2i + 1]``), the mean divides by ``H``, ``rstd = 1 / sqrt(mean + eps)`` with IEEE
  division and square root, and nothing is contracted into a multiply-add. So **the residual
  and the output are bit-exact** against the references here (:func:`add_rmsnorm_reference`),
  for finite inputs. Against vLLM's or flashinfer's own CUDA kernels, which sum in another
  order, the residual is bit-exact and an output element can differ where the normalised value
  sits on a rounding boundary (tested: within one ulp of the model dtype when the weight is
  one, i.e. against ``pipepack.pp.refmodel.RMSNorm``).
- Non-finite inputs (inf / NaN) give non-finite outputs; their bit patterns are not promised.
"""

from __future__ import annotations

import functools
import os
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import _fused_kernels as _k
from .layout import SUPPORTED_DTYPES, Layout
from .ops import unpack

__all__ = [
    "ORDERS",
    "WireLayout",
    "plan_wire",
    "pack_wire",
    "pack_wire_reference",
    "unpack_add_rmsnorm",
    "unpack_add_rmsnorm_reference",
    "add_rmsnorm_reference",
    "dequantize_fp8",
    "quantize_fp8_reference",
    "dequantize_fp8_reference",
]

ORDERS = ("vllm", "flashinfer")
FP8 = torch.float8_e4m3fn
FP8_MAX = _k.FP8_MAX
MODEL_DTYPES = {torch.bfloat16: _k.DT_BF16, torch.float16: _k.DT_FP16, torch.float32: _k.DT_FP32}
# widest row the receive kernel holds in registers as one tile; wider rows use the torch path
MAX_TRITON_HIDDEN = 32768
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
# Under the interpreter every program costs ~1 ms: cap the grid, each program then loops over
# several row blocks (the per-row arithmetic does not depend on the grid).
_INTERPRETER_PROGRAMS = 64
_INTERPRETER_TILE = 1 << 18  # elements per row-block tile under the interpreter

# Compile options of every launch: no multiply-add contraction, so the kernels round exactly
# where the references do (tests/test_fused_aot.py compiles with these and checks the PTX).
LAUNCH_OPTIONS = {"enable_fp_fusion": False}

# torch splits an elementwise op over its intra-op thread pool above this many elements
# (at::internal::GRAIN_SIZE) and runs it in the calling thread below. The CPU path works in row
# blocks under it: on a small machine those workers spin against a peer rank and gloo's I/O
# threads (a folded 1 MiB hop took ~10 ms with torch's default two threads, ~0.65 ms with
# one). Rows are independent in every op here, so the blocks change no bit.
_SERIAL_NUMEL = 32768

# send-kernel block sizes: 16 KiB per copy program, 4096 elements per fold program
_VBLOCK = 4096
_BBLOCK = 1024
_FBLOCK = 4096


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _row_blocks(T: int, H: int) -> list[tuple[int, int]]:
    """``(start, end)`` row ranges of a [T, H] operand whose intermediates (rows padded to a
    power of two for the reduction tree) stay under :data:`_SERIAL_NUMEL` elements (strictly:
    at exactly that many torch still opens a parallel region)."""
    step = max(1, (_SERIAL_NUMEL - 1) // _next_pow2(max(H, 1)))
    return [(a, min(a + step, T)) for a in range(0, T, step)]


def _pick_impl(impl: str | None, device: torch.device) -> str:
    if impl is None:
        return "triton" if device.type == "cuda" else "torch"
    if impl not in ("torch", "triton"):
        raise ValueError(f"impl must be 'torch', 'triton' or None, got {impl!r}")
    if impl == "triton" and device.type == "cpu" and not INTERPRETED:
        raise RuntimeError(
            "the Triton path on CPU tensors needs TRITON_INTERPRET=1 set before "
            "pipepack.kernels is imported"
        )
    return impl


def _check_order(order: str) -> int:
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
    return ORDERS.index(order)


# ============================================================================ references


def _tree_rowsum(v: torch.Tensor) -> torch.Tensor:
    """fp32 row sums of ``v`` [T, H] in the kernels' order: a pairwise tree over the row
    zero-padded to a power of two."""
    width = _next_pow2(v.shape[-1])
    if width != v.shape[-1]:
        v = F.pad(v, (0, width - v.shape[-1]))
    while v.shape[-1] > 1:
        v = v[..., 0::2] + v[..., 1::2]
    return v[..., 0]


def _rstd(xf: torch.Tensor, eps: float) -> torch.Tensor:
    """``1 / sqrt(sum(x * x) / H + eps)`` per row, fp32, IEEE division and square root."""
    var = _tree_rowsum(xf * xf) / xf.shape[-1]
    # sqrt and reciprocal through fp64, rounded once to fp32: correctly rounded (fp64 has more
    # than 2 * 24 + 2 bits), where torch's own fp32 sqrt on CPU is not (~1 in 6 values is off
    # by one ulp in torch 2.13)
    root = torch.sqrt((var + eps).double()).float()
    return (1.0 / root.double()).float()


def add_rmsnorm_reference(
    hidden: torch.Tensor,
    residual: torch.Tensor | None,
    weight: torch.Tensor,
    eps: float,
    *,
    order: str = "vllm",
) -> tuple[torch.Tensor, torch.Tensor]:
    """The fused add + RMSNorm in pure torch: ``(out, new_residual)``, both fresh tensors.

    ``hidden``/``residual`` are [T, H] in the model dtype (bf16 / fp16 / fp32), ``weight`` is
    [H] in that dtype. ``residual=None`` skips the add (the sender folded it already). The two
    orders and the fixed reduction order are described in this module's docstring.
    """
    _check_order(order)
    dtype = hidden.dtype
    if order == "vllm":
        x = hidden + residual if residual is not None else hidden.clone()
        xf = x.float()
        out = (xf * _rstd(xf, eps)[:, None]).to(dtype) * weight
        return out, x
    xf = hidden.float() + residual.float() if residual is not None else hidden.float()
    res = xf.to(dtype)
    if res.data_ptr() == hidden.data_ptr():
        res = res.clone()
    out = ((xf * _rstd(xf, eps)[:, None]) * weight.float()).to(dtype)
    return out, res


def quantize_fp8_reference(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row fp8 e4m3fn quantisation of ``x`` [T, H]: ``(codes, scales)``.

    ``scale = amax(|row|) / 448`` in fp32 (1 where that is 0: an all-zero row), codes are
    ``clamp(x / scale, -448, 448)`` rounded to nearest even. ``codes * scale`` restores the row.
    """
    xf = x.float()
    scale = xf.abs().amax(dim=1) / FP8_MAX if xf.shape[1] else xf.new_zeros(xf.shape[0])
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = (xf / scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return q, scale


def dequantize_fp8_reference(
    codes: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """``codes * scale`` per row in fp32, rounded once to ``dtype``."""
    return (codes.float() * scales[:, None]).to(dtype)


# ============================================================================ wire layout


@dataclass(frozen=True)
class WireLayout:
    """How a tensor list travels under :func:`pack_wire`.

    ``layout`` is the packed buffer's :class:`Layout`. ``entries[i]`` is the layout entry that
    carries tensor ``i``: ``None`` for the residual of ``fold`` (it travels inside the hidden
    entry, as ``hidden + residual``); for a tensor in ``fp8`` it is the float8_e4m3fn [T, H]
    codes entry and the fp32 [T] row scales are the entry right after it. ``dtypes`` are the
    tensors' own dtypes (what :func:`dequantize_fp8` restores).
    """

    layout: Layout
    entries: tuple[int | None, ...]
    fp8: tuple[bool, ...]
    dtypes: tuple[torch.dtype, ...]
    fold: tuple[int, int] | None


def plan_wire(
    specs: Sequence[tuple[torch.dtype, Sequence[int]]],
    *,
    fold: tuple[int, int] | None = None,
    fp8: Sequence[int] = (),
    align: int = 16,
) -> WireLayout:
    """The :class:`WireLayout` of tensors with these ``(dtype, shape)`` specs, without tensors.

    A receiver with a declared schema computes the same layout the sender's :func:`pack_wire`
    used. Entries keep the tensors' order; the folded residual is left out; an fp8 tensor is
    two entries (codes, then scales).
    """
    specs = tuple((d, tuple(int(s) for s in shape)) for d, shape in specs)
    return _plan_wire(specs, _norm_fold(fold, len(specs)), _norm_fp8(fp8, len(specs)), align)


def _norm_fold(fold, n: int) -> tuple[int, int] | None:
    if fold is None:
        return None
    if not isinstance(fold, (tuple, list)) or len(fold) != 2:
        raise TypeError(f"fold must be a (hidden, residual) pair of entry indices, got {fold!r}")
    h, r = (_norm_index(i, n, f"fold {name}") for i, name in zip(fold, ("hidden", "residual")))
    if h == r:
        raise ValueError(f"fold hidden and residual are the same entry ({h})")
    return h, r


def _norm_fp8(fp8, n: int) -> tuple[int, ...]:
    if isinstance(fp8, int):
        raise TypeError("fp8 must be a sequence of entry indices, e.g. fp8=(0,)")
    out = tuple(_norm_index(i, n, "fp8") for i in fp8)
    if len(set(out)) != len(out):
        raise ValueError(f"fp8 lists an entry twice: {tuple(fp8)!r}")
    return out


def _norm_index(i, n: int, what: str) -> int:
    if isinstance(i, bool) or not isinstance(i, int):
        raise TypeError(f"{what} index must be an int, got {type(i).__name__}")
    if not -n <= i < n:
        raise IndexError(f"{what} index {i} is out of range for {n} entries")
    return i % n


@functools.lru_cache(maxsize=256)
def _plan_wire(specs, fold, fp8, align) -> WireLayout:
    for i, (dtype, _) in enumerate(specs):
        if dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"entry {i}: unsupported dtype {dtype}")
    if fold is not None:
        h, r = fold
        for i, role in ((h, "hidden"), (r, "residual")):
            dtype, shape = specs[i]
            if dtype not in MODEL_DTYPES:
                raise TypeError(
                    f"entry {i}: the fold {role} must be bf16, fp16 or fp32, got {dtype}"
                )
            if len(shape) != 2:
                raise ValueError(f"entry {i}: the fold {role} must be [T, H], got shape {shape}")
        if specs[h] != specs[r]:
            raise ValueError(
                f"fold hidden (entry {h}: {specs[h][0]} {specs[h][1]}) and residual (entry "
                f"{r}: {specs[r][0]} {specs[r][1]}) differ in dtype or shape"
            )
        if r in fp8:
            raise ValueError(
                f"entry {r} is the folded residual, it is not sent: quantise the hidden "
                f"entry {h} instead"
            )
    for i in fp8:
        dtype, shape = specs[i]
        if dtype not in MODEL_DTYPES:
            raise TypeError(f"entry {i}: fp8 quantises bf16, fp16 or fp32 rows, got {dtype}")
        if len(shape) != 2:
            raise ValueError(f"entry {i}: fp8 quantises [T, H] rows, got shape {shape}")
    wire_specs = []
    entries: list[int | None] = []
    for i, (dtype, shape) in enumerate(specs):
        if fold is not None and i == fold[1]:
            entries.append(None)
            continue
        entries.append(len(wire_specs))
        if i in fp8:
            wire_specs += [(FP8, shape), (torch.float32, (shape[0],))]
        else:
            wire_specs.append((dtype, shape))
    layout = Layout.from_specs(wire_specs, align=align)
    flags = tuple(i in fp8 for i in range(len(specs)))
    return WireLayout(layout, tuple(entries), flags, tuple(d for d, _ in specs), fold)


# ============================================================================ checks


def _check_buffer(buf, layout: Layout, device: torch.device | None) -> None:
    if not isinstance(buf, torch.Tensor):
        raise TypeError(f"buffer must be a torch.Tensor, got {type(buf).__name__}")
    if buf.dtype != torch.uint8:
        raise TypeError(f"buffer must be torch.uint8, got {buf.dtype}")
    if buf.dim() != 1 or (buf.numel() > 1 and buf.stride(0) != 1):
        raise ValueError(
            f"buffer must be a contiguous 1-D byte tensor, got shape {tuple(buf.shape)} "
            f"stride {tuple(buf.stride())}"
        )
    if buf.numel() < layout.nbytes:
        raise ValueError(f"buffer holds {buf.numel()} bytes but the layout needs {layout.nbytes}")
    if buf.data_ptr() % layout.align:
        raise ValueError(f"buffer address {buf.data_ptr():#x} is not {layout.align}-byte aligned")
    if device is not None and buf.device != device:
        raise ValueError(f"buffer is on {buf.device} but the tensors are on {device}")


@dataclass(frozen=True)
class _Source:
    """One [T, H] operand in the buffer: model-dtype rows, or fp8 codes + fp32 row scales."""

    index: int
    T: int
    H: int
    dtype: torch.dtype  # the entry's dtype (FP8 for codes)
    scales: int | None  # entry index of the row scales (fp8 only)


def _source(layout: Layout, idx, what: str) -> _Source:
    n = len(layout.entries)
    i = _norm_index(idx, n, what)
    e = layout.entries[i]
    if len(e.shape) != 2:
        raise ValueError(f"{what} entry {i} must be [T, H], got shape {e.shape}")
    T, H = e.shape
    if e.dtype == FP8:
        if i + 1 >= n:
            raise ValueError(
                f"{what} entry {i} holds fp8 codes but no fp32 row-scale entry follows it"
            )
        s = layout.entries[i + 1]
        if s.dtype != torch.float32 or s.shape != (T,):
            raise ValueError(
                f"{what} entry {i} holds fp8 codes, so entry {i + 1} must be its fp32 [{T}] "
                f"row scales, got {s.dtype} {s.shape}"
            )
        return _Source(i, T, H, FP8, i + 1)
    if e.dtype not in MODEL_DTYPES:
        raise TypeError(
            f"{what} entry {i} has dtype {e.dtype}; expected bf16, fp16, fp32 or "
            "float8_e4m3fn codes"
        )
    return _Source(i, T, H, e.dtype, None)


def _check_dest(t, name: str, dtype, T: int, H: int, device) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype != dtype:
        raise TypeError(f"{name} dtype {t.dtype} does not match the model dtype {dtype}")
    if t.dim() != 2 or t.shape[1] != H or t.shape[0] < T:
        raise ValueError(
            f"{name} shape {tuple(t.shape)} cannot hold [{T}, {H}] (dim 1 must be {H}, "
            f"dim 0 at least {T})"
        )
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but the buffer is on {device}")
    return t[:T]


def _view(buffer: torch.Tensor, layout: Layout, i: int, dtype=None) -> torch.Tensor:
    e = layout.entries[i]
    raw = buffer[e.offset : e.offset + e.nbytes]
    return raw if dtype is torch.uint8 else raw.view(e.dtype).view(e.shape)


# ============================================================================ receive


def unpack_add_rmsnorm(
    buffer: torch.Tensor,
    layout: Layout,
    hidden: int,
    residual: int | None,
    weight: torch.Tensor,
    eps: float,
    *,
    order: str = "vllm",
    out: torch.Tensor | None = None,
    residual_out: torch.Tensor | None = None,
    impl: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The first op of a decoder layer, straight from a received buffer: one kernel on CUDA.

    ``hidden`` and ``residual`` are entry indices of ``layout``; both entries are [T, H] in
    the model dtype (bf16, fp16 or fp32, the same for both), or fp8 codes from
    :func:`pack_wire` (``fp8=``), whose fp32 row scales are the next entry: they are dequantised
    to the model dtype (``weight.dtype``) first, bit-for-bit as :func:`dequantize_fp8` would.
    ``residual=None``: the hop carries the sum already (``pack_wire(fold=...)``); there is no
    add, and the new residual is the received sum.

    Computes ``residual_new = hidden + residual`` and ``out = rmsnorm(residual_new) * weight``
    in the given ``order`` (``"vllm"`` or ``"flashinfer"``, see the module docstring; both
    results are bit-exact against :func:`add_rmsnorm_reference` for finite inputs).

    ``out`` / ``residual_out``: caller-owned [N, H] destinations in the model dtype with
    ``N >= T`` (e.g. CUDA-graph static buffers sized for the largest batch), any strides; the
    op writes rows ``[:T]`` only and leaves the rest untouched. They must not overlap each other
    (``residual_out`` may be the residual's own slot in ``buffer``: each row is read before it
    is written). Returns ``(out[:T], residual_out[:T])``: views of the given tensors, or fresh
    contiguous [T, H] tensors for the ones not given. ``eps`` is used as fp32.
    """
    order_code = _check_order(order)
    if not isinstance(buffer, torch.Tensor):
        raise TypeError(f"buffer must be a torch.Tensor, got {type(buffer).__name__}")
    if not isinstance(layout, Layout):
        raise TypeError(f"layout must be a pipepack Layout, got {type(layout).__name__}")
    _check_buffer(buffer, layout, None)
    device = buffer.device
    h = _source(layout, hidden, "hidden")
    r = None if residual is None else _source(layout, residual, "residual")
    if r is not None:
        if r.index == h.index:
            raise ValueError(f"hidden and residual are the same entry ({h.index})")
        if (r.T, r.H) != (h.T, h.H):
            raise ValueError(
                f"hidden entry {h.index} is [{h.T}, {h.H}] but residual entry {r.index} is "
                f"[{r.T}, {r.H}]"
            )
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
    dtype = weight.dtype
    if dtype not in MODEL_DTYPES:
        raise TypeError(f"weight dtype {dtype} is not a model dtype (bf16, fp16, fp32)")
    for s, what in ((h, "hidden"), (r, "residual")):
        if s is not None and s.dtype != FP8 and s.dtype != dtype:
            raise TypeError(
                f"{what} entry {s.index} is {s.dtype} but the weight is {dtype}: the op runs "
                "in one model dtype"
            )
    if tuple(weight.shape) != (h.H,):
        raise ValueError(f"weight shape {tuple(weight.shape)} does not match hidden size {h.H}")
    if weight.device != device:
        raise ValueError(f"weight is on {weight.device} but the buffer is on {device}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 <= eps < float("inf"):
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")
    T, H = h.T, h.H
    if H == 0:
        raise ValueError(f"hidden entry {h.index} has hidden size 0: nothing to normalise")
    outs = []
    for t, name in ((out, "out"), (residual_out, "residual_out")):
        outs.append(
            torch.empty(T, H, dtype=dtype, device=device)
            if t is None
            else _check_dest(t, name, dtype, T, H, device)
        )
    o, ro = outs
    if out is not None and residual_out is not None and _overlap(o, ro):
        raise ValueError("out and residual_out overlap: they must be separate memory")
    use = _pick_impl(impl, device)
    if use == "triton" and H > MAX_TRITON_HIDDEN:
        if impl == "triton":
            raise ValueError(
                f"hidden size {H} exceeds the kernel's one-tile limit {MAX_TRITON_HIDDEN}"
            )
        use = "torch"
    if T == 0:
        return o, ro
    if use == "torch":  # the reference, row block by row block (see _SERIAL_NUMEL)

        def rows(s, a, z):
            v = _view(buffer, layout, s.index)[a:z]
            if s.dtype == FP8:
                return dequantize_fp8_reference(v, _view(buffer, layout, s.scales)[a:z], dtype)
            return v

        for a, z in _row_blocks(T, H):
            blk_out, blk_res = add_rmsnorm_reference(
                rows(h, a, z), None if r is None else rows(r, a, z), weight, eps, order=order
            )
            ro[a:z].copy_(blk_res)
            o[a:z].copy_(blk_out)
        return o, ro
    _launch_recv(buffer, layout, h, r, weight, float(eps), o, ro, dtype, True, order_code)
    return o, ro


def _overlap(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two tensors' memory spans intersect (a conservative interval test)."""
    if a.numel() == 0 or b.numel() == 0:
        return False

    def span(t):
        lo = t.data_ptr()
        hi = lo + sum((s - 1) * st for s, st in zip(t.shape, t.stride())) * t.element_size()
        return lo, hi + t.element_size()

    (a0, a1), (b0, b1) = span(a), span(b)
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr() and a0 < b1 and b0 < a1


def unpack_add_rmsnorm_reference(
    buffer: torch.Tensor,
    layout: Layout,
    hidden: int,
    residual: int | None,
    weight: torch.Tensor,
    eps: float,
    *,
    order: str = "vllm",
) -> tuple[torch.Tensor, torch.Tensor]:
    """What :func:`unpack_add_rmsnorm` computes: views (fp8 entries dequantised by
    :func:`dequantize_fp8_reference`), then :func:`add_rmsnorm_reference`."""

    def operand(i):
        e = layout.entries[i]
        v = _view(buffer, layout, i)
        if e.dtype == FP8:
            return dequantize_fp8_reference(v, _view(buffer, layout, i + 1), weight.dtype)
        return v

    h = operand(hidden)
    r = None if residual is None else operand(residual)
    return add_rmsnorm_reference(h, r, weight, eps, order=order)


def dequantize_fp8(
    buffer: torch.Tensor,
    layout: Layout,
    index: int,
    dtype: torch.dtype,
    *,
    out: torch.Tensor | None = None,
    impl: str | None = None,
) -> torch.Tensor:
    """Restores an fp8 entry of ``layout`` (codes at ``index``, fp32 row scales at
    ``index + 1``, as :func:`pack_wire` writes them) to ``dtype``: ``codes * scale`` per row in
    fp32, rounded once. ``out`` follows :func:`unpack_add_rmsnorm`'s rules (rows ``[:T]`` of a
    possibly larger, strided [N, H] tensor); returns ``out[:T]`` or a fresh [T, H] tensor."""
    if not isinstance(layout, Layout):
        raise TypeError(f"layout must be a pipepack Layout, got {type(layout).__name__}")
    _check_buffer(buffer, layout, None)
    s = _source(layout, index, "fp8")
    if s.dtype != FP8:
        raise TypeError(f"entry {s.index} is {s.dtype}, not float8_e4m3fn codes")
    if dtype not in MODEL_DTYPES:
        raise TypeError(f"dtype {dtype} is not a model dtype (bf16, fp16, fp32)")
    T, H = s.T, s.H
    device = buffer.device
    o = (
        torch.empty(T, H, dtype=dtype, device=device)
        if out is None
        else _check_dest(out, "out", dtype, T, H, device)
    )
    if T == 0 or H == 0:
        return o
    use = _pick_impl(impl, device)
    if use == "triton" and H > MAX_TRITON_HIDDEN:
        if impl == "triton":
            raise ValueError(
                f"hidden size {H} exceeds the kernel's one-tile limit {MAX_TRITON_HIDDEN}"
            )
        use = "torch"
    if use == "torch":
        codes, scales = _view(buffer, layout, s.index), _view(buffer, layout, s.index + 1)
        for a, z in _row_blocks(T, H):
            o[a:z].copy_(dequantize_fp8_reference(codes[a:z], scales[a:z], dtype))
        return o
    _launch_recv(buffer, layout, s, None, None, 0.0, None, o, dtype, False, 0)
    return o


def _recv_config(T: int, H: int) -> tuple[int, int, int, int]:
    """(BLOCK, ROWS, programs, num_warps) of a receive launch."""
    block = _next_pow2(H)
    if INTERPRETED:
        rows = min(_next_pow2(-(-T // _INTERPRETER_PROGRAMS)), max(1, _INTERPRETER_TILE // block))
        programs = min(-(-T // rows), _INTERPRETER_PROGRAMS)
        return block, rows, programs, 4
    # one row per program from 2048 columns up (vLLM's choice too); small rows share a program
    rows = max(1, min(_next_pow2(T), 2048 // block))
    tile = rows * block
    warps = 4 if tile <= 2048 else 8 if tile <= 8192 else 16
    return block, rows, -(-T // rows), warps


def _launch_recv(buffer, layout, h, r, weight, eps, o, ro, dtype, norm, order_code) -> None:
    def operand(s):
        if s is None:
            return None, None
        if s.dtype == FP8:
            return _view(buffer, layout, s.index, torch.uint8), _view(buffer, layout, s.scales)
        return _view(buffer, layout, s.index), None

    hv, hs = operand(h)
    rv, rs = operand(r)
    T, H = h.T, h.H
    block, rows, programs, warps = _recv_config(T, H)
    o = ro if o is None else o
    _k._recv_norm_kernel[(programs,)](
        hv,
        hs if hs is not None else hv,
        rv if rv is not None else hv,
        rs if rs is not None else hv,
        weight if weight is not None else hv,
        o,
        ro,
        T,
        eps,
        o.stride(0),
        o.stride(1),
        ro.stride(0),
        ro.stride(1),
        H=H,
        BLOCK=block,
        LOG2=block.bit_length() - 1,
        ROWS=rows,
        DT=MODEL_DTYPES[dtype],
        HAS_RES=r is not None,
        H_FP8=hs is not None,
        R_FP8=rs is not None,
        NORM=norm,
        ORDER=order_code,
        num_warps=warps,
        **LAUNCH_OPTIONS,
    )


# ============================================================================ send


def pack_wire(
    tensors: Sequence[torch.Tensor],
    *,
    fold: tuple[int, int] | None = None,
    fp8: Sequence[int] = (),
    out: torch.Tensor | None = None,
    impl: str | None = None,
    names: Sequence[str] | None = None,
) -> tuple[torch.Tensor, WireLayout]:
    """Packs ``tensors`` into one buffer, folding and/or quantising on the way: one launch on CUDA.

    ``fold=(hidden, residual)`` (indices into ``tensors``, both [T, H], same model dtype):
    the hidden entry's slot receives ``hidden + residual`` rounded to the model dtype and the
    residual is not sent (half the activation bytes). This sum is the receiver's new residual in
    *both* orders: vLLM adds in the model dtype, flashinfer adds in fp32 and rounds, and for
    bf16 and fp16 these agree bit for bit (a sum of two values is exact in fp32's 24 bits up to
    one rounding, and fp32 has more than ``2p + 2`` bits for ``p`` = 8 or 11, so rounding fp32's
    rounded sum again gives the correctly rounded sum). So ``unpack_add_rmsnorm(...,
    residual=None)`` returns the same residual as the unfused op, and with ``order="vllm"`` the
    same output too; with ``order="flashinfer"`` the output is normalised from the rounded sum,
    not from the fp32 sum the unfused op would use: some elements differ, by at most two ulps of
    the model dtype (tested).

    ``fp8=(i, ...)``: those [T, H] tensors (bf16 / fp16 / fp32) travel as float8_e4m3fn codes
    with one fp32 scale per row (:func:`quantize_fp8_reference`); the hidden entry of ``fold``
    may be one of them (its folded sum is quantised). **Lossy**: e4m3 keeps 3 mantissa bits, so
    an element within e4m3's normal range of its row scale is off by up to 2**-4 (6.25%) of
    itself, and an element below 2**-6 of its row's amax by up to 2**-10 of the amax (tested);
    on the reference model's boundary activations that is ~2.6% relative error (Frobenius) and
    ~5% of argmax tokens changed (bench/NOTES.md). Never a default: not for anything the model does
    not already tolerate in fp8 (logits, sampled token ids, positions, anything integer), not
    where a pipeline must reproduce a one-process run bit for bit, not for rows whose amax is
    set by a few outlier channels unless the small channels may lose their precision, and only
    with a receiver that knows the entry is fp8 (the transport's header must say so).

    Returns ``(buffer, wire)``: ``wire.layout`` is the buffer's layout, ``wire.entries`` maps
    each tensor to its entry (see :class:`WireLayout`). Tensors that are not folded or quantised
    are copied as they are; a non-contiguous one is gathered with ``.contiguous()`` first.
    ``out`` is an optional contiguous, ``wire.layout.align``-aligned uint8 buffer of at least
    ``wire.layout.nbytes`` bytes; the result is its prefix.
    """
    tensors = list(tensors)
    device = None
    for i, t in enumerate(tensors):
        label = f"entry {i}" if names is None else f"key {names[i]!r}"
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{label}: expected a torch.Tensor, got {type(t).__name__}")
        if device is None:
            device = t.device
        elif t.device != device:
            raise ValueError(f"{label}: tensor is on {t.device} but entry 0 is on {device}")
    wire = plan_wire([(t.dtype, t.shape) for t in tensors], fold=fold, fp8=fp8)
    layout = wire.layout
    device = device if device is not None else torch.device("cpu")
    if out is None:
        out = torch.empty(layout.nbytes, dtype=torch.uint8, device=device)
    else:
        try:
            _check_buffer(out, layout, device)
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"out: {exc}") from None
    out = out[: layout.nbytes]
    if _pick_impl(impl, device) == "torch":
        _pack_wire_torch(tensors, wire, out)
    else:
        _pack_wire_triton(tensors, wire, out)
    return out, wire


def pack_wire_reference(
    tensors: Sequence[torch.Tensor],
    *,
    fold: tuple[int, int] | None = None,
    fp8: Sequence[int] = (),
) -> tuple[torch.Tensor, WireLayout]:
    """What :func:`pack_wire` computes, unfused: the add in torch, then the quantiser, then
    :func:`pipepack.kernels.pack_reference` of the wire tensors (padding bytes zero)."""
    from .ops import pack_reference

    tensors = list(tensors)
    wire = plan_wire([(t.dtype, t.shape) for t in tensors], fold=fold, fp8=fp8)
    parts = []
    for i, t in enumerate(tensors):
        if wire.entries[i] is None:
            continue
        if wire.fold is not None and i == wire.fold[0]:
            t = t + tensors[wire.fold[1]]
        if wire.fp8[i]:
            parts += list(quantize_fp8_reference(t))
        else:
            parts.append(t)
    return pack_reference(parts, wire.layout), wire


def _pack_wire_torch(tensors, wire: WireLayout, out: torch.Tensor) -> None:
    views = unpack(out, wire.layout)
    for i, t in enumerate(tensors):
        e = wire.entries[i]
        if e is None:
            continue
        folded = wire.fold is not None and i == wire.fold[0]
        if wire.fp8[i] or folded:  # row blocks, in this thread (see _SERIAL_NUMEL)
            b = tensors[wire.fold[1]] if folded else None
            for a, z in _row_blocks(*t.shape):
                if not wire.fp8[i]:
                    torch.add(t[a:z], b[a:z], out=views[e][a:z])
                    continue
                q, s = quantize_fp8_reference(t[a:z] if b is None else t[a:z] + b[a:z])
                views[e][a:z].copy_(q)
                views[e + 1][a:z].copy_(s)
        elif t.numel():
            views[e].copy_(t)


class _Plans:
    """A small LRU of send tables keyed by the layout and the sources' pointers and strides."""

    def __init__(self, capacity: int = 128) -> None:
        self.capacity = capacity
        self.items: OrderedDict = OrderedDict()

    def get(self, key):
        v = self.items.get(key)
        if v is not None:
            self.items.move_to_end(key)
        return v

    def put(self, key, value) -> None:
        self.items[key] = value
        if len(self.items) > self.capacity:
            self.items.popitem(last=False)


_PLANS = _Plans()


def _row(mode, dt=0, n=0, a=0, dst=0, b=0, H=0, a_rs=0, b_rs=0, a_cs=0, b_cs=0, sdst=0, flags=0):
    return [mode, dt, n, a, dst, b, H, a_rs, b_rs, a_cs, b_cs, sdst, flags]


def _pack_wire_triton(tensors, wire: WireLayout, out: torch.Tensor) -> None:
    key = (wire, out.device, *((t.data_ptr(), t.stride()) for t in tensors))
    plan = _PLANS.get(key)
    if plan is None:
        plan = _wire_plan(tensors, wire, out.device)
        if plan[3] is None:
            _PLANS.put(key, plan)
    table, grid, qblock, keep = plan
    if grid:
        _k._pack_wire_kernel[(grid,)](
            table,
            out.data_ptr(),
            ROW_LEN=_k.ROW,
            VBLOCK=_VBLOCK,
            BBLOCK=_BBLOCK,
            FBLOCK=_FBLOCK,
            QBLOCK=qblock,
            num_warps=4,
            **LAUNCH_OPTIONS,
        )
    del keep  # staged sources lived until the launch was enqueued (stream-ordered after it)


def _wire_plan(tensors, wire: WireLayout, device):
    """(table, grid, QBLOCK, staged tensors or None): block codes, then the segment rows."""
    rows: list[list[int]] = []
    blocks: list[int] = []
    keep: list[torch.Tensor] = []
    qblock = 16
    entries = wire.layout.entries
    for i, t in enumerate(tensors):
        ei = wire.entries[i]
        if ei is None or t.numel() == 0:
            continue
        e = entries[ei]
        folded = wire.fold is not None and i == wire.fold[0]
        b = tensors[wire.fold[1]] if folded else None
        if folded or wire.fp8[i]:
            T, H = t.shape
            dt = MODEL_DTYPES[t.dtype]
            contig = t.is_contiguous() and (b is None or b.is_contiguous())
            aligned = t.data_ptr() % 16 == 0 and (b is None or b.data_ptr() % 16 == 0)
            common = dict(
                dt=dt,
                n=T,
                a=t.data_ptr(),
                dst=e.offset,
                b=0 if b is None else b.data_ptr(),
                H=H,
                a_rs=t.stride(0),
                b_rs=0 if b is None else b.stride(0),
                a_cs=t.stride(1),
                b_cs=0 if b is None else b.stride(1),
            )
            if wire.fp8[i]:
                rows.append(
                    _row(_k.MODE_QUANT, sdst=entries[ei + 1].offset, flags=int(folded), **common)
                )
                blocks.append(T)
                qblock = max(qblock, _next_pow2(H))
            else:
                flags = _k.FLAG_CONTIG if contig and aligned else 0
                rows.append(_row(_k.MODE_FOLD, flags=flags, **common))
                blocks.append(-(-T * H // _FBLOCK))
            continue
        if not t.is_contiguous():
            t = t.contiguous()
            keep.append(t)
        src, nbytes, dst = t.data_ptr(), e.nbytes, e.offset
        body = nbytes // 16 * 16 if src % 16 == 0 else 0
        if body:
            rows.append(_row(_k.MODE_VEC, n=body // 4, a=src, dst=dst))
            blocks.append(-(-body // 4 // _VBLOCK))
        if nbytes > body:
            rows.append(_row(_k.MODE_BYTES, n=nbytes - body, a=src + body, dst=dst + body))
            blocks.append(-(-(nbytes - body) // _BBLOCK))
    codes: list[int] = []
    for seg, nb in enumerate(blocks):
        codes.extend(range(seg << 32, (seg << 32) + nb))
    grid = len(codes)
    if not grid:
        return None, 0, qblock, keep or None
    flat = codes
    for r in rows:
        flat.extend(r)
    table = torch.tensor(flat, dtype=torch.int64)
    if device.type != "cpu":
        table = table.to(device, non_blocking=True)
    return table, grid, qblock, keep or None
