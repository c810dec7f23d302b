// One layer's attention for a few new tokens after a key/value cache (a decode step), fp32.
//
// Eager PyTorch spends a decode step's attention on a dozen small ops per layer: views and transposes
// of q, k and v, the rotary embedding, two copies into the cache and a flash-attention call built for
// long windows. For one token those cost more than the arithmetic. Here it is one op: the new keys
// are rotated straight into the cache, the values copied beside them, and each key/value head's
// group of query heads meets the cached keys in two small BLAS products, with the exact
// max-subtracted softmax of `attention.h` between them.
#pragma once

#include <algorithm>
#include <cstdint>
#include <limits>
#include <vector>

#include "attention.h"  // gemm_abt, gemm_ab, softmax_row, mkl_threads_setter
#include "fused.h"      // rotate_head

namespace st {

// qkv rows (batch * tokens of them): the query heads, then the key heads, then the value heads, each
// `dim` wide. Cache: keys and values (batch, kv_heads, capacity, dim), contiguous, the first `past`
// positions filled. cos and sin: (1 or batch, tokens, dim) rows with stride `cs_stride`, batch stride
// `cs_batch` (0 when shared).
struct StepShape {
  int64_t batch, tokens, heads, kv_heads, dim, past, capacity, cs_batch, cs_stride;
  int64_t row() const { return (heads + 2 * kv_heads) * dim; }
  int64_t cache_at(int64_t b, int64_t kv, int64_t position) const {
    return ((b * kv_heads + kv) * capacity + position) * dim;
  }
};

// The new tokens' keys (rotated) and values into cache positions past .. past + tokens.
inline void write_cache(const StepShape& s, const float* qkv, const float* cos, const float* sin, float* keys,
                        float* values) {
  for (int64_t b = 0; b < s.batch; ++b) {
    for (int64_t t = 0; t < s.tokens; ++t) {
      const float* row = qkv + (b * s.tokens + t) * s.row();
      const float* c = cos + b * s.cs_batch + t * s.cs_stride;
      const float* n = sin + b * s.cs_batch + t * s.cs_stride;
      for (int64_t kv = 0; kv < s.kv_heads; ++kv) {
        const int64_t at = s.cache_at(b, kv, s.past + t);
        rotate_head(row + (s.heads + kv) * s.dim, c, n, keys + at, s.dim);
        std::copy_n(row + (s.heads + s.kv_heads + kv) * s.dim, s.dim, values + at);
      }
    }
  }
}

// Tasks [task_begin, task_end) of (batch, kv head): the query heads sharing that key/value head, for every
// new token, as one block of rows (token-major). Scores and outputs are BLAS products over the cached keys
// and values; each row's softmax covers the positions up to its own token (the rest of the row is zero).
// Writes each head's `dim` outputs into out (batch, tokens, heads * dim).
inline void attend_after_cache(const StepShape& s, const float* qkv, const float* cos, const float* sin,
                               const float* keys, const float* values, float* out, float scale, int64_t task_begin,
                               int64_t task_end) {
  const int64_t groups = s.heads / s.kv_heads, rows = s.tokens * groups, width = s.past + s.tokens;
  std::vector<float> queries(static_cast<size_t>(rows * s.dim)), outputs(queries.size());
  std::vector<float> scores(static_cast<size_t>(rows * width)), inverse(static_cast<size_t>(rows));
  const int dim = static_cast<int>(s.dim), n = static_cast<int>(width), m = static_cast<int>(rows);
  const SetThreads set_threads = mkl_threads_setter();  // one thread's task: no BLAS threads of its own
  const int blas_threads = set_threads ? set_threads(1) : 0;
  for (int64_t task = task_begin; task < task_end; ++task) {
    const int64_t kv = task % s.kv_heads, b = task / s.kv_heads;
    for (int64_t t = 0; t < s.tokens; ++t) {
      const float* row = qkv + (b * s.tokens + t) * s.row();
      for (int64_t g = 0; g < groups; ++g) {
        rotate_head(row + (kv * groups + g) * s.dim, cos + b * s.cs_batch + t * s.cs_stride,
                    sin + b * s.cs_batch + t * s.cs_stride, queries.data() + (t * groups + g) * s.dim, s.dim);
      }
    }
    const float* k = keys + s.cache_at(b, kv, 0);
    const float* v = values + s.cache_at(b, kv, 0);
    gemm_abt(m, n, dim, queries.data(), dim, k, dim, scores.data(), n);
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t visible = s.past + r / groups + 1;  // causal: cached keys and new ones up to this token
      inverse[r] = 1.0f / softmax_row(scores.data() + r * width, visible, width, scale);
    }
    gemm_ab(m, dim, n, scores.data(), n, v, dim, outputs.data(), dim);
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t t = r / groups, head = kv * groups + r % groups;
      float* o = out + ((b * s.tokens + t) * s.heads + head) * s.dim;
      for (int64_t d = 0; d < s.dim; ++d) o[d] = outputs[r * s.dim + d] * inverse[r];
    }
  }
  if (set_threads) set_threads(blas_threads);
}

}  // namespace st
