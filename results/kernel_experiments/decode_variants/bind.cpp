// Experiment binding: pdcli's decode attention built with another CTA shape (PDCLI_DECODE_WARPS / _STAGES /
// _MIN_CTAS), uniform splits, inputs as pdcli's decode_attention (unchecked: the experiment's own shapes).
#include <ATen/cuda/CUDAContext.h>
#include <torch/extension.h>

void launch_decode_attention(void* out, float* part_o, float* part_lse, const void* q, const void* k_cache,
                             const void* v_cache, const int* block_tables, const int* context_lens, int batch,
                             int num_heads, int num_kv_heads, int head_dim, int table_width, int block_size,
                             int splits, int64_t q_stride, float scale, bool bf16, cudaStream_t stream,
                             const int* plan, int plan_slots);

void decode(torch::Tensor out, torch::Tensor part_o, torch::Tensor part_lse, torch::Tensor q, torch::Tensor k_cache,
            torch::Tensor v_cache, torch::Tensor block_tables, torch::Tensor context_lens, double scale, int64_t splits) {
  launch_decode_attention(out.data_ptr(), part_o.data_ptr<float>(), part_lse.data_ptr<float>(), q.data_ptr(),
                          k_cache.data_ptr(), v_cache.data_ptr(), block_tables.data_ptr<int>(),
                          context_lens.data_ptr<int>(), q.size(0), q.size(1), k_cache.size(2), q.size(2),
                          block_tables.size(1), k_cache.size(1), splits, q.stride(0), float(scale),
                          q.scalar_type() == torch::kBFloat16, at::cuda::getCurrentCUDAStream(), nullptr, 0);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("decode", &decode); }
