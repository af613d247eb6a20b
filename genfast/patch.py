"""``genfast.patch(model)``: swap genfast's fused normalization + activation and
attention into an existing model wherever the result is unchanged, and
``genfast.unpatch(model)``.

What is fused (everything else runs as before):

- diffusers ``ResnetBlock2D`` (UNets, VAE encoders and decoders): its forward is
  replaced by one that runs ``norm1`` + nonlinearity and ``norm2`` (with the
  time-embedding add, or the "scale_shift" FiLM) + nonlinearity as two
  ``group_norm_act`` calls; convs, dropout, resampling and the shortcut are the
  block's own modules, called as before.
- ``conv_norm_out`` + ``conv_act`` of diffusers' ``Encoder``, ``Decoder``,
  ``UNet2DModel`` and ``UNet2DConditionModel``: replaced by a ``GroupNormAct``
  sharing the norm's parameters and an ``nn.Identity``.
- diffusers ``Attention`` with the default ``AttnProcessor2_0`` at headdims 8 to
  56: the processor becomes ``genfast.patch.AttnProcessor``, which runs the
  attention with ``genfast.attention`` on the CPU (1.6-4x PyTorch's flash kernel
  at headdim 8 there) and hands every other call (a mask, a GPU, autograd) to the
  original processor.
- diffusers ``GEGLU`` / ``SwiGLU`` (the transformer blocks' feed-forward gate):
  the projection runs as a plain matmul and its bias, the split and
  ``h * act(gate)`` as one ``gated_act`` pass (PyTorch's CPU ``addmm`` copies
  the bias into its output first: a pass of its own).
- ``nn.Sequential`` GAN stacks: ``BatchNorm`` → ReLU/LeakyReLU/SiLU/GELU pairs run as
  one ``batch_norm_act`` and ``InstanceNorm`` → activation as one
  ``instance_norm_act``; in eval mode, with no gradient wanted, a BatchNorm2d
  right after a ``ConvTranspose2d`` / ``Conv2d`` is folded into the conv's
  weights (computed in fp64, cached until a parameter or running statistic
  changes), so the conv is followed by the activation alone. On the CPU these
  folded convs run in channels_last (oneDNN's fast layout; the Sequential hands
  back the caller's layout at its end), with the folded weight packed once for
  oneDNN and the activation as oneDNN's post-op (``genfast._onednn``).
- ``nn.Linear`` (but a GEGLU's proj, which the GEGLU runs): on the CPU at
  inference (fp32, or bf16; no autograd graph wanted) the weight is packed once
  for oneDNN and the product runs there (``genfast._onednn``: PyTorch's fp32
  ``F.linear`` calls MKL, a third of oneDNN's rate at decode sizes on an AMD
  EPYC); everywhere else ``F.linear`` as before. The packed copy costs the
  weight's memory again.
- ``nn.Conv2d`` whose weight has 16x the elements of its input (a UNet's deepest
  levels, where reordering the weight on every call is most of the conv): on
  the CPU at inference the weight is packed once for oneDNN, the output handed
  back in the input's layout; other convs run as before.
- ``nn.ConvTranspose2d`` to at most 4 channels (a generator's image layer, not
  folded with a BatchNorm): on the CPU at fp32 inference it runs genfast's
  kernel on a channels_last input, fused with the ``nn.Tanh`` that follows it
  in a patched Sequential, else PyTorch's GEMM + col2im kernel, which beats
  oneDNN's 1.1-2.5x there.

Nothing is fused that genfast cannot reproduce: a norm or activation with hooks
(or global module hooks), a subclass, a forward replaced by someone else, an
activation without a fused twin (Mish, tanh-GELU), ``eps <= 0``: each is reported
as left, with the reason. The decision is re-checked on every call (hooks added
after patching, a child swapped out, an unusual temb), falling back to the
original code, so a patched model never computes something else.

Parameters, buffers and state_dict keys are unchanged (parameters are shared,
not copied). ``torch.save(model)`` (pickling the module itself) needs
``unpatch`` first; ``state_dict`` does not.
"""
from __future__ import annotations

import math
import sys
import types
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as _module

from . import _onednn
from .activation import gated_act
from .attention import attention
from .backends import select as select_backend
from .conv import group_norm_act
from .nn import (
    GroupNormAct,
    activation_of,
    batch_norm_module_act,
    instance_norm_module_act,
)
from .reference.conv import activate

_PLAN = "_genfast_plan"          # instance attribute of a module whose forward genfast replaced
_ORIGINAL = "_genfast_original"  # attribute of a swapped-in module: {attribute name: original module}


# ---- the report ---------------------------------------------------------------

@dataclass(frozen=True)
class PatchEntry:
    """One module in a PatchReport: its qualified name, class and what was done or why not."""
    name: str
    kind: str
    detail: str


