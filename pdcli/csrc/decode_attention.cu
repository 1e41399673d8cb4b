// Paged GQA decode attention (one query token per sequence) on tensor cores, split-KV with a
// log-sum-exp merge.
//
// CTA = (kv split, kv head, sequence), kWarps warps. The G <= 8 query heads of the kv head are rows
// 0..G-1 of a 16-row mma.sync A operand (rows G..15 are zero), so S = Q K^T and O += P V run on tensor
// cores and every K/V row is read from HBM once. Warp w owns keys [16w, 16w + 16) of every tile of
// kBlockN = 16 * kWarps keys: it gathers them through the block table with 16-byte cp.async into its
// rows of a kStages-deep shared-memory ring (swizzled as in mma.cuh) and keeps its own online softmax
// (exp2 domain, fp32 state), so warps never wait for each other inside the loop. Their states are
// merged through shared memory at the end, the splits' by a second kernel.
//
// Splits: uniform (every sequence cut into gridDim.x parts of its own length) or, with a plan
// (decode_plan_kernel, once per step), balanced: parts of `chunk` keys for every sequence, so a
// sequence gets parts in proportion to its context and one long context beside many short ones is
// spread over as many CTAs as its share of the keys (with uniform splits its few CTAs ran on long
// after the rest: the step's tail).
//
// Plan (int32): [0] chunk (keys per part, whole tiles), [1] parts in all (S <= S_max), then
// slot_seq[S_max], slot_part[S_max] (the sequence and part of CTA x), seq_offset[B], seq_parts[B].
#include <c10/cuda/CUDAException.h>

#include <algorithm>
#include <map>
#include <mutex>
#include <tuple>

#include "decode_attention.cuh"
#include "launch.cuh"

