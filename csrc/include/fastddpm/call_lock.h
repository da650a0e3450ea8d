// One call at a time on an engine, and a clear error instead of a deadlock when a call comes back
// in from the thread already inside one (a progress callback calling the engine it reports on).
// Shared by the CPU and CUDA engines; plain C++ (no Python, no CUDA).
#pragma once
#include <atomic>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>

namespace fastddpm {

// A call into an engine from inside one of its own calls on the same thread: refused.
class ReentrantCall : public std::logic_error {
 public:
  using std::logic_error::logic_error;
};

class CallMutex {
 public:
  // Blocks while another thread is inside a call; throws ReentrantCall if this thread is.
  void lock(const char* engine) {
    if (owner_.load() == std::this_thread::get_id())
      throw ReentrantCall(std::string("this ") + engine +
                          " is already running a call on this thread: a progress callback must not call back "
                          "into the engine that reports to it");
    mu_.lock();
    owner_.store(std::this_thread::get_id());
  }
  void unlock() {
    owner_.store(std::thread::id());
    mu_.unlock();
  }

 private:
  std::mutex mu_;
  std::atomic<std::thread::id> owner_{};
};

// RAII holder of a CallMutex for one call.
class CallLock {
 public:
  CallLock(CallMutex& m, const char* engine) : m_(m) { m_.lock(engine); }
  ~CallLock() { m_.unlock(); }
  CallLock(const CallLock&) = delete;
  CallLock& operator=(const CallLock&) = delete;

 private:
  CallMutex& m_;
};

}  // namespace fastddpm
