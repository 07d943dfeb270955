// Mixed-kernel depthwise conv + BatchNorm + activation on CUDA, forward and backward.
//
// Semantics are those of mixed_dwconv_bn_act_cpu.cpp (compact channels, argument checks, output
// layout rule of common/checks.h, running statistics passed through in eval); float64/32/16 and
// bfloat16 with float (double for float64) accumulation and statistics; NCHW and channels-last.
// The per-thread bodies and the launch geometry live in mixed_dwconv_bn_act_device.h
// (host-callable); this file adds the CTA reductions, the launches and the op entry points.
// tests/ops/mixed_dwconv_cuda_host.cpp replays these kernels on the host: keep the two in step.
//
// Every kernel that convolves covers all kernel-size groups in one launch (a group table, up to
// kMaxGroups groups; the CTA's group is uniform, so the switch on its kernel size does not
// diverge): k = 3, 5 and 7 run with the size as a template constant (taps fully unrolled), other
// odd sizes through the same body with a runtime size.
// Forward, batch statistics (3 launches): (1) conv -> the tape `conv` (the schema keeps it for
// backward) + per-CTA Welford partials (mean, M2) per channel, reduced in a fixed tree in shared
// memory; (2) one thread per channel merges its blocks' partials in block order (deterministic,
// no atomics); (3) y = act(BN(conv)), elementwise in memory order. Running statistics: (1) alone,
// writing y too.
// Backward (5 launches): (1) per-CTA partial sums of dz and dz * (conv - mean); (2) one thread
// per channel: grad gamma / beta and the coefficients of d(conv); (3) d(conv) of each position,
// stored once (fp32), then per tap the CTA's partial of sum d(conv) * x, tree-reduced; (4) grad x
// as a gather over the k x k output pixels reading each input pixel, from the stored d(conv) (one
// load per tap instead of grad_y, y and conv); (5) one thread per weight element sums the
// partials in block order. Deterministic: fixed reduction orders, no atomics.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <string_view>
#include <tuple>
#include <vector>

#include "mixed_dwconv_bn_act/mixed_dwconv_bn_act.h"
#include "mixed_dwconv_bn_act/mixed_dwconv_bn_act_device.h"

namespace hrnas {
namespace mixed_dwconv {
namespace {

using device::BwdArgs;
using device::FwdArgs;
using device::Geometry;
using device::kThreads;
using device::Pair;
using device::Tile;
using device::Welford;
using device::with_kernel_size;

// Tree reduction over the position lanes of the CTA's shared-memory array; lane ty == 0 ends
// with the CTA's value for channel lane tx.
template <typename V, typename Merge>
__device__ void cta_reduce(V* smem, const Tile& t, Merge merge) {
  __syncthreads();
  for (int half = t.pt / 2; half > 0; half /= 2) {
    device::tree_step(smem, half, threadIdx.x, threadIdx.y, t, merge);
    __syncthreads();
  }
}

// ---------------------------------------------------------------------------------------------
// Kernels

template <typename T, typename A>
__global__ void __launch_bounds__(kThreads)
    fwd_conv_kernel(const __grid_constant__ FwdArgs<T, A> a) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  auto* smem = reinterpret_cast<Welford<A>*>(smem_raw);
  const int j = device::find_group(a.gs, blockIdx.y);
  Welford<A> st;
  with_kernel_size(a.gs.k[j], [&](auto kc) {
    st = device::fwd_conv_thread<decltype(kc)::value>(a, j, blockIdx.x, blockIdx.y, threadIdx.x,
                                                      threadIdx.y);
  });
  if (!a.batch_stats) return;  // uniform over the grid
  smem[threadIdx.y * a.tile.ct + threadIdx.x] = st;
  cta_reduce(smem, a.tile, [](Welford<A>& x, const Welford<A>& y) { device::welford_merge(x, y); });
  if (threadIdx.y == 0) {
    device::fwd_store_partial(a, j, blockIdx.x, blockIdx.y, threadIdx.x, smem[threadIdx.x]);
  }
}

template <typename T, typename A>
__global__ void __launch_bounds__(kThreads)
    fwd_stats_kernel(const __grid_constant__ FwdArgs<T, A> a) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c < a.g.A) device::fwd_stats_thread(a, c);
}

template <typename T, typename A>
__global__ void __launch_bounds__(kThreads)
    fwd_apply_kernel(const __grid_constant__ FwdArgs<T, A> a, int64_t numel, bool channels_last) {
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t off = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; off < numel;
       off += step) {
    device::fwd_apply_thread(a, off, channels_last);
  }
}

template <typename T, typename A>
__global__ void __launch_bounds__(kThreads)
    bwd_sums_kernel(const __grid_constant__ BwdArgs<T, A> a) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  auto* smem = reinterpret_cast<Pair<A>*>(smem_raw);
  const int j = device::find_group(a.gs, blockIdx.y);
  smem[threadIdx.y * a.tile.ct + threadIdx.x] =
      device::bwd_sums_thread(a, j, blockIdx.x, blockIdx.y, threadIdx.x, threadIdx.y);
  cta_reduce(smem, a.tile, [](Pair<A>& x, const Pair<A>& y) { device::pair_merge(x, y); });
  if (threadIdx.y == 0) {
    device::bwd_store_sums(a, j, blockIdx.x, blockIdx.y, threadIdx.x, smem[threadIdx.x]);
  }
}

