"""attention_with_kvcache, KVCache and attention on every backend, against an fp64
oracle written here (plain softmax attention with explicit masks, one batch row
at a time), with PyTorch's own error in the query's precision as the yardstick.
Caches are poisoned with NaN outside the valid prefix, so a kernel that reads a
position it must not read, or writes one it must not write, fails."""
import importlib
import math
import os
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import genfast
from genfast import _ops

from conftest import BACKENDS, DEVICE, assert_close

FP8 = torch.float8_e4m3fn
# fp32: a few ulps of summation-order noise over ~1000 keys; fp16/bf16: below one ulp of the output.
ATOL = {torch.float32: 1e-5, torch.float16: 1e-4, torch.bfloat16: 1e-3}


def is_triton():
    return _ops.backends.forced() == "triton"


def skip_unsupported(device, dtype):
    if is_triton() and device == "cpu" and dtype == torch.bfloat16:
        pytest.skip("the Triton interpreter has no bf16 arithmetic")


# ---- the oracle -------------------------------------------------------------------

def oracle(q, k, v, lens, *, dtype=torch.float64, scale=None, causal=True, window=(-1, -1), softcap=0.0,
           alibi=None):
    """Softmax attention of q (b, sq, h, d) over the first lens[b] rows of k, v (b, n, hk, d), computed in
    ``dtype`` on the CPU. Returns out (b, sq, h, d) and lse (b, h, sq)."""
    b, sq, h, d = q.shape
    group = h // k.shape[2]
    scale = 1 / math.sqrt(d) if scale is None else scale
    out = torch.zeros(b, sq, h, d, dtype=dtype)
    lse = torch.full((b, h, sq), -math.inf, dtype=dtype)
    for i in range(b):
        n = int(lens[i])
        kb = k[i, :n].cpu().to(dtype).repeat_interleave(group, dim=1)
        vb = v[i, :n].cpu().to(dtype).repeat_interleave(group, dim=1)
        s = torch.einsum("qhd,khd->hqk", q[i].cpu().to(dtype), kb) * scale
        if softcap > 0:
            s = softcap * torch.tanh(s / softcap)
        qpos = (n - sq + torch.arange(sq)).view(sq, 1)
        kpos = torch.arange(n).view(1, n)
        if alibi is not None:
            slopes = (alibi[i] if alibi.dim() == 2 else alibi).cpu().to(dtype)
            s = s - slopes.view(h, 1, 1) * (qpos - kpos).abs().to(dtype)
        mask = torch.ones(sq, n, dtype=torch.bool)
        if causal:
            mask &= kpos <= qpos
        if window[0] >= 0:
            mask &= kpos >= qpos - window[0]
        if window[1] >= 0 and not causal:
            mask &= kpos <= qpos + window[1]
        s = s.masked_fill(~mask, -math.inf)
        m = s.amax(-1, keepdim=True)
        m = torch.where(torch.isinf(m), torch.zeros_like(m), m)
        e = torch.exp(s - m)
        tot = e.sum(-1, keepdim=True)
        p = torch.where(tot > 0, e / torch.where(tot > 0, tot, torch.ones_like(tot)), torch.zeros_like(e))
        out[i] = torch.einsum("hqk,khd->qhd", p, vb)
        lse[i] = torch.where(tot[..., 0] > 0, (m + torch.log(tot))[..., 0], torch.full_like(tot[..., 0], -math.inf))
    return out, lse


def check_against_oracle(out, lse, q, k_log, v_log, lens, **kw):
    """out/lse of a kernel against the fp64 oracle, PyTorch in q's dtype as the yardstick."""
    out64, lse64 = oracle(q, k_log, v_log, lens, **kw)
    lowp, _ = oracle(q, k_log.to(q.dtype), v_log.to(q.dtype), lens, dtype=q.dtype, **kw)
    assert out.dtype == q.dtype and out.shape == q.shape
    assert_close(out, out64, lowp, atol=ATOL[q.dtype], name="out")
    assert lse.dtype == torch.float32 and lse.shape == lse64.shape
    finite = torch.isfinite(lse64)
    assert torch.equal(torch.isfinite(lse.cpu()), finite), "lse: -inf exactly where a row sees no key"
    torch.testing.assert_close(lse.cpu().double()[finite], lse64[finite], rtol=1e-5, atol=1e-5)


# ---- cache setup ------------------------------------------------------------------

def same_bits(a, b):
    return torch.equal(a.cpu().contiguous().view(torch.uint8), b.cpu().contiguous().view(torch.uint8))


def quantize(x, dtype, scale):
    """x / scale rounded to e4m3 (saturated at +-448) by exact fp64 arithmetic, ties to even:
    the oracle does not lean on any PyTorch version's fp32 -> fp8 conversion."""
    if dtype != FP8:
        return x.to(dtype)
    q = (x.float() / scale.cpu().view(-1, 1)).clamp(-448, 448).double()
    step = torch.exp2(torch.floor(torch.log2(q.abs().clamp_min(2.0 ** -6))) - 3)  # 3 mantissa bits; subnormals 2^-9
    return (torch.round(q / step) * step).float().to(FP8)  # exactly representable: the cast only relabels


def dequantize(x, scale):
    x = x.cpu().double()
    return x if scale is None else x * scale.cpu().double().view(-1, 1)


