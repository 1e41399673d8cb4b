// The inputs of the paged varlen causal prefill attention kernels (prefill_attention.cu: mma.sync, any
// sm_80+ GPU; prefill_attention_sm90.cu: wgmma, sm_90a).
#pragma once
#include <cuda_runtime.h>

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

}  // namespace pdcli
