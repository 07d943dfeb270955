// Mixed-kernel depthwise conv + BatchNorm + activation: definitions shared by the CPU and CUDA
// kernels and their argument checks.
//
// The op works on compact channels: x [N, A, H, W] holds only alive channels, grouped by kernel
// size; group g covers channels [begin_g, begin_g + count_g) and has kernel k_g (odd), padding
// k_g / 2. Ho = (H - 1) / stride + 1. BatchNorm statistics are kept in the accumulation type.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <optional>
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

// bn_bias is shaped like bn_weight and lives with x (both ops take it).
inline void check_bias(const at::Tensor& x, const at::Tensor& bn_weight,
                       const at::Tensor& bn_bias) {
  TORCH_CHECK(bn_bias.sizes() == bn_weight.sizes(), kOp, ": bn_bias must have shape ",
              bn_weight.sizes(), ", got ", bn_bias.sizes());
  check_same(kOp, "bn_bias", bn_bias, x);
}

// The forward's checks beyond check_and_group: bias, running statistics (required and [C] when
// batch statistics are not used), eps.
inline void check_forward_args(const at::Tensor& x, const at::Tensor& bn_weight,
                               const at::Tensor& bn_bias,
                               const std::optional<at::Tensor>& running_mean,
                               const std::optional<at::Tensor>& running_var, bool use_batch_stats,
                               double eps) {
  check_bias(x, bn_weight, bn_bias);
  if (!use_batch_stats) {
    TORCH_CHECK(running_mean.has_value() && running_var.has_value(), kOp,
                ": running statistics are required when batch statistics are not used");
    for (const at::Tensor* t : {&*running_mean, &*running_var}) {
      TORCH_CHECK(t->sizes() == bn_weight.sizes(), kOp, ": running statistics must have shape ",
                  bn_weight.sizes(), ", got ", t->sizes());
      check_same(kOp, "a running statistic", *t, x);
    }
  }
  TORCH_CHECK(eps > 0, kOp, ": eps must be positive, got ", eps);
}

// The backward's checks beyond check_and_group: grad_y, y and conv are [N, C, Ho, Wo] like x,
// bn_bias is like bn_weight, mean and var [C] in the statistics type (double for double x, else
// float).
inline void check_backward_args(const at::Tensor& x, const at::Tensor& grad_y,
                                const at::Tensor& y, const at::Tensor& conv,
                                const at::Tensor& bn_weight, const at::Tensor& bn_bias,
                                const at::Tensor& mean, const at::Tensor& var, int64_t stride) {
  check_bias(x, bn_weight, bn_bias);
  const int64_t N = x.size(0), C = x.size(1);
  const int64_t Ho = (x.size(2) - 1) / stride + 1, Wo = (x.size(3) - 1) / stride + 1;
  for (const at::Tensor* t : {&grad_y, &y, &conv}) {
    TORCH_CHECK(t->dim() == 4 && t->size(0) == N && t->size(1) == C && t->size(2) == Ho &&
                    t->size(3) == Wo,
                kOp, ": grad_y, y and conv must have shape [", N, ", ", C, ", ", Ho, ", ", Wo,
                "], got ", t->sizes());
    check_same(kOp, "grad_y/y/conv", *t, x);
  }
  const auto stats_type = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  for (const at::Tensor* t : {&mean, &var}) {
    TORCH_CHECK(t->dim() == 1 && t->size(0) == C && t->scalar_type() == stats_type &&
                    t->device() == x.device(),
                kOp, ": mean and var must be [", C, "] ", stats_type, " on ", x.device(),
                ", got ", t->sizes(), " ", t->scalar_type(), " on ", t->device());
  }
}

}  // namespace mixed_dwconv
}  // namespace hrnas
