"""genfast's scheduler twins against diffusers' own schedulers.

Full trajectories with a deterministic stand-in model: genfast's final sample
against diffusers' run in fp64 (the oracle: diffusers' own step code with its
float32 upcasts redirected to float64, the noise drawn in fp32 as diffusers
draws it) and diffusers' run in the input precision (the yardstick).
"""
import contextlib
import copy
import sys
import types

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

import genfast  # noqa: E402
from genfast import schedulers as S  # noqa: E402

from conftest import assert_close  # noqa: E402


class _Torch64(types.ModuleType):
    """torch, except that float32 means float64."""

    def __init__(self):
        super().__init__("torch")

    def __getattr__(self, name):
        return torch.float64 if name == "float32" else getattr(torch, name)


@contextlib.contextmanager
def diffusers_in_fp64(scheduler):
    """Run a diffusers scheduler module's code in fp64; its noise stays diffusers' fp32 draw."""
    mod = sys.modules[type(scheduler).__module__]
    old_torch, old_randn = mod.torch, getattr(mod, "randn_tensor", None)
    mod.torch = _Torch64()
    if old_randn is not None:
        mod.randn_tensor = lambda *a, dtype=None, **k: old_randn(*a, dtype=torch.float32, **k).double()
    try:
        yield
    finally:
        mod.torch = old_torch
        if old_randn is not None:
            mod.randn_tensor = old_randn


def rescale_noise_cfg(guided, cond, phi):
    """diffusers' pipeline helper of the same name (importing it needs transformers)."""
    dims = list(range(1, cond.dim()))
    rescaled = guided * (cond.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True))
    return phi * rescaled + (1 - phi) * guided


def stand_in_model(x, t):
    """A fixed smooth function of the sample and the timestep (no weights)."""
    x = x.float()
    return (torch.sin(0.7 * x + 0.01 * float(t)) + 0.3 * x).to(torch.float64 if x.dtype == torch.float64 else x.dtype)


def trajectory(sched, x, *, steps, fp64=False, seed=1, guidance=None, twin=False, **step_kwargs):
    """A denoising loop; guidance = (scale, rescale) runs the pipeline's guidance ops (or the fused step)."""
    sched.set_timesteps(steps)
    gen = torch.Generator().manual_seed(seed)
    dtype = x.dtype
    for t in sched.timesteps:
        with diffusers_in_fp64(sched) if fp64 else contextlib.nullcontext():
            xin = sched.scale_model_input(x, t) if hasattr(sched, "scale_model_input") else x
            out = stand_in_model(xin, t).to(dtype)
            kwargs = dict(step_kwargs, generator=gen)
            if guidance is None:
                x = sched.step(out, t, x, **kwargs).prev_sample
            elif twin:
                x = sched.step_with_guidance(out, (1.1 * out + 0.2).to(dtype), t, x, guidance[0], guidance[1],
                                             **kwargs).prev_sample
            else:
                uncond, cond = out, (1.1 * out + 0.2).to(dtype)
                guided = uncond + guidance[0] * (cond - uncond)
                if guidance[1] > 0:
                    guided = rescale_noise_cfg(guided, cond, guidance[1])
                x = sched.step(guided, t, x, **kwargs).prev_sample
    return x


CONFIGS = [
    ("EulerDiscreteScheduler", {}, {}),
    ("EulerDiscreteScheduler", {"prediction_type": "v_prediction", "use_karras_sigmas": True}, {}),
    ("EulerDiscreteScheduler", {"timestep_spacing": "trailing", "final_sigmas_type": "sigma_min"},
     {"s_churn": 1.0, "s_tmin": 0.5, "s_tmax": 10.0}),
    ("EulerDiscreteScheduler", {"use_exponential_sigmas": True, "prediction_type": "sample"}, {}),
    ("EulerAncestralDiscreteScheduler", {}, {}),
    ("EulerAncestralDiscreteScheduler", {"prediction_type": "v_prediction", "timestep_spacing": "trailing"}, {}),
    ("DDIMScheduler", {}, {}),
    ("DDIMScheduler", {"clip_sample": True, "set_alpha_to_one": False}, {"eta": 0.5}),
    ("DDIMScheduler", {"prediction_type": "v_prediction", "timestep_spacing": "trailing",
                       "rescale_betas_zero_snr": True, "clip_sample": False}, {}),
    ("DDIMScheduler", {"clip_sample": True, "clip_sample_range": 1.5},
     {"eta": 1.0, "use_clipped_model_output": True}),
    ("DPMSolverMultistepScheduler", {}, {}),
    ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True, "prediction_type": "v_prediction"}, {}),
    pytest.param(("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++", "use_karras_sigmas": True},
                  {}), marks=pytest.mark.xfail(reason=(
                      "known: genfast's fp32 error is 2-3x diffusers' own (vs fp64) on this config, ~3e-5 of the "
                      "sample's scale after 10 steps; the folded x0 coefficients 1/alpha and -sigma/alpha (~150 at "
                      "sigma_max) round separately"), strict=False)),
    ("DPMSolverMultistepScheduler", {"solver_type": "heun", "final_sigmas_type": "sigma_min",
                                     "lower_order_final": False}, {}),
    ("DPMSolverMultistepScheduler", {"solver_order": 1, "prediction_type": "sample"}, {}),
    ("DPMSolverMultistepScheduler", {"euler_at_final": True, "use_lu_lambdas": True}, {}),
    ("DPMSolverMultistepScheduler", {"use_flow_sigmas": True, "prediction_type": "flow_prediction",
                                     "flow_shift": 3.0}, {}),
    ("FlowMatchEulerDiscreteScheduler", {"shift": 3.0}, {}),
    ("FlowMatchEulerDiscreteScheduler", {"shift": 1.0, "stochastic_sampling": True}, {}),
]


