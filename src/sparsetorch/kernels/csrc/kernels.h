// Sparse matmul kernels y = x W^T (+ bias), written once over the SIMD primitives of one ISA
// (`Simd`, from simd_avx512.h, simd_avx2.h or simd_scalar.h).
//
// Two regimes:
//   rows   decode, a few batch rows: stream each weight row once and apply it to every batch row
//          (memory-bound; the weight is the traffic).
//   outer  prefill, many batch rows: x is transposed into tiles xt (in, T) and every stored weight
//          w[r, c] adds w * xt[c, :] to T accumulators (compute-bound; each weight feeds T FMAs).
// Formats (see sparsetorch/formats): csr16 (values + uint16 columns + row pointers), bitmask
// (values + packed bits + row offsets), nm24 (2:4 values + 2-bit in-group indices).
#pragma once
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>

// Hot loops call small functions and lambdas; they must inline, or accumulators and pointers
// leave registers for the stack (measured: 3x slower).
#define ST_INLINE __attribute__((always_inline)) inline
#define ST_LAMBDA_INLINE __attribute__((always_inline))

namespace st {

using V = Simd::V;
constexpr int W = Simd::W;

// `Bytes` little-endian bytes from p as one word, of which only `avail` exist (the rest read as 0).
template <int Bytes>
ST_INLINE uint64_t read_bits(const uint8_t* p, int64_t avail) {
  uint64_t word = 0;
  if (avail >= Bytes) {
    std::memcpy(&word, p, Bytes);  // a fixed size: one load
  } else {
    for (int64_t i = 0; i < avail; ++i) word |= static_cast<uint64_t>(p[i]) << (8 * i);
  }
  return word;
}

// ---- the three formats, as views over raw pointers --------------------------------------------

struct Csr16 {
  const float* values;
  const uint16_t* cols;
  const int64_t* row_ptr;  // out + 1 entries
  int64_t in;

  template <class F>
  ST_INLINE void for_each(int64_t r, F&& f) const {
    for (int64_t k = row_ptr[r]; k < row_ptr[r + 1]; ++k) f(static_cast<int64_t>(cols[k]), values[k]);
  }
};

struct Bitmask {
  const float* values;
  const uint8_t* bits;
  const int64_t* row_offsets;  // out entries: where each row's values start
  int64_t in;

  inline int64_t row_bytes() const { return (in + 7) / 8; }

  template <class F>
  ST_INLINE void for_each(int64_t r, F&& f) const {
    const uint8_t* m = bits + r * row_bytes();
    const float* v = values + row_offsets[r];
    for (int64_t byte = 0; byte < row_bytes(); byte += 8) {
      uint64_t word = read_bits<8>(m + byte, row_bytes() - byte);
      while (word) {
        f(byte * 8 + __builtin_ctzll(word), *v++);
        word &= word - 1;
      }
    }
  }
};

struct Nm24 {
  const float* values;  // (out, in / 2)
  const uint8_t* idx;   // (out, in / 8): 2 bits per value, value k at bits 2 (k % 4) of byte k / 4
  int64_t in;

  inline int64_t row_values() const { return in / 2; }
  inline int64_t row_bytes() const { return (in + 7) / 8; }

