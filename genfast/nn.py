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


# ---- normalization + activation blocks (genfast.conv) --------------------------------

from torch.nn.modules.batchnorm import _BatchNorm  # noqa: E402
from torch.nn.modules.instancenorm import _InstanceNorm  # noqa: E402

from . import conv as _conv  # noqa: E402


def activation_of(act) -> tuple[str, float | None]:
    """(name, negative_slope or None) of an activation module, name or None.

    Accepts nn.SiLU, nn.GELU (exact), nn.ReLU, nn.LeakyReLU, nn.Identity, None
    and genfast's names; raises ValueError for anything genfast cannot reproduce
    exactly (e.g. nn.GELU(approximate="tanh")).
    """
    if act is None or isinstance(act, torch.nn.Identity):
        return "none", None
    if isinstance(act, str):
        if act not in _conv.ACTIVATIONS:
            raise ValueError(f"activation must be one of {_conv.ACTIVATIONS}, got {act!r}")
        return act, None
    if type(act) is torch.nn.SiLU:
        return "silu", None
    if type(act) is torch.nn.GELU and act.approximate == "none":
        return "gelu", None
    if type(act) is torch.nn.ReLU:
        return "relu", None
    if type(act) is torch.nn.LeakyReLU:
        return "leaky_relu", float(act.negative_slope)
    raise ValueError(f"activation {act!r} has no fused equivalent in genfast")


def _copy_params(dst: torch.nn.Module, src: torch.nn.Module) -> None:
    with torch.no_grad():
        for name, t in list(src.named_parameters(recurse=False)) + list(src.named_buffers(recurse=False)):
            if t is not None and getattr(dst, name, None) is not None:
                getattr(dst, name).copy_(t)


class GroupNormAct(torch.nn.Module):
    """``act(nn.GroupNorm(x + add) * (1 + scale) + shift) + residual`` (genfast.group_norm_act).

    Parameters and state_dict keys are nn.GroupNorm's (``weight``, ``bias``).
    ``forward(x, add=None, scale_shift=None, residual=None)``: x (N, C, *S);
    add (N, C); scale_shift (N, 2C); residual like x.
    """

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5, affine: bool = True, *,
                 activation: str = "silu", negative_slope: float = 0.01, device=None, dtype=None):
        super().__init__()
        if num_channels % num_groups != 0:
            raise ValueError(f"GroupNormAct: num_groups ({num_groups}) must divide num_channels ({num_channels})")
        _conv._check_activation("GroupNormAct", activation, negative_slope)
        self.num_groups, self.num_channels, self.eps, self.affine = num_groups, num_channels, eps, affine
        self.activation, self.negative_slope = activation, float(negative_slope)
        if affine:
            self.weight = torch.nn.Parameter(torch.ones(num_channels, device=device, dtype=dtype))
            self.bias = torch.nn.Parameter(torch.zeros(num_channels, device=device, dtype=dtype))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)

    @classmethod
    def from_module(cls, norm: torch.nn.GroupNorm, act=None) -> "GroupNormAct":
        """The fused twin of ``act(norm(x))``, sharing nothing with ``norm`` (parameters copied)."""
        if not isinstance(norm, torch.nn.GroupNorm):
            raise TypeError(f"GroupNormAct.from_module: norm must be an nn.GroupNorm, got {type(norm).__name__}")
        name, slope = activation_of(act)
        p = norm.weight if norm.weight is not None else None
        m = cls(norm.num_groups, norm.num_channels, norm.eps, norm.affine, activation=name,
                negative_slope=0.01 if slope is None else slope,
                device=p.device if p is not None else None, dtype=p.dtype if p is not None else None)
        _copy_params(m, norm)
        return m

    def forward(self, x, add=None, scale_shift=None, residual=None):
        return _conv.group_norm_act(x, self.num_groups, self.weight, self.bias, self.eps, activation=self.activation,
                                    negative_slope=self.negative_slope, add=add, scale_shift=scale_shift,
                                    residual=residual)

    def extra_repr(self) -> str:
        return (f"{self.num_groups}, {self.num_channels}, eps={self.eps}, affine={self.affine}, "
                f"activation={self.activation!r}" +
                (f", negative_slope={self.negative_slope}" if self.activation == "leaky_relu" else ""))


