// mixed_dwconv_bn_act_cpu.cpp compiled for x86-64-v4 (AVX-512); see common/cpu_isa.h.
#define HRNAS_CPU_ISA_LEVEL 2
#include "mixed_dwconv_bn_act/mixed_dwconv_bn_act_cpu.cpp"
