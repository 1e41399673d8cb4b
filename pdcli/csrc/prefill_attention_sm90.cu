// Varlen paged causal prefill attention on Hopper tensor cores (wgmma, sm_90a), head_dim 128.
//
// One CTA = (one q head, one sequence, one tile of 128 new query rows): 2 warpgroups of 64 rows. Per K/V tile
// of 128 keys: S = Q K^T by wgmma (Q and K K-major in shared memory), causal mask and online softmax in the
// exp2 domain on the accumulators (mma.sync's C layout per warp, as prefill_attention.cu), O += P V by wgmma
// with P from registers and V N-major in shared memory. K/V rows are gathered through the block table with
// 16-byte cp.async by every thread into a 2-stage ring: tile n+1 loads while tile n computes. Every tile is two
// [rows][64 columns] halves in wgmma's 128-byte swizzle (wgmma.cuh).
#include <c10/cuda/CUDAException.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#include <cstdio>
#include <cstdlib>

#include "mma.cuh"
#include "prefill_params.cuh"
#include "wgmma.cuh"
#include "wgmma_softmax.cuh"

namespace {

using namespace pdcli;

constexpr int kD = 128;        // head dim
constexpr int kBM = 128;       // query rows per CTA: 2 warpgroups x 64
constexpr int kBN = 128;       // keys per K/V tile
constexpr int kThreads = 256;  // 8 warps; warp w owns query rows [16w, 16w + 16)
constexpr int kTileBytes = 128 * kD * 2;  // a [128 rows][128 columns] tile: two halves of 128 rows x 128 bytes
constexpr int kHalfBytes = kTileBytes / 2;
constexpr int kSmemBytes = 1024 + 5 * kTileBytes + 2 * kBN * 4;  // alignment slack, Q, 2 x (K, V), 2 x slots
static_assert(kBM == 128 && kBN == 128, "tiles of 128 rows: the halves' layout and the loads assume it");

struct Sm90Params {
  PrefillParams p;
  // descriptor strides in bytes (defaults: the 128-byte swizzled halves; PDCLI_WGMMA_DESC overrides them for
  // bring-up on a new toolkit or GPU): K-major 8-row step, V's next-64-columns step, V's 8-key step
  uint32_t k_sbo, v_lbo, v_sbo;
};


template <typename T>
__global__ void __launch_bounds__(kThreads, 1) prefill_attention_sm90_kernel(const Sm90Params sp) {
#ifdef PDCLI_HAS_WGMMA
  const PrefillParams& p = sp.p;
  extern __shared__ unsigned char smem_raw[];
  const uint32_t raw_u = smem_u32(smem_raw);
  const uint32_t pad = ((raw_u + 1023) & ~1023u) - raw_u;  // swizzle atoms must be 1024-byte aligned
  const uint32_t sQ = raw_u + pad;
  auto sK = [&](int stage) { return sQ + (1 + 2 * stage) * kTileBytes; };
  auto sV = [&](int stage) { return sQ + (2 + 2 * stage) * kTileBytes; };
  int* sSlot = reinterpret_cast<int*>(smem_raw + pad + 5 * kTileBytes);  // [2][kBN]

  const int head = blockIdx.x;
  const int b = blockIdx.y;
  PrefillTile tile;
  if (!prefill_tile(p, b, gridDim.z - 1 - blockIdx.z, kBM, kBN, tile)) return;
  const int q_begin = tile.q_begin, m0 = tile.m0, ctx_off = tile.ctx_off, rows_here = tile.rows;
  const int key_end = tile.key_end, n_tiles = tile.n_tiles, n_unmasked = tile.n_unmasked;
  const int kv_head = head / p.group;

  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;
  const int wg = warp >> 2;
  const int warp_row0 = warp * 16;

  // ---- loads: thread tid moves 16-byte chunk c = tid % 16 of rows r0 + 16 j (j < 8); all its rows share
  //      r & 7, so its shared-memory destinations are one offset plus j * 2048 ----
  const int c = tid & 15;
  const int r0 = tid >> 4;
  const uint32_t dst0 = sw128_tile_off(r0, c, kHalfBytes);
  {
    const int64_t q_row_stride = (int64_t)p.num_heads * kD;
    const T* q_base = reinterpret_cast<const T*>(p.q) + ((int64_t)(q_begin + m0) * p.num_heads + head) * kD + c * 8;
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      const int row = r0 + 16 * j;
      const bool valid = row < rows_here;
      cp_async_16(sQ + dst0 + j * 2048, valid ? q_base + row * q_row_stride : reinterpret_cast<const T*>(p.q),
                  valid);
    }
  }
  const int* table = p.block_tables + (int64_t)b * p.table_width;
  const int block_mask = (1 << p.block_shift) - 1;
  const int64_t kv_slot_stride = (int64_t)p.num_kv_heads * kD;
  const T* k_head = reinterpret_cast<const T*>(p.k_cache) + (int64_t)kv_head * kD + c * 8;
  const T* v_head = reinterpret_cast<const T*>(p.v_cache) + (int64_t)kv_head * kD + c * 8;
  auto slot_of = [&](int tile) {  // slot of key tile * kBN + tid (threads < kBN); -1 past key_end
    const int key = tile * kBN + tid;
    return key < key_end ? (__ldg(table + (key >> p.block_shift)) << p.block_shift) + (key & block_mask) : -1;
  };
  auto issue_kv = [&](int tile, int stage) {
    const int* slots = sSlot + (tile & 1) * kBN;
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      const int slot = slots[r0 + 16 * j];
      const bool valid = slot >= 0;
      const int64_t off = valid ? slot * kv_slot_stride : 0;
      cp_async_16(sK(stage) + dst0 + j * 2048, k_head + off, valid);
      cp_async_16(sV(stage) + dst0 + j * 2048, v_head + off, valid);
    }
  };

  if (tid < kBN) {
    sSlot[tid] = slot_of(0);
    sSlot[kBN + tid] = slot_of(1);
  }
  __syncthreads();
  if (n_tiles > 0) issue_kv(0, 0);
  cp_async_commit();  // group: Q + tile 0

  float o[64];  // O accumulator (wgmma_softmax.cuh's layout), S the same over keys
  float s[64];
