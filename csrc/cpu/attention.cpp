// Attention on the CPU: over a KV cache (decode, chunked prefill; contiguous,
// paged or packed keys) with in-place append, and packed prefill attention.
//
// Prefill at headdims 8-56 has a kernel of its own (queries in the vector
// lanes; "prefill with small headdims" below). Otherwise one core serves
// every op. A work item is (batch row, KV heads, query chunk,
// KV split). Decode-sized items take all KV heads of their row. Per block of
// kBlockN positions and per KV head, the head's K and V rows are widened to
// fp32 into two L1-resident buffers (each row prefetched kPrefetchHeads heads
// ahead: in flash-attn's layout one head's rows are a stride apart that the
// hardware prefetchers do not follow; widening all heads of a block at once instead
// spilled to L2 and was 12-20% slower). Then the query rows of the head's GQA
// group (G heads x up to QL positions) run against it: dot products with two query
// rows held in registers, masks/softcap/ALiBi, an online softmax in fp32, and
// P.V accumulated in registers over tiles of 4 rows x 4 vectors. So each K/V
// row is read from memory once for the whole group. fp8 rows are widened
// through fp16 bits (value * 2^-8, exact); the per-head scales and the 2^8 go
// into the score scale and the output scale. Splits (flash-decoding) only when
// batch x heads leaves threads idle; their partial (max, sum, acc) are merged
// in a second pass.
//
// Decode (at most kDirectRows query rows per KV head, AVX-512) skips the buffers: each
// K and V row is converted in registers where it is used, every (row, key)
// product vector is kept and a row's 16 keys are summed by one transposing
// tree (sum16) instead of 16 horizontal sums, and the rows kPrefetchHeads heads on are
// prefetched key by key inside those loops. Issued in one burst per block (64
// lines), the prefetches had filled the core's line-fill buffers and stalled
// it: ~18% of the fp8 kernel's samples sat on them. Measured (2-core AVX-512
// Xeon, Llama-3-8B heads, batch 8, bf16 queries, 1 thread at 4k / 2 threads):
// bf16 cache 16.1 -> 9.9 ms at 4k (1 thread), 6.8 -> 5.1-5.3 ms at 4k and
// 33.7 -> 27.7 ms at 16k; fp8 cache 9.65 -> 8.1 ms, 5.05 -> 4.4-4.7 ms and
// 22.8 -> 19.6-20.5 ms. Both are now compute-bound at 4k (in L3): about 30 ns
// per key and KV head per core, half of it the 64 FMAs of q.k and p.v. With bf16
// queries over a bf16 or fp8 cache, CPUs with AVX512_BF16 take q.k with vdpbf16ps
// instead (scores_dot: half the instructions, no widening of bf16 keys), and over
// an fp8 cache P.V too (pv_dot: the value rows widened to bf16 by byte tables, the
// probabilities rounded to bf16; 2-core AMD EPYC, batch 8 x 4k, 1 thread: 11.0 ->
// 7.3 ms). For a bf16 cache the same was slower, and P.V stays on the FMAs.
// The online softmax keeps each row's sum of exponentials as a vector until the
// item ends (no horizontal sum per block) and calls exp for the rescale only when
// the row's max rose; scores_dot takes keys in pairs (each query vector loaded
// once for two keys, two chains per row). Together, batch 8 x 4k on 2 threads:
// fp8 cache 3.9-4.0 -> 3.3-3.5 ms, bf16 cache 5.2-5.5 -> 4.7-5.0 ms (AMD EPYC). pv_dot's
// accumulators then stayed in its unpacks' lane order for the whole item (no
// permutes per block): 1 thread, fp8, 6.9-7.6 -> 6.5-6.7 ms. Keys in fours for fp8 scores and value
// bytes interleaved before their widening: 2 threads, fp8, 3.3-4.1 -> 2.9-3.0 ms (noisy hour).
//
// Bytes per decode step: the K and V rows of every valid position once,
// 2 * L * nheads_k * headdim * sizeof(cache) per batch row; q and out are
// G times smaller per position than one K row and are ignored.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/_scaled_dot_product_flash_attention_for_cpu.h>
#include <ATen/ops/index_select.h>
#include <c10/util/Float8_e4m3fn.h>
#include <torch/library.h>

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <vector>

#include "common.h"
#include "ops.h"

namespace genfast::cpu {
namespace {

constexpr int kBlockN = 16;  // keys per block: the widened K/V block of all heads stays in L2, the scores in L1
constexpr int kMaxRows = 64;  // query rows per item; a prefill chunk of 64 rows reuses each K block 64x
constexpr int kDirectRows = 8;  // items of at most this many query rows per KV head skip the widened buffers
// K/V rows are prefetched this many heads ahead, into L2 (prefetcht1). Into L1 (prefetcht0), one
// head ahead, a 2-core AMD EPYC (Zen 4, 1 MB L2) read a bf16 cache at half its bandwidth: decode
// at batch 8 x 4k, Llama-3-8B heads, 9.0 -> 6.3 ms on 2 threads (fp32 cache 15-17 -> 9.8 ms; 1
// thread 17-18.5 -> 10.6-10.9 ms); one head ahead into L2 gave most of it (11.0-12.7 ms on 1 thread).
constexpr int kPrefetchHeads = 2;
inline void prefetch_row(const void* p, int bytes) {
  for (int c = 0; c < bytes; c += 64) __builtin_prefetch(static_cast<const char*>(p) + c, 0, 2);
}
constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr float kFp8Max = 448.f;

// Where row (b, pos) of one KV head lives, in elements from the head's base.
struct KvRows {
  int mode;  // 0: contiguous (b * s0 + pos * s1), 1: paged, 2: packed ((cu[b] + pos) * s1)
  int64_t s0, s1, s2;
  const int* block_table;
  int blocks_per_seq, page_size;
  const int* cu;
  inline int64_t offset(int b, int64_t pos) const {
    if (mode == 1) {
      return block_table[(int64_t)b * blocks_per_seq + pos / page_size] * s0 + (pos % page_size) * s1;
    }
    if (mode == 2) return (cu[b] + pos) * s1;
    return b * s0 + pos * s1;
  }
};

struct Problem {
  int B, H, HK, G, D;
  int max_sq;            // query positions per row (padded), or the longest packed sequence
  const int* cu_q;       // packed queries: row b's positions start at cu_q[b]; null: padded (B, max_sq)
  int total_q;           // packed: rows of q
  const void* q;         // (..., H, D), headdim contiguous: element (b, i, h, 0) at q_index(b, i, h)
  int64_t q_sb, q_si, q_sh;  // q's strides: batch (padded only), position, head
  void* out;             // contiguous, q's shape
  float* lse;            // padded: (B, H, max_sq); packed: (H, total_q)
  const void* k;         // cache base pointers
  const void* v;
  KvRows rows;
  const int* seqlens;    // per-row tokens before the append (may be null)
  int64_t seqlen_offset; // added to seqlens (the only length when seqlens is null)
  int seqlen_new;        // appended this call
  int fixed_kv_len;      // >= 0: every row has this many keys (padded prefill)
  float scale, softcap;
  bool causal;
  int window_left, window_right;
  const float* alibi;    // (H,) or (B, H), null when off
  int64_t alibi_bstride;
  const float* k_scale;  // (HK,) fp8 dequantization, null otherwise
  const float* v_scale;

  inline int kv_len(int b) const {
    if (fixed_kv_len >= 0) return fixed_kv_len;
    if (rows.mode == 2) return rows.cu[b + 1] - rows.cu[b];
    return (int)((seqlens ? seqlens[b] : 0) + seqlen_offset + seqlen_new);
  }
  inline int q_len(int b) const { return cu_q ? cu_q[b + 1] - cu_q[b] : max_sq; }
  inline int64_t q_row(int b, int i) const { return cu_q ? (int64_t)cu_q[b] + i : (int64_t)b * max_sq + i; }
  inline int64_t q_index(int b, int i, int h) const {
    return (cu_q ? ((int64_t)cu_q[b] + i) * q_si : (int64_t)b * q_sb + (int64_t)i * q_si) + (int64_t)h * q_sh;
  }
  inline int64_t lse_index(int b, int h, int i) const {
    return cu_q ? (int64_t)h * total_q + cu_q[b] + i : ((int64_t)b * H + h) * max_sq + i;
  }
};

inline float hmax(const Vec& v) {
#if defined(CPU_CAPABILITY_AVX512)
  return _mm512_reduce_max_ps(v);
#else
  alignas(64) float lanes[Vec::size()];
  v.store(lanes);
  float s = lanes[0];
  for (int i = 1; i < Vec::size(); ++i) s = std::max(s, lanes[i]);
  return s;
#endif
}

// Vec::size() float8_e4m3fn values as fp32, exactly. Exponent and mantissa
// bits move into an fp32 with the bias changed from 7 to 127; e4m3 subnormals
// (exponent 0) get exponent -6 and lose the implicit one by a subtraction, so
// no fp32 denormal ever appears (a denormal operand costs a microcode assist
// of ~100 cycles). NaN is never stored: appends saturate.
inline Vec load_fp8(const uint8_t* p) {
#if defined(CPU_CAPABILITY_AVX512)
  const __m512i x = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  const __mmask16 sub = _mm512_cmpeq_epi32_mask(_mm512_and_si512(x, _mm512_set1_epi32(0x78)), _mm512_setzero_si512());
  __m512i bits = _mm512_add_epi32(_mm512_slli_epi32(_mm512_and_si512(x, _mm512_set1_epi32(0x7f)), 20),
                                  _mm512_set1_epi32(120 << 23));
  bits = _mm512_mask_add_epi32(bits, sub, bits, _mm512_set1_epi32(1 << 23));
  __m512 f = _mm512_castsi512_ps(bits);
  f = _mm512_mask_sub_ps(f, sub, f, _mm512_set1_ps(0x1p-6f));
  const __m512i sign = _mm512_slli_epi32(_mm512_and_si512(x, _mm512_set1_epi32(0x80)), 24);
  return Vec(_mm512_castsi512_ps(_mm512_or_si512(_mm512_castps_si512(f), sign)));
#elif defined(CPU_CAPABILITY_AVX2)
  const __m256i x = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
  const __m256i sub = _mm256_cmpeq_epi32(_mm256_and_si256(x, _mm256_set1_epi32(0x78)), _mm256_setzero_si256());
  __m256i bits = _mm256_add_epi32(_mm256_slli_epi32(_mm256_and_si256(x, _mm256_set1_epi32(0x7f)), 20),
                                  _mm256_set1_epi32(120 << 23));
  bits = _mm256_add_epi32(bits, _mm256_and_si256(sub, _mm256_set1_epi32(1 << 23)));
  __m256 f = _mm256_castsi256_ps(bits);
  f = _mm256_sub_ps(f, _mm256_and_ps(_mm256_castsi256_ps(sub), _mm256_set1_ps(0x1p-6f)));
  const __m256i sign = _mm256_slli_epi32(_mm256_and_si256(x, _mm256_set1_epi32(0x80)), 24);
  return Vec(_mm256_castsi256_ps(_mm256_or_si256(_mm256_castps_si256(f), sign)));
#else
  alignas(64) float f[Vec::size()];
  for (int i = 0; i < Vec::size(); ++i) {
    f[i] = static_cast<float>(c10::Float8_e4m3fn(p[i], c10::Float8_e4m3fn::from_bits()));
  }
  return Vec::loadu(f);
#endif
}

// fp8 rows are widened to value * 2^-8: e4m3's bits shifted into an fp16 (the same layout with one
// more exponent bit, bias 15 instead of 7) are exactly value * 2^-8 with subnormals included, and
// the hardware converts fp16 to fp32. The 2^8 goes into the score scale and the output scale.
constexpr float kFp8Unscale = 256.f;

// Element t of a row in scores_dot's order for fp8 keys (within its 64) is cache element dot_order(t).
inline int dot_order(int t) {
  const int half = t / 32, u = t % 32;
  return (u / 8) * 16 + half * 8 + u % 8;
}

#if defined(CPU_CAPABILITY_AVX512)
// e4m3 bits b as fp16 bits: b << 8 puts the sign at bit 15 and exponent and mantissa at 14..8; an
// arithmetic shift right by one moves them to 13..7, fp16's places, and copies the sign into bit
// 14, which the mask clears. 3 integer ops per 32 values, then the hardware's fp16 -> fp32.
inline __m512i fp8_to_fp16_bits(__m512i b16) {
  return _mm512_and_si512(_mm512_srai_epi16(_mm512_slli_epi16(b16, 8), 1), _mm512_set1_epi16((short)0xBFFF));
}

// 32 e4m3 values as two fp32 vectors (times 2^-8).
inline void fp8x32(const uint8_t* p, __m512& lo, __m512& hi) {
  const __m512i h = fp8_to_fp16_bits(_mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))));
  lo = _mm512_cvtph_ps(_mm512_castsi512_si256(h));
  hi = _mm512_cvtph_ps(_mm512_extracti64x4_epi64(h, 1));
}

