"""Token sampling from logits in Triton: penalties, temperature, top-k, top-p,
min-p and an inverse-CDF draw, with no sort, each row split into chunks over
many programs so that a small batch fills the GPU.

Semantics: ``genfast/reference/sampling.py``; the algorithm is the C++
kernel's (csrc/cpu/sampling.cpp). Per row, with d = (max - x) * inv_temperature
(d >= 0, 0 at the top; a non-negative float's bits order like the float), in
four launches over a (rows, chunks) grid, the chunks' partial results kept in
a small workspace:

1. ``_max_kernel`` (row, chunk): the chunk's max, the first index of it, and
   whether it holds NaN or +inf;
2. ``_levels_kernel`` (row, chunk): with the row's max, the count of d <= each
   of 16 levels (2^(j/2) nats for j < 15, then +inf), the mass exp(-d) below
   each level (top-p alone) and the chunk's whole mass;
3. ``_compact_kernel`` (row, chunk): the cut C, the lowest level that bounds
   every threshold (top-k: holds k; top-p: holds p of the mass, or beyond which
   at most (1 - p) / 2 of it lies; min-p: >= -log(min_p)); each chunk writes its
   candidates d <= C, in vocabulary order, at the row's position after those of
   the chunks before it (their counts at C are known from step 2): usually a
   few hundred to a few thousand per row;
4. ``_select_kernel`` (row): exact thresholds on the candidates, the smallest
   key whose count (top-k) or mass (top-p) reaches the target, found by a
   search that tests 16 pivots per pass (2^31 keys in 8 passes; after the first
   pass the candidates still in play are copied apart, and the later passes
   read only them); then the kept mass z and the draw, the first candidate
   whose running mass exceeds u * z,
   u = position ``offset + row`` of the uniform stream. Without a filter the
   draw picks the chunk from the chunks' masses, then the token in it.
Greedy rows (temperature 0) take the first index of the max from step 1.

Penalties, when asked for, first write an fp32 copy of the logits with the
penalized entries (``_penalize_kernel``), from ``token_counts`` or from counts
of ``prev_tokens`` built in a zeroed int32 scratch by one integer
``atomic_add`` per occurrence (exact, so independent of the order).

Memory traffic for B rows of V logits of s bytes: the sort-based eager path
(softmax, sort, cumsum, scatter, multinomial) moves ~15 B·V·4 bytes and sorts;
this reads each row three times (the first from DRAM, then from L2: a 128k
fp32 row is 512 KB) and writes and re-reads the candidates: at 8 x 128256
fp32, 4 MB from DRAM, ~1 us at an H200's 4.2 TB/s, so the launches' latency
decides. With one program per row (the version before this one), an H200
(2026-11-27, 8 x 128256) took 306 us for top-k 50 + top-p 0.9 and 937 us for
top-p alone: 8 rows kept 8 of 132 SMs busy. The rows are now split so that
about 4 programs run per SM (chunks of at least 2048 logits): 0.173 ms and
0.414 ms a call (wall, host included; 64 rows: 0.252 and 0.610 ms). With
``randn * 3`` logits top-p 0.9 keeps ~5-7k candidates, searched by one
program per row: since that run the search starts at the level below the
cut (6 passes, not 8) and takes 1024 candidates a step: top-p alone 0.282 ms
(8 rows) and 0.456 ms (64 rows) on the H200, of which the search
(``_select_kernel``, one program per row) takes 189 and 242 us.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import cdiv, next_pow2, num_sms
from .rng import load_seed, uniform_at

NAN_ROW, EMPTY_ROW = tl.constexpr(-1), tl.constexpr(-2)  # compiled kernels read globals only as constexpr
NLEV = tl.constexpr(16)  # candidate cut levels: 2^(j/2) nats for j < 15, then +inf
NPIV = tl.constexpr(16)  # pivots per pass of the threshold search
CBLOCK = tl.constexpr(256)  # candidates per step of a search pass (x NPIV pivots in registers)
LBLOCK = tl.constexpr(256)  # logits per step of the level pass (x NLEV levels in registers)
# The workspace: NW words per (row, chunk) and one more slot per row (at chunk S) for the row's cut.
# fp32 words: 0 the chunk's max, 1 its mass, 2.. the mass below each level (row slot: 0 cut, 1 mass);
# int32 words: 0 NaN/+inf seen, 1 first index of the max, 2.. the count below each level
# (row slot: 0 the number of candidates; the filters: 0 on, 1 count, 2 level).
NW = tl.constexpr(18)


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
def _levels():
    j = tl.arange(0, NLEV)
    return tl.where(j < NLEV - 1, tl.exp2(j.to(tl.float32) * 0.5), float("inf"))


@triton.jit
def _distance(x_ptr, start, end, top, inv_t, BLOCK: tl.constexpr):
    idx = start + tl.arange(0, BLOCK)
    mask = idx < end
    x = tl.load(x_ptr + idx, mask=mask, other=float("-inf")).to(tl.float32)
    return idx, mask, (top - x) * inv_t


@triton.jit
def _chunk_range(c, chunk, vocab):
    """[lo, hi): the vocabulary positions of chunk c."""
    lo = c * chunk
    return lo, tl.minimum(lo + chunk, vocab)


@triton.jit
def _row_params(params_ptr, row, inv_t_s, k_s, p_s, min_p_s, HAS_PARAMS: tl.constexpr):
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
    return inv_t, k, p, min_p


@triton.jit
def _slots(row, S, SMAX: tl.constexpr):
    """The chunks' indices and the workspace offset of each chunk's words."""
    s = tl.arange(0, SMAX)
    return s, (row * (S + 1) + s) * NW


@triton.jit
def _row_top(wf_ptr, wi_ptr, row, S, SMAX: tl.constexpr):
    """The row's max and whether it holds NaN or +inf, from its chunks' (step 1)."""
    s, slot = _slots(row, S, SMAX)
    top = tl.max(tl.load(wf_ptr + slot, mask=s < S, other=float("-inf")), axis=0)
    bad = tl.max(tl.load(wi_ptr + slot, mask=s < S, other=0), axis=0) > 0
    return top, bad


@triton.jit
def _max_kernel(x_ptr, wf_ptr, wi_ptr, vocab, chunk, S, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    x_row = x_ptr + row * vocab
    lo, hi = _chunk_range(c, chunk, vocab)
    top_v = tl.full([BLOCK], float("-inf"), tl.float32)
    arg_v = tl.zeros([BLOCK], tl.int32) + lo
    bad_v = tl.zeros([BLOCK], tl.int32)
    for start in range(lo, hi, BLOCK):
        idx = start + tl.arange(0, BLOCK)
        x = tl.load(x_row + idx, mask=idx < hi, other=float("-inf")).to(tl.float32)
        bad_v = bad_v | ((x != x) | (x == float("inf"))).to(tl.int32)
        up = x > top_v  # strictly: each lane keeps its first index of its max
        arg_v = tl.where(up, idx, arg_v)
        top_v = tl.where(up, x, top_v)
    top = tl.max(top_v, axis=0)
    slot = (row * (S + 1) + c) * NW
    tl.store(wf_ptr + slot, top)
    tl.store(wi_ptr + slot, tl.max(bad_v, axis=0))
    tl.store(wi_ptr + slot + 1, tl.min(tl.where(top_v == top, arg_v, 2147483647), axis=0))


@triton.jit(do_not_specialize=["k_s"])
def _levels_kernel(x_ptr, params_ptr, wf_ptr, wi_ptr, vocab, chunk, S, inv_t_s, k_s, p_s, min_p_s,
                   HAS_PARAMS: tl.constexpr, SMAX: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    inv_t, k, p, _min_p = _row_params(params_ptr, row, inv_t_s, k_s, p_s, min_p_s, HAS_PARAMS)
    top, bad = _row_top(wf_ptr, wi_ptr, row, S, SMAX)
    if (bad == 0) & (top > float("-inf")) & (inv_t < float("inf")):
        x_row = x_ptr + row * vocab
        lo, hi = _chunk_range(c, chunk, vocab)
        mass_on = (p < 1.0) & ((k <= 0) | (k >= vocab))  # top-p alone
        lev = _levels()
        cnt = tl.zeros([LBLOCK, NLEV], tl.float32)  # per lane: summed across the warps once at the end
        mass = tl.zeros([LBLOCK, NLEV], tl.float32)
        z_v = tl.zeros([LBLOCK], tl.float32)
        for start in range(lo, hi, LBLOCK):
            _idx, mask, d = _distance(x_row, start, hi, top, inv_t, LBLOCK)
            below = mask[:, None] & (d[:, None] <= lev[None, :])
            cnt += below.to(tl.float32)
            e = tl.where(mask, tl.exp(-d), 0.0)
            z_v += e
            if mass_on:
                mass += tl.where(below, e[:, None], 0.0)
        slot = (row * (S + 1) + c) * NW
        j = tl.arange(0, NLEV)
        tl.store(wf_ptr + slot + 1, tl.sum(z_v, axis=0))
        tl.store(wf_ptr + slot + 2 + j, tl.sum(mass, axis=0))
        tl.store(wi_ptr + slot + 2 + j, tl.sum(cnt.to(tl.int32), axis=0))


@triton.jit(do_not_specialize=["k_s"])
def _compact_kernel(x_ptr, params_ptr, wf_ptr, wi_ptr, cd_ptr, ci_ptr, vocab, chunk, S, inv_t_s, k_s, p_s,
                    min_p_s, HAS_PARAMS: tl.constexpr, SMAX: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    inv_t, k, p, min_p = _row_params(params_ptr, row, inv_t_s, k_s, p_s, min_p_s, HAS_PARAMS)
    top, bad = _row_top(wf_ptr, wi_ptr, row, S, SMAX)
    need_k = (k > 0) & (k < vocab)
    need_p = p < 1.0
    if (bad == 0) & (top > float("-inf")) & (inv_t < float("inf")) & (need_k | need_p | (min_p > 0.0)):
        s, slot = _slots(row, S, SMAX)
        j = tl.arange(0, NLEV)
        lev = _levels()
        cnt2 = tl.load(wi_ptr + slot[:, None] + 2 + j[None, :], mask=(s < S)[:, None], other=0)
        cnt = tl.sum(cnt2, axis=0)
        d_m = float("inf")
        if min_p > 0.0:
            d_m = -tl.log(min_p)
        lev_m = tl.min(tl.where(lev >= d_m, j, NLEV - 1), axis=0)
        z_all = 0.0
        if need_k:
            cut = tl.min(tl.where(cnt >= k, j, NLEV - 1), axis=0)
            if not need_p:
                cut = tl.minimum(cut, lev_m)  # min-p bounds the kept set too; with top-p it does not
        elif need_p:
            mass = tl.sum(tl.load(wf_ptr + slot[:, None] + 2 + j[None, :], mask=(s < S)[:, None], other=0.0),
                          axis=0)
            z_all = tl.sum(tl.load(wf_ptr + slot + 1, mask=s < S, other=0.0), axis=0)
            # the tokens beyond d hold at most V e^-d of the mass: this d leaves >= p Z below it
            bound = tl.log(2.0 * vocab / ((1.0 - p) * z_all))
            cut = tl.minimum(tl.min(tl.where(mass >= p * z_all, j, NLEV - 1), axis=0),
                             tl.min(tl.where(lev >= bound, j, NLEV - 1), axis=0))
        else:
            cut = lev_m
        cut_d = tl.max(tl.where(j == cut, lev, float("-inf")), axis=0)
        cnt_cut = tl.sum(tl.where(j[None, :] == cut, cnt2, 0), axis=1)  # each chunk's candidates
        n = tl.sum(tl.where(s < c, cnt_cut, 0), axis=0)  # this chunk's first position
        x_row = x_ptr + row * vocab
        cd_row = cd_ptr + row * vocab
        ci_row = ci_ptr + row * vocab
        lo, hi = _chunk_range(c, chunk, vocab)
        for start in range(lo, hi, BLOCK):
            idx, mask, d = _distance(x_row, start, hi, top, inv_t, BLOCK)
            keep = mask & (d <= cut_d)
            pos = n + tl.cumsum(keep.to(tl.int32), axis=0) - 1
            tl.store(cd_row + pos, d, mask=keep)
            tl.store(ci_row + pos, idx, mask=keep)
            n += tl.sum(keep.to(tl.int32), axis=0)
        if c == 0:
            row_slot = (row * (S + 1) + S) * NW
            tl.store(wf_ptr + row_slot, cut_d)
            tl.store(wf_ptr + row_slot + 1, z_all)
            # the level below the cut (its key; -1 below the first level: every key is above it)
            below = tl.max(tl.where(j == cut - 1, lev, float("-inf")), axis=0)
            tl.store(wf_ptr + row_slot + 2, tl.where(cut > 0, below, tl.full([], -1, tl.int32).to(tl.float32,
                                                                                              bitcast=True)))
            tl.store(wi_ptr + row_slot, tl.sum(cnt_cut, axis=0))


@triton.jit
def _order_key(x):
    """int32 keys that order fp32 values: a < b iff key(a) < key(b) (neither NaN)."""
    b = x.to(tl.int32, bitcast=True)
    return tl.where(b < 0, b ^ 0x7FFFFFFF, b)


@triton.jit
def _copy_between(src, n, dst, cap, lo, hi, SBLOCK: tl.constexpr):
    """Copies the values of src[0, n) whose _order_key lies in [lo, hi] to dst, in order, and
    returns their count (written while it is <= cap)."""
    m = 0
    for start in range(0, n, SBLOCK):
        i = start + tl.arange(0, SBLOCK)
        v = tl.load(src + i, mask=i < n, other=0.0)
        key = _order_key(v)
        keep = (i < n) & (key >= lo) & (key <= hi)
        pos = m + tl.cumsum(keep.to(tl.int32), axis=0) - 1
        tl.store(dst + pos, v, mask=keep & (pos < cap))
        m += tl.sum(keep.to(tl.int32), axis=0)
    return m


COUNT, EXP_NEG, VALUE = tl.constexpr(0), tl.constexpr(1), tl.constexpr(2)  # _search's weights


@triton.jit
def _search(src, n, lo, hi, target, cap, RISING: tl.constexpr, WEIGHT: tl.constexpr, SBLOCK: tl.constexpr):
    """The threshold between lo and hi (int32 keys, _order_key of the n candidates v at src)
    where F reaches target; returns the final (lo, hi), hi - lo = 1. F(key) sums a weight (1,
    exp(-v) or v) over the candidates with key(v) <= key (RISING: the smallest key with
    F >= target is hi; F(lo) < target is known) or with key(v) >= key (falling: the largest
    is lo; F(hi) < target is known). Each pass tests NPIV pivots spread over the open interval
    (lo, hi) and keeps the part where F crosses the target: 2^31 keys in 8 passes, the 2^22.5
    keys between two cut levels in 6. SBLOCK candidates per step: a step's loads wait on L2, so
    few wide steps beat many narrow ones. When the candidates take more than one step, those
    left between the bounds after the first pass that moves the known bound (about 1/17 of
    them) are copied past the n, to src + n (if they fit in cap slots), and the later passes
    read only them, F starting from that pass's F at the bound: one step a pass where each
    took n / SBLOCK (top-p 0.9 over 128256 logits keeps ~5-7k candidates: 6 passes of 7
    steps became 7 + 7 + 5)."""
    lo = lo.to(tl.int64)
    hi = hi.to(tl.int64)
    j = tl.arange(0, NPIV).to(tl.int64)
    dst = src + n
    f_out = tl.zeros([], tl.float32)  # F at the known bound of the candidates no longer read
    narrow = (n > SBLOCK).to(tl.int32)  # copy once, after the first pass that moves the known bound
    while hi - lo > 1:
        # in [lo + 1, hi - 1]: int32 keys, compared in 32 bits
        piv = (lo + 1 + ((hi - lo - 1) * (j + 1)) // (NPIV + 1)).to(tl.int32)
        f = tl.zeros([SBLOCK, NPIV], tl.float32)  # per lane: summed across the warps once per pass
        for start in range(0, n, SBLOCK):
            i = start + tl.arange(0, SBLOCK)
            m = i < n
            v = tl.load(src + i, mask=m, other=0.0)
            if WEIGHT == COUNT:
                w = tl.full([SBLOCK], 1.0, tl.float32)
            elif WEIGHT == EXP_NEG:
                w = tl.exp(-v)
            else:
                w = v
            key = _order_key(v)[:, None]
            side = (key <= piv[None, :]) if RISING else (key >= piv[None, :])
            f += tl.where(m[:, None] & side, w[:, None], 0.0)
        fs = f_out + tl.sum(f, axis=0)
        ok = fs >= target  # the pivots that pass follow (RISING) or precede those that fail
        f_known = tl.max(tl.where(ok, -1.0, fs), axis=0)  # F at the bound a failing pivot set (else -1)
        if RISING:
            hi = tl.min(tl.where(ok, piv.to(tl.int64), hi), axis=0)
            lo = tl.max(tl.where(ok, lo, piv.to(tl.int64)), axis=0)
        else:
            lo = tl.max(tl.where(ok, piv.to(tl.int64), lo), axis=0)
            hi = tl.min(tl.where(ok, hi, piv.to(tl.int64)), axis=0)
        if narrow & (f_known >= 0) & (hi - lo > 1):
            narrow = narrow * 0
            if RISING:
                m_in = _copy_between(src, n, dst, cap, lo + 1, hi, SBLOCK)
            else:
                m_in = _copy_between(src, n, dst, cap, lo, hi - 1, SBLOCK)
            if m_in <= cap:
                src, n, f_out = dst, m_in, f_known
    return lo, hi


@triton.jit(do_not_specialize=["k_s", "seed", "offset"])
def _select_kernel(x_ptr, params_ptr, wf_ptr, wi_ptr, cd_ptr, ci_ptr, tok_ptr, lp_ptr, vocab, chunk, S, inv_t_s,
                   k_s, p_s, min_p_s, seed, seed_ptr, offset, HAS_PARAMS: tl.constexpr, SEED_FROM_PTR: tl.constexpr,
                   RETURN_LOGPROBS: tl.constexpr, SMAX: tl.constexpr, BLOCK: tl.constexpr,
                   SBLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    inv_t, k, p, min_p = _row_params(params_ptr, row, inv_t_s, k_s, p_s, min_p_s, HAS_PARAMS)
    top, bad = _row_top(wf_ptr, wi_ptr, row, S, SMAX)
    s, slot = _slots(row, S, SMAX)
    tok = tl.zeros([], tl.int64) + NAN_ROW
    logprob = tl.zeros([], tl.float32)
    if bad:
        tok = tok * 0 + NAN_ROW
    elif top == float("-inf"):
        tok = tok * 0 + EMPTY_ROW
    elif inv_t == float("inf"):
        # greedy: the first index of the max, in the first chunk that holds it
        first = tl.min(tl.where(tl.load(wf_ptr + slot, mask=s < S, other=float("-inf")) == top, s, SMAX), axis=0)
        tok = tok * 0 + tl.load(wi_ptr + (row * (S + 1) + first) * NW + 1).to(tl.int64)
    else:
        need_k = (k > 0) & (k < vocab)
        need_p = p < 1.0
        d_m = float("inf")
        if min_p > 0.0:
            d_m = -tl.log(min_p)
        key = load_seed(seed, seed_ptr, SEED_FROM_PTR)
        u = tl.max(uniform_at(key, tl.zeros([1], tl.int64) + offset.to(tl.int64) + row), axis=0)
        x_row = x_ptr + row * vocab
        if need_k | need_p | (min_p > 0.0):
            cd_row = cd_ptr + row * vocab
            row_slot = (row * (S + 1) + S) * NW
            cut = tl.load(wf_ptr + row_slot)
            n = tl.load(wi_ptr + row_slot)
            # exact thresholds on the candidates, above the level below the cut: it held fewer than k
            # tokens (top-k), or less than the target mass (top-p alone)
            cut_key = cut.to(tl.int32, bitcast=True)
            below_key = tl.load(wf_ptr + row_slot + 2).to(tl.int32, bitcast=True)
            d_k = float("inf")
            if need_k & (n >= k):  # fewer candidates than k (only below the min-p cut): top-k does not bind
                _, hi_k = _search(cd_row, n, below_key, cut_key, k.to(tl.float32), vocab - n, True, COUNT, SBLOCK)
                d_k = hi_k.to(tl.int32).to(tl.float32, bitcast=True)
            d_p = float("inf")
            if need_p:
                # top-p is relative to the mass top-k keeps, or to the whole row's
                target = p * tl.load(wf_ptr + row_slot + 1)
                if need_k:
                    zk_v = tl.zeros([CBLOCK], tl.float32)
                    for start in range(0, n, CBLOCK):
                        i = start + tl.arange(0, CBLOCK)
                        d = tl.load(cd_row + i, mask=i < n, other=float("inf"))
                        zk_v += tl.where(d <= d_k, tl.exp(-d), 0.0)
                    target = p * tl.sum(zk_v, axis=0)
                hi = tl.minimum(cut, d_k).to(tl.int32, bitcast=True)
                p_lo = tl.where(need_k, -1, below_key)  # top-p after top-k: anywhere below d_k
                _, hi_p = _search(cd_row, n, p_lo, hi, target, vocab - n, True, EXP_NEG, SBLOCK)
                d_p = hi_p.to(tl.int32).to(tl.float32, bitcast=True)
            t = tl.minimum(tl.minimum(d_k, d_p), d_m)
            # the draw: block sums in order for z and for the scan, BLOCK wide (a scan step is a
            # reduction across the warps: few wide steps, not many narrow ones)
            z = 0.0
            for start in range(0, n, BLOCK):
                i = start + tl.arange(0, BLOCK)
                d = tl.load(cd_row + i, mask=i < n, other=float("inf"))
                z += tl.sum(tl.where(d <= t, tl.exp(-d), 0.0), axis=0)
            target = u * z
            run = 0.0
            pick = 2147483647
            last = -1
            for start in range(0, n, BLOCK):
                i = start + tl.arange(0, BLOCK)
                d = tl.load(cd_row + i, mask=i < n, other=float("inf"))
                e = tl.where(d <= t, tl.exp(-d), 0.0)
                hit = ((run + tl.cumsum(e, axis=0)) > target) & (e > 0)
                pick = tl.minimum(pick, tl.min(tl.where(hit, i, 2147483647), axis=0))
                last = tl.maximum(last, tl.max(tl.where(e > 0, i, -1), axis=0))
                run += tl.sum(e, axis=0)
            if pick == 2147483647:  # u * z rounded up to z
                pick = last
            tok = tok * 0 + tl.load(ci_ptr + row * vocab + pick).to(tl.int64)
            logprob = logprob * 0 - tl.load(cd_row + pick) - tl.log(z)
        else:
            # no filter: the chunk from the chunks' masses (step 2), then the token in it
            z_c = tl.load(wf_ptr + slot + 1, mask=s < S, other=0.0)
            z = tl.sum(z_c, axis=0)
            target = u * z
            sel = tl.min(tl.where(tl.cumsum(z_c, axis=0) > target, s, SMAX), axis=0)
            if sel == SMAX:  # u * z rounded up to z
                sel = tl.max(tl.where(z_c > 0, s, -1), axis=0)
            run = tl.sum(tl.where(s < sel, z_c, 0.0), axis=0)
            lo, hi = _chunk_range(sel, chunk, vocab)
            pick = 2147483647
            last = -1
            for start in range(lo, hi, BLOCK):
                i, mask, d = _distance(x_row, start, hi, top, inv_t, BLOCK)
                e = tl.where(mask, tl.exp(-d), 0.0)
                hit = ((run + tl.cumsum(e, axis=0)) > target) & (e > 0)
                pick = tl.minimum(pick, tl.min(tl.where(hit, i, 2147483647), axis=0))
                last = tl.maximum(last, tl.max(tl.where(e > 0, i, -1), axis=0))
                run += tl.sum(e, axis=0)
            if pick == 2147483647:
                pick = last
            tok = tok * 0 + pick.to(tl.int64)
            logprob = logprob * 0 - (top - tl.load(x_row + pick).to(tl.float32)) * inv_t - tl.log(z)
    tl.store(tok_ptr + row, tok)
    if RETURN_LOGPROBS:
        tl.store(lp_ptr + row, logprob)


def _block(vocab: int) -> int:
    return min(next_pow2(vocab), 2048)


def _split(batch: int, vocab: int, device: torch.device) -> tuple[int, int]:
    """(chunks per row, chunk size): about 4 programs per SM, chunks of at least 2048 logits
    and a multiple of 64 on a GPU (16 in the interpreter, so that tests split small rows)."""
    least, align = (2048, 64) if device.type == "cuda" else (16, 16)
    chunks = max(1, min(cdiv(4 * num_sms(device), batch), cdiv(vocab, least)))
    chunk = cdiv(cdiv(vocab, chunks), align) * align
    return cdiv(vocab, chunk), chunk


def _sblock(vocab: int, device: torch.device) -> int:
    """Candidates per step of the threshold searches: 1024 on a GPU; 64 in the interpreter, so
    that tests take the searches' copy of the candidates left after a pass (``_copy_between``)."""
    return min(next_pow2(vocab), 1024 if device.type == "cuda" else 64)


