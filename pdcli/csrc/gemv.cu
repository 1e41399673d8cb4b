// Skinny matmul for decode with a handful of rows: y[m, n] = sum_k x[m, k] w[n, k] (+ bias[n]) for
// M <= 4 rows of x and an nn.Linear weight W [N, K] (row-major). Bound by reading W once: each warp
// streams kRows rows of W with 16-byte loads (kUnroll chunks per lane in flight per row), x is read
// through L1, fp32 accumulation, one warp reduction per output. No split-K: every output is written
// once, by one warp.
#include <c10/cuda/CUDAException.h>

#include "common.cuh"

namespace {

using pdcli::from_float;
using pdcli::ld_stream;
using pdcli::to_float8;

constexpr int kRows = 2;     // rows of W per warp
constexpr int kUnroll = 4;   // 16-byte chunks per lane per row in flight
constexpr int kWarps = 8;    // warps per block

template <typename T, int M>
__global__ void __launch_bounds__(kWarps * 32)
gemv_kernel(T* __restrict__ y, const T* __restrict__ x, const T* __restrict__ w, const T* __restrict__ bias, int n,
            int k, int64_t x_stride, int64_t y_stride) {
  const int lane = threadIdx.x % 32;
  const int n0 = (blockIdx.x * kWarps + threadIdx.x / 32) * kRows;
  if (n0 >= n) return;  // uniform per warp
  const int chunks = k / 8;
  float acc[kRows][M];
#pragma unroll
  for (int r = 0; r < kRows; ++r)
#pragma unroll
    for (int m = 0; m < M; ++m) acc[r][m] = 0.f;
  const T* wr[kRows];
#pragma unroll
  for (int r = 0; r < kRows; ++r) wr[r] = w + int64_t(min(n0 + r, n - 1)) * k;  // a missing last row rereads
  for (int base = 0; base < chunks; base += 32 * kUnroll) {
    uint4 wv[kRows][kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int c = base + u * 32 + lane;
#pragma unroll
      for (int r = 0; r < kRows; ++r) wv[r][u] = c < chunks ? ld_stream(wr[r] + c * 8) : make_uint4(0, 0, 0, 0);
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int c = base + u * 32 + lane;
      if (c >= chunks) break;
#pragma unroll
      for (int m = 0; m < M; ++m) {
        float xf[8];
        to_float8<T>(__ldg(reinterpret_cast<const uint4*>(x + m * x_stride + c * 8)), xf);
#pragma unroll
        for (int r = 0; r < kRows; ++r) {
          float wf[8];
          to_float8<T>(wv[r][u], wf);
#pragma unroll
          for (int j = 0; j < 8; ++j) acc[r][m] += xf[j] * wf[j];
        }
      }
    }
  }
#pragma unroll
  for (int r = 0; r < kRows; ++r)
#pragma unroll
    for (int m = 0; m < M; ++m) {
      float v = acc[r][m];
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
      acc[r][m] = v;
    }
  if (lane == 0) {
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      if (n0 + r >= n) break;
      const float b = bias != nullptr ? pdcli::to_float(bias[n0 + r]) : 0.f;
#pragma unroll
      for (int m = 0; m < M; ++m) y[m * y_stride + n0 + r] = from_float<T>(acc[r][m] + b);
    }
  }
}

template <typename T>
void launch(void* y, const void* x, const void* w, const void* bias, int m, int n, int k, int64_t x_stride,
            int64_t y_stride, cudaStream_t stream) {
  const int blocks = (n + kWarps * kRows - 1) / (kWarps * kRows);
#define PDCLI_GEMV(MM)                                                                                        \
  gemv_kernel<T, MM><<<blocks, kWarps * 32, 0, stream>>>(static_cast<T*>(y), static_cast<const T*>(x),      \
                                                          static_cast<const T*>(w), static_cast<const T*>(bias), \
                                                          n, k, x_stride, y_stride)
  switch (m) {
    case 1: PDCLI_GEMV(1); break;
    case 2: PDCLI_GEMV(2); break;
    case 3: PDCLI_GEMV(3); break;
    default: PDCLI_GEMV(4); break;
  }
#undef PDCLI_GEMV
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

// Inputs are validated by the caller (bindings.cpp): 1 <= m <= 4, k % 8 == 0, 16-byte aligned rows.
void launch_gemv(void* y, const void* x, const void* w, const void* bias, int m, int n, int k, int64_t x_stride,
                 int64_t y_stride, bool bf16, cudaStream_t stream) {
  if (m == 0 || n == 0) return;
  if (bf16) launch<__nv_bfloat16>(y, x, w, bias, m, n, k, x_stride, y_stride, stream);
  else launch<__half>(y, x, w, bias, m, n, k, x_stride, y_stride, stream);
}
