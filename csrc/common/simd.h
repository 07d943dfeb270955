// Fixed-width SIMD through GCC/Clang vector extensions.
//
// A Vec<T> holds kWidth (16) lanes; the compiler lowers it to one zmm register in the AVX-512
// clone of a function, two ymm in the AVX2 clone and four xmm in the baseline build (see
// HRNAS_TARGET_CLONES in checks.h). Writing the hot loops with explicit vectors keeps their shape
// under our control: left to itself GCC vectorised some of our lane loops along the wrong axis
// (with a transpose per chunk), several times slower.
#pragma once

#include <cstdint>
#include <type_traits>

#include "common/activation.h"

namespace hrnas {
namespace simd {

constexpr int64_t kWidth = 16;

template <typename T>
struct VecOf;
template <>
struct VecOf<float> {
  typedef float type __attribute__((vector_size(kWidth * sizeof(float))));
};
template <>
struct VecOf<double> {
  typedef double type __attribute__((vector_size(kWidth * sizeof(double))));
};
template <typename T>
using Vec = typename VecOf<T>::type;

// Unaligned loads and stores (memcpy compiles to a single vector move).
template <typename T>
inline Vec<T> load(const T* p) {
  Vec<T> v;
  __builtin_memcpy(&v, p, sizeof(v));
  return v;
}

template <typename T>
inline void store(T* p, Vec<T> v) {
  __builtin_memcpy(p, &v, sizeof(v));
}

template <typename T>
inline Vec<T> splat(T x) {
  return Vec<T>{} + x;
}

template <typename T>
inline T sum(Vec<T> v) {
  T s = T(0);
  for (int64_t l = 0; l < kWidth; ++l) s += v[l];
  return s;
}

// Lanes 0, 2, 4, ... of the 2 * kWidth values a:b (the stride-2 samples of a contiguous run).
template <typename T>
inline Vec<T> even_lanes(Vec<T> a, Vec<T> b) {
  using I = std::conditional_t<sizeof(T) == 4, int32_t, int64_t>;
  typedef I Mask __attribute__((vector_size(kWidth * sizeof(I))));
  const Mask even = {0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30};
  return __builtin_shuffle(a, b, even);
}

// The activation on a vector; NaN compares false, so it propagates as in the scalar version.
template <typename T>
inline Vec<T> activate(Vec<T> v, Activation act) {
  const Vec<T> zero = {};
  if (act != Activation::kNone) v = v < zero ? zero : v;
  if (act == Activation::kRelu6) v = v > splat<T>(T(6)) ? splat<T>(T(6)) : v;
  return v;
}

// The gradient through the activation, whose gate is read from the activation's output y:
// passes where y is in (0, inf) for relu and (0, 6) for relu6; NaN passes (see passes_grad).
template <typename T>
inline Vec<T> grad_through(Vec<T> gy, Vec<T> y, Activation act) {
  const Vec<T> zero = {};
  if (act == Activation::kNone) return gy;
  auto stop = y <= zero;
  if (act == Activation::kRelu6) stop = stop | (y >= splat<T>(T(6)));
  return stop ? zero : gy;
}

}  // namespace simd
}  // namespace hrnas
