// Decode kernels for quantized weights on AVX-512 VNNI: int8 weights times int8 activations.
//
// Converting every code to fp32 before its multiply (quantized.h) costs three instructions per 16
// weights, so those kernels are compute-bound well below the memory's speed. Here the activations
// are rounded to int8 once per call, per block of 64 columns with a scale of its own (as llama.cpp's
// Q8 blocks: an outlier column costs only its own block precision), and one `vpdpbusd` multiplies
// and sums 64 code pairs. Per 64 weights and batch row that leaves a dot, an int -> float conversion
// and one FMA with the block's scale.
//
// `vpdpbusd` multiplies unsigned by signed bytes. The weight side is made unsigned by an offset:
// int8 codes + 128 (XOR 0x80), 4-bit codes as stored (code + 8). What the offset adds,
// offset * sum(x codes of the block), is the same for every weight row, so it is computed once per
// call with the activations (`ActivationBlocks::offset_sums`, per weight group) and taken off each
// row's sum at the end. A pruned weight (bitmask lane not set) must add nothing: its lane holds the
// offset itself, i.e. weight 0.
//
// Formats (the structs of quantized.h): DenseI8, BitmaskI8, DenseI4, BitmaskI4, Nm24I4; group scales
// must span whole blocks (group a multiple of 64, or one scale per row). ops.cpp sends the rest to quantized.h.
#pragma once
#include <immintrin.h>

#include "quantized.h"

namespace st::vnni {

constexpr int64_t kBlock = 64;  // columns per activation scale, and per vpdpbusd

// B rows of activations as int8 codes, zero-padded to whole blocks, with one scale per block.
struct ActivationBlocks {
  const int8_t* codes;        // (B, blocks * 64)
  const float* scale;         // (B, blocks)
  const float* offset_sums;   // (B, groups): per weight group, sum over its blocks of scale * sum(codes)
  int64_t blocks, groups;

  inline const int8_t* row_block(int j, int64_t b) const { return codes + (j * blocks + b) * kBlock; }
};

inline __mmask64 first_bytes(int64_t n) { return n >= 64 ? ~__mmask64{0} : (__mmask64{1} << n) - 1; }

// 32 bytes of 4-bit codes (low nibble first; missing bytes read as 0) -> the 64 codes, one per byte,
// in order: each byte widens to 16 bits and its high nibble moves to the upper byte.
inline __m512i nibbles(const uint8_t* p, int64_t avail) {
  const __m256i packed = _mm256_maskz_loadu_epi8(static_cast<__mmask32>(first_bytes(avail)), p);
  const __m512i wide = _mm512_cvtepu8_epi16(packed);
  const __m512i low = _mm512_and_si512(wide, _mm512_set1_epi16(0x000F));
  return _mm512_or_si512(low, _mm512_slli_epi16(_mm512_and_si512(wide, _mm512_set1_epi16(0x00F0)), 4));
}

// Rounds x (batch, in) to the int8 blocks of `out` (buffers sized as ActivationBlocks says);
// `group_blocks` blocks per weight group (0: one group).
inline void quantize_activations(const float* x, int64_t batch, int64_t in, int64_t group_blocks, int8_t* codes,
                                 float* scale, float* offset_sums, int64_t blocks, int64_t groups) {
  for (int64_t j = 0; j < batch; ++j) {
    const float* row = x + j * in;
    float* sums = offset_sums + j * groups;
    for (int64_t g = 0; g < groups; ++g) sums[g] = 0.0f;
    for (int64_t b = 0; b < blocks; ++b) {
      const int64_t c0 = b * kBlock;
      __m512 v[4];
      __m512 amax = _mm512_setzero_ps();
      for (int k = 0; k < 4; ++k) {
        const int64_t lanes = std::max<int64_t>(0, std::min<int64_t>(16, in - c0 - 16 * k));
        v[k] = _mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << lanes) - 1u), row + std::min(in, c0 + 16 * k));
        amax = _mm512_max_ps(amax, _mm512_abs_ps(v[k]));
      }
      const float top = _mm512_reduce_max_ps(amax);
      const __m512 inverse = _mm512_set1_ps(top > 0.0f ? 127.0f / top : 0.0f);
      __m512i total = _mm512_setzero_si512();
      int8_t* out = codes + (j * blocks + b) * kBlock;
      for (int k = 0; k < 4; ++k) {
        const __m512i q = _mm512_cvtps_epi32(_mm512_mul_ps(v[k], inverse));  // round to nearest even
        total = _mm512_add_epi32(total, q);
        _mm_storeu_si128(reinterpret_cast<__m128i*>(out + 16 * k), _mm512_cvtsepi32_epi8(q));
      }
      scale[j * blocks + b] = top / 127.0f;
      sums[group_blocks > 0 ? b / group_blocks : 0] += scale[j * blocks + b] * _mm512_reduce_add_epi32(total);
    }
  }
}

