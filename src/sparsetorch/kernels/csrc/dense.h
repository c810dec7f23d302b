// Dense small-batch kernels: y = x W^T (+ bias) for a few batch rows, W fp32 or bf16 (out, in), x fp32.
//
// A decode step multiplies one activation row by each weight: a matrix-vector product bound by the
// weight's traffic. General GEMM libraries treat it as a thin GEMM and stream it well below the
// memory's speed at one or two threads; here each thread walks its rows end to end, several rows side
// by side (more independent streams in flight), and every weight chunk meets all B batch rows while in
// registers. bf16 weights are widened to fp32 (a shift) and multiplied in fp32: half the bytes of fp32
// at fp32 arithmetic, the activations never rounded.
#pragma once
#include "kernels.h"

namespace st {

struct DenseF32 {
  const float* w;  // (out, in)
  int64_t in;
  ST_INLINE V chunk(int64_t r, int64_t c) const { return Simd::load(w + r * in + c); }
  ST_INLINE V chunk_n(int64_t r, int64_t c, int n) const { return Simd::load_n(w + r * in + c, n); }
};

struct DenseBF16 {
  const uint16_t* w;  // (out, in) bf16 bits
  int64_t in;
  ST_INLINE V chunk(int64_t r, int64_t c) const { return Simd::from_bf16(w + r * in + c); }
  ST_INLINE V chunk_n(int64_t r, int64_t c, int n) const { return Simd::from_bf16_n(w + r * in + c, n); }
};

// R rows from r: their B sums each.
template <int R, int B, class Weight>
ST_INLINE void dense_row_sums(const Weight& w, const float* x, int64_t r, float (*sums)[B]) {
  V acc[R][B];
  for (int k = 0; k < R; ++k)
    for (int j = 0; j < B; ++j) acc[k][j] = Simd::zero();
  int64_t c = 0;
  for (; c + W <= w.in; c += W) {
    V xv[B];
    for (int j = 0; j < B; ++j) xv[j] = Simd::load(x + j * w.in + c);
    for (int k = 0; k < R; ++k) {
      const V wv = w.chunk(r + k, c);
      for (int j = 0; j < B; ++j) acc[k][j] = Simd::fma(wv, xv[j], acc[k][j]);
    }
  }
  if (c < w.in) {  // the last in % W columns
    const int n = static_cast<int>(w.in - c);
    V xv[B];
    for (int j = 0; j < B; ++j) xv[j] = Simd::load_n(x + j * w.in + c, n);
    for (int k = 0; k < R; ++k) {
      const V wv = w.chunk_n(r + k, c, n);
      for (int j = 0; j < B; ++j) acc[k][j] = Simd::fma(wv, xv[j], acc[k][j]);
    }
  }
  for (int k = 0; k < R; ++k)
    for (int j = 0; j < B; ++j) sums[k][j] = Simd::sum(acc[k][j]);
}

// Rows [r0, r1) of y for B batch rows: R rows at a time while R * B accumulators fit the registers.
template <int B, class Weight>
void dense_rows_kernel(const Weight& w, const float* x, const float* bias, float* y, int64_t out, int64_t r0,
                       int64_t r1) {
  constexpr int R = B == 1 ? 4 : B == 2 ? 2 : 1;
  int64_t r = r0;
  for (; r + R <= r1; r += R) {
    float sums[R][B];
    dense_row_sums<R, B>(w, x, r, sums);
    for (int k = 0; k < R; ++k) store_row<B>(sums[k], bias, y, out, r + k);
  }
  for (; r < r1; ++r) {
    float sums[1][B];
    dense_row_sums<1, B>(w, x, r, sums);
    store_row<B>(sums[0], bias, y, out, r);
  }
}

}  // namespace st
