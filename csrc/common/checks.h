// Shared argument checks and layout rules for the hrnas_kernels C++ kernels.
//
// The Python API validates user input first and raises ValueError/TypeError; these checks are
// the second line for anyone calling torch.ops.hrnas_kernels.* directly. Every message starts
// with the op name, so an error from deep inside a model still says where it came from.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

namespace hrnas {

// The memory format an op writes its output in, decided from one tensor. Channels-last only when
// the tensor is channels-last dense and *not* also NCHW-contiguous, so shapes that are both
// (C == 1 or H == W == 1) resolve to NCHW. hrnas_kernels/_layout.py states the same rule for the
// fake kernels; the two must agree or torch.compile sees strides the kernel does not produce.
inline at::MemoryFormat output_memory_format(const at::Tensor& t) {
  if (t.dim() == 4 && !t.is_contiguous() && t.is_contiguous(at::MemoryFormat::ChannelsLast)) {
    return at::MemoryFormat::ChannelsLast;
  }
  return at::MemoryFormat::Contiguous;
}

inline void check_nchw(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.dim() == 4, op, ": expected ", name, " as a 4-d [N, C, H, W] tensor, got ",
              t.dim(), "-d");
}

inline void check_same(const char* op, const char* name, const at::Tensor& t,
                       const at::Tensor& ref) {
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), op, ": ", name, " has dtype ",
              t.scalar_type(), ", expected ", ref.scalar_type());
  TORCH_CHECK(t.device() == ref.device(), op, ": ", name, " is on ", t.device(), ", expected ",
              ref.device());
}

}  // namespace hrnas
