// The engine's non-GEMM kernels: time embedding, linear, pad, group norm (+scale_shift, activation, padded output),
// stride-2 im2col, row softmax, and the two bookkeeping kernels of the captured loop.
// Everything in fp32 (the dtype option only changes the GEMM operands).
#include <cuda_runtime.h>

#include <cstdint>

#include "engine_kernels.cuh"
#include "fastddpm/plan.h"

namespace fastddpm {
namespace cuda {
namespace {

__device__ __forceinline__ float silu(float v) { return v / (1.0f + expf(-v)); }

// The plan's activations (fastddpm/plan.h Act); Mish and GELU in double, as the CPU engines.
__device__ __forceinline__ float activate(float v, int act) {
  switch (act) {
    case 1: return silu(v);
    case 2: return v > 20.0f ? v : float(double(v) * tanh(log1p(exp(double(v)))));
    case 3: return float(0.5 * double(v) * (1.0 + erf(double(v) * 0.70710678118654752440)));
    case 4: return v > 0.0f ? v : 0.0f;
    default: return v;
  }
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Sum (or max) over the block; every thread gets the result. blockDim.x a multiple of 32, <= 1024.
template <bool kMax>
__device__ float block_reduce(float v, float* scratch /* [32] */) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
  v = kMax ? warp_max(v) : warp_sum(v);
  __syncthreads();  // scratch may still be read by a previous reduction
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  v = lane < warps ? scratch[lane] : (kMax ? -INFINITY : 0.0f);
  return kMax ? warp_max(v) : warp_sum(v);
}

__global__ void time_emb_kernel(const float* __restrict__ t, float* __restrict__ out, int64_t o_bstride, int n,
                                int dim, float shift, bool flip) {
  const int half = dim / 2;
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n * (half + 1)) return;
  const int b = i / (half + 1), k = i % (half + 1);
  float* e = out + int64_t(b) * o_bstride;  // e: [dim]
  if (k == half) {  // the zero column of an odd dim
    if (dim % 2) e[dim - 1] = 0.0f;
    return;
  }
  // as the CPU engine (and torch in float32): exponent in float, exp / sin / cos rounded from double
  const float ex = (-float(9.210340371976184) * float(k)) / (float(half) - shift);  // -ln(1e4) * k / div
  const float freq = float(exp(double(ex)));
  const float arg = t[b] * freq;
  const float s = float(sin(double(arg))), c = float(cos(double(arg)));
  e[k] = flip ? c : s;
  e[half + k] = flip ? s : c;
}

// One warp per output (b, o). res: null, or a residual added last (the class embedding).
__global__ void linear_kernel(const float* __restrict__ in, int64_t i_bstride, float* __restrict__ out,
                              int64_t o_bstride, const float* __restrict__ W, const float* __restrict__ bias,
                              const float* __restrict__ res, int64_t r_bstride, int n, int cin, int cout, int act) {
  const int64_t wid = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  const int lane = threadIdx.x % 32;
  if (wid >= int64_t(n) * cout) return;
  const int b = int(wid / cout), o = int(wid % cout);
  const float* x = in + int64_t(b) * i_bstride;
  const float* w = W + int64_t(o) * cin;
  float s = 0.0f;
  for (int k = lane; k < cin; k += 32) s = fmaf(w[k], activate(x[k], act), s);
  s = warp_sum(s);
  if (lane == 0) {
    float v = s + bias[o];
    if (res) v += res[int64_t(b) * r_bstride + o];
    out[int64_t(b) * o_bstride + o] = v;
  }
}

__device__ __forceinline__ const float* concat_channel(const Concat& c, int b, int ch) {
  const int64_t hw = int64_t(c.h) * c.w;
  return ch < c.cin ? c.in + int64_t(b) * c.i_bstride + ch * hw
                    : c.in2 + int64_t(b) * c.i2_bstride + (ch - c.cin) * hw;
}

__global__ void pad_kernel(const Concat c, float* __restrict__ out, int64_t o_bstride, int n, float a, float sh) {
  const int C = c.cin + c.cin2, Wp = c.w + 2, plane = (c.h + 2) * Wp;
  const int64_t total = int64_t(n) * C * plane;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const int q = int(i % plane);
    const int64_t r = i / plane;
    const int ch = int(r % C), b = int(r / C);
    const int y = q / Wp - 1, x = q % Wp - 1;
    float v = 0.0f;
    if (y >= 0 && y < c.h && x >= 0 && x < c.w) v = a * concat_channel(c, b, ch)[y * c.w + x] + sh;
    out[int64_t(b) * o_bstride + int64_t(ch) * plane + q] = v;
  }
}

// One block per (sample, group): mean, then the biased variance as a second pass over the data
// (as the CPU engine: no E[x^2] - mean^2 cancellation), then the affine (with the scale_shift
// rows ss [N, 2C] when not null) and the activation into out.
__global__ void groupnorm_kernel(const Concat c, float* __restrict__ out, int64_t o_bstride, int groups,
                                 float eps, const float* __restrict__ gamma, const float* __restrict__ beta,
                                 const float* __restrict__ ss, int64_t ss_bstride, int act, bool padded,
                                 bool pool) {
  __shared__ float scratch[32];
  const int b = blockIdx.x / groups, g = blockIdx.x % groups;
  const int C = c.cin + c.cin2, cpg = C / groups, hw = c.h * c.w;
  const int count = cpg * hw;
  float s = 0.0f;
  for (int i = threadIdx.x; i < count; i += blockDim.x) s += concat_channel(c, b, g * cpg + i / hw)[i % hw];
  const float mean = block_reduce<false>(s, scratch) / float(count);
  float v = 0.0f;
  for (int i = threadIdx.x; i < count; i += blockDim.x) {
    const float d = concat_channel(c, b, g * cpg + i / hw)[i % hw] - mean;
    v = fmaf(d, d, v);
  }
  const float rstd = rsqrtf(block_reduce<false>(v, scratch) / float(count) + eps);
  float* o = out + int64_t(b) * o_bstride;
  const float* sb = ss ? ss + int64_t(b) * ss_bstride : nullptr;
  auto affine = [&](int ch, float& a, float& sh) {
    a = rstd * gamma[ch];
    sh = beta[ch] - mean * a;
    if (sb) {
      const float s1 = 1.0f + sb[ch];
      a *= s1;
      sh = sh * s1 + sb[C + ch];
    }
  };
  if (!padded) {
    for (int i = threadIdx.x; i < count; i += blockDim.x) {
      const int ch = g * cpg + i / hw;
      float a, sh;
      affine(ch, a, sh);
      o[int64_t(ch) * hw + i % hw] = activate(a * concat_channel(c, b, ch)[i % hw] + sh, act);
    }
    return;
  }
  // out: [C, h+2, w+2] (pool: the 2x2 average pooling, [C, h/2+2, w/2+2]), zero border
  const int oh = pool ? c.h / 2 : c.h, ow = pool ? c.w / 2 : c.w, Wp = ow + 2, plane = (oh + 2) * Wp;
  for (int i = threadIdx.x; i < cpg * plane; i += blockDim.x) {
    const int ch = g * cpg + i / plane, q = i % plane, y = q / Wp - 1, x = q % Wp - 1;
    float val = 0.0f;
    if (y >= 0 && y < oh && x >= 0 && x < ow) {
      float a, sh;
      affine(ch, a, sh);
      const float* src = concat_channel(c, b, ch);
      if (pool) {
        const float* r0 = src + 2 * y * c.w + 2 * x;
        val = 0.25f * (((activate(a * r0[0] + sh, act) + activate(a * r0[1] + sh, act)) +
                        activate(a * r0[c.w] + sh, act)) + activate(a * r0[c.w + 1] + sh, act));
      } else {
        val = activate(a * src[y * c.w + x] + sh, act);
      }
    }
    o[int64_t(ch) * plane + q] = val;
  }
}

// out[b][c] = avg-pool 2x2, nearest x2 or FIR down / up (plan::ResampleMode) of in[b][c] [h, w];
// padded: a zero border around it.
__global__ void resample_kernel(const float* __restrict__ in, int64_t i_bstride, float* __restrict__ out,
                                int64_t o_bstride, int n, int C, int h, int w, int mode, bool padded) {
  const bool pool = mode == plan::kResamplePool || mode == plan::kResampleFirDown;
  const bool fir = mode == plan::kResampleFirDown || mode == plan::kResampleFirUp;
  const int oh = pool ? h / 2 : 2 * h, ow = pool ? w / 2 : 2 * w, p = padded ? 1 : 0;
  const int Wp = ow + 2 * p, plane = (oh + 2 * p) * Wp;
  const int64_t total = int64_t(n) * C * plane;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const int q = int(i % plane);
    const int64_t r = i / plane;
    const int ch = int(r % C), b = int(r / C);
    const int y = q / Wp - p, x = q % Wp - p;
    const float* src = in + int64_t(b) * i_bstride + int64_t(ch) * h * w;
    float v = 0.0f;
    if (y >= 0 && y < oh && x >= 0 && x < ow) {
      if (fir) {   // the same tap order as the CPU engine: rows filtered along x, then summed along y
        const bool up = mode == plan::kResampleFirUp;
        const plan::FirTaps ty = plan::fir_taps(up, y, h), tx = plan::fir_taps(up, x, w);
        for (int a = 0; a < ty.count; ++a) {
          float row = 0.0f;
          for (int j = 0; j < tx.count; ++j) row += tx.weight[j] * src[ty.index[a] * w + tx.index[j]];
          v += ty.weight[a] * row;
        }
      } else if (pool) {
        const float* r0 = src + 2 * y * w + 2 * x;
        v = 0.25f * (((r0[0] + r0[1]) + r0[w]) + r0[w + 1]);
      } else {
        v = src[(y / 2) * w + x / 2];
      }
    }
    out[int64_t(b) * o_bstride + int64_t(ch) * plane + q] = v;
  }
}

