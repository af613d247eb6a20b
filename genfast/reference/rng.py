"""The noise stream in integer tensor arithmetic.

Stream position ``p`` is component ``p % 4`` of Triton's
``tl.randn4x(seed, p // 4)`` (normals) or ``tl.rand4x(seed, p // 4)``
(uniforms): Philox4x32 with 10 rounds, keyed by the 64-bit seed, on the
counter ``(lo32(c), hi32(c), 0, 0)``, c = p // 4. Its four output words give
four uniforms, or by Box-Muller on the pairs (w0, w1) and (w2, w3) four
normals (cosine then sine branch). Element ``i`` of a call is position
``offset + i``. This file reproduces the integer part bit for bit; the float
part follows Triton's fp32 formulas, with log/sqrt/cos/sin in fp64 rounded
once, the oracle for the kernels' fp32 approximations.
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


def _words_at(seed, positions: torch.Tensor) -> torch.Tensor:
    """The four Philox output words of each position's counter, shape (..., 4)."""
    return torch.stack(philox(seed, positions >> 2), dim=-1)


def uniform_at(seed, positions: torch.Tensor) -> torch.Tensor:
    """Uniforms in [0, 1) at stream positions (int64 tensor)."""
    words = _words_at(seed, positions)
    return uniform_from_bits(words.gather(-1, (positions & 3).unsqueeze(-1)).squeeze(-1))


def normal_at(seed, positions: torch.Tensor) -> torch.Tensor:
    """Standard normals at stream positions (int64 tensor), fp32."""
    words = _words_at(seed, positions)
    first = ((positions & 3) >> 1 << 1).unsqueeze(-1)  # the pair: words 0, 1 or words 2, 3
    u1 = uniform_from_bits(words.gather(-1, first).squeeze(-1)).clamp_min(1.0e-7)
    theta = (uniform_from_bits(words.gather(-1, first + 1).squeeze(-1)) * torch.tensor(TWO_PI)).double()
    r = torch.sqrt(-2.0 * torch.log(u1.double()))
    return torch.where((positions & 1) == 1, r * torch.sin(theta), r * torch.cos(theta)).float()


def normal_stream(numel: int, seed, offset: int, device) -> torch.Tensor:
    """Positions offset .. offset + numel - 1 of the normal stream."""
    return normal_at(seed, counters(numel, offset, device))


def uniform_stream(numel: int, seed, offset: int, device) -> torch.Tensor:
    """Positions offset .. offset + numel - 1 of the uniform stream."""
    return uniform_at(seed, counters(numel, offset, device))


def counters(numel: int, offset: int, device) -> torch.Tensor:
    return torch.arange(numel, dtype=torch.int64, device=device) + offset


def resolve_seed(seed: int, seed_tensor: torch.Tensor | None):
    return seed_tensor.to(torch.int64) if seed_tensor is not None else seed


def fill_noise_(out: torch.Tensor, seed: int, seed_tensor: torch.Tensor | None, offset: int, normal: bool) -> None:
    draw = normal_stream if normal else uniform_stream
    out.copy_(draw(out.numel(), resolve_seed(seed, seed_tensor), offset, out.device).view(out.shape))
