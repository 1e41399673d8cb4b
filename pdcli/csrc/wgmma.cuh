// Hopper warpgroup MMA (wgmma, sm_90a) building blocks: shared-memory matrix descriptors for 128-byte
// swizzled tiles, the fences and group waits, and m64n128k16 with fp32 accumulators (A and B from shared
// memory, or A from registers and B N-major from shared memory). Everything compiles to nothing unless the
// target is sm_90a (PDCLI_HAS_WGMMA).
//
// Tiles are [rows][64 columns] of 16-bit elements: 128-byte rows, 16-byte chunk c of row r stored at chunk
// c ^ (r & 7), 8-row atoms of 1024 bytes, 1024-byte aligned: wgmma's 128-byte swizzle.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define PDCLI_HAS_WGMMA 1
#endif

namespace pdcli {

// lbo / sbo in bytes: K-major: sbo = 8-row atom to the next (lbo unused, 16); N-major: lbo = 64 columns to the
// next 64, sbo = 8 rows (the K dimension) to the next 8.
__device__ __forceinline__ uint64_t wgmma_desc_sw128(uint32_t smem_addr, uint32_t lbo, uint32_t sbo) {
  return (uint64_t)((smem_addr & 0x3FFFF) >> 4) | ((uint64_t)((lbo >> 4) & 0x3FFF) << 16) |
         ((uint64_t)((sbo >> 4) & 0x3FFF) << 32) | (1ull << 62);
}

// Byte offset of (row, 16-byte chunk c) in a [rows][128 columns] tile kept as two [rows][64 columns] halves of
// half_bytes = rows * 128 each.
__device__ __forceinline__ uint32_t sw128_tile_off(int row, int c, int half_bytes) {
  return (c >> 3) * half_bytes + row * 128 + (((c & 7) ^ (row & 7)) << 4);
}

__device__ __forceinline__ void wgmma_fence() {
#ifdef PDCLI_HAS_WGMMA
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void wgmma_commit() {
#ifdef PDCLI_HAS_WGMMA
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
#endif
}
template <int N>
__device__ __forceinline__ void wgmma_wait() {
#ifdef PDCLI_HAS_WGMMA
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
#endif
}
// Shared memory this thread wrote (cp.async included, once landed) made visible to wgmma's (async proxy) reads.
__device__ __forceinline__ void fence_proxy_async_shared() {
#ifdef PDCLI_HAS_WGMMA
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#endif
}
// mbarriers (shared::cta) and named barriers, for the warp-specialised kernel.
__device__ __forceinline__ void mbar_init(uint32_t bar, int count) {
#ifdef PDCLI_HAS_WGMMA
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
#endif
}
__device__ __forceinline__ void mbar_arrive(uint32_t bar) {
#ifdef PDCLI_HAS_WGMMA
  asm volatile("{\n.reg .b64 st;\nmbarrier.arrive.shared::cta.b64 st, [%0];\n}\n" ::"r"(bar) : "memory");
#endif
}
// Waits for the completion of the barrier's phase of this parity (a fresh barrier counts parity 1 as done). A
// wait past 1e9 clocks (~0.5 s; a tile takes microseconds) gives up (what follows computes garbage, which the tests
// catch) instead of hanging the GPU; a __trap() there made ptxas cap the compute warpgroups' registers and serialise their wgmma.
__device__ __forceinline__ void mbar_wait(uint32_t bar, uint32_t parity) {
#ifdef PDCLI_HAS_WGMMA
  const long long start = clock64();
  uint32_t done = 0;
  do {
    asm volatile(
        "{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\nselp.u32 %0, 1, 0, p;\n}\n"
        : "=r"(done) : "r"(bar), "r"(parity) : "memory");
  } while (!done && clock64() - start < 1000000000LL);
#endif
}
// Named barrier `id` (1..15) over 256 threads: sync waits for all 256, arrive counts one without waiting.
__device__ __forceinline__ void named_sync(int id) { asm volatile("bar.sync %0, 256;\n" ::"r"(id) : "memory"); }
__device__ __forceinline__ void named_arrive(int id) { asm volatile("bar.arrive %0, 256;\n" ::"r"(id) : "memory"); }

// Keeps the compiler from moving accesses of a register across the wgmma fences and waits.
__device__ __forceinline__ void fence_operand(float& r) { asm volatile("" : "+f"(r)::"memory"); }
__device__ __forceinline__ void fence_operand(uint32_t& r) { asm volatile("" : "+r"(r)::"memory"); }

// d[64] (+)= A[64x16] B[16x128]: A, B K-major in shared memory; scale_d == 0: d = A B.
// d's layout per warp w of the warpgroup: rows 16w + lane/4 (+8 for d[4j+2], d[4j+3]), columns
// 8j + 2 (lane % 4) (+1), j = 0..15 (mma.sync m16n8's C layout, tiled along N).
template <typename T>
__device__ __forceinline__ void wgmma_m64n128k16_ss(float (&d)[64], uint64_t desc_a, uint64_t desc_b, int scale_d);
// d[64] (+)= A[64x16] B[16x128]: A in registers (mma.sync m16n8k16's A layout per warp), B N-major in shared memory.
template <typename T>
__device__ __forceinline__ void wgmma_m64n128k16_rs(float (&d)[64], const uint32_t (&a)[4], uint64_t desc_b,
                                                    int scale_d);

#ifdef PDCLI_HAS_WGMMA
// the 64 accumulator registers: %0..%63 in the instruction, "+f"(d[0..63]) as operands
#define PDCLI_WGMMA_D64                                                                              \
  "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "                          \
  "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "                 \
  "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "                 \
  "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, "
#define PDCLI_WGMMA_ACC8(i)                                                                          \
  "+f"(d[i]), "+f"(d[i + 1]), "+f"(d[i + 2]), "+f"(d[i + 3]), "+f"(d[i + 4]), "+f"(d[i + 5]),         \
      "+f"(d[i + 6]), "+f"(d[i + 7])
#define PDCLI_WGMMA_ACC64                                                                            \
  PDCLI_WGMMA_ACC8(0), PDCLI_WGMMA_ACC8(8), PDCLI_WGMMA_ACC8(16), PDCLI_WGMMA_ACC8(24),              \
      PDCLI_WGMMA_ACC8(32), PDCLI_WGMMA_ACC8(40), PDCLI_WGMMA_ACC8(48), PDCLI_WGMMA_ACC8(56)

// SS: A, B K-major descriptors; RS: A's four registers, B N-major (trans-b); scale_d as a predicate
#define PDCLI_WGMMA_M64N128K16(T, PTX)                                                               \
  template <>                                                                                        \
  __device__ __forceinline__ void wgmma_m64n128k16_ss<T>(float(&d)[64], uint64_t desc_a, uint64_t desc_b, \
                                                         int scale_d) {                              \
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"                                        \
                 "wgmma.mma_async.sync.aligned.m64n128k16.f32." PTX "." PTX " " PDCLI_WGMMA_D64       \
                 "%64, %65, p, 1, 1, 0, 0;\n}\n"                                                      \
                 : PDCLI_WGMMA_ACC64                                                                 \
                 : "l"(desc_a), "l"(desc_b), "r"(scale_d));                                          \
  }                                                                                                  \
  template <>                                                                                        \
  __device__ __forceinline__ void wgmma_m64n128k16_rs<T>(float(&d)[64], const uint32_t(&a)[4],       \
                                                         uint64_t desc_b, int scale_d) {             \
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"                                        \
                 "wgmma.mma_async.sync.aligned.m64n128k16.f32." PTX "." PTX " " PDCLI_WGMMA_D64       \
                 "{%64, %65, %66, %67}, %68, p, 1, 1, 1;\n}\n"                                        \
                 : PDCLI_WGMMA_ACC64                                                                 \
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(scale_d));           \
  }
#else
#define PDCLI_WGMMA_M64N128K16(T, PTX)                                                               \
  template <>                                                                                        \
  __device__ __forceinline__ void wgmma_m64n128k16_ss<T>(float(&)[64], uint64_t, uint64_t, int) {}    \
  template <>                                                                                        \
  __device__ __forceinline__ void wgmma_m64n128k16_rs<T>(float(&)[64], const uint32_t(&)[4], uint64_t, int) {}
#endif
PDCLI_WGMMA_M64N128K16(__nv_bfloat16, "bf16")
PDCLI_WGMMA_M64N128K16(__half, "f16")

}  // namespace pdcli
