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

// Hot loops are compiled once per ISA level and picked at load time (GCC function
// multiversioning through an ifunc resolver), so one portable build runs AVX2/AVX-512 loops on
// machines that have them without -march=native. Elsewhere the plain build is used.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__) && \
    __GNUC__ >= 11 && !defined(__CUDACC__)
#define HRNAS_TARGET_CLONES \
  __attribute__((target_clones("default", "arch=x86-64-v3", "arch=x86-64-v4")))
#else
#define HRNAS_TARGET_CLONES
#endif

// For helpers called from HRNAS_TARGET_CLONES functions: a helper left out of line is compiled
// for the baseline ISA only, so its vector code would run as SSE inside the AVX-512 clone.
#if defined(__GNUC__)
#define HRNAS_INLINE inline __attribute__((always_inline))
#else
#define HRNAS_INLINE inline
#endif
