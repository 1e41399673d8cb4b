// Python bindings of the pdcli CUDA kernels. All input checks live here (compiled by the host
// compiler); the .cu files only launch kernels on validated inputs. Every op runs on the current
// CUDA stream, so it can be captured in a CUDA graph.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/extension.h>

#include <string>

void launch_copy_blocks(const void* src, void* dst, const int64_t* src_idx, const int64_t* dst_idx, int64_t num_pairs,
                        int64_t num_groups, int64_t src_blocks, int64_t dst_blocks, int64_t block_bytes,
                        cudaStream_t stream);
void launch_store_kvcache(const void* k, const void* v, void* k_cache, void* v_cache, const int64_t* slot_mapping,
                          int64_t num_tokens, int64_t k_token_bytes, int64_t v_token_bytes, int64_t row_bytes,
                          cudaStream_t stream);
int decode_attention_num_splits(int64_t batch, int64_t num_kv_heads, int64_t max_context_len, int head_dim);
void launch_decode_attention(void* out, float* part_o, float* part_lse, const void* q, const void* k_cache,
                             const void* v_cache, const int* block_tables, const int* context_lens, int batch,
                             int num_heads, int num_kv_heads, int head_dim, int table_width, int block_size,
                             int splits, int64_t q_stride, float scale, bool bf16, cudaStream_t stream,
                             const int* plan = nullptr, int plan_slots = 0, int* counters = nullptr,
                             bool early_kv = false, bool persistent = false);
void launch_decode_plan(int* plan, const int* context_lens, int batch, int plan_slots, int target_slots,
                        int min_chunk, cudaStream_t stream);
int decode_attention_resident_ctas(int head_dim);
void argmax_parts(int64_t rows, int vocab, int elem_bytes, int sms, int* parts, int* part_len);
void launch_argmax(const void* logits, int64_t rows, int vocab, int64_t stride, int dtype, float* part_v,
                   int* part_i, int parts, int part_len, int64_t* out, cudaStream_t stream);
void set_pdl(bool on);
void launch_prefill_attention(void* out, const void* q, const void* k_cache, const void* v_cache,
                              const int* block_tables, const int* context_lens, const int* query_start_loc,
                              int num_heads, int num_kv_heads, int head_dim, int table_width, int block_size,
                              int batch, int max_query_len, float scale, bool bf16, int impl, cudaStream_t stream,
                              int64_t kv_slots);
namespace pdcli {
bool prefill_attention_sm90_available(int head_dim);
void launch_wgmma_probe(const void* a, const void* k, const void* v, float* s_out, float* o_out, bool bf16,
                        cudaStream_t stream);
}
void launch_rms_norm(void* out, void* residual, void* x, const void* weight, int64_t rows, int dim, int64_t x_stride,
                     int64_t out_stride, int64_t res_stride, float eps, bool bf16, cudaStream_t stream);
void launch_silu_and_mul(void* out, const void* x, int64_t rows, int d, int64_t x_stride, int64_t out_stride, bool bf16,
                         cudaStream_t stream);
void launch_merge_attn_states(void* out, const void* a, const void* b, const float* la, const float* lb,
                              int64_t tokens, int num_heads, int head_dim, int64_t a_st, int64_t a_sh, int64_t b_st,
                              int64_t b_sh, int64_t la_sh, int64_t la_st, int64_t lb_sh, int64_t lb_st, bool bf16,
                              cudaStream_t stream);
void launch_gemv(void* y, const void* x, const void* w, const void* bias, int m, int n, int k, int64_t x_stride,
                 int64_t y_stride, bool bf16, cudaStream_t stream);
void launch_qkv_rope_store(void* q_out, void* k_cache, void* v_cache, const void* qkv, const int64_t* positions,
                           const int64_t* slot_mapping, const float* cos, const float* sin, const void* q_norm,
                           const void* k_norm, float eps, int64_t num_tokens, int num_heads, int num_kv_heads,
                           int head_dim, int64_t qkv_stride, bool bf16, cudaStream_t stream);

namespace {

// Numbers go into messages as strings: streaming integers into c10::str from this extension crashed the
// process on the device image (a libstdc++ locale-facet mismatch, seen with torch 2.11), strings did not.
std::string num(int64_t x) { return std::to_string(x); }

void check_cache(const torch::Tensor& q, const torch::Tensor& k_cache, const torch::Tensor& v_cache, const char* op) {
  TORCH_CHECK(q.is_cuda(), op, ": tensors must be on the GPU");
  TORCH_CHECK(k_cache.device() == q.device() && v_cache.device() == q.device(), op, ": tensors on different devices");
  TORCH_CHECK(q.scalar_type() == torch::kBFloat16 || q.scalar_type() == torch::kFloat16, op,
              ": dtype must be bfloat16 or float16, got ", c10::toString(q.scalar_type()));
  TORCH_CHECK(k_cache.scalar_type() == q.scalar_type() && v_cache.scalar_type() == q.scalar_type(), op,
              ": dtype mismatch");
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.is_contiguous() && v_cache.is_contiguous() &&
                  v_cache.sizes() == k_cache.sizes(), op, ": caches must be contiguous [num_blocks, block_size, Hk, D]");
  const int64_t block_size = k_cache.size(1);
  TORCH_CHECK(block_size > 0 && (block_size & (block_size - 1)) == 0, op, ": block_size must be a power of two");
  TORCH_CHECK(k_cache.size(0) * block_size <= INT32_MAX, op, ": more than 2^31 cache slots");
}

