// Hash partitioning on CPU: the owner rank of every id, and a lookup's distinct ids
// grouped by owner (what a sharded lookup sends), both in one pass without sorting.
//
// owner(id) = mix64(id) mod world_size, mix64 read as unsigned (recis/dist/partition.py).
// unique_by_owner(ids, W) -> (unique, inverse, counts): the distinct ids, grouped by
// owner rank 0..W-1 and in order of first appearance within a group; unique[inverse[i]]
// == ids[i]; counts[r] distinct ids belong to rank r. An open-addressing set keyed by
// the same mix64 finds each id's first occurrence in O(len(ids)).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

#include "../common/id_map_layout.h"

namespace recis::cpu {
namespace {

inline int64_t owner_of_hash(uint64_t hash, int64_t world_size) {
  return static_cast<int64_t>(hash % static_cast<uint64_t>(world_size));
}

void check_partition_args(const at::Tensor& ids, int64_t world_size) {
  TORCH_CHECK(ids.scalar_type() == at::kLong && ids.dim() == 1, "ids: 1-D int64");
  TORCH_CHECK(world_size >= 1, "world_size must be >= 1, got ", world_size);
}

at::Tensor owner_rank(const at::Tensor& ids_in, int64_t world_size) {
  check_partition_args(ids_in, world_size);
  const at::Tensor ids = ids_in.contiguous();
  at::Tensor owners = at::empty_like(ids);
  const int64_t* id = ids.data_ptr<int64_t>();
  int64_t* out = owners.data_ptr<int64_t>();
  at::parallel_for(0, ids.numel(), 16384, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) out[i] = owner_of_hash(mix64(static_cast<uint64_t>(id[i])), world_size);
  });
  return owners;
}

int64_t set_capacity(int64_t n) {
  int64_t capacity = 16;
  while (capacity < 2 * n) capacity *= 2;
  return capacity;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> unique_by_owner(const at::Tensor& ids_in, int64_t world_size) {
  check_partition_args(ids_in, world_size);
  const at::Tensor ids = ids_in.contiguous();
  const int64_t n = ids.numel();
  const int64_t* id = ids.data_ptr<int64_t>();
  const int64_t capacity = set_capacity(n);
  const uint64_t mask = static_cast<uint64_t>(capacity - 1);
  std::vector<int64_t> set_keys(capacity);
  std::vector<int64_t> set_index(capacity, -1);  // first-appearance index of the key, -1: empty
  std::vector<int64_t> first_ids, first_owners;  // by first-appearance index
  first_ids.reserve(n);
  first_owners.reserve(n);
  at::Tensor inverse = at::empty_like(ids);
  int64_t* inv = inverse.data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i) {
    const uint64_t hash = mix64(static_cast<uint64_t>(id[i]));
    uint64_t b = hash & mask;
    while (set_index[b] >= 0 && set_keys[b] != id[i]) b = (b + 1) & mask;
    if (set_index[b] < 0) {
      set_keys[b] = id[i];
      set_index[b] = static_cast<int64_t>(first_ids.size());
      first_ids.push_back(id[i]);
      first_owners.push_back(owner_of_hash(hash, world_size));
    }
    inv[i] = set_index[b];
  }
  const int64_t distinct = static_cast<int64_t>(first_ids.size());
  at::Tensor counts = at::zeros({world_size}, ids.options());
  int64_t* count = counts.data_ptr<int64_t>();
  for (int64_t u = 0; u < distinct; ++u) ++count[first_owners[u]];
  std::vector<int64_t> next(world_size, 0);  // where the next id of each rank goes
  for (int64_t r = 1; r < world_size; ++r) next[r] = next[r - 1] + count[r - 1];
  std::vector<int64_t> position(distinct);
  at::Tensor unique = at::empty({distinct}, ids.options());
  int64_t* grouped = unique.data_ptr<int64_t>();
  for (int64_t u = 0; u < distinct; ++u) {
    position[u] = next[first_owners[u]]++;
    grouped[position[u]] = first_ids[u];
  }
  for (int64_t i = 0; i < n; ++i) inv[i] = position[inv[i]];
  return {unique, inverse, counts};
}

}  // namespace

TORCH_LIBRARY_IMPL(recis, CPU, m) {
  m.impl("owner_rank", &owner_rank);
  m.impl("unique_by_owner", &unique_by_owner);
}

}  // namespace recis::cpu