def _workspace(batch: int, chunks: int, device: torch.device):
    return (torch.empty(batch, chunks + 1, NW, dtype=torch.float32, device=device),
            torch.empty(batch, chunks + 1, NW, dtype=torch.int32, device=device))


def sample_tokens(logits, params, prev_tokens, token_counts, inv_temperature, top_k, top_p, min_p,
                  repetition_penalty, presence_penalty, frequency_penalty, seed, seed_tensor, offset,
                  return_logprobs):
    batch, vocab = logits.shape
    device = logits.device
    tokens = torch.empty(batch, dtype=torch.int64, device=device)
    logprobs = torch.empty(batch if return_logprobs else 0, dtype=torch.float32, device=device)
    if batch == 0:
        return tokens, logprobs
    has_params = params is not None
    x = logits
    if prev_tokens is not None or token_counts is not None:
        x = torch.empty(batch, vocab, dtype=torch.float32, device=device)
        from_prev = prev_tokens is not None
        n_prev = prev_tokens.shape[1] if from_prev else 0
        counts = torch.zeros(batch, vocab, dtype=torch.int32, device=device) if from_prev else token_counts
        _penalize_kernel[(batch,)](
            logits, prev_tokens if from_prev else counts, counts, params if has_params else logits, x, vocab, n_prev,
            repetition_penalty, presence_penalty, frequency_penalty, HAS_PARAMS=has_params, FROM_PREV=from_prev,
            BLOCK=_block(vocab), BLOCK_N=min(next_pow2(max(n_prev, 1)), 1024), num_warps=4)
    chunks, chunk = _split(batch, vocab, device)
    wf, wi = _workspace(batch, chunks, device)
    p = params if has_params else x
    smax = next_pow2(chunks)
    cblock = min(next_pow2(chunk), 1024)
    scalars = (inv_temperature, top_k, top_p, min_p)
    # with scalar settings, skip the launches whose programs would all return at once
    greedy = not has_params and inv_temperature == float("inf")
    filtered = has_params or 0 < top_k < vocab or top_p < 1.0 or min_p > 0.0
    _max_kernel[(batch, chunks)](x, wf, wi, vocab, chunk, chunks, BLOCK=cblock, num_warps=4)
    if not greedy:
        _levels_kernel[(batch, chunks)](x, p, wf, wi, vocab, chunk, chunks, *scalars, HAS_PARAMS=has_params,
                                        SMAX=smax, num_warps=8)
    # the candidates' d and vocabulary index: a scratch row each, as wide as the vocabulary
    cand_d, cand_i = wf, wi  # unread without a filter (the types the kernel compiles for)
    if filtered and not greedy:
        cand_d = torch.empty(batch, vocab, dtype=torch.float32, device=device)
        cand_i = torch.empty(batch, vocab, dtype=torch.int32, device=device)
        _compact_kernel[(batch, chunks)](x, p, wf, wi, cand_d, cand_i, vocab, chunk, chunks, *scalars,
                                         HAS_PARAMS=has_params, SMAX=smax, BLOCK=cblock, num_warps=4)
    _select_kernel[(batch,)](
        x, p, wf, wi, cand_d, cand_i, tokens, logprobs if return_logprobs else tokens, vocab, chunk, chunks,
        *scalars, seed, seed_tensor if seed_tensor is not None else tokens, offset, HAS_PARAMS=has_params,
        SEED_FROM_PTR=seed_tensor is not None, RETURN_LOGPROBS=return_logprobs, SMAX=smax, BLOCK=_block(vocab),
        SBLOCK=_sblock(vocab, device), num_warps=8)
    return tokens, logprobs


