"""Normalization + activation blocks in plain PyTorch: the fallback and the
oracle of ``tests/test_conv.py``.

GroupNorm with the diffusers ResnetBlock2D extras, in the order a block runs
them, for x of shape (N, C, *S) and G groups of C / G channels:

    h   = x + add[:, :, None, ...]                     (time-embedding add)
    y   = (h - mean_g) * rstd_g * weight + bias        (statistics per (n, group), fp32)
    y   = y * (1 + scale) + shift                      (scale_shift = [scale | shift], FiLM)
    out = act(y) + residual

Arithmetic in fp32 (fp64 for fp64 inputs); ``out`` in x's dtype and memory
format; mean and rstd (N, G) in the compute dtype, saved for the backward.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

ACTIVATIONS = ("silu", "gelu", "relu", "leaky_relu", "none")


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def activate(y: torch.Tensor, activation: str, negative_slope: float) -> torch.Tensor:
    if activation == "silu":
        return F.silu(y)
    if activation == "gelu":
        return F.gelu(y)
    if activation == "relu":
        return F.relu(y)
    if activation == "leaky_relu":
        return F.leaky_relu(y, negative_slope)
    return y


def activate_grad(y: torch.Tensor, activation: str, negative_slope: float) -> torch.Tensor:
    """d act(y) / dy, elementwise."""
    if activation == "silu":
        s = torch.sigmoid(y)
        return s * (1 + y * (1 - s))
    if activation == "gelu":
        return 0.5 * (1 + torch.erf(y * math.sqrt(0.5))) + y * torch.exp(-0.5 * y * y) / math.sqrt(2 * math.pi)
    if activation == "relu":
        return (y > 0).to(y.dtype)
    if activation == "leaky_relu":
        return torch.where(y > 0, 1.0, negative_slope).to(y.dtype)
    return torch.ones_like(y)


def _per_channel(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(C,) or (N, C) -> broadcastable against x (N, C, *S)."""
    return t.view(*t.shape, *([1] * (x.dim() - 2)))


def _h(x, add):
    """x + add in the compute dtype, x's shape."""
    h = x.to(compute_dtype(x.dtype))
    return h if add is None else h + _per_channel(add.to(h.dtype), x)


