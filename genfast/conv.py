"""Normalization + activation blocks of conv nets (UNets, VAE decoders, GAN
generators), fused: one read of x for the statistics, one read and one write
for normalize + affine + FiLM + activation + residual, forward and backward.

Layouts: NCHW-contiguous (any x of shape (N, C, *S)) and channels_last
(4D ``torch.channels_last``, 5D ``torch.channels_last_3d``); the output keeps
the input's memory format. Other strides are made contiguous first.
"""
from __future__ import annotations

import torch

from . import _ops
from .reference.conv import ACTIVATIONS, activate_grad, compute_dtype


def memory_format(x: torch.Tensor) -> torch.memory_format:
    """The layout genfast keeps for x: contiguous, or channels_last(_3d) when x is in it."""
    if x.is_contiguous():
        return torch.contiguous_format
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    if x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d):
        return torch.channels_last_3d
    return torch.contiguous_format


def _stats_like(x: torch.Tensor, num_groups: int) -> torch.Tensor:
    return x.new_empty((x.shape[0], num_groups), dtype=compute_dtype(x.dtype))


def _params_like(x: torch.Tensor, *shape: int) -> torch.Tensor:
    return x.new_empty(shape, dtype=compute_dtype(x.dtype))


# ---- registered ops ---------------------------------------------------------

group_norm_act_backward_op = _ops.define(
    "group_norm_act_backward(Tensor grad_out, Tensor x, int num_groups, Tensor? weight, Tensor? bias, Tensor mean, "
    "Tensor rstd, str activation, float negative_slope, Tensor? add, Tensor? scale_shift, Tensor? out) "
    "-> (Tensor, Tensor, Tensor, Tensor, Tensor)",
    "conv",
    lambda grad_out, x, num_groups, *_: (
        torch.empty_like(x), _params_like(x, x.shape[1]), _params_like(x, x.shape[1]),
        _params_like(x, x.shape[0], x.shape[1]), _params_like(x, x.shape[0], 2 * x.shape[1])),
)


def _group_norm_act_setup(ctx, inputs, output):
    x, num_groups, weight, bias, _, activation, negative_slope, add, scale_shift, _ = inputs
    _, mean, rstd = output
    # The statistics carry no gradient: no zero-filled tensors for them in the backward (a launch each).
    ctx.mark_non_differentiable(mean, rstd)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(x, weight, bias, add, scale_shift, mean, rstd)
    ctx.num_groups, ctx.activation, ctx.negative_slope = num_groups, activation, negative_slope


def _group_norm_act_backward(ctx, grad_out, grad_mean, grad_rstd):
    # mean and rstd are returned for the backward only: their gradients are not propagated.
    x, weight, bias, add, scale_shift, mean, rstd = ctx.saved_tensors
    need = ctx.needs_input_grad
    grads = [None] * 10
    if grad_out is None:  # not materialized: only the statistics were used
        return tuple(grads)
    if any(need[i] for i in (0, 2, 3, 7, 8)):
        g = grad_out.contiguous(memory_format=memory_format(x))
        # No forward output: only the C++ autograd node (conv.cpp) keeps it, for SiLU's derivative. This
        # node runs the Triton and reference kernels, which do not use it, and torch.compile's trace,
        # which would save it, so that an in-place change of a compiled region's output would raise.
        gx, gw, gb, gadd, gss = group_norm_act_backward_op(
            g, x, ctx.num_groups, weight, bias, mean, rstd, ctx.activation, ctx.negative_slope, add, scale_shift,
            None)
        for i, t in ((0, gx), (2, gw), (3, gb), (7, gadd), (8, gss)):
            if need[i]:
                grads[i] = t
    if need[9]:
        grads[9] = grad_out
    return tuple(grads)


group_norm_act_op = _ops.define(
    "group_norm_act(Tensor x, int num_groups, Tensor? weight, Tensor? bias, float eps, str activation, "
    "float negative_slope, Tensor? add, Tensor? scale_shift, Tensor? residual) -> (Tensor, Tensor, Tensor)",
    "conv",
    lambda x, num_groups, *_: (torch.empty_like(x), _stats_like(x, num_groups), _stats_like(x, num_groups)),
    backward=_group_norm_act_backward,
    setup_context=_group_norm_act_setup,
    cpp_autograd=True,  # conv.cpp's GroupNormActFunction: this backward's gradients, a C++ node
)


