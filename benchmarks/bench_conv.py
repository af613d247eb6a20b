"""Conv-block family: GroupNorm + SiLU, the block of every UNet and VAE decoder; BatchNorm +
ReLU of GAN generators and the conv epilogue; the GEGLU gate of the UNet's feed-forwards
(below `cases`).

The baseline is written the way diffusers' ResnetBlock2D writes it,
``nonlinearity(norm(hidden_states))`` with ``nn.GroupNorm`` and ``F.silu``, run
eagerly and through ``torch.compile`` of the same function.

Bytes each op must move, for x of N elements of s bytes:

==================  ======================================================  =====
case                traffic                                                 bytes
==================  ======================================================  =====
fwd                 read x, write out (the minimum: a group that fits on    2·N·s
                    chip is read once; the CPU kernel reads x twice, 3·N·s)
fwd+bwd             fwd; then read grad_out and x, write grad_x             5·N·s
==================  ======================================================  =====

``nbytes`` counts these minima for every implementation alike. Eager PyTorch
moves about 4·N·s forward (norm: read twice and write; silu: read and write).

Shapes: SD1.5 UNet (batch 2; C 320/640/1280 at 64/32/16/8), the SDXL VAE
decoder (batch 1; C 512 at 128 and 256, C 256 at 512, C 128 at 1024), a video
VAE (5D, batch 1) and, in both layouts, NCHW ("nchw") and channels_last ("cl").
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

import genfast
from harness import Case

FAMILY = "conv"
GROUPS = 32
SHAPES = {
    "unet 2x320x64x64": (2, 320, 64, 64),
    "unet 2x640x32x32": (2, 640, 32, 32),
    "unet 2x1280x16x16": (2, 1280, 16, 16),
    "unet 2x1280x8x8": (2, 1280, 8, 8),
    "vae 1x512x128x128": (1, 512, 128, 128),
    "vae 1x512x256x256": (1, 512, 256, 256),
    "vae 1x256x512x512": (1, 256, 512, 512),
    "vae 1x128x1024x1024": (1, 128, 1024, 1024),
    "video 1x512x5x64x64": (1, 512, 5, 64, 64),
}


def eager_group_norm_silu(norm: torch.nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
    """diffusers' ResnetBlock2D: ``self.nonlinearity(self.norm1(hidden_states))``."""
    return F.silu(norm(x))


def _compile(fn):
    # Static shapes: the best case for torch.compile, each case compiled for its own shape.
    return torch.compile(fn, dynamic=False)


def _inputs(shape, layout, dtype, device, requires_grad=False):
    norm = torch.nn.GroupNorm(GROUPS, shape[1]).to(device, dtype)
    with torch.no_grad():  # trained affine parameters are not ones and zeros
        norm.weight.normal_(1.0, 0.2)
        norm.bias.normal_(0.0, 0.2)
    x = torch.randn(shape, device=device, dtype=dtype)
    if layout == "cl":
        x = x.contiguous(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)
    return norm.requires_grad_(requires_grad), x.requires_grad_(requires_grad)


def _genfast(norm, x):
    return genfast.group_norm_act(x, norm.num_groups, norm.weight, norm.bias, norm.eps, activation="silu")


def _forward(shape, layout, dtype, device):
    norm, x = _inputs(shape, layout, dtype, device)
    compiled = _compile(eager_group_norm_silu)

    def no_grad(fn):
        def run():
            with torch.no_grad():
                return fn(norm, x)
        return run

    return {"genfast": no_grad(_genfast), "eager": no_grad(eager_group_norm_silu),
            "torch.compile": no_grad(compiled)}


def _forward_backward(shape, layout, dtype, device):
    """Forward, then the gradients of x, weight and bias for a random grad_out."""
    norm, x = _inputs(shape, layout, dtype, device, requires_grad=True)
    grad = torch.randn_like(x)
    compiled = _compile(eager_group_norm_silu)
    params = (x, norm.weight, norm.bias)

    def run(fn):
        return lambda: torch.autograd.grad(fn(norm, x), params, grad)

    return {"genfast": run(_genfast), "eager": run(eager_group_norm_silu), "torch.compile": run(compiled)}


