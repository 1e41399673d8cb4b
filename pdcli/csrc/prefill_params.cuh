// The inputs of the paged varlen causal prefill attention kernels (prefill_attention.cu: mma.sync, any
// sm_80+ GPU; prefill_attention_sm90.cu: wgmma, sm_90a).
#pragma once
#include <cuda_runtime.h>
#include <stdint.h>

namespace pdcli {

struct PrefillParams {
  void* out;            // [T, Hq, D]
  const void* q;        // [T, Hq, D]
  const void* k_cache;  // [num_blocks, block_size, Hk, D]
  const void* v_cache;
  const int* block_tables;     // [B, W]
  const int* context_lens;     // [B], includes the new tokens
  const int* query_start_loc;  // [B + 1]
  int num_heads;     // Hq
  int num_kv_heads;  // Hk
  int group;         // Hq / Hk
  int table_width;   // W
  int block_shift;   // log2(block_size)
  float scale_log2;  // softmax scale * log2(e)
};

// prefill_attention_sm90.cu: whether this build has the wgmma kernel for head_dim (built for sm_90a), and its launch.
bool prefill_attention_sm90_available(int head_dim);
void launch_prefill_attention_sm90(const PrefillParams& p, int batch, int max_query_len, bool bf16, cudaStream_t stream);
// prefill_attention_sm90_ws.cu: the warp-specialised variant (a loader warpgroup, two compute warpgroups in turn).
void launch_prefill_attention_sm90_ws(const PrefillParams& p, int batch, int max_query_len, bool bf16,
                                      cudaStream_t stream);
// The wgmma descriptor stride i (0: K-major 8-row step, 1: N-major next-64-columns step, 2: N-major 8-row step),
// bytes: PDCLI_WGMMA_DESC="k_sbo,v_lbo,v_sbo" when set, else fallback.
uint32_t wgmma_desc_override(int i, uint32_t fallback);
// wgmma_probe.cu: the two wgmma products of the kernel on one tile (bring-up).
void launch_wgmma_probe(const void* a, const void* k, const void* v, float* s_out, float* o_out, bool bf16,
                        cudaStream_t stream);

}  // namespace pdcli
