"""The fused sampler step (genfast.diffusion) on every backend.

The step's affine map is evaluated here in fp64 from its definition (the
oracle) and in the input precision with plain torch ops (PyTorch's own error,
the yardstick); the scalar-argument steps are checked against diffusers' own
``step()`` in test_schedulers.py and against single diffusers steps here.
"""
import math

import pytest
import torch

import genfast
from genfast import diffusion as D
from genfast.reference import rng as ref_rng
from genfast.reference.diffusion import COEF, NCOEF

from conftest import assert_close

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SHAPES = [(2, 3, 5, 7), (1, 4, 3, 5, 6), (3, 17)]


def skip_unsupported(device, dtype):
    if dtype == torch.bfloat16 and device == "cpu" and genfast._ops.backends.forced() == "triton":
        pytest.skip("the Triton interpreter has no bf16 arithmetic")


def random_row(gen, *, noise=True, h1=True, h2=True):
    row = torch.randn(NCOEF, generator=gen, dtype=torch.float64)
    if not noise:
        row[COEF["an"]] = row[COEF["pn"]] = 0.0
    return row.float()


def threshold_like_diffusers(x0, ratio, max_value):
    """diffusers' dynamic thresholding, written out: per sample, s = the ratio quantile of
    |x0| clamped to [1, max_value], x0 = clamp(x0, -s, s) / s; fp16/bf16 upcast to fp32."""
    dtype = x0.dtype
    flat = x0.reshape(x0.shape[0], -1)
    if dtype not in (torch.float32, torch.float64):
        flat = flat.float()
    s = torch.quantile(flat.abs(), ratio, dim=1).clamp(min=1, max=max_value).unsqueeze(1)
    return (torch.clamp(flat, -s, s) / s).reshape(x0.shape).to(dtype)


def affine(x, m, n, h1, h2, k, clip, dtype, h3=None, threshold=None):
    """The step's map in ``dtype`` with plain torch ops (k: dict of floats)."""
    x, m = x.to(dtype), m.to(dtype)
    n = n.to(dtype) if n is not None else torch.zeros_like(x)
    h1 = h1.to(dtype) if h1 is not None else torch.zeros_like(x)
    h2 = h2.to(dtype) if h2 is not None else torch.zeros_like(x)
    h3 = h3.to(dtype) if h3 is not None else torch.zeros_like(x)
    x0 = k["ax"] * x + k["am"] * m + k["an"] * n
    if clip > 0:
        x0 = x0.clamp(-clip, clip)
    if threshold is not None:
        x0 = threshold_like_diffusers(x0, *threshold)
    prev = k["px"] * x + k["pm"] * m + k["p0"] * x0 + k["pn"] * n + k["p1"] * h1 + k["p2"] * h2 \
        + k["p3"] * h3 + k["pd"] * (x0 - h1)
    new = [k[f"h{j}x"] * x + k[f"h{j}m"] * m + k[f"h{j}0"] * x0 + k[f"h{j}1"] * h1 + k[f"h{j}2"] * h2
           + k[f"h{j}3"] * h3 for j in (1, 2, 3)]
    return (prev, x0, *new)


def guided(u, c, g, dtype):
    u, c = u.to(dtype), c.to(dtype)
    return u + g * (c - u)


def stream(shape, seed, counter0):
    n = math.prod(shape)
    return ref_rng.normal_stream(n, seed, counter0, "cpu").view(shape)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("variant", ["plain", "guided-drawn-noise-history", "given-noise-clip-2history",
                                     "guided-drawn-noise-threshold-3history", "history2-history3-only"])
