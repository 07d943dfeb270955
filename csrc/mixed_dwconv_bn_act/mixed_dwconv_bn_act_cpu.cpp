// Mixed-kernel depthwise conv + BatchNorm + activation on CPU, forward and backward.
//
// Work is split into independent tasks that each own whole channels, so BatchNorm statistics and
// weight gradients are reduced inside one task in a fixed order: no cross-thread reduction, no
// atomics, results independent of the thread count.
//   NCHW: a task is one channel. Every image's plane is copied into a zero-bordered tile (so the
//         inner loops have no bounds checks) and convolved with loops vectorised along W.
//   NHWC: a task is a range of output rows of one image over all channels (see "channels_last"
//         below); BatchNorm sums and weight gradients are per-task partials, reduced in task
//         order afterwards, so the results are independent of the thread count here too.
// Forward: conv -> tape (the pre-BN output in the output's layout, kept for backward: on CPU
// storing beats recomputing a k x k conv) + per-channel sums; then BN + activation. With running
// statistics each plane (NCHW) or band (NHWC) is normalised right after its conv, while it is in
// cache, and without save_tape (inference) the conv goes to scratch memory, not a tape. Batch
// statistics need every conv value first: NCHW normalises the task's planes from the tape while
// they are still in cache, NHWC makes a second pass after every band's sums.
// Backward: one pass reduces sum(dz) and sum(dz * x_hat) per channel (dz = grad_y masked by the
// activation, the mask from y recomputed from the tape by the forward's own code with its values:
// the same bits, and two reads of y per element fewer); a second pass forms d(conv) per image and
// runs the weight gradient (correlate x with d(conv)) and the input gradient (correlate d(conv)
// with the flipped kernel for stride 1; stride 2: NCHW a local scatter, channels_last a gather
// per input pixel).
// Kernel sizes 3, 5 and 7 and both strides are compiled as constants; other odd sizes use the
// same loops with a runtime size.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <tuple>
#include <type_traits>
#include <vector>

#include "common/output_pool.h"
#include "common/scratch.h"
#include "mixed_dwconv_bn_act/mixed_dwconv_bn_act.h"
#include "common/activation.h"
#include "common/cpu_isa.h"

#if HRNAS_CPU_ISA_ENABLED
HRNAS_CPU_ISA_BEGIN
#include "common/simd.h"

namespace hrnas {
namespace mixed_dwconv {
namespace {

using simd::loadw;
using simd::storew;
using simd::Vec;
using simd::VecW;
constexpr int64_t kLanes = simd::kWidth;  // outputs per NCHW vector
constexpr int64_t kPix = 4;               // NHWC output pixels computed together

// One conv's geometry: input H x W, kernel k, stride s, output Ho x Wo, and the zero-bordered tile
// Hp x Wp (p = k / 2 on every side) that covers every tap of every output.
struct Geom {
  int64_t H, W, k, s, p, Ho, Wo, Hp, Wp;
};

Geom make_geom(int64_t H, int64_t W, int64_t k, int64_t s) {
  const int64_t p = k / 2;
  return {H, W, k, s, p, (H - 1) / s + 1, (W - 1) / s + 1, H + 2 * p, W + 2 * p};
}

// Tiles get this many spare elements at the end: the weight gradient's last, partial vector of
// a row reads up to kLanes values past the row (and keeps none of them).
constexpr int64_t kTileSlack = kLanes;

// Where padded column c = S * wo + kw of a row of g's tile sits. Stride 1: in order. Stride 2: a
// row is its even columns followed by its odd ones ((Wp + 1) / 2 even ones first), so the columns
// one tap reads for consecutive outputs are consecutive, and a vector of them is one plain load
// instead of two loads and a shuffle per tap.
template <int S>
HRNAS_INLINE int64_t tile_col(int64_t wo, int64_t kw, const Geom& g) {
  if constexpr (S == 1) {
    return wo + kw;
  } else {
    return (kw & 1) * ((g.Wp + 1) / 2) + wo + (kw >> 1);
  }
}

// ------------------------------------------------------------------------------------------------
// NCHW plane kernels: vectors along W.

// out[ho][wo] = sum_{kh,kw} wt[kh][kw] * tile[ho*S + kh][wo*S + kw]   (out is Ho x Wo; columns as
// tile_col places them)
// Output rows go 8, then 4 at a time, then one by one: with one accumulator the k*k FMAs of a
// vector form a single dependency chain and run at FMA latency; the FMA units (two, 4 cycles
// deep, on the machines we measured) need 8 independent chains in flight to run at throughput.
template <int K, int S, typename A>
void correlate_plane(const A* __restrict tile, const A* __restrict wt, const Geom g,
                     A* __restrict out) {
  const int64_t k = K > 0 ? K : g.k;
  if (g.Wo < kLanes) {  // narrow planes: scalar
    for (int64_t ho = 0; ho < g.Ho; ++ho) {
      for (int64_t wo = 0; wo < g.Wo; ++wo) {
        A acc = A(0);
        for (int64_t kh = 0; kh < k; ++kh) {
          const A* r = tile + (ho * S + kh) * g.Wp;
          for (int64_t kw = 0; kw < k; ++kw) acc += wt[kh * k + kw] * r[tile_col<S>(wo, kw, g)];
        }
        out[ho * g.Wo + wo] = acc;
      }
    }
    return;
  }
  // Vectors of kLanes outputs along W; the last one ends at Wo and may overlap the one before
  // (recomputing a few outputs beats a scalar tail of k*k dependent FMAs per output).
  int64_t ho = 0;
  const auto rows = [&](auto Rc) {
    constexpr int R = decltype(Rc)::value;
    for (; ho + R <= g.Ho; ho += R) {
      for (int64_t w0 = 0; w0 < g.Wo; w0 += kLanes) {
        const int64_t wo = std::min(w0, g.Wo - kLanes);
        Vec<A> acc[R] = {};
        for (int64_t kh = 0; kh < k; ++kh) {
          const A* r = tile + (ho * S + kh) * g.Wp;
          for (int64_t kw = 0; kw < k; ++kw) {
            const A wv = wt[kh * k + kw];
            const int64_t col = tile_col<S>(wo, kw, g);
            for (int i = 0; i < R; ++i) acc[i] += wv * simd::load(r + i * S * g.Wp + col);
          }
        }
        for (int i = 0; i < R; ++i) simd::store(out + (ho + i) * g.Wo + wo, acc[i]);
      }
    }
  };
  rows(std::integral_constant<int, 8>{});
  rows(std::integral_constant<int, 4>{});
  rows(std::integral_constant<int, 1>{});
}

// dw[kh][kw] += sum_{ho,wo} d[ho][wo] * tile[ho*S + kh][wo*S + kw]   (d rows ld apart; tile
// columns as tile_col places them)
// Every tap has its own accumulator, a dependency chain of one FMA per d vector: a pass keeps the
// taps of as many kernel rows in registers as fit beside d's vector (all 9 of a 3x3 kernel; 4 or
// 2 rows of a 5x5 and 3 or 1 of a 7x7 with AVX-512's 32 or AVX2's 16), reading d once per pass,
// so at least 7 chains are in flight.
template <int K, int S, typename A>
void wgrad_plane(const A* __restrict d, int64_t ld, const A* __restrict tile, const Geom g,
                 double* __restrict dw) {
  const int64_t k = K > 0 ? K : g.k;
  if (K == 0) {  // other kernel sizes: plain loops
    for (int64_t kh = 0; kh < k; ++kh) {
      for (int64_t kw = 0; kw < k; ++kw) {
        A acc = A(0);
        for (int64_t ho = 0; ho < g.Ho; ++ho) {
          const A* r = tile + (ho * S + kh) * g.Wp + tile_col<S>(0, kw, g);
          for (int64_t wo = 0; wo < g.Wo; ++wo) acc += d[ho * ld + wo] * r[wo];
        }
        dw[kh * k + kw] += acc;
      }
    }
    return;
  }
  constexpr int kK = K > 0 ? K : 1;
  constexpr int kAccRegs = simd::kWidth >= 16 ? 24 : 12;  // of 32 or 16 vector registers
  constexpr int kPassRows = std::max(1, std::min(kK, kAccRegs / kK));
  // The last, partial vector of a row keeps only its first `tail` lanes, by selection (not by
  // multiplying with 0, which would turn an inf or NaN beyond the row into NaN).
  const int64_t tail = g.Wo % kLanes;
  Vec<A> lane = {};
  for (int64_t l = 0; l < kLanes; ++l) lane[l] = static_cast<A>(l);
  const auto keep = lane < simd::splat<A>(static_cast<A>(tail));
  const Vec<A> zero = {};
  for (int kh0 = 0; kh0 < kK; kh0 += kPassRows) {
    const int rows = std::min(kPassRows, kK - kh0);
    Vec<A> acc[kPassRows][kK] = {};
    for (int64_t ho = 0; ho < g.Ho; ++ho) {
      const A* dr = d + ho * ld;
      const A* r = tile + (ho * S + kh0) * g.Wp;
      int64_t wo = 0;
      for (; wo + kLanes <= g.Wo; wo += kLanes) {
        const Vec<A> dv = simd::load(dr + wo);
        for (int i = 0; i < kPassRows && i < rows; ++i) {
          for (int kw = 0; kw < kK; ++kw) {
            acc[i][kw] += dv * simd::load(r + i * g.Wp + tile_col<S>(wo, kw, g));
          }
        }
      }
      if (tail) {
        Vec<A> dv = {};
        for (int64_t l = 0; l < tail; ++l) dv[l] = dr[wo + l];
        for (int i = 0; i < kPassRows && i < rows; ++i) {
          for (int kw = 0; kw < kK; ++kw) {
            acc[i][kw] += keep ? dv * simd::load(r + i * g.Wp + tile_col<S>(wo, kw, g)) : zero;
          }
        }
      }
    }
    for (int i = 0; i < rows; ++i) {
      for (int kw = 0; kw < kK; ++kw) dw[(kh0 + i) * k + kw] += simd::sum<A>(acc[i][kw]);
    }
  }
}

// Stride-2 input gradient by scattering into a zero-bordered tile of the input's size:
// tile[ho*2 + kh][wo*2 + kw] += wt[kh][kw] * d[ho][wo], every tile row written whole. Worked
// one tile row at a time and per column parity: tap kw lands on column 2 * (wo + kw / 2) +
// kw % 2, so within the half row of parity kw % 2 the update is contiguous in wo (a plain
// vector multiply-add over the d row), and the two half rows are interleaved into the tile row
// at the end. kK is the kernel size when known at compile time (0: g.k). `half` holds 2 * (Wo +
// p) values.
template <int kK, typename A>
void scatter_stride2(const A* __restrict d, const A* __restrict wt, const Geom g,
                     A* __restrict tile, A* __restrict half) {
  const int64_t k = kK ? kK : g.k, Wh = g.Wo + g.p;
  A* __restrict h0 = half;
  A* __restrict h1 = half + Wh;
  for (int64_t r = 0; r < g.Hp; ++r) {
    std::fill(half, half + 2 * Wh, A(0));
    for (int64_t kh = r % 2; kh < k; kh += 2) {  // rows ho = (r - kh) / 2 reach tile row r
      const int64_t ho = (r - kh) / 2;
      if (ho < 0) break;
      if (ho >= g.Ho) continue;
      const A* __restrict dr = d + ho * g.Wo;
      for (int64_t kw = 0; kw < k; ++kw) {
        const A w = wt[kh * k + kw];
        A* __restrict dst = (kw % 2 ? h1 : h0) + kw / 2;
        for (int64_t wo = 0; wo < g.Wo; ++wo) dst[wo] += w * dr[wo];
      }
    }
    A* __restrict row = tile + r * g.Wp;
    for (int64_t c = 0; c < g.Wp; ++c) row[c] = (c % 2 ? h1 : h0)[c / 2];
  }
}

// Calls f(std::integral_constant<int, K>, std::integral_constant<int, S>) with K in {3, 5, 7}
// (0 = any other size, read at run time) and S in {1, 2}.
template <typename F>
void with_kernel(int64_t k, int64_t s, F&& f) {
  auto strided = [&](auto kc) {
    if (s == 1) {
      f(kc, std::integral_constant<int, 1>{});
    } else {
      f(kc, std::integral_constant<int, 2>{});
    }
  };
  switch (k) {
    case 3: strided(std::integral_constant<int, 3>{}); break;
    case 5: strided(std::integral_constant<int, 5>{}); break;
    case 7: strided(std::integral_constant<int, 7>{}); break;
    default: strided(std::integral_constant<int, 0>{}); break;
  }
}

// BatchNorm's per-channel scale gamma / sqrt(var + eps), in the working type. The forward's and
// the backward's recomputation of y (for the activation's mask) both take it from here.
template <typename A>
A bn_scale(A gamma, A var, A eps) {
  return gamma / std::sqrt(var + eps);
}

// ------------------------------------------------------------------------------------------------
// NCHW flat passes. A task holds an image's plane in a flat buffer padded with zeros to a multiple
// of kLanes; per-channel coefficients are vectors of equal slots.

template <typename A>
void sum_and_square(const A* __restrict v, int64_t len, Vec<A>* s, Vec<A>* q) {
  Vec<A> a = {}, b = {};
  for (int64_t c = 0; c < len; c += kLanes) {
    const Vec<A> x = simd::load(v + c);
    a += x;
    b += x * x;
  }
  *s += a;
  *q += b;
}

// out = act((conv - mean) * scale + beta); out may be conv itself. The backward calls it too, to
// recompute y for the activation's mask: same function, same values, the forward's bits.
template <typename A>
void batch_norm_act(const A* conv, A* out, int64_t len, const Vec<A>* coef, Activation act) {
  // coef: mean, scale, beta
  const Vec<A> mean = coef[0], scale = coef[1], beta = coef[2];
  for (int64_t c = 0; c < len; c += kLanes) {
    simd::store(out + c, simd::activate<A>((simd::load(conv + c) - mean) * scale + beta, act));
  }
}

// s += dz; q += dz * (conv - mean), with dz = grad_y masked by the activation
template <typename A>
void masked_grad_sums(const A* __restrict gy, const A* __restrict y, const A* __restrict cv,
                      int64_t len, const Vec<A>* mean_in, Activation act, Vec<A>* s, Vec<A>* q) {
  const Vec<A> mean = *mean_in;
  Vec<A> a = {}, b = {};
  for (int64_t c = 0; c < len; c += kLanes) {
    const Vec<A> dz = simd::grad_through<A>(simd::load(gy + c), simd::load(y + c), act);
    a += dz;
    b += dz * (simd::load(cv + c) - mean);
  }
  *s += a;
  *q += b;
}

// One row of d(conv) = k_dz * dz + k_conv * (conv - mean) + k_const, written to `out`. The row
// starts at a vector boundary of the flat buffers and may end mid-vector (all slots share their
// coefficients, so the tail uses slot 0 onwards safely).
template <typename A>
void conv_grad_row(const A* __restrict gy, const A* __restrict y, const A* __restrict cv,
                   int64_t len, Activation act, const Vec<A>* coef, A* __restrict out) {
  const Vec<A> k_dz = coef[0], k_conv = coef[1], mean = coef[2], k_const = coef[3];
  int64_t c = 0;
  for (; c + kLanes <= len; c += kLanes) {
    const Vec<A> dz = simd::grad_through<A>(simd::load(gy + c), simd::load(y + c), act);
    simd::store(out + c, k_dz * dz + k_conv * (simd::load(cv + c) - mean) + k_const);
  }
  for (int64_t j = 0; c + j < len; ++j) {
    const A dz = passes_grad(y[c + j], act) ? gy[c + j] : A(0);
    out[c + j] = k_dz[j] * dz + k_conv[j] * (cv[c + j] - mean[j]) + k_const[j];
  }
}

// ------------------------------------------------------------------------------------------------
// NCHW tasks. A task is channel c of group g.

template <typename T, typename A>
struct Problem {
  int64_t N, C, H, W, stride;
  bool batch_stats;
  A eps;
  Activation act;
};

struct Task {
  int64_t c, g;  // channel, group
};

std::vector<Task> make_tasks(const std::vector<Group>& groups) {
  std::vector<Task> tasks;
  for (size_t g = 0; g < groups.size(); ++g) {
    for (int64_t c = 0; c < groups[g].count; ++c) {
      tasks.push_back({groups[g].begin + c, static_cast<int64_t>(g)});
    }
  }
  return tasks;
}

int64_t round_up(int64_t v) { return (v + kLanes - 1) / kLanes * kLanes; }

// Runs f(task) for every task, in parallel. at::parallel_for would give each thread one
// contiguous run of the list, and the list is ordered by group: with kernel sizes 3/5/7 one
// thread got the 3x3 tasks and the other the 7x7 ones. Tasks are instead dealt to threads
// longest first, each to the least loaded thread (cost ~ k^2 + a copy overhead). Each task owns
// its channel, so the results do not depend on the assignment.
template <typename F>
void run_tasks(const std::vector<Task>& tasks, const std::vector<Group>& groups, F&& f) {
  const int64_t count = static_cast<int64_t>(tasks.size());
  const int64_t threads = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), count));
  auto cost = [&](int64_t i) {
    const int64_t k = groups[tasks[i].g].k;
    return k * k + 8;
  };
  std::vector<int64_t> order(count);
  for (int64_t i = 0; i < count; ++i) order[i] = i;
  std::stable_sort(order.begin(), order.end(),
                   [&](int64_t a, int64_t b) { return cost(a) > cost(b); });
  std::vector<std::vector<int64_t>> lists(threads);
  std::vector<int64_t> load(threads, 0);
  for (int64_t i : order) {
    const int64_t th = std::min_element(load.begin(), load.end()) - load.begin();
    lists[th].push_back(i);
    load[th] += cost(i);
  }
  at::parallel_for(0, threads, 1, [&](int64_t b, int64_t e) {
    for (int64_t th = b; th < e; ++th) {
      for (int64_t i : lists[th]) f(tasks[i]);
    }
  });
}