# ---- FlashInfer's renorm and mask ops ------------------------------------------------
# The same split as the sampler, on the values themselves: the chunks' max
# (``_max_kernel``), their counts (top-k) or masses (top-p) of the values at or
# above 16 levels below the max (logits: max - 2^(j/2); probabilities:
# max * 2^-2^(j/2); the last level keeps everything), the candidates at or
# above the lowest level that holds the target, compacted per row; then one
# program per row finds the threshold t (one of the row's values) on the
# candidates, by a search on order-preserving int32 keys testing NPIV pivots
# per pass between that level and the one above it, and every chunk's program
# keeps its values >= t. Semantics: genfast/reference/sampling.py. On an H200
# (2026-11-27, 64 x 128256 fp32) the split version with the search repeated in
# every chunk's program took 0.211 ms for top_k_mask_logits (one program per
# row before: 1.76 ms; eager 0.224) and 1.25 ms for top_p_renorm_probs
# (eager 1.14): its many candidates were searched 9 times per row.

@triton.jit
def _filter_levels(top, IS_PROBS: tl.constexpr):
    if IS_PROBS:
        return top * tl.exp2(-_levels())  # the last level, 0, keeps every probability
    else:
        return top - _levels()


@triton.jit
def _filter_target(arr_ptr, row, k_s, p_s, HAS_ARR: tl.constexpr, TOP_P: tl.constexpr):
    if TOP_P:
        target = (tl.load(arr_ptr + row) if HAS_ARR else p_s) + tl.zeros([], tl.float32)
    else:
        target = ((tl.load(arr_ptr + row) if HAS_ARR else k_s) + tl.zeros([], tl.int64)).to(tl.float32)
    return target


