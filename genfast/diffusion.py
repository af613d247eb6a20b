"""Diffusion sampler steps: one fused kernel per step, classifier-free guidance inside.

A diffusers scheduler step launches 6-20 small elementwise kernels, upcasts
the latent and looks up its coefficients on the host; the pipeline adds
guidance (chunk, subtract, scale, add) on top. Every one of those samplers is,
per step, an affine map of (sample, uncond, cond, noise, multistep history)
whose coefficients depend only on the schedule: genfast computes them for all
steps in fp64 when the schedule is set, keeps them as an fp32 table
``(num_steps, NCOEF)`` on the device, and runs each step as one kernel that
reads its row (``genfast/reference/diffusion.py`` states the map).

Coefficients and CUDA graphs
----------------------------
``sampler_step(..., coefficients, step)`` takes the table and the row: an int,
or a 0-d int64 tensor on the device that the kernel reads (a captured step
replays for every row when the caller advances that tensor in place). The
stochastic samplers draw noise at stream positions ``offset + row * numel + i`` of
genfast's stream (``genfast.rng``), so the noise changes with the row, not
with host state; ``seed`` may be a 0-d int64 device tensor for the same reason.
Nothing in a step allocates more than its outputs or reads a device value on
the host.

Multistep state lives in ``history`` buffers the kernel updates in place
(each element is read and rewritten by the same thread): fixed addresses from
step to step, as a CUDA graph needs. DPM++ 2M keeps the previous x0 there;
Heun the first stage's x + (dt / 2) d1; UniPC the previous x0, in
``history2`` the part of the next corrector that is known a step early and,
at order 3, in ``history3`` the x0 before the previous one. Zero them (or
fill with any finite values) before the first step: its coefficients on them
are 0.

Dynamic thresholding
--------------------
diffusers' ``thresholding=True`` (Imagen's dynamic thresholding) replaces the
predicted x0 of each sample by clamp(x0, -s, s) / s, s = the
``dynamic_thresholding_ratio`` quantile of |x0| over the sample, clamped to
[1, sample_max_value]; everything after uses that x0. The bound is a
reduction over the whole sample, so one elementwise pass cannot apply it.
``sampler_step(..., threshold=(ratio, sample_max_value))`` runs three things,
all on the device:

1. the same kernel with the table's x0 rows only (``x0_rows``: the x0 columns,
   p0 = 1) and no history: it writes x0 (read u, c, x; write x0: 4Ns);
2. ``dynamic_threshold_bound``: per sample, one unsorted ``topk`` of |x0| at
   the short end of the order (the top 0.5% at ratio 0.995) and a top-2 of
   that give the two order statistics around the quantile, interpolated as
   ``torch.quantile`` does (bit for bit); a (B,) bound (~2Ns plus the
   selection);
3. the step itself with the bound as one more (B,) input: the kernel clamps and
   divides x0 by its sample's bound before using it.

Why this shape: the step's kernel stays one kernel with one extra per-sample
load (the way guidance_rescale's factor enters), so every sampler whose x0
has its own columns (p0, pd, hj0: the table builders' clip form) gains
thresholding without a new kernel; recomputing x0 in step 3 costs a re-read
of u, c and x, against a stored x0 that would need a second, different
kernel. A selection kernel of our own would have to beat ``topk``'s radix
select at k = 0.5% of the sample to be worth its code; the quantile stays a
plain, traceable reduction with no host sync (the rank and weight come from
the static shape), so a thresholded step still compiles with
``fullgraph=True``, and nothing in it waits on the host, as CUDA-graph
capture needs (a captured thresholded loop is not yet tested on a GPU).

Coefficient precision: the table is fp32, computed in fp64. The schedule's
scalars that diffusers derives in fp32 (alpha_t, lambda, exp(-h), ...) are
rounded differently, so a twin's trajectory agrees with diffusers' fp32 run
only as well as either agrees with fp64; against a true fp64 run (the
schedule's scalars in fp64 too) the twins' error is at most diffusers' own.

Bytes per step for N latent elements of s bytes, guidance in the step:
read uncond, cond, sample, write prev: 4Ns (6Ns for DPM++ 2M with its
history read and written, +Ns when x0 is returned, +2Ns per further
history; thresholding adds the x0 pass and the selection above). diffusers' step with the
pipeline's guidance moves ~20 passes of fp32 temporaries (see
``kernels/diffusion.py`` for the count per sampler).

The per-sampler table builders (``euler_coefficients``, ``euler_ancestral_coefficients``,
``ddim_coefficients``, ``ddpm_coefficients``, ``lcm_coefficients``,
``heun_coefficients``, ``dpm_solver_coefficients``, ``unipc_coefficients``,
``flow_match_euler_coefficients``) and the
scalar-argument steps (``euler_step``, ``ddim_step``, ``dpmpp_2m_step``,
``flow_match_euler_step``) follow diffusers' formulas; ``genfast.schedulers``
uses them for drop-in diffusers schedulers.
"""
from __future__ import annotations

import math
import struct
from typing import Callable, Sequence

import torch

from . import _build, _ops, backends
from .reference.diffusion import COEF, NCOEF, compute_dtype
from .rng import check_offset, normalize_seed

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def _fake_sampler_step(sample, model_output, cond, noise, history, history2, history3, coeffs, row, row_tensor,
                       guidance_scale, guidance_factor, clip, bound, draw_noise, seed, seed_tensor, offset, return_x0):
    return torch.empty_like(sample), (torch.empty_like(sample) if return_x0 else sample.new_empty((0,)))


sampler_step_op = _ops.define(
    "sampler_step(Tensor sample, Tensor model_output, Tensor? cond, Tensor? noise, Tensor(a!)? history, "
    "Tensor(b!)? history2, Tensor(c!)? history3, Tensor coeffs, int row, Tensor? row_tensor, "
    "float guidance_scale, Tensor? guidance_factor, float clip, Tensor? bound, bool draw_noise, int seed, "
    "Tensor? seed_tensor, int offset, bool return_x0) -> (Tensor, Tensor)",
    "diffusion",
    _fake_sampler_step,
)

guidance_rescale_factor_op = _ops.define(
    "guidance_rescale_factor(Tensor uncond, Tensor cond, float guidance_scale, float guidance_rescale) -> Tensor",
    "diffusion",
    lambda uncond, cond, g, phi: uncond.new_empty((uncond.shape[0],), dtype=compute_dtype(uncond.dtype)),
)


# ---- layout helpers ---------------------------------------------------------

def _is_dense(t: torch.Tensor) -> bool:
    """No gaps and no overlaps: the elements fill numel consecutive slots in some order."""
    expected = 1
    for size, stride in sorted(((s, st) for s, st in zip(t.shape, t.stride()) if s != 1), key=lambda p: p[1]):
        if stride != expected:
            return False
        expected *= size
    return True


def _batch_outermost(t: torch.Tensor) -> bool:
    return t.dim() == 0 or t.shape[0] == 1 or t.stride(0) * t.shape[0] == t.numel()


def _like(t: torch.Tensor, layout: torch.Tensor, dtype=None) -> torch.Tensor:
    """t with layout's strides (and dtype), copied only when they differ."""
    dtype = dtype or t.dtype
    if t.stride() == layout.stride() and t.dtype == dtype:
        return t
    return torch.empty_like(layout, dtype=dtype).copy_(t)


