// The CUDA U-Net engine: a plan (fastddpm/plan.h) executed over device buffers, and the sampling
// loop as one captured CUDA graph replayed once per step.
//
// Layout (as csrc/cpu/engine.cpp): slots 2.. live in one sample-major arena [N][T] floats;
// sample n's copy of slot s starts at n * T + slot_off[s], followed by kSlack floats so the GEMM
// may read a tile past a slot's end. Slot 0 (x, the loop state) and slot 1 (the model output) are
// separate contiguous [N, C*H*W] buffers, the layout the fused step kernel takes.
//
// Convs are implicit GEMMs (gemm.cu): B row k is the input at offset boff[k] from the sample base
// of the arena; for a 3x3 stride-1 conv the columns run over the padded grid (P = H * (W+2)) and
// the epilogue drops the two pad columns of each row; UP convs are four 2x2 phase GEMMs with
// folded weights; stride-2 convs im2col into their scratch slot first.
//
// The loop: per-run values (seed, first index, the step counter) sit in a device LoopState; the
// timestep and coefficient tables sit in device memory. One step = loop_begin (t from the
// table) + the U-Net + loop_step (coefficient row and noise step from the tables at the counter)
// + loop_advance (counter += 1). It is captured once per engine and replayed `steps` times with no
// host synchronisation between steps; the host waits only on events at callback chunk boundaries,
// one chunk behind the GPU, so the queue never drains.
//
// Multistep solvers (RunArgs::history > 0): a ring of 3 [N, C*H*W] x0 buffers, allocated on the
// first such run and kept, and a second step graph captured then, whose fused step is the history
// kernel (the single-step graph and its kernel stay as they were). The history depth is a per-run
// value in the LoopState; the kernel picks the ring slots from the device step counter
// (csrc/cpu/engine.cpp's ring: x0 to slot k % 3, H1 and H2 from the one or two before), so one
// captured step serves every step of every multistep run.
//
// Class conditioning: slot 2 (an arena slot) holds the class embedding [N, D], uploaded by each
// forward and run before anything reads it (no op writes it); time_embedding.linear_2 adds it
// (the LINEAR residual). Classifier-free guidance (RunArgs::guided): the loop makes n = N / 2
// samples; x rows [0, n) are the loop state, the fused step (n samples) reads the model output's
// halves m_c = rows [0, n), m_u = rows [n, 2n) and the scale from the LoopState, and stores x_prev
// to x rows [0, n) and again to rows [n, 2n), so the next forward sees [x, x] without a copy. The
// guided steps are graphs of their own (with and without the history ring), captured on first use.
#include "engine_cuda.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <string>

#include "fastddpm/conv_lowering.h"
#include "fastddpm/philox.h"
#include "fastddpm/plan.h"
#include "fastddpm/step.h"

namespace fastddpm {
namespace cuda {

namespace P = fastddpm::plan;

namespace {

constexpr int64_t kSlack = 128;  // floats after each slot: reads past a slot's end stay inside the arena
constexpr int64_t kAlign = 16;   // slot offsets in floats (64 bytes)

int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }

[[noreturn]] void fail(const std::string& msg) { throw std::invalid_argument(msg); }

// A device allocation owned by the engine; freed when dropped (so a failed build frees all).
class DevBuf {
 public:
  DevBuf() = default;
  DevBuf(size_t bytes, const char* what) : bytes_(std::max<size_t>(bytes, 16)) {
    const cudaError_t e = cudaMalloc(&p_, bytes_);
    if (e == cudaSuccess) return;
    p_ = nullptr;
    cudaGetLastError();  // an allocation failure is not sticky: clear it
    size_t free_b = 0, total_b = 0;
    cudaMemGetInfo(&free_b, &total_b);
    cudaGetLastError();
    const std::string msg = "CUDA out of memory: " + std::to_string(bytes_ >> 20) + " MiB for " + what + " (" +
                            std::to_string(free_b >> 20) + " of " + std::to_string(total_b >> 20) +
                            " MiB free on the device)";
    if (e == cudaErrorMemoryAllocation) throw OutOfMemory(msg);
    throw CudaError(std::string("cudaMalloc for ") + what + " failed: CUDA error " + cuda_text(e));
  }
  ~DevBuf() {
    if (p_) cudaFree(p_);
  }
  DevBuf(DevBuf&& o) noexcept : p_(o.p_), bytes_(o.bytes_) { o.p_ = nullptr; o.bytes_ = 0; }
  DevBuf& operator=(DevBuf&& o) noexcept {
    if (this != &o) {
      if (p_) cudaFree(p_);
      p_ = o.p_; bytes_ = o.bytes_;
      o.p_ = nullptr; o.bytes_ = 0;
    }
    return *this;
  }
  DevBuf(const DevBuf&) = delete;
  DevBuf& operator=(const DevBuf&) = delete;
  template <typename T> T* as() const { return static_cast<T*>(p_); }
  size_t bytes() const { return p_ ? bytes_ : 0; }

 private:
  void* p_ = nullptr;
  size_t bytes_ = 0;
};

// Set-up copies go on the engine's stream (non-blocking: the legacy stream would not order them
// with it); a pageable source is staged before cudaMemcpyAsync returns, so `host` may die after.
// build() and set_schedule() wait for the stream before they return.
DevBuf upload(const void* host, size_t bytes, const char* what, cudaStream_t st) {
  DevBuf b(bytes, what);
  check_cuda(cudaMemcpyAsync(b.as<void>(), host, bytes, cudaMemcpyHostToDevice, st), "weight upload");
  return b;
}
DevBuf upload_floats(const std::vector<float>& v, const char* what, cudaStream_t st) {
  return upload(v.data(), v.size() * 4, what, st);
}

// Pinned host staging (async copies); freed when dropped.
class HostBuf {
 public:
  HostBuf() = default;
  explicit HostBuf(size_t bytes) {
    if (bytes == 0) return;
    if (cudaMallocHost(&p_, bytes) != cudaSuccess) {
      cudaGetLastError();
      p_ = nullptr;
      throw OutOfMemory("out of pinned host memory: " + std::to_string(bytes >> 20) + " MiB for trajectory frames");
    }
  }
  ~HostBuf() {
    if (p_) cudaFreeHost(p_);
  }
  HostBuf(const HostBuf&) = delete;
  HostBuf& operator=(const HostBuf&) = delete;
  HostBuf(HostBuf&& o) noexcept : p_(o.p_) { o.p_ = nullptr; }
  HostBuf& operator=(HostBuf&& o) noexcept {
    if (this != &o) {
      if (p_) cudaFreeHost(p_);
      p_ = o.p_;
      o.p_ = nullptr;
    }
    return *this;
  }
  float* f() const { return static_cast<float*>(p_); }

 private:
  void* p_ = nullptr;
};

// Pinned host memory kept between runs, grown when a run needs more (cudaMallocHost is slow).
class PinnedPool {
 public:
  float* get(size_t bytes) {
    if (bytes > bytes_) {
      buf_ = HostBuf();  // free first: the new one may need the room
      bytes_ = 0;
      buf_ = HostBuf(bytes);
      bytes_ = bytes;
    }
    return buf_.f();
  }

