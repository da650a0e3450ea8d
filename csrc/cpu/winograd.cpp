// Winograd F(2x2, 3x3) and F(4x4, 3x3) convs: weight transforms, the task loop and the epilogue
// (winograd.h).
#include "winograd.h"

namespace fastddpm {
namespace cpu {

using namespace engine_util;

namespace {

constexpr int kMaxNr = 64;      // widest micro-tile of any ISA table (32 today)
constexpr int kMaxPoints = 36;  // (4 + 2)^2

int points(int m) { return (m + 2) * (m + 2); }

// The sizes of one conv call, derived once from the call and the micro-tile width.
struct Geometry {
  int64_t nr, tw, tiles, ld, vs, one, Mb, Pb;  // vs: floats per point; one: floats per packed U
  Geometry(const WinogradCall& c, int nr_)
      : nr(nr_), tw(c.w / c.m), tiles((c.h / c.m) * tw), ld(winograd_ld(c.m, c.h, c.w)), vs(c.cin * ld),
        one(round_up(c.cout, MR) * c.cin), Mb(round_up(c.cout, MR) / MR), Pb((tiles + nr - 1) / nr) {}
};

// G of F(2x2, 3x3) and of F(4x4, 3x3) (rows: transformed points along one axis).
const double kG2[4][3] = {{1, 0, 0}, {0.5, 0.5, 0.5}, {0.5, -0.5, 0.5}, {0, 0, 1}};
const double kG4[6][3] = {{1.0 / 4, 0, 0},           {-1.0 / 6, -1.0 / 6, -1.0 / 6},
                          {-1.0 / 6, 1.0 / 6, -1.0 / 6}, {1.0 / 24, 1.0 / 12, 1.0 / 6},
                          {1.0 / 24, -1.0 / 12, 1.0 / 6}, {0, 0, 1}};

// The GEMMs, output transform and epilogue of task (column block pb, m-block mb) of sample n,
// reading V (the sample's transformed input).
void winograd_task(const WinogradCall& c, const Geometry& g, const EngineKernels& k, const float* V,
                   int64_t n, int64_t pb, int64_t mb) {
  const int64_t S = MR * g.nr;
  alignas(64) float mt[kMaxPoints * MR * kMaxNr];  // mt[xi][MR * NR]
  alignas(64) float y[16 * MR * kMaxNr];           // y[p][MR * NR], p < m * m
  const int rows = int(std::min<int64_t>(MR, c.cout - mb * MR));
  for (int xi = 0; xi < points(c.m); ++xi)
    k.gemm_tile(c.cin, c.U + xi * g.one + mb * c.cin * MR, nullptr, g.ld, V + xi * g.vs + pb * g.nr,
                mt + xi * S, rows, nullptr, false);
  if (c.m == 2) k.winograd_output(mt, y);
  else k.winograd4_output(mt, y);
  // the conv epilogue: bias, time embedding, residual, scale; row r is channel r (or, up, phase
  // r / cout_out of channel r % cout_out)
  float add[MR];
  WinogradStore s;
  const int64_t wo = c.up ? 2 * c.w : c.w, plane = (c.up ? 4 : 1) * c.h * c.w;
  for (int mm = 0; mm < rows; ++mm) {
    const int64_t r = mb * MR + mm, co = r % c.cout_out, ph = r / c.cout_out;
    add[mm] = c.bias[co] + (c.temb ? c.temb[n * c.t_bs + co] : 0.0f);
    const int64_t off = co * plane + (ph / 2) * wo + ph % 2;
    s.out[mm] = c.out + n * c.o_bs + off;
    s.res[mm] = c.res ? c.res + n * c.r_bs + off : nullptr;
  }
  for (int mm = rows; mm < MR; ++mm) s.res[mm] = nullptr;
  s.add = add;
  s.scale = c.scale;
  s.oys = c.up ? 2 * wo : wo;
  s.oxs = c.up ? 2 : 1;
  s.tw = g.tw;
  k.winograd_store(c.m, y, rows, pb * g.nr, std::min(g.nr, g.tiles - pb * g.nr), s);
}

}  // namespace

int winograd_choice(int64_t cin, int64_t rows, int64_t h, int64_t w, int nr, int max_m, bool upsample,
                    bool compact, bool force) {
  if (nr > kMaxNr) return 0;
  if (force) {
    for (int m : {4, 2})
      if (m <= max_m && h % m == 0 && w % m == 0) return m;
    return 0;
  }
  if (cin < 8) return 0;
  // The 32-wide AVX-512 tile runs the direct GEMM at about twice the AVX2 rate while the
  // transforms and the V round trip through L2 gain far less. Measured in the networks on a
  // 2-core Zen 5 (batch 1, per conv, Winograd / direct): F(2x2) 0.94-1.10 at 16x16 and 1.3-1.7
  // at 8x8; F(4x4) 0.77-0.85 at 32x32 with 128 output channels, but 0.8-1.3 with 32 (and worse
  // with two threads sharing V) and 2.5-7 for conv_out's 1-3. So on that tile only F(4x4), with
  // >= 128 GEMM rows and >= two micro-tiles of tiles (32x32 and larger images).
  const bool wide = nr >= 32;
  if (wide && (rows < 128 || upsample || (h / 4) * (w / 4) < 2 * nr)) return 0;
  // multiply-adds per output channel, padded to whole micro-tiles; the transforms' share measured
  // about 10% (m = 2) and 15% (m = 4) of the GEMMs, and a folded upsample's strided scalar store
  // about 20% more (F(2x2) at 8x8 predicted 12% faster without it, measured 6% slower)
  const double store = upsample ? 1.2 : 1.0;
  double best = (upsample ? 4.0 : 9.0) * double(round_up(h * (compact ? w : w + 2), nr));
  int choice = 0;
  for (int m : {2, 4}) {
    if (m > max_m || h % m || w % m || (wide && m == 2)) continue;
    const double cost = points(m) * double(round_up((h / m) * (w / m), nr)) * (m == 2 ? 1.1 : 1.15) * store;
    if (cost < best) { best = cost; choice = m; }
  }
  return choice;
}

std::vector<float> upsample_phase_weights(const float* w, int64_t cout, int64_t cin) {
  // phase p's tap a (input row y - 1 + p + a, a < 2) sums the 3x3 rows kTaps[p][a]; in the 3x3
  // window over the input it sits at row p + a (columns likewise)
  static const int kTaps[2][2][3] = {{{0, -1, -1}, {1, 2, -1}}, {{0, 1, -1}, {2, -1, -1}}};
  std::vector<float> out(size_t(4 * cout * cin * 9), 0.0f);
  for (int py = 0; py < 2; ++py)
    for (int px = 0; px < 2; ++px)
      for (int64_t co = 0; co < cout; ++co)
        for (int64_t ci = 0; ci < cin; ++ci) {
          float* dst = out.data() + (((2 * py + px) * cout + co) * cin + ci) * 9;
          const float* src = w + (co * cin + ci) * 9;
          for (int a = 0; a < 2; ++a)
            for (int b = 0; b < 2; ++b) {
              float s = 0.0f;
              for (int u = 0; u < 3 && kTaps[py][a][u] >= 0; ++u)
                for (int v = 0; v < 3 && kTaps[px][b][v] >= 0; ++v) s += src[kTaps[py][a][u] * 3 + kTaps[px][b][v]];
              dst[(py + a) * 3 + (px + b)] = s;
            }
        }
  return out;
}

Buffer winograd_weights(int m, const float* w, int64_t cout, int64_t cin) {
  const int a = m + 2, P = points(m);
  const int64_t one = round_up(cout, MR) * cin;  // floats of one packed matrix
  Buffer U = alloc_floats(P * one);
  for (int xi = 0; xi < P; ++xi) {
    const double* gi = m == 2 ? kG2[xi / a] : kG4[xi / a];
    const double* gj = m == 2 ? kG2[xi % a] : kG4[xi % a];
    pack_a_into(U.get() + xi * one, cout, cin, [&](int64_t co, int64_t ci) {
      const float* g = w + (co * cin + ci) * 9;  // g: [3, 3]
      double s = 0;
      for (int r = 0; r < 3; ++r)
        for (int q = 0; q < 3; ++q) s += gi[r] * double(g[r * 3 + q]) * gj[q];
      return float(s);
    });
  }
  return U;
}

int64_t winograd_ld(int m, int64_t h, int64_t w) {
  const int64_t ld = round_up((h / m) * (w / m), 16) + kMaxNr;
  return ld % 64 ? ld : ld + 16;  // a stride of 256 bytes or a multiple maps the B rows of a micro-tile onto few L1 sets
}

int64_t winograd_scratch_floats(int m, int64_t cin, int64_t h, int64_t w) {
  return points(m) * cin * winograd_ld(m, h, w);
}

void winograd_conv(const WinogradCall& c, const EngineKernels& k, int threads) {
  const Geometry g(c, k.nr);
  const int64_t plane = (c.h + 2) * (c.w + 2), Mb = g.Mb, Pb = g.Pb;
  auto transform = [&](int64_t n, int64_t ci, float* V) {  // V[xi][ci][t]
    (c.m == 2 ? k.winograd_input : k.winograd4_input)(c.in + n * c.in_bs + ci * plane, c.h, c.w,
                                                      V + ci * g.ld, g.vs);
  };
  // One sample at a time, its V transformed by all threads, then shared. (Whole samples per
  // thread, each with its own V, is the engine's sample-parallel schedule: it calls this with one
  // thread per sample.)
  for (int64_t n = 0; n < c.N; ++n) {
    parallel_for(c.cin, threads, true, [&](int64_t ci) { transform(n, ci, c.V); });
    // task order (column block, m-block): consecutive tasks share the V panel
    parallel_for(Pb * Mb, threads, true, [&](int64_t t) { winograd_task(c, g, k, c.V, n, t / Mb, t % Mb); });
  }
}

}  // namespace cpu
}  // namespace fastddpm
