// Host replay of the CUDA kernels of multires_fusion, for test_multires_fusion_cuda_host.py.
//
// Runs the launch plan of csrc/multires_fusion/multires_fusion_cuda.cu on CPU tensors: the plan
// itself (device::forward / device::backward of the device header: checks, allocation, kernel
// arguments, vector widths, planes per thread, grids, launch order) is the .cu's own code, over
// a launcher that runs each kernel on the host instead of launching it: every thread index of
// the grid (blocks x kThreads), each running the kernel's grid-stride loop over the kernels' own
// per-thread bodies. The kernels have no shared memory and no barriers, so a launch is just its
// threads; only the grid-stride loop is restated here and must follow the .cu's __global__s.
// Memory the kernels must write (the output and every input gradient) starts as NaN, as
// uninitialised memory could hold anything: an element no thread writes shows up.
//
// Kept under tests/: setup.py builds every csrc/**/*.cpp into hrnas_kernels._C, and this file
// is a test harness, not a kernel. Registered as torch.ops.<HRNAS_REPLAY_NS>.{fwd,bwd} with the
// schemas of the real ops, all four dtypes of the .cu (c10::Half / BFloat16 in host arithmetic),
// and as {fwd,bwd}_reversed, the same with the threads of every launch run last to first (the
// namespace is a macro so a test can load a second, altered build). launches() lists the
// launches of the last fwd/bwd call, so a test can check which vector widths and planes per
// thread its cases reach.
#include <ATen/core/Tensor.h>
#include <c10/core/SymIntArrayRef.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <string>
#include <string_view>
#include <vector>

#include "multires_fusion/multires_fusion_device.h"

#ifndef HRNAS_REPLAY_NS
#define HRNAS_REPLAY_NS hrnas_multires_cuda_host
#endif

namespace hrnas {
namespace multires_fusion {
namespace {

using device::BwdArgs;
using device::FwdArgs;
using device::kThreads;
using device::MaskArgs;

// The launches of the last fwd or bwd call, four numbers each: kernel (0 forward, 1 grad mask,
// 2 gather), kVec, the largest planes-per-thread P of the launch (1 for the mask), blocks.
std::vector<int64_t> last_launches;

// The launcher: each kernel of the .cu, run on the host.
struct HostLaunch {
  // Runs the threads of a launch last to first: the results must not change, as nothing orders
  // the threads of a launch on a GPU.
  bool reversed;

  void on_device(const at::Tensor& t) const {
    last_launches.clear();
    TORCH_CHECK(t.device().is_cpu(), kOp, ": the host replay runs on CPU tensors, got ",
                t.device());
  }

  const at::Tensor& uninitialised(const at::Tensor& t) const {
    t.fill_(std::numeric_limits<double>::quiet_NaN());
    return t;
  }

  // Every thread of a launch of blocks x kThreads threads, each a grid-stride loop over
  // [0, work) calling body(t), as the .cu's kernels.
  template <typename F>
  void grid_stride(int64_t blocks, int64_t work, const F& body) const {
    const int64_t threads = blocks * kThreads;
    for (int64_t i = 0; i < threads; ++i) {
      const int64_t first = reversed ? threads - 1 - i : i;
      for (int64_t t = first; t < work; t += threads) body(t);
    }
  }

  template <typename scalar_t, int kVec, int kPlanes, bool kChannelsLast>
  void fwd(const FwdArgs<scalar_t>& a, int64_t blocks) const {
    TORCH_CHECK(a.vec == kVec && a.P <= kPlanes, "forward: the kernel instance does not fit");
    last_launches.insert(last_launches.end(), {0, kVec, a.P, blocks});
    grid_stride(blocks, a.chunks, [&](int64_t t) {
      device::fwd_thread<scalar_t, kVec, kPlanes, kChannelsLast>(a, t);
    });
  }
  template <typename scalar_t, int kVec>
  void mask(const MaskArgs<scalar_t>& m, int64_t blocks) const {
    TORCH_CHECK(m.vec == kVec, "grad mask: the kernel instance does not fit");
    last_launches.insert(last_launches.end(), {1, kVec, 1, blocks});
    grid_stride(blocks, m.chunks,
                [&](int64_t t) { device::grad_mask_thread<scalar_t, kVec>(m, t); });
  }
  template <typename scalar_t, int kVec, int kPlanes, bool kChannelsLast>
  void bwd(const BwdArgs<scalar_t>& a, int64_t blocks) const {
    TORCH_CHECK(a.vec == kVec, "gather: the kernel instance does not fit");
    const int64_t max_p = *std::max_element(a.P, a.P + a.segments);
    TORCH_CHECK(max_p <= kPlanes, "gather: more planes per thread than the kernel holds");
    last_launches.insert(last_launches.end(), {2, kVec, max_p, blocks});
    grid_stride(blocks, a.begin[a.segments], [&](int64_t t) {
      device::bwd_thread<scalar_t, kVec, kPlanes, kChannelsLast>(a, t);
    });
  }
};

template <bool Reversed>
at::Tensor fwd(at::TensorList inputs, c10::SymIntArrayRef size, std::string_view mode,
               std::string_view act) {
  HostLaunch launch{Reversed};
  return device::forward(launch, inputs, C10_AS_INTARRAYREF_SLOW(size), mode, act);
}

template <bool Reversed>
std::vector<at::Tensor> bwd(const at::Tensor& grad_out, const at::Tensor& out,
                            c10::SymIntArrayRef input_sizes, std::string_view mode,
                            std::string_view act) {
  HostLaunch launch{Reversed};
  return device::backward(launch, grad_out, out, C10_AS_INTARRAYREF_SLOW(input_sizes), mode,
                          act);
}

std::vector<int64_t> launches() { return last_launches; }

}  // namespace
}  // namespace multires_fusion
}  // namespace hrnas

// TORCH_LIBRARY stringifies its namespace argument; one more expansion lets it be a macro.
#define HRNAS_REPLAY_LIBRARY(ns, m) TORCH_LIBRARY(ns, m)

namespace {

// The real ops' schemas (hrnas_kernels/multires_fusion/ops.py).
constexpr const char* kFwdSchema =
    "(Tensor[] inputs, SymInt[] size, str mode, str activation) -> Tensor";
constexpr const char* kBwdSchema =
    "(Tensor grad_out, Tensor out, SymInt[] input_sizes, str mode, str activation) -> Tensor[]";

}  // namespace

// fwd / bwd: the real ops' schemas; *_reversed: the same, threads run last to first.
HRNAS_REPLAY_LIBRARY(HRNAS_REPLAY_NS, m) {
  m.def((std::string("fwd") + kFwdSchema).c_str(), &hrnas::multires_fusion::fwd<false>);
  m.def((std::string("bwd") + kBwdSchema).c_str(), &hrnas::multires_fusion::bwd<false>);
  m.def((std::string("fwd_reversed") + kFwdSchema).c_str(), &hrnas::multires_fusion::fwd<true>);
  m.def((std::string("bwd_reversed") + kBwdSchema).c_str(), &hrnas::multires_fusion::bwd<true>);
  m.def("launches() -> int[]", &hrnas::multires_fusion::launches);
}
