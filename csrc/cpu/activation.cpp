// Gated activations on the CPU: out = h * act(gate) over the two halves of
// each row of x (..., 2F) plus an optional bias (2F,), forward and backward,
// one pass each.
//
// Bytes per output element (F of them per row), s bytes per element (4 for
// fp32): the forward reads h and gate and writes out, 3s; the backward reads
// grad_out, h and gate and writes grad_h and grad_gate, 5s. Eager PyTorch
// (diffusers' GEGLU: x.chunk, F.gelu(gate), h * that) reads the strided gate
// and writes a fresh act(gate), then reads h and act(gate) and writes out: 5s
// and two outputs to allocate; its autograd backward about 9s.
//
// Rows are split between threads (at least kGrainElems outputs a task), the
// F columns of a row run in 16-lane fp32 vectors; bf16/fp16 are widened on
// load and rounded once on store. Past the bytes, the work is the activation:
// "gelu" an erf (erf_fast), "gelu_tanh" and "silu" a sigmoid from exp_neg_fast,
// ~20-35 vector ops per 16 elements, so on one core these kernels are
// compute-bound whenever the data come from L3 (see the table below).
//
// Measured (benchmarks/bench_conv.py, `python -m genfast bench --device cpu
// --ops gated_act`, activation "gelu"): 2-core Xeon with AVX-512 (a VM), torch
// 2.13, 1 thread, another process busy on the other core (load average 1.6);
// copy bandwidth in the same run 13.8 GB/s (512 MiB buffers, 1 thread). GB/s
// counts the minimum traffic above (3 elements per output forward, 8 forward
// + backward); x is eager GEGLU's / torch.compile's time over genfast's.
//
//   mode     x shape           dtype   ms    GB/s  %copy  x eager  x compile
//   fwd      (2, 4096, 2560)   fp32    8.47  14.8   107%   4.58     2.84
//   fwd      (2, 4096, 2560)   bf16    7.02   9.0    65%   3.45     1.11
//   fwd      (2, 1024, 5120)   fp32    2.53  24.9   180%   2.42     1.29
//   fwd      (2, 1024, 5120)   bf16    3.27   9.6    70%   1.56     1.10
//   fwd      (2, 1024, 512)    fp32    0.34  18.2   132%   1.81     1.31
//   fwd      (2, 1024, 512)    bf16    0.35   9.1    65%   1.57     1.34
//   fwd+bwd  (2, 4096, 2560)   fp32   22.04  15.2   110%   6.13     3.19
//   fwd+bwd  (2, 4096, 2560)   bf16   20.11   8.3    60%   2.85     2.48
//   fwd+bwd  (2, 1024, 5120)   fp32    8.10  20.7   150%   4.01     1.42
//   fwd+bwd  (2, 1024, 5120)   bf16    8.61   9.7    70%   2.20     1.19
//   fwd+bwd  (2, 1024, 512)    fp32    0.84  19.9   144%   2.53     1.37
//   fwd+bwd  (2, 1024, 512)    bf16    1.09   7.7    55%   1.55     1.16
//
// Every working set fits in the 480 MB L3 by size (the largest, fwd+bwd at
// (2, 4096, 2560) fp32, touches 252 MB), hence more than copy bandwidth at the
// smaller shapes; at (2, 4096, 2560) (126 MB forward) the rate falls to the
// copy's, as if served from memory: the L3 is shared beyond this VM. Outputs
// of 32 MB and more come back from PyTorch's allocator as fresh pages to
// fault in, every call, for eager and torch.compile; genfast's come from
// its pool (pool.cpp), part of the large-shape gap. bf16 runs at the same
// time per element as fp32 or slower: one core is compute-bound here (the
// erf / sigmoid plus the widening and rounding), not memory-bound.
// Two threads could not be timed reliably on this shared machine (medians
// landed on multiples of the scheduler's 4 ms slice); where they were not
// hit, fwd at (2, 1024, 5120) fp32 took 1.34 ms (1.9x one thread).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/string_view.h>
#include <torch/library.h>