 private:
  HostBuf buf_;
  size_t bytes_ = 0;
};

// Round to tf32 (10-bit mantissa, nearest, ties away): what the tensor cores would use anyway,
// done once on the host for the weights.
float tf32_round(float v) {
  if (!std::isfinite(v)) return v;
  uint32_t u;
  std::memcpy(&u, &v, 4);
  u = (u + 0x1000u) & 0xFFFFE000u;
  std::memcpy(&v, &u, 4);
  return v;
}

// One GEMM of a conv (CONV: 1, UP: 4) or attention (qkv, out projection).
struct GGemm {
  DevBuf A;      // [ceil(M/64)*64, Kpad] in the operand type
  DevBuf boff;   // int32 [K], relative to the sample base of the source: the arena, or slot src_slot
  int src_slot = -1;  // -1: B is gathered from the arena; 0 / 1: from that slot's own buffer
  int M = 0, K = 0, Kpad = 0, Pn = 0, Wp = 1, Wv = 1, oys = 0, oxs = 1, ooff = 0;
  int splits = 1, split_k = 0;  // split K (choose_split)
  std::vector<int64_t> rel;  // boff before the slot offsets are known: (slot, offset in slot)
  std::vector<int64_t> rel_slot;
};

constexpr int kMinSplitChunks = 4;  // K chunks (of 16) per split at least: a split must amortise its partial tile

// About kSplitTargetBlocks blocks for ONE sample's GEMM (an H100 / H200 has 132 multiprocessors),
// each split at least kMinSplitChunks chunks. Chosen from the layer alone, never from the batch or
// the device: the summation order, and so every bit of the result, is the same at any batch size
// and on any GPU model.
constexpr int kSplitTargetBlocks = 128;
void choose_split(GGemm& g, bool enabled) {
  const int chunks = g.Kpad / kGemmTileK;
  const int tiles = ((g.Pn + kGemmTileP - 1) / kGemmTileP) * ((g.M + kGemmTileM - 1) / kGemmTileM);
  const int want = enabled ? std::min((kSplitTargetBlocks + tiles - 1) / tiles, chunks / kMinSplitChunks) : 1;
  const int per = (chunks + std::max(want, 1) - 1) / std::max(want, 1);  // chunks per split
  g.splits = (chunks + per - 1) / per;
  g.split_k = per * kGemmTileK;
}

struct GOp : P::OpFields {
  DevBuf wt, bias, gamma, beta, bias2;  // wt: LINEAR's weight, or TIME_EMB's learned table
  int64_t table_rows = 0;               // TIME_EMB learned: rows of wt
  std::vector<GGemm> gemms;
};

}  // namespace

struct Engine::Impl {
  int64_t N = 0, in_c = 0, out_c = 0, H = 0, W = 0;
  Precision prec = Precision::kTF32;
  std::vector<int64_t> slot_off, slot_size;
  int64_t T = 0;  // per-sample arena floats
  DevBuf arena, x, m, tvals, state;
  DevBuf ring;            // multistep history: 3 x [N, in_c * H * W] x0 buffers, or none (allocated on first use)
  DevBuf ws;              // split-K partial tiles: [N][ws_per_sample] floats
  int64_t ws_per_sample = 0;
  std::vector<GOp> ops;
  // the loop
  DevBuf coef_tab, ts_tab, mt_tab;  // float [cap, kCoefWidth], uint32 [cap] noise keys, float [cap] model times
  int64_t cap = 0, steps = 0;
  cudaStream_t stream = nullptr;
  cudaEvent_t ev[2] = {nullptr, nullptr};  // chunk boundaries of the loop (blocking sync: no spinning core)
  cudaEvent_t done = nullptr;              // the end of a synchronous call (blocking sync)
  cudaEvent_t last_use = nullptr;          // the last work enqueued on the buffers, on whatever stream
  // The captured step: [0] the single-step loop, [1] the multistep loop (the history ring's
  // kernel, captured on the first run with history > 0), [2] and [3] the same guided; each
  // captured on first use.
  struct StepGraph {
    cudaGraph_t graph = nullptr;
    cudaGraphExec_t exec = nullptr;
    size_t nodes = 0;
  };
  StepGraph graphs[4];
  static int graph_index(bool history, bool guided) { return (history ? 1 : 0) + (guided ? 2 : 0); }
  int64_t class_dim = 0;  // the class slot's width on a class-conditional plan, else 0
  HostBuf state_host;
  PinnedPool frames_host, x_host;  // a run's trajectory frames and final sample, copied out asynchronously

  ~Impl() {
    drop_graph();
    for (cudaEvent_t e : {ev[0], ev[1], done, last_use})
      if (e) cudaEventDestroy(e);
    for (cudaEvent_t e : prof_ev) cudaEventDestroy(e);
    if (stream) cudaStreamDestroy(stream);
  }
  // Blocks (without spinning) until everything enqueued on the engine's stream so far is done.
  void wait_stream(const char* what) {
    check_cuda(cudaEventRecord(done, stream), "cudaEventRecord");
    check_cuda(cudaEventSynchronize(done), what);
  }
  // The engine's stream runs after the last use of the buffers; call before enqueueing on it.
  void after_last_use() { check_cuda(cudaStreamWaitEvent(stream, last_use, 0), "cudaStreamWaitEvent"); }
  void mark_last_use() { check_cuda(cudaEventRecord(last_use, stream), "cudaEventRecord"); }
  void drop_graph(StepGraph& g) {
    if (g.exec) cudaGraphExecDestroy(g.exec);
    if (g.graph) cudaGraphDestroy(g.graph);
    g = StepGraph{};
  }
  void drop_graph() {  // all: their tables (or buffers) are about to change
    for (StepGraph& g : graphs) drop_graph(g);
  }
  // class_emb given exactly when the plan is class-conditional
  void check_class_emb(const void* class_emb) const {
    if (class_dim > 0 && !class_emb)
      fail("this engine's plan is class-conditional: class_emb [" + std::to_string(N) + ", " +
           std::to_string(class_dim) + "] is required");
    if (class_dim == 0 && class_emb) fail("class_emb was given but this engine's plan has no class embedding");
  }
  // The class slot of every sample = its row of class_emb ([N, class_dim], host or device memory
  // as `kind` says), enqueued on st; nothing without a class slot.
  void copy_class(const float* class_emb, cudaMemcpyKind kind, cudaStream_t st) {
    if (class_dim == 0) return;
    check_cuda(cudaMemcpy2DAsync(slot(P::kClassSlot), size_t(T) * 4, class_emb, size_t(class_dim) * 4,
                                 size_t(class_dim) * 4, size_t(N), kind, st),
               "copy of the class embedding");
  }

  float* slot(int64_t s) const {
    if (s == P::kInputSlot) return x.as<float>();
    if (s == P::kOutputSlot) return m.as<float>();
    return arena.as<float>() + slot_off[size_t(s)];
  }
  int64_t bstride(int64_t s) const {
    if (s == P::kInputSlot) return in_c * H * W;
    if (s == P::kOutputSlot) return out_c * H * W;
    return T;
  }