# ---- the fused step ---------------------------------------------------------

def _split_guidance(fn: str, model_output):
    if isinstance(model_output, (tuple, list)):
        if len(model_output) != 2:
            raise ValueError(f"{fn}: model_output as a sequence must be (uncond, cond), got {len(model_output)} items")
        uncond, cond = model_output
        _ops.check_tensor(fn, "model_output[0] (uncond)", uncond)
        _ops.check_tensor(fn, "model_output[1] (cond)", cond)
        _ops.check_like(fn, "model_output[1] (cond)", cond, "model_output[0] (uncond)", uncond)
        return uncond, cond
    _ops.check_tensor(fn, "model_output", model_output)
    return model_output, None


def _check_step(fn: str, step, rows: int, device: torch.device):
    if isinstance(step, torch.Tensor):
        if step.dtype != torch.int64 or step.dim() != 0:
            raise TypeError(f"{fn}: step must be an int or a 0-d int64 tensor, got {step.dtype} of shape "
                            f"{tuple(step.shape)}")
        if step.device != device:
            raise ValueError(f"{fn}: step must be on the device of sample ({device}), got {step.device}")
        return 0, step
    if isinstance(step, bool) or not isinstance(step, int):
        raise TypeError(f"{fn}: step must be an int or a 0-d int64 tensor, got {type(step).__name__}")
    if not 0 <= step < rows:
        raise ValueError(f"{fn}: step must be in [0, {rows}) (rows of coefficients), got {step}")
    return step, None


