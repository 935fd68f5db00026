"""Soak: 10 000 hops through one channel with 3 micro-batches in flight and shapes changing on
every hop. Resident memory stays flat after warm-up, threads and live tensors do not grow, the
send reaper drains, and every hop arrives in order with its own bytes.

The soak itself lives in ``bench/soak.py`` (which also prints the memory curve); this test runs
exactly that code on two fork-started gloo ranks and asserts on the samples it took.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import tempfile
from pathlib import Path

import pytest
from _dist import run_ranks

HOPS = 10_000
DEPTH = 3
EVERY = 500
WARMUP = 2_000
RSS_TOLERANCE = 1.05  # max RSS after warm-up / RSS at the end of warm-up
TENSOR_SLACK = 4  # a leak of one tensor per ~2000 hops after warm-up exceeds this
# the channel's send-buffer pool keeps up to 4 free buffers per size; this soak's hops need at
# most 16 sizes (13 measured): a bounded cache, counted apart from the other live tensors
POOL_BOUND = 4 * 16


def _load_soak():
    path = Path(__file__).resolve().parents[1] / "bench" / "soak.py"
    spec = importlib.util.spec_from_file_location("pipepack_bench_soak", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_soak_10000_hops_memory_threads_and_buffers_stay_flat() -> None:
    """After 2000 warm-up hops RSS stays within 5%, threads and live tensors do not grow."""
    soak = _load_soak()
    with tempfile.TemporaryDirectory() as tmp:
        run_ranks(2, soak.soak_rank, HOPS, DEPTH, EVERY, tmp, timeout_s=150)
        samples = {r: soak.load(os.path.join(tmp, f"soak{r}.json")) for r in range(2)}
    curve = "\n" + soak.table(samples)
    for rank, ss in samples.items():
        by_hop = {s.hop: s for s in ss}
        assert sorted(h for h in by_hop if h > 0) == list(range(EVERY, HOPS + 1, EVERY)), curve
        warm = by_hop[WARMUP]
        after = [s for s in ss if s.hop > WARMUP or s.hop < 0]  # hop -1: after the final drain
        during = [s for s in ss if 0 < s.hop <= WARMUP]
        rss_max = max(s.rss_bytes for s in after)
        assert rss_max <= RSS_TOLERANCE * warm.rss_bytes, (
            f"rank {rank}: RSS grew from {warm.rss_mib:.1f} MiB at hop {WARMUP} to "
            f"{rss_max / (1 << 20):.1f} MiB{curve}")
        assert max(s.threads for s in after) <= warm.threads, f"rank {rank}: threads grew{curve}"
        # the sender samples with no send in flight: besides its pooled buffers, the live
        # tensors after warm-up never exceed the warm-up peak, and their level does not creep
        own = [s.live_tensors - s.pooled_buffers for s in after]
        peak = max(s.live_tensors - s.pooled_buffers for s in during)
        assert max(own) <= peak + TENSOR_SLACK, (
            f"rank {rank}: live tensors above the warm-up peak {peak}{curve}")
        quarter = max(1, len(own) // 4)
        assert min(own[-quarter:]) <= min(own[:quarter]) + TENSOR_SLACK, (
            f"rank {rank}: the live tensor count creeps upwards{curve}")
        assert max(s.pooled_buffers for s in ss) <= POOL_BOUND, f"rank {rank}: pool{curve}"
        assert by_hop[-1].reaper_pending == 0, f"rank {rank}: sends still pending{curve}"
