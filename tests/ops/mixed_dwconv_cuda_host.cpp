// Host replay of the CUDA kernels of mixed_dwconv_bn_act, for test_mixed_dwconv_cuda_host.py.
//
// Runs the launch plan of csrc/mixed_dwconv_bn_act/mixed_dwconv_bn_act_cuda.cu on CPU tensors:
// the same kernels in the same order, with the grids, CTAs and group tables the device header's
// launch geometry gives the .cu, every CTA thread by thread and phase by phase (a phase = the
// code between two __syncthreads of the kernel), the shared-memory tree reductions level by
// level in the kernel's order. The per-thread bodies and the geometry are the device header's
// own code; the phase structure of each __global__ is restated below, one function per kernel,
// and must follow the .cu when it changes. Memory the kernels write (outputs, scratch, shared
// memory at each CTA's start) is filled with NaN first, as uninitialised memory could hold
// anything: an element a kernel forgets to write, or a shared entry read before it is written,
// shows up as NaN.
//
// Kept under tests/: setup.py builds every csrc/**/*.cpp into hrnas_kernels._C, and this file
// is a test harness, not a kernel. Registered as torch.ops.<HRNAS_REPLAY_NS>.{fwd,bwd} with the
// schemas of the real ops (the namespace is a macro so a test can load a second, altered build).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cstdint>
#include <limits>
#include <optional>
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

// Every CTA (bx, by) of a 2-D grid; CTAs of one launch never communicate, so any order is one
// the GPU could take.
template <typename F>
void each_cta(int64_t grid_x, int64_t grid_y, const F& f) {
  for (int64_t by = 0; by < grid_y; ++by) {
    for (int64_t bx = 0; bx < grid_x; ++bx) f(bx, by);
  }
}

// One phase of a CTA: every thread (tx, ty) runs f up to the next barrier.
template <typename F>
void each_thread(const Tile& t, const F& f) {
  for (int ty = 0; ty < t.pt; ++ty) {
    for (int tx = 0; tx < t.ct; ++tx) f(tx, ty);
  }
}

// Every thread of a 1-D launch of blocks x kThreads threads, as its global index.
template <typename F>
void each_thread_1d(int64_t blocks, const F& f) {
  for (int64_t b = 0; b < blocks; ++b) {
    for (int tx = 0; tx < device::kThreads; ++tx) f(b, tx);
  }
}

// cta_reduce of the .cu: one phase per tree level (the barrier before it ends the writer phase).
template <typename V, typename Merge>
void cta_reduce(std::vector<V>& smem, const Tile& t, Merge merge) {
  for (int half = t.pt / 2; half > 0; half /= 2) {
    each_thread(t, [&](int tx, int ty) { device::tree_step(smem.data(), half, tx, ty, t, merge); });
  }
}

// ---------------------------------------------------------------------------------------------
// The kernels, as the .cu launches them.

