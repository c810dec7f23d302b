// SparseGPT's column sweep inside one lazy block of columns (sparsetorch/oneshot/sparsegpt.py).
//
// Pruning column i leaves an error that row i of the inverse-Hessian factor spreads over the
// columns after it in the block: width^2/2 rank-1 updates, one column at a time. As torch ops that
// is a handful of small calls per column, whose overhead was about half of SparseGPT's solve
// time. Every weight row is independent of the others (the factor is shared, the mask is per row
// or fixed in advance), so here each task sweeps a slice of rows through the whole block, with the
// slice's columns resident in L1 and the row loop vectorized.
#pragma once

#include <algorithm>
#include <cstdint>

namespace st {

constexpr int64_t kSweepRows = 32;  // weight rows per slice: 128 columns of them fill half of L1

// The block is stored transposed: block[i * out + r] is weight (r, start + i). hinv is the
// factor's diagonal block for these columns (upper triangular, leading dimension ld_hinv).
// pruned[i * out + r] is 1 where the weight is pruned: given (m == 0) or, for N:M (keep n of
// every m columns), chosen here from the updated weights as each group of m columns is reached.
// On return errors[i * out + r] holds the error of column i (0 where kept) and pruned weights are +0.
struct SweepShape {
  int64_t width, out, ld_hinv, n, m;
};

// Prune the m - n lowest of (w / d)^2 in each row's group of m columns; ties prune the first.
constexpr int64_t kMaxGroup = 64;  // the largest m of an N:M pattern the sweep chooses masks for

inline void choose_nm(const SweepShape& s, const float* block, const float* hinv, uint8_t* pruned, int64_t first,
                      int64_t r0, int64_t rows) {
  float score[kMaxGroup];
  for (int64_t r = r0; r < r0 + rows; ++r) {
    for (int64_t j = 0; j < s.m; ++j) {
      const float w = block[(first + j) * s.out + r] / hinv[(first + j) * (s.ld_hinv + 1)];
      score[j] = w * w;
      pruned[(first + j) * s.out + r] = 0;
    }
    for (int64_t k = 0; k < s.m - s.n; ++k) {
      int64_t lowest = -1;
      for (int64_t j = 0; j < s.m; ++j) {
        if (!pruned[(first + j) * s.out + r] && (lowest < 0 || score[j] < score[lowest])) lowest = j;
      }
      pruned[(first + lowest) * s.out + r] = 1;
    }
  }
}

// Rows [r0, r0 + rows) through all columns; R = kSweepRows lets the compiler keep a column's
// errors in registers, R = 0 serves the last, partial slice.
template <int64_t R>
inline void sweep_rows(const SweepShape& s, float* block, const float* hinv, uint8_t* pruned, float* errors, int64_t r0,
                       int64_t count) {
  const int64_t rows = R ? R : count;
  for (int64_t i = 0; i < s.width; ++i) {
    if (s.m && i % s.m == 0) choose_nm(s, block, hinv, pruned, i, r0, rows);
    const float* h = hinv + i * s.ld_hinv;
    const float scale = 1.0f / h[i];
    float* e = errors + i * s.out + r0;
    const float* w = block + i * s.out + r0;
    const uint8_t* p = pruned + i * s.out + r0;
    for (int64_t r = 0; r < rows; ++r) e[r] = p[r] ? w[r] * scale : 0.0f;
    for (int64_t j = i; j < s.width; ++j) {
      const float hj = h[j];
      float* wj = block + j * s.out + r0;
      for (int64_t r = 0; r < rows; ++r) wj[r] -= hj * e[r];
    }
  }
  for (int64_t i = 0; i < s.width; ++i) {
    float* w = block + i * s.out + r0;
    const uint8_t* p = pruned + i * s.out + r0;
    for (int64_t r = 0; r < rows; ++r) w[r] = p[r] ? 0.0f : w[r];
  }
}

// The slices [slice_begin, slice_end) of kSweepRows rows each (the last may be shorter).
inline void sparsegpt_sweep(const SweepShape& s, float* block, const float* hinv, uint8_t* pruned, float* errors,
                            int64_t slice_begin, int64_t slice_end) {
  for (int64_t slice = slice_begin; slice < slice_end; ++slice) {
    const int64_t r0 = slice * kSweepRows, count = std::min(kSweepRows, s.out - r0);
    if (count == kSweepRows) {
      sweep_rows<kSweepRows>(s, block, hinv, pruned, errors, r0, count);
    } else {
      sweep_rows<0>(s, block, hinv, pruned, errors, r0, count);
    }
  }
}

}  // namespace st
