"""VAE sampling in Triton: z = mu + exp(logvar / 2) * eps with eps drawn in the
kernel, the Gaussian KL term, and their backward passes.

eps of element i is position ``offset + i`` (row-major index) of the normal
stream of ``kernels/rng.py``; the backward passes draw it again from
(seed, offset) instead of reading a stored copy. Arithmetic is fp32; z,
elementwise KL and gradients are stored in the input dtype, a reduced KL is a
0-d fp32 tensor.

Memory traffic for N elements of s bytes (s = 4 for fp32), counting passes over
N-element tensors the way eager PyTorch runs the same math:

| op | eager torch | this file |
| --- | --- | --- |
| reparameterize | randn_like (W), logvar*0.5 (R+W), exp (R+W), mul (2R+W), add (2R+W): 11 passes | read mu, logvar, write z: 3Ns (+ Ns given noise) |
| reparameterize_backward | grad_z*eps, *std, *0.5 over a stored eps and std: 8 passes | read grad_z, logvar, write grad_logvar: 3Ns (+ Ns given noise) |
| gaussian_kl ("sum") | 1+logvar, mu**2, exp, two subs, sum: 13 passes | read mu, logvar: 2Ns (+ one fp32 partial per 2048 elements) |
| gaussian_kl ("none") | the same with *-0.5 instead of the sum: 14 passes | read mu, logvar, write kl: 3Ns |
| gaussian_kl_backward | ~8 passes | read mu, logvar, write two grads: 4Ns (5Ns for "none") |
| reparameterize_with_kl | the two eager forwards above: 24 passes | read mu, logvar, write z: 3Ns (4Ns for "none") |
| reparameterize_with_kl_backward | the two eager backwards plus summing the grads: ~22 passes | read grad_z, mu, logvar, write two grads: 5Ns (6Ns for "none") |

Target on a GPU: at 64M fp32 elements each kernel moves its bytes at >= 80% of
the machine's copy bandwidth. Not measured yet: written on a machine without a
GPU and checked with ``TRITON_INTERPRET=1`` against ``genfast/reference/vae.py``.

Reductions are deterministic: each program writes its block's fp32 sum to a
partials buffer (one slot per program, no atomics) and ``torch.sum`` finishes
it, so the same input gives the same bits on every run.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import cdiv, exp
from .rng import load_seed, stream_block, stream_positions

# 8 elements per thread: one or two 16-byte accesses per tensor, and enough
# independent Philox work per thread to keep the loads in flight.
BLOCK = 2048
NUM_WARPS = 8


@triton.jit
def _kl(mu, lv):
    return -0.5 * (1.0 + lv - mu * mu - exp(lv))


@triton.jit
def _kl_grads(g, mu, lv):
    return g * mu, 0.5 * g * (exp(lv) - 1.0)


@triton.jit
def _grad_kl(grad_kl_ptr, idx, mask, scale, KL_ELEMENTWISE: tl.constexpr):
    """d(loss)/d(elementwise KL): the incoming gradient, per element for "none",
    else the 0-d gradient of the reduced KL (read on the device: no host sync)
    times d(reduced)/d(elementwise)."""
    if KL_ELEMENTWISE:
        g = tl.load(grad_kl_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    else:
        g = tl.load(grad_kl_ptr).to(tl.float32)
    return g * scale


@triton.jit(do_not_specialize=["seed", "offset"])  # a new seed/offset every step must not recompile
def _reparameterize_kernel(mu_ptr, logvar_ptr, noise_ptr, z_ptr, numel, seed, seed_ptr, offset,
                           HAS_NOISE: tl.constexpr, SEED_FROM_PTR: tl.constexpr, BLOCK: tl.constexpr):
    first, idx = stream_positions(offset, tl.program_id(0), BLOCK)
    mask = (idx >= 0) & (idx < numel)
    mu = tl.load(mu_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    lv = tl.load(logvar_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    if HAS_NOISE:
        eps = tl.load(noise_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    else:
        eps = stream_block(load_seed(seed, seed_ptr, SEED_FROM_PTR), first, BLOCK, True)
    z = mu + exp(0.5 * lv) * eps
    tl.store(z_ptr + idx, z.to(z_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["seed", "offset"])
def _reparameterize_backward_kernel(grad_z_ptr, logvar_ptr, noise_ptr, grad_logvar_ptr, numel, seed, seed_ptr,
                                    offset, HAS_NOISE: tl.constexpr, SEED_FROM_PTR: tl.constexpr,
                                    BLOCK: tl.constexpr):
    first, idx = stream_positions(offset, tl.program_id(0), BLOCK)
    mask = (idx >= 0) & (idx < numel)
    gz = tl.load(grad_z_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    lv = tl.load(logvar_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    if HAS_NOISE:
        eps = tl.load(noise_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    else:
        eps = stream_block(load_seed(seed, seed_ptr, SEED_FROM_PTR), first, BLOCK, True)
    g = 0.5 * gz * exp(0.5 * lv) * eps
    tl.store(grad_logvar_ptr + idx, g.to(grad_logvar_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gaussian_kl_kernel(mu_ptr, logvar_ptr, kl_ptr, numel, REDUCE: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    idx = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    mask = idx < numel
    mu = tl.load(mu_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    lv = tl.load(logvar_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    kl = _kl(mu, lv)
    if REDUCE:
        # kl_ptr is the fp32 partials buffer, one slot per program.
        tl.store(kl_ptr + pid, tl.sum(tl.where(mask, kl, 0.0), axis=0))
    else:
        tl.store(kl_ptr + idx, kl.to(kl_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gaussian_kl_backward_kernel(grad_kl_ptr, mu_ptr, logvar_ptr, grad_mu_ptr, grad_logvar_ptr, numel, scale,
                                 KL_ELEMENTWISE: tl.constexpr, BLOCK: tl.constexpr):
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    mask = idx < numel
    g = _grad_kl(grad_kl_ptr, idx, mask, scale, KL_ELEMENTWISE)
    mu = tl.load(mu_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    lv = tl.load(logvar_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    g_mu, g_lv = _kl_grads(g, mu, lv)
    tl.store(grad_mu_ptr + idx, g_mu.to(grad_mu_ptr.dtype.element_ty), mask=mask)
    tl.store(grad_logvar_ptr + idx, g_lv.to(grad_logvar_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["seed", "offset"])
def _reparameterize_with_kl_kernel(mu_ptr, logvar_ptr, z_ptr, kl_ptr, numel, seed, seed_ptr, offset,
                                   SEED_FROM_PTR: tl.constexpr, REDUCE: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    first, idx = stream_positions(offset, pid, BLOCK)
    mask = (idx >= 0) & (idx < numel)
    mu = tl.load(mu_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    lv = tl.load(logvar_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    eps = stream_block(load_seed(seed, seed_ptr, SEED_FROM_PTR), first, BLOCK, True)
    z = mu + exp(0.5 * lv) * eps
    tl.store(z_ptr + idx, z.to(z_ptr.dtype.element_ty), mask=mask)
    kl = _kl(mu, lv)
    if REDUCE:
        tl.store(kl_ptr + pid, tl.sum(tl.where(mask, kl, 0.0), axis=0))
    else:
        tl.store(kl_ptr + idx, kl.to(kl_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["seed", "offset"])
def _reparameterize_with_kl_backward_kernel(grad_z_ptr, grad_kl_ptr, mu_ptr, logvar_ptr, grad_mu_ptr,
                                            grad_logvar_ptr, numel, scale, seed, seed_ptr, offset,
                                            SEED_FROM_PTR: tl.constexpr, KL_ELEMENTWISE: tl.constexpr,
                                            BLOCK: tl.constexpr):
    first, idx = stream_positions(offset, tl.program_id(0), BLOCK)
    mask = (idx >= 0) & (idx < numel)
    g = _grad_kl(grad_kl_ptr, idx, mask, scale, KL_ELEMENTWISE)
    gz = tl.load(grad_z_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    mu = tl.load(mu_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    lv = tl.load(logvar_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    eps = stream_block(load_seed(seed, seed_ptr, SEED_FROM_PTR), first, BLOCK, True)
    g_mu, g_lv = _kl_grads(g, mu, lv)
    g_mu = g_mu + gz
    g_lv = g_lv + 0.5 * gz * exp(0.5 * lv) * eps
    tl.store(grad_mu_ptr + idx, g_mu.to(grad_mu_ptr.dtype.element_ty), mask=mask)
    tl.store(grad_logvar_ptr + idx, g_lv.to(grad_logvar_ptr.dtype.element_ty), mask=mask)


# ---- launchers (argument order = the op schemas in genfast/vae.py) -----------

def _noise_grid(numel: int, offset: int) -> int:
    """Programs for numel elements whose stream positions start at offset (see stream_positions)."""
    return cdiv(numel + offset % 4, BLOCK)


def _reduction_scale(reduction: str, x: torch.Tensor) -> float:
    """d(reduced KL)/d(elementwise KL); x is non-empty."""
    if reduction == "mean":
        return 1.0 / x.numel()
    if reduction == "batchmean":
        return 1.0 / x.shape[0]
    return 1.0


def _finish(partials: torch.Tensor, reduction: str, x: torch.Tensor) -> torch.Tensor:
    total = partials.sum()
    return total if reduction == "sum" else total.mul_(_reduction_scale(reduction, x))


def reparameterize(mu, logvar, noise, seed, seed_tensor, offset):
    z = torch.empty_like(mu)
    numel = mu.numel()
    if numel == 0:
        return z
    _reparameterize_kernel[(_noise_grid(numel, offset),)](
        mu, logvar, noise if noise is not None else mu, z, numel, seed,
        seed_tensor if seed_tensor is not None else mu, offset,
        HAS_NOISE=noise is not None, SEED_FROM_PTR=seed_tensor is not None, BLOCK=BLOCK, num_warps=NUM_WARPS)
    return z


def reparameterize_backward(grad_z, logvar, noise, seed, seed_tensor, offset):
    grad_logvar = torch.empty_like(logvar)
    numel = logvar.numel()
    if numel == 0:
        return grad_logvar
    _reparameterize_backward_kernel[(_noise_grid(numel, offset),)](
        grad_z, logvar, noise if noise is not None else logvar, grad_logvar, numel, seed,
        seed_tensor if seed_tensor is not None else logvar, offset,
        HAS_NOISE=noise is not None, SEED_FROM_PTR=seed_tensor is not None, BLOCK=BLOCK, num_warps=NUM_WARPS)
    return grad_logvar


def gaussian_kl(mu, logvar, reduction):
    numel = mu.numel()
    reduce = reduction != "none"
    if numel == 0:
        return mu.new_zeros((), dtype=torch.float32) if reduce else torch.empty_like(mu)
    grid = cdiv(numel, BLOCK)
    kl = mu.new_empty((grid,), dtype=torch.float32) if reduce else torch.empty_like(mu)
    _gaussian_kl_kernel[(grid,)](mu, logvar, kl, numel, REDUCE=reduce, BLOCK=BLOCK, num_warps=NUM_WARPS)
    return _finish(kl, reduction, mu) if reduce else kl


def gaussian_kl_backward(grad_kl, mu, logvar, reduction):
    grad_mu, grad_logvar = torch.empty_like(mu), torch.empty_like(logvar)
    numel = mu.numel()
    if numel == 0:
        return grad_mu, grad_logvar
    _gaussian_kl_backward_kernel[(cdiv(numel, BLOCK),)](
        grad_kl, mu, logvar, grad_mu, grad_logvar, numel, _reduction_scale(reduction, mu),
        KL_ELEMENTWISE=reduction == "none", BLOCK=BLOCK, num_warps=NUM_WARPS)
    return grad_mu, grad_logvar


def reparameterize_with_kl(mu, logvar, seed, seed_tensor, offset, reduction):
    z = torch.empty_like(mu)
    numel = mu.numel()
    reduce = reduction != "none"
    if numel == 0:
        return z, (mu.new_zeros((), dtype=torch.float32) if reduce else torch.empty_like(mu))
    grid = _noise_grid(numel, offset)
    kl = mu.new_empty((grid,), dtype=torch.float32) if reduce else torch.empty_like(mu)
    _reparameterize_with_kl_kernel[(grid,)](
        mu, logvar, z, kl, numel, seed, seed_tensor if seed_tensor is not None else mu, offset,
        SEED_FROM_PTR=seed_tensor is not None, REDUCE=reduce, BLOCK=BLOCK, num_warps=NUM_WARPS)
    return z, (_finish(kl, reduction, mu) if reduce else kl)


def reparameterize_with_kl_backward(grad_z, grad_kl, mu, logvar, seed, seed_tensor, offset, reduction):
    grad_mu, grad_logvar = torch.empty_like(mu), torch.empty_like(logvar)
    numel = mu.numel()
    if numel == 0:
        return grad_mu, grad_logvar
    _reparameterize_with_kl_backward_kernel[(_noise_grid(numel, offset),)](
        grad_z, grad_kl, mu, logvar, grad_mu, grad_logvar, numel, _reduction_scale(reduction, mu), seed,
        seed_tensor if seed_tensor is not None else mu, offset,
        SEED_FROM_PTR=seed_tensor is not None, KL_ELEMENTWISE=reduction == "none", BLOCK=BLOCK,
        num_warps=NUM_WARPS)
    return grad_mu, grad_logvar
