// Attention of shared-prefix rows on CPU, as a torch autograd function with a
// hand-written backward. A row holds segments (0 = the shared prompt, k >= 1 = completion
// k, -1 = padding); query i of segment s attends to the keys j <= i of segment 0 or s,
// the mask model/src/transformer.rs builds for SDPA. SDPA evaluates that mask densely
// over the whole [T, T] square, while a completion sees only the prompt and itself:
// with k completions about 1/k of the square. This kernel visits only the visible keys,
// one (query, head) at a time inside L1, and saves the log-sum-exp for the backward
// (FlashAttention's recomputation). Padding queries output zeros and get no gradient.
//
// Layouts: q [B, T, nh, d], k/v [B, T, nkv, d] (contiguous; heads share a kv head in
// groups of nh / nkv, as SDPA's enable_gqa), seg [B, T] i64; output [B, T, nh * d]. With
// a row stride, one sequence holds several rows back to back (the packed real tokens of
// a batch): a token's value is row * stride + segment, and rows never see each other.
// Accumulation is in the input dtype (f32 or f64), as SDPA's CPU kernels.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/csrc/autograd/custom_function.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <vector>

#include "simd.h"

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

struct Shape {
  int64_t b, t, nh, nkv, d;
};

// With `stride` > 0 a token's value packs its row and segment: row = value / stride,
// segment = value % stride (the packed layout of several rows in one sequence).
inline int64_t local_segment(int64_t value, int64_t stride) {
  return stride > 0 ? value % stride : value;
}

inline int64_t row_of(int64_t value, int64_t stride) { return stride > 0 ? value / stride : 0; }

// Positions [lo, hi) of sequence b: one row, attended to independently of the others.
struct Block {
  int64_t b, lo, hi;
};

std::vector<Block> blocks_of(const int64_t* seg, int64_t batch, int64_t t, int64_t stride) {
  std::vector<Block> blocks;
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t* s = seg + b * t;
    for (int64_t j = 0; j < t;) {
      if (s[j] < 0) {
        ++j;
        continue;
      }
      int64_t e = j + 1;
      while (e < t && s[e] >= 0 && row_of(s[e], stride) == row_of(s[j], stride)) ++e;
      blocks.push_back({b, j, e});
      j = e;
    }
  }
  return blocks;
}

// The visible keys of every query of a block: for query lo + i, keys
// idx[start[i] .. start[i + 1]) (positions in the sequence). Runs of one segment are
// contiguous in our rows, but any order of segments is handled.
struct Visible {
  std::vector<int32_t> idx;
  std::vector<int64_t> start;
};

Visible visible_keys(const int64_t* s, Block blk, int64_t stride) {
  struct Run {
    int64_t lo, hi, value;
  };
  std::vector<Run> runs;
  for (int64_t j = blk.lo; j < blk.hi;) {
    int64_t e = j + 1;
    while (e < blk.hi && s[e] == s[j]) ++e;
    runs.push_back({j, e, s[j]});
    j = e;
  }
  Visible v;
  const int64_t n = blk.hi - blk.lo;
  v.start.assign(n + 1, 0);
  for (int64_t i = blk.lo; i < blk.hi; ++i) {
    v.start[i - blk.lo] = static_cast<int64_t>(v.idx.size());
    for (const Run& r : runs) {
      if (r.lo > i) break;
      if (local_segment(r.value, stride) != 0 && r.value != s[i]) continue;
      for (int64_t j = r.lo; j < std::min(r.hi, i + 1); ++j) v.idx.push_back(static_cast<int32_t>(j));
    }
  }
  v.start[n] = static_cast<int64_t>(v.idx.size());
  return v;
}

using grpo_simd::axpy;
using grpo_simd::dot;
using grpo_simd::has_avx2;

// One row of the forward: out [T, nh * d], lse [T, nh].
template <typename T>
inline __attribute__((always_inline)) void forward_row(const T* q, const T* k, const T* v,
                                                       const Visible& vis, Block blk, Shape sh,
                                                       T scale, T* out, T* lse) {
  const int64_t group = sh.nh / sh.nkv, d = sh.d;
  std::vector<T> p(static_cast<size_t>(blk.hi - blk.lo));
  for (int64_t i = blk.lo; i < blk.hi; ++i) {
    const int64_t lo = vis.start[i - blk.lo], n = vis.start[i - blk.lo + 1] - lo;
    const int32_t* keys = vis.idx.data() + lo;
    for (int64_t h = 0; h < sh.nh; ++h) {
      T* o = out + (i * sh.nh + h) * d;
      const int64_t g = h / group;
      const T* qi = q + (i * sh.nh + h) * d;
      T m = -std::numeric_limits<T>::infinity();
      for (int64_t x = 0; x < n; ++x) {
        p[x] = scale * dot(qi, k + (keys[x] * sh.nkv + g) * d, d);
        m = std::max(m, p[x]);
      }
      T sum = 0;
      for (int64_t x = 0; x < n; ++x) {
        p[x] = std::exp(p[x] - m);
        sum += p[x];
      }
      const T inv = T(1) / sum;
      for (int64_t x = 0; x < n; ++x) axpy(p[x] * inv, v + (keys[x] * sh.nkv + g) * d, o, d);
      lse[i * sh.nh + h] = m + std::log(sum);
    }
  }
}