void check_heads(const torch::Tensor& q, const torch::Tensor& k_cache, const char* op) {
  TORCH_CHECK(q.dim() == 3 && q.stride(2) == 1 && q.stride(1) == q.size(2), op, ": q must be [T, Hq, D], heads contiguous");
  const int64_t D = q.size(2), Hq = q.size(1), Hk = k_cache.size(2);
  TORCH_CHECK(D == 64 || D == 128, op, ": head_dim must be 64 or 128, got ", num(D));
  TORCH_CHECK(k_cache.size(3) == D, op, ": cache head_dim ", num(k_cache.size(3)), " != ", num(D));
  TORCH_CHECK(Hk > 0 && Hq % Hk == 0, op, ": ", num(Hq), " query heads are not a multiple of ", num(Hk), " kv heads");
}

void check_table(const torch::Tensor& q, const torch::Tensor& block_tables, const torch::Tensor& context_lens,
                 int64_t batch, const char* op) {
  TORCH_CHECK(block_tables.device() == q.device() && context_lens.device() == q.device(), op,
              ": tensors on different devices");
  TORCH_CHECK(block_tables.dim() == 2 && block_tables.scalar_type() == torch::kInt32 && block_tables.is_contiguous() &&
                  block_tables.size(0) == batch, op, ": block_tables must be contiguous int32 [B, W]");
  TORCH_CHECK(context_lens.dim() == 1 && context_lens.scalar_type() == torch::kInt32 && context_lens.is_contiguous() &&
                  context_lens.size(0) == batch, op, ": context_lens must be contiguous int32 [B]");
  TORCH_CHECK(batch <= 65535, op, ": at most 65535 sequences, got ", num(batch));
}

bool aligned16(const torch::Tensor& t) { return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0; }

// A [rows, dim] half-precision matrix with contiguous, 16-byte aligned rows.
void check_rows(const torch::Tensor& t, const torch::Tensor& like, const char* name, const char* op) {
  TORCH_CHECK(t.is_cuda() && t.device() == like.device(), op, ": ", name, " must be on the GPU of the other inputs");
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), op, ": ", name, " dtype mismatch");
  TORCH_CHECK(t.scalar_type() == torch::kBFloat16 || t.scalar_type() == torch::kFloat16, op,
              ": dtype must be bfloat16 or float16, got ", c10::toString(t.scalar_type()));
  TORCH_CHECK(t.dim() == 2 && t.stride(1) == 1, op, ": ", name, " must be 2-D with contiguous rows");
  TORCH_CHECK(aligned16(t) && (t.stride(0) * t.element_size()) % 16 == 0 && t.size(1) % 8 == 0, op, ": ", name,
              " rows must be 16-byte aligned and hold a multiple of 8 values, got ", num(t.size(1)));
}

void check_norm_weight(const torch::Tensor& w, const torch::Tensor& x, int64_t dim, const char* op) {
  TORCH_CHECK(dim <= 32768, op, ": the hidden size must be at most 32768, got ", num(dim));
  TORCH_CHECK(w.device() == x.device() && w.scalar_type() == x.scalar_type() && w.dim() == 1 && w.is_contiguous() &&
                  w.size(0) == dim && aligned16(w), op, ": weight must be a contiguous [", num(dim),
              "] tensor of the input's dtype");
}

}  // namespace

// torch.argmax(logits, dim=-1) of logits [rows, V] (bf16, fp16, fp32; rows 16-byte aligned): int64 [rows].
torch::Tensor argmax(torch::Tensor logits) {
  const char* op = "argmax";
  TORCH_CHECK(logits.is_cuda() && logits.dim() == 2 && logits.stride(1) == 1, op,
              ": logits must be a 2-D GPU tensor with contiguous rows");
  const auto t = logits.scalar_type();
  TORCH_CHECK(t == torch::kBFloat16 || t == torch::kFloat16 || t == torch::kFloat32, op,
              ": dtype must be bfloat16, float16 or float32, got ", c10::toString(t));
  TORCH_CHECK(aligned16(logits) && (logits.stride(0) * logits.element_size()) % 16 == 0, op,
              ": rows must start 16-byte aligned");
  const int64_t rows = logits.size(0), vocab = logits.size(1);
  TORCH_CHECK(vocab > 0 && vocab < (int64_t(1) << 31) && rows <= 65535, op, ": needs 1 <= V < 2^31 and rows <= 65535");
  const c10::cuda::CUDAGuard guard(logits.device());
  auto out = torch::empty({rows}, logits.options().dtype(torch::kInt64));
  if (rows == 0) return out;
  int parts = 1, part_len = 1;
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  argmax_parts(rows, int(vocab), int(logits.element_size()), sms, &parts, &part_len);
  auto part_v = torch::empty({rows, parts}, logits.options().dtype(torch::kFloat32));
  auto part_i = torch::empty({rows, parts}, logits.options().dtype(torch::kInt32));
  const int dtype = t == torch::kBFloat16 ? 0 : t == torch::kFloat16 ? 1 : 2;
  launch_argmax(logits.data_ptr(), rows, int(vocab), logits.stride(0), dtype, part_v.data_ptr<float>(),
                part_i.data_ptr<int>(), parts, part_len, out.data_ptr<int64_t>(), at::cuda::getCurrentCUDAStream());
  return out;
}

