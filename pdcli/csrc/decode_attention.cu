// Paged GQA decode attention (one query token per sequence), split-KV with a log-sum-exp merge.
//
// CTA = (kv split, kv head, sequence). All G query heads of the kv head live in the CTA, so each
// K/V row is read from HBM exactly once. A K/V row of one head is D * 2 bytes; LPR = D / 8 lanes
// hold 16 bytes of it each, so a warp covers RPW = 32 / LPR rows per step. Every lane keeps its
// 8-element slice of the G query vectors and of the G output accumulators in registers, loads
// K/V with 16-byte streaming loads (UNROLL rows in flight per lane), reduces q.k across its LPR
// lanes with shuffles and runs an online softmax in the exp2 domain with fp32 state.
#include <c10/cuda/CUDAException.h>

#include <algorithm>

#include "common.cuh"

namespace {

using namespace pdcli;

constexpr int kWarps = 4;
constexpr int kUnroll = 4;  // rows per lane per tile; two tiles in flight

template <typename T, int D, int G>
__global__ void __launch_bounds__(kWarps * 32)
decode_attention_kernel(T* __restrict__ out,              // [B, Hq, D]
                        float* __restrict__ part_o,       // [B, Hq, S, D] when S > 1
                        float* __restrict__ part_lse,     // [B, Hq, S] (log2 domain)
                        const T* __restrict__ q,          // [B, Hq, D], row stride q_stride
                        const T* __restrict__ k_cache,    // [N, bs, Hk, D]
                        const T* __restrict__ v_cache,
                        const int* __restrict__ block_tables,  // [B, W]
                        const int* __restrict__ context_lens,  // [B]
                        int table_width, int block_size, int num_kv_heads, int64_t q_stride, float scale_log2) {
  constexpr int LPR = D / 8;
  constexpr int RPW = 32 / LPR;
  constexpr int ROWS = kWarps * RPW;  // row groups in the CTA
  const int split = blockIdx.x, kvh = blockIdx.y, b = blockIdx.z;
  const int num_splits = gridDim.x;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int r = lane / LPR, c = lane % LPR;
  const int group = warp * RPW + r;
  const int num_heads = num_kv_heads * G;

  const int ctx = context_lens[b];
  const int per_split = (ctx + num_splits - 1) / num_splits;
  const int start = split * per_split;
  const int end = min(ctx, start + per_split);

  float qf[G][8], o[G][8], m[G], l[G];
#pragma unroll
  for (int h = 0; h < G; ++h) {
    to_float8<T>(*reinterpret_cast<const uint4*>(q + b * q_stride + (kvh * G + h) * D + c * 8), qf[h]);
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      qf[h][i] *= scale_log2;
      o[h][i] = 0.f;
    }
    m[h] = -INFINITY;
    l[h] = 0.f;
  }

  const int* table = block_tables + int64_t(b) * table_width;
  const int64_t row_stride = int64_t(num_kv_heads) * D;
  const int64_t head_off = int64_t(kvh) * D + c * 8;

  // software pipeline: the loads of tile i + 1 are in flight while tile i is computed
  uint4 kr[kUnroll], vr[kUnroll];
  auto load_tile = [&](int base) {
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int key = base + u * ROWS + group;
      if (key < end) {
        const int64_t off = (int64_t(table[key / block_size]) * block_size + key % block_size) * row_stride + head_off;
        kr[u] = ld_stream(k_cache + off);
        vr[u] = ld_stream(v_cache + off);
      } else {
        kr[u] = make_uint4(0, 0, 0, 0);
        vr[u] = make_uint4(0, 0, 0, 0);
      }
    }
  };
  load_tile(start);
  for (int base = start; base < end; base += ROWS * kUnroll) {
    uint4 kc[kUnroll], vc[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      kc[u] = kr[u];
      vc[u] = vr[u];
    }
    if (base + ROWS * kUnroll < end) load_tile(base + ROWS * kUnroll);
    float s[kUnroll][G];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      float kf[8];
      to_float8<T>(kc[u], kf);
#pragma unroll
      for (int h = 0; h < G; ++h) {
        float acc = 0.f;
#pragma unroll
        for (int i = 0; i < 8; ++i) acc = fmaf(qf[h][i], kf[i], acc);
#pragma unroll
        for (int off = LPR / 2; off > 0; off >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, off);
        s[u][h] = (base + u * ROWS + group < end) ? acc : -INFINITY;
      }
    }
