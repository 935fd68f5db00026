"""The compiled kernels on a real GPU: bit-exact copies, large payloads, canaries, CUDA graphs.

Every test is marked ``gpu`` (conftest skips it without CUDA). On a CUDA machine conftest leaves
``TRITON_INTERPRET`` unset, so the default ``impl`` of every op is the compiled kernel. Checks
compare bytes, never floats; outputs live inside canary-filled (0xA5) tensors because an
out-of-bounds store is otherwise silent.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import pytest
import torch

import pipepack.kernels as K
from pipepack.kernels import _copy, plan_layout

pytestmark = pytest.mark.gpu

CUDA = "cuda"
CANARY = 0xA5
DTYPES = [
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

ViewOp = Callable[[torch.Tensor], torch.Tensor]
# Each op works on a tensor and on its byte twin alike (see _byte_twin).
VIEWS: dict[str, tuple[tuple[int, ...], ViewOp]] = {
    "transpose": ((37, 9), lambda t: t.transpose(0, 1)),
    "step_slice": ((11, 42), lambda t: t[:, ::3]),
    "row_step": ((10, 7), lambda t: t[::2]),
    "misaligned_1d": ((50,), lambda t: t[3:]),
    "expand_rows": ((1, 43), lambda t: t.expand(5, *t.shape[1:])),
    "permute_4d": ((3, 4, 5, 6), lambda t: t.permute(3, 1, 0, 2, *range(4, t.dim()))),
    "permute_5d": ((2, 3, 4, 3, 5), lambda t: t.permute(4, 2, 0, 3, 1, *range(5, t.dim()))),
}


# ----------------------------------------------------------------------------- helpers


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).view(torch.uint8)


def _random_tensor(shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
    """Random bytes as ``dtype`` on the GPU (NaN payloads, -0.0, denormals); bool is 0/1."""
    if dtype == torch.bool:
        return torch.randint(0, 2, tuple(shape), dtype=torch.uint8, device=CUDA).bool()
    n = math.prod(shape) * dtype.itemsize
    raw = torch.randint(0, 256, (n,), dtype=torch.uint8, device=CUDA)
    return raw.view(dtype).reshape(shape)


def _canary(shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
    n = math.prod(shape) * dtype.itemsize
    return torch.full((n,), CANARY, dtype=torch.uint8, device=CUDA).view(dtype).reshape(shape)


def _byte_twin(t: torch.Tensor) -> torch.Tensor:
    """Contiguous ``t`` as uint8 with a trailing dim of each element's bytes."""
    return t.view(torch.uint8).view(*t.shape, t.element_size())


