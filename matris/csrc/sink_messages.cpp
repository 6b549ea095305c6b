// An attention sum's per-edge terms as one op for float32 CPU tensors (matris.fused.sink_messages): per
// edge and head, w = env exp(cap tanh(q·k / cap)) and the messages [w v | w]. The forward, the backward and
// the double backward (the backward on dual numbers, dual.h), each one pass over the edges with the eight
// heads of a group in the lanes of a vector: scores, tanh and exp run once per edge and group, not per head.
//
// Shapes: q (e, h, c); kv (e, 2 h c), keys then values; envelope (e,); grad and messages (e, h, c + 1); all
// contiguous, c a multiple of 8.

#include <ATen/Parallel.h>

#include <initializer_list>
#include <type_traits>
#include <utility>
#include <vector>

#include "dual.h"

namespace {

struct EdgeSizes {
  int64_t e, h, c;
};

// per-head scalars of a group of eight heads, as lanes (x, and d for D numbers)
template <class N> struct Lanes {
  alignas(32) float x[8], d[8];
  Ptr<N> ptr() {
    if constexpr (std::is_same_v<N, D>) return {x, d};
    else return {x};
  }
};

inline void store_sum(FP p, F a) { *p.x = hsum(a.x); }
inline void store_sum(TP p, D a) { *p.d = hsum(a.d); }

// lane i = the total of sums[i], for a group of eight heads
template <class N> N lane_totals(const Sum<N>* sums) {
  __m256 x[8], d[8];
  for (int64_t i = 0; i < 8; ++i) {
    const N s = sums[i].value();
    x[i] = s.x;
    if constexpr (std::is_same_v<N, D>) d[i] = s.d;
  }
  if constexpr (std::is_same_v<N, D>) return {hsum8(x), hsum8(d)};
  else return {hsum8(x)};
}

// q·k of each head of the group starting at head h0 (lanes past the last head are zero)
template <class N> N group_scores(const EdgeSizes& n, Ptr<N> q, Ptr<N> k, int64_t h0) {
  Sum<N> dots[8];
  for (int64_t i = 0; i < 8 && h0 + i < n.h; ++i)
    for (int64_t ch = 0; ch < n.c; ch += 8) {
      const int64_t at = (h0 + i) * n.c + ch;
      dots[i].add(load(q + at), load(k + at));
    }
  return lane_totals(dots);
}

void forward_kernel(const EdgeSizes& n, FP q, FP kv, FP env, float cap, FP out) {
  at::parallel_for(0, n.e, 64, [&](int64_t begin, int64_t end) {
    const int64_t hc = n.h * n.c, width = n.c + 1;
    Lanes<F> w;
    for (int64_t e = begin; e < end; ++e) {
      const FP qe = q + e * hc, ke = kv + e * 2 * hc, ve = ke + hc, oe = out + e * n.h * width;
      for (int64_t h0 = 0; h0 < n.h; h0 += 8) {
        const F t = tanh_over(group_scores<F>(n, qe, ke, h0), cap);
        _mm256_store_ps(w.x, mul(bcast(env + e), exp(scale(t, cap))).x);
        for (int64_t i = 0; i < 8 && h0 + i < n.h; ++i) {
          const F wi = bcast(w.x[i]);
          const int64_t head = (h0 + i) * n.c, row = (h0 + i) * width;
          for (int64_t ch = 0; ch < n.c; ch += 8) store(oe + (row + ch), mul(wi, load(ve + (head + ch))));
          oe.x[row + n.c] = w.x[i];
        }
      }
    }
  });
}

// The backward; on D numbers the double backward, which also writes the forward output's tangent.
template <class N>
void backward_kernel(const EdgeSizes& n, const float* grad, Ptr<N> q, Ptr<N> kv, Ptr<N> env, float cap,
                     Out<N> gq, Out<N> gkv, Out<N> genv, float* out_tangent) {
  at::parallel_for(0, n.e, 64, [&](int64_t begin, int64_t end) {
    const int64_t hc = n.h * n.c, width = n.c + 1;
    Lanes<N> w, gs;
    for (int64_t e = begin; e < end; ++e) {
      const Ptr<N> qe = q + e * hc, ke = kv + e * 2 * hc, ve = ke + hc;
      const Out<N> gqe = gq + e * hc, gke = gkv + e * 2 * hc, gve = gke + hc;
      const float* ge = grad + e * n.h * width;
      float* tangent_e = out_tangent ? out_tangent + e * n.h * width : nullptr;  // D numbers only
      const N envelope = bcast(env + e);
      N genv_sum = zero<N>();
      for (int64_t h0 = 0; h0 < n.h; h0 += 8) {
        const N t = tanh_over(group_scores<N>(n, qe, ke, h0), cap);
        const N ex = exp(scale(t, cap));
        store(w.ptr(), mul(envelope, ex));
        // gw = Σ_c G_c v_c + G_w per head; ∂/∂v = w G (and, on D numbers, the output's tangent)
        Sum<N> gv_dots[8];
        alignas(32) float g_last[8] = {};
        for (int64_t i = 0; i < 8 && h0 + i < n.h; ++i) {
          const int64_t head = (h0 + i) * n.c, row = (h0 + i) * width;
          const N wi = bcast(w.ptr() + i);
          g_last[i] = ge[row + n.c];
          for (int64_t ch = 0; ch < n.c; ch += 8) {
            const N G = constant<N>(_mm256_loadu_ps(ge + row + ch)), vc = load(ve + (head + ch));
            gv_dots[i].add(G, vc);
            store(gve + (head + ch), mul(wi, G));
            if constexpr (std::is_same_v<N, D>) _mm256_storeu_ps(tangent_e + row + ch, mul(wi, vc).d);
          }
          if constexpr (std::is_same_v<N, D>) tangent_e[row + n.c] = w.d[i];
        }
        const N gw = add(lane_totals(gv_dots), constant<N>(_mm256_load_ps(g_last)));
        // through w = env exp(cap tanh(s / cap)): ∂/∂env = Σ_heads gw e, ∂/∂s = gw env e (1 - t²)
        genv_sum = fma(gw, ex, genv_sum);
        store(gs.ptr(), mul(mul(gw, envelope), mul(ex, one_minus_square(t))));
        // ∂/∂q = gs k, ∂/∂k = gs q
        for (int64_t i = 0; i < 8 && h0 + i < n.h; ++i) {
          const N gsi = bcast(gs.ptr() + i);
          const int64_t head = (h0 + i) * n.c;
          for (int64_t ch = 0; ch < n.c; ch += 8) {
            store(gqe + (head + ch), mul(gsi, load(ke + (head + ch))));
            store(gke + (head + ch), mul(gsi, load(qe + (head + ch))));
          }
        }
      }
      store_sum(genv + e, genv_sum);
    }
  });
}

// The kernels index raw data pointers: anything but contiguous float32 CPU tensors of these shapes would be
// read wrongly.
EdgeSizes checked_sizes(const torch::Tensor& q, const torch::Tensor& kv, const torch::Tensor& env,
                        std::initializer_list<torch::Tensor> all) {
  for (const auto& x : all)
    TORCH_CHECK(x.scalar_type() == torch::kFloat && x.device().is_cpu() && x.is_contiguous(),
                "sink messages kernel: contiguous float32 CPU tensors only");
  TORCH_CHECK(q.dim() == 3, "sink messages kernel: q must be (edges, heads, channels)");
  const EdgeSizes n{q.size(0), q.size(1), q.size(2)};
  TORCH_CHECK(n.c % 8 == 0, "sink messages kernel: a multiple of 8 channels per head only");
  TORCH_CHECK(kv.dim() == 2 && kv.size(0) == n.e && kv.size(1) == 2 * n.h * n.c && env.numel() == n.e,
              "sink messages kernel: kv must be (edges, 2 heads channels) and envelope (edges,)");
  return n;
}

void check_grad(const torch::Tensor& grad, const EdgeSizes& n) {
  TORCH_CHECK(grad.dim() == 3 && grad.size(0) == n.e && grad.size(1) == n.h && grad.size(2) == n.c + 1,
              "sink messages kernel: grad must be (edges, heads, channels + 1)");
}

void check_same_shapes(std::initializer_list<std::pair<torch::Tensor, torch::Tensor>> pairs) {
  for (const auto& [x, y] : pairs)
    TORCH_CHECK(x.sizes() == y.sizes(), "sink messages kernel: a gradient's shape differs from its input's");
}

FP f_ptr(const torch::Tensor& x) { return {x.data_ptr<float>()}; }

}  // namespace