#include <climits>
#include <cstdint>
#include <vector>

#include "common.h"
#include "ops.h"

namespace genfast::cpu {
namespace {

enum class Act { kGelu, kGeluTanh, kSilu };

template <Act A>
struct ActTag {
  static constexpr Act value = A;
};

Act parse_activation(c10::string_view name) {
  if (name == "gelu") return Act::kGelu;
  if (name == "gelu_tanh") return Act::kGeluTanh;
  TORCH_CHECK(name == "silu", "gated_act: unknown activation ", name);
  return Act::kSilu;
}

// Instantiates the loops once per activation: no branch per element.
template <typename F>
void dispatch_act(Act act, F&& f) {
  switch (act) {
    case Act::kGelu: return f(ActTag<Act::kGelu>{});
    case Act::kGeluTanh: return f(ActTag<Act::kGeluTanh>{});
    case Act::kSilu: return f(ActTag<Act::kSilu>{});
  }
}

constexpr float kSqrtHalf = 0.70710678118654752f;
constexpr float kInvSqrt2Pi = 0.39894228040143268f;
constexpr float kSqrt2OverPi = 0.79788456080286536f;
constexpr float kTanhCubic = 0.044715f;
// exp's argument in the backward's sigmoids stays below this, so that e = exp(-z)
// and s = 1 / (1 + e) stay finite and normal and 1 - s = e * s holds; beyond it the
// true gradient is below 1e-33.
constexpr float kMaxExpArg = 80.f;

// z for the sigmoid s(z) = 1 / (1 + exp(-z)) that each activation is made of:
// silu(g) = g s(g); gelu_tanh(g) = g (1 + tanh(u)) / 2 = g s(2u), u = sqrt(2/pi) (g + 0.044715 g^3).
template <Act A>
inline Vec sigmoid_arg(const Vec& g) {
  if constexpr (A == Act::kSilu) {
    return g;
  } else {
    return Vec(2.f * kSqrt2OverPi) * g * (Vec(1.f) + Vec(kTanhCubic) * g * g);
  }
}

// erf by Abramowitz & Stegun 7.1.26 (|error| <= 1.5e-7), the formula of ATen's
// Vectorized<float>::erf, with exp_neg_fast in place of its Sleef exp. Exact GELU
// from it, g = -12..12 in steps of 1.2e-5 against fp64: worst |error| / (1 + |gelu|)
// 2.6e-7 (F.gelu's own vectorized path: 1.1e-6; libm's erf rounded to fp32:
// 8e-8), and the kernel at (2, 256, 2*2560) fp32, 1 thread, took 0.68 ms instead
// of 0.85 ms with the Sleef exp (2-core Xeon); exp_neg_fast in place of exp_fast
// then left the error as it was and took it from 0.69-0.71 to 0.60-0.64 ms (AMD
// EPYC). (Tried and dropped: vrcp14ps + a Newton step for the divides here and in
// the sigmoids; no faster, measured in L2.)
inline Vec erf_fast(const Vec& x) {
  const Vec t = Vec(1.f) / at::vec::fmadd(Vec(0.3275911f), x.abs(), Vec(1.f));
  Vec r = at::vec::fmadd(Vec(1.061405429f), t, Vec(-1.453152027f));
  r = at::vec::fmadd(r, t, Vec(1.421413741f));
  r = at::vec::fmadd(r, t, Vec(-0.284496736f));
  r = at::vec::fmadd(r, t, Vec(0.254829592f));
  const Vec erf_abs = Vec(1.f) - r * t * exp_neg_fast(x * x);
  return Vec::blendv(erf_abs, erf_abs.neg(), x < Vec(0.f));
}

template <Act A>
inline Vec activate(const Vec& g) {
  if constexpr (A == Act::kGelu) {
    return Vec(0.5f) * g * (Vec(1.f) + erf_fast(g * Vec(kSqrtHalf)));
  } else {
    // exp overflows to inf for very negative g: g / inf = -0, the limit.
    return g / (Vec(1.f) + exp_neg_fast(sigmoid_arg<A>(g)));
  }
}

// act(g) and act'(g) together: they share the erf / the sigmoid.
template <Act A>
inline void activate_and_grad(const Vec& g, Vec& a, Vec& da) {
  if constexpr (A == Act::kGelu) {
    const Vec cdf = Vec(0.5f) * (Vec(1.f) + erf_fast(g * Vec(kSqrtHalf)));
    a = g * cdf;
    da = cdf + g * exp_neg_fast(Vec(0.5f) * g * g) * Vec(kInvSqrt2Pi);
  } else {
    const Vec e = exp_neg_fast(at::vec::maximum(sigmoid_arg<A>(g), Vec(-kMaxExpArg)));
    const Vec s = Vec(1.f) / (Vec(1.f) + e);
    const Vec one_minus_s = e * s;  // not 1 - s: no cancellation where s is near 1
    a = g * s;
    if constexpr (A == Act::kSilu) {
      da = s * (Vec(1.f) + g * one_minus_s);
    } else {
      // d s(2u) / dg = 2 s (1 - s) u',  u' = sqrt(2/pi) (1 + 3 * 0.044715 g^2)
      const Vec du = Vec(2.f * kSqrt2OverPi) * (Vec(1.f) + Vec(3.f * kTanhCubic) * g * g);
      da = s + g * s * one_minus_s * du;
    }
  }
}

// Rows per task: at least kGrainElems output elements, so that a small tensor
// stays on the calling thread. Measured with a grain of 1 (fp32, F = 256,
// median us, 1 vs 2 threads, sizes where the loaded machine's scheduler did
// not stall the second thread): gelu 8K outputs 7.0 vs 8.4, 16K 10.1 vs 8.3,
// 32K 17.0 vs 11.4; silu 8K 5.8 vs 5.8, 16K 7.6 vs 7.0. Splitting pays from
// ~16K outputs, so tensors under 32K stay on one thread, larger ones give
// each thread >= 16K.
constexpr int64_t kGrainElems = 16384;

int64_t grain_rows(int64_t f) { return std::max<int64_t>(1, kGrainElems / std::max<int64_t>(f, 1)); }

// What the forward and the backward share: the activation, the halves' width
// f of rows of 2f, and the bias as fp32 (2f values, converted once per call).
struct Gate {
  Act act;
  int64_t two_f, f, rows;
  std::vector<float> bias;