#pragma unroll
    for (int h = 0; h < G; ++h) {
      float mx = m[h];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) mx = fmaxf(mx, s[u][h]);
      const float ref = mx == -INFINITY ? 0.f : mx;  // no key seen yet: keep everything at 0
      const float alpha = exp2f(m[h] - ref);
      m[h] = mx;
      l[h] *= alpha;
#pragma unroll
      for (int i = 0; i < 8; ++i) o[h][i] *= alpha;
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) s[u][h] = exp2f(s[u][h] - ref);
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      float vf[8];
      to_float8<T>(vc[u], vf);
#pragma unroll
      for (int h = 0; h < G; ++h) {
        l[h] += s[u][h];
#pragma unroll
        for (int i = 0; i < 8; ++i) o[h][i] = fmaf(s[u][h], vf[i], o[h][i]);
      }
    }
  }

  // merge the ROWS partial states of the CTA through shared memory
  __shared__ float sm_m[ROWS][G], sm_l[ROWS][G];
  __shared__ float sm_o[ROWS][G][D];
  if (c == 0) {
#pragma unroll
    for (int h = 0; h < G; ++h) {
      sm_m[group][h] = m[h];
      sm_l[group][h] = l[h];
    }
  }
#pragma unroll
  for (int h = 0; h < G; ++h)
#pragma unroll
    for (int i = 0; i < 8; ++i) sm_o[group][h][c * 8 + i] = o[h][i];
  __syncthreads();

  for (int idx = threadIdx.x; idx < G * D; idx += blockDim.x) {
    const int h = idx / D, d = idx % D;
    float mx = -INFINITY;
#pragma unroll
    for (int g = 0; g < ROWS; ++g) mx = fmaxf(mx, sm_m[g][h]);
    const float ref = mx == -INFINITY ? 0.f : mx;
    float sum = 0.f, acc = 0.f;
#pragma unroll
    for (int g = 0; g < ROWS; ++g) {
      const float w = exp2f(sm_m[g][h] - ref);
      sum += sm_l[g][h] * w;
      acc += sm_o[g][h][d] * w;
    }
    const int head = kvh * G + h;
    const float val = sum > 0.f ? acc / sum : 0.f;
    if (num_splits == 1) {
      out[int64_t(b) * num_heads * D + head * D + d] = from_float<T>(val);
    } else {
      const int64_t row = (int64_t(b) * num_heads + head) * num_splits + split;
      part_o[row * D + d] = val;
      if (d == 0) part_lse[row] = sum > 0.f ? mx + log2f(sum) : -INFINITY;
    }
  }
}

