"""VAE sampling: the reparameterization trick and the Gaussian KL term, fused.

``z = mu + exp(logvar / 2) * eps`` with eps drawn inside the kernel from
genfast's noise stream (``genfast.rng``), and
``KL(N(mu, exp(logvar)) || N(0, 1)) = -1/2 * (1 + logvar - mu^2 - exp(logvar))``.
The backward passes recompute eps from (seed, offset) instead of storing it.
"""
from __future__ import annotations

import torch

from . import _ops
from .reference.vae import compute_dtype
from .rng import check_offset, normalize_seed

REDUCTIONS = ("none", "sum", "mean", "batchmean")


def _kl_like(mu, reduction):
    if reduction == "none":
        return torch.empty_like(mu)
    return mu.new_empty((), dtype=compute_dtype(mu.dtype))


# ---- registered ops ---------------------------------------------------------

reparameterize_backward_op = _ops.define(
    "reparameterize_backward(Tensor grad_z, Tensor logvar, Tensor? noise, int seed, Tensor? seed_tensor, "
    "int offset) -> Tensor",
    "vae",
    lambda grad_z, logvar, *_: torch.empty_like(logvar),
)


def _reparameterize_setup(ctx, inputs, output):
    _, logvar, noise, seed, seed_tensor, offset = inputs
    ctx.save_for_backward(logvar, noise, seed_tensor)
    ctx.seed, ctx.offset = seed, offset


def _reparameterize_backward(ctx, grad_z):
    logvar, noise, seed_tensor = ctx.saved_tensors
    grad_logvar = None
    if ctx.needs_input_grad[1]:
        grad_logvar = reparameterize_backward_op(grad_z.contiguous(), logvar, noise, ctx.seed, seed_tensor, ctx.offset)
    return grad_z if ctx.needs_input_grad[0] else None, grad_logvar, None, None, None, None


reparameterize_op = _ops.define(
    "reparameterize(Tensor mu, Tensor logvar, Tensor? noise, int seed, Tensor? seed_tensor, int offset) -> Tensor",
    "vae",
    lambda mu, *_: torch.empty_like(mu),
    backward=_reparameterize_backward,
    setup_context=_reparameterize_setup,
)

gaussian_kl_backward_op = _ops.define(
    "gaussian_kl_backward(Tensor grad_kl, Tensor mu, Tensor logvar, str reduction) -> (Tensor, Tensor)",
    "vae",
    lambda grad_kl, mu, logvar, reduction: (torch.empty_like(mu), torch.empty_like(logvar)),
)


def _gaussian_kl_setup(ctx, inputs, output):
    mu, logvar, ctx.reduction = inputs
    ctx.save_for_backward(mu, logvar)


def _gaussian_kl_backward(ctx, grad_kl):
    mu, logvar = ctx.saved_tensors
    grad_mu, grad_logvar = gaussian_kl_backward_op(grad_kl.contiguous(), mu, logvar, ctx.reduction)
    return grad_mu, grad_logvar, None


gaussian_kl_op = _ops.define(
    "gaussian_kl(Tensor mu, Tensor logvar, str reduction) -> Tensor",
    "vae",
    lambda mu, logvar, reduction: _kl_like(mu, reduction),
    backward=_gaussian_kl_backward,
    setup_context=_gaussian_kl_setup,
)

reparameterize_with_kl_backward_op = _ops.define(
    "reparameterize_with_kl_backward(Tensor grad_z, Tensor grad_kl, Tensor mu, Tensor logvar, int seed, "
    "Tensor? seed_tensor, int offset, str reduction) -> (Tensor, Tensor)",
    "vae",
    lambda grad_z, grad_kl, mu, logvar, *_: (torch.empty_like(mu), torch.empty_like(logvar)),
)


def _reparameterize_with_kl_setup(ctx, inputs, output):
    mu, logvar, seed, seed_tensor, offset, reduction = inputs
    ctx.save_for_backward(mu, logvar, seed_tensor)
    ctx.seed, ctx.offset, ctx.reduction = seed, offset, reduction


def _reparameterize_with_kl_backward(ctx, grad_z, grad_kl):
    mu, logvar, seed_tensor = ctx.saved_tensors
    if grad_z is None:
        grad_z = torch.zeros_like(mu)
    if grad_kl is None:
        grad_kl = torch.zeros_like(_kl_like(mu, ctx.reduction))
    grad_mu, grad_logvar = reparameterize_with_kl_backward_op(
        grad_z.contiguous(), grad_kl.contiguous(), mu, logvar, ctx.seed, seed_tensor, ctx.offset, ctx.reduction)
    return grad_mu, grad_logvar, None, None, None, None


