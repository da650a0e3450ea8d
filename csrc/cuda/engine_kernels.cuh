// Launchers of the U-Net engine's kernels (csrc/cuda/gemm.cu, csrc/cuda/ops.cu). Raw device
// pointers and plain structs; every launcher only enqueues (capturable in a CUDA graph: no
// allocation, no synchronisation) and returns cudaGetLastError() of its launch.
//
// Activation layout (engine_cuda.cu): a tensor of sample b lives at base + b * bstride (floats),
// NCHW; "padded" tensors are [C, H+2, W+2] with a zero border.
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>

#include "step_cuda.h"

namespace fastddpm {
namespace cuda {

// GEMM operand precision. kF32: fp32 FMA (no TF32). kTF32 / kBF16 / kF16: WMMA tensor cores with
// fp32 accumulation; operands rounded to tf32 / converted to bf16 / fp16 on their way to shared memory.
enum class Precision : int { kF32 = 0, kTF32 = 1, kBF16 = 2, kF16 = 3 };

// The element type A is stored in for a precision: 4 bytes for kF32/kTF32, 2 for kBF16/kF16.
inline int precision_bytes(Precision p) { return (p == Precision::kBF16 || p == Precision::kF16) ? 2 : 4; }

// One implicit GEMM + epilogue over nbatch samples (cpu::GemmCall on the GPU):
//   acc[m][p]  = sum_k A[m][k] * B_b[k][p],   B_b[k][p] = src[b * s_bstride + boff[k] + p]
//   column p -> (y, x) = (p / Wp, p % Wp); dropped when x >= Wv; pix = y * oys + x * oxs + ooff
//   out[b * o_bstride + m * ocs + pix] = scale * (acc + bias[m] + temb[b * t_bstride + m]
//                                                 + res[b * r_bstride + m * ocs + pix])
// A: [ceil(M/64)*64, Kpad] row-major in the precision's element type, Kpad = ceil(K/16)*16, zero
// padded. split_k: a multiple of 16 with splits * split_k >= Kpad. Reads of src may run up to boff[k] + Pn - 1 (the caller's slots hold that, plus slack).
struct GemmDev {
  int M = 0, K = 0, Kpad = 0, Pn = 0;
  const void* A = nullptr;
  const int* boff = nullptr;  // [K] device
  const float* src = nullptr;
  int64_t s_bstride = 0;
  float* out = nullptr;
  int64_t o_bstride = 0, ocs = 0;
  int Wp = 1, Wv = 1, oys = 0, oxs = 1, ooff = 0;
  const float* bias = nullptr;  // [M] or null
  const float* temb = nullptr;  // [nbatch][M] (stride t_bstride) or null
  int64_t t_bstride = 0;
  const float* res = nullptr;   // mapped like out, or null
  int64_t r_bstride = 0;
  float scale = 1.0f;
  int nbatch = 1;
  // split K: block x = (pixel tile, split) multiplies K chunks [split * split_k, (split + 1) * split_k)
  // into ws [nbatch][splits][M][Pn] (fp32), and a second kernel sums the splits in order and applies
  // the epilogue. splits = 1, split_k = Kpad: one pass, no workspace.
  int splits = 1, split_k = 0;
  float* ws = nullptr;
};
constexpr int kGemmTileM = 64, kGemmTileP = 64, kGemmTileK = 16;
cudaError_t launch_gemm(const GemmDev& g, Precision prec, cudaStream_t st);

// The virtual architecture (e.g. 90) the conv GEMM of `prec` was compiled for, as the module loaded
// on the current device reports it (cudaFuncAttributes::ptxVersion, 10 * major + minor): a build
// without sm_80+ code, JIT-compiled by the driver from older PTX, has no tf32 / bf16 tensor-core
// path whatever the device could do (those instantiations trap there). 0 with an error on failure.
cudaError_t gemm_compiled_arch(Precision prec, int* arch);

// fp32 batched GEMM with arbitrary strides (attention scores and P.V), batch b = outer * inner + i:
//   C_b[m * scm + n] = alpha * sum_k A_b[m * sam + k * sak] * B_b[k * sbk + n * sbn]
//   X_b = X + (b / inner) * x_outer + (b % inner) * x_inner  for X in A, B, C
struct StridedGemm {
  int M = 0, N = 0, K = 0;
  const float* A = nullptr;
  int64_t sam = 0, sak = 0, a_outer = 0, a_inner = 0;
  const float* B = nullptr;
  int64_t sbk = 0, sbn = 0, b_outer = 0, b_inner = 0;
  float* C = nullptr;
  int64_t scm = 0, c_outer = 0, c_inner = 0;
  float alpha = 1.0f;
  int outer = 1, inner = 1;
};
cudaError_t launch_strided_gemm(const StridedGemm& g, cudaStream_t st);

// out[b] = table[t[b]] ([rows, dim]; t an integer in [0, rows), checked on the host by the
// Python engine; clamped here so that no bad t reads outside the table).
cudaError_t launch_time_table(const float* t, const float* table, int64_t rows, float* out, int64_t o_bstride, int n,
                              int dim, cudaStream_t st);

// out[b] = [sin, cos](2 pi freqs ln t[b]) (dim = 2 x the frequencies; t > 0, checked on the host).
cudaError_t launch_time_fourier(const float* t, const float* freqs, float* out, int64_t o_bstride, int n, int dim,
                                cudaStream_t st);

// out[b][j] = in[b][j] / t[b] for j < per (a Fourier-embedded U-Net's output).
cudaError_t launch_divide_by_t(const float* in, int64_t i_bstride, float* out, int64_t o_bstride, const float* t,
                               int n, int64_t per, cudaStream_t st);

// out[b][k] = sinusoidal embedding of t[b] (plan.py TIME_EMB), dim floats per sample.
cudaError_t launch_time_emb(const float* t, float* out, int64_t o_bstride, int n, int dim, float shift, bool flip,
                            cudaStream_t st);

// out[b][o] = W[o] . act(in[b]) + bias[o] (+ res[b * r_bstride + o] when res is not null: the
// class embedding of a class-conditional plan); W [cout, cin]; act a plan::Act.
cudaError_t launch_linear(const float* in, int64_t i_bstride, float* out, int64_t o_bstride, const float* W,
                          const float* bias, const float* res, int64_t r_bstride, int n, int cin, int cout,
                          int act, cudaStream_t st);

// Two-source channel concat [cin from in, cin2 from in2] of [C, h, w] tensors.
struct Concat {
  const float* in = nullptr;
  int64_t i_bstride = 0;
  const float* in2 = nullptr;
  int64_t i2_bstride = 0;
  int cin = 0, cin2 = 0, h = 0, w = 0;
};

// out (padded) = a * concat + b inside, 0 on the border.
cudaError_t launch_pad(const Concat& c, float* out, int64_t o_bstride, int n, float a, float b, cudaStream_t st);

// out = act(GroupNorm(concat; groups, eps, gamma, beta) [* (1 + scale) + shift]), padded or not; one
// block per (sample, group). ss: null, or the scale_shift rows [n][2C] (stride ss_bstride); act a plan::Act;
// pool (padded only): the output is the 2x2 average pooling of that, [C, h/2+2, w/2+2].
cudaError_t launch_groupnorm(const Concat& c, float* out, int64_t o_bstride, int n, int groups, float eps,
                             const float* gamma, const float* beta, const float* ss, int64_t ss_bstride, int act,
                             bool padded, bool pool, cudaStream_t st);

// out[b][c] = the 2x2 average pooling (pool) or nearest x2 upsampling of in[b][c] [h, w]; padded: a
// zero border of one pixel around it.
cudaError_t launch_resample(const float* in, int64_t i_bstride, float* out, int64_t o_bstride, int n, int C, int h,
                            int w, int mode, bool padded, cudaStream_t st);  // mode: plan::ResampleMode

// col[b][(c*9 + dy*3 + dx) * ho*wo + yo*wo + xo] = in[b][c][2yo+dy-pad][2xo+dx-pad] (0 outside).
cudaError_t launch_im2col_s2(const float* in, int64_t i_bstride, float* col, int64_t c_bstride, int n, int C,
                             int h, int w, int pad, cudaStream_t st);

// Softmax of every row of length len: rows r < rows of batch b at S + b * bstride + r * len.
cudaError_t launch_softmax_rows(float* S, int64_t bstride, int rows, int len, int n, cudaStream_t st);

// Loop bookkeeping: tvals[b] = model_t[state->step] (the model's time input of the step about to run:
// float(timesteps[k]), or a fractional schedule's float32 model time).
cudaError_t launch_loop_begin(const LoopState* state, const float* model_t, float* tvals, int n, cudaStream_t st);
// x[0, count) *= s (the scaled x_T of a schedule whose x_scale is not 1)
cudaError_t launch_scale(float* x, int64_t count, float s, cudaStream_t st);
// state->step += 1 (the last kernel of a captured step).
cudaError_t launch_loop_advance(LoopState* state, cudaStream_t st);

}  // namespace cuda
}  // namespace fastddpm
