// Line attention's bucket as one op for float32 CPU tensors, blocked by hand for AVX2 with FMA (a multiple
// of 8 channels per head, 8 angle channels), built on first use by matris/cpu_kernels.py. Nothing of size
// (g, h, m, L + 1, m) goes through memory: per block row and head, the scores, the sink softmax and the
// value sums over (l, b) stay in vector registers and small buffers while the row's slots stream past.
// The forward, the backward and the double backward; the double backward is the backward's own code run
// on dual numbers.
//
// Rows run per block (g), so each block's outputs are written by one thread; the gradient of the angle
// projection, shared by all blocks, is summed per thread and then reduced.
//
// Shapes: q, k, v, grad (g, m, h, c); qa (g, m, h, W); envelope (g, m, m); angle (g, m, W, m) [a, l, b];
// angle_v (h, W, c), all contiguous. With s_ab = q_a·k_b + Σ_l qa_al θ_alb,
// w_ab = env_ab exp(cap tanh(s_ab / cap)) and α_ab = w_ab / (1 + Σ_b w_ab):
// out_ac = Σ_l A_lc Σ_b α_ab θ_alb v_bc.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <type_traits>
#include <vector>

#include "dual.h"

namespace {

struct Sizes {
  int64_t g, m, h, c, w;
};

constexpr int64_t kW = 8;  // angle channels (L + 1), compile-time so that a row's sums over them fit registers

// the sums of kPass accumulators, stored side by side: eight for F numbers, the tangents of four for D
inline void store_sums(FP p, const F* acc) {
  __m256 x[8];
  for (int i = 0; i < 8; ++i) x[i] = acc[i].x;
  _mm256_storeu_ps(p.x, hsum8(x));
}
inline void store_sums(TP p, const D* acc) {
  const __m256 ab = _mm256_hadd_ps(_mm256_hadd_ps(acc[0].d, acc[1].d), _mm256_hadd_ps(acc[2].d, acc[3].d));
  _mm_storeu_ps(p.d, _mm_add_ps(_mm256_castps256_ps128(ab), _mm256_extractf128_ps(ab, 1)));
}

// count numbers, zero-initialised, behind a pointer of kind P (FP, DP or TP), on 64-byte cache lines: a
// vector stored across two lines cannot be forwarded to the broadcasts that read it back
template <class P> struct Buffer {
  static constexpr int64_t kLine = 16;  // floats per cache line
  int64_t padded;                       // count rounded up to whole lines: where a DP's tangents start
  std::vector<float> data;
  float* base;
  explicit Buffer(int64_t count)
      : padded((count + kLine - 1) / kLine * kLine), data((std::is_same_v<P, DP> ? 2 : 1) * padded + kLine) {
    const auto address = reinterpret_cast<std::uintptr_t>(data.data());
    base = data.data() + ((-address) % 64) / sizeof(float);
  }
  P ptr() {
    if constexpr (std::is_same_v<P, DP>) return {base, base + padded};
    else return {base};
  }
  void clear() { std::fill(data.begin(), data.end(), 0.0f); }
};
inline void copy(FP from, int64_t count, FP to) { std::copy_n(from.x, count, to.x); }
inline void copy(DP from, int64_t count, DP to) {
  std::copy_n(from.x, count, to.x), std::copy_n(from.d, count, to.d);
}
inline void copy(TP from, int64_t count, TP to) { std::copy_n(from.d, count, to.d); }
// The (rows, 8) block at x (rows stride apart) as its (8, mp) transpose at xt, columns past rows zero: eight
// rows at a time through an 8 × 8 register transpose.
inline void transpose8(const float* x, int64_t stride, int64_t rows, float* xt, int64_t mp) {
  for (int64_t b0 = 0; b0 < mp; b0 += 8) {
    __m256 r[8];
    for (int64_t i = 0; i < 8; ++i)
      r[i] = b0 + i < rows ? _mm256_loadu_ps(x + (b0 + i) * stride) : _mm256_setzero_ps();
    const __m256 t0 = _mm256_unpacklo_ps(r[0], r[1]), t1 = _mm256_unpackhi_ps(r[0], r[1]),
                 t2 = _mm256_unpacklo_ps(r[2], r[3]), t3 = _mm256_unpackhi_ps(r[2], r[3]),
                 t4 = _mm256_unpacklo_ps(r[4], r[5]), t5 = _mm256_unpackhi_ps(r[4], r[5]),
                 t6 = _mm256_unpacklo_ps(r[6], r[7]), t7 = _mm256_unpackhi_ps(r[6], r[7]);
    const __m256 s[8] = {_mm256_shuffle_ps(t0, t2, 0x44), _mm256_shuffle_ps(t0, t2, 0xEE),
                         _mm256_shuffle_ps(t1, t3, 0x44), _mm256_shuffle_ps(t1, t3, 0xEE),
                         _mm256_shuffle_ps(t4, t6, 0x44), _mm256_shuffle_ps(t4, t6, 0xEE),
                         _mm256_shuffle_ps(t5, t7, 0x44), _mm256_shuffle_ps(t5, t7, 0xEE)};
    for (int64_t i = 0; i < 4; ++i) {
      _mm256_storeu_ps(xt + i * mp + b0, _mm256_permute2f128_ps(s[i], s[i + 4], 0x20));
      _mm256_storeu_ps(xt + (i + 4) * mp + b0, _mm256_permute2f128_ps(s[i], s[i + 4], 0x31));
    }
  }
}
inline void transpose8(FP x, int64_t stride, int64_t rows, FP xt, int64_t mp) {
  transpose8(x.x, stride, rows, xt.x, mp);
}
inline void transpose8(DP x, int64_t stride, int64_t rows, DP xt, int64_t mp) {
  transpose8(x.x, stride, rows, xt.x, mp), transpose8(x.d, stride, rows, xt.d, mp);
}

// One row and head: scores against the head's kᵀ (kt_h, (c, mp)) and the row's padded angle basis, then
// t = tanh(s / cap), e = exp(cap t), α, and P_lb = α_b θ_alb; returns 1 / (1 + Σ_b w_ab). Padding slots
// have zero envelope, so zero α and P.
template <class N>
Scalar<N> blocked_weights(int64_t c, int64_t mp, float cap, Ptr<N> q_a, Ptr<N> qa_a, Ptr<N> kt_h, Ptr<N> theta_p,
                          Ptr<N> env_p, Ptr<N> t, Ptr<N> e, Ptr<N> alpha, Ptr<N> P) {
  N z = zero<N>();
  for (int64_t j = 0; j < mp; j += 8) {
    // four partial sums: one chain of c + 8 dependent FMAs would wait on their latency
    N p[4] = {zero<N>(), zero<N>(), zero<N>(), zero<N>()};
    for (int64_t ci = 0; ci < c; ci += 4)
      for (int64_t u = 0; u < 4; ++u) p[u] = fma(bcast(q_a + (ci + u)), load(kt_h + ((ci + u) * mp + j)), p[u]);
    for (int64_t l = 0; l < kW; l += 4)
      for (int64_t u = 0; u < 4; ++u) p[u] = fma(bcast(qa_a + (l + u)), load(theta_p + ((l + u) * mp + j)), p[u]);
    const N s = add(add(p[0], p[1]), add(p[2], p[3]));
    const N tj = tanh_over(s, cap);
    const N ej = exp(scale(tj, cap));
    const N w = mul(load(env_p + j), ej);
    store(t + j, tj);
    store(e + j, ej);
    store(alpha + j, w);
    z = add(z, w);
  }
  const Scalar<N> inv = inverse_1p(hsum(z));
  const N vinv = bcast(inv);
  for (int64_t j = 0; j < mp; j += 8) {
    const N a = mul(load(alpha + j), vinv);
    store(alpha + j, a);
    for (int64_t l = 0; l < kW; ++l) store(P + (l * mp + j), mul(a, load(theta_p + (l * mp + j))));
  }
  return inv;
}

// Accumulators per pass over a row's slots: all 8 angle channels for F numbers; 4 for D numbers, whose
// 8 would take all 16 vector registers and spill.
template <class N> constexpr int64_t kPass = std::is_same_v<N, D> ? kW / 2 : kW;

// S_l,chunk = Σ_b P_lb v_b,chunk for one chunk of 8 channels of the head, the sums held in registers.
template <class N>
void blocked_value_sums(int64_t m, int64_t mp, Ptr<N> P, Ptr<N> v_head, int64_t stride, N* S) {
  for (int64_t l0 = 0; l0 < kW; l0 += kPass<N>) {
    Sum<N> acc[kPass<N>];
    for (int64_t b = 0; b < m; ++b) {
      const N vb = load(v_head + b * stride);
      for (int64_t l = 0; l < kPass<N>; ++l) acc[l].add(bcast(P + ((l0 + l) * mp + b)), vb);
    }
    for (int64_t l = 0; l < kPass<N>; ++l) S[l0 + l] = acc[l].value();
  }
}

// out_c = Σ_l A_lc S_lc for one chunk of channels, A's rows c apart: two chains of four
template <class N> N angle_mix(Ptr<N> A, int64_t c, const N* S) {
  N even = zero<N>(), odd = zero<N>();
  for (int64_t l = 0; l < kW; l += 2) {
    even = fma(load(A + l * c), S[l], even);
    odd = fma(load(A + (l + 1) * c), S[l + 1], odd);
  }
  return add(even, odd);
}

// Per block: kᵀ (and vᵀ) of every head, padded to mp columns; per row: the angle basis and envelope padded.
template <class N> struct BlockedBuffers {
  int64_t m, mp;
  Buffer<Ptr<N>> kt, vt, theta_p, env_p, t, e, alpha, P;
  explicit BlockedBuffers(const Sizes& n)
      : m(n.m), mp((n.m + 7) / 8 * 8), kt(n.h * n.c * mp), vt(n.h * n.c * mp), theta_p(kW * mp), env_p(mp),
        t(mp), e(mp), alpha(mp), P(kW * mp) {}  // padding columns are zero and stay zero
  void transpose(const Sizes& n, Ptr<N> x, int64_t gi, Buffer<Ptr<N>>& xt) {
    for (int64_t hi = 0; hi < n.h; ++hi)
      for (int64_t ci = 0; ci < n.c; ci += 8)
        transpose8(x + ((gi * m * n.h + hi) * n.c + ci), n.h * n.c, m, xt.ptr() + (hi * n.c + ci) * mp, mp);
  }
  void load_row(Ptr<N> theta, Ptr<N> env, int64_t gi, int64_t a) {
    for (int64_t l = 0; l < kW; ++l) copy(theta + ((gi * m + a) * kW + l) * m, m, theta_p.ptr() + l * mp);
    copy(env + (gi * m + a) * m, m, env_p.ptr());
  }
};

// The forward: per block row, the angle basis copied once for all heads.
void forward_kernel(const Sizes& n, FP q, FP k, FP v, FP qa, FP env, FP theta, FP A, float cap, FP out) {
  at::parallel_for(0, n.g, 1, [&](int64_t begin, int64_t end) {
    const int64_t m = n.m, h = n.h, c = n.c, stride = h * c;
    BlockedBuffers<F> buf(n);
    for (int64_t gi = begin; gi < end; ++gi) {
      buf.transpose(n, k, gi, buf.kt);
      for (int64_t a = 0; a < m; ++a) {
        buf.load_row(theta, env, gi, a);
        for (int64_t hi = 0; hi < h; ++hi) {
          const int64_t row = ((gi * m + a) * h + hi) * c;
          blocked_weights<F>(c, buf.mp, cap, q + row, qa + ((gi * m + a) * h + hi) * kW,
                             buf.kt.ptr() + hi * c * buf.mp, buf.theta_p.ptr(), buf.env_p.ptr(), buf.t.ptr(),
                             buf.e.ptr(), buf.alpha.ptr(), buf.P.ptr());
          for (int64_t chunk = 0; chunk < c; chunk += 8) {
            F S[kW];
            blocked_value_sums<F>(m, buf.mp, buf.P.ptr(), v + ((gi * m * h + hi) * c + chunk), stride, S);
            store(out + (row + chunk), angle_mix<F>(A + (hi * kW * c + chunk), c, S));
          }
        }
      }
    }
  });
}

// The backward, blocked the same way. On D numbers it is the double backward, and it also writes the
// forward output's tangent to out_tangent.
template <class N>
void backward_kernel(const Sizes& n, const float* grad, Ptr<N> q, Ptr<N> k, Ptr<N> v, Ptr<N> qa, Ptr<N> env,
                     Ptr<N> theta, Ptr<N> A, float cap, Out<N> gq, Out<N> gk, Out<N> gv, Out<N> gqa,
                     Out<N> genv, Out<N> gtheta, Out<N> gA_threads, float* out_tangent) {
  at::parallel_for(0, n.g, 1, [&](int64_t begin, int64_t end) {
    const int64_t m = n.m, h = n.h, c = n.c, stride = h * c;
    const Out<N> gA = gA_threads + at::get_thread_num() * h * kW * c;
    BlockedBuffers<N> buf(n);
    const int64_t mp = buf.mp;
    Buffer<Ptr<N>> GA_(kW * c), galpha_(mp), gs_(mp);
    Buffer<Out<N>> gtheta_(kW * mp), genv_(mp);
    const Ptr<N> GA = GA_.ptr(), galpha = galpha_.ptr(), gs = gs_.ptr(), theta_p = buf.theta_p.ptr(),
                 env_p = buf.env_p.ptr(), P = buf.P.ptr();
    const Out<N> gtheta_p = gtheta_.ptr(), genv_p = genv_.ptr();
    for (int64_t gi = begin; gi < end; ++gi) {
      buf.transpose(n, k, gi, buf.kt);
      buf.transpose(n, v, gi, buf.vt);
      for (int64_t a = 0; a < m; ++a) {
        buf.load_row(theta, env, gi, a);
        gtheta_.clear();
        genv_.clear();
        for (int64_t hi = 0; hi < h; ++hi) {
          const int64_t row = ((gi * m + a) * h + hi) * c, qa_row = ((gi * m + a) * h + hi) * kW;
          const int64_t head = (gi * m * h + hi) * c;  // element (gi, 0, hi, 0)
          const Scalar<N> inv = blocked_weights<N>(c, mp, cap, q + row, qa + qa_row, buf.kt.ptr() + hi * c * mp,
                                                   theta_p, env_p, buf.t.ptr(), buf.e.ptr(), buf.alpha.ptr(), P);
          // ∂/∂A_lc += G_ac S_lc; GA_lc = A_lc G_ac (and, on D numbers, out_ac = Σ_l A_lc S_lc)
          for (int64_t chunk = 0; chunk < c; chunk += 8) {
            N S[kW];
            blocked_value_sums<N>(m, mp, P, v + (head + chunk), stride, S);
            const N G = constant<N>(_mm256_loadu_ps(grad + row + chunk));
            if constexpr (std::is_same_v<N, D>) {
              _mm256_storeu_ps(out_tangent + row + chunk, angle_mix<N>(A + (hi * kW * c + chunk), c, S).d);
            }
            for (int64_t l = 0; l < kW; ++l) {
              const Out<N> gAl = gA + ((hi * kW + l) * c + chunk);
              store(gAl, fma(G, S[l], load(gAl)));
              store(GA + (l * c + chunk), mul(load(A + ((hi * kW + l) * c + chunk)), G));
            }
          }
          // D_lb = Σ_c GA_lc v_bc; ∂/∂α_b = Σ_l θ_alb D_lb; ∂/∂θ_alb += α_b D_lb
          N dot = zero<N>();
          for (int64_t j = 0; j < mp; j += 8) {
            const N alpha = load(buf.alpha.ptr() + j);
            N ga = zero<N>();
            for (int64_t l0 = 0; l0 < kW; l0 += kPass<N>) {
              Sum<N> sums[kPass<N>];
              for (int64_t ci = 0; ci < c; ++ci) {
                const N vc = load(buf.vt.ptr() + ((hi * c + ci) * mp + j));
                for (int64_t l = 0; l < kPass<N>; ++l) sums[l].add(bcast(GA + ((l0 + l) * c + ci)), vc);
              }
              for (int64_t l = 0; l < kPass<N>; ++l) {
                const N Dl = sums[l].value();
                ga = fma(load(theta_p + ((l0 + l) * mp + j)), Dl, ga);
                const Out<N> gt = gtheta_p + ((l0 + l) * mp + j);
                store(gt, fma(alpha, Dl, load(gt)));
              }
            }
            store(galpha + j, ga);
            dot = fma(ga, alpha, dot);
          }
          // ∂/∂v_bc += Σ_l P_lb GA_lc: per chunk, GA's rows wait in registers (kPass of them per pass) while
          // the slots stream past, each slot's sum split in two chains
          for (int64_t chunk = 0; chunk < c; chunk += 8)
            for (int64_t l0 = 0; l0 < kW; l0 += kPass<N>) {
              N ga[kPass<N>];
              for (int64_t l = 0; l < kPass<N>; ++l) ga[l] = load(GA + ((l0 + l) * c + chunk));
              for (int64_t b = 0; b < m; ++b) {
                const Out<N> gvb = gv + (head + b * stride + chunk);
                N even = load(gvb), odd = zero<N>();
                for (int64_t l = 0; l < kPass<N>; l += 2) {
                  even = fma(bcast(P + ((l0 + l) * mp + b)), ga[l], even);
                  odd = fma(bcast(P + ((l0 + l + 1) * mp + b)), ga[l + 1], odd);
                }
                store(gvb, add(even, odd));
              }
            }
          // through the sink softmax and the capped exponential
          const N vdot = bcast(hsum(dot)), vinv = bcast(inv);
          for (int64_t j = 0; j < mp; j += 8) {
            const N e = load(buf.e.ptr() + j), t = load(buf.t.ptr() + j);
            const N gw = mul(sub(load(galpha + j), vdot), vinv);
            store(genv_p + j, fma(gw, e, load(genv_p + j)));
            store(gs + j, mul(mul(gw, load(env_p + j)), mul(e, one_minus_square(t))));
          }
          // ∂/∂qa_al = Σ_b gs_b θ_alb; ∂/∂θ_alb += gs_b qa_al
          for (int64_t l0 = 0; l0 < kW; l0 += kPass<N>) {
            N gqa_acc[kPass<N>];
            for (int64_t l = 0; l < kPass<N>; ++l) gqa_acc[l] = zero<N>();
            for (int64_t j = 0; j < mp; j += 8) {
              const N g = load(gs + j);
              for (int64_t l = 0; l < kPass<N>; ++l) {
                gqa_acc[l] = fma(g, load(theta_p + ((l0 + l) * mp + j)), gqa_acc[l]);
                const Out<N> gt = gtheta_p + ((l0 + l) * mp + j);
                store(gt, fma(g, bcast(qa + (qa_row + l0 + l)), load(gt)));
              }
            }
            store_sums(gqa + (qa_row + l0), gqa_acc);
          }
          // ∂/∂q_a = Σ_b gs_b k_b; ∂/∂k_b += gs_b q_a
          for (int64_t chunk = 0; chunk < c; chunk += 8) {
            const N qh = load(q + (row + chunk));
            auto slot = [&](int64_t b, N& acc) {
              const N g = bcast(gs + b);
              acc = fma(g, load(k + (head + b * stride + chunk)), acc);
              const Out<N> gkb = gk + (head + b * stride + chunk);
              store(gkb, fma(g, qh, load(gkb)));
            };
            N even = zero<N>(), odd = zero<N>();  // two chains: even and odd slots
            int64_t b = 0;
            for (; b + 1 < m; b += 2) slot(b, even), slot(b + 1, odd);
            if (b < m) slot(b, even);
            store(gq + (row + chunk), add(even, odd));
          }
        }
        for (int64_t l = 0; l < kW; ++l) copy(gtheta_p + l * mp, m, gtheta + ((gi * m + a) * kW + l) * m);
        copy(genv_p, m, genv + (gi * m + a) * m);
      }
    }
  });
}

FP f_ptr(const torch::Tensor& x) { return {x.data_ptr<float>()}; }
DP d_ptr(const torch::Tensor& x, const torch::Tensor& tangent) {
  return {x.data_ptr<float>(), tangent.data_ptr<float>()};
}

// The kernels index raw data pointers: anything but contiguous float32 CPU tensors would be read wrongly.
Sizes checked_sizes(const torch::Tensor& q, const torch::Tensor& qa, std::initializer_list<torch::Tensor> all) {
  for (const auto& x : all)
    TORCH_CHECK(x.scalar_type() == torch::kFloat && x.device().is_cpu() && x.is_contiguous(),
                "line attention kernel: contiguous float32 CPU tensors only");
  const Sizes n{q.size(0), q.size(1), q.size(2), q.size(3), qa.size(3)};
  TORCH_CHECK(n.c % 8 == 0 && n.w == kW,
              "line attention kernel: a multiple of 8 channels per head and 8 angle channels only");
  return n;
}

}  // namespace

