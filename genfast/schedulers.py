"""Drop-in twins of diffusers' schedulers whose ``step()`` is one fused kernel.

    pipe.scheduler = genfast.schedulers.from_diffusers(pipe.scheduler)

Each twin subclasses the diffusers scheduler of the same name, so the
constructor, ``from_config`` (both ways), ``set_timesteps``, ``timesteps``,
``sigmas``, ``init_noise_sigma``, ``scale_model_input`` and ``add_noise`` are
diffusers' own. ``step()`` keeps diffusers' signature and return type and runs
``genfast.diffusion.sampler_step`` instead: guidance (``step_with_guidance``),
prediction conversion, the update and the noise in one kernel.

Coefficients: after ``set_timesteps`` the twin computes every step's
coefficients in fp64 on the host from diffusers' own schedule, once, and keeps
them as an fp32 table on the sample's device (re-built only when a per-call
option that changes them, such as ``eta`` or ``s_churn``, changes). A step
passes its row; with ``device_step_counter = True`` the row is a 0-d int64
device tensor the kernel reads and the step advances in place, so one captured
step replays for the whole loop. No step reads a device value on the host,
except diffusers' own lookup of the first step's timestep in the schedule
(skipped when ``set_begin_index`` was called, as pipelines do).

Noise: ``generator`` or ``variance_noise`` produce exactly diffusers' noise
(the same ``randn_tensor`` call), so results match diffusers; without them the
kernel draws from genfast's stream with a seed drawn from torch's default
generator at ``set_timesteps`` (``torch.manual_seed`` governs it; ``noise_seed``
may be set to an int or a 0-d int64 device tensor).

Multistep state is one to three buffers that the kernel updates in place: the
previous x0 (DPM++ 2M), the first stage's partial update (Heun), the previous
x0, the corrector's partial sum and, at order 3, the x0 before (UniPC).
diffusers' own state (``model_outputs``, ``last_sample``, Heun's
``sample``/``prev_derivative``) is not maintained.

On the CPU, a deterministic Euler or flow-matching step that repeats the
last one (same table, options, dtype and layout: every step of a plain loop
after the first) is one call into the C++ library's direct binding, which
checks the tensors itself; anything else runs the full step (``_gf_quick``).

Dynamic thresholding (``thresholding=True``: DDPM, DDIM, LCM, DPMSolverMultistep,
UniPCMultistep) is fused too: the step predicts x0 in one pass, takes each
sample's bound from it on the device and runs the step on the thresholded x0
(``genfast.diffusion.sampler_step``'s ``threshold``); no host sync.

Configurations the kernel does not cover (third-order DPM-Solver,
noise-prediction DPM-Solver and UniPC, learned variance, per-token
timesteps, UniPC with ``solver_p``) run diffusers' own ``step`` unchanged: a
twin is never wrong, only sometimes not faster (``fused`` says which).

diffusers is an optional dependency: the twin classes are created on first
access, which imports it.
"""
from __future__ import annotations

from collections import OrderedDict

import numpy as np
import torch

from . import _build
from . import diffusion as D
from .backends import forced as _forced_backend

SUPPORTED = ("EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler", "DDIMScheduler", "DDPMScheduler",
             "LCMScheduler", "HeunDiscreteScheduler", "DPMSolverMultistepScheduler", "UniPCMultistepScheduler",
             "FlowMatchEulerDiscreteScheduler")
_classes: dict[str, type] = {}