#pragma unroll
  for (int i = 0; i < 64; ++i) o[i] = s[i] = 0.f;
  SoftmaxState st;
  softmax_init(st);

  for (int n = 0; n < n_tiles; ++n) {
    const int slot_ahead = tid < kBN ? slot_of(n + 2) : 0;
    if (n + 1 < n_tiles) issue_kv(n + 1, (n + 1) & 1);
    cp_async_commit();
    cp_async_wait<1>();  // Q and tile n have landed (this thread's copies)
    fence_proxy_async_shared();
    __syncthreads();
    const int stage = n & 1;

    // ---- S = Q K^T (this warpgroup's 64 rows x 128 keys), mask, softmax, O += P V ----
    issue_qk<T>(s, sQ + wg * 64 * 128, sK(stage), kHalfBytes, sp.k_sbo);
    wait_acc(s);
    if (n >= n_unmasked) mask_causal(s, ctx_off + m0 + warp_row0 + (lane >> 2) - n * kBN - (lane & 3) * 2);
    softmax_tile(s, o, st, p.scale_log2);
    uint32_t pa[kBN / 16][4];
    pack_p<T>(s, pa, o);
    issue_pv<T>(o, pa, sV(stage), sp.v_lbo, sp.v_sbo);
    wait_acc(o);

    if (tid < kBN) sSlot[(n & 1) * kBN + tid] = slot_ahead;  // its last reader, issue_kv(n), is done
    __syncthreads();  // every warpgroup is done with stage n & 1 before it is refilled
  }
  cp_async_wait<0>();
  store_o<T>(o, st, reinterpret_cast<T*>(p.out) + ((int64_t)(q_begin + m0) * p.num_heads + head) * kD,
             (int64_t)p.num_heads * kD, warp_row0, rows_here, lane);
#endif
}

}  // namespace

namespace pdcli {

uint32_t wgmma_desc_override(int i, uint32_t fallback) {  // PDCLI_WGMMA_DESC="k_sbo,v_lbo,v_sbo" (bytes)
  const char* env = std::getenv("PDCLI_WGMMA_DESC");
  unsigned v[3];
  if (env && std::sscanf(env, "%u,%u,%u", &v[0], &v[1], &v[2]) == 3) return v[i];
  return fallback;
}

}  // namespace pdcli

namespace {

template <typename T>
void launch(const Sm90Params& sp, int batch, int max_query_len, cudaStream_t stream) {
  auto kernel = prefill_attention_sm90_kernel<T>;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmemBytes));
  const dim3 grid(sp.p.num_heads, batch, (max_query_len + kBM - 1) / kBM);
  kernel<<<grid, kThreads, kSmemBytes, stream>>>(sp);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

namespace pdcli {

// build.py defines PDCLI_SM90A when it builds for sm_90a.
bool prefill_attention_sm90_available(int head_dim) {
#ifdef PDCLI_SM90A
  return head_dim == kD;
#else
  (void)head_dim;
  return false;
#endif
}

// Inputs are validated by the caller (bindings.cpp), availability included.
void launch_prefill_attention_sm90(const PrefillParams& p, int batch, int max_query_len, bool bf16,
                                   cudaStream_t stream) {
  Sm90Params sp;
  sp.p = p;
  sp.k_sbo = wgmma_desc_override(0, 1024);
  sp.v_lbo = wgmma_desc_override(1, kHalfBytes);
  sp.v_sbo = wgmma_desc_override(2, 1024);
  if (bf16)
    launch<__nv_bfloat16>(sp, batch, max_query_len, stream);
  else
    launch<__half>(sp, batch, max_query_len, stream);
}

}  // namespace pdcli
