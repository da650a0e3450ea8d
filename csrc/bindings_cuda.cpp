// fastddpm._C_cuda: the only file of the CUDA core that knows Python. It knows no torch either:
// arrays arrive as device pointers (Python ints) plus sizes, streams as cudaStream_t handles (ints,
// 0 = the legacy default stream). It checks the arguments, sets the device, releases the GIL and
// calls the launchers of csrc/cuda/step_cuda.h; a refused argument becomes ValueError, a CUDA
// failure RuntimeError with the CUDA error's name and text.
//
// The CUDA runtime is linked statically and finds the driver when first called, so importing this
// module never needs a driver or a GPU: device_count() then answers (0, why).
#include <cuda_runtime_api.h>
#include <pybind11/functional.h>
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <tuple>

#include "array_args.h"
#include "layout_dict.h"
#include "py_engine.h"
#include "py_loop.h"
#include "cuda/cuda_check.h"
#include "cuda/engine_cuda.h"
#include "cuda/step_cuda.h"
#include "fastddpm/philox.h"
#include "fastddpm/plan.h"

namespace py = pybind11;
using fastddpm::StepArrays;
using fastddpm::StepParams;
namespace fcuda = fastddpm::cuda;
using fastddpm::bind::checked;
using fastddpm::bind::float_data;
using fcuda::check_cuda;
using fcuda::check_status;
using fcuda::cuda_text;
using fcuda::DeviceGuard;

namespace {

// Puts this thread in relaxed capture mode while it lives. The checks before a launch are pure
// queries (current device, pointer attributes), legal during a CUDA graph capture, but a capture in
// global mode (torch's default) would refuse them as "potentially unsafe" and be invalidated.
class RelaxedCapture {
 public:
  RelaxedCapture() { ok_ = cudaThreadExchangeStreamCaptureMode(&mode_) == cudaSuccess; }
  ~RelaxedCapture() {
    if (ok_) cudaThreadExchangeStreamCaptureMode(&mode_);
  }
  RelaxedCapture(const RelaxedCapture&) = delete;
  RelaxedCapture& operator=(const RelaxedCapture&) = delete;