// Image n's plane of the task's channel of an [N, C, H, W] tensor into a buffer whose rows are
// `pitch` apart and start `offset` in (a tile interior, or 0 and W for dense).
template <typename T, typename A>
void gather(const T* src, const Problem<T, A>& pr, int64_t n, const Task& t, int64_t H, int64_t W,
            A* dst, int64_t pitch, int64_t offset) {
  const T* s = src + (n * pr.C + t.c) * H * W;
  for (int64_t h = 0; h < H; ++h) {
    A* d = dst + offset + h * pitch;
    for (int64_t w = 0; w < W; ++w) d[w] = static_cast<A>(s[h * W + w]);
  }
}

// Image n's plane of the task's channel of an [N, C, H, W] tensor into the interior of a
// zero-bordered tile of geometry g, columns as tile_col places them (the border stays zero).
template <typename T, typename A>
void gather_tile(const T* src, const Problem<T, A>& pr, int64_t n, const Task& t, const Geom& g,
                 A* tile) {
  if (g.s == 1) return gather(src, pr, n, t, pr.H, pr.W, tile, g.Wp, g.p * g.Wp + g.p);
  const T* s = src + (n * pr.C + t.c) * pr.H * pr.W;
  for (int64_t h = 0; h < pr.H; ++h) {
    A* row = tile + (h + g.p) * g.Wp;
    const T* in = s + h * pr.W;
    int64_t w = 0;
    if constexpr (std::is_same_v<T, A>) {
      // input columns w = 2j land at tile column 2j + p, w = 2j + 1 at 2j + 1 + p
      A* at_even = row + tile_col<2>(0, g.p, g);
      A* at_odd = row + tile_col<2>(0, g.p + 1, g);
      for (; w + 2 * kLanes <= pr.W; w += 2 * kLanes) {
        const Vec<A> a = simd::load(in + w), b = simd::load(in + w + kLanes);
        simd::store(at_even + w / 2, simd::every_other<0, A>(a, b));
        simd::store(at_odd + w / 2, simd::every_other<1, A>(a, b));
      }
    }
    for (; w < pr.W; ++w) row[tile_col<2>(0, w + g.p, g)] = static_cast<A>(in[w]);
  }
}

// Requests image n's plane of the task's channel (HW values of an [N, C, H, W] tensor) into the
// caches, for reading or (kWrite) writing, while the image before it is worked on; nothing past
// the last image. A plane spans a few pages, and the hardware prefetcher stops at every page
// boundary, so without this each page's first lines wait on memory.
template <bool kWrite, typename T>
HRNAS_INLINE void prefetch_plane(const T* base, int64_t N, int64_t C, int64_t n, int64_t c,
                                 int64_t HW) {
  if (n >= N) return;
  const char* p = reinterpret_cast<const char*>(base + (n * C + c) * HW);
  const int64_t bytes = HW * static_cast<int64_t>(sizeof(T));
  for (int64_t o = 0; o < bytes; o += 64) __builtin_prefetch(p + o, kWrite ? 1 : 0, 3);
}

