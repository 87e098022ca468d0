// The id map on CUDA (layout: common/id_map_layout.h), one thread per id or bucket.
//
// insert_missing numbers new rows by first appearance in the batch, like the CPU map,
// although threads race for buckets:
//  1. claim: each missing id probes; an empty bucket is taken with a CAS of its row from
//     -1 to kClaiming, the key is written, then the row is set to -(3 + i) ("pending,
//     claimed by position i"). A thread meeting its own key pending lowers the claim to
//     the smallest position with atomicMax on -(3 + i). It remembers the bucket.
//  2. the position that holds its bucket's claim is a first occurrence; an exclusive scan
//     of those flags gives it row size + rank;
//  3. first occurrences write their row into the bucket; 4. every missing id reads it.
#include <cub/cub.cuh>

#include "../common/id_map_layout.h"
#include "launchers.h"

namespace recis::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kClaiming = -2;

unsigned blocks_for(int64_t n) { return static_cast<unsigned>((n + kThreads - 1) / kThreads); }

__device__ __forceinline__ int64_t pending_mark(int64_t position) { return -3 - position; }

__device__ __forceinline__ unsigned long long* as_ull(int64_t* p) { return reinterpret_cast<unsigned long long*>(p); }

__device__ __forceinline__ int64_t load_row(int64_t* buckets, int64_t b) {
  return *reinterpret_cast<volatile int64_t*>(buckets + 2 * b + 1);
}

__global__ void find_kernel(const int64_t* buckets, int64_t bucket_count, const int64_t* ids, int64_t n,
                            int64_t* rows) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const int64_t id = ids[i];
  int64_t b = home_bucket(id, bucket_count);
  while (buckets[2 * b + 1] != kEmptyRow && buckets[2 * b] != id) b = (b + 1) & (bucket_count - 1);
  rows[i] = buckets[2 * b + 1];
}

__global__ void claim_kernel(int64_t* buckets, int64_t bucket_count, const int64_t* ids, int64_t n,
                             const int64_t* rows, int64_t* slot_of) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n || rows[i] != kEmptyRow) return;
  const int64_t id = ids[i];
  int64_t b = home_bucket(id, bucket_count);
  while (true) {
    int64_t row = load_row(buckets, b);
    if (row == kEmptyRow) {
      const auto seen = static_cast<int64_t>(atomicCAS(as_ull(buckets + 2 * b + 1), static_cast<unsigned long long>(kEmptyRow),
                                                       static_cast<unsigned long long>(kClaiming)));
      if (seen == kEmptyRow) {
        buckets[2 * b] = id;
        __threadfence();  // the key is visible before the bucket stops reading kClaiming
        atomicExch(as_ull(buckets + 2 * b + 1), static_cast<unsigned long long>(pending_mark(i)));
        slot_of[i] = b;
        return;
      }
      row = seen;
    }
    while (row == kClaiming) row = load_row(buckets, b);  // the key is being published
    __threadfence();
    if (*reinterpret_cast<volatile int64_t*>(buckets + 2 * b) == id) {
      atomicMax(reinterpret_cast<long long*>(buckets + 2 * b + 1), static_cast<long long>(pending_mark(i)));
      slot_of[i] = b;
      return;
    }
    b = (b + 1) & (bucket_count - 1);
  }
}

__global__ void first_flags(const int64_t* buckets, const int64_t* rows, const int64_t* slot_of, int64_t n,
                            int64_t* first) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n) first[i] = (rows[i] == kEmptyRow && buckets[2 * slot_of[i] + 1] == pending_mark(i)) ? 1 : 0;
}

__global__ void publish_rows(int64_t* buckets, const int64_t* ids, const int64_t* first, const int64_t* rank,
                             const int64_t* slot_of, int64_t n, int64_t size, bool* is_new, int64_t* row_keys,
                             int64_t* new_size) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  is_new[i] = first[i] != 0;
  if (first[i]) {
    buckets[2 * slot_of[i] + 1] = size + rank[i];
    row_keys[size + rank[i]] = ids[i];
  }
  if (i == n - 1) *new_size = size + rank[i] + first[i];
}