namespace {

using namespace pdcli_decode;

template <typename T, int D>
__global__ void __launch_bounds__(kThreads, PDCLI_DECODE_MIN_CTAS)
decode_attention_kernel(T* __restrict__ out,              // [B, Hq, D]
                        float* __restrict__ part_o,       // [B, Hq, S, D] when S > 1; planned: [slots, Hq, D]
                        float* __restrict__ part_lse,     // [B, Hq, S] (log2 domain); planned: [slots, Hq]
                        const T* __restrict__ q,          // [B, Hq, D], row stride q_stride
                        const T* __restrict__ k_cache,    // [N, bs, Hk, D]
                        const T* __restrict__ v_cache,
                        const int* __restrict__ block_tables,  // [B, W]
                        const int* __restrict__ context_lens,  // [B]
                        int table_width, int block_shift, int num_kv_heads, int group, int64_t q_stride,
                        float scale_log2,
                        const int* __restrict__ plan,  // balanced splits (see the top), or nullptr: uniform
                        int plan_slots, int batch,
                        int* __restrict__ counters,  // planned, [B * Hk] zeros: parts done; the last one merges
                        bool early_kv) {             // plan and tables were written before the kernel ahead
  wait_ahead(early_kv);
  constexpr int kRowBytes = D * 2, BN = kBlockN, kTileBytes = tile_bytes<D>();
  constexpr int DT = D / 8;                    // n8 tiles of O
  extern __shared__ __align__(128) unsigned char smem[];
  const uint32_t sK = smem_u32(smem);          // [kStages][BN, D]
  const uint32_t sV = sK + kStages * kTileBytes;

  const int kvh = blockIdx.y;
  const int num_heads = num_kv_heads * group;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int g = lane >> 2, t = lane & 3;      // mma fragment row (query head) and column pair

  int split, b, per_split;
  bool direct;        // the sequence is one part: write out, no merge
  int64_t part_base;  // query head h's row of this part in part_o / part_lse: part_base + h * part_stride
  int part_stride;
  int ctx;
  if (plan != nullptr) {
    const int slot = blockIdx.x;
    if (slot >= plan[1]) return;  // the whole CTA: no part left for it this step
    b = plan[2 + slot];
    split = plan[2 + plan_slots + slot];
    ctx = context_lens[b];
    per_split = plan[0];
    direct = plan[2 + 2 * plan_slots + batch + b] == 1;
    part_base = int64_t(slot) * num_heads;
    part_stride = 1;
  } else {
    const int num_splits = gridDim.x;
    split = blockIdx.x;
    b = blockIdx.z;
    ctx = context_lens[b];
    per_split = ((ctx + num_splits - 1) / num_splits + BN - 1) / BN * BN;  // whole tiles
    direct = num_splits == 1;
    part_base = int64_t(b) * num_heads * num_splits + split;
    part_stride = num_splits;
  }
  const int start = min(ctx, split * per_split);
  const int end = min(ctx, start + per_split);
  const int n_tiles = (end - start + BN - 1) / BN;

  // ---- K/V gather: key j is D contiguous elements at slot * Hk * D + kvh * D, slot from the block table.
  //      Lane copies rows kv_row + 4i of the tile (its warp's), chunks c_lo + 8h. ----
  const int* table = block_tables + int64_t(b) * table_width;
  const int block_mask = (1 << block_shift) - 1;
  const int64_t slot_stride = int64_t(num_kv_heads) * D;
  const int kv_row = warp * 16 + (lane >> 3), c_lo = lane & 7;
  const T* k_head = k_cache + int64_t(kvh) * D + c_lo * 8;
  const T* v_head = v_cache + int64_t(kvh) * D + c_lo * 8;
  int slot[kRowPasses];  // slots of this thread's rows of the next tile to issue (-1: past end)
  auto slots_of = [&](int tile) {
#pragma unroll
    for (int i = 0; i < kRowPasses; ++i) {
      const int key = start + tile * BN + kv_row + 4 * i;
      slot[i] = key < end ? (__ldg(table + (key >> block_shift)) << block_shift) + (key & block_mask) : -1;
    }
  };
  auto issue = [&](int stage) { issue_tile<T, D>(sK, sV, stage, slot, slot_stride, kv_row, c_lo, k_head, v_head); };
  int s = 0;
  if (early_kv) {  // the tiles before the newest key (the kernel ahead writes its K/V and Q) load meanwhile
    for (; s < kStages - 1 && s < n_tiles && start + (s + 1) * BN < ctx; ++s) {
      slots_of(s);
      issue(s);
      cp_async_commit();
    }
    pdcli::pdl_wait();
    pdcli::pdl_trigger();
  }
  for (; s < kStages - 1; ++s) {
    if (s < n_tiles) {
      slots_of(s);
      issue(s);
    }
    cp_async_commit();  // group s: tile s (maybe empty)
  }
  if (kStages - 1 < n_tiles) slots_of(kStages - 1);

  // ---- Q as A fragments: a0 = Q[g][16kk + 2t, +1], a2 = Q[g][16kk + 8 + 2t, +1]; a1, a3 (rows 8..15) are 0 ----
  uint32_t qa[D / 16][2];
  {
    const T* qrow = q + int64_t(b) * q_stride + int64_t(kvh * group + g) * D + 2 * t;
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      qa[kk][0] = g < group ? *reinterpret_cast<const uint32_t*>(qrow + kk * 16) : 0u;
      qa[kk][1] = g < group ? *reinterpret_cast<const uint32_t*>(qrow + kk * 16 + 8) : 0u;
    }
  }

  float o[DT][4];  // O[g][dt * 8 + 2t, +1] in [dt][0..1]; [dt][2..3] are rows 8..15 (unused)
#pragma unroll
  for (int dt = 0; dt < DT; ++dt)
#pragma unroll
    for (int e = 0; e < 4; ++e) o[dt][e] = 0.f;
  float m_run = -INFINITY;  // running max of raw scores of row g
  float l_run = 0.f;        // this lane's share of the row's sum of exp2 (quad-reduced at the end)
  uint32_t frag[4];
  ldmatrix_offsets<kRowBytes>(frag, lane);

