// genfast's noise stream on the CPU: position p is component p % 4 of
// Triton's tl.randn4x(seed, p / 4) (normals) or tl.rand4x(seed, p / 4)
// (uniforms), i.e. Philox4x32-10 keyed by the 64-bit seed on the counter
// (lo32(c), hi32(c), 0, 0), c = p / 4, whose four words give four uniforms
// or, by Box-Muller on the pairs (w0, w1) and (w2, w3), four normals (cosine
// then sine branch). See genfast/reference/rng.py.
//
// Cost: 10 rounds of two 32x32->64 multiplies and four xors per counter, a
// quarter of that per position. With AVX-512 the rounds run on 16 counters per
// register and Box-Muller's log and sin/cos are inlined polynomials for their
// narrow domains; elsewhere a plain loop and SLEEF's 1-ulp functions. On one
// core of the 2.6 GHz AVX-512 Xeon this was developed on: 4M normals in about
// 4 ms, 4M uniforms in 2 ms (torch.randn: about 13 ms).
#pragma once

#include "common.h"

#include <algorithm>
#include <cmath>
#include <cstdint>

namespace genfast::cpu {

// Noise is produced in blocks of this many elements into stack buffers.
constexpr int kBlock = 256;

struct PhiloxKey {
  uint32_t k0[10], k1[10];  // the key of every round, precomputed
  explicit PhiloxKey(int64_t seed) {
    uint32_t a = static_cast<uint32_t>(static_cast<uint64_t>(seed));
    uint32_t b = static_cast<uint32_t>(static_cast<uint64_t>(seed) >> 32);
    for (int r = 0; r < 10; ++r, a += 0x9E3779B9u, b += 0xBB67AE85u) {
      k0[r] = a;
      k1[r] = b;
    }
  }
};

// A word to fp32 in [0, 1) exactly as Triton: the int32 view folded to
// non-negative (~x for x < 0), converted, times the largest scale below 2^-31.
inline float word_to_uniform(uint32_t w) {
  int32_t x = static_cast<int32_t>(w);
  x ^= x >> 31;
  return static_cast<float>(x) * 4.6566127342e-10f;
}

#if defined(CPU_CAPABILITY_AVX512)
// Sixteen counters at once in 32-bit lanes: the compiler's 64-bit-lane form
// needs ~4x the instructions. vpmuludq multiplies the even lanes into 64-bit
// products; the odd lanes are moved down first. Lane moves use dword shuffles
// (port 5) rather than 64-bit shifts, which share port 0 with the multiplies.
inline void mulhilo16(__m512i a, __m512i m, __m512i& hi, __m512i& lo) {
  const __m512i even = _mm512_mul_epu32(a, m);
  const __m512i odd = _mm512_mul_epu32(_mm512_shuffle_epi32(a, _MM_PERM_DDBB), m);
  hi = _mm512_mask_shuffle_epi32(odd, 0x5555, even, _MM_PERM_DDBB);  // even lanes <- high dword of even
  lo = _mm512_mask_shuffle_epi32(even, 0xAAAA, odd, _MM_PERM_CCAA);  // odd lanes <- low dword of odd
}

// The four words of the 16 counters first .. first + 15.
inline void philox16x4(const PhiloxKey& key, uint64_t first, __m512i w[4]) {
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  __m512i c0 = _mm512_add_epi32(_mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(first))), lane);
  __m512i c1 = _mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(first >> 32)));
  c1 = _mm512_mask_add_epi32(c1, _mm512_cmplt_epu32_mask(c0, lane), c1, _mm512_set1_epi32(1));  // carry
  __m512i c2 = _mm512_setzero_si512(), c3 = _mm512_setzero_si512();
  const __m512i ma = _mm512_set1_epi32(static_cast<int>(0xD2511F53u));
  const __m512i mb = _mm512_set1_epi32(static_cast<int>(0xCD9E8D57u));
