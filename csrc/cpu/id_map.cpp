// The id map on CPU: find (parallel), insertion of the missing ids of a batch (in batch
// order, so rows are numbered by first appearance; an id repeated in the batch gets the
// row of its first occurrence; the keys of new rows also go to the map's row_keys), and
// rehash into a larger bucket array.
// Layout: common/id_map_layout.h. The caller keeps the load factor <= 1/2.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

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

// Give every id whose row is -1 a row: its existing one if an earlier id of this batch
// inserted it, else the next new row, whose key goes to row_keys[row]. Returns is_new
// (first occurrences) and the new size.
std::tuple<at::Tensor, int64_t> insert_missing(at::Tensor table, const at::Tensor& ids, at::Tensor rows,
                                               at::Tensor row_keys, int64_t size) {
  check_ids(ids);
  TORCH_CHECK(rows.scalar_type() == at::kLong && rows.is_contiguous() && rows.numel() == ids.numel(), "bad rows");
  TORCH_CHECK(row_keys.scalar_type() == at::kLong && row_keys.dim() == 1 && row_keys.is_contiguous(),
              "row_keys: contiguous 1-D int64");
  int64_t* keys = row_keys.data_ptr<int64_t>();
  const Buckets buckets = buckets_of(table);
  const int64_t* id = ids.data_ptr<int64_t>();
  int64_t* row = rows.data_ptr<int64_t>();
  at::Tensor is_new = at::zeros({ids.numel()}, ids.options().dtype(at::kBool));
  bool* fresh = is_new.data_ptr<bool>();
  std::vector<int64_t> missing;
  for (int64_t i = 0; i < ids.numel(); ++i) {
    if (row[i] == kEmptyRow) missing.push_back(i);
  }
  TORCH_CHECK(2 * (size + static_cast<int64_t>(missing.size())) <= buckets.count, "id map would exceed load 1/2");
  TORCH_CHECK(size + static_cast<int64_t>(missing.size()) <= row_keys.numel(), "row_keys too short for the new rows");
  for (size_t k = 0; k < missing.size(); ++k) {
    if (k + kPrefetchDistance < missing.size()) buckets.prefetch(id[missing[k + kPrefetchDistance]]);
    const int64_t i = missing[k];
    const int64_t b = buckets.probe(id[i]);
    if (buckets.row(b) == kEmptyRow) {
      buckets.slots[2 * b] = id[i];
      buckets.slots[2 * b + 1] = size;
      keys[size++] = id[i];
      fresh[i] = true;
    }
    row[i] = buckets.row(b);
  }
  return {is_new, size};
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
  m.impl("id_map_insert_missing", &insert_missing);
  m.impl("id_map_rehash", &rehash);
}

}  // namespace recis::cpu
