"""Run by tests/test_pp_torchrun.py under a real ``torchrun`` (env:// rendezvous, 2 ranks).

Each rank sends a few hops to the next rank in the ring and receives from the previous one with
the functional API over gloo; it prints a success line and exits 0 only if every received byte,
dtype, shape and plain value matched.
"""

from __future__ import annotations

import datetime
import os
import sys

import torch

if not torch.cuda.is_available():  # as tests/conftest.py: before any kernel is defined
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch.distributed as dist  # noqa: E402

from pipepack.pp import (  # noqa: E402
    REAPER,
    irecv_tensor_dict,
    isend_tensor_dict,
    recv_tensor_dict,
    reset_channels,
    send_tensor_dict,
)

HOPS = 4


def hop_dict(src: int, i: int) -> dict:
    g = torch.Generator().manual_seed(100 * src + i)
    t = 1 + 5 * i
    return {
        "hidden_states": torch.randn(t, 1024, generator=g).to(torch.bfloat16),
        "residual": torch.randn(1024, t, generator=g).t(),  # non-contiguous source
        "positions": torch.arange(t) + i,
        "__msg_type__": "proxy",
        "meta": (src, i, [None, True]),
    }


def same(got: dict, want: dict) -> bool:
    if list(got) != list(want):
        return False
    for k, w in want.items():
        v = got[k]
        if isinstance(w, torch.Tensor):
            if not isinstance(v, torch.Tensor) or v.dtype != w.dtype or v.shape != w.shape:
                return False
            a = v.contiguous().reshape(-1).view(torch.uint8)
            b = w.contiguous().reshape(-1).view(torch.uint8)
            if not torch.equal(a, b):
                return False
        elif type(v) is not type(w) or v != w:
            return False
    return True


def main() -> int:
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    rank, world = dist.get_rank(), dist.get_world_size()
    prev = (rank - 1) % world
    ok = world == 2
    for i in range(HOPS):
        if i % 2:
            send_tensor_dict(hop_dict(rank, i))
            got = recv_tensor_dict()
        else:
            isend_tensor_dict(hop_dict(rank, i))
            got, handles, post = irecv_tensor_dict()
            for h in handles:
                h.wait()
            for fn in post:
                fn()
        if not same(got, hop_dict(prev, i)):
            print(f"PIPEPACK_TORCHRUN_MISMATCH rank={rank} hop={i}", flush=True)
            ok = False
    ok = REAPER.drain(60) and ok
    reset_channels()
    dist.barrier()
    dist.destroy_process_group()
    if ok:
        print(f"PIPEPACK_TORCHRUN_OK rank={rank} hops={HOPS}", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
