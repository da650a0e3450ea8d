// The engine's GEMMs: the implicit-GEMM convolution (tensor cores via WMMA, or fp32 FMA) with the
// plan's fused epilogue, and a plain fp32 strided batched GEMM for attention.
//
// launch_gemm: block tile 64 (output channels) x 64 (pixels), K chunks of 16, 128 threads.
// Each chunk stages A (weights, already in the operand type) and B (gathered from the input at
// boff[k] + p, converted to the operand type) in shared memory; the next chunk's loads are issued
// into registers before this chunk's multiply, so their latency overlaps it; then
//   kTF32: 4 warps x (2x2 fragments of m16n16k8 tf32), two k8 sub-steps;
//   kBF16 / kF16: 4 warps x (2x2 fragments of m16n16k16), fp32 accumulators;
//   kF32: every thread an 8x4 register tile of fp32 FMAs (exact fp32, no TF32).
// The accumulators go through shared memory to the epilogue, which maps columns to pixels (drops
// the pad columns of the padded grid, scatters the phases of the folded upsample) and adds bias,
// time embedding and residual, then scales.
// Split K (g.splits > 1, for grids too small to fill the GPU at small batches): block x = (pixel
// tile, split) multiplies its own range of K chunks and writes the raw tile to the workspace; a second
// kernel sums the splits in a fixed order and applies the epilogue, so results stay deterministic
// and, the split count being fixed per layer, independent of the batch.
// TF32 and BF16 WMMA need sm_80+; on older archs those instantiations compile to no-ops and the
// engine never launches them (it resolves the precision against the device at creation).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <algorithm>
#include <cstdint>

#include "engine_kernels.cuh"

namespace fastddpm {
namespace cuda {
namespace {

namespace wmma = nvcuda::wmma;

constexpr int TM = kGemmTileM, TP = kGemmTileP, TK = kGemmTileK;
constexpr int LDA = TK + 8;  // shared row strides: multiples of 8 elements keep WMMA pointers 32-byte aligned
constexpr int LDB = TP + 8;
constexpr int LDC = TP + 4;
constexpr int kThreads = 128;

template <Precision P> struct Operand { using T = float; };
template <> struct Operand<Precision::kBF16> { using T = __nv_bfloat16; };
template <> struct Operand<Precision::kF16> { using T = __half; };

template <Precision P>
__device__ __forceinline__ typename Operand<P>::T to_operand(float v) {
  if constexpr (P == Precision::kBF16) {
    return __float2bfloat16_rn(v);
  } else if constexpr (P == Precision::kF16) {
    return __float2half_rn(v);
  } else if constexpr (P == Precision::kTF32) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    return wmma::__float_to_tf32(v);
#else
    return v;
#endif
  } else {
    return v;
  }
}

template <Precision P>
struct Smem {  // bytes of shared memory: the staging tiles, later reused for the fp32 output tile
  static constexpr int kTiles = int(sizeof(typename Operand<P>::T)) * (TM * LDA + TK * LDB);
  static constexpr int kBytes = kTiles > 4 * TM * LDC ? kTiles : 4 * TM * LDC;
};

// True where this instantiation's tensor-core path exists for the arch being compiled.
template <Precision P>
__device__ constexpr bool tc_supported() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  return true;
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 700
  return P == Precision::kF16 || P == Precision::kF32;
#else
  return P == Precision::kF32;
#endif
}

// The 2x2 fragments of one warp over the k chunk in shared memory (32 x 32 of the 64 x 64 tile).
template <Precision P>
__device__ __forceinline__ void warp_mma(const typename Operand<P>::T* As, const typename Operand<P>::T* Bs,
                                         int wm, int wp, void* accs) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 700
  if constexpr (P == Precision::kTF32) {
#if __CUDA_ARCH__ >= 800
    using Acc = wmma::fragment<wmma::accumulator, 16, 16, 8, float>;
    Acc* acc = static_cast<Acc*>(accs);
#pragma unroll
    for (int kk = 0; kk < TK; kk += 8) {
      wmma::fragment<wmma::matrix_a, 16, 16, 8, wmma::precision::tf32, wmma::row_major> fa[2];
      wmma::fragment<wmma::matrix_b, 16, 16, 8, wmma::precision::tf32, wmma::row_major> fb[2];
#pragma unroll
      for (int i = 0; i < 2; ++i) wmma::load_matrix_sync(fa[i], As + (wm * 32 + i * 16) * LDA + kk, LDA);
#pragma unroll
      for (int j = 0; j < 2; ++j) wmma::load_matrix_sync(fb[j], Bs + kk * LDB + wp * 32 + j * 16, LDB);
#pragma unroll
      for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i * 2 + j], fa[i], fb[j], acc[i * 2 + j]);
    }
