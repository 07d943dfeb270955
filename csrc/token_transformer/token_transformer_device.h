// The CTA programs of the CUDA kernels in token_transformer_cuda.cu, as __host__ __device__
// functions of plain pointers and indices, written once for two executors of a CTA:
//
//   Cta::each(count, body)  runs body(i) for i < count, spread over the CTA's threads on a GPU
//                           (thread t takes t, t + blockDim, ...), in order on the host;
//   Cta::sync()             __syncthreads() on a GPU; on the host, the end of a phase.
//
// Every program ends with a sync (a no-op for the GPU's last phase) so that the host check may
// hold a phase's bodies until the sync that closes it.
// Within one `each` the bodies are independent (each writes only its own outputs and reads
// nothing another body of the same phase writes), so running them one after another on the host
// computes what the threads compute in parallel, and the host check (tests/ops/
// test_token_transformer_cuda_host.py) runs these same programs CTA by CTA on CPU tensors.
//
// Every reduction is a loop inside one body in a fixed order (no atomics: deterministic). Values
// are accumulated in A (float for float/half/bfloat16, double for double); tensors of the tape
// and outputs are stored in T. The per-sample working values live in an A workspace in global
// memory (visible to the CTA's threads after each sync), laid out by FwdWork/BwdWork.
#pragma once

#include <cmath>
#include <cstdint>

#include "common/activation.h"  // HRNAS_HD
#include "token_transformer/token_transformer.h"