@dataclass
class PatchReport:
    """What ``genfast.patch`` replaced and what it left, with reasons.

    ``replaced`` and ``left`` are lists of PatchEntry in model order; ``str(report)``
    prints them as a table.
    """
    replaced: list[PatchEntry] = field(default_factory=list)
    left: list[PatchEntry] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"genfast.patch: {len(self.replaced)} replaced, {len(self.left)} left"]
        for title, entries in (("replaced", self.replaced), ("left", self.left)):
            if not entries:
                continue
            width = max(len(e.name or "(root)") for e in entries)
            kind_width = max(len(e.kind) for e in entries)
            lines.append(f"{title}:")
            lines += [f"  {(e.name or '(root)'):<{width}}  {e.kind:<{kind_width}}  {e.detail}" for e in entries]
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"PatchReport(replaced={len(self.replaced)}, left={len(self.left)})"


# ---- what genfast can reproduce -------------------------------------------------

_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")


def _global_hooks() -> bool:
    """Global module hooks fire on every module call: bypassing a call would skip them."""
    return any(getattr(_module, "_global" + d, None) for d in _HOOK_DICTS)


def _not_plain(m: nn.Module) -> str | None:
    """Why calling m's math directly would differ from calling m, or None."""
    for d in _HOOK_DICTS:
        if getattr(m, d, None):
            return f"{type(m).__name__} has {d.strip('_').replace('_', ' ')}"
    if "forward" in m.__dict__:
        return f"{type(m).__name__}'s forward was replaced (another patch or an accelerate hook)"
    return None


def _group_norm_reason(norm) -> str | None:
    if type(norm) is not nn.GroupNorm:
        return f"norm is {type(norm).__name__}, not nn.GroupNorm"
    if not (isinstance(norm.eps, (int, float)) and math.isfinite(norm.eps) and norm.eps > 0):
        # eps = 0 divides a constant group by zero: no defined result to reproduce.
        return f"GroupNorm eps={norm.eps!r} (needs a finite eps > 0)"
    return _not_plain(norm)


def _activation(act) -> tuple[str, float] | str:
    """(name, negative_slope) of a fusable activation module, or the reason it is not."""
    try:
        name, slope = activation_of(act)
    except ValueError:
        return f"activation {type(act).__name__} has no fused twin"
    if name == "none":
        return "no activation to fuse"
    return _not_plain(act) or (name, 0.01 if slope is None else slope)


def _diffusers_class(module: str, name: str):
    """A diffusers class, or None when its module was never imported (or lacks it).

    Only ``sys.modules`` is read: a model holding an instance of the class has
    imported its module already, and importing diffusers for a model without
    it took 9-15 s on the loaded two-core development machine."""
    return getattr(sys.modules.get(module), name, None)


# ---- diffusers ResnetBlock2D -----------------------------------------------------

class _ResnetPlan:
    """What a patched ResnetBlock2D fuses; rechecked on every call."""

    def __init__(self, block, activation, negative_slope):
        self.norm1, self.norm2, self.act = block.norm1, block.norm2, block.nonlinearity
        self.activation, self.negative_slope = activation, negative_slope

    def live(self, block) -> bool:
        return (block.norm1 is self.norm1 and block.norm2 is self.norm2 and block.nonlinearity is self.act
                and not _global_hooks() and _not_plain(self.norm1) is None and _not_plain(self.norm2) is None
                and _not_plain(self.act) is None)

    def norm_act(self, norm, x, **kw):
        return group_norm_act(x, norm.num_groups, norm.weight, norm.bias, norm.eps, activation=self.activation,
                              negative_slope=self.negative_slope, **kw)


def _resnet_reason(block, resnet_cls) -> str | None:
    if type(block).forward is not resnet_cls.forward:
        return f"{type(block).__name__} overrides ResnetBlock2D.forward"
    if "forward" in block.__dict__:
        return "its forward was replaced (another patch or an accelerate hook)"
    for attr in ("norm1", "norm2"):
        why = _group_norm_reason(getattr(block, attr))
        if why:
            return f"{attr}: {why}"
    act = _activation(block.nonlinearity)
    return f"nonlinearity: {act}" if isinstance(act, str) else None


def _resnet_forward(self, input_tensor, temb=None, *args, **kwargs):
    """diffusers' ResnetBlock2D.forward with each GroupNorm → nonlinearity as one group_norm_act.

    Follows diffusers 0.42's order of operations; whenever this block's state or
    inputs fall outside what it reproduces, the original forward runs instead.
    """
    plan = self.__dict__[_PLAN]
    original = type(self).forward
    if args or kwargs or not plan.live(self):
        return original(self, input_tensor, temb, *args, **kwargs)
    proj = self.time_emb_proj
    if (proj is None) != (temb is None):  # a raw temb without projection, or none where one is needed
        return original(self, input_tensor, temb)
    hidden = plan.norm_act(self.norm1, input_tensor)
    if self.upsample is not None:
        if hidden.shape[0] >= 64:  # diffusers' workaround for upsample_nearest_nhwc at large batch
            input_tensor, hidden = input_tensor.contiguous(), hidden.contiguous()
        input_tensor, hidden = self.upsample(input_tensor), self.upsample(hidden)
    elif self.downsample is not None:
        input_tensor, hidden = self.downsample(input_tensor), self.downsample(hidden)
    hidden = self.conv1(hidden)
    if proj is not None:
        if not self.skip_time_act:
            temb = self.nonlinearity(temb)
        temb = proj(temb)
    hidden = _norm2_act(self, plan, hidden, temb)
    hidden = self.dropout(hidden)
    hidden = self.conv2(hidden)
    if self.conv_shortcut is not None:
        if self.training:
            input_tensor = input_tensor.contiguous()
        input_tensor = self.conv_shortcut(input_tensor)
    out = input_tensor + hidden
    # x / 1 is x exactly: no pass over the output for the usual factor (a VAE round trip: 3% of its time)
    return out if self.output_scale_factor == 1 else out / self.output_scale_factor


