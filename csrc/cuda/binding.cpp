// torch binding of the CUDA kernels: checks, allocation, and the launch on the current
// stream with raw pointers (launchers.h). Linked only when torch has CUDA
// (RECIS_WITH_CUDA); the CPU kernels register the same operators for the CPU key.
// Host synchronization happens only where an output's size depends on the data (the
// number of distinct rows of a coalescing).
//
// The checks match the CPU operators': a bad argument raises here rather than letting
// a kernel read or write out of bounds (which would lose the CUDA context).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
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

void check_on(const char* op, const at::Tensor& anchor, std::initializer_list<const at::Tensor*> tensors) {
  for (const at::Tensor* t : tensors) {
    TORCH_CHECK(t->device() == anchor.device(), op, ": every tensor must be on ", anchor.device(), ", got ",
                t->device());
    TORCH_CHECK(t->is_contiguous(), op, ": tensors must be contiguous");
  }
}

void check_int64_vector(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.scalar_type() == at::kLong && t.dim() == 1, op, ": ", name, " must be a 1-D int64 tensor");
}

void check_buckets(const char* op, const at::Tensor& buckets) {
  TORCH_CHECK(buckets.scalar_type() == at::kLong && buckets.dim() == 2 && buckets.size(1) == 2, op,
              ": buckets must be an int64 tensor of shape (bucket_count, 2)");
  const int64_t count = buckets.size(0);
  TORCH_CHECK(count > 0 && (count & (count - 1)) == 0, op, ": bucket_count must be a power of two, got ", count);
}

RowType row_type_of(const at::Tensor& weight) {
  switch (weight.scalar_type()) {
    case at::kFloat: return RowType::kFloat32;
    case at::kBFloat16: return RowType::kBFloat16;
    case at::kHalf: return RowType::kFloat16;
    default: TORCH_CHECK(false, "CUDA sparse_adam_update: rows must be float32, bfloat16 or float16");
  }
}

// The kernel takes the final gradient: a divisor (mean over workers) is applied by torch first.
at::Tensor divided(const at::Tensor& grad, double grad_divisor) {
  TORCH_CHECK_VALUE(grad_divisor > 0, "grad_divisor must be positive, got ", grad_divisor);
  return grad_divisor == 1.0 ? grad : grad / grad_divisor;
}

void sparse_adam_update_op(at::Tensor weight, at::Tensor exp_avg, at::Tensor exp_avg_sq, const at::Tensor& rows,
                           at::TensorList grad_pieces, std::optional<at::Tensor> row_steps, double lr, double beta1,
                           double beta2, double eps, double weight_decay, int64_t decay, int64_t epsilon,
                           bool maximize, int64_t step, double grad_divisor, bool sum_repeated_rows) {
  constexpr const char* op = "CUDA sparse_adam_update";
  TORCH_CHECK(grad_pieces.size() == 1 && !sum_repeated_rows, op,
              ": one piece of gradients of distinct rows (recis/ops/native_kernels.py coalesces them)");
  const at::Tensor& grad = grad_pieces[0];
  const c10::cuda::CUDAGuard guard(weight.device());
  check_on(op, weight, {&weight, &exp_avg, &exp_avg_sq, &rows, &grad});
  TORCH_CHECK(weight.dim() == 2, op, ": weight must be 2-D");
  TORCH_CHECK(exp_avg.sizes() == weight.sizes() && exp_avg_sq.sizes() == weight.sizes(), op,
              ": exp_avg and exp_avg_sq must have the shape of weight");
  TORCH_CHECK(exp_avg.scalar_type() == at::kFloat && exp_avg_sq.scalar_type() == at::kFloat &&
                  grad.scalar_type() == at::kFloat, op, ": float32 slots and gradient");
  check_int64_vector(op, "rows", rows);
  TORCH_CHECK(grad.dim() == 2 && grad.size(0) == rows.numel() && grad.size(1) == weight.size(1), op,
              ": grad must be (len(rows), dim)");
  int64_t* steps = nullptr;
  if (row_steps.has_value()) {
    check_on(op, weight, {&*row_steps});
    TORCH_CHECK(row_steps->scalar_type() == at::kLong && row_steps->numel() == weight.size(0), op,
                ": row_steps must be int64, one per row");
    steps = row_steps->data_ptr<int64_t>();
  }
  const at::Tensor final_grad = divided(grad, grad_divisor);  // held until the launch is queued
  const AdamHyper hyper{lr, beta1, beta2, eps, weight_decay, static_cast<WeightDecay>(decay),
                        static_cast<EpsilonPlacement>(epsilon), maximize, step};
  check(recis::cuda::sparse_adam_update(weight.data_ptr(), row_type_of(weight), exp_avg.data_ptr<float>(),
                                        exp_avg_sq.data_ptr<float>(), rows.data_ptr<int64_t>(), rows.numel(),
                                        weight.size(0), final_grad.data_ptr<float>(), weight.size(1), steps, hyper,
                                        stream()),
        "sparse_adam_update");
}