class Cache:
    """A cache poisoned with NaN, filled with random rows below lens, contiguous or paged (randomly
    permuted pages), and its logical view (b, capacity, hk, d) for the oracle."""

    def __init__(self, batch, capacity, hk, d, dtype, device, lens, page_size=None, scale=False):
        self.dtype, self.page_size = dtype, page_size
        self.k_scale = (0.5 + torch.rand(hk)).to(device) if dtype == FP8 else None
        self.v_scale = (0.5 + torch.rand(hk)).to(device) if dtype == FP8 else None
        if page_size is None:
            shape = (batch, capacity, hk, d)
            self.block_table = None
        else:
            blocks = -(-capacity // page_size)
            num_blocks = batch * blocks + 3  # spare pages that nobody owns stay NaN
            shape = (num_blocks, page_size, hk, d)
            self.block_table = torch.randperm(num_blocks)[:batch * blocks].view(batch, blocks).to(torch.int32)
            self.block_table = self.block_table.to(device)
            capacity = blocks * page_size
        self.capacity = capacity
        store = torch.float32 if dtype == FP8 else dtype
        self.k = torch.full(shape, math.nan, dtype=store, device=device).to(dtype)
        self.v = torch.full(shape, math.nan, dtype=store, device=device).to(dtype)
        for name, scale_ in (("k", self.k_scale), ("v", self.v_scale)):
            vals = torch.randn(batch, capacity, hk, d)
            for b in range(batch):
                n = int(lens[b])
                self.write(getattr(self, name), b, 0, quantize(vals[b, :n], dtype, scale_))

    def slots(self, b, start, n):
        """(page-or-row index, slot) of positions start..start+n-1 of row b."""
        pos = torch.arange(start, start + n)
        if self.block_table is None:
            return torch.full_like(pos, b), pos
        bt = self.block_table[b].cpu().long()
        return bt[pos // self.page_size], pos % self.page_size

    def write(self, cache, b, start, rows):
        i, j = self.slots(b, start, rows.shape[0])
        cache[i.to(cache.device), j.to(cache.device)] = rows.to(cache.device)

    def logical(self, which):
        cache, scale = (self.k, self.k_scale) if which == "k" else (self.v, self.v_scale)
        if self.block_table is None:
            return dequantize(cache, scale)
        bt = self.block_table.cpu().long()
        x = cache.cpu()[bt].reshape(bt.shape[0], -1, *cache.shape[2:])
        return dequantize(x, scale)

    def snapshot(self):
        return self.k.clone(), self.v.clone()

    def expect_append(self, snap, k, v, lens):
        """The caches after writing k, v at lens: a bitwise copy of snap with only the new rows changed."""
        ek, ev = snap[0].cpu().clone(), snap[1].cpu().clone()
        for b in range(k.shape[0]):
            i, j = self.slots(b, int(lens[b]), k.shape[1])
            ek[i, j] = quantize(k[b].cpu(), self.dtype, self.k_scale)
            ev[i, j] = quantize(v[b].cpu(), self.dtype, self.v_scale)
        return ek, ev


def run_case(device, dtype, batch, sq, h, hk, d, capacity, snew, *, page_size=None, cache_dtype=None,
             int_seqlens=False, **kw):
    cache_dtype = cache_dtype or dtype
    lens = torch.randint(max(sq - snew, 0), capacity - snew + 1, (batch,))
    if int_seqlens:
        lens[:] = lens[0]
    cache = Cache(batch, capacity, hk, d, cache_dtype, device, lens, page_size)
    q = torch.randn(batch, sq, h, d).to(device, dtype)
    k = torch.randn(batch, snew, hk, d).to(device, dtype) if snew else None
    v = torch.randn(batch, snew, hk, d).to(device, dtype) if snew else None
    snap = cache.snapshot()
    seqlens = int(lens[0]) if int_seqlens else lens.to(device, torch.int32)
    public = dict(causal=kw.get("causal", True), window_size=kw.get("window", (-1, -1)),
                  softcap=kw.get("softcap", 0.0), alibi_slopes=kw.get("alibi"), softmax_scale=kw.get("scale"))
    out, lse = genfast.attention_with_kvcache(
        q, cache.k, cache.v, k, v, cache_seqlens=seqlens, block_table=cache.block_table,
        k_scale=cache.k_scale, v_scale=cache.v_scale, return_softmax_lse=True, **public)
    if k is not None:
        ek, ev = cache.expect_append(snap, k, v, lens)
        assert same_bits(cache.k, ek), "k_cache: only the appended rows change, to exactly k"
        assert same_bits(cache.v, ev), "v_cache: only the appended rows change, to exactly v"
    else:
        assert same_bits(cache.k, snap[0]) and same_bits(cache.v, snap[1])
    check_against_oracle(out, lse, q, cache.logical("k"), cache.logical("v"), lens + snew, **kw)


# Shapes: (batch, seqlen_q, nheads, nheads_k, headdim, capacity, seqlen_new). The interpreter runs the
# first ones (tiny); the C++ and reference backends run all of them.
SMALL = [
    (3, 1, 4, 1, 64, 37, 1),     # MQA decode, ragged lengths
    (2, 3, 2, 2, 64, 50, 3),     # MHA, chunked prefill appending 3
    (1, 5, 8, 2, 80, 40, 0),     # GQA 4, no append, odd headdim
]
LARGE = SMALL + [
    (4, 1, 32, 8, 128, 700, 1),  # Llama-3-8B decode
    (2, 17, 16, 2, 96, 300, 17),  # GQA 8, seqlen_q 17
    (2, 1, 4, 4, 256, 97, 1),
    (1, 7, 12, 3, 64, 1030, 2),
    (5, 2, 8, 8, 80, 33, 2),
]


def shapes():
    return SMALL if is_triton() else LARGE


@pytest.mark.skipif(not genfast.backends()["triton"][0], reason="no Triton backend")
@pytest.mark.parametrize("tiles", [(64, 4, 3), (64, 4, 4), (128, 4, 3)])
def test_decode_tiles(tiles):
    """The decode kernel's tiles (BLOCK_N, num_warps, num_stages): Hopper's default and the benchmark's
    A/B rows, fp16 and an fp8
    cache: a Llama-3-8B-style group of 4, ragged lengths over several key blocks, one appended token."""
    from genfast.kernels import attention as kernels

    lens = torch.tensor([300, 129, 7])
    for cache_dtype in (torch.float16, FP8):
        cache = Cache(3, 320, 2, 128, cache_dtype, DEVICE, lens, None)
        q = torch.randn(3, 1, 8, 128).to(DEVICE, torch.float16)
        k, v = (torch.randn(3, 1, 2, 128).to(DEVICE, torch.float16) for _ in range(2))
        out, lse = kernels.attention_with_kvcache(q, cache.k, cache.v, k, v, lens.to(DEVICE, torch.int32), 0, None,
                                                  128 ** -0.5, True, -1, 0, 0.0, None, cache.k_scale, cache.v_scale,
                                                  decode_config=tiles)
        check_against_oracle(out, lse, q, cache.logical("k"), cache.logical("v"), lens + 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_contiguous_cache(backend, dtype):
    skip_unsupported(backend, dtype)
    for shape in shapes():
        run_case(backend, dtype, *shape)


@pytest.mark.parametrize("page_size", [1, 3, 16, 256])
def test_paged_cache(backend, page_size):
    for shape in shapes()[:3 if is_triton() else 6]:
        run_case(backend, torch.float16 if page_size == 3 else torch.float32, *shape, page_size=page_size)


@pytest.mark.parametrize("kw", [
    dict(causal=False),
    dict(window=(5, -1)),
    dict(window=(3, 2), causal=False),
    dict(softcap=4.0),
    dict(alibi="heads"),
    dict(alibi="batch", window=(8, -1), softcap=2.0),
    dict(scale=0.3),
], ids=lambda kw: "-".join(f"{k}={v}" for k, v in kw.items()))
def test_masks_softcap_alibi(backend, kw):
    for shape in shapes()[:3 if is_triton() else 6]:
        batch, h = shape[0], shape[2]
        case = dict(kw)
        if case.get("alibi") == "heads":
            case["alibi"] = torch.rand(h).to(backend)
        elif case.get("alibi") == "batch":
            case["alibi"] = torch.rand(batch, h).to(backend)
        run_case(backend, torch.float32, *shape, **case)


BF16_DECODE = [{}, {"softcap": 4.0, "window": (40, -1)}, {"alibi": "batch", "scale": 0.3, "causal": False}]


def _bf16_decode_cases(backend):
    for cache_dtype in (None, FP8):
        for kw in BF16_DECODE:
            for shape in [(4, 1, 32, 8, 128, 700, 1), (3, 2, 8, 2, 64, 90, 2), (2, 1, 4, 4, 256, 97, 1),
                          (2, 1, 8, 1, 96, 70, 0), (2, 1, 6, 2, 80, 50, 1)]:
                case = dict(kw)
                if case.get("alibi") == "batch":
                    case["alibi"] = torch.rand(shape[0], shape[2]).to(backend)
                run_case(backend, torch.bfloat16, *shape, cache_dtype=cache_dtype, **case)


def test_bf16_decode_masks_softcap_alibi(backend):
    """bf16 queries over a bf16 or fp8 cache: on AVX512_BF16 CPUs the C++ decode takes vdpbf16ps for
    q.k (unscaled bf16 rows, fp8 rows widened to bf16 in a permuted order that the query rows share,
    the scale on the summed scores) and, over an fp8 cache, for P.V (probabilities rounded to bf16),
    headdims 64-256 (80, and 96 for fp8: the FMA kernel)."""
    if is_triton():
        pytest.skip("the Triton interpreter has no bf16 arithmetic")
    _bf16_decode_cases(backend)


def test_bf16_decode_fma_kernel():
    """The same cases through the FMA kernel that CPUs without AVX512_BF16 run (GENFAST_CPU_NO_BF16_DOT
    is read once per process: a subprocess)."""
    if not genfast.backends()["cpp"][0]:
        pytest.skip("the C++ backend is not built")
    code = ("import sys, torch, genfast; sys.path.insert(0, 'tests'); import test_attention as t; "
            "torch.manual_seed(5)\nwith genfast.use_backend('cpp'): t._bf16_decode_cases('cpu')")
    env = dict(os.environ, GENFAST_CPU_NO_BF16_DOT="1")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env, cwd=root,
                         check=False)
    assert out.returncode == 0, out.stderr[-3000:]


@pytest.mark.parametrize("headdim", [64, 80, 96, 128, 256])
def test_head_dims(backend, headdim):
    if is_triton() and headdim not in (64, 80):
        pytest.skip("the interpreter covers 64 and 80 (a power of two and not)")
    run_case(backend, torch.float32, 2, 2, 4, 2, headdim, 45, 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_fp8_cache(backend, dtype):
    skip_unsupported(backend, dtype)
    for shape in shapes()[:3 if is_triton() else 5]:
        run_case(backend, dtype, *shape, cache_dtype=FP8)
    run_case(backend, dtype, *SMALL[0], cache_dtype=FP8, page_size=3)


@pytest.mark.parametrize("huge", ["plain", "huge-q", "tiny-q"])
def test_fp8_cache_met_in_fp16(huge):
    """The Triton kernel meets an fp8 cache in fp16: the query goes to fp16 under a power of two that brings
    the tile's largest |q| into [2^14, 2^15], undone in the score scale (a bf16 query of 1e6 would overflow
    fp16 without it; the interpreter's fp16 query reaches 6e4), and a tiny query keeps its precision."""
    if "triton" not in dict(BACKENDS):
        pytest.skip("no Triton backend")
    from genfast.kernels import attention as kernels

    device = dict(BACKENDS)["triton"]
    dtype = torch.float16 if device == "cpu" else torch.bfloat16  # the interpreter has no bf16 arithmetic
    lens = torch.tensor([29, 40])
    cache = Cache(2, 48, 2, 64, FP8, device, lens)
    limit = 6e4 if dtype == torch.float16 else 1e7
    magnitude = limit / 4 if huge == "huge-q" else 1e-6 if huge == "tiny-q" else 1.0
    q = (torch.randn(2, 1, 8, 64) * magnitude).clamp(-limit, limit).to(device, dtype)
    out, lse = kernels.attention_with_kvcache(q, cache.k, cache.v, None, None, lens.to(device, torch.int32), 0,
                                              None, 64 ** -0.5, True, -1, 0, 0.0, None, cache.k_scale,
                                              cache.v_scale)
    check_against_oracle(out, lse, q, cache.logical("k"), cache.logical("v"), lens)


def test_fp8_every_value_reads_back_exactly(backend):
    """Each finite e4m3 byte (subnormals, zeros and 448 included) is widened exactly: a single key whose
    value row holds it, weight 1, gives it back times v_scale."""
    vals = torch.arange(256, dtype=torch.uint8).view(FP8)
    vals = vals[~torch.isnan(vals.float())]
    v_cache = vals[:192].view(3, 1, 1, 64).to(backend)  # 3 rows of 64 values (of the 254 finite ones)
    v_cache = torch.cat([v_cache, vals[-64:].view(1, 1, 1, 64).to(backend)])
    k_cache = torch.zeros_like(v_cache)
    q = torch.randn(4, 1, 1, 64).to(backend)
    scale = torch.tensor([0.75], device=backend)
    out = genfast.attention_with_kvcache(q, k_cache, v_cache, cache_seqlens=1, k_scale=scale, v_scale=scale)
    assert torch.equal(out.cpu(), v_cache.cpu().float() * 0.75)


def test_int_seqlens_and_full_cache(backend):
    run_case(backend, torch.float32, 2, 1, 4, 2, 64, 30, 1, int_seqlens=True)
    # cache_seqlens=None: the whole cache is valid
    cache = torch.randn(2, 19, 2, 64).to(backend)
    vcache = torch.randn(2, 19, 2, 64).to(backend)
    q = torch.randn(2, 1, 4, 64).to(backend)
    out, lse = genfast.attention_with_kvcache(q, cache, vcache, return_softmax_lse=True)
    check_against_oracle(out, lse, q, cache.double(), vcache.double(), torch.tensor([19, 19]))


def test_cache_batch_idx_reads_and_writes_the_indexed_rows(backend):
    """flash-attn's cache_batch_idx: row b uses cache row idx[b]; other cache rows are untouched."""
    gen = torch.Generator().manual_seed(5)
    kc, vc = (torch.randn(5, 24, 2, 64, generator=gen).to(backend) for _ in range(2))
    q = torch.randn(3, 2, 4, 64, generator=gen).to(backend)
    k, v = (torch.randn(3, 2, 2, 64, generator=gen).to(backend) for _ in range(2))
    idx = torch.tensor([4, 0, 2], dtype=torch.int32)
    lens = torch.tensor([7, 0, 20], dtype=torch.int32)
    want_k, want_v = kc[idx.long()].clone(), vc[idx.long()].clone()
    want = genfast.attention_with_kvcache(q, want_k, want_v, k, v, cache_seqlens=lens.to(backend))
    before_k, before_v = kc.clone(), vc.clone()
    out = genfast.attention_with_kvcache(q, kc, vc, k, v, cache_seqlens=lens.to(backend),
                                         cache_batch_idx=idx.to(backend))
    torch.testing.assert_close(out, want, rtol=0, atol=0)
    assert torch.equal(kc[idx.long()], want_k) and torch.equal(vc[idx.long()], want_v)
    assert torch.equal(kc[[1, 3]], before_k[[1, 3]]) and torch.equal(vc[[1, 3]], before_v[[1, 3]])


def test_strided_cache_is_written_in_place(backend):
    """A cache that is a view (one layer of a (layers, batch, ...) buffer, heads strided) is written
    in place, never copied."""
    full = torch.full((2, 3, 40, 2, 64), math.nan).to(backend)
    kc, vc = full[1], full[0]
    kc[0, :5], kc[1, :11] = torch.randn(5, 2, 64).to(backend), torch.randn(11, 2, 64).to(backend)
    vc[0, :5], vc[1, :11] = torch.randn(5, 2, 64).to(backend), torch.randn(11, 2, 64).to(backend)
    q = torch.randn(3, 1, 4, 64).to(backend)
    k, v = torch.randn(3, 1, 2, 64).to(backend), torch.randn(3, 1, 2, 64).to(backend)
    lens3 = torch.tensor([5, 11, 0])
    kc[2, :0] = 0
    out = genfast.attention_with_kvcache(q, kc, vc, k, v, cache_seqlens=lens3.to(backend, torch.int32))
    for b in range(3):
        assert torch.equal(full[1, b, lens3[b]], k[b, 0]) and torch.equal(full[0, b, lens3[b]], v[b, 0])
    out64, _ = oracle(q, kc.double(), vc.double(), lens3 + 1)
    lowp, _ = oracle(q, kc.float(), vc.float(), lens3 + 1, dtype=torch.float32)
    assert_close(out, out64, lowp, atol=ATOL[torch.float32])


def test_row_that_sees_no_key_is_zero(backend):
    """Window (0, 0) without causal still sees the key at its own position; an empty cache row sees none."""
    q = torch.randn(2, 1, 2, 64).to(backend)
    kc = torch.full((2, 8, 2, 64), math.nan).to(backend)
    vc = torch.full((2, 8, 2, 64), math.nan).to(backend)
    kc[0, :3], vc[0, :3] = torch.randn(3, 2, 64).to(backend), torch.randn(3, 2, 64).to(backend)
    out, lse = genfast.attention_with_kvcache(q, kc, vc, cache_seqlens=torch.tensor([3, 0], dtype=torch.int32,
                                                                                  device=backend),
                                             return_softmax_lse=True)
    assert torch.equal(out[1], torch.zeros_like(out[1])) and torch.isneginf(lse[1]).all()
    assert torch.isfinite(out[0]).all() and torch.isfinite(lse[0]).all()


# ---- KVCache ------------------------------------------------------------------------

@pytest.mark.parametrize("page_size", [None, 5])
def test_kvcache_decode_loop(backend, page_size):
    layers, batch, cap, hk, h, d = 2, 2, 24, 2, 4, 64
    cache = genfast.KVCache(layers, batch, cap, hk, d, dtype=torch.float32, device=backend, page_size=page_size)
    if page_size is not None:
        for row in range(batch):
            cache.allocate(row, 12)
    keys = torch.randn(layers, batch, 12, hk, d)
    vals = torch.randn(layers, batch, 12, hk, d)
    steps = [4, 1, 1, 1] if is_triton() else [5, 1, 1, 2, 1, 1]
    done = 0
    for n in steps:
        qs = torch.randn(layers, batch, n, h, d)
        for layer in range(layers):
            cache.update(layer, keys[layer, :, done:done + n].to(backend), vals[layer, :, done:done + n].to(backend))
            out = cache.attend(layer, qs[layer].to(backend))
            out64, _ = oracle(qs[layer], keys[layer].double(), vals[layer].double(), [done + n] * batch)
            lowp, _ = oracle(qs[layer], keys[layer], vals[layer], [done + n] * batch, dtype=torch.float32)
            assert_close(out, out64, lowp, atol=ATOL[torch.float32])
        cache.advance()
        done += n
    assert cache.seqlens.tolist() == [done] * batch
    cache.reset([0])
    assert cache.seqlens.tolist() == [0, done]
    if page_size is not None:
        assert len(cache._pages[0]) == 0


def test_kvcache_sync_lengths_after_device_side_advances():
    """What replaying captured decode steps does: seqlens grows on the device only; sync_lengths
    brings the host's copy (which guards the capacity) up to date."""
    cache = genfast.KVCache(1, 2, 8, 1, 64, dtype=torch.float32)
    k = torch.randn(2, 1, 1, 64)
    cache.update(0, k, k)
    cache.advance()
    cache.seqlens.add_(6)  # six replayed steps
    cache.sync_lengths()
    with pytest.raises(ValueError, match="row 0 would hold 9 tokens, beyond its capacity"):
        cache.update(0, torch.randn(2, 2, 1, 64), torch.randn(2, 2, 1, 64))
    cache.update(0, k, k)
    cache.advance()
    assert cache.seqlens.tolist() == [8, 8]


def test_kvcache_errors_and_fork():
    cache = genfast.KVCache(1, 2, 10, 1, 64, dtype=torch.float32, page_size=4, num_pages=8)
    k = torch.randn(2, 3, 1, 64)
    with pytest.raises(ValueError, match="allocate"):
        cache.update(0, k, k)  # no pages yet
    cache.allocate(0, 10)
    cache.allocate(1, 4)
    with pytest.raises(ValueError, match="row 1"):
        cache.update(0, torch.randn(2, 5, 1, 64), torch.randn(2, 5, 1, 64))
    assert cache.seqlens.tolist() == [0, 0]
    cache.update(0, k, k)
    cache.advance()
    cache.fork(0, 1)  # shares nothing full (3 < 4 tokens): copies the partial page
    assert cache._pages[1] != cache._pages[0][:1]
    q = torch.randn(1, 1, 1, 64).expand(2, 1, 1, 64)
    out = cache.attend(0, q)
    torch.testing.assert_close(out[0], out[1])
    # the checks run once per signature: a call that differs after valid ones is still refused
    with pytest.raises(TypeError, match="dtype"):
        cache.update(0, k[:, :1].double(), k[:, :1].double())
    with pytest.raises(ValueError, match="headdim"):
        cache.attend(0, torch.randn(2, 1, 1, 80))
    with pytest.raises(ValueError, match="layer"):
        cache.attend(1, q)
    assert cache.seqlens.tolist() == [3, 3]
    with pytest.raises(RuntimeError, match="out of pages"):
        genfast.KVCache(1, 1, 10, 1, 64, dtype=torch.float32, page_size=4, num_pages=1).allocate(0, 8)


@pytest.mark.parametrize("dtype, cache_dtype", [(torch.float32, torch.float32), (torch.float16, FP8),
                                                (torch.bfloat16, torch.bfloat16), (torch.bfloat16, FP8)])
@pytest.mark.parametrize("page_size", [None, 3])
def test_kvcache_takes_strided_views(backend, dtype, cache_dtype, page_size):
    """q, k and v as a fused QKV projection hands them (views of one (batch, seqlen, 3, heads, headdim)
    tensor), and q also as a transposed (batch, heads, seqlen, headdim) tensor: the caches and outputs
    are those of contiguous copies, bit for bit."""
    skip_unsupported(backend, dtype)
    batch, hk, h, d = 2, 2, 4, 64
    steps = [3, 1, 2] if is_triton() else [65, 1, 2]  # 65 queries: the C++ prefill path (PyTorch's kernel)
    cap = sum(steps)
    scales = {"k_scale": 0.5 + torch.rand(hk), "v_scale": 0.5 + torch.rand(hk)} if cache_dtype == FP8 else {}
    caches = [genfast.KVCache(1, batch, cap, hk, d, dtype=cache_dtype, device=backend, page_size=page_size, **scales)
              for _ in range(2)]
    if page_size is not None:
        for cache in caches:
            for row in range(batch):
                cache.allocate(row, cap)
    for n in steps:
        qkv = torch.randn(batch, n, 3, h, d).to(dtype).to(backend)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1, :hk], qkv[:, :, 2, hk:]
        q_t = q.transpose(1, 2).contiguous().transpose(1, 2)  # heads outermost: head stride n * d
        outs = []
        for cache, (qi, ki, vi) in zip(caches, [(q, k, v), (q.contiguous(), k.contiguous(), v.contiguous())]):
            cache.update(0, ki, vi)
            outs.append(cache.attend(0, qi))
            outs.append(cache.attend(0, q_t))
            cache.advance()
        assert all(o.is_contiguous() and o.shape == q.shape for o in outs)
        assert torch.equal(outs[0], outs[2]) and torch.equal(outs[1], outs[2]) and torch.equal(outs[3], outs[2])
    assert same_bits(caches[0].k, caches[1].k) and same_bits(caches[0].v, caches[1].v)


def test_kvcache_step_on_cpp_goes_straight_to_the_kernels(monkeypatch):
    """On the C++ backend a decode step's update and attend call the library's direct bindings, not
    the ops (whose checks and dispatch cost more than a small model's kernels), with the ops' results;
    what those decline (here: a step appending another seqlen_new) still gets the ops' errors, with
    nothing written."""
    if ("cpp", "cpu") not in BACKENDS:
        pytest.skip("the C++ backend is not built")
    attention_module = importlib.import_module("genfast.attention")
    cache = genfast.KVCache(2, 2, 8, 1, 64, dtype=torch.float32)
    k, q = torch.randn(2, 3, 1, 64), torch.randn(2, 3, 2, 64)
    expected = []
    for layer in range(2):
        cache.update(layer, k, k)
        expected.append(cache.attend(layer, q, causal=True))  # an argument: the checked op's path
    cache.reset()

    def refuse(*args):
        raise AssertionError("the op was called")

    monkeypatch.setattr(attention_module, "attention_with_kvcache_op", refuse)
    monkeypatch.setattr(attention_module, "kvcache_append_op", refuse)
    with genfast.use_backend("cpp"):
        for layer in range(2):
            cache.update(layer, k, k)
            assert torch.equal(cache.attend(layer, q), expected[layer])
        before = cache.k.clone()
        with pytest.raises(ValueError, match="same seqlen_new"):
            cache.update(1, k[:, :1], k[:, :1])
        assert torch.equal(cache.k, before)
        cache.advance()
        assert cache.seqlens.tolist() == [3, 3]


# ---- genfast.attention (prefill) --------------------------------------------------

@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_prefill_padded_and_packed(backend, causal, dtype):
    h, hk, d = (4, 2, 64)
    lengths = [5, 1, 12] if is_triton() else [5, 1, 40, 129]
    seqs = [(torch.randn(n, h, d).to(dtype), torch.randn(n, hk, d).to(dtype), torch.randn(n, hk, d).to(dtype))
            for n in lengths]
    q = torch.cat([s[0] for s in seqs]).to(backend)
    k = torch.cat([s[1] for s in seqs]).to(backend)
    v = torch.cat([s[2] for s in seqs]).to(backend)
    cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)), dtype=torch.int32, device=backend)
    out, lse = genfast.attention(q, k, v, causal=causal, cu_seqlens=cu, return_softmax_lse=True)
    # without lse a 16-bit batch may run another kernel (on the CPU PyTorch's, sequence by sequence)
    plain = genfast.attention(q, k, v, causal=causal, cu_seqlens=cu)
    assert lse.shape == (h, q.shape[0])
    for i, (qs, ks, vs) in enumerate(seqs):
        a, b = int(cu[i]), int(cu[i + 1])
        o64, l64 = oracle(qs[None], ks[None].double(), vs[None].double(), [ks.shape[0]], causal=causal)
        lowp, _ = oracle(qs[None], ks[None], vs[None], [ks.shape[0]], causal=causal, dtype=dtype)
        assert_close(out[a:b][None], o64, lowp, atol=ATOL[dtype])
        assert_close(plain[a:b][None], o64, lowp, atol=ATOL[dtype])
        torch.testing.assert_close(lse[:, a:b].cpu().double(), l64[0], rtol=1e-5, atol=1e-5)
    # padded batch, seqlen_q < seqlen_k (bottom-right causal)
    q = torch.randn(2, 7, h, d).to(backend, dtype)
    k = torch.randn(2, 11, hk, d).to(backend, dtype)
    v = torch.randn(2, 11, hk, d).to(backend, dtype)
    out = genfast.attention(q, k, v, causal=causal)
    o64, _ = oracle(q, k.double(), v.double(), [11, 11], causal=causal)
    lowp, _ = oracle(q, k, v, [11, 11], causal=causal, dtype=dtype)
    assert_close(out, o64, lowp, atol=ATOL[dtype])


