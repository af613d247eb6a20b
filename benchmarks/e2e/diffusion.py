"""End to end, diffusion: a diffusers UNet2DConditionModel sampled with DPM++ 2M
and classifier-free guidance.

- genfast: ``genfast.patch(unet)`` (GroupNorm+SiLU fused in every ResnetBlock2D
  and the output norm; on the CPU the attention by ``genfast.attention``) and ``genfast.schedulers.from_diffusers`` of the
  DPMSolverMultistepScheduler, guidance fused into the step
  (``step_with_guidance``);
- genfast CUDA graph (on a GPU): the same loop captured whole in one CUDA graph and
  replayed (``GraphedLoop``; its first image includes the capture);
- eager: the loop of diffusers' StableDiffusionPipeline: latents doubled,
  ``scale_model_input``, the UNet, ``chunk``, ``uncond + g (cond - uncond)``,
  ``scheduler.step``; with ``--compile`` also around ``torch.compile(unet)``.

The UNet is SD1.5's architecture at a reduced size on the CPU (the config is
printed); text embeddings are random (no text encoder is run or downloaded).
The final latents must agree within ``RTOL`` of their largest magnitude.

    python benchmarks/e2e/diffusion.py [--full] [--device cpu|cuda] [--steps N] [--compile] [--threads N]
"""
from __future__ import annotations

import argparse
import copy

import torch

import genfast

try:
    from . import common
except ImportError:  # run as a script
    import common

# fp32 GroupNorm+SiLU differs from nn.GroupNorm→silu by rounding (~1e-6 relative); ten
# steps of a random-weight UNet amplify it, but not past 1e-4 of the latents' scale.
RTOL = 1e-4

SD15 = {"sample_size": 64, "cross_attention_dim": 768, "attention_head_dim": 8,
        "block_out_channels": (320, 640, 1280, 1280), "layers_per_block": 2,
        "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3}
QUICK = {"sample_size": 32, "cross_attention_dim": 128, "attention_head_dim": 8, "norm_num_groups": 16,
         "block_out_channels": (64, 128), "layers_per_block": 1,
         "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
         "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D")}
TINY = dict(QUICK, sample_size=8, cross_attention_dim=32, block_out_channels=(32, 32), norm_num_groups=8)
SCHEDULER = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000,
             "algorithm_type": "dpmsolver++", "solver_order": 2}  # SD1.5's schedule, DPM++ 2M


def build(config: dict, device, seed: int = 0):
    """(eager unet, patched copy, diffusers scheduler)."""
    from diffusers import DPMSolverMultistepScheduler, UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**config).to(device).eval()
    patched = copy.deepcopy(unet)
    report = genfast.patch(patched)
    if not report.replaced:  # then the comparison below would measure nothing
        raise RuntimeError(f"genfast.patch fused nothing in the model:\n{report}")
    return unet, patched, DPMSolverMultistepScheduler(**SCHEDULER)


def inputs(config: dict, batch: int, device, seed: int = 0, text_len: int = 77):
    g = torch.Generator("cpu").manual_seed(seed)
    s = config["sample_size"]
    latents = torch.randn(batch, 4, s, s, generator=g).to(device)
    # [uncond; cond] like the pipeline's prompt_embeds after do_classifier_free_guidance
    text = torch.randn(2 * batch, text_len, config["cross_attention_dim"], generator=g).to(device)
    return latents, text


@torch.no_grad()
def sample_eager(unet, scheduler, latents, text, steps: int, guidance: float = 7.5):
    scheduler = copy.deepcopy(scheduler)
    scheduler.set_timesteps(steps, device=latents.device)
    latents = latents * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        x = scheduler.scale_model_input(torch.cat([latents] * 2), t)
        noise = unet(x, t, encoder_hidden_states=text).sample
        uncond, cond = noise.chunk(2)
        latents = scheduler.step(uncond + guidance * (cond - uncond), t, latents).prev_sample
    return latents


@torch.no_grad()
def sample_genfast(unet, scheduler, latents, text, steps: int, guidance: float = 7.5):
    scheduler = genfast.schedulers.from_diffusers(copy.deepcopy(scheduler))
    prepare_loop(scheduler, steps, latents.device)
    return loop_genfast(unet, scheduler, latents, text, guidance)


def prepare_loop(scheduler, steps: int, device) -> None:
    """What a pipeline does before its loop: the schedule, and ``set_begin_index(0)``
    (which spares the first step's timestep lookup, a host sync)."""
    scheduler.set_timesteps(steps, device=device)
    scheduler.set_begin_index(0)


def loop_genfast(unet, scheduler, latents, text, guidance: float = 7.5):
    """``sample_genfast``'s loop on a prepared twin scheduler (``prepare_loop``)."""
    latents = latents * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        x = scheduler.scale_model_input(torch.cat([latents] * 2), t)
        uncond, cond = unet(x, t, encoder_hidden_states=text).sample.chunk(2)
        latents = scheduler.step_with_guidance(uncond, cond, t, latents, guidance).prev_sample
    return latents


class GraphedLoop:
    """``sample_genfast`` on a GPU with the whole loop (every step's UNet, guidance and
    fused DPM++ step) captured once in one CUDA graph; a call copies the latents in and
    replays it. Nothing in the loop waits on the host: the twin scheduler builds its
    tables in the warm-up loop and keeps them through ``set_timesteps`` with the same
    schedule (tests/test_e2e.py checks the loop for host reads on the CPU)."""

    @torch.no_grad()
    def __init__(self, unet, scheduler, latents, text, steps: int, guidance: float = 7.5):
        self.scheduler = genfast.schedulers.from_diffusers(copy.deepcopy(scheduler))
        self.latents = latents.clone()  # the graph's input, at a fixed address
        dev = latents.device
        side = torch.cuda.Stream(dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):  # compiles the kernels, builds the tables, picks cuDNN's algorithms
            prepare_loop(self.scheduler, steps, dev)
            loop_genfast(unet, self.scheduler, self.latents, text, guidance)
        torch.cuda.current_stream(dev).wait_stream(side)
        prepare_loop(self.scheduler, steps, dev)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.out = loop_genfast(unet, self.scheduler, self.latents, text, guidance)

    @torch.no_grad()
    def __call__(self, latents):
        self.latents.copy_(latents)
        self.graph.replay()
        return self.out.clone()


