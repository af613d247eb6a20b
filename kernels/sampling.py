"""Token sampling from logits in Triton: penalties, temperature, top-k, top-p,
min-p and an inverse-CDF draw, one program per row, with no sort.

Semantics: ``genfast/reference/sampling.py``. Per row, with d = (max - x) *
inv_temperature (d >= 0; a non-negative float's bits order like the float, so
thresholds are found by bisection on the int32 bits of d):

1. one pass: max, NaN/+inf detection;
2. top-k: bisection for the smallest key with count(d <= key) >= k; top-p:
   bisection for the smallest key with mass(d <= key) >= top_p * Z_k; each
   step is a pass over the row (from L2: a 128k fp32 row is 512 KB);
3. one pass for the kept mass Z, one for the draw: block sums in the same
   order, and ``tl.cumsum`` inside the block where the running mass passes
   ``u * Z``, u = position ``offset + row`` of the uniform stream.

Penalties, when asked for, first write an fp32 copy of the logits with the
penalized entries (``_penalize_kernel``), from ``token_counts`` or from counts
of ``prev_tokens`` built in a zeroed int32 scratch by one integer
``atomic_add`` per occurrence (exact, so independent of the order).

Memory traffic for B rows of V logits of s bytes: the sort-based eager path
(softmax, sort, cumsum, scatter, multinomial) moves ~15 B·V·4 bytes and sorts;
this kernel reads B·V·s once from DRAM and re-reads the row from L2 in each
bisection step (up to 2 x 31 steps when top-k and top-p are both on), which
at batch >= #SMs is L2-bound. Not measured on a GPU yet: checked with
``TRITON_INTERPRET=1`` against the reference.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .rng import load_seed, uniform_at

NAN_ROW, EMPTY_ROW = tl.constexpr(-1), tl.constexpr(-2)  # compiled kernels read globals only as constexpr
KEY_INF = tl.constexpr(0x7F800000)  # the bits of +inf: every d's key is <= this


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


@triton.jit(do_not_specialize=["k_s", "seed", "offset"])
def _sample_kernel(x_ptr, params_ptr, tok_ptr, lp_ptr, vocab, inv_t_s, k_s, p_s, min_p_s, seed, seed_ptr, offset,
                   HAS_PARAMS: tl.constexpr, SEED_FROM_PTR: tl.constexpr, RETURN_LOGPROBS: tl.constexpr,
                   BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * vocab
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
        # top-k: the k-th smallest d, by bisection on its bits
        d_k = float("inf")
        if (k > 0) & (k < vocab):
            lo = -1
            hi = KEY_INF
            while hi - lo > 1:
                mid = lo + (hi - lo) // 2
                cnt_v = tl.zeros([BLOCK], tl.int32)
                for start in range(0, vocab, BLOCK):
                    idx, mask, d = _distance(x_row, start, vocab, top, inv_t, BLOCK)
                    cnt_v += (mask & (d.to(tl.int32, bitcast=True) <= mid)).to(tl.int32)
                if tl.sum(cnt_v, axis=0) >= k:
                    hi = mid
                else:
                    lo = mid
            d_k = hi.to(tl.int32).to(tl.float32, bitcast=True)
        # top-p on the mass top-k keeps
        d_p = float("inf")
        if p < 1.0:
            zk_v = tl.zeros([BLOCK], tl.float32)
            for start in range(0, vocab, BLOCK):
                idx, mask, d = _distance(x_row, start, vocab, top, inv_t, BLOCK)
                zk_v += tl.where(mask & (d <= d_k), tl.exp(-d), 0.0)
            target = p * tl.sum(zk_v, axis=0)
            lo = -1
            hi = d_k.to(tl.int32, bitcast=True)
            while hi - lo > 1:
                mid = lo + (hi - lo) // 2
                m_v = tl.zeros([BLOCK], tl.float32)
                for start in range(0, vocab, BLOCK):
                    idx, mask, d = _distance(x_row, start, vocab, top, inv_t, BLOCK)
                    m_v += tl.where(mask & (d.to(tl.int32, bitcast=True) <= mid), tl.exp(-d), 0.0)
                if tl.sum(m_v, axis=0) >= target:
                    hi = mid
                else:
                    lo = mid
            d_p = hi.to(tl.int32).to(tl.float32, bitcast=True)
        d_m = float("inf")
        if min_p > 0.0:
            d_m = -tl.log(min_p)
        t = tl.minimum(tl.minimum(d_k, d_p), d_m)

        # the draw: block sums in order for Z and for the scan
        z = 0.0
        for start in range(0, vocab, BLOCK):
            idx, mask, d = _distance(x_row, start, vocab, top, inv_t, BLOCK)
            z += tl.sum(tl.where(mask & (d <= t), tl.exp(-d), 0.0), axis=0)
        key = load_seed(seed, seed_ptr, SEED_FROM_PTR)
        u = tl.max(uniform_at(key, tl.zeros([1], tl.int64) + offset.to(tl.int64) + row), axis=0)
        target = u * z
        run = 0.0
        pick = 2147483647
        last = -1
        for start in range(0, vocab, BLOCK):
            idx, mask, d = _distance(x_row, start, vocab, top, inv_t, BLOCK)
            e = tl.where(mask & (d <= t), tl.exp(-d), 0.0)
            hit = ((run + tl.cumsum(e, axis=0)) > target) & (e > 0)
            pick = tl.minimum(pick, tl.min(tl.where(hit, idx, 2147483647), axis=0))
            last = tl.maximum(last, tl.max(tl.where(e > 0, idx, -1), axis=0))
            run += tl.sum(e, axis=0)
        if pick == 2147483647:  # u * z rounded up to z
            pick = last
        tok = tok * 0 + pick.to(tl.int64)
        if RETURN_LOGPROBS:
            x_tok = tl.load(x_row + pick).to(tl.float32)
            logprob = logprob * 0 - (top - x_tok) * inv_t - tl.log(z)
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
    _sample_kernel[(batch,)](
        x, params if has_params else x, tokens, logprobs if return_logprobs else tokens, vocab,
        inv_temperature, top_k, top_p, min_p, seed, seed_tensor if seed_tensor is not None else tokens, offset,
        HAS_PARAMS=has_params, SEED_FROM_PTR=seed_tensor is not None, RETURN_LOGPROBS=return_logprobs,
        BLOCK=block, num_warps=8)
    return tokens, logprobs


# ---- FlashInfer's renorm and mask ops ------------------------------------------------
# One program per row: the threshold t (one of the row's values) by bisection
# on order-preserving int32 keys, 32 passes over the row, then one pass (two
# for renormalization) that keeps the values >= t. Semantics:
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
        # the largest key with F(key) >= target, F the count (or mass) of the keys >= it
        lo = tl.zeros([], tl.int64) - 2147483648
        hi = tl.zeros([], tl.int64) + 2147483648
        while hi - lo > 1:
            mid = lo + (hi - lo) // 2
            f_v = tl.zeros([BLOCK], tl.float32)
            for start in range(0, vocab, BLOCK):
                idx = start + tl.arange(0, BLOCK)
                mask = idx < vocab
                x = tl.load(x_row + idx, mask=mask, other=0.0).to(tl.float32)
                w = x if TOP_P else tl.full([BLOCK], 1.0, tl.float32)
                f_v += tl.where(mask & (_order_key(x).to(tl.int64) >= mid), w, 0.0)
            if tl.sum(f_v, axis=0) >= target:
                lo = mid
            else:
                hi = mid
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
