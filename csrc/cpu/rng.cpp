// genfast.randn / genfast.rand on the CPU: the noise stream of philox.h.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include "ops.h"
#include "philox.h"

namespace genfast::cpu {

int64_t resolve_seed(int64_t seed, const OptTensor& seed_tensor) {
  return seed_tensor.has_value() ? seed_tensor->item<int64_t>() : seed;
}

namespace {

void fill_noise_(Tensor out, int64_t seed, const OptTensor& seed_tensor, int64_t offset, bool normal) {
  const PhiloxKey key(resolve_seed(seed, seed_tensor));
  dispatch_float(out.scalar_type(), "fill_noise_", [&](auto tag) {
    using T = decltype(tag);
    T* dst = out.data_ptr<T>();
    at::parallel_for(0, out.numel(), 16 * kBlock, [&](int64_t begin, int64_t end) {
      alignas(64) float buf[kBlock];
      for (int64_t b = begin; b < end; b += kBlock) {
        const int n = static_cast<int>(std::min<int64_t>(kBlock, end - b));
        const uint64_t first = static_cast<uint64_t>(offset + b);
        normal ? stream_normals(key, first, n, buf) : stream_uniforms(key, first, n, buf);
        vec_steps(n, [&](int j, int m) { store_float(dst + b + j, Vec::loadu(buf + j, m), m); });
      }
    });
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(genfast_cpu, m) { m.def("fill_noise_", &fill_noise_); }

}  // namespace genfast::cpu