// out = RMSNorm(x) * weight; x, out [rows, dim].
void rms_norm(torch::Tensor out, torch::Tensor x, torch::Tensor weight, double eps) {
  const char* op = "rms_norm";
  check_rows(x, x, "x", op);
  check_rows(out, x, "out", op);
  TORCH_CHECK(out.sizes() == x.sizes(), op, ": out must be shaped like x");
  check_norm_weight(weight, x, x.size(1), op);
  const c10::cuda::CUDAGuard guard(x.device());
  launch_rms_norm(out.data_ptr(), nullptr, x.data_ptr(), weight.data_ptr(), x.size(0), x.size(1), x.stride(0),
                  out.stride(0), 0, float(eps), x.scalar_type() == torch::kBFloat16, at::cuda::getCurrentCUDAStream());
}

// In place: residual = x + residual; x = RMSNorm(residual) * weight; x, residual [rows, dim].
void fused_add_rms_norm(torch::Tensor x, torch::Tensor residual, torch::Tensor weight, double eps) {
  const char* op = "fused_add_rms_norm";
  check_rows(x, x, "x", op);
  check_rows(residual, x, "residual", op);
  TORCH_CHECK(residual.sizes() == x.sizes(), op, ": residual must be shaped like x");
  TORCH_CHECK(residual.data_ptr() != x.data_ptr(), op, ": x and residual must not alias");
  check_norm_weight(weight, x, x.size(1), op);
  const c10::cuda::CUDAGuard guard(x.device());
  launch_rms_norm(nullptr, residual.data_ptr(), x.data_ptr(), weight.data_ptr(), x.size(0), x.size(1), x.stride(0), 0,
                  residual.stride(0), float(eps), x.scalar_type() == torch::kBFloat16, at::cuda::getCurrentCUDAStream());
}

// out [rows, d] = silu(x[:, :d]) * x[:, d:]; x [rows, 2d].
void silu_and_mul(torch::Tensor out, torch::Tensor x) {
  const char* op = "silu_and_mul";
  check_rows(x, x, "x", op);
  check_rows(out, x, "out", op);
  TORCH_CHECK(out.size(0) == x.size(0) && 2 * out.size(1) == x.size(1), op, ": out must be [rows, d] for x [rows, 2d]");
  const c10::cuda::CUDAGuard guard(x.device());
  launch_silu_and_mul(out.data_ptr(), x.data_ptr(), x.size(0), out.size(1), x.stride(0), out.stride(0),
                      x.scalar_type() == torch::kBFloat16, at::cuda::getCurrentCUDAStream());
}

// out [T, H, D] = a and b (attention outputs of the same queries over disjoint keys, each [H, T, D] with
// contiguous head rows) merged by their log-sum-exps la, lb (fp32 [H, T]).
void merge_attn_states(torch::Tensor out, torch::Tensor a, torch::Tensor la, torch::Tensor b, torch::Tensor lb) {
  const char* op = "merge_attn_states";
  TORCH_CHECK(out.is_cuda() && out.dim() == 3 && out.is_contiguous() && aligned16(out), op,
              ": out must be a contiguous [T, H, D] GPU tensor");
  TORCH_CHECK(out.scalar_type() == torch::kBFloat16 || out.scalar_type() == torch::kFloat16, op,
              ": dtype must be bfloat16 or float16");
  const int64_t T = out.size(0), H = out.size(1), D = out.size(2);
  TORCH_CHECK(D % 8 == 0, op, ": head_dim must be a multiple of 8, got ", num(D));
  for (const auto* x : {&a, &b}) {
    TORCH_CHECK(x->device() == out.device() && x->scalar_type() == out.scalar_type() && x->dim() == 3 &&
                    x->size(0) == H && x->size(1) == T && x->size(2) == D && x->stride(2) == 1 &&
                    x->stride(0) % 8 == 0 && x->stride(1) % 8 == 0 && aligned16(*x),
                op, ": a and b must be [H, T, D] of out's dtype with 16-byte aligned head rows");
  }
  for (const auto* l : {&la, &lb}) {
    TORCH_CHECK(l->device() == out.device() && l->scalar_type() == torch::kFloat32 && l->dim() == 2 &&
                    l->size(0) == H && l->size(1) == T, op, ": la and lb must be fp32 [H, T]");
  }
  const c10::cuda::CUDAGuard guard(out.device());
  launch_merge_attn_states(out.data_ptr(), a.data_ptr(), b.data_ptr(), la.data_ptr<float>(), lb.data_ptr<float>(), T,
                           H, D, a.stride(1), a.stride(0), b.stride(1), b.stride(0), la.stride(0), la.stride(1),
                           lb.stride(0), lb.stride(1), out.scalar_type() == torch::kBFloat16,
                           at::cuda::getCurrentCUDAStream());
}