namespace hrnas {
namespace token_transformer {
namespace device {

constexpr int kThreads = 256;         // threads of every CTA
constexpr double kLayerNormEps = 1e-5;  // nn.LayerNorm's default, as the authors' layers

// ---- small bodies -------------------------------------------------------------------------------

// sum_k a[k * sa] * b[k * sb] in A.
template <typename A, typename X, typename Y>
HRNAS_HD A dot(const X* a, int64_t sa, const Y* b, int64_t sb, int64_t n) {
  A s = 0;
  for (int64_t k = 0; k < n; ++k) s += static_cast<A>(a[k * sa]) * static_cast<A>(b[k * sb]);
  return s;
}

// sum_k v[k * stride] in A.
template <typename A, typename X>
HRNAS_HD A sum(const X* v, int64_t stride, int64_t n) {
  A s = 0;
  for (int64_t k = 0; k < n; ++k) s += static_cast<A>(v[k * stride]);
  return s;
}

// F.interpolate's bilinear rule (align_corners=False) for output index i of a resize from `in`
// to `out`: src = max((i + 0.5) * in / out - 0.5, 0), taps floor(src) and min(floor + 1, in - 1).
template <typename A>
struct Tap {
  int64_t i0, i1;
  A w0, w1;
};

template <typename A>
HRNAS_HD Tap<A> tap(int64_t i, int64_t in, int64_t out) {
  A src = (static_cast<A>(i) + A(0.5)) * static_cast<A>(in) / static_cast<A>(out) - A(0.5);
  src = src < A(0) ? A(0) : src;
  int64_t i0 = static_cast<int64_t>(src);
  i0 = i0 < in - 1 ? i0 : in - 1;
  const A w1 = src - static_cast<A>(i0);
  return {i0, i0 + 1 < in ? i0 + 1 : in - 1, A(1) - w1, w1};
}

// The weight output index i of that resize gives source index s (both taps may name it).
template <typename A>
HRNAS_HD A tap_weight(const Tap<A>& t, int64_t s) {
  return (t.i0 == s ? t.w0 : A(0)) + (t.i1 == s ? t.w1 : A(0));
}

// Bilinear sample (i, j) of the resize of plane p [in_h, in_w] to [out_h, out_w].
template <typename A, typename X>
HRNAS_HD A resize_at(const X* p, int64_t in_h, int64_t in_w, int64_t out_h, int64_t out_w,
                     int64_t i, int64_t j) {
  const Tap<A> r = tap<A>(i, in_h, out_h), c = tap<A>(j, in_w, out_w);
  auto row = [&](int64_t y) {
    return c.w0 * static_cast<A>(p[y * in_w + c.i0]) + c.w1 * static_cast<A>(p[y * in_w + c.i1]);
  };
  return r.w0 * row(r.i0) + r.w1 * row(r.i1);
}

// Mean and sum of squared deviations (M2) of n values.
template <typename A>
struct Moments {
  A mean, m2;
};

template <typename A, typename X>
HRNAS_HD Moments<A> moments(const X* v, int64_t n) {
  const A mean = sum<A>(v, 1, n) / static_cast<A>(n);
  A m2 = 0;
  for (int64_t k = 0; k < n; ++k) {
    const A c = static_cast<A>(v[k]) - mean;
    m2 += c * c;
  }
  return {mean, m2};
}

// Batch mean and biased variance of channel r from per-sample moments part[n * stride + 2 r]
// over `count` values each, merged in sample order (Chan et al.'s pairwise update).
template <typename A>
HRNAS_HD Moments<A> merge_moments(const A* part, int64_t N, int64_t stride, int64_t r,
                                  int64_t count) {
  A mean = 0, m2 = 0, seen = 0;
  const A c = static_cast<A>(count);
  for (int64_t n = 0; n < N; ++n) {
    const A mb = part[n * stride + 2 * r], m2b = part[n * stride + 2 * r + 1];
    const A total = seen + c, delta = mb - mean;
    mean += delta * c / total;
    m2 += m2b + delta * delta * seen * c / total;
    seen = total;
  }
  return {mean, m2 / seen};
}

// out = LayerNorm(a + res) of one row of d values; x_hat and 1 / std to the tape.
template <typename T, typename A, typename X, typename Y>
HRNAS_HD void add_layer_norm_row(const X* a, const Y* res, const T* gamma, const T* beta,
                                 int64_t d, T* xhat, T* rstd_out, A* out) {
  A s = 0;
  for (int64_t j = 0; j < d; ++j) s += static_cast<A>(a[j]) + static_cast<A>(res[j]);
  const A mean = s / static_cast<A>(d);
  A ss = 0;
  for (int64_t j = 0; j < d; ++j) {
    const A c = static_cast<A>(a[j]) + static_cast<A>(res[j]) - mean;
    ss += c * c;
  }
  const A rstd = A(1) / std::sqrt(ss / static_cast<A>(d) + A(kLayerNormEps));
  *rstd_out = static_cast<T>(rstd);
  for (int64_t j = 0; j < d; ++j) {
    const A xh = (static_cast<A>(a[j]) + static_cast<A>(res[j]) - mean) * rstd;
    xhat[j] = static_cast<T>(xh);
    out[j] = xh * static_cast<A>(gamma[j]) + static_cast<A>(beta[j]);
  }
}

// d(LayerNorm input) of one row from d(output) g: rstd (g gamma - mean(g gamma)
// - x_hat mean(g gamma x_hat)).
template <typename T, typename A>
HRNAS_HD void layer_norm_backward_row(const A* g, const T* xhat, A rstd, const T* gamma,
                                      int64_t d, A* out) {
  A s = 0, sx = 0;
  for (int64_t j = 0; j < d; ++j) {
    const A gh = g[j] * static_cast<A>(gamma[j]);
    s += gh;
    sx += gh * static_cast<A>(xhat[j]);
  }
  s /= static_cast<A>(d);
  sx /= static_cast<A>(d);
  for (int64_t j = 0; j < d; ++j)
    out[j] = rstd * (g[j] * static_cast<A>(gamma[j]) - s - static_cast<A>(xhat[j]) * sx);
}

// ---- layouts ------------------------------------------------------------------------------------

// Offsets (values, already times N) of the forward's A workspace.
struct FwdWork {
  int64_t u;         // [N, L, d] the token projections, then BN_in's output t0
  int64_t in_part;   // [N, L, 2] per-sample moments of u
  int64_t in_stat;   // [N, L, 2] (mean, 1 / std) of BN_in, each CTA's own copy
  int64_t s;         // [N, L, L] one head's attention scores
  int64_t a, t1;     // [N, L, d] attention / feed-forward output, LN1's output
  int64_t m, o;      // [N, L, d] encoder output, decoder output
  int64_t z;         // [N, C_out, d] the output projection, then BN_out's output
  int64_t out_part;  // [N, C_out, 2] per-sample moments of z
  int64_t total;
};

inline FwdWork make_fwd_work(int64_t N, int64_t L, int64_t d, int64_t Co) {
  FwdWork w{};
  BlockLayout b{N};
  w.u = b.take(L * d);
  w.in_part = b.take(2 * L);
  w.in_stat = b.take(2 * L);
  w.s = b.take(L * L);
  w.a = b.take(L * d);
  w.t1 = b.take(L * d);
  w.m = b.take(L * d);
  w.o = b.take(L * d);
  w.z = b.take(Co * d);
  w.out_part = b.take(2 * Co);
  w.total = b.at;
  return w;
}

// Offsets of the backward's A workspace: per-plane and per-sample values, and the scratch of
// one layer's backward (per sample, reused by the decoder and the encoder).
struct BwdWork {
  int64_t cols;            // [N * C_out, Ho, g] grad_y resized along the width
  int64_t gz;              // [N, C_out, d] d(BN_out output), then d(z)
  int64_t o, m, t0;        // [N, L, d] decoder output, encoder output, BN_in output
  int64_t go, gm, gt0;     // [N, L, d] d(o), d(m), d(t0) (then d(u))
  int64_t r2, gh, t1, gt1, r1, gheads;  // [N, L, d] the layer scratch
  int64_t gqkv;            // [N, L, 3d]
  int64_t dp;              // [N, L, L]
  int64_t gf;              // [N, C, d] d(x resized to the grid)
  int64_t total;
};

inline BwdWork make_bwd_work(int64_t N, int64_t C, int64_t L, int64_t d, int64_t g, int64_t Co,
                             int64_t Ho) {
  BwdWork w{};
  BlockLayout b{N};
  w.cols = b.take(Co * Ho * g);
  w.gz = b.take(Co * d);
  for (int64_t* p : {&w.o, &w.m, &w.t0, &w.go, &w.gm, &w.gt0, &w.r2, &w.gh, &w.t1, &w.gt1,
                     &w.r1, &w.gheads})
    *p = b.take(L * d);
  w.gqkv = b.take(3 * L * d);
  w.dp = b.take(L * L);
  w.gf = b.take(C * d);
  w.total = b.at;
  return w;
}

// The weight gradients, in the bwd schema's order: each sample writes its partial into its row
// of a [N, P] A buffer, and the last kernel sums the rows in sample order.
enum Grad : int {
  kWIn = 0,
  kBnInW = 1,
  kBnInB = 2,
  kEnc = 3,  // 8 tensors, LAYER_WEIGHTS order
  kQuery = 11,
  kDec = 12,  // 8 tensors
  kWOut = 20,
  kBnOutW = 21,
  kBnOutB = 22,
  kGrads = 23
};

struct GradLayout {
  int64_t at[kGrads + 1];  // offsets within a sample's row; at[kGrads] = P
};

inline GradLayout make_grad_layout(int64_t C, int64_t L, int64_t d, int64_t Co, bool decoder) {
  const int64_t layer[8] = {3 * d * d, d * d, d * d, d * d, d, d, d, d};
  int64_t size[kGrads] = {};
  size[kWIn] = L * (C + 2);
  size[kBnInW] = size[kBnInB] = L;
  for (int i = 0; i < 8; ++i) {
    size[kEnc + i] = layer[i];
    size[kDec + i] = decoder ? layer[i] : 0;
  }
  size[kQuery] = decoder ? L * d : 0;
  size[kWOut] = Co * L;
  size[kBnOutW] = size[kBnOutB] = Co;
  GradLayout g{};
  for (int i = 0; i < kGrads; ++i) g.at[i + 1] = g.at[i] + size[i];
  return g;
}

// ---- arguments ----------------------------------------------------------------------------------

struct Dims {
  int64_t N, C, H, W, g, d, L, Co, Ho, Wo, heads;
  bool decoder, residual, batch_stats;
};

template <typename T, typename A>
struct FwdArgs {
  Dims s;  // s.L: the alive tokens
  A eps;
  // The per-token parameters are full size (`tokens` rows; columns of w_out): alive token l is
  // row row(l), token[l] with an index, l without one (token null, tokens == s.L). The forward
  // programs read them through it, so a masked forward needs no gather launches.
  const int64_t* token;
  int64_t tokens;
  HRNAS_HD int64_t row(int64_t l) const { return token != nullptr ? token[l] : l; }
  const T *x, *coords, *w_in, *bn_in_w, *bn_in_b, *rm_in, *rv_in;
  const T* enc[8];
  const T* query;
  const T* dec[8];
  const T *w_out, *bn_out_w, *bn_out_b, *rm_out, *rv_out;
  T *y, *tape;
  A *mean_in, *var_in, *mean_out, *var_out, *ws;
  TapeLayout tp;
  FwdWork w;
};

template <typename T, typename A>
struct BwdArgs {
  Dims s;
  A eps;
  const T *gy, *tape, *coords, *w_in, *bn_in_w, *bn_in_b;
  const A* var_in;
  const T* enc[8];
  const T* query;
  const T* dec[8];
  const T *w_out, *bn_out_w;
  const A* var_out;
  T* gx;
  T* grad[kGrads];  // the weight gradients' outputs
  A *ws, *part;     // part: [N, P] per-sample weight-gradient partials
  TapeLayout tp;
  BwdWork w;
  GradLayout ga;
};

// Sample n's slices of one layer's tape.
template <typename P>
struct LayerSlices {
  P *qkv, *o, *t1hat, *h, *t2hat, *p, *rstd1, *rstd2;
  int64_t p_head;  // head h's probabilities are at p + h * p_head
};

template <typename P>
HRNAS_HD LayerSlices<P> layer_slices(P* tape, const LayerTape& lt, int64_t n, int64_t N,
                                     int64_t L, int64_t d) {
  const int64_t ld = L * d;
  return {tape + lt.qkv + n * 3 * ld, tape + lt.o + n * ld,     tape + lt.t1hat + n * ld,
          tape + lt.h + n * ld,       tape + lt.t2hat + n * ld, tape + lt.p + n * L * L,
          tape + lt.rstd1 + n * L,    tape + lt.rstd2 + n * L,  N * L * L};
}

// ---- forward ------------------------------------------------------------------------------------

// CTA n: x resized to the grid (tape f), the token projections u = W_in [f; P], and their
// per-sample moments for BN_in.
struct FwdTokens {
  template <class Cta, typename T, typename A>
  HRNAS_HD static void run(const Cta& cta, int64_t n, const FwdArgs<T, A>& a) {
    const Dims& s = a.s;
    const int64_t d = s.d, C = s.C, K = C + 2;
    T* f = a.tape + a.tp.f + n * C * d;
    A* u = a.ws + a.w.u + n * s.L * d;
    cta.each(C * d, [&](int64_t i) {
      const int64_t c = i / d, j = i % d;
      f[i] = static_cast<T>(resize_at<A>(a.x + (n * C + c) * s.H * s.W, s.H, s.W, s.g, s.g,
                                         j / s.g, j % s.g));
    });
    cta.sync();
    cta.each(s.L * d, [&](int64_t i) {
      const int64_t l = i / d, j = i % d;
      const T* w = a.w_in + a.row(l) * K;
      u[i] = dot<A>(w, 1, f + j, d, C) + static_cast<A>(w[C]) * static_cast<A>(a.coords[j]) +
             static_cast<A>(w[C + 1]) * static_cast<A>(a.coords[d + j]);
    });
    cta.sync();
    cta.each(s.L, [&](int64_t l) {
      const Moments<A> m = moments<A>(u + l * d, d);
      a.ws[a.w.in_part + n * 2 * s.L + 2 * l] = m.mean;
      a.ws[a.w.in_part + n * 2 * s.L + 2 * l + 1] = m.m2;
    });
    cta.sync();
  }
};

// One post-norm layer of sample n: mem [L, d] -> out [L, d], the layer's tape filled; query:
// the decoder's learned queries, full size (alive query l is row a.row(l)), or null (the
// encoder, whose queries are mem).
template <class Cta, typename T, typename A>
HRNAS_HD void layer_forward(const Cta& cta, const FwdArgs<T, A>& a, const T* const* w,
                            const LayerTape& lt, int64_t n, const T* query, const A* mem,
                            A* out) {
  const Dims& s = a.s;
  const int64_t L = s.L, d = s.d, d3 = 3 * d, hd = d / s.heads;
  const LayerSlices<T> t = layer_slices(a.tape, lt, n, s.N, L, d);
  A* sc = a.ws + a.w.s + n * L * L;
  A* ao = a.ws + a.w.a + n * L * d;
  A* t1 = a.ws + a.w.t1 + n * L * d;
  cta.each(L * d3, [&](int64_t i) {
    const int64_t r = i / d3, c = i % d3;
    t.qkv[i] = static_cast<T>(query != nullptr && c < d
                                  ? dot<A>(query + a.row(r) * d, 1, w[0] + c * d, 1, d)
                                  : dot<A>(mem + r * d, 1, w[0] + c * d, 1, d));
  });
  cta.sync();
  const A scale = A(1) / std::sqrt(static_cast<A>(hd));
  for (int64_t h = 0; h < s.heads; ++h) {
    T* p = t.p + h * t.p_head;
    cta.each(L * L, [&](int64_t i) {
      const int64_t r = i / L, c = i % L;
      sc[i] = scale * dot<A>(t.qkv + r * d3 + h * hd, 1, t.qkv + c * d3 + d + h * hd, 1, hd);
    });
    cta.sync();
    cta.each(L, [&](int64_t r) {
      const A* row = sc + r * L;
      A mx = row[0];
      for (int64_t c = 1; c < L; ++c) mx = row[c] > mx ? row[c] : mx;
      A sum = 0;
      for (int64_t c = 0; c < L; ++c) sum += std::exp(row[c] - mx);
      for (int64_t c = 0; c < L; ++c) p[r * L + c] = static_cast<T>(std::exp(row[c] - mx) / sum);
    });
    cta.sync();
    cta.each(L * hd, [&](int64_t i) {
      const int64_t r = i / hd, c = i % hd;
      t.o[r * d + h * hd + c] =
          static_cast<T>(dot<A>(p + r * L, 1, t.qkv + 2 * d + h * hd + c, d3, L));
    });
    cta.sync();
  }
  cta.each(L * d, [&](int64_t i) {
    ao[i] = dot<A>(t.o + (i / d) * d, 1, w[1] + (i % d) * d, 1, d);
  });
  cta.sync();
  cta.each(L, [&](int64_t r) {
    add_layer_norm_row(ao + r * d, mem + r * d, w[4], w[5], d, t.t1hat + r * d, t.rstd1 + r,
                       t1 + r * d);
  });
  cta.sync();
  cta.each(L * d, [&](int64_t i) {
    const A v = dot<A>(t1 + (i / d) * d, 1, w[2] + (i % d) * d, 1, d);
    t.h[i] = static_cast<T>(v > A(0) ? v : A(0));
  });
  cta.sync();
  cta.each(L * d, [&](int64_t i) {
    ao[i] = dot<A>(t.h + (i / d) * d, 1, w[3] + (i % d) * d, 1, d);
  });
  cta.sync();
  cta.each(L, [&](int64_t r) {
    add_layer_norm_row(ao + r * d, t1 + r * d, w[6], w[7], d, t.t2hat + r * d, t.rstd2 + r,
                       out + r * d);
  });
  cta.sync();
}

// CTA n: BN_in (statistics merged from every sample's moments), the encoder and decoder layers,
// the output projection z = W_out o and its per-sample moments for BN_out.
struct FwdLayers {
  template <class Cta, typename T, typename A>
  HRNAS_HD static void run(const Cta& cta, int64_t n, const FwdArgs<T, A>& a) {
    const Dims& s = a.s;
    const int64_t L = s.L, d = s.d;
    A* u = a.ws + a.w.u + n * L * d;
    A* stat = a.ws + a.w.in_stat + n * 2 * L;
    cta.each(L, [&](int64_t l) {
      const Moments<A> m =
          s.batch_stats ? merge_moments(a.ws + a.w.in_part, s.N, 2 * L, l, d)
                        : Moments<A>{static_cast<A>(a.rm_in[a.row(l)]),
                                     static_cast<A>(a.rv_in[a.row(l)])};
      stat[2 * l] = m.mean;
      stat[2 * l + 1] = A(1) / std::sqrt(m.m2 + a.eps);
      if (n == 0) {
        a.mean_in[l] = m.mean;
        a.var_in[l] = m.m2;
      }
    });
    cta.sync();
    T* uhat = a.tape + a.tp.uhat + n * L * d;
    cta.each(L * d, [&](int64_t i) {
      const int64_t l = i / d;
      const A xh = (u[i] - stat[2 * l]) * stat[2 * l + 1];
      uhat[i] = static_cast<T>(xh);
      u[i] = xh * static_cast<A>(a.bn_in_w[a.row(l)]) + static_cast<A>(a.bn_in_b[a.row(l)]);
    });
    cta.sync();
    A* m = a.ws + a.w.m + n * L * d;
    layer_forward(cta, a, a.enc, a.tp.layer[0], n, static_cast<const T*>(nullptr), u, m);
    A* o = m;
    if (s.decoder) {
      o = a.ws + a.w.o + n * L * d;
      layer_forward(cta, a, a.dec, a.tp.layer[1], n, a.query, m, o);
    }
    A* z = a.ws + a.w.z + n * s.Co * d;
    cta.each(s.Co * d, [&](int64_t i) {
      const int64_t co = i / d, j = i % d;
      A acc = 0;  // dot() over the alive columns of row co
      for (int64_t l = 0; l < L; ++l)
        acc += static_cast<A>(a.w_out[co * a.tokens + a.row(l)]) * static_cast<A>(o[l * d + j]);
      z[i] = acc;
    });
    cta.sync();
    cta.each(s.Co, [&](int64_t co) {
      const Moments<A> mo = moments<A>(z + co * d, d);
      a.ws[a.w.out_part + n * 2 * s.Co + 2 * co] = mo.mean;
      a.ws[a.w.out_part + n * 2 * s.Co + 2 * co + 1] = mo.m2;
    });
    cta.sync();
  }
};

// CTA b = (n, co): BN_out of the plane (tape zhat), resized to the output, plus the residual.
struct FwdOutput {
  template <class Cta, typename T, typename A>
  HRNAS_HD static void run(const Cta& cta, int64_t b, const FwdArgs<T, A>& a) {
    const Dims& s = a.s;
    const int64_t d = s.d, co = b % s.Co, n = b / s.Co;
    A* z = a.ws + a.w.z + b * d;
    cta.each(d, [&](int64_t j) {
      const Moments<A> m =
          s.batch_stats ? merge_moments(a.ws + a.w.out_part, s.N, 2 * s.Co, co, d)
                        : Moments<A>{static_cast<A>(a.rm_out[co]), static_cast<A>(a.rv_out[co])};
      const A xh = (z[j] - m.mean) / std::sqrt(m.m2 + a.eps);
      a.tape[a.tp.zhat + b * d + j] = static_cast<T>(xh);
      z[j] = xh * static_cast<A>(a.bn_out_w[co]) + static_cast<A>(a.bn_out_b[co]);
      if (n == 0 && j == 0) {
        a.mean_out[co] = m.mean;
        a.var_out[co] = m.m2;
      }
    });
    cta.sync();
    const int64_t plane = s.Ho * s.Wo;
    cta.each(plane, [&](int64_t i) {
      A v = resize_at<A>(z, s.g, s.g, s.Ho, s.Wo, i / s.Wo, i % s.Wo);
      if (s.residual) v += static_cast<A>(a.x[b * plane + i]);
      a.y[b * plane + i] = static_cast<T>(v);
    });
    cta.sync();
  }
};

// ---- backward -----------------------------------------------------------------------------------

// CTA b = (n, co): d(BN_out output) = grad_y resized back to the grid (the adjoint of the
// bilinear growth, gathered: width then height), and the plane's partials of BN_out's weight
// and bias gradients.
struct BwdOutput {
  template <class Cta, typename T, typename A>
  HRNAS_HD static void run(const Cta& cta, int64_t b, const BwdArgs<T, A>& a) {
    const Dims& s = a.s;
    const int64_t g = s.g, d = s.d, co = b % s.Co, n = b / s.Co;
    const T* gy = a.gy + b * s.Ho * s.Wo;
    A* cols = a.ws + a.w.cols + b * s.Ho * g;
    A* gz = a.ws + a.w.gz + b * d;
    cta.each(s.Ho * g, [&](int64_t i) {
      const int64_t r = i / g, c = i % g;
      A v = 0;
      for (int64_t x = 0; x < s.Wo; ++x)
        v += tap_weight(tap<A>(x, g, s.Wo), c) * static_cast<A>(gy[r * s.Wo + x]);
      cols[i] = v;
    });
    cta.sync();
    cta.each(d, [&](int64_t j) {
      A v = 0;
      for (int64_t r = 0; r < s.Ho; ++r)
        v += tap_weight(tap<A>(r, g, s.Ho), j / g) * cols[r * g + j % g];
      gz[j] = v;
    });
    cta.sync();
    cta.each(1, [&](int64_t) {
      const T* zhat = a.tape + a.tp.zhat + b * d;
      A* part = a.part + n * a.ga.at[kGrads];
      part[a.ga.at[kBnOutB] + co] = sum<A>(gz, 1, d);
      part[a.ga.at[kBnOutW] + co] = dot<A>(gz, 1, zhat, 1, d);
    });
    cta.sync();
  }
};

// The gradients of a per-sample batch-norm input: scale (g - m sg - x_hat m sgx) with sg, sgx
// the batch sums (merged from the per-sample partials in sample order).
template <typename T, typename A>
HRNAS_HD A bn_input_grad(const BwdArgs<T, A>& a, int k_w, int k_b, int64_t r, A gamma, A var,
                         A g, A xhat, int64_t count) {
  const int64_t P = a.ga.at[kGrads];
  A sg = 0, sgx = 0;
  for (int64_t n = 0; n < a.s.N; ++n) {
    sg += a.part[n * P + a.ga.at[k_b] + r];
    sgx += a.part[n * P + a.ga.at[k_w] + r];
  }
  const A m = a.s.batch_stats ? A(1) / static_cast<A>(a.s.N * count) : A(0);
  return gamma / std::sqrt(var + a.eps) * (g - m * sg - xhat * m * sgx);
}

// The affine output of a LayerNorm from its tape: x_hat gamma + beta, row-major [L, d].
template <class Cta, typename T, typename A>
HRNAS_HD void norm_output(const Cta& cta, const T* xhat, const T* gamma, const T* beta, int64_t L,
                          int64_t d, A* out) {
  cta.each(L * d, [=](int64_t i) {  // by value: the caller syncs after this returns
    out[i] = static_cast<A>(xhat[i]) * static_cast<A>(gamma[i % d]) +
             static_cast<A>(beta[i % d]);
  });
}

// Backward of layer_forward for sample n: g_out [L, d] -> g_mem [L, d]; the sample's partials
// of the layer's weight gradients (and of the queries' when query is given) into part.
template <class Cta, typename T, typename A>
HRNAS_HD void layer_backward(const Cta& cta, const BwdArgs<T, A>& a, const T* const* w,
                             const LayerTape& lt, int64_t n, const T* query, const A* mem,
                             const A* g_out, A* part_w, A* part_query, A* g_mem) {
  const Dims& s = a.s;
  const int64_t L = s.L, d = s.d, d3 = 3 * d, hd = d / s.heads, ld = n * L * d;
  const LayerSlices<const T> t = layer_slices(a.tape, lt, n, s.N, L, d);
  A* r2 = a.ws + a.w.r2 + ld;
  A* gh = a.ws + a.w.gh + ld;
  A* t1 = a.ws + a.w.t1 + ld;
  A* gt1 = a.ws + a.w.gt1 + ld;
  A* r1 = a.ws + a.w.r1 + ld;
  A* gheads = a.ws + a.w.gheads + ld;
  A* gqkv = a.ws + a.w.gqkv + 3 * ld;
  A* dp = a.ws + a.w.dp + n * L * L;
  // the offsets of the 8 weights' partials within part_w (LAYER_WEIGHTS order)
  A* pw[8] = {part_w};
  const int64_t size[8] = {d3 * d, d * d, d * d, d * d, d, d, d, d};
  for (int i = 1; i < 8; ++i) pw[i] = pw[i - 1] + size[i - 1];
  cta.each(L, [&](int64_t r) {
    layer_norm_backward_row(g_out + r * d, t.t2hat + r * d, static_cast<A>(t.rstd2[r]), w[6], d,
                            r2 + r * d);
  });
  cta.each(d, [&](int64_t j) {
    pw[6][j] = dot<A>(g_out + j, d, t.t2hat + j, d, L);
    pw[7][j] = sum<A>(g_out + j, d, L);
  });
  norm_output(cta, t.t1hat, w[4], w[5], L, d, t1);
  cta.sync();
  cta.each(L * d, [&](int64_t i) {
    const int64_t r = i / d, j = i % d;
    gh[i] = static_cast<A>(t.h[i]) > A(0) ? dot<A>(r2 + r * d, 1, w[3] + j, d, d) : A(0);
  });
  cta.each(d * d, [&](int64_t i) { pw[3][i] = dot<A>(r2 + i / d, d, t.h + i % d, d, L); });
  cta.sync();
  cta.each(L * d, [&](int64_t i) {
    const int64_t r = i / d, j = i % d;
    gt1[i] = r2[i] + dot<A>(gh + r * d, 1, w[2] + j, d, d);
  });
  cta.each(d * d, [&](int64_t i) { pw[2][i] = dot<A>(gh + i / d, d, t1 + i % d, d, L); });
  cta.sync();
  cta.each(L, [&](int64_t r) {
    layer_norm_backward_row(gt1 + r * d, t.t1hat + r * d, static_cast<A>(t.rstd1[r]), w[4], d,
                            r1 + r * d);
  });
  cta.each(d, [&](int64_t j) {
    pw[4][j] = dot<A>(gt1 + j, d, t.t1hat + j, d, L);
    pw[5][j] = sum<A>(gt1 + j, d, L);
  });
  cta.sync();
  cta.each(L * d, [&](int64_t i) {
    gheads[i] = dot<A>(r1 + (i / d) * d, 1, w[1] + i % d, d, d);
  });
  cta.each(d * d, [&](int64_t i) { pw[1][i] = dot<A>(r1 + i / d, d, t.o + i % d, d, L); });
  cta.sync();
  const A scale = A(1) / std::sqrt(static_cast<A>(hd));
  for (int64_t h = 0; h < s.heads; ++h) {
    const T* p = t.p + h * t.p_head;
    const int64_t q0 = h * hd, k0 = d + h * hd, v0 = 2 * d + h * hd;
    cta.each(L * L, [&](int64_t i) {
      const int64_t r = i / L, c = i % L;
      dp[i] = dot<A>(gheads + r * d + q0, 1, t.qkv + c * d3 + v0, 1, hd);
    });
    cta.each(L * hd, [&](int64_t i) {
      const int64_t r = i / hd, c = i % hd;
      gqkv[r * d3 + v0 + c] = dot<A>(p + r, L, gheads + q0 + c, d, L);
    });
    cta.sync();
    cta.each(L, [&](int64_t r) {
      const A dd = dot<A>(dp + r * L, 1, p + r * L, 1, L);
      for (int64_t c = 0; c < L; ++c)
        dp[r * L + c] = scale * static_cast<A>(p[r * L + c]) * (dp[r * L + c] - dd);
    });
    cta.sync();
    cta.each(L * hd, [&](int64_t i) {
      const int64_t r = i / hd, c = i % hd;
      gqkv[r * d3 + q0 + c] = dot<A>(dp + r * L, 1, t.qkv + k0 + c, d3, L);
      gqkv[r * d3 + k0 + c] = dot<A>(dp + r, L, t.qkv + q0 + c, d3, L);
    });
    cta.sync();
  }
  const int64_t c0 = query != nullptr ? d : 0;  // the decoder's queries do not come from mem
  cta.each(L * d, [&](int64_t i) {
    const int64_t r = i / d, j = i % d;
    g_mem[i] = r1[i] + dot<A>(gqkv + r * d3 + c0, 1, w[0] + c0 * d + j, d, d3 - c0);
  });
  cta.each(d3 * d, [&](int64_t i) {
    const int64_t c = i / d, j = i % d;
    pw[0][i] = query != nullptr && c < d ? dot<A>(gqkv + c, d3, query + j, d, L)
                                         : dot<A>(gqkv + c, d3, mem + j, d, L);
  });
  if (query != nullptr) {
    cta.each(L * d, [&](int64_t i) {
      part_query[i] = dot<A>(gqkv + (i / d) * d3, 1, w[0] + i % d, d, d);
    });
  }
  cta.sync();
}

// CTA n: d(z) through BN_out, W_out's partial and d(o), the decoder and encoder backward, and
// the partials of BN_in's weight and bias gradients.
struct BwdLayers {
  template <class Cta, typename T, typename A>
  HRNAS_HD static void run(const Cta& cta, int64_t n, const BwdArgs<T, A>& a) {
    const Dims& s = a.s;
    const int64_t L = s.L, d = s.d, ld = n * L * d;
    A* part = a.part + n * a.ga.at[kGrads];
    A* gz = a.ws + a.w.gz + n * s.Co * d;
    const T* zhat = a.tape + a.tp.zhat + n * s.Co * d;
    cta.each(s.Co * d, [&](int64_t i) {
      const int64_t co = i / d;
      gz[i] = bn_input_grad(a, kBnOutW, kBnOutB, co, static_cast<A>(a.bn_out_w[co]),
                            a.var_out[co], gz[i], static_cast<A>(zhat[i]), d);
    });
    const LayerSlices<const T> te = layer_slices(a.tape, a.tp.layer[0], n, s.N, L, d);
    A* m = a.ws + a.w.m + ld;
    A* o = m;
    norm_output(cta, te.t2hat, a.enc[6], a.enc[7], L, d, m);
    if (s.decoder) {
      o = a.ws + a.w.o + ld;
      const LayerSlices<const T> td = layer_slices(a.tape, a.tp.layer[1], n, s.N, L, d);
      norm_output(cta, td.t2hat, a.dec[6], a.dec[7], L, d, o);
    }
    const T* uhat = a.tape + a.tp.uhat + ld;
    A* t0 = a.ws + a.w.t0 + ld;
    cta.each(L * d, [&](int64_t i) {
      t0[i] = static_cast<A>(uhat[i]) * static_cast<A>(a.bn_in_w[i / d]) +
              static_cast<A>(a.bn_in_b[i / d]);
    });
    cta.sync();
    A* go = a.ws + a.w.go + ld;
    cta.each(s.Co * L, [&](int64_t i) {
      part[a.ga.at[kWOut] + i] = dot<A>(gz + (i / L) * d, 1, o + (i % L) * d, 1, d);
    });
    cta.each(L * d, [&](int64_t i) {
      go[i] = dot<A>(a.w_out + i / d, L, gz + i % d, d, s.Co);
    });
    cta.sync();
    const A* g_enc = go;
    if (s.decoder) {
      A* gm = a.ws + a.w.gm + ld;
      layer_backward(cta, a, a.dec, a.tp.layer[1], n, a.query, m, go, part + a.ga.at[kDec],
                     part + a.ga.at[kQuery], gm);
      g_enc = gm;
    }
    A* gt0 = a.ws + a.w.gt0 + ld;
    layer_backward(cta, a, a.enc, a.tp.layer[0], n, static_cast<const T*>(nullptr), t0, g_enc,
                   part + a.ga.at[kEnc], static_cast<A*>(nullptr), gt0);
    cta.each(L, [&](int64_t l) {
      part[a.ga.at[kBnInB] + l] = sum<A>(gt0 + l * d, 1, d);
      part[a.ga.at[kBnInW] + l] = dot<A>(gt0 + l * d, 1, uhat + l * d, 1, d);
    });
    cta.sync();
  }
};

// CTA n: d(u) through BN_in, W_in's partial, d(f) = W_in^T d(u), and grad x: the adjoint of the
// shrink to the grid (gathered per input pixel over the grid taps naming it) plus the residual.
struct BwdInput {
  template <class Cta, typename T, typename A>
  HRNAS_HD static void run(const Cta& cta, int64_t n, const BwdArgs<T, A>& a) {
    const Dims& s = a.s;
    const int64_t L = s.L, d = s.d, C = s.C, K = C + 2, g = s.g;
    A* gu = a.ws + a.w.gt0 + n * L * d;
    const T* uhat = a.tape + a.tp.uhat + n * L * d;
    cta.each(L * d, [&](int64_t i) {
      const int64_t l = i / d;
      gu[i] = bn_input_grad(a, kBnInW, kBnInB, l, static_cast<A>(a.bn_in_w[l]), a.var_in[l],
                            gu[i], static_cast<A>(uhat[i]), d);
    });
    cta.sync();
    const T* f = a.tape + a.tp.f + n * C * d;
    A* gf = a.ws + a.w.gf + n * C * d;
    A* part = a.part + n * a.ga.at[kGrads];
    cta.each(L * K, [&](int64_t i) {
      const int64_t l = i / K, c = i % K;
      part[a.ga.at[kWIn] + i] = c < C ? dot<A>(gu + l * d, 1, f + c * d, 1, d)
                                      : dot<A>(gu + l * d, 1, a.coords + (c - C) * d, 1, d);
    });
    cta.each(C * d, [&](int64_t i) {
      const int64_t c = i / d, j = i % d;
      gf[i] = dot<A>(a.w_in + c, K, gu + j, d, L);
    });
    cta.sync();
    const int64_t plane = s.H * s.W;
    cta.each(C * plane, [&](int64_t i) {
      const int64_t c = i / plane, y = (i % plane) / s.W, x = i % s.W;
      A v = s.residual ? static_cast<A>(a.gy[n * C * plane + i]) : A(0);
      for (int64_t r = 0; r < g; ++r) {
        const A wr = tap_weight(tap<A>(r, s.H, g), y);
        if (wr == A(0)) continue;
        for (int64_t q = 0; q < g; ++q)
          v += wr * tap_weight(tap<A>(q, s.W, g), x) * gf[c * d + r * g + q];
      }
      a.gx[n * C * plane + i] = static_cast<T>(v);
    });
    cta.sync();
  }
};

// CTA b: kThreads weight-gradient values, each the sum of the samples' partials in sample order.
struct BwdReduce {
  template <class Cta, typename T, typename A>
  HRNAS_HD static void run(const Cta& cta, int64_t b, const BwdArgs<T, A>& a) {
    const int64_t P = a.ga.at[kGrads];
    cta.each(kThreads, [&](int64_t i) {
      const int64_t e = b * kThreads + i;
      if (e >= P) return;
      A v = 0;
      for (int64_t n = 0; n < a.s.N; ++n) v += a.part[n * P + e];
      int k = 0;
      while (e >= a.ga.at[k + 1]) ++k;
      a.grad[k][e - a.ga.at[k]] = static_cast<T>(v);
    });
    cta.sync();
  }
};

}  // namespace device
}  // namespace token_transformer
}  // namespace hrnas