  CudaEngineOptions options;
  // construction: the slots' offsets first (GEMM B rows are arena offsets), then one op at a time
  void build(const PlanView& pv, const std::vector<WeightView>& weights);
  void layout_slots(const PlanView& pv);
  GOp build_op(const P::CheckedOp& c, size_t index);
  void build_linear(GOp& op, const P::CheckedOp& c);
  void build_groupnorm(GOp& op, const P::CheckedOp& c);
  void build_conv(GOp& op, const P::CheckedOp& c, const std::string& where);
  void build_attention(GOp& op, const P::CheckedOp& c, const std::string& where);
  // A lowered conv GEMM (fastddpm/conv_lowering.h): A packed in the engine's precision, B rows
  // as offsets from the one source the GEMM gathers from.
  GGemm conv_gemm(const P::ConvGemmLowering& l);
  // Where a GEMM gathers from: the arena (offsets then include the slot's), or slot 0 / 1's own
  // buffer (offsets from its start; those buffers carry the same slack as arena slots).
  int64_t gather_source(GGemm& g, int64_t s) const;
  void upload_offsets(GGemm& g, const std::vector<int64_t>& offsets);
  void require_arena_slot(int64_t s, const std::string& where, const char* what) const {
    if (s < 2)
      fail(where + ": the CUDA engine reads a GEMM " + what + " from the arena, not from the input/output slot " +
           std::to_string(s));
  }
  GGemm pack(int64_t M, int64_t K, const std::function<float(int64_t, int64_t)>& f, const char* what);
  void forward_ops(cudaStream_t st, bool timed = false);
  // profiling (set_profiling): events around each op of a timed forward, and the totals
  bool profiling = false;
  std::vector<cudaEvent_t> prof_ev;  // [ops + 1], timing events
  std::vector<double> op_seconds;
  void add_op_times();  // after the stream has passed the last event
  void capture(bool history, bool guided);
  // history: the multistep loop's step (the fused step reads and writes the ring); guided: the
  // guided loop's (n = N / 2 samples, the scale from the LoopState)
  void run_step_ops(bool timed, bool history, bool guided);
};

// ------------------------------------------------------------------------------- construction

GGemm Engine::Impl::pack(int64_t M, int64_t K, const std::function<float(int64_t, int64_t)>& f, const char* what) {
  GGemm g;
  g.M = int(M);
  g.K = int(K);
  g.Kpad = int(round_up(K, kGemmTileK));
  const int64_t Mp = round_up(M, kGemmTileM);
  const size_t n = size_t(Mp) * size_t(g.Kpad);
  if (precision_bytes(prec) == 4) {
    std::vector<float> a(n, 0.0f);  // a: [Mp, Kpad]
    for (int64_t r = 0; r < M; ++r)
      for (int64_t k = 0; k < K; ++k) {
        const float v = f(r, k);
        a[size_t(r * g.Kpad + k)] = prec == Precision::kTF32 ? tf32_round(v) : v;
      }
    g.A = upload(a.data(), n * 4, what, stream);
  } else {
    std::vector<uint16_t> a(n, 0);  // bf16 / fp16 bits: [Mp, Kpad]
    for (int64_t r = 0; r < M; ++r)
      for (int64_t k = 0; k < K; ++k) {
        const float v = f(r, k);
        if (prec == Precision::kBF16) {
          const __nv_bfloat16 h = __float2bfloat16_rn(v);
          std::memcpy(&a[size_t(r * g.Kpad + k)], &h, 2);
        } else {
          const __half h = __float2half_rn(v);
          std::memcpy(&a[size_t(r * g.Kpad + k)], &h, 2);
        }
      }
    g.A = upload(a.data(), n * 2, what, stream);
  }
  return g;
}

void Engine::Impl::layout_slots(const PlanView& pv) {
  slot_size.assign(pv.slot_sizes, pv.slot_sizes + pv.n_slots);
  slot_off.assign(slot_size.size(), 0);
  int64_t off = 0;
  for (size_t s = 2; s < slot_size.size(); ++s) {  // slots 0 and 1 have buffers of their own
    slot_off[s] = off;
    off += round_up(slot_size[s] + kSlack, kAlign);
  }
  T = std::max<int64_t>(off, kAlign);
  if (T > (int64_t(1) << 31) - 1) fail("the activations of one sample are too large for 32-bit offsets");
}

int64_t Engine::Impl::gather_source(GGemm& g, int64_t s) const {
  g.src_slot = s < 2 ? int(s) : -1;
  return s < 2 ? 0 : slot_off[size_t(s)];
}

void Engine::Impl::upload_offsets(GGemm& g, const std::vector<int64_t>& offsets) {
  std::vector<int32_t> b(offsets.begin(), offsets.end());
  g.boff = upload(b.data(), b.size() * 4, "GEMM offsets", stream);
}

GOp Engine::Impl::build_op(const P::CheckedOp& c, size_t index) {
  GOp op;
  static_cast<P::OpFields&>(op) = c;
  const std::string where = "plan op " + std::to_string(index) + " (" + P::op_name(op.code) + ")";
  switch (op.code) {
    case P::kTimeEmb:   // a learned table [rows, dim], Fourier frequencies [dim / 2], or no weights
      if (op.mode != P::kTimeSinusoidal) {
        const std::vector<float> table = P::weight_copy(c, P::kWeight);
        if (op.mode == P::kTimeLearned) op.table_rows = int64_t(table.size()) / op.cout;
        op.wt = upload_floats(table, "time embedding weights", stream);
      }
      break;
    case P::kPad:
    case P::kResample:
    case P::kDivideByT:
      break;  // no weights
    case P::kLinear: build_linear(op, c); break;
    case P::kGroupNorm: build_groupnorm(op, c); break;
    case P::kConv: build_conv(op, c, where); break;
    case P::kAttention: build_attention(op, c, where); break;
    default:  // check_plan refuses unknown codes
      throw std::logic_error("plan_check.h and the engine disagree on op code " + std::to_string(op.code));
  }
  return op;
}

void Engine::Impl::build_linear(GOp& op, const P::CheckedOp& c) {
  op.wt = upload_floats(P::weight_copy(c, P::kWeight), "linear weight", stream);
  op.bias = upload_floats(P::weight_copy(c, P::kBias), "linear bias", stream);
}

void Engine::Impl::build_groupnorm(GOp& op, const P::CheckedOp& c) {
  op.gamma = upload_floats(P::weight_copy(c, P::kWeight), "norm scale", stream);
  op.beta = upload_floats(P::weight_copy(c, P::kBias), "norm shift", stream);
}

GGemm Engine::Impl::conv_gemm(const P::ConvGemmLowering& l) {
  GGemm g = pack(l.M, l.K, [&](int64_t m, int64_t k) { return l.weights[size_t(m * l.K + k)]; }, "conv weights");
  std::vector<int64_t> offsets;
  for (const P::BRow& r : l.rows) offsets.push_back(gather_source(g, r.slot) + r.offset);
  upload_offsets(g, offsets);
  const P::GemmColumns& col = l.columns;
  g.Pn = int(col.Pn); g.Wp = int(col.Wp); g.Wv = int(col.Wv); g.oys = int(col.oys); g.oxs = int(col.oxs);
  g.ooff = int(col.ooff);
  return g;
}

void Engine::Impl::build_conv(GOp& op, const P::CheckedOp& c, const std::string& where) {
  // a GEMM gathers all its rows from one source: with two, both must be arena slots
  if (op.in2 >= 0) {
    require_arena_slot(op.in, where, "input beside a shortcut");
    require_arena_slot(op.in2, where, "shortcut input");
  }
  if (op.mode == P::kDown0 || op.mode == P::kDown1) require_arena_slot(op.scratch, where, "im2col scratch");
  op.bias = upload_floats(P::conv_bias(c), "conv bias", stream);
  for (const P::ConvGemmLowering& l : P::lower_conv(c)) op.gemms.push_back(conv_gemm(l));
}

void Engine::Impl::build_attention(GOp& op, const P::CheckedOp& c, const std::string& where) {
  const int64_t C = op.cin, L = op.h * op.w;
  require_arena_slot(op.scratch, where, "scratch");
  if (N * op.heads > 65535) fail(where + ": batch * heads must be <= 65535 on the CUDA engine");
  const float* wq = P::checked_weight(c, P::kToQ).data;
  const float* wk = P::checked_weight(c, P::kToK).data;
  const float* wv = P::checked_weight(c, P::kToV).data;
  const float* wo = P::checked_weight(c, P::kToOut).data;
  op.bias2 = upload_floats(P::weight_copy(c, P::kToOutBias), "attention bias", stream);
  std::vector<float> bqkv;  // [3C]: q, k, v stacked
  for (int role : {P::kToQBias, P::kToKBias, P::kToVBias}) {
    const auto b = P::weight_copy(c, role);
    bqkv.insert(bqkv.end(), b.begin(), b.end());
  }
  op.bias = upload_floats(bqkv, "attention bias", stream);
  GGemm qkv = pack(3 * C, C, [&](int64_t mm, int64_t kk) {
    const float* s = mm < C ? wq : (mm < 2 * C ? wk : wv);
    return s[(mm % C) * C + kk];
  }, "attention weights");
  std::vector<int64_t> offsets;
  const int64_t base_in = gather_source(qkv, op.in);
  for (int64_t ch = 0; ch < C; ++ch) offsets.push_back(base_in + ch * L);
  upload_offsets(qkv, offsets);
  qkv.Pn = int(L); qkv.Wp = int(L); qkv.Wv = int(L); qkv.oys = 0; qkv.oxs = 1;
  GGemm proj = pack(C, C, [&](int64_t mm, int64_t kk) { return wo[mm * C + kk]; }, "attention weights");
  offsets.clear();
  for (int64_t ch = 0; ch < C; ++ch) offsets.push_back(slot_off[size_t(op.scratch)] + 3 * C * L + ch * L);
  upload_offsets(proj, offsets);
  proj.Pn = int(L); proj.Wp = int(L); proj.Wv = int(L); proj.oys = 0; proj.oxs = 1;
  op.gemms.push_back(std::move(qkv));
  op.gemms.push_back(std::move(proj));
}

void Engine::Impl::build(const PlanView& pv, const std::vector<WeightView>& weights) {
  const std::vector<P::CheckedOp> checked = P::check_plan(pv, weights, in_c, out_c, H, W, int64_t(1) << 30);
  class_dim = P::class_embedding_width(pv, checked);
  check_cuda(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking), "cudaStreamCreate");
  for (auto& e : ev) check_cuda(cudaEventCreateWithFlags(&e, cudaEventDisableTiming | cudaEventBlockingSync), "cudaEventCreate");
  check_cuda(cudaEventCreateWithFlags(&done, cudaEventDisableTiming | cudaEventBlockingSync), "cudaEventCreate");
  check_cuda(cudaEventCreateWithFlags(&last_use, cudaEventDisableTiming), "cudaEventCreate");
  layout_slots(pv);  // the arena's per-sample layout first: boff needs the slot offsets
  for (size_t i = 0; i < checked.size(); ++i) ops.push_back(build_op(checked[i], i));
  if (N > 65535) fail("batch must be <= 65535 on the CUDA engine");
  for (GOp& op : ops)
    for (GGemm& g : op.gemms) {
      choose_split(g, options.split_k);
      if (g.splits > 1) ws_per_sample = std::max<int64_t>(ws_per_sample, int64_t(g.splits) * g.M * g.Pn);
    }
  if (ws_per_sample > 0) ws = DevBuf(size_t(N * ws_per_sample) * 4, "the split-K workspace");
  if (N > 0 && T > (int64_t(1) << 40) / N) fail("the activations of this plan and batch are too large");
  arena = DevBuf(size_t(N * T + kSlack) * 4, "the activation arena");
  check_cuda(cudaMemsetAsync(arena.as<void>(), 0, arena.bytes(), stream), "cudaMemset");
  // slots 0 and 1 with slack too: a GEMM may gather from them (reads up to 2 floats past a padded plane)
  x = DevBuf(size_t(N * in_c * H * W + kSlack) * 4, "the sample buffer");
  m = DevBuf(size_t(N * out_c * H * W + kSlack) * 4, "the model output buffer");
  check_cuda(cudaMemsetAsync(x.as<void>(), 0, x.bytes(), stream), "cudaMemset");
  check_cuda(cudaMemsetAsync(m.as<void>(), 0, m.bytes(), stream), "cudaMemset");
  tvals = DevBuf(size_t(N) * 4, "the timesteps");
  state = DevBuf(sizeof(LoopState), "the loop state");
  state_host = HostBuf(sizeof(LoopState));
  mark_last_use();
  wait_stream("engine set-up");  // every upload has landed before the engine is used from any stream
}

