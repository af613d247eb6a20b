"""Attention family: a decode step over a KV cache, and causal prefill.

Shapes are Llama-3-8B's (32 query heads, 8 KV heads, head dim 128). Baselines:

- ``sdpa``: ``F.scaled_dot_product_attention(enable_gqa=True)`` over exactly the
  valid prefix of a (batch, nheads_k, seqlen, headdim) cache: its best case
  (no mask, no padding, a layout made for it); for prefill on a GPU also
  ``sdpa flash``, SDPA held to its flash backend (the target's reference; a
  Hopper GPU's default is cuDNN's kernel);
- ``gpt-fast``: gpt-fast's eager step: ``index_put`` of the new k/v, KV heads
  expanded with ``repeat_interleave``, SDPA with a boolean mask over the whole
  max length (the cache is sized to the context here, its best case);
- ``torch.compile`` of the gpt-fast step;
- ``flex_attention``: ``torch.compile(flex_attention)`` with ``enable_gqa``, over the
  valid prefix as SDPA (no mask to evaluate) for decode, with a causal block mask
  for prefill (not in the GPU's quick set: its compile alone would take the check's
  time);
- ``flash-attn``: ``flash_attn_with_kvcache`` on a GPU where flash-attn is installed
  (the same cache layout and in-place append as genfast's).

Bytes a decode step must move: the K and V rows of every cached token once,
2 · batch · context · nheads_k · headdim · sizeof(cache); q, the new k/v and
out are under 0.1% of that and are not counted. genfast's cache is
flash-attn's (batch, seqlen, nheads_k, headdim); the new token is appended
in place by the same call. Prefill is compute-bound: its "GB/s" only counts
q, k, v and out once and is not a bandwidth figure.

The "unet" rows are a diffusion UNet's attention (no mask, small headdims;
``UNET_ATTENTION``) against SDPA as diffusers calls it and its torch.compile;
compute-bound like prefill.
"""
from __future__ import annotations

import functools

import os

import torch
import torch.nn.functional as F

import genfast
from harness import Case

FAMILY = "attention"
NHEADS, NHEADS_K, HEADDIM = 32, 8, 128
CONTEXTS = {"1k": 1024, "4k": 4096, "16k": 16384}
CPU_MAX_FOOTPRINT = 3 << 30  # the full suite skips decode cases whose caches need more host memory


def _decode_inputs(batch, context, dtype, cache_dtype, device):
    g = torch.Generator(device="cpu").manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=g).to(device, dtype)

    q = randn(batch, 1, NHEADS, HEADDIM)
    k = randn(batch, 1, NHEADS_K, HEADDIM)
    v = randn(batch, 1, NHEADS_K, HEADDIM)
    k_cache = randn(batch, context, NHEADS_K, HEADDIM)
    v_cache = randn(batch, context, NHEADS_K, HEADDIM)
    return q, k, v, k_cache, v_cache


def gpt_fast_step(q, k_cache, v_cache, k, v, input_pos, mask):
    """gpt-fast's ``Attention.forward`` after the projections: cache update, GQA expansion, masked SDPA.

    q (b, nheads, 1, d); k_cache/v_cache (b, nheads_k, max_len, d); k/v (b, nheads_k, 1, d)."""
    k_cache[:, :, input_pos] = k
    v_cache[:, :, input_pos] = v
    group = q.shape[1] // k_cache.shape[1]
    kk = k_cache.repeat_interleave(group, dim=1)
    vv = v_cache.repeat_interleave(group, dim=1)
    return F.scaled_dot_product_attention(q, kk, vv, attn_mask=mask)


@functools.cache
def _flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def _flash_attn():
    """flash-attn's ``flash_attn_with_kvcache``, or None where it is not installed."""
    try:
        from flash_attn import flash_attn_with_kvcache
    except ImportError:
        return None
    return flash_attn_with_kvcache


def _fp8(x):
    """x (batch, seqlen, nheads_k, headdim) as float8_e4m3fn with per-head scales (nheads_k,): (x8, scale)."""
    scale = x.float().abs().amax(dim=(0, 1, 3)) / 448
    return (x.float() / scale.view(-1, 1)).to(torch.float8_e4m3fn), scale


