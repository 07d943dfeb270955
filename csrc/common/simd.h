// Fixed-width SIMD through GCC/Clang vector extensions.
//
// A Vec<T> holds kWidth lanes, one register of the ISA level its copy of the kernels is compiled
// for (common/cpu_isa.h): 16 (zmm) under AVX-512, 8 (ymm) under AVX2, 4 (xmm) in the baseline
// build. Writing the hot loops with explicit vectors keeps their shape under our control: left to
// itself GCC vectorised some of our lane loops along the wrong axis (with a transpose per chunk),
// several times slower.
//
// Include this after HRNAS_CPU_ISA_BEGIN: everything here is compiled for the copy's level and
// sits in a namespace of that level, so the copies' inline functions never merge at link time.
#pragma once

#include <cstdint>
#include <type_traits>
#include <utility>

#include "common/cpu_isa.h"

// Included inside a level's region, a header's inline functions would be compiled for that level
// under the same names in every copy, and the linker keeps one of them: it must come first.
#ifndef HRNAS_COMMON_ACTIVATION_H
#error "include common/activation.h before HRNAS_CPU_ISA_BEGIN"
#endif

namespace hrnas {
namespace simd {
inline namespace HRNAS_CPU_ISA_NS {

constexpr int64_t kWidth = HRNAS_CPU_ISA_LEVEL == 2 ? 16 : HRNAS_CPU_ISA_LEVEL == 1 ? 8 : 4;

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

// A vector of V lanes, for blocks narrower than a register's kWidth (8 floats under AVX-512:
// one ymm), with unaligned loads and stores.
template <typename T, int V>
struct VecOfWidth {
  typedef T type __attribute__((vector_size(V * sizeof(T))));
};
template <typename T, int V>
using VecW = typename VecOfWidth<T, V>::type;

template <int V, typename T>
HRNAS_INLINE VecW<T, V> loadw(const T* p) {
  VecW<T, V> v;
  __builtin_memcpy(&v, p, sizeof(v));
  return v;
}

template <int V, typename T>
HRNAS_INLINE void storew(T* p, VecW<T, V> v) {
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

template <int kFirst, typename T, std::size_t... I>
HRNAS_INLINE Vec<T> pick_every_other(Vec<T> a, Vec<T> b, std::index_sequence<I...>) {
  return __builtin_shufflevector(a, b, (2 * I + kFirst)...);
}

// Lanes kFirst, kFirst + 2, ... of the 2 * kWidth values a:b: the even (kFirst = 0) or odd (1)
// samples of a contiguous run.
template <int kFirst, typename T>
inline Vec<T> every_other(Vec<T> a, Vec<T> b) {
  return pick_every_other<kFirst, T>(a, b, std::make_index_sequence<kWidth>{});
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

}  // namespace HRNAS_CPU_ISA_NS
}  // namespace simd
}  // namespace hrnas
