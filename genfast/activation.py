"""Gated activations: ``h * act(gate)`` over the two halves of a projection, fused.

What diffusers' ``GEGLU`` does after its ``proj`` Linear (and SwiGLU-style
feed-forwards after theirs): ``h, gate = x.chunk(2, dim=-1); h * act(gate)``.
Eager PyTorch runs the activation over the strided gate half into a fresh
tensor, then the multiply into another; the fused op reads x once and writes
the output once, and its backward reads grad_out and x once and writes grad_x.
"""
from __future__ import annotations

import torch

from . import _ops
from .reference.activation import ACTIVATIONS


def _out_like(x: torch.Tensor) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], x.shape[-1] // 2))


# ---- registered ops ---------------------------------------------------------

gated_act_backward_op = _ops.define(
    "gated_act_backward(Tensor grad_out, Tensor x, str activation) -> Tensor",
    "activation",
    lambda grad_out, x, activation: torch.empty_like(x),
)


def _gated_act_setup(ctx, inputs, output):
    x, ctx.activation = inputs
    ctx.save_for_backward(x)


def _gated_act_backward(ctx, grad_out):
    (x,) = ctx.saved_tensors
    return gated_act_backward_op(grad_out.contiguous(), x, ctx.activation), None


gated_act_op = _ops.define(
    "gated_act(Tensor x, str activation) -> Tensor",
    "activation",
    lambda x, activation: _out_like(x),
    backward=_gated_act_backward,
    setup_context=_gated_act_setup,
)


# ---- public functions -------------------------------------------------------

def gated_act(x: torch.Tensor, activation: str = "gelu") -> torch.Tensor:
    """``h * act(gate)`` with ``h, gate = x.chunk(2, dim=-1)``, in one pass.

    The GEGLU / SwiGLU feed-forward's gate: ``genfast.gated_act(proj(x))`` is
    diffusers' ``GEGLU.forward`` (``activation="gelu"``) and a SwiGLU FF's
    ``h * F.silu(gate)`` (``activation="silu"``).

    Parameters
    ----------
    x : Tensor, shape (..., 2F), rank >= 1, fp32/fp16/bf16 (fp64 runs on the reference)
        The projection's output: the first F features are h, the last F the gate.
        A non-contiguous x is copied to a contiguous one first (the kernels read
        rows of 2F contiguous elements; a Linear's output already is one).
    activation : "gelu" | "gelu_tanh" | "silu", default "gelu"
        "gelu" is the exact (erf) GELU of ``F.gelu(gate)``, "gelu_tanh" is
        ``F.gelu(gate, approximate="tanh")``, "silu" is ``F.silu(gate)``.

    Returns
    -------
    out : Tensor, shape (..., F), x's dtype and device, contiguous. Computed in
        fp32 (fp64 for fp64 x) and rounded once. Differentiable in x.
    """
    fn = "gated_act"
    _ops.check_tensor(fn, "x", x)
    if x.dim() == 0:
        raise ValueError(f"{fn}: x must have at least one dimension (..., 2F), got a 0-d tensor")
    if x.shape[-1] % 2:
        raise ValueError(f"{fn}: x's last dimension must be even (h and gate halves), got {x.shape[-1]}")
    _ops.check_choice(fn, "activation", activation, ACTIVATIONS)
    return gated_act_op(x.contiguous(), activation)
