// Winograd F(mxm, 3x3), m = 2 or 4, for the engine's stride-1 3x3 convs (Lavin & Gray 2016): each
// m x m output tile is A^T [(G g G^T) . (B^T d B)] A over its (m+2)x(m+2) input window, so the
// conv becomes P = (m+2)^2 GEMMs (one per point xi of the transformed window),
// out_xi[Cout, tiles] = U_xi[Cout, Cin] * V_xi[Cin, tiles]: P / m^2 products per output instead of
// 9, 2.25x (m = 2) or 4x (m = 4) fewer multiply-adds than the direct implicit GEMM.
//
// Layout: U = P packed A operands [ceil(Cout/MR)][Cin][MR] (once, at engine creation); V, one
// sample at a time, [P][Cin][ld] with tile t = ty * (w/m) + tx in column t. A task (m-block,
// column block) runs its P micro-tiles back to back, transforms them to pixels and applies the
// conv epilogue (bias, time embedding, residual, scale) while they are in L1.
#pragma once
#include <cstdint>
#include <vector>

#include "engine_kernels.h"
#include "engine_util.h"

namespace fastddpm {
namespace cpu {

// The tile size m (2 or 4) that makes a conv of this shape cheapest with micro-tile width nr, or
// 0 for the direct GEMM: sides divisible by m, m <= max_m, enough input channels to amortise the
// transforms, and the fewest multiply-adds counted over whole micro-tiles (with the transforms'
// overhead). upsample: a folded upsample conv, whose direct phases take 4 taps per output (the
// Winograd path runs them as 3x3 kernels with zeros, 4 x Cout rows, and stores with stride 2).
// rows: the GEMM rows (Cout, or 4 Cout for an upsample). compact: the direct path computes only
// the image's h * w columns (compact columns), not the padded grid's h * (w + 2). force: skip the
// cost model and take the largest m <= max_m that divides both sides (FASTDDPM_WINOGRAD=force, so
// tests reach every ISA's Winograd kernels).
int winograd_choice(int64_t cin, int64_t rows, int64_t h, int64_t w, int nr, int max_m = 4, bool upsample = false,
                    bool compact = false, bool force = false);

// U: w [Cout, Cin, 3, 3] transformed in double and packed, P consecutive packed matrices.
engine_util::Buffer winograd_weights(int m, const float* w, int64_t cout, int64_t cin);

// Columns of one V row (tiles padded so a micro-tile may read past the last one), and the V
// floats of one sample (one such block per thread: the engine gives each thread its own).
int64_t winograd_ld(int m, int64_t h, int64_t w);
int64_t winograd_scratch_floats(int m, int64_t cin, int64_t h, int64_t w);

struct WinogradCall {
  int m = 2;                                      // output tile side
  int64_t N = 0, cin = 0, cout = 0, h = 0, w = 0;  // cout: the GEMM rows (4 x cout_out when up)
  int64_t cout_out = 0;                           // output channels
  bool up = false;                                // a folded upsample: out [cout_out, 2h, 2w]
  const float* U = nullptr;                       // winograd_weights(m, ...)
  const float* in = nullptr;  int64_t in_bs = 0;  // padded [Cin, h+2, w+2] per sample
  float* V = nullptr;                             // scratch of winograd_scratch_floats (the caller's thread's)
  float* out = nullptr;       int64_t o_bs = 0;   // [Cout, h, w] ([cout_out, 2h, 2w] when up)
  const float* bias = nullptr;                    // [cout_out]
  const float* temb = nullptr; int64_t t_bs = 0;  // [cout_out] per sample, or null
  const float* res = nullptr;  int64_t r_bs = 0;  // shaped like out, per sample, or null
  float scale = 1.0f;
};

// out = scale * ((conv3x3(in) + bias + temb) + res), as the direct path's epilogue rounds it.
void winograd_conv(const WinogradCall& c, const EngineKernels& k, int threads);

}  // namespace cpu
}  // namespace fastddpm
