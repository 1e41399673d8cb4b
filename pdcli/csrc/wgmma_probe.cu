// A one-warpgroup check of the prefill kernels' two wgmma products on one tile, apart from the attention around
// them: S = A K^T (A [64, 128] and K [128, 128] K-major in shared memory, as Q and K) and O = bf16(S) V (S's
// accumulators repacked as the register A operand, V [128, 128] N-major, as P and V), both fp32 out, through the
// kernels' own issue_qk / pack_p / issue_pv (wgmma_softmax.cuh) and strides (PDCLI_WGMMA_DESC): when the attention
// test fails, this says which product is wrong.
#include <c10/cuda/CUDAException.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#include "mma.cuh"
#include "prefill_params.cuh"
#include "wgmma.cuh"
#include "wgmma_softmax.cuh"

namespace {

using namespace pdcli;

constexpr int kSmem = 1024 + 3 * 128 * 256;  // alignment slack, A (in a 128-row tile, as Q), K, V

struct ProbeParams {
  const void *a, *k, *v;  // [64, 128], [128, 128], [128, 128] row-major
  float *s_out, *o_out;   // [64, 128]
  uint32_t k_sbo, v_lbo, v_sbo;
};

template <typename T>
__global__ void __launch_bounds__(128, 1) wgmma_probe_kernel(const ProbeParams pp) {
#ifdef PDCLI_HAS_WGMMA
  extern __shared__ unsigned char smem_raw[];
  const uint32_t raw_u = smem_u32(smem_raw);
  const uint32_t sA = (raw_u + 1023) & ~1023u;
  const uint32_t sK = sA + 128 * 256, sV = sK + 128 * 256;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  auto stage = [&](const void* src, uint32_t dst, int rows) {  // row-major [rows, 128] -> a 128-row tile's halves
    for (int i = tid; i < rows * 16; i += 128) {
      const int row = i >> 4, c = i & 15;
      const uint4 val = reinterpret_cast<const uint4*>(src)[i];
      asm volatile("st.shared.v4.b32 [%0], {%1, %2, %3, %4};\n" ::"r"(dst + sw128_tile_off(row, c, 128 * 128)),
                   "r"(val.x), "r"(val.y), "r"(val.z), "r"(val.w));
    }
  };
  stage(pp.a, sA, 64);
  stage(pp.k, sK, 128);
  stage(pp.v, sV, 128);
  fence_proxy_async_shared();
  __syncthreads();

  float s[64], o[64];
#pragma unroll
  for (int i = 0; i < 64; ++i) s[i] = o[i] = 0.f;
  issue_qk<T>(s, sA, sK, 128 * 128, pp.k_sbo);  // A as warpgroup 0's rows of a 128-row Q tile
  wait_acc(s);
  uint32_t pa[8][4];
  pack_p<T>(s, pa, o);
  issue_pv<T>(o, pa, sV, pp.v_lbo, pp.v_sbo);
  wait_acc(o);
  // accumulator element 4j + e: row 16 warp + lane/4 + 8 (e / 2), column 8j + 2 (lane % 4) + e % 2
#pragma unroll
  for (int j = 0; j < 16; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int idx = (16 * warp + (lane >> 2) + 8 * (e >> 1)) * 128 + 8 * j + 2 * (lane & 3) + (e & 1);
      pp.s_out[idx] = s[4 * j + e];
      pp.o_out[idx] = o[4 * j + e];
    }
#endif
}

}  // namespace

namespace pdcli {

// Inputs validated by the caller (bindings.cpp), prefill_attention_sm90_available(128) included.
void launch_wgmma_probe(const void* a, const void* k, const void* v, float* s_out, float* o_out, bool bf16,
                        cudaStream_t stream) {
  ProbeParams pp{a, k, v, s_out, o_out, wgmma_desc_override(0, 1024), wgmma_desc_override(1, 128 * 128),
                 wgmma_desc_override(2, 1024)};
  auto kernel = bf16 ? wgmma_probe_kernel<__nv_bfloat16> : wgmma_probe_kernel<__half>;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmem));
  kernel<<<1, 128, kSmem, stream>>>(pp);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace pdcli
