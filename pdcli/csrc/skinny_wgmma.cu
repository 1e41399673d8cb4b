// Skinny matmul on Hopper tensor cores for decode batches: y[m, n] = x[m, k] w[n, k]^T (+ bias[n]) for
// 1 <= m <= 64 and an nn.Linear weight w [N, K] (row-major), bound by reading w once (the gemv does 1-4 rows).
// One warpgroup per CTA owns a 64 x 128 tile of y (x's rows past m read as zeros): TMA brings 64-wide K slices
// of x and w (128-byte swizzle) into a ring of kStages on one mbarrier each, wgmma m64n128k16 multiplies them
// into fp32 accumulators, and a stage is refilled once the products reading it are done. w's first slices
// start loading before the kernel ahead has finished (programmatic dependent launch: no kernel writes a
// weight), x's after it. Where n / 128 tiles are too few to keep every SM reading, K is split over a cluster
// of CTAs; the first sums the others' partial tiles through distributed shared memory and writes y.
#include <c10/cuda/CUDAException.h>
#include <cuda.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <map>
#include <mutex>
#include <tuple>

#include "common.cuh"
#include "launch.cuh"
#include "mma.cuh"
#include "tensor_map.cuh"
#include "wgmma.cuh"

namespace {

using namespace pdcli;

constexpr int kBN = 128;  // columns of y (rows of w) per CTA
constexpr int kBK = 64;   // K values per stage: one 128-byte swizzle row
constexpr int kStages = 4;
constexpr int kXBytes = 64 * kBK * 2, kWBytes = kBN * kBK * 2, kStageBytes = kXBytes + kWBytes;
constexpr int kSmemBytes = 1024 + kStages * kStageBytes + kStages * 8;  // alignment slack, ring, mbarriers
constexpr int kMaxSplits = 8;  // a portable cluster
static_assert(64 * kBN * 4 <= kStages * kStageBytes, "the split-K partial tile reuses the ring");

struct SkinnyParams {
  CUtensorMap tmap_x, tmap_w;  // x [m, k]: boxes of 64 x 64; w [n, k]: boxes of 128 x 64
  void* y;
  const void* bias;  // [n] or null
  int64_t y_stride;
  int m, n, k_tiles;
};

#ifdef PDCLI_HAS_WGMMA
__device__ __forceinline__ void cluster_sync() {
  asm volatile("barrier.cluster.arrive.release.aligned;\nbarrier.cluster.wait.acquire.aligned;\n" ::: "memory");
}
__device__ __forceinline__ float ld_peer(uint32_t addr, int rank) {  // addr: this CTA's shared address
  uint32_t peer;
  float v;
  asm volatile("mapa.shared::cluster.u32 %0, %1, %2;\n" : "=r"(peer) : "r"(addr), "r"(rank));
  asm volatile("ld.shared::cluster.f32 %0, [%1];\n" : "=f"(v) : "r"(peer) : "memory");
  return v;
}
#endif

// grid (n tiles, splits); cluster (1, splits) when splits > 1. 128 threads.
template <typename T>
__global__ void __launch_bounds__(128, 2) skinny_wgmma_kernel(const __grid_constant__ SkinnyParams p) {
#ifdef PDCLI_HAS_WGMMA
  extern __shared__ unsigned char smem_raw[];
  const uint32_t ring = (smem_u32(smem_raw) + 1023) & ~1023u;  // swizzle atoms are 1024-byte aligned
  const uint32_t bars = ring + kStages * kStageBytes;
  const int tid = threadIdx.x, n0 = blockIdx.x * kBN;
  const int splits = gridDim.y, split = blockIdx.y;
  const int kt0 = int(int64_t(p.k_tiles) * split / splits);
  const int nk = int(int64_t(p.k_tiles) * (split + 1) / splits) - kt0;  // >= 1: splits <= k_tiles
  auto x_at = [&](int s) { return ring + s * kStageBytes; };
  auto w_at = [&](int s) { return ring + s * kStageBytes + kXBytes; };
  auto bar = [&](int s) { return bars + 8 * s; };
  if (tid == 0) {
    for (int s = 0; s < kStages; ++s) mbar_init(bar(s), 1);
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  }
  __syncthreads();
  const int pre = min(kStages - 1, nk);
  if (tid == 0)
    for (int i = 0; i < pre; ++i) {
      mbar_arrive_expect_tx(bar(i), kStageBytes);
      tma_load_2d(w_at(i), &p.tmap_w, (kt0 + i) * kBK, n0, bar(i));
    }
  pdl_wait();  // x is the kernel ahead's output
  pdl_trigger();
  if (tid == 0)
    for (int i = 0; i < pre; ++i) tma_load_2d(x_at(i), &p.tmap_x, (kt0 + i) * kBK, 0, bar(i));

  float acc[64];
#pragma unroll
  for (int i = 0; i < 64; ++i) acc[i] = 0.f;
  for (int t = 0; t < nk; ++t) {
    const int s = t % kStages;
    mbar_wait(bar(s), (t / kStages) & 1);
#pragma unroll
    for (int i = 0; i < 64; ++i) fence_operand(acc[i]);
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < kBK / 16; ++kk)
      wgmma_m64n128k16_ss<T>(acc, wgmma_desc_sw128(x_at(s) + kk * 32, 16, 1024),
                             wgmma_desc_sw128(w_at(s) + kk * 32, 16, 1024), 1);
    wgmma_commit();
    wgmma_wait<1>();  // tile t - 1's products are done: its stage, (t + kStages - 1) % kStages, may be refilled
#pragma unroll
    for (int i = 0; i < 64; ++i) fence_operand(acc[i]);
    __syncthreads();
    const int next = t + kStages - 1;
    if (tid == 0 && next < nk) {
      const int ns = next % kStages;
      mbar_arrive_expect_tx(bar(ns), kStageBytes);
      tma_load_2d(w_at(ns), &p.tmap_w, (kt0 + next) * kBK, n0, bar(ns));
      tma_load_2d(x_at(ns), &p.tmap_x, (kt0 + next) * kBK, 0, bar(ns));
    }
  }
  wgmma_wait<0>();
#pragma unroll
  for (int i = 0; i < 64; ++i) fence_operand(acc[i]);

