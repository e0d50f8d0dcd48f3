#!/usr/bin/env bash
# The GPU suite, for a machine with a CUDA GPU and PyTorch preinstalled but no
# internet (`make gpu-suite`). Builds the extension for the local GPU, runs the
# CUDA tests for all dtypes, compute-sanitizer (memcheck, racecheck) over small
# PAM and CAM forward+backward calls, and the GPU benchmarks; the float16/
# bfloat16 tensor-core kernels (the default) are checked, sanitized and timed
# beside the CUDA-core kernels (DANET_EXT_TENSOR_CORES=0). Everything goes into one folder
# (GPU_SUITE_OUT, default gpu-out/); where $OUT is set (the device tool), the
# summary and a tarball of that folder are copied there.
#
#   bash benchmarks/gpu_suite.sh [STAGE ...]
#
# STAGE: check, tests, sanitize, bench, inference (default: all five, in that
# order; inference is the full DANet-ResNet-101 forward, bench_inference.py). The
# build runs first every time (ninja makes it a no-op when nothing changed), so
# a session whose commands are limited in time can run the stages in separate
# calls on the same machine; the summary accumulates across calls.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
DIR=${GPU_SUITE_OUT:-gpu-out}
mkdir -p "$DIR"
SUMMARY="$DIR/summary.txt"
STAGES=" ${*:-check tests sanitize bench inference} "
want() { [[ "$STAGES" == *" $1 "* ]]; }
echo "=== gpu suite, stages:$STAGES($(date -u +%FT%TZ))" >> "$SUMMARY"
status=0
step() {  # step NAME COMMAND...: run, log to $DIR/NAME.log, record pass/fail and time
  local name=$1; shift
  local t0=$SECONDS
  echo "=== $name: $*" | tee -a "$SUMMARY"
  if "$@" > "$DIR/$name.log" 2>&1; then
    echo "=== $name: ok ($((SECONDS - t0)) s)" | tee -a "$SUMMARY"
  else
    echo "=== $name: FAILED ($((SECONDS - t0)) s), last lines:" | tee -a "$SUMMARY"
    tail -n 30 "$DIR/$name.log" | tee -a "$SUMMARY"
    status=1
  fi
}

export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee -a "$SUMMARY"
ARCH=$($PY -c "import torch; c = torch.cuda.get_device_capability(); print(f'{c[0]}.{c[1]}')")
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$ARCH}
export MAX_JOBS=${MAX_JOBS:-16}
echo "torch $($PY -c 'import torch; print(torch.__version__)'), building for sm_${ARCH}" | tee -a "$SUMMARY"

step build $PY setup.py build_ext --inplace
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
step info $PY -m danet_ext info
if want check; then
  step check $PY -m danet_ext check --device cuda
  step check_cuda_cores env DANET_EXT_TENSOR_CORES=0 $PY -m danet_ext check --device cuda --dtype float16 --dtype bfloat16
fi
if want tests; then
  step tests_cuda $PY -m pytest -q -m cuda tests -p no:cacheprovider
  step tests_build env DANET_EXT_EXPECT_CUDA=1 $PY -m pytest -q tests/test_build.py -p no:cacheprovider
fi
if want sanitize; then
  if command -v compute-sanitizer > /dev/null; then
    step memcheck compute-sanitizer --tool memcheck --error-exitcode 1 $PY benchmarks/gpu_sanitizer_cases.py
    step racecheck compute-sanitizer --tool racecheck --error-exitcode 1 $PY benchmarks/gpu_sanitizer_cases.py
  else
    echo "=== compute-sanitizer not found: skipped" | tee -a "$SUMMARY"
  fi
fi
if want bench; then
  # the predictions beside which the measurements go (registers read from this build)
  step perf_model $PY benchmarks/gpu_perf_model.py --out "$DIR/gpu_perf_model.md"
  for dtype in float32 float16 bfloat16; do
    step bench_pam_$dtype $PY benchmarks/bench_position_attention.py --device cuda --dtype $dtype --out "$DIR" --repeats 10
    step bench_cam_$dtype $PY benchmarks/bench_channel_attention.py --device cuda --dtype $dtype --out "$DIR" --repeats 10
  done
  grep -h "^target:\|^position_attention\|^channel_attention" "$DIR"/bench_*.log >> "$SUMMARY" 2>/dev/null
fi
if want inference; then
  # the main job on the GPU: eager float32 against optimize_for_inference's float16/bfloat16
  # autocast, and the official attention (N x N) in float16; torch.compile is left out for time
  step inference $PY benchmarks/bench_inference.py --device cuda --sizes 512x1024 1024x2048 --repeats 5 \
    --paths eager-float32 optimized-float16 optimized-bfloat16 optimized-float16-refattn \
    --out "$DIR/inference_cuda.json"
  grep -h '"seconds"' "$DIR/inference.log" >> "$SUMMARY" 2>/dev/null
fi

if [ -n "${OUT:-}" ]; then
  cp "$SUMMARY" "$OUT/summary.txt"
  tar -czf "$OUT/gpu_suite.tar.gz" "$DIR"
fi
echo "GPU suite finished: $([ $status = 0 ] && echo all steps ok || echo SOME STEPS FAILED); results in $DIR"
exit $status
