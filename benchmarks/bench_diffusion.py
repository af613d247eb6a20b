"""Diffusion family: one sampler step with classifier-free guidance.

Baselines are what a diffusers pipeline runs per step: ``noise_pred.chunk(2)``,
``uncond + g * (cond - uncond)``, then the diffusers scheduler's ``step()``,
eagerly; and ``torch.compile`` of the same math written as a plain function
(``*_math`` below: diffusers' step graph-breaks, so compiling it as is would
be slower than eager and no fair baseline). genfast runs the
twin scheduler's ``step_with_guidance`` (one kernel). Each call repeats the
same step (the step index is reset before every call, outside the timed
function's compiled region), the 10th of a 25-step schedule.

Bytes each step must move, for N latent elements of s bytes:

=====================  ===============================================  =====
sampler                traffic                                          bytes
=====================  ===============================================  =====
euler, ddim, flow      read uncond, cond, sample; write prev            4·N·s
dpmpp_2m               + read and write the previous x0 (history)       6·N·s
ddim_threshold         x0 pass (read u, c, x; write x0), |x0| (read,   12·N·s
                       write), topk (read), then the step with x0
=====================  ===============================================  =====

Euler and DDIM also return x0 (pred_original_sample) as diffusers does: +N·s,
counted. Eager diffusers moves ~15-25 passes of fp32 temporaries.
"""
from __future__ import annotations

import torch

from harness import Case

FAMILY = "diffusion"
# (label, latent shape of one image); the model's output is a batch of 2x for guidance
SIZES = {
    "sd15-b1": (1, 4, 64, 64),
    "sd15-b8": (8, 4, 64, 64),
    "sdxl": (1, 4, 128, 128),
    "sd3": (1, 16, 128, 128),
    "video": (1, 16, 21, 60, 104),
}
# sampler -> (diffusers class, config, passes of N·s genfast moves)
SAMPLERS = {
    "euler": ("EulerDiscreteScheduler", {}, 5),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {}, 6),
    "ddim": ("DDIMScheduler", {}, 5),
    "flow_match_euler": ("FlowMatchEulerDiscreteScheduler", {"shift": 3.0}, 4),
    # dynamic thresholding as pixel-space pipelines set it (DeepFloyd IF's values)
    "ddim_threshold": ("DDIMScheduler", {"thresholding": True, "dynamic_thresholding_ratio": 0.95,
                                         "sample_max_value": 1.5}, 12),
}
GUIDANCE = 7.5
STEP = 10


# ---- the torch.compile baseline ---------------------------------------------
# diffusers' step() graph-breaks under torch.compile (step-index bookkeeping,
# the timestep lookup, Python branches on config), so compiling the pipeline's
# function around it measures dynamo's overhead, not inductor's fusion. The fair
# baseline is the step's own math as a plain function: the same tensor ops
# diffusers' step runs for the sampler and config benchmarked here (default
# configs, epsilon prediction), guidance first, the per-step scalars passed as
# 0-d tensors on the device (as a compiled loop would index a device table), so
# one compiled graph serves every step without recompiling.

def _guide(noise_pred, g):
    uncond, cond = noise_pred.chunk(2)
    return uncond + g * (cond - uncond)


def euler_math(noise_pred, sample, sigma, sigma_next, g):
    """EulerDiscreteScheduler.step (epsilon, no churn): returns (prev, x0) as diffusers does."""
    m = _guide(noise_pred, g)
    x = sample.to(torch.float32)
    x0 = x - sigma * m
    derivative = (x - x0) / sigma
    prev = x + derivative * (sigma_next - sigma)
    return prev.to(m.dtype), x0


