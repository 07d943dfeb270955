// Dynamic-token transformer on CPU, forward and backward of the whole block in one op each.
//
// The token math is a chain of small GEMMs (M = N * L rows of d = 64 values, or per-sample
// L x L attention): each one runs as one batched ATen GEMM over the whole batch (MKL/oneDNN
// underneath, so the 64 x 64 products use the tuned micro-kernels), called from here without
// autograd or Python in between. Everything between the GEMMs (BatchNorm with batch statistics,
// residual + LayerNorm, softmax, ReLU and all of their backwards) is one fused pass each, written
// below and parallel over tokens or rows with at::parallel_for; reductions run inside one task in
// a fixed order, so results do not depend on the thread count.
//
// Forward: resize x to the grid (kept on the tape), project to tokens, BN, encoder, decoder,
// project back, BN, resize to the output, residual. Every value the backward needs is written
// once to the tape (token_transformer.h), so the backward recomputes only the cheap affine
// outputs of the norms. Dead tokens do not exist here: the caller passes the alive ones.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/TensorOperators.h>
#include <ATen/ops/addcmul.h>
#include <ATen/ops/bmm.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/_softmax.h>
#include <ATen/ops/_softmax_backward_data.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/baddbmm.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>
#include <torch/library.h>

#include <cmath>
#include <optional>
#include <tuple>
#include <vector>

#include "common/checks.h"
#include "token_transformer/token_transformer.h"

namespace hrnas {
namespace token_transformer {
namespace {

constexpr double kLayerNormEps = 1e-5;  // nn.LayerNorm's default, as the authors' layers

// ---- fused elementwise passes ----------------------------------------------------------------

// The inner loops run over the d (or L) values of one row: `omp simd` lets the compiler
// vectorise their sums (a fixed lane order, so results stay independent of the thread count).

// BatchNorm over channels r of z [N, R, d] + bias [R, d]: statistics over (N, d), or the
// running ones; writes x_hat to xhat and gamma * x_hat + beta to out.
template <typename T>
void bn_forward(const T* z, const T* bias, const T* gamma, const T* beta, const T* run_mean,
                const T* run_var, bool batch_stats, double eps, int64_t N, int64_t R, int64_t d,
                T* xhat, T* out, T* mean_out, T* var_out) {
  using A = at::opmath_type<T>;
  at::parallel_for(0, R, 1, [&](int64_t rb, int64_t re) {
    for (int64_t r = rb; r < re; ++r) {
      const T* b = bias + r * d;
      A mean, var;
      if (batch_stats) {
        A s = 0;
        for (int64_t n = 0; n < N; ++n) {
          const T* zr = z + (n * R + r) * d;
#pragma omp simd reduction(+ : s)
          for (int64_t j = 0; j < d; ++j) s += A(zr[j]) + A(b[j]);
        }
        mean = s / A(N * d);
        A ss = 0;
        for (int64_t n = 0; n < N; ++n) {
          const T* zr = z + (n * R + r) * d;
#pragma omp simd reduction(+ : ss)
          for (int64_t j = 0; j < d; ++j) {
            const A c = A(zr[j]) + A(b[j]) - mean;
            ss += c * c;
          }
        }
        var = ss / A(N * d);
      } else {
        mean = run_mean[r];
        var = run_var[r];
      }
      mean_out[r] = mean;
      var_out[r] = var;
      const A rstd = A(1) / std::sqrt(var + A(eps));
      const A g = gamma[r], be = beta[r];
      for (int64_t n = 0; n < N; ++n) {
        const int64_t o = (n * R + r) * d;
#pragma omp simd
        for (int64_t j = 0; j < d; ++j) {
          const A xh = (A(z[o + j]) + A(b[j]) - mean) * rstd;
          xhat[o + j] = xh;
          out[o + j] = xh * g + be;
        }
      }
    }
  });
}

// Backward of bn_forward: grad [N, R, d] -> grad_z, grad_gamma [R], grad_beta [R].
template <typename T>
void bn_backward(const T* grad, const T* xhat, const T* gamma, const T* var, bool batch_stats,
                 double eps, int64_t N, int64_t R, int64_t d, T* grad_z, T* grad_gamma,
                 T* grad_beta) {
  using A = at::opmath_type<T>;
  at::parallel_for(0, R, 1, [&](int64_t rb, int64_t re) {
    for (int64_t r = rb; r < re; ++r) {
      A sg = 0, sgx = 0;
      for (int64_t n = 0; n < N; ++n) {
        const int64_t o = (n * R + r) * d;
#pragma omp simd reduction(+ : sg, sgx)
        for (int64_t j = 0; j < d; ++j) {
          sg += A(grad[o + j]);
          sgx += A(grad[o + j]) * A(xhat[o + j]);
        }
      }
      grad_gamma[r] = sgx;
      grad_beta[r] = sg;
      const A scale = A(gamma[r]) / std::sqrt(A(var[r]) + A(eps));
      const A m = batch_stats ? A(1) / A(N * d) : A(0);
      const A msg = m * sg, msgx = m * sgx;
      for (int64_t n = 0; n < N; ++n) {
        const int64_t o = (n * R + r) * d;
#pragma omp simd
        for (int64_t j = 0; j < d; ++j)
          grad_z[o + j] = scale * (A(grad[o + j]) - msg - A(xhat[o + j]) * msgx);
      }
    }
  });
}

// out = LayerNorm(a + res) per row of d values; x_hat and 1 / std go to the tape.
template <typename T>
void add_layer_norm(const T* a, const T* res, const T* gamma, const T* beta, int64_t rows,
                    int64_t d, T* xhat, T* rstd_out, T* out) {
  using A = at::opmath_type<T>;
  at::parallel_for(0, rows, 16, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      const T* ai = a + i * d;
      const T* ri = res + i * d;
      T* xi = xhat + i * d;
      A s = 0;
#pragma omp simd reduction(+ : s)
      for (int64_t j = 0; j < d; ++j) s += A(ai[j]) + A(ri[j]);
      const A mean = s / A(d);
      A ss = 0;
#pragma omp simd reduction(+ : ss)
      for (int64_t j = 0; j < d; ++j) {
        const A c = A(ai[j]) + A(ri[j]) - mean;
        ss += c * c;
      }
      const A rstd = A(1) / std::sqrt(ss / A(d) + A(kLayerNormEps));
      rstd_out[i] = rstd;
#pragma omp simd
      for (int64_t j = 0; j < d; ++j) {
        const A xh = (A(ai[j]) + A(ri[j]) - mean) * rstd;
        xi[j] = xh;
        out[i * d + j] = xh * A(gamma[j]) + A(beta[j]);
      }
    }
  });
}

// Backward of the normalisation in add_layer_norm (gamma applied here, affine grads outside).
template <typename T>
void layer_norm_backward(const T* grad, const T* xhat, const T* rstd, const T* gamma,
                         int64_t rows, int64_t d, T* grad_in) {
  using A = at::opmath_type<T>;
  at::parallel_for(0, rows, 16, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      const T* gi = grad + i * d;
      const T* xi = xhat + i * d;
      A s = 0, sx = 0;
#pragma omp simd reduction(+ : s, sx)
      for (int64_t j = 0; j < d; ++j) {
        const A gh = A(gi[j]) * A(gamma[j]);
        s += gh;
        sx += gh * A(xi[j]);
      }
      s /= A(d);
      sx /= A(d);
      const A rs = rstd[i];
#pragma omp simd
      for (int64_t j = 0; j < d; ++j)
        grad_in[i * d + j] = rs * (A(gi[j]) * A(gamma[j]) - s - A(xi[j]) * sx);
    }
  });
}

