// Decode kernels for quantized weights: y = x W^T (+ bias) with W = codes * scale, x fp32.
//
// The weight is read once per call (the rows regime of kernels.h): each row's codes are streamed,
// turned into W floats a chunk at a time (`Simd::from_i8`, `expand_i8`, `from_i4`), multiplied with
// x, and summed; a row's scale multiplies whole sums, never single codes. With group scales
// (`group` input columns per scale, a multiple of 32, so a chunk never straddles two groups) each
// group's partial sums are scaled as vectors and added. Symmetric grids only: code 0 is weight 0.
// Formats (see sparsetorch/formats/quantized.py for the stored layouts):
//   DenseI8    int8 codes (out, in)
//   BitmaskI8  int8 codes of the kept weights, row-major, with the bitmask structure's bits and offsets
//   Nm24I4     2:4 values as 4-bit codes (code + 8, two per byte, low nibble first), 2-bit indices
//   DenseI4    4-bit codes (code + 8) of every weight, rows padded to 8 codes (compressed-tensors' packing)
//   BitmaskI4  4-bit codes (code + 8) of the kept weights, two per byte, flat in row-major order
#pragma once
#include "kernels.h"

namespace st {

// Where a row's scales change: `scale` is (out, groups) fp32; a group spans `group_chunks` chunks
// of the kernel (0: one scale for the whole row).
struct Scales {
  const float* scale;
  int64_t groups;
  int64_t group_chunks;

  inline const float* row(int64_t r) const { return scale + r * groups; }
};

struct DenseI8 {
  const int8_t* codes;  // (out, in)
  Scales s;
  int64_t in;
};

struct BitmaskI8 {
  const int8_t* codes;  // the kept weights' codes, row-major
  int64_t count;        // codes in all
  const uint8_t* bits;  // (out, ceil(in / 8)), bit c % 8 of byte c / 8 is column c
  const int64_t* row_offsets;
  Scales s;
  int64_t in;

  inline int64_t row_bytes() const { return (in + 7) / 8; }
};

struct Nm24I4 {
  const uint8_t* codes;  // (out, in / 4) bytes: the row's in / 2 values, two per byte
  const uint8_t* idx;    // (out, ceil(in / 8)): 2 bits per value, as in Nm24
  Scales s;
  int64_t in;

  inline int64_t row_values() const { return in / 2; }
  inline int64_t row_bytes() const { return (in + 7) / 8; }
};

struct BitmaskI4 {
  const uint8_t* codes;  // code k of the flat sequence in byte k / 2, low nibble when k is even
  const uint8_t* bits;   // as BitmaskI8's
  const int64_t* row_offsets;  // in codes
  Scales s;
  int64_t in;

