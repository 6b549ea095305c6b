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

extern "C" __m256 _ZGVdN8v_expf(__m256);  // glibc's libmvec, 8 floats at a time

constexpr int64_t kC = 16, kW = 8;  // the blocked kernels' head width and angle channels (matris-6l)

float hsum(__m256 x) {
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, x);
  return lanes[0] + lanes[1] + lanes[2] + lanes[3] + lanes[4] + lanes[5] + lanes[6] + lanes[7];
}

// One row and head: scores against the head's kᵀ (kt_h, (c, mp)) and the row's padded angle basis, then
// t = tanh(s / cap), e = exp(cap t), α, and P_lb = α_b θ_alb; returns 1 / (1 + Σ_b w_ab). Padding slots
// have zero envelope, so zero α and P.
float blocked_weights(int64_t mp, float cap, const float* q_a, const float* qa_a, const float* kt_h,
                      const float* theta_p, const float* env_p, float* t, float* e, float* alpha, float* P) {
  const __m256 two_inv_cap = _mm256_set1_ps(2 / cap), vcap = _mm256_set1_ps(cap);
  const __m256 one = _mm256_set1_ps(1.0f), two = _mm256_set1_ps(2.0f);
  __m256 z = _mm256_setzero_ps();
  for (int64_t j = 0; j < mp; j += 8) {
    __m256 s = _mm256_setzero_ps();
    for (int64_t ci = 0; ci < kC; ++ci)
      s = _mm256_fmadd_ps(_mm256_set1_ps(q_a[ci]), _mm256_loadu_ps(kt_h + ci * mp + j), s);
    for (int64_t l = 0; l < kW; ++l)
      s = _mm256_fmadd_ps(_mm256_set1_ps(qa_a[l]), _mm256_loadu_ps(theta_p + l * mp + j), s);
    // tanh(x) = 1 - 2 / (exp(2x) + 1): one exp instead of libmvec's slower tanh
    const __m256 x2 = _mm256_min_ps(_mm256_mul_ps(s, two_inv_cap), _mm256_set1_ps(80.0f));
    const __m256 tj = _mm256_sub_ps(one, _mm256_div_ps(two, _mm256_add_ps(_ZGVdN8v_expf(x2), one)));
    const __m256 ej = _ZGVdN8v_expf(_mm256_mul_ps(vcap, tj));
    const __m256 w = _mm256_mul_ps(_mm256_loadu_ps(env_p + j), ej);
    _mm256_storeu_ps(t + j, tj);
    _mm256_storeu_ps(e + j, ej);
    _mm256_storeu_ps(alpha + j, w);
    z = _mm256_add_ps(z, w);
  }
  const float inv = 1 / (1 + hsum(z));
  const __m256 vinv = _mm256_set1_ps(inv);
  for (int64_t j = 0; j < mp; j += 8) {
    const __m256 a = _mm256_mul_ps(_mm256_loadu_ps(alpha + j), vinv);
    _mm256_storeu_ps(alpha + j, a);
    for (int64_t l = 0; l < kW; ++l)
      _mm256_storeu_ps(P + l * mp + j, _mm256_mul_ps(a, _mm256_loadu_ps(theta_p + l * mp + j)));
  }
  return inv;
}

// S_l,half = Σ_b P_lb v_b,half for one half (8 channels) of the head: 8 accumulators in registers.
void blocked_value_sums(int64_t m, int64_t mp, const float* P, const float* v_head, int64_t stride, __m256* S) {
  for (int64_t l = 0; l < kW; ++l) S[l] = _mm256_setzero_ps();
  for (int64_t b = 0; b < m; ++b) {
    const __m256 vb = _mm256_loadu_ps(v_head + b * stride);
    for (int64_t l = 0; l < kW; ++l) S[l] = _mm256_fmadd_ps(_mm256_set1_ps(P[l * mp + b]), vb, S[l]);
  }
}

