// Fused Adagrad-family update (element-wise or row-wise) of the touched rows of a table, on CPU.
//
// One pass over the touched rows (touched_rows.h) reads the row and its accumulator slot S once,
// does the math in the compute type C (float, or double when the rows or the slot are float64)
// and writes both back once. With g the row's gradient (summed over repeated rows, divided by
// grad_divisor; -g when maximizing), theta the row, init, eps, wd and lr (already decayed for
// the table's step) the hyperparameters, fma(a, b, c) = a * b + c rounded once:
//   g      = fma(theta, wd, g)                          (when wd != 0)
//   q      = g * g, or the given grad_sq row (the "Sum" variants)
//   S     += q    (element-wise: S has the row's width)  |  S += (sum_j q_j) / dim  (row-wise: width 1)
//   denom  = sqrt(S + init) + eps
//   theta  = theta + (-lr * g) / denom
// the operations of the torch kernel (recis/ops/sparse_adagrad_update.py: add with alpha, add_,
// sqrt_, addcdiv_), to float32 rounding: the row-wise mean sums in row order, torch's reduction
// in its own.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <cmath>
#include <optional>
#include <type_traits>
#include <vector>

#include "row_pieces.h"
#include "touched_rows.h"
#include "vec_math.h"

namespace recis::cpu {
namespace {

template <typename C>
struct AdagradScalars {
  C neg_lr, init, eps, weight_decay;
  bool maximize, row_wise;
};

// One chunk's updater of for_each_touched_row. W: the rows' dtype, S: the slot's, C: the compute type.
template <typename W, typename S, typename C>
class AdagradRows {
 public:
  AdagradRows(W* weight, S* slot, const C* grad_sq, int64_t dim, const AdagradScalars<C>& scalars)
      : weight_(weight), slot_(slot), grad_sq_(grad_sq), dim_(dim), slot_width_(scalars.row_wise ? 1 : dim),
        s_(scalars), theta_(dim), total_(slot_width_), g_(dim) {}

  void prefetch(int64_t r) const {
    prefetch_row(weight_ + r * dim_, dim_ * sizeof(W));
    prefetch_row(slot_ + r * slot_width_, slot_width_ * sizeof(S));
  }

  void operator()(int64_t u, int64_t r, const C* grad) {
    W* w_row = weight_ + r * dim_;
    S* s_row = slot_ + r * slot_width_;
    C* theta = theta_.load(w_row, dim_);
    C* total = total_.load(s_row, slot_width_);
    C* g = g_.data();
    for (int64_t j = 0; j < dim_; ++j) {
      const C gj = s_.maximize ? -grad[j] : grad[j];
      g[j] = s_.weight_decay != C(0) ? std::fma(theta[j], s_.weight_decay, gj) : gj;
    }
    const C* given_squares = grad_sq_ != nullptr ? grad_sq_ + u * dim_ : nullptr;
    if (s_.row_wise) {
      C squares = 0;
      for (int64_t j = 0; j < dim_; ++j) squares += given_squares != nullptr ? given_squares[j] : g[j] * g[j];
      total[0] += squares / static_cast<C>(dim_);
      const C denom = std::sqrt(total[0] + s_.init) + s_.eps;
      for (int64_t j = 0; j < dim_; ++j) theta[j] = theta[j] + (s_.neg_lr * g[j]) / denom;
    } else {
      for (int64_t j = 0; j < dim_; ++j) {
        total[j] += given_squares != nullptr ? given_squares[j] : g[j] * g[j];
        theta[j] = theta[j] + (s_.neg_lr * g[j]) / (std::sqrt(total[j] + s_.init) + s_.eps);
      }
    }
    theta_.store(w_row, dim_);
    total_.store(s_row, slot_width_);
  }

