// Normalization + activation blocks on the CPU: GroupNorm + (add, FiLM)
// + activation + residual, forward and backward, NCHW and channels_last.
//
// Everything after the statistics is a per-(n, c) affine map of x followed by
// the activation, so the kernels fold weight, bias, add and scale_shift into
// three fp32 numbers per (n, c) and apply y = (x + d) * a + b in one pass;
// x + d = h - mean is formed first so that a large mean cancels exactly as in
// PyTorch's (h - mean) * rstd.
//
// Bytes per element of x (fp32, s = 4): forward reads x for the statistics,
// reads x again and writes out: 12 (+4 with a residual). Eager PyTorch
// (nn.GroupNorm then F.silu, + residual) moves 8 + 8 (+12). The backward reads
// grad_out and x for the per-channel sums and again for grad_x, and writes
// grad_x: 20 bytes, where eager autograd moves about 40. The second pass needs
// dy = grad_out * act'(y) again, whose exp and divide cost more than the bytes
// on this machine, so dy is kept in fp32 from the first pass: in L2 for an
// NCHW group or channels_last channel block that fits, else (channels_last,
// fp32) in grad_x itself, which the second pass then reads and overwrites: 4
// more bytes written by the first pass, no activation derivative in the
// second (evaluating it again instead was 10% slower at (2, 1280, 32, 32)
// even where SiLU's derivative comes from the output). At (2, 320, 64, 64)
// fp32 SiLU channels_last forward+backward, 1 thread, that (with the sums
// pass reading rows in order) took 0.89x the time, 2.35x -> 2.67x eager.
//
// NCHW: a group's Cg * S elements are contiguous. With enough (n, group) pairs
// for the threads, one task computes a group's statistics and applies the
// normalization right away, so the second read of a group that fits in L2
// (UNet shapes: 160 KB) comes from L2, not from memory. Otherwise the groups
// are split between threads and the statistics combined before the apply.
// channels_last: a row of C channels per spatial position; statistics are
// per-channel vectors over blocks of rows, reduced to groups afterwards. A
// group is Cg channels of every row, so its statistics need the whole image
// before its first output, and at the UNet shapes an image (5 MB at
// (2, 320, 64, 64)) does not fit in a core's L2: the apply's second read of
// x comes from L3, where NCHW's comes from L2. The apply hides it by
// prefetching x ~2 KB ahead. Measured interleaved in one process, 1 thread,
// (2, 320, 64, 64) fp32 SiLU, on a loaded 2-core machine: channels_last took
// 1.07-1.11x NCHW's time without the prefetch, 0.97-1.02x with it.
// An image whose rows can be cut into channel blocks of whole groups that fit
// in L2 with at least 1 KB of each row goes block by block instead (UNet levels
// of 16x16 and 8x8): statistics, groups and apply in one task, the apply's
// read from L2; 2 threads, fp32: (2, 1280, 16, 16) 164-168 -> 153-157 us,
// (2, 1280, 8, 8) 62-63 -> 53-54 us (NCHW 136 and 50). Narrower blocks lose:
// rows read at a stride of C in runs of 128 B defeat the hardware prefetcher,
// and at (2, 320, 64, 64) the forward took 1.6x longer. (Tried and dropped:
// applying the rows in reverse, for the rows left in L2.) A block's apply, its
// rows in L2, goes down the rows in strips of 4 vectors of channels with their
// coefficients in registers, as NCHW's apply holds its channel's: 10-13% fewer
// samples at those levels, level with NCHW. The backward takes the same blocks
// (sums, groups, apply from L2, dy kept in a task buffer) where its five
// streams fit: 16x16 and 8x8.
//
// Statistics: exact two-pass mean and M2 per chunk of <= kChunk elements (the
// second pass reads L1), chunks merged with Chan's formula, groups in double:
// no E[x^2] - E[x]^2 cancellation, whatever the mean.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <ATen/ops/zeros.h>
#include <c10/util/string_view.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/autograd/functions/basic_ops.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <memory>
#include <vector>

#include "common.h"
#include "ops.h"

namespace genfast::cpu {
namespace {

// Elements per statistics chunk: 8 KB of fp32, re-read from L1 by the second pass.
constexpr int64_t kChunk = 2048;

enum class Act { kNone, kSilu, kGelu, kRelu, kLeakyRelu };

template <Act A>
struct ActTag {
  static constexpr Act value = A;
};

Act parse_activation(c10::string_view name) {
  if (name == "silu") return Act::kSilu;
  if (name == "gelu") return Act::kGelu;
  if (name == "relu") return Act::kRelu;
  if (name == "leaky_relu") return Act::kLeakyRelu;
  TORCH_CHECK(name == "none", "group_norm_act: unknown activation ", name);
  return Act::kNone;
}

// Instantiates the hot loops once per activation: no branch per element.
template <typename F>
void dispatch_act(Act act, F&& f) {
  switch (act) {
    case Act::kSilu: return f(ActTag<Act::kSilu>{});
    case Act::kGelu: return f(ActTag<Act::kGelu>{});
    case Act::kRelu: return f(ActTag<Act::kRelu>{});
    case Act::kLeakyRelu: return f(ActTag<Act::kLeakyRelu>{});
    case Act::kNone: return f(ActTag<Act::kNone>{});
  }
}

constexpr float kSqrtHalf = 0.70710678118654752f;
constexpr float kInvSqrt2Pi = 0.39894228040143268f;

template <Act A>
inline Vec activate(const Vec& y, const Vec& slope) {
  if constexpr (A == Act::kSilu) {
    return y / (Vec(1.f) + exp_neg_fast(y));
  } else if constexpr (A == Act::kGelu) {
    return Vec(0.5f) * y * (Vec(1.f) + (y * Vec(kSqrtHalf)).erf());
  } else if constexpr (A == Act::kRelu) {
    return at::vec::maximum(y, Vec(0.f));  // propagates NaN like F.relu
  } else if constexpr (A == Act::kLeakyRelu) {
    return Vec::blendv(y * slope, y, y > Vec(0.f));
  } else {
    return y;
  }
}

// d activate(y) / dy.
template <Act A>
inline Vec activate_grad(const Vec& y, const Vec& slope) {
  if constexpr (A == Act::kSilu) {
    const Vec s = Vec(1.f) / (Vec(1.f) + exp_neg_fast(y));
    return s * (Vec(1.f) + y * (Vec(1.f) - s));
  } else if constexpr (A == Act::kGelu) {
    const Vec cdf = Vec(0.5f) * (Vec(1.f) + (y * Vec(kSqrtHalf)).erf());
    return cdf + y * exp_fast(Vec(-0.5f) * y * y) * Vec(kInvSqrt2Pi);
  } else if constexpr (A == Act::kRelu) {
    return Vec::blendv(Vec(0.f), Vec(1.f), y > Vec(0.f));
  } else if constexpr (A == Act::kLeakyRelu) {
    return Vec::blendv(slope, Vec(1.f), y > Vec(0.f));
  } else {
    return Vec(1.f);
  }
}

// SiLU's derivative from the forward's output o = y s(y), where the backward has it in fp32: s = o / y
// (where |y| < 2^-10, the sigmoid's series 1/2 + y/4, exact to fp32 there), then s (1 + y (1 - s)):
// no exp. The backward's sums pass at 8 x 8 took 3.6 instead of 6.8 ns a vector (AMD EPYC, in L1).
inline Vec silu_grad_from_out(const Vec& y, const Vec& o) {
  const Vec s = Vec::blendv(o / y, at::vec::fmadd(y, Vec(0.25f), Vec(0.5f)), y.abs() < Vec(1.f / 1024));
  return s * (Vec(1.f) + y * (Vec(1.f) - s));
}

// act'(y) at elements [j, j + m) of a row: from the forward's output o (fp32 SiLU, when given) or evaluated.
template <typename T, Act A>
inline Vec act_grad_at(const Vec& y, const float* o, int j, int m, const Vec& slope) {
  if constexpr (A == Act::kSilu && std::is_same_v<T, float>) {
    if (o) return silu_grad_from_out(y, Vec::loadu(o + j, m));
  }
  return activate_grad<A>(y, slope);
}

// Count, mean and M2 (sum of squared deviations) of a set, merged with Chan's formula.
struct Moments {
  double count = 0, mean = 0, m2 = 0;

  void merge(double n, double mean_b, double m2_b) {
    if (n == 0) return;
    if (count == 0) {  // the first set: no divisions
      count = n, mean = mean_b, m2 = m2_b;
      return;
    }
    const double total = count + n, delta = mean_b - mean;
    mean += delta * (n / total);
    m2 += m2_b + delta * delta * (count * n / total);
    count = total;
  }
};

// a[u] = f(a[u], v) for the fp32 vectors v of the len elements at p, four chains; a tail's
// lanes past len keep their accumulator.
template <typename T, typename F>
inline void accumulate(const T* p, int64_t len, Vec (&a)[4], F&& f) {
  constexpr int V = Vec::size();
  int64_t j = 0;
  for (; j + 4 * V <= len; j += 4 * V)
    for (int u = 0; u < 4; ++u) a[u] = f(a[u], load_float(p + j + u * V, V));
  for (; j < len; j += V) {
    const int k = static_cast<int>(std::min<int64_t>(V, len - j));
    a[0] = Vec::set(a[0], f(a[0], load_float(p + j, k)), k);
  }
}

// Mean and M2 of the values h = x + shift (kShift; else x) of a chunk (<= kChunk elements)
// given as runs: runs(g) calls g(ptr, len, shift) for each run (a channel's part). The exact
// two-pass formula, the second pass from L1; one horizontal sum a pass, however many
// channels (a 4x4 channel is one vector: per-channel sums and merges took 2x eager's time).
template <typename T, bool kShift, typename Runs>
inline void chunk_moments(int64_t len, Runs&& runs, float& mean, float& m2) {
  Vec a[4] = {Vec(0.f), Vec(0.f), Vec(0.f), Vec(0.f)};
  runs([&](const T* p, int64_t n, float shift) {
    const Vec s(shift);
    accumulate(p, n, a, [&](const Vec& acc, const Vec& v) { return acc + (kShift ? v + s : v); });
  });
  mean = hsum((a[0] + a[1]) + (a[2] + a[3])) / static_cast<float>(len);
  const Vec m(mean);
  a[0] = a[1] = a[2] = a[3] = Vec(0.f);
  runs([&](const T* p, int64_t n, float shift) {
    const Vec s(shift);
    accumulate(p, n, a, [&](const Vec& acc, const Vec& v) {
      const Vec d = (kShift ? v + s : v) - m;
      return at::vec::fmadd(d, d, acc);
    });
  });
  m2 = hsum((a[0] + a[1]) + (a[2] + a[3]));
}

// Shapes and the optional per-channel inputs, all fp32 (the Python layer
// converted weight, bias, add and scale_shift).
struct Problem {
  int64_t N, C, G, Cg, S;
  const float *weight, *bias, *add, *scale_shift;
  float eps, slope;
  Act act;
  bool channels_last;

