// Helpers shared by the CPU kernels: fp32 vectors over fp32/fp16/bf16 data
// and a dtype dispatch. Arithmetic is always fp32; fp64 never reaches the
// kernels (it runs on the reference).
#pragma once

#include <ATen/cpu/vec/vec.h>
#include <c10/core/ScalarType.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <type_traits>

namespace genfast::cpu {

using Vec = at::vec::Vectorized<float>;

// Calls f(T{}) with T the C++ type of dtype (float, c10::Half, c10::BFloat16).
template <typename F>
void dispatch_float(c10::ScalarType dtype, const char* op, F&& f) {
  switch (dtype) {
    case c10::kFloat: return f(float{});
    case c10::kHalf: return f(c10::Half{});
    case c10::kBFloat16: return f(c10::BFloat16{});
    default: TORCH_CHECK(false, op, ": the CPU kernel takes float32, float16 or bfloat16, got ", dtype);
  }
}

// Calls f(j, m) for j = 0, V, 2V, ... < n with m = min(V, n - j) lanes.
template <typename F>
inline void vec_steps(int n, F&& f) {
  for (int j = 0; j < n; j += Vec::size()) f(j, std::min<int>(Vec::size(), n - j));
}

// exp(x) for an fp32 vector. AVX-512: n = round(x log2 e), r = x - n ln2 in two
// steps (Cody-Waite: r stays exact to fp32 for any |x|), e^r by a degree-6
// polynomial (constant term 1, so exp(0) = 1 exactly; max relative error
// 1.1e-7, fitted in fp32 Horner form) and 2^n by vscalefps: 12 vector ops
// against ~25 for ATen's Sleef exp (1 ulp), whose special-case handling the
// clamp to [-104, 89] and scalef's own overflow to inf / underflow to 0 replace.
// NaN propagates (min/max return their second operand for NaN). Elsewhere ATen's exp.
inline Vec exp_fast(const Vec& x) {
#if defined(CPU_CAPABILITY_AVX512)
  const __m512 v = _mm512_max_ps(_mm512_set1_ps(-104.f), _mm512_min_ps(_mm512_set1_ps(89.f), x));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(v, _mm512_set1_ps(1.44269504f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693147182f), v);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-1.90465421e-9f), r);
  __m512 p = _mm512_set1_ps(1.38436316e-3f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.37414991e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.16680016e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.66664317e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.99999940e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  return _mm512_scalef_ps(p, n);
#else
  return x.exp();
#endif
}

// 2^x for any x: f = x - floor(x) in [0, 1) by vreduceps, 2^f by a degree-6 polynomial (relative
// error 9e-8, p(0) = 1), times 2^floor(x) by vscalefps: 8 ops. Overflow gives inf and underflow 0;
// x = +-inf, whose reduction is 0, gives inf and 0; NaN propagates.
inline Vec exp2_fast(const Vec& x) {
#if defined(CPU_CAPABILITY_AVX512)
  const __m512 f = _mm512_reduce_ps(x, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  __m512 p = _mm512_set1_ps(2.170272055e-4f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.243955223e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.678855538e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.548333377e-2f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.402298450e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.931470037e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f));
  return _mm512_scalef_ps(p, x);
#else
  return (x * Vec(0.693147182f)).exp();
#endif
}

// exp(-x) for a sigmoid 1 / (1 + exp(-x)), as 2^(x * -log2 e): 9 ops where exp_fast(-x) takes 14,
// and no clamp (any x: exp2_fast). The product's rounding adds a relative error of up to
// 6e-8 |x| to the result, which a sigmoid s carries only as the fraction 1 - s of it: silu's
// worst error over x in [-90, 90] against fp64, as a fraction of 1 + |silu|, stayed 1.03e-7 (the
// division's rounding) with either exp. Measured on AVX-512 (AMD EPYC, Zen 4), silu's loop over
// 4096 fp32 values in L1: 4.26 -> 3.34 ns a vector.
inline Vec exp_neg_fast(const Vec& x) {
#if defined(CPU_CAPABILITY_AVX512)
  return exp2_fast(x * Vec(-1.44269504f));
#else
  return x.neg().exp();
#endif
}

// Sum of the lanes, in lane order.
inline float lane_sum(const Vec& v) {
  alignas(64) float lanes[Vec::size()];
  v.store(lanes);
  float s = 0.f;
  for (int i = 0; i < Vec::size(); ++i) s += lanes[i];
  return s;
}

// Sum of the lanes in a tree (AVX-512: 4 adds deep, where lane order is 15): for sums whose
// latency a loop waits on.
inline float hsum(const Vec& v) {
#if defined(CPU_CAPABILITY_AVX512)
  return _mm512_reduce_add_ps(v);
#else
  return lane_sum(v);
#endif
}

