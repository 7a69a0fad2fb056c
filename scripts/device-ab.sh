#!/usr/bin/env bash
# A/B of CUDA kernel variants in one GPU lease: builds the extension twice from this tree, as it is (A) and with
# NVCC_APPEND_FLAGS=$B_FLAGS (B, default -DFFABLATE_CUDA_FORWARD_THREADS=128) in a copy under /tmp, runs the CUDA
# tests on both, then times the fused op for each build and each of $SCHEDULES in turn (default flagged, ticket, the
# lagged schedule at three lags): A's first pass with torch.compile of the reference (the other rows' "x compiled"
# uses that time), A's first schedule again last (the spread between two timings of one version), forward and
# backward apart, and an Nsight Compute summary of A's cnn28 fp32 kernels.
#
#   scripts/device-ab.sh OUT_DIR
#
# Through the device tool: command `bash scripts/device-ab.sh $OUT`, carry [".data", ".whl"], timeout_s 540: about 4
# minutes; the sections stop short of BUDGET_S (default 500) seconds in all, so the summary is always written.
# Files (8, the most the device tool returns): device-ab.log (every section), a.log and b.log (each build's build and
# test output in full), bench_a.json, bench_b.json, bench_a2.json, ncu.txt, summary.json.
set -u

OUT=${1:?usage: scripts/device-ab.sh OUT_DIR}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
B_FLAGS=${B_FLAGS:--DFFABLATE_CUDA_FORWARD_THREADS=128}  # session 14 measured -DFFABLATE_CUDA_THREADS=128
SCHEDULES=${SCHEDULES:-flagged,ticket,lagged,lagged@0.25,lagged@1}  # lagged@L: FFABLATE_CUDA_LAG=L
BUDGET_S=${BUDGET_S:-500}
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} SCHEDULES
LOG="$OUT/device-ab.log"
: >"$LOG"
SECTIONS=()
A=$PWD
B=/tmp/ffablate-b

run_section() {  # NAME LIMIT_S CMD...: output appended to the log, rc and seconds recorded; cut to what is left
    local name=$1 limit=$2 t0 rc secs left=$((BUDGET_S - SECONDS))
    shift 2
    if ((left < 15)); then
        printf '%-12s skipped: %ss of the %ss budget left\n' "$name" "$left" "$BUDGET_S" | tee -a "$LOG"
        SECTIONS+=("$name skipped 0")
        return
    fi
    ((limit > left)) && limit=$left
    t0=$(date +%s.%N)
    printf '\n===== %s (limit %ss)\n' "$name" "$limit" >>"$LOG"
    timeout --kill-after=10 "$limit" "$@" >>"$LOG" 2>&1
    rc=$?
    secs=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN{printf "%.1f", b-a}')
    printf '===== %s: rc=%s in %ss\n' "$name" "$rc" "$secs" >>"$LOG"
    printf '%-12s rc=%-4s %7ss\n' "$name" "$rc" "$secs"
    SECTIONS+=("$name $rc $secs")
}

