// Token sampling on the CPU: penalties, temperature, top-k, top-p, min-p and
// an inverse-CDF draw, one row per task, with no sort of the vocabulary.
// Semantics: genfast/reference/sampling.py (the oracle) and genfast/sampling.py.
//
// Per row (V logits, a 512 KB fp32 row for Llama 3 stays in L2):
//   A. read the row once into an fp32 scratch, max and NaN/+inf detection;
//      penalties patch the scratch at the previous tokens' ids (or where the
//      token counts are > 0);
//   B. d = (max - x) * inv_temperature in place (d >= 0, 0 at the top), and
//      what picks a candidate cut-off C, in the same pass: with top-k the
//      counts of d <= 1, 2, 3, ..., 64 nats;
//   C. compact the candidates d <= C (AVX-512 compress), with exp(-d);
//   D. exact thresholds on the candidates by a selection that brackets the
//      answer between sampled pivots, one pass a step (the set shrinks ~6x a
//      pass; the last <= 64 values are sorted);
//   E. kept mass Z and the draw: first kept token whose running mass exceeds
//      u * Z, u = uniform(seed, offset + row), summed per 256-element block in
//      the same order for Z and for the scan.
// Top-p without top-k (the common serving setting, where every token's exp is
// needed for Z) skips A and folds B into C: from a sample of the row, a
// provisional top and a guessed cut; then one pass over the logits themselves
// computes every exp(-d), Z, the true max and the compacted candidates; the
// guess is checked (the candidates hold p Z) and redone from a bound if not.
// Eager PyTorch with a sort moves the row ~15 times and sorts 128k keys; this
// reads the input once and makes 2-3 passes over the cached scratch (top-p
// alone: one pass over the row, a 1/16 sample, then the candidates).

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <memory>
#include <algorithm>
#include <utility>
#include <vector>

#include "ops.h"
#include "philox.h"

namespace genfast::cpu {
namespace {

constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr int kLanes = Vec::size();
constexpr int kSumBlock = 256;  // Z and the scan add lanes per block of this many candidates
constexpr int64_t kNanRow = -1, kEmptyRow = -2;
// Candidate cut-offs in nats below the top: about sqrt(2) apart, so the cut
// keeps at most ~2x the tokens the filter needs in the typical range.
constexpr int kLevels = 11;
constexpr float kLevel[kLevels] = {1.f, 2.f, 3.f, 4.f, 6.f, 8.f, 11.f, 16.f, 23.f, 32.f, 64.f};

struct RowParams {
  float inv_t;
  int64_t k;
  float p, min_p, rep, presence, freq;
};

inline int64_t round_up(int64_t n) { return (n + kLanes - 1) / kLanes * kLanes; }

inline Vec ones_where(const Vec& mask) { return mask & Vec(1.0f); }

// exp(-d), the mass of a token d nats below the top, for d >= 0 (this path's
// largest cost: an exp per token): common.h's exp2_fast of -d log2(e), 10
// vector ops with the scaling and the clamp (the top token's mass is exactly
// 1), against ~15 for ATen's exp_u20 (20 ulp). d = inf (and the NaN padding)
// give 0. Not exp_fast: for d >= 0 this needs neither its two-sided clamp nor
// its Cody-Waite step; top-p alone at 8 x 128256 took 0.57 ms with a 10-op exp
// like this, 0.61 ms with exp_fast, 0.65 ms with exp_u20 (2 threads).
inline Vec exp_neg(const Vec& d) {
#if defined(CPU_CAPABILITY_AVX512)
  // max(NaN, -200) is -200: the padding's exp is 2^-200 = 0 in fp32
  return exp2_fast(Vec(_mm512_max_ps(_mm512_mul_ps(d, _mm512_set1_ps(-1.44269504f)), _mm512_set1_ps(-200.f))));
#else
  return (Vec(0.f) - d).exp_u20();
#endif
}

float lane_max(const Vec& v) {
  alignas(64) float lanes[kLanes];
  v.store(lanes);
  float m = lanes[0];
  for (int i = 1; i < kLanes; ++i) m = (std::isnan(lanes[i]) || lanes[i] > m) ? lanes[i] : m;
  return m;
}

// Buffers grown once per thread and reused, so a decode step does not fault in
// fresh pages for its scratch rows (a 128k-row scratch is 512 KB).
struct Scratch {
  std::unique_ptr<float[]> x, e, cd, ce, wd[2], we[2];  // wd/we: the selection's work sets
  std::unique_ptr<int32_t[]> ci;
  int64_t cap = 0;
  void reserve(int64_t n) {
    if (n <= cap) return;
    for (auto* p : {&x, &e, &cd, &ce, &wd[0], &wd[1], &we[0], &we[1]}) p->reset(new float[n]);
    ci.reset(new int32_t[n]);
    cap = n;
  }
};

Scratch& thread_scratch() {
  static thread_local Scratch s;
  return s;
}

// Max over n (unpadded) values; NaN wins.
template <typename T>
float row_max(const T* x, int64_t n) {
  Vec m(-kInf);
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) m = at::vec::maximum(m, load_float(x + j, kLanes));
  if (j < n) m = at::vec::maximum(m, Vec::set(Vec(-kInf), load_float(x + j, n - j), n - j));
  return lane_max(m);
}

// A: the row in fp32 into x[0, V), NaN padding up to a multiple of the vector
// width; returns the max (NaN if any).
template <typename T>
float load_row(const T* src, int64_t V, float* x) {
  Vec m(-kInf);
  int64_t j = 0;
  for (; j + kLanes <= V; j += kLanes) {
    const Vec v = load_float(src + j, kLanes);
    v.store(x + j);
    m = at::vec::maximum(m, v);
  }
  if (j < V) {
    const int r = static_cast<int>(V - j);
    const Vec v = load_float(src + j, r);
    v.store(x + j, r);
    m = at::vec::maximum(m, Vec::set(Vec(-kInf), v, r));
  }
  for (int64_t i = V; i < round_up(V); ++i) x[i] = std::numeric_limits<float>::quiet_NaN();
  return lane_max(m);
}

// A penalized logit from its raw value and its count c > 0, as the reference
// (left to right, one rounding per operation).
inline float penalized(float raw, float c, const RowParams& rp) {
  return (raw < 0.f ? raw * rp.rep : raw / rp.rep) - rp.presence - rp.freq * c;
}

// Penalties from previous token ids: each distinct id once, with its count
// (runs of the sorted ids). Returns whether any applied.
template <typename T>
bool penalize_prev(const T* src, int64_t V, const int64_t* prev, int64_t n, const RowParams& rp, float* x) {
  std::vector<int64_t> ids;
  for (int64_t i = 0; i < n; ++i) {
    if (prev[i] >= 0 && prev[i] < V) ids.push_back(prev[i]);
  }
  std::sort(ids.begin(), ids.end());
  for (size_t i = 0; i < ids.size();) {
    size_t j = i;
    while (j < ids.size() && ids[j] == ids[i]) ++j;
    x[ids[i]] = penalized(static_cast<float>(src[ids[i]]), static_cast<float>(j - i), rp);
    i = j;
  }
  return !ids.empty();
}

// Penalties from a row of token counts. Returns whether any applied.
template <typename T, typename C>
bool penalize_counts(const T* src, int64_t V, const C* counts, const RowParams& rp, float* x) {
  bool any = false;
  for (int64_t b = 0; b < V; b += 64) {
    const int64_t end = std::min(V, b + 64);
    C hit = 0;  // counts are mostly 0: test a block at once (the OR vectorizes)
    for (int64_t j = b; j < end; ++j) hit |= counts[j];
    if (hit == 0) continue;
    for (int64_t j = b; j < end; ++j) {
      if (counts[j] > 0) {
        x[j] = penalized(static_cast<float>(src[j]), static_cast<float>(counts[j]), rp);
        any = true;
      }
    }
  }
  return any;
}

// Where a row's penalties come from: previous ids, or counts of one of two dtypes.
struct PenaltySource {
  const int64_t* prev = nullptr;
  int64_t n_prev = 0;
  const int64_t* counts64 = nullptr;
  const int32_t* counts32 = nullptr;