@triton.jit
def _filter_levels_kernel(x_ptr, wf_ptr, wi_ptr, vocab, chunk, S, IS_PROBS: tl.constexpr, TOP_P: tl.constexpr,
                          SMAX: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    top, _ = _row_top(wf_ptr, wi_ptr, row, S, SMAX)
    lev = _filter_levels(top, IS_PROBS)
    x_row = x_ptr + row * vocab
    lo, hi = _chunk_range(c, chunk, vocab)
    cnt = tl.zeros([LBLOCK, NLEV], tl.float32)  # per lane: summed across the warps once at the end
    mass = tl.zeros([LBLOCK, NLEV], tl.float32)
    total = tl.zeros([LBLOCK], tl.float32)
    for start in range(lo, hi, LBLOCK):
        idx = start + tl.arange(0, LBLOCK)
        mask = idx < hi
        x = tl.load(x_row + idx, mask=mask, other=0.0).to(tl.float32)
        above = mask[:, None] & (x[:, None] >= lev[None, :])
        cnt += above.to(tl.float32)
        if TOP_P:
            mass += tl.where(above, x[:, None], 0.0)
        total += x
    slot = (row * (S + 1) + c) * NW
    j = tl.arange(0, NLEV)
    tl.store(wf_ptr + slot + 1, tl.sum(total, axis=0))
    tl.store(wf_ptr + slot + 2 + j, tl.sum(mass, axis=0))
    tl.store(wi_ptr + slot + 2 + j, tl.sum(cnt.to(tl.int32), axis=0))


@triton.jit(do_not_specialize=["k_s", "p_s"])
def _filter_compact_kernel(x_ptr, arr_ptr, wf_ptr, wi_ptr, c_ptr, vocab, chunk, S, k_s, p_s, HAS_ARR: tl.constexpr,
                           IS_PROBS: tl.constexpr, TOP_P: tl.constexpr, SMAX: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    target = _filter_target(arr_ptr, row, k_s, p_s, HAS_ARR, TOP_P)
    s, slot = _slots(row, S, SMAX)
    j = tl.arange(0, NLEV)
    if TOP_P:
        total = tl.sum(tl.load(wf_ptr + slot + 1, mask=s < S, other=0.0), axis=0)
        # top_p is absolute, as FlashInfer's: a row holding less mass is kept whole
        on = (target < 1.0) & (total >= target)
        f = tl.sum(tl.load(wf_ptr + slot[:, None] + 2 + j[None, :], mask=(s < S)[:, None], other=0.0), axis=0)
    else:
        on = (target > 0.0) & (target < vocab)
        f = tl.sum(tl.load(wi_ptr + slot[:, None] + 2 + j[None, :], mask=(s < S)[:, None], other=0),
                   axis=0).to(tl.float32)
    cut = tl.min(tl.where(f >= target, j, NLEV - 1), axis=0)
    n = 0
    if on:
        top, _ = _row_top(wf_ptr, wi_ptr, row, S, SMAX)
        lev = tl.max(tl.where(j == cut, _filter_levels(top, IS_PROBS), float("-inf")), axis=0)
        cnt_cut = tl.sum(tl.where(j[None, :] == cut, tl.load(wi_ptr + slot[:, None] + 2 + j[None, :],
                                                              mask=(s < S)[:, None], other=0), 0), axis=1)
        n = tl.sum(cnt_cut, axis=0)
        pos0 = tl.sum(tl.where(s < c, cnt_cut, 0), axis=0)  # this chunk's first position
        x_row = x_ptr + row * vocab
        c_row = c_ptr + row * vocab
        lo, hi = _chunk_range(c, chunk, vocab)
        for start in range(lo, hi, BLOCK):
            idx = start + tl.arange(0, BLOCK)
            mask = idx < hi
            x = tl.load(x_row + idx, mask=mask, other=0.0).to(tl.float32)
            keep = mask & (x >= lev)
            tl.store(c_row + pos0 + tl.cumsum(keep.to(tl.int32), axis=0) - 1, x, mask=keep)
            pos0 += tl.sum(keep.to(tl.int32), axis=0)
    if c == 0:
        row_slot = (row * (S + 1) + S) * NW
        tl.store(wi_ptr + row_slot, on.to(tl.int32))
        tl.store(wi_ptr + row_slot + 1, n)
        tl.store(wi_ptr + row_slot + 2, cut)


@triton.jit(do_not_specialize=["k_s", "p_s"])
def _filter_search_kernel(arr_ptr, wf_ptr, wi_ptr, c_ptr, vocab, S, k_s, p_s, HAS_ARR: tl.constexpr,
                          IS_PROBS: tl.constexpr, TOP_P: tl.constexpr, RENORM: tl.constexpr, SMAX: tl.constexpr,
                          SBLOCK: tl.constexpr):
    """One program per row: the threshold t, the largest key with F(key) >= target, F the count (or
    mass) of the candidates >= it. Every value at or above the cut level is a candidate and F there
    reaches the target; at the level above it F does not (counts exactly, masses to rounding), so the
    search runs between the two. With RENORM also the kept mass z. Both go to the row's slot."""
    row = tl.program_id(0).to(tl.int64)
    row_slot = (row * (S + 1) + S) * NW
    on = tl.load(wi_ptr + row_slot) > 0
    n = tl.load(wi_ptr + row_slot + 1)
    c_row = c_ptr + row * vocab
    t = float("-inf")
    z = 0.0
    if on:
        target = _filter_target(arr_ptr, row, k_s, p_s, HAS_ARR, TOP_P)
        top, _ = _row_top(wf_ptr, wi_ptr, row, S, SMAX)
        j = tl.arange(0, NLEV)
        cut = tl.load(wi_ptr + row_slot + 2)
        lev = _filter_levels(top, IS_PROBS)
        lo = _order_key(tl.max(tl.where(j == cut, lev, float("-inf")), axis=0)).to(tl.int64)
        hi = tl.zeros([], tl.int64) + 2147483648
        if cut > 0:
            hi = _order_key(tl.max(tl.where(j == cut - 1, lev, float("-inf")), axis=0)).to(tl.int64)
        lo, hi = _search(c_row, n, lo, hi, target, vocab - n, False, VALUE if TOP_P else COUNT, SBLOCK)
        key = lo.to(tl.int32)
        t = tl.where(key < 0, key ^ 0x7FFFFFFF, key).to(tl.float32, bitcast=True)
        if RENORM:
            z_v = tl.zeros([SBLOCK], tl.float32)
            for start in range(0, n, SBLOCK):
                i = start + tl.arange(0, SBLOCK)
                x = tl.load(c_row + i, mask=i < n, other=0.0)
                z_v += tl.where(x >= t, x, 0.0)
            z = tl.sum(z_v, axis=0)
    elif RENORM:
        s, slot = _slots(row, S, SMAX)
        z = tl.sum(tl.load(wf_ptr + slot + 1, mask=s < S, other=0.0), axis=0)
    tl.store(wf_ptr + row_slot, t)
    tl.store(wf_ptr + row_slot + 1, z)


@triton.jit
def _filter_apply_kernel(x_ptr, wf_ptr, out_ptr, vocab, chunk, S, RENORM: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    row_slot = (row * (S + 1) + S) * NW
    t = tl.load(wf_ptr + row_slot)
    inv = 1.0 / tl.maximum(tl.load(wf_ptr + row_slot + 1), 1e-8)  # FlashInfer's guard against an all-zero row
    x_row = x_ptr + row * vocab
    out_row = out_ptr + row * vocab
    lo, hi = _chunk_range(c, chunk, vocab)
    for start in range(lo, hi, BLOCK):
        idx = start + tl.arange(0, BLOCK)
        mask = idx < hi
        raw = tl.load(x_row + idx, mask=mask, other=0.0)
        x = raw.to(tl.float32)
        if RENORM:
            tl.store(out_row + idx, tl.where(x >= t, x * inv, 0.0), mask=mask)
        else:
            tl.store(out_row + idx, tl.where(x >= t, raw, float("-inf")), mask=mask)


def _filter(x, per_row, k, p, top_p: bool, renorm: bool):
    batch, vocab = x.shape
    out = torch.empty_like(x)
    if batch == 0:
        return out
    chunks, chunk = _split(batch, vocab, x.device)
    wf, wi = _workspace(batch, chunks, x.device)
    cand = torch.empty(batch, vocab, dtype=torch.float32, device=x.device)
    arr = per_row if per_row is not None else x
    flags = {"IS_PROBS": renorm, "TOP_P": top_p, "SMAX": next_pow2(chunks)}
    block = min(next_pow2(chunk), 1024)
    _max_kernel[(batch, chunks)](x, wf, wi, vocab, chunk, chunks, BLOCK=block, num_warps=4)
    _filter_levels_kernel[(batch, chunks)](x, wf, wi, vocab, chunk, chunks, **flags, num_warps=8)
    _filter_compact_kernel[(batch, chunks)](x, arr, wf, wi, cand, vocab, chunk, chunks, k, p,
                                            HAS_ARR=per_row is not None, **flags, BLOCK=block, num_warps=4)
    _filter_search_kernel[(batch,)](arr, wf, wi, cand, vocab, chunks, k, p, HAS_ARR=per_row is not None,
                                    RENORM=renorm, **flags, SBLOCK=_sblock(vocab, x.device), num_warps=8)
    _filter_apply_kernel[(batch, chunks)](x, wf, out, vocab, chunk, chunks, RENORM=renorm, BLOCK=block, num_warps=4)
    return out


def top_k_renorm_probs(probs, top_k_arr, top_k):
    return _filter(probs, top_k_arr, top_k, 1.0, top_p=False, renorm=True)


def top_p_renorm_probs(probs, top_p_arr, top_p):
    return _filter(probs, top_p_arr, 0, top_p, top_p=True, renorm=True)


def top_k_mask_logits(logits, top_k_arr, top_k):
    return _filter(logits, top_k_arr, top_k, 1.0, top_p=False, renorm=False)
