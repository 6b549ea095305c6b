// Prototype of a fused line-attention bucket for the CPU, forward and backward, measured against the
// model's bmm form by bench_line_kernel.py. Plain loops per (block, head, row), vectorised by the compiler
// (-O3 -march=native -ffast-math, exp and tanh from glibc's libmvec), nothing of size (g, h, m, L + 1, m)
// in memory. It is not used by the model: it runs at parity with the bmm form, not the 4x that the 40 %
// FLOP-efficiency target needs (benchmarks/README.md), and it has no double backward.
//
// Loops run per block (g), so each block's outputs are written by one thread; the gradient of the angle
// projection, shared by all blocks, is summed per thread and then reduced.
//
// Shapes: q, k, v, grad (g, m, h, c); qa (g, m, h, W); envelope (g, m, m); angle (g, m, W, m) [a, l, b];
// angle_v (h, W, c). With s_ab = q_a·k_b + Σ_l qa_al θ_alb, w_ab = env_ab exp(cap tanh(s_ab / cap)) and
// α_ab = w_ab / (1 + Σ_b w_ab): out_ac = Σ_l A_lc Σ_b α_ab θ_alb v_bc.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <vector>

namespace {

struct Sizes {
  int64_t g, m, h, c, w;
};

// Scores, weights and α of row a of one block and head (kt: kᵀ of the head, (c, m)); keeps
// t = tanh(s / cap) and e = exp(cap t) for the backward and returns 1 / (1 + Σ_b w_ab).
template <typename T>
T attention_row(const Sizes& n, const T* qa_row, const T* q_row, const T* kt, const T* theta_a,
                const T* env_a, T cap, T* s, T* t, T* e, T* alpha) {
  const int64_t m = n.m;
  for (int64_t b = 0; b < m; ++b) s[b] = 0;
  for (int64_t ci = 0; ci < n.c; ++ci) {
    const T qc = q_row[ci];
    const T* kc = kt + ci * m;
    for (int64_t b = 0; b < m; ++b) s[b] += qc * kc[b];
  }
  for (int64_t l = 0; l < n.w; ++l) {
    const T ql = qa_row[l];
    const T* th = theta_a + l * m;
    for (int64_t b = 0; b < m; ++b) s[b] += ql * th[b];
  }
  const T inv_cap = T(1) / cap;
  T z = 0;
  for (int64_t b = 0; b < m; ++b) {
    t[b] = std::tanh(s[b] * inv_cap);
    e[b] = std::exp(cap * t[b]);
    alpha[b] = env_a[b] * e[b];
    z += alpha[b];
  }
  const T inv = T(1) / (1 + z);
  for (int64_t b = 0; b < m; ++b) alpha[b] *= inv;
  return inv;
}

// S_lc = Σ_b α_b θ_alb v_bc, with v of the head (row stride h c).
template <typename T>
void angle_sums(const Sizes& n, const T* alpha, const T* theta_a, const T* v_head, T* S) {
  const int64_t m = n.m, c = n.c, stride = n.h * n.c;
  for (int64_t i = 0; i < n.w * c; ++i) S[i] = 0;
  for (int64_t b = 0; b < m; ++b) {
    const T* vb = v_head + b * stride;
    for (int64_t l = 0; l < n.w; ++l) {
      const T coef = alpha[b] * theta_a[l * m + b];
      T* Sl = S + l * c;
      for (int64_t ci = 0; ci < c; ++ci) Sl[ci] += coef * vb[ci];
    }
  }
}

template <typename T>
void transpose_head(const Sizes& n, const T* x_head, T* xt) {
  const int64_t stride = n.h * n.c;
  for (int64_t b = 0; b < n.m; ++b)
    for (int64_t ci = 0; ci < n.c; ++ci) xt[ci * n.m + b] = x_head[b * stride + ci];
}

template <typename T>
void forward_kernel(const Sizes& n, const T* q, const T* k, const T* v, const T* qa, const T* env,
                    const T* theta, const T* A, T cap, T* out) {
  at::parallel_for(0, n.g, 1, [&](int64_t begin, int64_t end) {
    const int64_t m = n.m, c = n.c, h = n.h, w = n.w;
    std::vector<T> kt(c * m), s(m), t(m), e(m), alpha(m), S(w * c);
    for (int64_t gi = begin; gi < end; ++gi) {
      for (int64_t hi = 0; hi < h; ++hi) {
        const int64_t head = gi * m * h * c + hi * c;  // element (gi, 0, hi, 0) of q, k, v and out
        transpose_head(n, k + head, kt.data());
        for (int64_t a = 0; a < m; ++a) {
          const T* theta_a = theta + (gi * m + a) * w * m;
          attention_row(n, qa + ((gi * m + a) * h + hi) * w, q + head + a * h * c, kt.data(), theta_a,
                        env + (gi * m + a) * m, cap, s.data(), t.data(), e.data(), alpha.data());
          angle_sums(n, alpha.data(), theta_a, v + head, S.data());
          T* o = out + head + a * h * c;
          const T* Ah = A + hi * w * c;
          for (int64_t ci = 0; ci < c; ++ci) o[ci] = 0;
          for (int64_t l = 0; l < w; ++l)
            for (int64_t ci = 0; ci < c; ++ci) o[ci] += Ah[l * c + ci] * S[l * c + ci];
        }
      }
    }
  });
}

template <typename T>
void backward_kernel(const Sizes& n, const T* grad, const T* q, const T* k, const T* v, const T* qa,
                     const T* env, const T* theta, const T* A, T cap, T* gq, T* gk, T* gv, T* gqa,
                     T* genv, T* gtheta, T* gA_threads) {
  at::parallel_for(0, n.g, 1, [&](int64_t begin, int64_t end) {
    const int64_t m = n.m, c = n.c, h = n.h, w = n.w;
    T* gA = gA_threads + at::get_thread_num() * h * w * c;
    std::vector<T> kt(c * m), vt(c * m), s(m), t(m), e(m), alpha(m), S(w * c), GA(w * c), D(w * m),
        galpha(m), gs(m);
    for (int64_t gi = begin; gi < end; ++gi) {
      for (int64_t hi = 0; hi < h; ++hi) {
        const int64_t head = gi * m * h * c + hi * c;
        transpose_head(n, k + head, kt.data());
        transpose_head(n, v + head, vt.data());
        const T* Ah = A + hi * w * c;
        T* gAh = gA + hi * w * c;
        for (int64_t a = 0; a < m; ++a) {
          const int64_t row = head + a * h * c, qa_row = ((gi * m + a) * h + hi) * w;
          const T* theta_a = theta + (gi * m + a) * w * m;
          const T* env_a = env + (gi * m + a) * m;
          T* gtheta_a = gtheta + (gi * m + a) * w * m;
          const T inv = attention_row(n, qa + qa_row, q + row, kt.data(), theta_a, env_a, cap, s.data(),
                                      t.data(), e.data(), alpha.data());
          angle_sums(n, alpha.data(), theta_a, v + head, S.data());
          const T* Ga = grad + row;
          for (int64_t l = 0; l < w; ++l)
            for (int64_t ci = 0; ci < c; ++ci) {
              gAh[l * c + ci] += Ga[ci] * S[l * c + ci];
              GA[l * c + ci] = Ah[l * c + ci] * Ga[ci];
            }
          // D_lb = Σ_c GA_lc v_bc, then ∂/∂α_b = Σ_l θ_alb D_lb and ∂/∂θ_alb += α_b D_lb
          for (int64_t i = 0; i < w * m; ++i) D[i] = 0;
          for (int64_t l = 0; l < w; ++l)
            for (int64_t ci = 0; ci < c; ++ci) {
              const T gl = GA[l * c + ci];
              const T* vc = vt.data() + ci * m;
              T* Dl = D.data() + l * m;
              for (int64_t b = 0; b < m; ++b) Dl[b] += gl * vc[b];
            }
          for (int64_t b = 0; b < m; ++b) galpha[b] = 0;
          for (int64_t l = 0; l < w; ++l)
            for (int64_t b = 0; b < m; ++b) {
              galpha[b] += theta_a[l * m + b] * D[l * m + b];
              gtheta_a[l * m + b] += alpha[b] * D[l * m + b];
            }
          // ∂/∂v_bc += α_b Σ_l θ_alb GA_lc
          for (int64_t b = 0; b < m; ++b) {
            T* gvb = gv + head + b * h * c;
            for (int64_t l = 0; l < w; ++l) {
              const T coef = alpha[b] * theta_a[l * m + b];
              for (int64_t ci = 0; ci < c; ++ci) gvb[ci] += coef * GA[l * c + ci];
            }
          }
          // through the sink softmax and the capped exponential to the scores and the envelope
          T dot = 0;
          for (int64_t b = 0; b < m; ++b) dot += galpha[b] * alpha[b];
          for (int64_t b = 0; b < m; ++b) {
            const T gw = (galpha[b] - dot) * inv;
            genv[(gi * m + a) * m + b] += gw * e[b];
            gs[b] = gw * env_a[b] * e[b] * (1 - t[b] * t[b]);
          }
          for (int64_t l = 0; l < w; ++l) {
            const T ql = qa[qa_row + l];
            T acc = 0;
            for (int64_t b = 0; b < m; ++b) {
              acc += gs[b] * theta_a[l * m + b];
              gtheta_a[l * m + b] += gs[b] * ql;
            }
            gqa[qa_row + l] = acc;
          }
          T* gq_row = gq + row;
          const T* q_row = q + row;
          for (int64_t ci = 0; ci < c; ++ci) gq_row[ci] = 0;
          for (int64_t b = 0; b < m; ++b) {
            const T* kb = k + head + b * h * c;
            T* gkb = gk + head + b * h * c;
            for (int64_t ci = 0; ci < c; ++ci) {
              gq_row[ci] += gs[b] * kb[ci];
              gkb[ci] += gs[b] * q_row[ci];
            }
          }
        }
      }
    }
  });
}

Sizes sizes_of(const torch::Tensor& q, const torch::Tensor& qa) {
  return {q.size(0), q.size(1), q.size(2), q.size(3), qa.size(3)};
}

torch::Tensor forward(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor qa, torch::Tensor env,
                      torch::Tensor theta, torch::Tensor A, double cap) {
  const Sizes n = sizes_of(q, qa);
  auto out = torch::empty_like(q);
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "line_attention_forward", [&] {
    forward_kernel<scalar_t>(n, q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(),
                             qa.data_ptr<scalar_t>(), env.data_ptr<scalar_t>(), theta.data_ptr<scalar_t>(),
                             A.data_ptr<scalar_t>(), static_cast<scalar_t>(cap), out.data_ptr<scalar_t>());
  });
  return out;
}

