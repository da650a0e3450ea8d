// Per-ISA kernels of the U-Net engine (engine.cpp): a register-blocked GEMM micro-kernel and the
// vectorised element-wise pieces (group-norm apply + SiLU, column softmax, dot products). Each ISA
// translation unit (engine_generic.cpp, engine_avx2.cpp, engine_avx512.cpp) compiles
// engine_simd.inc for its own target; engine.cpp picks the table of cpu::active_isa() per call.
#pragma once
#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "fastddpm/plan.h"

#include "isa.h"

namespace fastddpm {
namespace cpu {

// Rows of the packed A operand: A is packed as [ceil(M / kGemmMR)][K][kGemmMR] on every ISA, so
// weights are packed once whatever path runs later.
constexpr int kGemmMR = 6;

// A micro-tile's valid columns as runs of consecutive output pixels: run r is tile columns
// [j[r], j[r] + len[r]) -> output offsets pix[r] + q * os. At most one run per column.
struct TileRuns {
  int n = 0;
  int64_t j[64], pix[64], len[64];
};

// The conv/GEMM epilogue of one micro-tile (run_gemm): rows m < rows of tile [kGemmMR][nr] ->
// out[m * ocs + pix + q * os] = ((tile + add[m]) + res[m * ocs + pix + q * os]) * scale, res null
// for none (it may alias out: accumulate in place).
struct TileEpilogue {
  const float* add;  // [rows]: bias + time embedding per row
  float scale;
  float* out;        // row 0 of the m-block
  const float* res;  // row 0 of the m-block, or null
  int64_t ocs, os;
};

// The Winograd conv epilogue of one task (winograd.cpp): y [m*m][kGemmMR * nr], pixel p = m a + b
// of tile column j of row mm at y[p * kGemmMR * nr + mm * nr + j]; column j is tile t0 + j at
// (t / tw, t % tw). Rows mm < rows -> out[mm][(m ty + a) * oys + (m tx + b) * oxs] =
// ((y + add[mm]) + res[mm][same]) * scale (res null for none).
struct WinogradStore {
  const float* add;              // [rows]
  float scale;
  float* out[kGemmMR];           // each row's output plane (and phase offset)
  const float* res[kGemmMR];     // likewise, or null
  int64_t oys, oxs, tw;          // pixel strides of the output; tiles per tile row
};

struct EngineKernels {
  const char* name;
  int nr;     // pixels (columns) per micro-tile: a multiple of the vector width
  int lanes;  // float32 lanes per vector (nr / lanes vectors per micro-tile row)
  // tile[m * nr + j] = sum_k A[k * kGemmMR + m] * B[off(k) + col(j)], m < kGemmMR, j < nr,
  // off(k) = boff ? boff[k] : k * bld, col(j) = j, or with voff (boff only) voff[j / lanes] +
  // j % lanes: each vector of the tile row from its own place (the pixels of one image row in a
  // padded plane); with halves, each half-vector: voff[j / (lanes / 2)] + j % (lanes / 2) (image
  // rows of half the lanes). Reads nr floats at each B row (past the valid columns). Only the
  // first `rows` rows are needed (the last m-block of a matrix): the kernel may store zeros in the
  // rows past them instead of computing them.
  void (*gemm_tile)(int64_t K, const float* A, const int64_t* boff, int64_t bld, const float* B,
                    float* tile, int rows, const int64_t* voff, bool halves);
  // the epilogue of one micro-tile of run_gemm (TileEpilogue)
  void (*gemm_epilogue)(const float* tile, int rows, const TileRuns& runs, const TileEpilogue& e);
  // y[r * y_ld + i] = act(a * x[r * x_ld + i] + b) for r < rows, i < n; act a plan::Act (SiLU
  // y / (1 + exp(-y)), Mish, GELU (erf), ReLU, or none); x and y may alias.
  void (*affine_act)(const float* x, int64_t x_ld, float* y, int64_t y_ld, int64_t rows, int64_t n, float a,
                     float b, int act);
  // sum of x[i] (first) and sum of (x[i] - mean)^2 (second) in double, for the norm statistics.
  double (*sum)(const float* x, int64_t n);
  double (*sum_sq_dev)(const float* x, int64_t n, float mean);
  // softmax down the columns [i0, i1) of S [rows, ld] after scaling by `scale`: per column i,
  // S[j][i] = exp(scale*S[j][i] - max) / sum_j(...).
  void (*softmax_cols)(float* S, int64_t rows, int64_t ld, int64_t i0, int64_t i1, float scale);
  // sum_i a[i] * b[i] (float accumulation in vector lanes).
  float (*dot)(const float* a, const float* b, int64_t n);
  // Winograd F(2x2, 3x3) (winograd.h). Input: one padded channel plane [h+2, w+2] (h, w even) ->
  // v[xi * vs + t] = (B^T d_t B)[xi / 4][xi % 4], d_t the 4x4 window of tile t = ty * (w/2) + tx.
  void (*winograd_input)(const float* in, int64_t h, int64_t w, float* v, int64_t vs);
  // Output: the 16 micro-tiles m[xi][kGemmMR * nr] of one task -> y[p][kGemmMR * nr], p = 2a + b
  // the pixel (2ty + a, 2tx + b) of each tile column.
  void (*winograd_output)(const float* m, float* y);
  // The same for F(4x4, 3x3): 6x6 windows at (4ty, 4tx) -> 36 rows (h, w multiples of 4); 36
  // micro-tiles -> y[p], p = 4a + b the pixel (4ty + a, 4tx + b).
  void (*winograd4_input)(const float* in, int64_t h, int64_t w, float* v, int64_t vs);
  void (*winograd4_output)(const float* m, float* y);
  // the epilogue of one Winograd task, m = 2 or 4 (WinogradStore)
  void (*winograd_store)(int m, const float* y, int rows, int64_t t0, int64_t ncols, const WinogradStore& s);
};

extern const EngineKernels kGenericEngineKernels;
extern const EngineKernels kAvx2EngineKernels;
extern const EngineKernels kAvx512EngineKernels;

const EngineKernels& engine_kernels(Isa isa);

}  // namespace cpu
}  // namespace fastddpm