// The reverse of gather for a dense plane of HW values.
template <typename T, typename A>
void scatter(const A* src, const Problem<T, A>& pr, int64_t n, const Task& t, int64_t HW, T* dst) {
  T* d = dst + (n * pr.C + t.c) * HW;
  for (int64_t i = 0; i < HW; ++i) d[i] = static_cast<T>(src[i]);
}

// The task channel's total of per-slot sums.
template <typename A>
double slot_total(const Vec<A>& slots) {
  double total = 0.0;
  for (int64_t j = 0; j < kLanes; ++j) total += slots[j];
  return total;
}

// The task channel's kernel, [k*k], optionally flipped.
template <typename T, typename A>
const A* task_weights(const Group& grp, const Task& t, const T* w, bool flip, A* wt) {
  const int64_t kk = grp.k * grp.k;
  const T* row = w + (t.c - grp.begin) * kk;
  for (int64_t i = 0; i < kk; ++i) wt[i] = static_cast<A>(row[flip ? kk - 1 - i : i]);
  return wt;
}

template <typename T, typename A>
struct FwdIO {
  const T* x;
  const T* const* w;  // per group, compact rows [A_g, k, k]
  const T* gamma;
  const T* beta;
  const T* rmean;
  const T* rvar;
  T* y;
  T* conv;  // the tape; null with running statistics when the caller keeps none
  A* mean;
  A* var;
};

template <typename T, typename A>
void fwd_task(const Problem<T, A>& pr, const std::vector<Group>& groups, const FwdIO<T, A>& io,
              const Task& t) {
  const Group& grp = groups[t.g];
  const Geom g = make_geom(pr.H, pr.W, grp.k, pr.stride);
  const int64_t HWo = g.Ho * g.Wo, len = round_up(HWo);
  const int64_t tile_size = g.Hp * g.Wp + kTileSlack;
  const A* wt = task_weights(grp, t, io.w[t.g], false, scratch<A>(0, g.k * g.k));
  A* tile = scratch<A>(1, tile_size);
  A* out = scratch<A>(2, len);
  std::fill(tile, tile + tile_size, A(0));
  std::fill(out, out + len, A(0));
  const int64_t c = t.c;
  Vec<A> coef[3] = {};  // mean, scale, beta
  const auto set_stats = [&](A m, A v) {
    io.mean[c] = m;
    io.var[c] = v;
    coef[0] = simd::splat<A>(m);
    coef[1] = simd::splat<A>(bn_scale(static_cast<A>(io.gamma[c]), v, pr.eps));
    coef[2] = simd::splat<A>(static_cast<A>(io.beta[c]));
  };
  // Running statistics are known up front: each plane is normalised right after its conv.
  if (!pr.batch_stats) set_stats(static_cast<A>(io.rmean[c]), static_cast<A>(io.rvar[c]));
  Vec<A> s = {}, q = {};
  for (int64_t n = 0; n < pr.N; ++n) {
    gather_tile(io.x, pr, n, t, g, tile);
    prefetch_plane<false>(io.x, pr.N, pr.C, n + 1, t.c, pr.H * pr.W);
    if (io.conv != nullptr) prefetch_plane<true>(io.conv, pr.N, pr.C, n, t.c, HWo);
    if (!pr.batch_stats) prefetch_plane<true>(io.y, pr.N, pr.C, n, t.c, HWo);
    with_kernel(g.k, g.s, [&](auto K, auto S) {
      correlate_plane<decltype(K)::value, decltype(S)::value>(tile, wt, g, out);
    });
    if (pr.batch_stats) {
      Vec<A> si = {}, qi = {};  // per image, then into the task totals
      sum_and_square(out, len, &si, &qi);
      s += si;
      q += qi;
    }
    if (io.conv != nullptr) scatter(out, pr, n, t, HWo, io.conv);
    if (!pr.batch_stats) {
      batch_norm_act(out, out, len, coef, pr.act);
      scatter(out, pr, n, t, HWo, io.y);
    }
  }
  if (!pr.batch_stats) return;
  const double count = static_cast<double>(pr.N * HWo);
  const double mu = slot_total<A>(s) / count;
  set_stats(static_cast<A>(mu),
            static_cast<A>(std::max(0.0, slot_total<A>(q) / count - mu * mu)));
  for (int64_t n = 0; n < pr.N; ++n) {  // BN + activation from the tape, still in cache
    prefetch_plane<true>(io.y, pr.N, pr.C, n + 1, t.c, HWo);
    gather(io.conv, pr, n, t, g.Ho, g.Wo, out, g.Wo, 0);
    batch_norm_act(out, out, len, coef, pr.act);
    scatter(out, pr, n, t, HWo, io.y);
  }
}

template <typename T, typename A>
struct BwdIO {
  const T* gy;
  const T* x;
  const T* conv;
  const T* const* w;
  const T* gamma;
  const T* beta;
  const A* mean;
  const A* var;
  T* gx;
  T* const* gw;
  T* ggamma;
  T* gbeta;
};

template <typename T, typename A>
void bwd_task(const Problem<T, A>& pr, const std::vector<Group>& groups, const BwdIO<T, A>& io,
              const Task& t) {
  const Group& grp = groups[t.g];
  const Geom g = make_geom(pr.H, pr.W, grp.k, pr.stride);
  const int64_t kk = g.k * g.k, HWo = g.Ho * g.Wo, len = round_up(HWo);
  const double count = static_cast<double>(pr.N * HWo);
  A* gy = scratch<A>(0, len);
  A* y = scratch<A>(1, len);
  A* cv = scratch<A>(2, len);
  std::fill(gy, gy + len, A(0));
  std::fill(cv, cv + len, A(0));
  // y (for the activation's mask) recomputed from the tape as fwd_task made it
  const int64_t c = t.c;
  const Vec<A> mean = simd::splat<A>(io.mean[c]);
  const Vec<A> fwd_coef[3] = {
      mean, simd::splat<A>(bn_scale(static_cast<A>(io.gamma[c]), io.var[c], pr.eps)),
      simd::splat<A>(static_cast<A>(io.beta[c]))};
  auto load_image = [&](int64_t n) {
    gather(io.gy, pr, n, t, g.Ho, g.Wo, gy, g.Wo, 0);
    gather(io.conv, pr, n, t, g.Ho, g.Wo, cv, g.Wo, 0);
    batch_norm_act(cv, y, len, fwd_coef, pr.act);
    prefetch_plane<false>(io.gy, pr.N, pr.C, n + 1, t.c, HWo);
    prefetch_plane<false>(io.conv, pr.N, pr.C, n + 1, t.c, HWo);
  };

  // Pass A: sums of dz and dz * (conv - mean) over the channel.
  Vec<A> s = {}, q = {};
  for (int64_t n = 0; n < pr.N; ++n) {
    load_image(n);
    Vec<A> si = {}, qi = {};
    masked_grad_sums(gy, y, cv, len, &mean, pr.act, &si, &qi);
    s += si;
    q += qi;
  }
  // d(conv) = k_dz * dz + k_conv * (conv - mean) + k_const
  const double sdz = slot_total<A>(s), sdzx = slot_total<A>(q);
  const double rstd = 1.0 / std::sqrt(static_cast<double>(io.var[c]) + pr.eps);
  const double gamma = static_cast<double>(io.gamma[c]);
  io.gbeta[c] = static_cast<T>(sdz);
  io.ggamma[c] = static_cast<T>(sdzx * rstd);
  Vec<A> coef[4] = {simd::splat<A>(static_cast<A>(gamma * rstd)), {}, mean, {}};
  if (pr.batch_stats) {
    coef[1] = simd::splat<A>(static_cast<A>(-gamma * rstd * rstd * rstd * sdzx / count));
    coef[3] = simd::splat<A>(static_cast<A>(-gamma * rstd * sdz / count));
  }

  // Pass B: per image, d(conv) -> weight gradient and input gradient.
  const bool scatter_dx = pr.stride == 2;
  const int64_t dl = scatter_dx ? 0 : g.p;  // stride 1: d(conv) inside a border of p
  const int64_t dpitch = scatter_dx ? g.Wo : g.Wp;
  const int64_t tile_size = g.Hp * g.Wp + kTileSlack;
  const A* wt = task_weights(grp, t, io.w[t.g], !scatter_dx, scratch<A>(3, kk));
  A* dtile = scratch<A>(4, 2 * tile_size);  // d(conv) tile, then the x tile
  A* xtile = dtile + tile_size;
  A* dx = scratch<A>(5, std::max(tile_size, round_up(pr.H * pr.W)));
  std::fill(dtile, dtile + 2 * tile_size, A(0));
  std::vector<double> dw(kk, 0.0);
  for (int64_t n = 0; n < pr.N; ++n) {
    load_image(n);
    for (int64_t ho = 0; ho < g.Ho; ++ho) {
      const int64_t row = ho * g.Wo;
      conv_grad_row(gy + row, y + row, cv + row, g.Wo, pr.act, coef,
                    dtile + (ho + dl) * dpitch + dl);
    }
    gather_tile(io.x, pr, n, t, g, xtile);
    prefetch_plane<false>(io.x, pr.N, pr.C, n + 1, t.c, pr.H * pr.W);
    prefetch_plane<true>(io.gx, pr.N, pr.C, n, t.c, pr.H * pr.W);
    const A* dconv = dtile + dl * dpitch + dl;
    with_kernel(g.k, g.s, [&](auto K, auto S) {
      constexpr int kK = decltype(K)::value, kS = decltype(S)::value;
      wgrad_plane<kK, kS>(dconv, dpitch, xtile, g, dw.data());
      if constexpr (kS == 1) {
        correlate_plane<kK, 1>(dtile, wt, make_geom(g.Ho, g.Wo, g.k, 1), dx);
      } else {
        scatter_stride2<kK>(dconv, wt, g, dx, scratch<A>(6, 2 * (g.Wo + g.p)));
      }
    });
    if (scatter_dx) {
      // the interior of the scatter tile is the input gradient; compact it in place
      for (int64_t h = 0; h < pr.H; ++h) {
        const A* src = dx + (h + g.p) * g.Wp + g.p;
        std::copy(src, src + pr.W, dx + h * pr.W);
      }
    }
    scatter(dx, pr, n, t, pr.H * pr.W, io.gx);
  }
  T* gw = io.gw[t.g] + (c - grp.begin) * kk;
  for (int64_t i = 0; i < kk; ++i) gw[i] = static_cast<T>(dw[i]);
}

