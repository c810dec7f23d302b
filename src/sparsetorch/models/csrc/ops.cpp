// Torch operators of sparsetorch's own model path (sparsetorch/models/ops.py): causal attention that skips
// the masked half, and RMSNorm, the rotary embedding and SiLU gating each in one pass.
//
// Built by sparsetorch/kernels/build.py like the matmul kernels: once per ISA, with that ISA's flags (the loops
// here are plain C++ that the compiler vectorizes) and ST_NAMESPACE set to a name unique to the ISA and the
// source hash. Threads: at::parallel_for, torch's own OpenMP pool.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <algorithm>
#include <string>
#include <tuple>
#include <vector>

#include "attention.h"
#include "decode.h"
#include "fused.h"

namespace {

// softmax(q k^T * scale) v with a causal mask, fp32; q (b, h, t, d), k and v (b, kv_h, t, d) with kv_h dividing h,
// unit stride over d. Returns (b, t, h, d), the layout the output projection reads.
at::Tensor causal_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale) {
  TORCH_CHECK(st::have_blas(), "causal_attention needs a torch build with a Fortran-interface sgemm");
  for (const at::Tensor* t : {&q, &k, &v}) {
    TORCH_CHECK(t->dim() == 4 && t->scalar_type() == at::kFloat && t->device().is_cpu() && t->stride(3) == 1,
                "q, k and v must be 4-D float32 CPU tensors with unit stride over the last dim, got ", t->sizes(),
                " ", t->scalar_type(), " strides ", t->strides());
  }
  TORCH_CHECK(k.sizes() == v.sizes() && k.size(0) == q.size(0) && k.size(2) == q.size(2) && k.size(3) == q.size(3) &&
                  q.size(1) % k.size(1) == 0,
              "shapes do not match: q ", q.sizes(), ", k ", k.sizes(), ", v ", v.sizes());
  st::AttentionShape s{q.size(0), q.size(1), k.size(1), q.size(2), q.size(3),
                       {q.stride(0), q.stride(1), q.stride(2)}, {k.stride(0), k.stride(1), k.stride(2)},
                       {v.stride(0), v.stride(1), v.stride(2)}};
  at::Tensor out = at::empty({s.batch, s.tokens, s.heads, s.dim}, q.options());
  const float *pq = q.const_data_ptr<float>(), *pk = k.const_data_ptr<float>(), *pv = v.const_data_ptr<float>();
  float* po = out.data_ptr<float>();
  at::parallel_for(0, st::attention_tasks(s), 1, [&](int64_t t0, int64_t t1) {
    st::causal_attention(s, pq, pk, pv, po, static_cast<float>(scale), t0, t1);
  });
  return out;
}

void check_activations(const at::Tensor& t, const char* what) {
  TORCH_CHECK(t.scalar_type() == at::kFloat && t.is_contiguous() && t.device().is_cpu() && t.dim() >= 1,
              what, " must be a contiguous float32 CPU tensor, got ", t.sizes(), " ", t.scalar_type());
}

// weight * x / sqrt(mean(x^2, last dim) + eps), Llama's RMSNorm in one pass.
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  check_activations(x, "x");
  check_activations(weight, "weight");
  const int64_t d = x.size(-1);
  TORCH_CHECK(weight.numel() == d, "weight has ", weight.numel(), " values, x has ", d, " features");
  at::Tensor y = at::empty_like(x);
  const float *px = x.const_data_ptr<float>(), *pw = weight.const_data_ptr<float>();
  float* py = y.data_ptr<float>();
  const int64_t rows = d ? x.numel() / d : 0;
  at::parallel_for(0, rows, 64, [&](int64_t r0, int64_t r1) {
    st::rms_norm_rows(px, pw, py, d, static_cast<float>(eps), r0, r1);
  });
  return y;
}

// silu(g) * u, the SiLU-gated MLP's product in one pass.
at::Tensor silu_mul(const at::Tensor& g, const at::Tensor& u) {
  check_activations(g, "g");
  check_activations(u, "u");
  TORCH_CHECK(g.sizes() == u.sizes(), "g and u must have one shape, got ", g.sizes(), " and ", u.sizes());
  at::Tensor y = at::empty_like(g);
  const float *pg = g.const_data_ptr<float>(), *pu = u.const_data_ptr<float>();
  float* py = y.data_ptr<float>();
  at::parallel_for(0, g.numel(), 16384, [&](int64_t i0, int64_t i1) { st::silu_mul_range(pg, pu, py, i0, i1); });
  return y;
}

