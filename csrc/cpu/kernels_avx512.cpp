// The AVX-512F path: 16 lanes. The same source as the AVX2 path at twice the width.
#include <cstdint>
#include <cstring>

#include "fastddpm/philox.h"
#include "isa.h"

#if defined(__x86_64__)
#include <immintrin.h>
#pragma GCC push_options
#pragma GCC target("avx512f,avx2,fma")
// GCC 12's _mm512_sqrt_ps reads an intentionally undefined register: a false -Wuninitialized.
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

namespace fastddpm {
namespace cpu {
namespace avx512 {

// 4 vectors in flight (kBlock = 256 elements): the Philox rounds are a latency chain, so 8
// interleaved half-vectors keep the multipliers busier than 4 would, which outweighs the spills
// of no longer fitting all of them in the 32 registers.
constexpr int K = 4;
constexpr int W = 16;
typedef uint64_t U64 __attribute__((vector_size(W * 4)));
typedef float Fv __attribute__((vector_size(W * 4)));

inline U64 mul_even(U64 a, U64 b) { return (U64)_mm512_mul_epu32((__m512i)a, (__m512i)b); }
inline Fv vsqrt(Fv x) { return (Fv)_mm512_sqrt_ps((__m512)x); }
// x = m * 2^e, m in [0.5, 1): vgetmantps / vgetexpps, the same m and e as the bit arithmetic in
// two instructions instead of five.
#define FASTDDPM_ISA_FREXP_HALF
inline void frexp_half(Fv x, Fv& m, Fv& e) {
  m = (Fv)_mm512_getmant_ps((__m512)x, _MM_MANT_NORM_p5_1, _MM_MANT_SIGN_src);
  e = (Fv)_mm512_getexp_ps((__m512)x) + 1.0f;
}
// non-temporal store of 16 floats at a 16-byte aligned p (numpy's large arrays are 16 mod 64)
inline void stream_store(float* p, Fv v) {
  const __m512 x = (__m512)v;
  _mm_stream_ps(p, _mm512_castps512_ps128(x));
  _mm_stream_ps(p + 4, _mm512_extractf32x4_ps(x, 1));
  _mm_stream_ps(p + 8, _mm512_extractf32x4_ps(x, 2));
  _mm_stream_ps(p + 12, _mm512_extractf32x4_ps(x, 3));
}
inline void stream_fence() { _mm_sfence(); }

#include "simd_kernels.inc"

}  // namespace avx512

const IsaKernels kAvx512Kernels = {"avx512", avx512::W, avx512::step_chunk, avx512::normals_chunk,
                                   avx512::philox_chunk};

}  // namespace cpu
}  // namespace fastddpm

#pragma GCC pop_options
#else
namespace fastddpm { namespace cpu {
const IsaKernels kAvx512Kernels = kGenericKernels;
}}  // namespace fastddpm::cpu
#endif
