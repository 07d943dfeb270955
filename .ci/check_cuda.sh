#!/usr/bin/env bash
# Compile-check every CUDA source (csrc/**/*.cu) with nvcc, without linking.
#
# Works with the CPU build of torch: its headers lack c10/cuda/impl/cuda_cmake_macros.h (generated
# only for CUDA builds), so a temporary stand-in defining C10_CUDA_BUILD_SHARED_LIBS is put first
# on the include path (docs/ENVIRONMENT.md section 3). The .cu files must include only the lean
# c10/cuda and ATen core headers for this to work (ATen/cuda/CUDAContext.h needs cuBLAS headers).
# Flags follow the extension build: torch's COMMON_NVCC_FLAGS plus sm_90 (H100) and C++20.
#
# Without nvcc this prints a skip line and exits 0. Any compile error exits non-zero.
# HRNAS_CUDA_CHECK_JOBS sets how many files compile at once (default: one per two cores, since
# one nvcc run of a torch-heavy file keeps a core busy for about 30 s and takes ~1-2 GB).
set -euo pipefail
cd "$(dirname "$0")/.."

nvcc_bin="${NVCC:-}"
if [[ -z "$nvcc_bin" ]]; then
  for candidate in "$(command -v nvcc || true)" "${CUDA_HOME:-/nonexistent}/bin/nvcc" \
                   /usr/local/cuda/bin/nvcc; do
    if [[ -n "$candidate" && -x "$candidate" ]]; then
      nvcc_bin="$candidate"
      break
    fi
  done
fi
if [[ -z "$nvcc_bin" ]]; then
  echo "check_cuda: nvcc not found, skipping the CUDA compile check"
  exit 0
fi

mapfile -t sources < <(find csrc -name '*.cu' -type f | LC_ALL=C sort)
if [[ ${#sources[@]} -eq 0 ]]; then
  echo "check_cuda: no .cu files under csrc/"
  exit 0
fi

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
mkdir -p "$tmp/shim/c10/cuda/impl" "$tmp/obj" "$tmp/log" "$tmp/status"
printf '#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n' \
  > "$tmp/shim/c10/cuda/impl/cuda_cmake_macros.h"

read -r -a torch_includes < <(python -c \
  "import torch.utils.cpp_extension as c; print(' '.join(c.include_paths()))")
flags=(-std=c++20 -arch=sm_90 -O3 -Xcompiler -fPIC --expt-relaxed-constexpr -DHRNAS_WITH_CUDA=1
       -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__
       -D__CUDA_NO_BFLOAT16_CONVERSIONS__ -D__CUDA_NO_HALF2_OPERATORS__
       -I"$tmp/shim")
for dir in "${torch_includes[@]}"; do flags+=(-I"$dir"); done
flags+=(-Icsrc)

max_jobs="${HRNAS_CUDA_CHECK_JOBS:-$(( $(nproc) / 2 ))}"
(( max_jobs >= 1 )) || max_jobs=1

echo "check_cuda: $("$nvcc_bin" --version | tail -n 1), ${#sources[@]} file(s), $max_jobs at a time"

compile_one() {
  local src="$1" key="${1//\//_}"
  local start end
  start=$(date +%s.%N)
  if "$nvcc_bin" "${flags[@]}" -c "$src" -o "$tmp/obj/$key.o" > "$tmp/log/$key" 2>&1; then
    echo ok > "$tmp/status/$key"
  else
    echo FAIL > "$tmp/status/$key"
  fi
  end=$(date +%s.%N)
  printf '%-4s %-60s %6.1f s\n' "$(cat "$tmp/status/$key")" "$src" \
    "$(awk -v a="$start" -v b="$end" 'BEGIN { print b - a }')"
}

for src in "${sources[@]}"; do
  while (( $(jobs -rp | wc -l) >= max_jobs )); do wait -n || true; done
  compile_one "$src" &
done
wait

failed=0
for src in "${sources[@]}"; do
  key="${src//\//_}"
  if [[ "$(cat "$tmp/status/$key" 2>/dev/null)" != ok ]]; then
    failed=$(( failed + 1 ))
    echo "---- nvcc output for $src"
    cat "$tmp/log/$key"
  fi
done
if (( failed > 0 )); then
  echo "check_cuda: $failed of ${#sources[@]} file(s) failed to compile"
  exit 1
fi
echo "check_cuda: all ${#sources[@]} file(s) compile"