# (mode, elements moved per element of x, elements touched per element of x, builder)
MODES = [("fwd", 2, 2, _forward), ("fwd+bwd", 5, 4, _forward_backward)]


def _plan(quick: bool, device: torch.device):
    """(mode, size, layout, dtype) tuples."""
    if quick:
        sizes = ["unet 2x320x64x64", "vae 1x512x256x256"]
        dtypes = [torch.bfloat16] if device.type == "cuda" else [torch.float32]
        plan = [("fwd", s, layout, d) for s in sizes for layout in ("nchw", "cl") for d in dtypes]
        return plan + [("fwd+bwd", "unet 2x320x64x64", layout, torch.float32) for layout in ("nchw", "cl")]
    plan = []
    for mode, *_ in MODES:
        for size in SHAPES:
            for layout in ("nchw", "cl"):
                for dtype in (torch.float32, torch.bfloat16):
                    plan.append((mode, size, layout, dtype))
    return plan


# ---- batch_norm_act (eval and training) and the per-channel affine epilogue ----------------
#
# DCGAN generator blocks (batch 64: ConvTranspose2d -> BatchNorm2d -> ReLU), the
# baseline written as the PyTorch examples' generator runs it: ``nn.BatchNorm2d``
# then ``nn.ReLU``. channel_affine_act is conv2d_act's epilogue after the
# convolution, ``act((y + bias + residual) * scale)``, against the same
# expression in PyTorch. Minimum traffic: read x and write out (2·N·s; the
# epilogue reads the residual too: 3·N·s); training forward+backward as GroupNorm's, 5·N·s.

BN_SHAPES = {"dcgan 64x128x16x16": (64, 128, 16, 16), "dcgan 64x64x32x32": (64, 64, 32, 32)}


def eager_batch_norm_relu(bn: torch.nn.BatchNorm2d, x: torch.Tensor) -> torch.Tensor:
    return F.relu(bn(x))


def _bn_inputs(shape, layout, dtype, device, training, requires_grad=False):
    bn = torch.nn.BatchNorm2d(shape[1]).to(device)  # parameters and running statistics in fp32
    with torch.no_grad():
        bn.weight.normal_(1.0, 0.2)
        bn.bias.normal_(0.0, 0.2)
        bn.running_mean.normal_(0.0, 0.5)
        bn.running_var.uniform_(0.5, 1.5)
    bn.train(training)
    x = torch.randn(shape, device=device, dtype=dtype)
    if layout == "cl":
        x = x.contiguous(memory_format=torch.channels_last)
    return bn.requires_grad_(requires_grad), x.requires_grad_(requires_grad)


def _genfast_bn(bn, x):
    return genfast.batch_norm_act(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, training=bn.training,
                                  momentum=bn.momentum, eps=bn.eps, activation="relu")


def _bn_builder(training, backward):
    def build(shape, layout, dtype, device):
        bn, x = _bn_inputs(shape, layout, dtype, device, training, requires_grad=backward)
        compiled = _compile(eager_batch_norm_relu)
        if backward:
            grad = torch.randn_like(x)
            params = (x, bn.weight, bn.bias)
            return {name: (lambda fn=fn: torch.autograd.grad(fn(bn, x), params, grad))
                    for name, fn in (("genfast", _genfast_bn), ("eager", eager_batch_norm_relu),
                                     ("torch.compile", compiled))}

        def no_grad(fn):
            def run():
                with torch.no_grad():
                    return fn(bn, x)
            return run

        return {"genfast": no_grad(_genfast_bn), "eager": no_grad(eager_batch_norm_relu),
                "torch.compile": no_grad(compiled)}
    return build


def eager_epilogue(y, bias, residual, scale):
    """A conv block's tail after the convolution: bias, residual, scale, activation."""
    return F.silu((y + bias[:, None, None] + residual) * scale)