// Per block: kᵀ (and vᵀ) of every head, padded to mp columns; per row: the angle basis and envelope padded.
struct BlockedBuffers {
  int64_t m, mp;
  std::vector<float> kt, vt, theta_p, env_p, t, e, alpha, P;
  BlockedBuffers(const Sizes& n)
      : m(n.m), mp((n.m + 7) / 8 * 8), kt(n.h * kC * mp), vt(n.h * kC * mp), theta_p(kW * mp), env_p(mp),
        t(mp), e(mp), alpha(mp), P(kW * mp) {}  // padding columns are zero and stay zero
  void transpose(const Sizes& n, const float* x, int64_t gi, std::vector<float>& xt) {
    for (int64_t b = 0; b < m; ++b)
      for (int64_t hi = 0; hi < n.h; ++hi)
        for (int64_t ci = 0; ci < kC; ++ci) xt[(hi * kC + ci) * mp + b] = x[((gi * m + b) * n.h + hi) * kC + ci];
  }
  void load_row(const float* theta, const float* env, int64_t gi, int64_t a) {
    for (int64_t l = 0; l < kW; ++l) std::copy_n(theta + ((gi * m + a) * kW + l) * m, m, theta_p.data() + l * mp);
    std::copy_n(env + (gi * m + a) * m, m, env_p.data());
  }
};

// The forward for float, c = 16 and L + 1 = 8, blocked by hand for AVX2.
void forward_blocked_kernel(const Sizes& n, const float* q, const float* k, const float* v, const float* qa,
                            const float* env, const float* theta, const float* A, float cap, float* out) {
  at::parallel_for(0, n.g, 1, [&](int64_t begin, int64_t end) {
    const int64_t m = n.m, h = n.h, stride = h * kC;
    BlockedBuffers buf(n);
    for (int64_t gi = begin; gi < end; ++gi) {
      buf.transpose(n, k, gi, buf.kt);
      for (int64_t a = 0; a < m; ++a) {
        buf.load_row(theta, env, gi, a);
        for (int64_t hi = 0; hi < h; ++hi) {
          const int64_t row = ((gi * m + a) * h + hi) * kC;
          blocked_weights(buf.mp, cap, q + row, qa + ((gi * m + a) * h + hi) * kW, buf.kt.data() + hi * kC * buf.mp,
                          buf.theta_p.data(), buf.env_p.data(), buf.t.data(), buf.e.data(), buf.alpha.data(),
                          buf.P.data());
          for (int64_t half = 0; half < kC; half += 8) {
            __m256 S[kW];
            blocked_value_sums(m, buf.mp, buf.P.data(), v + (gi * m * h + hi) * kC + half, stride, S);
            __m256 o = _mm256_setzero_ps();
            for (int64_t l = 0; l < kW; ++l)
              o = _mm256_fmadd_ps(_mm256_loadu_ps(A + (hi * kW + l) * kC + half), S[l], o);
            _mm256_storeu_ps(out + row + half, o);
          }
        }
      }
    }
  });
}

