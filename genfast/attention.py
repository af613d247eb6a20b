"""Attention for autoregressive sampling: over a KV cache (decode and chunked
prefill, contiguous or paged, with in-place append) and packed prefill.

``attention_with_kvcache`` takes flash-attn's ``flash_attn_with_kvcache``
layouts and meaning: q (batch, seqlen_q, nheads, headdim), caches
(batch, seqlen_cache, nheads_k, headdim) or paged (num_blocks, page_size,
nheads_k, headdim) with ``block_table``; new k/v are written in place at
``cache_seqlens`` before attending; causal masks align bottom-right. Decode
reads the whole cache once per step, so it is bound by memory bandwidth; the
kernels read each KV row once for all query heads of its GQA group.

``KVCache`` holds a model's caches at static addresses with the per-row
lengths on the device, so a decode step can be captured in a CUDA graph.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from . import _build, _ops, backends

CACHE_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.float8_e4m3fn)
HEAD_DIMS = (64, 80, 96, 128, 256)  # what the C++ and Triton kernels are instantiated for
# attention() also takes the small headdims of diffusion UNets and small models (8, 16, ..., 64)
PREFILL_HEAD_DIMS = tuple(range(8, 64, 8)) + HEAD_DIMS
MAX_GROUP = 64  # query heads per KV head that one kernel item holds (MQA up to 64 heads)


def _fake_attention_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens, seqlen_offset, block_table,
                                 softmax_scale, causal, window_left, window_right, softcap, alibi_slopes, k_scale,
                                 v_scale, need_lse):
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    return torch.empty_like(q), q.new_empty((q.shape[0], q.shape[2], q.shape[1]), dtype=lse_dtype)


def _fake_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal,
                    window_left, window_right, softcap, alibi_slopes, need_lse):
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    if cu_seqlens_q is None:
        return torch.empty_like(q), q.new_empty((q.shape[0], q.shape[2], q.shape[1]), dtype=lse_dtype)
    return torch.empty_like(q), q.new_empty((q.shape[1], q.shape[0]), dtype=lse_dtype)


# The ops always return lse (fp32): computing it is free next to reading the cache. need_lse=False
# says the caller drops it: on the CPU a 16-bit prefill may then run PyTorch's flash attention
# (AMX tiles where the CPU has them), whose lse comes from scores rounded to the input precision.
attention_with_kvcache_op = _ops.define(
    "attention_with_kvcache(Tensor q, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor? k, Tensor? v, "
    "Tensor? cache_seqlens, int seqlen_offset, Tensor? block_table, float softmax_scale, bool causal, "
    "int window_left, int window_right, float softcap, Tensor? alibi_slopes, Tensor? k_scale, Tensor? v_scale, "
    "bool need_lse) -> (Tensor, Tensor)",
    "attention",
    _fake_attention_with_kvcache,
)

kvcache_append_op = _ops.define(
    "kvcache_append_(Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor k, Tensor v, Tensor? cache_seqlens, "
    "int seqlen_offset, Tensor? block_table, Tensor? k_scale, Tensor? v_scale) -> ()",
    "attention",
    lambda *args: None,
)

attention_op = _ops.define(
    "attention(Tensor q, Tensor k, Tensor v, Tensor? cu_seqlens_q, Tensor? cu_seqlens_k, int max_seqlen_q, "
    "int max_seqlen_k, float softmax_scale, bool causal, int window_left, int window_right, float softcap, "
    "Tensor? alibi_slopes, bool need_lse) -> (Tensor, Tensor)",
    "attention",
    _fake_attention,
)


# ---- argument checks --------------------------------------------------------

def _fail(fn: str, msg: str, error=ValueError):
    raise error(f"{fn}: {msg}")


def _check_rank(fn, name, x, rank, what):
    if not isinstance(x, torch.Tensor):
        _fail(fn, f"{name} must be a torch.Tensor, got {type(x).__name__}", TypeError)
    if x.dim() != rank:
        _fail(fn, f"{name} must be {what}, got shape {tuple(x.shape)}")


def _check_device(fn, name, x, device):
    if x.device != device:
        _fail(fn, f"{name} must be on the device of q ({device}), got {x.device}")


def _window(fn, window_size, causal):
    if not (isinstance(window_size, (tuple, list)) and len(window_size) == 2
            and all(isinstance(w, int) and not isinstance(w, bool) for w in window_size)):
        _fail(fn, f"window_size must be a pair of ints (left, right), -1 meaning unbounded, got {window_size!r}",
              TypeError)
    left, right = window_size
    if left < -1 or right < -1:
        _fail(fn, f"window_size entries must be >= -1, got {tuple(window_size)}")
    return left, 0 if causal else right


def _scale(fn, softmax_scale, headdim):
    if softmax_scale is None:
        return 1.0 / math.sqrt(headdim)
    if isinstance(softmax_scale, bool) or not isinstance(softmax_scale, (int, float)):
        _fail(fn, f"softmax_scale must be a float or None, got {type(softmax_scale).__name__}", TypeError)
    if not math.isfinite(softmax_scale):
        _fail(fn, f"softmax_scale must be finite, got {softmax_scale}")
    return float(softmax_scale)


def _softcap(fn, softcap):
    if isinstance(softcap, bool) or not isinstance(softcap, (int, float)) or not softcap >= 0 \
            or not math.isfinite(softcap):
        _fail(fn, f"softcap must be a finite float >= 0 (0 disables it), got {softcap!r}")
    return float(softcap)


def _alibi(fn, alibi_slopes, batch, nheads, device):
    if alibi_slopes is None:
        return None
    _ops.check_tensor(fn, "alibi_slopes", alibi_slopes, dtypes=(torch.float32,))
    if tuple(alibi_slopes.shape) not in ((nheads,), (batch, nheads)):
        _fail(fn, f"alibi_slopes must have shape (nheads,) = ({nheads},) or (batch, nheads) = ({batch}, {nheads}), "
                  f"got {tuple(alibi_slopes.shape)}")
    _check_device(fn, "alibi_slopes", alibi_slopes, device)
    return alibi_slopes.contiguous()


def _kv_scale(fn, name, scale, cache, nheads_k, device):
    is_fp8 = cache.dtype == torch.float8_e4m3fn
    if scale is None:
        if is_fp8:
            _fail(fn, f"{name} is required for a float8_e4m3fn cache (per-head fp32 scale, shape ({nheads_k},) or ())")
        return None
    if not is_fp8:
        _fail(fn, f"{name} applies to a float8_e4m3fn cache only; the cache is {cache.dtype}")
    _ops.check_tensor(fn, name, scale, dtypes=(torch.float32,))
    if scale.numel() not in (1, nheads_k) or scale.dim() > 1:
        _fail(fn, f"{name} must have shape (), (1,) or (nheads_k,) = ({nheads_k},), got {tuple(scale.shape)}")
    _check_device(fn, name, scale, device)
    return scale.reshape(-1).expand(nheads_k).contiguous()


def _check_cache(fn, q, k_cache, v_cache, paged_blocks):
    _check_rank(fn, "k_cache", k_cache, 4, "(batch, seqlen_cache, nheads_k, headdim) or "
                                           "(num_blocks, page_size, nheads_k, headdim)")
    _check_rank(fn, "v_cache", v_cache, 4, "of the shape of k_cache")
    if v_cache.shape != k_cache.shape:
        _fail(fn, f"v_cache must have the shape of k_cache {tuple(k_cache.shape)}, got {tuple(v_cache.shape)}")
    for name, c in (("k_cache", k_cache), ("v_cache", v_cache)):
        _check_device(fn, name, c, q.device)
        if c.dtype not in (q.dtype, torch.float8_e4m3fn):
            _fail(fn, f"{name} must have the dtype of q ({q.dtype}) or float8_e4m3fn, got {c.dtype}", TypeError)
        if c.stride(-1) != 1:
            _fail(fn, f"{name} must be contiguous in its last (headdim) dimension; strides {c.stride()}")
    if v_cache.stride() != k_cache.stride():
        _fail(fn, f"v_cache must have the strides of k_cache {k_cache.stride()}, got {v_cache.stride()}")
    if v_cache.dtype != k_cache.dtype:
        _fail(fn, f"v_cache must have the dtype of k_cache ({k_cache.dtype}), got {v_cache.dtype}", TypeError)
    if k_cache.shape[3] != q.shape[3]:
        _fail(fn, f"k_cache headdim must equal q's ({q.shape[3]}), got {k_cache.shape[3]}")
    nheads, nheads_k = q.shape[2], k_cache.shape[2]
    if nheads_k == 0 or nheads % nheads_k:
        _fail(fn, f"nheads of q ({nheads}) must be a multiple of nheads_k of the cache ({nheads_k})")
    if nheads // nheads_k > MAX_GROUP:
        _fail(fn, f"nheads / nheads_k must be at most {MAX_GROUP} (query heads per KV head), got "
                  f"{nheads} / {nheads_k}")
    if paged_blocks is None and k_cache.shape[0] < q.shape[0]:
        _fail(fn, f"k_cache must hold at least batch = {q.shape[0]} rows, got {k_cache.shape[0]}")


def _signature(*tensors) -> tuple:
    """What the shape-level argument checks depend on."""
    return tuple((t.shape, t.dtype, t.device, t.stride()) if isinstance(t, torch.Tensor) else type(t)
                 for t in tensors)


def _host_checks_ok(x: torch.Tensor) -> bool:
    """Data-dependent checks read tensor values: done on CPU tensors (cheap), skipped on GPUs (a host sync
    per decode step, impossible under CUDA graphs; the kernels there drop out-of-range writes) and while
    torch.compile traces."""
    return x.device.type == "cpu" and not torch.compiler.is_compiling()


def _seqlens(fn, cache_seqlens, batch, device):
    """(cache_seqlens tensor or None, int offset) from an int, an int32 (batch,) tensor or None."""
    if isinstance(cache_seqlens, bool):
        _fail(fn, "cache_seqlens must be an int or an int32 tensor of shape (batch,)", TypeError)
    if isinstance(cache_seqlens, int):
        if cache_seqlens < 0:
            _fail(fn, f"cache_seqlens must be >= 0, got {cache_seqlens}")
        return None, cache_seqlens
    if not isinstance(cache_seqlens, torch.Tensor):
        _fail(fn, f"cache_seqlens must be an int or an int32 tensor of shape (batch,), got "
                  f"{type(cache_seqlens).__name__}", TypeError)
    if cache_seqlens.dtype != torch.int32:
        _fail(fn, f"cache_seqlens must have dtype int32, got {cache_seqlens.dtype}", TypeError)
    if tuple(cache_seqlens.shape) != (batch,):
        _fail(fn, f"cache_seqlens must have shape (batch,) = ({batch},), got {tuple(cache_seqlens.shape)}")
    _check_device(fn, "cache_seqlens", cache_seqlens, device)
    return cache_seqlens.contiguous(), 0


def _check_new(fn, q, k, v, k_cache):
    if (k is None) != (v is None):
        _fail(fn, "k and v must be given together")
    if k is None:
        return None, None
    _check_rank(fn, "k", k, 4, "(batch, seqlen_new, nheads_k, headdim)")
    _check_rank(fn, "v", v, 4, "(batch, seqlen_new, nheads_k, headdim)")
    want = (q.shape[0], k.shape[1], k_cache.shape[2], k_cache.shape[3])
    for name, x in (("k", k), ("v", v)):
        if tuple(x.shape) != want:
            _fail(fn, f"{name} must have shape (batch, seqlen_new, nheads_k, headdim) = {want}, got {tuple(x.shape)}")
        if x.dtype != q.dtype:
            _fail(fn, f"{name} must have the dtype of q ({q.dtype}), got {x.dtype}", TypeError)
        _check_device(fn, name, x, q.device)
    return k.contiguous(), v.contiguous()


def _check_block_table(fn, block_table, batch, num_blocks, device):
    _check_rank(fn, "block_table", block_table, 2, "(batch, max_blocks_per_seq)")
    if block_table.dtype != torch.int32:
        _fail(fn, f"block_table must have dtype int32, got {block_table.dtype}", TypeError)
    if block_table.shape[0] != batch:
        _fail(fn, f"block_table must have batch = {batch} rows, got {block_table.shape[0]}")
    _check_device(fn, "block_table", block_table, device)
    if _host_checks_ok(block_table) and block_table.numel():
        lo, hi = (int(x) for x in torch.aminmax(block_table))  # ints: comparing tensors costs microseconds
        if lo < 0 or hi >= num_blocks:
            _fail(fn, f"block_table entries must be in [0, num_blocks = {num_blocks}), got [{lo}, {hi}]")
    return block_table.contiguous()


def _resolve(fn, q, k_cache, v_cache, k, v, cache_seqlens, block_table, k_scale, v_scale):
    """Checks shared by attention_with_kvcache and KVCache; returns the normalized arguments."""
    batch = q.shape[0]
    paged = block_table is not None
    _check_cache(fn, q, k_cache, v_cache, k_cache.shape[0] if paged else None)
    if paged:
        block_table = _check_block_table(fn, block_table, batch, k_cache.shape[0], q.device)
        capacity = block_table.shape[1] * k_cache.shape[1]
    else:
        capacity = k_cache.shape[1]
    k, v = _check_new(fn, q, k, v, k_cache)
    seqlen_new = 0 if k is None else k.shape[1]
    if cache_seqlens is None:
        if k is not None:
            _fail(fn, "cache_seqlens is required to append k and v (where to write them)")
        seqlens, offset = None, capacity
    else:
        seqlens, offset = _seqlens(fn, cache_seqlens, batch, q.device)
    if seqlens is None:
        if offset + seqlen_new > capacity:
            _fail(fn, f"cache_seqlens + seqlen_new = {offset + seqlen_new} exceeds the cache capacity {capacity}")
    elif _host_checks_ok(seqlens) and batch:
        lo, hi = (int(x) for x in torch.aminmax(seqlens))
        if lo < 0 or hi + seqlen_new > capacity:
            _fail(fn, f"cache_seqlens must be in [0, capacity - seqlen_new] = [0, {capacity - seqlen_new}] "
                      f"(capacity {capacity}, seqlen_new {seqlen_new}), got [{lo}, {hi}]")
    k_scale = _kv_scale(fn, "k_scale", k_scale, k_cache, k_cache.shape[2], q.device)
    v_scale = _kv_scale(fn, "v_scale", v_scale, v_cache, k_cache.shape[2], q.device)
    return k, v, seqlens, offset, block_table, k_scale, v_scale


def _batch_idx_table(fn, cache_batch_idx, block_table, q, k_cache):
    """A contiguous cache read through cache_batch_idx is a paged cache with one page per
    row: page size seqlen_cache, block table cache_batch_idx[:, None]."""
    if block_table is not None:
        _fail(fn, "cache_batch_idx and block_table cannot be used together (index the block table instead)")
    if not isinstance(cache_batch_idx, torch.Tensor):
        _fail(fn, f"cache_batch_idx must be an int32 tensor (batch,), got {type(cache_batch_idx).__name__}",
              TypeError)
    if cache_batch_idx.dtype != torch.int32:
        _fail(fn, f"cache_batch_idx must have dtype int32, got {cache_batch_idx.dtype}", TypeError)
    if cache_batch_idx.shape != (q.shape[0],):
        _fail(fn, f"cache_batch_idx must have shape (batch,) = ({q.shape[0]},), got {tuple(cache_batch_idx.shape)}")
    _check_device(fn, "cache_batch_idx", cache_batch_idx, q.device)
    if _host_checks_ok(cache_batch_idx) and cache_batch_idx.numel():
        lo, hi = (int(x) for x in torch.aminmax(cache_batch_idx))
        if lo < 0 or hi >= k_cache.shape[0]:
            _fail(fn, f"cache_batch_idx entries must be in [0, batch_cache = {k_cache.shape[0]}), got [{lo}, {hi}]")
    return cache_batch_idx.view(-1, 1)


def _check_q(fn, q, rank=4, what="(batch, seqlen_q, nheads, headdim)", head_dims=HEAD_DIMS):
    _check_rank(fn, "q", q, rank, what)
    _ops.check_tensor(fn, "q", q)
    if q.shape[-1] not in head_dims and q.dtype != torch.float64:
        _fail(fn, f"headdim must be one of {head_dims}, got {q.shape[-1]}")


# ---- public functions -------------------------------------------------------

def attention_with_kvcache(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           k: torch.Tensor | None = None, v: torch.Tensor | None = None, *,
                           cache_seqlens: int | torch.Tensor | None = None, block_table: torch.Tensor | None = None,
                           softmax_scale: float | None = None, causal: bool = True,
                           window_size: Sequence[int] = (-1, -1), softcap: float = 0.0,
                           alibi_slopes: torch.Tensor | None = None, k_scale: torch.Tensor | None = None,
                           v_scale: torch.Tensor | None = None, cache_batch_idx: torch.Tensor | None = None,
                           return_softmax_lse: bool = False):
    """Attention of q over a KV cache, after appending k/v to it in place (flash-attn's
    ``flash_attn_with_kvcache``).

    Parameters
    ----------
    q : Tensor (batch, seqlen_q, nheads, headdim), fp32/fp16/bf16 (fp64 runs on the reference)
        headdim one of 64, 80, 96, 128, 256; may be non-contiguous.
    k_cache, v_cache : Tensor (batch_cache, seqlen_cache, nheads_k, headdim), batch_cache >= batch
        (or any batch_cache with ``cache_batch_idx``),
        or paged (num_blocks, page_size, nheads_k, headdim) with ``block_table``; page_size any of 1..256.
        dtype of q, or float8_e4m3fn with ``k_scale``/``v_scale``. Strided views are fine as long as
        headdim is contiguous (written in place, never copied). nheads must be a multiple of nheads_k.
    k, v : Tensor (batch, seqlen_new, nheads_k, headdim), dtype of q, optional
        Written into the caches at positions ``cache_seqlens[b] + i`` (quantized with the scales for an
        fp8 cache) before attending. The caller advances cache_seqlens.
    cache_seqlens : int or int32 Tensor (batch,), optional
        Tokens already in each row's cache. None: the whole cache is valid (then k/v must be None).
    block_table : int32 Tensor (batch, max_blocks_per_seq), optional
        Page indices in [0, num_blocks) of each row's positions; the capacity of a row is
        max_blocks_per_seq * page_size.
    softmax_scale : float, default 1 / sqrt(headdim)
    causal : bool, default True
        Query i of a row with L keys (after the append) sits at position L - seqlen_q + i and sees keys
        at positions <= its own (bottom-right alignment).
    window_size : (left, right), default (-1, -1)
        Sliding window: keys in [pos - left, pos + right]; -1 is unbounded. ``causal`` forces right = 0.
    softcap : float, default 0 (off)
        Logits become softcap * tanh(logits / softcap) (after softmax_scale).
    alibi_slopes : fp32 Tensor (nheads,) or (batch, nheads), optional
        Adds -slope * |query position - key position| to the logits.
    k_scale, v_scale : fp32 Tensor (), (1,) or (nheads_k,)
        Dequantization scales of an fp8 cache: stored value * scale = key/value. Required for fp8 caches.
    cache_batch_idx : int32 Tensor (batch,), optional
        Row b of q reads (and appends to) cache row ``cache_batch_idx[b]`` of a contiguous cache
        instead of row b; rows must be distinct when k/v are given. Not with ``block_table``.
    return_softmax_lse : bool
        Also return the natural-log log-sum-exp of each query row's logits.

    Returns
    -------
    out : Tensor (batch, seqlen_q, nheads, headdim), dtype of q. A row that sees no key is zero.
    lse : fp32 Tensor (batch, nheads, seqlen_q), only with return_softmax_lse (-inf for a row with no key).

    Raises ``ValueError``/``TypeError`` naming the argument before anything is written. On a GPU the
    lengths and block-table entries are not checked against the capacity (that needs a host sync): writes
    outside the cache are dropped.
    """
    fn = "attention_with_kvcache"
    _check_q(fn, q)
    if cache_batch_idx is not None:
        block_table = _batch_idx_table(fn, cache_batch_idx, block_table, q, k_cache)
    k, v, seqlens, offset, block_table, k_scale, v_scale = _resolve(
        fn, q, k_cache, v_cache, k, v, cache_seqlens, block_table, k_scale, v_scale)
    left, right = _window(fn, window_size, causal)
    alibi_slopes = _alibi(fn, alibi_slopes, q.shape[0], q.shape[2], q.device)
    out, lse = attention_with_kvcache_op(
        q.contiguous(), k_cache, v_cache, k, v, seqlens, offset, block_table, _scale(fn, softmax_scale, q.shape[3]),
        bool(causal), left, right, _softcap(fn, softcap), alibi_slopes, k_scale, v_scale, bool(return_softmax_lse))
    return (out, lse) if return_softmax_lse else out


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
              softmax_scale: float | None = None, window_size: Sequence[int] = (-1, -1), softcap: float = 0.0,
              alibi_slopes: torch.Tensor | None = None, cu_seqlens: torch.Tensor | None = None,
              max_seqlen: int | None = None, return_softmax_lse: bool = False):
    """Full (prefill) attention, tiled with an online softmax: the score matrix is never stored.

    Parameters
    ----------
    q : Tensor (batch, seqlen_q, nheads, headdim), or packed (total, nheads, headdim) with ``cu_seqlens``
        headdim a multiple of 8 up to 64, or 80, 96, 128, 256.
    k, v : Tensor (batch, seqlen_k, nheads_k, headdim), or packed (total, nheads_k, headdim); dtype of q
        nheads must be a multiple of nheads_k. With causal, query i sits at position seqlen_k - seqlen_q + i.
    causal, softmax_scale, window_size, softcap, alibi_slopes : as in ``attention_with_kvcache``
    cu_seqlens : int32 Tensor (batch + 1,), optional
        Start offsets of the packed sequences (0, len0, len0 + len1, ...), shared by q, k and v.
    max_seqlen : int, optional
        The longest sequence; computed from cu_seqlens when None (a host sync on a GPU).
    return_softmax_lse : bool
        On the CPU, prompts of 64 or more queries without softcap or ALiBi run PyTorch's flash
        attention for the CPU (GEMM tiles, AMX ones for bf16 where the CPU has them); in bf16/fp16
        only when lse is not asked for, since that kernel's lse comes from scores rounded to the
        input precision (genfast's kernels compute the scores as exact fp32 products).

    Returns
    -------
    out : Tensor of q's shape and dtype.
    lse : fp32 Tensor (batch, nheads, seqlen_q), or (nheads, total) when packed; only if asked.
    """
    fn = "attention"
    packed = cu_seqlens is not None
    rank, what = (3, "(total, nheads, headdim)") if packed else (4, "(batch, seqlen, nheads, headdim)")
    _check_q(fn, q, rank, what, PREFILL_HEAD_DIMS)
    for name, x in (("k", k), ("v", v)):
        _check_rank(fn, name, x, rank, what.replace("nheads", "nheads_k"))
        if x.dtype != q.dtype:
            _fail(fn, f"{name} must have the dtype of q ({q.dtype}), got {x.dtype}", TypeError)
        _check_device(fn, name, x, q.device)
        if x.shape[-1] != q.shape[-1]:
            _fail(fn, f"{name} headdim must equal q's ({q.shape[-1]}), got {x.shape[-1]}")
    if v.shape != k.shape:
        _fail(fn, f"v must have the shape of k {tuple(k.shape)}, got {tuple(v.shape)}")
    nheads, nheads_k = q.shape[-2], k.shape[-2]
    if nheads_k == 0 or nheads % nheads_k:
        _fail(fn, f"nheads of q ({nheads}) must be a multiple of nheads_k ({nheads_k})")
    if packed:
        _check_rank(fn, "cu_seqlens", cu_seqlens, 1, "(batch + 1,)")
        if cu_seqlens.dtype != torch.int32:
            _fail(fn, f"cu_seqlens must have dtype int32, got {cu_seqlens.dtype}", TypeError)
        _check_device(fn, "cu_seqlens", cu_seqlens, q.device)
        if k.shape[0] != q.shape[0]:
            _fail(fn, f"packed k must have q's total length {q.shape[0]}, got {k.shape[0]}")
        batch = cu_seqlens.shape[0] - 1
        if batch < 0:
            _fail(fn, "cu_seqlens must have at least one entry")
        if max_seqlen is None or _host_checks_ok(cu_seqlens):
            c = cu_seqlens.cpu()
            lengths = c[1:] - c[:-1]
            if batch and (int(c[0]) != 0 or int(c[-1]) != q.shape[0] or bool((lengths < 0).any())):
                _fail(fn, f"cu_seqlens must rise from 0 to total = {q.shape[0]}, got {c.tolist()}")
            longest = int(lengths.max()) if batch else 0
            if max_seqlen is not None and max_seqlen < longest:
                _fail(fn, f"max_seqlen ({max_seqlen}) is below the longest sequence ({longest})")
            max_seqlen = longest if max_seqlen is None else max_seqlen
        cu_seqlens = cu_seqlens.contiguous()
        max_q = max_k = int(max_seqlen)
        batch_for_alibi = batch
    else:
        if k.shape[0] != q.shape[0]:
            _fail(fn, f"k must have q's batch {q.shape[0]}, got {k.shape[0]}")
        max_q, max_k = q.shape[1], k.shape[1]
        batch_for_alibi = q.shape[0]
    left, right = _window(fn, window_size, causal)
    alibi_slopes = _alibi(fn, alibi_slopes, batch_for_alibi, nheads, q.device)
    out, lse = attention_op(q.contiguous(), k.contiguous(), v.contiguous(), cu_seqlens, cu_seqlens, max_q, max_k,
                            _scale(fn, softmax_scale, q.shape[-1]), bool(causal), left, right,
                            _softcap(fn, softcap), alibi_slopes, bool(return_softmax_lse))
    return (out, lse) if return_softmax_lse else out


class KVCache:
    """Preallocated K/V caches of every layer of a model, at static addresses.

    The per-row lengths live on the device (``seqlens``, int32 (batch,)), so a decode step
    ``update`` → ``attend`` → ``advance`` allocates nothing, never syncs with the host and can be
    captured in a CUDA graph. A host mirror of the lengths checks appends against the capacity
    (and the allocated pages) without a sync; after replaying captured steps, ``sync_lengths``
    brings it up to date (a replay runs no Python). q, k and v may be strided views (a fused QKV
    projection's) with a contiguous headdim; on the CPU a step calls the C++ library directly
    (see ``_direct``).

    Parameters
    ----------
    num_layers, batch, max_seqlen, nheads_k, headdim : int
        max_seqlen: the capacity of each row in tokens.
    dtype : torch.dtype, default torch.bfloat16
        The cache dtype: that of the queries, or torch.float8_e4m3fn (then pass k_scale/v_scale).
    device : torch.device or str, optional
    page_size : int, optional
        Paged mode: the caches are (num_layers, num_pages, page_size, nheads_k, headdim) with a
        ``block_table`` (batch, ceil(max_seqlen / page_size)) int32; rows get pages from a free
        list with ``allocate`` and give them back with ``reset``; ``fork`` shares pages.
    num_pages : int, optional
        Paged mode: pages in the pool (default: enough for every row at max_seqlen).
    k_scale, v_scale : fp32 Tensor (nheads_k,) or float, optional
        Dequantization scales of an fp8 cache.

    Attributes
    ----------
    k, v : Tensor (num_layers, batch, max_seqlen, nheads_k, headdim) or paged
        (num_layers, num_pages, page_size, nheads_k, headdim).
    seqlens : int32 Tensor (batch,) on the device: committed tokens per row.
    block_table : int32 Tensor (batch, max_blocks) or None.
    """

    def __init__(self, num_layers: int, batch: int, max_seqlen: int, nheads_k: int, headdim: int, *,
                 dtype: torch.dtype = torch.bfloat16, device=None, page_size: int | None = None,
                 num_pages: int | None = None, k_scale=None, v_scale=None):
        fn = "KVCache"
        for name, val in (("num_layers", num_layers), ("batch", batch), ("max_seqlen", max_seqlen),
                          ("nheads_k", nheads_k), ("headdim", headdim)):
            if isinstance(val, bool) or not isinstance(val, int) or val < 1:
                _fail(fn, f"{name} must be a positive int, got {val!r}")
        if dtype not in CACHE_DTYPES:
            _fail(fn, f"dtype must be one of {CACHE_DTYPES}, got {dtype}", TypeError)
        self.num_layers, self.batch, self.max_seqlen = num_layers, batch, max_seqlen
        self.page_size = page_size
        if page_size is None:
            shape = (num_layers, batch, max_seqlen, nheads_k, headdim)
            self.block_table = None
        else:
            if isinstance(page_size, bool) or not isinstance(page_size, int) or not 1 <= page_size <= 256:
                _fail(fn, f"page_size must be an int in [1, 256], got {page_size!r}")
            blocks = -(-max_seqlen // page_size)
            num_pages = batch * blocks if num_pages is None else num_pages
            if isinstance(num_pages, bool) or not isinstance(num_pages, int) or num_pages < 1:
                _fail(fn, f"num_pages must be a positive int, got {num_pages!r}")
            shape = (num_layers, num_pages, page_size, nheads_k, headdim)
            # Unused entries point at page 0, a valid index: the kernels never read past a row's length.
            self.block_table = torch.zeros((batch, blocks), dtype=torch.int32, device=device)
            self._free = list(range(num_pages - 1, -1, -1))
            self._pages: list[list[int]] = [[] for _ in range(batch)]
            self._refs = [0] * num_pages
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self._layers = list(zip(self.k.unbind(0), self.v.unbind(0)))  # indexing k[layer] costs ~1 us a call
        self._cpu = self.k.is_cpu
        self.seqlens = torch.zeros((batch,), dtype=torch.int32, device=self.k.device)
        self._lens = [0] * batch  # host mirror of seqlens
        self._pending = 0  # tokens written by update() this step, not yet committed by advance()
        self._set_room()
        # attend's arguments when it is given none: scale, causal, window (left, right), softcap
        self._default_args = (_scale(fn, None, headdim), True, *_window(fn, (-1, -1), True), _softcap(fn, 0.0))
        # The argument checks that depend only on shapes, dtypes, devices and strides run once per
        # signature: in a decode loop they cost as much as a small model's attention.
        self._checked_update = None
        self._checked_attend = None

        def scale(name, s):
            if s is None:
                return None
            if not isinstance(s, torch.Tensor):
                s = torch.tensor(float(s))
            return s.to(device=self.k.device, dtype=torch.float32).reshape(-1).expand(nheads_k).contiguous()

        self.k_scale, self.v_scale = scale("k_scale", k_scale), scale("v_scale", v_scale)

    @property
    def capacity(self) -> int:
        """Tokens a row can hold: max_seqlen, or its allocated pages in paged mode."""
        return self.max_seqlen

    def _row_capacity(self, row: int) -> int:
        return self.max_seqlen if self.page_size is None else len(self._pages[row]) * self.page_size

    def _layer(self, layer: int):
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < self.num_layers:
            _fail("KVCache", f"layer must be an int in [0, {self.num_layers}), got {layer!r}")
        return self._layers[layer]

    def _set_room(self) -> None:
        """The tokens every row can still take (the host mirror's), after lengths or pages changed."""
        self._room = min((self._row_capacity(r) - self._lens[r] for r in range(self.batch)), default=0)

    def _direct(self, layer):
        """The C++ library, when a step's call can go straight to its direct bindings: a CPU cache
        on the C++ backend, a valid layer, nothing tracing. They check the step's tensors themselves
        and decline what they do not take as is (the checked path below then runs, with its errors).
        In a small model's decode loop the checks and the dispatcher cost more than the kernels."""
        if (type(layer) is int and 0 <= layer < self.num_layers and self._cpu and backends._forced in (None, "cpp")
                and not (torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack()
                         or torch._C._are_functorch_transforms_active())):
            return _build.module()
        return None

    def _check_room(self, fn: str, new: int) -> None:
        if new <= self._room:
            return
        for row in range(self.batch):  # which row overflows
            need = self._lens[row] + new
            if need > self._row_capacity(row):
                what = "allocated pages" if self.page_size is not None else "capacity"
                _fail(fn, f"row {row} would hold {need} tokens, beyond its {what} ({self._row_capacity(row)})"
                          + ("; call allocate() first" if self.page_size is not None else ""))

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write k, v (batch, seqlen_new, nheads_k, headdim) at each row's length (the same
        seqlen_new for every layer of a step; ``advance`` commits them)."""
        cpp = self._direct(layer)
        if cpp is not None and type(k) is torch.Tensor and type(v) is torch.Tensor:
            kc, vc = self._layers[layer]
            new = cpp.kvcache_append_plain(kc, vc, k, v, self.seqlens, self.block_table, self.k_scale, self.v_scale,
                                           self._room, self._pending)
            if new >= 0:
                self._pending = new
                return
        fn = "KVCache.update"
        kc, vc = self._layer(layer)
        _check_rank(fn, "k", k, 4, "(batch, seqlen_new, nheads_k, headdim)")
        if self._pending and k.shape[1] != self._pending:
            _fail(fn, f"every layer of a step appends the same seqlen_new ({self._pending}), got {k.shape[1]}")
        self._check_room(fn, k.shape[1])
        signature = _signature(k, v)
        if signature != self._checked_update:
            if k.shape[0] != self.batch:
                _fail(fn, f"k must have batch = {self.batch} rows, got {k.shape[0]}")
            # the checks of attention_with_kvcache, with k standing in for q (dtype, device, heads); the
            # lengths, block table and scales are this class's own, valid by construction
            _resolve(fn, k, kc, vc, k, v, self.seqlens, self.block_table, self.k_scale, self.v_scale)
            self._checked_update = signature
        kvcache_append_op(kc, vc, k.contiguous(), v.contiguous(), self.seqlens, 0, self.block_table,
                          self.k_scale, self.v_scale)
        self._pending = k.shape[1]

    def attend(self, layer: int, q: torch.Tensor, *, return_softmax_lse: bool = False, **kwargs):
        """Attention of q (batch, seqlen_q, nheads, headdim) over layer's cache including the tokens
        ``update`` wrote this step; keyword arguments as in ``attention_with_kvcache``
        (causal, softmax_scale, window_size, softcap, alibi_slopes)."""
        if not kwargs and not return_softmax_lse and type(q) is torch.Tensor and (cpp := self._direct(layer)):
            kc, vc = self._layers[layer]
            out = cpp.attention_with_kvcache_plain(q, kc, vc, self.seqlens, self._pending, self.block_table,
                                                   *self._default_args, self.k_scale, self.v_scale)
            if out is not None:
                return out
        fn = "KVCache.attend"
        kc, vc = self._layer(layer)
        if kwargs or self._checked_attend is None or _signature(q) != self._checked_attend[0]:
            _check_q(fn, q)
            _check_cache(fn, q, kc, vc, kc.shape[0] if self.page_size is not None else None)
            defaults = not kwargs
            causal = bool(kwargs.pop("causal", True))
            left, right = _window(fn, kwargs.pop("window_size", (-1, -1)), causal)
            alibi = _alibi(fn, kwargs.pop("alibi_slopes", None), q.shape[0], q.shape[2], q.device)
            scale = _scale(fn, kwargs.pop("softmax_scale", None), q.shape[3])
            softcap = _softcap(fn, kwargs.pop("softcap", 0.0))
            if kwargs:
                _fail(fn, f"unexpected arguments {sorted(kwargs)}", TypeError)
            args = (scale, causal, left, right, softcap, alibi)
            if defaults:  # the decode loop's call: remember it (options may hold tensors: not cached)
                self._checked_attend = (_signature(q), args)
        else:
            args = self._checked_attend[1]
        out, lse = attention_with_kvcache_op(q.contiguous(), kc, vc, None, None, self.seqlens, self._pending,
                                             self.block_table, *args, self.k_scale, self.v_scale,
                                             bool(return_softmax_lse))
        return (out, lse) if return_softmax_lse else out

    def advance(self) -> None:
        """Commit this step's tokens: every row's length grows by the seqlen_new of ``update``."""
        if self._pending:
            self.seqlens.add_(self._pending)
            self._lens = [n + self._pending for n in self._lens]
            self._room -= self._pending
            self._pending = 0

    def sync_lengths(self) -> None:
        """Re-read the host's copy of the row lengths from ``seqlens`` (one device sync).
        Needed after replaying decode steps captured in a CUDA graph: a replay advances
        ``seqlens`` on the device, while the host copy that ``update`` checks capacity
        against counted the captured step once, when it was recorded."""
        self._lens = [int(n) for n in self.seqlens.tolist()]
        self._pending = 0
        self._set_room()

    def reset(self, rows: Sequence[int] | None = None) -> None:
        """Empty the given rows (default: all); in paged mode their pages go back to the pool."""
        rows = range(self.batch) if rows is None else list(rows)
        for row in rows:
            if not 0 <= row < self.batch:
                _fail("KVCache.reset", f"rows must be in [0, {self.batch}), got {row}")
            self._lens[row] = 0
            if self.page_size is not None:
                self._release(row)
        index = torch.tensor(list(rows), dtype=torch.long, device=self.seqlens.device)
        self.seqlens.index_fill_(0, index, 0)
        self._pending = 0
        self._set_room()

    # ---- paged mode ---------------------------------------------------------

    def _release(self, row: int) -> None:
        for page in self._pages[row]:
            self._refs[page] -= 1
            if self._refs[page] == 0:
                self._free.append(page)
        self._pages[row] = []

    def _set_table(self, row: int) -> None:
        pages = self._pages[row]
        if pages:
            self.block_table[row, :len(pages)] = torch.tensor(pages, dtype=torch.int32)

    def allocate(self, row: int, num_tokens: int) -> None:
        """Give ``row`` pages for at least num_tokens tokens in all (host-side; not inside a captured step)."""
        fn = "KVCache.allocate"
        if self.page_size is None:
            _fail(fn, "the cache is not paged (page_size=None)")
        if not 0 <= num_tokens <= self.max_seqlen:
            _fail(fn, f"num_tokens must be in [0, max_seqlen = {self.max_seqlen}], got {num_tokens}")
        need = -(-num_tokens // self.page_size) - len(self._pages[row])
        if need > len(self._free):
            _fail(fn, f"out of pages: row {row} needs {need} more, {len(self._free)} free", RuntimeError)
        for _ in range(max(need, 0)):
            page = self._free.pop()
            self._refs[page] = 1
            self._pages[row].append(page)
        self._set_table(row)
        self._set_room()

    def fork(self, src: int, dst: int) -> None:
        """Make row ``dst`` a copy of row ``src`` (beam search, parallel samples) without copying the
        full pages: they are shared; only a partly filled last page is copied, since later appends
        write there."""
        fn = "KVCache.fork"
        if self.page_size is None:
            _fail(fn, "the cache is not paged (page_size=None)")
        if self._pending:
            _fail(fn, "fork between steps (after advance)")
        self._release(dst)
        n = self._lens[src]
        full = n // self.page_size
        shared = self._pages[src][:full]
        for page in shared:
            self._refs[page] += 1
        self._pages[dst] = list(shared)
        if n % self.page_size:
            if not self._free:
                _fail(fn, "out of pages for the partly filled last page", RuntimeError)
            page = self._free.pop()
            self._refs[page] = 1
            last = self._pages[src][full]
            self.k[:, page].copy_(self.k[:, last])
            self.v[:, page].copy_(self.v[:, last])
            self._pages[dst].append(page)
        self._set_table(dst)
        self._lens[dst] = n
        self.seqlens[dst] = n
        self._set_room()
