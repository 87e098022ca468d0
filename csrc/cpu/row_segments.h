// Grouping of int64 keys (row indices, or any ids) without a comparison sort: a stable
// LSD radix sort of (key - min, position) pairs, 11 bits per pass, as many passes as
// max - min needs (two below 2^22, three below 2^33, six for arbitrary int64). O(n) a pass.
//
// Result: the distinct keys ascending (as signed int64), offsets with offsets[u]..offsets[u+1] the
// segment of unique row u in `order`, and `order` the input positions grouped by row,
// ascending within each group (stable), which is the order in which torch's
// index_add_ adds duplicates.
#pragma once

#include <ATen/ATen.h>

#include <tuple>

namespace recis::cpu {

std::tuple<at::Tensor, at::Tensor, at::Tensor> row_segments(const at::Tensor& rows);

}  // namespace recis::cpu
