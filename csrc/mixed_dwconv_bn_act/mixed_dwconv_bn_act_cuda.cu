// Mixed-kernel depthwise conv + BatchNorm + activation on CUDA, forward and backward.
//
// Semantics are those of mixed_dwconv_bn_act_cpu.cpp (compact channels, argument checks, output
// layout rule of common/checks.h, running statistics passed through in eval); float64/32/16 and
// bfloat16 with float (double for float64) accumulation and statistics; NCHW and channels-last.
// The per-thread bodies, the launch geometry and the launch plan (device::forward / backward:
// checks, allocation, kernel arguments, the sequence of launches) live in
// mixed_dwconv_bn_act_device.h, host-callable; this file adds the kernels (the bodies between
// their CTA barriers and shared-memory tree reductions), the launcher and the op registration.
// tests/ops/mixed_dwconv_cuda_host.cpp replays the kernels on the host with the same plan: a
// change to a kernel's phases here must be made there too.
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
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

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
// Host side: the launcher of device::forward / device::backward (the launch plan).

struct CudaLaunch {
  cudaStream_t stream;

  static dim3 cta(const Tile& t) { return dim3(t.ct, t.pt); }
  static dim3 grid(int64_t x, int64_t y = 1) {
    return dim3(static_cast<unsigned>(x), static_cast<unsigned>(y));
  }

  at::Tensor empty(at::IntArrayRef sizes, const at::TensorOptions& options) const {
    return at::empty(sizes, options);
  }

  template <typename T, typename A>
  void fwd_conv(const FwdArgs<T, A>& a, int64_t grid_x, int64_t grid_y) const {
    const size_t smem = sizeof(Welford<A>) * a.tile.ct * a.tile.pt;
    fwd_conv_kernel<T, A><<<grid(grid_x, grid_y), cta(a.tile), smem, stream>>>(a);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  template <typename T, typename A>
  void fwd_stats(const FwdArgs<T, A>& a, int64_t blocks) const {
    fwd_stats_kernel<T, A><<<grid(blocks), kThreads, 0, stream>>>(a);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  template <typename T, typename A>
  void fwd_apply(const FwdArgs<T, A>& a, int64_t blocks, int64_t numel, bool channels_last) const {
    fwd_apply_kernel<T, A><<<grid(blocks), kThreads, 0, stream>>>(a, numel, channels_last);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  template <typename T, typename A>
  void bwd_sums(const BwdArgs<T, A>& a, int64_t grid_x, int64_t grid_y) const {
    const size_t smem = sizeof(Pair<A>) * a.tile.ct * a.tile.pt;
    bwd_sums_kernel<T, A><<<grid(grid_x, grid_y), cta(a.tile), smem, stream>>>(a);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  template <typename T, typename A>
  void bwd_coef(const BwdArgs<T, A>& a, int64_t blocks) const {
    bwd_coef_kernel<T, A><<<grid(blocks), kThreads, 0, stream>>>(a);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  template <typename T, typename A>
  void wgrad(const BwdArgs<T, A>& a, int64_t grid_x, int64_t grid_y) const {
    const size_t smem = sizeof(A) * a.tile.ct * a.tile.pt;
    wgrad_kernel<T, A><<<grid(grid_x, grid_y), cta(a.tile), smem, stream>>>(a);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  template <typename T, typename A>
  void dgrad(const BwdArgs<T, A>& a, int64_t grid_x, int64_t grid_y) const {
    dgrad_kernel<T, A><<<grid(grid_x, grid_y), cta(a.tile), 0, stream>>>(a);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  template <typename T, typename A>
  void wgrad_sum(const BwdArgs<T, A>& a, int64_t blocks, int64_t size) const {
    wgrad_sum_kernel<T, A><<<grid(blocks), kThreads, 0, stream>>>(a, size);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> fwd_cuda(
    const at::Tensor& x, at::TensorList weights, const at::Tensor& bn_weight,
    const at::Tensor& bn_bias, const std::optional<at::Tensor>& running_mean,
    const std::optional<at::Tensor>& running_var, int64_t stride, bool use_batch_stats, double eps,
    std::string_view activation, bool save_tape) {
  TORCH_CHECK(x.is_cuda(), kOp, ": the CUDA kernel got a tensor on ", x.device());
  const c10::cuda::CUDAGuard guard(x.device());
  const CudaLaunch launch{c10::cuda::getCurrentCUDAStream()};
  return device::forward(launch, x, weights, bn_weight, bn_bias, running_mean, running_var,
                         stride, use_batch_stats, eps, activation, save_tape);
}

std::tuple<at::Tensor, std::vector<at::Tensor>, at::Tensor, at::Tensor> bwd_cuda(
    const at::Tensor& grad_y, const at::Tensor& y, const at::Tensor& x, const at::Tensor& conv,
    at::TensorList weights, const at::Tensor& bn_weight, const at::Tensor& bn_bias,
    const at::Tensor& mean, const at::Tensor& var, int64_t stride, bool use_batch_stats,
    double eps, std::string_view activation) {
  TORCH_CHECK(x.is_cuda(), kOp, ": the CUDA kernel got a tensor on ", x.device());
  const c10::cuda::CUDAGuard guard(x.device());
  const CudaLaunch launch{c10::cuda::getCurrentCUDAStream()};
  return device::backward(launch, grad_y, y, x, conv, weights, bn_weight, bn_bias, mean, var,
                          stride, use_batch_stats, eps, activation);
}

}  // namespace

TORCH_LIBRARY_IMPL(hrnas_kernels, CUDA, m) {
  m.impl("mixed_dwconv_bn_act_fwd", &fwd_cuda);
  m.impl("mixed_dwconv_bn_act_bwd", &bwd_cuda);
}

}  // namespace mixed_dwconv
}  // namespace hrnas