 private:
  cudaStreamCaptureMode mode_ = cudaStreamCaptureModeRelaxed;
  bool ok_ = false;
};

// A pointer the kernels may dereference on `device`: refuses host memory and memory of another
// device before launch (a bad pointer on the GPU is a sticky error that kills the CUDA context).
void check_device_pointer(uintptr_t ptr, int device, const char* what) {
  if (ptr == 0) throw py::value_error(std::string(what) + " is a null pointer");
  cudaPointerAttributes at;
  std::memset(&at, 0, sizeof at);
  const cudaError_t e = cudaPointerGetAttributes(&at, reinterpret_cast<const void*>(ptr));
  if (e != cudaSuccess) {
    cudaGetLastError();
    throw py::value_error(std::string(what) + " is not a CUDA pointer (" + cuda_text(e) + ")");
  }
  if (at.type == cudaMemoryTypeUnregistered)
    throw py::value_error(std::string(what) + " points to host memory, not CUDA device memory");
  if (at.type == cudaMemoryTypeDevice && at.device != device)
    throw py::value_error(std::string(what) + " lives on CUDA device " + std::to_string(at.device) +
                          " but the kernel runs on device " + std::to_string(device));
}

cudaStream_t stream_of(uintptr_t handle) { return reinterpret_cast<cudaStream_t>(handle); }

uint32_t noise_step_of(int64_t step) {
  if (step == -1) return fastddpm::kInitialNoiseStep;
  if (step < 0 || step > int64_t(UINT32_MAX))
    throw py::value_error("noise step must be in [0, 2**32) or -1 for the initial noise, got " + std::to_string(step));
  return uint32_t(step);
}

StepParams params_of(int64_t batch, int64_t per_sample, uint64_t seed, int64_t step, int64_t first_index) {
  if (batch < 0 || per_sample < 0) throw py::value_error("batch and per_sample must be non-negative");
  if (first_index < 0 || first_index + batch > (int64_t(1) << 32))
    throw py::value_error("sample indices first_index..first_index+batch-1 must lie in [0, 2**32)");
  StepParams p;
  p.batch = batch;
  p.per_sample = per_sample;
  p.seed = seed;
  p.noise_step = noise_step_of(step);
  p.first_index = uint32_t(first_index);
  return p;
}

void fused_step(uintptr_t x, uintptr_t m, uintptr_t out, uintptr_t coef, uintptr_t noise, int64_t batch,
                int64_t per_sample, uint64_t seed, int64_t noise_step, int64_t first_index, uintptr_t stream,
                int device, uintptr_t h1, uintptr_t h2, uintptr_t x0_out, uintptr_t m_uncond, double guidance) {
  const StepParams p = params_of(batch, per_sample, seed, noise_step, first_index);
  if (!std::isfinite(guidance)) throw py::value_error("guidance must be finite");
  if (!m_uncond && guidance != 1.0) throw py::value_error("guidance needs m_uncond (the null-class model output)");
  RelaxedCapture relaxed;
  DeviceGuard guard(device);
  if (batch * per_sample == 0) return;
  check_device_pointer(x, guard.device(), "x");
  check_device_pointer(m, guard.device(), "m");
  check_device_pointer(out, guard.device(), "out");
  check_device_pointer(coef, guard.device(), "coef");
  if (noise) check_device_pointer(noise, guard.device(), "noise");
  if (h1) check_device_pointer(h1, guard.device(), "h1");
  if (h2) check_device_pointer(h2, guard.device(), "h2");
  if (x0_out) check_device_pointer(x0_out, guard.device(), "x0_out");
  if (m_uncond) check_device_pointer(m_uncond, guard.device(), "m_uncond");
  StepArrays a;
  a.x = reinterpret_cast<const float*>(x);
  a.m = reinterpret_cast<const float*>(m);
  a.out = reinterpret_cast<float*>(out);
  a.coef = reinterpret_cast<const float*>(coef);
  a.noise = reinterpret_cast<const float*>(noise);
  a.h1 = reinterpret_cast<const float*>(h1);
  a.h2 = reinterpret_cast<const float*>(h2);
  a.x0_out = reinterpret_cast<float*>(x0_out);
  a.m_uncond = reinterpret_cast<const float*>(m_uncond);
  a.guidance = float(guidance);
  fcuda::Status s;
  {
    py::gil_scoped_release nogil;
    s = fcuda::fused_step(p, a, stream_of(stream));
  }
  check_status(s, "fused_step");
}

// Writes the noise of (seed, first_index + i, step) to device pointer out with launch(params,
// stream) on `device`: asynchronous on `stream`.
template <typename Launch>
void launch_noise(const char* what, uintptr_t out, int64_t batch, int64_t per_sample, uint64_t seed, int64_t step,
                  int64_t first_index, uintptr_t stream, int device, Launch&& launch) {
  const StepParams p = params_of(batch, per_sample, seed, step, first_index);
  RelaxedCapture relaxed;
  DeviceGuard guard(device);
  if (batch * per_sample == 0) return;
  check_device_pointer(out, guard.device(), "out");
  fcuda::Status s;
  {
    py::gil_scoped_release nogil;
    s = launch(p, stream_of(stream));
  }
  check_status(s, what);
}

void normals(uintptr_t out, int64_t batch, int64_t per_sample, uint64_t seed, int64_t step, int64_t first_index,
             uintptr_t stream, int device) {
  launch_noise("normals", out, batch, per_sample, seed, step, first_index, stream, device,
               [out](const StepParams& p, cudaStream_t st) { return fcuda::normals(p, reinterpret_cast<float*>(out), st); });
}

void philox_uint32(uintptr_t out, int64_t batch, int64_t per_sample, uint64_t seed, int64_t step,
                   int64_t first_index, uintptr_t stream, int device) {
  launch_noise("philox_uint32", out, batch, per_sample, seed, step, first_index, stream, device,
               [out](const StepParams& p, cudaStream_t st) {
                 return fcuda::philox_stream(p, reinterpret_cast<uint32_t*>(out), st);
               });
}

// (number of devices, why none): never raises, so a machine without a driver still imports and
// reports. The CUDA runtime and driver versions go into the reason, the usual cause being a
// driver older than this build's runtime.
std::tuple<int, std::string> device_count() {
  int n = 0;
  const cudaError_t e = cudaGetDeviceCount(&n);
  if (e == cudaSuccess && n > 0) return {n, ""};
  cudaGetLastError();
  int runtime = 0, driver = 0;
  cudaRuntimeGetVersion(&runtime);
  cudaDriverGetVersion(&driver);
  auto version = [](int v) { return std::to_string(v / 1000) + "." + std::to_string(v % 1000 / 10); };
  std::string why;
  if (e == cudaSuccess) why = "no CUDA device found";
  else if (driver == 0) why = "no NVIDIA driver found (libcuda.so): " + cuda_text(e);
  else why = cuda_text(e) + " (the driver supports CUDA " + version(driver) + ")";
  return {0, why + "; this build's CUDA runtime is " + version(runtime)};
}

py::dict device_info(int device) {
  int n = 0;
  check_cuda(cudaGetDeviceCount(&n), "cudaGetDeviceCount");
  if (device < 0 || device >= n)
    throw py::value_error("device " + std::to_string(device) + " out of range: " + std::to_string(n) + " device(s)");
  cudaDeviceProp prop;
  check_cuda(cudaGetDeviceProperties(&prop, device), "cudaGetDeviceProperties");
  py::dict d;
  d["name"] = std::string(prop.name);
  d["capability"] = py::make_tuple(prop.major, prop.minor);
  d["multiprocessors"] = prop.multiProcessorCount;
  d["memory_bytes"] = static_cast<uint64_t>(prop.totalGlobalMem);
  return d;
}

// Coefficient buffers for callers without torch: a contiguous host buffer -> a device allocation.
uintptr_t upload(const py::buffer& data, int device) {
  const py::buffer_info info = data.request();
  int64_t expect = info.itemsize;
  for (py::ssize_t i = info.ndim; i-- > 0;) {
    if (info.shape[i] != 1 && info.strides[i] != expect) throw py::value_error("upload needs a C-contiguous buffer");
    expect *= info.shape[i];
  }
  const size_t bytes = size_t(info.size) * size_t(info.itemsize);
  if (bytes == 0) throw py::value_error("upload of an empty buffer");
  DeviceGuard guard(device);
  void* ptr = nullptr;
  cudaError_t e;
  {
    py::gil_scoped_release nogil;
    e = cudaMalloc(&ptr, bytes);
    if (e == cudaSuccess) {
      e = cudaMemcpy(ptr, info.ptr, bytes, cudaMemcpyHostToDevice);
      if (e != cudaSuccess) cudaFree(ptr);
    }
  }
  check_cuda(e, "upload of " + std::to_string(bytes) + " bytes");
  return reinterpret_cast<uintptr_t>(ptr);
}

py::bytes download(uintptr_t ptr, int64_t nbytes, int device) {
  if (nbytes < 0) throw py::value_error("nbytes must be >= 0");
  DeviceGuard guard(device);
  std::string host(size_t(nbytes), '\0');
  if (nbytes) {
    check_device_pointer(ptr, guard.device(), "ptr");
    cudaError_t e;
    {
      py::gil_scoped_release nogil;
      e = cudaMemcpy(&host[0], reinterpret_cast<const void*>(ptr), size_t(nbytes), cudaMemcpyDeviceToHost);
    }
    check_cuda(e, "download");
  }
  return py::bytes(host);
}

void free_ptr(uintptr_t ptr, int device) {
  if (ptr == 0) return;
  DeviceGuard guard(device);
  check_cuda(cudaFree(reinterpret_cast<void*>(ptr)), "cudaFree");
}

void synchronize(int device) {
  DeviceGuard guard(device);
  cudaError_t e;
  {
    py::gil_scoped_release nogil;
    e = cudaDeviceSynchronize();
  }
  check_cuda(e, "cudaDeviceSynchronize");
}


// ---- the U-Net engine ------------------------------------------------------------------------

fcuda::Precision precision_of(const std::string& dtype) {
  if (dtype == "fp32") return fcuda::Precision::kF32;
  if (dtype == "tf32") return fcuda::Precision::kTF32;
  if (dtype == "bf16") return fcuda::Precision::kBF16;
  if (dtype == "fp16") return fcuda::Precision::kF16;
  throw py::value_error("dtype must be one of 'fp32', 'tf32', 'bf16', 'fp16', got '" + dtype + "'");
}

const char* precision_name(fcuda::Precision p) {
  switch (p) {
    case fcuda::Precision::kF32: return "fp32";
    case fcuda::Precision::kTF32: return "tf32";
    case fcuda::Precision::kBF16: return "bf16";
    case fcuda::Precision::kF16: return "fp16";
  }
  return "?";
}

class PyCudaEngine {
 public:
  PyCudaEngine(const py::array& ints, const py::array& floats, const py::array& slot_sizes, const py::list& weights,
               int64_t batch, int64_t in_c, int64_t out_c, int64_t height, int64_t width, const std::string& dtype,
               int device, const fcuda::CudaEngineOptions& options)
      : shape_{batch, in_c, out_c, height, width} {
    const fcuda::Precision prec = precision_of(dtype);
    if (device < 0) throw py::value_error("device must be a CUDA device index >= 0");
    const fastddpm::bind::PlanArrays plan(ints, floats, slot_sizes, weights);
    py::gil_scoped_release nogil;
    engine_ = std::make_unique<fcuda::Engine>(plan.view(), plan.weights(), batch, in_c, out_c, height, width, prec,
                                              device, options);
  }