  float w(int64_t c) const { return weight ? weight[c] : 1.f; }
  float b(int64_t c) const { return bias ? bias[c] : 0.f; }
  float scale1(int64_t n, int64_t c) const { return scale_shift ? 1.f + scale_shift[n * 2 * C + c] : 1.f; }
  float shift(int64_t n, int64_t c) const { return scale_shift ? scale_shift[n * 2 * C + C + c] : 0.f; }
  float add_of(int64_t n, int64_t c) const { return add ? add[n * C + c] : 0.f; }
};

Problem make_problem(const Tensor& x, int64_t num_groups, const OptTensor& weight, const OptTensor& bias,
                     const OptTensor& add, const OptTensor& scale_shift, double eps, double slope,
                     c10::string_view activation) {
  auto ptr = [](const OptTensor& t) { return t.has_value() ? t->data_ptr<float>() : nullptr; };
  Problem p{};
  p.N = x.size(0);
  p.C = x.size(1);
  p.G = num_groups;
  p.Cg = p.C / num_groups;
  p.S = x.numel() / std::max<int64_t>(p.N * p.C, 1);
  p.weight = ptr(weight);
  p.bias = ptr(bias);
  p.add = ptr(add);
  p.scale_shift = ptr(scale_shift);
  p.eps = static_cast<float>(eps);
  p.slope = static_cast<float>(slope);
  p.act = parse_activation(activation);
  // After the Python layer, x is contiguous or channels_last(_3d); a tensor
  // that is both (S == 1, or C == 1) is read as NCHW, which is then the same.
  p.channels_last = !x.is_contiguous();
  return p;
}

// The per-(n, c) folded normalization: y = (x + d) * a + b.
struct Coefs {
  std::vector<float> a, d, b;
  explicit Coefs(int64_t nc) : a(nc), d(nc), b(nc) {}
};

// mean in double (the forward's exact group mean): d = add - mean rounds once, so a channel whose
// h = x + add is constant gets d = -x exactly and x + d = 0, as PyTorch's h - mean is; through the
// float mean it was off by h's rounding, which rstd = 1/sqrt(eps) of a zero-variance group (a
// group of one element) turned into 1e-4 errors.
void fold_group(const Problem& p, int64_t n, int64_t g, double mean, float rstd, Coefs& k) {
  for (int64_t c = g * p.Cg; c < (g + 1) * p.Cg; ++c) {
    const int64_t i = n * p.C + c;
    const float s1 = p.scale1(n, c);
    k.a[i] = rstd * p.w(c) * s1;
    k.d[i] = static_cast<float>(static_cast<double>(p.add_of(n, c)) - mean);
    k.b[i] = p.b(c) * s1 + p.shift(n, c);
  }
}

// Mean and rstd (and, with var, the biased variance) of group (n, g) from its moments.
void finish_group(const Problem& p, int64_t n, int64_t g, const Moments& m, float* mean, float* rstd, Coefs& k,
                  float* var = nullptr) {
  const double v = m.count > 0 ? m.m2 / m.count : std::numeric_limits<double>::quiet_NaN();
  const float mu = static_cast<float>(m.mean), r = static_cast<float>(1.0 / std::sqrt(v + p.eps));
  mean[n * p.G + g] = mu;
  rstd[n * p.G + g] = r;
  if (var) var[n * p.G + g] = static_cast<float>(v);
  fold_group(p, n, g, m.mean, r, k);
}

// ---- NCHW -------------------------------------------------------------------

// Moments of h over [begin, end) of group (n, g)'s flat Cg * S elements.
template <typename T>
Moments nchw_moments(const Problem& p, const T* x, int64_t n, int64_t g, int64_t begin, int64_t end) {
  const T* base = x + (n * p.C + g * p.Cg) * p.S;
  Moments m;
  for (int64_t i = begin; i < end; i += kChunk) {
    const int64_t stop = std::min(end, i + kChunk);
    auto runs = [&](auto&& f) {
      if (!p.add) return f(base + i, stop - i, 0.f);
      for (int64_t r = i, c = i / p.S; r < stop; ++c) {  // add shifts each channel: a run per channel
        const int64_t r1 = std::min(stop, (c + 1) * p.S);
        f(base + r, r1 - r, p.add_of(n, g * p.Cg + c));
        r = r1;
      }
    };
    float mean, m2;
    if (p.add) {
      chunk_moments<T, true>(stop - i, runs, mean, m2);
    } else {
      chunk_moments<T, false>(stop - i, runs, mean, m2);
    }
    m.merge(static_cast<double>(stop - i), mean, m2);
  }
  return m;
}

template <typename T, Act A, bool kNative>
GENFAST_BF16_TARGET void nchw_apply(const Problem& p, const Coefs& k, const T* x, const T* res, T* out, int64_t n,
                                    int64_t g, int64_t begin, int64_t end) {
  const int64_t offset = (n * p.C + g * p.Cg) * p.S;
  const Vec slope(p.slope);
  for (int64_t i = begin, c = begin / p.S; i < end; ++c) {
    const int64_t stop = std::min(end, (c + 1) * p.S);
    const int64_t ki = n * p.C + g * p.Cg + c;
    const Vec a(k.a[ki]), d(k.d[ki]), b(k.b[ki]);
    const T* xp = x + offset + i;
    const T* rp = res ? res + offset + i : nullptr;
    T* op = out + offset + i;
    // a plain loop, not vec_steps: see with_bf16_stores
    for (int j = 0, len = static_cast<int>(stop - i); j < len; j += Vec::size()) {
      const int m = std::min<int>(Vec::size(), len - j);
      Vec y = activate<A>(at::vec::fmadd(load_float(xp + j, m) + d, a, b), slope);
      if (rp) y = y + load_float(rp + j, m);
      store_out<T, kNative>(op + j, y, m);
    }
    i = stop;
  }
}

// Splits [0, total) into `parts` near-equal pieces; returns piece q's begin.
inline int64_t piece(int64_t total, int64_t parts, int64_t q) { return total * q / parts; }

template <typename T, Act A>
void nchw_forward(const Problem& p, const T* x, const T* res, T* out, float* mean, float* rstd, Coefs& k) {
  const int64_t groups = p.N * p.G, M = p.Cg * p.S, threads = at::get_num_threads();
  if (groups >= 2 * threads) {
    // Statistics then apply in one task: the group is still in L2 for the second read. Small groups go
    // in blocks, statistics of the block's groups, their finishes, their applies: a finish is ~60 cycles
    // of double division and square root latency, which a group's apply waited for, and a block's
    // finishes are independent, so they overlap: (64, 64, 4, 4) in 32 groups of 32 elements took 25-40% less.
    constexpr int64_t kBlock = 16;
    const int64_t block = std::max<int64_t>(1, std::min({kBlock, kChunk / M, groups / (4 * threads)}));
    at::parallel_for(0, (groups + block - 1) / block, 1, [&](int64_t begin, int64_t end) {
      Moments m[kBlock];
      for (int64_t g0 = begin * block; g0 < std::min(groups, end * block); g0 += block) {
        const int64_t g1 = std::min(groups, g0 + block);
        for (int64_t ng = g0; ng < g1; ++ng) m[ng - g0] = nchw_moments(p, x, ng / p.G, ng % p.G, 0, M);
        for (int64_t ng = g0; ng < g1; ++ng) finish_group(p, ng / p.G, ng % p.G, m[ng - g0], mean, rstd, k);
        with_bf16_stores<T>([&](auto native) {
          for (int64_t ng = g0; ng < g1; ++ng)
            nchw_apply<T, A, decltype(native)::value>(p, k, x, res, out, ng / p.G, ng % p.G, 0, M);
        });
      }
    });
    return;
  }
  // Few groups: split each into pieces of at least a few chunks.
  const int64_t parts = std::max<int64_t>(1, std::min((4 * threads + groups - 1) / groups, M / (4 * kChunk)));
  std::vector<Moments> partial(groups * parts);
  at::parallel_for(0, groups * parts, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t ng = t / parts, q = t % parts;
      partial[t] = nchw_moments(p, x, ng / p.G, ng % p.G, piece(M, parts, q), piece(M, parts, q + 1));
    }
  });
  for (int64_t ng = 0; ng < groups; ++ng) {
    Moments m;
    for (int64_t q = 0; q < parts; ++q) m.merge(partial[ng * parts + q].count, partial[ng * parts + q].mean,
                                                 partial[ng * parts + q].m2);
    finish_group(p, ng / p.G, ng % p.G, m, mean, rstd, k);
  }
  at::parallel_for(0, groups * parts, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t ng = t / parts, q = t % parts;
      with_bf16_stores<T>([&](auto native) {
        nchw_apply<T, A, decltype(native)::value>(p, k, x, res, out, ng / p.G, ng % p.G, piece(M, parts, q),
                                                  piece(M, parts, q + 1));
      });
    }
  });
}

// ---- channels_last ----------------------------------------------------------

// Rows of C channels per block: the block is re-read from L1/L2 by the second pass.
inline int64_t rows_per_block(int64_t C) { return std::max<int64_t>(1, 4 * kChunk / C); }

// Asks for the cache lines of [p, p + bytes) to be brought into L1 for reading.
inline void prefetch(const void* p, int64_t bytes) {
  for (int64_t l = 0; l < bytes; l += 64) __builtin_prefetch(static_cast<const char*>(p) + l, 0, 3);
}

