// SIMD helpers of the CPU kernels: the Math policy of adam_rule.h for at::vec::Vectorized,
// partial loads/stores of a row, and conversions of low-precision rows to float.
#pragma once

#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>

namespace recis::cpu {

using at::vec::Vectorized;

struct VecMath {
  template <typename V>
  static V sqrt(const V& x) { return x.sqrt(); }
  template <typename V>
  static V neg(const V& x) { return x.neg(); }
  template <typename V>
  static V fmadd(const V& a, const V& b, const V& c) { return at::vec::fmadd(a, b, c); }
};

// Apply f(j, count) over [0, n) in chunks of one vector, the last one partial.
template <typename C, typename F>
inline void for_each_vector(int64_t n, F&& f) {
  constexpr int64_t width = Vectorized<C>::size();
  for (int64_t j = 0; j < n; j += width) f(j, std::min(width, n - j));
}

template <typename C>
inline Vectorized<C> load(const C* p, int64_t count) {
  return count == Vectorized<C>::size() ? Vectorized<C>::loadu(p) : Vectorized<C>::loadu(p, count);
}

template <typename C>
inline void store(const Vectorized<C>& x, C* p, int64_t count) {
  if (count == Vectorized<C>::size()) {
    x.store(p);
  } else {
    x.store(p, count);
  }
}

// Widen n values of a row into the compute type, and round them back (nearest even, as .to()).
template <typename W, typename C>
inline void widen(const W* from, C* to, int64_t n) {
  for (int64_t j = 0; j < n; ++j) to[j] = static_cast<C>(from[j]);
}

template <typename W, typename C>
inline void narrow(const C* from, W* to, int64_t n) {
  for (int64_t j = 0; j < n; ++j) to[j] = static_cast<W>(from[j]);
}

inline void prefetch_write(const void* p) {
#if defined(__GNUC__)
  __builtin_prefetch(p, 1, 3);
#endif
}

// What a prefetched row is for: only reading (a gradient) or writing too (a row, its slots).
enum class Access { kRead = 0, kWrite = 1 };

// Prefetch the cache lines of a row of `bytes` bytes into L2 (prefetcht1 on x86), before it is
// read or written. On x86-64 the instruction is written out: GCC 12 at -O2/-O3 deleted loops of
// __builtin_prefetch where they were inlined (a prefetch alone is no side effect), so the fused
// updates had run without their row prefetches. On an AMD EPYC (Zen 4), 26 Adam updates of case
// e's shape took 19-22 ms prefetching into L2, 26-28 ms into L1 (prefetcht0), 28-45 ms without.
// Every line the row touches is fetched, from the one holding its first byte to the one holding
// its last (a row need not start on a line).
template <Access access = Access::kWrite>
inline void prefetch_row(const void* row, int64_t bytes) {
  const auto start = reinterpret_cast<std::uintptr_t>(row);
  for (std::uintptr_t line = start & ~std::uintptr_t{63}; line < start + bytes; line += 64) {
    const char* p = reinterpret_cast<const char*>(line);
#if defined(__x86_64__) && defined(__GNUC__)
    __asm__ __volatile__("prefetcht1 %0" : : "m"(*p));
#elif defined(__GNUC__)
    __builtin_prefetch(p, static_cast<int>(access), 2);
    __asm__ __volatile__("");
#endif
  }
}

}  // namespace recis::cpu
