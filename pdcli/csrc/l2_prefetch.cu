// Warms L2 with the first lines a GEMM will read of a linear's weight W [rows, row_bytes] (row-major): the first
// `bytes` of every row. A GEMM with few activation rows (decode) starts all its CTAs at column 0 of their weight
// rows and walks along them together (cuBLAS's tiles, the gemv's warps), so these lines are the ones it reads
// first. Launched just before a short kernel (a norm, SiLU-and-mul) whose own traffic leaves HBM mostly idle,
// the reads proceed there and the GEMM behind finds its first tiles in L2. Nothing is written; no prefetch is
// waited on. The kernel waits for the kernel ahead only at its end, so the one behind it (which waits for this
// one) still starts after everything ahead of both is complete and visible.
#include <c10/cuda/CUDAException.h>

#include <algorithm>

#include "launch.cuh"

namespace {

__global__ void l2_prefetch_kernel(const char* __restrict__ base, int64_t rows, int64_t row_bytes, int bytes) {
  pdcli::pdl_trigger();
  const int64_t step = int64_t(gridDim.x) * blockDim.x;
  for (int64_t r = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; r < rows; r += step) {
    const char* p = base + r * row_bytes;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(p), "r"(bytes) : "memory");  // 16-B multiples
#else
    for (int o = 0; o < bytes; o += 128) asm volatile("prefetch.global.L2 [%0];" ::"l"(p + o));
#endif
  }
  pdcli::pdl_wait();
}

}  // namespace

// Inputs are validated by the caller (bindings.cpp): base and row_bytes 16-byte aligned, 0 < bytes <= row_bytes,
// bytes a multiple of 16.
void launch_l2_prefetch(const void* base, int64_t rows, int64_t row_bytes, int bytes, cudaStream_t stream) {
  if (rows == 0) return;
  const int threads = 128;
  const int blocks = int(std::min<int64_t>((rows + threads - 1) / threads, 264));
  pdcli::launch_pdl(l2_prefetch_kernel, dim3(blocks), dim3(threads), 0, stream, static_cast<const char*>(base), rows,
                    row_bytes, bytes);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}