# ---- the prefill kernel (kernels/attention.py: _prefill_kernel) ---------------------

PREFILL_TILES = (32, 16, 4, 2)  # small tiles: interpreter-sized lengths still span many full and edge blocks
PREFILL_KW = [
    dict(causal=True),
    dict(causal=False),
    dict(window=(21, -1)),
    dict(window=(9, 14), causal=False),
    dict(softcap=3.0, alibi=True, window=(40, -1)),
]


def _prefill_call(q, k, v, *, cu=None, max_seqlen=None, tiles=None, causal=True, window=(-1, -1), softcap=0.0,
                  alibi=None, scale=None):
    """_prefill_kernel forced, through the Triton op implementation."""
    from genfast.kernels import attention as kernels

    d = q.shape[-1]
    max_q = max_seqlen if cu is not None else q.shape[1]
    max_k = max_seqlen if cu is not None else k.shape[1]
    return kernels.attention(q, k, v, cu, cu, max_q, max_k, 1 / math.sqrt(d) if scale is None else scale, causal,
                             window[0], 0 if causal else window[1], softcap, alibi, kernel="prefill", config=tiles)


@pytest.mark.skipif(not genfast.backends()["triton"][0], reason="no Triton backend")
@pytest.mark.parametrize("kw", PREFILL_KW, ids=lambda kw: "-".join(f"{k}={v}" for k, v in kw.items()))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("group", [1, 4, 8])
def test_prefill_kernel_blocks(group, dtype, kw):
    """Full blocks, causal-diagonal and window-edge blocks, a last partial block and query tiles (75 is no
    multiple of 32 or 16), fewer keys than queries (rows that see no key), packed sequences, GQA 1/4/8."""
    if DEVICE == "cpu" and dtype == torch.bfloat16:
        pytest.skip("the Triton interpreter has no bf16 arithmetic")
    hk, d = (2, 64) if group < 8 else (1, 80)
    h = group * hk
    kw = dict(kw)
    alibi = torch.rand(h).to(DEVICE) if kw.pop("alibi", False) else None
    for sq, sk in [(75, 75), (40, 75), (50, 33)]:
        batch = 2 if sq == sk else 1
        q = torch.randn(batch, sq, h, d).to(DEVICE, dtype)
        k = torch.randn(batch, sk, hk, d).to(DEVICE, dtype)
        v = torch.randn(batch, sk, hk, d).to(DEVICE, dtype)
        out, lse = _prefill_call(q, k, v, tiles=PREFILL_TILES, alibi=alibi, **kw)
        check_against_oracle(out, lse, q, k.double(), v.double(), [sk] * batch, alibi=alibi, **kw)
    lengths = [45, 1, 70]
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device=DEVICE)
    q = torch.randn(sum(lengths), h, d).to(DEVICE, dtype)
    k = torch.randn(sum(lengths), hk, d).to(DEVICE, dtype)
    v = torch.randn(sum(lengths), hk, d).to(DEVICE, dtype)
    out, lse = _prefill_call(q, k, v, cu=cu, max_seqlen=max(lengths), tiles=PREFILL_TILES, alibi=alibi, **kw)
    for i, n in enumerate(lengths):
        a, b = int(cu[i]), int(cu[i + 1])
        check_against_oracle(out[a:b][None], lse[:, a:b][None], q[a:b][None], k[a:b][None].double(),
                             v[a:b][None].double(), [n], alibi=alibi, **kw)


