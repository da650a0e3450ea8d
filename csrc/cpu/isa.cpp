#include "isa.h"

namespace fastddpm {
namespace cpu {

bool isa_supported(Isa isa) {
  switch (isa) {
    case Isa::kGeneric: return true;
#if defined(__x86_64__) || defined(__i386__)
    // __builtin_cpu_supports also checks that the OS saves the AVX / AVX-512 register state.
    case Isa::kAvx2: return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    case Isa::kAvx512: return __builtin_cpu_supports("avx512f") && isa_supported(Isa::kAvx2);
#endif
    default: return false;
  }
}

Isa best_isa() {
  if (isa_supported(Isa::kAvx512)) return Isa::kAvx512;
  if (isa_supported(Isa::kAvx2)) return Isa::kAvx2;
  return Isa::kGeneric;
}

const char* isa_name(Isa isa) { return kernels(isa).name; }

const IsaKernels& kernels(Isa isa) {
  switch (isa) {
    case Isa::kAvx512: return kAvx512Kernels;
    case Isa::kAvx2: return kAvx2Kernels;
    default: return kGenericKernels;
  }
}

}  // namespace cpu
}  // namespace fastddpm
