// The per-warpgroup attention math of the wgmma prefill kernels: their two GEMMs issued and waited for, and
// the mask, online softmax and output on the accumulators: 64 query rows x 128 keys (S) or x 128 dims (O), 64
// floats per thread in the m64nN C layout: element 4j + e at row lane/4 + 8 (e / 2) of the warp's 16, column
// 8j + 2 (lane % 4) + e % 2.
#pragma once
#include <stdint.h>

#include "mma.cuh"
#include "wgmma.cuh"

namespace pdcli {

struct SoftmaxState {
  float row_max[2];  // running max of raw scores, rows lane/4 and lane/4 + 8
  float row_sum[2];  // this thread's partial sums of exp2 (quad-reduced at the end)
};

__device__ __forceinline__ void softmax_init(SoftmaxState& st) {
  st.row_max[0] = st.row_max[1] = -INFINITY;
  st.row_sum[0] = st.row_sum[1] = 0.f;
}

// Bottom-right causal mask: columns past `limit` (+ 8 for the row + 8 half) of each row are -inf. limit =
// the last visible key of row lane/4, relative to column 2 (lane % 4) of the tile.
__device__ __forceinline__ void mask_causal(float (&s)[64], int limit) {
#pragma unroll
  for (int j = 0; j < 16; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e)
      if (j * 8 + (e & 1) > limit + (e >> 1) * 8) s[4 * j + e] = -INFINITY;
}

// One tile of online softmax in the exp2 domain: s becomes P (unnormalised); corr[hh] is the factor O and the
// sums so far take for the new max (rescale_o applies it to O). A row with no visible key so far keeps max -inf
// and sum 0.
__device__ __forceinline__ void softmax_scores(float (&s)[64], SoftmaxState& st, float sl2, float (&corr)[2]) {
#pragma unroll
  for (int hh = 0; hh < 2; ++hh) {
    float mx = st.row_max[hh];
#pragma unroll
    for (int j = 0; j < 16; ++j) mx = fmaxf(mx, fmaxf(s[4 * j + 2 * hh], s[4 * j + 2 * hh + 1]));
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
    const float m_scaled = mx == -INFINITY ? 0.f : mx * sl2;
    corr[hh] = exp2f(st.row_max[hh] * sl2 - m_scaled);
    st.row_max[hh] = mx;
    st.row_sum[hh] *= corr[hh];
#pragma unroll
    for (int j = 0; j < 16; ++j)
#pragma unroll
      for (int e = 2 * hh; e < 2 * hh + 2; ++e) {
        const float pr = exp2f(fmaf(s[4 * j + e], sl2, -m_scaled));
        st.row_sum[hh] += pr;
        s[4 * j + e] = pr;
      }
  }
}

__device__ __forceinline__ void rescale_o(float (&o)[64], const float (&corr)[2]) {
#pragma unroll
  for (int j = 0; j < 16; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) o[4 * j + e] *= corr[e >> 1];
}

// softmax_scores, then O rescaled.
__device__ __forceinline__ void softmax_tile(float (&s)[64], float (&o)[64], SoftmaxState& st, float sl2) {
  float corr[2];
  softmax_scores(s, st, sl2, corr);
  rescale_o(o, corr);
}

// S = Q K^T issued (not waited for): q_rows = this warpgroup's 64 rows of the Q tile, k_tile = the 128-key K
// tile, both [rows][128] as two 128-byte swizzled halves half_bytes apart; 8 k-steps of 16 dims.
template <typename T>
__device__ __forceinline__ void issue_qk(float (&s)[64], uint32_t q_rows, uint32_t k_tile, uint32_t half_bytes,
                                         uint32_t k_sbo) {
#pragma unroll
  for (int i = 0; i < 64; ++i) fence_operand(s[i]);
  wgmma_fence();
#pragma unroll
  for (int kk = 0; kk < 8; ++kk) {
    const uint32_t koff = (kk >> 2) * half_bytes + (kk & 3) * 32;
    wgmma_m64n128k16_ss<T>(s, wgmma_desc_sw128(q_rows + koff, 16, k_sbo), wgmma_desc_sw128(k_tile + koff, 16, k_sbo),
                           kk > 0);
  }
  wgmma_commit();
}

// O += P V issued (not waited for): pa from pack_p, v_tile the 128-key V tile (N-major B operand).
template <typename T>
__device__ __forceinline__ void issue_pv(float (&o)[64], const uint32_t (&pa)[8][4], uint32_t v_tile, uint32_t v_lbo,
                                         uint32_t v_sbo) {
  wgmma_fence();
#pragma unroll
  for (int kk = 0; kk < 8; ++kk)
    wgmma_m64n128k16_rs<T>(o, pa[kk], wgmma_desc_sw128(v_tile + kk * 16 * 128, v_lbo, v_sbo), 1);
  wgmma_commit();
}

// Waits until at most `pending` of this warpgroup's committed GEMM groups are in flight (the newest); with 0,
// acc is then safe to read.
template <int pending = 0>
__device__ __forceinline__ void wait_acc(float (&acc)[64]) {
  wgmma_wait<pending>();
#pragma unroll
  for (int i = 0; i < 64; ++i) fence_operand(acc[i]);
}

// P's A fragments (m16n8k16's A layout per warp): keys [16kk, 16kk + 16) are S blocks 2kk, 2kk + 1; they and o
// fenced for the PV GEMM that follows.
template <typename T>
__device__ __forceinline__ void pack_p(const float (&s)[64], uint32_t (&pa)[8][4], float (&o)[64]) {
#pragma unroll
  for (int kk = 0; kk < 8; ++kk)
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      pa[kk][i] = pack2<T>(s[8 * kk + 2 * i], s[8 * kk + 2 * i + 1]);
      fence_operand(pa[kk][i]);
    }
#pragma unroll
  for (int i = 0; i < 64; ++i) fence_operand(o[i]);
}

// O / l of this thread's two rows, rows of the warp's 16 from row0 on, to out[(row) * row_stride + col]
// (elements); rows at or past `rows` are not written.
template <typename T>
__device__ __forceinline__ void store_o(const float (&o)[64], const SoftmaxState& st, T* out, int64_t row_stride,
                                        int row0, int rows, int lane) {
#pragma unroll
  for (int hh = 0; hh < 2; ++hh) {
    float l = st.row_sum[hh];
    l += __shfl_xor_sync(0xffffffffu, l, 1);
    l += __shfl_xor_sync(0xffffffffu, l, 2);
    const float inv = l > 0.f ? 1.f / l : 0.f;
    const int row = row0 + (lane >> 2) + hh * 8;
    if (row < rows) {
      T* dst = out + row * row_stride + (lane & 3) * 2;
#pragma unroll
      for (int j = 0; j < 16; ++j)
        *reinterpret_cast<uint32_t*>(dst + j * 8) = pack2<T>(o[4 * j + 2 * hh] * inv, o[4 * j + 2 * hh + 1] * inv);
    }
  }
}

}  // namespace pdcli
