// Fused fp32 elementwise steps of a Llama-style block (sparsetorch/models/ops.py). In eager PyTorch each is
// several passes over activations that do not fit in cache (RMSNorm: pow, mean, rsqrt, two multiplies; rotary:
// eight ops for q and k; SiLU-gated MLP: silu, then a multiply); here each is one pass, with the same
// arithmetic to float rounding.
#pragma once

#include <cmath>
#include <cstdint>

#include "attention.h"  // exp_nonpositive

namespace st {

// y[r] = weight * (x[r] * 1/sqrt(mean(x[r]^2) + eps)) for rows [r0, r1) of width d.
inline void rms_norm_rows(const float* x, const float* weight, float* y, int64_t d, float eps, int64_t r0,
                          int64_t r1) {
  constexpr int64_t L = 16;  // independent partial sums: a fixed-length loop the compiler vectorizes
  for (int64_t r = r0; r < r1; ++r) {
    const float* xr = x + r * d;
    float* yr = y + r * d;
    float sums[L] = {};
    const int64_t body = d / L * L;
    for (int64_t j = 0; j < body; j += L) {
      for (int64_t l = 0; l < L; ++l) sums[l] += xr[j + l] * xr[j + l];
    }
    for (int64_t j = body; j < d; ++j) sums[0] += xr[j] * xr[j];
    float total = 0.0f;
    for (int64_t l = 0; l < L; ++l) total += sums[l];
    const float inverse = 1.0f / std::sqrt(total / static_cast<float>(d) + eps);
    for (int64_t j = 0; j < d; ++j) yr[j] = weight[j] * (xr[j] * inverse);
  }
}

// rms_norm_rows after x[r] += update[r]: a block's residual add and the next norm in one op.
inline void add_rms_norm_rows(float* x, const float* update, const float* weight, float* y, int64_t d, float eps,
                              int64_t r0, int64_t r1) {
  for (int64_t i = r0 * d; i < r1 * d; ++i) x[i] += update[i];
  rms_norm_rows(x, weight, y, d, eps, r0, r1);
}

// y[i] = silu(g[i]) * u[i] for i in [i0, i1): the SiLU-gated MLP's product. The sigmoid takes
// e^-|g|, which never overflows, and is branch-free so the loop vectorizes.
inline void silu_mul_range(const float* g, const float* u, float* y, int64_t i0, int64_t i1) {
  for (int64_t i = i0; i < i1; ++i) {
    const float x = g[i];
    const float t = exp_nonpositive(-std::fabs(x));
    const float sigmoid = (x >= 0.0f ? 1.0f : t) / (1.0f + t);
    y[i] = x * sigmoid * u[i];
  }
}

// out = x * cos + rotate_half(x) * sin over one head of `dim` values, rotate_half(x) = (-x[dim/2:], x[:dim/2]).
inline void rotate_head(const float* x, const float* cos, const float* sin, float* out, int64_t dim) {
  const int64_t half = dim / 2;
  for (int64_t j = 0; j < half; ++j) out[j] = x[j] * cos[j] + (-x[j + half]) * sin[j];
  for (int64_t j = half; j < dim; ++j) out[j] = x[j] * cos[j] + x[j - half] * sin[j];
}

// Rotary position embedding of one (batch, head) row range: x (tokens, dim) rows with stride
// x_stride, cos and sin (tokens, dim) rows with stride cs_stride, out rows with stride out_stride.
inline void rotary_rows(const float* x, int64_t x_stride, const float* cos, const float* sin, int64_t cs_stride,
                        float* out, int64_t out_stride, int64_t tokens, int64_t dim) {
  for (int64_t t = 0; t < tokens; ++t) {
    rotate_head(x + t * x_stride, cos + t * cs_stride, sin + t * cs_stride, out + t * out_stride, dim);
  }
}

}  // namespace st
