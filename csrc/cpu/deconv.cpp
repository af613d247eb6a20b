// ConvTranspose2d to a few output channels on the CPU: an image generator's
// last layer (DCGAN: 64 -> 3 channels, 4x4 kernel, stride 2, 32x32 -> 64x64),
// fp32, from a channels_last input, with the activation after it (tanh) fused.
//
// Such a layer is 3% of a DCGAN generator's multiply-adds, but on PyTorch's
// GEMM + col2im kernel (oneDNN's is 2x slower there), with that kernel's zero
// fill and a separate tanh, it took 12% of the generator's time at batch 64.
// Here each output pixel gathers its taps directly: output row (n, oh) and
// column ow of phase b = (ow + pad) % stride see the kernel rows kh with
// (oh + pad - kh) % stride == 0 and the kernel columns kw = b, b + stride,
// ...; each tap is one input pixel's Cin channels (contiguous in
// channels_last) dotted with the weight's Cin values for that (kh, kw, output
// channel). Eight pixels of one phase go together, so each weight vector
// loaded serves eight FMAs, and their 8 x 4 (pixel, channel) vector sums are
// reduced as two transposing sums of 16 vectors. A tap outside the input
// reads a row of zeros instead of branching.
//
// Work: Cin * taps multiply-adds per output value, 64 * 4 * 3 per pixel at
// DCGAN's layer: 201 M at batch 64, 12.6 M FMAs of 16 lanes, 3.5 ms on one
// core at one FMA a cycle (3.64 GHz); the data (16 MB in, 3 MB out) is a few
// hundred microseconds. Measured (2-core AMD EPYC, Zen 4), that layer with its
// tanh: 7.4 ms on one thread (1.76 cycles an FMA; 1.42 with the input in L2,
// at batch 1: the reductions, the taps' pointers and the scattered stores
// take the rest), 3.5-3.6 ms on two, where GEMM + col2im and a tanh took
// 12.9 and 6.4-6.6 ms and oneDNN's kernel alone 11.1-11.3. The DCGAN
// generator (benchmarks/e2e/gan.py) went from 855-882 to 936-941 images/s.
#include "cpu/ops.h"

#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "cpu/common.h"