def sampler_step(sample: torch.Tensor, model_output, coefficients: torch.Tensor, step=0, *,
                 guidance_scale: float = 1.0, guidance_rescale: float = 0.0, stochastic: bool = False,
                 noise: torch.Tensor | None = None, seed=None, offset: int = 0,
                 history: torch.Tensor | None = None, history2: torch.Tensor | None = None,
                 history3: torch.Tensor | None = None, clip: float = 0.0, threshold=None,
                 return_x0: bool = False):
    """One sampler step as one kernel: guidance, prediction conversion, update, noise.

    Parameters
    ----------
    sample : Tensor, any shape (B, ...), fp32/fp16/bf16 (fp64 runs on the reference)
        x_t. Contiguous or any dense layout (channels_last): the step runs in memory order.
    model_output : Tensor of sample's shape and dtype, or a pair (uncond, cond)
        The model's prediction; a pair applies classifier-free guidance
        ``uncond + guidance_scale * (cond - uncond)`` inside the kernel.
    coefficients : Tensor (S, NCOEF) or (NCOEF,), fp32, on sample's device
        The step's affine map, one row per step (``*_coefficients`` build them).
    step : int or 0-d int64 tensor on sample's device
        The row to use; a tensor is read on the device (CUDA-graph replay).
    guidance_scale : float
    guidance_rescale : float in [0, 1]
        diffusers' ``rescale_noise_cfg`` factor (needs a pair); costs a reduction pass.
    stochastic : bool
        Whether the coefficients use noise; then ``noise`` or the stream (seed, offset) supplies it.
    noise : Tensor of sample's shape, any float dtype, optional
        Use this noise (e.g. diffusers' ``variance_noise``) instead of drawing it.
    seed : int, 0-d int64 tensor or None
        Noise key (``genfast.rng``); element i in memory order uses ``offset + row * numel + i``.
    offset : int
    history, history2, history3 : Tensor of sample's shape, dtype and strides, optional
        Multistep state, updated in place.
    clip : float
        > 0 clamps the predicted x0 to [-clip, clip] (diffusers' clip_sample).
    threshold : (ratio, sample_max_value) or None
        diffusers' dynamic thresholding of the predicted x0: per sample, s = the
        ``ratio`` quantile of |x0| clamped to [1, sample_max_value], then
        x0 = clamp(x0, -s, s) / s. Needs a batch dimension; excludes ``clip``.
        Costs a pass that predicts x0 and a per-sample selection (see the module
        docstring); the coefficients must take x0 through its own columns (p0, pd,
        hj0), as the builders do when asked to clip.
    return_x0 : bool
        Also return the predicted clean sample (diffusers' pred_original_sample).

    Returns
    -------
    prev : Tensor, shape, dtype and layout of sample; or (prev, x0) when return_x0.
    """
    fn = "sampler_step"
    _ops.check_tensor(fn, "sample", sample)
    uncond, cond = _split_guidance(fn, model_output)
    _ops.check_like(fn, "model_output", uncond, "sample", sample)
    _ops.check_tensor(fn, "coefficients", coefficients, dtypes=(torch.float32,))
    if coefficients.dim() == 1:
        coefficients = coefficients.unsqueeze(0)
    if coefficients.dim() != 2 or coefficients.shape[1] != NCOEF:
        raise ValueError(f"{fn}: coefficients must have shape (steps, {NCOEF}), got {tuple(coefficients.shape)}")
    if coefficients.device != sample.device:
        raise ValueError(f"{fn}: coefficients must be on the device of sample ({sample.device}), "
                         f"got {coefficients.device}")
    row, row_tensor = _check_step(fn, step, coefficients.shape[0], sample.device)
    if not isinstance(guidance_scale, (int, float)) or isinstance(guidance_scale, bool):
        raise TypeError(f"{fn}: guidance_scale must be a float, got {type(guidance_scale).__name__}")
    if not isinstance(guidance_rescale, (int, float)) or not 0.0 <= guidance_rescale <= 1.0:
        raise ValueError(f"{fn}: guidance_rescale must be a float in [0, 1], got {guidance_rescale!r}")
    if guidance_rescale > 0 and cond is None:
        raise ValueError(f"{fn}: guidance_rescale > 0 needs model_output as a pair (uncond, cond)")
    if not isinstance(clip, (int, float)) or clip < 0 or math.isnan(clip):
        raise ValueError(f"{fn}: clip must be a float >= 0 (0: no clipping), got {clip!r}")
    if threshold is not None:
        threshold = check_threshold(fn, threshold)
        if clip > 0:
            raise ValueError(f"{fn}: clip and threshold exclude each other (diffusers thresholds and ignores "
                             f"clip_sample); got clip={clip!r}")
    numel = sample.numel()
    per_sample = (guidance_rescale > 0) or threshold is not None
    if per_sample and (sample.dim() < 2 or numel // max(sample.shape[0], 1) < (2 if guidance_rescale > 0 else 1)):
        what = "guidance_rescale" if guidance_rescale > 0 else "threshold"
        raise ValueError(f"{fn}: {what} needs a batch dimension and >= {2 if guidance_rescale > 0 else 1} "
                         f"elements per sample, got shape {tuple(sample.shape)}")
    for name, h in (("history", history), ("history2", history2), ("history3", history3)):
        if h is not None:
            _ops.check_tensor(fn, name, h)
            _ops.check_like(fn, name, h, "sample", sample)
    if noise is not None:
        _ops.check_tensor(fn, "noise", noise)
        _ops.check_like(fn, "noise", noise, "sample", sample, dtype=False)
    draw = bool(stochastic) and noise is None
    seed_int, seed_tensor = normalize_seed(fn, seed, sample.device) if draw else (0, None)
    offset = check_offset(fn, offset, numel * coefficients.shape[0])

    # One memory order for every tensor; history (updated in place) cannot be re-laid.
    layout = sample
    if not _is_dense(sample) or (per_sample and not _batch_outermost(sample)):
        layout = sample.contiguous()
    for name, h in (("history", history), ("history2", history2), ("history3", history3)):
        if h is not None and h.stride() != layout.stride():
            raise ValueError(f"{fn}: {name} must have the strides of a dense sample {layout.stride()} "
                             f"(allocate it with torch.zeros_like(sample)), got {h.stride()}")
    uncond = _like(uncond, layout)
    cond = _like(cond, layout) if cond is not None else None
    noise = _like(noise, layout, torch.float32 if sample.dtype != torch.float64 else torch.float64) \
        if noise is not None else None
    coefficients = coefficients.contiguous()
    factor = None
    if guidance_rescale > 0:
        factor = guidance_rescale_factor_op(uncond, cond, float(guidance_scale), float(guidance_rescale))
    bound = None
    if threshold is not None:
        x0, _ = sampler_step_op(layout, uncond, cond, noise, None, None, None, x0_rows(coefficients), row,
                                row_tensor, float(guidance_scale), factor, 0.0, None, draw, seed_int, seed_tensor,
                                offset, False)
        bound = dynamic_threshold_bound(x0, *threshold)
    prev, x0 = sampler_step_op(layout, uncond, cond, noise, history, history2, history3, coefficients, row,
                               row_tensor, float(guidance_scale), factor, float(clip), bound, draw, seed_int,
                               seed_tensor, offset, bool(return_x0))
    return (prev, x0) if return_x0 else prev


# ---- dynamic thresholding ---------------------------------------------------

def check_threshold(fn: str, threshold) -> tuple[float, float]:
    """(ratio, sample_max_value) as floats, or a ValueError naming what is wrong."""
    if not isinstance(threshold, (tuple, list)) or len(threshold) != 2:
        raise ValueError(f"{fn}: threshold must be a pair (ratio, sample_max_value), got {threshold!r}")
    ratio, max_value = threshold
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 <= ratio <= 1.0:
        raise ValueError(f"{fn}: the thresholding ratio (dynamic_thresholding_ratio) must be a float in [0, 1], "
                         f"got {ratio!r}")
    if isinstance(max_value, bool) or not isinstance(max_value, (int, float)) or not max_value > 0 \
            or math.isnan(max_value):
        raise ValueError(f"{fn}: sample_max_value must be a float > 0, got {max_value!r}")
    return float(ratio), float(max_value)


def x0_rows(coefficients: torch.Tensor) -> torch.Tensor:
    """The table whose step returns the predicted x0 as its output (the x0 columns
    of ``coefficients``, p0 = 1, nothing else): the first pass of a thresholded step."""
    table = torch.zeros_like(coefficients)
    table[:, :3] = coefficients[:, :3]  # ax, am, an
    table[:, COEF["p0"]] = 1.0
    return table


def _round_fp32(v: float) -> float:
    return struct.unpack("f", struct.pack("f", v))[0]


def dynamic_threshold_bound(x0: torch.Tensor, ratio: float, sample_max_value: float) -> torch.Tensor:
    """Per sample, the ``ratio`` quantile of |x0| (linear interpolation, as
    ``torch.quantile``) clamped to [1, sample_max_value]: a (B,) tensor in fp32
    (fp64 for fp64 x0), on x0's device, computed without a host sync.

    x0 must be dense with the batch outermost (any order within a sample: the
    quantile does not depend on it). The two order statistics around the
    quantile come from one unsorted ``topk`` per sample, of the high end (k = the
    count from the quantile up, 0.5% of the sample at diffusers' default ratio
    0.995) or of the low end, whichever is shorter, then a top-2 of those k. The
    rank and the interpolation weight are computed in the compute dtype, as
    torch.quantile does, so the bound equals diffusers' bit for bit given the
    same x0.
    """
    batch = x0.shape[0]
    inner = x0.numel() // batch
    a = x0.as_strided((batch, inner), (inner, 1)).abs()  # each sample's elements in memory order
    if a.dtype not in (torch.float32, torch.float64):
        a = a.float()  # diffusers upcasts fp16/bf16 for the quantile
    n = a.shape[1]
    if a.dtype == torch.float64:
        rank = ratio * (n - 1)
    else:  # the fp32 product of fp32 operands (exact in fp64, then rounded once)
        rank = _round_fp32(_round_fp32(ratio) * _round_fp32(n - 1))
    lo, hi = math.floor(rank), math.ceil(rank)
    weight = rank - lo  # exact: the fraction of a float
    # the short end of the order, unsorted (a sort of k elements would cost more than the
    # selection), then its two elements nearest the quantile
    if n - lo <= hi + 1:
        top = torch.topk(a, n - lo, dim=1, sorted=False).values  # sorted[lo:]
        ends = torch.topk(top, min(2, n - lo), dim=1, largest=False).values  # sorted[lo], sorted[lo + 1]
        below, above = ends[:, 0], ends[:, hi - lo]
    else:
        low = torch.topk(a, hi + 1, dim=1, largest=False, sorted=False).values  # sorted[:hi + 1]
        ends = torch.topk(low, min(2, hi + 1), dim=1).values  # sorted[hi], sorted[hi - 1]
        below, above = ends[:, hi - lo], ends[:, 0]
    return torch.clamp(torch.lerp(below, above, weight), min=1.0, max=sample_max_value)


# ---- the per-step path of callers that own their table ----------------------
# A scheduler twin builds its coefficient table itself (fp32, contiguous,
# (S, NCOEF), on the sample's device) and steps through it row by row, so
# re-checking the table, the row, the offset and the layouts every step is
# host time spent on invariants: at SD1.5 batch 1 on a CPU it was most of the
# step. ``_step_rows`` checks only what a step can change (the tensors it is
# handed) and calls the implementation directly; anything but the common case
# (contiguous tensors of one dtype, shape and device, no rescale, no noise
# tensor, nothing tracing) goes through ``sampler_step``, so every error
# message stays sampler_step's. On the CPU the common case is one call into
# the C++ library's direct binding, which checks the tensors itself (Python's
# checks and the dispatcher cost 5 us a step there, more than the kernel at
# SD1.5 batch 1). A thresholded step takes its x0 table (``x0_rows`` of the
# table) from the caller, who builds it once.

_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _plain(t: torch.Tensor, shape: torch.Size, dtype: torch.dtype, device: torch.device) -> bool:
    """t can share the sample's kernel call unchanged: a plain contiguous tensor of its shape, dtype, device."""
    return (type(t) is torch.Tensor and t.is_contiguous() and t.dtype == dtype and t.shape == shape
            and t.device == device)


def _step_rows(sample, model_output, coefficients, step, guidance_scale=1.0, guidance_rescale=0.0,
               stochastic=False, noise=None, seed=None, history=None, history2=None, history3=None, clip=0.0,
               threshold=None, threshold_rows=None, x0_noise=True, return_x0=False):
    """``sampler_step`` for a table the caller built (see above) and a row in range;
    ``threshold_rows`` is ``x0_rows(coefficients)`` when ``threshold`` is given, and
    ``x0_noise=False`` says its x0 has no noise term (the x0 pass then draws none).
    The arguments may be passed by position (0.5 us less than by name, per step)."""
    if type(model_output) is tuple:
        uncond, cond = model_output
    else:
        uncond, cond = model_output, None
    # the cheap tests first; each read of a tensor's shape, dtype or device builds a new Python object
    if (guidance_rescale == 0 and noise is None and type(sample) is torch.Tensor and type(uncond) is torch.Tensor
            and (cond is None or type(cond) is torch.Tensor)
            and not (torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack()
                     or torch._C._are_functorch_transforms_active())):
        if isinstance(step, torch.Tensor):
            row, row_tensor = 0, step
        else:
            row, row_tensor = step, None
        if (threshold is None and sample.is_cpu and backends.forced() in (None, "cpp")
                and (cpp := _build.module()) is not None):
            # the C++ kernel checks the tensors itself and declines (None) what it does not take as is
            seed_int, seed_tensor = normalize_seed("sampler_step", seed, sample.device) if stochastic else (0, None)
            out = cpp.sampler_step_plain(sample, uncond, cond, history, history2, history3, coefficients, row,
                                         row_tensor, guidance_scale, clip, bool(stochastic), seed_int, seed_tensor,
                                         return_x0)
            if out is not None:
                return out if return_x0 else out[0]
        shape, dtype, device = sample.shape, sample.dtype, sample.device
        if (dtype in _KERNEL_DTYPES and sample.is_contiguous() and (threshold is None or len(shape) >= 2)
                and _plain(uncond, shape, dtype, device) and (cond is None or _plain(cond, shape, dtype, device))
                and (history is None or _plain(history, shape, dtype, device))
                and (history2 is None or _plain(history2, shape, dtype, device))
                and (history3 is None or _plain(history3, shape, dtype, device))):
            seed_int, seed_tensor = normalize_seed("sampler_step", seed, device) if stochastic else (0, None)
            impl = sampler_step_op.implementation_for(device, dtype)
            bound = None
            if threshold is not None:
                x0, _ = impl(sample, uncond, cond, None, None, None, None, threshold_rows, row, row_tensor,
                             guidance_scale, None, 0.0, None, bool(stochastic and x0_noise), seed_int, seed_tensor,
                             0, False)
                bound = dynamic_threshold_bound(x0, *threshold)
            prev, x0 = impl(sample, uncond, cond, None, history, history2, history3, coefficients, row, row_tensor,
                            guidance_scale, None, clip, bound, bool(stochastic), seed_int, seed_tensor, 0, return_x0)
            return (prev, x0) if return_x0 else prev
    return sampler_step(sample, model_output, coefficients, step, guidance_scale=guidance_scale,
                        guidance_rescale=guidance_rescale, stochastic=stochastic, noise=noise, seed=seed,
                        history=history, history2=history2, history3=history3, clip=clip, threshold=threshold,
                        return_x0=return_x0)


def guidance(uncond: torch.Tensor, cond: torch.Tensor, guidance_scale: float, guidance_rescale: float = 0.0):
    """Classifier-free guidance alone, ``uncond + g (cond - uncond)`` (then rescaled),
    through the same kernel (an identity step): for pipelines whose step is not fused."""
    table = identity_coefficients().to(uncond.device)
    zeros = torch.zeros_like(table)
    zeros[0, COEF["pm"]] = 1.0
    return sampler_step(uncond, (uncond, cond), zeros, guidance_scale=guidance_scale,
                        guidance_rescale=guidance_rescale)


# ---- coefficient tables -----------------------------------------------------

def _f64(v, device=None) -> torch.Tensor:
    return torch.as_tensor(v, dtype=torch.float64, device=device)


def _table(rows: int, device, **cols) -> torch.Tensor:
    """An fp64 (rows, NCOEF) table with the named columns set (scalars broadcast)."""
    table = torch.zeros((rows, NCOEF), dtype=torch.float64, device=device)
    for name, v in cols.items():
        table[:, COEF[name]] = v
    return table


def identity_coefficients() -> torch.Tensor:
    """prev = sample, x0 = sample: a (1, NCOEF) fp32 table."""
    return _table(1, None, ax=1.0, px=1.0).float()


def x0_coefficients(prediction_type: str, alpha, sigma):
    """(ax, am) with x0 = ax x + am m for x = alpha x0 + sigma eps (variance-preserving
    alpha^2 + sigma^2 = 1, or flow alpha = 1 - sigma): epsilon, v_prediction, sample, flow_prediction."""
    alpha, sigma = _f64(alpha), _f64(sigma, alpha.device)
    if prediction_type == "epsilon":
        return 1.0 / alpha, -sigma / alpha
    if prediction_type == "v_prediction":
        return alpha, -sigma
    if prediction_type in ("sample", "original_sample"):
        return torch.zeros_like(alpha), torch.ones_like(alpha)
    if prediction_type == "flow_prediction":
        return torch.ones_like(alpha), -sigma
    raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES + ('flow_prediction',)}, "
                     f"got {prediction_type!r}")


