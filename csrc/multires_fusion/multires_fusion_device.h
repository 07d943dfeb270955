// The per-thread bodies of the CUDA kernels in multires_fusion_cuda.cu, as __host__ __device__
// pure functions of the thread index, and the launch plan (checks, allocation, kernel arguments,
// vector widths, planes per thread, grids, launch order) as device::forward / backward over a
// launcher. The .cu's launcher launches the __global__ kernels (grid-stride loops over these
// bodies, with no shared memory and no barriers); tests/ops/multires_fusion_cuda_host.cpp runs
// every thread index of the same grids on the host, so the index math is checked without a GPU.
// The work split, the vector packs and the gather backward are described in the .cu.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string_view>
#include <type_traits>
#include <vector>

#include "common/checks.h"
#include "multires_fusion/multires_fusion_args.h"

namespace hrnas {
namespace multires_fusion {
namespace device {

constexpr int kThreads = 256;
// About one resident wave on an H100 (132 SMs) at half occupancy: enough memory parallelism for
// a bandwidth-bound kernel, so beyond it threads take several planes each instead.
constexpr int64_t kTargetThreads = int64_t{1} << 17;
constexpr int64_t kMaxBlocks = (int64_t{1} << 31) - 1;
constexpr int kColCache = 12;

// ---------------------------------------------------------------------------------------------
// Device helpers

// kVec elements moved as one aligned access (16 bytes at most: one LDG.128/STG.128). On the device
// the access goes through the vector load/store intrinsics on an integer vector type of the same
// size: plain struct (or float4) copies were split into scalar stores by the compiler whenever the
// address came from the kernels' index math (checked in the PTX).
template <typename T, int kVec>
struct alignas(sizeof(T) * kVec) Pack {
  T v[kVec];
};

template <int kBytes>
struct RawBits;
template <>
struct RawBits<2> {
  using type = unsigned short;
};
template <>
struct RawBits<4> {
  using type = unsigned int;
};
// CUDA's uint2 / uint4 on the device; on the host (the replay) any type of the same size.
#ifdef __CUDACC__
using RawBits8 = uint2;
using RawBits16 = uint4;
#else
using RawBits8 = uint64_t;
struct alignas(16) RawBits16 {
  uint64_t lo, hi;
};
#endif
template <>
struct RawBits<8> {
  using type = RawBits8;
};
template <>
struct RawBits<16> {
  using type = RawBits16;
};

// The host path checks the alignment the device's vector access needs (a misaligned one faults
// on a GPU, not on a CPU), so the replay catches a pack the launch plan should not have chosen.
template <typename Raw>
inline void check_pack_alignment(const void* p) {
  TORCH_CHECK(reinterpret_cast<uintptr_t>(p) % sizeof(Raw) == 0, kOp, ": a ", sizeof(Raw),
              "-byte pack access at a misaligned address");
}

// Read-only data (inputs, grad_out, out): the non-coherent load path.
template <int kVec, typename T>
HRNAS_HD Pack<T, kVec> load_pack(const T* p) {
  using Raw = typename RawBits<sizeof(T) * kVec>::type;
  Pack<T, kVec> v;
#ifdef __CUDA_ARCH__
  const Raw r = __ldg(reinterpret_cast<const Raw*>(p));
  memcpy(&v, &r, sizeof(Raw));
#else
  check_pack_alignment<Raw>(p);
  memcpy(&v, p, sizeof(Raw));
#endif
  return v;
}

template <int kVec, typename T>
HRNAS_HD void store_pack(T* p, const Pack<T, kVec>& v) {
  using Raw = typename RawBits<sizeof(T) * kVec>::type;
#ifdef __CUDA_ARCH__
  Raw r;
  memcpy(&r, &v, sizeof(Raw));
  __stwb(reinterpret_cast<Raw*>(p), r);
#else
  check_pack_alignment<Raw>(p);
  memcpy(p, &v, sizeof(Raw));
#endif
}

template <typename scalar_t>
constexpr int max_vec() {
  return static_cast<int>(16 / sizeof(scalar_t));
}

// Planes per thread the kernels are compiled for; the launch may use fewer. Two for 8-wide packs
// keeps the opmath accumulators of one thread at 16-32 registers.
template <int kVec>
constexpr int max_planes() {
  return kVec >= 8 ? 2 : 4;
}
// The NCHW gather has one element per thread (no packs): four planes at most.
constexpr int kGatherPlanesNchw = 4;

HRNAS_HD int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

// Output indices o along one axis whose forward taps may read input index i: [*lo, *hi], clamped
// to the axis. From the tap formulas in real arithmetic, bilinear o reads i exactly when
// floor(max(src(o), 0)) is i - 1 or i, src(o) = (o + 0.5) * in / out - 0.5 (the clamp at 0 makes
// every small o read inputs 0 and 1), and nearest o reads i when floor(o * in / out) == i. One
// index of slack on each side absorbs the rounding of the float source coordinate; candidates
// are then confirmed by recomputing the exact taps.
HRNAS_HD void candidate_window(int64_t i, int64_t in_size, int64_t out_size, Mode mode,
                               int64_t* lo, int64_t* hi) {
  const double r = static_cast<double>(out_size) / static_cast<double>(in_size);
  const double fi = static_cast<double>(i);
  double a, b;  // real o in [a, b)
  if (mode == Mode::kBilinear) {
    a = i <= 1 ? 0.0 : (fi - 0.5) * r - 0.5;
    b = (fi + 1.5) * r - 0.5;
  } else {
    a = fi * r;
    b = (fi + 1.0) * r;
  }
  const int64_t l = static_cast<int64_t>(ceil(a)) - 1;
  const int64_t h = static_cast<int64_t>(ceil(b));
  *lo = l < 0 ? 0 : l;
  *hi = h > out_size - 1 ? out_size - 1 : h;
}

// How output index o's forward taps along one axis read input index i: kMiss, or kHit with total
// weight *w, or kHitPoison: as kHit, but one of the two taps that land on i has weight exactly 0.
// Both bilinear taps land on i at the last index (or when the axis has size 1). The CPU kernel and
// eager add them as separate terms, so the zero-weight term turns an inf/NaN gradient into NaN
// even though the weights sum to a non-zero value; the gather adds 0 * gm for such hits to match.
enum TapHit : int { kMiss = 0, kHit = 1, kHitPoison = 2 };

template <typename opmath_t>
HRNAS_HD TapHit tap_weight(int64_t o, int64_t i, int64_t in_size, int64_t out_size, Mode mode,
                           opmath_t* w) {
  if (mode == Mode::kNearest) {
    *w = opmath_t(1);
    return nearest_tap(o, in_size, out_size) == i ? kHit : kMiss;
  }
  int64_t i0, i1;
  opmath_t l0, l1;
  bilinear_tap<opmath_t>(o, in_size, out_size, &i0, &i1, &l0, &l1);
  if (i0 == i && i1 == i) {
    *w = l0 + l1;
    return l0 == opmath_t(0) || l1 == opmath_t(0) ? kHitPoison : kHit;
  }
  *w = i0 == i ? l0 : l1;
  return i0 == i || i1 == i ? kHit : kMiss;
}

// acc += w * g, plus 0 * g for a poisoned hit (see TapHit).
template <typename opmath_t>
HRNAS_HD void add_weighted(opmath_t& acc, opmath_t w, opmath_t g, bool poison) {
  acc += w * g;
  if (poison) acc += opmath_t(0) * g;
}

// ---------------------------------------------------------------------------------------------
// Forward

template <typename scalar_t>
struct FwdArgs {
  const scalar_t* x[kMaxInputs];
  int64_t H[kMaxInputs];
  int64_t W[kMaxInputs];
  scalar_t* out;
  int n;
  Mode mode;
  Activation act;
  int64_t planes;        // NCHW: N * C; channels-last: N
  int64_t P;             // planes per thread, <= kPlanes of the kernel
  int64_t Ho, Wo, C;
  int64_t inner_chunks;  // packs per row (NCHW: Wo / kVec) or per pixel (NHWC: C / kVec)
  int64_t chunks;        // threads of work: ceil(planes / P) * Ho * (Wo or Wo * C) / kVec
  int vec;
};

// acc = v for the first input, acc + v after: the sum starts from x_0 itself, as on CPU.
template <typename opmath_t>
HRNAS_HD void add_to(opmath_t& acc, opmath_t v, bool first) {
  acc = first ? v : acc + v;
}

// Thread t: output row (plane group, h), columns [w0, w0 + kVec), planes [plane0, plane0 + np).
// Taps are computed column by column and applied to all planes at once, so only one column's
// taps are live.
template <typename scalar_t, int kVec, int kPlanes>
HRNAS_HD void fwd_nchw_thread(const FwdArgs<scalar_t>& a, int64_t t) {
  using opmath_t = at::opmath_type<scalar_t>;
  const int64_t Ho = a.Ho, Wo = a.Wo, HWo = Ho * Wo;
  const int64_t row = t / a.inner_chunks;
  const int64_t w0 = (t - row * a.inner_chunks) * kVec;
  const int64_t pg = row / Ho;
  const int64_t h = row - pg * Ho;
  const int64_t plane0 = pg * a.P;
  const int np = static_cast<int>(min64(a.P, a.planes - plane0));
  opmath_t acc[kPlanes][kVec];
  for (int j = 0; j < a.n; ++j) {
    const bool first = j == 0;
    const int64_t Hj = a.H[j], Wj = a.W[j], HWj = Hj * Wj;
    const scalar_t* x = a.x[j] + plane0 * HWj;
    if (Hj == Ho && Wj == Wo) {
#pragma unroll
      for (int p = 0; p < kPlanes; ++p) {
        if (p < np) {
          const Pack<scalar_t, kVec> v = load_pack<kVec>(x + p * HWj + h * Wo + w0);
#pragma unroll
          for (int e = 0; e < kVec; ++e) add_to(acc[p][e], static_cast<opmath_t>(v.v[e]), first);
        }
      }
    } else if (a.mode == Mode::kBilinear) {
      int64_t r0, r1;
      opmath_t a0, a1;
      bilinear_tap<opmath_t>(h, Hj, Ho, &r0, &r1, &a0, &a1);
      const scalar_t* x0 = x + r0 * Wj;
      const scalar_t* x1 = x + r1 * Wj;
#pragma unroll
      for (int e = 0; e < kVec; ++e) {
        int64_t c0, c1;
        opmath_t b0, b1;
        bilinear_tap<opmath_t>(w0 + e, Wj, Wo, &c0, &c1, &b0, &b1);
#pragma unroll
        for (int p = 0; p < kPlanes; ++p) {
          if (p < np) {
            const int64_t po = p * HWj;
            // Same association as ATen's upsample_bilinear2d kernels.
            const opmath_t v = a0 * (b0 * static_cast<opmath_t>(x0[po + c0]) +
                                     b1 * static_cast<opmath_t>(x0[po + c1])) +
                               a1 * (b0 * static_cast<opmath_t>(x1[po + c0]) +
                                     b1 * static_cast<opmath_t>(x1[po + c1]));
            add_to(acc[p][e], v, first);
          }
        }
      }
    } else {
      const scalar_t* xr = x + nearest_tap(h, Hj, Ho) * Wj;
#pragma unroll
      for (int e = 0; e < kVec; ++e) {
        const int64_t c = nearest_tap(w0 + e, Wj, Wo);
#pragma unroll
        for (int p = 0; p < kPlanes; ++p) {
          if (p < np) add_to(acc[p][e], static_cast<opmath_t>(xr[p * HWj + c]), first);
        }
      }
    }
  }
#pragma unroll
  for (int p = 0; p < kPlanes; ++p) {
    if (p < np) {
      Pack<scalar_t, kVec> v;
#pragma unroll
      for (int e = 0; e < kVec; ++e) v.v[e] = static_cast<scalar_t>(activate(acc[p][e], a.act));
      store_pack<kVec>(a.out + (plane0 + p) * HWo + h * Wo + w0, v);
    }
  }
}

// Thread t: output pixel (image group, h, w), channels [c0, c0 + kVec), images plane0 + [0, np).
template <typename scalar_t, int kVec, int kPlanes>
HRNAS_HD void fwd_nhwc_thread(const FwdArgs<scalar_t>& a, int64_t t) {
  using opmath_t = at::opmath_type<scalar_t>;
  const int64_t Ho = a.Ho, Wo = a.Wo, C = a.C, HWoC = Ho * Wo * C;
  const int64_t pix = t / a.inner_chunks;
  const int64_t c0 = (t - pix * a.inner_chunks) * kVec;
  const int64_t hw = pix / Wo;
  const int64_t w = pix - hw * Wo;
  const int64_t pg = hw / Ho;
  const int64_t h = hw - pg * Ho;
  const int64_t plane0 = pg * a.P;
  const int np = static_cast<int>(min64(a.P, a.planes - plane0));
  const int64_t out_off = (h * Wo + w) * C + c0;  // within one image
  opmath_t acc[kPlanes][kVec];
  for (int j = 0; j < a.n; ++j) {
    const bool first = j == 0;
    const int64_t Hj = a.H[j], Wj = a.W[j], HWjC = Hj * Wj * C;
    const scalar_t* x = a.x[j] + plane0 * HWjC;
    if (Hj == Ho && Wj == Wo) {
#pragma unroll
      for (int p = 0; p < kPlanes; ++p) {
        if (p < np) {
          const Pack<scalar_t, kVec> v = load_pack<kVec>(x + p * HWjC + out_off);
#pragma unroll
          for (int e = 0; e < kVec; ++e) add_to(acc[p][e], static_cast<opmath_t>(v.v[e]), first);
        }
      }
    } else if (a.mode == Mode::kBilinear) {
      int64_t r0, r1, q0, q1;
      opmath_t a0, a1, b0, b1;
      bilinear_tap<opmath_t>(h, Hj, Ho, &r0, &r1, &a0, &a1);
      bilinear_tap<opmath_t>(w, Wj, Wo, &q0, &q1, &b0, &b1);
      const int64_t o00 = (r0 * Wj + q0) * C + c0, o01 = (r0 * Wj + q1) * C + c0;
      const int64_t o10 = (r1 * Wj + q0) * C + c0, o11 = (r1 * Wj + q1) * C + c0;
#pragma unroll
      for (int p = 0; p < kPlanes; ++p) {
        if (p < np) {
          const scalar_t* xp = x + p * HWjC;
          const Pack<scalar_t, kVec> v00 = load_pack<kVec>(xp + o00);
          const Pack<scalar_t, kVec> v01 = load_pack<kVec>(xp + o01);
          const Pack<scalar_t, kVec> v10 = load_pack<kVec>(xp + o10);
          const Pack<scalar_t, kVec> v11 = load_pack<kVec>(xp + o11);
#pragma unroll
          for (int e = 0; e < kVec; ++e) {
            const opmath_t v = a0 * (b0 * static_cast<opmath_t>(v00.v[e]) +
                                     b1 * static_cast<opmath_t>(v01.v[e])) +
                               a1 * (b0 * static_cast<opmath_t>(v10.v[e]) +
                                     b1 * static_cast<opmath_t>(v11.v[e]));
            add_to(acc[p][e], v, first);
          }
        }
      }
    } else {
      const int64_t off = (nearest_tap(h, Hj, Ho) * Wj + nearest_tap(w, Wj, Wo)) * C + c0;
#pragma unroll
      for (int p = 0; p < kPlanes; ++p) {
        if (p < np) {
          const Pack<scalar_t, kVec> v = load_pack<kVec>(x + p * HWjC + off);
#pragma unroll
          for (int e = 0; e < kVec; ++e) add_to(acc[p][e], static_cast<opmath_t>(v.v[e]), first);
        }
      }
    }
  }
#pragma unroll
  for (int p = 0; p < kPlanes; ++p) {
    if (p < np) {
      Pack<scalar_t, kVec> v;
#pragma unroll
      for (int e = 0; e < kVec; ++e) v.v[e] = static_cast<scalar_t>(activate(acc[p][e], a.act));
      store_pack<kVec>(a.out + (plane0 + p) * HWoC + out_off, v);
    }
  }
}


// Thread t of the forward launch, in the kernel's layout.
template <typename scalar_t, int kVec, int kPlanes, bool kChannelsLast>
HRNAS_HD void fwd_thread(const FwdArgs<scalar_t>& a, int64_t t) {
  if constexpr (kChannelsLast) {
    fwd_nhwc_thread<scalar_t, kVec, kPlanes>(a, t);
  } else {
    fwd_nchw_thread<scalar_t, kVec, kPlanes>(a, t);
  }
}

// ---------------------------------------------------------------------------------------------
// Backward

template <typename scalar_t>
struct MaskArgs {
  const scalar_t* g;
  const scalar_t* out;
  scalar_t* gm;
  Activation act;
  int64_t chunks;  // numel / kVec
  int vec;
};

template <typename scalar_t, int kVec>
HRNAS_HD void grad_mask_thread(const MaskArgs<scalar_t>& a, int64_t t) {
  using opmath_t = at::opmath_type<scalar_t>;
  const int64_t off = t * kVec;
  Pack<scalar_t, kVec> g = load_pack<kVec>(a.g + off);
  if (a.act != Activation::kNone) {
    const Pack<scalar_t, kVec> o = load_pack<kVec>(a.out + off);
#pragma unroll
    for (int e = 0; e < kVec; ++e) {
      if (!passes_grad(static_cast<opmath_t>(o.v[e]), a.act)) g.v[e] = scalar_t(0);
    }
  }
  store_pack<kVec>(a.gm + off, g);
}


// The gather: segment s covers threads [begin[s], begin[s + 1]) and writes gx[s], the gradient of
// an input of size (H[s], W[s]).
template <typename scalar_t>
struct BwdArgs {
  const scalar_t* gm;   // the materialised gm, or grad_out when `mask`
  const scalar_t* out;  // read only when `mask`
  scalar_t* gx[kMaxInputs];
  int64_t H[kMaxInputs];
  int64_t W[kMaxInputs];
  int64_t P[kMaxInputs];
  int64_t begin[kMaxInputs + 1];
  int segments;
  Mode mode;
  Activation act;
  bool mask;             // apply act'(out) to grad_out on the fly
  int64_t planes;        // NCHW: N * C; channels-last: N
  int64_t Ho, Wo, C;
  int64_t inner_chunks;  // channels-last: C / kVec; NCHW: 1
  int vec;
};

template <typename scalar_t>
HRNAS_HD int find_segment(const BwdArgs<scalar_t>& a, int64_t t) {
  int s = 0;
  while (s + 1 < a.segments && t >= a.begin[s + 1]) ++s;
  return s;
}

template <typename scalar_t>
HRNAS_HD at::opmath_type<scalar_t> masked_grad_at(const BwdArgs<scalar_t>& a, int64_t off) {
  using opmath_t = at::opmath_type<scalar_t>;
  const opmath_t g = static_cast<opmath_t>(a.gm[off]);
  if (a.mask && !passes_grad(static_cast<opmath_t>(a.out[off]), a.act)) return opmath_t(0);
  return g;
}

template <int kVec, typename scalar_t>
HRNAS_HD Pack<scalar_t, kVec> masked_grad_pack(const BwdArgs<scalar_t>& a, int64_t off) {
  using opmath_t = at::opmath_type<scalar_t>;
  Pack<scalar_t, kVec> g = load_pack<kVec>(a.gm + off);
  if (a.mask) {
    const Pack<scalar_t, kVec> o = load_pack<kVec>(a.out + off);
#pragma unroll
    for (int e = 0; e < kVec; ++e) {
      if (!passes_grad(static_cast<opmath_t>(o.v[e]), a.act)) g.v[e] = scalar_t(0);
    }
  }
  return g;
}

// Visits every output pixel (h, w) whose forward taps read input pixel (i, q), calling
// visit(h, w, weight, poison) in ascending h, then w (poison: one of the weights is an exact 0 that
// must still be added as 0 * g, as the CPU kernel and eager do). The column weights of the
// candidate window are computed once and cached in registers when the window is at most
// kColCache wide (upsampling up to about 4x); wider windows recompute them per row.
template <typename opmath_t, typename Visit>
HRNAS_HD void for_each_tap(int64_t i, int64_t q, int64_t Hj, int64_t Wj, int64_t Ho, int64_t Wo,
                           Mode mode, Visit&& visit) {
  int64_t h_lo, h_hi, w_lo, w_hi;
  candidate_window(i, Hj, Ho, mode, &h_lo, &h_hi);
  candidate_window(q, Wj, Wo, mode, &w_lo, &w_hi);
  const int64_t nw = w_hi - w_lo + 1;
  const bool cached = nw <= kColCache;
  opmath_t wc[kColCache];
  uint32_t hits = 0, poison = 0;
  if (cached) {
#pragma unroll
    for (int k = 0; k < kColCache; ++k) {
      if (k >= nw) break;
      const TapHit hit = tap_weight(w_lo + k, q, Wj, Wo, mode, &wc[k]);
      if (hit != kMiss) hits |= 1u << k;
      if (hit == kHitPoison) poison |= 1u << k;
    }
  }
  for (int64_t h = h_lo; h <= h_hi; ++h) {
    opmath_t wr;
    const TapHit row_hit = tap_weight(h, i, Hj, Ho, mode, &wr);
    if (row_hit == kMiss) continue;
    if (cached) {
#pragma unroll
      for (int k = 0; k < kColCache; ++k) {
        if (k >= nw) break;
        if (!((hits >> k) & 1u)) continue;
        visit(h, w_lo + k, wr * wc[k], row_hit == kHitPoison || ((poison >> k) & 1u));
      }
    } else {
      for (int64_t w = w_lo; w <= w_hi; ++w) {
        opmath_t wcw;
        const TapHit col_hit = tap_weight(w, q, Wj, Wo, mode, &wcw);
        if (col_hit == kMiss) continue;
        visit(h, w, wr * wcw, row_hit == kHitPoison || col_hit == kHitPoison);
      }
    }
  }
}

// Thread t of segment s: gradient element (i, q) of planes plane0 + [0, np).
template <typename scalar_t, int kPlanes>
HRNAS_HD void bwd_nchw_thread(const BwdArgs<scalar_t>& a, int64_t t) {
  using opmath_t = at::opmath_type<scalar_t>;
  const int s = find_segment(a, t);
  t -= a.begin[s];
  const int64_t Ho = a.Ho, Wo = a.Wo, HWo = Ho * Wo;
  const int64_t Hj = a.H[s], Wj = a.W[s], HWj = Hj * Wj;
  const int64_t hi_row = t / Wj;
  const int64_t q = t - hi_row * Wj;
  const int64_t pg = hi_row / Hj;
  const int64_t i = hi_row - pg * Hj;
  const int64_t plane0 = pg * a.P[s];
  const int np = static_cast<int>(min64(a.P[s], a.planes - plane0));
  scalar_t* gx = a.gx[s] + plane0 * HWj + i * Wj + q;
  const int64_t g0 = plane0 * HWo;
  if (Hj == Ho && Wj == Wo) {
#pragma unroll
    for (int p = 0; p < kPlanes; ++p) {
      if (p < np) {
        gx[p * HWj] = static_cast<scalar_t>(masked_grad_at(a, g0 + p * HWo + i * Wo + q));
      }
    }
    return;
  }
  opmath_t acc[kPlanes];
#pragma unroll
  for (int p = 0; p < kPlanes; ++p) acc[p] = opmath_t(0);
  for_each_tap<opmath_t>(i, q, Hj, Wj, Ho, Wo, a.mode,
                         [&](int64_t h, int64_t w, opmath_t wk, bool zk) {
#pragma unroll
                           for (int p = 0; p < kPlanes; ++p) {
                             if (p < np) {
                               add_weighted(acc[p], wk,
                                            masked_grad_at(a, g0 + p * HWo + h * Wo + w), zk);
                             }
                           }
                         });
#pragma unroll
  for (int p = 0; p < kPlanes; ++p) {
    if (p < np) gx[p * HWj] = static_cast<scalar_t>(acc[p]);
  }
}

// Thread t of segment s: channels [c0, c0 + kVec) of gradient pixel (i, q), for images
// plane0 + [0, np).
template <typename scalar_t, int kVec, int kPlanes>
HRNAS_HD void bwd_nhwc_thread(const BwdArgs<scalar_t>& a, int64_t t) {
  using opmath_t = at::opmath_type<scalar_t>;
  const int s = find_segment(a, t);
  t -= a.begin[s];
  const int64_t Ho = a.Ho, Wo = a.Wo, C = a.C, HWoC = Ho * Wo * C;
  const int64_t Hj = a.H[s], Wj = a.W[s], HWjC = Hj * Wj * C;
  const int64_t pix = t / a.inner_chunks;
  const int64_t c0 = (t - pix * a.inner_chunks) * kVec;
  const int64_t iq = pix / Wj;
  const int64_t q = pix - iq * Wj;
  const int64_t pg = iq / Hj;
  const int64_t i = iq - pg * Hj;
  const int64_t plane0 = pg * a.P[s];
  const int np = static_cast<int>(min64(a.P[s], a.planes - plane0));
  scalar_t* gx = a.gx[s] + plane0 * HWjC + (i * Wj + q) * C + c0;
  const int64_t g0 = plane0 * HWoC + c0;
  if (Hj == Ho && Wj == Wo) {
#pragma unroll
    for (int p = 0; p < kPlanes; ++p) {
      if (p < np) {
        store_pack<kVec>(gx + p * HWjC,
                         masked_grad_pack<kVec>(a, g0 + p * HWoC + (i * Wo + q) * C));
      }
    }
    return;
  }
  opmath_t acc[kPlanes][kVec];
#pragma unroll
  for (int p = 0; p < kPlanes; ++p) {
#pragma unroll
    for (int e = 0; e < kVec; ++e) acc[p][e] = opmath_t(0);
  }
  for_each_tap<opmath_t>(
      i, q, Hj, Wj, Ho, Wo, a.mode, [&](int64_t h, int64_t w, opmath_t wk, bool zk) {
#pragma unroll
        for (int p = 0; p < kPlanes; ++p) {
          if (p < np) {
            const Pack<scalar_t, kVec> g =
                masked_grad_pack<kVec>(a, g0 + p * HWoC + (h * Wo + w) * C);
#pragma unroll
            for (int e = 0; e < kVec; ++e) {
              add_weighted(acc[p][e], wk, static_cast<opmath_t>(g.v[e]), zk);
            }
          }
        }
      });
#pragma unroll
  for (int p = 0; p < kPlanes; ++p) {
    if (p < np) {
      Pack<scalar_t, kVec> v;
#pragma unroll
      for (int e = 0; e < kVec; ++e) v.v[e] = static_cast<scalar_t>(acc[p][e]);
      store_pack<kVec>(gx + p * HWjC, v);
    }
  }
}


// Thread t of the gather launch, in the kernel's layout.
template <typename scalar_t, int kVec, int kPlanes, bool kChannelsLast>
HRNAS_HD void bwd_thread(const BwdArgs<scalar_t>& a, int64_t t) {
  if constexpr (kChannelsLast) {
    bwd_nhwc_thread<scalar_t, kVec, kPlanes>(a, t);
  } else {
    bwd_nchw_thread<scalar_t, kPlanes>(a, t);
  }
}

// ---------------------------------------------------------------------------------------------
// Host side: kernel arguments and launch geometry

inline bool aligned(const void* p, int64_t bytes) {
  return reinterpret_cast<uintptr_t>(p) % static_cast<uintptr_t>(bytes) == 0;
}

// The widest pack (<= 16 bytes) that divides `inner` and keeps every pointer aligned.
template <typename scalar_t>
int pick_vec(int64_t inner, const std::vector<const void*>& ptrs) {
  for (int v = max_vec<scalar_t>(); v > 1; v /= 2) {
    if (inner % v != 0) continue;
    const int64_t bytes = v * static_cast<int64_t>(sizeof(scalar_t));
    if (std::all_of(ptrs.begin(), ptrs.end(), [&](const void* p) { return aligned(p, bytes); })) {
      return v;
    }
  }
  return 1;
}

// Planes per thread: as many as allowed while the grid keeps about kTargetThreads threads.
inline int64_t planes_per_thread(int64_t planes, int64_t per_plane, int64_t max_p) {
  for (int64_t p = max_p; p > 1; p /= 2) {
    if ((planes + p - 1) / p * per_plane >= kTargetThreads) return p;
  }
  return 1;
}

// Calls f(std::integral_constant<int, vec>) for a vec the dtype can pack.
template <typename scalar_t, typename F>
void with_vec(int vec, const F& f) {
  if constexpr (max_vec<scalar_t>() >= 8) {
    if (vec == 8) return f(std::integral_constant<int, 8>());
  }
  if constexpr (max_vec<scalar_t>() >= 4) {
    if (vec == 4) return f(std::integral_constant<int, 4>());
  }
  if (vec == 2) return f(std::integral_constant<int, 2>());
  return f(std::integral_constant<int, 1>());
}

// `xs` and `out` are contiguous in `fmt`.
template <typename scalar_t>
FwdArgs<scalar_t> make_fwd_args(const std::vector<at::Tensor>& xs, const at::Tensor& out,
                                bool channels_last, Mode mode, Activation act) {
  FwdArgs<scalar_t> a{};
  a.n = static_cast<int>(xs.size());
  a.mode = mode;
  a.act = act;
  a.out = out.mutable_data_ptr<scalar_t>();
  a.Ho = out.size(2);
  a.Wo = out.size(3);
  a.C = out.size(1);
  std::vector<const void*> packed = {a.out};
  for (int j = 0; j < a.n; ++j) {
    a.x[j] = xs[j].const_data_ptr<scalar_t>();
    a.H[j] = xs[j].size(2);
    a.W[j] = xs[j].size(3);
    // NCHW gathers resampled inputs element by element; only identity inputs move in packs.
    if (channels_last || (a.H[j] == a.Ho && a.W[j] == a.Wo)) packed.push_back(a.x[j]);
  }
  a.vec = pick_vec<scalar_t>(channels_last ? a.C : a.Wo, packed);
  int64_t per_plane;
  if (channels_last) {
    a.planes = out.size(0);
    a.inner_chunks = a.C / a.vec;
    per_plane = a.Ho * a.Wo * a.inner_chunks;
  } else {
    a.planes = out.size(0) * out.size(1);
    a.inner_chunks = a.Wo / a.vec;
    per_plane = a.Ho * a.inner_chunks;
  }
  with_vec<scalar_t>(a.vec, [&](auto v) {
    a.P = planes_per_thread(a.planes, per_plane, max_planes<decltype(v)::value>());
  });
  a.chunks = (a.planes + a.P - 1) / a.P * per_plane;
  return a;
}

template <typename scalar_t>
MaskArgs<scalar_t> make_mask_args(const at::Tensor& g, const at::Tensor& out, at::Tensor& gm,
                                  Activation act) {
  MaskArgs<scalar_t> a{};
  a.g = g.const_data_ptr<scalar_t>();
  a.out = out.const_data_ptr<scalar_t>();
  a.gm = gm.mutable_data_ptr<scalar_t>();
  a.act = act;
  a.vec = pick_vec<scalar_t>(out.numel(), {a.g, a.out, a.gm});
  a.chunks = out.numel() / a.vec;
  return a;
}

// Gather plan for every gradient in `grads` but `skip` (the one holding gm, or -1). `gm` is
// grad_out (masked on the fly when `mask`) or the materialised gm; all are contiguous in fmt.
template <typename scalar_t>
BwdArgs<scalar_t> make_bwd_args(const scalar_t* gm, const at::Tensor& out,
                                std::vector<at::Tensor>& grads, int skip, bool mask,
                                bool channels_last, Mode mode, Activation act) {
  BwdArgs<scalar_t> a{};
  a.gm = gm;
  a.out = out.const_data_ptr<scalar_t>();
  a.mask = mask;
  a.mode = mode;
  a.act = act;
  a.Ho = out.size(2);
  a.Wo = out.size(3);
  a.C = out.size(1);
  a.planes = channels_last ? out.size(0) : out.size(0) * out.size(1);
  std::vector<int> order;
  for (int j = 0; j < static_cast<int>(grads.size()); ++j) {
    if (j != skip) order.push_back(j);
  }
  // Heaviest gathers first: fan-in per gradient element is HWo / (H_j W_j).
  std::stable_sort(order.begin(), order.end(), [&](int l, int r) {
    return grads[l].size(2) * grads[l].size(3) < grads[r].size(2) * grads[r].size(3);
  });
  a.vec = 1;
  if (channels_last) {
    std::vector<const void*> packed = {a.gm};
    if (mask) packed.push_back(a.out);
    for (int j : order) packed.push_back(grads[j].const_data_ptr<scalar_t>());
    a.vec = pick_vec<scalar_t>(a.C, packed);
  }
  a.inner_chunks = channels_last ? a.C / a.vec : 1;
  a.segments = static_cast<int>(order.size());
  a.begin[0] = 0;
  for (int s = 0; s < a.segments; ++s) {
    const at::Tensor& gx = grads[order[s]];
    a.gx[s] = gx.mutable_data_ptr<scalar_t>();
    a.H[s] = gx.size(2);
    a.W[s] = gx.size(3);
    const int64_t per_plane = a.H[s] * a.W[s] * a.inner_chunks;
    with_vec<scalar_t>(a.vec, [&](auto v) {
      a.P[s] = planes_per_thread(a.planes, per_plane,
                                 channels_last ? max_planes<decltype(v)::value>()
                                               : kGatherPlanesNchw);
    });
    a.begin[s + 1] = a.begin[s] + (a.planes + a.P[s] - 1) / a.P[s] * per_plane;
  }
  return a;
}

inline int64_t grid_for(int64_t work) {
  return std::min<int64_t>((work + kThreads - 1) / kThreads, kMaxBlocks);
}


// ---------------------------------------------------------------------------------------------
// Launch plan (host only): the op entry points up to the launches, shared by the .cu (which
// launches the kernels) and the host replay (which runs them on the CPU). A launcher L provides
//   on_device(t): checks that t is on the launcher's device type and makes its device current;
//   uninitialised(t): t, freshly allocated memory every element of which a kernel must write;
//   fwd<scalar_t, kVec, kPlanes, kChannelsLast>(a, blocks), mask<scalar_t, kVec>(m, blocks),
//   bwd<scalar_t, kVec, kPlanes, kChannelsLast>(a, blocks): one launch of blocks x kThreads
//   threads, each a grid-stride loop over fwd_thread / grad_mask_thread / bwd_thread.

// The forward op (schema in hrnas_kernels/multires_fusion/ops.py).
template <typename L>
at::Tensor forward(L& launch, at::TensorList inputs, c10::IntArrayRef size,
                   std::string_view mode_s, std::string_view act_s) {
  const Mode mode = parse_mode(mode_s);
  const Activation act = parse_activation(kOp, act_s);
  check_forward(inputs, size);
  const int n = static_cast<int>(inputs.size());
  const at::Tensor& x0 = inputs[0];
  launch.on_device(x0);
  const at::MemoryFormat fmt = output_memory_format(x0);
  const at::Tensor out = launch.uninitialised(
      at::empty({x0.size(0), x0.size(1), size[0], size[1]}, x0.options().memory_format(fmt)));
  if (out.numel() == 0) return out;
  std::vector<at::Tensor> xs;
  xs.reserve(n);
  for (int j = 0; j < n; ++j) xs.push_back(inputs[j].contiguous(fmt));
  const bool channels_last = fmt == at::MemoryFormat::ChannelsLast;
  const at::ScalarType dtype = x0.scalar_type();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "multires_fusion_fwd", [&] {
    const FwdArgs<scalar_t> a = make_fwd_args<scalar_t>(xs, out, channels_last, mode, act);
    with_vec<scalar_t>(a.vec, [&](auto v) {
      constexpr int kVec = decltype(v)::value;
      constexpr int kPlanes = max_planes<kVec>();
      if (channels_last) {
        launch.template fwd<scalar_t, kVec, kPlanes, true>(a, grid_for(a.chunks));
      } else {
        launch.template fwd<scalar_t, kVec, kPlanes, false>(a, grid_for(a.chunks));
      }
    });
  });
  return out;
}

// The backward op: the gradient of every input.
template <typename L>
std::vector<at::Tensor> backward(L& launch, const at::Tensor& grad_out, const at::Tensor& out,
                                 c10::IntArrayRef input_sizes, std::string_view mode_s,
                                 std::string_view act_s) {
  const Mode mode = parse_mode(mode_s);
  const Activation act = parse_activation(kOp, act_s);
  check_backward(grad_out, out, input_sizes);
  launch.on_device(out);
  const at::MemoryFormat fmt = output_memory_format(out);
  auto [grads, first_identity] = allocate_input_grads(
      out, input_sizes, fmt,
      [](at::IntArrayRef sizes, const at::TensorOptions& options, at::MemoryFormat f) {
        return at::empty(sizes, options.memory_format(f));
      });
  for (const at::Tensor& gx : grads) launch.uninitialised(gx);
  if (out.numel() == 0) return grads;
  const at::Tensor g = grad_out.contiguous(fmt);
  const at::Tensor o = out.contiguous(fmt);
  const bool channels_last = fmt == at::MemoryFormat::ChannelsLast;
  const at::ScalarType dtype = out.scalar_type();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "multires_fusion_bwd", [&] {
    const scalar_t* gm = g.const_data_ptr<scalar_t>();
    if (first_identity >= 0) {
      const MaskArgs<scalar_t> m = make_mask_args<scalar_t>(g, o, grads[first_identity], act);
      with_vec<scalar_t>(m.vec, [&](auto v) {
        launch.template mask<scalar_t, decltype(v)::value>(m, grid_for(m.chunks));
      });
      gm = m.gm;
    }
    const bool mask = first_identity < 0 && act != Activation::kNone;
    const BwdArgs<scalar_t> a = make_bwd_args<scalar_t>(gm, o, grads, first_identity, mask,
                                                        channels_last, mode, act);
    const int64_t work = a.begin[a.segments];
    if (work == 0) return;
    with_vec<scalar_t>(a.vec, [&](auto v) {
      constexpr int kVec = decltype(v)::value;
      if (channels_last) {
        launch.template bwd<scalar_t, kVec, max_planes<kVec>(), true>(a, grid_for(work));
      } else {
        launch.template bwd<scalar_t, 1, kGatherPlanesNchw, false>(a, grid_for(work));
      }
    });
  });
  return grads;
}

}  // namespace device
}  // namespace multires_fusion
}  // namespace hrnas
