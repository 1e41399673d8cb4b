// cuBLASLt matmuls with an algorithm chosen by the caller: the heuristic's candidates for y = x @ w^T and a call
// that runs one of them (kernels/lt_choice.py times each and keeps the fastest). Built as its own extension
// (it links cuBLASLt; the main one does not). Runs on the current CUDA stream: capturable in a CUDA graph.
#include <ATen/cuda/CUDAContext.h>
#include <cublasLt.h>
#include <torch/extension.h>

#include <cstring>
#include <map>
#include <mutex>
#include <string>
#include <tuple>
#include <vector>

namespace {

constexpr uint32_t kAlignBytes = 16;  // every candidate works for 16-byte aligned x, w, y (checked per call)

void check(cublasStatus_t s, const char* what) {
  TORCH_CHECK(s == CUBLAS_STATUS_SUCCESS, "cuBLASLt ", what, " failed: status ", std::to_string(int(s)));
}

cudaDataType_t data_type(at::ScalarType t) {
  TORCH_CHECK(t == at::kBFloat16 || t == at::kHalf, "lt_matmul: dtype must be bfloat16 or float16");
  return t == at::kBFloat16 ? CUDA_R_16BF : CUDA_R_16F;
}

// y [m, n] row-major = x [m, k] (row stride ldx) @ w [n, k]^T; column-major for cuBLAS:
// y^T [n, m] (ld n) = (w as [k, n], ld k)^T @ (x as [k, m], ld ldx).
struct Problem {
  cublasLtMatmulDesc_t op = nullptr;
  cublasLtMatrixLayout_t a = nullptr, b = nullptr, c = nullptr;
};

using Key = std::tuple<int64_t, int64_t, int64_t, int64_t, int>;  // m, n, k, ldx, dtype

const Problem& problem(int64_t m, int64_t n, int64_t k, int64_t ldx, at::ScalarType t) {
  static std::mutex mu;
  static std::map<Key, Problem> cache;  // lives for the process: a few shapes per model
  const std::lock_guard<std::mutex> lock(mu);
  const Key key{m, n, k, ldx, int(t)};
  if (auto it = cache.find(key); it != cache.end()) return it->second;
  Problem p;
  const cudaDataType_t dt = data_type(t);
  check(cublasLtMatmulDescCreate(&p.op, CUBLAS_COMPUTE_32F, CUDA_R_32F), "MatmulDescCreate");
  const cublasOperation_t trans = CUBLAS_OP_T, none = CUBLAS_OP_N;
  check(cublasLtMatmulDescSetAttribute(p.op, CUBLASLT_MATMUL_DESC_TRANSA, &trans, sizeof(trans)), "set TRANSA");
  check(cublasLtMatmulDescSetAttribute(p.op, CUBLASLT_MATMUL_DESC_TRANSB, &none, sizeof(none)), "set TRANSB");
  check(cublasLtMatrixLayoutCreate(&p.a, dt, k, n, k), "layout w");
  check(cublasLtMatrixLayoutCreate(&p.b, dt, k, m, ldx), "layout x");
  check(cublasLtMatrixLayoutCreate(&p.c, dt, n, m, n), "layout y");
  return cache[key] = p;
}

void check_operands(const torch::Tensor& y, const torch::Tensor& x, const torch::Tensor& w) {
  TORCH_CHECK(x.is_cuda() && w.device() == x.device() && y.device() == x.device(), "lt_linear: tensors on one GPU");
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && y.dim() == 2, "lt_linear: x, w, y must be 2-D");
  TORCH_CHECK(x.scalar_type() == w.scalar_type() && y.scalar_type() == x.scalar_type(), "lt_linear: one dtype");
  TORCH_CHECK(x.size(1) == w.size(1) && y.size(0) == x.size(0) && y.size(1) == w.size(0), "lt_linear: shapes");
  TORCH_CHECK(x.stride(1) == 1 && w.is_contiguous() && y.is_contiguous(), "lt_linear: rows must be contiguous");
  for (const auto* t : {&x, &w, &y})
    TORCH_CHECK(reinterpret_cast<uintptr_t>(t->data_ptr()) % kAlignBytes == 0, "lt_linear: 16-byte alignment");
  TORCH_CHECK(x.stride(0) % 8 == 0, "lt_linear: x's row stride must be a multiple of 8 elements");
}

}  // namespace