def test_sampler_step_is_the_affine_map(backend, shape, dtype, variant):
    skip_unsupported(backend, dtype)
    gen = torch.Generator().manual_seed(hash((shape, str(dtype), variant)) % 2**31)
    x, u, c, h1, h2, h3 = (torch.randn(shape, generator=gen).to(backend, dtype) for _ in range(6))
    rows = torch.stack([random_row(gen) for _ in range(3)]).to(backend)
    row, seed, offset, g = 2, 1234, 55, 5.5
    kwargs, n, clip, hist1, hist2, hist3, threshold = {}, None, 0.0, None, None, None, None
    if variant == "plain":
        rows[:, [COEF["an"], COEF["pn"]]] = 0.0
        model_output = u
    elif variant == "history2-history3-only":  # any subset of the histories may be given
        rows[:, [COEF["an"], COEF["pn"]]] = 0.0
        model_output = u
        hist2, hist3 = h2.clone(), h3.clone()
        kwargs = dict(history2=hist2, history3=hist3)
    elif variant.startswith("guided-drawn-noise"):
        model_output = (u, c)
        kwargs = dict(guidance_scale=g, stochastic=True, seed=seed, offset=offset)
        n = stream(shape, seed, offset + row * x.numel())
        hist1 = h1.clone()
        kwargs["history"] = hist1
        if "threshold" in variant:
            # |x0| is ~N(0, 10)-sized here: the bound is a quantile in (1, 25) for most samples
            threshold = (0.9, 25.0)
            hist2, hist3 = h2.clone(), h3.clone()
            kwargs.update(history2=hist2, history3=hist3, threshold=threshold)
    else:
        model_output = u
        n = torch.randn(shape, generator=gen)
        clip = 0.8
        hist1, hist2 = h1.clone(), h2.clone()
        kwargs = dict(noise=n.to(backend), clip=clip, history=hist1, history2=hist2, stochastic=True)
    n = n.to(backend) if n is not None else None
    prev, x0 = D.sampler_step(x, model_output, rows, row, return_x0=True, **kwargs)

    k = {name: rows[row, i].item() for name, i in COEF.items()}
    m64 = guided(u, c, g, torch.float64) if isinstance(model_output, tuple) else u.double()
    mlow = guided(u, c, g, dtype) if isinstance(model_output, tuple) else u
    h1_in = h1 if hist1 is not None else None
    h2_in = h2 if hist2 is not None else None
    h3_in = h3 if hist3 is not None else None
    ref64 = affine(x.double(), m64, n.double() if n is not None else None, h1_in, h2_in, k, clip, torch.float64,
                   h3_in, threshold)
    n_low = n.to(backend, dtype) if n is not None else None
    low = affine(x, mlow, n_low, h1_in, h2_in, k, clip, dtype, h3_in, threshold)
    # the stream agrees with the fp64 oracle within 1e-6; the coefficients multiply that
    atol = 2e-6 * (abs(k["pn"]) + abs(k["p0"] * k["an"])) if "drawn" in variant else 1e-6
    assert prev.dtype == dtype and prev.shape == x.shape
    assert_close(prev, ref64[0], low[0], atol=atol, name="prev")
    # clamping in the input precision can land on the other side of the bound: allow one rounding there
    assert_close(x0, ref64[1], low[1], atol=atol + (clip * 2 * torch.finfo(dtype).eps), name="x0")
    if hist1 is not None:
        assert_close(hist1, ref64[2], low[2], atol=atol, name="history")
    if hist2 is not None:
        assert_close(hist2, ref64[3], low[3], atol=atol, name="history2")
    if hist3 is not None:
        assert_close(hist3, ref64[4], low[4], atol=atol, name="history3")


@pytest.mark.parametrize("dtype", DTYPES)
def test_guidance_rescale_matches_diffusers_formula(backend, dtype):
    skip_unsupported(backend, dtype)
    gen = torch.Generator().manual_seed(3)
    shape = (3, 4, 7, 9)
    # a mean far from 0 checks that the std does not cancel
    u = (torch.randn(shape, generator=gen) + 3.0).to(backend, dtype)
    c = (1.3 * torch.randn(shape, generator=gen) + 3.0).to(backend, dtype)
    g, phi = 7.5, 0.7
    table = D.identity_coefficients().to(backend)
    table[0] = 0.0
    table[0, COEF["pm"]] = 1.0
    out = D.sampler_step(u, (u, c), table, guidance_scale=g, guidance_rescale=phi)

    def rescale(u, c):  # diffusers' rescale_noise_cfg
        cfg = u + g * (c - u)
        dims = list(range(1, u.dim()))
        std_text, std_cfg = c.std(dim=dims, keepdim=True), cfg.std(dim=dims, keepdim=True)
        return phi * cfg * (std_text / std_cfg) + (1 - phi) * cfg

    ref64 = rescale(u.double().cpu(), c.double().cpu())
    low = rescale(u.float(), c.float()).cpu() if dtype != torch.float32 else rescale(u, c).cpu()
    assert_close(out, ref64, low, atol=1e-6, name="guided")