// The backward for float, c = 16 and L + 1 = 8, blocked the same way (gradients as in backward_kernel).
void backward_blocked_kernel(const Sizes& n, const float* grad, const float* q, const float* k, const float* v,
                             const float* qa, const float* env, const float* theta, const float* A, float cap,
                             float* gq, float* gk, float* gv, float* gqa, float* genv, float* gtheta,
                             float* gA_threads) {
  at::parallel_for(0, n.g, 1, [&](int64_t begin, int64_t end) {
    const int64_t m = n.m, h = n.h, stride = h * kC;
    float* gA = gA_threads + at::get_thread_num() * h * kW * kC;
    BlockedBuffers buf(n);
    const int64_t mp = buf.mp;
    std::vector<float> GA(kW * kC), galpha(mp), gs(mp), gtheta_p(kW * mp), genv_p(mp);
    for (int64_t gi = begin; gi < end; ++gi) {
      buf.transpose(n, k, gi, buf.kt);
      buf.transpose(n, v, gi, buf.vt);
      for (int64_t a = 0; a < m; ++a) {
        buf.load_row(theta, env, gi, a);
        std::fill(gtheta_p.begin(), gtheta_p.end(), 0.0f);
        std::fill(genv_p.begin(), genv_p.end(), 0.0f);
        for (int64_t hi = 0; hi < h; ++hi) {
          const int64_t row = ((gi * m + a) * h + hi) * kC, qa_row = ((gi * m + a) * h + hi) * kW;
          const int64_t head = (gi * m * h + hi) * kC;  // element (gi, 0, hi, 0)
          const float inv = blocked_weights(mp, cap, q + row, qa + qa_row, buf.kt.data() + hi * kC * mp,
                                            buf.theta_p.data(), buf.env_p.data(), buf.t.data(), buf.e.data(),
                                            buf.alpha.data(), buf.P.data());
          // ∂/∂A_lc += G_ac S_lc; GA_lc = A_lc G_ac
          for (int64_t half = 0; half < kC; half += 8) {
            __m256 S[kW];
            blocked_value_sums(m, mp, buf.P.data(), v + head + half, stride, S);
            const __m256 G = _mm256_loadu_ps(grad + row + half);
            for (int64_t l = 0; l < kW; ++l) {
              float* gAl = gA + (hi * kW + l) * kC + half;
              _mm256_storeu_ps(gAl, _mm256_fmadd_ps(G, S[l], _mm256_loadu_ps(gAl)));
              _mm256_storeu_ps(&GA[l * kC + half], _mm256_mul_ps(_mm256_loadu_ps(A + (hi * kW + l) * kC + half), G));
            }
          }
          // D_lb = Σ_c GA_lc v_bc; ∂/∂α_b = Σ_l θ_alb D_lb; ∂/∂θ_alb += α_b D_lb
          __m256 dot = _mm256_setzero_ps();
          for (int64_t j = 0; j < mp; j += 8) {
            __m256 D[kW];
            for (int64_t l = 0; l < kW; ++l) D[l] = _mm256_setzero_ps();
            for (int64_t ci = 0; ci < kC; ++ci) {
              const __m256 vc = _mm256_loadu_ps(buf.vt.data() + (hi * kC + ci) * mp + j);
              for (int64_t l = 0; l < kW; ++l) D[l] = _mm256_fmadd_ps(_mm256_set1_ps(GA[l * kC + ci]), vc, D[l]);
            }
            const __m256 alpha = _mm256_loadu_ps(buf.alpha.data() + j);
            __m256 ga = _mm256_setzero_ps();
            for (int64_t l = 0; l < kW; ++l) {
              ga = _mm256_fmadd_ps(_mm256_loadu_ps(buf.theta_p.data() + l * mp + j), D[l], ga);
              float* gt = gtheta_p.data() + l * mp + j;
              _mm256_storeu_ps(gt, _mm256_fmadd_ps(alpha, D[l], _mm256_loadu_ps(gt)));
            }
            _mm256_storeu_ps(galpha.data() + j, ga);
            dot = _mm256_fmadd_ps(ga, alpha, dot);
          }
          // ∂/∂v_bc += Σ_l P_lb GA_lc
          for (int64_t b = 0; b < m; ++b)
            for (int64_t half = 0; half < kC; half += 8) {
              float* gvb = gv + head + b * stride + half;
              __m256 acc = _mm256_loadu_ps(gvb);
              for (int64_t l = 0; l < kW; ++l)
                acc = _mm256_fmadd_ps(_mm256_set1_ps(buf.P[l * mp + b]), _mm256_loadu_ps(&GA[l * kC + half]), acc);
              _mm256_storeu_ps(gvb, acc);
            }
          // through the sink softmax and the capped exponential
          const __m256 vdot = _mm256_set1_ps(hsum(dot)), vinv = _mm256_set1_ps(inv), one = _mm256_set1_ps(1.0f);
          __m256 gqa_acc[kW];
          for (int64_t l = 0; l < kW; ++l) gqa_acc[l] = _mm256_setzero_ps();
          for (int64_t j = 0; j < mp; j += 8) {
            const __m256 e = _mm256_loadu_ps(buf.e.data() + j), t = _mm256_loadu_ps(buf.t.data() + j);
            const __m256 gw = _mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(galpha.data() + j), vdot), vinv);
            _mm256_storeu_ps(genv_p.data() + j, _mm256_fmadd_ps(gw, e, _mm256_loadu_ps(genv_p.data() + j)));
            const __m256 g = _mm256_mul_ps(_mm256_mul_ps(gw, _mm256_loadu_ps(buf.env_p.data() + j)),
                                           _mm256_mul_ps(e, _mm256_fnmadd_ps(t, t, one)));
            _mm256_storeu_ps(gs.data() + j, g);
            for (int64_t l = 0; l < kW; ++l) {
              gqa_acc[l] = _mm256_fmadd_ps(g, _mm256_loadu_ps(buf.theta_p.data() + l * mp + j), gqa_acc[l]);
              float* gt = gtheta_p.data() + l * mp + j;
              _mm256_storeu_ps(gt, _mm256_fmadd_ps(g, _mm256_set1_ps(qa[qa_row + l]), _mm256_loadu_ps(gt)));
            }
          }
          for (int64_t l = 0; l < kW; ++l) gqa[qa_row + l] = hsum(gqa_acc[l]);
          // ∂/∂q_a = Σ_b gs_b k_b; ∂/∂k_b += gs_b q_a
          for (int64_t half = 0; half < kC; half += 8) {
            const __m256 qh = _mm256_loadu_ps(q + row + half);
            __m256 acc = _mm256_setzero_ps();
            for (int64_t b = 0; b < m; ++b) {
              const __m256 g = _mm256_set1_ps(gs[b]);
              acc = _mm256_fmadd_ps(g, _mm256_loadu_ps(k + head + b * stride + half), acc);
              float* gkb = gk + head + b * stride + half;
              _mm256_storeu_ps(gkb, _mm256_fmadd_ps(g, qh, _mm256_loadu_ps(gkb)));
            }
            _mm256_storeu_ps(gq + row + half, acc);
          }
        }
        for (int64_t l = 0; l < kW; ++l) std::copy_n(gtheta_p.data() + l * mp, m, gtheta + ((gi * m + a) * kW + l) * m);
        std::copy_n(genv_p.data(), m, genv + (gi * m + a) * m);
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
  TORCH_CHECK(q.scalar_type() == torch::kFloat && n.c == kC && n.w == kW, "forward_blocked: float, c = 16, L + 1 = 8");
  auto out = torch::empty_like(q);
  forward_blocked_kernel(n, q.data_ptr<float>(), k.data_ptr<float>(), v.data_ptr<float>(), qa.data_ptr<float>(),
                         env.data_ptr<float>(), theta.data_ptr<float>(), A.data_ptr<float>(), static_cast<float>(cap),
                         out.data_ptr<float>());
  return out;
#else
  TORCH_CHECK(false, "forward_blocked needs AVX2 and FMA");
#endif
}

std::vector<torch::Tensor> backward_blocked(torch::Tensor grad, torch::Tensor q, torch::Tensor k,
                                            torch::Tensor v, torch::Tensor qa, torch::Tensor env,
                                            torch::Tensor theta, torch::Tensor A, double cap) {
#if defined(__AVX2__) && defined(__FMA__)
  const Sizes n = sizes_of(q, qa);
  TORCH_CHECK(q.scalar_type() == torch::kFloat && n.c == kC && n.w == kW, "backward_blocked: float, c = 16, L + 1 = 8");
  auto gq = torch::empty_like(q), gk = torch::zeros_like(k), gv = torch::zeros_like(v);
  auto gqa = torch::empty_like(qa), genv = torch::empty_like(env), gtheta = torch::empty_like(theta);
  auto gA = torch::zeros({at::get_num_threads(), n.h, n.w, n.c}, A.options());
  backward_blocked_kernel(n, grad.data_ptr<float>(), q.data_ptr<float>(), k.data_ptr<float>(), v.data_ptr<float>(),
                          qa.data_ptr<float>(), env.data_ptr<float>(), theta.data_ptr<float>(), A.data_ptr<float>(),
                          static_cast<float>(cap), gq.data_ptr<float>(), gk.data_ptr<float>(), gv.data_ptr<float>(),
                          gqa.data_ptr<float>(), genv.data_ptr<float>(), gtheta.data_ptr<float>(), gA.data_ptr<float>());
  return {gq, gk, gv, gqa, genv, gtheta, gA.sum(0)};
#else
  TORCH_CHECK(false, "backward_blocked needs AVX2 and FMA");
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
  m.def("backward_blocked", &backward_blocked, "the backward blocked by hand for AVX2 (float, c = 16, L + 1 = 8)");
  m.def("backward", &backward, "fused line-attention bucket, backward (contiguous inputs)");
}
