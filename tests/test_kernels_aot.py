"""Ahead-of-time compile of every Triton kernel for sm_80 and sm_90, without a GPU.

The CPU tests run the kernels under the Triton interpreter only, which accepts code the real
compiler rejects; this proves they compile to PTX and a cubin, and that the aligned fast path
really moves 16-byte vectors (``ld.global.v4`` / ``st.global.v4``).

The compile runs in a subprocess with ``TRITON_INTERPRET`` unset: in this process conftest set
it before the kernels were defined, and an interpreted ``@triton.jit`` object is not compiled.
A fresh ``TRITON_CACHE_DIR`` makes it a real compile, not a cache hit.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

if importlib.util.find_spec("triton.backends.nvidia") is None:
    pytest.skip("triton has no NVIDIA backend (triton.backends.nvidia)", allow_module_level=True)

CAPABILITIES = [80, 90]

# Every @triton.jit kernel that is launched (helpers it calls are compiled with it).
_COMPILE = r"""
import json, re, sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from pipepack.kernels import _copy

assert not _copy.INTERPRETED, "the subprocess must run the real compiler"
summary = {}
for cc in map(int, sys.argv[1:]):
    src = ASTSource(
        fn=_copy._copy_segments_kernel,
        signature={
            "table_ptr": "*i64",
            "base_addr": "i64",
            "ROW": "constexpr",
            "VEC_BLOCK": "constexpr",
            "STRIDED_BLOCK": "constexpr",
        },
        constexprs={
            "ROW": _copy._ROW,
            "VEC_BLOCK": _copy.VEC_BLOCK,
            "STRIDED_BLOCK": _copy.STRIDED_BLOCK,
        },
        attrs={(0,): [["tt.divisibility", 16]]},
    )
    kernel = triton.compile(src, target=GPUTarget("cuda", cc, 32), options={"num_warps": 4})
    ptx = kernel.asm["ptx"]
    target = re.search(r"^\.target\s+(\w+)", ptx, re.M)
    summary[cc] = {
        "ptx_len": len(ptx),
        "cubin_len": len(kernel.asm["cubin"]),
        "target": target.group(1) if target else None,
        "entry": "_copy_segments_kernel" in ptx,
        "ld_v4": ptx.count("ld.global.v4"),
        "st_v4": ptx.count("st.global.v4"),
    }
print(json.dumps(summary))
"""


@pytest.fixture(scope="module")
def compiled(tmp_path_factory: pytest.TempPathFactory) -> dict[int, dict]:
    """One subprocess compiles the kernel for every capability (~3 s each)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path_factory.mktemp("triton_cache"))
    result = subprocess.run(
        [sys.executable, "-c", _COMPILE, *map(str, CAPABILITIES)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, f"compile failed:\n{result.stderr[-4000:]}"
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    return {int(cc): info for cc, info in summary.items()}


@pytest.mark.parametrize("cc", CAPABILITIES)
def test_copy_kernel_compiles_to_ptx_and_cubin(compiled, cc):
    info = compiled[cc]
    assert info["ptx_len"] > 0 and info["cubin_len"] > 0
    assert info["entry"], "the PTX does not define _copy_segments_kernel"
    assert info["target"] is not None and info["target"].startswith(f"sm_{cc}")


@pytest.mark.parametrize("cc", CAPABILITIES)
def test_aligned_fast_path_moves_16_byte_vectors(compiled, cc):
    info = compiled[cc]
    assert info["ld_v4"] > 0, "no ld.global.v4: the aligned block copy lost its 16-byte loads"
    assert info["st_v4"] > 0, "no st.global.v4: the aligned block copy lost its 16-byte stores"
