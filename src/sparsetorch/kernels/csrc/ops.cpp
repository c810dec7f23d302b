// Torch operators over the kernels of kernels.h, for the one ISA this module is compiled for.
//
// Built by sparsetorch/kernels/build.py once per ISA, with that ISA's flags (never -march=native)
// and ST_NAMESPACE set to a name unique to the ISA and the source hash; Python loads the module
// only on a CPU that has the ISA. Threads: at::parallel_for, i.e. torch's own OpenMP pool (compiled with
// -fopenmp, linked without it: the pragmas resolve to the libgomp that libtorch_cpu loads).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <string>
#include <tuple>
#include <type_traits>

#if defined(ST_ISA_AVX512)
#if !defined(__AVX512F__) || !defined(__AVX512BW__) || !defined(__AVX512VL__) || !defined(__FMA__)
#error "the avx512 module needs -mavx512f -mavx512bw -mavx512vl -mfma"
#endif
#include "simd_avx512.h"
#if defined(ST_ISA_AVX512VNNI) && (!defined(__AVX512VNNI__) || !defined(__AVX512VBMI__) || !defined(__AVX512VBMI2__))
#error "the avx512vnni module needs -mavx512vnni -mavx512vbmi -mavx512vbmi2"
#endif
#elif defined(ST_ISA_AVX2)
#if !defined(__AVX2__) || !defined(__FMA__)
#error "the avx2 module needs -mavx2 -mfma"
#endif
#include "simd_avx2.h"
#else
#include "simd_scalar.h"
#endif
#include "kernels.h"
#include "dense.h"
#include "quantized.h"
#if defined(ST_ISA_AVX512VNNI)
#include "quantized_vnni.h"
#endif
#include "sparsegpt.h"
#include "sparsegpt_joint.h"

namespace {

constexpr int64_t kRowsGrain = 16;  // weight rows per task: enough work to pay for a thread hand-off

void check_input(const at::Tensor& x, int64_t in, const c10::optional<at::Tensor>& bias, int64_t out) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous() && x.device().is_cpu(),
              "x must be a contiguous 2-D float32 CPU tensor, got ", x.sizes(), " ", x.scalar_type());
  TORCH_CHECK(x.size(1) == in, "x has ", x.size(1), " features, the weight expects ", in);
  if (bias) {
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->is_contiguous() && bias->numel() == out,
                "bias must be a contiguous float32 tensor of ", out, " values");
  }
}

// Calls run(std::integral_constant<int, B>{}) with B = rows for 1..7, and B = 8 for more: the batch
// size becomes a compile-time constant, so each kernel's per-row accumulators stay in registers.
template <class Run>
void with_rows(int64_t rows, Run&& run) {
  switch (rows) {
    case 1: run(std::integral_constant<int, 1>{}); break;
    case 2: run(std::integral_constant<int, 2>{}); break;
    case 3: run(std::integral_constant<int, 3>{}); break;
    case 4: run(std::integral_constant<int, 4>{}); break;
    case 5: run(std::integral_constant<int, 5>{}); break;
    case 6: run(std::integral_constant<int, 6>{}); break;
    case 7: run(std::integral_constant<int, 7>{}); break;
    default: run(std::integral_constant<int, 8>{}); break;
  }
}

template <class Format, int B>
void run_rows(const Format& w, const float* x, const float* bias, float* y, int64_t out) {
  at::parallel_for(0, out, kRowsGrain, [&](int64_t r0, int64_t r1) {
    if constexpr (st::Simd::vector) {
      st::rows_kernel<B>(w, x, bias, y, out, r0, r1);
    } else {
      st::scalar_rows_kernel<B>(w, x, bias, y, out, r0, r1);
    }
  });
}

