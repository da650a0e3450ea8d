// The CUDA fused sampler step and the noise kernels (see step.h for the maths, philox.py for the
// noise). One thread per Philox block (4 consecutive elements of one sample): it makes the block's
// 4 normals in registers and reads, combines and writes its 4 elements, so z never touches memory.
//
// Two memory paths per kernel, same results:
//   vec     per_sample % 4 == 0 and 16-byte aligned pointers: one float4 load per input, one
//           float4 store; thread i owns elements [4i, 4i + 4), so no index division for the data.
//   scalar  anything else: group g of sample s covers elements s*per_sample + [4g, 4g + 4), the
//           last group of a sample may be partial (its unused normals are dropped, as in philox.py).
// Grid-stride loops; 32-bit indices when everything fits, 64-bit otherwise.
#include <cuda_runtime.h>

#include <atomic>
#include <climits>
#include <cmath>
#include <cstdint>

#include "fastddpm/philox.h"
#include "step_cuda.h"

namespace fastddpm {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxIndex = int64_t(1) << 32;  // sample indices and Philox groups are uint32 counters
constexpr int kMaxCachedDevices = 64;

// ---------------------------------------------------------------------------------------------
// device code

using Coef = StepRow<float>;

// The row is read when the kernel runs, never baked into the launch: a captured CUDA graph replays
// with the row's contents (and the table's row pointer is the only launch argument).
__device__ __forceinline__ Coef load_coef(const float* __restrict__ row) {
  return Coef{__ldg(row + kAx), __ldg(row + kAm), __ldg(row + kCx0), __ldg(row + kDx),
              __ldg(row + kDm), __ldg(row + kSigma), __ldg(row + kClip), __ldg(row + kH1), __ldg(row + kH2)};
}

__device__ __forceinline__ float step_element(float x, float m, float z, const Coef& c, bool clip, bool noisy) {
  const float y = step_mean(x, m, c, clip);
  return noisy ? step_add_noise(y, z, c) : y;
}

// The same with the multistep history (step.h: H1 and H2 added before the noise, each only when
// given); x0 receives this element's x0 after the clip, for the caller to store.
__device__ __forceinline__ float step_element_history(float x, float m, float z, float h1, float h2, const Coef& c,
                                                      bool clip, bool noisy, bool has_h1, bool has_h2, float& x0) {
  x0 = step_x0(x, m, c, clip);
  float y = step_mean_of_x0(x0, x, m, c);
  if (has_h1) y = step_add_history(y, h1, c.h1);
  if (has_h2) y = step_add_history(y, h2, c.h2);
  return noisy ? step_add_noise(y, z, c) : y;
}

__device__ __forceinline__ void philox_normals(const StepParams& p, uint32_t group, uint32_t sample, float z[4]) {
  box_muller4(philox4x32_10(group, p.first_index + sample, p.noise_step, 0u, p.seed), z);
}

struct StepPtrs {
  const float* x;      // [batch, per_sample]
  const float* m;      // [batch, per_sample]
  float* out;          // [batch, per_sample], may alias x, m or noise exactly
  const float* coef;   // [kCoefWidth], device
  const float* noise;  // [batch, per_sample] or nullptr
  // The multistep history (read only by the kHistory bodies): each nullptr or [batch, per_sample].
  const float* h1 = nullptr;  // the previous step's x0 (weight coef[kH1]); may be out exactly
  const float* h2 = nullptr;  // the one before (weight coef[kH2]); may be out exactly
  float* x0_out = nullptr;    // receives this step's x0; overlaps nothing else
  // Classifier-free guidance (read only by the kGuided bodies): the null-class model output
  // [batch, per_sample] (may be out exactly); the step's model output is
  // step_guided_output(m, m_uncond, guidance).
  const float* m_uncond = nullptr;
  float guidance = 1.0f;
  // The guided loop only (kGuided): nullptr or a second destination of out's values, overlapping
  // nothing the step reads (the null-class rows of the U-Net input: the next forward sees [x, x]).
  float* out_copy = nullptr;
};

// kVec: the 16-byte path. kGiven: noise comes from memory instead of Philox. kHistory: a.h1, a.h2
// and a.x0_out are read (each may be null: a uniform branch); without it the body is the plain
// single-step one, whatever those pointers hold. kGuided: the model output is the guided
// combination of a.m and a.m_uncond, and out is also stored to a.out_copy where that is set;
// without it a.m_uncond, a.guidance and a.out_copy are never read.
// No __restrict__ on x, m, out: out may be x (in-place step); each element is read, then written,
// by the same thread only. Shared by the plain step (parameters as kernel arguments) and the loop
// step (seed, noise step and coefficient row read from device memory).
template <typename Index, bool kVec, bool kGiven, bool kHistory, bool kGuided>
__device__ __forceinline__ void step_body(const StepParams& p, const StepPtrs& a) {
  const Coef c = load_coef(a.coef);
  const bool clip = c.clip > 0.0f;
  const bool make_noise = !kGiven && c.sigma != 0.0f;  // uniform branch: sigma = 0 skips Philox
  const bool noisy = kGiven || make_noise;
  const bool has_h1 = kHistory && a.h1 != nullptr, has_h2 = kHistory && a.h2 != nullptr;
  const Index per = Index(p.per_sample);
  const Index groups = (per + 3) / 4;                  // Philox blocks per sample
  const Index total = Index(p.batch) * groups;
  const Index stride = Index(gridDim.x) * kThreads;
  for (Index i = Index(blockIdx.x) * kThreads + threadIdx.x; i < total; i += stride) {
    const Index s = i / groups, g = i - s * groups;
    float z[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    if (make_noise) philox_normals(p, uint32_t(g), uint32_t(s), z);
    if (kVec) {
      const float4 xv = reinterpret_cast<const float4*>(a.x)[i];  // elements 4i .. 4i+3
      float4 mv = reinterpret_cast<const float4*>(a.m)[i];
      if (kGuided) {
        const float4 uv = reinterpret_cast<const float4*>(a.m_uncond)[i];
        mv.x = step_guided_output(mv.x, uv.x, a.guidance);
        mv.y = step_guided_output(mv.y, uv.y, a.guidance);
        mv.z = step_guided_output(mv.z, uv.z, a.guidance);
        mv.w = step_guided_output(mv.w, uv.w, a.guidance);
      }
      if (kGiven) {
        const float4 nv = reinterpret_cast<const float4*>(a.noise)[i];
        z[0] = nv.x; z[1] = nv.y; z[2] = nv.z; z[3] = nv.w;
      }
      float4 y;
      if (kHistory) {
        float4 h1v = make_float4(0.0f, 0.0f, 0.0f, 0.0f), h2v = h1v, x0v;
        if (has_h1) h1v = reinterpret_cast<const float4*>(a.h1)[i];
        if (has_h2) h2v = reinterpret_cast<const float4*>(a.h2)[i];
        y.x = step_element_history(xv.x, mv.x, z[0], h1v.x, h2v.x, c, clip, noisy, has_h1, has_h2, x0v.x);
        y.y = step_element_history(xv.y, mv.y, z[1], h1v.y, h2v.y, c, clip, noisy, has_h1, has_h2, x0v.y);
        y.z = step_element_history(xv.z, mv.z, z[2], h1v.z, h2v.z, c, clip, noisy, has_h1, has_h2, x0v.z);
        y.w = step_element_history(xv.w, mv.w, z[3], h1v.w, h2v.w, c, clip, noisy, has_h1, has_h2, x0v.w);
        if (a.x0_out) reinterpret_cast<float4*>(a.x0_out)[i] = x0v;
      } else {
        y.x = step_element(xv.x, mv.x, z[0], c, clip, noisy);
        y.y = step_element(xv.y, mv.y, z[1], c, clip, noisy);
        y.z = step_element(xv.z, mv.z, z[2], c, clip, noisy);
        y.w = step_element(xv.w, mv.w, z[3], c, clip, noisy);
      }
      reinterpret_cast<float4*>(a.out)[i] = y;
      if (kGuided && a.out_copy) reinterpret_cast<float4*>(a.out_copy)[i] = y;
    } else {
      const Index e = s * per + 4 * g;        // first element of this group
      const Index rest = per - 4 * g;          // elements of the sample from e on (>= 1)
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        if (Index(k) < rest) {
          const float zk = kGiven ? a.noise[e + k] : z[k];
          const float mk = kGuided ? step_guided_output(a.m[e + k], a.m_uncond[e + k], a.guidance) : a.m[e + k];
          float yk;
          if (kHistory) {
            float x0;
            const float h1k = has_h1 ? a.h1[e + k] : 0.0f, h2k = has_h2 ? a.h2[e + k] : 0.0f;
            yk = step_element_history(a.x[e + k], mk, zk, h1k, h2k, c, clip, noisy, has_h1, has_h2, x0);
            if (a.x0_out) a.x0_out[e + k] = x0;
          } else {
            yk = step_element(a.x[e + k], mk, zk, c, clip, noisy);
          }
          a.out[e + k] = yk;
          if (kGuided && a.out_copy) a.out_copy[e + k] = yk;
        }
      }
    }
  }
}

template <typename Index, bool kVec, bool kGiven, bool kHistory, bool kGuided>
__global__ void __launch_bounds__(kThreads) step_kernel(const StepParams p, const StepPtrs a) {
  step_body<Index, kVec, kGiven, kHistory, kGuided>(p, a);
}

// The loop step: step k = state->step of a captured loop. Seed, first index, noise step
// (noise_steps[k]) and coefficient row (coef_table + k * kCoefWidth) are read when the kernel
// runs, so one captured graph replays every step of every run.
// kHistory (the multistep loop, its own captured graph; without it the single-step kernel is
// unchanged): ring holds 3 slots of [batch, per_sample], and the history depth comes from
// state->history. Step k writes its x0 to slot k % 3 and reads H1 = slot (k - 1) % 3 from k = 1 on
// and, at depth 2, H2 = slot (k - 2) % 3 from k = 2 on (csrc/cpu/engine.cpp's ring): the slots
// follow the device counter, never the launch, and a slot is read only after this run wrote it.
// kGuided (the guided loops' own graphs): a.m_uncond is the null-class half of the model output,
// the scale state->guidance, and a.out_copy the null-class half of the U-Net input.
template <typename Index, bool kVec, bool kHistory, bool kGuided>
__global__ void __launch_bounds__(kThreads) loop_step_kernel(const StepParams p, StepPtrs a,
                                                             const uint32_t* __restrict__ noise_steps,
                                                             const LoopState* __restrict__ state,
                                                             float* ring) {
  const int32_t k = state->step;
  StepParams q = p;
  q.seed = state->seed;
  q.first_index = state->first_index;
  q.noise_step = noise_steps[k];
  a.coef += int64_t(k) * kCoefWidth;
  if (kHistory) {
    const int32_t depth = state->history;
    const int64_t slot = p.batch * p.per_sample;
    if (depth > 0) {  // uniform over the grid
      a.x0_out = ring + int64_t(k % 3) * slot;
      if (k >= 1) a.h1 = ring + int64_t((k - 1) % 3) * slot;
      if (depth >= 2 && k >= 2) a.h2 = ring + int64_t((k - 2) % 3) * slot;
    }
  }
  if (kGuided) a.guidance = state->guidance;
  step_body<Index, kVec, false, kHistory, kGuided>(q, a);
}

template <typename Index, bool kVec>
__device__ __forceinline__ void normals_body(const StepParams& p, float* __restrict__ out) {
  const Index per = Index(p.per_sample);
  const Index groups = (per + 3) / 4;
  const Index total = Index(p.batch) * groups;
  const Index stride = Index(gridDim.x) * kThreads;
  for (Index i = Index(blockIdx.x) * kThreads + threadIdx.x; i < total; i += stride) {
    const Index s = i / groups, g = i - s * groups;
    float z[4];
    philox_normals(p, uint32_t(g), uint32_t(s), z);
    if (kVec) {
      reinterpret_cast<float4*>(out)[i] = make_float4(z[0], z[1], z[2], z[3]);
    } else {
      const Index e = s * per + 4 * g, rest = per - 4 * g;
#pragma unroll
      for (int k = 0; k < 4; ++k)
        if (Index(k) < rest) out[e + k] = z[k];
    }
  }
}

template <typename Index, bool kVec>
__global__ void __launch_bounds__(kThreads) normals_kernel(const StepParams p, float* __restrict__ out) {
  normals_body<Index, kVec>(p, out);
}

// x_T of a captured loop: the seed and first index come from device memory.
template <typename Index, bool kVec>
__global__ void __launch_bounds__(kThreads) loop_normals_kernel(const StepParams p, float* __restrict__ out,
                                                                const LoopState* __restrict__ state) {
  StepParams q = p;
  q.seed = state->seed;
  q.first_index = state->first_index;
  normals_body<Index, kVec>(q, out);
}

// out: [batch, groups * 4]: rows are whole groups, so group i of the flat grid starts at 4i.
template <typename Index, bool kVec>
__global__ void __launch_bounds__(kThreads) philox_kernel(const StepParams p, uint32_t* __restrict__ out) {
  const Index groups = (Index(p.per_sample) + 3) / 4;
  const Index total = Index(p.batch) * groups;
  const Index stride = Index(gridDim.x) * kThreads;
  for (Index i = Index(blockIdx.x) * kThreads + threadIdx.x; i < total; i += stride) {
    const Index s = i / groups, g = i - s * groups;
    const U32x4 r = philox4x32_10(uint32_t(g), p.first_index + uint32_t(s), p.noise_step, 0u, p.seed);
    if (kVec) {
      reinterpret_cast<uint4*>(out)[i] = make_uint4(r.v[0], r.v[1], r.v[2], r.v[3]);
    } else {
#pragma unroll
      for (int k = 0; k < 4; ++k) out[4 * i + k] = r.v[k];
    }
  }
}

// ---------------------------------------------------------------------------------------------
// host side: checks and launch shapes

Status invalid(const char* message) {
  Status s;
  s.error = cudaErrorInvalidValue;
  s.message = message;
  s.invalid_argument = true;
  return s;
}

Status from_cuda(cudaError_t e) {
  Status s;
  if (e != cudaSuccess) {
    s.error = e;
    s.message = cudaGetErrorString(e);
  }
  return s;
}

const char* check_params(const StepParams& p) {
  if (p.batch < 0 || p.per_sample < 0) return "batch and per_sample must be non-negative";
  if (p.per_sample > 4 * kMaxIndex) return "per_sample too large: Philox groups must fit in 32 bits";
  if (int64_t(p.first_index) + p.batch > kMaxIndex)
    return "sample indices first_index + i must lie below 2**32";
  const int64_t padded = (p.per_sample + 3) / 4 * 4;
  if (padded > 0 && p.batch > INT64_MAX / padded) return "batch * per_sample overflows";
  return nullptr;
}

bool aligned(const void* ptr, uintptr_t bytes) { return (reinterpret_cast<uintptr_t>(ptr) & (bytes - 1)) == 0; }

// Overlap that is not exact aliasing: threads would read elements other threads already wrote.
bool partial_overlap(const void* a, const void* b, int64_t bytes) {
  if (a == nullptr || b == nullptr || a == b) return false;
  const uintptr_t pa = reinterpret_cast<uintptr_t>(a), pb = reinterpret_cast<uintptr_t>(b);
  return pa < pb + uintptr_t(bytes) && pb < pa + uintptr_t(bytes);
}

// Resident blocks of kThreads on the whole current device (cached per device): the grid-stride
// loops need no more blocks than can run at once (two waves' worth, for balance).
Status max_blocks(int64_t* blocks) {
  static std::atomic<int64_t> cache[kMaxCachedDevices];
  int dev = 0;
  cudaError_t e = cudaGetDevice(&dev);
  if (e != cudaSuccess) return from_cuda(e);
  if (dev >= 0 && dev < kMaxCachedDevices) {
    const int64_t v = cache[dev].load(std::memory_order_relaxed);
    if (v > 0) {
      *blocks = v;
      return Status{};
    }
  }
  int sms = 0, threads_per_sm = 0;
  e = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
  if (e == cudaSuccess) e = cudaDeviceGetAttribute(&threads_per_sm, cudaDevAttrMaxThreadsPerMultiProcessor, dev);
  if (e != cudaSuccess) return from_cuda(e);
  const int64_t v = 2 * int64_t(sms) * (threads_per_sm > kThreads ? threads_per_sm / kThreads : 1);
  if (dev >= 0 && dev < kMaxCachedDevices) cache[dev].store(v, std::memory_order_relaxed);
  *blocks = v;
  return Status{};
}

struct Shape {
  unsigned blocks = 0;
  bool wide = false;  // 64-bit indices
};

// groups: threads' work items (Philox blocks); row_len: elements per row of the largest array.
Status launch_shape(const StepParams& p, int64_t row_len, Shape* shape) {
  const int64_t groups = p.batch * ((p.per_sample + 3) / 4);
  int64_t cap = 0;
  const Status st = max_blocks(&cap);
  if (!st.ok()) return st;
  const int64_t need = (groups + kThreads - 1) / kThreads;
  shape->blocks = unsigned(need < cap ? need : cap);
  // 32-bit is safe if neither the loop counter (< groups + stride) nor an element index
  // (< batch * row_len + 4) can pass 2**32.
  const int64_t limit = int64_t(UINT32_MAX);
  shape->wide = groups + int64_t(shape->blocks) * kThreads > limit || p.batch * row_len + 4 > limit;
  return Status{};
}

Status after_launch() { return from_cuda(cudaGetLastError()); }

template <typename Index, bool kVec, bool kGiven, bool kHistory>
void launch_step_guided(const Shape& sh, bool guided, const StepParams& p, const StepPtrs& a, cudaStream_t st) {
  if (guided) step_kernel<Index, kVec, kGiven, kHistory, true><<<sh.blocks, kThreads, 0, st>>>(p, a);
  else step_kernel<Index, kVec, kGiven, kHistory, false><<<sh.blocks, kThreads, 0, st>>>(p, a);
}

template <typename Index, bool kVec, bool kGiven>
void launch_step_history(const Shape& sh, bool history, bool guided, const StepParams& p, const StepPtrs& a,
                         cudaStream_t st) {
  if (history) launch_step_guided<Index, kVec, kGiven, true>(sh, guided, p, a, st);
  else launch_step_guided<Index, kVec, kGiven, false>(sh, guided, p, a, st);
}

template <typename Index>
void launch_step(const Shape& sh, bool vec, bool given, bool history, bool guided, const StepParams& p,
                 const StepPtrs& a, cudaStream_t st) {
  if (vec) {
    if (given) launch_step_history<Index, true, true>(sh, history, guided, p, a, st);
    else launch_step_history<Index, true, false>(sh, history, guided, p, a, st);
  } else {
    if (given) launch_step_history<Index, false, true>(sh, history, guided, p, a, st);
    else launch_step_history<Index, false, false>(sh, history, guided, p, a, st);
  }
}

template <typename Index, bool kVec, bool kHistory>
void launch_loop_step_guided(const Shape& sh, bool guided, const StepParams& p, const StepPtrs& a,
                             const uint32_t* noise_steps, const LoopState* state, float* ring, cudaStream_t st) {
  if (guided)
    loop_step_kernel<Index, kVec, kHistory, true><<<sh.blocks, kThreads, 0, st>>>(p, a, noise_steps, state, ring);
  else
    loop_step_kernel<Index, kVec, kHistory, false><<<sh.blocks, kThreads, 0, st>>>(p, a, noise_steps, state, ring);
}

template <typename Index>
void launch_loop_step(const Shape& sh, bool vec, bool history, bool guided, const StepParams& p, const StepPtrs& a,
                      const uint32_t* noise_steps, const LoopState* state, float* ring, cudaStream_t st) {
  if (vec) {
    if (history) launch_loop_step_guided<Index, true, true>(sh, guided, p, a, noise_steps, state, ring, st);
    else launch_loop_step_guided<Index, true, false>(sh, guided, p, a, noise_steps, state, ring, st);
  } else {
    if (history) launch_loop_step_guided<Index, false, true>(sh, guided, p, a, noise_steps, state, ring, st);
    else launch_loop_step_guided<Index, false, false>(sh, guided, p, a, noise_steps, state, ring, st);
  }
}

}  // namespace

