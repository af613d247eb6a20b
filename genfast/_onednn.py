"""Weights packed once into oneDNN's blocked layout, for CPU inference in ``genfast.patch``.

Two costs of PyTorch's CPU path that no kernel of genfast's removes, measured on a
2-core AMD EPYC (Zen 4), fp32, 2 threads, on 2026-11-27:

- ``F.linear`` on fp32 runs MKL's sgemm, which on this (non-Intel) CPU reaches a
  third of oneDNN's rate at decode sizes: (16, 512) x (512, 32000) 14.9 ms
  against 3.1 ms with the weight packed for oneDNN; (16, 512) x (512, 2816)
  0.52 against 0.25 ms. In bf16 (already oneDNN) packing still gains 1.4-2x at
  those sizes. From 2048 rows on the gain is ~1.1x.
- a convolution goes through oneDNN but reorders its weight into oneDNN's
  layout on every call: the folded DCGAN generator's first layers (ConvTranspose
  100 -> 512 and 512 -> 256 at batch 64) took 6.5 and 29 ms, packed 3.6 and
  22 ms, with the ReLU as oneDNN's post-op (no pass of its own); a UNet's
  deepest 3x3 conv, (2, 1280, 8, 8), 36 ms, packed 17 ms. Where the input
  outweighs the weight, packing gains nothing (and oneDNN's channels_last
  output would cost a pass back): ``genfast.patch`` packs a plain conv only
  when its weight has 16x its input's elements.

The packed copy costs as much memory as the weight. It is made on the first
call and made again when the weight changes (another tensor, storage or
in-place version). Only plain CPU tensors of one dtype (fp32, or bf16 where
oneDNN supports it) without an autograd graph to record go this way, and
nothing while ``torch.compile`` traces (inductor packs weights itself).
"""
from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

_PLAIN = (torch.Tensor, torch.nn.Parameter)
_LINEAR_OPS = ("_reorder_linear_weight", "_linear_pointwise")
_CONV_OPS = ("_convolution_pointwise", "_convolution_transpose_pointwise", "_reorder_convolution_weight",
             "_reorder_convolution_transpose_weight")
# genfast's activation names → (oneDNN post-op, its algorithm); leaky_relu passes its slope as a scalar
POST_OPS = {"none": ("none", ""), "relu": ("relu", ""), "leaky_relu": ("leaky_relu", ""),
            "silu": ("swish", ""), "gelu": ("gelu", "none")}


def _has_ops(names) -> bool:
    return torch.backends.mkldnn.is_available() and all(hasattr(torch.ops.mkldnn, n) for n in names)


HAS_LINEAR, HAS_CONV = _has_ops(_LINEAR_OPS), _has_ops(_CONV_OPS)


_failed: str | None = None  # why a packed op raised where PyTorch's own path did not: then never again


def _guarded(fast, fallback):
    """fast(), or on a RuntimeError fallback(): an error of the caller's (a wrong shape) is then
    fallback's own; a fallback that succeeds means oneDNN's packed ops fail on this machine, and
    every later call takes PyTorch's path."""
    global _failed
    try:
        return fast()
    except RuntimeError as e:
        error = e
    out = fallback()  # outside the except: a caller's error comes unchained
    _failed = f"{type(error).__name__}: {error}"
    warnings.warn(f"genfast.patch: oneDNN's packed ops failed ({_failed}); PyTorch's path from now on",
                  RuntimeWarning, stacklevel=3)
    return out


def cpu_inference(x: torch.Tensor, *params) -> bool:
    """Whether x and params (None allowed) are plain non-empty CPU tensors of one dtype with no autograd graph
    to record, outside ``torch.compile``'s tracing: where patch may pick another CPU kernel."""
    if type(x) not in _PLAIN or x.device.type != "cpu" or not x.numel():
        return False
    if any(p is not None and (type(p) not in _PLAIN or p.dtype != x.dtype or p.device.type != "cpu") for p in params):
        return False
    if torch.is_grad_enabled() and (x.requires_grad or any(p is not None and p.requires_grad for p in params)):
        return False
    return not torch.compiler.is_compiling()


def usable(x: torch.Tensor, *params) -> bool:
    """Whether x and params (None allowed) can go through a packed oneDNN op with no difference but rounding."""
    if _failed is not None or not torch.backends.mkldnn.enabled:  # failed here, or the user turned oneDNN off
        return False
    if x.dtype != torch.float32 and not (x.dtype == torch.bfloat16 and torch.ops.mkldnn._is_mkldnn_bf16_supported()):
        return False
    return cpu_inference(x, *params)