  inline int64_t row_bytes() const { return (in + 7) / 8; }
  // Code k of the flat sequence, as a weight in units of the scale.
  inline float code(int64_t k) const { return static_cast<float>(static_cast<int>((codes[k >> 1] >> ((k & 1) * 4)) & 15) - 8); }
};

struct DenseI4 {
  const uint8_t* codes;  // (out, row_bytes): column c in byte c / 2, low nibble when c is even
  int64_t row_bytes;     // 4 * ceil(in / 8)
  Scales s;
  int64_t in;
};

// Runs chunk(i, whole, acc) for the chunks i = 0 .. whole + tail - 1 of one row, in order (the last
// one partial when `tail`), and returns the row's B sums: each group's vector sums times its scale.
// With one batch row, four alternating accumulator sets hide the FMA latency (two with two rows):
// the chunks are cheaper to decode than fp32 ones, so latency shows sooner than in kernels.h.
template <int B, class Chunk>
ST_INLINE void grouped_row_sums(int64_t whole, bool tail, int64_t group_chunks, const float* scale, Chunk&& chunk,
                                float* sums) {
  constexpr int kSets = B == 1 ? 4 : B == 2 ? 2 : 1;
  const int64_t count = whole + (tail ? 1 : 0), per = group_chunks > 0 ? group_chunks : count;
  V total[B];
  for (int j = 0; j < B; ++j) total[j] = Simd::zero();
  for (int64_t g = 0, start = 0; start < count; ++g, start += per) {
    const int64_t stop = std::min(count, start + per), full = std::min(stop, whole);
    V acc[kSets][B];
    for (auto& set : acc)
      for (int j = 0; j < B; ++j) set[j] = Simd::zero();
    int64_t i = start;
    if constexpr (B == 1) {
      for (; i + 4 <= full; i += 4) {
        chunk(i, std::true_type{}, acc[0]);
        chunk(i + 1, std::true_type{}, acc[1]);
        chunk(i + 2, std::true_type{}, acc[2]);
        chunk(i + 3, std::true_type{}, acc[3]);
      }
    } else if constexpr (B == 2) {
      for (; i + 2 <= full; i += 2) {
        chunk(i, std::true_type{}, acc[0]);
        chunk(i + 1, std::true_type{}, acc[1]);
      }
    }
    for (; i < full; ++i) chunk(i, std::true_type{}, acc[0]);
    if (stop > whole) chunk(whole, std::false_type{}, acc[0]);
    const V sv = Simd::set1(scale[g]);
    for (int a = 0; a < kSets; ++a)
      for (int j = 0; j < B; ++j) total[j] = Simd::fma(acc[a][j], sv, total[j]);
  }
  for (int j = 0; j < B; ++j) sums[j] = Simd::sum(total[j]);
}

// `Bytes` bytes at p as one word (whole: all exist; else only `avail` do, the rest read as zero).
template <int Bytes>
ST_INLINE uint64_t read_word(const uint8_t* p, int64_t avail, bool whole) {
  if (whole) {
    uint64_t word = 0;
    std::memcpy(&word, p, Bytes);
    return word;
  }
  return read_bits<Bytes>(p, avail);
}

// x[j * in + c .. + W) of batch row j for a whole chunk (no bounds checks) or the partial last one.
template <class Whole>
ST_INLINE V x_chunk(const float* x, int64_t in, int j, int64_t c, Whole whole) {
  return whole ? Simd::load(x + j * in + c) : load_x(x + j * in, in, c);
}

template <int B>
void quant_rows_kernel(const DenseI8& w, const float* x, const float* bias, float* y, int64_t out, int64_t r0,
                       int64_t r1) {
  float sums[B];
  for (int64_t r = r0; r < r1; ++r) {
    const int8_t* q = w.codes + r * w.in;
    // Chunk i: columns [c, c + W), c = i * W.
    auto chunk = [&](int64_t i, auto whole, V* acc) ST_LAMBDA_INLINE {
      const int64_t c = i * W;
      const V wv = whole ? Simd::from_i8(q + c) : Simd::from_i8_n(q + c, static_cast<int>(w.in - c));
      for (int j = 0; j < B; ++j) acc[j] = Simd::fma(wv, x_chunk(x, w.in, j, c, whole), acc[j]);
    };
    grouped_row_sums<B>(w.in / W, w.in % W != 0, w.s.group_chunks, w.s.row(r), chunk, sums);
    store_row<B>(sums, bias, y, out, r);
  }
}

template <int B>
void quant_rows_kernel(const BitmaskI8& w, const float* x, const float* bias, float* y, int64_t out, int64_t r0,
                       int64_t r1) {
  const int64_t bytes = w.row_bytes();
  const int8_t* end = w.codes + w.count;
  float sums[B];
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* m = w.bits + r * bytes;
    const int8_t* v = w.codes + w.row_offsets[r];
    // Chunk i: columns [c, c + W), c = i * W; its W mask bits say which lanes take the next codes.
    auto chunk = [&](int64_t i, auto whole, V* acc) ST_LAMBDA_INLINE {
      const int64_t c = i * W;
      // Where the next codes start depends on the bits just read, so the core cannot run ahead to
      // their cache misses by itself: prefetch a few chunks ahead (as kernels.h does for fp32).
      __builtin_prefetch(v + 256);
      const auto bits = static_cast<uint32_t>(read_word<W / 8>(m + i * (W / 8), bytes - i * (W / 8), whole));
      const V wv = Simd::expand_i8(v, bits, end - v);
      v += __builtin_popcount(bits);
      for (int j = 0; j < B; ++j) acc[j] = Simd::fma(wv, x_chunk(x, w.in, j, c, whole), acc[j]);
    };
    grouped_row_sums<B>(w.in / W, w.in % W != 0, w.s.group_chunks, w.s.row(r), chunk, sums);
    store_row<B>(sums, bias, y, out, r);
  }
}

