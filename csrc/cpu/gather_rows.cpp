// gather_rows(pieces, index) on CPU: out[i] = cat(pieces)[index[i]] for rows of any dtype,
// read from the pieces in place (the concatenation is never made).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstring>

#include "row_pieces.h"
#include "vec_math.h"

namespace recis::cpu {
namespace {

constexpr int64_t kPrefetchDistance = 16;  // rows ahead: the rows lie anywhere

at::Tensor gather_rows(at::TensorList pieces_in, const at::Tensor& index_in) {
  TORCH_CHECK(index_in.scalar_type() == at::kLong && index_in.dim() == 1, "gather_rows: index must be 1-D int64");
  const RowPieces pieces(pieces_in, "gather_rows");
  const at::Tensor index = index_in.contiguous();
  const int64_t n = index.numel();
  if (n > 0) {
    const auto [low, high] = at::aminmax(index);
    TORCH_CHECK_INDEX(low.item<int64_t>() >= 0 && high.item<int64_t>() < pieces.rows(),  // IndexError, as index_select
                      "gather_rows: index out of range [0, ", pieces.rows(), ")");
  }
  at::Tensor out = at::empty({n, pieces.width()}, pieces.options());
  const int64_t* position = index.data_ptr<int64_t>();
  char* destination = static_cast<char*>(out.data_ptr());
  const int64_t row_bytes = pieces.row_bytes();
  if (n == 0 || row_bytes == 0) return out;
  const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(row_bytes, 1));
  at::parallel_for(0, n, grain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      if (i + kPrefetchDistance < end) prefetch_row<Access::kRead>(pieces.row(position[i + kPrefetchDistance]), row_bytes);
      std::memcpy(destination + i * row_bytes, pieces.row(position[i]), row_bytes);
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(recis, CPU, m) { m.impl("gather_rows", &gather_rows); }

}  // namespace recis::cpu
