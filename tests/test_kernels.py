"""Kernel tests of ``pipepack.kernels``: layouts, pack / unpack / reassembly, bit for bit.

Every copy is checked on its bytes (``x.reshape(-1).view(torch.uint8)``), never with float
equality, so NaN payloads, -0.0 and denormals must survive. The ``impl`` fixture runs each op
test on the pure-torch path and on the Triton kernel; without CUDA the kernel runs on CPU
tensors under the Triton interpreter, which does not catch out-of-bounds stores, so every
output lies inside a larger canary-filled (0xA5) tensor whose untouched bytes are checked.

Interpreter budget: ~1 ms per 16 KiB block program, ~6 ms per strided 1024-word program;
each test here launches at most a few hundred programs.
"""

from __future__ import annotations

import dataclasses
import math
import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import pytest
import torch

import pipepack.kernels as K
from pipepack.kernels import _copy, plan_layout

CANARY = 0xA5


@pytest.fixture(autouse=True)
def _fresh_plans():
    """Every test plans its own copies: a plan cached by an earlier test (or inherited by a
    forked test worker, as mutation testing runs them) would hide the planning code from it."""
    K.clear_plan_cache()
    yield


ALL_DTYPES = [
    torch.bfloat16,
    torch.float16,
    torch.float32,
    torch.float64,
    torch.int8,
    torch.int16,
    torch.int32,
    torch.int64,
    torch.uint8,
    torch.bool,
    torch.float8_e4m3fn,
    torch.float8_e5m2,
    torch.complex64,
    torch.complex128,
]
# one per word size the strided kernel picks (1, 2, 4, 8 bytes) plus a 16-byte element
STRIDED_DTYPES = [torch.int8, torch.bfloat16, torch.float32, torch.float64, torch.complex128]
# empty, 0-dim, one element, odd sizes (tails that are not whole 16-byte words)
ODD_SHAPES = [(0, 5), (), (1,), (6,), (42,), (123,), (431,), (7, 5)]


# ----------------------------------------------------------------------------- helpers