std::vector<torch::Tensor> backward(torch::Tensor grad, torch::Tensor q, torch::Tensor k, torch::Tensor v,
                                    torch::Tensor qa, torch::Tensor env, torch::Tensor theta, torch::Tensor A,
                                    double cap) {
  const Sizes n = sizes_of(q, qa);
  auto gq = torch::empty_like(q), gk = torch::zeros_like(k), gv = torch::zeros_like(v);
  auto gqa = torch::empty_like(qa), genv = torch::zeros_like(env), gtheta = torch::zeros_like(theta);
  auto gA = torch::zeros({at::get_num_threads(), n.h, n.w, n.c}, A.options());
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "line_attention_backward", [&] {
    backward_kernel<scalar_t>(n, grad.data_ptr<scalar_t>(), q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(),
                              v.data_ptr<scalar_t>(), qa.data_ptr<scalar_t>(), env.data_ptr<scalar_t>(),
                              theta.data_ptr<scalar_t>(), A.data_ptr<scalar_t>(), static_cast<scalar_t>(cap),
                              gq.data_ptr<scalar_t>(), gk.data_ptr<scalar_t>(), gv.data_ptr<scalar_t>(),
                              gqa.data_ptr<scalar_t>(), genv.data_ptr<scalar_t>(), gtheta.data_ptr<scalar_t>(),
                              gA.data_ptr<scalar_t>());
  });
  return {gq, gk, gv, gqa, genv, gtheta, gA.sum(0)};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &forward, "fused line-attention bucket, forward (contiguous inputs)");
  m.def("backward", &backward, "fused line-attention bucket, backward (contiguous inputs)");
}
