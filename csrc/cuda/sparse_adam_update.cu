// Fused Adam-family update of the touched rows on CUDA: one warp per row, each lane
// moving 16 bytes of the row per load (float4 of a float32 row, 8 values of a bf16/fp16
// row) with the matching float32 slot and gradient values. Rows whose width or address
// does not allow 16-byte accesses take the same kernel with one element per lane.
// The math is common/adam_rule.h in float32.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cassert>

#include "launchers.h"

namespace recis::cuda {
namespace {

constexpr int kWarp = 32;
constexpr int kRowsPerBlock = 8;  // warps per block

struct DeviceMath {
  __device__ static float sqrt(float x) { return __fsqrt_rn(x); }
  __device__ static float neg(float x) { return -x; }
  __device__ static float fmadd(float a, float b, float c) { return __fmaf_rn(a, b, c); }
};

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
template <typename W>
__device__ __forceinline__ W from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }

// VEC elements of each array per access: 16 bytes of the row.
template <typename W, int VEC>
struct alignas(16) Chunk {
  W w[VEC];
  float m[VEC], v[VEC], g[VEC];
};

template <typename W, int VEC>
__device__ __forceinline__ void load_chunk(Chunk<W, VEC>& c, const W* w, const float* m, const float* v,
                                           const float* g) {
  if constexpr (VEC * sizeof(W) == 16) {
    *reinterpret_cast<uint4*>(c.w) = *reinterpret_cast<const uint4*>(w);
#pragma unroll
    for (int k = 0; k < VEC; k += 4) {
      *reinterpret_cast<float4*>(c.m + k) = *reinterpret_cast<const float4*>(m + k);
      *reinterpret_cast<float4*>(c.v + k) = *reinterpret_cast<const float4*>(v + k);
      *reinterpret_cast<float4*>(c.g + k) = *reinterpret_cast<const float4*>(g + k);
    }
  } else {
#pragma unroll
    for (int k = 0; k < VEC; ++k) c.w[k] = w[k], c.m[k] = m[k], c.v[k] = v[k], c.g[k] = g[k];
  }
}

template <typename W, int VEC>
__device__ __forceinline__ void store_chunk(const Chunk<W, VEC>& c, W* w, float* m, float* v) {
  if constexpr (VEC * sizeof(W) == 16) {
    *reinterpret_cast<uint4*>(w) = *reinterpret_cast<const uint4*>(c.w);
#pragma unroll
    for (int k = 0; k < VEC; k += 4) {
      *reinterpret_cast<float4*>(m + k) = *reinterpret_cast<const float4*>(c.m + k);
      *reinterpret_cast<float4*>(v + k) = *reinterpret_cast<const float4*>(c.v + k);
    }
  } else {
#pragma unroll
    for (int k = 0; k < VEC; ++k) w[k] = c.w[k], m[k] = c.m[k], v[k] = c.v[k];
  }
}

template <typename W, int VEC>
__global__ void update_rows(W* weight, float* exp_avg, float* exp_avg_sq, const int64_t* rows, int64_t count,
                            int64_t table_rows, const float* grad, int64_t dim, int64_t* row_steps,
                            AdamScalars<float> s, double lr, double beta1, double beta2) {
  const int lane = threadIdx.x % kWarp;
  const int64_t u = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.x / kWarp;
  if (u >= count) return;  // whole warps leave together
  const int64_t r = rows[u];
  // As torch's CUDA indexing does: no host synchronization to check rows before the launch (a
  // sparse step must not wait for the GPU), so a row outside the table stops the kernel here,
  // asserting whether or not NDEBUG is defined, before that row is touched.
  if (r < 0 || r >= table_rows) __assert_fail("row < table_rows", __FILE__, __LINE__, __func__);
  RowStep<float> step{};
  const bool per_row = row_steps != nullptr;
  if (per_row) {
    int64_t t = 0;
    if (lane == 0) t = ++row_steps[r];
    t = __shfl_sync(0xffffffffu, t, 0);
    step = row_step<float>(lr, beta1, beta2, s.corrected, t);
  }
  W* w = weight + r * dim;
  float* m = exp_avg + r * dim;
  float* v = exp_avg_sq + r * dim;
  const float* g = grad + u * dim;
  for (int64_t j = static_cast<int64_t>(lane) * VEC; j < dim; j += kWarp * VEC) {
    Chunk<W, VEC> c;
    load_chunk<W, VEC>(c, w + j, m + j, v + j, g + j);
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      float theta = to_float(c.w[k]);
      adam_element<DeviceMath, float, float>(theta, c.m[k], c.v[k], c.g[k], s, per_row ? &step : nullptr);
      c.w[k] = from_float<W>(theta);
    }
    store_chunk<W, VEC>(c, w + j, m + j, v + j);
  }
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

template <typename W>
cudaError_t launch(W* weight, float* exp_avg, float* exp_avg_sq, const int64_t* rows, int64_t count,
                   int64_t table_rows, const float* grad, int64_t dim, int64_t* row_steps, const AdamHyper& hyper,
                   cudaStream_t stream) {
  if (count == 0) return cudaSuccess;
  constexpr int kVec = 16 / sizeof(W);
  const AdamScalars<float> s = adam_scalars<float>(hyper);
  const dim3 blocks(static_cast<unsigned>((count + kRowsPerBlock - 1) / kRowsPerBlock));
  const dim3 threads(kRowsPerBlock * kWarp);
  const bool vectorized = dim % kVec == 0 && aligned16(weight) && aligned16(exp_avg) && aligned16(exp_avg_sq) &&
                          aligned16(grad) && (dim * sizeof(W)) % 16 == 0 && (dim * sizeof(float)) % 16 == 0;
  if (vectorized) {
    update_rows<W, kVec><<<blocks, threads, 0, stream>>>(weight, exp_avg, exp_avg_sq, rows, count, table_rows, grad,
                                                         dim, row_steps, s, hyper.lr, hyper.beta1, hyper.beta2);
  } else {
    update_rows<W, 1><<<blocks, threads, 0, stream>>>(weight, exp_avg, exp_avg_sq, rows, count, table_rows, grad, dim,
                                                      row_steps, s, hyper.lr, hyper.beta1, hyper.beta2);
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t sparse_adam_update(void* weight, RowType row_type, float* exp_avg, float* exp_avg_sq, const int64_t* rows,
                               int64_t count, int64_t table_rows, const float* grad, int64_t dim,
                               int64_t* row_steps, const AdamHyper& hyper, cudaStream_t stream) {
  switch (row_type) {
    case RowType::kFloat32:
      return launch(static_cast<float*>(weight), exp_avg, exp_avg_sq, rows, count, table_rows, grad, dim, row_steps,
                    hyper, stream);
    case RowType::kBFloat16:
      return launch(static_cast<__nv_bfloat16*>(weight), exp_avg, exp_avg_sq, rows, count, table_rows, grad, dim,
                    row_steps, hyper, stream);
    case RowType::kFloat16:
      return launch(static_cast<__half*>(weight), exp_avg, exp_avg_sq, rows, count, table_rows, grad, dim, row_steps,
                    hyper, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace recis::cuda
