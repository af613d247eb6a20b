// VAE ops on the CPU: reparameterize, gaussian_kl and both fused, forward and
// backward. One pass each; eps is regenerated from (seed, offset) in the
// backward instead of being stored.
//
// Bytes per element (fp32): reparameterize 12 (read mu, logvar; write z),
// its backward 12 (read grad_z, logvar; write grad_logvar: grad_mu is grad_z
// itself), reparameterize_with_kl 12 (+16 with elementwise KL), its backward
// 16. PyTorch eager runs reparameterize as randn_like + exp + mul + mul + add:
// about 13 passes of 4 bytes per element plus a slow sequential generator.
// The Philox stream costs ~20 vector integer ops per element, so on a few
// cores these kernels are compute-bound on noise generation; the reductions
// and the noise-free ops are bandwidth-bound. exp is common.h's exp_fast (12
// vector ops, 1.1e-7 relative error), not ATen's Sleef exp (~25).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/string_view.h>
#include <torch/library.h>

#include <numeric>
#include <vector>

#include "ops.h"
#include "philox.h"

namespace genfast::cpu {
namespace {

// Where a block's eps comes from: a given fp32 tensor or the stream.
struct Noise {
  const float* given;
  PhiloxKey key;
  int64_t offset;
};

Noise make_noise(const Tensor& given, int64_t seed, const OptTensor& seed_tensor, int64_t offset) {
  return Noise{given.defined() ? given.data_ptr<float>() : nullptr,
               PhiloxKey(given.defined() ? 0 : resolve_seed(seed, seed_tensor)), offset};
}

Tensor float_noise(const OptTensor& noise) {
  return noise.has_value() ? noise->to(at::kFloat).contiguous() : Tensor();
}

// Runs body(b, n, eps) -> float over [0, numel) in blocks of kBlock on all
// threads and returns the sum of what it returned. eps is the block's noise
// (nullptr when noise is nullptr). Blocks are summed per fixed-size chunk and
// chunks in order, so the result does not depend on the thread count.
template <typename Body>
double run_blocks(int64_t numel, const Noise* noise, Body&& body) {
  constexpr int64_t kChunk = 16 * kBlock;
  const int64_t nchunks = (numel + kChunk - 1) / kChunk;
  std::vector<double> partial(nchunks, 0.0);
  at::parallel_for(0, nchunks, 1, [&](int64_t c_begin, int64_t c_end) {
    alignas(64) float buf[kBlock];
    for (int64_t c = c_begin; c < c_end; ++c) {
      double sum = 0.0;
      for (int64_t b = c * kChunk; b < std::min(numel, (c + 1) * kChunk); b += kBlock) {
        const int n = static_cast<int>(std::min<int64_t>(kBlock, numel - b));
        const float* eps = nullptr;
        if (noise != nullptr && noise->given != nullptr) {
          eps = noise->given + b;
        } else if (noise != nullptr) {
          stream_normals(noise->key, static_cast<uint64_t>(noise->offset + b), n, buf);
          eps = buf;
        }
        sum += body(b, n, eps);
      }
      partial[c] = sum;
    }
  });
  return std::accumulate(partial.begin(), partial.end(), 0.0);
}

bool is_elementwise(c10::string_view reduction) { return reduction == "none"; }

// d(reduced KL) / d(elementwise KL).
double reduction_scale(c10::string_view reduction, const Tensor& mu) {
  if (reduction == "mean") return 1.0 / std::max<int64_t>(mu.numel(), 1);
  if (reduction == "batchmean") return 1.0 / std::max<int64_t>(mu.size(0), 1);
  return 1.0;
}

// One fused multiply-add, so reparameterize and reparameterize_with_kl give identical z.
inline Vec sample(const Vec& mu, const Vec& std_dev, const Vec& eps) { return at::vec::fmadd(std_dev, eps, mu); }

inline Vec kl_of(const Vec& mu, const Vec& logvar, const Vec& var) {
  return Vec(-0.5f) * (Vec(1.0f) + logvar - mu * mu - var);
}

Tensor reduced(double sum, c10::string_view reduction, const Tensor& mu) {
  Tensor out = at::empty({}, mu.options().dtype(at::kFloat));
  *out.data_ptr<float>() = static_cast<float>(sum * reduction_scale(reduction, mu));
  return out;
}

Tensor reparameterize(const Tensor& mu, const Tensor& logvar, const OptTensor& noise, int64_t seed,
                      const OptTensor& seed_tensor, int64_t offset) {
  Tensor z = empty_output(mu);
  const Tensor given = float_noise(noise);
  const Noise nz = make_noise(given, seed, seed_tensor, offset);
  dispatch_float(mu.scalar_type(), "reparameterize", [&](auto tag) {
    using T = decltype(tag);
    const T *m = mu.data_ptr<T>(), *lv = logvar.data_ptr<T>();
    T* out = z.data_ptr<T>();
    run_blocks(mu.numel(), &nz, [&](int64_t b, int n, const float* eps) {
      vec_steps(n, [&](int j, int k) {
        const Vec std_dev = exp_fast(load_float(lv + b + j, k) * Vec(0.5f));
        store_float(out + b + j, sample(load_float(m + b + j, k), std_dev, Vec::loadu(eps + j, k)), k);
      });
      return 0.f;
    });
  });
  return z;
}

Tensor reparameterize_backward(const Tensor& grad_z, const Tensor& logvar, const OptTensor& noise, int64_t seed,
                               const OptTensor& seed_tensor, int64_t offset) {
  Tensor grad_logvar = empty_output(logvar);
  const Tensor given = float_noise(noise);
  const Noise nz = make_noise(given, seed, seed_tensor, offset);
  // grad_z comes from autograd in z's dtype, which is logvar's.
  const Tensor gz = grad_z.to(logvar.scalar_type()).contiguous();
  dispatch_float(logvar.scalar_type(), "reparameterize_backward", [&](auto tag) {
    using T = decltype(tag);
    const T *g = gz.data_ptr<T>(), *lv = logvar.data_ptr<T>();
    T* out = grad_logvar.data_ptr<T>();
    run_blocks(logvar.numel(), &nz, [&](int64_t b, int n, const float* eps) {
      vec_steps(n, [&](int j, int k) {
        const Vec std_dev = exp_fast(load_float(lv + b + j, k) * Vec(0.5f));
        store_float(out + b + j, Vec(0.5f) * load_float(g + b + j, k) * std_dev * Vec::loadu(eps + j, k), k);
      });
      return 0.f;
    });
  });
  return grad_logvar;
}

Tensor gaussian_kl(const Tensor& mu, const Tensor& logvar, c10::string_view reduction) {
  const bool elementwise = is_elementwise(reduction);
  Tensor kl = elementwise ? empty_output(mu) : Tensor();
  double sum = 0.0;
  dispatch_float(mu.scalar_type(), "gaussian_kl", [&](auto tag) {
    using T = decltype(tag);
    const T *m = mu.data_ptr<T>(), *lv = logvar.data_ptr<T>();
    T* out = elementwise ? kl.data_ptr<T>() : nullptr;
    sum = run_blocks(mu.numel(), nullptr, [&](int64_t b, int n, const float*) {
      Vec acc(0.0f);
      vec_steps(n, [&](int j, int k) {
        const Vec l = load_float(lv + b + j, k);
        const Vec v = kl_of(load_float(m + b + j, k), l, exp_fast(l));
        if (elementwise) {
          store_float(out + b + j, v, k);
        } else {
          acc = acc + Vec::set(Vec(0.0f), v, k);
        }
      });
      return elementwise ? 0.f : lane_sum(acc);
    });
  });
  return elementwise ? kl : reduced(sum, reduction, mu);
}

std::tuple<Tensor, Tensor> gaussian_kl_backward(const Tensor& grad_kl, const Tensor& mu, const Tensor& logvar,
                                                c10::string_view reduction) {
  const bool elementwise = is_elementwise(reduction);
  Tensor grad_mu = empty_output(mu), grad_logvar = empty_output(logvar);
  const Tensor gk = elementwise ? grad_kl.to(mu.scalar_type()).contiguous() : Tensor();
  const float g0 = elementwise ? 0.f : static_cast<float>(grad_kl.item<double>() * reduction_scale(reduction, mu));
  dispatch_float(mu.scalar_type(), "gaussian_kl_backward", [&](auto tag) {
    using T = decltype(tag);
    const T *m = mu.data_ptr<T>(), *lv = logvar.data_ptr<T>();
    const T* g = elementwise ? gk.data_ptr<T>() : nullptr;
    T *gm = grad_mu.data_ptr<T>(), *gl = grad_logvar.data_ptr<T>();
    run_blocks(mu.numel(), nullptr, [&](int64_t b, int n, const float*) {
      vec_steps(n, [&](int j, int k) {
        const Vec gv = elementwise ? load_float(g + b + j, k) : Vec(g0);
        store_float(gm + b + j, gv * load_float(m + b + j, k), k);
        store_float(gl + b + j, Vec(0.5f) * gv * (exp_fast(load_float(lv + b + j, k)) - Vec(1.0f)), k);
      });
      return 0.f;
    });
  });
  return {grad_mu, grad_logvar};
}

std::tuple<Tensor, Tensor> reparameterize_with_kl(const Tensor& mu, const Tensor& logvar, int64_t seed,
                                                  const OptTensor& seed_tensor, int64_t offset,
                                                  c10::string_view reduction) {
  const bool elementwise = is_elementwise(reduction);
  Tensor z = empty_output(mu);
  Tensor kl = elementwise ? empty_output(mu) : Tensor();
  const Noise nz = make_noise(Tensor(), seed, seed_tensor, offset);
  double sum = 0.0;
  dispatch_float(mu.scalar_type(), "reparameterize_with_kl", [&](auto tag) {
    using T = decltype(tag);
    const T *m = mu.data_ptr<T>(), *lv = logvar.data_ptr<T>();
    T* zo = z.data_ptr<T>();
    T* ko = elementwise ? kl.data_ptr<T>() : nullptr;
    sum = run_blocks(mu.numel(), &nz, [&](int64_t b, int n, const float* eps) {
      Vec acc(0.0f);
      vec_steps(n, [&](int j, int k) {
        const Vec mv = load_float(m + b + j, k), l = load_float(lv + b + j, k);
        const Vec std_dev = exp_fast(l * Vec(0.5f));
        store_float(zo + b + j, sample(mv, std_dev, Vec::loadu(eps + j, k)), k);
        const Vec v = kl_of(mv, l, std_dev * std_dev);
        if (elementwise) {
          store_float(ko + b + j, v, k);
        } else {
          acc = acc + Vec::set(Vec(0.0f), v, k);
        }
      });
      return elementwise ? 0.f : lane_sum(acc);
    });
  });
  return {z, elementwise ? kl : reduced(sum, reduction, mu)};
}

std::tuple<Tensor, Tensor> reparameterize_with_kl_backward(const Tensor& grad_z, const Tensor& grad_kl,
                                                           const Tensor& mu, const Tensor& logvar, int64_t seed,
                                                           const OptTensor& seed_tensor, int64_t offset,
                                                           c10::string_view reduction) {
  const bool elementwise = is_elementwise(reduction);
  Tensor grad_mu = empty_output(mu), grad_logvar = empty_output(logvar);
  const Tensor gz = grad_z.to(mu.scalar_type()).contiguous();
  const Tensor gk = elementwise ? grad_kl.to(mu.scalar_type()).contiguous() : Tensor();
  const float g0 = elementwise ? 0.f : static_cast<float>(grad_kl.item<double>() * reduction_scale(reduction, mu));
  const Noise nz = make_noise(Tensor(), seed, seed_tensor, offset);
  dispatch_float(mu.scalar_type(), "reparameterize_with_kl_backward", [&](auto tag) {
    using T = decltype(tag);
    const T *m = mu.data_ptr<T>(), *lv = logvar.data_ptr<T>(), *g = gz.data_ptr<T>();
    const T* gkp = elementwise ? gk.data_ptr<T>() : nullptr;
    T *gm = grad_mu.data_ptr<T>(), *gl = grad_logvar.data_ptr<T>();
    run_blocks(mu.numel(), &nz, [&](int64_t b, int n, const float* eps) {
      vec_steps(n, [&](int j, int k) {
        const Vec gkv = elementwise ? load_float(gkp + b + j, k) : Vec(g0);
        const Vec gzv = load_float(g + b + j, k);
        const Vec std_dev = exp_fast(load_float(lv + b + j, k) * Vec(0.5f));
        store_float(gm + b + j, gzv + gkv * load_float(m + b + j, k), k);
        store_float(gl + b + j,
                    Vec(0.5f) * (gzv * std_dev * Vec::loadu(eps + j, k) + gkv * (std_dev * std_dev - Vec(1.0f))), k);
      });
      return 0.f;
    });
  });
  return {grad_mu, grad_logvar};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(genfast_cpu, m) {
  m.def("reparameterize", &reparameterize);
  m.def("reparameterize_backward", &reparameterize_backward);
  m.def("gaussian_kl", &gaussian_kl);
  m.def("gaussian_kl_backward", &gaussian_kl_backward);
  m.def("reparameterize_with_kl", &reparameterize_with_kl);
  m.def("reparameterize_with_kl_backward", &reparameterize_with_kl_backward);
}

}  // namespace genfast::cpu