  bool any() const { return prev != nullptr || counts64 != nullptr || counts32 != nullptr; }

  template <typename T>
  bool apply(const T* src, int64_t V, int64_t row, const RowParams& rp, float* x) const {
    if (prev != nullptr) return penalize_prev(src, V, prev + row * n_prev, n_prev, rp, x);
    if (counts64 != nullptr) return penalize_counts(src, V, counts64 + row * V, rp, x);
    if (counts32 != nullptr) return penalize_counts(src, V, counts32 + row * V, rp, x);
    return false;
  }
};

int64_t first_index_of(const float* x, int64_t V, float value) {
  int64_t j = 0;
#if defined(CPU_CAPABILITY_AVX512)
  const __m512 v = _mm512_set1_ps(value);
  for (; j + 16 <= V; j += 16) {
    const __mmask16 m = _mm512_cmp_ps_mask(_mm512_loadu_ps(x + j), v, _CMP_EQ_OQ);
    if (m != 0) return j + __builtin_ctz(m);
  }
#endif
  for (; j < V; ++j) {
    if (x[j] == value) return j;
  }
  return 0;
}

struct Levels {
  float count[kLevels] = {};
};

// B: d in place over the padded row; with kCount the counts of d <= each level;
// with kMass also exp(-d) into e (0 in the padding).
template <bool kCount, bool kMass>
Levels distances(float* x, float* e, int64_t n_pad, float top, float inv_t) {
  Levels out;
#if defined(CPU_CAPABILITY_AVX512)
  __m512 cnt[kLevels];
  for (int l = 0; l < kLevels; ++l) cnt[l] = _mm512_setzero_ps();
  const __m512 vtop = _mm512_set1_ps(top), vinv = _mm512_set1_ps(inv_t), one = _mm512_set1_ps(1.f);
  for (int64_t j = 0; j < n_pad; j += 16) {
    const __m512 d = _mm512_mul_ps(_mm512_sub_ps(vtop, _mm512_loadu_ps(x + j)), vinv);
    _mm512_storeu_ps(x + j, d);
    if constexpr (kMass) {
      const __mmask16 real = _mm512_cmp_ps_mask(d, d, _CMP_ORD_Q);  // not the NaN padding
      _mm512_storeu_ps(e + j, _mm512_maskz_mov_ps(real, exp_neg(Vec(d))));
    }
    if constexpr (kCount) {
      for (int l = 0; l < kLevels; ++l) {
        cnt[l] = _mm512_mask_add_ps(cnt[l], _mm512_cmp_ps_mask(d, _mm512_set1_ps(kLevel[l]), _CMP_LE_OQ), cnt[l], one);
      }
    }
  }
  for (int l = 0; l < kLevels && kCount; ++l) out.count[l] = lane_sum(Vec(cnt[l]));
#else
  Vec cnt[kLevels];
  for (int l = 0; l < kLevels; ++l) cnt[l] = Vec(0.f);
  const Vec vtop(top), vinv(inv_t), vinf(kInf);
  for (int64_t j = 0; j < n_pad; j += kLanes) {
    const Vec d = (vtop - Vec::loadu(x + j)) * vinv;
    d.store(x + j);
    if constexpr (kMass) (exp_neg(d) & (d <= vinf)).store(e + j);  // padding (NaN) adds nothing
    if constexpr (kCount) {
      for (int l = 0; l < kLevels; ++l) cnt[l] = cnt[l] + ones_where(d <= Vec(kLevel[l]));
    }
  }
  for (int l = 0; l < kLevels && kCount; ++l) out.count[l] = lane_sum(cnt[l]);
#endif
  return out;
}

// B for top-p without top-k, read from the row's source (the logits, or the
// penalized scratch) with no copy and no pass for the max: distances are taken
// from a provisional top, the max of a sample of the row (~1/16 of its vectors,
// evenly spaced), and the pass that compacts checks it (below).
//
// The cut C below which the tokens hold p of the mass is guessed from the same
// sample. The mass beyond a level is spread over many light tokens, so the
// sample estimates it well; the mass near the top sits on a few heavy tokens,
// which a sample hits or misses. So C is the first level whose estimated tail is
// under kTailShare of (1 - p) Z, with Z underestimated as the top token's mass
// plus the tail beyond the first level. The pass that compacts at C checks it.
// At 8 x 128256 fp32 (randn * 3, 2 threads) a share of 0.5 / 0.7 / 1.0 kept
// ~20k / ~15k / ~12k candidates a row and missed in 4% / 8% / 20% of rows
// (a miss costs one more pass); 0.7 was the fastest with 1.0.
constexpr int kCutLevels = 14;
constexpr float kCutLevel[kCutLevels] = {3.f, 4.f, 5.f, 6.f, 7.f, 8.f, 9.f, 10.f, 11.f, 12.f, 14.f, 16.f, 18.f, 20.f};
constexpr float kTailShare = 0.7f;

// The sampled vectors: every step-th, at least 64 of them where the row has them.
inline int64_t sample_step(int64_t V) { return std::clamp<int64_t>((V + kLanes - 1) / kLanes / 64, 1, 16) * kLanes; }

// m <= kLanes values as a vector, -inf in the lanes past m.
template <typename T>
inline Vec load_logits(const T* x, int m) {
  const Vec v = load_float(x, m);
  return m == kLanes ? v : Vec::set(Vec(-kInf), v, m);
}

// d = (top - x) inv_t; a lane past the row (x = -inf) has d = inf: mass 0, never a candidate.
inline Vec distance(const Vec& x, const Vec& top, const Vec& inv_t) { return (top - x) * inv_t; }

template <typename T>
float sample_max(const T* src, int64_t V) {
  Vec m(-kInf);
  const int64_t step = sample_step(V);
  for (int64_t j = 0; j < V; j += step) {
    __builtin_prefetch(src + std::min(j + 8 * step, V - 1));  // strided: the hardware prefetchers miss it
    m = at::vec::maximum(m, load_logits(src + j, static_cast<int>(std::min<int64_t>(kLanes, V - j))));
  }
  return lane_max(m);
}

struct CutGuess {
  float cut;
  bool dense;  // more than 1 in 128 tokens below it (see compact)
};

template <typename T>
CutGuess guess_top_p_cut(const T* src, int64_t V, float top, float inv_t, float p) {
  const int64_t step = sample_step(V);
  const Vec vtop(top), vinv(inv_t);
  float tail[kCutLevels];
  int64_t sampled = 0;
  auto sample = [&](int64_t j) {
    const int m = static_cast<int>(std::min<int64_t>(kLanes, V - j));
    sampled += m;
    return distance(load_logits(src + j, m), vtop, vinv);
  };
#if defined(CPU_CAPABILITY_AVX512)
  __m512 acc[kCutLevels];
  for (int l = 0; l < kCutLevels; ++l) acc[l] = _mm512_setzero_ps();
  for (int64_t j = 0; j < V; j += step) {
    const __m512 d = sample(j), ev = exp_neg(Vec(d));
    for (int l = 0; l < kCutLevels; ++l) {
      acc[l] = _mm512_mask_add_ps(acc[l], _mm512_cmp_ps_mask(d, _mm512_set1_ps(kCutLevel[l]), _CMP_GT_OQ), acc[l], ev);
    }
  }
  for (int l = 0; l < kCutLevels; ++l) tail[l] = lane_sum(Vec(acc[l]));
#else
  Vec acc[kCutLevels];
  for (int l = 0; l < kCutLevels; ++l) acc[l] = Vec(0.f);
  for (int64_t j = 0; j < V; j += step) {
    const Vec d = sample(j), ev = exp_neg(d) & (d <= Vec(kInf));
    for (int l = 0; l < kCutLevels; ++l) acc[l] = acc[l] + (ev & (d > Vec(kCutLevel[l])));
  }
  for (int l = 0; l < kCutLevels; ++l) tail[l] = lane_sum(acc[l]);
#endif
  const float scale = static_cast<float>(V) / static_cast<float>(sampled);
  const float allowed = kTailShare * (1.f - p) * (1.f + tail[0] * scale);
  int l = 0;
  while (l + 1 < kCutLevels && tail[l] * scale > allowed) ++l;
  Vec below(0.f);
  sampled = 0;
  for (int64_t j = 0; j < V; j += step) below = below + ones_where(sample(j) <= Vec(kCutLevel[l]));
  return {kCutLevel[l], lane_sum(below) * 128.f > static_cast<float>(sampled)};
}

// C for top-p without top-k, in the same pass as the exp of every token: d from
// the provisional top, the total mass Z, the row's max (NaN if any), and the
// candidates d <= cut with exp(-d) and index (see compact), whose mass is
// z_cand; returns their number. A token above the provisional top has d < 0 and
// a mass above 1, up to e^kAboveTop (beyond that the caller starts again from
// the row's max).
constexpr float kAboveTop = 60.f;

template <typename T, bool kDense>
int64_t mass_and_candidates(const T* src, int64_t V, float top, float inv_t, float cut, float* cd, float* ce,
                            int32_t* ci, float& z_all, float& z_cand, float& max) {
  int64_t n = 0;
  const Vec vtop(top), vinv(inv_t);
  Vec mx(-kInf);
#if defined(CPU_CAPABILITY_AVX512)
  const __m512 vcut = _mm512_set1_ps(cut);
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  __m512 acc = _mm512_setzero_ps(), acc_c = _mm512_setzero_ps();
  for (int64_t j = 0; j < V; j += 16) {
    const Vec x = load_logits(src + j, static_cast<int>(std::min<int64_t>(16, V - j)));
    mx = at::vec::maximum(mx, x);
    const __m512 d = distance(x, vtop, vinv);
    const __m512 ev = exp_neg(Vec(d));
    acc = _mm512_add_ps(acc, ev);
    const __mmask16 m = _mm512_cmp_ps_mask(d, vcut, _CMP_LE_OQ);
    if (!kDense && m == 0) continue;
    acc_c = _mm512_mask_add_ps(acc_c, m, acc_c, ev);
    _mm512_storeu_ps(cd + n, _mm512_maskz_compress_ps(m, d));
    _mm512_storeu_ps(ce + n, _mm512_maskz_compress_ps(m, ev));
    const __m512i index = _mm512_add_epi32(lane, _mm512_set1_epi32(static_cast<int>(j)));
    _mm512_storeu_si512(ci + n, _mm512_maskz_compress_epi32(m, index));
    n += __builtin_popcount(m);
  }
  z_all = lane_sum(Vec(acc));
  z_cand = lane_sum(Vec(acc_c));
#else
  Vec acc(0.f), acc_c(0.f);
  for (int64_t j = 0; j < V; j += kLanes) {
    const Vec x = load_logits(src + j, static_cast<int>(std::min<int64_t>(kLanes, V - j)));
    mx = at::vec::maximum(mx, x);
    const Vec d = distance(x, vtop, vinv);
    const Vec ev = exp_neg(d) & (d <= Vec(kInf));
    acc = acc + ev;
    acc_c = acc_c + (ev & (d <= Vec(cut)));
    alignas(64) float dl[kLanes], el[kLanes];
    d.store(dl);
    ev.store(el);
    for (int i = 0; i < kLanes; ++i) {
      if (dl[i] <= cut) cd[n] = dl[i], ce[n] = el[i], ci[n++] = static_cast<int32_t>(j + i);
    }
  }
  z_all = lane_sum(acc);
  z_cand = lane_sum(acc_c);
#endif
  max = lane_max(mx);
  return n;
}

// Whether candidates (d <= cut, or x >= cut with kGe) are dense enough in the
// row that many vectors hold one: then the compaction stores every vector
// without testing it (a test that goes either way mispredicts). Judged on the
// row's first 2048 tokens: more than 1 in 128 (then ~12% of vectors or more hold one).
template <bool kGe = false>
bool dense(const float* d, int64_t n_pad, float cut) {
  const int64_t n = std::min<int64_t>(n_pad, 2048);
  int64_t hits = 0;
  for (int64_t j = 0; j < n; ++j) hits += kGe ? d[j] >= cut : d[j] <= cut;
  return hits * 128 > n;
}

// C: candidates d <= cut in vocabulary order, with their exp(-d) when e is
// given; returns their number. kDense: no test for empty vectors (top-p 0.9
// at 8 x 128256, 13-15k candidates a row: the compaction took 40k instead of
// 86k cycles a row, the whole op 0.74-0.90 instead of 0.94-1.00 ms on one
// thread and 0.55-0.57 instead of 0.56-0.63 ms on two, runs alternated);
// sparse candidates (top-k) keep the test, which then predicts.
template <bool kDense>
int64_t compact(const float* d, const float* e, int64_t n_pad, float cut, float* cd, float* ce, int32_t* ci) {
  int64_t n = 0;
#if defined(CPU_CAPABILITY_AVX512)
  const __m512 vcut = _mm512_set1_ps(cut);
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  for (int64_t j = 0; j < n_pad; j += 16) {
    const __m512 v = _mm512_loadu_ps(d + j);
    const __mmask16 m = _mm512_cmp_ps_mask(v, vcut, _CMP_LE_OQ);
    if (!kDense && m == 0) continue;
    // compress in a register, then a full store (the buffers have a vector of slack): faster than a
    // compress-store to memory
    _mm512_storeu_ps(cd + n, _mm512_maskz_compress_ps(m, v));
    if (e != nullptr) _mm512_storeu_ps(ce + n, _mm512_maskz_compress_ps(m, _mm512_loadu_ps(e + j)));
    _mm512_storeu_si512(ci + n, _mm512_maskz_compress_epi32(m, _mm512_add_epi32(lane, _mm512_set1_epi32(static_cast<int>(j)))));
    n += __builtin_popcount(m);
  }
#else
  for (int64_t j = 0; j < n_pad; ++j) {
    if (d[j] <= cut) {
      cd[n] = d[j];
      if (e != nullptr) ce[n] = e[j];
      ci[n++] = static_cast<int32_t>(j);
    }
  }
#endif
  return n;
}

// Pads the candidates to a vector multiple (d NaN, e 0) and, unless the pass
// that found them did, computes their exp(-d).
void candidate_mass(float* cd, float* ce, int64_t n, bool have_e) {
  const int64_t n_pad = round_up(n);
  for (int64_t i = n; i < n_pad; ++i) cd[i] = std::numeric_limits<float>::quiet_NaN(), ce[i] = 0.f;
  if (have_e) return;
  for (int64_t j = 0; j < n_pad; j += kLanes) {
    const Vec d = Vec::loadu(cd + j);
    (exp_neg(d) & (d <= Vec(kInf))).store(ce + j);
  }
}

// The kept mass d <= t, summed per kSumBlock block: the scan adds in this order too.
float block_mass(const float* cd, const float* ce, int64_t begin, int64_t end, float t) {
  Vec acc(0.f);
  const Vec vt(t);
  for (int64_t j = begin; j < end; j += kLanes) acc = acc + (Vec::loadu(ce + j) & (Vec::loadu(cd + j) <= vt));
  return lane_sum(acc);
}

float mass_le(const float* cd, const float* ce, int64_t n_pad, float t) {
  float z = 0.f;
  for (int64_t b = 0; b < n_pad; b += kSumBlock) z += block_mass(cd, ce, b, std::min(n_pad, b + kSumBlock), t);
  return z;
}

// D: exact thresholds over the candidates. Returns the smallest candidate
// value t with F(t) >= target, F(t) the count (kMass false) or the mass of the
// candidates d <= t: the tie-inclusive threshold of top-k and top-p. Each pass
// brackets t between two pivots read off a sorted sample of the working set W,
// sums F below the bracket and compress-stores the elements inside it, which
// become W. F is estimated from above: W's total F (known) less the sample's
// scaled F over each pivot, since the tokens above t are many and light while
// the mass below it sits on a few heavy tokens, which a sample hits or misses
// (estimated from below, the bracket missed t more often than not). A bracket
// that misses is retried as the side that holds t. About 1/6 of W is kept a
// pass; at kSmall elements or fewer W is sorted.
constexpr int64_t kSmall = 64;
constexpr int kSample = 64, kBracket = 5;

template <bool kMass>
float select(const float* d, const float* e, int64_t n, float hi, float target, float total, Scratch& s) {
  const float* wd = d;
  const float* we = e;
  int64_t wn = n;
  // t is in (lo, hi]; base: F of the candidates <= lo; W holds every candidate in (lo, hi], whose F
  // is total (the first W, or one a missed bracket left, others too: a pass counts only (lo, hi]).
  float base = 0.f, lo = -kInf, a = lo, b = hi;
  int buf = 0;          // the work buffer the next pass writes
  bool forced = false;  // the bracket (a, b] is set by a missed one
  std::pair<float, float> sample[kSample];
  for (int pass = 0; pass < 64 && wn > kSmall; ++pass) {
    if (!forced) {
      for (int i = 0; i < kSample; ++i) {
        const int64_t k = i * wn / kSample;
        sample[i] = {wd[k], kMass ? we[k] : 1.f};
      }
      std::sort(sample, sample + kSample, [](const auto& x, const auto& y) { return x.first < y.first; });
      const float scale = static_cast<float>(wn) / kSample;
      float above = 0.f;  // the estimated F of W over sample[c]
      int c = kSample - 1;
      while (c > 0) {
        if (sample[c].first > lo && sample[c].first <= hi) above += sample[c].second * scale;
        if (base + total - above < target) break;
        --c;
      }
      a = c >= kBracket ? std::max(lo, sample[c - kBracket].first) : lo;
      b = c + kBracket < kSample ? std::min(hi, sample[c + kBracket].first) : hi;
    }
    float* md = s.wd[buf].get();
    float* me = s.we[buf].get();
    int64_t nm = 0;
    float below = 0.f, mid = 0.f;  // F of W in (lo, a] and in (a, b]
#if defined(CPU_CAPABILITY_AVX512)
    const __m512 vlo = _mm512_set1_ps(lo), va = _mm512_set1_ps(a), vb = _mm512_set1_ps(b), one = _mm512_set1_ps(1.f);
    __m512 acc_below = _mm512_setzero_ps(), acc_mid = _mm512_setzero_ps();
    for (int64_t j = 0; j < wn; j += 16) {
      const __mmask16 valid = wn - j >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (wn - j)) - 1);
      const __m512 v = _mm512_maskz_loadu_ps(valid, wd + j);
      const __m512 ev = kMass ? _mm512_maskz_loadu_ps(valid, we + j) : one;
      const __mmask16 in = _mm512_mask_cmp_ps_mask(valid, v, vlo, _CMP_GT_OQ);
      const __mmask16 mb = _mm512_mask_cmp_ps_mask(in, v, va, _CMP_LE_OQ);
      const __mmask16 mm = _mm512_mask_cmp_ps_mask(in & ~mb, v, vb, _CMP_LE_OQ);
      // compress in a register, then a full store (the work buffers have a vector of slack)
      _mm512_storeu_ps(md + nm, _mm512_maskz_compress_ps(mm, v));
      if constexpr (kMass) _mm512_storeu_ps(me + nm, _mm512_maskz_compress_ps(mm, ev));
      acc_below = _mm512_mask_add_ps(acc_below, mb, acc_below, ev);
      acc_mid = _mm512_mask_add_ps(acc_mid, mm, acc_mid, ev);
      nm += __builtin_popcount(mm);
    }
    below = lane_sum(Vec(acc_below));
    mid = lane_sum(Vec(acc_mid));
#else
    for (int64_t j = 0; j < wn; ++j) {
      const float ev = kMass ? we[j] : 1.f;
      if (!(wd[j] > lo)) continue;
      if (wd[j] <= a) {
        below += ev;
      } else if (wd[j] <= b) {
        md[nm] = wd[j];
        if (kMass) me[nm] = ev;
        mid += ev;
        ++nm;
      }
    }
#endif
    forced = false;
    if (base + below >= target) {  // t in (lo, a]: that bracket next, on the same W
      forced = true, hi = b = a, a = lo;
    } else if (base + below + mid >= target) {
      if (nm == wn) break;  // no progress (ties): sort W
      base += below, total = mid, lo = a, hi = b;
      wd = md, we = me, wn = nm, buf = 1 - buf;
      if (wn == 0) return lo;  // only by rounding: keep what is known to be below
    } else {  // t in (b, hi]: that bracket next
      forced = true, base += below + mid, lo = a = b, b = hi;
    }
  }
  std::vector<std::pair<float, float>> w;
  w.reserve(wn);
  for (int64_t i = 0; i < wn; ++i) {
    if (wd[i] > lo && wd[i] <= hi) w.emplace_back(wd[i], kMass ? we[i] : 1.f);
  }
  std::sort(w.begin(), w.end(), [](const auto& x, const auto& y) { return x.first < y.first; });
  float cum = base;
  for (const auto& [dv, ev] : w) {
    cum += ev;
    if (cum >= target) return dv;
  }
  return !w.empty() ? w.back().first : lo;
}

