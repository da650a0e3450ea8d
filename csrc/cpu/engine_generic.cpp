// The portable engine path: 4-lane vectors lowered to the baseline ISA (SSE2 on x86-64).
#include <cstdint>

#include "engine_kernels.h"

namespace fastddpm {
namespace cpu {
namespace engine_generic {

constexpr int W = 4;
constexpr int NV = 2;  // 6 x 8 micro-tile: 12 accumulators of the 16 SSE registers
typedef float Fv __attribute__((vector_size(W * 4)));
inline Fv vfma(Fv a, Fv b, Fv c) { return a * b + c; }
inline Fv splat(float v) { return Fv{v, v, v, v}; }
inline Fv vmin(Fv a, Fv b) { return a < b ? a : b; }
inline Fv vmax(Fv a, Fv b) { return a > b ? a : b; }
// the first n < W lanes; the rest zero
inline Fv load_n(const float* p, int n) {
  Fv v = Fv{};
  for (int i = 0; i < n; ++i) v[i] = p[i];
  return v;
}
inline void store_n(float* p, Fv v, int n) {
  for (int i = 0; i < n; ++i) p[i] = v[i];
}
inline Fv load_halves(const float* p, const float* q) { return Fv{p[0], p[1], q[0], q[1]}; }

#include "engine_simd.inc"

}  // namespace engine_generic

const EngineKernels kGenericEngineKernels = engine_generic::make_engine_kernels("generic");

const EngineKernels& engine_kernels(Isa isa) {
  switch (isa) {
    case Isa::kAvx512: return kAvx512EngineKernels;
    case Isa::kAvx2: return kAvx2EngineKernels;
    default: return kGenericEngineKernels;
  }
}

}  // namespace cpu
}  // namespace fastddpm