def _assert_same_bytes(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.shape == want.shape
    bad = (got != want).nonzero()
    assert bad.numel() == 0, f"{bad.shape[0]} bytes differ, first at {bad[0].tolist()}"


def _assert_entries(buf: torch.Tensor, layout: K.Layout, expected: Sequence[torch.Tensor]):
    for e, want in zip(layout.entries, expected):
        _assert_same_bytes(buf[e.offset : e.offset + e.nbytes], want)


def _entry_mask(layout: K.Layout) -> torch.Tensor:
    mask = torch.zeros(layout.nbytes, dtype=torch.bool, device=CUDA)
    for e in layout.entries:
        mask[e.offset : e.offset + e.nbytes] = True
    return mask


def _assert_untouched(region: torch.Tensor) -> None:
    assert bool((region == CANARY).all()), "a canary byte changed"


class Dest:
    """``view`` of a canary-filled ``base``; the entry lands in ``region(base)``."""

    def __init__(self, shape, dtype, view: ViewOp = lambda t: t, region: ViewOp | None = None):
        self.base = _canary(shape, dtype)
        self.view = view(self.base)
        self.region = region or view

    def check(self, value: torch.Tensor) -> None:
        want = _byte_twin(_canary(self.base.shape, self.base.dtype))
        region = self.region(want)
        region.copy_(_bytes(value.contiguous()).view(region.shape))
        _assert_same_bytes(_byte_twin(self.base), want)


def _dests() -> tuple[list[torch.Tensor], list[Dest]]:
    """Entries and awkward destinations whose plans are cacheable (capturable in a graph)."""
    dests = [
        Dest((5, 20), torch.float32, lambda t: t[:, 4:11]),  # column slice
        Dest((10, 6), torch.bfloat16, lambda t: t[::2]),  # every other row
        Dest((9, 4), torch.int16, region=lambda t: t[:6]),  # static buffer, larger dim 0
        Dest((40,), torch.int8, lambda t: t[3:34]),  # odd address and length
        Dest((8, 9), torch.float64, lambda t: t[:, 2:7], lambda t: t[:3, 2:7]),
        Dest((4, 3), torch.float32, region=lambda t: t[:0]),  # empty entry
        Dest((4, 3, 2), torch.complex64, lambda t: t.transpose(0, 2)),
    ]
    values = [_random_tensor(d.region(d.base).shape, d.base.dtype) for d in dests]
    return values, dests


def _tp_gather(tensors, world, flags):
    """Every rank's part (``pack_reference``), and the all-gathered sliced prefixes."""
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
    return layout, torch.stack([p[:row] for p in parts]), parts


def _warm_up(step: Callable[[], None]) -> None:
    """Runs ``step`` on a side stream (builds and caches its plans) before a graph capture."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()


def _capture(step: Callable[[], None]) -> torch.cuda.CUDAGraph:
    """Captures ``step``; capture raises on any device synchronisation inside it."""
    _warm_up(step)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    torch.cuda.synchronize()
    return graph


# ----------------------------------------------------------------------------- bit-exact


def test_gpu_default_impl_is_the_compiled_kernel(monkeypatch):
    K.clear_plan_cache()
    built = []
    build = _copy.build_plan
    monkeypatch.setattr(_copy, "build_plan", lambda *a, **kw: built.append(1) or build(*a, **kw))
    x = _random_tensor((37, 9), torch.bfloat16).t()
    buf = K.pack([x])
    torch.cuda.synchronize()
    assert built, "pack on CUDA tensors did not take the kernel path"
    _assert_same_bytes(buf[: x.numel() * 2], _bytes(x))
    K.clear_plan_cache()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gpu_pack_and_unpack_into_are_bit_exact(dtype):
    bases = {name: _random_tensor(shape, dtype) for name, (shape, _) in VIEWS.items()}
    tensors = [op(bases[name]) for name, (_, op) in VIEWS.items()]
    expected = [op(_byte_twin(bases[name])).reshape(-1) for name, (_, op) in VIEWS.items()]
    for shape in [(0, 5), (), (1,), (6,), (42,), (123,), (431,), (1000, 3)]:
        tensors.append(_random_tensor(shape, dtype))
        expected.append(_bytes(tensors[-1]))
    layout = plan_layout(tensors)

    buf = K.pack(tensors)
    _assert_entries(buf, layout, expected)
    mask = _entry_mask(layout)
    _assert_same_bytes(buf[mask], K.pack_reference(tensors, layout)[mask])
    for view, want in zip(K.unpack(buf, layout), expected):
        _assert_same_bytes(_bytes(view), want)

    dests = [Dest(shape, dtype, op) for name, (shape, op) in VIEWS.items() if name != "expand_rows"]
    values = [_random_tensor(d.view.shape, dtype) for d in dests]
    vl = plan_layout(values)
    K.unpack_into(K.pack_reference(values, vl), vl, [d.view for d in dests])
    for v, d in zip(values, dests):
        d.check(v)


def test_gpu_unpack_into_and_reassemble_into_write_only_their_regions():
    values, dests = _dests()
    layout = plan_layout(values)
    K.unpack_into(K.pack_reference(values, layout), layout, [d.view for d in dests])
    for v, d in zip(values, dests):
        d.check(v)

    for world in (2, 4):
        values, dests = _dests()
        flags = tuple(v.numel() % world == 0 and i % 3 != 1 for i, v in enumerate(values))
        layout, gathered, parts = _tp_gather(values, world, flags)
        K.reassemble_into(gathered, layout, [d.view for d in dests], sliced=flags, part=parts[0])
        for v, d in zip(values, dests):
            d.check(v)


@pytest.mark.parametrize("world", [1, 2, 4])
def test_gpu_reassemble_matches_reference(world):
    tensors = [
        _random_tensor((64, 96), torch.bfloat16),
        _random_tensor((12,), torch.int8),
        _random_tensor((4, 3, 2), torch.float32),
        _random_tensor((7, 3), torch.int16),
        _random_tensor((8,), torch.complex128),
    ]
    flags = tuple(t.numel() % world == 0 for t in tensors)
    layout, gathered, parts = _tp_gather(tensors, world, flags)
    part = None if all(flags) else parts[-1]
    big = torch.full((layout.nbytes + 64,), CANARY, dtype=torch.uint8, device=CUDA)

    views = K.reassemble(gathered, layout, sliced=flags, part=part, out=big[32:])
    for v, t, r in zip(
        views, tensors, K.reassemble_reference(gathered, layout, sliced=flags, part=part)
    ):
        _assert_same_bytes(_bytes(v), _bytes(t))
        _assert_same_bytes(_bytes(v), _bytes(r))
    _assert_untouched(big[:32])
    _assert_untouched(big[32 + layout.nbytes :])


# ----------------------------------------------------------------------------- large payloads


def test_gpu_large_payload_is_exact_and_stays_in_bounds():
    big_contig = _random_tensor((16 << 20,), torch.float32)  # 64 MiB
    tensors = [
        _random_tensor((5,), torch.int8),
        big_contig,
        _random_tensor((4096, 4097), torch.bfloat16)[:, 1:],  # 32 MiB, misaligned rows
        _random_tensor((2048, 2048), torch.float32).t(),  # 16 MiB, transposed
        _random_tensor((3,), torch.float64),
    ]
    layout = plan_layout(tensors)
    arena = torch.full((layout.nbytes + 4096,), CANARY, dtype=torch.uint8, device=CUDA)

    buf = K.pack(tensors, out=arena[2048:])
    mask = _entry_mask(layout)
    _assert_same_bytes(buf[mask], K.pack_reference(tensors, layout)[mask])
    _assert_untouched(arena[:2048])
    _assert_untouched(arena[2048 + layout.nbytes :])
    _assert_untouched(buf[~mask])

    outs = [_canary(t.shape, t.dtype) for t in tensors]
    K.unpack_into(buf, layout, outs)
    for o, t in zip(outs, tensors):
        _assert_same_bytes(_bytes(o), _bytes(t))


def test_gpu_prefill_hidden_states_round_trip():
    hidden = [_random_tensor((4096, 4096), torch.bfloat16) for _ in range(2)]
    layout = plan_layout(hidden)
    buf = K.pack(hidden)
    for view, h in zip(K.unpack(buf, layout), hidden):
        _assert_same_bytes(_bytes(view), _bytes(h))

    # static buffers sized for a larger batch: rows after 4096 stay canary
    statics = [Dest((4608, 4096), torch.bfloat16, region=lambda t: t[:4096]) for _ in hidden]
    K.unpack_into(buf, layout, [d.view for d in statics])
    for h, d in zip(hidden, statics):
        d.check(h)

    lay2, gathered, _ = _tp_gather(hidden, 2, (True, True))
    for full, h in zip(K.reassemble(gathered, lay2), hidden):
        _assert_same_bytes(_bytes(full), _bytes(h))


# ----------------------------------------------------------------------------- no sync / graphs


def test_gpu_unpack_into_replays_in_a_cuda_graph():
    values, dests = _dests()
    layout = plan_layout(values)
    buf = K.pack_reference(values, layout)
    graph = _capture(lambda: K.unpack_into(buf, layout, [d.view for d in dests]))

    for _ in range(2):  # new contents in the source buffer, then replay
        values = [_random_tensor(v.shape, v.dtype) for v in values]
        buf.copy_(K.pack_reference(values, layout))
        graph.replay()
        torch.cuda.synchronize()
        for v, d in zip(values, dests):
            d.check(v)


def test_gpu_pack_replays_in_a_cuda_graph():
    bases = {name: _random_tensor(shape, torch.float16) for name, (shape, _) in VIEWS.items()}
    names = [n for n in VIEWS if n != "permute_5d"]  # the >4-dim fallback is not capturable
    tensors = [VIEWS[n][1](bases[n]) for n in names]
    layout = plan_layout(tensors)
    arena = torch.full((layout.nbytes + 64,), CANARY, dtype=torch.uint8, device=CUDA)
    graph = _capture(lambda: K.pack(tensors, out=arena[32:]))

    for base in bases.values():  # new source contents, same addresses
        base.copy_(_random_tensor(base.shape, base.dtype))
    graph.replay()
    torch.cuda.synchronize()
    expected = [VIEWS[n][1](_byte_twin(bases[n])).reshape(-1) for n in names]
    _assert_entries(arena[32:], layout, expected)
    _assert_untouched(arena[:32])
    _assert_untouched(arena[32 + layout.nbytes :])


def test_gpu_reassemble_into_replays_in_a_cuda_graph():
    values, dests = _dests()
    flags = tuple(v.numel() % 2 == 0 and i % 3 != 1 for i, v in enumerate(values))
    layout, gathered, parts = _tp_gather(values, 2, flags)
    part = parts[0]
    graph = _capture(
        lambda: K.reassemble_into(
            gathered, layout, [d.view for d in dests], sliced=flags, part=part
        )
    )

    values = [_random_tensor(v.shape, v.dtype) for v in values]
    _, new_gathered, new_parts = _tp_gather(values, 2, flags)
    gathered.copy_(new_gathered)
    part.copy_(new_parts[0])
    graph.replay()
    torch.cuda.synchronize()
    for v, d in zip(values, dests):
        d.check(v)


def test_gpu_warm_calls_do_not_synchronise():
    values, dests = _dests()
    layout = plan_layout(values)
    buf = torch.empty(layout.nbytes, dtype=torch.uint8, device=CUDA)
    flags = tuple(v.numel() % 2 == 0 for v in values)
    rl, gathered, parts = _tp_gather(values, 2, flags)

    K.pack(values, out=buf)  # plans built and cached
    K.unpack_into(buf, layout, [d.view for d in dests])
    out = torch.empty(rl.nbytes, dtype=torch.uint8, device=CUDA)
    K.reassemble(gathered, rl, sliced=flags, part=parts[1], out=out)
    torch.cuda.synchronize()

    torch.cuda.set_sync_debug_mode("error")
    try:
        K.pack(values, out=buf)
        K.unpack_into(buf, layout, [d.view for d in dests])
        full = K.reassemble(gathered, rl, sliced=flags, part=parts[1], out=out)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
    for v, d, f in zip(values, dests, full):
        d.check(v)
        _assert_same_bytes(_bytes(f), _bytes(v))


# ----------------------------------------------------------------------------- launch path


@pytest.fixture
def builds(monkeypatch) -> list[list[list[int]]]:
    """Rows of every plan built (one per cache miss), from an empty cache."""
    K.clear_plan_cache()
    seen: list[list[list[int]]] = []
    build = _copy.build_plan
    monkeypatch.setattr(
        _copy,
        "build_plan",
        lambda rows, device, **kw: seen.append(rows) or build(rows, device, **kw),
    )
    yield seen
    K.clear_plan_cache()


def test_gpu_fresh_buffers_and_tensors_every_hop_hit_one_plan(builds):
    shapes = [((8, 4096), torch.bfloat16), ((8, 4096), torch.bfloat16), ((8,), torch.int64)]
    for _ in range(4):
        srcs = [_random_tensor(s, d) for s, d in shapes]
        layout = plan_layout(srcs)
        buf = K.pack(srcs)  # a fresh output buffer too
        outs = [_canary(s.shape, s.dtype) for s in srcs]
        K.unpack_into(buf, layout, outs)
        for o, s in zip(outs, srcs):
            _assert_same_bytes(_bytes(o), _bytes(s))
    assert len(builds) == 2


def test_gpu_repeat_calls_launch_the_compiled_kernel_directly(builds, monkeypatch):
    srcs = [_random_tensor((4, 64), torch.float16) for _ in range(2)]
    buf = K.pack(srcs)
    torch.cuda.synchronize()
    assert torch.cuda.current_device() in _copy._DIRECT or _copy._launch_hooks_set()
    jit = []
    real = _copy._jit_launch
    monkeypatch.setattr(_copy, "_jit_launch", lambda g, a: jit.append(1) or real(g, a))
    for _ in range(3):
        srcs = [_random_tensor((4, 64), torch.float16) for _ in range(2)]
        buf = K.pack(srcs, out=buf)
        torch.cuda.synchronize()
        _assert_entries(buf, plan_layout(srcs), [_bytes(s) for s in srcs])
    assert not jit or _copy._launch_hooks_set(), "a warm launch went through the JIT"


@pytest.mark.parametrize(
    "dtype", [torch.int8, torch.bfloat16, torch.float32, torch.float64], ids=str
)
def test_gpu_tiled_transposes_are_exact(builds, dtype):
    bases = [_random_tensor((4096 + 16, 256 + 32), dtype), _random_tensor((3, 80, 1040), dtype)]
    srcs = [bases[0].t(), bases[1].transpose(1, 2)]
    layout = plan_layout(srcs)
    arena = torch.full((layout.nbytes + 64,), CANARY, dtype=torch.uint8, device=CUDA)
    buf = K.pack(srcs, out=arena[32:])
    _assert_entries(buf, layout, [_bytes(s) for s in srcs])
    _assert_untouched(arena[:32])
    _assert_untouched(arena[32 + layout.nbytes :])
    assert [r[0] for r in builds[-1]].count(_copy._TILED) == 2

    dests = [
        Dest(tuple(b.shape), dtype, op)
        for b, op in zip(bases, (lambda t: t.transpose(0, 1), lambda t: t.transpose(1, 2)))
    ]
    values = [_random_tensor(d.view.shape, dtype) for d in dests]
    vl = plan_layout(values)
    K.unpack_into(K.pack_reference(values, vl), vl, [d.view for d in dests])
    for v, d in zip(values, dests):
        d.check(v)
    assert [r[0] for r in builds[-1]].count(_copy._TILED) == 2


def test_gpu_a_dropped_table_outlives_a_pending_launch_on_another_stream(monkeypatch):
    """The cache drops a plan while its launch still waits behind a long kernel on a side
    stream; freed at once, its table would be reused (and overwritten) before the launch reads
    it. The copy must still be exact."""
    K.clear_plan_cache()
    monkeypatch.setattr(K.ops._PLANS, "capacity", 1)
    src = _random_tensor((37, 4096), torch.bfloat16).t()
    layout = plan_layout([src])
    out = torch.full((layout.nbytes,), CANARY, dtype=torch.uint8, device=CUDA)
    K.pack([src], out=out)  # plan built and cached on the default stream
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    out.fill_(CANARY)
    torch.cuda.synchronize()
    with torch.cuda.stream(side):
        torch.cuda._sleep(200_000_000)  # ~0.1 s of device time ahead of the launch
        K.pack([src], out=out)
    other = _random_tensor((3, 5), torch.float32).t()
    K.pack([other])  # evicts the first plan while its launch is pending on `side`
    assert K.ops._PLANS.pending >= 1
    junk = [torch.full((1 << 16,), -1, dtype=torch.int64, device=CUDA) for _ in range(64)]
    side.synchronize()
    del junk
    _assert_same_bytes(out[: layout.nbytes], _bytes(src))
    K.clear_plan_cache()


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_gpu_launches_on_the_tensors_device():
    with torch.cuda.device(0):
        src = _random_tensor((33, 65), torch.float16).to("cuda:1").t()
        buf = K.pack([src])
        torch.cuda.synchronize(1)
    assert buf.device == torch.device("cuda", 1)
    _assert_same_bytes(buf[: src.numel() * 2].cpu(), _bytes(src).cpu())


def test_gpu_threads_on_their_own_streams_share_the_cache():
    import threading

    K.clear_plan_cache()
    errors = []

    def worker(i: int) -> None:
        try:
            stream = torch.cuda.Stream()
            with torch.cuda.stream(stream):
                for step in range(20):
                    srcs = [
                        _random_tensor((8 + i, 256), torch.bfloat16),
                        _random_tensor((256, 8 + step % 3), torch.float32).t(),
                    ]
                    buf = K.pack(srcs)
                    stream.synchronize()
                    _assert_entries(buf, plan_layout(srcs), [_bytes(s) for s in srcs])
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    if errors:
        raise errors[0]
    K.clear_plan_cache()
