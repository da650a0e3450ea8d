// Winograd F(2x2, 3x3) convs: the weight transform, the task loop and the epilogue (winograd.h).
#include "winograd.h"

namespace fastddpm {
namespace cpu {

using namespace engine_util;

namespace {
constexpr int kPoints = 16;     // 4x4 transformed tile
constexpr int kMaxNr = 64;      // widest micro-tile of any ISA table (48 today)
}  // namespace

Buffer winograd_weights(const float* w, int64_t cout, int64_t cin) {
  // G = [[1, 0, 0], [1/2, 1/2, 1/2], [1/2, -1/2, 1/2], [0, 0, 1]]
  static const double G[4][3] = {{1, 0, 0}, {0.5, 0.5, 0.5}, {0.5, -0.5, 0.5}, {0, 0, 1}};
  const int64_t one = round_up(cout, MR) * cin;  // floats of one packed matrix
  Buffer U = alloc_floats(kPoints * one);
  for (int xi = 0; xi < kPoints; ++xi) {
    const int i = xi / 4, j = xi % 4;
    pack_a_into(U.get() + xi * one, cout, cin, [&](int64_t m, int64_t ci) {
      const float* g = w + (m * cin + ci) * 9;  // g: [3, 3]
      double s = 0;
      for (int r = 0; r < 3; ++r)
        for (int q = 0; q < 3; ++q) s += G[i][r] * double(g[r * 3 + q]) * G[j][q];
      return float(s);
    });
  }
  return U;
}

int64_t winograd_ld(int64_t h, int64_t w) { return round_up((h / 2) * (w / 2), 16) + kMaxNr; }

int64_t winograd_scratch_floats(int64_t cin, int64_t h, int64_t w) {
  return kPoints * cin * winograd_ld(h, w);
}

bool winograd_pays(int64_t cin, int64_t h, int64_t w, int nr) {
  if (h % 2 || w % 2 || cin < 8 || nr > kMaxNr) return false;
  // multiply-adds per output channel, padded to whole micro-tiles; the transforms cost ~10% more
  const double direct = 9.0 * double(round_up(h * (w + 2), nr));
  const double wino = 16.0 * double(round_up((h / 2) * (w / 2), nr)) * 1.1;
  return wino < direct;
}

namespace {

// The GEMMs, output transform and epilogue of task (column block pb, m-block mb) of sample n,
// reading V (the sample's transformed input).
void winograd_task(const WinogradCall& c, const EngineKernels& k, const float* V, int64_t n,
                   int64_t pb, int64_t mb) {
  const int64_t NR = k.nr, S = MR * NR, tw = c.w / 2, tiles = (c.h / 2) * tw, hw = c.h * c.w;
  const int64_t ld = winograd_ld(c.h, c.w), vs = c.cin * ld, one = round_up(c.cout, MR) * c.cin;
  alignas(64) float m[kPoints * MR * kMaxNr];  // m[xi][MR * NR]
  alignas(64) float y[4 * MR * kMaxNr];        // y[p][MR * NR]
  for (int xi = 0; xi < kPoints; ++xi)
    k.gemm_tile(c.cin, c.U + xi * one + mb * c.cin * MR, nullptr, ld, V + xi * vs + pb * NR, m + xi * S);
  k.winograd_output(m, y);
  const int64_t ncols = std::min(NR, tiles - pb * NR);
  float* o = c.out + n * c.o_bs;
  const float* rs = c.res ? c.res + n * c.r_bs : nullptr;
  for (int mm = 0; mm < MR; ++mm) {
    const int64_t co = mb * MR + mm;
    if (co >= c.cout) break;
    const float add = c.bias[co] + (c.temb ? c.temb[n * c.t_bs + co] : 0.0f);
    for (int64_t j = 0; j < ncols; ++j) {
      const int64_t tile = pb * NR + j, ty = tile / tw, tx = tile % tw;
      for (int p = 0; p < 4; ++p) {
        const int64_t px = co * hw + (2 * ty + p / 2) * c.w + 2 * tx + p % 2;
        const float v = y[p * S + mm * NR + j] + add;
        o[px] = (rs ? v + rs[px] : v) * c.scale;
      }
    }
  }
}

}  // namespace

void winograd_conv(const WinogradCall& c, const EngineKernels& k, int threads) {
  const int64_t tiles = (c.h / 2) * (c.w / 2), ld = winograd_ld(c.h, c.w);
  const int64_t plane = (c.h + 2) * (c.w + 2), vs = c.cin * ld;
  const int64_t Mb = round_up(c.cout, MR) / MR, Pb = (tiles + k.nr - 1) / k.nr;
  auto transform = [&](int64_t n, int64_t ci, float* V) {  // V[xi][ci][t]
    k.winograd_input(c.in + n * c.in_bs + ci * plane, c.h, c.w, V + ci * ld, vs);
  };
  if (threads > 1 && (c.N % threads == 0 || c.N >= 4 * threads)) {
    // Whole samples per thread, each with its own V: a V written by one core and read by the
    // other costs more than the conv saves (measured: no 2-thread gain when shared).
    parallel_for(c.N, threads, true, [&](int64_t n) {
      float* V = c.V + int64_t(omp_get_thread_num()) * c.v_floats;
      for (int64_t ci = 0; ci < c.cin; ++ci) transform(n, ci, V);
      for (int64_t pb = 0; pb < Pb; ++pb)
        for (int64_t mb = 0; mb < Mb; ++mb) winograd_task(c, k, V, n, pb, mb);
    });
    return;
  }
  // Otherwise one sample at a time, its V shared by the threads.
  for (int64_t n = 0; n < c.N; ++n) {
    parallel_for(c.cin, threads, true, [&](int64_t ci) { transform(n, ci, c.V); });
    // task order (column block, m-block): consecutive tasks share the V panel
    parallel_for(Pb * Mb, threads, true, [&](int64_t t) { winograd_task(c, k, c.V, n, t / Mb, t % Mb); });
  }
}

}  // namespace cpu
}  // namespace fastddpm