def test_channels_last_keeps_layout_and_values(backend):
    gen = torch.Generator().manual_seed(4)
    x, u, c = (torch.randn(2, 3, 5, 4, generator=gen).to(backend) for _ in range(3))
    rows = random_row(gen, noise=False).unsqueeze(0).to(backend)
    cl = torch.channels_last
    h_cl = torch.zeros_like(x.to(memory_format=cl))
    out_cl = D.sampler_step(x.to(memory_format=cl), (u.to(memory_format=cl), c), rows, guidance_scale=2.0,
                            guidance_rescale=0.5, history=h_cl)
    h = torch.zeros_like(x)
    out = D.sampler_step(x, (u, c), rows, guidance_scale=2.0, guidance_rescale=0.5, history=h)
    assert out_cl.is_contiguous(memory_format=cl) and h_cl.is_contiguous(memory_format=cl)
    torch.testing.assert_close(out_cl, out, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(h_cl, h, atol=1e-6, rtol=1e-6)


def test_device_row_equals_int_row_and_moves_the_noise(backend):
    gen = torch.Generator().manual_seed(5)
    x, u = (torch.randn(2, 3, 4, 5, generator=gen).to(backend) for _ in range(2))
    rows = torch.stack([random_row(gen) for _ in range(4)]).to(backend)
    a = D.sampler_step(x, u, rows, 3, stochastic=True, seed=11, offset=7)
    b = D.sampler_step(x, u, rows, torch.tensor(3, device=backend), stochastic=True,
                       seed=torch.tensor(11, device=backend), offset=7)
    assert torch.equal(a, b)
    c = D.sampler_step(x, u, rows, 3, stochastic=True, noise=stream(x.shape, 11, 7 + 3 * x.numel()).to(backend))
    torch.testing.assert_close(a, c, atol=1e-5, rtol=1e-6)


@pytest.mark.parametrize("case", ["plain", "guided-history", "drawn-noise", "device-row-and-seed", "two-histories",
                                  "channels-last", "rescale", "given-noise", "strided-cond",
                                  "threshold-three-histories", "threshold-rescale"])
def test_step_rows_equals_sampler_step(backend, case, monkeypatch):
    """The schedulers' per-step path (direct call when the tensors are plain) gives
    sampler_step's results bit for bit, and falls back to it otherwise."""
    gen = torch.Generator().manual_seed(6)
    x, u, c = (torch.randn(2, 3, 5, 7, generator=gen).to(backend) for _ in range(3))
    rows = torch.stack([random_row(gen) for _ in range(3)]).to(backend)
    kw = {"guidance_scale": 3.0}
    step, model_output = 1, (u, c)
    histories = {}
    if case == "plain":
        model_output, kw = u, {}
    elif case in ("guided-history", "two-histories", "threshold-three-histories"):
        histories["history"] = torch.randn(x.shape, generator=gen).to(backend)
        if case != "guided-history":
            histories["history2"] = torch.randn(x.shape, generator=gen).to(backend)
        if case == "threshold-three-histories":
            histories["history3"] = torch.randn(x.shape, generator=gen).to(backend)
    elif case == "drawn-noise":
        kw.update(stochastic=True, seed=12)
    elif case == "device-row-and-seed":
        step = torch.tensor(2, device=backend)
        kw.update(stochastic=True, seed=torch.tensor(13, device=backend))
    elif case == "channels-last":
        x = x.to(memory_format=torch.channels_last)
    elif case == "rescale":
        kw.update(guidance_rescale=0.6)
    elif case == "given-noise":
        kw.update(stochastic=True, noise=torch.randn(x.shape, generator=gen).to(backend))
    elif case == "strided-cond":
        model_output = (u, torch.randn(2, 3, 5, 14, generator=gen).to(backend)[..., ::2])
    if case.startswith("threshold"):
        kw.update(threshold=(0.8, 3.0), stochastic=True, seed=14, guidance_rescale=0.6 if "rescale" in case else 0.0)
    else:
        kw.update(clip=1.5)
    h_ref = {k: v.clone() for k, v in histories.items()}
    ref = D.sampler_step(x, model_output, rows, step, return_x0=True, **h_ref, **kw)
    fell_back = []
    full = D.sampler_step
    monkeypatch.setattr(D, "sampler_step", lambda *a, **k: fell_back.append(1) or full(*a, **k))
    if case.startswith("threshold"):
        kw["threshold_rows"] = D.x0_rows(rows)
    out = D._step_rows(x, model_output, rows, step, return_x0=True, **histories, **kw)
    assert bool(fell_back) == (case in ("channels-last", "rescale", "given-noise", "strided-cond",
                                        "threshold-rescale"))
    for a, b in zip(out, ref):
        assert torch.equal(a, b) and a.stride() == b.stride()
    for k, h in histories.items():
        assert torch.equal(h, h_ref[k])


def test_step_rows_follows_the_forced_backend():
    x = torch.randn(2, 3)
    with genfast.use_backend("reference"):
        impl = D.sampler_step_op.implementation_for(x.device, x.dtype)
    assert impl is genfast._ops.implementation("sampler_step", "diffusion", "reference")


def test_cpu_step_tensor_outside_the_table_is_refused():
    """A 0-d step tensor is read on the device, unchecked by Python; on the CPU the C++
    kernel reads it and refuses a row outside the table, writing nothing."""
    if not genfast.backends()["cpp"][0]:
        pytest.skip("the C++ backend is not built")
    gen = torch.Generator().manual_seed(3)
    x, u, h = (torch.randn(2, 3, 4, generator=gen) for _ in range(3))
    rows = torch.stack([random_row(gen) for _ in range(3)])
    h_before = h.clone()
    for step in (torch.tensor(3), torch.tensor(-1)):
        with pytest.raises(ValueError, match="outside the coefficient table"):
            D._step_rows(x, u, rows, step, history=h)
        with pytest.raises(ValueError, match="outside the coefficient table"):
            D.sampler_step(x, u, rows, step, history=h)
    assert torch.equal(h, h_before)


def test_fp64_runs_the_reference_exactly():
    gen = torch.Generator().manual_seed(6)
    x, u, c = (torch.randn(2, 3, 4, generator=gen, dtype=torch.float64) for _ in range(3))
    rows = random_row(gen, noise=False).unsqueeze(0)
    out = D.sampler_step(x, (u, c), rows, guidance_scale=3.0)
    k = {name: rows[0, i].double() for name, i in COEF.items()}
    ref = affine(x, u + 3.0 * (c - u), None, None, None, k, 0.0, torch.float64)[0]
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-12)