def _ids(cfg):
    name, config, kwargs = cfg.values[0] if hasattr(cfg, "values") else cfg
    return f"{name.replace('Scheduler', '')}-{'-'.join(f'{k}={v}' for k, v in {**config, **kwargs}.items())}"


def _start(base, shape, dtype, seed=0):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    return (x * float(getattr(base, "init_noise_sigma", 1.0))).to(dtype)


@pytest.mark.parametrize("cfg", CONFIGS, ids=[_ids(c) for c in CONFIGS])
@pytest.mark.parametrize("steps", [10, 25])
def test_trajectory_matches_diffusers_fp32(cfg, steps):
    name, config, kwargs = cfg
    base = getattr(diffusers, name)(**config)
    twin = S.from_diffusers(copy.deepcopy(base))
    assert twin.fused
    shape = (2, 4, 9, 7)
    x = _start(base, shape, torch.float32)
    ref = trajectory(copy.deepcopy(base), x, steps=steps, **kwargs)
    ref64 = trajectory(copy.deepcopy(base), x.double(), steps=steps, fp64=True, **kwargs)
    out = trajectory(twin, x, steps=steps, **kwargs)
    assert out.dtype == torch.float32
    # the bound: 1e-5 relative to the sample's scale; and the accuracy rule against fp64
    assert (out - ref).abs().max() <= 1e-5 * ref.abs().max()
    assert_close(out, ref64, ref, atol=2e-6 * ref64.abs().max().item(), name=f"{name} final sample")


@pytest.mark.parametrize("cfg", [CONFIGS[0], CONFIGS[7], CONFIGS[10], CONFIGS[12], CONFIGS[17]],
                         ids=[_ids(c) for c in [CONFIGS[0], CONFIGS[7], CONFIGS[10], CONFIGS[12], CONFIGS[17]]])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_trajectory_low_precision(cfg, dtype):
    """fp16/bf16 latents: at most twice diffusers' own error in that precision (vs fp64)."""
    name, config, kwargs = cfg
    base = getattr(diffusers, name)(**config)
    twin = S.from_diffusers(copy.deepcopy(base))
    x = _start(base, (2, 4, 8, 6), dtype)
    ref = trajectory(copy.deepcopy(base), x, steps=15, **kwargs)
    ref64 = trajectory(copy.deepcopy(base), x.double(), steps=15, fp64=True, **kwargs)
    out = trajectory(twin, x, steps=15, **kwargs)
    assert out.dtype == dtype
    assert_close(out, ref64, ref, atol=torch.finfo(dtype).eps * ref64.abs().max().item(), name="final sample")


@pytest.mark.parametrize("name", ["EulerDiscreteScheduler", "DDIMScheduler", "DPMSolverMultistepScheduler",
                                  "FlowMatchEulerDiscreteScheduler"])
@pytest.mark.parametrize("rescale", [0.0, 0.7])
def test_fused_guidance_equals_guidance_then_step(name, rescale):
    base = getattr(diffusers, name)()
    twin = S.from_diffusers(copy.deepcopy(base))
    x = _start(base, (2, 4, 6, 5), torch.float32)
    ref = trajectory(copy.deepcopy(base), x, steps=12, guidance=(6.0, rescale))
    ref64 = trajectory(copy.deepcopy(base), x.double(), steps=12, fp64=True, guidance=(6.0, rescale))
    out = trajectory(twin, x, steps=12, guidance=(6.0, rescale), twin=True)
    if rescale == 0:  # with rescale, diffusers' own fp32 result is ~1e-3 off fp64 (DDIM): the rule below decides
        assert (out - ref).abs().max() <= 1e-5 * ref.abs().max()
    assert_close(out, ref64, ref, atol=2e-6 * ref64.abs().max().item(), name="guided")


def test_every_backend_runs_the_loop(backend):
    """A short DPM++ 2M SDE loop with guidance on each backend (Triton interpreted on small latents)."""
    base = diffusers.DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++")
    x = _start(base, (1, 4, 5, 6), torch.float32).to(backend)
    ref = trajectory(copy.deepcopy(base), x, steps=6, guidance=(5.0, 0.5))
    out = trajectory(S.from_diffusers(copy.deepcopy(base)), x, steps=6, guidance=(5.0, 0.5), twin=True)
    torch.testing.assert_close(out, ref, atol=1e-5 * ref.abs().max().item(), rtol=1e-5)


