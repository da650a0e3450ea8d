// The AVX2 + FMA path: 8 lanes. Compiled for that target here only; chosen at run time.
#include <cstdint>
#include <cstring>

#include "fastddpm/philox.h"
#include "isa.h"

#if defined(__x86_64__)
#include <immintrin.h>
#pragma GCC push_options
#pragma GCC target("avx2,fma")

namespace fastddpm {
namespace cpu {
namespace avx2 {

constexpr int K = 2;
constexpr int W = 8;
typedef uint64_t U64 __attribute__((vector_size(W * 4)));
typedef float Fv __attribute__((vector_size(W * 4)));

inline U64 mul_even(U64 a, U64 b) { return (U64)_mm256_mul_epu32((__m256i)a, (__m256i)b); }
inline Fv vsqrt(Fv x) { return (Fv)_mm256_sqrt_ps((__m256)x); }
// non-temporal store of 8 floats at a 16-byte aligned p (numpy's large arrays are 16 mod 64)
inline void stream_store(float* p, Fv v) {
  const __m256 x = (__m256)v;
  _mm_stream_ps(p, _mm256_castps256_ps128(x));
  _mm_stream_ps(p + 4, _mm256_extractf128_ps(x, 1));
}
inline void stream_fence() { _mm_sfence(); }

#include "simd_kernels.inc"

}  // namespace avx2

const IsaKernels kAvx2Kernels = {"avx2", avx2::W, avx2::step_chunk, avx2::normals_chunk, avx2::philox_chunk};

}  // namespace cpu
}  // namespace fastddpm

#pragma GCC pop_options
#else
namespace fastddpm { namespace cpu {
const IsaKernels kAvx2Kernels = kGenericKernels;  // never selected off x86-64 (isa_supported)
}}  // namespace fastddpm::cpu
#endif
