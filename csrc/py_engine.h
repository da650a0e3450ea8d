// The host-array side of an engine binding, shared by the two modules (bindings.cpp,
// bindings_cuda.cpp): the checks of a forward's x and t against the engine's sample shape, and
// the NumPy arrays a forward or a whole sampling loop returns. A bad shape -> ValueError.
#pragma once
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "array_args.h"

namespace fastddpm {
namespace bind {

namespace py = pybind11;

// What an engine was built for: x [n, in_c, h, w] -> model output [n, out_c, h, w].
struct SampleShape {
  int64_t n = 0, in_c = 0, out_c = 0, h = 0, w = 0;

  // x's data, once it is a float32 C-contiguous [n, in_c, h, w] array.
  const float* sample_data(const py::array& x) const {
    const float* p = float_data(x, "sample");
    if (x.ndim() != 4 || x.shape(0) != n || x.shape(1) != in_c || x.shape(2) != h || x.shape(3) != w)
      throw std::invalid_argument("sample must have shape [" + std::to_string(n) + ", " + std::to_string(in_c) +
                                  ", " + std::to_string(h) + ", " + std::to_string(w) + "] for this engine");
    return p;
  }
  // t's data, once it is a float32 C-contiguous [n] array.
  const float* timestep_data(const py::array& t) const {
    const float* p = float_data(t, "timesteps");
    if (t.ndim() != 1 || t.shape(0) != n) throw std::invalid_argument("timesteps must be float32 [N]");
    return p;
  }
  py::array_t<float> new_sample() const { return py::array_t<float>({n, in_c, h, w}); }
  py::array_t<float> new_output() const { return py::array_t<float>({n, out_c, h, w}); }
};

// The host arrays a sampling loop fills: the final sample and one frame per kept position.
struct LoopOutputs {
  py::array_t<float> x;
  py::list frames;
  std::vector<float*> frame_data;  // frames' buffers, in keep order

  LoopOutputs(const SampleShape& s, size_t keep) : x(s.new_sample()) {
    for (size_t i = 0; i < keep; ++i) {
      py::array_t<float> f = s.new_sample();
      frame_data.push_back(f.mutable_data());
      frames.append(f);
    }
  }
  float* x_data() { return x.mutable_data(); }
  py::tuple result() const { return py::make_tuple(x, frames); }  // (x0, [frames])
};

}  // namespace bind
}  // namespace fastddpm
