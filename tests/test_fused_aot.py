"""Ahead-of-time compile of the fused wire kernels for sm_80 and sm_90, without a GPU.

The CPU tests run these kernels under the Triton interpreter only; this proves they compile to
PTX and a cubin for both architectures (the fp8 encode / decode are integer code, so sm_80,
which has no fp8 conversions, compiles them too), that rows of 16-byte-aligned hidden sizes
move as 16-byte vectors (``ld.global.v4`` / ``st.global.v4``), and that nothing was contracted
into a multiply-add (``fma.rn.f32``): the bit-exactness against the references relies on that.

Runs in a subprocess with ``TRITON_INTERPRET`` unset and a fresh ``TRITON_CACHE_DIR`` (see
tests/test_kernels_aot.py for why).
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
# (name, model dtype, H, fp8 hidden, order): what the receive kernel is specialised on
RECV_CASES = [
    ("bf16_4096_vllm", "bf16", 4096, False, 0),
    ("fp16_5120_flashinfer", "fp16", 5120, False, 1),
    ("bf16_8192_flashinfer", "bf16", 8192, False, 1),
    ("bf16_4099_vllm", "bf16", 4099, False, 0),
    ("bf16_4096_fp8", "bf16", 4096, True, 0),
]
ALIGNED = [name for name, _, H, _, _ in RECV_CASES if H % 8 == 0]

_COMPILE = r"""
import json, re, sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from pipepack.kernels import _fused_kernels as K
from pipepack.kernels import fused as F

assert not F.INTERPRETED, "the subprocess must run the real compiler"
cases = json.loads(sys.argv[1])
caps = json.loads(sys.argv[2])
DT = {"bf16": 0, "fp16": 1, "fp32": 2}


def recv(cc, dt, H, fp8, order):
    block, rows, _, warps = F._recv_config(1, H)
    sig = {
        "h_ptr": "*u8" if fp8 else f"*{dt}", "hs_ptr": "*fp32", "r_ptr": f"*{dt}",
        "rs_ptr": "*fp32", "w_ptr": f"*{dt}", "out_ptr": f"*{dt}", "res_ptr": f"*{dt}",
        "T": "i32", "eps": "fp32", "out_rs": "i32", "out_cs": "constexpr", "res_rs": "i32",
        "res_cs": "constexpr",
    }
    consts = {
        "out_cs": 1, "res_cs": 1, "H": H, "BLOCK": block, "LOG2": block.bit_length() - 1,
        "ROWS": rows, "DT": DT[dt], "HAS_RES": True, "H_FP8": fp8, "R_FP8": False,
        "NORM": True, "ORDER": order,
    }
    sig.update({k: "constexpr" for k in consts})
    # what the JIT sees for 16-byte-aligned tensors and row strides divisible by 16
    div = [0, 1, 2, 3, 4, 5, 6] + ([9, 11] if H % 16 == 0 else [])
    src = ASTSource(fn=K._recv_norm_kernel, signature=sig, constexprs=consts,
                    attrs={(i,): [["tt.divisibility", 16]] for i in div})
    return triton.compile(src, target=GPUTarget("cuda", cc, 32),
                          options={"num_warps": warps, **F.LAUNCH_OPTIONS})


def wire(cc):
    sig = {"table_ptr": "*i64", "base_addr": "i64"}
    consts = {"ROW_LEN": K.ROW, "VBLOCK": F._VBLOCK, "BBLOCK": F._BBLOCK, "FBLOCK": F._FBLOCK,
              "QBLOCK": 8192}
    sig.update({k: "constexpr" for k in consts})
    src = ASTSource(fn=K._pack_wire_kernel, signature=sig, constexprs=consts,
                    attrs={(0,): [["tt.divisibility", 16]]})
    return triton.compile(src, target=GPUTarget("cuda", cc, 32),
                          options={"num_warps": 4, **F.LAUNCH_OPTIONS})


def info(kernel, entry):
    ptx = kernel.asm["ptx"]
    target = re.search(r"^\.target\s+(\w+)", ptx, re.M)
    return {
        "ptx_len": len(ptx),
        "cubin_len": len(kernel.asm["cubin"]),
        "target": target.group(1) if target else None,
        "entry": entry in ptx,
        "ld_v4": ptx.count("ld.global.v4"),
        "st_v4": ptx.count("st.global.v4"),
        "fma_f32": len(re.findall(r"\bfma\.rn\.f32\b", ptx)),
        "local": ptx.count(".local"),
    }


summary = {}
for cc in caps:
    for name, dt, H, fp8, order in cases:
        summary[f"{cc}/{name}"] = info(recv(cc, dt, H, fp8, order), "_recv_norm_kernel")
    summary[f"{cc}/wire"] = info(wire(cc), "_pack_wire_kernel")
print(json.dumps(summary))
"""


@pytest.fixture(scope="module")
def compiled(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path_factory.mktemp("triton_cache_fused"))
    result = subprocess.run(
        [sys.executable, "-c", _COMPILE, json.dumps(RECV_CASES), json.dumps(CAPABILITIES)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, f"compile failed:\n{result.stderr[-4000:]}"
    return json.loads(result.stdout.strip().splitlines()[-1])


KERNELS = [case[0] for case in RECV_CASES] + ["wire"]


@pytest.mark.parametrize("name", KERNELS)
@pytest.mark.parametrize("cc", CAPABILITIES)
def test_compiles_to_ptx_and_cubin(compiled, cc, name):
    info = compiled[f"{cc}/{name}"]
    assert info["ptx_len"] > 0 and info["cubin_len"] > 0
    assert info["entry"], "the PTX does not define the kernel"
    assert info["target"] is not None and info["target"].startswith(f"sm_{cc}")


@pytest.mark.parametrize("name", ALIGNED + ["wire"])
@pytest.mark.parametrize("cc", CAPABILITIES)
def test_aligned_rows_move_16_byte_vectors(compiled, cc, name):
    info = compiled[f"{cc}/{name}"]
    assert info["ld_v4"] > 0, "no ld.global.v4: the row loads lost their 16-byte vectors"
    assert info["st_v4"] > 0, "no st.global.v4: the row stores lost their 16-byte vectors"


@pytest.mark.parametrize("name", KERNELS)
@pytest.mark.parametrize("cc", CAPABILITIES)
def test_no_multiply_add_contraction(compiled, cc, name):
    assert compiled[f"{cc}/{name}"]["fma_f32"] == 0, (
        "fma.rn.f32 in the PTX: results would not match the references bit for bit"
    )


@pytest.mark.parametrize("name", KERNELS)
@pytest.mark.parametrize("cc", CAPABILITIES)
def test_no_register_spills(compiled, cc, name):
    assert compiled[f"{cc}/{name}"]["local"] == 0, "local memory in the PTX: registers spill"