def __getattr__(name: str):
    if name in SUPPORTED:
        if name not in _classes:
            _classes[name] = _BUILDERS[name]()
        return _classes[name]
    raise AttributeError(f"module 'genfast.schedulers' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(SUPPORTED))


def from_diffusers(scheduler):
    """The fused twin of a diffusers scheduler instance, with its config and state.

    Raises ValueError for a scheduler class without a twin (see ``SUPPORTED``).
    """
    name = type(scheduler).__name__
    if getattr(type(scheduler), "_genfast_twin", False):
        return scheduler
    if name not in SUPPORTED:
        raise ValueError(f"from_diffusers: no fused twin for {name}; supported: {SUPPORTED}")
    cls = __getattr__(name)
    twin = cls.__new__(cls)
    twin.__dict__.update(scheduler.__dict__)
    twin._gf_reset()
    return twin


# ---- the shared machinery ---------------------------------------------------

class _Fused:
    """Mixed into every twin: table cache, checks, the fused call, step counters."""

    _genfast_twin = True
    device_step_counter = False  # True: the row is a device tensor the step advances (CUDA-graph replay)
    _gf_needs_schedule = True  # False: diffusers steps over the training schedule without set_timesteps (DDPM)
    _gf_plain = None  # (table, output class, returns x0, C++ module): what _gf_quick repeats

    def _gf_x0_step(self, mo, sample, table, row, guidance, stochastic, noise, output_cls, return_dict):
        """A step whose output is (prev_sample, pred_original_sample), clip_sample or
        thresholding in the kernel (DDIM, DDPM)."""
        prev, x0 = self._gf_run(mo, sample, table, row, guidance=guidance, stochastic=stochastic, noise=noise,
                                clip=self._gf_clip, return_x0=True)
        self._gf_counter = row + 1
        if not return_dict:
            return prev, x0
        return _output(output_cls, prev_sample=prev, pred_original_sample=x0)

    @property
    def _gf_clip(self) -> float:
        """clip_sample's bound as the kernel takes it (0: no clipping; thresholding, when on, wins)."""
        c = self.config
        return float(c.clip_sample_range) if c.get("clip_sample") and not c.get("thresholding") else 0.0

    @property
    def _gf_threshold(self):
        """(dynamic_thresholding_ratio, sample_max_value) when thresholding is on, else None."""
        c = self.config
        return (c.dynamic_thresholding_ratio, c.sample_max_value) if c.get("thresholding") else None

    def _gf_reset(self, keep_schedule: bool = False):
        """Forgets the loop's state; ``keep_schedule``: the schedule is the one the
        tables were built for, so they (and the host copies) stay."""
        if not keep_schedule:
            self._gf_tables = {}
            self._gf_host = None  # host fp64 copies of the schedule (set_timesteps', or the first step's)
            self._gf_schedule = None  # the schedule the tables are for (_schedule_of)
        self._gf_x0_table = None  # (x0_rows, takes noise) of the table fetched last: a thresholded step's x0 pass
        self._gf_plain = None
        self._gf_history = None
        self._gf_row = None
        self._gf_counter = None  # the next row, for schedulers that look rows up by timestep value
        self._gf_start = None  # the first row of the multistep warm-up (see _gf_warmup_start)
        self.noise_seed = int(torch.empty((), dtype=torch.int64).random_().item())

    def set_timesteps(self, *args, **kwargs):
        """diffusers' set_timesteps. When it makes the schedule of the call before (a
        pipeline calls it once per image with the same arguments), the coefficient
        tables built on the device at that loop's first step are kept: no host-to-device
        copy and no host sync in the next loop, which can therefore be captured in a
        CUDA graph as it is. The comparison reads the new schedule back to the host."""
        super().set_timesteps(*args, **kwargs)
        schedule = _schedule_of(self)
        self._gf_reset(keep_schedule=_same_schedule(schedule, getattr(self, "_gf_schedule", None)))
        self._gf_schedule = schedule
        if self._gf_host is None:  # the steps' host copies: these, not a second copy at the first step
            self._gf_host = {"timesteps": schedule[1].numpy(), "sigmas": schedule[2]}

    @property
    def fused(self) -> bool:
        """Whether step() runs the fused kernel for this config (else diffusers' step)."""
        return self._gf_supported() is None

    def _gf_supported(self):
        """None, or the reason this config falls back to diffusers' step."""
        return None

    def _gf_check(self, model_output, sample, name="model_output"):
        # runs every step: the message prefix is formed only on the way to an error
        if self._gf_needs_schedule and getattr(self, "num_inference_steps", None) is None:
            raise ValueError(f"{type(self).__name__}.step: call set_timesteps before step")
        if not (isinstance(model_output, torch.Tensor) and isinstance(sample, torch.Tensor)):
            self._gf_bad_input(model_output, sample, name)
        if model_output.shape != sample.shape or model_output.device != sample.device:
            self._gf_bad_input(model_output, sample, name)
        if self.config.get("thresholding"):  # checked here, before any state changes
            D.check_threshold(f"{type(self).__name__}.step", self._gf_threshold)

    def _gf_bad_input(self, model_output, sample, name):
        fn = f"{type(self).__name__}.step"
        for arg, t in ((name, model_output), ("sample", sample)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{fn}: {arg} must be a torch.Tensor, got {type(t).__name__}")
        if model_output.shape != sample.shape:
            raise ValueError(f"{fn}: {name} must have the shape of sample {tuple(sample.shape)}, "
                             f"got {tuple(model_output.shape)}")
        if model_output.device != sample.device:
            raise ValueError(f"{fn}: {name} must be on the device of sample ({sample.device}), "
                             f"got {model_output.device}")

    def _gf_index_of(self, timestep) -> int:
        """The row of ``timestep`` in the schedule (diffusers' rule: the second match
        if it appears twice); ValueError if it is not in the schedule."""
        schedule = self.timesteps
        if isinstance(timestep, torch.Tensor):
            timestep = timestep.to(schedule.device)
        indices = (schedule == timestep).nonzero()  # one host sync, at the first step only
        if len(indices) == 0:
            t = timestep.item() if isinstance(timestep, torch.Tensor) else timestep
            raise ValueError(f"{type(self).__name__}.step: timestep {t} is not in the schedule "
                             f"(scheduler.timesteps)")
        return int(indices[1 if len(indices) > 1 else 0].item())

    def _gf_row_of(self, timestep) -> int:
        """The row of ``timestep`` for schedulers that look their coefficients up by
        timestep value (DDIM, DDPM): found on the host when the timestep is a number;
        a tensor (which may live on the device) is looked up once, then the row is counted."""
        if self._gf_host is None:
            self._gf_host = {"timesteps": _host(self.timesteps).numpy()}
        if not isinstance(timestep, torch.Tensor):
            hits = np.nonzero(self._gf_host["timesteps"] == float(timestep))[0]
            if len(hits) == 0:
                raise ValueError(f"{type(self).__name__}.step: timestep {timestep} is not in the schedule "
                                 f"(scheduler.timesteps)")
            return int(hits[0])
        return self._gf_index_of(timestep) if self._gf_counter is None else self._gf_counter

    def _gf_warmup_start(self, row: int) -> int:
        """The row where this loop's multistep warm-up began (DPM-Solver, UniPC): it fixes
        every row's order, so it keys the table. Once the warm-up is over
        (lower_order_nums == solver_order) the rows from here on are the same for any
        earlier start: the loop keeps the one it had, and the table is not rebuilt."""
        if self._gf_start is None or self.lower_order_nums < self.config.solver_order:
            self._gf_start = row - self.lower_order_nums
        return self._gf_start

    def _gf_init_step_index(self, timestep) -> None:
        if self.step_index is None:
            self._step_index = self._begin_index if self.begin_index is not None else self._gf_index_of(timestep)

    def _gf_table(self, key, device, build):
        """The fp32 coefficient table on ``device`` (built once per schedule and key) and
        the host-side facts about its rows that build returned (plain Python values,
        so step() never inspects a tensor on the host). With thresholding on, the
        table's ``x0_rows`` are built with it and kept in ``_gf_x0_table`` for this step,
        with whether any row's x0 takes noise (churn), read on the host before the copy."""
        entry = self._gf_tables.get((key, device))
        if entry is None:
            table, meta = build()
            x0_rows = None
            if self.config.get("thresholding"):
                x0_rows = (D.x0_rows(table.to(device=device, dtype=torch.float32)),
                           bool(table[:, D.COEF["an"]].any()))
            entry = (table.to(device=device, dtype=torch.float32), meta, x0_rows)
            self._gf_tables[(key, device)] = entry
        self._gf_x0_table = entry[2]
        return entry[0], entry[1]

    def _gf_step_arg(self, row: int, device):
        """The device step counter (device_step_counter = True), created at the first step's row."""
        if self._gf_row is None or self._gf_row.device != device:
            self._gf_row = torch.tensor(row, dtype=torch.int64, device=device)
        return self._gf_row

    def _gf_run(self, model_output, sample, table, row, *, guidance=None, stochastic=False, noise=None,
                history=None, history2=None, history3=None, clip=0.0, return_x0=False):
        """The fused step; model_output is a tensor or (uncond, cond); guidance = (scale, rescale).
        With thresholding on, the first pass predicts x0 with the x0 rows of ``table``
        (built once per table)."""
        out_dtype = (model_output[0] if type(model_output) is tuple else model_output).dtype
        if out_dtype != sample.dtype:  # diffusers computes in fp32 and returns the model's dtype
            sample = sample.to(out_dtype)
        scale, rescale = guidance if guidance is not None else (1.0, 0.0)
        step = self._gf_step_arg(row, sample.device) if self.device_step_counter else row
        threshold = self._gf_threshold
        x0_rows, x0_noise = self._gf_x0_table if threshold is not None else (None, True)
        # the twin built the table and owns the row: only the per-step tensors are checked
        result = D._step_rows(sample, model_output, table, step, scale, rescale, stochastic, noise, self.noise_seed,
                              history, history2, history3, clip, threshold, x0_rows, x0_noise, return_x0)
        if self.device_step_counter:
            self._gf_row.add_(1)
        return result

    def _gf_quick(self, uncond, cond, timestep, sample, scale, return_dict):
        """The step the last one was, again, in one call: the C++ library's direct
        binding with the table and output class the last step recorded in ``_gf_plain``
        (a deterministic CPU step of a row-indexed sampler: Euler, flow matching, with
        their default options), or None, and the caller takes the full path, which
        checks everything and raises. The full path's Python costs ~5 us a step, as
        much as the kernel at SD1.5 batch 1 (see ``_gf_record_plain``)."""
        plain, row = self._gf_plain, self._step_index
        C = torch._C
        if (plain is None or row is None or self.device_step_counter or type(sample) is not torch.Tensor
                or type(uncond) is not torch.Tensor or (cond is not None and type(cond) is not torch.Tensor)
                or not (type(timestep) is float
                        or (type(timestep) is torch.Tensor and timestep.is_floating_point()))
                or torch.compiler.is_compiling() or C._len_torch_dispatch_stack()
                or C._are_functorch_transforms_active() or _forced_backend() not in (None, "cpp")):
            return None
        table, output_cls, return_x0, cpp = plain
        # declines (None) anything not plain: another dtype, shape, layout or device, a row out of range
        out = cpp.sampler_step_plain(sample, uncond, cond, None, None, None, table, row, None, scale, 0.0, False,
                                     0, None, return_x0)
        if out is None:
            return None
        self._step_index = row + 1
        if not return_dict:
            return out if return_x0 else (out[0],)
        # _output's result, built in half its time (this path never runs under torch.compile)
        result = output_cls.__new__(output_cls)
        OrderedDict.__setitem__(result, "prev_sample", out[0])
        result.__dict__["prev_sample"] = out[0]
        if return_x0:
            OrderedDict.__setitem__(result, "pred_original_sample", out[1])
            result.__dict__["pred_original_sample"] = out[1]
        return result

    def _gf_record_plain(self, plain, table, sample, guidance, output_cls, return_x0):
        """After a full step: whether the next one may take ``_gf_quick``. ``plain``: the
        step ran with the sampler's default options and no noise."""
        plain = (plain and sample.is_cpu and sample.dtype in D._KERNEL_DTYPES and sample.is_contiguous()
                 and (guidance is None or guidance[1] == 0))
        cpp = _build.module() if plain else None
        self._gf_plain = (table, output_cls, return_x0, cpp) if cpp is not None else None

    def _gf_noise(self, shape, generator, device, dtype):
        from diffusers.utils.torch_utils import randn_tensor

        return randn_tensor(shape, generator=generator, device=device, dtype=dtype)

    def step_with_guidance(self, noise_uncond, noise_cond, timestep, sample, guidance_scale,
                           guidance_rescale: float = 0.0, **kwargs):
        """``step()`` on ``uncond + guidance_scale (cond - uncond)`` (rescaled as diffusers'
        ``rescale_noise_cfg`` when guidance_rescale > 0), guidance fused into the step.
        ``kwargs`` are ``step()``'s (generator, return_dict, eta, ...)."""
        if (self._gf_plain is not None and not guidance_rescale and type(guidance_scale) in (float, int)
                and (not kwargs or kwargs.keys() <= _QUICK_KWARGS)):
            out = self._gf_quick(noise_uncond, noise_cond, timestep, sample, guidance_scale,
                                 kwargs.get("return_dict", True))
            if out is not None:
                return out
        if not (isinstance(noise_uncond, torch.Tensor) and isinstance(noise_cond, torch.Tensor)
                and noise_cond.shape == noise_uncond.shape and 0.0 <= guidance_rescale <= 1.0):
            fn = f"{type(self).__name__}.step_with_guidance"
            for arg, t in (("noise_uncond", noise_uncond), ("noise_cond", noise_cond)):
                if not isinstance(t, torch.Tensor):
                    raise TypeError(f"{fn}: {arg} must be a torch.Tensor, got {type(t).__name__}")
            if noise_cond.shape != noise_uncond.shape:
                raise ValueError(f"{fn}: noise_cond must have the shape of noise_uncond "
                                 f"{tuple(noise_uncond.shape)}, got {tuple(noise_cond.shape)}")
            raise ValueError(f"{fn}: guidance_rescale must be in [0, 1], got {guidance_rescale}")
        guided = _Guided(noise_uncond, noise_cond, guidance_scale, guidance_rescale)
        if not self.fused:  # the pipeline's ops, then diffusers' step
            return self.step(_materialize(guided), timestep, sample, **kwargs)
        return self._step(guided, timestep, sample, **kwargs)


# step_with_guidance's keyword arguments that leave a deterministic step the same (a
# generator draws nothing there)
_QUICK_KWARGS = {"return_dict", "generator"}


class _Guided:
    """A (uncond, cond) model output with its guidance parameters, passed to _step."""

    def __init__(self, uncond, cond, scale, rescale):
        self.uncond, self.cond, self.scale, self.rescale = uncond, cond, float(scale), float(rescale)


def _unpack(model_output):
    """(model_output for sampler_step, guidance or None, a tensor for shape/dtype checks)."""
    if isinstance(model_output, _Guided):
        return (model_output.uncond, model_output.cond), (model_output.scale, model_output.rescale), \
            model_output.uncond
    return model_output, None, model_output


def _materialize(model_output):
    """A plain model output: guidance applied with the pipeline's own ops (for diffusers' step)."""
    if not isinstance(model_output, _Guided):
        return model_output
    u, c = model_output.uncond, model_output.cond
    guided = u + model_output.scale * (c - u)
    if model_output.rescale > 0:
        dims = list(range(1, guided.dim()))
        factor = c.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True)
        guided = model_output.rescale * guided * factor + (1 - model_output.rescale) * guided
    return guided


def _output(cls, **fields):
    """``cls(**fields)`` for a diffusers ``BaseOutput``, built directly: its ``__post_init__``
    walks ``dataclasses.fields`` on every call (~2 us, a tenth of a small fused step).
    The result is the same: each field an attribute, the non-None ones also dict items."""
    out = cls.__new__(cls)
    for name, value in fields.items():
        if value is not None:
            OrderedDict.__setitem__(out, name, value)
        object.__setattr__(out, name, value)  # not __dict__.update: torch 2.11's dynamo cannot trace it
    return out


def _schedule_of(scheduler):
    """The schedule set_timesteps made, on the host (the tables are built from it and the
    frozen config): the step count, the timesteps and, where the scheduler has them, the sigmas."""
    sigmas = scheduler.__dict__.get("sigmas")
    return (scheduler.__dict__.get("num_inference_steps"), _host(scheduler.timesteps),
            _host(sigmas) if isinstance(sigmas, torch.Tensor) else None)


def _same_schedule(a, b) -> bool:
    return (a is not None and b is not None and a[0] == b[0] and torch.equal(a[1], b[1])
            and (a[2] is None) == (b[2] is None) and (a[2] is None or torch.equal(a[2], b[2])))


def _is_index(timestep) -> bool:
    """diffusers' test for a step index passed as the timestep (an int, a torch.IntTensor
    or LongTensor), without isinstance on the legacy tensor types (0.5 us a step)."""
    if isinstance(timestep, torch.Tensor):
        return timestep.dtype in (torch.int32, torch.int64) and timestep.device.type == "cpu"
    return isinstance(timestep, int)


def _host(t) -> torch.Tensor:
    return torch.as_tensor(t).detach().to("cpu", torch.float64)


# ---- EulerDiscrete ----------------------------------------------------------

def _euler_class():
    import diffusers
    from diffusers.schedulers.scheduling_euler_discrete import EulerDiscreteSchedulerOutput

    class EulerDiscreteScheduler(_Fused, diffusers.EulerDiscreteScheduler):
        """diffusers' EulerDiscreteScheduler with a fused ``step()``."""

        def step(self, model_output, timestep, sample, s_churn: float = 0.0, s_tmin: float = 0.0,
                 s_tmax: float = float("inf"), s_noise: float = 1.0, generator=None, return_dict: bool = True):
            if self._gf_plain is not None and not s_churn:  # no churn: every row deterministic, as recorded
                out = self._gf_quick(model_output, None, timestep, sample, 1.0, return_dict)
                if out is not None:
                    return out
            return self._step(model_output, timestep, sample, s_churn, s_tmin, s_tmax, s_noise, generator,
                              return_dict)

        def _step(self, model_output, timestep, sample, s_churn=0.0, s_tmin=0.0, s_tmax=float("inf"),
                  s_noise=1.0, generator=None, return_dict=True):
            mo, guidance, probe = _unpack(model_output)
            if _is_index(timestep):
                raise ValueError("EulerDiscreteScheduler.step: pass one of scheduler.timesteps as timestep, "
                                 "not an integer index")
            self._gf_check(probe, sample)
            self._gf_init_step_index(timestep)

            def build():
                sigmas = _host(self.sigmas)
                gammas = torch.where((s_tmin <= sigmas[:-1]) & (sigmas[:-1] <= s_tmax),
                                     min(s_churn / (len(sigmas) - 1), 2**0.5 - 1), 0.0)
                table = D.euler_coefficients(sigmas[:-1], sigmas[1:], self.config.prediction_type, gammas, s_noise)
                return table, (gammas > 0).tolist()

            table, stochastic_rows = self._gf_table(("euler", s_churn, s_tmin, s_tmax, s_noise), sample.device,
                                                    build)
            row = self.step_index
            stochastic = stochastic_rows[row]
            noise = self._gf_noise(probe.shape, generator, probe.device, probe.dtype) \
                if stochastic and generator is not None else None
            prev, x0 = self._gf_run(mo, sample, table, row, guidance=guidance, stochastic=stochastic, noise=noise,
                                    return_x0=True)
            self._gf_record_plain(not s_churn, table, sample, guidance, EulerDiscreteSchedulerOutput, True)
            self._step_index += 1
            if not return_dict:
                return prev, x0
            return _output(EulerDiscreteSchedulerOutput, prev_sample=prev, pred_original_sample=x0)

    return EulerDiscreteScheduler


# ---- EulerAncestralDiscrete -------------------------------------------------

def _euler_ancestral_class():
    import diffusers
    from diffusers.schedulers.scheduling_euler_ancestral_discrete import EulerAncestralDiscreteSchedulerOutput

    class EulerAncestralDiscreteScheduler(_Fused, diffusers.EulerAncestralDiscreteScheduler):
        """diffusers' EulerAncestralDiscreteScheduler with a fused ``step()``."""

        def step(self, model_output, timestep, sample, generator=None, return_dict: bool = True):
            return self._step(model_output, timestep, sample, generator, return_dict)

        def _step(self, model_output, timestep, sample, generator=None, return_dict=True):
            mo, guidance, probe = _unpack(model_output)
            if _is_index(timestep):
                raise ValueError("EulerAncestralDiscreteScheduler.step: pass one of scheduler.timesteps as "
                                 "timestep, not an integer index")
            self._gf_check(probe, sample)
            self._gf_init_step_index(timestep)
            table, _ = self._gf_table(("euler_a",), sample.device, lambda: (D.euler_ancestral_coefficients(
                _host(self.sigmas)[:-1], _host(self.sigmas)[1:], self.config.prediction_type), None))
            noise = self._gf_noise(probe.shape, generator, probe.device, probe.dtype) if generator is not None \
                else None
            prev, x0 = self._gf_run(mo, sample, table, self.step_index, guidance=guidance, stochastic=True,
                                    noise=noise, return_x0=True)
            self._step_index += 1
            if not return_dict:
                return prev, x0
            return _output(EulerAncestralDiscreteSchedulerOutput, prev_sample=prev, pred_original_sample=x0)

    return EulerAncestralDiscreteScheduler


# ---- DDIM -------------------------------------------------------------------

def _ddim_class():
    import diffusers
    from diffusers.schedulers.scheduling_ddim import DDIMSchedulerOutput

    class DDIMScheduler(_Fused, diffusers.DDIMScheduler):
        """diffusers' DDIMScheduler with a fused ``step()``.

        diffusers' DDIM looks its coefficients up by timestep value; the twin finds
        the timestep's row in the schedule on the host when the timestep is a number
        or a CPU tensor, and otherwise counts steps from the first (looked up once).
        """

        def step(self, model_output, timestep, sample, eta: float = 0.0, use_clipped_model_output: bool = False,
                 generator=None, variance_noise=None, return_dict: bool = True):
            return self._step(model_output, timestep, sample, eta, use_clipped_model_output, generator,
                              variance_noise, return_dict)

        def _step(self, model_output, timestep, sample, eta=0.0, use_clipped_model_output=False, generator=None,
                  variance_noise=None, return_dict=True):
            mo, guidance, probe = _unpack(model_output)
            self._gf_check(probe, sample)
            if variance_noise is not None and generator is not None:
                raise ValueError("DDIMScheduler.step: pass generator or variance_noise, not both")
            row = self._gf_row_of(timestep)

            def build():
                t = torch.as_tensor(self._gf_host["timesteps"]).long()
                prev_t = t - self.config.num_train_timesteps // self.num_inference_steps
                alphas = _host(self.alphas_cumprod)
                a_prev = torch.where(prev_t >= 0, alphas[prev_t.clamp_min(0)], float(self.final_alpha_cumprod))
                x0_alone = bool(self.config.clip_sample or self.config.thresholding)  # the kernel modifies x0
                return D.ddim_coefficients(alphas[t], a_prev, self.config.prediction_type, eta, x0_alone,
                                           use_clipped_model_output), None

            table, _ = self._gf_table(("ddim", eta, use_clipped_model_output), sample.device, build)
            stochastic = eta > 0
            noise = None
            if stochastic and variance_noise is not None:
                noise = variance_noise
            elif stochastic and generator is not None:
                noise = self._gf_noise(probe.shape, generator, probe.device, probe.dtype)
            return self._gf_x0_step(mo, sample, table, row, guidance, stochastic, noise, DDIMSchedulerOutput,
                                    return_dict)

    return DDIMScheduler


# ---- DDPM -------------------------------------------------------------------

def _ddpm_class():
    import diffusers
    from diffusers.schedulers.scheduling_ddpm import DDPMSchedulerOutput

    class DDPMScheduler(_Fused, diffusers.DDPMScheduler):
        """diffusers' DDPMScheduler with a fused ``step()`` for the fixed variance types
        ("fixed_small", "fixed_small_log", "fixed_large"); learned variances run
        diffusers' step. Rows are looked up by timestep value, as diffusers does
        (see ``DDIMScheduler``)."""

        _gf_needs_schedule = False  # before set_timesteps diffusers steps over every training timestep

        def _gf_supported(self):
            if self.variance_type not in ("fixed_small", "fixed_small_log", "fixed_large"):
                return f"variance_type {self.variance_type!r}"
            return None

        def step(self, model_output, timestep, sample, generator=None, return_dict: bool = True):
            if not self.fused:
                return super().step(model_output, timestep, sample, generator, return_dict)
            return self._step(model_output, timestep, sample, generator, return_dict)

        def _build(self):
            t = torch.as_tensor(self._gf_host["timesteps"]).long()
            if self.custom_timesteps or self.num_inference_steps:  # diffusers' previous_timestep
                prev_t = torch.cat([t[1:], t.new_tensor([-1])])
            else:
                prev_t = t - 1
            alphas = _host(self.alphas_cumprod)
            a_prev = torch.where(prev_t >= 0, alphas[prev_t.clamp_min(0)], 1.0)
            noisy = t > 0
            return D.ddpm_coefficients(alphas[t], a_prev, self.config.prediction_type, self.variance_type,
                                       noisy), noisy.tolist()

        def _step(self, model_output, timestep, sample, generator=None, return_dict=True):
            mo, guidance, probe = _unpack(model_output)
            self._gf_check(probe, sample)
            row = self._gf_row_of(timestep)
            table, noisy = self._gf_table(("ddpm",), sample.device, self._build)
            stochastic = noisy[row]
            noise = self._gf_noise(probe.shape, generator, probe.device, probe.dtype) \
                if stochastic and generator is not None else None
            return self._gf_x0_step(mo, sample, table, row, guidance, stochastic, noise, DDPMSchedulerOutput,
                                    return_dict)

    return DDPMScheduler


# ---- LCM --------------------------------------------------------------------

def _lcm_class():
    import diffusers
    from diffusers.schedulers.scheduling_lcm import LCMSchedulerOutput

    class LCMScheduler(_Fused, diffusers.LCMScheduler):
        """diffusers' LCMScheduler with a fused ``step()``.

        ``denoised`` (the second output) is the kernel's x0 output: the boundary-condition
        scalings are folded into the x0 row. With clip_sample or thresholding the clamp
        must act on the x0 before that fold, so the kernel returns the clamped x0 and one
        more op forms denoised = c_out x0 + c_skip x (with host scalars: no sync)."""

        def step(self, model_output, timestep, sample, generator=None, return_dict: bool = True):
            return self._step(model_output, timestep, sample, generator, return_dict)

        def _build(self):
            t = _host(self.timesteps)
            n = len(t)
            prev_t = torch.cat([t[1:], t[-1:]]).long()  # the last step's "previous" is itself (unused: no noise)
            alphas = _host(self.alphas_cumprod)
            a_prev = torch.where(prev_t >= 0, alphas[prev_t.clamp_min(0)], float(self.final_alpha_cumprod))
            c_skip, c_out = self.get_scalings_for_boundary_condition_discrete(t)  # diffusers' formula, in fp64
            last = torch.arange(n) == self.num_inference_steps - 1
            x0_alone = bool(self.config.clip_sample or self.config.thresholding)  # the kernel modifies x0
            table = D.lcm_coefficients(alphas[t.long()], a_prev, c_skip, c_out, self.config.prediction_type,
                                       x0_alone, last)
            return table, {"last": last.tolist(), "c_skip": c_skip.tolist(), "c_out": c_out.tolist()}

        def _step(self, model_output, timestep, sample, generator=None, return_dict=True):
            mo, guidance, probe = _unpack(model_output)
            self._gf_check(probe, sample)
            table, meta = self._gf_table(("lcm",), sample.device, self._build)  # before any state changes
            self._gf_init_step_index(timestep)
            row = self.step_index
            stochastic = not meta["last"][row]
            noise = self._gf_noise(probe.shape, generator, probe.device, probe.dtype) \
                if stochastic and generator is not None else None
            clip = self._gf_clip
            prev, denoised = self._gf_run(mo, sample, table, row, guidance=guidance, stochastic=stochastic,
                                          noise=noise, clip=clip, return_x0=True)
            if clip > 0 or self.config.thresholding:  # the kernel returned the clamped x0
                x = sample.to(denoised.dtype)
                denoised = torch.add(x * meta["c_skip"][row], denoised, alpha=meta["c_out"][row])
            self._step_index += 1
            if not return_dict:
                return prev, denoised
            return _output(LCMSchedulerOutput, prev_sample=prev, denoised=denoised)

    return LCMScheduler


# ---- HeunDiscrete -----------------------------------------------------------

def _heun_class():
    import diffusers
    from diffusers.schedulers.scheduling_heun_discrete import HeunDiscreteSchedulerOutput

    class HeunDiscreteScheduler(_Fused, diffusers.HeunDiscreteScheduler):
        """diffusers' HeunDiscreteScheduler with a fused ``step()``: each of a step's two
        stages is one kernel. Between the stages the twin keeps one buffer,
        x + (dt / 2) d1, updated in place by the first stage's kernel, instead of
        diffusers' saved sample and derivative (``self.sample`` and
        ``self.prev_derivative`` stay None; ``self.dt`` still marks the stage, so
        ``state_in_first_order`` is diffusers')."""

        def step(self, model_output, timestep, sample, return_dict: bool = True):
            return self._step(model_output, timestep, sample, return_dict)

        def _build(self, parity: int):
            sig = _host(self.sigmas)
            rows = len(self.timesteps)
            i = torch.arange(rows)
            first = (i % 2) == parity
            lo = torch.where(first, i, (i - 1).clamp_min(0))
            table = D.heun_coefficients(sig[lo], sig[lo + 1], first, self.config.prediction_type)
            return table, (sig[lo + 1] - sig[lo]).tolist()

        def _step(self, model_output, timestep, sample, return_dict=True):
            mo, guidance, probe = _unpack(model_output)
            self._gf_check(probe, sample)
            self._gf_init_step_index(timestep)
            row = self.step_index
            first = self.state_in_first_order
            parity = (row if first else row + 1) % 2  # the rows that are first stages
            table, dts = self._gf_table(("heun", parity), sample.device, lambda: self._build(parity))
            if self._gf_history is None or self._gf_history.shape != sample.shape \
                    or self._gf_history.dtype != probe.dtype or self._gf_history.device != sample.device:
                layout = sample if D._is_dense(sample) else sample.contiguous()
                self._gf_history = torch.zeros_like(layout, dtype=probe.dtype)
                if not first and self.sample is not None:  # taken over between diffusers' two stages
                    self._gf_history.copy_(self.sample + 0.5 * self.dt * self.prev_derivative)
            clip = self._gf_clip
            prev, x0 = self._gf_run(mo, sample, table, row, guidance=guidance, history=self._gf_history, clip=clip,
                                    return_x0=True)
            # diffusers' stage marker; the saved sample and derivative live in the history buffer
            self.dt = dts[row] if first else None
            self.prev_derivative = self.sample = None
            self._step_index += 1
            if not return_dict:
                return prev, x0
            return _output(HeunDiscreteSchedulerOutput, prev_sample=prev, pred_original_sample=x0)

    return HeunDiscreteScheduler


# ---- DPMSolverMultistep -----------------------------------------------------

def _dpm_class():
    import diffusers
    from diffusers.schedulers.scheduling_utils import SchedulerOutput

    class DPMSolverMultistepScheduler(_Fused, diffusers.DPMSolverMultistepScheduler):
        """diffusers' DPMSolverMultistepScheduler with a fused ``step()`` for DPM++ 1S/2M
        and SDE-DPM++ 1S/2M (``algorithm_type`` "dpmsolver++" / "sde-dpmsolver++",
        ``solver_order`` 1 or 2, with or without thresholding); other configurations run
        diffusers' step."""

        def _gf_supported(self):
            c = self.config
            if c.algorithm_type not in ("dpmsolver++", "sde-dpmsolver++"):
                return f"algorithm_type {c.algorithm_type!r}"
            if c.solver_order not in (1, 2):
                return f"solver_order {c.solver_order}"
            if c.variance_type is not None:
                return f"variance_type {c.variance_type!r}"
            return None

        def step(self, model_output, timestep, sample, generator=None, variance_noise=None,
                 return_dict: bool = True):
            if not self.fused:
                return super().step(model_output, timestep, sample, generator, variance_noise, return_dict)
            return self._step(model_output, timestep, sample, generator, variance_noise, return_dict)

        def _orders(self, start: int) -> torch.Tensor:
            """diffusers' choice of order per step when stepping starts at row ``start``."""
            c, n = self.config, len(self.timesteps)
            orders = []
            for i in range(n):
                done = i - start  # lower_order_nums at step i
                final = i == n - 1 and (c.euler_at_final or (c.lower_order_final and n < 15)
                                        or c.final_sigmas_type == "zero")
                if c.solver_order == 1 or done < 1 or final:
                    orders.append(1)
                else:
                    orders.append(2)
            return torch.tensor(orders)

        def _build(self, start: int) -> torch.Tensor:
            sig = _host(self.sigmas)
            n = len(self.timesteps)
            s0 = sig[:n]
            st = sig[1:n + 1]
            s1 = torch.cat([sig[:1], sig[:n - 1]])
            at, sgt = self._sigma_to_alpha_sigma_t(st)
            a0, sg0 = self._sigma_to_alpha_sigma_t(s0)
            a1, sg1 = self._sigma_to_alpha_sigma_t(s1)
            ptype = self.config.prediction_type
            ax, am = D.x0_coefficients(ptype, a0, s0 if ptype == "flow_prediction" else sg0)
            return D.dpm_solver_coefficients(at, sgt, a0, sg0, a1, sg1, self._orders(start), x0_ax=ax, x0_am=am,
                                             algorithm_type=self.config.algorithm_type,
                                             solver_type=self.config.solver_type)

        def _step(self, model_output, timestep, sample, generator=None, variance_noise=None, return_dict=True):
            mo, guidance, probe = _unpack(model_output)
            self._gf_check(probe, sample)
            self._gf_init_step_index(timestep)
            row = self.step_index
            start = self._gf_warmup_start(row)
            table, _ = self._gf_table(("dpm", start), sample.device, lambda: (self._build(start), None))
            if self._gf_history is None or self._gf_history.shape != sample.shape \
                    or self._gf_history.dtype != probe.dtype or self._gf_history.device != sample.device:
                layout = sample if D._is_dense(sample) else sample.contiguous()
                self._gf_history = torch.zeros_like(layout, dtype=probe.dtype)
                last = self.model_outputs[-1] if self.lower_order_nums > 0 else None
                if last is not None:  # taken over mid-loop from diffusers' list
                    self._gf_history.copy_(last)
            sde = self.config.algorithm_type == "sde-dpmsolver++"
            noise = None
            if sde and variance_noise is not None:
                noise = variance_noise
            elif sde and generator is not None:
                noise = self._gf_noise(probe.shape, generator, probe.device, torch.float32)
            prev = self._gf_run(mo, sample, table, row, guidance=guidance, stochastic=sde, noise=noise,
                                history=self._gf_history)
            if self.lower_order_nums < self.config.solver_order:
                self.lower_order_nums += 1
            self._step_index += 1
            if not return_dict:
                return (prev,)
            return _output(SchedulerOutput, prev_sample=prev)

    return DPMSolverMultistepScheduler


# ---- UniPCMultistep ---------------------------------------------------------

def _unipc_class():
    import diffusers
    from diffusers.schedulers.scheduling_utils import SchedulerOutput

    class UniPCMultistepScheduler(_Fused, diffusers.UniPCMultistepScheduler):
        """diffusers' UniPCMultistepScheduler with a fused ``step()`` for data prediction
        (``predict_x0``), ``solver_order`` 1 to 3, bh1/bh2: the corrector (UniC) of the
        previous step and this step's predictor (UniP) are one kernel. Two buffers carry
        the state (the previous x0 and the corrector's partial sum, see
        ``genfast.diffusion.unipc_coefficients``), a third the x0 before at order 3;
        diffusers' ``model_outputs``, ``timestep_list`` and ``last_sample`` are not
        maintained."""

        def _gf_supported(self):
            c = self.config
            if not c.predict_x0:
                return "predict_x0=False"
            if c.solver_order not in (1, 2, 3):
                return f"solver_order {c.solver_order}"
            if self.solver_p is not None:
                return "solver_p"
            return None

        def step(self, model_output, timestep, sample, return_dict: bool = True):
            if not self.fused:
                return super().step(model_output, timestep, sample, return_dict)
            return self._step(model_output, timestep, sample, return_dict)

        def _plan(self, start: int):
            """diffusers' predictor order and corrector use per step when stepping starts at ``start``."""
            c, n = self.config, len(self.timesteps)
            orders, use_c = [], []
            for i in range(n):
                order = min(c.solver_order, n - i) if c.lower_order_final else c.solver_order
                orders.append(min(order, min(i - start, c.solver_order) + 1))
                use_c.append(i > start and (i - 1) not in self.disable_corrector)
            return orders, use_c

        def _build(self, start: int):
            sig = _host(self.sigmas)
            n = len(self.timesteps)
            alpha, sigma = self._sigma_to_alpha_sigma_t(sig[:n + 1])
            ptype = self.config.prediction_type
            ax, am = D.x0_coefficients(ptype, alpha[:n], sig[:n] if ptype == "flow_prediction" else sigma[:n])
            orders, use_c = self._plan(start)
            table = D.unipc_coefficients(alpha, sigma, orders, use_c, x0_ax=ax, x0_am=am,
                                         solver_type=self.config.solver_type)
            return table, None

        def _step(self, model_output, timestep, sample, return_dict=True):
            mo, guidance, probe = _unpack(model_output)
            self._gf_check(probe, sample)
            self._gf_init_step_index(timestep)
            row = self.step_index
            start = self._gf_warmup_start(row)
            table, _ = self._gf_table(("unipc", start), sample.device, lambda: self._build(start))
            if self._gf_history is None or self._gf_history[0].shape != sample.shape \
                    or self._gf_history[0].dtype != probe.dtype or self._gf_history[0].device != sample.device:
                if self.lower_order_nums > 0:
                    # taken over mid-loop: diffusers' state (last_sample, model_outputs) has no
                    # fused form here, so diffusers finishes this loop; the next one is fused
                    return super().step(_materialize(model_output), timestep, sample, return_dict)
                layout = sample if D._is_dense(sample) else sample.contiguous()
                buffers = 3 if self.config.solver_order == 3 else 2
                self._gf_history = tuple(torch.zeros_like(layout, dtype=probe.dtype) for _ in range(buffers)) \
                    + (None,) * (3 - buffers)
            h1, h2, h3 = self._gf_history
            prev = self._gf_run(mo, sample, table, row, guidance=guidance, history=h1, history2=h2, history3=h3)
            if self.lower_order_nums < self.config.solver_order:
                self.lower_order_nums += 1
            self._step_index += 1
            if not return_dict:
                return (prev,)
            return _output(SchedulerOutput, prev_sample=prev)

    return UniPCMultistepScheduler


# ---- FlowMatchEulerDiscrete -------------------------------------------------

def _flow_match_class():
    import diffusers
    from diffusers.schedulers.scheduling_flow_match_euler_discrete import FlowMatchEulerDiscreteSchedulerOutput

    class FlowMatchEulerDiscreteScheduler(_Fused, diffusers.FlowMatchEulerDiscreteScheduler):
        """diffusers' FlowMatchEulerDiscreteScheduler (SD3, FLUX) with a fused ``step()``."""

        def step(self, model_output, timestep, sample, s_churn: float = 0.0, s_tmin: float = 0.0,
                 s_tmax: float = float("inf"), s_noise: float = 1.0, generator=None, per_token_timesteps=None,
                 return_dict: bool = True):
            if per_token_timesteps is not None:
                return super().step(model_output, timestep, sample, s_churn, s_tmin, s_tmax, s_noise, generator,
                                    per_token_timesteps, return_dict)
            if self._gf_plain is not None:
                out = self._gf_quick(model_output, None, timestep, sample, 1.0, return_dict)
                if out is not None:
                    return out
            return self._step(model_output, timestep, sample, generator, return_dict)

        def _step(self, model_output, timestep, sample, generator=None, return_dict=True):
            mo, guidance, probe = _unpack(model_output)
            if _is_index(timestep):
                raise ValueError("FlowMatchEulerDiscreteScheduler.step: pass one of scheduler.timesteps as "
                                 "timestep, not an integer index")
            self._gf_check(probe, sample)
            if self._gf_host is None:  # the sigmas may live on the device: copied once per schedule
                self._gf_host = {"sigmas": _host(self.sigmas)}
            self._gf_init_step_index(timestep)
            sig = self._gf_host["sigmas"]
            stochastic = bool(self.config.stochastic_sampling)
            table, _ = self._gf_table(("flow", stochastic), sample.device,
                                      lambda: (D.flow_match_euler_coefficients(sig[:-1], sig[1:], stochastic), None))
            noise = self._gf_noise(sample.shape, generator, sample.device, sample.dtype) \
                if stochastic and generator is not None else None
            prev = self._gf_run(mo, sample, table, self.step_index, guidance=guidance, stochastic=stochastic,
                                noise=noise)
            self._gf_record_plain(not stochastic, table, sample, guidance, FlowMatchEulerDiscreteSchedulerOutput,
                                  False)
            self._step_index += 1
            if not return_dict:
                return (prev,)
            return _output(FlowMatchEulerDiscreteSchedulerOutput, prev_sample=prev)

    return FlowMatchEulerDiscreteScheduler


_BUILDERS = {
    "EulerDiscreteScheduler": _euler_class,
    "EulerAncestralDiscreteScheduler": _euler_ancestral_class,
    "DDIMScheduler": _ddim_class,
    "DDPMScheduler": _ddpm_class,
    "LCMScheduler": _lcm_class,
    "HeunDiscreteScheduler": _heun_class,
    "UniPCMultistepScheduler": _unipc_class,
    "DPMSolverMultistepScheduler": _dpm_class,
    "FlowMatchEulerDiscreteScheduler": _flow_match_class,
}
