// Multi-resolution fusion on CPU: out = act(sum_j resize(x_j, (H, W))) writing each output once,
// and an atomic-free, deterministic backward.
//
// Forward:
//   NCHW (one plane at a time): each source row of a resampled input is resampled along W into a
//        per-thread buffer by a vector row map (permutes within a 32-element window); each
//        output row is summed in an L1 accumulator row (same-size rows, then two blended buffer
//        rows per resampled input), then activated and written once.
//   NHWC (one output row of Wo * C values at a time): each source row of a resampled input is
//        resampled along W into a per-thread slot once per task; each output row sums the
//        same-size row and two weighted slot rows per resampled input in one pass, activates and
//        writes once.
// Backward, per plane (NCHW) or image (NHWC): gm = grad_out * act'(out) is formed once (in a
// same-size input's gradient when there is one); each resampled input's gradient is then gathered
// row by row with the transposed taps, vertically then horizontally. Every plane/image belongs to
// one thread and every sum has a fixed order: no atomics, bitwise independent of the thread
// count.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/core/SymIntArrayRef.h>
#include <torch/library.h>

#include <algorithm>
#include <string_view>
#include <type_traits>
#include <vector>

#include "common/checks.h"
#include "common/output_pool.h"
#include "common/scratch.h"
#include "multires_fusion/multires_fusion_args.h"
#include "common/activation.h"
#include "common/cpu_isa.h"

#if HRNAS_CPU_ISA_ENABLED
HRNAS_CPU_ISA_BEGIN
#include "common/simd.h"