// 16 e4m3 values as one fp32 vector (times 2^-8).
inline __m512 fp8x16(const uint8_t* p) {
  const __m256i b = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm512_cvtph_ps(_mm512_castsi512_si256(fp8_to_fp16_bits(_mm512_castsi256_si512(b))));
}

inline void widen_fp8_32(const uint8_t* p, float* dst) {
  __m512 lo, hi;
  fp8x32(p, lo, hi);
  _mm512_storeu_ps(dst, lo);
  _mm512_storeu_ps(dst + 16, hi);
}

// 16 / 32 cache elements at p as fp32 vectors (fp8: times 2^-8).
template <typename TC>
inline __m512 vec16(const TC* p) {
  if constexpr (std::is_same_v<TC, c10::Float8_e4m3fn>) {
    return fp8x16(reinterpret_cast<const uint8_t*>(p));
  } else if constexpr (std::is_same_v<TC, c10::BFloat16>) {
    const __m512i b = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    return _mm512_castsi512_ps(_mm512_slli_epi32(b, 16));
  } else if constexpr (std::is_same_v<TC, c10::Half>) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  } else {
    return _mm512_loadu_ps(p);
  }
}

template <typename TC>
inline void vec32(const TC* p, __m512& lo, __m512& hi) {
  if constexpr (std::is_same_v<TC, c10::Float8_e4m3fn>) {
    fp8x32(reinterpret_cast<const uint8_t*>(p), lo, hi);
  } else {
    lo = vec16(p);
    hi = vec16(p + 16);
  }
}

// A row of D cache elements as D / 16 fp32 vectors, in registers.
template <typename TC, int D>
inline void row_vectors(const TC* p, __m512* k) {
  constexpr int NV = D / 16;
  for (int c = 0; c + 2 <= NV; c += 2) vec32(p + c * 16, k[c], k[c + 1]);
  if constexpr (NV % 2) k[NV - 1] = vec16(p + (NV - 1) * 16);
}

// scores() for keys converted in registers where they are used, not through a widened buffer:
// each key row is converted once and meets every query row (read from L1); each (row, key)
// product vector is kept, and a row's 16 are summed at once (sum16), not one horizontal sum
// each. Key j's row of the next head (next[j]) is prefetched as key j is used: spread over the
// block, not in a burst that fills the core's line-fill buffers.
template <typename TC, int D>
inline void scores_direct(const float* q, int nrow, const TC* const* kp, const TC* const* next, int n, float* s,
                          __m512* part) {
  constexpr int NV = D / 16;
  for (int j = 0; j < n; ++j) {
    prefetch_row(next[j], D * sizeof(TC));
    __m512 k[NV];
    row_vectors<TC, D>(kp[j], k);
    for (int r = 0; r < nrow; ++r) {
      const float* qr = q + r * D;
      __m512 a0 = _mm512_mul_ps(k[0], _mm512_loadu_ps(qr)), a1 = _mm512_setzero_ps();
      for (int c = 1; c < NV; ++c) {
        if (c % 2) a1 = _mm512_fmadd_ps(k[c], _mm512_loadu_ps(qr + c * 16), a1);
        else a0 = _mm512_fmadd_ps(k[c], _mm512_loadu_ps(qr + c * 16), a0);
      }
      part[r * kBlockN + j] = _mm512_add_ps(a0, a1);
    }
  }
  for (int r = 0; r < nrow; ++r) {  // zeros for a block's tail keys (j >= n), which the masks overwrite
    for (int j = n; j < kBlockN; ++j) part[r * kBlockN + j] = _mm512_setzero_ps();
    _mm512_storeu_ps(s + r * kBlockN, sum16(part + r * kBlockN));
  }
}

// scores_direct() for bf16 query rows against a bf16 or fp8 cache, on CPUs with AVX512_BF16:
// vdpbf16ps multiplies 32 bf16 pairs into 16 fp32 sums, so a row's dot products take half the
// instructions, and bf16 key rows are used as loaded. fp8 rows become bf16 (exactly: e4m3 fits
// bf16) by two 128-entry byte tables (vpermt2b: the low and the high byte of each magnitude's
// bf16), the sign or-ed in and the bytes interleaved: 5 ops per 64 values, where widening them
// to fp32 takes 14. The interleave orders each 64 values as [0-7, 16-23, 32-39, 48-55 | 8-15,
// 24-31, 40-47, 56-63]; run_item stores the query rows in that order (dot_order), so the products
// pair up. The bf16 products are exact; the query rows are the caller's unscaled bits and the
// scale multiplies the summed scores. On a 2-core AMD EPYC (Zen 4), where vdpbf16ps issues at
// the FMA's rate, decode at batch 8, Llama-3-8B heads, bf16 queries and cache: 4k context
// 11.2-12.1 -> 8.8-9.5 ms on 1 thread, 6.2-6.6 -> 4.9-5.5 ms on 2; 16k 22.3-24.7 -> 19.0-20.6 ms.
// (On a Xeon the same instruction ran at the FMA's rate in multiply-adds, not in instructions,
// and gained nothing: RESULTS.md.)
struct Fp8Bf16Tables {
  alignas(64) uint8_t lo[128], hi[128];
  Fp8Bf16Tables() {
    for (int m = 0; m < 128; ++m) {
      const float f = static_cast<float>(c10::Float8_e4m3fn(static_cast<uint8_t>(m), c10::Float8_e4m3fn::from_bits()));
      uint32_t bits;
      std::memcpy(&bits, &f, 4);
      const uint16_t b = static_cast<uint16_t>(bits >> 16);  // exact: an e4m3 value has 4 significant bits
      lo[m] = static_cast<uint8_t>(b & 0xff);
      hi[m] = static_cast<uint8_t>(b >> 8);
    }
  }
};

const Fp8Bf16Tables& fp8_bf16_tables() {
  static const Fp8Bf16Tables t;
  return t;
}

// 64 e4m3 bytes x as bf16 (exact): the low and the high byte of each value's bf16 looked up by its
// magnitude (x's bits 0-6) in tab (lo[0:64], lo[64:128], hi[0:64], hi[64:128]), the sign or-ed into
// the high byte, and the bytes interleaved: lo takes bytes 0-7 of each 128-bit lane, hi bytes 8-15.
__attribute__((target("avx512bf16,avx512vbmi"))) inline void fp8_to_bf16(__m512i x, const __m512i* tab, __m512bh& lo,
                                                                        __m512bh& hi) {
  const __m512i l = _mm512_permutex2var_epi8(tab[0], x, tab[1]);
  const __m512i h = _mm512_ternarylogic_epi32(_mm512_permutex2var_epi8(tab[2], x, tab[3]), x,
                                              _mm512_set1_epi8((char)0x80), 0xF8);  // h | (x & 0x80)
  lo = (__m512bh)_mm512_unpacklo_epi8(l, h);
  hi = (__m512bh)_mm512_unpackhi_epi8(l, h);
}

// The key row's D values as D / 32 vectors of bf16 pairs, in the dot order for fp8; tab: the fp8
// tables, loaded once by the caller.
template <typename TC, int D>
__attribute__((target("avx512bf16,avx512vbmi"))) inline void dot_row(const TC* p, const __m512i* tab, __m512bh* k) {
  if constexpr (std::is_same_v<TC, c10::BFloat16>) {
    for (int c = 0; c < D / 32; ++c) k[c] = (__m512bh)_mm512_loadu_si512(p + c * 32);
  } else {
    for (int c = 0; c < D / 64; ++c)
      fp8_to_bf16(_mm512_loadu_si512(reinterpret_cast<const uint8_t*>(p) + c * 64), tab, k[2 * c], k[2 * c + 1]);
  }
}

// The product vectors of nrow bf16 query rows with K key rows (k: NV vectors of bf16 pairs each) into
// part[r * kBlockN + t]: per (row, key) C (1 or 2) independent vdpbf16ps chains, summed.
template <int NV, int K, int C>
__attribute__((target("avx512bf16"))) inline void dot_keys(const uint16_t* q, int nrow, const __m512bh (*k)[NV],
                                                         __m512* part) {
  static_assert(C == 1 || C == 2);
  for (int r = 0; r < nrow; ++r) {
    const uint16_t* qr = q + r * NV * 32;
    __m512 a[K][C];
    for (int t = 0; t < K; ++t)
      for (int i = 0; i < C; ++i) a[t][i] = _mm512_setzero_ps();
    for (int c = 0; c < NV; ++c) {
      const __m512bh qv = (__m512bh)_mm512_loadu_si512(qr + c * 32);
      for (int t = 0; t < K; ++t) a[t][c % C] = _mm512_dpbf16_ps(a[t][c % C], k[t][c], qv);
    }
    for (int t = 0; t < K; ++t) part[r * kBlockN + t] = C == 1 ? a[t][0] : _mm512_add_ps(a[t][0], a[t][C - 1]);
  }
}

template <typename TC, int D>
__attribute__((target("avx512bf16,avx512vbmi"))) void scores_dot(const uint16_t* q, int nrow, float scale,
                                                                 const TC* const* kp, const TC* const* next, int n,
                                                                 float* s, __m512* part) {
  __m512i tab[4];
  if constexpr (!std::is_same_v<TC, c10::BFloat16>) {
    const Fp8Bf16Tables& t = fp8_bf16_tables();
    for (int i = 0; i < 4; ++i) tab[i] = _mm512_load_si512((i < 2 ? t.lo : t.hi) + (i % 2) * 64);
  }
  constexpr int NV = D / 32;
  // Keys in pairs with two chains each (bf16), or in fours with one (fp8): each query vector is
  // loaded once for all of them. For fp8, fours took 1 thread from 6.1-6.5 to 5.7-6.0 ms (batch
  // 8 x 4k, AMD EPYC); for bf16 they were 2-8% slower.
  constexpr int K = std::is_same_v<TC, c10::BFloat16> ? 2 : 4;
  int j = 0;
  for (; j + K <= n; j += K) {
    __m512bh k[K][NV];
    for (int t = 0; t < K; ++t) {
      prefetch_row(next[j + t], D * sizeof(TC));
      dot_row<TC, D>(kp[j + t], tab, k[t]);
    }
    dot_keys<NV, K, K == 4 ? 1 : 2>(q, nrow, k, part + j);
  }
  for (; j < n; ++j) {
    prefetch_row(next[j], D * sizeof(TC));
    __m512bh k[1][NV];
    dot_row<TC, D>(kp[j], tab, k[0]);
    dot_keys<NV, 1, 2>(q, nrow, k, part + j);
  }
  const __m512 sc = _mm512_set1_ps(scale);
  for (int r = 0; r < nrow; ++r) {
    for (int j = n; j < kBlockN; ++j) part[r * kBlockN + j] = _mm512_setzero_ps();
    _mm512_storeu_ps(s + r * kBlockN, _mm512_mul_ps(sum16(part + r * kBlockN), sc));
  }
}