template <typename T, typename A>
__global__ void __launch_bounds__(kThreads)
    bwd_coef_kernel(const __grid_constant__ BwdArgs<T, A> a) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c < a.g.A) device::bwd_coef_thread(a, c);
}

template <typename T, typename A>
__global__ void __launch_bounds__(kThreads)
    wgrad_kernel(const __grid_constant__ BwdArgs<T, A> a) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  auto* smem = reinterpret_cast<A*>(smem_raw);
  const int j = device::find_group(a.gs, blockIdx.y);
  const int tx = threadIdx.x, ty = threadIdx.y;
  device::wgrad_dconv_thread(a, j, blockIdx.x, blockIdx.y, tx, ty);
  // each thread reads back only the d(conv) values it wrote: no barrier needed before the taps
  with_kernel_size(a.gs.k[j], [&](auto kc) {
    constexpr int K = decltype(kc)::value;
    const int k = K > 0 ? K : a.gs.k[j];
#pragma unroll
    for (int ta = 0; ta < k; ++ta) {
#pragma unroll
      for (int tb = 0; tb < k; ++tb) {
        smem[ty * a.tile.ct + tx] =
            device::wgrad_tap_thread(a, j, blockIdx.x, blockIdx.y, tx, ty, ta, tb);
        cta_reduce(smem, a.tile, [](A& x, const A& y) { device::sum_merge(x, y); });
        if (ty == 0) {
          device::wgrad_store_tap(a, j, blockIdx.x, blockIdx.y, tx, ta * k + tb, smem[tx]);
        }
        __syncthreads();  // lane 0 has read smem before the next tap overwrites it
      }
    }
  });
}

template <typename T, typename A>
__global__ void __launch_bounds__(kThreads)
    dgrad_kernel(const __grid_constant__ BwdArgs<T, A> a) {
  const int j = device::find_group(a.gs, blockIdx.y);
  with_kernel_size(a.gs.k[j], [&](auto kc) {
    device::dgrad_thread<decltype(kc)::value>(a, j, blockIdx.x, blockIdx.y, threadIdx.x,
                                              threadIdx.y);
  });
}

template <typename T, typename A>
__global__ void __launch_bounds__(kThreads)
    wgrad_sum_kernel(const __grid_constant__ BwdArgs<T, A> a, int64_t size) {
  const int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e < size) device::wgrad_sum_thread(a, a.gs.woff[0] + e);
}

// ---------------------------------------------------------------------------------------------
// Host side

Geometry make_geometry(const at::Tensor& x, const at::Tensor& y, int64_t stride) {
  return device::make_geometry(x.sizes().data(), x.strides().data(), y.sizes().data(),
                               y.strides().data(), stride);
}

template <typename T>
std::vector<const T*> row_pointers(const std::vector<at::Tensor>& w) {
  std::vector<const T*> p;
  for (const at::Tensor& t : w) p.push_back(t.const_data_ptr<T>());
  return p;
}

dim3 cta(const Tile& t) { return dim3(t.ct, t.pt); }

template <typename T>
dim3 grid(int64_t blocks, const device::Groups<T>& gs) {
  return dim3(static_cast<unsigned>(blocks), static_cast<unsigned>(device::channel_tiles(gs)));
}

unsigned blocks_for(int64_t n) { return static_cast<unsigned>(device::blocks_for(n)); }

