"""Attention over a KV cache (flash-decoding) and packed prefill attention in Triton.

Memory traffic of one decode step (seqlen_q = 1) for a row with L cached
tokens, nheads_k KV heads of headdim d in s-byte elements, GQA group G:

| implementation | bytes read |
| --- | --- |
| eager with the KV heads expanded (``repeat_interleave``) | 2·L·nheads_k·d·s, + G× that written and read |
| gpt-fast eager step (mask over the whole max length) | 2·max_len·nheads_k·d·s (+ the expansion), whatever L is |
| this file | 2·L·nheads_k·d·s: each K/V row once for all G query heads of its group |

Kernels:

- ``_append_kernel``: writes the new k/v rows at ``cache_seqlens[b] + i``
  (quantized with the per-head scale for an fp8 cache); only those rows.
- ``_attention_kernel``: one program per (batch row · KV head, split, query
  chunk). Its tile holds the query rows of all G heads of the KV head (G ×
  query positions, padded to >= 16 for ``tl.dot``), so K/V are loaded once
  per group. Keys stream in BLOCK_N rows through an online softmax in fp32
  (exp2 domain). Paged caches look the page of each key up in ``block_table``
  (any page size: a runtime divisor). The number of splits is a function of
  the shapes only (batch, heads, capacity, SM count): the grid is fixed, the
  lengths are read on the device, so the launch is CUDA-graph safe and
  deterministic for a given shape. Each split covers an equal share of its
  row's blocks; with more than one split, partial (out, lse) go to a
  workspace and ``_combine_kernel`` merges them.
- ``_prefill_kernel``: long queries (``attention``, and ``attention_with_kvcache``
  on any cache: contiguous or paged, in the query's dtype or fp8) when
  ``_use_prefill`` says so from the shapes: ``PREFILL_MIN_SEQLEN_Q`` or more
  queries, and either enough programs for the SMs or at most 8 keys per query
  (else the shared kernel, whose split-KV fills the GPU for a short chunk over
  a long cache).

Prefill is bound by the tensor cores (4·sq·sk·H·d flops, halved by a causal
mask), not by bytes. What ``_prefill_kernel`` does that the shared kernel did
not, each a FlashAttention-2 practice:

- tile = 128 query rows of one head, 8 warps, 3 stages of K/V in flight (64
  rows and 4 warps when few tiles per SM: ``prefill_config``); the shared
  kernel's tile packs G heads x 16 positions (64 rows, 32-key blocks, 4
  warps): small MMAs, and its diagonal spans every block;
- the key loop in three runs of aligned blocks: masked blocks at a left window
  edge, blocks every row of the tile sees in full (no mask, no bounds check on
  the loads, no -inf guard in the softmax), then masked blocks on the causal
  diagonal / right window edge / last partial block. At 128 x 64 tiles a
  causal 8k tile has 2 masked blocks among up to 128; the shared kernel
  masked every element of every block;
- log2(e) folded into the scale (and into softcap's and ALiBi's constants):
  one multiply per score, then exp2;
- 64-bit offsets once per program, 32-bit tile offsets and a pointer step per
  block; no paged/varlen index arithmetic in the loop (packed sequences only
  move the base) unless the cache is paged (below);
- grid (batch·heads, query blocks) with the blocks numbered from the last:
  the longest causal tiles start first and the short ones fill the tail, and
  the heads of one KV group run side by side (their K/V reads hit L2).

Kept as FA2 does: the accumulator rescaled on every block (cheap next to two
MMAs), one head per tile (GQA's K/V re-reads come from L2).

Paged and fp8 caches (chunked prefill in a paged-KV server) take the same
kernel body, switched by the constexprs PAGED and FP8, so the contiguous
same-dtype specialization compiles to the code it had before:

- PAGED: each key block gathers its rows by position -> (page, slot): BLOCK_N
  int32 loads from the row's ``block_table`` (L1/L2-resident) and a division
  by the runtime page size, then 64-bit row offsets; next to the block's two
  128 x 64 x d MMAs this is a few instructions per key. Any page size works: a
  page smaller than BLOCK_N puts several pages in one block, a larger one
  (or ``cache_batch_idx``'s one page per row) several blocks in one page. The
  block runs (masked/full/masked) are those of the contiguous cache. In the
  sm_90 PTX, Triton's pipeliner puts the block-table loads in the first stage
  and so keeps the gathered K/V one block ahead (16-byte cp.async, as
  contiguous), not two as for a contiguous cache; if the GPU rows show paged
  behind contiguous, that is the first suspect.
- FP8 (e4m3 k/v, per-KV-head scales, stored value * scale = key/value): the
  tiles load half the bytes and are widened to the query's dtype (exact) for
  the MMAs; K's scale multiplies the score scale (so also softcap's
  constants), V's the output's 1/l, as in the shared kernel.

Measured on an H200 (2026-11-27, causal bf16, Llama-3-8B heads, b1): 2k 0.155 ms
with 128 x 64 tiles (SDPA 0.086), 0.087 with 64 x 64 and 4 warps; 8k 1.191
ms, 1.130 with 128 x 128 tiles (SDPA 1.019). ``prefill_config`` now picks the
tile by the number of 128-row programs per SM (a later run: 2k 0.083 ms, 8k
1.150, SDPA 0.079 and 0.884). Chunked prefill over pages of 16 took 0.389 ms
against 0.235 for the same tokens in a contiguous cache; with the page walk a
shift and a mask (``_page_slot``), 0.289 against 0.210.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .common import cdiv, next_pow2, num_sms

# constexpr: compiled kernels may read no other globals (the interpreter does not enforce it)
LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)
FP8_MAX = tl.constexpr(448.0)


def _block_d(headdim: int) -> int:
    """Tile width over the headdim: a power of two, at least 16 (tl.dot's smallest inner size on a GPU);
    the columns past headdim are masked."""
    return max(16, next_pow2(headdim))


@triton.jit
def _round_e4m3(x):
    """x (fp32, within +-448) rounded to the nearest float8_e4m3fn value, ties to even, still in fp32.

    The conversion to fp8 is then exact: Triton's interpreter rounds fp8 wrongly across a binade
    (1.98 -> 1.0), and this keeps the stored bits equal to torch's ``.to(torch.float8_e4m3fn)``
    everywhere."""
    bits = x.to(tl.int32, bitcast=True)
    normal = ((bits + 0x7FFFF + ((bits >> 20) & 1)) & -1048576).to(tl.float32, bitcast=True)  # 3 mantissa bits
    magic = 12582912.0 * 0.001953125  # 1.5 * 2^23 * 2^-9: fp32 addition rounds to multiples of 2^-9
    sub = (tl.abs(x) + magic) - magic
    # x's sign bit on the rounded magnitude: a GPU compiles -sub as 0 - sub, which makes -0 of +0
    # (the H200 stored 0x00 where PyTorch stores 0x80 for tiny negative values)
    sub = (sub.to(tl.int32, bitcast=True) | (bits & -2147483648)).to(tl.float32, bitcast=True)
    return tl.where(tl.abs(x) < 0.015625, sub, normal)  # below 2^-6: e4m3 subnormals


@triton.jit
def _page_slot(pos, page_size, page_shift, PAGE_POW2: tl.constexpr):
    """(page index in the row's block table, slot in the page) of key positions: a shift and a mask
    when the page size is a power of two (PAGE_POW2, page_shift its log2: vLLM's 16), else a division.
    A GPU has no integer divider: the sm_90 PTX of the paged prefill kernel held 37 divisions and 36
    remainders by the runtime page size (none with PAGE_POW2), and it ran 1.76x the contiguous
    cache's time on an H200 (2k queries after 2k cached keys, pages of 16); with PAGE_POW2, 1.38x
    (289 against 210 us)."""
    if PAGE_POW2:
        page = pos >> page_shift
        slot = pos & (page_size - 1)
    else:
        page = pos // page_size
        slot = pos % page_size
    return page, slot


@triton.jit
def _visible(pos, L, window_left, window_right, CAUSAL: tl.constexpr):
    """The keys [lo, hi) of L that a query at position pos sees (pos a scalar or a tensor)."""
    if CAUSAL:
        hi = tl.minimum(pos + 1, L)
    else:
        hi = tl.where(window_right >= 0, tl.minimum(pos + window_right + 1, L), L)
    lo = tl.where(window_left >= 0, tl.maximum(pos - window_left, 0), 0)
    return lo, hi


@triton.jit
def _append_kernel(k_ptr, v_ptr, kc_ptr, vc_ptr, seqlens_ptr, seqlen_offset, bt_ptr, blocks_per_seq, page_size,
                   page_shift, s0, s1, s2, k_scale_ptr, v_scale_ptr, seqlen_new, capacity, num_blocks,
                   HK: tl.constexpr, D: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
                   HAS_SEQLENS: tl.constexpr, PAGED: tl.constexpr, PAGE_POW2: tl.constexpr, FP8: tl.constexpr):
    pid = tl.program_id(0)
    b = pid // seqlen_new
    i = pid % seqlen_new
    pos = seqlen_offset + i
    if HAS_SEQLENS:
        pos += tl.load(seqlens_ptr + b)
    h = tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_D)
    # Scalars broadcast to the tile before combining: the interpreter mistypes bool tensor & bool scalar.
    zero = tl.zeros([BLOCK_H, BLOCK_D], tl.int32)
    ok = (zero + pos) < capacity
    if PAGED:
        pg, slot = _page_slot(pos, page_size, page_shift, PAGE_POW2)
        page = tl.load(bt_ptr + b * blocks_per_seq + pg, mask=pos < capacity, other=0)
        row = page.to(tl.int64) * s0 + slot.to(tl.int64) * s1
        ok = ok & ((zero + page) >= 0) & ((zero + page) < num_blocks)  # a GPU cannot check on the host
    else:
        row = b.to(tl.int64) * s0 + pos.to(tl.int64) * s1
    mask = ok & (h[:, None] < HK) & (d[None, :] < D)
    src = pid.to(tl.int64) * HK * D + h[:, None] * D + d[None, :]
    dst = row + h[:, None].to(tl.int64) * s2 + d[None, :]
    k = tl.load(k_ptr + src, mask=mask, other=0.0)
    v = tl.load(v_ptr + src, mask=mask, other=0.0)
    if FP8:
        # fp8 has no inf: saturate instead of overflowing to NaN. div_rn: IEEE division as
        # PyTorch's (a GPU's "/" is approximate, which moves values across fp8 rounding ties).
        ks = tl.load(k_scale_ptr + h, mask=h < HK, other=1.0)
        vs = tl.load(v_scale_ptr + h, mask=h < HK, other=1.0)
        k = _round_e4m3(tl.clamp(tl.math.div_rn(k.to(tl.float32), ks[:, None] + zero), -FP8_MAX, FP8_MAX))
        v = _round_e4m3(tl.clamp(tl.math.div_rn(v.to(tl.float32), vs[:, None] + zero), -FP8_MAX, FP8_MAX))
    tl.store(kc_ptr + dst, k.to(kc_ptr.dtype.element_ty), mask=mask)
    tl.store(vc_ptr + dst, v.to(vc_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _attention_kernel(q_ptr, kc_ptr, vc_ptr, out_ptr, lse_ptr, seqlens_ptr, seqlen_offset, seqlen_new,
                      bt_ptr, blocks_per_seq, page_size, page_shift, cu_q_ptr, cu_k_ptr, s0, s1, s2,
                      max_sq, total_q, B, H, softmax_scale, softcap, window_left, window_right,
                      alibi_ptr, alibi_bstride, k_scale_ptr, v_scale_ptr, part_out_ptr, part_lse_ptr,
                      HK: tl.constexpr, G: tl.constexpr, D: tl.constexpr, QL: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                      NUM_SPLITS: tl.constexpr, KV_MODE: tl.constexpr, HAS_SEQLENS: tl.constexpr,
                      VARLEN_Q: tl.constexpr, CAUSAL: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                      HAS_ALIBI: tl.constexpr, FP8: tl.constexpr, IEEE: tl.constexpr, F16_MMA: tl.constexpr,
                      PAGE_POW2: tl.constexpr):
    pid_bh = tl.program_id(0)
    split = tl.program_id(1)
    qc = tl.program_id(2)
    b = pid_bh // HK
    hk = pid_bh % HK
    # Row lengths, read on the device.
    if VARLEN_Q:
        q_start = tl.load(cu_q_ptr + b)
        sq = tl.load(cu_q_ptr + b + 1) - q_start
    else:
        q_start = b * max_sq
        sq = max_sq
    if KV_MODE == 2:
        k_start = tl.load(cu_k_ptr + b)
        L = tl.load(cu_k_ptr + b + 1) - k_start
    else:
        k_start = 0
        L = seqlen_offset + seqlen_new
        if HAS_SEQLENS:
            L += tl.load(seqlens_ptr + b)
    i0 = qc * QL
    if i0 < sq:
        # Tile rows: r = (query position - i0) * G + head within the group.
        r = tl.arange(0, BLOCK_M)
        qi = i0 + r // G
        h = hk * G + r % G
        row_ok = (r < QL * G) & (qi < sq)
        d = tl.arange(0, BLOCK_D)
        dmask = d < D
        q_rows = (q_start + qi).to(tl.int64) * H + h
        q = tl.load(q_ptr + q_rows[:, None] * D + d[None, :], mask=row_ok[:, None] & dmask[None, :], other=0.0)
        q_unscale = 1.0
        if F16_MMA:
            # An fp8 cache meets a 16-bit query in fp16: e4m3 -> fp16 is one instruction per pair on
            # sm_90, to bf16 it goes on through fp16 (three). On an H200 (2026-11-27, b8 x 16k,
            # Llama-3-8B heads) the kernel took 82.7 us against 122.4 in bf16 (a bf16 cache: 139.5).
            # A power of two 2^-e brings the tile's largest |q| into [2^14, 2^15], exactly undone in
            # the score scale: no bf16 query overflows fp16, and a small one keeps fp16's precision.
            # 2^-e is built from its exponent bits: the GPU's exp2 and division are approximate, a bit
            # pattern is exact (-100 <= e <= 113: both 2^e and 2^-e are normal floats).
            amax = tl.max(tl.max(tl.abs(q.to(tl.float32)), 1), 0)
            e = tl.minimum(tl.maximum(tl.ceil(tl.log2(tl.maximum(amax, 1e-30))) - 15.0, -100.0), 113.0).to(tl.int32)
            q_unscale = ((e + 127) << 23).to(tl.float32, bitcast=True)
            q = (q.to(tl.float32) * ((127 - e) << 23).to(tl.float32, bitcast=True)).to(tl.float16)
        # Visible keys of each row: [row_lo, row_hi); query i sits at position L - sq + i.
        qpos = L - sq + qi
        row_lo, row_hi = _visible(qpos, L, window_left, window_right, CAUSAL)
        # The chunk's key range, then this split's equal share of its blocks.
        first = L - sq + i0
        last = tl.minimum(first + QL - 1, L - 1)
        lo, _ = _visible(first, L, window_left, window_right, CAUSAL)
        _, hi = _visible(last, L, window_left, window_right, CAUSAL)
        hi = tl.maximum(hi, lo)
        per = tl.cdiv(tl.cdiv(hi - lo, BLOCK_N), NUM_SPLITS) * BLOCK_N
        start = lo + split * per
        end = tl.minimum(hi, start + per)

        qk_scale = softmax_scale * q_unscale
        if FP8:
            qk_scale = qk_scale * tl.load(k_scale_ptr + hk)
        if HAS_ALIBI:
            slope = tl.load(alibi_ptr + b * alibi_bstride + h, mask=row_ok, other=0.0)
        m = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        for n0 in range(start, end, BLOCK_N):
            pos = n0 + tl.arange(0, BLOCK_N)
            n_ok = pos < end
            if KV_MODE == 1:
                pg, slot = _page_slot(pos, page_size, page_shift, PAGE_POW2)
                page = tl.load(bt_ptr + b * blocks_per_seq + pg, mask=n_ok, other=0)
                rows = page.to(tl.int64) * s0 + slot.to(tl.int64) * s1
            elif KV_MODE == 2:
                rows = (k_start + pos).to(tl.int64) * s1
            else:
                rows = b.to(tl.int64) * s0 + pos.to(tl.int64) * s1
            offs = rows[:, None] + hk * s2 + d[None, :]
            kv_mask = n_ok[:, None] & dmask[None, :]
            k = tl.load(kc_ptr + offs, mask=kv_mask, other=0.0)
            v = tl.load(vc_ptr + offs, mask=kv_mask, other=0.0)
            if FP8:  # e4m3 is exact in fp16/bf16; the scales are applied to scores and output
                k = k.to(q.dtype)
                v = v.to(q.dtype)
            if IEEE:
                s = tl.dot(q, tl.trans(k), input_precision="ieee")
            else:
                s = tl.dot(q, tl.trans(k))
            s = s * qk_scale
            if HAS_SOFTCAP:
                # tanh(x) = 1 - 2 / (exp(2x) + 1), stable at both ends
                s = softcap * (1.0 - 2.0 / (tl.exp(2.0 * s / softcap) + 1.0))
            if HAS_ALIBI:
                s = s - slope[:, None] * tl.abs(qpos[:, None] - pos[None, :]).to(tl.float32)
            ok = row_ok[:, None] & n_ok[None, :] & (pos[None, :] >= row_lo[:, None]) & (pos[None, :] < row_hi[:, None])
            s = tl.where(ok, s * LOG2E, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with no key yet: keep -inf - -inf out
            p = tl.exp2(s - m_safe[:, None])
            alpha = tl.exp2(m - m_safe)
            l = l * alpha + tl.sum(p, 1)
            if IEEE:
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
            else:
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m = m_new
        v_factor = 1.0
        if FP8:
            v_factor = tl.load(v_scale_ptr + hk)
        has = l > 0.0
        out = acc * tl.where(has, v_factor / tl.where(has, l, 1.0), 0.0)[:, None]
        lse = tl.where(has, (m + tl.log2(tl.where(has, l, 1.0))) * LN2, float("-inf"))
        out_rows = (q_start + qi).to(tl.int64) * H + h
        if VARLEN_Q:
            lse_idx = h.to(tl.int64) * total_q + q_start + qi
        else:
            lse_idx = (b * H + h).to(tl.int64) * max_sq + qi
        omask = row_ok[:, None] & dmask[None, :]
        if NUM_SPLITS == 1:
            tl.store(out_ptr + out_rows[:, None] * D + d[None, :], out.to(out_ptr.dtype.element_ty), mask=omask)
            tl.store(lse_ptr + lse_idx, lse, mask=row_ok)
        else:
            n_out = total_q * H * D
            n_lse = total_q * H
            tl.store(part_out_ptr + split * n_out + out_rows[:, None] * D + d[None, :], out, mask=omask)
            tl.store(part_lse_ptr + split * n_lse + lse_idx, lse, mask=row_ok)


@triton.jit
def _prefill_block(acc, m, l, q, kb, vb, kv_offs, n0, L, qpos, row_lo, row_hi, slope2, qk_scale2, cap_in,
                   cap_out, dmask, bt_row_ptr, page_size, page_shift, s_page, s_slot, BLOCK_N: tl.constexpr,
                   EVEN_D: tl.constexpr, MASKED: tl.constexpr, PAGED: tl.constexpr, PAGE_POW2: tl.constexpr,
                   FP8: tl.constexpr,
                   HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, IEEE: tl.constexpr):
    """One BLOCK_N-key step of the online softmax; scores in log2 units. MASKED: the block holds keys that
    some row must not see (causal diagonal, window edges, the end of the keys); else every row sees all.
    kv_offs: the tile's offsets from kb/vb, or with PAGED only the columns (1, BLOCK_D), the rows gathered here."""
    pos = n0 + tl.arange(0, BLOCK_N)
    if PAGED:
        # Each key row through the block table (position -> (page, slot)): with pages shorter than
        # BLOCK_N a block spans several pages, with longer ones a page holds several blocks.
        pg, slot = _page_slot(pos, page_size, page_shift, PAGE_POW2)
        if MASKED:
            page = tl.load(bt_row_ptr + pg, mask=pos < L, other=0)
        else:
            page = tl.load(bt_row_ptr + pg)
        offs = (page.to(tl.int64) * s_page + slot.to(tl.int64) * s_slot)[:, None] + kv_offs
    else:
        offs = kv_offs
    if MASKED:
        ld = (pos < L)[:, None]
        if not EVEN_D:
            ld = ld & dmask[None, :]
        k = tl.load(kb + offs, mask=ld, other=0.0)
        v = tl.load(vb + offs, mask=ld, other=0.0)
    elif EVEN_D:
        k = tl.load(kb + offs)
        v = tl.load(vb + offs)
    else:
        k = tl.load(kb + offs, mask=dmask[None, :], other=0.0)
        v = tl.load(vb + offs, mask=dmask[None, :], other=0.0)
    if FP8:  # e4m3 is exact in fp16/bf16/fp32: widened for the MMA, its scales folded into qk_scale2 and the output
        k = k.to(q.dtype)
        v = v.to(q.dtype)
    if IEEE:
        s = tl.dot(q, tl.trans(k), input_precision="ieee")
    else:
        s = tl.dot(q, tl.trans(k))
    if HAS_SOFTCAP:
        # softcap·tanh(x/softcap) in log2 units, tanh(y) = 1 - 2 / (exp(2y) + 1): stable at both ends
        s = cap_out * (1.0 - 2.0 / (tl.exp2(s * cap_in) + 1.0))
    else:
        s = s * qk_scale2
    if HAS_ALIBI:
        s = s - slope2[:, None] * tl.abs(qpos[:, None] - pos[None, :]).to(tl.float32)
    if MASKED:
        ok = (pos[None, :] >= row_lo[:, None]) & (pos[None, :] < row_hi[:, None])
        s = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with no key yet: keep -inf - -inf out
    else:
        m_new = tl.maximum(m, tl.max(s, 1))  # every row sees this block's keys: finite
        m_use = m_new
    p = tl.exp2(s - m_use[:, None])
    alpha = tl.exp2(m - m_use)
    l = l * alpha + tl.sum(p, 1)
    if IEEE:
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
    else:
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return acc, m_new, l


@triton.jit
def _prefill_kernel(q_ptr, k_ptr, v_ptr, out_ptr, lse_ptr, seqlens_ptr, seqlen_offset, cu_q_ptr, cu_k_ptr,
                    bt_ptr, blocks_per_seq, page_size, page_shift, sk_b, sk_n, sk_h, max_sq, total_q, H,
                    softmax_scale, softcap, window_left, window_right, alibi_ptr, alibi_bstride, k_scale_ptr,
                    v_scale_ptr,
                    G: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr, VARLEN: tl.constexpr, HAS_SEQLENS: tl.constexpr,
                    PAGED: tl.constexpr, PAGE_POW2: tl.constexpr, FP8: tl.constexpr, CAUSAL: tl.constexpr,
                    HAS_SOFTCAP: tl.constexpr,
                    HAS_ALIBI: tl.constexpr, IEEE: tl.constexpr):
    """PAGED: k/v are (num_blocks, page_size, nheads_k, d) pages, sk_b the page stride, read through bt_ptr
    (batch, blocks_per_seq). FP8: e4m3 k/v with per-KV-head dequantization scales."""
    pid_bh = tl.program_id(0)
    # Longest first: grid axis 1 runs over query blocks from the last (the most keys under a causal mask)
    # to the first, and all heads of one block are neighbours, so the short blocks fill the tail.
    mb = tl.num_programs(1) - 1 - tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    hk = h // G
    if VARLEN:
        q_start = tl.load(cu_q_ptr + b)
        sq = tl.load(cu_q_ptr + b + 1) - q_start
        k_start = tl.load(cu_k_ptr + b)
        L = tl.load(cu_k_ptr + b + 1) - k_start
    else:
        q_start = b * max_sq
        sq = max_sq
        k_start = 0
        L = seqlen_offset
        if HAS_SEQLENS:
            L += tl.load(seqlens_ptr + b)
    i0 = mb * BLOCK_M
    if i0 < sq:
        r = tl.arange(0, BLOCK_M)
        d = tl.arange(0, BLOCK_D)
        dmask = d < D
        qi = i0 + r
        row_ok = qi < sq
        # 64-bit bases once per program; the tile offsets inside stay 32-bit
        q_off = (q_start + i0).to(tl.int64) * H * D + h * D
        qo_offs = r[:, None] * (H * D) + d[None, :]
        q = tl.load(q_ptr + q_off + qo_offs, mask=row_ok[:, None] & dmask[None, :], other=0.0)
        if PAGED:  # bases at the head; _prefill_block gathers each block's rows
            kv_off = hk.to(tl.int64) * sk_h
            kv_offs = d[None, :]
        else:
            kv_off = b.to(tl.int64) * sk_b + k_start.to(tl.int64) * sk_n + hk.to(tl.int64) * sk_h
            kv_offs = tl.arange(0, BLOCK_N)[:, None] * sk_n + d[None, :]
        bt_row_ptr = bt_ptr + b * blocks_per_seq

        # Visible keys of row i: [row_lo, row_hi); query i sits at position L - sq + i.
        qpos = L - sq + qi
        row_lo, row_hi = _visible(qpos, L, window_left, window_right, CAUSAL)
        # The tile's key range [lo, hi) (of its first and last valid rows), and inside it the keys that
        # every valid row sees, [full_lo, full_hi): those blocks run without masks.
        first = L - sq + i0
        last = L - sq + tl.minimum(i0 + BLOCK_M, sq) - 1
        lo, full_hi = _visible(first, L, window_left, window_right, CAUSAL)
        full_lo, hi = _visible(last, L, window_left, window_right, CAUSAL)
        lo = lo // BLOCK_N * BLOCK_N  # blocks aligned to BLOCK_N rows
        f_lo = tl.maximum(lo, tl.cdiv(full_lo, BLOCK_N) * BLOCK_N)
        f_hi = tl.maximum(f_lo, full_hi // BLOCK_N * BLOCK_N)

        v_factor = 1.0
        if FP8:  # stored value * scale = key/value: K's scale multiplies the scores, V's the output
            softmax_scale = softmax_scale * tl.load(k_scale_ptr + hk)
            v_factor = tl.load(v_scale_ptr + hk)
        qk_scale2 = softmax_scale * LOG2E
        cap_in = 0.0
        cap_out = 0.0
        if HAS_SOFTCAP:
            cap_in = 2.0 * softmax_scale * LOG2E / softcap
            cap_out = softcap * LOG2E
        slope2 = tl.zeros([BLOCK_M], tl.float32)
        if HAS_ALIBI:
            slope2 = tl.load(alibi_ptr + b * alibi_bstride + h) * LOG2E + slope2
        m = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        # Masked blocks before the full ones (a left window edge), the full blocks, then masked ones after
        # (the causal diagonal, a right window edge, the last partial block).
        # The three loops walk one run of aligned blocks: lo, ..., f_lo, ..., f_hi, ..., hi.
        if PAGED:
            kb = k_ptr + kv_off
            vb = v_ptr + kv_off
        else:
            kb = k_ptr + (kv_off + lo.to(tl.int64) * sk_n)
            vb = v_ptr + (kv_off + lo.to(tl.int64) * sk_n)
        step = BLOCK_N * sk_n
        for part in tl.static_range(3):  # unrolled: each run is its own loop, MASKED a constant
            if part == 0:
                start, stop = lo, tl.minimum(f_lo, hi)
            elif part == 1:
                start, stop = f_lo, f_hi
            else:
                start, stop = f_hi, hi
            for n0 in range(start, stop, BLOCK_N):
                acc, m, l = _prefill_block(acc, m, l, q, kb, vb, kv_offs, n0, L, qpos, row_lo, row_hi, slope2,
                                           qk_scale2, cap_in, cap_out, dmask, bt_row_ptr, page_size, page_shift,
                                           sk_b, sk_n, BLOCK_N, EVEN_D, part != 1, PAGED, PAGE_POW2, FP8,
                                           HAS_SOFTCAP, HAS_ALIBI, IEEE)
                if not PAGED:
                    kb += step
                    vb += step
        has = l > 0.0
        out = acc * tl.where(has, v_factor / tl.where(has, l, 1.0), 0.0)[:, None]
        lse = tl.where(has, (m + tl.log2(tl.where(has, l, 1.0))) * LN2, float("-inf"))
        tl.store(out_ptr + q_off + qo_offs, out.to(out_ptr.dtype.element_ty),
                 mask=row_ok[:, None] & dmask[None, :])
        if VARLEN:
            lse_idx = h.to(tl.int64) * total_q + q_start + qi
        else:
            lse_idx = (b * H + h).to(tl.int64) * max_sq + qi
        tl.store(lse_ptr + lse_idx, lse, mask=row_ok)


@triton.jit
def _combine_kernel(part_out_ptr, part_lse_ptr, out_ptr, lse_ptr, total_q, H, max_sq,
                    D: tl.constexpr, BLOCK_D: tl.constexpr, NUM_SPLITS: tl.constexpr, VARLEN_Q: tl.constexpr):
    """One program per (query row, head): merges the splits' (out, lse) by their weights exp(lse_s - lse)."""
    pid = tl.program_id(0)
    row = pid // H  # index into (total rows) of q
    h = pid % H
    if VARLEN_Q:
        lse_idx = h.to(tl.int64) * total_q + row
    else:
        b = row // max_sq
        lse_idx = (b * H + h).to(tl.int64) * max_sq + row % max_sq
    sp = tl.arange(0, NUM_SPLITS)
    n_lse = total_q * H
    lses = tl.load(part_lse_ptr + sp * n_lse + lse_idx)
    mx = tl.max(lses, 0)
    mx_safe = tl.where(mx == float("-inf"), 0.0, mx)
    w = tl.exp(lses - mx_safe)
    total = tl.sum(w, 0)
    d = tl.arange(0, BLOCK_D)
    n_out = total_q * H * D
    parts = tl.load(part_out_ptr + sp[:, None] * n_out + (row.to(tl.int64) * H + h) * D + d[None, :],
                    mask=(d < D)[None, :] & (w > 0)[:, None], other=0.0)
    out = tl.sum(parts * w[:, None], 0) / tl.where(total > 0, total, 1.0)
    tl.store(out_ptr + (row.to(tl.int64) * H + h) * D + d, out.to(out_ptr.dtype.element_ty), mask=d < D)
    tl.store(lse_ptr + lse_idx, tl.where(total > 0, mx + tl.log(tl.where(total > 0, total, 1.0)), float("-inf")))


# ---- launchers (argument order = the op schemas in genfast/attention.py) ---------

def _shift(page_size: int) -> int:
    """log2 of a power-of-two page size, else -1 (``_page_slot``)."""
    return page_size.bit_length() - 1 if page_size > 0 and page_size & (page_size - 1) == 0 else -1


def _append(k_cache, v_cache, k, v, cache_seqlens, seqlen_offset, block_table, k_scale, v_scale):
    batch, seqlen_new, hk, d = k.shape
    if batch * seqlen_new == 0:
        return
    paged = block_table is not None
    capacity = block_table.shape[1] * k_cache.shape[1] if paged else k_cache.shape[1]
    fp8 = k_cache.dtype == torch.float8_e4m3fn
    shift = _shift(k_cache.shape[1]) if paged else -1
    _append_kernel[(batch * seqlen_new,)](
        k, v, k_cache, v_cache, cache_seqlens if cache_seqlens is not None else k, seqlen_offset,
        block_table if paged else k, block_table.shape[1] if paged else 1, k_cache.shape[1], shift,
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        k_scale if fp8 else k, v_scale if fp8 else k, seqlen_new, capacity, k_cache.shape[0],
        HK=hk, D=d, BLOCK_H=next_pow2(hk), BLOCK_D=_block_d(d),
        HAS_SEQLENS=cache_seqlens is not None, PAGED=paged, PAGE_POW2=shift >= 0, FP8=fp8)


def kvcache_append_(k_cache, v_cache, k, v, cache_seqlens, seqlen_offset, block_table, k_scale, v_scale):
    _append(k_cache, v_cache, k, v, cache_seqlens, seqlen_offset, block_table, k_scale, v_scale)


def _launch(q, k_cache, v_cache, out, lse, *, batch, max_sq, total_q, seqlens, seqlen_offset, seqlen_new,
            block_table, cu_q, cu_k, kv_mode, strides, max_keys, softmax_scale, causal, window_left, window_right,
            softcap, alibi_slopes, k_scale, v_scale, config=None):
    """``config``: (BLOCK_N, num_warps, num_stages) instead of the defaults (the benchmark's A/B rows)."""
    H, D = q.shape[-2], q.shape[-1]
    HK = k_cache.shape[-2]
    G = H // HK
    block_m = max(16, min(next_pow2(G * max_sq), 64 if G <= 64 else next_pow2(G)))
    ql = max(1, block_m // G)
    num_qc = cdiv(max_sq, ql)
    block_n = 64 if block_m <= 32 else 32
    # 4 stages of K/V in flight for a 16-bit cache where shared memory allows (Hopper, A100): on an H200
    # (2026-11-27, Llama-3-8B heads, bf16) 124.7 us against 139.5 with 3 at b8 x 16k, 125.1 against
    # 140.4 at b32 x 4k (128-key blocks with 3: 125.3 and 126.1); an fp8 cache is bound by its widening.
    deep = k_cache.dtype in (torch.float16, torch.bfloat16) and block_n == 64 and \
        (_max_shared_mem(_device_index(q.device)) or 0) >= 4 * 2 * block_n * _block_d(D) * 2 + 32768
    block_n, warps, stages = config or (block_n, 4, 4 if deep else 3)
    block_d = _block_d(D)
    # Splits from shapes only: enough programs for two waves of the SMs, >= 4 key blocks per split.
    programs = batch * HK * num_qc
    splits = 1
    if programs < 2 * num_sms(q.device):
        splits = min(cdiv(2 * num_sms(q.device), max(programs, 1)), max(1, max_keys // (4 * block_n)), 64)
        splits = next_pow2(splits) if splits > 1 else 1
    if splits > 1:
        part_out = torch.empty((splits, total_q * H * D), dtype=torch.float32, device=q.device)
        part_lse = torch.empty((splits, total_q * H), dtype=torch.float32, device=q.device)
    else:
        part_out = part_lse = lse
    fp8 = k_cache.dtype == torch.float8_e4m3fn
    shift = _shift(k_cache.shape[1]) if kv_mode == 1 else -1
    dummy = q
    _attention_kernel[(batch * HK, splits, num_qc)](
        q, k_cache, v_cache, out, lse, seqlens if seqlens is not None else dummy, seqlen_offset, seqlen_new,
        block_table if block_table is not None else dummy, block_table.shape[1] if block_table is not None else 1,
        k_cache.shape[1] if kv_mode == 1 else 1, shift,
        cu_q if cu_q is not None else dummy,
        cu_k if cu_k is not None else dummy, *strides, max_sq, total_q, batch, H, softmax_scale,
        softcap, window_left, window_right, alibi_slopes if alibi_slopes is not None else dummy,
        alibi_slopes.shape[1] if alibi_slopes is not None and alibi_slopes.dim() == 2 else 0,
        k_scale if fp8 else dummy, v_scale if fp8 else dummy, part_out, part_lse,
        HK=HK, G=G, D=D, QL=ql, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, NUM_SPLITS=splits,
        KV_MODE=kv_mode, HAS_SEQLENS=seqlens is not None, VARLEN_Q=cu_q is not None, CAUSAL=causal,
        HAS_SOFTCAP=softcap > 0, HAS_ALIBI=alibi_slopes is not None, FP8=fp8,
        IEEE=q.dtype == torch.float32, F16_MMA=fp8 and q.dtype != torch.float32,
        PAGE_POW2=shift >= 0, num_warps=warps,
        num_stages=stages)
    if splits > 1:
        _combine_kernel[(total_q * H,)](part_out, part_lse, out, lse, total_q, H, max_sq, D=D, BLOCK_D=block_d,
                                        NUM_SPLITS=splits, VARLEN_Q=cu_q is not None)


PREFILL_MIN_SEQLEN_Q = 64  # shorter queries pack the G heads of a KV head into one tile (_attention_kernel)


def _device_index(device: torch.device) -> int | None:
    """A CUDA device's index; None for the interpreter's CPU tensors."""
    if device.type != "cuda":
        return None
    return device.index if device.index is not None else torch.cuda.current_device()


@functools.lru_cache(maxsize=None)
def _max_shared_mem(device_index: int | None) -> int | None:
    if device_index is None:  # interpreter: no limit
        return None
    return triton.runtime.driver.active.utils.get_device_properties(device_index)["max_shared_mem"]


def prefill_config(headdim: int, dtype: torch.dtype, max_shared_mem: int | None = None,
                   waves: float | None = None) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) of ``_prefill_kernel``: the first tile of the list whose q
    tile and K/V stages fit the device's shared memory. ``waves``: programs of 128 query rows per SM.

    16-bit at headdims 64 to 128, from an H200's causal Llama-3-8B rows (2026-11-27, kernel times in one run):
    with few 128-row programs per SM (2k: 3.9) the tail of the causal grid decides, and 64 x 64 tiles with
    4 warps took 0.087 ms against 0.155 for 128 x 64 with 8 warps (SDPA 0.086); with many (8k: 15.5),
    128 x 128 tiles with 8 warps and 3 stages took 1.130 ms against 1.191 (64 x 64: 1.200; SDPA 1.019).
    3 stages of 128 x 128 K/V + the q tile need 224 KB (H100/H200: 227 KB); 2 stages for 99 KB parts.
    Half the rows at headdim 256 and for fp32 (IEEE products on twice the bytes)."""
    if dtype == torch.float32:
        tiles = [(64, 32, 4, 2), (32, 32, 4, 2)] if headdim <= 128 else [(32, 32, 4, 2), (32, 16, 4, 2)]
    elif headdim < 64:
        # UNet heads: 128 x 64 tiles took 16.4 and 21.2 us at headdims 8 and 40 (H200, SD1.5 shapes),
        # 64 x 64 ones 29.7 and 25.5: the per-tile work is small, more rows amortize it
        tiles = [(128, 64, 8, 3), (128, 64, 8, 2), (64, 64, 4, 2)]
    elif headdim <= 128:
        tiles = [(64, 64, 4, 3), (64, 64, 4, 2)] if waves is not None and waves < 8 else \
            [(128, 128, 8, 3), (128, 64, 8, 3), (128, 64, 8, 2), (64, 64, 4, 2)]
    else:
        tiles = [(64, 64, 8, 2), (64, 32, 4, 2)]
    block_d = _block_d(headdim)
    for block_m, block_n, warps, stages in tiles:
        need = (block_m + 2 * stages * block_n) * block_d * dtype.itemsize
        if max_shared_mem is None or need <= max_shared_mem:
            break
    return block_m, block_n, warps, stages


def _use_prefill(batch, nheads, max_sq, max_sk, device) -> bool:
    """The prefill kernel for long queries; the shared kernel (which splits the keys across programs) when
    a small grid meets many more keys than queries (a short chunk over a long cache)."""
    if max_sq < PREFILL_MIN_SEQLEN_Q:
        return False
    programs = batch * nheads * cdiv(max_sq, 128)  # 128-row query blocks (16-bit tiles)
    return programs >= num_sms(device) or max_sk <= 8 * max_sq


def _prefill(q, k, v, out, lse, *, batch, max_sq, total_q, seqlens, seqlen_offset, cu_q, cu_k, strides,
             softmax_scale, causal, window_left, window_right, softcap, alibi_slopes, block_table=None,
             k_scale=None, v_scale=None, config=None):
    """Launches ``_prefill_kernel``; ``config`` overrides ``prefill_config`` (benchmarks and tests). With
    ``block_table`` k/v are pages (num_blocks, page_size, nheads_k, d) and ``strides[0]`` their stride; an
    fp8 k/v takes ``k_scale``/``v_scale`` (nheads_k,)."""
    H, D = q.shape[-2], q.shape[-1]
    G = H // k.shape[-2]
    smem = _max_shared_mem(_device_index(q.device))
    waves = batch * H * cdiv(max_sq, 128) / num_sms(q.device)
    block_m, block_n, warps, stages = config or prefill_config(D, q.dtype, smem, waves)
    block_d = _block_d(D)
    paged = block_table is not None
    fp8 = k.dtype == torch.float8_e4m3fn
    shift = _shift(k.shape[1]) if paged else -1
    dummy = q
    _prefill_kernel[(batch * H, cdiv(max_sq, block_m))](
        q, k, v, out, lse, seqlens if seqlens is not None else dummy, seqlen_offset,
        cu_q if cu_q is not None else dummy, cu_k if cu_k is not None else dummy,
        block_table if paged else dummy, block_table.shape[1] if paged else 1, k.shape[1] if paged else 1,
        shift,
        *strides, max_sq, total_q, H, softmax_scale, softcap, window_left, window_right,
        alibi_slopes if alibi_slopes is not None else dummy,
        alibi_slopes.shape[1] if alibi_slopes is not None and alibi_slopes.dim() == 2 else 0,
        k_scale if fp8 else dummy, v_scale if fp8 else dummy,
        G=G, D=D, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, EVEN_D=block_d == D, VARLEN=cu_q is not None,
        HAS_SEQLENS=seqlens is not None, PAGED=paged, PAGE_POW2=shift >= 0, FP8=fp8,
        CAUSAL=causal, HAS_SOFTCAP=softcap > 0,
        HAS_ALIBI=alibi_slopes is not None, IEEE=q.dtype == torch.float32, num_warps=warps, num_stages=stages)


def attention_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens, seqlen_offset, block_table, softmax_scale,
                           causal, window_left, window_right, softcap, alibi_slopes, k_scale, v_scale,
                           need_lse=True, *, kernel=None, decode_config=None):
    """``kernel``: "prefill" or "shared" forces one (benchmarks' A/B rows); None picks by shape.
    ``decode_config``: the shared kernel's (BLOCK_N, num_warps, num_stages), for the benchmark's A/B rows."""
    batch, sq, H, _ = q.shape
    if k is not None:
        _append(k_cache, v_cache, k, v, cache_seqlens, seqlen_offset, block_table, k_scale, v_scale)
    out = torch.empty_like(q)
    lse = torch.empty((batch, H, sq), dtype=torch.float32, device=q.device)
    if q.numel() == 0:
        return out, lse
    paged = block_table is not None
    capacity = block_table.shape[1] * k_cache.shape[1] if paged else k_cache.shape[1]
    seqlen_new = 0 if k is None else k.shape[1]
    strides = (k_cache.stride(0), k_cache.stride(1), k_cache.stride(2))
    common = dict(batch=batch, max_sq=sq, total_q=batch * sq, seqlens=cache_seqlens, cu_q=None, cu_k=None,
                  strides=strides, softmax_scale=softmax_scale, causal=causal, window_left=window_left,
                  window_right=window_right, softcap=softcap, alibi_slopes=alibi_slopes)
    if kernel is None:
        kernel = "prefill" if _use_prefill(batch, H, sq, capacity, q.device) else "shared"
    if kernel == "prefill":
        _prefill(q, k_cache, v_cache, out, lse, seqlen_offset=seqlen_offset + seqlen_new, block_table=block_table,
                 k_scale=k_scale, v_scale=v_scale, **common)
    else:
        _launch(q, k_cache, v_cache, out, lse, seqlen_offset=seqlen_offset, seqlen_new=seqlen_new,
                block_table=block_table, kv_mode=1 if paged else 0, max_keys=capacity, k_scale=k_scale,
                v_scale=v_scale, config=decode_config, **common)
    return out, lse


def _prefill_args(q, k, cu_seqlens_q, max_seqlen_q):
    """out, lse and the launch arguments shared by both kernels for ``attention``'s layouts."""
    out = torch.empty_like(q)
    if cu_seqlens_q is not None:
        batch, total_q = cu_seqlens_q.shape[0] - 1, q.shape[0]
        lse = torch.empty((q.shape[1], total_q), dtype=torch.float32, device=q.device)
        return out, lse, dict(batch=batch, max_sq=max_seqlen_q, total_q=total_q, seqlens=None, seqlen_offset=0,
                              strides=(0, k.stride(0), k.stride(1)))
    batch = q.shape[0]
    lse = torch.empty((batch, q.shape[2], q.shape[1]), dtype=torch.float32, device=q.device)
    return out, lse, dict(batch=batch, max_sq=max_seqlen_q, total_q=batch * q.shape[1], seqlens=None,
                          seqlen_offset=k.shape[1], strides=(k.stride(0), k.stride(1), k.stride(2)))


def attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal, window_left,
              window_right, softcap, alibi_slopes, need_lse=True, *, kernel=None, config=None):
    """``kernel``: "prefill" or "shared" forces one (benchmarks' A/B rows, tests); None picks by shape."""
    out, lse, args = _prefill_args(q, k, cu_seqlens_q, max_seqlen_q)
    if q.numel() == 0 or args["batch"] == 0 or max_seqlen_q == 0:
        return out, lse
    opts = dict(cu_q=cu_seqlens_q, cu_k=cu_seqlens_k, softmax_scale=softmax_scale, causal=causal,
                window_left=window_left, window_right=window_right, softcap=softcap, alibi_slopes=alibi_slopes)
    if kernel is None:
        kernel = "prefill" if _use_prefill(args["batch"], q.shape[-2], max_seqlen_q, max_seqlen_k, q.device) \
            else "shared"
    if kernel == "prefill":
        _prefill(q, k, v, out, lse, **args, **opts, config=config)
    else:
        _launch(q, k, v, out, lse, **args, **opts, seqlen_new=0, block_table=None,
                kv_mode=2 if cu_seqlens_q is not None else 0, max_keys=max_seqlen_k, k_scale=None, v_scale=None)
    return out, lse
