// Host replay of the CUDA kernels of mixed_dwconv_bn_act, for test_mixed_dwconv_cuda_host.py.
//
// Runs the launch plan of csrc/mixed_dwconv_bn_act/mixed_dwconv_bn_act_cuda.cu on CPU tensors:
// the plan itself (device::forward / device::backward of the device header: checks, allocation,
// kernel arguments, grids, group tables, launch order) is the .cu's own code, over a launcher
// that runs each kernel on the host instead of launching it: every CTA of the grid, thread by
// thread and phase by phase (a phase = the code between two __syncthreads of the kernel), the
// shared-memory tree reductions level by level in the kernel's order, with the kernels' own
// per-thread bodies. Only each __global__'s phase structure is restated here, one member per
// kernel, and must follow the .cu when it changes. Memory the kernels write (outputs, scratch,
// shared memory at each CTA's start) starts as NaN, as uninitialised memory could hold anything:
// an element a kernel forgets to write, or a shared entry read before it is written, shows up.
//
// Kept under tests/: setup.py builds every csrc/**/*.cpp into hrnas_kernels._C, and this file
// is a test harness, not a kernel. Registered as torch.ops.<HRNAS_REPLAY_NS>.{fwd,bwd} with the
// schemas of the real ops, all four dtypes of the .cu (c10::Half / BFloat16 in host arithmetic),
// and as {fwd,bwd}_reversed, the same with CTAs and threads run last to first (the namespace is
// a macro so a test can load a second, altered build).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <optional>
#include <string>
#include <string_view>
#include <tuple>
#include <vector>

#include "mixed_dwconv_bn_act/mixed_dwconv_bn_act.h"
#include "mixed_dwconv_bn_act/mixed_dwconv_bn_act_device.h"

#ifndef HRNAS_REPLAY_NS
#define HRNAS_REPLAY_NS hrnas_cuda_host
#endif

namespace hrnas {
namespace mixed_dwconv {
namespace {

using device::BwdArgs;
using device::FwdArgs;
using device::Pair;
using device::Tile;
using device::Welford;

template <typename A>
constexpr A kNaN = std::numeric_limits<A>::quiet_NaN();

// Shared memory at a CTA's start: values no correct kernel reads before writing.
template <typename A>
void poison(std::vector<Welford<A>>& s) {
  std::fill(s.begin(), s.end(), Welford<A>{kNaN<A>, kNaN<A>, -1});
}
template <typename A>
void poison(std::vector<Pair<A>>& s) {
  std::fill(s.begin(), s.end(), Pair<A>{kNaN<A>, kNaN<A>});
}
template <typename A>
void poison(std::vector<A>& s) {
  std::fill(s.begin(), s.end(), kNaN<A>);
}

// ---------------------------------------------------------------------------------------------
// The launcher: each kernel of the .cu, run on the host.

struct HostLaunch {
  // Runs the CTAs of a grid and the threads of a phase last to first: the results must not
  // change, as nothing orders the threads of a phase (or the CTAs of a launch) on a GPU.
  bool reversed;

  // The i-th of n in the replay's order.
  int64_t nth(int64_t i, int64_t n) const { return reversed ? n - 1 - i : i; }

  // Every CTA (bx, by) of a 2-D grid.
  template <typename F>
  void each_cta(int64_t grid_x, int64_t grid_y, const F& f) const {
    for (int64_t i = 0; i < grid_x * grid_y; ++i) {
      const int64_t b = nth(i, grid_x * grid_y);
      f(b % grid_x, b / grid_x);
    }
  }

  // One phase of a CTA: every thread (tx, ty) runs f up to the next barrier.
  template <typename F>
  void each_thread(const Tile& t, const F& f) const {
    TORCH_CHECK(t.ct * t.pt <= device::kThreads, "a CTA over the kernels' __launch_bounds__");
    for (int i = 0; i < t.ct * t.pt; ++i) {
      const int n = static_cast<int>(nth(i, t.ct * t.pt));
      f(n % t.ct, n / t.ct);
    }
  }

  // Every thread of a 1-D launch of blocks x kThreads threads, by its global index.
  template <typename F>
  void each_thread_1d(int64_t blocks, const F& f) const {
    for (int64_t i = 0; i < blocks * device::kThreads; ++i) f(nth(i, blocks * device::kThreads));
  }

