// Host launchers of the CUDA kernels. They take raw device pointers and a stream and
// include only CUDA's own headers, so the .cu files compile with nvcc alone; the torch
// binding (binding.cpp) allocates tensors and passes their pointers and the current
// stream. Every launcher is asynchronous on `stream` and returns the launch status.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "../common/adam_rule.h"

namespace recis::cuda {

enum class RowType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

// Fused Adam-family update of `count` distinct rows (common/adam_rule.h) of a table of
// `table_rows` rows: float32 slots, rows of `row_type`, grad (count, dim) float32; row_steps
// null in table mode. A row outside the table stops the kernel with a device-side assertion.
cudaError_t sparse_adam_update(void* weight, RowType row_type, float* exp_avg, float* exp_avg_sq, const int64_t* rows,
                               int64_t count, int64_t table_rows, const float* grad, int64_t dim,
                               int64_t* row_steps, const AdamHyper& hyper, cudaStream_t stream);

// Coalescing, in two launches around one read of the unique count by the caller:
// coalesce_group sorts (stable radix) and finds the segments; the number of distinct rows
// lands in *unique_count (device). coalesce_sum then writes unique_rows and the sums.
std::size_t coalesce_workspace_bytes(int64_t n);
cudaError_t coalesce_group(const int64_t* rows, int64_t n, int64_t* sorted_rows, int64_t* order, int64_t* offsets,
                           int64_t* unique_rows, int64_t* unique_count, void* workspace, std::size_t workspace_bytes,
                           cudaStream_t stream);
cudaError_t coalesce_sum(const float* grads, int64_t dim, const int64_t* order, const int64_t* offsets,
                         int64_t unique, int64_t n, float* summed, cudaStream_t stream);

// Id map (common/id_map_layout.h): buckets is (bucket_count, 2) int64 of (key, row).
cudaError_t id_map_find(const int64_t* buckets, int64_t bucket_count, const int64_t* ids, int64_t n, int64_t* rows,
                        cudaStream_t stream);
// Place ids[i] (absent from the map and pairwise distinct) with row first_row + i. The
// caller keeps the map at most half full after the insert.
cudaError_t id_map_insert(int64_t* buckets, int64_t bucket_count, const int64_t* ids, int64_t n, const int64_t* rows,
                          cudaStream_t stream);
cudaError_t id_map_erase(int64_t* buckets, int64_t bucket_count, const int64_t* ids, int64_t n, int64_t* rows,
                         cudaStream_t stream);
cudaError_t id_map_rehash(const int64_t* buckets, int64_t bucket_count, int64_t* grown, int64_t grown_count,
                          cudaStream_t stream);

}  // namespace recis::cuda