def _group_view(t: torch.Tensor, num_groups: int) -> torch.Tensor:
    return t.reshape(t.shape[0], num_groups, math.prod(t.shape[1:]) // num_groups)


def _xhat(x, num_groups, add, mean, rstd):
    hg = _group_view(_h(x, add), num_groups)
    return ((hg - mean[..., None]) * rstd[..., None]).reshape(x.shape)


def _film(x, scale_shift, cdt):
    """(1 + scale, shift) broadcastable against x, or (None, None)."""
    if scale_shift is None:
        return None, None
    scale, shift = scale_shift.to(cdt).chunk(2, dim=1)
    return _per_channel(1 + scale, x), _per_channel(shift, x)


def _pre_activation(xhat, x, weight, bias, scale_shift):
    """(y0, y): xhat * weight + bias, and y0 after the FiLM."""
    cdt = xhat.dtype
    y0 = xhat
    if weight is not None:
        y0 = y0 * _per_channel(weight.to(cdt), x)
    if bias is not None:
        y0 = y0 + _per_channel(bias.to(cdt), x)
    scale1, shift = _film(x, scale_shift, cdt)
    y = y0 if scale1 is None else y0 * scale1 + shift
    return y0, y


def _like_x(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """t in x's dtype and strides (what the fake implementation promises)."""
    return torch.empty_like(x).copy_(t)


def group_norm_act(x, num_groups, weight, bias, eps, activation, negative_slope, add, scale_shift, residual):
    """Returns (out, mean, rstd): out like x, mean and rstd (N, G) in the compute dtype."""
    cdt = compute_dtype(x.dtype)
    var, mean = torch.var_mean(_group_view(_h(x, add), num_groups), dim=2, unbiased=False)
    rstd = torch.rsqrt(var + eps)
    xhat = _xhat(x, num_groups, add, mean, rstd)
    _, y = _pre_activation(xhat, x, weight, bias, scale_shift)
    out = activate(y, activation, negative_slope)
    if residual is not None:
        out = out + residual.to(cdt)
    return _like_x(out, x), mean, rstd


def group_norm_act_out(x, num_groups, weight, bias, eps, activation, negative_slope, add, scale_shift, residual,
                       out):
    """group_norm_act written into out; returns (mean, rstd)."""
    y, mean, rstd = group_norm_act(x, num_groups, weight, bias, eps, activation, negative_slope, add, scale_shift,
                                   residual)
    out.copy_(y)
    return mean, rstd


def group_norm_act_backward(grad_out, x, num_groups, weight, bias, mean, rstd, activation, negative_slope, add,
                            scale_shift, out=None):
    """Gradients of group_norm_act's out (the residual's is grad_out itself).

    Returns (grad_x like x, grad_weight (C,), grad_bias (C,), grad_add (N, C),
    grad_scale_shift (N, 2C)), the last four in the compute dtype and computed
    whether or not the argument was given (weight and bias as ones and zeros).
    out (the forward's output, where it is act(y) itself) lets a kernel skip the
    activation's derivative; the reference evaluates it and ignores out.
    """
    cdt = compute_dtype(x.dtype)
    n, c = x.shape[:2]
    dims = tuple(range(2, x.dim()))

    def spatial_sum(t):  # sum over () would sum everything
        return t.sum(dims) if dims else t

    xhat = _xhat(x, num_groups, add, mean, rstd)
    y0, y = _pre_activation(xhat, x, weight, bias, scale_shift)
    dy = grad_out.to(cdt) * activate_grad(y, activation, negative_slope)
    scale1, _ = _film(x, scale_shift, cdt)
    dy0 = dy if scale1 is None else dy * scale1
    grad_weight = (dy0 * xhat).sum((0, *dims))
    grad_bias = dy0.sum((0, *dims))
    if scale_shift is None:
        grad_scale_shift = torch.zeros(n, 2 * c, dtype=cdt, device=x.device)
    else:
        grad_scale_shift = torch.cat([spatial_sum(dy * y0), spatial_sum(dy)], dim=1)
    dxhat = dy0 if weight is None else dy0 * _per_channel(weight.to(cdt), x)
    # d/dh of the normalization: dxhat minus its projections on 1 and on xhat, per group.
    dg, xg = _group_view(dxhat, num_groups), _group_view(xhat, num_groups)
    m1 = dg.mean(2, keepdim=True)
    m2 = (dg * xg).mean(2, keepdim=True)
    dh = ((dg - m1 - xg * m2) * rstd[..., None]).reshape(x.shape)
    grad_add = spatial_sum(dh)
    return _like_x(dh, x), grad_weight, grad_bias, grad_add, grad_scale_shift


def channel_affine_act(x, scale, shift, residual, activation, negative_slope):
    """``act((x + residual) * scale[c] + shift[c])``: batch_norm_act in eval mode (scale and
    shift folded from the running statistics) and the conv2d_act epilogue; scale and
    shift (C,) in the compute dtype."""
    h = x.to(compute_dtype(x.dtype))
    if residual is not None:
        h = h + residual.to(h.dtype)
    y = h * _per_channel(scale, x) + _per_channel(shift, x)
    return _like_x(activate(y, activation, negative_slope), x)


def _channel_dims(x: torch.Tensor) -> tuple:
    """The dims batch statistics reduce over: all but the channel dim 1."""
    return (0, *range(2, x.dim()))


def _bn_xhat(x, mean, rstd):
    return (x.to(mean.dtype) - _per_channel(mean, x)) * _per_channel(rstd, x)


def batch_norm_act_train(x, weight, bias, eps, activation, negative_slope):
    """Batch norm with batch statistics + activation: statistics per channel over
    (N, *S). Returns (out like x, mean, rstd, var), the last three (C,) in the
    compute dtype, var biased; rstd = 1 / sqrt(var + eps)."""
    var, mean = torch.var_mean(x.to(compute_dtype(x.dtype)), dim=_channel_dims(x), unbiased=False)
    rstd = torch.rsqrt(var + eps)
    _, y = _pre_activation(_bn_xhat(x, mean, rstd), x, weight, bias, None)
    return _like_x(activate(y, activation, negative_slope), x), mean, rstd, var


def batch_norm_act_backward(grad_out, x, weight, bias, mean, rstd, activation, negative_slope):
    """Gradients of batch_norm_act_train's out: (grad_x like x, grad_weight (C,),
    grad_bias (C,)), the last two in the compute dtype whether or not weight and
    bias were given."""
    dims = _channel_dims(x)
    xhat = _bn_xhat(x, mean, rstd)
    _, y = _pre_activation(xhat, x, weight, bias, None)
    dy = grad_out.to(xhat.dtype) * activate_grad(y, activation, negative_slope)
    grad_weight, grad_bias = (dy * xhat).sum(dims), dy.sum(dims)
    dxhat = dy if weight is None else dy * _per_channel(weight.to(xhat.dtype), x)
    # d/dx of the normalization: dxhat minus its projections on 1 and on xhat, per channel.
    dx = (dxhat - dxhat.mean(dims, keepdim=True) - xhat * (dxhat * xhat).mean(dims, keepdim=True)) \
        * _per_channel(rstd, x)
    return _like_x(dx, x), grad_weight, grad_bias