def _vp_x0_coefficients(prediction_type: str, alpha, sigma):
    """x0_coefficients for the samplers that know epsilon, v_prediction and sample only
    (DDIM, DDPM, LCM: diffusers refuses flow_prediction there)."""
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
    return x0_coefficients(prediction_type, alpha, sigma)


def euler_coefficients(sigma, sigma_next, prediction_type: str = "epsilon", gamma=0.0, s_noise: float = 1.0):
    """EulerDiscrete (k-diffusion ``sample_euler``) on sigmas: one row per step.

    sigma, sigma_next : 1-D (steps,) the noise levels of the step; gamma (churn,
    ``min(s_churn / steps, sqrt 2 - 1)`` where applied) raises sigma to
    sigma_hat = sigma (1 + gamma) with noise ``s_noise * sqrt(sigma_hat^2 - sigma^2)``
    first. Returns fp64 (steps, NCOEF); x0 is diffusers' pred_original_sample.
    """
    sigma = _f64(sigma).reshape(-1)
    sigma_next = _f64(sigma_next, sigma.device).reshape(-1)
    gamma = _f64(gamma, sigma.device).expand_as(sigma)
    s_hat = sigma * (gamma + 1.0)
    k = s_noise * torch.sqrt((s_hat**2 - sigma**2).clamp_min(0.0))
    dt = sigma_next - s_hat
    if prediction_type == "epsilon":
        ax, am, px, pm = torch.ones_like(sigma), -s_hat, torch.ones_like(sigma), dt
    elif prediction_type == "v_prediction":
        s2 = sigma**2 + 1.0
        ax, am = 1.0 / s2, -sigma / torch.sqrt(s2)
        ratio = dt / s_hat  # prev = x + (x - x0) dt / sigma_hat
        px, pm = 1.0 + ratio * (1.0 - ax), -ratio * am
    elif prediction_type in ("sample", "original_sample"):
        ax, am = torch.zeros_like(sigma), torch.ones_like(sigma)
        ratio = dt / s_hat
        px, pm = 1.0 + ratio, -ratio
    else:
        raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
    # the churn noise enters x before the prediction: x' = x + k n
    return _table(sigma.numel(), sigma.device, ax=ax, am=am, an=ax * k, px=px, pm=pm, pn=px * k)


