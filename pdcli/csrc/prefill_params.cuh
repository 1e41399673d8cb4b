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
  int64_t kv_slots;  // num_blocks * block_size: the caches' rows of Hk * D values (the TMA loader's tensor maps)
};

// Where one CTA's tile of bm query rows of sequence b sits (tiles are scheduled longest first: m_block counts from
// the last), and the key tiles of bn keys it visits. false: the tile starts past the sequence's new tokens.
struct PrefillTile {
  int q_begin;     // the sequence's first token in q / out
  int m0;          // the tile's first query row, within the sequence
  int rows;        // query rows in the tile, <= bm
  int ctx_off;     // query row i sees keys [0, ctx_off + i]
  int key_end;     // keys [0, key_end) are seen by some row of the tile (<= the context length)
  int n_tiles;     // key tiles to visit
  int n_unmasked;  // tiles [0, n_unmasked) are visible to every row
};

#ifdef __CUDACC__
__device__ __forceinline__ bool prefill_tile(const PrefillParams& p, int b, int m_block, int bm, int bn,
                                             PrefillTile& t) {
  t.q_begin = p.query_start_loc[b];
  const int q_len = p.query_start_loc[b + 1] - t.q_begin;
  t.m0 = m_block * bm;
  if (t.m0 >= q_len) return false;
  t.ctx_off = p.context_lens[b] - q_len;
  t.rows = min(bm, q_len - t.m0);
  t.key_end = t.ctx_off + t.m0 + t.rows;
  t.n_tiles = t.key_end > 0 ? (t.key_end + bn - 1) / bn : 0;
  t.n_unmasked = max(t.ctx_off + t.m0 + 1, 0) / bn;
  return true;
}
#endif

// prefill_attention_sm90.cu: whether this build has the wgmma kernel for head_dim (built for sm_90a), and its launch.
bool prefill_attention_sm90_available(int head_dim);
void launch_prefill_attention_sm90(const PrefillParams& p, int batch, int max_query_len, bool bf16, cudaStream_t stream);
// prefill_attention_sm90_ws.cu: the warp-specialised variant (a loader warpgroup, two compute warpgroups in turn);
// tma: K/V tiles loaded by TMA (the loader warp's lanes, boxes of min(block_size, 128) rows; block_size >= 8).
void launch_prefill_attention_sm90_ws(const PrefillParams& p, int batch, int max_query_len, bool bf16, bool tma,
                                      int block_size, cudaStream_t stream);
// The wgmma descriptor stride i (0: K-major 8-row step, 1: N-major next-64-columns step, 2: N-major 8-row step),
// bytes: PDCLI_WGMMA_DESC="k_sbo,v_lbo,v_sbo" when set, else fallback.
uint32_t wgmma_desc_override(int i, uint32_t fallback);
// wgmma_probe.cu: the two wgmma products of the kernel on one tile (bring-up).
void launch_wgmma_probe(const void* a, const void* k, const void* v, float* s_out, float* o_out, bool bf16,
                        cudaStream_t stream);

}  // namespace pdcli