#pragma GCC unroll 10
  for (int r = 0; r < 10; ++r) {
    __m512i hi_a, lo_a, hi_b, lo_b;
    mulhilo16(c0, ma, hi_a, lo_a);
    mulhilo16(c2, mb, hi_b, lo_b);
    // 0x96: a ^ b ^ c in one instruction
    c0 = _mm512_ternarylogic_epi32(hi_b, c1, _mm512_set1_epi32(static_cast<int>(key.k0[r])), 0x96);
    c2 = _mm512_ternarylogic_epi32(hi_a, c3, _mm512_set1_epi32(static_cast<int>(key.k1[r])), 0x96);
    c1 = lo_b;
    c3 = lo_a;
  }
  w[0] = c0;
  w[1] = c1;
  w[2] = c2;
  w[3] = c3;
}

inline Vec words_to_uniform16(__m512i w) {
  w = _mm512_xor_si512(w, _mm512_srai_epi32(w, 31));
  return Vec(_mm512_mul_ps(_mm512_cvtepi32_ps(w), _mm512_set1_ps(4.6566127342e-10f)));
}
#endif

#if defined(CPU_CAPABILITY_AVX512)
// sin(x) and cos(x) for x in [0, 2*pi], all Box-Muller feeds them. Inlined,
// unlike SLEEF's general sinf/cosf, whose calls spill every vector register
// of the loop around them. x = k * pi/2 + t with |t| <= pi/4 (pi/2 in three
// parts, so t is exact to ~1e-14), then +-cos(t) or +-sin(t) by the quadrant,
// each from the classic minimax polynomial on [-pi/4, pi/4] (about 1 ulp).
inline void sincos_angle(const Vec& x, Vec& sin_x, Vec& cos_x) {
  const __m512 k = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(0.63661977236f)), _MM_FROUND_TO_NEAREST_INT);
  const Vec kv(k);
  Vec t = at::vec::fmadd(kv, Vec(-1.5707962513e+00f), x);
  t = at::vec::fmadd(kv, Vec(-7.5497894159e-08f), t);
  t = at::vec::fmadd(kv, Vec(-5.3903029534e-15f), t);
  const Vec z = t * t;
  Vec sin_t = at::vec::fmadd(Vec(-1.9515295891e-4f), z, Vec(8.3321608736e-3f));
  sin_t = at::vec::fmadd(sin_t, z, Vec(-1.6666654611e-1f));
  sin_t = at::vec::fmadd(sin_t * z, t, t);
  Vec cos_t = at::vec::fmadd(Vec(2.443315711809948e-5f), z, Vec(-1.388731625493765e-3f));
  cos_t = at::vec::fmadd(cos_t, z, Vec(4.166664568298827e-2f));
  cos_t = at::vec::fmadd(cos_t * z, z, at::vec::fmadd(z, Vec(-0.5f), Vec(1.0f)));
  // quadrant q = k mod 4: cos x = cos t, -sin t, -cos t, sin t; sin x = sin t, cos t, -sin t, -cos t
  const __m512i q = _mm512_cvtps_epi32(k);
  const __mmask16 odd = _mm512_test_epi32_mask(q, _mm512_set1_epi32(1));
  const __m512i two = _mm512_set1_epi32(2);
  const __m512i cos_sign = _mm512_slli_epi32(_mm512_and_si512(_mm512_add_epi32(q, _mm512_set1_epi32(1)), two), 30);
  const __m512i sin_sign = _mm512_slli_epi32(_mm512_and_si512(q, two), 30);
  const __m512 c = _mm512_mask_blend_ps(odd, cos_t, sin_t), s = _mm512_mask_blend_ps(odd, sin_t, cos_t);
  cos_x = Vec(_mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(c), cos_sign)));
  sin_x = Vec(_mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(s), sin_sign)));
}

#elif defined(CPU_CAPABILITY_AVX2) && !defined(_MSC_VER)
// at::vec's sin and cos are SLEEF's 3.5-ulp ones
inline void sincos_angle(const Vec& x, Vec& sin_x, Vec& cos_x) {
  sin_x = Vec(Sleef_sinf8_u10(x));
  cos_x = Vec(Sleef_cosf8_u10(x));
}
#else
inline void sincos_angle(const Vec& x, Vec& sin_x, Vec& cos_x) {
  sin_x = x.map([](float v) { return std::sin(v); });
  cos_x = x.map([](float v) { return std::cos(v); });
}
#endif