@pytest.mark.skipif(not genfast.backends()["triton"][0], reason="no Triton backend")
@pytest.mark.parametrize("waves", [1.0, 100.0])
def test_prefill_default_tiles(waves):
    """The tiles prefill_config picks for 16-bit heads of 128 on an H100/H200 (227 KB of shared memory),
    with few and with many programs per SM: a causal grid whose last tile is partial, GQA 4."""
    from genfast.kernels import attention as kernels

    tiles = kernels.prefill_config(128, torch.float16, 232448, waves)
    assert tiles[0] == (64 if waves < 8 else 128)
    q = torch.randn(1, 150, 4, 128).to(DEVICE, torch.float16)
    k = torch.randn(1, 150, 1, 128).to(DEVICE, torch.float16)
    v = torch.randn(1, 150, 1, 128).to(DEVICE, torch.float16)
    out, lse = _prefill_call(q, k, v, tiles=tiles)
    check_against_oracle(out, lse, q, k.double(), v.double(), [150], causal=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_prefill_long_queries(backend, dtype):
    """Queries long enough for the prefill kernel on the Triton backend, with its own tiles (128 x 64 for
    16-bit inputs): packed sequences (GQA 4), a padded batch with fewer queries than keys and headdim 80."""
    skip_unsupported(backend, dtype)
    from genfast.kernels import attention as kernels

    h, hk, d = 8, 2, 64
    lengths = [70, 1, 200]
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device=backend)
    q = torch.randn(sum(lengths), h, d).to(backend, dtype)
    k = torch.randn(sum(lengths), hk, d).to(backend, dtype)
    v = torch.randn(sum(lengths), hk, d).to(backend, dtype)
    assert kernels._use_prefill(len(lengths), h, max(lengths), max(lengths), torch.device(backend))
    out, lse = genfast.attention(q, k, v, causal=True, cu_seqlens=cu, return_softmax_lse=True)
    for i, n in enumerate(lengths):
        a, b = int(cu[i]), int(cu[i + 1])
        check_against_oracle(out[a:b][None], lse[:, a:b][None], q[a:b][None], k[a:b][None].double(),
                             v[a:b][None].double(), [n])
    alibi = torch.rand(2, 4).to(backend)
    q = torch.randn(2, 65, 4, 80).to(backend, dtype)
    k = torch.randn(2, 150, 4, 80).to(backend, dtype)
    v = torch.randn(2, 150, 4, 80).to(backend, dtype)
    assert kernels._use_prefill(2, 4, 65, 150, torch.device(backend))
    out, lse = genfast.attention(q, k, v, causal=True, window_size=(70, -1), softcap=5.0, alibi_slopes=alibi,
                                 return_softmax_lse=True)
    check_against_oracle(out, lse, q, k.double(), v.double(), [150, 150], window=(70, -1), softcap=5.0,
                         alibi=alibi)


