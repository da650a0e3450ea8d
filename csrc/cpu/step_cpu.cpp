#include "step_cpu.h"


#include <atomic>
#include <cmath>
#include <stdexcept>
#include <string>

#include "thread_pool.h"

namespace fastddpm {
namespace cpu {
namespace {

// Chunks are fixed slices of a sample, independent of the thread count, so results never depend
// on how many threads ran them. 16384 elements: a multiple of every ISA's block (4 * lanes * vectors in flight).
constexpr int64_t kChunk = 16384;
// Below this many elements a parallel region costs more than it saves.
constexpr int64_t kParallelMin = 1 << 15;  // an order of magnitude more work than waking a team
constexpr int64_t kMaxIndex = int64_t(1) << 32;
// Outputs of at least this many bytes are written with non-temporal stores and their inputs
// prefetched in software: x, m and out together then pass any L3 of the machines we target, so a
// plain store would only add a read of each output line (16 instead of 12 bytes per element) and
// evict x and m of the next chunk.
constexpr int64_t kStreamMinBytes = int64_t(16) << 20;

std::atomic<int> g_isa{-1};

void check_params(const StepParams& p) {
  if (p.batch < 0 || p.per_sample < 0)
    throw std::invalid_argument("batch and per_sample must be non-negative");
  if (p.first_index + p.batch > kMaxIndex)
    throw std::invalid_argument("sample indices first_index + i must lie below 2**32");
  if ((p.per_sample + 3) / 4 > kMaxIndex)
    throw std::invalid_argument("per_sample too large: Philox groups must fit in 32 bits");
  if (p.per_sample > 0 && p.batch > INT64_MAX / p.per_sample)
    throw std::invalid_argument("batch * per_sample overflows");
}

template <typename Fn>
void for_each_chunk(const StepParams& p, Fn&& fn, bool large = false, bool stream = false) {
  const int64_t per = (p.per_sample + kChunk - 1) / kChunk;
  const int64_t tasks = p.batch * per;
  auto run = [&](int64_t t) {
    Chunk c;
    c.sample = t / per;
    c.e0 = (t % per) * kChunk;
    c.e1 = c.e0 + kChunk < p.per_sample ? c.e0 + kChunk : p.per_sample;
    c.large = large;
    c.stream = stream;
    fn(c);
  };
  if (tasks <= 1 || p.batch * p.per_sample < kParallelMin) {
    for (int64_t t = 0; t < tasks; ++t) run(t);
    return;
  }
  const ThreadGrant grant;  // inside an engine's run: that run's grant
  pool_for(tasks, 1, grant.threads(), run);
}

}  // namespace

Isa active_isa() {
  int v = g_isa.load(std::memory_order_relaxed);
  if (v < 0) {
    v = int(best_isa());
    g_isa.store(v, std::memory_order_relaxed);
  }
  return Isa(v);
}

void set_active_isa(Isa isa) {
  if (!isa_supported(isa))
    throw std::invalid_argument(std::string("this CPU cannot run the ") + isa_name(isa) + " path");
  g_isa.store(int(isa), std::memory_order_relaxed);
}

int num_threads() { return thread_budget(); }

void set_num_threads(int n) { set_thread_budget(n); }

void fused_step(const StepParams& p, const StepArrays& a) {
  check_params(p);
  if (p.batch * p.per_sample == 0) return;
  if (!a.x || !a.m || !a.out || !a.coef) throw std::invalid_argument("null array pointer");
  for (int j = 0; j < kCoefWidth; ++j)
    if (!std::isfinite(a.coef[j])) throw std::invalid_argument("coefficient row has a non-finite value");
  if (a.coef[kClip] < 0.0f) throw std::invalid_argument("clip range must be >= 0 (0 = no clipping)");
  if (a.x0_out && (a.x0_out == a.x || a.x0_out == a.m || a.x0_out == a.out || a.x0_out == a.h1 ||
                   a.x0_out == a.h2 || a.x0_out == a.m_uncond))
    throw std::invalid_argument("x0_out must not be x, m, m_uncond, out, h1 or h2");
  if (a.m_uncond && !std::isfinite(a.guidance)) throw std::invalid_argument("guidance must be finite");
  const IsaKernels& k = kernels(active_isa());
  const bool large = p.batch * p.per_sample * int64_t(sizeof(float)) >= kStreamMinBytes;
  // in place (out == x or m) the line was just read: streaming it would only evict it
  const bool stream = large && a.out != a.x && a.out != a.m;
  for_each_chunk(p, [&](const Chunk& c) { k.step_chunk(p, a, c); }, large, stream);
}

void normals(const StepParams& p, float* out) {
  check_params(p);
  if (p.batch * p.per_sample == 0) return;
  if (!out) throw std::invalid_argument("null output pointer");
  const IsaKernels& k = kernels(active_isa());
  for_each_chunk(p, [&](const Chunk& c) { k.normals_chunk(p, out, c); });
}

void philox_stream(const StepParams& p, uint32_t* out) {
  check_params(p);
  if (p.batch * p.per_sample == 0) return;
  if (!out) throw std::invalid_argument("null output pointer");
  const int64_t padded = (p.per_sample + 3) / 4 * 4;
  StepParams q = p;
  q.per_sample = padded;  // chunks over the padded row: whole groups
  const IsaKernels& k = kernels(active_isa());
  for_each_chunk(q, [&](const Chunk& c) { k.philox_chunk(q, out, padded, c); });
}

}  // namespace cpu
}  // namespace fastddpm
