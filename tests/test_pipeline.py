"""A real pipeline on the transport: the reference transformer split over PP (x TP) stages.

The claim protected here is the serving one: a forward-only pipeline of micro-batches driven by
:class:`pipepack.pp.StageDriver` produces logits *bit-equal* to the same model run in one
process, with several micro-batches of different token counts in flight, on every transport
path (header, declared, declared + ``wait_into`` static buffers, TP all-gather), and the
receive of the next micro-batch really overlaps the current one's compute.

"One process" means the very stage modules the pipeline runs, built in one process and called
in order (``reference_forward``): floating-point results depend on the op sequence, so only the
transport may differ between the two runs. The multi-process tests run on fork-started gloo
ranks; their NCCL variants run (spawned, one CUDA device per rank) where enough GPUs exist and
skip with the reason otherwise, with no code change between the two.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import pipepack.testing.ranks as _dist
from pipepack.pp import Declared, StageDriver, TensorDictChannel, Wire, shm
from pipepack.pp.refmodel import (
    ModelConfig,
    boundary_example,
    build_stage,
    reference_forward,
    sample_tokens,
    stage_layers,
)
from pipepack.testing import run_ranks

TIMEOUT_S = 60.0
ROOT = pathlib.Path(__file__).resolve().parent.parent
SIZES = [5, 1, 12, 3, 16, 7]  # token counts of the micro-batches: every size differs in turn
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _config(dtype: str, fused: bool = False) -> ModelConfig:
    return ModelConfig(
        vocab=96,
        hidden=64,
        heads=4,
        layers=4,
        mlp_ratio=2,
        dtype=DTYPES[dtype],
        fused_boundary_norm=fused,
    )


def _raw(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def _assert_bit_equal(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    assert got.dtype == want.dtype and tuple(got.shape) == tuple(want.shape), (
        f"{what}: {got.dtype} {tuple(got.shape)} != {want.dtype} {tuple(want.shape)}"
    )
    if not torch.equal(_raw(got).cpu(), _raw(want).cpu()):
        diff = (got.float() - want.float()).abs().max().item()
        raise AssertionError(f"{what}: bytes differ (max abs diff {diff})")


# ---------------------------------------------------------------------------------------------
# the reference model, in one process
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def one_thread():
    """One intra-op thread, as every rank runs: OpenMP threads spin-waiting on a busy 2-core
    machine turn milliseconds of tiny matmuls into seconds."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("dtype", sorted(DTYPES))
def test_reference_logits_do_not_depend_on_the_split(dtype: str, one_thread: None) -> None:
    """Chaining 1, 2, 3 or 4 stage modules in one process gives the same logits, bit for bit.

    So the stage boundary itself (a dict handed from one module to the next) changes nothing,
    and every seeded weight lands in the same layer whatever stage builds it.
    """
    config = _config(dtype)
    tokens = sample_tokens(config, SIZES)
    whole = reference_forward(config, tokens, num_stages=1)
    for n in (2, 3, 4):
        split = reference_forward(config, tokens, num_stages=n)
        for k, (a, b) in enumerate(zip(split, whole)):
            _assert_bit_equal(a, b, f"{n} stages, micro-batch {k}")
    assert all(
        t.dtype == config.dtype and t.shape == (s, config.vocab) for t, s in zip(whole, SIZES)
    )


def test_reference_init_is_seeded_and_leaves_the_global_rng_alone(one_thread: None) -> None:
    """Weights come only from per-tensor generators: same seed, same bytes; other seed differs."""
    config = _config("fp32")
    state = torch.random.get_rng_state()
    a = build_stage(config, 1, 2)  # layers 2, 3
    b = build_stage(config, 0, 1)  # layers 0..3
    assert torch.equal(torch.random.get_rng_state(), state), "init drew from the global RNG"
    for (name, p), (_, q) in zip(a.layers.named_parameters(), b.layers[2:].named_parameters()):
        _assert_bit_equal(p, q, name)
    other = build_stage(ModelConfig(**{**config.__dict__, "seed": 1}), 1, 2)
    assert not torch.equal(other.layers[0].attn.qkv, a.layers[0].attn.qkv)


