// Multi-resolution fusion on CPU: out = act(sum_j resize(x_j, (H, W))) writing each output once,
// and an atomic-free, deterministic backward.
//
// Forward, both layouts sum every input for a vector of outputs in registers, then activate and
// store:
//   NCHW (one plane at a time): rows of each resampled x_j are first resampled along W into a
//        per-thread buffer (one gather per source row); every output row then blends two buffered
//        rows per input.
//   NHWC (one output row at a time): each output pixel blends the four source pixels of each
//        input, 16 channels per vector, with row pointers set once per row and column offsets
//        from per-call tables.
// Backward, per plane (NCHW) or image (NHWC): one pass over the output rows forms
// gm = grad_out * act'(out), writes it to same-size inputs' gradients and adds it into per-input
// rows of vertical sums (ascending output row); each input gradient is then gathered along W with
// transposed tap lists. Every plane/image belongs to one thread: fixed summation order.
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
#include "common/scratch.h"
#include "common/simd.h"
#include "multires_fusion/multires_fusion_args.h"

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
};

// Vector loads/stores of scalar_t data in the math type (converting for fp16/bf16).
template <typename scalar_t, typename opmath_t>
inline simd::Vec<opmath_t> load_as(const scalar_t* p) {
  if constexpr (std::is_same_v<scalar_t, opmath_t>) {
    return simd::load<opmath_t>(p);
  } else {
    simd::Vec<opmath_t> v;
    for (int64_t l = 0; l < simd::kWidth; ++l) v[l] = static_cast<opmath_t>(p[l]);
    return v;
  }
}

template <typename scalar_t, typename opmath_t>
inline void store_as(scalar_t* p, simd::Vec<opmath_t> v) {
  if constexpr (std::is_same_v<scalar_t, opmath_t>) {
    simd::store<opmath_t>(p, v);
  } else {
    for (int64_t l = 0; l < simd::kWidth; ++l) p[l] = static_cast<scalar_t>(v[l]);
  }
}

// The NCHW forward, one plane at a time. Each resampled input is first resampled along W into a
// per-thread buffer of its rows (a gather, done once per source row); then every output row is
// one vector pass that blends two buffered rows per input (or reads the row of a same-size input),
// sums over inputs in registers, applies the activation and writes the output once.
template <typename scalar_t, typename opmath_t>
HRNAS_TARGET_CLONES void fwd_nchw_planes(const Plan<scalar_t, opmath_t>& p, scalar_t* out,
                                         int64_t begin, int64_t end) {
  using V = simd::Vec<opmath_t>;
  const int64_t Ho = p.Ho, Wo = p.Wo;
  const bool bilinear = p.mode == Mode::kBilinear;
  int64_t at[kMaxInputs] = {}, size = 0;  // where input j's resampled rows sit in the buffer
  for (int j = 0; j < p.n; ++j) {
    at[j] = size;
    if (!p.identity[j]) size += p.H[j] * Wo;
  }
  opmath_t* rows = scratch<opmath_t>(0, size);
  const opmath_t* r0[kMaxInputs];
  const opmath_t* r1[kMaxInputs];
  const scalar_t* xr[kMaxInputs];
  opmath_t a0[kMaxInputs], a1[kMaxInputs];
  for (int64_t plane = begin; plane < end; ++plane) {
    for (int j = 0; j < p.n; ++j) {
      if (p.identity[j]) continue;
      const int64_t Hj = p.H[j], Wj = p.W[j];
      const scalar_t* x = p.x[j] + plane * Hj * Wj;
      const Axis<opmath_t>& c = p.cols[j];
      for (int64_t r = 0; r < Hj; ++r) {
        const scalar_t* xrow = x + r * Wj;
        opmath_t* t = rows + at[j] + r * Wo;
        if (bilinear) {
          for (int64_t w = 0; w < Wo; ++w) {
            t[w] = c.l0[w] * static_cast<opmath_t>(xrow[c.i0[w]]) +
                   c.l1[w] * static_cast<opmath_t>(xrow[c.i1[w]]);
          }
        } else {
          for (int64_t w = 0; w < Wo; ++w) t[w] = static_cast<opmath_t>(xrow[c.i0[w]]);
        }
      }
    }
    scalar_t* o = out + plane * Ho * Wo;
    for (int64_t h = 0; h < Ho; ++h) {
      for (int j = 0; j < p.n; ++j) {
        if (p.identity[j]) {
          xr[j] = p.x[j] + (plane * Ho + h) * Wo;
          continue;
        }
        const Axis<opmath_t>& r = p.rows[j];
        r0[j] = rows + at[j] + r.i0[h] * Wo;
        r1[j] = rows + at[j] + r.i1[h] * Wo;
        a0[j] = r.l0[h];
        a1[j] = bilinear ? r.l1[h] : opmath_t(0);
      }
      scalar_t* orow = o + h * Wo;
      int64_t w = 0;
      for (; w + simd::kWidth <= Wo; w += simd::kWidth) {
        V s = {};
        for (int j = 0; j < p.n; ++j) {
          if (p.identity[j]) {
            s += load_as<scalar_t, opmath_t>(xr[j] + w);
          } else if (bilinear) {
            s += a0[j] * simd::load<opmath_t>(r0[j] + w) + a1[j] * simd::load<opmath_t>(r1[j] + w);
          } else {
            s += simd::load<opmath_t>(r0[j] + w);
          }
        }
        store_as<scalar_t, opmath_t>(orow + w, simd::activate<opmath_t>(s, p.act));
      }
      for (; w < Wo; ++w) {
        opmath_t s = opmath_t(0);
        for (int j = 0; j < p.n; ++j) {
          if (p.identity[j]) {
            s += static_cast<opmath_t>(xr[j][w]);
          } else if (bilinear) {
            s += a0[j] * r0[j][w] + a1[j] * r1[j][w];
          } else {
            s += r0[j][w];
          }
        }
        orow[w] = static_cast<scalar_t>(activate(s, p.act));
      }
    }
  }
}

