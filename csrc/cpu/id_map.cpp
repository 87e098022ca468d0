// The id map on CPU: find (parallel), insertion of absent, distinct ids with the rows
// first_row, first_row + 1, ... in order, and rehash into a larger bucket array.
// Layout: common/id_map_layout.h. The caller keeps the load factor <= 1/2.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../common/id_map_layout.h"
#include "vec_math.h"

namespace recis::cpu {
namespace {

constexpr int64_t kPrefetchDistance = 16;  // ids ahead

struct Buckets {
  int64_t* slots;  // (key, row) pairs
  int64_t count;

  int64_t key(int64_t b) const { return slots[2 * b]; }
  int64_t row(int64_t b) const { return slots[2 * b + 1]; }
  int64_t next(int64_t b) const { return (b + 1) & (count - 1); }
  void prefetch(int64_t id) const { prefetch_write(slots + 2 * home_bucket(id, count)); }

  // The bucket holding id, or the empty bucket where its probe sequence ends.
  int64_t probe(int64_t id) const {
    int64_t b = home_bucket(id, count);
    while (row(b) != kEmptyRow && key(b) != id) b = next(b);
    return b;
  }
};

Buckets buckets_of(const at::Tensor& table) {
  TORCH_CHECK(table.scalar_type() == at::kLong && table.dim() == 2 && table.size(1) == 2 && table.is_contiguous(),
              "id map buckets must be a contiguous int64 tensor of shape (bucket_count, 2)");
  const int64_t count = table.size(0);
  TORCH_CHECK(count > 0 && (count & (count - 1)) == 0, "bucket_count must be a power of two");
  return {table.data_ptr<int64_t>(), count};
}

void check_ids(const at::Tensor& ids) {
  TORCH_CHECK(ids.scalar_type() == at::kLong && ids.dim() == 1 && ids.is_contiguous(), "ids: contiguous 1-D int64");
}

at::Tensor find(const at::Tensor& table, const at::Tensor& ids) {
  check_ids(ids);
  const Buckets buckets = buckets_of(table);
  at::Tensor rows = at::empty_like(ids);
  const int64_t* id = ids.data_ptr<int64_t>();
  int64_t* out = rows.data_ptr<int64_t>();
  at::parallel_for(0, ids.numel(), 2048, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      if (i + kPrefetchDistance < end) buckets.prefetch(id[i + kPrefetchDistance]);
      out[i] = buckets.row(buckets.probe(id[i]));  // an empty bucket's row is -1
    }
  });
  return rows;
}

// Place ids[i], absent and pairwise distinct (the caller's promise), with row
// first_row + i, each in the first empty bucket of its probe sequence.
void insert(at::Tensor table, const at::Tensor& ids, int64_t first_row) {
  check_ids(ids);
  const Buckets buckets = buckets_of(table);
  TORCH_CHECK(2 * (first_row + ids.numel()) <= buckets.count, "id map would exceed load 1/2");
  const int64_t* id = ids.data_ptr<int64_t>();
  for (int64_t i = 0; i < ids.numel(); ++i) {
    if (i + kPrefetchDistance < ids.numel()) buckets.prefetch(id[i + kPrefetchDistance]);
    const int64_t b = buckets.probe(id[i]);
    buckets.slots[2 * b] = id[i];
    buckets.slots[2 * b + 1] = first_row + i;
  }
}

// The same keys and rows in a fresh array of bucket_count buckets.
at::Tensor rehash(const at::Tensor& table, int64_t bucket_count) {
  const Buckets old = buckets_of(table);
  at::Tensor grown = at::empty({bucket_count, 2}, table.options());
  grown.select(1, 1).fill_(kEmptyRow);
  const Buckets fresh = buckets_of(grown);
  for (int64_t b = 0; b < old.count; ++b) {
    if (old.row(b) == kEmptyRow) continue;
    int64_t to = home_bucket(old.key(b), bucket_count);
    while (fresh.row(to) != kEmptyRow) to = fresh.next(to);
    fresh.slots[2 * to] = old.key(b);
    fresh.slots[2 * to + 1] = old.row(b);
  }
  return grown;
}

}  // namespace

TORCH_LIBRARY_IMPL(recis, CPU, m) {
  m.impl("id_map_find", &find);
  m.impl("id_map_insert", &insert);
  m.impl("id_map_rehash", &rehash);
}

}  // namespace recis::cpu