template <typename T, typename A>
void fwd_conv_kernel(const FwdArgs<T, A>& a, int64_t grid_x, int64_t grid_y) {
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
void bwd_sums_kernel(const BwdArgs<T, A>& a, int64_t grid_x, int64_t grid_y) {
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
void wgrad_kernel(const BwdArgs<T, A>& a, int64_t grid_x, int64_t grid_y) {
  const Tile& t = a.tile;
  std::vector<A> smem(t.ct * t.pt);
  each_cta(grid_x, grid_y, [&](int64_t bx, int64_t by) {
    poison(smem);
    const int j = device::find_group(a.gs, by);
    // The kernel has no barrier between d(conv) and the first tap: this phase runs on.
    each_thread(t, [&](int tx, int ty) { device::wgrad_dconv_thread(a, j, bx, by, tx, ty); });
    device::with_kernel_size(a.gs.k[j], [&](auto kc) {
      constexpr int K = decltype(kc)::value;
      const int k = K > 0 ? K : a.gs.k[j];
      for (int ta = 0; ta < k; ++ta) {
        for (int tb = 0; tb < k; ++tb) {
          each_thread(t, [&](int tx, int ty) {
            smem[ty * t.ct + tx] = device::wgrad_tap_thread(a, j, bx, by, tx, ty, ta, tb);
          });
          cta_reduce(smem, t, [](A& x, const A& y) { device::sum_merge(x, y); });
          each_thread(t, [&](int tx, int ty) {
            if (ty == 0) device::wgrad_store_tap(a, j, bx, by, tx, ta * k + tb, smem[tx]);
          });
        }
      }
    });
  });
}

template <typename T, typename A>
void dgrad_kernel(const BwdArgs<T, A>& a, int64_t grid_x, int64_t grid_y) {
  each_cta(grid_x, grid_y, [&](int64_t bx, int64_t by) {
    const int j = device::find_group(a.gs, by);
    each_thread(a.tile, [&](int tx, int ty) {
      device::with_kernel_size(a.gs.k[j], [&](auto kc) {
        device::dgrad_thread<decltype(kc)::value>(a, j, bx, by, tx, ty);
      });
    });
  });
}

// ---------------------------------------------------------------------------------------------
// The op entry points: fwd_cuda / bwd_cuda of the .cu with launches replaced by the above.

at::Tensor nan_filled(at::IntArrayRef sizes, const at::TensorOptions& options) {
  return at::empty(sizes, options).fill_(std::numeric_limits<double>::quiet_NaN());
}

device::Geometry make_geometry(const at::Tensor& x, const at::Tensor& y, int64_t stride) {
  return device::make_geometry(x.sizes().data(), x.strides().data(), y.sizes().data(),
                               y.strides().data(), stride);
}

template <typename T>
std::vector<const T*> row_pointers(const std::vector<at::Tensor>& w) {
  std::vector<const T*> p;
  for (const at::Tensor& t : w) p.push_back(t.const_data_ptr<T>());
  return p;
}

std::vector<at::Tensor> contiguous_rows(at::TensorList weights) {
  std::vector<at::Tensor> w;
  for (const at::Tensor& t : weights) w.push_back(t.contiguous());
  return w;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> fwd(
    const at::Tensor& x_in, at::TensorList weights, const at::Tensor& bn_weight,
    const at::Tensor& bn_bias, const std::optional<at::Tensor>& running_mean,
    const std::optional<at::Tensor>& running_var, int64_t stride, bool use_batch_stats, double eps,
    std::string_view activation) {
  const Activation act = parse_activation(kOp, activation);
  const std::vector<Group> groups = check_and_group(x_in, weights, bn_weight, stride);
  check_forward_args(x_in, bn_weight, bn_bias, running_mean, running_var, use_batch_stats, eps);
  const at::MemoryFormat fmt = output_memory_format(x_in);
  const at::Tensor x = x_in.contiguous(fmt);
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t Ho = (H - 1) / stride + 1, Wo = (W - 1) / stride + 1;
  const at::TensorOptions out = x.options().memory_format(fmt);
  at::Tensor y = nan_filled({N, C, Ho, Wo}, out), conv = nan_filled({N, C, Ho, Wo}, out);
  const auto stats_type = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor mean = nan_filled({C}, x.options().dtype(stats_type));
  at::Tensor var = nan_filled({C}, x.options().dtype(stats_type));
  if (C == 0) return {y, conv, mean, var};
  const int64_t P = N * Ho * Wo;
  TORCH_CHECK(!use_batch_stats || P > 0, kOp, ": batch statistics of an empty batch");
  if (!use_batch_stats) {
    mean.copy_(*running_mean);
    var.copy_(*running_var);
    if (P == 0) return {y, conv, mean, var};
  }
  const bool channels_last = fmt == at::MemoryFormat::ChannelsLast;
  const Tile tile = device::tile_for(channels_last);
  const int64_t nbp = device::position_blocks(P, tile);
  const std::vector<at::Tensor> w = contiguous_rows(weights);
  const at::Tensor gamma = bn_weight.contiguous(), beta = bn_bias.contiguous();
  at::Tensor partial = nan_filled({use_batch_stats ? 2 * C * nbp : 0}, mean.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "mixed_dwconv_fwd_host", [&] {
    using A = at::opmath_type<scalar_t>;
    FwdArgs<scalar_t, A> a{};
    a.x = x.const_data_ptr<scalar_t>();
    a.gamma = gamma.const_data_ptr<scalar_t>();
    a.beta = beta.const_data_ptr<scalar_t>();
    a.conv = conv.mutable_data_ptr<scalar_t>();
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
    for (const auto& gs :
         device::group_tables(groups, row_pointers<scalar_t>(w), tile, &wtotal)) {
      a.gs = gs;
      fwd_conv_kernel(a, nbp, device::channel_tiles(gs));
    }
    if (use_batch_stats) {
      each_thread_1d(device::blocks_for(C), [&](int64_t b, int tx) {
        const int64_t c = b * device::kThreads + tx;
        if (c < a.g.A) device::fwd_stats_thread(a, c);
      });
      const int64_t numel = y.numel(), blocks = device::blocks_for(numel);
      each_thread_1d(blocks, [&](int64_t b, int tx) {
        for (int64_t off = b * device::kThreads + tx; off < numel;
             off += blocks * device::kThreads) {
          device::fwd_apply_thread(a, off, channels_last);
        }
      });
    }
  });
  return {y, conv, mean, var};
}

std::tuple<at::Tensor, std::vector<at::Tensor>, at::Tensor, at::Tensor> bwd(
    const at::Tensor& grad_y, const at::Tensor& y_in, const at::Tensor& x_in,
    const at::Tensor& conv_in, at::TensorList weights, const at::Tensor& bn_weight,
    const at::Tensor& mean_in, const at::Tensor& var_in, int64_t stride, bool use_batch_stats,
    double eps, std::string_view activation) {
  const Activation act = parse_activation(kOp, activation);
  const std::vector<Group> groups = check_and_group(x_in, weights, bn_weight, stride);
  check_backward_args(x_in, grad_y, y_in, conv_in, mean_in, var_in, stride);
  const int64_t N = x_in.size(0), C = x_in.size(1), H = x_in.size(2), W = x_in.size(3);
  const int64_t Ho = (H - 1) / stride + 1, Wo = (W - 1) / stride + 1;
  const at::MemoryFormat fmt = output_memory_format(x_in);
  const at::Tensor x = x_in.contiguous(fmt), gy = grad_y.contiguous(fmt), y = y_in.contiguous(fmt),
                   conv = conv_in.contiguous(fmt);
  at::Tensor gx = nan_filled({N, C, H, W}, x.options().memory_format(fmt));
  std::vector<at::Tensor> gw;
  for (const at::Tensor& t : weights) gw.push_back(nan_filled(t.sizes(), t.options()));
  at::Tensor ggamma = nan_filled({C}, bn_weight.options());
  at::Tensor gbeta = nan_filled({C}, bn_weight.options());
  const int64_t P = N * Ho * Wo;
  if (C == 0 || P == 0) {
    gx.zero_();
    for (at::Tensor& t : gw) t.zero_();
    ggamma.zero_();
    gbeta.zero_();
    return {gx, gw, ggamma, gbeta};
  }
  const bool channels_last = fmt == at::MemoryFormat::ChannelsLast;
  const Tile tile = device::tile_for(channels_last);
  const int64_t nbp = device::position_blocks(P, tile);
  const int64_t nbx = device::position_blocks(N * H * W, tile);
  const std::vector<at::Tensor> w = contiguous_rows(weights);
  const at::Tensor gamma = bn_weight.contiguous(), mean = mean_in.contiguous(),
                   var = var_in.contiguous();
  const at::TensorOptions acc_options = mean.options();
  at::Tensor sums = nan_filled({2 * C * nbp}, acc_options);
  at::Tensor coef = nan_filled({3 * C}, acc_options);
  at::Tensor dconv = nan_filled({N, C, Ho, Wo}, acc_options.memory_format(fmt));
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "mixed_dwconv_bwd_host", [&] {
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
    const std::vector<device::Groups<scalar_t>> tables =
        device::group_tables(groups, row_pointers<scalar_t>(w), tile, &a.wtotal);
    at::Tensor part = nan_filled({nbp * a.wtotal}, acc_options);
    a.part = part.mutable_data_ptr<A>();
    for (const auto& gs : tables) {
      a.gs = gs;
      bwd_sums_kernel(a, nbp, device::channel_tiles(gs));
    }
    each_thread_1d(device::blocks_for(C), [&](int64_t b, int tx) {
      const int64_t c = b * device::kThreads + tx;
      if (c < a.g.A) device::bwd_coef_thread(a, c);
    });
    for (const auto& gs : tables) {
      a.gs = gs;
      for (int j = 0; j < gs.n; ++j) a.gw[j] = gw[gs.src[j]].mutable_data_ptr<scalar_t>();
      wgrad_kernel(a, nbp, device::channel_tiles(gs));
      dgrad_kernel(a, nbx, device::channel_tiles(gs));
      const int64_t size = device::packed_weight_size(gs);
      each_thread_1d(device::blocks_for(size), [&](int64_t b, int tx) {
        const int64_t e = b * device::kThreads + tx;
        if (e < size) device::wgrad_sum_thread(a, a.gs.woff[0] + e);
      });
    }
  });
  return {gx, gw, ggamma, gbeta};
}

}  // namespace
}  // namespace mixed_dwconv
}  // namespace hrnas

// TORCH_LIBRARY stringifies its namespace argument; one more expansion lets it be a macro.
#define HRNAS_REPLAY_LIBRARY(ns, m) TORCH_LIBRARY(ns, m)

HRNAS_REPLAY_LIBRARY(HRNAS_REPLAY_NS, m) {
  m.def(
      "fwd(Tensor x, Tensor[] weights, Tensor bn_weight, Tensor bn_bias, Tensor? running_mean, "
      "Tensor? running_var, int stride, bool use_batch_stats, float eps, str activation) "
      "-> (Tensor, Tensor, Tensor, Tensor)",
      &hrnas::mixed_dwconv::fwd);
  m.def(
      "bwd(Tensor grad_y, Tensor y, Tensor x, Tensor conv, Tensor[] weights, Tensor bn_weight, "
      "Tensor mean, Tensor var, int stride, bool use_batch_stats, float eps, str activation) "
      "-> (Tensor, Tensor[], Tensor, Tensor)",
      &hrnas::mixed_dwconv::bwd);
}