# The GPU decode rows' A/B: the shared kernel with (BLOCK_N, num_warps, num_stages) other than its defaults
# (64 keys per block, 4 warps, 4 stages at Llama-3-8B's group of 4 on Hopper).
DECODE_AB_TILES = ((64, 4, 3), (128, 4, 3))


def _decode(batch, context, dtype, cache_dtype, device):
    def build():
        q, k, v, k_cache, v_cache = _decode_inputs(batch, context, dtype, cache_dtype, device)
        fns = {}
        if cache_dtype == torch.float8_e4m3fn:
            (gk, k_scale), (gv, v_scale) = _fp8(k_cache), _fp8(v_cache)
        else:
            gk, gv, k_scale, v_scale = k_cache.clone(), v_cache.clone(), None, None
        lens = torch.full((batch,), context - 1, dtype=torch.int32, device=device)
        fns["genfast"] = lambda: genfast.attention_with_kvcache(q, gk, gv, k, v, cache_seqlens=lens,
                                                                k_scale=k_scale, v_scale=v_scale)
        if device.type == "cuda" and cache_dtype != torch.float8_e4m3fn:
            from genfast.kernels import attention as kernels

            for tiles in DECODE_AB_TILES:  # A/B: the shared kernel with other tiles than its defaults
                fns["genfast n{} w{} s{}".format(*tiles)] = functools.partial(
                    kernels.attention_with_kvcache, q, gk, gv, k, v, lens, 0, None, HEADDIM ** -0.5, True, -1, 0,
                    0.0, None, k_scale, v_scale, decode_config=tiles)
        if cache_dtype != torch.float8_e4m3fn:
            # Baselines in their own layout (b, nheads_k, seqlen, d), contiguous.
            qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
            k_cache_fa = (k_cache.clone(), v_cache.clone()) if _flash_attn() is not None and device.type == "cuda" \
                else None
            kc = k_cache.transpose(1, 2).contiguous()
            vc = v_cache.transpose(1, 2).contiguous()
            del k_cache, v_cache
            fns["sdpa"] = lambda: F.scaled_dot_product_attention(qt, kc, vc, enable_gqa=True)
            input_pos = torch.tensor([context - 1], device=device)
            mask = torch.ones(1, 1, 1, context, dtype=torch.bool, device=device)
            fns["gpt-fast"] = lambda: gpt_fast_step(qt, kc, vc, kt, vt, input_pos, mask)
            compiled = torch.compile(gpt_fast_step, dynamic=False)
            fns["torch.compile"] = lambda: compiled(qt, kc, vc, kt, vt, input_pos, mask)
            fns["flex_attention"] = lambda: _flex()(qt, kc, vc, enable_gqa=True)
            if (fa := _flash_attn()) is not None and device.type == "cuda":
                fk, fv = k_cache_fa
                fns["flash-attn"] = lambda: fa(q, fk, fv, k, v, cache_seqlens=lens)
        return fns

    return build


# The GPU quick set's A/B rows for the prefill kernel, timed in the same run as genfast's default and SDPA:
# the kernel before the prefill kernel existed (G heads of a KV head packed into one tile), and the prefill
# kernel with other (BLOCK_M, BLOCK_N, num_warps, num_stages) than prefill_config's.
# GENFAST_PREFILL_TILES="128,128,8,3;64,64,4,4" replaces the tiles below.
PREFILL_AB_TILES = ((128, 64, 8, 3), (64, 64, 4, 3), (128, 128, 8, 3))


def _prefill_variants() -> list[tuple[str, str, tuple | None]]:
    """(row name, kernel, tiles) of the A/B rows."""
    spec = os.environ.get("GENFAST_PREFILL_TILES")
    tiles = PREFILL_AB_TILES if spec is None else \
        [tuple(int(x) for x in t.split(",")) for t in spec.split(";") if t.strip()]
    for t in tiles:
        if len(t) != 4:
            raise ValueError(f"GENFAST_PREFILL_TILES: each entry is BLOCK_M,BLOCK_N,num_warps,num_stages, got {t}")
    return [("genfast shared kernel", "shared", None)] + \
        [(f"genfast {t[0]}x{t[1]} w{t[2]} s{t[3]}", "prefill", t) for t in tiles]


