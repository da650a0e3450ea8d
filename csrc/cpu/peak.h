// The machine's own FLOP ceiling, for the benchmarks: how fast this CPU runs float32 fused
// multiply-adds with the widest vectors a given ISA path uses (BLAS libraries may not use them:
// the OpenBLAS and MKL builds that NumPy and PyTorch ship take their AVX2 kernels on Zen 5).
#pragma once
#include "isa.h"

namespace fastddpm {
namespace cpu {

// GFLOP/s (2 per lane per FMA) of `threads` threads, each running independent FMA chains for
// about `seconds`, on the given ISA path (throws std::invalid_argument if this CPU cannot run it).
double fma_peak_gflops(Isa isa, int threads, double seconds);

}  // namespace cpu
}  // namespace fastddpm