def euler_ancestral_coefficients(sigma, sigma_next, prediction_type: str = "epsilon"):
    """EulerAncestralDiscrete: an Euler step to sigma_down, then noise of std sigma_up."""
    sigma = _f64(sigma).reshape(-1)
    sigma_next = _f64(sigma_next, sigma.device).reshape(-1)
    sigma_up = torch.sqrt((sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2).clamp_min(0.0))
    sigma_down = torch.sqrt((sigma_next**2 - sigma_up**2).clamp_min(0.0))
    table = euler_coefficients(sigma, sigma_down, prediction_type)
    table[:, COEF["pn"]] = sigma_up
    return table


def ddim_coefficients(alpha_prod_t, alpha_prod_t_prev, prediction_type: str = "epsilon", eta: float = 0.0,
                      clip: bool = False, use_clipped_model_output: bool = False):
    """DDIM: x_prev = sqrt(a_prev) x0 + sqrt(1 - a_prev - std^2) eps + std n, std = eta sigma_t.

    alpha_prod_t, alpha_prod_t_prev : 1-D (steps,) cumulative alphas of the step.
    clip : whether the kernel clamps or thresholds x0 (then x0 enters the update through p0).
    """
    a = _f64(alpha_prod_t).reshape(-1)
    ap = _f64(alpha_prod_t_prev, a.device).reshape(-1)
    beta = 1.0 - a
    variance = (1.0 - ap) / beta * (1.0 - a / ap)
    std = eta * torch.sqrt(variance.clamp_min(0.0))
    direction = torch.sqrt((1.0 - ap - std**2).clamp_min(0.0))
    sa, sb, sap = torch.sqrt(a), torch.sqrt(beta), torch.sqrt(ap)
    ax, am = _vp_x0_coefficients(prediction_type, sa, sb)
    if prediction_type == "epsilon":
        ex, em = torch.zeros_like(a), torch.ones_like(a)
    elif prediction_type == "v_prediction":
        ex, em = sb, sa
    else:  # sample
        ex, em = 1.0 / sb, -sa / sb
    cols = dict(ax=ax, am=am, pn=std)
    if not clip:
        cols.update(px=sap * ax + direction * ex, pm=sap * am + direction * em)
    elif use_clipped_model_output:  # eps re-derived from the clipped x0
        cols.update(px=direction / sb, p0=sap - direction * sa / sb)
    else:
        cols.update(px=direction * ex, pm=direction * em, p0=sap)
    return _table(a.numel(), a.device, **cols)


def dpm_solver_coefficients(alpha_t, sigma_t, alpha_s0, sigma_s0, alpha_s1, sigma_s1, order, *,
                            x0_ax, x0_am, algorithm_type: str = "dpmsolver++", solver_type: str = "midpoint"):
    """DPM-Solver++ (2M) and SDE-DPM-Solver++ (2M SDE), data-prediction form.

    alpha/sigma : 1-D (steps,) at the target t, the current s0 and the previous s1.
    order : 1-D (steps,) 1 or 2 per step. x0_ax, x0_am : the model-output
    conversion at s0 (``x0_coefficients``). The history buffer holds the previous
    step's x0; the kernel writes the current one into it.
    """
    at, st = _f64(alpha_t).reshape(-1), _f64(sigma_t).reshape(-1)
    as0, ss0 = _f64(alpha_s0).reshape(-1), _f64(sigma_s0).reshape(-1)
    as1, ss1 = _f64(alpha_s1).reshape(-1), _f64(sigma_s1).reshape(-1)
    order = torch.as_tensor(order, device=at.device).reshape(-1)
    with torch.no_grad():
        lam_t, lam_s0, lam_s1 = torch.log(at) - torch.log(st), torch.log(as0) - torch.log(ss0), \
            torch.log(as1) - torch.log(ss1)
    h, h0 = lam_t - lam_s0, lam_s0 - lam_s1
    second = order >= 2
    inv_r0 = torch.where(second, h / torch.where(second, h0, 1.0), 0.0)  # 1 / r0, 0 on first-order rows
    if algorithm_type == "dpmsolver++":
        em1 = torch.expm1(-h)  # e^-h - 1 without cancellation at small h
        px, pn = st / ss0, torch.zeros_like(at)
        d0 = -at * em1
        if solver_type == "midpoint":
            d1 = -0.5 * at * em1
        elif solver_type == "heun":
            d1 = at * (em1 / h + 1.0)
        else:
            raise ValueError(f"solver_type must be 'midpoint' or 'heun', got {solver_type!r}")
    elif algorithm_type == "sde-dpmsolver++":
        one_m = -torch.expm1(-2.0 * h)  # 1 - e^-2h
        px, pn = st / ss0 * torch.exp(-h), st * torch.sqrt(one_m)
        d0 = at * one_m
        if solver_type == "midpoint":
            d1 = 0.5 * at * one_m
        elif solver_type == "heun":
            d1 = at * (one_m / (-2.0 * h) + 1.0)
        else:
            raise ValueError(f"solver_type must be 'midpoint' or 'heun', got {solver_type!r}")
    else:
        raise ValueError(f"algorithm_type must be 'dpmsolver++' or 'sde-dpmsolver++', got {algorithm_type!r}")
    # D1 = (x0 - h1) / r0 goes to the kernel's difference term, as diffusers computes it.
    pd = torch.where(second, d1 * inv_r0, 0.0)
    px = torch.nan_to_num(px)  # sigma_t = 0 at the end of a "zero" schedule: 0 / s, no inf
    return _table(at.numel(), at.device, ax=_f64(x0_ax, at.device).reshape(-1),
                  am=_f64(x0_am, at.device).reshape(-1), px=px, p0=d0, pn=pn, pd=pd, h10=1.0)


def ddpm_coefficients(alpha_prod_t, alpha_prod_t_prev, prediction_type: str = "epsilon",
                      variance_type: str = "fixed_small", noisy=None):
    """DDPM ancestral step (Ho et al. eq. 7): x_prev = c0 x0 + ct x + std n.

    alpha_prod_t, alpha_prod_t_prev : 1-D (steps,) cumulative alphas at t and at the
    previous timestep of the schedule (1 past the end). variance_type : "fixed_small"
    and "fixed_small_log" (std = sqrt of the posterior variance, clamped at 1e-20 as
    diffusers does), "fixed_large" (std = sqrt(beta_t)). noisy : 1-D bool (steps,),
    the rows that add noise (diffusers: t > 0); default all. x0 stays a separate
    term (p0), as diffusers computes it, so clip_sample clamps it in the kernel.
    """
    a = _f64(alpha_prod_t).reshape(-1)
    ap = _f64(alpha_prod_t_prev, a.device).reshape(-1)
    beta_prod_t, current_alpha = 1.0 - a, a / ap
    current_beta = 1.0 - current_alpha
    if variance_type in ("fixed_small", "fixed_small_log"):
        std = torch.sqrt(((1.0 - ap) / beta_prod_t * current_beta).clamp_min(1e-20))
    elif variance_type == "fixed_large":
        std = torch.sqrt(current_beta)
    else:
        raise ValueError(f"variance_type must be 'fixed_small', 'fixed_small_log' or 'fixed_large', "
                         f"got {variance_type!r}")
    if noisy is not None:
        std = torch.where(torch.as_tensor(noisy, device=a.device).reshape(-1), std, 0.0)
    ax, am = _vp_x0_coefficients(prediction_type, torch.sqrt(a), torch.sqrt(beta_prod_t))
    return _table(a.numel(), a.device, ax=ax, am=am, p0=torch.sqrt(ap) * current_beta / beta_prod_t,
                  px=torch.sqrt(current_alpha) * (1.0 - ap) / beta_prod_t, pn=std)