@pytest.mark.parametrize("headdim", [8, 16, 24, 40])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_prefill_small_head_dims(backend, dtype, headdim):
    """Headdims below 64 (diffusion UNets: 8 to 40; the CPU runs them with the queries in the vector lanes):
    a UNet's self- and cross-attention (no mask, more queries than keys and fewer), then causal with a
    window, softcap and ALiBi on a padded batch whose first queries see no key, then packed sequences
    with GQA."""
    skip_unsupported(backend, dtype)
    d = headdim
    for sq, sk in ((40, 40), (40, 7)):  # self, cross
        q, k, v = (torch.randn(2, n, 4, d).to(backend, dtype) for n in (sq, sk, sk))
        out, lse = genfast.attention(q, k, v, return_softmax_lse=True)
        check_against_oracle(out, lse, q, k.double(), v.double(), [sk] * 2, causal=False)
    alibi = torch.rand(2, 4).to(backend)
    q = torch.randn(2, 37, 4, d).to(backend, dtype)
    k, v = (torch.randn(2, 30, 2, d).to(backend, dtype) for _ in range(2))
    out, lse = genfast.attention(q, k, v, causal=True, window_size=(9, -1), softcap=5.0, alibi_slopes=alibi,
                                 return_softmax_lse=True)
    check_against_oracle(out, lse, q, k.double(), v.double(), [30, 30], window=(9, -1), softcap=5.0, alibi=alibi)
    lengths = [21, 1, 34]
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device=backend)
    q = torch.randn(sum(lengths), 4, d).to(backend, dtype)
    k, v = (torch.randn(sum(lengths), 1, d).to(backend, dtype) for _ in range(2))
    out, lse = genfast.attention(q, k, v, causal=True, cu_seqlens=cu, return_softmax_lse=True)
    for i, n in enumerate(lengths):
        a, b = int(cu[i]), int(cu[i + 1])
        check_against_oracle(out[a:b][None], lse[:, a:b][None], q[a:b][None], k[a:b][None].double(),
                             v[a:b][None].double(), [n])


