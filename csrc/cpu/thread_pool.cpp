#include "thread_pool.h"

#include <omp.h>
#include <pthread.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <exception>
#include <mutex>
#include <new>
#include <string>
#include <stdexcept>
#include <thread>

#if defined(__linux__)
#include <linux/futex.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

namespace fastddpm {
namespace cpu {
namespace {

// ---------------------------------------------------------------------------------- waiting

// How long an idle participant spins before it sleeps. The gaps between two loops of one forward
// are a few microseconds (a worker that slept there would pay a futex wake, ~5-20 us, per loop);
// past this it sleeps, so that on a busy machine its core goes to whoever is runnable, including
// a descheduled participant of the same loop, instead of being burnt waiting for it.
constexpr int64_t kSpinNs = 50 * 1000;

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  _mm_pause();
#else
  std::this_thread::yield();
#endif
}

inline int64_t now_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

#if defined(__linux__)
void futex_wait(std::atomic<uint32_t>* a, uint32_t expected) {
  syscall(SYS_futex, reinterpret_cast<uint32_t*>(a), FUTEX_WAIT_PRIVATE, expected, nullptr, nullptr, 0);
}
void futex_wake(std::atomic<uint32_t>* a, int n) {
  syscall(SYS_futex, reinterpret_cast<uint32_t*>(a), FUTEX_WAKE_PRIVATE, n, nullptr, nullptr, 0);
}
#else  // no futex: a short sleep stands in for the wait (the protocol re-checks in a loop)
void futex_wait(std::atomic<uint32_t>* a, uint32_t expected) {
  if (a->load() == expected) std::this_thread::sleep_for(std::chrono::microseconds(50));
}
void futex_wake(std::atomic<uint32_t>*, int) {}
#endif

// Oversubscription: a caller that, after its own chunks, waited longer than kStallNs and longer
// than it worked for a chunk another participant held, saw that participant descheduled mid-chunk
// (the machine has more runnable threads than cores). Then for kSoloNs every call runs on its
// own thread: with a busy process beside it, one thread per call keeps the tail near the idle one,
// where two threads wait out time slices (measured on the Zen 1: see benchmarks/test_bench_load.py).
// An idle machine never stalls like this, so it keeps every thread.
constexpr int64_t kStallNs = 300 * 1000;
constexpr int64_t kSoloNs = 50 * 1000 * 1000;
std::atomic<int64_t> g_solo_until{0};
std::atomic<bool> g_solo_fallback{true};

inline bool solo_now() {
  return g_solo_fallback.load(std::memory_order_relaxed) && now_ns() < g_solo_until.load(std::memory_order_relaxed);
}

// ---------------------------------------------------------------------------------- budget

std::atomic<int> g_budget{0};  // 0: not set, the default applies
std::atomic<int> g_in_use{0};
thread_local int t_grant = 0;  // threads of the grant this thread holds, 0 outside any

// ---------------------------------------------------------------------------------- pool

// A loop in flight lives in a slot. Its state word packs (generation 32 | joined 12 | next chunk
// 20): a worker joins (joined + 1 gives its index) and claims chunks by compare-and-swap on the
// whole word, so a worker that read a slot's parameters and was then descheduled can never run a
// chunk of a later loop in that slot: the generation moved on and its swap fails. Parameters are
// atomics because such a late reader may race with the next loop's writes (and then discards them).
constexpr uint64_t kIdxBits = 20, kJoinBits = 12;
constexpr uint64_t kIdxMask = (uint64_t(1) << kIdxBits) - 1;
constexpr uint64_t kJoinMask = (uint64_t(1) << kJoinBits) - 1;
constexpr int64_t kMaxChunks = int64_t(kIdxMask);
constexpr int kMaxThreads = int(kJoinMask);
constexpr int kSlots = 64;  // loops in flight at once; a further one runs on its caller alone

struct alignas(64) Slot {
  std::atomic<uint64_t> word{0};
  std::atomic<ChunkBody> body{nullptr};
  std::atomic<void*> ctx{nullptr};
  std::atomic<int64_t> n{0}, chunk{1};
  std::atomic<uint32_t> chunks{0};
  std::atomic<int> cap{1};
  alignas(64) std::atomic<uint32_t> done{0};  // chunks finished (the caller's futex word)
  std::atomic<uint32_t> caller_sleeps{0};
  std::mutex error_mu;
  std::exception_ptr error;
};

struct Pool {
  Slot slots[kSlots];
  std::atomic<uint64_t> leased{0};  // slots owned by a caller
  std::atomic<uint64_t> active{0};  // slots with a loop workers may join
  std::atomic<uint32_t> wake{0};    // bumped at every post: the sleeping workers' futex word
  std::atomic<int> sleepers{0};
  std::mutex spawn_mu;
  int workers = 0;
};

// Never destroyed: detached workers may still be asleep in it at exit.
Pool& pool() {
  static Pool* p = new Pool;
  return *p;
}

thread_local int t_index = 0;

inline uint32_t gen_of(uint64_t w) { return uint32_t(w >> 32); }
inline uint32_t idx_of(uint64_t w) { return uint32_t(w & kIdxMask); }
inline uint32_t joined_of(uint64_t w) { return uint32_t((w >> kIdxBits) & kJoinMask); }

// Claims and runs chunks of generation `gen` of slot s as participant `index` until none is left.
bool run_chunks(Slot& s, uint32_t gen, ChunkBody body, void* ctx, int64_t n, int64_t chunk, uint32_t chunks,
                int index) {
  bool ran = false;
  uint64_t w = s.word.load(std::memory_order_acquire);
  while (gen_of(w) == gen && idx_of(w) < chunks) {
    if (!s.word.compare_exchange_weak(w, w + 1, std::memory_order_acq_rel, std::memory_order_acquire)) continue;
    const int64_t i0 = int64_t(idx_of(w)) * chunk, i1 = std::min(n, i0 + chunk);
    const int saved = t_index;
    t_index = index;
    try {
      body(ctx, i0, i1);
    } catch (...) {
      std::lock_guard<std::mutex> lock(s.error_mu);
      if (!s.error) s.error = std::current_exception();
    }
    t_index = saved;
    ran = true;
    if (s.done.fetch_add(1, std::memory_order_seq_cst) + 1 == chunks &&
        s.caller_sleeps.load(std::memory_order_seq_cst))
      futex_wake(&s.done, 1);
    w = s.word.load(std::memory_order_acquire);
  }
  return ran;
}

// A worker's attempt at slot s: join the loop there if it has room and chunks left, and run them.
bool try_join(Slot& s) {
  uint64_t w = s.word.load(std::memory_order_acquire);
  const uint32_t gen = gen_of(w);
  const ChunkBody body = s.body.load(std::memory_order_relaxed);
  void* ctx = s.ctx.load(std::memory_order_relaxed);
  const int64_t n = s.n.load(std::memory_order_relaxed), chunk = s.chunk.load(std::memory_order_relaxed);
  const uint32_t chunks = s.chunks.load(std::memory_order_relaxed);
  const int cap = s.cap.load(std::memory_order_relaxed);
  for (;;) {
    if (idx_of(w) >= chunks || int(joined_of(w)) + 1 >= cap) return false;
    // success proves the parameters read above belong to this generation (see Slot)
    if (s.word.compare_exchange_weak(w, w + (uint64_t(1) << kIdxBits), std::memory_order_acq_rel,
                                     std::memory_order_acquire))
      break;
    if (gen_of(w) != gen) return false;
  }
  return run_chunks(s, gen, body, ctx, n, chunk, chunks, int(joined_of(w)) + 1);
}

bool join_any(Pool& p) {
  bool ran = false;
  for (uint64_t act = p.active.load(std::memory_order_seq_cst); act; act &= act - 1)
    ran |= try_join(p.slots[__builtin_ctzll(act)]);
  return ran;
}

void worker_main() {
  Pool& p = pool();
  int64_t idle_since = now_ns();
  for (;;) {
    if (join_any(p)) {
      idle_since = now_ns();
      continue;
    }
    if (now_ns() - idle_since < kSpinNs) {
      for (int i = 0; i < 16; ++i) cpu_relax();
      continue;
    }
    // Sleep until the next post. Registered as a sleeper before the last look, so a post either
    // is seen here or sees the sleeper and wakes it (both sides seq_cst).
    const uint32_t seq = p.wake.load(std::memory_order_seq_cst);
    p.sleepers.fetch_add(1, std::memory_order_seq_cst);
    if (!join_any(p)) futex_wait(&p.wake, seq);
    p.sleepers.fetch_sub(1, std::memory_order_seq_cst);
    idle_since = now_ns();
  }
}

// In a child after fork() the workers are gone; the counters restart (a loop in flight in another
// thread of the parent does not exist in the child).
void after_fork_child() {
  Pool& p = pool();
  new (&p.spawn_mu) std::mutex();
  p.workers = 0;
  p.sleepers.store(0);
  p.active.store(0);
  p.leased.store(0);
  g_in_use.store(0);
  t_grant = 0;
}

void ensure_workers(int n) {
  Pool& p = pool();
  std::lock_guard<std::mutex> lock(p.spawn_mu);
  static bool registered = false;
  if (!registered) {
    pthread_atfork(nullptr, nullptr, after_fork_child);
    registered = true;
  }
  for (; p.workers < n; ++p.workers) std::thread(worker_main).detach();
}

std::atomic<int> g_workers_hint{0};  // workers known to exist (skips the spawn lock when enough)

}  // namespace

// ---------------------------------------------------------------------------------- budget

int thread_budget() {
  const int n = g_budget.load(std::memory_order_relaxed);
  return n > 0 ? n : std::max(1, omp_get_max_threads());  // the CPUs we may use, or OMP_NUM_THREADS
}

void set_thread_budget(int n) {
  if (n < 1) throw std::invalid_argument("num_threads must be >= 1, got " + std::to_string(n));
  g_budget.store(std::min(n, kMaxThreads), std::memory_order_relaxed);  // more could never run at once
}

int threads_in_use() { return g_in_use.load(std::memory_order_relaxed); }

int acquire_threads(int requested) {
  if (requested < 0)
    throw std::invalid_argument("threads must be >= 1 (0: the default), got " + std::to_string(requested));
  const int budget = thread_budget();
  const int want = solo_now() ? 1 : std::min(requested > 0 ? requested : budget, budget);
  int used = g_in_use.load(std::memory_order_relaxed);
  int take;
  do {
    take = std::max(1, std::min(want, budget - used));
  } while (!g_in_use.compare_exchange_weak(used, used + take, std::memory_order_acq_rel));
  return take;
}

void set_solo_fallback(bool on) {
  g_solo_fallback.store(on, std::memory_order_relaxed);
  g_solo_until.store(0, std::memory_order_relaxed);
}

void release_threads(int n) { g_in_use.fetch_sub(n, std::memory_order_acq_rel); }

ThreadGrant::ThreadGrant(int requested) {
  if (t_grant > 0) {  // nested: share the outer grant
    if (requested < 0) throw std::invalid_argument("threads must be >= 1 (0: the default)");
    threads_ = requested > 0 ? std::min(requested, t_grant) : t_grant;
    return;
  }
  threads_ = held_ = acquire_threads(requested);
  t_grant = held_;
}

ThreadGrant::~ThreadGrant() {
  if (held_ > 0) {
    release_threads(held_);
    t_grant = 0;
  }
}

// ---------------------------------------------------------------------------------- pool

int pool_thread_index() { return t_index; }

void pool_run(int64_t n, int64_t chunk, int threads, ChunkBody body, void* ctx) {
  if (n <= 0) return;
  chunk = std::max<int64_t>(chunk, 1);
  if ((n + chunk - 1) / chunk > kMaxChunks) chunk = (n + kMaxChunks - 1) / kMaxChunks;
  const uint32_t chunks = uint32_t((n + chunk - 1) / chunk);
  threads = std::min(threads, kMaxThreads);
  Pool& p = pool();
  int s_i = -1;
  if (threads > 1 && chunks > 1 && !solo_now()) {
    if (g_workers_hint.load(std::memory_order_relaxed) < threads - 1) {
      ensure_workers(threads - 1);
      int h = g_workers_hint.load();
      while (h < threads - 1 && !g_workers_hint.compare_exchange_weak(h, threads - 1)) {}
    }
    uint64_t leased = p.leased.load(std::memory_order_relaxed);
    while (~leased) {
      const int i = __builtin_ctzll(~leased);
      if (p.leased.compare_exchange_weak(leased, leased | (uint64_t(1) << i), std::memory_order_acquire)) {
        s_i = i;
        break;
      }
    }
  }
  if (s_i < 0) {  // alone: one thread, one chunk, or every slot taken
    for (int64_t i0 = 0; i0 < n; i0 += chunk) body(ctx, i0, std::min(n, i0 + chunk));
    return;
  }
  Slot& s = p.slots[s_i];
  const uint64_t bit = uint64_t(1) << s_i;
  s.body.store(body, std::memory_order_relaxed);
  s.ctx.store(ctx, std::memory_order_relaxed);
  s.n.store(n, std::memory_order_relaxed);
  s.chunk.store(chunk, std::memory_order_relaxed);
  s.chunks.store(chunks, std::memory_order_relaxed);
  s.cap.store(threads, std::memory_order_relaxed);
  s.done.store(0, std::memory_order_relaxed);
  s.caller_sleeps.store(0, std::memory_order_relaxed);
  s.error = nullptr;
  const uint32_t gen = gen_of(s.word.load(std::memory_order_relaxed)) + 1;
  s.word.store(uint64_t(gen) << 32, std::memory_order_release);
  p.active.fetch_or(bit, std::memory_order_seq_cst);
  p.wake.fetch_add(1, std::memory_order_seq_cst);
  if (p.sleepers.load(std::memory_order_seq_cst) > 0) futex_wake(&p.wake, threads - 1);

  const int64_t start = now_ns();
  run_chunks(s, gen, body, ctx, n, chunk, chunks, 0);
  // Wait for the chunks other threads claimed: spin, then sleep until the last one wakes us.
  const int64_t t0 = now_ns();
  for (uint32_t d; (d = s.done.load(std::memory_order_acquire)) != chunks;) {
    if (now_ns() - t0 < kSpinNs) {
      cpu_relax();
      continue;
    }
    s.caller_sleeps.store(1, std::memory_order_seq_cst);
    d = s.done.load(std::memory_order_seq_cst);
    if (d != chunks) futex_wait(&s.done, d);
  }
  const int64_t waited = now_ns() - t0;
  if (waited > kStallNs && waited > t0 - start) g_solo_until.store(now_ns() + kSoloNs, std::memory_order_relaxed);
  p.active.fetch_and(~bit, std::memory_order_seq_cst);
  std::exception_ptr error = s.error;
  s.error = nullptr;
  p.leased.fetch_and(~bit, std::memory_order_release);
  if (error) std::rethrow_exception(error);
}

}  // namespace cpu
}  // namespace fastddpm
