# Fused wire-op benchmark: unpack_add_rmsnorm against unpack + torch add + torch RMSNorm (and a
# standalone fused add+RMSNorm when vLLM / flashinfer / sgl_kernel is importable), the residual
# fold and the fp8 wire on the send side, and the fp8 error on the reference model's activations.
#
# Reproduce (repo root, after `python -m pip install --no-deps --no-build-isolation -e .`):
#   python bench/bench_fused.py            # CUDA when available (Triton kernels), else CPU
#   python bench/bench_fused.py --quick    # fewer sizes and repeats, a smoke run
# Output: markdown tables on stdout, JSON in bench/results/fused_<device-slug>.json (`--out`).
"""Times the fused wire ops against the torch code they replace.

Each (case, method) is first run once and its result compared with the pipepack reference
(bit for bit for pipepack's own ops); a wrong result is reported as WRONG and not timed.
Baselines compute the same thing with torch's own summation order, so they are compared within
a tolerance, and their results are never asserted equal to the fused op's.

CUDA: device time per call from CUDA events around a batch of calls, queued behind a GPU spin
(``torch.cuda._sleep``) so the host enqueues the batch before the device reaches it: the events
time device work, not Python. ``host µs`` is the call timed without synchronising.
CPU: ``time.perf_counter`` per call, one torch thread; pipepack runs its torch path there (the
reference), so CPU rows say what the references cost, not what the kernels do.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import statistics
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.functional as F

from pipepack.kernels import fused as Fz
from pipepack.kernels import pack, plan_layout, unpack

RESULTS_DIR = Path(__file__).resolve().parent / "results"
EPS = 1e-6
_SLEEP_CYCLES_PER_S = 2.0e9


# ----------------------------------------------------------------------------- baselines


def _torch_rmsnorm_vllm_style(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The RMSNorm most model code runs eagerly (vLLM's forward_native, refmodel.RMSNorm)."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + EPS)
    return xf.to(x.dtype) * weight


def _standalone_fused() -> dict[str, Callable]:
    """In-place fused add+RMSNorm ops that happen to be importable: (input, residual, w) -> None."""
    found: dict[str, Callable] = {}
    try:
        from vllm import _custom_ops as vops  # type: ignore

        found["vllm fused_add_rms_norm"] = lambda x, r, w: vops.fused_add_rms_norm(x, r, w, EPS)
    except Exception:
        pass
    try:
        import flashinfer  # type: ignore

        found["flashinfer fused_add_rmsnorm"] = lambda x, r, w: flashinfer.norm.fused_add_rmsnorm(
            x, r, w, EPS
        )
    except Exception:
        pass
    try:
        import sgl_kernel  # type: ignore

        found["sgl_kernel fused_add_rmsnorm"] = lambda x, r, w: sgl_kernel.fused_add_rmsnorm(
            x, r, w, EPS
        )
    except Exception:
        pass
    return found


# ----------------------------------------------------------------------------- timing


def _time_cpu(fn: Callable, repeats: int) -> dict:
    fn()
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e6)
    return _stats(samples)


def _time_cuda(fn: Callable, repeats: int, batch: int = 32) -> dict:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(batch):
        fn()
    host_us = (time.perf_counter() - t0) / batch * 1e6
    torch.cuda.synchronize()
    samples = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda._sleep(int(min(50e-3, 2 * batch * host_us * 1e-6 + 1e-3) * _SLEEP_CYCLES_PER_S))
        start.record()
        for _ in range(batch):
            fn()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) * 1e3 / batch)
    out = _stats(samples)
    out["host_us"] = round(host_us, 2)
    return out


def _stats(samples: list[float]) -> dict:
    samples = sorted(samples)
    q = lambda p: samples[min(len(samples) - 1, int(p * len(samples)))]  # noqa: E731
    return {
        "median_us": round(statistics.median(samples), 2),
        "p20_us": round(q(0.2), 2),
        "p80_us": round(q(0.8), 2),
        "n": len(samples),
    }


# ----------------------------------------------------------------------------- cases


def _activations(T: int, H: int, dtype: torch.dtype, device) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(T * 7 + H)
    h = torch.randn(T, H, generator=g).to(dtype)
    r = (4 * torch.randn(T, H, generator=g)).to(dtype)
    w = (0.5 + torch.rand(H, generator=g)).to(dtype)
    return h.to(device), r.to(device), w.to(device)


def _bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.equal(
        a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8)
    )


def receive_rows(device, sizes, repeats, timer) -> list[dict]:
    rows: list[dict] = []
    fused_ops = _standalone_fused() if device.type == "cuda" else {}
    for T, H in sizes:
        rows += _receive_case(device, T, H, repeats, timer, fused_ops)
    return rows


def _receive_case(device, T, H, repeats, timer, fused_ops) -> list[dict]:
    rows = []
    dtype = torch.bfloat16
    h, r, w = _activations(T, H, dtype, device)
    buf, layout = pack([h, r]), plan_layout([h, r])
    out = torch.empty(T, H, dtype=dtype, device=device)
    res = torch.empty_like(out)
    want_out, want_res = Fz.unpack_add_rmsnorm_reference(buf, layout, 0, 1, w, EPS)

    def fused(order="vllm"):
        return Fz.unpack_add_rmsnorm(
            buf, layout, 0, 1, w, EPS, order=order, out=out, residual_out=res
        )

    def unfused_rms_norm():
        hv, rv = unpack(buf, layout)
        x = hv + rv
        return F.rms_norm(x, (H,), w, EPS), x

    def unfused_native():
        hv, rv = unpack(buf, layout)
        x = hv + rv
        return _torch_rmsnorm_vllm_style(x, w), x

    methods: dict[str, tuple[Callable, Callable[[], str | None]]] = {}

    def check_exact():
        o, rr = fused()
        return None if _bits_equal(o, want_out) and _bits_equal(rr, want_res) else "WRONG"

    def check_close(fn):
        def check():
            o, rr = fn()
            if not _bits_equal(rr, want_res):
                return "WRONG"
            ok = torch.allclose(o.float(), want_out.float(), rtol=2e-2, atol=2e-2)
            return None if ok else "WRONG"

        return check

    methods["pipepack unpack_add_rmsnorm"] = (fused, check_exact)
    fi_out, fi_res = Fz.unpack_add_rmsnorm_reference(buf, layout, 0, 1, w, EPS, order="flashinfer")

    def check_flashinfer():
        o, rr = fused("flashinfer")
        return None if _bits_equal(o, fi_out) and _bits_equal(rr, fi_res) else "WRONG"

    methods["pipepack (flashinfer order)"] = (lambda: fused("flashinfer"), check_flashinfer)
    methods["unpack + add + F.rms_norm"] = (unfused_rms_norm, check_close(unfused_rms_norm))
    methods["unpack + add + native RMSNorm"] = (unfused_native, check_close(unfused_native))
    for name, op in fused_ops.items():
        hv0, rv0 = unpack(buf, layout)
        scratch_h, scratch_r = hv0.clone(), rv0.clone()

        def standalone(op=op, scratch_h=scratch_h, scratch_r=scratch_r):
            op(scratch_h, scratch_r, w)
            return scratch_h, scratch_r

        methods[name] = (standalone, lambda: None)
    for name, (fn, check) in methods.items():
        verdict = check()
        row = {"op": "receive", "T": T, "H": H, "method": name, "device": device.type}
        if verdict is None:
            row.update(timer(fn, repeats))
        else:
            row["verdict"] = verdict
        rows.append(row)
    ref = rows[0].get("median_us")  # pipepack unpack_add_rmsnorm, the first method
    for r_ in rows:
        if ref and r_.get("median_us"):
            r_["pipepack_speedup"] = round(r_["median_us"] / ref, 2)
    return rows


def send_rows(device, sizes, repeats, timer) -> list[dict]:
    rows: list[dict] = []
    for T, H in sizes:
        rows += _send_case(device, T, H, repeats, timer)
    return rows


def _send_case(device, T, H, repeats, timer) -> list[dict]:
    rows = []
    h, r, _ = _activations(T, H, torch.bfloat16, device)
    methods = {
        "pack [h, r]": (lambda: pack([h, r]), plan_layout([h, r]).nbytes),
        "torch add + pack [h+r]": (lambda: pack([h + r]), plan_layout([h]).nbytes),
        "pack_wire fold": (
            lambda: Fz.pack_wire([h, r], fold=(0, 1))[0],
            Fz.plan_wire([(h.dtype, h.shape)] * 2, fold=(0, 1)).layout.nbytes,
        ),
        "pack_wire fold + fp8": (
            lambda: Fz.pack_wire([h, r], fold=(0, 1), fp8=(0,))[0],
            Fz.plan_wire([(h.dtype, h.shape)] * 2, fold=(0, 1), fp8=(0,)).layout.nbytes,
        ),
        "pack_wire fp8 [h, r]": (
            lambda: Fz.pack_wire([h, r], fp8=(0, 1))[0],
            Fz.plan_wire([(h.dtype, h.shape)] * 2, fp8=(0, 1)).layout.nbytes,
        ),
    }
    ref_fold, _ = Fz.pack_wire_reference([h, r], fold=(0, 1))
    for name, (fn, nbytes) in methods.items():
        row = {"op": "send", "T": T, "H": H, "method": name, "bytes": nbytes, "device": device.type}
        if name == "pack_wire fold" and not _bits_equal(
            fn()[: h.numel() * 2], ref_fold[: h.numel() * 2]
        ):
            row["verdict"] = "WRONG"
        else:
            row.update(timer(fn, repeats))
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------- fp8 error


def fp8_error(tokens: int) -> dict:
    """Relative error of the fp8 wire on the reference model's boundary activations (bf16),
    against randn; and the drift of the logits when the stage boundary goes through fp8."""
    from pipepack.pp.refmodel import ModelConfig, build_stage, sample_tokens

    config = ModelConfig(dtype=torch.bfloat16, layers=4)
    stages = [build_stage(config, s, 2) for s in range(2)]
    ids = sample_tokens(config, [tokens], seed=3)[0]

    def rel(x: torch.Tensor, y: torch.Tensor) -> dict:
        x, y = x.float(), y.float()
        row_amax = x.abs().amax(dim=1, keepdim=True).clamp_min(1e-30)
        return {
            "rel_fro": round(float((y - x).norm() / x.norm()), 5),
            "max_abs_over_row_amax": round(float(((y - x).abs() / row_amax).max()), 5),
            "median_rel": round(
                float(((y - x).abs() / x.abs().clamp_min(1e-30))[x != 0].median()), 5
            ),
        }

    def roundtrip(x: torch.Tensor) -> torch.Tensor:
        q, s = Fz.quantize_fp8_reference(x)
        return Fz.dequantize_fp8_reference(q, s, x.dtype)

    with torch.no_grad():
        boundary = stages[0]({"input_ids": ids})
        exact = stages[1](boundary)["logits"].float()
        h, r = boundary["hidden_states"], boundary["residual"]
        report = {
            "model": f"refmodel hidden={config.hidden} layers={config.layers} bf16, "
            f"{tokens} tokens, boundary after layer 2",
            "hidden_states": rel(h, roundtrip(h)),
            "residual": rel(r, roundtrip(r)),
            "folded_sum": rel(h + r, roundtrip(h + r)),
        }
        z = torch.randn(h.shape, generator=torch.Generator().manual_seed(5)).to(h.dtype)
        report["randn_same_shape"] = rel(z, roundtrip(z))
        for name, hop in {
            "fp8 hidden + fp8 residual": {"hidden_states": roundtrip(h), "residual": roundtrip(r)},
            "fold + fp8 (sum in residual, zero hidden)": None,
        }.items():
            if hop is None:
                # the folded hop feeds the next layer the received sum as its residual and no
                # hidden: the equivalent dict is hidden = 0, residual = round-trip(h + r)
                hop = {"hidden_states": torch.zeros_like(h), "residual": roundtrip(h + r)}
            logits = stages[1](hop)["logits"].float()
            report[name] = {
                "logits_max_abs": round(float((logits - exact).abs().max()), 4),
                "logits_max_abs_exact_scale": round(float(exact.abs().max()), 4),
                "top1_agreement": round(
                    float((logits.argmax(-1) == exact.argmax(-1)).float().mean()), 4
                ),
            }
    return report


# ----------------------------------------------------------------------------- main


def _slug(device: torch.device) -> str:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"cpu_{platform.machine()}_{torch.get_num_threads()}t"
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def _table(rows: list[dict], keys: list[str]) -> str:
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for r in rows:
        lines.append("| " + " | ".join(str(r.get(k, r.get("verdict", ""))) for k in keys) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer sizes and repeats")
    ap.add_argument("--cpu", action="store_true", help="CPU even when CUDA is present")
    ap.add_argument("--out", type=Path, default=None, help="JSON path or directory")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads on CPU")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    decode = [(1, 4096), (8, 4096), (32, 4096), (64, 4096), (1, 8192), (64, 8192)]
    prefill = [(512, 4096), (4096, 4096)]
    if args.quick:
        decode, prefill = [(1, 4096), (64, 8192)], [(512, 4096)]
    repeats = 5 if args.quick else (30 if device.type == "cuda" else 15)
    timer = _time_cuda if device.type == "cuda" else _time_cpu
    rows = receive_rows(device, decode + prefill, repeats, timer)
    rows += send_rows(device, decode[:2] + prefill, repeats, timer)
    err = fp8_error(64 if args.quick else 300)
    result = {
        "when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "quick": args.quick,
        "rows": rows,
        "fp8_error": err,
    }
    keys = [
        "op",
        "T",
        "H",
        "method",
        "median_us",
        "p20_us",
        "p80_us",
        "host_us",
        "pipepack_speedup",
    ]
    print(_table([r for r in rows if r["op"] == "receive"], keys))
    print()
    print(
        _table(
            [r for r in rows if r["op"] == "send"],
            ["op", "T", "H", "method", "bytes", "median_us", "p20_us", "p80_us", "host_us"],
        )
    )
    print()
    print(json.dumps(err, indent=1))
    out = args.out or RESULTS_DIR
    if out.suffix != ".json":
        out = out / f"fused_{_slug(device)}{'_quick' if args.quick else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
