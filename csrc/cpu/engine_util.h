// Small pieces shared by the engine's translation units (engine.cpp, winograd.cpp): aligned
// buffers, the packed-A layout of the GEMM micro-kernel, and the parallel loop they all use.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <new>

#include "engine_kernels.h"
#include "thread_pool.h"

namespace fastddpm {
namespace cpu {
namespace engine_util {

constexpr int MR = kGemmMR;

inline int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }

struct AlignedFree {
  void operator()(float* p) const { std::free(p); }
};
using Buffer = std::unique_ptr<float[], AlignedFree>;

// n floats, 64-byte aligned, zeroed.
inline Buffer alloc_floats(int64_t n) {
  const size_t bytes = size_t(round_up(std::max<int64_t>(n, 1) * 4, 64));
  float* p = static_cast<float*>(std::aligned_alloc(64, bytes));
  if (!p) throw std::bad_alloc();
  std::memset(p, 0, bytes);
  return Buffer(p);
}

// Pack a [M, K] matrix given by element accessor f(m, k) into [ceil(M/MR)][K][MR], zero-padded.
template <typename F>
void pack_a_into(float* A, int64_t M, int64_t K, F&& f) {
  const int64_t Mb = (M + MR - 1) / MR;
  for (int64_t mb = 0; mb < Mb; ++mb)
    for (int64_t kk = 0; kk < K; ++kk)
      for (int m = 0; m < MR; ++m) {
        const int64_t mm = mb * MR + m;
        A[(mb * K + kk) * MR + m] = mm < M ? f(mm, kk) : 0.0f;
      }
}

template <typename F>
Buffer pack_a(int64_t M, int64_t K, F&& f) {
  Buffer A = alloc_floats(round_up(M, MR) * K);
  pack_a_into(A.get(), M, K, f);
  return A;
}

// On the pool (thread_pool.h): an index's result does not depend on which thread computes it, and
// on a busy machine a thread that runs takes the chunks of one that is descheduled. Chunks of about
// n / (8 threads) consecutive indices, not single indices: the per-chunk claim is then amortised,
// and consecutive GEMM tiles, which share their B panel, stay on one core.
constexpr int64_t kChunksPerThread = 8;
template <typename Fn>
void parallel_for(int64_t n, int threads, bool worth_it, Fn&& fn) {
  if (threads <= 1 || n <= 1 || !worth_it) {
    for (int64_t i = 0; i < n; ++i) fn(i);
    return;
  }
  const int64_t chunk = std::max<int64_t>(1, n / (int64_t(threads) * kChunksPerThread));
  pool_for(n, chunk, threads, fn);
}

}  // namespace engine_util
}  // namespace cpu
}  // namespace fastddpm
