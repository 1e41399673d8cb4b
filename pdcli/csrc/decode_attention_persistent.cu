// The balanced decode plan as one wave of CTAs that take parts in turn (decode_attention.cuh: the shared pieces).
#include <c10/cuda/CUDAException.h>

#include <algorithm>
#include <map>
#include <mutex>

#include "decode_attention.cuh"
#include "launch.cuh"

namespace {

using namespace pdcli_decode;

// The planned decode as one wave (grid: CTAs per kv head x Hk, as many as are resident): CTA x takes the plan's
// parts x, x + gridDim.x, ... of its kv head in turn, and the K/V tiles of all of them are one stream through
// the ring, so the next part's first tiles load while this part's last ones compute and its result is written
// (one CTA per part instead: a second wave of CTAs that start cold, their first tiles' latency exposed). The
// warps' merge area lies past the ring.
template <int D>
constexpr int persistent_smem_bytes() {
  return 2 * kStages * kBlockN * D * 2 + kWarps * kMaxGroup * (D + 2) * 4;
}

template <typename T, int D>
__global__ void __launch_bounds__(kThreads, PDCLI_DECODE_MIN_CTAS)
decode_attention_persistent_kernel(T* __restrict__ out, float* __restrict__ part_o, float* __restrict__ part_lse,
                                   const T* __restrict__ q, const T* __restrict__ k_cache,
                                   const T* __restrict__ v_cache, const int* __restrict__ block_tables,
                                   const int* __restrict__ context_lens, int table_width, int block_shift,
                                   int num_kv_heads, int group, int64_t q_stride, float scale_log2,
                                   const int* __restrict__ plan, int plan_slots, int batch, int* __restrict__ counters,
                                   bool early_kv) {
  wait_ahead(early_kv);
  constexpr int kRowBytes = D * 2, BN = kBlockN, kTileBytes = tile_bytes<D>();
  constexpr int DT = D / 8;
  extern __shared__ __align__(128) unsigned char smem[];
  const uint32_t sK = smem_u32(smem);  // [kStages][BN, D]
  const uint32_t sV = sK + kStages * kTileBytes;
  float* sm_merge = reinterpret_cast<float*>(smem + 2 * kStages * kTileBytes);

  const int kvh = blockIdx.y, num_heads = num_kv_heads * group;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
  const int parts = plan[1], chunk = plan[0];
  if (int(blockIdx.x) >= parts) return;

  struct Part {  // keys [start, end) of sequence b; n_tiles >= 1 (an empty part: one masked tile, zeros out)
    int slot, b, start, end, n_tiles;
  };
  auto part_at = [&](int slot) {
    Part p;
    p.slot = slot;
    p.b = plan[2 + slot];
    const int ctx = context_lens[p.b];
    p.start = min(ctx, plan[2 + plan_slots + slot] * chunk);
    p.end = min(ctx, p.start + chunk);
    p.n_tiles = max(1, (p.end - p.start + BN - 1) / BN);
    return p;
  };

  // ---- the tile stream: `ahead` is the part whose tile ahead_tile is issued next; slot[] its rows' slots ----
  const int block_mask = (1 << block_shift) - 1;
  const int64_t slot_stride = int64_t(num_kv_heads) * D;
  const int kv_row = warp * 16 + (lane >> 3), c_lo = lane & 7;
  const T* k_head = k_cache + int64_t(kvh) * D + c_lo * 8;
  const T* v_head = v_cache + int64_t(kvh) * D + c_lo * 8;
  int slot[kRowPasses];
  auto slots_of = [&](const Part& p, int tile) {
    const int* table = block_tables + int64_t(p.b) * table_width;
#pragma unroll
    for (int i = 0; i < kRowPasses; ++i) {
      const int key = p.start + tile * BN + kv_row + 4 * i;
      slot[i] = key < p.end ? (__ldg(table + (key >> block_shift)) << block_shift) + (key & block_mask) : -1;
    }
  };
  Part ahead = part_at(blockIdx.x);
  int ahead_tile = 0;
  slots_of(ahead, 0);
  auto issue_next = [&](int stage) {  // one commit group per call (empty past the stream's end)
    if (ahead.slot < parts) {
      issue_tile<T, D>(sK, sV, stage, slot, slot_stride, kv_row, c_lo, k_head, v_head);
      if (++ahead_tile == ahead.n_tiles) {
        ahead_tile = 0;
        ahead.slot += gridDim.x;
        if (ahead.slot < parts) ahead = part_at(ahead.slot);
      }
      if (ahead.slot < parts) slots_of(ahead, ahead_tile);  // the table reads land while a tile computes
    }
    cp_async_commit();
  };
  int s = 0;
  if (early_kv) {  // the first part's tiles before the newest key (the kernel ahead writes its K/V and Q)
    const int ctx = context_lens[ahead.b];
    for (; s < kStages - 1 && ahead.slot == int(blockIdx.x) && ahead.start + (ahead_tile + 1) * BN < ctx; ++s)
      issue_next(s);
    pdcli::pdl_wait();
    pdcli::pdl_trigger();
  }
  for (; s < kStages - 1; ++s) issue_next(s);

  uint32_t frag[4];
  ldmatrix_offsets<kRowBytes>(frag, lane);
  int tiles_done = 0;  // of the stream: tile i is in ring stage i % kStages, commit group i
  for (int part = blockIdx.x; part < parts; part += gridDim.x) {
    const Part cur = part_at(part);
    uint32_t qa[D / 16][2];  // Q as A fragments (rows 8..15 zero)
    const T* qrow = q + int64_t(cur.b) * q_stride + int64_t(kvh * group + g) * D + 2 * t;
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      qa[kk][0] = g < group ? *reinterpret_cast<const uint32_t*>(qrow + kk * 16) : 0u;
      qa[kk][1] = g < group ? *reinterpret_cast<const uint32_t*>(qrow + kk * 16 + 8) : 0u;
    }
    float o[DT][4];
#pragma unroll
    for (int dt = 0; dt < DT; ++dt)
#pragma unroll
      for (int e = 0; e < 4; ++e) o[dt][e] = 0.f;
    float m_run = -INFINITY, l_run = 0.f;
    for (int n = 0; n < cur.n_tiles; ++n, ++tiles_done) {
      cp_async_wait<kStages - 2>();  // tile tiles_done has landed (this lane's copies) ...
      __syncwarp();                  // ... and the warp's; the warp is done with the stage issued next
      issue_next((tiles_done + kStages - 1) % kStages);
      const uint32_t stage = (tiles_done % kStages) * kTileBytes + warp * 16 * kRowBytes;
      const int room = cur.end - (cur.start + n * BN + warp * 16 + 2 * t);
      attend_tile<T, D>(o, m_run, l_run, qa, sK + stage, sV + stage, frag, room, scale_log2);
    }
    const bool direct = plan[2 + 2 * plan_slots + batch + cur.b] == 1;
    write_part<T, D>(sm_merge, o, m_run, l_run, PartOut{cur.b, direct, int64_t(part) * num_heads, 1}, out, part_o,
                     part_lse, kvh, group, num_heads, scale_log2);
    if (counters != nullptr && !direct)
      merge_if_last<T, D>(out, part_o, part_lse, plan, plan_slots, batch, cur.b, kvh, group, num_heads,
                          counters + cur.b * num_kv_heads + kvh);
  }
  cp_async_wait<0>();
}