def test_prefill_small_head_dims_huge_scores(backend):
    """Scores up to a few hundred nats apart (most probabilities underflow to 0, some to fp32 denormals):
    still the fp64 oracle's result, with no NaN or inf. (Larger scores make the test ill-conditioned:
    the scores' own fp32 rounding then decides between close keys.)"""
    q = torch.randn(2, 33, 2, 8).to(backend) * 8
    k, v = (torch.randn(2, 50, 2, 8).to(backend) * 8 for _ in range(2))
    out, lse = genfast.attention(q, k, v, return_softmax_lse=True)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    check_against_oracle(out, lse, q, k.double(), v.double(), [50, 50], causal=False)


@pytest.mark.parametrize("headdim", [8, 40])
@pytest.mark.parametrize("kw", [dict(), dict(causal=True, window_size=(700, 5))], ids=["full", "window"])
def test_prefill_small_head_dims_long_keys(backend, kw, headdim):
    """More keys than the CPU lanes kernel's chunk (512): the chunks' softmaxes merged online (headdim 40 over
    256 keys or more: the lanes kernel in fp32 too, not PyTorch's)."""
    if is_triton():
        pytest.skip("the interpreter is slow at this size; the chunking is the C++ kernel's")
    q = torch.randn(1, 20, 2, headdim).to(backend)
    k, v = (torch.randn(1, 1300, 2, headdim).to(backend) * 3 for _ in range(2))
    out, lse = genfast.attention(q, k, v, return_softmax_lse=True, **kw)
    window = kw.get("window_size", (-1, -1))
    check_against_oracle(out, lse, q, k.double(), v.double(), [1300], causal=kw.get("causal", False),
                         window=window)


@pytest.mark.parametrize("kw", [dict(), dict(window=(30, -1), softcap=4.0), dict(causal=False, alibi="heads")],
                         ids=["causal", "window-softcap", "alibi"])
def test_long_query_over_a_cache(backend, kw):
    """attention_with_kvcache with a long query (chunked prefill appending 70 rows) over a contiguous cache: the
    prefill kernel on the Triton backend, reading the ragged lengths on the device."""
    from genfast.kernels import attention as kernels

    shape = (2, 70, 8, 2, 64, 150, 70)
    assert kernels._use_prefill(2, 8, 70, 150, torch.device(backend))
    case = dict(kw)
    if case.get("alibi") == "heads":
        case["alibi"] = torch.rand(8).to(backend)
    run_case(backend, torch.float16 if kw else torch.float32, *shape, **case)


class _Launches:
    """A Triton kernel stand-in that counts its launches and runs the kernel."""

    def __init__(self, kernel):
        self.kernel, self.count = kernel, 0

    def __getitem__(self, grid):
        self.count += 1
        return self.kernel[grid]


# Chunked prefill over paged and fp8 caches: (batch, seqlen_q, nheads, nheads_k, headdim, capacity, seqlen_new),
# page size, cache dtype, query dtype and masks. Rows have different cache lengths (run_case draws them), and
# seqlen_new < seqlen_q puts queries on cached positions too (bottom-right causal alignment). fp32 runs 64 x 32
# tiles, fp16 128 x 64: pages of 1 and 16 split a key block, 48 straddles block edges, 256 holds several blocks.
LONG_PAGED_FP8 = [
    pytest.param((2, 70, 8, 2, 64, 150, 70), 1, None, torch.float32, dict(), id="page1-fp32"),
    pytest.param((2, 70, 8, 2, 64, 150, 16), 16, None, torch.float16, dict(window=(30, -1)), id="page16-fp16-window"),
    pytest.param((3, 66, 4, 1, 80, 200, 8), 48, None, torch.float32, dict(), id="page48-fp32-mqa-d80"),
    pytest.param((2, 64, 8, 2, 64, 230, 64), 256, None, torch.float16, dict(causal=False), id="page256-fp16-noncausal"),
    pytest.param((2, 70, 8, 2, 64, 150, 70), None, FP8, torch.float16, dict(), id="fp8-fp16"),
    pytest.param((2, 67, 4, 2, 64, 180, 5), None, FP8, torch.float32, dict(window=(40, -1), softcap=3.0),
                 id="fp8-fp32-window-softcap"),
    pytest.param((2, 70, 8, 2, 64, 160, 70), 48, FP8, torch.float16, dict(), id="page48-fp8-fp16"),
    pytest.param((2, 65, 8, 1, 80, 140, 20), 16, FP8, torch.float32, dict(causal=False, alibi="heads"),
                 id="page16-fp8-fp32-mqa-d80-alibi"),
]


@pytest.mark.parametrize("shape,page_size,cache_dtype,dtype,kw", LONG_PAGED_FP8)
def test_long_query_over_a_paged_or_fp8_cache(backend, monkeypatch, shape, page_size, cache_dtype, dtype, kw):
    """Chunked prefill as a paged-KV server runs it: a long query appending new rows to a paged and/or fp8
    cache. On the Triton backend it must run the prefill kernel (one launch, the shared kernel never)."""
    from genfast.kernels import attention as kernels

    skip_unsupported(backend, dtype)
    prefill = _Launches(kernels._prefill_kernel)
    shared = _Launches(kernels._attention_kernel)
    monkeypatch.setattr(kernels, "_prefill_kernel", prefill)
    monkeypatch.setattr(kernels, "_attention_kernel", shared)
    case = dict(kw)
    if case.get("alibi") == "heads":
        case["alibi"] = torch.rand(shape[2]).to(backend)
    run_case(backend, dtype, *shape, page_size=page_size, cache_dtype=cache_dtype, **case)
    if is_triton():
        assert (prefill.count, shared.count) == (1, 0), "the long query did not run _prefill_kernel"


def test_long_query_with_cache_batch_idx(backend, monkeypatch):
    """cache_batch_idx reaches the kernels as a paged cache with one page of the whole capacity per row (here
    96 rows, more than the 64 keys of a block): the prefill kernel gives what it gives on the indexed rows
    (on the CPU up to rounding: over a contiguous cache the 64-query chunk runs PyTorch's flash kernel)."""
    from genfast.kernels import attention as kernels

    prefill = _Launches(kernels._prefill_kernel)
    monkeypatch.setattr(kernels, "_prefill_kernel", prefill)
    kc, vc = (torch.randn(4, 96, 2, 64).to(backend) for _ in range(2))
    q = torch.randn(2, 64, 4, 64).to(backend)
    k, v = (torch.randn(2, 8, 2, 64).to(backend) for _ in range(2))
    idx = torch.tensor([3, 1], dtype=torch.int32)
    lens = torch.tensor([80, 57], dtype=torch.int32).to(backend)
    want_k, want_v = kc[idx.long()].clone(), vc[idx.long()].clone()
    want = genfast.attention_with_kvcache(q, want_k, want_v, k, v, cache_seqlens=lens)
    out = genfast.attention_with_kvcache(q, kc, vc, k, v, cache_seqlens=lens, cache_batch_idx=idx.to(backend))
    torch.testing.assert_close(out, want, rtol=0 if is_triton() else 1e-5, atol=0 if is_triton() else 1e-5)
    if is_triton():
        assert prefill.count == 2

# ---- bad input, opcheck, torch.compile ----------------------------------------------

def _never(*args):
    raise AssertionError("a kernel ran")