__global__ void im2col_s2_kernel(const float* __restrict__ in, int64_t i_bstride, float* __restrict__ col,
                                 int64_t c_bstride, int n, int C, int h, int w, int pad) {
  const int ho = h / 2, wo = w / 2, howo = ho * wo;
  const int64_t total = int64_t(n) * C * 9 * howo;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const int q = int(i % howo);
    const int64_t r = i / howo;
    const int tap = int(r % (C * 9)), b = int(r / (C * 9));
    const int ch = tap / 9, dy = tap % 9 / 3, dx = tap % 3;
    const int y = 2 * (q / wo) + dy - pad, x = 2 * (q % wo) + dx - pad;
    const float v = (y >= 0 && y < h && x >= 0 && x < w) ? in[int64_t(b) * i_bstride + int64_t(ch) * h * w + y * w + x] : 0.0f;
    col[int64_t(b) * c_bstride + int64_t(tap) * howo + q] = v;
  }
}

// One block per row.
__global__ void softmax_rows_kernel(float* __restrict__ S, int64_t bstride, int rows, int len) {
  __shared__ float scratch[32];
  const int b = blockIdx.x / rows, r = blockIdx.x % rows;
  float* row = S + int64_t(b) * bstride + int64_t(r) * len;
  float mx = -INFINITY;
  for (int j = threadIdx.x; j < len; j += blockDim.x) mx = fmaxf(mx, row[j]);
  mx = block_reduce<true>(mx, scratch);
  float s = 0.0f;
  for (int j = threadIdx.x; j < len; j += blockDim.x) s += expf(row[j] - mx);
  const float inv = 1.0f / block_reduce<false>(s, scratch);
  for (int j = threadIdx.x; j < len; j += blockDim.x) row[j] = expf(row[j] - mx) * inv;
}