// R weight rows' B sums each: block(k, b) gives row k's 64 unsigned weight bytes of block b (weight
// + `offset`); each block's dot with each batch row's codes is scaled by that block's activation
// scale, each group's sum by the row's weight scale (scales[k] is row k's), and the offset's share
// taken off at the end. Several rows at once: their code streams are fetched from memory side by
// side (one stream per core does not reach the memory's speed) and each activation block is loaded
// once for all of them.
template <int R, int B, class Block>
ST_INLINE void row_sums(const ActivationBlocks& x, int64_t group_blocks, const float* const* scales, float offset,
                        Block&& block, float (*sums)[B]) {
  const int64_t per = group_blocks > 0 ? group_blocks : x.blocks;
  __m512 total[R][B];
  float correction[R][B];
  for (int k = 0; k < R; ++k)
    for (int j = 0; j < B; ++j) total[k][j] = _mm512_setzero_ps(), correction[k][j] = 0.0f;
  for (int64_t g = 0, start = 0; start < x.blocks; ++g, start += per) {
    const int64_t stop = std::min(x.blocks, start + per);
    __m512 acc[R][B];
    for (int k = 0; k < R; ++k)
      for (int j = 0; j < B; ++j) acc[k][j] = _mm512_setzero_ps();
    for (int64_t b = start; b < stop; ++b) {
      __m512i xv[B];
      __m512 xs[B];
      for (int j = 0; j < B; ++j) {
        xv[j] = _mm512_loadu_si512(x.row_block(j, b));
        xs[j] = _mm512_set1_ps(x.scale[j * x.blocks + b]);
      }
      for (int k = 0; k < R; ++k) {
        const __m512i w = block(k, b);
        for (int j = 0; j < B; ++j) {
          const __m512i dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w, xv[j]);
          acc[k][j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), xs[j], acc[k][j]);
        }
      }
    }
    for (int k = 0; k < R; ++k) {
      const __m512 s = _mm512_set1_ps(scales[k][g]);
      for (int j = 0; j < B; ++j) {
        total[k][j] = _mm512_fmadd_ps(acc[k][j], s, total[k][j]);
        correction[k][j] += scales[k][g] * x.offset_sums[j * x.groups + g];
      }
    }
  }
  for (int k = 0; k < R; ++k)
    for (int j = 0; j < B; ++j) sums[k][j] = _mm512_reduce_add_ps(total[k][j]) - offset * correction[k][j];
}

// Rows r0 .. r1 in steps of R (then one at a time for the rest): rows(r, R-constant) sets up R
// rows from r and returns their sums through row_sums; each is stored with its bias.
template <int B, class Rows>
ST_INLINE void each_row(int64_t r0, int64_t r1, const float* bias, float* y, int64_t out, Rows&& rows) {
  constexpr int R = B == 1 ? 4 : B == 2 ? 2 : 1;  // R * B accumulators stay within the registers
  int64_t r = r0;
  for (; r + R <= r1; r += R) {
    float sums[R][B];
    rows(r, std::integral_constant<int, R>{}, sums);
    for (int k = 0; k < R; ++k) store_row<B>(sums[k], bias, y, out, r + k);
  }
  for (; r < r1; ++r) {
    float sums[1][B];
    rows(r, std::integral_constant<int, 1>{}, sums);
    store_row<B>(sums[0], bias, y, out, r);
  }
}

inline __m512i plus_128(__m512i codes) { return _mm512_xor_si512(codes, _mm512_set1_epi8(static_cast<char>(0x80))); }