def test_stage_layers_split_contiguously_and_cover_every_layer() -> None:
    for layers in (4, 5, 7):
        for n in range(1, 5):
            ranges = [stage_layers(layers, s, n) for s in range(n)]
            assert [i for r in ranges for i in r] == list(range(layers))
            assert max(map(len, ranges)) - min(map(len, ranges)) <= 1
    with pytest.raises(ValueError, match="at least as many layers"):
        stage_layers(2, 0, 3)


# ---------------------------------------------------------------------------------------------
# the driver's schedule, with recording fake channels (no processes)
# ---------------------------------------------------------------------------------------------


class _FakeRecv:
    declared = None

    def __init__(self, log: list) -> None:
        self.log = log
        self.posted = 0

    def irecv(self, num_tokens: int | None = None) -> Any:
        k = self.posted
        self.posted += 1
        self.log.append(("post", k))
        log = self.log

        class _Pending:
            def wait(self) -> dict:
                log.append(("wait", k))
                return {"k": k}

        return _Pending()


class _FakeSend:
    def __init__(self, log: list) -> None:
        self.log = log

    def isend(self, d: dict) -> list:
        k = d["k"]
        self.log.append(("send", k))
        log = self.log

        class _Handle:
            def wait(self) -> None:
                log.append(("send_done", k))

        return [_Handle()]


@pytest.mark.parametrize("depth", [1, 3])
def test_driver_posts_receives_ahead_and_sends_each_output_at_once(depth: int) -> None:
    """Before computing k the receives of k+1..k+depth are posted; k is sent right after it is
    computed; at most ``depth`` sends are pending; everything stays in micro-batch order."""
    n = 7
    log: list = []

    def module(x: dict) -> dict:
        log.append(("compute", x["k"]))
        return {"k": x["k"]}

    driver = StageDriver(
        module, recv_channel=_FakeRecv(log), send_channel=_FakeSend(log), depth=depth
    )
    assert driver.run(num_microbatches=n) == []
    at = {e: i for i, e in enumerate(log)}
    for k in range(n):
        for j in range(k + 1, min(k + depth, n - 1) + 1):
            assert at[("post", j)] < at[("compute", k)], f"receive {j} not posted before {k}"
        assert ("post", k + depth + 1) not in at or at[("post", k + depth + 1)] > at[
            ("wait", k + 1)
        ], "more than depth receives posted ahead"
        between = log[at[("compute", k)] + 1 : at[("send", k)]]
        assert all(e[0] == "send_done" for e in between), f"send {k} delayed by {between}"
        if k >= depth:
            assert at[("send_done", k - depth)] < at[("send", k)], "send window exceeded"
    assert [e[1] for e in log if e[0] == "compute"] == list(range(n))
    assert [e[1] for e in log if e[0] == "post"] == list(range(n))
    assert driver.last_times is not None and driver.last_times.microbatches == n


def test_driver_first_and_last_stage_and_bad_configuration() -> None:
    """First stage reads its inputs, last returns outputs; misuse fails before anything runs."""
    double = lambda x: {"y": x["x"] * 2}
    out = StageDriver(double).run([{"x": torch.tensor(i)} for i in range(4)])
    assert [int(o["y"]) for o in out] == [0, 2, 4, 6]
    with pytest.raises(ValueError, match="depth"):
        StageDriver(double, depth=0)
    with pytest.raises(ValueError, match="inputs"):
        StageDriver(double).run(num_microbatches=3)
    with pytest.raises(ValueError, match="num_microbatches"):
        StageDriver(double).run([{"x": torch.tensor(0)}], num_microbatches=2)
    with pytest.raises(ValueError, match="num_microbatches"):
        StageDriver(double, recv_channel=_FakeRecv([])).run()
    with pytest.raises(ValueError, match="static_inputs"):
        StageDriver(double, static_inputs={"x": torch.zeros(4)})

    with pytest.raises(ValueError, match="static_inputs or receive"):
        StageDriver(
            double,
            recv_channel=_FakeRecv([]),
            static_inputs={"x": torch.zeros(4)},
            receive=lambda p: p.wait(),
        )


# ---------------------------------------------------------------------------------------------
# the pipeline across processes: logits bit-equal to one process
# ---------------------------------------------------------------------------------------------


