#!/usr/bin/env bash
# The GPU part of the systems audit (issue 5): 224x224 on CUDA under an 8 GB cap, to set beside the DTG-FF paper's
# 8 GB-GPU numbers (BP + GA 4.18 GB / 157 imgs/s, DTG-FF 7.90 GB / 138 imgs/s).
#
#   scripts/device-audit.sh OUT_DIR [extra audit flags...]
#
# Writes OUT_DIR/audit_gpu.json ({meta, rows, summary}), audit_gpu.txt (the tables) and audit_gpu_*.png.
# One fresh worker per configuration (a few seconds of start-up, then 2 warm-up and 5 timed steps). By default
# --budget stops starting new ones after 120 s and --timeout caps each at 60 s; device-check passes a smaller
# --budget 60 --timeout 20 to fit its 80 s section. Configurations not reached are "skipped" rows.
# Flags after OUT_DIR are appended and win (e.g. `--device cpu --resolution 16 ...` for a dry run without a GPU).
# Imports nothing but torch, rich and matplotlib (no optuna, no network).
set -euo pipefail
OUT_DIR=${1:?usage: scripts/device-audit.sh OUT_DIR [extra audit flags]}
shift
cd "$(dirname "$0")/.."
if [ -n "${PYTHON:-}" ]; then PY=$PYTHON; elif [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
mkdir -p "$OUT_DIR"
# ImageNet-100-like: 100 classes (class-wise FF goodness needs width >= classes), effective batch 64,
# micro-batch 16 for the -ga variants; the same backbone for every method (see docs/audit.md). One round: the
# lease is short and a dedicated GPU's timings vary far less than the shared CPU's (the ratios then say so).
"$PY" -m ffablate.cli audit --device cuda --resolution 224 --depths 4,8,16 \
    --methods ff,ff-ga,ff-neg,bp,bp-ga,bp-ckpt --batch 64 --micro-batch 16 --width 128 --classes 100 \
    --memory-cap 8 --warmup 2 --steps 5 --rounds 1 --timeout 60 --budget 120 \
    --output "$OUT_DIR/audit_gpu.json" --plot-dir "$OUT_DIR" --plot-prefix audit_gpu "$@" \
    | tee "$OUT_DIR/audit_gpu.txt"