struct Draw {
  int64_t token;
  float logprob;
};

// E: inverse CDF over candidates d <= t in vocabulary order.
Draw draw(const float* cd, const float* ce, const int32_t* ci, int64_t n, float t, float u) {
  const int64_t n_pad = round_up(n);
  const float z = mass_le(cd, ce, n_pad, t);
  const float target = u * z;
  auto index = [&](int64_t i) { return ci != nullptr ? static_cast<int64_t>(ci[i]) : i; };
  float run = 0.f;
  int64_t pick = -1;
  for (int64_t b = 0; b < n_pad && pick < 0; b += kSumBlock) {
    const int64_t end = std::min(n_pad, b + kSumBlock);
    const float s = block_mass(cd, ce, b, end, t);
    if (run + s > target) {
      // The crossing is in this block; lane sums round differently from a running
      // sum, so fall back to its last positive candidate.
      float r = run;
      for (int64_t i = b; i < std::min(end, n); ++i) {
        if (!(cd[i] <= t) || ce[i] <= 0.f) continue;
        pick = i;
        r += ce[i];
        if (r > target) break;
      }
    }
    run += s;
  }
  if (pick < 0) {  // u * z rounded up to z: the last kept token with mass
    for (int64_t i = n - 1; i >= 0; --i) {
      if (cd[i] <= t && ce[i] > 0.f) {
        pick = i;
        break;
      }
    }
  }
  if (pick < 0) pick = 0;  // unreachable: the top token has d = 0, mass 1
  return {index(pick), -cd[pick] - std::log(z)};
}

