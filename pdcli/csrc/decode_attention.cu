// Paged GQA decode attention (one query token per sequence), split-KV with a log-sum-exp merge.
//
// CTA = (kv split, kv head, sequence). All G query heads of the kv head live in the CTA, so each
// K/V row is read from HBM exactly once. A K/V row of one head is D * 2 bytes; LPR = D / 8 lanes
// hold 16 bytes of it each, so a warp covers RPW = 32 / LPR rows per step. Every lane keeps its
// 8-element slice of the G query vectors and of the G output accumulators in registers, loads
// K/V with 16-byte streaming loads (UNROLL rows in flight per lane), reduces q.k across its LPR
// lanes with shuffles and runs an online softmax in the exp2 domain with fp32 state.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <torch/extension.h>

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

template <typename T, int D, int G>
void launch(torch::Tensor& out, torch::Tensor& q, torch::Tensor& k_cache, torch::Tensor& v_cache,
            torch::Tensor& block_tables, torch::Tensor& context_lens, float scale_log2, int num_splits) {
  const int B = q.size(0), Hq = q.size(1), Hk = k_cache.size(2);
  auto stream = at::cuda::getCurrentCUDAStream();
  torch::Tensor part_o, part_lse;
  if (num_splits > 1) {
    part_o = torch::empty({B, Hq, num_splits, D}, q.options().dtype(torch::kFloat32));
    part_lse = torch::empty({B, Hq, num_splits}, q.options().dtype(torch::kFloat32));
  }
  dim3 grid(num_splits, Hk, B);
  decode_attention_kernel<T, D, G><<<grid, kWarps * 32, 0, stream>>>(
      reinterpret_cast<T*>(out.data_ptr()), num_splits > 1 ? part_o.data_ptr<float>() : nullptr,
      num_splits > 1 ? part_lse.data_ptr<float>() : nullptr, reinterpret_cast<const T*>(q.data_ptr()),
      reinterpret_cast<const T*>(k_cache.data_ptr()), reinterpret_cast<const T*>(v_cache.data_ptr()),
      block_tables.data_ptr<int>(), context_lens.data_ptr<int>(), block_tables.size(1), k_cache.size(1), Hk,
      q.stride(0), scale_log2);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (num_splits > 1) {
    merge_splits_kernel<T, D><<<B * Hq, D, 0, stream>>>(reinterpret_cast<T*>(out.data_ptr()), part_o.data_ptr<float>(),
                                                        part_lse.data_ptr<float>(), num_splits);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

template <typename T, int D>
void dispatch_group(int G, torch::Tensor& out, torch::Tensor& q, torch::Tensor& k_cache, torch::Tensor& v_cache,
                    torch::Tensor& block_tables, torch::Tensor& context_lens, float scale_log2, int num_splits) {
  switch (G) {
    case 1: return launch<T, D, 1>(out, q, k_cache, v_cache, block_tables, context_lens, scale_log2, num_splits);
    case 2: return launch<T, D, 2>(out, q, k_cache, v_cache, block_tables, context_lens, scale_log2, num_splits);
    case 4: return launch<T, D, 4>(out, q, k_cache, v_cache, block_tables, context_lens, scale_log2, num_splits);
    case 8: return launch<T, D, 8>(out, q, k_cache, v_cache, block_tables, context_lens, scale_log2, num_splits);
    default: TORCH_CHECK(false, "decode_attention: query heads per kv head must be 1, 2, 4 or 8, got ", G);
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
  return std::max(1, per_sm) * at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
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

void decode_attention(torch::Tensor out, torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                      torch::Tensor block_tables, torch::Tensor context_lens, double scale, int64_t num_splits,
                      int64_t max_context_len) {
  TORCH_CHECK(q.is_cuda() && out.is_cuda() && k_cache.is_cuda() && v_cache.is_cuda() && block_tables.is_cuda() &&
                  context_lens.is_cuda(), "decode_attention: all tensors must be on the GPU");
  TORCH_CHECK(q.dim() == 3 && q.stride(2) == 1 && q.stride(1) == q.size(2), "decode_attention: q must be [B, Hq, D] with contiguous heads");
  TORCH_CHECK(out.is_contiguous() && out.sizes() == q.sizes(), "decode_attention: out must be contiguous like q");
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.is_contiguous() && v_cache.is_contiguous() && v_cache.sizes() == k_cache.sizes(),
              "decode_attention: caches must be contiguous [N, bs, Hk, D]");
  TORCH_CHECK(q.scalar_type() == k_cache.scalar_type() && v_cache.scalar_type() == q.scalar_type() &&
                  out.scalar_type() == q.scalar_type(), "decode_attention: dtype mismatch");
  TORCH_CHECK(block_tables.scalar_type() == torch::kInt32 && block_tables.is_contiguous() && block_tables.size(0) == q.size(0),
              "decode_attention: block_tables must be contiguous int32 [B, W]");
  TORCH_CHECK(context_lens.scalar_type() == torch::kInt32 && context_lens.numel() == q.size(0),
              "decode_attention: context_lens must be int32 [B]");
  const int D = q.size(2), Hq = q.size(1), Hk = k_cache.size(2);
  TORCH_CHECK(k_cache.size(3) == D && Hq % Hk == 0, "decode_attention: head shape mismatch");
  if (q.size(0) == 0) return;
  int splits = num_splits > 0 ? num_splits : choose_num_splits(q.size(0) * Hk, max_context_len, resident_ctas(D, Hq / Hk));
  splits = std::min(splits, 256);
  const float scale_log2 = float(scale) * 1.4426950408889634f;
  const int G = Hq / Hk;
#define PDCLI_DISPATCH_D(T)                                                                                      \
  if (D == 128) dispatch_group<T, 128>(G, out, q, k_cache, v_cache, block_tables, context_lens, scale_log2, splits); \
  else if (D == 64) dispatch_group<T, 64>(G, out, q, k_cache, v_cache, block_tables, context_lens, scale_log2, splits); \
  else TORCH_CHECK(false, "decode_attention: head_dim must be 64 or 128, got ", D);
  if (q.scalar_type() == torch::kBFloat16) {
    PDCLI_DISPATCH_D(__nv_bfloat16)
  } else if (q.scalar_type() == torch::kFloat16) {
    PDCLI_DISPATCH_D(__half)
  } else {
    TORCH_CHECK(false, "decode_attention: dtype must be bfloat16 or float16");
  }
#undef PDCLI_DISPATCH_D
}
