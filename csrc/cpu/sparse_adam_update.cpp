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
#include <torch/library.h>

#include <optional>
#include <type_traits>

#include "../common/adam_rule.h"
#include "adam_span_avx2.h"
#include "row_pieces.h"
#include "touched_rows.h"
#include "vec_math.h"

namespace recis::cpu {
namespace {

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

// One chunk's updater of for_each_touched_row. W: the rows' dtype, S: the slots' dtype, C: the
// compute type; a row and its slots are widened to C (when they are not C) and rounded back once.
template <typename W, typename S, typename C>
class AdamRows {
 public:
  AdamRows(W* weight, S* exp_avg, S* exp_avg_sq, int64_t* row_steps, int64_t dim, const AdamHyper& hyper,
           const AdamScalars<C>& scalars)
      : weight_(weight), exp_avg_(exp_avg), exp_avg_sq_(exp_avg_sq), row_steps_(row_steps), dim_(dim),
        hyper_(hyper), s_(scalars), theta_(dim), m_(dim), v_(dim) {}

  void prefetch(int64_t r) const {
    prefetch_row(weight_ + r * dim_, dim_ * sizeof(W));
    prefetch_row(exp_avg_ + r * dim_, dim_ * sizeof(S));
    prefetch_row(exp_avg_sq_ + r * dim_, dim_ * sizeof(S));
  }

  void operator()(int64_t /*u*/, int64_t r, const C* g) {
    RowStep<C> step;
    if (row_steps_ != nullptr) step = row_step<C>(hyper_.lr, hyper_.beta1, hyper_.beta2, s_.corrected, ++row_steps_[r]);
    const RowStep<C>* per_row = row_steps_ != nullptr ? &step : nullptr;
    W* w_row = weight_ + r * dim_;
    S* m_row = exp_avg_ + r * dim_;
    S* v_row = exp_avg_sq_ + r * dim_;
    if constexpr (std::is_same_v<W, C> && std::is_same_v<S, C>) {  // the common case: no widening at all
      update_row<C>(w_row, m_row, v_row, g, dim_, s_, per_row);
    } else {
      update_row<C>(theta_.load(w_row, dim_), m_.load(m_row, dim_), v_.load(v_row, dim_), g, dim_, s_, per_row);
      theta_.store(w_row, dim_);
      m_.store(m_row, dim_);
      v_.store(v_row, dim_);
    }
  }

 private:
  W* weight_;
  S* exp_avg_;
  S* exp_avg_sq_;
  int64_t* row_steps_;
  int64_t dim_;
  const AdamHyper& hyper_;
  const AdamScalars<C>& s_;
  WideRow<W, C> theta_;
  WideRow<S, C> m_, v_;
};

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
  TORCH_CHECK_VALUE(grad_divisor > 0, "grad_divisor must be positive, got ", grad_divisor);
  const TouchedRows touched(given_rows, sum_repeated_rows, weight.size(0));
  const AdamHyper hyper{lr, beta1, beta2, eps, weight_decay, static_cast<WeightDecay>(decay),
                        static_cast<EpsilonPlacement>(epsilon), maximize, step};
  int64_t* steps = row_steps.has_value() ? row_steps->data_ptr<int64_t>() : nullptr;
  const int64_t dim = weight.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, exp_avg.scalar_type(), "recis_sparse_adam_slots", [&] {
    using S = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, weight.scalar_type(), "recis_sparse_adam_rows", [&] {
      using W = scalar_t;
      using C = std::conditional_t<std::is_same_v<W, double> || std::is_same_v<S, double>, double, float>;
      const AdamScalars<C> scalars = adam_scalars<C>(hyper);
      W* rows_of = weight.data_ptr<W>();
      S* exp_avg_of = exp_avg.data_ptr<S>();
      S* exp_avg_sq_of = exp_avg_sq.data_ptr<S>();
      for_each_touched_row<C>(touched.rows.data_ptr<int64_t>(), touched.rows.numel(), touched.gradients<C>(grad),
                              static_cast<C>(grad_divisor), dim, [&] {
                                return AdamRows<W, S, C>(rows_of, exp_avg_of, exp_avg_sq_of, steps, dim, hyper, scalars);
                              });
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(recis, CPU, m) { m.impl("sparse_adam_update", &sparse_adam_update); }

}  // namespace recis::cpu