def lcm_coefficients(alpha_prod_t, alpha_prod_t_prev, c_skip, c_out, prediction_type: str = "epsilon",
                     clip: bool = False, last=None):
    """LCM (multistep consistency sampling): denoised = c_out x0 + c_skip x, then
    x_prev = sqrt(a_prev) denoised + sqrt(1 - a_prev) n (denoised alone on the last row).

    alpha_prod_t, alpha_prod_t_prev, c_skip, c_out : 1-D (steps,). last : 1-D bool
    (steps,), the rows without noise (diffusers: the final step). Without clip the
    kernel's x0 output is ``denoised`` (diffusers' second output); with clip (the kernel
    clamps or thresholds x0) it is the clamped x0 and the caller forms
    denoised = c_out x0 + c_skip x.
    """
    a = _f64(alpha_prod_t).reshape(-1)
    ap = _f64(alpha_prod_t_prev, a.device).reshape(-1)
    c_skip, c_out = _f64(c_skip, a.device).reshape(-1), _f64(c_out, a.device).reshape(-1)
    last = torch.zeros_like(a, dtype=torch.bool) if last is None else torch.as_tensor(last, device=a.device)
    keep = torch.where(last, 1.0, torch.sqrt(ap))
    pn = torch.where(last, 0.0, torch.sqrt(1.0 - ap))
    ax, am = _vp_x0_coefficients(prediction_type, torch.sqrt(a), torch.sqrt(1.0 - a))
    if clip:
        return _table(a.numel(), a.device, ax=ax, am=am, px=keep * c_skip, p0=keep * c_out, pn=pn)
    return _table(a.numel(), a.device, ax=c_out * ax + c_skip, am=c_out * am, p0=keep, pn=pn)


def heun_coefficients(sigma, sigma_next, first_stage, prediction_type: str = "epsilon"):
    """HeunDiscrete, both stages of each step, one row per stage (diffusers' step index).

    sigma, sigma_next : 1-D (rows,) the step's noise levels (the same pair for both
    stages of a step). first_stage : 1-D bool (rows,). The first stage is an Euler
    step to sigma_next that also writes into the one history buffer
    h = x + (dt / 2) d1 (d1 = (x - x0) / sigma, dt = sigma_next - sigma); the second
    evaluates x0 at sigma_next and finishes x_prev = h + (dt / 2) d2,
    d2 = (x - x0) / sigma_next: the average of the two slopes, with one buffer instead
    of diffusers' saved sample and derivative. x0 enters through p0 so that
    clip_sample can clamp it in the kernel.
    """
    sigma = _f64(sigma).reshape(-1)
    sigma_next = _f64(sigma_next, sigma.device).reshape(-1)
    first = torch.as_tensor(first_stage, device=sigma.device).reshape(-1)
    dt = sigma_next - sigma
    s_in = torch.where(first, sigma, sigma_next)  # where the model was evaluated
    if prediction_type == "epsilon":
        ax, am = torch.ones_like(sigma), -s_in
    elif prediction_type == "v_prediction":
        ax, am = 1.0 / (s_in**2 + 1.0), -s_in / torch.sqrt(s_in**2 + 1.0)
    elif prediction_type in ("sample", "original_sample"):
        ax, am = torch.zeros_like(sigma), torch.ones_like(sigma)
    else:
        raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
    r1 = dt / sigma  # first stage: prev = x + r1 (x - x0)
    r2 = torch.nan_to_num(0.5 * dt / s_in)  # second stage: prev = h + r2 (x - x0); 0 when sigma_next = 0
    px = torch.where(first, 1.0 + r1, r2)
    p0 = torch.where(first, -r1, -r2)
    p1 = torch.where(first, 0.0, 1.0)
    h1x = torch.where(first, 1.0 + 0.5 * r1, 0.0)
    h10 = torch.where(first, -0.5 * r1, 0.0)
    h11 = torch.where(first, 0.0, 1.0)  # the second stage leaves the buffer as it found it
    return _table(sigma.numel(), sigma.device, ax=ax, am=am, px=px, p0=p0, p1=p1, h1x=h1x, h10=h10, h11=h11)


def _unipc_b(hh: float, solver_type: str) -> float:
    if solver_type == "bh1":
        return hh
    if solver_type == "bh2":
        return math.expm1(hh)
    raise ValueError(f"solver_type must be 'bh1' or 'bh2', got {solver_type!r}")


def _unipc_rhos(hh: float, b_h: float, rks: list, rows: int) -> list:
    """UniPC's rho: the solution of sum_j rho_j rks_j^(i-1) = b_i, i = 1..rows, for the
    first ``rows`` of ``rks`` (the r_k of the earlier x0s, then 1), where
    b_i = i! h phi_(i+1)(hh) / B(h); a zero pivot (a step onto sigma = 0) gives NaN,
    as diffusers' solve does."""
    b, phi, fact = [], math.expm1(hh) / hh - 1.0, 1
    for i in range(1, rows + 1):
        b.append(phi * fact / b_h)
        fact *= i + 1
        phi = phi / hh - 1.0 / fact
    if rows == 1:
        return [b[0]]
    r = rks[:rows]
    if rows == 2:  # [[1, 1], [r0, r1]] rho = b
        det = r[1] - r[0]
        return [(b[0] * r[1] - b[1]) / det, (b[1] - b[0] * r[0]) / det] if det != 0 else [math.nan] * 2
    # rows == 3: Gaussian elimination on the Vandermonde system [[1,1,1],[r0,r1,r2],[r0^2,r1^2,r2^2]]
    a = [[r[j] ** i for j in range(3)] + [b[i]] for i in range(3)]
    for col in range(3):
        pivot = max(range(col, 3), key=lambda q: abs(a[q][col]))
        a[col], a[pivot] = a[pivot], a[col]
        if a[col][col] == 0:
            return [math.nan] * 3
        for q in range(col + 1, 3):
            f = a[q][col] / a[col][col]
            a[q] = [v - f * w for v, w in zip(a[q], a[col])]
    rho = [0.0] * 3
    for q in (2, 1, 0):
        rho[q] = (a[q][3] - sum(a[q][j] * rho[j] for j in range(q + 1, 3))) / a[q][q]
    return rho