// ------------------------------------------------------------------------------- the forward

void Engine::Impl::add_op_times() {
  for (size_t i = 0; i < ops.size(); ++i) {
    float ms = 0.0f;
    check_cuda(cudaEventElapsedTime(&ms, prof_ev[i], prof_ev[i + 1]), "cudaEventElapsedTime");
    op_seconds[i] += double(ms) * 1e-3;
  }
}

void Engine::Impl::forward_ops(cudaStream_t st, bool timed) {
  const int n = int(N);
  float* base = arena.as<float>();
  auto concat = [&](const GOp& op) {
    Concat c;
    c.in = slot(op.in); c.i_bstride = bstride(op.in);
    if (op.cin2 > 0) { c.in2 = slot(op.in2); c.i2_bstride = bstride(op.in2); }
    c.cin = int(op.cin); c.cin2 = int(op.cin2); c.h = int(op.h); c.w = int(op.w);
    return c;
  };
  auto gemm_of = [&](const GGemm& cg) {
    GemmDev g;
    g.M = cg.M; g.K = cg.K; g.Kpad = cg.Kpad; g.Pn = cg.Pn;
    g.A = cg.A.as<void>(); g.boff = cg.boff.as<int>();
    g.src = cg.src_slot < 0 ? base : slot(cg.src_slot);
    g.s_bstride = cg.src_slot < 0 ? T : bstride(cg.src_slot);
    g.Wp = cg.Wp; g.Wv = cg.Wv; g.oys = cg.oys; g.oxs = cg.oxs; g.ooff = cg.ooff;
    g.nbatch = n;
    g.splits = cg.splits; g.split_k = cg.split_k; g.ws = ws.as<float>();
    return g;
  };
  size_t index = 0;
  for (const GOp& op : ops) {
    if (timed) check_cuda(cudaEventRecord(prof_ev[index++], st), "cudaEventRecord");
    switch (op.code) {
      case P::kTimeEmb:
        check_cuda(op.mode == P::kTimeLearned
                       ? launch_time_table(tvals.as<float>(), op.wt.as<float>(), op.table_rows, slot(op.out),
                                           bstride(op.out), n, int(op.cout), st)
                   : op.mode == P::kTimeFourier
                       ? launch_time_fourier(tvals.as<float>(), op.wt.as<float>(), slot(op.out), bstride(op.out), n,
                                             int(op.cout), st)
                       : launch_time_emb(tvals.as<float>(), slot(op.out), bstride(op.out), n, int(op.cout), op.shift,
                                         op.flags & P::kFlagFlip, st),
                   "time embedding");
        break;
      case P::kDivideByT:
        check_cuda(launch_divide_by_t(slot(op.in), bstride(op.in), slot(op.out), bstride(op.out), tvals.as<float>(), n,
                                      op.cin * op.h * op.w, st),
                   "divide by t");
        break;
      case P::kLinear:
        check_cuda(launch_linear(slot(op.in), bstride(op.in), slot(op.out), bstride(op.out), op.wt.as<float>(),
                                 op.bias.as<float>(), op.residual >= 0 ? slot(op.residual) : nullptr,
                                 op.residual >= 0 ? bstride(op.residual) : 0, n, int(op.cin), int(op.cout),
                                 P::act_of(op.flags), st),
                   "linear");
        break;
      case P::kPad:
        check_cuda(launch_pad(concat(op), slot(op.out), bstride(op.out), n, op.a, op.shift, st), "pad");
        break;
      case P::kGroupNorm:
        check_cuda(launch_groupnorm(concat(op), slot(op.out), bstride(op.out), n, int(op.groups), op.eps,
                               op.gamma.as<float>(), op.beta.as<float>(), op.temb >= 0 ? slot(op.temb) : nullptr,
                               op.temb >= 0 ? bstride(op.temb) : 0, P::act_of(op.flags),
                               op.flags & P::kFlagPaddedOut, op.mode == P::kResamplePool, st), "group norm");
        break;
      case P::kResample:
        check_cuda(launch_resample(slot(op.in), bstride(op.in), slot(op.out), bstride(op.out), n, int(op.cin),
                                   int(op.h), int(op.w), int(op.mode), op.flags & P::kFlagPaddedOut, st),
                   "resample");
        break;
      case P::kConv: {
        int64_t ho = op.h, wo = op.w;
        if (op.mode == P::kDown0 || op.mode == P::kDown1) {
          ho = op.h / 2; wo = op.w / 2;
          check_cuda(launch_im2col_s2(slot(op.in), bstride(op.in), slot(op.scratch), T, n, int(op.cin), int(op.h),
                                 int(op.w), op.mode == P::kDown1 ? 1 : 0, st), "im2col");
        } else if (op.mode == P::kUp) {
          ho = op.h * 2; wo = op.w * 2;
        }
        for (const GGemm& cg : op.gemms) {
          GemmDev g = gemm_of(cg);
          g.out = slot(op.out); g.o_bstride = bstride(op.out); g.ocs = ho * wo;
          g.bias = op.bias.as<float>();
          if (op.temb >= 0) { g.temb = slot(op.temb); g.t_bstride = bstride(op.temb); }
          if (op.residual >= 0) { g.res = slot(op.residual); g.r_bstride = bstride(op.residual); }
          g.scale = op.scale;
          check_cuda(launch_gemm(g, prec, st), "conv GEMM");
        }
        break;
      }
      case P::kAttention: {
        const int64_t C = op.cin, L = op.h * op.w, heads = op.heads, d = C / heads;
        float* q = slot(op.scratch);  // per sample: q, k, v [3C, L]; o [C, L]; scores [heads, L, L]
        float* k = q + C * L;
        float* v = q + 2 * C * L;
        float* o = q + 3 * C * L;
        float* S = q + 4 * C * L;
        GemmDev g = gemm_of(op.gemms[0]);
        g.out = q; g.o_bstride = T; g.ocs = L;
        g.bias = op.bias.as<float>();
        check_cuda(launch_gemm(g, prec, st), "attention qkv GEMM");
        StridedGemm s;  // S_h [i, j] = scale * sum_c q[h*d + c][i] k[h*d + c][j]
        s.M = int(L); s.N = int(L); s.K = int(d);
        s.A = q; s.sam = 1; s.sak = L; s.a_outer = T; s.a_inner = d * L;
        s.B = k; s.sbk = L; s.sbn = 1; s.b_outer = T; s.b_inner = d * L;
        s.C = S; s.scm = L; s.c_outer = T; s.c_inner = L * L;
        s.alpha = float(1.0 / std::sqrt(double(d)));
        s.outer = n; s.inner = int(heads);
        check_cuda(launch_strided_gemm(s, st), "attention scores");
        check_cuda(launch_softmax_rows(S, T, int(heads * L), int(L), n, st), "softmax");
        StridedGemm pv;  // o[h*d + c][i] = sum_j v[h*d + c][j] P_h[i, j]
        pv.M = int(d); pv.N = int(L); pv.K = int(L);
        pv.A = v; pv.sam = L; pv.sak = 1; pv.a_outer = T; pv.a_inner = d * L;
        pv.B = S; pv.sbk = 1; pv.sbn = L; pv.b_outer = T; pv.b_inner = L * L;
        pv.C = o; pv.scm = L; pv.c_outer = T; pv.c_inner = d * L;
        pv.outer = n; pv.inner = int(heads);
        check_cuda(launch_strided_gemm(pv, st), "attention values");
        GemmDev pj = gemm_of(op.gemms[1]);  // out = scale * (Wo o + bo + residual)
        pj.out = slot(op.out); pj.o_bstride = bstride(op.out); pj.ocs = L;
        pj.bias = op.bias2.as<float>();
        pj.res = slot(op.residual); pj.r_bstride = bstride(op.residual);
        pj.scale = op.scale;
        check_cuda(launch_gemm(pj, prec, st), "attention out GEMM");
        break;
      }
      default: break;  // rejected at build
    }
  }
  if (timed) check_cuda(cudaEventRecord(prof_ev[index], st), "cudaEventRecord");
}

