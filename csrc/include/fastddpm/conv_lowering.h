// How a plan CONV op becomes GEMMs, for every engine (CPU and CUDA). Per sample,
// out[M, P] = A[M, K] * B[K, P]: A is the op's weights as a dense row-major matrix, B is never
// materialised: row k of B is the input read `offset` floats into slot `slot`, from the column's
// first pixel on. The engines pack A into their own operand layouts and turn (slot, offset) into
// their own addresses, so the K order, the weight folding and the column mapping below are the
// one definition both follow. Host C++ only (no CUDA, no Python).
//
//   CONV3  3x3 stride 1 over the padded input [Cin, h+2, w+2]: K = Cin * 9 taps (ci, dy, dx), then
//          Cin2 centre taps of the padded shortcut input when the op has one (its 1x1 weights
//          are the last Cin2 columns of A and its bias is added to the conv's). The columns run
//          over the padded grid (P = h * (w+2)); each row's two pad columns are dropped.
//   CONV1  1x1 over the unpadded input: K = Cin, P = h * w.
//   DOWN1 / DOWN0  3x3 stride 2 (pad 1 / 0), read from the op's im2col scratch [Cin * 9, ho * wo],
//          which the engine fills first: K = Cin * 9, P = ho * wo.
//   UP     nearest x2 upsample then 3x3: four GEMMs, one per output phase (py, px), each a 2x2
//          conv on the padded low-resolution input (K = Cin * 4) with folded weights, over the
//          padded grid, storing to every second output pixel.
#pragma once
#include <cstdint>
#include <stdexcept>
#include <vector>

#include "fastddpm/plan.h"
#include "fastddpm/plan_check.h"

