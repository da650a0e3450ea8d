#!/usr/bin/env bash
# One command on a bare GPU machine (no network needed): build fastddpm with CUDA, print what was
# built and which backends run, run the GPU tests, then time the GPU benchmarks into
# benchmarks/results/gpu-<device-name>.json. Exits non-zero if the build, the tests or the
# benchmarks failed (the benchmarks still run after failed tests, to show how far off things are).
#
#   bash benchmarks/gpu_check.sh            (or: make gpu-check)
# Environment: PYTHON (default .venv/bin/python if present, else python3); FASTDDPM_CUDA_ARCHS
# (default: the compute capability of GPU 0, from nvidia-smi, so the build compiles one arch).
set -uo pipefail
cd "$(dirname "$0")/.."

PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi

if [ -z "${FASTDDPM_CUDA_ARCHS:-}" ] && command -v nvidia-smi >/dev/null 2>&1; then
  cap=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -n1 | tr -d ' .')
  if [[ "$cap" =~ ^[0-9]+$ ]]; then export FASTDDPM_CUDA_ARCHS="$cap"; fi
fi
echo "== build (FASTDDPM_CUDA=1, archs ${FASTDDPM_CUDA_ARCHS:-setup.py default})"
FASTDDPM_CUDA=1 "$PY" -m pip install --disable-pip-version-check -q --no-build-isolation --no-deps -e . || {
  echo "gpu-check: the CUDA build failed" >&2
  exit 1
}

echo "== python -m fastddpm.info"
"$PY" -m fastddpm.info || exit 1

echo "== pytest -m cuda tests"
"$PY" -m pytest -q -m cuda tests
tests_rc=$?

name=$("$PY" -c "import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none')" \
  2>/dev/null | tr -cs 'A-Za-z0-9._-' '-' | sed 's/^-*//; s/-*$//')
out="benchmarks/results/gpu-${name:-unknown}.json"
mkdir -p benchmarks/results
echo "== GPU benchmarks -> $out"
"$PY" -m pytest -q benchmarks/test_bench_step_cuda.py benchmarks/test_bench_cuda_unet.py --benchmark-json="$out"
bench_rc=$?
if [ -f benchmarks/report.py ]; then "$PY" benchmarks/report.py "$out" || true; fi

echo "== gpu-check: tests rc=$tests_rc, benchmarks rc=$bench_rc"
[ "$tests_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ]