def _prefill(seqlen, dtype, device, variants=(), flex=True):
    def build():
        g = torch.Generator(device="cpu").manual_seed(0)
        q = torch.randn(1, seqlen, NHEADS, HEADDIM, generator=g).to(device, dtype)
        k = torch.randn(1, seqlen, NHEADS_K, HEADDIM, generator=g).to(device, dtype)
        v = torch.randn(1, seqlen, NHEADS_K, HEADDIM, generator=g).to(device, dtype)
        qt, kt, vt = (x.transpose(1, 2).contiguous() for x in (q, k, v))
        fns = {"genfast": lambda: genfast.attention(q, k, v, causal=True),
               "sdpa": lambda: F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, enable_gqa=True)}
        if torch.device(device).type == "cuda":
            fns["sdpa flash"] = _sdpa_flash(qt, kt, vt)
        if flex:
            from torch.nn.attention.flex_attention import create_block_mask

            mask = create_block_mask(lambda b, h, i, j: j <= i, 1, None, seqlen, seqlen, device=device)
            fns["flex_attention"] = lambda: _flex()(qt, kt, vt, block_mask=mask, enable_gqa=True)
        if variants:
            from genfast.kernels import attention as kernels

            def forced(kernel, tiles):  # the op's Triton implementation with the kernel and tiles forced
                return lambda: kernels.attention(q, k, v, None, None, seqlen, seqlen, HEADDIM ** -0.5, True, -1, 0,
                                                 0.0, None, kernel=kernel, config=tiles)

            fns.update({name: forced(kernel, tiles) for name, kernel, tiles in variants})
        return fns

    return build


