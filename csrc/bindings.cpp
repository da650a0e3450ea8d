// fastddpm._C: the only file of the CPU core that knows Python. It unpacks NumPy arrays into raw
// pointers and plain structs, checks them, releases the GIL and calls the checked C++ entry points.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstring>
#include <stdexcept>
#include <string>

#include "cpu/isa.h"
#include "cpu/step_cpu.h"

namespace py = pybind11;
using fastddpm::StepArrays;
using fastddpm::StepParams;
namespace cpu = fastddpm::cpu;

namespace {

// A float32, C-contiguous array: a pointer into it, or a TypeError / ValueError naming `what`.
const float* float_data(const py::array& a, const char* what) {
  if (!py::isinstance<py::array_t<float>>(a) || a.dtype().kind() != 'f' || a.itemsize() != 4)
    throw py::type_error(std::string(what) + " must be a float32 array");
  if (!(a.flags() & py::array::c_style))
    throw std::invalid_argument(std::string(what) + " must be C-contiguous");
  return static_cast<const float*>(a.data());
}

float* writable_float_data(py::array& a, const char* what) {
  float_data(a, what);
  if (!a.writeable()) throw std::invalid_argument(std::string(what) + " is read-only");
  return static_cast<float*>(a.mutable_data());
}

void same_size(const py::array& a, const py::array& ref, const char* what) {
  if (a.ndim() != ref.ndim() || !std::equal(a.shape(), a.shape() + a.ndim(), ref.shape()))
    throw std::invalid_argument(std::string(what) + " must have the shape of the sample");
}

StepParams params_of(const py::array& x, uint64_t seed, uint32_t noise_step, int64_t first_index) {
  if (x.ndim() < 1) throw std::invalid_argument("sample must have a batch dimension: shape (N, ...)");
  if (first_index < 0) throw std::invalid_argument("first_index must be >= 0");
  StepParams p;
  p.batch = x.shape(0);
  p.per_sample = p.batch ? int64_t(x.size()) / p.batch : 0;
  p.seed = seed;
  p.noise_step = noise_step;
  p.first_index = uint32_t(first_index);
  if (first_index + p.batch > (int64_t(1) << 32))
    throw std::invalid_argument("sample indices first_index + i must lie below 2**32");
  return p;
}

void fused_step(const py::array& x, const py::array& m, py::array& out, const py::array& coef,
                uint64_t seed, uint32_t noise_step, int64_t first_index, const py::object& noise) {
  StepArrays a;
  a.x = float_data(x, "sample");
  a.m = float_data(m, "model_output");
  a.out = writable_float_data(out, "out");
  a.coef = float_data(coef, "coefficient row");
  if (coef.size() < fastddpm::kCoefWidth) throw std::invalid_argument("coefficient row needs 8 floats");
  same_size(m, x, "model_output");
  same_size(out, x, "out");
  if (!noise.is_none()) {
    const py::array n = noise.cast<py::array>();
    a.noise = float_data(n, "noise");
    same_size(n, x, "noise");
  }
  const StepParams p = params_of(x, seed, noise_step, first_index);
  py::gil_scoped_release nogil;
  cpu::fused_step(p, a);
}

py::array_t<float> normals(uint64_t seed, int64_t batch, int64_t per_sample, uint32_t step,
                           int64_t first_index) {
  if (batch < 0 || per_sample < 0) throw std::invalid_argument("sizes must be non-negative");
  py::array_t<float> out({batch, per_sample});
  StepParams p = params_of(out, seed, step, first_index);
  p.per_sample = per_sample;
  float* data = out.mutable_data();
  {
    py::gil_scoped_release nogil;
    cpu::normals(p, data);
  }
  return out;
}

py::array_t<uint32_t> philox_uint32(uint64_t seed, int64_t batch, int64_t per_sample, uint32_t step,
                                    int64_t first_index) {
  if (batch < 0 || per_sample < 0) throw std::invalid_argument("sizes must be non-negative");
  py::array_t<uint32_t> out({batch, (per_sample + 3) / 4 * 4});
  StepParams p = params_of(out, seed, step, first_index);
  p.per_sample = per_sample;
  uint32_t* data = out.mutable_data();
  {
    py::gil_scoped_release nogil;
    cpu::philox_stream(p, data);
  }
  return out;
}

cpu::Isa isa_of(const std::string& name) {
  for (cpu::Isa isa : {cpu::Isa::kGeneric, cpu::Isa::kAvx2, cpu::Isa::kAvx512})
    if (name == cpu::isa_name(isa)) return isa;
  throw std::invalid_argument("unknown ISA path '" + name + "' (generic, avx2, avx512)");
}

}  // namespace

PYBIND11_MODULE(_C, mod) {
  mod.doc() = "fastddpm's C++ CPU core: the fused sampler step and Philox noise";
  mod.def("fused_step", &fused_step, py::arg("x"), py::arg("m"), py::arg("out"), py::arg("coef"),
          py::arg("seed"), py::arg("noise_step"), py::arg("first_index"), py::arg("noise"),
          "out = fused step of x (sample) and m (model output) with one coefficient row; noise=None "
          "makes the Philox noise of (seed, first_index + i, noise_step) in the kernel.");
  mod.def("normals", &normals, py::arg("seed"), py::arg("batch"), py::arg("per_sample"), py::arg("step"),
          py::arg("first_index") = 0, "float32 [batch, per_sample] normals of the noise spec");
  mod.def("philox_uint32", &philox_uint32, py::arg("seed"), py::arg("batch"), py::arg("per_sample"),
          py::arg("step"), py::arg("first_index") = 0, "uint32 [batch, ceil(per_sample/4)*4] raw stream");
  mod.def("isa", [] { return std::string(cpu::isa_name(cpu::active_isa())); }, "the ISA path in use");
  mod.def("set_isa", [](const std::string& name) { cpu::set_active_isa(isa_of(name)); }, py::arg("name"),
          "force an ISA path (generic, avx2, avx512); ValueError if this CPU cannot run it");
  mod.def("supported_isas", [] {
    py::list names;
    for (cpu::Isa isa : {cpu::Isa::kAvx512, cpu::Isa::kAvx2, cpu::Isa::kGeneric})
      if (cpu::isa_supported(isa)) names.append(cpu::isa_name(isa));
    return names;
  }, "ISA paths this CPU can run, fastest first");
  mod.def("num_threads", &cpu::num_threads);
  mod.def("set_num_threads", &cpu::set_num_threads, py::arg("n"));
}
