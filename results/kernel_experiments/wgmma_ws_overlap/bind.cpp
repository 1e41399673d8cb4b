// Experiment binding: a variant of the wgmma_ws kernel whose launch function is LAUNCH (set by run.py), inputs as
// pdcli's prefill_attention_wgmma_ws (bf16, D = 128; unchecked).
#include <ATen/cuda/CUDAContext.h>
#include <torch/extension.h>

#include "prefill_params.cuh"

namespace pdcli {
void LAUNCH(const PrefillParams& p, int batch, int max_query_len, bool bf16, cudaStream_t stream);
uint32_t wgmma_desc_override(int, uint32_t fallback) { return fallback; }
}  // namespace pdcli

void run(torch::Tensor out, torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache, torch::Tensor block_tables,
            torch::Tensor context_lens, torch::Tensor query_start_loc, int64_t max_query_len, double scale) {
  TORCH_CHECK(q.scalar_type() == torch::kBFloat16 && q.size(2) == 128);
  pdcli::PrefillParams p{};
  p.out = out.data_ptr();
  p.q = q.data_ptr();
  p.k_cache = k_cache.data_ptr();
  p.v_cache = v_cache.data_ptr();
  p.block_tables = block_tables.data_ptr<int>();
  p.context_lens = context_lens.data_ptr<int>();
  p.query_start_loc = query_start_loc.data_ptr<int>();
  p.num_heads = q.size(1);
  p.num_kv_heads = k_cache.size(2);
  p.group = p.num_heads / p.num_kv_heads;
  p.table_width = block_tables.size(1);
  int bs = k_cache.size(1), shift = 0;
  while ((1 << shift) < bs) ++shift;
  p.block_shift = shift;
  p.scale_log2 = float(scale) * 1.4426950408889634f;
  pdcli::LAUNCH(p, block_tables.size(0), max_query_len, true, at::cuda::getCurrentCUDAStream());
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("run", &run); }
