"""Token sampling from logits in plain PyTorch: the fallback and the oracle.

The semantics every backend implements (``genfast/sampling.py`` documents
them for users), for one row ``x`` of ``vocab`` logits:

1. penalties on the raw logits, in fp32, from the count c of each token
   (``token_counts``, or counted from ``prev_tokens``, ids < 0 padding): every
   token with c > 0 gets ``x = (x * rep if x < 0 else x / rep) - presence -
   frequency * c``, evaluated left to right (HF's repetition penalty, then
   OpenAI/vLLM's presence and frequency penalties);
2. ``X = max(x)``, ``d = (X - x) * inv_temperature``: the distance below the
   top in temperature-scaled nats (d >= 0, exactly 0 at the max, +inf at
   -inf logits); the filtered distribution is ``exp(-d)`` over the kept set;
3. filters, as thresholds on d (so ties at a threshold are all kept):
   top-k keeps ``d <= D_k``, D_k the k-th smallest d (HF's TopKLogitsWarper);
   top-p keeps ``d <= D_p``, D_p the smallest d value whose tie-inclusive
   mass ``sum(exp(-d_j) for d_j <= D_p)`` reaches ``top_p`` times the mass
   kept by top-k (HF's TopPLogitsWarper applied after top-k); min-p keeps
   ``d <= -log(min_p)`` (HF's MinPLogitsWarper); the kept set is
   ``d <= min(D_k, D_p, D_m)``;
4. inverse CDF in vocabulary order with one uniform per row,
   ``u`` = position ``offset + row`` of the uniform stream: the token is the first kept j whose
   running mass exceeds ``u * Z`` (Z the kept mass); if rounding leaves none,
   the last kept token with non-zero mass.

``inv_temperature = +inf`` (temperature 0) is greedy: the first index of the
max penalized logit, log-probability 0. A row whose raw logits hold NaN or
+inf returns token -1; a row with nothing to sample (every logit -inf after
penalties) returns -2: the public function turns both into errors.

Arithmetic in fp32 (fp64 for fp64 logits); the thresholds are found by a full
sort here, by selection in the kernels.
"""
from __future__ import annotations

import math

import torch

from .rng import resolve_seed, uniform_stream

# Columns of the per-row parameter tensor (batch, 7), fp32.
PARAM_NAMES = ("inv_temperature", "top_k", "top_p", "min_p", "repetition_penalty", "presence_penalty",
               "frequency_penalty")
NAN_ROW, EMPTY_ROW = -1, -2


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def row_params(batch: int, params, scalars, dtype, device) -> list[torch.Tensor]:
    """The 7 per-row parameters as (batch,) tensors in ``dtype``."""
    if params is not None:
        return [params[:, i].to(dtype) for i in range(len(PARAM_NAMES))]
    return [torch.full((batch,), float(s), dtype=dtype, device=device) for s in scalars]


def count_tokens(prev_tokens: torch.Tensor, vocab: int) -> torch.Tensor:
    """(batch, vocab) int64: how often each id occurs in each row of prev_tokens (ids outside [0, vocab) ignored)."""
    batch = prev_tokens.shape[0]
    # Padding goes to an extra column per row; bincount is deterministic on every device.
    idx = torch.where((prev_tokens >= 0) & (prev_tokens < vocab), prev_tokens, vocab)
    flat = idx + (vocab + 1) * torch.arange(batch, device=idx.device)[:, None]
    counts = torch.bincount(flat.flatten(), minlength=batch * (vocab + 1))
    return counts.view(batch, vocab + 1)[:, :vocab]


def penalize(x: torch.Tensor, counts, rep, presence, freq) -> torch.Tensor:
    """The penalties on x (fp32/fp64 copy of the logits) from counts (batch, vocab)."""
    if counts is None:
        return x
    rep, presence, freq = rep[:, None], presence[:, None], freq[:, None]
    pen = torch.where(x < 0, x * rep, x / rep) - presence - freq * counts.to(x.dtype)
    return torch.where(counts > 0, pen, x)


def _thresholds(d: torch.Tensor, k, p, min_p) -> torch.Tensor:
    """The largest kept distance per row, min(D_k, D_p, D_m)."""
    batch, vocab = d.shape
    inf = torch.full((batch,), math.inf, dtype=d.dtype, device=d.device)
    sorted_d = d.sort(dim=-1).values
    k_on = (k > 0) & (k < vocab)
    kk = torch.where(k_on, k, torch.ones_like(k)).long().clamp(1, vocab)
    d_k = torch.where(k_on, sorted_d.gather(1, (kk - 1)[:, None])[:, 0], inf)
    e = torch.exp(-sorted_d) * (sorted_d <= d_k[:, None])
    cum = e.cumsum(dim=-1)
    z_k = cum[:, -1]
    # The first sorted position whose cumulative mass reaches p * Z_k; its value is D_p.
    first = (cum < (p * z_k)[:, None]).sum(dim=-1).clamp(max=vocab - 1)
    d_p = torch.where(p < 1, sorted_d.gather(1, first[:, None])[:, 0], inf)
    d_m = torch.where(min_p > 0, -torch.log(min_p), inf)
    return torch.minimum(torch.minimum(d_k, d_p), d_m)


