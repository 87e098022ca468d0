// AVX2+FMA instance of the Adam rule; see adam_span_avx2.h. Everything defined after
// the target pragma (and only that) is compiled for AVX2+FMA; callers check
// cpu_has_avx2_fma() first.
// adam_rule.h is included after the pragma so that adam_element is compiled for AVX2
// here; nothing of it but adam_element (with this file's own types) is emitted here.
#include <cmath>
#include <cstdint>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define RECIS_HAVE_AVX2_PATH 1
#include <immintrin.h>
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#endif

#include "adam_span_avx2.h"

namespace recis::cpu {

#if defined(RECIS_HAVE_AVX2_PATH)
namespace {

// Four doubles or eight floats in one AVX register, with the operations of adam_element.
template <typename C>
struct Lanes;

template <>
struct Lanes<float> {
  using Reg = __m256;
  static constexpr int64_t size = 8;
  static Reg load(const float* p) { return _mm256_loadu_ps(p); }
  static void store(float* p, Reg x) { _mm256_storeu_ps(p, x); }
  static Reg set(float a) { return _mm256_set1_ps(a); }
  static Reg add(Reg a, Reg b) { return _mm256_add_ps(a, b); }
  static Reg sub(Reg a, Reg b) { return _mm256_sub_ps(a, b); }
  static Reg mul(Reg a, Reg b) { return _mm256_mul_ps(a, b); }
  static Reg div(Reg a, Reg b) { return _mm256_div_ps(a, b); }
  static Reg sqrt(Reg a) { return _mm256_sqrt_ps(a); }
  static Reg neg(Reg a) { return _mm256_xor_ps(a, _mm256_set1_ps(-0.0f)); }
  static Reg fmadd(Reg a, Reg b, Reg c) { return _mm256_fmadd_ps(a, b, c); }
  static float fmadd(float a, float b, float c) {
    return _mm_cvtss_f32(_mm_fmadd_ss(_mm_set_ss(a), _mm_set_ss(b), _mm_set_ss(c)));
  }
  static float sqrt(float a) { return _mm_cvtss_f32(_mm_sqrt_ss(_mm_set_ss(a))); }
};

template <>
struct Lanes<double> {
  using Reg = __m256d;
  static constexpr int64_t size = 4;
  static Reg load(const double* p) { return _mm256_loadu_pd(p); }
  static void store(double* p, Reg x) { _mm256_storeu_pd(p, x); }
  static Reg set(double a) { return _mm256_set1_pd(a); }
  static Reg add(Reg a, Reg b) { return _mm256_add_pd(a, b); }
  static Reg sub(Reg a, Reg b) { return _mm256_sub_pd(a, b); }
  static Reg mul(Reg a, Reg b) { return _mm256_mul_pd(a, b); }
  static Reg div(Reg a, Reg b) { return _mm256_div_pd(a, b); }
  static Reg sqrt(Reg a) { return _mm256_sqrt_pd(a); }
  static Reg neg(Reg a) { return _mm256_xor_pd(a, _mm256_set1_pd(-0.0)); }
  static Reg fmadd(Reg a, Reg b, Reg c) { return _mm256_fmadd_pd(a, b, c); }
  static double fmadd(double a, double b, double c) {
    return _mm_cvtsd_f64(_mm_fmadd_sd(_mm_set_sd(a), _mm_set_sd(b), _mm_set_sd(c)));
  }
  static double sqrt(double a) { return _mm_cvtsd_f64(_mm_sqrt_sd(_mm_setzero_pd(), _mm_set_sd(a))); }
};

// A register as a value type for adam_element.
template <typename C>
struct Vec {
  typename Lanes<C>::Reg x;
  Vec(typename Lanes<C>::Reg value) : x(value) {}  // NOLINT: implicit
  Vec(C value) : x(Lanes<C>::set(value)) {}        // NOLINT: implicit, like a scalar
};
template <typename C>
Vec<C> operator+(Vec<C> a, Vec<C> b) { return Lanes<C>::add(a.x, b.x); }
template <typename C>
Vec<C> operator-(Vec<C> a, Vec<C> b) { return Lanes<C>::sub(a.x, b.x); }
template <typename C>
Vec<C> operator*(Vec<C> a, Vec<C> b) { return Lanes<C>::mul(a.x, b.x); }
template <typename C>
Vec<C> operator/(Vec<C> a, Vec<C> b) { return Lanes<C>::div(a.x, b.x); }

template <typename C>
struct VecMath {
  static Vec<C> sqrt(Vec<C> a) { return Lanes<C>::sqrt(a.x); }
  static Vec<C> neg(Vec<C> a) { return Lanes<C>::neg(a.x); }
  static Vec<C> fmadd(Vec<C> a, Vec<C> b, Vec<C> c) { return Lanes<C>::fmadd(a.x, b.x, c.x); }
};

template <typename C>
struct ScalarMath {  // the tail, one element at a time, with the same roundings
  static C sqrt(C a) { return Lanes<C>::sqrt(a); }
  static C neg(C a) { return -a; }
  static C fmadd(C a, C b, C c) { return Lanes<C>::fmadd(a, b, c); }
};

template <typename C>
void adam_span(C* theta, C* m, C* v, const C* g, int64_t n, const AdamScalars<C>& s, const RowStep<C>* row) {
  using L = Lanes<C>;
  int64_t j = 0;
  for (; j + L::size <= n; j += L::size) {
    Vec<C> t = L::load(theta + j), mm = L::load(m + j), vv = L::load(v + j);
    adam_element<VecMath<C>, Vec<C>, C>(t, mm, vv, Vec<C>(L::load(g + j)), s, row);
    L::store(theta + j, t.x);
    L::store(m + j, mm.x);
    L::store(v + j, vv.x);
  }
  for (; j < n; ++j) adam_element<ScalarMath<C>, C, C>(theta[j], m[j], v[j], g[j], s, row);
}

template <typename C>
void moments_span(C* theta, C* m, C* v, const C* g, int64_t n, const AdamScalars<C>& s) {
  using L = Lanes<C>;
  int64_t j = 0;
  for (; j + L::size <= n; j += L::size) {
    Vec<C> t = L::load(theta + j), mm = L::load(m + j), vv = L::load(v + j);
    adam_moments<VecMath<C>, Vec<C>, C>(t, mm, vv, Vec<C>(L::load(g + j)), s);
    L::store(theta + j, t.x);
    L::store(m + j, mm.x);
    L::store(v + j, vv.x);
  }
  for (; j < n; ++j) adam_moments<ScalarMath<C>, C, C>(theta[j], m[j], v[j], g[j], s);
}

template <typename C>
void apply_span(C* theta, const C* m, const C* root, int64_t n, const AdamScalars<C>& s) {
  using L = Lanes<C>;
  int64_t j = 0;
  for (; j + L::size <= n; j += L::size) {
    Vec<C> t = L::load(theta + j);
    adam_apply<Vec<C>, C>(t, Vec<C>(L::load(m + j)), Vec<C>(L::load(root + j)), s, nullptr);
    L::store(theta + j, t.x);
  }
  for (; j < n; ++j) adam_apply<C, C>(theta[j], m[j], root[j], s, nullptr);
}

}  // namespace

#define RECIS_AVX2_INSTANCES(C)                                                                   \
  void adam_span_avx2(C* theta, C* m, C* v, const C* g, int64_t n, const AdamScalars<C>& s,       \
                      const RowStep<C>* row) {                                                    \
    adam_span<C>(theta, m, v, g, n, s, row);                                                      \
  }                                                                                               \
  void adam_moments_avx2(C* theta, C* m, C* v, const C* g, int64_t n, const AdamScalars<C>& s) {  \
    moments_span<C>(theta, m, v, g, n, s);                                                        \
  }                                                                                               \
  void adam_apply_avx2(C* theta, const C* m, const C* root, int64_t n, const AdamScalars<C>& s) { \
    apply_span<C>(theta, m, root, n, s);                                                          \
  }

RECIS_AVX2_INSTANCES(float)
RECIS_AVX2_INSTANCES(double)

#pragma GCC pop_options

bool cpu_has_avx2_fma() {
  static const bool supported = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return supported;
}

#else

bool cpu_has_avx2_fma() { return false; }

#define RECIS_AVX2_INSTANCES(C)                                                                  \
  void adam_span_avx2(C*, C*, C*, const C*, int64_t, const AdamScalars<C>&, const RowStep<C>*) {} \
  void adam_moments_avx2(C*, C*, C*, const C*, int64_t, const AdamScalars<C>&) {}                 \
  void adam_apply_avx2(C*, const C*, const C*, int64_t, const AdamScalars<C>&) {}

RECIS_AVX2_INSTANCES(float)
RECIS_AVX2_INSTANCES(double)

#endif

}  // namespace recis::cpu