// ------------------------------------------------------------------------------------------------
// channels_last: a task is a range of output rows of one image over all channels, worked in
// bands of kBand rows. The task's input rows (with the halo the largest kernel needs) sit in a
// zero-bordered tile whose pixels are contiguous runs of channels, so every load streams along C
// and no per-channel gathers or repacking are needed; the tape is conv in y's own layout. Tile
// rows are made once, as bands need them, so the halo rows bands share are not made twice.
// Each group's channels are padded to a multiple of 8 in the tile and processed in blocks of
// kBlockMax lanes (16, one zmm, under AVX-512; 8, one ymm, below) or 8, so compact inputs of few
// channels per group cost in proportion. BatchNorm sums and weight gradients are per-task
// partials reduced in task order afterwards: deterministic, independent of the thread count.

constexpr int64_t kBand = 8;
constexpr int64_t kBlockMax = simd::kWidth >= 16 ? 16 : 8;

// Channels [c0, c0 + lanes) of group g sit at tile lanes [off, off + width), width kBlockMax or 8.
struct Block {
  int64_t c0, lanes, off, width, g;
};

// Tile pixels hold Cp >= C lanes: every group's channels, each group padded to a multiple of 8
// with lanes that hold none of its channels (zero or, see relayout, a neighbour's values: lanes
// never mix, and only a block's first `lanes` lanes are read back). P is the largest padding
// k / 2; dense means Cp == C (no padding), when tile pixels and tensor pixels have the same
// layout.
struct Layout {
  int64_t C, Cp, P;
  bool dense;
  std::vector<Block> blocks;
  std::vector<int64_t> group_off;
};

Layout make_layout(const std::vector<Group>& groups) {
  Layout lay{0, 0, 0, true, {}, {}};
  for (size_t g = 0; g < groups.size(); ++g) {
    const Group& grp = groups[g];
    lay.group_off.push_back(lay.Cp);
    for (int64_t c = 0; c < grp.count; c += kBlockMax) {
      const int64_t width = grp.count - c > 8 ? kBlockMax : 8;
      lay.blocks.push_back({grp.begin + c, std::min(width, grp.count - c), lay.Cp + c, width,
                            static_cast<int64_t>(g)});
    }
    if (grp.count > 0) lay.P = std::max(lay.P, grp.k / 2);
    lay.Cp += (grp.count + 7) / 8 * 8;
    lay.C += grp.count;
  }
  lay.dense = lay.Cp == lay.C;
  return lay;
}

// npix pixels from tensor layout (C channels each) to tile layout (Cp lanes each), or back.
// A group's channels move in whole vectors of 8: to the tile, the lanes past its channels get the
// tensor's next values; back, a vector's spill past the group lands on channels that the next
// group, or the next pixel, writes afterwards. Where a vector would reach past the range (the
// tensor side's npix pixels), elements move one by one. A copy call per group and pixel cost
// more than the conv for the few channels per group a search leaves alive.
template <bool kToTile, typename T>
void relayout(const T* src, int64_t npix, const Layout& lay, const std::vector<Group>& groups,
              T* dst) {
  if (lay.dense) {
    std::copy(src, src + npix * lay.C, dst);
    return;
  }
  const int64_t sp = kToTile ? lay.C : lay.Cp, dp = kToTile ? lay.Cp : lay.C;
  const int64_t end = npix * lay.C;  // the tensor side's extent
  for (int64_t i = 0; i < npix; ++i) {
    for (size_t g = 0; g < groups.size(); ++g) {
      const int64_t so = i * sp + (kToTile ? groups[g].begin : lay.group_off[g]);
      const int64_t d = i * dp + (kToTile ? lay.group_off[g] : groups[g].begin);
      const int64_t count = groups[g].count, at = kToTile ? so : d;  // tensor-side position
      int64_t l = 0;
      for (; l < count && at + l + 8 <= end; l += 8) storew<8>(dst + d + l, loadw<8>(src + so + l));
      for (; l < count; ++l) dst[d + l] = src[so + l];
    }
  }
}

struct Band {
  int64_t n, ho0, ho1;  // image, output rows [ho0, ho1)
};

// Runs f(task) for tasks [0, nb) in parallel, each thread taking the next task when it is done
// with one: a thread the host preempts (a shared 2-core VM) delays only its current task, where
// at::parallel_for's fixed halves left the other thread waiting at the end. Tasks write only
// their own outputs and partials, so the results do not depend on who ran what.
template <typename F>
void for_each_band(int64_t nb, F&& f) {
  std::atomic<int64_t> next{0};
  const int64_t threads = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), nb));
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    for (int64_t bi; (bi = next.fetch_add(1, std::memory_order_relaxed)) < nb;) f(bi);
  });
}

// The tasks: every image's rows, in two halves when there are at least 4 bands of them (so one
// image still gives two threads work); few tasks keep the halo rows made twice few. The split
// depends on the shape only.
std::vector<Band> make_tasks_nhwc(int64_t N, int64_t Ho) {
  const int64_t parts = Ho >= 4 * kBand ? 2 : 1, rows = (Ho + parts - 1) / parts;
  std::vector<Band> tasks;
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t h = 0; h < Ho; h += rows) tasks.push_back({n, h, std::min(Ho, h + rows)});
  }
  return tasks;
}

// A zero-bordered tile of a task's rows [t0, t1) of a range [0, limit) (zero rows outside it),
// made on demand, band by band: each row is made once, by make(h, first interior element), and
// the rows a band shares with the next stay where they are. Padding lanes (the tile is not
// dense) are zeroed with the row; border columns always.
template <typename T>
struct RowTile {
  T* data;
  int64_t row, interior, limit, t0, made;
  bool dense;

  // Makes rows [n0, n1) (those not made yet) and returns the tile's origin for row n0. Rows
  // before n0 that were never made (bands that read the tensor directly) stay unmade.
  template <typename F>
  const T* rows(int64_t n0, int64_t n1, F&& make) {
    made = std::max(made, n0);
    for (; made < n1; ++made) {
      T* r = data + (made - t0) * row;
      if (made < 0 || made >= limit || !dense) std::fill(r, r + row, T(0));
      if (made >= 0 && made < limit) {
        if (dense) {
          std::fill(r, r + interior, T(0));
          std::fill(r + row - interior, r + row, T(0));
        }
        make(made, r + interior);
      }
    }
    return data + (n0 - t0) * row;
  }
};

// Calls f(std::integral_constant<int, V>) with the block's width.
template <typename F>
void with_width(const Block& b, F&& f) {
  if constexpr (kBlockMax == 16) {
    if (b.width == 16) return f(std::integral_constant<int, 16>{});
  }
  f(std::integral_constant<int, 8>{});
}

// Every block's kernel rows, [k*k][width] (zero in unused lanes), optionally flipped, packed in
// block order, made once per call; block i's start in off[i] (also the layout of the weight
// gradient's per-task partials).
template <typename T>
std::vector<T> block_weights(const Layout& lay, const std::vector<Group>& groups,
                             const T* const* w, bool flip, std::vector<int64_t>& off) {
  off.clear();
  int64_t len = 0;
  for (const Block& b : lay.blocks) {
    off.push_back(len);
    len += groups[b.g].k * groups[b.g].k * b.width;
  }
  std::vector<T> packed(len, T(0));
  for (size_t i = 0; i < lay.blocks.size(); ++i) {
    const Block& b = lay.blocks[i];
    const Group& grp = groups[b.g];
    const int64_t kk = grp.k * grp.k;
    for (int64_t l = 0; l < b.lanes; ++l) {
      const T* row = w[b.g] + (b.c0 - grp.begin + l) * kk;
      T* dst = packed.data() + off[i] + l;
      for (int64_t j = 0; j < kk; ++j) dst[j * b.width] = row[flip ? kk - 1 - j : j];
    }
  }
  return packed;
}

// P neighbouring outputs at once, acc[j] = sum_{kh,kw} wt[kh][kw][:] * in[kh][(j*S + kw)][:]
// (in at the first output's window, rows in_row apart, pixels `pitch` apart), from one window of
// input pixels per kernel row, so each loaded input pixel serves up to K taps. The P sums are
// independent chains of K*K FMAs: the FMA units (two, 4 cycles deep, on the machines we measured)
// need 8 in flight to run at throughput, which AVX-512's 32 registers hold beside a 7x7 window
// (AVX2's 16 hold 4).
template <int K, int S, int V, int P, typename T>
HRNAS_INLINE void correlate_pixels(const T* __restrict in, int64_t in_row, const T* __restrict wt,
                                   int64_t pitch, VecW<T, V>* __restrict acc) {
  using W = VecW<T, V>;
  constexpr int kWin = S * (P - 1) + K;
  for (int j = 0; j < P; ++j) acc[j] = W{};
  for (int64_t kh = 0; kh < K; ++kh) {
    const T* xr = in + kh * in_row;
    W win[kWin];
    for (int i = 0; i < kWin; ++i) win[i] = loadw<V>(xr + i * pitch);
    for (int kw = 0; kw < K; ++kw) {
      const W wv = loadw<V>(wt + (kh * K + kw) * V);
      for (int j = 0; j < P; ++j) acc[j] += wv * win[j * S + kw];
    }
  }
}

// Output pixels per step of correlate_nhwc's widest pass (see correlate_pixels).
constexpr int kPixWide = simd::kWidth >= 16 ? 8 : kPix;

// One output pixel: the sum over kh < k and kw in [kw0, kw1) of wt[kh][kw][:] times the input
// pixel at column c0 + kw of row kh (rows in_row apart from `in`, pixels `pitch` apart).
template <int K, int V, typename T>
HRNAS_INLINE VecW<T, V> correlate_pixel(const T* __restrict in, int64_t in_row,
                                        const T* __restrict wt, int64_t k, int64_t c0,
                                        int64_t kw0, int64_t kw1, int64_t pitch) {
  VecW<T, V> acc = {};
  for (int64_t kh = 0; kh < (K > 0 ? K : k); ++kh) {
    const T* xr = in + kh * in_row + c0 * pitch;
    for (int64_t kw = kw0; kw < kw1; ++kw)
      acc += loadw<V>(wt + (kh * k + kw) * V) * loadw<V>(xr + kw * pitch);
  }
  return acc;
}

// s[l] += sa[l], q[l] += sq[l] for l < lanes: a call's BatchNorm sums, kept in registers.
template <typename Wv>
void add_sums(const Wv& sa, const Wv& sq, int64_t lanes, double* __restrict s,
              double* __restrict q) {
  for (int64_t l = 0; l < lanes; ++l) {
    s[l] += sa[l];
    q[l] += sq[l];
  }
}

