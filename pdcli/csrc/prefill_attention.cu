// Varlen paged causal prefill attention (FlashAttention-2 style, sm_80 instructions only).
//
// One CTA = (one q head, one sequence, one tile of kBlockM new query rows). Each warp owns
// kBlockM / kWarps query rows (kMTiles m16 tiles). Per K/V tile of kBlockN keys:
//   S = Q K^T (mma.sync m16n8k16, fp32 accumulators, Q and K via ldmatrix from shared memory),
//   online softmax in the exp2 domain, O += P V (P re-packed from the S accumulators as the A
//   operand, V via ldmatrix.trans). K/V rows are gathered through the block table with 16-byte
//   cp.async into a 2-stage (double-buffered) shared-memory ring: tile n+1 loads while tile n computes.
// Shared memory rows are 16-byte chunks XOR-swizzled by (row & 7): ldmatrix and the cp.async
// writes are bank-conflict free.
#include <c10/cuda/CUDAException.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#include <cstdlib>
#include <string>
#include <type_traits>

#include "mma.cuh"
#include "prefill_params.cuh"

namespace {

using namespace pdcli;

template <int kHeadDim_, int kBlockM_, int kBlockN_, int kWarps_>
struct Traits {
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kBlockM = kBlockM_;  // query rows per CTA
  static constexpr int kBlockN = kBlockN_;  // keys per K/V tile
  static constexpr int kWarps = kWarps_;
  static constexpr int kThreads = kWarps * 32;
  static constexpr int kRowsPerWarp = kBlockM / kWarps;
  static constexpr int kMTiles = kRowsPerWarp / 16;  // m16 tiles per warp
  static constexpr int kNTiles = kBlockN / 8;        // n8 tiles of S per warp
  static constexpr int kDTiles = kHeadDim / 8;       // n8 tiles of O per warp
  static constexpr int kChunks = kHeadDim / 8;       // 16-byte chunks per row
  static constexpr int kRowsPerPass = kThreads / kChunks;  // rows one cp.async sweep of the CTA covers
  static constexpr int kQPasses = kBlockM / kRowsPerPass;
  // K/V: 8 adjacent threads share a row, thread t taking chunks (t % 8) + 8h; rows t / 8 + j * kKVRowStep
  static constexpr int kKVRowStep = kThreads / 8;
  static constexpr int kKVRowPasses = kBlockN / kKVRowStep;
  static constexpr int kKVChunkHi = kChunks / 8;
  static constexpr int kSmemQ = kBlockM * kHeadDim;   // elements
  static constexpr int kSmemKV = kBlockN * kHeadDim;  // elements per K (or V) stage
  static constexpr int kSmemBytes = (kSmemQ + 4 * kSmemKV) * 2 + 2 * kBlockN * 4;  // Q, 2 x (K, V), 2 x slots
  static_assert(kRowsPerWarp % 16 == 0 && kBlockN % 16 == 0 && kHeadDim % 16 == 0, "tile shape");
  static_assert(kChunks >= 8, "the (row & 7) swizzle needs >= 8 chunks per row");
  static_assert(kThreads % kChunks == 0 && kBlockM % kRowsPerPass == 0, "Q loads");
  static_assert(kKVRowStep % 8 == 0 && kBlockN % kKVRowStep == 0 && kThreads >= kBlockN, "K/V loads");
};

template <typename T, typename Tr>
__global__ void __launch_bounds__(Tr::kThreads, 2) prefill_attention_kernel(const PrefillParams p) {
  constexpr int D = Tr::kHeadDim, BM = Tr::kBlockM, BN = Tr::kBlockN, kChunks = Tr::kChunks;
  constexpr int MT = Tr::kMTiles, NT = Tr::kNTiles, DT = Tr::kDTiles;
  extern __shared__ __align__(128) unsigned char smem[];
  T* sQ = reinterpret_cast<T*>(smem);  // [BM, D]; reused to stage O
  const uint32_t sQ_u = smem_u32(sQ);
  const uint32_t sK_u = sQ_u + Tr::kSmemQ * 2;      // [2][BN, D]
  const uint32_t sV_u = sK_u + 2 * Tr::kSmemKV * 2;  // [2][BN, D]
  int* sSlot = reinterpret_cast<int*>(smem + (Tr::kSmemQ + 4 * Tr::kSmemKV) * 2);  // [2][BN], see below

  const int head = blockIdx.x;
  const int b = blockIdx.y;
  PrefillTile tile;
  if (!prefill_tile(p, b, gridDim.z - 1 - blockIdx.z, BM, BN, tile)) return;
  const int q_begin = tile.q_begin, m0 = tile.m0, ctx_off = tile.ctx_off, rows_here = tile.rows;
  const int key_end = tile.key_end, n_tiles = tile.n_tiles, n_unmasked = tile.n_unmasked;
  const int kv_head = head / p.group;

  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;
  const int warp_row0 = warp * Tr::kRowsPerWarp;  // first row of this warp within the tile

  // ---- Q tile: rows past q_len are zero-filled ----
  const int64_t q_row_stride = (int64_t)p.num_heads * D;  // elements between consecutive tokens
  const int q_chunk = tid % kChunks;
  const int q_row0 = tid / kChunks;
  {
    const T* q_base = reinterpret_cast<const T*>(p.q) + ((int64_t)(q_begin + m0) * p.num_heads + head) * D;
#pragma unroll
    for (int i = 0; i < Tr::kQPasses; ++i) {
      const int row = q_row0 + i * Tr::kRowsPerPass;
      const bool valid = row < rows_here;
      const T* src = valid ? q_base + row * q_row_stride + q_chunk * 8 : reinterpret_cast<const T*>(p.q);
      cp_async_16(sQ_u + swz<kChunks>(row, q_chunk) * 2, src, valid);
    }
  }

  // ---- K/V gather. Key j of this kv head is D contiguous elements at slot * Hk * D + kv_head * D, where
  //      slot = block_tables[b][j / block_size] * block_size + j % block_size. Tile t's slots (-1: key >= key_end,
  //      zero-filled) sit in sSlot[t & 1]; threads < BN write them one tile ahead of their use.
  //      Thread tid loads rows kv_row + j * kKVRowStep (all with the same row & 7), chunks c_lo + 8h: its
  //      shared-memory destinations are one base plus immediates; 8 lanes read one 128-byte row segment. ----
  const int* table = p.block_tables + (int64_t)b * p.table_width;
  const int block_mask = (1 << p.block_shift) - 1;
  const int64_t kv_slot_stride = (int64_t)p.num_kv_heads * D;
  const int kv_row = tid >> 3;
  const int c_lo = tid & 7;
  const T* k_head = reinterpret_cast<const T*>(p.k_cache) + (int64_t)kv_head * D + c_lo * 8;
  const T* v_head = reinterpret_cast<const T*>(p.v_cache) + (int64_t)kv_head * D + c_lo * 8;
  const uint32_t kv_dst = (kv_row * D + ((c_lo ^ (kv_row & 7)) << 3)) * 2;  // bytes, within one stage

  auto slot_of = [&](int tile) {  // slot of key tile * BN + tid (threads < BN)
    const int key = tile * BN + tid;
    return key < key_end ? (__ldg(table + (key >> p.block_shift)) << p.block_shift) + (key & block_mask) : -1;
  };
  auto issue_kv = [&](int tile, int stage) {
    const int* slots = sSlot + (tile & 1) * BN;
#pragma unroll
    for (int j = 0; j < Tr::kKVRowPasses; ++j) {
      const int slot = slots[kv_row + j * Tr::kKVRowStep];
      const bool valid = slot >= 0;
      const int64_t off = valid ? slot * kv_slot_stride : 0;
      const uint32_t dst = stage * Tr::kSmemKV * 2 + kv_dst + j * Tr::kKVRowStep * D * 2;
#pragma unroll
      for (int h = 0; h < Tr::kKVChunkHi; ++h) {
        cp_async_16(sK_u + dst + h * 128, k_head + off + h * 64, valid);
        cp_async_16(sV_u + dst + h * 128, v_head + off + h * 64, valid);
      }
    }
  };

  if (tid < BN) {
    sSlot[tid] = slot_of(0);
    sSlot[BN + tid] = slot_of(1);
  }
  __syncthreads();
  if (n_tiles > 0) issue_kv(0, 0);
  cp_async_commit();  // group: Q + tile 0

  float o[MT][DT][4];  // O accumulator: rows (lane/4, +8) x cols (dt*8 + (lane%4)*2, +1) of each m16 tile
  float row_max[MT][2];  // running max of raw scores for rows lane/4 and lane/4 + 8
  float row_sum[MT][2];  // this thread's partial sum of exp2 (quad-reduced at the end)
#pragma unroll
  for (int mi = 0; mi < MT; ++mi) {
#pragma unroll
    for (int dt = 0; dt < DT; ++dt)
#pragma unroll
      for (int e = 0; e < 4; ++e) o[mi][dt][e] = 0.f;
    row_max[mi][0] = row_max[mi][1] = -INFINITY;
    row_sum[mi][0] = row_sum[mi][1] = 0.f;
  }
  const float sl2 = p.scale_log2;

  // ---- per-lane ldmatrix offsets, shared by Q, K and V ----
  constexpr int kRowBytes = D * 2;
  uint32_t frag[4];
  ldmatrix_offsets<kRowBytes>(frag, lane);
  const uint32_t q_warp = sQ_u + warp_row0 * kRowBytes;

  for (int n = 0; n < n_tiles; ++n) {
    const int slot_ahead = tid < BN ? slot_of(n + 2) : 0;  // stored after this tile's math (hides the load)
    if (n + 1 < n_tiles) issue_kv(n + 1, (n + 1) & 1);
    cp_async_commit();  // possibly empty group, keeps the wait count uniform
    cp_async_wait<1>();  // all groups but the newest are done: Q and tile n have landed
    __syncthreads();

    const uint32_t stage_off = (n & 1) * Tr::kSmemKV * 2;

    // ---- S = Q K^T, [MT x 16 rows, BN keys] per warp ----
    float s[MT][NT][4];
#pragma unroll
    for (int mi = 0; mi < MT; ++mi)
#pragma unroll
      for (int nt = 0; nt < NT; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) s[mi][nt][e] = 0.f;
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      uint32_t qa[MT][4];
#pragma unroll
      for (int mi = 0; mi < MT; ++mi)
        ldmatrix_x4(qa[mi], q_warp + frag[kk & 3] + mi * 16 * kRowBytes + (kk >> 2) * 128);
#pragma unroll
      for (int nj = 0; nj < BN / 16; ++nj) {
        uint32_t kb[4];  // b0 of key tile 2nj, b0 of key tile 2nj+1, b1 of 2nj, b1 of 2nj+1
        ldmatrix_x4(kb, sK_u + stage_off + frag[kk & 3] + nj * 16 * kRowBytes + (kk >> 2) * 128);
#pragma unroll
        for (int mi = 0; mi < MT; ++mi) {
          mma_16816<T>(s[mi][2 * nj], qa[mi], kb[0], kb[2]);
          mma_16816<T>(s[mi][2 * nj + 1], qa[mi], kb[1], kb[3]);
        }
      }
    }

    // ---- causal mask (bottom-right): key col > ctx_off + row is -inf; only tiles crossing the diagonal ----
    if (n >= n_unmasked) {
      // element (mi, nt, e) has row m0 + warp_row0 + mi*16 + lane/4 + 8*(e/2), col n*BN + nt*8 + (lane%4)*2 + e%2
      const int limit = ctx_off + m0 + warp_row0 + (lane >> 2) - n * BN - (lane & 3) * 2;
#pragma unroll
      for (int mi = 0; mi < MT; ++mi)
#pragma unroll
        for (int nt = 0; nt < NT; ++nt)
#pragma unroll
          for (int e = 0; e < 4; ++e)
            if (nt * 8 + (e & 1) > limit + mi * 16 + (e >> 1) * 8) s[mi][nt][e] = -INFINITY;
    }

    // ---- online softmax (exp2 domain); a row with no visible key so far keeps max -inf and sum 0 ----
#pragma unroll
    for (int mi = 0; mi < MT; ++mi)
#pragma unroll
      for (int hh = 0; hh < 2; ++hh) {
        float mx = row_max[mi][hh];
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) mx = fmaxf(mx, fmaxf(s[mi][nt][2 * hh], s[mi][nt][2 * hh + 1]));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
        const float m_scaled = mx == -INFINITY ? 0.f : mx * sl2;  // avoids (-inf) - (-inf)
        const float corr = exp2f(row_max[mi][hh] * sl2 - m_scaled);
        row_max[mi][hh] = mx;
        row_sum[mi][hh] *= corr;
#pragma unroll
        for (int dt = 0; dt < DT; ++dt) {
          o[mi][dt][2 * hh] *= corr;
          o[mi][dt][2 * hh + 1] *= corr;
        }
#pragma unroll
        for (int nt = 0; nt < NT; ++nt)
#pragma unroll
          for (int e = 2 * hh; e < 2 * hh + 2; ++e) {
            const float pr = exp2f(fmaf(s[mi][nt][e], sl2, -m_scaled));
            row_sum[mi][hh] += pr;
            s[mi][nt][e] = pr;
          }
      }

