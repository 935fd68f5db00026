"""Differential fuzz of every kernel op and path against the pure-torch references.

Each case draws a few tensors (every supported dtype; 0-dim, empty and odd shapes) and, for
each of them, a source view and a destination view built from up to two of: a slice at a
random start along a random dim (column slices included), a step slice, a permutation
(transposes), an expand (sources only), a destination larger in dim 0 (destinations only).
Every op then runs on both paths (``impl="torch"`` and ``impl="triton"``, the kernel running
under the Triton interpreter on CPU) and on the reference, each into its own canary-filled
copy of the same arenas, and the arenas must match byte for byte: the right bytes in every
destination and not one byte written outside it.

The default run is 400 cases with a fixed seed: a bug hit by 1 case in 100 escapes it with
probability 0.99**400 < 2%. ``-m slow`` runs 4000 more cases with other seeds, some with
tensors of whole tiles (the tiled transpose path; too slow for the interpreter by default).
``PIPEPACK_FUZZ_CASES`` / ``PIPEPACK_FUZZ_SEED`` override both (to chase one failure, run the
case id the failure names with ``-k``).
"""

from __future__ import annotations

import math
import os
import random
import re
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch

import pipepack.kernels as K
from pipepack.kernels import SUPPORTED_DTYPES, plan_layout

CANARY = 0xA5


@pytest.fixture(autouse=True)
def _fresh_plans():
    """Every test plans its own copies: a plan cached by an earlier test (or inherited by a
    forked test worker, as mutation testing runs them) would hide the planning code from it."""
    K.clear_plan_cache()
    yield


SEED = int(os.environ.get("PIPEPACK_FUZZ_SEED", 20261201))
N_CASES = int(os.environ.get("PIPEPACK_FUZZ_CASES", 400))
N_SLOW = 4000
DTYPES = sorted(SUPPORTED_DTYPES, key=str)
OPS = ("pack", "unpack_into", "reassemble", "reassemble_into")
IMPLS = ("torch", "triton")

ViewOp = Callable[[torch.Tensor], torch.Tensor]


# ----------------------------------------------------------------------------- random views


