// AdamWTF (TensorFlow's AdamW over Adam) for dense parameters, multi-tensor, on CPU.
//
// For every parameter tensor, with its step t incremented first, bc1 = 1 - b1^t,
// bc2 = 1 - b2^t, and every element:
//   theta *= 1 - wd ; m = lerp(m, g, 1 - b1) ; v = b2 v + (1 - b2) g^2
//   theta += (-lr sqrt(bc2) / bc1) * (m / (sqrt(v) + eps))
// (common/adam_rule.h with DECOUPLED_NO_LR decay and UNCORRECTED epsilon). All tensors
// are cut into chunks of equal size that the threads share, so many small tensors cost
// one parallel region, not one per tensor. float32 and float64 results equal torch's
// _foreach path bitwise. bfloat16 and float16 tensors are widened to float32 a chunk at a
// time and rounded back once (torch's _foreach path rounds after every operation), so
// they agree with it to the rounding of their dtype.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <type_traits>
#include <vector>

#include "../common/adam_rule.h"
#include "adam_span_avx2.h"
#include "vec_math.h"

namespace recis::cpu {
namespace {

constexpr int64_t kChunk = 16384;  // elements

struct Chunk {
  int64_t tensor, begin, end;
};

std::vector<Chunk> chunks_of(const at::TensorList& params) {
  std::vector<Chunk> chunks;
  for (int64_t i = 0; i < static_cast<int64_t>(params.size()); ++i) {
    const int64_t n = params[i].numel();
    for (int64_t begin = 0; begin < n; begin += kChunk) chunks.push_back({i, begin, std::min(n, begin + kChunk)});
  }
  return chunks;
}

// Decay and moments over n elements: AVX2+FMA when the CPU has it, else at::vec.
template <typename C>
void moments(C* theta, C* m, C* v, const C* g, int64_t n, const AdamScalars<C>& s) {
  if (cpu_has_avx2_fma()) return adam_moments_avx2(theta, m, v, g, n, s);
  using V = Vectorized<C>;
  for_each_vector<C>(n, [&](int64_t j, int64_t count) {
    V t = load(theta + j, count), mm = load(m + j, count), vv = load(v + j, count);
    adam_moments<VecMath, V, C>(t, mm, vv, load(g + j, count), s);
    store(t, theta + j, count);
    store(mm, m + j, count);
    store(vv, v + j, count);
  });
}

// The step over n elements given root = sqrt(v).
template <typename C>
void apply(C* theta, const C* m, const C* root, int64_t n, const AdamScalars<C>& s) {
  if (cpu_has_avx2_fma()) return adam_apply_avx2(theta, m, root, n, s);
  using V = Vectorized<C>;
  for_each_vector<C>(n, [&](int64_t j, int64_t count) {
    V t = load(theta + j, count);
    adam_apply<V, C>(t, load(m + j, count), load(root + j, count), s, nullptr);
    store(t, theta + j, count);
  });
}

// One chunk: moments, then sqrt(v) by torch's own sqrt kernel (MKL's on x86, which is
// not always correctly rounded), then the step; so results equal torch's foreach path
// bit for bit. The chunk stays in L2 between the passes.
template <typename C>
void update_chunk(C* theta, C* m, C* v, const C* g, int64_t n, const AdamScalars<C>& s, C* root) {
  moments(theta, m, v, g, n, s);
  const auto options = at::TensorOptions().dtype(c10::CppTypeToScalarType<C>::value);
  at::Tensor root_view = at::from_blob(root, {n}, options);
  at::sqrt_out(root_view, at::from_blob(v, {n}, options));
  apply(theta, m, root, n, s);
}

// One chunk of tensors of dtype T computed in C: in place when T is C, else through
// widened copies rounded back once.
template <typename T, typename C>
struct ChunkUpdate {
  std::vector<C> root = std::vector<C>(kChunk);
  std::vector<C> wide = std::vector<C>(std::is_same_v<T, C> ? 0 : 4 * kChunk);