  // cta_reduce of the .cu: one phase per tree level (its first barrier ends the writers' phase).
  template <typename V, typename Merge>
  void cta_reduce(std::vector<V>& smem, const Tile& t, Merge merge) const {
    for (int half = t.pt / 2; half > 0; half /= 2) {
      each_thread(t, [&](int tx, int ty) {
        device::tree_step(smem.data(), half, tx, ty, t, merge);
      });
    }
  }

  at::Tensor empty(at::IntArrayRef sizes, const at::TensorOptions& options) const {
    return at::empty(sizes, options).fill_(std::numeric_limits<double>::quiet_NaN());
  }

  template <typename T, typename A>
  void fwd_conv(const FwdArgs<T, A>& a, int64_t grid_x, int64_t grid_y) const {
    const Tile& t = a.tile;
    std::vector<Welford<A>> smem(t.ct * t.pt);
    each_cta(grid_x, grid_y, [&](int64_t bx, int64_t by) {
      poison(smem);
      const int j = device::find_group(a.gs, by);
      each_thread(t, [&](int tx, int ty) {
        Welford<A> st;
        device::with_kernel_size(a.gs.k[j], [&](auto kc) {
          st = device::fwd_conv_thread<decltype(kc)::value>(a, j, bx, by, tx, ty);
        });
        if (a.batch_stats) smem[ty * t.ct + tx] = st;
      });
      if (!a.batch_stats) return;
      cta_reduce(smem, t, [](Welford<A>& x, const Welford<A>& y) { device::welford_merge(x, y); });
      each_thread(t, [&](int tx, int ty) {
        if (ty == 0) device::fwd_store_partial(a, j, bx, by, tx, smem[tx]);
      });
    });
  }

  template <typename T, typename A>
  void fwd_stats(const FwdArgs<T, A>& a, int64_t blocks) const {
    each_thread_1d(blocks, [&](int64_t c) {
      if (c < a.g.A) device::fwd_stats_thread(a, c);
    });
  }

  template <typename T, typename A>
  void fwd_apply(const FwdArgs<T, A>& a, int64_t blocks, int64_t numel, bool channels_last) const {
    each_thread_1d(blocks, [&](int64_t first) {  // a grid-stride loop
      for (int64_t off = first; off < numel; off += blocks * device::kThreads) {
        device::fwd_apply_thread(a, off, channels_last);
      }
    });
  }

  template <typename T, typename A>
  void bwd_sums(const BwdArgs<T, A>& a, int64_t grid_x, int64_t grid_y) const {
    const Tile& t = a.tile;
    std::vector<Pair<A>> smem(t.ct * t.pt);
    each_cta(grid_x, grid_y, [&](int64_t bx, int64_t by) {
      poison(smem);
      const int j = device::find_group(a.gs, by);
      each_thread(t, [&](int tx, int ty) {
        smem[ty * t.ct + tx] = device::bwd_sums_thread(a, j, bx, by, tx, ty);
      });
      cta_reduce(smem, t, [](Pair<A>& x, const Pair<A>& y) { device::pair_merge(x, y); });
      each_thread(t, [&](int tx, int ty) {
        if (ty == 0) device::bwd_store_sums(a, j, bx, by, tx, smem[tx]);
      });
    });
  }

  template <typename T, typename A>
  void bwd_coef(const BwdArgs<T, A>& a, int64_t blocks) const {
    each_thread_1d(blocks, [&](int64_t c) {
      if (c < a.g.A) device::bwd_coef_thread(a, c);
    });
  }

  template <typename T, typename A>
  void wgrad(const BwdArgs<T, A>& a, int64_t grid_x, int64_t grid_y) const {
    const Tile& t = a.tile;
    std::vector<A> smem(t.ct * t.pt);
    each_cta(grid_x, grid_y, [&](int64_t bx, int64_t by) {
      poison(smem);
      const int j = device::find_group(a.gs, by);
      // The kernel has no barrier between d(conv) and the first tap: one phase.
      each_thread(t, [&](int tx, int ty) {
        device::wgrad_dconv_thread(a, j, bx, by, tx, ty);
        smem[ty * t.ct + tx] = device::wgrad_tap_thread(a, j, bx, by, tx, ty, 0, 0);
      });
      device::with_kernel_size(a.gs.k[j], [&](auto kc) {
        constexpr int K = decltype(kc)::value;
        const int k = K > 0 ? K : a.gs.k[j];
        for (int tap = 0; tap < k * k; ++tap) {
          if (tap > 0) {
            each_thread(t, [&](int tx, int ty) {
              smem[ty * t.ct + tx] =
                  device::wgrad_tap_thread(a, j, bx, by, tx, ty, tap / k, tap % k);
            });
          }
          cta_reduce(smem, t, [](A& x, const A& y) { device::sum_merge(x, y); });
          each_thread(t, [&](int tx, int ty) {
            if (ty == 0) device::wgrad_store_tap(a, j, bx, by, tx, tap, smem[tx]);
          });
        }
      });
    });
  }