def _bad_calls():
    q = torch.randn(2, 1, 4, 64)
    kc, vc = torch.randn(2, 8, 2, 64), torch.randn(2, 8, 2, 64)
    k, v = torch.randn(2, 1, 2, 64), torch.randn(2, 1, 2, 64)
    lens = torch.tensor([3, 7], dtype=torch.int32)
    pk, pv = torch.randn(6, 4, 2, 64), torch.randn(6, 4, 2, 64)
    bt = torch.tensor([[0, 1], [2, 3]], dtype=torch.int32)
    f = genfast.attention_with_kvcache
    return [
        (lambda: f(q, kc, vc, k, v, cache_seqlens=torch.tensor([3, 8], dtype=torch.int32)), ValueError, "capacity"),
        (lambda: f(q, kc, vc, k, v, cache_seqlens=8), ValueError, "capacity"),
        (lambda: f(q, kc, vc, k, v, cache_seqlens=lens.long()), TypeError, "cache_seqlens"),
        (lambda: f(q, kc, vc, k, v, cache_seqlens=torch.tensor([-1, 0], dtype=torch.int32)), ValueError,
         "cache_seqlens"),
        (lambda: f(torch.randn(2, 1, 3, 64), kc, vc, cache_seqlens=lens), ValueError, "multiple of nheads_k"),
        (lambda: f(q, kc, vc, k, v, cache_seqlens=lens, block_table=bt.long()), TypeError, "block_table"),
        (lambda: f(q, pk, pv, k, v, cache_seqlens=lens, block_table=bt + 3), ValueError, "block_table"),
        (lambda: f(q, kc, vc, k, v, cache_seqlens=lens, cache_batch_idx=torch.tensor([0, 5], dtype=torch.int32)),
         ValueError, "cache_batch_idx"),
        (lambda: f(q, kc, vc, k, v, cache_seqlens=lens, cache_batch_idx=torch.tensor([0, 1])), TypeError,
         "cache_batch_idx"),
        (lambda: f(q, pk, pv, k, v, cache_seqlens=lens, block_table=bt,
                   cache_batch_idx=torch.tensor([0, 1], dtype=torch.int32)), ValueError, "cache_batch_idx"),
        (lambda: f(q.repeat(1, 1, 33, 1), kc[:, :, :1], vc[:, :, :1]), ValueError, "nheads / nheads_k"),
        (lambda: f(q, pk, pv, k, v, cache_seqlens=torch.tensor([7, 8], dtype=torch.int32), block_table=bt),
         ValueError, "capacity"),
        (lambda: f(torch.randn(2, 1, 4, 80), kc, vc, cache_seqlens=lens), ValueError, "headdim"),
        (lambda: f(q, kc, vc, k[..., :32], v, cache_seqlens=lens), ValueError, r"\bk\b"),
        (lambda: f(q, kc, vc, k, v.half(), cache_seqlens=lens), TypeError, r"\bv\b"),
        (lambda: f(q, kc, vc, k, None, cache_seqlens=lens), ValueError, "together"),
        (lambda: f(q, kc, vc, k, v), ValueError, "cache_seqlens"),
        (lambda: f(q, kc.half(), vc.half(), cache_seqlens=lens), TypeError, "k_cache"),
        (lambda: f(q, kc.to("meta"), vc, cache_seqlens=lens), ValueError, "k_cache"),
        (lambda: f(q, kc, vc[:, :4], cache_seqlens=lens), ValueError, "v_cache"),
        (lambda: f(q, kc, vc.transpose(0, 1).contiguous().transpose(0, 1), cache_seqlens=lens), ValueError,
         "strides"),
        (lambda: f(q, kc.to(FP8), vc.to(FP8), cache_seqlens=lens), ValueError, "k_scale"),
        (lambda: f(q, kc, vc, cache_seqlens=lens, k_scale=torch.ones(2)), ValueError, "k_scale"),
        (lambda: f(q, kc, vc, cache_seqlens=lens, window_size=(-2, 0)), ValueError, "window_size"),
        (lambda: f(q, kc, vc, cache_seqlens=lens, softcap=-1.0), ValueError, "softcap"),
        (lambda: f(q, kc, vc, cache_seqlens=lens, alibi_slopes=torch.ones(3)), ValueError, "alibi_slopes"),
        (lambda: f(q.int(), kc, vc, cache_seqlens=lens), TypeError, r"\bq\b"),
        (lambda: f(q[0], kc, vc, cache_seqlens=lens), ValueError, r"\bq\b"),
        (lambda: genfast.attention(q, kc[:1], vc[:1], causal=True), ValueError, "batch"),
        (lambda: genfast.attention(q[:, 0], kc[:, 0], vc[:, 0],
                                   cu_seqlens=torch.tensor([0, 1, 3], dtype=torch.int32)), ValueError, "cu_seqlens"),
    ], (kc, vc, pk, pv)


def test_bad_input_raises_before_anything_is_written(monkeypatch):
    calls, caches = _bad_calls()
    before = [c.clone() for c in caches]
    monkeypatch.setattr(_ops, "implementation", lambda *a: _never)
    for call, error, match in calls:
        with pytest.raises(error, match=match):
            call()
    for c, b in zip(caches, before):
        assert torch.equal(c, b), "a cache changed"


def test_opcheck(backend):
    q = torch.randn(2, 3, 4, 64, device=backend)
    kc, vc = torch.randn(2, 16, 2, 64, device=backend), torch.randn(2, 16, 2, 64, device=backend)
    k, v = torch.randn(2, 3, 2, 64, device=backend), torch.randn(2, 3, 2, 64, device=backend)
    lens = torch.tensor([2, 9], dtype=torch.int32, device=backend)
    ops = torch.ops.genfast
    torch.library.opcheck(ops.attention_with_kvcache.default,
                          (q, kc, vc, k, v, lens, 0, None, 0.125, True, -1, 0, 0.0, None, None, None, True))
    torch.library.opcheck(ops.kvcache_append_.default, (kc, vc, k, v, lens, 0, None, None, None))
    cu = torch.tensor([0, 1, 3], dtype=torch.int32, device=backend)
    torch.library.opcheck(ops.attention.default, (q[0], k[0].repeat(1, 1, 1)[:3], v[0][:3], cu, cu, 3, 3, 0.125,
                                                  True, -1, 0, 0.0, None, False))


def test_torch_compile_fullgraph_decode_step():
    torch._dynamo.reset()
    layers, batch, cap, hk, h, d = 2, 2, 16, 2, 4, 64

    def step(cache_k, cache_v, seqlens, q, k, v):
        outs = []
        for layer in range(layers):
            outs.append(genfast.attention_with_kvcache(q[layer], cache_k[layer], cache_v[layer], k[layer], v[layer],
                                                       cache_seqlens=seqlens))
        seqlens.add_(1)
        return torch.stack(outs)

    def fresh():
        torch.manual_seed(3)
        ck = torch.randn(layers, batch, cap, hk, d, device=DEVICE)
        cv = torch.randn(layers, batch, cap, hk, d, device=DEVICE)
        return ck, cv, torch.tensor([3, 6], dtype=torch.int32, device=DEVICE)

    q = torch.randn(layers, batch, 1, h, d, device=DEVICE)
    k = torch.randn(layers, batch, 1, hk, d, device=DEVICE)
    v = torch.randn(layers, batch, 1, hk, d, device=DEVICE)
    ck, cv, lens = fresh()
    expected = step(ck, cv, lens, q, k, v)
    ck2, cv2, lens2 = fresh()
    got = torch.compile(step, fullgraph=True)(ck2, cv2, lens2, q, k, v)
    torch.testing.assert_close(got, expected)
    assert torch.equal(ck2, ck) and torch.equal(cv2, cv) and torch.equal(lens2, lens)


@settings(max_examples=25, deadline=None)
@given(batch=st.integers(1, 3), sq=st.integers(1, 9), group=st.sampled_from([1, 2, 4, 8]), hk=st.integers(1, 3),
       d=st.sampled_from([64, 80, 96, 128, 256]), cap=st.integers(9, 90), snew=st.integers(0, 4),
       page=st.sampled_from([None, 1, 2, 7, 16]), causal=st.booleans(), left=st.integers(-1, 12),
       softcap=st.sampled_from([0.0, 3.0]))
