// Argument parsing and checks of the multires_fusion ops, shared by the CPU and CUDA kernels
// (host code only; the device-side math lives in multires_fusion.h).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "common/activation.h"
#include "common/checks.h"
#include "multires_fusion/multires_fusion.h"

namespace hrnas {
namespace multires_fusion {

constexpr const char* kOp = "multires_fusion";

inline Mode parse_mode(std::string_view s) {
  if (s == "bilinear") return Mode::kBilinear;
  if (s == "nearest") return Mode::kNearest;
  TORCH_CHECK(false, kOp, ": unknown mode '", std::string(s), "' (expected bilinear or nearest)");
}

// Forward: 1 to kMaxInputs 4-d inputs sharing N, C, dtype and device, non-empty spatial sizes,
// and a positive output size (H, W).
inline void check_forward(at::TensorList inputs, c10::IntArrayRef size) {
  TORCH_CHECK(size.size() == 2, kOp, ": size must have 2 entries (H, W), got ", size.size());
  TORCH_CHECK(size[0] > 0 && size[1] > 0, kOp, ": size must be positive, got ", size);
  const int64_t n = static_cast<int64_t>(inputs.size());
  TORCH_CHECK(n >= 1 && n <= kMaxInputs, kOp, ": expected 1 to ", kMaxInputs, " inputs, got ", n);
  const at::Tensor& x0 = inputs[0];
  check_nchw(kOp, "inputs[0]", x0);
  for (int64_t j = 0; j < n; ++j) {
    check_nchw(kOp, "every input", inputs[j]);
    check_same(kOp, "an input", inputs[j], x0);
    TORCH_CHECK(inputs[j].size(0) == x0.size(0) && inputs[j].size(1) == x0.size(1), kOp,
                ": inputs[", j, "] has N, C = ", inputs[j].size(0), ", ", inputs[j].size(1),
                ", expected ", x0.size(0), ", ", x0.size(1));
    TORCH_CHECK(inputs[j].size(2) > 0 && inputs[j].size(3) > 0, kOp, ": inputs[", j,
                "] has an empty spatial size");
  }
}

// The input gradients of the backward, laid out like out, each from empty(sizes, options, fmt);
// also the index of the first input that is already at the output size (its gradient is the
// masked grad_out itself), or -1.
template <typename Empty>
std::pair<std::vector<at::Tensor>, int> allocate_input_grads(const at::Tensor& out,
                                                             c10::IntArrayRef input_sizes,
                                                             at::MemoryFormat fmt, Empty&& empty) {
  std::vector<at::Tensor> grads;
  int first_identity = -1;
  for (size_t j = 0; j < input_sizes.size() / 2; ++j) {
    const int64_t h = input_sizes[2 * j], w = input_sizes[2 * j + 1];
    grads.push_back(empty({out.size(0), out.size(1), h, w}, out.options(), fmt));
    if (first_identity < 0 && h == out.size(2) && w == out.size(3)) {
      first_identity = static_cast<int>(j);
    }
  }
  return {std::move(grads), first_identity};
}

// Backward: grad_out shaped like out (with a non-empty spatial size), and (H, W) pairs of 1 to
// kMaxInputs inputs, all positive. Returns the number of inputs.
inline int check_backward(const at::Tensor& grad_out, const at::Tensor& out,
                          c10::IntArrayRef input_sizes) {
  check_nchw(kOp, "grad_out", grad_out);
  check_nchw(kOp, "out", out);
  check_same(kOp, "grad_out", grad_out, out);
  TORCH_CHECK(grad_out.sizes() == out.sizes(), kOp, ": grad_out has shape ", grad_out.sizes(),
              ", expected ", out.sizes());
  TORCH_CHECK(out.size(2) > 0 && out.size(3) > 0, kOp, ": out has an empty spatial size ",
              out.sizes());
  TORCH_CHECK(input_sizes.size() % 2 == 0 && !input_sizes.empty() &&
                  input_sizes.size() <= 2 * static_cast<size_t>(kMaxInputs),
              kOp, ": input_sizes must hold (H, W) of 1 to ", kMaxInputs, " inputs, got ",
              input_sizes);
  for (const int64_t s : input_sizes) {
    TORCH_CHECK(s > 0, kOp, ": input_sizes must be positive, got ", input_sizes);
  }
  return static_cast<int>(input_sizes.size() / 2);
}

}  // namespace multires_fusion
}  // namespace hrnas