  py::array_t<float> forward(const py::array& x, const py::array& t, const py::object& class_emb) {
    const float* xp = shape_.sample_data(x);
    const float* tp = shape_.timestep_data(t);
    const float* cp = fastddpm::bind::class_emb_data(class_emb, shape_.n, engine_->class_dim());
    py::array_t<float> out = shape_.new_output();
    float* op = out.mutable_data();
    py::gil_scoped_release nogil;
    engine_->forward_host(xp, tp, cp, op);
    return out;
  }

  // Device pointers (e.g. torch CUDA tensors' data_ptr()): x [N, in_c, H, W], t float32 [N],
  // out [N, out_c, H, W], class_emb (0 = none) float32 [N, class_dim], all on the engine's device;
  // asynchronous on `stream`.
  void forward_ptr(uintptr_t x, uintptr_t t, uintptr_t out, uintptr_t stream, uintptr_t class_emb) {
    RelaxedCapture relaxed;  // pointer queries inside a caller's (global-mode) capture
    check_device_pointer(x, engine_->device(), "x");
    check_device_pointer(t, engine_->device(), "t");
    check_device_pointer(out, engine_->device(), "out");
    if (class_emb) check_device_pointer(class_emb, engine_->device(), "class_emb");
    py::gil_scoped_release nogil;
    engine_->forward_device(reinterpret_cast<const float*>(x), reinterpret_cast<const float*>(t),
                            reinterpret_cast<const float*>(class_emb), reinterpret_cast<float*>(out),
                            stream_of(stream));
  }