  for (int n = 0; n < n_tiles; ++n) {
    cp_async_wait<kStages - 2>();  // tile n has landed (this lane's copies) ...
    __syncwarp();                  // ... and the warp's; the warp is done with tile n - 1's stage
    const int ahead = n + kStages - 1;
    if (ahead < n_tiles) {
      issue(ahead % kStages);
      if (ahead + 1 < n_tiles) slots_of(ahead + 1);  // the table reads land while this tile computes
    }
    cp_async_commit();

    const uint32_t stage = (n % kStages) * kTileBytes + warp * 16 * kRowBytes;
    const int room = end - (start + n * BN + warp * 16 + 2 * t);  // keys past end are masked
    attend_tile<T, D>(o, m_run, l_run, qa, sK + stage, sV + stage, frag, room, scale_log2);
  }
  cp_async_wait<0>();  // the ring is free: the merge area
  write_part<T, D>(reinterpret_cast<float*>(smem), o, m_run, l_run, PartOut{b, direct, part_base, part_stride}, out,
                   part_o, part_lse, kvh, group, num_heads, scale_log2);
  if (counters != nullptr && !direct) merge_if_last<T, D>(out, part_o, part_lse, plan, plan_slots, batch, b, kvh,
                                                          group, num_heads, counters + b * num_kv_heads + kvh);
}

