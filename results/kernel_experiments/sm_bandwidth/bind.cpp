// Binding of probe.cu's launch_read (issue 26 experiment, not part of pdcli's kernels).
#include <ATen/cuda/CUDAContext.h>
#include <torch/extension.h>

void launch_read(const char* p, int64_t per_cta, int n_ctas, int method, int chunk, int stages, int* sums,
                 cudaStream_t stream);

// Reads src (bytes on the GPU) once with n_ctas CTAs; returns their checksums.
torch::Tensor read_all(torch::Tensor src, int64_t n_ctas, int64_t method, int64_t chunk, int64_t stages) {
  TORCH_CHECK(src.is_cuda() && src.is_contiguous());
  const int64_t per_cta = src.numel() / n_ctas / chunk * chunk;
  auto sums = torch::zeros({n_ctas}, src.options().dtype(torch::kInt32));
  launch_read(static_cast<const char*>(src.data_ptr()), per_cta, int(n_ctas), int(method), int(chunk), int(stages),
              sums.data_ptr<int>(), at::cuda::getCurrentCUDAStream());
  return sums;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("read_all", &read_all); }
