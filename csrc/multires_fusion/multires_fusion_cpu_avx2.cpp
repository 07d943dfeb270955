// multires_fusion_cpu.cpp compiled for x86-64-v3 (AVX2, FMA); see common/cpu_isa.h.
#define HRNAS_CPU_ISA_LEVEL 1
#include "multires_fusion/multires_fusion_cpu.cpp"