// out[r][wo][:V] = sum_{kh,kw} wt[kh][kw][:] * in[r*S + kh][wo*S + kw][:]  for r < R, wo < Wo.
// Pixels are `pitch` elements apart in `in` and `out`, rows in_row and Wo * pitch apart. A row's
// outputs go kPixWide at a time, then kPix, then one by one (correlate_pixels). With kSums, also
// s[l] += sum of out[..][l] and q[l] += sum of its squares for l < lanes (the BatchNorm sums,
// from registers: no second read).
template <int K, int S, int V, bool kSums, typename T>
void correlate_nhwc(const T* __restrict in, int64_t in_row, const T* __restrict wt, int64_t k_rt,
                    int64_t R, int64_t Wo, int64_t pitch, T* __restrict out, int64_t lanes = 0,
                    double* __restrict s = nullptr, double* __restrict q = nullptr) {
  using W = VecW<T, V>;
  const int64_t k = K > 0 ? K : k_rt;
  W sa = {}, sq = {};
  for (int64_t r = 0; r < R; ++r) {
    T* o = out + r * Wo * pitch;
    const T* xr = in + r * S * in_row;
    int64_t wo = 0;
    if constexpr (K > 0) {
      const auto pass = [&](auto Pc) {
        constexpr int P = decltype(Pc)::value;
        for (; wo + P <= Wo; wo += P) {
          W acc[P];
          correlate_pixels<K, S, V, P>(xr + wo * S * pitch, in_row, wt, pitch, acc);
          for (int j = 0; j < P; ++j) {
            storew<V>(o + (wo + j) * pitch, acc[j]);
            if constexpr (kSums) {
              sa += acc[j];
              sq += acc[j] * acc[j];
            }
          }
        }
      };
      if constexpr (kPixWide > kPix) pass(std::integral_constant<int, kPixWide>{});
      pass(std::integral_constant<int, kPix>{});
    }
    for (; wo < Wo; ++wo) {
      const W acc = correlate_pixel<K, V>(xr, in_row, wt, k, wo * S, 0, k, pitch);
      storew<V>(o + wo * pitch, acc);
      if constexpr (kSums) {
        sa += acc;
        sq += acc * acc;
      }
    }
  }
  if constexpr (kSums) add_sums(sa, sq, lanes, s, q);
}

// The output columns [first, last) whose taps (a kernel of k = 2p + 1, stride S) all lie inside
// an input row of W pixels; the columns before and after are the edges, whose windows reach past
// it (correlate_nhwc_edge, wgrad_nhwc_edge).
struct InsideColumns {
  int64_t first, last;
};

inline InsideColumns inside_columns(int64_t p, int64_t S, int64_t W, int64_t Wo) {
  const int64_t first = std::min((p + S - 1) / S, Wo);
  return {first, std::max(first, std::min(Wo, (W - 1 - p) / S + 1))};
}

// The outputs [w0, w1) of rows r < R whose windows reach past the image's left or right edge
// (taps outside columns [0, W) read zero), straight from the tensor: `in` is the input row of
// output row 0's first tap row (all k of each output's tap rows inside the image), pixels `pitch`
// apart, rows in_row apart; `out` output row 0, rows Wo * pitch apart. With kSums, the BatchNorm
// sums as correlate_nhwc's.
template <int K, int S, int V, bool kSums, typename T>
void correlate_nhwc_edge(const T* __restrict in, int64_t in_row, const T* __restrict wt,
                         int64_t k_rt, int64_t R, int64_t W, int64_t w0, int64_t w1, int64_t Wo,
                         int64_t pitch, T* __restrict out, int64_t lanes, double* __restrict s,
                         double* __restrict q) {
  const int64_t k = K > 0 ? K : k_rt, p = k / 2;
  VecW<T, V> sa = {}, sq = {};
  for (int64_t r = 0; r < R; ++r) {
    for (int64_t wo = w0; wo < w1; ++wo) {
      const int64_t c0 = wo * S - p;  // the column of tap kw = 0
      const auto acc = correlate_pixel<K, V>(in + r * S * in_row, in_row, wt, k, c0,
                                             std::max<int64_t>(0, -c0),
                                             std::min<int64_t>(k, W - c0), pitch);
      storew<V>(out + (r * Wo + wo) * pitch, acc);
      if constexpr (kSums) {
        sa += acc;
        sq += acc * acc;
      }
    }
  }
  if constexpr (kSums) add_sums(sa, sq, lanes, s, q);
}

// dw[kh][kw][:V] += sum_{r<R, wo<Wo} d[r][wo][:] * in[r*S + kh][wo*S + kw][:]
// (pixels `pitch` apart in both, rows d_row and in_row apart). Sums of one band run in T.
// The band's tiles live in L2, not L1, so loads are what costs, and a tap's accumulator takes
// kPix dependent FMAs per step: a pass keeps as many kernel rows' taps in registers as fit
// beside the kPix d pixels (AVX2: all 9 of a 3x3 kernel, 2 rows of a 5x5, 1 of a 7x7; AVX-512
// twice the registers), reading each d pixel once per pass.
template <int K, int S, int V, typename T>
void wgrad_nhwc(const T* __restrict d, int64_t d_row, const T* __restrict in, int64_t in_row,
                int64_t k_rt, int64_t R, int64_t Wo, int64_t pitch, double* __restrict dw) {
  using W = VecW<T, V>;
  constexpr int kAccRegs = simd::kWidth >= 16 ? 26 : 10;  // of 32 or 16 vector registers
  constexpr int kRows = K > 0 ? std::max(1, std::min(K, kAccRegs / K)) : 1;  // per pass
  constexpr int kAcc = K > 0 ? K : 1;
  const int64_t k = K > 0 ? K : k_rt;
  for (int64_t kh0 = 0; kh0 < k; kh0 += kRows) {
    for (int64_t kw0 = 0; kw0 < k; kw0 += kAcc) {  // K > 0: one pass over all kw
      W acc[kRows][kAcc] = {};
      for (int64_t r = 0; r < R; ++r) {
        const T* dr = d + r * d_row;
        const T* xr = in + (r * S + kh0) * in_row + kw0 * pitch;
        int64_t wo = 0;
        if constexpr (K > 0) {
          constexpr int kWin = S * (kPix - 1) + K;
          for (; wo + kPix <= Wo; wo += kPix) {
            W dv[kPix];
            for (int q = 0; q < kPix; ++q) dv[q] = loadw<V>(dr + (wo + q) * pitch);
            for (int kh = 0; kh < kRows && kh0 + kh < k; ++kh) {
              W win[kWin];
              for (int i = 0; i < kWin; ++i) {
                win[i] = loadw<V>(xr + kh * in_row + (wo * S + i) * pitch);
              }
              for (int kw = 0; kw < K; ++kw) {
                for (int q = 0; q < kPix; ++q) acc[kh][kw] += dv[q] * win[q * S + kw];
              }
            }
          }
        }
        for (; wo < Wo; ++wo) {
          const W dv = loadw<V>(dr + wo * pitch);
          for (int kh = 0; kh < kRows && kh0 + kh < k; ++kh) {
            for (int kw = 0; kw < kAcc; ++kw) {
              acc[kh][kw] += dv * loadw<V>(xr + kh * in_row + (wo * S + kw) * pitch);
            }
          }
        }
      }
      for (int kh = 0; kh < kRows && kh0 + kh < k; ++kh) {
        for (int kw = 0; kw < kAcc; ++kw) {
          for (int l = 0; l < V; ++l) dw[((kh0 + kh) * k + kw0 + kw) * V + l] += acc[kh][kw][l];
        }
      }
    }
  }
}

// wgrad_nhwc's sums over the outputs [w0, w1) of rows r < R whose windows reach past the
// image's left or right edge (taps outside columns [0, W) add nothing), `in` as
// correlate_nhwc_edge's: the tensor's row of output row 0's first tap row.
template <int K, int S, int V, typename T>
void wgrad_nhwc_edge(const T* __restrict d, int64_t d_row, const T* __restrict in,
                     int64_t in_row, int64_t k_rt, int64_t R, int64_t W, int64_t w0, int64_t w1,
                     int64_t pitch, double* __restrict dw) {
  using Wv = VecW<T, V>;
  const int64_t k = K > 0 ? K : k_rt, p = k / 2;
  if (w0 >= w1) return;
  Wv fixed[K > 0 ? K * K : 1];  // the taps' sums (runtime kernel sizes: on the heap)
  std::vector<Wv> dynamic(K > 0 ? 0 : k * k);
  Wv* acc = K > 0 ? fixed : dynamic.data();
  for (int64_t t = 0; t < k * k; ++t) acc[t] = Wv{};
  for (int64_t r = 0; r < R; ++r) {
    for (int64_t wo = w0; wo < w1; ++wo) {
      const Wv dv = loadw<V>(d + r * d_row + wo * pitch);
      const int64_t c0 = wo * S - p;
      const int64_t kw0 = std::max<int64_t>(0, -c0), kw1 = std::min<int64_t>(k, W - c0);
      for (int64_t kh = 0; kh < k; ++kh) {
        const T* xr = in + (r * S + kh) * in_row + c0 * pitch;
        for (int64_t kw = kw0; kw < kw1; ++kw) acc[kh * k + kw] += dv * loadw<V>(xr + kw * pitch);
      }
    }
  }
  for (int64_t t = 0; t < k * k; ++t) {
    for (int l = 0; l < V; ++l) dw[t * V + l] += acc[t][l];
  }
}

// Stride-2 input gradient of one block, gathered: every input pixel sums the output pixels that
// read it, dx[h][w][:] = sum of wt[kh][kw][:] * d[(h + p - kh) / 2][(w + p - kw) / 2][:] over the
// taps with h + p - kh and w + p - kw even, and is written once (no read-modify-write of a
// scratch image, which for wide rows of many channels outgrew the caches). The taps' parities
// follow those of h + p and w + p, so each of the four parity classes gets its own unrolled tap
// list: QH, QW are the smallest kh, kw of the class, and dr0 points at the output pixel they read.
template <int K, int V, int QH, int QW, typename T>
HRNAS_INLINE VecW<T, V> gather_taps2(const T* __restrict dr0, int64_t d_row, int64_t pitch,
                                     const T* __restrict wt) {
  VecW<T, V> acc = {};
  for (int i = 0; QH + 2 * i < K; ++i) {
    for (int j = 0; QW + 2 * j < K; ++j) {
      acc += loadw<V>(wt + ((QH + 2 * i) * K + QW + 2 * j) * V) *
             loadw<V>(dr0 - i * d_row - j * pitch);
    }
  }
  return acc;
}