// Outer regime with tiles of NV vectors (T = NV * W batch rows).
template <int NV, class Format>
void run_outer(const Format& w, const at::Tensor& x, const float* bias, float* y, int64_t out) {
  constexpr int64_t T = NV * st::W;
  const int64_t batch = x.size(0), in = x.size(1), tiles = (batch + T - 1) / T;
  at::Tensor xt = at::empty({tiles, in, T}, x.options());
  const float* px = x.const_data_ptr<float>();
  float* pxt = xt.data_ptr<float>();
  for (int64_t t = 0; t < tiles; ++t) {
    const int64_t n = std::min<int64_t>(T, batch - t * T);
    at::parallel_for(0, in, 256, [&](int64_t c0, int64_t c1) {
      st::transpose_tile<T>(px, in, t * T, n, pxt + t * in * T, c0, c1);
    });
  }
  at::parallel_for(0, out, kRowsGrain, [&](int64_t r0, int64_t r1) {
    for (int64_t t = 0; t < tiles; ++t) {
      const int64_t n = std::min<int64_t>(T, batch - t * T);
      st::outer_kernel<NV>(w, pxt + t * in * T, t * T, n, bias, y, out, r0, r1);
    }
  });
}

// Rows regime below `outer_from` batch rows (at most 8), outer regime from there on.
template <class Format>
at::Tensor run(const Format& w, const at::Tensor& x, const c10::optional<at::Tensor>& bias, int64_t out,
               int64_t outer_from) {
  check_input(x, w.in, bias, out);
  const int64_t batch = x.size(0);
  at::Tensor y = at::empty({batch, out}, x.options());
  const float* px = x.const_data_ptr<float>();
  const float* pb = bias ? bias->const_data_ptr<float>() : nullptr;
  float* py = y.data_ptr<float>();
  if (batch == 0) return y;
  if (batch >= std::min<int64_t>(outer_from, 9)) {  // tiles as wide as the batch, at most 4 vectors (measured)
    if (batch <= st::W) {
      run_outer<1>(w, x, pb, py, out);
    } else if (batch <= 2 * st::W) {
      run_outer<2>(w, x, pb, py, out);
    } else {
      run_outer<4>(w, x, pb, py, out);
    }
    return y;
  }
  with_rows(batch, [&](auto rows) { run_rows<Format, decltype(rows)::value>(w, px, pb, py, out); });
  return y;
}

void check_part(const at::Tensor& t, at::ScalarType dtype, int64_t numel, const char* what) {
  TORCH_CHECK(t.scalar_type() == dtype && t.is_contiguous() && t.device().is_cpu(), what, " must be a contiguous ",
              dtype, " CPU tensor");
  TORCH_CHECK(t.numel() >= numel, what, " holds ", t.numel(), " entries, expected at least ", numel);
}

at::Tensor csr16_linear(const at::Tensor& x, const at::Tensor& values, const at::Tensor& cols,
                        const at::Tensor& row_ptr, const c10::optional<at::Tensor>& bias, int64_t in_features,
                        int64_t outer_from) {
  const int64_t out = row_ptr.numel() - 1;
  check_part(row_ptr, at::kLong, out + 1, "row_ptr");
  const int64_t nnz = row_ptr.const_data_ptr<int64_t>()[out];
  check_part(values, at::kFloat, nnz, "values");
  check_part(cols, at::kUInt16, nnz, "cols");
  TORCH_CHECK(in_features <= 65536, "csr16 stores columns in 16 bits: in_features must be <= 65536");
  st::Csr16 w{values.const_data_ptr<float>(), cols.const_data_ptr<uint16_t>(), row_ptr.const_data_ptr<int64_t>(),
              in_features};
  return run(w, x, bias, out, outer_from);
}

at::Tensor bitmask_linear(const at::Tensor& x, const at::Tensor& values, const at::Tensor& bitmask,
                          const at::Tensor& row_offsets, const c10::optional<at::Tensor>& bias, int64_t in_features,
                          int64_t outer_from) {
  const int64_t out = row_offsets.numel();
  check_part(row_offsets, at::kLong, out, "row_offsets");
  check_part(bitmask, at::kByte, out * ((in_features + 7) / 8), "bitmask");
  check_part(values, at::kFloat, 0, "values");
  st::Bitmask w{values.const_data_ptr<float>(), bitmask.const_data_ptr<uint8_t>(),
                row_offsets.const_data_ptr<int64_t>(), in_features};
  return run(w, x, bias, out, outer_from);
}

