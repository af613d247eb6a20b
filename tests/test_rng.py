"""The noise stream: the same numbers on every backend, and the right statistics."""
import pytest
import torch

import genfast
from genfast.reference import rng as ref_rng

SEEDS = [0, 42, -1, 2**62 + 3, -(2**63)]


@pytest.mark.parametrize("n", [1, 7, 1000, 4099])
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("offset", [0, 5, 2**32 - 3])
def test_backends_agree_with_the_reference(backend, n, seed, offset):
    out = genfast.randn(n, seed=seed, offset=offset, device=backend)
    uni = genfast.rand(n, seed=seed, offset=offset, device=backend)
    ref = ref_rng.normal_stream(n, seed, offset, "cpu")
    ref_uni = ref_rng.uniform_stream(n, seed, offset, "cpu")
    assert (out.cpu() - ref).abs().max().item() <= 1e-6
    # The uniform is exact integer arithmetic and one conversion: bit-identical.
    assert torch.equal(uni.cpu(), ref_uni)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_is_the_rounded_fp32_stream(backend, dtype):
    out = genfast.randn(2, 3, 37, seed=7, offset=11, dtype=dtype, device=backend)
    ref = ref_rng.normal_stream(out.numel(), 7, 11, "cpu").view(out.shape)
    assert out.dtype == dtype and out.shape == (2, 3, 37)
    # A 1e-6 difference before rounding can flip the last bit, never more.
    ulp = torch.finfo(dtype).eps * ref.abs().clamp_min(2.0**-14)
    assert ((out.cpu().float() - ref).abs() <= ulp + 1e-6).all()


def test_element_i_uses_counter_offset_plus_i(backend):
    whole = genfast.randn(3, 50, seed=5, offset=100, device=backend)
    tail = genfast.randn(120, seed=5, offset=130, device=backend)
    assert torch.equal(whole.flatten()[30:], tail)


def test_seed_tensor_equals_int_seed(backend):
    a = genfast.randn(333, seed=123456789, offset=9, device=backend)
    b = genfast.randn(333, seed=torch.tensor(123456789, device=backend), offset=9, device=backend)
    assert torch.equal(a, b)


def test_seed_none_follows_torch_manual_seed():
    torch.manual_seed(3)
    a, b = genfast.randn(100), genfast.randn(100)
    torch.manual_seed(3)
    c = genfast.randn(100)
    assert torch.equal(a, c) and not torch.equal(a, b)


@pytest.mark.parametrize("name", ["reference", "cpp"])
def test_statistics_of_a_million_draws(name):
    from scipy import stats

    if not genfast.backends()[name][0]:
        pytest.skip(f"{name} backend not live")
    n = 1_000_000
    with genfast.use_backend(name):
        x = genfast.randn(n, seed=2024, offset=0).double()
        u = genfast.rand(n, seed=2024, offset=n).double()
    # 6 standard errors: a biased generator fails, a correct one practically never.
    assert abs(x.mean().item()) < 6 / n**0.5
    assert abs(x.var().item() - 1) < 6 * (2 / n) ** 0.5
    assert abs(u.mean().item() - 0.5) < 6 * (1 / 12 / n) ** 0.5
    assert 0.0 <= u.min().item() and u.max().item() < 1.0
    assert stats.kstest(x.numpy(), "norm").pvalue > 1e-4
    assert stats.kstest(u.numpy(), "uniform").pvalue > 1e-4
    # Neighbouring counters must be independent.
    assert abs(torch.corrcoef(torch.stack([x[:-1], x[1:]]))[0, 1].item()) < 6 / n**0.5


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(seed=1.5), TypeError, "seed"),
    (dict(seed=True), TypeError, "seed"),
    (dict(seed=2**63), ValueError, "seed"),
    (dict(seed=-(2**63) - 1), ValueError, "seed"),
    (dict(seed=torch.tensor(1, dtype=torch.int32)), TypeError, "seed"),
    (dict(seed=torch.tensor([1])), ValueError, "seed"),
    (dict(seed=torch.tensor(1, device="meta")), ValueError, "seed"),
    (dict(offset=-1), ValueError, "offset"),
    (dict(offset=2**63 - 5), ValueError, "offset"),
    (dict(offset=1.0), TypeError, "offset"),
    (dict(dtype=torch.int32), TypeError, "dtype"),
])
def test_bad_arguments_raise_before_anything_runs(kwargs, error, match, monkeypatch):
    def never(*args):
        raise AssertionError("a kernel ran")

    monkeypatch.setattr(genfast._ops, "implementation", lambda *a: never)
    with pytest.raises(error, match=match):
        genfast.randn(10, **kwargs)


def test_bad_shape():
    with pytest.raises(ValueError, match="shape"):
        genfast.randn(3, -1)
