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
  // transforms and the V round trip through L2 gain far less, so on that tile Winograd only pays
  // where its GEMMs are large enough to hide them: F(4x4) alone, with >= 128 GEMM rows (few output
  // channels leave the transforms dominant) and >= two micro-tiles of tiles (32x32 and larger
  // images); F(2x2) saves too few multiply-adds to cover its transforms there.
  const bool wide = nr >= 32;
  if (wide && (rows < 128 || upsample || (h / 4) * (w / 4) < 2 * nr)) return 0;
  // multiply-adds per output channel, padded to whole micro-tiles, with the transforms' overhead
  // as a share of the GEMMs (design constants: 10% for m = 2, 15% for m = 4) and 20% more for a
  // folded upsample's strided scalar store (without that term the model picks F(2x2) for 8x8
  // upsamples, where it loses)
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