def test_cpp_matches_oracle_on_random_shapes(batch, sq, group, hk, d, cap, snew, page, causal, left, softcap):
    if not genfast.backends()["cpp"][0]:
        pytest.skip("no C++ backend")
    with genfast.use_backend("cpp"):
        run_case("cpu", torch.float32, batch, sq, group * hk, hk, d, cap, snew, page_size=page, causal=causal,
                 window=(left, -1), softcap=softcap)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_decode_step_replays_in_a_cuda_graph():
    """KVCache's step allocates nothing on the host and reads lengths on the device: capture one step,
    replay it for new tokens, and compare with eager calls."""
    layers, batch, cap, hk, h, d = 2, 3, 64, 2, 8, 64
    cache = genfast.KVCache(layers, batch, cap, hk, d, dtype=torch.float16, device="cuda")
    eager = genfast.KVCache(layers, batch, cap, hk, d, dtype=torch.float16, device="cuda")
    q = torch.randn(layers, batch, 1, h, d, device="cuda", dtype=torch.float16)
    k = torch.randn(layers, batch, 1, hk, d, device="cuda", dtype=torch.float16)
    v = torch.randn_like(k)
    out = torch.empty(layers, batch, 1, h, d, device="cuda", dtype=torch.float16)

    def step(c):
        for layer in range(layers):
            c.update(layer, k[layer], v[layer])
            out[layer] = c.attend(layer, q[layer])
        c.seqlens.add_(1)  # advance() without its host mirror: the mirror is updated outside the graph
        c._pending = 0

    step(cache)  # warm up: Triton compiles outside the capture
    cache._lens = [1] * batch
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step(cache)
    step(eager)
    for _ in range(3):
        for x in (q, k, v):
            x.normal_()
        graph.replay()
        expected = []
        for layer in range(layers):
            eager.update(layer, k[layer], v[layer])
            expected.append(eager.attend(layer, q[layer]))
        eager.advance()
        torch.testing.assert_close(out, torch.stack(expected))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("window", [(-1, -1), (40, -1)])
def test_prefill_chunk_over_rows_of_equal_length(backend, dtype, window):
    """A chunk of 70 queries appended over 150 cached keys in every row (on the CPU: PyTorch's flash
    attention under a bottom-right causal mask; in bf16 only without lse), the cache past the rows
    poisoned with NaN."""
    skip_unsupported(backend, dtype)
    b, n, h, hk, d, old = 2, 70, 8, 2, 64, 150 if not is_triton() else 80
    q, k, v = (torch.randn(b, n, heads, d).to(backend, dtype) for heads in (h, hk, hk))
    k_old, v_old = (torch.randn(b, old, hk, d).to(backend, dtype) for _ in range(2))
    k_cache = torch.full((b, old + n + 9, hk, d), float("nan"), dtype=dtype, device=backend)
    v_cache = k_cache.clone()
    k_cache[:, :old], v_cache[:, :old] = k_old, v_old
    lens = torch.full((b,), old, dtype=torch.int32, device=backend)
    k_all, v_all = torch.cat([k_old, k], 1), torch.cat([v_old, v], 1)
    out, lse = genfast.attention_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=lens, window_size=window,
                                              return_softmax_lse=True)
    check_against_oracle(out, lse, q, k_all, v_all, [old + n] * b, window=window)
    out = genfast.attention_with_kvcache(q, k_cache, v_cache, cache_seqlens=lens + n, window_size=window)
    out64, _ = oracle(q, k_all, v_all, [old + n] * b, window=window)
    lowp, _ = oracle(q, k_all, v_all, [old + n] * b, dtype=q.dtype, window=window)
    assert_close(out, out64, lowp, atol=ATOL[q.dtype])


@pytest.mark.parametrize("dtype,cache_dtype", [(torch.float32, None), (torch.bfloat16, None), (torch.float32, FP8),
                                               (torch.bfloat16, FP8)], ids=["fp32", "bf16", "fp32-fp8", "bf16-fp8"])
def test_prefill_chunk_over_a_paged_cache(backend, dtype, cache_dtype):
    """A chunk of 70 queries appended to ragged rows of a paged cache (pages of 16, permuted, every other
    slot NaN): the same output as over a contiguous cache holding the same bytes (on the CPU both reach
    PyTorch's flash attention, the pages gathered and an fp8 cache widened with its scales: fp32 with lse,
    bf16 without), and the oracle's."""
    skip_unsupported(backend, dtype)
    b, n, h, hk, d = 3, 70, 8, 2, 64
    old = torch.tensor([150, 37, 0] if not is_triton() else [40, 9, 0])
    cache = Cache(b, int(old.max()) + n + 7, hk, d, cache_dtype or dtype, backend, old, page_size=16)
    q, k, v = (torch.randn(b, n, heads, d).to(backend, dtype) for heads in (h, hk, hk))
    want_lse = dtype == torch.float32
    kw = dict(cache_seqlens=old.to(backend, torch.int32), return_softmax_lse=want_lse, k_scale=cache.k_scale,
              v_scale=cache.v_scale)
    bt = cache.block_table.long()
    k_cont, v_cont = (x[bt].reshape(b, -1, hk, d) for x in (cache.k, cache.v))  # the rows' pages in order
    got = genfast.attention_with_kvcache(q, cache.k, cache.v, k, v, block_table=cache.block_table, **kw)
    ref = genfast.attention_with_kvcache(q, k_cont, v_cont, k, v, **kw)
    for a, r in zip(got if want_lse else (got,), ref if want_lse else (ref,)):
        torch.testing.assert_close(a, r, rtol=0, atol=0)
    k_log, v_log, lens = cache.logical("k"), cache.logical("v"), old + n
    if want_lse:
        check_against_oracle(*got, q, k_log, v_log, lens)
    else:
        out64, _ = oracle(q, k_log, v_log, lens)
        lowp, _ = oracle(q, k_log, v_log, lens, dtype=q.dtype)
        assert_close(got, out64, lowp, atol=ATOL[q.dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("causal", [True, False])
def test_whole_prompt_prefill(backend, dtype, causal):
    """A whole prompt (queries = keys from position 0, no softcap/ALiBi/window): on the CPU in fp32 this
    runs PyTorch's flash attention for the CPU; through attention and through a fresh cache's append."""
    skip_unsupported(backend, dtype)
    b, n, h, hk, d = 2, 67 if is_triton() else 131, 8, 2, 64
    q, k, v = (torch.randn(b, n, heads, d).to(backend, dtype) for heads in (h, hk, hk))
    out, lse = genfast.attention(q, k, v, causal=causal, return_softmax_lse=True)
    check_against_oracle(out, lse, q, k, v, [n] * b, causal=causal)
    k_cache = torch.full((b, n + 5, hk, d), float("nan"), dtype=dtype, device=backend)
    v_cache = k_cache.clone()
    out, lse = genfast.attention_with_kvcache(q, k_cache, v_cache, k, v, causal=causal, return_softmax_lse=True,
                                              cache_seqlens=torch.zeros(b, dtype=torch.int32, device=backend))
    check_against_oracle(out, lse, q, k, v, [n] * b, causal=causal)
    assert same_bits(k_cache[:, :n], k) and same_bits(v_cache[:, :n], v)
    assert torch.isnan(k_cache[:, n:]).all() and torch.isnan(v_cache[:, n:]).all()
    # KVCache's way: the keys appended first, then the queries attend (no k/v in the call)
    out, lse = genfast.attention_with_kvcache(q, k_cache, v_cache, causal=causal, return_softmax_lse=True,
                                              cache_seqlens=torch.full((b,), n, dtype=torch.int32, device=backend))
    check_against_oracle(out, lse, q, k, v, [n] * b, causal=causal)
    # Without lse, a 16-bit prompt on the CPU runs PyTorch's flash attention too (AMX tiles): its output
    # is held to the same rule
    out64, _ = oracle(q, k, v, [n] * b, causal=causal)
    lowp, _ = oracle(q, k, v, [n] * b, dtype=q.dtype, causal=causal)
    for out in (genfast.attention(q, k, v, causal=causal),
                genfast.attention_with_kvcache(q, k_cache, v_cache, causal=causal,
                                               cache_seqlens=torch.full((b,), n, dtype=torch.int32, device=backend))):
        assert_close(out, out64, lowp, atol=ATOL[q.dtype])
