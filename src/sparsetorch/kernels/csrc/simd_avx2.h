// SIMD primitives for AVX2 + FMA: 8 fp32 lanes. Compiled only into the avx2 module
// (-mavx2 -mfma -mf16c); AVX2 has no expand instruction, so `expand` uses a 256-entry table.
#pragma once
#include <immintrin.h>

#include <cstdint>
#include <cstring>

namespace st {

// Tables built at compile time (no run-time initialisation, no guard on the hot path).
struct Avx2Tables {
  int32_t expand[256][8];  // lane k: rank of bit k among the set bits, or 7 (a zero lane)
  int32_t first[9][8];     // the first n lanes -1, the rest 0 (masks for maskload)
  constexpr Avx2Tables() : expand{}, first{} {
    for (int bits = 0; bits < 256; ++bits) {
      int rank = 0;
      for (int k = 0; k < 8; ++k) expand[bits][k] = (bits >> k) & 1 ? rank++ : 7;
    }
    for (int n = 0; n <= 8; ++n)
      for (int k = 0; k < 8; ++k) first[n][k] = k < n ? -1 : 0;
  }
};
alignas(32) inline constexpr Avx2Tables kAvx2Tables{};

struct Simd {
  static constexpr int W = 8;
  static constexpr bool vector = true;
  static constexpr const char* name = "avx2";
  using V = __m256;
  using Index = __m256i;

  static inline __m256i first(int n) {
    return _mm256_load_si256(reinterpret_cast<const __m256i*>(kAvx2Tables.first[n]));
  }
  static inline V zero() { return _mm256_setzero_ps(); }
  static inline V set1(float v) { return _mm256_set1_ps(v); }
  static inline V load(const float* p) { return _mm256_loadu_ps(p); }
  static inline V load_n(const float* p, int n) { return _mm256_maskload_ps(p, first(n)); }
  static inline void store(float* p, V v) { _mm256_storeu_ps(p, v); }
  static inline V fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  static inline float sum(V a) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }

  static inline V gather_u16(const float* x, const uint16_t* idx, int n) {
    __m256i i;
    if (n == W) {
      i = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(idx)));
    } else {
      alignas(16) uint16_t tail[8] = {0, 0, 0, 0, 0, 0, 0, 0};
      for (int k = 0; k < n; ++k) tail[k] = idx[k];
      i = _mm256_cvtepu16_epi32(_mm_load_si128(reinterpret_cast<const __m128i*>(tail)));
    }
    return _mm256_mask_i32gather_ps(zero(), x, i, _mm256_castsi256_ps(first(n)), 4);
  }

  static inline V expand(const float* vals, uint32_t bits) {
    V packed = load_n(vals, __builtin_popcount(bits));  // unused lanes are zero; lane 7 is unused unless all are set
    __m256i perm = _mm256_load_si256(reinterpret_cast<const __m256i*>(kAvx2Tables.expand[bits]));
    return _mm256_permutevar8x32_ps(packed, perm);
  }

  // Lane k selects column 4 * (k / 2) + index_k of a 16-column window: lanes 0-3 from its first 8
  // columns, lanes 4-7 from the next 8.
  static inline Index nm24_index(uint32_t bits) {
    const __m256i shifts = _mm256_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14);
    const __m256i base = _mm256_setr_epi32(0, 0, 4, 4, 0, 0, 4, 4);
    __m256i in_group = _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(static_cast<int>(bits)), shifts),
                                        _mm256_set1_epi32(3));
    return _mm256_add_epi32(base, in_group);
  }

  static inline V nm24_select(const float* x, Index index, int cols) {
    V lo = cols >= W ? load(x) : load_n(x, cols);
    V hi = cols >= 2 * W ? load(x + W) : load_n(x + W, cols > W ? cols - W : 0);
    return _mm256_blend_ps(_mm256_permutevar8x32_ps(lo, index), _mm256_permutevar8x32_ps(hi, index), 0xF0);
  }

  // bf16 weights (dense.h): the top half of an fp32.
  static inline V from_bf16(const uint16_t* p) {
    const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
  }
  static inline V from_bf16_n(const uint16_t* p, int n) {
    alignas(16) uint16_t part[8] = {};
    for (int k = 0; k < n; ++k) part[k] = p[k];
    return from_bf16(part);
  }
  // ---- quantized codes (quantized.h) ----
  static inline V from_i8(const int8_t* p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
  }
  static inline V from_i8_n(const int8_t* p, int n) {
    int64_t word = 0;
    for (int k = 0; k < n; ++k) word |= static_cast<int64_t>(static_cast<uint8_t>(p[k])) << (8 * k);
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_cvtsi64_si128(word)));
  }
  // Lane k holds the next code if bit k of `bits` is set, else zero; `avail` codes exist from p on,
  // so 8 bytes are loaded at once except at the very end of the codes.
  static inline V expand_i8(const int8_t* p, uint32_t bits, int64_t avail) {
    const int n = __builtin_popcount(bits);
    int64_t word = 0;
    if (avail >= 8) {
      std::memcpy(&word, p, 8);
    } else {
      for (int k = 0; k < n; ++k) word |= static_cast<int64_t>(static_cast<uint8_t>(p[k])) << (8 * k);
    }
    // Lanes past n hold later codes: zero them, so the table's zero lane (7, unused unless all are set) is 0.
    const __m256i packed = _mm256_and_si256(_mm256_cvtepi8_epi32(_mm_cvtsi64_si128(word)), first(n));
    const __m256i perm = _mm256_load_si256(reinterpret_cast<const __m256i*>(kAvx2Tables.expand[bits]));
    return _mm256_cvtepi32_ps(_mm256_permutevar8x32_epi32(packed, perm));
  }
  // W 4-bit codes stored as code + 8, code k in nibble k of `word` (low nibble of each byte first).
  static inline V from_i4(uint64_t word) {
    const __m128i bytes = _mm_cvtsi32_si128(static_cast<int>(word)), low4 = _mm_set1_epi8(0x0F);
    const __m128i lo = _mm_and_si128(bytes, low4), hi = _mm_and_si128(_mm_srli_epi16(bytes, 4), low4);
    const __m128i codes = _mm_sub_epi8(_mm_unpacklo_epi8(lo, hi), _mm_set1_epi8(8));  // 8 codes in order
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(codes));
  }
};

}  // namespace st
