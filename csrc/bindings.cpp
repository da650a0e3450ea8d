// fastddpm._C: the only file of the CPU core that knows Python. It unpacks NumPy arrays into raw
// pointers and plain structs, checks them, releases the GIL and calls the checked C++ entry points.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cmath>
#include <cstring>
#include <stdexcept>
#include <string>

#include <memory>
#include <optional>
#include <vector>

#include "array_args.h"
#include "layout_dict.h"
#include "py_engine.h"
#include "py_loop.h"
#include "cpu/engine.h"
#include "cpu/isa.h"
#include "cpu/peak.h"
#include "cpu/step_cpu.h"
#include "cpu/thread_pool.h"
#include "fastddpm/plan.h"

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

// An optional [batch, per_sample] input shaped like x (None -> nullptr); arrays keeps it alive.
const float* optional_input(const py::object& o, const py::array& x, const char* what, std::vector<py::array>& arrays) {
  if (o.is_none()) return nullptr;
  arrays.push_back(o.cast<py::array>());
  const float* p = float_data(arrays.back(), what);
  same_size(arrays.back(), x, what);
  return p;
}

// coef: one row of kCoefWidth floats (row = -1) or the scheduler's whole table [S, kCoefWidth] and
// the row to use (indexing here saves the per-step creation of a NumPy view on the Python side).
// h1, h2, x0_out: None or arrays shaped like x (step.h's StepArrays). m_uncond: nullptr (no
// guidance) or an array shaped like x, the null-class model output, with guidance scale w.
void fused_step_impl(const py::array& x, const py::array& m, py::array& out, const py::array& coef,
                     uint64_t seed, uint32_t noise_step, int64_t first_index, const py::object& noise,
                     int64_t row, const py::object& h1, const py::object& h2, const py::object& x0_out,
                     const py::object* m_uncond, float w) {
  StepArrays a;
  a.x = float_data(x, "sample");
  a.m = float_data(m, "model_output");
  a.out = writable_float_data(out, "out");
  a.coef = float_data(coef, "coefficient row");
  if (row < 0) {
    if (coef.size() < fastddpm::kCoefWidth)
      throw std::invalid_argument("coefficient row needs " + std::to_string(fastddpm::kCoefWidth) + " floats");
  } else {
    if (coef.ndim() != 2 || coef.shape(1) != fastddpm::kCoefWidth)
      throw std::invalid_argument("coefficient table must be float32 [steps, " +
                                  std::to_string(fastddpm::kCoefWidth) + "]");
    if (row >= coef.shape(0)) throw std::invalid_argument("coefficient row index out of range");
    a.coef += row * fastddpm::kCoefWidth;
  }
  same_size(m, x, "model_output");
  same_size(out, x, "out");
  std::vector<py::array> arrays;  // the optional arguments, alive until the call returns
  a.noise = optional_input(noise, x, "noise", arrays);
  a.h1 = optional_input(h1, x, "h1", arrays);
  a.h2 = optional_input(h2, x, "h2", arrays);
  if (m_uncond) {
    a.m_uncond = optional_input(*m_uncond, x, "m_uncond", arrays);
    a.guidance = w;
  }
  if (!x0_out.is_none()) {
    arrays.push_back(x0_out.cast<py::array>());
    a.x0_out = writable_float_data(arrays.back(), "x0_out");
    same_size(arrays.back(), x, "x0_out");
    if (a.x0_out == a.x || a.x0_out == a.m || a.x0_out == a.out || a.x0_out == a.h1 || a.x0_out == a.h2 ||
        a.x0_out == a.m_uncond)
      throw std::invalid_argument("x0_out must not be x, m, m_uncond, out, h1 or h2");
  }
  const StepParams p = params_of(x, seed, noise_step, first_index);
  py::gil_scoped_release nogil;
  cpu::fused_step(p, a);
}

// The unguided step: the signature (and per-call cost) of the step before guidance existed.
void fused_step(const py::array& x, const py::array& m, py::array& out, const py::array& coef,
                uint64_t seed, uint32_t noise_step, int64_t first_index, const py::object& noise,
                int64_t row, const py::object& h1, const py::object& h2, const py::object& x0_out) {
  fused_step_impl(x, m, out, coef, seed, noise_step, first_index, noise, row, h1, h2, x0_out, nullptr, 1.0f);
}

