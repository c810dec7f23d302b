// SparseGPT's joint mode (sparsetorch/oneshot/joint.py): the sweep of sparsegpt.h that also rounds every kept
// weight onto its row's value grid as it reaches it, and spreads (w - q) / d, the rounding error as much as the
// pruning error, over the columns after it. Each grid group's scale (and zero point) is found at the group's
// first column from the current weights of the entries not pruned there, with the very float32 operations of
// sparsetorch.quantize.find_grid, fp16 scale included, so the torch reference (`joint.sweep_joint`) and this
// sweep find the same grids from the same weights.
#pragma once

#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "sparsegpt.h"

namespace st {

// The grids of the block's rows: scale and zero are (groups in the block, out), row-major like the block.
struct JointGrid {
  int64_t group;    // columns per grid group, the block starting on a group; 0: one grid per row, given
  float low, high;  // the integer code range
  bool symmetric;
  bool search;      // searched clipping (sparsetorch.quantize): the range of least weighted rounding error
  float* scale;     // fp16 values as float32; found here unless group == 0
  float* zero;      // zero points (0 when symmetric)
};

constexpr float kTinyScale = 0x1p-24f;  // sparsetorch.quantize._TINY: the scale of a group of zeros
constexpr int kSearchSteps = 16;        // sparsetorch.quantize.SEARCH_STEPS: ranges (32 - k) / 32 of the extent

inline float to_half(float x) { return static_cast<float>(c10::Half(x)); }

// quantize then dequantize (sparsetorch.quantize), rounding half to even; -0.0 comes back as +0.0.
inline float round_on_grid(float w, float scale, float zero, const JointGrid& q) {
  const float code = std::min(std::max(std::nearbyint(w / scale + zero), q.low), q.high);
  return (code - zero) * scale + 0.0f;
}

// The grid spanning [bottom, top] ([-absmax, absmax] when symmetric): find_grid's _range_grid.
inline void range_grid(const JointGrid& q, float top, float bottom, float absmax, float& scale, float& zero) {
  zero = 0.0f;
  if (q.symmetric) {
    scale = to_half(std::max(absmax / q.high, kTinyScale));
  } else {
    scale = to_half(std::max((top - bottom) / (q.high - q.low), kTinyScale));
    zero = std::min(std::max(std::nearbyint(-bottom / scale), q.low), q.high);
  }
}

// Row r's squared error of rounding its kept entries in columns [first, last) on (scale, zero), column j's
// weighted by 1 / d_j^2 (joint.sweep_importance), in the float32 operations of quantize._rounding_error.
inline float group_error(const SweepShape& s, const JointGrid& q, const float* block, const float* hinv,
                         const uint8_t* pruned, int64_t first, int64_t last, int64_t r, float scale, float zero) {
  float error = 0.0f;
  for (int64_t j = first; j < last; ++j) {
    if (pruned[j * s.out + r]) continue;
    const float w = block[j * s.out + r], d = hinv[j * (s.ld_hinv + 1)];
    const float e = w - round_on_grid(w, scale, zero, q);
    error += e * e * (1.0f / (d * d));
  }
  return error;
}

// The grid of the group starting at column `first`, for rows [r0, r0 + rows): find_grid over kept entries, a
// searched one weighing column j's squared error by 1 / d_j^2 (joint.sweep_importance).
inline void find_group_grid(const SweepShape& s, const JointGrid& q, const float* block, const float* hinv,
                            const uint8_t* pruned, int64_t first, int64_t r0, int64_t rows) {
  const int64_t last = std::min(first + q.group, s.width), k = first / q.group;
  for (int64_t r = r0; r < r0 + rows; ++r) {
    float top = -INFINITY, bottom = INFINITY, absmax = 0.0f;
    for (int64_t j = first; j < last; ++j) {
      if (pruned[j * s.out + r]) continue;
      const float w = block[j * s.out + r];
      top = std::max(top, w);
      bottom = std::min(bottom, w);
      absmax = std::max(absmax, std::fabs(w));
    }
    top = top == -INFINITY ? 0.0f : std::max(top, 0.0f);  // no kept entry: the range [0, 0]
    bottom = bottom == INFINITY ? 0.0f : std::min(bottom, 0.0f);
    float scale, zero;
    range_grid(q, top, bottom, absmax, scale, zero);
    float least = q.search ? group_error(s, q, block, hinv, pruned, first, last, r, scale, zero) : 0.0f;
    for (int step = 1; q.search && step < kSearchSteps; ++step) {
      const float fraction = static_cast<float>(32 - step) / 32.0f;
      float trial_scale, trial_zero;
      range_grid(q, top * fraction, bottom * fraction, absmax * fraction, trial_scale, trial_zero);
      const float error = group_error(s, q, block, hinv, pruned, first, last, r, trial_scale, trial_zero);
      if (error < least) least = error, scale = trial_scale, zero = trial_zero;
    }
    q.scale[k * s.out + r] = scale;
    q.zero[k * s.out + r] = zero;
  }
}

template <int64_t R>
inline void sweep_rows_joint(const SweepShape& s, const JointGrid& q, float* block, const float* hinv,
                             uint8_t* pruned, float* errors, int64_t r0, int64_t count) {
  const int64_t rows = R ? R : count;
  float target[kSweepRows];
  for (int64_t i = 0; i < s.width; ++i) {
    if (s.m && i % s.m == 0) choose_nm(s, block, hinv, pruned, i, r0, rows);
    if (q.group && i % q.group == 0) find_group_grid(s, q, block, hinv, pruned, i, r0, rows);
    const int64_t k = q.group ? i / q.group : 0;
    const float* h = hinv + i * s.ld_hinv;
    const float d = h[i];
    const float* scale = q.scale + k * s.out + r0;
    const float* zero = q.zero + k * s.out + r0;
    float* w = block + i * s.out + r0;
    float* e = errors + i * s.out + r0;
    const uint8_t* p = pruned + i * s.out + r0;
    for (int64_t r = 0; r < rows; ++r) {
      target[r] = p[r] ? 0.0f : round_on_grid(w[r], scale[r], zero[r], q);
      e[r] = (w[r] - target[r]) / d;
    }
    for (int64_t j = i; j < s.width; ++j) {
      const float hj = h[j];
      float* wj = block + j * s.out + r0;
      for (int64_t r = 0; r < rows; ++r) wj[r] -= hj * e[r];
    }
    for (int64_t r = 0; r < rows; ++r) w[r] = target[r];  // what the update left there, up to rounding
  }
}

inline void sparsegpt_sweep_joint(const SweepShape& s, const JointGrid& q, float* block, const float* hinv,
                                  uint8_t* pruned, float* errors, int64_t slice_begin, int64_t slice_end) {
  for (int64_t slice = slice_begin; slice < slice_end; ++slice) {
    const int64_t r0 = slice * kSweepRows, count = std::min(kSweepRows, s.out - r0);
    if (count == kSweepRows) {
      sweep_rows_joint<kSweepRows>(s, q, block, hinv, pruned, errors, r0, count);
    } else {
      sweep_rows_joint<0>(s, q, block, hinv, pruned, errors, r0, count);
    }
  }
}

}  // namespace st