// One row of the backward (dq, dk, dv zeroed by the caller): with p = exp(s - lse) and
// D = dO . O, ds = p * (dO . v - D); dq += scale ds k, dk += scale ds q, dv += p dO.
template <typename T>
inline __attribute__((always_inline)) void backward_row(const T* q, const T* k, const T* v,
                                                        const T* out, const T* lse,
                                                        const T* gout, const Visible& vis,
                                                        Block blk, Shape sh, T scale, T* dq,
                                                        T* dk, T* dv) {
  const int64_t group = sh.nh / sh.nkv, d = sh.d;
  for (int64_t i = blk.lo; i < blk.hi; ++i) {
    const int64_t lo = vis.start[i - blk.lo], n = vis.start[i - blk.lo + 1] - lo;
    const int32_t* keys = vis.idx.data() + lo;
    for (int64_t h = 0; h < sh.nh && n > 0; ++h) {
      const int64_t g = h / group, at = (i * sh.nh + h) * d;
      const T* qi = q + at;
      const T* go = gout + at;
      T* dqi = dq + at;
      const T dd = dot(go, out + at, d), l = lse[i * sh.nh + h];
      for (int64_t x = 0; x < n; ++x) {
        const int64_t kv = (keys[x] * sh.nkv + g) * d;
        const T p = std::exp(scale * dot(qi, k + kv, d) - l);
        const T ds = p * (dot(go, v + kv, d) - dd) * scale;
        axpy(ds, k + kv, dqi, d);
        axpy(ds, qi, dk + kv, d);
        axpy(p, go, dv + kv, d);
      }
    }
  }
}

// Blocks [b0, b1) of the forward and the backward, for AVX2 and for any x86-64.
GRPO_SIMD_VARIANTS(forward_rows,
                   (const T* q, const T* k, const T* v, const int64_t* seg, const Block* blocks,
                    int64_t stride, Shape sh, T scale, T* out, T* lse, int64_t b0, int64_t b1),
                   const int64_t qs = sh.t * sh.nh * sh.d, ks = sh.t * sh.nkv * sh.d;
                   for (int64_t x = b0; x < b1; ++x) {
                     const int64_t b = blocks[x].b;
                     Visible vis = visible_keys(seg + b * sh.t, blocks[x], stride);
                     forward_row(q + b * qs, k + b * ks, v + b * ks, vis, blocks[x], sh, scale,
                                 out + b * qs, lse + b * sh.t * sh.nh);
                   })

GRPO_SIMD_VARIANTS(backward_rows,
                   (const T* q, const T* k, const T* v, const T* out, const T* lse,
                    const T* gout, const int64_t* seg, const Block* blocks, int64_t stride,
                    Shape sh, T scale, T* dq, T* dk, T* dv, int64_t b0, int64_t b1),
                   const int64_t qs = sh.t * sh.nh * sh.d, ks = sh.t * sh.nkv * sh.d;
                   for (int64_t x = b0; x < b1; ++x) {
                     const int64_t b = blocks[x].b;
                     Visible vis = visible_keys(seg + b * sh.t, blocks[x], stride);
                     backward_row(q + b * qs, k + b * ks, v + b * ks, out + b * qs,
                                  lse + b * sh.t * sh.nh, gout + b * qs, vis, blocks[x], sh,
                                  scale, dq + b * qs, dk + b * ks, dv + b * ks);
                   })

Shape shape_of(const at::Tensor& q, const at::Tensor& k) {
  return {q.size(0), q.size(1), q.size(2), k.size(2), q.size(3)};
}

