"""VAE ops in plain PyTorch: reparameterized sampling and the Gaussian KL term.

Arithmetic in fp32 (fp64 for fp64 inputs); z and elementwise KL come back in
the input dtype, reduced KL in the compute dtype. The noise of element i is
position ``offset + i`` of the normal stream (``reference/rng.py``) over the
row-major index, as in every backend.
"""
from __future__ import annotations

import torch

from .rng import normal_stream, resolve_seed


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def reduction_scale(reduction: str, shape) -> float:
    """d(reduced KL)/d(elementwise KL)."""
    numel = 1
    for s in shape:
        numel *= s
    if reduction == "mean":
        return 1.0 / max(numel, 1)
    if reduction == "batchmean":
        return 1.0 / max(shape[0], 1)
    return 1.0


def _eps(like: torch.Tensor, noise, seed, seed_tensor, offset) -> torch.Tensor:
    cdt = compute_dtype(like.dtype)
    if noise is not None:
        return noise.to(cdt)
    return normal_stream(like.numel(), resolve_seed(seed, seed_tensor), offset, like.device).view(like.shape).to(cdt)


def _kl(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    return -0.5 * (1.0 + logvar - mu * mu - torch.exp(logvar))


def _reduce(kl: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "none":
        return kl
    return kl.sum() * reduction_scale(reduction, kl.shape)


def reparameterize(mu, logvar, noise, seed, seed_tensor, offset):
    cdt = compute_dtype(mu.dtype)
    z = mu.to(cdt) + torch.exp(0.5 * logvar.to(cdt)) * _eps(mu, noise, seed, seed_tensor, offset)
    return z.to(mu.dtype)


def reparameterize_backward(grad_z, logvar, noise, seed, seed_tensor, offset):
    cdt = compute_dtype(logvar.dtype)
    eps = _eps(logvar, noise, seed, seed_tensor, offset)
    return (0.5 * grad_z.to(cdt) * torch.exp(0.5 * logvar.to(cdt)) * eps).to(logvar.dtype)


def gaussian_kl(mu, logvar, reduction):
    cdt = compute_dtype(mu.dtype)
    kl = _reduce(_kl(mu.to(cdt), logvar.to(cdt)), reduction)
    return kl.to(mu.dtype) if reduction == "none" else kl


def _kl_grads(grad_kl, mu, logvar, reduction):
    cdt = compute_dtype(mu.dtype)
    g = grad_kl.to(cdt) * reduction_scale(reduction, mu.shape)
    mu, logvar = mu.to(cdt), logvar.to(cdt)
    return g * mu, 0.5 * g * (torch.exp(logvar) - 1.0)


def gaussian_kl_backward(grad_kl, mu, logvar, reduction):
    grad_mu, grad_logvar = _kl_grads(grad_kl, mu, logvar, reduction)
    return grad_mu.to(mu.dtype), grad_logvar.to(logvar.dtype)


def reparameterize_with_kl(mu, logvar, seed, seed_tensor, offset, reduction):
    return reparameterize(mu, logvar, None, seed, seed_tensor, offset), gaussian_kl(mu, logvar, reduction)


def reparameterize_with_kl_backward(grad_z, grad_kl, mu, logvar, seed, seed_tensor, offset, reduction):
    cdt = compute_dtype(mu.dtype)
    grad_mu, grad_logvar = _kl_grads(grad_kl, mu, logvar, reduction)
    eps = _eps(mu, None, seed, seed_tensor, offset)
    grad_mu = grad_mu + grad_z.to(cdt)
    grad_logvar = grad_logvar + 0.5 * grad_z.to(cdt) * torch.exp(0.5 * logvar.to(cdt)) * eps
    return grad_mu.to(mu.dtype), grad_logvar.to(logvar.dtype)
