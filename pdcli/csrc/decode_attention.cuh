// Shared by the decode attention kernels (decode_attention.cu: a CTA per part; decode_attention_persistent.cu:
// one wave of CTAs taking parts in turn): the CTA shape, a warp's attention over one tile, the warps' merge, the
// planned merge inside the kernel, and the launch arguments.
#pragma once
#include <cuda_runtime.h>
#include <stdint.h>

#include "common.cuh"
#include "launch.cuh"
#include "mma.cuh"

namespace pdcli_decode {

using namespace pdcli;

// The CTA's shape; the macros exist for experiments that build other shapes beside the engine's
// (results/kernel_experiments/decode_variants): the engine builds the defaults.
#ifndef PDCLI_DECODE_WARPS
#define PDCLI_DECODE_WARPS 4
#endif
#ifndef PDCLI_DECODE_STAGES
#define PDCLI_DECODE_STAGES 3
#endif
#ifndef PDCLI_DECODE_MIN_CTAS
#define PDCLI_DECODE_MIN_CTAS 2
#endif
constexpr int kWarps = PDCLI_DECODE_WARPS;
constexpr int kThreads = kWarps * 32;
constexpr int kBlockN = 16 * kWarps;  // keys per tile
constexpr int kStages = PDCLI_DECODE_STAGES;  // defaults: 2 tiles in flight per CTA; 2 CTAs per SM (96 KB each at D = 128)
constexpr int kMaxGroup = 8;

template <int D>
constexpr int smem_bytes() {
  constexpr int ring = 2 * kStages * kBlockN * D * 2;                 // K and V stages
  constexpr int merge = kWarps * kMaxGroup * (D + 2) * 4;              // per-warp O, max, sum (fp32)
  return ring > merge ? ring : merge;
}

// The planned merge inside the decode kernel: each part's CTA, its partials written, counts itself done; the
// last of sequence b's parts for kv head kvh merges the group's rows (as merge_planned_kernel) and resets the
// count for the next layer. Partials are read from L2 (other SMs wrote them).
template <typename T, int D>
__device__ __forceinline__ void merge_if_last(T* __restrict__ out, const float* part_o, const float* part_lse,
                                              const int* __restrict__ plan, int plan_slots, int batch, int b, int kvh,
                                              int group, int num_heads, int* counter) {
  __shared__ int last;
  __syncthreads();  // every thread's partials are written ...
  if (threadIdx.x == 0) {
    __threadfence();  // ... and visible GPU-wide before the count
    const int n = plan[2 + 2 * plan_slots + batch + b];
    last = atomicAdd(counter, 1) == n - 1;
    if (last) {
      *counter = 0;
      __threadfence();
    }
  }
  __syncthreads();
  if (!last) return;
  const int off = plan[2 + 2 * plan_slots + b], n = plan[2 + 2 * plan_slots + batch + b];
  for (int idx = threadIdx.x; idx < group * D; idx += blockDim.x) {
    const int h = kvh * group + idx / D, d = idx % D;
    float mx = -INFINITY;
    for (int s = 0; s < n; ++s) mx = fmaxf(mx, __ldcg(part_lse + int64_t(off + s) * num_heads + h));
    const float ref = mx == -INFINITY ? 0.f : mx;
    float sum = 0.f, acc = 0.f;
    for (int s = 0; s < n; ++s) {
      const int64_t r = int64_t(off + s) * num_heads + h;
      const float w = exp2f(__ldcg(part_lse + r) - ref);
      sum += w;
      acc += w * __ldcg(part_o + r * D + d);
    }
    out[int64_t(b) * num_heads * D + int64_t(h) * D + d] = from_float<T>(sum > 0.f ? acc / sum : 0.f);
  }
}

// One tile for warp `warp`: S = Q K^T of its 16 keys (ring stage offset `stage`), keys at or past `room`
// (counted from the warp's first key of the tile, per lane pair) masked, the online softmax update, O += P V.
template <typename T, int D>
__device__ __forceinline__ void attend_tile(float (&o)[D / 8][4], float& m_run, float& l_run,
                                            const uint32_t (&qa)[D / 16][2], uint32_t sK, uint32_t sV,
                                            const uint32_t (&frag)[4], int room, float scale_log2) {
  constexpr int DT = D / 8;
  float s[2][4];  // S[g][key 2t, 2t+1] of keys 16w + [0, 8) and [8, 16) in [.][0..1]
#pragma unroll
  for (int j = 0; j < 2; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) s[j][e] = 0.f;
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) {
    uint32_t kb[4];
    ldmatrix_x4(kb, sK + frag[kk & 3] + (kk >> 2) * 128);
    const uint32_t a[4] = {qa[kk][0], 0u, qa[kk][1], 0u};
    mma_16816<T>(s[0], a, kb[0], kb[2]);
    mma_16816<T>(s[1], a, kb[1], kb[3]);
  }
  float mx = m_run;
#pragma unroll
  for (int j = 0; j < 2; ++j)
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      if (j * 8 + e >= room) s[j][e] = -INFINITY;
      mx = fmaxf(mx, s[j][e]);
    }
  mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
  mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
  const float m_scaled = mx == -INFINITY ? 0.f : mx * scale_log2;  // avoids (-inf) - (-inf)
  const float corr = exp2f(m_run * scale_log2 - m_scaled);
  m_run = mx;
  l_run *= corr;
