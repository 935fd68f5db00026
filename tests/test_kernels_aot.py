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

# Every @triton.jit kernel that is launched (helpers it calls are compiled with it), plus the
# tiled transpose helper alone, so its PTX can be read apart from the other modes.
_COMPILE = r"""
import json, re, sys

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from pipepack.kernels import _copy

assert not _copy.INTERPRETED, "the subprocess must run the real compiler"


@triton.jit
def tiled_only(row_addr, src_addr, dst_addr, WORD: tl.constexpr, VEC: tl.constexpr,
               T: tl.constexpr):
    row_ptr = tl.multiple_of(row_addr.to(tl.pointer_type(tl.int64)), 16)
    _copy._copy_tiled(row_ptr, tl.program_id(0).to(tl.int64), src_addr, dst_addr, WORD, VEC, T,
                      T)


def count(ptx, pattern):
    return len(re.findall(pattern, ptx))


summary = {}
for cc in map(int, sys.argv[1:]):
    # the launched kernel: every argument an int64, no constexpr, no specialisation
    src = ASTSource(
        fn=_copy._copy_segments_kernel,
        signature={name: "i64" for name in _copy._ARG_NAMES},
        constexprs={},
    )
    kernel = triton.compile(src, target=GPUTarget("cuda", cc, 32), options={"num_warps": 4})
    ptx = kernel.asm["ptx"]
    target = re.search(r"^\.target\s+(\w+)", ptx, re.M)
    info = {
        "ptx_len": len(ptx),
        "cubin_len": len(kernel.asm["cubin"]),
        "target": target.group(1) if target else None,
        "entry": "_copy_segments_kernel" in ptx,
        "params": count(ptx, r"\.param \.u64 [\w]*_copy_segments_kernel_param_\d+"),
        "ld_v4": count(ptx, r"ld\.global(\.\w+)*\.v4"),
        "st_v4": count(ptx, r"st\.global(\.\w+)*\.v4"),
        "tiled": {},
    }
    for word, vec, side in (("int8", 16, _copy.TILE), ("int16", 8, _copy.TILE),
                            ("int32", 4, _copy.TILE), ("int64", 2, max(_copy.TILE // 2, 16))):
        t = triton.compile(
            ASTSource(
                fn=tiled_only,
                signature={"row_addr": "i64", "src_addr": "i64", "dst_addr": "i64",
                           "WORD": "constexpr", "VEC": "constexpr", "T": "constexpr"},
                constexprs={"WORD": getattr(tl, word), "VEC": vec, "T": side},
            ),
            target=GPUTarget("cuda", cc, 32),
            options={"num_warps": 4},
        )
        tptx = t.asm["ptx"]
        # 16-byte vectors: .v4 of 32-bit lanes, or .v2 of 64-bit ones
        info["tiled"][word] = {
            "ld_vec16": count(tptx, r"ld\.global(\.\w+)*\.v4\.b32")
            + count(tptx, r"ld\.global(\.\w+)*\.v2\.b64"),
            "st_vec16": count(tptx, r"st\.global(\.\w+)*\.v4\.b32")
            + count(tptx, r"st\.global(\.\w+)*\.v2\.b64"),
            "shared": t.metadata.shared,
        }
    summary[cc] = info
print(json.dumps(summary))
"""


@pytest.fixture(scope="module")
def compiled(tmp_path_factory: pytest.TempPathFactory) -> dict[int, dict]:
    """One subprocess compiles the kernel for every capability (~3 s each)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path_factory.mktemp("triton_cache"))
    script = tmp_path_factory.mktemp("aot") / "compile_kernels.py"  # @jit needs a source file
    script.write_text(_COMPILE)
    result = subprocess.run(
        [sys.executable, str(script), *map(str, CAPABILITIES)],
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


@pytest.mark.parametrize("cc", CAPABILITIES)
def test_every_kernel_argument_is_a_plain_integer(compiled, cc):
    """The direct launch passes the table, the buffer and the pointers as integers: the
    compiled entry must take exactly those (no constexpr, no dropped specialised argument)."""
    from pipepack.kernels import _copy

    assert compiled[cc]["params"] == len(_copy._ARG_NAMES)


@pytest.mark.parametrize("cc", CAPABILITIES)
@pytest.mark.parametrize("word", ["int8", "int16", "int32", "int64"])
def test_tiled_transpose_moves_16_byte_vectors_both_ways(compiled, cc, word):
    """Full tiles load along the source's rows and store along the destination's columns with
    16-byte vectors (the masked tail tile stays scalar), through shared memory."""
    info = compiled[cc]["tiled"][word]
    assert info["ld_vec16"] > 0, f"no 16-byte loads in the tiled path ({word})"
    assert info["st_vec16"] > 0, f"no 16-byte stores in the tiled path ({word})"
    assert info["shared"] > 0, "the tile does not go through shared memory"