#endif
  } else if constexpr (P == Precision::kBF16 || P == Precision::kF16) {
#if __CUDA_ARCH__ >= 800
    constexpr bool ok = true;
#else
    constexpr bool ok = P == Precision::kF16;
#endif
    if constexpr (ok) {
      using T = typename Operand<P>::T;
      using Acc = wmma::fragment<wmma::accumulator, 16, 16, 16, float>;
      Acc* acc = static_cast<Acc*>(accs);
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fa[2];
      wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> fb[2];
#pragma unroll
      for (int i = 0; i < 2; ++i) wmma::load_matrix_sync(fa[i], As + (wm * 32 + i * 16) * LDA, LDA);
#pragma unroll
      for (int j = 0; j < 2; ++j) wmma::load_matrix_sync(fb[j], Bs + wp * 32 + j * 16, LDB);
#pragma unroll
      for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i * 2 + j], fa[i], fb[j], acc[i * 2 + j]);
    }
  }
#endif
}

// out[...] of column p of output channel m of sample b, from the finished sum acc (the epilogue).
__device__ __forceinline__ void store_output(const GemmDev& g, int b, int m, int p, float acc) {
  const int y = p / g.Wp, x = p - y * g.Wp;
  if (x >= g.Wv) return;  // a pad column of the padded grid
  const int64_t o = int64_t(m) * g.ocs + int64_t(y) * g.oys + int64_t(x) * g.oxs + g.ooff;
  float add = 0.0f;
  if (g.bias) add += g.bias[m];
  if (g.temb) add += g.temb[int64_t(b) * g.t_bstride + m];
  float v = acc + add;
  if (g.res) v += g.res[int64_t(b) * g.r_bstride + o];
  g.out[int64_t(b) * g.o_bstride + o] = v * g.scale;
}

