// The AVX2 + FMA engine path: 8 lanes, a 6 x 16 micro-tile (12 ymm accumulators).
#include <cstdint>

#include "engine_kernels.h"

#if defined(__x86_64__)
#include <immintrin.h>
#pragma GCC push_options
#pragma GCC target("avx2,fma")

namespace fastddpm {
namespace cpu {
namespace engine_avx2 {

constexpr int W = 8;
constexpr int NV = 2;
typedef float Fv __attribute__((vector_size(W * 4)));
inline Fv vfma(Fv a, Fv b, Fv c) { return (Fv)_mm256_fmadd_ps((__m256)a, (__m256)b, (__m256)c); }
inline Fv splat(float v) { return (Fv)_mm256_set1_ps(v); }
inline Fv vmin(Fv a, Fv b) { return (Fv)_mm256_min_ps((__m256)a, (__m256)b); }  // a < b ? a : b
inline Fv vmax(Fv a, Fv b) { return (Fv)_mm256_max_ps((__m256)a, (__m256)b); }  // a > b ? a : b

#include "engine_simd.inc"

}  // namespace engine_avx2

const EngineKernels kAvx2EngineKernels = engine_avx2::make_engine_kernels("avx2");

}  // namespace cpu
}  // namespace fastddpm

#pragma GCC pop_options
#else
namespace fastddpm { namespace cpu {
const EngineKernels kAvx2EngineKernels = kGenericEngineKernels;  // never selected off x86-64
}}  // namespace fastddpm::cpu
#endif
