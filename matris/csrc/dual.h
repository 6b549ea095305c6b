// Dual numbers on AVX2 vectors, shared by the C++ ops of matris/cpu_kernels.py.
//
// The kernels are written once over a number type: F, 8 floats, or D, 8 dual numbers (value and tangent
// along the double backward's incoming cotangents). An op's backward run on D numbers is its double
// backward: its tangents are the gradients of the backward's inputs, and the tangent of the forward's
// output, which it recomputes, is the gradient of the cotangent G (the backward is linear in G).

#pragma once

#include <torch/extension.h>

#include <cstdint>

#if !defined(__AVX2__) || !defined(__FMA__)
#error "matris/csrc needs AVX2 and FMA (-mavx2 -mfma)"
#endif
#include <immintrin.h>

namespace {

extern "C" __m256 _ZGVdN8v_expf(__m256);  // glibc's libmvec, 8 floats at a time

struct F {
  __m256 x;
};
struct D {
  __m256 x, d;
};
struct Ds {  // a dual scalar
  float x, d;
};
struct FP {  // where F numbers live
  float* x;
  FP operator+(int64_t i) const { return {x + i}; }
};
struct DP {  // where D numbers live: values and tangents in two arrays of the same layout
  float* x;
  float* d;
  DP operator+(int64_t i) const { return {x + i, d + i}; }
};
struct TP {  // where the double backward's gradients go: tangents only, since no one reads their values
  float* d;
  TP operator+(int64_t i) const { return {d + i}; }
};
template <class N> struct Num;
template <> struct Num<F> {
  using Ptr = FP;
  using Out = FP;
  using Scalar = float;
};
template <> struct Num<D> {
  using Ptr = DP;
  using Out = TP;
  using Scalar = Ds;
};
template <class N> using Ptr = typename Num<N>::Ptr;
template <class N> using Out = typename Num<N>::Out;  // where gradients are summed
template <class N> using Scalar = typename Num<N>::Scalar;

inline F load(FP p) { return {_mm256_loadu_ps(p.x)}; }
inline D load(DP p) { return {_mm256_loadu_ps(p.x), _mm256_loadu_ps(p.d)}; }
inline void store(FP p, F a) { _mm256_storeu_ps(p.x, a.x); }
inline void store(DP p, D a) { _mm256_storeu_ps(p.x, a.x), _mm256_storeu_ps(p.d, a.d); }
// a sum that starts at value 0: the compiler drops the value part of what only feeds it
inline D load(TP p) { return {_mm256_setzero_ps(), _mm256_loadu_ps(p.d)}; }
inline void store(TP p, D a) { _mm256_storeu_ps(p.d, a.d); }
inline F bcast(FP p) { return {_mm256_set1_ps(*p.x)}; }
inline D bcast(DP p) { return {_mm256_set1_ps(*p.x), _mm256_set1_ps(*p.d)}; }
inline F bcast(float s) { return {_mm256_set1_ps(s)}; }
inline D bcast(Ds s) { return {_mm256_set1_ps(s.x), _mm256_set1_ps(s.d)}; }
template <class N> N zero();
template <> inline F zero<F>() { return {_mm256_setzero_ps()}; }
template <> inline D zero<D>() { return {_mm256_setzero_ps(), _mm256_setzero_ps()}; }
template <class N> N constant(__m256 x);  // a number with no tangent
template <> inline F constant<F>(__m256 x) { return {x}; }
template <> inline D constant<D>(__m256 x) { return {x, _mm256_setzero_ps()}; }

inline F add(F a, F b) { return {_mm256_add_ps(a.x, b.x)}; }
inline D add(D a, D b) { return {_mm256_add_ps(a.x, b.x), _mm256_add_ps(a.d, b.d)}; }
inline F sub(F a, F b) { return {_mm256_sub_ps(a.x, b.x)}; }
inline D sub(D a, D b) { return {_mm256_sub_ps(a.x, b.x), _mm256_sub_ps(a.d, b.d)}; }
inline F mul(F a, F b) { return {_mm256_mul_ps(a.x, b.x)}; }
inline D mul(D a, D b) {
  return {_mm256_mul_ps(a.x, b.x), _mm256_fmadd_ps(a.d, b.x, _mm256_mul_ps(a.x, b.d))};
}
inline F fma(F a, F b, F c) { return {_mm256_fmadd_ps(a.x, b.x, c.x)}; }  // a b + c
inline D fma(D a, D b, D c) {
  return {_mm256_fmadd_ps(a.x, b.x, c.x), _mm256_fmadd_ps(a.d, b.x, _mm256_fmadd_ps(a.x, b.d, c.d))};
}
inline F scale(F a, float s) { return {_mm256_mul_ps(a.x, _mm256_set1_ps(s))}; }
inline D scale(D a, float s) {
  const __m256 vs = _mm256_set1_ps(s);
  return {_mm256_mul_ps(a.x, vs), _mm256_mul_ps(a.d, vs)};
}

inline float hsum(__m256 x) {
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, x);
  return lanes[0] + lanes[1] + lanes[2] + lanes[3] + lanes[4] + lanes[5] + lanes[6] + lanes[7];
}
inline float hsum(F a) { return hsum(a.x); }
inline Ds hsum(D a) { return {hsum(a.x), hsum(a.d)}; }
inline float inverse_1p(float z) { return 1 / (1 + z); }  // 1 / (1 + z)
inline Ds inverse_1p(Ds z) {
  const float inv = 1 / (1 + z.x);
  return {inv, -inv * inv * z.d};
}