// grad *= (h > 0): the ReLU's backward, its gate read from its output h.
template <typename T>
void relu_backward(T* grad, const T* h, int64_t count) {
  at::parallel_for(0, count, 4096, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) grad[i] = h[i] > T(0) ? grad[i] : T(0);
  });
}

// ---- resizing ---------------------------------------------------------------------------------
// Bilinear resizing (align_corners=False) is separable: a plane resizes as R_h X R_w^T with
// [out, in] matrices of two taps per row, and the backward is R_h^T G R_w. The width direction
// (the contiguous one) runs as one GEMM over all rows of all planes with the dense R_w; the
// height direction blends whole rows (two taps, vectorised along the row), which avoids both
// transposes and batches of tiny GEMMs.

// F.interpolate's source index rule: src = max((i + 0.5) * in / out - 0.5, 0); taps floor(src)
// and min(floor(src) + 1, in - 1) with weights 1 - frac and frac.
struct Taps {
  std::vector<int64_t> i0, i1;
  std::vector<double> w0, w1;
};

Taps make_taps(int64_t out, int64_t in) {
  Taps t;
  const double scale = double(in) / double(out);
  for (int64_t i = 0; i < out; ++i) {
    const double src = std::max((i + 0.5) * scale - 0.5, 0.0);
    const int64_t i0 = std::min(static_cast<int64_t>(src), in - 1);
    t.i0.push_back(i0);
    t.i1.push_back(std::min(i0 + 1, in - 1));
    t.w1.push_back(src - double(i0));
    t.w0.push_back(1.0 - (src - double(i0)));
  }
  return t;
}

// The dense [out, in] matrix of the taps, for the width direction's GEMM.
at::Tensor resize_matrix(int64_t out, int64_t in, const at::TensorOptions& opt) {
  const Taps t = make_taps(out, in);
  at::Tensor m = at::zeros({out, in}, opt.dtype(at::kDouble));
  double* p = m.mutable_data_ptr<double>();
  for (int64_t i = 0; i < out; ++i) {
    p[i * in + t.i0[i]] += t.w0[i];
    p[i * in + t.i1[i]] += t.w1[i];
  }
  return m.to(opt.dtype());
}

