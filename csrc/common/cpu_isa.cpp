// The CPU ISA level the kernels run at (see cpu_isa.h).
#include "common/cpu_isa.h"

#include <cstdlib>
#include <cstring>
#include <initializer_list>

namespace hrnas {
namespace {

CpuIsa detect() {
#if HRNAS_CPU_MULTI_ISA
  __builtin_cpu_init();
  if (__builtin_cpu_supports("x86-64-v4")) return CpuIsa::kAvx512;
  if (__builtin_cpu_supports("x86-64-v3")) return CpuIsa::kAvx2;
#endif
  return CpuIsa::kBase;
}

CpuIsa choose() {
  const CpuIsa best = detect();
  const char* env = std::getenv("HRNAS_CPU_ISA");
  if (env == nullptr) return best;
  for (CpuIsa isa : {CpuIsa::kBase, CpuIsa::kAvx2, CpuIsa::kAvx512}) {
    if (std::strcmp(env, cpu_isa_name(isa)) == 0 && isa <= best) return isa;
  }
  return best;
}

}  // namespace

CpuIsa selected_cpu_isa() {
  static const CpuIsa isa = choose();
  return isa;
}

const char* cpu_isa_name(CpuIsa isa) {
  switch (isa) {
    case CpuIsa::kAvx512:
      return "avx512";
    case CpuIsa::kAvx2:
      return "avx2";
    default:
      return "base";
  }
}

}  // namespace hrnas
