// KV store: copy each new token's K and V rows ([Hk, D], contiguous per token) into its cache slot
// with 16-byte loads and stores. Dtype-agnostic: rows are moved as bytes.
#include <c10/cuda/CUDAException.h>

#include <algorithm>
#include <cstdint>

namespace {

__global__ void store_kvcache_kernel(const char* __restrict__ k, const char* __restrict__ v, char* __restrict__ k_cache,
                                     char* __restrict__ v_cache, const int64_t* __restrict__ slot_mapping,
                                     int64_t k_token_bytes, int64_t v_token_bytes, int num_chunks) {
  const int64_t token = blockIdx.x;
  const int64_t slot = slot_mapping[token];
  if (slot < 0) return;  // padding token
  const int64_t row_bytes = int64_t(num_chunks) * 16;
  for (int i = threadIdx.x; i < 2 * num_chunks; i += blockDim.x) {
    const bool is_k = i < num_chunks;
    const int chunk = is_k ? i : i - num_chunks;
    const char* src = is_k ? k + token * k_token_bytes : v + token * v_token_bytes;
    char* dst = (is_k ? k_cache : v_cache) + slot * row_bytes;
    *reinterpret_cast<uint4*>(dst + chunk * 16) = *reinterpret_cast<const uint4*>(src + chunk * 16);
  }
}

}  // namespace

// Inputs are validated by the caller (bindings.cpp).
void launch_store_kvcache(const void* k, const void* v, void* k_cache, void* v_cache, const int64_t* slot_mapping,
                          int64_t num_tokens, int64_t k_token_bytes, int64_t v_token_bytes, int64_t row_bytes,
                          cudaStream_t stream) {
  if (num_tokens == 0) return;
  const int num_chunks = int(row_bytes / 16);
  const int threads = std::min(512, ((2 * num_chunks + 31) / 32) * 32);
  store_kvcache_kernel<<<num_tokens, threads, 0, stream>>>(
      static_cast<const char*>(k), static_cast<const char*>(v), static_cast<char*>(k_cache),
      static_cast<char*>(v_cache), slot_mapping, k_token_bytes, v_token_bytes, num_chunks);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}