#if defined(CPU_CAPABILITY_AVX512)
// The 16 horizontal sums of v[0..15] as one vector (lane j = the sum of v[j]'s lanes): a
// transposing tree of 46 vector ops where 16 separate reductions take 128.
inline __m512 sum16(const __m512* v) {
  __m512 t[8], u[4];
  for (int j = 0; j < 8; ++j)  // lanes 0-7: v[j]'s halves added; 8-15: v[j + 8]'s
    t[j] = _mm512_add_ps(_mm512_shuffle_f32x4(v[j], v[j + 8], 0x44), _mm512_shuffle_f32x4(v[j], v[j + 8], 0xEE));
  for (int j = 0; j < 4; ++j)  // 128-bit groups: v[j], v[j + 8], v[j + 4], v[j + 12], 4 lanes each
    u[j] = _mm512_add_ps(_mm512_shuffle_f32x4(t[j], t[j + 4], 0x88), _mm512_shuffle_f32x4(t[j], t[j + 4], 0xDD));
  const __m512 s01 = _mm512_add_ps(_mm512_unpacklo_ps(u[0], u[1]), _mm512_unpackhi_ps(u[0], u[1]));
  const __m512 s23 = _mm512_add_ps(_mm512_unpacklo_ps(u[2], u[3]), _mm512_unpackhi_ps(u[2], u[3]));
  const __m512 r = _mm512_add_ps(
      _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(s01), _mm512_castps_pd(s23))),
      _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(s01), _mm512_castps_pd(s23))));
  // r's groups hold v[0-3], v[8-11], v[4-7], v[12-15]
  return _mm512_permutexvar_ps(_mm512_setr_epi32(0, 1, 2, 3, 8, 9, 10, 11, 4, 5, 6, 7, 12, 13, 14, 15), r);
}
#endif

// Loads and stores of m <= Vec::size() elements of T as fp32 vectors.
template <typename T>
inline Vec load_float(const T* p, int m) {
  if constexpr (std::is_same_v<T, float>) {
    return m == Vec::size() ? Vec::loadu(p) : Vec::loadu(p, m);
  } else {
    return at::vec::convert<float>(at::vec::Vectorized<T>::loadu(p, m));
  }
}

template <typename T>
inline void store_float(T* p, const Vec& v, int m) {
  if constexpr (std::is_same_v<T, float>) {
    m == Vec::size() ? v.store(p) : v.store(p, m);
  } else {
    at::vec::convert<T>(v).store(p, m);
  }
}

// fp32 -> bf16 stores in one instruction (vcvtneps2bf16, AVX512_BF16: round to nearest even, as
// ATen's conversion, whose ~6 integer operations a vector took a third of the GroupNorm apply's
// samples; it flushes fp32 denormals to 0). For functions compiled with GENFAST_BF16_TARGET and
// called where native_bf16() holds; store_out picks it for T = bf16 when kNative.
#if defined(CPU_CAPABILITY_AVX512)
#define GENFAST_BF16_TARGET __attribute__((target("avx512bf16")))
inline bool native_bf16() {
  static const bool yes = __builtin_cpu_supports("avx512bf16");
  return yes;
}
GENFAST_BF16_TARGET inline void store_bf16_native(c10::BFloat16* p, const Vec& v, int m) {
  const __m256i h = reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(v));
  _mm256_mask_storeu_epi16(p, static_cast<__mmask16>((1u << m) - 1), h);
}
#else
#define GENFAST_BF16_TARGET
inline bool native_bf16() { return false; }
inline void store_bf16_native(c10::BFloat16* p, const Vec& v, int m) { store_float(p, v, m); }
#endif

template <typename T, bool kNative>
GENFAST_BF16_TARGET inline void store_out(T* p, const Vec& v, int m) {
  if constexpr (kNative && std::is_same_v<T, c10::BFloat16>) {
    store_bf16_native(p, v, m);
  } else {
    store_float(p, v, m);
  }
}

// pass(std::true_type) where T is bf16 and the CPU has the instruction, else pass(std::false_type).
// The kernels that take kNative are compiled with GENFAST_BF16_TARGET and store in plain loops: GCC
// does not inline store_out into a lambda (vec_steps), which then called it once per vector.
template <typename T, typename F>
inline void with_bf16_stores(F&& pass) {
  if constexpr (std::is_same_v<T, c10::BFloat16>) {  // other types: no second instantiation
    if (native_bf16()) return pass(std::true_type{});
  }
  pass(std::false_type{});
}

}  // namespace genfast::cpu