  void operator()(T* theta, T* m, T* v, const T* g, int64_t n, const AdamScalars<C>& s) {
    if constexpr (std::is_same_v<T, C>) {
      update_chunk(theta, m, v, g, n, s, root.data());
    } else {
      C* copies[4] = {wide.data(), wide.data() + kChunk, wide.data() + 2 * kChunk, wide.data() + 3 * kChunk};
      const T* sources[4] = {theta, m, v, g};
      for (int k = 0; k < 4; ++k) widen(sources[k], copies[k], n);
      update_chunk(copies[0], copies[1], copies[2], copies[3], n, s, root.data());
      narrow(copies[0], theta, n);
      narrow(copies[1], m, n);
      narrow(copies[2], v, n);
    }
  }
};

void check_lists(const at::TensorList& params, const at::TensorList& grads, const at::TensorList& exp_avgs,
                 const at::TensorList& exp_avg_sqs, const at::TensorList& steps) {
  const size_t n = params.size();
  TORCH_CHECK(grads.size() == n && exp_avgs.size() == n && exp_avg_sqs.size() == n && steps.size() == n,
              "adamw_tf_multi_tensor: lists of different lengths");
  for (size_t i = 0; i < n; ++i) {
    const auto dtype = params[i].scalar_type();
    for (const at::Tensor* t : {&params[i], &grads[i], &exp_avgs[i], &exp_avg_sqs[i]}) {
      TORCH_CHECK(t->is_contiguous() && t->scalar_type() == dtype && t->numel() == params[i].numel(),
                  "adamw_tf_multi_tensor: tensors of a parameter must be contiguous, of one dtype and size");
    }
    TORCH_CHECK(dtype == params[0].scalar_type(), "adamw_tf_multi_tensor: one dtype per call");
    TORCH_CHECK(steps[i].numel() == 1, "adamw_tf_multi_tensor: a step is a one-element tensor");
  }
}

void adamw_tf_multi_tensor(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                           at::TensorList exp_avg_sqs, at::TensorList steps, double lr, double beta1, double beta2,
                           double eps, double weight_decay, bool maximize) {
  check_lists(params, grads, exp_avgs, exp_avg_sqs, steps);
  if (params.empty()) return;
  const std::vector<Chunk> chunks = chunks_of(params);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, params[0].scalar_type(), "recis_adamw_tf", [&] {
    using T = scalar_t;
    using C = std::conditional_t<std::is_same_v<T, double>, double, float>;
    std::vector<AdamScalars<C>> scalars;
    for (const at::Tensor& step : steps) {
      at::Tensor(step).add_(1);
      const auto t = static_cast<int64_t>(step.item<double>());
      const AdamHyper hyper{lr, beta1, beta2, eps, weight_decay, WeightDecay::DECOUPLED_NO_LR,
                            EpsilonPlacement::UNCORRECTED, maximize, t};
      scalars.push_back(adam_scalars<C>(hyper));
    }
    at::parallel_for(0, static_cast<int64_t>(chunks.size()), 1, [&](int64_t first, int64_t last) {
      ChunkUpdate<T, C> update;
      for (int64_t c = first; c < last; ++c) {
        const Chunk& chunk = chunks[c];
        T* theta = params[chunk.tensor].data_ptr<T>() + chunk.begin;
        T* m = exp_avgs[chunk.tensor].data_ptr<T>() + chunk.begin;
        T* v = exp_avg_sqs[chunk.tensor].data_ptr<T>() + chunk.begin;
        const T* g = grads[chunk.tensor].data_ptr<T>() + chunk.begin;
        update(theta, m, v, g, chunk.end - chunk.begin, scalars[chunk.tensor]);
      }
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(recis, CPU, m) { m.impl("adamw_tf_multi_tensor", &adamw_tf_multi_tensor); }

}  // namespace recis::cpu
