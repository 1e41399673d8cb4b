// Two attention outputs of the same queries over disjoint key sets, merged by their log-sum-exps (natural log):
// out = (a * exp(la - m) + b * exp(lb - m)) / (exp(la - m) + exp(lb - m)), m = max(la, lb), in fp32, one pass.
// A long prompt's later chunk: a over its cached prefix, b over its own keys (kernels/chunk_sdpa.py).
#include <c10/cuda/CUDAException.h>

#include <math.h>

#include "common.cuh"

namespace {

using pdcli::pack8;
using pdcli::to_float8;

// One thread per 8 values of a (token, head) row; vecs = D / 8 threads per row.
template <typename T>
__global__ void merge_attn_states_kernel(T* __restrict__ out, const T* __restrict__ a, const T* __restrict__ b,
                                         const float* __restrict__ la, const float* __restrict__ lb, int64_t rows,
                                         int num_heads, int vecs, int64_t a_st, int64_t a_sh, int64_t b_st,
                                         int64_t b_sh, int64_t la_sh, int64_t la_st, int64_t lb_sh, int64_t lb_st) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t row = i / vecs;  // token * num_heads + head
  if (row >= rows) return;
  const int v = static_cast<int>(i - row * vecs);
  const int64_t t = row / num_heads;
  const int64_t h = row - t * num_heads;
  const float x = la[h * la_sh + t * la_st], y = lb[h * lb_sh + t * lb_st];
  const float m = fmaxf(x, y);
  float wa = 0.f, wb = 0.f;
  if (m != -INFINITY) {  // both -inf: a row with no keys at all, written as zeros
    wa = __expf(x - m);
    wb = __expf(y - m);
    const float s = 1.f / (wa + wb);
    wa *= s;
    wb *= s;
  }
  float fa[8], fb[8];
  to_float8<T>(*reinterpret_cast<const uint4*>(a + t * a_st + h * a_sh + v * 8), fa);
  to_float8<T>(*reinterpret_cast<const uint4*>(b + t * b_st + h * b_sh + v * 8), fb);
#pragma unroll
  for (int j = 0; j < 8; ++j) fa[j] = fa[j] * wa + fb[j] * wb;
  *reinterpret_cast<uint4*>(out + row * vecs * 8 + v * 8) = pack8<T>(fa);
}

}  // namespace

// Inputs are validated by the caller (bindings.cpp). out [T, H, D] contiguous; a, b: element (t, h, d) at
// t * st + h * sh + d (16-byte aligned rows); la, lb fp32: (h, t) at h * sh + t * st.
void launch_merge_attn_states(void* out, const void* a, const void* b, const float* la, const float* lb,
                              int64_t tokens, int num_heads, int head_dim, int64_t a_st, int64_t a_sh, int64_t b_st,
                              int64_t b_sh, int64_t la_sh, int64_t la_st, int64_t lb_sh, int64_t lb_st, bool bf16,
                              cudaStream_t stream) {
  const int64_t rows = tokens * num_heads;
  if (rows == 0) return;
  const int vecs = head_dim / 8, threads = 256;
  const int64_t blocks = (rows * vecs + threads - 1) / threads;
  if (bf16)
    merge_attn_states_kernel<__nv_bfloat16><<<blocks, threads, 0, stream>>>(
        static_cast<__nv_bfloat16*>(out), static_cast<const __nv_bfloat16*>(a), static_cast<const __nv_bfloat16*>(b),
        la, lb, rows, num_heads, vecs, a_st, a_sh, b_st, b_sh, la_sh, la_st, lb_sh, lb_st);
  else
    merge_attn_states_kernel<__half><<<blocks, threads, 0, stream>>>(
        static_cast<__half*>(out), static_cast<const __half*>(a), static_cast<const __half*>(b), la, lb, rows,
        num_heads, vecs, a_st, a_sh, b_st, b_sh, la_sh, la_st, lb_sh, lb_st);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}
