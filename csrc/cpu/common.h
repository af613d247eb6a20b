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

#if defined(CPU_CAPABILITY_AVX512)
// exp(x) to about 1 ulp, inlined: SLEEF's expf is an out-of-line call that
// spills every vector register of the loop around it. x = k ln2 + r with
// |r| <= ln2/2 (ln2 in two parts), the classic degree-6 minimax polynomial
// for e^r, and vscalefps for 2^k, which overflows to inf and underflows to 0
// as IEEE exp does. NaN propagates through the clamp.
inline Vec exp_fast(const Vec& x_in) {
  const Vec x = at::vec::minimum(at::vec::maximum(x_in, Vec(-104.0f)), Vec(89.0f));
  const __m512 k = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504089f)), _MM_FROUND_TO_NEAREST_INT);
  Vec r = at::vec::fmadd(Vec(k), Vec(-0.693359375f), x);
  r = at::vec::fmadd(Vec(k), Vec(2.12194440e-4f), r);
  Vec p(1.9875691500e-4f);
  for (float c : {1.3981999507e-3f, 8.3334519073e-3f, 4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f}) {
    p = at::vec::fmadd(p, r, Vec(c));
  }
  p = at::vec::fmadd(p, r * r, r + Vec(1.0f));
  return Vec(_mm512_scalef_ps(p, k));
}
#else
inline Vec exp_fast(const Vec& x) { return x.exp(); }
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

}  // namespace genfast::cpu