// Height direction on [P, rows, B] planes with the taps of a resize from `in` to `out` rows:
// forward y [P, out, B] = blend of x's rows; adjoint (the backward) y [P, in, B] gathers each
// output row's gradient back onto its two source rows (per plane, in order: no atomics).
template <typename T>
at::Tensor blend_rows(const at::Tensor& x, const Taps& taps, int64_t in, bool adjoint) {
  const int64_t P = x.size(0), B = x.size(2), out = static_cast<int64_t>(taps.i0.size());
  at::Tensor y = adjoint ? at::zeros({P, in, B}, x.options()) : at::empty({P, out, B}, x.options());
  const T* xp = x.const_data_ptr<T>();
  T* yp = y.mutable_data_ptr<T>();
  const int64_t x_rows = adjoint ? out : in, y_rows = adjoint ? in : out;
  at::parallel_for(0, P, 1, [&](int64_t pb, int64_t pe) {
    for (int64_t p = pb; p < pe; ++p) {
      const T* xs = xp + p * x_rows * B;
      T* ys = yp + p * y_rows * B;
      for (int64_t i = 0; i < out; ++i) {
        const T w0 = T(taps.w0[i]), w1 = T(taps.w1[i]);
        if (adjoint) {
          const T* g = xs + i * B;
          T* a = ys + taps.i0[i] * B;
          T* b = ys + taps.i1[i] * B;
#pragma omp simd
          for (int64_t j = 0; j < B; ++j) a[j] += w0 * g[j];
#pragma omp simd
          for (int64_t j = 0; j < B; ++j) b[j] += w1 * g[j];
        } else {
          const T* a = xs + taps.i0[i] * B;
          const T* b = xs + taps.i1[i] * B;
          T* o = ys + i * B;
#pragma omp simd
          for (int64_t j = 0; j < B; ++j) o[j] = w0 * a[j] + w1 * b[j];
        }
      }
    }
  });
  return y;
}

// Width direction: [P, A, B] -> [P, A, b] with the dense r [b, B] (transposed: r is [B, b] and
// the product is x r), + add when defined, written into out when defined.
at::Tensor resize_cols(const at::Tensor& x, const at::Tensor& r, const at::Tensor& add,
                       const at::Tensor& out) {
  const int64_t P = x.size(0), A = x.size(1), B = x.size(2), b = r.size(1);
  const at::Tensor x2 = x.reshape({P * A, B});
  at::Tensor y = out.defined() ? out.view({P * A, b}) : at::empty({P * A, b}, x.options());
  if (add.defined()) {
    at::addmm_out(y, add.reshape({P * A, b}), x2, r);
  } else {
    at::mm_out(y, x2, r);
  }
  return y.view({P, A, b});
}

// The resizes the op needs. Shrink to the grid: width first (the big input is read by one
// plain GEMM), then the rows of the small intermediate; growth to the output: rows first on
// the small input, then the GEMM writes the big output with the residual folded in. Their
// backwards run the same two steps transposed, in reverse order.
template <typename T>
void resize_to_grid(const at::Tensor& x, int64_t g, const at::Tensor& out) {
  const int64_t P = x.size(0), H = x.size(1), W = x.size(2);
  const at::Tensor cols = resize_cols(x, resize_matrix(g, W, x.options()).t(), {}, {});
  out.view({P, g, g}).copy_(blend_rows<T>(cols, make_taps(g, H), H, false));
}

template <typename T>
at::Tensor resize_to_grid_backward(const at::Tensor& grad, int64_t H, int64_t W,
                                   const at::Tensor& add) {
  const int64_t g = grad.size(1);
  const at::Tensor rows = blend_rows<T>(grad, make_taps(g, H), H, true);
  return resize_cols(rows, resize_matrix(g, W, grad.options()), add, {});
}

template <typename T>
void resize_from_grid(const at::Tensor& z, int64_t Ho, int64_t Wo, const at::Tensor& add,
                      const at::Tensor& out) {
  const int64_t g = z.size(1);
  const at::Tensor rows = blend_rows<T>(z, make_taps(Ho, g), g, false);
  resize_cols(rows, resize_matrix(Wo, g, z.options()).t(), add, out);
}

template <typename T>
at::Tensor resize_from_grid_backward(const at::Tensor& grad, int64_t g) {
  const int64_t Ho = grad.size(1), Wo = grad.size(2);
  const at::Tensor cols = resize_cols(grad, resize_matrix(Wo, g, grad.options()), {}, {});
  return blend_rows<T>(cols, make_taps(Ho, g), g, true);
}

// W [R, K] times every sample of v [N, K, d] -> [N, R, d], one batched GEMM (W broadcast).
at::Tensor left_multiply(const at::Tensor& w, const at::Tensor& v) {
  return at::bmm(w.unsqueeze(0).expand({v.size(0), w.size(0), w.size(1)}), v);
}

// sum over samples of a[n] b[n]^T for a [N, R, d], b [N, K, d] -> [R, K].
at::Tensor sum_outer(const at::Tensor& a, const at::Tensor& b) {
  return at::sum(at::bmm(a, b.transpose(1, 2)), 0);
}