// Top-p without top-k (min-p too), from the row's source: B and C in one pass
// at a guessed cut, checked; if the candidates hold less than p Z, C again at
// the bound C = log(2 V / ((1 - p) Z)): the tokens beyond it hold at most
// V e^-C = (1 - p) Z / 2 of the mass. top: a provisional top (see above).
template <typename T>
Draw top_p_row(const T* src, int64_t V, float top, const RowParams& rp, float u, Scratch& s) {
  float *cd = s.cd.get(), *ce = s.ce.get();
  int32_t* ci = s.ci.get();
  float z_all = 0.f, z_cand = 0.f, max = 0.f, cut = kInf;
  int64_t n = 0;
  auto candidates = [&](bool dense) {
    return dense ? mass_and_candidates<T, true>(src, V, top, rp.inv_t, cut, cd, ce, ci, z_all, z_cand, max)
                 : mass_and_candidates<T, false>(src, V, top, rp.inv_t, cut, cd, ce, ci, z_all, z_cand, max);
  };
  if (!std::isfinite(top)) top = row_max(src, V);  // the sample holds NaN or +-inf: the row's max decides
  for (;;) {
    if (std::isnan(top) || top == kInf) return {kNanRow, 0.f};
    if (top == -kInf) return {kEmptyRow, 0.f};
    const CutGuess guess = guess_top_p_cut(src, V, top, rp.inv_t, rp.p);
    cut = guess.cut;
    n = candidates(guess.dense);
    if (std::isnan(max) || max == kInf) return {kNanRow, 0.f};
    if (!((max - top) * rp.inv_t > kAboveTop)) break;
    top = max;  // far above the provisional top: its masses may overflow
  }
  if (!(z_cand >= rp.p * z_all)) {
    cut = std::log(2.f * static_cast<float>(V) / ((1.f - rp.p) * z_all));
    n = candidates(true);
  }
  candidate_mass(cd, ce, n, true);
  const float d_p = select<true>(cd, ce, n, cut, rp.p * z_all, z_cand, s);
  // min-p keeps d <= -log(min_p) from the row's max: (top - max) inv_t in these distances
  const float d_m = rp.min_p > 0.f ? (top - max) * rp.inv_t - std::log(rp.min_p) : kInf;
  return draw(cd, ce, ci, n, std::min(d_m, d_p), u);
}

