// The fused sampler step: one pass per element, noise made in registers.
//
//   x0     = a_x * x + a_m * m               m: the model output
//   x0     = clamp(x0, -r, r)   if r > 0
//   x_prev = c_x0 * x0 + d_x * x + d_m * m + h_1 * H1 + h_2 * H2 + sigma * z
//
// Classifier-free guidance (optional): m is then the guided output m_u + w (m_c - m_u) of the
// conditional and null-class model outputs m_c, m_u (step_guided_output), the rest unchanged.
// H1, H2 (optional): the x0 predictions of the previous two steps, for multistep samplers
// (DPM-Solver++ 2M / 3M); a step without them is exactly the single-step formula.
// z is element e of sample i: normal (e % 4) of Philox block (e / 4, first_index + i, noise_step),
// see src/fastddpm/philox.py. The coefficient row (kCoefWidth floats) is precomputed by the scheduler.
#pragma once
#include <cstdint>

namespace fastddpm {

enum CoefIndex : int {
  kAx = 0, kAm = 1, kCx0 = 2, kDx = 3, kDm = 4, kSigma = 5, kClip = 6,  // 7: padding
  kH1 = 8, kH2 = 9,                                                      // 10, 11: padding
  kCoefWidth = 12
};
// The columns as coefficients.py names them (COEF_COLUMNS; the pads keep a row 16-byte aligned).
constexpr const char* kCoefNames[kCoefWidth] = {"ax", "am", "cx0", "dx", "dm", "sigma",
                                                "clip", "pad", "h1", "h2", "pad2", "pad3"};

#if defined(__CUDACC__)
#define FDDPM_STEP_FN __host__ __device__ __forceinline__
#else
#define FDDPM_STEP_FN inline
#endif

// A coefficient row held in F: float on the GPU, a GCC float vector (the row splatted) in the
// CPU paths.
template <class F>
struct StepRow {
  F ax, am, cx0, dx, dm, sigma, clip, h1, h2;
};

// FDDPM_ROUNDED(v): v stays the rounded value it holds; the compiler may not fuse the operation
// that made it with the one that uses it. GCC contracts a * b + c into an FMA in C++ even with
// -std=c++17 (ISO mode turns contraction off for C only), so on the FMA paths (avx2, avx512) the
// step's other expressions are contracted, and generic (SSE2: no FMA) rounds every product: the
// reason the golden step hashes are per ISA. An empty asm that takes v in a vector register is
// the barrier (the asm emits no instruction). Off x86 GCC / Clang it is a no-op (best effort);
// device code rounds with the _rn intrinsics instead.
#if !defined(__CUDACC__) && defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define FDDPM_ROUNDED(v) __asm__("" : "+v"(v))
#else
#define FDDPM_ROUNDED(v) ((void)0)
#endif

// The guided model output of classifier-free guidance: m_u + w (m_c - m_u), rounded after each
// operation in this order, never contracted: the same bits on every ISA path and on the GPU, and
// the same as the numba and torch steps' float32 m_u + w * (m_c - m_u) (so a guided fused step is
// the unguided step of that combination, to the bit).
template <class F>
FDDPM_STEP_FN F step_guided_output(F mc, F mu, F w) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(mu, __fmul_rn(w, __fsub_rn(mc, mu)));  // F = float on the GPU
#else
  F d = w * (mc - mu);
  FDDPM_ROUNDED(d);
  return mu + d;
#endif
}

// The step's arithmetic: the one source of the C++ paths (every ISA) and the CUDA kernel; the
// numba and torch steps mirror it operation for operation (executors/numba_cpu.py, torch_ref.py).
// x0 = a_x x + a_m m, clipped if asked.
template <class F>
FDDPM_STEP_FN F step_x0(F x, F m, const StepRow<F>& c, bool clip) {
  F x0 = c.ax * x + c.am * m;
  if (clip) {  // comparisons, not min/max: a NaN x0 stays NaN (a comparison with NaN is false)
    x0 = c.clip < x0 ? c.clip : x0;
    x0 = x0 < -c.clip ? -c.clip : x0;
  }
  return x0;
}

// y = c_x0 x0 + d_x x + d_m m for step_x0's x0 (the paths that also store x0 call the two halves).
template <class F>
FDDPM_STEP_FN F step_mean_of_x0(F x0, F x, F m, const StepRow<F>& c) {
  return c.cx0 * x0 + c.dx * x + c.dm * m;
}

// Without the history and noise terms: y = c_x0 x0 + d_x x + d_m m.
template <class F>
FDDPM_STEP_FN F step_mean(F x, F m, const StepRow<F>& c, bool clip) {
  return step_mean_of_x0(step_x0(x, m, c, clip), x, m, c);
}

// A history term added to step_mean's result: h is a previous step's x0, w its weight (c.h1 or
// c.h2). H1 is added before H2, and both before the noise.
template <class F>
FDDPM_STEP_FN F step_add_history(F y, F h, F w) {
  return y + w * h;
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
// h1, h2: nullptr or [batch, per_sample]: the previous steps' x0, added with weights coef[kH1],
// coef[kH2] (a null one adds nothing, whatever its weight). x0_out: nullptr or [batch, per_sample],
// receives this step's x0 (after the clip); it must not overlap x, m, m_uncond, out, h1 or h2.
// m_uncond: nullptr or [batch, per_sample]: classifier-free guidance, the step's model output is
// step_guided_output(m[e], m_uncond[e], guidance) (m: the conditional output); out may alias it.
// All pointers are host pointers for the CPU entry points, device pointers for the CUDA step.
struct StepArrays {
  const float* x = nullptr;
  const float* m = nullptr;
  float* out = nullptr;
  const float* coef = nullptr;
  const float* noise = nullptr;
  const float* h1 = nullptr;
  const float* h2 = nullptr;
  float* x0_out = nullptr;
  const float* m_uncond = nullptr;
  float guidance = 1.f;
};

}  // namespace fastddpm