template <int B>
void quant_rows_kernel(const Nm24I4& w, const float* x, const float* bias, float* y, int64_t out, int64_t r0,
                       int64_t r1) {
  const int64_t per = w.row_values(), bytes = w.row_bytes();
  float sums[B];
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* q = w.codes + r * (per / 2);
    const uint8_t* m = w.idx + r * bytes;
    // Chunk i: values [k, k + W), k = i * W, i.e. the 2W columns [2k, 2k + 2W): W / 2 code bytes, W / 4 index bytes.
    auto chunk = [&](int64_t i, auto whole, V* acc) ST_LAMBDA_INLINE {
      const int64_t k = i * W;
      const auto index_bits = static_cast<uint32_t>(read_word<W / 4>(m + i * (W / 4), bytes - i * (W / 4), whole));
      const typename Simd::Index index = Simd::nm24_index(index_bits);
      // A partial chunk's missing codes read as nibble 0 (weight -8 * scale), but they meet columns past `in`: x = 0.
      const V wv = Simd::from_i4(read_word<W / 2>(q + i * (W / 2), per / 2 - i * (W / 2), whole));
      const int cols = whole ? 2 * W : static_cast<int>(w.in - 2 * k);
      for (int j = 0; j < B; ++j) acc[j] = Simd::fma(wv, Simd::nm24_select(x + j * w.in + 2 * k, index, cols), acc[j]);
    };
    grouped_row_sums<B>(per / W, per % W != 0, w.s.group_chunks, w.s.row(r), chunk, sums);
    store_row<B>(sums, bias, y, out, r);
  }
}

// The portable path (no nibble expansion in hardware): a chunk's kept codes are unpacked one by one
// into floats, then placed by the fp32 bitmask expansion. The avx512vnni build does better.
template <int B>
void quant_rows_kernel(const BitmaskI4& w, const float* x, const float* bias, float* y, int64_t out, int64_t r0,
                       int64_t r1) {
  const int64_t bytes = w.row_bytes();
  float sums[B];
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* m = w.bits + r * bytes;
    int64_t next = w.row_offsets[r];
    auto chunk = [&](int64_t i, auto whole, V* acc) ST_LAMBDA_INLINE {
      const int64_t c = i * W;
      const auto bits = static_cast<uint32_t>(read_word<W / 8>(m + i * (W / 8), bytes - i * (W / 8), whole));
      float kept[W];
      const int n = __builtin_popcount(bits);
      for (int t = 0; t < n; ++t) kept[t] = w.code(next + t);
      next += n;
      const V wv = Simd::expand(kept, bits);
      for (int j = 0; j < B; ++j) acc[j] = Simd::fma(wv, x_chunk(x, w.in, j, c, whole), acc[j]);
    };
    grouped_row_sums<B>(w.in / W, w.in % W != 0, w.s.group_chunks, w.s.row(r), chunk, sums);
    store_row<B>(sums, bias, y, out, r);
  }
}

template <int B>
void quant_rows_kernel(const DenseI4& w, const float* x, const float* bias, float* y, int64_t out, int64_t r0,
                       int64_t r1) {
  float sums[B];
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* q = w.codes + r * w.row_bytes;
    // Chunk i: columns [c, c + W), c = i * W, in W / 2 bytes; padding nibbles past `in` meet x = 0.
    auto chunk = [&](int64_t i, auto whole, V* acc) ST_LAMBDA_INLINE {
      const int64_t c = i * W;
      const V wv = Simd::from_i4(read_word<W / 2>(q + i * (W / 2), w.row_bytes - i * (W / 2), whole));
      for (int j = 0; j < B; ++j) acc[j] = Simd::fma(wv, x_chunk(x, w.in, j, c, whole), acc[j]);
    };
    grouped_row_sums<B>(w.in / W, w.in % W != 0, w.s.group_chunks, w.s.row(r), chunk, sums);
    store_row<B>(sums, bias, y, out, r);
  }
}

}  // namespace st