template <typename T>
Draw sample_row(const T* src, int64_t V, const PenaltySource& penalties, int64_t row, const RowParams& rp, float u,
                Scratch& s) {
  const bool need_k = rp.k > 0 && rp.k < V, need_p = rp.p < 1.f, need_m = rp.min_p > 0.f;
  const bool top_p_only = need_p && !need_k && rp.inv_t != kInf;
  if (top_p_only && !penalties.any()) {  // no scratch row
    // min-p's threshold is relative to the row's max: with it, distances from the max itself, as the
    // reference takes them (a token at the threshold stays on the same side)
    return top_p_row(src, V, need_m ? row_max(src, V) : sample_max(src, V), rp, u, s);
  }
  float* x = s.x.get();
  float* e = s.e.get();
  float top = load_row(src, V, x);
  if (std::isnan(top) || top == kInf) return {kNanRow, 0.f};
  if (penalties.apply(src, V, row, rp, x)) top = row_max(x, V);
  if (top == -kInf) return {kEmptyRow, 0.f};
  if (rp.inv_t == kInf) return {first_index_of(x, V, top), 0.f};
  if (top_p_only) return top_p_row(static_cast<const float*>(x), V, top, rp, u, s);

  const int64_t n_pad = round_up(V);
  const float d_m = need_m ? -std::log(rp.min_p) : kInf;
  float cut = kInf;  // cut: every threshold is <= it
  bool have_e = false;  // exp(-d) of the whole row is in e
  float *cd = x, *ce = e;
  int32_t* ci = nullptr;
  int64_t n = V;
  // Without top-p, min-p alone bounds the kept set: D = min(D_k, D_m); with it,
  // top-p needs the whole mass top-k keeps.
  if (!need_p) cut = d_m;
  if (need_k) {
    const Levels lv = distances<true, false>(x, e, n_pad, top, rp.inv_t);
    for (int l = 0; l < kLevels; ++l) {
      if (lv.count[l] >= static_cast<float>(rp.k)) {
        cut = std::min(cut, kLevel[l]);
        break;
      }
    }
  } else if (!need_m) {  // no filter: the draw needs every exp(-d)
    distances<false, true>(x, e, n_pad, top, rp.inv_t);
    have_e = true;
  } else {
    distances<false, false>(x, e, n_pad, top, rp.inv_t);
  }
  if (cut < kInf) {
    cd = s.cd.get();
    ce = s.ce.get();
    ci = s.ci.get();
    n = dense(x, n_pad, cut) ? compact<true>(x, have_e ? e : nullptr, n_pad, cut, cd, ce, ci)
                              : compact<false>(x, have_e ? e : nullptr, n_pad, cut, cd, ce, ci);
  }
  candidate_mass(cd, ce, n, have_e);
  const int64_t nc_pad = round_up(n);

  float t = d_m;
  float d_k = kInf;
  if (need_k && n >= rp.k) d_k = select<false>(cd, ce, n, cut, static_cast<float>(rp.k), static_cast<float>(n), s);
  // else: fewer than k candidates below the min-p cut, so top-k does not bind.
  t = std::min(t, d_k);
  if (need_p) {  // top-p is relative to the mass top-k keeps
    const float z_k = mass_le(cd, ce, nc_pad, d_k);
    const float d_p = select<true>(cd, ce, n, std::min(cut, d_k), rp.p * z_k, z_k, s);
    t = std::min(t, d_p);
  }
  return draw(cd, ce, ci, n, t, u);
}

