"""The repeat-hop paths: the codec's per-signature plan, the CPU pack by address and the
unchecked unpack. Each must give exactly what the fully checked path gives, and never reuse
what it cached for an input the full path would treat differently."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from _checks import decode_encoded
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipepack.kernels import Layout, pack, plan_layout, unpack
from pipepack.kernels.ops import (
    pack_cpu_begin,
    pack_cpu_finish,
    pack_cpu_unchecked,
    unpack_unchecked,
)
from pipepack.pp import codec
from pipepack.pp.wire import (
    DEFAULT_LIMITS,
    Limits,
)
from pipepack.testing import check_dict, random_bytes, raw_bytes

DTYPES = [
    torch.bool,
    torch.uint8,
    torch.int8,
    torch.int16,
    torch.int32,
    torch.int64,
    torch.float16,
    torch.bfloat16,
    torch.float32,
    torch.float64,
    torch.complex64,
    torch.complex128,
    torch.float8_e4m3fn,
    torch.float8_e5m2,
]


def _random(shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    return random_bytes(shape, dtype, torch.Generator().manual_seed(seed))


def _round_trip(d: dict[str, Any], enc: codec.Encoded) -> dict[str, Any]:
    return decode_encoded(enc)


def _same_encoding(a: codec.Encoded, b: codec.Encoded) -> None:
    assert a.body == b.body
    assert (a.flags, a.tp_world) == (b.flags, b.tp_world)
    assert a.parts == b.parts
    assert a.sources.keys() == b.sources.keys()
    for dev in a.sources:
        assert len(a.sources[dev]) == len(b.sources[dev])
        for x, y in zip(a.sources[dev], b.sources[dev]):
            assert x.data_ptr() == y.data_ptr() and x.shape == y.shape and x.dtype == y.dtype


# one hop's recipe: which keys, each a tensor (dtype, shape, device) or a plain value
_KEY = st.sampled_from(["hidden_states", "residual", "positions", "t3", "x"])
_TENSOR = st.tuples(
    st.sampled_from(DTYPES),
    st.lists(st.integers(0, 5), min_size=0, max_size=3).map(tuple),
    st.sampled_from(["cpu", "cpu", "cpu", "meta"]),
)
_PLAIN = st.one_of(
    st.none(),
    st.integers(-(2**70), 2**70),
    st.text(max_size=6),
    st.lists(st.one_of(st.none(), st.integers(0, 9)), max_size=4),
    st.just("nested"),  # a list holding one tensor
)
_RECIPE = st.dictionaries(_KEY, st.one_of(_TENSOR, _PLAIN), max_size=5)


def _build(recipe: dict[str, Any], seed: int) -> dict[str, Any]:
    d: dict[str, Any] = {}
    for i, (k, spec) in enumerate(recipe.items()):
        if isinstance(spec, tuple):
            dtype, shape, dev = spec
            d[k] = _random(shape, dtype, seed + i).to(dev)
        elif spec == "nested":
            d[k] = [_random((3,), torch.int32, seed + i)]
        else:
            d[k] = spec
    return d


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_RECIPE, min_size=1, max_size=4), st.integers(0, 3))
def test_repeat_encodings_match_the_full_encoding(recipes: list, repeats: int) -> None:
    """Hops of a few signatures, each sent several times with new tensors and new plain values:
    the planned encoding equals the fully checked one and round-trips bit-exactly."""
    seed = 0
    for _ in range(repeats + 1):
        for r in recipes:
            seed += 17
            d = _build(r, seed)
            kw = dict(allow_pickle=False, limits=DEFAULT_LIMITS, tp=None, all_gather_tensors=None)
            enc = codec.encode(d, **kw)
            full, _ = codec._encode_full(d, False, DEFAULT_LIMITS, None, None)
            _same_encoding(enc, full)
            check_dict(_round_trip(d, enc), d)


def test_a_plan_is_not_reused_under_other_limits() -> None:
    d = {"a": torch.ones(3), "b": torch.ones(2), "c": 1}
    kw = dict(allow_pickle=False, tp=None, all_gather_tensors=None)
    for _ in range(2):
        codec.encode(d, limits=DEFAULT_LIMITS, **kw)
    strict = Limits(max_entries=3)
    with pytest.raises(ValueError, match="max_entries=3"):
        codec.encode(d, limits=strict, **kw)
    with pytest.raises(ValueError, match="max_ndim=0"):
        codec.encode(d, limits=Limits(max_ndim=0), **kw)


def test_a_plan_never_accepts_what_the_full_encoding_refuses() -> None:
    class Key(str):
        pass

    kw = dict(allow_pickle=False, limits=DEFAULT_LIMITS, tp=None, all_gather_tensors=None)
    codec.encode({"k": torch.ones(2), "v": [1]}, **kw)
    codec.encode({"k": torch.ones(2), "v": [1]}, **kw)
    with pytest.raises(TypeError, match="keys must be str"):
        codec.encode({Key("k"): torch.ones(2), "v": [1]}, **kw)
    sparse = torch.eye(2).to_sparse()
    with pytest.raises(TypeError, match="dense"):
        codec.encode({"k": sparse, "v": [1]}, **kw)
    with pytest.raises(TypeError, match="unsupported dtype"):
        q = torch.quantize_per_tensor(torch.ones(2), 0.1, 0, torch.quint8)
        codec.encode({"k": q, "v": [1]}, **kw)
    # a plain value that needs pickle, where the cached plan's values did not
    with pytest.raises(TypeError, match="allow_pickle=True"):
        codec.encode({"k": torch.ones(2), "v": [object()]}, **kw)


def _strange_sources(seed: int) -> list[torch.Tensor]:
    """Sources pack must read through their strides: every dtype dense, plus views."""
    out = [_random((5, 3), dt, seed + i) for i, dt in enumerate(DTYPES)]
    base = _random((6, 7), torch.float32, seed)
    c = _random((4,), torch.complex64, seed + 99)
    out += [
        base.t(),  # transposed
        base[:, ::2],  # step slice
        base[2, 3],  # 0-dim view with an offset
        torch.empty(0, 4),  # empty
        _random((1, 3), torch.bfloat16, seed).expand(5, 3),  # stride 0
        c.conj(),  # lazy conjugate: the bytes must be conjugated
        c.conj().imag,  # negative view
        _random((13,), torch.int8, seed + 7),  # odd size
        _random((), torch.float64, seed + 8),  # 0-dim
    ]
    return out


@pytest.mark.parametrize("lead", [0, 16, 48])
def test_pack_cpu_unchecked_matches_pack_with_canaries(lead: int) -> None:
    srcs = _strange_sources(5)
    layout = plan_layout(srcs)
    want = torch.full((lead + layout.nbytes + 32,), 0xA5, dtype=torch.uint8)
    got = want.clone()
    pack(srcs, out=want[lead : lead + layout.nbytes], layout=layout)
    pack_cpu_unchecked(srcs, layout, got[lead : lead + layout.nbytes])
    assert torch.equal(got, want)
    assert (got[:lead] == 0xA5).all() and (got[lead + layout.nbytes :] == 0xA5).all()
    for v, t in zip(unpack(got[lead : lead + layout.nbytes], layout), srcs):
        assert torch.equal(raw_bytes(v), raw_bytes(t.resolve_conj().resolve_neg()))


def test_unpack_unchecked_gives_unpacks_views() -> None:
    srcs = _strange_sources(11)
    layout = plan_layout(srcs)
    head = torch.zeros(80 + layout.nbytes + 16, dtype=torch.uint8)
    buf = head[80 : 80 + layout.nbytes]  # a view at an offset, as the link hands it out
    pack(srcs, out=buf, layout=layout)
    a, b = unpack(buf, layout), unpack_unchecked(buf, layout)
    assert len(a) == len(b) == len(layout.entries)
    for x, y in zip(a, b):
        assert x.dtype == y.dtype and x.shape == y.shape and x.stride() == y.stride()
        assert x.data_ptr() == y.data_ptr()
    # a longer buffer: only the layout's bytes are viewed
    c = unpack_unchecked(head[80:], layout)
    assert [t.data_ptr() for t in c] == [t.data_ptr() for t in a]
    assert unpack_unchecked(torch.zeros(0, dtype=torch.uint8), Layout((), 0)) == []


@pytest.mark.parametrize("chunk", [16, 48, 4096, 1 << 20])
def test_chunked_pack_hands_out_each_chunk_once_it_is_final(chunk: int) -> None:
    """pack_cpu_finish(ready=...) calls ready(start, end) in order, the chunks tile the payload,
    and each chunk's bytes are already the final packed bytes when it is handed out."""
    srcs = _strange_sources(3) + [_random((700,), torch.float32, 1)]
    layout = plan_layout(srcs)
    want = torch.full((layout.nbytes,), 0x5A, dtype=torch.uint8)
    pack(srcs, out=want, layout=layout)
    out = torch.full((layout.nbytes + 64,), 0x5A, dtype=torch.uint8)
    body = out[: layout.nbytes]
    seen = []

    def ready(s: int, e: int) -> None:
        assert torch.equal(body[s:e], want[s:e]), f"chunk [{s}, {e}) handed out unwritten"
        seen.append((s, e))

    dense = pack_cpu_begin(srcs, layout, body)
    pack_cpu_finish(srcs, layout, body, dense, chunk=chunk, ready=ready)
    assert seen == [(s, min(s + chunk, layout.nbytes)) for s in range(0, layout.nbytes, chunk)]
    assert torch.equal(body, want) and (out[layout.nbytes :] == 0x5A).all()