def check_close(got, ref, what: str) -> float:
    err = ((got - ref).abs().max() / ref.abs().max()).item()
    if not err <= RTOL:
        raise AssertionError(f"{what}: genfast's latents differ from eager's by {err:.2e} of their scale "
                             f"(tolerance {RTOL:.0e})")
    return err


def profile_forward(unet, patched, latents, text, rows: int = 12) -> None:
    """One guided UNet forward, unpatched and patched, under torch.profiler: the host's time by
    op (self CPU time) next to the kernels' (device time), so that an uncaptured loop that is
    slower than eager says which calls its host time goes to."""
    from torch.profiler import ProfilerActivity, profile

    x = torch.cat([latents] * 2)
    t = torch.tensor(500, device=latents.device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if latents.is_cuda else [])
    for name, model in (("eager UNet", unet), ("genfast-patched UNet", patched)):
        with torch.no_grad():
            for _ in range(2):
                model(x, t, encoder_hidden_states=text)
            if latents.is_cuda:
                torch.cuda.synchronize()
            with profile(activities=activities) as prof:
                model(x, t, encoder_hidden_states=text)
                if latents.is_cuda:
                    torch.cuda.synchronize()
        events = prof.key_averages()
        print(f"\n{name}: one forward, by self CPU time")
        print(events.table(sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=60))


def bench(quick: bool = True, device=None, batch: int = 1, steps: int = 10, reps: int = 3,
          compile: bool = False, profile: bool = False) -> list[common.Row]:
    """``compile``: also time the eager loop around ``torch.compile(unet)`` (off by default: on
    the CPU compiling the UNet takes minutes), with its time to the first image. ``profile``: then
    print ``profile_forward``'s tables."""
    device = torch.device(device) if device is not None else common.default_device()
    config = QUICK if quick else SD15
    if not quick:
        steps = 25
    unet, patched, sched = build(config, device)
    latents, text = inputs(config, batch, device)
    with common.full_fp32():
        ref = sample_eager(unet, sched, latents, text, steps)
        err = check_close(sample_genfast(patched, sched, latents, text, steps), ref, "diffusion")
    case = f"batch {batch}"
    fns = {"genfast": lambda: sample_genfast(patched, sched, latents, text, steps),
           "eager diffusers loop": lambda: sample_eager(unet, sched, latents, text, steps)}
    firsts = {"genfast": common.time_once(lambda: sample_genfast(patched, sched, latents, text, 1), device)}
    if device.type == "cuda":  # the whole loop in one CUDA graph; its first image includes the capture
        with torch.no_grad():
            with common.full_fp32():  # a graph keeps the math settings it was captured under
                graph_err = check_close(GraphedLoop(patched, sched, latents, text, steps)(latents), ref,
                                        "diffusion, CUDA graph")
            graphed = []
            firsts["genfast CUDA graph"] = common.time_once(  # warm-up loop, capture, replay
                lambda: graphed.append(GraphedLoop(patched, sched, latents, text, steps)) or graphed[0](latents),
                device)
        fns["genfast CUDA graph"] = lambda: graphed[0](latents)
    if compile:
        import warnings

        import torch._inductor.config as inductor_config

        warnings.filterwarnings("ignore", message="dynamo_pgo force disabled")  # the point, not news
        inductor_config.force_disable_caches = True  # a cold compile, as on a fresh install
        compiled = torch.compile(unet)
        firsts["torch.compile(unet)"] = common.time_once(
            lambda: sample_eager(compiled, sched, latents, text, 1), device)
        fns["torch.compile(unet)"] = lambda: sample_eager(compiled, sched, latents, text, steps)
    t = common.time_many(fns, device, reps)
    errs = {"genfast": err, "genfast CUDA graph": graph_err if device.type == "cuda" else None}
    rows = [common.Row("diffusion", case, name, batch, "img/s", t[name], first_s=firsts.get(name),
                       note=f"max err {errs[name]:.1e} of scale" if errs.get(name) is not None else "")
            for name in fns]
    shown = {k: v for k, v in config.items() if k in ("sample_size", "block_out_channels", "layers_per_block",
                                                      "cross_attention_dim", "norm_num_groups")}
    common.print_rows(rows, f"diffusion: UNet2DConditionModel {'SD1.5' if not quick else 'reduced'} {shown}, "
                            f"DPM++ 2M, {steps} steps, guidance 7.5, fp32; {device}")
    if profile:
        with common.full_fp32():
            profile_forward(unet, patched, latents, text)
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--full", action="store_true", help="SD1.5's UNet, 64x64 latents, 25 steps (GPU)")
    common.add_common_args(p)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--compile", action="store_true", help="also time torch.compile(unet) (minutes on a CPU)")
    p.add_argument("--profile", action="store_true", help="then profile one UNet forward, unpatched and patched")
    a = p.parse_args(argv)
    common.apply_common_args(a)
    bench(quick=not a.full, device=a.device, batch=a.batch, steps=a.steps, compile=a.compile, profile=a.profile)


if __name__ == "__main__":
    main()