// The NHWC forward, one output row at a time. Everything that depends only on the row (source row
// pointers, vertical weights) is set up once per row; per output pixel each input costs two column
// offsets and two horizontal weights, read from tables built once per call. The sum over inputs
// for a block of kChannelBlock channels stays in one vector register, so each output element is
// written once and never re-read.
constexpr int64_t kChannelBlock = simd::kWidth;

enum class TapKind { kCopy, kNearest, kBilinear };

// Per input, per output column: element offsets of the two source pixels within a source row,
// and their weights (built once per call for the NHWC forward).
template <typename opmath_t>
struct ColumnTaps {
  std::vector<int64_t> o0, o1;
  std::vector<opmath_t> b0, b1;
};

template <typename scalar_t, typename opmath_t>
struct RowTaps {
  TapKind kind[kMaxInputs];
  const scalar_t* r0[kMaxInputs];  // source rows (r1 only for bilinear)
  const scalar_t* r1[kMaxInputs];
  opmath_t a0[kMaxInputs], a1[kMaxInputs];
  const int64_t* o0[kMaxInputs];
  const int64_t* o1[kMaxInputs];
  const opmath_t* b0[kMaxInputs];
  const opmath_t* b1[kMaxInputs];
};

// act(sum_j input_j at output column w) over channels [c, c + len): the vector path for a full
// block, the scalar path (kVector = false) for a tail of len < kChannelBlock channels.
template <bool kVector, typename scalar_t, typename opmath_t>
inline void fuse_pixel(const RowTaps<scalar_t, opmath_t>& t, int n, int64_t w, int64_t c,
                       int64_t len, scalar_t* __restrict out, Activation act) {
  if constexpr (kVector) {
    simd::Vec<opmath_t> s = {};
    for (int j = 0; j < n; ++j) {
      const int64_t o0 = t.o0[j][w] + c;
      if (t.kind[j] != TapKind::kBilinear) {
        s += load_as<scalar_t, opmath_t>(t.r0[j] + o0);
        continue;
      }
      const int64_t o1 = t.o1[j][w] + c;
      const opmath_t b0 = t.b0[j][w], b1 = t.b1[j][w];
      s += t.a0[j] * (b0 * load_as<scalar_t, opmath_t>(t.r0[j] + o0) +
                      b1 * load_as<scalar_t, opmath_t>(t.r0[j] + o1)) +
           t.a1[j] * (b0 * load_as<scalar_t, opmath_t>(t.r1[j] + o0) +
                      b1 * load_as<scalar_t, opmath_t>(t.r1[j] + o1));
    }
    store_as<scalar_t, opmath_t>(out + c, simd::activate<opmath_t>(s, act));
  } else {
    for (int64_t k = c; k < c + len; ++k) {
      opmath_t s = opmath_t(0);
      for (int j = 0; j < n; ++j) {
        const int64_t o0 = t.o0[j][w] + k;
        if (t.kind[j] != TapKind::kBilinear) {
          s += static_cast<opmath_t>(t.r0[j][o0]);
          continue;
        }
        const int64_t o1 = t.o1[j][w] + k;
        const opmath_t b0 = t.b0[j][w], b1 = t.b1[j][w];
        s += t.a0[j] * (b0 * static_cast<opmath_t>(t.r0[j][o0]) +
                        b1 * static_cast<opmath_t>(t.r0[j][o1])) +
             t.a1[j] * (b0 * static_cast<opmath_t>(t.r1[j][o0]) +
                        b1 * static_cast<opmath_t>(t.r1[j][o1]));
      }
      out[k] = static_cast<scalar_t>(activate(s, act));
    }
  }
}

