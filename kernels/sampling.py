"""Token sampling from logits in Triton: penalties, temperature, top-k, top-p,
min-p and an inverse-CDF draw, one program per row, with no sort.

Semantics: ``genfast/reference/sampling.py``; the algorithm is the C++
kernel's (csrc/cpu/sampling.cpp). Per row, with d = (max - x) * inv_temperature
(d >= 0, 0 at the top; a non-negative float's bits order like the float):

1. one pass: max, NaN/+inf detection;
2. one pass for a candidate cut C, a bound on every threshold: with top-k the
   counts of d <= 16 levels sqrt(2) apart (1 .. 181 nats), with top-p alone
   the row's mass Z and the mass below each level (or a bound from Z); min-p
   alone: C = -log(min_p);
3. one pass compacting the candidates d <= C, in vocabulary order, into a
   scratch row (their d and index): usually a few hundred to a few thousand;
4. exact thresholds on the candidates: the smallest key whose count (top-k)
   or mass (top-p) of candidates at or below it reaches the target, found by
   a search that tests 16 pivots per pass (2^31 keys in 8 passes);
5. the kept mass z and the draw: the first candidate whose running mass
   exceeds u * z, u = position ``offset + row`` of the uniform stream, summed
   per block in the same order for z and for the scan.
Without a filter the draw reads the row itself (steps 2-4 skipped: two passes
over the row after the first).

Penalties, when asked for, first write an fp32 copy of the logits with the
penalized entries (``_penalize_kernel``), from ``token_counts`` or from counts
of ``prev_tokens`` built in a zeroed int32 scratch by one integer
``atomic_add`` per occurrence (exact, so independent of the order).

Memory traffic for B rows of V logits of s bytes: the sort-based eager path
(softmax, sort, cumsum, scatter, multinomial) moves ~15 B·V·4 bytes and sorts;
this kernel reads the row three times (the first from DRAM, then from L2: a
128k fp32 row is 512 KB), writes and re-reads the candidates. The previous
version bisected over the whole row, ~62 passes one after another, 1.3 ms at
any batch on an H200. This one, on an H200 (2026-11-27, 8 x 128256 fp32):
top-k 50 + top-p 0.9 306 us, top-p 0.9 alone 937 us, and the filter kernel
(top_k_mask_logits, 64 rows) 1751 us: latency-bound, one program per row with
a reduction across its warps in every step of the level pass and of each
search pass. The passes now keep per-lane sums ([block, levels] or [block,
pivots]) and reduce them once per pass; not yet timed on a GPU. A row split
across programs is the next step for small batches (8 rows use 8 of 132 SMs).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .rng import load_seed, uniform_at

NAN_ROW, EMPTY_ROW = tl.constexpr(-1), tl.constexpr(-2)  # compiled kernels read globals only as constexpr
NLEV = tl.constexpr(16)  # candidate cut levels, 2^(j/2) nats
NPIV = tl.constexpr(16)  # pivots per pass of the threshold search
CBLOCK = tl.constexpr(256)  # candidates per step of a search pass (x NPIV pivots in registers)
LBLOCK = tl.constexpr(512)  # logits per step of the level pass (x NLEV levels in registers)


@triton.jit
def _distance(x_ptr, start, vocab, top, inv_t, BLOCK: tl.constexpr):
    idx = start + tl.arange(0, BLOCK)
    mask = idx < vocab
    x = tl.load(x_ptr + idx, mask=mask, other=float("-inf")).to(tl.float32)
    return idx, mask, (top - x) * inv_t


@triton.jit(do_not_specialize=["n_prev"])
def _penalize_kernel(logits_ptr, prev_ptr, counts_ptr, params_ptr, out_ptr, vocab, n_prev, rep_s, presence_s,
                     freq_s, HAS_PARAMS: tl.constexpr, FROM_PREV: tl.constexpr, BLOCK: tl.constexpr,
                     BLOCK_N: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    src = logits_ptr + row * vocab
    dst = out_ptr + row * vocab
    counts = counts_ptr + row * vocab
    if HAS_PARAMS:
        rep = tl.load(params_ptr + row * 7 + 4)
        presence = tl.load(params_ptr + row * 7 + 5)
        freq = tl.load(params_ptr + row * 7 + 6)
    else:
        rep = rep_s + tl.zeros([], tl.float32)
        presence = presence_s + tl.zeros([], tl.float32)
        freq = freq_s + tl.zeros([], tl.float32)
    if FROM_PREV:
        # counts is a zeroed int32 scratch row: one atomic add per occurrence
        prev = prev_ptr + row * n_prev
        for start in range(0, n_prev, BLOCK_N):
            i = start + tl.arange(0, BLOCK_N)
            t = tl.load(prev + i, mask=i < n_prev, other=-1)
            valid = (t >= 0) & (t < vocab)
            tl.atomic_add(counts + t, tl.full([BLOCK_N], 1, tl.int32), mask=valid)
        tl.debug_barrier()
    for start in range(0, vocab, BLOCK):
        idx = start + tl.arange(0, BLOCK)
        mask = idx < vocab
        raw = tl.load(src + idx, mask=mask).to(tl.float32)
        c = tl.load(counts + idx, mask=mask, other=0)
        pen = tl.where(raw < 0, raw * rep, raw / rep) - presence - freq * c.to(tl.float32)
        tl.store(dst + idx, tl.where(c > 0, pen, raw), mask=mask)


@triton.jit
def _candidate_d(cd_row, x_row, i, n, top, inv_t, filtered):
    """d of candidates i (inf from n on): the compacted ones, or the row itself when nothing filters."""
    if filtered:
        d = tl.load(cd_row + i, mask=i < n, other=float("inf"))
    else:
        x = tl.load(x_row + i, mask=i < n, other=float("-inf")).to(tl.float32)
        d = (top - x) * inv_t
    return d


@triton.jit
def _search(cd_ptr, n, hi, target, MASS: tl.constexpr):
    """The smallest int32 key in (-1, hi] whose F reaches target, F(key) the count
    (MASS false) or the mass exp(-d) of the n candidates d at cd_ptr with bits(d) <= key;
    hi if none below it does. Each pass tests NPIV pivots spread over the open interval
    (lo, hi) and keeps the part where F crosses the target: 2^31 keys in 8 passes."""
    lo = tl.zeros([], tl.int64) - 1
    hi = hi.to(tl.int64)
    j = tl.arange(0, NPIV).to(tl.int64)
    while hi - lo > 1:
        piv = lo + 1 + ((hi - lo - 1) * (j + 1)) // (NPIV + 1)  # in [lo + 1, hi - 1]
        f = tl.zeros([CBLOCK, NPIV], tl.float32)  # per lane: summed across the warps once per pass
        for start in range(0, n, CBLOCK):
            i = start + tl.arange(0, CBLOCK)
            m = i < n
            d = tl.load(cd_ptr + i, mask=m, other=float("inf"))
            key = d.to(tl.int32, bitcast=True).to(tl.int64)
            w = tl.exp(-d) if MASS else tl.full([CBLOCK], 1.0, tl.float32)
            below = m[:, None] & (key[:, None] <= piv[None, :])
            f += tl.where(below, w[:, None], 0.0)
        ok = tl.sum(f, axis=0) >= target  # F grows with the key: the pivots that pass follow those that fail
        hi = tl.min(tl.where(ok, piv, hi), axis=0)
        lo = tl.max(tl.where(ok, lo, piv), axis=0)
    return hi


@triton.jit(do_not_specialize=["k_s", "seed", "offset"])
def _sample_kernel(x_ptr, params_ptr, cd_ptr, ci_ptr, tok_ptr, lp_ptr, vocab, inv_t_s, k_s, p_s, min_p_s, seed,
                   seed_ptr, offset, HAS_PARAMS: tl.constexpr, SEED_FROM_PTR: tl.constexpr,
                   RETURN_LOGPROBS: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * vocab
    cd_row = cd_ptr + row * vocab  # the candidates' d and vocabulary index
    ci_row = ci_ptr + row * vocab
    if HAS_PARAMS:
        inv_t = tl.load(params_ptr + row * 7)
        k = tl.load(params_ptr + row * 7 + 1).to(tl.int32)
        p = tl.load(params_ptr + row * 7 + 2)
        min_p = tl.load(params_ptr + row * 7 + 3)
    else:
        # + a 0-d fp32 zero: scalar arguments become fp32 values (in the interpreter too)
        inv_t = inv_t_s + tl.zeros([], tl.float32)
        k = k_s + tl.zeros([], tl.int32)
        p = p_s + tl.zeros([], tl.float32)
        min_p = min_p_s + tl.zeros([], tl.float32)

    # 1. the max, and whether the row holds NaN or +inf
    top_v = tl.full([BLOCK], float("-inf"), tl.float32)
    bad_v = tl.zeros([BLOCK], tl.int32)
    for start in range(0, vocab, BLOCK):
        idx = start + tl.arange(0, BLOCK)
        x = tl.load(x_row + idx, mask=idx < vocab, other=float("-inf")).to(tl.float32)
        bad_v = bad_v | ((x != x) | (x == float("inf"))).to(tl.int32)
        top_v = tl.where(x > top_v, x, top_v)
    top = tl.max(top_v, axis=0)
    bad = tl.max(bad_v, axis=0) > 0

    tok = (tl.zeros([1], tl.int32) + NAN_ROW).to(tl.int64)
    logprob = tl.zeros([1], tl.float32)
    if bad:
        tok = tok * 0 + NAN_ROW
    elif top == float("-inf"):
        tok = tok * 0 + EMPTY_ROW
    elif inv_t == float("inf"):
        # greedy: the first index of the max
        best_v = tl.full([BLOCK], 2147483647, tl.int32)
        for start in range(0, vocab, BLOCK):
            idx = start + tl.arange(0, BLOCK)
            mask = idx < vocab
            x = tl.load(x_row + idx, mask=mask, other=float("-inf")).to(tl.float32)
            best_v = tl.minimum(best_v, tl.where(mask & (x == top), idx, 2147483647))
        tok = tok * 0 + tl.min(best_v, axis=0).to(tl.int64)
    else:
        need_k = (k > 0) & (k < vocab)
        need_p = p < 1.0
        d_m = tl.zeros([], tl.float32) + float("inf")
        if min_p > 0.0:
            d_m = -tl.log(min_p)
        # 2. the cut C: every threshold is <= it
        cut = d_m
        z_all = 0.0
        if need_k | need_p:
            lev = tl.exp2(tl.arange(0, NLEV).to(tl.float32) * 0.5)
            f_lev = tl.zeros([LBLOCK, NLEV], tl.float32)  # per lane: summed across the warps after the pass
            z_v = tl.zeros([LBLOCK], tl.float32)
            for start in range(0, vocab, LBLOCK):
                idx, mask, d = _distance(x_row, start, vocab, top, inv_t, LBLOCK)
                if need_k:
                    w = tl.full([LBLOCK], 1.0, tl.float32)
                else:
                    w = tl.where(mask, tl.exp(-d), 0.0)
                    z_v += w
                f_lev += tl.where(mask[:, None] & (d[:, None] <= lev[None, :]), w[:, None], 0.0)
            f_lev = tl.sum(f_lev, axis=0)
            if need_k:
                cut = tl.min(tl.where(f_lev >= k.to(tl.float32), lev, float("inf")), axis=0)
                if not need_p:
                    cut = tl.minimum(cut, d_m)  # min-p bounds the kept set too; with top-p it does not
            else:
                z_all = tl.sum(z_v, axis=0)
                # the tokens beyond C hold at most V e^-C of the mass: this C leaves >= p Z below it
                bound = tl.log(2.0 * vocab / ((1.0 - p) * z_all))
                cut = tl.minimum(tl.min(tl.where(f_lev >= p * z_all, lev, float("inf")), axis=0), bound)
        # 3. the candidates d <= C in vocabulary order; with no filter the draw reads the row itself
        filtered = need_k | need_p | (min_p > 0.0)
        n = vocab
        if filtered:
            n = 0
            for start in range(0, vocab, BLOCK):
                idx, mask, d = _distance(x_row, start, vocab, top, inv_t, BLOCK)
                keep = mask & (d <= cut)
                pos = n + tl.cumsum(keep.to(tl.int32), axis=0) - 1
                tl.store(cd_row + pos, d, mask=keep)
                tl.store(ci_row + pos, idx, mask=keep)
                n += tl.sum(keep.to(tl.int32), axis=0)
        # 4. exact thresholds on the candidates
        cut_key = cut.to(tl.int32, bitcast=True)
        d_k = float("inf")
        if need_k & (n >= k):  # fewer candidates than k (only below the min-p cut): top-k does not bind
            d_k = _search(cd_row, n, cut_key, k.to(tl.float32), False).to(tl.int32).to(tl.float32, bitcast=True)
        d_p = float("inf")
        if need_p:
            # top-p is relative to the mass top-k keeps, or to the whole row's
            target = p * z_all
            if need_k:
                zk_v = tl.zeros([CBLOCK], tl.float32)
                for start in range(0, n, CBLOCK):
                    i = start + tl.arange(0, CBLOCK)
                    d = tl.load(cd_row + i, mask=i < n, other=float("inf"))
                    zk_v += tl.where(d <= d_k, tl.exp(-d), 0.0)
                target = p * tl.sum(zk_v, axis=0)
            hi = tl.minimum(cut, d_k).to(tl.int32, bitcast=True)
            d_p = _search(cd_row, n, hi, target, True).to(tl.int32).to(tl.float32, bitcast=True)
        t = tl.minimum(tl.minimum(d_k, d_p), d_m)

        # 5. the draw: block sums in order for z and for the scan, BLOCK wide (a scan step is a
        # reduction across the warps: few wide steps, not many narrow ones)
        z = 0.0
        for start in range(0, n, BLOCK):
            i = start + tl.arange(0, BLOCK)
            d = _candidate_d(cd_row, x_row, i, n, top, inv_t, filtered)
            z += tl.sum(tl.where(d <= t, tl.exp(-d), 0.0), axis=0)
        key = load_seed(seed, seed_ptr, SEED_FROM_PTR)
        u = tl.max(uniform_at(key, tl.zeros([1], tl.int64) + offset.to(tl.int64) + row), axis=0)
        target = u * z
        run = 0.0
        pick = 2147483647
        last = -1
        for start in range(0, n, BLOCK):
            i = start + tl.arange(0, BLOCK)
            d = _candidate_d(cd_row, x_row, i, n, top, inv_t, filtered)
            e = tl.where(d <= t, tl.exp(-d), 0.0)
            hit = ((run + tl.cumsum(e, axis=0)) > target) & (e > 0)
            pick = tl.minimum(pick, tl.min(tl.where(hit, i, 2147483647), axis=0))
            last = tl.maximum(last, tl.max(tl.where(e > 0, i, -1), axis=0))
            run += tl.sum(e, axis=0)
        if pick == 2147483647:  # u * z rounded up to z
            pick = last
        if filtered:
            tok = tok * 0 + tl.load(ci_row + pick).to(tl.int64)
        else:
            tok = tok * 0 + pick.to(tl.int64)
        if RETURN_LOGPROBS:
            logprob = logprob * 0 - tl.max(_candidate_d(cd_row, x_row, pick + tl.arange(0, 1), n, top, inv_t,
                                                        filtered), axis=0) - tl.log(z)
    tl.store(tok_ptr + row + tl.arange(0, 1), tok)
    if RETURN_LOGPROBS:
        tl.store(lp_ptr + row + tl.arange(0, 1), logprob)


def _block(vocab: int) -> int:
    return min(triton.next_power_of_2(vocab), 2048)


def sample_tokens(logits, params, prev_tokens, token_counts, inv_temperature, top_k, top_p, min_p,
                  repetition_penalty, presence_penalty, frequency_penalty, seed, seed_tensor, offset,
                  return_logprobs):
    batch, vocab = logits.shape
    tokens = torch.empty(batch, dtype=torch.int64, device=logits.device)
    logprobs = torch.empty(batch if return_logprobs else 0, dtype=torch.float32, device=logits.device)
    if batch == 0:
        return tokens, logprobs
    block = _block(vocab)
    has_params = params is not None
    x = logits
    if prev_tokens is not None or token_counts is not None:
        x = torch.empty(batch, vocab, dtype=torch.float32, device=logits.device)
        from_prev = prev_tokens is not None
        n_prev = prev_tokens.shape[1] if from_prev else 0
        counts = torch.zeros(batch, vocab, dtype=torch.int32, device=logits.device) if from_prev else token_counts
        _penalize_kernel[(batch,)](
            logits, prev_tokens if from_prev else counts, counts, params if has_params else logits, x, vocab, n_prev,
            repetition_penalty, presence_penalty, frequency_penalty, HAS_PARAMS=has_params, FROM_PREV=from_prev,
            BLOCK=block, BLOCK_N=min(triton.next_power_of_2(max(n_prev, 1)), 1024), num_warps=4)
    # the candidates' d and index: a scratch row each, as wide as the vocabulary
    cand_d = torch.empty(batch, vocab, dtype=torch.float32, device=logits.device)
    cand_i = torch.empty(batch, vocab, dtype=torch.int32, device=logits.device)
    _sample_kernel[(batch,)](
        x, params if has_params else x, cand_d, cand_i, tokens, logprobs if return_logprobs else tokens, vocab,
        inv_temperature, top_k, top_p, min_p, seed, seed_tensor if seed_tensor is not None else tokens, offset,
        HAS_PARAMS=has_params, SEED_FROM_PTR=seed_tensor is not None, RETURN_LOGPROBS=return_logprobs,
        BLOCK=block, num_warps=8)
    return tokens, logprobs


# ---- FlashInfer's renorm and mask ops ------------------------------------------------
# One program per row: the threshold t (one of the row's values) by a search on
# order-preserving int32 keys testing NPIV pivots per pass (8 passes over the
# row instead of bisection's 32), then one pass (two for renormalization) that
# keeps the values >= t. Semantics:
# genfast/reference/sampling.py.

@triton.jit
def _order_key(x):
    """int32 keys that order fp32 values: a < b iff key(a) < key(b) (neither NaN)."""
    b = x.to(tl.int32, bitcast=True)
    return tl.where(b < 0, b ^ 0x7FFFFFFF, b)


@triton.jit(do_not_specialize=["k_s", "p_s"])
def _filter_kernel(x_ptr, arr_ptr, out_ptr, vocab, k_s, p_s, HAS_ARR: tl.constexpr, TOP_P: tl.constexpr,
                   RENORM: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * vocab
    out_row = out_ptr + row * vocab
    if TOP_P:
        target = (tl.load(arr_ptr + row) if HAS_ARR else p_s) + tl.zeros([], tl.float32)
        total_v = tl.zeros([BLOCK], tl.float32)
        for start in range(0, vocab, BLOCK):
            idx = start + tl.arange(0, BLOCK)
            total_v += tl.load(x_row + idx, mask=idx < vocab, other=0.0).to(tl.float32)
        # top_p is absolute, as FlashInfer's: a row holding less mass is kept whole
        on = (target < 1.0) & (tl.sum(total_v, axis=0) >= target)
    else:
        k = (tl.load(arr_ptr + row) if HAS_ARR else k_s) + tl.zeros([], tl.int64)
        target = k.to(tl.float32)
        on = (k > 0) & (k < vocab)
    t = float("-inf")
    if on:
        # the largest key with F(key) >= target, F the count (or mass) of the keys >= it:
        # NPIV pivots per pass over the row, as _search
        lo = tl.zeros([], tl.int64) - 2147483648
        hi = tl.zeros([], tl.int64) + 2147483648
        j = tl.arange(0, NPIV).to(tl.int64)
        while hi - lo > 1:
            piv = lo + 1 + ((hi - lo - 1) * (j + 1)) // (NPIV + 1)
            f = tl.zeros([LBLOCK, NPIV], tl.float32)
            for start in range(0, vocab, LBLOCK):
                idx = start + tl.arange(0, LBLOCK)
                mask = idx < vocab
                x = tl.load(x_row + idx, mask=mask, other=0.0).to(tl.float32)
                w = x if TOP_P else tl.full([LBLOCK], 1.0, tl.float32)
                above = mask[:, None] & (_order_key(x).to(tl.int64)[:, None] >= piv[None, :])
                f += tl.where(above, w[:, None], 0.0)
            ok = tl.sum(f, axis=0) >= target  # F falls as the key grows: the pivots that pass precede those that fail
            lo = tl.max(tl.where(ok, piv, lo), axis=0)
            hi = tl.min(tl.where(ok, hi, piv), axis=0)
        key = lo.to(tl.int32)
        t = tl.where(key < 0, key ^ 0x7FFFFFFF, key).to(tl.float32, bitcast=True)
    if RENORM:
        z_v = tl.zeros([BLOCK], tl.float32)
        for start in range(0, vocab, BLOCK):
            idx = start + tl.arange(0, BLOCK)
            x = tl.load(x_row + idx, mask=idx < vocab, other=0.0).to(tl.float32)
            z_v += tl.where(x >= t, x, 0.0)
        inv = 1.0 / tl.maximum(tl.sum(z_v, axis=0), 1e-8)  # FlashInfer's guard against an all-zero row
        for start in range(0, vocab, BLOCK):
            idx = start + tl.arange(0, BLOCK)
            mask = idx < vocab
            x = tl.load(x_row + idx, mask=mask, other=0.0).to(tl.float32)
            tl.store(out_row + idx, tl.where(x >= t, x * inv, 0.0), mask=mask)
    else:
        for start in range(0, vocab, BLOCK):
            idx = start + tl.arange(0, BLOCK)
            mask = idx < vocab
            raw = tl.load(x_row + idx, mask=mask, other=0.0)
            tl.store(out_row + idx, tl.where(raw.to(tl.float32) >= t, raw, float("-inf")), mask=mask)


def _filter(x, per_row, k, p, top_p: bool, renorm: bool):
    batch, vocab = x.shape
    out = torch.empty_like(x)
    if batch > 0:
        _filter_kernel[(batch,)](x, per_row if per_row is not None else x, out, vocab, k, p,
                                 HAS_ARR=per_row is not None, TOP_P=top_p, RENORM=renorm, BLOCK=_block(vocab),
                                 num_warps=8)
    return out


def top_k_renorm_probs(probs, top_k_arr, top_k):
    return _filter(probs, top_k_arr, top_k, 1.0, top_p=False, renorm=True)


def top_p_renorm_probs(probs, top_p_arr, top_p):
    return _filter(probs, top_p_arr, 0, top_p, top_p=True, renorm=True)


def top_k_mask_logits(logits, top_k_arr, top_k):
    return _filter(logits, top_k_arr, top_k, 1.0, top_p=False, renorm=False)