def _epilogue_builder(shape, layout, dtype, device):
    y = torch.randn(shape, device=device, dtype=dtype)
    residual = torch.randn(shape, device=device, dtype=dtype)
    if layout == "cl":
        y, residual = (t.contiguous(memory_format=torch.channels_last) for t in (y, residual))
    bias = torch.randn(shape[1], device=device)
    scale = 1 / 1.4142
    # conv2d_act's epilogue as it calls it: the bias folded into the shift, (y + residual) * s + bias * s.
    s, shift = torch.full_like(bias, scale), bias * scale
    compiled = _compile(eager_epilogue)

    def genfast_epilogue():
        return genfast.conv._channel_affine_act(y, s, shift, residual, "silu", 0.01)

    bias_x = bias.to(dtype)  # PyTorch adds the bias in the output's dtype
    return {"genfast": genfast_epilogue, "eager": lambda: eager_epilogue(y, bias_x, residual, scale),
            "torch.compile": lambda: compiled(y, bias_x, residual, scale)}


# (op, mode, elements moved per element of x, elements touched, builder)
BN_MODES = [
    ("batch_norm_act", "eval fwd", 2, 2, _bn_builder(False, False)),
    ("batch_norm_act", "train fwd", 2, 2, _bn_builder(True, False)),
    ("batch_norm_act", "train fwd+bwd", 5, 4, _bn_builder(True, True)),
    ("channel_affine_act", "silu+residual fwd", 3, 3, _epilogue_builder),
]


def _bn_plan(quick: bool, device: torch.device):
    """(op, mode, size, layout, dtype) tuples: quick is one shape, fp32, each mode once
    (the epilogue in channels_last, the layout diffusers' UNets run in)."""
    if quick:
        size = "dcgan 64x128x16x16"
        return [(op, mode, size, "cl" if op == "channel_affine_act" else "nchw", torch.float32)
                for op, mode, *_ in BN_MODES]
    return [(op, mode, size, layout, dtype) for op, mode, *_ in BN_MODES for size in BN_SHAPES
            for layout in ("nchw", "cl") for dtype in (torch.float32, torch.bfloat16)]


def _bn_cases(quick: bool, device: torch.device) -> list[Case]:
    modes = {(op, mode): (moved, touched, build) for op, mode, moved, touched, build in BN_MODES}
    out = []
    for op, mode, size, layout, dtype in _bn_plan(quick, device):
        moved, touched, build = modes[(op, mode)]
        shape = BN_SHAPES[size]
        numel = torch.Size(shape).numel()
        out.append(Case(
            family=FAMILY, op=op, mode=mode, size=f"{size} {layout}", dtype=dtype, device=device,
            nbytes=moved * numel * dtype.itemsize, footprint=touched * numel * dtype.itemsize,
            impls=("genfast", "eager", "torch.compile"),
            build=lambda build=build, shape=shape, layout=layout, dtype=dtype: build(shape, layout, dtype, device),
        ))
    return out


# ---- gated_act: the GEGLU gate of the UNet's transformer feed-forwards ----------------------
#
# diffusers' GEGLU after its projection, ``h, gate = x.chunk(2, dim=-1); h * F.gelu(gate)``,
# against genfast.gated_act(x, "gelu"), x (2, tokens, 2F) from SD1.5's UNet: 64x64 latents
# at the first level (4096 tokens, inner dim F = 1280), 32x32 at the second (1024, 2560),
# and a small (2, 1024, 2*256). Minimum traffic per output element (R·F of them): forward
# reads h and gate and writes out, 3 elements; forward+backward adds a read of grad_out
# and x and a write of grad_x, 5 more. Eager moves 5 forward and about 9 backward.

GLU_SHAPES = {"sd15 ff 2x4096x2560": (2, 4096, 2560), "sd15 ff 2x1024x5120": (2, 1024, 5120),
              "small 2x1024x512": (2, 1024, 512)}


