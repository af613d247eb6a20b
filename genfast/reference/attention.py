"""Attention over a KV cache and packed prefill attention in plain PyTorch.

The oracle the kernels are tested against and the fallback on devices without
a kernel. Arithmetic in fp32 (fp64 for fp64 queries); the output comes back in
the query's dtype, the log-sum-exp in fp32 (fp64). Every mask is built
explicitly from positions: query i of a row with L keys sits at position
``L - seqlen_q + i`` (causal masks align bottom-right, as in flash-attn).
A query row that sees no key returns zeros and lse = -inf.
"""
from __future__ import annotations

import torch

FP8_MAX = 448.0  # largest finite float8_e4m3fn


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def quantize(x: torch.Tensor, cache_dtype: torch.dtype, scale: torch.Tensor | None) -> torch.Tensor:
    """New keys/values (..., nheads_k, headdim) as stored in a cache of ``cache_dtype``."""
    if cache_dtype != torch.float8_e4m3fn:
        return x.to(cache_dtype)
    # fp8 has no inf: saturate, as the kernels do, instead of overflowing to NaN.
    y = x.float() / scale.view(-1, 1)
    return y.clamp(-FP8_MAX, FP8_MAX).to(cache_dtype)


def _append(k_cache, v_cache, k, v, base, block_table, k_scale, v_scale):
    """Write k, v (batch, seqlen_new, nheads_k, headdim) at positions base[b] + i."""
    batch, seqlen_new = k.shape[:2]
    pos = base.view(-1, 1) + torch.arange(seqlen_new, device=k.device).view(1, -1)
    if block_table is None:
        rows, slots = torch.arange(batch, device=k.device).view(-1, 1).expand_as(pos), pos
    else:
        page = k_cache.shape[1]
        rows, slots = block_table.long().gather(1, pos // page), pos % page
    k_cache[rows, slots] = quantize(k, k_cache.dtype, k_scale)
    v_cache[rows, slots] = quantize(v, v_cache.dtype, v_scale)


def _gather(cache, block_table, scale, cdt):
    """The cache as (batch, capacity, nheads_k, headdim) in the compute dtype, dequantized."""
    if block_table is not None:
        nb, page = block_table.shape[1], cache.shape[1]
        cache = cache[block_table.long()].reshape(block_table.shape[0], nb * page, *cache.shape[2:])
    x = cache.to(cdt)
    if scale is not None:
        x = x * scale.to(cdt).view(1, 1, -1, 1)
    return x


def _attend(q, k, v, q_pos, k_len, softmax_scale, causal, window_left, window_right, softcap, alibi_slopes):
    """Softmax attention of q (batch, sq, nheads, d) over k, v (batch, sk, nheads_k, d).

    q_pos (batch, sq): position of each query; k_len (batch,): valid keys.
    Returns out (batch, sq, nheads, d) and lse (batch, nheads, sq).
    """
    batch, sq, nheads, d = q.shape
    sk, nheads_k = k.shape[1], k.shape[2]
    group = nheads // nheads_k
    # (batch, nheads_k, group * sq, d): each KV head's query rows together, no K/V expansion.
    qg = q.view(batch, sq, nheads_k, group, d).permute(0, 2, 3, 1, 4).reshape(batch, nheads_k, group * sq, d)
    s = torch.matmul(qg, k.permute(0, 2, 3, 1)) * softmax_scale  # (batch, nheads_k, group * sq, sk)
    s = s.view(batch, nheads, sq, sk)
    if softcap > 0:
        s = softcap * torch.tanh(s / softcap)
    kpos = torch.arange(sk, device=q.device).view(1, 1, sk)
    qp = q_pos.view(batch, sq, 1)
    dist = qp - kpos  # (batch, sq, sk)
    if alibi_slopes is not None:
        slopes = alibi_slopes.to(s.dtype).expand(batch, nheads) if alibi_slopes.dim() == 1 else alibi_slopes.to(s.dtype)
        s = s - slopes.view(batch, nheads, 1, 1) * dist.abs().unsqueeze(1).to(s.dtype)
    valid = kpos < k_len.view(batch, 1, 1)
    if causal:
        valid = valid & (dist >= 0)
    if window_left >= 0:
        valid = valid & (dist <= window_left)
    if window_right >= 0 and not causal:
        valid = valid & (-dist <= window_right)
    s = s.masked_fill(~valid.unsqueeze(1), float("-inf"))
    lse = torch.logsumexp(s, dim=-1)  # (batch, nheads, sq)
    p = torch.exp(s - lse.unsqueeze(-1).masked_fill(torch.isinf(lse).unsqueeze(-1), 0.0))
    p = p.masked_fill(~valid.unsqueeze(1), 0.0)  # also keeps NaN/garbage in unused cache slots out
    vv = v.masked_fill(~(kpos.view(1, sk, 1, 1) < k_len.view(batch, 1, 1, 1)), 0.0)
    pg = p.view(batch, nheads_k, group * sq, sk)
    out = torch.matmul(pg, vv.permute(0, 2, 1, 3))  # (batch, nheads_k, group * sq, d)
    # Contiguous, as the op's fake promises (the reshape of this permute can be a strided view).
    out = out.view(batch, nheads_k, group, sq, d).permute(0, 3, 1, 2, 4).contiguous().view(batch, sq, nheads, d)
    return out, lse


def attention_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens, seqlen_offset, block_table, softmax_scale,
                           causal, window_left, window_right, softcap, alibi_slopes, k_scale, v_scale, need_lse=True):
    cdt = compute_dtype(q.dtype)
    batch, sq = q.shape[:2]
    base = torch.full((batch,), seqlen_offset, dtype=torch.int64, device=q.device)
    if cache_seqlens is not None:
        base = base + cache_seqlens.long()
    if k is not None:
        _append(k_cache, v_cache, k, v, base, block_table, k_scale, v_scale)
        base = base + k.shape[1]
    kf = _gather(k_cache, block_table, k_scale, cdt)[:batch]
    vf = _gather(v_cache, block_table, v_scale, cdt)[:batch]
    q_pos = base.view(-1, 1) - sq + torch.arange(sq, device=q.device).view(1, -1)
    out, lse = _attend(q.to(cdt), kf, vf, q_pos, base, softmax_scale, causal, window_left, window_right, softcap,
                       alibi_slopes)
    return out.to(q.dtype), lse.to(cdt)