# The same op writing into a caller's buffer (inference: no autograd). Reusing
# the output skips a fresh tensor's page faults, which on the CPU cost as much
# as the kernel at VAE sizes (see benchmarks/bench_conv.py).
group_norm_act_out_op = _ops.define(
    "group_norm_act_out(Tensor x, int num_groups, Tensor? weight, Tensor? bias, float eps, str activation, "
    "float negative_slope, Tensor? add, Tensor? scale_shift, Tensor? residual, Tensor(a!) out) -> (Tensor, Tensor)",
    "conv",
    lambda x, num_groups, *_: (_stats_like(x, num_groups), _stats_like(x, num_groups)),
)


def _channel_affine_act_setup(ctx, inputs, output):
    x, scale, shift, residual, activation, negative_slope = inputs
    ctx.save_for_backward(x, scale, shift, residual)
    ctx.activation, ctx.negative_slope = activation, negative_slope


def _channel_affine_act_backward(ctx, grad_out):
    # Eval-mode batch norm and conv epilogues are inference paths: a PyTorch-ops backward suffices.
    x, scale, shift, residual = ctx.saved_tensors
    cdt = scale.dtype
    view = (-1,) + (1,) * (x.dim() - 2)
    h = x.to(cdt) if residual is None else x.to(cdt) + residual.to(cdt)
    dy = grad_out.to(cdt) * activate_grad(h * scale.view(view) + shift.view(view), ctx.activation,
                                           ctx.negative_slope)
    dims = (0, *range(2, x.dim()))
    need = ctx.needs_input_grad
    grad_h = (dy * scale.view(view)).to(x.dtype) if need[0] or need[3] else None
    return (grad_h if need[0] else None, (dy * h).sum(dims) if need[1] else None,
            dy.sum(dims) if need[2] else None, grad_h if need[3] else None, None, None)


channel_affine_act_op = _ops.define(
    "channel_affine_act(Tensor x, Tensor scale, Tensor shift, Tensor? residual, str activation, "
    "float negative_slope) -> Tensor",
    "conv",
    lambda x, *_: torch.empty_like(x),
    backward=_channel_affine_act_backward,
    setup_context=_channel_affine_act_setup,
)


def _params_of(x: torch.Tensor) -> torch.Tensor:
    return _params_like(x, x.shape[1])


batch_norm_act_backward_op = _ops.define(
    "batch_norm_act_backward(Tensor grad_out, Tensor x, Tensor? weight, Tensor? bias, Tensor mean, Tensor rstd, "
    "str activation, float negative_slope) -> (Tensor, Tensor, Tensor)",
    "conv",
    lambda grad_out, x, *_: (torch.empty_like(x), _params_of(x), _params_of(x)),
)


def _batch_norm_act_train_setup(ctx, inputs, output):
    x, weight, bias, _, activation, negative_slope = inputs
    _, mean, rstd, var = output
    ctx.mark_non_differentiable(mean, rstd, var)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(x, weight, bias, mean, rstd)
    ctx.activation, ctx.negative_slope = activation, negative_slope


def _batch_norm_act_train_backward(ctx, grad_out, grad_mean, grad_rstd, grad_var):
    # mean, rstd and var are returned for the backward and the running statistics: no gradient flows through them.
    x, weight, bias, mean, rstd = ctx.saved_tensors
    need = ctx.needs_input_grad
    if grad_out is None or not any(need[:3]):  # None: not materialized, only the statistics were used
        return None, None, None, None, None, None
    g = grad_out.contiguous(memory_format=memory_format(x))
    gx, gw, gb = batch_norm_act_backward_op(g, x, weight, bias, mean, rstd, ctx.activation, ctx.negative_slope)
    return gx if need[0] else None, gw if need[1] else None, gb if need[2] else None, None, None, None


batch_norm_act_train_op = _ops.define(
    "batch_norm_act_train(Tensor x, Tensor? weight, Tensor? bias, float eps, str activation, float negative_slope) "
    "-> (Tensor, Tensor, Tensor, Tensor)",
    "conv",
    lambda x, *_: (torch.empty_like(x), _params_of(x), _params_of(x), _params_of(x)),
    backward=_batch_norm_act_train_backward,
    setup_context=_batch_norm_act_train_setup,
)


