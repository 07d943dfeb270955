// The per-thread bodies of the CUDA kernels in mixed_dwconv_bn_act_cuda.cu, as __host__ __device__
// functions of plain pointers and indices. The __global__ kernels only add the CTA's shared-memory
// tree reductions (tree_step, between __syncthreads) around them, so a host program can run the
// same bodies block by block, thread by thread, and check the index math without a GPU. The
// launch geometry (grids, CTAs, group tables) and the launch plan (the op entry points up to the
// launches, over a launcher) are here too, host-only, so that program
// (tests/ops/mixed_dwconv_cuda_host.cpp) replays exactly the launches the .cu makes.
//
// Work split (all kernels but the per-channel ones): a CTA of ct x pt threads owns ct channels of
// ONE kernel-size group (lanes tx, consecutive channels) and pt * e positions of the output (or
// input) grid (lanes ty, consecutive positions, thread ty takes p = block * pt * e + ty + pt * i,
// i < e). NCHW uses ct = 1 (positions are the contiguous dimension), channels-last ct = 32.
// Group tables let one launch cover every kernel-size group: grid.y enumerates the channel tiles
// of all groups, and the CTA picks the group whose tile range holds blockIdx.y.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <string_view>
#include <tuple>
#include <type_traits>
#include <vector>

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>

#include "common/activation.h"
#include "common/checks.h"
#include "mixed_dwconv_bn_act/mixed_dwconv_bn_act.h"