// Rows [r0, r1) of image n: per-channel mean and M2 (count r1 - r0) into mean_c, m2_c. A block of at
// most 8 rows goes 8 vectors of channels at a time, their sums in registers: down the rows, the mean,
// the rows again (from L1) for M2, then Chan's merge into the running moments; the same channels
// two blocks on are prefetched as M2 reads these. History, fp32, 1 thread: summed one 16-channel
// vector down 25 rows at a time, the pass took twice NCHW's time; row by row into a row of sums in
// L1, 35% less; with the sums in registers (no row of sums loaded and stored per row) another 25-30%
// less at (2, 320, 64, 64) and (2, 1280, 16, 16) and 15-20% at (2, 640, 32, 32) (perf samples);
// without the prefetch it was 13-60% slower than row by row at (2, 320, 64, 64) and at the VAE's
// (1, 512, 128, 128), which is level with it now.
template <typename T>
void nhwc_moments(const Problem& p, const T* x, int64_t n, int64_t r0, int64_t r1, float* mean_c, float* m2_c,
                  int64_t c0 = 0, int64_t c1 = -1) {
  constexpr int V = Vec::size(), U = 8;
  const int64_t C = p.C, R = std::min<int64_t>(8, rows_per_block(C));  // <= 8 streams
  if (c1 < 0) c1 = C;
  std::fill(mean_c + c0, mean_c + c1, 0.f);
  std::fill(m2_c + c0, m2_c + c1, 0.f);
  int64_t count = 0;
  for (int64_t r = r0; r < r1; r += R) {
    const int64_t rows = std::min(R, r1 - r);
    const T* base = x + (n * p.S + r) * C;
    // Chan's merge of (count, mean_c, m2_c) with (rows, mean, M2): the counts are every channel's.
    const float total = static_cast<float>(count + rows);
    const Vec inv(1.f / static_cast<float>(rows)), w_mean(rows / total), w_m2(static_cast<float>(count) * rows / total);
    // NV vectors of channels from j, the last with `last` lanes.
    auto channels = [&](int64_t j, auto nv, int last) {
      constexpr int NV = decltype(nv)::value;
      Vec s[NV], m[NV], q[NV];
      for (int u = 0; u < NV; ++u) s[u] = q[u] = Vec(0.f);
      for (int64_t i = 0; i < rows; ++i)
        for (int u = 0; u < NV; ++u) s[u] = s[u] + load_float(base + i * C + j + u * V, u == NV - 1 ? last : V);
      for (int u = 0; u < NV; ++u) m[u] = s[u] * inv;
      for (int64_t i = 0; i < rows; ++i) {
        if (r + 2 * R + i < r1) prefetch(base + (2 * R + i) * C + j, (NV - 1) * V * sizeof(T) + last * sizeof(T));
        for (int u = 0; u < NV; ++u) {
          const Vec dv = load_float(base + i * C + j + u * V, u == NV - 1 ? last : V) - m[u];
          q[u] = at::vec::fmadd(dv, dv, q[u]);
        }
      }
      for (int u = 0; u < NV; ++u) {
        const int k = u == NV - 1 ? last : V;
        const Vec ma = Vec::loadu(mean_c + j + u * V, k), delta = m[u] - ma;
        (ma + delta * w_mean).store(mean_c + j + u * V, k);
        (Vec::loadu(m2_c + j + u * V, k) + q[u] + delta * delta * w_m2).store(m2_c + j + u * V, k);
      }
    };
    int64_t j = c0;
    for (; j + U * V <= c1; j += U * V) channels(j, std::integral_constant<int, U>{}, V);
    for (; j < c1; j += V)
      channels(j, std::integral_constant<int, 1>{}, static_cast<int>(std::min<int64_t>(V, c1 - j)));
    count += rows;
  }
}

// Rows ahead that the apply passes prefetch: about 2 KB. Their second read
// of x comes from L3 (an image does not fit in L2), which the hardware
// prefetcher does not keep ahead of the activation's arithmetic: at
// (2, 320, 64, 64) prefetching x 2 rows ahead made the apply about 15% faster.
inline int64_t prefetch_rows(int64_t row_bytes) { return std::max<int64_t>(1, 2048 / row_bytes); }

// Rows [r0, r1) of image n, C channels each.
template <typename T, Act A, bool kNative>
GENFAST_BF16_TARGET void nhwc_apply(const Problem& p, const Coefs& k, const T* x, const T* res, T* out, int64_t n,
                                    int64_t r0, int64_t r1) {
  const int64_t C = p.C, ahead = prefetch_rows(C * sizeof(T));
  const float *a = k.a.data() + n * C, *d = k.d.data() + n * C, *b = k.b.data() + n * C;
  const Vec slope(p.slope);
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t off = (n * p.S + r) * C;
    if (r + ahead < r1) prefetch(x + off + ahead * C, C * sizeof(T));
    for (int j = 0, len = static_cast<int>(C); j < len; j += Vec::size()) {  // see nchw_apply
      const int m = std::min<int>(Vec::size(), len - j);
      const Vec y0 = at::vec::fmadd(load_float(x + off + j, m) + Vec::loadu(d + j, m), Vec::loadu(a + j, m),
                                    Vec::loadu(b + j, m));
      Vec y = activate<A>(y0, slope);
      if (res) y = y + load_float(res + off + j, m);
      store_out<T, kNative>(out + off + j, y, m);
    }
  }
}

// nhwc_apply of all rows of image n, channels [c0, c1), for a block that is in L2: strips of
// kStrip vectors of channels down the rows, their coefficients held in registers (the row apply
// loads three per vector, which NCHW's apply does not).
constexpr int kStrip = 4;

template <typename T, Act A, bool kNative>
GENFAST_BF16_TARGET void nhwc_apply_strips(const Problem& p, const Coefs& k, const T* x, const T* res, T* out,
                                           int64_t n, int64_t c0, int64_t c1) {
  constexpr int V = Vec::size();
  const int64_t C = p.C;
  const Vec slope(p.slope);
  for (int64_t j = c0; j < c1; j += kStrip * V) {
    Vec a[kStrip], d[kStrip], b[kStrip];
    int m[kStrip];
    for (int u = 0; u < kStrip; ++u) {
      m[u] = static_cast<int>(std::clamp<int64_t>(c1 - j - u * V, 0, V));
      const int64_t i = n * C + j + u * V;
      if (m[u] == 0) break;
      a[u] = Vec::loadu(&k.a[i], m[u]), d[u] = Vec::loadu(&k.d[i], m[u]), b[u] = Vec::loadu(&k.b[i], m[u]);
    }
    for (int64_t r = 0; r < p.S; ++r) {
      const int64_t off = (n * p.S + r) * C + j;
      for (int u = 0; u < kStrip; ++u) {
        if (m[u] == 0) break;
        Vec y = activate<A>(at::vec::fmadd(load_float(x + off + u * V, m[u]) + d[u], a[u], b[u]), slope);
        if (res) y = y + load_float(res + off + u * V, m[u]);
        store_out<T, kNative>(out + off + u * V, y, m[u]);
      }
    }
  }
}

// Row pieces per image so that N * parts tasks keep every thread busy.
inline int64_t row_parts(const Problem& p) {
  const int64_t threads = at::get_num_threads();
  const int64_t want = (4 * threads + p.N - 1) / p.N;
  return std::max<int64_t>(1, std::min(want, p.S / rows_per_block(p.C)));
}

// Group (n, g)'s moments from its channels' moments over `parts` row pieces of image n
// (pm, pm2: [n][part][C]): the exact two-level formula in double.
inline void nhwc_finish_group(const Problem& p, int64_t n, int64_t g, int64_t parts, const float* pm,
                              const float* pm2, float* mean, float* rstd, Coefs& k, float* var) {
  const int64_t C = p.C;
  double sum = 0;
  for (int64_t q = 0; q < parts; ++q) {
    const double cnt = static_cast<double>(piece(p.S, parts, q + 1) - piece(p.S, parts, q));
    for (int64_t c = g * p.Cg; c < (g + 1) * p.Cg; ++c) sum += cnt * (pm[(n * parts + q) * C + c] + p.add_of(n, c));
  }
  Moments m;
  m.count = static_cast<double>(p.Cg * p.S);
  m.mean = sum / m.count;
  for (int64_t q = 0; q < parts; ++q) {
    const double cnt = static_cast<double>(piece(p.S, parts, q + 1) - piece(p.S, parts, q));
    for (int64_t c = g * p.Cg; c < (g + 1) * p.Cg; ++c) {
      const int64_t i = (n * parts + q) * C + c;
      const double dev = pm[i] + p.add_of(n, c) - m.mean;
      m.m2 += pm2[i] + cnt * dev * dev;
    }
  }
  finish_group(p, n, g, m, mean, rstd, k, var);
}

// Bytes of an image's streams (x and out forward; x, grad_out, the forward's output, dy and grad_x
// backward) that one channel-block task may touch: about a core's L2.
constexpr int64_t kL2Block = 1024 * 1024;

// Channel blocks per image for tasks that each take whole groups of every row through
// statistics (or sums), the groups' coefficients and the apply, the apply reading the block
// back from L2: bytes per element of the task's streams, and of the row runs it reads;
// 0 where a block's run of a row would be under min_run bytes, which the hardware prefetcher
// does not follow across rows at a stride of C (tried: 1.6x slower at (2, 320, 64, 64)).
inline int64_t nhwc_channel_blocks(const Problem& p, int64_t bytes, int64_t itemsize, int64_t min_run) {
  const int64_t threads = at::get_num_threads();
  int64_t blocks = std::max((p.S * p.C * bytes + kL2Block - 1) / kL2Block, (threads + p.N - 1) / p.N);
  blocks = std::min(blocks, p.G);
  if (p.C / blocks * itemsize < min_run || p.N * blocks < threads) return 0;
  return blocks;
}

template <typename T, Act A>
void nhwc_forward(const Problem& p, const T* x, const T* res, T* out, float* mean, float* rstd, Coefs& k,
                  float* var = nullptr) {
  const int64_t C = p.C;
  if (const int64_t blocks = nhwc_channel_blocks(p, 2 * sizeof(T), sizeof(T), 1024)) {
    std::vector<float> pm(p.N * C), pm2(p.N * C);
    at::parallel_for(0, p.N * blocks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const int64_t n = t / blocks, g0 = piece(p.G, blocks, t % blocks), g1 = piece(p.G, blocks, t % blocks + 1);
        nhwc_moments(p, x, n, 0, p.S, pm.data() + n * C, pm2.data() + n * C, g0 * p.Cg, g1 * p.Cg);
        for (int64_t g = g0; g < g1; ++g) nhwc_finish_group(p, n, g, 1, pm.data(), pm2.data(), mean, rstd, k, var);
        with_bf16_stores<T>([&](auto native) {
          nhwc_apply_strips<T, A, decltype(native)::value>(p, k, x, res, out, n, g0 * p.Cg, g1 * p.Cg);
        });
      }
    });
    return;
  }
  const int64_t parts = row_parts(p);
  std::vector<float> pm(p.N * parts * C), pm2(p.N * parts * C);
  at::parallel_for(0, p.N * parts, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t n = t / parts, q = t % parts;
      nhwc_moments(p, x, n, piece(p.S, parts, q), piece(p.S, parts, q + 1), pm.data() + t * C, pm2.data() + t * C);
    }
  });
  at::parallel_for(0, p.N * p.G, 1, [&](int64_t begin, int64_t end) {
    for (int64_t ng = begin; ng < end; ++ng)
      nhwc_finish_group(p, ng / p.G, ng % p.G, parts, pm.data(), pm2.data(), mean, rstd, k, var);
  });
  at::parallel_for(0, p.N * parts, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t n = t / parts, q = t % parts;
      with_bf16_stores<T>([&](auto native) {
        nhwc_apply<T, A, decltype(native)::value>(p, k, x, res, out, n, piece(p.S, parts, q), piece(p.S, parts, q + 1));
      });
    }
  });
}