def ddim_math(noise_pred, sample, alpha_prod_t, alpha_prod_t_prev, g, clip_range: float = 1.0):
    """DDIMScheduler.step (epsilon, eta = 0, default clip_sample=True): returns (prev, x0)."""
    m = _guide(noise_pred, g)
    beta_prod_t = 1 - alpha_prod_t
    x0 = (sample - beta_prod_t**0.5 * m) / alpha_prod_t**0.5
    x0 = x0.clamp(-clip_range, clip_range)
    # _get_variance is evaluated even at eta = 0 (std_dev_t = 0); scalar work only
    variance = (1 - alpha_prod_t_prev) / beta_prod_t * (1 - alpha_prod_t / alpha_prod_t_prev)
    std_dev_t = 0.0 * variance**0.5
    direction = (1 - alpha_prod_t_prev - std_dev_t**2) ** 0.5 * m
    return alpha_prod_t_prev**0.5 * x0 + direction, x0


def ddim_threshold_math(noise_pred, sample, alpha_prod_t, alpha_prod_t_prev, g, ratio: float = 0.95,
                        max_value: float = 1.5):
    """DDIMScheduler.step (epsilon, eta = 0) with dynamic thresholding: x0's per-sample
    quantile of |x0| (upcast to fp32), clamped to [1, max_value], bounds and divides x0."""
    m = _guide(noise_pred, g)
    beta_prod_t = 1 - alpha_prod_t
    x0 = (sample - beta_prod_t**0.5 * m) / alpha_prod_t**0.5
    flat = x0.float().reshape(x0.shape[0], -1)
    s = torch.quantile(flat.abs(), ratio, dim=1).clamp(min=1, max=max_value).unsqueeze(1)
    x0 = (torch.clamp(flat, -s, s) / s).reshape(x0.shape).to(x0.dtype)
    variance = (1 - alpha_prod_t_prev) / beta_prod_t * (1 - alpha_prod_t / alpha_prod_t_prev)
    std_dev_t = 0.0 * variance**0.5
    direction = (1 - alpha_prod_t_prev - std_dev_t**2) ** 0.5 * m
    return alpha_prod_t_prev**0.5 * x0 + direction, x0


def _vp(sigma):
    alpha = 1 / (sigma**2 + 1) ** 0.5
    return alpha, sigma * alpha


def dpmpp_2m_math(noise_pred, sample, previous_x0, sigma_t, sigma_s0, sigma_s1, g):
    """DPMSolverMultistepScheduler.step, DPM++ 2M midpoint, second order (epsilon):
    convert_model_output, then multistep_dpm_solver_second_order_update. Returns
    (prev, x0): the caller keeps x0 as the next step's previous_x0 (model_outputs)."""
    m = _guide(noise_pred, g)
    alpha_s0, s_s0 = _vp(sigma_s0)
    x0 = (sample - s_s0 * m) / alpha_s0
    x = sample.to(torch.float32)
    alpha_t, s_t = _vp(sigma_t)
    alpha_s1, s_s1 = _vp(sigma_s1)
    lambda_t = torch.log(alpha_t) - torch.log(s_t)
    lambda_s0 = torch.log(alpha_s0) - torch.log(s_s0)
    lambda_s1 = torch.log(alpha_s1) - torch.log(s_s1)
    h, h_0 = lambda_t - lambda_s0, lambda_s0 - lambda_s1
    r0 = h_0 / h
    d1 = (1.0 / r0) * (x0 - previous_x0)
    prev = (s_t / s_s0) * x - (alpha_t * (torch.exp(-h) - 1.0)) * x0 - 0.5 * (alpha_t * (torch.exp(-h) - 1.0)) * d1
    return prev.to(m.dtype), x0


def flow_match_euler_math(noise_pred, sample, sigma, sigma_next, g):
    """FlowMatchEulerDiscreteScheduler.step (deterministic): returns prev."""
    m = _guide(noise_pred, g)
    x = sample.to(torch.float32)
    return (x + (sigma_next - sigma) * m).to(m.dtype)