// GENFAST_CPU_NO_BF16_DOT=1 takes the FMA kernel instead (the tests check both on one CPU).
bool has_bf16_dot() {
  static const bool yes = __builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("avx512vbmi") &&
                          std::getenv("GENFAST_CPU_NO_BF16_DOT") == nullptr;
  return yes;
}

// accumulate_pv() for values converted in registers, for T <= 4 query rows: T rows x 4 vectors of
// headdim accumulate while the keys stream past, so each V vector is converted once. Key j's row
// of the next head (next[j], unless next is null) is prefetched as key j is first used.
template <typename TC, int D, int T>
inline void pv_direct(float* acc, const float* p, const TC* const* vp, const TC* const* next, int n) {
  constexpr int NV = D / 16, W = 4;
  for (int c0 = 0; c0 < NV; c0 += W) {
    __m512 a[T][W];
    for (int t = 0; t < T; ++t)
      for (int w = 0; w < W; ++w)
        if (c0 + w < NV) a[t][w] = _mm512_loadu_ps(acc + t * D + (c0 + w) * 16);
    for (int j = 0; j < n; ++j) {
      if (next != nullptr && c0 == 0) prefetch_row(next[j], D * sizeof(TC));
      __m512 v[W];
      for (int w = 0; w + 1 < W; w += 2) {
        if (c0 + w + 1 < NV) vec32(vp[j] + (c0 + w) * 16, v[w], v[w + 1]);
        else if (c0 + w < NV) v[w] = vec16(vp[j] + (c0 + w) * 16);
      }
      for (int t = 0; t < T; ++t) {
        const __m512 pj = _mm512_set1_ps(p[t * kBlockN + j]);
        for (int w = 0; w < W; ++w)
          if (c0 + w < NV) a[t][w] = _mm512_fmadd_ps(pj, v[w], a[t][w]);
      }
    }
    for (int t = 0; t < T; ++t)
      for (int w = 0; w < W; ++w)
        if (c0 + w < NV) _mm512_storeu_ps(acc + t * D + (c0 + w) * 16, a[t][w]);
  }
}

// pv_dot's accumulators hold each 64 dims of a row in the lane order of its unpacks: stored
// element e (vector u = e / 16, 128-bit lane l, element i) is dim 16 l + 4 u + i of the 64.
// run_item puts the rows in order once at the item's end (pv_dot_to_natural).
inline int pv_order(int e) {
  const int u = e / 16, l = (e / 4) % 4, i = e % 4;
  return 16 * l + 4 * u + i;
}

template <int D>
void pv_dot_to_natural(float* acc, int rows) {
  static const std::array<uint8_t, 64> order = [] {
    std::array<uint8_t, 64> o{};
    for (int e = 0; e < 64; ++e) o[e] = static_cast<uint8_t>(pv_order(e));
    return o;
  }();
  float tmp[64];
  for (int64_t c = 0; c < (int64_t)rows * D; c += 64) {
    std::copy(acc + c, acc + c + 64, tmp);
    for (int e = 0; e < 64; ++e) acc[c + order[e]] = tmp[e];
  }
}

// pv_direct() for an fp8 cache on CPUs with AVX512_BF16 (the decode that takes scores_dot): keys in
// pairs, the probabilities (times 2^-8, the FMA path's scale of the values) rounded to bf16, as
// flash-attention's P.V on a GPU rounds them to 16 bits. Two value rows' bytes are interleaved
// first (unpacklo/hi_epi8: (v_j[d], v_j+1[d]) side by side), then widened to bf16 by the tables
// (exact), so each 32-bit lane holds the pair (v_j[d], v_j+1[d]) and vdpbf16ps adds
// p_j v_j[d] + p_j+1 v_j+1[d] to it: 12 shuffles per pair and 64 dims where widening each row
// and interleaving the words took 14. The accumulators stay in the unpacks' lane order
// (pv_order) for the whole item, so no row or accumulator is permuted per block.
// (For a bf16 cache the same was slower: batch 8 x 4k on a 2-core AMD EPYC, 2 threads, 6.1-6.6
// against 5.1-5.3 ms.)
template <int D, int T>
__attribute__((target("avx512bf16,avx512vbmi"))) inline void pv_dot(float* acc, const float* p,
                                                                   const c10::Float8_e4m3fn* const* vp,
                                                                   const c10::Float8_e4m3fn* const* next, int n) {
  static_assert(D % 64 == 0);
  const Fp8Bf16Tables& tb = fp8_bf16_tables();
  __m512i tab[4];
  for (int i = 0; i < 4; ++i) tab[i] = _mm512_load_si512((i < 2 ? tb.lo : tb.hi) + (i % 2) * 64);
  alignas(64) uint32_t pairs[T][kBlockN / 2];  // (p_2k, p_2k+1) as bf16 pairs
  for (int t = 0; t < T; ++t) {
    const __m512 pv = _mm512_mul_ps(_mm512_loadu_ps(p + t * kBlockN), _mm512_set1_ps(1.f / kFp8Unscale));
    _mm256_store_si256(reinterpret_cast<__m256i*>(pairs[t]), (__m256i)_mm512_cvtneps_pbh(pv));
  }
  for (int c0 = 0; c0 < D; c0 += 64) {
    __m512 a[T][4];
    for (int t = 0; t < T; ++t)
      for (int u = 0; u < 4; ++u) a[t][u] = _mm512_loadu_ps(acc + t * D + c0 + u * 16);
    for (int j = 0; j < n; j += 2) {
      if (next != nullptr && c0 == 0) {
        prefetch_row(next[j], D);
        if (j + 1 < n) prefetch_row(next[j + 1], D);
      }
      const __m512i x = _mm512_loadu_si512(reinterpret_cast<const uint8_t*>(vp[j] + c0));
      const __m512i y = j + 1 < n ? _mm512_loadu_si512(reinterpret_cast<const uint8_t*>(vp[j + 1] + c0))
                                  : _mm512_setzero_si512();
      __m512bh v[4];
      fp8_to_bf16(_mm512_unpacklo_epi8(x, y), tab, v[0], v[1]);
      fp8_to_bf16(_mm512_unpackhi_epi8(x, y), tab, v[2], v[3]);
      for (int t = 0; t < T; ++t) {
        const __m512bh pp = (__m512bh)_mm512_set1_epi32(static_cast<int>(pairs[t][j / 2]));
        for (int u = 0; u < 4; ++u) a[t][u] = _mm512_dpbf16_ps(a[t][u], v[u], pp);
      }
    }
    for (int t = 0; t < T; ++t)
      for (int u = 0; u < 4; ++u) _mm512_storeu_ps(acc + t * D + c0 + u * 16, a[t][u]);
  }
}

// Tiles of 4 rows (each converts the V rows again: for 16-bit and fp8 caches cheaper than a widened
// buffer's store and reloads; G = 8 decode, bf16 cache, batch 8 x 4k: 11.0-11.8 -> 9.2 ms); the first
// tile prefetches. dot: an fp8 cache's P.V by pv_dot.
template <typename TC, int D>
inline void accumulate_pv_direct(float* acc, int nrow, const float* p, const TC* const* vp, const TC* const* next,
                                 int n, bool dot) {
  for (int r = 0; r < nrow; r += 4) {
    float* a = acc + (int64_t)r * D;
    const float* pr = p + r * kBlockN;
    const TC* const* pf = r == 0 ? next : nullptr;
    if constexpr (std::is_same_v<TC, c10::Float8_e4m3fn> && D % 64 == 0) {
      if (dot) {
        switch (std::min(4, nrow - r)) {
          case 4: pv_dot<D, 4>(a, pr, vp, pf, n); break;
          case 3: pv_dot<D, 3>(a, pr, vp, pf, n); break;
          case 2: pv_dot<D, 2>(a, pr, vp, pf, n); break;
          default: pv_dot<D, 1>(a, pr, vp, pf, n);
        }
        continue;
      }
    }
    switch (std::min(4, nrow - r)) {
      case 4: pv_direct<TC, D, 4>(a, pr, vp, pf, n); break;
      case 3: pv_direct<TC, D, 3>(a, pr, vp, pf, n); break;
      case 2: pv_direct<TC, D, 2>(a, pr, vp, pf, n); break;
      default: pv_direct<TC, D, 1>(a, pr, vp, pf, n);
    }
  }
}
#endif

// A row of D cache elements as fp32 vectors (fp8: times 2^-8).
template <typename TC, int D>
inline void widen_row(const TC* src, float* dst) {
  constexpr int V = Vec::size();
  if constexpr (std::is_same_v<TC, c10::Float8_e4m3fn>) {
    const uint8_t* b = reinterpret_cast<const uint8_t*>(src);
    int c = 0;
#if defined(CPU_CAPABILITY_AVX512)
    for (; c + 32 <= D; c += 32) widen_fp8_32(b + c, dst + c);
#endif
    for (; c < D; c += V) (load_fp8(b + c) * Vec(1.f / kFp8Unscale)).store(dst + c);
  } else {
    for (int c = 0; c < D; c += V) load_float(src + c, V).store(dst + c);
  }
}

// Per-thread scratch of one work item (rows = the item's query rows over all its KV heads).
struct Scratch {
  std::vector<float> q, acc, s, kbuf, vbuf, m, l, lv;  // lv: l as per-lane partial sums until the item ends
  std::vector<uint16_t> qb;  // the query rows' bf16 bits, unscaled (scores_dot)
  std::vector<const float*> kp, vp;
  Scratch(int D, int rows)
      : q((int64_t)rows * D), acc((int64_t)rows * D), s((int64_t)rows * kBlockN), kbuf((int64_t)kBlockN * D),
        vbuf((int64_t)kBlockN * D), m(rows), l(rows), lv((int64_t)rows * Vec::size()), qb((int64_t)rows * D),
        kp(kBlockN), vp(kBlockN) {}
};

// Dot products of `nrow` query rows with n keys. Two query rows live in registers (one for
// headdim 256) while the keys stream past, so each K vector load feeds two FMAs and q is never
// reloaded; a horizontal sum per (row, key) finishes each dot product.
template <int D>
inline void scores(const float* q, int nrow, const float* const* kp, int n, float* s) {
  constexpr int V = Vec::size(), NV = D / V;
  int r = 0;
  if constexpr (NV <= 8) {
    for (; r + 2 <= nrow; r += 2) {
      Vec q0[NV], q1[NV];
      for (int c = 0; c < NV; ++c) {
        q0[c] = Vec::loadu(q + r * D + c * V);
        q1[c] = Vec::loadu(q + (r + 1) * D + c * V);
      }
      for (int j = 0; j < n; ++j) {
        Vec a0(0.f), a1(0.f);
        for (int c = 0; c < NV; ++c) {
          const Vec k = Vec::loadu(kp[j] + c * V);
          a0 = at::vec::fmadd(q0[c], k, a0);
          a1 = at::vec::fmadd(q1[c], k, a1);
        }
        s[r * kBlockN + j] = hsum(a0);
        s[(r + 1) * kBlockN + j] = hsum(a1);
      }
    }
  }
  for (; r < nrow; ++r) {
    Vec q0[NV];
    for (int c = 0; c < NV; ++c) q0[c] = Vec::loadu(q + r * D + c * V);
    for (int j = 0; j < n; ++j) {
      Vec a0(0.f), a1(0.f);  // two chains: half the FMA latency per key
      int c = 0;
      for (; c + 2 <= NV; c += 2) {
        a0 = at::vec::fmadd(q0[c], Vec::loadu(kp[j] + c * V), a0);
        a1 = at::vec::fmadd(q0[c + 1], Vec::loadu(kp[j] + (c + 1) * V), a1);
      }
      if (c < NV) a0 = at::vec::fmadd(q0[c], Vec::loadu(kp[j] + c * V), a0);
      s[r * kBlockN + j] = hsum(a0 + a1);
    }
  }
}