at::Tensor nm24_linear(const at::Tensor& x, const at::Tensor& values, const at::Tensor& indices,
                       const c10::optional<at::Tensor>& bias, int64_t in_features, int64_t outer_from) {
  TORCH_CHECK(in_features % 4 == 0, "2:4 needs in_features divisible by 4, got ", in_features);
  TORCH_CHECK(values.dim() == 2 && values.size(1) == in_features / 2, "values must be (out, in / 2)");
  const int64_t out = values.size(0);
  check_part(values, at::kFloat, out * in_features / 2, "values");
  check_part(indices, at::kByte, out * ((in_features + 7) / 8), "indices");
  st::Nm24 w{values.const_data_ptr<float>(), indices.const_data_ptr<uint8_t>(), in_features};
  return run(w, x, bias, out, outer_from);
}

// ---- quantized weights (quantized.h): fp32 x, symmetric codes, one scale per row or per `group` columns ----

constexpr int64_t kQuantRows = 8;  // batch rows per pass over the weight; larger batches take several passes

// Batch rows in slabs of up to 8: each slab streams the weight once (decode is the case that matters).
// kernel(rows, x, bias, y, r0, r1) computes rows [r0, r1) of one slab, with B = decltype(rows)::value.
template <class Kernel>
at::Tensor run_slabs(int64_t in, const at::Tensor& x, const c10::optional<at::Tensor>& bias, int64_t out,
                     Kernel&& kernel) {
  check_input(x, in, bias, out);
  const int64_t batch = x.size(0);
  at::Tensor y = at::empty({batch, out}, x.options());
  const float* pb = bias ? bias->const_data_ptr<float>() : nullptr;
  for (int64_t b0 = 0; b0 < batch; b0 += kQuantRows) {
    const float* px = x.const_data_ptr<float>() + b0 * in;
    float* py = y.data_ptr<float>() + b0 * out;
    with_rows(std::min(kQuantRows, batch - b0), [&](auto rows) {
      at::parallel_for(0, out, kRowsGrain, [&](int64_t r0, int64_t r1) { kernel(rows, px, pb, py, r0, r1); });
    });
  }
  return y;
}

template <class Format>
at::Tensor run_quantized(const Format& w, const at::Tensor& x, const c10::optional<at::Tensor>& bias, int64_t out) {
  return run_slabs(w.in, x, bias, out, [&](auto rows, const float* px, const float* pb, float* py, int64_t r0,
                                           int64_t r1) {
    st::quant_rows_kernel<decltype(rows)::value>(w, px, pb, py, out, r0, r1);
  });
}

#if defined(ST_ISA_AVX512VNNI)
// int8 activations (quantized_vnni.h): x rounded once per call, then batch rows in slabs of up to 8.
template <class Format>
at::Tensor run_vnni(const Format& w, const at::Tensor& x, const c10::optional<at::Tensor>& bias, int64_t out) {
  check_input(x, w.in, bias, out);
  const int64_t batch = x.size(0), blocks = (w.in + st::vnni::kBlock - 1) / st::vnni::kBlock, groups = w.s.groups;
  at::Tensor y = at::empty({batch, out}, x.options());
  at::Tensor codes = at::empty({batch, blocks * st::vnni::kBlock}, x.options().dtype(at::kChar));
  at::Tensor scales = at::empty({batch, blocks}, x.options()), offsets = at::empty({batch, groups}, x.options());
  const int8_t* pc = codes.data_ptr<int8_t>();
  const float *ps = scales.data_ptr<float>(), *po = offsets.data_ptr<float>();
  st::vnni::quantize_activations(x.const_data_ptr<float>(), batch, w.in, w.s.group_chunks, codes.data_ptr<int8_t>(),
                                 scales.data_ptr<float>(), offsets.data_ptr<float>(), blocks, groups);
  const float* pb = bias ? bias->const_data_ptr<float>() : nullptr;
  float* py = y.data_ptr<float>();
  // Each thread takes its weight rows a tile at a time and runs every slab of up to 8 batch rows over
  // the tile while it is in cache: a prefill reads the weight from memory once, not once per slab.
  at::parallel_for(0, out, kRowsGrain, [&](int64_t r0, int64_t r1) {
    for (int64_t t0 = r0; t0 < r1; t0 += kRowsGrain) {
      const int64_t t1 = std::min(r1, t0 + kRowsGrain);
      for (int64_t b0 = 0; b0 < batch; b0 += kQuantRows) {
        const st::vnni::ActivationBlocks xb{pc + b0 * blocks * st::vnni::kBlock, ps + b0 * blocks, po + b0 * groups,
                                            blocks, groups};
        with_rows(std::min(kQuantRows, batch - b0), [&](auto rows) {
          st::vnni::rows_kernel<decltype(rows)::value>(w, xb, pb, py + b0 * out, out, t0, t1);
        });
      }
    }
  });
  return y;
}