  void set_schedule(const py::array& coef, const py::array& timesteps, const py::object& model_t) {
    const auto c = checked<float>(coef, "coefficient table", 2, fastddpm::kCoefWidth);
    const auto ts = checked<int64_t>(timesteps, "timesteps", 1, -1);
    if (ts.shape(0) != c.shape(0)) throw py::value_error("timesteps and coefficient rows differ in length");
    std::optional<py::array_t<float>> mt;  // [steps] float32: a fractional schedule's model times
    if (!model_t.is_none()) {
      mt = checked<float>(model_t.cast<py::array>(), "model timesteps", 1, -1);
      if (mt->shape(0) != ts.shape(0)) throw py::value_error("model timesteps and timesteps differ in length");
    }
    py::gil_scoped_release nogil;
    engine_->set_schedule(c.data(), ts.data(), mt ? mt->data() : nullptr, ts.shape(0));
  }

  py::tuple run(uint64_t seed, int64_t first_index, const std::vector<int64_t>& keep, const py::object& callback,
                int64_t every, int64_t history, const py::object& class_emb, const py::object& guidance,
                double x_scale) {
    if (every < 0) throw py::value_error("callback_every must be >= 0");
    if (history < 0 || history > 2)
      throw py::value_error("history must be 0, 1 or 2, got " + std::to_string(history));
    fcuda::RunArgs a;
    a.class_emb = fastddpm::bind::class_emb_data(class_emb, shape_.n, engine_->class_dim());
    const auto samples = fastddpm::bind::guided_shape(shape_, engine_->class_dim(), guidance, &a.guided, &a.guidance);
    fastddpm::bind::LoopOutputs outputs(samples, keep.size());
    a.seed = seed;
    a.first_index = first_index;
    a.keep = keep;
    a.keep_out = outputs.frame_data;
    a.x_out = outputs.x_data();
    a.history = int(history);
    a.x_scale = float(x_scale);
    // Reports at chunk boundaries only (the GPU keeps the next chunk queued): Ctrl-C at every one,
    // the callback at multiples of `every` and the last step. Without a callback the chunk is
    // kSignalChunk steps, so Ctrl-C still stops a long loop early.
    constexpr int64_t kSignalChunk = 16;
    const int64_t steps = engine_->steps();
    a.every = every > 0 ? every : kSignalChunk;
    fastddpm::bind::run_loop([&](const std::function<bool(int64_t)>& on_chunk) { return engine_->run(a, on_chunk); },
                             callback, [=](int64_t k) { return k == steps || (every > 0 && k % every == 0); });
    return outputs.result();
  }