namespace hrnas {
namespace multires_fusion {
namespace {

// Taps along one axis. Forward: output index o reads l0[o] * x[i0[o]] + l1[o] * x[i1[o]] (nearest
// uses i0 alone). Backward: input index i receives sum_k w[k] * g[o[k]] for k in
// [begin[i], begin[i+1]), in ascending o: the transpose of the forward taps.
template <typename opmath_t>
struct Axis {
  std::vector<int64_t> i0, i1;
  std::vector<opmath_t> l0, l1;
  std::vector<int64_t> begin, o;
  std::vector<opmath_t> w;
};

template <typename opmath_t>
Axis<opmath_t> make_axis(int64_t in_size, int64_t out_size, Mode mode, bool transposed) {
  Axis<opmath_t> a;
  a.i0.resize(out_size);
  a.i1.resize(out_size);
  a.l0.resize(out_size);
  a.l1.resize(out_size);
  for (int64_t dst = 0; dst < out_size; ++dst) {
    if (mode == Mode::kBilinear) {
      bilinear_tap<opmath_t>(dst, in_size, out_size, &a.i0[dst], &a.i1[dst], &a.l0[dst],
                             &a.l1[dst]);
    } else {
      a.i0[dst] = a.i1[dst] = nearest_tap(dst, in_size, out_size);
      a.l0[dst] = opmath_t(1);
      a.l1[dst] = opmath_t(0);
    }
  }
  if (!transposed) return a;
  const int taps = mode == Mode::kBilinear ? 2 : 1;
  a.begin.assign(in_size + 1, 0);
  for (int64_t dst = 0; dst < out_size; ++dst) {
    ++a.begin[a.i0[dst] + 1];
    if (taps == 2) ++a.begin[a.i1[dst] + 1];
  }
  for (int64_t i = 0; i < in_size; ++i) a.begin[i + 1] += a.begin[i];
  a.o.resize(a.begin[in_size]);
  a.w.resize(a.begin[in_size]);
  std::vector<int64_t> fill(a.begin.begin(), a.begin.end() - 1);
  for (int64_t dst = 0; dst < out_size; ++dst) {
    a.o[fill[a.i0[dst]]] = dst;
    a.w[fill[a.i0[dst]]++] = a.l0[dst];
    if (taps == 2) {
      a.o[fill[a.i1[dst]]] = dst;
      a.w[fill[a.i1[dst]]++] = a.l1[dst];
    }
  }
  return a;
}

// Vector loads/stores of scalar_t data in the math type (converting for fp16/bf16).
template <typename scalar_t, typename opmath_t>
HRNAS_INLINE simd::Vec<opmath_t> load_as(const scalar_t* p) {
  if constexpr (std::is_same_v<scalar_t, opmath_t>) {
    return simd::load<opmath_t>(p);
  } else {
    simd::Vec<opmath_t> v;
    for (int64_t l = 0; l < simd::kWidth; ++l) v[l] = static_cast<opmath_t>(p[l]);
    return v;
  }
}

template <typename scalar_t, typename opmath_t>
HRNAS_INLINE void store_as(scalar_t* p, simd::Vec<opmath_t> v) {
  if constexpr (std::is_same_v<scalar_t, opmath_t>) {
    simd::store<opmath_t>(p, v);
  } else {
    for (int64_t l = 0; l < simd::kWidth; ++l) p[l] = static_cast<scalar_t>(v[l]);
  }
}

// Covers [0, len) with vector-wide pieces, vec(offset), the last piece overlapping its
// predecessor instead of leaving a scalar tail; scalar(i) per element when len < kWidth. Only
// for elementwise work that writes a buffer it does not read, so recomputing an element is
// harmless.
template <typename VecFn, typename ScalarFn>
HRNAS_INLINE void sweep(int64_t len, VecFn&& vec, ScalarFn&& scalar) {
  if (len < simd::kWidth) {
    for (int64_t i = 0; i < len; ++i) scalar(i);
    return;
  }
  for (int64_t off = 0;; off += simd::kWidth) {
    if (off + simd::kWidth >= len) {
      vec(len - simd::kWidth);
      return;
    }
    vec(off);
  }
}

// dst[e] = sum_{k in [k0, k1)} w[k] * src[o[k] * stride + e] for e < len, k ascending: one
// transposed-tap gather of the backward (a row from the rows of grad_out that read it, or a
// pixel's channels from the pixels that read it). Four vectors share each tap's weight
// broadcast and offset, which a vector at a time reloaded for every multiply-add; the order of
// each element's sum is the same either way. Writes a buffer it does not read (see sweep).
template <typename dst_t, typename opmath_t>
HRNAS_INLINE void gather_taps(dst_t* __restrict dst, const opmath_t* __restrict src,
                              int64_t stride, const opmath_t* w, const int64_t* o, int64_t k0,
                              int64_t k1, int64_t len) {
  using V = simd::Vec<opmath_t>;
  constexpr int64_t kBlock = 4 * simd::kWidth;
  int64_t e = 0;
  for (; e + kBlock <= len; e += kBlock) {
    V a0 = {}, a1 = {}, a2 = {}, a3 = {};
    for (int64_t k = k0; k < k1; ++k) {
      const opmath_t* s = src + o[k] * stride + e;
      const opmath_t wk = w[k];
      a0 += wk * simd::load<opmath_t>(s);
      a1 += wk * simd::load<opmath_t>(s + simd::kWidth);
      a2 += wk * simd::load<opmath_t>(s + 2 * simd::kWidth);
      a3 += wk * simd::load<opmath_t>(s + 3 * simd::kWidth);
    }
    store_as<dst_t, opmath_t>(dst + e, a0);
    store_as<dst_t, opmath_t>(dst + e + simd::kWidth, a1);
    store_as<dst_t, opmath_t>(dst + e + 2 * simd::kWidth, a2);
    store_as<dst_t, opmath_t>(dst + e + 3 * simd::kWidth, a3);
  }
  if (e == len) return;
  auto vec = [&](int64_t at) {
    V a = {};
    for (int64_t k = k0; k < k1; ++k) a += w[k] * simd::load<opmath_t>(src + o[k] * stride + at);
    store_as<dst_t, opmath_t>(dst + at, a);
  };
  if (len < simd::kWidth) {
    for (; e < len; ++e) {
      opmath_t a = opmath_t(0);
      for (int64_t k = k0; k < k1; ++k) a += w[k] * src[o[k] * stride + e];
      dst[e] = static_cast<dst_t>(a);
    }
    return;
  }
  for (; e + simd::kWidth < len; e += simd::kWidth) vec(e);
  vec(len - simd::kWidth);  // the last piece overlaps its predecessor instead of a scalar tail
}

// A linear map between rows, dst[d] = sum_t w[d][t] * src[idx[d][t]], each destination padded
// to K taps with zero weights: the resampling of an NCHW row along W (forward taps) and its
// transpose (backward). The vector form covers the destination with chunks of up to kWidth
// lanes whose taps all fall in one window of 2 * kWidth source elements, so a chunk costs two
// loads and K two-source permutes (vpermt2ps on AVX-512) instead of K * kWidth scalar loads. A
// map with a destination whose own taps span more than the window keeps the scalar form.
constexpr int64_t kWindow = 2 * simd::kWidth;

template <typename opmath_t>
struct RowMap {
  int64_t src_len = 0, dst_len = 0, K = 0;
  std::vector<int64_t> idx;  // [dst_len][K]
  std::vector<opmath_t> w;   // [dst_len][K]
  std::vector<int64_t> chunk_dst, chunk_base;
  std::vector<int32_t> lane_idx;  // [chunk][K][kWidth]: offsets into the chunk's window
  std::vector<opmath_t> lane_w;   // [chunk][K][kWidth]
};

// Builds the map from per-destination tap lists: taps(d, push) calls push(index, weight) for
// each tap of destination d, at most K times.
template <typename opmath_t, typename Taps>
RowMap<opmath_t> make_row_map(int64_t src_len, int64_t dst_len, int64_t K, Taps&& taps) {
  RowMap<opmath_t> m;
  m.src_len = src_len;
  m.dst_len = dst_len;
  m.K = K;
  m.idx.assign(dst_len * K, 0);
  m.w.assign(dst_len * K, opmath_t(0));
  std::vector<int64_t> lo(dst_len, src_len), hi(dst_len, -1);
  bool scalar = false;
  for (int64_t d = 0; d < dst_len; ++d) {
    int64_t t = 0;
    taps(d, [&](int64_t i, opmath_t w) {
      m.idx[d * K + t] = i;
      m.w[d * K + t] = w;
      lo[d] = std::min(lo[d], i);
      hi[d] = std::max(hi[d], i);
      ++t;
    });
    for (; t < K; ++t) m.idx[d * K + t] = t > 0 ? m.idx[d * K] : 0;
    if (hi[d] < 0) lo[d] = hi[d] = m.idx[d * K];
    scalar = scalar || hi[d] - lo[d] >= kWindow;
  }
  if (scalar) return m;  // every destination's taps are in idx and w
  for (int64_t d = 0; d < dst_len;) {
    int64_t a = lo[d], b = hi[d], lanes = 1;
    while (lanes < simd::kWidth && d + lanes < dst_len &&
           std::max(b, hi[d + lanes]) - std::min(a, lo[d + lanes]) < kWindow) {
      a = std::min(a, lo[d + lanes]);
      b = std::max(b, hi[d + lanes]);
      ++lanes;
    }
    // Slide the window left when it would run past the row: every index stays inside it.
    const int64_t base = src_len >= kWindow ? std::min(a, src_len - kWindow) : 0;
    m.chunk_dst.push_back(d);
    m.chunk_base.push_back(base);
    for (int64_t t = 0; t < K; ++t) {
      for (int64_t l = 0; l < simd::kWidth; ++l) {
        const bool live = l < lanes;
        m.lane_idx.push_back(live ? static_cast<int32_t>(m.idx[(d + l) * K + t] - base) : 0);
        m.lane_w.push_back(live ? m.w[(d + l) * K + t] : opmath_t(0));
      }
    }
    d += lanes;
  }
  return m;
}

// The resampling along W of the forward: taps (i0, l0) and, for bilinear, (i1, l1).
template <typename opmath_t>
RowMap<opmath_t> forward_row_map(const Axis<opmath_t>& a, int64_t src_len, Mode mode) {
  const bool bilinear = mode == Mode::kBilinear;
  return make_row_map<opmath_t>(src_len, static_cast<int64_t>(a.i0.size()), bilinear ? 2 : 1,
                                [&](int64_t d, auto push) {
                                  push(a.i0[d], a.l0[d]);
                                  if (bilinear) push(a.i1[d], a.l1[d]);
                                });
}

// Its transpose: input index q gathers the output indices that read it (a.begin / a.o / a.w).
template <typename opmath_t>
RowMap<opmath_t> transposed_row_map(const Axis<opmath_t>& a, int64_t out_len) {
  const int64_t in_len = static_cast<int64_t>(a.begin.size()) - 1;
  int64_t K = 1;
  for (int64_t q = 0; q < in_len; ++q) K = std::max(K, a.begin[q + 1] - a.begin[q]);
  return make_row_map<opmath_t>(out_len, in_len, K, [&](int64_t q, auto push) {
    for (int64_t k = a.begin[q]; k < a.begin[q + 1]; ++k) push(a.o[k], a.w[k]);
  });
}

template <typename src_t, typename dst_t, typename opmath_t>
HRNAS_INLINE void apply_row_map(const RowMap<opmath_t>& m, const src_t* __restrict src,
                          dst_t* __restrict dst) {
  const int64_t K = m.K;
  if (m.chunk_dst.empty()) {
    for (int64_t d = 0; d < m.dst_len; ++d) {
      opmath_t acc = opmath_t(0);
      for (int64_t t = 0; t < K; ++t) {
        acc += m.w[d * K + t] * static_cast<opmath_t>(src[m.idx[d * K + t]]);
      }
      dst[d] = static_cast<dst_t>(acc);
    }
    return;
  }
  using V = simd::Vec<opmath_t>;
  using I = std::conditional_t<sizeof(opmath_t) == 4, int32_t, int64_t>;
  typedef int32_t I32 __attribute__((vector_size(simd::kWidth * sizeof(int32_t))));
  typedef I Index __attribute__((vector_size(simd::kWidth * sizeof(I))));
  V lo = {}, hi = {};
  const bool padded = m.src_len < kWindow;
  if (padded) {  // a short row: the one window, zero beyond the row
    opmath_t window[kWindow];
    for (int64_t i = 0; i < kWindow; ++i) {
      window[i] = i < m.src_len ? static_cast<opmath_t>(src[i]) : opmath_t(0);
    }
    lo = simd::load<opmath_t>(window);
    hi = simd::load<opmath_t>(window + simd::kWidth);
  }
  const int32_t* li = m.lane_idx.data();
  const opmath_t* lw = m.lane_w.data();
  const int64_t chunks = static_cast<int64_t>(m.chunk_dst.size());
  for (int64_t c = 0; c < chunks; ++c) {
    if (!padded) {
      lo = load_as<src_t, opmath_t>(src + m.chunk_base[c]);
      hi = load_as<src_t, opmath_t>(src + m.chunk_base[c] + simd::kWidth);
    }
    V acc = {};
    for (int64_t t = 0; t < K; ++t, li += simd::kWidth, lw += simd::kWidth) {
      I32 i32;
      __builtin_memcpy(&i32, li, sizeof(i32));
      acc += simd::load<opmath_t>(lw) * __builtin_shuffle(lo, hi, __builtin_convertvector(i32, Index));
    }
    // Lanes past the chunk hold zeros; the next chunk overwrites them (chunks ascend).
    const int64_t d = m.chunk_dst[c];
    if (d + simd::kWidth <= m.dst_len) {
      store_as<dst_t, opmath_t>(dst + d, acc);
    } else {
      for (int64_t l = 0; l < m.dst_len - d; ++l) dst[d + l] = static_cast<dst_t>(acc[l]);
    }
  }
}

// Everything a kernel needs about the (at most kMaxInputs) inputs, in the output's layout.
template <typename scalar_t, typename opmath_t>
struct Plan {
  int n = 0;
  int64_t N = 0, C = 0, Ho = 0, Wo = 0;
  Mode mode = Mode::kBilinear;
  Activation act = Activation::kNone;
  const scalar_t* x[kMaxInputs] = {};
  scalar_t* gx[kMaxInputs] = {};
  int64_t H[kMaxInputs] = {}, W[kMaxInputs] = {};
  bool identity[kMaxInputs] = {};
  Axis<opmath_t> rows[kMaxInputs], cols[kMaxInputs];
  RowMap<opmath_t> hmap[kMaxInputs];  // NCHW: the W resampling (forward) or its transpose
};


// The NCHW forward builds each output row in a per-thread accumulator row of the math type (it
// stays in L1): the same-size inputs initialise it in one pass, each resampled input adds to it
// in a tight loop of its own, and a last pass activates and writes the output once. A single
// loop over a runtime list of inputs per vector spent its time on branches and the scalar tail
// of short rows (3x slower). Rows the kernel owns (accumulator, buffered source rows) are padded
// to whole vectors, so the read-modify-write passes need no tails; their padding lanes never
// reach the output.
HRNAS_INLINE int64_t whole_vectors(int64_t len) {
  return (len + simd::kWidth - 1) / simd::kWidth * simd::kWidth;
}

// acc[0:len] = sum of the same-size rows src[0..count) (zero when count is 0).
template <typename scalar_t, typename opmath_t>
HRNAS_INLINE void init_row(opmath_t* __restrict acc, const scalar_t* const* src, int count,
                           int64_t len) {
  sweep(
      len,
      [&](int64_t e) {
        simd::Vec<opmath_t> s = {};
        for (int k = 0; k < count; ++k) s += load_as<scalar_t, opmath_t>(src[k] + e);
        simd::store<opmath_t>(acc + e, s);
      },
      [&](int64_t e) {
        opmath_t s = opmath_t(0);
        for (int k = 0; k < count; ++k) s += static_cast<opmath_t>(src[k][e]);
        acc[e] = s;
      });
}

// acc[0:len] += a0 * s0 + a1 * s1 (a1 unused for nearest), len a multiple of kWidth.
template <typename opmath_t>
HRNAS_INLINE void add_blend(opmath_t* __restrict acc, const opmath_t* __restrict s0,
                            const opmath_t* __restrict s1, opmath_t a0, opmath_t a1,
                            bool bilinear, int64_t len) {
  if (bilinear) {
    for (int64_t e = 0; e < len; e += simd::kWidth) {
      simd::store<opmath_t>(acc + e, simd::load<opmath_t>(acc + e) +
                                         a0 * simd::load<opmath_t>(s0 + e) +
                                         a1 * simd::load<opmath_t>(s1 + e));
    }
  } else {
    for (int64_t e = 0; e < len; e += simd::kWidth) {
      simd::store<opmath_t>(acc + e, simd::load<opmath_t>(acc + e) + simd::load<opmath_t>(s0 + e));
    }
  }
}

// out[0:len] = act(acc[0:len]).
template <typename scalar_t, typename opmath_t>
HRNAS_INLINE void finish_row(scalar_t* __restrict out, const opmath_t* __restrict acc,
                             Activation act, int64_t len) {
  sweep(
      len,
      [&](int64_t e) {
        store_as<scalar_t, opmath_t>(out + e, simd::activate<opmath_t>(simd::load<opmath_t>(acc + e), act));
      },
      [&](int64_t e) { out[e] = static_cast<scalar_t>(activate(acc[e], act)); });
}

// The NCHW forward, one plane at a time: each resampled input's rows are first resampled along
// W into a per-thread buffer (one row map per source row); each output row is then the
// same-size rows plus two blended buffer rows per resampled input.
template <typename scalar_t, typename opmath_t>
void fwd_nchw_planes(const Plan<scalar_t, opmath_t>& p, scalar_t* out, int64_t begin, int64_t end) {
  const int64_t Ho = p.Ho, Wo = p.Wo, Wp = whole_vectors(Wo);
  const bool bilinear = p.mode == Mode::kBilinear;
  int64_t at[kMaxInputs] = {}, size = Wp;  // the accumulator row, then each input's rows
  for (int j = 0; j < p.n; ++j) {
    at[j] = size;
    if (!p.identity[j]) size += p.H[j] * Wp;
  }
  opmath_t* buf = scratch<opmath_t>(0, size);
  std::fill(buf, buf + size, opmath_t(0));  // padding lanes stay finite
  opmath_t* acc = buf;
  const scalar_t* same[kMaxInputs];
  for (int64_t plane = begin; plane < end; ++plane) {
    for (int j = 0; j < p.n; ++j) {
      if (p.identity[j]) continue;
      const int64_t Hj = p.H[j], Wj = p.W[j];
      const scalar_t* x = p.x[j] + plane * Hj * Wj;
      for (int64_t r = 0; r < Hj; ++r) apply_row_map(p.hmap[j], x + r * Wj, buf + at[j] + r * Wp);
    }
    for (int64_t h = 0; h < Ho; ++h) {
      int n_same = 0;
      for (int j = 0; j < p.n; ++j) {
        if (p.identity[j]) same[n_same++] = p.x[j] + (plane * Ho + h) * Wo;
      }
      init_row(acc, same, n_same, Wo);
      for (int j = 0; j < p.n; ++j) {
        if (p.identity[j]) continue;
        const Axis<opmath_t>& r = p.rows[j];
        add_blend(acc, buf + at[j] + r.i0[h] * Wp, buf + at[j] + r.i1[h] * Wp, r.l0[h], r.l1[h],
                  bilinear, Wp);
      }
      finish_row(out + (plane * Ho + h) * Wo, acc, p.act, Wo);
    }
  }
}

// dst[w * C + c] = l0[w] * src[i0[w] * C + c] + l1[w] * src[i1[w] * C + c] for w < Wo, c < C
// (nearest: the first term alone): one source row of an NHWC input resampled along W to the
// output's width.
template <typename scalar_t, typename opmath_t>
void widen_pixels(const scalar_t* __restrict src, const Axis<opmath_t>& cols, int64_t Wo,
                  int64_t C, bool bilinear, opmath_t* __restrict dst) {
  for (int64_t w = 0; w < Wo; ++w) {
    const scalar_t* s0 = src + cols.i0[w] * C;
    const scalar_t* s1 = src + cols.i1[w] * C;
    const opmath_t a0 = cols.l0[w], a1 = cols.l1[w];
    opmath_t* d = dst + w * C;
    if (bilinear) {
      sweep(
          C,
          [&](int64_t c) {
            simd::store<opmath_t>(d + c, a0 * load_as<scalar_t, opmath_t>(s0 + c) +
                                             a1 * load_as<scalar_t, opmath_t>(s1 + c));
          },
          [&](int64_t c) {
            d[c] = a0 * static_cast<opmath_t>(s0[c]) + a1 * static_cast<opmath_t>(s1[c]);
          });
    } else {
      sweep(
          C, [&](int64_t c) { simd::store<opmath_t>(d + c, load_as<scalar_t, opmath_t>(s0 + c)); },
          [&](int64_t c) { d[c] = static_cast<opmath_t>(s0[c]); });
    }
  }
}

// out[e] = act(same[e] + sum_j (a0[j] * s0[j][e] + a1[j] * s1[j][e])) for e < len in one pass
// (kSame: 0 or 1 same-size row; nearest: the s0 terms alone), with the counts known at compile
// time so every weight is broadcast once per row and every stream is a register load.
template <int kSame, int kRes, bool kBilinear, typename scalar_t, typename opmath_t>
void sum_row(scalar_t* __restrict out, const scalar_t* same, const opmath_t* const* s0,
             const opmath_t* const* s1, const opmath_t* a0, const opmath_t* a1, Activation act,
             int64_t len) {
  using V = simd::Vec<opmath_t>;
  V w0[kRes], w1[kRes];
  for (int j = 0; j < kRes; ++j) {
    w0[j] = simd::splat(a0[j]);
    w1[j] = simd::splat(a1[j]);
  }
  sweep(
      len,
      [&](int64_t e) {
        V s = {};
        if constexpr (kSame == 1) s = load_as<scalar_t, opmath_t>(same + e);
        for (int j = 0; j < kRes; ++j) {
          s += w0[j] * simd::load<opmath_t>(s0[j] + e);
          if constexpr (kBilinear) s += w1[j] * simd::load<opmath_t>(s1[j] + e);
        }
        store_as<scalar_t, opmath_t>(out + e, simd::activate<opmath_t>(s, act));
      },
      [&](int64_t e) {
        opmath_t s = kSame == 1 ? static_cast<opmath_t>(same[e]) : opmath_t(0);
        for (int j = 0; j < kRes; ++j) {
          s += a0[j] * s0[j][e];
          if constexpr (kBilinear) s += a1[j] * s1[j][e];
        }
        out[e] = static_cast<scalar_t>(activate(s, act));
      });
}

// The NHWC forward, one output row (Wo * C contiguous values) at a time. Each source row of a
// resampled input is first resampled along W to the output's width into one of two per-thread
// slots per input, when first needed: a task's output rows read ascending source rows, so each
// source row is resampled once per task (2x upsampling reads each about 4 times). An output row
// is then its same-size row plus two weighted slot rows per resampled input, activated and
// written in one pass (sum_row) for up to one same-size and three resampled inputs (HRNet's
// four branches); other mixes sum in an L1 accumulator row as the NCHW forward does.
template <typename scalar_t, typename opmath_t>
void fwd_nhwc_rows(const Plan<scalar_t, opmath_t>& p, scalar_t* out, int64_t begin, int64_t end) {
  const int64_t C = p.C, Ho = p.Ho, R = p.Wo * C, Rp = whole_vectors(R);
  const bool bilinear = p.mode == Mode::kBilinear;
  opmath_t* buf = scratch<opmath_t>(0, (1 + 2 * p.n) * Rp);
  std::fill(buf, buf + (1 + 2 * p.n) * Rp, opmath_t(0));  // padding lanes stay finite
  opmath_t* acc = buf;
  int64_t held[kMaxInputs][2];  // the source row (image * H + row) in each slot, -1: none
  for (int j = 0; j < p.n; ++j) held[j][0] = held[j][1] = -1;
  // Input j's source row r of image n resampled along W, in a slot; `keep` is not replaced.
  const auto widened = [&](int j, int64_t n, int64_t r, const opmath_t* keep) {
    const int64_t row = n * p.H[j] + r;
    opmath_t* slot[2] = {buf + (1 + 2 * j) * Rp, buf + (2 + 2 * j) * Rp};
    for (int s = 0; s < 2; ++s) {
      if (held[j][s] == row) return static_cast<const opmath_t*>(slot[s]);
    }
    const int s = keep == slot[0] ? 1 : keep == slot[1] ? 0 : held[j][0] < held[j][1] ? 0 : 1;
    held[j][s] = row;
    widen_pixels(p.x[j] + row * p.W[j] * C, p.cols[j], p.Wo, C, bilinear, slot[s]);
    return static_cast<const opmath_t*>(slot[s]);
  };
  const scalar_t* same[kMaxInputs] = {};
  const opmath_t* s0[kMaxInputs];
  const opmath_t* s1[kMaxInputs];
  opmath_t a0[kMaxInputs], a1[kMaxInputs];
  for (int64_t nh = begin; nh < end; ++nh) {
    const int64_t n = nh / Ho, h = nh % Ho;
    int ns = 0, nr = 0;
    for (int j = 0; j < p.n; ++j) {
      if (p.identity[j]) {
        same[ns++] = p.x[j] + nh * R;
        continue;
      }
      const Axis<opmath_t>& r = p.rows[j];
      s0[nr] = widened(j, n, r.i0[h], nullptr);
      s1[nr] = bilinear ? widened(j, n, r.i1[h], s0[nr]) : s0[nr];
      a0[nr] = r.l0[h];
      a1[nr++] = r.l1[h];
    }
    scalar_t* o = out + nh * R;
    if (ns <= 1 && nr >= 1 && nr <= 3) {
      const auto run = [&](auto same_count, auto res_count, auto bil) {
        sum_row<decltype(same_count)::value, decltype(res_count)::value, decltype(bil)::value>(
            o, same[0], s0, s1, a0, a1, p.act, R);
      };
      const auto by_res = [&](auto same_count, auto bil) {
        if (nr == 1) return run(same_count, std::integral_constant<int, 1>{}, bil);
        if (nr == 2) return run(same_count, std::integral_constant<int, 2>{}, bil);
        run(same_count, std::integral_constant<int, 3>{}, bil);
      };
      const auto by_same = [&](auto bil) {
        if (ns == 1) return by_res(std::integral_constant<int, 1>{}, bil);
        by_res(std::integral_constant<int, 0>{}, bil);
      };
      if (bilinear) {
        by_same(std::true_type{});
      } else {
        by_same(std::false_type{});
      }
      continue;
    }
    init_row(acc, same, ns, R);
    for (int k = 0; k < nr; ++k) add_blend(acc, s0[k], s1[k], a0[k], a1[k], bilinear, Rp);
    finish_row(o, acc, p.act, R);
  }
}

// ---------------------------------------------------------------------------------------------
// Backward
//
// A unit is an NCHW plane (rows of Wo elements) or an NHWC image (rows of Wo * C elements). The
// unit's gm = grad_out * act'(out) is formed once, in the gradient of a same-size input when
// there is one (that gradient IS gm) or in a per-thread buffer. Each resampled input's gradient
// is then gathered row by row: a vertical pass sums the gm rows that read source row i with their
// weights (ascending output row), and a horizontal pass gathers that row along W with the
// transposed taps (a row map for NCHW, per-pixel channel vectors for NHWC). Every unit belongs to
// one thread and every sum has a fixed order: no atomics, results independent of the thread
// count.
template <typename scalar_t, typename opmath_t>
void bwd_units(const Plan<scalar_t, opmath_t>& p, const scalar_t* g, const scalar_t* out, int64_t L,
               int64_t begin, int64_t end) {
  const int64_t R = p.Wo * L, U = p.Ho * R;
  int holder = -1;  // the same-size input whose gradient holds gm
  if constexpr (std::is_same_v<scalar_t, opmath_t>) {
    for (int j = 0; j < p.n && holder < 0; ++j) {
      if (p.identity[j]) holder = j;
    }
  }
  opmath_t* buf = scratch<opmath_t>(0, (holder < 0 ? U : 0) + R);
  opmath_t* v = buf + (holder < 0 ? U : 0);  // one vertically gathered row
  for (int64_t u = begin; u < end; ++u) {
    opmath_t* gm = buf;
    if constexpr (std::is_same_v<scalar_t, opmath_t>) {
      if (holder >= 0) gm = p.gx[holder] + u * U;
    }
    const scalar_t* gu = g + u * U;
    const scalar_t* ou = out + u * U;
    sweep(
        U,
        [&](int64_t e) {
          simd::store<opmath_t>(gm + e, simd::grad_through<opmath_t>(
                                            load_as<scalar_t, opmath_t>(gu + e),
                                            load_as<scalar_t, opmath_t>(ou + e), p.act));
        },
        [&](int64_t e) {
          gm[e] = passes_grad(static_cast<opmath_t>(ou[e]), p.act) ? static_cast<opmath_t>(gu[e])
                                                                   : opmath_t(0);
        });
    for (int j = 0; j < p.n; ++j) {
      if (!p.identity[j] || j == holder) continue;
      scalar_t* gx = p.gx[j] + u * U;
      sweep(
          U, [&](int64_t e) { store_as<scalar_t, opmath_t>(gx + e, simd::load<opmath_t>(gm + e)); },
          [&](int64_t e) { gx[e] = static_cast<scalar_t>(gm[e]); });
    }
    for (int j = 0; j < p.n; ++j) {
      if (p.identity[j]) continue;
      const int64_t Hj = p.H[j], Wj = p.W[j];
      const Axis<opmath_t>& rt = p.rows[j];
      const Axis<opmath_t>& ct = p.cols[j];
      scalar_t* gx = p.gx[j] + u * Hj * Wj * L;
      for (int64_t i = 0; i < Hj; ++i) {
        gather_taps(v, gm, R, rt.w.data(), rt.o.data(), rt.begin[i], rt.begin[i + 1], R);
        scalar_t* dst = gx + i * Wj * L;
        if (L == 1) {
          apply_row_map(p.hmap[j], v, dst);
          continue;
        }
        for (int64_t q = 0; q < Wj; ++q) {
          gather_taps(dst + q * L, v, L, ct.w.data(), ct.o.data(), ct.begin[q], ct.begin[q + 1], L);
        }
      }
    }
  }
}

// Rough number of work items per parallel chunk so a chunk costs tens of microseconds.
int64_t grain(int64_t item_cost) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(1, item_cost)); }

at::Tensor fwd_cpu(at::TensorList inputs, c10::SymIntArrayRef sym_size, std::string_view mode_s,
                   std::string_view act_s) {
  const c10::IntArrayRef size = C10_AS_INTARRAYREF_SLOW(sym_size);
  const Mode mode = parse_mode(mode_s);
  const Activation act = parse_activation(kOp, act_s);
  check_forward(inputs, size);
  const int n = static_cast<int>(inputs.size());
  const at::Tensor& x0 = inputs[0];
  TORCH_CHECK(x0.device().is_cpu(), kOp, ": the CPU kernel got a tensor on ", x0.device());
  const at::MemoryFormat fmt = output_memory_format(x0);
  at::Tensor out = pooled_empty({x0.size(0), x0.size(1), size[0], size[1]}, x0.options(), fmt);
  if (out.numel() == 0) return out;
  std::vector<at::Tensor> xs;
  xs.reserve(n);
  for (int j = 0; j < n; ++j) xs.push_back(inputs[j].contiguous(fmt));

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x0.scalar_type(), "multires_fusion_fwd", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    Plan<scalar_t, opmath_t> p;
    p.n = n;
    p.N = x0.size(0);
    p.C = x0.size(1);
    p.Ho = size[0];
    p.Wo = size[1];
    p.mode = mode;
    p.act = act;
    for (int j = 0; j < n; ++j) {
      p.x[j] = xs[j].const_data_ptr<scalar_t>();
      p.H[j] = xs[j].size(2);
      p.W[j] = xs[j].size(3);
      p.identity[j] = p.H[j] == p.Ho && p.W[j] == p.Wo;
      if (!p.identity[j]) {
        p.rows[j] = make_axis<opmath_t>(p.H[j], p.Ho, mode, false);
        p.cols[j] = make_axis<opmath_t>(p.W[j], p.Wo, mode, false);
      }
    }
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    if (fmt == at::MemoryFormat::ChannelsLast) {
      at::parallel_for(0, p.N * p.Ho, grain(n * p.Wo * p.C), [&](int64_t b, int64_t e) {
        fwd_nhwc_rows(p, o, b, e);
      });
    } else {
      for (int j = 0; j < n; ++j) {
        if (!p.identity[j]) p.hmap[j] = forward_row_map(p.cols[j], p.W[j], mode);
      }
      at::parallel_for(0, p.N * p.C, grain(n * p.Ho * p.Wo), [&](int64_t b, int64_t e) {
        fwd_nchw_planes(p, o, b, e);
      });
    }
  });
  return out;
}