std::tuple<at::Tensor, at::Tensor> coalesce_rows_op(const at::Tensor& rows_in, at::TensorList grad_pieces) {
  constexpr const char* op = "CUDA coalesce_rows";
  TORCH_CHECK(grad_pieces.size() == 1, op, ": one piece of gradients (recis/ops/native_kernels.py joins them)");
  const at::Tensor& grads_in = grad_pieces[0];
  const c10::cuda::CUDAGuard guard(rows_in.device());
  check_int64_vector(op, "rows", rows_in);
  TORCH_CHECK(grads_in.scalar_type() == at::kFloat, op, ": float32 gradients");
  TORCH_CHECK(grads_in.dim() == 2 && grads_in.size(0) == rows_in.numel(), op, ": grads must be (len(rows), dim)");
  const at::Tensor rows = rows_in.contiguous(), grads = grads_in.contiguous();
  check_on(op, rows, {&grads});
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
  return {unique_rows.narrow(0, 0, unique).clone(), summed};  // not a view keeping n rows alive
}

at::Tensor id_map_find_op(const at::Tensor& buckets, const at::Tensor& ids) {
  constexpr const char* op = "CUDA id_map_find";
  const c10::cuda::CUDAGuard guard(buckets.device());
  check_buckets(op, buckets);
  check_int64_vector(op, "ids", ids);
  check_on(op, buckets, {&buckets, &ids});
  at::Tensor rows = at::empty_like(ids);
  check(recis::cuda::id_map_find(buckets.data_ptr<int64_t>(), buckets.size(0), ids.data_ptr<int64_t>(), ids.numel(),
                                 rows.data_ptr<int64_t>(), stream()),
        "id_map_find");
  return rows;
}

void id_map_insert_op(at::Tensor buckets, const at::Tensor& ids, const at::Tensor& rows) {
  constexpr const char* op = "CUDA id_map_insert";
  const c10::cuda::CUDAGuard guard(buckets.device());
  check_buckets(op, buckets);
  check_int64_vector(op, "ids", ids);
  check_int64_vector(op, "rows", rows);
  check_on(op, buckets, {&buckets, &ids, &rows});
  TORCH_CHECK(rows.numel() == ids.numel(), op, ": ", ids.numel(), " ids but ", rows.numel(), " rows");
  check(recis::cuda::id_map_insert(buckets.data_ptr<int64_t>(), buckets.size(0), ids.data_ptr<int64_t>(), ids.numel(),
                                   rows.data_ptr<int64_t>(), stream()),
        "id_map_insert");
}

at::Tensor id_map_erase_op(at::Tensor buckets, const at::Tensor& ids) {
  constexpr const char* op = "CUDA id_map_erase";
  const c10::cuda::CUDAGuard guard(buckets.device());
  check_buckets(op, buckets);
  check_int64_vector(op, "ids", ids);
  check_on(op, buckets, {&buckets, &ids});
  at::Tensor rows = at::empty_like(ids);
  check(recis::cuda::id_map_erase(buckets.data_ptr<int64_t>(), buckets.size(0), ids.data_ptr<int64_t>(), ids.numel(),
                                  rows.data_ptr<int64_t>(), stream()),
        "id_map_erase");
  return rows;
}

at::Tensor id_map_rehash_op(const at::Tensor& buckets, int64_t bucket_count) {
  constexpr const char* op = "CUDA id_map_rehash";
  const c10::cuda::CUDAGuard guard(buckets.device());
  check_buckets(op, buckets);
  check_on(op, buckets, {&buckets});
  TORCH_CHECK(bucket_count >= buckets.size(0) && (bucket_count & (bucket_count - 1)) == 0, op,
              ": bucket_count must be a power of two no smaller than the current one, got ", bucket_count);
  at::Tensor grown = at::empty({bucket_count, 2}, buckets.options());
  grown.select(1, 1).fill_(-1);
  check(recis::cuda::id_map_rehash(buckets.data_ptr<int64_t>(), buckets.size(0), grown.data_ptr<int64_t>(),
                                   bucket_count, stream()),
        "id_map_rehash");
  return grown;
}

}  // namespace

TORCH_LIBRARY_IMPL(recis, CUDA, m) {
  m.impl("sparse_adam_update", &sparse_adam_update_op);
  m.impl("coalesce_rows", &coalesce_rows_op);
  m.impl("id_map_find", &id_map_find_op);
  m.impl("id_map_insert", &id_map_insert_op);
  m.impl("id_map_erase", &id_map_erase_op);
  m.impl("id_map_rehash", &id_map_rehash_op);
}

}  // namespace recis::cuda