inline F exp(F a) { return {_ZGVdN8v_expf(a.x)}; }
inline D exp(D a) {
  const __m256 e = _ZGVdN8v_expf(a.x);
  return {e, _mm256_mul_ps(e, a.d)};
}
// tanh(a / cap) as 1 - 2 / (exp(2a / cap) + 1): one exp instead of libmvec's slower tanh
inline F tanh_over(F a, float cap) {
  const __m256 one = _mm256_set1_ps(1.0f);
  const __m256 x2 = _mm256_min_ps(_mm256_mul_ps(a.x, _mm256_set1_ps(2 / cap)), _mm256_set1_ps(80.0f));
  return {_mm256_sub_ps(one, _mm256_div_ps(_mm256_set1_ps(2.0f), _mm256_add_ps(_ZGVdN8v_expf(x2), one)))};
}
inline D tanh_over(D a, float cap) {
  const __m256 t = tanh_over(F{a.x}, cap).x;
  const __m256 slope = _mm256_mul_ps(_mm256_fnmadd_ps(t, t, _mm256_set1_ps(1.0f)), _mm256_set1_ps(1 / cap));
  return {t, _mm256_mul_ps(slope, a.d)};
}
inline F one_minus_square(F t) { return {_mm256_fnmadd_ps(t.x, t.x, _mm256_set1_ps(1.0f))}; }
inline D one_minus_square(D t) {
  return {_mm256_fnmadd_ps(t.x, t.x, _mm256_set1_ps(1.0f)),
          _mm256_mul_ps(_mm256_set1_ps(-2.0f), _mm256_mul_ps(t.x, t.d))};
}

// lanes i = the sum of v[i]'s lanes, for eight vectors (a transpose folded into the additions)
inline __m256 hsum8(const __m256* v) {
  const __m256 a = _mm256_hadd_ps(v[0], v[1]), b = _mm256_hadd_ps(v[2], v[3]),
               c = _mm256_hadd_ps(v[4], v[5]), d = _mm256_hadd_ps(v[6], v[7]);
  const __m256 ab = _mm256_hadd_ps(a, b), cd = _mm256_hadd_ps(c, d);  // low halves' sums, then high halves'
  return _mm256_add_ps(_mm256_permute2f128_ps(ab, cd, 0x20), _mm256_permute2f128_ps(ab, cd, 0x31));
}

// A running sum of products. A D number's tangent gathers two products per term, which as one chain
// would wait on two FMA latencies per term: it keeps them in two registers, summed at the end.
template <class N> struct Sum;
template <> struct Sum<F> {
  F s = zero<F>();
  void add(F a, F b) { s = fma(a, b, s); }
  F value() const { return s; }
};
template <> struct Sum<D> {
  __m256 x = _mm256_setzero_ps(), d1 = _mm256_setzero_ps(), d2 = _mm256_setzero_ps();
  void add(D a, D b) {
    x = _mm256_fmadd_ps(a.x, b.x, x), d1 = _mm256_fmadd_ps(a.d, b.x, d1), d2 = _mm256_fmadd_ps(a.x, b.d, d2);
  }
  D value() const { return {x, _mm256_add_ps(d1, d2)}; }
};

}  // namespace
