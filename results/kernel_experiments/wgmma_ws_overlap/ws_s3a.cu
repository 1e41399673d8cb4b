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
constexpr int kStages = 3;
constexpr int kSmemBytes = 1024 + (1 + 2 * kStages) * kTileBytes + 8 * (2 * kStages + 1);
static_assert(kBM == 128 && kBN == 128, "tiles of 128 rows: the halves' layout and the loads assume it");

struct WsParams {
  PrefillParams p;
  uint32_t k_sbo, v_lbo, v_sbo;  // descriptor strides, bytes (prefill_attention_sm90.cu)
};

template <typename T>
__global__ void __launch_bounds__(kThreads, 1) prefill_attention_ws_kernel(const WsParams wp) {
#ifdef PDCLI_HAS_WGMMA
  const PrefillParams& p = wp.p;
  extern __shared__ unsigned char smem_raw[];
  const uint32_t sQ = (smem_u32(smem_raw) + 1023) & ~1023u;  // swizzle atoms are 1024-byte aligned
  auto sK = [&](int stage) { return sQ + (1 + 2 * stage) * kTileBytes; };
  auto sV = [&](int stage) { return sQ + (2 + 2 * stage) * kTileBytes; };
  const uint32_t bars = sQ + (1 + 2 * kStages) * kTileBytes;
  auto full = [&](int stage) { return bars + 8 * stage; };
  auto empty = [&](int stage) { return bars + 8 * (kStages + stage); };
  const uint32_t q_full = bars + 16 * kStages;

  const int head = blockIdx.x;
  const int b = blockIdx.y;
  PrefillTile tile;  // n_tiles >= 1: the tile has a row
  if (!prefill_tile(p, b, gridDim.z - 1 - blockIdx.z, kBM, kBN, tile)) return;
  const int q_begin = tile.q_begin, m0 = tile.m0, ctx_off = tile.ctx_off, rows_here = tile.rows;
  const int key_end = tile.key_end, n_tiles = tile.n_tiles, n_unmasked = tile.n_unmasked;

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, wg = warp >> 2;
  if (tid == 0) {
    for (int st = 0; st < kStages; ++st) {
      mbar_init(full(st), 128);
      mbar_init(empty(st), 256);
    }
    mbar_init(q_full, 128);
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  }
  __syncthreads();

  if (wg == 0) {
    // ---- loader: chunk c of rows r0 + 8 j (j < 16; all with r & 7 == r0): one offset plus j * 1024 ----
    asm volatile("setmaxnreg.dec.sync.aligned.u32 40;\n" ::: "memory");
    const int c = tid & 15, r0 = tid >> 4;
    const uint32_t dst0 = sw128_tile_off(r0, c, kHalfBytes);
    {
      const int64_t q_row_stride = (int64_t)p.num_heads * kD;
      const T* q_base = reinterpret_cast<const T*>(p.q) + ((int64_t)(q_begin + m0) * p.num_heads + head) * kD + c * 8;
#pragma unroll
      for (int j = 0; j < 16; ++j) {
        const int row = r0 + 8 * j;
        const bool valid = row < rows_here;
        cp_async_16(sQ + dst0 + j * 1024, valid ? q_base + row * q_row_stride : reinterpret_cast<const T*>(p.q),
                    valid);
      }
    }
    const int* table = p.block_tables + (int64_t)b * p.table_width;
    const int block_mask = (1 << p.block_shift) - 1;
    const int64_t kv_slot_stride = (int64_t)p.num_kv_heads * kD;
    const int kv_head = head / p.group;
    const T* k_head = reinterpret_cast<const T*>(p.k_cache) + (int64_t)kv_head * kD + c * 8;
    const T* v_head = reinterpret_cast<const T*>(p.v_cache) + (int64_t)kv_head * kD + c * 8;
    auto load_kv = [&](int tile) {  // keys past key_end are zero-filled
      const int stage = tile % kStages;
#pragma unroll 4
      for (int j = 0; j < 16; ++j) {
        const int key = tile * kBN + r0 + 8 * j;
        const bool valid = key < key_end;
        const int64_t off =
            valid ? (int64_t)((__ldg(table + (key >> p.block_shift)) << p.block_shift) + (key & block_mask)) *
                        kv_slot_stride
                  : 0;
        cp_async_16(sK(stage) + dst0 + j * 1024, k_head + off, valid);
        cp_async_16(sV(stage) + dst0 + j * 1024, v_head + off, valid);
      }
    };
    load_kv(0);
    cp_async_commit();  // Q + tile 0
    for (int n = 0; n < n_tiles; ++n) {
      if (n + 1 < n_tiles) {  // tile t = n + 1 issued before tile n is signalled: two tiles in flight
        const int t = n + 1;
        mbar_wait(empty(t % kStages), ((t / kStages) & 1) ^ 1);
        load_kv(t);
        cp_async_commit();
        cp_async_wait<1>();  // tile n (and, first, Q) landed; tile n + 1 may still be in flight
      } else {
        cp_async_wait<0>();
      }
      fence_proxy_async_shared();
      if (n == 0) mbar_arrive(q_full);
      mbar_arrive(full(n % kStages));
    }
  } else {
    // ---- compute warpgroup cw: rows [64 cw, 64 cw + 64) of the tile; turn barriers 1 (cw 0) and 2 (cw 1) ----
    asm volatile("setmaxnreg.inc.sync.aligned.u32 232;\n" ::: "memory");
    const int cw = wg - 1;
    const int warp_row0 = (warp - 4) * 16;
    float o[64], s[64];
#pragma unroll
    for (int i = 0; i < 64; ++i) o[i] = s[i] = 0.f;
    SoftmaxState st;
    softmax_init(st);
    if (cw == 1) named_arrive(1);  // compute warpgroup 0 issues first
    mbar_wait(q_full, 0);
    for (int n = 0; n < n_tiles; ++n) {
      const int stage = n % kStages;
      mbar_wait(full(stage), (n / kStages) & 1);
      named_sync(1 + cw);  // my turn for the tensor cores
      issue_qk<T>(s, sQ + cw * 64 * 128, sK(stage), kHalfBytes, wp.k_sbo);
      named_arrive(1 + (cw ^ 1));  // the other's turn
      wait_acc(s);
      if (n >= n_unmasked) mask_causal(s, ctx_off + m0 + warp_row0 + (lane >> 2) - n * kBN - (lane & 3) * 2);
      softmax_tile(s, o, st, p.scale_log2);
      uint32_t pa[kBN / 16][4];
      pack_p<T>(s, pa, o);
      named_sync(1 + cw);
      issue_pv<T>(o, pa, sV(stage), wp.v_lbo, wp.v_sbo);
      if (cw == 0 || n + 1 < n_tiles) named_arrive(1 + (cw ^ 1));  // warpgroup 1's last turn goes to no one
      wait_acc(o);
      mbar_arrive(empty(stage));
    }
    store_o<T>(o, st, reinterpret_cast<T*>(p.out) + ((int64_t)(q_begin + m0) * p.num_heads + head) * kD,
               (int64_t)p.num_heads * kD, warp_row0, rows_here, lane);
  }
#endif
}

template <typename T>
void launch(const WsParams& wp, int batch, int max_query_len, cudaStream_t stream) {
  auto kernel = prefill_attention_ws_kernel<T>;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmemBytes));
  const dim3 grid(wp.p.num_heads, batch, (max_query_len + kBM - 1) / kBM);
  kernel<<<grid, kThreads, kSmemBytes, stream>>>(wp);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

namespace pdcli {

// Inputs are validated by the caller (bindings.cpp), prefill_attention_sm90_available included.
void launch_ws_s3a(const PrefillParams& p, int batch, int max_query_len, bool bf16,
                                      cudaStream_t stream) {
  const WsParams wp{p, wgmma_desc_override(0, 1024), wgmma_desc_override(1, kHalfBytes), wgmma_desc_override(2, 1024)};
  if (bf16)
    launch<__nv_bfloat16>(wp, batch, max_query_len, stream);
  else
    launch<__half>(wp, batch, max_query_len, stream);
}

}  // namespace pdcli