namespace matris_ops {

torch::Tensor line_forward(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor qa, torch::Tensor env,
                      torch::Tensor theta, torch::Tensor A, double cap) {
  const Sizes n = checked_sizes(q, qa, {q, k, v, qa, env, theta, A});
  auto out = torch::empty_like(q);
  forward_kernel(n, f_ptr(q), f_ptr(k), f_ptr(v), f_ptr(qa), f_ptr(env), f_ptr(theta), f_ptr(A),
                 static_cast<float>(cap), f_ptr(out));
  return out;
}

std::vector<torch::Tensor> line_backward(torch::Tensor grad, torch::Tensor q, torch::Tensor k, torch::Tensor v,
                                    torch::Tensor qa, torch::Tensor env, torch::Tensor theta, torch::Tensor A,
                                    double cap) {
  const Sizes n = checked_sizes(q, qa, {grad, q, k, v, qa, env, theta, A});
  auto gq = torch::empty_like(q), gk = torch::zeros_like(k), gv = torch::zeros_like(v);
  auto gqa = torch::empty_like(qa), genv = torch::empty_like(env), gtheta = torch::empty_like(theta);
  auto gA = torch::zeros({at::get_num_threads(), n.h, n.w, n.c}, A.options());
  backward_kernel<F>(n, grad.data_ptr<float>(), f_ptr(q), f_ptr(k), f_ptr(v), f_ptr(qa), f_ptr(env), f_ptr(theta),
                     f_ptr(A), static_cast<float>(cap), f_ptr(gq), f_ptr(gk), f_ptr(gv), f_ptr(gqa), f_ptr(genv),
                     f_ptr(gtheta), f_ptr(gA), nullptr);
  return {gq, gk, gv, gqa, genv, gtheta, gA.sum(0)};
}

// The vjp of backward for cotangents u of its seven outputs: the gradients of G and of the seven inputs, as
// the backward run on dual numbers whose tangents are u.
std::vector<torch::Tensor> line_double_backward(torch::Tensor grad, torch::Tensor q, torch::Tensor k, torch::Tensor v,
                                           torch::Tensor qa, torch::Tensor env, torch::Tensor theta,
                                           torch::Tensor A, torch::Tensor uq, torch::Tensor uk, torch::Tensor uv,
                                           torch::Tensor uqa, torch::Tensor uenv, torch::Tensor utheta,
                                           torch::Tensor uA, double cap) {
  const Sizes n = checked_sizes(q, qa, {grad, q, k, v, qa, env, theta, A, uq, uk, uv, uqa, uenv, utheta, uA});
  std::vector<torch::Tensor> tangents;  // of gq, gk, gv, gqa, genv, gtheta, gA: the double backward's output
  for (const auto& x : {q, k, v, qa, env, theta}) tangents.push_back(torch::zeros_like(x));
  tangents.push_back(torch::zeros({at::get_num_threads(), n.h, n.w, n.c}, A.options()));
  auto ggrad = torch::empty_like(q);
  auto out = [&](int i) { return TP{tangents[i].data_ptr<float>()}; };
  backward_kernel<D>(n, grad.data_ptr<float>(), d_ptr(q, uq), d_ptr(k, uk), d_ptr(v, uv), d_ptr(qa, uqa),
                     d_ptr(env, uenv), d_ptr(theta, utheta), d_ptr(A, uA), static_cast<float>(cap), out(0), out(1),
                     out(2), out(3), out(4), out(5), out(6), ggrad.data_ptr<float>());
  tangents[6] = tangents[6].sum(0);
  tangents.insert(tangents.begin(), ggrad);
  return tangents;
}

}  // namespace matris_ops