// q_out [T, Hq, D] = rope(norm(q)); cache slots of each token get rope(norm(k)) and v. qkv [T, (Hq + 2 Hk) D];
// positions, slot_mapping [T] int64 (slot < 0: skip); cos, sin [max_pos, D] fp32 (halves repeated);
// q_norm, k_norm: [D] per-head RMSNorm weights, both or neither.
void qkv_rope_store(torch::Tensor q_out, torch::Tensor qkv, torch::Tensor positions, torch::Tensor cos,
                    torch::Tensor sin, c10::optional<torch::Tensor> q_norm, c10::optional<torch::Tensor> k_norm,
                    double eps, torch::Tensor k_cache, torch::Tensor v_cache, torch::Tensor slot_mapping) {
  const char* op = "qkv_rope_store";
  check_cache(q_out, k_cache, v_cache, op);
  check_heads(q_out, k_cache, op);
  TORCH_CHECK(q_out.is_contiguous() && aligned16(q_out), op, ": q_out must be contiguous [T, Hq, D]");
  check_rows(qkv, q_out, "qkv", op);
  const int64_t T = q_out.size(0), Hq = q_out.size(1), Hk = k_cache.size(2), D = q_out.size(2);
  TORCH_CHECK(qkv.size(0) == T && qkv.size(1) == (Hq + 2 * Hk) * D, op, ": qkv must be [T, (Hq + 2 Hk) D] = [",
              num(T), ", ", num((Hq + 2 * Hk) * D), "]");
  for (auto* t : {&positions, &slot_mapping})
    TORCH_CHECK(t->device() == q_out.device() && t->scalar_type() == torch::kInt64 && t->dim() == 1 &&
                    t->is_contiguous() && t->size(0) == T, op, ": positions and slot_mapping must be contiguous int64 [T]");
  for (auto* t : {&cos, &sin})
    TORCH_CHECK(t->device() == q_out.device() && t->scalar_type() == torch::kFloat32 && t->dim() == 2 &&
                    t->is_contiguous() && t->size(1) == D && t->sizes() == cos.sizes(), op,
                ": cos and sin must be contiguous fp32 [max_pos, D]");
  TORCH_CHECK(q_norm.has_value() == k_norm.has_value(), op, ": pass both q_norm and k_norm or neither");
  if (q_norm) {
    check_norm_weight(*q_norm, q_out, D, op);
    check_norm_weight(*k_norm, q_out, D, op);
  }
  TORCH_CHECK(T * (Hq + 2 * Hk) * (D / 8) < (int64_t(1) << 31) * 256, op, ": too many tokens");
  const c10::cuda::CUDAGuard guard(q_out.device());
  launch_qkv_rope_store(q_out.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), qkv.data_ptr(),
                        positions.data_ptr<int64_t>(), slot_mapping.data_ptr<int64_t>(), cos.data_ptr<float>(),
                        sin.data_ptr<float>(), q_norm ? q_norm->data_ptr() : nullptr,
                        k_norm ? k_norm->data_ptr() : nullptr, float(eps), T, Hq, Hk, D, qkv.stride(0),
                        q_out.scalar_type() == torch::kBFloat16, at::cuda::getCurrentCUDAStream());
}

// y [m, n] = x [m, k] @ w [n, k]^T (+ bias [n]) for 1 <= m <= 4 rows (decode of a few sequences).
void gemv(torch::Tensor y, torch::Tensor x, torch::Tensor w, c10::optional<torch::Tensor> bias) {
  const char* op = "gemv";
  check_rows(x, x, "x", op);
  check_rows(w, x, "w", op);
  TORCH_CHECK(w.is_contiguous(), op, ": w must be contiguous [n, k]");
  const int64_t m = x.size(0), k = x.size(1), n = w.size(0);
  TORCH_CHECK(m >= 1 && m <= 4, op, ": x must have 1 to 4 rows, got ", num(m));
  TORCH_CHECK(w.size(1) == k, op, ": x has ", num(k), " columns but w has ", num(w.size(1)));
  TORCH_CHECK(k <= INT32_MAX && n <= INT32_MAX, op, ": matrix too large");
  TORCH_CHECK(y.device() == x.device() && y.scalar_type() == x.scalar_type() && y.is_contiguous() && y.dim() == 2 &&
                  y.size(0) == m && y.size(1) == n, op, ": y must be contiguous [m, n] of x's dtype");
  if (bias)
    TORCH_CHECK(bias->device() == x.device() && bias->scalar_type() == x.scalar_type() && bias->dim() == 1 &&
                    bias->is_contiguous() && bias->size(0) == n, op, ": bias must be a contiguous [n] of x's dtype");
  const c10::cuda::CUDAGuard guard(x.device());
  launch_gemv(y.data_ptr(), x.data_ptr(), w.data_ptr(), bias ? bias->data_ptr() : nullptr, int(m), int(n), int(k),
              x.stride(0), y.stride(0), x.scalar_type() == torch::kBFloat16, at::cuda::getCurrentCUDAStream());
}

