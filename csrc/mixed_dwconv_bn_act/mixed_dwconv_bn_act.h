// Mixed-kernel depthwise conv + BatchNorm + activation: definitions shared by the CPU and CUDA
// kernels and their argument checks.
//
// The op works on compact channels: x [N, A, H, W] holds only alive channels, grouped by kernel
// size; group g covers channels [begin_g, begin_g + count_g) and has kernel k_g (odd), padding
// k_g / 2. Ho = (H - 1) / stride + 1. BatchNorm statistics are kept in the accumulation type.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <string_view>
#include <vector>

#include "common/activation.h"
#include "common/checks.h"

namespace hrnas {
namespace mixed_dwconv {

constexpr const char* kOp = "mixed_dwconv_bn_act";

struct Group {
  int64_t begin, count, k;
};

// Validates the compact-channel arguments both kernels share and returns the channel groups.
inline std::vector<Group> check_and_group(const at::Tensor& x, at::TensorList weights,
                                          const at::Tensor& bn_weight, int64_t stride) {
  check_nchw(kOp, "x", x);
  TORCH_CHECK(stride == 1 || stride == 2, kOp, ": stride must be 1 or 2, got ", stride);
  TORCH_CHECK(!weights.empty(), kOp, ": expected at least one weight group");
  std::vector<Group> groups;
  int64_t begin = 0;
  for (size_t g = 0; g < weights.size(); ++g) {
    const at::Tensor& w = weights[g];
    TORCH_CHECK(w.dim() == 4 && w.size(1) == 1 && w.size(2) == w.size(3) && w.size(2) % 2 == 1,
                kOp, ": weights[", g, "] must be [A_g, 1, k, k] with odd k, got ", w.sizes());
    check_same(kOp, "a weight", w, x);
    groups.push_back({begin, w.size(0), w.size(2)});
    begin += w.size(0);
  }
  TORCH_CHECK(begin == x.size(1), kOp, ": x has ", x.size(1),
              " channels, the weight groups hold ", begin);
  TORCH_CHECK(bn_weight.dim() == 1 && bn_weight.size(0) == begin, kOp,
              ": bn_weight must have shape [", begin, "], got ", bn_weight.sizes());
  check_same(kOp, "bn_weight", bn_weight, x);
  return groups;
}

}  // namespace mixed_dwconv
}  // namespace hrnas