def unipc_coefficients(alpha, sigma, orders, use_corrector, *, x0_ax, x0_am, solver_type: str = "bh2"):
    """UniPC (data prediction, UniP + UniC of order 1 to 3) as one kernel per step.

    alpha, sigma : 1-D (steps + 1,) the schedule's alpha_t and sigma_t. orders :
    1-D (steps,) the predictor's order per step (the corrector at step i has order
    ``orders[i - 1]``). use_corrector : 1-D bool (steps,). x0_ax, x0_am : 1-D (steps,)
    the model-output conversion at each step's sigma.

    Step i corrects the sample it is given, x_c = K_i + d (x0_i - x0_{i-1}), then
    predicts from x_c. Everything in UniC except the new x0 is known one step
    earlier, so the kernel keeps the corrector's partial sum
    K_i = a x_c,{i-1} + b x0_{i-1} + sum_k e_k (x0_{i-1-k} - x0_{i-1}) in ``history2``
    (step i - 1 writes it), the previous x0 in ``history`` and, for order 3, the
    one before in ``history3``. Then
    x_prev = A x_c + Bm x0_i + sum_k c_k (x0_i - x0_{i-k}), all in one affine map
    (k = 1 through the difference column pd, k = 2 through p0 and p3).
    Coefficients follow the UniP/UniC B(h) updates of the UniPC paper as diffusers
    implements them (order-2 predictor with rho = 1/2, order-1 corrector with
    rho = 1/2), in fp64.
    """
    if solver_type not in ("bh1", "bh2"):
        raise ValueError(f"solver_type must be 'bh1' or 'bh2', got {solver_type!r}")
    al = _f64(alpha).reshape(-1).cpu().tolist()
    sg = _f64(sigma).reshape(-1).cpu().tolist()
    orders = [int(o) for o in torch.as_tensor(orders).reshape(-1).tolist()]
    use_c = [bool(u) for u in torch.as_tensor(use_corrector).reshape(-1).tolist()]
    n = len(orders)
    if len(al) != n + 1 or len(sg) != n + 1 or len(use_c) != n:
        raise ValueError(f"unipc_coefficients: alpha and sigma need steps + 1 = {n + 1} values, use_corrector "
                         f"{n}; got {len(al)}, {len(sg)}, {len(use_c)}")
    if max(orders, default=1) > 3:  # (rows before the first step may say 0: they are never run)
        raise ValueError(f"unipc_coefficients: orders must be at most 3, got {max(orders)}")

    def lam(k):  # log-SNR; +inf at sigma = 0 (the final step of a "zero" schedule)
        return math.log(al[k]) - math.log(sg[k]) if sg[k] > 0 else math.inf

    def ratio(num, den):  # NaN where diffusers divides by zero too (r_k = 0: a step onto sigma = 0)
        return num / den if den != 0 else math.nan

    def corrector(j, q):
        """(a, b, d, [e_1 .. e_(q-1)]) of UniC at step j (from j - 1 to j), order q."""
        h = lam(j) - lam(j - 1)
        hh = -h
        b_h = _unipc_b(hh, solver_type)
        a, b = sg[j] / sg[j - 1], -al[j] * math.expm1(hh)
        if q == 1:
            return a, b, -al[j] * b_h * 0.5, []
        rks = [ratio(lam(j - 1 - k) - lam(j - 1), h) for k in range(1, q)] + [1.0]
        rho = _unipc_rhos(hh, b_h, rks, q)
        return a, b, -al[j] * b_h * rho[-1], [ratio(-al[j] * b_h * rho[k], rks[k]) for k in range(q - 1)]

    rows = torch.zeros((n, NCOEF), dtype=torch.float64)
    ax = _f64(x0_ax).reshape(-1).expand(n).tolist()
    am = _f64(x0_am).reshape(-1).expand(n).tolist()
    for i in range(n):
        k = {name: 0.0 for name in COEF}
        k["ax"], k["am"] = ax[i], am[i]
        h = lam(i + 1) - lam(i)
        hh = -h
        big_a = sg[i + 1] / sg[i]
        k["p0"] = -al[i + 1] * math.expm1(hh)
        c = []  # c_k on (x0_i - x0_{i-k})
        if orders[i] >= 2:
            b_h = _unipc_b(hh, solver_type)
            rks = [ratio(lam(i - q) - lam(i), h) for q in range(1, orders[i])] + [1.0]
            # the order-2 predictor takes rho = 1/2 (diffusers' simplification); order 3 solves
            rho = [0.5] if orders[i] == 2 else _unipc_rhos(hh, b_h, rks, orders[i] - 1)
            c = [ratio(al[i + 1] * b_h * rho[q], rks[q]) for q in range(orders[i] - 1)]
        pd = c[0] if c else 0.0
        if len(c) == 2:  # (x0 - h3): x0 through p0, h3 through p3
            k["p0"] += c[1]
            k["p3"] = -c[1]
        d = 0.0
        if use_c[i]:  # x_c = h2 + d (x0 - h1)
            _, _, d, _ = corrector(i, orders[i - 1])
            k["p2"], k["pd"] = big_a, big_a * d + pd
        else:
            k["px"], k["pd"] = big_a, pd
        k["h10"], k["h31"] = 1.0, 1.0  # history <- x0, history3 <- the previous x0 (when order 3 keeps one)
        if i + 1 < n and use_c[i + 1]:  # K_{i+1} = a x_c + b x0 + e_1 (h1 - x0) + e_2 (h3 - x0)
            a2, b2, _, e = corrector(i + 1, orders[i])
            e1, e2 = (e + [0.0, 0.0])[:2]
            k["h20"], k["h21"], k["h23"] = b2 - e1 - e2, e1, e2
            if use_c[i]:
                k["h22"] = a2
                k["h20"] += a2 * d
                k["h21"] -= a2 * d
            else:
                k["h2x"] = a2
        rows[i] = torch.tensor([k[name] for name in COEF], dtype=torch.float64)
    return rows


def flow_match_euler_coefficients(sigma, sigma_next, stochastic: bool = False):
    """FlowMatchEulerDiscrete: prev = x + (sigma_next - sigma) v, or with
    stochastic sampling prev = (1 - sigma_next) x0 + sigma_next n, x0 = x - sigma v."""
    sigma = _f64(sigma).reshape(-1)
    sigma_next = _f64(sigma_next, sigma.device).reshape(-1)
    if stochastic:
        keep = 1.0 - sigma_next
        return _table(sigma.numel(), sigma.device, ax=1.0, am=-sigma, px=keep, pm=-keep * sigma, pn=sigma_next)
    return _table(sigma.numel(), sigma.device, ax=1.0, am=-sigma, px=1.0, pm=sigma_next - sigma)


# ---- steps with scalar coefficients -----------------------------------------

def _device_of(sample: torch.Tensor, *values) -> torch.device:
    """Where to compute coefficients: on the device of a tensor argument (no host
    sync for 0-d device tensors), else on the host."""
    for v in values:
        if isinstance(v, torch.Tensor):
            if v.numel() != 1:
                raise ValueError(f"scalar coefficients must be floats or 1-element tensors, got shape {tuple(v.shape)}")
            return v.device
    return torch.device("cpu")


