#pragma once

// Which vector instructions the processor running dptorch has, for the CPU loops that carry an
// AVX2 + FMA path next to their baseline one (grad_sample/cpu_kernels.cpp, optim/philox.cpp).

namespace dptorch::detail {

#if defined(__x86_64__) && defined(__GNUC__)
/// Whether the processor has AVX2 and FMA (the x86-64-v3 level the fast paths are compiled for).
inline bool has_x86_64_v3() {
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return has;
}

/// Whether the processor also has the AVX-512 F, BW, DQ and VL sets (the x86-64-v4 level).
inline bool has_x86_64_v4() {
  static const bool has = has_x86_64_v3() && __builtin_cpu_supports("avx512f") &&
                          __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl");
  return has;
}
#endif

}  // namespace dptorch::detail
