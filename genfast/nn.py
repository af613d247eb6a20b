"""``torch.nn`` modules over genfast's fused ops, for drop-in use in a model."""
from __future__ import annotations

import torch

from . import vae


class Reparameterize(torch.nn.Module):
    """``z = mu + exp(logvar / 2) * eps`` in a VAE's forward.

    In training mode (or with ``sample_in_eval=True``) it samples with genfast's
    noise stream: each call draws a fresh seed from torch's default generator
    unless ``seed`` is given; in eval mode it returns ``mu``. With
    ``return_kl`` it also returns ``gaussian_kl(mu, logvar, reduction)``
    computed in the same pass.
    """

    def __init__(self, *, return_kl: bool = False, reduction: str = "sum", sample_in_eval: bool = False):
        super().__init__()
        if reduction not in vae.REDUCTIONS:
            raise ValueError(f"Reparameterize: reduction must be one of {vae.REDUCTIONS}, got {reduction!r}")
        self.return_kl, self.reduction, self.sample_in_eval = return_kl, reduction, sample_in_eval

    def forward(self, mu: torch.Tensor, logvar: torch.Tensor, seed=None, offset: int = 0):
        if not (self.training or self.sample_in_eval):
            return (mu, vae.gaussian_kl(mu, logvar, self.reduction)) if self.return_kl else mu
        if self.return_kl:
            return vae.reparameterize_with_kl(mu, logvar, seed=seed, offset=offset, reduction=self.reduction)
        return vae.reparameterize(mu, logvar, seed=seed, offset=offset)

    def extra_repr(self) -> str:
        return f"return_kl={self.return_kl}, reduction={self.reduction!r}, sample_in_eval={self.sample_in_eval}"
