"""VAE family: reparameterized sampling and the Gaussian KL term.

Baselines are written the way diffusers' ``DiagonalGaussianDistribution``
writes them (``sample()`` and ``kl()``), run eagerly and through
``torch.compile`` of the same function.

Bytes each op must move, for N elements of s bytes (the KL sum is one scalar):

=============================  ==================================================  =====
case                           traffic                                             bytes
=============================  ==================================================  =====
reparameterize fwd             read mu, logvar; write z                            3·N·s
reparameterize fwd+bwd         fwd; then read grad_z, logvar, write grad_logvar    6·N·s
                               (grad_mu is grad_z itself; eps is recomputed)
reparameterize_with_kl fwd     read mu, logvar; write z                            3·N·s
gaussian_kl fwd (sum)          read mu, logvar                                     2·N·s
=============================  ==================================================  =====

Eager PyTorch moves several times more: ``torch.exp``, ``randn_like``, ``*``
and ``+`` each read and write a full tensor.
"""
from __future__ import annotations

import torch

import genfast
from harness import Case

FAMILY = "vae"
# A 1024-px SD3/Flux latent is 16 x 128 x 128; the sizes are batches of it.
LATENT = (16, 128, 128)
SIZES = {"4M": 4 << 20, "16M": 16 << 20, "64M": 64 << 20}


def diffusers_sample(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """``DiagonalGaussianDistribution.sample()``: the eager baseline."""
    std = torch.exp(0.5 * logvar)
    return mean + std * torch.randn_like(std)


def diffusers_kl(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """``DiagonalGaussianDistribution.kl()`` summed over every element (reduction="sum")."""
    var = torch.exp(logvar)
    return 0.5 * torch.sum(torch.pow(mean, 2) + var - 1.0 - logvar)


def diffusers_sample_kl(mean: torch.Tensor, logvar: torch.Tensor):
    return diffusers_sample(mean, logvar), diffusers_kl(mean, logvar)


def _compile(fn):
    # Static shapes: the best case for torch.compile, each case compiled for its own shape.
    return torch.compile(fn, dynamic=False)


def _inputs(numel: int, dtype: torch.dtype, device: torch.device, requires_grad: bool = False):
    shape = (numel // (LATENT[0] * LATENT[1] * LATENT[2]), *LATENT)
    mu = torch.randn(shape, dtype=dtype, device=device, requires_grad=requires_grad)
    # log-variances of a trained encoder sit around -2..0, not at 0
    logvar = (torch.randn(shape, device=device) - 1.0).to(dtype).requires_grad_(requires_grad)
    return mu, logvar


def _forward(genfast_fn, baseline):
    def build(numel, dtype, device):
        mu, logvar = _inputs(numel, dtype, device)
        compiled = _compile(baseline)
        return {"genfast": lambda: genfast_fn(mu, logvar),
                "eager": lambda: baseline(mu, logvar),
                "torch.compile": lambda: compiled(mu, logvar)}
    return build


def _forward_backward(genfast_fn, baseline):
    """Forward, then the gradients of mu and logvar for a random grad_z (not z.sum(),
    whose expanded ones would be a different, cheaper read)."""
    def build(numel, dtype, device):
        mu, logvar = _inputs(numel, dtype, device, requires_grad=True)
        grad_z = torch.randn_like(mu)
        compiled = _compile(baseline)

        def run(forward):
            return lambda: torch.autograd.grad(forward(mu, logvar), (mu, logvar), grad_z)

        return {"genfast": run(genfast_fn), "eager": run(baseline), "torch.compile": run(compiled)}
    return build


# (op, mode, elements moved per input element, elements touched per input element, builder)
OPS = [
    ("reparameterize", "fwd", 3, 3, _forward(genfast.reparameterize, diffusers_sample)),
    ("reparameterize", "fwd+bwd", 6, 5, _forward_backward(genfast.reparameterize, diffusers_sample)),
    ("reparameterize_with_kl", "fwd", 3, 3, _forward(genfast.reparameterize_with_kl, diffusers_sample_kl)),
    ("gaussian_kl", "fwd", 2, 2, _forward(genfast.gaussian_kl, diffusers_kl)),
]


def cases(quick: bool, device) -> list[Case]:
    """quick: 4M fp32 (on a GPU 64M instead, since 4M elements take microseconds there and
    only the large size shows the bandwidth); full: 4M, 16M, 64M in fp32, bf16, fp16."""
    device = torch.device(device)
    if quick:
        sizes = ["64M"] if device.type == "cuda" else ["4M"]
        dtypes = [torch.float32]
    else:
        sizes, dtypes = list(SIZES), [torch.float32, torch.bfloat16, torch.float16]
    out = []
    for op, mode, moved, touched, build in OPS:
        for dtype in dtypes:
            for size in sizes:
                numel, itemsize = SIZES[size], dtype.itemsize
                out.append(Case(
                    family=FAMILY, op=op, mode=mode, size=size, dtype=dtype, device=device,
                    nbytes=moved * numel * itemsize, footprint=touched * numel * itemsize,
                    impls=("genfast", "eager", "torch.compile"),
                    build=lambda build=build, numel=numel, dtype=dtype: build(numel, dtype, device),
                ))
    return out
