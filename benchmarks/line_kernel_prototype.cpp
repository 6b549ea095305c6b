// Prototypes of a fused line-attention bucket for the CPU, measured against the model's bmm form by
// bench_line_kernel.py; nothing of size (g, h, m, L + 1, m) goes through memory. Not used by the model.
// - forward, backward: plain loops per (block, head, row), vectorised by the compiler (-O3 -march=native
//   -ffast-math, exp and tanh from glibc's libmvec). They run at parity with the bmm form or below.
// - forward_blocked: the forward with AVX2 intrinsics, float32, c = 16 and L + 1 = 8 only, a row's value
//   sums held in vector registers. No backward and no double backward yet.
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

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>

extern "C" __m256 _ZGVdN8v_expf(__m256);   // glibc's libmvec, 8 floats at a time

// The forward for float, c = 16 and L + 1 = 8 (matris-6l), blocked by hand for AVX2: per row and head,
// the 8 × 16 value sums live in 8 vector registers per half of c while the row's m slots stream past,
// each slot one load of v and 8 broadcast FMAs; the row's angle basis is copied once for all heads.
void forward_blocked_kernel(const Sizes& n, const float* q, const float* k, const float* v, const float* qa,
                            const float* env, const float* theta, const float* A, float cap, float* out) {
  constexpr int64_t c = 16, w = 8;
  at::parallel_for(0, n.g, 1, [&](int64_t begin, int64_t end) {
    const int64_t m = n.m, h = n.h, mp = (m + 7) / 8 * 8, nv = mp / 8;
    std::vector<float> kt(h * c * mp), theta_p(w * mp), env_p(mp), s(mp), P(w * mp);
    const __m256 two_inv_cap = _mm256_set1_ps(2 / cap), vcap = _mm256_set1_ps(cap);
    const __m256 one = _mm256_set1_ps(1.0f), two = _mm256_set1_ps(2.0f);
    for (int64_t gi = begin; gi < end; ++gi) {  // the padding columns (b >= m) of every buffer stay zero
      for (int64_t b = 0; b < m; ++b)
        for (int64_t hi = 0; hi < h; ++hi)
          for (int64_t ci = 0; ci < c; ++ci) kt[(hi * c + ci) * mp + b] = k[((gi * m + b) * h + hi) * c + ci];
      for (int64_t a = 0; a < m; ++a) {
        for (int64_t l = 0; l < w; ++l)
          std::copy_n(theta + ((gi * m + a) * w + l) * m, m, theta_p.data() + l * mp);
        std::copy_n(env + (gi * m + a) * m, m, env_p.data());
        for (int64_t hi = 0; hi < h; ++hi) {
          const float* q_a = q + ((gi * m + a) * h + hi) * c;
          const float* qa_a = qa + ((gi * m + a) * h + hi) * w;
          __m256 z = _mm256_setzero_ps();
          for (int64_t j = 0; j < nv; ++j) {
            __m256 acc = _mm256_setzero_ps();
            for (int64_t ci = 0; ci < c; ++ci)
              acc = _mm256_fmadd_ps(_mm256_set1_ps(q_a[ci]), _mm256_loadu_ps(&kt[(hi * c + ci) * mp + 8 * j]), acc);
            for (int64_t l = 0; l < w; ++l)
              acc = _mm256_fmadd_ps(_mm256_set1_ps(qa_a[l]), _mm256_loadu_ps(&theta_p[l * mp + 8 * j]), acc);
            // tanh(x) = 1 - 2 / (exp(2x) + 1): one exp instead of libmvec's slower tanh
            const __m256 x2 = _mm256_min_ps(_mm256_mul_ps(acc, two_inv_cap), _mm256_set1_ps(80.0f));
            const __m256 t = _mm256_sub_ps(one, _mm256_div_ps(two, _mm256_add_ps(_ZGVdN8v_expf(x2), one)));
            const __m256 weight = _mm256_mul_ps(_mm256_loadu_ps(&env_p[8 * j]), _ZGVdN8v_expf(_mm256_mul_ps(vcap, t)));
            _mm256_storeu_ps(&s[8 * j], weight);
            z = _mm256_add_ps(z, weight);
          }
          alignas(32) float zs[8];
          _mm256_store_ps(zs, z);
          const __m256 inv = _mm256_set1_ps(1 / (1 + zs[0] + zs[1] + zs[2] + zs[3] + zs[4] + zs[5] + zs[6] + zs[7]));
          for (int64_t j = 0; j < nv; ++j) {
            const __m256 alpha = _mm256_mul_ps(_mm256_loadu_ps(&s[8 * j]), inv);
            for (int64_t l = 0; l < w; ++l)
              _mm256_storeu_ps(&P[l * mp + 8 * j], _mm256_mul_ps(alpha, _mm256_loadu_ps(&theta_p[l * mp + 8 * j])));
          }
          const float* Ah = A + hi * w * c;
          for (int64_t half = 0; half < c; half += 8) {
            __m256 acc[w];
            for (int64_t l = 0; l < w; ++l) acc[l] = _mm256_setzero_ps();
            for (int64_t b = 0; b < m; ++b) {
              const __m256 vb = _mm256_loadu_ps(v + ((gi * m + b) * h + hi) * c + half);
              for (int64_t l = 0; l < w; ++l) acc[l] = _mm256_fmadd_ps(_mm256_set1_ps(P[l * mp + b]), vb, acc[l]);
            }
            __m256 o = _mm256_setzero_ps();
            for (int64_t l = 0; l < w; ++l) o = _mm256_fmadd_ps(_mm256_loadu_ps(Ah + l * c + half), acc[l], o);
            _mm256_storeu_ps(out + ((gi * m + a) * h + hi) * c + half, o);
          }
        }
      }
    }
  });
}
#endif

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

torch::Tensor forward_blocked(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor qa,
                              torch::Tensor env, torch::Tensor theta, torch::Tensor A, double cap) {
#if defined(__AVX2__) && defined(__FMA__)
  const Sizes n = sizes_of(q, qa);
  TORCH_CHECK(q.scalar_type() == torch::kFloat && n.c == 16 && n.w == 8, "forward_blocked: float, c = 16, L + 1 = 8");
  auto out = torch::empty_like(q);
  forward_blocked_kernel(n, q.data_ptr<float>(), k.data_ptr<float>(), v.data_ptr<float>(), qa.data_ptr<float>(),
                         env.data_ptr<float>(), theta.data_ptr<float>(), A.data_ptr<float>(), static_cast<float>(cap),
                         out.data_ptr<float>());
  return out;
#else
  TORCH_CHECK(false, "forward_blocked needs AVX2 and FMA");
#endif
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
  m.def("forward_blocked", &forward_blocked, "the forward blocked by hand for AVX2 (float, c = 16, L + 1 = 8)");
  m.def("backward", &backward, "fused line-attention bucket, backward (contiguous inputs)");
}
