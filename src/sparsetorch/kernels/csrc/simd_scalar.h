// Portable primitives: 8 lanes in a plain array, for CPUs without AVX2 (and non-x86 machines).
// Same semantics as simd_avx2.h, so the kernels in kernels.h are written once.
#pragma once
#include <cstdint>
#include <cstring>

namespace st {

struct Simd {
  static constexpr int W = 8;
  static constexpr const char* name = "scalar";
  static constexpr bool vector = false;  // kernels.h then walks the stored weights one by one
  struct V {
    float v[8];
  };
  struct Index {
    int32_t i[8];
  };

  static inline V zero() { return V{{0, 0, 0, 0, 0, 0, 0, 0}}; }
  static inline V set1(float a) { return V{{a, a, a, a, a, a, a, a}}; }
  static inline V load_n(const float* p, int n) {
    V r = zero();
    for (int k = 0; k < n; ++k) r.v[k] = p[k];
    return r;
  }
  static inline V load(const float* p) { return load_n(p, W); }
  static inline void store(float* p, V a) {
    for (int k = 0; k < W; ++k) p[k] = a.v[k];
  }
  static inline V fma(V a, V b, V c) {
    for (int k = 0; k < W; ++k) c.v[k] += a.v[k] * b.v[k];
    return c;
  }
  static inline float sum(V a) {
    float s = 0;
    for (int k = 0; k < W; ++k) s += a.v[k];
    return s;
  }
  static inline V from_bf16_n(const uint16_t* p, int n) {  // bf16: the top half of an fp32
    V r = zero();
    for (int k = 0; k < n; ++k) {
      const uint32_t bits = static_cast<uint32_t>(p[k]) << 16;
      std::memcpy(&r.v[k], &bits, sizeof(float));
    }
    return r;
  }
  static inline V from_bf16(const uint16_t* p) { return from_bf16_n(p, W); }
  static inline V gather_u16(const float* x, const uint16_t* idx, int n) {
    V r = zero();
    for (int k = 0; k < n; ++k) r.v[k] = x[idx[k]];
    return r;
  }
  static inline V expand(const float* vals, uint32_t bits) {
    V r = zero();
    for (int k = 0; k < W; ++k)
      if ((bits >> k) & 1u) r.v[k] = *vals++;
    return r;
  }
  static inline Index nm24_index(uint32_t bits) {
    Index r;
    for (int k = 0; k < W; ++k) r.i[k] = 4 * (k / 2) + static_cast<int32_t>((bits >> (2 * k)) & 3u);
    return r;
  }
  static inline V nm24_select(const float* x, Index index, int cols) {
    V r = zero();
    for (int k = 0; k < W; ++k)
      if (index.i[k] < cols) r.v[k] = x[index.i[k]];
    return r;
  }

  // ---- quantized codes (quantized.h) ----
  static inline V from_i8_n(const int8_t* p, int n) {
    V r = zero();
    for (int k = 0; k < n; ++k) r.v[k] = static_cast<float>(p[k]);
    return r;
  }
  static inline V from_i8(const int8_t* p) { return from_i8_n(p, W); }
  static inline V expand_i8(const int8_t* p, uint32_t bits, int64_t /*avail*/) {
    V r = zero();
    for (int k = 0; k < W; ++k)
      if ((bits >> k) & 1u) r.v[k] = static_cast<float>(*p++);
    return r;
  }
  static inline V from_i4(uint64_t word) {
    V r;
    for (int k = 0; k < W; ++k) r.v[k] = static_cast<float>(static_cast<int>((word >> (4 * k)) & 15u) - 8);
    return r;
  }
};

}  // namespace st
