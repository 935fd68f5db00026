#!/usr/bin/env bash
# One prepared GPU check for pipepack: environment, offline install, kernel + AOT + GPU tests,
# the kernel benchmark, pp/pipeline hooks, and a short summary printed LAST.
#
# Run from the repo root on the GPU machine:
#   bash bench/gpu_check.sh
# Logs and results land in $OUT when it is set (the device machine sets it), else in
# bench/results/gpu_check_<UTC time>: gpu_tests.log, bench_kernels.log, kernels_<device>.json,
# summary.txt, steps/<step>.log; kernels_<device>.json is also copied to bench/results/. The whole script stays under GPU_CHECK_TOTAL_S (default 430 s, plus the summary): every step
# runs under `timeout` with what is left of that budget, so one hung step cannot eat the rest.
# No `set -e`: a failing step is recorded and the next one still runs.

set -u
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.." || exit 1
shopt -s nullglob

PY=${PYTHON:-python3}
OUTDIR=${OUT:-bench/results/gpu_check_$(date -u +%Y%m%dT%H%M%SZ)}
TOTAL_S=${GPU_CHECK_TOTAL_S:-430}
RESERVE_S=20 # kept back for the summary
mkdir -p "$OUTDIR/steps" "$OUTDIR/sweep" bench/results
STATUS=() # one "name|rc|seconds|note" per step

budget() { # budget CAP: seconds a step may run: CAP, or what is left minus the reserve
  local cap=$1 left=$((TOTAL_S - SECONDS - RESERVE_S))
  if ((left < cap)); then echo "$left"; else echo "$cap"; fi
}

step() { # step NAME CAP LOG CMD...: CMD under timeout, output into LOG and steps/NAME.log
  local name=$1 cap=$2 log=$3
  shift 3
  local t steplog="$OUTDIR/steps/$name.log"
  t=$(budget "$cap")
  if ((t < 10)); then
    echo "== $name: SKIPPED, time budget spent" | tee -a "$log"
    STATUS+=("$name|skip|0|time budget spent")
    return 0
  fi
  echo "== $name (timeout ${t}s): $*" | tee -a "$log" >"$steplog"
  local t0=$SECONDS
  timeout -k 10 "$t" "$@" 2>&1 | tee -a "$log" "$steplog"
  local rc=${PIPESTATUS[0]}
  echo "== $name: rc=$rc after $((SECONDS - t0))s" | tee -a "$log"
  STATUS+=("$name|$rc|$((SECONDS - t0))|$(_note "$steplog" "$rc")")
}

_note() { # the pytest tally of a step's log, or a word for timeouts
  local tally
  tally=$(grep -E '(passed|failed|error|skipped|deselected|no tests ran).* in [0-9.]+s' "$1" |
    tail -1 | sed -E 's/=//g; s/^ +//; s/ +$//')
  if [ "$2" = 124 ] || [ "$2" = 137 ]; then
    echo "TIMEOUT ${tally}"
  else
    echo "${tally}"
  fi
}

echo "pipepack GPU check: $(date -u +%FT%TZ) in $PWD, logs in $OUTDIR"

# ----------------------------------------------------------------------------- environment
{
  timeout 30 nvidia-smi -L
  timeout 30 nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
  timeout 60 "$PY" - <<'EOF'
import platform, sys
print("python", platform.python_version(), sys.executable)
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    print("device", torch.cuda.get_device_name(0), torch.cuda.get_device_capability(0))
try:
    import triton
    print("triton", triton.__version__)
except Exception as exc:
    print("triton import failed:", exc)
EOF
} 2>&1 | tee "$OUTDIR/env.log"

# ----------------------------------------------------------------------------- install (offline)
INSTALL="none"
t_install=$SECONDS
ilog="$OUTDIR/steps/install.log"
if timeout "$(budget 90)" "$PY" -m pip install --no-deps --no-build-isolation -e . -q \
  >"$ilog" 2>&1; then
  INSTALL="editable"
else
  echo "editable install failed (see $ilog); trying --target /tmp/pp_site"
  rm -rf /tmp/pp_site
  if timeout "$(budget 90)" "$PY" -m pip install --no-deps --no-build-isolation \
    --target /tmp/pp_site . \
    >>"$ilog" 2>&1; then
    INSTALL="target /tmp/pp_site"
    export PYTHONPATH=/tmp/pp_site${PYTHONPATH:+:$PYTHONPATH}
  fi
