"""Runs a function on N fork-started gloo ranks (``file://`` init, no ports) with a timeout."""

from __future__ import annotations

import datetime
import os
import tempfile
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _entry(rank: int, world: int, init_file: str, fn, args, timeout_s: float, errdir: str):
    try:
        torch.set_num_threads(1)  # as torchrun does (OMP_NUM_THREADS=1) for several local ranks
        dist.init_process_group(
            "gloo",
            init_method=f"file://{init_file}",
            rank=rank,
            world_size=world,
            timeout=datetime.timedelta(seconds=timeout_s),
        )
        try:
            fn(rank, world, *args)
        finally:
            from pipepack.pp import REAPER, reset_channels

            REAPER.drain(timeout=timeout_s)
            reset_channels()
            dist.destroy_process_group()
    except BaseException:
        with open(os.path.join(errdir, f"rank{rank}.err"), "w") as f:
            f.write(traceback.format_exc())
        os._exit(1)
    os._exit(0)


def run_ranks(world: int, fn, *args, timeout_s: float = 60.0) -> None:
    """Runs ``fn(rank, world, *args)`` on ``world`` processes; re-raises a rank's failure."""
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "init")
        ctx = mp.start_processes(
            _entry,
            args=(world, init_file, fn, args, timeout_s, tmp),
            nprocs=world,
            join=False,
            start_method="fork",
        )
        deadline = timeout_s + 30
        import time

        t0 = time.monotonic()
        crashed = None
        while True:
            try:
                if ctx.join(timeout=1):
                    break
            except mp.ProcessExitedException as e:  # read the ranks' tracebacks below
                crashed = e
                for p in ctx.processes:
                    if p.is_alive():
                        p.join(timeout=5)
                        if p.is_alive():
                            p.kill()
                break
            if time.monotonic() - t0 > deadline:
                for p in ctx.processes:
                    p.kill()
                raise TimeoutError(f"ranks did not finish within {deadline} s")
        errors = []
        for r in range(world):
            path = os.path.join(tmp, f"rank{r}.err")
            if os.path.exists(path):
                errors.append(f"--- rank {r} ---\n" + open(path).read())
        if errors:
            raise AssertionError("\n".join(errors))
        if crashed is not None:
            raise AssertionError(f"a rank died without a traceback: {crashed}")
