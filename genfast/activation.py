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
    "gated_act_backward(Tensor grad_out, Tensor x, Tensor? bias, str activation) -> Tensor",
    "activation",
    lambda grad_out, x, bias, activation: torch.empty_like(x),
)


def _gated_act_setup(ctx, inputs, output):
    x, bias, ctx.activation = inputs
    ctx.save_for_backward(x, bias)


def _gated_act_backward(ctx, grad_out):
    x, bias = ctx.saved_tensors
    grad_x = gated_act_backward_op(grad_out.contiguous(), x, bias, ctx.activation)
    grad_bias = None
    if bias is not None and ctx.needs_input_grad[1]:
        # the bias is added to every row: its gradient is grad_x summed over them, accumulated in fp32
        grad_bias = grad_x.reshape(-1, x.shape[-1]).sum(0, dtype=torch.float32).to(bias.dtype)
    return (grad_x if ctx.needs_input_grad[0] else None), grad_bias, None


gated_act_op = _ops.define(
    "gated_act(Tensor x, Tensor? bias, str activation) -> Tensor",
    "activation",
    lambda x, bias, activation: _out_like(x),
    backward=_gated_act_backward,
    setup_context=_gated_act_setup,
)


# ---- public functions -------------------------------------------------------

def gated_act(x: torch.Tensor, activation: str = "gelu", *, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``h * act(gate)`` with ``h, gate = (x + bias).chunk(2, dim=-1)``, in one pass.

    The GEGLU / SwiGLU feed-forward's gate: ``genfast.gated_act(proj(x))`` is
    diffusers' ``GEGLU.forward`` (``activation="gelu"``) and a SwiGLU FF's
    ``h * F.silu(gate)`` (``activation="silu"``). With the projection's bias
    given here, ``gated_act(F.linear(x, proj.weight), bias=proj.bias)``, the
    Linear runs as a plain matmul: PyTorch's CPU ``addmm`` first copies the
    bias into every row of its output, a whole extra pass.

    Parameters
    ----------
    x : Tensor, shape (..., 2F), rank >= 1, fp32/fp16/bf16 (fp64 runs on the reference)
        The projection's output: the first F features are h, the last F the gate.
        A non-contiguous x is copied to a contiguous one first (the kernels read
        rows of 2F contiguous elements; a Linear's output already is one).
    activation : "gelu" | "gelu_tanh" | "silu", default "gelu"
        "gelu" is the exact (erf) GELU of ``F.gelu(gate)``, "gelu_tanh" is
        ``F.gelu(gate, approximate="tanh")``, "silu" is ``F.silu(gate)``.
    bias : Tensor (2F,), optional
        Added to every row of x first (in fp32); x's dtype and device.
        Differentiable.

    Returns
    -------
    out : Tensor, shape (..., F), x's dtype and device, contiguous. Computed in
        fp32 (fp64 for fp64 x) and rounded once. Differentiable in x and bias.
    """
    fn = "gated_act"
    _ops.check_tensor(fn, "x", x)
    if x.dim() == 0:
        raise ValueError(f"{fn}: x must have at least one dimension (..., 2F), got a 0-d tensor")
    if x.shape[-1] % 2:
        raise ValueError(f"{fn}: x's last dimension must be even (h and gate halves), got {x.shape[-1]}")
    _ops.check_choice(fn, "activation", activation, ACTIVATIONS)
    if bias is not None:
        _ops.check_tensor(fn, "bias", bias)
        if bias.shape != x.shape[-1:]:
            raise ValueError(f"{fn}: bias must have shape ({x.shape[-1]},) (x's last dimension), got "
                             f"{tuple(bias.shape)}")
        if bias.device != x.device:
            raise ValueError(f"{fn}: bias must be on x's device ({x.device}), got {bias.device}")
        if bias.dtype != x.dtype:
            raise TypeError(f"{fn}: bias must have x's dtype ({x.dtype}), got {bias.dtype}")
        bias = bias.contiguous()
    return gated_act_op(x.contiguous(), bias, activation)