def _channel_affine_act(x, scale, shift, residual, activation, negative_slope):
    """``act((x + residual) * scale[c] + shift[c])`` in one pass; x, residual in x's layout."""
    fmt = memory_format(x)
    if residual is not None:
        residual = residual.contiguous(memory_format=fmt)
    return channel_affine_act_op(x.contiguous(memory_format=fmt), scale.contiguous(), shift.contiguous(), residual,
                                 activation, negative_slope)


def _running_stats_affine_act(x, running_mean, running_var, weight, bias, eps, activation, negative_slope):
    """Normalization by running statistics (batch norm in eval mode, instance norm without
    input statistics) as one per-channel scale and shift, folded in the compute dtype
    as PyTorch's batch_norm does: scale = weight / sqrt(var + eps), shift = bias - mean * scale."""
    cdt = compute_dtype(x.dtype)
    # Few small launches (each costs a GPU ~5 us of host time): add, rsqrt_, mul_, addcmul.
    scale = (running_var.to(cdt) + eps).rsqrt_()
    if weight is not None:
        scale.mul_(weight.to(cdt))
    mean = running_mean.to(cdt)
    shift = torch.addcmul(bias.to(cdt), mean, scale, value=-1) if bias is not None else (-mean).mul_(scale)
    return _channel_affine_act(x, scale, shift, None, activation, negative_slope)


# ---- public functions -------------------------------------------------------

def _check_activation(fn: str, activation: str, negative_slope) -> float:
    _ops.check_choice(fn, "activation", activation, ACTIVATIONS)
    if not isinstance(negative_slope, (int, float)) or isinstance(negative_slope, bool):
        raise TypeError(f"{fn}: negative_slope must be a float, got {type(negative_slope).__name__}")
    return float(negative_slope)


def _check_eps(fn: str, eps) -> None:
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or eps < 0:
        raise ValueError(f"{fn}: eps must be a float >= 0, got {eps!r}")


def _check_param(fn: str, name: str, t, shape: tuple, x: torch.Tensor, cast: bool = True):
    """A small float tensor of exactly ``shape`` on x's device, returned contiguous and,
    with ``cast``, in the compute dtype (autograd casts its gradient back); None passes.
    (Each step is skipped when it has nothing to do: this runs up to four times a call.)"""
    if t is None:
        return None
    _ops.check_tensor(fn, name, t)
    if t.shape != shape:
        raise ValueError(f"{fn}: {name} must have shape {shape}, got {tuple(t.shape)}")
    if t.device != x.device:
        raise ValueError(f"{fn}: {name} must be on the device of x ({x.device}), got {t.device}")
    if cast and t.dtype != (cdt := compute_dtype(x.dtype)):
        t = t.to(cdt)
    return t if t.is_contiguous() else t.contiguous()


def _check_running_stats(fn: str, x: torch.Tensor, running_mean, running_var) -> None:
    for name, t in (("running_mean", running_mean), ("running_var", running_var)):
        _check_param(fn, name, t, (x.shape[1],), x, cast=False)  # updated in place: checked, not replaced


def _params_cast(x: torch.Tensor) -> bool:
    """Whether group_norm_act's parameters must be cast to the compute dtype first: only
    the C++ kernels (CPU tensors, backend not forced elsewhere) read them as fp32. The
    Triton kernels convert each in registers and the reference casts its own, so a GPU
    call launches no casts (bf16 weight, bias and add were three extra launches)."""
    return x.device.type == "cpu" and _ops.backends.forced() in (None, "cpp")