// acc[r] += sum_j p[r][j] * v[j]: 4 rows x 4 vectors of headdim accumulate in registers while the
// keys stream past, so each broadcast p and each V load feeds 4 FMAs.
template <int D>
inline void accumulate_pv(float* acc, int nrow, const float* p, const float* const* vp, int n) {
  constexpr int V = Vec::size(), NV = D / V;
  int r = 0;
  for (; r + 4 <= nrow; r += 4) {
    const float* pr = p + r * kBlockN;
    for (int c0 = 0; c0 < NV; c0 += 4) {
      constexpr int W = 4;
      Vec a[4][W];
      for (int t = 0; t < 4; ++t)
        for (int w = 0; w < W; ++w)
          if (c0 + w < NV) a[t][w] = Vec::loadu(acc + (r + t) * D + (c0 + w) * V);
      for (int j = 0; j < n; ++j) {
        Vec vj[W];
        for (int w = 0; w < W; ++w)
          if (c0 + w < NV) vj[w] = Vec::loadu(vp[j] + (c0 + w) * V);
        for (int t = 0; t < 4; ++t) {
          const Vec pj(pr[t * kBlockN + j]);
          for (int w = 0; w < W; ++w)
            if (c0 + w < NV) a[t][w] = at::vec::fmadd(pj, vj[w], a[t][w]);
        }
      }
      for (int t = 0; t < 4; ++t)
        for (int w = 0; w < W; ++w)
          if (c0 + w < NV) a[t][w].store(acc + (r + t) * D + (c0 + w) * V);
    }
  }
  for (; r < nrow; ++r) {
    const float* pr = p + r * kBlockN;
    for (int c = 0; c < D; c += V) {
      Vec a0 = Vec::loadu(acc + r * D + c);
      for (int j = 0; j < n; ++j) a0 = at::vec::fmadd(Vec(pr[j]), Vec::loadu(vp[j] + c), a0);
      a0.store(acc + r * D + c);
    }
  }
}

// The query chunk a work item covers: positions [i0, i1) of row b, KV heads [hk0, hk0 + nh), keys [lo, hi).
struct Item {
  int b, hk0, nh, i0, i1, R;  // R = (i1 - i0) * G query rows per KV head
  int64_t lo, hi;
  int L;  // keys of the row
};

// Runs one item: on return acc (unnormalized), m and l of its rows are in the scratch, head hh's rows at hh * R.
template <typename TQ, typename TC, int D>
void run_item(const Problem& p, const Item& it, Scratch& w) {
  constexpr int V = Vec::size();
  const int G = p.G, R = it.R, rows = it.nh * R;
  const int sq = p.q_len(it.b);
  const TQ* q = static_cast<const TQ*>(p.q);
  constexpr bool kFp8 = std::is_same_v<TC, c10::Float8_e4m3fn>;
#if defined(CPU_CAPABILITY_AVX512)
  // decode with bf16 queries and a bf16 or fp8 cache on an AVX512_BF16 CPU: scores_dot, on the queries' own bits
  constexpr bool kDotTypes = std::is_same_v<TQ, c10::BFloat16> &&
                             ((std::is_same_v<TC, c10::BFloat16> && D % 32 == 0) || (kFp8 && D % 64 == 0));
  const bool dot = kDotTypes && R <= kDirectRows && has_bf16_dot();
#else
  constexpr bool dot = false;
#endif
  float qk_scales[256];  // per head of the item (attend: it.nh * R <= 256)
  for (int hh = 0; hh < it.nh; ++hh) {
    const int hk = it.hk0 + hh;
    // fp8: the key scale is constant per KV head, so it is folded into q.
    const float qk_scale = p.scale * (p.k_scale ? p.k_scale[hk] * kFp8Unscale : 1.f);
    // scores_dot: fp8 rows become bf16 exactly, without the 2^-8
    qk_scales[hh] = dot ? p.scale * (p.k_scale ? p.k_scale[hk] : 1.f) : qk_scale;
    for (int i = it.i0; i < it.i1; ++i) {
      for (int g = 0; g < G; ++g) {
        const TQ* src = q + p.q_index(it.b, i, hk * G + g);
        const int64_t at = ((int64_t)hh * R + (int64_t)(i - it.i0) * G + g) * D;
        if (dot) {
          const uint16_t* bits = reinterpret_cast<const uint16_t*>(src);  // TQ is bf16 here
          uint16_t* qb = w.qb.data() + at;
          for (int e = 0; e < D; ++e) qb[e] = bits[kFp8 ? e / 64 * 64 + dot_order(e % 64) : e];  // fp8: scores_dot's order
          continue;
        }
        float* dst = w.q.data() + at;
        for (int e = 0; e < D; e += V) (load_float(src + e, V) * Vec(qk_scale)).store(dst + e);
      }
    }
  }
  std::fill(w.acc.begin(), w.acc.begin() + (int64_t)rows * D, 0.f);
  std::fill(w.m.begin(), w.m.begin() + rows, kNegInf);
  std::fill(w.lv.begin(), w.lv.begin() + (int64_t)rows * V, 0.f);
  // Each row's visible keys [rlo, rhi), the same for every head: query i sits at L - sq + i.
  int rlo[kMaxRows], rhi[kMaxRows];
  for (int r = 0; r < R; ++r) {
    const int64_t pos = (int64_t)it.L - sq + it.i0 + r / G;
    int64_t hi = it.L, lo = 0;
    if (p.causal) hi = std::min<int64_t>(hi, pos + 1);
    else if (p.window_right >= 0) hi = std::min<int64_t>(hi, pos + p.window_right + 1);
    if (p.window_left >= 0) lo = std::max<int64_t>(0, pos - p.window_left);
    rlo[r] = (int)std::max<int64_t>(lo, 0);
    rhi[r] = (int)std::max<int64_t>(hi, 0);
  }
  const TC* kcache = static_cast<const TC*>(p.k);
  const TC* vcache = static_cast<const TC*>(p.v);
  // Few query rows per KV head (decode): K and V rows converted in registers where they are used,
  // without the widened buffers' stores and reloads; with more rows, widened once for all of them.
#if defined(CPU_CAPABILITY_AVX512)
  const bool kInRegisters = R <= kDirectRows;
#else
  constexpr bool kInRegisters = false;
#endif
  const TC *kr[kBlockN], *vr[kBlockN], *kn[kBlockN], *vn[kBlockN];  // rows, and the rows to prefetch
#if defined(CPU_CAPABILITY_AVX512)
  __m512 part[kDirectRows * kBlockN];  // scores_direct's product vectors
#endif
  for (int64_t kb = it.lo; kb < it.hi; kb += kBlockN) {
    const int n = (int)std::min<int64_t>(kBlockN, it.hi - kb);
    // Head by head, the block's K and V rows widened to fp32 into two L1-sized buffers. One head's
    // rows sit a row of all heads apart (flash-attn's layout), a stride the hardware prefetchers
    // do not follow, so each row is prefetched one head ahead.
    int64_t offs[kBlockN];
    for (int j = 0; j < n; ++j) offs[j] = p.rows.offset(it.b, kb + j);
    for (int hh = 0; hh < it.nh; ++hh) {
      const int hk = it.hk0 + hh;
      for (int j = 0; j < n; ++j) {
        const int64_t o = offs[j] + hk * p.rows.s2;
        // the same row kPrefetchHeads heads on, in this block or (past its last head) a later one
        int64_t nxt = -1;
        const int ahead = hh + kPrefetchHeads;
        if (ahead < it.nh) nxt = o + kPrefetchHeads * p.rows.s2;
        else if (kb + (ahead / it.nh) * kBlockN + j < it.hi)
          nxt = p.rows.offset(it.b, kb + (ahead / it.nh) * kBlockN + j) + (it.hk0 + ahead % it.nh) * p.rows.s2;
        if (kInRegisters) {  // prefetched by scores_direct and accumulate_pv_direct, spread over their keys
          kr[j] = kcache + o;
          vr[j] = vcache + o;
          kn[j] = nxt >= 0 ? kcache + nxt : kr[j];
          vn[j] = nxt >= 0 ? vcache + nxt : vr[j];
          continue;
        }
        if (nxt >= 0) {
          prefetch_row(kcache + nxt, D * sizeof(TC));
          prefetch_row(vcache + nxt, D * sizeof(TC));
        }
        widen_row<TC, D>(kcache + o, w.kbuf.data() + (int64_t)j * D);
        widen_row<TC, D>(vcache + o, w.vbuf.data() + (int64_t)j * D);
        w.kp[j] = w.kbuf.data() + (int64_t)j * D;
        w.vp[j] = w.vbuf.data() + (int64_t)j * D;
      }
      float* s = w.s.data() + (int64_t)hh * R * kBlockN;
      float* acc = w.acc.data() + (int64_t)hh * R * D;
      float* m = w.m.data() + hh * R;
      float* lv = w.lv.data() + (int64_t)hh * R * V;
#if defined(CPU_CAPABILITY_AVX512)
      if (dot) {
        if constexpr (kDotTypes)
          scores_dot<TC, D>(w.qb.data() + (int64_t)hh * R * D, R, qk_scales[hh], kr, kn, n, s, part);
      } else if (kInRegisters) {
        scores_direct<TC, D>(w.q.data() + (int64_t)hh * R * D, R, kr, kn, n, s, part);
      } else
#endif
        scores<D>(w.q.data() + (int64_t)hh * R * D, R, w.kp.data(), n, s);
      for (int r = 0; r < R; ++r) {
        float* sr = s + r * kBlockN;
        const int h = hk * G + r % G;
        const int64_t pos = (int64_t)it.L - sq + it.i0 + r / G;
        if (p.softcap > 0.f) {
          const Vec inv(1.f / p.softcap), cap(p.softcap);
          for (int j = 0; j < kBlockN; j += V) (cap * (Vec::loadu(sr + j) * inv).tanh()).store(sr + j);
        }
        if (p.alibi) {
          const float slope = p.alibi[it.b * p.alibi_bstride + h];
          for (int j = 0; j < n; ++j) sr[j] -= slope * (float)std::abs(pos - (kb + j));
        }
        // Masks: keys outside [rlo, rhi), and the block's tail.
        const int jlo = (int)std::max<int64_t>(0, rlo[r] - kb), jhi = (int)std::min<int64_t>(n, rhi[r] - kb);
        if (jhi <= jlo) {
          std::fill(sr, sr + kBlockN, 0.f);  // p = 0: nothing of this block reaches the row
          continue;
        }
        for (int j = 0; j < jlo; ++j) sr[j] = kNegInf;
        for (int j = jhi; j < kBlockN; ++j) sr[j] = kNegInf;
        Vec mx(kNegInf);
        for (int j = 0; j < kBlockN; j += V) mx = at::vec::maximum(mx, Vec::loadu(sr + j));
        const float m_new = std::max(m[r], hmax(mx));
        Vec sum(0.f);
        for (int j = 0; j < kBlockN; j += V) {
          const Vec e = exp_fast(Vec::loadu(sr + j) - Vec(m_new));
          e.store(sr + j);
          sum = sum + e;
        }
        // the row's sum of exponentials stays a vector until the item ends: no horizontal sum per block
        Vec lr = Vec::loadu(lv + r * V);
        if (m_new != m[r]) {  // the max rose (and on the row's first block, where m = -inf): rescale
          const float alpha = std::exp(m[r] - m_new);
          lr = lr * Vec(alpha);
          float* a = acc + (int64_t)r * D;
          for (int c = 0; c < D; c += V) (Vec::loadu(a + c) * Vec(alpha)).store(a + c);
        }
        (lr + sum).store(lv + r * V);
        m[r] = m_new;
      }
#if defined(CPU_CAPABILITY_AVX512)
      if (kInRegisters) accumulate_pv_direct<TC, D>(acc, R, s, vr, vn, n, dot);
      else
#endif
        accumulate_pv<D>(acc, R, s, w.vp.data(), n);
    }
  }
  for (int r = 0; r < rows; ++r) w.l[r] = hsum(Vec::loadu(w.lv.data() + (int64_t)r * V));
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (kFp8 && D % 64 == 0) {
    if (dot) pv_dot_to_natural<D>(w.acc.data(), rows);  // pv_dot's lane order
  }
#endif
}