template <Precision P>
__global__ void __launch_bounds__(kThreads) conv_gemm_kernel(const GemmDev g) {
  using T = typename Operand<P>::T;
  __shared__ __align__(128) unsigned char smem[Smem<P>::kBytes];
  T* As = reinterpret_cast<T*>(smem);    // [TM][LDA]: A[m0 + r][k0 + kk]
  T* Bs = As + TM * LDA;                 // [TK][LDB]: B[k0 + kk][p0 + pp]
  float* Cs = reinterpret_cast<float*>(smem);  // [TM][LDC]: the finished tile (after the K loop)

  const int tid = threadIdx.x, b = blockIdx.z, split = blockIdx.x % g.splits;
  const int m0 = blockIdx.y * TM, p0 = (blockIdx.x / g.splits) * TP;
  const int k_begin = split * g.split_k, k_end = min(g.Kpad, k_begin + g.split_k);  // this block's K range
  const float* src = g.src + int64_t(b) * g.s_bstride;
  const T* A = static_cast<const T*>(g.A);
  constexpr bool kTensor = P != Precision::kF32;

  // accumulators: tensor-core fragments (as raw storage, typed in warp_mma) or an fp32 register tile
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 700
#if __CUDA_ARCH__ >= 800
  constexpr int kAccK = P == Precision::kTF32 ? 8 : 16;
#else
  constexpr int kAccK = 16;  // no k8 (tf32) fragments before sm_80: a placeholder, never launched
#endif
  using AccT = wmma::fragment<wmma::accumulator, 16, 16, kAccK, float>;
  AccT acc_tc[4];
  if constexpr (kTensor)
#pragma unroll
    for (int i = 0; i < 4; ++i) wmma::fill_fragment(acc_tc[i], 0.0f);
#else
  int acc_tc[1];
#endif
  float acc[8][4];
#pragma unroll
  for (int r = 0; r < 8; ++r)
#pragma unroll
    for (int c = 0; c < 4; ++c) acc[r][c] = 0.0f;
  const int warp = tid / 32, wm = warp / 2, wp = warp % 2;  // warp tile: rows wm*32, cols wp*32
  const int ty = tid / 16, tx = tid % 16;                   // SIMT tile: rows ty + 8r, cols tx + 16c

  // the chunk's loads: A rows m0.. (padded to 64 rows and Kpad columns), B gathered with
  // consecutive threads on consecutive pixels; held in registers until the smem tiles are free
  constexpr int kAPer = TM * TK / kThreads, kBPer = TK * TP / kThreads;
  T a_reg[kAPer];
  float b_reg[kBPer];
  auto load_chunk = [&](int k0) {
#pragma unroll
    for (int i = 0; i < kAPer; ++i) {
      const int e = tid + i * kThreads, r = e / TK, kk = e % TK;
      a_reg[i] = A[int64_t(m0 + r) * g.Kpad + k0 + kk];
    }
#pragma unroll
    for (int i = 0; i < kBPer; ++i) {
      const int e = tid + i * kThreads, kk = e / TP, pp = e % TP;
      const int k = k0 + kk, p = p0 + pp;
      b_reg[i] = (k < g.K && p < g.Pn) ? __ldg(src + __ldg(g.boff + k) + p) : 0.0f;
    }
  };
  if (k_begin < k_end) load_chunk(k_begin);
  for (int k0 = k_begin; k0 < k_end; k0 += TK) {
#pragma unroll
    for (int i = 0; i < kAPer; ++i) {
      const int e = tid + i * kThreads;
      As[(e / TK) * LDA + e % TK] = a_reg[i];
    }
#pragma unroll
    for (int i = 0; i < kBPer; ++i) {
      const int e = tid + i * kThreads;
      Bs[(e / TP) * LDB + e % TP] = to_operand<P>(b_reg[i]);
    }
    __syncthreads();
    if (k0 + TK < k_end) load_chunk(k0 + TK);  // in flight during this chunk's multiply
    if constexpr (kTensor) {
      warp_mma<P>(As, Bs, wm, wp, acc_tc);
    } else {
#pragma unroll
      for (int kk = 0; kk < TK; ++kk) {
        float a[8], bv[4];
#pragma unroll
        for (int r = 0; r < 8; ++r) a[r] = float(As[(ty + 8 * r) * LDA + kk]);
#pragma unroll
        for (int c = 0; c < 4; ++c) bv[c] = float(Bs[kk * LDB + tx + 16 * c]);
#pragma unroll
        for (int r = 0; r < 8; ++r)
#pragma unroll
          for (int c = 0; c < 4; ++c) acc[r][c] = fmaf(a[r], bv[c], acc[r][c]);
      }
    }
    __syncthreads();
  }
  // accumulators -> Cs (the staging tiles are dead: the loop ended on a barrier)
  if constexpr (kTensor) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 700
    if constexpr (tc_supported<P>()) {
#pragma unroll
      for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j)
          wmma::store_matrix_sync(Cs + (wm * 32 + i * 16) * LDC + wp * 32 + j * 16, acc_tc[i * 2 + j], LDC,
                                  wmma::mem_row_major);
    } else {
      __trap();  // no tensor-core path compiled for this arch: the host refuses it (gemm_compiled_arch)
    }