def _shape(rng: random.Random, world: int, big: bool) -> tuple[int, ...]:
    if big and rng.random() < 0.03:  # whole tiles: a transpose may take the tiled path
        dims = [rng.choice([64, 80]), rng.choice([64, 72])]
        return tuple(dims) if rng.random() < 0.7 else (2, *dims)
    ndim = rng.choice([0, 1, 1, 2, 2, 2, 3, 3, 4])
    if ndim == 0:
        return ()
    if ndim == 1:
        n = rng.choice([0, 1, 2, 3, 5, 7, 8, 16, 17, 33, 64, 100, 255, 301])
        return (n * world if rng.random() < 0.6 else n,)
    dims = [rng.choice([1, 2, 3, 4, 5, 6, 7, 8, 9, 12, 16]) for _ in range(ndim)]
    while math.prod(dims) > 600:  # small enough for the interpreter
        dims[rng.randrange(ndim)] //= 2
    if rng.random() < 0.05:
        dims[rng.randrange(ndim)] = 0
    if rng.random() < 0.5:  # power-of-two rows, as hidden sizes are
        dims[-1] = rng.choice([2, 4, 8, 16])
    if rng.random() < 0.4:  # TP-sliceable by whole rows: the leading dim a multiple of world
        dims[0] = max(1, dims[0] // world) * world
    return tuple(dims)


@dataclass(frozen=True)
class ViewSpec:
    """``op(base)`` has the target shape; ``base`` is a contiguous tensor of ``base_shape``."""

    base_shape: tuple[int, ...]
    op: ViewOp
    what: str


def _one_view(rng: random.Random, shape: tuple[int, ...], *, source: bool) -> ViewSpec:
    """One view step: a base shape and how to get ``shape`` out of it."""
    nd = len(shape)
    kinds = ["slice", "step", "permute", "expand" if source else "dim0"]
    kind = rng.choice(kinds)
    if not source and rng.random() < 0.3:
        kind = "slice"  # column slices of a wider destination: the common strided target
    if nd == 0:
        return ViewSpec(shape, lambda t: t, "id")
    if kind == "slice":  # a slice at a random start, most often of the last dim (columns)
        d = nd - 1 if rng.random() < 0.6 else rng.randrange(nd)
        # a random width, or one that keeps rows aligned (a half of a wider tensor)
        extra = rng.choice([rng.randint(1, 9), max(shape[d], 1), 8])
        start = rng.choice([0, rng.randint(0, extra), extra])
        base = list(shape)
        base[d] += extra
        idx = [slice(None)] * d + [slice(start, start + shape[d])]
        return ViewSpec(tuple(base), lambda t, i=tuple(idx): t[i], f"slice{d}@{start}")
    if kind == "step":
        d = rng.randrange(nd)
        step = rng.choice([2, 3])
        start = rng.randint(0, step - 1)
        base = list(shape)
        base[d] = shape[d] * step + start
        idx = [slice(None)] * d + [slice(start, start + shape[d] * step, step)]
        return ViewSpec(tuple(base), lambda t, i=tuple(idx): t[i], f"step{d}:{step}@{start}")
    if kind == "permute" and nd >= 2:
        perm = list(range(nd))
        while perm == sorted(perm):
            rng.shuffle(perm)
        inv = [perm.index(i) for i in range(nd)]
        base = tuple(shape[p] for p in perm)  # base.permute(inv) has `shape`
        return ViewSpec(base, lambda t, q=tuple(inv): t.permute(*q), f"perm{inv}")
    if kind == "expand":
        base = tuple(1 if rng.random() < 0.5 else s for s in shape)
        return ViewSpec(base, lambda t, s=shape: t.expand(*s), f"expand{base}")
    if kind == "dim0":  # a static destination larger in dim 0: the op gets the whole tensor
        extra = rng.randint(1, 4)
        return ViewSpec((shape[0] + extra, *shape[1:]), lambda t: t, f"dim0+{extra}")
    return ViewSpec(shape, lambda t: t, "id")


def _view(rng: random.Random, shape: tuple[int, ...], *, source: bool) -> ViewSpec:
    """Up to two view steps composed (a transposed column slice, a stepped permute, ...)."""
    depth = rng.choice([0, 1, 1, 2])
    ops: list[ViewOp] = []
    whats: list[str] = []
    cur = shape
    for i in range(depth):
        # a larger dim 0 only as the outermost step: the op gets the whole tensor
        step = _one_view(rng, cur, source=source)
        if step.what.startswith("dim0") and i > 0:
            continue
        ops.append(step.op)
        whats.append(step.what)
        cur = step.base_shape

    def apply(t: torch.Tensor) -> torch.Tensor:
        for op in reversed(ops):
            t = op(t)
        return t

    return ViewSpec(cur, apply, "/".join(whats) or "contiguous")


def _random_bytes(rng: random.Random, shape, dtype: torch.dtype) -> torch.Tensor:
    """Random BYTES as ``dtype`` (NaN payloads, -0.0, denormals); bool gets 0/1 only."""
    gen = torch.Generator().manual_seed(rng.getrandbits(63))
    n = math.prod(shape)
    if dtype == torch.bool:
        return torch.randint(0, 2, (n,), generator=gen, dtype=torch.uint8).bool().view(shape)
    raw = torch.randint(0, 256, (n * dtype.itemsize,), generator=gen, dtype=torch.uint8)
    return raw.view(dtype).view(shape)


# ----------------------------------------------------------------------------- arenas


@dataclass(frozen=True)
class Slot:
    """A view of ``base_shape`` elements at ``front`` bytes into a canary arena of ``size``."""

    size: int
    front: int
    dtype: torch.dtype
    base_shape: tuple[int, ...]
    op: ViewOp

    @staticmethod
    def draw(rng: random.Random, dtype: torch.dtype, spec: ViewSpec) -> Slot:
        nbytes = math.prod(spec.base_shape) * dtype.itemsize
        front = rng.randrange(0, 64, dtype.itemsize)  # every alignment an element can have
        back = rng.randint(0, 24)
        return Slot(front + nbytes + back, front, dtype, spec.base_shape, spec.op)

    def make(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(the arena, the view into it)."""
        arena = torch.full((self.size,), CANARY, dtype=torch.uint8)
        nbytes = math.prod(self.base_shape) * self.dtype.itemsize
        typed = arena[self.front : self.front + nbytes].view(self.dtype).view(self.base_shape)
        return arena, self.op(typed)


def _aligned(data: torch.Tensor, rng: random.Random, align: int = 16) -> torch.Tensor:
    """``data`` (1-D uint8) copied to a random ``align``-aligned offset of a larger tensor,
    with canary bytes around it."""
    front = align * rng.randint(0, 3)
    big = torch.full((front + data.numel() + 64,), CANARY, dtype=torch.uint8)
    pad = (-big.data_ptr() - front) % align  # the allocator's own alignment may be smaller
    out = big[pad + front : pad + front + data.numel()]
    out.copy_(data)
    return out


# ----------------------------------------------------------------------------- one case


@dataclass
class Case:
    """Everything one case needs, drawn from one seed: tensors, views, world and flags."""

    seed: int
    world: int
    values: list[torch.Tensor]  # contiguous ground truth
    sources: list[torch.Tensor]  # strided views holding the same elements, for pack
    source_whats: list[str]
    dests: list[Slot]
    dest_whats: list[str]
    flags: tuple[bool, ...]
    out_front: int  # 16-byte multiple: where pack/reassemble write in their arena
    use_out: bool

    @staticmethod
    def draw(seed: int, big: bool = False) -> Case:
        rng = random.Random(seed)
        world = rng.choice([1, 2, 2, 3, 4, 4])
        n = rng.choice([1, 1, 2, 2, 3, 4])
        values, sources, swhats, dests, dwhats = [], [], [], [], []
        for _ in range(n):
            dtype = rng.choice(DTYPES)
            shape = _shape(rng, world, big)
            value = _random_bytes(rng, shape, dtype)
            spec = _view(rng, shape, source=True)
            base = torch.zeros(spec.base_shape, dtype=dtype)
            view = spec.op(base)
            # write the value through the view (an expand repeats one element: use its
            # first occurrence as the value, so what the view reads is what we expect)
            if "expand" in spec.what:
                base.view(torch.uint8).copy_(
                    _random_bytes(rng, spec.base_shape, dtype).view(torch.uint8)
                )
                value = torch.empty(shape, dtype=dtype)
                value.copy_(view)
            elif view.numel():
                view.copy_(value)
            values.append(value)
            sources.append(view)
            swhats.append(spec.what)
            dspec = _view(rng, shape, source=False)
            dests.append(Slot.draw(rng, dtype, dspec))
            dwhats.append(dspec.what)
        flags = tuple(v.numel() % world == 0 and rng.random() < 0.8 for v in values)
        return Case(
            seed,
            world,
            values,
            sources,
            swhats,
            dests,
            dwhats,
            flags,
            16 * rng.randint(0, 3),
            rng.random() < 0.8,
        )

    def describe(self) -> str:
        parts = [
            f"{v.dtype}{tuple(v.shape)} src[{s}] dst[{d}]{' sliced' if f else ''}"
            for v, s, d, f in zip(self.values, self.source_whats, self.dest_whats, self.flags)
        ]
        return f"seed {self.seed}, world {self.world}: " + "; ".join(parts)


def _run(case: Case, op: str, impl: str) -> list[torch.Tensor]:
    """Runs ``op`` on ``impl`` ("torch", "triton" or "reference"); returns every arena."""
    rng = random.Random(case.seed ^ 0x5EED)  # the same buffer placement for every impl
    layout = plan_layout(case.values)
    if op == "pack":
        arena = torch.full((case.out_front + layout.nbytes + 48,), CANARY, dtype=torch.uint8)
        pad = -arena.data_ptr() % 16
        out = arena[pad + case.out_front : pad + case.out_front + layout.nbytes]
        if impl == "reference":
            ref = K.pack_reference(case.values, layout)
            if not case.use_out:
                return [ref[e.offset : e.offset + e.nbytes] for e in layout.entries]
            for e in layout.entries:
                out[e.offset : e.offset + e.nbytes] = ref[e.offset : e.offset + e.nbytes]
            return [arena]
        if case.use_out:
            got = K.pack(case.sources, out=out, layout=layout, impl=impl)
            assert got.data_ptr() == out.data_ptr()
            return [arena]
        got = K.pack(case.sources, impl=impl)
        return [got[e.offset : e.offset + e.nbytes] for e in layout.entries]

    if op == "unpack_into":
        buf = _aligned(K.pack_reference(case.values, layout), rng)
        arenas, outs = zip(*(d.make() for d in case.dests)) if case.dests else ((), ())
        if impl == "reference":
            K.unpack_into_reference(buf, layout, outs)
        else:
            K.unpack_into(buf, layout, outs, impl=impl)
            # the zero-copy views of the same buffer
            for v, want in zip(K.unpack(buf, layout), case.values):
                assert v.dtype == want.dtype and v.shape == want.shape
                assert torch.equal(
                    v.reshape(-1).view(torch.uint8), want.reshape(-1).view(torch.uint8)
                )
        return list(arenas)

    world, flags = case.world, case.flags
    part_layout = layout.sliced(world, flags)
    whole = [v for v, f in zip(case.values, flags) if not f]
    parts = [
        K.pack_reference(
            [v.reshape(world, -1)[r] for v, f in zip(case.values, flags) if f] + whole,
            part_layout,
        )
        for r in range(world)
    ]
    row = layout.sliced_nbytes(world, flags)
    gathered = _aligned(torch.cat([p[:row] for p in parts]), rng).view(world, row)
    part = None if all(flags) else _aligned(parts[rng.randrange(world)], rng)
    kw = {"sliced": flags, "part": part}
    if op == "reassemble":
        if impl == "reference":
            full = K.reassemble_reference(gathered, layout, **kw)
            arena = torch.full((case.out_front + layout.nbytes + 48,), CANARY, dtype=torch.uint8)
            pad = -arena.data_ptr() % 16
            out = arena[pad + case.out_front : pad + case.out_front + layout.nbytes]
            for e, t in zip(layout.entries, full):
                out[e.offset : e.offset + e.nbytes] = t.reshape(-1).view(torch.uint8)
            return [arena] if case.use_out else [t.reshape(-1).view(torch.uint8) for t in full]
        if case.use_out:
            arena = torch.full((case.out_front + layout.nbytes + 48,), CANARY, dtype=torch.uint8)
            pad = -arena.data_ptr() % 16
            out = arena[pad + case.out_front : pad + case.out_front + layout.nbytes]
            K.reassemble(gathered, layout, out=out, impl=impl, **kw)
            return [arena]
        return [
            t.reshape(-1).view(torch.uint8) for t in K.reassemble(gathered, layout, impl=impl, **kw)
        ]

    arenas, outs = zip(*(d.make() for d in case.dests)) if case.dests else ((), ())
    if impl == "reference":
        for o, full in zip(outs, K.reassemble_reference(gathered, layout, **kw)):
            (o if o.shape == full.shape else o[: full.shape[0]]).copy_(full)
    else:
        K.reassemble_into(gathered, layout, outs, impl=impl, **kw)
    return list(arenas)


def _check_case(seed: int, big: bool = False) -> None:
    case = Case.draw(seed, big)
    for op in OPS:
        want = _run(case, op, "reference")
        for impl in IMPLS:
            got = _run(case, op, impl)
            assert len(got) == len(want)
            for i, (g, w) in enumerate(zip(got, want)):
                bad = (g != w).nonzero().reshape(-1)
                assert bad.numel() == 0, (
                    f"{op} impl={impl}: arena {i} differs from the reference in {bad.numel()} "
                    f"bytes (first at byte {int(bad[0])}: {int(g[bad[0]]):#04x} instead of "
                    f"{int(w[bad[0]]):#04x}); {case.describe()}"
                )


# ----------------------------------------------------------------------------- tests


pytestmark = pytest.mark.filterwarnings("ignore:ComplexHalf support is experimental")


@pytest.mark.parametrize("seed", [SEED + i for i in range(N_CASES)])
def test_every_op_and_path_matches_the_reference(seed):
    _check_case(seed)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [SEED * 7919 + i for i in range(N_SLOW)])
def test_every_op_and_path_matches_the_reference_long(seed):
    """The long run also draws tensors of whole 64-word tiles (the tiled transpose path)."""
    _check_case(seed, big=True)


def test_the_generator_covers_what_it_claims():
    """The fuzz is only as good as its cases: every dtype, world size, view kind and shape
    class this module promises appears in the default run."""
    dtypes, worlds, kinds = set(), set(), set()
    zero_dim = empty = sliced_whole_mix = 0
    for i in range(N_CASES):
        case = Case.draw(SEED + i)
        worlds.add(case.world)
        for v, s, d in zip(case.values, case.source_whats, case.dest_whats):
            dtypes.add(v.dtype)
            zero_dim += v.dim() == 0
            empty += v.numel() == 0
            for w in (s + "/" + d).split("/"):
                kinds.add(re.match(r"[a-z]*", w).group())
        sliced_whole_mix += any(case.flags) and not all(case.flags)
    assert dtypes == set(DTYPES)
    assert worlds == {1, 2, 3, 4}
    assert {"slice", "step", "perm", "expand", "dim", "contiguous"} <= kinds, kinds
    assert min(zero_dim, empty, sliced_whole_mix) >= N_CASES // 50