namespace genfast::cpu {
namespace {

constexpr int kPix = 8;    // output pixels of one phase computed together
constexpr int kMaxCo = 4;  // output channels this kernel takes

// tanh within 2 ulp (1.9e-7 relative at most over [-12, 12]; 0.9 ms of the layer's 7.4 on one
// thread, where ATen's vectorized tanh took twice that): |y| < 0.4 by its odd Taylor series to
// y^13 (the next term is under 4e-9 of y there), above it (1 - t) / (1 + t) with t = exp(-2|y|),
// whose 1 - t no longer cancels (t < 0.45).
inline Vec tanh_fast(const Vec& y) {
  const Vec a = y.abs(), z = y * y;
  Vec p(21844.f / 6081075.f);
  p = at::vec::fmadd(p, z, Vec(-1382.f / 155925.f));
  p = at::vec::fmadd(p, z, Vec(62.f / 2835.f));
  p = at::vec::fmadd(p, z, Vec(-17.f / 315.f));
  p = at::vec::fmadd(p, z, Vec(2.f / 15.f));
  p = at::vec::fmadd(p, z, Vec(-1.f / 3.f));
  const Vec small = at::vec::fmadd(p * z, y, y);
  const Vec t = exp_neg_fast(a + a);
  const Vec large = (Vec(1.f) - t) / (Vec(1.f) + t);
  const Vec signed_large = Vec::blendv(large, -large, y < Vec(0.f));
  return Vec::blendv(signed_large, small, a < Vec(0.4f));
}

struct Deconv {
  int64_t N, Cin, H, W, Cout, OH, OW, KH, KW, sh, sw, ph, pw;
  bool tanh;
};

// Output row (n, oh): every phase's pixels, kPix at a time. wp: the weight packed as
// [kh][kw][co][ci]; zeros: Cin zeros, the row of a tap outside the input.
template <int CO>
void deconv_row(const Deconv& d, const float* x, const float* wp, const float* bias, const float* zeros, float* out,
                int64_t n, int64_t oh) {
  constexpr int V = Vec::size();
  // The kernel rows that reach this output row: kh = kh0 + i * sh reads input row ih0 - i.
  const int64_t kh0 = (oh + d.ph) % d.sh, ih0 = (oh + d.ph - kh0) / d.sh;
  for (int64_t b = 0; b < d.sw; ++b) {
    // Phase b's columns ow0, ow0 + sw, ...: tap kw = b + j * sw of column ow0 + k * sw reads input
    // column ib0 + k - j.
    const int64_t ow0 = ((b - d.pw) % d.sw + d.sw) % d.sw, ib0 = (ow0 + d.pw - b) / d.sw;
    for (int64_t g = ow0, ib = ib0; g < d.OW; g += kPix * d.sw, ib += kPix) {
      Vec acc[kPix][CO];
      for (int q = 0; q < kPix; ++q)
        for (int co = 0; co < CO; ++co) acc[q][co] = Vec(0.f);
      for (int64_t kh = kh0, ih = ih0; kh < d.KH; kh += d.sh, --ih) {
        if (ih < 0 || ih >= d.H) continue;
        const float* xrow = x + (n * d.H + ih) * d.W * d.Cin;
        for (int64_t kw = b, j = 0; kw < d.KW; kw += d.sw, ++j) {
          const float* px[kPix];  // the tap's input pixel for each of the kPix output pixels
          for (int q = 0; q < kPix; ++q) {
            const int64_t iw = ib + q - j;
            px[q] = g + q * d.sw < d.OW && iw >= 0 && iw < d.W ? xrow + iw * d.Cin : zeros;
          }
          const float* w = wp + (kh * d.KW + kw) * CO * d.Cin;
          // the tap's CO weight vectors loaded once for the kPix pixels (whole vectors, then a tail)
          auto step = [&](int64_t c, int m) {
            Vec wv[CO];
            for (int co = 0; co < CO; ++co) wv[co] = m == V ? Vec::loadu(w + co * d.Cin + c) : Vec::loadu(w + co * d.Cin + c, m);
            for (int q = 0; q < kPix; ++q) {
              Vec xv = m == V ? Vec::loadu(px[q] + c) : Vec::loadu(px[q] + c, m);
#if defined(CPU_CAPABILITY_AVX512)
              // Held in a register: GCC would fold the load into each of the CO FMAs, loading it
              // CO times (with this and eight pixels a step instead of four, the layer without
              // tanh took 6.5 instead of 8.1 ms on one thread).
              __m512 xr = xv;
              asm("" : "+v"(xr));
              xv = xr;
#endif
              for (int co = 0; co < CO; ++co) acc[q][co] = at::vec::fmadd(xv, wv[co], acc[q][co]);
            }
          };
          int64_t c = 0;
          for (; c + V <= d.Cin; c += V) step(c, V);
          if (c < d.Cin) step(c, static_cast<int>(d.Cin - c));
        }
      }
      // lane q * kMaxCo + co of r: pixel q's output channel co
      alignas(64) float r[kPix * kMaxCo];
#if defined(CPU_CAPABILITY_AVX512)
      for (int h = 0; h < kPix / 4; ++h) {  // 4 pixels x 4 channel slots: one transposing sum
        __m512 v[16];
        for (int q = 0; q < 4; ++q)
          for (int co = 0; co < kMaxCo; ++co)
            v[q * kMaxCo + co] = co < CO ? __m512(acc[h * 4 + q][co]) : _mm512_setzero_ps();
        Vec y = Vec(sum16(v)) + Vec::loadu(bias);
        if (d.tanh) y = tanh_fast(y);
        y.store(r + h * 16);
      }
#else
      for (int q = 0; q < kPix; ++q)
        for (int co = 0; co < kMaxCo; ++co) {
          const float s = co < CO ? lane_sum(acc[q][co]) + bias[co] : 0.f;
          r[q * kMaxCo + co] = d.tanh ? std::tanh(s) : s;
        }
#endif
      for (int q = 0; q < kPix; ++q) {
        const int64_t ow = g + q * d.sw;
        if (ow >= d.OW) break;
        for (int co = 0; co < CO; ++co) out[((n * d.Cout + co) * d.OH + oh) * d.OW + ow] = r[q * kMaxCo + co];
      }
    }
  }
}

}  // namespace

Tensor conv_transpose_few(const Tensor& x, const Tensor& weight, const OptTensor& bias, c10::IntArrayRef stride,
                          c10::IntArrayRef padding, c10::IntArrayRef output_padding, c10::string_view activation) {
  TORCH_CHECK(x.dim() == 4 && x.scalar_type() == at::kFloat && x.is_contiguous(at::MemoryFormat::ChannelsLast),
              "conv_transpose_few: x must be a 4D fp32 channels_last tensor");
  TORCH_CHECK(weight.dim() == 4 && weight.scalar_type() == at::kFloat && weight.size(0) == x.size(1) &&
                  weight.size(1) >= 1 && weight.size(1) <= kMaxCo,
              "conv_transpose_few: weight must be (Cin, Cout <= 4, KH, KW) fp32");
  TORCH_CHECK(stride.size() == 2 && padding.size() == 2 && output_padding.size() == 2 && stride[0] > 0 &&
                  stride[1] > 0 && padding[0] >= 0 && padding[1] >= 0,
              "conv_transpose_few: stride, padding and output_padding must be pairs");
  TORCH_CHECK(activation == "none" || activation == "tanh", "conv_transpose_few: activation must be none or tanh");
  Deconv d{x.size(0), x.size(1), x.size(2), x.size(3), weight.size(1), 0, 0, weight.size(2), weight.size(3),
           stride[0], stride[1], padding[0], padding[1], activation == "tanh"};
  d.OH = (d.H - 1) * d.sh - 2 * d.ph + d.KH + output_padding[0];
  d.OW = (d.W - 1) * d.sw - 2 * d.pw + d.KW + output_padding[1];
  TORCH_CHECK(d.OH > 0 && d.OW > 0, "conv_transpose_few: empty output");
  Tensor out = empty_output({d.N, d.Cout, d.OH, d.OW}, x.options());
  if (d.N == 0) return out;
  // the weight as [kh][kw][co][ci]: a tap's Cin values per output channel, contiguous
  const int CO = static_cast<int>(d.Cout);
  const Tensor w = weight.contiguous();
  std::vector<float> wp(d.KH * d.KW * CO * d.Cin), zeros(d.Cin, 0.f);
  const float* ws = w.data_ptr<float>();
  for (int64_t ci = 0; ci < d.Cin; ++ci)
    for (int co = 0; co < CO; ++co)
      for (int64_t kh = 0; kh < d.KH; ++kh)
        for (int64_t kw = 0; kw < d.KW; ++kw)
          wp[((kh * d.KW + kw) * CO + co) * d.Cin + ci] = ws[((ci * CO + co) * d.KH + kh) * d.KW + kw];
  alignas(64) float bias_lanes[kPix * kMaxCo] = {};  // bias of lane q * kMaxCo + co
  if (bias.has_value()) {
    const Tensor bc = bias->contiguous();
    TORCH_CHECK(bc.numel() == d.Cout && bc.scalar_type() == at::kFloat, "conv_transpose_few: bias must be (Cout,)");
    for (int i = 0; i < kPix * kMaxCo; ++i) bias_lanes[i] = i % kMaxCo < CO ? bc.data_ptr<float>()[i % kMaxCo] : 0.f;
  }
  const float* xp = x.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, d.N * d.OH, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t n = r / d.OH, oh = r % d.OH;
      switch (CO) {
        case 1: deconv_row<1>(d, xp, wp.data(), bias_lanes, zeros.data(), op, n, oh); break;
        case 2: deconv_row<2>(d, xp, wp.data(), bias_lanes, zeros.data(), op, n, oh); break;
        case 3: deconv_row<3>(d, xp, wp.data(), bias_lanes, zeros.data(), op, n, oh); break;
        default: deconv_row<4>(d, xp, wp.data(), bias_lanes, zeros.data(), op, n, oh);
      }
    }
  });
  return out;
}

TORCH_LIBRARY_FRAGMENT(genfast_cpu, m) {
  m.def("conv_transpose_few", &conv_transpose_few);
}

}  // namespace genfast::cpu
