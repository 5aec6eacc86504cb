// Fused CPU kernels with hand-written backward for the elementwise chains of a decoder
// layer, as torch autograd functions: RMSNorm (transformers' LlamaRMSNorm) and rotary
// position embedding (the half-split `rotate_half` form). Each forward and each backward
// is one pass over the activations instead of the 4-10 passes (and as many temporaries)
// of the composite ops. Called from Rust through the extern "C" functions at the end;
// model/src/fused.rs chooses them for contiguous CPU float/double tensors and falls back
// to the composite ops elsewhere.
#include <ATen/ATen.h>
#include <torch/csrc/autograd/custom_function.h>

#include <cmath>
#include <cstring>
#include <string>

#include "ffi.h"
#include "simd.h"

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// y = w * (x * r), r = 1 / sqrt(mean(x^2) + eps) per row of H.
template <typename T>
inline __attribute__((always_inline)) void rms_forward_row(const T* xr, const T* w, T* yr,
                                                           T* rstd, int64_t h, double eps) {
  T r = T(1) / std::sqrt(grpo_simd::dot(xr, xr, h) / T(h) + T(eps));
  *rstd = r;
#pragma omp simd
  for (int64_t i = 0; i < h; ++i) yr[i] = w[i] * (xr[i] * r);
}

GRPO_SIMD_VARIANTS(rms_forward,
                   (const T* x, const T* w, T* y, T* rstd, int64_t rows, int64_t h, double eps),
                   for (int64_t n = 0; n < rows; ++n)
                       rms_forward_row(x + n * h, w, y + n * h, rstd + n, h, eps);)

// gx = r * (w * g) - (r^3 / H) * sum(w * g * x) * x;  gw = sum over rows of g * x * r.
template <typename T>
inline __attribute__((always_inline)) void rms_backward_row(const T* gr, const T* xr,
                                                            const T* w, T r, T* gxr, T* gw,
                                                            int64_t h) {
  T dot = 0;
#pragma omp simd reduction(+ : dot)
  for (int64_t i = 0; i < h; ++i) {
    dot += w[i] * gr[i] * xr[i];
    gw[i] += gr[i] * (xr[i] * r);
  }
  T c = r * r * r * dot / T(h);
#pragma omp simd
  for (int64_t i = 0; i < h; ++i) gxr[i] = r * (w[i] * gr[i]) - c * xr[i];
}

GRPO_SIMD_VARIANTS(rms_backward,
                   (const T* g, const T* x, const T* w, const T* rstd, T* gx, T* gw,
                    int64_t rows, int64_t h),
                   for (int64_t i = 0; i < h; ++i) gw[i] = 0;
                   for (int64_t n = 0; n < rows; ++n)
                       rms_backward_row(g + n * h, x + n * h, w, rstd[n], gx + n * h, gw, h);)

class RmsNormFn : public torch::autograd::Function<RmsNormFn> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& w,
                            double eps) {
    TORCH_CHECK(x.device().is_cpu() && w.device().is_cpu(), "rms_norm: CPU tensors only");
    TORCH_CHECK(x.scalar_type() == w.scalar_type(), "rms_norm: x is ", x.scalar_type(),
                ", the weight ", w.scalar_type());
    TORCH_CHECK(x.dim() >= 1 && w.dim() == 1 && w.size(0) == x.size(-1),
                "rms_norm: the weight has shape ", w.sizes(), ", x ", x.sizes());
    auto xc = x.contiguous();
    auto wc = w.contiguous();
    int64_t h = xc.size(-1);
    int64_t rows = h == 0 ? 0 : xc.numel() / h;
    auto y = at::empty_like(xc);
    auto rstd = at::empty({rows}, xc.options());
    AT_DISPATCH_FLOATING_TYPES(xc.scalar_type(), "grpo_rms_norm", [&] {
      auto rms_forward =
          grpo_simd::has_avx2() ? rms_forward_avx2<scalar_t> : rms_forward_base<scalar_t>;
      rms_forward(xc.data_ptr<scalar_t>(), wc.data_ptr<scalar_t>(),
                            y.data_ptr<scalar_t>(), rstd.data_ptr<scalar_t>(), rows, h, eps);
    });
    ctx->save_for_backward({xc, wc, rstd});
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto saved = ctx->get_saved_variables();
    auto x = saved[0], w = saved[1], rstd = saved[2];
    auto g = grads[0].contiguous();
    int64_t h = x.size(-1);
    int64_t rows = h == 0 ? 0 : x.numel() / h;
    auto gx = at::empty_like(x);
    auto gw = at::empty_like(w);
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "grpo_rms_norm_backward", [&] {
      auto rms_backward =
          grpo_simd::has_avx2() ? rms_backward_avx2<scalar_t> : rms_backward_base<scalar_t>;
      rms_backward(g.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(),
                             w.data_ptr<scalar_t>(), rstd.data_ptr<scalar_t>(),
                             gx.data_ptr<scalar_t>(), gw.data_ptr<scalar_t>(), rows, h);
    });
    return {gx, gw, at::Tensor()};
  }
};