def test_channels_last_5d_and_video_latents():
    base = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    x = _start(base, (1, 3, 4, 6, 5), torch.float32)  # (B, C, T, H, W)
    ref = trajectory(copy.deepcopy(base), x, steps=8)
    out = trajectory(S.from_diffusers(copy.deepcopy(base)), x.to(memory_format=torch.channels_last_3d), steps=8)
    assert out.is_contiguous(memory_format=torch.channels_last_3d)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_seeded_noise_without_generator_is_reproducible():
    base = diffusers.EulerAncestralDiscreteScheduler()
    x = _start(base, (1, 4, 6, 6), torch.float32)

    def run():
        torch.manual_seed(42)
        s = S.EulerAncestralDiscreteScheduler.from_config(base.config)
        s.set_timesteps(6)
        y = x
        for t in s.timesteps:
            y = s.step(stand_in_model(s.scale_model_input(y, t), t), t, y).prev_sample
        return y

    a, b = run(), run()
    assert torch.equal(a, b) and torch.isfinite(a).all()


def test_config_round_trip_and_from_diffusers():
    base = diffusers.DPMSolverMultistepScheduler(use_karras_sigmas=True, algorithm_type="sde-dpmsolver++")
    twin = S.DPMSolverMultistepScheduler.from_config(base.config)
    assert isinstance(twin, diffusers.DPMSolverMultistepScheduler) and twin.fused
    back = diffusers.DPMSolverMultistepScheduler.from_config(twin.config)
    assert dict(back.config) == dict(base.config)
    assert S.from_diffusers(twin) is twin
    with pytest.raises(ValueError, match="no fused twin"):
        S.from_diffusers(diffusers.PNDMScheduler())


def test_unsupported_config_runs_diffusers_step():
    base = diffusers.DDIMScheduler(thresholding=True)
    twin = S.from_diffusers(copy.deepcopy(base))
    assert not twin.fused
    x = _start(base, (2, 4, 6, 5), torch.float32)
    assert torch.equal(trajectory(twin, x, steps=5), trajectory(copy.deepcopy(base), x, steps=5))


def test_mid_loop_switch_from_diffusers():
    """from_diffusers on a scheduler that has already stepped continues its trajectory."""
    base = diffusers.DPMSolverMultistepScheduler()
    base.set_timesteps(10)
    ref = copy.deepcopy(base)
    x = y = _start(base, (1, 4, 5, 5), torch.float32)
    sched = base
    for i, t in enumerate(base.timesteps):
        if i == 4:
            sched = S.from_diffusers(base)
        x = sched.step(stand_in_model(x, t), t, x).prev_sample
        y = ref.step(stand_in_model(y, t), t, y).prev_sample
    torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["EulerDiscreteScheduler", "DDIMScheduler", "DPMSolverMultistepScheduler",
                                  "FlowMatchEulerDiscreteScheduler"])
def test_bad_input_leaves_state_unchanged(name):
    s = getattr(S, name)()
    x = torch.randn(1, 4, 5, 5)
    with pytest.raises(ValueError, match="set_timesteps"):
        s.step(x, 1.0, x)
    s.set_timesteps(5)
    t = s.timesteps[0]
    with pytest.raises(ValueError, match="model_output"):
        s.step(torch.randn(1, 4, 5, 6), t, x)
    with pytest.raises(ValueError, match="not in the schedule"):
        s.step(x, torch.tensor(0.123456), x)
    with pytest.raises(ValueError, match="noise_cond"):
        s.step_with_guidance(x, torch.randn(1, 4, 5, 6), t, x, 5.0)
    assert getattr(s, "step_index", None) is None and getattr(s, "_gf_history", None) is None
    s.step(x, t, x)  # and the scheduler still works


@pytest.mark.parametrize("name", ["EulerDiscreteScheduler", "DPMSolverMultistepScheduler"])
def test_compiled_step_has_no_host_sync(name):
    """After the first step (which looks its timestep up), a step compiles with
    fullgraph=True: nothing in it reads a tensor on the host. The device step
    counter makes the step's row a device value, as a CUDA graph replay needs."""
    kwargs = {"algorithm_type": "sde-dpmsolver++"} if name.startswith("DPM") else {}
    eager, comp = getattr(S, name)(**kwargs), getattr(S, name)(**kwargs)
    x = torch.randn(1, 4, 6, 5)
    for s in (eager, comp):
        s.device_step_counter = True
        s.set_timesteps(8)
        s.noise_seed = 3
    ys = []
    for s, wrap in ((eager, lambda f: f), (comp, lambda f: torch.compile(f, fullgraph=True, backend="aot_eager"))):
        y = x
        t0 = s.timesteps[0]
        y = s.step(stand_in_model(y, t0), t0, y).prev_sample
        step = wrap(lambda m, t, y, s=s: s.step_with_guidance(m, 1.1 * m, t, y, 4.0).prev_sample)
        for t in s.timesteps[1:3]:
            y = step(stand_in_model(y, t), t, y)
        ys.append(y)
    torch.testing.assert_close(ys[1], ys[0])
