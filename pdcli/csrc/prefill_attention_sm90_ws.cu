// Varlen paged causal prefill attention on Hopper, warp-specialised (FA3's design with a cp.async producer;
// sm_90a, head_dim 128). One CTA = (one q head, one sequence, one tile of 128 new query rows), 3 warpgroups:
// warpgroup 0 loads (Q once, then K/V tiles gathered through the block table into a 2-stage ring; a stage is
// signalled full on an mbarrier once its copies landed), warpgroups 1 and 2 each compute 64 rows as
// prefill_attention_sm90.cu does (S = Q K^T, mask, online softmax, O += P V by wgmma) and release the stage on
// an mbarrier. The two compute warpgroups take turns issuing their GEMMs (two named barriers), so one's softmax
// runs while the other's GEMMs hold the tensor cores (pingpong); setmaxnreg moves registers from the loader to
// them. Same tile layout and descriptor strides (PDCLI_WGMMA_DESC) as the other wgmma kernel.
// kTma: the loader's first warp fills a 3-stage ring by TMA instead (box j from lane j mod 32, so their issue
// overlaps), boxes of min(block_size, 128) cache rows x 64 values (two per row of 128) through 2-D tensor maps over
// the caches [slots, Hk * D] with the 128-byte swizzle the tiles use; K and V land on mbarriers of their own that
// count the bytes, and K is released once both QK GEMMs are done. A box past the sequence's keys reads its first
// block instead (causally masked; the pool's unwritten rows are zeros, so nothing loaded is NaN).
// kOverlap (TMA with boxes of 64+ rows): FA3's intra-warpgroup overlap on top of the pingpong. With 16-row boxes
// (32 a tile) the loads bound it and the plain pingpong is faster (results/kernel_experiments/prefill_tma/).
#include <c10/cuda/CUDAException.h>
#include <cuda.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#include <algorithm>
#include <string>

#include "mma.cuh"
#include "prefill_params.cuh"
#include "wgmma.cuh"
#include "wgmma_softmax.cuh"
#include "wgmma_ws_turns.cuh"

namespace {

using namespace pdcli;

constexpr int kD = 128;        // head dim
constexpr int kBM = 128;       // query rows per CTA: 2 compute warpgroups x 64
constexpr int kBN = 128;       // keys per K/V tile
constexpr int kThreads = 384;  // warpgroup 0 loads, 1 and 2 compute
constexpr int kTileBytes = WsRing<2>::kTileBytes;
constexpr int kHalfBytes = WsRing<2>::kHalfBytes;
// Ring stages: 2 with cp.async (its 128 loaders keep one tile in flight), 3 with TMA (227 KB of the 228).
template <bool kTma>
constexpr int stages() { return kTma ? 3 : 2; }
template <bool kTma>
constexpr int smem_bytes() { return 1024 + WsRing<stages<kTma>()>::kBytes; }  // alignment slack, the ring
static_assert(kBM == 128 && kBN == 128, "tiles of 128 rows: the halves' layout and the loads assume it");

struct WsParams {
  PrefillParams p;
  uint32_t k_sbo, v_lbo, v_sbo;  // descriptor strides, bytes (prefill_attention_sm90.cu)
  CUtensorMap tmap_k, tmap_v;    // kTma: the caches as [slots, Hk * D], boxes of box_rows x 64
  int box_rows;
};

#ifdef PDCLI_HAS_WGMMA
__device__ __forceinline__ void mbar_arrive_expect_tx(uint32_t bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes) : "memory");
}

// Box (c0: value, c1: row) of the map into shared memory at dst; its bytes count on mbarrier bar.
__device__ __forceinline__ void tma_load_2d(uint32_t dst, const CUtensorMap* map, int c0, int c1, uint32_t bar) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3}], [%4];\n"
      ::"r"(dst), "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1), "r"(bar) : "memory");
}
#endif

