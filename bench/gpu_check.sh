#!/usr/bin/env bash
# The GPU check: one script, one JSON, <= 8 minutes on one H100/H200 (see bench/gpu_check.py).
#
#   bench/gpu_check.sh [--official PATH]... [--out gpu_check.json] [--no-compile]
#   bench/gpu_check.sh --dry          # or GPU_CHECK_DRY=1: every part, tiny, on the CPU (< 1 min)
#
# --official: a REPA and/or an SRA checkout (e.g. /tmp/official/REPA, /tmp/official/SRA); the
# official SiT needs timm (pip install timm; benchmark only). Python: $PYTHON, else .venv/bin/python,
# else python3. A hard wall-clock limit ($GPU_CHECK_TIMEOUT s, default 480) stops a stuck run; the
# JSON is rewritten after every part, so what was measured is kept ("complete": false).
# Paths (--official, --out) are taken relative to the directory you run it from.
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  if [ -x "$REPO/.venv/bin/python" ]; then PY="$REPO/.venv/bin/python"; else PY=python3; fi
fi
if [ "${GPU_CHECK_DRY:-0}" != "0" ]; then set -- --dry "$@"; fi
exec timeout --signal=TERM --kill-after=10 "${GPU_CHECK_TIMEOUT:-480}" "$PY" "$REPO/bench/gpu_check.py" "$@"