def _row_to(table: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
    return table.to(device=sample.device, dtype=torch.float32)


def euler_step(sample, model_output, sigma, sigma_next, *, prediction_type: str = "epsilon", gamma: float = 0.0,
               s_noise: float = 1.0, **kwargs):
    """One EulerDiscrete step from sigma to sigma_next (floats or 0-d tensors).

    ``model_output`` may be (uncond, cond); ``kwargs`` are those of :func:`sampler_step`
    (guidance_scale, guidance_rescale, noise, seed, offset, return_x0). gamma > 0 is
    diffusers' churn (``s_churn``): noise is then drawn or taken from ``noise``.
    """
    dev = _device_of(sample, sigma, sigma_next)
    table = euler_coefficients(_f64(sigma, dev), _f64(sigma_next, dev), prediction_type, gamma, s_noise)
    return sampler_step(sample, model_output, _row_to(table, sample), stochastic=float(gamma) > 0, **kwargs)


def euler_ancestral_step(sample, model_output, sigma, sigma_next, *, prediction_type: str = "epsilon", **kwargs):
    """One EulerAncestralDiscrete step (always stochastic)."""
    dev = _device_of(sample, sigma, sigma_next)
    table = euler_ancestral_coefficients(_f64(sigma, dev), _f64(sigma_next, dev), prediction_type)
    return sampler_step(sample, model_output, _row_to(table, sample), stochastic=True, **kwargs)


def ddim_step(sample, model_output, alpha_prod_t, alpha_prod_t_prev, *, prediction_type: str = "epsilon",
              eta: float = 0.0, clip_sample_range: float | None = None, use_clipped_model_output: bool = False,
              **kwargs):
    """One DDIM step between cumulative alphas (floats or 0-d tensors); eta > 0 adds noise.
    ``threshold=(ratio, sample_max_value)`` in kwargs applies diffusers' dynamic thresholding."""
    dev = _device_of(sample, alpha_prod_t, alpha_prod_t_prev)
    clip = clip_sample_range is not None
    # x0 enters through its own column when the kernel clamps or thresholds it
    table = ddim_coefficients(_f64(alpha_prod_t, dev), _f64(alpha_prod_t_prev, dev), prediction_type, eta,
                              clip or kwargs.get("threshold") is not None, use_clipped_model_output)
    return sampler_step(sample, model_output, _row_to(table, sample), stochastic=eta > 0,
                        clip=float(clip_sample_range) if clip else 0.0, **kwargs)


def vp_alpha_sigma(sigma):
    """(alpha_t, sigma_t) of a variance-preserving model at Karras sigma: alpha = 1 / sqrt(sigma^2 + 1)."""
    sigma = _f64(sigma)
    alpha = 1.0 / torch.sqrt(sigma**2 + 1.0)
    return alpha, sigma * alpha


def dpmpp_2m_step(sample, model_output, history, sigma, sigma_next, sigma_prev=None, *,
                  prediction_type: str = "epsilon", sde: bool = False, solver_type: str = "midpoint", **kwargs):
    """One DPM++ 2M (or 2M SDE) step on Karras sigmas of a variance-preserving model.

    history : Tensor of sample's shape/dtype: the previous step's x0, replaced by this
    step's. sigma_prev None makes the step first order (the first step). sigmas are
    floats or 0-d tensors; ``kwargs`` as for :func:`sampler_step`.
    """
    dev = _device_of(sample, sigma, sigma_next, sigma_prev)
    first = sigma_prev is None
    at, st = vp_alpha_sigma(_f64(sigma_next, dev))
    a0, s0 = vp_alpha_sigma(_f64(sigma, dev))
    a1, s1 = (a0, s0) if first else vp_alpha_sigma(_f64(sigma_prev, dev))
    ax, am = x0_coefficients(prediction_type, a0, s0)
    table = dpm_solver_coefficients(at, st, a0, s0, a1, s1, torch.tensor([1 if first else 2], device=dev),
                                    x0_ax=ax, x0_am=am, solver_type=solver_type,
                                    algorithm_type="sde-dpmsolver++" if sde else "dpmsolver++")
    return sampler_step(sample, model_output, _row_to(table, sample), stochastic=sde, history=history, **kwargs)


def flow_match_euler_step(sample, model_output, sigma, sigma_next, *, stochastic: bool = False, **kwargs):
    """One FlowMatchEulerDiscrete step (SD3, FLUX): prev = x + (sigma_next - sigma) v."""
    dev = _device_of(sample, sigma, sigma_next)
    table = flow_match_euler_coefficients(_f64(sigma, dev), _f64(sigma_next, dev), stochastic)
    return sampler_step(sample, model_output, _row_to(table, sample), stochastic=stochastic, **kwargs)


# ---- a k-diffusion-style loop -----------------------------------------------

SAMPLERS = ("euler", "euler_ancestral", "dpmpp_2m", "dpmpp_2m_sde")


def sample(model_fn: Callable[[torch.Tensor, torch.Tensor], object], x: torch.Tensor, sigmas: Sequence[float] |
           torch.Tensor, sampler: str = "dpmpp_2m", *, guidance_scale: float = 1.0, guidance_rescale: float = 0.0,
           seed=None, offset: int = 0, callback: Callable | None = None) -> torch.Tensor:
    """k-diffusion-style sampling: ``model_fn(x, sigma)`` returns the denoised x0
    (or a pair (uncond, cond) of them, guided in the step), x = x0 + sigma eps.

    sigmas : 1-D (steps + 1,), decreasing, usually ending in 0. The coefficient
    table is built once; each step is one kernel launch.
    """
    fn = "sample"
    _ops.check_choice(fn, "sampler", sampler, SAMPLERS)
    sig = _f64(torch.as_tensor(sigmas).detach().cpu()).reshape(-1)
    if sig.numel() < 2:
        raise ValueError(f"{fn}: sigmas needs at least 2 values, got {sig.numel()}")
    cur, nxt = sig[:-1], sig[1:]
    history = None
    stochastic = sampler in ("euler_ancestral", "dpmpp_2m_sde")
    if sampler == "euler":
        table = euler_coefficients(cur, nxt, "sample")
    elif sampler == "euler_ancestral":
        table = euler_ancestral_coefficients(cur, nxt, "sample")
    else:
        ones = torch.ones_like(cur)
        # k-diffusion's variance-exploding form: alpha = 1, sigma_t = sigma; the last
        # step to sigma = 0 and the first step are first order, as in k-diffusion.
        prev = torch.cat([cur[:1], cur[:-1]])
        order = torch.full_like(cur, 2, dtype=torch.int64)
        order[0] = 1
        order[nxt == 0] = 1
        table = dpm_solver_coefficients(ones, nxt, ones, cur, ones, prev, order, x0_ax=0.0, x0_am=1.0,
                                        algorithm_type="sde-dpmsolver++" if sampler == "dpmpp_2m_sde"
                                        else "dpmsolver++")
        history = torch.zeros_like(x)
    table = table.to(device=x.device, dtype=torch.float32)
    if stochastic and seed is None:
        seed = normalize_seed(fn, seed, x.device)[0]  # one key for the whole loop; the row moves the counters
    sig_dev = sig.to(device=x.device, dtype=x.dtype if x.dtype != torch.float64 else torch.float64)
    for i in range(cur.numel()):
        out = model_fn(x, sig_dev[i])
        x = sampler_step(x, out, table, i, guidance_scale=guidance_scale, guidance_rescale=guidance_rescale,
                         stochastic=stochastic, seed=seed if stochastic else None, offset=offset, history=history)
        if callback is not None:
            callback(i, x)
    return x
