// A native sampling loop run from Python, shared by the two modules (bindings.cpp, bindings_cuda.cpp):
// the loop runs with the GIL released and, at the points it reports, takes the GIL back to honour
// Ctrl-C (PyErr_CheckSignals) and to call the user's callback. A Python exception in either
// cancels the loop and is re-raised once the engine has stopped; a cancel without one is an error.
#pragma once
#include <pybind11/pybind11.h>

#include <cstdint>
#include <functional>
#include <optional>
#include <stdexcept>
#include <utility>

namespace fastddpm {
namespace bind {

namespace py = pybind11;

// run(on_report) -> bool (false = cancelled); callback(k) is called where call_at(k) is true.
template <typename Run, typename CallAt>
void run_loop(Run&& run, const py::object& callback, CallAt&& call_at) {
  std::optional<py::error_already_set> err;
  const std::function<bool(int64_t)> on_report = [&](int64_t k) -> bool {
    py::gil_scoped_acquire gil;
    try {
      if (PyErr_CheckSignals() != 0) throw py::error_already_set();
      if (!callback.is_none() && call_at(k)) callback(k);
    } catch (py::error_already_set& e) {
      err.emplace(std::move(e));
      return false;
    }
    return true;
  };
  bool done;
  {
    py::gil_scoped_release nogil;
    done = run(on_report);
  }
  if (err) throw std::move(*err);
  if (!done) throw std::runtime_error("sampling was cancelled");
}

}  // namespace bind
}  // namespace fastddpm