// One step of the loop on the engine's stream: t from the table, the U-Net, the fused step (x in
// place; with history, through the ring: loop_step), step += 1. Captured once as the step graph
// of its kind; run directly when profiling. Guided: the step covers the n = N / 2 samples, reads
// the model output's two halves and writes x_prev to both halves of x (the next forward's [x, x]).
void Engine::Impl::run_step_ops(bool timed, bool history, bool guided) {
  check_cuda(launch_loop_begin(state.as<LoopState>(), mt_tab.as<float>(), tvals.as<float>(), int(N), stream),
        "loop begin");
  forward_ops(stream, timed);
  StepParams p;
  p.batch = guided ? N / 2 : N;
  p.per_sample = in_c * H * W;
  const int64_t half = p.batch * p.per_sample;  // guided: where the null-class rows start
  check_status(loop_step(p, x.as<float>(), m.as<float>(), x.as<float>(), coef_tab.as<float>(),
                         ts_tab.as<uint32_t>(), state.as<LoopState>(), history ? ring.as<float>() : nullptr, stream,
                         guided ? m.as<float>() + half : nullptr, guided ? x.as<float>() + half : nullptr),
               "loop step");
  check_cuda(launch_loop_advance(state.as<LoopState>(), stream), "loop advance");
}

void Engine::Impl::capture(bool history, bool guided) {
  StepGraph& sg = graphs[graph_index(history, guided)];
  drop_graph(sg);
  if (history && !ring.bytes()) throw std::logic_error("the multistep step graph needs the history ring");
  check_cuda(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal), "cudaStreamBeginCapture");
  cudaError_t err = cudaSuccess;
  std::string what;
  try {
    run_step_ops(false, history, guided);
  } catch (const std::exception& e) {
    err = cudaErrorUnknown;
    what = e.what();
  }
  cudaGraph_t g = nullptr;
  const cudaError_t end = cudaStreamEndCapture(stream, &g);
  if (err != cudaSuccess || end != cudaSuccess) {
    if (g) cudaGraphDestroy(g);
    cudaGetLastError();
    throw CudaError("capturing the sampling step failed: " + (what.empty() ? cuda_text(end) : what));
  }
  sg.graph = g;
  const cudaError_t inst = cudaGraphInstantiate(&sg.exec, sg.graph, 0);
  if (inst != cudaSuccess) {
    sg.exec = nullptr;
    drop_graph(sg);
    cudaGetLastError();
    if (inst == cudaErrorMemoryAllocation)
      throw OutOfMemory("CUDA out of memory while instantiating the sampling graph (" + cuda_text(inst) + ")");
    check_cuda(inst, "cudaGraphInstantiate");
  }
  sg.nodes = 0;
  cudaGraphGetNodes(sg.graph, nullptr, &sg.nodes);
}

