// The Adam rule (common/adam_rule.h) over a span of float32 or float64 elements with AVX2 and FMA,
// chosen at run time: the shipped build targets the baseline x86-64 ISA, and only the
// functions of adam_span_avx2.cpp are compiled for AVX2+FMA. The FMAs are those of
// torch's own AVX2/AVX-512 CPU kernels, so results are bitwise those of the torch path.
#pragma once

#include <cstdint>

#include "../common/adam_rule.h"

namespace recis::cpu {

// Whether this CPU (and build) can run adam_span_avx2.
bool cpu_has_avx2_fma();

// Over n elements (float32 or float64), in place: the whole rule (adam_element), or its
// halves: decay and moments (adam_moments), then the step given root = sqrt(v) (adam_apply).
#define RECIS_DECLARE_AVX2(C)                                                                    \
  void adam_span_avx2(C* theta, C* m, C* v, const C* g, int64_t n, const AdamScalars<C>& s,      \
                      const RowStep<C>* row);                                                    \
  void adam_moments_avx2(C* theta, C* m, C* v, const C* g, int64_t n, const AdamScalars<C>& s); \
  void adam_apply_avx2(C* theta, const C* m, const C* root, int64_t n, const AdamScalars<C>& s);

RECIS_DECLARE_AVX2(float)
RECIS_DECLARE_AVX2(double)
#undef RECIS_DECLARE_AVX2

}  // namespace recis::cpu