std::tuple<Tensor, Tensor> sample_tokens(const Tensor& logits, const OptTensor& params, const OptTensor& prev_tokens,
                                         const OptTensor& token_counts, double inv_temperature, int64_t top_k, double top_p, double min_p,
                                         double repetition_penalty, double presence_penalty, double frequency_penalty,
                                         int64_t seed, const OptTensor& seed_tensor, int64_t offset,
                                         bool return_logprobs) {
  const int64_t B = logits.size(0), V = logits.size(1);
  Tensor tokens = at::empty({B}, logits.options().dtype(at::kLong));
  Tensor logprobs = at::empty({return_logprobs ? B : 0}, logits.options().dtype(at::kFloat));
  if (B == 0) return {tokens, logprobs};

  std::vector<float> u(round_up(B) + kBlock);
  const PhiloxKey key(resolve_seed(seed, seed_tensor));
  for (int64_t b = 0; b < B; b += kBlock) {
    stream_uniforms(key, static_cast<uint64_t>(offset + b), static_cast<int>(std::min<int64_t>(kBlock, B - b)), u.data() + b);
  }
  const float* prm = params.has_value() ? params->data_ptr<float>() : nullptr;
  PenaltySource penalties;
  if (prev_tokens.has_value()) {
    penalties.prev = prev_tokens->data_ptr<int64_t>();
    penalties.n_prev = prev_tokens->size(1);
  } else if (token_counts.has_value()) {
    if (token_counts->scalar_type() == at::kLong) {
      penalties.counts64 = token_counts->data_ptr<int64_t>();
    } else {
      penalties.counts32 = token_counts->data_ptr<int32_t>();
    }
  }
  const RowParams scalar{static_cast<float>(inv_temperature), top_k, static_cast<float>(top_p),
                         static_cast<float>(min_p), static_cast<float>(repetition_penalty),
                         static_cast<float>(presence_penalty), static_cast<float>(frequency_penalty)};
  int64_t* tok = tokens.data_ptr<int64_t>();
  float* lp = return_logprobs ? logprobs.data_ptr<float>() : nullptr;

  dispatch_float(logits.scalar_type(), "sample_tokens", [&](auto tag) {
    using T = decltype(tag);
    const T* src = logits.data_ptr<T>();
    at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
      Scratch& s = thread_scratch();
      s.reserve(round_up(V) + kLanes);
      for (int64_t r = begin; r < end; ++r) {
        RowParams rp = scalar;
        if (prm != nullptr) {
          const float* q = prm + r * 7;
          rp = RowParams{q[0], static_cast<int64_t>(q[1]), q[2], q[3], q[4], q[5], q[6]};
        }
        const Draw d = sample_row(src + r * V, V, penalties, r, rp, u[r], s);
        tok[r] = d.token;
        if (lp != nullptr) lp[r] = d.logprob;
      }
    });
  });
  return {tokens, logprobs};
}