# ---- the scalar-argument steps against diffusers' single steps ----------------

def _diffusers():
    return pytest.importorskip("diffusers")


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_euler_step_matches_one_diffusers_step(prediction_type):
    diffusers = _diffusers()
    sched = diffusers.EulerDiscreteScheduler(prediction_type=prediction_type)
    sched.set_timesteps(10)
    i = 3
    gen = torch.Generator().manual_seed(7)
    x, u, c = (torch.randn(2, 4, 5, 6, generator=gen) for _ in range(3))
    t = sched.timesteps[i]
    sched._step_index = i
    ref = sched.step(u + 4.0 * (c - u), t, x).prev_sample
    out = D.euler_step(x, (u, c), sched.sigmas[i].item(), sched.sigmas[i + 1].item(),
                       prediction_type=prediction_type, guidance_scale=4.0)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("eta", [0.0, 0.7])
def test_ddim_step_matches_one_diffusers_step(prediction_type, eta):
    diffusers = _diffusers()
    sched = diffusers.DDIMScheduler(prediction_type=prediction_type, clip_sample=True)
    sched.set_timesteps(10)
    gen = torch.Generator().manual_seed(8)
    x, m, n = (torch.randn(2, 4, 5, 6, generator=gen) for _ in range(3))
    t = int(sched.timesteps[4])
    prev_t = t - 1000 // 10
    ref = sched.step(m, t, x, eta=eta, variance_noise=n)
    out, x0 = D.ddim_step(x, m, sched.alphas_cumprod[t], sched.alphas_cumprod[prev_t], eta=eta,
                          prediction_type=prediction_type, clip_sample_range=1.0, noise=n, return_x0=True)
    torch.testing.assert_close(out, ref.prev_sample, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(x0, ref.pred_original_sample, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("sde", [False, True])
def test_dpmpp_2m_steps_match_diffusers(sde):
    diffusers = _diffusers()
    sched = diffusers.DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++" if sde else "dpmsolver++",
                                                  use_karras_sigmas=True)
    sched.set_timesteps(12)
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(2, 4, 5, 6, generator=gen) * 10
    ours, history = x.clone(), torch.zeros_like(x)
    for i in range(3):
        m = torch.randn(x.shape, generator=gen)
        n = torch.randn(x.shape, generator=gen)
        x = sched.step(m, sched.timesteps[i], x, variance_noise=n).prev_sample
        sig = sched.sigmas
        ours = D.dpmpp_2m_step(ours, m, history, sig[i], sig[i + 1], None if i == 0 else sig[i - 1], sde=sde,
                               noise=n)
        torch.testing.assert_close(ours, x, atol=5e-5, rtol=1e-5)


@pytest.mark.parametrize("stochastic", [False, True])
def test_flow_match_euler_step_matches_diffusers(stochastic):
    diffusers = _diffusers()
    sched = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0, stochastic_sampling=stochastic)
    sched.set_timesteps(8)
    gen = torch.Generator().manual_seed(10)
    x, v = (torch.randn(1, 16, 6, 5, generator=gen) for _ in range(2))
    sched._step_index = 2
    n = torch.randn(x.shape, generator=torch.Generator().manual_seed(3))
    ref = sched.step(v, sched.timesteps[2], x, generator=torch.Generator().manual_seed(3)).prev_sample
    out = D.flow_match_euler_step(x, v, sched.sigmas[2], sched.sigmas[3], stochastic=stochastic,
                                  noise=n if stochastic else None)
    torch.testing.assert_close(out, ref, atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("sampler", D.SAMPLERS)
def test_k_diffusion_loop_matches_an_fp64_loop(sampler):
    """sample() against k-diffusion's formulas written out in fp64 here."""
    sigmas = torch.tensor([14.6, 8.0, 4.1, 2.0, 0.9, 0.3, 0.0], dtype=torch.float64)
    x0_true = torch.randn(2, 3, 4, 5, generator=torch.Generator().manual_seed(11), dtype=torch.float64)

    def denoise(x, sigma):  # a smooth stand-in model
        return torch.tanh(x / (1 + float(sigma))) + 0.1 * x0_true.to(x.dtype)

    x_init = torch.randn(2, 3, 4, 5, generator=torch.Generator().manual_seed(12), dtype=torch.float64) * 14.6
    seed = 77
    out = D.sample(denoise, x_init.float(), sigmas, sampler, seed=seed)
    x, old = x_init.clone(), None
    numel = x.numel()
    for i in range(len(sigmas) - 1):
        s, sn = sigmas[i], sigmas[i + 1]
        d0 = denoise(x, s)
        n = stream(x.shape, seed, i * numel).double()
        if sampler == "euler":
            x = x + (x - d0) / s * (sn - s)
        elif sampler == "euler_ancestral":
            up = torch.sqrt(sn**2 * (s**2 - sn**2) / s**2)
            down = torch.sqrt(sn**2 - up**2)
            x = x + (x - d0) / s * (down - s) + up * n
        else:
            h = torch.log(s) - torch.log(sn) if sn > 0 else torch.tensor(math.inf, dtype=torch.float64)
            if sampler == "dpmpp_2m":
                dd = d0
                if old is not None and sn > 0:
                    r = (torch.log(sigmas[i - 1]) - torch.log(s)) / h
                    dd = (1 + 1 / (2 * r)) * d0 - 1 / (2 * r) * old
                x = (sn / s) * x - torch.expm1(-h) * dd
            else:
                x = (sn / s) * torch.exp(-h) * x - torch.expm1(-2 * h) * d0 + sn * torch.sqrt(-torch.expm1(-2 * h)) * n
                if old is not None and sn > 0:
                    r = (torch.log(sigmas[i - 1]) - torch.log(s)) / h
                    x = x - 0.5 * torch.expm1(-2 * h) / r * (d0 - old)
            old = d0
    torch.testing.assert_close(out.double(), x, atol=1e-4, rtol=1e-4)


# ---- errors, compile, opcheck -------------------------------------------------

def test_bad_inputs_name_the_argument():
    x = torch.randn(2, 3, 4)
    rows = D.identity_coefficients()
    with pytest.raises(ValueError, match="model_output"):
        D.sampler_step(x, torch.randn(2, 3, 5), rows)
    with pytest.raises(TypeError, match="model_output"):
        D.sampler_step(x, x.half(), rows)
    with pytest.raises(ValueError, match="cond"):
        D.sampler_step(x, (x, torch.randn(2, 3, 3)), rows, guidance_scale=2.0)
    with pytest.raises(ValueError, match="coefficients"):
        D.sampler_step(x, x, torch.zeros(3, 7))
    with pytest.raises(TypeError, match="coefficients"):
        D.sampler_step(x, x, rows.double())
    with pytest.raises(ValueError, match="step"):
        D.sampler_step(x, x, rows, 1)
    with pytest.raises(TypeError, match="step"):
        D.sampler_step(x, x, rows, torch.tensor(0.0))
    with pytest.raises(ValueError, match="guidance_rescale"):
        D.sampler_step(x, x, rows, guidance_rescale=0.5)
    with pytest.raises(ValueError, match="guidance_rescale"):
        D.sampler_step(x, (x, x), rows, guidance_rescale=1.5)
    with pytest.raises(ValueError, match="clip"):
        D.sampler_step(x, x, rows, clip=-1.0)
    with pytest.raises(ValueError, match="history"):
        D.sampler_step(x, x, rows, history=torch.zeros(2, 3))
    with pytest.raises(ValueError, match="history"):
        D.sampler_step(x, x, rows, history=torch.zeros(4, 3, 2).permute(2, 1, 0))
    with pytest.raises(ValueError, match="noise"):
        D.sampler_step(x, x, rows, noise=torch.zeros(3), stochastic=True)
    with pytest.raises(ValueError, match="model_output"):
        D.sampler_step(x, (x, x, x), rows)
    with pytest.raises(ValueError, match="sampler"):
        D.sample(lambda x, s: x, x, [1.0, 0.0], "heun9")


def test_history_untouched_when_arguments_are_bad():
    x = torch.randn(2, 3, 4)
    h = torch.randn_like(x)
    before = h.clone()
    with pytest.raises(ValueError):
        D.sampler_step(x, torch.randn(2, 3, 5), D.identity_coefficients(), history=h)
    assert torch.equal(h, before)


def test_compiled_step_has_no_graph_break(backend):
    gen = torch.Generator().manual_seed(13)
    x, u, c = (torch.randn(2, 3, 4, 5, generator=gen).to(backend) for _ in range(3))
    rows = torch.stack([random_row(gen) for _ in range(3)]).to(backend)
    step = torch.tensor(1, device=backend)

    def fn(x, u, c, h):
        return D.sampler_step(x, (u, c), rows, step, guidance_scale=3.0, guidance_rescale=0.3, stochastic=True,
                              seed=5, history=h)

    h_eager, h_comp = torch.zeros_like(x), torch.zeros_like(x)
    eager = fn(x, u, c, h_eager)
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")(x, u, c, h_comp)
    torch.testing.assert_close(compiled, eager)
    torch.testing.assert_close(h_comp, h_eager)


def test_opcheck(backend):
    gen = torch.Generator().manual_seed(14)
    x, u, c, n, h = (torch.randn(2, 3, 4, generator=gen).to(backend) for _ in range(5))
    rows = torch.stack([random_row(gen) for _ in range(2)]).to(backend)
    factor = torch.rand(2, device=backend) + 0.5
    bound = torch.rand(2, device=backend) + 1.0
    op = D.sampler_step_op.packet
    torch.library.opcheck(op, (x, u, c, n, h.clone(), None, None, rows, 1, None, 2.0, factor, 0.5, None, True, 3,
                               None, 0, True))
    torch.library.opcheck(op, (x, u, None, None, None, None, None, rows, 0, torch.tensor(1, device=backend), 1.0, None, 0.0, None,
                               True, 0, torch.tensor(9, device=backend), 4, False))
    torch.library.opcheck(op, (x, u, c, None, h.clone(), h.clone(), h.clone(), rows, 1, None, 2.0, factor, 0.0, bound,
                               False, 0, None, 0, True))
    torch.library.opcheck(D.guidance_rescale_factor_op.packet, (u, c, 5.0, 0.7))


@pytest.mark.parametrize("sampler", ["euler", "ddim", "dpmpp_2m", "flow_match_euler", "ddim_threshold"])
def test_benchmark_compiled_baseline_is_diffusers_step(sampler):
    """The benchmark's torch.compile baseline (the step's math as a plain function)
    computes what diffusers' step plus the pipeline's guidance computes, bit for bit in eager."""
    diffusers = pytest.importorskip("diffusers")
    import pathlib
    import sys

    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))
    import bench_diffusion as B

    name, config, _ = B.SAMPLERS[sampler]
    sched = getattr(diffusers, name)(**config)
    sched.set_timesteps(25)
    gen = torch.Generator().manual_seed(21)
    x, previous_x0 = torch.randn(1, 4, 6, 5, generator=gen), torch.randn(1, 4, 6, 5, generator=gen)
    noise_pred = torch.randn(2, 4, 6, 5, generator=gen)
    sched._step_index = B.STEP
    if hasattr(sched, "lower_order_nums"):
        sched.lower_order_nums, sched.model_outputs = 1, [None, previous_x0]
    uncond, cond = noise_pred.chunk(2)
    ref = sched.step(uncond + B.GUIDANCE * (cond - uncond), sched.timesteps[B.STEP], x).prev_sample
    scalars = B._scalars(sampler, sched, "cpu")
    g = torch.tensor(B.GUIDANCE)
    args = (noise_pred, x, previous_x0, *scalars, g) if sampler == "dpmpp_2m" else (noise_pred, x, *scalars, g)
    out = B.MATH[sampler](*args)
    torch.testing.assert_close(out[0] if isinstance(out, tuple) else out, ref, rtol=0, atol=0)


