// Varlen paged causal prefill attention on Hopper, warp-specialised (FA3's design with a cp.async producer;
// sm_90a, head_dim 128). One CTA = (one q head, one sequence, one tile of 128 new query rows), 3 warpgroups:
// warpgroup 0 loads (Q once, then K/V tiles gathered through the block table into a 2-stage ring; a stage is
// signalled full on an mbarrier once its copies landed), warpgroups 1 and 2 each compute 64 rows as
// prefill_attention_sm90.cu does (S = Q K^T, mask, online softmax, O += P V by wgmma) and release the stage on
// an mbarrier. The two compute warpgroups take turns issuing their GEMMs (two named barriers), so one's softmax
// runs while the other's GEMMs hold the tensor cores (pingpong); setmaxnreg moves registers from the loader to
// them. Same tile layout and descriptor strides (PDCLI_WGMMA_DESC) as the other wgmma kernel.
#include <c10/cuda/CUDAException.h>
#include <c10/util/Exception.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#include "../pdcli/csrc/mma.cuh"
#include "../pdcli/csrc/prefill_params.cuh"
#include "../pdcli/csrc/wgmma.cuh"
#include "../pdcli/csrc/wgmma_softmax.cuh"

namespace {

using namespace pdcli;

constexpr int kD = 128;        // head dim
constexpr int kBM = 128;
constexpr int kBN = 128;
constexpr int kThreads = 384;
constexpr int kTileBytes = 128 * kD * 2;
constexpr int kHalfBytes = kTileBytes / 2;
template <int S>
constexpr int smem_bytes() { return 1024 + (1 + 2 * S) * kTileBytes + 8 * (2 * S + 1); }

struct WsParams {
  PrefillParams p;
  uint32_t k_sbo, v_lbo, v_sbo;
  int heads_inner;  // 1: grid x = heads (as main); 0: grid x = m tiles (reversed), z = heads
};

__device__ __forceinline__ void cp_async_arrive_noinc(uint32_t bar) {
  asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];\n" ::"r"(bar) : "memory");
}