def _run_spawned(world: int, fn: Callable[..., None], *args: Any, timeout_s: float) -> None:
    """``run_ranks`` with spawn instead of fork: a forked child cannot use CUDA once the
    parent touched it (pytest's GPU kernel tests do), so the NCCL variants start fresh."""
    with tempfile.TemporaryDirectory() as tmp:
        ctx = mp.start_processes(
            _dist._entry,
            args=(world, os.path.join(tmp, "init"), fn, args, timeout_s, tmp),
            nprocs=world,
            join=False,
            start_method="spawn",
        )
        deadline = time.monotonic() + timeout_s + 60
        crashed = None
        try:
            while not ctx.join(timeout=1):
                if time.monotonic() > deadline:
                    for p in ctx.processes:
                        p.kill()
                    raise TimeoutError(f"ranks did not finish within {timeout_s + 60} s")
        except mp.ProcessExitedException as e:
            crashed = e
            for p in ctx.processes:
                p.join(timeout=5)
                if p.is_alive():
                    p.kill()
        errors = [
            open(os.path.join(tmp, f"rank{r}.err")).read()
            for r in range(world)
            if os.path.exists(os.path.join(tmp, f"rank{r}.err"))
        ]
        if errors or crashed is not None:
            raise AssertionError("\n".join(errors) or f"a rank died: {crashed}")


def _groups(stages: int, tp: int, backend: str):
    """(device, group, cpu_group, tp_group); every rank creates every group, in one order."""
    world, rank = dist.get_world_size(), dist.get_rank()
    device = torch.device("cpu")
    group = cpu_group = dist.group.WORLD  # the harness starts a gloo world
    if backend == "nccl":
        torch.cuda.set_device(rank)
        device = torch.device("cuda", rank)
        group = dist.new_group(list(range(world)), backend="nccl")
    tp_group = None
    for s in range(stages):
        g = dist.new_group([s * tp + r for r in range(tp)], backend=backend) if tp > 1 else None
        if s == rank // tp:
            tp_group = g
    return device, group, cpu_group, tp_group


def _pipeline_body(
    rank: int,
    world: int,
    stages: int,
    tp: int,
    dtype: str,
    depth: int,
    transport: str,
    backend: str,
    link: str = "dist",
) -> None:
    import pipepack.pp.link as link_mod

    link_mod.DEFAULT_TRANSPORT = link
    stage, tp_rank = divmod(rank, tp)
    device, group, cpu_group, tp_group = _groups(stages, tp, backend)
    fused = transport in ("fused", "fold")
    wire = Wire(fold=("hidden_states", "residual")) if transport == "fold" else None
    config = _config(dtype, fused)
    tokens = sample_tokens(config, SIZES)
    example = boundary_example(config, device)
    declared = Declared.from_example(example) if transport in ("declared", "static") else None

    def channel(peer: int) -> TensorDictChannel:
        return TensorDictChannel(
            peer,
            group=group,
            cpu_group=cpu_group,
            all_gather_group=tp_group,
            declared=declared,
            timeout=TIMEOUT_S,
            wire=wire,
            accept_wire=wire,
        )

    recv_ch = channel(rank - tp) if stage > 0 else None
    send_ch = channel(rank + tp) if stage < stages - 1 else None
    static = None
    if transport == "static" and recv_ch is not None:  # CUDA-graph style inputs, max size
        static = {
            k: torch.full(
                (max(SIZES),) + tuple(v.shape[1:]), float("nan"), dtype=v.dtype, device=device
            )
            for k, v in example.items()
        }
    module = build_stage(config, stage, stages, device)
    receive = None
    if fused and recv_ch is not None:  # the first layer's add + norm on the hop's own bytes
        norm = module.layers[0].input_norm

        def receive(p):
            return {**p.wait_add_rmsnorm(norm.weight.detach(), norm.eps), "__normed__": True}

    driver = StageDriver(
        module,
        recv_channel=recv_ch,
        send_channel=send_ch,
        depth=depth,
        num_tokens=SIZES,
        static_inputs=static,
        receive=receive,
    )
    if stage == 0:
        outs = driver.run([{"input_ids": t.to(device)} for t in tokens])
    else:
        outs = driver.run(num_microbatches=len(SIZES))
    for ch in (recv_ch, send_ch):
        if ch is not None:
            ch.close()
    if stage < stages - 1:
        assert outs == []
        return
    assert len(outs) == len(SIZES)
    want = reference_forward(config, tokens, num_stages=stages, device=device)
    for k, (got, ref) in enumerate(zip(outs, want)):
        assert got["logits"].device.type == device.type
        _assert_bit_equal(
            got["logits"], ref, f"stage {stage} tp rank {tp_rank}: logits of micro-batch {k}"
        )


