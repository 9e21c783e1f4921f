// The ISA selector of csrc/common/isa.h.
#include "common/isa.h"

#include <c10/util/Exception.h>

#include <cstdlib>
#include <cstring>

namespace sgk {
namespace {

Isa widest_supported() {
#if SGK_X86
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  const bool avx512 = avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                      __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl");
  return avx512 ? Isa::avx512 : avx2 ? Isa::avx2 : Isa::generic;
#else
  return Isa::generic;
#endif
}

}  // namespace

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::avx512: return "avx512";
    case Isa::avx2: return "avx2";
    default: return "generic";
  }
}

Isa cpu_isa() {
  static const Isa widest = widest_supported();
  const char* env = std::getenv("SGKERNELS_CPU_ISA");
  if (env == nullptr || env[0] == '\0' || std::strcmp(env, "auto") == 0) return widest;
  Isa cap = Isa::generic;
  if (std::strcmp(env, "avx512") == 0) {
    cap = Isa::avx512;
  } else if (std::strcmp(env, "avx2") == 0) {
    cap = Isa::avx2;
  } else {
    TORCH_CHECK_VALUE(std::strcmp(env, "generic") == 0,
                      "SGKERNELS_CPU_ISA: expected avx512, avx2, generic or auto, got '", env, "'");
  }
  return static_cast<int>(cap) < static_cast<int>(widest) ? cap : widest;
}

}  // namespace sgk
