// Launchers of the CUDA fused step and the noise kernels. Raw device pointers, the plain StepParams
// struct and a stream in; a Status out. No exceptions cross this boundary and no Python or torch
// types appear below it (csrc/bindings_cuda.cpp is the only file that knows Python).
//
// Every launcher checks its arguments before anything reaches the GPU: a bad size, a null or
// misaligned pointer, or a partial overlap of out with an input is refused with
// cudaErrorInvalidValue and a message, never launched (a misaligned access on the device would be
// a sticky error that poisons the whole CUDA context, torch's included).
//
// Launches are asynchronous on `stream` and legal inside CUDA graph capture: nothing here
// allocates or synchronizes. The coefficient row is read by the kernel when it runs, so a captured
// graph replays with whatever the row holds at replay time.
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>

#include "fastddpm/step.h"

namespace fastddpm {
namespace cuda {

struct Status {
  cudaError_t error = cudaSuccess;  // cudaErrorInvalidValue for a refused argument
  const char* message = nullptr;    // static text; nullptr on success
  bool invalid_argument = false;    // true: refused before launch (a caller error, not a CUDA failure)
  bool ok() const { return error == cudaSuccess; }
};

// x_prev = fused step (see step.h), one pass over batch * per_sample elements.
//   a.x, a.m:   [batch, per_sample] float32, device
//   a.out:      [batch, per_sample] float32, device; may be a.x, a.m or a.noise exactly
//   a.coef:     device pointer to one coefficient row (kCoefWidth float32), read at kernel time;
//               the kernel trusts it (finite, clip >= 0: the scheduler's table guarantees that)
//   a.noise:    nullptr (Philox noise of (seed, first_index + i, noise_step) made in registers)
//               or [batch, per_sample] float32 given noise, device
//   a.h1, a.h2: nullptr or [batch, per_sample] float32, device: the previous steps' x0, added with
//               weights coef[kH1], coef[kH2] (step.h); each may be a.out exactly, never partially
//   a.x0_out:   nullptr or [batch, per_sample] float32, device: receives this step's x0 (after the
//               clip); it may overlap none of x, m, m_uncond, out, noise, h1, h2
//   a.m_uncond: nullptr or [batch, per_sample] float32, device: classifier-free guidance, the
//               model output is step_guided_output(m, m_uncond, a.guidance) (a.guidance finite);
//               out may be m_uncond exactly
// Without h1, h2 and x0_out the single-step kernels run, exactly as before the history existed;
// without m_uncond, likewise the unguided ones.
// 16-byte vector loads/stores when per_sample % 4 == 0 and every pointer is 16-byte aligned; a
// scalar path otherwise (same results).
Status fused_step(const StepParams& p, const StepArrays& a, cudaStream_t stream);

// out[i, e] = normal e of sample first_index + i at p.noise_step; out: [batch, per_sample] float32.
Status normals(const StepParams& p, float* out, cudaStream_t stream);

// The raw Philox stream; out: [batch, ceil(per_sample / 4) * 4] uint32.
Status philox_stream(const StepParams& p, uint32_t* out, cudaStream_t stream);

// ---- the captured sampling loop (csrc/cuda/engine_cuda.cu) -----------------------------------
// Per-run values live in device memory so that one captured CUDA graph serves every step and
// every run: the kernels read them when they execute, never at capture.
struct LoopState {
  uint64_t seed = 0;
  uint32_t first_index = 0;  // sample index of row 0 (first_index + batch <= 2**32, checked on the host)
  int32_t step = 0;          // index k of the step now running (0-based), advanced on the device
  int32_t history = 0;       // previous x0 predictions each step reads (0, 1, 2): a multistep solver's
  float guidance = 1.0f;     // the guidance scale w of a guided loop (loop_step with m_uncond)
};

// out = fused step k = state->step of x and m ([batch, per_sample] float32, device; out may be x):
// coefficient row coef_table + k * kCoefWidth, noise step noise_steps[k], seed and first index from
// *state. p supplies batch and per_sample (its seed / noise_step / first_index are ignored, but
// p.first_index + batch must still be in range). Capturable: no allocation, no synchronisation.
// ring: nullptr (the single-step loop's kernel, state->history unread) or the multistep history,
// 3 slots of [batch, per_sample] float32 overlapping none of x, m, out: with state->history > 0,
// step k writes its x0 to slot k % 3 and adds H1 = slot (k - 1) % 3 from k = 1 on and, with
// history 2, H2 = slot (k - 2) % 3 from k = 2 on (the slots are chosen on the device from the
// counter, so one captured step serves every k); history 0 reads and writes no slot.
// m_uncond: nullptr, or the guided loop (classifier-free guidance): [batch, per_sample] null-class
// model output, the step's model output step_guided_output(m, m_uncond, state->guidance); out may
// be it exactly. out_copy (guided only): nullptr or a second [batch, per_sample] destination of
// the result, overlapping none of the others (the U-Net input rows of the null class).
Status loop_step(const StepParams& p, const float* x, const float* m, float* out, const float* coef_table,
                 const uint32_t* noise_steps, const LoopState* state, float* ring, cudaStream_t stream,
                 const float* m_uncond = nullptr, float* out_copy = nullptr);

// out = the initial normals (p.noise_step) of seed and first index *state; out [batch, per_sample].
Status loop_normals(const StepParams& p, float* out, const LoopState* state, cudaStream_t stream);

}  // namespace cuda
}  // namespace fastddpm