// ---- one encoder/decoder layer ----------------------------------------------------------------

struct LayerViews {
  at::Tensor qkv, q, k, v, o, t1hat, h, t2hat, p, rstd1, rstd2;  // q, k, v: column blocks of qkv
};

LayerViews layer_views(const at::Tensor& tape, const LayerTape& lt, int64_t N, int64_t L,
                       int64_t d, int64_t heads) {
  auto blk = [&](int64_t off, at::IntArrayRef sizes) {
    int64_t count = 1;
    for (int64_t s : sizes) count *= s;
    return tape.narrow(0, off, count).view(sizes);
  };
  const at::Tensor qkv = blk(lt.qkv, {N, L, 3 * d});
  return {qkv,                      qkv.narrow(2, 0, d),      qkv.narrow(2, d, d),
          qkv.narrow(2, 2 * d, d),  blk(lt.o, {N, L, d}),     blk(lt.t1hat, {N, L, d}), blk(lt.h, {N, L, d}),
          blk(lt.t2hat, {N, L, d}), blk(lt.p, {heads, N, L, L}), blk(lt.rstd1, {N, L}),
          blk(lt.rstd2, {N, L})};
}

// The affine output of a LayerNorm from its tape: x_hat * gamma + beta.
at::Tensor norm_output(const at::Tensor& xhat, const at::Tensor& gamma, const at::Tensor& beta) {
  return at::addcmul(beta, xhat, gamma);
}

// query: [N, L, d], or [L, d] shared by every sample (the decoder's learned queries).
template <typename T>
at::Tensor layer_forward(const LayerViews& t, const at::Tensor& query, const at::Tensor& mem,
                         at::TensorList w, int64_t heads) {
  const int64_t N = mem.size(0), L = mem.size(1), d = mem.size(2), hd = d / heads;
  const int64_t rows = N * L;
  const at::Tensor mem2 = mem.reshape({rows, d});
  if (query.dim() == 2) {  // shared queries: project once, keys and values per sample
    t.q.copy_(at::mm(query, w[0].narrow(0, 0, d).t()).unsqueeze(0).expand({N, L, d}));
    t.qkv.narrow(2, d, 2 * d).copy_(at::mm(mem2, w[0].narrow(0, d, 2 * d).t()).view({N, L, 2 * d}));
  } else {  // self-attention: query == mem, one GEMM for all three projections
    at::Tensor qkv2 = t.qkv.view({rows, 3 * d});
    at::mm_out(qkv2, mem2, w[0].t());
  }
  for (int64_t h = 0; h < heads; ++h) {
    at::Tensor p = t.p.select(0, h);
    // scores scaled by 1/sqrt(head dim) inside the GEMM, then ATen's vectorised softmax
    const at::Tensor scores =
        at::baddbmm(p, t.q.narrow(2, h * hd, hd), t.k.narrow(2, h * hd, hd).transpose(1, 2),
                    0.0, 1.0 / std::sqrt(double(hd)));
    at::_softmax_out(p, scores, -1, false);
    if (heads == 1) {
      at::Tensor o = t.o;
      at::bmm_out(o, p, t.v);
    } else {
      t.o.narrow(2, h * hd, hd).copy_(at::bmm(p, t.v.narrow(2, h * hd, hd)));
    }
  }
  const at::Tensor a = at::mm(t.o.view({rows, d}), w[1].t());
  at::Tensor t1 = at::empty({rows, d}, mem.options());
  add_layer_norm<T>(a.const_data_ptr<T>(), mem2.const_data_ptr<T>(), w[4].const_data_ptr<T>(),
                    w[5].const_data_ptr<T>(), rows, d, t.t1hat.mutable_data_ptr<T>(),
                    t.rstd1.mutable_data_ptr<T>(), t1.mutable_data_ptr<T>());
  at::Tensor h2 = t.h.view({rows, d});
  at::mm_out(h2, t1, w[2].t());
  h2.relu_();
  const at::Tensor f2 = at::mm(h2, w[3].t());
  at::Tensor out = at::empty({N, L, d}, mem.options());
  add_layer_norm<T>(f2.const_data_ptr<T>(), t1.const_data_ptr<T>(), w[6].const_data_ptr<T>(),
                    w[7].const_data_ptr<T>(), rows, d, t.t2hat.mutable_data_ptr<T>(),
                    t.rstd2.mutable_data_ptr<T>(), out.mutable_data_ptr<T>());
  return out;
}

