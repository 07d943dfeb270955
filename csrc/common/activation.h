// The activations the fused ops end with (none, relu, relu6), shared by host and device code.
#pragma once
#define HRNAS_COMMON_ACTIVATION_H 1

#include <string>
#include <string_view>

#include <c10/util/Exception.h>

#ifdef __CUDACC__
#define HRNAS_HD __host__ __device__ __forceinline__
#else
#define HRNAS_HD inline
#endif

namespace hrnas {

enum class Activation : int { kNone = 0, kRelu = 1, kRelu6 = 2 };

inline Activation parse_activation(const char* op, std::string_view s) {
  if (s == "none") return Activation::kNone;
  if (s == "relu") return Activation::kRelu;
  if (s == "relu6") return Activation::kRelu6;
  TORCH_CHECK(false, op, ": unknown activation '", std::string(s),
              "' (expected none, relu or relu6)");
}

// NaN propagates through both activations, as torch.relu and F.relu6 do.
template <typename T>
HRNAS_HD T activate(T v, Activation act) {
  if (act == Activation::kNone) return v;
  if (v < T(0)) return T(0);
  if (act == Activation::kRelu6 && v > T(6)) return T(6);
  return v;
}

// Whether the gradient passes the activation, decided from the activation's *output* (saved by
// the forward). Matches threshold_backward (relu) and hardtanh_backward (relu6): the output is in
// (0, 6) exactly when the pre-activation is; NaN passes, as in eager.
template <typename T>
HRNAS_HD bool passes_grad(T out, Activation act) {
  if (act == Activation::kNone) return true;
  if (act == Activation::kRelu) return !(out <= T(0));
  return !(out <= T(0) || out >= T(6));
}

}  // namespace hrnas
