"""Sampler steps in plain PyTorch: the oracle for kernels/diffusion.py and
csrc/cpu/diffusion.cpp, and the fallback.

Every supported sampler step is one affine map of the step's inputs, whose
coefficients the scheduler computes ahead of time (``genfast/diffusion.py``
builds them per sampler). With ``x`` the sample, ``u``/``c`` the unconditional
and conditional model outputs, ``n`` the noise, ``h1``/``h2``/``h3`` the
multistep state and ``k`` the coefficient row of this step (layout ``COEF``
below):

    m    = (u + g (c - u)) * f[b]                   guidance; f = guidance-rescale factor of sample b
    x0   = k.ax x + k.am m + k.an n                  predicted clean sample
    x0   = clamp(x0, -clip, clip)                    when clip > 0
    x0   = clamp(x0, -s[b], s[b]) / s[b]             when a per-sample bound s is given (dynamic thresholding)
    prev = k.px x + k.pm m + k.p0 x0 + k.pn n + k.p1 h1 + k.p2 h2 + k.p3 h3 + k.pd (x0 - h1)
    hj  <- k.hjx x + k.hjm m + k.hj0 x0 + k.hj1 h1 + k.hj2 h2 + k.hj3 h3   (j = 1, 2, 3; in place)

An absent history reads as zeros and is not written.

The difference term ``pd (x0 - h1)`` is how multistep methods use the previous
x0: two consecutive predictions nearly agree, and subtracting them before
scaling keeps their common part from costing rounding error (as diffusers'
``D1 = (m0 - m1) / r0`` does).

Arithmetic in fp32 (fp64 for fp64 inputs). Tensors are walked in memory
order, so channels_last inputs need no copy; the noise of the element at
memory position i is ``randn(seed, offset + row * numel + i)``: a step that
reads its row from the device draws fresh noise every step with no host work.
"""
from __future__ import annotations

import torch

from .rng import normal_at, resolve_seed

# Column of each coefficient in a row of the table (NCOEF columns).
COEF = {name: i for i, name in enumerate([
    "ax", "am", "an",
    "px", "pm", "p0", "pn", "p1", "p2",
    "h1x", "h1m", "h10", "h11", "h12",
    "h2x", "h2m", "h20", "h21", "h22",
    "pd",
    "p3", "h13", "h23",
    "h3x", "h3m", "h30", "h31", "h32", "h33",
])}
NCOEF = 29


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def flat(t: torch.Tensor) -> torch.Tensor:
    """The elements of a dense (non-overlapping, gap-free) tensor in memory order."""
    return t.as_strided((t.numel(),), (1,), t.storage_offset())


def _row(coeffs: torch.Tensor, row: int, row_tensor) -> torch.Tensor:
    r = row_tensor.to(coeffs.device) if row_tensor is not None else row
    return coeffs[r].to(torch.float64)


def _noise(numel, seed, seed_tensor, offset, row, row_tensor, device):
    start = offset + (row_tensor.to(device).to(torch.int64) if row_tensor is not None else row) * numel
    counter = torch.arange(numel, dtype=torch.int64, device=device) + start
    return normal_at(resolve_seed(seed, seed_tensor), counter)


def guided(uncond, cond, guidance_scale, guidance_factor, cdt):
    m = flat(uncond).to(cdt)
    if cond is not None:
        m = m + guidance_scale * (flat(cond).to(cdt) - m)
    if guidance_factor is not None:
        inner = m.numel() // guidance_factor.numel()
        m = (m.view(-1, inner) * guidance_factor.to(cdt).view(-1, 1)).view(-1)
    return m


def sampler_step(sample, model_output, cond, noise, history, history2, history3, coeffs, row, row_tensor,
                 guidance_scale, guidance_factor, clip, bound, draw_noise, seed, seed_tensor, offset, return_x0):
    cdt = compute_dtype(sample.dtype)
    k = _row(coeffs, row, row_tensor).to(cdt)
    c = {name: k[i] for name, i in COEF.items()}
    x = flat(sample).to(cdt)
    m = guided(model_output, cond, guidance_scale, guidance_factor, cdt)
    if noise is not None:
        n = flat(noise).to(cdt)
    elif draw_noise:
        n = _noise(x.numel(), seed, seed_tensor, offset, row, row_tensor, x.device).to(cdt)
    else:
        n = torch.zeros_like(x)
    x0 = c["ax"] * x + c["am"] * m + c["an"] * n
    if clip > 0:
        x0 = x0.clamp(-clip, clip)
    if bound is not None:
        s = bound.to(cdt).view(-1, 1)
        x0 = (torch.clamp(x0.view(s.numel(), -1), -s, s) / s).view(-1)
    # copies: the history buffers are rewritten below while these are still read
    hs = [flat(h).to(cdt, copy=True) if h is not None else torch.zeros_like(x)
          for h in (history, history2, history3)]
    h1, h2, h3 = hs
    prev = (c["px"] * x + c["pm"] * m + c["p0"] * x0 + c["pn"] * n + c["p1"] * h1 + c["p2"] * h2 + c["p3"] * h3
            + c["pd"] * (x0 - h1))
    for j, h in enumerate((history, history2, history3), start=1):
        if h is not None:
            new = (c[f"h{j}x"] * x + c[f"h{j}m"] * m + c[f"h{j}0"] * x0 + c[f"h{j}1"] * h1 + c[f"h{j}2"] * h2
                   + c[f"h{j}3"] * h3)
            flat(h).copy_(new)
    out = torch.empty_like(sample)
    flat(out).copy_(prev)
    if return_x0:
        x0_out = torch.empty_like(sample)
        flat(x0_out).copy_(x0)
    else:
        x0_out = sample.new_empty((0,))
    return out, x0_out


def guidance_rescale_factor(uncond, cond, guidance_scale, guidance_rescale):
    """Per-sample ``phi * std(cond) / std(cfg) + (1 - phi)`` (unbiased std over all
    but the batch dimension), as diffusers' ``rescale_noise_cfg``; fp32 (fp64)."""
    cdt = compute_dtype(uncond.dtype)
    batch = uncond.shape[0]
    u = flat(uncond).to(cdt).view(batch, -1)
    c = flat(cond).to(cdt).view(batch, -1)
    cfg = u + guidance_scale * (c - u)
    # accumulate in fp64: this is the oracle the fp32 kernels are held to
    std_c = c.double().std(dim=1)
    std_cfg = cfg.double().std(dim=1)
    return (guidance_rescale * std_c / std_cfg + (1.0 - guidance_rescale)).to(cdt)
