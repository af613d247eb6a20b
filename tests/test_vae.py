"""reparameterize, gaussian_kl and reparameterize_with_kl on every backend,
against fp64 formulas written here (not the reference module), with PyTorch's
own error in the input precision as the yardstick."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import genfast
from genfast.reference import rng as ref_rng

from conftest import DEVICE, assert_close

SHAPES = [(1,), (7, 13), (2, 3, 17, 5), (4099,)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
REDUCTIONS = ["none", "sum", "mean", "batchmean"]


def skip_unsupported(device, dtype):
    if dtype == torch.bfloat16 and device == "cpu" and genfast._ops.backends.forced() == "triton":
        pytest.skip("the Triton interpreter has no bf16 arithmetic")


def inputs(shape, dtype, device, requires_grad=False):
    mu = (1.5 * torch.randn(shape, device=device)).to(dtype)
    logvar = (2.0 * torch.randn(shape, device=device)).to(dtype)
    return mu.requires_grad_(requires_grad), logvar.requires_grad_(requires_grad)


def stream(shape, seed, offset):
    n = 1
    for s in shape:
        n *= s
    return ref_rng.normal_stream(n, seed, offset, "cpu").view(shape)


def noise_atol(logvar, scale=1.0):
    """The stream agrees across backends within 1e-6; z inherits that times std."""
    std = torch.exp(0.5 * logvar.detach().double().cpu())
    return 2e-6 * (1 + scale * std)


def kl64(mu, logvar):
    mu, logvar = mu.detach().double().cpu(), logvar.detach().double().cpu()
    return -0.5 * (1 + logvar - mu * mu - torch.exp(logvar))


def kl_lowp(mu, logvar):
    mu, logvar = mu.detach(), logvar.detach()
    return (-0.5 * (1 + logvar - mu * mu - torch.exp(logvar))).cpu()


def scale_of(reduction, shape):
    n = torch.Size(shape).numel()
    return {"none": 1.0, "sum": 1.0, "mean": 1.0 / n, "batchmean": 1.0 / shape[0]}[reduction]


def reduce64(kl, reduction):
    return kl if reduction == "none" else kl.sum() * scale_of(reduction, kl.shape)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_reparameterize_forward_and_backward(backend, shape, dtype):
    skip_unsupported(backend, dtype)
    seed, offset = 1234, 77
    mu, logvar = inputs(shape, dtype, backend, requires_grad=True)
    z = genfast.reparameterize(mu, logvar, seed=seed, offset=offset)
    eps = stream(shape, seed, offset)
    std64 = torch.exp(0.5 * logvar.detach().double().cpu())
    z64 = mu.detach().double().cpu() + std64 * eps.double()
    z_lowp = (mu.detach() + torch.exp(0.5 * logvar.detach()) * eps.to(backend, dtype)).cpu()
    assert z.dtype == dtype and z.device == mu.device
    assert_close(z, z64, z_lowp, atol=noise_atol(logvar), name="z")

    grad = torch.randn(shape, device=backend).to(dtype)
    grad_mu, grad_logvar = torch.autograd.grad(z, (mu, logvar), grad)
    g64 = grad.double().cpu()
    assert torch.equal(grad_mu, grad)
    glv64 = 0.5 * g64 * std64 * eps.double()
    glv_lowp = (0.5 * grad * torch.exp(0.5 * logvar.detach()) * eps.to(backend, dtype)).cpu()
    assert_close(grad_logvar, glv64, glv_lowp, atol=noise_atol(logvar, g64.abs()), name="grad_logvar")


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_gaussian_kl_forward_and_backward(backend, shape, dtype, reduction):
    skip_unsupported(backend, dtype)
    mu, logvar = inputs(shape, dtype, backend, requires_grad=True)
    kl = genfast.gaussian_kl(mu, logvar, reduction)
    ref64 = reduce64(kl64(mu, logvar), reduction)
    if reduction == "none":
        assert kl.dtype == dtype
        assert_close(kl, ref64, kl_lowp(mu, logvar), atol=1e-6, name="kl")
    else:
        # Reduced in fp32: PyTorch's fp32 sum is the yardstick, plus summation-order slack.
        assert kl.dtype == torch.float32 and kl.dim() == 0
        lowp = reduce64(kl_lowp(mu.float(), logvar.float()), reduction)
        slack = 1e-6 * kl64(mu, logvar).abs().sum().item() * scale_of(reduction, shape)
        assert_close(kl, ref64, lowp, atol=slack, name="kl")

    grad = torch.randn(kl.shape, device=backend).to(kl.dtype)
    grad_mu, grad_logvar = torch.autograd.grad(kl, (mu, logvar), grad)
    g64 = grad.double().cpu() * scale_of(reduction, shape)
    m64, lv64 = mu.detach().double().cpu(), logvar.detach().double().cpu()
    g_lowp = (grad.to(dtype) * scale_of(reduction, shape)).to(dtype)
    mu_l, lv_l = mu.detach(), logvar.detach()
    assert_close(grad_mu, g64 * m64, (g_lowp * mu_l).cpu(), atol=1e-6, name="grad_mu")
    assert_close(grad_logvar, 0.5 * g64 * (torch.exp(lv64) - 1), (0.5 * g_lowp * (torch.exp(lv_l) - 1)).cpu(),
                 atol=1e-6 * (1 + g64.abs()), name="grad_logvar")


@pytest.mark.parametrize("shape", [(1,), (3, 5, 7), (4099,)])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_reparameterize_with_kl_is_both_in_one_pass(backend, shape, dtype, reduction):
    skip_unsupported(backend, dtype)
    seed, offset = 99, 2**32 - 10
    mu, logvar = inputs(shape, dtype, backend, requires_grad=True)
    z, kl = genfast.reparameterize_with_kl(mu, logvar, seed=seed, offset=offset, reduction=reduction)
    assert torch.equal(z, genfast.reparameterize(mu, logvar, seed=seed, offset=offset))
    ref = genfast.gaussian_kl(mu, logvar, reduction)
    assert kl.dtype == ref.dtype and kl.shape == ref.shape
    ref64 = reduce64(kl64(mu, logvar), reduction)
    slack = 1e-6 * kl64(mu, logvar).abs().sum().item() * scale_of(reduction, shape)
    assert_close(kl, ref64, ref.detach().cpu(), atol=1e-6 if reduction == "none" else slack, name="kl")

    grad_z = torch.randn(shape, device=backend).to(dtype)
    grad_kl = torch.randn(kl.shape, device=backend).to(kl.dtype)
    grad_mu, grad_logvar = torch.autograd.grad((z, kl), (mu, logvar), (grad_z, grad_kl))
    eps = stream(shape, seed, offset).double()
    m64, lv64 = mu.detach().double().cpu(), logvar.detach().double().cpu()
    gz64, gk64 = grad_z.double().cpu(), grad_kl.double().cpu() * scale_of(reduction, shape)
    std64 = torch.exp(0.5 * lv64)
    # Yardstick: the two ops' gradients computed separately by PyTorch in the input dtype.
    mu_l, lv_l, eps_l = mu.detach(), logvar.detach(), eps.to(backend, dtype)
    gk_l = (grad_kl * scale_of(reduction, shape)).to(dtype)
    gmu_lowp = (grad_z + gk_l * mu_l).cpu()
    glv_lowp = (0.5 * grad_z * torch.exp(0.5 * lv_l) * eps_l + 0.5 * gk_l * (torch.exp(lv_l) - 1)).cpu()
    assert_close(grad_mu, gz64 + gk64 * m64, gmu_lowp, atol=1e-6, name="grad_mu")
    assert_close(grad_logvar, 0.5 * gz64 * std64 * eps + 0.5 * gk64 * (torch.exp(lv64) - 1), glv_lowp,
                 atol=noise_atol(logvar, gz64.abs() + gk64.abs() * std64), name="grad_logvar")


def test_given_noise_replaces_the_stream(backend):
    mu, logvar = inputs((5, 11), torch.float32, backend, requires_grad=True)
    noise = torch.randn(5, 11, device=backend, dtype=torch.float16)
    z = genfast.reparameterize(mu, logvar, noise=noise)
    std = torch.exp(0.5 * logvar.detach())
    torch.testing.assert_close(z, mu.detach() + std * noise.float(), rtol=1e-6, atol=1e-6)
    (grad_logvar,) = torch.autograd.grad(z.sum(), logvar)
    torch.testing.assert_close(grad_logvar, 0.5 * std * noise.float(), rtol=1e-6, atol=1e-6)


def test_seed_tensor_and_non_contiguous_inputs(backend):
    base_mu, base_lv = inputs((6, 40), torch.float32, backend)
    mu, logvar = base_mu.t()[::3], base_lv.t()[::3]  # (14, 6), strided
    assert not mu.is_contiguous()
    expected = genfast.reparameterize(mu.contiguous(), logvar.contiguous(), seed=5, offset=3)
    assert torch.equal(genfast.reparameterize(mu, logvar, seed=5, offset=3), expected)
    seed_t = torch.tensor(5, device=backend)
    assert torch.equal(genfast.reparameterize(mu, logvar, seed=seed_t, offset=3), expected)
    torch.testing.assert_close(genfast.gaussian_kl(mu, logvar, "none"),
                               genfast.gaussian_kl(mu.contiguous(), logvar.contiguous(), "none"))


def test_empty_input(backend):
    mu, logvar = inputs((0, 3), torch.float32, backend)
    assert genfast.reparameterize(mu, logvar, seed=1).shape == (0, 3)
    assert genfast.gaussian_kl(mu, logvar, "sum").item() == 0.0


def test_same_seed_same_sample_on_every_backend():
    mu, logvar = inputs((3, 257), torch.float32, DEVICE)
    from conftest import BACKENDS

    samples = {}
    for name, device in BACKENDS:
        with genfast.use_backend(name):
            samples[name] = genfast.reparameterize(mu.to(device), logvar.to(device), seed=77).cpu()
    for name, z in samples.items():
        torch.testing.assert_close(z, samples["reference"], rtol=0, atol=2e-6 * (1 + logvar.exp().max().item()))


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_gradcheck_fp64(reduction):
    """float64 runs on the reference: gradcheck checks the registered autograd formulas."""
    mu = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    logvar = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda m, l: genfast.reparameterize(m, l, seed=3, offset=1), (mu, logvar))
    assert torch.autograd.gradcheck(lambda m, l: genfast.gaussian_kl(m, l, reduction), (mu, logvar))
    assert torch.autograd.gradcheck(
        lambda m, l: genfast.reparameterize_with_kl(m, l, seed=3, reduction=reduction), (mu, logvar))


def test_opcheck(backend):
    mu, logvar = inputs((4, 9), torch.float32, backend, requires_grad=True)
    seed_t = torch.tensor(11, device=backend)
    ops = torch.ops.genfast
    cases = [
        (ops.reparameterize.default, (mu, logvar, None, 3, None, 5)),
        (ops.reparameterize.default, (mu, logvar, None, 0, seed_t, 5)),
        (ops.reparameterize.default, (mu, logvar, torch.randn(4, 9, device=backend), 0, None, 0)),
        (ops.reparameterize_backward.default, (torch.randn(4, 9, device=backend), logvar.detach(), None, 3, None, 5)),
        (ops.fill_noise_.default, (torch.empty(4, 9, device=backend), 3, None, 5, True)),
    ]
    for reduction in REDUCTIONS:
        grad_kl = torch.randn((4, 9) if reduction == "none" else (), device=backend)
        cases += [
            (ops.gaussian_kl.default, (mu, logvar, reduction)),
            (ops.gaussian_kl_backward.default, (grad_kl, mu.detach(), logvar.detach(), reduction)),
            (ops.reparameterize_with_kl.default, (mu, logvar, 3, None, 5, reduction)),
            (ops.reparameterize_with_kl_backward.default,
             (torch.randn(4, 9, device=backend), grad_kl, mu.detach(), logvar.detach(), 3, None, 5, reduction)),
        ]
    for op, args in cases:
        torch.library.opcheck(op, args)


def test_torch_compile_fullgraph_vae_step():
    torch._dynamo.reset()

    def vae_step(mu, logvar, seed):
        z, kl = genfast.reparameterize_with_kl(mu, logvar, seed=seed, reduction="batchmean")
        z2 = genfast.reparameterize(mu, logvar, seed=seed, offset=mu.numel())
        loss = (z * z2).mean() + kl + genfast.gaussian_kl(mu, logvar, "mean")
        return z, loss

    mu, logvar = inputs((4, 33), torch.float32, DEVICE, requires_grad=True)
    seed = torch.tensor(7, device=DEVICE)
    z, loss = vae_step(mu, logvar, seed)
    grads = torch.autograd.grad(loss, (mu, logvar))
    cz, closs = torch.compile(vae_step, fullgraph=True)(mu, logvar, seed)
    cgrads = torch.autograd.grad(closs, (mu, logvar))
    torch.testing.assert_close(cz, z)
    torch.testing.assert_close(closs, loss)
    for a, b in zip(cgrads, grads):
        torch.testing.assert_close(a, b)


def test_module():
    m = genfast.nn.Reparameterize(return_kl=True, reduction="mean")
    mu, logvar = inputs((2, 8), torch.float32, DEVICE)
    z, kl = m(mu, logvar, seed=4)
    assert torch.equal(z, genfast.reparameterize(mu, logvar, seed=4))
    torch.testing.assert_close(kl, genfast.gaussian_kl(mu, logvar, "mean"))
    m.eval()
    assert m(mu, logvar)[0] is mu
    with pytest.raises(ValueError, match="reduction"):
        genfast.nn.Reparameterize(reduction="avg")


def _never(*args):
    raise AssertionError("a kernel ran")


@pytest.mark.parametrize("call, error, match", [
    (lambda m, l: genfast.reparameterize(m, l[:, :-1]), ValueError, "logvar"),
    (lambda m, l: genfast.reparameterize(m, l.half()), TypeError, "logvar"),
    (lambda m, l: genfast.reparameterize(m, l.to("meta")), ValueError, "logvar"),
    (lambda m, l: genfast.reparameterize(m.int(), l.int()), TypeError, "mu"),
    (lambda m, l: genfast.reparameterize(m.tolist(), l), TypeError, "mu"),
    (lambda m, l: genfast.reparameterize(m, l, seed=2**64), ValueError, "seed"),
    (lambda m, l: genfast.reparameterize(m, l, seed="1"), TypeError, "seed"),
    (lambda m, l: genfast.reparameterize(m, l, offset=-3), ValueError, "offset"),
    (lambda m, l: genfast.reparameterize(m, l, noise=m[:1]), ValueError, "noise"),
    (lambda m, l: genfast.reparameterize(m, l, noise=m.long()), TypeError, "noise"),
    (lambda m, l: genfast.gaussian_kl(m, l, "avg"), ValueError, "reduction"),
    (lambda m, l: genfast.gaussian_kl(m[0, 0], l[0, 0], "batchmean"), ValueError, "batchmean"),
    (lambda m, l: genfast.gaussian_kl(m, l[:1]), ValueError, "logvar"),
    (lambda m, l: genfast.reparameterize_with_kl(m, l, reduction="total"), ValueError, "reduction"),
    (lambda m, l: genfast.reparameterize_with_kl(m, l, seed=torch.tensor(1.0)), TypeError, "seed"),
])
def test_bad_input_raises_before_anything_runs(call, error, match, monkeypatch):
    mu, logvar = inputs((3, 4), torch.float32, "cpu")
    monkeypatch.setattr(genfast._ops, "implementation", lambda *a: _never)
    with pytest.raises(error, match=match):
        call(mu, logvar)


@settings(max_examples=30, deadline=None)
@given(shape=st.lists(st.integers(1, 40), min_size=1, max_size=3),
       seed=st.integers(-(2**63), 2**63 - 1), offset=st.integers(0, 2**40),
       reduction=st.sampled_from(REDUCTIONS))
def test_cpp_matches_reference_on_random_shapes(shape, seed, offset, reduction):
    if not genfast.backends()["cpp"][0]:
        pytest.skip("no C++ backend")
    mu, logvar = inputs(shape, torch.float32, "cpu")
    out = {}
    for name in ("cpp", "reference"):
        with genfast.use_backend(name):
            out[name] = genfast.reparameterize_with_kl(mu, logvar, seed=seed, offset=offset, reduction=reduction)
    std_max = torch.exp(0.5 * logvar).max().item()
    torch.testing.assert_close(out["cpp"][0], out["reference"][0], rtol=1e-6, atol=2e-6 * (1 + std_max))
    torch.testing.assert_close(out["cpp"][1], out["reference"][1], rtol=1e-5, atol=1e-5)
