// Philox4x32-10 and Box-Muller, shared by host and device code.
// The specification is src/fastddpm/philox.py; this file reproduces its uint32 stream exactly.
#pragma once
#include <cstdint>

#if defined(__CUDACC__)
#define FDDPM_HD __host__ __device__ __forceinline__
#else
#define FDDPM_HD inline
#endif

namespace fastddpm {

constexpr uint32_t kPhiloxM0 = 0xD2511F53u;
constexpr uint32_t kPhiloxM1 = 0xCD9E8D57u;
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u;
constexpr uint32_t kPhiloxW1 = 0xBB67AE85u;
constexpr uint32_t kInitialNoiseStep = 0xFFFFFFFFu;  // the noise step of the starting static x_T

struct U32x4 { uint32_t v[4]; };

FDDPM_HD void philox_round(uint32_t c[4], uint32_t k0, uint32_t k1) {
#if defined(__CUDA_ARCH__)  // mul.hi.u32 + mul.lo.u32: nvcc does not narrow the 64-bit product itself
  const uint32_t hi0 = __umulhi(kPhiloxM0, c[0]), lo0 = kPhiloxM0 * c[0];
  const uint32_t hi1 = __umulhi(kPhiloxM1, c[2]), lo1 = kPhiloxM1 * c[2];
#else
  const uint64_t p0 = uint64_t(kPhiloxM0) * c[0];
  const uint64_t p1 = uint64_t(kPhiloxM1) * c[2];
  const uint32_t hi0 = uint32_t(p0 >> 32), lo0 = uint32_t(p0);
  const uint32_t hi1 = uint32_t(p1 >> 32), lo1 = uint32_t(p1);
#endif
  const uint32_t n0 = hi1 ^ c[1] ^ k0, n2 = hi0 ^ c[3] ^ k1;
  c[0] = n0; c[1] = lo1; c[2] = n2; c[3] = lo0;
}

// counter = (group, sample index, noise step, 0); key = the 64-bit seed split into two words.
FDDPM_HD U32x4 philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint64_t seed) {
  uint32_t c[4] = {c0, c1, c2, c3};
  uint32_t k0 = uint32_t(seed), k1 = uint32_t(seed >> 32);
#if defined(__CUDA_ARCH__)  // device pass only: the host compiler does not know the pragma
#pragma unroll
#endif
  for (int r = 0; r < 10; ++r) {
    if (r) { k0 += kPhiloxW0; k1 += kPhiloxW1; }
    philox_round(c, k0, k1);
  }
  return U32x4{{c[0], c[1], c[2], c[3]}};
}

// u(r) = ((r >> 9) + 0.5) * 2^-23, in (0, 1) and exact in float32.
FDDPM_HD float uniform_open01(uint32_t r) { return (float(r >> 9) + 0.5f) * (1.0f / 8388608.0f); }

#if defined(__CUDACC__)
// Box-Muller on the device: 4 uint32 -> 4 normals, lanes (0, 1) and (2, 3) paired as in philox.py.
// Accurate logf and sincospif on purpose (not __logf / __sinf): the spec is float64, and the fast
// intrinsics lose digits as u -> 1. sincospif(2u) = sincos(2 pi u) with exact argument reduction.
__device__ __forceinline__ void box_muller4(const U32x4& r, float n[4]) {
  const float rad0 = sqrtf(-2.0f * logf(uniform_open01(r.v[0])));
  const float rad1 = sqrtf(-2.0f * logf(uniform_open01(r.v[2])));
  float s0, c0, s1, c1;
  sincospif(2.0f * uniform_open01(r.v[1]), &s0, &c0);
  sincospif(2.0f * uniform_open01(r.v[3]), &s1, &c1);
  n[0] = rad0 * c0;
  n[1] = rad0 * s0;
  n[2] = rad1 * c1;
  n[3] = rad1 * s1;
}
#endif

}  // namespace fastddpm
