// Attention of shared-prefix rows on CPU, as a torch autograd function with a
// hand-written backward. A row holds segments (0 = the shared prompt, k >= 1 = completion
// k, -1 = padding); query i of segment s attends to the keys j <= i of segment 0 or s,
// the mask model/src/transformer.rs builds for SDPA. SDPA evaluates that mask densely
// over the whole [T, T] square, while a completion sees only the prompt and itself:
// with k completions about 1/k of the square. This kernel visits only the visible keys:
// each run of one segment gathers its keys (the prompt's, then its own) transposed, and
// every query scores them KB at a time in registers. It saves the log-sum-exp for the
// backward (FlashAttention's recomputation). Padding queries output zeros and get no
// gradient.
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

#include "ffi.h"
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

// The queries of a block in runs of one segment value. Every query of a run sees the
// same keys before the run (`prefix`: the prompt's, and its own segment's if it were
// split) and the run's own keys up to itself, so the run gathers its key list once:
// `keys` = prefix then the run's positions, and query `lo + i` of the run sees the
// first `prefix + i + 1`.
struct Run {
  int64_t lo, hi, value;
};

std::vector<Run> runs_of(const int64_t* s, Block blk) {
  std::vector<Run> runs;
  for (int64_t j = blk.lo; j < blk.hi;) {
    int64_t e = j + 1;
    while (e < blk.hi && s[e] == s[j]) ++e;
    runs.push_back({j, e, s[j]});
    j = e;
  }
  return runs;
}

// Key positions of run `r` (see Run), and how many come before the run.
int64_t keys_of(const std::vector<Run>& runs, size_t r, int64_t stride,
                std::vector<int64_t>& keys) {
  keys.clear();
  const int64_t own = runs[r].value;
  for (size_t e = 0; e < r; ++e) {
    if (local_segment(runs[e].value, stride) != 0 && runs[e].value != own) continue;
    for (int64_t j = runs[e].lo; j < runs[e].hi; ++j) keys.push_back(j);
  }
  const int64_t prefix = static_cast<int64_t>(keys.size());
  for (int64_t j = runs[r].lo; j < runs[r].hi; ++j) keys.push_back(j);
  return prefix;
}

using grpo_simd::dot;
using grpo_simd::has_avx2;

// Keys are handled KB at a time: key lists are padded to a multiple of KB and each
// block of KB scores accumulates in registers over the head dimension.
constexpr int64_t KB = 32;

inline int64_t padded(int64_t n) { return (n + KB - 1) / KB * KB; }