// Writes into out (x's shape, dtype and layout). A caller that reuses out skips
// the fresh pages of a new tensor: at the VAE shape (128 MB) their page faults
// cost this machine about as much as the kernel itself.
std::tuple<Tensor, Tensor> group_norm_act_into(const Tensor& x, int64_t num_groups, const OptTensor& weight,
                                               const OptTensor& bias, double eps, c10::string_view activation,
                                               double negative_slope, const OptTensor& add,
                                               const OptTensor& scale_shift, const OptTensor& residual,
                                               const Tensor& out) {
  const Problem p = make_problem(x, num_groups, weight, bias, add, scale_shift, eps, negative_slope, activation);
  TORCH_CHECK(out.sizes() == x.sizes() && out.strides() == x.strides() && out.scalar_type() == x.scalar_type(),
              "group_norm_act: out must have x's shape, strides and dtype");
  Tensor mean = at::empty({p.N, p.G}, x.options().dtype(at::kFloat));
  Tensor rstd = at::empty({p.N, p.G}, x.options().dtype(at::kFloat));
  if (p.N * p.C == 0) return {mean, rstd};
  if (p.S == 0) {
    mean.fill_(std::numeric_limits<float>::quiet_NaN());
    rstd.fill_(std::numeric_limits<float>::quiet_NaN());
    return {mean, rstd};
  }
  TORCH_CHECK(p.S < (int64_t(1) << 31) && p.C < (int64_t(1) << 31), "group_norm_act: spatial size too large");
  Coefs k(p.N * p.C);
  dispatch_float(x.scalar_type(), "group_norm_act", [&](auto tag) {
    using T = decltype(tag);
    const T* xp = x.data_ptr<T>();
    const T* rp = residual.has_value() ? residual->data_ptr<T>() : nullptr;
    T* op = out.data_ptr<T>();
    dispatch_act(p.act, [&](auto act) {
      constexpr Act A = decltype(act)::value;
      if (p.channels_last) {
        nhwc_forward<T, A>(p, xp, rp, op, mean.data_ptr<float>(), rstd.data_ptr<float>(), k);
      } else {
        nchw_forward<T, A>(p, xp, rp, op, mean.data_ptr<float>(), rstd.data_ptr<float>(), k);
      }
    });
  });
  return {mean, rstd};
}

std::tuple<Tensor, Tensor, Tensor> group_norm_act(const Tensor& x, int64_t num_groups, const OptTensor& weight,
                                                  const OptTensor& bias, double eps, c10::string_view activation,
                                                  double negative_slope, const OptTensor& add,
                                                  const OptTensor& scale_shift, const OptTensor& residual) {
  Tensor out = empty_output(x);
  auto [mean, rstd] = group_norm_act_into(x, num_groups, weight, bias, eps, activation, negative_slope, add,
                                          scale_shift, residual, out);
  return {out, mean, rstd};
}

std::tuple<Tensor, Tensor> group_norm_act_out(const Tensor& x, int64_t num_groups, const OptTensor& weight,
                                              const OptTensor& bias, double eps, c10::string_view activation,
                                              double negative_slope, const OptTensor& add,
                                              const OptTensor& scale_shift, const OptTensor& residual, Tensor out) {
  return group_norm_act_into(x, num_groups, weight, bias, eps, activation, negative_slope, add, scale_shift,
                             residual, out);
}

// ---- backward ---------------------------------------------------------------
//
// With dy = grad_out * act'(y) and xhat = (h - mean) * rstd, the per-(n, c)
// sums S1 = sum dy, S2 = sum dy * xhat and S3 = sum xhat give every gradient:
// the parameter gradients directly, and grad_h = dy * P + (h - mean) * Q + R
// with P, Q, R per (n, c) from the group sums of dxhat = dy * w * (1 + scale).

struct Sums {
  std::vector<double> s1, s2, s3;  // per (n, c); s2, s3 without the factor rstd
  explicit Sums(int64_t nc) : s1(nc, 0.0), s2(nc, 0.0), s3(nc, 0.0) {}
};

// The vector sums (a1, a2, a3) of dy, dy * (h - mean) and (h - mean) over n <= kChunk contiguous
// elements of one channel. With keep, dy is also stored there (fp32, n elements) for the apply pass;
// o: the forward's output at the same elements, or null.
template <typename T, Act A>
inline void channel_vector_sums(const T* x, const T* gout, int n, float a, float d, float b, float slope, Vec& a1,
                                Vec& a2, Vec& a3, float* keep, const float* o) {
  const Vec va(a), vd(d), vb(b), vs(slope);
  a1 = a2 = a3 = Vec(0.f);
  vec_steps(n, [&](int j, int m) {
    const Vec xc = Vec::set(Vec(0.f), load_float(x + j, m) + vd, m);
    const Vec dy = load_float(gout + j, m) * act_grad_at<T, A>(at::vec::fmadd(xc, va, vb), o, j, m, vs);
    a1 = a1 + dy;  // dy's tail lanes are 0: gout loads 0 there
    a2 = at::vec::fmadd(dy, xc, a2);
    a3 = a3 + xc;
    if (keep) dy.store(keep + j, m);
  });
}

// channel_vector_sums over len contiguous elements of one channel, fp32 per chunk and double across chunks.
template <typename T, Act A>
inline void channel_sums(const T* x, const T* gout, int64_t len, float a, float d, float b, float slope, double& s1,
                         double& s2, double& s3, float* keep = nullptr, const float* o = nullptr) {
  for (int64_t i0 = 0; i0 < len; i0 += kChunk) {
    Vec a1, a2, a3;
    channel_vector_sums<T, A>(x + i0, gout + i0, static_cast<int>(std::min(kChunk, len - i0)), a, d, b, slope, a1, a2,
                              a3, keep ? keep + i0 : nullptr, o ? o + i0 : nullptr);
    s1 += hsum(a1);
    s2 += hsum(a2);
    s3 += hsum(a3);
  }
}

// channel_sums of the nch channels from row nc0 (n * C + c), each of p.S <= kChunk elements, with
// 16 channels' vector sums reduced at once by sum16 (46 ops where 16 horizontal sums take ~130). With
// keep, dy goes there, channel after channel. For channels of at most kSmallChannel elements, where
// the reductions are a share of the pass: the backward op at (2, 1280, 8, 8) fp32 NCHW, 1 thread,
// took 0-22% fewer perf samples in six alternations, least 466 -> 411 (AMD EPYC); at 16 x 16 and
// 32 x 32 the change was within the noise.
constexpr int64_t kSmallChannel = 256;

template <typename T, Act A>
void small_channel_sums(const Problem& p, const Coefs& k, const T* x, const T* gout, int64_t nc0, int64_t nch,
                        Sums& s, float* keep, const float* o) {
#if defined(CPU_CAPABILITY_AVX512)
  for (int64_t cb = 0; cb < nch; cb += 16) {
    const int m = static_cast<int>(std::min<int64_t>(16, nch - cb));
    __m512 v[3][16];
    for (int i = 0; i < 16; ++i) {
      Vec a1(0.f), a2(0.f), a3(0.f);
      const int64_t nc = nc0 + cb + i;
      if (i < m)
        channel_vector_sums<T, A>(x + nc * p.S, gout + nc * p.S, static_cast<int>(p.S), k.a[nc], k.d[nc], k.b[nc],
                                  p.slope, a1, a2, a3, keep ? keep + (cb + i) * p.S : nullptr,
                                  o ? o + nc * p.S : nullptr);
      v[0][i] = a1, v[1][i] = a2, v[2][i] = a3;
    }
    alignas(64) float r[3][16];
    for (int q = 0; q < 3; ++q) _mm512_store_ps(r[q], sum16(v[q]));
    for (int i = 0; i < m; ++i) {
      s.s1[nc0 + cb + i] += r[0][i];
      s.s2[nc0 + cb + i] += r[1][i];
      s.s3[nc0 + cb + i] += r[2][i];
    }
  }
#else
  for (int64_t i = 0; i < nch; ++i) {
    const int64_t nc = nc0 + i;
    channel_sums<T, A>(x + nc * p.S, gout + nc * p.S, p.S, k.a[nc], k.d[nc], k.b[nc], p.slope, s.s1[nc], s.s2[nc],
                       s.s3[nc], keep ? keep + i * p.S : nullptr, o ? o + nc * p.S : nullptr);
  }
#endif
}

// Per-(n, c) backward coefficients of one group, and the gradients of the
// per-(n, c) inputs, from the sums.
struct BackCoefs {
  std::vector<float> p, q, r;
  explicit BackCoefs(int64_t nc) : p(nc), q(nc), r(nc) {}
};