__global__ void loop_begin_kernel(const LoopState* __restrict__ state, const float* __restrict__ model_t,
                                  float* __restrict__ tvals, int n) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) tvals[i] = model_t[state->step];
}

__global__ void scale_kernel(float* __restrict__ x, int64_t count, float s) {
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < count; i += stride) x[i] *= s;
}

__global__ void loop_advance_kernel(LoopState* state) { state->step += 1; }

unsigned blocks_for(int64_t total, int threads) {
  const int64_t b = (total + threads - 1) / threads;
  return unsigned(b < 65536 * 8 ? (b > 0 ? b : 1) : 65536 * 8);  // grid-stride loops cover the rest
}

}  // namespace

__global__ void time_table_kernel(const float* __restrict__ t, const float* __restrict__ table, int64_t rows,
                                  float* __restrict__ out, int64_t o_bstride, int n, int dim) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= int64_t(n) * dim) return;
  const int b = int(i / dim), k = int(i % dim);
  const int64_t row = min(max(int64_t(t[b]), int64_t(0)), rows - 1);
  out[int64_t(b) * o_bstride + k] = table[row * dim + k];
}

__global__ void time_fourier_kernel(const float* __restrict__ t, const float* __restrict__ freqs,
                                    float* __restrict__ out, int64_t o_bstride, int n, int half) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= int64_t(n) * half) return;
  const int b = int(i / half), k = int(i % half);
  const double arg = log(double(t[b])) * double(freqs[k]) * 2.0 * 3.14159265358979323846;  // as the CPU engines
  out[int64_t(b) * o_bstride + k] = float(sin(arg));
  out[int64_t(b) * o_bstride + half + k] = float(cos(arg));
}

