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
// the first n < W lanes (masked: nothing past them is read or written); the rest zero
inline __m256i lanes_below(int n) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}
inline Fv load_n(const float* p, int n) { return (Fv)_mm256_maskload_ps(p, lanes_below(n)); }
inline void store_n(float* p, Fv v, int n) { _mm256_maskstore_ps(p, lanes_below(n), (__m256)v); }
inline Fv load_halves(const float* p, const float* q) {
  return (Fv)_mm256_insertf128_ps(_mm256_castps128_ps256(_mm_loadu_ps(p)), _mm_loadu_ps(q), 1);
}

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
