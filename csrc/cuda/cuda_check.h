// CUDA errors as C++ exceptions, and the device guard, shared by the CUDA engine and the module's
// bindings (host code only: no Python types). A refused argument throws std::invalid_argument, a
// failed allocation OutOfMemory, any other CUDA failure CudaError (pybind11 turns them into
// ValueError, MemoryError as registered by bindings_cuda.cpp, and RuntimeError).
#pragma once
#include <cuda_runtime_api.h>

#include <stdexcept>
#include <string>

#include "step_cuda.h"

namespace fastddpm {
namespace cuda {

class OutOfMemory : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};
class CudaError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

inline std::string cuda_text(cudaError_t e) {
  return std::string(cudaGetErrorName(e)) + ": " + cudaGetErrorString(e);
}

inline void check_cuda(cudaError_t e, const std::string& what) {
  if (e == cudaSuccess) return;
  cudaGetLastError();  // clear a non-sticky error so the next call starts clean
  throw CudaError(what + " failed: CUDA error " + cuda_text(e));
}

// A launcher's Status: a refused argument (nothing was launched) or a CUDA failure.
inline void check_status(const Status& s, const std::string& what) {
  if (s.ok()) return;
  cudaGetLastError();
  if (s.invalid_argument) throw std::invalid_argument(what + ": " + (s.message ? s.message : "?"));
  throw CudaError(what + " failed: CUDA error " + cudaGetErrorName(s.error) + ": " + (s.message ? s.message : "?"));
}

// Runs on `device` (>= 0) or the current device (kCurrentDevice), and restores the previous
// device when it goes.
class DeviceGuard {
 public:
  static constexpr int kCurrentDevice = -1;
  explicit DeviceGuard(int device) {
    if (device < kCurrentDevice)
      throw std::invalid_argument("device must be a CUDA device index >= 0, or -1 for the current device");
    check_cuda(cudaGetDevice(&prev_), "cudaGetDevice");
    device_ = device == kCurrentDevice ? prev_ : device;
    if (device_ != prev_) check_cuda(cudaSetDevice(device_), "cudaSetDevice(" + std::to_string(device_) + ")");
  }
  ~DeviceGuard() {
    if (device_ != prev_) cudaSetDevice(prev_);
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;
  int device() const { return device_; }

 private:
  int prev_ = 0, device_ = 0;
};

}  // namespace cuda
}  // namespace fastddpm
