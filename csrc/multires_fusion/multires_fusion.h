// Multi-resolution fusion: out = act(sum_j resize(x_j, (H, W))), shared by the CPU and CUDA
// kernels.
//
// Resizing follows F.interpolate(align_corners=False) bit for bit in how it picks source pixels
// and weights (aten/src/ATen/native/UpSample.h: area_pixel_compute_source_index,
// guard_index_and_lambda, nearest_idx), so the fused op matches the eager composition to
// rounding. An input already at (H, W) is used as is (no resampling).
#pragma once

#include <cmath>
#include <cstdint>

#include "common/activation.h"

namespace hrnas {
namespace multires_fusion {

enum class Mode : int { kBilinear = 0, kNearest = 1 };

// At most this many inputs (the public API enforces the same bound).
constexpr int kMaxInputs = 8;

// Bilinear source taps of output index `dst` along one axis: out = l0 * x[i0] + l1 * x[i1]. An
// axis of equal sizes reads x[dst] alone (i1 = i0, l1 = 0), as ATen's
// compute_source_index_and_lambda does, so a NaN next to it does not leak in through 0 * NaN.
template <typename opmath_t>
HRNAS_HD void bilinear_tap(int64_t dst, int64_t in_size, int64_t out_size, int64_t* i0,
                           int64_t* i1, opmath_t* l0, opmath_t* l1) {
  const opmath_t scale = static_cast<opmath_t>(in_size) / static_cast<opmath_t>(out_size);
  opmath_t src = scale * (static_cast<opmath_t>(dst) + opmath_t(0.5)) - opmath_t(0.5);
  if (src < opmath_t(0)) src = opmath_t(0);
  // floorf on purpose: ATen floors through float even for double, and we follow it.
  int64_t idx = static_cast<int64_t>(floorf(static_cast<float>(src)));
  if (idx > in_size - 1) idx = in_size - 1;
  opmath_t lambda = src - static_cast<opmath_t>(idx);
  lambda = lambda < opmath_t(0) ? opmath_t(0) : (lambda > opmath_t(1) ? opmath_t(1) : lambda);
  *i0 = idx;
  *i1 = idx + (idx < in_size - 1 && in_size != out_size ? 1 : 0);
  *l1 = lambda;
  *l0 = opmath_t(1) - lambda;
}

// Legacy "nearest" source index (not "nearest-exact"), as ATen's nearest_idx.
HRNAS_HD int64_t nearest_tap(int64_t dst, int64_t in_size, int64_t out_size) {
  if (out_size == in_size) return dst;
  if (out_size == 2 * in_size) return dst >> 1;
  const float scale = static_cast<float>(in_size) / static_cast<float>(out_size);
  const int64_t idx = static_cast<int64_t>(floorf(static_cast<float>(dst) * scale));
  return idx < in_size - 1 ? idx : in_size - 1;
}

}  // namespace multires_fusion
}  // namespace hrnas