def _norm2_act(block, plan, hidden, temb):
    """norm2 + the time embedding + nonlinearity; temb is the projected (N, C) or (N, 2C) or None."""
    n, c = hidden.shape[:2]
    mode = block.time_embedding_norm
    film = mode == "scale_shift"
    if film and temb is None:  # diffusers raises here
        raise ValueError(" `temb` should not be None when `time_embedding_norm` is scale_shift")
    if temb is None or mode != "default" and not film:  # other modes (the VAE's "group") ignore temb
        return plan.norm_act(block.norm2, hidden)
    width = 2 * c if film else c
    # genfast adds and scales in fp32 and returns x's dtype; PyTorch would promote to temb's dtype.
    if temb.dim() == 2 and temb.dtype == hidden.dtype and temb.shape[1] == width and temb.shape[0] in (1, n):
        temb = temb.expand(n, width)
        return plan.norm_act(block.norm2, hidden, **({"scale_shift": temb} if film else {"add": temb}))
    temb = temb[:, :, None, None]
    if film:
        scale, shift = torch.chunk(temb, 2, dim=1)
        return block.nonlinearity(block.norm2(hidden) * (1 + scale) + shift)
    return block.nonlinearity(block.norm2(hidden + temb))


# ---- conv_norm_out + conv_act of diffusers' UNets, VAE encoders and decoders -------------

# (module, class): forwards that call ``conv_act`` only right after ``conv_norm_out`` (read in diffusers 0.42).
_NORM_OUT_PARENTS = (
    ("diffusers.models.autoencoders.vae", "Encoder"),
    ("diffusers.models.autoencoders.vae", "Decoder"),
    ("diffusers.models.unets.unet_2d", "UNet2DModel"),
    ("diffusers.models.unets.unet_2d_condition", "UNet2DConditionModel"),
)


def _norm_out_reason(parent) -> str | tuple[str, float]:
    norm, act = parent.conv_norm_out, parent.conv_act
    why = _group_norm_reason(norm)
    if why:
        return f"conv_norm_out: {why}"
    act_or_why = _activation(act)
    return f"conv_act: {act_or_why}" if isinstance(act_or_why, str) else act_or_why


def _fused_group_norm(norm: nn.GroupNorm, activation: str, negative_slope: float) -> GroupNormAct:
    """A GroupNormAct sharing (not copying) norm's parameters, so optimizers and state_dict see the same tensors."""
    fused = GroupNormAct(norm.num_groups, norm.num_channels, norm.eps, affine=False, activation=activation,
                         negative_slope=negative_slope)
    fused.affine = norm.affine
    if norm.affine:
        fused.weight, fused.bias = norm.weight, norm.bias
    fused.train(norm.training)
    return fused


# ---- diffusers Attention -----------------------------------------------------------

_ATTENTION = ("diffusers.models.attention_processor", "Attention")
_SDPA_PROCESSOR = ("diffusers.models.attention_processor", "AttnProcessor2_0")
SMALL_HEAD_DIMS = frozenset(range(8, 64, 8))  # where genfast.attention's CPU kernel beats PyTorch's flash kernel