#pragma unroll
  for (int dt = 0; dt < DT; ++dt) {
    o[dt][0] *= corr;
    o[dt][1] *= corr;
  }
#pragma unroll
  for (int j = 0; j < 2; ++j)
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      s[j][e] = exp2f(fmaf(s[j][e], scale_log2, -m_scaled));
      l_run += s[j][e];
    }
  const uint32_t pa[4] = {pack2<T>(s[0][0], s[0][1]), 0u, pack2<T>(s[1][0], s[1][1]), 0u};
#pragma unroll
  for (int dj = 0; dj < D / 16; ++dj) {
    uint32_t vb[4];
    ldmatrix_x4_trans(vb, sV + frag[dj & 3] + (dj >> 2) * 128);
    mma_16816<T>(o[2 * dj], pa, vb[0], vb[1]);
    mma_16816<T>(o[2 * dj + 1], pa, vb[2], vb[3]);
  }
}

constexpr int kRowPasses = 4;  // a warp's 16 rows of a tile, 4 per sweep (8 lanes per 128-byte run)
template <int D>
constexpr int tile_bytes() { return kBlockN * D * 2; }

// The kernel ahead done and its writes visible, and this kernel's successor free to be placed (launch.cuh) --
// unless early_kv: the caller then waits once its first K/V tiles are on their way.
__device__ __forceinline__ void wait_ahead(bool early_kv) {
  if (!early_kv) {
    pdcli::pdl_wait();
    pdcli::pdl_trigger();
  }
}

// This lane's rows of one K/V tile into ring stage `stage` by 16-byte cp.async: rows kv_row + 4i of slots
// slot[i] (< 0: zero-filled), chunks c_lo + 8h, swizzled as the warps' ldmatrix reads expect.
template <typename T, int D>
__device__ __forceinline__ void issue_tile(uint32_t sK, uint32_t sV, int stage, const int (&slot)[4],
                                           int64_t slot_stride, int kv_row, int c_lo, const T* k_head,
                                           const T* v_head) {
  constexpr int kTileBytes = tile_bytes<D>(), kChunkHi = D / 64;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const bool valid = slot[i] >= 0;
    const int64_t off = valid ? slot[i] * slot_stride : 0;
    const int row = kv_row + 4 * i;
    const uint32_t dst = stage * kTileBytes + (row * D + ((c_lo ^ (row & 7)) << 3)) * 2;
#pragma unroll
    for (int h = 0; h < kChunkHi; ++h) {
      cp_async_16(sK + dst + h * 128, k_head + off + h * 64, valid);
      cp_async_16(sV + dst + h * 128, v_head + off + h * 64, valid);
    }
  }
}

