// Dynamic-token transformer on CPU, forward and backward of the whole block in one op each.
//
// No ATen compute call: every product is the register-blocked `gemm` below on data that stays
// in L1/L2, and each phase is one parallel region. The two BatchNorms need statistics over the
// whole batch, so they split the block into phases: (1) one sample per task: shrink x to the
// grid and project it to tokens (the forward's weight transposes are tasks of this region too);
// BN over tokens (parallel over tokens); (2) the token math, one sample per task: encoder and
// decoder layer (backward: decoder then encoder) with softmax, LayerNorm and ReLU fused around
// their L x d x d and L x L x d products, then the projection back; (3) BN over channels, and the
// growth to the output size with the residual added in the same pass, one plane per task.
// The backward's weight gradients sum over samples: the per-sample gradients are kept and every
// weight gradient is formed after the loop by tasks that each own a block of output rows and sum
// over all N * L rows in order: deterministic, and independent of the thread count.
//
// Every value the backward needs is written once to the tape (token_transformer.h), so the
// backward recomputes only the cheap affine outputs of the norms. Dead tokens do not exist here:
// the registered ops gather the alive tokens' parameters first (token_transformer.h).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros_like.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <functional>
#include <limits>
#include <type_traits>
#include <optional>
#include <tuple>
#include <vector>

#include "common/checks.h"
#include "common/output_pool.h"
#include "common/scratch.h"
#include "token_transformer/token_transformer.h"
#include "common/activation.h"
#include "common/cpu_isa.h"

#if HRNAS_CPU_ISA_ENABLED
HRNAS_CPU_ISA_BEGIN
#include "common/simd.h"

