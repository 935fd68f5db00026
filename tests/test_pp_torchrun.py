"""One real ``torchrun`` launch (env:// rendezvous, --standalone picks a free port).

The rest of the multi-process tests fork ranks directly (~0.1 s each); this one checks that the
transport also works the way engines start it: separate interpreters launched by torchrun.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

SCRIPT = pathlib.Path(__file__).with_name("torchrun_smoke.py")


def test_torchrun_two_ranks_exchange_hops_bit_exactly() -> None:
    """Two torchrun ranks exchange hops over gloo with the functional API; bytes match."""
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        str(SCRIPT),
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run(
        cmd, capture_output=True, text=True, timeout=120, env=env, cwd=SCRIPT.parent.parent
    )
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-4000:]
    for rank in (0, 1):
        assert f"PIPEPACK_TORCHRUN_OK rank={rank} hops=4" in r.stdout, out[-4000:]
    assert "PIPEPACK_TORCHRUN_MISMATCH" not in r.stdout