template <int B>
void rows_kernel(const DenseI8& w, const ActivationBlocks& x, const float* bias, float* y, int64_t out, int64_t r0,
                 int64_t r1) {
  each_row<B>(r0, r1, bias, y, out, [&](int64_t r, auto rows, auto sums) ST_LAMBDA_INLINE {
    constexpr int R = decltype(rows)::value;
    const float* scales[R];
    for (int k = 0; k < R; ++k) scales[k] = w.s.row(r + k);
    // Columns past `in` read as code 0 (+128) and meet activation codes 0.
    auto block = [&](int k, int64_t b) ST_LAMBDA_INLINE {
      return plus_128(_mm512_maskz_loadu_epi8(first_bytes(w.in - b * kBlock), w.codes + (r + k) * w.in + b * kBlock));
    };
    row_sums<R, B>(x, w.s.group_chunks, scales, 128.0f, block, sums);
  });
}

template <int B>
void rows_kernel(const BitmaskI8& w, const ActivationBlocks& x, const float* bias, float* y, int64_t out, int64_t r0,
                 int64_t r1) {
  const int64_t bytes = w.row_bytes();
  each_row<B>(r0, r1, bias, y, out, [&](int64_t r, auto rows, auto sums) ST_LAMBDA_INLINE {
    constexpr int R = decltype(rows)::value;
    const float* scales[R];
    const int8_t* v[R];
    for (int k = 0; k < R; ++k) scales[k] = w.s.row(r + k), v[k] = w.codes + w.row_offsets[r + k];
    // Block b's 64 mask bits say which lanes take the row's next codes; the rest hold 0 (+128 = weight 0).
    auto block = [&](int k, int64_t b) ST_LAMBDA_INLINE {
      __builtin_prefetch(v[k] + 512);  // where the next codes start depends on these bits: fetch ahead
      const uint64_t bits = read_word<8>(w.bits + (r + k) * bytes + b * 8, bytes - b * 8, (b + 1) * 8 <= bytes);
      const __m512i codes = _mm512_maskz_expandloadu_epi8(bits, v[k]);
      v[k] += __builtin_popcountll(bits);
      return plus_128(codes);
    };
    row_sums<R, B>(x, w.s.group_chunks, scales, 128.0f, block, sums);
  });
}

template <int B>
void rows_kernel(const DenseI4& w, const ActivationBlocks& x, const float* bias, float* y, int64_t out, int64_t r0,
                 int64_t r1) {
  each_row<B>(r0, r1, bias, y, out, [&](int64_t r, auto rows, auto sums) ST_LAMBDA_INLINE {
    constexpr int R = decltype(rows)::value;
    const float* scales[R];
    for (int k = 0; k < R; ++k) scales[k] = w.s.row(r + k);
    // Block b: 32 bytes of codes (+8); padding and missing bytes meet activation codes 0.
    auto block = [&](int k, int64_t b) ST_LAMBDA_INLINE {
      return nibbles(w.codes + (r + k) * w.row_bytes + b * 32, w.row_bytes - b * 32);
    };
    row_sums<R, B>(x, w.s.group_chunks, scales, 8.0f, block, sums);
  });
}