template <typename scalar_t, typename opmath_t>
HRNAS_TARGET_CLONES void fwd_nhwc_rows(const Plan<scalar_t, opmath_t>& p,
                                       const ColumnTaps<opmath_t>* cols, scalar_t* out,
                                       int64_t begin, int64_t end) {
  const int64_t C = p.C, Ho = p.Ho, Wo = p.Wo;
  RowTaps<scalar_t, opmath_t> t;
  for (int j = 0; j < p.n; ++j) {
    t.kind[j] = p.identity[j] ? TapKind::kCopy
                              : (p.mode == Mode::kBilinear ? TapKind::kBilinear : TapKind::kNearest);
    t.o0[j] = cols[j].o0.data();
    t.o1[j] = cols[j].o1.data();
    t.b0[j] = cols[j].b0.data();
    t.b1[j] = cols[j].b1.data();
  }
  for (int64_t nh = begin; nh < end; ++nh) {
    const int64_t n = nh / Ho, h = nh % Ho;
    for (int j = 0; j < p.n; ++j) {
      const int64_t rowlen = p.W[j] * C;
      const scalar_t* x = p.x[j] + n * p.H[j] * rowlen;
      if (t.kind[j] == TapKind::kCopy) {
        t.r0[j] = x + h * rowlen;
        continue;
      }
      t.r0[j] = x + p.rows[j].i0[h] * rowlen;
      t.r1[j] = x + p.rows[j].i1[h] * rowlen;
      t.a0[j] = p.rows[j].l0[h];
      t.a1[j] = p.rows[j].l1[h];
    }
    scalar_t* o = out + nh * Wo * C;
    for (int64_t w = 0; w < Wo; ++w) {
      scalar_t* ow = o + w * C;
      int64_t c0 = 0;
      for (; c0 + kChannelBlock <= C; c0 += kChannelBlock) {
        fuse_pixel<true>(t, p.n, w, c0, kChannelBlock, ow, p.act);
      }
      if (c0 < C) fuse_pixel<false>(t, p.n, w, c0, C - c0, ow, p.act);
    }
  }
}

// Column tables of the NHWC forward: copies read column w, resampled inputs their taps.
template <typename scalar_t, typename opmath_t>
std::vector<ColumnTaps<opmath_t>> nhwc_columns(const Plan<scalar_t, opmath_t>& p) {
  std::vector<ColumnTaps<opmath_t>> cols(p.n);
  for (int j = 0; j < p.n; ++j) {
    ColumnTaps<opmath_t>& ct = cols[j];
    ct.o0.resize(p.Wo);
    ct.o1.resize(p.Wo);
    ct.b0.resize(p.Wo);
    ct.b1.resize(p.Wo);
    for (int64_t w = 0; w < p.Wo; ++w) {
      const bool copy = p.identity[j];
      ct.o0[w] = (copy ? w : p.cols[j].i0[w]) * p.C;
      ct.o1[w] = (copy ? w : p.cols[j].i1[w]) * p.C;
      ct.b0[w] = copy ? opmath_t(1) : p.cols[j].l0[w];
      ct.b1[w] = copy ? opmath_t(0) : p.cols[j].l1[w];
    }
  }
  return cols;
}

// ---------------------------------------------------------------------------------------------
// Backward
//
// A unit is an NCHW plane (rows of Wo elements) or an NHWC image (rows of Wo * C elements). One
// pass over the unit's output rows forms gm = grad_out * act'(out) row by row, writes it to the
// gradients of same-size inputs, and adds it into per-input rows of vertical sums
// V_j[i] = sum_h wv(h, i) * gm[h] (the only rows that reference input row i, in ascending h: the
// same order a gather over h would use). Then each input gradient is gathered along W from V_j.
// Every unit is owned by one thread: no atomics, results independent of the thread count.

// dst[0:len] += w * src[0:len]
template <typename opmath_t>
inline void axpy(opmath_t* __restrict dst, const opmath_t* __restrict src, opmath_t w,
                 int64_t len) {
  int64_t e = 0;
  for (; e + simd::kWidth <= len; e += simd::kWidth) {
    simd::store<opmath_t>(dst + e, simd::load<opmath_t>(dst + e) + w * simd::load<opmath_t>(src + e));
  }
  for (; e < len; ++e) dst[e] += w * src[e];
}