// Whether the int8-activation kernels take a weight with this group size (0: one scale per row).
constexpr bool vnni_takes(int64_t group) { return group % st::vnni::kBlock == 0; }
#endif

// scale: float32 (out, groups), groups = ceil(in / group) or 1 when group is 0 (one scale per row). A group is a
// multiple of 32 columns, so it holds whole chunks of `chunk_cols` columns.
st::Scales check_scales(const at::Tensor& scale, int64_t out, int64_t in, int64_t group, int64_t chunk_cols) {
  TORCH_CHECK(group == 0 || (group > 0 && group % 32 == 0), "group must be 0 (per row) or a multiple of 32, got ",
              group);
  const int64_t groups = group ? (in + group - 1) / group : 1;  // as QuantScheme.groups
  TORCH_CHECK(scale.dim() == 2 && scale.size(0) == out && scale.size(1) == groups, "scale must be (", out, ", ",
              groups, "), got ", scale.sizes());
  check_part(scale, at::kFloat, out * groups, "scale");
  return st::Scales{scale.const_data_ptr<float>(), groups, group / chunk_cols};
}

// y = x W^T (+ bias) for a dense fp32 or bf16 weight (out, in) and fp32 x (batch, in): the rows regime,
// one pass over the weight per 8 batch rows (Python sends larger batches to a GEMM).
at::Tensor dense_linear(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(weight.dim() == 2 && weight.is_contiguous() && weight.device().is_cpu() &&
                  (weight.scalar_type() == at::kFloat || weight.scalar_type() == at::kBFloat16),
              "weight must be a contiguous 2-D float32 or bfloat16 CPU tensor, got ", weight.sizes(), " ",
              weight.scalar_type());
  const int64_t out = weight.size(0), in = weight.size(1);
  const bool bf16 = weight.scalar_type() == at::kBFloat16;
  return run_slabs(in, x, bias, out, [&](auto rows, const float* px, const float* pb, float* py, int64_t r0,
                                         int64_t r1) {
    constexpr int B = decltype(rows)::value;
    if (bf16) {
      const auto* pw = reinterpret_cast<const uint16_t*>(weight.const_data_ptr<at::BFloat16>());
      st::dense_rows_kernel<B>(st::DenseBF16{pw, in}, px, pb, py, out, r0, r1);
    } else {
      st::dense_rows_kernel<B>(st::DenseF32{weight.const_data_ptr<float>(), in}, px, pb, py, out, r0, r1);
    }
  });
}

at::Tensor dense_int8_linear(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scale,
                             const c10::optional<at::Tensor>& bias, int64_t group) {
  TORCH_CHECK(codes.dim() == 2, "codes must be (out, in), got ", codes.sizes());
  const int64_t out = codes.size(0), in = codes.size(1);
  check_part(codes, at::kChar, out * in, "codes");
#if defined(ST_ISA_AVX512VNNI)
  if (vnni_takes(group)) {
    return run_vnni(st::DenseI8{codes.const_data_ptr<int8_t>(), check_scales(scale, out, in, group, st::vnni::kBlock),
                                in},
                    x, bias, out);
  }
#endif
  st::DenseI8 w{codes.const_data_ptr<int8_t>(), check_scales(scale, out, in, group, st::W), in};
  return run_quantized(w, x, bias, out);
}