void finish_group_backward(const Problem& p, int64_t n, int64_t g, const Sums& s, const float* rstd, BackCoefs& bc,
                           float* grad_wpart, float* grad_bpart, float* grad_add, float* grad_ss) {
  const double r = rstd[n * p.G + g], M = static_cast<double>(p.Cg * p.S);
  double sd = 0, sdx = 0;  // sums of dxhat and dxhat * xhat over the group
  for (int64_t c = g * p.Cg; c < (g + 1) * p.Cg; ++c) {
    const int64_t i = n * p.C + c;
    const double kc = static_cast<double>(p.w(c)) * p.scale1(n, c);
    sd += kc * s.s1[i];
    sdx += kc * s.s2[i] * r;
  }
  const double m1 = sd / M, m2 = sdx / M;
  for (int64_t c = g * p.Cg; c < (g + 1) * p.Cg; ++c) {
    const int64_t i = n * p.C + c;
    const double s1 = p.scale1(n, c), kc = static_cast<double>(p.w(c)) * s1;
    const double S1 = s.s1[i], S2 = s.s2[i] * r, S3 = s.s3[i] * r;
    bc.p[i] = static_cast<float>(r * kc);
    bc.q[i] = static_cast<float>(-r * r * m2);
    bc.r[i] = static_cast<float>(-r * m1);
    grad_add[i] = static_cast<float>(r * (kc * S1 - static_cast<double>(p.S) * m1 - m2 * S3));
    grad_ss[n * 2 * p.C + c] = static_cast<float>(p.w(c) * S2 + p.b(c) * S1);
    grad_ss[n * 2 * p.C + p.C + c] = static_cast<float>(S1);
    grad_wpart[i] = static_cast<float>(s1 * S2);
    grad_bpart[i] = static_cast<float>(s1 * S1);
  }
}

template <Act A>
inline Vec grad_h(const Vec& xv, const Vec& gv, const Vec& a, const Vec& d, const Vec& b, const Vec& P, const Vec& Q,
                  const Vec& R, const Vec& slope) {
  const Vec xc = xv + d;
  const Vec dy = gv * activate_grad<A>(at::vec::fmadd(xc, a, b), slope);
  return at::vec::fmadd(dy, P, at::vec::fmadd(xc, Q, R));
}

template <typename T, Act A>
void nchw_grad_apply(const Problem& p, const Coefs& k, const BackCoefs& bc, const T* x, const T* gout, T* gx,
                     int64_t nc, int64_t begin, int64_t end, const float* o = nullptr) {
  const Vec a(k.a[nc]), d(k.d[nc]), b(k.b[nc]), P(bc.p[nc]), Q(bc.q[nc]), R(bc.r[nc]), slope(p.slope);
  const int64_t off = nc * p.S + begin;
  const float* orow = o ? o + off : nullptr;
  vec_steps(static_cast<int>(end - begin), [&](int j, int m) {
    const Vec xc = load_float(x + off + j, m) + d;
    const Vec dy = load_float(gout + off + j, m) * act_grad_at<T, A>(at::vec::fmadd(xc, a, b), orow, j, m, slope);
    store_float(gx + off + j, at::vec::fmadd(dy, P, at::vec::fmadd(xc, Q, R)), m);
  });
}

// grad_h of one (n, c) row from the dy kept by channel_sums: no activation derivative to evaluate again.
template <typename T>
void nchw_grad_apply_kept(const Problem& p, const Coefs& k, const BackCoefs& bc, const T* x, const float* dy, T* gx,
                          int64_t nc) {
  const Vec d(k.d[nc]), P(bc.p[nc]), Q(bc.q[nc]), R(bc.r[nc]);
  const int64_t off = nc * p.S;
  vec_steps(static_cast<int>(p.S), [&](int j, int m) {
    const Vec xc = load_float(x + off + j, m) + d;
    store_float(gx + off + j, at::vec::fmadd(Vec::loadu(dy + j, m), P, at::vec::fmadd(xc, Q, R)), m);
  });
}

// Largest group (elements) whose fp32 dy is kept between the passes: with x and
// grad_out it stays within a core's L2 (2 MB here).
constexpr int64_t kKeepDy = 128 * 1024;

struct GradOut {
  float *wpart, *bpart, *add, *ss;
};

template <typename T, Act A>
void nchw_backward(const Problem& p, const Coefs& k, const float* rstd, const T* x, const T* gout, T* gx,
                   GradOut go, const float* o) {
  const int64_t groups = p.N * p.G, threads = at::get_num_threads();
  Sums s(p.N * p.C);
  BackCoefs bc(p.N * p.C);
  auto sums_of = [&](int64_t nc, int64_t begin, int64_t end, double& s1, double& s2, double& s3,
                     float* keep = nullptr) {
    channel_sums<T, A>(x + nc * p.S + begin, gout + nc * p.S + begin, end - begin, k.a[nc], k.d[nc], k.b[nc],
                       p.slope, s1, s2, s3, keep, o ? o + nc * p.S + begin : nullptr);
  };
  auto finish = [&](int64_t n, int64_t g) {
    finish_group_backward(p, n, g, s, rstd, bc, go.wpart, go.bpart, go.add, go.ss);
  };
  if (groups >= 2 * threads) {  // a group's two passes in one task: the second reads L2
    // A small group keeps dy (fp32) from the sums pass: the apply pass then
    // reads x and dy from L2 and skips the activation derivative's exp and divide.
    const bool keep = p.Cg * p.S <= kKeepDy;
    at::parallel_for(0, groups, 1, [&](int64_t begin, int64_t end) {
      std::unique_ptr<float[]> dy(keep ? new float[p.Cg * p.S] : nullptr);  // written before it is read
      for (int64_t ng = begin; ng < end; ++ng) {
        const int64_t n = ng / p.G, g = ng % p.G, c0 = n * p.C + g * p.Cg;
        if (p.S <= kSmallChannel) {
          small_channel_sums<T, A>(p, k, x, gout, c0, p.Cg, s, keep ? dy.get() : nullptr, o);
        } else {
          for (int64_t nc = c0; nc < c0 + p.Cg; ++nc)
            sums_of(nc, 0, p.S, s.s1[nc], s.s2[nc], s.s3[nc], keep ? dy.get() + (nc - c0) * p.S : nullptr);
        }
        finish(n, g);
        for (int64_t nc = c0; nc < c0 + p.Cg; ++nc) {
          if (keep) {
            nchw_grad_apply_kept<T>(p, k, bc, x, dy.get() + (nc - c0) * p.S, gx, nc);
          } else {
            nchw_grad_apply<T, A>(p, k, bc, x, gout, gx, nc, 0, p.S, o);
          }
        }
      }
    });
    return;
  }
  const int64_t rows = p.N * p.C;
  const int64_t parts = std::max<int64_t>(1, std::min((4 * threads + rows - 1) / rows, p.S / (4 * kChunk)));
  std::vector<double> part(rows * parts * 3, 0.0);
  at::parallel_for(0, rows * parts, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t nc = t / parts, q = t % parts;
      sums_of(nc, piece(p.S, parts, q), piece(p.S, parts, q + 1), part[3 * t], part[3 * t + 1], part[3 * t + 2]);
    }
  });
  for (int64_t t = 0; t < rows * parts; ++t) {
    s.s1[t / parts] += part[3 * t];
    s.s2[t / parts] += part[3 * t + 1];
    s.s3[t / parts] += part[3 * t + 2];
  }
  for (int64_t ng = 0; ng < groups; ++ng) finish(ng / p.G, ng % p.G);
  at::parallel_for(0, rows * parts, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t nc = t / parts, q = t % parts;
      nchw_grad_apply<T, A>(p, k, bc, x, gout, gx, nc, piece(p.S, parts, q), piece(p.S, parts, q + 1), o);
    }
  });
}

// Rows [r0, r1) of image n, channels [c0, c1): per-channel sums added into s1, s2, s3 (indexed by
// channel). With keep, dy is also stored there (fp32) for the apply pass, row r's channels from
// keep + (r - r0) * ks. Row by row, into fp32 per-channel accumulators (in L1): reading the rows in
// order keeps the hardware prefetcher ahead, which a column of rows at a stride of C did not with
// the activation derivative's work in between (it follows a block's runs of kBackwardRun bytes and
// more: prefetching them changed nothing at (2, 1280, 16, 16)). The accumulators take kSumRows rows
// before they are added into the doubles (as NCHW's vector lanes take 128 values of a chunk).
constexpr int64_t kSumRows = 128;

template <typename T, Act A>
void nhwc_sums(const Problem& p, const Coefs& k, const T* x, const T* gout, int64_t n, int64_t r0, int64_t r1,
               int64_t c0, int64_t c1, double* s1, double* s2, double* s3, float* keep, int64_t ks, const float* o) {
  const int64_t C = p.C, W = c1 - c0, R = kSumRows;
  const float *a = k.a.data() + n * C + c0, *d = k.d.data() + n * C + c0, *b = k.b.data() + n * C + c0;
  const Vec slope(p.slope);
  std::vector<float> acc(3 * W);
  float *a1 = acc.data(), *a2 = a1 + W, *a3 = a2 + W;
  for (int64_t r = r0; r < r1; r += R) {  // fp32 within a block of rows, double across blocks
    const int64_t rows = std::min(R, r1 - r);
    std::fill(acc.begin(), acc.end(), 0.f);
    for (int64_t i = r; i < r + rows; ++i) {
      const int64_t off = (n * p.S + i) * C + c0;
      const float* orow = o ? o + off : nullptr;
      float* kr = keep ? keep + (i - r0) * ks : nullptr;
      vec_steps(static_cast<int>(W), [&](int j, int m) {
        const Vec xc = load_float(x + off + j, m) + Vec::loadu(d + j, m);
        const Vec dy = load_float(gout + off + j, m) *
                       act_grad_at<T, A>(at::vec::fmadd(xc, Vec::loadu(a + j, m), Vec::loadu(b + j, m)), orow, j,
                                         m, slope);
        (Vec::loadu(a1 + j, m) + dy).store(a1 + j, m);
        at::vec::fmadd(dy, xc, Vec::loadu(a2 + j, m)).store(a2 + j, m);
        (Vec::loadu(a3 + j, m) + xc).store(a3 + j, m);
        if (kr) store_float(kr + j, dy, m);
      });
    }
    for (int64_t c = 0; c < W; ++c) {
      s1[c0 + c] += a1[c];
      s2[c0 + c] += a2[c];
      s3[c0 + c] += a3[c];
    }
  }
}