// The same with keyword-only m_uncond and guidance: a second overload of _C.fused_step, tried only
// when the first refuses the call (pybind11 takes the first overload that accepts the arguments),
// so an unguided call parses no more arguments than before.
void fused_step_guided(const py::array& x, const py::array& m, py::array& out, const py::array& coef,
                       uint64_t seed, uint32_t noise_step, int64_t first_index, const py::object& noise,
                       int64_t row, const py::object& h1, const py::object& h2, const py::object& x0_out,
                       const py::object& m_uncond, double guidance) {
  if (!std::isfinite(guidance)) throw std::invalid_argument("guidance must be finite");
  if (m_uncond.is_none()) {
    if (guidance != 1.0) throw std::invalid_argument("guidance needs m_uncond (the null-class model output)");
    fused_step_impl(x, m, out, coef, seed, noise_step, first_index, noise, row, h1, h2, x0_out, nullptr, 1.0f);
    return;
  }
  fused_step_impl(x, m, out, coef, seed, noise_step, first_index, noise, row, h1, h2, x0_out, &m_uncond,
                  float(guidance));
}

// A new [batch, row_length(per_sample)] array of T filled by fill(params, data) without the GIL.
template <typename T, typename RowLength, typename Fill>
py::array_t<T> noise_array(uint64_t seed, int64_t batch, int64_t per_sample, uint32_t step, int64_t first_index,
                           RowLength&& row_length, Fill&& fill) {
  if (batch < 0 || per_sample < 0) throw std::invalid_argument("sizes must be non-negative");
  py::array_t<T> out({batch, row_length(per_sample)});
  StepParams p = params_of(out, seed, step, first_index);
  p.per_sample = per_sample;
  T* data = out.mutable_data();
  {
    py::gil_scoped_release nogil;
    fill(p, data);
  }
  return out;
}

py::array_t<float> normals(uint64_t seed, int64_t batch, int64_t per_sample, uint32_t step,
                           int64_t first_index) {
  return noise_array<float>(seed, batch, per_sample, step, first_index, [](int64_t n) { return n; },
                            [](const StepParams& p, float* data) { cpu::normals(p, data); });
}

// Rows of whole Philox blocks (4 words).
py::array_t<uint32_t> philox_uint32(uint64_t seed, int64_t batch, int64_t per_sample, uint32_t step,
                                    int64_t first_index) {
  return noise_array<uint32_t>(seed, batch, per_sample, step, first_index, [](int64_t n) { return (n + 3) / 4 * 4; },
                               [](const StepParams& p, uint32_t* data) { cpu::philox_stream(p, data); });
}

cpu::Isa isa_of(const std::string& name) {
  for (cpu::Isa isa : {cpu::Isa::kGeneric, cpu::Isa::kAvx2, cpu::Isa::kAvx512})
    if (name == cpu::isa_name(isa)) return isa;
  throw std::invalid_argument("unknown ISA path '" + name + "' (generic, avx2, avx512)");
}

void check_threads(int threads) {
  if (threads < 0) throw std::invalid_argument("threads must be >= 1 (0: the default), got " + std::to_string(threads));
}

// The U-Net engine: a plan (plan.py's arrays) + weights -> forward passes and whole loops.
class PyEngine {
 public:
  PyEngine(const py::array& ints, const py::array& floats, const py::array& slot_sizes, const py::list& weights,
           int64_t batch, int64_t in_c, int64_t out_c, int64_t height, int64_t width,
           const cpu::CpuEngineOptions& options)
      : shape_{batch, in_c, out_c, height, width} {
    const fastddpm::bind::PlanArrays plan(ints, floats, slot_sizes, weights);
    py::gil_scoped_release nogil;
    engine_ = std::make_unique<cpu::Engine>(plan.view(), plan.weights(), batch, in_c, out_c, height, width, options);
  }

  py::array_t<float> forward(const py::array& x, const py::array& t, const py::object& class_emb, int threads) {
    check_threads(threads);
    const float* xp = shape_.sample_data(x);
    const float* tp = shape_.timestep_data(t);
    const float* cp = fastddpm::bind::class_emb_data(class_emb, shape_.n, engine_->class_dim());
    py::array_t<float> out = shape_.new_output();
    float* op = out.mutable_data();
    py::gil_scoped_release nogil;
    engine_->forward(xp, tp, cp, op, threads);
    return out;
  }

