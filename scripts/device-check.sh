#!/usr/bin/env bash
# GPU check for ffablate on an offline CUDA machine: build the extension against the torch there, run the
# CUDA tests (ops and data loader), the CUDA kernel benchmark, one epoch of FF (fused and reference kernels)
# and BP-DeepSup on the Fashion-MNIST carried in .data/, the 224x224 audit under an 8 GB cap, and in-process step
# A/Bs (fused/reference kernels with a device-time profile of the FF step; fused/default AdamW). Every section
# runs under its own timeout and the script keeps going when one fails; each section's rc and wall time land
# in $OUT/summary.json.
#
#   scripts/device-check.sh OUT_DIR [SECTION...]
#
# With SECTIONs (env build tests cluster-tests bench split audit train step) only those run, e.g. `build tests
# cluster-tests bench split` for a kernels-only check in about 3 minutes.
#
# Through the device tool: command `bash scripts/device-check.sh $OUT`, carry [".data", ".whl"] (Fashion-MNIST's
# four .gz files in .data/FashionMNIST/raw, ~30 MB; .whl/ holds wheels the offline image lacks, e.g. expecttest
# for torch.library.opcheck, installed below with --no-index when missing).
#
# Files written (few on purpose: the device runner returns at most 8):
#   device-check.log    all section logs, one after another (the split and step sections' output only here)
#   bench_kernels.json  ffablate.bench.kernel_bench("cuda") rows
#   train_gpu.json      the training runs (a warm-up, fused/reference alternating, coupled-bn FF, BP-DeepSup)
#   audit/audit_gpu.json, audit/audit_gpu.txt and the audit's PNG curves
#   summary.json        {"sections": [{"name", "rc", "seconds"}], ...}
# Budget: about 6 minutes in all (a session's whole GPU lease is 15 minutes, machine start included).
set -u

OUT=${1:?usage: scripts/device-check.sh OUT_DIR [SECTION...]}
shift
ONLY=" $* "
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # the in-place build, for scripts/*.py too
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export MAX_JOBS=${MAX_JOBS:-8}
LOG="$OUT/device-check.log"
: >"$LOG"
SECTIONS=()

# run_section NAME TIMEOUT_S CMD...: runs CMD with its output appended to the log, records rc and time.
run_section() {
    local name=$1 limit=$2
    shift 2
    if [[ "$ONLY" != "  " && "$ONLY" != *" $name "* ]]; then return 0; fi
    local t0 t1 rc
    t0=$(date +%s.%N)
    printf '\n===== %s (limit %ss): %s\n' "$name" "$limit" "$*" >>"$LOG"
    timeout --kill-after=15 "$limit" "$@" >>"$LOG" 2>&1
    rc=$?
    t1=$(date +%s.%N)
    local secs
    secs=$(awk -v a="$t0" -v b="$t1" 'BEGIN{printf "%.1f", b-a}')
    printf '===== %s: rc=%s in %ss\n' "$name" "$rc" "$secs" >>"$LOG"
    printf '%-10s rc=%-4s %7ss\n' "$name" "$rc" "$secs"
    SECTIONS+=("$name $rc $secs")
    LAST_RC=$rc
    return 0
}

