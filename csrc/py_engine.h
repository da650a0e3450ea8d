// The host-array side of an engine binding, shared by the two modules (bindings.cpp,
// bindings_cuda.cpp): the checks of a forward's x and t against the engine's sample shape, and
// the NumPy arrays a forward or a whole sampling loop returns. A bad shape -> ValueError.
#pragma once
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cmath>
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

// class_emb's data (None -> nullptr) once it is a float32 C-contiguous [n, dim] array, dim the
// engine's class_dim (0: the plan has no class embedding, and class_emb must be None).
inline const float* class_emb_data(const py::object& class_emb, int64_t n, int64_t dim) {
  if (class_emb.is_none()) {
    if (dim > 0)
      throw std::invalid_argument("this engine's plan is class-conditional: class_emb [" + std::to_string(n) + ", " +
                                  std::to_string(dim) + "] is required");
    return nullptr;
  }
  if (dim == 0) throw std::invalid_argument("class_emb was given but this engine's plan has no class embedding");
  if (!py::isinstance<py::array>(class_emb)) throw py::type_error("class_emb must be a float32 NumPy array");
  const py::array a = py::reinterpret_borrow<py::array>(class_emb);
  const float* p = float_data(a, "class_emb");
  if (a.ndim() != 2 || a.shape(0) != n || a.shape(1) != dim)
    throw std::invalid_argument("class_emb must have shape [" + std::to_string(n) + ", " + std::to_string(dim) +
                                "] for this engine");
  return p;
}

// The samples of a run: the engine's shape, or half its batch with guidance (not None: a finite
// float w; guided and w receive it), which needs a class-conditional plan (class_dim > 0).
inline SampleShape guided_shape(const SampleShape& s, int64_t class_dim, const py::object& guidance, bool* guided,
                                float* w) {
  *guided = !guidance.is_none();
  if (!*guided) return s;
  if (PyBool_Check(guidance.ptr()) || !PyNumber_Check(guidance.ptr()))
    throw py::type_error("guidance must be None or a float");
  if (class_dim == 0) throw std::invalid_argument("guidance needs a class-conditional plan");
  const double v = guidance.cast<double>();
  if (!std::isfinite(v)) throw std::invalid_argument("guidance must be finite");
  if (s.n % 2)
    throw std::invalid_argument("a guided run needs an even engine batch (n conditional + n null rows), got " +
                                std::to_string(s.n));
  *w = float(v);
  SampleShape half = s;
  half.n = s.n / 2;
  return half;
}

}  // namespace bind
}  // namespace fastddpm