namespace fastddpm {
namespace plan {

// Where row k of B is read: `offset` floats into slot `slot` of one sample.
struct BRow {
  int64_t slot = -1;
  int64_t offset = 0;
};

// Column p of a GEMM is grid pixel (y, x) = (p / Wp, p % Wp); columns with x >= Wv are computed
// and dropped, the others go to output pixel y * oys + x * oxs + ooff of each output channel.
struct GemmColumns {
  int64_t Pn = 0, Wp = 1, Wv = 1, oys = 0, oxs = 1, ooff = 0;
  // the columns run over a padded plane [h + 2, Wp = Wv + 2]: B rows are padded-plane offsets, so
  // an engine may skip the pad columns by mapping columns to image pixels itself
  bool grid = false;
};

struct ConvGemmLowering {
  int64_t M = 0, K = 0;
  std::vector<float> weights;  // A [M, K], row-major
  std::vector<BRow> rows;      // [K]
  GemmColumns columns;
};

// A nearest-x2 upsample + 3x3 conv w [Cout, Cin, 3, 3] as a 3x3 conv at the input's resolution
// with 4 Cout outputs: row (2 py + px) Cout + co is output phase (py, px) of channel co,
// out[co][2y + py][2x + px], a 2x2 kernel embedded at rows py.., columns px.. of the 3x3 window.
// Returns [4 Cout, Cin, 3, 3] (zeros outside each phase's 2x2 taps).
inline std::vector<float> upsample_phase_weights(const float* w, int64_t cout, int64_t cin) {
  // phase p's tap a (input row y - 1 + p + a, a < 2) sums the 3x3 rows kTaps[p][a]
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

namespace lowering_detail {

inline const float* weight_data(const CheckedOp& c, int role) { return checked_weight(c, role).data; }

inline GemmColumns padded_grid_columns(const CheckedOp& c) {
  GemmColumns g;
  g.Wp = c.w + 2;
  g.Pn = c.h * g.Wp;
  g.Wv = c.w;
  g.oys = c.w;
  g.grid = true;
  return g;
}

inline GemmColumns dense_columns(int64_t ho, int64_t wo) {
  GemmColumns g;
  g.Pn = ho * wo;
  g.Wp = wo;
  g.Wv = wo;
  g.oys = wo;
  return g;
}

// The 1x1 shortcut's rows: the centre tap of each channel of the padded shortcut input.
inline void append_centre_taps(std::vector<BRow>& rows, const CheckedOp& c) {
  const int64_t Wp = c.w + 2, pplane = (c.h + 2) * Wp;
  for (int64_t ch = 0; ch < c.cin2; ++ch) rows.push_back({c.in2, ch * pplane + Wp + 1});
}

inline ConvGemmLowering lower_conv3(const CheckedOp& c) {
  const int64_t M = c.cout, Km = c.cin * 9, Ks = c.in2 >= 0 ? c.cin2 : 0;
  const float* w = weight_data(c, kWeight);                          // [Cout, Cin, 3, 3]
  const float* ws = Ks ? weight_data(c, kShortcutWeight) : nullptr;  // [Cout, Cin2, 1, 1]
  ConvGemmLowering g;
  g.M = M;
  g.K = Km + Ks;
  g.weights.resize(size_t(M * g.K));
  for (int64_t m = 0; m < M; ++m)
    for (int64_t k = 0; k < g.K; ++k) g.weights[size_t(m * g.K + k)] = k < Km ? w[m * Km + k] : ws[m * Ks + (k - Km)];
  const int64_t Wp = c.w + 2, pplane = (c.h + 2) * Wp;
  for (int64_t ch = 0; ch < c.cin; ++ch)
    for (int dy = 0; dy < 3; ++dy)
      for (int dx = 0; dx < 3; ++dx) g.rows.push_back({c.in, ch * pplane + dy * Wp + dx});
  if (Ks) append_centre_taps(g.rows, c);
  g.columns = padded_grid_columns(c);
  return g;
}

inline ConvGemmLowering lower_conv1(const CheckedOp& c) {
  const float* w = weight_data(c, kWeight);  // [Cout, Cin, 1, 1]
  ConvGemmLowering g;
  g.M = c.cout;
  g.K = c.cin;
  g.weights.assign(w, w + g.M * g.K);
  for (int64_t ch = 0; ch < c.cin; ++ch) g.rows.push_back({c.in, ch * c.h * c.w});
  g.columns = dense_columns(c.h, c.w);
  return g;
}

inline ConvGemmLowering lower_strided(const CheckedOp& c) {
  const float* w = weight_data(c, kWeight);  // [Cout, Cin, 3, 3]
  ConvGemmLowering g;
  g.M = c.cout;
  g.K = c.cin * 9;
  g.weights.assign(w, w + g.M * g.K);
  for (int64_t k = 0; k < g.K; ++k) g.rows.push_back({c.scratch, k * c.ho * c.wo});  // im2col row k
  g.columns = dense_columns(c.ho, c.wo);
  return g;
}

inline std::vector<ConvGemmLowering> lower_upsample(const CheckedOp& c) {
  const int64_t M = c.cout, ci = c.cin, Wp = c.w + 2, pplane = (c.h + 2) * Wp;
  const std::vector<float> w3 = upsample_phase_weights(weight_data(c, kWeight), M, ci);
  std::vector<ConvGemmLowering> phases;
  for (int py = 0; py < 2; ++py)
    for (int px = 0; px < 2; ++px) {
      ConvGemmLowering g;
      g.M = M;
      g.K = ci * 4;  // (ch, a, b): the phase's 2x2 taps
      g.weights.resize(size_t(M * g.K));
      for (int64_t m = 0; m < M; ++m)
        for (int64_t k = 0; k < g.K; ++k) {
          const int64_t ch = k / 4;
          const int a = int(k % 4) / 2, b = int(k % 2);
          g.weights[size_t(m * g.K + k)] = w3[size_t(((((2 * py + px) * M + m) * ci + ch) * 3 + py + a) * 3 + px + b)];
        }
      for (int64_t ch = 0; ch < ci; ++ch)
        for (int a = 0; a < 2; ++a)
          for (int b = 0; b < 2; ++b) g.rows.push_back({c.in, ch * pplane + (py + a) * Wp + (px + b)});
      g.columns = padded_grid_columns(c);
      g.columns.oys = 2 * c.wo;
      g.columns.oxs = 2;
      g.columns.ooff = py * c.wo + px;
      phases.push_back(std::move(g));
    }
  return phases;
}

}  // namespace lowering_detail

// The conv's bias: its own, plus the shortcut's when it has one (both land on the same output).
inline std::vector<float> conv_bias(const CheckedOp& c) {
  const float* b = lowering_detail::weight_data(c, kBias);
  std::vector<float> bias(b, b + c.cout);
  if (c.in2 >= 0) {
    const float* b2 = lowering_detail::weight_data(c, kShortcutBias);
    for (size_t m = 0; m < bias.size(); ++m) bias[m] += b2[m];
  }
  return bias;
}

// The GEMMs of a checked CONV op: one, or four for UP (phase 2 py + px).
inline std::vector<ConvGemmLowering> lower_conv(const CheckedOp& c) {
  namespace d = lowering_detail;
  switch (c.mode) {
    case kConv3: return {d::lower_conv3(c)};
    case kConv1: return {d::lower_conv1(c)};
    case kDown0:
    case kDown1: return {d::lower_strided(c)};
    case kUp: return d::lower_upsample(c);
    default: throw std::logic_error("plan_check.h and the conv lowering disagree on a conv mode");
  }
}

// A CONV3 op's 1x1 shortcut alone (K = Cin2 centre taps), for an engine that runs the 3x3 part
// another way (the CPU's Winograd path) and adds the shortcut with its own GEMM.
inline ConvGemmLowering lower_shortcut(const CheckedOp& c) {
  const float* ws = lowering_detail::weight_data(c, kShortcutWeight);  // [Cout, Cin2, 1, 1]
  ConvGemmLowering g;
  g.M = c.cout;
  g.K = c.cin2;
  g.weights.assign(ws, ws + g.M * g.K);
  lowering_detail::append_centre_taps(g.rows, c);
  g.columns = lowering_detail::padded_grid_columns(c);
  return g;
}

}  // namespace plan
}  // namespace fastddpm
