// Dynamic-token transformer on CUDA, forward and backward of the whole block in one op each.
//
// Semantics are those of token_transformer_cpu.cpp (compact tokens, the tape layout of
// token_transformer.h; with a token_index the forward programs read the alive tokens'
// parameters through it, while the backward gathers them first, index_select launches of its
// own, and scatters the gradients back); float64/32/16 and bfloat16 with float (double for
// float64) accumulation and statistics. The CTA programs live in token_transformer_device.h
// (host-callable, checked on the CPU by tests/ops/test_token_transformer_cuda_host.py), the host
// sequence in token_transformer_run.h; this file only makes a CTA of them (each phase spread over
// the threads, __syncthreads between phases) and launches them:
// forward 3 kernels (tokens per sample; BN_in + encoder + decoder + output projection per
// sample; BN_out + resize + residual per output plane), backward 4 (per plane; per sample twice;
// the weight gradients' per-sample partials summed in sample order). Deterministic: fixed
// reduction orders, no atomics.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>

#include "token_transformer/token_transformer_run.h"

namespace hrnas {
namespace token_transformer {
namespace {

using device::kThreads;

// A CTA on the GPU: thread t runs the bodies t, t + blockDim.x, ... of each phase. The members
// are __host__ __device__ only so that the __host__ __device__ programs may name them; they run
// on the device alone.
struct DeviceCta {
  template <class F>
  __host__ __device__ void each(int64_t count, F&& body) const {
#ifdef __CUDA_ARCH__
    for (int64_t i = threadIdx.x; i < count; i += blockDim.x) body(i);
#endif
  }
  __host__ __device__ void sync() const {
#ifdef __CUDA_ARCH__
    __syncthreads();
#endif
  }
};

template <class P, class Args>
__global__ void __launch_bounds__(kThreads) cta_kernel(const Args a) {
  P::run(DeviceCta{}, static_cast<int64_t>(blockIdx.x), a);
}

struct DeviceExec {
  cudaStream_t stream;
  template <class P, class Args>
  void run(int64_t ctas, const Args& a) const {
    TORCH_CHECK(ctas < (int64_t{1} << 31), kOp, ": ", ctas, " CTAs exceed the grid");
    cta_kernel<P, Args><<<static_cast<unsigned>(ctas), kThreads, 0, stream>>>(a);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

FwdResult fwd_cuda(const at::Tensor& x, const at::Tensor& coords, const at::Tensor& w_in,
                   const at::Tensor& bn_in_w, const at::Tensor& bn_in_b,
                   const std::optional<at::Tensor>& rm_in, const std::optional<at::Tensor>& rv_in,
                   at::TensorList encoder, const std::optional<at::Tensor>& query,
                   at::TensorList decoder, const at::Tensor& w_out, const at::Tensor& bn_out_w,
                   const at::Tensor& bn_out_b, const std::optional<at::Tensor>& rm_out,
                   const std::optional<at::Tensor>& rv_out, int64_t heads,
                   c10::SymIntArrayRef out_size, bool residual, double eps, bool save_tape,
                   const std::optional<at::Tensor>& token_index) {
  TORCH_CHECK(x.is_cuda(), kOp, ": the CUDA kernel got x on ", x.device());
  TORCH_CHECK(out_size.size() == 2, kOp, ": out_size must be [Ho, Wo]");
  const int64_t Ho = out_size[0].guard_int(__FILE__, __LINE__);
  const int64_t Wo = out_size[1].guard_int(__FILE__, __LINE__);
  const c10::cuda::CUDAGuard guard(x.device());
  const DeviceExec exec{c10::cuda::getCurrentCUDAStream()};
  FwdResult r;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(),
                                  "token_transformer_fwd_cuda", [&] {
    r = device::forward<scalar_t>(exec, x, coords, w_in, bn_in_w, bn_in_b, rm_in, rv_in, encoder,
                                  query, decoder, w_out, bn_out_w, bn_out_b, rm_out, rv_out,
                                  heads, Ho, Wo, residual, eps, token_index);
  });
  // the programs keep their intermediates on the tape; without save_tape it is not returned
  if (!save_tape) std::get<1>(r) = std::get<1>(r).new_empty({0});
  return r;
}

BwdResult bwd_cuda(const at::Tensor& gy, const at::Tensor& tape, const at::Tensor& coords,
                   const at::Tensor& w_in, const at::Tensor& bn_in_w, const at::Tensor& bn_in_b,
                   const at::Tensor& var_in, at::TensorList encoder,
                   const std::optional<at::Tensor>& query, at::TensorList decoder,
                   const at::Tensor& w_out, const at::Tensor& bn_out_w, const at::Tensor& var_out,
                   int64_t heads, c10::SymIntArrayRef in_size, bool residual,
                   bool use_batch_stats, double eps) {
  TORCH_CHECK(gy.is_cuda(), kOp, ": the CUDA kernel got grad_out on ", gy.device());
  TORCH_CHECK(in_size.size() == 2, kOp, ": in_size must be [H, W]");
  const int64_t H = in_size[0].guard_int(__FILE__, __LINE__);
  const int64_t W = in_size[1].guard_int(__FILE__, __LINE__);
  const c10::cuda::CUDAGuard guard(gy.device());
  const DeviceExec exec{c10::cuda::getCurrentCUDAStream()};
  BwdResult r;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, gy.scalar_type(),
                                  "token_transformer_bwd_cuda", [&] {
    r = device::backward<scalar_t>(exec, gy, tape, coords, w_in, bn_in_w, bn_in_b, var_in,
                                   encoder, query, decoder, w_out, bn_out_w, var_out, heads, H, W,
                                   residual, use_batch_stats, eps);
  });
  return r;
}

}  // namespace

TORCH_LIBRARY_IMPL(hrnas_kernels, CUDA, m) {
  m.impl("token_transformer_fwd", &fwd_cuda);
  m.impl("token_transformer_bwd", &backward_alive_tokens<&bwd_cuda>);
}

}  // namespace token_transformer
}  // namespace hrnas
