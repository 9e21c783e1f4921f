// The CPU instruction sets the C++ kernels are built for, the one that runs, and the one way to
// build per-ISA code.
//
// Per-ISA code lives in namespace sgk::generic, sgk::avx2 or sgk::avx512, opened with
// SGK_BEGIN_<ISA> / SGK_END_<ISA>: every function defined in between is compiled for that ISA
// (`#pragma GCC target`; the build never uses -march). Each op defines, in each of the three
// namespaces, the same constant table of its kernel functions, and takes the one of the running ISA
// with SGK_PER_ISA(table). The code the three ISAs share is a header included once per namespace.
#pragma once

#include <cstdint>

#if defined(__GNUC__) && defined(__x86_64__)
#define SGK_X86 1
#include <immintrin.h>
#else
#define SGK_X86 0
#endif

#define SGK_INLINE inline __attribute__((always_inline))

// Keep `v` materialised so the compiler cannot fuse the multiply that produced it into an FMA
// with a later add (the references round a*b and then a+b separately).
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define SGK_NO_CONTRACT(v) __asm__("" : "+x"(v))
#elif defined(__GNUC__) && defined(__aarch64__)
#define SGK_NO_CONTRACT(v) __asm__("" : "+w"(v))
#else
#define SGK_NO_CONTRACT(v) ((void)0)
#endif

#define SGK_BEGIN_GENERIC namespace generic {
#define SGK_END_GENERIC }
#define SGK_BEGIN_AVX2 \
  _Pragma("GCC push_options") _Pragma("GCC target(\"avx2,fma,f16c\")") namespace avx2 {
#define SGK_END_AVX2 } _Pragma("GCC pop_options")
#define SGK_BEGIN_AVX512                                                                                 \
  _Pragma("GCC push_options")                                                                           \
      _Pragma("GCC target(\"avx512f,avx512bw,avx512dq,avx512vl,avx2,fma,f16c,prefer-vector-width=512\")") \
          namespace avx512 {
#define SGK_END_AVX512 } _Pragma("GCC pop_options")

namespace sgk {

enum class Isa : int { generic = 0, avx2 = 1, avx512 = 2 };

// The ISA the kernels run with: the widest this CPU supports (avx512 = F+BW+DQ+VL, avx2 = AVX2+FMA+F16C),
// capped by the environment variable SGKERNELS_CPU_ISA=avx512|avx2|generic|auto (read at every
// call, so tests can switch it; an unknown value raises).
Isa cpu_isa();
const char* isa_name(Isa isa);

template <typename T>
const T& per_isa(const T& generic, const T& avx2, const T& avx512) {
  switch (cpu_isa()) {
    case Isa::avx512: return avx512;
    case Isa::avx2: return avx2;
    default: return generic;
  }
}

}  // namespace sgk

// SGK_PER_ISA(kTable): sgk::<isa>::kTable for the running ISA (called inside namespace sgk).
#if SGK_X86
#define SGK_PER_ISA(table) ::sgk::per_isa(::sgk::generic::table, ::sgk::avx2::table, ::sgk::avx512::table)
#else
#define SGK_PER_ISA(table) (::sgk::generic::table)
#endif
