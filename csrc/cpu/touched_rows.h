// The loop the fused row-update kernels share (Adam family, Adagrad family): every touched row
// of a table once, in parallel chunks, with its gradient in the compute type C: read from
// the pieces in place, summed over repeated rows, divided by the accumulation divisor.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <tuple>
#include <type_traits>
#include <vector>

#include "row_pieces.h"
#include "row_segments.h"
#include "vec_math.h"

namespace recis::cpu {

constexpr int64_t kPrefetchDistance = 8;       // rows ahead
constexpr int64_t kMaxPrefetchedRepeats = 16;  // gradient rows of one row

// A row of T seen in the compute type C: the row itself when T is C, else a widened
// copy (in `buffer`) that store() rounds back.
template <typename T, typename C>
struct WideRow {
  std::vector<C> buffer;
  explicit WideRow(int64_t width) : buffer(std::is_same_v<T, C> ? 0 : width) {}

  C* load(T* row, int64_t width) {
    if constexpr (std::is_same_v<T, C>) {
      return row;
    } else {
      widen(row, buffer.data(), width);
      return buffer.data();
    }
  }
  void store(T* row, int64_t width) const {
    if constexpr (!std::is_same_v<T, C>) narrow(buffer.data(), row, width);
  }
};

// The gradient of the u-th updated row: row u of the pieces, or with segments the sum of the
// rows order[offsets[u]] .. order[offsets[u + 1] - 1], in that order.
template <typename C>
class RowGradients {
 public:
  RowGradients(const RowPieces& pieces, const int64_t* offsets, const int64_t* order)
      : pieces_(pieces), offsets_(offsets), order_(order) {}

  // Grouped by row, the gradient rows of the u-th row lie anywhere in the pieces: fetch them
  // ahead, as the rows are (the first kMaxPrefetchedRepeats of a row repeated more often, so that
  // a very hot row does not flush the cache). Without groups they are read in order, which the
  // hardware follows.
  void prefetch(int64_t u) const {
    if (offsets_ == nullptr) return;
    const int64_t end = std::min(offsets_[u + 1], offsets_[u] + kMaxPrefetchedRepeats);
    for (int64_t k = offsets_[u]; k < end; ++k) {
      prefetch_row<Access::kRead>(pieces_.row(order_[k]), pieces_.row_bytes());
    }
  }

  const C* of(int64_t u, C* sum) const {
    if (offsets_ == nullptr) return pieces_.row_as<C>(u);
    if (offsets_[u + 1] - offsets_[u] == 1) return pieces_.row_as<C>(order_[offsets_[u]]);  // no copy
    sum_rows(pieces_, order_, offsets_[u], offsets_[u + 1], sum);
    return sum;
  }

 private:
  const RowPieces& pieces_;
  const int64_t* offsets_;
  const int64_t* order_;
};

// The rows to update: the given ones (distinct), or with sum_repeated_rows the distinct ones,
// ascending, with the segments of their gradient rows (row_segments.h). Checks, before anything
// is written, that every row lies in a table of table_rows rows.
struct TouchedRows {
  at::Tensor rows, offsets, order;

  TouchedRows(const at::Tensor& given, bool sum_repeated_rows, int64_t table_rows) : rows(given) {
    if (given.numel() > 0) {
      const auto [low, high] = at::aminmax(given);
      const int64_t first = low.item<int64_t>(), last = high.item<int64_t>();
      TORCH_CHECK_INDEX(first >= 0 && last < table_rows, "rows out of range [0, ", table_rows, "): ", first, " .. ",
                        last);
    }
    if (sum_repeated_rows) std::tie(rows, offsets, order) = row_segments(given);
  }

  template <typename C>
  RowGradients<C> gradients(const RowPieces& pieces) const {
    if (!offsets.defined()) return RowGradients<C>(pieces, nullptr, nullptr);
    return RowGradients<C>(pieces, offsets.data_ptr<int64_t>(), order.data_ptr<int64_t>());
  }
};

// For u in [0, count): updater(u, rows[u], g) with g the u-th row's gradient divided by
// grad_divisor (in C, as torch divides), after prefetching the row and the gradient rows
// kPrefetchDistance rows ahead.
// make_updater() is called once per parallel chunk: each chunk has its own buffers.
template <typename C, typename MakeUpdater>
void for_each_touched_row(const int64_t* rows, int64_t count, const RowGradients<C>& grads, C grad_divisor,
                          int64_t dim, MakeUpdater&& make_updater) {
  const int64_t grain = std::max<int64_t>(1, 4096 / std::max<int64_t>(dim, 1));
  at::parallel_for(0, count, grain, [&](int64_t begin, int64_t end) {
    auto updater = make_updater();
    std::vector<C> quotient(grad_divisor == C(1) ? 0 : dim), sum(dim);
    for (int64_t u = begin; u < end; ++u) {
      if (u + kPrefetchDistance < end) {
        updater.prefetch(rows[u + kPrefetchDistance]);
        grads.prefetch(u + kPrefetchDistance);
      }
      const C* g = grads.of(u, sum.data());
      if (!quotient.empty()) {
        for (int64_t j = 0; j < dim; ++j) quotient[j] = g[j] / grad_divisor;
        g = quotient.data();
      }
      updater(u, rows[u], g);
    }
  });
}

}  // namespace recis::cpu
