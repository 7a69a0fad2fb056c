#!/usr/bin/env bash
# One-off: why the CUDA max_pool2x2 bad-input test segfaults on torch 2.11 (session 14).
set -u
OUT=$1
PY=python3
if ! $PY -c "import expecttest" 2>/dev/null; then
  $PY -m pip install --no-index --no-deps --quiet .whl/*.whl >/dev/null 2>&1 || $PY -m pip install --no-index --no-deps --quiet --break-system-packages .whl/*.whl >/dev/null 2>&1
fi
export PYTHONPATH=$PWD CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
t0=$SECONDS
FFABLATE_BUILD=cuda TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 $PY setup.py build_ext --inplace >$OUT/build.log 2>&1
echo "build rc=$? in $((SECONDS - t0))s"
timeout 120 $PY .scratch/poolcrash.py 2>&1 | tee $OUT/cases.txt
cat >/tmp/w1.py <<'PYEOF'
import torch, ffablate.ops
torch.ops.ffablate.max_pool2x2.default(torch.randn(1, 1, 4, 1, device='cuda'))
PYEOF
timeout 100 cuda-gdb -batch -ex 'set pagination off' -ex run -ex bt -ex 'x/8i $pc-16' -ex 'info registers' \
  --args $PY /tmp/w1.py >$OUT/gdb.txt 2>&1
echo "gdb rc=$?"; grep -n "^#\|SIGSEGV\|signal" $OUT/gdb.txt | head -40
timeout 120 $PY -m pytest tests/test_pool.py tests/test_data.py -m cuda -k "not bad_inputs" -q -rs -p no:cacheprovider 2>&1 | tail -15 | tee $OUT/pool_tests.txt
echo "total $((SECONDS - t0))s"
