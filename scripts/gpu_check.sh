#!/usr/bin/env bash
# The checks only a GPU machine can make, in stages that each fit one 10-minute command of the
# device tool (the build stays on the machine between calls while it is held):
#
#   bash scripts/gpu_check.sh build          # CUDA + C++ extension in place, for sm_90 (H100/H200)
#   bash scripts/gpu_check.sh test           # pytest -m gpu: every CUDA and Triton-on-GPU test
#   bash scripts/gpu_check.sh bench OP [ARGS...]
#        # benchmarks/bench_OP.py on cuda, float32 and bfloat16, ARGS passed on (e.g.
#        # --providers eager native triton to leave the slow torch.compile cases for later)
#
# It uses the machine's own torch (a CUDA build; nothing is installed, the package is imported
# from this checkout). Logs and the benchmark CSVs go to $OUT (the device tool brings that folder
# back; default /tmp/hrnas-gpu). A copy without .git records its benchmark rows under
# HRNAS_GIT_SHA (set it to the commit the copy was made from).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-/tmp/hrnas-gpu}
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
python=${PYTHON:-python3}

stage=${1:-}
[ $# -gt 0 ] && shift
case "$stage" in
  build)
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$out/gpu.txt"
    "$python" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" \
      | tee -a "$out/gpu.txt"
    HRNAS_BUILD_CUDA=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} \
      MAX_JOBS=${MAX_JOBS:-$(nproc)} "$python" setup.py build_ext --inplace > "$out/build.log" 2>&1 \
      || { tail -n 60 "$out/build.log"; exit 1; }
    "$python" -c "import hrnas_kernels as k; print('impls:', k.available_impls())" \
      | tee -a "$out/gpu.txt"
    ;;
  test)
    "$python" -m pytest -q -m gpu -p no:cacheprovider --junitxml="$out/gpu_tests.xml" "$@" 2>&1 \
      | tee "$out/gpu_tests.log"
    ;;
  bench)
    op=${1:?"bench needs an op: mixed_dwconv, multires_fusion or token_transformer"}
    shift
    script=benchmarks/bench_$op.py
    [ -f "$script" ] || { echo "no $script" >&2; exit 2; }
    "$python" "$script" --device cuda --dtype float32 bfloat16 --out "$out/${op}_gpu.csv" "$@" \
      2>&1 | tee "$out/bench_$op.log"
    ;;
  *)
    echo "usage: $0 build | test [PYTEST ARGS] | bench OP [BENCH ARGS]" >&2
    exit 2
    ;;
esac