// ---- prefill with small headdims (8-56): queries in the vector lanes ---------
//
// The kernel above holds a query row's headdim in the vector lanes; at headdims
// below 64 (diffusion UNets: 8 to 40) most of each vector would be idle and the
// softmax's exp, one per score whatever the headdim, dominates. Here a block of
// U x Vec::size() queries of one head sits in the lanes instead, transposed: a
// score vector holds one key's scores for 16 queries, built by headdim FMAs
// with the key's elements broadcast, so nothing is summed across lanes and every
// exp2 lane is a real score. Per key and 16 queries: headdim FMAs for q.k, a max,
// a subtraction, exp2 (scale and log2 e folded into q: 8 ops), a sum, headdim
// FMAs for p.v: 2 x headdim + 11 vector ops, 13.5 cycles at headdim 8 at two a
// cycle. Keys go in chunks of kLaneKeys whose scores (L2-resident) take a
// two-pass softmax, chunks merged online. A thread's K and V rows of one (batch
// row, KV head) are widened into fp32 once and reused by its query blocks.
// Measured (2-core AVX-512 Xeon, fp32, 1 thread, 2 x 8 heads, headdim 8): 1024
// queries x 1024 keys 5.37 ms, 13.3 cycles per score vector (PyTorch's flash
// kernel: 11.2 ms); x 77 keys 0.58 ms (2.5 ms). From headdim 32 both are
// FMA-bound; over 256 keys or more PyTorch's takes headdims 48 and 56 (see
// attention() for the routing).

constexpr int kLaneKeys = 512;  // keys per chunk: U * 16 * 512 fp32 scores, 32-64 KB

constexpr float kLog2e = 1.44269504f;

// The largest divisor of d that is at most n.
constexpr int pv_columns(int d, int n) {
  int c = n;
  while (d % c) --c;
  return c;
}

// Calls body(j0, j1, masked) over [a, b) split into the keys every lane of a query block sees
// ([full_lo, full_hi)) and the rest, masked per lane; masked is a std::bool_constant.
template <typename F>
inline void key_zones(int a, int b, int full_lo, int full_hi, F&& body) {
  if (full_lo >= full_hi) return body(a, b, std::true_type{});
  const int lo = std::clamp(full_lo, a, b), hi = std::clamp(full_hi, lo, b);
  body(a, lo, std::true_type{});
  body(lo, hi, std::false_type{});
  body(hi, b, std::true_type{});
}

// kPlain: no softcap and no ALiBi (their checks in the inner loop cost 20% at headdim 8).
template <typename TQ, int D, bool kPlain>
void attend_lanes(const Problem& p) {
  static_assert(D % 8 == 0, "headdims are multiples of 8");
  constexpr int V = Vec::size();
  constexpr int U = D <= 16 ? 2 : 1;  // query vectors per block: U x D q registers, U x D accumulators
  constexpr int QB = U * V;
  constexpr int DC = pv_columns(D, 16 / U);  // headdim columns per P.V pass (accumulators in registers)
  const int G = p.G;
  const int nqb = (p.max_sq + QB - 1) / QB;
  int64_t max_keys = 0;
  for (int b = 0; b < p.B; ++b) max_keys = std::max<int64_t>(max_keys, p.kv_len(b));
  const TQ* kbase = static_cast<const TQ*>(p.k);
  const TQ* vbase = static_cast<const TQ*>(p.v);
  const TQ* qbase = static_cast<const TQ*>(p.q);
  const float qscale = p.scale * (p.softcap > 0.f ? 1.f : kLog2e);
  at::parallel_for(0, (int64_t)p.B * p.H * nqb, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> kp(max_keys * D), vp(max_keys * D), s((int64_t)kLaneKeys * QB), acc(U * D * V);
    int packed_b = -1, packed_hk = -1;
    for (int64_t idx = begin; idx < end; ++idx) {
      const int qb = (int)(idx % nqb), h = (int)(idx / nqb % p.H), b = (int)(idx / nqb / p.H);
      const int sq = p.q_len(b), i0 = qb * QB;
      if (i0 >= sq) continue;
      const int nq = std::min(QB, sq - i0), L = p.kv_len(b), hk = h / G;
      if (b != packed_b || hk != packed_hk) {
        for (int j = 0; j < L; ++j) {
          const int64_t o = p.rows.offset(b, j) + hk * p.rows.s2;
          for (int c = 0; c < D; c += V) {
            const int m = std::min(V, D - c);
            load_float(kbase + o + c, m).store(kp.data() + (int64_t)j * D + c, m);
            load_float(vbase + o + c, m).store(vp.data() + (int64_t)j * D + c, m);
          }
        }
        packed_b = b;
        packed_hk = hk;
      }
      // Each lane's visible keys [lo, hi); lanes past the last query copy its range.
      alignas(64) float lof[QB], hif[QB], posf[QB], qt[U * D * V];
      int kmin = L, kmax = 0, full_lo = 0, full_hi = L;
      for (int t = 0; t < QB; ++t) {
        const int64_t pos = (int64_t)L - sq + i0 + std::min(t, nq - 1);
        int64_t hi = L, lo = 0;
        if (p.causal) hi = std::min<int64_t>(hi, pos + 1);
        else if (p.window_right >= 0) hi = std::min<int64_t>(hi, pos + p.window_right + 1);
        if (p.window_left >= 0) lo = std::max<int64_t>(lo, pos - p.window_left);
        lo = std::max<int64_t>(lo, 0);
        hi = std::max(hi, lo);
        lof[t] = (float)lo;
        hif[t] = (float)hi;
        posf[t] = (float)pos;
        kmin = std::min(kmin, (int)lo);
        kmax = std::max(kmax, (int)hi);
        full_lo = std::max(full_lo, (int)lo);
        full_hi = std::min(full_hi, (int)hi);
      }
      for (int t = 0; t < QB; ++t) {
        const TQ* src = qbase + p.q_index(b, i0 + std::min(t, nq - 1), h);
        for (int d = 0; d < D; ++d) qt[((t / V) * D + d) * V + t % V] = static_cast<float>(src[d]) * qscale;
      }
      Vec q[U][D], m[U], l[U], lo[U], hi[U], pos[U];
      for (int u = 0; u < U; ++u) {
        for (int d = 0; d < D; ++d) q[u][d] = Vec::loadu(qt + (u * D + d) * V);
        m[u] = Vec(kNegInf);
        l[u] = Vec(0.f);
        lo[u] = Vec::loadu(lof + u * V);
        hi[u] = Vec::loadu(hif + u * V);
        pos[u] = Vec::loadu(posf + u * V);
      }
      std::fill(acc.begin(), acc.end(), 0.f);
      const float slope = p.alibi ? p.alibi[b * p.alibi_bstride + h] * kLog2e : 0.f;
      for (int c0 = kmin; c0 < kmax; c0 += kLaneKeys) {
        const int c1 = std::min(kmax, c0 + kLaneKeys);
        auto score_at = [&](int64_t j, int u) { return s.data() + ((j - c0) * U + u) * V; };
        // Pass 1: scores (log2 units) into s, the chunk's max per lane.
        Vec cm[U];
        for (int u = 0; u < U; ++u) cm[u] = Vec(kNegInf);
        key_zones(c0, c1, full_lo, full_hi, [&](int j0, int j1, auto masked) {
          for (int j = j0; j < j1; ++j) {
            const float* kj = kp.data() + (int64_t)j * D;
            for (int u = 0; u < U; ++u) {
              Vec a0(0.f), a1(0.f);  // two chains over headdim
              for (int d = 0; d < D; d += 2) {
                a0 = at::vec::fmadd(q[u][d], Vec(kj[d]), a0);
                a1 = at::vec::fmadd(q[u][d + 1], Vec(kj[d + 1]), a1);
              }
              Vec sv = a0 + a1;
              if constexpr (!kPlain) {
                if (p.softcap > 0.f) sv = Vec(p.softcap * kLog2e) * (sv * Vec(1.f / p.softcap)).tanh();
                if (p.alibi) sv = sv - Vec(slope) * (pos[u] - Vec((float)j)).abs();
              }
              if constexpr (decltype(masked)::value) {
                const Vec jf((float)j);
                sv = Vec::blendv(Vec(kNegInf), sv, (jf >= lo[u]) & (jf < hi[u]));
              }
              cm[u] = at::vec::maximum(cm[u], sv);
              sv.store(score_at(j, u));
            }
          }
        });
        // Merge with the earlier chunks; m_safe = 0 for lanes that have seen no key yet.
        Vec msafe[U];
        for (int u = 0; u < U; ++u) {
          const Vec mn = at::vec::maximum(m[u], cm[u]);
          msafe[u] = Vec::blendv(mn, Vec(0.f), mn == Vec(kNegInf));
          if (c0 > kmin) {
            const Vec alpha = exp2_fast(at::vec::maximum(m[u] - msafe[u], Vec(-256.f)));
            l[u] = l[u] * alpha;
            for (int d = 0; d < D; ++d) {
              (Vec::loadu(acc.data() + (u * D + d) * V) * alpha).store(acc.data() + (u * D + d) * V);
            }
          }
          m[u] = mn;
        }
        // p = 2^(s - m); a masked score (-inf) is clamped to -256 first: 2^-256 = 0.
        auto prob = [&](int j, int u, auto masked) {
          Vec x = Vec::loadu(score_at(j, u)) - msafe[u];
          if constexpr (decltype(masked)::value) x = at::vec::maximum(x, Vec(-256.f));
          const Vec e = exp2_fast(x);
          l[u] = l[u] + e;
          return e;
        };
        if constexpr (U * D <= 16) {
          // Pass 2, fused: p summed and accumulated into U x D registers.
          Vec a[U][D];
          for (int u = 0; u < U; ++u)
            for (int d = 0; d < D; ++d) a[u][d] = Vec::loadu(acc.data() + (u * D + d) * V);
          key_zones(c0, c1, full_lo, full_hi, [&](int j0, int j1, auto masked) {
            for (int j = j0; j < j1; ++j) {
              const float* vj = vp.data() + (int64_t)j * D;
              for (int u = 0; u < U; ++u) {
                const Vec e = prob(j, u, masked);
                for (int d = 0; d < D; ++d) a[u][d] = at::vec::fmadd(e, Vec(vj[d]), a[u][d]);
              }
            }
          });
          for (int u = 0; u < U; ++u)
            for (int d = 0; d < D; ++d) a[u][d].store(acc.data() + (u * D + d) * V);
        } else {
          // Pass 2a: p in place of s, summed; 2b: acc += p . v, DC headdim columns at a time in registers.
          key_zones(c0, c1, full_lo, full_hi, [&](int j0, int j1, auto masked) {
            for (int j = j0; j < j1; ++j)
              for (int u = 0; u < U; ++u) prob(j, u, masked).store(score_at(j, u));
          });
          for (int dc = 0; dc < D; dc += DC) {
            Vec a[U][DC];
            for (int u = 0; u < U; ++u)
              for (int d = 0; d < DC; ++d) a[u][d] = Vec::loadu(acc.data() + (u * D + dc + d) * V);
            for (int j = c0; j < c1; ++j) {
              const float* vj = vp.data() + (int64_t)j * D + dc;
              for (int u = 0; u < U; ++u) {
                const Vec pj = Vec::loadu(score_at(j, u));
                for (int d = 0; d < DC; ++d) a[u][d] = at::vec::fmadd(pj, Vec(vj[d]), a[u][d]);
              }
            }
            for (int u = 0; u < U; ++u)
              for (int d = 0; d < DC; ++d) a[u][d].store(acc.data() + (u * D + dc + d) * V);
          }
        }
      }
      // out = acc / l, lse = (m + log2 l) ln 2; a lane that saw no key: zeros and -inf.
      alignas(64) float lf[QB], mf[QB];
      for (int u = 0; u < U; ++u) {
        l[u].store(lf + u * V);
        m[u].store(mf + u * V);
      }
      TQ* out = static_cast<TQ*>(p.out);
      for (int t = 0; t < nq; ++t) {
        const float inv = lf[t] > 0.f ? 1.f / lf[t] : 0.f;
        TQ* dst = out + (p.q_row(b, i0 + t) * p.H + h) * D;
        const float* a = acc.data() + (t / V) * D * V + t % V;
        for (int d = 0; d < D; ++d) dst[d] = static_cast<TQ>(a[d * V] * inv);
        p.lse[p.lse_index(b, h, i0 + t)] = lf[t] > 0.f ? (mf[t] + std::log2(lf[t])) * 0.693147182f : kNegInf;
      }
    }
  });
}