def eager_geglu(x: torch.Tensor) -> torch.Tensor:
    """diffusers' ``GEGLU.forward`` after ``self.proj``."""
    hidden_states, gate = x.chunk(2, dim=-1)
    return hidden_states * F.gelu(gate)


def _genfast_geglu(x):
    return genfast.gated_act(x, "gelu")


def _glu_builder(backward):
    def build(shape, dtype, device):
        x = torch.randn(shape, device=device, dtype=dtype)
        compiled = _compile(eager_geglu)
        fns = (("genfast", _genfast_geglu), ("eager", eager_geglu), ("torch.compile", compiled))
        if backward:
            x.requires_grad_()
            grad = torch.randn((*shape[:-1], shape[-1] // 2), device=device, dtype=dtype)
            return {name: (lambda fn=fn: torch.autograd.grad(fn(x), x, grad)) for name, fn in fns}

        def no_grad(fn):
            def run():
                with torch.no_grad():
                    return fn(x)
            return run

        return {name: no_grad(fn) for name, fn in fns}
    return build


# (mode, elements moved per output element, elements touched per output element, builder)
GLU_MODES = [("fwd", 3, 3, _glu_builder(False)), ("fwd+bwd", 8, 6, _glu_builder(True))]


def _glu_cases(quick: bool, device: torch.device) -> list[Case]:
    """quick: the second-level shape, forward and forward+backward in fp32 (on a GPU forward in bf16
    only: each case compiles its baseline, and the GPU check's time is short); full: every shape, fp32
    and bf16, both modes."""
    if quick:
        gpu = device.type == "cuda"
        dtype = torch.bfloat16 if gpu else torch.float32
        plan = [(mode, "sd15 ff 2x1024x5120", dtype) for mode, *_ in GLU_MODES[:1 if gpu else 2]]
    else:
        plan = [(mode, size, dtype) for mode, *_ in GLU_MODES for size in GLU_SHAPES
                for dtype in (torch.float32, torch.bfloat16)]
    modes = {mode: (moved, touched, build) for mode, moved, touched, build in GLU_MODES}
    out = []
    for mode, size, dtype in plan:
        moved, touched, build = modes[mode]
        shape = GLU_SHAPES[size]
        outputs = torch.Size(shape).numel() // 2
        out.append(Case(
            family=FAMILY, op="gated_act", mode=mode, size=size, dtype=dtype, device=device,
            nbytes=moved * outputs * dtype.itemsize, footprint=touched * outputs * dtype.itemsize,
            impls=("genfast", "eager", "torch.compile"),
            build=lambda build=build, shape=shape, dtype=dtype: build(shape, dtype, device),
        ))
    return out


def cases(quick: bool, device) -> list[Case]:
    """group_norm_act, quick: the UNet's first shape and the SDXL VAE's (1, 512, 256, 256)
    in both layouts, fp32 (bf16 on a GPU), forward, plus forward+backward at the UNet
    shape; full: every shape, layout, fp32/bf16, forward and forward+backward. Then
    batch_norm_act and channel_affine_act (``_bn_plan``) and gated_act (``_glu_cases``)."""
    device = torch.device(device)
    modes = {m: (moved, touched, build) for m, moved, touched, build in MODES}
    out = []
    for mode, size, layout, dtype in _plan(quick, device):
        moved, touched, build = modes[mode]
        shape = SHAPES[size]
        numel = torch.Size(shape).numel()
        out.append(Case(
            family=FAMILY, op="group_norm_act", mode=mode, size=f"{size} {layout}", dtype=dtype, device=device,
            nbytes=moved * numel * dtype.itemsize, footprint=touched * numel * dtype.itemsize,
            impls=("genfast", "eager", "torch.compile"),
            build=lambda build=build, shape=shape, layout=layout, dtype=dtype: build(shape, layout, dtype, device),
        ))
    return out + _bn_cases(quick, device) + _glu_cases(quick, device)
