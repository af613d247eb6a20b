"""Diffusion sampler steps in Triton: one kernel per step, guidance inside.

Every supported sampler step (Euler, DDIM, DDPM, LCM, Heun, DPM++ 2M / 2M SDE,
UniPC, flow-match Euler, ...) is the affine map of ``genfast/reference/diffusion.py``; the step's
coefficients are one row of a small fp32 table that the scheduler builds in
``set_timesteps``. The kernel reads its row through a device pointer (a row
index given as an int, or read from a 0-d device tensor), so a CUDA graph
replays the same launch for every step, and draws its noise from the shared
stream at positions ``offset + row * numel + i``.

Memory traffic per step for N latent elements of s bytes, with guidance
(the model was run on the batch [uncond, cond]):

| sampler | diffusers step + pipeline guidance (eager) | this kernel |
| --- | --- | --- |
| Euler (ODE) | chunk (views), cond-uncond (3), *g (2), +uncond (3), sample.to(fp32) (s+4 per elem), sigma*m, sample-x0, /sigma, *dt, +sample (~2 x 3 fp32 passes each), .to(dtype) (4+s): ~20 passes | read u, c, x; write prev: 4Ns |
| DDIM (eta=0) | guidance (8 passes) + ~6 elementwise ops (3 passes each) | 4Ns (+Ns to return x0) |
| DPM++ 2M | guidance + convert_model_output (3 ops) + upcast + ~9 ops on the update | read u, c, x, h; write prev, h: 6Ns |
| DPM++ 2M SDE | the same + randn (W) + 2 ops | 6Ns (noise drawn in registers) |
| flow-match Euler | guidance + upcast + 2 ops + downcast | 4Ns |
| DDPM, LCM | guidance + ~8 elementwise ops + randn (W) | 4Ns (+Ns for x0 / denoised) |
| Heun (per stage) | guidance + ~5 ops, a saved sample and derivative | read u, c, x, h; write prev, h (first stage), x0: 7Ns |
| UniPC (2M, bh2) | guidance + corrector (~8 ops) + predictor (~7 ops), fp32 temporaries | read u, c, x, h1, h2; write prev, h1, h2: 8Ns |
| UniPC order 3 | the same with 2 more difference terms in each, a 3x3 solve on the host | + h3 read and written: 10Ns |
| + dynamic thresholding (DDIM, DDPM, LCM, DPM++, UniPC) | x0.float(), reshape, abs, torch.quantile (a full sort per sample), clamp, divide, .to(dtype): ~8 passes + the sort | x0 pass (read u, c, x; write x0: 4Ns), abs + topk of the top 0.5% (~2Ns), then the step with a per-sample bound |

Target on a GPU: >= 80% of the copy bandwidth on SDXL-size and larger
latents. On an H200 (2026-11-27, ``bench --quick``) the video-latent rows,
33-100 MB a step, ran at 5-22% of it in 0.036-0.44 ms, slower than
torch.compile of the same math (0.014-0.36 ms); the step's Python and Triton
launch are the suspects (not profiled). SDXL-size and larger latents have not
been run on a GPU. Tested there (161 diffusion and 173
scheduler tests passed) and here with ``TRITON_INTERPRET=1`` against the
reference.

guidance_rescale needs the per-sample std of cond and of the guided output:
``_rescale_partials_kernel`` reads u and c once more and writes shifted sums
per block (2Ns), a few tiny torch ops on the device finish the factor.
Dynamic thresholding's bound (see ``genfast/diffusion.py``) enters the same
way, one (B,) load per element: x0 = clamp(x0, -s, s) / s, divided correctly
rounded as torch divides.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import cdiv, next_pow2
from .rng import load_seed, normal_at

BLOCK = 1024  # 4 fp32 per thread: a 16-byte access per input, 6 inputs at most stay in registers
NUM_WARPS = 8
NCOEF = 29  # the row layout of genfast.reference.diffusion.COEF


@triton.jit
def _guided(u_ptr, c_ptr, gf_ptr, idx, mask, g, inner, HAS_COND: tl.constexpr, HAS_GF: tl.constexpr):
    m = tl.load(u_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    if HAS_COND:
        c = tl.load(c_ptr + idx, mask=mask, other=0.0).to(tl.float32)
        m = m + g * (c - m)
    if HAS_GF:
        m = m * tl.load(gf_ptr + idx // inner, mask=mask, other=1.0)
    return m


@triton.jit(do_not_specialize=["row", "g", "inner", "clip", "seed", "offset"])  # per-step values must not recompile
def _sampler_step_kernel(x_ptr, u_ptr, c_ptr, n_ptr, h1_ptr, h2_ptr, h3_ptr, coef_ptr, row, row_ptr, g, gf_ptr,
                         inner, clip, bound_ptr, seed, seed_ptr, offset, prev_ptr, x0_ptr, numel,
                         HAS_COND: tl.constexpr, HAS_NOISE: tl.constexpr, DRAW: tl.constexpr,
                         HAS_H1: tl.constexpr, HAS_H2: tl.constexpr, HAS_H3: tl.constexpr,
                         ROW_FROM_PTR: tl.constexpr, HAS_GF: tl.constexpr, CLIP: tl.constexpr,
                         HAS_BOUND: tl.constexpr, WRITE_X0: tl.constexpr, SEED_FROM_PTR: tl.constexpr,
                         NCOEF: tl.constexpr, BLOCK: tl.constexpr):
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    mask = idx < numel
    if ROW_FROM_PTR:
        r = tl.load(row_ptr).to(tl.int64)  # read on the device: a replayed graph picks up the new step
    else:
        r = row.to(tl.int64)
    k = coef_ptr + r * NCOEF
    x = tl.load(x_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    m = _guided(u_ptr, c_ptr, gf_ptr, idx, mask, g, inner, HAS_COND, HAS_GF)
    x0 = tl.load(k + 0) * x + tl.load(k + 1) * m
    prev = tl.load(k + 3) * x + tl.load(k + 4) * m
    if HAS_NOISE:
        n = tl.load(n_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    elif DRAW:
        n = normal_at(load_seed(seed, seed_ptr, SEED_FROM_PTR), offset.to(tl.int64) + r * numel + idx)
    if HAS_NOISE or DRAW:
        x0 += tl.load(k + 2) * n
        prev += tl.load(k + 6) * n
    if CLIP:
        x0 = tl.minimum(tl.maximum(x0, -clip), clip)
    if HAS_BOUND:  # dynamic thresholding: the sample's bound s >= 1 (or sample_max_value)
        s = tl.load(bound_ptr + idx // inner, mask=mask, other=1.0)
        # correctly rounded, as torch divides (Triton's fp32 "/" may be an approximate division)
        x0 = tl.math.div_rn(tl.minimum(tl.maximum(x0, -s), s), s)
    prev += tl.load(k + 5) * x0
    if HAS_H1:
        h1 = tl.load(h1_ptr + idx, mask=mask, other=0.0).to(tl.float32)
        # consecutive x0 predictions nearly agree: difference them before scaling
        prev += tl.load(k + 7) * h1 + tl.load(k + 19) * (x0 - h1)
    else:  # an absent history reads as zeros
        prev += tl.load(k + 19) * x0
    if HAS_H2:
        h2 = tl.load(h2_ptr + idx, mask=mask, other=0.0).to(tl.float32)
        prev += tl.load(k + 8) * h2
    if HAS_H3:
        h3 = tl.load(h3_ptr + idx, mask=mask, other=0.0).to(tl.float32)
        prev += tl.load(k + 20) * h3
    # Each element's history is read above and written below by the same thread: in place is safe.
    if HAS_H1:
        new1 = tl.load(k + 9) * x + tl.load(k + 10) * m + tl.load(k + 11) * x0 + tl.load(k + 12) * h1
        if HAS_H2:
            new1 += tl.load(k + 13) * h2
        if HAS_H3:
            new1 += tl.load(k + 21) * h3
        tl.store(h1_ptr + idx, new1.to(h1_ptr.dtype.element_ty), mask=mask)
    if HAS_H2:
        new2 = tl.load(k + 14) * x + tl.load(k + 15) * m + tl.load(k + 16) * x0 + tl.load(k + 18) * h2
        if HAS_H1:
            new2 += tl.load(k + 17) * h1
        if HAS_H3:
            new2 += tl.load(k + 22) * h3
        tl.store(h2_ptr + idx, new2.to(h2_ptr.dtype.element_ty), mask=mask)
    if HAS_H3:
        new3 = tl.load(k + 23) * x + tl.load(k + 24) * m + tl.load(k + 25) * x0 + tl.load(k + 28) * h3
        if HAS_H1:
            new3 += tl.load(k + 26) * h1
        if HAS_H2:
            new3 += tl.load(k + 27) * h2
        tl.store(h3_ptr + idx, new3.to(h3_ptr.dtype.element_ty), mask=mask)
    tl.store(prev_ptr + idx, prev.to(prev_ptr.dtype.element_ty), mask=mask)
    if WRITE_X0:
        tl.store(x0_ptr + idx, x0.to(x0_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["g", "inner"])
def _rescale_partials_kernel(u_ptr, c_ptr, out_ptr, g, inner, BLOCK: tl.constexpr):
    """Per (sample b, block j) of the sample's `inner` elements: sums of d and d^2 for
    d = cond - cond[b, 0] and d = cfg - cfg[b, 0]. Shifting by the sample's first
    element keeps the fp32 sums free of cancellation when the mean is far from 0."""
    b = tl.program_id(0).to(tl.int64)
    j = tl.program_id(1)
    nblocks = tl.num_programs(1)
    offs = j.to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    mask = offs < inner
    base = b * inner
    u = tl.load(u_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
    c = tl.load(c_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
    cfg = u + g * (c - u)
    u0 = tl.load(u_ptr + base).to(tl.float32)
    c0 = tl.load(c_ptr + base).to(tl.float32)
    cfg0 = u0 + g * (c0 - u0)
    dc = tl.where(mask, c - c0, 0.0)
    dg = tl.where(mask, cfg - cfg0, 0.0)
    o = out_ptr + (b * nblocks + j) * 4
    tl.store(o + 0, tl.sum(dc, axis=0))
    tl.store(o + 1, tl.sum(dc * dc, axis=0))
    tl.store(o + 2, tl.sum(dg, axis=0))
    tl.store(o + 3, tl.sum(dg * dg, axis=0))


# ---- launchers (argument order = the op schemas in genfast/diffusion.py) -----

def sampler_step(sample, model_output, cond, noise, history, history2, history3, coeffs, row, row_tensor,
                 guidance_scale, guidance_factor, clip, bound, draw_noise, seed, seed_tensor, offset, return_x0):
    prev = torch.empty_like(sample)
    x0 = torch.empty_like(sample) if return_x0 else sample.new_empty((0,))
    numel = sample.numel()
    if numel == 0:
        return prev, x0
    per_sample = guidance_factor if guidance_factor is not None else bound  # both (B,): one batch split
    inner = numel // per_sample.numel() if per_sample is not None else numel
    _sampler_step_kernel[(cdiv(numel, BLOCK),)](
        sample, model_output, cond if cond is not None else sample, noise if noise is not None else sample,
        history if history is not None else sample, history2 if history2 is not None else sample,
        history3 if history3 is not None else sample,
        coeffs, row, row_tensor if row_tensor is not None else coeffs, guidance_scale,
        guidance_factor if guidance_factor is not None else coeffs, inner, clip,
        bound if bound is not None else coeffs, seed,
        seed_tensor if seed_tensor is not None else coeffs, offset, prev, x0 if return_x0 else prev, numel,
        HAS_COND=cond is not None, HAS_NOISE=noise is not None, DRAW=draw_noise and noise is None,
        HAS_H1=history is not None, HAS_H2=history2 is not None, HAS_H3=history3 is not None,
        ROW_FROM_PTR=row_tensor is not None, HAS_GF=guidance_factor is not None, CLIP=clip > 0,
        HAS_BOUND=bound is not None, WRITE_X0=return_x0, SEED_FROM_PTR=seed_tensor is not None, NCOEF=NCOEF,
        BLOCK=BLOCK, num_warps=NUM_WARPS)
    return prev, x0


def guidance_rescale_factor(uncond, cond, guidance_scale, guidance_rescale):
    batch = uncond.shape[0]
    inner = uncond.numel() // batch
    block = min(4096, next_pow2(inner))
    nblocks = cdiv(inner, block)
    partials = torch.empty((batch, nblocks, 4), dtype=torch.float32, device=uncond.device)
    _rescale_partials_kernel[(batch, nblocks)](uncond, cond, partials, guidance_scale, inner, BLOCK=block,
                                               num_warps=NUM_WARPS)
    # Finish in fp64 on the device: a handful of B-sized ops, no host sync.
    s = partials.double().sum(dim=1)
    var_c = (s[:, 1] - s[:, 0] * s[:, 0] / inner) / (inner - 1)
    var_g = (s[:, 3] - s[:, 2] * s[:, 2] / inner) / (inner - 1)
    return (guidance_rescale * torch.sqrt(var_c / var_g) + (1.0 - guidance_rescale)).float()
