// The U-Net engine: a plan (fastddpm/plan.h) executed over one activation arena.
//
// Layout: the arena is sample-major, [N][T] floats; sample n's copy of slot s starts at
// n * T + slot_off[s] and is NCHW (padded tensors [C, H+2, W+2]). Every slot is followed by
// kSlack floats so the micro-kernel may read a full tile past the last valid column.
//
// Convolutions are implicit GEMMs, out[Cout, P] = A[Cout, K] * B[K, P], with A the weights packed
// once at creation ([Cout/MR][K][MR]) and B never materialised: row k of B is the input at a fixed
// offset boff[k] from the tile's first pixel. For a 3x3 stride-1 conv the pixels run over the
// padded grid (P = H * (W+2)): tap (ci, dy, dx) is offset ci*plane + dy*(W+2) + dx, and the two
// pad columns of each row are computed and dropped by the epilogue. The epilogue adds the bias,
// the time-embedding row, the residual, scales, and scatters to the output (stride 2 for the
// phases of the folded upsample). Stride-2 convs im2col into a scratch slot first.
//
// Class conditioning: on a class-conditional plan slot 2 holds each sample's class embedding,
// copied in by forward and run (no op writes it); time_embedding.linear_2 adds it (the LINEAR
// residual). A guided run (LoopArgs::guided) makes n = N / 2 samples: samples [0, n) hold the
// loop state, samples [n, 2n) get a copy of it before each forward (the null-class rows of
// [x, x]), and the fused step of sample i reads the model outputs of samples i and n + i.
#include "engine.h"


#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <exception>
#include <stdexcept>
#include <string>

#include "engine_kernels.h"
#include "engine_util.h"
#include "fastddpm/conv_lowering.h"
#include "fastddpm/plan.h"
#include "fastddpm/philox.h"
#include "fastddpm/step.h"
#include "step_cpu.h"
#include "winograd.h"

