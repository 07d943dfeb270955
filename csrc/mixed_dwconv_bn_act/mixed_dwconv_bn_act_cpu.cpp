// Mixed-kernel depthwise conv + BatchNorm + activation on CPU, forward and backward.
//
// Work is split into independent tasks that each own whole channels, so BatchNorm statistics and
// weight gradients are reduced inside one task in a fixed order: no cross-thread reduction, no
// atomics, results independent of the thread count.
//   NCHW: a task is one channel. Every image's plane is copied into a zero-bordered tile (so the
//         inner loops have no bounds checks) and convolved with loops vectorised along W.
//   NHWC: a task is a block of up to kLanes channels of one kernel-size group. Every image's
//         block is copied into a zero-bordered tile [Hp][Wp][kLanes] (each pixel's channels are
//         one contiguous, cache-line sized run in NHWC) and convolved with loops vectorised
//         along the channels; a few neighbouring output pixels share each weight load.
// Forward: conv -> tape (the pre-BN output, kept for backward: on CPU storing beats recomputing
// a k x k conv) + per-channel sums; then BN + activation from the tape while it is still in cache.
// Backward: one pass reduces sum(dz) and sum(dz * x_hat) per channel (dz = grad_y masked by the
// activation, taken from y); a second pass forms d(conv) per image and runs the weight gradient
// (correlate x with d(conv)) and the input gradient (correlate d(conv) with the flipped kernel for
// stride 1, a local scatter for stride 2).
// Kernel sizes 3, 5 and 7 and both strides are compiled as constants; other odd sizes use the
// same loops with a runtime size.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <tuple>
#include <type_traits>
#include <vector>

#include "mixed_dwconv_bn_act/mixed_dwconv_bn_act.h"