// exp(x) for f32: 2^n p(r) with r = x - n ln 2 in [-ln 2 / 2, ln 2 / 2] and Cephes'
// degree-6 polynomial, within 1e-7 relative of exp (x clamped to [-87, 88]); written
// without branches or calls so the loops around it vectorise. f64 (the tests'
// reference precision) takes std::exp.
inline __attribute__((always_inline)) float exp_of(float x) {
  x = x < -87.0f ? -87.0f : x;
  x = x > 88.0f ? 88.0f : x;
  const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round(x / ln 2)
  const float r = x - n * 0.693359375f + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

inline __attribute__((always_inline)) double exp_of(double x) { return std::exp(x); }

// Rows `keys` of kv head g of x ([T, nkv, d]) transposed into xt [d][mp], zeros past
// the keys.
template <typename T>
inline __attribute__((always_inline)) void gather_t(const T* x, const std::vector<int64_t>& keys,
                                                    Shape sh, int64_t g, int64_t mp, T* xt) {
  const int64_t m = static_cast<int64_t>(keys.size());
  std::fill(xt, xt + sh.d * mp, T(0));
  for (int64_t e = 0; e < m; ++e) {
    const T* row = x + (keys[e] * sh.nkv + g) * sh.d;
    for (int64_t dd = 0; dd < sh.d; ++dd) xt[dd * mp + e] = row[dd];
  }
}

// 32-byte vectors of T (GCC's vector extension: AVX registers in the AVX2 variant, SSE
// pairs in the base one), so that the accumulators of a key block stay in registers.
template <typename T>
struct Vector {
  typedef T type __attribute__((vector_size(32)));
};
template <typename T>
using Vec = typename Vector<T>::type;
template <typename T>
constexpr int64_t kLanes = 32 / sizeof(T);
template <typename T>
constexpr int64_t kVecs = KB / kLanes<T>;

template <typename T>
inline __attribute__((always_inline)) Vec<T> load(const T* p) {
  Vec<T> v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

template <typename T>
inline __attribute__((always_inline)) void store(T* p, Vec<T> v) {
  std::memcpy(p, &v, sizeof v);
}

// s[e] = scale * sum_dd a[dd] xt[dd][e] for e < padded(c).
template <typename T>
inline __attribute__((always_inline)) void scores(const T* a, const T* xt, int64_t mp, int64_t c,
                                                  int64_t d, T scale, T* s) {
  for (int64_t e0 = 0; e0 < c; e0 += KB) {
    Vec<T> acc[kVecs<T>] = {};
    for (int64_t dd = 0; dd < d; ++dd) {
      const T ad = a[dd] * scale;
      const T* xr = xt + dd * mp + e0;
      for (int64_t j = 0; j < kVecs<T>; ++j) acc[j] += ad * load(xr + j * kLanes<T>);
    }
    for (int64_t j = 0; j < kVecs<T>; ++j) store(s + e0 + j * kLanes<T>, acc[j]);
  }
}

// y[dd] += sum_e p[e] xt[dd][e] over e < cp, a multiple of KB (p is zero past the
// visible keys).
template <typename T>
inline __attribute__((always_inline)) void mix(const T* p, const T* xt, int64_t mp, int64_t cp,
                                               int64_t d, T* y) {
  for (int64_t dd = 0; dd < d; ++dd) {
    const T* xr = xt + dd * mp;
    Vec<T> acc[kVecs<T>] = {};
    for (int64_t e0 = 0; e0 < cp; e0 += KB) {
      for (int64_t j = 0; j < kVecs<T>; ++j) {
        acc[j] += load(p + e0 + j * kLanes<T>) * load(xr + e0 + j * kLanes<T>);
      }
    }
    for (int64_t j = 1; j < kVecs<T>; ++j) acc[0] += acc[j];
    T sum = 0;
    for (int64_t l = 0; l < kLanes<T>; ++l) sum += acc[0][l];
    y[dd] += sum;
  }
}

// y[dd] += sum_e p[e] x[keys[e]][g][dd] over e < c, reading the rows of x ([T, nkv, d])
// in place, KB of the head dimension at a time (d a multiple of KB; else `mix`).
template <typename T>
inline __attribute__((always_inline)) void mix_rows(const T* p, const T* x, const int64_t* keys,
                                                    int64_t c, Shape sh, int64_t g, T* y) {
  for (int64_t d0 = 0; d0 < sh.d; d0 += KB) {
    Vec<T> acc[kVecs<T>] = {};
    for (int64_t e = 0; e < c; ++e) {
      const T pe = p[e];
      const T* row = x + (keys[e] * sh.nkv + g) * sh.d + d0;
      for (int64_t j = 0; j < kVecs<T>; ++j) acc[j] += pe * load(row + j * kLanes<T>);
    }
    for (int64_t j = 0; j < kVecs<T>; ++j) {
      T* yj = y + d0 + j * kLanes<T>;
      store(yj, load(yj) + acc[j]);
    }
  }
}

// gt[dd][e] += a[dd] p[e] for e < cp.
template <typename T>
inline __attribute__((always_inline)) void outer_add(const T* a, const T* p, int64_t mp,
                                                     int64_t cp, int64_t d, T* gt) {
  for (int64_t dd = 0; dd < d; ++dd) {
    const T ad = a[dd];
    T* g = gt + dd * mp;
#pragma omp simd
    for (int64_t e = 0; e < cp; ++e) g[e] += ad * p[e];
  }
}

// Softmax weights of the c visible scores in p (zeros up to padded(c)); returns the
// log-sum-exp.
template <typename T>
inline __attribute__((always_inline)) T softmax(T* p, int64_t c) {
  T m = p[0];
  for (int64_t e = 1; e < c; ++e) m = std::max(m, p[e]);
  T sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t e = 0; e < c; ++e) {
    p[e] = exp_of(p[e] - m);
    sum += p[e];
  }
  const T inv = T(1) / sum;
#pragma omp simd
  for (int64_t e = 0; e < c; ++e) p[e] *= inv;
  std::fill(p + c, p + padded(c), T(0));
  return m + std::log(sum);
}

// One block of the forward: out [T, nh * d], lse [T, nh] at the block's positions.
template <typename T>
inline __attribute__((always_inline)) void forward_block(const T* q, const T* k, const T* v,
                                                         const int64_t* seg, Block blk,
                                                         int64_t stride, Shape sh, T scale,
                                                         T* out, T* lse) {
  const int64_t group = sh.nh / sh.nkv, d = sh.d;
  const bool rows = d % KB == 0;  // mix_rows over the head dimension
  const auto runs = runs_of(seg, blk);
  std::vector<int64_t> keys;
  std::vector<T> kt, vt, p;
  for (size_t r = 0; r < runs.size(); ++r) {
    const int64_t prefix = keys_of(runs, r, stride, keys);
    const int64_t mp = padded(static_cast<int64_t>(keys.size()));
    kt.resize(d * mp);
    vt.resize(d * mp);
    p.resize(mp);
    for (int64_t g = 0; g < sh.nkv; ++g) {
      gather_t(k, keys, sh, g, mp, kt.data());
      gather_t(v, keys, sh, g, mp, vt.data());
      for (int64_t i = runs[r].lo; i < runs[r].hi; ++i) {
        const int64_t c = prefix + i - runs[r].lo + 1;
        for (int64_t h = g * group; h < (g + 1) * group; ++h) {
          const int64_t at = (i * sh.nh + h) * d;
          scores(q + at, kt.data(), mp, c, d, scale, p.data());
          lse[i * sh.nh + h] = softmax(p.data(), c);
          if (rows) {
            mix_rows(p.data(), v, keys.data(), c, sh, g, out + at);
          } else {
            mix(p.data(), vt.data(), mp, padded(c), d, out + at);
          }
        }
      }
    }
  }
}

// One block of the backward (dq, dk, dv zeroed by the caller): with p = exp(s - lse) and
// D = dO . O, ds = p * (dO . v - D); dq += scale ds k, dk += scale ds q, dv += p dO. The
// key gradients of a run accumulate transposed, then add into dk and dv.
template <typename T>
inline __attribute__((always_inline)) void backward_block(const T* q, const T* k, const T* v,
                                                          const T* out, const T* lse,
                                                          const T* gout, const int64_t* seg,
                                                          Block blk, int64_t stride, Shape sh,
                                                          T scale, T* dq, T* dk, T* dv) {
  const int64_t group = sh.nh / sh.nkv, d = sh.d;
  const bool rows = d % KB == 0;  // mix_rows over the head dimension
  const auto runs = runs_of(seg, blk);
  std::vector<int64_t> keys;
  std::vector<T> kt, vt, dkt, dvt, p, ds;
  for (size_t r = 0; r < runs.size(); ++r) {
    const int64_t prefix = keys_of(runs, r, stride, keys);
    const int64_t m = static_cast<int64_t>(keys.size()), mp = padded(m);
    kt.resize(d * mp);
    vt.resize(d * mp);
    dkt.resize(d * mp);
    dvt.resize(d * mp);
    p.resize(mp);
    ds.resize(mp);
    for (int64_t g = 0; g < sh.nkv; ++g) {
      gather_t(k, keys, sh, g, mp, kt.data());
      gather_t(v, keys, sh, g, mp, vt.data());
      std::fill(dkt.begin(), dkt.end(), T(0));
      std::fill(dvt.begin(), dvt.end(), T(0));
      for (int64_t i = runs[r].lo; i < runs[r].hi; ++i) {
        const int64_t c = prefix + i - runs[r].lo + 1, cp = padded(c);
        for (int64_t h = g * group; h < (g + 1) * group; ++h) {
          const int64_t at = (i * sh.nh + h) * d;
          const T* go = gout + at;
          const T dd = dot(go, out + at, d), l = lse[i * sh.nh + h];
          scores(q + at, kt.data(), mp, c, d, scale, p.data());
          scores(go, vt.data(), mp, c, d, T(1), ds.data());
#pragma omp simd
          for (int64_t e = 0; e < cp; ++e) {
            p[e] = e < c ? exp_of(p[e] - l) : T(0);
            ds[e] = p[e] * (ds[e] - dd) * scale;
          }
          if (rows) {
            mix_rows(ds.data(), k, keys.data(), c, sh, g, dq + at);
          } else {
            mix(ds.data(), kt.data(), mp, cp, d, dq + at);
          }
          outer_add(q + at, ds.data(), mp, cp, d, dkt.data());
          outer_add(go, p.data(), mp, cp, d, dvt.data());
        }
      }
      for (int64_t e = 0; e < m; ++e) {
        T* dkr = dk + (keys[e] * sh.nkv + g) * d;
        T* dvr = dv + (keys[e] * sh.nkv + g) * d;
        for (int64_t x = 0; x < d; ++x) {
          dkr[x] += dkt[x * mp + e];
          dvr[x] += dvt[x * mp + e];
        }
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
                     forward_block(q + b * qs, k + b * ks, v + b * ks, seg + b * sh.t,
                                   blocks[x], stride, sh, scale, out + b * qs,
                                   lse + b * sh.t * sh.nh);
                   })

GRPO_SIMD_VARIANTS(backward_rows,
                   (const T* q, const T* k, const T* v, const T* out, const T* lse,
                    const T* gout, const int64_t* seg, const Block* blocks, int64_t stride,
                    Shape sh, T scale, T* dq, T* dk, T* dv, int64_t b0, int64_t b1),
                   const int64_t qs = sh.t * sh.nh * sh.d, ks = sh.t * sh.nkv * sh.d;
                   for (int64_t x = b0; x < b1; ++x) {
                     const int64_t b = blocks[x].b;
                     backward_block(q + b * qs, k + b * ks, v + b * ks, out + b * qs,
                                    lse + b * sh.t * sh.nh, gout + b * qs, seg + b * sh.t,
                                    blocks[x], stride, sh, scale, dq + b * qs, dk + b * ks,
                                    dv + b * ks);
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

}  // namespace

extern "C" {

// A new tensor owned by the caller, or null with `*err` set to a malloc'd message.
at::Tensor* grpo_segment_attention(const at::Tensor* q, const at::Tensor* k, const at::Tensor* v,
                                   const at::Tensor* seg, int64_t stride, char** err) {
  try {
    return new at::Tensor(SegmentAttentionFn::apply(*q, *k, *v, *seg, stride));
  } catch (const std::exception& e) {
    *err = grpo_ffi::copy_message(e);
    return nullptr;
  }
}
}
