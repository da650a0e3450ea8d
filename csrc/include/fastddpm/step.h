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

#if defined(__CUDACC__)
#define FDDPM_STEP_FN __host__ __device__ __forceinline__
#else
#define FDDPM_STEP_FN inline
#endif

// A coefficient row held in F: float on the GPU, a GCC float vector (the row splatted) in the
// CPU paths.
template <class F>
struct StepRow {
  F ax, am, cx0, dx, dm, sigma, clip;
};

// The step's arithmetic: the one source of the C++ paths (every ISA) and the CUDA kernel; the
// numba and torch steps mirror it operation for operation (executors/numba_cpu.py, torch_ref.py).
// Without the noise term: y = c_x0 x0 + d_x x + d_m m, x0 = a_x x + a_m m, clipped if asked.
template <class F>
FDDPM_STEP_FN F step_mean(F x, F m, const StepRow<F>& c, bool clip) {
  F x0 = c.ax * x + c.am * m;
  if (clip) {  // comparisons, not min/max: a NaN x0 stays NaN (a comparison with NaN is false)
    x0 = c.clip < x0 ? c.clip : x0;
    x0 = x0 < -c.clip ? -c.clip : x0;
  }
  return c.cx0 * x0 + c.dx * x + c.dm * m;
}

// The noise term added to step_mean's result.
template <class F>
FDDPM_STEP_FN F step_add_noise(F y, F z, const StepRow<F>& c) {
  return y + c.sigma * z;
}

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