// Backward of layer_forward: returns (grad of mem, grad of a shared query ([0] otherwise),
// the 8 weight gradients). With a per-sample query (the encoder, query == mem) its gradient is
// folded into the gradient of mem.
template <typename T>
std::tuple<at::Tensor, at::Tensor, std::vector<at::Tensor>> layer_backward(
    const LayerViews& t, const at::Tensor& query, const at::Tensor& mem, at::TensorList w,
    int64_t heads, const at::Tensor& grad_out) {
  const int64_t N = mem.size(0), L = mem.size(1), d = mem.size(2), hd = d / heads;
  const int64_t rows = N * L;
  const at::Tensor mem2 = mem.reshape({rows, d});
  const at::Tensor g_out = grad_out.reshape({rows, d});
  const at::Tensor t1hat = t.t1hat.view({rows, d}), t2hat = t.t2hat.view({rows, d});
  const at::Tensor h2 = t.h.view({rows, d});

  const at::Tensor g_norm2_w = at::sum(g_out * t2hat, 0), g_norm2_b = at::sum(g_out, 0);
  at::Tensor g_r2 = at::empty({rows, d}, mem.options());
  layer_norm_backward<T>(g_out.const_data_ptr<T>(), t2hat.const_data_ptr<T>(),
                         t.rstd2.const_data_ptr<T>(), w[6].const_data_ptr<T>(), rows, d,
                         g_r2.mutable_data_ptr<T>());
  const at::Tensor t1 = norm_output(t1hat, w[4], w[5]);
  const at::Tensor g_w2 = at::mm(g_r2.t(), h2);
  at::Tensor g_h = at::mm(g_r2, w[3]);
  relu_backward<T>(g_h.mutable_data_ptr<T>(), h2.const_data_ptr<T>(), rows * d);
  const at::Tensor g_w1 = at::mm(g_h.t(), t1);
  const at::Tensor g_t1 = g_r2.addmm(g_h, w[2]);
  const at::Tensor g_norm1_w = at::sum(g_t1 * t1hat, 0), g_norm1_b = at::sum(g_t1, 0);
  at::Tensor g_mem = at::empty({rows, d}, mem.options());
  layer_norm_backward<T>(g_t1.const_data_ptr<T>(), t1hat.const_data_ptr<T>(),
                         t.rstd1.const_data_ptr<T>(), w[4].const_data_ptr<T>(), rows, d,
                         g_mem.mutable_data_ptr<T>());
  const at::Tensor g_wo = at::mm(g_mem.t(), t.o.view({rows, d}));
  const at::Tensor g_o = at::mm(g_mem, w[1]).view({N, L, d});

  at::Tensor g_qkv = at::empty({N, L, 3 * d}, mem.options());
  const at::Tensor g_q = g_qkv.narrow(2, 0, d), g_k = g_qkv.narrow(2, d, d),
                   g_v = g_qkv.narrow(2, 2 * d, d);
  const double scale = 1.0 / std::sqrt(double(hd));
  for (int64_t h = 0; h < heads; ++h) {
    const at::Tensor p = t.p.select(0, h);
    const at::Tensor g_oh = g_o.narrow(2, h * hd, hd);
    const at::Tensor g_p = at::bmm(g_oh, t.v.narrow(2, h * hd, hd).transpose(1, 2));
    g_v.narrow(2, h * hd, hd).copy_(at::bmm(p.transpose(1, 2), g_oh));
    const at::Tensor g_s = at::_softmax_backward_data(g_p, p, -1, p.scalar_type());
    // the 1/sqrt(head dim) of the scores, applied inside the GEMMs
    g_q.narrow(2, h * hd, hd)
        .copy_(at::baddbmm(g_q.narrow(2, h * hd, hd), g_s, t.k.narrow(2, h * hd, hd), 0.0, scale));
    g_k.narrow(2, h * hd, hd)
        .copy_(at::baddbmm(g_k.narrow(2, h * hd, hd), g_s.transpose(1, 2),
                           t.q.narrow(2, h * hd, hd), 0.0, scale));
  }
  const at::Tensor g_qkv2 = g_qkv.view({rows, 3 * d});
  at::Tensor g_in_w, g_query;
  if (query.dim() == 2) {  // shared queries: their gradient sums over the samples
    const at::Tensor g_kv2 = g_qkv2.narrow(1, d, 2 * d);
    g_mem = at::addmm(g_mem, g_kv2, w[0].narrow(0, d, 2 * d));
    const at::Tensor g_qs = at::sum(g_q, 0);
    g_in_w = at::cat({at::mm(g_qs.t(), query), at::mm(g_kv2.t(), mem2)}, 0);
    g_query = at::mm(g_qs, w[0].narrow(0, 0, d));
  } else {
    g_mem = at::addmm(g_mem, g_qkv2, w[0]);
    g_in_w = at::mm(g_qkv2.t(), mem2);
    g_query = at::empty({0}, mem.options());
  }
  std::vector<at::Tensor> grads = {g_in_w, g_wo, g_w1, g_w2,
                                   g_norm1_w, g_norm1_b, g_norm2_w, g_norm2_b};
  return {g_mem.view({N, L, d}), g_query, grads};
}

// ---- the op -----------------------------------------------------------------------------------

struct Dims {
  int64_t N, C, H, W, g, d, L, C_out, layers;
};

