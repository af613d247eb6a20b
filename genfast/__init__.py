"""genfast: fused kernels for fast sampling from generative models.

Every op has a Triton kernel (GPU), a C++ kernel (CPU) and a PyTorch reference
behind one function; see README.md for the API table.
"""
from . import diffusion, nn, schedulers
from .backends import backends, use_backend
from .conv import batch_norm_act, conv2d_act, group_norm_act, instance_norm_act
from .rng import rand, randn
from .vae import gaussian_kl, reparameterize, reparameterize_with_kl

__version__ = "0.1.0"
__all__ = ["backends", "use_backend", "randn", "rand", "reparameterize", "gaussian_kl",
           "reparameterize_with_kl", "nn",
           "diffusion", "schedulers",
           "group_norm_act", "batch_norm_act", "instance_norm_act", "conv2d_act"]
