// Rows of several 2-D pieces (one dtype, one width) read as the rows of their
// concatenation, without making it: what an exchange received from each rank, say.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace recis::cpu {

class RowPieces {
 public:
  // Checks that the pieces are 2-D with one width and dtype (at least one piece).
  RowPieces(at::TensorList pieces, const char* op) {
    TORCH_CHECK(!pieces.empty(), op, ": needs at least one piece");
    const at::Tensor& first = pieces[0];
    TORCH_CHECK(first.dim() == 2, op, ": pieces must be 2-D, got ", first.dim(), "-D");
    starts_.push_back(0);
    for (const at::Tensor& piece : pieces) {
      TORCH_CHECK(piece.dim() == 2 && piece.size(1) == first.size(1), op, ": pieces of one width, got ",
                  piece.sizes(), " after ", first.sizes());
      TORCH_CHECK(piece.scalar_type() == first.scalar_type() && piece.device() == first.device(), op,
                  ": pieces of one dtype and device");
      kept_.push_back(piece.contiguous());
      bases_.push_back(static_cast<const char*>(kept_.back().data_ptr()));
      starts_.push_back(starts_.back() + piece.size(0));
    }
    width_ = first.size(1);
    row_bytes_ = width_ * first.element_size();
  }

  int64_t rows() const { return starts_.back(); }
  int64_t width() const { return width_; }
  int64_t row_bytes() const { return row_bytes_; }
  at::TensorOptions options() const { return kept_[0].options(); }

  // The bytes of row k of the concatenation, 0 <= k < rows().
  const char* row(int64_t k) const {
    const std::size_t piece = std::upper_bound(starts_.begin() + 1, starts_.end(), k) - (starts_.begin() + 1);
    return bases_[piece] + (k - starts_[piece]) * row_bytes_;
  }

  template <typename T>
  const T* row_as(int64_t k) const {
    return reinterpret_cast<const T*>(row(k));
  }

 private:
  std::vector<at::Tensor> kept_;  // contiguous pieces, alive while their rows are read
  std::vector<const char*> bases_;
  std::vector<int64_t> starts_;  // starts_[p]: the first row of piece p; starts_.back(): all rows
  int64_t width_ = 0;
  int64_t row_bytes_ = 0;
};

// out = the sum of rows order[begin] .. order[end - 1] of `pieces`, added in that order (the
// first copied): how coalesce_rows and the Adam update sum the gradient rows of a repeated row.
template <typename C>
void sum_rows(const RowPieces& pieces, const int64_t* order, int64_t begin, int64_t end, C* out) {
  const int64_t dim = pieces.width();
  const C* first = pieces.row_as<C>(order[begin]);
  std::copy(first, first + dim, out);
  for (int64_t k = begin + 1; k < end; ++k) {
    const C* row = pieces.row_as<C>(order[k]);
    for (int64_t j = 0; j < dim; ++j) out[j] += row[j];
  }
}

}  // namespace recis::cpu