// dst [G, Nd, ...], src [G, Ns, ...] contiguous, one dtype, the same G and block size (the dims after the
// second); src_idx, dst_idx [P] int64 on the GPU: dst[:, dst_idx[i]] = src[:, src_idx[i]]. Indices out of
// range copy nothing.
void copy_blocks(torch::Tensor dst, torch::Tensor src, torch::Tensor src_idx, torch::Tensor dst_idx) {
  const char* op = "copy_blocks";
  TORCH_CHECK(src.is_cuda() && dst.device() == src.device() && src_idx.device() == src.device() &&
                  dst_idx.device() == src.device(), op, ": tensors must share one GPU");
  TORCH_CHECK(src.dim() >= 2 && dst.dim() >= 2 && src.is_contiguous() && dst.is_contiguous(), op,
              ": src and dst must be contiguous [G, N, ...]");
  TORCH_CHECK(src.scalar_type() == dst.scalar_type(), op, ": dtype mismatch");
  TORCH_CHECK(src.size(0) == dst.size(0), op, ": src and dst need the same number of groups");
  const int64_t block = src.size(1) ? src.numel() / (src.size(0) * src.size(1)) : 0;
  const int64_t dst_block = dst.size(1) ? dst.numel() / (dst.size(0) * dst.size(1)) : 0;
  TORCH_CHECK(block == dst_block, op, ": src and dst blocks differ in size");
  const int64_t block_bytes = block * src.element_size();
  TORCH_CHECK(block_bytes % 16 == 0 && reinterpret_cast<uintptr_t>(src.data_ptr()) % 16 == 0 &&
                  reinterpret_cast<uintptr_t>(dst.data_ptr()) % 16 == 0, op, ": blocks must be 16-byte aligned");
  TORCH_CHECK(src_idx.scalar_type() == torch::kInt64 && dst_idx.scalar_type() == torch::kInt64 && src_idx.dim() == 1 &&
                  dst_idx.dim() == 1 && src_idx.is_contiguous() && dst_idx.is_contiguous() &&
                  src_idx.numel() == dst_idx.numel(), op, ": src_idx, dst_idx must be contiguous int64 [P]");
  TORCH_CHECK(src.size(0) <= 65535, op, ": at most 65535 groups");
  const c10::cuda::CUDAGuard guard(src.device());
  launch_copy_blocks(src.data_ptr(), dst.data_ptr(), src_idx.data_ptr<int64_t>(), dst_idx.data_ptr<int64_t>(),
                     src_idx.numel(), src.size(0), src.size(1), dst.size(1), block_bytes, at::cuda::getCurrentCUDAStream());
}

// k, v [T, Hk, D] (each token's [Hk, D] contiguous); caches [num_blocks, block_size, Hk, D]; slot_mapping [T] int64
// (< 0: skip the token).
void store_kvcache(torch::Tensor k, torch::Tensor v, torch::Tensor k_cache, torch::Tensor v_cache,
                   torch::Tensor slot_mapping) {
  const char* op = "store_kvcache";
  TORCH_CHECK(k.is_cuda() && v.device() == k.device() && k_cache.device() == k.device() &&
                  v_cache.device() == k.device() && slot_mapping.device() == k.device(), op, ": tensors must share one GPU");
  TORCH_CHECK(k.dim() == 3 && v.sizes() == k.sizes(), op, ": k, v must be [T, Hk, D]");
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.is_contiguous() && v_cache.is_contiguous() && v_cache.sizes() == k_cache.sizes(),
              op, ": caches must be contiguous [N, bs, Hk, D]");
  TORCH_CHECK(k.size(1) == k_cache.size(2) && k.size(2) == k_cache.size(3), op, ": head shape mismatch");
  TORCH_CHECK(k.scalar_type() == k_cache.scalar_type() && v.scalar_type() == k.scalar_type() &&
                  v_cache.scalar_type() == k.scalar_type(), op, ": dtype mismatch");
  TORCH_CHECK(slot_mapping.scalar_type() == torch::kInt64 && slot_mapping.dim() == 1 && slot_mapping.is_contiguous() &&
                  slot_mapping.numel() == k.size(0), op, ": slot_mapping must be contiguous int64 [T]");
  for (auto* t : {&k, &v})
    TORCH_CHECK(t->stride(2) == 1 && t->stride(1) == t->size(2), op, ": each token's [Hk, D] must be contiguous");
  const int64_t es = k.element_size();
  const int64_t row_bytes = k.size(1) * k.size(2) * es;
  TORCH_CHECK(row_bytes % 16 == 0 && (k.stride(0) * es) % 16 == 0 && (v.stride(0) * es) % 16 == 0 &&
                  reinterpret_cast<uintptr_t>(k.data_ptr()) % 16 == 0 && reinterpret_cast<uintptr_t>(v.data_ptr()) % 16 == 0,
              op, ": rows must be 16-byte aligned");
  const c10::cuda::CUDAGuard guard(k.device());
  launch_store_kvcache(k.data_ptr(), v.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), slot_mapping.data_ptr<int64_t>(),
                       k.size(0), k.stride(0) * es, v.stride(0) * es, row_bytes, at::cuda::getCurrentCUDAStream());
}

