// The attention block's glue between the qkv projection and attention, in one pass over qkv:
// optional per-head RMSNorm of q and k (Qwen3), GPT-NeoX rotary embedding of q and k, q written to a
// contiguous [T, Hq, D] output, k and v written to their paged-cache slots (16-byte stores).
// Each row (a token's head) is handled by D / 8 lanes holding 8 values each; the rotary partner of
// value i (i +- D/2) sits in lane ^ (D / 16). Rounding follows the torch reference step by step.
#include <c10/cuda/CUDAException.h>

#include "common.cuh"
#include "launch.cuh"

namespace {

using pdcli::pack8;
using pdcli::round_to;
using pdcli::to_float8;

template <typename T, int D>
__global__ void qkv_rope_store_kernel(T* __restrict__ q_out, T* __restrict__ k_cache, T* __restrict__ v_cache,
                                      const T* __restrict__ qkv, const int64_t* __restrict__ positions,
                                      const int64_t* __restrict__ slot_mapping, const float* __restrict__ cos,
                                      const float* __restrict__ sin, const T* __restrict__ q_norm,
                                      const T* __restrict__ k_norm, float eps, int64_t num_rows, int num_heads,
                                      int num_kv_heads, int64_t qkv_stride) {
  pdcli::pdl_wait();
  pdcli::pdl_trigger();
  constexpr int kLanes = D / 8;  // lanes per row, a power of two <= 32
  const int64_t row = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) / kLanes;
  const int lane = threadIdx.x % kLanes;
  const int heads = num_heads + 2 * num_kv_heads;
  // whole rows per warp, so the shuffles below see every lane of a row; rows past the end idle along
  const bool active = row < num_rows;
  const int64_t t = active ? row / heads : 0;
  const int h = active ? int(row % heads) : 0;
  float x[8];
  to_float8<T>(*reinterpret_cast<const uint4*>(qkv + t * qkv_stride + int64_t(h) * D + lane * 8), x);
  const bool is_q = h < num_heads, is_v = h >= num_heads + num_kv_heads;
  // Every lane runs the same shuffles (v rows compute and then drop the result) so that rows of
  // different kinds may share a warp.
  float y[8];
#pragma unroll
  for (int j = 0; j < 8; ++j) y[j] = x[j];
  if (q_norm != nullptr) {  // kernel-uniform: q_norm and k_norm are both set or both null
    float ss = 0.f;
#pragma unroll
    for (int j = 0; j < 8; ++j) ss += y[j] * y[j];
#pragma unroll
    for (int o = kLanes / 2; o > 0; o >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, o);
    const float rstd = rsqrtf(ss / float(D) + eps);
    float w[8];
    to_float8<T>(*reinterpret_cast<const uint4*>((is_q ? q_norm : k_norm) + lane * 8), w);
#pragma unroll
    for (int j = 0; j < 8; ++j) y[j] = round_to<T>(w[j] * round_to<T>(y[j] * rstd));
  }
  const int64_t pos = positions[t];
  const float* c = cos + pos * D + lane * 8;
  const float* s = sin + pos * D + lane * 8;
  const float sign = lane < kLanes / 2 ? -1.f : 1.f;  // first half: x1 c - x2 s; second: x2 c + x1 s
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    const float partner = __shfl_xor_sync(0xffffffffu, y[j], kLanes / 2);
    const float cj = round_to<T>(c[j]), sj = round_to<T>(s[j]);
    y[j] = round_to<T>(y[j] * cj) + round_to<T>(sign * partner * sj);
  }
  if (!is_v) {
#pragma unroll
    for (int j = 0; j < 8; ++j) x[j] = y[j];
  }
  if (!active) return;
  const uint4 packed = pack8<T>(x);
  if (is_q) {
    *reinterpret_cast<uint4*>(q_out + (t * num_heads + h) * D + lane * 8) = packed;
    return;
  }
  const int64_t slot = slot_mapping[t];
  if (slot < 0) return;  // padding token
  const int hk = is_v ? h - num_heads - num_kv_heads : h - num_heads;
  T* dst = (is_v ? v_cache : k_cache) + (slot * num_kv_heads + hk) * D + lane * 8;
  *reinterpret_cast<uint4*>(dst) = packed;
}

template <typename T, int D>
void launch(void* q_out, void* k_cache, void* v_cache, const void* qkv, const int64_t* positions,
            const int64_t* slot_mapping, const float* cos, const float* sin, const void* q_norm, const void* k_norm,
            float eps, int64_t num_tokens, int num_heads, int num_kv_heads, int64_t qkv_stride, cudaStream_t stream) {
  const int64_t rows = num_tokens * (num_heads + 2 * num_kv_heads);
  const int threads = 256;
  const int64_t blocks = (rows * (D / 8) + threads - 1) / threads;
  pdcli::launch_pdl(qkv_rope_store_kernel<T, D>, dim3(blocks), dim3(threads), 0, stream,
      static_cast<T*>(q_out), static_cast<T*>(k_cache), static_cast<T*>(v_cache), static_cast<const T*>(qkv),
      positions, slot_mapping, cos, sin, static_cast<const T*>(q_norm), static_cast<const T*>(k_norm), eps, rows,
      num_heads, num_kv_heads, qkv_stride);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

// Inputs are validated by the caller (bindings.cpp). qkv [T, (Hq + 2 Hk) D] rows of stride qkv_stride;
// q_out [T, Hq, D] contiguous; caches [num_blocks, block_size, Hk, D]; cos, sin [max_pos, D] fp32.
void launch_qkv_rope_store(void* q_out, void* k_cache, void* v_cache, const void* qkv, const int64_t* positions,
                           const int64_t* slot_mapping, const float* cos, const float* sin, const void* q_norm,
                           const void* k_norm, float eps, int64_t num_tokens, int num_heads, int num_kv_heads,
                           int head_dim, int64_t qkv_stride, bool bf16, cudaStream_t stream) {
  if (num_tokens == 0) return;
#define PDCLI_ROPE(T, D)                                                                                          \
  launch<T, D>(q_out, k_cache, v_cache, qkv, positions, slot_mapping, cos, sin, q_norm, k_norm, eps, num_tokens, \
               num_heads, num_kv_heads, qkv_stride, stream)
  if (bf16) {
    if (head_dim == 64) PDCLI_ROPE(__nv_bfloat16, 64);
    else PDCLI_ROPE(__nv_bfloat16, 128);
  } else {
    if (head_dim == 64) PDCLI_ROPE(__half, 64);
    else PDCLI_ROPE(__half, 128);
  }
#undef PDCLI_ROPE
}