// Input rows [h0, h1), all W columns, into dx (rows dx_row apart, pixels `pitch` apart). d is
// the block's output row ho_base at column 0 of a zero-bordered tile that holds every output
// pixel the rows read (rows d_row apart, pixels `pitch` apart).
template <int K, int V, typename T>
void gather_stride2_nhwc(const T* __restrict d, int64_t ho_base, int64_t d_row,
                         const T* __restrict wt, int64_t k_rt, int64_t h0, int64_t h1, int64_t W,
                         int64_t pitch, T* __restrict dx, int64_t dx_row) {
  using Wv = VecW<T, V>;
  const int64_t k = K > 0 ? K : k_rt, p = k / 2;
  for (int64_t h = h0; h < h1; ++h) {
    T* o = dx + (h - h0) * dx_row;
    const int64_t qh = (h + p) & 1;
    const T* dr = d + ((h + p - qh) / 2 - ho_base) * d_row;  // output row of tap kh = qh
    if constexpr (K > 0) {
      constexpr int kP = K / 2;
      // w + p even: taps kw = 0, 2, ..; odd: kw = 1, 3, ..; the tap kw = q reads column
      // (w + p - q) / 2.
      auto pixel = [&](int64_t w, auto QH, auto QW) {
        const T* at = dr + (w + kP - decltype(QW)::value) / 2 * pitch;
        storew<V>(o + w * pitch, gather_taps2<K, V, decltype(QH)::value, decltype(QW)::value>(
                                     at, d_row, pitch, wt));
      };
      const std::integral_constant<int, kP % 2> even;
      const std::integral_constant<int, 1 - kP % 2> odd;
      auto row = [&](auto QH) {
        int64_t w = 0;
        for (; w + 2 <= W; w += 2) {
          pixel(w, QH, even);
          pixel(w + 1, QH, odd);
        }
        if (w < W) pixel(w, QH, even);
      };
      if (qh == 0) {
        row(std::integral_constant<int, 0>{});
      } else {
        row(std::integral_constant<int, 1>{});
      }
    } else {
      for (int64_t w = 0; w < W; ++w) {
        const int64_t qw = (w + p) & 1;
        const T* at = dr + (w + p - qw) / 2 * pitch;
        Wv acc = {};
        for (int64_t i = 0; qh + 2 * i < k; ++i) {
          for (int64_t j = 0; qw + 2 * j < k; ++j) {
            acc += loadw<V>(wt + ((qh + 2 * i) * k + qw + 2 * j) * V) *
                   loadw<V>(at - i * d_row - j * pitch);
          }
        }
        storew<V>(o + w * pitch, acc);
      }
    }
  }
}

// Element-wise passes over tensor pixels of C channels. Per-channel coefficients are repeated
// over kLanes pixels (a period of kLanes * C elements, a whole number of vectors), so one vector
// loop serves any C; only the last, partial vector of a run is scalar.

// The pre-activation (conv - mean) * scale + beta of a vector at conv[i] (period position j) and
// of one element: the forward's y and the backward's recomputed y (for the activation's mask)
// both come from here, so they are the same bits.
template <typename T>
HRNAS_INLINE Vec<T> bn_vec(const T* conv, const T* mean, const T* scale, const T* beta, int64_t i,
                           int64_t j) {
  return (simd::load(conv + i) - simd::load(mean + j)) * simd::load(scale + j) +
         simd::load(beta + j);
}

template <typename T>
HRNAS_INLINE T bn_one(const T* conv, const T* mean, const T* scale, const T* beta, int64_t i,
                      int64_t j) {
  return (conv[i] - mean[j]) * scale[j] + beta[j];
}

// dz = grad_y through the activation, its mask from y recomputed by bn_vec / bn_one with the
// forward's coefficients (a vector at i, period position j, and one element)
template <typename T>
HRNAS_INLINE Vec<T> dz_vec(const T* gy, const T* conv, const T* mean, const T* scale,
                           const T* beta, int64_t i, int64_t j, Activation act) {
  const Vec<T> y = simd::activate<T>(bn_vec(conv, mean, scale, beta, i, j), act);
  return simd::grad_through<T>(simd::load(gy + i), y, act);
}

template <typename T>
HRNAS_INLINE T dz_one(const T* gy, const T* conv, const T* mean, const T* scale, const T* beta,
                      int64_t i, int64_t j, Activation act) {
  return passes_grad(activate(bn_one(conv, mean, scale, beta, i, j), act), act) ? gy[i] : T(0);
}

// y = act((conv - mean) * scale + beta)
template <typename T>
void bn_act_nhwc(const T* __restrict conv, int64_t len, const T* __restrict coef, int64_t period,
                 Activation act, T* __restrict y) {
  const T *mean = coef, *scale = coef + period, *beta = coef + 2 * period;
  for (int64_t i0 = 0; i0 < len; i0 += period) {
    const int64_t n = std::min(period, len - i0);
    int64_t j = 0;
    for (; j + kLanes <= n; j += kLanes) {
      simd::store(y + i0 + j, simd::activate<T>(bn_vec(conv, mean, scale, beta, i0 + j, j), act));
    }
    for (; j < n; ++j) y[i0 + j] = activate(bn_one(conv, mean, scale, beta, i0 + j, j), act);
  }
}

// s[j] += dz, q[j] += dz * (conv - mean) at period position j (dz: see dz_vec)
template <typename T>
void grad_sums_nhwc(const T* __restrict gy, const T* __restrict conv, int64_t len,
                    const T* __restrict fwd_coef, int64_t period, Activation act, T* __restrict s,
                    T* __restrict q) {
  const T *mean = fwd_coef, *scale = fwd_coef + period, *beta = fwd_coef + 2 * period;
  for (int64_t i0 = 0; i0 < len; i0 += period) {
    const int64_t n = std::min(period, len - i0);
    int64_t j = 0;
    for (; j + kLanes <= n; j += kLanes) {
      const Vec<T> dz = dz_vec(gy, conv, mean, scale, beta, i0 + j, j, act);
      simd::store(s + j, simd::load(s + j) + dz);
      const Vec<T> centred = simd::load(conv + i0 + j) - simd::load(mean + j);
      simd::store(q + j, simd::load(q + j) + dz * centred);
    }
    for (; j < n; ++j) {
      const T dz = dz_one(gy, conv, mean, scale, beta, i0 + j, j, act);
      s[j] += dz;
      q[j] += dz * (conv[i0 + j] - mean[j]);
    }
  }
}

// d(conv) = k_dz * dz + k_conv * (conv - mean) + k_const (dz: see dz_vec)
template <typename T>
void conv_grad_nhwc(const T* __restrict gy, const T* __restrict conv, int64_t len,
                    const T* __restrict coef, int64_t period, Activation act, T* __restrict out) {
  const T *mean = coef, *scale = coef + period, *beta = coef + 2 * period;
  const T *k_dz = coef + 3 * period, *k_conv = coef + 4 * period, *k_const = coef + 5 * period;
  for (int64_t i0 = 0; i0 < len; i0 += period) {
    const int64_t n = std::min(period, len - i0);
    int64_t j = 0;
    for (; j + kLanes <= n; j += kLanes) {
      const Vec<T> dz = dz_vec(gy, conv, mean, scale, beta, i0 + j, j, act);
      simd::store(out + i0 + j,
                  simd::load(k_dz + j) * dz +
                      simd::load(k_conv + j) * (simd::load(conv + i0 + j) - simd::load(mean + j)) +
                      simd::load(k_const + j));
    }
    for (; j < n; ++j) {
      const T dz = dz_one(gy, conv, mean, scale, beta, i0 + j, j, act);
      out[i0 + j] = k_dz[j] * dz + k_conv[j] * (conv[i0 + j] - mean[j]) + k_const[j];
    }
  }
}

// Per-channel values -> `count` coefficient arrays of one period each.
template <typename T>
std::vector<T> periodic(const std::vector<std::vector<double>>& values, int64_t C) {
  const int64_t period = kLanes * C;
  std::vector<T> out(values.size() * period);
  T* o = out.data();
  for (const std::vector<double>& v : values) {  // kLanes copies of v (no modulo per element)
    for (int64_t i = 0; i < kLanes; ++i, o += C) {
      for (int64_t c = 0; c < C; ++c) o[c] = static_cast<T>(v[c]);
    }
  }
  return out;
}

struct NhwcShape {
  int64_t N, C, H, W, stride, Ho, Wo;
};

