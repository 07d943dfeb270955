// multires_fusion_cpu.cpp compiled for x86-64-v4 (AVX-512); see common/cpu_isa.h.
#define HRNAS_CPU_ISA_LEVEL 2
#include "multires_fusion/multires_fusion_cpu.cpp"
