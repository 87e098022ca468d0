// Radix grouping of row indices; see row_segments.h.
#include "row_segments.h"

#include <algorithm>
#include <array>
#include <cstdint>
#include <vector>

namespace recis::cpu {
namespace {

constexpr int kDigitBits = 11;
constexpr int64_t kBuckets = int64_t{1} << kDigitBits;

int significant_bits(uint64_t value) {
  int bits = 0;
  while (bits < 64 && (value >> bits) != 0) ++bits;
  return bits;
}

// One stable counting pass on digit `shift` from (keys, positions) into (keys_out, positions_out).
void radix_pass(const uint64_t* keys, const int64_t* positions, uint64_t* keys_out, int64_t* positions_out, int64_t n,
                int shift) {
  std::array<int64_t, kBuckets> start{};
  for (int64_t i = 0; i < n; ++i) ++start[(keys[i] >> shift) & (kBuckets - 1)];
  int64_t sum = 0;
  for (auto& count : start) {
    const int64_t c = count;
    count = sum;
    sum += c;
  }
  for (int64_t i = 0; i < n; ++i) {
    const int64_t to = start[(keys[i] >> shift) & (kBuckets - 1)]++;
    keys_out[to] = keys[i];
    positions_out[to] = positions[i];
  }
}

bool strictly_ascending(const int64_t* rows, int64_t n) {
  for (int64_t i = 1; i < n; ++i) {
    if (rows[i] <= rows[i - 1]) return false;
  }
  return true;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> row_segments(const at::Tensor& rows_in) {
  TORCH_CHECK(rows_in.scalar_type() == at::kLong && rows_in.dim() == 1, "rows must be a 1-D int64 tensor");
  const at::Tensor rows = rows_in.contiguous();
  const int64_t n = rows.numel();
  const int64_t* r = rows.data_ptr<int64_t>();
  const auto long_options = rows.options();
  if (strictly_ascending(r, n)) {  // already coalesced: every row its own segment
    return {rows, at::arange(n + 1, long_options), at::arange(n, long_options)};
  }
  const auto [low, high] = std::minmax_element(r, r + n);
  const uint64_t base = static_cast<uint64_t>(*low);
  const uint64_t span = static_cast<uint64_t>(*high) - base;  // keys are sorted as r - min, unsigned
  std::vector<uint64_t> keys(n), keys_tmp(n);
  for (int64_t i = 0; i < n; ++i) keys[i] = static_cast<uint64_t>(r[i]) - base;
  at::Tensor order = at::arange(n, long_options);
  at::Tensor order_tmp = at::empty({n}, long_options);
  int64_t* pos = order.data_ptr<int64_t>();
  int64_t* pos_tmp = order_tmp.data_ptr<int64_t>();
  uint64_t* k = keys.data();
  uint64_t* k_tmp = keys_tmp.data();
  for (int shift = 0; shift < significant_bits(span); shift += kDigitBits) {
    radix_pass(k, pos, k_tmp, pos_tmp, n, shift);
    std::swap(k, k_tmp);
    std::swap(pos, pos_tmp);
  }
  if (pos != order.data_ptr<int64_t>()) std::swap(order, order_tmp);

  int64_t unique = 0;
  for (int64_t i = 0; i < n; ++i) unique += (i == 0 || k[i] != k[i - 1]);
  at::Tensor unique_rows = at::empty({unique}, long_options);
  at::Tensor offsets = at::empty({unique + 1}, long_options);
  int64_t* ur = unique_rows.data_ptr<int64_t>();
  int64_t* off = offsets.data_ptr<int64_t>();
  int64_t u = 0;
  for (int64_t i = 0; i < n; ++i) {
    if (i == 0 || k[i] != k[i - 1]) {
      ur[u] = static_cast<int64_t>(k[i] + base);
      off[u++] = i;
    }
  }
  off[unique] = n;
  return {unique_rows, offsets, order};
}

}  // namespace recis::cpu
