// layout(): every layout the languages share, as one Python dict, exported by both extensions
// (fastddpm._C and fastddpm._C_cuda compile the same headers) so that tests/test_layout.py can
// assert that plan.py, schedulers.py, philox.py and the numba engine agree with the C++ / CUDA side.
#pragma once
#include <pybind11/pybind11.h>

#include "fastddpm/philox.h"
#include "fastddpm/plan.h"
#include "fastddpm/step.h"

namespace fastddpm {
namespace bind {

inline pybind11::dict layout_dict() {
  namespace py = pybind11;
  auto named = [](const auto& table) {
    py::dict d;
    for (const auto& e : table) d[e.name] = e.value;
    return d;
  };
  py::list ints, floats, coef;
  for (const char* n : plan::kIntFieldNames) ints.append(n);
  for (const char* n : plan::kFloatFieldNames) floats.append(n);
  for (const char* n : kCoefNames) coef.append(n);
  py::dict d;
  d["op_codes"] = named(plan::kOpCodeNames);
  d["conv_modes"] = named(plan::kConvModeNames);
  d["resample_modes"] = named(plan::kResampleModeNames);
  d["time_modes"] = named(plan::kTimeModeNames);
  d["flags"] = named(plan::kFlagNames);
  d["int_fields"] = ints;
  d["float_fields"] = floats;
  d["input_slot"] = plan::kInputSlot;
  d["output_slot"] = plan::kOutputSlot;
  d["class_slot"] = plan::kClassSlot;
  d["coef_columns"] = coef;
  d["initial_noise_step"] = kInitialNoiseStep;
  return d;
}

}  // namespace bind
}  // namespace fastddpm