template <typename T>
void fwd_nhwc(const NhwcShape& sh, const std::vector<Group>& groups, const FwdIO<T, T>& io,
              bool batch_stats, double eps, Activation act) {
  const Layout lay = make_layout(groups);
  const std::vector<Band> bands = make_tasks_nhwc(sh.N, sh.Ho);
  const int64_t nb = static_cast<int64_t>(bands.size()), C = sh.C, S = sh.stride;
  const int64_t x_row = (sh.W + 2 * lay.P) * lay.Cp;
  const int64_t period = kLanes * C;
  std::vector<double> part(nb * 2 * C, 0.0);  // per task: sums, sums of squares
  const double count = static_cast<double>(sh.N * sh.Ho * sh.Wo);
  // mean, scale, beta per channel, one period each (periodic), from the batch's statistics (the
  // sums in part) or the running ones
  const auto coefficients = [&]() {
    std::vector<std::vector<double>> coef(3, std::vector<double>(C));
    for (int64_t c = 0; c < C; ++c) {
      double m, v;
      if (batch_stats) {
        double s = 0.0, q = 0.0;
        for (int64_t bi = 0; bi < nb; ++bi) {
          s += part[bi * 2 * C + c];
          q += part[(bi * 2 + 1) * C + c];
        }
        m = s / count;
        v = std::max(0.0, q / count - m * m);
      } else {
        m = io.rmean[c];
        v = io.rvar[c];
      }
      io.mean[c] = static_cast<T>(m);
      io.var[c] = static_cast<T>(v);
      coef[0][c] = static_cast<T>(m);
      coef[1][c] = bn_scale(static_cast<T>(io.gamma[c]), static_cast<T>(v), static_cast<T>(eps));
      coef[2][c] = io.beta[c];
    }
    return periodic<T>(coef, C);
  };
  // Running statistics are known before the conv: each band is normalised right after it is
  // convolved, while its conv rows are still in cache. Batch statistics need every band first.
  const std::vector<T> pc_eval = batch_stats ? std::vector<T>() : coefficients();
  std::vector<int64_t> w_off;
  const std::vector<T> wts = block_weights(lay, groups, io.w, false, w_off);
  for_each_band(nb, [&](int64_t bi) {
    const Band& task = bands[bi];
    const T* img = io.x + task.n * sh.H * sh.W * C;
    const int64_t t0 = task.ho0 * S - lay.P, t1 = (task.ho1 - 1) * S + lay.P + 1;
    RowTile<T> tile{scratch<T>(0, (t1 - t0) * x_row), x_row, lay.P * lay.Cp, sh.H, t0, t0,
                    lay.dense};
    for (int64_t ho0 = task.ho0; ho0 < task.ho1; ho0 += kBand) {
      const Band b{task.n, ho0, std::min(task.ho1, ho0 + kBand)};
      const int64_t R = b.ho1 - b.ho0, npix = R * sh.Wo;
      const int64_t h0 = b.ho0 * S - lay.P, h1 = (b.ho1 - 1) * S + lay.P + 1;
      // A band whose tap rows all lie inside the image (dense layout) reads the tensor itself:
      // each block's outputs whose windows stay inside the row too go through correlate_nhwc,
      // the few at the left and right edges through correlate_nhwc_edge. Copying the rows into
      // the zero-bordered tile first cost 15% of the forward (N=8, C=96, 56x56, 3/5/7).
      const bool direct = lay.dense && h0 >= 0 && h1 <= sh.H;
      const T* xt = direct ? nullptr
                           : tile.rows(h0, h1, [&](int64_t h, T* dst) {
                               relayout<true>(img + h * sh.W * C, sh.W, lay, groups, dst);
                             });
      const int64_t o = (b.n * sh.Ho + b.ho0) * sh.Wo * C;
      T* conv = io.conv != nullptr ? io.conv + o : scratch<T>(3, npix * C);
      T* out = lay.dense ? conv : scratch<T>(1, npix * lay.Cp);
      for (size_t i = 0; i < lay.blocks.size(); ++i) {
        const Block& blk = lay.blocks[i];
        const Group& grp = groups[blk.g];
        const int64_t p = grp.k / 2;
        const T* wt = wts.data() + w_off[i];
        double* bs = &part[bi * 2 * C + blk.c0];
        double* bq = &part[(bi * 2 + 1) * C + blk.c0];
        with_kernel(grp.k, S, [&](auto K, auto Sc) {
          with_width(blk, [&](auto V) {
            constexpr int kK = decltype(K)::value, kS = decltype(Sc)::value;
            constexpr int kV = decltype(V)::value;
            if (!direct) {
              const T* in = xt + (lay.P - p) * x_row + (lay.P - p) * lay.Cp + blk.off;
              correlate_nhwc<kK, kS, kV, true>(in, x_row, wt, grp.k, R, sh.Wo, lay.Cp,
                                               out + blk.off, blk.lanes, bs, bq);
              return;
            }
            const auto [wl, wr] = inside_columns(p, S, sh.W, sh.Wo);
            const T* rows = img + (b.ho0 * S - p) * sh.W * C + blk.off;
            const int64_t in_row = sh.W * C;
            correlate_nhwc_edge<kK, kS, kV, true>(rows, in_row, wt, grp.k, R, sh.W, 0, wl, sh.Wo,
                                                  C, out + blk.off, blk.lanes, bs, bq);
            for (int64_t r = 0; r < R; ++r) {  // one call per row: out's rows are Wo apart
              correlate_nhwc<kK, kS, kV, true>(rows + r * S * in_row + (wl * S - p) * C, in_row,
                                               wt, grp.k, 1, wr - wl, C,
                                               out + (r * sh.Wo + wl) * C + blk.off, blk.lanes,
                                               bs, bq);
            }
            correlate_nhwc_edge<kK, kS, kV, true>(rows, in_row, wt, grp.k, R, sh.W, wr, sh.Wo,
                                                  sh.Wo, C, out + blk.off, blk.lanes, bs, bq);
          });
        });
      }
      if (!lay.dense) relayout<false>(out, npix, lay, groups, conv);
      if (!batch_stats) bn_act_nhwc(conv, npix * C, pc_eval.data(), period, act, io.y + o);
    }
  });
  if (!batch_stats) return;
  const std::vector<T> pc = coefficients();
  for_each_band(nb, [&](int64_t bi) {
    const Band& b = bands[bi];
    const int64_t o = (b.n * sh.Ho + b.ho0) * sh.Wo * C;
    bn_act_nhwc(io.conv + o, (b.ho1 - b.ho0) * sh.Wo * C, pc.data(), period, act, io.y + o);
  });
}

template <typename T>
void bwd_nhwc(const NhwcShape& sh, const std::vector<Group>& groups, const BwdIO<T, T>& io,
              bool batch_stats, double eps, Activation act) {
  const Layout lay = make_layout(groups);
  const std::vector<Band> bands = make_tasks_nhwc(sh.N, sh.Ho);
  const int64_t nb = static_cast<int64_t>(bands.size()), C = sh.C, S = sh.stride, P = lay.P;
  const int64_t period = kLanes * C;
  // Pass A: per band, per channel sums of dz and dz * (conv - mean). The forward's coefficients
  // (mean, scale, beta; as fwd_nhwc makes them) recompute y for the activation's mask.
  std::vector<std::vector<double>> coef(6, std::vector<double>(C, 0.0));
  for (int64_t c = 0; c < C; ++c) {
    coef[0][c] = io.mean[c];
    coef[1][c] = bn_scale(static_cast<T>(io.gamma[c]), static_cast<T>(io.var[c]),
                          static_cast<T>(eps));
    coef[2][c] = io.beta[c];
  }
  const std::vector<T> pfwd = periodic<T>({coef[0], coef[1], coef[2]}, C);
  std::vector<T> part(nb * 2 * C);
  for_each_band(nb, [&](int64_t bi) {
    const Band& b = bands[bi];
    const int64_t o = (b.n * sh.Ho + b.ho0) * sh.Wo * C;
    T* s = scratch<T>(0, 2 * period);
    T* q = s + period;
    std::fill(s, s + 2 * period, T(0));
    grad_sums_nhwc(io.gy + o, io.conv + o, (b.ho1 - b.ho0) * sh.Wo * C, pfwd.data(), period,
                   act, s, q);
    for (int64_t c = 0; c < C; ++c) {
      T a = T(0), bq = T(0);
      for (int64_t i = 0; i < kLanes; ++i) {
        a += s[i * C + c];
        bq += q[i * C + c];
      }
      part[bi * 2 * C + c] = a;
      part[(bi * 2 + 1) * C + c] = bq;
    }
  });
  const double count = static_cast<double>(sh.N * sh.Ho * sh.Wo);
  // coef: mean, scale, beta, k_dz, k_conv, k_const
  for (int64_t c = 0; c < C; ++c) {
    double sdz = 0.0, sdzx = 0.0;
    for (int64_t bi = 0; bi < nb; ++bi) {
      sdz += part[bi * 2 * C + c];
      sdzx += part[(bi * 2 + 1) * C + c];
    }
    const double rstd = 1.0 / std::sqrt(static_cast<double>(io.var[c]) + eps);
    const double gamma = static_cast<double>(io.gamma[c]);
    io.gbeta[c] = static_cast<T>(sdz);
    io.ggamma[c] = static_cast<T>(sdzx * rstd);
    coef[3][c] = gamma * rstd;
    if (batch_stats) {
      coef[4][c] = -gamma * rstd * rstd * rstd * sdzx / count;
      coef[5][c] = -gamma * rstd * sdz / count;
    }
  }
  const std::vector<T> pc = periodic<T>(coef, C);
  // Pass B: per band, d(conv) on the band's rows and a halo of P rows (zero-bordered tile),
  // then the weight gradient (band rows only; x from a tile as the forward's, or, in bands whose
  // tap rows lie inside the image, from a dense x itself) and the input gradient of the band's
  // input rows.
  // Kernels flipped for the stride-1 input gradient (a correlation), unflipped for stride 2's
  // gather; block i's kernel and its part of a task's weight-gradient partial start at w_off[i].
  std::vector<int64_t> w_off;
  const std::vector<T> wts = block_weights(lay, groups, io.w, S == 1, w_off);
  const int64_t wlen = static_cast<int64_t>(wts.size());
  std::vector<double> wpart(nb * wlen, 0.0);
  const int64_t x_row = (sh.W + 2 * P) * lay.Cp, d_row = (sh.Wo + 2 * P) * lay.Cp;
  for_each_band(nb, [&](int64_t bi) {
    const Band& task = bands[bi];
    const T* img = io.x + task.n * sh.H * sh.W * C;
    // d(conv) tile: output rows [ho0 - P, ho1 + P), columns [-P, Wo + P); x tile as forward
    const int64_t dt0 = task.ho0 - P, dt1 = task.ho1 + P;
    const int64_t x0 = task.ho0 * S - P, x1 = (task.ho1 - 1) * S + P + 1;
    RowTile<T> dtile{scratch<T>(0, (dt1 - dt0) * d_row), d_row, P * lay.Cp, sh.Ho, dt0, dt0,
                     lay.dense};
    RowTile<T> xtile{scratch<T>(2, (x1 - x0) * x_row), x_row, P * lay.Cp, sh.H, x0, x0,
                     lay.dense};
    T* row = scratch<T>(1, sh.Wo * C);
    for (int64_t ho0 = task.ho0; ho0 < task.ho1; ho0 += kBand) {
      const Band b{task.n, ho0, std::min(task.ho1, ho0 + kBand)};
      const int64_t R = b.ho1 - b.ho0;
      const T* dt = dtile.rows(b.ho0 - P, b.ho1 + P, [&](int64_t ho, T* dst) {
        const int64_t o = (b.n * sh.Ho + ho) * sh.Wo * C;
        conv_grad_nhwc(io.gy + o, io.conv + o, sh.Wo * C, pc.data(), period, act,
                       lay.dense ? dst : row);
        if (!lay.dense) relayout<true>(row, sh.Wo, lay, groups, dst);
      });
      // as the forward: a band whose tap rows lie inside the image reads a dense x directly
      const int64_t h0 = b.ho0 * S - P, h1 = (b.ho1 - 1) * S + P + 1;
      const bool direct = lay.dense && h0 >= 0 && h1 <= sh.H;
      const T* xt = direct ? nullptr : xtile.rows(h0, h1, [&](int64_t h, T* dst) {
        relayout<true>(img + h * sh.W * C, sh.W, lay, groups, dst);
      });
      // input rows [hx0, hx1) of this band's input gradient
      const int64_t hx0 = b.ho0 * S, hx1 = std::min(sh.H, b.ho1 * S);
      T* gx = io.gx + (b.n * sh.H + hx0) * sh.W * C;
      T* dx = lay.dense ? gx : scratch<T>(3, (hx1 - hx0) * sh.W * lay.Cp);
      for (size_t i = 0; i < lay.blocks.size(); ++i) {
        const Block& blk = lay.blocks[i];
        const Group& grp = groups[blk.g];
        const int64_t p = grp.k / 2;
        const T* wt = wts.data() + w_off[i];
        const T* d = dt + P * d_row + P * lay.Cp + blk.off;
        double* dw = &wpart[bi * wlen + w_off[i]];
        with_kernel(grp.k, S, [&](auto K, auto Sc) {
          with_width(blk, [&](auto V) {
            constexpr int kK = decltype(K)::value, kS = decltype(Sc)::value;
            constexpr int kV = decltype(V)::value;
            if (direct) {  // edges apart, as fwd_nhwc
              const auto [wl, wr] = inside_columns(p, S, sh.W, sh.Wo);
              const T* rows = img + (b.ho0 * S - p) * sh.W * C + blk.off;
              const int64_t in_row = sh.W * C;
              wgrad_nhwc_edge<kK, kS, kV>(d, d_row, rows, in_row, grp.k, R, sh.W, 0, wl, C, dw);
              wgrad_nhwc<kK, kS, kV>(d + wl * C, d_row, rows + (wl * S - p) * C, in_row, grp.k,
                                     R, wr - wl, C, dw);
              wgrad_nhwc_edge<kK, kS, kV>(d, d_row, rows, in_row, grp.k, R, sh.W, wr, sh.Wo, C,
                                          dw);
            } else {
              const T* in = xt + (P - p) * x_row + (P - p) * lay.Cp + blk.off;
              wgrad_nhwc<kK, kS, kV>(d, d_row, in, x_row, grp.k, R, sh.Wo, lay.Cp, dw);
            }
            if constexpr (kS == 1) {
              const T* dd = dt + (P - p) * d_row + (P - p) * lay.Cp + blk.off;
              correlate_nhwc<kK, 1, kV, false>(dd, d_row, wt, grp.k, R, sh.W, lay.Cp,
                                               dx + blk.off);
            } else {
              gather_stride2_nhwc<kK, kV>(dt + P * lay.Cp + blk.off, b.ho0 - P, d_row, wt,
                                          grp.k, hx0, hx1, sh.W, lay.Cp, dx + blk.off,
                                          sh.W * lay.Cp);
            }
          });
        });
      }
      if (!lay.dense) relayout<false>(dx, (hx1 - hx0) * sh.W, lay, groups, gx);
    }
  });
  for (size_t i = 0; i < lay.blocks.size(); ++i) {
    const Block& blk = lay.blocks[i];
    const int64_t kk = groups[blk.g].k * groups[blk.g].k;
    for (int64_t l = 0; l < blk.lanes; ++l) {
      T* gw = io.gw[blk.g] + (blk.c0 - groups[blk.g].begin + l) * kk;
      for (int64_t j = 0; j < kk; ++j) {
        double total = 0.0;
        for (int64_t bi = 0; bi < nb; ++bi) {
          total += wpart[bi * wlen + w_off[i] + j * blk.width + l];
        }
        gw[j] = static_cast<T>(total);
      }
    }
  }
}

