// Fused Adam-family update of the touched rows of a table, on CPU.
//
// One pass over the touched rows reads the row, its exp_avg and exp_avg_sq once, does
// the math of common/adam_rule.h in the compute type C (float, or double when the rows
// or the slots are float64: never narrower than float32) and writes the three back
// once. rows are distinct; grad[u] is the (coalesced) gradient of rows[u], in C. Rows
// and slots of any floating dtype (float32, float64, bfloat16, float16) are widened to
// C and rounded back once, as the torch kernel's .to() does. With grad_divisor != 1 each
// gradient row is divided by it first, in C (the mean over workers or accumulation steps),
// so that the caller need not write a divided copy of the whole gradient. The gradient may
// come in pieces (what each rank sent, row_pieces.h). With sum_repeated_rows, rows may
// repeat: their gradient rows are summed first, in input order (as coalesce_rows sums them),
// and each distinct row is updated once, in ascending order, without a coalesced copy.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

#include "../common/adam_rule.h"
#include "adam_span_avx2.h"
#include "row_pieces.h"
#include "row_segments.h"
#include "vec_math.h"

namespace recis::cpu {
namespace {

constexpr int64_t kPrefetchDistance = 4;  // rows ahead

// The rule over one row: AVX2+FMA when the CPU has it, else at::vec.
template <typename C>
void update_row(C* theta, C* m, C* v, const C* g, int64_t dim, const AdamScalars<C>& s, const RowStep<C>* row) {
  if (cpu_has_avx2_fma()) return adam_span_avx2(theta, m, v, g, dim, s, row);
  using V = Vectorized<C>;
  for_each_vector<C>(dim, [&](int64_t j, int64_t n) {
    V t = load(theta + j, n), mm = load(m + j, n), vv = load(v + j, n);
    adam_element<VecMath, V, C>(t, mm, vv, load(g + j, n), s, row);
    store(t, theta + j, n);
    store(mm, m + j, n);
    store(vv, v + j, n);
  });
}

// A row of T seen in the compute type C: the row itself when T is C, else a widened
// copy (in `buffer`) that store() rounds back.
template <typename T, typename C>
struct WideRow {
  std::vector<C> buffer;
  explicit WideRow(int64_t dim) : buffer(std::is_same_v<T, C> ? 0 : dim) {}

  C* load(T* row, int64_t dim) {
    if constexpr (std::is_same_v<T, C>) {
      return row;
    } else {
      widen(row, buffer.data(), dim);
      return buffer.data();
    }
  }
  void store(T* row, int64_t dim) const {
    if constexpr (!std::is_same_v<T, C>) narrow(buffer.data(), row, dim);
  }
};

// The gradient of the u-th updated row: row u of the pieces, or with segments the sum of the
// rows order[offsets[u]] .. order[offsets[u + 1] - 1], in that order.
template <typename C>
class RowGradients {
 public:
  RowGradients(const RowPieces& pieces, const int64_t* offsets, const int64_t* order)
      : pieces_(pieces), offsets_(offsets), order_(order) {}

  const C* of(int64_t u, C* sum) const {
    if (offsets_ == nullptr) return pieces_.row_as<C>(u);
    if (offsets_[u + 1] - offsets_[u] == 1) return pieces_.row_as<C>(order_[offsets_[u]]);  // no copy
    sum_rows(pieces_, order_, offsets_[u], offsets_[u + 1], sum);
    return sum;
  }

