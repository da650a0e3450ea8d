// Runtime ISA dispatch for the CPU kernels. Each ISA translation unit (kernels_*.cpp) compiles the
// same vector source (simd_kernels.inc) for its own target and exports one IsaKernels table; the
// driver picks the best table the CPU supports, so one build runs on any x86-64.
#pragma once
#include <cstdint>

#include "fastddpm/step.h"

namespace fastddpm {
namespace cpu {

enum class Isa : int { kGeneric = 0, kAvx2 = 1, kAvx512 = 2 };

// One contiguous run [e0, e1) of sample `sample`; e0 is a multiple of the ISA's block (so Philox
// groups start at a vector boundary) and the run never crosses a sample boundary.
struct Chunk {
  int64_t sample = 0;
  int64_t e0 = 0;
  int64_t e1 = 0;
  // arrays far larger than the caches: prefetch the inputs ahead in software
  bool large = false;
  // write out with non-temporal stores (set for large outputs not written in place, so the write
  // does not first read each line; the kernels still fall back to plain stores if out is not 16-byte aligned)
  bool stream = false;
};

struct IsaKernels {
  const char* name;
  int lanes;  // float32 lanes per vector
  // x_prev for one chunk: see step.h. a.coef points at one row of kCoefWidth floats.
  void (*step_chunk)(const StepParams& p, const StepArrays& a, const Chunk& c);
  // normals of the noise spec into out[sample * per_sample + e].
  void (*normals_chunk)(const StepParams& p, float* out, const Chunk& c);
  // the raw Philox stream: out[sample * padded + e] for e in the chunk, padded = groups * 4.
  void (*philox_chunk)(const StepParams& p, uint32_t* out, int64_t padded, const Chunk& c);
};

extern const IsaKernels kGenericKernels;
extern const IsaKernels kAvx2Kernels;
extern const IsaKernels kAvx512Kernels;

bool isa_supported(Isa isa);     // the CPU (and OS) can run this path
Isa best_isa();                  // the fastest supported path
const char* isa_name(Isa isa);
const IsaKernels& kernels(Isa isa);

}  // namespace cpu
}  // namespace fastddpm
