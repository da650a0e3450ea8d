// The portable path: 4-lane vectors that the compiler lowers to the baseline ISA (SSE2 on x86-64).
#include <cmath>
#include <cstdint>
#include <cstring>

#include "fastddpm/philox.h"
#include "isa.h"
#if defined(__SSE__)
#include <xmmintrin.h>
#endif

namespace fastddpm {
namespace cpu {
namespace generic {

constexpr int K = 4;
constexpr int W = 4;
typedef uint64_t U64 __attribute__((vector_size(W * 4)));
typedef float Fv __attribute__((vector_size(W * 4)));

inline U64 mul_even(U64 a, U64 b) { return (a & 0xFFFFFFFFull) * (b & 0xFFFFFFFFull); }
inline Fv vsqrt(Fv x) {
  for (int i = 0; i < W; ++i) x[i] = std::sqrt(x[i]);
  return x;
}
// non-temporal store of 4 floats at a 16-byte aligned p (SSE is the x86-64 baseline)
inline void stream_store(float* p, Fv v) {
#if defined(__SSE__)
  _mm_stream_ps(p, (__m128)v);
#else
  __builtin_memcpy(p, &v, sizeof v);
#endif
}
inline void stream_fence() {
#if defined(__SSE__)
  _mm_sfence();
#endif
}

#include "simd_kernels.inc"

}  // namespace generic

const IsaKernels kGenericKernels = {"generic", generic::W, generic::step_chunk, generic::normals_chunk,
                                    generic::philox_chunk};

}  // namespace cpu
}  // namespace fastddpm
