// fastddpm._C: the only file of the CPU core that knows Python. It unpacks NumPy arrays into raw
// pointers and plain structs, checks them, releases the GIL and calls the checked C++ entry points.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstring>
#include <stdexcept>
#include <string>

#include "array_args.h"
#include "layout_dict.h"
#include "py_loop.h"
#include "cpu/engine.h"
#include "cpu/isa.h"
#include "cpu/peak.h"
#include "cpu/peak.h"
#include "cpu/step_cpu.h"
#include "fastddpm/plan.h"

#include <memory>
#include <optional>
#include <vector>

namespace py = pybind11;
using fastddpm::StepArrays;
using fastddpm::StepParams;
namespace cpu = fastddpm::cpu;
using fastddpm::bind::checked;
using fastddpm::bind::float_data;

namespace {

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

// coef: one row of 8 floats (row = -1) or the scheduler's whole table [S, 8] and the row to use
// (indexing here saves the per-step creation of a NumPy view on the Python side).
void fused_step(const py::array& x, const py::array& m, py::array& out, const py::array& coef,
                uint64_t seed, uint32_t noise_step, int64_t first_index, const py::object& noise,
                int64_t row) {
  StepArrays a;
  a.x = float_data(x, "sample");
  a.m = float_data(m, "model_output");
  a.out = writable_float_data(out, "out");
  a.coef = float_data(coef, "coefficient row");
  if (row < 0) {
    if (coef.size() < fastddpm::kCoefWidth) throw std::invalid_argument("coefficient row needs 8 floats");
  } else {
    if (coef.ndim() != 2 || coef.shape(1) != fastddpm::kCoefWidth)
      throw std::invalid_argument("coefficient table must be float32 [steps, 8]");
    if (row >= coef.shape(0)) throw std::invalid_argument("coefficient row index out of range");
    a.coef += row * fastddpm::kCoefWidth;
  }
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

// The U-Net engine: a plan (plan.py's arrays) + weights -> forward passes and whole loops.
class PyEngine {
 public:
  PyEngine(const py::array& ints, const py::array& floats, const py::array& slot_sizes, const py::list& weights,
           int64_t batch, int64_t in_c, int64_t out_c, int64_t height, int64_t width)
      : n_(batch), in_c_(in_c), out_c_(out_c), h_(height), w_(width) {
    const fastddpm::bind::PlanArrays plan(ints, floats, slot_sizes, weights);
    py::gil_scoped_release nogil;
    engine_ = std::make_unique<cpu::Engine>(plan.view(), plan.weights(), batch, in_c, out_c, height, width);
  }

  py::array_t<float> forward(const py::array& x, const py::array& t) {
    const float* xp = float_data(x, "sample");
    if (x.ndim() != 4 || x.shape(0) != n_ || x.shape(1) != in_c_ || x.shape(2) != h_ || x.shape(3) != w_)
      throw std::invalid_argument("sample must have shape [" + std::to_string(n_) + ", " + std::to_string(in_c_) +
                                  ", " + std::to_string(h_) + ", " + std::to_string(w_) + "] for this engine");
    const float* tp = float_data(t, "timesteps");
    if (t.ndim() != 1 || t.shape(0) != n_) throw std::invalid_argument("timesteps must be float32 [N]");
    py::array_t<float> out({n_, out_c_, h_, w_});
    float* op = out.mutable_data();
    py::gil_scoped_release nogil;
    engine_->forward(xp, tp, op);
    return out;
  }

  py::tuple run(const py::array& coef, const py::array& timesteps, uint64_t seed, int64_t first_index,
                const std::vector<int64_t>& keep, const py::object& callback, int64_t every) {
    const float* cp = float_data(coef, "coefficient table");
    if (coef.ndim() != 2 || coef.shape(1) != fastddpm::kCoefWidth)
      throw std::invalid_argument("coefficient table must be float32 [steps, 8]");
    const auto ts = checked<int64_t>(timesteps, "timesteps", 1, -1);
    if (ts.shape(0) != coef.shape(0)) throw std::invalid_argument("timesteps and coefficient rows differ in length");
    if (every < 1) throw std::invalid_argument("callback_every must be >= 1");
    const int64_t steps = ts.shape(0);
    py::array_t<float> x({n_, in_c_, h_, w_});
    py::list frames;
    cpu::LoopArgs a;
    a.steps = steps;
    a.coef = cp;
    a.timesteps = ts.data();
    a.seed = seed;
    a.first_index = first_index;
    a.keep = keep;
    for (size_t i = 0; i < keep.size(); ++i) {
      py::array_t<float> f({n_, in_c_, h_, w_});
      a.keep_out.push_back(f.mutable_data());
      frames.append(f);
    }
    a.x_out = x.mutable_data();
    // Takes the GIL back once per step (Ctrl-C) and every `every` steps and at the end (callback).
    fastddpm::bind::run_loop([&](const std::function<bool(int64_t)>& on_step) { return engine_->run(a, on_step); },
                             callback, [&](int64_t k) { return k % every == 0 || k == steps; });
    return py::make_tuple(x, frames);
  }

  int64_t arena_bytes() const { return engine_->arena_bytes(); }
  std::vector<int> conv_paths() const { return engine_->conv_paths(); }
  void set_profiling(bool on) {
    py::gil_scoped_release nogil;  // waits for a call in flight
    engine_->set_profiling(on);
  }
  std::vector<double> op_seconds() const {
    py::gil_scoped_release nogil;
    return engine_->op_seconds();
  }

 private:
  std::unique_ptr<cpu::Engine> engine_;
  int64_t n_, in_c_, out_c_, h_, w_;
};

}  // namespace

PYBIND11_MODULE(_C, mod) {
  mod.def("layout", &fastddpm::bind::layout_dict,
          "the shared layouts (op codes, plan columns, flags, coefficient columns, noise constants)");
  mod.doc() = "fastddpm's C++ CPU core: the fused sampler step and Philox noise";
  mod.def("fused_step", &fused_step, py::arg("x"), py::arg("m"), py::arg("out"), py::arg("coef"),
          py::arg("seed"), py::arg("noise_step"), py::arg("first_index"), py::arg("noise"), py::arg("row") = -1,
          "out = fused step of x (sample) and m (model output) with one coefficient row (or row `row` of "
          "a [S, 8] table); noise=None "
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
  py::class_<PyEngine>(mod, "Engine", "The native U-Net engine for one plan (batch, height, width)")
      .def(py::init<const py::array&, const py::array&, const py::array&, const py::list&, int64_t, int64_t,
                    int64_t, int64_t, int64_t>(),
           py::arg("ints"), py::arg("floats"), py::arg("slot_sizes"), py::arg("weights"), py::arg("batch"),
           py::arg("in_channels"), py::arg("out_channels"), py::arg("height"), py::arg("width"))
      .def("forward", &PyEngine::forward, py::arg("x"), py::arg("t"),
           "model output [N, out_c, H, W] of x [N, in_c, H, W] (float32) at timesteps t (float32 [N])")
      .def("run", &PyEngine::run, py::arg("coef"), py::arg("timesteps"), py::arg("seed"), py::arg("first_index"),
           py::arg("keep"), py::arg("callback"), py::arg("every") = 1,
           "the whole sampling loop; returns (x0, [frames for keep])")
      .def_property_readonly("arena_bytes", &PyEngine::arena_bytes)
      .def_property_readonly("conv_paths", &PyEngine::conv_paths,
                             "per conv op: 0 = direct GEMM, 2 / 4 = Winograd F(2x2) / F(4x4), active ISA")
      .def("set_profiling", &PyEngine::set_profiling, py::arg("on"),
           "time every plan op of each forward (on also zeroes the totals)")
      .def_property_readonly("op_seconds", &PyEngine::op_seconds,
                             "per plan op: seconds accumulated while profiling (op-parallel samples only)");
  mod.def("fma_peak_gflops", [](const std::string& isa, int threads, double seconds) {
    const cpu::Isa i = isa_of(isa);
    py::gil_scoped_release nogil;
    return cpu::fma_peak_gflops(i, threads, seconds);
  }, py::arg("isa"), py::arg("threads"), py::arg("seconds") = 0.2,
          "float32 FMA GFLOP/s of `threads` threads on an ISA path: the machine's FLOP ceiling");
  mod.def("num_threads", &cpu::num_threads);
  mod.def("set_num_threads", &cpu::set_num_threads, py::arg("n"));
}