#else
    __trap();
#endif
  } else {
#pragma unroll
    for (int r = 0; r < 8; ++r)
#pragma unroll
      for (int c = 0; c < 4; ++c) Cs[(ty + 8 * r) * LDC + tx + 16 * c] = acc[r][c];
  }
  __syncthreads();
  if (g.splits > 1) {  // the raw partial tile -> workspace [b][split][M][Pn]; the reduction applies the epilogue
    float* w = g.ws + (int64_t(b) * g.splits + split) * int64_t(g.M) * g.Pn;
    for (int e = tid; e < TM * TP; e += kThreads) {
      const int r = e / TP, pp = e % TP, m = m0 + r, p = p0 + pp;
      if (m < g.M && p < g.Pn) w[int64_t(m) * g.Pn + p] = Cs[r * LDC + pp];
    }
    return;
  }
  // epilogue: consecutive threads on consecutive pixels of one output channel
  for (int e = tid; e < TM * TP; e += kThreads) {
    const int r = e / TP, pp = e % TP, m = m0 + r, p = p0 + pp;
    if (m < g.M && p < g.Pn) store_output(g, b, m, p, Cs[r * LDC + pp]);
  }
}

// The splits of a split-K GEMM summed in order 0, 1, ..., then the epilogue; one thread per (b, m, p).
__global__ void __launch_bounds__(256) splitk_reduce_kernel(const GemmDev g) {
  const int64_t plane = int64_t(g.M) * g.Pn, total = int64_t(g.nbatch) * plane;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const int b = int(i / plane);
    const int64_t r = i - int64_t(b) * plane;
    const int m = int(r / g.Pn), p = int(r - int64_t(m) * g.Pn);
    const float* w = g.ws + int64_t(b) * g.splits * plane + r;
    float acc = 0.0f;
    for (int s = 0; s < g.splits; ++s) acc += w[int64_t(s) * plane];
    store_output(g, b, m, p, acc);
  }
}

// fp32 strided batched GEMM: 64x64 tile, K chunks of 16, 256 threads with 4x4 register tiles.
constexpr int kSThreads = 256;
__global__ void __launch_bounds__(kSThreads) strided_gemm_kernel(const StridedGemm g) {
  __shared__ float As[TK][TM + 4];  // As[kk][mm] = A[m0 + mm][k0 + kk]
  __shared__ float Bs[TK][TP + 4];  // Bs[kk][nn] = B[k0 + kk][n0 + nn]
  const int tid = threadIdx.x, bz = blockIdx.z;
  const int m0 = blockIdx.y * TM, n0 = blockIdx.x * TP;
  const int64_t bo = bz / g.inner, bi = bz % g.inner;
  const float* A = g.A + bo * g.a_outer + bi * g.a_inner;
  const float* B = g.B + bo * g.b_outer + bi * g.b_inner;
  float* C = g.C + bo * g.c_outer + bi * g.c_inner;
  const int ty = tid / 16, tx = tid % 16;  // rows ty + 16r, cols tx + 16c
  float acc[4][4] = {};
  for (int k0 = 0; k0 < g.K; k0 += TK) {
#pragma unroll
    for (int i = 0; i < TM * TK / kSThreads; ++i) {
      const int e = tid + i * kSThreads, kk = e / TM, mm = e % TM;
      const int m = m0 + mm, k = k0 + kk;
      As[kk][mm] = (m < g.M && k < g.K) ? A[int64_t(m) * g.sam + int64_t(k) * g.sak] : 0.0f;
      const int n = n0 + mm;
      Bs[kk][mm] = (n < g.N && k < g.K) ? B[int64_t(k) * g.sbk + int64_t(n) * g.sbn] : 0.0f;
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < TK; ++kk) {
      float a[4], bv[4];
#pragma unroll
      for (int r = 0; r < 4; ++r) a[r] = As[kk][ty + 16 * r];
#pragma unroll
      for (int c = 0; c < 4; ++c) bv[c] = Bs[kk][tx + 16 * c];
#pragma unroll
      for (int r = 0; r < 4; ++r)
#pragma unroll
        for (int c = 0; c < 4; ++c) acc[r][c] = fmaf(a[r], bv[c], acc[r][c]);
    }
    __syncthreads();
  }
#pragma unroll
  for (int r = 0; r < 4; ++r)
#pragma unroll
    for (int c = 0; c < 4; ++c) {
      const int m = m0 + ty + 16 * r, n = n0 + tx + 16 * c;
      if (m < g.M && n < g.N) C[int64_t(m) * g.scm + n] = g.alpha * acc[r][c];
    }
}

}  // namespace

