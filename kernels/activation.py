"""Gated activations in Triton: ``out = h * act(gate)`` over the two halves of
each row of x (..., 2F), plus an optional bias (2F,) (a Linear's, which the
caller then leaves out of its matmul), and its backward.

The naive version, diffusers' GEGLU after its projection, counted for R rows
of F outputs and s bytes per element:

    h, gate = x.chunk(2, dim=-1)     # views: no traffic
    a = F.gelu(gate)                 # read gate (strided), write a:   2·R·F·s
    out = h * a                      # read h and a, write out:        3·R·F·s

5·R·F·s and a temporary of the output's size; its autograd backward reads
grad_out, h, a and gate and writes grad_h, grad_gate and the concatenated
grad_x: about 9·R·F·s. The kernels here move the minimum: forward reads x and
writes out, 3·R·F·s; backward reads grad_out and x and writes grad_x, 5·R·F·s.

Grid: (row blocks, column blocks). A program takes BLOCK_R rows of BLOCK_F
columns (BLOCK_R·BLOCK_F = 2048 elements of the output, 8 per thread): wide
rows are split into column blocks of at most 1024, the largest power of two
that pads F by at most 1/8 (SD's F = 1280, 2560, 5120: blocks of 256, 512,
1024, no padding), and narrow rows are packed several to a program, so that
F = 1 does not leave 2047 lanes idle.
Rows go on grid axis 0, whose limit is 2^31 - 1 (axis 1's is 65535).

Arithmetic in fp32; exact GELU with ``erf``, the tanh GELU as
``g * sigmoid(2u)`` (the same function: (1 + tanh u) / 2 = sigmoid(2u)), SiLU as
``g * sigmoid(g)``, with ``exp`` and the IEEE ``div`` from ``kernels/common.py``
(the GPU's approximate exp and division are a few ulp off PyTorch's).

Target on a GPU: >= 80% of copy bandwidth at SD's shapes. Measured on an H200
(2026-11-27, forward, SD1.5 feed-forward x of 2x1024x5120 bf16: 31.5 MB read
and written): 0.044 ms median against eager's 0.038 and torch.compile's
0.056, 17% of the copy bandwidth; at the copy rate it would take 7.4 us, and
the median includes the host's launch time (this row was not profiled). Tested on the GPU
(158 activation tests passed), with ``TRITON_INTERPRET=1`` here against
PyTorch's ``h * act(gate)`` in fp64 and compiled for sm_90.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import cdiv, div, exp, next_pow2

ACT_CODES = {"gelu": 0, "gelu_tanh": 1, "silu": 2}
TILE = 2048  # output elements per program
MAX_BLOCK_F = 1024
MIN_SPLIT_F = 128  # narrower column blocks are not worth fewer padded lanes
NUM_WARPS = 8


@triton.jit
def _neg_sigmoid_arg(g, ACT: tl.constexpr):
    """-z of the sigmoid each activation is made of: silu = g s(g), gelu_tanh = g s(2u)."""
    if ACT == 2:
        return -g
    else:
        # -2u, u = sqrt(2/pi) (g + 0.044715 g^3)
        return -1.5957691216057308 * g * (1.0 + 0.044715 * g * g)


@triton.jit
def _activate(g, ACT: tl.constexpr):
    if ACT == 0:
        return 0.5 * g * (1.0 + tl.math.erf(g * 0.7071067811865476))
    else:
        return div(g, 1.0 + exp(_neg_sigmoid_arg(g, ACT)))


@triton.jit
def _activate_and_grad(g, ACT: tl.constexpr):
    """(act(g), act'(g))."""
    if ACT == 0:
        cdf = 0.5 * (1.0 + tl.math.erf(g * 0.7071067811865476))
        return g * cdf, cdf + g * exp(-0.5 * g * g) * 0.3989422804014327
    else:
        # exp of at most 80: e and s = 1 / (1 + e) stay finite and normal, so 1 - s = e * s
        # holds; beyond it the true gradient is below 1e-33.
        e = exp(tl.minimum(_neg_sigmoid_arg(g, ACT), 80.0))
        s = div(1.0, 1.0 + e)
        one_minus_s = e * s  # not 1 - s: no cancellation where s is near 1
        if ACT == 2:
            da = s * (1.0 + g * one_minus_s)
        else:
            # d s(2u) / dg = 2 s (1 - s) u',  2u' = 2 sqrt(2/pi) (1 + 3 * 0.044715 g^2)
            du = 1.5957691216057308 * (1.0 + 0.134145 * g * g)
            da = s + g * s * one_minus_s * du
        return g * s, da


@triton.jit
def _tile(rows, F, BLOCK_R: tl.constexpr, BLOCK_F: tl.constexpr):
    """This program's row indices (int64, (BLOCK_R, 1)), column indices ((1, BLOCK_F)) and mask."""
    r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)[:, None]
    c = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)[None, :]
    return r, c, (r < rows) & (c < F)


