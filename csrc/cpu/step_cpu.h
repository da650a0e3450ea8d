// Checked CPU entry points of the fused step and the noise: validate, split into chunks, run the
// chosen ISA's kernels on the thread pool (thread_pool.h). Raw pointers and plain structs only (no Python types).
#pragma once
#include <cstdint>

#include "fastddpm/step.h"
#include "isa.h"

namespace fastddpm {
namespace cpu {

// x_prev = fused step of x and m with coefficient row a.coef (see step.h), with the history terms
// of a.h1, a.h2 and x0 stored to a.x0_out where those are set, and classifier-free guidance where
// a.m_uncond is set (the model output m_u + w (m - m_u), w = a.guidance). Throws
// std::invalid_argument on a null pointer, a bad size, a non-finite coefficient or guidance, or an
// x0_out that is another of the arrays.
void fused_step(const StepParams& p, const StepArrays& a);

// out[i, e] = normal e of sample first_index + i at p.noise_step: out is [batch, per_sample].
void normals(const StepParams& p, float* out);

// The raw stream: out is [batch, ceil(per_sample / 4) * 4] uint32.
void philox_stream(const StepParams& p, uint32_t* out);

Isa active_isa();
void set_active_isa(Isa isa);  // throws std::invalid_argument if this CPU cannot run it

int num_threads();             // the process-wide thread budget (thread_pool.h)
void set_num_threads(int n);   // n >= 1

}  // namespace cpu
}  // namespace fastddpm