namespace hrnas {
namespace token_transformer {
namespace {

constexpr double kLayerNormEps = 1e-5;  // nn.LayerNorm's default, as the authors' layers

// ---- fused elementwise passes ----------------------------------------------------------------

// The inner loops run over the d (or L) values of one row: `omp simd` lets the compiler
// vectorise their sums (a fixed lane order, so results stay independent of the thread count).

// One row of d values of BatchNorm's output: x_hat = (z + b - mean) / sqrt(var + eps) to xhat
// (unless null) and gamma * x_hat + beta to out (which may be z).
template <typename T>
void bn_normalize_row(const T* z, const T* b, at::opmath_type<T> mean, at::opmath_type<T> var,
                      T gamma, T beta, double eps, int64_t d, T* xhat, T* out) {
  using A = at::opmath_type<T>;
  const A rstd = A(1) / std::sqrt(var + A(eps));
  const A g = gamma, be = beta;
  if (xhat != nullptr) {
#pragma omp simd
    for (int64_t j = 0; j < d; ++j) {
      const A xh = (A(z[j]) + A(b[j]) - mean) * rstd;
      xhat[j] = xh;
      out[j] = xh * g + be;
    }
  } else {
#pragma omp simd
    for (int64_t j = 0; j < d; ++j) out[j] = (A(z[j]) + A(b[j]) - mean) * rstd * g + be;
  }
}

// BatchNorm over channels r of z [N, R, d] + bias (row r at bias + r * bias_stride, d values):
// statistics over (N, d), or the running ones; writes x_hat to xhat (unless null) and
// gamma * x_hat + beta to out.
template <typename T>
void bn_forward(const T* z, const T* bias, int64_t bias_stride, const T* gamma, const T* beta,
                const T* run_mean, const T* run_var, bool batch_stats, double eps, int64_t N,
                int64_t R, int64_t d, T* xhat, T* out, T* mean_out, T* var_out) {
  using A = at::opmath_type<T>;
  at::parallel_for(0, R, 1, [&](int64_t rb, int64_t re) {
    for (int64_t r = rb; r < re; ++r) {
      const T* b = bias + r * bias_stride;
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
      for (int64_t n = 0; n < N; ++n) {
        const int64_t o = (n * R + r) * d;
        bn_normalize_row<T>(z + o, b, mean, var, gamma[r], beta[r], eps, d,
                            xhat != nullptr ? xhat + o : nullptr, out + o);
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

// out = LayerNorm(a + res) per row of d values; x_hat and 1 / std go to the tape. Serial: it
// runs inside the per-sample loop.
template <typename T>
void add_layer_norm(const T* a, const T* res, const T* gamma, const T* beta, int64_t rows,
                    int64_t d, T* xhat, T* rstd_out, T* out) {
  using A = at::opmath_type<T>;
  {
    for (int64_t i = 0; i < rows; ++i) {
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
  }
}

// Backward of the normalisation in add_layer_norm (gamma applied here, affine grads outside).
template <typename T>
void layer_norm_backward(const T* grad, const T* xhat, const T* rstd, const T* gamma, int64_t rows,
                         int64_t d, T* grad_in) {
  using A = at::opmath_type<T>;
  {
    for (int64_t i = 0; i < rows; ++i) {
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
  }
}


// dst [rows, d] = xhat * w + b: per column (w, b [d]: a LayerNorm's affine) or per row
// (per_row; w, b [rows]: a BatchNorm's over tokens).
template <typename T>
void affine_rows(const T* xhat, const T* w, const T* b, int64_t rows, int64_t d, bool per_row,
                 T* dst) {
  for (int64_t i = 0; i < rows; ++i) {
    const T* x = xhat + i * d;
    T* o = dst + i * d;
    if (per_row) {
      const T wi = w[i], bi = b[i];
#pragma omp simd
      for (int64_t j = 0; j < d; ++j) o[j] = x[j] * wi + bi;
    } else {
#pragma omp simd
      for (int64_t j = 0; j < d; ++j) o[j] = x[j] * w[j] + b[j];
    }
  }
}

// ---- small GEMMs ------------------------------------------------------------------------------

// One register tile of gemm below: rows i..i+R of C, NV vectors of W lanes of columns from j.
template <typename T, bool kTransA, int R, int NV, int W>
HRNAS_INLINE void gemm_tile(int64_t i, int64_t j, int64_t K, const T* __restrict A, int64_t lda,
                            const T* __restrict B, int64_t ldb, T* __restrict C, int64_t ldc,
                            bool accumulate) {
  using V = simd::VecW<T, W>;
  V c[R][NV];
  for (int r = 0; r < R; ++r) {
    for (int v = 0; v < NV; ++v)
      c[r][v] = accumulate ? simd::loadw<W>(C + (i + r) * ldc + j + v * W) : V{};
  }
  for (int64_t k = 0; k < K; ++k) {
    V b[NV];
    for (int v = 0; v < NV; ++v) b[v] = simd::loadw<W>(B + k * ldb + j + v * W);
    for (int r = 0; r < R; ++r) {
      const T a = kTransA ? A[k * lda + i + r] : A[(i + r) * lda + k];
      for (int v = 0; v < NV; ++v) c[r][v] += a * b[v];
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int v = 0; v < NV; ++v) simd::storew<W>(C + (i + r) * ldc + j + v * W, c[r][v]);
  }
}

// C [M, N] = (accumulate ? C : 0) + op(A) B with op(A) = A [M, K], or A^T for A [K, M] when
// kTransA (the weight gradients: sums over rows of two row-major operands), B [K, N], all
// row-major with leading dimensions. Register tiles of 6 rows x 2 vectors (12 accumulators,
// the 2 vectors of B's row and one broadcast of op(A): 15 of the 16 registers of AVX2 or SSE);
// per k, 2 vector loads and 6 broadcasts feed 12 FMAs, enough independent chains to cover the
// FMA latency. With AVX-512's 32 registers, float columns go 4 vectors (64) at a time first:
// 24 accumulators, and 10 loads per 24 FMAs instead of 8 per 12 (6-15% off the block's forward
// and backward, Intel Xeon). Row remainders take tiles of 4, 2 and 1 rows. The token math is
// 64 x 64 x 64 products, which a BLAS call would spend on packing and dispatch; these fit in L1
// and need neither. Every output sums over k in order, whatever its tile.
template <typename T, bool kTransA = false>
void gemm(int64_t M, int64_t N, int64_t K, const T* __restrict A, int64_t lda,
          const T* __restrict B, int64_t ldb, T* __restrict C, int64_t ldc, bool accumulate) {
  constexpr int W = simd::kWidth;
  const auto column_block = [&](auto vectors, auto lanes, int64_t j) {
    constexpr int NV = decltype(vectors)::value, L = decltype(lanes)::value;
    int64_t i = 0;
    for (; i + 6 <= M; i += 6)
      gemm_tile<T, kTransA, 6, NV, L>(i, j, K, A, lda, B, ldb, C, ldc, accumulate);
    if (M - i >= 4) {
      gemm_tile<T, kTransA, 4, NV, L>(i, j, K, A, lda, B, ldb, C, ldc, accumulate);
      i += 4;
    }
    if (M - i >= 2) {
      gemm_tile<T, kTransA, 2, NV, L>(i, j, K, A, lda, B, ldb, C, ldc, accumulate);
      i += 2;
    }
    if (M - i >= 1) gemm_tile<T, kTransA, 1, NV, L>(i, j, K, A, lda, B, ldb, C, ldc, accumulate);
  };
  const std::integral_constant<int, W> full;
  int64_t j = 0;
  if constexpr (W >= 16 && sizeof(T) == 4) {  // AVX-512, float: 6 x 4 zmm (24 of 32 registers)
    for (; j + 4 * W <= N; j += 4 * W) column_block(std::integral_constant<int, 4>{}, full, j);
  }
  for (; j + 2 * W <= N; j += 2 * W) column_block(std::integral_constant<int, 2>{}, full, j);
  for (; j + W <= N; j += W) column_block(std::integral_constant<int, 1>{}, full, j);
  if constexpr (W > 8) {  // 8 columns left (the growth's backward narrows to the 8 x 8 grid)
    if (j + 8 <= N) {
      column_block(std::integral_constant<int, 1>{}, std::integral_constant<int, 8>{}, j);
      j += 8;
    }
  }
  if (j < N) {  // fewer than one vector of columns left
    for (int64_t i = 0; i < M; ++i) {
      T* cr = C + i * ldc;
      for (int64_t jj = j; jj < N; ++jj) {
        T acc = accumulate ? cr[jj] : T(0);
        for (int64_t k = 0; k < K; ++k)
          acc += (kTransA ? A[k * lda + i] : A[i * lda + k]) * B[k * ldb + jj];
        cr[jj] = acc;
      }
    }
  }
}

// dst [cols, rows] = src [rows, cols]^T (leading dimensions lds, ldd), in 16 x 16 blocks so the
// strided side of each block stays in L1.
template <typename T>
void transpose(int64_t rows, int64_t cols, const T* src, int64_t lds, T* dst, int64_t ldd) {
  constexpr int64_t kB = 16;
  for (int64_t i0 = 0; i0 < rows; i0 += kB) {
    const int64_t i1 = std::min(rows, i0 + kB);
    for (int64_t j0 = 0; j0 < cols; j0 += kB) {
      const int64_t j1 = std::min(cols, j0 + kB);
      for (int64_t j = j0; j < j1; ++j) {
        for (int64_t i = i0; i < i1; ++i) dst[j * ldd + i] = src[i * lds + j];
      }
    }
  }
}

// ---- resizing ---------------------------------------------------------------------------------
// Bilinear resizing (align_corners=False) is separable with two taps per output in each
// direction (precomputed below). The shrink to the grid is a direct loop over planes that
// reads only the 2 g source rows and columns it needs (a GEMM with the dense [g, W] resize
// matrix would read all W and spend W / 2 times the multiply-adds), and its backward runs the
// same loop transposed, one plane per task in a fixed order (no atomics: deterministic), the
// residual's gradient copied in first.

// F.interpolate's source index rule: src = max((i + 0.5) * in / out - 0.5, 0); taps floor(src)
// and min(floor(src) + 1, in - 1) with weights 1 - frac and frac (computed in double).
template <typename T>
struct Taps {
  std::vector<int64_t> i0, i1;
  std::vector<T> w0, w1;
};

template <typename T>
Taps<T> make_taps(int64_t out, int64_t in) {
  Taps<T> t;
  const double scale = double(in) / double(out);
  for (int64_t i = 0; i < out; ++i) {
    const double src = std::max((i + 0.5) * scale - 0.5, 0.0);
    const int64_t i0 = std::min(static_cast<int64_t>(src), in - 1);
    t.i0.push_back(i0);
    t.i1.push_back(std::min(i0 + 1, in - 1));
    t.w1.push_back(T(src - double(i0)));
    t.w0.push_back(T(1.0 - (src - double(i0))));
  }
  return t;
}

// One plane x [H, W] -> out [g, g] (r, c: the taps of the rows and columns): each row pair
// blended after its columns.
template <typename T>
void shrink_plane(const T* x, int64_t W, const Taps<T>& r, const Taps<T>& c, T* out) {
  const int64_t g = static_cast<int64_t>(r.i0.size());
  for (int64_t i = 0; i < g; ++i) {
    const T* a = x + r.i0[i] * W;
    const T* b = x + r.i1[i] * W;
    T* o = out + i * g;
    for (int64_t j = 0; j < g; ++j) {
      const T ta = c.w0[j] * a[c.i0[j]] + c.w1[j] * a[c.i1[j]];
      const T tb = c.w0[j] * b[c.i0[j]] + c.w1[j] * b[c.i1[j]];
      o[j] = r.w0[i] * ta + r.w1[i] * tb;
    }
  }
}

// The growth writes every output value once and reads the residual once, one plane per task:
// the plane's g rows are first widened to Wo columns (wide [g, Wo] = z [g, g] R^T, with R the
// dense [Wo, g] matrix of the column taps, in thread scratch), then each output row blends two
// widened rows, the residual added in the same contiguous pass: F.interpolate's order (width,
// then height). Its backward runs the two steps transposed: each gradient row goes onto its two
// widened rows, which are then narrowed back by one small GEMM (wide R).

// The dense [out, in] matrix of the taps (transposed: [in, out]), its rows `ld` apart (at least
// their length; the columns past it zero, so GEMMs over whole vectors need no scalar tail).
template <typename T>
std::vector<T> taps_matrix(const Taps<T>& t, int64_t in, bool transposed, int64_t ld = 0) {
  const int64_t out = static_cast<int64_t>(t.i0.size());
  const int64_t rows = transposed ? in : out, cols = transposed ? out : in;
  ld = std::max(ld, cols);
  std::vector<T> m(rows * ld, T(0));
  for (int64_t i = 0; i < out; ++i) {
    m[transposed ? t.i0[i] * ld + i : i * ld + t.i0[i]] += t.w0[i];
    m[transposed ? t.i1[i] * ld + i : i * ld + t.i1[i]] += t.w1[i];
  }
  return m;
}

// n rounded up to whole vectors of simd::kWidth lanes.
inline int64_t whole_vectors(int64_t n) {
  return (n + simd::kWidth - 1) / simd::kWidth * simd::kWidth;
}

// The taps grouped by their source index: for source k, the outputs taps_of[first[k] ..
// first[k + 1]) (in output order, the w0 tap before the w1 tap) with their weights. The adjoint
// of a resize sums, for each source row, the output rows that read it.
template <typename T>
struct TapsBySource {
  std::vector<int64_t> first, taps_of;
  std::vector<T> weights;

  TapsBySource(const Taps<T>& t, int64_t sources) : first(sources + 1, 0) {
    const int64_t out = static_cast<int64_t>(t.i0.size());
    for (int64_t k = 0; k < sources; ++k) {
      first[k] = static_cast<int64_t>(taps_of.size());
      for (int64_t i = 0; i < out; ++i) {
        if (t.i0[i] == k) taps_of.push_back(i), weights.push_back(t.w0[i]);
        if (t.i1[i] == k) taps_of.push_back(i), weights.push_back(t.w1[i]);
      }
    }
    first[sources] = static_cast<int64_t>(taps_of.size());
  }

  // out [width] = (add, or 0 when null) + sum of weight * rows[tap * ld] over source k's taps,
  // in registers, by blocks of kWidth, 8, 4 and 1 lanes (no scalar tail of a whole vector: the
  // 28- and 14-wide rows left 12 and 14 values per row to scalar code).
  void sum_rows(int64_t k, const T* rows, int64_t ld, const T* add, T* out,
                int64_t width) const {
    constexpr int W = simd::kWidth;
    const int64_t t0 = first[k], t1 = first[k + 1];
    const auto block = [&](auto lanes, int64_t j) {
      constexpr int V = decltype(lanes)::value;
      simd::VecW<T, V> sum = add != nullptr ? simd::loadw<V>(add + j) : simd::VecW<T, V>{};
      for (int64_t t = t0; t < t1; ++t)
        sum += weights[t] * simd::loadw<V>(rows + taps_of[t] * ld + j);
      simd::storew<V>(out + j, sum);
    };
    int64_t j = 0;
    for (; j + W <= width; j += W) block(std::integral_constant<int, W>{}, j);
    if constexpr (W > 8) {
      if (j + 8 <= width) block(std::integral_constant<int, 8>{}, j), j += 8;
    }
    if constexpr (W > 4) {
      if (j + 4 <= width) block(std::integral_constant<int, 4>{}, j), j += 4;
    }
    for (; j < width; ++j) block(std::integral_constant<int, 1>{}, j);
  }
};

// Adjoint of shrink_plane: grad [g, g] -> out [H, W] = add (or 0 when null) + the taps' share.
// The grid rows are widened to W columns first (wide [g, Wp] = grad C, C the [g, Wp] matrix of
// the column taps, zero-padded to whole vectors), then each output row is written once: its
// residual row plus the widened rows whose taps reach it. (Copying the residual and adding each
// grid value into its four pixels cost 3x as much: scalar read-modify-writes.)
template <typename T>
struct ShrinkAdjoint {
  int64_t g, H, W, Wp;
  TapsBySource<T> rows;
  std::vector<T> widen;  // [g, Wp]

  ShrinkAdjoint(int64_t g_, int64_t H_, int64_t W_)
      : g(g_), H(H_), W(W_), Wp(whole_vectors(W_)), rows(make_taps<T>(g_, H_), H_),
        widen(taps_matrix<T>(make_taps<T>(g_, W_), W_, false, Wp)) {}

  // `wide`: [g, Wp] scratch.
  void plane(const T* grad, const T* add, T* out, T* wide) const {
    gemm<T>(g, Wp, g, grad, g, widen.data(), Wp, wide, Wp, false);
    for (int64_t r = 0; r < H; ++r)
      rows.sum_rows(r, wide, Wp, add != nullptr ? add + r * W : nullptr, out + r * W, W);
  }
};

// The growth of g x g planes to Ho x Wo. The widened rows are padded to whole vectors (zero
// columns in the taps matrix), so the GEMM has no scalar tail (Wo = 28 or 14: a third or more of
// its columns otherwise).
template <typename T>
struct GridGrowth {
  int64_t g, Ho, Wo, Wp;
  Taps<T> rows;
  std::vector<T> widen;  // [g, Wp]

  GridGrowth(int64_t g_, int64_t Ho_, int64_t Wo_)
      : g(g_), Ho(Ho_), Wo(Wo_), Wp(whole_vectors(Wo_)), rows(make_taps<T>(Ho_, g_)),
        widen(taps_matrix<T>(make_taps<T>(Wo_, g_), g_, true, Wp)) {}

  // z [g, g] -> out [Ho, Wo] (+ add [Ho, Wo] when not null), through `wide` [g, Wp] scratch.
  void plane(const T* z, const T* add, T* out, T* wide) const {
    gemm<T>(g, Wp, g, z, g, widen.data(), Wp, wide, Wp, false);
    for (int64_t i = 0; i < Ho; ++i) {
      const T* ra = wide + rows.i0[i] * Wp;
      const T* rb = wide + rows.i1[i] * Wp;
      const T w0 = rows.w0[i], w1 = rows.w1[i];
      T* o = out + i * Wo;
      if (add != nullptr) {
        const T* ad = add + i * Wo;
#pragma omp simd
        for (int64_t j = 0; j < Wo; ++j) o[j] = (w0 * ra[j] + w1 * rb[j]) + ad[j];
      } else {
#pragma omp simd
        for (int64_t j = 0; j < Wo; ++j) o[j] = w0 * ra[j] + w1 * rb[j];
      }
    }
  }
};

// z [P, g, g] -> out [P, Ho, Wo] (+ add [P, Ho, Wo] when not null), one plane per task.
template <typename T>
void resize_from_grid(const T* z, int64_t P, int64_t g, int64_t Ho, int64_t Wo, const T* add,
                      T* out) {
  const GridGrowth<T> grow(g, Ho, Wo);
  at::parallel_for(0, P, 1, [&](int64_t pb, int64_t pe) {
    T* wide = scratch<T>(0, g * grow.Wp);
    for (int64_t p = pb; p < pe; ++p) {
      grow.plane(z + p * g * g, add != nullptr ? add + p * Ho * Wo : nullptr,
                 out + p * Ho * Wo, wide);
    }
  });
}

// Adjoint of resize_from_grid: grad [P, Ho, Wo] -> out [P, g, g]. Each widened row sums the
// gradient rows whose taps reach it, in registers (adding each gradient row into its two widened
// rows in memory instead left scalar tails and chained read-modify-writes: 15% slower), then one
// small GEMM narrows the widened rows.
template <typename T>
void resize_from_grid_backward(const T* grad, int64_t P, int64_t g, int64_t Ho, int64_t Wo,
                               T* out) {
  const TapsBySource<T> rows(make_taps<T>(Ho, g), g);
  const std::vector<T> narrow = taps_matrix<T>(make_taps<T>(Wo, g), g, false);  // [Wo, g]
  at::parallel_for(0, P, 1, [&](int64_t pb, int64_t pe) {
    T* wide = scratch<T>(0, g * Wo);
    for (int64_t p = pb; p < pe; ++p) {
      for (int64_t k = 0; k < g; ++k)
        rows.sum_rows(k, grad + p * Ho * Wo, Wo, nullptr, wide + k * Wo, Wo);
      gemm<T>(g, g, Wo, wide, Wo, narrow.data(), g, out + p * g * g, g, false);
    }
  });
}

// ---- attention softmax ---------------------------------------------------------------------

// p = softmax(scale * p) along each of `rows` rows of n values, in place. Float rows take the
// exponential a vector at a time: n = round(x / ln 2), r = x - n ln 2 (two-part ln 2), e^r by
// its degree-6 Taylor polynomial (|r| <= 0.35: relative error about 1e-7, float's own), times
// 2^n built in the exponent bits, x clamped to where the result is a normal float. Double
// rows, and the tail of a row, use std::exp.
template <typename T>
void softmax_rows(T* p, int64_t rows, int64_t n, T scale) {
  using A = at::opmath_type<T>;
  constexpr int64_t W = simd::kWidth;
  for (int64_t i = 0; i < rows; ++i) {
    T* row = p + i * n;
    A mx = -std::numeric_limits<A>::infinity();
    for (int64_t j = 0; j < n; ++j) mx = std::max(mx, A(row[j]) * A(scale));
    A sum = 0;
    int64_t j = 0;
    if constexpr (std::is_same_v<T, float>) {
      using V = simd::Vec<float>;
      typedef int32_t IV __attribute__((vector_size(W * sizeof(int32_t))));
      V acc{};
      for (; j + W <= n; j += W) {
        V x = simd::load(row + j) * scale - mx;
        x = x < simd::splat(-87.0f) ? simd::splat(-87.0f) : x;
        x = x > simd::splat(88.0f) ? simd::splat(88.0f) : x;
        const V t = x * 1.44269504088896341f;
        const IV e = __builtin_convertvector(t + (t < V{} ? simd::splat(-0.5f) : simd::splat(0.5f)), IV);
        const V ef = __builtin_convertvector(e, V);
        const V r = x - ef * 0.693145751953125f - ef * 1.428606765330187e-06f;
        V q = simd::splat(1.0f / 720.0f);
        q = q * r + 1.0f / 120.0f;
        q = q * r + 1.0f / 24.0f;
        q = q * r + 1.0f / 6.0f;
        q = q * r + 0.5f;
        q = q * r + 1.0f;
        q = q * r + 1.0f;
        const IV bits = (e + 127) << 23;
        V pow2;
        __builtin_memcpy(&pow2, &bits, sizeof(pow2));
        q = q * pow2;
        simd::store(row + j, q);
        acc += q;
      }
      sum = simd::sum<float>(acc);
    }
    for (; j < n; ++j) {
      const A e = std::exp(A(row[j]) * A(scale) - mx);
      row[j] = e;
      sum += e;
    }
    const A inv = A(1) / sum;
#pragma omp simd
    for (int64_t k = 0; k < n; ++k) row[k] = A(row[k]) * inv;
  }
}

// g (of the probabilities p) -> scale * d(scores), in place, per row of n values.
template <typename T>
void softmax_rows_backward(T* g, const T* p, int64_t rows, int64_t n, T scale) {
  using A = at::opmath_type<T>;
  for (int64_t i = 0; i < rows; ++i) {
    A dot = 0;
#pragma omp simd reduction(+ : dot)
    for (int64_t j = 0; j < n; ++j) dot += A(g[i * n + j]) * A(p[i * n + j]);
#pragma omp simd
    for (int64_t j = 0; j < n; ++j)
      g[i * n + j] = A(scale) * A(p[i * n + j]) * (A(g[i * n + j]) - dot);
  }
}

// ---- one encoder/decoder layer, one sample at a time -------------------------------------------

// A layer's weights as the per-sample code reads them: the originals ([out, in], for the
// backward's dX = dY W) and, for the forward, their transposes ([in, out], for Y = X W^T) in one
// buffer, filled by fill_transpose (one task per matrix, run in the forward's first parallel
// region: ATen's generic transposing copy took about 25 us a matrix here, and even the blocked
// transpose() is serial time worth hiding behind the shrink of the input).
template <typename T>
struct LayerW {
  at::Tensor transposed;  // kept alive for the pointers below
  const T *qkv, *o, *w1, *w2, *n1w, *n1b, *n2w, *n2b;
  T *qkv_tp, *o_tp, *w1_tp, *w2_tp;  // slots of `transposed`, written by fill_transpose
  int64_t rows[4], cols[4];
};

template <typename T>
LayerW<T> layer_weights(const std::vector<at::Tensor>& w, bool with_transposes) {
  LayerW<T> l{};
  l.qkv = w[0].const_data_ptr<T>();
  l.o = w[1].const_data_ptr<T>();
  l.w1 = w[2].const_data_ptr<T>();
  l.w2 = w[3].const_data_ptr<T>();
  l.n1w = w[4].const_data_ptr<T>();
  l.n1b = w[5].const_data_ptr<T>();
  l.n2w = w[6].const_data_ptr<T>();
  l.n2b = w[7].const_data_ptr<T>();
  for (int j = 0; j < 4; ++j) {
    l.rows[j] = w[j].size(0);
    l.cols[j] = w[j].size(1);
  }
  if (with_transposes) {
    l.transposed = at::empty({w[0].numel() + w[1].numel() + w[2].numel() + w[3].numel()},
                             w[0].options());
    T* dst = l.transposed.template mutable_data_ptr<T>();
    T** tp[4] = {&l.qkv_tp, &l.o_tp, &l.w1_tp, &l.w2_tp};
    for (int j = 0; j < 4; ++j) {
      *tp[j] = dst;
      dst += l.rows[j] * l.cols[j];
    }
  }
  return l;
}

// Writes the transpose of weight j (0: in_proj ... 3: linear2) into its slot of l.transposed.
template <typename T>
void fill_transpose(const LayerW<T>& l, int j) {
  const T* src[4] = {l.qkv, l.o, l.w1, l.w2};
  T* dst[4] = {l.qkv_tp, l.o_tp, l.w1_tp, l.w2_tp};
  transpose<T>(l.rows[j], l.cols[j], src[j], l.cols[j], dst[j], l.rows[j]);
}

// Sample n's slices of one layer's tape.
template <typename T>
struct LayerSample {
  T *qkv, *o, *t1hat, *h, *t2hat, *rstd1, *rstd2;
  T* p;  // head 0; head h is at p + h * p_head_stride
  int64_t p_head_stride;
};

template <typename T>
LayerSample<T> layer_sample(T* tape, const LayerTape& lt, int64_t n, int64_t N, int64_t L,
                            int64_t d) {
  const int64_t ld = L * d;
  return {tape + lt.qkv + n * 3 * ld, tape + lt.o + n * ld,     tape + lt.t1hat + n * ld,
          tape + lt.h + n * ld,       tape + lt.t2hat + n * ld, tape + lt.rstd1 + n * L,
          tape + lt.rstd2 + n * L,    tape + lt.p + n * L * L,  N * L * L};
}

// Thread-local scratch for one sample's temporaries ([L, max(L, d)] each).
template <typename T>
struct Scratch {
  T *a, *b, *c;
};

template <typename T>
Scratch<T> sample_scratch(int64_t L, int64_t d) {
  const int64_t size = L * std::max(L, d);
  return {scratch<T>(0, size), scratch<T>(1, size), scratch<T>(2, size)};
}

// Forward of one layer for one sample: mem [L, d] -> out [L, d], the tape filled. shared_q:
// the decoder's queries already projected ([L, d], the same for every sample); null for the
// encoder, whose queries are mem.
template <typename T>
void layer_forward(const LayerW<T>& w, const LayerSample<T>& t, const T* shared_q, const T* mem,
                   int64_t L, int64_t d, int64_t heads, T* out) {
  const int64_t hd = d / heads, ld3 = 3 * d;
  const Scratch<T> s = sample_scratch<T>(L, d);
  if (shared_q == nullptr) {
    gemm<T>(L, 3 * d, d, mem, d, w.qkv_tp, 3 * d, t.qkv, ld3, false);
  } else {
    for (int64_t i = 0; i < L; ++i) std::copy(shared_q + i * d, shared_q + (i + 1) * d, t.qkv + i * ld3);
    gemm<T>(L, 2 * d, d, mem, d, w.qkv_tp + d, 3 * d, t.qkv + d, ld3, false);
  }
  const T scale = T(1.0 / std::sqrt(double(hd)));
  for (int64_t h = 0; h < heads; ++h) {
    T* p = t.p + h * t.p_head_stride;
    transpose<T>(L, hd, t.qkv + d + h * hd, ld3, s.a, L);  // K_h^T [hd, L]
    gemm<T>(L, L, hd, t.qkv + h * hd, ld3, s.a, L, p, L, false);
    softmax_rows<T>(p, L, L, scale);
    gemm<T>(L, hd, L, p, L, t.qkv + 2 * d + h * hd, ld3, t.o + h * hd, d, false);
  }
  gemm<T>(L, d, d, t.o, d, w.o_tp, d, s.a, d, false);
  add_layer_norm<T>(s.a, mem, w.n1w, w.n1b, L, d, t.t1hat, t.rstd1, s.b);  // s.b: t1
  gemm<T>(L, d, d, s.b, d, w.w1_tp, d, t.h, d, false);
  for (int64_t i = 0; i < L * d; ++i) t.h[i] = t.h[i] > T(0) ? t.h[i] : T(0);
  gemm<T>(L, d, d, t.h, d, w.w2_tp, d, s.a, d, false);
  add_layer_norm<T>(s.a, s.b, w.n2w, w.n2b, L, d, t.t2hat, t.rstd2, out);
}

// One layer's per-sample gradients, each [N, L, *], kept for the weight gradients that the
// caller forms afterwards as GEMMs over all N * L rows.
template <typename T>
struct LayerGrads {
  T *r2, *h, *t1, *gt1, *r1, *qkv;  // d(LN2 in), d(ReLU out) gated, t1, d(t1), d(LN1 in), d(QKV)
};

// A layer's LayerGrads: buffers first .. first + 5 of `work`, of N * L * d values each but
// the last, 3 * N * L * d.
template <typename T>
LayerGrads<T> layer_grads(const PooledBuffers<T>& work, size_t first) {
  return {work.buffer(first),     work.buffer(first + 1), work.buffer(first + 2),
          work.buffer(first + 3), work.buffer(first + 4), work.buffer(first + 5)};
}

// Backward of layer_forward for sample n: g_out [L, d] -> g_mem [L, d] (for the encoder the
// queries' gradient included), the per-sample gradients written into G at n.
template <typename T>
void layer_backward(const LayerW<T>& w, const LayerSample<T>& t, bool shared_q, const T* g_out,
                    int64_t n, int64_t L, int64_t d, int64_t heads, const LayerGrads<T>& G,
                    T* g_mem) {
  const int64_t hd = d / heads, ld3 = 3 * d, off = n * L * d;
  const Scratch<T> s = sample_scratch<T>(L, d);
  T* g_r2 = G.r2 + off;
  T* g_h = G.h + off;
  T* t1 = G.t1 + off;
  T* g_t1 = G.gt1 + off;
  T* g_r1 = G.r1 + off;
  T* g_qkv = G.qkv + 3 * off;
  layer_norm_backward<T>(g_out, t.t2hat, t.rstd2, w.n2w, L, d, g_r2);
  gemm<T>(L, d, d, g_r2, d, w.w2, d, g_h, d, false);
  for (int64_t i = 0; i < L * d; ++i) g_h[i] = t.h[i] > T(0) ? g_h[i] : T(0);
  for (int64_t i = 0; i < L; ++i)
    for (int64_t j = 0; j < d; ++j) t1[i * d + j] = t.t1hat[i * d + j] * w.n1w[j] + w.n1b[j];
  std::copy(g_r2, g_r2 + L * d, g_t1);
  gemm<T>(L, d, d, g_h, d, w.w1, d, g_t1, d, true);
  layer_norm_backward<T>(g_t1, t.t1hat, t.rstd1, w.n1w, L, d, g_r1);
  std::copy(g_r1, g_r1 + L * d, g_mem);
  gemm<T>(L, d, d, g_r1, d, w.o, d, s.c, d, false);  // s.c: d(head outputs) [L, d]
  const T scale = T(1.0 / std::sqrt(double(hd)));
  for (int64_t h = 0; h < heads; ++h) {
    const T* p = t.p + h * t.p_head_stride;
    const T* q = t.qkv + h * hd;
    const T* k = t.qkv + d + h * hd;
    const T* v = t.qkv + 2 * d + h * hd;
    transpose<T>(L, hd, v, ld3, s.a, L);  // V_h^T [hd, L]
    gemm<T>(L, L, hd, s.c + h * hd, d, s.a, L, s.b, L, false);  // s.b: d(P) [L, L]
    gemm<T, true>(L, hd, L, p, L, s.c + h * hd, d, g_qkv + 2 * d + h * hd, ld3, false);  // P^T dO
    softmax_rows_backward<T>(s.b, p, L, L, scale);  // s.b: d(scores) * scale
    gemm<T>(L, hd, L, s.b, L, k, ld3, g_qkv + h * hd, ld3, false);
    gemm<T, true>(L, hd, L, s.b, L, q, ld3, g_qkv + d + h * hd, ld3, false);  // dS^T Q
  }
  if (shared_q) {  // only keys and values come from mem
    gemm<T>(L, d, 2 * d, g_qkv + d, ld3, w.qkv + d * d, d, g_mem, d, true);
  } else {
    gemm<T>(L, d, 3 * d, g_qkv, ld3, w.qkv, d, g_mem, d, true);
  }
}

// ---- the weight gradients -------------------------------------------------------------------
// Each weight gradient sums over the samples. They are formed after the per-sample loop from the
// kept per-sample gradients: one list of tasks, each writing a block of output rows with a fixed
// summation order (deterministic, independent of the thread count), run by one parallel region.

using Tasks = std::vector<std::function<void()>>;

// run(t) for t in [0, count) in one parallel region whose threads take the next task as they
// finish (the tasks differ in cost; each writes its own outputs, so the order does not matter).
template <typename F>
void run_tasks(int64_t count, const F& run) {
  std::atomic<int64_t> next{0};
  at::parallel_for(0, std::min<int64_t>(count, at::get_num_threads()), 1, [&](int64_t, int64_t) {
    for (int64_t t = next.fetch_add(1); t < count; t = next.fetch_add(1)) run(t);
  });
}

constexpr int64_t kRowBlock = 64;  // output rows per task
constexpr int64_t kSumChunk = 64;  // rows of the summed operands per pass

// C [M, N] = A^T B for A [K, M], B [K, N] (leading dimensions lda, ldb, ldc), by blocks of 64
// rows. Each task passes over K in chunks of kSumChunk rows, its register tiles carried through C
// between chunks (the same sums, in the same order), so a chunk of B (64 x 64 values, 16 KiB)
// serves all the block's tiles from L1. Every block re-reads all of B: with 16-row blocks and one
// pass over K the layers' weight gradients took 352 us of a training step (N=8, C=36, 28x28,
// 100% alive, 2 threads) and scaled 1.2x from 1 thread; 64-row blocks 262 us, and the chunks 235.
template <typename T>
void add_sum_tasks(Tasks& tasks, int64_t M, int64_t N, int64_t K, const T* A, int64_t lda,
                   const T* B, int64_t ldb, T* C, int64_t ldc) {
  for (int64_t r0 = 0; r0 < M; r0 += kRowBlock) {
    const int64_t m = std::min(kRowBlock, M - r0);
    tasks.push_back([=] {
      int64_t k0 = 0;
      do {  // at least once: K == 0 (no alive token) writes zeros
        const int64_t kc = std::min(kSumChunk, K - k0);
        gemm<T, true>(m, N, kc, A + k0 * lda + r0, lda, B + k0 * ldb, ldb, C + r0 * ldc, ldc,
                      k0 > 0);
        k0 += kSumChunk;
      } while (k0 < K);
    });
  }
}

// One layer's inputs to its weight gradients, each a block of `rows` = N * L rows.
template <typename T>
struct LayerGradInputs {
  const T* g_out;  // [rows, d] the layer's output gradient
  const T* mem;    // [rows, d] its memory input (keys and values; queries too in the encoder)
  const T *o, *t1hat, *h, *t2hat;  // [rows, d] from the tape
  const T* query;  // [L, d] the decoder's learned queries, or null (encoder)
  const T* wq;     // [d, d] the query rows of in_proj_weight (decoder)
};

// The tasks of one layer's weight gradients, into out[0..7] in reference::LAYER_WEIGHTS order,
// and the learned queries' gradient (decoder: summed over samples before its two products).
template <typename T>
void add_layer_grad_tasks(Tasks& tasks, const LayerGradInputs<T>& in, const LayerGrads<T>& G,
                          int64_t N, int64_t L, int64_t d, T* const* out, T* g_query) {
  const int64_t rows = N * L, ld3 = 3 * d;
  const T* gqkv = G.qkv;
  if (in.query == nullptr) {
    add_sum_tasks<T>(tasks, 3 * d, d, rows, gqkv, ld3, in.mem, d, out[0], d);
  } else {
    tasks.push_back([=] {
      T* g_q = scratch<T>(5, L * d);  // the queries' gradient summed over samples
      std::fill(g_q, g_q + L * d, T(0));
      for (int64_t n = 0; n < N; ++n) {
        for (int64_t i = 0; i < L; ++i) {
          const T* src = gqkv + (n * L + i) * ld3;
#pragma omp simd
          for (int64_t j = 0; j < d; ++j) g_q[i * d + j] += src[j];
        }
      }
      gemm<T, true>(d, d, L, g_q, d, in.query, d, out[0], d, false);
      gemm<T>(L, d, d, g_q, d, in.wq, d, g_query, d, false);
    });
    add_sum_tasks<T>(tasks, 2 * d, d, rows, gqkv + d, ld3, in.mem, d, out[0] + d * d, d);
  }
  add_sum_tasks<T>(tasks, d, d, rows, G.r1, d, in.o, d, out[1], d);
  add_sum_tasks<T>(tasks, d, d, rows, G.h, d, G.t1, d, out[2], d);
  add_sum_tasks<T>(tasks, d, d, rows, G.r2, d, in.h, d, out[3], d);
  tasks.push_back([=] {  // the LayerNorms' weights and biases
    using A = at::opmath_type<T>;
    const T* gt1 = G.gt1;
    A* sums = scratch<A>(6, 4 * d);
    std::fill(sums, sums + 4 * d, A(0));
    for (int64_t i = 0; i < rows; ++i) {
      const T *a = gt1 + i * d, *ah = in.t1hat + i * d, *b = in.g_out + i * d,
              *bh = in.t2hat + i * d;
#pragma omp simd
      for (int64_t j = 0; j < d; ++j) {
        sums[j] += A(a[j]) * A(ah[j]);
        sums[d + j] += A(a[j]);
        sums[2 * d + j] += A(b[j]) * A(bh[j]);
        sums[3 * d + j] += A(b[j]);
      }
    }
    for (int k = 0; k < 4; ++k) std::copy(sums + k * d, sums + (k + 1) * d, out[4 + k]);
  });
}

// grad [R, K] = sum over samples of a[n] b[n]^T for a [N, R, d], b [N, K, d], one task (a
// small product: it transposes each b[n] once, into scratch [d, K + extra_cols] whose last
// columns hold `extra` [extra_cols, d] transposed, the same for every sample), in sample order.
// The scratch rows are padded with zero columns to whole 8-lane blocks, so the GEMM has no scalar
// column tail (the token projection's [L, C + 2] gradient: C + 2 = 38 left 6 scalar columns, a
// single-task tail that made this the longest task of its parallel region), and the padded sum
// is copied out at the end.
template <typename T>
void add_outer_sum_task(Tasks& tasks, int64_t N, int64_t R, int64_t K, int64_t d, const T* a,
                        const T* b, const T* extra, int64_t extra_cols, T* grad) {
  tasks.push_back([=] {
    const int64_t cols = K + extra_cols, ld = (cols + 7) / 8 * 8;
    T* bt = scratch<T>(5, d * ld);
    T* sum = ld == cols ? grad : scratch<T>(7, R * ld);
    for (int64_t j = 0; j < d; ++j) std::fill(bt + j * ld + cols, bt + (j + 1) * ld, T(0));
    if (extra_cols > 0) transpose<T>(extra_cols, d, extra, d, bt + K, ld);
    for (int64_t n = 0; n < N; ++n) {
      transpose<T>(K, d, b + n * K * d, d, bt, ld);
      gemm<T>(R, ld, d, a + n * R * d, d, bt, ld, sum, ld, n > 0);
    }
    if (sum != grad) {
      for (int64_t r = 0; r < R; ++r) std::copy(sum + r * ld, sum + r * ld + cols, grad + r * cols);
    }
  });
}

// ---- the op -----------------------------------------------------------------------------------

struct Dims {
  int64_t N, C, H, W, g, d, L, C_out, layers;
};

Dims check_common(const at::Tensor& coords, const at::Tensor& w_in, at::TensorList encoder,
                  const std::optional<at::Tensor>& query, at::TensorList decoder,
                  const at::Tensor& w_out, int64_t heads, const at::Tensor& ref) {
  TORCH_CHECK(ref.device().is_cpu(), kOp, ": the CPU kernel got a tensor on ", ref.device());
  check_weights(coords, w_in, encoder, query, decoder, w_out, heads, ref);
  const int64_t g = coords.size(1), d = g * g;
  return {0, w_in.size(1) - 2, 0, 0, g, d, w_in.size(0), w_out.size(0), 1 + query.has_value()};
}

std::vector<at::Tensor> contiguous(at::TensorList ts) {
  std::vector<at::Tensor> out;
  for (const at::Tensor& t : ts) out.push_back(t.contiguous());
  return out;
}

FwdResult fwd_cpu(
    const at::Tensor& x_in, const at::Tensor& coords_in, const at::Tensor& w_in_in,
    const at::Tensor& bn_in_w, const at::Tensor& bn_in_b, const std::optional<at::Tensor>& rm_in,
    const std::optional<at::Tensor>& rv_in, at::TensorList encoder_in,
    const std::optional<at::Tensor>& query_in, at::TensorList decoder_in,
    const at::Tensor& w_out_in, const at::Tensor& bn_out_w, const at::Tensor& bn_out_b,
    const std::optional<at::Tensor>& rm_out, const std::optional<at::Tensor>& rv_out,
    int64_t heads, c10::SymIntArrayRef out_size, bool residual, double eps, bool save_tape) {
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
  // Without save_tape (inference) nothing goes to a tape: each sample's intermediates live in
  // thread scratch laid out as a one-sample tape, and the normalised values are not kept.
  const TapeLayout one = make_tape_layout(1, C, L, d, heads, s.layers, Co);
  at::Tensor tape = pooled_empty({save_tape ? layout.total : 0}, x.options());
  at::Tensor y = pooled_empty({N, Co, Ho, Wo}, x.options());
  at::Tensor mean_in = at::empty({L}, x.options()), var_in = at::empty({L}, x.options());
  at::Tensor mean_out = at::empty({Co}, x.options()), var_out = at::empty({Co}, x.options());
  // eval: the statistics handed back are the running ones
  const auto running_statistics = [&] {
    mean_in.copy_(*rm_in);
    var_in.copy_(*rv_in);
    mean_out.copy_(*rm_out);
    var_out.copy_(*rv_out);
  };
  if (N == 0) {  // eval on an empty batch: nothing to compute
    running_statistics();
    return {y, tape, mean_in, var_in, mean_out, var_out};
  }
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "token_transformer_fwd", [&] {
    using T = scalar_t;
    T* tp = tape.mutable_data_ptr<T>();
    const T* xp = x.const_data_ptr<T>();
    const T* w_in_p = w_in.const_data_ptr<T>();
    const T* w_out_p = w_out.const_data_ptr<T>();
    // the coordinate channels' share of the token projection, the same for every sample
    std::vector<T> coord_bias(L * d);
    gemm<T>(L, d, 2, w_in_p + C, C + 2, coords.const_data_ptr<T>(), d, coord_bias.data(), d,
            false);
    const Taps<T> rows = make_taps<T>(g, s.H), cols = make_taps<T>(g, s.W);
    const bool decoder = s.layers == 2;
    const LayerW<T> we = layer_weights<T>(enc, true);
    const LayerW<T> wd = decoder ? layer_weights<T>(dec, true) : we;
    const int64_t transposes = 4 * s.layers;
    // sample n's planes shrunk to the grid into f [C, d], projected to tokens [L, d] (the
    // coordinate channels' share comes with BN's bias)
    const auto shrink_and_project = [&](int64_t n, T* f, T* tokens) {
      for (int64_t c = 0; c < C; ++c)
        shrink_plane<T>(xp + (n * C + c) * s.H * s.W, s.W, rows, cols, f + c * d);
      gemm<T>(L, d, C, w_in_p, C + 2, f, d, tokens, d, false);
    };
    const auto fill = [&](int64_t t) {
      fill_transpose<T>(t < 4 ? we : wd, static_cast<int>(t % 4));
    };
    // the learned queries projected, the same for every sample (after the transposes)
    std::vector<T> q_shared(decoder ? L * d : 0);
    const auto project_queries = [&] {
      if (decoder) {
        gemm<T>(L, d, d, query_in->contiguous().const_data_ptr<T>(), d, wd.qkv_tp, 3 * d,
                q_shared.data(), d, false);
      }
    };
    if (!batch_stats && !save_tape) {
      // Inference: the running statistics are known up front, so nothing couples the samples
      // and one task takes a sample from x to its output (shrink, projection, BN, encoder,
      // decoder, projection back, BN, growth and residual) in thread scratch: two parallel
      // regions instead of five, and no batch-sized intermediates.
      run_tasks(transposes, fill);
      project_queries();
      running_statistics();
      const at::Tensor affine[4] = {bn_in_w.contiguous(), bn_in_b.contiguous(),
                                    bn_out_w.contiguous(), bn_out_b.contiguous()};
      const T *rmi = mean_in.const_data_ptr<T>(), *rvi = var_in.const_data_ptr<T>();
      const T *rmo = mean_out.const_data_ptr<T>(), *rvo = var_out.const_data_ptr<T>();
      const T *gi = affine[0].const_data_ptr<T>(), *bi = affine[1].const_data_ptr<T>();
      const T *go = affine[2].const_data_ptr<T>(), *bo = affine[3].const_data_ptr<T>();
      const std::vector<T> no_bias(d, T(0));
      const GridGrowth<T> grow(g, Ho, Wo);
      T* yp = y.mutable_data_ptr<T>();
      at::parallel_for(0, N, 1, [&](int64_t b, int64_t e) {
        T* f = scratch<T>(5, C * d);
        T* m = scratch<T>(3, L * d);  // the encoder's output
        T* o = decoder ? scratch<T>(4, L * d) : m;  // the block's token output
        T* sample_tape = scratch<T>(6, one.total);
        T* tok = scratch<T>(7, (L + Co) * d);  // the tokens [L, d], then z [Co, d]
        T* z = tok + L * d;
        for (int64_t n = b; n < e; ++n) {
          shrink_and_project(n, f, tok);
          for (int64_t r = 0; r < L; ++r) {
            bn_normalize_row<T>(tok + r * d, coord_bias.data() + r * d, rmi[r], rvi[r], gi[r],
                                bi[r], eps, d, nullptr, tok + r * d);
          }
          layer_forward<T>(we, layer_sample<T>(sample_tape, one.layer[0], 0, 1, L, d), nullptr,
                           tok, L, d, heads, m);
          if (decoder) {
            layer_forward<T>(wd, layer_sample<T>(sample_tape, one.layer[1], 0, 1, L, d),
                             q_shared.data(), m, L, d, heads, o);
          }
          gemm<T>(Co, d, L, w_out_p, L, o, d, z, d, false);
          T* wide = scratch<T>(0, g * grow.Wp);
          for (int64_t c = 0; c < Co; ++c) {
            bn_normalize_row<T>(z + c * d, no_bias.data(), rmo[c], rvo[c], go[c], bo[c], eps, d,
                                nullptr, z + c * d);
            grow.plane(z + c * d, residual ? xp + (n * C + c) * s.H * s.W : nullptr,
                       yp + (n * Co + c) * Ho * Wo, wide);
          }
        }
      });
      return;
    }
    // the intermediates: u, t0 [N, L, d] (tokens before and after BN), z, y8 [N, Co, d]
    enum { kU, kT0, kZ, kY8 };
    const PooledBuffers<T> work({N * L * d, N * L * d, N * Co * d, N * Co * d}, x.options());
    // one sample per task: its planes shrunk to the grid (onto the tape), projected to tokens
    T* up = work.buffer(kU);
    run_tasks(transposes + N, [&](int64_t t) {
      if (t < transposes) return fill(t);
      const int64_t n = t - transposes;
      shrink_and_project(n, save_tape ? tp + layout.f + n * C * d : scratch<T>(5, C * d),
                         up + n * L * d);
    });
    T* t0p = work.buffer(kT0);
    const at::Tensor gi = bn_in_w.contiguous(), bi = bn_in_b.contiguous();
    const at::Tensor rmi = batch_stats ? gi : rm_in->contiguous();
    const at::Tensor rvi = batch_stats ? gi : rv_in->contiguous();
    bn_forward<T>(up, coord_bias.data(), d, gi.const_data_ptr<T>(), bi.const_data_ptr<T>(),
                  rmi.const_data_ptr<T>(), rvi.const_data_ptr<T>(), batch_stats, eps, N, L, d,
                  save_tape ? tp + layout.uhat : nullptr, t0p,
                  mean_in.mutable_data_ptr<T>(),
                  var_in.mutable_data_ptr<T>());
    // the token math, one sample per task: encoder, decoder, projection back, all in L1/L2
    project_queries();
    T* zp = work.buffer(kZ);
    at::parallel_for(0, N, 1, [&](int64_t b, int64_t e) {
      T* m = scratch<T>(3, L * d);  // the encoder's output
      T* o = decoder ? scratch<T>(4, L * d) : m;  // the block's token output
      T* st = save_tape ? tp : scratch<T>(6, one.total);
      const TapeLayout& lay = save_tape ? layout : one;
      for (int64_t n = b; n < e; ++n) {
        const int64_t ns = save_tape ? n : 0, Ns = save_tape ? N : 1;
        layer_forward<T>(we, layer_sample<T>(st, lay.layer[0], ns, Ns, L, d), nullptr,
                         t0p + n * L * d, L, d, heads, m);
        if (decoder) {
          layer_forward<T>(wd, layer_sample<T>(st, lay.layer[1], ns, Ns, L, d), q_shared.data(),
                           m, L, d, heads, o);
        }
        gemm<T>(Co, d, L, w_out_p, L, o, d, zp + n * Co * d, d, false);
      }
    });
    T* y8 = work.buffer(kY8);
    const at::Tensor go = bn_out_w.contiguous(), bo = bn_out_b.contiguous();
    const at::Tensor rmo = batch_stats ? go : rm_out->contiguous();
    const at::Tensor rvo = batch_stats ? go : rv_out->contiguous();
    const std::vector<T> no_bias(d, T(0));
    bn_forward<T>(zp, no_bias.data(), 0, go.const_data_ptr<T>(), bo.const_data_ptr<T>(),
                  rmo.const_data_ptr<T>(), rvo.const_data_ptr<T>(), batch_stats, eps, N, Co, d,
                  save_tape ? tp + layout.zhat : nullptr, y8,
                  mean_out.mutable_data_ptr<T>(),
                  var_out.mutable_data_ptr<T>());
    resize_from_grid<T>(y8, N * Co, g, Ho, Wo, residual ? xp : nullptr,
                        y.mutable_data_ptr<T>());
  });
  return {y, tape, mean_in, var_in, mean_out, var_out};
}

BwdResult bwd_cpu(const at::Tensor& grad_out_in, const at::Tensor& tape,
                  const at::Tensor& coords_in, const at::Tensor& w_in_in,
                  const at::Tensor& bn_in_w_in, const at::Tensor& bn_in_b_in,
                  const at::Tensor& var_in, at::TensorList encoder_in,
                  const std::optional<at::Tensor>& query_in, at::TensorList decoder_in,
                  const at::Tensor& w_out_in, const at::Tensor& bn_out_w_in,
                  const at::Tensor& var_out, int64_t heads, c10::SymIntArrayRef in_size,
                  bool residual, bool use_batch_stats, double eps) {
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
  at::Tensor g_query = at::empty({0}, opt);
  if (N == 0) {  // no samples: every gradient is an empty sum
    if (query_in.has_value()) g_query = at::zeros_like(*query_in);
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
    T* tp = tape.mutable_data_ptr<T>();
    const T* gyp = gy.const_data_ptr<T>();
    const bool decoder = s.layers == 2;
    const int64_t NCd = N * Co * d, NLd = N * L * d, NLd_dec = decoder ? NLd : 0;
    // the intermediates: g8, g_z [N, Co, d]; the encoder's LayerGrads (6 buffers), the
    // decoder's; g_o, t0, g_t0, memory, out, g_m, g_u [N, L, d] (out, g_m and the decoder's
    // LayerGrads empty without the decoder)
    enum { kG8, kGz, kEncGrads, kDecGrads = kEncGrads + 6, kGo = kDecGrads + 6, kT0, kGt0,
           kMemory, kOut, kGm, kGu };
    const PooledBuffers<T> work({NCd, NCd, NLd, NLd, NLd, NLd, NLd, 3 * NLd, NLd_dec, NLd_dec,
                                 NLd_dec, NLd_dec, NLd_dec, 3 * NLd_dec, NLd, NLd, NLd, NLd,
                                 NLd_dec, NLd_dec, NLd},
                                opt);
    // the growth's adjoint, BN over channels
    T* g8 = work.buffer(kG8);
    resize_from_grid_backward<T>(gyp, N * Co, g, Ho, Wo, g8);
    T* gzp = work.buffer(kGz);
    bn_backward<T>(g8, tp + layout.zhat, bn_out_w.const_data_ptr<T>(),
                   var_out.const_data_ptr<T>(), use_batch_stats, eps, N, Co, d, gzp,
                   g_bn_out_w.mutable_data_ptr<T>(), g_bn_out_b.mutable_data_ptr<T>());
    // the token math backward, one sample per task: projection back, decoder, encoder; the
    // affine outputs the weight gradients need (the encoder's input and output, the block's
    // token output) recomputed from the tape on the way
    const LayerW<T> we = layer_weights<T>(enc, false);
    const LayerW<T> wd = decoder ? layer_weights<T>(dec, false) : we;
    const LayerGrads<T> ge = layer_grads<T>(work, kEncGrads);
    const LayerGrads<T> gd = decoder ? layer_grads<T>(work, kDecGrads) : ge;
    T* g_op = work.buffer(kGo);
    T* t0p = work.buffer(kT0);
    T* g_t0p = work.buffer(kGt0);
    T* memp = work.buffer(kMemory);
    T* outp = decoder ? work.buffer(kOut) : memp;
    T* g_mp = decoder ? work.buffer(kGm) : g_op;
    const T* uhat = tp + layout.uhat;
    const T* w_out_p = w_out.const_data_ptr<T>();
    const T* bn_w = bn_in_w.const_data_ptr<T>();
    const T* bn_b = bn_in_b.const_data_ptr<T>();
    const T* enc_t2 = tp + layout.layer[0].t2hat;
    const T* dec_t2 = decoder ? tp + layout.layer[1].t2hat : nullptr;
    at::parallel_for(0, N, 1, [&](int64_t b, int64_t e) {
      for (int64_t n = b; n < e; ++n) {
        const int64_t off = n * L * d;
        gemm<T, true>(L, d, Co, w_out_p, L, gzp + n * Co * d, d, g_op + off, d, false);
        affine_rows<T>(enc_t2 + off, we.n2w, we.n2b, L, d, false, memp + off);
        if (decoder) affine_rows<T>(dec_t2 + off, wd.n2w, wd.n2b, L, d, false, outp + off);
        affine_rows<T>(uhat + off, bn_w, bn_b, L, d, true, t0p + off);
        if (decoder) {
          layer_backward<T>(wd, layer_sample<T>(tp, layout.layer[1], n, N, L, d), true,
                            g_op + off, n, L, d, heads, gd, g_mp + off);
        }
        layer_backward<T>(we, layer_sample<T>(tp, layout.layer[0], n, N, L, d), false,
                          g_mp + off, n, L, d, heads, ge, g_t0p + off);
      }
    });
    // every weight gradient of the layers and of the projection back, in one parallel region
    T* enc_out[8];
    T* dec_out[8];
    for (int i = 0; i < 8; ++i) {
      g_enc.push_back(at::empty_like(enc[i]));
      enc_out[i] = g_enc.back().mutable_data_ptr<T>();
      if (decoder) {
        g_dec.push_back(at::empty_like(dec[i]));
        dec_out[i] = g_dec.back().mutable_data_ptr<T>();
      }
    }
    g_w_out = at::empty({Co, L}, opt);
    Tasks tasks;
    auto layer_inputs = [&](const LayerTape& lt, const T* g_out, const T* mem, const T* query,
                            const T* wq) {
      return LayerGradInputs<T>{g_out, mem, tp + lt.o, tp + lt.t1hat, tp + lt.h, tp + lt.t2hat,
                                query, wq};
    };
    const at::Tensor query = decoder ? query_in->contiguous() : at::Tensor();
    if (decoder) {
      g_query = at::empty_like(query);  // written whole by its task
      add_layer_grad_tasks<T>(
          tasks, layer_inputs(layout.layer[1], g_op, memp, query.const_data_ptr<T>(), wd.qkv), gd,
          N, L, d, dec_out, g_query.mutable_data_ptr<T>());
    }
    add_layer_grad_tasks<T>(tasks, layer_inputs(layout.layer[0], g_mp, t0p, nullptr, nullptr), ge,
                            N, L, d, enc_out, nullptr);
    add_outer_sum_task<T>(tasks, N, Co, L, d, gzp, outp, nullptr, 0,
                           g_w_out.mutable_data_ptr<T>());
    run_tasks(static_cast<int64_t>(tasks.size()), [&](int64_t t) { tasks[t](); });
    // BN over tokens, then the token projection's gradient and the shrink's adjoint: the
    // [L, C + 2] weight gradient first, then one sample's input planes per task
    T* g_up = work.buffer(kGu);
    bn_backward<T>(g_t0p, uhat, bn_w, var_in.const_data_ptr<T>(), use_batch_stats, eps, N, L, d,
                   g_up, g_bn_in_w.mutable_data_ptr<T>(), g_bn_in_b.mutable_data_ptr<T>());
    g_w_in = at::empty({L, C + 2}, opt);
    tasks.clear();
    add_outer_sum_task<T>(tasks, N, L, C, d, g_up, tp + layout.f, coords.const_data_ptr<T>(), 2,
                           g_w_in.mutable_data_ptr<T>());
    g_x = pooled_empty({N, C, s.H, s.W}, opt);
    T* g_xp = g_x.mutable_data_ptr<T>();
    const T* w_in_p = w_in.const_data_ptr<T>();
    const ShrinkAdjoint<T> shrink(g, s.H, s.W);
    const int64_t blocks = static_cast<int64_t>(tasks.size()), plane = s.H * s.W;
    run_tasks(blocks + N, [&](int64_t t) {
      if (t < blocks) return tasks[t]();
      const int64_t n = t - blocks;
      // the sample's planes' gradients on the grid: g_f[c] = sum_l W_in[l, c] g_u[n, l]
      T* g_f = scratch<T>(6, C * d);
      T* wide = scratch<T>(0, g * shrink.Wp);
      gemm<T, true>(C, d, L, w_in_p, C + 2, g_up + n * L * d, d, g_f, d, false);
      for (int64_t c = 0; c < C; ++c) {
        const int64_t base = (n * C + c) * plane;
        shrink.plane(g_f + c * d, residual ? gyp + base : nullptr, g_xp + base, wide);
      }
    });
  });
  return {g_x,    g_w_in,  g_bn_in_w, g_bn_in_b,  g_enc,
          g_query, g_dec, g_w_out,   g_bn_out_w, g_bn_out_b};
}

}  // namespace
HRNAS_CPU_ISA_END

TORCH_LIBRARY_IMPL(hrnas_kernels, CPU, m) {
  if (!HRNAS_CPU_ISA_SELECTED()) return;
  m.impl("token_transformer_fwd", &forward_alive_tokens<&fwd_cpu>);
  m.impl("token_transformer_bwd", &backward_alive_tokens<&bwd_cpu>);
}

}  // namespace token_transformer
}  // namespace hrnas
#endif  // HRNAS_CPU_ISA_ENABLED