@triton.jit
def _halves(x_ptr, bias_ptr, r, c, mask, F, HAS_BIAS: tl.constexpr):
    """(h, gate) of x + bias at rows r, columns c, in fp32."""
    h_off = r * (2 * F) + c
    h = tl.load(x_ptr + h_off, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(x_ptr + h_off + F, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        cmask = c < F
        h += tl.load(bias_ptr + c, mask=cmask, other=0.0).to(tl.float32)
        g += tl.load(bias_ptr + c + F, mask=cmask, other=0.0).to(tl.float32)
    return h_off, h, g


@triton.jit
def _gated_act_kernel(x_ptr, bias_ptr, out_ptr, rows, F, ACT: tl.constexpr, HAS_BIAS: tl.constexpr,
                      BLOCK_R: tl.constexpr, BLOCK_F: tl.constexpr):
    r, c, mask = _tile(rows, F, BLOCK_R, BLOCK_F)
    _, h, g = _halves(x_ptr, bias_ptr, r, c, mask, F, HAS_BIAS)
    out = h * _activate(g, ACT)
    tl.store(out_ptr + r * F + c, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gated_act_backward_kernel(grad_out_ptr, x_ptr, bias_ptr, grad_x_ptr, rows, F, ACT: tl.constexpr,
                               HAS_BIAS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_F: tl.constexpr):
    r, c, mask = _tile(rows, F, BLOCK_R, BLOCK_F)
    h_off, h, g = _halves(x_ptr, bias_ptr, r, c, mask, F, HAS_BIAS)
    d = tl.load(grad_out_ptr + r * F + c, mask=mask, other=0.0).to(tl.float32)
    a, da = _activate_and_grad(g, ACT)
    ty = grad_x_ptr.dtype.element_ty
    tl.store(grad_x_ptr + h_off, (d * a).to(ty), mask=mask)
    tl.store(grad_x_ptr + h_off + F, (d * h * da).to(ty), mask=mask)


# ---- launchers (argument order = the op schemas in genfast/activation.py) ---

def _launch(kernel, tensors, x: torch.Tensor, bias, activation: str) -> None:
    F = x.shape[-1] // 2
    rows = x.numel() // x.shape[-1]
    block_f = min(MAX_BLOCK_F, next_pow2(F))
    while block_f > MIN_SPLIT_F and 8 * (cdiv(F, block_f) * block_f - F) > F:
        block_f //= 2  # masked-off lanes of the last column block: at most 1/8 of F
    block_r = TILE // block_f
    grid = (cdiv(rows, block_r), cdiv(F, block_f))
    kernel[grid](*tensors, rows, F, ACT=ACT_CODES[activation], HAS_BIAS=bias is not None, BLOCK_R=block_r,
                 BLOCK_F=block_f, num_warps=NUM_WARPS)


def gated_act(x, bias, activation):
    out = x.new_empty((*x.shape[:-1], x.shape[-1] // 2))
    if out.numel() == 0:
        return out
    _launch(_gated_act_kernel, (x, x if bias is None else bias, out), x, bias, activation)
    return out


def gated_act_backward(grad_out, x, bias, activation):
    grad_x = torch.empty_like(x)
    if x.numel() == 0:
        return grad_x
    _launch(_gated_act_backward_kernel, (grad_out.to(x.dtype).contiguous(), x, x if bias is None else bias, grad_x),
            x, bias, activation)
    return grad_x
