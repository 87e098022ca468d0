// The id map on CUDA (layout: common/id_map_layout.h), one thread per id or bucket.
//
// Insertion takes absent, pairwise distinct ids (the caller's promise), as a rehash
// takes the live keys of the old buckets: each thread claims the first empty bucket of
// its probe sequence with a CAS of the bucket's row from -1, then writes the key.
// Distinct keys never compare against a key being written, so that is the whole
// protocol. Erasure turns a present id's bucket into a tombstone (row -2); erased ids
// are distinct, so no two threads write one bucket.
#include "../common/id_map_layout.h"
#include "launchers.h"

namespace recis::cuda {
namespace {

constexpr int kThreads = 256;

unsigned blocks_for(int64_t n) { return static_cast<unsigned>((n + kThreads - 1) / kThreads); }

__device__ __forceinline__ unsigned long long* as_ull(int64_t* p) { return reinterpret_cast<unsigned long long*>(p); }

// The bucket holding id, or the empty bucket where its probe sequence ends.
__device__ __forceinline__ int64_t bucket_of(const int64_t* buckets, int64_t bucket_count, int64_t id) {
  int64_t b = home_bucket(id, bucket_count);
  while (buckets[2 * b + 1] != kEmptyRow && (buckets[2 * b + 1] == kErasedRow || buckets[2 * b] != id)) {
    b = (b + 1) & (bucket_count - 1);
  }
  return b;
}

__global__ void find_kernel(const int64_t* buckets, int64_t bucket_count, const int64_t* ids, int64_t n,
                            int64_t* rows) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  rows[i] = buckets[2 * bucket_of(buckets, bucket_count, ids[i]) + 1];
}

__global__ void erase_kernel(int64_t* buckets, int64_t bucket_count, const int64_t* ids, int64_t n, int64_t* rows) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const int64_t b = bucket_of(buckets, bucket_count, ids[i]);
  rows[i] = buckets[2 * b + 1];
  if (rows[i] != kEmptyRow) buckets[2 * b + 1] = kErasedRow;
}

// Put key with row into the first empty bucket of its probe sequence.
__device__ __forceinline__ void place(int64_t* buckets, int64_t bucket_count, int64_t key, int64_t row) {
  int64_t b = home_bucket(key, bucket_count);
  while (atomicCAS(as_ull(buckets + 2 * b + 1), static_cast<unsigned long long>(kEmptyRow),
                   static_cast<unsigned long long>(row)) != static_cast<unsigned long long>(kEmptyRow)) {
    b = (b + 1) & (bucket_count - 1);
  }
  buckets[2 * b] = key;
}

__global__ void insert_kernel(int64_t* buckets, int64_t bucket_count, const int64_t* ids, int64_t n,
                              const int64_t* rows) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n) place(buckets, bucket_count, ids[i], rows[i]);
}

__global__ void rehash_kernel(const int64_t* buckets, int64_t bucket_count, int64_t* grown, int64_t grown_count) {
  const int64_t b = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (b < bucket_count && buckets[2 * b + 1] >= 0) place(grown, grown_count, buckets[2 * b], buckets[2 * b + 1]);
}

}  // namespace

cudaError_t id_map_find(const int64_t* buckets, int64_t bucket_count, const int64_t* ids, int64_t n, int64_t* rows,
                        cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  find_kernel<<<blocks_for(n), kThreads, 0, stream>>>(buckets, bucket_count, ids, n, rows);
  return cudaGetLastError();
}

cudaError_t id_map_insert(int64_t* buckets, int64_t bucket_count, const int64_t* ids, int64_t n, const int64_t* rows,
                          cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  insert_kernel<<<blocks_for(n), kThreads, 0, stream>>>(buckets, bucket_count, ids, n, rows);
  return cudaGetLastError();
}

cudaError_t id_map_erase(int64_t* buckets, int64_t bucket_count, const int64_t* ids, int64_t n, int64_t* rows,
                         cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  erase_kernel<<<blocks_for(n), kThreads, 0, stream>>>(buckets, bucket_count, ids, n, rows);
  return cudaGetLastError();
}

cudaError_t id_map_rehash(const int64_t* buckets, int64_t bucket_count, int64_t* grown, int64_t grown_count,
                          cudaStream_t stream) {
  rehash_kernel<<<blocks_for(bucket_count), kThreads, 0, stream>>>(buckets, bucket_count, grown, grown_count);
  return cudaGetLastError();
}

}  // namespace recis::cuda
