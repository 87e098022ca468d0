// Coalescing of row gradients on CPU: sum the gradients that share a row.
//
// coalesce_rows: summed[u] = sum over k in segment u of grads[order[k]], with the
// segments of row_segments (radix grouping, no comparison sort), added in input order
// as torch's index_add_ adds them. Returns the distinct rows ascending and the sums.
// The gradients may come in pieces (what each rank sent), read as their concatenation.
// sum_by_index: sums[u] = sum of values[i] over index[i] == u, u < count, added in input
// order: zeros(count, dim).index_add_(0, index, values) in one pass.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

#include "row_pieces.h"
#include "row_segments.h"

namespace recis::cpu {
namespace {

// sum[j] += row[j]: a plain loop, which the compiler vectorizes for the build's ISA (faster
// here than at::vec's portable Vectorized, which the baseline build falls back to).
template <typename C>
inline void add_row(const C* row, int64_t dim, C* sum) {
  for (int64_t j = 0; j < dim; ++j) sum[j] += row[j];
}

template <typename C>
void sum_segments(const RowPieces& grads, const int64_t* offsets, const int64_t* order, int64_t unique, C* out) {
  const int64_t dim = grads.width();
  const int64_t grain = std::max<int64_t>(1, 8192 / std::max<int64_t>(dim, 1));
  at::parallel_for(0, unique, grain, [&](int64_t begin, int64_t end) {
    for (int64_t u = begin; u < end; ++u) sum_rows(grads, order, offsets[u], offsets[u + 1], out + u * dim);
  });
}

std::tuple<at::Tensor, at::Tensor> coalesce_rows(const at::Tensor& rows, at::TensorList grad_pieces) {
  const RowPieces grads(grad_pieces, "coalesce_rows");
  TORCH_CHECK(grads.rows() == rows.numel(), "coalesce_rows: grads must be (len(rows), dim), got ", grads.rows(),
              " rows for ", rows.numel());
  auto [unique_rows, offsets, order] = row_segments(rows);
  at::Tensor summed = at::empty({unique_rows.numel(), grads.width()}, grads.options());
  AT_DISPATCH_FLOATING_TYPES(summed.scalar_type(), "recis_coalesce_rows", [&] {
    sum_segments<scalar_t>(grads, offsets.data_ptr<int64_t>(), order.data_ptr<int64_t>(), unique_rows.numel(),
                           summed.data_ptr<scalar_t>());
  });
  return {unique_rows, summed};
}

// The first value of a row is copied, later ones added: index_add_ into zeros without writing
// the zeros first (0 + x == x, but for the sign of a zero); rows no index names are zeroed.
template <typename C>
void add_rows_at(const int64_t* index, const C* values, int64_t n, int64_t count, int64_t dim, C* sums) {
  std::vector<bool> seen(count, false);
  for (int64_t i = 0; i < n; ++i) {
    const int64_t u = index[i];
    if (seen[u]) {
      add_row(values + i * dim, dim, sums + u * dim);
    } else {
      seen[u] = true;
      std::copy(values + i * dim, values + (i + 1) * dim, sums + u * dim);
    }
  }
  for (int64_t u = 0; u < count; ++u) {
    if (!seen[u]) std::fill(sums + u * dim, sums + (u + 1) * dim, C(0));
  }
}

at::Tensor sum_by_index(const at::Tensor& index_in, const at::Tensor& values_in, int64_t count) {
  TORCH_CHECK(index_in.scalar_type() == at::kLong && index_in.dim() == 1, "index: 1-D int64");
  TORCH_CHECK(values_in.dim() == 2 && values_in.size(0) == index_in.numel(), "values must be (len(index), dim)");
  const at::Tensor index = index_in.contiguous();
  const at::Tensor values = values_in.contiguous();
  if (index.numel() > 0) {
    const auto [low, high] = at::aminmax(index);
    TORCH_CHECK(low.item<int64_t>() >= 0 && high.item<int64_t>() < count, "index out of range [0, ", count, ")");
  }
  at::Tensor sums = at::empty({count, values.size(1)}, values.options());
  AT_DISPATCH_FLOATING_TYPES(values.scalar_type(), "recis_sum_by_index", [&] {
    add_rows_at<scalar_t>(index.data_ptr<int64_t>(), values.data_ptr<scalar_t>(), index.numel(), count,
                          values.size(1), sums.data_ptr<scalar_t>());
  });
  return sums;
}

}  // namespace

TORCH_LIBRARY_IMPL(recis, CPU, m) {
  m.impl("coalesce_rows", &coalesce_rows);
  m.impl("sum_by_index", &sum_by_index);
}

}  // namespace recis::cpu
