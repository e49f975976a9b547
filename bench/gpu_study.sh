#!/usr/bin/env bash
# The `gpu` scale of the study in one command on one GPU (H100/H200), then its figures as one file.
#
#   bench/gpu_study.sh --prepare        # here, once: copy the data and the cached classifier into .carry/
#   bench/gpu_study.sh OUTDIR           # on the GPU machine (device tool: carry [".carry"], OUTDIR=$OUT)
#   GPU_STUDY_DRY=1 bench/gpu_study.sh OUTDIR   # the same script on the CPU at the smoke scale (the tests)
#
# The GPU machine starts bare and cannot reach a registry: the package is used in place (the checkout
# is the `repdyn` package, put on PYTHONPATH through a link; its Python needs torch, pandas, seaborn,
# scikit-learn, typer, pyyaml, tqdm, all in the machine's image), Fashion-MNIST and the classifier that
# scores samples (fd / class accuracy, the same network as the CPU runs) and the embedded encoder (REPA's
# target, the alignment curves) come from .carry/ (31 MB).
# OUTDIR receives gpu_study.tgz (study.json, the tables and figures/gpu/ with REPORT.md) and
# gpu_study.log. A hard limit ($GPU_STUDY_TIMEOUT s, default 540) stops a stuck run: the study is
# resumable, so a second call continues where the first stopped (on the same warm machine).
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
CARRY="$REPO/.carry"

if [ "${1:-}" = "--prepare" ]; then
  mkdir -p "$CARRY/fashion-mnist" "$CARRY/cache/classifiers" "$CARRY/cache/encoders"
  cp "${REPDYN_FASHION_MNIST:-/usr/share/datasets/fashion-mnist}"/*-ubyte.gz "$CARRY/fashion-mnist/"
  cache="${REPDYN_CACHE:-$HOME/.cache/repdyn}"
  # the classifier that scores samples and the embedded encoder (REPA's target, the alignment curves)
  for f in classifiers/fashion-mnist.pt encoders/embedded-vit-fashion-mnist.pt; do
    if [ -f "$cache/$f" ]; then cp "$cache/$f" "$CARRY/cache/$f"; else
      echo "note: no $cache/$f; the GPU run trains its own (a cpu study or make demo makes one to share)"; fi
  done
  du -sh "$CARRY"
  exit 0
fi

OUTDIR="$(mkdir -p "${1:-gpu_study_out}" && cd "${1:-gpu_study_out}" && pwd)"
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  if [ -x "$REPO/.venv/bin/python" ]; then PY="$REPO/.venv/bin/python"; else PY=python3; fi
fi
WORK="$(mktemp -d "${TMPDIR:-/tmp}/gpu-study.XXXXXX")"
mkdir -p "$WORK/path" && ln -s "$REPO" "$WORK/path/repdyn"
export PYTHONPATH="$WORK/path${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
[ -d "$CARRY/fashion-mnist" ] && export REPDYN_FASHION_MNIST="$CARRY/fashion-mnist"
if [ -d "$CARRY/cache" ]; then export REPDYN_CACHE="$CARRY/cache"; fi

if [ "${GPU_STUDY_DRY:-0}" != "0" ]; then
  SCALE=(--scale smoke --device cpu --jobs 2)
else
  # three runs share the GPU at a time: one SiT-S/4 step at batch 256 leaves most of an H100 idle
  SCALE=(--scale gpu --device cuda --jobs 3)
fi
STUDY="${GPU_STUDY_DIR:-$REPO/runs/gpu}"  # kept between calls on a warm machine: the study resumes
set +e
timeout --signal=TERM --kill-after=10 "${GPU_STUDY_TIMEOUT:-540}" \
  "$PY" -m repdyn demo "${SCALE[@]}" --out "$STUDY" --figures "$STUDY/figures/gpu" --quiet 2>&1 | tee "$OUTDIR/gpu_study.log"
rc=${PIPESTATUS[0]}
set -e
tar czf "$OUTDIR/gpu_study.tgz" -C "$STUDY" study.json tables figures 2>/dev/null || \
  tar czf "$OUTDIR/gpu_study.tgz" -C "$STUDY" .
rm -rf "$WORK"
echo "gpu study: exit $rc; $OUTDIR/gpu_study.tgz ($(du -h "$OUTDIR/gpu_study.tgz" | cut -f1))"
exit "$rc"