if ! "$PY" -c "import expecttest" 2>/dev/null && compgen -G ".whl/*.whl" >/dev/null; then
    "$PY" -m pip install --no-index --no-deps --quiet .whl/*.whl >>"$LOG" 2>&1 ||
        "$PY" -m pip install --no-index --no-deps --quiet --break-system-packages .whl/*.whl >>"$LOG" 2>&1
fi

run_section env 60 bash -c "nvidia-smi; nvcc --version; echo CXX=${CXX:-}; \${CXX:-c++} --version | head -1; $PY - <<'EOF'
import sys, torch
print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda,
      'device', torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
if torch.cuda.is_available():
    print(torch.cuda.get_device_properties(0))  # SM count and L2 size, which the bandwidth figures depend on
import ffablate.bench, ffablate.ops  # noqa: F401  (must not need optuna)
assert 'optuna' not in sys.modules, 'ffablate.ops/bench imported optuna'
EOF"

# In-place build: ffablate/_C*.so next to ops.py, exactly what an editable install produces.
run_section build 150 env FFABLATE_BUILD=cuda TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=16 \
    "$PY" setup.py build_ext --inplace

# The CUDA-marked tests (every schedule, and since session 7 two tiny fused-vs-reference training runs), then the
# resume of a CUDA run (session 22, never yet run on a GPU), then the
# static machine-code checks on the kernels just built for this GPU and how the build linked libstdc++ (session 14:
# this image's g++ copied it into _C, and every error message that formats a number crashed).
# The cluster schedule (session 18, never yet run on a GPU) is tested apart, in its own section below: a fault or a
# hang there cannot take the other tests down with it.
run_section tests 150 bash -c "'$PY' -m pytest tests/test_ops.py tests/test_pool.py tests/test_data.py tests/test_save.py -m cuda -k 'not cluster' -q -rs -p no:cacheprovider;
    rc=\$?; '$PY' -m pytest tests/test_cuda_machine_code.py tests/test_extension_link.py -q -rs -p no:cacheprovider || rc=1; exit \$rc"


# A tests section that ran out of time most likely hung in a single-pass rendezvous (flagged, the default,
# lagged or ticket): the timings below then take two-pass alone rather than spend their limits (and the lease) on
# the hang. Lagged and cluster (never yet run on a GPU) go last: a hang or a fault in their timings costs the others
# nothing. cluster@192: one block per SM where the default 104 KB leaves two.
SCHEDULES=flagged,ticket,two-pass,lagged,cluster,cluster@192
if [[ "$ONLY" == *" tests "* || "$ONLY" == "  " ]] && [[ ${LAST_RC:-0} == 124 || ${LAST_RC:-0} == 137 ]]; then
    SCHEDULES=two-pass
    printf '\n===== tests ran out of time: bench and split time the two-pass schedule alone\n' >>"$LOG"
fi
run_section cluster-tests 90 "$PY" -m pytest tests/test_ops.py -m cuda -k cluster -q -rs -p no:cacheprovider
if [[ "$ONLY" == *" cluster-tests "* || "$ONLY" == "  " ]] && [[ ${LAST_RC:-0} == 124 || ${LAST_RC:-0} == 137 ]]; then
    SCHEDULES=${SCHEDULES%%,cluster*}
    printf '\n===== the cluster tests ran out of time: no cluster timings\n' >>"$LOG"
fi
export SCHEDULES

# The first schedule's rows (the default, flagged, with torch.compile), then the same kernels under the other
# FFABLATE_CUDA_SCHEDULE values (no compiled variant): what each rendezvous saves or costs, from the same lease.
run_section bench 180 "$PY" - "$OUT/bench_kernels.json" <<'EOF'
import json, os, sys
from rich.console import Console
from ffablate import ops
from ffablate.bench import kernel_bench, render_table, use_cuda_schedule
assert ops.backend() == "fused", ops.backend()
rows = []
for schedule in os.environ["SCHEDULES"].split(","):
    use_cuda_schedule(schedule)
    got = kernel_bench("cuda", dtypes=["float32", "bfloat16"], compile_reference=not rows)
    rows += [dict(r, schedule=schedule) for r in got]
    with open(sys.argv[1], "w") as f:
        json.dump(rows, f, indent=1)
    Console(width=200).print(render_table(got, title=f"FFABLATE_CUDA_SCHEDULE={schedule}"))
    if schedule.startswith("cluster"):  # which kernels ran: the cluster schedule falls back to flagged silently
        import re
        import torch
        from ffablate.bench import DEFAULT_SHAPES
        for name, shape in DEFAULT_SHAPES:
            for dtype in (torch.float32, torch.bfloat16):
                h = torch.randn(shape, device="cuda", dtype=dtype, requires_grad=True)
                with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                    _, _, out, readout = ops.goodness_norm(h)
                    torch.autograd.grad((out.float().sum() + readout.float().sum()), h)
                    torch.cuda.synchronize()
                # The kernel and, for the 16 KB-chunk kernels, its rendezvous (SlotRendezvous is flagged).
                kernels = sorted({
                    re.search(r"(\w+_kernel)\b", e.name)[1] + "".join(re.findall(r"::(\w+Rendezvous)", e.name)[:1])
                    for e in prof.events() if re.search(r"(forward|backward)_(cluster_)?kernel", e.name)
                })
                print(f"KERNELS {schedule} {name} {dtype}: {kernels}", flush=True)
# The other schedules' ratio to torch.compile uses the compiled time measured in the first pass of this process.
first = rows[0]["schedule"]
compiled = {(r["name"], r["dtype"]): r["compiled_ms"] for r in rows if r["schedule"] == first}
for r in rows:
    if r["compiled_ms"] is None and compiled.get((r["name"], r["dtype"])):
        r.update(compiled_ms=compiled[r["name"], r["dtype"]], compiled_ms_from=f"{first} pass")
        r["speedup_vs_compiled"] = r["compiled_ms"] / r["fused_ms"]
with open(sys.argv[1], "w") as f:
    json.dump(rows, f, indent=1)
# The ReLU + pool op against ATen's (device time, fp32 and bf16), into the log: the runner returns few files.
from ffablate.bench import pool_bench, render_pool_table
pool = pool_bench(device="cuda")
Console(width=200).print(render_pool_table(pool))
print("POOL_ROWS " + json.dumps(pool))
EOF

# Forward and backward apart, against a copy of the same size: which of the two is far from its floor.
run_section split 60 "$PY" scripts/kernel-split.py --schedules "${SCHEDULES/,two-pass/}"

run_section audit 80 bash scripts/device-audit.sh "$OUT/audit" --methods ff,ff-ga,bp,bp-ga,bp-ckpt --depths 4,16 --budget 60 --timeout 20

# FF (fused and reference kernels) and BP-DeepSup on the full Fashion-MNIST carried in .data/ (the same seed,
# backbone and epochs): accuracy, images/s and peak memory on the GPU, and the fused/reference step-time ratio.
run_section train 90 "$PY" - "$OUT/train_gpu.json" <<'EOF'
import json, os, sys
from ffablate.config import RunConfig
from ffablate.train import run
rows = []
# The first run in a process pays CUDA/cuDNN warm-up (2026-11-26: the fused run went first and came out at
# 0.89x the reference's images/s, warm-up included); a warm-up run goes first, then fused and reference alternate twice.
runs = [("ff", "fused", "decoupled", "warm-up")] + [
    ("ff", kernels, "decoupled", "timed") for _ in range(2) for kernels in ("reference", "fused")
] + [("ff", "fused", "coupled-bn", "timed"), ("bp-deepsup", "fused", "coupled-bn", "timed")]
for method, kernels, norm, role in runs:
    os.environ["FFABLATE_KERNELS"] = kernels
    config = RunConfig().with_updates({"method": method, "device": "cuda", "epochs": 1, "norm": norm})
    r = run(config, data_root=".data")
    row = {"method": method, "role": role, "kernels": r.kernel_backend, "test_accuracy": r.test_accuracy,
           "per_layer_accuracy": r.per_layer_accuracy, "train_seconds": r.train_seconds,
           "images_per_second": r.images_per_second, "peak_memory_bytes": r.peak_memory_bytes,
           "config": r.config, "versions": r.versions}
    rows.append(row)
    print(json.dumps({k: v for k, v in row.items() if k != "config"}), flush=True)
with open(sys.argv[1], "w") as f:
    json.dump(rows, f, indent=1)
EOF

# Step time, fused vs reference alternating in one process (scripts/ff-step-ab.py), then where an FF step's device
# time goes: is the GPU step launch-bound, and what do the goodness and pooling cost there? Last, the fused AdamW
# (since session 16) against torch's default (multi-tensor) one on FF's step.
run_section step 90 bash -c "'$PY' scripts/ff-step-ab.py --set device=cuda --data-root .data --rounds 5 --steps 50 \
    --profile && '$PY' scripts/ff-step-ab.py --set device=cuda --set norm=decoupled --data-root .data --rounds 5 --steps 50 \
    && '$PY' scripts/ff-step-ab.py --set device=cuda --compare optimizer --data-root .data --rounds 4 --steps 40"

"$PY" - "$OUT/summary.json" "${SECTIONS[@]}" <<'EOF'
import json, sys
path, *secs = sys.argv[1:]
rows = [dict(zip(("name", "rc", "seconds"), s.split())) for s in secs]
for r in rows:
    r["rc"], r["seconds"] = int(r["rc"]), float(r["seconds"])
with open(path, "w") as f:
    json.dump({"sections": rows, "ok": all(r["rc"] == 0 for r in rows)}, f, indent=1)
print("\nsection    rc     seconds")
for r in rows:
    print(f"{r['name']:<10} {r['rc']:<6} {r['seconds']:>7.1f}")
bench = path.replace("summary.json", "bench_kernels.json")
try:
    for b in json.load(open(bench)):
        call, host = b.get("call_ms") or {}, b.get("host_ms") or {}
        print(f"{b['name']:<7} {b['dtype']:<9} {b.get('schedule', ''):<10} fused {b['fused_ms']:.3f} ms  {b['pct_of_copy']:.0f}% of copy  "
              f"{b.get('pct_of_peak_copy') or 0:.0f}% of peak copy  "
              f"x{b['speedup_vs_eager']:.2f} eager  x{(b['speedup_vs_compiled'] or 0):.2f} compiled  "
              f"err {b['max_abs_err']:.1e}  call {call.get('fused') or 0:.3f} ms (eager "
              f"{call.get('eager') or 0:.3f})  host {host.get('fused') or 0:.3f} ms")
    # The margin the default rests on: flagged (default since session 14) against the others, same process.
    by = {(b["name"], b["dtype"], b.get("schedule")): b["fused_ms"] for b in json.load(open(bench))}
    for (name, dtype, schedule), ms in by.items():
        for other in ("ticket", "lagged", "cluster", "cluster@192"):
            if schedule == "flagged" and (name, dtype, other) in by:
                print(f"{name:<7} {dtype:<9} {other}/flagged fused time {by[name, dtype, other] / ms:.2f}x")
except (OSError, ValueError, KeyError) as exc:
    print("no bench rows:", exc)
EOF
