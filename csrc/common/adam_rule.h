// The Adam-family rule shared by the CPU and CUDA kernels: hyperparameters, the
// per-call scalars (computed in double and rounded once, as torch rounds a Python
// float operand) and the update of one element (or one SIMD vector of elements).
//
// With g the gradient, theta the value, t the step, bc1 = 1 - b1^t, bc2 = 1 - b2^t,
// fma(a, b, c) = a * b + c rounded once:
//   g = -g if maximize
//   decay (first):  L2: g = fma(theta, wd, g) | DECOUPLED: theta *= 1 - lr*wd | DECOUPLED_NO_LR: theta *= 1 - wd
//   moments:        m = fma(w, g - m, m), w = 1 - b1  (torch's lerp; fma(w - 1, g - m, g) when w >= 1/2)
//                   v = fma((1 - b2) * g, g, v * b2)
//   denom:          sqrt(v) / sqrt(bc2) + eps (CORRECTED, torch.optim.AdamW) or sqrt(v) + eps (UNCORRECTED, TF)
//   table step t:   theta = theta + (step_value * m) / denom,
//                   step_value = -lr / bc1 (CORRECTED) or -lr * sqrt(bc2) / bc1 (UNCORRECTED)
//   per-row step t: theta = theta - (step_size * m) / denom, step_size = lr / bc1 or lr * sqrt(bc2) / bc1
// These are the operations, roundings and fused multiply-adds of torch's CPU kernels
// for the torch reference (recis/ops/sparse_adam_update.py: lerp_, addcmul_, add with
// alpha, addcdiv_). With a hardware FMA and torch's own sqrt the results are bitwise
// those of the torch path; torch's CPU float sqrt (MKL VML) is not always correctly
// rounded, so with the IEEE sqrt results agree to float32 rounding (1 ulp of sqrt).
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define RECIS_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define RECIS_HOST_DEVICE inline
#endif

namespace recis {

enum class WeightDecay : int64_t { L2 = 0, DECOUPLED = 1, DECOUPLED_NO_LR = 2 };
enum class EpsilonPlacement : int64_t { CORRECTED = 0, UNCORRECTED = 1 };

// One update's hyperparameters as Python gives them (doubles, like Python floats).
struct AdamHyper {
  double lr, beta1, beta2, eps, weight_decay;
  WeightDecay decay;
  EpsilonPlacement epsilon;
  bool maximize;
  int64_t step;  // the table's step t; unused with per-row steps
};

// Scalars of one call in the compute type C.
template <typename C>
struct AdamScalars {
  C lerp_coeff, beta2, one_minus_beta2, eps, l2, decay_factor;
  C step_value, sqrt_bc2;  // table mode: step_value multiplies m / denom
  bool lerp_from_grad, has_l2, has_decay, maximize, corrected;
};

RECIS_HOST_DEVICE double bias_correction(double beta, int64_t t) {
  return 1.0 - pow(beta, static_cast<double>(t));
}

template <typename C>
inline AdamScalars<C> adam_scalars(const AdamHyper& h) {
  AdamScalars<C> s{};
  const C weight = static_cast<C>(1.0 - h.beta1);  // torch.lerp rounds its scalar weight to C
  s.lerp_from_grad = !(weight < static_cast<C>(0.5));
  s.lerp_coeff = s.lerp_from_grad ? weight - static_cast<C>(1) : weight;
  s.beta2 = static_cast<C>(h.beta2);
  s.one_minus_beta2 = static_cast<C>(1.0 - h.beta2);
  s.eps = static_cast<C>(h.eps);
  s.has_l2 = h.decay == WeightDecay::L2 && h.weight_decay != 0.0;
  s.l2 = static_cast<C>(h.weight_decay);
  s.has_decay = h.decay != WeightDecay::L2;
  s.decay_factor =
      static_cast<C>(h.decay == WeightDecay::DECOUPLED ? 1.0 - h.lr * h.weight_decay : 1.0 - h.weight_decay);
  s.maximize = h.maximize;
  s.corrected = h.epsilon == EpsilonPlacement::CORRECTED;
  const double bc1 = bias_correction(h.beta1, h.step);
  const double bc2 = bias_correction(h.beta2, h.step);
  s.sqrt_bc2 = static_cast<C>(std::sqrt(bc2));
  s.step_value = static_cast<C>(s.corrected ? -h.lr / bc1 : -h.lr * std::sqrt(bc2) / bc1);
  return s;
}

// Per-row step size and sqrt(bc2) for a row at step t (already incremented).
template <typename C>
struct RowStep {
  C step_size, sqrt_bc2;
};

template <typename C>
RECIS_HOST_DEVICE RowStep<C> row_step(double lr, double beta1, double beta2, bool corrected, int64_t t) {
  const double bc1 = bias_correction(beta1, t);
  const double root = sqrt(bias_correction(beta2, t));
  RowStep<C> r;
  r.sqrt_bc2 = static_cast<C>(root);
  r.step_size = static_cast<C>(corrected ? lr / bc1 : lr * root / bc1);
  return r;
}

// The two halves of the update of one element, or one SIMD vector V of elements of
// compute type C; Math supplies sqrt, neg and fmadd(a, b, c) for V. First the decay
// and the moments, then, given root = sqrt(v), the step (`row` is null in table mode).
template <typename Math, typename V, typename C>
RECIS_HOST_DEVICE void adam_moments(V& theta, V& m, V& v, V g, const AdamScalars<C>& s) {
  if (s.maximize) g = Math::neg(g);
  if (s.has_l2) g = Math::fmadd(theta, V(s.l2), g);
  if (s.has_decay) theta = theta * V(s.decay_factor);
  m = Math::fmadd(V(s.lerp_coeff), g - m, s.lerp_from_grad ? g : m);
  v = Math::fmadd(V(s.one_minus_beta2) * g, g, v * V(s.beta2));
}

template <typename V, typename C>
RECIS_HOST_DEVICE void adam_apply(V& theta, const V& m, const V& root, const AdamScalars<C>& s, const RowStep<C>* row) {
  const C sqrt_bc2 = row ? row->sqrt_bc2 : s.sqrt_bc2;
  const V denom = (s.corrected ? root / V(sqrt_bc2) : root) + V(s.eps);
  if (row) {
    theta = theta - (V(row->step_size) * m) / denom;
  } else {
    theta = theta + (V(s.step_value) * m) / denom;
  }
}

template <typename Math, typename V, typename C>
RECIS_HOST_DEVICE void adam_element(V& theta, V& m, V& v, V g, const AdamScalars<C>& s, const RowStep<C>* row) {
  adam_moments<Math, V, C>(theta, m, v, g, s);
  adam_apply<V, C>(theta, m, Math::sqrt(v), s, row);
}

}  // namespace recis
