"""genfast's noise stream in Triton: position p is component ``p % 4`` of
``tl.randn4x(seed, p // 4)`` (or ``tl.rand4x``); element i of a call is
position ``offset + i``.

The stream is defined by Triton's own Philox4x32-10 and Box-Muller (see
``genfast/rng.py``); the other backends reproduce it. One Philox call yields
four consecutive positions, so a block of positions costs a quarter of the
Philox rounds of drawing each on its own counter. The jit helpers here
(``load_seed``, ``stream_positions``, ``stream_block``, ``uniform_at``,
``normal_at``) are shared by every family that draws noise inside a fused
kernel, so all of them key and count the stream the same way.

Memory traffic for ``fill_noise_`` of N elements of size s bytes:

- eager torch (``torch.randn(N)`` in fp32, then ``.to(dtype)``): write 4N, and
  for a half-precision output read 4N + write 2N more;
- this kernel: write N * s, once. Philox (10 rounds of two 32x32->64 multiplies)
  plus log/sqrt/cos per element is a few tens of integer and special-function
  instructions, which a GPU hides behind the store stream.

Target on a GPU: at 64M fp32 elements, >= 80% of the machine's copy bandwidth
(counting the N * s bytes written). Not measured yet: this file was written on a
machine without a GPU and checked with ``TRITON_INTERPRET=1``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import cdiv

# 8 fp32 per thread: two 16-byte stores, enough Philox work in flight per thread
# to cover latency without spilling registers.
BLOCK = 2048
NUM_WARPS = 8


@triton.jit
def load_seed(seed, seed_ptr, SEED_FROM_PTR: tl.constexpr):
    """The 64-bit Philox key.

    A seed tensor is read on the device so that a CUDA graph replays with the
    value it holds at replay time. An int seed arrives as i32, u32 or i64
    depending on its value; widening to i64 here makes the key's high word the
    sign extension the reference computes from the Python int.
    """
    if SEED_FROM_PTR:
        key = tl.load(seed_ptr).to(tl.int64)
    else:
        key = seed.to(tl.int64)
    return key


@triton.jit
def stream_positions(offset, pid, BLOCK: tl.constexpr):
    """This program's stream positions and the element indices they feed.

    Programs cover aligned runs of BLOCK positions starting at offset rounded
    down to a multiple of 4, so that each Philox call serves four positions;
    element i = position - offset (negative or >= numel: masked off). The
    launch grid is therefore cdiv(numel + offset % 4, BLOCK). int64
    throughout: a tensor or a running offset can pass 2**31.
    """
    first = (offset.to(tl.int64) // 4) * 4 + pid.to(tl.int64) * BLOCK
    idx = first - offset.to(tl.int64) + tl.arange(0, BLOCK).to(tl.int64)
    return first, idx


@triton.jit
def stream_block(key, first, BLOCK: tl.constexpr, NORMAL: tl.constexpr):
    """Positions first .. first + BLOCK - 1 (first a multiple of 4) of the
    normal (NORMAL) or uniform stream, in order."""
    c = first // 4 + tl.arange(0, BLOCK // 4).to(tl.int64)
    if NORMAL:
        a, b, d, e = tl.randn4x(key, c)
    else:
        a, b, d, e = tl.rand4x(key, c)
    # join appends a last axis: [c, i, j] of the result is component 2i + j of
    # counter c, i.e. position 4c + 2i + j once flattened
    return tl.reshape(tl.join(tl.join(a, d), tl.join(b, e)), [BLOCK])


@triton.jit
def uniform_at(key, p):
    """Uniforms at arbitrary int64 positions p (one Philox call each)."""
    w0, w1, w2, w3 = tl.randint4x(key, p // 4)
    q = p % 4
    w = tl.where(q == 0, w0, tl.where(q == 1, w1, tl.where(q == 2, w2, w3)))
    return tl.random.uint_to_uniform_float(w)


@triton.jit
def normal_at(key, p):
    """Standard normals at arbitrary int64 positions p (one Philox call each)."""
    w0, w1, w2, w3 = tl.randint4x(key, p // 4)
    upper = (p % 4) >= 2
    u1 = tl.random.uint_to_uniform_float(tl.where(upper, w2, w0))
    u2 = tl.random.uint_to_uniform_float(tl.where(upper, w3, w1))
    n_cos, n_sin = tl.random.pair_uniform_to_normal(u1, u2)
    return tl.where((p % 2) == 1, n_sin, n_cos)


@triton.jit(do_not_specialize=["seed", "offset"])  # a new seed/offset every step must not recompile
def _fill_noise_kernel(out_ptr, numel, seed, seed_ptr, offset,
                       SEED_FROM_PTR: tl.constexpr, NORMAL: tl.constexpr, BLOCK: tl.constexpr):
    first, idx = stream_positions(offset, tl.program_id(0), BLOCK)
    x = stream_block(load_seed(seed, seed_ptr, SEED_FROM_PTR), first, BLOCK, NORMAL)
    tl.store(out_ptr + idx, x.to(out_ptr.dtype.element_ty), mask=(idx >= 0) & (idx < numel))


def fill_noise_(out: torch.Tensor, seed: int, seed_tensor: torch.Tensor | None, offset: int, normal: bool) -> None:
    """Fill contiguous fp32/fp16/bf16 ``out`` with positions offset .. offset + numel - 1 of the stream."""
    numel = out.numel()
    if numel == 0:
        return
    from_ptr = seed_tensor is not None
    _fill_noise_kernel[(cdiv(numel + offset % 4, BLOCK),)](
        out, numel, seed, seed_tensor if from_ptr else out, offset,
        SEED_FROM_PTR=from_ptr, NORMAL=normal, BLOCK=BLOCK, num_warps=NUM_WARPS)
