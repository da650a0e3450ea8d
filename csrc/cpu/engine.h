// The native U-Net engine: executes a plan (src/fastddpm/plan.py, layout in fastddpm/plan.h) on
// the CPU, and runs whole sampling loops (U-Net forward + fused step + Philox noise) in one call.
// Raw pointers and plain structs only; bad input throws std::invalid_argument.
#pragma once
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "fastddpm/call_lock.h"
#include "fastddpm/plan_check.h"

namespace fastddpm {
namespace cpu {

using PlanView = plan::PlanView;      // fastddpm/plan_check.h
using WeightView = plan::WeightView;  // copied at creation

// A whole sampling loop: steps rows of the scheduler's coefficient table and its timesteps.
// n, the samples the loop makes: the engine batch N, or N / 2 with guidance.
struct LoopArgs {
  int64_t steps = 0;
  const float* coef = nullptr;         // [steps, kCoefWidth]
  const int64_t* timesteps = nullptr;  // [steps]: the noise step of each step (and the model's time unless model_t)
  // A fractional schedule: [steps] the model's time input of each step (float32, as diffusers feeds
  // it); null: float(timesteps[s]).
  const float* model_t = nullptr;
  float x_scale = 1.0f;                // x_T = x_scale * the initial normals (float32 multiply); position 0 shows it
  uint64_t seed = 0;
  int64_t first_index = 0;
  std::vector<int64_t> keep;           // loop positions to copy out (0 = x_T, k = after k steps)
  std::vector<float*> keep_out;        // one [n, C, H, W] buffer per keep entry
  float* x_out = nullptr;              // [n, C, H, W] the final sample
  // Multistep history: 0 (single-step samplers), 1 or 2 previous x0 predictions fed to each step
  // as H1 (and H2), weighted by the row's h1 (h2) columns; see Engine::run.
  int history = 0;
  // Class conditioning: [N, D] class-embedding rows (D = the plan's class slot width), required by
  // a class-conditional plan and refused by any other.
  const float* class_emb = nullptr;
  // Classifier-free guidance (a conditional plan, N even): n = N / 2 samples; the U-Net runs rows
  // [0, n) and [n, 2n) on the same x (class_emb rows [0, n) conditional, [n, 2n) the null class)
  // and the step uses m_u + w (m_c - m_u) (step.h step_guided_output), m_c = output rows [0, n),
  // m_u = rows [n, 2n), w = guidance. x_T, noise and first_index are those of the n samples.
  bool guided = false;
  float guidance = 1.0f;
  int threads = 0;  // threads asked of the budget per step (thread_pool.h); 0: the whole budget
};

// Tuning switches; the defaults are the tuned behaviour, the others exist for tests and
// benchmarks (the Python side reads them from FASTDDPM_* variables: executors/engine_options.py).
// None of them changes a result bit except winograd_max_m / winograd_force (another conv path).
struct CpuEngineOptions {
  int winograd_max_m = 4;       // the largest Winograd output tile: 0 (direct convs only), 2 or 4
  bool winograd_force = false;  // Winograd wherever a conv's shape allows, whatever the cost model says
  bool compact_grid = true;     // grid conv columns skip the pad columns where the image width allows
  bool sample_parallel = true;  // whole multiples of the thread count run one sample per thread
};

class Engine {
 public:
  // batch, in_channels, out_channels, height, width: what the plan was built for (checked).
  Engine(const PlanView& plan, const std::vector<WeightView>& weights, int64_t batch, int64_t in_c,
         int64_t out_c, int64_t height, int64_t width, const CpuEngineOptions& options);
  ~Engine();
  Engine(const Engine&) = delete;
  Engine& operator=(const Engine&) = delete;

  // out = U-Net(x, t): x [N, in_c, H, W], t [N] timesteps, out [N, out_c, H, W]. class_emb: the
  // class-embedding rows [N, class_dim()] of a class-conditional plan (required there), else null.
  // threads: asked of the process-wide budget (thread_pool.h ThreadGrant); 0 = the whole budget.
  void forward(const float* x, const float* t, const float* class_emb, float* out, int threads = 0);

  // The loop of LoopArgs; on_step(k) runs after step k (1-based) and returns false to cancel.
  // Returns false if cancelled (outputs then hold nothing meaningful). With a.history > 0 the
  // engine keeps a ring of 3 [N, C, H, W] buffers (allocated on the first such run, then kept):
  // step k (0-based) writes its x0 to ring[k % 3] and reads H1 = ring[(k - 1) % 3] from k = 1 on
  // and, with history 2, H2 = ring[(k - 2) % 3] from k = 2 on (no history term before that); the
  // ring holds n samples (kept, and grown when a later run needs more).
  bool run(const LoopArgs& args, const std::function<bool(int64_t)>& on_step);

  int64_t batch() const { return batch_; }
  // The class embedding's width D of a class-conditional plan (plan.h kClassSlot), else 0.
  int64_t class_dim() const;
  int64_t arena_bytes() const;
  // Per CONV op in plan order, with the active ISA's micro-kernel: 0 for the direct GEMM, else
  // the Winograd output tile size (2 or 4, winograd.h) it runs with.
  std::vector<int> conv_paths() const;
  // Per-op wall time: with profiling on, every forward (alone or inside run) adds each plan op's
  // seconds to op_seconds (one entry per plan op); set_profiling(true) also zeroes them. Samples
  // run by the sample-parallel schedule are not timed (their threads' times would overlap).
  void set_profiling(bool on);
  std::vector<double> op_seconds() const;

  struct Impl;

 private:
  std::unique_ptr<Impl> impl_;
  int64_t batch_;
  mutable CallMutex mu_;  // one call at a time: calls share the activation arena (re-entry: ReentrantCall)
};

}  // namespace cpu
}  // namespace fastddpm