def test_new_table_builders_reject_bad_arguments():
    with pytest.raises(ValueError, match="variance_type"):
        D.ddpm_coefficients([0.5], [0.6], variance_type="learned")
    with pytest.raises(ValueError, match="steps \\+ 1"):
        D.unipc_coefficients([1.0, 0.5], [0.1, 0.9], [1, 2], [False, True], x0_ax=1.0, x0_am=-0.1)
    with pytest.raises(ValueError, match="solver_type"):
        D.unipc_coefficients([0.5, 0.9], [0.9, 0.4], [1], [False], x0_ax=2.0, x0_am=-1.8, solver_type="bh3")
    with pytest.raises(ValueError, match="orders"):
        D.unipc_coefficients([0.5, 0.9], [0.9, 0.4], [4], [False], x0_ax=2.0, x0_am=-1.8)
    for builder in (lambda p: D.ddim_coefficients([0.5], [0.6], p), lambda p: D.ddpm_coefficients([0.5], [0.6], p),
                    lambda p: D.lcm_coefficients([0.5], [0.6], [0.1], [0.9], p)):
        with pytest.raises(ValueError, match="prediction_type"):  # diffusers refuses it there too
            builder("flow_prediction")
    with pytest.raises(ValueError, match="prediction_type"):
        D.heun_coefficients([1.0], [0.5], [True], prediction_type="x")


