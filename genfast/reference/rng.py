"""The noise stream in integer tensor arithmetic.

Element ``i`` of a call is Triton's ``tl.randn(seed, offset + i)`` (or
``tl.rand``): Philox4x32 with 10 rounds, keyed by the 64-bit seed, counter
``(lo32(offset + i), hi32(offset + i), 0, 0)``; the first output word gives a
uniform, the first two a normal by Box-Muller. This file reproduces it bit for
bit in the integer part; the float part follows Triton's fp32 formulas.
"""
from __future__ import annotations

import torch

M32 = 0xFFFFFFFF
ROUND_A, ROUND_B = 0xD2511F53, 0xCD9E8D57
KEY_A, KEY_B = 0x9E3779B9, 0xBB67AE85
UNIFORM_SCALE = 4.6566127342e-10  # the largest scale with (2**31 - 1) * scale < 1 in fp32
TWO_PI = 6.283185307179586


def _mulhilo(a: torch.Tensor, b: int) -> tuple[torch.Tensor, torch.Tensor]:
    """High and low 32 bits of a * b for uint32 values held in int64 tensors.

    The 64-bit product would overflow int64, so a is split into 16-bit halves.
    """
    p_lo = (a & 0xFFFF) * b  # < 2**48
    p_hi = (a >> 16) * b  # < 2**48
    hi = (p_hi + (p_lo >> 16)) >> 16
    lo = (((p_hi & 0xFFFF) << 16) + p_lo) & M32
    return hi, lo


def philox(seed, counter: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Philox4x32-10 of ``counter`` (int64 tensor) under ``seed`` (int or 0-d int64 tensor)."""
    c0, c1 = counter & M32, (counter >> 32) & M32
    c2 = c3 = torch.zeros_like(counter)
    k0, k1 = seed & M32, (seed >> 32) & M32
    for _ in range(10):
        hi_b, lo_b = _mulhilo(c2, ROUND_B)
        hi_a, lo_a = _mulhilo(c0, ROUND_A)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + KEY_A) & M32, (k1 + KEY_B) & M32
    return c0, c1, c2, c3


def uniform_from_bits(x: torch.Tensor) -> torch.Tensor:
    """A uint32 word (in int64) to fp32 in [0, 1), as Triton's uint_to_uniform_float."""
    x = torch.where(x >= 2**31, M32 - x, x)  # the int32 view, folded to non-negative: ~x
    return x.to(torch.float32) * torch.tensor(UNIFORM_SCALE, dtype=torch.float32)


def normal_from_bits(b0: torch.Tensor, b1: torch.Tensor) -> torch.Tensor:
    """Box-Muller (cosine branch) on two words, in fp32 like Triton's pair_uniform_to_normal."""
    u1 = uniform_from_bits(b0).clamp_min(1.0e-7)
    theta = uniform_from_bits(b1) * torch.tensor(TWO_PI, dtype=torch.float32)
    # log/sqrt/cos are taken in fp64 and rounded once: the oracle for the fp32 kernels.
    r = torch.sqrt(-2.0 * torch.log(u1.double()))
    return (r * torch.cos(theta.double())).float()


def counters(numel: int, offset: int, device) -> torch.Tensor:
    return torch.arange(numel, dtype=torch.int64, device=device) + offset


def randn_flat(numel: int, seed, offset: int, device) -> torch.Tensor:
    b0, b1, _, _ = philox(seed, counters(numel, offset, device))
    return normal_from_bits(b0, b1)


def rand_flat(numel: int, seed, offset: int, device) -> torch.Tensor:
    return uniform_from_bits(philox(seed, counters(numel, offset, device))[0])


def resolve_seed(seed: int, seed_tensor: torch.Tensor | None):
    return seed_tensor.to(torch.int64) if seed_tensor is not None else seed


def fill_noise_(out: torch.Tensor, seed: int, seed_tensor: torch.Tensor | None, offset: int, normal: bool) -> None:
    draw = randn_flat if normal else rand_flat
    out.copy_(draw(out.numel(), resolve_seed(seed, seed_tensor), offset, out.device).view(out.shape))