std::vector<at::Tensor> contiguous_rows(at::TensorList weights) {
  std::vector<at::Tensor> w;
  for (const at::Tensor& t : weights) w.push_back(t.contiguous());
  return w;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> fwd_cuda(
    const at::Tensor& x_in, at::TensorList weights, const at::Tensor& bn_weight,
    const at::Tensor& bn_bias, const std::optional<at::Tensor>& running_mean,
    const std::optional<at::Tensor>& running_var, int64_t stride, bool use_batch_stats, double eps,
    std::string_view activation) {
  const Activation act = parse_activation(kOp, activation);
  const std::vector<Group> groups = check_and_group(x_in, weights, bn_weight, stride);
  TORCH_CHECK(x_in.is_cuda(), kOp, ": the CUDA kernel got a tensor on ", x_in.device());
  check_forward_args(x_in, bn_weight, bn_bias, running_mean, running_var, use_batch_stats, eps);
  const c10::cuda::CUDAGuard guard(x_in.device());
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
  const int64_t P = N * Ho * Wo;
  if (use_batch_stats) {
    TORCH_CHECK(P > 0, kOp, ": batch statistics of an empty batch are undefined");
  } else {
    mean.copy_(*running_mean);
    var.copy_(*running_var);
    if (P == 0) return {y, conv, mean, var};
  }
  const bool channels_last = fmt == at::MemoryFormat::ChannelsLast;
  const Tile tile = device::tile_for(channels_last);
  const int64_t nbp = device::position_blocks(P, tile);
  const std::vector<at::Tensor> w = contiguous_rows(weights);
  const at::Tensor gamma = bn_weight.contiguous(), beta = bn_bias.contiguous();
  at::Tensor partial = at::empty({use_batch_stats ? 2 * C * nbp : 0}, mean.options());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "mixed_dwconv_fwd",
                                  [&] {
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
    const size_t smem = sizeof(Welford<A>) * tile.ct * tile.pt;
    for (const auto& gs :
         device::group_tables(groups, row_pointers<scalar_t>(w), tile, &wtotal)) {
      a.gs = gs;
      fwd_conv_kernel<scalar_t, A><<<grid(nbp, gs), cta(tile), smem, stream>>>(a);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    if (use_batch_stats) {
      fwd_stats_kernel<scalar_t, A><<<blocks_for(C), kThreads, 0, stream>>>(a);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      fwd_apply_kernel<scalar_t, A>
          <<<blocks_for(y.numel()), kThreads, 0, stream>>>(a, y.numel(), channels_last);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return {y, conv, mean, var};
}

std::tuple<at::Tensor, std::vector<at::Tensor>, at::Tensor, at::Tensor> bwd_cuda(
    const at::Tensor& grad_y, const at::Tensor& y_in, const at::Tensor& x_in,
    const at::Tensor& conv_in, at::TensorList weights, const at::Tensor& bn_weight,
    const at::Tensor& mean_in, const at::Tensor& var_in, int64_t stride, bool use_batch_stats,
    double eps, std::string_view activation) {
  const Activation act = parse_activation(kOp, activation);
  const std::vector<Group> groups = check_and_group(x_in, weights, bn_weight, stride);
  TORCH_CHECK(x_in.is_cuda(), kOp, ": the CUDA kernel got a tensor on ", x_in.device());
  check_backward_args(x_in, grad_y, y_in, conv_in, mean_in, var_in, stride);
  const int64_t N = x_in.size(0), C = x_in.size(1), H = x_in.size(2), W = x_in.size(3);
  const int64_t Ho = (H - 1) / stride + 1, Wo = (W - 1) / stride + 1;
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::MemoryFormat fmt = output_memory_format(x_in);
  const at::Tensor x = x_in.contiguous(fmt), gy = grad_y.contiguous(fmt), y = y_in.contiguous(fmt),
                   conv = conv_in.contiguous(fmt);
  at::Tensor gx = at::empty({N, C, H, W}, x.options().memory_format(fmt));
  std::vector<at::Tensor> gw;
  for (const at::Tensor& t : weights) gw.push_back(at::empty(t.sizes(), t.options()));
  at::Tensor ggamma = at::empty({C}, bn_weight.options());
  at::Tensor gbeta = at::empty({C}, bn_weight.options());
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
  const Tile tile = device::tile_for(channels_last);
  const int64_t nbp = device::position_blocks(P, tile);
  const int64_t nbx = device::position_blocks(N * H * W, tile);
  const std::vector<at::Tensor> w = contiguous_rows(weights);
  const at::Tensor gamma = bn_weight.contiguous(), mean = mean_in.contiguous(),
                   var = var_in.contiguous();
  const at::TensorOptions acc_options = mean.options();
  at::Tensor sums = at::empty({2 * C * nbp}, acc_options);
  at::Tensor coef = at::empty({3 * C}, acc_options);
  at::Tensor dconv = at::empty({N, C, Ho, Wo}, acc_options.memory_format(fmt));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
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
    const std::vector<device::Groups<scalar_t>> tables =
        device::group_tables(groups, row_pointers<scalar_t>(w), tile, &a.wtotal);
    at::Tensor part = at::empty({nbp * a.wtotal}, acc_options);
    a.part = part.mutable_data_ptr<A>();
    const int threads = tile.ct * tile.pt;
    for (const auto& gs : tables) {
      a.gs = gs;
      bwd_sums_kernel<scalar_t, A>
          <<<grid(nbp, gs), cta(tile), sizeof(Pair<A>) * threads, stream>>>(a);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    bwd_coef_kernel<scalar_t, A><<<blocks_for(C), kThreads, 0, stream>>>(a);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    for (const auto& gs : tables) {
      a.gs = gs;
      for (int j = 0; j < gs.n; ++j) a.gw[j] = gw[gs.src[j]].mutable_data_ptr<scalar_t>();
      wgrad_kernel<scalar_t, A>
          <<<grid(nbp, gs), cta(tile), sizeof(A) * threads, stream>>>(a);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      dgrad_kernel<scalar_t, A><<<grid(nbx, gs), cta(tile), 0, stream>>>(a);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      const int64_t size = device::packed_weight_size(gs);
      wgrad_sum_kernel<scalar_t, A><<<blocks_for(size), kThreads, 0, stream>>>(a, size);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return {gx, gw, ggamma, gbeta};
}

}  // namespace

TORCH_LIBRARY_IMPL(hrnas_kernels, CUDA, m) {
  m.impl("mixed_dwconv_bn_act_fwd", &fwd_cuda);
  m.impl("mixed_dwconv_bn_act_bwd", &bwd_cuda);
}

}  // namespace mixed_dwconv
}  // namespace hrnas
