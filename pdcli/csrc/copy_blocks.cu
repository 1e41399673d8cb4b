// KV block copies for the P/D handoff: dst[g, dst_idx[i]] = src[g, src_idx[i]] for every group g (layer x K|V)
// and pair i, a block being block_bytes contiguous bytes, moved with 16-byte loads and stores; one CTA per
// (pair, group). A gather (dst a packed buffer), a scatter (src a packed buffer) and a pool-to-pool copy
// (into another process's pool on this GPU, mapped through CUDA IPC) are the same kernel.
#include <c10/cuda/CUDAException.h>

#include <cstdint>

namespace {

constexpr int kThreads = 256;

__global__ void __launch_bounds__(kThreads)
copy_blocks_kernel(const char* __restrict__ src, char* __restrict__ dst, const int64_t* __restrict__ src_idx,
                   const int64_t* __restrict__ dst_idx, int64_t src_blocks, int64_t dst_blocks,
                   int64_t block_bytes) {
  const int64_t si = src_idx[blockIdx.x], di = dst_idx[blockIdx.x];
  if (si < 0 || si >= src_blocks || di < 0 || di >= dst_blocks) return;  // never written out of bounds
  const int64_t g = blockIdx.y;
  const uint4* s = reinterpret_cast<const uint4*>(src + (g * src_blocks + si) * block_bytes);
  uint4* d = reinterpret_cast<uint4*>(dst + (g * dst_blocks + di) * block_bytes);
  const int64_t n = block_bytes / 16;
#pragma unroll 4
  for (int64_t k = threadIdx.x; k < n; k += kThreads) d[k] = s[k];
}

}  // namespace

// Inputs are validated by the caller (bindings.cpp).
void launch_copy_blocks(const void* src, void* dst, const int64_t* src_idx, const int64_t* dst_idx, int64_t num_pairs,
                        int64_t num_groups, int64_t src_blocks, int64_t dst_blocks, int64_t block_bytes,
                        cudaStream_t stream) {
  if (num_pairs == 0 || num_groups == 0) return;
  const dim3 grid(static_cast<unsigned>(num_pairs), static_cast<unsigned>(num_groups));
  copy_blocks_kernel<<<grid, kThreads, 0, stream>>>(static_cast<const char*>(src), static_cast<char*>(dst), src_idx,
                                                    dst_idx, src_blocks, dst_blocks, block_bytes);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}
