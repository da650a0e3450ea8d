// The CUDA U-Net engine: executes a plan (src/fastddpm/plan.py, layout in fastddpm/plan.h) on one
// GPU, and runs whole sampling loops as a captured CUDA graph. Mirrors csrc/cpu/engine.h.
// Raw pointers and plain structs only (csrc/bindings_cuda.cpp is the only file that knows Python).
// Errors: bad plans / shapes / arguments throw std::invalid_argument before anything is launched;
// a failed cudaMalloc throws OutOfMemory (nothing half-built is kept, other engines and this
// engine's earlier state stay usable); any other CUDA failure throws CudaError.
#pragma once
#include <cstdint>
#include <functional>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "cuda_check.h"
#include "engine_kernels.cuh"
#include "fastddpm/call_lock.h"
#include "fastddpm/plan_check.h"

namespace fastddpm {
namespace cuda {

// Tuning switches; the Python side reads them from FASTDDPM_* variables
// (executors/engine_options.py).
struct CudaEngineOptions {
  // split K where one sample's GEMM has fewer tiles than the GPU has multiprocessors (the batch-1
  // latency case); false never splits (no workspace: for memory, or for large batches, where the
  // grid fills the GPU anyway; results then differ in rounding)
  bool split_k = true;
};

using PlanView = plan::PlanView;      // fastddpm/plan_check.h
using WeightView = plan::WeightView;  // host float32, copied to the device at creation

// One run of the loop over the schedule last given to set_schedule. Host arrays. n, the samples the
// loop makes: the engine batch N, or N / 2 with guidance.
struct RunArgs {
  uint64_t seed = 0;
  int64_t first_index = 0;
  std::vector<int64_t> keep;      // loop positions to copy out (0 = x_T, k = after k steps)
  std::vector<float*> keep_out;   // one [n, C, H, W] host buffer per keep entry
  float* x_out = nullptr;         // [n, C, H, W] host: the final sample
  float x_scale = 1.0f;           // x_T = x_scale * the initial normals (float32 multiply); position 0 shows it
  int64_t every = 0;              // on_chunk after every `every` steps (and the last); 0 = only the last
  // Multistep history: 0 (single-step samplers), 1 or 2 previous x0 predictions fed to each step
  // (StepSchedule.history). With history > 0 the engine keeps a device ring of 3 [N, C, H, W]
  // buffers (allocated on the first such run, then kept): step k (0-based) writes its x0 to
  // ring[k % 3] and reads H1 = ring[(k - 1) % 3] from k = 1 on and, with history 2,
  // H2 = ring[(k - 2) % 3] from k = 2 on, as the CPU engine does.
  int history = 0;
  // Class conditioning: host [N, D] class-embedding rows (D = class_dim()), required by a
  // class-conditional plan and refused by any other; uploaded into the class slot before the loop.
  const float* class_emb = nullptr;
  // Classifier-free guidance (a conditional plan, N even): n = N / 2 samples; the U-Net runs rows
  // [0, n) and [n, 2n) on the same x (class_emb rows [0, n) conditional, [n, 2n) the null class),
  // each step uses m_u + w (m_c - m_u) (step.h step_guided_output, w = guidance) and writes x to
  // both halves of the U-Net input. x_T, noise and first_index are those of the n samples.
  bool guided = false;
  float guidance = 1.0f;
};

class Engine {
 public:
  // requested: the GEMM precision asked for; kTF32 on a GPU older than sm_80 runs as kF32 (see
  // precision()), kBF16 there is refused. device: CUDA device index.
  Engine(const PlanView& plan, const std::vector<WeightView>& weights, int64_t batch, int64_t in_c,
         int64_t out_c, int64_t height, int64_t width, Precision requested, int device,
         const CudaEngineOptions& options);
  ~Engine();
  Engine(const Engine&) = delete;
  Engine& operator=(const Engine&) = delete;

  // out = U-Net(x, t): host arrays x [N, in_c, H, W], t [N], out [N, out_c, H, W] (synchronous).
  // class_emb: host [N, class_dim()] rows of a class-conditional plan (required there), else null.
  void forward_host(const float* x, const float* t, const float* class_emb, float* out);
  // The same on device pointers of this engine's device, enqueued on `stream` (asynchronous). The
  // caller's stream first waits for the last use of the engine's buffers (any stream, or the
  // loop), and this call becomes the last use; inside a stream capture the wait and the record
  // are captured as external event nodes, so the replayed graph keeps that ordering. class_emb:
  // device [N, class_dim()] rows of a class-conditional plan (required there), else null.
  void forward_device(const float* x, const float* t, const float* class_emb, float* out, cudaStream_t stream);

  // The scheduler's table: coef [steps, kCoefWidth] float32, timesteps [steps] (the noise keys),
  // model_t [steps] float32 the model's time input of a fractional schedule or null (then
  // float(timesteps[s])); host arrays, checked and uploaded.
  void set_schedule(const float* coef, const int64_t* timesteps, const float* model_t, int64_t steps);
  // The whole loop; on_chunk(k) after step k at chunk boundaries, false = cancel. Returns false if cancelled.
  // on_chunk must not call back into this engine (fastddpm::ReentrantCall).
  bool run(const RunArgs& args, const std::function<bool(int64_t)>& on_chunk);

  // Per-op GPU time, as the CPU engine's: with profiling on, every forward_host (and every step of
  // run, which then replays the ops one by one instead of the graph) adds each plan op's seconds,
  // between CUDA events around it, to op_seconds; set_profiling(true) also zeroes them.
  void set_profiling(bool on);
  std::vector<double> op_seconds();

  Precision precision() const { return precision_; }
  int device() const { return device_; }
  int64_t batch() const { return batch_; }
  // The class embedding's width D of a class-conditional plan (plan.h kClassSlot), else 0.
  int64_t class_dim() const;
  int64_t steps() const;
  int64_t device_bytes() const;
  bool graph_captured() const;
  int64_t graph_nodes() const;

  struct Impl;

 private:
  std::unique_ptr<Impl> impl_;
  Precision precision_;
  int device_;
  int64_t batch_;
  CallMutex mu_;  // one call at a time: calls share the activation arena and the graph (re-entry: ReentrantCall)
};

}  // namespace cuda
}  // namespace fastddpm