def test_heun_table_is_heuns_method():
    """Both stages through the kernel equal x + dt (d1 + d2) / 2 for an epsilon model."""
    gen = torch.Generator().manual_seed(22)
    x, m1, m2 = (torch.randn(2, 3, 5, generator=gen, dtype=torch.float64) for _ in range(3))
    s, t = 2.0, 0.7
    table = D.heun_coefficients([s, s], [t, t], [True, False]).float()
    h = torch.zeros_like(x)
    x1 = D.sampler_step(x, m1, table, 0, history=h)
    prev = D.sampler_step(x1, m2, table, 1, history=h)
    # epsilon: d = (x - x0) / sigma = m; the second slope is evaluated at x1 with sigma t
    torch.testing.assert_close(x1, x + (t - s) * m1)
    torch.testing.assert_close(prev, x + (t - s) * (m1 + m2) / 2)


# ---- dynamic thresholding ------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_threshold_bound_is_torch_quantile_bit_for_bit(dtype):
    """The bound's selection (topk of the shorter end) and interpolation equal
    torch.quantile's, as diffusers calls it, at every rank position."""
    gen = torch.Generator().manual_seed(15)
    for inner in (1, 2, 7, 252, 1001):
        x0 = (torch.randn(3, inner, generator=gen, dtype=torch.float64) * 3).to(dtype)
        for ratio in (0.0, 0.3, 0.5, 0.9, 0.995, 0.9999, 1.0):
            a = x0.abs() if dtype != torch.float16 else x0.float().abs()
            ref = torch.quantile(a, ratio, dim=1).clamp(min=1, max=7.5)
            assert torch.equal(D.dynamic_threshold_bound(x0, ratio, 7.5), ref), (inner, ratio)