// ------------------------------------------------------------------------------- Engine

Engine::Engine(const PlanView& plan, const std::vector<WeightView>& weights, int64_t batch, int64_t in_c,
               int64_t out_c, int64_t height, int64_t width, Precision requested, int device,
               const CudaEngineOptions& options)
    : impl_(new Impl), precision_(requested), device_(device), batch_(batch) {
  if (batch < 1 || in_c < 1 || out_c < 1 || height < 1 || width < 1)
    fail("batch, channels, height and width must be positive");
  int count = 0;
  check_cuda(cudaGetDeviceCount(&count), "cudaGetDeviceCount");
  if (device < 0 || device >= count)
    fail("CUDA device " + std::to_string(device) + " out of range: " + std::to_string(count) + " device(s)");
  DeviceGuard guard(device);
  int major = 0;
  check_cuda(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device), "cudaDeviceGetAttribute");
  // What the device can do and what this build compiled for it: a build without sm_80+ code runs
  // on an Ampere / Hopper GPU from older PTX, whose tensor-core branches are empty (they trap).
  int arch = 0;
  check_cuda(gemm_compiled_arch(requested, &arch), "cudaFuncGetAttributes (is this GPU among the build's archs?)");
  const std::string built = " (this build's GEMM for the device was compiled from compute_" + std::to_string(arch) +
                            "; rebuild with FASTDDPM_CUDA_ARCHS naming the device's architecture)";
  if (requested == Precision::kBF16) {
    if (major < 8) fail("dtype bf16 needs a GPU of compute capability 8.0 or newer");
    if (arch < 80) fail("dtype bf16 needs sm_80+ code" + built);
  }
  if (requested == Precision::kF16) {
    if (major < 7) fail("dtype fp16 needs a GPU of compute capability 7.0 or newer");
    if (arch < 70) fail("dtype fp16 needs sm_70+ code" + built);
  }
  if (requested == Precision::kTF32 && (major < 8 || arch < 80)) precision_ = Precision::kF32;  // no tf32 cores
  Impl& e = *impl_;
  e.N = batch; e.in_c = in_c; e.out_c = out_c; e.H = height; e.W = width; e.prec = precision_;
  e.options = options;
  e.build(plan, weights);
}

Engine::~Engine() {
  if (!impl_) return;
  int prev = 0;
  const bool ok = cudaGetDevice(&prev) == cudaSuccess;
  if (ok && prev != device_) cudaSetDevice(device_);
  // other streams may still use the buffers (forward_device): wait for the last use, then the stream
  if (impl_->last_use) cudaEventSynchronize(impl_->last_use);
  if (impl_->stream) cudaStreamSynchronize(impl_->stream);
  impl_.reset();
  if (ok && prev != device_) cudaSetDevice(prev);
}

int64_t Engine::steps() const { return impl_->steps; }
int64_t Engine::class_dim() const { return impl_->class_dim; }
bool Engine::graph_captured() const {
  for (const Impl::StepGraph& g : impl_->graphs)
    if (g.exec) return true;
  return false;
}
int64_t Engine::graph_nodes() const {  // of the first captured step graph (in graphs' order)
  for (const Impl::StepGraph& g : impl_->graphs)
    if (g.exec) return int64_t(g.nodes);
  return 0;
}
int64_t Engine::device_bytes() const {
  const Impl& e = *impl_;
  int64_t b = int64_t(e.arena.bytes() + e.x.bytes() + e.m.bytes() + e.ws.bytes() + e.coef_tab.bytes() +
                      e.ts_tab.bytes() + e.mt_tab.bytes() + e.ring.bytes());
  for (const GOp& op : e.ops) {
    b += int64_t(op.wt.bytes() + op.bias.bytes() + op.gamma.bytes() + op.beta.bytes() + op.bias2.bytes());
    for (const GGemm& g : op.gemms) b += int64_t(g.A.bytes() + g.boff.bytes());
  }
  return b;
}