at::Tensor bitmask_int8_linear(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& bitmask,
                               const at::Tensor& row_offsets, const at::Tensor& scale,
                               const c10::optional<at::Tensor>& bias, int64_t in_features, int64_t group) {
  const int64_t out = row_offsets.numel();
  check_part(row_offsets, at::kLong, out, "row_offsets");
  check_part(bitmask, at::kByte, out * ((in_features + 7) / 8), "bitmask");
  check_part(codes, at::kChar, 0, "codes");
#if defined(ST_ISA_AVX512VNNI)
  if (vnni_takes(group)) {
    return run_vnni(st::BitmaskI8{codes.const_data_ptr<int8_t>(), codes.numel(), bitmask.const_data_ptr<uint8_t>(),
                                  row_offsets.const_data_ptr<int64_t>(),
                                  check_scales(scale, out, in_features, group, st::vnni::kBlock), in_features},
                    x, bias, out);
  }
#endif
  st::BitmaskI8 w{codes.const_data_ptr<int8_t>(), codes.numel(), bitmask.const_data_ptr<uint8_t>(),
                  row_offsets.const_data_ptr<int64_t>(), check_scales(scale, out, in_features, group, st::W),
                  in_features};
  return run_quantized(w, x, bias, out);
}

at::Tensor nm24_int4_linear(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& indices,
                            const at::Tensor& scale, const c10::optional<at::Tensor>& bias, int64_t in_features,
                            int64_t group) {
  TORCH_CHECK(in_features % 4 == 0, "2:4 needs in_features divisible by 4, got ", in_features);
  TORCH_CHECK(scale.dim() == 2, "scale must be (out, groups), got ", scale.sizes());
  const int64_t out = scale.size(0);
  check_part(codes, at::kByte, out * in_features / 4, "codes");
  check_part(indices, at::kByte, out * ((in_features + 7) / 8), "indices");
#if defined(ST_ISA_AVX512VNNI)
  if (vnni_takes(group)) {
    return run_vnni(st::Nm24I4{codes.const_data_ptr<uint8_t>(), indices.const_data_ptr<uint8_t>(),
                               check_scales(scale, out, in_features, group, st::vnni::kBlock), in_features},
                    x, bias, out);
  }
#endif
  st::Nm24I4 w{codes.const_data_ptr<uint8_t>(), indices.const_data_ptr<uint8_t>(),
               check_scales(scale, out, in_features, group, 2 * st::W), in_features};
  return run_quantized(w, x, bias, out);
}

at::Tensor bitmask_int4_linear(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& bitmask,
                               const at::Tensor& row_offsets, const at::Tensor& scale,
                               const c10::optional<at::Tensor>& bias, int64_t in_features, int64_t group) {
  const int64_t out = row_offsets.numel();
  check_part(row_offsets, at::kLong, out, "row_offsets");
  check_part(bitmask, at::kByte, out * ((in_features + 7) / 8), "bitmask");
  check_part(codes, at::kByte, 0, "codes");
  const uint8_t *pc = codes.const_data_ptr<uint8_t>(), *pm = bitmask.const_data_ptr<uint8_t>();
  const int64_t* po = row_offsets.const_data_ptr<int64_t>();
#if defined(ST_ISA_AVX512VNNI)
  if (vnni_takes(group)) {
    return run_vnni(st::BitmaskI4{pc, pm, po, check_scales(scale, out, in_features, group, st::vnni::kBlock),
                                  in_features},
                    x, bias, out);
  }
#endif
  st::BitmaskI4 w{pc, pm, po, check_scales(scale, out, in_features, group, st::W), in_features};
  return run_quantized(w, x, bias, out);
}