// x += update in place, then rms_norm(x): a block's residual add and the next norm in one pass.
at::Tensor add_rms_norm(at::Tensor x, const at::Tensor& update, const at::Tensor& weight, double eps) {
  check_activations(x, "x");
  check_activations(update, "update");
  check_activations(weight, "weight");
  TORCH_CHECK(update.sizes() == x.sizes(), "update ", update.sizes(), " must have x's shape ", x.sizes());
  const int64_t d = x.size(-1);
  TORCH_CHECK(weight.numel() == d, "weight has ", weight.numel(), " values, x has ", d, " features");
  at::Tensor y = at::empty_like(x);
  float *px = x.data_ptr<float>(), *py = y.data_ptr<float>();
  const float *pu = update.const_data_ptr<float>(), *pw = weight.const_data_ptr<float>();
  const int64_t rows = d ? x.numel() / d : 0;
  at::parallel_for(0, rows, 64, [&](int64_t r0, int64_t r1) {
    st::add_rms_norm_rows(px, pu, pw, py, d, static_cast<float>(eps), r0, r1);
  });
  return y;
}

// silu(gu[..., :i]) * gu[..., i:] for gu (..., 2i): the SiLU-gated MLP's product of a fused gate and up projection.
at::Tensor silu_mul_halves(const at::Tensor& gu) {
  check_activations(gu, "gu");
  const int64_t width = gu.size(-1), half = width / 2;
  TORCH_CHECK(width % 2 == 0, "gu's last dim must be even (gate then up), got ", width);
  std::vector<int64_t> shape(gu.sizes().begin(), gu.sizes().end());
  shape.back() = half;
  at::Tensor y = at::empty(shape, gu.options());
  const float* pg = gu.const_data_ptr<float>();
  float* py = y.data_ptr<float>();
  const int64_t rows = width ? gu.numel() / width : 0;
  at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / std::max<int64_t>(half, 1)), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) st::silu_mul_range(pg + r * width, pg + r * width + half, py + r * half, 0, half);
  });
  return y;
}

// Attention of t new positions after `past` cached ones (a decode step). qkv (b, t, (heads + 2 kv) d), or its
// (b * t, ...) rows: the fused projection's output, query heads first; cos and sin (b or 1, t, d); keys and values
// (b, kv, capacity, d) caches with room for the new positions, into which this writes the rotated keys and the
// values. Returns (b, t, heads * d), or its rows, the output projection's input.
at::Tensor attention_after_cache(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin,
                                 at::Tensor keys, at::Tensor values, int64_t heads, int64_t past, double scale) {
  TORCH_CHECK(st::have_blas(), "attention_after_cache needs a torch build with a Fortran-interface sgemm");
  check_activations(qkv, "qkv");
  for (const at::Tensor* t : {&keys, &values}) {
    TORCH_CHECK(t->dim() == 4 && t->scalar_type() == at::kFloat && t->is_contiguous() && t->device().is_cpu(),
                "the key and value caches must be contiguous 4-D float32 CPU tensors, got ", t->sizes());
  }
  TORCH_CHECK(keys.sizes() == values.sizes(), "key cache ", keys.sizes(), " and value cache ", values.sizes(),
              " differ");
  // qkv (b, t, width), or (b * t, width) rows with b the cache's batch: then the output is rows too.
  const bool rows = qkv.dim() == 2;
  const int64_t batch = keys.size(0);
  st::StepShape s{batch, rows ? qkv.size(0) / std::max<int64_t>(batch, 1) : qkv.size(1), heads, keys.size(1),
                  keys.size(3), past, keys.size(2), 0, 0};
  TORCH_CHECK((qkv.dim() == 3 || rows) && heads > 0 && heads % s.kv_heads == 0 && s.dim % 2 == 0 &&
                  qkv.size(-1) == s.row() && (rows ? qkv.size(0) == batch * s.tokens : qkv.size(0) == batch),
              "qkv ", qkv.sizes(), " does not hold ", heads, " query heads and the cache's ", s.kv_heads,
              " key and value heads of ", s.dim, " for its ", batch, " sequences");
  TORCH_CHECK(past >= 0 && past + s.tokens <= s.capacity, past, " cached and ", s.tokens,
              " new positions do not fit the cache's capacity ", s.capacity);
  TORCH_CHECK(cos.sizes() == sin.sizes() && cos.strides() == sin.strides() && cos.dim() == 3 &&
                  cos.scalar_type() == at::kFloat && sin.scalar_type() == at::kFloat && cos.device().is_cpu() &&
                  cos.stride(2) == 1 && (cos.size(0) == 1 || cos.size(0) == s.batch) && cos.size(1) == s.tokens &&
                  cos.size(2) == s.dim,
              "cos and sin must be float32 (1 or batch, tokens, dim) of one layout with unit stride over dim, got ",
              cos.sizes());
  s.cs_batch = cos.size(0) == 1 ? 0 : cos.stride(0);
  s.cs_stride = cos.stride(1);
  at::Tensor out = rows ? at::empty({s.batch * s.tokens, heads * s.dim}, qkv.options())
                        : at::empty({s.batch, s.tokens, heads * s.dim}, qkv.options());
  const float *pqkv = qkv.const_data_ptr<float>(), *pc = cos.const_data_ptr<float>(), *ps = sin.const_data_ptr<float>();
  float *pk = keys.data_ptr<float>(), *pv = values.data_ptr<float>(), *po = out.data_ptr<float>();
  st::write_cache(s, pqkv, pc, ps, pk, pv);
  at::parallel_for(0, s.batch * s.kv_heads, 1, [&](int64_t t0, int64_t t1) {
    st::attend_after_cache(s, pqkv, pc, ps, pk, pv, po, static_cast<float>(scale), t0, t1);
  });
  return out;
}