    // ---- O += P V; P's A fragment for keys [16kk, 16kk+16) is S tiles 2kk, 2kk+1 (packed up front: S dies) ----
    uint32_t pa[BN / 16][MT][4];
#pragma unroll
    for (int kk = 0; kk < BN / 16; ++kk)
#pragma unroll
      for (int mi = 0; mi < MT; ++mi) {
        pa[kk][mi][0] = pack2<T>(s[mi][2 * kk][0], s[mi][2 * kk][1]);
        pa[kk][mi][1] = pack2<T>(s[mi][2 * kk][2], s[mi][2 * kk][3]);
        pa[kk][mi][2] = pack2<T>(s[mi][2 * kk + 1][0], s[mi][2 * kk + 1][1]);
        pa[kk][mi][3] = pack2<T>(s[mi][2 * kk + 1][2], s[mi][2 * kk + 1][3]);
      }
#pragma unroll
    for (int kk = 0; kk < BN / 16; ++kk) {
#pragma unroll
      for (int dj = 0; dj < D / 16; ++dj) {
        uint32_t vb[4];  // b0, b1 of dim tile 2dj; b0, b1 of dim tile 2dj+1
        ldmatrix_x4_trans(vb, sV_u + stage_off + frag[dj & 3] + kk * 16 * kRowBytes + (dj >> 2) * 128);
#pragma unroll
        for (int mi = 0; mi < MT; ++mi) {
          mma_16816<T>(o[mi][2 * dj], pa[kk][mi], vb[0], vb[1]);
          mma_16816<T>(o[mi][2 * dj + 1], pa[kk][mi], vb[2], vb[3]);
        }
      }
    }
    // tile n + 2 reuses sSlot[n & 1]: its last reader, issue_kv(n), ran before this iteration's first barrier
    if (tid < BN) sSlot[(n & 1) * BN + tid] = slot_ahead;
    __syncthreads();  // every warp is done with stage n & 1 before it is refilled; slots of n + 2 visible
  }
  cp_async_wait<0>();  // Q is still in flight when n_tiles == 0 (then other threads' copies land in our rows)
  __syncthreads();

  // ---- epilogue: O / l -> this warp's own rows of sQ (no other warp reads them) -> 16-byte stores ----