// ---- FlashInfer's renorm and mask ops -----------------------------------------
// Per row: a threshold t that is one of the row's values, then one pass that
// keeps the values >= t (ties kept). t comes from the candidates only, as in
// sample_tokens, by the same selection (on d = -x, so that the largest values
// come first). top-k: one vectorized pass counts the values at or above a few
// cut-offs below the row's max and the first that holds k picks the
// candidates (a few hundred of 128k logits for k = 50). top-p: the cut is
// guessed from a sample and checked, as top_p_row's (8 x 128256 fp32
// probabilities, top_p 0.9, 2 threads on a 2-core AMD EPYC: 0.81-1.12 ms with
// a counting pass, a radix select and the sums over the whole row; 0.42-0.43
// ms this way).

enum class Filter { kTopKRenorm, kTopPRenorm, kTopKMask };

// The sum of x[0, n) >= t: lanes over blocks of 1024, the blocks added in fp64,
// about as accurate as PyTorch's cascaded sum (a running fp32 sum of a 128k row is not).
float mass_ge(const float* x, int64_t n, float t) {
  double sum = 0.0;
  const Vec vt(t);
  for (int64_t b = 0; b < n; b += 1024) {
    Vec acc(0.f);
    vec_steps(static_cast<int>(std::min<int64_t>(1024, n - b)), [&](int j, int m) {
      const Vec v = Vec::loadu(x + b + j, m);  // the lanes past m load as 0
      acc = acc + (v & (v >= vt));
    });
    sum += lane_sum(acc);
  }
  return static_cast<float>(sum);
}

// Candidate cut-offs: the logits within kLevel[l] nats of the max, or the
// probabilities within a factor e^kLevel[l] of it. One pass over the padded
// row (NaN padding is never >= a cut-off) counts the values >= each.
struct Cuts {
  float at[kLevels], count[kLevels];
};

Cuts cut_stats(const float* x, int64_t n_pad, float top, bool probs) {
  Cuts c;
  Vec cnt[kLevels], vcut[kLevels];
  for (int l = 0; l < kLevels; ++l) {
    c.at[l] = probs ? top * std::exp(-kLevel[l]) : top - kLevel[l];
    vcut[l] = Vec(c.at[l]);
    cnt[l] = Vec(0.f);
  }
  for (int64_t j = 0; j < n_pad; j += kLanes) {
    const Vec v = Vec::loadu(x + j);
    for (int l = 0; l < kLevels; ++l) cnt[l] = cnt[l] + ones_where(v >= vcut[l]);
  }
  for (int l = 0; l < kLevels; ++l) c.count[l] = lane_sum(cnt[l]);
  return c;
}

// The values >= cut as d = -x (select's order: the largest first), in any
// order; returns their number. kDense: as compact's.
template <bool kDense>
int64_t compact_ge(const float* x, int64_t n_pad, float cut, float* out) {
  int64_t n = 0;
#if defined(CPU_CAPABILITY_AVX512)
  const __m512 vcut = _mm512_set1_ps(cut);
  for (int64_t j = 0; j < n_pad; j += 16) {
    const __m512 v = _mm512_loadu_ps(x + j);
    const __mmask16 m = _mm512_cmp_ps_mask(v, vcut, _CMP_GE_OQ);
    if (!kDense && m == 0) continue;
    _mm512_storeu_ps(out + n, _mm512_maskz_compress_ps(m, _mm512_sub_ps(_mm512_setzero_ps(), v)));
    n += __builtin_popcount(m);
  }
#else
  for (int64_t j = 0; j < n_pad; ++j) {
    if (x[j] >= cut) out[n++] = -x[j];
  }
#endif
  return n;
}