template <typename T, bool kTma, bool kOverlap>
__global__ void __launch_bounds__(kThreads, 1) prefill_attention_ws_kernel(const __grid_constant__ WsParams wp) {
#ifdef PDCLI_HAS_WGMMA
  const PrefillParams& p = wp.p;
  extern __shared__ unsigned char smem_raw[];
  constexpr int S = stages<kTma>();
  const WsRing<S> ring{(smem_u32(smem_raw) + 1023) & ~1023u};  // swizzle atoms are 1024-byte aligned

  const int head = blockIdx.x;
  const int b = blockIdx.y;
  PrefillTile tile;  // n_tiles >= 1: the tile has a row
  if (!prefill_tile(p, b, gridDim.z - 1 - blockIdx.z, kBM, kBN, tile)) return;
  const int q_begin = tile.q_begin, m0 = tile.m0, ctx_off = tile.ctx_off, rows_here = tile.rows;
  const int key_end = tile.key_end, n_tiles = tile.n_tiles, n_unmasked = tile.n_unmasked;

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, wg = warp >> 2;
  if (tid == 0) {
    for (int st = 0; st < S; ++st) {
      mbar_init(ring.full(st), kTma ? 1 : 128);  // TMA: the loader warp lane 0's expect_tx, then the bytes
      mbar_init(ring.empty(st), 256);
      mbar_init(ring.full_v(st), 1);
      mbar_init(ring.empty_v(st), 256);
    }
    mbar_init(ring.q_full(), 128);
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
        cp_async_16(ring.q + dst0 + j * 1024, valid ? q_base + row * q_row_stride : reinterpret_cast<const T*>(p.q),
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
      const int stage = tile & 1;
#pragma unroll 4
      for (int j = 0; j < 16; ++j) {
        const int key = tile * kBN + r0 + 8 * j;
        const bool valid = key < key_end;
        const int64_t off =
            valid ? (int64_t)((__ldg(table + (key >> p.block_shift)) << p.block_shift) + (key & block_mask)) *
                        kv_slot_stride
                  : 0;
        cp_async_16(ring.k(stage) + dst0 + j * 1024, k_head + off, valid);
        cp_async_16(ring.v(stage) + dst0 + j * 1024, v_head + off, valid);
      }
    };
    if constexpr (kTma) {
      cp_async_commit();
      cp_async_wait<0>();  // Q
      fence_proxy_async_shared();
      mbar_arrive(ring.q_full());
      if (warp == 0) {  // box j of a tile (K / V, half, rows) from lane j, j + 32, ...: their issue overlaps
        const int rows = wp.box_rows, n_boxes = 4 * (kBN / rows);
        int blocks[kBN / 8 / 8];  // lane's boxes' blocks for the next tile, read while the stage is still busy
        auto read_blocks = [&](int n) {
#pragma unroll
          for (int i = 0; i < kBN / 8 / 8; ++i) {
            const int box = lane + 32 * i, key = n * kBN + (box >> 2) * rows;
            if (box < n_boxes) blocks[i] = __ldg(table + (key < key_end ? key >> p.block_shift : 0));
          }
        };
        // boxes j with (j & 1) == v: K's (v 0) or V's (v 1)
        auto issue = [&](int n, int stage, int v, uint32_t bar) {
#pragma unroll
          for (int i = 0; i < kBN / 8 / 8; ++i) {
            const int box = lane + 32 * i;
            if (box >= n_boxes) break;
            if ((box & 1) != v) continue;
            const int r = (box >> 2) * rows, h = (box >> 1) & 1;
            const int slot = (blocks[i] << p.block_shift) + ((n * kBN + r) & block_mask);
            const uint32_t off = h * kHalfBytes + r * 128;
            if (box & 1) tma_load_2d(ring.v(stage) + off, &wp.tmap_v, kv_head * kD + h * 64, slot, bar);
            else tma_load_2d(ring.k(stage) + off, &wp.tmap_k, kv_head * kD + h * 64, slot, bar);
          }
        };
        read_blocks(0);
        for (int n = 0; n < n_tiles; ++n) {
          const int stage = n % S, parity = ((n / S) & 1) ^ 1;
          mbar_wait(ring.empty(stage), parity);  // both computers are done with tile n - S's K
          if (lane == 0) mbar_arrive_expect_tx(ring.full(stage), kTileBytes);
          __syncwarp();
          issue(n, stage, 0, ring.full(stage));
          mbar_wait(ring.empty_v(stage), parity);
          if (lane == 0) mbar_arrive_expect_tx(ring.full_v(stage), kTileBytes);
          __syncwarp();
          issue(n, stage, 1, ring.full_v(stage));
          if (n + 1 < n_tiles) read_blocks(n + 1);
        }
      }
    } else {
    load_kv(0);
    cp_async_commit();  // Q + tile 0
    for (int n = 0; n < n_tiles; ++n) {
      cp_async_wait<0>();  // tile n (and, first, Q): this thread's copies landed
      fence_proxy_async_shared();
      if (n == 0) mbar_arrive(ring.q_full());
      mbar_arrive(ring.full(n & 1));
      if (n + 1 < n_tiles) {  // tile n + 1 into the stage of tile n - 1, once both computers released it
        mbar_wait(ring.empty((n + 1) & 1), (((n + 1) >> 1) & 1) ^ 1);
        load_kv(n + 1);
        cp_async_commit();
      }
    }
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
    mbar_wait(ring.q_full(), 0);
    const WsTurns turns{cw, n_tiles, n_unmasked, ctx_off + m0 + warp_row0 + (lane >> 2) - (lane & 3) * 2,
                        p.scale_log2, wp.k_sbo, wp.v_lbo, wp.v_sbo};
    if constexpr (kOverlap) overlapped_turns<T>(ring, turns, o, s, st);
    else pingpong_turns<T, S, kTma>(ring, turns, o, s, st);
    store_o<T>(o, st, reinterpret_cast<T*>(p.out) + ((int64_t)(q_begin + m0) * p.num_heads + head) * kD,
               (int64_t)p.num_heads * kD, warp_row0, rows_here, lane);
  }
#endif
}

// A 2-D tensor map over a cache [slots, Hk * D] (row stride Hk * D values), boxes of box_rows x 64 values,
// 128-byte swizzle. cuTensorMapEncodeTiled comes from the driver through the runtime (no libcuda link).
CUtensorMap cache_map(const void* base, int64_t slots, int64_t row_values, int box_rows, bool bf16) {
  using Encode = CUresult (*)(CUtensorMap*, CUtensorMapDataType, cuuint32_t, void*, const cuuint64_t*,
                              const cuuint64_t*, const cuuint32_t*, const cuuint32_t*, CUtensorMapInterleave,
                              CUtensorMapSwizzle, CUtensorMapL2promotion, CUtensorMapFloatOOBfill);
  static Encode encode = [] {
    void* fn = nullptr;
    cudaDriverEntryPointQueryResult found;
#if CUDART_VERSION >= 12050
    C10_CUDA_CHECK(cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &fn, 12000, cudaEnableDefault, &found));
#else
    C10_CUDA_CHECK(cudaGetDriverEntryPoint("cuTensorMapEncodeTiled", &fn, cudaEnableDefault, &found));
#endif
    TORCH_CHECK(fn != nullptr && found == cudaDriverEntryPointSuccess, "cuTensorMapEncodeTiled is not available");
    return reinterpret_cast<Encode>(fn);
  }();
  CUtensorMap map;
  const cuuint64_t dims[2] = {cuuint64_t(row_values), cuuint64_t(slots)};
  const cuuint64_t strides[1] = {cuuint64_t(row_values) * 2};
  const cuuint32_t box[2] = {64, cuuint32_t(box_rows)};
  const cuuint32_t elem_strides[2] = {1, 1};
  const CUresult r = encode(&map, bf16 ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 : CU_TENSOR_MAP_DATA_TYPE_FLOAT16, 2,
                            const_cast<void*>(base), dims, strides, box, elem_strides, CU_TENSOR_MAP_INTERLEAVE_NONE,
                            CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                            CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  TORCH_CHECK(r == CUDA_SUCCESS, "cuTensorMapEncodeTiled failed: ", std::to_string(int(r)));
  return map;
}

template <typename T, bool kTma>
void launch(const WsParams& wp, int batch, int max_query_len, cudaStream_t stream) {
  auto kernel = !kTma ? prefill_attention_ws_kernel<T, false, false>
                : wp.box_rows >= 64 ? prefill_attention_ws_kernel<T, true, true>
                                    : prefill_attention_ws_kernel<T, true, false>;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_bytes<kTma>()));
  const dim3 grid(wp.p.num_heads, batch, (max_query_len + kBM - 1) / kBM);
  kernel<<<grid, kThreads, smem_bytes<kTma>(), stream>>>(wp);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