Dims check_common(const at::Tensor& coords, const at::Tensor& w_in, at::TensorList encoder,
                  const std::optional<at::Tensor>& query, at::TensorList decoder,
                  const at::Tensor& w_out, int64_t heads, const at::Tensor& ref) {
  TORCH_CHECK(ref.device().is_cpu(), kOp, ": the CPU kernel got a tensor on ", ref.device());
  TORCH_CHECK(coords.dim() == 3 && coords.size(0) == 2 && coords.size(1) == coords.size(2), kOp,
              ": coords must be [2, g, g], got ", coords.sizes());
  const int64_t g = coords.size(1), d = g * g;
  TORCH_CHECK(w_in.dim() == 2 && w_out.dim() == 2 && w_out.size(1) == w_in.size(0), kOp,
              ": input_proj_weight [L, C + 2] and reverse_proj_weight [C_out, L] disagree: ",
              w_in.sizes(), " vs ", w_out.sizes());
  TORCH_CHECK(heads >= 1 && d % heads == 0, kOp, ": num_heads ", heads, " does not divide ", d);
  check_layer(encoder, d, ref);
  TORCH_CHECK(query.has_value() == !decoder.empty(), kOp,
              ": query_embed and decoder go together");
  if (query.has_value()) {
    check_layer(decoder, d, ref);
    TORCH_CHECK(query->dim() == 2 && query->size(0) == w_in.size(0) && query->size(1) == d, kOp,
                ": query_embed must be [L, d], got ", query->sizes());
  }
  for (const at::Tensor* t : {&coords, &w_in, &w_out}) check_same(kOp, "a weight", *t, ref);
  return {0, w_in.size(1) - 2, 0, 0, g, d, w_in.size(0), w_out.size(0), 1 + query.has_value()};
}