def _sdpa_flash(qt, kt, vt):
    """SDPA held to its flash backend (FlashAttention-2; on a Hopper GPU SDPA picks cuDNN's kernel by
    default), the KV heads repeated for it beforehand, outside the timing."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    group = qt.shape[1] // kt.shape[1]
    kr, vr = kt.repeat_interleave(group, 1), vt.repeat_interleave(group, 1)

    def run():
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(qt, kr, vr, is_causal=True)
    return run


CHUNK, CACHED, PAGE_SIZE = 2048, 2048, 16  # chunked prefill: a 2k chunk after 2k cached tokens, vLLM's page size


def _chunked_prefill(dtype, cache_dtype, device):
    """A chunk of CHUNK queries over a paged cache (randomly permuted pages) holding CACHED + CHUNK tokens, the
    chunk's keys appended before the call (KVCache's update, then attend). A/B rows in the same run: the same
    tokens in a contiguous cache (for a bf16 cache: the path paged must match), and on a GPU the shared kernel
    (what paged and fp8 caches ran before the prefill kernel took them). On the CPU both rows are the public
    call (a paged cache's pages gathered for PyTorch's flash attention, a contiguous one read in place)."""
    gpu = torch.device(device).type == "cuda"

    def build():
        g = torch.Generator(device="cpu").manual_seed(0)
        n = CACHED + CHUNK
        q = torch.randn(1, CHUNK, NHEADS, HEADDIM, generator=g).to(device, dtype)
        k = torch.randn(1, n, NHEADS_K, HEADDIM, generator=g).to(device, dtype)
        v = torch.randn(1, n, NHEADS_K, HEADDIM, generator=g).to(device, dtype)
        k_scale = v_scale = None
        if cache_dtype == torch.float8_e4m3fn:
            (k, k_scale), (v, v_scale) = _fp8(k), _fp8(v)
        pages = n // PAGE_SIZE
        block_table = torch.randperm(pages, generator=g).to(device, torch.int32).view(1, pages)
        pk, pv = (torch.empty(pages, PAGE_SIZE, NHEADS_K, HEADDIM, dtype=cache_dtype, device=device)
                  for _ in range(2))
        for dst, src in ((pk, k), (pv, v)):  # as bytes: index_put has no fp8 kernel
            dst.view(torch.uint8)[block_table[0].long()] = \
                src.view(pages, PAGE_SIZE, NHEADS_K, HEADDIM).view(torch.uint8)
        lens = torch.full((1,), n, dtype=torch.int32, device=device)

        def call(kc, vc, bt, kernel=None):
            if not gpu:
                return lambda: genfast.attention_with_kvcache(q, kc, vc, cache_seqlens=lens, block_table=bt,
                                                              causal=True, k_scale=k_scale, v_scale=v_scale)
            from genfast.kernels import attention as kernels

            return lambda: kernels.attention_with_kvcache(q, kc, vc, None, None, lens, 0, bt, HEADDIM ** -0.5, True,
                                                          -1, 0, 0.0, None, k_scale, v_scale, kernel=kernel)

        fns = {"genfast": call(pk, pv, block_table), "genfast contiguous cache": call(k, v, None)}
        if gpu:
            fns["genfast shared kernel"] = call(pk, pv, block_table, "shared")
        return fns

    return build


# Diffusion UNet attention, no mask: (batch x heads, queries, keys, headdim). Headdim 8 is the reduced UNet of
# benchmarks/e2e/diffusion.py (64 channels, 8 heads) at 32x32 latents, self- and cross-attention (77 text
# tokens); headdim 40 is SD1.5's first level (320 channels, 8 heads, 64x64 latents) cross-attention.
UNET_ATTENTION = {"unet self hd8": (2, 8, 1024, 1024, 8), "unet cross hd8": (2, 8, 1024, 77, 8),
                  "sd1.5 cross hd40": (2, 8, 4096, 77, 40)}


def _unet_attention(batch, heads, nq, nk, headdim, dtype, device, compile=True):
    """genfast.attention in the (batch, tokens, heads, headdim) layout the projections give; SDPA as diffusers'
    AttnProcessor2_0 calls it (transposed views) and torch.compile of that."""
    def build():
        g = torch.Generator(device="cpu").manual_seed(0)
        q = torch.randn(batch, nq, heads, headdim, generator=g).to(device, dtype)
        k = torch.randn(batch, nk, heads, headdim, generator=g).to(device, dtype)
        v = torch.randn(batch, nk, heads, headdim, generator=g).to(device, dtype)

        def sdpa(q, k, v):
            out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
            return out.transpose(1, 2).reshape(batch, nq, heads * headdim)

        fns = {"genfast": lambda: genfast.attention(q, k, v).flatten(2), "sdpa": lambda: sdpa(q, k, v)}
        if compile:
            compiled = torch.compile(sdpa)
            fns["torch.compile"] = lambda: compiled(q, k, v)
        return fns

    return build


def cases(quick: bool, device) -> list[Case]:
    """quick: decode batch 8 at 4k context in fp32 and bf16 and with an fp8 cache, prefill 2k (GPU: bf16 and
    fp8 decode at batch 8 x 16k and batch 32 x 4k, prefill 2k and 8k with the A/B rows of ``_prefill_variants``);
    full: batch 1/8/32 x context 1k/4k/16k in fp32, bf16 and with an fp8 cache, prefill 2k and 8k. On a GPU
    both also time a chunked prefill over a paged bf16 and a paged fp8 cache (``_chunked_prefill``)."""
    device = torch.device(device)
    gpu = device.type == "cuda"
    flex = not (gpu and quick)  # FlexAttention's rows (its compile would take the GPU check's time)
    if quick:
        # on a GPU two bandwidth-bound points (each compiles the gpt-fast step once): the check must stay short
        grid = [(8, "16k"), (32, "4k")] if gpu else [(8, "4k")]
        dtypes = [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                  (torch.bfloat16, torch.float8_e4m3fn)]
        if gpu:
            dtypes = dtypes[1:]
        prefills = ["2k", "8k"] if gpu else ["2k"]
    else:
        grid = [(b, c) for b in (1, 8, 32) for c in CONTEXTS]
        dtypes = [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                  (torch.bfloat16, torch.float8_e4m3fn)]
        prefills = ["2k", "8k"]
    out = []
    for batch, ctx in grid:
        context = CONTEXTS[ctx]
        for dtype, cache_dtype in dtypes:
            kv_bytes = 2 * batch * context * NHEADS_K * HEADDIM * cache_dtype.itemsize
            # genfast's cache plus the baselines' copies in the query dtype
            footprint = kv_bytes + (0 if cache_dtype == torch.float8_e4m3fn else 2 * kv_bytes * dtype.itemsize
                                    // cache_dtype.itemsize)
            if not gpu and footprint > CPU_MAX_FOOTPRINT:
                continue
            fp8 = cache_dtype == torch.float8_e4m3fn
            out.append(Case(
                family=FAMILY, op="attention_with_kvcache", mode="decode" + (" fp8-cache" if fp8 else ""),
                size=f"b{batch} ctx{ctx}", dtype=dtype, device=device, nbytes=kv_bytes, footprint=kv_bytes,
                impls=("genfast",) if fp8 else ("genfast", "sdpa", "gpt-fast", "torch.compile")
                + (("flex_attention",) if flex else ()) + (("flash-attn",) if gpu and _flash_attn() else ())
                + (tuple("genfast n{} w{} s{}".format(*t) for t in DECODE_AB_TILES) if gpu and not fp8 else ()),
                build=_decode(batch, context, dtype, cache_dtype, device), compiled=("torch.compile", "flex_attention"),
            ))
    for size in prefills:
        seqlen = {"2k": 2048, "8k": 8192}[size]
        dtype = torch.bfloat16 if gpu else torch.float32
        nbytes = 2 * seqlen * (NHEADS + NHEADS_K) * HEADDIM * dtype.itemsize
        variants = _prefill_variants() if gpu and quick else []
        out.append(Case(family=FAMILY, op="attention", mode="prefill causal", size=size, dtype=dtype,
                        device=device, nbytes=nbytes, footprint=nbytes,
                        impls=("genfast", "sdpa") + (("sdpa flash",) if gpu else ())
                        + (("flex_attention",) if flex else ()) + tuple(name for name, _, _ in variants),
                        build=_prefill(seqlen, dtype, device, variants, flex), compiled=("flex_attention",)))
    for size, (batch, heads, nq, nk, headdim) in UNET_ATTENTION.items():
        if gpu and quick and size == "unet cross hd8":
            continue  # the GPU check's time is short: one headdim-8 case compiles the kernels for it
        dtype = torch.bfloat16 if gpu else torch.float32
        nbytes = 2 * batch * heads * (nq + nk) * headdim * dtype.itemsize
        out.append(Case(family=FAMILY, op="attention", mode="unet", size=size, dtype=dtype, device=device,
                        nbytes=nbytes, footprint=nbytes,
                        # on a GPU SDPA is one flash kernel either way: the check skips compiling it
                        impls=("genfast", "sdpa") if gpu else ("genfast", "sdpa", "torch.compile"),
                        build=_unet_attention(batch, heads, nq, nk, headdim, dtype, device, compile=not gpu)))
    # Chunked prefill over a paged cache (bf16, fp8) against the same tokens in a contiguous one; on a GPU also
    # with the shared kernel
    for cache_dtype in (torch.bfloat16, torch.float8_e4m3fn):
        n = CACHED + CHUNK
        nbytes = 2 * CHUNK * NHEADS * HEADDIM * 2 + 2 * n * NHEADS_K * HEADDIM * cache_dtype.itemsize
        fp8 = " fp8-cache" if cache_dtype == torch.float8_e4m3fn else ""
        out.append(Case(family=FAMILY, op="attention_with_kvcache", mode=f"chunked prefill paged{fp8}",
                        size=f"{CHUNK // 1024}k after {CACHED // 1024}k page{PAGE_SIZE}", dtype=torch.bfloat16,
                        device=device, nbytes=nbytes, footprint=nbytes,
                        impls=("genfast", "genfast contiguous cache") + (("genfast shared kernel",) if gpu else ()),
                        build=_chunked_prefill(torch.bfloat16, cache_dtype, device), compiled=()))
    return out