def _cases() -> list:
    """PP 2, 3, 4 and pp2 x tp2, each in fp32 and bf16 at depth 1 and 3, the transport path
    rotating so each topology sees header, declared and declared + static buffers; each on
    gloo (CPU) and NCCL (CUDA, one device per rank)."""
    transports = ["header", "declared", "static"]
    cases = []
    i = 0
    for stages, tp in ((2, 1), (3, 1), (4, 1), (2, 2)):
        for dtype in ("fp32", "bf16"):
            for depth in (1, 3):
                transport = transports[i % 3]
                i += 1
                for backend in ("gloo", "nccl"):
                    world = stages * tp
                    marks = []
                    if backend == "nccl":
                        n = torch.cuda.device_count()
                        marks = [
                            pytest.mark.gpu,
                            pytest.mark.skipif(
                                n < world,
                                reason=f"the NCCL variant needs one CUDA device per rank "
                                f"({world}); this machine has {n}",
                            ),
                        ]
                    cases.append(
                        pytest.param(
                            stages,
                            tp,
                            dtype,
                            depth,
                            transport,
                            backend,
                            "dist",
                            marks=marks,
                            id=f"pp{stages}-tp{tp}-{dtype}-depth{depth}-{transport}-{backend}",
                        )
                    )
    # every topology once through the same-host ring, and through the fused receive op
    for stages, tp in ((2, 1), (3, 1), (4, 1), (2, 2)):
        # the ring forced, and the default (torch.distributed until the switch to the ring)
        links = (("shm", "auto") if tp == 1 else ("shm",)) if shm.available() else ()
        for link in links:
            cases.append(
                pytest.param(
                    stages,
                    tp,
                    "bf16",
                    2,
                    "declared",
                    "gloo",
                    link,
                    id=f"pp{stages}-tp{tp}-bf16-depth2-declared-{link}",
                )
            )
        cases.append(
            pytest.param(
                stages,
                tp,
                "bf16",
                2,
                "fused",
                "gloo",
                "auto",
                id=f"pp{stages}-tp{tp}-bf16-depth2-fused-auto",
            )
        )
    # the sender folds hidden + residual into one tensor, the receiver's fused op takes the sum
    for stages, tp in ((2, 1), (3, 1), (2, 2)):
        cases.append(
            pytest.param(
                stages,
                tp,
                "bf16",
                2,
                "fold",
                "gloo",
                "auto",
                id=f"pp{stages}-tp{tp}-bf16-depth2-fold-auto",
            )
        )
    return cases


@pytest.mark.parametrize("stages,tp,dtype,depth,transport,backend,link", _cases())
def test_pipeline_logits_bit_equal_to_one_process(
    stages: int, tp: int, dtype: str, depth: int, transport: str, backend: str, link: str
) -> None:
    """Micro-batches of varying token counts through the staged model, several in flight:
    every last-stage rank's logits equal the one-process run byte for byte, in order. The
    "fused" path receives with PendingRecv.wait_add_rmsnorm against a one-process run of the
    same op; "fold" also sends hidden + residual as one tensor (Wire(fold=...))."""
    world = stages * tp
    args = (stages, tp, dtype, depth, transport, backend, link)
    if backend == "nccl":
        _run_spawned(world, _pipeline_body, *args, timeout_s=TIMEOUT_S)
    else:
        run_ranks(world, _pipeline_body, *args, timeout_s=TIMEOUT_S)


# ---------------------------------------------------------------------------------------------
# one launch through real torchrun
# ---------------------------------------------------------------------------------------------


def test_torchrun_pipeline_matches_one_process() -> None:
    """bench/pipeline.py under torchrun (2 ranks, env:// rendezvous, gloo): MATCH, exit 0."""
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        str(ROOT / "bench" / "pipeline.py"),
        "--microbatches",
        "6",
        "--tokens",
        "16",
        "--hidden",
        "64",
        "--layers",
        "2",
        "--vocab",
        "96",
        "--depth",
        "2",
        "--transport",
        "pipepack_static",
        "--repeats",
        "1",
        "--warmup",
        "0",
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env, cwd=ROOT)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-4000:]
    assert "MATCH (vs one process" in r.stdout and "MISMATCH" not in r.stdout, out[-4000:]