std::vector<at::Tensor> contiguous(at::TensorList ts) {
  std::vector<at::Tensor> out;
  for (const at::Tensor& t : ts) out.push_back(t.contiguous());
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> fwd_cpu(
    const at::Tensor& x_in, const at::Tensor& coords_in, const at::Tensor& w_in_in,
    const at::Tensor& bn_in_w, const at::Tensor& bn_in_b, const std::optional<at::Tensor>& rm_in,
    const std::optional<at::Tensor>& rv_in, at::TensorList encoder_in,
    const std::optional<at::Tensor>& query_in, at::TensorList decoder_in,
    const at::Tensor& w_out_in, const at::Tensor& bn_out_w, const at::Tensor& bn_out_b,
    const std::optional<at::Tensor>& rm_out, const std::optional<at::Tensor>& rv_out,
    int64_t heads, c10::SymIntArrayRef out_size, bool residual, double eps) {
  check_nchw(kOp, "x", x_in);
  Dims s = check_common(coords_in, w_in_in, encoder_in, query_in, decoder_in, w_out_in, heads,
                        x_in);
  s.N = x_in.size(0);
  s.H = x_in.size(2);
  s.W = x_in.size(3);
  TORCH_CHECK(x_in.size(1) == s.C, kOp, ": x has ", x_in.size(1), " channels, input_proj_weight ",
              s.C + 2, " - 2");
  TORCH_CHECK(out_size.size() == 2, kOp, ": out_size must be [Ho, Wo]");
  const int64_t Ho = out_size[0].guard_int(__FILE__, __LINE__);
  const int64_t Wo = out_size[1].guard_int(__FILE__, __LINE__);
  TORCH_CHECK(!residual || (Ho == s.H && Wo == s.W && s.C_out == s.C), kOp,
              ": residual needs the output shape to equal x's");
  const bool batch_stats = !rm_in.has_value();
  TORCH_CHECK(batch_stats == !rv_in.has_value() && batch_stats == !rm_out.has_value() &&
                  batch_stats == !rv_out.has_value(),
              kOp, ": pass all four running statistics or none");
  TORCH_CHECK(s.N > 0 || !batch_stats, kOp, ": batch statistics of an empty batch are undefined");
  const int64_t N = s.N, C = s.C, L = s.L, d = s.d, g = s.g, Co = s.C_out;
  const at::Tensor x = x_in.contiguous(), coords = coords_in.contiguous(),
                   w_in = w_in_in.contiguous(), w_out = w_out_in.contiguous();
  const std::vector<at::Tensor> enc = contiguous(encoder_in), dec = contiguous(decoder_in);
  const TapeLayout layout = make_tape_layout(N, C, L, d, heads, s.layers, Co);
  at::Tensor tape = at::empty({layout.total}, x.options());
  at::Tensor y = at::empty({N, Co, Ho, Wo}, x.options());
  at::Tensor mean_in = at::empty({L}, x.options()), var_in = at::empty({L}, x.options());
  at::Tensor mean_out = at::empty({Co}, x.options()), var_out = at::empty({Co}, x.options());
  if (N == 0) {  // eval on an empty batch: nothing to compute, the statistics are the running
    mean_in.copy_(*rm_in);
    var_in.copy_(*rv_in);
    mean_out.copy_(*rm_out);
    var_out.copy_(*rv_out);
    return {y, tape, mean_in, var_in, mean_out, var_out};
  }
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "token_transformer_fwd", [&] {
    using T = scalar_t;
    at::Tensor f = tape.narrow(0, layout.f, N * C * d).view({N, C, d});
    resize_to_grid<T>(x.view({N * C, s.H, s.W}), g, f);
    const at::Tensor coord_bias = at::mm(w_in.narrow(1, C, 2), coords.view({2, d}));
    const at::Tensor u = left_multiply(w_in.narrow(1, 0, C), f);
    at::Tensor t0 = at::empty({N, L, d}, x.options());
    const at::Tensor gi = bn_in_w.contiguous(), bi = bn_in_b.contiguous();
    const at::Tensor rmi = batch_stats ? gi : rm_in->contiguous();
    const at::Tensor rvi = batch_stats ? gi : rv_in->contiguous();
    bn_forward<T>(u.const_data_ptr<T>(), coord_bias.const_data_ptr<T>(), gi.const_data_ptr<T>(),
                  bi.const_data_ptr<T>(), rmi.const_data_ptr<T>(), rvi.const_data_ptr<T>(),
                  batch_stats, eps, N, L, d, tape.mutable_data_ptr<T>() + layout.uhat,
                  t0.mutable_data_ptr<T>(), mean_in.mutable_data_ptr<T>(),
                  var_in.mutable_data_ptr<T>());
    at::Tensor o = layer_forward<T>(layer_views(tape, layout.layer[0], N, L, d, heads), t0, t0,
                                    enc, heads);
    if (s.layers == 2) {
      o = layer_forward<T>(layer_views(tape, layout.layer[1], N, L, d, heads),
                           query_in->contiguous(), o, dec, heads);
    }
    const at::Tensor z = left_multiply(w_out, o);
    at::Tensor y8 = at::empty({N, Co, g, g}, x.options());
    const at::Tensor go = bn_out_w.contiguous(), bo = bn_out_b.contiguous();
    const at::Tensor rmo = batch_stats ? go : rm_out->contiguous();
    const at::Tensor rvo = batch_stats ? go : rv_out->contiguous();
    const at::Tensor no_bias = at::zeros({Co, d}, x.options());
    bn_forward<T>(z.const_data_ptr<T>(), no_bias.const_data_ptr<T>(), go.const_data_ptr<T>(),
                  bo.const_data_ptr<T>(),
                  rmo.const_data_ptr<T>(), rvo.const_data_ptr<T>(), batch_stats, eps, N, Co, d,
                  tape.mutable_data_ptr<T>() + layout.zhat, y8.mutable_data_ptr<T>(),
                  mean_out.mutable_data_ptr<T>(), var_out.mutable_data_ptr<T>());
    resize_from_grid<T>(y8.view({N * Co, g, g}), Ho, Wo,
                        residual ? x.view({N * C, Ho, Wo}) : at::Tensor(), y);
  });
  return {y, tape, mean_in, var_in, mean_out, var_out};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, std::vector<at::Tensor>, at::Tensor,
           std::vector<at::Tensor>, at::Tensor, at::Tensor, at::Tensor>
bwd_cpu(const at::Tensor& grad_out_in, const at::Tensor& tape, const at::Tensor& coords_in,
        const at::Tensor& w_in_in, const at::Tensor& bn_in_w_in, const at::Tensor& bn_in_b_in,
        const at::Tensor& var_in, at::TensorList encoder_in, const std::optional<at::Tensor>& query_in,
        at::TensorList decoder_in, const at::Tensor& w_out_in, const at::Tensor& bn_out_w_in,
        const at::Tensor& var_out, int64_t heads, c10::SymIntArrayRef in_size, bool residual,
        bool use_batch_stats, double eps) {
  check_nchw(kOp, "grad_out", grad_out_in);
  Dims s = check_common(coords_in, w_in_in, encoder_in, query_in, decoder_in, w_out_in, heads,
                        grad_out_in);
  TORCH_CHECK(in_size.size() == 2, kOp, ": in_size must be [H, W]");
  s.N = grad_out_in.size(0);
  s.H = in_size[0].guard_int(__FILE__, __LINE__);
  s.W = in_size[1].guard_int(__FILE__, __LINE__);
  const int64_t N = s.N, C = s.C, L = s.L, d = s.d, g = s.g, Co = s.C_out;
  const int64_t Ho = grad_out_in.size(2), Wo = grad_out_in.size(3);
  const TapeLayout layout = make_tape_layout(N, C, L, d, heads, s.layers, Co);
  TORCH_CHECK(tape.dim() == 1 && tape.numel() == layout.total, kOp, ": the tape has ",
              tape.numel(), " values, expected ", layout.total);
  TORCH_CHECK(grad_out_in.size(1) == Co, kOp, ": grad_out has ", grad_out_in.size(1),
              " channels, expected ", Co);
  const at::Tensor gy = grad_out_in.contiguous(), coords = coords_in.contiguous(),
                   w_in = w_in_in.contiguous(), w_out = w_out_in.contiguous(),
                   bn_in_w = bn_in_w_in.contiguous(), bn_in_b = bn_in_b_in.contiguous(),
                   bn_out_w = bn_out_w_in.contiguous();
  const std::vector<at::Tensor> enc = contiguous(encoder_in), dec = contiguous(decoder_in);
  const auto opt = gy.options();
  std::vector<at::Tensor> g_enc, g_dec;
  at::Tensor g_query = query_in.has_value() ? at::zeros_like(*query_in) : at::empty({0}, opt);
  if (N == 0) {  // no samples: every gradient is an empty sum
    for (const at::Tensor& t : enc) g_enc.push_back(at::zeros_like(t));
    for (const at::Tensor& t : dec) g_dec.push_back(at::zeros_like(t));
    return {at::empty({0, C, s.H, s.W}, opt), at::zeros_like(w_in), at::zeros_like(bn_in_w),
            at::zeros_like(bn_in_w), g_enc, g_query, g_dec, at::zeros_like(w_out),
            at::zeros_like(bn_out_w), at::zeros_like(bn_out_w)};
  }
  at::Tensor g_x, g_w_in, g_bn_in_w = at::empty({L}, opt), g_bn_in_b = at::empty({L}, opt);
  at::Tensor g_w_out, g_bn_out_w = at::empty({Co}, opt), g_bn_out_b = at::empty({Co}, opt);
  AT_DISPATCH_FLOATING_TYPES(gy.scalar_type(), "token_transformer_bwd", [&] {
    using T = scalar_t;
    const at::Tensor g8 = resize_from_grid_backward<T>(gy.view({N * Co, Ho, Wo}), g);
    at::Tensor g_z = at::empty({N, Co, d}, opt);
    bn_backward<T>(g8.const_data_ptr<T>(), tape.const_data_ptr<T>() + layout.zhat,
                   bn_out_w.const_data_ptr<T>(), var_out.const_data_ptr<T>(), use_batch_stats, eps,
                   N, Co, d, g_z.mutable_data_ptr<T>(), g_bn_out_w.mutable_data_ptr<T>(),
                   g_bn_out_b.mutable_data_ptr<T>());
    const LayerViews enc_t = layer_views(tape, layout.layer[0], N, L, d, heads);
    const at::Tensor memory = norm_output(enc_t.t2hat, enc[6], enc[7]);
    at::Tensor o = memory;
    if (s.layers == 2) {
      o = norm_output(layer_views(tape, layout.layer[1], N, L, d, heads).t2hat, dec[6], dec[7]);
    }
    g_w_out = sum_outer(g_z, o);
    at::Tensor g_o = left_multiply(w_out.t(), g_z);
    if (s.layers == 2) {
      auto [g_m, g_qe, grads] =
          layer_backward<T>(layer_views(tape, layout.layer[1], N, L, d, heads),
                            query_in->contiguous(), memory, dec, heads, g_o);
      g_o = g_m;
      g_query = g_qe;
      g_dec = grads;
    }
    const at::Tensor uhat = tape.narrow(0, layout.uhat, N * L * d).view({N, L, d});
    const at::Tensor t0 = at::addcmul(bn_in_b.view({L, 1}), uhat, bn_in_w.view({L, 1}));
    auto [g_t0, unused, grads] = layer_backward<T>(enc_t, t0, t0, enc, heads, g_o);
    g_enc = grads;
    at::Tensor g_u = at::empty({N, L, d}, opt);
    const at::Tensor g_t0c = g_t0.contiguous();
    bn_backward<T>(g_t0c.const_data_ptr<T>(), uhat.const_data_ptr<T>(),
                   bn_in_w.const_data_ptr<T>(), var_in.const_data_ptr<T>(), use_batch_stats, eps,
                   N, L, d, g_u.mutable_data_ptr<T>(), g_bn_in_w.mutable_data_ptr<T>(),
                   g_bn_in_b.mutable_data_ptr<T>());
    const at::Tensor f = tape.narrow(0, layout.f, N * C * d).view({N, C, d});
    g_w_in = at::cat({sum_outer(g_u, f), at::mm(at::sum(g_u, 0), coords.view({2, d}).t())}, 1);
    const at::Tensor g_f = left_multiply(w_in.narrow(1, 0, C).t(), g_u);
    g_x = resize_to_grid_backward<T>(g_f.view({N * C, g, g}), s.H, s.W,
                                     residual ? gy.view({N * C, s.H, s.W}) : at::Tensor())
              .view({N, C, s.H, s.W});
  });
  return {g_x,    g_w_in,  g_bn_in_w, g_bn_in_b,  g_enc,
          g_query, g_dec, g_w_out,   g_bn_out_w, g_bn_out_b};
}

}  // namespace

TORCH_LIBRARY_IMPL(hrnas_kernels, CPU, m) {
  m.impl("token_transformer_fwd", &fwd_cpu);
  m.impl("token_transformer_bwd", &bwd_cpu);
}

}  // namespace token_transformer
}  // namespace hrnas