#if defined(CPU_CAPABILITY_AVX512)
// log(x) for normal positive x, which is all Box-Muller feeds it
// (x in [1e-7, 1)): SLEEF's general logf spends half of the noise time on
// special cases. x = m * 2^e with m in (sqrt(1/2), sqrt(2)], and
// log(x) = e ln2 + log1p(f), f = m - 1, with the classic minimax polynomial
// for log1p on that range (about 1 ulp) and ln2 split in two so e ln2 stays
// exact.
inline Vec log_positive(const Vec& x) {
  __m512 e = _mm512_getexp_ps(x);
  __m512 m = _mm512_getmant_ps(x, _MM_MANT_NORM_1_2, _MM_MANT_SIGN_zero);
  const __mmask16 big = _mm512_cmp_ps_mask(m, _mm512_set1_ps(1.41421356f), _CMP_GT_OQ);
  m = _mm512_mask_mul_ps(m, big, m, _mm512_set1_ps(0.5f));
  e = _mm512_mask_add_ps(e, big, e, _mm512_set1_ps(1.0f));
  const Vec f = Vec(m) - Vec(1.0f), z = f * f, ev(e);
  Vec p(7.0376836292e-2f);
  for (float c : {-1.1514610310e-1f, 1.1676998740e-1f, -1.2420140846e-1f, 1.4249322787e-1f, -1.6668057665e-1f,
                  2.0000714765e-1f, -2.4999993993e-1f, 3.3333331174e-1f}) {
    p = at::vec::fmadd(p, f, Vec(c));
  }
  Vec y = f * z * p;
  y = at::vec::fmadd(ev, Vec(-2.12194440e-4f), y);
  y = at::vec::fmadd(z, Vec(-0.5f), y);
  return at::vec::fmadd(ev, Vec(0.693359375f), f + y);
}
#else
inline Vec log_positive(const Vec& x) { return x.log(); }
#endif

// Box-Muller's radius in fp32 with Triton's formula and constants; the two
// normals are radius * cos(angle) and radius * sin(angle), angle = 2 pi u2.
inline Vec box_muller_radius(const Vec& u1) {
  return (Vec(-2.0f) * log_positive(at::vec::maximum(Vec(1.0e-7f), u1))).sqrt();
}

// ---- the stream: position p is component p % 4 of Philox at counter p / 4 ----
//
// One Philox call gives four uniforms, or four normals by Box-Muller on its
// word pairs (cosine and sine branch): Triton's tl.rand4x / tl.randn4x. Runs
// of consecutive positions therefore cost a quarter of the Philox rounds and
// half the log/sqrt of drawing each position on its own counter.

// The four words of counter c, one at a time (the portable path and single positions).
inline void philox4(const PhiloxKey& key, uint64_t c, uint32_t w[4]) {
  uint32_t c0 = static_cast<uint32_t>(c), c1 = static_cast<uint32_t>(c >> 32), c2 = 0, c3 = 0;
  for (int r = 0; r < 10; ++r) {
    const uint64_t pa = 0xD2511F53ull * c0;
    const uint64_t pb = 0xCD9E8D57ull * c2;
    c0 = static_cast<uint32_t>(pb >> 32) ^ c1 ^ key.k0[r];
    c2 = static_cast<uint32_t>(pa >> 32) ^ c3 ^ key.k1[r];
    c1 = static_cast<uint32_t>(pb);
    c3 = static_cast<uint32_t>(pa);
  }
  w[0] = c0;
  w[1] = c1;
  w[2] = c2;
  w[3] = c3;
}

// Uniform at one stream position.
inline float uniform_at(const PhiloxKey& key, uint64_t p) {
  uint32_t w[4];
  philox4(key, p >> 2, w);
  return word_to_uniform(w[p & 3]);
}