// The decode ops' inputs: one query token per sequence. out, q [B, Hq, D]; block_tables [B, W] int32;
// context_lens [B] int32; 1 to 8 query heads per kv head.
void check_decode(const torch::Tensor& out, const torch::Tensor& q, const torch::Tensor& k_cache,
                  const torch::Tensor& v_cache, const torch::Tensor& block_tables, const torch::Tensor& context_lens,
                  const char* op) {
  check_cache(q, k_cache, v_cache, op);
  check_heads(q, k_cache, op);
  TORCH_CHECK(out.is_contiguous() && out.sizes() == q.sizes() && out.scalar_type() == q.scalar_type() &&
                  out.device() == q.device(), op, ": out must be contiguous, shaped like q");
  const int64_t B = q.size(0), Hq = q.size(1), Hk = k_cache.size(2);
  check_table(q, block_tables, context_lens, B, op);
  const int64_t G = Hq / Hk;
  TORCH_CHECK(G >= 1 && G <= 8, op, ": query heads per kv head must be 1 to 8, got ", num(G));
}

// num_splits <= 0: chosen from the grid size and max_context_len (an upper bound of context_lens).
void decode_attention(torch::Tensor out, torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                      torch::Tensor block_tables, torch::Tensor context_lens, double scale, int64_t num_splits,
                      int64_t max_context_len) {
  const char* op = "decode_attention";
  check_decode(out, q, k_cache, v_cache, block_tables, context_lens, op);
  const int64_t B = q.size(0), Hq = q.size(1), Hk = k_cache.size(2), D = q.size(2);
  if (B == 0) return;
  const c10::cuda::CUDAGuard guard(q.device());
  int64_t splits = num_splits > 0 ? num_splits : decode_attention_num_splits(B, Hk, max_context_len, D);
  splits = std::min<int64_t>(splits, 256);
  torch::Tensor part_o, part_lse;
  if (splits > 1) {
    part_o = torch::empty({B, Hq, splits, D}, q.options().dtype(torch::kFloat32));
    part_lse = torch::empty({B, Hq, splits}, q.options().dtype(torch::kFloat32));
  }
  launch_decode_attention(out.data_ptr(), splits > 1 ? part_o.data_ptr<float>() : nullptr,
                          splits > 1 ? part_lse.data_ptr<float>() : nullptr, q.data_ptr(), k_cache.data_ptr(),
                          v_cache.data_ptr(), block_tables.data_ptr<int>(), context_lens.data_ptr<int>(), B, Hq, Hk, D,
                          block_tables.size(1), k_cache.size(1), splits, q.stride(0), float(scale),
                          q.scalar_type() == torch::kBFloat16, at::cuda::getCurrentCUDAStream());
}

// The balanced split plan of one decode step (decode_attention.cu): parts of equal key counts, about
// target_slots of them (at most target_slots + B) of at least min_chunk keys, int32 [2 + 2 (target_slots + B) + 2 B]
// on the device.
torch::Tensor decode_plan(torch::Tensor context_lens, int64_t target_slots, int64_t min_chunk) {
  const char* op = "decode_plan";
  TORCH_CHECK(context_lens.is_cuda() && context_lens.dim() == 1 && context_lens.scalar_type() == torch::kInt32 &&
                  context_lens.is_contiguous(), op, ": context_lens must be a contiguous int32 CUDA vector");
  TORCH_CHECK(target_slots >= 1, op, ": target_slots must be >= 1");
  TORCH_CHECK(min_chunk >= 0 && min_chunk <= (1 << 30), op, ": min_chunk must be in [0, 2^30]");
  const int64_t B = context_lens.size(0), S = target_slots + B;
  auto plan = torch::empty({2 + 2 * S + 2 * B}, context_lens.options());
  if (B == 0) return plan.zero_();
  const c10::cuda::CUDAGuard guard(context_lens.device());
  launch_decode_plan(plan.data_ptr<int>(), context_lens.data_ptr<int>(), B, S, target_slots, int(min_chunk),
                     at::cuda::getCurrentCUDAStream());
  return plan;
}

// decode_attention with the balanced splits of a decode_plan made from the same context_lens.
// counters: [B * Hk] int32 zeros (left zero), the merge done by each sequence's last part; early_kv: the plan
// and tables were written before the kernel ahead of this one on the stream (its K/V tiles start loading early);
// persistent: one wave of CTAs, each taking several parts in turn (decode_attention_persistent_kernel).
void decode_attention_planned(torch::Tensor out, torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                              torch::Tensor block_tables, torch::Tensor context_lens, double scale, torch::Tensor plan,
                              c10::optional<torch::Tensor> counters, bool early_kv, bool persistent) {
  const char* op = "decode_attention_planned";
  check_decode(out, q, k_cache, v_cache, block_tables, context_lens, op);
  const int64_t B = q.size(0), Hq = q.size(1), Hk = k_cache.size(2), D = q.size(2);
  TORCH_CHECK(plan.device() == q.device() && plan.scalar_type() == torch::kInt32 && plan.is_contiguous() &&
                  plan.dim() == 1 && plan.size(0) >= 2 + 2 * B + 2 && (plan.size(0) - 2 - 2 * B) % 2 == 0,
              op, ": plan must be decode_plan's of these context_lens");
  if (counters.has_value())
    TORCH_CHECK(counters->device() == q.device() && counters->scalar_type() == torch::kInt32 &&
                    counters->is_contiguous() && counters->numel() >= B * Hk, op, ": counters must be int32 [B * Hk]");
  if (B == 0) return;
  const int64_t S = (plan.size(0) - 2 - 2 * B) / 2;
  const c10::cuda::CUDAGuard guard(q.device());
  auto part_o = torch::empty({S, Hq, D}, q.options().dtype(torch::kFloat32));
  auto part_lse = torch::empty({S, Hq}, q.options().dtype(torch::kFloat32));
  launch_decode_attention(out.data_ptr(), part_o.data_ptr<float>(), part_lse.data_ptr<float>(), q.data_ptr(),
                          k_cache.data_ptr(), v_cache.data_ptr(), block_tables.data_ptr<int>(),
                          context_lens.data_ptr<int>(), B, Hq, Hk, D, block_tables.size(1), k_cache.size(1), 0,
                          q.stride(0), float(scale), q.scalar_type() == torch::kBFloat16,
                          at::cuda::getCurrentCUDAStream(), plan.data_ptr<int>(), S,
                          counters.has_value() ? counters->data_ptr<int>() : nullptr, early_kv, persistent);
}