  if (splits > 1) {  // the partial tiles summed into the first CTA's registers; [64][128 threads] fp32
    __syncthreads();  // the ring is idle: every slice issued was consumed
    float* part = reinterpret_cast<float*>(smem_raw + (ring - smem_u32(smem_raw)));
    if (split != 0)
#pragma unroll
      for (int i = 0; i < 64; ++i) part[i * 128 + tid] = acc[i];
    cluster_sync();
    if (split == 0)
      for (int r = 1; r < splits; ++r)
#pragma unroll
        for (int i = 0; i < 64; ++i) acc[i] += ld_peer(ring + (i * 128 + tid) * 4, r);
    cluster_sync();  // the others keep their shared memory until the first has read it
    if (split != 0) return;
  }
  // acc's layout (wgmma.cuh): warp w, rows 16w + lane/4 (+8 for acc[4j+2..3]), columns 8j + 2 (lane % 4) (+1)
  const int warp = tid >> 5, lane = tid & 31;
  const T* bias = static_cast<const T*>(p.bias);
  T* y = static_cast<T*>(p.y);
#pragma unroll
  for (int j = 0; j < 16; ++j) {
    const int col = n0 + 8 * j + 2 * (lane & 3);
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int row = 16 * warp + (lane >> 2) + 8 * h;
      if (row >= p.m) continue;
      T* dst = y + int64_t(row) * p.y_stride + col;
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        if (col + e >= p.n) continue;
        const float b = bias ? to_float(bias[col + e]) : 0.f;
        dst[e] = from_float<T>(acc[4 * j + 2 * h + e] + b);
      }
    }
  }
#endif
}

// w's tensor map, made once per (weight, shape): weights live as long as the engine.
const CUtensorMap& weight_map(const void* w, int64_t n, int64_t k, bool bf16) {
  static std::mutex mu;
  static std::map<std::tuple<const void*, int64_t, int64_t, bool>, CUtensorMap> maps;
  const std::lock_guard<std::mutex> lock(mu);
  const auto key = std::make_tuple(w, n, k, bf16);
  auto it = maps.find(key);
  if (it == maps.end()) it = maps.emplace(key, tensor_map_2d(w, n, k, k, kBN, bf16)).first;
  return it->second;
}

int num_sms() {
  int device = 0, sms = 1;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  return sms;
}

template <typename T>
void launch(const SkinnyParams& p, int splits, cudaStream_t stream) {
  auto kernel = skinny_wgmma_kernel<T>;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmemBytes));
  cudaLaunchAttribute attrs[2];
  int num_attrs = 0;
  if (pdl_on()) {
    attrs[num_attrs].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attrs[num_attrs++].val.programmaticStreamSerializationAllowed = 1;
  }
  if (splits > 1) {
    attrs[num_attrs].id = cudaLaunchAttributeClusterDimension;
    attrs[num_attrs++].val.clusterDim = {1, unsigned(splits), 1};
  }
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3((p.n + kBN - 1) / kBN, splits);
  cfg.blockDim = dim3(128);
  cfg.dynamicSmemBytes = kSmemBytes;
  cfg.stream = stream;
  cfg.attrs = attrs;
  cfg.numAttrs = num_attrs;
  C10_CUDA_CHECK(cudaLaunchKernelEx(&cfg, kernel, p));
}

}  // namespace

namespace pdcli {

bool skinny_wgmma_available() {
#ifdef PDCLI_SM90A
  return true;
#else
  return false;
#endif
}

// K splits for n columns over k values: enough CTAs that every SM reads (n / 128 tiles alone may be too few),
// at most kMaxSplits, each split at least two 64-value slices.
int skinny_wgmma_splits(int64_t n, int64_t k) {
  const int64_t tiles = (n + kBN - 1) / kBN, k_tiles = (k + kBK - 1) / kBK;
  const int64_t want = (num_sms() + tiles - 1) / tiles;
  return int(std::max<int64_t>(1, std::min<int64_t>({want, kMaxSplits, k_tiles / 2})));
}

// Inputs are validated by the caller (bindings.cpp): sm_90a, 1 <= m <= 64, 16-byte aligned rows and bases,
// 1 <= splits <= min(8, k / 64 rounded up).
void launch_skinny_wgmma(void* y, const void* x, const void* w, const void* bias, int m, int64_t n, int64_t k,
                         int64_t x_stride, int64_t y_stride, int splits, bool bf16, cudaStream_t stream) {
  SkinnyParams p{};
  p.tmap_x = tensor_map_2d(x, m, k, x_stride, 64, bf16);
  p.tmap_w = weight_map(w, n, k, bf16);
  p.y = y;
  p.bias = bias;
  p.y_stride = y_stride;
  p.m = m;
  p.n = int(n);
  p.k_tiles = int((k + kBK - 1) / kBK);
  if (bf16) launch<__nv_bfloat16>(p, splits, stream);
  else launch<__half>(p, splits, stream);
}

}  // namespace pdcli