at::Tensor dense_int4_linear(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scale,
                             const c10::optional<at::Tensor>& bias, int64_t in_features, int64_t group) {
  const int64_t row_bytes = 4 * ((in_features + 7) / 8);
  TORCH_CHECK(codes.dim() == 2 && codes.size(1) == row_bytes, "codes must be uint8 (out, ", row_bytes, "), got ",
              codes.sizes());
  const int64_t out = codes.size(0);
  check_part(codes, at::kByte, out * row_bytes, "codes");
#if defined(ST_ISA_AVX512VNNI)
  if (vnni_takes(group)) {
    return run_vnni(st::DenseI4{codes.const_data_ptr<uint8_t>(), row_bytes,
                                check_scales(scale, out, in_features, group, st::vnni::kBlock), in_features},
                    x, bias, out);
  }
#endif
  st::DenseI4 w{codes.const_data_ptr<uint8_t>(), row_bytes, check_scales(scale, out, in_features, group, st::W),
                in_features};
  return run_quantized(w, x, bias, out);
}

// SparseGPT's sweep of one lazy block, in place (see sparsegpt.h): block (width, out) is the block's columns
// transposed, hinv (width, width) the factor's diagonal block, pruned (width, out) bool, errors (width, out).
st::SweepShape check_sweep(const at::Tensor& block, const at::Tensor& hinv, const at::Tensor& pruned,
                          const at::Tensor& errors, int64_t n, int64_t m) {
  TORCH_CHECK(block.dim() == 2, "block must be 2-D (width, out), got ", block.sizes());
  const int64_t width = block.size(0), out = block.size(1);
  for (const at::Tensor* t : {&block, &errors}) {
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous() && t->device().is_cpu() &&
                    t->sizes() == block.sizes(),
                "block and errors must be contiguous float32 CPU tensors of one shape, got ", t->sizes());
  }
  TORCH_CHECK(pruned.scalar_type() == at::kBool && pruned.is_contiguous() && pruned.sizes() == block.sizes(),
              "pruned must be a contiguous bool tensor shaped like block, got ", pruned.sizes());
  TORCH_CHECK(hinv.scalar_type() == at::kFloat && hinv.dim() == 2 && hinv.size(0) == width &&
                  hinv.size(1) == width && hinv.stride(1) == 1 && hinv.device().is_cpu(),
              "hinv must be a (width, width) float32 CPU tensor with unit column stride, got ", hinv.sizes());
  TORCH_CHECK(m == 0 || (0 < n && n < m && m <= st::kMaxGroup && width % m == 0),
              "N:M needs 0 < n < m <= ", st::kMaxGroup, " and whole groups in the block, got ", n, ":", m,
              " over ", width, " columns");
  return st::SweepShape{width, out, hinv.stride(0), n, m};
}

void sparsegpt_sweep(const at::Tensor& block, const at::Tensor& hinv, const at::Tensor& pruned,
                     const at::Tensor& errors, int64_t n, int64_t m) {
  const st::SweepShape s = check_sweep(block, hinv, pruned, errors, n, m);
  float* pb = block.data_ptr<float>();
  const float* ph = hinv.const_data_ptr<float>();
  uint8_t* pp = reinterpret_cast<uint8_t*>(pruned.data_ptr<bool>());
  float* pe = errors.data_ptr<float>();
  const int64_t slices = (s.out + st::kSweepRows - 1) / st::kSweepRows;
  at::parallel_for(0, slices, 1, [&](int64_t s0, int64_t s1) { st::sparsegpt_sweep(s, pb, ph, pp, pe, s0, s1); });
}