Status fused_step(const StepParams& p, const StepArrays& a, cudaStream_t stream) {
  if (const char* why = check_params(p)) return invalid(why);
  if (p.batch * p.per_sample == 0) return Status{};
  if (!a.x || !a.m || !a.out || !a.coef) return invalid("null device pointer (x, m, out and coef are required)");
  auto aligned_or_null = [](const void* ptr, uintptr_t bytes) { return ptr == nullptr || aligned(ptr, bytes); };
  if (!aligned(a.x, 4) || !aligned(a.m, 4) || !aligned(a.out, 4) || !aligned(a.coef, 4) ||
      !aligned_or_null(a.noise, 4) || !aligned_or_null(a.h1, 4) || !aligned_or_null(a.h2, 4) ||
      !aligned_or_null(a.x0_out, 4) || !aligned_or_null(a.m_uncond, 4))
    return invalid("float32 device pointers must be 4-byte aligned");
  if (a.m_uncond && !std::isfinite(a.guidance)) return invalid("guidance must be finite");
  const int64_t bytes = p.batch * p.per_sample * int64_t(sizeof(float));
  if (partial_overlap(a.out, a.x, bytes) || partial_overlap(a.out, a.m, bytes) ||
      partial_overlap(a.out, a.noise, bytes) || partial_overlap(a.out, a.h1, bytes) ||
      partial_overlap(a.out, a.h2, bytes) || partial_overlap(a.out, a.m_uncond, bytes))
    return invalid("out partially overlaps an input (it may only be the very same array)");
  if (a.x0_out) {  // written besides out: it may share no element with anything the step reads or writes
    for (const void* other : {static_cast<const void*>(a.x), static_cast<const void*>(a.m),
                              static_cast<const void*>(a.out), static_cast<const void*>(a.noise),
                              static_cast<const void*>(a.h1), static_cast<const void*>(a.h2),
                              static_cast<const void*>(a.m_uncond)})
      if (other == a.x0_out || partial_overlap(a.x0_out, other, bytes))
        return invalid("x0_out overlaps x, m, m_uncond, out, noise, h1 or h2");
  }
  Shape sh;
  const Status st = launch_shape(p, p.per_sample, &sh);
  if (!st.ok()) return st;
  const bool vec = p.per_sample % 4 == 0 && aligned(a.x, 16) && aligned(a.m, 16) && aligned(a.out, 16) &&
                   aligned_or_null(a.noise, 16) && aligned_or_null(a.h1, 16) && aligned_or_null(a.h2, 16) &&
                   aligned_or_null(a.x0_out, 16) && aligned_or_null(a.m_uncond, 16);
  const bool history = a.h1 || a.h2 || a.x0_out;  // without: the single-step kernels, unchanged
  const bool guided = a.m_uncond != nullptr;       // likewise
  StepPtrs ptrs{a.x, a.m, a.out, a.coef, a.noise};
  ptrs.h1 = a.h1;
  ptrs.h2 = a.h2;
  ptrs.x0_out = a.x0_out;
  ptrs.m_uncond = a.m_uncond;
  ptrs.guidance = a.guidance;
  if (sh.wide) launch_step<uint64_t>(sh, vec, a.noise != nullptr, history, guided, p, ptrs, stream);
  else launch_step<uint32_t>(sh, vec, a.noise != nullptr, history, guided, p, ptrs, stream);
  return after_launch();
}

