// torch binding of the CUDA kernels: checks, allocation, and the launch on the current
// stream with raw pointers (launchers.h). Compiled only when torch has CUDA
// (RECIS_WITH_CUDA); the CPU kernels register the same operators for the CPU key.
// Host synchronization happens only where an output's size depends on the data (the
// number of distinct rows of a coalescing, the new size of the id map).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <initializer_list>
#include <optional>
#include <tuple>

#include "launchers.h"

namespace recis::cuda {
namespace {

void check(cudaError_t status, const char* what) {
  TORCH_CHECK(status == cudaSuccess, what, ": ", cudaGetErrorString(status));
}

cudaStream_t stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

RowType row_type_of(const at::Tensor& weight) {
  switch (weight.scalar_type()) {
    case at::kFloat: return RowType::kFloat32;
    case at::kBFloat16: return RowType::kBFloat16;
    case at::kHalf: return RowType::kFloat16;
    default: TORCH_CHECK(false, "CUDA sparse_adam_update: rows must be float32, bfloat16 or float16");
  }
}

void sparse_adam_update_op(at::Tensor weight, at::Tensor exp_avg, at::Tensor exp_avg_sq, const at::Tensor& rows,
                        const at::Tensor& grad, std::optional<at::Tensor> row_steps, double lr, double beta1,
                        double beta2, double eps, double weight_decay, int64_t decay, int64_t epsilon, bool maximize,
                        int64_t step) {
  const c10::cuda::CUDAGuard guard(weight.device());
  TORCH_CHECK(exp_avg.scalar_type() == at::kFloat && exp_avg_sq.scalar_type() == at::kFloat &&
                  grad.scalar_type() == at::kFloat, "CUDA sparse_adam_update: float32 slots and gradient");
  for (const at::Tensor* t : std::initializer_list<const at::Tensor*>{&weight, &exp_avg, &exp_avg_sq, &rows, &grad}) {
    TORCH_CHECK(t->is_contiguous() && t->device() == weight.device(), "CUDA sparse_adam_update: contiguous, one device");
  }
  TORCH_CHECK(grad.size(0) == rows.numel() && grad.size(1) == weight.size(1), "grad must be (len(rows), dim)");
  const AdamHyper hyper{lr, beta1, beta2, eps, weight_decay, static_cast<WeightDecay>(decay),
                        static_cast<EpsilonPlacement>(epsilon), maximize, step};
  int64_t* steps = row_steps.has_value() ? row_steps->data_ptr<int64_t>() : nullptr;
  check(recis::cuda::sparse_adam_update(weight.data_ptr(), row_type_of(weight), exp_avg.data_ptr<float>(),
                                        exp_avg_sq.data_ptr<float>(), rows.data_ptr<int64_t>(), rows.numel(),
                                        grad.data_ptr<float>(), weight.size(1), steps, hyper, stream()),
        "sparse_adam_update");
}

std::tuple<at::Tensor, at::Tensor> coalesce_rows_op(const at::Tensor& rows_in, const at::Tensor& grads_in) {
  const c10::cuda::CUDAGuard guard(rows_in.device());
  TORCH_CHECK(grads_in.scalar_type() == at::kFloat, "CUDA coalesce_rows: float32 gradients");
  const at::Tensor rows = rows_in.contiguous(), grads = grads_in.contiguous();
  const int64_t n = rows.numel(), dim = grads.size(1);
  const auto longs = rows.options();
  at::Tensor sorted = at::empty({n}, longs), order = at::empty({n}, longs), offsets = at::empty({n + 1}, longs);
  at::Tensor unique_rows = at::empty({n}, longs), unique_count = at::empty({1}, longs);
  const std::size_t bytes = coalesce_workspace_bytes(n);
  at::Tensor workspace = at::empty({static_cast<int64_t>(bytes)}, rows.options().dtype(at::kByte));
  check(coalesce_group(rows.data_ptr<int64_t>(), n, sorted.data_ptr<int64_t>(), order.data_ptr<int64_t>(),
                       offsets.data_ptr<int64_t>(), unique_rows.data_ptr<int64_t>(),
                       unique_count.data_ptr<int64_t>(), workspace.data_ptr(), bytes, stream()),
        "coalesce_group");
  const int64_t unique = unique_count.item<int64_t>();  // the output's size: one synchronization
  at::Tensor summed = at::empty({unique, dim}, grads.options());
  check(coalesce_sum(grads.data_ptr<float>(), dim, order.data_ptr<int64_t>(), offsets.data_ptr<int64_t>(), unique, n,
                     summed.data_ptr<float>(), stream()),
        "coalesce_sum");
  return {unique_rows.narrow(0, 0, unique), summed};
}

at::Tensor id_map_find_op(const at::Tensor& buckets, const at::Tensor& ids) {
  const c10::cuda::CUDAGuard guard(buckets.device());
  at::Tensor rows = at::empty_like(ids);
  check(recis::cuda::id_map_find(buckets.data_ptr<int64_t>(), buckets.size(0), ids.data_ptr<int64_t>(), ids.numel(),
                                 rows.data_ptr<int64_t>(), stream()),
        "id_map_find");
  return rows;
}

std::tuple<at::Tensor, int64_t> id_map_insert_missing_op(at::Tensor buckets, const at::Tensor& ids, at::Tensor rows,
                                                      int64_t size) {
  const c10::cuda::CUDAGuard guard(buckets.device());
  const int64_t n = ids.numel();
  at::Tensor is_new = at::empty({n}, ids.options().dtype(at::kBool));
  at::Tensor new_size = at::empty({1}, ids.options());
  const std::size_t bytes = id_map_insert_workspace_bytes(n);
  at::Tensor workspace = at::empty({static_cast<int64_t>(bytes)}, ids.options().dtype(at::kByte));
  check(recis::cuda::id_map_insert_missing(buckets.data_ptr<int64_t>(), buckets.size(0), ids.data_ptr<int64_t>(), n,
                                           rows.data_ptr<int64_t>(), is_new.data_ptr<bool>(), size,
                                           new_size.data_ptr<int64_t>(), workspace.data_ptr(), bytes, stream()),
        "id_map_insert_missing");
  return {is_new, new_size.item<int64_t>()};  // the map's size is host state: one synchronization
}

at::Tensor id_map_rehash_op(const at::Tensor& buckets, int64_t bucket_count) {
  const c10::cuda::CUDAGuard guard(buckets.device());
  at::Tensor grown = at::empty({bucket_count, 2}, buckets.options());
  grown.select(1, 1).fill_(-1);
  check(recis::cuda::id_map_rehash(buckets.data_ptr<int64_t>(), buckets.size(0), grown.data_ptr<int64_t>(),
                                   bucket_count, stream()),
        "id_map_rehash");
  return grown;
}

at::Tensor id_map_keys_by_row_op(const at::Tensor& buckets, int64_t size) {
  const c10::cuda::CUDAGuard guard(buckets.device());
  at::Tensor keys = at::empty({size}, buckets.options());
  check(recis::cuda::id_map_keys_by_row(buckets.data_ptr<int64_t>(), buckets.size(0), keys.data_ptr<int64_t>(),
                                        stream()),
        "id_map_keys_by_row");
  return keys;
}

}  // namespace

TORCH_LIBRARY_IMPL(recis, CUDA, m) {
  m.impl("sparse_adam_update", &sparse_adam_update_op);
  m.impl("coalesce_rows", &coalesce_rows_op);
  m.impl("id_map_find", &id_map_find_op);
  m.impl("id_map_insert_missing", &id_map_insert_missing_op);
  m.impl("id_map_rehash", &id_map_rehash_op);
  m.impl("id_map_keys_by_row", &id_map_keys_by_row_op);
}

}  // namespace recis::cuda