namespace matris_ops {

torch::Tensor sink_forward(torch::Tensor q, torch::Tensor kv, torch::Tensor env, double cap) {
  const EdgeSizes n = checked_sizes(q, kv, env, {q, kv, env});
  auto out = torch::empty({n.e, n.h, n.c + 1}, q.options());
  forward_kernel(n, f_ptr(q), f_ptr(kv), f_ptr(env), static_cast<float>(cap), f_ptr(out));
  return out;
}

std::vector<torch::Tensor> sink_backward(torch::Tensor grad, torch::Tensor q, torch::Tensor kv,
                                         torch::Tensor env, double cap) {
  const EdgeSizes n = checked_sizes(q, kv, env, {grad, q, kv, env});
  check_grad(grad, n);
  auto gq = torch::empty_like(q), gkv = torch::empty_like(kv), genv = torch::empty_like(env);
  backward_kernel<F>(n, grad.data_ptr<float>(), f_ptr(q), f_ptr(kv), f_ptr(env), static_cast<float>(cap),
                     f_ptr(gq), f_ptr(gkv), f_ptr(genv), nullptr);
  return {gq, gkv, genv};
}

// The vjp of sink_backward for cotangents u of its three outputs: the gradients of G and of q, kv, env.
std::vector<torch::Tensor> sink_double_backward(torch::Tensor grad, torch::Tensor q, torch::Tensor kv,
                                                torch::Tensor env, torch::Tensor uq, torch::Tensor ukv,
                                                torch::Tensor uenv, double cap) {
  const EdgeSizes n = checked_sizes(q, kv, env, {grad, q, kv, env, uq, ukv, uenv});
  check_grad(grad, n);
  check_same_shapes({{uq, q}, {ukv, kv}, {uenv, env}});
  auto ggrad = torch::empty_like(grad), gq = torch::empty_like(q), gkv = torch::empty_like(kv);
  auto genv = torch::empty_like(env);
  auto dual = [](const torch::Tensor& x, const torch::Tensor& u) {
    return DP{x.data_ptr<float>(), u.data_ptr<float>()};
  };
  auto out = [](const torch::Tensor& x) { return TP{x.data_ptr<float>()}; };
  backward_kernel<D>(n, grad.data_ptr<float>(), dual(q, uq), dual(kv, ukv), dual(env, uenv),
                     static_cast<float>(cap), out(gq), out(gkv), out(genv), ggrad.data_ptr<float>());
  return {ggrad, gq, gkv, genv};
}

}  // namespace matris_ops