// Varlen chunked prefill: sequence b's new tokens q[query_start_loc[b]:query_start_loc[b+1]] attend causally
// (bottom-right aligned) to its context_lens[b] cached tokens, which include themselves.
// out, q [T, Hq, D] contiguous; query_start_loc [B + 1] int32; max_query_len >= every q_len, <= T.
// impl: 0 mma.sync, 1 the sm_90a wgmma kernel, 2 its warp-specialised variant (has_prefill_attention_wgmma
// says whether this build has them).
void prefill_attention_impl(torch::Tensor out, torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                            torch::Tensor block_tables, torch::Tensor context_lens, torch::Tensor query_start_loc,
                            int64_t max_query_len, double scale, int impl) {
  const char* op = impl == 3   ? "prefill_attention_wgmma_tma"
                   : impl == 2 ? "prefill_attention_wgmma_ws"
                   : impl == 1 ? "prefill_attention_wgmma"
                               : "prefill_attention";
  check_cache(q, k_cache, v_cache, op);
  check_heads(q, k_cache, op);
  TORCH_CHECK(q.is_contiguous() && out.is_contiguous() && out.sizes() == q.sizes() &&
                  out.scalar_type() == q.scalar_type() && out.device() == q.device(), op,
              ": q and out must be contiguous [T, Hq, D] alike");
  const int64_t T = q.size(0), B = block_tables.size(0);
  check_table(q, block_tables, context_lens, B, op);
  TORCH_CHECK(query_start_loc.device() == q.device() && query_start_loc.dim() == 1 && query_start_loc.size(0) == B + 1 &&
                  query_start_loc.scalar_type() == torch::kInt32 && query_start_loc.is_contiguous(), op,
              ": query_start_loc must be contiguous int32 [B + 1]");
  TORCH_CHECK(T * q.size(1) * q.size(2) < (int64_t(1) << 62), op, ": q too large");
  TORCH_CHECK(impl == 0 || pdcli::prefill_attention_sm90_available(int(q.size(2))), op,
              ": this build has no wgmma kernel for head_dim ", num(q.size(2)), " (it needs sm_90a and head_dim 128)");
  TORCH_CHECK(impl != 3 || (k_cache.size(1) >= 8 && k_cache.is_contiguous() && v_cache.is_contiguous()), op,
              ": the TMA loader needs block_size >= 8 and contiguous caches");
  if (T == 0 || B == 0 || max_query_len <= 0) return;
  TORCH_CHECK(max_query_len <= T && max_query_len <= 65535LL * 128, op, ": max_query_len ", num(max_query_len),
              " exceeds the number of tokens ", num(T), " or 65535 * 128");
  const c10::cuda::CUDAGuard guard(q.device());
  launch_prefill_attention(out.data_ptr(), q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), block_tables.data_ptr<int>(),
                           context_lens.data_ptr<int>(), query_start_loc.data_ptr<int>(), q.size(1), k_cache.size(2),
                           q.size(2), block_tables.size(1), k_cache.size(1), B, max_query_len, float(scale),
                           q.scalar_type() == torch::kBFloat16, impl, at::cuda::getCurrentCUDAStream(),
                           k_cache.size(0) * k_cache.size(1));
}

void prefill_attention(torch::Tensor out, torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                       torch::Tensor block_tables, torch::Tensor context_lens, torch::Tensor query_start_loc,
                       int64_t max_query_len, double scale) {
  prefill_attention_impl(out, q, k_cache, v_cache, block_tables, context_lens, query_start_loc, max_query_len, scale,
                         0);
}

void prefill_attention_wgmma(torch::Tensor out, torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                             torch::Tensor block_tables, torch::Tensor context_lens, torch::Tensor query_start_loc,
                             int64_t max_query_len, double scale) {
  prefill_attention_impl(out, q, k_cache, v_cache, block_tables, context_lens, query_start_loc, max_query_len, scale,
                         1);
}

void prefill_attention_wgmma_ws(torch::Tensor out, torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                                torch::Tensor block_tables, torch::Tensor context_lens,
                                torch::Tensor query_start_loc, int64_t max_query_len, double scale) {
  prefill_attention_impl(out, q, k_cache, v_cache, block_tables, context_lens, query_start_loc, max_query_len, scale,
                         2);
}