// S: stages of (K, V); NOINC: the loader's arrivals ride on its copies (cp.async.mbarrier.arrive.noinc) instead
// of waiting for them; the compute warpgroups fence the async proxy after the full barrier.
template <typename T, int S, bool NOINC>
__global__ void __launch_bounds__(kThreads, 1) prefill_attention_ws_kernel(const WsParams wp) {
#ifdef PDCLI_HAS_WGMMA
  const PrefillParams& p = wp.p;
  extern __shared__ unsigned char smem_raw[];
  const uint32_t sQ = (smem_u32(smem_raw) + 1023) & ~1023u;
  auto sK = [&](int stage) { return sQ + (1 + 2 * stage) * kTileBytes; };
  auto sV = [&](int stage) { return sQ + (2 + 2 * stage) * kTileBytes; };
  const uint32_t bars = sQ + (1 + 2 * S) * kTileBytes;
  auto full = [&](int stage) { return bars + 8 * stage; };
  auto empty = [&](int stage) { return bars + 8 * S + 8 * stage; };
  const uint32_t q_full = bars + 16 * S;

  int head, mblk;
  if (wp.heads_inner) { head = blockIdx.x; mblk = gridDim.z - 1 - blockIdx.z; }
  else { head = blockIdx.z; mblk = gridDim.x - 1 - blockIdx.x; }
  const int b = blockIdx.y;
  PrefillTile tile;
  if (!prefill_tile(p, b, mblk, kBM, kBN, tile)) return;
  const int q_begin = tile.q_begin, m0 = tile.m0, ctx_off = tile.ctx_off, rows_here = tile.rows;
  const int key_end = tile.key_end, n_tiles = tile.n_tiles, n_unmasked = tile.n_unmasked;

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, wg = warp >> 2;
  if (tid == 0) {
    for (int i = 0; i < S; ++i) { mbar_init(full(i), 128); mbar_init(empty(i), 256); }
    mbar_init(q_full, 128);
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  }
  __syncthreads();

  if (wg == 0) {
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
    if (NOINC) cp_async_arrive_noinc(q_full);
    else cp_async_commit();
    const int* table = p.block_tables + (int64_t)b * p.table_width;
    const int block_mask = (1 << p.block_shift) - 1;
    const int64_t kv_slot_stride = (int64_t)p.num_kv_heads * kD;
    const int kv_head = head / p.group;
    const T* k_head = reinterpret_cast<const T*>(p.k_cache) + (int64_t)kv_head * kD + c * 8;
    const T* v_head = reinterpret_cast<const T*>(p.v_cache) + (int64_t)kv_head * kD + c * 8;
    auto load_kv = [&](int t, int stage) {
#pragma unroll 4
      for (int j = 0; j < 16; ++j) {
        const int key = t * kBN + r0 + 8 * j;
        const bool valid = key < key_end;
        const int64_t off =
            valid ? (int64_t)((__ldg(table + (key >> p.block_shift)) << p.block_shift) + (key & block_mask)) *
                        kv_slot_stride
                  : 0;
        cp_async_16(sK(stage) + dst0 + j * 1024, k_head + off, valid);
        cp_async_16(sV(stage) + dst0 + j * 1024, v_head + off, valid);
      }
    };
    if (NOINC) {
      for (int t = 0; t < n_tiles; ++t) {
        const int stage = t % S;
        mbar_wait(empty(stage), ((t / S) & 1) ^ 1);
        load_kv(t, stage);
        cp_async_arrive_noinc(full(stage));
      }
      cp_async_wait<0>();
    } else {
      // blocking: up to S - 1 tiles in flight, each signalled once this thread's copies landed
      int issued = 0;
      for (; issued < min(S - 1, n_tiles); ++issued) { load_kv(issued, issued % S); cp_async_commit(); }
      for (int n = 0; n < n_tiles; ++n) {
        if (issued < n_tiles) {
          const int stage = issued % S;
          mbar_wait(empty(stage), ((issued / S) & 1) ^ 1);
          load_kv(issued, stage);
          ++issued;
        }
        cp_async_commit();  // possibly empty: keeps the group count fixed
        cp_async_wait<S - 1>();  // tile n (and Q) landed
        fence_proxy_async_shared();
        if (n == 0) mbar_arrive(q_full);
        mbar_arrive(full(n % S));
      }
    }
  } else {
    asm volatile("setmaxnreg.inc.sync.aligned.u32 232;\n" ::: "memory");
    const int cw = wg - 1;
    const int warp_row0 = (warp - 4) * 16;
    float o[64], s[64];
#pragma unroll
    for (int i = 0; i < 64; ++i) o[i] = s[i] = 0.f;
    SoftmaxState st;
    softmax_init(st);
    if (cw == 1) named_arrive(1);
    mbar_wait(q_full, 0);
    if (NOINC) fence_proxy_async_shared();
    for (int n = 0; n < n_tiles; ++n) {
      const int stage = n % S;
      mbar_wait(full(stage), (n / S) & 1);
      if (NOINC) fence_proxy_async_shared();
      named_sync(1 + cw);
      issue_qk<T>(s, sQ + cw * 64 * 128, sK(stage), kHalfBytes, wp.k_sbo);
      named_arrive(1 + (cw ^ 1));
      wait_acc(s);
      if (n >= n_unmasked) mask_causal(s, ctx_off + m0 + warp_row0 + (lane >> 2) - n * kBN - (lane & 3) * 2);
      softmax_tile(s, o, st, p.scale_log2);
      uint32_t pa[kBN / 16][4];
      pack_p<T>(s, pa, o);
      named_sync(1 + cw);
      issue_pv<T>(o, pa, sV(stage), wp.v_lbo, wp.v_sbo);
      if (cw == 0 || n + 1 < n_tiles) named_arrive(1 + (cw ^ 1));
      wait_acc(o);
      mbar_arrive(empty(stage));
    }
    store_o<T>(o, st, reinterpret_cast<T*>(p.out) + ((int64_t)(q_begin + m0) * p.num_heads + head) * kD,
               (int64_t)p.num_heads * kD, warp_row0, rows_here, lane);
  }
#endif
}

template <typename T, int S, bool NOINC>
void launch(const WsParams& wp, int batch, int max_query_len, cudaStream_t stream) {
  auto kernel = prefill_attention_ws_kernel<T, S, NOINC>;
  constexpr int smem = smem_bytes<S>();
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  const int mt = (max_query_len + kBM - 1) / kBM;
  const dim3 grid = wp.heads_inner ? dim3(wp.p.num_heads, batch, mt) : dim3(mt, batch, wp.p.num_heads);
  kernel<<<grid, kThreads, smem, stream>>>(wp);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

namespace pdcli {

// variant: stages * 10 + noinc; heads_inner as WsParams
void launch_ws_exp(const PrefillParams& p, int batch, int max_query_len, int variant, int heads_inner,
                   cudaStream_t stream) {
  const WsParams wp{p, 1024u, (uint32_t)kHalfBytes, 1024u,
                    heads_inner};
  switch (variant) {
    case 20: launch<__nv_bfloat16, 2, false>(wp, batch, max_query_len, stream); break;
    case 21: launch<__nv_bfloat16, 2, true>(wp, batch, max_query_len, stream); break;
    case 30: launch<__nv_bfloat16, 3, false>(wp, batch, max_query_len, stream); break;
    case 31: launch<__nv_bfloat16, 3, true>(wp, batch, max_query_len, stream); break;
    default: TORCH_CHECK(false, "variant");
  }
}

}  // namespace pdcli