bool lanes_head_dim(int d) { return d % 8 == 0 && d >= 8 && d < 64; }

void run_lanes(const Problem& p, c10::ScalarType qtype) {
  dispatch_float(qtype, "attention", [&](auto tag) {
    using TQ = decltype(tag);
    auto dims = [&](auto plain) {
      constexpr bool kPlain = decltype(plain)::value;
      switch (p.D) {
        case 8: return attend_lanes<TQ, 8, kPlain>(p);
        case 16: return attend_lanes<TQ, 16, kPlain>(p);
        case 24: return attend_lanes<TQ, 24, kPlain>(p);
        case 32: return attend_lanes<TQ, 32, kPlain>(p);
        case 40: return attend_lanes<TQ, 40, kPlain>(p);
        case 48: return attend_lanes<TQ, 48, kPlain>(p);
        case 56: return attend_lanes<TQ, 56, kPlain>(p);
        default: TORCH_CHECK(false, "attention: no lanes kernel for headdim ", p.D);
      }
    };
    if (p.softcap > 0.f || p.alibi) return dims(std::false_type{});
    dims(std::true_type{});
  });
}

// out and lse of one row from (acc, m, l).
template <typename TQ, int D>
inline void write_row(const Problem& p, int b, int h, int i, const float* acc, float m, float l, float v_factor) {
  constexpr int V = Vec::size();
  TQ* out = static_cast<TQ*>(p.out) + (p.q_row(b, i) * p.H + h) * D;
  const float inv = l > 0.f ? v_factor / l : 0.f;  // a row that saw no key: zeros, lse -inf
  for (int c = 0; c < D; c += V) store_float(out + c, Vec::loadu(acc + c) * Vec(inv), V);
  p.lse[p.lse_index(b, h, i)] = l > 0.f ? m + std::log(l) : kNegInf;
}

template <typename TQ, typename TC, int D>
void attend(const Problem& p) {
  const int G = p.G;
  if (G > kMaxRows) TORCH_CHECK(false, "attention: more than ", kMaxRows, " query heads per KV head");
  const int QL = std::max(1, std::min(p.max_sq, kMaxRows / G));  // query positions per item
  const int QC = (p.max_sq + QL - 1) / QL;
  const int R = QL * G;
  // Decode-sized items take every KV head (rows read contiguously); prefill chunks take one.
  const int KVH = R * p.HK <= 256 ? p.HK : 1;
  const int HG = p.HK / KVH;
  int64_t max_keys = 0;
  for (int b = 0; b < p.B; ++b) max_keys = std::max<int64_t>(max_keys, p.kv_len(b));
  // Split the keys (flash-decoding) only when batch x heads x chunks leaves threads idle, into >= 8 blocks each.
  const int64_t items = (int64_t)p.B * HG * QC;
  const int threads = at::get_num_threads();
  int S = 1;
  if (items < 2 * threads) {
    S = (int)std::min<int64_t>((2 * threads + items - 1) / items, std::max<int64_t>(1, max_keys / (8 * kBlockN)));
  }
  auto make_item = [&](int64_t idx, Item& it, int& split) -> bool {
    split = (int)(idx % S);
    const int64_t t = idx / S;
    const int qc = (int)(t % QC);
    it.hk0 = (int)((t / QC) % HG) * KVH;
    it.nh = KVH;
    it.b = (int)(t / QC / HG);
    const int sq = p.q_len(it.b);
    it.i0 = qc * QL;
    if (it.i0 >= sq) return false;
    it.i1 = std::min(sq, it.i0 + QL);
    it.R = (it.i1 - it.i0) * G;
    it.L = p.kv_len(it.b);
    const int64_t first = (int64_t)it.L - sq + it.i0, last = (int64_t)it.L - sq + it.i1 - 1;
    int64_t lo = 0, hi = it.L;
    if (p.causal) hi = std::min<int64_t>(hi, last + 1);
    else if (p.window_right >= 0) hi = std::min<int64_t>(hi, last + p.window_right + 1);
    if (p.window_left >= 0) lo = std::max<int64_t>(lo, first - p.window_left);
    hi = std::max(hi, lo);
    const int64_t blocks = (hi - lo + kBlockN - 1) / kBlockN, per = (blocks + S - 1) / S;
    it.lo = std::min(hi, lo + split * per * kBlockN);
    it.hi = std::min(hi, it.lo + per * kBlockN);
    return true;
  };
  auto v_factor = [&](int hk) { return p.v_scale ? p.v_scale[hk] * kFp8Unscale : 1.f; };
  auto write_item = [&](const Item& it, const float* acc, const float* m, const float* l) {
    for (int hh = 0; hh < it.nh; ++hh) {
      for (int r = 0; r < it.R; ++r) {
        const int64_t row = (int64_t)hh * it.R + r;
        write_row<TQ, D>(p, it.b, (it.hk0 + hh) * G + r % G, it.i0 + r / G, acc + row * D, m[row], l[row],
                         v_factor(it.hk0 + hh));
      }
    }
  };
  const int rows = KVH * R;
  if (S == 1) {
    at::parallel_for(0, items, 1, [&](int64_t begin, int64_t end) {
      Scratch w(D, rows);
      for (int64_t idx = begin; idx < end; ++idx) {
        Item it;
        int split;
        if (!make_item(idx, it, split)) continue;
        run_item<TQ, TC, D>(p, it, w);
        write_item(it, w.acc.data(), w.m.data(), w.l.data());
      }
    });
    return;
  }
  // Flash-decoding: partial (acc, m, l) per split, then one merge per item.
  std::vector<float> part_acc(items * S * rows * D), part_m(items * S * rows), part_l(items * S * rows);
  at::parallel_for(0, items * S, 1, [&](int64_t begin, int64_t end) {
    Scratch w(D, rows);
    for (int64_t idx = begin; idx < end; ++idx) {
      Item it;
      int split;
      if (!make_item(idx, it, split)) continue;
      run_item<TQ, TC, D>(p, it, w);
      const int n = it.nh * it.R;
      std::copy(w.acc.begin(), w.acc.begin() + (int64_t)n * D, part_acc.begin() + idx * rows * D);
      std::copy(w.m.begin(), w.m.begin() + n, part_m.begin() + idx * rows);
      std::copy(w.l.begin(), w.l.begin() + n, part_l.begin() + idx * rows);
    }
  });
  at::parallel_for(0, items, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> acc((int64_t)rows * D), m(rows), l(rows);
    for (int64_t t = begin; t < end; ++t) {
      Item it;
      int split;
      if (!make_item(t * S, it, split)) continue;
      const int n = it.nh * it.R;
      for (int r = 0; r < n; ++r) {
        float mr = kNegInf;
        for (int sp = 0; sp < S; ++sp) mr = std::max(mr, part_m[(t * S + sp) * rows + r]);
        float lr = 0.f;
        float* a = acc.data() + (int64_t)r * D;
        std::fill(a, a + D, 0.f);
        if (mr != kNegInf) {
          for (int sp = 0; sp < S; ++sp) {
            const int64_t at = (t * S + sp) * rows + r;
            const float wgt = std::exp(part_m[at] - mr);
            if (wgt == 0.f) continue;
            lr += wgt * part_l[at];
            const float* pa = part_acc.data() + at * D;
            for (int c = 0; c < D; c += Vec::size()) {
              at::vec::fmadd(Vec(wgt), Vec::loadu(pa + c), Vec::loadu(a + c)).store(a + c);
            }
          }
        }
        m[r] = mr;
        l[r] = lr;
      }
      write_item(it, acc.data(), m.data(), l.data());
    }
  });
}

template <typename TQ, typename TC>
void attend_dims(const Problem& p) {
  switch (p.D) {
    case 64: return attend<TQ, TC, 64>(p);
    case 80: return attend<TQ, TC, 80>(p);
    case 96: return attend<TQ, TC, 96>(p);
    case 128: return attend<TQ, TC, 128>(p);
    case 256: return attend<TQ, TC, 256>(p);
    default: TORCH_CHECK(false, "attention: headdim must be one of 64, 80, 96, 128, 256, got ", p.D);
  }
}

void run(const Problem& p, c10::ScalarType qtype, c10::ScalarType ctype) {
  dispatch_float(qtype, "attention", [&](auto tag) {
    using TQ = decltype(tag);
    if (ctype == c10::kFloat8_e4m3fn) {
      attend_dims<TQ, c10::Float8_e4m3fn>(p);
    } else {
      TORCH_CHECK(ctype == qtype, "attention: the cache dtype must be q's or float8_e4m3fn, got ", ctype);
      attend_dims<TQ, TQ>(p);
    }
  });
}

// ---- append ----------------------------------------------------------------