// grad_x of rows [r0, r1) of image n. fp32 grad_x already holds dy (nhwc_sums kept it there): the
// pass then reads x and dy, without the activation derivative's exp and divide; otherwise it reads x
// and grad_out and evaluates dy again.
template <typename T, Act A>
void nhwc_grad_apply(const Problem& p, const Coefs& k, const BackCoefs& bc, const T* x, const T* gout, T* gx,
                     int64_t n, int64_t r0, int64_t r1) {
  const int64_t C = p.C, ahead = prefetch_rows(C * sizeof(T));
  const float *a = k.a.data() + n * C, *d = k.d.data() + n * C, *b = k.b.data() + n * C;
  const float *P = bc.p.data() + n * C, *Q = bc.q.data() + n * C, *R = bc.r.data() + n * C;
  const Vec slope(p.slope);
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t off = (n * p.S + r) * C;
    if (r + ahead < r1) {
      prefetch(x + off + ahead * C, C * sizeof(T));
      prefetch((std::is_same_v<T, float> ? gx : gout) + off + ahead * C, C * sizeof(T));
    }
    vec_steps(static_cast<int>(C), [&](int j, int m) {
      const Vec vP = Vec::loadu(P + j, m), vQ = Vec::loadu(Q + j, m), vR = Vec::loadu(R + j, m);
      if constexpr (std::is_same_v<T, float>) {
        const Vec xc = Vec::loadu(x + off + j, m) + Vec::loadu(d + j, m);
        store_float(gx + off + j, at::vec::fmadd(Vec::loadu(gx + off + j, m), vP, at::vec::fmadd(xc, vQ, vR)), m);
      } else {
        store_float(gx + off + j,
                    grad_h<A>(load_float(x + off + j, m), load_float(gout + off + j, m), Vec::loadu(a + j, m),
                              Vec::loadu(d + j, m), Vec::loadu(b + j, m), vP, vQ, vR, slope),
                    m);
      }
    });
  }
}

// grad_x of all rows of image n, channels [c0, c1), from the block's dy (row r's channels at dy + r * W),
// the block in L2: strips of kStrip vectors of channels down the rows, their coefficients in registers.
template <typename T>
void nhwc_grad_apply_strips(const Problem& p, const Coefs& k, const BackCoefs& bc, const T* x, const float* dy,
                            T* gx, int64_t n, int64_t c0, int64_t c1) {
  constexpr int V = Vec::size();
  const int64_t C = p.C, W = c1 - c0;
  for (int64_t j = c0; j < c1; j += kStrip * V) {
    Vec d[kStrip], P[kStrip], Q[kStrip], R[kStrip];
    int m[kStrip];
    for (int u = 0; u < kStrip; ++u) {
      m[u] = static_cast<int>(std::clamp<int64_t>(c1 - j - u * V, 0, V));
      if (m[u] == 0) break;
      const int64_t i = n * C + j + u * V;
      d[u] = Vec::loadu(&k.d[i], m[u]), P[u] = Vec::loadu(&bc.p[i], m[u]);
      Q[u] = Vec::loadu(&bc.q[i], m[u]), R[u] = Vec::loadu(&bc.r[i], m[u]);
    }
    for (int64_t r = 0; r < p.S; ++r) {
      const int64_t off = (n * p.S + r) * C + j;
      const float* dr = dy + r * W + (j - c0);
      for (int u = 0; u < kStrip; ++u) {
        if (m[u] == 0) break;
        const Vec xc = load_float(x + off + u * V, m[u]) + d[u];
        const Vec g = at::vec::fmadd(Vec::loadu(dr + u * V, m[u]), P[u], at::vec::fmadd(xc, Q[u], R[u]));
        store_float(gx + off + u * V, g, m[u]);
      }
    }
  }
}

// Channel blocks take an image's groups through sums, coefficients and apply in one task, with the
// block's dy kept in a task buffer: the apply reads x and dy back from L2, and grad_x is written once,
// where the row pieces below read x again from L3 or memory and (fp32) write dy into grad_x and read
// it back. Blocks need runs of at least kBackwardRun bytes a row: (2, 1280, 16, 16) fp32 has 7 blocks
// of 4-5 groups an image, runs of 640-800 B. At (2, 1280, 32, 32), 1 thread, 8 or 16 blocks an image
// (larger than L2) took 1.2-1.5x the row pieces' time, 32 (runs of 160 B) 1.6-1.8x.
constexpr int64_t kBackwardRun = 512;

template <typename T, Act A>
void nhwc_backward(const Problem& p, const Coefs& k, const float* rstd, const T* x, const T* gout, T* gx,
                   GradOut go, const float* o = nullptr) {
  const int64_t C = p.C;
  Sums s(p.N * C);
  BackCoefs bc(p.N * C);
  const int64_t bytes = 3 * sizeof(T) + sizeof(float) + (o ? sizeof(float) : 0);  // x, gout, gx, dy (, o)
  if (const int64_t blocks = nhwc_channel_blocks(p, bytes, sizeof(T), kBackwardRun)) {
    at::parallel_for(0, p.N * blocks, 1, [&](int64_t begin, int64_t end) {
      // the widest block's dy, written by the sums before the apply reads it (not zero-filled)
      const int64_t widest = (p.G + blocks - 1) / blocks * p.Cg;
      const std::unique_ptr<float[]> dy(new float[p.S * widest]);
      for (int64_t t = begin; t < end; ++t) {
        const int64_t n = t / blocks, g0 = piece(p.G, blocks, t % blocks), g1 = piece(p.G, blocks, t % blocks + 1);
        const int64_t c0 = g0 * p.Cg, c1 = g1 * p.Cg;
        nhwc_sums<T, A>(p, k, x, gout, n, 0, p.S, c0, c1, s.s1.data() + n * C, s.s2.data() + n * C,
                        s.s3.data() + n * C, dy.get(), c1 - c0, o);
        for (int64_t g = g0; g < g1; ++g)
          finish_group_backward(p, n, g, s, rstd, bc, go.wpart, go.bpart, go.add, go.ss);
        nhwc_grad_apply_strips<T>(p, k, bc, x, dy.get(), gx, n, c0, c1);
      }
    });
    return;
  }
  const int64_t parts = row_parts(p);
  float* keep = nullptr;
  if constexpr (std::is_same_v<T, float>) keep = gx;
  std::vector<double> part(p.N * parts * 3 * C, 0.0);
  at::parallel_for(0, p.N * parts, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t n = t / parts, r0 = piece(p.S, parts, t % parts), r1 = piece(p.S, parts, t % parts + 1);
      double* base = part.data() + t * 3 * C;
      nhwc_sums<T, A>(p, k, x, gout, n, r0, r1, 0, C, base, base + C, base + 2 * C,
                      keep ? keep + (n * p.S + r0) * C : nullptr, C, o);
    }
  });
  // Per group: its channels' sums over the parts (in part order, whatever the threads), then its
  // coefficients; the groups over the threads. With this and kSumRows (before: serial, and the
  // doubles added every 4 * kChunk / C rows), the backward op over channels_last fp32 SiLU, 2 threads,
  // median of nine runs (AMD EPYC): (2, 1280, 16, 16) 345 -> 271 us, (2, 1280, 8, 8) 122 -> 98 us.
  at::parallel_for(0, p.N * p.G, 1, [&](int64_t begin, int64_t end) {
    for (int64_t ng = begin; ng < end; ++ng) {
      const int64_t n = ng / p.G, g = ng % p.G;
      for (int64_t q = 0; q < parts; ++q) {
        const double* base = part.data() + (n * parts + q) * 3 * C;
        for (int64_t c = g * p.Cg; c < (g + 1) * p.Cg; ++c) {
          s.s1[n * C + c] += base[c];
          s.s2[n * C + c] += base[C + c];
          s.s3[n * C + c] += base[2 * C + c];
        }
      }
      finish_group_backward(p, n, g, s, rstd, bc, go.wpart, go.bpart, go.add, go.ss);
    }
  });
  at::parallel_for(0, p.N * parts, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t n = t / parts, r0 = piece(p.S, parts, t % parts), r1 = piece(p.S, parts, t % parts + 1);
      nhwc_grad_apply<T, A>(p, k, bc, x, gout, gx, n, r0, r1);
    }
  });
}