template <typename scalar_t, typename opmath_t>
HRNAS_TARGET_CLONES void bwd_units(const Plan<scalar_t, opmath_t>& p, const scalar_t* g,
                                   const scalar_t* out, int64_t L, int64_t begin, int64_t end) {
  const int64_t Ho = p.Ho, R = p.Wo * L;
  int64_t v_size = R;  // the gm row, then every resampled input's rows of vertical sums
  int64_t v_at[kMaxInputs] = {};
  for (int j = 0; j < p.n; ++j) {
    if (p.identity[j]) continue;
    v_at[j] = v_size;
    v_size += p.H[j] * R;
  }
  opmath_t* gm = scratch<opmath_t>(0, v_size);
  const bool bilinear = p.mode == Mode::kBilinear;
  for (int64_t u = begin; u < end; ++u) {
    std::fill(gm + R, gm + v_size, opmath_t(0));
    const scalar_t* gu = g + u * Ho * R;
    const scalar_t* ou = out + u * Ho * R;
    for (int64_t h = 0; h < Ho; ++h) {
      const scalar_t* gr = gu + h * R;
      const scalar_t* orow = ou + h * R;
      int64_t e = 0;
      for (; e + simd::kWidth <= R; e += simd::kWidth) {
        simd::store<opmath_t>(gm + e, simd::grad_through<opmath_t>(load_as<scalar_t, opmath_t>(gr + e),
                                                           load_as<scalar_t, opmath_t>(orow + e), p.act));
      }
      for (; e < R; ++e) {
        const opmath_t o = static_cast<opmath_t>(orow[e]);
        gm[e] = passes_grad(o, p.act) ? static_cast<opmath_t>(gr[e]) : opmath_t(0);
      }
      for (int j = 0; j < p.n; ++j) {
        if (p.identity[j]) {
          scalar_t* gx = p.gx[j] + (u * Ho + h) * R;
          for (int64_t k = 0; k < R; ++k) gx[k] = static_cast<scalar_t>(gm[k]);
          continue;
        }
        const Axis<opmath_t>& r = p.rows[j];
        axpy(gm + v_at[j] + r.i0[h] * R, gm, r.l0[h], R);
        if (bilinear) axpy(gm + v_at[j] + r.i1[h] * R, gm, r.l1[h], R);
      }
    }
    for (int j = 0; j < p.n; ++j) {
      if (p.identity[j]) continue;
      const int64_t Hj = p.H[j], Wj = p.W[j];
      const Axis<opmath_t>& c = p.cols[j];
      scalar_t* gx = p.gx[j] + u * Hj * Wj * L;
      for (int64_t i = 0; i < Hj; ++i) {
        const opmath_t* v = gm + v_at[j] + i * R;
        for (int64_t q = 0; q < Wj; ++q) {
          scalar_t* dst = gx + (i * Wj + q) * L;
          int64_t e = 0;
          for (; e + simd::kWidth <= L; e += simd::kWidth) {
            simd::Vec<opmath_t> acc = {};
            for (int64_t k = c.begin[q]; k < c.begin[q + 1]; ++k) {
              acc += c.w[k] * simd::load<opmath_t>(v + c.o[k] * L + e);
            }
            store_as<scalar_t, opmath_t>(dst + e, acc);
          }
          for (; e < L; ++e) {
            opmath_t acc = opmath_t(0);
            for (int64_t k = c.begin[q]; k < c.begin[q + 1]; ++k) acc += c.w[k] * v[c.o[k] * L + e];
            dst[e] = static_cast<scalar_t>(acc);
          }
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
  at::Tensor out = at::empty({x0.size(0), x0.size(1), size[0], size[1]},
                             x0.options().memory_format(fmt));
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
      const std::vector<ColumnTaps<opmath_t>> cols = nhwc_columns(p);
      at::parallel_for(0, p.N * p.Ho, grain(n * p.Wo * p.C), [&](int64_t b, int64_t e) {
        fwd_nhwc_rows(p, cols.data(), o, b, e);
      });
    } else {
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

  auto grads = allocate_input_grads(out, input_sizes, fmt).first;
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
        p.rows[j] = make_axis<opmath_t>(p.H[j], Ho, mode, false);
        p.cols[j] = make_axis<opmath_t>(p.W[j], Wo, mode, true);
      }
    }
    const bool channels_last = fmt == at::MemoryFormat::ChannelsLast;
    const int64_t units = channels_last ? N : N * C, L = channels_last ? C : 1;
    at::parallel_for(0, units, grain(n * Ho * Wo * L), [&](int64_t b, int64_t e) {
      bwd_units(p, g.const_data_ptr<scalar_t>(), o.const_data_ptr<scalar_t>(), L, b, e);
    });
  });
  return grads;
}

}  // namespace

TORCH_LIBRARY_IMPL(hrnas_kernels, CPU, m) {
  m.impl("multires_fusion_fwd", &fwd_cpu);
  m.impl("multires_fusion_bwd", &bwd_cpu);
}

}  // namespace multires_fusion
}  // namespace hrnas