cudaError_t launch_time_fourier(const float* t, const float* freqs, float* out, int64_t o_bstride, int n, int dim,
                                cudaStream_t st) {
  const int64_t total = int64_t(n) * (dim / 2);
  time_fourier_kernel<<<unsigned((total + 127) / 128), 128, 0, st>>>(t, freqs, out, o_bstride, n, dim / 2);
  return cudaGetLastError();
}

__global__ void divide_by_t_kernel(const float* __restrict__ in, int64_t i_bstride, float* __restrict__ out,
                                   int64_t o_bstride, const float* __restrict__ t, int n, int64_t per) {
  const int64_t total = int64_t(n) * per;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const int b = int(i / per);
    const int64_t j = i % per;
    out[int64_t(b) * o_bstride + j] = in[int64_t(b) * i_bstride + j] / t[b];
  }
}

cudaError_t launch_divide_by_t(const float* in, int64_t i_bstride, float* out, int64_t o_bstride, const float* t,
                               int n, int64_t per, cudaStream_t st) {
  divide_by_t_kernel<<<blocks_for(int64_t(n) * per, 256), 256, 0, st>>>(in, i_bstride, out, o_bstride, t, n, per);
  return cudaGetLastError();
}

cudaError_t launch_time_table(const float* t, const float* table, int64_t rows, float* out, int64_t o_bstride, int n,
                              int dim, cudaStream_t st) {
  const int64_t total = int64_t(n) * dim;
  time_table_kernel<<<unsigned((total + 127) / 128), 128, 0, st>>>(t, table, rows, out, o_bstride, n, dim);
  return cudaGetLastError();
}

cudaError_t launch_time_emb(const float* t, float* out, int64_t o_bstride, int n, int dim, float shift, bool flip,
                            cudaStream_t st) {
  const int64_t total = int64_t(n) * (dim / 2 + 1);
  time_emb_kernel<<<unsigned((total + 127) / 128), 128, 0, st>>>(t, out, o_bstride, n, dim, shift, flip);
  return cudaGetLastError();
}