cudaError_t launch_gemm(const GemmDev& g, Precision prec, cudaStream_t st) {
  if (g.M <= 0 || g.Pn <= 0 || g.nbatch <= 0) return cudaSuccess;
  if (g.Kpad % TK || g.Kpad < g.K || g.splits < 1 || g.nbatch > 65535) return cudaErrorInvalidValue;
  if (g.split_k % TK || int64_t(g.split_k) * g.splits < g.Kpad || (g.splits > 1 && !g.ws)) return cudaErrorInvalidValue;
  const dim3 grid(unsigned((g.Pn + TP - 1) / TP * g.splits), (g.M + TM - 1) / TM, unsigned(g.nbatch));
  switch (prec) {
    case Precision::kF32: conv_gemm_kernel<Precision::kF32><<<grid, kThreads, 0, st>>>(g); break;
    case Precision::kTF32: conv_gemm_kernel<Precision::kTF32><<<grid, kThreads, 0, st>>>(g); break;
    case Precision::kBF16: conv_gemm_kernel<Precision::kBF16><<<grid, kThreads, 0, st>>>(g); break;
    case Precision::kF16: conv_gemm_kernel<Precision::kF16><<<grid, kThreads, 0, st>>>(g); break;
    default: return cudaErrorInvalidValue;
  }
  if (g.splits > 1) {
    const cudaError_t e = cudaGetLastError();
    if (e != cudaSuccess) return e;
    const int64_t total = int64_t(g.nbatch) * g.M * g.Pn;
    const int64_t blocks = std::min<int64_t>((total + 255) / 256, 65536 * 8);
    splitk_reduce_kernel<<<unsigned(blocks), 256, 0, st>>>(g);
  }
  return cudaGetLastError();
}

cudaError_t gemm_compiled_arch(Precision prec, int* arch) {
  *arch = 0;
  cudaFuncAttributes at;
  cudaError_t e = cudaErrorInvalidValue;
  switch (prec) {
    case Precision::kF32: e = cudaFuncGetAttributes(&at, conv_gemm_kernel<Precision::kF32>); break;
    case Precision::kTF32: e = cudaFuncGetAttributes(&at, conv_gemm_kernel<Precision::kTF32>); break;
    case Precision::kBF16: e = cudaFuncGetAttributes(&at, conv_gemm_kernel<Precision::kBF16>); break;
    case Precision::kF16: e = cudaFuncGetAttributes(&at, conv_gemm_kernel<Precision::kF16>); break;
  }
  if (e == cudaSuccess) *arch = at.ptxVersion;
  return e;
}

cudaError_t launch_strided_gemm(const StridedGemm& g, cudaStream_t st) {
  const int64_t batches = int64_t(g.outer) * g.inner;
  if (g.M <= 0 || g.N <= 0 || batches <= 0) return cudaSuccess;
  if (batches > 65535) return cudaErrorInvalidValue;
  const dim3 grid((g.N + TP - 1) / TP, (g.M + TM - 1) / TM, unsigned(batches));
  strided_gemm_kernel<<<grid, kSThreads, 0, st>>>(g);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace fastddpm