def _from_running_norm(cls, norm, act, base: type, what: str):
    """``cls`` (BatchNormAct or InstanceNormAct) with ``norm``'s configuration, parameters,
    buffers and mode, and the activation ``act``."""
    if not isinstance(norm, base):
        raise TypeError(f"{cls.__name__}.from_module: norm must be an {what}, got {type(norm).__name__}")
    name, slope = activation_of(act)
    ref = norm.weight if norm.weight is not None else norm.running_mean
    m = cls(norm.num_features, norm.eps, norm.momentum, norm.affine, norm.track_running_stats,
            activation=name, negative_slope=0.2 if slope is None else slope,
            device=None if ref is None else ref.device, dtype=None if ref is None else ref.dtype)
    _copy_params(m, norm)
    m.train(norm.training)
    return m


class BatchNormAct(_BatchNorm):
    """``act(nn.BatchNorm(x))`` (genfast.batch_norm_act): nn.BatchNorm's parameters,
    buffers, state_dict and running-statistics rules, for x of shape (N, C, *S).
    Fused in both modes: one pass in eval mode; in training mode batch statistics,
    normalize + activation and the running-statistics update, forward and backward."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, *, activation: str = "relu", negative_slope: float = 0.2,
                 device=None, dtype=None):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype)
        _conv._check_activation("BatchNormAct", activation, negative_slope)
        self.activation, self.negative_slope = activation, float(negative_slope)

    def _check_input_dim(self, input):
        if input.dim() < 2:
            raise ValueError(f"BatchNormAct: expected input of shape (N, C, *S), got {tuple(input.shape)}")

    @classmethod
    def from_module(cls, norm: _BatchNorm, act=None) -> "BatchNormAct":
        return _from_running_norm(cls, norm, act, _BatchNorm, "nn.BatchNorm*d")

    def forward(self, x):
        self._check_input_dim(x)
        return batch_norm_module_act(self, x, self.activation, self.negative_slope)


def batch_norm_module_act(norm: _BatchNorm, x: torch.Tensor, activation: str, negative_slope: float):
    """``act(norm(x))`` for any nn.BatchNorm*d ``norm`` (its mode, parameters and buffers,
    updated in place as its own forward would) through genfast.batch_norm_act; shared by
    BatchNormAct and genfast.patch."""
    # nn.BatchNorm's rules: momentum None is a cumulative average; eval without running stats uses the batch.
    factor = 0.0 if norm.momentum is None else norm.momentum
    if norm.training and norm.track_running_stats and norm.num_batches_tracked is not None:
        norm.num_batches_tracked.add_(1)
        factor = 1.0 / float(norm.num_batches_tracked) if norm.momentum is None else norm.momentum
    training = norm.training or (norm.running_mean is None and norm.running_var is None)
    track = not norm.training or norm.track_running_stats
    return _conv.batch_norm_act(x, norm.running_mean if track else None, norm.running_var if track else None,
                                norm.weight, norm.bias, training=training, momentum=factor, eps=norm.eps,
                                activation=activation, negative_slope=negative_slope)


class InstanceNormAct(_InstanceNorm):
    """``act(nn.InstanceNorm(x))`` (genfast.instance_norm_act): fused whenever instance
    statistics are used (training, or no running statistics), forward and backward."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.1, affine: bool = False,
                 track_running_stats: bool = False, *, activation: str = "relu", negative_slope: float = 0.2,
                 device=None, dtype=None):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype)
        _conv._check_activation("InstanceNormAct", activation, negative_slope)
        self.activation, self.negative_slope = activation, float(negative_slope)

    def _check_input_dim(self, input):
        if input.dim() < 3:
            raise ValueError(f"InstanceNormAct: expected input of shape (N, C, *S), got {tuple(input.shape)}")

    def _get_no_batch_dim(self):
        return -1  # batched input only

    @classmethod
    def from_module(cls, norm: _InstanceNorm, act=None) -> "InstanceNormAct":
        return _from_running_norm(cls, norm, act, _InstanceNorm, "nn.InstanceNorm*d")

    def forward(self, x):
        self._check_input_dim(x)
        return instance_norm_module_act(self, x, self.activation, self.negative_slope)


def instance_norm_module_act(norm: _InstanceNorm, x: torch.Tensor, activation: str, negative_slope: float):
    """``act(norm(x))`` for any nn.InstanceNorm*d ``norm`` with batched x, by its own rules
    (nn.InstanceNorm's momentum None means 0: running statistics kept as they are); shared
    by InstanceNormAct and genfast.patch."""
    use_input_stats = norm.training or not norm.track_running_stats
    return _conv.instance_norm_act(x, norm.running_mean, norm.running_var, norm.weight, norm.bias,
                                   use_input_stats=use_input_stats,
                                   momentum=norm.momentum if norm.momentum is not None else 0.0, eps=norm.eps,
                                   activation=activation, negative_slope=negative_slope)