def _group_norm_act(fn, x, num_groups, weight, bias, eps, activation, negative_slope, add, scale_shift, residual,
                    out=None):
    """Checks, then the op: (out, mean, rstd)."""
    _ops.check_tensor(fn, "x", x)
    if x.dim() < 2:
        raise ValueError(f"{fn}: x must have shape (N, C, *spatial), got {tuple(x.shape)}")
    n, c = x.shape[:2]
    if isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups < 1:
        raise ValueError(f"{fn}: num_groups must be a positive int, got {num_groups!r}")
    if c % num_groups != 0:
        raise ValueError(f"{fn}: num_groups ({num_groups}) must divide the channel count C = {c}")
    _check_eps(fn, eps)
    negative_slope = _check_activation(fn, activation, negative_slope)
    cast = _params_cast(x)
    weight = _check_param(fn, "weight", weight, (c,), x, cast)
    bias = _check_param(fn, "bias", bias, (c,), x, cast)
    add = _check_param(fn, "add", add, (n, c), x, cast)
    scale_shift = _check_param(fn, "scale_shift", scale_shift, (n, 2 * c), x, cast)
    fmt = memory_format(x)
    if residual is not None:
        _ops.check_tensor(fn, "residual", residual)
        _ops.check_like(fn, "residual", residual, "x", x)
        residual = residual.contiguous(memory_format=fmt)
    x = x.contiguous(memory_format=fmt)
    if out is not None:
        _ops.check_tensor(fn, "out", out)
        _ops.check_like(fn, "out", out, "x", x)
        if out.stride() != x.stride():
            raise ValueError(f"{fn}: out must be laid out like x ({fmt}), got strides {out.stride()}")
        if torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                           for t in (x, weight, bias, add, scale_shift, residual, out)):
            raise ValueError(f"{fn}: out= is for inference and does not support autograd; "
                             "call it under torch.no_grad() or without out")
        mean, rstd = group_norm_act_out_op(x, num_groups, weight, bias, float(eps), activation, negative_slope, add,
                                           scale_shift, residual, out)
        return out, mean, rstd
    return group_norm_act_op(x, num_groups, weight, bias, float(eps), activation, negative_slope, add, scale_shift,
                             residual)


def group_norm_act(x: torch.Tensor, num_groups: int, weight: torch.Tensor | None = None,
                   bias: torch.Tensor | None = None, eps: float = 1e-5, *, activation: str = "silu",
                   negative_slope: float = 0.01, add: torch.Tensor | None = None,
                   scale_shift: torch.Tensor | None = None, residual: torch.Tensor | None = None,
                   out: torch.Tensor | None = None) -> torch.Tensor:
    """``act(GroupNorm(x + add) * (1 + scale) + shift) + residual`` in one fused op.

    Equals ``act(nn.GroupNorm(num_groups, C, eps)(x + add[..., None, None]))`` (plus the
    optional FiLM and residual) within twice PyTorch's own rounding error.

    Parameters
    ----------
    x : Tensor (N, C, *S), fp32/fp16/bf16 (fp64 runs on the reference)
        Images (N, C, H, W), video (N, C, T, H, W) or any (N, C, ...); NCHW or
        channels_last (4D) / channels_last_3d (5D): the output keeps the layout.
    num_groups : int
        G, dividing C. Statistics (mean, biased variance) per (n, group) in fp32.
    weight, bias : Tensor (C,), optional
        The per-channel affine of nn.GroupNorm (ones / zeros when absent).
    eps : float
        Added to the variance.
    activation : "silu" | "gelu" | "relu" | "leaky_relu" | "none"
        "gelu" is the exact (erf) GELU of nn.GELU().
    negative_slope : float
        Slope of "leaky_relu" for negative inputs (nn.LeakyReLU's default 0.01).
    add : Tensor (N, C), optional
        Added to x before the statistics (diffusers' ``hidden_states + temb[:, :, None, None]``).
    scale_shift : Tensor (N, 2C), optional
        FiLM after the norm: ``y * (1 + scale) + shift`` with ``scale, shift = scale_shift.chunk(2, 1)``
        (diffusers' ``time_embedding_norm="scale_shift"``).
    residual : Tensor, x's shape and dtype, optional
        Added after the activation.
    out : Tensor, x's shape, dtype and memory format, optional
        Written in place and returned (inference only: raises if autograd would
        need the graph). Reusing one buffer across calls saves a fresh tensor's
        page faults: on the CPU at (1, 512, 256, 256) fp32 they cost about as
        much as the kernel. x itself may be passed (in place).

    Returns
    -------
    out : Tensor, x's shape, dtype and memory format. Differentiable in x, weight,
        bias, add, scale_shift and residual (without ``out``).
    """
    out, _, _ = _group_norm_act("group_norm_act", x, num_groups, weight, bias, eps, activation, negative_slope,
                                add, scale_shift, residual, out)
    return out


