// NumPy argument unpacking shared by the two Python modules (bindings.cpp, bindings_cuda.cpp):
// typed, C-contiguous arrays to raw pointers, and a plan + weights to fastddpm/plan_check.h's
// views. Wrong dtype -> TypeError, wrong layout or shape -> ValueError, each naming the argument.
#pragma once
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "fastddpm/plan_check.h"

namespace fastddpm {
namespace bind {

namespace py = pybind11;

// A float32, C-contiguous array: a pointer into it.
inline const float* float_data(const py::array& a, const char* what) {
  if (!py::isinstance<py::array_t<float>>(a) || a.dtype().kind() != 'f' || a.itemsize() != 4)
    throw py::type_error(std::string(what) + " must be a float32 array");
  if (!(a.flags() & py::array::c_style)) throw std::invalid_argument(std::string(what) + " must be C-contiguous");
  return static_cast<const float*>(a.data());
}

// An array of exactly dtype T, C-contiguous, with ndim dimensions (and `cols` columns if >= 0).
template <typename T>
py::array_t<T> checked(const py::array& a, const char* what, int ndim, int64_t cols) {
  if (!py::isinstance<py::array_t<T>>(a) || a.dtype().itemsize() != sizeof(T) ||
      a.dtype().kind() != py::dtype::of<T>().kind())
    throw py::type_error(std::string(what) + " has the wrong dtype");
  if (!(a.flags() & py::array::c_style)) throw std::invalid_argument(std::string(what) + " must be C-contiguous");
  if (a.ndim() != ndim || (cols >= 0 && a.shape(1) != cols))
    throw std::invalid_argument(std::string(what) + " has the wrong shape");
  return py::reinterpret_borrow<py::array_t<T>>(a);
}

// plan.py's arrays and a list of (name, float32 array) pairs as views; holds the arrays alive.
class PlanArrays {
 public:
  PlanArrays(const py::array& ints, const py::array& floats, const py::array& slot_sizes, const py::list& weights)
      : ints_(checked<int64_t>(ints, "plan ints", 2, plan::kIntFields)),
        floats_(checked<double>(floats, "plan floats", 2, plan::kFloatFields)),
        slots_(checked<int64_t>(slot_sizes, "plan slot_sizes", 1, -1)) {
    if (ints_.shape(0) != floats_.shape(0)) throw std::invalid_argument("plan ints and floats differ in length");
    view_.n_ops = ints_.shape(0);
    view_.ints = ints_.data();
    view_.floats = floats_.data();
    view_.n_slots = slots_.shape(0);
    view_.slot_sizes = slots_.data();
    for (const py::handle item : weights) {
      const py::tuple pair = py::reinterpret_borrow<py::object>(item).cast<py::tuple>();
      if (pair.size() != 2) throw std::invalid_argument("weights must be (name, array) pairs");
      plan::WeightView wv;
      wv.name = pair[0].cast<std::string>();
      const py::array arr = pair[1].cast<py::array>();
      wv.data = float_data(arr, ("weight '" + wv.name + "'").c_str());
      wv.shape.assign(arr.shape(), arr.shape() + arr.ndim());
      weights_.push_back(std::move(wv));
      alive_.push_back(arr);
    }
  }
  const plan::PlanView& view() const { return view_; }
  const std::vector<plan::WeightView>& weights() const { return weights_; }

 private:
  py::array_t<int64_t> ints_;
  py::array_t<double> floats_;
  py::array_t<int64_t> slots_;
  plan::PlanView view_;
  std::vector<plan::WeightView> weights_;
  std::vector<py::array> alive_;
};

}  // namespace bind
}  // namespace fastddpm
