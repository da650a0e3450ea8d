#include "peak.h"

#include <omp.h>

#include <chrono>
#include <stdexcept>
#include <string>

namespace fastddpm {
namespace cpu {
namespace {

// 12 independent accumulator chains: enough to cover 4-cycle FMA latency on 2-3 FMA pipes.
// Returns the FLOPs done (a * b + c on every lane of 12 vectors, `iters` times).
template <typename V>
__attribute__((always_inline)) inline double fma_chains(long iters, float* sink) {
  constexpr int lanes = sizeof(V) / sizeof(float);
  // distinct starting values, or the compiler merges the identical chains into one
  V a0 = V{} + 1.0f, a1 = V{} + 1.01f, a2 = V{} + 1.02f, a3 = V{} + 1.03f, a4 = V{} + 1.04f, a5 = V{} + 1.05f,
    a6 = V{} + 1.06f, a7 = V{} + 1.07f, a8 = V{} + 1.08f, a9 = V{} + 1.09f, a10 = V{} + 1.1f, a11 = V{} + 1.11f;
  const V m = V{} + 0.999999f, c = V{} + 1e-7f;
  for (long i = 0; i < iters; ++i) {
    a0 = a0 * m + c; a1 = a1 * m + c; a2 = a2 * m + c; a3 = a3 * m + c;
    a4 = a4 * m + c; a5 = a5 * m + c; a6 = a6 * m + c; a7 = a7 * m + c;
    a8 = a8 * m + c; a9 = a9 * m + c; a10 = a10 * m + c; a11 = a11 * m + c;
  }
  const V s = ((a0 + a1) + (a2 + a3)) + ((a4 + a5) + (a6 + a7)) + ((a8 + a9) + (a10 + a11));
  *sink = s[0];
  return 2.0 * lanes * 12 * double(iters);
}

typedef float V16 __attribute__((vector_size(64)));
typedef float V8 __attribute__((vector_size(32)));
typedef float V4 __attribute__((vector_size(16)));

// -ffp-contract=fast inside these functions only: a * m + c must become one FMA instruction
__attribute__((target("avx512f,fma"), optimize("fp-contract=fast"))) double run_avx512(long n, float* s) {
  return fma_chains<V16>(n, s);
}
__attribute__((target("avx2,fma"), optimize("fp-contract=fast"))) double run_avx2(long n, float* s) {
  return fma_chains<V8>(n, s);
}
double run_generic(long n, float* s) { return fma_chains<V4>(n, s); }

double run(Isa isa, long n, float* s) {
  switch (isa) {
    case Isa::kAvx512: return run_avx512(n, s);
    case Isa::kAvx2: return run_avx2(n, s);
    default: return run_generic(n, s);
  }
}

}  // namespace

double fma_peak_gflops(Isa isa, int threads, double seconds) {
  if (!isa_supported(isa)) throw std::invalid_argument(std::string("this CPU cannot run the ") + isa_name(isa) + " path");
  if (threads < 1) throw std::invalid_argument("threads must be >= 1");
  if (!(seconds > 0 && seconds <= 10)) throw std::invalid_argument("seconds must be in (0, 10]");
  float sink[64] = {};
  // calibrate one thread's rate, then every thread runs the same count at once
  long n = 1 << 16;
  double dt = 0;
  for (;;) {
    const auto t0 = std::chrono::steady_clock::now();
    run(isa, n, sink);
    dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    if (dt > 0.01 || n > (1L << 40)) break;
    n *= 4;
  }
  const long iters = long(double(n) * seconds / dt) + 1;
  double flops = 0;
  const auto t0 = std::chrono::steady_clock::now();
#pragma omp parallel num_threads(threads) reduction(+ : flops)
  flops += run(isa, iters, sink + 8 * (omp_get_thread_num() % 8));
  const double total = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return flops / total / 1e9;
}

}  // namespace cpu
}  // namespace fastddpm
