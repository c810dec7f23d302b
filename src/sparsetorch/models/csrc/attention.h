// Causal self-attention over full windows, fp32: the own model path's attention when no cache precedes them
// (one-shot pruning's calibration forwards, a prompt's prefill).
//
// PyTorch's CPU flash attention runs every 64-query block of a 512-token window against all 512
// keys and masks the upper half afterwards, so about half its work is discarded. Here each block of
// queries meets only the keys at or before its last query: 9/16 of the full work in 64-query blocks.
// The query heads that share a key/value head (grouped-query attention) are done by one task, so
// keys and values are read once per group and never repeated in memory. Scores and outputs are BLAS
// products (the Fortran sgemm the torch build links, MKL on x86); the softmax between them is exact
// (max-subtracted, an exp good to a few ulps), so results equal SDPA's to float rounding.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <dlfcn.h>
#include <limits>
#include <vector>

extern "C" {
// Weak: a torch build without a Fortran-interface BLAS leaves it null, and the op reports that.
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const float* alpha,
            const float* a, const int* lda, const float* b, const int* ldb, const float* beta, float* c,
            const int* ldc) __attribute__((weak));
}

namespace st {

constexpr int64_t kQueryBlock = 64;  // queries per task and head, as PyTorch's flash kernel tiles them

inline bool have_blas() { return sgemm_ != nullptr; }

// MKL's per-thread BLAS thread count, where the BLAS is MKL (found at run time: other BLAS lack it).
using SetThreads = int (*)(int);
inline SetThreads mkl_threads_setter() {
  static const SetThreads setter = reinterpret_cast<SetThreads>(dlsym(RTLD_DEFAULT, "MKL_Set_Num_Threads_Local"));
  return setter;
}

// Row-major C[m, n] = A[m, k] @ B[n, k]^T (each with its own leading dimension), via column-major sgemm.
inline void gemm_abt(int m, int n, int k, const float* a, int lda, const float* b, int ldb, float* c, int ldc) {
  const float one = 1.0f, zero = 0.0f;
  sgemm_("T", "N", &n, &m, &k, &one, b, &ldb, a, &lda, &zero, c, &ldc);
}

// Row-major C[m, n] = A[m, k] @ B[k, n].
inline void gemm_ab(int m, int n, int k, const float* a, int lda, const float* b, int ldb, float* c, int ldc) {
  const float one = 1.0f, zero = 0.0f;
  sgemm_("N", "N", &n, &m, &k, &one, b, &ldb, a, &lda, &zero, c, &ldc);
}

// e^x for x <= 0: Cody-Waite reduction and a degree-6 polynomial, branch-free so the loop below
// vectorizes for the module's ISA. Below -87 it returns ~1e-38 instead of a subnormal.
inline float exp_nonpositive(float x) {
  x = std::max(x, -87.0f);
  const float n = std::nearbyint(x * 1.44269504088896341f);
  float r = std::fma(n, -0.693145751953125f, x);
  r = std::fma(n, -1.428606765330187e-06f, r);
  float p = 1.0f / 720;
  p = std::fma(p, r, 1.0f / 120);
  p = std::fma(p, r, 1.0f / 24);
  p = std::fma(p, r, 1.0f / 6);
  p = std::fma(p, r, 0.5f);
  p = std::fma(p, r, 1.0f);
  p = std::fma(p, r, 1.0f);
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

// In place: row[0, visible) becomes exp(scale * (row - max)), row[visible, width) zero. Returns the
// sum, by which the caller divides the product with the values (64 divisions a row, not `width`).
inline float softmax_row(float* row, int64_t visible, int64_t width, float scale) {
  constexpr int64_t L = 16;  // independent lanes: fixed-length inner loops the compiler vectorizes
  float peaks[L], sums[L];
  std::fill(peaks, peaks + L, -std::numeric_limits<float>::infinity());
  std::fill(sums, sums + L, 0.0f);
  const int64_t body = visible / L * L;
  for (int64_t j = 0; j < body; j += L) {
    for (int64_t l = 0; l < L; ++l) peaks[l] = std::max(peaks[l], row[j + l]);
  }
  for (int64_t j = body; j < visible; ++j) peaks[0] = std::max(peaks[0], row[j]);
  const float shift = *std::max_element(peaks, peaks + L) * scale;
  for (int64_t j = 0; j < body; j += L) {
    for (int64_t l = 0; l < L; ++l) {
      const float p = exp_nonpositive(std::fma(row[j + l], scale, -shift));
      row[j + l] = p;
      sums[l] += p;
    }
  }
  for (int64_t j = body; j < visible; ++j) {
    row[j] = exp_nonpositive(std::fma(row[j], scale, -shift));
    sums[0] += row[j];
  }
  std::fill(row + visible, row + width, 0.0f);
  float total = 0.0f;
  for (int64_t l = 0; l < L; ++l) total += sums[l];
  return total;
}

// q: [batch, heads, tokens, dim], k and v: [batch, kv_heads, tokens, dim], each with unit stride over
// dim and any other strides (element strides below); out: [batch, tokens, heads, dim], contiguous.
struct AttentionShape {
  int64_t batch, heads, kv_heads, tokens, dim;
  int64_t q_strides[3], k_strides[3], v_strides[3];  // batch, head, token
};

// Tasks of `causal_attention`: one per (batch, kv head, query block), query block innermost.
inline int64_t query_blocks(const AttentionShape& s) { return (s.tokens + kQueryBlock - 1) / kQueryBlock; }
inline int64_t attention_tasks(const AttentionShape& s) { return s.batch * s.kv_heads * query_blocks(s); }

inline void causal_attention(const AttentionShape& s, const float* q, const float* k, const float* v, float* out,
                             float scale, int64_t task_begin, int64_t task_end) {
  const int64_t groups = s.heads / s.kv_heads, blocks = query_blocks(s);
  std::vector<float> scores(static_cast<size_t>(groups * kQueryBlock * s.tokens));
  std::vector<float> inverse_sums(static_cast<size_t>(groups * kQueryBlock));
  const int dim = static_cast<int>(s.dim), ld_scores = static_cast<int>(s.tokens);
  const int ld_out = static_cast<int>(s.heads * s.dim);
  // Each task is one thread's work: a BLAS that spawned threads of its own would oversubscribe.
  const SetThreads set_threads = mkl_threads_setter();
  const int blas_threads = set_threads ? set_threads(1) : 0;
  for (int64_t task = task_begin; task < task_end; ++task) {
    const int64_t block = task % blocks, kv = (task / blocks) % s.kv_heads, b = task / (blocks * s.kv_heads);
    const int64_t first = block * kQueryBlock, rows = std::min(kQueryBlock, s.tokens - first);
    const int64_t keys = first + rows;  // causal: the block's last query sees keys [0, keys)
    const float* kp = k + b * s.k_strides[0] + kv * s.k_strides[1];
    const float* vp = v + b * s.v_strides[0] + kv * s.v_strides[1];
    for (int64_t g = 0; g < groups; ++g) {
      const int64_t head = kv * groups + g;
      const float* qp = q + b * s.q_strides[0] + head * s.q_strides[1] + first * s.q_strides[2];
      float* sp = scores.data() + g * kQueryBlock * s.tokens;
      gemm_abt(static_cast<int>(rows), static_cast<int>(keys), dim, qp, static_cast<int>(s.q_strides[2]), kp,
               static_cast<int>(s.k_strides[2]), sp, ld_scores);
      for (int64_t r = 0; r < rows; ++r) {
        inverse_sums[g * kQueryBlock + r] = 1.0f / softmax_row(sp + r * s.tokens, first + r + 1, keys, scale);
      }
      float* op = out + ((b * s.tokens + first) * s.heads + head) * s.dim;
      gemm_ab(static_cast<int>(rows), dim, static_cast<int>(keys), sp, ld_scores, vp, static_cast<int>(s.v_strides[2]),
              op, ld_out);
      for (int64_t r = 0; r < rows; ++r) {
        const float inverse = inverse_sums[g * kQueryBlock + r];
        float* row = op + r * ld_out;
        for (int64_t d = 0; d < s.dim; ++d) row[d] *= inverse;
      }
    }
  }
  if (set_threads) set_threads(blas_threads);
}

}  // namespace st