namespace hrnas {
namespace mixed_dwconv {
namespace {

constexpr int64_t kLanes = 16;  // channels per NHWC task (one 64-byte line of fp32)
constexpr int64_t kVec = 16;    // outputs per register block along W in NCHW
constexpr int64_t kPix = 4;     // neighbouring output pixels sharing a weight load in NHWC

// One conv's geometry: input H x W, kernel k, stride s, output Ho x Wo, and the zero-bordered tile
// Hp x Wp (p = k / 2 on every side) that covers every tap of every output.
struct Geom {
  int64_t H, W, k, s, p, Ho, Wo, Hp, Wp;
};

Geom make_geom(int64_t H, int64_t W, int64_t k, int64_t s) {
  const int64_t p = k / 2;
  return {H, W, k, s, p, (H - 1) / s + 1, (W - 1) / s + 1, H + 2 * p, W + 2 * p};
}

// ------------------------------------------------------------------------------------------------
// NCHW plane kernels: lanes along W.

// out[ho][wo] = sum_{kh,kw} wt[kh][kw] * tile[ho*S + kh][wo*S + kw]   (out is Ho x Wo)
template <int K, int S, typename A>
HRNAS_TARGET_CLONES void correlate_plane(const A* __restrict tile, const A* __restrict wt,
                                         const Geom g, A* __restrict out) {
  const int64_t k = K > 0 ? K : g.k;
  for (int64_t ho = 0; ho < g.Ho; ++ho) {
    A* o = out + ho * g.Wo;
    int64_t wo = 0;
    for (; wo + kVec <= g.Wo; wo += kVec) {
      A acc[kVec] = {};
      for (int64_t kh = 0; kh < k; ++kh) {
        const A* r = tile + (ho * S + kh) * g.Wp + wo * S;
        for (int64_t kw = 0; kw < k; ++kw) {
          const A wv = wt[kh * k + kw];
          for (int64_t l = 0; l < kVec; ++l) acc[l] += wv * r[kw + l * S];
        }
      }
      for (int64_t l = 0; l < kVec; ++l) o[wo + l] = acc[l];
    }
    for (; wo < g.Wo; ++wo) {
      A acc = A(0);
      for (int64_t kh = 0; kh < k; ++kh) {
        const A* r = tile + (ho * S + kh) * g.Wp + wo * S;
        for (int64_t kw = 0; kw < k; ++kw) acc += wt[kh * k + kw] * r[kw];
      }
      o[wo] = acc;
    }
  }
}

// dw[kh][kw] += sum_{ho,wo} d[ho][wo] * tile[ho*S + kh][wo*S + kw]   (d rows ld apart)
template <int K, int S, typename A>
HRNAS_TARGET_CLONES void wgrad_plane(const A* __restrict d, int64_t ld, const A* __restrict tile,
                                     const Geom g, double* __restrict dw) {
  constexpr int64_t kMaxK = K > 0 ? K : 1;
  const int64_t k = K > 0 ? K : g.k;
  if (K == 0) {  // runtime kernel size: plain loops
    for (int64_t kh = 0; kh < k; ++kh) {
      for (int64_t kw = 0; kw < k; ++kw) {
        A acc = A(0);
        for (int64_t ho = 0; ho < g.Ho; ++ho) {
          const A* r = tile + (ho * S + kh) * g.Wp + kw;
          for (int64_t wo = 0; wo < g.Wo; ++wo) acc += d[ho * ld + wo] * r[wo * S];
        }
        dw[kh * k + kw] += acc;
      }
    }
    return;
  }
  for (int64_t kh = 0; kh < k; ++kh) {
    A acc[kMaxK][kVec] = {};
    A tail[kMaxK] = {};
    for (int64_t ho = 0; ho < g.Ho; ++ho) {
      const A* dr = d + ho * ld;
      const A* r = tile + (ho * S + kh) * g.Wp;
      int64_t wo = 0;
      for (; wo + kVec <= g.Wo; wo += kVec) {
        for (int64_t kw = 0; kw < kMaxK; ++kw) {
          for (int64_t l = 0; l < kVec; ++l) acc[kw][l] += dr[wo + l] * r[(wo + l) * S + kw];
        }
      }
      for (; wo < g.Wo; ++wo) {
        for (int64_t kw = 0; kw < kMaxK; ++kw) tail[kw] += dr[wo] * r[wo * S + kw];
      }
    }
    for (int64_t kw = 0; kw < kMaxK; ++kw) {
      A s = tail[kw];
      for (int64_t l = 0; l < kVec; ++l) s += acc[kw][l];
      dw[kh * k + kw] += s;
    }
  }
}

// ------------------------------------------------------------------------------------------------
// NHWC block kernels: kLanes channels per pixel, lanes along C. Tiles are [rows][cols][kLanes].

// out[ho][wo][:] = sum_{kh,kw} wt[kh][kw][:] * tile[ho*S + kh][wo*S + kw][:]
template <int K, int S, typename A>
HRNAS_TARGET_CLONES void correlate_block(const A* __restrict tile, const A* __restrict wt,
                                         const Geom g, A* __restrict out) {
  const int64_t k = K > 0 ? K : g.k;
  for (int64_t ho = 0; ho < g.Ho; ++ho) {
    int64_t wo = 0;
    for (; wo + kPix <= g.Wo; wo += kPix) {
      A acc[kPix][kLanes] = {};
      for (int64_t kh = 0; kh < k; ++kh) {
        const A* r = tile + ((ho * S + kh) * g.Wp + wo * S) * kLanes;
        for (int64_t kw = 0; kw < k; ++kw) {
          const A* wv = wt + (kh * k + kw) * kLanes;
          for (int64_t q = 0; q < kPix; ++q) {
            const A* xv = r + (q * S + kw) * kLanes;
            for (int64_t l = 0; l < kLanes; ++l) acc[q][l] += wv[l] * xv[l];
          }
        }
      }
      for (int64_t q = 0; q < kPix; ++q) {
        A* o = out + (ho * g.Wo + wo + q) * kLanes;
        for (int64_t l = 0; l < kLanes; ++l) o[l] = acc[q][l];
      }
    }
    for (; wo < g.Wo; ++wo) {
      A acc[kLanes] = {};
      for (int64_t kh = 0; kh < k; ++kh) {
        for (int64_t kw = 0; kw < k; ++kw) {
          const A* wv = wt + (kh * k + kw) * kLanes;
          const A* xv = tile + ((ho * S + kh) * g.Wp + wo * S + kw) * kLanes;
          for (int64_t l = 0; l < kLanes; ++l) acc[l] += wv[l] * xv[l];
        }
      }
      A* o = out + (ho * g.Wo + wo) * kLanes;
      for (int64_t l = 0; l < kLanes; ++l) o[l] = acc[l];
    }
  }
}

// dw[kh][kw][:] += sum_{ho,wo} d[ho][wo][:] * tile[ho*S + kh][wo*S + kw][:]   (d rows ld pixels apart)
template <int K, int S, typename A>
HRNAS_TARGET_CLONES void wgrad_block(const A* __restrict d, int64_t ld, const A* __restrict tile,
                                     const Geom g, double* __restrict dw) {
  constexpr int64_t kMaxK = K > 0 ? K : 1;
  const int64_t k = K > 0 ? K : g.k;
  if (K == 0) {
    for (int64_t kh = 0; kh < k; ++kh) {
      for (int64_t kw = 0; kw < k; ++kw) {
        A acc[kLanes] = {};
        for (int64_t ho = 0; ho < g.Ho; ++ho) {
          for (int64_t wo = 0; wo < g.Wo; ++wo) {
            const A* dv = d + (ho * ld + wo) * kLanes;
            const A* xv = tile + ((ho * S + kh) * g.Wp + wo * S + kw) * kLanes;
            for (int64_t l = 0; l < kLanes; ++l) acc[l] += dv[l] * xv[l];
          }
        }
        for (int64_t l = 0; l < kLanes; ++l) dw[(kh * k + kw) * kLanes + l] += acc[l];
      }
    }
    return;
  }
  for (int64_t kh = 0; kh < k; ++kh) {
    A acc[kMaxK][kLanes] = {};
    for (int64_t ho = 0; ho < g.Ho; ++ho) {
      const A* r = tile + (ho * S + kh) * g.Wp * kLanes;
      for (int64_t wo = 0; wo < g.Wo; ++wo) {
        const A* dv = d + (ho * ld + wo) * kLanes;
        const A* xr = r + wo * S * kLanes;
        for (int64_t kw = 0; kw < kMaxK; ++kw) {
          for (int64_t l = 0; l < kLanes; ++l) acc[kw][l] += dv[l] * xr[kw * kLanes + l];
        }
      }
    }
    for (int64_t kw = 0; kw < kMaxK; ++kw) {
      for (int64_t l = 0; l < kLanes; ++l) dw[(kh * k + kw) * kLanes + l] += acc[kw][l];
    }
  }
}

// Stride-2 input gradient by scattering into a zero-bordered tile of the input's size:
// tile[ho*2 + kh][wo*2 + kw][:] += wt[kh][kw][:] * d[ho][wo][:]. `lanes` is 1 for NCHW planes.
template <typename A>
HRNAS_TARGET_CLONES void scatter_stride2(const A* __restrict d, const A* __restrict wt,
                                         const Geom g, int64_t lanes, A* __restrict tile) {
  for (int64_t ho = 0; ho < g.Ho; ++ho) {
    for (int64_t wo = 0; wo < g.Wo; ++wo) {
      const A* dv = d + (ho * g.Wo + wo) * lanes;
      for (int64_t kh = 0; kh < g.k; ++kh) {
        for (int64_t kw = 0; kw < g.k; ++kw) {
          const A* wv = wt + (kh * g.k + kw) * lanes;
          A* t = tile + ((ho * 2 + kh) * g.Wp + wo * 2 + kw) * lanes;
          for (int64_t l = 0; l < lanes; ++l) t[l] += wv[l] * dv[l];
        }
      }
    }
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

// ------------------------------------------------------------------------------------------------
// Flat passes. A task keeps each image's data in flat buffers [pixels][L] with L = 1 (NCHW) or
// kLanes (NHWC), padded to a multiple of kLanes with zeros. Element e belongs to slot e % kLanes
// of its chunk; per-channel coefficients are given per slot (all slots equal in NCHW, one channel
// per slot in NHWC), so one vectorised loop serves both layouts.

template <typename A>
HRNAS_TARGET_CLONES void sum_and_square(const A* __restrict v, int64_t len, A* __restrict s,
                                        A* __restrict q) {
  for (int64_t c = 0; c < len; c += kLanes) {
    for (int64_t j = 0; j < kLanes; ++j) {
      s[j] += v[c + j];
      q[j] += v[c + j] * v[c + j];
    }
  }
}

template <typename A>
HRNAS_TARGET_CLONES void batch_norm_act(const A* __restrict v, int64_t len,
                                        const A* __restrict mean, const A* __restrict scale,
                                        const A* __restrict beta, Activation act,
                                        A* __restrict out) {
  for (int64_t c = 0; c < len; c += kLanes) {
    for (int64_t j = 0; j < kLanes; ++j) {
      out[c + j] = activate((v[c + j] - mean[j]) * scale[j] + beta[j], act);
    }
  }
}

// dz = grad_y where the activation passes it (else 0); s += dz; q += dz * (conv - mean)
template <typename A>
HRNAS_TARGET_CLONES void masked_grad_sums(const A* __restrict gy, const A* __restrict y,
                                          const A* __restrict cv, int64_t len,
                                          const A* __restrict mean, Activation act,
                                          A* __restrict dz, A* __restrict s, A* __restrict q) {
  for (int64_t c = 0; c < len; c += kLanes) {
    for (int64_t j = 0; j < kLanes; ++j) {
      const A d = passes_grad(y[c + j], act) ? gy[c + j] : A(0);
      dz[c + j] = d;
      s[j] += d;
      q[j] += d * (cv[c + j] - mean[j]);
    }
  }
}

// out = k_dz * dz + k_conv * (conv - mean) + k_const over one row of `len` elements that starts
// at a chunk boundary (NHWC) or anywhere (NCHW, where every slot holds the same coefficients).
template <typename A>
HRNAS_TARGET_CLONES void conv_grad_row(const A* __restrict dz, const A* __restrict cv,
                                       int64_t len, const A* __restrict k_dz,
                                       const A* __restrict k_conv, const A* __restrict mean,
                                       const A* __restrict k_const, A* __restrict out) {
  int64_t c = 0;
  for (; c + kLanes <= len; c += kLanes) {
    for (int64_t j = 0; j < kLanes; ++j) {
      out[c + j] = k_dz[j] * dz[c + j] + k_conv[j] * (cv[c + j] - mean[j]) + k_const[j];
    }
  }
  for (int64_t j = 0; c + j < len; ++j) {
    out[c + j] = k_dz[j] * dz[c + j] + k_conv[j] * (cv[c + j] - mean[j]) + k_const[j];
  }
}

// ------------------------------------------------------------------------------------------------
// Tasks. A task covers channels [c0, c0 + lanes) of one group: lanes == 1 in NCHW.

template <typename T, typename A>
struct Problem {
  int64_t N, C, H, W, stride;
  bool channels_last, batch_stats;
  A eps;
  Activation act;
  int64_t L() const { return channels_last ? kLanes : 1; }
};

struct Task {
  int64_t c0, lanes, g;  // channel offset, channel count, group
};

std::vector<Task> make_tasks(const std::vector<Group>& groups, bool channels_last) {
  std::vector<Task> tasks;
  for (size_t g = 0; g < groups.size(); ++g) {
    const int64_t step = channels_last ? kLanes : 1;
    for (int64_t c = 0; c < groups[g].count; c += step) {
      tasks.push_back({groups[g].begin + c, std::min(step, groups[g].count - c),
                       static_cast<int64_t>(g)});
    }
  }
  return tasks;
}

int64_t round_up(int64_t v) { return (v + kLanes - 1) / kLanes * kLanes; }

// Offset of element (n, c0, 0, 0) of an [N, C, HW] tensor in the problem's layout, and the
// distance between neighbouring pixels of one channel.
template <typename T, typename A>
std::pair<int64_t, int64_t> origin(const Problem<T, A>& pr, int64_t n, int64_t c0, int64_t HW) {
  if (pr.channels_last) return {n * HW * pr.C + c0, pr.C};
  return {(n * pr.C + c0) * HW, 1};
}

// Image n's task channels of an [N, C, H, W] tensor into a flat [H*W][L] buffer (rows `pitch`
// pixels apart, starting `offset` pixels in: a tile interior), converting to the math type.
template <typename T, typename A>
void gather(const T* src, const Problem<T, A>& pr, int64_t n, const Task& t, int64_t H, int64_t W,
            A* dst, int64_t pitch, int64_t offset) {
  const auto [o, step] = origin(pr, n, t.c0, H * W);
  const T* s = src + o;
  const int64_t L = pr.L();
  for (int64_t h = 0; h < H; ++h) {
    A* d = dst + (offset + h * pitch) * L;
    const T* sr = s + h * W * step;
    if (L == 1) {
      for (int64_t w = 0; w < W; ++w) d[w] = static_cast<A>(sr[w]);
    } else {
      for (int64_t w = 0; w < W; ++w) {
        for (int64_t l = 0; l < t.lanes; ++l) d[w * L + l] = static_cast<A>(sr[w * step + l]);
      }
    }
  }
}

// The reverse of gather for a dense [H*W][L] buffer.
template <typename T, typename A>
void scatter(const A* src, const Problem<T, A>& pr, int64_t n, const Task& t, int64_t HW, T* dst) {
  const auto [o, step] = origin(pr, n, t.c0, HW);
  T* d = dst + o;
  const int64_t L = pr.L();
  if (L == 1) {
    for (int64_t i = 0; i < HW; ++i) d[i] = static_cast<T>(src[i]);
    return;
  }
  for (int64_t i = 0; i < HW; ++i) {
    for (int64_t l = 0; l < t.lanes; ++l) d[i * step + l] = static_cast<T>(src[i * L + l]);
  }
}

// Per-slot sums -> per-channel values: slot j in NHWC, the total of all slots in NCHW.
template <typename T, typename A>
double channel_total(const Problem<T, A>& pr, const A* slots, int64_t l) {
  if (pr.channels_last) return static_cast<double>(slots[l]);
  double total = 0.0;
  for (int64_t j = 0; j < kLanes; ++j) total += slots[j];
  return total;
}

// Per-channel value -> per-slot array (broadcast in NCHW).
template <typename T, typename A>
void set_slot(const Problem<T, A>& pr, A* slots, int64_t l, A v) {
  if (pr.channels_last) {
    slots[l] = v;
  } else {
    std::fill(slots, slots + kLanes, v);
  }
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
  T* conv;
  A* mean;
  A* var;
};

// Kernel rows of the task's channels, [k*k][L] (zero in unused lanes), optionally flipped.
template <typename T, typename A>
std::vector<A> task_weights(const Problem<T, A>& pr, const Group& grp, const Task& t,
                            const T* w, bool flip) {
  const int64_t kk = grp.k * grp.k, L = pr.L();
  std::vector<A> wt(kk * L, A(0));
  for (int64_t l = 0; l < t.lanes; ++l) {
    const T* row = w + (t.c0 - grp.begin + l) * kk;
    for (int64_t i = 0; i < kk; ++i) wt[i * L + l] = static_cast<A>(row[flip ? kk - 1 - i : i]);
  }
  return wt;
}

template <typename T, typename A>
void fwd_task(const Problem<T, A>& pr, const std::vector<Group>& groups, const FwdIO<T, A>& io,
              const Task& t) {
  const Group& grp = groups[t.g];
  const Geom g = make_geom(pr.H, pr.W, grp.k, pr.stride);
  const int64_t L = pr.L(), HWo = g.Ho * g.Wo, len = round_up(HWo * L);
  const std::vector<A> wt = task_weights(pr, grp, t, io.w[t.g], false);
  std::vector<A> tile(g.Hp * g.Wp * L, A(0)), conv(pr.N * len, A(0));
  A s[kLanes] = {}, q[kLanes] = {};
  for (int64_t n = 0; n < pr.N; ++n) {
    gather(io.x, pr, n, t, pr.H, pr.W, tile.data(), g.Wp, g.p * g.Wp + g.p);
    A* out = conv.data() + n * len;
    with_kernel(g.k, g.s, [&](auto K, auto S) {
      constexpr int kK = decltype(K)::value, kS = decltype(S)::value;
      if (pr.channels_last) {
        correlate_block<kK, kS>(tile.data(), wt.data(), g, out);
      } else {
        correlate_plane<kK, kS>(tile.data(), wt.data(), g, out);
      }
    });
    A si[kLanes] = {}, qi[kLanes] = {};  // per image, then into the task totals
    sum_and_square(out, len, si, qi);
    for (int64_t j = 0; j < kLanes; ++j) {
      s[j] += si[j];
      q[j] += qi[j];
    }
    scatter(out, pr, n, t, HWo, io.conv);
  }
  const double count = static_cast<double>(pr.N * HWo);
  A mean[kLanes] = {}, scale[kLanes] = {}, beta[kLanes] = {};
  for (int64_t l = 0; l < t.lanes; ++l) {
    const int64_t c = t.c0 + l;
    A m, v;
    if (pr.batch_stats) {
      const double mu = channel_total(pr, s, l) / count;
      m = static_cast<A>(mu);
      v = static_cast<A>(std::max(0.0, channel_total(pr, q, l) / count - mu * mu));
    } else {
      m = static_cast<A>(io.rmean[c]);
      v = static_cast<A>(io.rvar[c]);
    }
    io.mean[c] = m;
    io.var[c] = v;
    set_slot(pr, mean, l, m);
    set_slot(pr, scale, l, static_cast<A>(io.gamma[c]) / std::sqrt(v + pr.eps));
    set_slot(pr, beta, l, static_cast<A>(io.beta[c]));
  }
  std::vector<A> y(len);
  for (int64_t n = 0; n < pr.N; ++n) {
    batch_norm_act(conv.data() + n * len, len, mean, scale, beta, pr.act, y.data());
    scatter(y.data(), pr, n, t, HWo, io.y);
  }
}

template <typename T, typename A>
struct BwdIO {
  const T* gy;
  const T* y;
  const T* x;
  const T* conv;
  const T* const* w;
  const T* gamma;
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
  const int64_t L = pr.L(), kk = g.k * g.k, HWo = g.Ho * g.Wo, len = round_up(HWo * L);
  const double count = static_cast<double>(pr.N * HWo);

  // Pass A: dz and the per-channel sums of dz and dz * (conv - mean).
  A mean[kLanes] = {};
  for (int64_t l = 0; l < t.lanes; ++l) set_slot(pr, mean, l, io.mean[t.c0 + l]);
  std::vector<A> dz(pr.N * len, A(0)), conv(pr.N * len, A(0)), gy(len, A(0)), y(len, A(0));
  A s[kLanes] = {}, q[kLanes] = {};
  for (int64_t n = 0; n < pr.N; ++n) {
    gather(io.gy, pr, n, t, g.Ho, g.Wo, gy.data(), g.Wo, 0);
    gather(io.y, pr, n, t, g.Ho, g.Wo, y.data(), g.Wo, 0);
    gather(io.conv, pr, n, t, g.Ho, g.Wo, conv.data() + n * len, g.Wo, 0);
    A si[kLanes] = {}, qi[kLanes] = {};
    masked_grad_sums(gy.data(), y.data(), conv.data() + n * len, len, mean, pr.act,
                     dz.data() + n * len, si, qi);
    for (int64_t j = 0; j < kLanes; ++j) {
      s[j] += si[j];
      q[j] += qi[j];
    }
  }
  // d(conv) = k_dz * dz + k_conv * (conv - mean) + k_const
  A k_dz[kLanes] = {}, k_conv[kLanes] = {}, k_const[kLanes] = {};
  for (int64_t l = 0; l < t.lanes; ++l) {
    const int64_t c = t.c0 + l;
    const double sdz = channel_total(pr, s, l), sdzx = channel_total(pr, q, l);
    const double rstd = 1.0 / std::sqrt(static_cast<double>(io.var[c]) + pr.eps);
    const double gamma = static_cast<double>(io.gamma[c]);
    io.gbeta[c] = static_cast<T>(sdz);
    io.ggamma[c] = static_cast<T>(sdzx * rstd);
    set_slot(pr, k_dz, l, static_cast<A>(gamma * rstd));
    if (pr.batch_stats) {
      set_slot(pr, k_conv, l, static_cast<A>(-gamma * rstd * rstd * rstd * sdzx / count));
      set_slot(pr, k_const, l, static_cast<A>(-gamma * rstd * sdz / count));
    }
  }

  // Pass B: per image, d(conv) -> weight gradient and input gradient.
  const bool scatter_dx = pr.stride == 2;
  const int64_t dl = scatter_dx ? 0 : g.p;  // stride 1: d(conv) inside a border of p
  const int64_t dpitch = scatter_dx ? g.Wo : g.Wp;
  const std::vector<A> wt = task_weights(pr, grp, t, io.w[t.g], !scatter_dx);
  std::vector<A> dtile((scatter_dx ? HWo : g.Hp * g.Wp) * L, A(0));
  std::vector<A> xtile(g.Hp * g.Wp * L, A(0));
  std::vector<A> dx((scatter_dx ? g.Hp * g.Wp : pr.H * pr.W) * L);
  std::vector<double> dw(kk * L, 0.0);
  for (int64_t n = 0; n < pr.N; ++n) {
    for (int64_t ho = 0; ho < g.Ho; ++ho) {
      const int64_t row = ho * g.Wo * L;
      conv_grad_row(dz.data() + n * len + row, conv.data() + n * len + row, g.Wo * L, k_dz,
                    k_conv, mean, k_const, dtile.data() + ((ho + dl) * dpitch + dl) * L);
    }
    gather(io.x, pr, n, t, pr.H, pr.W, xtile.data(), g.Wp, g.p * g.Wp + g.p);
    const A* dconv = dtile.data() + (dl * dpitch + dl) * L;
    if (scatter_dx) std::fill(dx.begin(), dx.end(), A(0));
    with_kernel(g.k, g.s, [&](auto K, auto S) {
      constexpr int kK = decltype(K)::value, kS = decltype(S)::value;
      if (pr.channels_last) {
        wgrad_block<kK, kS>(dconv, dpitch, xtile.data(), g, dw.data());
      } else {
        wgrad_plane<kK, kS>(dconv, dpitch, xtile.data(), g, dw.data());
      }
      if constexpr (kS == 1) {
        const Geom gd = make_geom(g.Ho, g.Wo, g.k, 1);
        if (pr.channels_last) {
          correlate_block<kK, 1>(dtile.data(), wt.data(), gd, dx.data());
        } else {
          correlate_plane<kK, 1>(dtile.data(), wt.data(), gd, dx.data());
        }
      }
    });
    if (scatter_dx) {
      scatter_stride2(dconv, wt.data(), g, L, dx.data());
      // the interior of the scatter tile is the input gradient; compact it in place
      for (int64_t h = 0; h < pr.H; ++h) {
        const A* src = dx.data() + ((h + g.p) * g.Wp + g.p) * L;
        std::copy(src, src + pr.W * L, dx.data() + h * pr.W * L);
      }
    }
    scatter(dx.data(), pr, n, t, pr.H * pr.W, io.gx);
  }
  for (int64_t l = 0; l < t.lanes; ++l) {
    T* gw = io.gw[t.g] + (t.c0 - grp.begin + l) * kk;
    for (int64_t i = 0; i < kk; ++i) gw[i] = static_cast<T>(dw[i * L + l]);
  }
}

// ------------------------------------------------------------------------------------------------
// Op entry points.

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> fwd_cpu(
    const at::Tensor& x_in, at::TensorList weights, const at::Tensor& bn_weight,
    const at::Tensor& bn_bias, const std::optional<at::Tensor>& running_mean,
    const std::optional<at::Tensor>& running_var, int64_t stride, bool use_batch_stats, double eps,
    std::string_view activation) {
  const Activation act = parse_activation(activation);
  const std::vector<Group> groups = check_and_group(x_in, weights, bn_weight, stride);
  TORCH_CHECK(x_in.device().is_cpu(), kOp, ": the CPU kernel got a tensor on ", x_in.device());
  TORCH_CHECK(bn_bias.sizes() == bn_weight.sizes(), kOp, ": bn_bias must have shape ",
              bn_weight.sizes(), ", got ", bn_bias.sizes());
  check_same(kOp, "bn_bias", bn_bias, x_in);
  if (!use_batch_stats) {
    TORCH_CHECK(running_mean.has_value() && running_var.has_value(), kOp,
                ": running statistics are required when batch statistics are not used");
    for (const at::Tensor* t : {&*running_mean, &*running_var}) {
      TORCH_CHECK(t->sizes() == bn_weight.sizes(), kOp, ": running statistics must have shape ",
                  bn_weight.sizes(), ", got ", t->sizes());
      check_same(kOp, "a running statistic", *t, x_in);
    }
  }
  TORCH_CHECK(eps > 0, kOp, ": eps must be positive, got ", eps);
  const at::MemoryFormat fmt = output_memory_format(x_in);
  const at::Tensor x = x_in.contiguous(fmt);
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t Ho = (H - 1) / stride + 1, Wo = (W - 1) / stride + 1;
  at::Tensor y = at::empty({N, C, Ho, Wo}, x.options().memory_format(fmt));
  at::Tensor conv = at::empty({N, C, Ho, Wo}, x.options().memory_format(fmt));
  const auto stats_type = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor mean = at::empty({C}, x.options().dtype(stats_type));
  at::Tensor var = at::empty({C}, x.options().dtype(stats_type));
  if (C == 0) return {y, conv, mean, var};
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
    const Problem<scalar_t, A> pr{N, C, H, W, stride, fmt == at::MemoryFormat::ChannelsLast,
                                  use_batch_stats, static_cast<A>(eps), act};
    std::vector<const scalar_t*> wp;
    for (const at::Tensor& t : w) wp.push_back(t.const_data_ptr<scalar_t>());
    const FwdIO<scalar_t, A> io{x.const_data_ptr<scalar_t>(), wp.data(),
                                gamma.const_data_ptr<scalar_t>(), beta.const_data_ptr<scalar_t>(),
                                use_batch_stats ? nullptr : rm.const_data_ptr<scalar_t>(),
                                use_batch_stats ? nullptr : rv.const_data_ptr<scalar_t>(),
                                y.mutable_data_ptr<scalar_t>(), conv.mutable_data_ptr<scalar_t>(),
                                mean.mutable_data_ptr<A>(), var.mutable_data_ptr<A>()};
    const std::vector<Task> tasks = make_tasks(groups, pr.channels_last);
    at::parallel_for(0, static_cast<int64_t>(tasks.size()), 1, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) fwd_task(pr, groups, io, tasks[i]);
    });
  });
  return {y, conv, mean, var};
}

std::tuple<at::Tensor, std::vector<at::Tensor>, at::Tensor, at::Tensor> bwd_cpu(
    const at::Tensor& grad_y, const at::Tensor& y_in, const at::Tensor& x_in,
    const at::Tensor& conv_in, at::TensorList weights, const at::Tensor& bn_weight,
    const at::Tensor& mean_in, const at::Tensor& var_in, int64_t stride, bool use_batch_stats,
    double eps, std::string_view activation) {
  const Activation act = parse_activation(activation);
  const std::vector<Group> groups = check_and_group(x_in, weights, bn_weight, stride);
  TORCH_CHECK(x_in.device().is_cpu(), kOp, ": the CPU kernel got a tensor on ", x_in.device());
  const int64_t N = x_in.size(0), C = x_in.size(1), H = x_in.size(2), W = x_in.size(3);
  const int64_t Ho = (H - 1) / stride + 1, Wo = (W - 1) / stride + 1;
  for (const at::Tensor* t : {&grad_y, &y_in, &conv_in}) {
    TORCH_CHECK(t->dim() == 4 && t->size(0) == N && t->size(1) == C && t->size(2) == Ho &&
                    t->size(3) == Wo,
                kOp, ": grad_y, y and conv must have shape [", N, ", ", C, ", ", Ho, ", ", Wo,
                "], got ", t->sizes());
    check_same(kOp, "grad_y/y/conv", *t, x_in);
  }
  const auto stats_type = x_in.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  for (const at::Tensor* t : {&mean_in, &var_in}) {
    TORCH_CHECK(t->dim() == 1 && t->size(0) == C && t->scalar_type() == stats_type, kOp,
                ": mean and var must be [", C, "] ", stats_type, ", got ", t->sizes(), " ",
                t->scalar_type());
  }
  const at::MemoryFormat fmt = output_memory_format(x_in);
  const at::Tensor x = x_in.contiguous(fmt), gy = grad_y.contiguous(fmt), y = y_in.contiguous(fmt),
                   conv = conv_in.contiguous(fmt);
  at::Tensor gx = at::empty({N, C, H, W}, x.options().memory_format(fmt));
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
  const at::Tensor gamma = bn_weight.contiguous(), mean = mean_in.contiguous(),
                   var = var_in.contiguous();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "mixed_dwconv_bn_act_bwd", [&] {
    using A = at::opmath_type<scalar_t>;
    const Problem<scalar_t, A> pr{N, C, H, W, stride, fmt == at::MemoryFormat::ChannelsLast,
                                  use_batch_stats, static_cast<A>(eps), act};
    std::vector<const scalar_t*> wp;
    std::vector<scalar_t*> gwp;
    for (size_t i = 0; i < w.size(); ++i) {
      wp.push_back(w[i].const_data_ptr<scalar_t>());
      gwp.push_back(gw[i].mutable_data_ptr<scalar_t>());
    }
    const BwdIO<scalar_t, A> io{gy.const_data_ptr<scalar_t>(),   y.const_data_ptr<scalar_t>(),
                                x.const_data_ptr<scalar_t>(),    conv.const_data_ptr<scalar_t>(),
                                wp.data(),                       gamma.const_data_ptr<scalar_t>(),
                                mean.const_data_ptr<A>(),        var.const_data_ptr<A>(),
                                gx.mutable_data_ptr<scalar_t>(), gwp.data(),
                                ggamma.mutable_data_ptr<scalar_t>(),
                                gbeta.mutable_data_ptr<scalar_t>()};
    const std::vector<Task> tasks = make_tasks(groups, pr.channels_last);
    at::parallel_for(0, static_cast<int64_t>(tasks.size()), 1, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) bwd_task(pr, groups, io, tasks[i]);
    });
  });
  return {gx, gw, ggamma, gbeta};
}

}  // namespace

TORCH_LIBRARY_IMPL(hrnas_kernels, CPU, m) {
  m.impl("mixed_dwconv_bn_act_fwd", &fwd_cpu);
  m.impl("mixed_dwconv_bn_act_bwd", &bwd_cpu);
}

}  // namespace mixed_dwconv
}  // namespace hrnas