// Where a part's result goes: out (the sequence is one part) or its rows of the partials.
struct PartOut {
  int b;
  bool direct;
  int64_t part_base;  // query head h's row in part_o / part_lse: part_base + h * part_stride
  int part_stride;
};

// The warps' states of one part merged through shared memory sm (kWarps * kMaxGroup * (D + 2) floats, free
// for it: every thread syncs before and after) and written as p says.
template <typename T, int D>
__device__ __forceinline__ void write_part(float* sm, const float (&o)[D / 8][4], float m_run, float l_run,
                                          const PartOut& p, T* __restrict__ out, float* __restrict__ part_o,
                                          float* __restrict__ part_lse, int kvh, int group, int num_heads,
                                          float scale_log2) {
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, g = lane >> 2, t = lane & 3;
  float* sm_o = sm;                                  // [kWarps][kMaxGroup][D]
  float* sm_m = sm_o + kWarps * kMaxGroup * D;       // [kWarps][kMaxGroup], scaled max (log2 domain)
  float* sm_l = sm_m + kWarps * kMaxGroup;           // [kWarps][kMaxGroup]
  l_run += __shfl_xor_sync(0xffffffffu, l_run, 1);
  l_run += __shfl_xor_sync(0xffffffffu, l_run, 2);
  __syncthreads();  // sm is free (the previous part's readers are done)
  if (g < group) {
    if (t == 0) {
      sm_m[warp * kMaxGroup + g] = m_run == -INFINITY ? -INFINITY : m_run * scale_log2;
      sm_l[warp * kMaxGroup + g] = l_run;
    }
    float* row = sm_o + (warp * kMaxGroup + g) * D + 2 * t;
#pragma unroll
    for (int dt = 0; dt < D / 8; ++dt) {
      row[dt * 8] = o[dt][0];
      row[dt * 8 + 1] = o[dt][1];
    }
  }
  __syncthreads();
  for (int idx = tid; idx < group * D; idx += kThreads) {
    const int h = idx / D, d = idx % D;
    float mx = -INFINITY;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) mx = fmaxf(mx, sm_m[w * kMaxGroup + h]);
    const float ref = mx == -INFINITY ? 0.f : mx;
    float sum = 0.f, acc = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) {
      const float wt = exp2f(sm_m[w * kMaxGroup + h] - ref);
      sum += sm_l[w * kMaxGroup + h] * wt;
      acc += sm_o[(w * kMaxGroup + h) * D + d] * wt;
    }
    const int head = kvh * group + h;
    const float val = sum > 0.f ? acc / sum : 0.f;
    if (p.direct) {
      out[int64_t(p.b) * num_heads * D + head * D + d] = from_float<T>(val);
    } else {
      const int64_t row = p.part_base + int64_t(head) * p.part_stride;
      part_o[row * D + d] = val;
      if (d == 0) part_lse[row] = sum > 0.f ? mx + log2f(sum) : -INFINITY;
    }
  }
}

struct DecodeArgs {
  void* out;
  float* part_o;    // [B, Hq, splits, D], when splits > 1
  float* part_lse;  // [B, Hq, splits]
  const void* q;
  const void* k_cache;
  const void* v_cache;
  const int* block_tables;
  const int* context_lens;
  int batch, num_heads, num_kv_heads, table_width, block_shift, splits;
  int64_t q_stride;
  float scale_log2;
  cudaStream_t stream;
  const int* plan;  // balanced splits: grid.x = plan_slots CTAs per kv head; nullptr: uniform, grid.x = splits
  int plan_slots;
  int* counters;  // planned: [B * Hk] zeros, the merge done in the decode kernel; nullptr: merge_planned_kernel
  bool early_kv;  // planned: the plan was made before the kernel ahead (decode_attention_kernel's early_kv)
  bool persistent;  // planned: one wave of decode_attention_persistent_kernel
};

// decode_attention_persistent.cu: the balanced plan as one wave of its kernel (a.plan set).
template <typename T, int D>
void launch_persistent(const DecodeArgs& a);

}  // namespace pdcli_decode
