// The plan's array layout. The names below are exported by both extensions (layout(), see
// csrc/layout_dict.h) and tests/test_layout.py asserts that plan.py and the numba engine use the
// same codes, columns and flags.
// A plan is ints [n_ops, kIntFields] (int64), floats [n_ops, kFloatFields] (float64) and
// slot_sizes [n_slots] (per-sample floats). Slot 0 = the U-Net input, slot 1 = the model output;
// on a class-conditional model slot 2 is the class embedding [time_embed_dim], an input the engine
// fills from the caller (plan.py CLASS_SLOT: no op writes it).
#pragma once
#include <cstdint>

namespace fastddpm {
namespace plan {

enum OpCode : int64_t {
  kTimeEmb = 1, kLinear = 2, kPad = 3, kGroupNorm = 4, kConv = 5, kAttention = 6, kResample = 7, kDivideByT = 8
};
enum ConvMode : int64_t { kConv3 = 0, kConv1 = 1, kDown1 = 2, kDown0 = 3, kUp = 4 };
// The mode column of RESAMPLE (and of GROUPNORM, which may average-pool its output): 2x2 average
// pooling, or (RESAMPLE only) nearest x2 upsampling and score-SDE's [1, 3, 3, 1] FIR down / up
// (separable, zero outside: down y[i] = (x[2i-1] + 3x[2i] + 3x[2i+1] + x[2i+2]) / 8 per axis; up
// y[2i] = (x[i-1] + 3x[i]) / 4, y[2i+1] = (3x[i] + x[i+1]) / 4); 0 = no resampling (GROUPNORM).
enum ResampleMode : int64_t {
  kResampleNone = 0, kResamplePool = 1, kResampleNearest = 2, kResampleFirDown = 3, kResampleFirUp = 4
};
// The mode column of TIME_EMB: the sinusoidal embedding, a learned table's row t, or the Gaussian
// Fourier projection [sin, cos](2 pi W ln t).
enum TimeMode : int64_t { kTimeSinusoidal = 0, kTimeLearned = 1, kTimeFourier = 2 };

// Columns of the int rows (plan.INT_FIELDS).
enum IntField : int {
  kCode = 0, kOut, kIn, kCIn, kIn2, kCIn2, kH, kW, kCOut, kWIdx, kBIdx, kW2Idx, kB2Idx, kTemb,
  kResidual, kScratch, kMode, kGroups, kHeads, kFlags, kIntFields
};
// Columns of the float rows (plan.FLOAT_FIELDS).
enum FloatField : int { kEps = 0, kScale, kA, kShift, kFloatFields };

// The activation flags (SiLU, Mish, GELU (erf), ReLU): at most one per op; none = identity.
enum Flags : int64_t {
  kFlagSilu = 1, kFlagPaddedOut = 2, kFlagFlip = 4, kFlagMish = 8, kFlagGelu = 16, kFlagRelu = 32
};
constexpr int64_t kActFlags = kFlagSilu | kFlagMish | kFlagGelu | kFlagRelu;
constexpr int64_t kKnownFlags = kActFlags | kFlagPaddedOut | kFlagFlip;

// The activation of an op as the kernels take it (engine_kernels.h, numba's _act, ops.cu).
enum Act : int { kActNone = 0, kActSilu = 1, kActMish = 2, kActGelu = 3, kActRelu = 4 };
inline int act_of(int64_t flags) {
  return (flags & kFlagSilu) ? kActSilu : (flags & kFlagMish) ? kActMish : (flags & kFlagGelu) ? kActGelu
         : (flags & kFlagRelu) ? kActRelu : kActNone;
}

// Names as plan.py spells them (the Op attribute of each int column; "code" and "flags" are derived).
constexpr const char* kIntFieldNames[kIntFields] = {
    "code", "out", "in_", "c_in", "in2", "c_in2", "h", "w", "c_out", "w_idx", "b_idx", "w2_idx", "b2_idx",
    "temb", "residual", "scratch", "mode", "groups", "heads", "flags"};
constexpr const char* kFloatFieldNames[kFloatFields] = {"eps", "scale", "a", "shift"};
struct NamedCode {
  const char* name;
  int64_t value;
};
constexpr NamedCode kOpCodeNames[] = {{"TIME_EMB", kTimeEmb}, {"LINEAR", kLinear}, {"PAD", kPad},
                                      {"GROUPNORM", kGroupNorm}, {"CONV", kConv}, {"ATTENTION", kAttention},
                                      {"RESAMPLE", kResample}, {"DIVIDE_BY_T", kDivideByT}};
constexpr NamedCode kResampleModeNames[] = {{"NONE", kResampleNone}, {"POOL", kResamplePool},
                                            {"NEAREST", kResampleNearest}, {"FIR_DOWN", kResampleFirDown},
                                            {"FIR_UP", kResampleFirUp}};

// The taps of one output index o of the FIR modes along an axis of n inputs: up to 4 (index,
// weight) pairs, out-of-range inputs dropped (zero). Shared by the CPU and CUDA engines.
struct FirTaps {
  int count = 0;
  int64_t index[4] = {0, 0, 0, 0};
  float weight[4] = {0, 0, 0, 0};
};
#if defined(__CUDACC__)
#define FDDPM_PLAN_HD __host__ __device__ __forceinline__
#else
#define FDDPM_PLAN_HD inline
#endif
FDDPM_PLAN_HD void fir_add(FirTaps& t, int64_t i, int64_t n, float wgt) {
  if (i >= 0 && i < n) {
    t.index[t.count] = i;
    t.weight[t.count] = wgt;
    ++t.count;
  }
}
FDDPM_PLAN_HD FirTaps fir_taps(bool up, int64_t o, int64_t n) {
  FirTaps t;
  if (up) {
    const int64_t i = o / 2;
    if (o % 2 == 0) { fir_add(t, i - 1, n, 0.25f); fir_add(t, i, n, 0.75f); }
    else { fir_add(t, i, n, 0.75f); fir_add(t, i + 1, n, 0.25f); }
  } else {
    fir_add(t, 2 * o - 1, n, 0.125f); fir_add(t, 2 * o, n, 0.375f);
    fir_add(t, 2 * o + 1, n, 0.375f); fir_add(t, 2 * o + 2, n, 0.125f);
  }
  return t;
}
constexpr NamedCode kTimeModeNames[] = {{"SINUSOIDAL", kTimeSinusoidal}, {"LEARNED", kTimeLearned},
                                        {"FOURIER", kTimeFourier}};
constexpr NamedCode kConvModeNames[] = {{"CONV3", kConv3}, {"CONV1", kConv1}, {"DOWN1", kDown1},
                                        {"DOWN0", kDown0}, {"UP", kUp}};
constexpr NamedCode kFlagNames[] = {{"silu", kFlagSilu}, {"padded_out", kFlagPaddedOut}, {"flip", kFlagFlip},
                                    {"mish", kFlagMish}, {"gelu", kFlagGelu}, {"relu", kFlagRelu}};

constexpr int64_t kInputSlot = 0;
constexpr int64_t kOutputSlot = 1;
constexpr int64_t kClassSlot = 2;

}  // namespace plan
}  // namespace fastddpm
