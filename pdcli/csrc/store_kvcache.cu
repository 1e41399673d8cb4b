// KV store: copy each new token's K and V rows ([Hk, D], contiguous per token) into its cache slot
// with 16-byte loads and stores. Dtype-agnostic: rows are moved as bytes.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <torch/extension.h>

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

void store_kvcache(torch::Tensor k, torch::Tensor v, torch::Tensor k_cache, torch::Tensor v_cache,
                   torch::Tensor slot_mapping) {
  TORCH_CHECK(k.is_cuda() && v.is_cuda() && k_cache.is_cuda() && v_cache.is_cuda() && slot_mapping.is_cuda(),
              "store_kvcache: all tensors must be on the GPU");
  TORCH_CHECK(k.dim() == 3 && v.sizes() == k.sizes(), "store_kvcache: k, v must be [T, Hk, D]");
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.is_contiguous() && v_cache.is_contiguous() &&
                  v_cache.sizes() == k_cache.sizes(), "store_kvcache: caches must be contiguous [N, bs, Hk, D]");
  TORCH_CHECK(k.size(1) == k_cache.size(2) && k.size(2) == k_cache.size(3), "store_kvcache: head shape mismatch");
  TORCH_CHECK(k.scalar_type() == k_cache.scalar_type() && v.scalar_type() == k.scalar_type(),
              "store_kvcache: dtype mismatch");
  TORCH_CHECK(slot_mapping.scalar_type() == torch::kInt64 && slot_mapping.numel() == k.size(0),
              "store_kvcache: slot_mapping must be int64 [T]");
  for (auto* t : {&k, &v})
    TORCH_CHECK(t->stride(2) == 1 && t->stride(1) == t->size(2), "store_kvcache: each token's [Hk, D] must be contiguous");
  const int64_t es = k.element_size();
  const int64_t row_bytes = k.size(1) * k.size(2) * es;
  TORCH_CHECK(row_bytes % 16 == 0 && (k.stride(0) * es) % 16 == 0 && (v.stride(0) * es) % 16 == 0 &&
                  reinterpret_cast<uintptr_t>(k.data_ptr()) % 16 == 0 && reinterpret_cast<uintptr_t>(v.data_ptr()) % 16 == 0,
              "store_kvcache: rows must be 16-byte aligned");
  const int64_t num_tokens = k.size(0);
  if (num_tokens == 0) return;
  const int num_chunks = row_bytes / 16;
  const int threads = std::min(512, ((2 * num_chunks + 31) / 32) * 32);
  store_kvcache_kernel<<<num_tokens, threads, 0, at::cuda::getCurrentCUDAStream()>>>(
      static_cast<const char*>(k.data_ptr()), static_cast<const char*>(v.data_ptr()), static_cast<char*>(k_cache.data_ptr()),
      static_cast<char*>(v_cache.data_ptr()), slot_mapping.data_ptr<int64_t>(), k.stride(0) * es, v.stride(0) * es, num_chunks);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}
