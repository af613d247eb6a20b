"""GroupNorm + activation (+ add, FiLM, residual) in Triton, forward and backward,
NCHW and channels_last through strides.

Memory traffic for x of N·C·S elements of s bytes (s = 4 for fp32); per-(n, c)
vectors and per-(n, group) statistics are a rounding error beside it:

| op | eager torch (nn.GroupNorm, F.silu, + residual) | this file |
| --- | --- | --- |
| forward | norm R+W (statistics are a second R on the GPU), silu R+W, add 2R+W: 5-8 passes | read x, write out: 2Ns (+ Ns residual); groups over 64K elements read x twice: 3Ns |
| backward | autograd of the three: about 10 passes | read grad_out and x, write grad_x: 3Ns; groups over 64K: 5Ns |
| batch norm (eval) + act | batch_norm R+W, act R+W: 4Ns | read x, write out: 2Ns |
| conv epilogue: act((y + bias + res) * s) | up to four passes of 2-3 each: 8-11Ns | read y and res, write out: 3Ns |

Forward, by the size of a group (``_one_program_tiling``, shapes only, no host sync):

- Groups of up to ``GROUP_ONE_PROGRAM`` elements (every group of SD's UNet at
  64x64 and below): one launch, ``_group_norm_act_one_program_kernel``, one
  program per (n, group). A group that fits one register tile of
  ``GROUP_TILE`` lanes is read once and its variance taken exactly in two
  passes over the registers; a larger one is read in tiles along S with
  per-lane Welford moments, then read again (from L2: this program has just
  read it) to write the output. DRAM traffic 2Ns (+ Ns residual), the least
  there is.
- Larger groups, three launches:

1. ``_channel_moments_kernel``, grid (N, C blocks, S splits): per-channel mean
   and M2 over a slice of the spatial positions, by tiles of
   [BLOCK_C, BLOCK_S] merged with Chan's formula (exact in fp32: no
   E[x^2] - E[x]^2 cancellation). Splitting S keeps the GPU full when N·C is
   small, e.g. a VAE decoder's (1, 512, 256, 256).
2. ``_group_finalize_kernel``, one program per (n, group): the group's mean
   and rstd from the channel moments, then the folded per-(n, c)
   coefficients of y = (x + d) * a + b (weight, bias, add and FiLM inside).
3. ``_apply_kernel``: elementwise over x in memory order (tiles of rows of
   the contiguous axis: ``_elementwise_tile``), activation and residual fused.

Host work per forward call (``group_norm_act``): weight, bias, add and
scale_shift reach the kernels in their own dtype and are converted in
registers (``_load_f32``; the Python layer casts them only for the C++
backend), absent ones are replaced by x's pointer, not a dummy allocation.
One-program path: 2 allocations (out; mean and rstd in one buffer), 1 launch.
Three-kernel path: 4 allocations (out, statistics, channel moments,
coefficients), 3 launches.

Per-channel affine + activation (``_channel_affine_act_kernel``, batch_norm_act in
eval mode and the conv2d_act epilogue) is the apply pass alone, with (C,)
coefficients: ``out = act((x + res) * scale[c] + shift[c])``.

The backward has the same shape: per-channel sums of dy, dy·(h - mean) and
(h - mean), a per-group finalize to coefficients P, Q, R of
grad_h = dy·P + (h - mean)·Q + R, and an elementwise pass. For groups of up to
``GROUP_ONE_PROGRAM`` elements all of it is one program per (n, group)
(``_group_norm_act_backward_one_program_kernel``): DRAM traffic 3Ns (read x
and grad_out, write grad_x), one launch, plus one sum over the images of the
per-image weight and bias gradients when N > 1; 4 allocations (grad_x,
grad_add, grad_scale_shift, the per-image parts; +1 for the sum). Larger
groups: the coefficient kernel, the sums, the group finalize and the
elementwise pass, 4 launches (+1 sum), 3 more allocations. No buffer is
zero-filled: the kernels write every element.

Accuracy: exp, division and square root are the IEEE/libdevice ones
(``kernels/common.py``), not the GPU's approximate instructions: a mean or an
rstd scales a whole group, so a few ulp there showed up as a whole training
step's error above twice eager's.

Measured on an H200 (2026-11-27, profiler): the one-program forward at the
SD UNet shape 2x320x64x64 takes 12.8 us in bf16 (eager's four kernels 31 us;
the 2 x 5.2 MB read and write at the copy rate would take 2.5 us: one program
per group leaves most SMs idle at 64 groups); 35 us channels_last; forward +
backward in fp32 53 us (eager 70 us). Target: >= 70% of copy bandwidth at
large shapes, counting one read of x and one write.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import cdiv, div, exp, next_pow2, rsqrt

ACT_CODES = {"none": 0, "silu": 1, "gelu": 2, "relu": 3, "leaky_relu": 4}
APPLY_BLOCK = 2048
NUM_WARPS = 8
# Tile of the moments kernels: 4096 elements, the contiguous axis at least 32 wide.
TILE = 4096
# Programs to aim for when S is split: enough to fill a large GPU a few times over.
TARGET_PROGRAMS = 1024
# Groups of at most this many elements take the one-program-per-(n, group) kernels:
# one launch instead of three (four in the backward), a group's x read from DRAM
# once (again from L2 when it spans several tiles). 64K covers every group of SD's
# UNet at 64x64 and below (2x320x64x64, G = 32: 40960); above it a group is
# 128 KB or more of bf16 for one SM to stream alone, and the few (n, group) pairs
# of a VAE decoder (1x512x256x256: 32 groups of 2M) need the split moments
# kernel to fill the GPU. On an H200 the UNet's group took 20.8 us NCHW and 39.9 us channels_last
# (bf16, one launch; its rows of 10 channels are 20-byte reads), the VAE's split path 67.6 us.
GROUP_ONE_PROGRAM = 65536
# Register tile of those kernels (lanes): the moments kernels' TILE; a group that
# fits is read once and its variance taken in two passes over the registers.
GROUP_TILE = TILE
# Partial sums per channel that the BatchNorm backward's per-channel kernel reduces at once
# (images x splits): one program holds them in registers.
MAX_PARTS = 1024


@triton.jit
def _activate(y, slope, ACT: tl.constexpr):
    if ACT == 1:
        return div(y, 1.0 + exp(-y))
    elif ACT == 2:
        return 0.5 * y * (1.0 + tl.math.erf(y * 0.7071067811865476))
    elif ACT == 3:
        # where(y > 0) would map NaN to 0; F.relu keeps it
        return tl.where(y < 0.0, 0.0, y)
    elif ACT == 4:
        return tl.where(y > 0.0, y, y * slope)
    else:
        return y


@triton.jit
def _activate_grad(y, slope, ACT: tl.constexpr):
    if ACT == 1:
        s = div(1.0, 1.0 + exp(-y))
        return s * (1.0 + y * (1.0 - s))
    elif ACT == 2:
        cdf = 0.5 * (1.0 + tl.math.erf(y * 0.7071067811865476))
        return cdf + y * exp(-0.5 * y * y) * 0.3989422804014327
    elif ACT == 3:
        return tl.where(y > 0.0, 1.0, 0.0)
    elif ACT == 4:
        return tl.where(y > 0.0, 1.0, slope)
    else:
        return tl.full(y.shape, 1.0, tl.float32)


@triton.jit
def _centered_dy(x_ptr, g_ptr, off, mask, d, a, b, slope, ACT: tl.constexpr):
    """(x + d, grad_out * act'(y)) at off, both 0 where masked: the terms of the backward's sums."""
    xc = tl.where(mask, tl.load(x_ptr + off, mask=mask, other=0.0).to(tl.float32) + d, 0.0)
    return xc, tl.load(g_ptr + off, mask=mask, other=0.0).to(tl.float32) * _activate_grad(xc * a + b, slope, ACT)


@triton.jit
def _tile(n, c, s, C, S, s_end, CHANNELS_LAST: tl.constexpr):
    """Offsets and mask (s < s_end) of the [BLOCK_C, BLOCK_S] tile (n, c[:, None], s[None, :])."""
    mask = (c[:, None] < C) & (s[None, :] < s_end)
    n64 = n.to(tl.int64)
    if CHANNELS_LAST:
        off = n64 * S * C + s[None, :].to(tl.int64) * C + c[:, None]
    else:
        off = (n64 * C + c[:, None]) * S + s[None, :]
    return off, mask


@triton.jit
def _channel_moments_kernel(x_ptr, mean_ptr, m2_ptr, C, S, s_per_split, splits,
                            CHANNELS_LAST: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    """Per (n, c, split): mean and M2 of x[n, c, the split's range of s].

    Each lane of the tile keeps its own Welford mean and M2 (the k-th tile updates
    every lane by 1/k; only the last tile can be partial) and the lanes are merged once
    at the end (Chan): no cross-warp reduction inside the loop, so successive tiles'
    loads overlap. On an H200 (bf16, 1x512x256x256, channels_last) this and the
    32x128 tiles of ``_tiling`` took the kernel from 163 to 40 us (412 -> 1683 GB/s);
    NCHW stays at ~34 us (~1950 GB/s)."""
    n, cb, sp = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    s_begin = sp * s_per_split
    s_end = tl.minimum(s_begin + s_per_split, S)
    mean = tl.zeros([BLOCK_C, BLOCK_S], tl.float32)
    m2 = tl.zeros([BLOCK_C, BLOCK_S], tl.float32)
    k = 0.0
    for s0 in range(s_begin, s_end, BLOCK_S):
        k += 1.0
        inv = div(1.0, k)
        s = s0 + tl.arange(0, BLOCK_S)
        off, mask = _tile(n, c, s, C, S, s_end, CHANNELS_LAST)
        v = tl.load(x_ptr + off, mask=mask, other=0.0).to(tl.float32)
        delta = v - mean
        mean = tl.where(mask, mean + delta * inv, mean)
        m2 = tl.where(mask, m2 + delta * (v - mean), m2)
    j = tl.arange(0, BLOCK_S)
    lane_count = tl.maximum((s_end - s_begin - j + BLOCK_S - 1) // BLOCK_S, 0).to(tl.float32)
    cmean = div(tl.sum(mean * lane_count[None, :], axis=1), (s_end - s_begin).to(tl.float32))
    dev = mean - cmean[:, None]
    cm2 = tl.sum(m2 + lane_count[None, :] * dev * dev, axis=1)
    out = (n * C + c) * splits + sp
    tl.store(mean_ptr + out, cmean, mask=c < C)
    tl.store(m2_ptr + out, cm2, mask=c < C)


@triton.jit
def _load_f32(ptr, mask, other):
    """A parameter in its own dtype (fp32, fp16, bf16, fp64), converted in registers:
    the Python layer passes weight, bias, add and scale_shift uncast."""
    return tl.load(ptr, mask=mask, other=other).to(tl.float32)


@triton.jit
def _fold(n, c, cmask, C, mean, rstd, w_ptr, b_ptr, add_ptr, ss_ptr,
          HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_ADD: tl.constexpr, HAS_SS: tl.constexpr):
    """(a, d, b) of y = (x + d) * a + b for channels c of image n, and (w, 1 + scale)."""
    w = _load_f32(w_ptr + c, cmask, 1.0) if HAS_W else tl.full(c.shape, 1.0, tl.float32)
    bias = _load_f32(b_ptr + c, cmask, 0.0) if HAS_B else tl.zeros(c.shape, tl.float32)
    add = _load_f32(add_ptr + n * C + c, cmask, 0.0) if HAS_ADD else tl.zeros(c.shape, tl.float32)
    if HAS_SS:
        scale1 = 1.0 + _load_f32(ss_ptr + n * 2 * C + c, cmask, 0.0)
        shift = _load_f32(ss_ptr + n * 2 * C + C + c, cmask, 0.0)
    else:
        scale1 = tl.full(c.shape, 1.0, tl.float32)
        shift = tl.zeros(c.shape, tl.float32)
    return rstd * w * scale1, add - mean, bias * scale1 + shift, w, scale1


@triton.jit
def _store_coefficients(n, g, C, Cg, mean, rstd, w_ptr, b_ptr, add_ptr, ss_ptr, a_ptr, d_ptr, bb_ptr,
                        HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_ADD: tl.constexpr, HAS_SS: tl.constexpr,
                        BLOCK: tl.constexpr):
    """Group g of sample n: the folded per-channel coefficients a, d, b from its mean and rstd."""
    for c0 in range(0, Cg, BLOCK):
        c = g * Cg + c0 + tl.arange(0, BLOCK)
        cm = c < (g + 1) * Cg
        a, d, b, _, _ = _fold(n, c, cm, C, mean, rstd, w_ptr, b_ptr, add_ptr, ss_ptr, HAS_W, HAS_B, HAS_ADD, HAS_SS)
        tl.store(a_ptr + n * C + c, a, mask=cm)
        tl.store(d_ptr + n * C + c, d, mask=cm)
        tl.store(bb_ptr + n * C + c, b, mask=cm)


@triton.jit
def _group_finalize_kernel(cmean_ptr, cm2_ptr, w_ptr, b_ptr, add_ptr, ss_ptr, mean_ptr, rstd_ptr, a_ptr, d_ptr,
                           bb_ptr, C, S, G, Cg, s_per_split, splits, eps,
                           HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_ADD: tl.constexpr, HAS_SS: tl.constexpr,
                           BLOCK: tl.constexpr):
    ng = tl.program_id(0)
    n, g = ng // G, ng % G
    total = Cg * splits
    base = (n * C + g * Cg) * splits  # the group's (channel, split) moments are contiguous
    # Exact two-level merge: the group mean first, then M2 about it.
    acc = tl.zeros([BLOCK], tl.float32)
    for i0 in range(0, total, BLOCK):
        i = i0 + tl.arange(0, BLOCK)
        m = i < total
        sp = i % splits
        cnt = tl.minimum(S - sp * s_per_split, s_per_split).to(tl.float32)
        add = _load_f32(add_ptr + n * C + g * Cg + i // splits, m, 0.0) if HAS_ADD else 0.0
        acc += tl.where(m, cnt * (tl.load(cmean_ptr + base + i, mask=m, other=0.0) + add), 0.0)
    count = (Cg * S).to(tl.float32)
    mean = div(tl.sum(acc, axis=0), count)
    acc = tl.zeros([BLOCK], tl.float32)
    for i0 in range(0, total, BLOCK):
        i = i0 + tl.arange(0, BLOCK)
        m = i < total
        sp = i % splits
        cnt = tl.minimum(S - sp * s_per_split, s_per_split).to(tl.float32)
        add = _load_f32(add_ptr + n * C + g * Cg + i // splits, m, 0.0) if HAS_ADD else 0.0
        dev = tl.load(cmean_ptr + base + i, mask=m, other=0.0) + add - mean
        acc += tl.where(m, tl.load(cm2_ptr + base + i, mask=m, other=0.0) + cnt * dev * dev, 0.0)
    rstd = rsqrt(div(tl.sum(acc, axis=0), count) + eps)
    tl.store(mean_ptr + ng, mean)
    tl.store(rstd_ptr + ng, rstd)
    _store_coefficients(n, g, C, Cg, mean, rstd, w_ptr, b_ptr, add_ptr, ss_ptr, a_ptr, d_ptr, bb_ptr,
                        HAS_W, HAS_B, HAS_ADD, HAS_SS, BLOCK)


@triton.jit
def _coef_kernel(mean_ptr, rstd_ptr, w_ptr, b_ptr, add_ptr, ss_ptr, a_ptr, d_ptr, bb_ptr, C, G, Cg,
                 HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_ADD: tl.constexpr, HAS_SS: tl.constexpr,
                 BLOCK: tl.constexpr):
    """The forward's folded coefficients again, from the saved mean and rstd."""
    ng = tl.program_id(0)
    n, g = ng // G, ng % G
    mean, rstd = tl.load(mean_ptr + ng), tl.load(rstd_ptr + ng)
    _store_coefficients(n, g, C, Cg, mean, rstd, w_ptr, b_ptr, add_ptr, ss_ptr, a_ptr, d_ptr, bb_ptr,
                        HAS_W, HAS_B, HAS_ADD, HAS_SS, BLOCK)


@triton.jit
def _group_tile(n, g, Cg, C, S, s0, CHANNELS_LAST: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    """Offsets and mask of the [BLOCK_C, BLOCK_S] tile of group g of image n at positions s0 + [0, BLOCK_S)."""
    c = g * Cg + tl.arange(0, BLOCK_C)
    s = s0 + tl.arange(0, BLOCK_S)
    off, _ = _tile(n, c, s, C, S, S, CHANNELS_LAST)
    return off, (c[:, None] < (g + 1) * Cg) & (s[None, :] < S)


@triton.jit
def _group_norm_act_one_program_kernel(x_ptr, res_ptr, out_ptr, w_ptr, b_ptr, add_ptr, ss_ptr, mean_ptr, rstd_ptr,
                                       C, S, G, Cg, eps, slope,
                                       CHANNELS_LAST: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
                                       HAS_ADD: tl.constexpr, HAS_SS: tl.constexpr, HAS_RES: tl.constexpr,
                                       ACT: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
                                       ONE_TILE: tl.constexpr):
    """The whole forward of one (n, group) in one program: statistics, then the
    normalized, activated output. ONE_TILE: the group is one register tile, read
    once, with an exact two-pass variance on the registers. Otherwise the tiles
    along S are read twice, the second time from L2 (this program has just read
    them): per-lane Welford moments merged once at the end, as in
    ``_channel_moments_kernel``, then the apply pass."""
    ng = tl.program_id(0)
    n, g = ng // G, ng % G
    c = g * Cg + tl.arange(0, BLOCK_C)
    cm = c < (g + 1) * Cg
    count = (Cg * S).to(tl.float32)
    add = _load_f32(add_ptr + n * C + c, cm, 0.0)[:, None] if HAS_ADD else 0.0
    if ONE_TILE:
        off, mask = _group_tile(n, g, Cg, C, S, 0, CHANNELS_LAST, BLOCK_C, BLOCK_S)
        h = tl.where(mask, tl.load(x_ptr + off, mask=mask, other=0.0).to(tl.float32) + add, 0.0)
        mean = div(tl.sum(tl.sum(h, axis=1), axis=0), count)
        dev = tl.where(mask, h - mean, 0.0)
        rstd = rsqrt(div(tl.sum(tl.sum(dev * dev, axis=1), axis=0), count) + eps)
    else:
        wmean = tl.zeros([BLOCK_C, BLOCK_S], tl.float32)
        wm2 = tl.zeros([BLOCK_C, BLOCK_S], tl.float32)
        k = 0.0
        for s0 in range(0, S, BLOCK_S):
            k += 1.0
            inv = div(1.0, k)
            off, mask = _group_tile(n, g, Cg, C, S, s0, CHANNELS_LAST, BLOCK_C, BLOCK_S)
            v = tl.load(x_ptr + off, mask=mask, other=0.0).to(tl.float32) + add
            delta = v - wmean
            wmean = tl.where(mask, wmean + delta * inv, wmean)
            wm2 = tl.where(mask, wm2 + delta * (v - wmean), wm2)
        # Lanes of column j saw ceil((S - j) / BLOCK_S) positions; padding rows saw none.
        j = tl.arange(0, BLOCK_S)
        lane_count = tl.where(cm[:, None], tl.maximum((S - j + BLOCK_S - 1) // BLOCK_S, 0)[None, :], 0).to(tl.float32)
        mean = div(tl.sum(tl.sum(wmean * lane_count, axis=1), axis=0), count)
        ldev = wmean - mean
        m2 = tl.sum(tl.sum(tl.where(lane_count > 0.0, wm2 + lane_count * ldev * ldev, 0.0), axis=1), axis=0)
        rstd = rsqrt(div(m2, count) + eps)
    tl.store(mean_ptr + ng, mean)
    tl.store(rstd_ptr + ng, rstd)
    a, d, b, _, _ = _fold(n, c, cm, C, mean, rstd, w_ptr, b_ptr, add_ptr, ss_ptr, HAS_W, HAS_B, HAS_ADD, HAS_SS)
    if ONE_TILE:
        y = _activate(dev * a[:, None] + b[:, None], slope, ACT)
        if HAS_RES:
            y += tl.load(res_ptr + off, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + off, y.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        for s0 in range(0, S, BLOCK_S):
            off, mask = _group_tile(n, g, Cg, C, S, s0, CHANNELS_LAST, BLOCK_C, BLOCK_S)
            xv = tl.load(x_ptr + off, mask=mask, other=0.0).to(tl.float32)
            y = _activate((xv + d[:, None]) * a[:, None] + b[:, None], slope, ACT)
            if HAS_RES:
                y += tl.load(res_ptr + off, mask=mask, other=0.0).to(tl.float32)
            tl.store(out_ptr + off, y.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _group_norm_act_backward_one_program_kernel(
        x_ptr, g_ptr, gx_ptr, w_ptr, b_ptr, add_ptr, ss_ptr, mean_ptr, rstd_ptr, gadd_ptr, gss_ptr, gw_ptr, gb_ptr,
        C, S, G, Cg, slope,
        CHANNELS_LAST: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_ADD: tl.constexpr,
        HAS_SS: tl.constexpr, ACT: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
        ONE_TILE: tl.constexpr):
    """The whole backward of one (n, group) in one program: the per-channel sums of
    dy, dy * (h - mean) and (h - mean) (``_channel_sums_kernel``), the group's
    coefficients (``_group_backward_kernel``), then grad_x (``_grad_apply_kernel``).
    ONE_TILE keeps x and grad_out in registers (one read); otherwise both are read
    twice, the second time from L2."""
    ng = tl.program_id(0)
    n, g = ng // G, ng % G
    c = g * Cg + tl.arange(0, BLOCK_C)
    cm = c < (g + 1) * Cg
    mean, rstd = tl.load(mean_ptr + ng), tl.load(rstd_ptr + ng)
    a, d, b, w, scale1 = _fold(n, c, cm, C, mean, rstd, w_ptr, b_ptr, add_ptr, ss_ptr, HAS_W, HAS_B, HAS_ADD,
                               HAS_SS)
    a, d, b = a[:, None], d[:, None], b[:, None]
    if ONE_TILE:
        off, mask = _group_tile(n, g, Cg, C, S, 0, CHANNELS_LAST, BLOCK_C, BLOCK_S)
        xc, dy = _centered_dy(x_ptr, g_ptr, off, mask, d, a, b, slope, ACT)
        S1 = tl.sum(dy, axis=1)
        S2 = tl.sum(dy * xc, axis=1) * rstd
        S3 = tl.sum(xc, axis=1) * rstd
    else:
        acc1 = tl.zeros([BLOCK_C, BLOCK_S], tl.float32)
        acc2 = tl.zeros([BLOCK_C, BLOCK_S], tl.float32)
        acc3 = tl.zeros([BLOCK_C, BLOCK_S], tl.float32)
        for s0 in range(0, S, BLOCK_S):
            off, mask = _group_tile(n, g, Cg, C, S, s0, CHANNELS_LAST, BLOCK_C, BLOCK_S)
            xc, dy = _centered_dy(x_ptr, g_ptr, off, mask, d, a, b, slope, ACT)
            acc1 += dy
            acc2 += dy * xc
            acc3 += xc
        S1 = tl.sum(acc1, axis=1)
        S2 = tl.sum(acc2, axis=1) * rstd
        S3 = tl.sum(acc3, axis=1) * rstd
    k = w * scale1
    count = (Cg * S).to(tl.float32)
    m1 = div(tl.sum(tl.where(cm, k * S1, 0.0), axis=0), count)
    m2 = div(tl.sum(tl.where(cm, k * S2, 0.0), axis=0), count)
    bias = _load_f32(b_ptr + c, cm, 0.0) if HAS_B else tl.zeros(c.shape, tl.float32)
    nc = n * C + c
    tl.store(gadd_ptr + nc, rstd * (k * S1 - S * m1 - m2 * S3), mask=cm)
    tl.store(gss_ptr + n * 2 * C + c, w * S2 + bias * S1, mask=cm)
    tl.store(gss_ptr + n * 2 * C + C + c, S1, mask=cm)
    tl.store(gw_ptr + nc, scale1 * S2, mask=cm)
    tl.store(gb_ptr + nc, scale1 * S1, mask=cm)
    # grad_h = dy * P + (h - mean) * Q + R
    p = (rstd * k)[:, None]
    q = -rstd * rstd * m2
    r = -rstd * m1
    if ONE_TILE:
        tl.store(gx_ptr + off, (dy * p + xc * q + r).to(gx_ptr.dtype.element_ty), mask=mask)
    else:
        for s0 in range(0, S, BLOCK_S):
            off, mask = _group_tile(n, g, Cg, C, S, s0, CHANNELS_LAST, BLOCK_C, BLOCK_S)
            xc, dy = _centered_dy(x_ptr, g_ptr, off, mask, d, a, b, slope, ACT)
            tl.store(gx_ptr + off, (dy * p + xc * q + r).to(gx_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _bn_finalize_kernel(cmean_ptr, cm2_ptr, w_ptr, b_ptr, mean_ptr, rstd_ptr, var_ptr, a_ptr, d_ptr, bb_ptr,
                        N, C, S, s_per_split, splits, eps,
                        HAS_W: tl.constexpr, HAS_B: tl.constexpr, BLOCK: tl.constexpr):
    """Batch norm, one program per channel: mean, rstd and biased variance from the
    (n, split) moments, and the folded coefficients of y = (x + d) * a + b for every n."""
    c = tl.program_id(0)
    total = N * splits
    # Exact two-level merge, as for a group: the channel mean first, then M2 about it.
    acc = tl.zeros([BLOCK], tl.float32)
    for i0 in range(0, total, BLOCK):
        i = i0 + tl.arange(0, BLOCK)
        m = i < total
        cnt = tl.minimum(S - (i % splits) * s_per_split, s_per_split).to(tl.float32)
        acc += tl.where(m, cnt * tl.load(cmean_ptr + (i // splits * C + c) * splits + i % splits, mask=m, other=0.0),
                        0.0)
    count = (N * S).to(tl.float32)
    mean = div(tl.sum(acc, axis=0), count)
    acc = tl.zeros([BLOCK], tl.float32)
    for i0 in range(0, total, BLOCK):
        i = i0 + tl.arange(0, BLOCK)
        m = i < total
        cnt = tl.minimum(S - (i % splits) * s_per_split, s_per_split).to(tl.float32)
        off = (i // splits * C + c) * splits + i % splits
        dev = tl.load(cmean_ptr + off, mask=m, other=0.0) - mean
        acc += tl.where(m, tl.load(cm2_ptr + off, mask=m, other=0.0) + cnt * dev * dev, 0.0)
    var = div(tl.sum(acc, axis=0), count)
    rstd = rsqrt(var + eps)
    tl.store(mean_ptr + c, mean)
    tl.store(rstd_ptr + c, rstd)
    tl.store(var_ptr + c, var)
    w = tl.load(w_ptr + c).to(tl.float32) if HAS_W else 1.0
    bias = tl.load(b_ptr + c).to(tl.float32) if HAS_B else 0.0
    for n0 in range(0, N, BLOCK):
        n = n0 + tl.arange(0, BLOCK)
        m = n < N
        tl.store(a_ptr + n * C + c, tl.zeros([BLOCK], tl.float32) + rstd * w, mask=m)
        tl.store(d_ptr + n * C + c, tl.zeros([BLOCK], tl.float32) - mean, mask=m)
        tl.store(bb_ptr + n * C + c, tl.zeros([BLOCK], tl.float32) + bias, mask=m)


@triton.jit
def _elementwise_tile(C, S, rows, CHANNELS_LAST: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    """A [BLOCK_R, BLOCK_K] tile of a (N, C, S) tensor in memory order: flat indices, the (n * C + c)
    index of each element's channel and its channel c (both broadcastable to the tile), the mask and
    the channel index's mask. NCHW rows are (n, c) pairs over S positions, channels_last rows are
    (n, s) positions over C channels: one integer division per row and, for NCHW, the per-channel
    coefficients loaded once per row. The flat-indexed version before it gathered them per element
    (24 scalar loads per thread of an NCHW tile, and a 64-bit division and two remainders of a
    channels_last one, in its sm_90 PTX) and took 0.266 ms on an H200 for a VAE decoder's
    GroupNorm+SiLU (1x512x256x256 bf16: 25% of the copy rate; torch.compile 0.127 ms). This version:
    0.140 ms, the apply kernel 39.3 us (3.4 TB/s), the moments kernel 25.8 us (same H200, later run)."""
    r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    if CHANNELS_LAST:
        idx = r[:, None] * C + k[None, :]
        mask = (r < rows)[:, None] & (k < C)[None, :]
        nc = (r // S)[:, None] * C + k[None, :]
        c = k[None, :]
        nc_mask = mask
    else:
        idx = r[:, None] * S + k[None, :]
        mask = (r < rows)[:, None] & (k < S)[None, :]
        nc = r[:, None]
        c = (r % C)[:, None]
        nc_mask = (r < rows)[:, None]
    return idx, nc, c, mask, nc_mask


@triton.jit
def _apply_kernel(x_ptr, res_ptr, out_ptr, a_ptr, d_ptr, b_ptr, rows, C, S, slope,
                  CHANNELS_LAST: tl.constexpr, HAS_RES: tl.constexpr, ACT: tl.constexpr, BLOCK_R: tl.constexpr,
                  BLOCK_K: tl.constexpr):
    idx, nc, _, mask, nc_mask = _elementwise_tile(C, S, rows, CHANNELS_LAST, BLOCK_R, BLOCK_K)
    a = tl.load(a_ptr + nc, mask=nc_mask, other=0.0)
    d = tl.load(d_ptr + nc, mask=nc_mask, other=0.0)
    b = tl.load(b_ptr + nc, mask=nc_mask, other=0.0)
    x = tl.load(x_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    y = _activate((x + d) * a + b, slope, ACT)
    if HAS_RES:
        y += tl.load(res_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + idx, y.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _channel_affine_act_kernel(x_ptr, res_ptr, out_ptr, a_ptr, b_ptr, rows, C, S, slope,
                               CHANNELS_LAST: tl.constexpr, HAS_RES: tl.constexpr, ACT: tl.constexpr,
                               BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    """out = act((x + res) * a[c] + b[c]): batch_norm_act in eval mode, the conv2d_act epilogue."""
    idx, _, c, mask, c_mask = _elementwise_tile(C, S, rows, CHANNELS_LAST, BLOCK_R, BLOCK_K)
    a = tl.load(a_ptr + c, mask=c_mask, other=0.0)
    b = tl.load(b_ptr + c, mask=c_mask, other=0.0)
    h = tl.load(x_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    if HAS_RES:
        h += tl.load(res_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    y = _activate(h * a + b, slope, ACT)
    tl.store(out_ptr + idx, y.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _channel_sums_kernel(x_ptr, g_ptr, a_ptr, d_ptr, b_ptr, s1_ptr, s2_ptr, s3_ptr, C, S, s_per_split, splits, slope,
                         coef_n_stride, out_n_stride, out_c_stride, CHANNELS_LAST: tl.constexpr, ACT: tl.constexpr,
                         BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    """Per (n, c, split): sums of dy, dy * (h - mean) and (h - mean), stored at n * out_n_stride +
    c * out_c_stride + split; the coefficients (a, d, b) at n * coef_n_stride + c (0: per channel)."""
    n, cb, sp = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    cm = c < C
    a = tl.load(a_ptr + n * coef_n_stride + c, mask=cm, other=0.0)[:, None]
    d = tl.load(d_ptr + n * coef_n_stride + c, mask=cm, other=0.0)[:, None]
    b = tl.load(b_ptr + n * coef_n_stride + c, mask=cm, other=0.0)[:, None]
    s_begin = sp * s_per_split
    s_end = tl.minimum(s_begin + s_per_split, S)
    acc1 = tl.zeros([BLOCK_C, BLOCK_S], tl.float32)
    acc2 = tl.zeros([BLOCK_C, BLOCK_S], tl.float32)
    acc3 = tl.zeros([BLOCK_C, BLOCK_S], tl.float32)
    for s0 in range(s_begin, s_end, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        off, mask = _tile(n, c, s, C, S, s_end, CHANNELS_LAST)
        xc, dy = _centered_dy(x_ptr, g_ptr, off, mask, d, a, b, slope, ACT)
        acc1 += dy
        acc2 += dy * xc
        acc3 += xc
    out = n * out_n_stride + c * out_c_stride + sp
    tl.store(s1_ptr + out, tl.sum(acc1, axis=1), mask=cm)
    tl.store(s2_ptr + out, tl.sum(acc2, axis=1), mask=cm)
    tl.store(s3_ptr + out, tl.sum(acc3, axis=1), mask=cm)


@triton.jit
def _group_backward_kernel(s1_ptr, s2_ptr, s3_ptr, rstd_ptr, w_ptr, b_ptr, ss_ptr, p_ptr, q_ptr, r_ptr,
                           gadd_ptr, gss_ptr, gw_ptr, gb_ptr, C, S, G, Cg, splits,
                           HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_SS: tl.constexpr, BLOCK: tl.constexpr,
                           SPLITS_P2: tl.constexpr):
    """Per (n, group): the coefficients of grad_h and the per-(n, c) gradients."""
    ng = tl.program_id(0)
    n, g = ng // G, ng % G
    rstd = tl.load(rstd_ptr + ng)
    count = (Cg * S).to(tl.float32)
    sd = tl.zeros([BLOCK], tl.float32)
    sdx = tl.zeros([BLOCK], tl.float32)
    j = tl.arange(0, SPLITS_P2)
    for c0 in range(0, Cg, BLOCK):
        c = g * Cg + c0 + tl.arange(0, BLOCK)
        cm = c < (g + 1) * Cg
        m2d = cm[:, None] & (j[None, :] < splits)
        off = (n * C + c[:, None]) * splits + j[None, :]
        S1 = tl.sum(tl.load(s1_ptr + off, mask=m2d, other=0.0), axis=1)
        S2 = tl.sum(tl.load(s2_ptr + off, mask=m2d, other=0.0), axis=1) * rstd
        _, _, _, w, scale1 = _fold(n, c, cm, C, 0.0, rstd, w_ptr, b_ptr, ss_ptr, ss_ptr, HAS_W, HAS_B, False, HAS_SS)
        k = w * scale1
        sd += tl.where(cm, k * S1, 0.0)
        sdx += tl.where(cm, k * S2, 0.0)
    m1 = div(tl.sum(sd, axis=0), count)
    m2 = div(tl.sum(sdx, axis=0), count)
    for c0 in range(0, Cg, BLOCK):
        c = g * Cg + c0 + tl.arange(0, BLOCK)
        cm = c < (g + 1) * Cg
        m2d = cm[:, None] & (j[None, :] < splits)
        off = (n * C + c[:, None]) * splits + j[None, :]
        S1 = tl.sum(tl.load(s1_ptr + off, mask=m2d, other=0.0), axis=1)
        S2 = tl.sum(tl.load(s2_ptr + off, mask=m2d, other=0.0), axis=1) * rstd
        S3 = tl.sum(tl.load(s3_ptr + off, mask=m2d, other=0.0), axis=1) * rstd
        _, _, _, w, scale1 = _fold(n, c, cm, C, 0.0, rstd, w_ptr, b_ptr, ss_ptr, ss_ptr, HAS_W, HAS_B, False, HAS_SS)
        bias = _load_f32(b_ptr + c, cm, 0.0) if HAS_B else tl.zeros(c.shape, tl.float32)
        k = w * scale1
        nc = n * C + c
        tl.store(p_ptr + nc, rstd * k, mask=cm)
        tl.store(q_ptr + nc, tl.zeros(c.shape, tl.float32) - rstd * rstd * m2, mask=cm)
        tl.store(r_ptr + nc, tl.zeros(c.shape, tl.float32) - rstd * m1, mask=cm)
        tl.store(gadd_ptr + nc, rstd * (k * S1 - S * m1 - m2 * S3), mask=cm)
        tl.store(gss_ptr + n * 2 * C + c, w * S2 + bias * S1, mask=cm)
        tl.store(gss_ptr + n * 2 * C + C + c, S1, mask=cm)
        tl.store(gw_ptr + nc, scale1 * S2, mask=cm)
        tl.store(gb_ptr + nc, scale1 * S1, mask=cm)


@triton.jit
def _grad_apply_kernel(x_ptr, g_ptr, gx_ptr, a_ptr, d_ptr, b_ptr, p_ptr, q_ptr, r_ptr, rows, C, S, slope,
                       CHANNELS_LAST: tl.constexpr, ACT: tl.constexpr, PER_CHANNEL: tl.constexpr,
                       BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    """grad_x from the per-(n, c) coefficients (PER_CHANNEL: per channel, batch norm's)."""
    idx, nc, c, mask, nc_mask = _elementwise_tile(C, S, rows, CHANNELS_LAST, BLOCK_R, BLOCK_K)
    if PER_CHANNEL:
        nc = c
    a = tl.load(a_ptr + nc, mask=nc_mask, other=0.0)
    d = tl.load(d_ptr + nc, mask=nc_mask, other=0.0)
    b = tl.load(b_ptr + nc, mask=nc_mask, other=0.0)
    xc, dy = _centered_dy(x_ptr, g_ptr, idx, mask, d, a, b, slope, ACT)
    gx = dy * tl.load(p_ptr + nc, mask=nc_mask, other=0.0) + xc * tl.load(q_ptr + nc, mask=nc_mask, other=0.0) \
        + tl.load(r_ptr + nc, mask=nc_mask, other=0.0)
    tl.store(gx_ptr + idx, gx.to(gx_ptr.dtype.element_ty), mask=mask)


# ---- launchers (argument order = the op schemas in genfast/conv.py) ----------

def _layout(x: torch.Tensor):
    """(N, C, S, channels_last): after the Python layer x is contiguous or channels_last(_3d)."""
    n, c = x.shape[:2]
    s = x.numel() // max(n * c, 1)
    return n, c, s, not x.is_contiguous()


def _tiling(n, c, s, channels_last):
    """(BLOCK_C, BLOCK_S, splits, s_per_split) for the moments and sums kernels."""
    p2 = next_pow2
    if channels_last:  # channels are contiguous: 32 wide (64-128 B rows) x 128 positions measured best
        block_c = min(p2(c), 32)
        block_s = min(p2(s), max(TILE // block_c, 1))
    else:
        block_s = min(p2(s), 1024)
        block_c = min(p2(c), max(TILE // block_s, 1))
    programs = n * cdiv(c, block_c)
    splits = max(1, min(cdiv(TARGET_PROGRAMS, programs), cdiv(s, block_s)))
    s_per_split = cdiv(cdiv(s, splits), block_s) * block_s
    return block_c, block_s, cdiv(s, s_per_split), s_per_split


def _opt(t, x):
    """t, or x as a pointer the kernel never reads (its HAS_* flag is off): no allocation."""
    return t if t is not None else x


def _flags(weight, bias, add, scale_shift):
    return dict(HAS_W=weight is not None, HAS_B=bias is not None, HAS_ADD=add is not None,
                HAS_SS=scale_shift is not None)


def _one_program_tiling(cg, s):
    """(BLOCK_C, BLOCK_S, ONE_TILE) of the one-program-per-(n, group) kernels, or None
    when a group is too large for one program (more than GROUP_ONE_PROGRAM elements, or
    more than GROUP_TILE channels). Shapes only: no host sync."""
    block_c = next_pow2(cg)
    if cg * s > GROUP_ONE_PROGRAM or block_c > GROUP_TILE:
        return None
    block_s = min(next_pow2(s), GROUP_TILE // block_c)
    return block_c, block_s, block_s >= s


def _cblock(cg):
    return min(next_pow2(cg), 256)


def group_norm_act(x, num_groups, weight, bias, eps, activation, negative_slope, add, scale_shift, residual):
    return _group_norm_act_into(x, num_groups, weight, bias, eps, activation, negative_slope, add, scale_shift,
                                residual, torch.empty_like(x))


def group_norm_act_out(x, num_groups, weight, bias, eps, activation, negative_slope, add, scale_shift, residual,
                       out):
    """group_norm_act into out (x's shape, strides and dtype); returns (mean, rstd)."""
    return _group_norm_act_into(x, num_groups, weight, bias, eps, activation, negative_slope, add, scale_shift,
                                residual, out)[1:]


def _channel_moments(x, n, c, s, cl):
    """(mean, M2) per (n, c, split) of x, fp32 (n, c, splits), with (splits, s_per_split)."""
    block_c, block_s, splits, s_per_split = _tiling(n, c, s, cl)
    cmean, cm2 = x.new_empty((2, n, c, splits), dtype=torch.float32)
    _channel_moments_kernel[(n, cdiv(c, block_c), splits)](
        x, cmean, cm2, c, s, s_per_split, splits, CHANNELS_LAST=cl, BLOCK_C=block_c, BLOCK_S=block_s,
        num_warps=NUM_WARPS)
    return cmean, cm2, splits, s_per_split


def _elementwise_grid(x, c, s, cl):
    """(grid, rows, meta) of the elementwise kernels' [BLOCK_R, BLOCK_K] tiles (``_elementwise_tile``):
    APPLY_BLOCK elements each, the contiguous axis (S, or C for channels_last) as wide as it allows."""
    rows = x.numel() // max(c if cl else s, 1)
    cols = c if cl else s
    block_k = min(next_pow2(cols), APPLY_BLOCK)
    block_r = APPLY_BLOCK // block_k
    return (cdiv(rows, block_r), cdiv(cols, block_k)), rows, {"BLOCK_R": block_r, "BLOCK_K": block_k}


def _apply(x, residual, out, coef, c, s, cl, activation, negative_slope):
    """The norm's epilogue into out: the folded affine coef = (a, d, b) per (n, c), activation, residual."""
    grid, rows, meta = _elementwise_grid(x, c, s, cl)
    _apply_kernel[grid](
        x, residual if residual is not None else x, out, coef[0], coef[1], coef[2], rows, c, s, negative_slope,
        CHANNELS_LAST=cl, HAS_RES=residual is not None, ACT=ACT_CODES[activation], **meta, num_warps=NUM_WARPS)
    return out


def _grad_apply(x, g, grad_x, coef, back, c, s, cl, act, negative_slope, per_channel=False):
    grid, rows, meta = _elementwise_grid(x, c, s, cl)
    _grad_apply_kernel[grid](
        x, g, grad_x, coef[0], coef[1], coef[2], back[0], back[1], back[2], rows, c, s, negative_slope,
        CHANNELS_LAST=cl, ACT=act, PER_CHANNEL=per_channel, **meta, num_warps=NUM_WARPS)
    return grad_x


def _group_norm_act_into(x, num_groups, weight, bias, eps, activation, negative_slope, add, scale_shift, residual,
                         out):
    n, c, s, cl = _layout(x)
    # Outputs of their own (not views of one buffer): an op's outputs must not alias.
    mean = x.new_empty((n, num_groups), dtype=torch.float32)
    rstd = torch.empty_like(mean)
    if n * c == 0:
        return out, mean, rstd
    if s == 0:
        return out, mean.fill_(float("nan")), rstd.fill_(float("nan"))
    cg = c // num_groups
    flags = _flags(weight, bias, add, scale_shift)
    tiling = _one_program_tiling(cg, s)
    if tiling is not None:
        _group_norm_act_one_program_kernel[(n * num_groups,)](
            x, _opt(residual, x), out, _opt(weight, x), _opt(bias, x), _opt(add, x), _opt(scale_shift, x), mean,
            rstd, c, s, num_groups, cg, eps, negative_slope, CHANNELS_LAST=cl, **flags,
            HAS_RES=residual is not None, ACT=ACT_CODES[activation], BLOCK_C=tiling[0], BLOCK_S=tiling[1],
            ONE_TILE=tiling[2], num_warps=NUM_WARPS)
        return out, mean, rstd
    cmean, cm2, splits, s_per_split = _channel_moments(x, n, c, s, cl)
    coef = x.new_empty((3, n, c), dtype=torch.float32)
    _group_finalize_kernel[(n * num_groups,)](
        cmean, cm2, _opt(weight, x), _opt(bias, x), _opt(add, x), _opt(scale_shift, x), mean, rstd,
        coef[0], coef[1], coef[2], c, s, num_groups, cg, s_per_split, splits, eps,
        **flags, BLOCK=min(next_pow2(cg * splits), 1024),
        num_warps=4)
    _apply(x, residual, out, coef, c, s, cl, activation, negative_slope)
    return out, mean, rstd


def group_norm_act_backward(grad_out, x, num_groups, weight, bias, mean, rstd, activation, negative_slope, add,
                            scale_shift, out=None):
    # out (the forward's output) is for the C++ kernel's SiLU derivative; these kernels evaluate it.
    n, c, s, cl = _layout(x)
    grad_x = torch.empty_like(x)
    # Every element of these is written by the kernels (the groups cover every channel).
    grad_add = x.new_empty((n, c), dtype=torch.float32)
    grad_ss = x.new_empty((n, 2 * c), dtype=torch.float32)
    # Per-image parts of grad_weight and grad_bias, apart: an op's outputs may not alias.
    gw_parts, gb_parts = (x.new_empty((n, c), dtype=torch.float32) for _ in range(2))
    if n * c == 0 or s == 0:
        for t in (grad_x, grad_add, grad_ss, gw_parts, gb_parts):
            t.zero_()
        return grad_x, gw_parts.sum(0), gb_parts.sum(0), grad_add, grad_ss
    g = grad_out.to(x.dtype).contiguous(memory_format=torch.channels_last if cl and x.dim() == 4 else
                                        torch.channels_last_3d if cl else torch.contiguous_format)
    cg = c // num_groups
    act = ACT_CODES[activation]
    flags = _flags(weight, bias, add, scale_shift)
    w_, b_, add_, ss_ = _opt(weight, x), _opt(bias, x), _opt(add, x), _opt(scale_shift, x)
    tiling = _one_program_tiling(cg, s)
    if tiling is not None:
        _group_norm_act_backward_one_program_kernel[(n * num_groups,)](
            x, g, grad_x, w_, b_, add_, ss_, mean, rstd, grad_add, grad_ss, gw_parts, gb_parts, c, s, num_groups, cg,
            negative_slope, CHANNELS_LAST=cl, **flags, ACT=act, BLOCK_C=tiling[0], BLOCK_S=tiling[1],
            ONE_TILE=tiling[2], num_warps=NUM_WARPS)
    else:
        coef = x.new_empty((3, n, c), dtype=torch.float32)
        _coef_kernel[(n * num_groups,)](
            mean, rstd, w_, b_, add_, ss_, coef[0], coef[1], coef[2], c, num_groups, cg, **flags,
            BLOCK=_cblock(cg), num_warps=4)
        block_c, block_s, splits, s_per_split = _tiling(n, c, s, cl)
        sums = x.new_empty((3, n, c, splits), dtype=torch.float32)
        _channel_sums_kernel[(n, cdiv(c, block_c), splits)](
            x, g, coef[0], coef[1], coef[2], sums[0], sums[1], sums[2], c, s, s_per_split, splits, negative_slope,
            c, c * splits, splits, CHANNELS_LAST=cl, ACT=act, BLOCK_C=block_c, BLOCK_S=block_s, num_warps=NUM_WARPS)
        back = x.new_empty((3, n, c), dtype=torch.float32)
        splits_p2 = next_pow2(splits)
        _group_backward_kernel[(n * num_groups,)](
            sums[0], sums[1], sums[2], rstd, w_, b_, ss_, back[0], back[1], back[2], grad_add, grad_ss, gw_parts,
            gb_parts, c, s, num_groups, cg, splits, HAS_W=flags["HAS_W"], HAS_B=flags["HAS_B"], HAS_SS=flags["HAS_SS"],
            BLOCK=max(1, min(_cblock(cg), 2048 // splits_p2)), SPLITS_P2=splits_p2, num_warps=4)
        _grad_apply(x, g, grad_x, coef, back, c, s, cl, act, negative_slope)
    # One image: its parts are the gradients (views, no launch); else a sum over the images.
    if n == 1:
        return grad_x, gw_parts[0], gb_parts[0], grad_add, grad_ss
    return grad_x, gw_parts.sum(0), gb_parts.sum(0), grad_add, grad_ss


def channel_affine_act(x, scale, shift, residual, activation, negative_slope):
    _, c, s, cl = _layout(x)
    out = torch.empty_like(x)
    numel = x.numel()
    if numel == 0:
        return out
    grid, rows, meta = _elementwise_grid(x, c, s, cl)
    _channel_affine_act_kernel[grid](
        x, residual if residual is not None else x, out, scale, shift, rows, c, s, negative_slope,
        CHANNELS_LAST=cl, HAS_RES=residual is not None, ACT=ACT_CODES[activation], **meta, num_warps=NUM_WARPS)
    return out


# ---- batch norm in training mode: the group-norm kernels with one group per channel ----

def _bn_layout(x: torch.Tensor):
    """(N, C, S, channels_last) for batch statistics: channels_last x (and any x with
    S = 1) is rows of C channels, one image of N * S rows."""
    n, c, s, cl = _layout(x)
    if cl or s == 1:
        return 1, c, n * s, True
    return n, c, s, False


def batch_norm_act_train(x, weight, bias, eps, activation, negative_slope):
    n, c, s, cl = _bn_layout(x)
    out = torch.empty_like(x)
    mean, rstd, var = (x.new_empty((c,), dtype=torch.float32) for _ in range(3))  # outputs may not alias
    if c == 0:
        return out, mean, rstd, var
    if n * s == 0:
        return out, mean.fill_(float("nan")), rstd.fill_(float("nan")), var.fill_(float("nan"))
    cmean, cm2, splits, s_per_split = _channel_moments(x, n, c, s, cl)
    coef = x.new_empty((3, n, c), dtype=torch.float32)
    _bn_finalize_kernel[(c,)](
        cmean, cm2, _opt(weight, x), _opt(bias, x), mean, rstd, var, coef[0], coef[1], coef[2], n, c, s,
        s_per_split, splits, eps, HAS_W=weight is not None, HAS_B=bias is not None,
        BLOCK=min(next_pow2(n * splits), 1024), num_warps=4)
    _apply(x, None, out, coef, c, s, cl, activation, negative_slope)
    return out, mean, rstd, var


def batch_norm_act_backward(grad_out, x, weight, bias, mean, rstd, activation, negative_slope):
    n, c, s, cl = _bn_layout(x)
    grad_x = torch.empty_like(x)
    # grad_weight, grad_bias: every channel's written by _group_backward_kernel; outputs may not alias
    grads = [x.new_empty((c,), dtype=torch.float32) for _ in range(2)]
    if n * c * s == 0:
        return grad_x.zero_(), grads[0].zero_(), grads[1].zero_()
    fmt = torch.contiguous_format if x.is_contiguous() else \
        torch.channels_last if x.dim() == 4 else torch.channels_last_3d
    g = grad_out.to(x.dtype).contiguous(memory_format=fmt)
    flags = _flags(weight, bias, None, None)
    w_, b_ = _opt(weight, x), _opt(bias, x)
    # Four launches: the forward's folded coefficients per channel (one group per channel), the
    # per-(n, c, split) sums stored channel by channel (a channel's images and splits adjacent, so
    # the next kernel reduces them as one channel's splits), the per-channel gradient coefficients
    # and parameter gradients, and grad_x.
    coef = x.new_empty((3, c), dtype=torch.float32)
    _coef_kernel[(c,)](mean, rstd, w_, b_, x, x, coef[0], coef[1], coef[2], c, c, 1, **flags, BLOCK=1, num_warps=1)
    block_c, block_s, splits, s_per_split = _tiling(n, c, s, cl)
    sums = x.new_empty((3, c, n, splits), dtype=torch.float32)
    act = ACT_CODES[activation]
    _channel_sums_kernel[(n, cdiv(c, block_c), splits)](
        x, g, coef[0], coef[1], coef[2], sums[0], sums[1], sums[2], c, s, s_per_split, splits, negative_slope,
        0, splits, n * splits, CHANNELS_LAST=cl, ACT=act, BLOCK_C=block_c, BLOCK_S=block_s, num_warps=NUM_WARPS)
    parts = n * splits
    if parts > MAX_PARTS:  # many images of few positions: their sums reduced first (one more launch)
        sums, parts = sums.sum(2), splits
    back = x.new_empty((3, c), dtype=torch.float32)
    unused = x.new_empty((3, c), dtype=torch.float32)  # the per-(n, c) gradients of add and scale_shift
    _group_backward_kernel[(c,)](
        sums[0], sums[1], sums[2], rstd, w_, b_, x, back[0], back[1], back[2],
        unused[0], unused[1:], grads[0], grads[1], c, n * s, c, 1, parts,
        HAS_W=flags["HAS_W"], HAS_B=flags["HAS_B"], HAS_SS=False, BLOCK=1, SPLITS_P2=next_pow2(parts), num_warps=4)
    _grad_apply(x, g, grad_x, coef, back, c, s, cl, act, negative_slope, per_channel=True)
    return grad_x, grads[0], grads[1]