class SegmentAttentionFn : public torch::autograd::Function<SegmentAttentionFn> {
 public:
  // q [B, nh, T, d], k/v [B, nkv, T, d] (SDPA's layout, typically transposed views of
  // [B, T, heads, d]); seg [B, T]; stride as in `local_segment`. Returns [B, T, nh * d].
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& q, const at::Tensor& k,
                            const at::Tensor& v, const at::Tensor& seg, int64_t stride) {
    TORCH_CHECK(q.device().is_cpu() && k.device().is_cpu() && v.device().is_cpu() &&
                    seg.device().is_cpu(),
                "segment_attention: CPU tensors only");
    TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(),
                "segment_attention: q, k and v must share one dtype");
    TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && k.sizes() == v.sizes(),
                "segment_attention: q must be [B, nh, T, d] and k, v [B, nkv, T, d], got ",
                q.sizes(), ", ", k.sizes(), ", ", v.sizes());
    TORCH_CHECK(k.size(0) == q.size(0) && k.size(2) == q.size(2) && k.size(3) == q.size(3) &&
                    k.size(1) > 0 && q.size(1) % k.size(1) == 0,
                "segment_attention: k ", k.sizes(), " does not fit q ", q.sizes());
    TORCH_CHECK(seg.scalar_type() == at::kLong && seg.dim() == 2 && seg.size(0) == q.size(0) &&
                    seg.size(1) == q.size(2),
                "segment_attention: seg must be [B, T] int64, got ", seg.sizes());
    TORCH_CHECK(stride >= 0, "segment_attention: negative row stride ", stride);
    TORCH_CHECK(q.size(2) < std::numeric_limits<int32_t>::max(),
                "segment_attention: rows of ", q.size(2), " tokens are too long");
    auto qc = q.transpose(1, 2).contiguous();
    auto kc = k.transpose(1, 2).contiguous();
    auto vc = v.transpose(1, 2).contiguous();
    auto sc = seg.contiguous();
    Shape sh = shape_of(qc, kc);
    auto blocks = blocks_of(sc.data_ptr<int64_t>(), sh.b, sh.t, stride);
    auto out = at::zeros({sh.b, sh.t, sh.nh * sh.d}, qc.options());
    auto lse = at::zeros({sh.b, sh.t, sh.nh}, qc.options());
    AT_DISPATCH_FLOATING_TYPES(qc.scalar_type(), "grpo_segment_attention", [&] {
      const scalar_t scale = scalar_t(1) / std::sqrt(scalar_t(sh.d));
      auto run = has_avx2() ? forward_rows_avx2<scalar_t> : forward_rows_base<scalar_t>;
      at::parallel_for(0, static_cast<int64_t>(blocks.size()), 1, [&](int64_t b0, int64_t b1) {
        run(qc.data_ptr<scalar_t>(), kc.data_ptr<scalar_t>(), vc.data_ptr<scalar_t>(),
            sc.data_ptr<int64_t>(), blocks.data(), stride, sh, scale, out.data_ptr<scalar_t>(),
            lse.data_ptr<scalar_t>(), b0, b1);
      });
    });
    ctx->save_for_backward({qc, kc, vc, sc, out, lse});
    ctx->saved_data["stride"] = stride;
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto saved = ctx->get_saved_variables();
    auto qc = saved[0], kc = saved[1], vc = saved[2], sc = saved[3], out = saved[4],
         lse = saved[5];
    const int64_t stride = ctx->saved_data["stride"].toInt();
    auto g = grads[0].contiguous();
    Shape sh = shape_of(qc, kc);
    auto blocks = blocks_of(sc.data_ptr<int64_t>(), sh.b, sh.t, stride);
    auto dq = at::zeros_like(qc);
    auto dk = at::zeros_like(kc);
    auto dv = at::zeros_like(vc);
    AT_DISPATCH_FLOATING_TYPES(qc.scalar_type(), "grpo_segment_attention_backward", [&] {
      const scalar_t scale = scalar_t(1) / std::sqrt(scalar_t(sh.d));
      auto run = has_avx2() ? backward_rows_avx2<scalar_t> : backward_rows_base<scalar_t>;
      // Blocks write disjoint rows of dk and dv.
      at::parallel_for(0, static_cast<int64_t>(blocks.size()), 1, [&](int64_t b0, int64_t b1) {
        run(qc.data_ptr<scalar_t>(), kc.data_ptr<scalar_t>(), vc.data_ptr<scalar_t>(),
            out.data_ptr<scalar_t>(), lse.data_ptr<scalar_t>(), g.data_ptr<scalar_t>(),
            sc.data_ptr<int64_t>(), blocks.data(), stride, sh, scale, dq.data_ptr<scalar_t>(),
            dk.data_ptr<scalar_t>(), dv.data_ptr<scalar_t>(), b0, b1);
      });
    });
    return {dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2), at::Tensor(),
            at::Tensor()};
  }
};

char* copy_message(const std::exception& e) {
  const char* what = e.what();
  size_t n = std::strlen(what);
  char* out = static_cast<char*>(std::malloc(n + 1));
  if (out) std::memcpy(out, what, n + 1);
  return out;
}

}  // namespace

extern "C" {

// A new tensor owned by the caller, or null with `*err` set to a malloc'd message.
at::Tensor* grpo_segment_attention(const at::Tensor* q, const at::Tensor* k, const at::Tensor* v,
                                   const at::Tensor* seg, int64_t stride, char** err) {
  try {
    return new at::Tensor(SegmentAttentionFn::apply(*q, *k, *v, *seg, stride));
  } catch (const std::exception& e) {
    *err = copy_message(e);
    return nullptr;
  }
}
}
