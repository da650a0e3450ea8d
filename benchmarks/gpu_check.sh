#!/usr/bin/env bash
# One command on a bare GPU machine (no network needed): print the driver, runtime and device;
# build fastddpm with CUDA; run every `cuda` test (a skipped one fails: FASTDDPM_REQUIRE_GPU=1);
# run every kernel under compute-sanitizer (memcheck, initcheck, racecheck); time the GPU
# benchmarks into benchmarks/results/gpu-<device>.json. Exits non-zero if no GPU was found, or
# any stage failed; each stage runs whatever the earlier ones did, to show how far off things are.
#
#   bash benchmarks/gpu_check.sh            (or: make gpu-check)
# Environment: PYTHON (default .venv/bin/python if present, else python3); FASTDDPM_CUDA_ARCHS
# (default: the compute capability of GPU 0, from nvidia-smi, so the build compiles one arch);
# GPU_STAGES (default "env build tests sanitize profile bench"); SANITIZE_TOOLS (default "memcheck
# initcheck racecheck"); GPU_LOGS (default $OUT or benchmarks/results/gpu-logs): where the logs go;
# BENCH_K: a pytest -k filter for the benchmarks; *_TIMEOUT: seconds per stage.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1

PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
STAGES=" ${GPU_STAGES:-env build tests sanitize profile bench} "
LOGS="${GPU_LOGS:-${OUT:-benchmarks/results/gpu-logs}}"
mkdir -p "$LOGS"
failed=()
want() { [[ "$STAGES" == *" $1 "* ]]; }
stage() { echo; echo "== $1 ($(date +%T))"; }

if want env; then
  stage "environment"
  if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi --query-gpu=name,driver_version,compute_cap,memory.total \
      --format=csv,noheader; then
    echo "gpu-check: no NVIDIA driver or GPU found (nvidia-smi)" >&2
    exit 2
  fi
  command -v nvcc >/dev/null 2>&1 && nvcc --version | tail -n 2
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available())" \
    2>&1 || true
fi

if [ -z "${FASTDDPM_CUDA_ARCHS:-}" ] && command -v nvidia-smi >/dev/null 2>&1; then
  cap=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -n1 | tr -d ' .')
  if [[ "$cap" =~ ^[0-9]+$ ]]; then export FASTDDPM_CUDA_ARCHS="$cap"; fi
fi

if want build; then
  stage "build (FASTDDPM_CUDA=1, archs ${FASTDDPM_CUDA_ARCHS:-setup.py default})"
  build_log=$(mktemp)
  if ! FASTDDPM_CUDA=1 "$PY" -m pip install --disable-pip-version-check -q --no-build-isolation --no-deps -e . \
      >"$build_log" 2>&1; then
    cp "$build_log" "$LOGS/build.log"
    tail -n 40 "$build_log"
    echo "gpu-check: the CUDA build failed" >&2
    exit 1
  fi
  grep -i "warning" "$build_log" | grep -v "^WARNING: Location\|DEPRECATION" | head -n 20
fi

stage "python -m fastddpm.info"
"$PY" -m fastddpm.info || exit 1
"$PY" - <<'EOF' || exit 2
import sys
from fastddpm.executors.native_cuda import CUDA_BACKEND, _C_cuda
why = CUDA_BACKEND.engine_unavailable()
if why:
    sys.exit("gpu-check: the CUDA engine cannot run: " + "; ".join(why))
print("runtime", _C_cuda.runtime_version(), "device", _C_cuda.device_info(0))
EOF

if want tests; then
  stage "pytest -m cuda tests (FASTDDPM_REQUIRE_GPU=1: a skip is a failure)"
  FASTDDPM_REQUIRE_GPU=1 timeout "${TESTS_TIMEOUT:-600}" "$PY" -m pytest -q -m cuda -p no:cacheprovider -rfEsP \
    --durations=8 --continue-on-collection-errors tests 2>&1 \
    | tee "$LOGS/cuda-tests.log" | grep -E "^(FAILED|ERROR|SKIPPED)|passed|failed|^E  " | tail -n 40
  [ "${PIPESTATUS[0]}" -eq 0 ] || failed+=(tests)
fi

if want sanitize; then
  if command -v compute-sanitizer >/dev/null 2>&1; then
    for tool in ${SANITIZE_TOOLS:-memcheck initcheck racecheck}; do
      stage "compute-sanitizer --tool $tool benchmarks/gpu_sanitize.py"
      quick=""; limit="${SANITIZE_TIMEOUT:-240}"
      if [ "$tool" = racecheck ]; then quick="--quick"; limit="${RACECHECK_TIMEOUT:-$limit}"; fi
      timeout "$limit" compute-sanitizer --tool "$tool" --error-exitcode 99 \
        "$PY" benchmarks/gpu_sanitize.py $quick >"$LOGS/sanitize-$tool.log" 2>&1
      rc=$?
      grep -v "^ok " "$LOGS/sanitize-$tool.log" | tail -n 25
      echo "$tool rc=$rc"
      [ "$rc" -eq 0 ] || failed+=("$tool")
    done
  else
    echo "compute-sanitizer not found"; failed+=(sanitize)
  fi
fi

if want profile; then
  stage "per-op GPU time (benchmarks/gpu_profile.py)"
  timeout "${PROFILE_TIMEOUT:-120}" "$PY" benchmarks/gpu_profile.py ${PROFILE_SPECS:-} 2>&1 || failed+=(profile)
fi

if want bench; then
  name=$("$PY" -c "from fastddpm import _C_cuda; print(_C_cuda.device_name(0))" 2>/dev/null \
    | tr -cs 'A-Za-z0-9._-' '-' | sed 's/^-*//; s/-*$//')
  out="benchmarks/results/gpu-${name:-unknown}.json"
  stage "GPU benchmarks -> $out"
  # torch.compile rows in a run of their own (minutes of compilation): a stage cut by its timeout
  # loses only its own results file
  timeout "${BENCH_TIMEOUT:-600}" "$PY" -m pytest -q -p no:cacheprovider -rfEs benchmarks/test_bench_step_cuda.py \
    benchmarks/test_bench_cuda_unet.py -k "not compile${BENCH_K:+ and ($BENCH_K)}" --benchmark-json="$out" \
    --benchmark-columns=median,iqr,rounds 2>&1 | tee "$LOGS/bench.log" | tail -n 80
  [ "${PIPESTATUS[0]}" -eq 0 ] || failed+=(bench)
  cp "$out" "$LOGS/" 2>/dev/null
  if [ -f "$out" ]; then "$PY" benchmarks/report.py "$out" 2>&1 | tail -n 60 || true; fi
  if [ -z "${SKIP_COMPILE:-}" ]; then
    out_c="${out%.json}-compile.json"
    stage "GPU benchmarks, torch.compile rows -> $out_c"
    timeout "${COMPILE_TIMEOUT:-300}" "$PY" -m pytest -q -p no:cacheprovider -rfEs benchmarks/test_bench_cuda_unet.py \
      -k "compile${BENCH_K:+ and ($BENCH_K)}" --benchmark-json="$out_c" --benchmark-columns=median,iqr,rounds 2>&1 \
      | tee -a "$LOGS/bench.log" | tail -n 30
    [ "${PIPESTATUS[0]}" -eq 0 ] || failed+=(compile)
    cp "$out_c" "$LOGS/" 2>/dev/null
  fi
fi

echo
echo "== gpu-check: ${#failed[@]} stage(s) failed${failed[*]:+: ${failed[*]}}"
[ "${#failed[@]}" -eq 0 ]
