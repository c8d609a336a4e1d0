// locmoe/simd_instantiate.hpp - compiles locmoe's SIMD kernels for one instruction set.
//
// For run-time dispatch (LOCMOE_SIMD_DISPATCH), each instruction set in LOCMOE_SIMD_ARCHS needs one
// translation unit, compiled with that set's flags and with LOCMOE_SIMD_DISPATCH defined, holding
//
//   #include <locmoe/simd_instantiate.hpp>
//   LOCMOE_INSTANTIATE_SIMD_KERNELS(xsimd::avx2)   // e.g. with -mavx2 -mfma: xsimd::fma3<xsimd::avx2>
//
// CMake does this for you: locmoe_enable_simd_dispatch(my_target). The sets and their GCC/Clang flags:
//   xsimd::sse2                    (x86-64 baseline)
//   xsimd::sse4_2                  -msse4.2
//   xsimd::fma3<xsimd::avx2>       -mavx2 -mfma
//   xsimd::avx512bw                -mavx512f -mavx512cd -mavx512dq -mavx512bw -mavx2 -mfma
// Such a file should contain nothing else: whatever else it compiles may use that set's instructions.
#pragma once

#include <locmoe/detail/kernels.hpp>

#define LOCMOE_INSTANTIATE_SIMD_KERNELS(ARCH)                                                     \
  static_assert(ARCH::supported(), "locmoe: compile this file with the flags of " #ARCH);        \
  LOCMOE_SIMD_KERNEL_LIST(LOCMOE_DETAIL_DEFINE_KERNEL, ARCH)