  // One byte holds the indices of 4 values, i.e. of 2 groups: the 8 columns [8b, 8b + 8).
  template <class F>
  ST_INLINE void for_each(int64_t r, F&& f) const {
    const float* v = values + r * row_values();
    const uint8_t* m = idx + r * row_bytes();
    for (int64_t k = 0; k < row_values(); k += 4) {
      const uint32_t byte = m[k / 4];
      const int64_t base = 2 * k;
      f(base + (byte & 3), v[k]);
      f(base + ((byte >> 2) & 3), v[k + 1]);
      if (k + 2 < row_values()) {
        f(base + 4 + ((byte >> 4) & 3), v[k + 2]);
        f(base + 4 + ((byte >> 6) & 3), v[k + 3]);
      }
    }
  }
};

// ---- rows regime: B batch rows (1..8), each weight row read once ------------------------------

// Runs step(i, acc) for chunks i = 0 .. count-1 of one weight row and returns the row's B sums.
// With one or two batch rows, two alternating accumulator sets hide the FMA latency.

template <int B, class Step>
ST_INLINE void row_sums(int64_t count, Step&& step, float* sums) {
  V acc0[B], acc1[B];
  for (int j = 0; j < B; ++j) acc0[j] = acc1[j] = Simd::zero();
  int64_t i = 0;
  if constexpr (B <= 2) {
    for (; i + 2 <= count; i += 2) {
      step(i, acc0);
      step(i + 1, acc1);
    }
  }
  for (; i < count; ++i) step(i, acc0);
  for (int j = 0; j < B; ++j) sums[j] = Simd::sum(acc0[j]) + Simd::sum(acc1[j]);
}

template <int B>
inline void store_row(const float* sums, const float* bias, float* y, int64_t out, int64_t r) {
  const float b = bias ? bias[r] : 0.0f;
  for (int j = 0; j < B; ++j) y[j * out + r] = sums[j] + b;
}

// x[j * in + c .. + W) for a chunk that may end past the row (columns past `in` read as zero).
ST_INLINE V load_x(const float* x, int64_t in, int64_t c) {
  return c + W <= in ? Simd::load(x + c) : Simd::load_n(x + c, static_cast<int>(in - c));
}

// Main chunks are whole (W values, no bounds checks); one tail chunk may hold fewer.
template <int B, class Chunk>
ST_INLINE void row_sums_with_tail(int64_t whole, bool tail, Chunk&& chunk, float* sums) {
  row_sums<B>(whole, [&](int64_t i, V* acc) ST_LAMBDA_INLINE { chunk(i, std::true_type{}, acc); }, sums);
  if (tail) {
    float rest[B];
    row_sums<B>(1, [&](int64_t, V* acc) ST_LAMBDA_INLINE { chunk(whole, std::false_type{}, acc); }, rest);
    for (int j = 0; j < B; ++j) sums[j] += rest[j];
  }
}

template <int B>
void rows_kernel(const Csr16& w, const float* x, const float* bias, float* y, int64_t out, int64_t r0, int64_t r1) {
  float sums[B];
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t start = w.row_ptr[r], count = w.row_ptr[r + 1] - start;
    row_sums_with_tail<B>(count / W, count % W != 0, [&](int64_t i, auto whole, V* acc) ST_LAMBDA_INLINE {
      const int64_t k = start + i * W;
      const int n = whole ? W : static_cast<int>(count % W);
      const V v = whole ? Simd::load(w.values + k) : Simd::load_n(w.values + k, n);
      for (int j = 0; j < B; ++j) acc[j] = Simd::fma(v, Simd::gather_u16(x + j * w.in, w.cols + k, n), acc[j]);
    }, sums);
    store_row<B>(sums, bias, y, out, r);
  }
}

// One chunk of W columns starting at column c: expand the values its mask bits mark, FMA with x.
// Full: the chunk lies inside the row (no bounds check on x).
template <int B, bool Full>
ST_INLINE void bitmask_chunk(uint32_t bits, const float*& v, const float* x, int64_t in, int64_t c, V* acc) {
  const V wv = Simd::expand(v, bits);
  v += __builtin_popcount(bits);
  for (int j = 0; j < B; ++j) acc[j] = Simd::fma(wv, Full ? Simd::load(x + j * in + c) : load_x(x + j * in, in, c), acc[j]);
}

#ifndef ST_PREFETCH_BITS
#define ST_PREFETCH_BITS 256
#endif
#ifndef ST_PREFETCH_VALUES
#define ST_PREFETCH_VALUES 512
#endif

template <int B>
void rows_kernel(const Bitmask& w, const float* x, const float* bias, float* y, int64_t out, int64_t r0, int64_t r1) {
  constexpr int64_t Block = 64;  // columns per 64-bit mask word
  const int64_t bytes = w.row_bytes(), blocks = w.in / Block;
  float sums[B];
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* m = w.bits + r * bytes;
    const float* v = w.values + w.row_offsets[r];
    // Whole 64-column blocks: one mask load, then Block / W chunks with no bounds checks.
    row_sums<B>(blocks, [&](int64_t i, V* acc) ST_LAMBDA_INLINE {
      // Where the next values start depends on the bits just read, so the core cannot run ahead
      // to the values' cache misses by itself: prefetch both streams a few blocks ahead.
      __builtin_prefetch(m + i * (Block / 8) + ST_PREFETCH_BITS);
      __builtin_prefetch(v + ST_PREFETCH_VALUES);
      uint64_t word;
      std::memcpy(&word, m + i * (Block / 8), 8);
      for (int q = 0; q < Block / W; ++q) {
        const uint32_t bits = static_cast<uint32_t>(word >> (q * W)) & ((1u << W) - 1u);
        bitmask_chunk<B, true>(bits, v, x, w.in, i * Block + q * W, acc);
      }
    }, sums);
    // The last in % 64 columns, a chunk at a time.
    float tail[B];
    row_sums<B>((w.in - blocks * Block + W - 1) / W, [&](int64_t i, V* acc) ST_LAMBDA_INLINE {
      const int64_t c = blocks * Block + i * W;
      const uint32_t bits = static_cast<uint32_t>(read_bits<W / 8>(m + c / 8, bytes - c / 8));
      bitmask_chunk<B, false>(bits, v, x, w.in, c, acc);
    }, tail);
    for (int j = 0; j < B; ++j) sums[j] += tail[j];
    store_row<B>(sums, bias, y, out, r);
  }
}

