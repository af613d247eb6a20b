"""One noise stream for every backend.

Position ``p`` of the stream is component ``p % 4`` of Triton's
``tl.randn4x(seed, p // 4)`` (normals) or ``tl.rand4x(seed, p // 4)``
(uniforms): counter-based Philox4x32-10, each call serving four consecutive
positions. Element ``i`` of any genfast op that draws noise is position
``offset + i``, so the Triton, C++ and reference implementations produce the
same numbers (within 1e-6 in fp32; uniforms bit for bit) for the same
(seed, offset): the same seed gives the same image on the CPU and the GPU.
A call that draws n numbers uses positions offset .. offset + n - 1; the next
call continues at ``offset + n`` to get fresh noise.

``seed`` is a Python int in int64 range, a 0-d int64 tensor on the op's device
(read on the device, so a CUDA graph replays with whatever value it holds), or
``None``: a seed drawn from torch's default generator, so ``torch.manual_seed``
governs reproducibility.
"""
from __future__ import annotations

import torch

from . import _ops

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


def _fake_fill_noise_(out, seed, seed_tensor, offset, normal):
    return None


fill_noise_ = _ops.define(
    "fill_noise_(Tensor(a!) out, int seed, Tensor? seed_tensor, int offset, bool normal) -> ()",
    "rng",
    _fake_fill_noise_,
)


def normalize_seed(fn: str, seed, device: torch.device) -> tuple[int, torch.Tensor | None]:
    """Check ``seed`` and split it into the (int seed, seed tensor) pair the ops take."""
    if seed is None:
        return int(torch.empty((), dtype=torch.int64).random_().item()), None
    if isinstance(seed, torch.Tensor):
        if seed.dtype != torch.int64:
            raise TypeError(f"{fn}: seed must be an int64 tensor, got {seed.dtype}")
        if seed.dim() != 0:
            raise ValueError(f"{fn}: seed must be a 0-d tensor, got shape {tuple(seed.shape)}")
        if seed.device != device:
            raise ValueError(f"{fn}: seed must be on the device of the inputs ({device}), got {seed.device}")
        return 0, seed
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"{fn}: seed must be an int, a 0-d int64 tensor or None, got {type(seed).__name__}")
    if not INT64_MIN <= seed <= INT64_MAX:
        raise ValueError(f"{fn}: seed must be in int64 range [-2**63, 2**63 - 1], got {seed}")
    return seed, None


def check_offset(fn: str, offset, numel: int) -> int:
    if isinstance(offset, bool) or not isinstance(offset, int):
        raise TypeError(f"{fn}: offset must be an int, got {type(offset).__name__}")
    if offset < 0 or offset + numel > INT64_MAX:
        raise ValueError(f"{fn}: offset must satisfy 0 <= offset and offset + numel <= 2**63 - 1, got {offset}")
    return offset


def _noise(fn: str, normal: bool, shape, seed, offset, dtype, device) -> torch.Tensor:
    if len(shape) == 1 and isinstance(shape[0], (tuple, list, torch.Size)):
        shape = tuple(shape[0])
    if not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape):
        raise ValueError(f"{fn}: shape must be non-negative ints, got {shape}")
    if dtype not in _ops.FLOAT_DTYPES:
        raise TypeError(f"{fn}: dtype must be a floating dtype, got {dtype}")
    out = torch.empty(shape, dtype=dtype, device=device)
    seed, seed_tensor = normalize_seed(fn, seed, out.device)
    offset = check_offset(fn, offset, out.numel())
    if out.numel():
        fill_noise_(out, seed, seed_tensor, offset, normal)
    return out


def randn(*shape, seed=None, offset: int = 0, dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
    """Standard normal noise from genfast's stream.

    Parameters
    ----------
    *shape : int
        Output shape (ints, or one tuple).
    seed : int, 0-d int64 tensor or None
        Philox key; see the module docstring.
    offset : int
        Stream position of the first element.
    dtype : torch.dtype
        float32 (default), float16, bfloat16 or float64; drawn in fp32 and rounded.
    device : torch.device, optional

    Returns
    -------
    Tensor of ``shape``: element i (row-major) is stream position ``offset + i``.
    """
    return _noise("randn", True, shape, seed, offset, dtype, device)


def rand(*shape, seed=None, offset: int = 0, dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
    """Uniform noise in [0, 1) from genfast's stream: element i is position ``offset + i``.

    Same arguments as :func:`randn`.
    """
    return _noise("rand", False, shape, seed, offset, dtype, device)
