// One build, the CPU kernels at the machine's vector width.
//
// Every op's CPU source (csrc/<op>/<op>_cpu.cpp) is compiled three times on x86-64 with GCC: as
// itself for the baseline ISA, and through <op>_cpu_avx2.cpp and <op>_cpu_avx512.cpp, which set
// HRNAS_CPU_ISA_LEVEL and include it, for x86-64-v3 (AVX2, FMA) and x86-64-v4 (AVX-512). The
// level is a compile-time constant in each copy, so simd::kWidth, and the register blocking built
// on it, matches the registers the copy runs on: one zmm per vector under AVX-512, one ymm under
// AVX2. (One copy with per-function clones could not do that: GCC keeps a vector wider than the
// ISA's registers in memory, which made the AVX2 clones of the AVX-512-wide kernels 3-13x slower
// on an AVX2-only machine.) At load, only the copy of the selected level registers its kernels.
//
// Inside a copy, the code between HRNAS_CPU_ISA_BEGIN and HRNAS_CPU_ISA_END is compiled for its
// level; that code must have internal linkage (an anonymous namespace) or live in the per-level
// namespace simd.h opens, and nothing in it may run before the level is selected (no dynamic
// initialisers, no TORCH_LIBRARY_IMPL: that goes after HRNAS_CPU_ISA_END). Headers of shared,
// level-independent code are included before HRNAS_CPU_ISA_BEGIN. Library templates the region
// instantiates (std::vector<float>::resize, say) are compiled for the level under their shared
// names, and the linker keeps the first copy of each: the objects link in path order, so an op's
// baseline object, which instantiates the same templates, comes before its level copies
// (tests/ops/test_cpu_isa.py checks the built library for wide registers outside our code).
#pragma once

namespace hrnas {

enum class CpuIsa : int { kBase = 0, kAvx2 = 1, kAvx512 = 2 };

// The level the CPU kernels run at: the highest this machine supports, or a lower one named by
// the environment variable HRNAS_CPU_ISA (base, avx2 or avx512) when the library is loaded; a
// level the machine lacks, or a name not in that list, is ignored (hrnas_kernels warns).
CpuIsa selected_cpu_isa();
const char* cpu_isa_name(CpuIsa isa);

}  // namespace hrnas

#ifndef HRNAS_CPU_ISA_LEVEL
#define HRNAS_CPU_ISA_LEVEL 0
#endif

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && __GNUC__ >= 12 && \
    !defined(__CUDACC__)
#define HRNAS_CPU_MULTI_ISA 1
#else
#define HRNAS_CPU_MULTI_ISA 0
#endif

// Whether this copy is compiled at all: the baseline always, the others where GCC can target them.
#define HRNAS_CPU_ISA_ENABLED (HRNAS_CPU_ISA_LEVEL == 0 || HRNAS_CPU_MULTI_ISA)

#if HRNAS_CPU_ISA_LEVEL == 2
#define HRNAS_CPU_ISA_BEGIN \
  _Pragma("GCC push_options") _Pragma("GCC target(\"arch=x86-64-v4\")")
#define HRNAS_CPU_ISA_END _Pragma("GCC pop_options")
#define HRNAS_CPU_ISA_NS avx512
#elif HRNAS_CPU_ISA_LEVEL == 1
#define HRNAS_CPU_ISA_BEGIN \
  _Pragma("GCC push_options") _Pragma("GCC target(\"arch=x86-64-v3\")")
#define HRNAS_CPU_ISA_END _Pragma("GCC pop_options")
#define HRNAS_CPU_ISA_NS avx2
#else
#define HRNAS_CPU_ISA_BEGIN
#define HRNAS_CPU_ISA_END
#define HRNAS_CPU_ISA_NS base
#endif

// True in the copy whose kernels this machine runs (for the TORCH_LIBRARY_IMPL blocks).
#define HRNAS_CPU_ISA_SELECTED() \
  (::hrnas::selected_cpu_isa() == static_cast<::hrnas::CpuIsa>(HRNAS_CPU_ISA_LEVEL))

// Small helpers of the hot loops are forced inline, so their vectors stay in registers.
#if defined(__GNUC__)
#define HRNAS_INLINE inline __attribute__((always_inline))
#else
#define HRNAS_INLINE inline
#endif