namespace fastddpm {
namespace cpu {

namespace P = fastddpm::plan;
using namespace engine_util;  // Buffer, alloc_floats, pack_a, parallel_for, round_up, MR

namespace {

constexpr int64_t kSlack = 128;   // floats after each slot: >= the widest micro-tile (32)
constexpr int64_t kAlign = 16;    // slot offsets in floats (64 bytes)
constexpr int64_t kMaxTileCols = 64;  // micro-tile columns (nr) of any ISA table: 32 today
constexpr int64_t kMaxWinogradScratch = int64_t(1) << 25;  // floats (128 MiB) per thread

[[noreturn]] void fail(const std::string& msg) { throw std::invalid_argument(msg); }

// One GEMM with its epilogue, over nbatch independent batch entries (samples).
struct GemmCall {
  int64_t M = 0, K = 0, Pn = 0;              // rows, reduction length, columns (pixels)
  const float* A = nullptr;                  // packed [ceil(M/MR)][K][MR]
  int64_t a_bstride = 0;
  const int64_t* boff = nullptr;             // B row offsets (or rows k * bld when null)
  int64_t bld = 0;
  const float* B = nullptr;
  int64_t b_bstride = 0;
  float* out = nullptr;
  int64_t o_bstride = 0, ocs = 0;            // per batch entry; per output row (channel)
  int64_t Wp = 1, Wv = 1, oys = 0, oxs = 1, ooff = 0;  // column p -> (p / Wp, p % Wp) -> pixel
  // B offset of column p: (p / Wp) * bwp + p % Wp when bwp > 0 (compact columns over a padded
  // plane: each vector of a tile is read from its own image row), else p
  int64_t bwp = 0;
  bool halves = false;  // compact columns in half-vectors (image rows of half the lanes)
  const float* bias = nullptr;               // [M]
  const float* temb = nullptr;               // [M] per batch entry
  int64_t t_bstride = 0;
  const float* res = nullptr;                // residual, mapped like out
  int64_t r_bstride = 0;
  float scale = 1.0f;
  int64_t nbatch = 1;
};

void run_gemm(const GemmCall& g, const EngineKernels& k, int threads) {
  const int64_t NR = k.nr;
  const int64_t Mb = (g.M + MR - 1) / MR, Pb = (g.Pn + NR - 1) / NR;
  // Task order (batch, m-group, p-block, m-block in group): a group's packed A panels (at most
  // kPanelBytes) stay in L2 while each B tile is reused across the group's m-blocks.
  constexpr int64_t kPanelBytes = 160 * 1024;
  const int64_t G = std::max<int64_t>(1, std::min<int64_t>(Mb, kPanelBytes / (g.K * MR * 4)));
  const int64_t Mg = (Mb + G - 1) / G;
  const int64_t tasks = g.nbatch * Mg * Pb * G;
  auto task = [&](int64_t t) {
    const int64_t gi = t % G, r0 = t / G, pb = r0 % Pb, r1 = r0 / Pb, mg = r1 % Mg, b = r1 / Mg;
    const int64_t mb = mg * G + gi;
    if (mb >= Mb) return;
    alignas(64) float tile[MR * kMaxTileCols];
    const float* A = g.A + b * g.a_bstride + mb * g.K * MR;
    const int rows_mb = int(std::min<int64_t>(MR, g.M - mb * MR));
    if (g.bwp > 0) {  // compact columns: Wp is a multiple of the (half-)vector, none straddles rows
      const int64_t seg = g.halves ? k.lanes / 2 : k.lanes;
      int64_t voff[kMaxTileCols / 2];
      for (int64_t v = 0; v * seg < NR; ++v) {
        const int64_t p = pb * NR + v * seg;
        voff[v] = (p / g.Wp) * g.bwp + p % g.Wp;
      }
      k.gemm_tile(g.K, A, g.boff, g.bld, g.B + b * g.b_bstride, tile, rows_mb, voff, g.halves);
    } else {
      k.gemm_tile(g.K, A, g.boff, g.bld, g.B + b * g.b_bstride + pb * NR, tile, rows_mb, nullptr, false);
    }
    // the tile's valid columns as runs of consecutive output pixels (a run breaks at a row end)
    const int64_t p0 = pb * NR, ncols = std::min(NR, g.Pn - p0);
    TileRuns runs;
    int64_t y = p0 / g.Wp, x = p0 % g.Wp;
    for (int64_t j = 0; j < ncols; x = 0, ++y) {  // one grid row segment at a time
      const int64_t seg = std::min(g.Wp - x, ncols - j), valid = std::min(g.Wv - x, seg);
      if (valid > 0) {
        const int64_t px = y * g.oys + x * g.oxs + g.ooff;
        const int l = runs.n - 1;
        if (runs.n && runs.j[l] + runs.len[l] == j && runs.pix[l] + runs.len[l] * g.oxs == px) {
          runs.len[l] += valid;
        } else {
          runs.j[runs.n] = j; runs.pix[runs.n] = px; runs.len[runs.n] = valid; ++runs.n;
        }
      }
      j += seg;
    }
    const int rows = int(std::min<int64_t>(MR, g.M - mb * MR));
    float add[MR];
    for (int m = 0; m < rows; ++m) {
      const int64_t mm = mb * MR + m;
      add[m] = (g.bias ? g.bias[mm] : 0.0f) + (g.temb ? g.temb[b * g.t_bstride + mm] : 0.0f);
    }
    TileEpilogue e;
    e.add = add;
    e.scale = g.scale;
    e.out = g.out + b * g.o_bstride + mb * MR * g.ocs;
    e.res = g.res ? g.res + b * g.r_bstride + mb * MR * g.ocs : nullptr;
    e.ocs = g.ocs;
    e.os = g.oxs;
    k.gemm_epilogue(tile, rows, runs, e);
  };
  parallel_for(tasks, threads, true, task);
}

// dst [h+2, w+2] = zero border around act(a * src + b), src [h, w]; act a plan::Act.
void affine_act_padded(const EngineKernels& k, const float* src, float* dst, int64_t h, int64_t w, float a,
                       float b, int act) {
  const int64_t Wp = w + 2;
  std::memset(dst, 0, size_t(Wp) * 4);
  std::memset(dst + (h + 1) * Wp, 0, size_t(Wp) * 4);
  for (int64_t y = 1; y <= h; ++y) dst[y * Wp] = dst[y * Wp + w + 1] = 0.0f;
  k.affine_act(src, w, dst + Wp + 1, Wp, h, w, a, b, act);
}

// dst [h/2+2, w/2+2] = zero border around the 2x2 average pooling of act(a * src + b), src [h, w]
// (h, w even); tmp: 2w floats.
void pool_act_padded(const EngineKernels& k, const float* src, float* dst, int64_t h, int64_t w, float a, float b,
                     int act, float* tmp) {
  const int64_t ho = h / 2, wo = w / 2, Wp = wo + 2;
  std::memset(dst, 0, size_t(Wp) * 4);
  std::memset(dst + (ho + 1) * Wp, 0, size_t(Wp) * 4);
  for (int64_t yo = 0; yo < ho; ++yo) {
    k.affine_act(src + 2 * yo * w, w, tmp, w, 2, w, a, b, act);  // input rows 2yo, 2yo + 1
    float* d = dst + (yo + 1) * Wp;
    d[0] = d[wo + 1] = 0.0f;
    for (int64_t xo = 0; xo < wo; ++xo)
      d[1 + xo] = 0.25f * (((tmp[2 * xo] + tmp[2 * xo + 1]) + tmp[w + 2 * xo]) + tmp[w + 2 * xo + 1]);
  }
}

// One head's projections folded (see the ATTENTION build): Wkq = Wk^T Wq, u = Wk^T bq,
// Wov = Wo Wv, bov = Wo bv + bo, all [C, C] / [C] with weights [out, in], summed in double.
struct FoldedAttention {
  std::vector<double> wkq, wov;
  std::vector<float> u, bov;
};

FoldedAttention fold_attention(const float* wq, const float* wk, const float* wv, const float* wo,
                               const std::vector<float>& bq, const std::vector<float>& bv,
                               const std::vector<float>& bo, int64_t C) {
  FoldedAttention f;
  f.wkq.assign(size_t(C * C), 0.0);
  f.wov.assign(size_t(C * C), 0.0);
  f.u.assign(size_t(C), 0.0f);
  f.bov.assign(size_t(C), 0.0f);
  for (int64_t a = 0; a < C; ++a) {
    double u = 0, b0 = bo[size_t(a)];
    for (int64_t e = 0; e < C; ++e) {
      u += double(wk[e * C + a]) * bq[size_t(e)];
      b0 += double(wo[a * C + e]) * bv[size_t(e)];
    }
    f.u[size_t(a)] = float(u);
    f.bov[size_t(a)] = float(b0);
    for (int64_t b = 0; b < C; ++b) {
      double s = 0, t = 0;
      for (int64_t e = 0; e < C; ++e) {
        s += double(wk[e * C + a]) * wq[e * C + b];
        t += double(wo[a * C + e]) * wv[e * C + b];
      }
      f.wkq[size_t(a * C + b)] = s;
      f.wov[size_t(a * C + b)] = t;
    }
  }
  return f;
}

// A conv as a GEMM over one sample; UP convs have four (one per output phase).
struct ConvGemm {
  Buffer A;                    // packed [ceil(M/MR)][K][MR]
  std::vector<int64_t> boff;   // relative to the sample's arena base
  int64_t K = 0;
  // cols.grid (CONV3, UP, the Winograd path's shortcut): the two pad columns of each row are
  // computed and dropped, unless the call runs compact
  P::GemmColumns cols;
};

struct Op : P::OpFields {
  std::vector<float> wt, bias, gamma, beta;   // LINEAR weight (TIME_EMB: a learned table); biases; norm affine
  std::vector<ConvGemm> gemms;                 // CONV: 1 or 4 (UP); ATTENTION: qkv, out
  Buffer wino_u2, wino_u4;                     // CONV3: Winograd weights, F(2x2) and F(4x4), or null
  std::vector<ConvGemm> wino_shortcut;         // CONV3 + in2 on the Winograd path: the 1x1 alone
  std::vector<float> bias2;                    // ATTENTION: out-projection bias
  bool folded = false;                         // ATTENTION: one head, projections folded (build)
};

}  // namespace

struct Engine::Impl {
  int64_t N, in_c, out_c, H, W;
  std::vector<int64_t> slot_off, slot_size;
  int64_t T = 0;          // per-sample arena floats
  int64_t pack_off = 0;   // engine-owned region for the attention operands
  int64_t scratch_need = 0;    // per-thread floats: a Winograd V operand, attention's St + Q block
  int64_t scratch_stride = 0;  // floats between two threads' blocks
  Buffer scratch;              // one block per thread of the largest call so far
  int scratch_threads = 0;
  int64_t pack_need = 0;  // per-sample floats of the attention pack region
  CpuEngineOptions options;
  Buffer arena;
  std::vector<Op> ops;
  std::vector<float> tvals;  // [N] timesteps of the current forward
  int64_t class_dim = 0;     // the class slot's width on a class-conditional plan, else 0
  Buffer ring;               // multistep history: 3 x [ring_rows, in_c * H * W] x0 buffers, or null
  int64_t ring_rows = 0;
  bool profiling = false;
  std::vector<double> op_seconds;  // [ops] accumulated while profiling

  // Samples [n0, n0 + n) of the arena: what one op call works on (all of them, or the one sample a
  // thread runs alone in the sample-parallel schedule).
  struct Samples {
    float* base;  // sample n0's arena
    int64_t n0, n;
  };
  float* slot(int64_t n, int64_t s) { return arena.get() + n * T + slot_off[s]; }
  // class_emb given exactly when the plan is class-conditional (then [N, class_dim] finite floats)
  void check_class_emb(const float* class_emb) const {
    if (class_dim > 0 && !class_emb)
      fail("this engine's plan is class-conditional: class_emb [" + std::to_string(N) + ", " +
           std::to_string(class_dim) + "] is required");
    if (class_dim == 0 && class_emb) fail("class_emb was given but this engine's plan has no class embedding");
    for (int64_t i = 0; i < N * class_dim; ++i)
      if (!std::isfinite(class_emb[i])) fail("class_emb must be finite");
  }
  // the class slot of every sample = its row of class_emb (nothing without a class slot)
  void fill_class(const float* class_emb) {
    for (int64_t n = 0; n < N && class_dim > 0; ++n)
      std::memcpy(slot(n, P::kClassSlot), class_emb + n * class_dim, size_t(class_dim) * 4);
  }
  float* slot(const Samples& b, int64_t n, int64_t s) { return b.base + n * T + slot_off[s]; }
  // `threads` blocks of scratch_stride floats, grown by forward_arena under the engine's lock
  // (never inside a parallel region); a chunk uses the block of its participant index (thread_pool.h).
  void grow_scratch(int threads) {
    if (scratch_threads < threads) {
      scratch = alloc_floats(scratch_stride * threads);
      scratch_threads = threads;
    }
  }
  float* this_thread_scratch() { return scratch.get() + int64_t(pool_thread_index()) * scratch_stride; }
  // How a grid conv over an image w wide runs its columns under kernels k: 0 over the padded grid,
  // 1 compact in whole vectors (w a multiple of the lanes), 2 compact in half-vectors.
  int compact_mode(int64_t w, const EngineKernels& k) const {
    if (!options.compact_grid) return 0;
    if (w % k.lanes == 0) return 1;
    return k.lanes >= 8 && w % (k.lanes / 2) == 0 ? 2 : 0;
  }