void Engine::forward_host(const float* x, const float* t, const float* class_emb, float* out) {
  if (!x || !t || !out) fail("null array pointer");
  for (int64_t n = 0; n < batch_; ++n)
    if (!std::isfinite(t[n])) fail("timestep must be finite");
  impl_->check_class_emb(class_emb);
  for (int64_t i = 0; class_emb && i < batch_ * impl_->class_dim; ++i)
    if (!std::isfinite(class_emb[i])) fail("class_emb must be finite");
  CallLock lock(mu_, "CUDA engine");
  DeviceGuard guard(device_);
  Impl& e = *impl_;
  const size_t in_b = size_t(e.N * e.in_c * e.H * e.W) * 4, out_b = size_t(e.N * e.out_c * e.H * e.W) * 4;
  e.after_last_use();
  check_cuda(cudaMemcpyAsync(e.x.as<float>(), x, in_b, cudaMemcpyHostToDevice, e.stream), "copy of the sample");
  check_cuda(cudaMemcpyAsync(e.tvals.as<float>(), t, size_t(e.N) * 4, cudaMemcpyHostToDevice, e.stream), "copy of t");
  e.copy_class(class_emb, cudaMemcpyHostToDevice, e.stream);
  e.forward_ops(e.stream, e.profiling);
  check_cuda(cudaMemcpyAsync(out, e.m.as<float>(), out_b, cudaMemcpyDeviceToHost, e.stream), "copy of the output");
  e.mark_last_use();
  e.wait_stream("U-Net forward");
  if (e.profiling) e.add_op_times();
}

void Engine::set_profiling(bool on) {
  CallLock lock(mu_, "CUDA engine");
  DeviceGuard guard(device_);
  Impl& e = *impl_;
  if (on && e.prof_ev.empty()) {
    e.prof_ev.assign(e.ops.size() + 1, nullptr);
    for (cudaEvent_t& ev : e.prof_ev) check_cuda(cudaEventCreate(&ev), "cudaEventCreate");
  }
  e.profiling = on;
  if (on) e.op_seconds.assign(e.ops.size(), 0.0);
}

std::vector<double> Engine::op_seconds() {
  CallLock lock(mu_, "CUDA engine");
  const Impl& e = *impl_;
  return e.op_seconds.empty() ? std::vector<double>(e.ops.size(), 0.0) : e.op_seconds;
}

void Engine::forward_device(const float* x, const float* t, const float* class_emb, float* out,
                            cudaStream_t stream) {
  if (!x || !t || !out) fail("null device pointer");
  impl_->check_class_emb(class_emb);
  CallLock lock(mu_, "CUDA engine");
  DeviceGuard guard(device_);
  Impl& e = *impl_;
  const size_t in_b = size_t(e.N * e.in_c * e.H * e.W) * 4, out_b = size_t(e.N * e.out_c * e.H * e.W) * 4;
  cudaStreamCaptureStatus capturing = cudaStreamCaptureStatusNone;
  check_cuda(cudaStreamIsCapturing(stream, &capturing), "cudaStreamIsCapturing");
  if (capturing == cudaStreamCaptureStatusInvalidated) fail("the caller's stream capture has been invalidated");
  const bool captured = capturing == cudaStreamCaptureStatusActive;
  // The caller's stream runs after whatever used the buffers last (another stream, the loop); in a
  // capture, as an external wait node, so the replay waits for the last use at its own time.
  check_cuda(cudaStreamWaitEvent(stream, e.last_use, captured ? cudaEventWaitExternal : 0), "cudaStreamWaitEvent");
  check_cuda(cudaMemcpyAsync(e.x.as<float>(), x, in_b, cudaMemcpyDeviceToDevice, stream), "copy of the sample");
  check_cuda(cudaMemcpyAsync(e.tvals.as<float>(), t, size_t(e.N) * 4, cudaMemcpyDeviceToDevice, stream), "copy of t");
  e.copy_class(class_emb, cudaMemcpyDeviceToDevice, stream);
  e.forward_ops(stream);
  check_cuda(cudaMemcpyAsync(out, e.m.as<float>(), out_b, cudaMemcpyDeviceToDevice, stream), "copy of the output");
  check_cuda(cudaEventRecordWithFlags(e.last_use, stream, captured ? cudaEventRecordExternal : 0), "cudaEventRecord");
}

void Engine::set_schedule(const float* coef, const int64_t* timesteps, const float* model_t, int64_t steps) {
  if (steps < 1) fail("the schedule needs at least one step");
  if (!coef || !timesteps) fail("null array pointer");
  if (steps > (int64_t(1) << 30)) fail("too many steps");
  std::vector<uint32_t> ts(static_cast<size_t>(steps));
  std::vector<float> mt(static_cast<size_t>(steps));
  for (int64_t s = 0; s < steps; ++s) {
    if (timesteps[s] < 0 || timesteps[s] >= int64_t(kInitialNoiseStep))
      fail("timestep " + std::to_string(timesteps[s]) + " is out of range");
    ts[size_t(s)] = uint32_t(timesteps[s]);
    mt[size_t(s)] = model_t ? model_t[s] : float(timesteps[s]);
    if (!std::isfinite(mt[size_t(s)])) fail("model timesteps must be finite");
    for (int j = 0; j < kCoefWidth; ++j)
      if (!std::isfinite(coef[s * kCoefWidth + j])) fail("coefficient table has a non-finite value");
    if (coef[s * kCoefWidth + kClip] < 0.0f) fail("clip range must be >= 0");
  }
  CallLock lock(mu_, "CUDA engine");
  DeviceGuard guard(device_);
  Impl& e = *impl_;
  e.after_last_use();  // the tables are only read by the loop, but keep every writer in one order
  e.wait_stream("cudaEventSynchronize");
  if (steps > e.cap) {  // new tables: new pointers, so the captured step is stale
    const int64_t cap = std::max<int64_t>(steps, 1024);
    DevBuf c(size_t(cap * kCoefWidth) * 4, "the coefficient table");
    DevBuf t(size_t(cap) * 4, "the timestep table");
    DevBuf mtb(size_t(cap) * 4, "the model time table");
    e.drop_graph();
    e.coef_tab = std::move(c);
    e.ts_tab = std::move(t);
    e.mt_tab = std::move(mtb);
    e.cap = cap;
  }
  check_cuda(cudaMemcpyAsync(e.coef_tab.as<float>(), coef, size_t(steps * kCoefWidth) * 4, cudaMemcpyHostToDevice,
                        e.stream), "coefficient upload");
  check_cuda(cudaMemcpyAsync(e.ts_tab.as<uint32_t>(), ts.data(), size_t(steps) * 4, cudaMemcpyHostToDevice, e.stream),
        "timestep upload");
  check_cuda(cudaMemcpyAsync(e.mt_tab.as<float>(), mt.data(), size_t(steps) * 4, cudaMemcpyHostToDevice, e.stream),
        "model time upload");
  e.wait_stream("schedule upload");
  e.steps = steps;
}