def _bytes(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bytes in logical order (0-dim tensors need the reshape)."""
    return t.reshape(-1).view(torch.uint8)


def _random_tensor(
    shape: Sequence[int], dtype: torch.dtype, device: str | torch.device = "cpu"
) -> torch.Tensor:
    """Random BYTES reinterpreted as ``dtype``: NaN payloads, -0.0 and denormals included.

    bool gets 0/1 only: other byte values are not valid bools and torch may normalise them.
    """
    if dtype == torch.bool:
        return torch.randint(0, 2, tuple(shape), dtype=torch.uint8).bool().to(device)
    raw = torch.randint(0, 256, (math.prod(shape) * dtype.itemsize,), dtype=torch.uint8)
    return raw.view(dtype).reshape(shape).to(device)


def _canary(shape: Sequence[int], dtype: torch.dtype, device) -> torch.Tensor:
    """A tensor every byte of which is ``CANARY``."""
    n = math.prod(shape) * dtype.itemsize
    return torch.full((n,), CANARY, dtype=torch.uint8, device=device).view(dtype).reshape(shape)


def _byte_twin(t: torch.Tensor) -> torch.Tensor:
    """A contiguous ``t`` as uint8 with one extra trailing dim holding each element's bytes.

    Indexing the leading dims of the twin selects the same elements' bytes as indexing ``t``,
    with no dtype-level copy in between: the ground truth for strided views.
    """
    return t.view(torch.uint8).view(*t.shape, t.element_size())


def _from_bits(bits: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
    """A tensor with exactly these bit patterns (unsigned ints of the dtype's width)."""
    if dtype.is_complex:
        part = torch.float32 if dtype == torch.complex64 else torch.float64
        return _from_bits(bits, part).view(dtype)
    width = 8 * dtype.itemsize
    signed = [b - (1 << width) if b >= 1 << (width - 1) else b for b in bits]
    int_dtype = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[dtype.itemsize]
    return torch.tensor(signed, dtype=int_dtype).view(dtype)


# -0.0, quiet NaN with a payload, signalling NaN, negative NaN with a payload, the smallest
# denormal, -inf (fp8 e4m3fn has no inf: its NaNs are 0x7F / 0xFF)
SPECIAL_BITS = {
    torch.float16: [0x8000, 0x7E01, 0x7C01, 0xFE55, 0x0001, 0xFC00],
    torch.bfloat16: [0x8000, 0x7FC1, 0x7F81, 0xFFAA, 0x0001, 0xFF80],
    torch.float32: [0x80000000, 0x7FC00001, 0x7F800001, 0xFFC12345, 0x00000001, 0xFF800000],
    torch.float64: [
        0x8000000000000000,
        0x7FF8000000000001,
        0x7FF0000000000001,
        0xFFF8DEADBEEF0001,
        0x0000000000000001,
        0xFFF0000000000000,
    ],
    torch.float8_e4m3fn: [0x80, 0x7F, 0xFF, 0x01, 0x81, 0x7E],
    torch.float8_e5m2: [0x80, 0x7D, 0x7E, 0xFF, 0x01, 0xFC],
}
SPECIAL_BITS[torch.complex64] = SPECIAL_BITS[torch.float32]
SPECIAL_BITS[torch.complex128] = SPECIAL_BITS[torch.float64]


def _special_tensor(dtype: torch.dtype, device) -> torch.Tensor:
    """Every special pattern, each next to every other (so strided views mix them)."""
    bits = SPECIAL_BITS[dtype]
    return _from_bits(bits + bits[::-1] + bits, dtype).to(device)


def _entry_mask(layout: K.Layout) -> torch.Tensor:
    """True on the bytes of ``[0, layout.nbytes)`` that belong to an entry."""
    mask = torch.zeros(layout.nbytes, dtype=torch.bool)
    for e in layout.entries:
        mask[e.offset : e.offset + e.nbytes] = True
    return mask


def _assert_same_bytes(got: torch.Tensor, want: torch.Tensor) -> None:
    got, want = got.cpu(), want.cpu()
    assert got.shape == want.shape
    bad = (got != want).nonzero()
    assert bad.numel() == 0, f"{bad.shape[0]} bytes differ, first at {bad[0].tolist()}"


def _assert_entries(buf: torch.Tensor, layout: K.Layout, tensors: Sequence[torch.Tensor]) -> None:
    """Each entry's bytes of ``buf`` are the tensor's bytes."""
    for e, t in zip(layout.entries, tensors):
        _assert_same_bytes(buf[e.offset : e.offset + e.nbytes], _bytes(t))


def _assert_round_trip(tensors: Sequence[torch.Tensor], impl: str, device) -> None:
    """pack puts every tensor's bytes at its entry; unpack_into brings them back exactly."""
    layout = plan_layout(tensors)
    buf = K.pack(tensors, impl=impl)
    _assert_entries(buf, layout, tensors)
    outs = [_canary(t.shape, t.dtype, device) for t in tensors]
    K.unpack_into(buf, layout, outs, impl=impl)
    for o, t in zip(outs, tensors):
        _assert_same_bytes(_bytes(o), _bytes(t))


def _assert_untouched(region: torch.Tensor) -> None:
    assert region.numel() == 0 or bool((region.cpu() == CANARY).all()), "a canary byte changed"


# Views that exercise the strided gather/scatter. Each op works on a tensor and on its byte
# twin alike (the twin's extra trailing dim rides along), so the twin gives the expected bytes.
ViewOp = Callable[[torch.Tensor], torch.Tensor]
VIEWS: dict[str, tuple[tuple[int, ...], ViewOp]] = {
    "transpose": ((37, 9), lambda t: t.transpose(0, 1)),
    "step_slice": ((11, 42), lambda t: t[:, ::3]),
    "row_step": ((10, 7), lambda t: t[::2]),
    "column_slice": ((6, 20), lambda t: t[:, 3:14]),
    "misaligned_1d": ((50,), lambda t: t[3:]),
    "expand_rows": ((1, 43), lambda t: t.expand(5, *t.shape[1:])),
    "expand_inner": ((6, 1), lambda t: t.expand(6, 7, *t.shape[2:])),
    "permute_4d": ((3, 4, 5, 6), lambda t: t.permute(3, 1, 0, 2, *range(4, t.dim()))),
    # five non-mergeable dims: more than the kernel addresses, so the op falls back internally
    "permute_5d": ((2, 3, 4, 3, 5), lambda t: t.permute(4, 2, 0, 3, 1, *range(5, t.dim()))),
}
WRITABLE_VIEWS = [k for k in VIEWS if not k.startswith("expand")]


def _strided_source(name: str, dtype: torch.dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(strided view of a random tensor, the view's expected bytes from the byte twin)."""
    shape, op = VIEWS[name]
    base = _random_tensor(shape, dtype, device)
    return op(base), op(_byte_twin(base)).reshape(-1)


@dataclass(frozen=True)
class Dest:
    """A destination that is a view of a larger canary-filled tensor.

    ``view`` is what the op gets; ``region`` is the part the entry must land in (they differ
    for a static buffer larger in dim 0); every other byte of ``base`` must stay canary.
    """

    base: torch.Tensor
    view: torch.Tensor
    region: ViewOp

    @staticmethod
    def make(shape, dtype, device, view: ViewOp, region: ViewOp | None = None) -> Dest:
        base = _canary(shape, dtype, device)
        return Dest(base, view(base), region or view)

    def check(self, value: torch.Tensor) -> None:
        """The region holds ``value``'s bytes; everything else in ``base`` is canary."""
        want = _byte_twin(_canary(self.base.shape, self.base.dtype, "cpu"))
        region = self.region(want)
        region.copy_(_bytes(value.cpu().contiguous()).view(region.shape))
        _assert_same_bytes(_byte_twin(self.base), want)


def _canary_dests(device) -> tuple[list[torch.Tensor], list[Dest]]:
    """Entries (as random tensors) and the awkward destinations they are copied into."""
    specs = [
        # a column slice of a wider tensor
        ((5, 7), torch.float32, (5, 20), lambda t: t[:, 4:11], None),
        # every other row
        ((5, 6), torch.bfloat16, (10, 6), lambda t: t[::2], None),
        # a static buffer larger in dim 0: rows after 6 stay canary
        ((6, 4), torch.int16, (9, 4), lambda t: t, lambda t: t[:6]),
        # contiguous but at an odd address, odd length
        ((31,), torch.int8, (40,), lambda t: t[3:34], None),
        # a larger static buffer that is also a column slice
        ((3, 5), torch.float64, (8, 9), lambda t: t[:, 2:7], lambda t: t[:3, 2:7]),
        # the fallback path (five non-mergeable dims)
        ((5, 4, 2, 3, 3), torch.float16, (2, 3, 4, 3, 5), VIEWS["permute_5d"][1], None),
        # empty entry into a larger static buffer: nothing may be written
        ((0, 3), torch.float32, (4, 3), lambda t: t, lambda t: t[:0]),
    ]
    values = [_random_tensor(shape, dtype, device) for shape, dtype, *_ in specs]
    dests = [Dest.make(base, dtype, device, view, region) for _, dtype, base, view, region in specs]
    return values, dests


def _tp_gather(
    tensors: Sequence[torch.Tensor], world: int, flags: Sequence[bool]
) -> tuple[K.Layout, torch.Tensor, list[torch.Tensor]]:
    """Simulates ``world`` ranks: each packs its part, then the sliced prefixes are gathered.

    Parts come from ``pack_reference`` so the inputs do not depend on the code under test.
    Returns the full layout, the ``[world, sliced_nbytes]`` gathered buffer and every rank's
    part buffer (sliced entries first, then the whole ones, as ``Layout.sliced`` orders them).
    """
    layout = plan_layout(tensors)
    part_layout = layout.sliced(world, flags)
    whole = [t for t, f in zip(tensors, flags) if not f]
    parts = [
        K.pack_reference(
            [t.reshape(world, -1)[r] for t, f in zip(tensors, flags) if f] + whole, part_layout
        )
        for r in range(world)
    ]
    row = layout.sliced_nbytes(world, flags)
    gathered = torch.stack([p[:row] for p in parts])
    return layout, gathered, parts


def _tp_tensors(device) -> list[torch.Tensor]:
    return [
        _random_tensor((8, 6), torch.bfloat16, device),
        _random_tensor((4, 3, 2), torch.float32, device),
        _random_tensor((12,), torch.int8, device),  # 3-byte slices at W=4
        _random_tensor((4,), torch.float64, device),
        _random_tensor((2, 2), torch.complex64, device),
        _random_tensor((0, 3), torch.float32, device),  # empty, before other entries
        _random_tensor((), torch.float32, device),  # divisible by W=1 only
        _random_tensor((7, 3), torch.int16, device),  # odd numel
    ]


def _flags(tensors: Sequence[torch.Tensor], world: int, pattern: str) -> tuple[bool, ...]:
    divisible = [t.numel() % world == 0 for t in tensors]
    if pattern == "divisible":
        return tuple(divisible)
    if pattern == "mixed":  # every third entry whole even where it could be sliced
        return tuple(d and i % 3 != 1 for i, d in enumerate(divisible))
    return (False,) * len(tensors)


# ----------------------------------------------------------------------------- layout


@pytest.mark.parametrize("align", [16, 64])
def test_layout_offsets_and_total_are_aligned_and_tight(align):
    shapes = [(3,), (), (0, 4), (5, 7), (1,), (17,)]
    dtypes = [torch.int8, torch.float64, torch.float32, torch.bfloat16, torch.bool, torch.int16]
    tensors = [torch.zeros(s, dtype=d) for s, d in zip(shapes, dtypes)]
    layout = plan_layout(tensors, align=align)

    assert layout.align == align and len(layout) == len(tensors)
    end = 0
    for e, t in zip(layout.entries, tensors):
        assert (e.dtype, e.shape) == (t.dtype, tuple(t.shape))
        assert e.nbytes == t.numel() * t.element_size()
        assert e.offset % align == 0
        assert e.offset >= end and e.offset - end < align  # no overlap, no wasted slot
        end = e.offset + e.nbytes
    assert layout.nbytes % align == 0
    assert end <= layout.nbytes < end + align


def test_layout_is_frozen_hashable_and_equal_for_equal_inputs():
    a = plan_layout([torch.zeros(3, 4), torch.zeros(5, dtype=torch.int8)])
    b = plan_layout([torch.ones(3, 4), torch.ones(5, dtype=torch.int8)])
    c = plan_layout([torch.zeros(4, 3), torch.zeros(5, dtype=torch.int8)])

    assert a == b and hash(a) == hash(b)
    assert a != c
    assert {a: 1}[b] == 1
    assert a == K.Layout.from_specs([(torch.float32, (3, 4)), (torch.int8, [5])])
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.nbytes = 0
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.entries[0].offset = 16


def test_layout_sliced_puts_rank_slices_first_then_whole_entries():
    layout = K.Layout.from_specs(
        [(torch.float32, (8, 4)), (torch.int64, (3,)), (torch.bfloat16, (6, 2))]
    )
    part = layout.sliced(2, [True, False, True])

    assert [(e.dtype, e.shape) for e in part.entries] == [
        (torch.float32, (16,)),
        (torch.bfloat16, (6,)),
        (torch.int64, (3,)),
    ]
    assert all(e.offset % layout.align == 0 for e in part.entries)
    # the sliced prefix ends where the first whole entry starts
    assert layout.sliced_nbytes(2, [True, False, True]) == part.entries[2].offset == 80
    # default: every entry sliced
    whole = K.Layout.from_specs([(torch.float32, (8, 4)), (torch.bfloat16, (6, 2))])
    assert whole.sliced(4) == K.Layout.from_specs([(torch.float32, (8,)), (torch.bfloat16, (3,))])
    assert whole.sliced_nbytes(4) == whole.sliced(4).nbytes == 48
    assert whole.sliced(1).entries[0].shape == (32,)
    assert layout.sliced_nbytes(2, [False, False, False]) == 0


@pytest.mark.parametrize(
    ("call", "exc", "match"),
    [
        (
            lambda lay: lay.sliced(2),
            ValueError,
            r"entry 1: numel 3 is not divisible by world size 2",
        ),
        (
            lambda lay: lay.sliced_nbytes(2, [False, True]),
            ValueError,
            r"entry 1: numel 3 .* size 2",
        ),
        (lambda lay: lay.sliced(2, [True]), ValueError, r"sliced has 1 flags for 2 entries"),
        (lambda lay: lay.sliced(0), ValueError, r"world_size must be >= 1"),
    ],
    ids=["indivisible", "indivisible_flagged", "flag_count", "world_zero"],
)
def test_layout_sliced_rejects_bad_slicing(call, exc, match):
    layout = K.Layout.from_specs([(torch.float32, (4,)), (torch.int8, (3,))])
    with pytest.raises(exc, match=match):
        call(layout)


# ----------------------------------------------------------------------------- bit-exact


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_pack_and_unpack_are_bit_exact_for_every_dtype(dtype, impl, device):
    tensors = [_random_tensor(s, dtype, device) for s in ODD_SHAPES]
    if dtype in SPECIAL_BITS:
        tensors.append(_special_tensor(dtype, device))
    layout = plan_layout(tensors)

    buf = K.pack(tensors, impl=impl)
    assert buf.dtype == torch.uint8 and buf.shape == (layout.nbytes,)
    _assert_entries(buf, layout, tensors)
    for view, t in zip(K.unpack(buf, layout), tensors):
        assert view.dtype == dtype and view.shape == t.shape
        _assert_same_bytes(_bytes(view), _bytes(t))


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_unpack_into_is_bit_exact_for_every_dtype(dtype, impl, device):
    tensors = [_random_tensor(s, dtype, device) for s in ODD_SHAPES]
    layout = plan_layout(tensors)
    buf = K.pack_reference(tensors, layout)
    outs = [_canary(s, dtype, device) for s in ODD_SHAPES]

    K.unpack_into(buf, layout, outs, impl=impl)
    for o, t in zip(outs, tensors):
        _assert_same_bytes(_bytes(o), _bytes(t))


@pytest.mark.parametrize("dtype", list(SPECIAL_BITS), ids=str)
def test_pack_of_contiguous_sources_keeps_nan_payloads(dtype, impl, device):
    """A fused multi-tensor copy that converts through float would canonicalise NaN payloads."""
    special = _special_tensor(dtype, device)
    buf = K.pack([special], impl=impl)
    _assert_same_bytes(buf[: special.numel() * special.element_size()], _bytes(special))


@pytest.mark.parametrize("dtype", list(SPECIAL_BITS), ids=str)
def test_nan_payloads_negative_zero_and_denormals_survive(dtype, impl, device):
    special = _special_tensor(dtype, device)
    strided = special[1::2]  # odd start, step 2: the strided word path
    layout = plan_layout([special, strided])
    expected = [_bytes(special), _byte_twin(special)[1::2].reshape(-1)]

    buf = K.pack([special, strided], impl=impl)
    for view, want in zip(K.unpack(buf, layout), expected):
        _assert_same_bytes(_bytes(view), want)
    dest = Dest.make((special.numel(), 2), dtype, device, lambda t: t[:, 1])
    K.unpack_into(buf, plan_layout([special]), [dest.view], impl=impl)
    dest.check(special)


@pytest.mark.parametrize("dtype", STRIDED_DTYPES, ids=str)
@pytest.mark.parametrize("view", list(VIEWS))
def test_pack_gathers_strided_sources_exactly(view, dtype, impl, device):
    src, want = _strided_source(view, dtype, device)
    small = _random_tensor((3,), torch.int8, device)  # a neighbour, so offsets are not 0
    layout = plan_layout([small, src])

    buf = K.pack([small, src], impl=impl)
    e = layout.entries[1]
    _assert_same_bytes(buf[e.offset : e.offset + e.nbytes], want)
    _assert_same_bytes(buf[:3], _bytes(small))


@pytest.mark.parametrize("dtype", STRIDED_DTYPES, ids=str)
@pytest.mark.parametrize("view", WRITABLE_VIEWS)
def test_unpack_into_scatters_to_strided_destinations_exactly(view, dtype, impl, device):
    shape, op = VIEWS[view]
    dest = Dest.make(shape, dtype, device, op)
    value = _random_tensor(dest.view.shape, dtype, device)
    layout = plan_layout([value])

    K.unpack_into(K.pack_reference([value]), layout, [dest.view], impl=impl)
    dest.check(value)


def test_multi_block_copies_are_exact(impl, device):
    # 3 full 16 KiB blocks, a masked partial block and a 4-byte tail; 3 strided blocks
    tensors = [
        _random_tensor((3 * _copy.VEC_BLOCK + 13,), torch.float32, device),
        _random_tensor((50, 53), torch.float16, device).t(),
    ]
    _assert_round_trip(tensors, impl, device)


def test_pack_handles_hundreds_of_tensors_in_one_call(impl, device):
    dtypes = [torch.float32, torch.bfloat16, torch.int8, torch.int64]
    tensors = []
    for i in range(240):
        dtype = dtypes[i % 4]
        numel = 16 * (1 + i % 5) if i % 16 else 1 + i % 13  # every 16th is odd-sized
        shape = {5: (), 7: (0, 4)}.get(i, (numel,))
        tensors.append(_random_tensor(shape, dtype, device))
    _assert_round_trip(tensors, impl, device)


def test_pack_handles_one_large_and_many_tiny_tensors(impl, device):
    large = _random_tensor((1 << 18,), torch.float32, device)  # 1 MiB
    tiny = [_random_tensor((1 + i % 3,), torch.int16, device) for i in range(40)]
    tensors = [*tiny[:20], large, *tiny[20:]]
    layout = plan_layout(tensors)

    buf = K.pack(tensors, impl=impl)
    _assert_entries(buf, layout, tensors)


# ----------------------------------------------------------------------------- canaries


def test_pack_writes_only_entry_bytes_of_out(impl, device):
    src5d, _ = _strided_source("permute_5d", torch.int16, device)
    tensors = [
        _random_tensor((123,), torch.int8, device),
        _random_tensor((37, 9), torch.bfloat16, device).t(),
        _random_tensor((), torch.float64, device),
        _random_tensor((0, 4), torch.float32, device),
        src5d,
        _random_tensor((6,), torch.complex64, device),
    ]
    layout = plan_layout(tensors)
    big = torch.full((64 + layout.nbytes + 64,), CANARY, dtype=torch.uint8, device=device)

    buf = K.pack(tensors, out=big[64:], impl=impl)
    assert buf.data_ptr() == big.data_ptr() + 64 and buf.numel() == layout.nbytes
    _assert_entries(buf, layout, tensors)
    _assert_untouched(big[:64])
    _assert_untouched(big[64 + layout.nbytes :])
    # alignment padding between entries is documented as left as it was
    _assert_untouched(buf.cpu()[~_entry_mask(layout)])


def test_unpack_into_writes_only_the_destination_regions(impl, device):
    values, dests = _canary_dests(device)
    layout = plan_layout(values)

    K.unpack_into(K.pack_reference(values, layout), layout, [d.view for d in dests], impl=impl)
    for value, dest in zip(values, dests):
        dest.check(value)


@pytest.mark.parametrize("world", [2, 4])
def test_reassemble_into_writes_only_the_destination_regions(world, impl, device):
    values, dests = _canary_dests(device)
    flags = _flags(values, world, "mixed")
    layout, gathered, parts = _tp_gather(values, world, flags)

    K.reassemble_into(
        gathered, layout, [d.view for d in dests], sliced=flags, part=parts[-1], impl=impl
    )
    for value, dest in zip(values, dests):
        dest.check(value)


def test_reassemble_writes_only_entry_bytes_of_out(impl, device):
    tensors = _tp_tensors(device)
    flags = _flags(tensors, 4, "divisible")
    layout, gathered, parts = _tp_gather(tensors, 4, flags)
    big = torch.full((32 + layout.nbytes + 48,), CANARY, dtype=torch.uint8, device=device)

    views = K.reassemble(gathered, layout, sliced=flags, part=parts[0], out=big[32:], impl=impl)
    buf = big[32 : 32 + layout.nbytes]
    assert all(v.untyped_storage().data_ptr() == big.untyped_storage().data_ptr() for v in views)
    _assert_entries(buf, layout, tensors)
    _assert_untouched(big[:32])
    _assert_untouched(big[32 + layout.nbytes :])
    _assert_untouched(buf.cpu()[~_entry_mask(layout)])


# ----------------------------------------------------------------------------- unpack views


def test_unpack_returns_contiguous_views_sharing_the_buffer(device):
    specs = [((3, 5), torch.float32), ((), torch.int64), ((0, 2), torch.bool), ((7,), torch.int8)]
    tensors = [_random_tensor(s, d, device) for s, d in specs]
    layout = plan_layout(tensors)
    buf = K.pack_reference(tensors, layout).to(device)

    views = K.unpack(buf, layout)
    for v, t, e in zip(views, tensors, layout.entries):
        assert v.dtype == t.dtype and v.shape == t.shape and v.is_contiguous()
        assert v.untyped_storage().data_ptr() == buf.untyped_storage().data_ptr()
        if e.nbytes:
            assert v.data_ptr() == buf.data_ptr() + e.offset
    fresh = _random_tensor((3, 5), torch.float32, device)
    e = layout.entries[0]
    buf[e.offset : e.offset + e.nbytes] = _bytes(fresh)  # writing the buffer changes the view
    _assert_same_bytes(_bytes(views[0]), _bytes(fresh))


# ----------------------------------------------------------------------------- CPU threads

_THREADS_SCRIPT = r"""
import os, sys
import numpy as np
import torch
import pipepack.kernels as K

torch.set_num_threads(2)


def threads():
    return len(os.listdir("/proc/self/task"))


rng = np.random.default_rng(0)
def big(shape, dtype):  # made by numpy: no torch kernel (and no thread pool) touched yet
    n = int(np.prod(shape)) * torch.empty((), dtype=dtype).element_size()
    raw = torch.from_numpy(rng.integers(0, 256, n, dtype=np.uint8))
    return raw.view(dtype).view(shape)


# large entries, and small ones on both sides of torch's serial limit (copy_ takes those)
srcs = [big((512, 1024), torch.bfloat16), big((256, 512), torch.float32).t(),
        big((1024, 600), torch.complex64)[:, :512], big((1 << 20,), torch.bool),
        big((2, 16383), torch.int16), big((2, 16384), torch.float16).t()]
before = threads()
layout = K.plan_layout(srcs)
buf = K.pack(srcs)
outs = [torch.empty(s.shape, dtype=s.dtype) for s in srcs]
K.unpack_into(buf, layout, outs)
wide = [torch.empty(s.shape[0], 2 * s.shape[-1], dtype=s.dtype)[..., : s.shape[-1]]
        if s.dim() == 2 else torch.empty(s.shape, dtype=s.dtype) for s in srcs]
part = layout.sliced(2)
gathered = torch.empty(2, part.nbytes, dtype=torch.uint8)
for r in range(2):
    K.pack([o.reshape(2, -1)[r] for o in outs], layout=part, out=gathered[r])
full = K.reassemble(gathered, layout)
K.reassemble_into(gathered, layout, wide)
after_ops = threads()
ok = all(
    np.array_equal(K.ops._as_numpy(o), K.ops._as_numpy(s))
    for got in (outs, full, wide) for o, s in zip(got, srcs)
)
torch.empty_like(srcs[0]).copy_(srcs[0])  # the control: torch's own copy uses the pool
print(before, after_ops, threads(), ok)
"""


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="needs /proc/self/task")
def test_cpu_copies_stay_in_the_calling_thread():
    """On CPU no op enters torch's intra-op pool (its workers fight a peer rank and gloo for a
    small machine's cores). Seen from outside: the process gains no thread, while one plain
    ``copy_`` of the same size does (the control, so this test can fail)."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "TRITON_INTERPRET")}
    out = subprocess.run(
        [sys.executable, "-c", _THREADS_SCRIPT],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    before, after_ops, after_control, ok = out.stdout.split()
    assert int(after_ops) == int(before), "a CPU op started torch's intra-op threads"
    assert int(after_control) > int(before), "control: torch's copy_ started no thread here"
    assert ok == "True", "a CPU copy was not exact"


# ----------------------------------------------------------------------------- reassembly


@pytest.mark.parametrize("pattern", ["divisible", "mixed", "none"])
@pytest.mark.parametrize("world", [1, 2, 4])
def test_reassemble_rebuilds_tp_sliced_tensors(world, pattern, impl, device):
    tensors = _tp_tensors(device)
    flags = _flags(tensors, world, pattern)
    layout, gathered, parts = _tp_gather(tensors, world, flags)
    part = None if all(flags) else parts[-1]

    views = K.reassemble(gathered, layout, sliced=flags, part=part, impl=impl)
    for v, t in zip(views, tensors):
        assert v.dtype == t.dtype and v.shape == t.shape
        _assert_same_bytes(_bytes(v), _bytes(t))


@pytest.mark.parametrize("world", [1, 2, 4])
def test_reassemble_into_strided_destinations(world, impl, device):
    tensors = _tp_tensors(device)[:5]
    dests = [
        Dest.make((8, 9), torch.bfloat16, device, lambda t: t[:, 1:7]),
        Dest.make(
            (2, 3, 4), torch.float32, device, lambda t: t.permute(2, 1, 0, *range(3, t.dim()))
        ),
        Dest.make((30,), torch.int8, device, lambda t: t[1:25:2]),
        Dest.make((9,), torch.float64, device, lambda t: t, lambda t: t[:4]),
        Dest.make((2, 2, 3), torch.complex64, device, lambda t: t[:, :, 1]),
    ]
    flags = _flags(tensors, world, "divisible")
    layout, gathered, _ = _tp_gather(tensors, world, flags)

    K.reassemble_into(gathered, layout, [d.view for d in dests], sliced=flags, impl=impl)
    for t, d in zip(tensors, dests):
        d.check(t)


@pytest.mark.parametrize(
    ("shape", "dtype", "world", "dest_shape"),
    [((5, 8), torch.bfloat16, 4, (5, 16)), ((3, 2), torch.float32, 2, (3, 4))],
    ids=["bf16_w4", "fp32_w2"],
)
def test_reassemble_into_a_column_slice_regression(shape, dtype, world, dest_shape, impl, device):
    """Regression: the kernel's word size came from the destination view, not from each rank's
    piece, so pieces ending mid-row lost their last bytes (4 bf16 elements, 1 fp32)."""
    value = _random_tensor(shape, dtype, device)
    dest = Dest.make(dest_shape, dtype, device, lambda t: t[:, : shape[1]])
    layout, gathered, _ = _tp_gather([value], world, (True,))

    K.reassemble_into(gathered, layout, [dest.view], impl=impl)
    dest.check(value)


def test_word_size_follows_each_piece_for_every_split(impl, device):
    """Every rank piece of every small split into column slices at every start: a piece's
    start and length decide its word size as much as the destination's rows do."""
    cases = []
    for dtype in (torch.int8, torch.bfloat16, torch.float32, torch.float64):
        for rows, cols in ((3, 8), (5, 4), (6, 2)):
            for world in (2, 3, 4):
                if rows * cols % world:
                    continue
                for start in (0, 1, cols):
                    cases.append((dtype, rows, cols, world, start))
    values, dests = [], []
    for dtype, rows, cols, _world, start in cases:
        values.append(_random_tensor((rows, cols), dtype, device))
        dests.append(
            Dest.make((rows, 2 * cols), dtype, device, lambda t, s=start, c=cols: t[:, s : s + c])
        )
    for world in (2, 3, 4):
        idx = [i for i, c in enumerate(cases) if c[3] == world]
        layout, gathered, _ = _tp_gather([values[i] for i in idx], world, (True,) * len(idx))
        K.reassemble_into(gathered, layout, [dests[i].view for i in idx], impl=impl)
        for i in idx:
            dests[i].check(values[i])


def test_reassemble_with_world_size_one_is_a_copy_of_the_part(impl, device):
    tensors = _tp_tensors(device)
    layout, gathered, parts = _tp_gather(tensors, 1, (True,) * len(tensors))
    _assert_same_bytes(gathered[0], parts[0])

    views = K.reassemble(gathered, layout, impl=impl)
    for v, t in zip(views, tensors):
        _assert_same_bytes(_bytes(v), _bytes(t))


# ----------------------------------------------------------------------------- triton == torch


def _run_op(op: str, impl: str, device) -> list[torch.Tensor]:
    """Runs ``op`` with ``impl`` ("torch", "triton" or "reference") on fixed inputs and returns
    every byte it could have written: whole canary-filled outputs, not just the entries."""
    torch.manual_seed(1)
    if op == "pack":
        views = ["transpose", "step_slice", "expand_rows", "permute_5d", "misaligned_1d"]
        tensors = [_strided_source(v, dt, device)[0] for v, dt in zip(views, STRIDED_DTYPES)]
        tensors += [_random_tensor(s, torch.int16, device) for s in ODD_SHAPES]
        layout = plan_layout(tensors)
        big = torch.full((16 + layout.nbytes + 16,), CANARY, dtype=torch.uint8, device=device)
        if impl == "reference":
            mask = torch.zeros_like(big, dtype=torch.bool)
            mask[16 : 16 + layout.nbytes] = _entry_mask(layout).to(device)
            big[mask] = K.pack_reference(tensors, layout)[_entry_mask(layout).to(device)]
        else:
            K.pack(tensors, out=big[16:], impl=impl)
        return [big]

    values, dests = _canary_dests(device)
    outs = [d.view for d in dests]
    if op == "unpack_into":
        layout = plan_layout(values)
        buf = K.pack_reference(values, layout)
        if impl == "reference":
            K.unpack_into_reference(buf, layout, outs)
        else:
            K.unpack_into(buf, layout, outs, impl=impl)
        return [_bytes(d.base) for d in dests]

    flags = _flags(values, 2, "mixed")
    layout, gathered, parts = _tp_gather(values, 2, flags)
    kw = {"sliced": flags, "part": parts[1]}
    if op == "reassemble":
        if impl == "reference":
            return [_bytes(t) for t in K.reassemble_reference(gathered, layout, **kw)]
        return [_bytes(t) for t in K.reassemble(gathered, layout, impl=impl, **kw)]
    if impl == "reference":
        for o, full in zip(outs, K.reassemble_reference(gathered, layout, **kw)):
            (o if o.shape == full.shape else o[: full.shape[0]]).copy_(full)
    else:
        K.reassemble_into(gathered, layout, outs, impl=impl, **kw)
    return [_bytes(d.base) for d in dests]


@pytest.mark.parametrize("op", ["pack", "unpack_into", "reassemble", "reassemble_into"])
def test_triton_path_matches_torch_path_and_reference(op, device):
    want = _run_op(op, "reference", device)
    for impl in ("torch", "triton"):
        got = _run_op(op, impl, device)
        assert len(got) == len(want)
        for g, w in zip(got, want):
            _assert_same_bytes(g, w)


# ----------------------------------------------------------------------------- errors


def _f32(*shape, device="cpu"):
    return torch.zeros(shape, dtype=torch.float32, device=device)


def _buf(n, offset=0):
    return torch.zeros(n + offset, dtype=torch.uint8)[offset:]


_L2 = K.Layout.from_specs([(torch.float32, (2, 4)), (torch.float32, (3, 4))])  # 32 + 48 bytes
_LT = K.Layout.from_specs([(torch.float32, (4,)), (torch.float32, (6,))])  # W=2: 16 + 32 bytes

ERROR_CASES = {
    # pack
    "pack_mixed_devices": (
        lambda: K.pack([_f32(4), _f32(4, device="meta")]),
        ValueError,
        r"entry 1: tensor is on meta but entry 0 is on cpu",
    ),
    "pack_mixed_devices_named": (
        lambda: K.pack([_f32(4), _f32(4, device="meta")], names=["x", "y"]),
        ValueError,
        r"key 'y': tensor is on meta but key 'x' is on cpu",
    ),
    "pack_not_a_tensor": (
        lambda: K.pack([_f32(4), 3]),
        TypeError,
        r"entry 1: tensor must be a torch.Tensor, got int",
    ),
    "pack_unsupported_dtype": (
        lambda: K.pack([_f32(4), torch.empty(4, dtype=torch.quint8)]),
        TypeError,
        r"entry 1: unsupported dtype torch.quint8",
    ),
    "pack_unsupported_dtype_named": (
        lambda: K.pack([_f32(4), torch.empty(2, dtype=torch.float8_e8m0fnu)], names=["a", "s"]),
        TypeError,
        r"key 's': unsupported dtype torch.float8_e8m0fnu",
    ),
    "pack_out_too_small": (
        lambda: K.pack([_f32(2, 4), _f32(3, 4)], out=_buf(64)),
        ValueError,
        r"out holds 64 bytes but the layout needs 80",
    ),
    "pack_out_wrong_dtype": (
        lambda: K.pack([_f32(4)], out=_f32(16)),
        TypeError,
        r"out must be torch.uint8",
    ),
    "pack_out_misaligned": (
        lambda: K.pack([_f32(4)], out=_buf(32, offset=1)),
        ValueError,
        r"out address 0x[0-9a-f]+ is not 16-byte aligned",
    ),
    "pack_out_not_1d": (
        lambda: K.pack([_f32(4)], out=torch.zeros(2, 16, dtype=torch.uint8)),
        ValueError,
        r"out must be a contiguous 1-D byte tensor",
    ),
    "pack_out_other_device": (
        lambda: K.pack([_f32(4)], out=torch.empty(16, dtype=torch.uint8, device="meta")),
        ValueError,
        r"out is on meta but the tensors are on cpu",
    ),
    "pack_out_below_layout_align": (
        lambda: K.pack([_f32(4)], layout=plan_layout([_f32(4)], align=64), out=_buf(64, 16)),
        ValueError,
        r"is not 64-byte aligned",
    ),
    "pack_layout_dtype_mismatch": (
        lambda: K.pack([_f32(2, 4), torch.zeros(3, 4, dtype=torch.float16)], layout=_L2),
        TypeError,
        r"entry 1: dtype torch.float16 does not match the layout's torch.float32",
    ),
    "pack_layout_shape_mismatch_named": (
        lambda: K.pack([_f32(4, 2), _f32(3, 4)], layout=_L2, names=["h", "r"]),
        ValueError,
        r"key 'h': shape \(4, 2\) does not match the layout's \(2, 4\)",
    ),
    "pack_layout_count_mismatch": (
        lambda: K.pack([_f32(2, 4)], layout=_L2),
        ValueError,
        r"got 1 tensors for a layout of 2 entries",
    ),
    "pack_bad_impl": (
        lambda: K.pack([_f32(4)], impl="cuda"),
        ValueError,
        r"impl must be 'torch', 'triton'",
    ),
    "plan_layout_not_a_tensor": (
        lambda: plan_layout([_f32(4), [1.0]]),
        TypeError,
        r"entry 1: expected a torch.Tensor, got list",
    ),
    "plan_layout_unsupported_dtype": (
        lambda: plan_layout([torch.empty(2, dtype=torch.bits8)]),
        TypeError,
        r"entry 0: unsupported dtype torch.bits8",
    ),
    "plan_layout_bad_align": (
        lambda: plan_layout([_f32(4)], align=24),
        ValueError,
        r"align must be a power of two",
    ),
    "plan_layout_small_align": (
        lambda: plan_layout([_f32(4)], align=8),
        ValueError,
        r"align must be a power of two >= 16",
    ),
    "from_specs_negative_size": (
        lambda: K.Layout.from_specs([(torch.int8, (2,)), (torch.int8, (3, -1))]),
        ValueError,
        r"entry 1: negative size in shape \(3, -1\)",
    ),
    # unpack / unpack_into
    "unpack_misaligned": (
        lambda: K.unpack(_buf(80, offset=8), _L2),
        ValueError,
        r"buffer address 0x[0-9a-f]+ is not 16-byte aligned",
    ),
    "unpack_too_small": (
        lambda: K.unpack(_buf(79), _L2),
        ValueError,
        r"buffer holds 79 bytes but .* needs 80",
    ),
    "unpack_wrong_dtype": (
        lambda: K.unpack(_f32(20), _L2),
        TypeError,
        r"buffer must be torch.uint8",
    ),
    "unpack_into_count": (
        lambda: K.unpack_into(_buf(80), _L2, [_f32(2, 4)]),
        ValueError,
        r"got 1 destinations for a layout of 2 entries",
    ),
    "unpack_into_shape": (
        lambda: K.unpack_into(_buf(80), _L2, [_f32(2, 4), _f32(3, 5)]),
        ValueError,
        r"entry 1: destination shape \(3, 5\) cannot hold \(3, 4\)",
    ),
    "unpack_into_shape_named": (
        lambda: K.unpack_into(_buf(80), _L2, [_f32(2, 4), _f32(4)], names=["a", "b"]),
        ValueError,
        r"key 'b': destination shape \(4,\) cannot hold \(3, 4\)",
    ),
    "unpack_into_dim0_too_small": (
        lambda: K.unpack_into(_buf(80), _L2, [_f32(1, 4), _f32(3, 4)]),
        ValueError,
        r"entry 0: destination shape \(1, 4\) cannot hold \(2, 4\)",
    ),
    "unpack_into_dtype": (
        lambda: K.unpack_into(_buf(80), _L2, [_f32(2, 4), torch.zeros(3, 4, dtype=torch.int32)]),
        TypeError,
        r"entry 1: destination dtype torch.int32 does not match torch.float32",
    ),
    "unpack_into_mixed_devices": (
        lambda: K.unpack_into(_buf(80), _L2, [_f32(2, 4), _f32(3, 4, device="meta")]),
        ValueError,
        r"entry 1: destination is on meta but entry 0 is on cpu",
    ),
    "unpack_into_buffer_other_device": (
        lambda: K.unpack_into(
            _buf(80), _L2, [_f32(2, 4, device="meta"), _f32(3, 4, device="meta")]
        ),
        ValueError,
        r"buffer is on cpu but the tensors are on meta",
    ),
    "unpack_into_misaligned": (
        lambda: K.unpack_into(_buf(80, offset=4), _L2, [_f32(2, 4), _f32(3, 4)]),
        ValueError,
        r"buffer address 0x[0-9a-f]+ is not 16-byte aligned",
    ),
    # reassemble / reassemble_into
    "reassemble_row_size": (
        lambda: K.reassemble(torch.zeros(2, 48, dtype=torch.uint8), _LT),
        ValueError,
        r"gathered rows hold 48 bytes but the sliced entries need 32 per rank",
    ),
    "reassemble_not_2d": (
        lambda: K.reassemble(_buf(64), _LT),
        TypeError,
        r"gathered must be a \[world, slice_bytes\]",
    ),
    "reassemble_indivisible": (
        lambda: K.reassemble(torch.zeros(4, 16, dtype=torch.uint8), _LT),
        ValueError,
        r"entry 1: numel 6 is not divisible by world size 4",
    ),
    "reassemble_needs_part": (
        lambda: K.reassemble(torch.zeros(2, 16, dtype=torch.uint8), _LT, sliced=[True, False]),
        ValueError,
        r"pass part=",
    ),
    "reassemble_part_too_small": (
        lambda: K.reassemble(
            torch.zeros(2, 16, dtype=torch.uint8), _LT, sliced=[True, False], part=_buf(32)
        ),
        ValueError,
        r"part holds 32 bytes but the layout needs 48",
    ),
    "reassemble_misaligned_gathered": (
        lambda: K.reassemble(_buf(64, offset=8).view(2, 32), _LT),
        ValueError,
        r"gathered must be contiguous and 16-byte aligned",
    ),
    "reassemble_into_shape": (
        lambda: K.reassemble_into(
            torch.zeros(2, 32, dtype=torch.uint8), _LT, [_f32(4), _f32(2, 3)]
        ),
        ValueError,
        r"entry 1: destination shape \(2, 3\) cannot hold \(6,\)",
    ),
    "reassemble_into_other_device": (
        lambda: K.reassemble_into(
            torch.zeros(2, 32, dtype=torch.uint8),
            _LT,
            [_f32(4, device="meta"), _f32(6, device="meta")],
        ),
        ValueError,
        r"gathered is on cpu but the destinations are on meta",
    ),
}


@pytest.mark.filterwarnings("ignore:.*quint8.*deprecated:UserWarning")
@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_bad_input_is_rejected_with_a_message_naming_the_problem(case):
    call, exc, match = ERROR_CASES[case]
    with pytest.raises(exc, match=match):
        call()


def test_bad_input_fails_before_any_byte_is_written(impl, device):
    good = _random_tensor((8,), torch.float32, device)
    out = torch.full((64,), CANARY, dtype=torch.uint8, device=device)
    with pytest.raises(ValueError, match="entry 2"):
        K.pack(
            [good, good, _f32(5, device=device)], layout=plan_layout([good] * 3), out=out, impl=impl
        )
    _assert_untouched(out)

    layout = plan_layout([good, good])
    dest = _canary((8,), torch.float32, device)
    with pytest.raises(TypeError, match="entry 1"):
        K.unpack_into(
            K.pack_reference([good, good]),
            layout,
            [dest, _canary((8,), torch.int32, device)],
            impl=impl,
        )
    _assert_untouched(_bytes(dest))

    gathered = torch.zeros(2, 16, dtype=torch.uint8, device=device)
    with pytest.raises(ValueError, match="entry 1"):
        K.reassemble_into(
            gathered, layout, [dest, _canary((4, 2), torch.float32, device)], impl=impl
        )
    _assert_untouched(_bytes(dest))


# ----------------------------------------------------------------------------- plan cache


@pytest.fixture
def plan_builds(monkeypatch) -> list[int]:
    """Counts segment tables built (one per plan-cache miss), starting from an empty cache."""
    K.clear_plan_cache()
    builds: list[int] = []
    build = _copy.build_plan

    def counting(rows, device, **kw):
        builds.append([list(r) for r in rows])
        return build(rows, device, **kw)

    monkeypatch.setattr(_copy, "build_plan", counting)
    yield builds
    K.clear_plan_cache()


def test_pack_reuses_its_plan_and_reads_current_contents(plan_builds, device):
    tensors = [
        _random_tensor((37, 9), torch.bfloat16, device).t(),
        _random_tensor((123,), torch.int8, device),
    ]
    layout = plan_layout(tensors)
    out = torch.empty(layout.nbytes, dtype=torch.uint8, device=device)
    K.pack(tensors, out=out, impl="triton")
    assert len(plan_builds) == 1

    for t in tensors:  # same tensors, same addresses, new contents
        t.copy_(_random_tensor(t.shape, t.dtype, device))
    K.pack(tensors, out=out, impl="triton")
    assert len(plan_builds) == 1, "the second call with the same addresses rebuilt its plan"
    _assert_entries(out, layout, tensors)

    # new tensors (new addresses, same alignment): their addresses are launch arguments
    bases = [
        _random_tensor((37 * 9 + 8,), torch.bfloat16, device),
        _random_tensor((123 + 16,), torch.int8, device),
    ]
    others = [bases[0][:333].view(37, 9).t(), bases[1][:123]]
    K.pack(others, out=out, impl="triton")
    assert len(plan_builds) == 1, "new addresses of the same alignment rebuilt the plan"
    _assert_entries(out, layout, others)

    # another alignment decides other words: a new plan, and still the right bytes
    shifted = [bases[0][8:341].view(37, 9).t(), bases[1][3:126]]
    K.pack(shifted, out=out, impl="triton")
    assert len(plan_builds) == 2
    _assert_entries(out, layout, shifted)
    K.pack(others, out=out, impl="triton")  # and back: the first plan
    assert len(plan_builds) == 2
    _assert_entries(out, layout, others)


def test_a_fresh_buffer_and_fresh_tensors_every_call_hit_one_plan(plan_builds, device):
    """The transport's hop: new sources, a new packed buffer, new destinations every call."""
    shapes = [((6, 40), torch.bfloat16), ((3,), torch.int64), ((40, 6), torch.float32)]
    dests = []
    for _step in range(4):
        srcs = [_random_tensor(s, d, device) for s, d in shapes]
        srcs[2] = srcs[2].t().contiguous().t()  # a transposed view, fresh every call
        buf = K.pack(srcs, impl="triton")
        dests.append([_canary(s.shape, s.dtype, device) for s in srcs])
        K.unpack_into(buf, plan_layout(srcs), dests[-1], impl="triton")
        for o, t in zip(dests[-1], srcs):
            _assert_same_bytes(_bytes(o), _bytes(t))
    assert len(plan_builds) == 2  # one pack plan, one unpack_into plan


def test_pack_without_a_layout_does_not_plan_one_per_call(plan_builds, device, monkeypatch):
    tensors = [
        _random_tensor((5, 8), torch.float16, device),
        _random_tensor((7,), torch.int8, device),
    ]
    layout = plan_layout(tensors)
    K.ops._layout_of.cache_clear()
    calls = []
    from_specs = K.Layout.from_specs.__func__
    monkeypatch.setattr(
        K.Layout,
        "from_specs",
        classmethod(lambda cls, *a, **kw: calls.append(1) or from_specs(cls, *a, **kw)),
    )
    for impl in ("torch", "triton"):
        for _ in range(3):
            buf = K.pack(tensors, impl=impl)
            assert buf.numel() == layout.nbytes
            _assert_entries(buf, layout, tensors)
    assert len(calls) == 1, "pack(tensors) planned a layout on a repeat call"
    assert len(plan_builds) == 1


def test_pack_plan_follows_a_moving_output_buffer(plan_builds, device):
    """The output side of a pack plan is relative to ``out``: a fresh buffer reuses the plan
    (the transport packs into a new buffer every hop) and each copy lands in its own buffer,
    nothing outside it."""
    tensors = [
        _random_tensor((5, 7), torch.float16, device),
        _random_tensor((3,), torch.int64, device),
    ]
    layout = plan_layout(tensors)
    arenas = [_canary((layout.nbytes + 128,), torch.uint8, device) for _ in range(3)]
    for i, arena in enumerate(arenas):
        start = -arena.data_ptr() % 16 + 32 + 16 * i  # different, aligned offsets
        out = arena[start : start + layout.nbytes]
        assert out.data_ptr() % 16 == 0
        K.pack(tensors, out=out, impl="triton")
        _assert_entries(out, layout, tensors)
        _assert_untouched(arena[:start])
        _assert_untouched(arena[start + layout.nbytes :])
        assert arena.numel() - start - layout.nbytes >= 16  # a canary tail was checked
    assert len(plan_builds) == 1


def test_unpack_into_plan_follows_a_moving_source_buffer(plan_builds, device):
    tensors = [
        _random_tensor((4, 6), torch.bfloat16, device),
        _random_tensor((5,), torch.int32, device),
    ]
    layout = plan_layout(tensors)
    outs = [_canary(t.shape, t.dtype, device) for t in tensors]
    for _ in range(3):
        srcs = [_random_tensor(t.shape, t.dtype, device) for t in tensors]
        buf = K.pack_reference(srcs, layout)  # a new buffer (new address) each time
        K.unpack_into(buf, layout, outs, impl="triton")
        for o, t in zip(outs, srcs):
            _assert_same_bytes(_bytes(o), _bytes(t))
    assert len(plan_builds) == 1


def test_plans_are_keyed_on_strides_not_just_addresses(plan_builds, device):
    square = _random_tensor((9, 9), torch.bfloat16, device)
    layout = plan_layout([square])
    out = torch.empty(layout.nbytes, dtype=torch.uint8, device=device)
    dest = _canary((9, 9), torch.bfloat16, device)
    buf = K.pack_reference([square])
    # same address, other strides (a transpose is its own inverse, so dest = view(square))
    for view in (lambda t: t, lambda t: t.transpose(0, 1), lambda t: t):
        K.pack([view(square)], out=out, impl="triton")
        _assert_same_bytes(out[: layout.entries[0].nbytes], view(_byte_twin(square)).reshape(-1))
        K.unpack_into(buf, layout, [view(dest)], impl="triton")
        _assert_same_bytes(_byte_twin(dest), view(_byte_twin(square)))
    assert len(plan_builds) == 4  # the third round hits both plans of the first


def test_unpack_into_and_reassemble_reuse_plans_and_read_current_contents(plan_builds, device):
    values, dests = _canary_dests(device)
    values, dests = values[:5], dests[:5]  # cacheable destinations only (no fallback)
    layout = plan_layout(values)
    buf = K.pack_reference(values, layout)
    flags = _flags(values, 2, "mixed")
    rl, gathered, parts = _tp_gather(values, 2, flags)
    out = torch.empty(rl.nbytes, dtype=torch.uint8, device=device)
    for _ in range(2):  # second round: same addresses, new contents
        K.unpack_into(buf, layout, [d.view for d in dests], impl="triton")
        for v, d in zip(values, dests):
            d.check(v)
        full = K.reassemble(gathered, rl, sliced=flags, part=parts[1], out=out, impl="triton")
        for v, f in zip(values, full):
            _assert_same_bytes(_bytes(f), _bytes(v))
        assert len(plan_builds) == 2, "a call with the same addresses rebuilt its plan"
        values = [_random_tensor(v.shape, v.dtype, device) for v in values]
        buf.copy_(K.pack_reference(values, layout))
        _, new_gathered, new_parts = _tp_gather(values, 2, flags)
        gathered.copy_(new_gathered)
        parts[1].copy_(new_parts[1])

    # the whole entries now come from another part buffer (parts[1] is still alive), into
    # another output buffer: both addresses are launch arguments, the plan stays
    values = [_random_tensor(v.shape, v.dtype, device) for v in values]
    _, new_gathered, new_parts = _tp_gather(values, 2, flags)
    gathered.copy_(new_gathered)
    out2 = torch.empty(rl.nbytes, dtype=torch.uint8, device=device)
    full = K.reassemble(gathered, rl, sliced=flags, part=new_parts[0], out=out2, impl="triton")
    for v, f in zip(values, full):
        _assert_same_bytes(_bytes(f), _bytes(v))
    assert len(plan_builds) == 2


def test_fallback_plans_are_not_reused_stale(plan_builds, device):
    """A >4-dim view is gathered/staged with torch while planning; a cached plan would keep
    the first call's staged copy."""
    shape, op = VIEWS["permute_5d"]
    base = _random_tensor(shape, torch.float32, device)
    layout = plan_layout([op(base)])
    out = torch.empty(layout.nbytes, dtype=torch.uint8, device=device)
    dest = Dest.make(shape, torch.float32, device, op)
    for _ in range(2):
        base.copy_(_random_tensor(shape, torch.float32, device))
        K.pack([op(base)], out=out, impl="triton")
        _assert_same_bytes(out, op(_byte_twin(base)).reshape(-1))
        K.unpack_into(out, layout, [dest.view], impl="triton")
        dest.check(op(base))


def test_reassemble_plan_depends_on_the_world_size(plan_builds, device):
    """Regression (fixed in 51ea500): the plan-cache key lacked the world size, so a gathered
    buffer of another world size at the same address replayed a stale plan."""
    full = _random_tensor((8,), torch.float32, device)
    layout = plan_layout([full])
    arena = torch.zeros(256, dtype=torch.uint8, device=device)
    out = torch.empty(layout.nbytes, dtype=torch.uint8, device=device)
    for world in (2, 4):  # both gathered views start at the arena's address
        _, gathered, _ = _tp_gather([full], world, (True,))
        same_address = arena[: gathered.numel()].view(gathered.shape)
        same_address.copy_(gathered)
        (got,) = K.reassemble(same_address, layout, out=out, impl="triton")
        _assert_same_bytes(_bytes(got), _bytes(full))
    assert len(plan_builds) == 2


@pytest.mark.parametrize("sliced", [True, False], ids=["sliced", "whole"])
def test_reassemble_handles_an_empty_entry_before_others(sliced, impl, device):
    """Regression (fixed in 51ea500): an empty entry was skipped before the part-layout
    iterator advanced, so every later entry of its kind read its predecessor's bytes."""
    tensors = [
        _random_tensor((0, 4), torch.float32, device),
        _random_tensor((2, 4), torch.float32, device),
        _random_tensor((4,), torch.int16, device),
        _random_tensor((6,), torch.int8, device),
    ]
    flags = (sliced,) * len(tensors)
    layout, gathered, parts = _tp_gather(tensors, 2, flags)

    views = K.reassemble(gathered, layout, sliced=flags, part=parts[0], impl=impl)
    for v, t in zip(views, tensors):
        _assert_same_bytes(_bytes(v), _bytes(t))


# ----------------------------------------------------------------------------- tiled path


def _tile(dtype: torch.dtype) -> int:
    return _copy._tile_sides(dtype.itemsize)[0]


# (base shape, view): full tiles and a masked tail in both tiled dims; a batched transpose
TILED_VIEWS = {
    "transpose": (lambda t: (2 * t + 16, t + 32), lambda x: x.transpose(0, 1)),
    "batched": (lambda t: (3, t + 16, t + 48), lambda x: x.transpose(1, 2)),
    "exact_tiles": (lambda t: (t, 2 * t), lambda x: x.transpose(0, 1)),
}


@pytest.mark.parametrize(
    "dtype", [torch.int8, torch.bfloat16, torch.float32, torch.float64], ids=str
)
@pytest.mark.parametrize("view", list(TILED_VIEWS))
def test_transposes_take_the_tiled_path_and_are_exact(plan_builds, view, dtype, device):
    """pack from a transposed source and unpack_into a transposed destination: the plan picks
    the tiled row (mode 2) for both, and every byte lands, nothing outside its region."""
    shape_of, op = TILED_VIEWS[view]
    base_shape = shape_of(_tile(dtype))
    base = _random_tensor(base_shape, dtype, device)
    src = op(base)
    small = _random_tensor((5,), torch.int16, device)
    layout = plan_layout([small, src])
    arena = torch.full((layout.nbytes + 64,), CANARY, dtype=torch.uint8, device=device)

    buf = K.pack([small, src], out=arena[32:], impl="triton")
    _assert_entries(buf, layout, [small, src])
    _assert_untouched(arena[:32])
    _assert_untouched(arena[32 + layout.nbytes :])
    assert [r[0] for r in plan_builds[-1] if r[0] == _copy._TILED] == [_copy._TILED]

    dest = Dest.make(base_shape, dtype, device, op)
    value = _random_tensor(src.shape, dtype, device)
    K.unpack_into(K.pack_reference([value]), plan_layout([value]), [dest.view], impl="triton")
    dest.check(value)
    assert [r[0] for r in plan_builds[-1]] == [_copy._TILED]


def test_tiled_path_needs_aligned_rows_and_whole_tiles(plan_builds, device):
    """Row strides that are not 16-byte multiples, or a side shorter than a tile, take the
    strided path (still exact)."""
    t = _tile(torch.bfloat16)
    cases = [
        _random_tensor((t + 8, t + 3), torch.bfloat16, device).t(),  # rows of 2 * (t + 3) B
        _random_tensor((t + 8, t - 8), torch.bfloat16, device).t(),  # t - 8 columns
        _random_tensor(((t + 8) ** 2 + 1,), torch.bfloat16, device)[1:]
        .view(t + 8, t + 8)
        .t(),  # a start 2 bytes past 16-byte alignment
    ]
    for src in cases:
        buf = K.pack([src], impl="triton")
        _assert_entries(buf, plan_layout([src]), [src])
        assert _copy._TILED not in [r[0] for r in plan_builds[-1]]


def test_reassemble_into_a_transposed_destination_uses_tiles_for_whole_entries(plan_builds, device):
    t = _tile(torch.float32)
    values = [_random_tensor((t + 16, t + 8), torch.float32, device) for _ in range(2)]
    dests = [
        Dest.make((t + 8, t + 16), torch.float32, device, lambda x: x.transpose(0, 1))
        for _ in values
    ]
    flags = (True, False)  # the whole entry comes from the part buffer in one piece
    layout, gathered, parts = _tp_gather(values, 2, flags)

    K.reassemble_into(
        gathered, layout, [d.view for d in dests], sliced=flags, part=parts[0], impl="triton"
    )
    for v, d in zip(values, dests):
        d.check(v)
    assert [r[0] for r in plan_builds[-1]].count(_copy._TILED) == 1


# ----------------------------------------------------------------------------- plan cache


def test_plan_cache_is_safe_under_threads(monkeypatch, device):
    """Threads packing and unpacking different payloads at once, through a cache small enough
    to evict all the time: every copy exact, and the cache never over capacity."""
    import threading

    K.clear_plan_cache()
    monkeypatch.setattr(K.ops._PLANS, "capacity", 3)
    errors: list[BaseException] = []
    barrier = threading.Barrier(4)

    def worker(seed: int) -> None:
        try:
            gen = torch.Generator().manual_seed(seed)
            barrier.wait()
            for step in range(12):
                n = 3 + (seed + step) % 5
                tensors = [
                    torch.randint(0, 256, (n * 4,), generator=gen, dtype=torch.uint8)
                    .view(torch.float32)
                    .view(n, 1)
                    .expand(n, 3),
                    torch.randint(-9, 9, (n + seed,), generator=gen, dtype=torch.int16),
                ]
                layout = plan_layout(tensors)
                buf = K.pack(tensors, impl="triton")
                _assert_entries(buf, layout, tensors)
                outs = [_canary(t.shape, t.dtype, device) for t in tensors]
                K.unpack_into(buf, layout, outs, impl="triton")
                for o, t in zip(outs, tensors):
                    _assert_same_bytes(_bytes(o), _bytes(t))
                assert len(K.ops._PLANS) <= 3
        except BaseException as exc:  # surfaced below, with the thread's traceback
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads)
    if errors:
        raise errors[0]
    K.clear_plan_cache()


class _FakeEvent:
    def __init__(self) -> None:
        self.done = False

    def query(self) -> bool:
        return self.done


class _FakePlan:
    """What PlanCache needs of a plan: its launch history (captured) and retire()."""

    def __init__(self, captured: bool = False) -> None:
        self.captured = captured
        self.streams = {1}
        self.events = [_FakeEvent(), _FakeEvent()]

    def retire(self) -> list:
        return self.events


def test_a_dropped_plan_waits_for_its_launches_before_it_is_freed():
    cache = _copy.PlanCache(capacity=1)
    first, second, third = _FakePlan(), _FakePlan(), _FakePlan()
    assert cache.put("a", first) is first
    cache.put("b", second)  # evicts the first: retired, its events pending
    assert cache.pending == 1 and cache.get("a") is None
    first.events[0].done = True
    cache.put("c", third)  # a sweep: one of the first plan's launches has not run yet
    assert cache.pending == 2
    first.events[1].done = True
    second.events[0].done = second.events[1].done = True
    cache.clear()  # the third plan is retired; the first two are done and released
    assert cache.pending == 1 and len(cache) == 0


def test_a_plan_a_cuda_graph_captured_is_never_freed():
    cache = _copy.PlanCache(capacity=1)
    graph_plan = _FakePlan(captured=True)
    cache.put("a", graph_plan)
    cache.put("b", _FakePlan())
    cache.clear()
    assert graph_plan in cache._held and cache.pending == 1


def test_put_keeps_the_plan_another_thread_cached_first():
    cache = _copy.PlanCache()
    mine, theirs = _FakePlan(), _FakePlan()
    assert cache.put("k", theirs) is theirs
    assert cache.put("k", mine) is theirs, "a second build replaced a plan that may be in use"
    assert cache.pending == 0


def test_direct_launch_passes_the_jit_launcher_arguments():
    """The compiled kernel's launcher gets what Triton's JIT passes it: grid, stream, the
    function and its packed metadata, no launch metadata or hooks, then every argument."""
    calls = []

    class Compiled:
        function = "fn"
        packed_metadata = ("md",)

        def run(self, *args):
            calls.append(args)

    direct = _copy._Direct(Compiled())
    args = list(range(100, 100 + len(_copy._ARG_NAMES)))
    direct(7, 1234, args)
    assert calls == [(7, 1, 1, 1234, "fn", ("md",), None, None, None, *args)]


def test_kernel_arguments_are_the_slot_bases(plan_builds, device, monkeypatch):
    """pack passes the table, the output buffer and each source's 16-byte aligned base as the
    kernel's integer arguments (what lets a fresh buffer or tensor reuse the table)."""
    seen = []
    real = _copy._jit_launch
    monkeypatch.setattr(
        _copy, "_jit_launch", lambda grid, args: seen.append(list(args)) or real(grid, args)
    )
    base = _random_tensor((40,), torch.int8, device)
    tensors = [base[3:20], _random_tensor((4, 4), torch.float32, device)]
    out = torch.empty(plan_layout(tensors).nbytes + 32, dtype=torch.uint8, device=device)
    K.pack(tensors, out=out[16:], impl="triton")
    args = seen[-1]
    assert len(args) == len(_copy._ARG_NAMES)
    assert args[1] == out.data_ptr() + 16
    assert args[2:4] == [tensors[0].data_ptr() & ~15, tensors[1].data_ptr() & ~15]
    assert args[4:] == [0] * (len(args) - 4)


# ----------------------------------------------------------------------------- planning


def _flat(ptr: int = 0, start: int = 0) -> _copy.View:
    return _copy.View.flat(ptr, start)


@pytest.mark.parametrize(
    ("dst", "n", "esize", "word"),
    [
        # a column slice whose rows are 16 bytes at 32-byte strides: 8-byte words
        (_copy.View(0, (4, 8), (16, 1)), 32, 2, 8),
        # the same slice 2 bytes past alignment: 2-byte words (an 8-byte access would be
        # misaligned: the interpreter would not notice, a GPU faults)
        (_copy.View(2, (4, 8), (16, 1)), 32, 2, 2),
        # a piece starting 6 bytes into the view
        (_copy.View(0, (4, 8), (16, 1), start=3), 8, 2, 2),
        # a piece of 6 bytes (ends mid-word)
        (_copy.View(0, (4, 8), (16, 1)), 3, 2, 2),
        # rows 20 bytes apart: 4-byte words
        (_copy.View(0, (4, 8), (10, 1)), 32, 2, 4),
        # a step slice: no two elements adjacent, one element per word
        (_copy.View(0, (4, 8), (16, 2)), 32, 2, 2),
        # 1-byte elements in 4-byte rows at 12-byte strides
        (_copy.View(0, (5, 4), (12, 1)), 20, 1, 4),
    ],
    ids=[
        "aligned_rows",
        "misaligned_ptr",
        "piece_start",
        "piece_length",
        "row_stride",
        "step",
        "bytes",
    ],
)
def test_the_word_is_the_widest_every_side_and_piece_allows(dst, n, esize, word):
    (row,) = _copy.segment_rows(_flat(), dst, n, esize)
    assert row[0] == _copy._STRIDED and 1 << row[1] == word
    assert row[2] * word == n * esize  # the words cover the piece exactly
    (row,) = _copy.segment_rows(dst, _flat(), n, esize)  # the same rule on the source side
    assert 1 << row[1] == word


def test_contiguous_copies_move_16_byte_vectors_then_a_tail():
    rows = _copy.segment_rows(_flat(16), _flat(32), 25, 4)  # 100 bytes, both aligned
    assert [(r[0], r[1], r[2]) for r in rows] == [(_copy._VEC, 2, 24), (_copy._STRIDED, 2, 1)]
    rows = _copy.segment_rows(_flat(16), _flat(40), 8, 4)  # dst only 8-byte aligned
    assert [(r[0], r[1], r[2]) for r in rows] == [(_copy._STRIDED, 3, 4)]
    rows = _copy.segment_rows(_flat(16), _flat(42), 8, 4)  # dst 2 bytes off: 2-byte words
    assert [(r[0], r[1], r[2]) for r in rows] == [(_copy._STRIDED, 1, 16)]
    rows = _copy.segment_rows(_flat(42), _flat(16), 8, 4)  # the same from the source side
    assert [(r[0], r[1], r[2]) for r in rows] == [(_copy._STRIDED, 1, 16)]
    assert _copy.segment_rows(_flat(), _flat(), 0, 4) == []


def test_plan_cache_holds_exactly_its_capacity():
    cache = _copy.PlanCache(capacity=2)
    plans = [_FakePlan() for _ in range(3)]
    for i, p in enumerate(plans):
        cache.put(i, p)
    assert len(cache) == 2 and cache.get(0) is None
    assert cache.get(1) is plans[1] and cache.get(2) is plans[2]
    cache.get(1)  # most recently used now
    cache.put(3, _FakePlan())
    assert cache.get(2) is None and cache.get(1) is plans[1]