Status normals(const StepParams& p, float* out, cudaStream_t stream) {
  if (const char* why = check_params(p)) return invalid(why);
  if (p.batch * p.per_sample == 0) return Status{};
  if (!out) return invalid("null output pointer");
  if (!aligned(out, 4)) return invalid("float32 device pointers must be 4-byte aligned");
  Shape sh;
  const Status st = launch_shape(p, p.per_sample, &sh);
  if (!st.ok()) return st;
  const bool vec = p.per_sample % 4 == 0 && aligned(out, 16);
  if (sh.wide) {
    if (vec) normals_kernel<uint64_t, true><<<sh.blocks, kThreads, 0, stream>>>(p, out);
    else normals_kernel<uint64_t, false><<<sh.blocks, kThreads, 0, stream>>>(p, out);
  } else {
    if (vec) normals_kernel<uint32_t, true><<<sh.blocks, kThreads, 0, stream>>>(p, out);
    else normals_kernel<uint32_t, false><<<sh.blocks, kThreads, 0, stream>>>(p, out);
  }
  return after_launch();
}

Status philox_stream(const StepParams& p, uint32_t* out, cudaStream_t stream) {
  if (const char* why = check_params(p)) return invalid(why);
  if (p.batch * p.per_sample == 0) return Status{};
  if (!out) return invalid("null output pointer");
  if (!aligned(out, 4)) return invalid("uint32 device pointers must be 4-byte aligned");
  Shape sh;
  const Status st = launch_shape(p, (p.per_sample + 3) / 4 * 4, &sh);
  if (!st.ok()) return st;
  const bool vec = aligned(out, 16);
  if (sh.wide) {
    if (vec) philox_kernel<uint64_t, true><<<sh.blocks, kThreads, 0, stream>>>(p, out);
    else philox_kernel<uint64_t, false><<<sh.blocks, kThreads, 0, stream>>>(p, out);
  } else {
    if (vec) philox_kernel<uint32_t, true><<<sh.blocks, kThreads, 0, stream>>>(p, out);
    else philox_kernel<uint32_t, false><<<sh.blocks, kThreads, 0, stream>>>(p, out);
  }
  return after_launch();
}