fi
if ! timeout 60 "$PY" -c "import pipepack.kernels" >>"$ilog" 2>&1; then
  # last resort: the source folders linked as the namespace package setuptools would build
  echo "pip install did not give an importable pipepack; linking kernels/ and pp/"
  rm -rf /tmp/pp_link && mkdir -p /tmp/pp_link/pipepack
  ln -s "$PWD/kernels" /tmp/pp_link/pipepack/kernels
  ln -s "$PWD/pp" /tmp/pp_link/pipepack/pp
  export PYTHONPATH=/tmp/pp_link${PYTHONPATH:+:$PYTHONPATH}
  INSTALL="symlinks /tmp/pp_link"
fi
if timeout 60 "$PY" -c "import pipepack.kernels as k; print('pipepack.kernels from', k.__file__)" \
  2>&1 | tee -a "$ilog"; then
  STATUS+=("install|0|$((SECONDS - t_install))|$INSTALL")
else
  STATUS+=("install|1|$((SECONDS - t_install))|pipepack.kernels not importable")
fi

# ----------------------------------------------------------------------------- tests
PYTEST=("$PY" -m pytest -q -p no:cacheprovider)
if timeout 60 "$PY" -c "import pytest_timeout" 2>/dev/null; then
  PYTEST+=(--timeout=120)
fi
# the GPU tests first (compiled kernels, fused ops, graphs), then the rest of the suite: the pp
# tests run over gloo / the same-host ring on this machine's CPUs with its torch
step gpu_tests 150 "$OUTDIR/gpu_tests.log" "${PYTEST[@]}" -m gpu tests/
step all_tests 200 "$OUTDIR/all_tests.log" "${PYTEST[@]}" -m "not slow" -x tests/

# ----------------------------------------------------------------------------- kernel benchmark
step bench_kernels 240 "$OUTDIR/bench_kernels.log" "$PY" bench/bench_kernels.py --out "$OUTDIR"
for f in "$OUTDIR"/kernels_*.json; do cp -f "$f" bench/results/; done
# fused receive op (unpack_add_rmsnorm) vs unpack + add + RMSNorm, fold / fp8 send: device µs
step bench_fused 120 "$OUTDIR/bench_fused.log" "$PY" bench/bench_fused.py --quick --out "$OUTDIR"

# ============================================================================================
# tuning sweep: block size and warps of the contiguous path, block size of the strided path
# (environment overrides read by pipepack.kernels._copy at import)
# ============================================================================================
SWEEP=${GPU_CHECK_SWEEP:-1}
((SWEEP)) && for vb in 2048 4096 8192; do
  for nw in 4 8; do
    step "sweep_vb${vb}_nw${nw}" 40 "$OUTDIR/sweep.log" env PIPEPACK_VEC_BLOCK=$vb \
      PIPEPACK_NUM_WARPS=$nw "$PY" bench/bench_kernels.py --ops pack \
      --payloads big_128MiB,hidden_bs4096,hidden_bs8,mixed16 --out "$OUTDIR/sweep/vb${vb}_nw${nw}.json"
  done
done
# tile side of the transposed path (64 words; 8-byte words use half)
((SWEEP)) && for tile in 32 64 128; do
  step "sweep_tile${tile}" 40 "$OUTDIR/sweep.log" env PIPEPACK_TILE=$tile \
    "$PY" bench/bench_kernels.py --ops pack,unpack_into,reassemble \
    --payloads transposed_bs256,transposed_bs4096 --out "$OUTDIR/sweep/tile${tile}.json"
done
((SWEEP)) && for sb in 512 2048 4096; do
  step "sweep_sb${sb}" 40 "$OUTDIR/sweep.log" env PIPEPACK_STRIDED_BLOCK=$sb \
    "$PY" bench/bench_kernels.py --ops pack,unpack_into \
    --payloads transposed_bs4096,columns_bs256 --out "$OUTDIR/sweep/sb${sb}.json"
done

# bench_p2p's NCCL variant needs one GPU per rank (NCCL refuses two ranks on one device), so
# a one-GPU machine runs its gloo (CPU) variant only, as a second CPU data point; with several
# GPUs run: torchrun --nproc_per_node=2 bench/bench_p2p.py --backend nccl
((SWEEP)) && [ -f bench/bench_p2p.py ] && step bench_p2p_cpu 90 "$OUTDIR/bench_p2p.log" \
  "$PY" bench/bench_p2p.py --quick --out "$OUTDIR/p2p_gloo_gpuhost.json"

