// Diffusion sampler steps on the CPU: one pass per step, guidance inside.
//
// Every supported sampler step is the affine map documented in
// genfast/reference/diffusion.py, with the step's coefficients in one row of
// an fp32 table (columns: ax am an | px pm p0 pn p1 p2 | h1x h1m h10 h11 h12 |
// h2x h2m h20 h21 h22 | pd on x0 - h1 | p3 h13 h23 | h3x h3m h30 h31 h32 h33).
// Tensors are walked in memory order (the Python layer guarantees dense tensors
// with identical strides, the batch outermost when a per-sample factor or bound
// is given). A bound (dynamic thresholding) clamps x0 to [-s, s] and divides by
// s, the sample's bound, before x0 is used.
//
// Bytes per element of s bytes: Euler/DDIM/flow-match with guidance read u, c,
// x and write prev: 4s (16 in fp32); DPM++ 2M also reads and writes its
// history: 6s. diffusers' step plus the pipeline's guidance ops run ~15-25
// full passes over fp32 temporaries. Noise for stochastic steps is drawn into
// a 256-float stack buffer per block, never through memory.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <tuple>
#include <vector>

#include "ops.h"
#include "philox.h"

namespace genfast::cpu {
namespace {

constexpr int kCoef = 29;
constexpr int64_t kChunk = 16 * kBlock;  // elements per parallel work item: 64 KiB of fp32 per input
constexpr int64_t kMinPerThread = 32768;  // elements a thread must get before a second one starts

enum Col {
  AX, AM, AN, PX, PM, P0, PN, P1, P2, H1X, H1M, H10, H11, H12, H2X, H2M, H20, H21, H22, PD,
  P3, H13, H23, H3X, H3M, H30, H31, H32, H33
};

template <typename T>
const T* ptr_or_null(const OptTensor& t) {
  return t.has_value() ? t->data_ptr<T>() : nullptr;
}

// The step's inputs and scalars, shared by every instantiation of the loop.
struct StepArgs {
  float k[kCoef];
  float g, lim;
  bool has_cond, has_noise, draw, do_clip;
  bool h1, h2, h3;  // which history buffers are given (any subset)
  const float *nz, *gf, *bd;
  PhiloxKey key{0};
  uint64_t first_counter;
  int64_t inner, chunks;
};

// Elements [start, stop) of batch b. kFast: no noise, clip, bound or per-sample
// factor, guidance fixed at compile time (kCond) and the histories the first kNh
// of h1, h2, h3, so the common steps run a loop with no untaken branches;
// otherwise every option is read at run time (kCond and kNh unused).
template <typename T, bool kFast, bool kCond, int kNh>
void step_range(const StepArgs& a, const T* xp, const T* up, const T* cp, T* h1p, T* h2p, T* h3p, T* pp, T* x0p,
                int64_t b, int64_t start, int64_t stop) {
  const float* k = a.k;
  const bool has_cond = kFast ? kCond : a.has_cond;
  const bool has_h1 = kFast ? kNh >= 1 : a.h1, has_h2 = kFast ? kNh >= 2 : a.h2, has_h3 = kFast ? kNh >= 3 : a.h3;
  const bool do_clip = !kFast && a.do_clip, use_gf = !kFast && a.gf != nullptr, use_bd = !kFast && a.bd != nullptr;
  const Vec ax(k[AX]), am(k[AM]), an(k[AN]), px(k[PX]), pm(k[PM]), p0(k[P0]), pn(k[PN]), p1(k[P1]), p2(k[P2]);
  const Vec pd(k[PD]), p3(k[P3]);
  const Vec w1x(k[H1X]), w1m(k[H1M]), w10(k[H10]), w11(k[H11]), w12(k[H12]), w13(k[H13]);
  const Vec w2x(k[H2X]), w2m(k[H2M]), w20(k[H20]), w21(k[H21]), w22(k[H22]), w23(k[H23]);
  const Vec w3x(k[H3X]), w3m(k[H3M]), w30(k[H30]), w31(k[H31]), w32(k[H32]), w33(k[H33]);
  const Vec gv(a.g), lo(-a.lim), hi(a.lim);
  const Vec scale(use_gf ? a.gf[b] : 1.0f);
  const float s_b = use_bd ? a.bd[b] : 1.0f;
  const Vec bhi(s_b), blo(-s_b);
  alignas(64) float buf[kBlock];
  for (int64_t s = start; s < stop; s += kBlock) {
    const int n = static_cast<int>(std::min<int64_t>(kBlock, stop - s));
    const float* eps = nullptr;
    if (!kFast && a.has_noise) {
      eps = a.nz + s;
    } else if (!kFast && a.draw) {
      stream_normals(a.key, a.first_counter + static_cast<uint64_t>(s), n, buf);
      eps = buf;
    }
    auto body = [&](int j, int w) {
      const int64_t i = s + j;
      const Vec x = load_float(xp + i, w);
      Vec m = load_float(up + i, w);
      if (has_cond) m = m + gv * (load_float(cp + i, w) - m);
      if (use_gf) m = m * scale;
      // Fused multiply-adds: one rounding per term. The coefficients of x and m
      // are often large and of opposite sign (x0 = (x - sigma m) / alpha), where
      // separate roundings would double the error of diffusers' own formula.
      Vec x0 = at::vec::fmadd(am, m, ax * x);
      Vec out = at::vec::fmadd(pm, m, px * x);
      if (eps != nullptr) {
        const Vec e = Vec::loadu(eps + j, w);
        x0 = at::vec::fmadd(an, e, x0);
        out = at::vec::fmadd(pn, e, out);
      }
      if (do_clip) x0 = at::vec::minimum(at::vec::maximum(x0, lo), hi);
      if (use_bd) x0 = at::vec::minimum(at::vec::maximum(x0, blo), bhi) / bhi;
      out = at::vec::fmadd(p0, x0, out);
      Vec h1(0.0f), h2(0.0f), h3(0.0f);
      if (has_h1) h1 = load_float(h1p + i, w);
      if (has_h2) h2 = load_float(h2p + i, w);
      if (has_h3) h3 = load_float(h3p + i, w);
      // consecutive x0 predictions nearly agree: difference them before scaling
      out = at::vec::fmadd(pd, x0 - h1, out);  // h1 is 0 without a history
      if (has_h1) out = at::vec::fmadd(p1, h1, out);
      if (has_h2) out = at::vec::fmadd(p2, h2, out);
      if (has_h3) out = at::vec::fmadd(p3, h3, out);
      // an absent history is 0: its terms add nothing
      if (has_h1) store_float(h1p + i, w1x * x + w1m * m + w10 * x0 + w11 * h1 + w12 * h2 + w13 * h3, w);
      if (has_h2) store_float(h2p + i, w2x * x + w2m * m + w20 * x0 + w21 * h1 + w22 * h2 + w23 * h3, w);
      if (has_h3) store_float(h3p + i, w3x * x + w3m * m + w30 * x0 + w31 * h1 + w32 * h2 + w33 * h3, w);
      store_float(pp + i, out, w);
      if (x0p != nullptr) store_float(x0p + i, x0, w);
    };
    // full vectors with a constant width (the loads and stores need no lane count), then the tail
    constexpr int V = Vec::size();
    int j = 0;
    for (; j + V <= n; j += V) body(j, V);
    if (j < n) body(j, n - j);
  }
}

std::tuple<Tensor, Tensor> sampler_step(const Tensor& sample, const Tensor& model_output, const OptTensor& cond,
                                        const OptTensor& noise, const OptTensor& history, const OptTensor& history2,
                                        const OptTensor& history3, const Tensor& coeffs, int64_t row,
                                        const OptTensor& row_tensor, double guidance_scale,
                                        const OptTensor& guidance_factor, double clip, const OptTensor& bound,
                                        bool draw_noise, int64_t seed, const OptTensor& seed_tensor, int64_t offset,
                                        bool return_x0) {
  Tensor prev = empty_output(sample);
  Tensor x0_out = return_x0 ? empty_output(sample) : at::empty({0}, sample.options());
  const int64_t numel = sample.numel();
  if (numel == 0) return {prev, x0_out};
  const int64_t r = row_tensor.has_value() ? row_tensor->item<int64_t>() : row;
  // a row tensor is read here, not checked by Python (a GPU's could not be without a sync)
  TORCH_CHECK_VALUE(r >= 0 && r < coeffs.size(0), "sampler_step: step ", r, " is outside the coefficient table's ",
                    coeffs.size(0), " rows");
  StepArgs a;
  std::copy_n(coeffs.data_ptr<float>() + r * kCoef, kCoef, a.k);
  a.g = static_cast<float>(guidance_scale);
  a.lim = static_cast<float>(clip);
  a.has_cond = cond.has_value();
  a.has_noise = noise.has_value();
  a.draw = draw_noise && !a.has_noise;
  a.do_clip = clip > 0;
  a.h1 = history.has_value();
  a.h2 = history2.has_value();
  a.h3 = history3.has_value();
  // the fast loops cover histories given in order (h2 only with h1, h3 only with both): every sampler's
  const int nh = a.h3 ? 3 : a.h2 ? 2 : a.h1 ? 1 : 0;
  const bool in_order = a.h1 == (nh >= 1) && a.h2 == (nh >= 2);
  a.key = PhiloxKey(a.draw ? resolve_seed(seed, seed_tensor) : 0);
  a.first_counter = static_cast<uint64_t>(offset) + static_cast<uint64_t>(r) * numel;
  a.nz = a.has_noise ? noise->data_ptr<float>() : nullptr;
  a.gf = guidance_factor.has_value() ? guidance_factor->data_ptr<float>() : nullptr;
  a.bd = bound.has_value() ? bound->data_ptr<float>() : nullptr;
  // the factor and the bound are both (B,): one batch split serves both
  const int64_t nbatch = guidance_factor.has_value() ? guidance_factor->numel()
                         : bound.has_value()         ? bound->numel()
                                                     : 1;
  a.inner = numel / nbatch;
  a.chunks = (a.inner + kChunk - 1) / kChunk;
  const bool fast = in_order && !a.has_noise && !a.draw && !a.do_clip && a.gf == nullptr && a.bd == nullptr;

  dispatch_float(sample.scalar_type(), "sampler_step", [&](auto tag) {
    using T = decltype(tag);
    const T *xp = sample.data_ptr<T>(), *up = model_output.data_ptr<T>(), *cp = ptr_or_null<T>(cond);
    T *h1p = a.h1 ? history->data_ptr<T>() : nullptr, *h2p = a.h2 ? history2->data_ptr<T>() : nullptr;
    T* h3p = a.h3 ? history3->data_ptr<T>() : nullptr;
    T *pp = prev.data_ptr<T>(), *x0p = return_x0 ? x0_out.data_ptr<T>() : nullptr;
    // the loop for these options, chosen once
    using Fn = void (*)(const StepArgs&, const T*, const T*, const T*, T*, T*, T*, T*, T*, int64_t, int64_t, int64_t);
    auto fast_loop = [&](auto count) -> Fn {
      constexpr int kNh = decltype(count)::value;
      return a.has_cond ? &step_range<T, true, true, kNh> : &step_range<T, true, false, kNh>;
    };
    Fn fn = &step_range<T, false, false, 0>;
    if (fast) {
      switch (nh) {
        case 0: fn = fast_loop(std::integral_constant<int, 0>{}); break;
        case 1: fn = fast_loop(std::integral_constant<int, 1>{}); break;
        case 2: fn = fast_loop(std::integral_constant<int, 2>{}); break;
        default: fn = fast_loop(std::integral_constant<int, 3>{}); break;
      }
    }
    // Threads only for >= kMinPerThread elements each: a latent of SD1.5 at batch 1
    // (16k elements) runs faster on one thread than it takes to wake a second.
    const int64_t items = nbatch * a.chunks;
    at::parallel_for(0, items, std::max<int64_t>(1, kMinPerThread / kChunk), [&](int64_t item_begin, int64_t item_end) {
      for (int64_t item = item_begin; item < item_end; ++item) {
        const int64_t b = item / a.chunks;
        const int64_t start = b * a.inner + (item % a.chunks) * kChunk;
        const int64_t stop = std::min(b * a.inner + a.inner, start + kChunk);
        fn(a, xp, up, cp, h1p, h2p, h3p, pp, x0p, b, start, stop);
      }
    });
  });
  return {prev, x0_out};
}

// Per sample: phi * std(cond) / std(cfg) + (1 - phi), unbiased std over the
// sample's elements. Sums of d and d^2 with d shifted by the sample's first
// element (no cancellation when the mean is large), per fixed-size chunk in
// fp64, then summed in chunk order: the result does not depend on threads.
Tensor guidance_rescale_factor(const Tensor& uncond, const Tensor& cond, double guidance_scale,
                               double guidance_rescale) {
  const int64_t nbatch = uncond.size(0);
  const int64_t inner = uncond.numel() / nbatch;
  const int64_t chunks = (inner + kChunk - 1) / kChunk;
  std::vector<double> part(nbatch * chunks * 4, 0.0);
  const float g = static_cast<float>(guidance_scale);
  dispatch_float(uncond.scalar_type(), "guidance_rescale_factor", [&](auto tag) {
    using T = decltype(tag);
    const T *up = uncond.data_ptr<T>(), *cp = cond.data_ptr<T>();
    at::parallel_for(0, nbatch * chunks, 1, [&](int64_t item_begin, int64_t item_end) {
      for (int64_t item = item_begin; item < item_end; ++item) {
        const int64_t b = item / chunks;
        const int64_t start = b * inner + (item % chunks) * kChunk;
        const int64_t stop = std::min(b * inner + inner, start + kChunk);
        const float u0 = static_cast<float>(up[b * inner]), c0 = static_cast<float>(cp[b * inner]);
        const Vec gv(g), c_shift(c0), g_shift(u0 + g * (c0 - u0));
        double* acc = part.data() + item * 4;
        for (int64_t s = start; s < stop; s += kBlock) {
          const int n = static_cast<int>(std::min<int64_t>(kBlock, stop - s));
          Vec s1c(0.0f), s2c(0.0f), s1g(0.0f), s2g(0.0f);
          vec_steps(n, [&](int j, int w) {
            const Vec u = load_float(up + s + j, w), c = load_float(cp + s + j, w);
            // masked lanes load as 0: zero their shifted values too
            const Vec dc = Vec::set(Vec(0.0f), c - c_shift, w);
            const Vec dg = Vec::set(Vec(0.0f), u + gv * (c - u) - g_shift, w);
            s1c = s1c + dc;
            s2c = s2c + dc * dc;
            s1g = s1g + dg;
            s2g = s2g + dg * dg;
          });
          const Vec* sums[4] = {&s1c, &s2c, &s1g, &s2g};
          for (int q = 0; q < 4; ++q) {
            alignas(64) float lanes[Vec::size()];
            sums[q]->store(lanes);
            double t = 0.0;
            for (int l = 0; l < Vec::size(); ++l) t += lanes[l];
            acc[q] += t;
          }
        }
      }
    });
  });
  Tensor out = at::empty({nbatch}, uncond.options().dtype(at::kFloat));
  float* o = out.data_ptr<float>();
  const double n = static_cast<double>(inner);
  for (int64_t b = 0; b < nbatch; ++b) {
    double s[4] = {0, 0, 0, 0};
    for (int64_t c = 0; c < chunks; ++c)
      for (int q = 0; q < 4; ++q) s[q] += part[(b * chunks + c) * 4 + q];
    const double var_c = (s[1] - s[0] * s[0] / n) / (n - 1), var_g = (s[3] - s[2] * s[2] / n) / (n - 1);
    o[b] = static_cast<float>(guidance_rescale * std::sqrt(var_c / var_g) + (1.0 - guidance_rescale));
  }
  return out;
}

}  // namespace

// The per-step call of the scheduler twins, bound to Python directly (ops.cpp):
// sampler_step without a noise tensor, rescale or thresholding, when every
// tensor is as the kernel takes it (contiguous, of the sample's sizes and
// dtype, on the CPU; the table fp32 (S, kCoef) with the row in it, a row
// tensor on the CPU); otherwise nothing, and the caller takes the checked
// path. These checks cost nanoseconds here and ~2 us in Python, a third of a
// step at SD1.5 batch 1.
std::optional<std::tuple<Tensor, Tensor>> sampler_step_plain(
    const Tensor& sample, const Tensor& model_output, const OptTensor& cond, const OptTensor& history,
    const OptTensor& history2, const OptTensor& history3, const Tensor& coeffs, int64_t row,
    const OptTensor& row_tensor, double guidance_scale, double clip, bool draw_noise, int64_t seed,
    const OptTensor& seed_tensor, bool return_x0) {
  const auto dtype = sample.scalar_type();
  const auto like = [&](const Tensor& t) {
    return t.is_contiguous() && t.scalar_type() == dtype && t.device() == sample.device() &&
           t.sizes() == sample.sizes();
  };
  const auto absent_or_like = [&](const OptTensor& t) { return !t.has_value() || like(*t); };
  const bool kernel_dtype = dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16;
  const bool table = coeffs.scalar_type() == at::kFloat && coeffs.is_contiguous() && coeffs.dim() == 2 &&
                     coeffs.size(1) == kCoef && coeffs.device().is_cpu();
  const bool row_tensor_ok = !row_tensor.has_value() || (row_tensor->device().is_cpu() && row_tensor->numel() == 1);
  if (!(kernel_dtype && like(sample) && sample.device().is_cpu() && like(model_output) && absent_or_like(cond) &&
        absent_or_like(history) && absent_or_like(history2) && absent_or_like(history3) && table && row_tensor_ok))
    return std::nullopt;
  const int64_t r = row_tensor.has_value() ? row_tensor->item<int64_t>() : row;
  if (r < 0 || r >= coeffs.size(0)) return std::nullopt;
  return sampler_step(sample, model_output, cond, std::nullopt, history, history2, history3, coeffs, row,
                      row_tensor, guidance_scale, std::nullopt, clip, std::nullopt, draw_noise, seed, seed_tensor, 0,
                      return_x0);
}

TORCH_LIBRARY_FRAGMENT(genfast_cpu, m) {
  // Explicit schema: the history buffers are updated in place.
  m.def("sampler_step(Tensor sample, Tensor model_output, Tensor? cond, Tensor? noise, Tensor(a!)? history, "
        "Tensor(b!)? history2, Tensor(c!)? history3, Tensor coeffs, int row, Tensor? row_tensor, "
        "float guidance_scale, Tensor? guidance_factor, float clip, Tensor? bound, bool draw_noise, int seed, "
        "Tensor? seed_tensor, int offset, bool return_x0) -> (Tensor, Tensor)",
        &sampler_step);
  m.def("guidance_rescale_factor", &guidance_rescale_factor);
}

}  // namespace genfast::cpu