def kvcache_append_(k_cache, v_cache, k, v, cache_seqlens, seqlen_offset, block_table, k_scale, v_scale):
    base = torch.full((k.shape[0],), seqlen_offset, dtype=torch.int64, device=k.device)
    if cache_seqlens is not None:
        base = base + cache_seqlens.long()
    _append(k_cache, v_cache, k, v, base, block_table, k_scale, v_scale)


def attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal, window_left,
              window_right, softcap, alibi_slopes, need_lse=True):
    """Packed variable-length attention: q (total_q, nheads, d), k/v (total_k, nheads_k, d), or with a batch
    dimension in front when cu_seqlens_q is None. Returns out and lse (nheads, total_q) / (batch, nheads, sq)."""
    cdt = compute_dtype(q.dtype)
    if cu_seqlens_q is None:
        batch, sq, sk = q.shape[0], q.shape[1], k.shape[1]
        k_len = torch.full((batch,), sk, dtype=torch.int64, device=q.device)
        q_pos = (sk - sq + torch.arange(sq, device=q.device)).view(1, -1).expand(batch, sq)
        out, lse = _attend(q.to(cdt), k.to(cdt), v.to(cdt), q_pos, k_len, softmax_scale, causal, window_left,
                           window_right, softcap, alibi_slopes)
        return out.to(q.dtype), lse
    outs, lses = [], []
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    for b in range(len(cq) - 1):
        qb = q[cq[b]:cq[b + 1]].unsqueeze(0).to(cdt)
        kb, vb = k[ck[b]:ck[b + 1]].unsqueeze(0).to(cdt), v[ck[b]:ck[b + 1]].unsqueeze(0).to(cdt)
        sq, sk = qb.shape[1], kb.shape[1]
        q_pos = (sk - sq + torch.arange(sq, device=q.device)).view(1, -1)
        slopes = alibi_slopes[b:b + 1] if alibi_slopes is not None and alibi_slopes.dim() == 2 else alibi_slopes
        o, l = _attend(qb, kb, vb, q_pos, torch.tensor([sk], device=q.device), softmax_scale, causal, window_left,
                       window_right, softcap, slopes)
        outs.append(o[0])
        lses.append(l[0])
    out = torch.cat(outs, 0) if outs else q.new_empty(q.shape, dtype=cdt)
    lse = torch.cat(lses, 1) if lses else q.new_empty((q.shape[1], 0), dtype=cdt)
    return out.to(q.dtype), lse