// The heuristic's candidates (at most max_count, its order) for an m-row product with w [n, k] and x's row
// stride ldx (bf16, else fp16): [count, sizeof(cublasLtMatmulAlgo_t)] uint8 (each an opaque algorithm) and their workspace bytes.
std::vector<torch::Tensor> lt_algos(int64_t m, int64_t n, int64_t k, int64_t ldx, bool bf16,
                                    int64_t max_count, int64_t workspace_bytes) {
  TORCH_CHECK(m > 0 && n > 0 && k > 0 && ldx >= k && max_count > 0, "lt_algos: bad sizes");
  const Problem& p = problem(m, n, k, ldx, bf16 ? at::kBFloat16 : at::kHalf);
  cublasLtMatmulPreference_t pref = nullptr;
  check(cublasLtMatmulPreferenceCreate(&pref), "PreferenceCreate");
  const uint64_t ws = uint64_t(workspace_bytes);
  check(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof(ws)),
        "set workspace");
  for (auto attr : {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES,
                    CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES})
    check(cublasLtMatmulPreferenceSetAttribute(pref, attr, &kAlignBytes, sizeof(kAlignBytes)), "set alignment");
  std::vector<cublasLtMatmulHeuristicResult_t> found(static_cast<size_t>(max_count));
  int returned = 0;
  const auto status = cublasLtMatmulAlgoGetHeuristic(at::cuda::getCurrentCUDABlasLtHandle(), p.op, p.a, p.b, p.c,
                                                     p.c, pref, int(max_count), found.data(), &returned);
  cublasLtMatmulPreferenceDestroy(pref);
  if (status == CUBLAS_STATUS_NOT_SUPPORTED) returned = 0;
  else check(status, "AlgoGetHeuristic");
  int kept = 0;
  auto algos = torch::empty({returned, int64_t(sizeof(cublasLtMatmulAlgo_t))}, torch::kUInt8);
  auto sizes = torch::empty({returned}, torch::kInt64);
  for (int i = 0; i < returned; ++i) {
    if (found[i].state != CUBLAS_STATUS_SUCCESS) continue;
    std::memcpy(algos[kept].data_ptr(), &found[i].algo, sizeof(cublasLtMatmulAlgo_t));
    sizes[kept] = int64_t(found[i].workspaceSize);
    ++kept;
  }
  return {algos.narrow(0, 0, kept).clone(), sizes.narrow(0, 0, kept).clone()};
}

// y = x @ w^T with the given candidate of lt_algos (same m, n, k, row stride, dtype) and workspace (GPU bytes).
void lt_linear(torch::Tensor y, torch::Tensor x, torch::Tensor w, torch::Tensor algo, torch::Tensor workspace) {
  check_operands(y, x, w);
  TORCH_CHECK(algo.device().is_cpu() && algo.scalar_type() == torch::kUInt8 &&
                  algo.numel() == int64_t(sizeof(cublasLtMatmulAlgo_t)) && algo.is_contiguous(),
              "lt_linear: algo must be one row of lt_algos");
  TORCH_CHECK(workspace.device() == x.device() && workspace.is_contiguous(), "lt_linear: workspace on x's GPU");
  const Problem& p = problem(x.size(0), w.size(0), x.size(1), x.stride(0), x.scalar_type());
  cublasLtMatmulAlgo_t a;
  std::memcpy(&a, algo.data_ptr(), sizeof(a));
  const float alpha = 1.f, beta = 0.f;
  check(cublasLtMatmul(at::cuda::getCurrentCUDABlasLtHandle(), p.op, &alpha, w.data_ptr(), p.a, x.data_ptr(), p.b,
                       &beta, y.data_ptr(), p.c, y.data_ptr(), p.c, &a, workspace.data_ptr(),
                       size_t(workspace.numel() * workspace.element_size()), at::cuda::getCurrentCUDAStream()),
        "Matmul");
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("lt_algos", &lt_algos, "cuBLASLt heuristic candidates for y = x @ w^T", py::arg("m"), py::arg("n"),
        py::arg("k"), py::arg("ldx"), py::arg("bf16"), py::arg("max_count"), py::arg("workspace_bytes"));
  m.def("lt_linear", &lt_linear, "y = x @ w^T with one cuBLASLt candidate");
}