reparameterize_with_kl_op = _ops.define(
    "reparameterize_with_kl(Tensor mu, Tensor logvar, int seed, Tensor? seed_tensor, int offset, str reduction) "
    "-> (Tensor, Tensor)",
    "vae",
    lambda mu, logvar, seed, seed_tensor, offset, reduction: (torch.empty_like(mu), _kl_like(mu, reduction)),
    backward=_reparameterize_with_kl_backward,
    setup_context=_reparameterize_with_kl_setup,
)


# ---- public functions -------------------------------------------------------

def _check_pair(fn: str, mu, logvar):
    _ops.check_tensor(fn, "mu", mu)
    _ops.check_tensor(fn, "logvar", logvar)
    _ops.check_like(fn, "logvar", logvar, "mu", mu)


def _check_reduction(fn: str, reduction: str, mu: torch.Tensor) -> None:
    _ops.check_choice(fn, "reduction", reduction, REDUCTIONS)
    if reduction == "batchmean" and mu.dim() == 0:
        raise ValueError(f"{fn}: reduction='batchmean' needs mu with a batch dimension, got a 0-d tensor")


def reparameterize(mu: torch.Tensor, logvar: torch.Tensor, *, seed=None, offset: int = 0,
                   noise: torch.Tensor | None = None) -> torch.Tensor:
    """Sample ``z = mu + exp(logvar / 2) * eps`` in one pass.

    Parameters
    ----------
    mu, logvar : Tensor, any shape (the same), fp32/fp16/bf16 (fp64 runs on the reference)
        Mean and log-variance of the posterior; may be non-contiguous.
    seed : int, 0-d int64 tensor or None
        Noise key (``genfast.rng``); ignored when ``noise`` is given.
    offset : int
        Counter of the first element: element i (row-major) uses ``randn(seed, offset + i)``.
    noise : Tensor, optional
        Use this eps (shape of mu, any float dtype) instead of drawing it.

    Returns
    -------
    z : Tensor, shape and dtype of mu. Differentiable in mu and logvar (noise is a constant).
    """
    fn = "reparameterize"
    _check_pair(fn, mu, logvar)
    if noise is not None:
        _ops.check_tensor(fn, "noise", noise)
        _ops.check_like(fn, "noise", noise, "mu", mu, dtype=False)
        seed, seed_tensor = 0, None
        noise = noise.contiguous()
    else:
        seed, seed_tensor = normalize_seed(fn, seed, mu.device)
    offset = check_offset(fn, offset, mu.numel())
    return reparameterize_op(mu.contiguous(), logvar.contiguous(), noise, seed, seed_tensor, offset)


def gaussian_kl(mu: torch.Tensor, logvar: torch.Tensor, reduction: str = "sum") -> torch.Tensor:
    """KL(N(mu, exp(logvar)) || N(0, 1)), fused.

    Parameters
    ----------
    mu, logvar : Tensor, any shape (the same), fp32/fp16/bf16 (fp64 runs on the reference)
    reduction : "none" | "sum" | "mean" | "batchmean"
        "none": elementwise KL in mu's dtype; otherwise a 0-d fp32 tensor (fp64 for
        fp64 inputs) with the sum, the sum / numel, or the sum / mu.shape[0].

    Returns
    -------
    kl : Tensor. Differentiable in mu and logvar.
    """
    fn = "gaussian_kl"
    _check_pair(fn, mu, logvar)
    _check_reduction(fn, reduction, mu)
    return gaussian_kl_op(mu.contiguous(), logvar.contiguous(), reduction)


def reparameterize_with_kl(mu: torch.Tensor, logvar: torch.Tensor, *, seed=None, offset: int = 0,
                           reduction: str = "sum") -> tuple[torch.Tensor, torch.Tensor]:
    """``(reparameterize(mu, logvar, seed=seed, offset=offset), gaussian_kl(mu, logvar, reduction))``
    in one pass over mu and logvar (forward and backward)."""
    fn = "reparameterize_with_kl"
    _check_pair(fn, mu, logvar)
    _check_reduction(fn, reduction, mu)
    seed, seed_tensor = normalize_seed(fn, seed, mu.device)
    offset = check_offset(fn, offset, mu.numel())
    return reparameterize_with_kl_op(mu.contiguous(), logvar.contiguous(), seed, seed_tensor, offset, reduction)