// Rotary embedding of x [B, T, heads, d] with cos/sin [B, T, d] (no gradient):
// y = x * cos + rotate_half(x) * sin, rotate_half(x) = cat(-x[d/2:], x[:d/2]).
// `inverse` applies the inverse rotation (the backward: the rotation's transpose),
// y = x * cos + rotate_half^T(x * sin).
template <typename T>
inline __attribute__((always_inline)) void rope_row(const T* xr, const T* c, const T* s, T* yr,
                                                    int64_t half, bool inverse) {
  if (!inverse) {
#pragma omp simd
    for (int64_t i = 0; i < half; ++i) yr[i] = xr[i] * c[i] - xr[i + half] * s[i];
#pragma omp simd
    for (int64_t i = half; i < 2 * half; ++i) yr[i] = xr[i] * c[i] + xr[i - half] * s[i];
  } else {
#pragma omp simd
    for (int64_t i = 0; i < half; ++i) yr[i] = xr[i] * c[i] + xr[i + half] * s[i + half];
#pragma omp simd
    for (int64_t i = half; i < 2 * half; ++i) yr[i] = xr[i] * c[i] - xr[i - half] * s[i - half];
  }
}

GRPO_SIMD_VARIANTS(rope_apply,
                   (const T* x, const T* cs, const T* sn, T* y, int64_t bt, int64_t heads,
                    int64_t d, bool inverse),
                   for (int64_t p = 0; p < bt; ++p) {
                     for (int64_t hd = 0; hd < heads; ++hd) {
                       const int64_t at = (p * heads + hd) * d;
                       rope_row(x + at, cs + p * d, sn + p * d, y + at, d / 2, inverse);
                     }
                   })

class RopeFn : public torch::autograd::Function<RopeFn> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& cos,
                            const at::Tensor& sin) {
    TORCH_CHECK(x.device().is_cpu() && cos.device().is_cpu() && sin.device().is_cpu(),
                "rope: CPU tensors only");
    TORCH_CHECK(x.scalar_type() == cos.scalar_type() && x.scalar_type() == sin.scalar_type(),
                "rope: x, cos and sin must share one dtype");
    TORCH_CHECK(x.dim() == 4 && x.size(3) % 2 == 0, "rope: x must be [B, T, heads, d] with d even, got ",
                x.sizes());
    TORCH_CHECK(cos.sizes() == sin.sizes() && cos.dim() == 3 && cos.size(0) == x.size(0) &&
                    cos.size(1) == x.size(1) && cos.size(2) == x.size(3),
                "rope: cos/sin must be [B, T, d] of x ", x.sizes(), ", got ", cos.sizes());
    auto xc = x.contiguous();
    auto c = cos.contiguous();
    auto s = sin.contiguous();
    auto y = at::empty_like(xc);
    int64_t d = xc.size(3), heads = xc.size(2), bt = xc.size(0) * xc.size(1);
    AT_DISPATCH_FLOATING_TYPES(xc.scalar_type(), "grpo_rope", [&] {
      auto rope_apply =
          grpo_simd::has_avx2() ? rope_apply_avx2<scalar_t> : rope_apply_base<scalar_t>;
      rope_apply(xc.data_ptr<scalar_t>(), c.data_ptr<scalar_t>(), s.data_ptr<scalar_t>(),
                 y.data_ptr<scalar_t>(), bt, heads, d, false);
    });
    ctx->save_for_backward({c, s});
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto saved = ctx->get_saved_variables();
    auto c = saved[0], s = saved[1];
    auto g = grads[0].contiguous();
    auto gx = at::empty_like(g);
    int64_t d = g.size(3), heads = g.size(2), bt = g.size(0) * g.size(1);
    AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "grpo_rope_backward", [&] {
      auto rope_apply =
          grpo_simd::has_avx2() ? rope_apply_avx2<scalar_t> : rope_apply_base<scalar_t>;
      rope_apply(g.data_ptr<scalar_t>(), c.data_ptr<scalar_t>(), s.data_ptr<scalar_t>(),
                 gx.data_ptr<scalar_t>(), bt, heads, d, true);
    });
    return {gx, at::Tensor(), at::Tensor()};
  }
};

}  // namespace

// Each returns a new tensor (owned by the caller, freed as tch frees its tensors), or
// null with `*err` set to a malloc'd message the caller frees with `free`.
extern "C" {

at::Tensor* grpo_fused_rms_norm(const at::Tensor* x, const at::Tensor* w, double eps,
                                char** err) {
  try {
    return new at::Tensor(RmsNormFn::apply(*x, *w, eps));
  } catch (const std::exception& e) {
    *err = grpo_ffi::copy_message(e);
    return nullptr;
  }
}

at::Tensor* grpo_fused_rope(const at::Tensor* x, const at::Tensor* cos, const at::Tensor* sin,
                            char** err) {
  try {
    return new at::Tensor(RopeFn::apply(*x, *cos, *sin));
  } catch (const std::exception& e) {
    *err = grpo_ffi::copy_message(e);
    return nullptr;
  }
}
}