  Gate(const Tensor& x, const OptTensor& b, c10::string_view activation, const char* fn)
      : act(parse_activation(activation)), two_f(x.size(-1)), f(two_f / 2), rows(two_f ? x.numel() / two_f : 0) {
    TORCH_CHECK(f <= INT_MAX, fn, ": the last dimension of x is too large: ", two_f);
    if (!b.has_value()) return;
    bias.resize(two_f);
    dispatch_float(b->scalar_type(), fn, [&](auto tag) {
      using T = decltype(tag);
      const T* p = b->data_ptr<T>();
      for (int64_t i = 0; i < two_f; ++i) bias[i] = static_cast<float>(p[i]);
    });
  }
  const float* bias_ptr() const { return bias.empty() ? nullptr : bias.data(); }
};

// (h, gate) of row elements [j, j + k) as fp32 vectors, the bias added when there is one.
template <typename T>
inline void load_halves(const T* h, int64_t f, const float* bias, int j, int k, Vec& hv, Vec& gv) {
  hv = load_float(h + j, k);
  gv = load_float(h + f + j, k);
  if (bias) {
    hv = hv + Vec::loadu(bias + j, k);
    gv = gv + Vec::loadu(bias + f + j, k);
  }
}

std::vector<int64_t> halved_sizes(const Tensor& x) {
  std::vector<int64_t> sizes(x.sizes().begin(), x.sizes().end());
  sizes.back() /= 2;
  return sizes;
}

// The forward over rows [r_begin, r_end), bf16 stores as with_bf16_stores picks (common.h).
template <typename T, Act A, bool kNative>
GENFAST_BF16_TARGET void gated_rows(const T* xp, T* op, const float* bp, int64_t f, int64_t r_begin, int64_t r_end) {
  for (int64_t r = r_begin; r < r_end; ++r) {
    const T* h = xp + r * 2 * f;
    T* o = op + r * f;
    for (int j = 0, len = static_cast<int>(f); j < len; j += Vec::size()) {
      const int k = std::min<int>(Vec::size(), len - j);
      Vec hv, gv;
      load_halves(h, f, bp, j, k, hv, gv);
      store_out<T, kNative>(o + j, hv * activate<A>(gv), k);
    }
  }
}

Tensor gated_act(const Tensor& x, const OptTensor& bias, c10::string_view activation) {
  const Gate gate(x, bias, activation, "gated_act");
  const Act act = gate.act;
  const int64_t f = gate.f, rows = gate.rows;
  const float* bp = gate.bias_ptr();
  Tensor out = empty_output(halved_sizes(x), x.options());
  if (out.numel() == 0) return out;
  dispatch_float(x.scalar_type(), "gated_act", [&](auto tag) {
    using T = decltype(tag);
    const T* xp = x.data_ptr<T>();
    T* op = out.data_ptr<T>();
    dispatch_act(act, [&](auto act_tag) {
      constexpr Act A = decltype(act_tag)::value;
      with_bf16_stores<T>([&](auto native) {
        at::parallel_for(0, rows, grain_rows(f), [&](int64_t r_begin, int64_t r_end) {
          gated_rows<T, A, decltype(native)::value>(xp, op, bp, f, r_begin, r_end);
        });
      });
    });
  });
  return out;
}

Tensor gated_act_backward(const Tensor& grad_out, const Tensor& x, const OptTensor& bias,
                          c10::string_view activation) {
  const Gate gate(x, bias, activation, "gated_act_backward");
  const Act act = gate.act;
  const int64_t two_f = gate.two_f, f = gate.f, rows = gate.rows;
  const float* bp = gate.bias_ptr();
  Tensor grad_x = empty_output(x);
  if (x.numel() == 0) return grad_x;
  // grad_out comes from autograd in out's dtype, which is x's.
  const Tensor go = grad_out.to(x.scalar_type()).contiguous();
  dispatch_float(x.scalar_type(), "gated_act_backward", [&](auto tag) {
    using T = decltype(tag);
    const T *xp = x.data_ptr<T>(), *gp = go.data_ptr<T>();
    T* gxp = grad_x.data_ptr<T>();
    dispatch_act(act, [&](auto act_tag) {
      constexpr Act A = decltype(act_tag)::value;
      at::parallel_for(0, rows, grain_rows(f), [&](int64_t r_begin, int64_t r_end) {
        for (int64_t r = r_begin; r < r_end; ++r) {
          const T* h = xp + r * two_f;
          const T* d = gp + r * f;
          T* gh = gxp + r * two_f;
          T* gg = gh + f;
          vec_steps(static_cast<int>(f), [&](int j, int k) {
            Vec hv, gv, a, da;
            load_halves(h, f, bp, j, k, hv, gv);
            activate_and_grad<A>(gv, a, da);
            const Vec dv = load_float(d + j, k);
            store_float(gh + j, dv * a, k);
            store_float(gg + j, dv * hv * da, k);
          });
        }
      });
    });
  });
  return grad_x;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(genfast_cpu, m) {
  m.def("gated_act", &gated_act);
  m.def("gated_act_backward", &gated_act_backward);
}

}  // namespace genfast::cpu