#pragma unroll
  for (int mi = 0; mi < MT; ++mi)
#pragma unroll
    for (int hh = 0; hh < 2; ++hh) {
      float l = row_sum[mi][hh];
      l += __shfl_xor_sync(0xffffffffu, l, 1);
      l += __shfl_xor_sync(0xffffffffu, l, 2);
      const float inv = l > 0.f ? 1.f / l : 0.f;
      const int row = warp_row0 + mi * 16 + (lane >> 2) + hh * 8;
#pragma unroll
      for (int dt = 0; dt < DT; ++dt) {
        const uint32_t v = pack2<T>(o[mi][dt][2 * hh] * inv, o[mi][dt][2 * hh + 1] * inv);
        *reinterpret_cast<uint32_t*>(sQ + row * D + ((dt ^ (row & 7)) << 3) + (lane & 3) * 2) = v;
      }
    }
  __syncwarp();
  T* out_base = reinterpret_cast<T*>(p.out) + ((int64_t)(q_begin + m0) * p.num_heads + head) * D;
  static_assert(Tr::kRowsPerWarp * kChunks % 32 == 0, "epilogue chunks per lane");
#pragma unroll
  for (int i = 0; i < Tr::kRowsPerWarp * kChunks / 32; ++i) {
    const int idx = lane + i * 32;
    const int row = warp_row0 + idx / kChunks;
    const int chunk = idx % kChunks;
    if (row < rows_here)
      *reinterpret_cast<uint4*>(out_base + row * q_row_stride + chunk * 8) =
          *reinterpret_cast<const uint4*>(sQ + swz<kChunks>(row, chunk));
  }
}

