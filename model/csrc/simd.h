// Helpers shared by the fused CPU kernels: a vectorisable dot over a contiguous run (the
// `omp simd` reduction needs -fopenmp-simd, set by model/build.rs), and the run-time
// check choosing each kernel's AVX2+FMA instantiation over the x86-64 one.
#pragma once

#include <cstdint>

namespace grpo_simd {

template <typename T>
inline __attribute__((always_inline)) T dot(const T* a, const T* b, int64_t n) {
  T acc = 0;
#pragma omp simd reduction(+ : acc)
  for (int64_t i = 0; i < n; ++i) acc += a[i] * b[i];
  return acc;
}

inline bool has_avx2() {
  static const bool yes = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return yes;
}

}  // namespace grpo_simd

// Defines the templates `name##_avx2` (compiled for AVX2 and FMA) and `name##_base` (any
// x86-64) with one body; always-inline kernels called from it take the function's target.
#define GRPO_SIMD_VARIANTS(name, params, ...)                    \
  template <typename T>                                          \
  __attribute__((target("avx2,fma"))) void name##_avx2 params {  \
    __VA_ARGS__                                                  \
  }                                                              \
  template <typename T>                                          \
  void name##_base params {                                      \
    __VA_ARGS__                                                  \
  }
