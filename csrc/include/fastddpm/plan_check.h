// A plan's arrays decoded into ops and checked once, for every engine (CPU and CUDA): slot
// indices and sizes, op parameters, and each weight's index and shape. What an engine builds from
// a CheckedOp can then trust it. Host C++ only (no CUDA, no Python); errors throw
// std::invalid_argument naming the op, the field and the weight.
#pragma once
#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "fastddpm/plan.h"

namespace fastddpm {
namespace plan {

// The plan as plain arrays: ints [n_ops, kIntFields], floats [n_ops, kFloatFields].
struct PlanView {
  int64_t n_ops = 0;
  const int64_t* ints = nullptr;
  const double* floats = nullptr;
  int64_t n_slots = 0;
  const int64_t* slot_sizes = nullptr;  // per-sample floats
};

// One weight: diffusers' key (for messages), its float32 data and shape. Engines copy the data.
struct WeightView {
  std::string name;
  const float* data = nullptr;
  std::vector<int64_t> shape;
};

// The fields of one plan row (plan.INT_FIELDS / FLOAT_FIELDS); engines' ops derive from this.
struct OpFields {
  int64_t code = 0, out = -1, in = -1, cin = 0, in2 = -1, cin2 = 0, h = 0, w = 0, cout = 0;
  int64_t temb = -1, residual = -1, scratch = -1, mode = 0, groups = 0, heads = 0, flags = 0;
  float eps = 0, scale = 1, a = 1, shift = 0;
};

// Which weight sits where in CheckedOp::weights, by op.
enum WeightRole : int {
  kWeight = 0, kBias = 1, kShortcutWeight = 2, kShortcutBias = 3,  // LINEAR, GROUPNORM, CONV
  kToQ = 0, kToQBias, kToK, kToKBias, kToV, kToVBias, kToOut, kToOutBias,  // ATTENTION
  kMaxWeights = 8
};

struct CheckedOp : OpFields {
  int64_t ho = 0, wo = 0;  // CONV, RESAMPLE: the output's spatial size
  // The weights the op uses (shapes checked; null where unused); valid while the caller's weights are.
  const WeightView* weights[kMaxWeights] = {};
};

inline const char* op_name(int64_t code) {
  switch (code) {
    case kTimeEmb: return "TIME_EMB";
    case kLinear: return "LINEAR";
    case kPad: return "PAD";
    case kGroupNorm: return "GROUPNORM";
    case kConv: return "CONV";
    case kAttention: return "ATTENTION";
    case kResample: return "RESAMPLE";
    case kDivideByT: return "DIVIDE_BY_T";
    default: return "?";
  }
}

inline std::vector<float> copy_weight(const WeightView& wv) {
  int64_t n = 1;
  for (auto d : wv.shape) n *= d;
  return std::vector<float>(wv.data, wv.data + n);
}

// The weight check_plan recorded for an op in `role` (an engine asking for one it did not record is
// a bug in plan_check.h or the engine: std::logic_error).
inline const WeightView& checked_weight(const CheckedOp& c, int role) {
  if (!c.weights[role]) throw std::logic_error("plan_check.h and the engine disagree on a weight");
  return *c.weights[role];
}

inline std::vector<float> weight_copy(const CheckedOp& c, int role) { return copy_weight(checked_weight(c, role)); }

// Decodes and checks the whole plan for an engine built for in_c -> out_c channels at H x W.
// max_slot_floats: the engine's limit on one slot's per-sample size.
inline std::vector<CheckedOp> check_plan(const PlanView& pv, const std::vector<WeightView>& weights, int64_t in_c,
                                         int64_t out_c, int64_t H, int64_t W, int64_t max_slot_floats) {
  auto fail = [](const std::string& msg) { throw std::invalid_argument(msg); };
  if (pv.n_ops < 1 || !pv.ints || !pv.floats) fail("the plan has no ops");
  if (pv.n_slots < 2 || !pv.slot_sizes) fail("the plan needs at least the input and output slots");
  const int64_t* slot_size = pv.slot_sizes;
  for (int64_t s = 0; s < pv.n_slots; ++s)
    if (slot_size[s] < 0 || slot_size[s] > max_slot_floats) fail("plan slot " + std::to_string(s) + " has a bad size");
  if (slot_size[kInputSlot] != in_c * H * W)
    fail("plan input slot holds " + std::to_string(slot_size[kInputSlot]) +
         " floats per sample, expected in_channels*H*W = " + std::to_string(in_c * H * W));
  if (slot_size[kOutputSlot] != out_c * H * W)
    fail("plan output slot holds " + std::to_string(slot_size[kOutputSlot]) +
         " floats per sample, expected out_channels*H*W = " + std::to_string(out_c * H * W));

  std::vector<CheckedOp> ops;
  ops.reserve(size_t(pv.n_ops));
  for (int64_t i = 0; i < pv.n_ops; ++i) {
    const int64_t* r = pv.ints + i * kIntFields;
    const double* f = pv.floats + i * kFloatFields;
    CheckedOp op;
    op.code = r[kCode]; op.out = r[kOut]; op.in = r[kIn]; op.cin = r[kCIn];
    op.in2 = r[kIn2]; op.cin2 = r[kCIn2]; op.h = r[kH]; op.w = r[kW];
    op.cout = r[kCOut]; op.temb = r[kTemb]; op.residual = r[kResidual];
    op.scratch = r[kScratch]; op.mode = r[kMode]; op.groups = r[kGroups];
    op.heads = r[kHeads]; op.flags = r[kFlags];
    op.eps = float(f[kEps]); op.scale = float(f[kScale]); op.a = float(f[kA]); op.shift = float(f[kShift]);
    for (int j = 0; j < kFloatFields; ++j)
      if (!std::isfinite(f[j])) fail("plan op " + std::to_string(i) + " has a non-finite parameter");
    const std::string where = "plan op " + std::to_string(i) + " (" + op_name(op.code) + ")";
    if ((op.flags & ~kKnownFlags) || __builtin_popcountll(uint64_t(op.flags & kActFlags)) > 1)
      fail(where + ": flags " + std::to_string(op.flags) + " name an unknown flag or two activations");

    // Bounds that keep every size product below in int64 (channels <= 2^24, sides <= 2^16,
    // attention positions <= 2^16); far beyond any slot an engine could allocate anyway.
    auto positive = [&](int64_t v, const char* what, int64_t max = int64_t(1) << 24) {
      if (v <= 0 || v > max)
        fail(where + ": " + what + " = " + std::to_string(v) + " must be in [1, " + std::to_string(max) + "]");
    };
    auto side = [&](int64_t v, const char* what) { positive(v, what, int64_t(1) << 16); };
    // slot s must exist and hold `floats` per sample (s == -1 allowed when optional)
    auto use = [&](int64_t s, int64_t floats, const char* what, bool optional = false) {
      if (s == -1 && optional) return;
      if (s < 0 || s >= pv.n_slots)
        fail("plan op " + std::to_string(i) + ": " + what + " slot " + std::to_string(s) + " is out of range");
      if (floats > slot_size[s])
        fail("plan op " + std::to_string(i) + ": " + what + " needs " + std::to_string(floats) +
             " floats per sample but slot " + std::to_string(s) + " holds " + std::to_string(slot_size[s]));
    };
    // weight idx must exist, have data and the given shape; recorded in op.weights[role]
    auto weight = [&](int role, int64_t idx, std::vector<int64_t> shape, const char* what) {
      if (idx < 0 || idx >= int64_t(weights.size()))
        fail("plan op " + std::to_string(i) + ": " + what + " weight index " + std::to_string(idx) + " is out of range");
      const WeightView& wv = weights[size_t(idx)];
      if (wv.shape != shape) {
        std::string want, got;
        for (auto d : shape) want += (want.empty() ? "" : ", ") + std::to_string(d);
        for (auto d : wv.shape) got += (got.empty() ? "" : ", ") + std::to_string(d);
        fail("weight '" + wv.name + "' has shape (" + got + "), expected (" + want + ")");
      }
      if (!wv.data) fail("weight '" + wv.name + "' has no data");
      op.weights[role] = &wv;
    };

    // unsigned: defined for unchecked sides; each case checks the sides before it uses these
    const int64_t hw = int64_t(uint64_t(op.h) * uint64_t(op.w));
    const int64_t pplane = int64_t((uint64_t(op.h) + 2) * (uint64_t(op.w) + 2));
    switch (op.code) {
      case kTimeEmb:
        positive(op.cout, "c_out");
        use(op.out, op.cout, "output");
        if (op.mode == kTimeLearned) {  // a table [rows, c_out]: its rows are the weight's own
          const int64_t idx = r[kWIdx];
          if (idx < 0 || idx >= int64_t(weights.size()) || weights[size_t(idx)].shape.size() != 2)
            fail(where + ": a learned time embedding needs a 2-D table weight");
          weight(kWeight, idx, {weights[size_t(idx)].shape[0], op.cout}, "time embedding table");
          positive(weights[size_t(idx)].shape[0], "table rows", int64_t(1) << 40);
        } else if (op.mode == kTimeFourier) {  // frequencies [c_out / 2]
          if (op.cout % 2) fail(where + ": a Fourier time embedding needs an even width");
          weight(kWeight, r[kWIdx], {op.cout / 2}, "Fourier frequencies");
        } else if (op.mode != kTimeSinusoidal) {
          fail(where + ": unknown time embedding mode " + std::to_string(op.mode));
        }
        break;
      case kDivideByT:
        positive(op.cin, "c_in"); side(op.h, "h"); side(op.w, "w");
        use(op.in, op.cin * hw, "input");
        use(op.out, op.cin * hw, "output");
        break;
      case kLinear:
        positive(op.cin, "c_in"); positive(op.cout, "c_out");
        use(op.in, op.cin, "input"); use(op.out, op.cout, "output");
        use(op.residual, op.cout, "residual", true);
        weight(kWeight, r[kWIdx], {op.cout, op.cin}, "linear");
        weight(kBias, r[kBIdx], {op.cout}, "bias");
        break;
      case kPad:
      case kGroupNorm: {
        positive(op.cin, "c_in"); side(op.h, "h"); side(op.w, "w");
        if (op.cin2 < 0) fail(where + ": c_in2 must be >= 0");
        use(op.in, op.cin * hw, "input");
        if (op.cin2 > 0) use(op.in2, op.cin2 * hw, "second input");
        const int64_t c = op.cin + op.cin2;
        const bool padded = op.code == kPad || (op.flags & kFlagPaddedOut);
        const bool pooled = op.code == kGroupNorm && op.mode == kResamplePool;
        if (op.code == kGroupNorm && op.mode != kResampleNone && !pooled)
          fail(where + ": unknown resample mode " + std::to_string(op.mode));
        if (pooled && (!padded || op.h % 2 || op.w % 2))
          fail(where + ": a pooled output needs even sizes and a padded output");
        const int64_t out_plane = pooled ? (op.h / 2 + 2) * (op.w / 2 + 2) : padded ? pplane : hw;
        use(op.out, c * out_plane, "output");
        if (op.code == kGroupNorm) {
          if (op.groups <= 0 || c % op.groups)
            fail(where + ": " + std::to_string(c) + " channels are not divisible by " + std::to_string(op.groups) + " groups");
          if (!(op.eps > 0)) fail(where + ": eps must be > 0");
          weight(kWeight, r[kWIdx], {c}, "norm scale");
          weight(kBias, r[kBIdx], {c}, "norm shift");
          use(op.temb, 2 * c, "scale_shift rows", true);
        }
        break;
      }
      case kConv: {
        positive(op.cin, "c_in"); positive(op.cout, "c_out"); side(op.h, "h"); side(op.w, "w");
        const int64_t M = op.cout, ci = op.cin;
        const int64_t k = op.mode == kConv1 ? 1 : 3;
        weight(kWeight, r[kWIdx], {M, ci, k, k}, "conv");
        weight(kBias, r[kBIdx], {M}, "conv bias");
        if (op.in2 >= 0) {
          if (op.mode != kConv3) fail(where + ": a shortcut input needs a 3x3 stride-1 conv");
          positive(op.cin2, "c_in2");
          use(op.in2, op.cin2 * pplane, "shortcut input");
          weight(kShortcutWeight, r[kW2Idx], {M, op.cin2, 1, 1}, "shortcut");
          weight(kShortcutBias, r[kB2Idx], {M}, "shortcut bias");
        }
        op.ho = op.h; op.wo = op.w;
        if (op.mode == kDown0 || op.mode == kDown1) {
          if (op.h % 2 || op.w % 2) fail(where + ": a stride-2 conv needs even sizes");
          op.ho = op.h / 2; op.wo = op.w / 2;
        } else if (op.mode == kUp) {
          op.ho = op.h * 2; op.wo = op.w * 2;
        } else if (op.mode != kConv3 && op.mode != kConv1) {
          fail(where + ": unknown conv mode " + std::to_string(op.mode));
        }
        use(op.out, M * op.ho * op.wo, "output");
        use(op.temb, M, "time embedding", true);
        use(op.residual, M * op.ho * op.wo, "residual", true);
        if (op.mode == kConv3 || op.mode == kUp) {
          use(op.in, ci * pplane, "input (padded)");
        } else {
          use(op.in, ci * hw, "input");
        }
        if (op.mode == kDown0 || op.mode == kDown1) use(op.scratch, ci * 9 * op.ho * op.wo, "im2col scratch");
        break;
      }
      case kResample: {
        positive(op.cin, "c_in"); side(op.h, "h"); side(op.w, "w");
        if (op.cout != op.cin) fail(where + ": c_out must equal c_in");
        if (op.mode == kResamplePool || op.mode == kResampleFirDown) {
          if (op.h % 2 || op.w % 2) fail(where + ": downsampling needs even sizes");
          op.ho = op.h / 2; op.wo = op.w / 2;
        } else if (op.mode == kResampleNearest || op.mode == kResampleFirUp) {
          op.ho = op.h * 2; op.wo = op.w * 2;
        } else {
          fail(where + ": unknown resample mode " + std::to_string(op.mode));
        }
        use(op.in, op.cin * hw, "input");
        const int64_t plane = (op.flags & kFlagPaddedOut) ? (op.ho + 2) * (op.wo + 2) : op.ho * op.wo;
        use(op.out, op.cin * plane, "output");
        break;
      }
      case kAttention: {
        positive(op.cin, "c_in"); side(op.h, "h"); side(op.w, "w"); positive(op.heads, "heads");
        positive(hw, "positions h*w", int64_t(1) << 16);
        const int64_t C = op.cin, L = hw;
        if (C % op.heads)
          fail(where + ": " + std::to_string(C) + " channels cannot be split into " + std::to_string(op.heads) + " heads");
        use(op.in, C * L, "input");
        use(op.residual, C * L, "residual");
        use(op.out, C * L, "output");
        use(op.scratch, 4 * C * L + op.heads * L * L, "scratch");
        const int64_t w0 = r[kWIdx];
        weight(kToQ, w0, {C, C}, "to_q");
        weight(kToQBias, w0 + 1, {C}, "to_q bias");
        weight(kToK, w0 + 2, {C, C}, "to_k");
        weight(kToKBias, w0 + 3, {C}, "to_k bias");
        weight(kToV, w0 + 4, {C, C}, "to_v");
        weight(kToVBias, w0 + 5, {C}, "to_v bias");
        weight(kToOut, w0 + 6, {C, C}, "to_out.0");
        weight(kToOutBias, w0 + 7, {C}, "to_out.0 bias");
        break;
      }
      default:
        fail("plan op " + std::to_string(i) + " has unknown op code " + std::to_string(op.code));
    }
    ops.push_back(op);
  }
  return ops;
}

// The class embedding's width when the plan is class-conditional, else 0: slot kClassSlot is then
// an input (plan.py CLASS_SLOT), read by some op and written by none, of slot_sizes[2] floats per
// sample. (In an unconditional plan slot 2 is an ordinary slot, written before it is read.)
inline int64_t class_embedding_width(const PlanView& pv, const std::vector<CheckedOp>& ops) {
  if (pv.n_slots <= kClassSlot) return 0;
  bool read = false;
  for (const CheckedOp& op : ops) {
    if (op.out == kClassSlot || op.scratch == kClassSlot) return 0;
    read = read || op.in == kClassSlot || op.in2 == kClassSlot || op.temb == kClassSlot || op.residual == kClassSlot;
  }
  return read ? pv.slot_sizes[kClassSlot] : 0;
}

}  // namespace plan
}  // namespace fastddpm
