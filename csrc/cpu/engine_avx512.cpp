// The AVX-512F engine path: 16 lanes, a 6 x 32 micro-tile (12 zmm accumulators).
#include <cstdint>

#include "engine_kernels.h"

#if defined(__x86_64__)
#include <immintrin.h>
#pragma GCC push_options
#pragma GCC target("avx512f,avx2,fma")
// GCC 12's _mm512_insertf64x4 reads an intentionally undefined register: a false -Wmaybe-uninitialized.
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

namespace fastddpm {
namespace cpu {
namespace engine_avx512 {

constexpr int W = 16;
constexpr int NV = 2;
typedef float Fv __attribute__((vector_size(W * 4)));
inline Fv vfma(Fv a, Fv b, Fv c) { return (Fv)_mm512_fmadd_ps((__m512)a, (__m512)b, (__m512)c); }
inline Fv splat(float v) { return (Fv)_mm512_set1_ps(v); }
// (_mm512_min_ps / _mm512_max_ps would do, but GCC 12's headers then warn about an uninitialised
// pass-through operand)
inline Fv vmin(Fv a, Fv b) { return a < b ? a : b; }
inline Fv vmax(Fv a, Fv b) { return a > b ? a : b; }
// the first n < W lanes (masked: nothing past them is read or written); the rest zero
inline Fv load_n(const float* p, int n) { return (Fv)_mm512_maskz_loadu_ps(__mmask16((1u << n) - 1), p); }
inline void store_n(float* p, Fv v, int n) { _mm512_mask_storeu_ps(p, __mmask16((1u << n) - 1), (__m512)v); }
// two 256-bit loads joined by vinsertf64x4 (AVX-512F; the bits are floats either way)
inline Fv load_halves(const float* p, const float* q) {
  const __m512d lo = _mm512_castpd256_pd512(_mm256_loadu_pd(reinterpret_cast<const double*>(p)));
  return (Fv)_mm512_insertf64x4(lo, _mm256_loadu_pd(reinterpret_cast<const double*>(q)), 1);
}

#include "engine_simd.inc"

}  // namespace engine_avx512

const EngineKernels kAvx512EngineKernels = engine_avx512::make_engine_kernels("avx512");

}  // namespace cpu
}  // namespace fastddpm

#pragma GCC pop_options
#else
namespace fastddpm { namespace cpu {
const EngineKernels kAvx512EngineKernels = kGenericEngineKernels;  // never selected off x86-64
}}  // namespace fastddpm::cpu
#endif