// Whether group_norm_act_backward takes SiLU's derivative from the forward's output (given that output
// is act(y) itself, without a residual): an fp32 SiLU without add, over planes of at most 32 x 32. With
// add, the forward's y used the group's mean in double (fold_group) and the backward the saved fp32
// mean: where y is small their relative difference, and so s = out / y's error, is large. The backward
// op, 2 threads, fp32 (AMD EPYC): (2, 640, 32, 32) NCHW 349-448 -> 287-434 us, (2, 1280, 16, 16)
// 186-211 -> 152-174 us, channels_last 5-15% less; at 64 x 64 the third read stream cost what the exp
// saved (+2-4% NCHW).
inline bool derivative_from_out(Act act, c10::ScalarType dtype, bool add, int64_t S) {
  return act == Act::kSilu && dtype == at::kFloat && !add && S <= 1024;
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> group_norm_act_backward(
    const Tensor& grad_out, const Tensor& x, int64_t num_groups, const OptTensor& weight, const OptTensor& bias,
    const Tensor& mean, const Tensor& rstd, c10::string_view activation, double negative_slope,
    const OptTensor& add, const OptTensor& scale_shift, const OptTensor& out) {
  const Problem p = make_problem(x, num_groups, weight, bias, add, scale_shift, 0.0, negative_slope, activation);
  // out: the forward's output where it is act(y) itself (no residual), or null; used where
  // derivative_from_out says, ignored elsewhere.
  const bool use_out =
      out.has_value() && out->defined() && derivative_from_out(p.act, x.scalar_type(), add.has_value(), p.S);
  if (use_out)
    TORCH_CHECK(out->scalar_type() == at::kFloat && out->sizes() == x.sizes() && out->strides() == x.strides(),
                "group_norm_act_backward: out must have x's shape, strides and dtype");
  const auto f32 = x.options().dtype(at::kFloat);
  Tensor grad_x = empty_output(x);
  // Every (n, c) of grad_add, grad_ss and the parts of grad_weight / grad_bias is written below.
  Tensor grad_add = at::empty({p.N, p.C}, f32), grad_ss = at::empty({p.N, 2 * p.C}, f32);
  Tensor grad_w = at::zeros({p.C}, f32), grad_b = at::zeros({p.C}, f32);
  if (p.N * p.C > 0 && p.S > 0) {
    TORCH_CHECK(p.S < (int64_t(1) << 31) && p.C < (int64_t(1) << 31), "group_norm_act: spatial size too large");
    // grad_out arrives in x's layout and dtype (autograd gives the output's dtype, which is x's).
    const Tensor g = grad_out.to(x.scalar_type()).contiguous(x.suggest_memory_format());
    const Tensor mean_c = mean.contiguous(), rstd_c = rstd.contiguous();
    Coefs k(p.N * p.C);
    for (int64_t n = 0; n < p.N; ++n)
      for (int64_t gi = 0; gi < p.G; ++gi)
        fold_group(p, n, gi, mean_c.data_ptr<float>()[n * p.G + gi], rstd_c.data_ptr<float>()[n * p.G + gi], k);
    std::vector<float> wpart(p.N * p.C), bpart(p.N * p.C);
    GradOut go{wpart.data(), bpart.data(), grad_add.data_ptr<float>(), grad_ss.data_ptr<float>()};
    const float* o = use_out ? out->data_ptr<float>() : nullptr;
    dispatch_float(x.scalar_type(), "group_norm_act_backward", [&](auto tag) {
      using T = decltype(tag);
      dispatch_act(p.act, [&](auto act) {
        constexpr Act A = decltype(act)::value;
        if (p.channels_last) {
          nhwc_backward<T, A>(p, k, rstd_c.data_ptr<float>(), x.data_ptr<T>(), g.data_ptr<T>(),
                              grad_x.data_ptr<T>(), go, o);
        } else {
          nchw_backward<T, A>(p, k, rstd_c.data_ptr<float>(), x.data_ptr<T>(), g.data_ptr<T>(),
                              grad_x.data_ptr<T>(), go, o);
        }
      });
    });
    float *gw = grad_w.data_ptr<float>(), *gb = grad_b.data_ptr<float>();
    for (int64_t n = 0; n < p.N; ++n)  // images in order: the sums do not depend on the threads
      for (int64_t c = 0; c < p.C; ++c) {
        gw[c] += wpart[n * p.C + c];
        gb[c] += bpart[n * p.C + c];
      }
  } else {
    grad_x.zero_();
    grad_add.zero_();
    grad_ss.zero_();
  }
  return {grad_x, grad_w, grad_b, grad_add, grad_ss};
}

// ---- batch norm in training mode --------------------------------------------
//
// Statistics per channel over N * S elements, then the group-norm blocks with
// one group per channel. channels_last (and 2D (N, C) input) is one image of
// N * S rows of C channels, which nhwc_forward and nhwc_backward handle as
// they are. NCHW: channel c is N planes of S elements, each plane's moments
// (or backward sums) taken in pieces by the threads and merged per channel in
// a fixed order (deterministic), then the per-(n, c) apply passes.
// Bytes (fp32): forward reads x twice and writes out, 12 per element (eager
// batch_norm then the activation: 8 + 8 + 8); backward reads grad_out and x
// twice and writes grad_x, 20 (eager autograd about 40).

Problem bn_problem(const Tensor& x, const OptTensor& weight, const OptTensor& bias, double eps, double slope,
                   c10::string_view activation) {
  Problem p = make_problem(x, x.size(1), weight, bias, std::nullopt, std::nullopt, eps, slope, activation);
  if (p.S == 1) p.channels_last = true;  // (N, C, 1, ...) is already rows of C channels
  if (p.channels_last) {
    p.S *= p.N;
    p.N = 1;
  }
  return p;
}

// Pieces per (n, c) plane so that N * C * parts tasks keep every thread busy.
inline int64_t plane_parts(const Problem& p) {
  const int64_t rows = p.N * p.C, threads = at::get_num_threads();
  return std::max<int64_t>(1, std::min((4 * threads + rows - 1) / rows, p.S / (4 * kChunk)));
}

// The per-channel coefficients of one channel copied to every image: the apply passes index (n, c).
void spread_channel(const Problem& p, int64_t c, Coefs& k) {
  for (int64_t n = 1; n < p.N; ++n) {
    k.a[n * p.C + c] = k.a[c];
    k.d[n * p.C + c] = k.d[c];
    k.b[n * p.C + c] = k.b[c];
  }
}

template <typename T, Act A>
void bn_nchw_forward(const Problem& p, const T* x, T* out, float* mean, float* rstd, float* var, Coefs& k) {
  const int64_t parts = plane_parts(p), tasks = p.N * p.C * parts;
  std::vector<Moments> partial(tasks);
  at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t nc = t / parts, q = t % parts;
      partial[t] = nchw_moments(p, x, nc / p.C, nc % p.C, piece(p.S, parts, q), piece(p.S, parts, q + 1));
    }
  });
  // finish_group indexes mean/rstd/var by n * G + g: channel c is (n = 0, g = c).
  for (int64_t c = 0; c < p.C; ++c) {
    Moments m;
    for (int64_t n = 0; n < p.N; ++n)
      for (int64_t q = 0; q < parts; ++q) {
        const Moments& b = partial[(n * p.C + c) * parts + q];
        m.merge(b.count, b.mean, b.m2);
      }
    finish_group(p, 0, c, m, mean, rstd, k, var);
    spread_channel(p, c, k);
  }
  at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t nc = t / parts, q = t % parts;
      with_bf16_stores<T>([&](auto native) {
        nchw_apply<T, A, decltype(native)::value>(p, k, x, nullptr, out, nc / p.C, nc % p.C, piece(p.S, parts, q),
                                                  piece(p.S, parts, q + 1));
      });
    }
  });
}

std::tuple<Tensor, Tensor, Tensor, Tensor> batch_norm_act_train(const Tensor& x, const OptTensor& weight,
                                                                const OptTensor& bias, double eps,
                                                                c10::string_view activation, double negative_slope) {
  const Problem p = bn_problem(x, weight, bias, eps, negative_slope, activation);
  const auto f32 = x.options().dtype(at::kFloat);
  Tensor out = empty_output(x);
  Tensor mean = at::empty({p.C}, f32), rstd = at::empty({p.C}, f32), var = at::empty({p.C}, f32);
  if (p.C == 0) return {out, mean, rstd, var};
  if (p.N * p.S == 0) {  // no values: NaN statistics, an empty output
    for (const Tensor* t : {&mean, &rstd, &var}) t->fill_(std::numeric_limits<float>::quiet_NaN());
    return {out, mean, rstd, var};
  }
  TORCH_CHECK(p.S < (int64_t(1) << 31) && p.C < (int64_t(1) << 31), "batch_norm_act: size too large");
  Coefs k(p.N * p.C);
  dispatch_float(x.scalar_type(), "batch_norm_act", [&](auto tag) {
    using T = decltype(tag);
    dispatch_act(p.act, [&](auto act) {
      constexpr Act A = decltype(act)::value;
      if (p.channels_last) {
        nhwc_forward<T, A>(p, x.data_ptr<T>(), nullptr, out.data_ptr<T>(), mean.data_ptr<float>(),
                           rstd.data_ptr<float>(), k, var.data_ptr<float>());
      } else {
        bn_nchw_forward<T, A>(p, x.data_ptr<T>(), out.data_ptr<T>(), mean.data_ptr<float>(), rstd.data_ptr<float>(),
                              var.data_ptr<float>(), k);
      }
    });
  });
  return {out, mean, rstd, var};
}

template <typename T, Act A>
void bn_nchw_backward(const Problem& p, const Coefs& k, const float* rstd, const T* x, const T* gout, T* gx,
                      GradOut go) {
  const int64_t parts = plane_parts(p), tasks = p.N * p.C * parts;
  std::vector<double> part(tasks * 3, 0.0);
  at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t nc = t / parts, q = t % parts, b = piece(p.S, parts, q), e = piece(p.S, parts, q + 1);
      channel_sums<T, A>(x + nc * p.S + b, gout + nc * p.S + b, e - b, k.a[nc], k.d[nc], k.b[nc], p.slope,
                         part[3 * t], part[3 * t + 1], part[3 * t + 2]);
    }
  });
  // The channel sums in a fixed order, finished as one group per channel of one image of N * S.
  Problem pooled = p;
  pooled.S = p.N * p.S;
  pooled.N = 1;
  Sums s(p.C);
  for (int64_t c = 0; c < p.C; ++c)
    for (int64_t n = 0; n < p.N; ++n)
      for (int64_t q = 0; q < parts; ++q) {
        const int64_t t = (n * p.C + c) * parts + q;
        s.s1[c] += part[3 * t];
        s.s2[c] += part[3 * t + 1];
        s.s3[c] += part[3 * t + 2];
      }
  BackCoefs bc(p.N * p.C);
  for (int64_t c = 0; c < p.C; ++c) {
    finish_group_backward(pooled, 0, c, s, rstd, bc, go.wpart, go.bpart, go.add, go.ss);
    for (int64_t n = 1; n < p.N; ++n) {
      bc.p[n * p.C + c] = bc.p[c];
      bc.q[n * p.C + c] = bc.q[c];
      bc.r[n * p.C + c] = bc.r[c];
    }
  }
  at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t nc = t / parts, q = t % parts;
      nchw_grad_apply<T, A>(p, k, bc, x, gout, gx, nc, piece(p.S, parts, q), piece(p.S, parts, q + 1));
    }
  });
}

std::tuple<Tensor, Tensor, Tensor> batch_norm_act_backward(const Tensor& grad_out, const Tensor& x,
                                                           const OptTensor& weight, const OptTensor& bias,
                                                           const Tensor& mean, const Tensor& rstd,
                                                           c10::string_view activation, double negative_slope) {
  const Problem p = bn_problem(x, weight, bias, 0.0, negative_slope, activation);
  const auto f32 = x.options().dtype(at::kFloat);
  Tensor grad_x = empty_output(x);
  Tensor grad_w = at::zeros({p.C}, f32), grad_b = at::zeros({p.C}, f32);
  if (p.N * p.C * p.S == 0) return {grad_x, grad_w, grad_b};
  TORCH_CHECK(p.S < (int64_t(1) << 31) && p.C < (int64_t(1) << 31), "batch_norm_act: size too large");
  const Tensor g = grad_out.to(x.scalar_type()).contiguous(x.suggest_memory_format());
  const Tensor mean_c = mean.contiguous(), rstd_c = rstd.contiguous();
  Coefs k(p.N * p.C);
  for (int64_t c = 0; c < p.C; ++c) {
    fold_group(p, 0, c, mean_c.data_ptr<float>()[c], rstd_c.data_ptr<float>()[c], k);
    spread_channel(p, c, k);
  }
  // The (n, c) gradients of add and scale_shift are computed by the shared code and not needed here.
  std::vector<float> unused_add(p.C), unused_ss(2 * p.C);
  GradOut go{grad_w.data_ptr<float>(), grad_b.data_ptr<float>(), unused_add.data(), unused_ss.data()};
  dispatch_float(x.scalar_type(), "batch_norm_act_backward", [&](auto tag) {
    using T = decltype(tag);
    dispatch_act(p.act, [&](auto act) {
      constexpr Act A = decltype(act)::value;
      if (p.channels_last) {
        nhwc_backward<T, A>(p, k, rstd_c.data_ptr<float>(), x.data_ptr<T>(), g.data_ptr<T>(), grad_x.data_ptr<T>(),
                            go);
      } else {
        bn_nchw_backward<T, A>(p, k, rstd_c.data_ptr<float>(), x.data_ptr<T>(), g.data_ptr<T>(),
                               grad_x.data_ptr<T>(), go);
      }
    });
  });
  return {grad_x, grad_w, grad_b};
}