template <int B>
void rows_kernel(const BitmaskI4& w, const ActivationBlocks& x, const float* bias, float* y, int64_t out, int64_t r0,
                 int64_t r1) {
  const int64_t bytes = w.row_bytes();
  const __m512i iota = _mm512_set_epi8(63, 62, 61, 60, 59, 58, 57, 56, 55, 54, 53, 52, 51, 50, 49, 48, 47, 46, 45,
                                       44, 43, 42, 41, 40, 39, 38, 37, 36, 35, 34, 33, 32, 31, 30, 29, 28, 27, 26, 25,
                                       24, 23, 22, 21, 20, 19, 18, 17, 16, 15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3,
                                       2, 1, 0);
  const __m512i shift[2] = {iota, _mm512_add_epi8(iota, _mm512_set1_epi8(1))};
  each_row<B>(r0, r1, bias, y, out, [&](int64_t r, auto rows, auto sums) ST_LAMBDA_INLINE {
    constexpr int R = decltype(rows)::value;
    const float* scales[R];
    int64_t next[R];
    for (int k = 0; k < R; ++k) scales[k] = w.s.row(r + k), next[k] = w.row_offsets[r + k];
    // Block b: its mask bits take the row's next codes, which start at any nibble: the 33 bytes
    // holding them are unpacked from the byte of the first, moved down one lane when it is a high
    // nibble; lanes not kept hold 8 (weight 0).
    auto block = [&](int k, int64_t b) ST_LAMBDA_INLINE {
      const uint64_t bits = read_word<8>(w.bits + (r + k) * bytes + b * 8, bytes - b * 8, (b + 1) * 8 <= bytes);
      const int n = __builtin_popcountll(bits);
      const int odd = static_cast<int>(next[k] & 1);
      const uint8_t* p = w.codes + (next[k] >> 1);
      const int64_t need = (odd + n + 1) / 2;
      __m512i codes = _mm512_permutexvar_epi8(shift[odd], nibbles(p, std::min<int64_t>(need, 32)));
      if (need > 32) codes = _mm512_mask_set1_epi8(codes, __mmask64{1} << 63, static_cast<char>(p[32] & 15));
      next[k] += n;
      return _mm512_mask_expand_epi8(_mm512_set1_epi8(8), bits, codes);
    };
    row_sums<R, B>(x, w.s.group_chunks, scales, 8.0f, block, sums);
  });
}

template <int B>
void rows_kernel(const Nm24I4& w, const ActivationBlocks& x, const float* bias, float* y, int64_t out, int64_t r0,
                 int64_t r1) {
  const int64_t per = w.row_values(), bytes = w.row_bytes();
  // kPair[i]: the 4 mask bits of a 2:4 group whose two 2-bit indices are the nibble i = i0 | i1 << 2.
  alignas(16) static const uint8_t kPair[16] = {1, 3, 5, 9, 3, 2, 6, 10, 5, 6, 4, 12, 9, 10, 12, 8};
  const __m128i pair = _mm_load_si128(reinterpret_cast<const __m128i*>(kPair)), low4 = _mm_set1_epi8(15);
  each_row<B>(r0, r1, bias, y, out, [&](int64_t r, auto rows, auto sums) ST_LAMBDA_INLINE {
    constexpr int R = decltype(rows)::value;
    const float* scales[R];
    __m512i upper[R];  // the second 64 columns of the 128 the last even block decoded
    for (int k = 0; k < R; ++k) scales[k] = w.s.row(r + k), upper[k] = _mm512_setzero_si512();
    // Blocks 2i and 2i + 1 (columns 128i ..): values 64i .. 64i + 63 (32 code bytes) and their 16 index
    // bytes, which become a 128-bit mask (two bits per group of 4 columns); each half of the columns
    // expands its 32 values, the others hold 8 (weight 0). Missing bytes meet activation codes 0.
    auto block = [&](int k, int64_t b) ST_LAMBDA_INLINE {
      if (b & 1) return upper[k];
      const int64_t i = b / 2;
      const __m512i codes = nibbles(w.codes + (r + k) * (per / 2) + i * 32, per / 2 - i * 32);
      const __m128i index = _mm_maskz_loadu_epi8(static_cast<__mmask16>(first_bytes(bytes - i * 16)),
                                                 w.idx + (r + k) * bytes + i * 16);
      const __m128i lo = _mm_shuffle_epi8(pair, _mm_and_si128(index, low4));
      const __m128i hi = _mm_shuffle_epi8(pair, _mm_and_si128(_mm_srli_epi16(index, 4), low4));
      const __m128i mask = _mm_or_si128(lo, _mm_slli_epi16(hi, 4));
      const __m512i eight = _mm512_set1_epi8(8);
      upper[k] = _mm512_mask_expand_epi8(eight, static_cast<__mmask64>(_mm_extract_epi64(mask, 1)),
                                         _mm512_shuffle_i64x2(codes, codes, 0xEE));
      return _mm512_mask_expand_epi8(eight, static_cast<__mmask64>(_mm_cvtsi128_si64(mask)), codes);
    };
    row_sums<R, B>(x, w.s.group_chunks, scales, 8.0f, block, sums);
  });
}

}  // namespace st::vnni