def instance_norm_act(x: torch.Tensor, running_mean: torch.Tensor | None = None,
                      running_var: torch.Tensor | None = None, weight: torch.Tensor | None = None,
                      bias: torch.Tensor | None = None, *, use_input_stats: bool = True, momentum: float = 0.1,
                      eps: float = 1e-5, activation: str = "relu", negative_slope: float = 0.2) -> torch.Tensor:
    """``act(F.instance_norm(x, running_mean, running_var, weight, bias, use_input_stats, momentum, eps))``.

    With ``use_input_stats`` (training, or nn.InstanceNorm without running
    statistics) it is group_norm_act with one group per channel: fused, forward
    and backward; ``running_mean`` / ``running_var`` (C,), when given, are
    updated in place as F.instance_norm does (momentum over the batch mean of the
    per-instance mean and unbiased variance). Without input statistics it
    normalizes with the running ones: one fused per-channel scale, shift and
    activation, as batch_norm_act in eval mode.

    Parameters
    ----------
    x : Tensor (N, C, *S), fp32/fp16/bf16, NCHW or channels_last
    running_mean, running_var : Tensor (C,), optional
    weight, bias : Tensor (C,), optional
    use_input_stats : bool
    momentum, eps : float
    activation : "silu" | "gelu" | "relu" | "leaky_relu" | "none"
    negative_slope : float
        Slope of "leaky_relu" (0.2, the GAN convention).

    Returns
    -------
    out : Tensor, x's shape, dtype and memory format.
    """
    fn = "instance_norm_act"
    _ops.check_tensor(fn, "x", x)
    if x.dim() < 3:
        raise ValueError(f"{fn}: x must have shape (N, C, *spatial) with at least one spatial dim, "
                         f"got {tuple(x.shape)}")
    c = x.shape[1]
    _check_running_stats(fn, x, running_mean, running_var)
    if not use_input_stats:
        if running_mean is None or running_var is None:
            raise ValueError(f"{fn}: use_input_stats=False needs running_mean and running_var")
        negative_slope = _check_activation(fn, activation, negative_slope)
        _check_eps(fn, eps)
        weight = _check_param(fn, "weight", weight, (c,), x)
        bias = _check_param(fn, "bias", bias, (c,), x)
        return _running_stats_affine_act(x, running_mean, running_var, weight, bias, eps, activation,
                                         negative_slope)
    out, mean, rstd = _group_norm_act(fn, x, c, weight, bias, eps, activation, negative_slope, None, None, None)
    if running_mean is not None or running_var is not None:
        with torch.no_grad():
            s = x[0, 0].numel() if x.shape[0] else 1
            var = (rstd.double().pow(-2) - eps).clamp_min(0) * (s / max(s - 1, 1))
            if running_mean is not None:  # lerp_: (1 - momentum) * running + momentum * new in one op
                running_mean.lerp_(mean.mean(0).to(running_mean.dtype), momentum)
            if running_var is not None:
                running_var.lerp_(var.mean(0).to(running_var.dtype), momentum)
    return out


def batch_norm_act(x: torch.Tensor, running_mean: torch.Tensor | None, running_var: torch.Tensor | None,
                   weight: torch.Tensor | None = None, bias: torch.Tensor | None = None, *, training: bool = False,
                   momentum: float = 0.1, eps: float = 1e-5, activation: str = "relu",
                   negative_slope: float = 0.2) -> torch.Tensor:
    """``act(F.batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps))``.

    Eval mode (``training=False``) is one fused pass: the running statistics,
    weight and bias folded into a per-channel scale and shift (as PyTorch's
    batch_norm folds them), applied with the activation. Training mode is fused
    too, forward and backward: per-channel batch statistics (mean and biased
    variance, exact two-level moments) in one read of x, then normalize + affine
    + activation in a second; the running statistics, when given, are updated in
    place as F.batch_norm does: ``running = (1 - momentum) * running + momentum
    * batch``, with the unbiased batch variance. NCHW or channels_last is kept.

    Parameters
    ----------
    x : Tensor (N, C, *S), fp32/fp16/bf16 (fp64 runs on the reference)
    running_mean, running_var : Tensor (C,) or None
        Float tensors on x's device (any float dtype: fp32 under autocast).
        Needed when ``training=False``; with ``training=True`` None means no
        running statistics are kept.
    weight, bias : Tensor (C,), optional
    training : bool
        Normalize with the batch statistics (and update the running ones);
        needs more than one value per channel (N * prod(S) > 1).
    momentum, eps : float
    activation : "silu" | "gelu" | "relu" | "leaky_relu" | "none"
    negative_slope : float
        Slope of "leaky_relu" (0.2, DCGAN's).

    Returns
    -------
    out : Tensor, x's shape, dtype and memory format; differentiable in x,
        weight and bias.
    """
    fn = "batch_norm_act"
    _ops.check_tensor(fn, "x", x)
    if x.dim() < 2:
        raise ValueError(f"{fn}: x must have shape (N, C, *spatial), got {tuple(x.shape)}")
    c = x.shape[1]
    _check_running_stats(fn, x, running_mean, running_var)
    negative_slope = _check_activation(fn, activation, negative_slope)
    _check_eps(fn, eps)
    weight = _check_param(fn, "weight", weight, (c,), x)
    bias = _check_param(fn, "bias", bias, (c,), x)
    if not training:
        if running_mean is None or running_var is None:
            raise ValueError(f"{fn}: training=False needs running_mean and running_var (got None)")
        return _running_stats_affine_act(x, running_mean, running_var, weight, bias, eps, activation,
                                         negative_slope)
    if not isinstance(momentum, (int, float)) or isinstance(momentum, bool):
        raise TypeError(f"{fn}: momentum must be a float, got {type(momentum).__name__}")
    count = x.numel() // c if c else 0
    if count == 1:  # F.batch_norm's rule: an unbiased variance needs two values
        raise ValueError(f"{fn}: training needs more than 1 value per channel, got x of shape {tuple(x.shape)}")
    out, mean, _, var = batch_norm_act_train_op(x.contiguous(memory_format=memory_format(x)), weight, bias,
                                                float(eps), activation, negative_slope)
    if count > 1:
        with torch.no_grad():
            # lerp_: (1 - momentum) * running + momentum * new in one op (a launch each on a GPU, not two)
            if running_mean is not None:
                running_mean.lerp_(mean.to(running_mean.dtype), momentum)
            if running_var is not None:
                running_var.lerp_((var * (count / (count - 1))).to(running_var.dtype), momentum)
    return out