// ---- per-channel affine + activation ------------------------------------------
//
// out = act((x + residual) * scale[c] + shift[c]): batch_norm_act in eval mode
// (scale, shift folded from the running statistics) and the conv2d_act
// epilogue. One read of x (and the residual), one write: 8 bytes per fp32
// element where eager batch_norm then the activation moves 16.

// Elements per task: large enough to amortize the task, small enough to split a VAE plane between threads.
constexpr int64_t kAffineGrain = 16384;

// Plain loops (no vec_steps lambda): see with_bf16_stores.
template <typename T, Act A, bool kNative>
GENFAST_BF16_TARGET void affine_nchw(const T* x, const T* res, T* out, const float* scale, const float* shift,
                                     int64_t C, int64_t S, int64_t begin, int64_t end, float negative_slope) {
  const Vec slope(negative_slope);
  for (int64_t i = begin; i < end;) {
    const int64_t plane = i / S, stop = std::min(end, (plane + 1) * S);
    const Vec a(scale[plane % C]), b(shift[plane % C]);
    for (int j = 0, len = static_cast<int>(stop - i); j < len; j += Vec::size()) {
      const int m = std::min<int>(Vec::size(), len - j);
      Vec h = load_float(x + i + j, m);
      if (res) h = h + load_float(res + i + j, m);
      store_out<T, kNative>(out + i + j, activate<A>(at::vec::fmadd(h, a, b), slope), m);
    }
    i = stop;
  }
}

template <typename T, Act A, bool kNative>
GENFAST_BF16_TARGET void affine_rows(const T* x, const T* res, T* out, const float* scale, const float* shift,
                                     int64_t C, int64_t r0, int64_t r1, float negative_slope) {
  const Vec slope(negative_slope);
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t off = r * C;
    for (int j = 0, len = static_cast<int>(C); j < len; j += Vec::size()) {
      const int m = std::min<int>(Vec::size(), len - j);
      Vec h = load_float(x + off + j, m);
      if (res) h = h + load_float(res + off + j, m);
      const Vec y = at::vec::fmadd(h, Vec::loadu(scale + j, m), Vec::loadu(shift + j, m));
      store_out<T, kNative>(out + off + j, activate<A>(y, slope), m);
    }
  }
}

Tensor channel_affine_act(const Tensor& x, const Tensor& scale, const Tensor& shift, const OptTensor& residual,
                          c10::string_view activation, double negative_slope) {
  Tensor out = empty_output(x);
  const int64_t N = x.size(0), C = x.size(1), numel = x.numel();
  if (numel == 0) return out;
  const int64_t S = numel / (N * C);
  // After the Python layer x (and the residual) are contiguous or channels_last(_3d).
  const bool channels_last = !x.is_contiguous();
  TORCH_CHECK(C < (int64_t(1) << 31) && S < (int64_t(1) << 31), "channel_affine_act: size too large");
  const Act act = parse_activation(activation);
  const float* a = scale.data_ptr<float>();
  const float* b = shift.data_ptr<float>();
  const float slope = static_cast<float>(negative_slope);
  dispatch_float(x.scalar_type(), "channel_affine_act", [&](auto tag) {
    using T = decltype(tag);
    const T* xp = x.data_ptr<T>();
    const T* rp = residual.has_value() ? residual->data_ptr<T>() : nullptr;
    T* op = out.data_ptr<T>();
    dispatch_act(act, [&](auto act_tag) {
      constexpr Act A = decltype(act_tag)::value;
      with_bf16_stores<T>([&](auto native) {
        constexpr bool kNative = decltype(native)::value;
        if (channels_last) {
          at::parallel_for(0, N * S, std::max<int64_t>(1, kAffineGrain / C), [&](int64_t r0, int64_t r1) {
            affine_rows<T, A, kNative>(xp, rp, op, a, b, C, r0, r1, slope);
          });
        } else {
          at::parallel_for(0, numel, kAffineGrain, [&](int64_t begin, int64_t end) {
            affine_nchw<T, A, kNative>(xp, rp, op, a, b, C, S, begin, end, slope);
          });
        }
      });
    });
  });
  return out;
}

}  // namespace

// group_norm_act with its autograd node in C++: what the Python layer calls on the CPU when autograd
// records the call (genfast/_ops.py), in place of a Python autograd.Function, whose node costs more
// host time than these kernels take at small sizes. The same gradients as genfast/conv.py's backward.
struct GroupNormActFunction : torch::autograd::Function<GroupNormActFunction> {
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx, const Tensor& x,
                                                int64_t num_groups, const OptTensor& weight, const OptTensor& bias,
                                                double eps, c10::string_view activation, double negative_slope,
                                                const OptTensor& add, const OptTensor& scale_shift,
                                                const OptTensor& residual) {
    auto [out, mean, rstd] = group_norm_act(x, num_groups, weight, bias, eps, activation, negative_slope, add,
                                            scale_shift, residual);
    const auto opt = [](const OptTensor& t) { return t.has_value() ? *t : Tensor(); };
    ctx->save_for_backward({x, opt(weight), opt(bias), opt(add), opt(scale_shift), mean, rstd});
    ctx->saved_data["num_groups"] = num_groups;
    ctx->saved_data["activation"] = std::string(activation);
    ctx->saved_data["negative_slope"] = negative_slope;
    ctx->saved_data["given"] = static_cast<int64_t>(weight.has_value() | bias.has_value() << 1 |
                                                    add.has_value() << 2 | scale_shift.has_value() << 3 |
                                                    residual.has_value() << 4);
    // Where the backward takes SiLU's derivative from the output (act(y) itself: no residual), out is
    // kept as a detached alias, not a saved variable, so that an in-place change of out stays legal;
    // the backward uses it only if unchanged.
    const int64_t S = x.dim() > 2 ? x.numel() / std::max<int64_t>(1, x.size(0) * x.size(1)) : 1;
    if (!residual.has_value() &&
        derivative_from_out(parse_activation(activation), x.scalar_type(), add.has_value(), S)) {
      ctx->saved_data["out"] = out.detach();
      ctx->saved_data["out_version"] = static_cast<int64_t>(out._version());
    }
    ctx->mark_non_differentiable({mean, rstd});  // returned for the backward only
    ctx->set_materialize_grads(false);
    return {out, mean, rstd};
  }

  // One gradient per forward argument: x, num_groups, weight, bias, eps, activation, negative_slope, add,
  // scale_shift, residual. needs_input_grad counts the tensors given: x, then those of weight, bias,
  // add, scale_shift and residual that were not None.
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    torch::autograd::variable_list result(10);
    const Tensor& grad_out = grads[0];
    if (!grad_out.defined()) return result;  // only the statistics were used
    const int64_t given = ctx->saved_data["given"].toInt();
    bool need[5];  // weight, bias, add, scale_shift, residual
    for (int i = 0, edge = 1; i < 5; ++i) need[i] = (given >> i & 1) && ctx->needs_input_grad(edge++);
    const bool need_x = ctx->needs_input_grad(0), need_w = need[0], need_b = need[1], need_add = need[2],
               need_ss = need[3];
    if (need_x || need_w || need_b || need_add || need_ss) {
      const auto saved = ctx->get_saved_variables();
      const auto opt = [](const Tensor& t) { return t.defined() ? OptTensor(t) : OptTensor(); };
      const std::string activation = ctx->saved_data["activation"].toStringRef();
      OptTensor out;
      if (ctx->saved_data.count("out")) {
        Tensor o = ctx->saved_data["out"].toTensor();
        if (o._version() == ctx->saved_data["out_version"].toInt()) out = o;
      }
      auto [gx, gw, gb, gadd, gss] = group_norm_act_backward(
          grad_out, saved[0], ctx->saved_data["num_groups"].toInt(), opt(saved[1]), opt(saved[2]), saved[5],
          saved[6], activation, ctx->saved_data["negative_slope"].toDouble(), opt(saved[3]), opt(saved[4]), out);
      if (need_x) result[0] = gx;
      if (need_w) result[2] = gw;
      if (need_b) result[3] = gb;
      if (need_add) result[7] = gadd;
      if (need_ss) result[8] = gss;
      if (at::GradMode::is_enabled() && grad_out.requires_grad()) {
        // create_graph: gradients whose own backward raises (Python's once_differentiable)
        for (auto& r : result) {
          if (r.defined()) r = r.detach().requires_grad_(true);
        }
        result = torch::autograd::DelayedError("group_norm_act: double backward is not supported", 10)
                     .apply(std::move(result));
      }
    }
    if (need[4]) result[9] = grad_out;
    return result;
  }
};

std::tuple<Tensor, Tensor, Tensor> group_norm_act_autograd(const Tensor& x, int64_t num_groups,
                                                           const OptTensor& weight, const OptTensor& bias, double eps,
                                                           c10::string_view activation, double negative_slope,
                                                           const OptTensor& add, const OptTensor& scale_shift,
                                                           const OptTensor& residual) {
  auto r = GroupNormActFunction::apply(x, num_groups, weight, bias, eps, activation, negative_slope, add, scale_shift,
                                       residual);
  return {r[0], r[1], r[2]};
}

TORCH_LIBRARY_FRAGMENT(genfast_cpu, m) {
  m.def("group_norm_act", &group_norm_act);
  m.def("group_norm_act_out(Tensor x, int num_groups, Tensor? weight, Tensor? bias, float eps, str activation, "
        "float negative_slope, Tensor? add, Tensor? scale_shift, Tensor? residual, Tensor(a!) out) -> (Tensor, Tensor)",
        &group_norm_act_out);
  m.def("group_norm_act_backward", &group_norm_act_backward);
  m.def("group_norm_act_autograd", &group_norm_act_autograd);
  m.def("channel_affine_act", &channel_affine_act);
  m.def("batch_norm_act_train", &batch_norm_act_train);
  m.def("batch_norm_act_backward", &batch_norm_act_backward);
}

}  // namespace genfast::cpu
