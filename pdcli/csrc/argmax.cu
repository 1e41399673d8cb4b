// Row-wise argmax of logits [rows, V] (bf16, fp16 or fp32) as torch.argmax(dim=-1) gives it: the first index of
// the largest value, a NaN above every number. Greedy sampling's one reduction over the vocabulary: each row is cut
// into parts (16-byte loads, 4 in flight a thread) reduced to (value, index) pairs, then one warp a row reduces its parts. torch's own
// reduction ran one CTA a row (38 us for 64 rows of 128k on an H100, where reading them takes ~6).
#include <c10/cuda/CUDAException.h>

#include <algorithm>
#include <climits>

#include "common.cuh"
#include "launch.cuh"

namespace {

constexpr int kThreads = 256;

// (av, ai) before (bv, bi) in argmax order.
__device__ __forceinline__ bool better(float av, int ai, float bv, int bi) {
  const bool an = av != av, bn = bv != bv;
  if (an != bn) return an;
  if (!an && av != bv) return av > bv;
  return ai < bi;
}

__device__ __forceinline__ void keep(float& bv, int& bi, float v, int i) {
  if (better(v, i, bv, bi)) {
    bv = v;
    bi = i;
  }
}

__device__ __forceinline__ void warp_best(float& bv, int& bi) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const float v = __shfl_xor_sync(0xffffffffu, bv, o);
    const int i = __shfl_xor_sync(0xffffffffu, bi, o);
    keep(bv, bi, v, i);
  }
}

template <typename T> __device__ __forceinline__ float as_float(T x);
template <> __device__ __forceinline__ float as_float<float>(float x) { return x; }
template <> __device__ __forceinline__ float as_float<__nv_bfloat16>(__nv_bfloat16 x) { return __bfloat162float(x); }
template <> __device__ __forceinline__ float as_float<__half>(__half x) { return __half2float(x); }

// CTA (part, row): the best of row's [part * part_len, + part_len) into part_v / part_i [rows, parts].
// part_len is a multiple of the values in 16 bytes; rows start 16-byte aligned.
template <typename T>
__global__ void __launch_bounds__(kThreads)
argmax_parts_kernel(const T* __restrict__ logits, int64_t stride, int vocab, int part_len, float* __restrict__ part_v,
                    int* __restrict__ part_i) {
  pdcli::pdl_wait();
  pdcli::pdl_trigger();
  constexpr int E = 16 / sizeof(T);
  const int row = blockIdx.y, part = blockIdx.x;
  const int lo = part * part_len, hi = min(vocab, lo + part_len);
  const T* x = logits + row * stride;
  float bv = -INFINITY;
  int bi = INT_MAX;
  constexpr int kUnroll = 4;  // 16-byte loads in flight per thread
  int i = lo + threadIdx.x * E;
  for (; i + (kUnroll - 1) * kThreads * E + E <= hi; i += kUnroll * kThreads * E) {
    uint4 u[kUnroll];
#pragma unroll
    for (int k = 0; k < kUnroll; ++k) u[k] = *reinterpret_cast<const uint4*>(x + i + k * kThreads * E);
#pragma unroll
    for (int k = 0; k < kUnroll; ++k) {
      const T* v = reinterpret_cast<const T*>(&u[k]);
#pragma unroll
      for (int e = 0; e < E; ++e) keep(bv, bi, as_float<T>(v[e]), i + k * kThreads * E + e);
    }
  }
  for (; i < hi; i += kThreads * E) {  // the rest, and the part's last partial vector
    if (i + E <= hi) {
      const uint4 u = *reinterpret_cast<const uint4*>(x + i);
      const T* v = reinterpret_cast<const T*>(&u);
#pragma unroll
      for (int e = 0; e < E; ++e) keep(bv, bi, as_float<T>(v[e]), i + e);
    } else {
      for (int e = i; e < hi; ++e) keep(bv, bi, as_float<T>(x[e]), e);
    }
  }
  warp_best(bv, bi);
  __shared__ float sv[kThreads / 32];
  __shared__ int si[kThreads / 32];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) {
    sv[warp] = bv;
    si[warp] = bi;
  }
  __syncthreads();
  if (warp == 0) {
    bv = lane < kThreads / 32 ? sv[lane] : -INFINITY;
    bi = lane < kThreads / 32 ? si[lane] : INT_MAX;
    warp_best(bv, bi);
    if (lane == 0) {
      part_v[int64_t(row) * gridDim.x + part] = bv;
      part_i[int64_t(row) * gridDim.x + part] = bi;
    }
  }
}

// One warp a row: out[row] = the best of its parts.
__global__ void argmax_final_kernel(const float* __restrict__ part_v, const int* __restrict__ part_i, int parts,
                                    int64_t rows, int64_t* __restrict__ out) {
  pdcli::pdl_wait();
  pdcli::pdl_trigger();
  const int64_t row = int64_t(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= rows) return;
  float bv = -INFINITY;
  int bi = INT_MAX;
  for (int p = lane; p < parts; p += 32) keep(bv, bi, part_v[row * parts + p], part_i[row * parts + p]);
  warp_best(bv, bi);
  if (lane == 0) out[row] = bi;
}

template <typename T>
void launch(const void* logits, int64_t rows, int vocab, int64_t stride, float* part_v, int* part_i, int parts,
            int part_len, int64_t* out, cudaStream_t stream) {
  pdcli::launch_pdl(argmax_parts_kernel<T>, dim3(parts, rows), dim3(kThreads), 0, stream,
                    static_cast<const T*>(logits), stride, vocab, part_len, part_v, part_i);
  pdcli::launch_pdl(argmax_final_kernel, dim3((rows + 7) / 8), dim3(256), 0, stream, part_v, part_i, parts, rows,
                    out);
}

}  // namespace

// Parts per row and their length (a multiple of the values in 16 bytes): about two CTAs an SM over all rows.
void argmax_parts(int64_t rows, int vocab, int elem_bytes, int sms, int* parts, int* part_len) {
  const int e = 16 / elem_bytes;
  const int64_t want = (2 * int64_t(sms) + rows - 1) / rows;
  const int p = int(std::max<int64_t>(1, std::min<int64_t>({want, 64, (vocab + e - 1) / e})));
  *part_len = ((vocab + p - 1) / p + e - 1) / e * e;
  *parts = (vocab + *part_len - 1) / *part_len;
}

// Inputs are validated by the caller (bindings.cpp). dtype: 0 bf16, 1 fp16, 2 fp32. part_v, part_i [rows, parts].
void launch_argmax(const void* logits, int64_t rows, int vocab, int64_t stride, int dtype, float* part_v,
                   int* part_i, int parts, int part_len, int64_t* out, cudaStream_t stream) {
  if (rows == 0) return;
  if (dtype == 0) launch<__nv_bfloat16>(logits, rows, vocab, stride, part_v, part_i, parts, part_len, out, stream);
  else if (dtype == 1) launch<__half>(logits, rows, vocab, stride, part_v, part_i, parts, part_len, out, stream);
  else launch<float>(logits, rows, vocab, stride, part_v, part_i, parts, part_len, out, stream);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}