template <typename TQ, typename TC>
void append_rows(const Tensor& cache, const Tensor& x, const KvRows& rows, const int* seqlens, int64_t offset,
                 const float* scale) {
  const int B = x.size(0), S = x.size(1), HK = x.size(2), D = x.size(3);
  const int64_t sb = x.stride(0), si = x.stride(1), sh = x.stride(2);  // the headdim is contiguous
  const TQ* src = x.data_ptr<TQ>();
  TC* dst = static_cast<TC*>(cache.data_ptr());
  // A decode step appends a few KB: waking threads costs more than the copy.
  const int64_t grain = std::max<int64_t>(1, (1 << 16) / std::max<int64_t>((int64_t)HK * D, 1));
  at::parallel_for(0, (int64_t)B * S, grain, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int b = (int)(t / S), i = (int)(t % S);
      const int64_t pos = (seqlens ? seqlens[b] : 0) + offset + i;
      for (int h = 0; h < HK; ++h) {
        const TQ* s = src + b * sb + i * si + h * sh;
        TC* d = dst + rows.offset(b, pos) + h * rows.s2;
        if constexpr (std::is_same_v<TC, TQ>) {
          std::copy(s, s + D, d);
        } else {
          // fp8 has no inf: saturate like the reference instead of overflowing to NaN.
          const float inv = 1.f / scale[h];
          for (int e = 0; e < D; ++e) {
            const float y = std::min(kFp8Max, std::max(-kFp8Max, static_cast<float>(s[e]) * inv));
            d[e] = c10::Float8_e4m3fn(y);
          }
        }
      }
    }
  });
}

KvRows cache_rows(const Tensor& cache, const OptTensor& block_table) {
  KvRows r{};
  r.s0 = cache.stride(0);
  r.s1 = cache.stride(1);
  r.s2 = cache.stride(2);
  if (block_table.has_value()) {
    r.mode = 1;
    r.block_table = block_table->data_ptr<int>();
    r.blocks_per_seq = block_table->size(1);
    r.page_size = cache.size(1);
  }
  return r;
}

void append(const Tensor& k_cache, const Tensor& v_cache, const Tensor& k, const Tensor& v, const KvRows& rows,
            const int* seqlens, int64_t offset, const float* k_scale, const float* v_scale) {
  if (k.numel() == 0) return;
  TORCH_CHECK(k.stride(-1) == 1 && v.stride(-1) == 1, "kvcache_append_: k and v must have a contiguous headdim");
  dispatch_float(k.scalar_type(), "kvcache_append_", [&](auto tag) {
    using TQ = decltype(tag);
    if (k_cache.scalar_type() == c10::kFloat8_e4m3fn) {
      append_rows<TQ, c10::Float8_e4m3fn>(k_cache, k, rows, seqlens, offset, k_scale);
      append_rows<TQ, c10::Float8_e4m3fn>(v_cache, v, rows, seqlens, offset, v_scale);
    } else {
      append_rows<TQ, TQ>(k_cache, k, rows, seqlens, offset, nullptr);
      append_rows<TQ, TQ>(v_cache, v, rows, seqlens, offset, nullptr);
    }
  });
}

const float* opt_ptr(const OptTensor& t) { return t.has_value() ? t->data_ptr<float>() : nullptr; }

void kvcache_append_(Tensor k_cache, Tensor v_cache, const Tensor& k, const Tensor& v,
                     const OptTensor& cache_seqlens, int64_t seqlen_offset, const OptTensor& block_table,
                     const OptTensor& k_scale, const OptTensor& v_scale) {
  append(k_cache, v_cache, k, v, cache_rows(k_cache, block_table),
         cache_seqlens.has_value() ? cache_seqlens->data_ptr<int>() : nullptr, seqlen_offset, opt_ptr(k_scale),
         opt_ptr(v_scale));
}

void set_common(Problem& p, const Tensor& q, double softmax_scale, bool causal, int64_t window_left,
                int64_t window_right, double softcap, const OptTensor& alibi_slopes) {
  p.scale = (float)softmax_scale;
  p.softcap = (float)softcap;
  p.causal = causal;
  p.window_left = (int)window_left;
  p.window_right = (int)window_right;
  p.alibi = opt_ptr(alibi_slopes);
  p.alibi_bstride = alibi_slopes.has_value() && alibi_slopes->dim() == 2 ? alibi_slopes->size(1) : 0;
}

// q (B, sq, H, D) or packed (total, H, D), its headdim contiguous, other strides any; out contiguous.
void set_q(Problem& p, const Tensor& q, const Tensor& out) {
  TORCH_CHECK(q.stride(-1) == 1 || q.size(-1) == 1, "attention: q's headdim must be contiguous");
  p.q = q.data_ptr();
  p.q_sb = q.dim() == 4 ? q.stride(0) : 0;
  p.q_si = q.stride(-3);
  p.q_sh = q.stride(-2);
  p.out = out.data_ptr();
}

// PyTorch's flash attention for the CPU on one set of rows: q (b, sq, H, D), k and v (b, nk, HK, D)
// views holding exactly the rows' keys. Returns out (b, sq, H, D), writes lse (b, H, sq). A whole
// prompt (nk = sq, no window) takes its is_causal flag; otherwise an additive mask (1, 1, sq, nk) in q's
// dtype says what each query sees: bottom-right causal (its is_causal is aligned top-left), the left
// window. The caller made sure that every query sees a key.
Tensor flash_rows(const Tensor& q, const Tensor& k, const Tensor& v, const Problem& p, Tensor lse) {
  const int64_t sq = q.size(1), nk = k.size(1);
  std::optional<Tensor> mask;
  if (p.window_left >= 0 || (p.causal && nk != sq)) {
    mask = at::empty({1, 1, sq, nk}, q.options());
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "attention_mask", [&] {
      scalar_t* m = mask->data_ptr<scalar_t>();
      const scalar_t hidden(kNegInf), seen(0.f);
      at::parallel_for(0, sq, 64, [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r) {
          const int64_t pos = nk - sq + r;
          const int64_t hi = p.causal ? pos + 1 : nk;
          const int64_t lo = p.window_left >= 0 ? std::max<int64_t>(0, pos - p.window_left) : 0;
          scalar_t* row = m + r * nk;
          std::fill(row, row + lo, hidden);
          std::fill(row + lo, row + hi, seen);
          std::fill(row + hi, row + nk, hidden);
        }
      });
    });
  }
  auto [o, l] = at::_scaled_dot_product_flash_attention_for_cpu(q.transpose(1, 2), k.transpose(1, 2),
                                                                v.transpose(1, 2), 0.0, p.causal && !mask, mask,
                                                                (double)p.scale);
  lse.copy_(l);
  return o.transpose(1, 2);  // q came as a (b, sq, H, D) view, so this is laid out (b, sq, H, D) too
}

// Prefill-sized query chunks (64 or more in the longest row) over contiguous or packed keys (a paged or
// fp8 cache's made so first by prefill_rows), with neither softcap nor ALiBi: PyTorch's flash
// attention for the CPU, whose GEMM tiles beat this file's
// vector kernel there (Llama-3-8B heads, 2k tokens, fp32: 163 against 273 ms; bf16, where its tiles
// are AMX's on CPUs that have them: 40 against 233 ms; bf16, 512 queries over a 4k cache: 43 against
// 220 ms). Its kernel computes the scores of masked keys too, so a row's keys past its length (a
// cache's unwritten memory, NaN in the tests) must not be read: rows of equal length go in one call,
// ragged or packed rows one call each, over their own keys. Only where every query sees a key (its
// kernel would give NaN where this file's gives zeros). In bf16/fp16 only when the caller drops lse
// (need_lse false): there its scores are rounded to the input precision, so its lse is off by ~1e-3
// relative, where this file's scores are exact fp32 products (its output's error was 1.4x that of
// PyTorch's plain bf16 math, within the tests' 2x). Padded: q (B, sq, H, D), k and v (B, keys, HK, D)
// views; packed (p.cu_q set): q (total_q, H, D), k and v (total_k, HK, D).
bool aten_prefill_applies(at::ScalarType q, at::ScalarType k, const Problem& p, bool need_lse) {
  const bool exact = q == at::kFloat && k == at::kFloat;
  const bool sixteen = q == k && (q == at::kBFloat16 || q == at::kHalf);
  const bool window_without_causal = !p.causal && (p.window_left >= 0 || p.window_right >= 0);
  if (p.max_sq < 64 || p.softcap > 0.f || p.alibi != nullptr || window_without_causal ||
      !(exact || (sixteen && !need_lse))) {
    return false;
  }
  for (int b = 0; b < p.B; ++b) {
    const int sq = p.q_len(b), nk = p.kv_len(b);
    if (sq > 0 && nk < (p.causal ? sq : 1)) return false;
  }
  return true;
}

bool aten_prefill(const Tensor& q, const Tensor& k, const Tensor& v, const Problem& p, bool need_lse, Tensor& out,
                  Tensor& lse) {
  if (!aten_prefill_applies(q.scalar_type(), k.scalar_type(), p, need_lse)) return false;
  const bool packed = p.cu_q != nullptr;
  bool even = !packed;
  for (int b = 0; b < p.B; ++b) even = even && p.kv_len(b) == k.size(1);
  if (even) {
    const Tensor o = flash_rows(q, k, v, p, lse);
    if (o.is_contiguous() && o.scalar_type() == out.scalar_type()) {
      out = o;  // no copy
    } else {
      out.copy_(o);
    }
    return true;
  }
  for (int b = 0; b < p.B; ++b) {
    const int sq = p.q_len(b), nk = p.kv_len(b);
    if (sq == 0) continue;
    if (packed) {
      const int64_t q0 = p.cu_q[b], k0 = p.rows.cu[b];
      out.narrow(0, q0, sq).copy_(flash_rows(q.narrow(0, q0, sq).unsqueeze(0), k.narrow(0, k0, nk).unsqueeze(0),
                                             v.narrow(0, k0, nk).unsqueeze(0), p,
                                             lse.narrow(1, q0, sq).unsqueeze(0))[0]);
    } else {
      out.narrow(0, b, 1).copy_(flash_rows(q.narrow(0, b, 1), k.narrow(0, b, 1).narrow(1, 0, nk),
                                           v.narrow(0, b, 1).narrow(1, 0, nk), p, lse.narrow(0, b, 1)));
    }
  }
  return true;
}

// The rows of a paged cache (num_blocks, page, HK, D) gathered into a contiguous (B, longest, HK, D)
// copy, each row's own pages (the copy moves the keys and values once; the prefill's matmuls cost far
// more: Llama-3-8B heads, bf16, 512 queries over 4k keys in pages of 16 took 223 ms in this file's
// vector kernel against 47 over a contiguous cache, and 46 ms gathered; fp32 248 -> 170 ms).
Tensor gather_pages(const Tensor& cache, const Tensor& block_table, const Problem& p, int64_t longest) {
  const int64_t page = cache.size(1), pages = (longest + page - 1) / page;
  Tensor g = at::empty({p.B, pages, page, cache.size(2), cache.size(3)}, cache.options());
  for (int b = 0; b < p.B; ++b) {
    const int64_t own = (p.kv_len(b) + page - 1) / page;
    if (own == 0) continue;
    Tensor dst = g[b].narrow(0, 0, own);
    at::index_select_out(dst, cache, 0, block_table[b].narrow(0, 0, own));
  }
  return g.view({p.B, pages * page, cache.size(2), cache.size(3)}).narrow(1, 0, longest);
}