// out[b, h] = sum_s w_s * part_o[b, h, s] with w_s = 2^(lse_s - max lse) / sum of those weights.
template <typename T, int D>
__global__ void merge_splits_kernel(T* __restrict__ out, const float* __restrict__ part_o,
                                    const float* __restrict__ part_lse, int num_splits) {
  pdcli::pdl_wait();
  pdcli::pdl_trigger();
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

// The balanced plan's merge: row (b, h) weighs its sequence's parts seq_offset[b] .. + seq_parts[b] (slot-major
// partials: part_o[slot, h]); a sequence of one part was written by the decode kernel. CTA = (sequence, kv head),
// threads (d, query head of the group): a step of short sequences launches batch x Hk CTAs that return at once,
// not batch x Hq.
template <typename T, int D>
__global__ void merge_planned_kernel(T* __restrict__ out, const float* __restrict__ part_o,
                                     const float* __restrict__ part_lse, const int* __restrict__ plan, int plan_slots,
                                     int batch, int num_heads) {
  pdcli::pdl_wait();
  pdcli::pdl_trigger();
  const int b = int(blockIdx.x / (num_heads / blockDim.y));
  const int h = int(blockIdx.x % (num_heads / blockDim.y)) * blockDim.y + threadIdx.y;
  const int64_t row = int64_t(b) * num_heads + h;
  const int n = plan[2 + 2 * plan_slots + batch + b];
  if (n <= 1) return;
  const int off = plan[2 + 2 * plan_slots + b];
  float mx = -INFINITY;
  for (int s = 0; s < n; ++s) mx = fmaxf(mx, part_lse[int64_t(off + s) * num_heads + h]);
  const float ref = mx == -INFINITY ? 0.f : mx;
  for (int d = threadIdx.x; d < D; d += blockDim.x) {
    float sum = 0.f, acc = 0.f;
    for (int s = 0; s < n; ++s) {
      const int64_t r = int64_t(off + s) * num_heads + h;
      const float w = exp2f(part_lse[r] - ref);
      sum += w;
      acc += w * part_o[r * D + d];
    }
    out[row * D + d] = from_float<T>(sum > 0.f ? acc / sum : 0.f);
  }
}

// The balanced plan of one step (one CTA): chunk = the keys of all sequences over target_slots parts, at least
// min_chunk, in whole tiles (at least one); sequence b gets max(1, ceil(ctx_b / chunk)) parts, at most target_slots + B in all.
constexpr int kPlanThreads = 1024;
__global__ void __launch_bounds__(kPlanThreads)
decode_plan_kernel(int* __restrict__ plan, const int* __restrict__ context_lens, int batch, int plan_slots,
                   int target_slots, int min_chunk) {
  __shared__ long long sm_sum[kPlanThreads];
  __shared__ int sm_scan[kPlanThreads];
  __shared__ int sm_chunk;
  const int tid = threadIdx.x;
  const int per = (batch + kPlanThreads - 1) / kPlanThreads;  // consecutive sequences of this thread
  const int lo = min(batch, tid * per), hi = min(batch, lo + per);
  long long keys = 0;
  for (int i = lo; i < hi; ++i) keys += context_lens[i];
  sm_sum[tid] = keys;
  __syncthreads();
  for (int stride = kPlanThreads / 2; stride > 0; stride >>= 1) {
    if (tid < stride) sm_sum[tid] += sm_sum[tid + stride];
    __syncthreads();
  }
  if (tid == 0) {
    const long long per_part = max((long long)min_chunk, (sm_sum[0] + target_slots - 1) / max(1, target_slots));
    sm_chunk = int(max(1LL, (per_part + kBlockN - 1) / kBlockN)) * kBlockN;
  }
  __syncthreads();
  const int chunk = sm_chunk;
  int parts = 0;
  for (int i = lo; i < hi; ++i) parts += max(1, (context_lens[i] + chunk - 1) / chunk);
  sm_scan[tid] = parts;
  __syncthreads();
  for (int stride = 1; stride < kPlanThreads; stride <<= 1) {  // inclusive scan (Hillis-Steele)
    const int add = tid >= stride ? sm_scan[tid - stride] : 0;
    __syncthreads();
    sm_scan[tid] += add;
    __syncthreads();
  }
  int offset = sm_scan[tid] - parts;  // exclusive
  int* slot_seq = plan + 2;
  int* slot_part = plan + 2 + plan_slots;
  int* seq_offset = plan + 2 + 2 * plan_slots;
  int* seq_parts = seq_offset + batch;
  for (int i = lo; i < hi; ++i) {
    const int n = max(1, (context_lens[i] + chunk - 1) / chunk);
    seq_offset[i] = offset;
    seq_parts[i] = n;
    for (int p = 0; p < n && offset + p < plan_slots; ++p) {
      slot_seq[offset + p] = i;
      slot_part[offset + p] = p;
    }
    offset += n;
  }
  if (tid == kPlanThreads - 1) {
    plan[0] = chunk;
    plan[1] = min(sm_scan[tid], plan_slots);
  }
}

template <typename T, int D>
void launch(const DecodeArgs& a) {
  if (a.plan && a.persistent) {
    launch_persistent<T, D>(a);
    if (a.counters == nullptr)
      launch_pdl(merge_planned_kernel<T, D>, dim3(a.batch * a.num_kv_heads), dim3(D, a.num_heads / a.num_kv_heads), 0,
                 a.stream, static_cast<T*>(a.out), a.part_o, a.part_lse, a.plan, a.plan_slots, a.batch, a.num_heads);
    return;
  }
  auto kernel = decode_attention_kernel<T, D>;
  static const bool attr_set = [&] {  // once per instantiation (the attribute is per function, all devices)
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_bytes<D>()));
    return true;
  }();
  (void)attr_set;
  const dim3 grid = a.plan ? dim3(a.plan_slots, a.num_kv_heads, 1) : dim3(a.splits, a.num_kv_heads, a.batch);
  launch_pdl(kernel, grid, dim3(kThreads), smem_bytes<D>(), a.stream,
      static_cast<T*>(a.out), a.part_o, a.part_lse, static_cast<const T*>(a.q), static_cast<const T*>(a.k_cache),
      static_cast<const T*>(a.v_cache), a.block_tables, a.context_lens, a.table_width, a.block_shift, a.num_kv_heads,
      a.num_heads / a.num_kv_heads, a.q_stride, a.scale_log2, a.plan, a.plan_slots, a.batch, a.counters,
      a.early_kv);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (a.plan && a.counters == nullptr) {
    launch_pdl(merge_planned_kernel<T, D>, dim3(a.batch * a.num_kv_heads), dim3(D, a.num_heads / a.num_kv_heads), 0,
               a.stream, static_cast<T*>(a.out), a.part_o, a.part_lse, a.plan, a.plan_slots, a.batch, a.num_heads);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  } else if (a.splits > 1) {
    launch_pdl(merge_splits_kernel<T, D>, dim3(a.batch * a.num_heads), dim3(D), 0, a.stream, static_cast<T*>(a.out),
               a.part_o, a.part_lse, a.splits);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

// CTAs of the decode kernel that fit on the GPU at once (queried once per device and head_dim).
int resident_ctas(int D) {
  int device = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  static std::mutex mu;
  static std::map<std::tuple<int, int>, int> cache;
  const std::lock_guard<std::mutex> lock(mu);
  const auto key = std::make_tuple(device, D);
  if (auto it = cache.find(key); it != cache.end()) return it->second;
  int per_sm = 0, sms = 1;
  if (D == 128) {
    auto fn = decode_attention_kernel<__nv_bfloat16, 128>;
    C10_CUDA_CHECK(cudaFuncSetAttribute(fn, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_bytes<128>()));
    C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, fn, kThreads, smem_bytes<128>()));
  } else {
    auto fn = decode_attention_kernel<__nv_bfloat16, 64>;
    C10_CUDA_CHECK(cudaFuncSetAttribute(fn, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_bytes<64>()));
    C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, fn, kThreads, smem_bytes<64>()));
  }
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  return cache[key] = std::max(1, per_sm) * sms;
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

