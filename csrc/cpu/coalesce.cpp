// Coalescing of row gradients on CPU: sum the gradients that share a row.
//
// summed[u] = sum over k in segment u of grads[order[k]], with the segments of
// row_segments (radix grouping, no comparison sort), added in input order as torch's
// index_add_ adds them. Returns the distinct rows ascending and the sums.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <tuple>

#include "row_segments.h"
#include "vec_math.h"

namespace recis::cpu {
namespace {

template <typename C>
void sum_segments(const C* grads, const int64_t* offsets, const int64_t* order, int64_t unique, int64_t dim, C* out) {
  const int64_t grain = std::max<int64_t>(1, 8192 / std::max<int64_t>(dim, 1));
  at::parallel_for(0, unique, grain, [&](int64_t begin, int64_t end) {
    for (int64_t u = begin; u < end; ++u) {
      C* sum = out + u * dim;
      const C* first = grads + order[offsets[u]] * dim;
      std::copy(first, first + dim, sum);
      for (int64_t k = offsets[u] + 1; k < offsets[u + 1]; ++k) {
        const C* g = grads + order[k] * dim;
        for_each_vector<C>(dim, [&](int64_t j, int64_t n) { store(load(sum + j, n) + load(g + j, n), sum + j, n); });
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> coalesce_rows(const at::Tensor& rows, const at::Tensor& grads_in) {
  TORCH_CHECK(grads_in.dim() == 2 && grads_in.size(0) == rows.numel(), "grads must be (len(rows), dim)");
  const at::Tensor grads = grads_in.contiguous();
  auto [unique_rows, offsets, order] = row_segments(rows);
  at::Tensor summed = at::empty({unique_rows.numel(), grads.size(1)}, grads.options());
  AT_DISPATCH_FLOATING_TYPES(grads.scalar_type(), "recis_coalesce_rows", [&] {
    sum_segments<scalar_t>(grads.data_ptr<scalar_t>(), offsets.data_ptr<int64_t>(), order.data_ptr<int64_t>(),
                           unique_rows.numel(), grads.size(1), summed.data_ptr<scalar_t>());
  });
  return {unique_rows, summed};
}

}  // namespace

TORCH_LIBRARY_IMPL(recis, CPU, m) { m.impl("coalesce_rows", &coalesce_rows); }

}  // namespace recis::cpu