template <typename T, typename Tr>
void launch(const PrefillParams& p, int batch, int max_query_len, cudaStream_t stream) {
  auto kernel = prefill_attention_kernel<T, Tr>;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Tr::kSmemBytes));
  const dim3 grid(p.num_heads, batch, (max_query_len + Tr::kBlockM - 1) / Tr::kBlockM);
  kernel<<<grid, Tr::kThreads, Tr::kSmemBytes, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Tile shape of the D = 128 kernel, read once from PDCLI_PREFILL_TILE (for benchmarking; unknown values
// fall back to the default):
//   "128x32"   (default) 32-key tiles, 4 warps x 32 rows: no spills; fastest on H100 (329 TFLOP/s at 8k)
//   "128x64"   128 query rows x 64-key tiles, 4 warps x 32 rows: FA2's shape, 255 registers, spills a little
//   "128x64w8" 8 warps x 16 rows: 128 registers, more shared-memory traffic per flop
//   "64x32"    64 query rows, 4 warps x 16 rows: twice the CTAs, for short prompts (not yet measured)
int d128_tile() {
  static const int tile = [] {
    const char* env = std::getenv("PDCLI_PREFILL_TILE");
    const std::string v = env ? env : "";
    if (v == "128x64") return 0;
    if (v == "128x64w8") return 2;
    if (v == "64x32") return 3;
    return 1;
  }();
  return tile;
}

template <typename T>
void dispatch_head_dim(const PrefillParams& p, int head_dim, int batch, int max_query_len, cudaStream_t stream) {
  if (head_dim == 64) {
    launch<T, Traits<64, 128, 64, 4>>(p, batch, max_query_len, stream);
    return;
  }
  switch (d128_tile()) {
    case 1: launch<T, Traits<128, 128, 32, 4>>(p, batch, max_query_len, stream); break;
    case 2: launch<T, Traits<128, 128, 64, 8>>(p, batch, max_query_len, stream); break;
    case 3: launch<T, Traits<128, 64, 32, 4>>(p, batch, max_query_len, stream); break;
    default: launch<T, Traits<128, 128, 64, 4>>(p, batch, max_query_len, stream); break;
  }
}

}  // namespace