class PackedWeight:
    """One weight's packed copy, remade when the weight is another tensor or was changed in place."""

    def __init__(self):
        self._key, self._packed = None, None

    def __reduce__(self):
        # deepcopy and pickle make an empty one (oneDNN's opaque tensors have no storage to copy); the copy
        # packs its own weight on its first call
        return PackedWeight, ()

    def get(self, weight: torch.Tensor, pack):
        """pack() made once per state of weight; None for an inference tensor (no version counter)."""
        try:
            key = (id(weight), weight.data_ptr(), weight._version, weight.dtype)
        except RuntimeError:
            return None
        if key != self._key:
            with torch.no_grad():
                self._packed = pack()
            self._key = key
        return self._packed


class Linear:
    """``F.linear(x, weight, bias)`` with weight packed for oneDNN when ``usable``.

    One packed copy, in one of two layouts: for a single row of x (oneDNN's batch
    hint 1) or for any number (no hint). In fp32 the single-row layout made a
    1-row product 1.1-1.7x faster (2048 x 8192: 2.6 against 3.5 ms) and a 16-row
    one 1.6-2x slower; in bf16 the hint changed nothing measurable. The first
    call picks the layout; ``SWITCH_AFTER`` calls in a row that want the other
    one repack (a decode loop: its prefill, then one row per step at batch 1),
    so alternating calls never repack every time.
    """

    SWITCH_AFTER = 8

    def __init__(self):
        self.packed = PackedWeight()
        self.single_row = None  # the packed copy's layout (None: not packed yet)
        self._against = 0  # calls in a row that wanted the other layout

    def __call__(self, x, weight, bias=None):
        if not (HAS_LINEAR and x.dim() >= 2 and usable(x, weight, bias)):
            return F.linear(x, weight, bias)
        single = x.dtype == torch.float32 and x.numel() == x.shape[-1]
        if self.single_row is None:
            self.single_row = single
        elif single != self.single_row:
            self._against += 1
            if self._against >= self.SWITCH_AFTER:
                self.packed, self.single_row, self._against = PackedWeight(), single, 0
        else:
            self._against = 0
        hint = 1 if self.single_row else None

        def fast():
            packed = self.packed.get(weight, lambda: torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(),
                                                                                             hint))
            if packed is None:
                return F.linear(x, weight, bias)
            return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")

        return _guarded(fast, lambda: F.linear(x, weight, bias))


def conv_act(conv, x, weight, bias, activation: str, negative_slope: float, packed: PackedWeight, fallback):
    """``act(conv(x))`` with conv's geometry (an nn.Conv2d or nn.ConvTranspose2d), the given weight
    and bias, the weight packed and the activation as oneDNN's post-op; ``fallback()`` (the caller's
    own path) where that does not apply."""
    if not (HAS_CONV and x.dim() == 4 and activation in POST_OPS and usable(x, weight, bias)
            and not isinstance(conv.padding, str)):  # "same" / "valid": PyTorch resolves them
        return fallback()
    attr, algorithm = POST_OPS[activation]
    scalars = [negative_slope] if activation == "leaky_relu" else []
    padding, stride, dilation, groups = list(conv.padding), list(conv.stride), list(conv.dilation), conv.groups
    if isinstance(conv, torch.nn.ConvTranspose2d):
        out_pad = list(conv.output_padding)

        def fast():
            w = packed.get(weight, lambda: torch.ops.mkldnn._reorder_convolution_transpose_weight(
                weight, padding, out_pad, stride, dilation, groups, list(x.shape)))
            if w is None:
                return fallback()
            return torch.ops.mkldnn._convolution_transpose_pointwise(
                x, w, bias, padding, out_pad, stride, dilation, groups, attr, scalars, algorithm)
    else:
        def fast():
            w = packed.get(weight, lambda: torch.ops.mkldnn._reorder_convolution_weight(
                weight, padding, stride, dilation, groups, list(x.shape)))
            if w is None:
                return fallback()
            return torch.ops.mkldnn._convolution_pointwise(x, w, bias, padding, stride, dilation, groups, attr,
                                                           scalars, algorithm)
    return _guarded(fast, fallback)