 private:
  const RowPieces& pieces_;
  const int64_t* offsets_;
  const int64_t* order_;
};

// W: the rows' dtype, S: the slots' dtype, C: the compute type.
template <typename W, typename S, typename C>
void update_rows(W* weight, S* exp_avg, S* exp_avg_sq, const int64_t* rows, int64_t count,
                 const RowGradients<C>& grads, C grad_divisor, int64_t dim, int64_t* row_steps,
                 const AdamHyper& hyper) {
  const AdamScalars<C> s = adam_scalars<C>(hyper);
  const int64_t grain = std::max<int64_t>(1, 4096 / std::max<int64_t>(dim, 1));
  at::parallel_for(0, count, grain, [&](int64_t begin, int64_t end) {
    WideRow<W, C> theta(dim);
    WideRow<S, C> m(dim), v(dim);
    std::vector<C> quotient(grad_divisor == C(1) ? 0 : dim), sum(dim);
    for (int64_t u = begin; u < end; ++u) {
      if (u + kPrefetchDistance < end) {
        const int64_t ahead = rows[u + kPrefetchDistance];
        prefetch_row(weight + ahead * dim, dim * sizeof(W));
        prefetch_row(exp_avg + ahead * dim, dim * sizeof(S));
        prefetch_row(exp_avg_sq + ahead * dim, dim * sizeof(S));
      }
      const int64_t r = rows[u];
      RowStep<C> step;
      if (row_steps != nullptr) {
        const int64_t t = ++row_steps[r];
        step = row_step<C>(hyper.lr, hyper.beta1, hyper.beta2, s.corrected, t);
      }
      const RowStep<C>* per_row = row_steps != nullptr ? &step : nullptr;
      const C* g = grads.of(u, sum.data());
      if (!quotient.empty()) {
        for (int64_t j = 0; j < dim; ++j) quotient[j] = g[j] / grad_divisor;
        g = quotient.data();
      }
      W* w_row = weight + r * dim;
      S* m_row = exp_avg + r * dim;
      S* v_row = exp_avg_sq + r * dim;
      if constexpr (std::is_same_v<W, C> && std::is_same_v<S, C>) {  // the common case: no widening at all
        update_row<C>(w_row, m_row, v_row, g, dim, s, per_row);
        continue;
      }
      update_row<C>(theta.load(w_row, dim), m.load(m_row, dim), v.load(v_row, dim), g, dim, s, per_row);
      theta.store(w_row, dim);
      m.store(m_row, dim);
      v.store(v_row, dim);
    }
  });
}

void check_inputs(const at::Tensor& weight, const at::Tensor& exp_avg, const at::Tensor& exp_avg_sq,
                  const at::Tensor& rows, const RowPieces& grad, const std::optional<at::Tensor>& row_steps) {
  TORCH_CHECK(weight.dim() == 2 && weight.is_contiguous(), "weight must be a contiguous 2-D tensor");
  TORCH_CHECK(exp_avg.sizes() == weight.sizes() && exp_avg_sq.sizes() == weight.sizes(),
              "exp_avg and exp_avg_sq must have the shape of weight");
  TORCH_CHECK(exp_avg.is_contiguous() && exp_avg_sq.is_contiguous(), "slots must be contiguous");
  TORCH_CHECK(exp_avg.scalar_type() == exp_avg_sq.scalar_type(), "exp_avg and exp_avg_sq must share a dtype");
  const bool wide = weight.scalar_type() == at::kDouble || exp_avg.scalar_type() == at::kDouble;
  TORCH_CHECK(grad.options().dtype() == (wide ? at::kDouble : at::kFloat),
              "grad must have the compute dtype: float64 when the rows or slots are float64, else float32");
  TORCH_CHECK(rows.scalar_type() == at::kLong && rows.dim() == 1 && rows.is_contiguous(), "rows: 1-D int64");
  TORCH_CHECK(grad.width() == weight.size(1), "grad: (n, dim)");
  TORCH_CHECK(grad.rows() == rows.numel(), "grad must have one row per touched row");
  if (row_steps.has_value()) {
    TORCH_CHECK(row_steps->scalar_type() == at::kLong && row_steps->is_contiguous() &&
                    row_steps->numel() == weight.size(0), "row_steps: int64, one per row");
  }
}

void sparse_adam_update(at::Tensor weight, at::Tensor exp_avg, at::Tensor exp_avg_sq, const at::Tensor& given_rows,
                        at::TensorList grad_pieces, std::optional<at::Tensor> row_steps, double lr, double beta1,
                        double beta2, double eps, double weight_decay, int64_t decay, int64_t epsilon, bool maximize,
                        int64_t step, double grad_divisor, bool sum_repeated_rows) {
  const RowPieces grad(grad_pieces, "sparse_adam_update");
  check_inputs(weight, exp_avg, exp_avg_sq, given_rows, grad, row_steps);
  at::Tensor rows = given_rows, offsets, order;  // with repeats: the distinct rows and their segments
  if (sum_repeated_rows) std::tie(rows, offsets, order) = row_segments(given_rows);
  const int64_t* segment_offsets = sum_repeated_rows ? offsets.data_ptr<int64_t>() : nullptr;
  const int64_t* segment_order = sum_repeated_rows ? order.data_ptr<int64_t>() : nullptr;
  TORCH_CHECK(grad_divisor > 0, "grad_divisor must be positive, got ", grad_divisor);
  const AdamHyper hyper{lr, beta1, beta2, eps, weight_decay, static_cast<WeightDecay>(decay),
                        static_cast<EpsilonPlacement>(epsilon), maximize, step};
  int64_t* steps = row_steps.has_value() ? row_steps->data_ptr<int64_t>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, exp_avg.scalar_type(), "recis_sparse_adam_slots", [&] {
    using S = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, weight.scalar_type(), "recis_sparse_adam_rows", [&] {
      using W = scalar_t;
      using C = std::conditional_t<std::is_same_v<W, double> || std::is_same_v<S, double>, double, float>;
      const RowGradients<C> grads(grad, segment_offsets, segment_order);
      update_rows<W, S, C>(weight.data_ptr<W>(), exp_avg.data_ptr<S>(), exp_avg_sq.data_ptr<S>(),
                           rows.data_ptr<int64_t>(), rows.numel(), grads, static_cast<C>(grad_divisor),
                           weight.size(1), steps, hyper);
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(recis, CPU, m) { m.impl("sparse_adam_update", &sparse_adam_update); }

}  // namespace recis::cpu