// ------------------------------------------------------------------------------------------------
// Op entry points.

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> fwd_cpu(
    const at::Tensor& x_in, at::TensorList weights, const at::Tensor& bn_weight,
    const at::Tensor& bn_bias, const std::optional<at::Tensor>& running_mean,
    const std::optional<at::Tensor>& running_var, int64_t stride, bool use_batch_stats, double eps,
    std::string_view activation, bool save_tape) {
  const Activation act = parse_activation(kOp, activation);
  const std::vector<Group> groups = check_and_group(x_in, weights, bn_weight, stride);
  TORCH_CHECK(x_in.device().is_cpu(), kOp, ": the CPU kernel got a tensor on ", x_in.device());
  check_forward_args(x_in, bn_weight, bn_bias, running_mean, running_var, use_batch_stats, eps);
  const at::MemoryFormat fmt = output_memory_format(x_in);
  const at::Tensor x = x_in.contiguous(fmt);
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t Ho = (H - 1) / stride + 1, Wo = (W - 1) / stride + 1;
  at::Tensor y = pooled_empty({N, C, Ho, Wo}, x.options(), fmt);
  // Batch statistics need the whole conv before BN, so the tape is made (and, without
  // save_tape, dropped); with running statistics and no save_tape there is none: each band or
  // plane is normalised from scratch memory.
  const bool tape = save_tape || use_batch_stats;
  at::Tensor conv = tape ? pooled_empty({N, C, Ho, Wo}, x.options(), fmt) : x.new_empty({0});
  const at::Tensor tape_out = save_tape ? conv : x.new_empty({0});
  const auto stats_type = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor mean = at::empty({C}, x.options().dtype(stats_type));
  at::Tensor var = at::empty({C}, x.options().dtype(stats_type));
  if (C == 0) return {y, tape_out, mean, var};
  TORCH_CHECK(N > 0 || !use_batch_stats, kOp, ": batch statistics of an empty batch are undefined");
  std::vector<at::Tensor> w;
  for (const at::Tensor& t : weights) w.push_back(t.contiguous());
  const at::Tensor gamma = bn_weight.contiguous(), beta = bn_bias.contiguous();
  at::Tensor rm, rv;
  if (!use_batch_stats) {
    rm = running_mean->contiguous();
    rv = running_var->contiguous();
  }
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "mixed_dwconv_bn_act_fwd", [&] {
    using A = at::opmath_type<scalar_t>;
    const Problem<scalar_t, A> pr{N, C, H, W, stride, use_batch_stats, static_cast<A>(eps), act};
    std::vector<const scalar_t*> wp;
    for (const at::Tensor& t : w) wp.push_back(t.const_data_ptr<scalar_t>());
    const FwdIO<scalar_t, A> io{x.const_data_ptr<scalar_t>(), wp.data(),
                                gamma.const_data_ptr<scalar_t>(), beta.const_data_ptr<scalar_t>(),
                                use_batch_stats ? nullptr : rm.const_data_ptr<scalar_t>(),
                                use_batch_stats ? nullptr : rv.const_data_ptr<scalar_t>(),
                                y.mutable_data_ptr<scalar_t>(),
                                tape ? conv.mutable_data_ptr<scalar_t>() : nullptr,
                                mean.mutable_data_ptr<A>(), var.mutable_data_ptr<A>()};
    if (fmt == at::MemoryFormat::ChannelsLast) {
      fwd_nhwc<scalar_t>({N, C, H, W, stride, Ho, Wo}, groups, io, use_batch_stats, eps, act);
    } else {
      run_tasks(make_tasks(groups), groups,
                [&](const Task& t) { fwd_task(pr, groups, io, t); });
    }
  });
  return {y, tape_out, mean, var};
}

std::tuple<at::Tensor, std::vector<at::Tensor>, at::Tensor, at::Tensor> bwd_cpu(
    const at::Tensor& grad_y, const at::Tensor& y, const at::Tensor& x_in,
    const at::Tensor& conv_in, at::TensorList weights, const at::Tensor& bn_weight,
    const at::Tensor& bn_bias, const at::Tensor& mean_in, const at::Tensor& var_in,
    int64_t stride, bool use_batch_stats, double eps, std::string_view activation) {
  const Activation act = parse_activation(kOp, activation);
  const std::vector<Group> groups = check_and_group(x_in, weights, bn_weight, stride);
  TORCH_CHECK(x_in.device().is_cpu(), kOp, ": the CPU kernel got a tensor on ", x_in.device());
  // y is only checked: the activation's mask is recomputed from the tape (see ops.py)
  check_backward_args(x_in, grad_y, y, conv_in, bn_weight, bn_bias, mean_in, var_in, stride);
  const int64_t N = x_in.size(0), C = x_in.size(1), H = x_in.size(2), W = x_in.size(3);
  const at::MemoryFormat fmt = output_memory_format(x_in);
  const at::Tensor x = x_in.contiguous(fmt), gy = grad_y.contiguous(fmt),
                   conv = conv_in.contiguous(fmt);
  at::Tensor gx = pooled_empty({N, C, H, W}, x.options(), fmt);
  std::vector<at::Tensor> gw;
  std::vector<at::Tensor> w;
  for (const at::Tensor& t : weights) {
    gw.push_back(at::empty(t.sizes(), t.options()));
    w.push_back(t.contiguous());
  }
  at::Tensor ggamma = at::empty({C}, bn_weight.options());
  at::Tensor gbeta = at::empty({C}, bn_weight.options());
  if (C == 0) return {gx, gw, ggamma, gbeta};
  if (N == 0) {  // no samples: every gradient is an empty sum
    for (at::Tensor& t : gw) t.zero_();
    ggamma.zero_();
    gbeta.zero_();
    return {gx, gw, ggamma, gbeta};
  }
  const at::Tensor gamma = bn_weight.contiguous(), beta = bn_bias.contiguous(),
                   mean = mean_in.contiguous(), var = var_in.contiguous();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "mixed_dwconv_bn_act_bwd", [&] {
    using A = at::opmath_type<scalar_t>;
    const Problem<scalar_t, A> pr{N, C, H, W, stride, use_batch_stats, static_cast<A>(eps), act};
    std::vector<const scalar_t*> wp;
    std::vector<scalar_t*> gwp;
    for (size_t i = 0; i < w.size(); ++i) {
      wp.push_back(w[i].const_data_ptr<scalar_t>());
      gwp.push_back(gw[i].mutable_data_ptr<scalar_t>());
    }
    const BwdIO<scalar_t, A> io{gy.const_data_ptr<scalar_t>(),   x.const_data_ptr<scalar_t>(),
                                conv.const_data_ptr<scalar_t>(), wp.data(),
                                gamma.const_data_ptr<scalar_t>(), beta.const_data_ptr<scalar_t>(),
                                mean.const_data_ptr<A>(),        var.const_data_ptr<A>(),
                                gx.mutable_data_ptr<scalar_t>(), gwp.data(),
                                ggamma.mutable_data_ptr<scalar_t>(),
                                gbeta.mutable_data_ptr<scalar_t>()};
    if (fmt == at::MemoryFormat::ChannelsLast) {
      const int64_t Ho = (H - 1) / stride + 1, Wo = (W - 1) / stride + 1;
      bwd_nhwc<scalar_t>({N, C, H, W, stride, Ho, Wo}, groups, io, use_batch_stats, eps, act);
    } else {
      run_tasks(make_tasks(groups), groups,
                [&](const Task& t) { bwd_task(pr, groups, io, t); });
    }
  });
  return {gx, gw, ggamma, gbeta};
}

}  // namespace
HRNAS_CPU_ISA_END

TORCH_LIBRARY_IMPL(hrnas_kernels, CPU, m) {
  if (!HRNAS_CPU_ISA_SELECTED()) return;
  m.impl("mixed_dwconv_bn_act_fwd", &fwd_cpu);
  m.impl("mixed_dwconv_bn_act_bwd", &bwd_cpu);
}

}  // namespace mixed_dwconv
}  // namespace hrnas
#endif  // HRNAS_CPU_ISA_ENABLED
