// Multi-resolution fusion on CUDA: out = act(sum_j resize(x_j, (H, W))) in one kernel launch, and
// an atomic-free, deterministic gather backward in at most two launches.
//
// Semantics are those of multires_fusion_cpu.cpp (argument checks, the output layout rule of
// common/checks.h, identity-size inputs used as is, NaN behaviour) and the source pixels and
// weights are those of F.interpolate(align_corners=False), through the shared bilinear_tap and
// nearest_tap of multires_fusion.h. NCHW and channels-last; float64/32/16 and bfloat16, with
// float (double for float64) accumulation.
//
// Work split. Resampling taps depend only on the spatial position, never on (n, c), so one thread
// computes the taps of its position once and applies them to P "planes" that share them: (n, c)
// planes for NCHW, images n for channels-last. P (<= kPlanes) is picked per launch so that the
// grid still has about kTargetThreads threads: large tensors amortise the tap math (float <-> int
// conversions run at 1/8 of the FMA rate), small ones keep every SM busy.
//   forward NCHW : a thread owns kVec consecutive outputs along W of one row, for P planes.
//   forward NHWC : a thread owns kVec consecutive channels of one output pixel, for P images.
// Identity-size inputs and the output move as kVec-wide packs (16 bytes where the shape and
// pointer alignment allow, else 8, 4 ... bytes); resampled inputs are gathered (packs along C for
// NHWC). Each input is read once and the output written once, so the kernel moves only the
// compulsory bytes; the re-reads of the small inputs that neighbouring outputs share hit L1/L2.
//
// Backward. gm = grad_out * act'(out) is materialised once by an elementwise kernel into the
// gradient of the first input that already has the output size, when there is one: that write is
// compulsory anyway, and every resampled input then reads gm (one tensor) instead of grad_out and
// out (two). Without such an input, gm is recomputed on the fly in the gather from grad_out and
// out, which costs no scratch tensor and no extra pass. All other gradients come from ONE gather
// launch over the concatenated elements of those inputs (an identity-size duplicate is a copy of
// gm). Each thread owns one input-gradient element (NCHW) or kVec channels of one input pixel
// (NHWC), for P planes, and loops over the output pixels that read it: a conservative window of
// output indices per axis follows from the scale (candidate_window), and the exact forward taps
// are recomputed for each candidate; a candidate contributes weight * gm only where its tap index
// equals this input index (where both bilinear taps land on it, at the last index, both terms
// count, zero-weight ones included, as in the CPU kernel's sum). The per-column weights of the
// window are cached in registers when the window is at most kColCache wide (upsampling up to
// about 4x), so each candidate's taps are computed once, not once per row. No atomics, a fixed
// summation order, hence bit-for-bit reproducible gradients. Segments run heaviest first (largest
// fan-in) so the long gathers start early and the grid's tail is short.
//
// The per-thread bodies are __host__ __device__ pure functions of the thread index, and they and
// the launch plan (device::forward / backward) live in multires_fusion_device.h, so that
// tests/ops/multires_fusion_cuda_host.cpp runs the same launches on the host without a GPU; the
// __global__ kernels here are grid-stride loops over those bodies, launched by CudaLaunch.
#include <ATen/core/Tensor.h>
#include <c10/core/SymIntArrayRef.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>
#include <string_view>
#include <vector>

#include "multires_fusion/multires_fusion_device.h"

namespace hrnas {
namespace multires_fusion {
namespace {

using device::BwdArgs;
using device::FwdArgs;
using device::kThreads;
using device::MaskArgs;

template <typename scalar_t, int kVec, int kPlanes, bool kChannelsLast>
__global__ void __launch_bounds__(kThreads)
    multires_fusion_fwd_kernel(const __grid_constant__ FwdArgs<scalar_t> a) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; t < a.chunks;
       t += stride) {
    device::fwd_thread<scalar_t, kVec, kPlanes, kChannelsLast>(a, t);
  }
}

template <typename scalar_t, int kVec>
__global__ void __launch_bounds__(kThreads)
    multires_fusion_grad_mask_kernel(const __grid_constant__ MaskArgs<scalar_t> a) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; t < a.chunks;
       t += stride) {
    device::grad_mask_thread<scalar_t, kVec>(a, t);
  }
}

template <typename scalar_t, int kVec, int kPlanes, bool kChannelsLast>
__global__ void __launch_bounds__(kThreads)
    multires_fusion_bwd_kernel(const __grid_constant__ BwdArgs<scalar_t> a) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t total = a.begin[a.segments];
  for (int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; t < total;
       t += stride) {
    device::bwd_thread<scalar_t, kVec, kPlanes, kChannelsLast>(a, t);
  }
}

// ---------------------------------------------------------------------------------------------
// Host side: the launcher of device::forward / device::backward (the launch plan).

struct CudaLaunch {
  std::optional<c10::cuda::CUDAGuard> guard;
  cudaStream_t stream = nullptr;

  void on_device(const at::Tensor& t) {
    TORCH_CHECK(t.is_cuda(), kOp, ": the CUDA kernel got a tensor on ", t.device());
    guard.emplace(t.device());
    stream = c10::cuda::getCurrentCUDAStream();
  }

  const at::Tensor& uninitialised(const at::Tensor& t) const { return t; }

  template <typename scalar_t, int kVec, int kPlanes, bool kChannelsLast>
  void fwd(const FwdArgs<scalar_t>& a, int64_t blocks) const {
    multires_fusion_fwd_kernel<scalar_t, kVec, kPlanes, kChannelsLast>
        <<<blocks, kThreads, 0, stream>>>(a);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  template <typename scalar_t, int kVec>
  void mask(const MaskArgs<scalar_t>& m, int64_t blocks) const {
    multires_fusion_grad_mask_kernel<scalar_t, kVec><<<blocks, kThreads, 0, stream>>>(m);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  template <typename scalar_t, int kVec, int kPlanes, bool kChannelsLast>
  void bwd(const BwdArgs<scalar_t>& a, int64_t blocks) const {
    multires_fusion_bwd_kernel<scalar_t, kVec, kPlanes, kChannelsLast>
        <<<blocks, kThreads, 0, stream>>>(a);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

at::Tensor fwd_cuda(at::TensorList inputs, c10::SymIntArrayRef sym_size, std::string_view mode,
                    std::string_view act) {
  CudaLaunch launch;
  return device::forward(launch, inputs, C10_AS_INTARRAYREF_SLOW(sym_size), mode, act);
}

std::vector<at::Tensor> bwd_cuda(const at::Tensor& grad_out, const at::Tensor& out,
                                 c10::SymIntArrayRef sym_input_sizes, std::string_view mode,
                                 std::string_view act) {
  CudaLaunch launch;
  return device::backward(launch, grad_out, out, C10_AS_INTARRAYREF_SLOW(sym_input_sizes), mode,
                          act);
}

}  // namespace

TORCH_LIBRARY_IMPL(hrnas_kernels, CUDA, m) {
  m.impl("multires_fusion_fwd", &fwd_cuda);
  m.impl("multires_fusion_bwd", &bwd_cuda);
}

}  // namespace multires_fusion
}  // namespace hrnas