# ----------------------------------------------------------------------------- summary (last)
JSON=""
for f in "$OUTDIR"/kernels_*.json; do JSON=$f; done
{
  echo
  echo "==================== pipepack GPU check summary ($((SECONDS))s) ===================="
  grep -E '^(device|torch|triton|python) ' "$OUTDIR/env.log" | tr '\n' ';' | sed 's/;$/\n/'
  printf '%-14s %-5s %-6s %s\n' step rc time result
  for s in "${STATUS[@]}"; do
    IFS='|' read -r name rc secs note <<<"$s"
    printf '%-14s %-5s %-6s %s\n' "$name" "$rc" "${secs}s" "$note"
  done
  if [ -n "$JSON" ]; then
    timeout 30 "$PY" - "$JSON" <<'EOF'
import json, sys

records = json.load(open(sys.argv[1]))
timing = [r for r in records if r.get("record") == "timing"]
errors = [r for r in records if r.get("record") == "error"]
by = {}
for r in timing:
    by.setdefault((r["op"], r["payload"]), []).append(r)


def best_alt(op, payload):
    alts = [r for r in by.get((op, payload), []) if not r["method"].startswith("pipepack")]
    return min(alts, key=lambda r: r["median_us"]) if alts else None


def mine(op, payload):
    return next((r for r in by.get((op, payload), []) if r["method"] == "pipepack"), None)


def speedup(op, payload):
    m, a = mine(op, payload), best_alt(op, payload)
    return f"x{a['median_us'] / m['median_us']:.2f}" if m and a else "-"


print("pack, device µs median [host µs]; xN = best alternative / pipepack (>1: pipepack wins)")
print(f"{'payload':<18} {'pipepack':>18} {'best alternative':>34} {'copy':>9} "
      f"{'pack':>6} {'unpack':>6} {'reasm':>6}")
payloads = list(dict.fromkeys(r["payload"] for r in timing))
for p in payloads:
    m, a = mine("pack", p), best_alt("pack", p)
    floor = next((r for r in by.get(("copy", p), [])), None)
    mcell = f"{m['median_us']:.1f} [{m['host_us']:.0f}]" if m else "FAILED"
    acell = f"{a['method']} {a['median_us']:.1f} [{a['host_us']:.0f}]" if a else "-"
    fcell = f"{floor['median_us']:.1f}" if floor else "-"
    print(f"{p:<18} {mcell:>18} {acell:>34} {fcell:>9} {speedup('pack', p):>6} "
          f"{speedup('unpack_into', p):>6} {speedup('reassemble', p):>6}")
print(f"bench: {len(timing)} timings, {len(errors)} failures", end="")
print(": " + "; ".join(f"{e['op']}/{e['payload']}/{e['method']}: {e['error'][:60]}"
                       for e in errors[:3]) if errors else "")
EOF
  else
    echo "no kernels_*.json in $OUTDIR: see $OUTDIR/bench_kernels.log"
  fi
  timeout 30 "$PY" - "$OUTDIR/sweep" <<'EOF'
import glob, json, os, sys

rows = {}
for path in sorted(glob.glob(os.path.join(sys.argv[1], "*.json"))):
    name = os.path.basename(path)[:-5]
    for r in json.load(open(path)):
        if r.get("record") == "timing" and r["method"] == "pipepack":
            rows.setdefault((r["op"], r["payload"]), {})[name] = r["median_us"]
if rows:
    names = sorted({n for v in rows.values() for n in v})
    print("sweep, pipepack device µs median:", " ".join(f"{n:>9}" for n in names))
    for (op, payload), v in rows.items():
        cells = " ".join(f"{v[n]:>9.1f}" if n in v else f"{'-':>9}" for n in names)
        print(f"{op + ' ' + payload:<34} {cells}")
EOF
  echo "logs: $OUTDIR (gpu_tests.log, bench_kernels.log, steps/*.log)"
} 2>&1 | tee "$OUTDIR/summary.txt"

FAILED=0
for s in "${STATUS[@]}"; do
  IFS='|' read -r _ rc _ _ <<<"$s"
  [ "$rc" = 0 ] || [ "$rc" = skip ] || [ "$rc" = 5 ] || FAILED=1
done
exit "$FAILED"