if ! "$PY" -c "import expecttest" 2>/dev/null && compgen -G ".whl/*.whl" >/dev/null; then
    "$PY" -m pip install --no-index --no-deps --quiet .whl/*.whl >>"$LOG" 2>&1 ||
        "$PY" -m pip install --no-index --no-deps --quiet --break-system-packages .whl/*.whl >>"$LOG" 2>&1
fi

rm -rf "$B" && mkdir -p "$B" && cp -r setup.py pyproject.toml csrc ffablate tests scripts "$B"/ &&
    rm -f "$B"/ffablate/_C*.so && ln -s "$A/.data" "$B/.data"

# Two builds at once (16 cores); pytest and the drivers below find each build through PYTHONPATH and their cwd.
build() {  # DIR [NVCC flags]
    cd "$1" && FFABLATE_BUILD=cuda MAX_JOBS=8 NVCC_APPEND_FLAGS="${2:-}" "$PY" setup.py build_ext --inplace
}
tests() {  # DIR: the CUDA tests; the pool op's (the thread knob does not touch it) and the machine-code checks on A.
    # Not the cluster schedule's: its kernels have their own thread count, and device-check.sh runs their tests.
    local pool=""
    [[ "$1" == "$A" ]] && pool=tests/test_pool.py
    cd "$1" && PYTHONPATH="$1" "$PY" -m pytest tests/test_ops.py $pool tests/test_data.py -m cuda -k 'not cluster' -q -rs \
        -p no:cacheprovider
    local rc=$?
    if [[ "$1" == "$A" ]]; then
        PYTHONPATH="$1" "$PY" -m pytest tests/test_cuda_machine_code.py tests/test_extension_link.py -q -p no:cacheprovider || rc=1
    fi
    return $rc
}
both() {  # FUNCTION: runs it on A and on B at once, each side's output appended to its own file under $OUT as it
    # comes (so a timeout loses nothing), then the ends of both here
    printf '\n===== %s\n' "$1" | tee -a "$OUT/a.log" >>"$OUT/b.log"
    ("$1" "$A" >>"$OUT/a.log" 2>&1) & local a=$!
    ("$1" "$B" "$B_FLAGS" >>"$OUT/b.log" 2>&1) & local b=$!
    wait $a; local ra=$?
    wait $b; local rb=$?
    echo "--- A rc=$ra"; tail -15 "$OUT/a.log"; echo "--- B rc=$rb"; tail -15 "$OUT/b.log"
    return $((ra || rb))
}
export -f build tests both
export A B B_FLAGS PY OUT
# A run that ran out of time most likely hangs in a single-pass rendezvous (flagged, lagged or ticket): the timings
# after it take two-pass alone, which has none.
two_pass_only_after_timeout() {
    if [[ ${SECTIONS[-1]} == *" 124 "* || ${SECTIONS[-1]} == *" 137 "* ]] && [[ $SCHEDULES != two-pass ]]; then
        SCHEDULES=two-pass
        echo "${SECTIONS[-1]%% *} ran out of time: the timings after it take two-pass alone" | tee -a "$LOG"
    fi
}
run_section build 150 bash -c "both build"
run_section tests 150 bash -c "both tests"
two_pass_only_after_timeout
# A build that failed would make the timings below the reference's (ops falls back to it): leave that side out.
B_BUILT=$(compgen -G "$B/ffablate/_C*.so" >/dev/null && echo 1 || echo 0)
A_BUILT=$(compgen -G "$A/ffablate/_C*.so" >/dev/null && echo 1 || echo 0)
echo "built: A=$A_BUILT B=$B_BUILT" | tee -a "$LOG"

cat >/tmp/ab_bench.py <<'PYEOF'
import json, os, sys
from ffablate import ops
from ffablate.bench import kernel_bench, use_cuda_schedule
path, compiled_first, schedules = sys.argv[1], sys.argv[2] == "1", sys.argv[3].split(",")
assert ops.backend("cuda") == "fused", f"{ops.__file__}: the fused CUDA op is not available"
rows = []
for i, schedule in enumerate(schedules):
    use_cuda_schedule(schedule)
    got = kernel_bench("cuda", dtypes=["float32", "bfloat16"], compile_reference=compiled_first and i == 0)
    rows += [dict(r, schedule=schedule, pass_index=i) for r in got]
    json.dump(rows, open(path, "w"), indent=1)
PYEOF

cat >/tmp/ab_ncu.py <<'PYEOF'
import os, torch
from ffablate import ops
from ffablate.bench import use_cuda_schedule
h = torch.randn(256, 64, 28, 28, device="cuda", requires_grad=True)
for schedule in os.environ["SCHEDULES"].split(","):
    use_cuda_schedule(schedule)
    s, a, out, ro = ops.goodness_norm(h)
    torch.autograd.grad((out * out.detach()).sum() + ro.sum() + s.sum(), h)
torch.cuda.synchronize()
PYEOF

# Drivers run from files: sys.path[0] is then their folder, not the working directory, so PYTHONPATH picks the build.
if ((A_BUILT)); then
    run_section bench_a 100 env PYTHONPATH="$A" "$PY" /tmp/ab_bench.py "$OUT/bench_a.json" 1 "$SCHEDULES"
    two_pass_only_after_timeout
fi
if ((B_BUILT)); then
    run_section bench_b 70 env PYTHONPATH="$B" "$PY" /tmp/ab_bench.py "$OUT/bench_b.json" 0 "$SCHEDULES"
    two_pass_only_after_timeout
fi
if ((A_BUILT)); then
    run_section bench_a2 40 env PYTHONPATH="$A" "$PY" /tmp/ab_bench.py "$OUT/bench_a2.json" 0 "${SCHEDULES%%,*}"
    run_section split_a 40 env PYTHONPATH="$A" "$PY" "$A/scripts/kernel-split.py" --schedules "$SCHEDULES"
fi
if ((B_BUILT)); then
    run_section split_b 40 env PYTHONPATH="$B" "$PY" "$B/scripts/kernel-split.py" --schedules "$SCHEDULES"
fi

NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
((A_BUILT)) && run_section ncu 60 env PYTHONPATH="$A" FFABLATE_KERNELS=fused "$NCU" --clock-control none -k 'regex:(forward|backward)_kernel' \
    --section SpeedOfLight --section Occupancy --section WarpStateStats --section MemoryWorkloadAnalysis \
    --log-file "$OUT/ncu.txt" "$PY" /tmp/ab_ncu.py

"$PY" - "$OUT" "${SECTIONS[@]}" <<'PYEOF'
import json, os, sys
out, *secs = sys.argv[1:]
rows = [dict(zip(("name", "rc", "seconds"), s.split())) for s in secs]  # rc "skipped": out of budget
json.dump({"sections": rows}, open(os.path.join(out, "summary.json"), "w"), indent=1)
print("\nsection      rc   seconds")
for r in rows:
    print(f"{r['name']:<12} {r['rc']:<4} {r['seconds']:>7}")
compiled = {}
for build, name in (("A", "bench_a.json"), ("B", "bench_b.json"), ("A2", "bench_a2.json")):
    try:
        got = json.load(open(os.path.join(out, name)))
    except (OSError, ValueError) as exc:
        print(build, "no rows:", exc)
        continue
    for r in got:
        key = (r["name"], r["dtype"])
        if r.get("compiled_ms"):
            compiled[key] = r["compiled_ms"]
        c = compiled.get(key)
        print(f"{build:<3} {r['schedule']:<12} {r['backend']:<9} {r['name']:<7} {r['dtype']:<9} fused {r['fused_ms']:.4f} ms "
              f"{r['pct_of_copy']:.0f}% copy {r.get('pct_of_peak_copy') or 0:.0f}% peak "
              f"x{r['speedup_vs_eager']:.2f} eager x{(c / r['fused_ms']) if c else 0:.2f} compiled "
              f"err {r['max_abs_err']:.1e}")
PYEOF