std::vector<at::Tensor> bwd_cpu(const at::Tensor& grad_out, const at::Tensor& out,
                                c10::SymIntArrayRef sym_input_sizes, std::string_view mode_s,
                                std::string_view act_s) {
  const c10::IntArrayRef input_sizes = C10_AS_INTARRAYREF_SLOW(sym_input_sizes);
  const Mode mode = parse_mode(mode_s);
  const Activation act = parse_activation(kOp, act_s);
  const int n = check_backward(grad_out, out, input_sizes);
  TORCH_CHECK(out.device().is_cpu(), kOp, ": the CPU kernel got a tensor on ", out.device());
  const at::MemoryFormat fmt = output_memory_format(out);
  const int64_t N = out.size(0), C = out.size(1), Ho = out.size(2), Wo = out.size(3);

  auto grads = allocate_input_grads(out, input_sizes, fmt, pooled_empty).first;
  if (out.numel() == 0) return grads;
  const at::Tensor g = grad_out.contiguous(fmt);
  const at::Tensor o = out.contiguous(fmt);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "multires_fusion_bwd", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    Plan<scalar_t, opmath_t> p;
    p.n = n;
    p.N = N;
    p.C = C;
    p.Ho = Ho;
    p.Wo = Wo;
    p.mode = mode;
    p.act = act;
    for (int j = 0; j < n; ++j) {
      p.H[j] = input_sizes[2 * j];
      p.W[j] = input_sizes[2 * j + 1];
      p.gx[j] = grads[j].mutable_data_ptr<scalar_t>();
      p.identity[j] = p.H[j] == Ho && p.W[j] == Wo;
      if (!p.identity[j]) {
        p.rows[j] = make_axis<opmath_t>(p.H[j], Ho, mode, true);
        p.cols[j] = make_axis<opmath_t>(p.W[j], Wo, mode, true);
      }
    }
    const bool channels_last = fmt == at::MemoryFormat::ChannelsLast;
    for (int j = 0; j < n && !channels_last; ++j) {
      if (!p.identity[j]) p.hmap[j] = transposed_row_map(p.cols[j], Wo);
    }
    const int64_t units = channels_last ? N : N * C, L = channels_last ? C : 1;
    at::parallel_for(0, units, grain(n * Ho * Wo * L), [&](int64_t b, int64_t e) {
      bwd_units(p, g.const_data_ptr<scalar_t>(), o.const_data_ptr<scalar_t>(), L, b, e);
    });
  });
  return grads;
}

}  // namespace
HRNAS_CPU_ISA_END

TORCH_LIBRARY_IMPL(hrnas_kernels, CPU, m) {
  if (!HRNAS_CPU_ISA_SELECTED()) return;
  m.impl("multires_fusion_fwd", &fwd_cpu);
  m.impl("multires_fusion_bwd", &bwd_cpu);
}

}  // namespace multires_fusion
}  // namespace hrnas
#endif  // HRNAS_CPU_ISA_ENABLED