  void set_profiling(bool on) {
    py::gil_scoped_release nogil;  // waits for a call in flight
    engine_->set_profiling(on);
  }
  std::vector<double> op_seconds() {
    py::gil_scoped_release nogil;
    return engine_->op_seconds();
  }

  fcuda::Engine& engine() { return *engine_; }

 private:
  std::unique_ptr<fcuda::Engine> engine_;
  fastddpm::bind::SampleShape shape_;
};

}  // namespace

PYBIND11_MODULE(_C_cuda, mod) {
  mod.def("layout", &fastddpm::bind::layout_dict,
          "the shared layouts (op codes, plan columns, flags, coefficient columns, noise constants)");
  // CUDA out of memory -> MemoryError (the message says how much was asked and how much is free)
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const fcuda::OutOfMemory& e) {
      PyErr_SetString(PyExc_MemoryError, e.what());
    }
  });
  mod.doc() = "fastddpm's CUDA core: the fused sampler step and Philox noise on device pointers";
  mod.attr("COEF_WIDTH") = int(fastddpm::kCoefWidth);
  mod.def("fused_step", &fused_step, py::arg("x"), py::arg("m"), py::arg("out"), py::arg("coef"), py::arg("noise"),
          py::arg("batch"), py::arg("per_sample"), py::arg("seed"), py::arg("noise_step"), py::arg("first_index"),
          py::arg("stream") = 0, py::arg("device") = -1, py::arg("h1") = 0, py::arg("h2") = 0,
          py::arg("x0_out") = 0, py::arg("m_uncond") = 0, py::arg("guidance") = 1.0,
          "out = fused step of x and m ([batch, per_sample] float32 device pointers) with the coefficient row at "
          "device pointer coef (kCoefWidth = 12 float32, read when the kernel runs). noise=0 makes the Philox noise of "
          "(seed, first_index + i, noise_step) in the kernel; otherwise it is a [batch, per_sample] pointer. "
          "h1, h2 (0 = none): [batch, per_sample] pointers to the previous steps' x0, added with the row's h1, h2 "
          "weights; x0_out (0 = none): receives this step's x0 (after the clip), overlapping no other array. "
          "m_uncond (0 = none): classifier-free guidance, a [batch, per_sample] pointer to the null-class model "
          "output; the step uses m_uncond + guidance * (m - m_uncond) as its model output. "
          "Asynchronous on stream (a cudaStream_t as int); device=-1 is the current device.");
  mod.def("normals", &normals, py::arg("out"), py::arg("batch"), py::arg("per_sample"), py::arg("seed"),
          py::arg("step"), py::arg("first_index") = 0, py::arg("stream") = 0, py::arg("device") = -1,
          "write the float32 [batch, per_sample] normals of the noise spec to device pointer out (step -1 = initial)");
  mod.def("philox_uint32", &philox_uint32, py::arg("out"), py::arg("batch"), py::arg("per_sample"), py::arg("seed"),
          py::arg("step"), py::arg("first_index") = 0, py::arg("stream") = 0, py::arg("device") = -1,
          "write the uint32 [batch, ceil(per_sample/4)*4] raw Philox stream to device pointer out");
  mod.def("device_count", &device_count,
          "(number of CUDA devices, reason): (0, why) when there is no driver or GPU; never raises");
  mod.def("device_name", [](int device) { return device_info(device)["name"].cast<std::string>(); },
          py::arg("device") = 0);
  mod.def("device_info", &device_info, py::arg("device") = 0,
          "dict: name, capability (major, minor), multiprocessors, memory_bytes");
  mod.def("runtime_version", [] {
    int v = 0;
    cudaRuntimeGetVersion(&v);
    return v;
  }, "the CUDA runtime version linked in (e.g. 13000)");
  mod.def("upload", &upload, py::arg("data"), py::arg("device") = -1,
          "copy a C-contiguous buffer (bytes, a NumPy array) to a new device allocation; returns its pointer");
  mod.def("download", &download, py::arg("ptr"), py::arg("nbytes"), py::arg("device") = -1,
          "copy nbytes from a device pointer back to host bytes (synchronous)");
  mod.def("free", &free_ptr, py::arg("ptr"), py::arg("device") = -1, "cudaFree a pointer from upload()");
  mod.def("synchronize", &synchronize, py::arg("device") = -1, "cudaDeviceSynchronize");
  mod.def("gemm_compiled_arch", [](const std::string& dtype, int device) {
    DeviceGuard guard(device);
    int arch = 0;
    check_cuda(fcuda::gemm_compiled_arch(precision_of(dtype), &arch), "cudaFuncGetAttributes");
    return arch;
  }, py::arg("dtype"), py::arg("device") = -1,
          "the virtual architecture (e.g. 90) the conv GEMM of dtype was compiled from, as loaded on device");
  mod.def("check_dtype", [](const std::string& d) { return std::string(precision_name(precision_of(d))); },
          py::arg("dtype"), "the dtype if the engine accepts it; ValueError otherwise (needs no GPU)");
  py::class_<PyCudaEngine>(mod, "Engine", "The CUDA U-Net engine for one plan (batch, height, width) on one device")
      .def(py::init([](const py::array& ints, const py::array& floats, const py::array& slot_sizes,
                       const py::list& weights, int64_t batch, int64_t in_c, int64_t out_c, int64_t height,
                       int64_t width, const std::string& dtype, int device, bool split_k) {
             fcuda::CudaEngineOptions options;
             options.split_k = split_k;
             return std::make_unique<PyCudaEngine>(ints, floats, slot_sizes, weights, batch, in_c, out_c, height,
                                                   width, dtype, device, options);
           }),
           py::arg("ints"), py::arg("floats"), py::arg("slot_sizes"), py::arg("weights"), py::arg("batch"),
           py::arg("in_channels"), py::arg("out_channels"), py::arg("height"), py::arg("width"),
           py::arg("dtype") = "tf32", py::arg("device") = 0, py::kw_only(),
           py::arg("split_k") = fcuda::CudaEngineOptions().split_k,
           "split_k: split the K of GEMMs with fewer tiles than the GPU has multiprocessors (False: one pass, "
           "no workspace)")
      .def("forward", &PyCudaEngine::forward, py::arg("x"), py::arg("t"), py::arg("class_emb") = py::none(),
           "model output [N, out_c, H, W] of host x [N, in_c, H, W] (float32) at timesteps t (float32 [N]); "
           "class_emb: host float32 [N, class_dim] class-embedding rows, required by a class-conditional plan")
      .def("forward_ptr", &PyCudaEngine::forward_ptr, py::arg("x"), py::arg("t"), py::arg("out"), py::arg("stream") = 0,
           py::arg("class_emb") = 0,
           "the forward on device pointers (x, t float32 [N], out, class_emb float32 [N, class_dim] or 0), "
           "asynchronous on stream")
      .def("set_schedule", &PyCudaEngine::set_schedule, py::arg("coef"), py::arg("timesteps"),
           py::arg("model_t") = py::none(),
           "upload the scheduler's float32 [S, 12] table, int64 [S] timesteps (the noise keys) and, for a "
           "fractional schedule, float32 [S] model_t (the model's time input; default: the timesteps)")
      .def("run", &PyCudaEngine::run, py::arg("seed"), py::arg("first_index"), py::arg("keep"), py::arg("callback"),
           py::arg("every") = 0, py::arg("history") = 0, py::arg("class_emb") = py::none(),
           py::arg("guidance") = py::none(), py::arg("x_scale") = 1.0,
           "the whole sampling loop over the last schedule; returns (x0, [frames for keep]). x_scale: x_T = "
           "x_scale * the initial normals (frame 0 shows it). history (0, 1, 2): "
           "previous x0 predictions fed to each step as h1 (h2), from an engine-owned device ring of 3 buffers. "
           "class_emb: host float32 [N, class_dim] (a class-conditional plan). guidance=w: classifier-free "
           "guidance, n = N / 2 samples (class_emb rows [0, n) conditional, [n, N) the null class), each step "
           "using m_u + w (m_c - m_u); x0 and the frames are [n, C, H, W]")
      .def_property_readonly("class_dim", [](PyCudaEngine& e) { return e.engine().class_dim(); },
                             "the class embedding's width of a class-conditional plan, else 0")
      .def("set_profiling", &PyCudaEngine::set_profiling, py::arg("on"),
           "time every plan op of each host forward and run step with CUDA events (on also zeroes the totals)")
      .def_property_readonly("op_seconds", &PyCudaEngine::op_seconds, "per plan op: GPU seconds accumulated while profiling")
      .def_property_readonly("dtype", [](PyCudaEngine& e) { return std::string(precision_name(e.engine().precision())); })
      .def_property_readonly("device", [](PyCudaEngine& e) { return e.engine().device(); })
      .def_property_readonly("device_bytes", [](PyCudaEngine& e) { return e.engine().device_bytes(); })
      .def_property_readonly("graph_captured", [](PyCudaEngine& e) { return e.engine().graph_captured(); })
      .def_property_readonly("graph_nodes", [](PyCudaEngine& e) { return e.engine().graph_nodes(); })
      .def_property_readonly("steps", [](PyCudaEngine& e) { return e.engine().steps(); });
}
