// The CPU core's threads: one process-wide budget that every call draws from, and one persistent
// pool of workers that runs the parallel loops of the engine and the fused step.
//
// Why not OpenMP: an OpenMP loop ends at a barrier that waits for every thread of the team, so on a
// busy machine a descheduled thread stalls the whole forward (~100 loops each) for a time slice. Here
// a loop is a counter of chunks that any participant claims: the caller always takes part, a worker
// joins when it runs, and the caller waits only for chunks already claimed. A worker that the OS
// has taken away delays nothing it has not started. Idle workers spin briefly (the gaps between the
// loops of one forward are microseconds), then sleep on a futex, so the cores go back to others.
//
// Determinism: a loop's chunks are fixed by (n, chunk) alone and each index runs exactly once, so a
// result never depends on how many threads took part or which one ran which chunk.
#pragma once
#include <cstdint>

namespace fastddpm {
namespace cpu {

// The budget: at most `thread_budget()` threads computing at once across all calls of the
// process. Default: the CPUs this process may run on (OMP_NUM_THREADS if set). set_thread_budget(n):
// n >= 1 (above 4095, the most one loop can use, it means 4095).
int thread_budget();
void set_thread_budget(int n);
int threads_in_use();  // threads held by grants right now (for tests and info)
// The grant's arithmetic without the RAII (for callers outside C++, such as the numba engine):
// acquire returns min(requested or the budget, what is free), at least 1; release gives it back.
int acquire_threads(int requested);
void release_threads(int n);
// The oversubscription fallback (one thread per call for a while after a stall): on by default;
// off for tests that count threads and for benchmarks that measure what it buys.
void set_solo_fallback(bool on);

// A claim on the budget for one call (RAII): threads() = min(requested, what is free), at least 1
// (the calling thread itself always runs; with every thread taken, a new call runs on its own
// thread alone). requested 0 means the whole budget. For a short while after the pool saw a
// participant descheduled mid-loop (an oversubscribed machine), every grant is 1 (thread_pool.cpp).
// Inside a grant on the same thread, a nested grant takes no more from the budget: it gets
// min(requested, the outer grant).
class ThreadGrant {
 public:
  explicit ThreadGrant(int requested = 0);
  ~ThreadGrant();
  ThreadGrant(const ThreadGrant&) = delete;
  ThreadGrant& operator=(const ThreadGrant&) = delete;
  int threads() const { return threads_; }

 private:
  int threads_ = 1;
  int held_ = 0;  // what this grant took from the budget (0 when nested)
};

// Runs body(ctx, i0, i1) over [0, n) in chunks [c * chunk, min(n, (c + 1) * chunk)), on the
// calling thread and up to threads - 1 pool workers; returns when every chunk has run. The first
// exception a chunk throws is rethrown here (the other chunks still run). Not re-entrant from
// inside a chunk with threads > 1 (the engine's nested loops run with 1 thread).
using ChunkBody = void (*)(void* ctx, int64_t i0, int64_t i1);
void pool_run(int64_t n, int64_t chunk, int threads, ChunkBody body, void* ctx);

// The index in [0, threads) of the participant running the current chunk: 0 for the caller, and
// distinct for threads running chunks of one loop at the same time (per-thread scratch).
int pool_thread_index();

template <typename Fn>
void pool_for(int64_t n, int64_t chunk, int threads, Fn& fn) {
  pool_run(n, chunk, threads,
           [](void* ctx, int64_t i0, int64_t i1) {
             for (int64_t i = i0; i < i1; ++i) (*static_cast<Fn*>(ctx))(i);
           },
           &fn);
}

}  // namespace cpu
}  // namespace fastddpm
