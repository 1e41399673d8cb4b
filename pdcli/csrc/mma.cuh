// Tensor-core building blocks shared by the attention kernels (sm_80 instructions: cp.async, ldmatrix,
// mma.sync m16n8k16). Shared tiles are rows of kChunks 16-byte chunks, XOR-swizzled by (row & 7) so that
// ldmatrix and cp.async are bank-conflict free.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#include <type_traits>

namespace pdcli {

// Element offset of (row, 16-byte chunk) in a swizzled [rows, kChunks * 8] shared tile.
template <int kChunks>
__device__ __forceinline__ int swz(int row, int chunk) {
  return row * (kChunks * 8) + ((chunk ^ (row & 7)) << 3);
}

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte async copy global -> shared; valid == false writes 16 zero bytes and reads nothing.
__device__ __forceinline__ void cp_async_16(uint32_t dst, const void* src, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory"); }

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(addr));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(addr));
}

// c[16x8 fp32] += a[16x16] * b[16x8]
template <typename T>
__device__ __forceinline__ void mma_16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}

// Two floats -> packed pair, lo in the low 16 bits (the lower column index).
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
  } else {
    __half2 v = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
  }
}

// Per-lane ldmatrix byte offsets within a swizzled tile of kRowBytes rows, for one 16x16 block at row 0,
// chunk 0. Lane l addresses row (l % 8) + 8 * ((l / 8) % 2) and chunk bit l / 16 of the block (matrices:
// rows 0-7 | rows 8-15) x (chunks 2c | 2c + 1). Every such row r has r & 7 == l & 7, so chunk
// c = 8h + 2i + bit sits at 8h + ((2i) ^ (bit ^ (l & 7))): frag[i] covers the chunk pairs with (2c) % 8 == 2i;
// the 8h part (+128 bytes per h) and whole 16-row steps are added by the caller.
template <int kRowBytes>
__device__ __forceinline__ void ldmatrix_offsets(uint32_t (&frag)[4], int lane) {
  const int r7 = lane & 7;
#pragma unroll
  for (int i = 0; i < 4; ++i)
    frag[i] = (r7 + (((lane >> 3) & 1) << 3)) * kRowBytes + ((((lane >> 4) ^ r7) ^ (2 * i)) << 4);
}

}  // namespace pdcli
