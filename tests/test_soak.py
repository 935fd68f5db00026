"""Soaks: memory, threads and live buffers stay bounded over many hops (bench/soak.py).

- steady: hops through one channel with 3 micro-batches in flight and shapes changing on every
  hop. After warm-up, resident memory stays flat, threads and live tensors do not grow, the
  link's pools stay under their byte caps, the send reaper drains, and every hop arrives in
  order with its own bytes. 10 000 hops under the ``slow`` marker, 1 500 in the default run.
- serving: a round trip per step as an engine's stage makes it (activations with a token count
  drawn every step, fresh tensors, token ids back), every byte checked on both ends; no RSS
  trend between the two halves of the run after warm-up, threads and descriptors bounded.
- varying: blocking hops of two ``[T, hidden]`` bf16 keys with T drawn from 1000..4000 on every
  hop; the RSS growth of each side stays within 300 MiB (issue 9: 200 hops at hidden 4096,
  under the ``slow`` marker; the default run: 40 such hops over the same-host ring).

The soaks live in ``bench/soak.py`` (which also prints the curves); these tests run exactly
that code on two fork-started gloo ranks and assert on the samples it took.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import tempfile
from pathlib import Path

import pytest

from pipepack.testing import run_ranks

DEPTH = 3
RSS_TOLERANCE = 1.05  # max RSS after warm-up / RSS at the end of warm-up
TENSOR_SLACK = 4  # a leak of one tensor per ~2000 hops after warm-up exceeds this


def _load_soak():
    path = Path(__file__).resolve().parents[1] / "bench" / "soak.py"
    spec = importlib.util.spec_from_file_location("pipepack_bench_soak", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def _steady(hops: int, every: int, warmup: int, transport: str, timeout_s: float) -> None:
    soak = _load_soak()
    with tempfile.TemporaryDirectory() as tmp:
        run_ranks(2, soak.soak_rank, hops, DEPTH, every, tmp, transport, timeout_s=timeout_s)
        samples = {r: soak.load(os.path.join(tmp, f"soak{r}.json")) for r in range(2)}
        used = {
            r: json.load(open(os.path.join(tmp, f"soak{r}.json")))["transport"] for r in range(2)
        }
    curve = "\n" + soak.table(samples)
    if transport != "auto":
        assert used == {0: transport, 1: transport}, used
    for rank, ss in samples.items():
        by_hop = {s.hop: s for s in ss}
        assert sorted(h for h in by_hop if h > 0) == list(range(every, hops + 1, every)), curve
        warm = by_hop[warmup]
        after = [s for s in ss if s.hop > warmup or s.hop < 0]  # hop -1: after the final drain
        during = [s for s in ss if 0 < s.hop <= warmup]
        rss_max = max(s.rss_bytes for s in after)
        assert rss_max <= RSS_TOLERANCE * warm.rss_bytes, (
            f"rank {rank}: RSS grew from {warm.rss_mib:.1f} MiB at hop {warmup} to "
            f"{rss_max / (1 << 20):.1f} MiB{curve}"
        )
        assert max(s.threads for s in after) <= max(s.threads for s in during), (
            f"rank {rank}: threads grew{curve}"
        )
        # besides the pools' idle buffers, the live tensors after warm-up never exceed the
        # warm-up peak, and their level does not creep
        own = [s.live_tensors - s.pooled_buffers for s in after]
        peak = max(s.live_tensors - s.pooled_buffers for s in during)
        assert max(own) <= peak + TENSOR_SLACK, (
            f"rank {rank}: live tensors above the warm-up peak {peak}{curve}"
        )
        quarter = max(1, len(own) // 4)
        assert min(own[-quarter:]) <= min(own[:quarter]) + TENSOR_SLACK, (
            f"rank {rank}: the live tensor count creeps upwards{curve}"
        )
        # the three pools hold at most their byte caps (32 MiB each at these hop sizes)
        assert max(s.pooled_bytes for s in ss) <= 3 * (32 << 20), f"rank {rank}: pools{curve}"
        assert by_hop[-1].reaper_pending == 0, f"rank {rank}: sends still pending{curve}"


@pytest.mark.parametrize("transport", ["dist", "shm"])
def test_soak_1500_hops_memory_threads_and_buffers_stay_flat(transport: str) -> None:
    _steady(1_500, 250, 500, transport, timeout_s=120)


@pytest.mark.slow
@pytest.mark.parametrize("transport", ["dist", "shm"])
def test_soak_10000_hops_memory_threads_and_buffers_stay_flat(transport: str) -> None:
    """After 2000 warm-up hops RSS stays within 5%, threads and live tensors do not grow."""
    _steady(10_000, 500, 2_000, transport, timeout_s=300)


def _varying(hops: int, hidden: int, transport: str, budget_mib: float) -> None:
    soak = _load_soak()
    with tempfile.TemporaryDirectory() as tmp:
        run_ranks(2, soak.varying_rank, hops, hidden, 7, tmp, transport, timeout_s=600)
        res = {r: json.load(open(os.path.join(tmp, f"varying{r}.json"))) for r in range(2)}
    assert res[0]["tokens"] == res[1]["tokens"] and len(res[0]["tokens"]) == hops
    assert len(set(res[0]["tokens"])) > hops // 2, "token counts should change on every hop"
    assert res[0]["transport"] == res[1]["transport"] == transport
    report = {("sender", "receiver")[r]: round(soak.growth_mib(res[r]), 1) for r in (0, 1)}
    for r in (0, 1):
        assert soak.growth_mib(res[r]) <= budget_mib, (
            f"RSS growth per side {report} MiB, budget {budget_mib} MiB ({transport}); pool caps "
            f"{res[r]['pool_cap_bytes']}, hits {res[r]['pool_hits']}, misses "
            f"{res[r]['pool_misses']}"
        )


def test_varying_token_counts_40_hops_rss_growth_per_side() -> None:
    """The default run's share of the 200-hop run below: 40 hops over the same-host ring (the
    transport "auto" picks for local ranks)."""
    _varying(40, 4096, "shm", budget_mib=300)


@pytest.mark.slow
@pytest.mark.parametrize(
    "transport",
    [
        "dist",
        pytest.param(
            "shm",
            marks=pytest.mark.xfail(
                reason="open, not the ring: its grown segments are bounded at two hops' worth "
                "(118 MiB of the sender's RSS here), but the sender's growth also counts the heap "
                "glibc keeps from this test's own freed 8-32 MiB tensors, +63 or +150..190 MiB "
                "from run to run (+2 MiB with glibc's mmap threshold pinned at 1 MiB), which "
                "puts it at 300-325 MiB in about a quarter of the runs",
            ),
        ),
    ],
)
def test_varying_token_counts_200_hops_rss_growth_per_side(transport: str) -> None:
    """Issue 9: 200 hops, T in 1000..4000 drawn each hop, hidden 4096 bf16, 2 keys: RSS grows
    by at most 300 MiB per side."""
    _varying(200, 4096, transport, budget_mib=300)


@pytest.mark.parametrize("transport", ["dist", "auto"])
def test_serving_loop_exact_with_no_memory_trend(transport: str) -> None:
    """1500 steps (hidden 256: up to 4 MiB a hop, ~0.4 MiB on average): both ends check every
    byte; after the first fifth, the second half's RSS peak stays within the ring's slots x the
    largest hop plus one hop of the first half's (keeping every hop would add ~300 MiB), and the
    thread and descriptor counts stay within a few of where they were."""
    soak = _load_soak()
    import pipepack.pp.link as link_mod

    with tempfile.TemporaryDirectory() as tmp:
        run_ranks(2, soak.serving_rank, 1500, 600.0, 256, 0.05, 3, tmp, transport, timeout_s=600)
        res = {r: json.load(open(os.path.join(tmp, f"serving{r}.json"))) for r in range(2)}
    largest = 4096 * 256 * 2 * 2
    slack = (link_mod.RING_SLOTS + 1) * largest / 2**20
    for r in (0, 1):
        assert res[r]["steps"] == 1500
        if transport == "dist":
            assert res[r]["transport"] == "dist"
        sm = soak.serving_summary(res[r])
        assert len(res[r]["samples"]) >= 10, sm
        first, second = sm["peak_mib"]
        assert second <= first + slack, (r, sm)
        assert max(sm["threads"]) - min(sm["threads"]) <= 2, (r, sm)
        assert max(sm["fds"]) - min(sm["fds"]) <= 8, (r, sm)