bool Engine::run(const RunArgs& a, const std::function<bool(int64_t)>& on_chunk) {
  Impl& e = *impl_;
  if (!a.x_out) fail("null array pointer");
  if (a.keep.size() != a.keep_out.size()) fail("keep and keep_out differ in length");
  e.check_class_emb(a.class_emb);
  for (int64_t i = 0; a.class_emb && i < batch_ * e.class_dim; ++i)
    if (!std::isfinite(a.class_emb[i])) fail("class_emb must be finite");
  if (a.guided) {
    if (e.class_dim == 0) fail("guidance needs a class-conditional plan");
    if (batch_ % 2) fail("a guided run needs an even engine batch (n conditional + n null rows), got " +
                         std::to_string(batch_));
    if (!std::isfinite(a.guidance)) fail("guidance must be finite");
  }
  const int64_t ns = a.guided ? batch_ / 2 : batch_;  // n: the samples the loop makes
  if (a.first_index < 0 || a.first_index + ns > (int64_t(1) << 32))
    fail("sample indices first_index + i must lie in [0, 2**32)");
  if (a.every < 0) fail("callback chunk must be >= 0");
  if (!std::isfinite(a.x_scale)) fail("x_scale must be finite");
  if (a.history < 0 || a.history > 2) fail("history must be 0, 1 or 2, got " + std::to_string(a.history));
  if (e.out_c != e.in_c) fail("sampling needs out_channels == in_channels");
  CallLock lock(mu_, "CUDA engine");
  if (e.steps < 1) fail("no schedule: call set_schedule first");
  const int64_t S = e.steps;
  for (size_t i = 0; i < a.keep.size(); ++i)
    if (a.keep[i] < 0 || a.keep[i] > S || !a.keep_out[i]) fail("bad trajectory position");
  DeviceGuard guard(device_);
  const int64_t per = e.in_c * e.H * e.W;
  const size_t frame_b = size_t(ns * per) * 4;  // the n samples' x
  // pinned (the D2H copies stay asynchronous) and kept between runs; no copy from an earlier run
  // is pending: every run ends on a wait for its stream
  float* frames = e.frames_host.get(frame_b * a.keep.size());
  float* xh = e.x_host.get(frame_b);
  // The history ring on the first multistep run (an OutOfMemory here leaves the engine as it was);
  // kept for the engine's life, so the multistep graph, captured after it, keeps a valid pointer.
  const bool history = a.history > 0;
  const bool new_ring = history && !e.ring.bytes();
  if (new_ring) e.ring = DevBuf(size_t(3 * e.N * per) * 4, "the multistep history ring (3 x0 buffers)");
  e.after_last_use();
  // If anything below throws, work may still be queued on the stream: make it the last use and
  // wait for it, so no other stream overlaps it and no pinned buffer is freed under a copy.
  struct DrainOnError {
    Impl& e;
    bool armed = true;
    ~DrainOnError() {
      if (!armed) return;
      cudaEventRecord(e.last_use, e.stream);
      cudaStreamSynchronize(e.stream);
      cudaGetLastError();
    }
  } drain{e};
  // zeroed once, so no byte of it is ever undefined (a run reads a slot only after writing it)
  if (new_ring) check_cuda(cudaMemsetAsync(e.ring.as<void>(), 0, e.ring.bytes(), e.stream), "cudaMemset");
  LoopState* st = reinterpret_cast<LoopState*>(e.state_host.f());
  st->seed = a.seed;
  st->first_index = uint32_t(a.first_index);
  st->step = 0;
  st->history = int32_t(a.history);
  st->guidance = a.guidance;
  check_cuda(cudaMemcpyAsync(e.state.as<LoopState>(), st, sizeof(LoopState), cudaMemcpyHostToDevice, e.stream),
        "copy of the loop state");
  e.copy_class(a.class_emb, cudaMemcpyHostToDevice, e.stream);
  Impl::StepGraph& sg = e.graphs[Impl::graph_index(history, a.guided)];
  if (!sg.exec) e.capture(history, a.guided);
  StepParams p;
  p.batch = ns;
  p.per_sample = per;
  p.noise_step = kInitialNoiseStep;
  check_status(loop_normals(p, e.x.as<float>(), e.state.as<LoopState>(), e.stream), "initial noise");
  if (a.x_scale != 1.0f)  // a scaled start (Euler's init_noise_sigma); 1 leaves the normals' bits
    check_cuda(launch_scale(e.x.as<float>(), ns * per, a.x_scale, e.stream), "x_T scale");
  if (a.guided)  // the null-class rows of the first forward; each step then writes both halves
    check_cuda(cudaMemcpyAsync(e.x.as<float>() + ns * per, e.x.as<float>(), frame_b, cudaMemcpyDeviceToDevice,
                               e.stream),
               "copy of x_T");
  auto keep_copy = [&](int64_t pos) {
    for (size_t i = 0; i < a.keep.size(); ++i)
      if (a.keep[i] == pos)
        check_cuda(cudaMemcpyAsync(frames + i * size_t(ns * per), e.x.as<float>(), frame_b, cudaMemcpyDeviceToHost,
                              e.stream), "trajectory copy");
  };
  keep_copy(0);
  // on_chunk at every `every` steps and the last; 0 = only the last (the caller then gets no
  // chance to cancel early: bindings pass a chunk so that Ctrl-C is honoured between chunks)
  const int64_t every = (a.every <= 0 || !on_chunk) ? S : a.every;
  int64_t pending = -1;  // the chunk boundary (step) whose event is recorded but not yet waited on
  int pending_ev = 0, next_ev = 0;
  bool cancelled = false;
  for (int64_t k = 1; k <= S; ++k) {
    if (e.profiling) {  // the captured step's work, op by op between timing events
      e.run_step_ops(true, history, a.guided);
      check_cuda(cudaEventSynchronize(e.prof_ev.back()), "sampling loop");
      e.add_op_times();
    } else {
      check_cuda(cudaGraphLaunch(sg.exec, e.stream), "cudaGraphLaunch");
    }
    keep_copy(k);
    if (k % every == 0 || k == S) {
      check_cuda(cudaEventRecord(e.ev[next_ev], e.stream), "cudaEventRecord");
      // the GPU has this chunk queued: now wait for the previous one and report it
      if (pending >= 0) {
        check_cuda(cudaEventSynchronize(e.ev[pending_ev]), "sampling loop");
        if (on_chunk && !on_chunk(pending)) { cancelled = true; break; }
      }
      pending = k;
      pending_ev = next_ev;
      next_ev ^= 1;
    }
  }
  if (!cancelled && pending >= 0) {
    check_cuda(cudaEventSynchronize(e.ev[pending_ev]), "sampling loop");
    if (on_chunk && !on_chunk(pending)) cancelled = true;
  }
  if (cancelled) {
    e.mark_last_use();
    drain.armed = false;
    e.wait_stream("sampling loop");
    return false;
  }
  check_cuda(cudaMemcpyAsync(xh, e.x.as<float>(), frame_b, cudaMemcpyDeviceToHost, e.stream), "copy of the sample");
  e.mark_last_use();
  drain.armed = false;
  e.wait_stream("sampling loop");
  std::memcpy(a.x_out, xh, frame_b);
  for (size_t i = 0; i < a.keep.size(); ++i) std::memcpy(a.keep_out[i], frames + i * size_t(ns * per), frame_b);
  return true;
}

}  // namespace cuda
}  // namespace fastddpm
