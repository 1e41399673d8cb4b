// Python bindings of the pdcli CUDA kernels. Every op runs on the current CUDA stream
// (so it can be captured in a CUDA graph) and checks its inputs with TORCH_CHECK.
#include <torch/extension.h>

// k, v [T, Hk, D]; k_cache, v_cache [num_blocks, block_size, Hk, D]; slot_mapping [T] int64 (< 0: skip)
void store_kvcache(torch::Tensor k, torch::Tensor v, torch::Tensor k_cache, torch::Tensor v_cache,
                   torch::Tensor slot_mapping);

// One query token per sequence. out, q [B, Hq, D]; block_tables [B, W] int32; context_lens [B] int32.
// num_splits <= 0: chosen from the grid size and max_context_len (an upper bound of context_lens).
void decode_attention(torch::Tensor out, torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                      torch::Tensor block_tables, torch::Tensor context_lens, double scale, int64_t num_splits,
                      int64_t max_context_len);

// Varlen chunked prefill: sequence b's new tokens q[query_start_loc[b]:query_start_loc[b+1]] attend causally
// (bottom-right aligned) to its context_lens[b] cached tokens, which include themselves.
// out, q [T, Hq, D]; query_start_loc [B + 1] int32.
void prefill_attention(torch::Tensor out, torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                       torch::Tensor block_tables, torch::Tensor context_lens, torch::Tensor query_start_loc,
                       int64_t max_query_len, double scale);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("store_kvcache", &store_kvcache, "write new K/V rows into their cache slots");
  m.def("decode_attention", &decode_attention, "paged GQA decode attention, split-KV");
#ifdef PDCLI_HAS_PREFILL
  m.def("prefill_attention", &prefill_attention, "paged varlen causal prefill attention");
#endif
}