class AttnProcessor:
    """diffusers' ``AttnProcessor2_0`` with the attention itself run by ``genfast.attention`` where that
    is the faster kernel: on the CPU at headdims 8 to 56 (diffusion UNets at reduced sizes, small
    models, SD1.5's first level at headdim 40 for its cross-attention), in (batch, tokens, heads,
    headdim) layout, which the projections produce without the transposes SDPA needs; in fp16/bf16
    above headdim 16 only over fewer than 256 keys (cross-attention). Every other call (a mask,
    another device or headdim, autograd, the deprecated ``scale`` argument) goes to the original
    processor, unchanged."""

    def __init__(self, original):
        self.original = original

    def _fused(self, attn, hidden_states, encoder_hidden_states, attention_mask, args, kwargs) -> bool:
        if attention_mask is not None or args or kwargs or hidden_states.device.type != "cpu":
            return False
        if hidden_states.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            return False
        if hidden_states.dtype != torch.float32 and attn.inner_dim // attn.heads > 16:
            # 16-bit from headdim 24 on: PyTorch's kernel (AMX tiles on CPUs that have them) wins over 256
            # keys or more (headdim 40, 1024 x 1024, bf16: 5.3 against 12.2 ms); fewer keys, genfast's
            context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
            keys = context.shape[-1] * context.shape[-2] if context.ndim == 4 else context.shape[-2]
            if keys >= 256:
                return False
        if torch.is_grad_enabled():  # genfast.attention has no backward
            inputs = (hidden_states,) if encoder_hidden_states is None else (hidden_states, encoder_hidden_states)
            if any(t.requires_grad for t in inputs):
                return False
            if any(p.requires_grad for p in attn.parameters()):
                return False
        return True

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args,
                 **kwargs):
        if not self._fused(attn, hidden_states, encoder_hidden_states, attention_mask, args, kwargs):
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        image = hidden_states.ndim == 4
        if image:
            batch, channels, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channels, height * width).transpose(1, 2)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key, value = attn.to_k(encoder_hidden_states), attn.to_v(encoder_hidden_states)
        batch_size, heads = query.shape[0], attn.heads
        query, key, value = (t.unflatten(-1, (heads, -1)) for t in (query, key, value))
        # norm_q / norm_k normalize over headdim, the last dimension in either layout
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        # AttnProcessor2_0 leaves attn.scale to SDPA's default, 1 / sqrt(headdim): so does this
        out = attention(query, key, value).flatten(2).to(query.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        if image:
            out = out.transpose(-1, -2).reshape(batch_size, channels, height, width)
        if attn.residual_connection:
            out = out + residual
        # x / 1 is x exactly: no pass over the output for the usual factor
        return out if attn.rescale_output_factor == 1 else out / attn.rescale_output_factor


def _attention_reason(attn) -> str | None:
    processor_cls = _diffusers_class(*_SDPA_PROCESSOR)
    if type(attn.processor) is not processor_cls:
        return f"processor {type(attn.processor).__name__} (genfast reproduces AttnProcessor2_0 only)"
    if "forward" in attn.__dict__:
        return "its forward was replaced (another patch or an accelerate hook)"
    if getattr(attn, "inner_kv_dim", attn.inner_dim) != attn.inner_dim:
        return "keys and values have their own number of heads"
    if attn.inner_dim % attn.heads or attn.inner_dim // attn.heads not in SMALL_HEAD_DIMS:
        return (f"headdim {attn.inner_dim / attn.heads:g}: genfast's faster attention covers headdims "
                "8-56 on the CPU; PyTorch's SDPA is kept")
    return None


# ---- diffusers GEGLU / SwiGLU (the transformer blocks' feed-forward gate) ----------

_GATED = {("diffusers.models.activations", "GEGLU"): "gelu", ("diffusers.models.activations", "SwiGLU"): "silu"}


class _GatedPlan:
    """A patched GEGLU / SwiGLU: its proj (and SwiGLU's activation module), rechecked on every call."""

    def __init__(self, module, activation):
        self.proj, self.act = module.proj, getattr(module, "activation", None)
        self.activation = activation
        self.matmul = _onednn.Linear()

    def live(self, module) -> bool:
        return (module.proj is self.proj and getattr(module, "activation", None) is self.act
                and not _global_hooks() and _not_plain(self.proj) is None
                and (self.act is None or _not_plain(self.act) is None))


def _gated_forward(self, hidden_states, *args, **kwargs):
    """GEGLU / SwiGLU as proj's matmul, then its bias and ``h * act(gate)`` in one ``gated_act`` pass."""
    plan = self.__dict__[_PLAN]
    if args or kwargs or not plan.live(self) or hidden_states.device.type not in ("cpu", "cuda"):
        return type(self).forward(self, hidden_states, *args, **kwargs)
    return gated_act(plan.matmul(hidden_states, self.proj.weight), plan.activation, bias=self.proj.bias)


def _gated_reason(module, cls) -> str | None:
    if type(module).forward is not cls.forward:
        return f"{type(module).__name__} overrides {cls.__name__}.forward"
    if "forward" in module.__dict__:
        return "its forward was replaced (another patch or an accelerate hook)"
    if getattr(type(module), "gelu", None) is not getattr(cls, "gelu", None):
        return f"{type(module).__name__} overrides GEGLU.gelu"
    if type(module.proj) is not nn.Linear:
        return f"proj is {type(module.proj).__name__}, not nn.Linear"
    act = getattr(module, "activation", None)
    if act is not None and type(act) is not nn.SiLU:
        return f"activation is {type(act).__name__}, not nn.SiLU"
    return _not_plain(module.proj) or (act is not None and _not_plain(act)) or None


# ---- nn.Linear: the weight packed for oneDNN on the CPU -------------------------------

def _linear_forward(self, input):
    """nn.Linear.forward through genfast._onednn.Linear: F.linear itself off the CPU, with autograd or
    while compiling; the module's hooks run around it as before."""
    if not input.is_cpu:  # the GPU's path first: its host time per call is what a UNet step is made of
        return F.linear(input, self.weight, self.bias)
    return self.__dict__[_PLAN](input, self.weight, self.bias)


# ---- nn.Conv2d whose weight outweighs its input: packed for oneDNN on the CPU -------------

PACK_CONV_RATIO = 16  # weight elements per input element from which a packed conv is faster


def _conv2d_forward(self, input):
    """nn.Conv2d.forward; on the CPU at inference, a conv whose weight has PACK_CONV_RATIO times the
    elements of its input runs with the weight packed once for oneDNN (the weight's reorder is most
    of such a conv: SD1.5's deepest level, (2, 1280, 8, 8) 3x3, 36 -> 17 ms; (2, 1280, 16, 16)
    1.35x; at a ratio of 3 and less packing lost 6-13%), its output in the input's layout."""
    original = type(self).forward
    if not input.is_cpu or input.dim() != 4 or self.weight.numel() < PACK_CONV_RATIO * input.numel():
        return original(self, input)
    nchw = input.is_contiguous()
    if not (nchw or input.is_contiguous(memory_format=torch.channels_last)):
        return original(self, input)
    y = _onednn.conv_act(self, input, self.weight, self.bias, "none", 0.0, self.__dict__[_PLAN],
                         lambda: original(self, input))
    return y.contiguous() if nchw else y  # oneDNN hands back channels_last


# ---- nn.ConvTranspose2d to a few channels (an image generator's last layer) ----------

SMALL_DECONV_CHANNELS = 4  # out_channels up to which PyTorch's GEMM + col2im beats oneDNN on the CPU


def _small_deconv_reason(m) -> str | None:
    if m.out_channels > SMALL_DECONV_CHANNELS or m.groups != 1 or m.padding_mode != "zeros":
        return "not a plain ConvTranspose2d to a few channels"
    if not hasattr(torch._C._nn, "slow_conv_transpose2d") or "forward" in m.__dict__:
        return "no GEMM + col2im kernel, or its forward was replaced"
    return None


def _small_deconv_forward(self, input, output_size=None):
    """nn.ConvTranspose2d.forward to <= 4 channels, on the CPU at fp32 inference: a channels_last input
    (a patched generator's layout) through genfast's kernel (csrc/cpu/deconv.cpp), others through
    PyTorch's GEMM + col2im kernel, both instead of oneDNN's. 64 -> 3 channels, 4x4 stride 2, 32x32 ->
    64x64 at batch 64, 2 threads (AMD EPYC), with the Tanh after it: genfast's 3.5-3.6 ms, GEMM + col2im
    and tanh 6.4-6.6, oneDNN's conv alone 11-13; GEMM + col2im is 1.1-2.5x oneDNN's over batches 1-64
    and kernels 3-5, and from 8 channels on oneDNN's is faster. Anything else runs the module's own
    forward."""
    return _small_deconv(self, input, output_size, "none")


def _small_deconv(conv, input, output_size, activation):
    """conv(input) then the activation ("none" or "tanh"), the kernel picked as _small_deconv_forward says;
    genfast's kernel applies the activation in the same pass."""
    w, b = conv.weight, conv.bias
    if (output_size is None and input.dim() == 4 and input.dtype == torch.float32
            and _onednn.cpu_inference(input, w, b)):
        if (input.is_contiguous(memory_format=torch.channels_last) and tuple(conv.dilation) == (1, 1)
                and select_backend(input.device, input.dtype) == "cpp"):
            return torch.ops.genfast_cpu.conv_transpose_few(input, w, b, list(conv.stride), list(conv.padding),
                                                            list(conv.output_padding), activation)
        y = torch._C._nn.slow_conv_transpose2d(input, w, conv.kernel_size, b, conv.stride, conv.padding,
                                               conv.output_padding, conv.dilation)
    else:
        y = type(conv).forward(conv, input, output_size)
    return y if activation == "none" else torch.tanh(y)


# ---- nn.Sequential stacks (GAN generators) ----------------------------------------

_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_INSTANCE_NORMS = (nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)
_SEQ_NORMS = _BATCH_NORMS + _INSTANCE_NORMS
_FOLDABLE_CONVS = (nn.Conv2d, nn.ConvTranspose2d)


def _batch_norm_reason(bn) -> str | None:
    if not (isinstance(bn.eps, (int, float)) and math.isfinite(bn.eps) and bn.eps > 0):
        return f"{type(bn).__name__} eps={bn.eps!r} (needs a finite eps > 0)"
    return _not_plain(bn)


def _fold_reason(conv, bn) -> str | None:
    """Why bn cannot be folded into conv's weights (None: it can, in eval mode)."""
    if type(conv) not in _FOLDABLE_CONVS:
        return "no Conv2d/ConvTranspose2d right before it"
    if _not_plain(conv):
        return _not_plain(conv)
    if conv.padding_mode != "zeros":
        return f"conv padding_mode={conv.padding_mode!r}"
    if type(bn) is not nn.BatchNorm2d:
        return f"{type(bn).__name__} after a 2D conv"
    return None


class _BatchNormAct:
    """One step of a patched Sequential: [conv →] BatchNorm → activation."""

    def __init__(self, conv, bn, act, activation, negative_slope, foldable):
        self.conv, self.bn, self.act = conv, bn, act
        self.activation, self.negative_slope, self.foldable = activation, negative_slope, foldable
        self._key, self._folded = None, None
        self._packed = _onednn.PackedWeight()

    def modules(self):
        return [m for m in (self.conv, self.bn, self.act) if m is not None]

    def __call__(self, x):
        if self._can_fold():
            weight, bias = self._fold()
            conv = self.conv
            if x.device.type == "cpu" and x.dim() == 4:
                # oneDNN runs a channels_last conv without the layout reorders an NCHW one pays
                # for (DCGAN's generator at batch 64: ~1.25x); _sequential_forward restores
                # the caller's layout at the end
                x = x.contiguous(memory_format=torch.channels_last)
            # the folded weight packed for oneDNN once, the activation as its post-op (else PyTorch's conv)
            return _onednn.conv_act(conv, x, weight, bias, self.activation, self.negative_slope, self._packed,
                                    lambda: self._conv_act(x, weight, bias))
        if self.conv is not None:
            x = self.conv(x)
        return batch_norm_module_act(self.bn, x, self.activation, self.negative_slope)

    def _conv_act(self, x, weight, bias):
        conv = self.conv
        if isinstance(conv, nn.ConvTranspose2d):
            y = nn.functional.conv_transpose2d(x, weight, bias, conv.stride, conv.padding, conv.output_padding,
                                               conv.groups, conv.dilation)
        else:
            y = conv._conv_forward(x, weight, bias)
        return self._activate_inplace(y)

    def _can_fold(self) -> bool:
        """Eval mode with running statistics, fp32/fp64 weights and no gradient wanted for them."""
        bn = self.bn
        if not self.foldable or bn.training or bn.running_mean is None or bn.running_var is None:
            return False
        if torch.compiler.is_compiling():  # the fold's cache compares data pointers: traced, the unfolded ops
            return False
        params = self._params()
        # A weight rounded to fp16/bf16 after scaling errs by 2^-9 relative: more than the unfolded BN does.
        if any(t.dtype not in (torch.float32, torch.float64) for t in params + [bn.running_mean, bn.running_var]):
            return False
        # The cached fold carries no autograd graph: with gradients wanted, run conv → batch_norm_act.
        return not (torch.is_grad_enabled() and any(p.requires_grad for p in params))

    def _params(self):
        return [t for t in (self.conv.weight, self.conv.bias, self.bn.weight, self.bn.bias) if t is not None]

    def _activate_inplace(self, y):
        # y is the conv's fresh output, which its backward does not need: rewrite it in place.
        if self.activation == "relu":
            return torch.relu_(y)
        if self.activation == "leaky_relu":
            return nn.functional.leaky_relu_(y, self.negative_slope)
        return activate(y, self.activation, self.negative_slope)

    def _fold(self):
        """conv weights with bn folded in: w·s per output channel and (b − mean)·s + beta,
        s = gamma / sqrt(var + eps)."""
        conv, bn = self.conv, self.bn
        tensors = self._params() + [bn.running_mean, bn.running_var]
        try:
            # In-place updates (optimizer steps, load_state_dict, running stats) bump _version; .to() moves data.
            key = tuple((id(t), t.data_ptr(), t._version) for t in tensors) + (bn.eps,)
        except RuntimeError:  # inference tensors have no version counter: fold every call
            key = None
        if key is not None and key == self._key:
            return self._folded
        with torch.no_grad():
            w = conv.weight.double()
            s = torch.rsqrt(bn.running_var.double() + bn.eps)
            if bn.weight is not None:
                s = s * bn.weight.double()
            b = -bn.running_mean.double() * s
            if conv.bias is not None:
                b = b + conv.bias.double() * s
            if bn.bias is not None:
                b = b + bn.bias.double()
            if isinstance(conv, nn.ConvTranspose2d):
                # weight (C_in, C_out / groups, kH, kW): output channel g·(C_out/groups) + j is [group g, :, j].
                g = conv.groups
                w = (w.view(g, w.shape[0] // g, *w.shape[1:]) * s.view(g, 1, -1, 1, 1)).view(w.shape)
            else:
                w = w * s.view(-1, 1, 1, 1)
            folded = (w.to(conv.weight.dtype), b.to(conv.weight.dtype))
        self._key, self._folded = key, folded
        return folded


class _InstanceNormAct:
    """One step of a patched Sequential: InstanceNorm → activation (pix2pix / CycleGAN generators)."""

    def __init__(self, norm, act, activation, negative_slope):
        self.norm, self.act = norm, act
        self.activation, self.negative_slope = activation, negative_slope

    def modules(self):
        return [self.norm, self.act]

    def __call__(self, x):
        if x.dim() != self.norm._get_no_batch_dim() + 1:  # unbatched input: the modules' own handling
            return self.act(self.norm(x))
        return instance_norm_module_act(self.norm, x, self.activation, self.negative_slope)


class _DeconvTanh:
    """One step of a patched Sequential: a ConvTranspose2d to a few channels and the Tanh after it (an image
    generator's last layer), one pass over the output on the CPU (_small_deconv)."""

    def __init__(self, conv, act):
        self.conv, self.act = conv, act

    def modules(self):
        return [self.conv, self.act]

    def __call__(self, x):
        return _small_deconv(self.conv, x, None, "tanh")


class _SequentialPlan:
    def __init__(self, seq, steps):
        self.children = tuple(seq._modules.values())
        self.steps = steps
        self.fused = [m for s in steps if isinstance(s, (_BatchNormAct, _InstanceNormAct, _DeconvTanh))
                      for m in s.modules()]

    def live(self, seq) -> bool:
        return (tuple(seq._modules.values()) == self.children and not _global_hooks()
                and all(_not_plain(m) is None for m in self.fused))


def _sequential_forward(self, input):
    """nn.Sequential.forward with each [conv →] BatchNorm → activation, InstanceNorm → activation and
    few-channel ConvTranspose2d → Tanh as one step."""
    plan = self.__dict__[_PLAN]
    if not plan.live(self):
        return type(self).forward(self, input)
    nchw = input.dim() == 4 and input.is_contiguous()
    for step in plan.steps:
        input = step(input)
    # a folded step may have switched to channels_last: hand back the layout eager would
    return input.contiguous() if nchw and input.dim() == 4 else input


def _plan_sequential(name, seq, report):
    """Steps for seq (None when nothing fuses); appends the report's entries."""
    children = list(seq._modules.items())
    steps, i, fused_any = [], 0, False
    while i < len(children):
        child_name, m = children[i]
        qual = f"{name}.{child_name}" if name else child_name
        if (type(m) is nn.ConvTranspose2d and _small_deconv_reason(m) is None and i + 1 < len(children)
                and type(children[i + 1][1]) is nn.Tanh):
            steps.append(_DeconvTanh(m, children[i + 1][1]))
            report.replaced.append(PatchEntry(qual, "ConvTranspose2d", (
                f"{m.out_channels} output channels + Tanh: one pass (CPU fp32 inference)")))
            fused_any = True
            i += 2
            continue
        if type(m) not in _SEQ_NORMS:
            steps.append(m)
            i += 1
            continue
        act = children[i + 1][1] if i + 1 < len(children) else None
        why = _batch_norm_reason(m)
        act_or_why = _activation(act) if act is not None else "nothing follows it"
        if why is None and isinstance(act_or_why, str):
            why = f"followed by {type(act).__name__}: {act_or_why}" if act is not None else act_or_why
        if why is not None:
            report.left.append(PatchEntry(qual, type(m).__name__, why))
            steps.append(m)
            i += 1
            continue
        activation, slope = act_or_why
        if type(m) in _INSTANCE_NORMS:
            steps.append(_InstanceNormAct(m, act, activation, slope))
            report.replaced.append(PatchEntry(qual, type(m).__name__, f"+ {type(act).__name__} -> instance_norm_act"))
            fused_any = True
            i += 2
            continue
        conv = steps[-1] if steps and isinstance(steps[-1], nn.Module) else None
        fold_why = _fold_reason(conv, m) if conv is not None else "no Conv2d/ConvTranspose2d right before it"
        if fold_why is None:
            steps[-1] = _BatchNormAct(conv, m, act, activation, slope, foldable=True)
            detail = (f"+ {type(act).__name__} -> batch_norm_act; folded into {children[i - 1][0]} "
                      f"({type(conv).__name__}) in eval mode with fp32/fp64 weights")
        else:
            steps.append(_BatchNormAct(None, m, act, activation, slope, foldable=False))
            detail = f"+ {type(act).__name__} -> batch_norm_act (not folded: {fold_why})"
        report.replaced.append(PatchEntry(qual, type(m).__name__, detail))
        fused_any = True
        i += 2
    return steps if fused_any else None


# ---- patch / unpatch --------------------------------------------------------------

_NORMS = (nn.GroupNorm, nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)


def _replace_forward(module, forward, plan):
    module.__dict__[_PLAN] = plan
    module.forward = types.MethodType(forward, module)


def patch(model: nn.Module) -> PatchReport:
    """Swap genfast's fused blocks into ``model`` in place, where the result is unchanged.

    Parameters
    ----------
    model : nn.Module
        Any model; diffusers' UNets and autoencoders and nn.Sequential GAN
        generators are where genfast finds blocks to fuse. Its mode (train or
        eval), device and dtype may change afterwards.

    Returns
    -------
    report : PatchReport
        ``report.replaced`` and ``report.left`` (PatchEntry: name, kind, detail), in
        model order: every fused block, and every normalization layer left as it
        was with the reason. ``print(report)`` shows a table. Patching twice is a
        no-op for what is already patched.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"patch: model must be an nn.Module, got {type(model).__name__}")
    report = PatchReport()
    if _global_hooks():
        report.left.append(PatchEntry("", type(model).__name__, "global module hooks are registered"))
        return report
    resnet_cls = _diffusers_class("diffusers.models.resnet", "ResnetBlock2D")
    parents = [c for c in (_diffusers_class(*p) for p in _NORM_OUT_PARENTS) if c is not None]
    attention_cls = _diffusers_class(*_ATTENTION)
    gated = {_diffusers_class(*k): a for k, a in _GATED.items()}
    covered: set[int] = set()  # norms fused (or reported) by a block-level rule
    for name, m in list(model.named_modules()):
        if _PLAN in m.__dict__ or hasattr(m, _ORIGINAL):
            covered.update(id(c) for c in m.modules())
            continue
        if resnet_cls is not None and isinstance(m, resnet_cls):
            why = _resnet_reason(m, resnet_cls)
            covered.update((id(m.norm1), id(m.norm2)))
            if why:
                report.left.append(PatchEntry(name, type(m).__name__, why))
                continue
            activation, slope = _activation(m.nonlinearity)
            _replace_forward(m, _resnet_forward, _ResnetPlan(m, activation, slope))
            temb = "" if m.time_emb_proj is None else {"default": " (+temb add)", "scale_shift": " (+temb FiLM)"}.get(
                m.time_embedding_norm, "")
            report.replaced.append(PatchEntry(
                name, type(m).__name__, f"norm1+{activation}, norm2{temb}+{activation} -> group_norm_act"))
        elif any(type(m).forward is p.forward for p in parents) and isinstance(
                getattr(m, "conv_norm_out", None), nn.Module):
            norm = m.conv_norm_out
            covered.add(id(norm))
            if hasattr(norm, _ORIGINAL):  # patched before
                continue
            qual = f"{name}.conv_norm_out" if name else "conv_norm_out"
            act_or_why = _norm_out_reason(m)
            if isinstance(act_or_why, str):
                report.left.append(PatchEntry(qual, type(norm).__name__, act_or_why))
                continue
            activation, slope = act_or_why
            fused = _fused_group_norm(norm, activation, slope)
            object.__setattr__(fused, _ORIGINAL, {"conv_norm_out": norm, "conv_act": m.conv_act})
            m.conv_norm_out, m.conv_act = fused, nn.Identity()
            report.replaced.append(PatchEntry(
                qual, type(norm).__name__, f"+ conv_act ({activation}) -> GroupNormAct, conv_act -> Identity"))
        elif any(c is not None and isinstance(m, c) for c in gated):
            cls, activation = next((c, a) for c, a in gated.items() if c is not None and isinstance(m, c))
            why = _gated_reason(m, cls)
            if why:
                report.left.append(PatchEntry(name, type(m).__name__, why))
                continue
            _replace_forward(m, _gated_forward, _GatedPlan(m, activation))
            covered.add(id(m.proj))  # its matmul is the plan's
            bias = ", proj's bias fused" if m.proj.bias is not None else ""
            report.replaced.append(PatchEntry(name, type(m).__name__,
                                              f"proj + h * {activation}(gate) -> matmul + gated_act{bias}"))
        elif attention_cls is not None and isinstance(m, attention_cls):
            if isinstance(m.processor, AttnProcessor):  # patched before
                continue
            why = _attention_reason(m)
            if why:
                report.left.append(PatchEntry(name, type(m).__name__, why))
                continue
            m.processor = AttnProcessor(m.processor)
            report.replaced.append(PatchEntry(name, type(m).__name__, (
                f"AttnProcessor2_0 -> genfast.patch.AttnProcessor (headdim {m.inner_dim // m.heads}: "
                "genfast.attention on the CPU, the original processor elsewhere)")))
        elif type(m) is nn.Sequential and any(type(c) in _SEQ_NORMS for c in m.children()):
            covered.update(id(c) for c in m.children() if type(c) in _SEQ_NORMS)
            if "forward" in m.__dict__:  # the container's own hooks still run; a replaced forward is someone else's
                report.left.append(PatchEntry(name, "Sequential", "its forward was replaced (another patch?)"))
                continue
            steps = _plan_sequential(name, m, report)
            if steps is not None:
                _replace_forward(m, _sequential_forward, _SequentialPlan(m, steps))
                # a folded conv (or one fused with its Tanh) runs inside its step: its own forward stays as it is
                covered.update(id(s.conv) for s in steps
                               if isinstance(s, (_BatchNormAct, _DeconvTanh)) and s.conv is not None)
        elif type(m) is nn.Linear and _onednn.HAS_LINEAR and id(m) not in covered and "forward" not in m.__dict__:
            _replace_forward(m, _linear_forward, _onednn.Linear())
            report.replaced.append(PatchEntry(name, "Linear", "weight packed for oneDNN (CPU inference, fp32/bf16)"))
        elif (type(m) is nn.Conv2d and _onednn.HAS_CONV and m.padding_mode == "zeros" and id(m) not in covered
              and "forward" not in m.__dict__):
            _replace_forward(m, _conv2d_forward, _onednn.PackedWeight())
            report.replaced.append(PatchEntry(name, "Conv2d", (
                f"weight packed for oneDNN where it has {PACK_CONV_RATIO}x the input's elements (CPU inference)")))
        elif type(m) is nn.ConvTranspose2d and id(m) not in covered and _small_deconv_reason(m) is None:
            _replace_forward(m, _small_deconv_forward, None)
            report.replaced.append(PatchEntry(name, "ConvTranspose2d", (
                f"{m.out_channels} output channels: genfast's kernel or PyTorch's GEMM + col2im "
                "(CPU fp32 inference)")))
    for name, m in model.named_modules():
        if isinstance(m, _NORMS) and not isinstance(m, GroupNormAct) and id(m) not in covered:
            report.left.append(PatchEntry(name, type(m).__name__, "not in a block genfast recognizes"))
    return report


def unpatch(model: nn.Module) -> nn.Module:
    """Undo ``patch(model)`` in place: the original forwards and modules, exactly; returns model."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"unpatch: model must be an nn.Module, got {type(model).__name__}")
    for m in list(model.modules()):
        if isinstance(getattr(m, "processor", None), AttnProcessor):
            m.processor = m.processor.original
        if _PLAN in m.__dict__:
            del m.__dict__[_PLAN]
            m.__dict__.pop("forward", None)
        for child in list(m._modules.values()):
            originals = getattr(child, _ORIGINAL, None) if child is not None else None
            if originals:
                for attr, original in originals.items():
                    setattr(m, attr, original)
    return model
