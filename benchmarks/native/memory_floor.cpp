// The memory floor of a sparse update, for the benchmark: read and write the touched
// rows of weight, exp_avg and exp_avg_sq once (x = x * scale, scale given at run time
// so nothing is elided), with the same parallel loop and prefetching as the update.
// Any fused update of those rows moves at least these bytes. Not shipped with recis:
// benchmarks/sparse_update.py compiles it on its own (load_memory_floor, with csrc/cpu on
// the include path) and calls it as torch.ops.recis.memory_floor.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "touched_rows.h"  // kPrefetchDistance: prefetch as far ahead as the update
#include "vec_math.h"

namespace recis::cpu {
namespace {

void scale_row(float* x, int64_t dim, float scale) {
  for_each_vector<float>(dim, [&](int64_t j, int64_t n) { store(load(x + j, n) * Vectorized<float>(scale), x + j, n); });
}

void memory_floor(at::Tensor weight, at::Tensor exp_avg, at::Tensor exp_avg_sq, const at::Tensor& rows,
                  double scale) {
  for (const at::Tensor* t : {&weight, &exp_avg, &exp_avg_sq}) {
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous() && t->sizes() == weight.sizes() &&
                    t->dim() == 2, "memory_floor: three contiguous float32 tables of one shape");
  }
  TORCH_CHECK(rows.scalar_type() == at::kLong && rows.is_contiguous(), "memory_floor: int64 rows");
  const int64_t dim = weight.size(1);
  const int64_t* r = rows.data_ptr<int64_t>();
  float* tables[3] = {weight.data_ptr<float>(), exp_avg.data_ptr<float>(), exp_avg_sq.data_ptr<float>()};
  const auto factor = static_cast<float>(scale);
  at::parallel_for(0, rows.numel(), std::max<int64_t>(1, 4096 / dim), [&](int64_t begin, int64_t end) {
    for (int64_t u = begin; u < end; ++u) {
      for (float* table : tables) {
        if (u + kPrefetchDistance < end) prefetch_row(table + r[u + kPrefetchDistance] * dim, dim * 4);
        scale_row(table + r[u] * dim, dim, factor);
      }
    }
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(recis, m) {
  m.def("memory_floor(Tensor(a!) weight, Tensor(b!) exp_avg, Tensor(c!) exp_avg_sq, Tensor rows, float scale) -> ()");
}

TORCH_LIBRARY_IMPL(recis, CPU, m) { m.impl("memory_floor", &memory_floor); }

}  // namespace recis::cpu