// top_p_renorm_probs, one row, read from the probabilities themselves as
// top_p_row reads logits (no scratch row): the candidates x >= C for a cut C
// guessed from a sample (the mass below each of a few levels under the max is
// spread over many small values, which the sample estimates well), compacted
// in the pass that sums the row, and checked; the threshold t by select on
// d = -x with mass x (so F(d) is the mass of the values >= -d); the kept mass
// from the candidates; then one pass writes the output.
template <typename T>
void top_p_renorm_row(const T* src, T* dst, int64_t V, float p, Scratch& s) {
  float *cd = s.cd.get(), *ce = s.ce.get();
  // The first level whose estimated mass below it leaves p above (no candidates when top_p is 1).
  auto guess_cut = [&] {
    const float top = sample_max(src, V);
    const int64_t step = sample_step(V);
    float tail[kCutLevels], cut_at[kCutLevels];
    Vec acc_tail[kCutLevels];
    int64_t sampled = 0;
    for (int l = 0; l < kCutLevels; ++l) cut_at[l] = top * std::exp(-kCutLevel[l]), acc_tail[l] = Vec(0.f);
    for (int64_t j = 0; j < V; j += step) {  // ~1/16 of the row, 16 values at a time
      const int m = static_cast<int>(std::min<int64_t>(kLanes, V - j));
      const Vec x = load_float(src + j, m);  // 0 past m
      for (int l = 0; l < kCutLevels; ++l) acc_tail[l] = acc_tail[l] + (x & (x < Vec(cut_at[l])));
      sampled += m;
    }
    for (int l = 0; l < kCutLevels; ++l) tail[l] = lane_sum(acc_tail[l]);
    const float scale = static_cast<float>(V) / static_cast<float>(sampled);
    int l = 0;
    while (l + 1 < kCutLevels && tail[l] * scale > kTailShare * (top + tail[0] * scale - p)) ++l;
    return cut_at[l];
  };
  double z_all = 0.0;
  float z_cand = 0.f;
  // The row's mass (lanes over blocks of 1024 added in fp64, as mass_ge) and the values >= cut as
  // (d = -x, x); returns their number.
  auto candidates = [&](float cut) {
    int64_t n = 0;
    z_all = 0.0;
    z_cand = 0.f;
    Vec acc_c(0.f);
    for (int64_t b = 0; b < V; b += 1024) {
      Vec acc(0.f);
      vec_steps(static_cast<int>(std::min<int64_t>(1024, V - b)), [&](int j, int m) {
        const Vec x = load_float(src + b + j, m);  // 0 past m
        acc = acc + x;
#if defined(CPU_CAPABILITY_AVX512)
        const __mmask16 k = _mm512_mask_cmp_ps_mask((1u << m) - 1, x, _mm512_set1_ps(cut), _CMP_GE_OQ);
        acc_c = _mm512_mask_add_ps(acc_c, k, acc_c, x);
        _mm512_storeu_ps(cd + n, _mm512_maskz_compress_ps(k, _mm512_sub_ps(_mm512_setzero_ps(), x)));
        _mm512_storeu_ps(ce + n, _mm512_maskz_compress_ps(k, x));
        n += __builtin_popcount(k);
#else
        alignas(64) float xl[kLanes];
        x.store(xl);
        for (int i = 0; i < m; ++i) {
          if (xl[i] >= cut) cd[n] = -xl[i], ce[n++] = xl[i], z_cand += xl[i];
        }
#endif
      });
      z_all += lane_sum(acc);
    }
    z_cand += lane_sum(acc_c);  // one of the two is 0
    return n;
  };
  float cut = p < 1.f ? guess_cut() : kInf, t = -kInf;
  int64_t n = candidates(cut);
  // top_p is absolute, as FlashInfer's: if the whole row holds less mass, keep it all
  if (p < 1.f && z_all >= p) {
    if (!(z_cand * (1.f - 1e-5f) >= p)) {  // a margin for the lanes' rounding
      // Values below (z - p) / (2 V) hold under (z - p) / 2 of the mass: the rest holds more than p.
      cut = static_cast<float>(z_all - p) / (2.f * static_cast<float>(V));
      n = candidates(cut);
    }
    t = -select<true>(cd, ce, n, -cut, p, z_cand, s);
  }
  const float kept = t == -kInf ? static_cast<float>(z_all) : mass_ge(ce, n, t);
  const Vec vt(t), inv(1.f / std::max(kept, 1e-8f));  // FlashInfer's guard against an all-zero row
  vec_steps(static_cast<int>(V), [&](int j, int m) {
    const Vec v = load_float(src + j, m);
    store_float(dst + j, (v & (v >= vt)) * inv, m);
  });
}

// top_k_renorm_probs and top_k_mask_logits, one row: the candidates at or above
// the first level that holds k values, and the k-th largest (ties kept) by select.
template <Filter kFilter, typename T>
void filter_row(const T* src, T* dst, int64_t V, double param, Scratch& s) {
  float* x = s.x.get();
  const float top = load_row(src, V, x);  // NaN-padded to a vector multiple
  const int64_t n_pad = round_up(V);
  float t = -kInf;  // no filter: keep every value
  if (param > 0 && param < V) {
    const Cuts c = cut_stats(x, n_pad, top, kFilter == Filter::kTopKRenorm);
    float cut = -kInf;  // the candidates: the values >= cut
    for (int l = 0; l < kLevels; ++l) {
      if (c.count[l] >= static_cast<float>(param)) {
        cut = c.at[l];
        break;
      }
    }
    const int64_t n = dense<true>(x, n_pad, cut) ? compact_ge<true>(x, n_pad, cut, s.cd.get())
                                              : compact_ge<false>(x, n_pad, cut, s.cd.get());
    t = -select<false>(s.cd.get(), s.ce.get(), n, -cut, static_cast<float>(param), static_cast<float>(n), s);
  }
  const Vec vt(t);
  if constexpr (kFilter == Filter::kTopKMask) {
    // the kept logits are x = float(src) exactly, so they round-trip to T
    vec_steps(static_cast<int>(V), [&](int j, int m) {
      const Vec v = Vec::loadu(x + j);
      store_float(dst + j, Vec::blendv(Vec(-kInf), v, v >= vt), m);
    });
  } else {
    const Vec inv(1.f / std::max(mass_ge(x, V, t), 1e-8f));  // FlashInfer's guard against an all-zero row
    vec_steps(static_cast<int>(V), [&](int j, int m) {
      const Vec v = Vec::loadu(x + j, m);
      store_float(dst + j, (v & (v >= vt)) * inv, m);
    });
  }
}

// params: a per-row tensor (int64 top_k or fp32 top_p) or the scalar for every row.
template <Filter kFilter>
Tensor filter_rows(const Tensor& x, const OptTensor& per_row, double scalar) {
  const int64_t B = x.size(0), V = x.size(1);
  Tensor out = empty_output(x);
  dispatch_float(x.scalar_type(), "filter_rows", [&](auto tag) {
    using T = decltype(tag);
    const T* src = x.data_ptr<T>();
    T* dst = out.data_ptr<T>();
    at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
      Scratch& s = thread_scratch();
      s.reserve(round_up(V) + kLanes);
      for (int64_t r = begin; r < end; ++r) {
        double param = scalar;
        if (per_row.has_value()) {
          param = kFilter == Filter::kTopPRenorm ? per_row->data_ptr<float>()[r]
                                                 : static_cast<double>(per_row->data_ptr<int64_t>()[r]);
        }
        if constexpr (kFilter == Filter::kTopPRenorm) {
          top_p_renorm_row(src + r * V, dst + r * V, V, static_cast<float>(param), s);
        } else {
          filter_row<kFilter>(src + r * V, dst + r * V, V, param, s);
        }
      }
    });
  });
  return out;
}

Tensor top_k_renorm_probs(const Tensor& probs, const OptTensor& top_k_arr, int64_t top_k) {
  return filter_rows<Filter::kTopKRenorm>(probs, top_k_arr, static_cast<double>(top_k));
}

Tensor top_p_renorm_probs(const Tensor& probs, const OptTensor& top_p_arr, double top_p) {
  return filter_rows<Filter::kTopPRenorm>(probs, top_p_arr, top_p);
}

Tensor top_k_mask_logits(const Tensor& logits, const OptTensor& top_k_arr, int64_t top_k) {
  return filter_rows<Filter::kTopKMask>(logits, top_k_arr, static_cast<double>(top_k));
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(genfast_cpu, m) {
  m.def("sample_tokens", &sample_tokens);
  m.def("top_k_renorm_probs", &top_k_renorm_probs);
  m.def("top_p_renorm_probs", &top_p_renorm_probs);
  m.def("top_k_mask_logits", &top_k_mask_logits);
}

}  // namespace genfast::cpu