int decode_attention_resident_ctas(int head_dim) { return resident_ctas(head_dim); }

void set_pdl(bool on) { pdcli::pdl_on() = on; }

int decode_attention_num_splits(int64_t batch, int64_t num_kv_heads, int64_t max_context_len, int head_dim) {
  return choose_num_splits(batch * num_kv_heads, max_context_len, resident_ctas(head_dim));
}

// Inputs are validated by the caller (bindings.cpp): head_dim 64 | 128, 1 <= group <= 8, block_size a power of 2.
void launch_decode_attention(void* out, float* part_o, float* part_lse, const void* q, const void* k_cache,
                             const void* v_cache, const int* block_tables, const int* context_lens, int batch,
                             int num_heads, int num_kv_heads, int head_dim, int table_width, int block_size,
                             int splits, int64_t q_stride, float scale, bool bf16, cudaStream_t stream,
                             const int* plan, int plan_slots, int* counters, bool early_kv, bool persistent) {
  int shift = 0;
  while ((1 << shift) < block_size) ++shift;
  const DecodeArgs a{out, part_o, part_lse, q, k_cache, v_cache, block_tables, context_lens, batch, num_heads,
                     num_kv_heads, table_width, shift, splits, q_stride, scale * 1.4426950408889634f, stream, plan,
                     plan_slots, counters, plan != nullptr && early_kv, plan != nullptr && persistent};
  if (bf16) {
    if (head_dim == 128) launch<__nv_bfloat16, 128>(a); else launch<__nv_bfloat16, 64>(a);
  } else {
    if (head_dim == 128) launch<__half, 128>(a); else launch<__half, 64>(a);
  }
}

void launch_decode_plan(int* plan, const int* context_lens, int batch, int plan_slots, int target_slots,
                        int min_chunk, cudaStream_t stream) {
  decode_plan_kernel<<<1, kPlanThreads, 0, stream>>>(plan, context_lens, batch, plan_slots, target_slots,
                                                     min_chunk);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}