def test_threshold_bound_reads_memory_order_per_sample():
    """Any dense layout with the batch outermost: the quantile ignores the order within a sample."""
    x0 = torch.randn(2, 3, 4, 5) * 4
    cl = x0.to(memory_format=torch.channels_last)
    torch.testing.assert_close(D.dynamic_threshold_bound(cl, 0.8, 9.0), D.dynamic_threshold_bound(x0, 0.8, 9.0),
                               rtol=0, atol=0)


def test_thresholded_step_clamps_and_divides_by_the_bound(backend):
    """A step whose update is x0 itself: the output is diffusers' thresholded x0, for a
    sample whose bound is capped at sample_max_value, one below the floor of 1 (left
    unchanged) and one in between."""
    gen = torch.Generator().manual_seed(16)
    x, m = (torch.randn(3, 4, 5, 3, generator=gen).to(backend) for _ in range(2))
    x[1], m[1] = 0.1 * x[1], 0.1 * m[1]
    x[2], m[2] = 0.3 * x[2], 0.3 * m[2]
    rows = torch.zeros(1, NCOEF)
    rows[0, COEF["ax"]], rows[0, COEF["am"]], rows[0, COEF["p0"]] = 4.0, 0.5, 1.0
    rows = rows.to(backend)
    out = D.sampler_step(x, (m, m), rows, threshold=(0.95, 3.0), guidance_scale=2.0)
    x0 = 4.0 * x + 0.5 * m
    s = D.dynamic_threshold_bound(x0, 0.95, 3.0)
    assert s[0] == 3 and s[1] == 1 and 1 < s[2] < 3 and (x0.abs().amax(dim=(1, 2, 3))[[0, 2]] > s[[0, 2]]).all()
    torch.testing.assert_close(out, threshold_like_diffusers(x0, 0.95, 3.0), rtol=1e-6, atol=1e-6)


