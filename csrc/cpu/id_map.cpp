// The id map on CPU: find (parallel), insertion of absent, distinct ids with the rows
// the caller chose, erasure (a tombstone per erased id), rehash into a fresh bucket
// array without the tombstones, and the same in place when the bucket count stays.
// Layout: common/id_map_layout.h. The caller keeps live plus erased buckets <= 1/2 of
// the buckets.
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
    while (row(b) != kEmptyRow && (row(b) == kErasedRow || key(b) != id)) b = next(b);
    return b;
  }

  // The first empty bucket of id's probe sequence (for ids known to be absent).
  int64_t first_empty(int64_t id) const {
    int64_t b = home_bucket(id, count);
    while (row(b) != kEmptyRow) b = next(b);
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

// Place ids[i], absent and pairwise distinct (the caller's promise), with row rows[i],
// each in the first empty bucket of its probe sequence.
void insert(at::Tensor table, const at::Tensor& ids, const at::Tensor& rows) {
  check_ids(ids);
  check_ids(rows);
  TORCH_CHECK(rows.numel() == ids.numel(), "id_map_insert: ", ids.numel(), " ids but ", rows.numel(), " rows");
  const Buckets buckets = buckets_of(table);
  const int64_t* id = ids.data_ptr<int64_t>();
  const int64_t* row = rows.data_ptr<int64_t>();
  for (int64_t i = 0; i < ids.numel(); ++i) {
    if (i + kPrefetchDistance < ids.numel()) buckets.prefetch(id[i + kPrefetchDistance]);
    const int64_t b = buckets.first_empty(id[i]);
    buckets.slots[2 * b] = id[i];
    buckets.slots[2 * b + 1] = row[i];
  }
}

// Erase distinct ids: each present one's bucket becomes a tombstone. Returns the row
// each id had, -1 where it was absent.
at::Tensor erase(at::Tensor table, const at::Tensor& ids) {
  check_ids(ids);
  const Buckets buckets = buckets_of(table);
  at::Tensor rows = at::empty_like(ids);
  const int64_t* id = ids.data_ptr<int64_t>();
  int64_t* out = rows.data_ptr<int64_t>();
  for (int64_t i = 0; i < ids.numel(); ++i) {
    const int64_t b = buckets.probe(id[i]);
    out[i] = buckets.row(b);
    if (out[i] != kEmptyRow) buckets.slots[2 * b + 1] = kErasedRow;
  }
  return rows;
}

// The live keys and rows in a fresh array of bucket_count buckets (tombstones dropped).
at::Tensor rehash(const at::Tensor& table, int64_t bucket_count) {
  const Buckets old = buckets_of(table);
  at::Tensor grown = at::empty({bucket_count, 2}, table.options());
  grown.select(1, 1).fill_(kEmptyRow);
  const Buckets fresh = buckets_of(grown);
  for (int64_t b = 0; b < old.count; ++b) {
    if (old.row(b) < 0) continue;
    const int64_t to = fresh.first_empty(old.key(b));
    fresh.slots[2 * to] = old.key(b);
    fresh.slots[2 * to + 1] = old.row(b);
  }
  return grown;
}

// Drop the tombstones in place, keeping the bucket count: no second bucket array (a
// bounded table erases and inserts every step, so it cleans up often). Tombstones become
// empty; then, from a bucket that was empty before (no probe sequence crosses it), each
// live entry in turn leaves its bucket for the first empty bucket from its home. That
// bucket lies between its home and where it was, and the entries still to come lie after
// it, so every probe sequence stays unbroken: the same lookups, fewer buckets probed.
void drop_tombstones(at::Tensor table) {
  const Buckets buckets = buckets_of(table);
  int64_t start = -1;
  for (int64_t b = 0; b < buckets.count; ++b) {
    if (start < 0 && buckets.row(b) == kEmptyRow) start = b;
    if (buckets.row(b) == kErasedRow) buckets.slots[2 * b + 1] = kEmptyRow;
  }
  TORCH_CHECK(start >= 0, "id_map_drop_tombstones: no empty bucket (the map is over its load limit)");
  for (int64_t step = 1; step < buckets.count; ++step) {
    const int64_t b = (start + step) & (buckets.count - 1);
    const int64_t key = buckets.key(b), row = buckets.row(b);
    if (row < 0 || home_bucket(key, buckets.count) == b) continue;
    buckets.slots[2 * b + 1] = kEmptyRow;
    const int64_t to = buckets.first_empty(key);
    buckets.slots[2 * to] = key;
    buckets.slots[2 * to + 1] = row;
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(recis, CPU, m) {
  m.impl("id_map_find", &find);
  m.impl("id_map_insert", &insert);
  m.impl("id_map_erase", &erase);
  m.impl("id_map_rehash", &rehash);
  m.impl("id_map_drop_tombstones", &drop_tombstones);
}

}  // namespace recis::cpu