template <int B>
void rows_kernel(const Nm24& w, const float* x, const float* bias, float* y, int64_t out, int64_t r0, int64_t r1) {
  const int64_t per = w.row_values(), bytes = w.row_bytes();
  float sums[B];
  for (int64_t r = r0; r < r1; ++r) {
    const float* v = w.values + r * per;
    const uint8_t* m = w.idx + r * bytes;
    // Chunk i: values [k, k + W) with k = i * W, i.e. the 2W columns [2k, 2k + 2W).
    row_sums_with_tail<B>(per / W, per % W != 0, [&](int64_t i, auto whole, V* acc) ST_LAMBDA_INLINE {
      const int64_t k = i * W;
      uint32_t bits = 0;
      if constexpr (whole) {
        std::memcpy(&bits, m + i * (W / 4), W / 4);
      } else {
        bits = static_cast<uint32_t>(read_bits<W / 4>(m + i * (W / 4), bytes - i * (W / 4)));
      }
      const typename Simd::Index index = Simd::nm24_index(bits);
      const V wv = whole ? Simd::load(v + k) : Simd::load_n(v + k, static_cast<int>(per - k));
      const int cols = whole ? 2 * W : static_cast<int>(w.in - 2 * k);
      for (int j = 0; j < B; ++j) acc[j] = Simd::fma(wv, Simd::nm24_select(x + j * w.in + 2 * k, index, cols), acc[j]);
    }, sums);
    store_row<B>(sums, bias, y, out, r);
  }
}

// Without vector instructions: walk the stored weights of each row, B scalar sums.
template <int B, class Format>
void scalar_rows_kernel(const Format& w, const float* x, const float* bias, float* y, int64_t out, int64_t r0,
                        int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    float sums[B] = {};
    w.for_each(r, [&](int64_t c, float value) ST_LAMBDA_INLINE {
      for (int j = 0; j < B; ++j) sums[j] += value * x[j * w.in + c];
    });
    store_row<B>(sums, bias, y, out, r);
  }
}

// ---- outer regime: tiles of T batch rows, x transposed ------------------------------------------

// xt (in, T) <- rows [t0, t0 + n) of x (batch, in), zero-padded to T columns.
template <int T>
void transpose_tile(const float* x, int64_t in, int64_t t0, int64_t n, float* xt, int64_t c0, int64_t c1) {
  for (int64_t c = c0; c < c1; ++c) {
    float* dst = xt + c * T;
    for (int64_t b = 0; b < n; ++b) dst[b] = x[(t0 + b) * in + c];
    for (int64_t b = n; b < T; ++b) dst[b] = 0.0f;
  }
}

template <int NV, class Format>
void outer_kernel(const Format& w, const float* xt, int64_t t0, int64_t n, const float* bias, float* y, int64_t out,
                  int64_t r0, int64_t r1) {
  constexpr int T = NV * W;
  alignas(64) float buf[T];
  for (int64_t r = r0; r < r1; ++r) {
    V acc[NV];
    for (int i = 0; i < NV; ++i) acc[i] = Simd::zero();
    w.for_each(r, [&](int64_t c, float value) ST_LAMBDA_INLINE {
      const V vb = Simd::set1(value);
      const float* p = xt + c * T;
      for (int i = 0; i < NV; ++i) acc[i] = Simd::fma(vb, Simd::load(p + i * W), acc[i]);
    });
    for (int i = 0; i < NV; ++i) Simd::store(buf + i * W, acc[i]);
    const float b = bias ? bias[r] : 0.0f;
    for (int64_t j = 0; j < n; ++j) y[(t0 + j) * out + r] = buf[j] + b;
  }
}

}  // namespace st