def _scalars(sampler: str, sched, device):
    """The step's scalars from diffusers' own schedule, as 0-d fp32 tensors on the device."""
    def dev(v):
        return torch.as_tensor(v, dtype=torch.float32).to(device)

    if sampler.startswith("ddim"):
        t = int(sched.timesteps[STEP])
        prev_t = t - sched.config.num_train_timesteps // sched.num_inference_steps
        a_prev = sched.alphas_cumprod[prev_t] if prev_t >= 0 else sched.final_alpha_cumprod
        return dev(sched.alphas_cumprod[t]), dev(a_prev)
    sig = sched.sigmas
    if sampler == "dpmpp_2m":
        return dev(sig[STEP + 1]), dev(sig[STEP]), dev(sig[STEP - 1])
    return dev(sig[STEP]), dev(sig[STEP + 1])


MATH = {"euler": euler_math, "ddim": ddim_math, "dpmpp_2m": dpmpp_2m_math,
        "flow_match_euler": flow_match_euler_math, "ddim_threshold": ddim_threshold_math}


def _build(sampler: str, shape, dtype, device):
    import diffusers

    import genfast.schedulers as gs

    name, config, _ = SAMPLERS[sampler]
    base = getattr(diffusers, name)(**config)
    twin = gs.from_diffusers(getattr(diffusers, name)(**config))
    for s in (base, twin):
        s.set_timesteps(25, device=device)
    t = base.timesteps[STEP]
    latents = torch.randn(shape, dtype=dtype, device=device)
    noise_pred = torch.randn((2 * shape[0], *shape[1:]), dtype=dtype, device=device)

    previous_x0 = torch.randn_like(latents)

    def place(s):
        # the state a step at STEP finds: its index, and for multistep one earlier output
        s._step_index = STEP
        s.is_scale_input_called = True  # the pipeline would have called scale_model_input (silences a warning)
        s._gf_counter = STEP  # the DDIM twin's step counter (diffusers' DDIM looks up by timestep)
        if hasattr(s, "lower_order_nums"):
            s.lower_order_nums = 1
            s.model_outputs = [None, previous_x0]

    def eager():
        place(base)
        uncond, cond = noise_pred.chunk(2)
        guided = uncond + GUIDANCE * (cond - uncond)
        return base.step(guided, t, latents).prev_sample

    math_fn = torch.compile(MATH[sampler], dynamic=False)
    scalars = _scalars(sampler, base, device)
    g = torch.tensor(GUIDANCE, dtype=torch.float32, device=device)
    if sampler == "dpmpp_2m":
        def comp():
            return math_fn(noise_pred, latents, previous_x0, *scalars, g)
    else:
        def comp():
            return math_fn(noise_pred, latents, *scalars, g)

    def fused():
        place(twin)
        uncond, cond = noise_pred.chunk(2)
        return twin.step_with_guidance(uncond, cond, t, latents, GUIDANCE).prev_sample

    return {"genfast": fused, "diffusers": eager, "torch.compile": comp}


def cases(quick: bool, device) -> list[Case]:
    """quick: SD1.5 batch 1 (host overhead) and SDXL on the CPU, the video latents (memory
    bandwidth) on a GPU, fp32;
    full: every size in fp32 and fp16."""
    try:
        import diffusers  # noqa: F401
    except ImportError:
        return []  # diffusers is the baseline: without it there is nothing to compare
    device = torch.device(device)
    if quick:
        sizes = ["sd15-b1", "video"] if device.type == "cuda" else ["sd15-b1", "sdxl"]
        dtypes = [torch.float32]
    else:
        sizes, dtypes = list(SIZES), [torch.float32, torch.float16]
    out = []
    for sampler, (_, _, passes) in SAMPLERS.items():
        for dtype in dtypes:
            for size in sizes:
                shape = SIZES[size]
                numel = torch.Size(shape).numel()
                out.append(Case(
                    family=FAMILY, op=sampler, mode="step+cfg", size=size, dtype=dtype, device=device,
                    nbytes=passes * numel * dtype.itemsize, footprint=passes * numel * dtype.itemsize,
                    impls=("genfast", "diffusers", "torch.compile"),
                    build=lambda sampler=sampler, shape=shape, dtype=dtype: _build(sampler, shape, dtype, device),
                ))
    return out