// CTAs per kv head of the persistent kernel: as many as are resident at once (queried once per device).
template <typename T, int D>
int persistent_ctas_per_head(int num_kv_heads) {
  static std::mutex mu;
  static std::map<int, int> resident;  // device -> CTAs resident on it
  int device = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  const std::lock_guard<std::mutex> lock(mu);
  auto it = resident.find(device);
  if (it == resident.end()) {
    auto fn = decode_attention_persistent_kernel<T, D>;
    int per_sm = 0, sms = 1;
    C10_CUDA_CHECK(cudaFuncSetAttribute(fn, cudaFuncAttributeMaxDynamicSharedMemorySize, persistent_smem_bytes<D>()));
    C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, fn, kThreads, persistent_smem_bytes<D>()));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
    it = resident.emplace(device, std::max(1, per_sm) * sms).first;
  }
  return std::max(1, it->second / num_kv_heads);
}

}  // namespace

namespace pdcli_decode {

template <typename T, int D>
void launch_persistent(const DecodeArgs& a) {
  const int ctas = std::min(a.plan_slots, persistent_ctas_per_head<T, D>(a.num_kv_heads));  // sets the smem limit
  pdcli::launch_pdl(decode_attention_persistent_kernel<T, D>, dim3(ctas, a.num_kv_heads), dim3(kThreads),
                    persistent_smem_bytes<D>(), a.stream, static_cast<T*>(a.out), a.part_o, a.part_lse,
                    static_cast<const T*>(a.q), static_cast<const T*>(a.k_cache), static_cast<const T*>(a.v_cache),
                    a.block_tables, a.context_lens, a.table_width, a.block_shift, a.num_kv_heads,
                    a.num_heads / a.num_kv_heads, a.q_stride, a.scale_log2, a.plan, a.plan_slots, a.batch,
                    a.counters, a.early_kv);
}

template void launch_persistent<__nv_bfloat16, 128>(const DecodeArgs&);
template void launch_persistent<__nv_bfloat16, 64>(const DecodeArgs&);
template void launch_persistent<__half, 128>(const DecodeArgs&);
template void launch_persistent<__half, 64>(const DecodeArgs&);

}  // namespace pdcli_decode