// SparseGPT's joint sweep (see sparsegpt_joint.h): sparsegpt_sweep that also rounds each kept weight onto its
// grid. scale and zero are (groups, out) float32: found here, one row per `group` columns of the block, or with
// group 0 one given row (a grid per output channel); codes lie in [low, high].
void sparsegpt_sweep_joint(const at::Tensor& block, const at::Tensor& hinv, const at::Tensor& pruned,
                           const at::Tensor& errors, int64_t n, int64_t m, const at::Tensor& scale,
                           const at::Tensor& zero, int64_t group, int64_t low, int64_t high, bool symmetric,
                           bool search) {
  const st::SweepShape s = check_sweep(block, hinv, pruned, errors, n, m);
  TORCH_CHECK(group >= 0 && low < high, "group must be >= 0 and low < high, got ", group, ", ", low, ", ", high);
  const int64_t groups = group ? (s.width + group - 1) / group : 1;
  for (const at::Tensor* t : {&scale, &zero}) {
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous() && t->device().is_cpu() && t->dim() == 2 &&
                    t->size(0) == groups && t->size(1) == s.out,
                "scale and zero must be contiguous float32 CPU tensors of (", groups, ", ", s.out, "), got ",
                t->sizes());
  }
  const st::JointGrid q{group, static_cast<float>(low), static_cast<float>(high), symmetric, search,
                        scale.data_ptr<float>(), zero.data_ptr<float>()};
  float* pb = block.data_ptr<float>();
  const float* ph = hinv.const_data_ptr<float>();
  uint8_t* pp = reinterpret_cast<uint8_t*>(pruned.data_ptr<bool>());
  float* pe = errors.data_ptr<float>();
  const int64_t slices = (s.out + st::kSweepRows - 1) / st::kSweepRows;
  at::parallel_for(0, slices, 1,
                   [&](int64_t s0, int64_t s1) { st::sparsegpt_sweep_joint(s, q, pb, ph, pp, pe, s0, s1); });
}

std::string isa() {
#if defined(ST_ISA_AVX512VNNI)
  return "avx512vnni";
#else
  return st::Simd::name;
#endif
}

}  // namespace

#define ST_LIBRARY(ns, m) TORCH_LIBRARY(ns, m)
ST_LIBRARY(ST_NAMESPACE, m) {
  m.def("isa() -> str", &isa);
  m.def("csr16_linear(Tensor x, Tensor values, Tensor cols, Tensor row_ptr, Tensor? bias, int in_features, "
        "int outer_from) -> Tensor",
        &csr16_linear);
  m.def("bitmask_linear(Tensor x, Tensor values, Tensor bitmask, Tensor row_offsets, Tensor? bias, int in_features, "
        "int outer_from) -> Tensor",
        &bitmask_linear);
  m.def("nm24_linear(Tensor x, Tensor values, Tensor indices, Tensor? bias, int in_features, int outer_from) -> Tensor",
        &nm24_linear);
  m.def("dense_linear(Tensor x, Tensor weight, Tensor? bias) -> Tensor", &dense_linear);
  m.def("dense_int8_linear(Tensor x, Tensor codes, Tensor scale, Tensor? bias, int group) -> Tensor",
        &dense_int8_linear);
  m.def("bitmask_int8_linear(Tensor x, Tensor codes, Tensor bitmask, Tensor row_offsets, Tensor scale, Tensor? bias, "
        "int in_features, int group) -> Tensor",
        &bitmask_int8_linear);
  m.def("nm24_int4_linear(Tensor x, Tensor codes, Tensor indices, Tensor scale, Tensor? bias, int in_features, "
        "int group) -> Tensor",
        &nm24_int4_linear);
  m.def("bitmask_int4_linear(Tensor x, Tensor codes, Tensor bitmask, Tensor row_offsets, Tensor scale, Tensor? bias, "
        "int in_features, int group) -> Tensor",
        &bitmask_int4_linear);
  m.def("dense_int4_linear(Tensor x, Tensor codes, Tensor scale, Tensor? bias, int in_features, int group) -> Tensor",
        &dense_int4_linear);
  m.def("sparsegpt_sweep(Tensor(a!) block, Tensor hinv, Tensor(b!) pruned, Tensor(c!) errors, int n, int m) -> ()",
        &sparsegpt_sweep);
  m.def("sparsegpt_sweep_joint(Tensor(a!) block, Tensor hinv, Tensor(b!) pruned, Tensor(c!) errors, int n, int m, "
        "Tensor(d!) scale, Tensor(e!) zero, int group, int low, int high, bool symmetric, bool search) -> ()",
        &sparsegpt_sweep_joint);
}