__global__ void read_rows(const int64_t* buckets, const int64_t* slot_of, int64_t n, int64_t* rows) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n && rows[i] == kEmptyRow) rows[i] = buckets[2 * slot_of[i] + 1];
}

__global__ void rehash_kernel(const int64_t* buckets, int64_t bucket_count, int64_t* grown, int64_t grown_count) {
  const int64_t b = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (b >= bucket_count || buckets[2 * b + 1] == kEmptyRow) return;
  const int64_t key = buckets[2 * b], row = buckets[2 * b + 1];
  int64_t to = home_bucket(key, grown_count);
  while (atomicCAS(as_ull(grown + 2 * to + 1), static_cast<unsigned long long>(kEmptyRow),
                   static_cast<unsigned long long>(row)) != static_cast<unsigned long long>(kEmptyRow)) {
    to = (to + 1) & (grown_count - 1);
  }
  grown[2 * to] = key;
}

std::size_t scan_bytes(int64_t n) {
  std::size_t bytes = 0;
  cub::DeviceScan::ExclusiveSum(nullptr, bytes, static_cast<const int64_t*>(nullptr), static_cast<int64_t*>(nullptr),
                                n);
  return bytes;
}

}  // namespace

cudaError_t id_map_find(const int64_t* buckets, int64_t bucket_count, const int64_t* ids, int64_t n, int64_t* rows,
                        cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  find_kernel<<<blocks_for(n), kThreads, 0, stream>>>(buckets, bucket_count, ids, n, rows);
  return cudaGetLastError();
}

// Workspace: slot_of | first | rank | cub temp storage.
std::size_t id_map_insert_workspace_bytes(int64_t n) { return 3 * n * sizeof(int64_t) + scan_bytes(n); }

cudaError_t id_map_insert_missing(int64_t* buckets, int64_t bucket_count, const int64_t* ids, int64_t n,
                                  int64_t* rows, bool* is_new, int64_t* row_keys, int64_t size, int64_t* new_size,
                                  void* workspace, std::size_t workspace_bytes, cudaStream_t stream) {
  if (n == 0) return cudaMemcpyAsync(new_size, &size, sizeof(int64_t), cudaMemcpyHostToDevice, stream);
  if (workspace_bytes < id_map_insert_workspace_bytes(n)) return cudaErrorInvalidValue;
  auto* slot_of = static_cast<int64_t*>(workspace);
  int64_t* first = slot_of + n;
  int64_t* rank = first + n;
  std::size_t temp_bytes = scan_bytes(n);
  claim_kernel<<<blocks_for(n), kThreads, 0, stream>>>(buckets, bucket_count, ids, n, rows, slot_of);
  first_flags<<<blocks_for(n), kThreads, 0, stream>>>(buckets, rows, slot_of, n, first);
  cudaError_t status = cub::DeviceScan::ExclusiveSum(rank + n, temp_bytes, first, rank, n, stream);
  if (status != cudaSuccess) return status;
  publish_rows<<<blocks_for(n), kThreads, 0, stream>>>(buckets, ids, first, rank, slot_of, n, size, is_new, row_keys,
                                                       new_size);
  read_rows<<<blocks_for(n), kThreads, 0, stream>>>(buckets, slot_of, n, rows);
  return cudaGetLastError();
}

cudaError_t id_map_rehash(const int64_t* buckets, int64_t bucket_count, int64_t* grown, int64_t grown_count,
                          cudaStream_t stream) {
  rehash_kernel<<<blocks_for(bucket_count), kThreads, 0, stream>>>(buckets, bucket_count, grown, grown_count);
  return cudaGetLastError();
}

}  // namespace recis::cuda
