"""genfast's noise stream in Triton: element i is ``tl.randn(seed, offset + i)``.

The stream is defined by Triton's own Philox4x32-10 and Box-Muller (see
``genfast/rng.py``), so this kernel is the definition and the other backends
reproduce it. The jit helpers here (``load_seed``, ``counters``) are shared by
every family that draws noise inside a fused kernel (``kernels/vae.py``, the
sampler steps), so all of them key and count the stream the same way.

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
def counters(offset, pid, BLOCK: tl.constexpr):
    """Row-major element indices of this program and their Philox counters.

    Both in int64: a tensor or a running offset can pass 2**31 elements, and
    the counter's high word must then be the true high word, not a wrap.
    """
    idx = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    return idx, offset.to(tl.int64) + idx


@triton.jit(do_not_specialize=["seed", "offset"])  # a new seed/offset every step must not recompile
def _fill_noise_kernel(out_ptr, numel, seed, seed_ptr, offset,
                       SEED_FROM_PTR: tl.constexpr, NORMAL: tl.constexpr, BLOCK: tl.constexpr):
    idx, ctr = counters(offset, tl.program_id(0), BLOCK)
    mask = idx < numel
    key = load_seed(seed, seed_ptr, SEED_FROM_PTR)
    if NORMAL:
        x = tl.randn(key, ctr)
    else:
        x = tl.rand(key, ctr)
    tl.store(out_ptr + idx, x.to(out_ptr.dtype.element_ty), mask=mask)


def fill_noise_(out: torch.Tensor, seed: int, seed_tensor: torch.Tensor | None, offset: int, normal: bool) -> None:
    """Fill contiguous fp32/fp16/bf16 ``out`` with ``randn``/``rand`` of (seed, offset + i)."""
    numel = out.numel()
    if numel == 0:
        return
    from_ptr = seed_tensor is not None
    _fill_noise_kernel[(triton.cdiv(numel, BLOCK),)](
        out, numel, seed, seed_tensor if from_ptr else out, offset,
        SEED_FROM_PTR=from_ptr, NORMAL=normal, BLOCK=BLOCK, num_warps=NUM_WARPS)
