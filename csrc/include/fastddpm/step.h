// The fused sampler step: one pass per element, noise made in registers.
//
//   x0     = a_x * x + a_m * m               m: the model output
//   x0     = clamp(x0, -r, r)   if r > 0
//   x_prev = c_x0 * x0 + d_x * x + d_m * m + sigma * z
//
// z is element e of sample i: normal (e % 4) of Philox block (e / 4, first_index + i, noise_step),
// see src/fastddpm/philox.py. The coefficient row (8 floats) is precomputed by the scheduler.
#pragma once
#include <cstdint>

namespace fastddpm {

enum CoefIndex : int { kAx = 0, kAm = 1, kCx0 = 2, kDx = 3, kDm = 4, kSigma = 5, kClip = 6, kCoefWidth = 8 };
// The columns as schedulers.py names them (COEF_COLUMNS; the last one is padding to 32 bytes).
constexpr const char* kCoefNames[kCoefWidth] = {"ax", "am", "cx0", "dx", "dm", "sigma", "clip", "pad"};

struct StepParams {
  int64_t batch = 0;        // N samples
  int64_t per_sample = 0;   // elements per sample (C*H*W)
  uint64_t seed = 0;
  uint32_t noise_step = 0;  // the timestep, or kInitialNoiseStep
  uint32_t first_index = 0; // sample index of row 0
};

// x, m: [batch, per_sample]; out may alias x or m. coef: kCoefWidth floats.
// noise: nullptr (make Philox noise) or [batch, per_sample] given noise.
// All pointers are host pointers for the CPU entry points.
struct StepArrays {
  const float* x = nullptr;
  const float* m = nullptr;
  float* out = nullptr;
  const float* coef = nullptr;
  const float* noise = nullptr;
};

}  // namespace fastddpm