// out[b, h] = sum_s w_s * part_o[b, h, s] with w_s = 2^(lse_s - max lse) / sum of those weights.
template <typename T, int D>
__global__ void merge_splits_kernel(T* __restrict__ out, const float* __restrict__ part_o,
                                    const float* __restrict__ part_lse, int num_splits) {
  const int64_t row = blockIdx.x;  // b * Hq + h
  const float* lse = part_lse + row * num_splits;
  float mx = -INFINITY;
  for (int s = 0; s < num_splits; ++s) mx = fmaxf(mx, lse[s]);
  const float ref = mx == -INFINITY ? 0.f : mx;
  for (int d = threadIdx.x; d < D; d += blockDim.x) {
    float sum = 0.f, acc = 0.f;
    for (int s = 0; s < num_splits; ++s) {
      const float w = exp2f(lse[s] - ref);
      sum += w;
      acc += w * part_o[(row * num_splits + s) * D + d];
    }
    out[row * D + d] = from_float<T>(sum > 0.f ? acc / sum : 0.f);
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
  int batch, num_heads, num_kv_heads, table_width, block_size, splits;
  int64_t q_stride;
  float scale_log2;
  cudaStream_t stream;
};

template <typename T, int D, int G>
void launch(const DecodeArgs& a) {
  dim3 grid(a.splits, a.num_kv_heads, a.batch);
  decode_attention_kernel<T, D, G><<<grid, kWarps * 32, 0, a.stream>>>(
      static_cast<T*>(a.out), a.part_o, a.part_lse, static_cast<const T*>(a.q), static_cast<const T*>(a.k_cache),
      static_cast<const T*>(a.v_cache), a.block_tables, a.context_lens, a.table_width, a.block_size, a.num_kv_heads,
      a.q_stride, a.scale_log2);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (a.splits > 1) {
    merge_splits_kernel<T, D><<<a.batch * a.num_heads, D, 0, a.stream>>>(static_cast<T*>(a.out), a.part_o,
                                                                          a.part_lse, a.splits);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

template <typename T, int D>
void dispatch_group(int G, const DecodeArgs& a) {
  switch (G) {
    case 1: return launch<T, D, 1>(a);
    case 2: return launch<T, D, 2>(a);
    case 4: return launch<T, D, 4>(a);
    default: return launch<T, D, 8>(a);
  }
}

// CTAs of the decode kernel that fit on the GPU at once.
int resident_ctas(int D, int G) {
  int per_sm = 0;
  const void* fn = nullptr;
#define PDCLI_FN(DD, GG) if (D == DD && G == GG) fn = (const void*)decode_attention_kernel<__nv_bfloat16, DD, GG>;
  PDCLI_FN(64, 1) PDCLI_FN(64, 2) PDCLI_FN(64, 4) PDCLI_FN(64, 8)
  PDCLI_FN(128, 1) PDCLI_FN(128, 2) PDCLI_FN(128, 4) PDCLI_FN(128, 8)
#undef PDCLI_FN
  if (fn) C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, fn, kWarps * 32, 0));
  int device = 0, sms = 1;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  return std::max(1, per_sm) * sms;
}

// Splits per (sequence, kv head): enough CTAs to fill the GPU, with the last wave as full as possible,
// and at least kMinSplitKeys keys per split.
int choose_num_splits(int64_t num_items, int64_t max_context_len, int resident) {
  constexpr int64_t kMinSplitKeys = 256;
  const int64_t max_splits = std::max<int64_t>(1, std::min<int64_t>(256, max_context_len / kMinSplitKeys));
  int best = 1;
  double best_eff = 0.0;
  for (int64_t s = 1; s <= max_splits; ++s) {
    const int64_t ctas = num_items * s;
    const int64_t waves = (ctas + resident - 1) / resident;
    const double eff = double(ctas) / double(waves * resident);
    if (eff > best_eff + 0.02) {  // prefer fewer splits unless clearly better filled
      best_eff = eff;
      best = int(s);
    }
    if (ctas >= 4 * resident) break;
  }
  return best;
}

}  // namespace

int decode_attention_num_splits(int64_t num_items, int64_t max_context_len, int head_dim, int group) {
  return choose_num_splits(num_items, max_context_len, resident_ctas(head_dim, group));
}

// Inputs are validated by the caller (bindings.cpp): head_dim 64 | 128, group 1 | 2 | 4 | 8.
void launch_decode_attention(void* out, float* part_o, float* part_lse, const void* q, const void* k_cache,
                             const void* v_cache, const int* block_tables, const int* context_lens, int batch,
                             int num_heads, int num_kv_heads, int head_dim, int table_width, int block_size,
                             int splits, int64_t q_stride, float scale, bool bf16, cudaStream_t stream) {
  const DecodeArgs a{out, part_o, part_lse, q, k_cache, v_cache, block_tables, context_lens, batch, num_heads,
                     num_kv_heads, table_width, block_size, splits, q_stride, scale * 1.4426950408889634f, stream};
  const int G = num_heads / num_kv_heads;
  if (bf16) {
    if (head_dim == 128) dispatch_group<__nv_bfloat16, 128>(G, a); else dispatch_group<__nv_bfloat16, 64>(G, a);
  } else {
    if (head_dim == 128) dispatch_group<__half, 128>(G, a); else dispatch_group<__half, 64>(G, a);
  }
}