 private:
  W* weight_;
  S* slot_;
  const C* grad_sq_;
  int64_t dim_, slot_width_;
  const AdagradScalars<C>& s_;
  WideRow<W, C> theta_;
  WideRow<S, C> total_;
  std::vector<C> g_;
};

void check_inputs(const at::Tensor& weight, const at::Tensor& slot, const at::Tensor& rows, const RowPieces& grad,
                  const std::optional<at::Tensor>& grad_sq, bool row_wise, bool sum_repeated_rows) {
  TORCH_CHECK(weight.dim() == 2 && weight.is_contiguous(), "weight must be a contiguous 2-D tensor");
  const int64_t slot_width = row_wise ? 1 : weight.size(1);
  TORCH_CHECK(slot.dim() == 2 && slot.is_contiguous() && slot.size(0) == weight.size(0) && slot.size(1) == slot_width,
              "the accumulator slot must be a contiguous (rows, ", slot_width, ") tensor, got ", slot.sizes());
  const bool wide = weight.scalar_type() == at::kDouble || slot.scalar_type() == at::kDouble;
  const auto compute = wide ? at::kDouble : at::kFloat;
  TORCH_CHECK(grad.options().dtype() == compute,
              "grad must have the compute dtype: float64 when the rows or the slot are float64, else float32");
  TORCH_CHECK(rows.scalar_type() == at::kLong && rows.dim() == 1 && rows.is_contiguous(), "rows: 1-D int64");
  TORCH_CHECK(grad.width() == weight.size(1), "grad: (n, dim)");
  TORCH_CHECK(grad.rows() == rows.numel(), "grad must have one row per touched row");
  if (grad_sq.has_value()) {
    TORCH_CHECK_VALUE(!sum_repeated_rows, "grad_sq needs distinct rows (coalesce first)");
    TORCH_CHECK(grad_sq->scalar_type() == compute && grad_sq->is_contiguous() && grad_sq->dim() == 2 &&
                    grad_sq->size(0) == rows.numel() && grad_sq->size(1) == weight.size(1),
                "grad_sq: contiguous (n, dim) in the compute dtype");
  }
}

void sparse_adagrad_update(at::Tensor weight, at::Tensor slot, const at::Tensor& given_rows,
                           at::TensorList grad_pieces, std::optional<at::Tensor> grad_sq, bool row_wise, double lr,
                           double initial_accumulator_value, double eps, double weight_decay, bool maximize,
                           double grad_divisor, bool sum_repeated_rows) {
  const RowPieces grad(grad_pieces, "sparse_adagrad_update");
  check_inputs(weight, slot, given_rows, grad, grad_sq, row_wise, sum_repeated_rows);
  TORCH_CHECK_VALUE(grad_divisor > 0, "grad_divisor must be positive, got ", grad_divisor);
  const TouchedRows touched(given_rows, sum_repeated_rows, weight.size(0));
  const int64_t dim = weight.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, slot.scalar_type(), "recis_sparse_adagrad_slot", [&] {
    using S = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, weight.scalar_type(), "recis_sparse_adagrad_rows", [&] {
      using W = scalar_t;
      using C = std::conditional_t<std::is_same_v<W, double> || std::is_same_v<S, double>, double, float>;
      const AdagradScalars<C> scalars{static_cast<C>(-lr), static_cast<C>(initial_accumulator_value),
                                      static_cast<C>(eps), static_cast<C>(weight_decay), maximize, row_wise};
      W* rows_of = weight.data_ptr<W>();
      S* slot_of = slot.data_ptr<S>();
      const C* squares = grad_sq.has_value() ? grad_sq->data_ptr<C>() : nullptr;
      for_each_touched_row<C>(touched.rows.data_ptr<int64_t>(), touched.rows.numel(), touched.gradients<C>(grad),
                              static_cast<C>(grad_divisor), dim,
                              [&] { return AdagradRows<W, S, C>(rows_of, slot_of, squares, dim, scalars); });
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(recis, CPU, m) { m.impl("sparse_adagrad_update", &sparse_adagrad_update); }

}  // namespace recis::cpu
