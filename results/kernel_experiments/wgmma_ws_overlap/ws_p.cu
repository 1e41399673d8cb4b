// Varlen paged causal prefill attention on Hopper, warp-specialised (FA3's design with a cp.async producer;
// sm_90a, head_dim 128). One CTA = (one q head, one sequence, one tile of 128 new query rows), 3 warpgroups:
// warpgroup 0 loads (Q once, then K/V tiles gathered through the block table into a 2-stage ring; a stage is
// signalled full on an mbarrier once its copies landed), warpgroups 1 and 2 each compute 64 rows as
// prefill_attention_sm90.cu does (S = Q K^T, mask, online softmax, O += P V by wgmma) and release the stage on
// an mbarrier. The two compute warpgroups take turns issuing their GEMMs (two named barriers), so one's softmax
// runs while the other's GEMMs hold the tensor cores (pingpong); setmaxnreg moves registers from the loader to
// them. Same tile layout and descriptor strides (PDCLI_WGMMA_DESC) as the other wgmma kernel.
#include <c10/cuda/CUDAException.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#include <algorithm>

#include "mma.cuh"
#include "prefill_params.cuh"
#include "wgmma.cuh"
#include "wgmma_softmax_old.cuh"

namespace {

using namespace pdcli;

constexpr int kD = 128;        // head dim
constexpr int kBM = 128;       // query rows per CTA: 2 compute warpgroups x 64
constexpr int kBN = 128;       // keys per K/V tile
constexpr int kThreads = 384;  // warpgroup 0 loads, 1 and 2 compute
constexpr int kTileBytes = 128 * kD * 2;
constexpr int kHalfBytes = kTileBytes / 2;
constexpr int kSmemBytes = 1024 + 6 * kTileBytes + 8 * 8;  // slack, 2 x Q, 2 x (K, V), 8 mbarriers
static_assert(kBM == 128 && kBN == 128, "tiles of 128 rows: the halves' layout and the loads assume it");

struct WsParams {
  PrefillParams p;
  uint32_t k_sbo, v_lbo, v_sbo;  // descriptor strides, bytes (prefill_attention_sm90.cu)
  int batch, m_tiles, items;     // work items = heads x batch x m_tiles, longest first
};

// Work item w: (head, sequence, query tile counted from the last); false where the tile has no row.
__device__ __forceinline__ bool work_tile(const WsParams& wp, int w, int& head, int& b, PrefillTile& tile) {
  head = w % wp.p.num_heads;
  const int rest = w / wp.p.num_heads;
  b = rest % wp.batch;
  return prefill_tile(wp.p, b, wp.m_tiles - 1 - rest / wp.batch, kBM, kBN, tile);
}

// Persistent: gridDim.x CTAs walk the work items w = blockIdx.x, + gridDim.x, ... (skipping those without a
// row). The loader runs one load ahead through the items' tiles as one sequence, so the next item's Q (two Q
// buffers) and first K/V tile load while the compute warpgroups finish the current item.
template <typename T>
__global__ void __launch_bounds__(kThreads, 1) prefill_attention_ws_kernel(const WsParams wp) {
#ifdef PDCLI_HAS_WGMMA
  const PrefillParams& p = wp.p;
  extern __shared__ unsigned char smem_raw[];
  const uint32_t base = (smem_u32(smem_raw) + 1023) & ~1023u;
  auto sQ = [&](int qb) { return base + qb * kTileBytes; };
  auto sK = [&](int stage) { return base + (2 + 2 * stage) * kTileBytes; };
  auto sV = [&](int stage) { return base + (3 + 2 * stage) * kTileBytes; };
  const uint32_t bars = base + 6 * kTileBytes;
  auto full = [&](int stage) { return bars + 8 * stage; };
  auto empty = [&](int stage) { return bars + 16 + 8 * stage; };
  auto q_full = [&](int qb) { return bars + 32 + 8 * qb; };
  auto q_empty = [&](int qb) { return bars + 48 + 8 * qb; };
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, wg = warp >> 2;
  if (tid == 0) {
    for (int i = 0; i < 2; ++i) {
      mbar_init(full(i), 128);
      mbar_init(empty(i), 256);
      mbar_init(q_full(i), 128);
      mbar_init(q_empty(i), 256);
    }
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  }
  __syncthreads();
  auto next_item = [&](int w) {  // the first item from w on that has a row (>= items: none)
    int h, bb;
    PrefillTile t;
    while (w < wp.items && !work_tile(wp, w, h, bb, t)) w += gridDim.x;
    return w;
  };

  if (wg == 0) {
    asm volatile("setmaxnreg.dec.sync.aligned.u32 72;\n" ::: "memory");
    const int c = tid & 15, r0 = tid >> 4;
    const uint32_t dst0 = sw128_tile_off(r0, c, kHalfBytes);
    const int block_mask = (1 << p.block_shift) - 1;
    const int64_t kv_slot_stride = (int64_t)p.num_kv_heads * kD;
    // The load in flight: item w (its it-th), tile n, global tile g.
    int w = next_item(blockIdx.x), it = 0, n = 0, g = 0;
    auto issue = [&]() {  // item w's tile n (and its Q with tile 0) into stage g & 1
      int head, b;
      PrefillTile tile;
      work_tile(wp, w, head, b, tile);
      if (n == 0) {
        const int qb = it & 1;
        mbar_wait(q_empty(qb), ((it >> 1) & 1) ^ 1);
        const int64_t q_row_stride = (int64_t)p.num_heads * kD;
        const T* q_base =
            reinterpret_cast<const T*>(p.q) + ((int64_t)(tile.q_begin + tile.m0) * p.num_heads + head) * kD + c * 8;
#pragma unroll
        for (int j = 0; j < 16; ++j) {
          const int row = r0 + 8 * j;
          const bool valid = row < tile.rows;
          cp_async_16(sQ(qb) + dst0 + j * 1024, valid ? q_base + row * q_row_stride : reinterpret_cast<const T*>(p.q),
                      valid);
        }
      }
      const int stage = g & 1;
      mbar_wait(empty(stage), ((g >> 1) & 1) ^ 1);
      const int* table = p.block_tables + (int64_t)b * p.table_width;
      const int kv_head = head / p.group;
      const T* k_head = reinterpret_cast<const T*>(p.k_cache) + (int64_t)kv_head * kD + c * 8;
      const T* v_head = reinterpret_cast<const T*>(p.v_cache) + (int64_t)kv_head * kD + c * 8;
#pragma unroll 4
      for (int j = 0; j < 16; ++j) {
        const int key = n * kBN + r0 + 8 * j;
        const bool valid = key < tile.key_end;
        const int64_t off =
            valid ? (int64_t)((__ldg(table + (key >> p.block_shift)) << p.block_shift) + (key & block_mask)) *
                        kv_slot_stride
                  : 0;
        cp_async_16(sK(stage) + dst0 + j * 1024, k_head + off, valid);
        cp_async_16(sV(stage) + dst0 + j * 1024, v_head + off, valid);
      }
      cp_async_commit();
      return tile.n_tiles;
    };
    if (w < wp.items) {
      int n_tiles = issue();
      while (true) {
        cp_async_wait<0>();  // the load in flight landed
        fence_proxy_async_shared();
        if (n == 0) mbar_arrive(q_full(it & 1));
        mbar_arrive(full(g & 1));
        ++g;
        if (++n == n_tiles) {
          n = 0;
          ++it;
          w = next_item(w + gridDim.x);
          if (w >= wp.items) break;
        }
        n_tiles = issue();
      }
    }
  } else {
    asm volatile("setmaxnreg.inc.sync.aligned.u32 216;\n" ::: "memory");
    const int cw = wg - 1;
    const int warp_row0 = (warp - 4) * 16;
    if (cw == 1) named_arrive(1);  // compute warpgroup 0 issues first
    int g = 0, it = 0;
    for (int w = next_item(blockIdx.x); w < wp.items; ++it) {
      int head, b;
      PrefillTile tile;
      work_tile(wp, w, head, b, tile);
      const int w_next = next_item(w + gridDim.x);
      const int qb = it & 1;
      float o[64], s[64];
#pragma unroll
      for (int i = 0; i < 64; ++i) o[i] = s[i] = 0.f;
      SoftmaxState st;
      softmax_init(st);
      mbar_wait(q_full(qb), (it >> 1) & 1);
      for (int n = 0; n < tile.n_tiles; ++n, ++g) {
        const int stage = g & 1;
        mbar_wait(full(stage), (g >> 1) & 1);
        named_sync(1 + cw);
        issue_qk<T>(s, sQ(qb) + cw * 64 * 128, sK(stage), kHalfBytes, wp.k_sbo);
        named_arrive(1 + (cw ^ 1));
        wait_acc(s);
        if (n >= tile.n_unmasked)
          mask_causal(s, tile.ctx_off + tile.m0 + warp_row0 + (lane >> 2) - n * kBN - (lane & 3) * 2);
        softmax_tile(s, o, st, p.scale_log2);
        uint32_t pa[kBN / 16][4];
        pack_p<T>(s, pa, o);
        named_sync(1 + cw);
        issue_pv<T>(o, pa, sV(stage), wp.v_lbo, wp.v_sbo);
        // warpgroup 1's last turn of the CTA goes to no one
        if (cw == 0 || n + 1 < tile.n_tiles || w_next < wp.items) named_arrive(1 + (cw ^ 1));
        wait_acc(o);
        mbar_arrive(empty(stage));
      }
      mbar_arrive(q_empty(qb));
      store_o<T>(o, st, reinterpret_cast<T*>(p.out) + ((int64_t)(tile.q_begin + tile.m0) * p.num_heads + head) * kD,
                 (int64_t)p.num_heads * kD, warp_row0, tile.rows, lane);
      w = w_next;
    }
  }
#endif
}

template <typename T>
void launch(WsParams wp, int batch, int max_query_len, cudaStream_t stream) {
  auto kernel = prefill_attention_ws_kernel<T>;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmemBytes));
  int device = 0, sms = 1;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  wp.batch = batch;
  wp.m_tiles = (max_query_len + kBM - 1) / kBM;
  wp.items = wp.p.num_heads * batch * wp.m_tiles;
  kernel<<<std::min(wp.items, sms), kThreads, kSmemBytes, stream>>>(wp);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

namespace pdcli {

// Inputs are validated by the caller (bindings.cpp), prefill_attention_sm90_available included.
void launch_ws_p(const PrefillParams& p, int batch, int max_query_len, bool bf16,
                                      cudaStream_t stream) {
  const WsParams wp{p, wgmma_desc_override(0, 1024), wgmma_desc_override(1, kHalfBytes), wgmma_desc_override(2, 1024), 0, 0, 0};
  if (bf16)
    launch<__nv_bfloat16>(wp, batch, max_query_len, stream);
  else
    launch<__half>(wp, batch, max_query_len, stream);
}

}  // namespace pdcli