  py::tuple run(const py::array& coef, const py::array& timesteps, uint64_t seed, int64_t first_index,
                const std::vector<int64_t>& keep, const py::object& callback, int64_t every, int64_t history,
                const py::object& class_emb, const py::object& guidance, const py::object& model_t,
                double x_scale, int threads) {
    check_threads(threads);
    const float* cp = float_data(coef, "coefficient table");
    if (coef.ndim() != 2 || coef.shape(1) != fastddpm::kCoefWidth)
      throw std::invalid_argument("coefficient table must be float32 [steps, " +
                                  std::to_string(fastddpm::kCoefWidth) + "]");
    if (history < 0 || history > 2)
      throw std::invalid_argument("history must be 0, 1 or 2, got " + std::to_string(history));
    const auto ts = checked<int64_t>(timesteps, "timesteps", 1, -1);
    if (ts.shape(0) != coef.shape(0)) throw std::invalid_argument("timesteps and coefficient rows differ in length");
    if (every < 1) throw std::invalid_argument("callback_every must be >= 1");
    const int64_t steps = ts.shape(0);
    cpu::LoopArgs a;
    a.class_emb = fastddpm::bind::class_emb_data(class_emb, shape_.n, engine_->class_dim());
    const auto samples = fastddpm::bind::guided_shape(shape_, engine_->class_dim(), guidance, &a.guided, &a.guidance);
    fastddpm::bind::LoopOutputs outputs(samples, keep.size());
    a.steps = steps;
    a.coef = cp;
    a.timesteps = ts.data();
    a.seed = seed;
    a.first_index = first_index;
    a.keep = keep;
    a.keep_out = outputs.frame_data;
    a.x_out = outputs.x_data();
    a.history = int(history);
    std::optional<py::array_t<float>> mt;  // [steps] float32, kept alive for the run
    if (!model_t.is_none()) {
      mt = checked<float>(model_t.cast<py::array>(), "model timesteps", 1, -1);
      if (mt->shape(0) != steps) throw std::invalid_argument("model timesteps and timesteps differ in length");
      a.model_t = mt->data();
    }
    a.x_scale = float(x_scale);
    a.threads = threads;
    // Takes the GIL back once per step (Ctrl-C) and every `every` steps and at the end (callback).
    fastddpm::bind::run_loop([&](const std::function<bool(int64_t)>& on_step) { return engine_->run(a, on_step); },
                             callback, [&](int64_t k) { return k % every == 0 || k == steps; });
    return outputs.result();
  }

  int64_t arena_bytes() const { return engine_->arena_bytes(); }
  int64_t class_dim() const { return engine_->class_dim(); }
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
  fastddpm::bind::SampleShape shape_;
};

}  // namespace