  // construction: the slots' offsets first (a GEMM's B rows are arena offsets), then one op at a
  // time (each adds what it needs to the scratch and pack regions), then the arena
  void build(const PlanView& pv, const std::vector<WeightView>& weights);
  void layout_slots(const PlanView& pv);
  void allocate_arena();
  Op build_op(const P::CheckedOp& c);
  void build_linear(Op& op, const P::CheckedOp& c);
  void build_groupnorm(Op& op, const P::CheckedOp& c);
  void build_conv(Op& op, const P::CheckedOp& c);
  void build_attention(Op& op, const P::CheckedOp& c);
  // A lowered conv GEMM (fastddpm/conv_lowering.h) with A packed and B rows as arena offsets.
  ConvGemm conv_gemm(const P::ConvGemmLowering& l) const;
  // Winograd weights of a CONV3 op (w [Cout, Cin, 3, 3]) or an UP op (w [4 Cout, Cin, 3, 3],
  // upsample_phase_weights) for each tile size some ISA's micro-tile width chooses (the choice is
  // made per call; without its weights a conv runs direct), unless the transformed input would
  // exceed kMaxWinogradScratch floats per thread.
  void add_winograd_weights(Op& op, const float* w);
  // The whole network over every sample: samples in whole multiples of the thread count run one
  // per thread, each op single-threaded (no data crosses cores and no op waits for another
  // thread); the rest run op by op with the threads sharing each op.
  void forward_arena(const EngineKernels& k, int threads);
  void forward_samples(const Samples& b, const EngineKernels& k, int threads);
  void op_time_emb(const Op& op, const Samples& b);
  void op_linear(const Op& op, const Samples& b, const EngineKernels& k, int threads);
  void op_pad(const Op& op, const Samples& b, const EngineKernels& k, int threads);
  void op_groupnorm(const Op& op, const Samples& b, const EngineKernels& k, int threads);
  void op_conv(const Op& op, const Samples& b, const EngineKernels& k, int threads);
  void op_resample(const Op& op, const Samples& b, int threads);
  void op_fir(const Op& op, const Samples& b, int threads);
  // 0 for the direct GEMM, else the Winograd tile size this conv runs with under kernels k
  int conv_path(const Op& op, const EngineKernels& k) const;
  void op_conv_winograd(const Op& op, const Samples& b, int m, const EngineKernels& k, int threads);
  // The GEMM of a conv's ConvGemm with the op's epilogue (bias, time embedding, residual, scale).
  // Grid columns run compact (only the image's own pixels) where the image width is a multiple
  // of the kernels' lanes, or of half of them (each vector then from two image rows): the pad
  // columns cost 1/9 of a 16x16 layer's multiply-adds, and a third of an 8x8 layer's on AVX-512.
  GemmCall conv_gemm_call(const Op& op, const Samples& b, const ConvGemm& cg, int64_t ocs, const EngineKernels& k);
  void op_attention(const Op& op, const Samples& b, const EngineKernels& k, int threads);
};

// ------------------------------------------------------------------------------- construction

void Engine::Impl::build(const PlanView& pv, const std::vector<WeightView>& weights) {
  const std::vector<P::CheckedOp> checked = P::check_plan(pv, weights, in_c, out_c, H, W, int64_t(1) << 34);
  class_dim = P::class_embedding_width(pv, checked);
  layout_slots(pv);
  for (const P::CheckedOp& c : checked) ops.push_back(build_op(c));
  allocate_arena();
}

void Engine::Impl::layout_slots(const PlanView& pv) {
  slot_size.assign(pv.slot_sizes, pv.slot_sizes + pv.n_slots);
  slot_off.resize(slot_size.size());
  int64_t off = 0;
  for (size_t s = 0; s < slot_size.size(); ++s) {  // every slot then its slack
    slot_off[s] = off;
    off += round_up(slot_size[s] + kSlack, kAlign);
  }
  pack_off = off;
}

void Engine::Impl::allocate_arena() {
  scratch_stride = round_up(scratch_need + kSlack, kAlign);
  T = pack_off + round_up(pack_need + kSlack, kAlign);  // the slots, then the attention pack region
  if (N > 0 && T > (int64_t(1) << 36) / N) fail("the activations of this plan and batch are too large");
  arena = alloc_floats(N * T);
  tvals.assign(size_t(N), 0.0f);
}

Op Engine::Impl::build_op(const P::CheckedOp& c) {
  Op op;
  static_cast<P::OpFields&>(op) = c;
  switch (op.code) {
    case P::kTimeEmb:  // a learned table [rows, dim] or Fourier frequencies [dim / 2]
      if (op.mode != P::kTimeSinusoidal) op.wt = P::weight_copy(c, P::kWeight);
      break;
    case P::kPad:
    case P::kResample:
    case P::kDivideByT:
      break;  // no weights
    case P::kLinear: build_linear(op, c); break;
    case P::kGroupNorm: build_groupnorm(op, c); break;
    case P::kConv: build_conv(op, c); break;
    case P::kAttention: build_attention(op, c); break;
    default:  // check_plan refuses unknown codes
      throw std::logic_error("plan_check.h and the engine disagree on op code " + std::to_string(op.code));
  }
  return op;
}

void Engine::Impl::build_linear(Op& op, const P::CheckedOp& c) {
  op.wt = P::weight_copy(c, P::kWeight);
  op.bias = P::weight_copy(c, P::kBias);
}

void Engine::Impl::build_groupnorm(Op& op, const P::CheckedOp& c) {
  op.gamma = P::weight_copy(c, P::kWeight);
  op.beta = P::weight_copy(c, P::kBias);
}

ConvGemm Engine::Impl::conv_gemm(const P::ConvGemmLowering& l) const {
  ConvGemm g;
  g.K = l.K;
  g.A = pack_a(l.M, l.K, [&](int64_t m, int64_t k) { return l.weights[size_t(m * l.K + k)]; });
  for (const P::BRow& r : l.rows) g.boff.push_back(slot_off[size_t(r.slot)] + r.offset);
  g.cols = l.columns;
  return g;
}

void Engine::Impl::build_conv(Op& op, const P::CheckedOp& c) {
  op.bias = P::conv_bias(c);
  for (const P::ConvGemmLowering& l : P::lower_conv(c)) op.gemms.push_back(conv_gemm(l));
  const float* w = P::checked_weight(c, P::kWeight).data;
  if (op.mode == P::kConv3) {
    // Winograd weights; direct stays a conv with both a shortcut and a residual (the plan never
    // emits one)
    if (!(op.in2 >= 0 && op.residual >= 0)) add_winograd_weights(op, w);
    // on the Winograd path the shortcut is its own GEMM, added after
    if (op.in2 >= 0 && (op.wino_u2 || op.wino_u4)) op.wino_shortcut.push_back(conv_gemm(P::lower_shortcut(c)));
  } else if (op.mode == P::kUp) {
    // or all four phases as one Winograd conv at the input's resolution with 4 Cout rows
    add_winograd_weights(op, P::upsample_phase_weights(w, op.cout, op.cin).data());
  }
}

void Engine::Impl::build_attention(Op& op, const P::CheckedOp& c) {
  const int64_t C = op.cin, L = op.h * op.w, d = C / op.heads;
  const float* wq = P::checked_weight(c, P::kToQ).data;
  const float* wk = P::checked_weight(c, P::kToK).data;
  const float* wv = P::checked_weight(c, P::kToV).data;
  const float* wo = P::checked_weight(c, P::kToOut).data;
  op.bias2 = P::weight_copy(c, P::kToOutBias);
  ConvGemm in_proj, proj;
  in_proj.K = proj.K = C;
  if (op.heads == 1) {
    // One head: fold the projections into the weights (in double). With x the normed input,
    // q = Wq x + bq, k = Wk x + bk, v = Wv x + bv:
    //   k_i . q_j = x_i . (Wk^T Wq x_j + Wk^T bq) + (terms constant over the keys i, which the
    //   softmax over i cancels), so the engine computes T = Wkq x + u (Wkq = Wk^T Wq,
    //   u = Wk^T bq) and scores x^T T: one C x C projection instead of two;
    //   Wo (V P) + bo = (Wo Wv)(x P) + (Wo bv + bo), P's columns summing to 1: one more.
    op.folded = true;
    const FoldedAttention f = fold_attention(wq, wk, wv, wo, P::weight_copy(c, P::kToQBias),
                                             P::weight_copy(c, P::kToVBias), op.bias2, C);
    op.bias = f.u;
    op.bias2 = f.bov;
    in_proj.A = pack_a(C, C, [&](int64_t m, int64_t kk) { return float(f.wkq[size_t(m * C + kk)]); });
    proj.A = pack_a(C, C, [&](int64_t m, int64_t kk) { return float(f.wov[size_t(m * C + kk)]); });
  } else {
    // [3C, C]: q, k, v stacked
    in_proj.A = pack_a(3 * C, C, [&](int64_t m, int64_t kk) {
      const float* src = m < C ? wq : (m < 2 * C ? wk : wv);
      return src[(m % C) * C + kk];
    });
    for (int role : {P::kToQBias, P::kToKBias, P::kToVBias}) {  // [3C]
      const auto b = P::weight_copy(c, role);
      op.bias.insert(op.bias.end(), b.begin(), b.end());
    }
    proj.A = pack_a(C, C, [&](int64_t m, int64_t kk) { return wo[m * C + kk]; });
  }
  op.gemms.push_back(std::move(in_proj));
  op.gemms.push_back(std::move(proj));
  // packed K^T [ceil(L/MR)][d][MR] and V [ceil(d/MR)][L][MR] of every head
  pack_need = std::max(pack_need, op.heads * (round_up(L, MR) * d + round_up(d, MR) * L));
  // a thread's St [round_up(L, MR), nr] and Q block [d, nr], nr <= kMaxTileCols
  scratch_need = std::max(scratch_need, (round_up(L, MR) + d) * kMaxTileCols);
}

void Engine::Impl::add_winograd_weights(Op& op, const float* w) {
  const int64_t ci = op.cin;
  const bool up = op.mode == P::kUp;
  const int64_t rows = (up ? 4 : 1) * op.cout;
  for (const EngineKernels* t : {&kGenericEngineKernels, &kAvx2EngineKernels, &kAvx512EngineKernels}) {
    const int m = winograd_choice(ci, rows, op.h, op.w, t->nr, options.winograd_max_m, up,
                                  compact_mode(op.w, *t) != 0, options.winograd_force);
    Buffer& u = m == 2 ? op.wino_u2 : op.wino_u4;
    if (!m || u || winograd_scratch_floats(m, ci, op.h, op.w) > kMaxWinogradScratch) continue;
    u = winograd_weights(m, w, rows, ci);
    scratch_need = std::max(scratch_need, winograd_scratch_floats(m, ci, op.h, op.w));
  }
}

// ------------------------------------------------------------------------------- ops

void Engine::Impl::op_time_emb(const Op& op, const Samples& b) {
  const int64_t dim = op.cout, half = dim / 2;
  if (op.mode == P::kTimeLearned) {  // row t of the table (nn.Embedding): t an integer in [0, rows)
    const int64_t rows = int64_t(op.wt.size()) / dim;
    for (int64_t n = 0; n < b.n; ++n) {
      const float t = tvals[size_t(b.n0 + n)];
      if (!(t >= 0.0f && t < float(rows) && t == std::floor(t)))
        throw std::invalid_argument("a learned time embedding takes integer timesteps in [0, " +
                                    std::to_string(rows) + "), got " + std::to_string(t));
      std::memcpy(slot(b, n, op.out), op.wt.data() + int64_t(t) * dim, size_t(dim) * 4);
    }
    return;
  }
  if (op.mode == P::kTimeFourier) {  // [sin, cos](2 pi W ln t), the argument in double
    for (int64_t n = 0; n < b.n; ++n) {
      const float t = tvals[size_t(b.n0 + n)];
      if (!(t > 0.0f)) throw std::invalid_argument("a Fourier time embedding takes timesteps > 0, got " + std::to_string(t));
      float* e = slot(b, n, op.out);
      const double lt = std::log(double(t));
      for (int64_t k = 0; k < half; ++k) {
        const double arg = lt * double(op.wt[size_t(k)]) * 2.0 * 3.14159265358979323846;
        e[k] = float(std::sin(arg));
        e[half + k] = float(std::cos(arg));
      }
    }
    return;
  }
  // as torch computes it in float32: freqs = exp(-ln(1e4) * k / (half - shift)); arg = t * freqs
  const float lnmax = -float(std::log(10000.0));
  const float div = float(half) - op.shift;
  for (int64_t n = 0; n < b.n; ++n) {
    float* e = slot(b, n, op.out);  // e: [dim]
    for (int64_t k = 0; k < half; ++k) {
      const float ex = (lnmax * float(k)) / div;
      const float freq = float(std::exp(double(ex)));
      const float arg = tvals[size_t(b.n0 + n)] * freq;
      const float s = float(std::sin(double(arg))), c = float(std::cos(double(arg)));
      e[k] = (op.flags & P::kFlagFlip) ? c : s;
      e[half + k] = (op.flags & P::kFlagFlip) ? s : c;
    }
    if (dim % 2) e[dim - 1] = 0.0f;
  }
}

void Engine::Impl::op_linear(const Op& op, const Samples& b, const EngineKernels& k, int threads) {
  const int64_t ci = op.cin, co = op.cout;
  std::vector<float> act(size_t(b.n * ci));  // act: [b.n, Cin] the (SiLU'd) input
  for (int64_t n = 0; n < b.n; ++n) {
    const float* x = slot(b, n, op.in);
    if (const int a = P::act_of(op.flags)) k.affine_act(x, ci, act.data() + n * ci, ci, 1, ci, 1.0f, 0.0f, a);
    else std::memcpy(act.data() + n * ci, x, size_t(ci) * 4);
  }
  parallel_for(b.n * co, threads, b.n * co * ci >= (1 << 16), [&](int64_t t) {
    const int64_t n = t / co, o = t % co;
    float v = k.dot(op.wt.data() + o * ci, act.data() + n * ci, ci) + op.bias[size_t(o)];
    if (op.residual >= 0) v += slot(b, n, op.residual)[o];  // the class embedding (plan.py LINEAR)
    slot(b, n, op.out)[o] = v;
  });
}

void Engine::Impl::op_pad(const Op& op, const Samples& b, const EngineKernels& k, int threads) {
  const int64_t C = op.cin + op.cin2, h = op.h, w = op.w, Wp = w + 2, plane = (h + 2) * Wp;
  parallel_for(b.n * C, threads, b.n * C * plane >= (1 << 14), [&](int64_t t) {
    const int64_t n = t / C, c = t % C;
    const float* src = c < op.cin ? slot(b, n, op.in) + c * h * w : slot(b, n, op.in2) + (c - op.cin) * h * w;
    affine_act_padded(k, src, slot(b, n, op.out) + c * plane, h, w, op.a, op.shift, P::kActNone);
  });
}

void Engine::Impl::op_groupnorm(const Op& op, const Samples& b, const EngineKernels& k, int threads) {
  const int64_t C = op.cin + op.cin2, G = op.groups, cpg = C / G, h = op.h, w = op.w, hw = h * w;
  const bool padded = op.flags & P::kFlagPaddedOut, pooled = op.mode == P::kResamplePool;
  const int act = P::act_of(op.flags);
  const int64_t pooled_plane = (h / 2 + 2) * (w / 2 + 2);
  const int64_t Wp = w + 2, plane = (h + 2) * Wp;
  parallel_for(b.n * G, threads, b.n * C * hw >= (1 << 13), [&](int64_t t) {
    const int64_t n = t / G, g = t % G;
    auto chan = [&](int64_t c) {
      return c < op.cin ? slot(b, n, op.in) + c * hw : slot(b, n, op.in2) + (c - op.cin) * hw;
    };
    const double count = double(cpg * hw);
    double s = 0;
    for (int64_t c = g * cpg; c < (g + 1) * cpg; ++c) s += k.sum(chan(c), hw);
    const float mean = float(s / count);
    double v = 0;
    for (int64_t c = g * cpg; c < (g + 1) * cpg; ++c) v += k.sum_sq_dev(chan(c), hw, mean);
    const float rstd = float(1.0 / std::sqrt(v / count + double(op.eps)));
    // scale_shift (temb = [scale C, shift C] of the sample): y (1 + scale) + shift folds into
    // the affine
    const float* ss = op.temb >= 0 ? slot(b, n, op.temb) : nullptr;
    std::vector<float> tmp(pooled ? size_t(2 * w) : 0);
    for (int64_t c = g * cpg; c < (g + 1) * cpg; ++c) {
      float a = rstd * op.gamma[size_t(c)], sh = op.beta[size_t(c)] - mean * a;
      if (ss) {
        const float s1 = 1.0f + ss[c];
        a *= s1;
        sh = sh * s1 + ss[C + c];
      }
      const float* src = chan(c);
      if (pooled) pool_act_padded(k, src, slot(b, n, op.out) + c * pooled_plane, h, w, a, sh, act, tmp.data());
      else if (padded) affine_act_padded(k, src, slot(b, n, op.out) + c * plane, h, w, a, sh, act);
      else k.affine_act(src, hw, slot(b, n, op.out) + c * hw, hw, 1, hw, a, sh, act);
    }
  });
}

// out = avg-pool 2x2, nearest x2 or FIR down / up of in, per channel (padded: a zero border around it)
void Engine::Impl::op_resample(const Op& op, const Samples& b, int threads) {
  if (op.mode == P::kResampleFirDown || op.mode == P::kResampleFirUp) return op_fir(op, b, threads);
  const bool padded = op.flags & P::kFlagPaddedOut, pool = op.mode == P::kResamplePool;
  const int64_t C = op.cin, h = op.h, w = op.w, ho = pool ? h / 2 : 2 * h, wo = pool ? w / 2 : 2 * w;
  const int64_t Wp = padded ? wo + 2 : wo, plane = padded ? (ho + 2) * Wp : ho * wo, o0 = padded ? Wp + 1 : 0;
  parallel_for(b.n * C, threads, b.n * C * ho * wo >= (1 << 14), [&](int64_t t) {
    const int64_t n = t / C, c = t % C;
    const float* src = slot(b, n, op.in) + c * h * w;
    float* dst = slot(b, n, op.out) + c * plane;
    if (padded) std::memset(dst, 0, size_t(plane) * 4);
    for (int64_t y = 0; y < ho; ++y) {
      float* d = dst + o0 + y * Wp;
      if (pool) {
        const float *r0 = src + 2 * y * w, *r1 = r0 + w;
        for (int64_t x = 0; x < wo; ++x)
          d[x] = 0.25f * (((r0[2 * x] + r0[2 * x + 1]) + r1[2 * x]) + r1[2 * x + 1]);
      } else {
        const float* r = src + (y / 2) * w;
        for (int64_t x = 0; x < wo; ++x) d[x] = r[x / 2];
      }
    }
  });
}

// score-SDE's FIR resampling: separable, so a row pass (into a per-task [h, wo] buffer) then a
// column pass; a fixed tap order, so every thread count gives the same bits
void Engine::Impl::op_fir(const Op& op, const Samples& b, int threads) {
  const bool padded = op.flags & P::kFlagPaddedOut, up = op.mode == P::kResampleFirUp;
  const int64_t C = op.cin, h = op.h, w = op.w, ho = up ? 2 * h : h / 2, wo = up ? 2 * w : w / 2;
  const int64_t Wp = padded ? wo + 2 : wo, plane = padded ? (ho + 2) * Wp : ho * wo, o0 = padded ? Wp + 1 : 0;
  std::vector<P::FirTaps> xt(static_cast<size_t>(wo)), yt(static_cast<size_t>(ho));
  for (int64_t x = 0; x < wo; ++x) xt[size_t(x)] = P::fir_taps(up, x, w);
  for (int64_t y = 0; y < ho; ++y) yt[size_t(y)] = P::fir_taps(up, y, h);
  parallel_for(b.n * C, threads, b.n * C * ho * wo >= (1 << 14), [&](int64_t t) {
    const int64_t n = t / C, c = t % C;
    const float* src = slot(b, n, op.in) + c * h * w;
    float* dst = slot(b, n, op.out) + c * plane;
    std::vector<float> rows(static_cast<size_t>(h * wo));   // [h, wo]: each input row filtered along x
    for (int64_t y = 0; y < h; ++y)
      for (int64_t x = 0; x < wo; ++x) {
        const P::FirTaps& k = xt[size_t(x)];
        float s = 0.0f;
        for (int j = 0; j < k.count; ++j) s += k.weight[j] * src[y * w + k.index[j]];
        rows[size_t(y * wo + x)] = s;
      }
    if (padded) std::memset(dst, 0, size_t(plane) * 4);
    for (int64_t y = 0; y < ho; ++y) {
      const P::FirTaps& k = yt[size_t(y)];
      float* d = dst + o0 + y * Wp;
      for (int64_t x = 0; x < wo; ++x) {
        float s = 0.0f;
        for (int j = 0; j < k.count; ++j) s += k.weight[j] * rows[size_t(k.index[j] * wo + x)];
        d[x] = s;
      }
    }
  });
}

void Engine::Impl::op_conv(const Op& op, const Samples& b, const EngineKernels& k, int threads) {
  int64_t ho = op.h, wo = op.w;
  if (op.mode == P::kDown0 || op.mode == P::kDown1) {
    ho = op.h / 2; wo = op.w / 2;
    // im2col: col[(c*3 + dy)*3 + dx][yo, xo] = in[c][2yo + dy - pad][2xo + dx - pad] (0 outside)
    const int64_t pad = op.mode == P::kDown1 ? 1 : 0, h = op.h, w = op.w, C = op.cin;
    parallel_for(b.n * C, threads, b.n * C * 9 * ho * wo >= (1 << 14), [&](int64_t t) {
      const int64_t n = t / C, c = t % C;
      const float* src = slot(b, n, op.in) + c * h * w;
      float* col = slot(b, n, op.scratch) + c * 9 * ho * wo;
      for (int dy = 0; dy < 3; ++dy)
        for (int dx = 0; dx < 3; ++dx) {
          float* row = col + (dy * 3 + dx) * ho * wo;
          for (int64_t yo = 0; yo < ho; ++yo) {
            const int64_t y = 2 * yo + dy - pad;
            for (int64_t xo = 0; xo < wo; ++xo) {
              const int64_t x = 2 * xo + dx - pad;
              row[yo * wo + xo] = (y >= 0 && y < h && x >= 0 && x < w) ? src[y * w + x] : 0.0f;
            }
          }
        }
    });
  } else if (const int m = conv_path(op, k)) {  // CONV3 or UP on the Winograd path
    op_conv_winograd(op, b, m, k, threads);
    return;
  } else if (op.mode == P::kUp) {
    ho = op.h * 2; wo = op.w * 2;
  }
  for (const ConvGemm& cg : op.gemms) run_gemm(conv_gemm_call(op, b, cg, ho * wo, k), k, threads);
}

GemmCall Engine::Impl::conv_gemm_call(const Op& op, const Samples& b, const ConvGemm& cg, int64_t ocs,
                                      const EngineKernels& k) {
  GemmCall g;
  g.M = op.cout; g.K = cg.K; g.Pn = cg.cols.Pn;
  g.A = cg.A.get();
  g.boff = cg.boff.data();
  g.B = b.base;  // boff is relative to the sample base (main input and shortcut rows)
  g.b_bstride = T;
  g.out = b.base + slot_off[size_t(op.out)];
  g.o_bstride = T;
  g.ocs = ocs;
  g.Wp = cg.cols.Wp; g.Wv = cg.cols.Wv; g.oys = cg.cols.oys; g.oxs = cg.cols.oxs; g.ooff = cg.cols.ooff;
  const int compact = cg.cols.grid ? compact_mode(cg.cols.Wv, k) : 0;
  if (compact) {
    g.Pn = cg.cols.Pn / cg.cols.Wp * cg.cols.Wv;
    g.Wp = cg.cols.Wv;
    g.bwp = cg.cols.Wp;
    g.halves = compact == 2;
  }
  g.bias = op.bias.data();
  if (op.temb >= 0) { g.temb = b.base + slot_off[size_t(op.temb)]; g.t_bstride = T; }
  if (op.residual >= 0) { g.res = b.base + slot_off[size_t(op.residual)]; g.r_bstride = T; }
  g.scale = op.scale;
  g.nbatch = b.n;
  return g;
}

int Engine::Impl::conv_path(const Op& op, const EngineKernels& k) const {
  if (op.code != P::kConv || (op.mode != P::kConv3 && op.mode != P::kUp)) return 0;
  const bool up = op.mode == P::kUp;
  const int m = winograd_choice(op.cin, (up ? 4 : 1) * op.cout, op.h, op.w, k.nr, options.winograd_max_m, up,
                                compact_mode(op.w, k) != 0, options.winograd_force);
  return (m == 2 && op.wino_u2) || (m == 4 && op.wino_u4) ? m : 0;
}

void Engine::Impl::op_conv_winograd(const Op& op, const Samples& b, int m, const EngineKernels& k, int threads) {
  float* base = b.base;
  const bool shortcut = !op.wino_shortcut.empty();
  WinogradCall c;
  c.m = m;
  c.up = op.mode == P::kUp;
  c.N = b.n; c.cin = op.cin; c.cout = (c.up ? 4 : 1) * op.cout; c.cout_out = op.cout; c.h = op.h; c.w = op.w;
  c.U = (m == 2 ? op.wino_u2 : op.wino_u4).get();
  c.in = base + slot_off[size_t(op.in)]; c.in_bs = T;
  c.V = this_thread_scratch();
  c.out = base + slot_off[size_t(op.out)]; c.o_bs = T;
  c.bias = op.bias.data();
  if (op.temb >= 0) { c.temb = base + slot_off[size_t(op.temb)]; c.t_bs = T; }
  if (op.residual >= 0) { c.res = base + slot_off[size_t(op.residual)]; c.r_bs = T; }
  c.scale = shortcut ? 1.0f : op.scale;  // with a shortcut, the scale comes after its GEMM
  winograd_conv(c, k, threads);
  if (!shortcut) return;
  // out = scale * (shortcut(in2) + out): bias and time embedding are in already, and the Winograd
  // result is the residual of the 1x1 GEMM (the plan gives such a conv no residual of its own)
  GemmCall g = conv_gemm_call(op, b, op.wino_shortcut[0], op.h * op.w, k);
  g.bias = nullptr;
  g.temb = nullptr;
  g.res = g.out; g.r_bstride = T;
  run_gemm(g, k, threads);
}

void Engine::Impl::op_attention(const Op& op, const Samples& b, const EngineKernels& k, int threads) {
  const int64_t C = op.cin, L = op.h * op.w, heads = op.heads, d = C / heads;
  const int64_t q_off = slot_off[size_t(op.scratch)], o_off = q_off + 3 * C * L;
  float* base = b.base;
  // q, k, v: [3C, L] = Wqkv [3C, C] * x_normed [C, L] + b; folded (one head): T [C, L] = Wkq x + u
  // in q's place, and x itself serves as keys and values
  {
    GemmCall g;
    g.M = op.folded ? C : 3 * C; g.K = C; g.Pn = L;
    g.A = op.gemms[0].A.get();
    g.bld = L; g.B = base + slot_off[size_t(op.in)]; g.b_bstride = T;
    g.out = base + q_off; g.o_bstride = T; g.ocs = L;
    g.Wp = L; g.Wv = L;
    g.bias = op.bias.data();
    g.nbatch = b.n;
    run_gemm(g, k, threads);
  }
  // pack per head: Kt [ceil(L/MR)][d][MR] (rows = keys) and V [ceil(d/MR)][L][MR], one task per
  // MR-row block of either (batch 1 has one head: a task per head left the other threads idle)
  const int64_t kt_size = round_up(L, MR) * d, v_size = round_up(d, MR) * L;
  const int64_t kblocks = round_up(L, MR) / MR, vblocks = round_up(d, MR) / MR;
  parallel_for(b.n * heads * (kblocks + vblocks), threads, b.n * C * L >= (1 << 14), [&](int64_t t) {
    const int64_t blk = t % (kblocks + vblocks), r = t / (kblocks + vblocks), hd = r % heads, n = r / heads;
    const float* x = base + n * T + slot_off[size_t(op.in)];
    float* kt = base + n * T + pack_off + hd * (kt_size + v_size);
    if (blk < kblocks) {
      const float* kk = op.folded ? x : base + n * T + q_off + (C + hd * d) * L;  // K_h: [d, L]
      for (int64_t c = 0; c < d; ++c)
        for (int m = 0; m < MR; ++m) {
          const int64_t j = blk * MR + m;
          kt[(blk * d + c) * MR + m] = j < L ? kk[c * L + j] : 0.0f;
        }
    } else {
      const int64_t cb = blk - kblocks;
      const float* vv = op.folded ? x : base + n * T + q_off + (2 * C + hd * d) * L;  // V_h: [d, L]
      float* vp = kt + kt_size;
      for (int64_t j = 0; j < L; ++j)
        for (int m = 0; m < MR; ++m) {
          const int64_t c = cb * MR + m;
          vp[(cb * L + j) * MR + m] = c < d ? vv[c * L + j] : 0.0f;
        }
    }
  });
  // Per (sample, head, block of nr queries), in this thread's scratch: St [L keys, nr] = K_h^T Q_blk,
  // softmax down each column, O_blk [d, nr] = V_h P: S never leaves L1/L2 and P is read as a
  // contiguous B operand.
  const int64_t nr = k.nr, qblocks = (L + nr - 1) / nr;
  const float sm_scale = float(1.0 / std::sqrt(double(d)));
  parallel_for(b.n * heads * qblocks, threads, true, [&](int64_t t) {
    const int64_t qb = t % qblocks, r = t / qblocks, hd = r % heads, n = r / heads;
    const int64_t j0 = qb * nr, ncols = std::min(nr, L - j0);
    float* St = this_thread_scratch();                                      // [round_up(L, MR)][nr]
    float* Qb = St + round_up(L, MR) * nr;                                   // [d][nr]
    const float* q = base + n * T + q_off + hd * d * L + j0;                 // Q_h: [d, L]
    for (int64_t c = 0; c < d; ++c) {
      std::memcpy(Qb + c * nr, q + c * L, size_t(ncols) * 4);
      std::fill(Qb + c * nr + ncols, Qb + (c + 1) * nr, 0.0f);
    }
    const float* kt = base + n * T + pack_off + hd * (kt_size + v_size);
    for (int64_t mb = 0; mb < round_up(L, MR) / MR; ++mb)
      k.gemm_tile(d, kt + mb * d * MR, nullptr, nr, Qb, St + mb * MR * nr, int(std::min<int64_t>(MR, L - mb * MR)),
                  nullptr, false);
    k.softmax_cols(St, L, nr, 0, ncols, sm_scale);
    float* o = base + n * T + o_off + hd * d * L + j0;  // O_h: [d, L]
    alignas(64) float tile[MR * kMaxTileCols];
    for (int64_t cb = 0; cb < round_up(d, MR) / MR; ++cb) {
      k.gemm_tile(L, kt + kt_size + cb * L * MR, nullptr, nr, St, tile, int(std::min<int64_t>(MR, d - cb * MR)),
                  nullptr, false);
      for (int m = 0; m < MR && cb * MR + m < d; ++m)
        std::memcpy(o + (cb * MR + m) * L, tile + m * nr, size_t(ncols) * 4);
    }
  });
  {
    // out = scale * (Wo O + bo + x); folded: O holds x P, and Wo, bo are Wo Wv, Wo bv + bo
    GemmCall g;
    g.M = C; g.K = C; g.Pn = L;
    g.A = op.gemms[1].A.get();
    g.bld = L; g.B = base + o_off; g.b_bstride = T;
    g.out = base + slot_off[size_t(op.out)]; g.o_bstride = T; g.ocs = L;
    g.Wp = L; g.Wv = L;
    g.bias = op.bias2.data();
    g.res = base + slot_off[size_t(op.residual)]; g.r_bstride = T;
    g.scale = op.scale;
    g.nbatch = b.n;
    run_gemm(g, k, threads);
  }
}

void Engine::Impl::forward_samples(const Samples& b, const EngineKernels& k, int threads) {
  // per-op times only where one call covers the batch (the sample-parallel schedule's threads
  // would add up their overlapping times)
  const bool timed = profiling && b.n == N;
  for (size_t i = 0; i < ops.size(); ++i) {
    const Op& op = ops[i];
    const auto t0 = timed ? std::chrono::steady_clock::now() : std::chrono::steady_clock::time_point{};
    switch (op.code) {
      case P::kTimeEmb: op_time_emb(op, b); break;
      case P::kLinear: op_linear(op, b, k, threads); break;
      case P::kPad: op_pad(op, b, k, threads); break;
      case P::kGroupNorm: op_groupnorm(op, b, k, threads); break;
      case P::kConv: op_conv(op, b, k, threads); break;
      case P::kAttention: op_attention(op, b, k, threads); break;
      case P::kResample: op_resample(op, b, threads); break;
      case P::kDivideByT:
        for (int64_t n = 0; n < b.n; ++n) {  // out = in / t (a Fourier model's output)
          const float* src = slot(b, n, op.in);
          float* dst = slot(b, n, op.out);
          const float t = tvals[size_t(b.n0 + n)];
          for (int64_t i = 0; i < op.cin * op.h * op.w; ++i) dst[i] = src[i] / t;
        }
        break;
      default: break;  // rejected at build
    }
    if (timed) op_seconds[i] += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  }
}

void Engine::Impl::forward_arena(const EngineKernels& k, int threads) {
  grow_scratch(threads);
  // Every sample's arithmetic is the same whichever schedule runs it (no reduction spans samples
  // or depends on the thread count), so results stay bit-identical across batch sizes.
  const int64_t whole = (threads > 1 && options.sample_parallel) ? N / threads * threads : 0;
  if (whole > 0) {  // one sample per chunk: a thread that runs takes the samples of one that does not
    auto one = [&](int64_t n) { forward_samples(Samples{arena.get() + n * T, n, 1}, k, 1); };
    pool_for(whole, 1, threads, one);
  }
  if (whole < N) forward_samples(Samples{arena.get() + whole * T, whole, N - whole}, k, threads);
}

// ------------------------------------------------------------------------------- Engine

Engine::Engine(const PlanView& plan, const std::vector<WeightView>& weights, int64_t batch, int64_t in_c,
               int64_t out_c, int64_t height, int64_t width, const CpuEngineOptions& options)
    : impl_(new Impl), batch_(batch) {
  if (batch < 1 || in_c < 1 || out_c < 1 || height < 1 || width < 1)
    fail("batch, channels, height and width must be positive");
  if (options.winograd_max_m != 0 && options.winograd_max_m != 2 && options.winograd_max_m != 4)
    fail("winograd_max_m must be 0, 2 or 4, got " + std::to_string(options.winograd_max_m));
  impl_->N = batch; impl_->in_c = in_c; impl_->out_c = out_c; impl_->H = height; impl_->W = width;
  impl_->options = options;
  impl_->build(plan, weights);
}

Engine::~Engine() = default;

int64_t Engine::arena_bytes() const { return impl_->N * impl_->T * 4; }

int64_t Engine::class_dim() const { return impl_->class_dim; }

std::vector<int> Engine::conv_paths() const {
  const EngineKernels& k = engine_kernels(active_isa());
  std::vector<int> paths;
  for (const Op& op : impl_->ops)
    if (op.code == P::kConv) paths.push_back(impl_->conv_path(op, k));
  return paths;
}

void Engine::set_profiling(bool on) {
  CallLock lock(mu_, "CPU engine");
  impl_->profiling = on;
  if (on) impl_->op_seconds.assign(impl_->ops.size(), 0.0);
}

std::vector<double> Engine::op_seconds() const {
  CallLock lock(mu_, "CPU engine");
  return impl_->op_seconds.empty() ? std::vector<double>(impl_->ops.size(), 0.0) : impl_->op_seconds;
}

void Engine::forward(const float* x, const float* t, const float* class_emb, float* out, int threads) {
  if (!x || !t || !out) fail("null array pointer");
  impl_->check_class_emb(class_emb);
  CallLock lock(mu_, "CPU engine");
  Impl& e = *impl_;
  e.fill_class(class_emb);
  const int64_t in_n = e.in_c * e.H * e.W, out_n = e.out_c * e.H * e.W;
  for (int64_t n = 0; n < e.N; ++n) {
    if (!std::isfinite(t[n])) fail("timestep must be finite");
    e.tvals[size_t(n)] = t[n];
    std::memcpy(e.slot(n, P::kInputSlot), x + n * in_n, size_t(in_n) * 4);
  }
  const ThreadGrant grant(threads);
  e.forward_arena(engine_kernels(active_isa()), grant.threads());
  for (int64_t n = 0; n < e.N; ++n)
    std::memcpy(out + n * out_n, e.slot(n, P::kOutputSlot), size_t(out_n) * 4);
}

bool Engine::run(const LoopArgs& a, const std::function<bool(int64_t)>& on_step) {
  if (a.steps < 0 || (a.steps > 0 && (!a.coef || !a.timesteps)) || !a.x_out) fail("null array pointer");
  if (a.keep.size() != a.keep_out.size()) fail("keep and keep_out differ in length");
  impl_->check_class_emb(a.class_emb);
  if (a.guided) {
    if (impl_->class_dim == 0) fail("guidance needs a class-conditional plan");
    if (batch_ % 2) fail("a guided run needs an even engine batch (n conditional + n null rows), got " +
                         std::to_string(batch_));
    if (!std::isfinite(a.guidance)) fail("guidance must be finite");
  }
  const int64_t samples = a.guided ? batch_ / 2 : batch_;  // n: the samples the loop makes
  if (a.first_index < 0 || a.first_index + samples > (int64_t(1) << 32))
    fail("sample indices first_index + i must lie in [0, 2**32)");
  if (a.history < 0 || a.history > 2) fail("history must be 0, 1 or 2, got " + std::to_string(a.history));
  for (int64_t s = 0; s < a.steps; ++s) {
    if (a.timesteps[s] < 0 || a.timesteps[s] >= int64_t(kInitialNoiseStep))
      fail("timestep " + std::to_string(a.timesteps[s]) + " is out of range");
    for (int j = 0; j < kCoefWidth; ++j)
      if (!std::isfinite(a.coef[s * kCoefWidth + j])) fail("coefficient table has a non-finite value");
    if (a.coef[s * kCoefWidth + kClip] < 0.0f) fail("clip range must be >= 0");
    if (a.model_t && !std::isfinite(a.model_t[s])) fail("model timesteps must be finite");
  }
  if (!std::isfinite(a.x_scale)) fail("x_scale must be finite");
  for (size_t i = 0; i < a.keep.size(); ++i)
    if (a.keep[i] < 0 || a.keep[i] > a.steps || !a.keep_out[i]) fail("bad trajectory position");

  CallLock lock(mu_, "CPU engine");
  Impl& e = *impl_;
  const int64_t per = e.in_c * e.H * e.W;
  if (e.out_c != e.in_c) fail("sampling needs out_channels == in_channels");
  auto params = [&](int64_t n, uint32_t step) {
    StepParams p;
    p.batch = 1;  // the arena is sample-major: one call per sample, same counters as a batch
    p.per_sample = per;
    p.seed = a.seed;
    p.noise_step = step;
    p.first_index = uint32_t(a.first_index + n);
    return p;
  };
  // the loop state: the input slots of samples [0, ns); a guided run's U-Net rows [ns, 2 ns) get
  // a copy of them before each forward
  const int64_t ns = samples;
  auto keep_copy = [&](int64_t pos) {
    for (size_t i = 0; i < a.keep.size(); ++i)
      if (a.keep[i] == pos)
        for (int64_t n = 0; n < ns; ++n)
          std::memcpy(a.keep_out[i] + n * per, e.slot(n, P::kInputSlot), size_t(per) * 4);
  };
  e.fill_class(a.class_emb);
  constexpr int64_t kRing = 3;
  if (a.history > 0 && e.ring_rows < ns) {
    e.ring = alloc_floats(kRing * ns * per);
    e.ring_rows = ns;
  }
  // ring buffer j of sample n: the x0 of every step k with k % 3 == j
  auto ring = [&](int64_t j, int64_t n) { return e.ring.get() + (j * e.ring_rows + n) * per; };
  // x_T: the spec's normals at the initial noise step, into the input slot (the loop state)
  for (int64_t n = 0; n < ns; ++n) {
    float* x = e.slot(n, P::kInputSlot);
    normals(params(n, kInitialNoiseStep), x);
    if (a.x_scale != 1.0f)  // a scaled start (Euler's init_noise_sigma); 1 leaves the normals' bits
      for (int64_t i = 0; i < per; ++i) x[i] *= a.x_scale;
  }
  keep_copy(0);
  for (int64_t s = 0; s < a.steps; ++s) {
    const EngineKernels& k = engine_kernels(active_isa());
    // drawn per step, so that concurrent runs rebalance the budget as they start and finish
    const ThreadGrant grant(a.threads);
    const int threads = grant.threads();
    const float t = a.model_t ? a.model_t[s] : float(a.timesteps[s]);
    for (int64_t n = 0; n < e.N; ++n) e.tvals[size_t(n)] = t;
    for (int64_t n = ns; n < e.N; ++n)  // guided: the null-class rows see the same x
      std::memcpy(e.slot(n, P::kInputSlot), e.slot(n - ns, P::kInputSlot), size_t(per) * 4);
    e.forward_arena(k, threads);  // model output -> the output slot
    for (int64_t n = 0; n < ns; ++n) {
      StepArrays arr;
      arr.x = e.slot(n, P::kInputSlot);
      arr.m = e.slot(n, P::kOutputSlot);
      arr.out = e.slot(n, P::kInputSlot);
      arr.coef = a.coef + s * kCoefWidth;
      if (a.guided) {
        arr.m_uncond = e.slot(n + ns, P::kOutputSlot);
        arr.guidance = a.guidance;
      }
      if (a.history > 0) {
        arr.x0_out = ring(s % kRing, n);
        if (s >= 1) arr.h1 = ring((s - 1) % kRing, n);
        if (a.history >= 2 && s >= 2) arr.h2 = ring((s - 2) % kRing, n);
      }
      fused_step(params(n, uint32_t(a.timesteps[s])), arr);
    }
    keep_copy(s + 1);
    if (on_step && !on_step(s + 1)) return false;
  }
  for (int64_t n = 0; n < ns; ++n)
    std::memcpy(a.x_out + n * per, e.slot(n, P::kInputSlot), size_t(per) * 4);
  return true;
}

}  // namespace cpu
}  // namespace fastddpm