cudaError_t launch_linear(const float* in, int64_t i_bstride, float* out, int64_t o_bstride, const float* W,
                          const float* bias, const float* res, int64_t r_bstride, int n, int cin, int cout, int act,
                          cudaStream_t st) {
  const int64_t threads = int64_t(n) * cout * 32;
  linear_kernel<<<unsigned((threads + 255) / 256), 256, 0, st>>>(in, i_bstride, out, o_bstride, W, bias, res,
                                                                  r_bstride, n, cin, cout, act);
  return cudaGetLastError();
}

cudaError_t launch_pad(const Concat& c, float* out, int64_t o_bstride, int n, float a, float b, cudaStream_t st) {
  const int64_t total = int64_t(n) * (c.cin + c.cin2) * (c.h + 2) * (c.w + 2);
  pad_kernel<<<blocks_for(total, 256), 256, 0, st>>>(c, out, o_bstride, n, a, b);
  return cudaGetLastError();
}

cudaError_t launch_groupnorm(const Concat& c, float* out, int64_t o_bstride, int n, int groups, float eps,
                             const float* gamma, const float* beta, const float* ss, int64_t ss_bstride, int act,
                             bool padded, bool pool, cudaStream_t st) {
  // threads from the per-sample size only (the reduction order, so the bits, must not depend on
  // the batch): a block per (sample, group) is few blocks at batch 1, so each gets more threads
  const int64_t count = int64_t(c.cin + c.cin2) / groups * c.h * c.w;
  const int threads = count >= 16384 ? 1024 : count >= 4096 ? 512 : 256;
  groupnorm_kernel<<<unsigned(n * groups), threads, 0, st>>>(c, out, o_bstride, groups, eps, gamma, beta, ss, ss_bstride,
                                                              act, padded, pool);
  return cudaGetLastError();
}

cudaError_t launch_resample(const float* in, int64_t i_bstride, float* out, int64_t o_bstride, int n, int C, int h,
                            int w, int mode, bool padded, cudaStream_t st) {
  const bool down = mode == plan::kResamplePool || mode == plan::kResampleFirDown;
  const int oh = down ? h / 2 : 2 * h, ow = down ? w / 2 : 2 * w, p = padded ? 2 : 0;
  const int64_t total = int64_t(n) * C * (oh + p) * (ow + p);
  resample_kernel<<<blocks_for(total, 256), 256, 0, st>>>(in, i_bstride, out, o_bstride, n, C, h, w, mode, padded);
  return cudaGetLastError();
}

cudaError_t launch_im2col_s2(const float* in, int64_t i_bstride, float* col, int64_t c_bstride, int n, int C,
                             int h, int w, int pad, cudaStream_t st) {
  const int64_t total = int64_t(n) * C * 9 * (h / 2) * (w / 2);
  im2col_s2_kernel<<<blocks_for(total, 256), 256, 0, st>>>(in, i_bstride, col, c_bstride, n, C, h, w, pad);
  return cudaGetLastError();
}

cudaError_t launch_softmax_rows(float* S, int64_t bstride, int rows, int len, int n, cudaStream_t st) {
  softmax_rows_kernel<<<unsigned(int64_t(n) * rows), 128, 0, st>>>(S, bstride, rows, len);
  return cudaGetLastError();
}

cudaError_t launch_loop_begin(const LoopState* state, const float* model_t, float* tvals, int n,
                              cudaStream_t st) {
  loop_begin_kernel<<<unsigned((n + 127) / 128), 128, 0, st>>>(state, model_t, tvals, n);
  return cudaGetLastError();
}

cudaError_t launch_scale(float* x, int64_t count, float s, cudaStream_t st) {
  scale_kernel<<<blocks_for(count, 256), 256, 0, st>>>(x, count, s);
  return cudaGetLastError();
}

cudaError_t launch_loop_advance(LoopState* state, cudaStream_t st) {
  loop_advance_kernel<<<1, 1, 0, st>>>(state);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace fastddpm
