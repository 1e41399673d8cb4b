// Issue 26 experiment: how much HBM bandwidth one SM can draw, by three ways of reading (16-byte loads into
// registers; 16-byte cp.async into a shared ring; cp.async.bulk of whole chunks completing on an mbarrier), with
// one CTA per SM (the dynamic shared memory asked for keeps it so) over n CTAs. The decode attention reaches the
// copy rate only on most of the SMs (overlap_probe/green.py): this says whether another way of reading could do
// it from fewer. Every byte is read once; a checksum per CTA keeps the reads from being dropped.
#include <c10/cuda/CUDAException.h>
#include <c10/util/Exception.h>

#include <stdint.h>

namespace {

constexpr int kThreads = 256;
constexpr int kSmem = 200 * 1024;  // > half an SM's shared memory: one CTA per SM

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// CTA b reads [b * per_cta, (b + 1) * per_cta) bytes of src (per_cta a multiple of chunk).
__global__ void __launch_bounds__(kThreads, 1) ldg_kernel(const int4* __restrict__ src, int64_t per_cta, int* sums) {
  const int4* p = src + blockIdx.x * (per_cta / 16);
  int acc = 0;
  const int64_t n = per_cta / 16;
  int64_t i = threadIdx.x;
  for (; i + 7 * kThreads < n; i += 8 * kThreads) {
    int4 v[8];
#pragma unroll
    for (int u = 0; u < 8; ++u) v[u] = __ldg(p + i + u * kThreads);
#pragma unroll
    for (int u = 0; u < 8; ++u) acc ^= v[u].x ^ v[u].w;
  }
  for (; i < n; i += kThreads) {
    const int4 v = __ldg(p + i);
    acc ^= v.x ^ v.w;
  }
  atomicXor(sums + blockIdx.x, acc);
}

// A ring of S chunks of `chunk` bytes; every thread copies its 16-byte pieces of a chunk; chunk c is read (one
// word a thread) once its group and those before have landed, S - 1 chunks still in flight.
template <int S>
__global__ void __launch_bounds__(kThreads, 1) cp_async_kernel(const char* __restrict__ src, int64_t per_cta,
                                                               int chunk, int* sums) {
  extern __shared__ __align__(128) char ring[];
  const char* p = src + blockIdx.x * per_cta;
  const int64_t chunks = per_cta / chunk;
  int acc = 0;
  auto issue = [&](int64_t c) {  // an empty group past the end keeps the count
    if (c < chunks) {
      char* dst = ring + (c % S) * chunk;
      for (int off = threadIdx.x * 16; off < chunk; off += kThreads * 16)
        asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(smem_u32(dst + off)), "l"(p + c * chunk + off));
    }
    asm volatile("cp.async.commit_group;\n" ::: "memory");
  };
  for (int64_t c = 0; c < S - 1; ++c) issue(c);
  for (int64_t c = 0; c < chunks; ++c) {
    issue(c + S - 1);  // into the slot of chunk c - 1, read last round
    asm volatile("cp.async.wait_group %0;\n" ::"n"(S - 1) : "memory");
    __syncthreads();  // every thread's pieces of chunk c landed
    acc ^= reinterpret_cast<const int*>(ring + (c % S) * chunk)[threadIdx.x];
    __syncthreads();
  }
  atomicXor(sums + blockIdx.x, acc);
}

// The same ring filled by one thread with cp.async.bulk, a chunk's arrival counted on its mbarrier in bytes.
__global__ void __launch_bounds__(kThreads, 1) bulk_kernel(const char* __restrict__ src, int64_t per_cta, int chunk,
                                                           int stages, int* sums, bool evict_first) {
  extern __shared__ __align__(128) char ring[];
  __shared__ __align__(8) uint64_t full[16];
  const char* p = src + blockIdx.x * per_cta;
  const int64_t chunks = per_cta / chunk;
  if (threadIdx.x == 0)
    for (int s = 0; s < stages; ++s)
      asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;\n" ::"r"(smem_u32(full + s)));
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  __syncthreads();
  uint64_t policy;  // method 3: the reads marked first to leave L2 (a GEMM beside them keeps its tiles there)
  asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;\n" : "=l"(policy));
  auto issue = [&](int64_t c) {  // thread 0
    const int s = int(c % stages);
    const uint32_t bar = smem_u32(full + s);
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(chunk) : "memory");
    if (evict_first)
      asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes.L2::cache_hint [%0], [%1], %2, [%3], %4;\n"
                   ::"r"(smem_u32(ring + s * chunk)), "l"(p + c * chunk), "r"(chunk), "r"(bar), "l"(policy) : "memory");
    else
      asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n"
                   ::"r"(smem_u32(ring + s * chunk)), "l"(p + c * chunk), "r"(chunk), "r"(bar) : "memory");
  };
  if (threadIdx.x == 0)
    for (int64_t c = 0; c < stages && c < chunks; ++c) issue(c);
  int acc = 0;
  for (int64_t c = 0; c < chunks; ++c) {
    const int s = int(c % stages);
    const uint32_t parity = uint32_t((c / stages) & 1);
    uint32_t done = 0;
    while (!done)
      asm volatile("{\n.reg .pred q;\nmbarrier.try_wait.parity.shared::cta.b64 q, [%1], %2;\nselp.u32 %0, 1, 0, q;\n}\n"
                   : "=r"(done) : "r"(smem_u32(full + s)), "r"(parity) : "memory");
    acc ^= reinterpret_cast<const int*>(ring + s * chunk)[threadIdx.x];
    __syncthreads();  // everyone read the slot: refill it
    if (threadIdx.x == 0 && c + stages < chunks) issue(c + stages);
  }
  atomicXor(sums + blockIdx.x, acc);
}

}  // namespace

// Reads per_cta bytes per CTA from p with n_ctas CTAs (one per SM) by `method` (0 ldg, 1 cp.async, 2 bulk, 3 bulk
// marked L2 evict-first), each
// CTA's checksum to sums[CTA] (zeroed by the caller). chunk: bytes a ring slot, a multiple of 4,096.
void launch_read(const char* p, int64_t per_cta, int n_ctas, int method, int chunk, int stages, int* sums,
                 cudaStream_t stream) {
  TORCH_CHECK(stages >= 2 && stages <= 16 && chunk % 4096 == 0 && int64_t(chunk) * stages <= kSmem,
              "sm_bandwidth: 2-16 stages of 4 KB multiples within ", kSmem, " bytes");
  if (method == 0) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(ldg_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmem));
    ldg_kernel<<<n_ctas, kThreads, kSmem, stream>>>(reinterpret_cast<const int4*>(p), per_cta, sums);
  } else if (method == 1) {
    TORCH_CHECK(stages == 2 || stages == 4 || stages == 8, "cp.async: 2, 4 or 8 stages");
    auto kernel = stages == 2 ? cp_async_kernel<2> : stages == 4 ? cp_async_kernel<4> : cp_async_kernel<8>;
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmem));
    kernel<<<n_ctas, kThreads, kSmem, stream>>>(p, per_cta, chunk, sums);
  } else {
    C10_CUDA_CHECK(cudaFuncSetAttribute(bulk_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmem));
    bulk_kernel<<<n_ctas, kThreads, kSmem, stream>>>(p, per_cta, chunk, stages, sums, method == 3);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}
