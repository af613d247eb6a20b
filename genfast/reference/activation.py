"""Gated activations in plain PyTorch: the fallback and the oracle of
``tests/test_activation.py``.

For x of shape (..., 2F) and an optional bias (2F,), ``h, gate = (x + bias).chunk(2, dim=-1)`` and

    out    = h * act(gate)                                   (..., F)
    grad_x = [grad_out * act(gate) | grad_out * h * act'(gate)]   (..., 2F)

as diffusers' GEGLU (``act`` = exact GELU) and SwiGLU feed-forwards
(``act`` = SiLU) compute it after their projection. Arithmetic in fp32 (fp64
for fp64 inputs); results in x's dtype.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

ACTIVATIONS = ("gelu", "gelu_tanh", "silu")
_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_TANH_CUBIC = 0.044715


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def activate(g: torch.Tensor, activation: str) -> torch.Tensor:
    if activation == "gelu":
        return F.gelu(g)
    if activation == "gelu_tanh":
        return F.gelu(g, approximate="tanh")
    return F.silu(g)


def activate_grad(g: torch.Tensor, activation: str) -> torch.Tensor:
    """d act(g) / dg, elementwise."""
    if activation == "gelu":
        return 0.5 * (1 + torch.erf(g * math.sqrt(0.5))) + g * torch.exp(-0.5 * g * g) / math.sqrt(2 * math.pi)
    if activation == "gelu_tanh":
        t = torch.tanh(_SQRT_2_OVER_PI * (g + _TANH_CUBIC * g * g * g))
        return 0.5 * (1 + t) + 0.5 * g * (1 - t * t) * _SQRT_2_OVER_PI * (1 + 3 * _TANH_CUBIC * g * g)
    s = torch.sigmoid(g)
    return s * (1 + g * (1 - s))


def _halves(x: torch.Tensor, bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(h, gate) of x + bias in the compute dtype; slicing, not chunk, so that F = 0 gives two empty halves."""
    f = x.shape[-1] // 2
    x = x.to(compute_dtype(x.dtype))
    if bias is not None:
        x = x + bias.to(x.dtype)
    return x[..., :f], x[..., f:]


def gated_act(x: torch.Tensor, bias: torch.Tensor | None, activation: str) -> torch.Tensor:
    h, g = _halves(x, bias)
    return (h * activate(g, activation)).to(x.dtype)


def gated_act_backward(grad_out: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None,
                       activation: str) -> torch.Tensor:
    h, g = _halves(x, bias)
    go = grad_out.to(h.dtype)
    return torch.cat([go * activate(g, activation), go * h * activate_grad(g, activation)], dim=-1).to(x.dtype)
