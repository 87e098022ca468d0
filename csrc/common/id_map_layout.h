// Layout of the open-addressing id map shared by the CPU and CUDA kernels.
//
// The map is an int64 tensor of shape (bucket_count, 2): bucket b holds (key, row);
// row == -1 marks an empty bucket and row == -2 an erased one (a tombstone: probes go
// on past it), so every int64 value, -1 and the extremes included, is a valid key.
// bucket_count is a power of two; an id's probe sequence is linear from its home bucket
// mix64(id) & (bucket_count - 1), where mix64 is the splitmix64 finalizer (the same as
// recis/ops/hashing.py). Insertion takes only empty buckets; a rehash drops tombstones.
// The caller chooses the rows and keeps live + erased buckets <= bucket_count / 2.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define RECIS_ID_MAP_FN __host__ __device__ __forceinline__
#else
#define RECIS_ID_MAP_FN inline
#endif

namespace recis {

constexpr int64_t kEmptyRow = -1;
constexpr int64_t kErasedRow = -2;

RECIS_ID_MAP_FN uint64_t mix64(uint64_t x) {
  x ^= x >> 30;
  x *= 0xBF58476D1CE4E5B9ULL;
  x ^= x >> 27;
  x *= 0x94D049BB133111EBULL;
  x ^= x >> 31;
  return x;
}

RECIS_ID_MAP_FN int64_t home_bucket(int64_t id, int64_t bucket_count) {
  return static_cast<int64_t>(mix64(static_cast<uint64_t>(id)) & static_cast<uint64_t>(bucket_count - 1));
}

}  // namespace recis