def test_compiled_thresholded_step_has_no_graph_break(backend):
    gen = torch.Generator().manual_seed(17)
    x, u, c = (torch.randn(2, 3, 4, 5, generator=gen).to(backend) for _ in range(3))
    rows = torch.stack([random_row(gen) for _ in range(3)]).to(backend)
    step = torch.tensor(1, device=backend)

    def fn(x, u, c, h1, h2, h3):
        return D.sampler_step(x, (u, c), rows, step, guidance_scale=3.0, stochastic=True, seed=5, history=h1,
                              history2=h2, history3=h3, threshold=(0.9, 4.0), return_x0=True)

    hs_eager = [torch.randn(x.shape, generator=gen).to(backend) for _ in range(3)]
    hs_comp = [h.clone() for h in hs_eager]
    eager = fn(x, u, c, *hs_eager)
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")(x, u, c, *hs_comp)
    for a, b in zip(list(compiled) + hs_comp, list(eager) + hs_eager):
        torch.testing.assert_close(a, b)


def test_threshold_bad_inputs_name_the_argument():
    x = torch.randn(2, 3, 4)
    rows = D.identity_coefficients()
    with pytest.raises(ValueError, match="dynamic_thresholding_ratio"):
        D.sampler_step(x, x, rows, threshold=(1.5, 2.0))
    with pytest.raises(ValueError, match="sample_max_value"):
        D.sampler_step(x, x, rows, threshold=(0.9, 0.0))
    with pytest.raises(ValueError, match="threshold"):
        D.sampler_step(x, x, rows, threshold=0.9)
    with pytest.raises(ValueError, match="clip"):
        D.sampler_step(x, x, rows, threshold=(0.9, 2.0), clip=1.0)
    with pytest.raises(ValueError, match="batch dimension"):
        D.sampler_step(x[0, 0], x[0, 0], rows, threshold=(0.9, 2.0))
    with pytest.raises(ValueError, match="history3"):
        D.sampler_step(x, x, rows, history3=torch.zeros(2, 3))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_guided_noisy_multistep_loop_replays_in_a_cuda_graph():
    """One step captured once, replayed per step with the row and the seed read on the
    device, gives the eager loop's samples and history bit for bit."""
    gen = torch.Generator().manual_seed(21)
    rows = torch.stack([random_row(gen) * 0.5 for _ in range(4)]).cuda()
    x0, u, c = (torch.randn(2, 4, 8, 8, generator=gen).cuda() for _ in range(3))
    kw = dict(guidance_scale=3.0, stochastic=True)
    x, h, ref = x0.clone(), torch.zeros_like(x0), []
    for i in range(4):
        x = D.sampler_step(x, (u, c), rows, i, history=h, seed=7, **kw)
        ref.append((x, h.clone()))
    x_s, h_s = x0.clone(), torch.zeros_like(x0)
    step, seed = torch.tensor(0, device="cuda"), torch.tensor(7, device="cuda")
    D.sampler_step(x_s.clone(), (u, c), rows, step, history=h_s.clone(), seed=seed, **kw)  # compile outside
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = D.sampler_step(x_s, (u, c), rows, step, history=h_s, seed=seed, **kw)
    for i in range(4):
        step.fill_(i)
        graph.replay()
        assert torch.equal(out, ref[i][0]) and torch.equal(h_s, ref[i][1])
        x_s.copy_(out)
