// SiLU-and-mul for the gated MLP: out[t] = T(T(silu(gate)) * up) with x[t] = [gate | up], 16-byte loads.
#include <c10/cuda/CUDAException.h>

#include "common.cuh"
#include "launch.cuh"

namespace {

using pdcli::pack8;
using pdcli::round_to;
using pdcli::to_float8;

template <typename T>
__global__ void silu_and_mul_kernel(T* __restrict__ out, const T* __restrict__ x, int d, int64_t x_stride,
                                    int64_t out_stride) {
  pdcli::pdl_wait();
  pdcli::pdl_trigger();
  const int64_t row = blockIdx.x;
  const int vecs = d / 8;
  const T* gate = x + row * x_stride;
  const T* up = gate + d;
  for (int i = blockIdx.y * blockDim.x + threadIdx.x; i < vecs; i += gridDim.y * blockDim.x) {
    float g[8], u[8];
    to_float8<T>(*reinterpret_cast<const uint4*>(gate + i * 8), g);
    to_float8<T>(*reinterpret_cast<const uint4*>(up + i * 8), u);
#pragma unroll
    for (int j = 0; j < 8; ++j) g[j] = round_to<T>(g[j] / (1.f + __expf(-g[j]))) * u[j];
    *reinterpret_cast<uint4*>(out + row * out_stride + i * 8) = pack8<T>(g);
  }
}

}  // namespace

// Inputs are validated by the caller (bindings.cpp). x [rows, 2d] (row stride x_stride), out [rows, d].
void launch_silu_and_mul(void* out, const void* x, int64_t rows, int d, int64_t x_stride, int64_t out_stride, bool bf16,
                         cudaStream_t stream) {
  if (rows == 0) return;
  const int threads = 256;
  const dim3 grid(rows, (d / 8 + threads - 1) / threads);
  if (bf16)
    pdcli::launch_pdl(silu_and_mul_kernel<__nv_bfloat16>, grid, threads, 0, stream, static_cast<__nv_bfloat16*>(out),
                      static_cast<const __nv_bfloat16*>(x), d, x_stride, out_stride);
  else
    pdcli::launch_pdl(silu_and_mul_kernel<__half>, grid, threads, 0, stream, static_cast<__half*>(out),
                      static_cast<const __half*>(x), d, x_stride, out_stride);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}