namespace hrnas {
namespace mixed_dwconv {
namespace device {

constexpr int kMaxGroups = 8;  // groups per launch; more take several launches

// Sizes and element strides: xs of x and grad x, ys of y, conv, grad y and d(conv) (all dense in
// one memory format, so NCHW and channels-last differ only in these strides).
struct Geometry {
  int64_t N, A, H, W, Ho, Wo;
  int64_t xs[4];
  int64_t ys[4];
  int64_t stride;
};

// Groups of one launch: group j is group src[j] of the op's weight list, has channels
// [c_begin, c_begin + count) of the compact tensors, kernel size k, its weights at w[j] (rows
// [count][k * k]), its slice of the packed weight gradient at woff, and channel tiles
// [tile_begin[j], tile_begin[j + 1]).
template <typename T>
struct Groups {
  int n;
  int64_t tile_begin[kMaxGroups + 1];
  int64_t c_begin[kMaxGroups];
  int64_t count[kMaxGroups];
  int64_t woff[kMaxGroups];
  int k[kMaxGroups];
  int src[kMaxGroups];
  const T* w[kMaxGroups];
};

struct Tile {
  int ct, pt, e;  // channel lanes, position lanes (a power of two), positions per thread
};

template <typename T>
HRNAS_HD int find_group(const Groups<T>& gs, int64_t tile) {
  int j = 0;
  while (j + 1 < gs.n && tile >= gs.tile_begin[j + 1]) ++j;
  return j;
}

// The channel of lane tx in tile `tile` of group j: its index within the group and overall.
struct Lane {
  int64_t local, c;
  bool valid;
};

template <typename T>
HRNAS_HD Lane lane_of(const Groups<T>& gs, int j, int64_t tile, int tx, const Tile& t) {
  const int64_t local = (tile - gs.tile_begin[j]) * t.ct + tx;
  return {local, gs.c_begin[j] + local, local < gs.count[j]};
}

// Position i of thread ty in position block `block`; -1 past the end.
HRNAS_HD int64_t position(int64_t block, int ty, int i, const Tile& t, int64_t total) {
  const int64_t p = block * t.pt * t.e + ty + static_cast<int64_t>(t.pt) * i;
  return p < total ? p : -1;
}

HRNAS_HD int64_t offset_of(const int64_t* s, int64_t n, int64_t c, int64_t h, int64_t w) {
  return n * s[0] + c * s[1] + h * s[2] + w * s[3];
}

// (n, h, w) of position p of an [N, Hs, Ws] grid.
HRNAS_HD void unravel(int64_t p, int64_t Hs, int64_t Ws, int64_t* n, int64_t* h, int64_t* w) {
  *n = p / (Hs * Ws);
  const int64_t r = p - *n * Hs * Ws;
  *h = r / Ws;
  *w = r - *h * Ws;
}

// Calls f(n, h, w) for each position of thread ty in position block `block` of an [N, Hs, Ws]
// grid, in order.
template <typename F>
HRNAS_HD void for_positions(int64_t block, int ty, const Tile& t, int64_t N, int64_t Hs,
                            int64_t Ws, const F& f) {
  const int64_t total = N * Hs * Ws;
  for (int i = 0; i < t.e; ++i) {
    const int64_t p = position(block, ty, i, t, total);
    if (p < 0) break;
    int64_t n, h, w;
    unravel(p, Hs, Ws, &n, &h, &w);
    f(n, h, w);
  }
}

// conv[n, c, ho, wo] = sum_{a, b < k} wt[a * k + b] * x[n, c, ho * s + a - k / 2, wo * s + ...],
// taps outside the image skipped (zero padding). K > 0 is the kernel size at compile time,
// K == 0 reads it from k.
template <int K, typename T, typename A>
HRNAS_HD A conv_at(const T* x, const T* wt, const Geometry& g, int k_rt, int64_t n, int64_t c,
                   int64_t ho, int64_t wo) {
  const int k = K > 0 ? K : k_rt;
  const T* xc = x + n * g.xs[0] + c * g.xs[1];
  A acc = A(0);
#pragma unroll
  for (int a = 0; a < k; ++a) {
    const int64_t h = ho * g.stride + a - k / 2;
    if (h < 0 || h >= g.H) continue;
#pragma unroll
    for (int b = 0; b < k; ++b) {
      const int64_t w = wo * g.stride + b - k / 2;
      if (w < 0 || w >= g.W) continue;
      acc += static_cast<A>(wt[a * k + b]) * static_cast<A>(xc[h * g.xs[2] + w * g.xs[3]]);
    }
  }
  return acc;
}

// Running mean and sum of squared deviations (Welford), merged pairwise (Chan et al.): accurate
// where E[x^2] - mean^2 would cancel, and the fixed merge order makes the result deterministic.
template <typename A>
struct Welford {
  A mean, m2;
  int64_t n;
};

template <typename A>
HRNAS_HD void welford_add(Welford<A>& s, A v) {
  s.n += 1;
  const A d = v - s.mean;
  s.mean += d / static_cast<A>(s.n);
  s.m2 += d * (v - s.mean);
}

template <typename A>
HRNAS_HD void welford_merge(Welford<A>& a, const Welford<A>& b) {
  if (b.n == 0) return;
  if (a.n == 0) {
    a = b;
    return;
  }
  const int64_t n = a.n + b.n;
  const A d = b.mean - a.mean;
  const A fb = static_cast<A>(b.n) / static_cast<A>(n);
  a.mean += d * fb;
  a.m2 += b.m2 + d * d * static_cast<A>(a.n) * fb;
  a.n = n;
}

template <typename A>
struct Pair {
  A s, q;
};

template <typename A>
HRNAS_HD void pair_merge(Pair<A>& a, const Pair<A>& b) {
  a.s += b.s;
  a.q += b.q;
}

template <typename A>
HRNAS_HD void sum_merge(A& a, const A& b) {
  a += b;
}

// Calls f(std::integral_constant<int, K>()) with K = k for k = 3, 5, 7, else K = 0 (the body
// reads the size at run time). The kernels call device lambdas through it.
#ifdef __CUDACC__
#pragma nv_exec_check_disable
#endif
template <typename F>
HRNAS_HD void with_kernel_size(int k, const F& f) {
  switch (k) {
    case 3: f(std::integral_constant<int, 3>()); break;
    case 5: f(std::integral_constant<int, 5>()); break;
    case 7: f(std::integral_constant<int, 7>()); break;
    default: f(std::integral_constant<int, 0>()); break;
  }
}

// One level of a CTA's tree reduction over the position lanes: lanes ty < half absorb ty + half.
template <typename V, typename Merge>
HRNAS_HD void tree_step(V* smem, int half, int tx, int ty, const Tile& t, Merge merge) {
  if (ty < half) merge(smem[ty * t.ct + tx], smem[(ty + half) * t.ct + tx]);
}

template <typename A>
HRNAS_HD A inv_std(A var, A eps) {
  return A(1) / sqrt(var + eps);
}

// ------------------------------------------------------------------------------------------------
// Forward

template <typename T, typename A>
struct FwdArgs {
  const T* x;
  const T* gamma;
  const T* beta;
  T* conv;  // the tape; null with running statistics when the caller keeps none
  T* y;
  A* pmean;  // [A][nbp] partial mean of each position block (batch statistics)
  A* pm2;    // [A][nbp] its sum of squared deviations
  A* mean;   // [A] out (batch statistics) or in (running statistics)
  A* var;
  Geometry g;
  Groups<T> gs;
  Tile tile;
  int64_t nbp;
  bool batch_stats;
  Activation act;
  A eps;
};

template <typename T, typename A>
HRNAS_HD A normalize(const FwdArgs<T, A>& a, int64_t c, A v) {
  const A scale = static_cast<A>(a.gamma[c]) * inv_std(a.var[c], a.eps);
  return activate((v - a.mean[c]) * scale + static_cast<A>(a.beta[c]), a.act);
}

// Thread (tx, ty) of CTA (block, tile) of group j: conv of its positions -> the tape; batch
// statistics: the Welford state of the stored (rounded) values; running statistics: y as well
// (and the tape only if there is one).
template <int K, typename T, typename A>
HRNAS_HD Welford<A> fwd_conv_thread(const FwdArgs<T, A>& a, int j, int64_t block, int64_t tile,
                                    int tx, int ty) {
  Welford<A> st{A(0), A(0), 0};
  const Lane l = lane_of(a.gs, j, tile, tx, a.tile);
  if (!l.valid) return st;
  const int k = a.gs.k[j];
  const T* wt = a.gs.w[j] + l.local * k * k;
  for_positions(block, ty, a.tile, a.g.N, a.g.Ho, a.g.Wo, [&](int64_t n, int64_t ho, int64_t wo) {
    const T stored = static_cast<T>(conv_at<K, T, A>(a.x, wt, a.g, k, n, l.c, ho, wo));
    const int64_t off = offset_of(a.g.ys, n, l.c, ho, wo);
    if (a.conv != nullptr) a.conv[off] = stored;
    if (a.batch_stats) {
      welford_add(st, static_cast<A>(stored));
    } else {
      a.y[off] = static_cast<T>(normalize(a, l.c, static_cast<A>(stored)));
    }
  });
  return st;
}

// After the CTA's reduction: lane ty == 0 stores the block's partial statistics.
template <typename T, typename A>
HRNAS_HD void fwd_store_partial(const FwdArgs<T, A>& a, int j, int64_t block, int64_t tile,
                                int tx, const Welford<A>& st) {
  const Lane l = lane_of(a.gs, j, tile, tx, a.tile);
  if (!l.valid) return;
  a.pmean[l.c * a.nbp + block] = st.mean;
  a.pm2[l.c * a.nbp + block] = st.m2;
}

// Thread c: the batch mean and biased variance, merging the blocks' partials in block order.
template <typename T, typename A>
HRNAS_HD void fwd_stats_thread(const FwdArgs<T, A>& a, int64_t c) {
  const int64_t total = a.g.N * a.g.Ho * a.g.Wo, per_block = int64_t{a.tile.pt} * a.tile.e;
  Welford<A> st{A(0), A(0), 0};
  for (int64_t b = 0; b < a.nbp; ++b) {
    const int64_t n = total - b * per_block < per_block ? total - b * per_block : per_block;
    welford_merge(st, Welford<A>{a.pmean[c * a.nbp + b], a.pm2[c * a.nbp + b], n});
  }
  a.mean[c] = st.mean;
  a.var[c] = st.m2 / static_cast<A>(total);
}

// Element `off` of the dense conv / y tensors (in memory order): y = act(BN(conv)).
template <typename T, typename A>
HRNAS_HD void fwd_apply_thread(const FwdArgs<T, A>& a, int64_t off, bool channels_last) {
  const int64_t c = channels_last ? off % a.g.A : (off / (a.g.Ho * a.g.Wo)) % a.g.A;
  a.y[off] = static_cast<T>(normalize(a, c, static_cast<A>(a.conv[off])));
}

// ------------------------------------------------------------------------------------------------
// Backward

template <typename T, typename A>
struct BwdArgs {
  const T* gy;
  const T* y;
  const T* conv;
  const T* x;
  const T* gamma;
  const A* mean;
  const A* var;
  A* psum;   // [A][nbp] partial sum of dz
  A* pdot;   // [A][nbp] partial sum of dz * (conv - mean)
  A* coef;   // [3][A] k_dz, k_conv, k_const
  A* dconv;  // d(conv), laid out as grad_y
  A* part;   // [nbp][wtotal] weight-gradient partials, packed weight order
  T* gx;
  T* ggamma;
  T* gbeta;
  T* gw[kMaxGroups];  // of the launch's groups
  Geometry g;
  Groups<T> gs;
  Tile tile;
  int64_t nbp, wtotal;
  bool batch_stats;
  Activation act;
  A eps;
};

// dz = grad_y where the activation passes the gradient (decided from y).
template <typename T, typename A>
HRNAS_HD A masked_grad(const BwdArgs<T, A>& a, int64_t off) {
  return passes_grad(static_cast<A>(a.y[off]), a.act) ? static_cast<A>(a.gy[off]) : A(0);
}

template <typename T, typename A>
HRNAS_HD Pair<A> bwd_sums_thread(const BwdArgs<T, A>& a, int j, int64_t block, int64_t tile,
                                 int tx, int ty) {
  Pair<A> acc{A(0), A(0)};
  const Lane l = lane_of(a.gs, j, tile, tx, a.tile);
  if (!l.valid) return acc;
  const A mean = a.mean[l.c];
  for_positions(block, ty, a.tile, a.g.N, a.g.Ho, a.g.Wo, [&](int64_t n, int64_t ho, int64_t wo) {
    const int64_t off = offset_of(a.g.ys, n, l.c, ho, wo);
    const A dz = masked_grad(a, off);
    acc.s += dz;
    acc.q += dz * (static_cast<A>(a.conv[off]) - mean);
  });
  return acc;
}

template <typename T, typename A>
HRNAS_HD void bwd_store_sums(const BwdArgs<T, A>& a, int j, int64_t block, int64_t tile, int tx,
                             const Pair<A>& acc) {
  const Lane l = lane_of(a.gs, j, tile, tx, a.tile);
  if (!l.valid) return;
  a.psum[l.c * a.nbp + block] = acc.s;
  a.pdot[l.c * a.nbp + block] = acc.q;
}

// Thread c: grad beta = sum dz, grad gamma = rstd sum dz (conv - mean), and the coefficients of
// d(conv) = k_dz dz + k_conv (conv - mean) + k_const: k_dz = gamma rstd and, for batch
// statistics, k_conv = -gamma rstd^3 sum dz (conv - mean) / P, k_const = -gamma rstd sum dz / P.
template <typename T, typename A>
HRNAS_HD void bwd_coef_thread(const BwdArgs<T, A>& a, int64_t c) {
  A s = A(0), q = A(0);
  for (int64_t b = 0; b < a.nbp; ++b) {
    s += a.psum[c * a.nbp + b];
    q += a.pdot[c * a.nbp + b];
  }
  const A rstd = inv_std(a.var[c], a.eps);
  const A k_dz = static_cast<A>(a.gamma[c]) * rstd;
  const A count = static_cast<A>(a.g.N * a.g.Ho * a.g.Wo);
  a.gbeta[c] = static_cast<T>(s);
  a.ggamma[c] = static_cast<T>(q * rstd);
  a.coef[c] = k_dz;
  a.coef[a.g.A + c] = a.batch_stats ? -k_dz * rstd * rstd * q / count : A(0);
  a.coef[2 * a.g.A + c] = a.batch_stats ? -k_dz * s / count : A(0);
}

// Weight gradient, step 1: thread's d(conv) values, stored for the input gradient and step 2.
template <typename T, typename A>
HRNAS_HD void wgrad_dconv_thread(const BwdArgs<T, A>& a, int j, int64_t block, int64_t tile,
                                 int tx, int ty) {
  const Lane l = lane_of(a.gs, j, tile, tx, a.tile);
  if (!l.valid) return;
  const A k_dz = a.coef[l.c], k_conv = a.coef[a.g.A + l.c], k_const = a.coef[2 * a.g.A + l.c];
  const A mean = a.mean[l.c];
  for_positions(block, ty, a.tile, a.g.N, a.g.Ho, a.g.Wo, [&](int64_t n, int64_t ho, int64_t wo) {
    const int64_t off = offset_of(a.g.ys, n, l.c, ho, wo);
    A d = k_dz * masked_grad(a, off);
    if (a.batch_stats) d += k_conv * (static_cast<A>(a.conv[off]) - mean) + k_const;
    a.dconv[off] = d;
  });
}

// Step 2, tap (ta, tb): the thread's sum of d(conv) * x at that tap (outside the image: 0).
template <typename T, typename A>
HRNAS_HD A wgrad_tap_thread(const BwdArgs<T, A>& a, int j, int64_t block, int64_t tile, int tx,
                            int ty, int ta, int tb) {
  const Lane l = lane_of(a.gs, j, tile, tx, a.tile);
  A acc = A(0);
  if (!l.valid) return acc;
  const int64_t half = a.gs.k[j] / 2;
  for_positions(block, ty, a.tile, a.g.N, a.g.Ho, a.g.Wo, [&](int64_t n, int64_t ho, int64_t wo) {
    const int64_t h = ho * a.g.stride + ta - half, w = wo * a.g.stride + tb - half;
    if (h < 0 || h >= a.g.H || w < 0 || w >= a.g.W) return;
    acc += a.dconv[offset_of(a.g.ys, n, l.c, ho, wo)] *
           static_cast<A>(a.x[offset_of(a.g.xs, n, l.c, h, w)]);
  });
  return acc;
}

template <typename T, typename A>
HRNAS_HD void wgrad_store_tap(const BwdArgs<T, A>& a, int j, int64_t block, int64_t tile, int tx,
                              int tap, A v) {
  const Lane l = lane_of(a.gs, j, tile, tx, a.tile);
  if (!l.valid) return;
  const int k = a.gs.k[j];
  a.part[block * a.wtotal + a.gs.woff[j] + l.local * k * k + tap] = v;
}

// Thread e of the packed weight gradient (of the launch's groups): the sum of its partials in
// block order.
template <typename T, typename A>
HRNAS_HD void wgrad_sum_thread(const BwdArgs<T, A>& a, int64_t e) {
  int j = 0;
  while (j + 1 < a.gs.n && e >= a.gs.woff[j + 1]) ++j;
  A acc = A(0);
  for (int64_t b = 0; b < a.nbp; ++b) acc += a.part[b * a.wtotal + e];
  a.gw[j][e - a.gs.woff[j]] = static_cast<T>(acc);
}

// grad x of the thread's input pixels: the gather over the output pixels (ho, wo) whose taps
// read (h, w), i.e. ho * s + a - k / 2 == h, of w[a, b] * d(conv)[ho, wo]. No atomics.
template <int K, typename T, typename A>
HRNAS_HD void dgrad_thread(const BwdArgs<T, A>& a, int j, int64_t block, int64_t tile, int tx,
                           int ty) {
  const Lane l = lane_of(a.gs, j, tile, tx, a.tile);
  if (!l.valid) return;
  const int k = K > 0 ? K : a.gs.k[j];
  const T* wt = a.gs.w[j] + l.local * k * k;
  const int64_t s = a.g.stride;
  for_positions(block, ty, a.tile, a.g.N, a.g.H, a.g.W, [&](int64_t n, int64_t h, int64_t w) {
    const A* d = a.dconv + n * a.g.ys[0] + l.c * a.g.ys[1];
    A acc = A(0);
#pragma unroll
    for (int ta = 0; ta < k; ++ta) {
      const int64_t hn = h + k / 2 - ta;  // = ho * s
      if (hn < 0 || hn % s != 0 || hn / s >= a.g.Ho) continue;
#pragma unroll
      for (int tb = 0; tb < k; ++tb) {
        const int64_t wn = w + k / 2 - tb;
        if (wn < 0 || wn % s != 0 || wn / s >= a.g.Wo) continue;
        acc += static_cast<A>(wt[ta * k + tb]) * d[hn / s * a.g.ys[2] + wn / s * a.g.ys[3]];
      }
    }
    a.gx[offset_of(a.g.xs, n, l.c, h, w)] = static_cast<T>(acc);
  });
}

// ------------------------------------------------------------------------------------------------
// Launch geometry (host only). Every convolving kernel runs a 2-D grid: grid.x = position blocks
// (of pt * e positions), grid.y = the channel tiles of a group table; CTA = (ct, pt) threads.
// The per-channel and elementwise kernels run 1-D grids of kThreads-thread CTAs.

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = (int64_t{1} << 31) - 1;  // grid.x
constexpr int64_t kMaxTiles = 65535;                    // grid.y

inline int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

// NCHW: positions are contiguous, one channel per CTA, 256 position lanes x 4 each. NHWC:
// channels are contiguous, 32 channel lanes (a 128-byte fp32 row) x 8 position lanes x 16 each.
inline Tile tile_for(bool channels_last) {
  return channels_last ? Tile{32, 8, 16} : Tile{1, 256, 4};
}

// grid.x of a 2-D launch over `positions` positions (N * Ho * Wo, or N * H * W for grad x).
inline int64_t position_blocks(int64_t positions, const Tile& t) {
  const int64_t blocks = cdiv(positions, int64_t{t.pt} * t.e);
  TORCH_CHECK(blocks <= kMaxBlocks, kOp, ": the input is too large for the CUDA kernel");
  return blocks;
}

// grid.y of a 2-D launch with group table gs.
template <typename T>
int64_t channel_tiles(const Groups<T>& gs) {
  return gs.tile_begin[gs.n];
}

// grid.x of a 1-D launch over n items (the elementwise kernel loops past the cap).
inline int64_t blocks_for(int64_t n) { return std::min<int64_t>(cdiv(n, kThreads), kMaxBlocks); }

// Elements of the packed weight gradient that group table gs covers (one thread each).
template <typename T>
int64_t packed_weight_size(const Groups<T>& gs) {
  const int last = gs.n - 1;
  return gs.woff[last] + gs.count[last] * gs.k[last] * gs.k[last] - gs.woff[0];
}

// The group tables of the launches: the alive groups (count > 0), kMaxGroups at a time, with
// their offsets in the packed weight gradient (alive groups only, in order). Group g has its
// weight rows at w[g]. *wtotal: the packed size.
template <typename T>
std::vector<Groups<T>> group_tables(const std::vector<Group>& groups,
                                    const std::vector<const T*>& w, const Tile& t,
                                    int64_t* wtotal) {
  std::vector<Groups<T>> tables;
  int64_t woff = 0;
  for (size_t g = 0; g < groups.size(); ++g) {
    if (groups[g].count == 0) continue;
    if (tables.empty() || tables.back().n == kMaxGroups) {
      tables.push_back(Groups<T>{});
      tables.back().tile_begin[0] = 0;
    }
    Groups<T>& gs = tables.back();
    const int j = gs.n++;
    gs.c_begin[j] = groups[g].begin;
    gs.count[j] = groups[g].count;
    gs.k[j] = static_cast<int>(groups[g].k);
    gs.src[j] = static_cast<int>(g);
    gs.woff[j] = woff;
    gs.w[j] = w[g];
    gs.tile_begin[j + 1] = gs.tile_begin[j] + cdiv(groups[g].count, t.ct);
    TORCH_CHECK(gs.tile_begin[j + 1] <= kMaxTiles, kOp, ": too many channels (", groups[g].count,
                ") in one kernel-size group for the CUDA kernel");
    woff += groups[g].count * groups[g].k * groups[g].k;
  }
  *wtotal = woff;
  return tables;
}

// ------------------------------------------------------------------------------------------------
// Launch plan (host only): the op entry points up to the launches, shared by the .cu (which
// launches the kernels) and the host replay (which runs them on the CPU). A launcher L
// allocates (L::empty: outputs and scratch) and runs each kernel of the .cu over the grid it is
// given: fwd_conv, bwd_sums, wgrad, dgrad on (grid_x, grid_y) CTAs of (ct, pt) threads;
// fwd_stats, fwd_apply, bwd_coef, wgrad_sum on 1-D grids of kThreads-thread CTAs.

inline Geometry make_geometry(const at::Tensor& x, const at::Tensor& y, int64_t stride) {
  Geometry g{};
  g.N = x.size(0);
  g.A = x.size(1);
  g.H = x.size(2);
  g.W = x.size(3);
  g.Ho = y.size(2);
  g.Wo = y.size(3);
  for (int d = 0; d < 4; ++d) {
    g.xs[d] = x.stride(d);
    g.ys[d] = y.stride(d);
  }
  g.stride = stride;
  return g;
}

inline std::vector<at::Tensor> contiguous_rows(at::TensorList weights) {
  std::vector<at::Tensor> w;
  for (const at::Tensor& t : weights) w.push_back(t.contiguous());
  return w;
}

template <typename T>
std::vector<const T*> row_pointers(const std::vector<at::Tensor>& w) {
  std::vector<const T*> p;
  for (const at::Tensor& t : w) p.push_back(t.const_data_ptr<T>());
  return p;
}

// The forward op (schema in hrnas_kernels/mixed_dwconv_bn_act/ops.py): (y, conv, mean, var);
// conv is empty without save_tape (batch statistics still make one: the apply launch reads it).
template <typename L>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> forward(
    L& launch, const at::Tensor& x_in, at::TensorList weights, const at::Tensor& bn_weight,
    const at::Tensor& bn_bias, const std::optional<at::Tensor>& running_mean,
    const std::optional<at::Tensor>& running_var, int64_t stride, bool use_batch_stats, double eps,
    std::string_view activation, bool save_tape) {
  const Activation act = parse_activation(kOp, activation);
  const std::vector<Group> groups = check_and_group(x_in, weights, bn_weight, stride);
  check_forward_args(x_in, bn_weight, bn_bias, running_mean, running_var, use_batch_stats, eps);
  const at::MemoryFormat fmt = output_memory_format(x_in);
  const at::Tensor x = x_in.contiguous(fmt);
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t Ho = (H - 1) / stride + 1, Wo = (W - 1) / stride + 1;
  at::Tensor y = launch.empty({N, C, Ho, Wo}, x.options().memory_format(fmt));
  const bool tape = save_tape || use_batch_stats;
  at::Tensor conv = launch.empty({tape ? N : 0, C, Ho, Wo}, x.options().memory_format(fmt));
  const at::Tensor tape_out = save_tape ? conv : launch.empty({0}, x.options());
  const auto stats_type = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor mean = launch.empty({C}, x.options().dtype(stats_type));
  at::Tensor var = launch.empty({C}, x.options().dtype(stats_type));
  if (C == 0) return {y, tape_out, mean, var};
  const int64_t P = N * Ho * Wo;
  if (use_batch_stats) {
    TORCH_CHECK(P > 0, kOp, ": batch statistics of an empty batch are undefined");
  } else {
    mean.copy_(*running_mean);
    var.copy_(*running_var);
    if (P == 0) return {y, tape_out, mean, var};
  }
  const bool channels_last = fmt == at::MemoryFormat::ChannelsLast;
  const Tile tile = tile_for(channels_last);
  const int64_t nbp = position_blocks(P, tile);
  const std::vector<at::Tensor> w = contiguous_rows(weights);
  const at::Tensor gamma = bn_weight.contiguous(), beta = bn_bias.contiguous();
  at::Tensor partial = launch.empty({use_batch_stats ? 2 * C * nbp : 0}, mean.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "mixed_dwconv_fwd",
                                  [&] {
    using A = at::opmath_type<scalar_t>;
    FwdArgs<scalar_t, A> a{};
    a.x = x.const_data_ptr<scalar_t>();
    a.gamma = gamma.const_data_ptr<scalar_t>();
    a.beta = beta.const_data_ptr<scalar_t>();
    a.conv = tape ? conv.mutable_data_ptr<scalar_t>() : nullptr;
    a.y = y.mutable_data_ptr<scalar_t>();
    a.pmean = use_batch_stats ? partial.mutable_data_ptr<A>() : nullptr;
    a.pm2 = use_batch_stats ? a.pmean + C * nbp : nullptr;
    a.mean = mean.mutable_data_ptr<A>();
    a.var = var.mutable_data_ptr<A>();
    a.g = make_geometry(x, y, stride);
    a.tile = tile;
    a.nbp = nbp;
    a.batch_stats = use_batch_stats;
    a.act = act;
    a.eps = static_cast<A>(eps);
    int64_t wtotal = 0;
    for (const auto& gs : group_tables(groups, row_pointers<scalar_t>(w), tile, &wtotal)) {
      a.gs = gs;
      launch.fwd_conv(a, nbp, channel_tiles(gs));
    }
    if (use_batch_stats) {
      launch.fwd_stats(a, blocks_for(C));
      launch.fwd_apply(a, blocks_for(y.numel()), y.numel(), channels_last);
    }
  });
  return {y, tape_out, mean, var};
}

// The backward op: (grad x, grad of each weight group, grad gamma, grad beta).
template <typename L>
std::tuple<at::Tensor, std::vector<at::Tensor>, at::Tensor, at::Tensor> backward(
    L& launch, const at::Tensor& grad_y, const at::Tensor& y_in, const at::Tensor& x_in,
    const at::Tensor& conv_in, at::TensorList weights, const at::Tensor& bn_weight,
    const at::Tensor& bn_bias, const at::Tensor& mean_in, const at::Tensor& var_in,
    int64_t stride, bool use_batch_stats, double eps, std::string_view activation) {
  const Activation act = parse_activation(kOp, activation);
  const std::vector<Group> groups = check_and_group(x_in, weights, bn_weight, stride);
  check_backward_args(x_in, grad_y, y_in, conv_in, bn_weight, bn_bias, mean_in, var_in, stride);
  const int64_t N = x_in.size(0), C = x_in.size(1), H = x_in.size(2), W = x_in.size(3);
  const int64_t Ho = (H - 1) / stride + 1, Wo = (W - 1) / stride + 1;
  const at::MemoryFormat fmt = output_memory_format(x_in);
  const at::Tensor x = x_in.contiguous(fmt), gy = grad_y.contiguous(fmt), y = y_in.contiguous(fmt),
                   conv = conv_in.contiguous(fmt);
  at::Tensor gx = launch.empty({N, C, H, W}, x.options().memory_format(fmt));
  std::vector<at::Tensor> gw;
  for (const at::Tensor& t : weights) gw.push_back(launch.empty(t.sizes(), t.options()));
  at::Tensor ggamma = launch.empty({C}, bn_weight.options());
  at::Tensor gbeta = launch.empty({C}, bn_weight.options());
  if (C == 0) return {gx, gw, ggamma, gbeta};
  const int64_t P = N * Ho * Wo;
  if (P == 0) {  // no samples: every gradient is an empty sum
    gx.zero_();
    for (at::Tensor& t : gw) t.zero_();
    ggamma.zero_();
    gbeta.zero_();
    return {gx, gw, ggamma, gbeta};
  }
  const bool channels_last = fmt == at::MemoryFormat::ChannelsLast;
  const Tile tile = tile_for(channels_last);
  const int64_t nbp = position_blocks(P, tile), nbx = position_blocks(N * H * W, tile);
  const std::vector<at::Tensor> w = contiguous_rows(weights);
  const at::Tensor gamma = bn_weight.contiguous(), mean = mean_in.contiguous(),
                   var = var_in.contiguous();
  const at::TensorOptions acc_options = mean.options();
  at::Tensor sums = launch.empty({2 * C * nbp}, acc_options);
  at::Tensor coef = launch.empty({3 * C}, acc_options);
  at::Tensor dconv = launch.empty({N, C, Ho, Wo}, acc_options.memory_format(fmt));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "mixed_dwconv_bwd",
                                  [&] {
    using A = at::opmath_type<scalar_t>;
    BwdArgs<scalar_t, A> a{};
    a.gy = gy.const_data_ptr<scalar_t>();
    a.y = y.const_data_ptr<scalar_t>();
    a.conv = conv.const_data_ptr<scalar_t>();
    a.x = x.const_data_ptr<scalar_t>();
    a.gamma = gamma.const_data_ptr<scalar_t>();
    a.mean = mean.const_data_ptr<A>();
    a.var = var.const_data_ptr<A>();
    a.psum = sums.mutable_data_ptr<A>();
    a.pdot = a.psum + C * nbp;
    a.coef = coef.mutable_data_ptr<A>();
    a.dconv = dconv.mutable_data_ptr<A>();
    a.gx = gx.mutable_data_ptr<scalar_t>();
    a.ggamma = ggamma.mutable_data_ptr<scalar_t>();
    a.gbeta = gbeta.mutable_data_ptr<scalar_t>();
    a.g = make_geometry(x, gy, stride);
    a.tile = tile;
    a.nbp = nbp;
    a.batch_stats = use_batch_stats;
    a.act = act;
    a.eps = static_cast<A>(eps);
    const std::vector<Groups<scalar_t>> tables =
        group_tables(groups, row_pointers<scalar_t>(w), tile, &a.wtotal);
    at::Tensor part = launch.empty({nbp * a.wtotal}, acc_options);
    a.part = part.mutable_data_ptr<A>();
    for (const auto& gs : tables) {
      a.gs = gs;
      launch.bwd_sums(a, nbp, channel_tiles(gs));
    }
    launch.bwd_coef(a, blocks_for(C));
    for (const auto& gs : tables) {
      a.gs = gs;
      for (int j = 0; j < gs.n; ++j) a.gw[j] = gw[gs.src[j]].mutable_data_ptr<scalar_t>();
      launch.wgrad(a, nbp, channel_tiles(gs));
      launch.dgrad(a, nbx, channel_tiles(gs));
      const int64_t size = packed_weight_size(gs);
      launch.wgrad_sum(a, blocks_for(size), size);
    }
  });
  return {gx, gw, ggamma, gbeta};
}

}  // namespace device
}  // namespace mixed_dwconv
}  // namespace hrnas