void prefill_attention_wgmma_tma(torch::Tensor out, torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                                 torch::Tensor block_tables, torch::Tensor context_lens,
                                 torch::Tensor query_start_loc, int64_t max_query_len, double scale) {
  prefill_attention_impl(out, q, k_cache, v_cache, block_tables, context_lens, query_start_loc, max_query_len, scale,
                         3);
}

bool has_prefill_attention_wgmma(int64_t head_dim) { return pdcli::prefill_attention_sm90_available(int(head_dim)); }

// The wgmma kernel's two products on one tile: s_out = a k^T, o_out = half(s_out) v (fp32 [64, 128] each);
// a [64, 128], k and v [128, 128], contiguous, bf16 or fp16 alike, on one GPU.
void wgmma_probe(torch::Tensor a, torch::Tensor k, torch::Tensor v, torch::Tensor s_out, torch::Tensor o_out) {
  const char* op = "wgmma_probe";
  TORCH_CHECK(pdcli::prefill_attention_sm90_available(128), op, ": this build has no wgmma kernel (it needs sm_90a)");
  for (const auto& t : {a, k, v})
    TORCH_CHECK(t.is_cuda() && t.is_contiguous() && t.dim() == 2 && t.size(1) == 128 && t.device() == a.device() &&
                    t.scalar_type() == a.scalar_type() &&
                    (t.scalar_type() == torch::kBFloat16 || t.scalar_type() == torch::kHalf), op,
                ": a, k, v must be contiguous bf16 or fp16 [rows, 128] on one GPU");
  TORCH_CHECK(a.size(0) == 64 && k.size(0) == 128 && v.size(0) == 128, op, ": a is [64, 128], k and v [128, 128]");
  for (const auto& t : {s_out, o_out})
    TORCH_CHECK(t.device() == a.device() && t.is_contiguous() && t.scalar_type() == torch::kFloat32 &&
                    t.sizes() == a.sizes(), op, ": s_out and o_out must be contiguous fp32 [64, 128]");
  const c10::cuda::CUDAGuard guard(a.device());
  pdcli::launch_wgmma_probe(a.data_ptr(), k.data_ptr(), v.data_ptr(), s_out.data_ptr<float>(),
                            o_out.data_ptr<float>(), a.scalar_type() == torch::kBFloat16,
                            at::cuda::getCurrentCUDAStream());
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("copy_blocks", &copy_blocks, "KV blocks from src[:, src_idx] to dst[:, dst_idx] (16-byte copies)");
  m.def("store_kvcache", &store_kvcache, "write new K/V rows into their cache slots");
  m.def("decode_attention", &decode_attention, "paged GQA decode attention, split-KV");
  m.def("decode_plan", &decode_plan, "balanced split-KV plan of a decode step (parts of equal key counts)",
        py::arg("context_lens"), py::arg("target_slots"), py::arg("min_chunk") = 0);
  m.def("argmax", &argmax, "torch.argmax(logits, dim=-1) for greedy sampling");
  m.def("set_pdl", &set_pdl, "launch the decode step's own kernels with programmatic dependent launch (sm_90+)");
  m.def("decode_attention_resident_ctas", &decode_attention_resident_ctas,
        "decode kernel CTAs resident on the current GPU at once for this head_dim");
  m.def("decode_attention_planned", &decode_attention_planned, "decode_attention with a decode_plan's splits",
        py::arg("out"), py::arg("q"), py::arg("k_cache"), py::arg("v_cache"), py::arg("block_tables"),
        py::arg("context_lens"), py::arg("scale"), py::arg("plan"), py::arg("counters") = py::none(),
        py::arg("early_kv") = false, py::arg("persistent") = false);
  m.def("decode_attention_num_splits", &decode_attention_num_splits,
        "split-KV count decode_attention picks for (batch, kv heads, max context, head_dim)");
  m.def("prefill_attention", &prefill_attention, "paged varlen causal prefill attention");
  m.def("prefill_attention_wgmma", &prefill_attention_wgmma, "the same on Hopper tensor cores (wgmma, sm_90a)");
  m.def("prefill_attention_wgmma_ws", &prefill_attention_wgmma_ws,
        "the same, warp-specialised: a loader warpgroup, two compute warpgroups in turn");
  m.def("prefill_attention_wgmma_tma", &prefill_attention_wgmma_tma,
        "the warp-specialised one with K/V tiles loaded by TMA (block_size >= 8)");
  m.def("has_prefill_attention_wgmma", &has_prefill_attention_wgmma,
        "whether this build has prefill_attention_wgmma for head_dim");
  m.def("wgmma_probe", &wgmma_probe, "the wgmma prefill kernel's two products on one tile (bring-up)");
  m.def("rms_norm", &rms_norm, "RMSNorm");
  m.def("fused_add_rms_norm", &fused_add_rms_norm, "residual add + RMSNorm, in place");
  m.def("silu_and_mul", &silu_and_mul, "SiLU(gate) * up");
  m.def("merge_attn_states", &merge_attn_states, "two attention outputs over disjoint keys merged by their LSEs");
  m.def("gemv", &gemv, "x @ w.T (+ bias) for 1 to 4 rows of x");
  m.def("qkv_rope_store", &qkv_rope_store, "q/k norm + rotary + KV cache store, from the packed qkv");
}