  template <typename T, typename A>
  void dgrad(const BwdArgs<T, A>& a, int64_t grid_x, int64_t grid_y) const {
    each_cta(grid_x, grid_y, [&](int64_t bx, int64_t by) {
      const int j = device::find_group(a.gs, by);
      each_thread(a.tile, [&](int tx, int ty) {
        device::with_kernel_size(a.gs.k[j], [&](auto kc) {
          device::dgrad_thread<decltype(kc)::value>(a, j, bx, by, tx, ty);
        });
      });
    });
  }

  template <typename T, typename A>
  void wgrad_sum(const BwdArgs<T, A>& a, int64_t blocks, int64_t size) const {
    each_thread_1d(blocks, [&](int64_t e) {
      if (e < size) device::wgrad_sum_thread(a, a.gs.woff[0] + e);
    });
  }
};

template <bool Reversed>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> fwd(
    const at::Tensor& x, at::TensorList weights, const at::Tensor& bn_weight,
    const at::Tensor& bn_bias, const std::optional<at::Tensor>& running_mean,
    const std::optional<at::Tensor>& running_var, int64_t stride, bool use_batch_stats, double eps,
    std::string_view activation, bool save_tape) {
  TORCH_CHECK(x.device().is_cpu(), kOp, ": the host replay runs on CPU tensors");
  const HostLaunch launch{Reversed};
  return device::forward(launch, x, weights, bn_weight, bn_bias, running_mean, running_var,
                         stride, use_batch_stats, eps, activation, save_tape);
}

template <bool Reversed>
std::tuple<at::Tensor, std::vector<at::Tensor>, at::Tensor, at::Tensor> bwd(
    const at::Tensor& grad_y, const at::Tensor& y, const at::Tensor& x, const at::Tensor& conv,
    at::TensorList weights, const at::Tensor& bn_weight, const at::Tensor& bn_bias,
    const at::Tensor& mean, const at::Tensor& var, int64_t stride, bool use_batch_stats,
    double eps, std::string_view activation) {
  TORCH_CHECK(x.device().is_cpu(), kOp, ": the host replay runs on CPU tensors");
  const HostLaunch launch{Reversed};
  return device::backward(launch, grad_y, y, x, conv, weights, bn_weight, bn_bias, mean, var,
                          stride, use_batch_stats, eps, activation);
}

}  // namespace
}  // namespace mixed_dwconv
}  // namespace hrnas

// TORCH_LIBRARY stringifies its namespace argument; one more expansion lets it be a macro.
#define HRNAS_REPLAY_LIBRARY(ns, m) TORCH_LIBRARY(ns, m)

namespace {

constexpr const char* kFwdSchema =
    "(Tensor x, Tensor[] weights, Tensor bn_weight, Tensor bn_bias, Tensor? running_mean, "
    "Tensor? running_var, int stride, bool use_batch_stats, float eps, str activation, "
    "bool save_tape=True) -> (Tensor, Tensor, Tensor, Tensor)";
constexpr const char* kBwdSchema =
    "(Tensor grad_y, Tensor y, Tensor x, Tensor conv, Tensor[] weights, Tensor bn_weight, "
    "Tensor bn_bias, Tensor mean, Tensor var, int stride, bool use_batch_stats, float eps, "
    "str activation) "
    "-> (Tensor, Tensor[], Tensor, Tensor)";

}  // namespace

// fwd / bwd: the real ops' schemas; *_reversed: the same, CTAs and threads run last to first.
HRNAS_REPLAY_LIBRARY(HRNAS_REPLAY_NS, m) {
  m.def((std::string("fwd") + kFwdSchema).c_str(), &hrnas::mixed_dwconv::fwd<false>);
  m.def((std::string("bwd") + kBwdSchema).c_str(), &hrnas::mixed_dwconv::bwd<false>);
  m.def((std::string("fwd_reversed") + kFwdSchema).c_str(), &hrnas::mixed_dwconv::fwd<true>);
  m.def((std::string("bwd_reversed") + kBwdSchema).c_str(), &hrnas::mixed_dwconv::bwd<true>);
}
