// Coalescing of row gradients on CUDA: a stable radix sort of (row, position) pairs
// (cub), segment heads and a scan give the distinct rows and their segments; one warp
// per distinct row then sums its gradients in input order (the order of torch's
// index_add_), so sums are deterministic.
#include <cub/cub.cuh>

#include "launchers.h"

namespace recis::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarp = 32;

unsigned blocks_for(int64_t n) { return static_cast<unsigned>((n + kThreads - 1) / kThreads); }

__global__ void iota(int64_t* out, int64_t n) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n) out[i] = i;
}

__global__ void mark_heads(const int64_t* sorted, int64_t n, int64_t* heads) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n) heads[i] = (i == 0 || sorted[i] != sorted[i - 1]) ? 1 : 0;
}

// heads_scan is the exclusive scan of heads; segment k starts at the k-th head.
__global__ void write_segments(const int64_t* sorted, const int64_t* heads, const int64_t* heads_scan, int64_t n,
                               int64_t* offsets, int64_t* unique_rows, int64_t* unique_count) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  if (heads[i]) {
    offsets[heads_scan[i]] = i;
    unique_rows[heads_scan[i]] = sorted[i];
  }
  if (i == n - 1) {
    const int64_t unique = heads_scan[i] + heads[i];
    offsets[unique] = n;
    *unique_count = unique;
  }
}

__global__ void sum_segments(const float* grads, int64_t dim, const int64_t* order, const int64_t* offsets,
                             int64_t unique, float* summed) {
  const int64_t u = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (u >= unique) return;
  for (int64_t j = lane; j < dim; j += kWarp) {
    float sum = grads[order[offsets[u]] * dim + j];
    for (int64_t k = offsets[u] + 1; k < offsets[u + 1]; ++k) sum += grads[order[k] * dim + j];
    summed[u * dim + j] = sum;
  }
}

// Workspace layout: positions | heads | heads_scan | cub temp storage.
struct Workspace {
  int64_t *positions, *heads, *heads_scan;
  void* cub_temp;
  std::size_t cub_bytes;
};

std::size_t cub_bytes(int64_t n) {
  std::size_t sort_bytes = 0, scan_bytes = 0;
  cub::DeviceRadixSort::SortPairs(nullptr, sort_bytes, static_cast<const int64_t*>(nullptr),
                                  static_cast<int64_t*>(nullptr), static_cast<const int64_t*>(nullptr),
                                  static_cast<int64_t*>(nullptr), n);
  cub::DeviceScan::ExclusiveSum(nullptr, scan_bytes, static_cast<const int64_t*>(nullptr),
                                static_cast<int64_t*>(nullptr), n);
  return sort_bytes > scan_bytes ? sort_bytes : scan_bytes;
}

Workspace split(void* workspace, int64_t n) {
  auto* base = static_cast<int64_t*>(workspace);
  return {base, base + n, base + 2 * n, base + 3 * n, cub_bytes(n)};
}

}  // namespace

std::size_t coalesce_workspace_bytes(int64_t n) { return 3 * n * sizeof(int64_t) + cub_bytes(n); }

cudaError_t coalesce_group(const int64_t* rows, int64_t n, int64_t* sorted_rows, int64_t* order, int64_t* offsets,
                           int64_t* unique_rows, int64_t* unique_count, void* workspace, std::size_t workspace_bytes,
                           cudaStream_t stream) {
  if (n == 0) {
    const cudaError_t status = cudaMemsetAsync(unique_count, 0, sizeof(int64_t), stream);
    return status != cudaSuccess ? status : cudaMemsetAsync(offsets, 0, sizeof(int64_t), stream);
  }
  if (workspace_bytes < coalesce_workspace_bytes(n)) return cudaErrorInvalidValue;
  Workspace w = split(workspace, n);
  iota<<<blocks_for(n), kThreads, 0, stream>>>(w.positions, n);
  cudaError_t status = cub::DeviceRadixSort::SortPairs(w.cub_temp, w.cub_bytes, rows, sorted_rows, w.positions, order,
                                                       n, 0, 64, stream);
  if (status != cudaSuccess) return status;
  mark_heads<<<blocks_for(n), kThreads, 0, stream>>>(sorted_rows, n, w.heads);
  status = cub::DeviceScan::ExclusiveSum(w.cub_temp, w.cub_bytes, w.heads, w.heads_scan, n, stream);
  if (status != cudaSuccess) return status;
  write_segments<<<blocks_for(n), kThreads, 0, stream>>>(sorted_rows, w.heads, w.heads_scan, n, offsets, unique_rows,
                                                         unique_count);
  return cudaGetLastError();
}

cudaError_t coalesce_sum(const float* grads, int64_t dim, const int64_t* order, const int64_t* offsets,
                         int64_t unique, int64_t n, float* summed, cudaStream_t stream) {
  if (unique == 0 || n == 0) return cudaSuccess;
  sum_segments<<<blocks_for(unique * kWarp), kThreads, 0, stream>>>(grads, dim, order, offsets, unique, summed);
  return cudaGetLastError();
}

}  // namespace recis::cuda
