// SIMD primitives for AVX-512 (F, BW, VL): 16 fp32 lanes. Compiled only into the avx512 module
// (-mavx512f -mavx512bw -mavx512vl -mavx2 -mfma -mf16c); the Python side loads it only on a CPU
// that reports those features.
#pragma once
#include <immintrin.h>

#include <cstdint>

namespace st {

struct Simd {
  static constexpr int W = 16;
  static constexpr bool vector = true;
  static constexpr const char* name = "avx512";
  using V = __m512;
  using Index = __m512i;

  static inline __mmask16 first(int n) { return static_cast<__mmask16>((1u << n) - 1u); }
  static inline V zero() { return _mm512_setzero_ps(); }
  static inline V set1(float v) { return _mm512_set1_ps(v); }
  static inline V load(const float* p) { return _mm512_loadu_ps(p); }
  static inline V load_n(const float* p, int n) { return _mm512_maskz_loadu_ps(first(n), p); }
  static inline void store(float* p, V v) { _mm512_storeu_ps(p, v); }
  static inline V fma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  static inline float sum(V a) { return _mm512_reduce_add_ps(a); }

  // x[idx[k]] for the first n lanes (n <= W), zero elsewhere.
  static inline V gather_u16(const float* x, const uint16_t* idx, int n) {
    __m512i i = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(first(n), idx));
    return _mm512_mask_i32gather_ps(zero(), first(n), i, x, 4);
  }

  // Lane k holds the next stored value if bit k of `bits` is set, else zero. Reads popcount(bits) floats.
  // (Measured on Zen 4: as fast as a masked load plus a register expand, and never reads past the values.)
  static inline V expand(const float* vals, uint32_t bits) {
    return _mm512_maskz_expandloadu_ps(static_cast<__mmask16>(bits), vals);
  }

  // 2:4 packed indices of W values (2 bits each, value k at bits 2k) -> lane k selects column
  // 4 * (k / 2) + index_k of a 2W-column window.
  static inline Index nm24_index(uint32_t bits) {
    const __m512i shifts = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    const __m512i base = _mm512_setr_epi32(0, 0, 4, 4, 8, 8, 12, 12, 16, 16, 20, 20, 24, 24, 28, 28);
    __m512i in_group = _mm512_and_si512(_mm512_srlv_epi32(_mm512_set1_epi32(static_cast<int>(bits)), shifts),
                                        _mm512_set1_epi32(3));
    return _mm512_add_epi32(base, in_group);
  }

  // The selected columns of the window x[0, cols), cols <= 2W (columns past it read as zero).
  static inline V nm24_select(const float* x, Index index, int cols) {
    V lo = cols >= W ? load(x) : load_n(x, cols);
    V hi = cols >= 2 * W ? load(x + W) : load_n(x + W, cols > W ? cols - W : 0);
    return _mm512_permutex2var_ps(lo, index, hi);
  }

  // ---- bf16 weights (dense.h): the top half of an fp32 ----
  static inline V from_bf16(const uint16_t* p) {
    const __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
  }
  static inline V from_bf16_n(const uint16_t* p, int n) {
    const __m512i wide = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(first(n), p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
  }

  // ---- quantized codes (quantized.h) ----
  // W int8 codes -> floats.
  static inline V from_i8(const int8_t* p) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
  }
  // The first n codes (n < W), zero elsewhere; reads only n bytes.
  static inline V from_i8_n(const int8_t* p, int n) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(first(n), p)));
  }
  // Lane k holds the next code if bit k of `bits` is set, else zero. The masked load reads only
  // popcount(bits) bytes (never past the codes), so `avail` is not needed here.
  static inline V expand_i8(const int8_t* p, uint32_t bits, int64_t /*avail*/) {
    const __m128i packed = _mm_maskz_loadu_epi8(first(__builtin_popcount(bits)), p);
    return _mm512_cvtepi32_ps(_mm512_maskz_expand_epi32(static_cast<__mmask16>(bits), _mm512_cvtepi8_epi32(packed)));
  }
  // W 4-bit codes stored as code + 8, code k in nibble k of `word` (low nibble of each byte first).
  static inline V from_i4(uint64_t word) {
    const __m128i bytes = _mm_cvtsi64_si128(static_cast<long long>(word)), low4 = _mm_set1_epi8(0x0F);
    const __m128i lo = _mm_and_si128(bytes, low4), hi = _mm_and_si128(_mm_srli_epi16(bytes, 4), low4);
    const __m128i codes = _mm_sub_epi8(_mm_unpacklo_epi8(lo, hi), _mm_set1_epi8(8));  // 16 codes in order
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(codes));
  }
};

}  // namespace st