def conv2d_act(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, stride=1, padding=0,
               dilation=1, groups: int = 1, *, activation: str = "none", negative_slope: float = 0.01,
               residual: torch.Tensor | None = None, output_scale: float = 1.0) -> torch.Tensor:
    """``act((conv2d(x, weight) + bias + residual) * output_scale)``.

    The convolution is PyTorch's (cuDNN / oneDNN; channels_last kept). With
    activation "none" this is diffusers' ResnetBlock2D output
    ``(input_tensor + hidden_states) / output_scale_factor`` with
    ``output_scale = 1 / output_scale_factor``. The epilogue is one pass over
    the convolution's output (computed as ``(y + residual) * s + bias * s`` in
    fp32) instead of up to four.

    Parameters
    ----------
    x : Tensor (N, C_in, H, W)
    weight : Tensor (C_out, C_in / groups, kH, kW)
    bias : Tensor (C_out,), optional
    stride, padding, dilation, groups : as F.conv2d
    activation : "silu" | "gelu" | "relu" | "leaky_relu" | "none"
    negative_slope : float
    residual : Tensor, the convolution output's shape, optional
    output_scale : float

    Returns
    -------
    out : Tensor (N, C_out, H_out, W_out) in x's dtype and memory format.
    """
    fn = "conv2d_act"
    _ops.check_tensor(fn, "x", x)
    _ops.check_tensor(fn, "weight", weight)
    negative_slope = _check_activation(fn, activation, negative_slope)
    if not isinstance(output_scale, (int, float)) or isinstance(output_scale, bool):
        raise TypeError(f"{fn}: output_scale must be a float, got {type(output_scale).__name__}")
    if bias is not None:
        _ops.check_tensor(fn, "bias", bias)
        if tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(f"{fn}: bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
    if residual is None and output_scale == 1.0 and activation == "none":
        return torch.nn.functional.conv2d(x, weight, bias, stride, padding, dilation, groups)
    # The bias moves into the epilogue: (y + residual) * s + bias * s, one pass after the convolution.
    y = torch.nn.functional.conv2d(x, weight, None, stride, padding, dilation, groups)
    if residual is not None:
        _ops.check_tensor(fn, "residual", residual)
        if residual.shape != y.shape:
            raise ValueError(f"{fn}: residual must have the convolution output's shape {tuple(y.shape)}, "
                             f"got {tuple(residual.shape)}")
        _ops.check_like(fn, "residual", residual, "the convolution output", y)
    cdt = compute_dtype(y.dtype)
    scale = torch.full((y.shape[1],), float(output_scale), dtype=cdt, device=y.device)
    shift = torch.zeros_like(scale) if bias is None else bias.to(cdt) * float(output_scale)
    return _channel_affine_act(y, scale, shift, residual, activation, negative_slope)