def sample_tokens(logits, params, prev_tokens, token_counts, inv_temperature, top_k, top_p, min_p,
                  repetition_penalty, presence_penalty, frequency_penalty, seed, seed_tensor, offset,
                  return_logprobs):
    batch, vocab = logits.shape
    cdt = compute_dtype(logits.dtype)
    device = logits.device
    tokens = torch.empty(batch, dtype=torch.int64, device=device)
    logprobs = torch.empty(batch if return_logprobs else 0, dtype=torch.float32, device=device)
    if batch == 0:
        return tokens, logprobs
    # Parameters in fp32 like the kernels (inv_temperature, thresholds); fp64 for fp64 logits.
    inv_t, k, p, min_p, rep, presence, freq = row_params(
        batch, params, (inv_temperature, top_k, top_p, min_p, repetition_penalty, presence_penalty,
                        frequency_penalty), torch.float32, device)
    k = k.to(cdt)
    p, min_p, rep, presence, freq = (t.to(cdt) for t in (p, min_p, rep, presence, freq))

    raw = logits.to(cdt)
    bad = torch.isnan(raw).any(dim=-1) | (raw == math.inf).any(dim=-1)
    if prev_tokens is not None and prev_tokens.shape[1] > 0:
        token_counts = count_tokens(prev_tokens, vocab)
    x = penalize(raw, token_counts, rep, presence, freq)
    top = x.max(dim=-1).values
    empty = top == -math.inf
    greedy = inv_t == math.inf

    scale = torch.where(greedy, torch.ones_like(inv_t), inv_t).to(cdt)
    d = (top[:, None] - x) * scale[:, None]
    d = torch.where(torch.isnan(d), math.inf, d)  # rows already marked bad or empty
    keep = d <= _thresholds(d, k, p, min_p)[:, None]
    e = torch.where(keep, torch.exp(-d), 0)
    cum = e.cumsum(dim=-1)
    z = cum[:, -1]
    u = uniform_stream(batch, resolve_seed(seed, seed_tensor), offset, device).to(cdt)
    tok = (cum <= (u * z)[:, None]).sum(dim=-1)
    positive = torch.arange(vocab, device=device).expand(batch, vocab).masked_fill(e <= 0, -1)
    last = positive.max(dim=-1).values
    tok = torch.where(tok >= vocab, last, tok)
    tok = torch.where(greedy, x.argmax(dim=-1), tok)
    tok = torch.where(empty, EMPTY_ROW, tok)
    tokens.copy_(torch.where(bad, NAN_ROW, tok))
    if return_logprobs:
        safe = tok.clamp(0, vocab - 1)[:, None]
        lp = -d.gather(1, safe)[:, 0] - torch.log(z)
        logprobs.copy_(torch.where(greedy, torch.zeros_like(lp), lp).float())
    return tokens, logprobs


# ---- FlashInfer's renorm and mask ops ---------------------------------------------
# Per row, a threshold t that is one of the row's values; the values >= t are
# kept (ties at t all kept), found here by a sort, by selection in the kernels.
# top_k: t is the k-th largest (k 0 or >= vocab: no filter). top_p: t is the
# largest value whose tie-inclusive mass sum(x >= t) reaches top_p, absolute as
# in FlashInfer (probs sum to 1; a row with less mass, or top_p >= 1, is kept
# whole). Renormalized rows are x * (1 / max(kept mass, 1e-8)), in fp32.

def _per_row(x: torch.Tensor, per_row, scalar) -> torch.Tensor:
    if per_row is not None:
        return per_row
    return torch.full((x.shape[0],), scalar, device=x.device)


def _top_k_threshold(x: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """(batch, 1): the k-th largest value of each row; -inf where k is 0 or >= vocab."""
    vocab = x.shape[-1]
    on = (k > 0) & (k < vocab)
    kk = torch.where(on, k, 1).long()
    kth = x.sort(dim=-1, descending=True).values.gather(1, (kk - 1)[:, None])
    return torch.where(on[:, None], kth, -math.inf)


def _renormalize(x: torch.Tensor, threshold: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    kept = torch.where(x >= threshold, x, 0)
    return (kept * (1 / kept.sum(dim=-1, keepdim=True).clamp_min(1e-8))).to(dtype)


def top_k_renorm_probs(probs, top_k_arr, top_k):
    x = probs.to(compute_dtype(probs.dtype))
    return _renormalize(x, _top_k_threshold(x, _per_row(x, top_k_arr, top_k)), probs.dtype)


def top_p_renorm_probs(probs, top_p_arr, top_p):
    x = probs.to(compute_dtype(probs.dtype))
    p = _per_row(x, top_p_arr, top_p).to(x.dtype)[:, None]
    sorted_x = x.sort(dim=-1, descending=True).values
    # the first sorted position whose cumulative mass reaches top_p; its value is t
    first = (sorted_x.cumsum(dim=-1) < p).sum(dim=-1, keepdim=True)
    t = sorted_x.gather(1, first.clamp(max=x.shape[-1] - 1))
    t = torch.where((p < 1) & (first < x.shape[-1]), t, -math.inf)
    return _renormalize(x, t, probs.dtype)


def top_k_mask_logits(logits, top_k_arr, top_k):
    x = logits.to(compute_dtype(logits.dtype))
    keep = x >= _top_k_threshold(x, _per_row(x, top_k_arr, top_k))
    return torch.where(keep, logits, -math.inf)