Status loop_step(const StepParams& p, const float* x, const float* m, float* out, const float* coef_table,
                 const uint32_t* noise_steps, const LoopState* state, float* ring, cudaStream_t stream,
                 const float* m_uncond, float* out_copy) {
  if (const char* why = check_params(p)) return invalid(why);
  if (p.batch * p.per_sample == 0) return Status{};
  if (!x || !m || !out || !coef_table || !noise_steps || !state) return invalid("null device pointer");
  if (out_copy && !m_uncond) return invalid("out_copy is for the guided loop (m_uncond) only");
  if ((ring && !aligned(ring, 4)) || (m_uncond && !aligned(m_uncond, 4)) || (out_copy && !aligned(out_copy, 4)))
    return invalid("float32 device pointers must be 4-byte aligned");
  const int64_t bytes = p.batch * p.per_sample * int64_t(sizeof(float));
  if (partial_overlap(out, x, bytes) || partial_overlap(out, m, bytes) || partial_overlap(out, m_uncond, bytes))
    return invalid("out partially overlaps an input (it may only be the very same array)");
  if (out_copy) {  // a second destination: it may share no element with anything the step reads or writes
    for (const void* other : {static_cast<const void*>(x), static_cast<const void*>(m),
                              static_cast<const void*>(m_uncond), static_cast<const void*>(out)})
      if (other == out_copy || partial_overlap(out_copy, other, bytes))
        return invalid("out_copy overlaps x, m, m_uncond or out");
  }
  if (ring) {  // the ring's three slots, [3 * batch * per_sample] floats, overlap none of the arrays
    const uintptr_t r0 = reinterpret_cast<uintptr_t>(ring), r1 = r0 + uintptr_t(3 * bytes);
    for (const void* other : {static_cast<const void*>(x), static_cast<const void*>(m), static_cast<const void*>(out),
                              static_cast<const void*>(m_uncond), static_cast<const void*>(out_copy)}) {
      if (!other) continue;
      const uintptr_t o0 = reinterpret_cast<uintptr_t>(other), o1 = o0 + uintptr_t(bytes);
      if (o0 < r1 && r0 < o1) return invalid("the history ring overlaps x, m, m_uncond, out or out_copy");
    }
  }
  Shape sh;
  const Status st = launch_shape(p, p.per_sample, &sh);
  if (!st.ok()) return st;
  // slot j starts j * batch * per_sample floats into the ring: 16-byte aligned with the ring when
  // per_sample % 4 == 0
  const bool vec = p.per_sample % 4 == 0 && aligned(x, 16) && aligned(m, 16) && aligned(out, 16) &&
                   (ring == nullptr || aligned(ring, 16)) && (m_uncond == nullptr || aligned(m_uncond, 16)) &&
                   (out_copy == nullptr || aligned(out_copy, 16));
  StepPtrs a{x, m, out, coef_table, nullptr};
  a.m_uncond = m_uncond;  // guidance: read from state->guidance by the kernel
  a.out_copy = out_copy;
  const bool guided = m_uncond != nullptr;
  if (sh.wide) launch_loop_step<uint64_t>(sh, vec, ring != nullptr, guided, p, a, noise_steps, state, ring, stream);
  else launch_loop_step<uint32_t>(sh, vec, ring != nullptr, guided, p, a, noise_steps, state, ring, stream);
  return after_launch();
}

Status loop_normals(const StepParams& p, float* out, const LoopState* state, cudaStream_t stream) {
  if (const char* why = check_params(p)) return invalid(why);
  if (p.batch * p.per_sample == 0) return Status{};
  if (!out || !state) return invalid("null device pointer");
  Shape sh;
  const Status st = launch_shape(p, p.per_sample, &sh);
  if (!st.ok()) return st;
  const bool vec = p.per_sample % 4 == 0 && aligned(out, 16);
  if (sh.wide) {
    if (vec) loop_normals_kernel<uint64_t, true><<<sh.blocks, kThreads, 0, stream>>>(p, out, state);
    else loop_normals_kernel<uint64_t, false><<<sh.blocks, kThreads, 0, stream>>>(p, out, state);
  } else {
    if (vec) loop_normals_kernel<uint32_t, true><<<sh.blocks, kThreads, 0, stream>>>(p, out, state);
    else loop_normals_kernel<uint32_t, false><<<sh.blocks, kThreads, 0, stream>>>(p, out, state);
  }
  return after_launch();
}

}  // namespace cuda
}  // namespace fastddpm