// Rotary embedding of x (b, h, t, d), any strides with unit stride over d, by cos and sin (b or 1, t, d)
// with unit stride over d. Returns (b, h, t, d) stored as (b, t, h, d), the layout transformers' own gives.
at::Tensor rotary_one(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  TORCH_CHECK(x.dim() == 4 && x.scalar_type() == at::kFloat && x.device().is_cpu() && x.stride(3) == 1 &&
                  x.size(3) % 2 == 0,
              "q and k must be 4-D float32 CPU tensors with an even last dim of unit stride, got ", x.sizes());
  const int64_t b = x.size(0), h = x.size(1), t = x.size(2), d = x.size(3);
  at::Tensor out = at::empty({b, t, h, d}, x.options());
  const float *px = x.const_data_ptr<float>(), *pc = cos.const_data_ptr<float>(), *ps = sin.const_data_ptr<float>();
  float* po = out.data_ptr<float>();
  const int64_t cs_batch = cos.size(0) == 1 ? 0 : cos.stride(0);
  at::parallel_for(0, b * h, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t bi = i / h, hi = i % h;
      st::rotary_rows(px + bi * x.stride(0) + hi * x.stride(1), x.stride(2), pc + bi * cs_batch, ps + bi * cs_batch,
                      cos.stride(1), po + (bi * t * h + hi) * d, h * d, t, d);
    }
  });
  return out.permute({0, 2, 1, 3});
}

std::tuple<at::Tensor, at::Tensor> rotary(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos,
                                          const at::Tensor& sin) {
  TORCH_CHECK(cos.sizes() == sin.sizes() && cos.strides() == sin.strides() && cos.dim() == 3 &&
                  cos.scalar_type() == at::kFloat && sin.scalar_type() == at::kFloat && cos.stride(2) == 1 &&
                  cos.device().is_cpu(),
              "cos and sin must be 3-D float32 CPU tensors (batch, tokens, dim) of one layout, got ", cos.sizes());
  for (const at::Tensor* x : {&q, &k}) {
    TORCH_CHECK(x->dim() == 4 && (cos.size(0) == 1 || cos.size(0) == x->size(0)) && cos.size(1) == x->size(2) &&
                    cos.size(2) == x->size(3),
                "cos ", cos.sizes(), " does not match q or k ", x->sizes());
  }
  return {rotary_one(q, cos, sin), rotary_one(k, cos, sin)};
}

std::string isa() {
#if defined(ST_ISA_AVX512VNNI)
  return "avx512vnni";
#elif defined(ST_ISA_AVX512)
  return "avx512";
#elif defined(ST_ISA_AVX2)
  return "avx2";
#else
  return "scalar";
#endif
}

}  // namespace

#define ST_LIBRARY(ns, m) TORCH_LIBRARY(ns, m)
ST_LIBRARY(ST_NAMESPACE, m) {
  m.def("isa() -> str", &isa);
  m.def("causal_attention(Tensor q, Tensor k, Tensor v, float scale) -> Tensor", &causal_attention);
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor", &rms_norm);
  m.def("silu_mul(Tensor g, Tensor u) -> Tensor", &silu_mul);
  m.def("rotary(Tensor q, Tensor k, Tensor cos, Tensor sin) -> (Tensor, Tensor)", &rotary);
  m.def("add_rms_norm(Tensor(a!) x, Tensor update, Tensor weight, float eps) -> Tensor", &add_rms_norm);
  m.def("silu_mul_halves(Tensor gu) -> Tensor", &silu_mul_halves);
  m.def("attention_after_cache(Tensor qkv, Tensor cos, Tensor sin, Tensor(a!) keys, Tensor(b!) values, int heads, "
        "int past, float scale) -> Tensor", &attention_after_cache);
}