// Inputs are validated by the caller (bindings.cpp); errors here come only from the CUDA runtime. impl: 0 the
// mma.sync kernel, 1 the sm_90a wgmma kernel (prefill_attention_sm90.cu), 2 its warp-specialised variant
// (prefill_attention_sm90_ws.cu), 3 that one with K/V loaded by TMA (block_size >= 8); for 1-3 the caller checked
// prefill_attention_sm90_available.
void launch_prefill_attention(void* out, const void* q, const void* k_cache, const void* v_cache,
                              const int* block_tables, const int* context_lens, const int* query_start_loc,
                              int num_heads, int num_kv_heads, int head_dim, int table_width, int block_size,
                              int batch, int max_query_len, float scale, bool bf16, int impl, cudaStream_t stream,
                              int64_t kv_slots) {
  PrefillParams p;
  p.kv_slots = kv_slots;
  p.out = out;
  p.q = q;
  p.k_cache = k_cache;
  p.v_cache = v_cache;
  p.block_tables = block_tables;
  p.context_lens = context_lens;
  p.query_start_loc = query_start_loc;
  p.num_heads = num_heads;
  p.num_kv_heads = num_kv_heads;
  p.group = num_heads / num_kv_heads;
  p.table_width = table_width;
  int shift = 0;
  while ((1 << shift) < block_size) ++shift;
  p.block_shift = shift;
  p.scale_log2 = scale * 1.4426950408889634f;  // log2(e)
  if (impl == 1) {
    pdcli::launch_prefill_attention_sm90(p, batch, max_query_len, bf16, stream);
    return;
  }
  if (impl == 2 || impl == 3) {
    pdcli::launch_prefill_attention_sm90_ws(p, batch, max_query_len, bf16, impl == 3, block_size, stream);
    return;
  }
  if (bf16)
    dispatch_head_dim<__nv_bfloat16>(p, head_dim, batch, max_query_len, stream);
  else
    dispatch_head_dim<__half>(p, head_dim, batch, max_query_len, stream);
}