namespace pdcli {

// Inputs are validated by the caller (bindings.cpp), prefill_attention_sm90_available included.
void launch_prefill_attention_sm90_ws(const PrefillParams& p, int batch, int max_query_len, bool bf16, bool tma,
                                      int block_size, cudaStream_t stream) {
  WsParams wp{};
  wp.p = p;
  wp.k_sbo = wgmma_desc_override(0, 1024);
  wp.v_lbo = wgmma_desc_override(1, kHalfBytes);
  wp.v_sbo = wgmma_desc_override(2, 1024);
  if (tma) {
    wp.box_rows = std::min(block_size, kBN);
    const int64_t row_values = int64_t(p.num_kv_heads) * kD;
    wp.tmap_k = cache_map(p.k_cache, p.kv_slots, row_values, wp.box_rows, bf16);
    wp.tmap_v = cache_map(p.v_cache, p.kv_slots, row_values, wp.box_rows, bf16);
    if (bf16) launch<__nv_bfloat16, true>(wp, batch, max_query_len, stream);
    else launch<__half, true>(wp, batch, max_query_len, stream);
  } else if (bf16) {
    launch<__nv_bfloat16, false>(wp, batch, max_query_len, stream);
  } else {
    launch<__half, false>(wp, batch, max_query_len, stream);
  }
}

}  // namespace pdcli