// fp8 rows (..., HK, D) as value * scale[head] in dtype, rounded once (ATen's fp8 conversion is
// scalar: at 4k keys it cost more than the attention).
Tensor widen_fp8(const Tensor& rows, const OptTensor& scale, at::ScalarType dtype) {
  const Tensor src = rows.contiguous();
  Tensor dst = at::empty(src.sizes(), src.options().dtype(dtype));
  const int64_t HK = src.size(-2), D = src.size(-1), heads = src.numel() / D;
  const float* sc = scale.has_value() ? scale->data_ptr<float>() : nullptr;
  const auto* in = reinterpret_cast<const uint8_t*>(src.data_ptr());
  constexpr int V = Vec::size();
  dispatch_float(dtype, "attention_with_kvcache", [&](auto tag) {
    using T = decltype(tag);
    T* out = dst.data_ptr<T>();
    at::parallel_for(0, heads, 256, [&](int64_t h0, int64_t h1) {
      for (int64_t r = h0; r < h1; ++r) {
        const float f = sc ? sc[r % HK] : 1.f;
        const uint8_t* a = in + r * D;
        T* o = out + r * D;
        int64_t j = 0;
        for (; j + V <= D; j += V) store_float(o + j, load_fp8(a + j) * Vec(f), V);
        for (; j < D; ++j) {
          o[j] = static_cast<T>(static_cast<float>(c10::Float8_e4m3fn(a[j], c10::Float8_e4m3fn::from_bits())) * f);
        }
      }
    });
  });
  return dst;
}

// The keys or values of a prefill chunk as PyTorch's flash attention takes them, (B, longest, HK, D): a
// contiguous cache's as a view, a paged one's gathered; an fp8 cache's widened with its per-head scale
// (exact for fp32 queries, rounded once for 16-bit ones, as a 16-bit model's keys are).
Tensor prefill_rows(const Tensor& cache, const OptTensor& block_table, const OptTensor& scale, const Problem& p,
                    int64_t longest, at::ScalarType dtype) {
  const Tensor t =
      block_table.has_value() ? gather_pages(cache, *block_table, p, longest) : cache.narrow(1, 0, longest);
  return cache.scalar_type() == c10::kFloat8_e4m3fn ? widen_fp8(t, scale, dtype) : t;
}

std::tuple<Tensor, Tensor> attention_with_kvcache(
    const Tensor& q, Tensor k_cache, Tensor v_cache, const OptTensor& k, const OptTensor& v,
    const OptTensor& cache_seqlens, int64_t seqlen_offset, const OptTensor& block_table, double softmax_scale,
    bool causal, int64_t window_left, int64_t window_right, double softcap, const OptTensor& alibi_slopes,
    const OptTensor& k_scale, const OptTensor& v_scale, bool need_lse) {
  const KvRows rows = cache_rows(k_cache, block_table);
  const int* seqlens = cache_seqlens.has_value() ? cache_seqlens->data_ptr<int>() : nullptr;
  if (k.has_value()) append(k_cache, v_cache, *k, *v, rows, seqlens, seqlen_offset, opt_ptr(k_scale), opt_ptr(v_scale));
  Tensor out = at::empty(q.sizes(), q.options());
  Tensor lse = at::empty({q.size(0), q.size(2), q.size(1)}, q.options().dtype(at::kFloat));
  Problem p{};
  p.B = q.size(0);
  p.max_sq = q.size(1);
  p.H = q.size(2);
  p.D = q.size(3);
  p.HK = k_cache.size(2);
  p.G = p.H / p.HK;
  set_q(p, q, out);
  p.lse = lse.data_ptr<float>();
  p.k = k_cache.data_ptr();
  p.v = v_cache.data_ptr();
  p.rows = rows;
  TORCH_CHECK(k_cache.strides() == v_cache.strides(), "attention_with_kvcache: k_cache and v_cache strides differ");
  p.seqlens = seqlens;
  p.seqlen_offset = seqlen_offset;
  p.seqlen_new = k.has_value() ? k->size(1) : 0;
  p.fixed_kv_len = -1;
  p.k_scale = opt_ptr(k_scale);
  p.v_scale = opt_ptr(v_scale);
  set_common(p, q, softmax_scale, causal, window_left, window_right, softcap, alibi_slopes);
  if (q.numel() == 0) return {out, lse};
  // A prefill chunk: the keys up to the longest row's (prefill_rows), where PyTorch's kernel applies.
  int64_t longest = 0;
  for (int b = 0; b < p.B; ++b) longest = std::max<int64_t>(longest, p.kv_len(b));
  const bool fp8 = k_cache.scalar_type() == c10::kFloat8_e4m3fn;
  // A copy (paged, fp8) of at most 1 GB; beyond it the vector kernel, which streams the cache.
  const bool copied = rows.mode == 1 || fp8;
  const int64_t copy_bytes = 2 * p.B * longest * p.HK * p.D * q.element_size();
  if ((rows.mode == 1 || longest <= k_cache.size(1)) && !(copied && copy_bytes > (int64_t(1) << 30)) &&
      aten_prefill_applies(q.scalar_type(), fp8 ? q.scalar_type() : k_cache.scalar_type(), p, need_lse) &&
      aten_prefill(q, prefill_rows(k_cache, block_table, k_scale, p, longest, q.scalar_type()),
                   prefill_rows(v_cache, block_table, v_scale, p, longest, q.scalar_type()), p, need_lse, out, lse)) {
    return {out, lse};
  }
  run(p, q.scalar_type(), k_cache.scalar_type());
  return {out, lse};
}

std::tuple<Tensor, Tensor> attention(const Tensor& q, const Tensor& k, const Tensor& v,
                                     const OptTensor& cu_seqlens_q, const OptTensor& cu_seqlens_k,
                                     int64_t max_seqlen_q, int64_t max_seqlen_k, double softmax_scale, bool causal,
                                     int64_t window_left, int64_t window_right, double softcap,
                                     const OptTensor& alibi_slopes, bool need_lse) {
  const bool packed = cu_seqlens_q.has_value();
  Tensor out = at::empty(q.sizes(), q.options());
  Problem p{};
  p.D = q.size(-1);
  p.H = q.size(-2);
  p.HK = k.size(-2);
  p.G = p.H / p.HK;
  p.max_sq = max_seqlen_q;
  set_q(p, q, out);
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  Tensor lse;
  if (packed) {
    p.B = cu_seqlens_q->size(0) - 1;
    p.cu_q = cu_seqlens_q->data_ptr<int>();
    p.total_q = q.size(0);
    lse = at::empty({q.size(1), q.size(0)}, q.options().dtype(at::kFloat));
    p.rows.mode = 2;
    p.rows.cu = cu_seqlens_k->data_ptr<int>();
    p.rows.s1 = k.stride(0);
    p.rows.s2 = k.stride(1);
    p.fixed_kv_len = -1;
  } else {
    p.B = q.size(0);
    lse = at::empty({q.size(0), q.size(2), q.size(1)}, q.options().dtype(at::kFloat));
    p.rows.mode = 0;
    p.rows.s0 = k.stride(0);
    p.rows.s1 = k.stride(1);
    p.rows.s2 = k.stride(2);
    p.fixed_kv_len = max_seqlen_k;
  }
  p.lse = lse.data_ptr<float>();
  set_common(p, q, softmax_scale, causal, window_left, window_right, softcap, alibi_slopes);
  if (q.numel() == 0 || p.B == 0) return {out, lse};
  if (lanes_head_dim(p.D)) {
    // From headdim 48 on, over 256 keys or more, PyTorch's GEMM tiles are as fast (both FMA-bound): fp32 goes
    // there. At 32-40 the two were within 2% on the Xeon, and on an AMD EPYC (where PyTorch's GEMMs are MKL's
    // slow path) this kernel took 0.73-0.88x PyTorch's time (2 x 8 heads, headdim 40, 4096 x 4096: 304 against
    // 353 ms); at 48 they were level (1024 keys) or this one ahead (2048: 82 against 90 ms), at 56 0.95x.
    if (!packed && p.D >= 48 && max_seqlen_k >= 256 && aten_prefill(q, k, v, p, need_lse, out, lse)) {
      return {out, lse};
    }
    run_lanes(p, q.scalar_type());
    return {out, lse};
  }
  // Also cross-attention (no causal mask, other key counts): at headdim 64, 1024 queries x 77 keys, fp32,
  // PyTorch's kernel took 2.1 ms and this file's vector kernel 3.2 ms.
  if (aten_prefill(q, k, v, p, need_lse, out, lse)) {
    return {out, lse};
  }
  run(p, q.scalar_type(), k.scalar_type());
  return {out, lse};
}

// x (batch, seqlen, heads, headdim) as the kernels take it next to this cache: a dense CPU tensor in
// fp32/fp16/bf16, its headdim contiguous and the cache's, the cache in its dtype or fp8.
bool fits_cache(const Tensor& x, const Tensor& cache, int64_t batch) {
  if (x.layout() != at::kStrided || !x.device().is_cpu() || x.dim() != 4) return false;
  const auto t = x.scalar_type();
  return (t == at::kFloat || t == at::kHalf || t == at::kBFloat16) &&
         (cache.scalar_type() == t || cache.scalar_type() == c10::kFloat8_e4m3fn) && x.size(0) == batch &&
         x.size(3) == cache.size(3) && x.stride(3) == 1;
}

}  // namespace

// ---- KVCache's decode step, bound directly (csrc/ops.cpp) --------------------------------------
// A KVCache owns its caches, lengths, block table and scales, valid by construction; a step hands it
// only q, k and v. These two check those here and run the kernels, and decline (-1, nullopt) anything
// they do not take as is, which the caller then sends through the op and Python's checks (and their
// error messages). q, k and v may be strided views (a fused QKV projection's), headdim contiguous.

int64_t kvcache_append_plain(const Tensor& k_cache, const Tensor& v_cache, const Tensor& k, const Tensor& v,
                             const Tensor& seqlens, const OptTensor& block_table, const OptTensor& k_scale,
                             const OptTensor& v_scale, int64_t room, int64_t pending) {
  const int64_t batch = seqlens.size(0);
  if (!fits_cache(k, k_cache, batch) || !fits_cache(v, v_cache, batch) || v.sizes() != k.sizes() ||
      v.scalar_type() != k.scalar_type() || k.size(2) != k_cache.size(2) || k.size(1) > room ||
      (pending != 0 && k.size(1) != pending)) {
    return -1;
  }
  append(k_cache, v_cache, k, v, cache_rows(k_cache, block_table), seqlens.data_ptr<int>(), 0, opt_ptr(k_scale),
         opt_ptr(v_scale));
  return k.size(1);
}

std::optional<Tensor> attention_with_kvcache_plain(const Tensor& q, const Tensor& k_cache, const Tensor& v_cache,
                                                   const Tensor& seqlens, int64_t seqlen_offset,
                                                   const OptTensor& block_table, double softmax_scale, bool causal,
                                                   int64_t window_left, int64_t window_right, double softcap,
                                                   const OptTensor& k_scale, const OptTensor& v_scale) {
  const int64_t D = q.dim() == 4 ? q.size(3) : 0, HK = k_cache.size(2);
  if (!fits_cache(q, k_cache, seqlens.size(0)) || q.size(2) % HK != 0 || q.size(2) / HK > kMaxRows ||
      !(D == 64 || D == 80 || D == 96 || D == 128 || D == 256)) {
    return std::nullopt;
  }
  return std::get<0>(attention_with_kvcache(q, k_cache, v_cache, std::nullopt, std::nullopt, seqlens, seqlen_offset,
                                            block_table, softmax_scale, causal, window_left, window_right, softcap,
                                            std::nullopt, k_scale, v_scale, false));
}

TORCH_LIBRARY_FRAGMENT(genfast_cpu, m) {
  m.def("attention_with_kvcache", &attention_with_kvcache);
  m.def("kvcache_append_", &kvcache_append_);
  m.def("attention", &attention);
}

}  // namespace genfast::cpu