PYBIND11_MODULE(_C, mod) {
  mod.def("layout", &fastddpm::bind::layout_dict,
          "the shared layouts (op codes, plan columns, flags, coefficient columns, noise constants)");
  mod.doc() = "fastddpm's C++ CPU core: the fused sampler step and Philox noise";
  mod.def("fused_step", &fused_step, py::arg("x"), py::arg("m"), py::arg("out"), py::arg("coef"),
          py::arg("seed"), py::arg("noise_step"), py::arg("first_index"), py::arg("noise"), py::arg("row") = -1,
          py::arg("h1") = py::none(), py::arg("h2") = py::none(), py::arg("x0_out") = py::none(),
          "out = fused step of x (sample) and m (model output) with one coefficient row (or row `row` of "
          "a [S, 12] table); noise=None "
          "makes the Philox noise of (seed, first_index + i, noise_step) in the kernel. h1, h2: the previous "
          "steps' x0 (shaped like x), added with the row's h1, h2 weights; x0_out: receives this step's x0 "
          "(after the clip; must not be x, m, out, h1 or h2).");
  mod.def("fused_step", &fused_step_guided, py::arg("x"), py::arg("m"), py::arg("out"), py::arg("coef"),
          py::arg("seed"), py::arg("noise_step"), py::arg("first_index"), py::arg("noise"), py::arg("row") = -1,
          py::arg("h1") = py::none(), py::arg("h2") = py::none(), py::arg("x0_out") = py::none(), py::kw_only(),
          py::arg("m_uncond") = py::none(), py::arg("guidance") = 1.0,
          "classifier-free guidance: m is the conditional model output and m_uncond (shaped like x) the "
          "null-class one; the step uses m_uncond + guidance * (m - m_uncond) (float32, step.h "
          "step_guided_output) as its model output. out may be m_uncond; x0_out may not.");
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
      .def(py::init([](const py::array& ints, const py::array& floats, const py::array& slot_sizes,
                       const py::list& weights, int64_t batch, int64_t in_c, int64_t out_c, int64_t height,
                       int64_t width, int winograd_max_m, bool winograd_force, bool compact_grid,
                       bool sample_parallel) {
             cpu::CpuEngineOptions options;
             options.winograd_max_m = winograd_max_m;
             options.winograd_force = winograd_force;
             options.compact_grid = compact_grid;
             options.sample_parallel = sample_parallel;
             return std::make_unique<PyEngine>(ints, floats, slot_sizes, weights, batch, in_c, out_c, height, width,
                                               options);
           }),
           py::arg("ints"), py::arg("floats"), py::arg("slot_sizes"), py::arg("weights"), py::arg("batch"),
           py::arg("in_channels"), py::arg("out_channels"), py::arg("height"), py::arg("width"), py::kw_only(),
           py::arg("winograd_max_m") = cpu::CpuEngineOptions().winograd_max_m,
           py::arg("winograd_force") = cpu::CpuEngineOptions().winograd_force,
           py::arg("compact_grid") = cpu::CpuEngineOptions().compact_grid,
           py::arg("sample_parallel") = cpu::CpuEngineOptions().sample_parallel,
           "winograd_max_m: the largest Winograd tile (0 = direct convs only, 2, 4); winograd_force: Winograd "
           "wherever a conv's shape allows; compact_grid: skip the pad columns where the width allows; "
           "sample_parallel: one sample per thread for whole multiples of the thread count")
      .def("forward", &PyEngine::forward, py::arg("x"), py::arg("t"), py::arg("class_emb") = py::none(),
           py::arg("threads") = 0,
           "threads: asked of the process-wide budget (0 = all of it); model output [N, out_c, H, W] of x [N, in_c, H, W] (float32) at timesteps t (float32 [N]); "
           "class_emb: float32 [N, class_dim] class-embedding rows, required by a class-conditional plan")
      .def("run", &PyEngine::run, py::arg("coef"), py::arg("timesteps"), py::arg("seed"), py::arg("first_index"),
           py::arg("keep"), py::arg("callback"), py::arg("every") = 1, py::arg("history") = 0,
           py::arg("class_emb") = py::none(), py::arg("guidance") = py::none(), py::arg("model_t") = py::none(),
           py::arg("x_scale") = 1.0, py::arg("threads") = 0,
           "the whole sampling loop; returns (x0, [frames for keep]). threads: asked of the process-wide budget "
           "at each step (0 = all of it); model_t: float32 [steps], the model's "
           "time input of a fractional schedule (default: the timesteps, which stay the noise keys); x_scale: "
           "x_T = x_scale * the initial normals (frame 0 shows it). history (0, 1, 2): previous x0 "
           "predictions fed to each step as h1 (h2), from an engine-owned ring of 3 buffers. class_emb: "
           "float32 [N, class_dim] (a class-conditional plan). guidance=w: classifier-free guidance, "
           "n = N / 2 samples (class_emb rows [0, n) conditional, [n, N) the null class), each step "
           "using m_u + w (m_c - m_u); x0 and the frames are [n, C, H, W]")
      .def_property_readonly("class_dim", [](const PyEngine& e) { return e.class_dim(); },
                             "the class embedding's width of a class-conditional plan, else 0")
      .def_property_readonly("arena_bytes", &PyEngine::arena_bytes)
      .def_property_readonly("conv_paths", &PyEngine::conv_paths,
                             "per conv op: 0 = direct GEMM, 2 / 4 = Winograd F(2x2) / F(4x4), active ISA")
      .def("set_profiling", &PyEngine::set_profiling, py::arg("on"),
           "time every plan op of each forward (on also zeroes the totals)")
      .def_property_readonly("op_seconds", &PyEngine::op_seconds,
                             "per plan op: seconds accumulated while profiling (op-parallel samples only)");
  // A benchmark tool, not part of the product's API (hence the underscore).
  mod.def("_fma_peak_gflops", [](const std::string& isa, int threads, double seconds) {
    const cpu::Isa i = isa_of(isa);
    py::gil_scoped_release nogil;
    return cpu::fma_peak_gflops(i, threads, seconds);
  }, py::arg("isa"), py::arg("threads"), py::arg("seconds") = 0.2,
          "benchmarks only: float32 FMA GFLOP/s of `threads` threads on an ISA path, the machine's FLOP ceiling");
  mod.def("num_threads", &cpu::num_threads, "the process-wide thread budget every call draws from");
  mod.def("set_num_threads", &cpu::set_num_threads, py::arg("n"), "set the process-wide thread budget (n >= 1)");
  mod.def("threads_in_use", &cpu::threads_in_use, "threads held by calls in flight (budget accounting)");
  mod.def("acquire_threads", &cpu::acquire_threads, py::arg("requested"),
          "take min(requested or the budget, what is free), at least 1, from the budget; give it back "
          "with release_threads (for executors outside C++)");
  mod.def("release_threads", &cpu::release_threads, py::arg("n"));
  mod.def("_set_solo_fallback", &cpu::set_solo_fallback, py::arg("on"),
          "tests and benchmarks: the pool's fallback to one thread per call after a stall (default on)");
}
