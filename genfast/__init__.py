"""genfast: fused kernels for fast sampling from generative models.

Every op has a Triton kernel (GPU), a C++ kernel (CPU) and a PyTorch reference
behind one function; see README.md for the API table.
"""
from . import diffusion, nn, schedulers
from .activation import gated_act
from .attention import KVCache, attention, attention_with_kvcache
from .backends import backends, use_backend
from .conv import batch_norm_act, conv2d_act, group_norm_act, instance_norm_act
from .patch import PatchReport, patch, unpatch
from .rng import rand, randn
from .sampling import (LogitsSampler, min_p_sampling_from_probs, sample_tokens, sampling_from_logits,
                       sampling_from_probs, top_k_mask_logits, top_k_renorm_probs, top_k_sampling_from_probs,
                       top_k_top_p_sampling_from_logits, top_k_top_p_sampling_from_probs, top_p_renorm_probs,
                       top_p_sampling_from_probs)
from .vae import gaussian_kl, reparameterize, reparameterize_with_kl

__version__ = "0.1.0"
__all__ = ["backends", "use_backend", "randn", "rand", "reparameterize", "gaussian_kl",
           "reparameterize_with_kl", "nn",
           "sample_tokens", "LogitsSampler", "sampling_from_logits", "sampling_from_probs",
           "top_p_sampling_from_probs", "top_k_sampling_from_probs", "min_p_sampling_from_probs",
           "top_k_top_p_sampling_from_logits", "top_k_top_p_sampling_from_probs", "top_k_renorm_probs",
           "top_p_renorm_probs", "top_k_mask_logits", "diffusion", "schedulers",
           "group_norm_act", "batch_norm_act", "instance_norm_act", "conv2d_act", "patch", "unpatch", "PatchReport",
           "gated_act",
           "attention_with_kvcache", "attention", "KVCache"]