#if defined(CPU_CAPABILITY_AVX512)
// From four vectors holding component q of 16 consecutive counters to four
// vectors of 16 consecutive positions: pair up (0, 1) and (2, 3) lane by
// lane, then the pairs as 64-bit units.
inline void interleave4(const __m512 v[4], float* out) {
  const __m512i lo = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
  const __m512i hi = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
  const __m512i qlo = _mm512_setr_epi64(0, 8, 1, 9, 2, 10, 3, 11);
  const __m512i qhi = _mm512_setr_epi64(4, 12, 5, 13, 6, 14, 7, 15);
  const __m512d a_lo = _mm512_castps_pd(_mm512_permutex2var_ps(v[0], lo, v[1]));
  const __m512d a_hi = _mm512_castps_pd(_mm512_permutex2var_ps(v[0], hi, v[1]));
  const __m512d b_lo = _mm512_castps_pd(_mm512_permutex2var_ps(v[2], lo, v[3]));
  const __m512d b_hi = _mm512_castps_pd(_mm512_permutex2var_ps(v[2], hi, v[3]));
  _mm512_storeu_pd(reinterpret_cast<double*>(out), _mm512_permutex2var_pd(a_lo, qlo, b_lo));
  _mm512_storeu_pd(reinterpret_cast<double*>(out + 16), _mm512_permutex2var_pd(a_lo, qhi, b_lo));
  _mm512_storeu_pd(reinterpret_cast<double*>(out + 32), _mm512_permutex2var_pd(a_hi, qlo, b_hi));
  _mm512_storeu_pd(reinterpret_cast<double*>(out + 48), _mm512_permutex2var_pd(a_hi, qhi, b_hi));
}
#endif

// The stream for positions base .. base + count - 1, base a multiple of 4,
// into out (room for count rounded up to 64).
template <bool kNormal>
inline void stream_aligned(const PhiloxKey& key, uint64_t base, int count, float* out) {
#if defined(CPU_CAPABILITY_AVX512)
  for (int j = 0; j < count; j += 64) {
    __m512i w[4];
    philox16x4(key, (base + j) >> 2, w);
    __m512 v[4];
    if constexpr (kNormal) {
      for (int pair = 0; pair < 2; ++pair) {
        const Vec r = box_muller_radius(words_to_uniform16(w[2 * pair]));
        Vec sin_t, cos_t;
        sincos_angle(Vec(6.283185307179586f) * words_to_uniform16(w[2 * pair + 1]), sin_t, cos_t);
        v[2 * pair] = r * cos_t;
        v[2 * pair + 1] = r * sin_t;
      }
    } else {
      for (int q = 0; q < 4; ++q) v[q] = words_to_uniform16(w[q]);
    }
    interleave4(v, out + j);
  }
#else
  constexpr int kMax = kBlock + 64;
  alignas(64) float u[4][kMax / 4];
  const int counters = (count + 3) / 4;
  for (int c = 0; c < counters; ++c) {
    uint32_t w[4];
    philox4(key, (base >> 2) + c, w);
    for (int q = 0; q < 4; ++q) u[q][c] = word_to_uniform(w[q]);
  }
  if constexpr (kNormal) {
    for (int pair = 0; pair < 2; ++pair) {
      vec_steps(counters, [&](int c, int m) {
        const Vec r = box_muller_radius(Vec::loadu(u[2 * pair] + c, m));
        Vec sin_t, cos_t;
        sincos_angle(Vec(6.283185307179586f) * Vec::loadu(u[2 * pair + 1] + c, m), sin_t, cos_t);
        (r * cos_t).store(u[2 * pair] + c, m);
        (r * sin_t).store(u[2 * pair + 1] + c, m);
      });
    }
  }
  for (int c = 0; c < counters; ++c) {
    for (int q = 0; q < 4; ++q) out[4 * c + q] = u[q][c];
  }
#endif
}

// Positions first .. first + n - 1 of the normal (kNormal) or uniform stream
// into out[0 .. n), n <= kBlock; out has room for kBlock floats.
template <bool kNormal>
inline void stream(const PhiloxKey& key, uint64_t first, int n, float* out) {
  const int skip = static_cast<int>(first & 3);
  if (skip == 0) {
    stream_aligned<kNormal>(key, first, n, out);
    return;
  }
  alignas(64) float buf[kBlock + 64];
  stream_aligned<kNormal>(key, first - skip, n + skip, buf);
  std::copy(buf + skip, buf + skip + n, out);
}

inline void stream_normals(const PhiloxKey& key, uint64_t first, int n, float* out) { stream<true>(key, first, n, out); }
inline void stream_uniforms(const PhiloxKey& key, uint64_t first, int n, float* out) { stream<false>(key, first, n, out); }

}  // namespace genfast::cpu
