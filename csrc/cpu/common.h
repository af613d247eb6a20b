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

// Sum of the lanes, in lane order.
inline float lane_sum(const Vec& v) {
  alignas(64) float lanes[Vec::size()];
  v.store(lanes);
  float s = 0.f;
  for (int i = 0; i < Vec::size(); ++i) s += lanes[i];
  return s;
}

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
