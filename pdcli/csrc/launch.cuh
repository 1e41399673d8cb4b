// Kernel launches that may overlap the kernel before them on the stream (programmatic dependent launch, sm_90+):
// such a kernel's CTAs are placed while its predecessor drains and wait in pdl_wait() until the predecessor has
// finished and its writes are visible. Every kernel launched by launch_pdl calls pdl_wait() before it reads or
// writes anything; pdl_trigger() lets a kernel's own successor be placed early. Off until set_pdl(true)
// (kernels/build.py: on for sm_90+ unless PDCLI_PDL=0); off, launch_pdl is a plain launch.
#pragma once
#include <c10/cuda/CUDAException.h>
#include <cuda_runtime.h>

namespace pdcli {

inline bool& pdl_on() {
  static bool on = false;
  return on;
}

template <typename... KArgs, typename... Args>
void launch_pdl(void (*kernel)(KArgs...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream, Args... args) {
  cudaLaunchAttribute attr;
  attr.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr.val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = grid;
  cfg.blockDim = block;
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cfg.attrs = &attr;
  cfg.numAttrs = pdl_on() ? 1 : 0;
  C10_CUDA_CHECK(cudaLaunchKernelEx(&cfg, kernel, static_cast<KArgs>(args)...));
}

__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

__device__ __forceinline__ void pdl_trigger() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" :::);
#endif
}

}  // namespace pdcli
